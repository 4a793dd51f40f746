/* test_metrics: histogram bucketing, and metrics_render() output that a strict Prometheus text parser accepts. */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <event2/buffer.h>

#include "metrics.h"
#include "server.h"
#include "tap.h"

/* What the parser learnt about one family. */
struct family {
	char name[128];
	char type[16];
	int help, samples;
};

static struct family families[128];
static int n_families;

static struct family *
test_family(const char *name)
{
	for (int i = 0; i < n_families; i++)
		if (strcmp(families[i].name, name) == 0)
			return &families[i];
	return NULL;
}

static int
test_name_ok(const char *s, size_t n)
{
	if (n == 0 || !(isalpha((unsigned char)s[0]) || s[0] == '_' || s[0] == ':'))
		return 0;
	for (size_t i = 1; i < n; i++)
		if (!(isalnum((unsigned char)s[i]) || s[i] == '_' || s[i] == ':'))
			return 0;
	return 1;
}

/* The family a sample belongs to: histogram samples drop their suffix. */
static struct family *
test_sample_family(const char *name)
{
	static const char *const suffixes[] = { "_bucket", "_sum", "_count" };
	struct family *f = test_family(name);
	char base[128];

	if (f != NULL)
		return f;
	for (int i = 0; i < 3; i++) {
		size_t n = strlen(name), k = strlen(suffixes[i]);
		if (n > k && n - k < sizeof(base) && strcmp(name + n - k, suffixes[i]) == 0) {
			memcpy(base, name, n - k);
			base[n - k] = '\0';
			if ((f = test_family(base)) != NULL && strcmp(f->type, "histogram") == 0)
				return f;
		}
	}
	return NULL;
}

/* Labels: {name="value",...} with \\, \" and \n escapes; returns past '}' or NULL. */
static const char *
test_labels(const char *p)
{
	if (*p++ != '{')
		return NULL;
	while (*p != '}') {
		const char *start = p;
		while (isalnum((unsigned char)*p) || *p == '_')
			p++;
		if (p == start || *p++ != '=' || *p++ != '"')
			return NULL;
		while (*p != '"') {
			if (*p == '\0' || *p == '\n')
				return NULL;
			if (*p == '\\') {
				p++;
				if (*p != '\\' && *p != '"' && *p != 'n')
					return NULL;
			}
			p++;
		}
		p++;
		if (*p == ',')
			p++;
		else if (*p != '}')
			return NULL;
	}
	return p + 1;
}

/* A strict reading of text format 0.0.4: every line is HELP, TYPE or a
 * sample; HELP and TYPE come once per family, before its samples; sample
 * values are numbers. Returns the number of bad lines (reported). */
