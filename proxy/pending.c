/* pending: expunges the server has made that the client has not been told yet, and the renumbering between the two views they cause. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pending.h"

void
pending_init(struct pending *p)
{
	uidset_init(&p->pos);
	uidset_init(&p->vanished);
}

void
pending_clear(struct pending *p)
{
	uidset_clear(&p->pos);
	uidset_clear(&p->vanished);
}

void
pending_free(struct pending *p)
{
	uidset_free(&p->pos);
	uidset_free(&p->vanished);
}

int
pending_is(const struct pending *p, uint32_t k)
{
	return p->pos.count > 0 && uidset_contains(&p->pos, k);
}

/* Held positions at or below k. */
static uint64_t
pending_at_or_below(const struct pending *p, uint64_t k)
{
	uint64_t n = 0;

	for (size_t i = 0; i < p->pos.n && p->pos.r[i].lo <= k; i++)
		n += (k < p->pos.r[i].hi ? k : p->pos.r[i].hi) - p->pos.r[i].lo + 1;
	return n;
}

uint32_t
pending_to_server(const struct pending *p, uint32_t k)
{
	if (pending_is(p, k))
		return 0;
	return (uint32_t)(k - pending_at_or_below(p, k));
}

static uint64_t
pending_to_client64(const struct pending *p, uint64_t n)
{
	/* Each held run at or below the candidate pushes it up past the run. */
	for (size_t i = 0; i < p->pos.n && p->pos.r[i].lo <= n; i++)
		n += (uint64_t)p->pos.r[i].hi - p->pos.r[i].lo + 1;
	return n;
}

uint32_t
pending_to_client(const struct pending *p, uint32_t n)
{
	uint64_t k = pending_to_client64(p, n);

	return k > UINT32_MAX ? UINT32_MAX : (uint32_t)k;
}

uint32_t
pending_hold(struct pending *p, uint32_t n)
{
	uint32_t k = pending_to_client(p, n);

	uidset_add(&p->pos, k);
	return k;
}

int
pending_hold_positions(struct pending *p, const struct uidset *positions)
{
	for (size_t i = 0; i < positions->n; i++)
		if (uidset_add_range(&p->pos, positions->r[i].lo, positions->r[i].hi) < 0)
			return -1;
	return 0;
}

/* One seq-number ("*" is star) at s[*i..len). */
static int
pending_parse_number(const char *s, size_t len, size_t *i, uint32_t star, uint64_t *v)
{
	uint64_t x = 0;
	size_t start = *i;

	if (*i < len && s[*i] == '*') {
		(*i)++;
		*v = star;
		return star > 0 ? 0 : -1;
	}
	while (*i < len && s[*i] >= '0' && s[*i] <= '9' && *i - start < 10)
		x = x * 10 + (uint64_t)(s[(*i)++] - '0');
	if (*i == start || x == 0 || x > UINT32_MAX || (*i < len && s[*i] >= '0' && s[*i] <= '9'))
		return -1;
	*v = x;
	return 0;
}

int
pending_set_to_server(const struct pending *p, const char *set, size_t len,
    uint32_t client_count, struct uidset *out, int *held)
{
	size_t i = 0;

	*held = 0;
	if (len == 0)
		return -1;
	for (;;) {
		uint64_t a, b;

		if (pending_parse_number(set, len, &i, client_count, &a) < 0)
			return -1;
		b = a;
		if (i < len && set[i] == ':') {
			i++;
			if (pending_parse_number(set, len, &i, client_count, &b) < 0)
				return -1;
		}
		if (a > b) {
			uint64_t t = a;
			a = b;
			b = t;
		}
		/* The messages of a..b the server still has are one run of its numbers. */
		uint64_t below_a = pending_at_or_below(p, a - 1), upto_b = pending_at_or_below(p, b);
		uint64_t lo = a - below_a, hi = b - upto_b;

		if (upto_b > below_a)
			*held = 1;
		if (lo <= hi && uidset_add_range(out, (uint32_t)lo, (uint32_t)hi) < 0)
			return -1;
		if (i == len)
			return 0;
		if (set[i++] != ',')
			return -1;
	}
}

int
pending_set_to_client(const struct pending *p, const struct uidset *server, struct uidset *out)
{
	for (size_t s = 0; s < server->n; s++) {
		uint64_t cur = pending_to_client64(p, server->r[s].lo);
		uint64_t left = (uint64_t)server->r[s].hi - server->r[s].lo + 1;
		size_t i = 0;

		while (i < p->pos.n && p->pos.r[i].hi < cur)
			i++;
		while (left > 0 && cur <= UINT32_MAX) {
			uint64_t end = cur + left - 1;

			if (i < p->pos.n && p->pos.r[i].lo <= end)
				end = p->pos.r[i].lo - 1;
			if (uidset_add_range(out, (uint32_t)cur,
			    (uint32_t)(end > UINT32_MAX ? UINT32_MAX : end)) < 0)
				return -1;
			left -= end - cur + 1;
			if (left > 0)
				cur = (uint64_t)p->pos.r[i++].hi + 1;
		}
	}
	return 0;
}

