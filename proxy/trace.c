/* trace: protocol traces of the sessions an operator picked, every secret redacted. */

/*
 * One record per line read (C>P, U>P), rendered from its tokens, with its
 * fate; one per line imapfresh wrote itself (P>U*, P>C). Forwarded lines are
 * not written twice: "C>P ... => forwarded" implies the same bytes P>U.
 *
 *   2025-03-01T10:00:00.123Z mx1:s7 127.0.0.1:40312 alice C>P a3 UID FETCH 1:* (FLAGS) => held
 *   2025-03-01T10:00:00.123Z mx1:s7 127.0.0.1:40312 alice P>U* imapfresh.3 NOOP
 *
 * A line that contains a literal is recorded a segment at a time (a segment
 * ends at the literal's announcement or at the end of the line); the payload
 * opens the next segment as <literal N bytes sha256:HEX>, or with "bodies"
 * as <literal N bytes "escaped bytes">. Secret tokens (and a secret
 * literal's payload) are "<redacted>", whatever the spec. A rendered line is
 * capped at TRACE_LINE_MAX bytes, the rest counted in "…(+N bytes)".
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <openssl/evp.h>

#include "log.h"
#include "session.h"
#include "store.h"
#include "trace.h"

#define TRACE_LINE_MAX 4096		/* rendered bytes of one line */
#define TRACE_LOG_LINE_MAX 1500		/* to the daemon log, whose lines are 2 KiB */
#define TRACE_BACKLOG_LINES 32		/* records kept while the user is unknown */
#define TRACE_BACKLOG_BYTES 16384
#define TRACE_REOPEN_CHECK_SECS 1	/* how often trace_file is checked for rotation */

enum trace_kind {
	TRACE_KIND_ALL,
	TRACE_KIND_USER,
	TRACE_KIND_CLIENT,
};

struct trace_rules {
	char spec[300];		/* as given, for trace_get() */
	enum trace_kind kind;
	char arg[256];		/* user name or client address (prefix) */
	int bodies;
	int fd;			/* trace_file, -1: the daemon log */
	char path[1024];	/* what fd was opened on ("" = the log) */
	dev_t dev;
	ino_t ino;
	time_t checked;		/* last rotation check */
	int warned;		/* trace_file trouble already logged */
};

/* The line being read in one direction (C>P or U>P). */
struct trace_seg {
	char *buf;		/* rendered so far, at most TRACE_LINE_MAX */
	size_t len, cap;
	uint64_t dropped;	/* bytes beyond the cap */
	unsigned ntok;		/* tokens since the last fate */
	int eol;		/* this segment reached the end of the line */
	int no_space;		/* the last token was "(": no space before the next */
	int recorded;		/* buf holds the line last recorded (nothing new since) */
	int have_prev;		/* a line was recorded at all */
	int prev_eol;		/* and it ended at the end of the line */
	int bare_eol;		/* an EOL came after it with nothing else */
	enum trace_fate fate;	/* what it was recorded with */
	/* the literal whose payload is being read */
	int in_lit, lit_secret, lit_open;
	int lit_bodies;		/* the spec said bodies when the literal began */
	uint64_t lit_size, lit_seen;
	EVP_MD_CTX *md;
};

/* A record waiting for the session's user to be known ("user NAME"). */
struct trace_rec {
	struct timeval tv;
	enum trace_dir dir;
	int injected;
	int note;		/* not a protocol line: "---" instead of a direction */
	const char *fate, *was;	/* static strings, or NULL */
	char *line;
	size_t len;
	uint64_t dropped;
};

struct trace_backlog {
	struct trace_rec r[TRACE_BACKLOG_LINES];
	unsigned head, n;
	size_t bytes;
	uint64_t lost;		/* older records let go */
};

struct trace_session {
	struct trace_seg seg[2];	/* C2P, U2P */
	int pending;			/* "user NAME" and the user is not known yet */
	struct trace_backlog *backlog;
};

static const char *const trace_dir_names[] = {
	[TRACE_C2P] = "C>P", [TRACE_P2U] = "P>U", [TRACE_U2P] = "U>P", [TRACE_P2C] = "P>C",
};

static const char *const trace_fate_names[] = {
	[TRACE_FORWARDED] = "forwarded", [TRACE_REWRITTEN] = "rewritten",
	[TRACE_HIDDEN] = "hidden", [TRACE_REFUSED] = "refused", [TRACE_HELD] = "held",
	[TRACE_LOCAL] = "local",
};