static int
test_parse(const char *text)
{
	char line[4096];
	int bad = 0, lineno = 0;

	n_families = 0;
	while (*text) {
		const char *nl = strchr(text, '\n'), *p, *v;
		size_t len;
		char *endp;

		if (nl == NULL) {
			diag("last line has no newline");
			return bad + 1;
		}
		len = (size_t)(nl - text);
		if (len >= sizeof(line)) {
			diag("line too long");
			return bad + 1;
		}
		memcpy(line, text, len);
		line[len] = '\0';
		text = nl + 1;
		lineno++;
		if (strncmp(line, "# HELP ", 7) == 0 || strncmp(line, "# TYPE ", 7) == 0) {
			const char *name = line + 7, *sp = strchr(name, ' ');
			struct family *f;
			char fname[128];

			if (sp == NULL || !test_name_ok(name, (size_t)(sp - name)) ||
			    (size_t)(sp - name) >= sizeof(fname)) {
				diag("line %d: bad HELP/TYPE: %s", lineno, line);
				bad++;
				continue;
			}
			memcpy(fname, name, (size_t)(sp - name));
			fname[sp - name] = '\0';
			if ((f = test_family(fname)) == NULL) {
				if (n_families == (int)(sizeof(families) / sizeof(families[0]))) {
					diag("too many families");
					return bad + 1;
				}
				f = &families[n_families++];
				memset(f, 0, sizeof(*f));
				snprintf(f->name, sizeof(f->name), "%s", fname);
			}
			if (f->samples) {
				diag("line %d: HELP/TYPE after samples of %s", lineno, fname);
				bad++;
			}
			if (line[2] == 'H') {
				bad += f->help++ != 0;
			} else {
				if (f->type[0] || (strcmp(sp + 1, "counter") && strcmp(sp + 1, "gauge") &&
				    strcmp(sp + 1, "histogram"))) {
					diag("line %d: bad or repeated TYPE: %s", lineno, line);
					bad++;
				}
				snprintf(f->type, sizeof(f->type), "%s", sp + 1);
			}
			continue;
		}
		if (line[0] == '#' || line[0] == '\0') {
			diag("line %d: stray line: %s", lineno, line);
			bad++;
			continue;
		}
		for (p = line; isalnum((unsigned char)*p) || *p == '_' || *p == ':'; p++)
			;
		{
			char sname[128];
			struct family *f;

			snprintf(sname, sizeof(sname), "%.*s", (int)(p - line), line);
			if (!test_name_ok(line, (size_t)(p - line)) ||
			    (f = test_sample_family(sname)) == NULL || !f->help || !f->type[0]) {
				diag("line %d: sample without HELP and TYPE first: %s", lineno, line);
				bad++;
				continue;
			}
			f->samples++;
			if (strcmp(f->type, "counter") == 0 && (strlen(f->name) < 6 ||
			    strcmp(f->name + strlen(f->name) - 6, "_total") != 0)) {
				diag("line %d: counter %s does not end in _total", lineno, f->name);
				bad++;
			}
		}
		if (*p == '{' && (p = test_labels(p)) == NULL) {
			diag("line %d: bad labels: %s", lineno, line);
			bad++;
			continue;
		}
		if (*p++ != ' ') {
			diag("line %d: no space before the value: %s", lineno, line);
			bad++;
			continue;
		}
		v = p;
		strtod(v, &endp);
		if (endp == v || *endp != '\0') {
			diag("line %d: value is not a number: %s", lineno, line);
			bad++;
		}
	}
	return bad;
}

static int
test_has_line(const char *text, const char *want)
{
	size_t n = strlen(want);

	for (const char *p = text; (p = strstr(p, want)) != NULL; p++)
		if ((p == text || p[-1] == '\n') && p[n] == '\n')
			return 1;
	return 0;
}

static char *
test_render(struct server *srv)
{
	struct evbuffer *out = evbuffer_new();
	size_t len;
	char *text;

	metrics_render(srv, out);
	len = evbuffer_get_length(out);
	text = malloc(len + 1);
	evbuffer_remove(out, text, len);
	text[len] = '\0';
	evbuffer_free(out);
	return text;
}