struct pending_out {
	char *p;
	size_t len, cap;
	int failed;
};

static void
pending_out_add(struct pending_out *o, const char *s, size_t n)
{
	if (o->failed)
		return;
	if (o->len + n + 1 > o->cap) {
		size_t cap = (o->len + n + 1) * 2;
		char *np = realloc(o->p, cap);
		if (np == NULL) {
			o->failed = 1;
			return;
		}
		o->p = np;
		o->cap = cap;
	}
	memcpy(o->p + o->len, s, n);
	o->len += n;
	o->p[o->len] = '\0';
}

static int
pending_all_digits(const char *s, size_t n)
{
	if (n == 0 || n > 10)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return 0;
	return 1;
}

static void
pending_out_number(struct pending_out *o, const struct pending *p, const char *s, size_t n)
{
	char num[16];
	uint64_t v = strtoull(s, NULL, 10);
	int len;

	if (v == 0 || v > UINT32_MAX) {
		pending_out_add(o, s, n);
		return;
	}
	len = snprintf(num, sizeof(num), "%u", pending_to_client(p, (uint32_t)v));
	pending_out_add(o, num, (size_t)len);
}

static void
pending_out_set(struct pending_out *o, const struct pending *p, const char *s, size_t n)
{
	struct uidset server, client;
	char *buf;
	size_t need;

	uidset_init(&server);
	uidset_init(&client);
	if (uidset_parse(&server, s, n) < 0 || pending_set_to_client(p, &server, &client) < 0) {
		pending_out_add(o, s, n);
		goto out;
	}
	need = uidset_format(&client, NULL, 0) + 1;
	if ((buf = malloc(need)) == NULL) {
		o->failed = 1;
		goto out;
	}
	uidset_format(&client, buf, need);
	pending_out_add(o, buf, strlen(buf));
	free(buf);
out:
	uidset_free(&server);
	uidset_free(&client);
}

char *
pending_renumber_search(const struct pending *p, const char *line, size_t len, size_t *outlen)
{
	struct pending_out o = { NULL, 0, 0, 0 };
	size_t i = 0;
	int depth = 0, esearch = 0, is_uid = 0;
	char prev[8] = "";	/* the ESEARCH item name the next atom is the value of */
	unsigned word = 0;	/* top-level words seen: "*", then SEARCH/SORT/ESEARCH */

	while (i < len) {
		size_t start = i;

		if (line[i] == ' ') {
			pending_out_add(&o, " ", 1);
			i++;
			continue;
		}
		if (line[i] == '(' || line[i] == ')') {
			if (line[i] == '(' && depth == 0)
				prev[0] = '\0';	/* a list is a whole value (PARTIAL) */
			depth += line[i] == '(' ? 1 : -1;
			pending_out_add(&o, line + i++, 1);
			continue;
		}
		if (line[i] == '"') {
			for (i++; i < len && line[i] != '"'; i++)
				if (line[i] == '\\' && i + 1 < len)
					i++;
			if (i < len)
				i++;
			pending_out_add(&o, line + start, i - start);
			continue;
		}
		while (i < len && line[i] != ' ' && line[i] != '(' && line[i] != ')')
			i++;
		const char *a = line + start;
		size_t n = i - start;

		if (depth > 0 || word < 2) {
			if (depth == 0 && word == 1 && n == 7 && strncasecmp(a, "ESEARCH", 7) == 0)
				esearch = 1;
			if (depth == 0)
				word++;
			pending_out_add(&o, a, n);
			continue;
		}
		word++;
		if (!esearch) {
			if (pending_all_digits(a, n))
				pending_out_number(&o, p, a, n);
			else
				pending_out_add(&o, a, n);
			continue;
		}
		if (n == 3 && strncasecmp(a, "UID", 3) == 0 && prev[0] == '\0')
			is_uid = 1;
		if (!is_uid && (strcmp(prev, "MIN") == 0 || strcmp(prev, "MAX") == 0) &&
		    pending_all_digits(a, n))
			pending_out_number(&o, p, a, n);
		else if (!is_uid && strcmp(prev, "ALL") == 0)
			pending_out_set(&o, p, a, n);
		else
			pending_out_add(&o, a, n);
		if (prev[0] != '\0' || (n == 3 && strncasecmp(a, "UID", 3) == 0))
			prev[0] = '\0';	/* that was a value (or the indicator) */
		else {
			size_t k = n < sizeof(prev) - 1 ? n : sizeof(prev) - 1;
			for (size_t j = 0; j < k; j++)
				prev[j] = (char)(a[j] >= 'a' && a[j] <= 'z' ? a[j] - 32 : a[j]);
			prev[k] = '\0';
		}
	}
	if (o.failed || o.p == NULL) {
		free(o.p);
		return NULL;
	}
	*outlen = o.len;
	return o.p;
}