static struct trace_seg *
trace_seg_of(struct trace_session *t, enum trace_dir dir)
{
	if (dir == TRACE_C2P)
		return &t->seg[0];
	if (dir == TRACE_U2P)
		return &t->seg[1];
	return NULL;
}

/* --- rendering --- */

/* Append, within the cap; what does not fit is only counted. */
static void
trace_put(struct trace_seg *g, const char *p, size_t n)
{
	size_t room = g->len < TRACE_LINE_MAX ? TRACE_LINE_MAX - g->len : 0;

	if (n > room) {
		g->dropped += n - room;
		n = room;
	}
	if (n == 0)
		return;
	if (g->len + n > g->cap) {
		size_t cap = g->cap ? g->cap : 256;
		char *b;

		while (cap < g->len + n)
			cap *= 2;
		if (cap > TRACE_LINE_MAX)
			cap = TRACE_LINE_MAX;
		if ((b = realloc(g->buf, cap)) == NULL) {
			g->dropped += n;
			return;
		}
		g->buf = b;
		g->cap = cap;
	}
	memcpy(g->buf + g->len, p, n);
	g->len += n;
}

static void
trace_puts(struct trace_seg *g, const char *s)
{
	trace_put(g, s, strlen(s));
}

enum trace_esc {
	TRACE_ESC_CTL,		/* atoms, text: control bytes as \xHH */
	TRACE_ESC_QUOTED,	/* quoted strings: also " and \ backslashed */
	TRACE_ESC_BODY,		/* literal payloads: also 8-bit bytes, \r \n \t named */
};

/* Escape p into out (at least 4 * n bytes); returns the length. */
static size_t
trace_escape(const unsigned char *p, size_t n, enum trace_esc mode, char *out)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned char c = p[i];

		if (mode != TRACE_ESC_CTL && (c == '"' || c == '\\')) {
			out[o++] = '\\';
			out[o++] = (char)c;
		} else if (mode == TRACE_ESC_BODY && (c == '\r' || c == '\n' || c == '\t')) {
			out[o++] = '\\';
			out[o++] = c == '\r' ? 'r' : c == '\n' ? 'n' : 't';
		} else if (c < 0x20 || c == 0x7f || (mode == TRACE_ESC_BODY && c >= 0x80)) {
			out[o++] = '\\';
			out[o++] = 'x';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		} else
			out[o++] = (char)c;
	}
	return o;
}

/* Escaped, chunk by chunk; once the cap is reached the rest is only counted. */
static void
trace_put_escaped(struct trace_seg *g, const char *p, size_t n, enum trace_esc mode)
{
	char out[4 * 256];

	while (n > 0) {
		size_t k = n < 256 ? n : 256;

		if (g->len >= TRACE_LINE_MAX) {
			g->dropped += n;
			return;
		}
		trace_put(g, out, trace_escape((const unsigned char *)p, k, mode, out));
		p += k;
		n -= k;
	}
}

/* A new token of the line: start afresh if the last one was recorded. */
static void
trace_seg_begin(struct trace_seg *g)
{
	if (g->recorded) {
		g->len = 0;
		g->dropped = 0;
		g->ntok = 0;
		g->eol = 0;
		g->no_space = 1;
		g->recorded = 0;
		g->bare_eol = 0;
	}
}

/* The separator before an item. */
static void
trace_space(struct trace_seg *g, int before_close)
{
	if (g->len > 0 && !g->no_space && !before_close)
		trace_put(g, " ", 1);
	g->no_space = 0;
}

static void
trace_lit_abort(struct trace_seg *g)
{
	g->in_lit = g->lit_open = g->lit_secret = 0;
}

static void
trace_lit_start(struct trace_seg *g, const struct imap_tok *tok, int secret, int bodies)
{
	g->in_lit = 1;
	g->lit_secret = secret;
	g->lit_bodies = bodies;
	g->lit_open = 0;
	g->lit_size = tok->literal_size;
	g->lit_seen = 0;
	if (secret || bodies)
		return;
	if (g->md == NULL)
		g->md = EVP_MD_CTX_new();
	if (g->md != NULL && EVP_DigestInit_ex(g->md, EVP_sha256(), NULL) != 1) {
		EVP_MD_CTX_free(g->md);
		g->md = NULL;
	}
}