int
main(void)
{
	static struct server srv;
	struct metrics_histogram h;
	char *text;

	/* bucket bounds ascend, 100 us to 10 s */
	ok(metrics_bucket_usec[0] == 100 && metrics_bucket_usec[METRICS_BUCKETS - 1] == 10000000,
	    "buckets run from 100us to 10s");
	{
		int asc = 1;
		for (int i = 1; i < METRICS_BUCKETS; i++)
			asc &= metrics_bucket_usec[i] > metrics_bucket_usec[i - 1];
		ok(asc, "bucket bounds strictly ascend");
	}

	/* observations land in the first bucket whose bound holds them */
	memset(&h, 0, sizeof(h));
	metrics_observe(&h, 0);
	metrics_observe(&h, 100);	/* on the bound: le is inclusive */
	metrics_observe(&h, 101);
	metrics_observe(&h, 999999);
	metrics_observe(&h, 10000000);
	metrics_observe(&h, 10000001);	/* past the last bound: +Inf only */
	ok(h.count == 6, "count is 6 (%llu)", (unsigned long long)h.count);
	ok(h.sum_usec == 0 + 100 + 101 + 999999 + 10000000 + 10000001, "sum is exact");
	ok(h.bucket[0] == 2, "0 and 100us in le=0.0001 (%llu)", (unsigned long long)h.bucket[0]);
	ok(h.bucket[1] == 1, "101us in le=0.00025");
	ok(h.bucket[12] == 1, "999999us in le=1");
	ok(h.bucket[METRICS_BUCKETS - 1] == 1, "10s in le=10");
	{
		uint64_t in = 0;
		for (int i = 0; i < METRICS_BUCKETS; i++)
			in += h.bucket[i];
		ok(in == 5, "the over-10s observation is in no finite bucket");
	}

	/* a whole render, with no store and no sessions, parses strictly */
	TAILQ_INIT(&srv.sessions);
	snprintf(srv.instance, sizeof(srv.instance), "unit\"test\\");
	srv.started = 1700000000;
	srv.cfg.max_clients = 250;
	srv.stats.accepted = 7;
	srv.stats.resync_injections = 3;
	srv.stats.bytes_upstream_to_client = 12345;
	srv.metrics.command_latency = h;
	metrics_observe(&srv.metrics.resync_latency, 2500);
	text = test_render(&srv);
	ok(test_parse(text) == 0, "render parses as Prometheus text 0.0.4");
	ok(test_has_line(text, "imapfresh_connections_accepted_total 7"), "accepted counter");
	ok(test_has_line(text, "imapfresh_resync_injections_total 3"), "injections counter");
	ok(test_has_line(text, "imapfresh_bytes_total{direction=\"upstream_to_client\"} 12345"),
	    "bytes by direction");
	ok(test_has_line(text, "imapfresh_sessions{state=\"running\"} 0"), "sessions by state");
	ok(test_has_line(text, "imapfresh_process_start_time_seconds 1700000000"), "start time");
	ok(strstr(text, "imapfresh_build_info{version=\"") != NULL &&
	    strstr(text, "instance=\"unit\\\"test\\\\\"} 1\n") != NULL,
	    "build info, label value escaped");
	ok(test_has_line(text, "imapfresh_command_duration_seconds_bucket{le=\"0.0001\"} 2"),
	    "first bucket cumulative");
	ok(test_has_line(text, "imapfresh_command_duration_seconds_bucket{le=\"0.00025\"} 3"),
	    "second bucket cumulative");
	ok(test_has_line(text, "imapfresh_command_duration_seconds_bucket{le=\"10\"} 5"),
	    "last finite bucket cumulative");
	ok(test_has_line(text, "imapfresh_command_duration_seconds_bucket{le=\"+Inf\"} 6"),
	    "+Inf bucket is the count");
	ok(test_has_line(text, "imapfresh_command_duration_seconds_sum 21.000201"), "sum in seconds");
	ok(test_has_line(text, "imapfresh_command_duration_seconds_count 6"), "count");
	ok(test_has_line(text, "imapfresh_resync_duration_seconds_bucket{le=\"0.0025\"} 1"),
	    "resync latency histogram");
	ok(test_has_line(text, "imapfresh_redis_connected 0"), "redis gauge without a store");
	ok(test_has_line(text, "imapfresh_max_clients 250"), "max_clients gauge");
	{
		struct family *f = test_family("imapfresh_command_duration_seconds");
		ok(f != NULL && strcmp(f->type, "histogram") == 0 && f->samples == METRICS_BUCKETS + 3,
		    "histogram has %d buckets, +Inf, _sum and _count", METRICS_BUCKETS);
	}
	free(text);

	/* the parser itself rejects what it should */
	ok(test_parse("x_total 1\n") > 0, "parser: sample without HELP/TYPE is rejected");
	ok(test_parse("# HELP a_total h\n# TYPE a_total counter\na_total one\n") > 0,
	    "parser: non-numeric value is rejected");
	ok(test_parse("# HELP a h\n# TYPE a counter\na 1\n") > 0,
	    "parser: counter without _total is rejected");
	ok(test_parse("# HELP a h\n# TYPE a gauge\na{l=\"x} 1\n") > 0,
	    "parser: unterminated label is rejected");
	return tap_done();
}