/* Payload bytes of the literal being read, from the lexer or in bulk. */
static void
trace_lit_data(struct trace_seg *g, const char *p, size_t n)
{
	g->lit_seen += n;
	if (g->lit_secret)
		return;
	if (!g->lit_bodies) {
		if (g->md != NULL)
			EVP_DigestUpdate(g->md, p, n);
		return;
	}
	if (!g->lit_open) {
		char head[64];

		snprintf(head, sizeof(head), "<literal %llu bytes \"",
		    (unsigned long long)g->lit_size);
		trace_space(g, 0);
		trace_puts(g, head);
		g->lit_open = 1;
		g->ntok++;
	}
	trace_put_escaped(g, p, n, TRACE_ESC_BODY);
}

static void
trace_lit_end(struct trace_seg *g)
{
	char text[128];

	if (g->lit_secret) {
		trace_space(g, 0);
		trace_puts(g, "<redacted>");
	} else if (g->lit_bodies) {
		if (!g->lit_open)
			trace_lit_data(g, "", 0);	/* empty: the head still */
		trace_puts(g, "\">");
	} else {
		unsigned char md[EVP_MAX_MD_SIZE];
		unsigned int mdlen = 0;
		int o;

		o = snprintf(text, sizeof(text), "<literal %llu bytes sha256:",
		    (unsigned long long)g->lit_seen);
		if (g->md != NULL && EVP_DigestFinal_ex(g->md, md, &mdlen) == 1) {
			for (unsigned int i = 0; i < mdlen && o < (int)sizeof(text) - 3; i++)
				o += snprintf(text + o, sizeof(text) - (size_t)o, "%02x", md[i]);
		} else
			o += snprintf(text + o, sizeof(text) - (size_t)o, "?");
		snprintf(text + o, sizeof(text) - (size_t)o, ">");
		trace_space(g, 0);
		trace_puts(g, text);
	}
	g->ntok++;
	trace_lit_abort(g);
}

/* --- output --- */

static void
trace_close_file(struct trace_rules *r)
{
	if (r->fd >= 0)
		close(r->fd);
	r->fd = -1;
	r->path[0] = '\0';
}

/* Open path for appending; -1 with errno on failure. */
static int
trace_open_file(struct trace_rules *r, const char *path)
{
	struct stat st;
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);

	if (fd < 0)
		return -1;
	if (r->fd >= 0)
		close(r->fd);
	r->fd = fd;
	snprintf(r->path, sizeof(r->path), "%s", path);
	if (fstat(fd, &st) == 0) {
		r->dev = st.st_dev;
		r->ino = st.st_ino;
	}
	r->checked = time(NULL);
	r->warned = 0;
	return 0;
}

/* Keep the file in line with trace_file (changed by a reload, or rotated
 * away): a missing or replaced file is reopened, checked once a second. */
static void
trace_check_file(struct server *srv, struct trace_rules *r)
{
	const char *want = srv->cfg.trace_file;
	time_t now;
	struct stat st;

	if (want[0] == '\0') {
		if (r->fd >= 0 || r->path[0] != '\0')
			trace_close_file(r);
		return;
	}
	if (strcmp(want, r->path) == 0 && r->fd >= 0) {
		now = time(NULL);
		if (now - r->checked < TRACE_REOPEN_CHECK_SECS)
			return;
		r->checked = now;
		if (stat(want, &st) == 0 && st.st_dev == r->dev && st.st_ino == r->ino)
			return;
	} else if (strcmp(want, r->path) == 0) {
		now = time(NULL);		/* failed before: retry now and then */
		if (now - r->checked < TRACE_REOPEN_CHECK_SECS)
			return;
	}
	if (trace_open_file(r, want) < 0) {
		if (!r->warned)
			log_warning("trace_file %s: %s; traces go to the log meanwhile", want,
			    strerror(errno));
		trace_close_file(r);
		snprintf(r->path, sizeof(r->path), "%s", want);	/* retried later */
		r->checked = time(NULL);
		r->warned = 1;
	}
}

static void
trace_format_time(const struct timeval *tv, char *buf, size_t len)
{
	struct tm tm;
	char ts[32];

	gmtime_r(&tv->tv_sec, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, len, "%s.%03dZ", ts, (int)(tv->tv_usec / 1000));
}

/* The user as one word: "-" when unknown, spaces and controls escaped. */
static void
trace_format_user(const struct session *s, char *buf, size_t len)
{
	const char *u = s->track.user;
	size_t o = 0;

	if (u[0] == '\0') {
		snprintf(buf, len, "-");
		return;
	}
	for (; *u && o + 5 < len; u++) {
		unsigned char c = (unsigned char)*u;
		if (c <= 0x20 || c == 0x7f)
			o += (size_t)snprintf(buf + o, len - o, "\\x%02x", c);
		else
			buf[o++] = (char)c;
	}
	buf[o] = '\0';
}

/* One record out: a text line to trace_file (or the log), and an entry in
 * the Redis stream. */
static void
trace_write(struct session *s, const struct trace_rec *r)
{
	struct server *srv = s->srv;
	struct trace_rules *rules = srv->trace_rules;
	char ts[40], sid[200], user[1100], fate[64], more[48], dir[8];
	char rec[TRACE_LINE_MAX + 2048];
	size_t show = r->len, room;
	uint64_t dropped = r->dropped;
	int n;

	if (rules == NULL)
		return;
	trace_check_file(srv, rules);
	trace_format_time(&r->tv, ts, sizeof(ts));
	snprintf(sid, sizeof(sid), "%s:%s", srv->instance, s->sid);
	trace_format_user(s, user, sizeof(user));
	snprintf(dir, sizeof(dir), "%s%s", r->note ? "---" : trace_dir_names[r->dir],
	    r->injected ? "*" : "");
	fate[0] = '\0';
	if (r->fate != NULL && r->was != NULL)
		snprintf(fate, sizeof(fate), "%s (was %s)", r->fate, r->was);
	else if (r->fate != NULL)
		snprintf(fate, sizeof(fate), "%s", r->fate);
	if (rules->fd < 0 && show > TRACE_LOG_LINE_MAX) {
		dropped += show - TRACE_LOG_LINE_MAX;
		show = TRACE_LOG_LINE_MAX;
	}
	more[0] = '\0';
	if (dropped > 0)
		snprintf(more, sizeof(more), "\xe2\x80\xa6(+%llu bytes)",
		    (unsigned long long)dropped);

	n = snprintf(rec, sizeof(rec), "%s %s %s %s %s ", ts, sid, s->client_addr, user, dir);
	if (n < 0 || (size_t)n >= sizeof(rec))
		return;
	room = sizeof(rec) - (size_t)n - sizeof(more) - sizeof(fate) - 8;
	if (show > room)
		show = room;
	memcpy(rec + n, r->line, show);
	n += (int)show;
	n += snprintf(rec + n, sizeof(rec) - (size_t)n, "%s%s%s", more,
	    !fate[0] ? "" : show > 0 || more[0] ? " => " : "=> ", fate);
	if (rules->fd >= 0) {
		rec[n] = '\n';
		if (write(rules->fd, rec, (size_t)n + 1) < 0 && !rules->warned) {
			rules->warned = 1;
			log_warning("trace_file %s: %s", rules->path, strerror(errno));
		}
	} else
		log_msg(LOG_LEVEL_INFO, NULL, "trace %s", rec);

	if (srv->store != NULL && srv->cfg.trace_stream_max > 0) {
		char line[TRACE_LINE_MAX + 64];
		const char *fields[16];
		size_t k = 0;

		show = r->len < TRACE_LINE_MAX ? r->len : TRACE_LINE_MAX;
		memcpy(line, r->line, show);
		if (r->dropped > 0)
			snprintf(line + show, sizeof(line) - show, "\xe2\x80\xa6(+%llu bytes)",
			    (unsigned long long)r->dropped);
		else
			line[show] = '\0';
		fields[k++] = "ts";
		fields[k++] = ts;
		fields[k++] = "instance";
		fields[k++] = srv->instance;
		fields[k++] = "sid";
		fields[k++] = sid;
		fields[k++] = "client";
		fields[k++] = s->client_addr;
		fields[k++] = "user";
		fields[k++] = s->track.user;
		fields[k++] = "dir";
		fields[k++] = dir;
		fields[k++] = "line";
		fields[k++] = line;
		fields[k++] = "fate";
		fields[k++] = fate;
		store_stream_add(srv->store, "trace", (size_t)srv->cfg.trace_stream_max, fields,
		    k / 2);
	}
}

static void
trace_backlog_free(struct trace_backlog *b)
{
	if (b == NULL)
		return;
	for (unsigned i = 0; i < b->n; i++)
		free(b->r[(b->head + i) % TRACE_BACKLOG_LINES].line);
	free(b);
}

/* Keep a record until the session's user is known; the oldest go first. */
static void
trace_backlog_add(struct trace_session *t, const struct trace_rec *r)
{
	struct trace_backlog *b = t->backlog;
	struct trace_rec *slot;

	if (b == NULL && (b = t->backlog = calloc(1, sizeof(*b))) == NULL)
		return;
	while (b->n > 0 &&
	    (b->n == TRACE_BACKLOG_LINES || b->bytes + r->len > TRACE_BACKLOG_BYTES)) {
		slot = &b->r[b->head];
		b->bytes -= slot->len;
		free(slot->line);
		b->head = (b->head + 1) % TRACE_BACKLOG_LINES;
		b->n--;
		b->lost++;
	}
	slot = &b->r[(b->head + b->n) % TRACE_BACKLOG_LINES];
	*slot = *r;
	if (r->len > TRACE_BACKLOG_BYTES)
		slot->len = TRACE_BACKLOG_BYTES, slot->dropped += r->len - TRACE_BACKLOG_BYTES;
	if ((slot->line = malloc(slot->len + 1)) == NULL) {
		b->lost++;
		return;
	}
	memcpy(slot->line, r->line, slot->len);
	b->bytes += slot->len;
	b->n++;
}

static void
trace_backlog_flush(struct session *s, struct trace_session *t)
{
	struct trace_backlog *b = t->backlog;

	if (b == NULL)
		return;
	t->backlog = NULL;
	if (b->lost > 0) {
		char note[80];
		struct trace_rec r = { .note = 1, .line = note };

		gettimeofday(&r.tv, NULL);
		r.len = (size_t)snprintf(note, sizeof(note),
		    "(%llu earlier lines of this session not kept)", (unsigned long long)b->lost);
		trace_write(s, &r);
	}
	for (unsigned i = 0; i < b->n; i++)
		trace_write(s, &b->r[(b->head + i) % TRACE_BACKLOG_LINES]);
	trace_backlog_free(b);
}

static void
trace_emit(struct session *s, const struct trace_rec *r)
{
	if (s->trace->pending)
		trace_backlog_add(s->trace, r);
	else
		trace_write(s, r);
}

static void
trace_emit_line(struct session *s, enum trace_dir dir, int injected, const char *line, size_t len,
    uint64_t dropped, const char *fate, const char *was)
{
	struct trace_rec r = {
		.dir = dir, .injected = injected, .fate = fate, .was = was,
		.line = (char *)line, .len = len, .dropped = dropped,
	};

	gettimeofday(&r.tv, NULL);
	trace_emit(s, &r);
}

/* --- rules --- */

/* The address part of "a.b.c.d:port" or "[v6]:port". */
static void
trace_client_host(const char *addr, char *out, size_t len)
{
	const char *end;

	if (addr[0] == '[' && (end = strchr(addr, ']')) != NULL) {
		snprintf(out, len, "%.*s", (int)(end - addr - 1), addr + 1);
		return;
	}
	if ((end = strrchr(addr, ':')) != NULL && strchr(addr, ':') == end)
		snprintf(out, len, "%.*s", (int)(end - addr), addr);
	else
		snprintf(out, len, "%s", addr);
}

/* 1: traced; 0: not; -1: cannot tell yet (the user is not known). */
static int
trace_matches(const struct trace_rules *r, const struct session *s)
{
	char host[128];
	size_t n;

	switch (r->kind) {
	case TRACE_KIND_ALL:
		return 1;
	case TRACE_KIND_CLIENT:
		trace_client_host(s->client_addr, host, sizeof(host));
		n = strlen(r->arg);
		if (n > 0 && (r->arg[n - 1] == '.' || r->arg[n - 1] == ':'))
			return strncasecmp(host, r->arg, n) == 0;
		return strcasecmp(host, r->arg) == 0;
	case TRACE_KIND_USER:
		if (s->track.user[0] != '\0')
			return strcasecmp(s->track.user, r->arg) == 0;
		/* Not logged in yet: keep what happens until we know. */
		return s->authenticated || s->state == SESSION_CLOSING || s->state == SESSION_DEAD ?
		    0 : -1;
	}
	return 0;
}

static void
trace_session_free(struct trace_session *t)
{
	for (int i = 0; i < 2; i++) {
		free(t->seg[i].buf);
		if (t->seg[i].md != NULL)
			EVP_MD_CTX_free(t->seg[i].md);
	}
	trace_backlog_free(t->backlog);
	free(t);
}

static void
trace_detach(struct session *s)
{
	if (s->trace != NULL) {
		trace_session_free(s->trace);
		s->trace = NULL;
	}
}

void
trace_session_update(struct session *s)
{
	struct trace_rules *r = s->srv->trace_rules;
	struct trace_session *t;
	int m;

	if (r == NULL) {
		if (s->trace != NULL)
			trace_detach(s);
		return;
	}
	if ((m = trace_matches(r, s)) == 0) {
		trace_detach(s);
		return;
	}
	if ((t = s->trace) == NULL) {
		if ((t = s->trace = calloc(1, sizeof(*t))) == NULL)
			return;
		for (int i = 0; i < 2; i++)
			t->seg[i].recorded = t->seg[i].no_space = 1;
	}
	if (m < 0)
		t->pending = 1;
	else if (t->pending) {
		t->pending = 0;
		trace_backlog_flush(s, t);
	}
}

/* The session as traced now; a pending "user" match is settled once the
 * login is over (in case no one called trace_session_update() then). */
static struct trace_session *
trace_live(struct session *s)
{
	if (s->trace != NULL && s->trace->pending && (s->authenticated || s->track.user[0]))
		trace_session_update(s);
	return s->trace;
}

static int
trace_parse(const char *spec, struct trace_rules *r)
{
	char buf[300], *w[4], *save = NULL;
	int n = 0;

	if (strlen(spec) >= sizeof(buf))
		return -1;
	snprintf(buf, sizeof(buf), "%s", spec);
	for (char *p = strtok_r(buf, " \t", &save); p != NULL; p = strtok_r(NULL, " \t", &save)) {
		if (n == 4)
			return -1;
		w[n++] = p;
	}
	r->bodies = 0;
	if (n > 1 && strcmp(w[n - 1], "bodies") == 0) {
		r->bodies = 1;
		n--;
	}
	if (n == 1 && strcmp(w[0], "off") == 0)
		return 0;
	if (n == 1 && strcmp(w[0], "all") == 0) {
		r->kind = TRACE_KIND_ALL;
		return 1;
	}
	if (n != 2 || (strcmp(w[0], "user") != 0 && strcmp(w[0], "client") != 0))
		return -1;
	r->kind = w[0][0] == 'u' ? TRACE_KIND_USER : TRACE_KIND_CLIENT;
	if (r->kind == TRACE_KIND_CLIENT && w[1][0] == '[') {
		size_t l = strlen(w[1]);
		if (l < 3 || w[1][l - 1] != ']')
			return -1;
		snprintf(r->arg, sizeof(r->arg), "%.*s", (int)(l - 2), w[1] + 1);
	} else if (strlen(w[1]) >= sizeof(r->arg))
		return -1;
	else
		snprintf(r->arg, sizeof(r->arg), "%s", w[1]);
	return 1;
}

static void
trace_update_all(struct server *srv)
{
	struct session *s;

	/* Not before a PROXY header: the client address is not known yet. */
	TAILQ_FOREACH(s, &srv->sessions, entry)
		if (s->state != SESSION_PROXY_HEADER)
			trace_session_update(s);
}

int
trace_set(struct server *srv, const char *spec, char *err, size_t errlen)
{
	struct trace_rules parsed, *r = srv->trace_rules;
	int on;

	memset(&parsed, 0, sizeof(parsed));
	if ((on = trace_parse(spec, &parsed)) < 0) {
		snprintf(err, errlen, "trace: off, all, user NAME or client ADDR, optionally "
		    "followed by bodies: %s", spec);
		return -1;
	}
	if (!on) {
		if (r != NULL) {
			srv->trace_rules = NULL;
			trace_update_all(srv);
			trace_close_file(r);
			free(r);
		}
		return 0;
	}
	if (r == NULL) {
		if ((r = calloc(1, sizeof(*r))) == NULL) {
			snprintf(err, errlen, "trace: out of memory");
			return -1;
		}
		r->fd = -1;
	}
	/* The file first, so that a bad path changes nothing. */
	if (srv->cfg.trace_file[0] != '\0' && (strcmp(srv->cfg.trace_file, r->path) != 0 ||
	    r->fd < 0) && trace_open_file(r, srv->cfg.trace_file) < 0) {
		snprintf(err, errlen, "trace_file %s: %s", srv->cfg.trace_file, strerror(errno));
		if (srv->trace_rules == NULL)
			free(r);
		return -1;
	}
	if (srv->cfg.trace_file[0] == '\0')
		trace_close_file(r);
	snprintf(r->spec, sizeof(r->spec), "%s", spec);
	r->kind = parsed.kind;
	r->bodies = parsed.bodies;
	memcpy(r->arg, parsed.arg, sizeof(r->arg));
	srv->trace_rules = r;
	trace_update_all(srv);
	log_notice("trace: %s", spec);
	return 0;
}

const char *
trace_get(const struct server *srv)
{
	return srv->trace_rules != NULL ? srv->trace_rules->spec : "off";
}

void
trace_free_rules(struct server *srv)
{
	struct trace_rules *r = srv->trace_rules;

	if (r == NULL)
		return;
	srv->trace_rules = NULL;
	trace_update_all(srv);
	trace_close_file(r);
	free(r);
}

/* --- the hooks --- */

void
trace_session_end(struct session *s)
{
	struct trace_session *t;

	if (s->trace == NULL)
		return;
	trace_session_update(s);	/* a pending "user" match is settled now */
	if ((t = s->trace) == NULL)
		return;
	/* Lines cut short by the end of the session. */
	for (int i = 0; i < 2; i++) {
		struct trace_seg *g = &t->seg[i];

		if (!g->recorded && (g->ntok > 0 || g->len > 0))
			trace_emit_line(s, i == 0 ? TRACE_C2P : TRACE_U2P, 0, g->buf, g->len,
			    g->dropped, "unfinished", NULL);
	}
	trace_detach(s);
}

void
trace_token(struct session *s, enum trace_dir dir, const struct imap_tok *tok, int secret)
{
	struct trace_session *t = trace_live(s);
	struct trace_seg *g;
	int bodies;
	char head[48];

	if (t == NULL || (g = trace_seg_of(t, dir)) == NULL)
		return;
	bodies = s->srv->trace_rules != NULL && s->srv->trace_rules->bodies;
	if (tok->type == IMAP_TOK_EOL) {
		if (g->recorded)
			g->bare_eol = 1;	/* e.g. the end of a refused literal's line */
		else
			g->eol = 1;
		if (g->in_lit)
			trace_lit_abort(g);
		return;
	}
	trace_seg_begin(g);
	if (g->in_lit && tok->type != IMAP_TOK_LITERAL_DATA && tok->type != IMAP_TOK_LITERAL_END)
		trace_lit_abort(g);	/* the literal was refused: no payload */
	switch (tok->type) {
	case IMAP_TOK_LITERAL_DATA:
		if (g->in_lit)
			trace_lit_data(g, tok->str, tok->len);
		return;
	case IMAP_TOK_LITERAL_END:
		if (g->in_lit)
			trace_lit_end(g);
		return;
	case IMAP_TOK_LIST_END:
		trace_space(g, 1);
		trace_put(g, ")", 1);
		break;
	case IMAP_TOK_LIST_BEGIN:
		trace_space(g, 0);
		trace_put(g, "(", 1);
		g->no_space = 1;
		break;
	case IMAP_TOK_LITERAL:
		trace_space(g, 0);
		if (secret)
			trace_puts(g, "<redacted>");
		else {
			snprintf(head, sizeof(head), "%s{%llu%s}",
			    tok->literal_flags & IMAP_LIT_BINARY ? "~" : "",
			    (unsigned long long)tok->literal_size,
			    tok->literal_flags & IMAP_LIT_NONSYNC ? "+" : "");
			trace_puts(g, head);
		}
		trace_lit_start(g, tok, secret, bodies);
		break;
	case IMAP_TOK_ERROR:
		trace_space(g, 0);
		trace_puts(g, "<error: ");
		trace_puts(g, tok->errmsg != NULL ? tok->errmsg : "syntax");
		trace_puts(g, ">");
		break;
	case IMAP_TOK_QUOTED:
		trace_space(g, 0);
		if (secret)
			trace_puts(g, "<redacted>");
		else {
			trace_put(g, "\"", 1);
			trace_put_escaped(g, tok->str, tok->len, TRACE_ESC_QUOTED);
			trace_put(g, "\"", 1);
		}
		break;
	case IMAP_TOK_TEXT:
		if (!secret && tok->len == 0)
			break;		/* "+" with no text */
		/* fall through */
	default:	/* atoms */
		trace_space(g, 0);
		if (secret)
			trace_puts(g, "<redacted>");
		else
			trace_put_escaped(g, tok->str, tok->len, TRACE_ESC_CTL);
		break;
	}
	g->ntok++;
}

void
trace_literal_bytes(struct session *s, enum trace_dir dir, struct evbuffer *buf, size_t n)
{
	struct trace_session *t = trace_live(s);
	struct evbuffer_iovec v[8];
	struct evbuffer_ptr pos;
	struct trace_seg *g;

	if (t == NULL || (g = trace_seg_of(t, dir)) == NULL || n == 0)
		return;
	trace_seg_begin(g);
	if (!g->in_lit)
		return;
	if (g->lit_secret) {
		g->lit_seen += n;
		return;
	}
	if (evbuffer_ptr_set(buf, &pos, 0, EVBUFFER_PTR_SET) < 0)
		return;
	/* Peeked in place: the payload may be megabytes. */
	while (n > 0) {
		int k = evbuffer_peek(buf, (ev_ssize_t)n, &pos, v, 8);
		size_t done = 0;

		if (k <= 0)
			break;
		if (k > 8)
			k = 8;
		for (int i = 0; i < k && n > 0; i++) {
			size_t m = v[i].iov_len < n ? v[i].iov_len : n;
			trace_lit_data(g, v[i].iov_base, m);
			n -= m;
			done += m;
		}
		if (n > 0 && evbuffer_ptr_set(buf, &pos, done, EVBUFFER_PTR_ADD) < 0)
			break;
	}
}

void
trace_fate(struct session *s, enum trace_dir dir, enum trace_fate fate)
{
	struct trace_session *t = trace_live(s);
	struct trace_seg *g;

	if (t == NULL || (g = trace_seg_of(t, dir)) == NULL)
		return;
	if (!g->recorded) {
		/* The segment just read. */
		trace_emit_line(s, dir, 0, g->buf, g->len, g->dropped, trace_fate_names[fate],
		    NULL);
		if (s->trace == NULL)
			return;
		g->recorded = g->have_prev = 1;
		g->prev_eol = g->eol;
		g->fate = fate;
		return;
	}
	if (g->bare_eol && g->prev_eol) {
		/* An empty line. */
		g->bare_eol = 0;
		g->len = 0;
		g->dropped = 0;
		g->eol = 1;
		trace_emit_line(s, dir, 0, "", 0, 0, trace_fate_names[fate], NULL);
		if (s->trace != NULL)
			g->fate = fate;
		return;
	}
	g->bare_eol = 0;
	/* Nothing new: the previous line's fate changed (held, then forwarded). */
	if (g->have_prev && fate != g->fate) {
		enum trace_fate was = g->fate;

		g->fate = fate;
		trace_emit_line(s, dir, 0, g->buf, g->len, g->dropped, trace_fate_names[fate],
		    trace_fate_names[was]);
	}
}

void
trace_line(struct session *s, enum trace_dir dir, const char *line, size_t len, int injected)
{
	struct trace_session *t = trace_live(s);
	char buf[TRACE_LINE_MAX], out[4 * 256];
	size_t o = 0;
	uint64_t dropped = 0;

	if (t == NULL || dir == TRACE_C2P || dir == TRACE_U2P)
		return;
	while (len > 0) {
		size_t k = len < 256 ? len : 256;
		size_t e = trace_escape((const unsigned char *)line, k, TRACE_ESC_CTL, out);

		if (e > sizeof(buf) - o) {
			dropped += e - (sizeof(buf) - o) + (len - k);
			e = sizeof(buf) - o;
			memcpy(buf + o, out, e);
			o += e;
			break;
		}
		memcpy(buf + o, out, e);
		o += e;
		line += k;
		len -= k;
	}
	trace_emit_line(s, dir, injected, buf, o, dropped, NULL, NULL);
}
