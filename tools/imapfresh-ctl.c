/* imapfresh-ctl: the operators' command line: live sessions, one session's view, a user's generations, sync events, traces, kick, resync, notify and upgrade. */

/*
 * Where things come from:
 *   Redis configured (state = redis://...): sessions and generations from
 *   the documented keys (docs/ARCHITECTURE.md), events from the P + "events"
 *   stream, and every instance's admin endpoint from the instances registry
 *   (hash P + "instances": instance -> "<admin>\t<pid>\t<started>\t<refreshed>").
 *   Memory mode: the local admin endpoint (admin_listen, or --admin) and the
 *   event_log file.
 * Redis is spoken with hiredis' synchronous API, the admin endpoint with a
 * small HTTP/1.0 client; both with timeouts, so a dead peer is an error, not
 * a hang. Exit status: 0 ok, 1 error, 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "config-auto.h"
#include "config.h"
#include "sentinel.h"
#include "uidset.h"

#define CTL_EXIT_OK 0
#define CTL_EXIT_ERROR 1
#define CTL_EXIT_USAGE 2
#define CTL_DEFAULT_CONFIG SYSCONFDIR "/imapfresh.conf"
#define CTL_TIMEOUT_MS 5000		/* connect, and each read or write */
#define CTL_MAX_RESPONSE (64u << 20)	/* admin responses larger than this are refused */
#define CTL_REGISTRY_STALE 60		/* seconds without a refresh: instance gone */
#define CTL_JSON_DEPTH 32

/* --- a small JSON reader, for the admin endpoint's answers --- */

enum ctl_jtype { CTL_JNULL, CTL_JBOOL, CTL_JNUM, CTL_JSTR, CTL_JARR, CTL_JOBJ };

struct ctl_json {
	enum ctl_jtype type;
	char *key;		/* member name inside an object */
	char *str;		/* string value, or the number's text */
	int b;
	struct ctl_json *child, *next;
};

struct ctl_jparse {
	const char *p, *end;
	int depth;
};

static void
ctl_json_free(struct ctl_json *j)
{
	struct ctl_json *next;

	for (; j != NULL; j = next) {
		next = j->next;
		ctl_json_free(j->child);
		free(j->key);
		free(j->str);
		free(j);
	}
}

static void
ctl_json_ws(struct ctl_jparse *jp)
{
	while (jp->p < jp->end && strchr(" \t\r\n", *jp->p) && *jp->p)
		jp->p++;
}

static int
ctl_json_hex4(const char *p, unsigned *out)
{
	*out = 0;
	for (int i = 0; i < 4; i++) {
		char c = p[i];
		*out <<= 4;
		if (c >= '0' && c <= '9')
			*out |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			*out |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			*out |= (unsigned)(c - 'A' + 10);
		else
			return -1;
	}
	return 0;
}

/* A string literal at jp->p (the opening quote), decoded to UTF-8. */
static char *
ctl_json_string(struct ctl_jparse *jp)
{
	size_t cap = 16, n = 0;
	char *s = malloc(cap);
	unsigned cp, lo;

	if (s == NULL)
		return NULL;
	jp->p++;
	while (jp->p < jp->end && *jp->p != '"') {
		char buf[4];
		size_t k = 0;

		if ((unsigned char)*jp->p < 0x20)
			goto bad;
		if (*jp->p != '\\') {
			buf[k++] = *jp->p++;
		} else {
			if (jp->end - jp->p < 2)
				goto bad;
			jp->p++;
			switch (*jp->p++) {
			case '"': buf[k++] = '"'; break;
			case '\\': buf[k++] = '\\'; break;
			case '/': buf[k++] = '/'; break;
			case 'b': buf[k++] = '\b'; break;
			case 'f': buf[k++] = '\f'; break;
			case 'n': buf[k++] = '\n'; break;
			case 'r': buf[k++] = '\r'; break;
			case 't': buf[k++] = '\t'; break;
			case 'u':
				if (jp->end - jp->p < 4 || ctl_json_hex4(jp->p, &cp) < 0)
					goto bad;
				jp->p += 4;
				if (cp >= 0xd800 && cp <= 0xdbff && jp->end - jp->p >= 6 &&
				    jp->p[0] == '\\' && jp->p[1] == 'u' &&
				    ctl_json_hex4(jp->p + 2, &lo) == 0 && lo >= 0xdc00 && lo <= 0xdfff) {
					cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
					jp->p += 6;
				} else if (cp >= 0xd800 && cp <= 0xdfff)
					cp = 0xfffd;
				if (cp == 0)
					cp = 0xfffd;	/* no NUL inside C strings */
				if (cp < 0x80) {
					buf[k++] = (char)cp;
				} else if (cp < 0x800) {
					buf[k++] = (char)(0xc0 | (cp >> 6));
					buf[k++] = (char)(0x80 | (cp & 0x3f));
				} else if (cp < 0x10000) {
					buf[k++] = (char)(0xe0 | (cp >> 12));
					buf[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
					buf[k++] = (char)(0x80 | (cp & 0x3f));
				} else {
					buf[k++] = (char)(0xf0 | (cp >> 18));
					buf[k++] = (char)(0x80 | ((cp >> 12) & 0x3f));
					buf[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
					buf[k++] = (char)(0x80 | (cp & 0x3f));
				}
				break;
			default:
				goto bad;
			}
		}
		if (n + k + 1 > cap) {
			char *grown = realloc(s, cap * 2 + k);
			if (grown == NULL)
				goto bad;
			s = grown;
			cap = cap * 2 + k;
		}
		memcpy(s + n, buf, k);
		n += k;
	}
	if (jp->p >= jp->end)
		goto bad;
	jp->p++;
	s[n] = '\0';
	return s;
bad:
	free(s);
	return NULL;
}

static struct ctl_json *ctl_json_value(struct ctl_jparse *jp);

/* The members of an array or object, after the opening bracket. */
static int
ctl_json_members(struct ctl_jparse *jp, struct ctl_json *parent, char close)
{
	struct ctl_json **tail = &parent->child, *v;
	char *key = NULL;

	ctl_json_ws(jp);
	if (jp->p < jp->end && *jp->p == close) {
		jp->p++;
		return 0;
	}
	for (;;) {
		ctl_json_ws(jp);
		if (close == '}') {
			if (jp->p >= jp->end || *jp->p != '"' || (key = ctl_json_string(jp)) == NULL)
				return -1;
			ctl_json_ws(jp);
			if (jp->p >= jp->end || *jp->p++ != ':') {
				free(key);
				return -1;
			}
		}
		if ((v = ctl_json_value(jp)) == NULL) {
			free(key);
			return -1;
		}
		v->key = key;
		key = NULL;
		*tail = v;
		tail = &v->next;
		ctl_json_ws(jp);
		if (jp->p < jp->end && *jp->p == ',') {
			jp->p++;
			continue;
		}
		if (jp->p < jp->end && *jp->p == close) {
			jp->p++;
			return 0;
		}
		return -1;
	}
}

static struct ctl_json *
ctl_json_value(struct ctl_jparse *jp)
{
	struct ctl_json *j;
	const char *start;

	ctl_json_ws(jp);
	if (jp->p >= jp->end || ++jp->depth > CTL_JSON_DEPTH || (j = calloc(1, sizeof(*j))) == NULL)
		return NULL;
	switch (*jp->p) {
	case '{':
	case '[':
		j->type = *jp->p == '{' ? CTL_JOBJ : CTL_JARR;
		jp->p++;
		if (ctl_json_members(jp, j, j->type == CTL_JOBJ ? '}' : ']') < 0)
			goto bad;
		break;
	case '"':
		j->type = CTL_JSTR;
		if ((j->str = ctl_json_string(jp)) == NULL)
			goto bad;
		break;
	case 't':
	case 'f':
	case 'n':
		if (jp->end - jp->p >= 4 && strncmp(jp->p, "true", 4) == 0) {
			j->type = CTL_JBOOL;
			j->b = 1;
			jp->p += 4;
		} else if (jp->end - jp->p >= 5 && strncmp(jp->p, "false", 5) == 0) {
			j->type = CTL_JBOOL;
			jp->p += 5;
		} else if (jp->end - jp->p >= 4 && strncmp(jp->p, "null", 4) == 0) {
			j->type = CTL_JNULL;
			jp->p += 4;
		} else
			goto bad;
		break;
	default:
		start = jp->p;
		while (jp->p < jp->end && strchr("+-0123456789.eE", *jp->p) && *jp->p)
			jp->p++;
		if (jp->p == start || (j->str = strndup(start, (size_t)(jp->p - start))) == NULL)
			goto bad;
		j->type = CTL_JNUM;
		break;
	}
	jp->depth--;
	return j;
bad:
	ctl_json_free(j);
	return NULL;
}

static struct ctl_json *
ctl_json_parse(const char *text, size_t len)
{
	struct ctl_jparse jp = { text, text + len, 0 };
	struct ctl_json *j = ctl_json_value(&jp);

	ctl_json_ws(&jp);
	if (j != NULL && jp.p != jp.end) {
		ctl_json_free(j);
		return NULL;
	}
	return j;
}

static const struct ctl_json *
ctl_json_get(const struct ctl_json *obj, const char *key)
{
	const struct ctl_json *m;

	if (obj == NULL || obj->type != CTL_JOBJ)
		return NULL;
	for (m = obj->child; m != NULL; m = m->next)
		if (strcmp(m->key, key) == 0)
			return m;
	return NULL;
}

/* A member as text: strings as they are, numbers as written, else def. */
static const char *
ctl_json_text(const struct ctl_json *obj, const char *key, const char *def)
{
	const struct ctl_json *m = ctl_json_get(obj, key);

	return m != NULL && (m->type == CTL_JSTR || m->type == CTL_JNUM) ? m->str : def;
}

static uint64_t
ctl_json_u64(const struct ctl_json *obj, const char *key)
{
	const char *t = ctl_json_text(obj, key, "0");

	return strtoull(t, NULL, 10);
}

static int
ctl_json_bool(const struct ctl_json *obj, const char *key)
{
	const struct ctl_json *m = ctl_json_get(obj, key);

	return m != NULL && m->type == CTL_JBOOL && m->b;
}

/* --- JSON writing --- */

static void
ctl_json_puts(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)(s ? s : "");

	fputc('"', f);
	for (; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(f, "\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			fprintf(f, "\\u%04x", *p);
		else
			fputc(*p, f);
	}
	fputc('"', f);
}

/* A value from Redis: decimal digits as a number, anything else as a string. */
static void
ctl_json_scalar(FILE *f, const char *s)
{
	size_t n = s ? strspn(s, "0123456789") : 0;

	if (n > 0 && n < 20 && s[n] == '\0' && (s[0] != '0' || n == 1))
		fputs(s, f);
	else
		ctl_json_puts(f, s);
}

/* --- output helpers --- */

static void
ctl_duration(char *buf, size_t len, int64_t secs)
{
	if (secs < 0)
		secs = 0;
	if (secs < 60)
		snprintf(buf, len, "%llds", (long long)secs);
	else if (secs < 3600)
		snprintf(buf, len, "%lldm%02llds", (long long)(secs / 60), (long long)(secs % 60));
	else if (secs < 86400)
		snprintf(buf, len, "%lldh%02lldm", (long long)(secs / 3600),
		    (long long)(secs % 3600 / 60));
	else
		snprintf(buf, len, "%lldd%02lldh", (long long)(secs / 86400),
		    (long long)(secs % 86400 / 3600));
}

/* "12s ago" or "never", from unix seconds. */
static void
ctl_ago(char *buf, size_t len, int64_t when)
{
	char d[24];	/* "106751991167300d15h" at most: room for " ago" in 32 */

	if (when <= 0) {
		snprintf(buf, len, "never");
		return;
	}
	ctl_duration(d, sizeof(d), (int64_t)time(NULL) - when);
	snprintf(buf, len, "%s ago", d);
}

/* A table: cells copied, columns padded to their widest cell. */
struct ctl_table {
	size_t ncol, nrow, cap;
	char **cells;		/* row-major; row 0 is the header */
};

static void
ctl_table_row(struct ctl_table *t, const char *const *cols)
{
	if ((t->nrow + 1) * t->ncol > t->cap) {
		size_t cap = t->cap ? t->cap * 2 : t->ncol * 16;
		char **grown = realloc(t->cells, cap * sizeof(*grown));
		if (grown == NULL)
			return;
		t->cells = grown;
		t->cap = cap;
	}
	for (size_t i = 0; i < t->ncol; i++)
		t->cells[t->nrow * t->ncol + i] = strdup(cols[i] ? cols[i] : "-");
	t->nrow++;
}

static void
ctl_table_free(struct ctl_table *t)
{
	for (size_t i = 0; i < t->nrow * t->ncol; i++)
		free(t->cells[i]);
	free(t->cells);
	memset(t, 0, sizeof(*t));
}

/* Print, then free. */
static void
ctl_table_print(struct ctl_table *t)
{
	size_t w[16] = { 0 };

	for (size_t r = 0; r < t->nrow; r++)
		for (size_t c = 0; c < t->ncol && c < 16; c++) {
			const char *s = t->cells[r * t->ncol + c];
			if (s != NULL && strlen(s) > w[c])
				w[c] = strlen(s);
		}
	for (size_t r = 0; r < t->nrow; r++) {
		for (size_t c = 0; c < t->ncol; c++) {
			const char *s = t->cells[r * t->ncol + c];
			if (c + 1 == t->ncol)
				printf("%s\n", s ? s : "");
			else
				printf("%-*s  ", (int)w[c < 16 ? c : 15], s ? s : "");
		}
	}
	ctl_table_free(t);
}

/* --- the context --- */

struct ctl_instance {
	char name[128];
	char admin[320];
	long pid;
	int64_t started, refreshed;
	int stale;		/* not refreshed for CTL_REGISTRY_STALE seconds */
	int asked;		/* its /sessions was requested */
	struct ctl_json *live;	/* the answer; NULL when unreachable */
};

struct ctl {
	struct config cfg;
	int json, follow;
	long count;		/* events -n */
	const char *admin;	/* --admin: overrides discovery */
	const char *token;
	int redis;		/* state is a Redis URL */
	char shown[1100];	/* state without its password, for messages */
	redisContext *rc;
	struct ctl_instance *inst;
	size_t n_inst;
	int registry_loaded;
	const char *config_file;	/* the file read, or NULL: built-in defaults */
};

static void
ctl_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
ctl_err(const char *fmt, ...)
{
	va_list ap;

	fputs("imapfresh-ctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* --- HTTP/1.0 to an admin endpoint --- */

struct ctl_http {
	int status;
	char *body;		/* NUL-terminated */
	size_t len;
};

static int
ctl_wait(int fd, short events)
{
	struct pollfd p = { .fd = fd, .events = events };
	int n;

	do
		n = poll(&p, 1, CTL_TIMEOUT_MS);
	while (n < 0 && errno == EINTR);
	if (n == 0)
		errno = ETIMEDOUT;
	return n > 0 ? 0 : -1;
}

static int
ctl_connect(const char *addr, char *err, size_t errlen)
{
	struct config_addr a;
	struct addrinfo hints = { 0 }, *res, *ai;
	int fd = -1, gai, soerr = 0;
	socklen_t sl = sizeof(soerr);

	if (config_parse_addr(addr, NULL, &a) < 0) {
		snprintf(err, errlen, "%s: not host:port", addr);
		return -1;
	}
	/* A wildcard listener is reached on loopback. */
	if (a.host[0] == '\0' || strcmp(a.host, "0.0.0.0") == 0)
		snprintf(a.host, sizeof(a.host), "127.0.0.1");
	else if (strcmp(a.host, "::") == 0)
		snprintf(a.host, sizeof(a.host), "::1");
	hints.ai_socktype = SOCK_STREAM;
	if ((gai = getaddrinfo(a.host, a.port, &hints, &res)) != 0) {
		snprintf(err, errlen, "%s: %s", addr, gai_strerror(gai));
		return -1;
	}
	snprintf(err, errlen, "%s: no address", addr);
	for (ai = res; ai != NULL; ai = ai->ai_next) {
		fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0)
			continue;
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 ||
		    (errno == EINPROGRESS && ctl_wait(fd, POLLOUT) == 0 &&
		    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0))
			break;
		snprintf(err, errlen, "%s: %s", addr, strerror(soerr ? soerr : errno));
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	return fd;
}

static int
ctl_write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
			if (ctl_wait(fd, POLLOUT) < 0)
				return -1;
			continue;
		}
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* One request; the body (may be NULL) goes as a form. -1 with err set when
 * the endpoint cannot be reached or answers gibberish; HTTP errors are not
 * failures here (resp->status says). */
static int
ctl_http(struct ctl *c, const char *addr, const char *method, const char *path,
    const char *body, struct ctl_http *resp, char *err, size_t errlen)
{
	char head[2048], *buf = NULL, *sep;
	size_t cap = 0, n = 0;
	int fd, len;

	memset(resp, 0, sizeof(*resp));
	if ((fd = ctl_connect(addr, err, errlen)) < 0)
		return -1;
	len = snprintf(head, sizeof(head), "%s %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: "
	    "imapfresh-ctl/%s\r\nAccept: application/json, text/plain\r\n", method, path, addr,
	    PACKAGE_VERSION);
	if (c->token != NULL && c->token[0] != '\0')
		len += snprintf(head + len, sizeof(head) - (size_t)len,
		    "Authorization: Bearer %s\r\n", c->token);
	if (body != NULL)
		len += snprintf(head + len, sizeof(head) - (size_t)len, "Content-Type: "
		    "application/x-www-form-urlencoded\r\nContent-Length: %zu\r\n", strlen(body));
	len += snprintf(head + len, sizeof(head) - (size_t)len, "\r\n");
	if (len >= (int)sizeof(head) || ctl_write_all(fd, head, (size_t)len) < 0 ||
	    (body != NULL && ctl_write_all(fd, body, strlen(body)) < 0)) {
		snprintf(err, errlen, "%s: sending the request: %s", addr, strerror(errno));
		close(fd);
		return -1;
	}
	for (;;) {
		ssize_t r;

		if (n + 4097 > cap) {
			char *grown;
			cap = cap ? cap * 2 : 16384;
			if (cap > CTL_MAX_RESPONSE || (grown = realloc(buf, cap)) == NULL) {
				snprintf(err, errlen, "%s: response too large", addr);
				goto fail;
			}
			buf = grown;
		}
		r = read(fd, buf + n, cap - n - 1);
		if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
			if (ctl_wait(fd, POLLIN) < 0) {
				snprintf(err, errlen, "%s: reading the response: %s", addr,
				    strerror(errno));
				goto fail;
			}
			continue;
		}
		if (r < 0) {
			snprintf(err, errlen, "%s: reading the response: %s", addr, strerror(errno));
			goto fail;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	buf[n] = '\0';
	if (n < 12 || strncmp(buf, "HTTP/1.", 7) != 0 || (sep = strstr(buf, "\r\n\r\n")) == NULL) {
		snprintf(err, errlen, "%s: not an HTTP response (is this imapfresh's admin_listen?)",
		    addr);
		free(buf);
		return -1;
	}
	resp->status = atoi(buf + 9);
	resp->len = n - (size_t)(sep + 4 - buf);
	memmove(buf, sep + 4, resp->len + 1);
	resp->body = buf;
	return 0;
fail:
	close(fd);
	free(buf);
	return -1;
}

/* The "error" of a JSON error answer, or the status line's meaning. */
static void
ctl_http_error(const struct ctl_http *r, const char *addr, char *err, size_t errlen)
{
	struct ctl_json *j = ctl_json_parse(r->body, r->len);
	const char *msg = ctl_json_text(j, "error", NULL);

	if (r->status == 401)
		snprintf(err, errlen, "%s: 401 unauthorized: give the admin_token (--token, "
		    "$IMAPFRESH_ADMIN_TOKEN or the configuration)", addr);
	else
		snprintf(err, errlen, "%s: %d %s", addr, r->status, msg ? msg : "error");
	ctl_json_free(j);
}

/* GET/POST returning parsed JSON; NULL with err set on any failure. */
static struct ctl_json *
ctl_admin_json(struct ctl *c, const char *addr, const char *method, const char *path,
    const char *body, char **raw, char *err, size_t errlen)
{
	struct ctl_http r;
	struct ctl_json *j;

	if (raw != NULL)
		*raw = NULL;
	if (ctl_http(c, addr, method, path, body, &r, err, errlen) < 0)
		return NULL;
	if (r.status != 200) {
		ctl_http_error(&r, addr, err, errlen);
		free(r.body);
		return NULL;
	}
	if ((j = ctl_json_parse(r.body, r.len)) == NULL)
		snprintf(err, errlen, "%s%s: the answer is not JSON", addr, path);
	if (raw != NULL && j != NULL)
		*raw = r.body;
	else
		free(r.body);
	return j;
}

/* --- Redis --- */

/* AUTH first on a fresh connection, when auth has a password: NULL, or
 * the refusal (in buf) or failure. */
static const char *
ctl_redis_auth(redisContext *rc, const struct config_redis_auth *auth, char *buf, size_t len)
{
	const char *argv[3];
	size_t argvlen[3];
	int argc = config_auth_argv(auth, argv, argvlen);
	redisReply *r;

	if (argc == 0)
		return NULL;
	if ((r = redisCommandArgv(rc, argc, argv, argvlen)) == NULL) {
		snprintf(buf, len, "AUTH: %s", rc->errstr);
		return buf;
	}
	if (r->type == REDIS_REPLY_ERROR && !config_auth_unneeded(r->str)) {
		snprintf(buf, len, "AUTH%s%s refused: %.200s", auth->user[0] ? " as " : "",
		    auth->user, r->str);
		freeReplyObject(r);
		return buf;
	}
	freeReplyObject(r);
	return NULL;
}

/* redis-sentinel://: the master's address, asked of each sentinel in turn
 * (into u, as if the URL had named it); -1 (reported) when none names it. */
static int
ctl_redis_sentinel(const struct config *cfg, const struct sentinel_url *su,
    struct config_redis *u)
{
	struct config_redis_auth sauth;
	const char *refused;
	char abuf[400];
	struct timeval tv = { CTL_TIMEOUT_MS / 1000, 0 };
	char why[600] = "", where[300];
	redisContext *sc;
	redisReply *r;

	memset(u, 0, sizeof(*u));
	u->db = su->db;
	u->auth = su->auth;
	memset(&sauth, 0, sizeof(sauth));
	snprintf(sauth.user, sizeof(sauth.user), "%s", cfg->sentinel_user);
	snprintf(sauth.password, sizeof(sauth.password), "%s", cfg->sentinel_password);
	for (int i = 0; i < su->n; i++) {
		config_fmt_addr(&su->addr[i], where, sizeof(where));
		sc = redisConnectWithTimeout(su->addr[i].host, atoi(su->addr[i].port), tv);
		if (sc == NULL || sc->err) {
			snprintf(why, sizeof(why), "sentinel %s: %s", where,
			    sc ? sc->errstr : "out of memory");
			redisFree(sc);
			continue;
		}
		redisSetTimeout(sc, tv);
		if ((refused = ctl_redis_auth(sc, &sauth, abuf, sizeof(abuf))) != NULL) {
			snprintf(why, sizeof(why), "sentinel %s: %s", where, refused);
			redisFree(sc);
			continue;
		}
		r = redisCommand(sc, "SENTINEL get-master-addr-by-name %s", su->master);
		if (r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
		    r->element[0]->type == REDIS_REPLY_STRING &&
		    r->element[1]->type == REDIS_REPLY_STRING) {
			snprintf(u->host, sizeof(u->host), "%s", r->element[0]->str);
			snprintf(u->port, sizeof(u->port), "%s", r->element[1]->str);
			freeReplyObject(r);
			redisFree(sc);
			return 0;
		}
		snprintf(why, sizeof(why), "sentinel %s: %s", where, r == NULL ? sc->errstr :
		    r->type == REDIS_REPLY_ERROR ? r->str : "does not know the master");
		freeReplyObject(r);
		redisFree(sc);
	}
	ctl_err("redis sentinel %s: no sentinel named the master (%s)", su->master, why);
	return -1;
}

static int
ctl_redis_connect(struct ctl *c)
{
	struct config_redis u;
	struct sentinel_url su;
	struct timeval tv = { CTL_TIMEOUT_MS / 1000, 0 };
	redisReply *r;
	const char *refused;
	char abuf[400];

	if (c->rc != NULL)
		return 0;
	if (sentinel_parse_url(c->cfg.state, &su) == 0) {
		if (ctl_redis_sentinel(&c->cfg, &su, &u) < 0)
			return -1;
	} else if (config_parse_redis(c->cfg.state, &u) < 0) {
		ctl_err("state: not memory or a Redis URL: %s", c->shown);
		return -1;
	}
	if (c->cfg.state_password[0])
		snprintf(u.auth.password, sizeof(u.auth.password), "%s", c->cfg.state_password);
	c->rc = u.path[0] ? redisConnectUnixWithTimeout(u.path, tv) :
	    redisConnectWithTimeout(u.host, atoi(u.port), tv);
	if (c->rc == NULL || c->rc->err) {
		ctl_err("redis %s: %s", c->shown, c->rc ? c->rc->errstr : "out of memory");
		return -1;
	}
	redisSetTimeout(c->rc, tv);
	refused = ctl_redis_auth(c->rc, &u.auth, abuf, sizeof(abuf));
	explicit_bzero(&u.auth, sizeof(u.auth));
	if (refused != NULL) {
		ctl_err("redis %s: %s", c->shown, refused);
		return -1;
	}
	if (u.db != 0) {
		r = redisCommand(c->rc, "SELECT %d", u.db);
		if (r == NULL || r->type == REDIS_REPLY_ERROR) {
			ctl_err("redis %s: SELECT %d: %s", c->shown, u.db,
			    r ? r->str : c->rc->errstr);
			freeReplyObject(r);
			return -1;
		}
		freeReplyObject(r);
	}
	return 0;
}

/* A command's reply, NULL (reported) on a connection or Redis error. */
static redisReply *
ctl_redis(struct ctl *c, const char *fmt, ...)
{
	va_list ap;
	redisReply *r;

	if (ctl_redis_connect(c) < 0)
		return NULL;
	va_start(ap, fmt);
	r = redisvCommand(c->rc, fmt, ap);
	va_end(ap);
	if (r == NULL) {
		ctl_err("redis %s: %s", c->shown, c->rc->errstr);
		return NULL;
	}
	if (r->type == REDIS_REPLY_ERROR) {
		ctl_err("redis %s: %s", c->shown, r->str);
		freeReplyObject(r);
		return NULL;
	}
	return r;
}

/* A field of an HGETALL reply (flat array of names and values). */
static const char *
ctl_hget(const redisReply *h, const char *field)
{
	if (h == NULL || h->type != REDIS_REPLY_ARRAY)
		return NULL;
	for (size_t i = 0; i + 1 < h->elements; i += 2)
		if (h->element[i]->type == REDIS_REPLY_STRING &&
		    strcmp(h->element[i]->str, field) == 0 && h->element[i + 1]->type ==
		    REDIS_REPLY_STRING)
			return h->element[i + 1]->str;
	return NULL;
}

static int
ctl_registry_cmp(const void *a, const void *b)
{
	return strcmp(((const struct ctl_instance *)a)->name, ((const struct ctl_instance *)b)->name);
}

/* The instances registry, once. */
static int
ctl_registry(struct ctl *c)
{
	redisReply *r;
	time_t now = time(NULL);

	if (c->registry_loaded)
		return 0;
	if ((r = ctl_redis(c, "HGETALL %sinstances", c->cfg.redis_prefix)) == NULL)
		return -1;
	c->registry_loaded = 1;
	if (r->type == REDIS_REPLY_ARRAY && r->elements >= 2 &&
	    (c->inst = calloc(r->elements / 2, sizeof(*c->inst))) != NULL) {
		for (size_t i = 0; i + 1 < r->elements; i += 2) {
			struct ctl_instance *in = &c->inst[c->n_inst];
			const char *v = r->element[i + 1]->str;
			const char *t1, *t2, *t3;

			if (r->element[i]->type != REDIS_REPLY_STRING || v == NULL)
				continue;
			snprintf(in->name, sizeof(in->name), "%s", r->element[i]->str);
			t1 = strchr(v, '\t');
			snprintf(in->admin, sizeof(in->admin), "%.*s",
			    (int)(t1 ? (size_t)(t1 - v) : strlen(v)), v);
			if (t1 != NULL) {
				in->pid = strtol(t1 + 1, NULL, 10);
				if ((t2 = strchr(t1 + 1, '\t')) != NULL) {
					in->started = strtoll(t2 + 1, NULL, 10);
					if ((t3 = strchr(t2 + 1, '\t')) != NULL)
						in->refreshed = strtoll(t3 + 1, NULL, 10);
				}
			}
			in->stale = in->refreshed != 0 && now - in->refreshed > CTL_REGISTRY_STALE;
			c->n_inst++;
		}
		qsort(c->inst, c->n_inst, sizeof(*c->inst), ctl_registry_cmp);
	}
	freeReplyObject(r);
	return 0;
}

static const struct ctl_instance *
ctl_registry_find(struct ctl *c, const char *name)
{
	for (size_t i = 0; i < c->n_inst; i++)
		if (strcmp(c->inst[i].name, name) == 0)
			return &c->inst[i];
	return NULL;
}

/* The local admin endpoint: --admin, else admin_listen. */
static const char *
ctl_local_admin(struct ctl *c)
{
	if (c->admin != NULL)
		return c->admin;
	if (c->cfg.admin_listen[0] == '\0') {
		ctl_err("admin_listen is off in the configuration; give --admin HOST:PORT");
		return NULL;
	}
	return c->cfg.admin_listen;
}

/* Use the admin endpoints (registry or local) rather than Redis? */
static int
ctl_use_admin(const struct ctl *c)
{
	return !c->redis || c->admin != NULL;
}

/* The admin endpoints to talk to for commands aimed at every instance. */
static int
ctl_targets(struct ctl *c, const char ***addrs, const char ***names, size_t *n)
{
	static const char *one_addr[1], *one_name[1];

	if (ctl_use_admin(c)) {
		if ((one_addr[0] = ctl_local_admin(c)) == NULL)
			return -1;
		one_name[0] = one_addr[0];
		*addrs = one_addr;
		*names = one_name;
		*n = 1;
		return 0;
	}
	if (ctl_registry(c) < 0)
		return -1;
	*addrs = calloc(c->n_inst + 1, sizeof(char *));
	*names = calloc(c->n_inst + 1, sizeof(char *));
	*n = 0;
	if (*addrs == NULL || *names == NULL)
		return -1;
	for (size_t i = 0; i < c->n_inst; i++) {
		if (c->inst[i].stale) {
			fprintf(stderr, "imapfresh-ctl: note: instance %s not seen for %llds, skipped\n",
			    c->inst[i].name, (long long)(time(NULL) - c->inst[i].refreshed));
			continue;
		}
		if (c->inst[i].admin[0] == '\0') {
			fprintf(stderr, "imapfresh-ctl: note: instance %s has no admin endpoint "
			    "(admin_listen is off), skipped\n", c->inst[i].name);
			continue;
		}
		(*addrs)[*n] = c->inst[i].admin;
		(*names)[*n] = c->inst[i].name;
		(*n)++;
	}
	if (*n == 0) {
		ctl_err("no live instance in the registry (%sinstances in %s)", c->cfg.redis_prefix,
		    c->shown);
		return -1;
	}
	return 0;
}

/* The admin endpoint owning SID ("<instance>:s42", or "s42" when that
 * leaves no doubt); path gets "/sessions/<sid>". */
static const char *
ctl_owner(struct ctl *c, const char *sid, char *path, size_t pathlen)
{
	const char *colon = strrchr(sid, ':');
	const struct ctl_instance *in;
	char name[128];

	if (strlen(sid) > 200 || strspn(sid, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
	    "0123456789.-_:") != strlen(sid)) {
		ctl_err("%s: not a session id (INSTANCE:sN, as 'imapfresh-ctl sessions' lists them)",
		    sid);
		return NULL;
	}
	snprintf(path, pathlen, "/sessions/%s", sid);
	if (ctl_use_admin(c))
		return ctl_local_admin(c);
	if (ctl_registry(c) < 0)
		return NULL;
	if (colon == NULL) {
		const struct ctl_instance *only = NULL;
		size_t live = 0;

		for (size_t i = 0; i < c->n_inst; i++)
			if (!c->inst[i].stale) {
				only = &c->inst[i];
				live++;
			}
		if (live == 1)
			return only->admin;
		ctl_err("%s: give the session as INSTANCE:%s (%zu live instances)", sid, sid, live);
		return NULL;
	}
	snprintf(name, sizeof(name), "%.*s", (int)(colon - sid), sid);
	if ((in = ctl_registry_find(c, name)) == NULL) {
		ctl_err("instance %s is not in the registry (%sinstances): not running, or "
		    "started without Redis", name, c->cfg.redis_prefix);
		return NULL;
	}
	if (in->admin[0] == '\0') {
		ctl_err("instance %s has no admin endpoint (admin_listen is off)", name);
		return NULL;
	}
	return in->admin;
}

/* --- sessions --- */

static void
ctl_sessions_header(struct ctl_table *t)
{
	static const char *const h[] = { "ID", "USER", "CLIENT", "INSTANCE", "STATE", "MAILBOX",
	    "COUNT", "AGE", "LAST RESYNC" };

	t->ncol = 9;
	ctl_table_row(t, h);
}

static int
ctl_sessions_admin(struct ctl *c)
{
	const char *addr = ctl_local_admin(c);
	struct ctl_json *j;
	struct ctl_table t = { 0 };
	char err[1024], *raw, age[32], last[32];
	size_t n = 0;

	if (addr == NULL)
		return CTL_EXIT_ERROR;
	if ((j = ctl_admin_json(c, addr, "GET", "/sessions", NULL, &raw, err, sizeof(err))) == NULL) {
		ctl_err("%s", err);
		return CTL_EXIT_ERROR;
	}
	if (c->json) {
		fputs(raw, stdout);
		free(raw);
		ctl_json_free(j);
		return CTL_EXIT_OK;
	}
	free(raw);
	ctl_sessions_header(&t);
	for (const struct ctl_json *s = j->child; s != NULL; s = s->next, n++) {
		ctl_duration(age, sizeof(age), (int64_t)ctl_json_u64(s, "age"));
		ctl_ago(last, sizeof(last), (int64_t)ctl_json_u64(s, "last_resync"));
		const char *row[] = { ctl_json_text(s, "id", "?"), ctl_json_text(s, "user", "-"),
		    ctl_json_text(s, "client", "-"), ctl_json_text(s, "instance", "-"),
		    ctl_json_text(s, "state", "-"), ctl_json_text(s, "mailbox", "-"),
		    ctl_json_text(s, "count", "-"), age, last };
		ctl_table_row(&t, row);
	}
	ctl_json_free(j);
	if (n == 0) {
		printf("no live sessions on %s\n", addr);
		ctl_table_free(&t);
	} else
		ctl_table_print(&t);
	return CTL_EXIT_OK;
}

/* A stored session's state as its instance sees it now: its /sessions,
 * asked once per instance, best effort (Redis does not hold the state).
 * "gone" when the instance answered without it; NULL when unknown. */
static const char *
ctl_live_state(struct ctl *c, const char *instance, const char *sid)
{
	struct ctl_instance *in = NULL;
	char err[1024];

	for (size_t i = 0; i < c->n_inst && instance != NULL; i++)
		if (strcmp(c->inst[i].name, instance) == 0)
			in = &c->inst[i];
	if (in == NULL || in->stale || in->admin[0] == '\0')
		return NULL;
	if (!in->asked) {
		in->asked = 1;
		in->live = ctl_admin_json(c, in->admin, "GET", "/sessions", NULL, NULL, err,
		    sizeof(err));
		if (in->live == NULL)
			fprintf(stderr, "imapfresh-ctl: note: %s: %s\n", in->name, err);
	}
	if (in->live == NULL || in->live->type != CTL_JARR)
		return NULL;
	for (const struct ctl_json *e = in->live->child; e != NULL; e = e->next)
		if (strcmp(ctl_json_text(e, "id", ""), sid) == 0)
			return ctl_json_text(e, "state", "?");
	return "gone";
}

/* Glob metacharacters in the prefix must match themselves in SCAN MATCH. */
static void
ctl_glob_escape(const char *in, char *out, size_t len)
{
	size_t o = 0;

	for (; *in && o + 3 < len; in++) {
		if (strchr("*?[]\\", *in))
			out[o++] = '\\';
		out[o++] = *in;
	}
	out[o] = '\0';
}

struct ctl_rsession {
	char *key;
	redisReply *h;
};

static int
ctl_rsession_cmp(const void *a, const void *b)
{
	const struct ctl_rsession *x = a, *y = b;
	int d = strcmp(ctl_hget(x->h, "user") ? ctl_hget(x->h, "user") : "",
	    ctl_hget(y->h, "user") ? ctl_hget(y->h, "user") : "");

	return d ? d : strcmp(x->key, y->key);
}

/* Every P{U}:session:<sid> key: SCAN, then HGETALL each. */
static int
ctl_redis_sessions(struct ctl *c, const char *only_user, struct ctl_rsession **out, size_t *n)
{
	char pattern[1024], esc[300], cursor[32] = "0";
	size_t cap = 0;
	redisReply *r;

	*out = NULL;
	*n = 0;
	ctl_glob_escape(c->cfg.redis_prefix, esc, sizeof(esc));
	if (only_user != NULL) {
		char uesc[600];
		ctl_glob_escape(only_user, uesc, sizeof(uesc));
		snprintf(pattern, sizeof(pattern), "%s{%s}:session:*", esc, uesc);
	} else
		snprintf(pattern, sizeof(pattern), "%s{*}:session:*", esc);
	do {
		if ((r = ctl_redis(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern)) == NULL)
			return -1;
		if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
		    r->element[1]->type != REDIS_REPLY_ARRAY) {
			freeReplyObject(r);
			ctl_err("redis: unexpected SCAN reply");
			return -1;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		for (size_t i = 0; i < r->element[1]->elements; i++) {
			const char *key = r->element[1]->element[i]->str;
			redisReply *h;

			if (*n == cap) {
				struct ctl_rsession *grown;
				cap = cap ? cap * 2 : 32;
				if ((grown = realloc(*out, cap * sizeof(*grown))) == NULL)
					break;
				*out = grown;
			}
			if ((h = ctl_redis(c, "HGETALL %s", key)) == NULL)
				continue;
			if (h->type != REDIS_REPLY_ARRAY || h->elements == 0) {
				freeReplyObject(h);	/* expired between SCAN and HGETALL */
				continue;
			}
			(*out)[*n].key = strdup(key);
			(*out)[(*n)++].h = h;
		}
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
	if (*n > 1)
		qsort(*out, *n, sizeof(**out), ctl_rsession_cmp);
	return 0;
}

static void
ctl_redis_sessions_free(struct ctl_rsession *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(s[i].key);
		freeReplyObject(s[i].h);
	}
	free(s);
}

/* The sid part of P{U}:session:<sid>. */
static const char *
ctl_key_sid(const char *key)
{
	const char *p = strstr(key, "}:session:");

	return p ? p + 10 : key;
}

static const char *const ctl_session_fields[] = { "user", "instance", "client", "mailbox",
	"uidvalidity", "uidnext", "count", "highestmodseq", "synced_gen", "started", "last_resync",
	"resyncs", "escalations", "stale_detected", "view", "backend_id", NULL };

static void
ctl_json_rsession(struct ctl *c, const struct ctl_rsession *s)
{
	const struct ctl_instance *in = ctl_registry_find(c, ctl_hget(s->h, "instance") ?
	    ctl_hget(s->h, "instance") : "");

	printf("{\"id\":");
	ctl_json_puts(stdout, ctl_key_sid(s->key));
	for (int f = 0; ctl_session_fields[f] != NULL; f++) {
		const char *v = ctl_hget(s->h, ctl_session_fields[f]);
		printf(",\"%s\":", ctl_session_fields[f]);
		if (v == NULL)
			printf("null");
		else if (strcmp(ctl_session_fields[f], "user") == 0 ||
		    strcmp(ctl_session_fields[f], "mailbox") == 0 ||
		    strcmp(ctl_session_fields[f], "view") == 0)
			ctl_json_puts(stdout, v);
		else
			ctl_json_scalar(stdout, v);
	}
	printf(",\"age\":%lld", (long long)(time(NULL) - strtoll(ctl_hget(s->h, "started") ?
	    ctl_hget(s->h, "started") : "0", NULL, 10)));
	printf(",\"instance_live\":%s,\"state\":", in != NULL && !in->stale ? "true" : "false");
	if (ctl_live_state(c, ctl_hget(s->h, "instance"), ctl_key_sid(s->key)) != NULL)
		ctl_json_puts(stdout, ctl_live_state(c, ctl_hget(s->h, "instance"),
		    ctl_key_sid(s->key)));
	else
		printf("null");
	printf("}");
}

/* One table row of a Redis session record. */
static void
ctl_rsession_row(struct ctl *c, struct ctl_table *t, const struct ctl_rsession *s)
{
	const char *inst = ctl_hget(s->h, "instance");
	const struct ctl_instance *in = ctl_registry_find(c, inst ? inst : "");
	const char *mb = ctl_hget(s->h, "mailbox");
	char age[32], last[32], where[160];

	ctl_duration(age, sizeof(age), (int64_t)time(NULL) -
	    strtoll(ctl_hget(s->h, "started") ? ctl_hget(s->h, "started") : "0", NULL, 10));
	ctl_ago(last, sizeof(last), strtoll(ctl_hget(s->h, "last_resync") ?
	    ctl_hget(s->h, "last_resync") : "0", NULL, 10));
	snprintf(where, sizeof(where), "%s%s", inst ? inst : "?",
	    in == NULL || in->stale ? " (gone?)" : "");
	const char *row[] = { ctl_key_sid(s->key), ctl_hget(s->h, "user"), ctl_hget(s->h, "client"),
	    where, ctl_live_state(c, inst, ctl_key_sid(s->key)), mb && mb[0] ? mb : "-",
	    ctl_hget(s->h, "count"), age, last };
	ctl_table_row(t, row);
}

static int
ctl_cmd_sessions(struct ctl *c)
{
	struct ctl_rsession *s;
	struct ctl_table t = { 0 };
	size_t n;

	if (ctl_use_admin(c))
		return ctl_sessions_admin(c);
	if (ctl_registry(c) < 0 || ctl_redis_sessions(c, NULL, &s, &n) < 0)
		return CTL_EXIT_ERROR;
	if (c->json) {
		printf("[");
		for (size_t i = 0; i < n; i++) {
			printf("%s\n", i ? "," : "");
			ctl_json_rsession(c, &s[i]);
		}
		printf("\n]\n");
	} else if (n == 0) {
		printf("no sessions in %s (only authenticated sessions are stored)\n", c->shown);
	} else {
		ctl_sessions_header(&t);
		for (size_t i = 0; i < n; i++)
			ctl_rsession_row(c, &t, &s[i]);
		ctl_table_print(&t);
	}
	ctl_redis_sessions_free(s, n);
	return CTL_EXIT_OK;
}

/* --- show --- */

/* a minus b, range by range (both sorted, disjoint). */
static void
ctl_uidset_minus(const struct uidset *a, const struct uidset *b, struct uidset *out)
{
	size_t j = 0;

	for (size_t i = 0; i < a->n; i++) {
		uint64_t lo = a->r[i].lo, hi = a->r[i].hi;
		size_t k;

		while (j < b->n && b->r[j].hi < lo)
			j++;
		for (k = j; lo <= hi; k++) {
			if (k >= b->n || b->r[k].lo > hi) {
				uidset_add_range(out, (uint32_t)lo, (uint32_t)hi);
				break;
			}
			if (b->r[k].lo > lo)
				uidset_add_range(out, (uint32_t)lo, b->r[k].lo - 1);
			lo = (uint64_t)b->r[k].hi + 1;
		}
	}
}

static void
ctl_uids_text(const struct uidset *s, char *buf, size_t len)
{
	if (uidset_format(s, buf, len) >= len && len > 4)
		snprintf(buf, len, "%llu UIDs in %zu ranges", (unsigned long long)s->count, s->n);
	if (buf[0] == '\0')
		snprintf(buf, len, "none");
}

struct ctl_diff {
	int have;			/* a last check exists and both sets parsed */
	uint64_t client_count, server_count;
	struct uidset client_only, server_only;
};

/* Where the client's view now and the server's mailbox at the last check differ. */
static void
ctl_session_diff(const struct ctl_json *s, struct ctl_diff *d)
{
	const struct ctl_json *view = ctl_json_get(s, "view"), *check = ctl_json_get(s, "last_check");
	const char *cu = ctl_json_text(view, "uids", NULL), *su = ctl_json_text(check, "server_uids",
	    NULL);
	struct uidset client, server;

	memset(d, 0, sizeof(*d));
	uidset_init(&d->client_only);
	uidset_init(&d->server_only);
	if (cu == NULL || su == NULL)
		return;
	uidset_init(&client);
	uidset_init(&server);
	if (uidset_parse(&client, cu, strlen(cu)) == 0 && uidset_parse(&server, su, strlen(su)) == 0) {
		d->have = 1;
		d->client_count = ctl_json_u64(view, "count");
		d->server_count = ctl_json_u64(check, "server_count");
		ctl_uidset_minus(&client, &server, &d->client_only);
		ctl_uidset_minus(&server, &client, &d->server_only);
	}
	uidset_free(&client);
	uidset_free(&server);
}

static void
ctl_show_text(const struct ctl_json *s, const char *shared_gen, const struct ctl_diff *d)
{
	const struct ctl_json *view = ctl_json_get(s, "view"), *check = ctl_json_get(s, "last_check");
	const char *mb = ctl_json_text(s, "mailbox", NULL);
	char age[32], last[32], a[4096], b[4096];

	ctl_duration(age, sizeof(age), (int64_t)ctl_json_u64(s, "age"));
	ctl_ago(last, sizeof(last), (int64_t)ctl_json_u64(s, "last_resync"));
	printf("session      %s\n", ctl_json_text(s, "id", "?"));
	printf("user         %s\n", ctl_json_text(s, "user", "(not authenticated)"));
	printf("client       %s%s\n", ctl_json_text(s, "client", "?"),
	    ctl_json_bool(s, "tls") ? " (TLS)" : " (plaintext)");
	printf("state        %s%s%s%s%s\n", ctl_json_text(s, "state", "?"),
	    ctl_json_bool(s, "authenticated") ? ", authenticated" : "",
	    ctl_json_bool(s, "idling") ? ", idling" : "",
	    ctl_json_bool(s, "held") ? ", a command held for a resync" : "",
	    ctl_json_bool(s, "traced") ? ", traced" : "");
	printf("age          %s\n", age);
	if (mb == NULL) {
		printf("mailbox      none selected\n");
	} else {
		printf("mailbox      %s (%s), UIDVALIDITY %s, UIDNEXT %s, HIGHESTMODSEQ %s\n", mb,
		    ctl_json_bool(s, "readonly") ? "read-only" : "read-write",
		    ctl_json_text(s, "uidvalidity", "?"), ctl_json_text(s, "uidnext", "?"),
		    ctl_json_text(s, "highestmodseq", "0"));
		printf("client view  %s messages, %s UIDs known: %s\n",
		    ctl_json_text(view, "count", "?"), ctl_json_text(view, "known", "?"),
		    ctl_json_text(view, "uids", "?")[0] ? ctl_json_text(view, "uids", "?") : "none");
		printf("generation   synced %s, now %s on %s%s%s%s\n",
		    ctl_json_text(s, "synced_gen", "?"), ctl_json_text(s, "gen", "?"),
		    ctl_json_text(s, "instance", "?"), shared_gen ? " (shared counter in Redis: " : "",
		    shared_gen ? shared_gen : "", shared_gen ? ")" : "");
		if (ctl_json_bool(s, "possibly_stale"))
			printf("sync status  POSSIBLY STALE: %s; the next trigger command resyncs\n",
			    ctl_json_text(s, "stale_reason", "?"));
		else
			printf("sync status  in sync as far as this instance knows\n");
	}
	printf("resyncs      %s (%s escalations, %s stale detected), last %s; phase %s\n",
	    ctl_json_text(s, "resyncs", "0"), ctl_json_text(s, "escalations", "0"),
	    ctl_json_text(s, "stale_detected", "0"), last, ctl_json_text(s, "resync_phase", "?"));
	if (check != NULL && check->type == CTL_JOBJ) {
		const char *su = ctl_json_text(check, "server_uids", "");
		printf("last check   on %s (%s): the server held %s messages: %s\n",
		    ctl_json_text(check, "trigger", "?"), ctl_json_text(check, "reason", "?"),
		    ctl_json_text(check, "server_count", "?"), su[0] ? su : "none");
		if (d->have) {
			if (d->client_only.count == 0 && d->server_only.count == 0 &&
			    d->client_count == d->server_count) {
				printf("differences  none: the client's view matches that check\n");
			} else {
				ctl_uids_text(&d->client_only, a, sizeof(a));
				ctl_uids_text(&d->server_only, b, sizeof(b));
				/* The check is a snapshot: what differs may have arrived or
				 * gone since, which the next check settles. */
				printf("differences  the client sees %llu messages now, the server held "
				    "%llu then; only in the client's view: %s (arrived since, or "
				    "expunged); only on the server: %s (not fetched by UID yet, or "
				    "missed)\n", (unsigned long long)d->client_count,
				    (unsigned long long)d->server_count, a, b);
			}
		}
	} else {
		printf("last check   none yet\n");
	}
}

static int
ctl_cmd_show(struct ctl *c, const char *sid)
{
	char path[300], err[1024], *raw = NULL, sharedbuf[32], a[4096], b[4096];
	const char *addr = ctl_owner(c, sid, path, sizeof(path)), *user, *mb, *shared = NULL;
	struct ctl_json *j;
	struct ctl_diff d;

	if (addr == NULL)
		return CTL_EXIT_ERROR;
	if ((j = ctl_admin_json(c, addr, "GET", path, NULL, &raw, err, sizeof(err))) == NULL) {
		ctl_err("%s", err);
		return CTL_EXIT_ERROR;
	}
	user = ctl_json_text(j, "user", NULL);
	mb = ctl_json_text(j, "mailbox", NULL);
	/* The shared generation, for the record; staleness is judged by the
	 * owning instance's own counters (generations are per process). */
	if (c->redis && user != NULL && mb != NULL) {
		redisReply *r = ctl_redis(c, "HGET %s{%s}:gen %s", c->cfg.redis_prefix, user, mb);
		if (r != NULL && r->type == REDIS_REPLY_STRING) {
			snprintf(sharedbuf, sizeof(sharedbuf), "%s", r->str);
			shared = sharedbuf;
		}
		freeReplyObject(r);
	}
	ctl_session_diff(j, &d);
	if (c->json) {
		size_t len = strlen(raw);
		while (len > 0 && raw[len - 1] == '\n')
			raw[--len] = '\0';
		printf("{\"session\":%s,\"shared_gen\":%s,\"differences\":", raw, shared ? shared : "null");
		if (d.have) {
			ctl_uids_text(&d.client_only, a, sizeof(a));
			ctl_uids_text(&d.server_only, b, sizeof(b));
			printf("{\"client_count\":%llu,\"server_count\":%llu,\"client_only\":",
			    (unsigned long long)d.client_count, (unsigned long long)d.server_count);
			ctl_json_puts(stdout, d.client_only.count ? a : "");
			printf(",\"server_only\":");
			ctl_json_puts(stdout, d.server_only.count ? b : "");
			printf("}}\n");
		} else
			printf("null}\n");
	} else
		ctl_show_text(j, shared, &d);
	uidset_free(&d.client_only);
	uidset_free(&d.server_only);
	free(raw);
	ctl_json_free(j);
	return CTL_EXIT_OK;
}

/* --- user --- */

static int
ctl_cmd_user_admin(struct ctl *c, const char *user)
{
	char bid[64] = "";
	const char *addr = ctl_local_admin(c);
	struct ctl_json *j;
	struct ctl_table t = { 0 }, g = { 0 };
	char err[1024], age[32], last[32];
	size_t n = 0;
	static const char *const gh[] = { "MAILBOX", "GENERATION (this instance)" };

	if (addr == NULL)
		return CTL_EXIT_ERROR;
	if ((j = ctl_admin_json(c, addr, "GET", "/sessions", NULL, NULL, err, sizeof(err))) == NULL) {
		ctl_err("%s", err);
		return CTL_EXIT_ERROR;
	}
	if (c->json) {
		printf("{\"user\":");
		ctl_json_puts(stdout, user);
		printf(",\"generations\":{");
		int first = 1;
		for (const struct ctl_json *s = j->child; s != NULL; s = s->next) {
			const char *mb = ctl_json_text(s, "mailbox", NULL);
			if (strcmp(ctl_json_text(s, "user", ""), user) != 0 || mb == NULL)
				continue;
			printf("%s", first ? "" : ",");
			ctl_json_puts(stdout, mb);
			printf(":%s", ctl_json_text(s, "gen", "0"));
			first = 0;
		}
		printf("},\"sessions\":[");
		first = 1;
		for (const struct ctl_json *s = j->child; s != NULL; s = s->next) {
			if (strcmp(ctl_json_text(s, "user", ""), user) != 0)
				continue;
			printf("%s", first ? "" : ",");
			ctl_json_puts(stdout, ctl_json_text(s, "id", ""));
			first = 0;
		}
		printf("]}\n");
		ctl_json_free(j);
		return CTL_EXIT_OK;
	}
	g.ncol = 2;
	ctl_table_row(&g, gh);
	ctl_sessions_header(&t);
	for (const struct ctl_json *s = j->child; s != NULL; s = s->next) {
		const char *mb = ctl_json_text(s, "mailbox", NULL);
		if (strcmp(ctl_json_text(s, "user", ""), user) != 0)
			continue;
		n++;
		if (ctl_json_text(s, "backend_id", NULL) != NULL)
			snprintf(bid, sizeof(bid), " (backend id %s)", ctl_json_text(s, "backend_id", ""));
		if (mb != NULL) {
			const char *row[] = { mb, ctl_json_text(s, "gen", "0") };
			ctl_table_row(&g, row);
		}
		ctl_duration(age, sizeof(age), (int64_t)ctl_json_u64(s, "age"));
		ctl_ago(last, sizeof(last), (int64_t)ctl_json_u64(s, "last_resync"));
		const char *row[] = { ctl_json_text(s, "id", "?"), user, ctl_json_text(s, "client", "-"),
		    ctl_json_text(s, "instance", "-"), ctl_json_text(s, "state", "-"),
		    mb ? mb : "-", ctl_json_text(s, "count", "-"), age, last };
		ctl_table_row(&t, row);
	}
	ctl_json_free(j);
	if (n == 0) {
		printf("user %s has no live session on %s\n", user, addr);
		ctl_table_free(&g);
		ctl_table_free(&t);
		return CTL_EXIT_OK;
	}
	printf("user %s%s (state = memory: generations are this instance's counters)\n\n", user, bid);
	if (g.nrow > 1)
		ctl_table_print(&g);
	else
		ctl_table_free(&g);
	printf("\n");
	ctl_table_print(&t);
	return CTL_EXIT_OK;
}

static int
ctl_cmd_user(struct ctl *c, const char *user)
{
	redisReply *gens, *members;
	struct ctl_rsession *s;
	struct ctl_table t = { 0 };
	size_t n;
	static const char *const gh[] = { "MAILBOX", "GENERATION" };

	if (ctl_use_admin(c))
		return ctl_cmd_user_admin(c, user);
	if (ctl_registry(c) < 0 ||
	    (gens = ctl_redis(c, "HGETALL %s{%s}:gen", c->cfg.redis_prefix, user)) == NULL)
		return CTL_EXIT_ERROR;
	if ((members = ctl_redis(c, "SMEMBERS %s{%s}:sessions", c->cfg.redis_prefix, user)) == NULL) {
		freeReplyObject(gens);
		return CTL_EXIT_ERROR;
	}
	if (ctl_redis_sessions(c, user, &s, &n) < 0) {
		freeReplyObject(gens);
		freeReplyObject(members);
		return CTL_EXIT_ERROR;
	}
	if (c->json) {
		printf("{\"user\":");
		ctl_json_puts(stdout, user);
		printf(",\"generations\":{");
		for (size_t i = 0; gens->type == REDIS_REPLY_ARRAY && i + 1 < gens->elements; i += 2) {
			printf("%s", i ? "," : "");
			ctl_json_puts(stdout, gens->element[i]->str);
			printf(":");
			ctl_json_scalar(stdout, gens->element[i + 1]->str);
		}
		printf("},\"sessions\":[");
		for (size_t i = 0; i < n; i++) {
			printf("%s\n", i ? "," : "");
			ctl_json_rsession(c, &s[i]);
		}
		printf("]}\n");
	} else {
		const char *bid = NULL;

		for (size_t i = 0; i < n && (bid == NULL || !bid[0]); i++)
			bid = ctl_hget(s[i].h, "backend_id");
		printf("user %s", user);
		if (bid != NULL && bid[0])
			printf(" (backend id %s)", bid);
		printf("\n\n");
		if (gens->type == REDIS_REPLY_ARRAY && gens->elements > 0) {
			t.ncol = 2;
			ctl_table_row(&t, gh);
			for (size_t i = 0; i + 1 < gens->elements; i += 2) {
				const char *row[] = { gens->element[i]->str, gens->element[i + 1]->str };
				ctl_table_row(&t, row);
			}
			ctl_table_print(&t);
		} else
			printf("no mailbox generations recorded (nothing changed through imapfresh)\n");
		printf("\n");
		if (n == 0) {
			printf("no live sessions\n");
		} else {
			ctl_sessions_header(&t);
			for (size_t i = 0; i < n; i++)
				ctl_rsession_row(c, &t, &s[i]);
			ctl_table_print(&t);
		}
		/* Set members whose key is gone: sessions of an instance that died. */
		for (size_t i = 0; members->type == REDIS_REPLY_ARRAY && i < members->elements; i++) {
			int found = 0;
			for (size_t k = 0; k < n && !found; k++)
				found = strcmp(ctl_key_sid(s[k].key), members->element[i]->str) == 0;
			if (!found)
				printf("(stale member %s in %s{%s}:sessions: its key expired)\n",
				    members->element[i]->str, c->cfg.redis_prefix, user);
		}
	}
	ctl_redis_sessions_free(s, n);
	freeReplyObject(gens);
	freeReplyObject(members);
	return CTL_EXIT_OK;
}

/* --- events --- */

/* A value for key=value output: quoted when it holds a space or is empty. */
static void
ctl_event_value(const char *v)
{
	printf(v[0] == '\0' || strpbrk(v, " \t\"") ? "\"%s\"" : "%s", v);
}

/* One event, human-readable: time, session, user, mailbox and step first
 * (events.c writes them), then every other non-null member as key=value. */
static void
ctl_event_print(const char *when, const char *text)
{
	static const char *const lead[] = { "time", "session", "user", "mailbox", "step", NULL };
	struct ctl_json *j = ctl_json_parse(text, strlen(text));
	int first = 1;

	if (j == NULL || j->type != CTL_JOBJ) {
		printf("%s%s%s\n", when ? when : "", when ? " " : "", text);
		ctl_json_free(j);
		return;
	}
	if (when != NULL && ctl_json_get(j, "time") == NULL) {
		printf("%s", when);
		first = 0;
	}
	for (int i = 0; lead[i] != NULL; i++) {
		const char *v = ctl_json_text(j, lead[i], NULL);
		if (v == NULL)
			continue;
		printf("%s", first ? "" : " ");
		ctl_event_value(v);
		first = 0;
	}
	for (const struct ctl_json *m = j->child; m != NULL; m = m->next) {
		const char *v = m->type == CTL_JSTR || m->type == CTL_JNUM ? m->str :
		    m->type == CTL_JBOOL ? (m->b ? "true" : "false") : NULL;
		int skip = m->type == CTL_JNULL || strcmp(m->key, "instance") == 0;

		for (int i = 0; lead[i] != NULL && !skip; i++)
			skip = strcmp(m->key, lead[i]) == 0;
		if (skip)
			continue;
		printf("%s%s=", first ? "" : " ", m->key);
		ctl_event_value(v ? v : "{...}");
		first = 0;
	}
	printf("\n");
	ctl_json_free(j);
}

/* A stream entry [id, [field, value, ...]]. A single JSON-valued field is
 * the event itself; otherwise the fields are the event. */
static void
ctl_stream_entry(struct ctl *c, const redisReply *e)
{
	const redisReply *f;
	const char *id;
	char when[64];
	time_t t;
	struct tm tm;

	if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[1]->type !=
	    REDIS_REPLY_ARRAY)
		return;
	id = e->element[0]->str;
	f = e->element[1];
	t = (time_t)(strtoull(id, NULL, 10) / 1000);
	gmtime_r(&t, &tm);
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	if (f->elements == 2 && f->element[1]->type == REDIS_REPLY_STRING &&
	    f->element[1]->str[0] == '{') {
		if (c->json)
			printf("%s\n", f->element[1]->str);
		else
			ctl_event_print(when, f->element[1]->str);
		return;
	}
	if (c->json) {
		printf("{\"id\":");
		ctl_json_puts(stdout, id);
		for (size_t i = 0; i + 1 < f->elements; i += 2) {
			printf(",");
			ctl_json_puts(stdout, f->element[i]->str);
			printf(":");
			ctl_json_scalar(stdout, f->element[i + 1]->str);
		}
		printf("}\n");
		return;
	}
	printf("%s", when);
	for (size_t i = 0; i + 1 < f->elements; i += 2) {
		printf(" %s=", f->element[i]->str);
		ctl_event_value(f->element[i + 1]->str ? f->element[i + 1]->str : "");
	}
	printf("\n");
}

static int ctl_events_file(struct ctl *c);

static int
ctl_cmd_events(struct ctl *c)
{
	char key[300], last[64] = "$";
	redisReply *r;

	if (!c->redis)
		return ctl_events_file(c);
	snprintf(key, sizeof(key), "%sevents", c->cfg.redis_prefix);
	if ((r = ctl_redis(c, "TYPE %s", key)) == NULL)
		return CTL_EXIT_ERROR;
	if (r->type == REDIS_REPLY_STATUS && strcmp(r->str, "stream") != 0 && !c->follow &&
	    c->cfg.event_log[0] != '\0') {
		freeReplyObject(r);
		return ctl_events_file(c);	/* no stream (event_stream_max = 0): the file */
	}
	freeReplyObject(r);
	if ((r = ctl_redis(c, "XREVRANGE %s + - COUNT %ld", key, c->count)) == NULL)
		return CTL_EXIT_ERROR;
	if (r->type == REDIS_REPLY_ARRAY) {
		for (size_t i = r->elements; i > 0; i--)
			ctl_stream_entry(c, r->element[i - 1]);
		if (r->elements > 0)
			snprintf(last, sizeof(last), "%s", r->element[0]->element[0]->str);
		else if (!c->json && !c->follow)
			fprintf(stderr, "imapfresh-ctl: no events in %s yet\n", key);
	}
	freeReplyObject(r);
	fflush(stdout);
	while (c->follow) {
		/* BLOCK under the socket timeout, so a dead Redis is noticed. */
		if ((r = ctl_redis(c, "XREAD COUNT 100 BLOCK %d STREAMS %s %s", CTL_TIMEOUT_MS / 2,
		    key, last)) == NULL)
			return CTL_EXIT_ERROR;
		if (r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
		    r->element[0]->elements == 2) {
			const redisReply *entries = r->element[0]->element[1];
			for (size_t i = 0; i < entries->elements; i++) {
				ctl_stream_entry(c, entries->element[i]);
				snprintf(last, sizeof(last), "%s", entries->element[i]->element[0]->str);
			}
			fflush(stdout);
		}
		freeReplyObject(r);
	}
	return CTL_EXIT_OK;
}

static void
ctl_event_line(struct ctl *c, char *line)
{
	size_t len = strlen(line);

	while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
		line[--len] = '\0';
	if (len == 0)
		return;
	if (c->json)
		printf("%s\n", line);
	else
		ctl_event_print(NULL, line);
}

/* Memory mode: the last N lines of event_log, then (--follow) what is appended. */
static int
ctl_events_file(struct ctl *c)
{
	const char *path = c->cfg.event_log;
	FILE *f;
	char *line = NULL, **ring;
	size_t cap = 0, head = 0, used = 0;
	long n = c->count > 0 ? c->count : 1;
	off_t pos;
	struct stat st;

	if (path[0] == '\0') {
		/* Say which configuration that was: most often the wrong one. */
		if (c->config_file != NULL)
			ctl_err("no event source: %s has no Redis state and no event_log",
			    c->config_file);
		else
			ctl_err("no event source: no configuration read (%s does not exist; give -c "
			    "FILE or set IMAPFRESH_CONFIG), and the defaults have no Redis state "
			    "and no event_log", CTL_DEFAULT_CONFIG);
		return CTL_EXIT_ERROR;
	}
	if ((f = fopen(path, "r")) == NULL) {
		ctl_err("event_log %s: %s", path, strerror(errno));
		return CTL_EXIT_ERROR;
	}
	if ((ring = calloc((size_t)n, sizeof(*ring))) == NULL) {
		fclose(f);
		return CTL_EXIT_ERROR;
	}
	while (getline(&line, &cap, f) > 0) {
		free(ring[head]);
		ring[head] = strdup(line);
		head = (head + 1) % (size_t)n;
		if (used < (size_t)n)
			used++;
	}
	for (size_t i = 0; i < used; i++) {
		char *l = ring[(head + (size_t)n - used + i) % (size_t)n];
		if (l != NULL)
			ctl_event_line(c, l);
		free(l);
	}
	free(ring);
	fflush(stdout);
	pos = ftello(f);
	while (c->follow) {
		usleep(250000);
		/* Rotated or truncated: start over from its beginning. */
		if (stat(path, &st) == 0 && st.st_size < pos) {
			fclose(f);
			if ((f = fopen(path, "r")) == NULL)
				continue;
		}
		clearerr(f);
		while (getline(&line, &cap, f) > 0)
			ctl_event_line(c, line);
		pos = ftello(f);
		fflush(stdout);
	}
	free(line);
	if (f != NULL)
		fclose(f);
	return CTL_EXIT_OK;
}

/* --- trace, resync, kick --- */

static void
ctl_urlencode(const char *in, char *out, size_t len)
{
	size_t o = 0;

	for (; *in && o + 4 < len; in++) {
		unsigned char ch = (unsigned char)*in;
		if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
		    strchr("-_.~", ch))
			out[o++] = (char)ch;
		else
			o += (size_t)snprintf(out + o, len - o, "%%%02X", ch);
	}
	out[o] = '\0';
}

static int
ctl_cmd_trace(struct ctl *c, int argc, char **argv)
{
	const char **addrs, **names;
	char spec[600] = "", body[2000], err[1024];
	size_t n;
	int failed = 0, post;

	if (argc < 1 || (strcmp(argv[0], "on") == 0 && argc < 2) ||
	    (strcmp(argv[0], "on") != 0 && argc != 1) ||
	    (strcmp(argv[0], "on") != 0 && strcmp(argv[0], "off") != 0 &&
	    strcmp(argv[0], "status") != 0)) {
		ctl_err("usage: trace on SPEC | trace off | trace status "
		    "(SPEC: all, user NAME, client ADDR, optionally followed by bodies)");
		return CTL_EXIT_USAGE;
	}
	post = strcmp(argv[0], "status") != 0;
	if (strcmp(argv[0], "off") == 0)
		snprintf(spec, sizeof(spec), "off");
	for (int i = 1; i < argc; i++) {
		size_t o = strlen(spec);
		snprintf(spec + o, sizeof(spec) - o, "%s%s", i > 1 ? " " : "", argv[i]);
	}
	memcpy(body, "spec=", 5);
	ctl_urlencode(spec, body + 5, sizeof(body) - 5);
	if (ctl_targets(c, &addrs, &names, &n) < 0)
		return CTL_EXIT_ERROR;
	if (c->json)
		printf("[");
	for (size_t i = 0; i < n; i++) {
		struct ctl_json *j = ctl_admin_json(c, addrs[i], post ? "POST" : "GET", "/trace",
		    post ? body : NULL, NULL, err, sizeof(err));
		if (j == NULL) {
			ctl_err("%s: %s", names[i], err);
			failed = 1;
			continue;
		}
		if (c->json) {
			printf("%s{\"instance\":", i ? "," : "");
			ctl_json_puts(stdout, ctl_json_text(j, "instance", names[i]));
			printf(",\"trace\":");
			ctl_json_puts(stdout, ctl_json_text(j, "trace", ""));
			printf("}");
		} else
			printf("%s: trace %s\n", ctl_json_text(j, "instance", names[i]),
			    ctl_json_text(j, "trace", "?"));
		ctl_json_free(j);
	}
	if (c->json)
		printf("]\n");
	if (!ctl_use_admin(c)) {
		free(addrs);
		free(names);
	}
	return failed ? CTL_EXIT_ERROR : CTL_EXIT_OK;
}

static int
ctl_cmd_control(struct ctl *c, const char *action, const char *sid)
{
	char path[300], full[320], err[1024], *raw;
	const char *addr = ctl_owner(c, sid, path, sizeof(path));
	struct ctl_json *j;

	if (addr == NULL)
		return CTL_EXIT_ERROR;
	snprintf(full, sizeof(full), "%s/%s", path, action);
	if ((j = ctl_admin_json(c, addr, "POST", full, "", &raw, err, sizeof(err))) == NULL) {
		ctl_err("%s", err);
		return CTL_EXIT_ERROR;
	}
	if (c->json)
		fputs(raw, stdout);
	else
		printf("%s: %s\n", ctl_json_text(j, "id", sid), ctl_json_text(j, "message", action));
	free(raw);
	ctl_json_free(j);
	return CTL_EXIT_OK;
}

/* One instance is told; with Redis state it tells the others. */
static int
ctl_cmd_notify(struct ctl *c, const char *user, const char *mailbox)
{
	const char **addrs, **names;
	char body[3200], err[1024], *raw = NULL;
	size_t n, o;
	int rc = CTL_EXIT_ERROR;

	memcpy(body, "user=", 5);
	ctl_urlencode(user, body + 5, 1000);
	if (mailbox != NULL) {
		o = strlen(body);
		memcpy(body + o, "&mailbox=", 10);
		ctl_urlencode(mailbox, body + o + 9, sizeof(body) - o - 9);
	}
	if (ctl_targets(c, &addrs, &names, &n) < 0)
		return CTL_EXIT_ERROR;
	for (size_t i = 0; i < n && rc != CTL_EXIT_OK; i++) {
		struct ctl_json *j = ctl_admin_json(c, addrs[i], "POST", "/notify", body, &raw, err,
		    sizeof(err));

		if (j == NULL) {
			ctl_err("%s: %s", names[i], err);
			continue;
		}
		if (c->json)
			fputs(raw, stdout);
		else
			printf("%s: %s, %s: told (%s session(s) there%s)\n",
			    ctl_json_text(j, "instance", names[i]), user,
			    mailbox ? mailbox : "every mailbox", ctl_json_text(j, "sessions_here", "?"),
			    n > 1 ? "; the other instances through Redis" : "");
		free(raw);
		ctl_json_free(j);
		rc = CTL_EXIT_OK;
	}
	if (!ctl_use_admin(c)) {
		free(addrs);
		free(names);
	}
	return rc;
}

/* --- upgrade --- */

#define CTL_UPGRADE_WAIT_MS 40000	/* the daemon's own limit is 30 s */

/* The pid in pid_file, 0 when there is none. */
static long
ctl_read_pid(const char *path)
{
	char buf[32] = "";
	FILE *f = fopen(path, "r");

	if (f == NULL)
		return 0;
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	fclose(f);
	return strtol(buf, NULL, 10);
}

/*
 * SIGUSR2 to the daemon named by pid_file, then wait for the new process
 * to rewrite pid_file: it does so once it serves, and the old one hands
 * over and drains (upgrade.c). A pid file that never changes means the
 * upgrade failed and the old process goes on: its log says why.
 */
static int
ctl_cmd_upgrade(struct ctl *c)
{
	const char *path = c->cfg.pid_file;
	long old, now = 0;

	if (path[0] == '\0') {
		ctl_err("pid_file is not set in the configuration; send SIGUSR2 to the daemon "
		    "yourself (systemd: systemctl kill --kill-whom=main -s USR2 imapfresh)");
		return CTL_EXIT_ERROR;
	}
	if ((old = ctl_read_pid(path)) <= 0 || kill((pid_t)old, 0) < 0) {
		ctl_err("%s: no running imapfresh (%s)", path, old <= 0 ? "no pid" : strerror(errno));
		return CTL_EXIT_ERROR;
	}
	if (kill((pid_t)old, SIGUSR2) < 0) {
		ctl_err("pid %ld: %s", old, strerror(errno));
		return CTL_EXIT_ERROR;
	}
	for (int waited = 0; waited < CTL_UPGRADE_WAIT_MS; waited += 100) {
		struct timespec ts = { 0, 100 * 1000000L };

		nanosleep(&ts, NULL);
		if ((now = ctl_read_pid(path)) > 0 && now != old && kill((pid_t)now, 0) == 0) {
			if (c->json)
				printf("{\"old_pid\":%ld,\"new_pid\":%ld}\n", old, now);
			else
				printf("upgraded: pid %ld serves now; pid %ld drains its sessions "
				    "(upgrade_drain_timeout) and exits\n", now, old);
			return CTL_EXIT_OK;
		}
	}
	ctl_err("no new process took over within %d s: pid %ld goes on serving; its log says why",
	    CTL_UPGRADE_WAIT_MS / 1000, old);
	return CTL_EXIT_ERROR;
}

/* --- main --- */

static void
ctl_usage(FILE *f)
{
	fprintf(f, "usage: imapfresh-ctl [-c file] [-o key=value]... [--json] [--admin host:port]\n"
	    "                     [--token T] COMMAND [ARGS]\n"
	    "  sessions                 live sessions (every instance, with Redis state)\n"
	    "  show SID                 one session: the client's view, its sync status\n"
	    "  user USER                a user's mailbox generations and sessions\n"
	    "  events [-f] [-n N]       the last N sync events (default 20); -f follows\n"
	    "  trace on SPEC|off|status trace sessions (SPEC: all, user NAME, client ADDR [bodies])\n"
	    "  resync SID               resync the session on its next trigger command\n"
	    "  kick SID                 end the session (* BYE)\n"
	    "  notify USER [MAILBOX]    a change made behind imapfresh's back: the user's sessions\n"
	    "                           (every instance) resync; no MAILBOX: every mailbox\n"
	    "  upgrade                  zero-downtime restart with the binary and configuration\n"
	    "                           now on disk (SIGUSR2 to the pid in pid_file)\n"
	    "options:\n"
	    "  -c file        configuration (default $IMAPFRESH_CONFIG,\n"
	    "                 else %s when it exists)\n"
	    "  -o key=value   override a configuration key (state, redis_prefix, admin_listen...)\n"
	    "  --json         JSON output\n"
	    "  --admin ADDR   talk to this admin endpoint instead of discovering them\n"
	    "  --token T      admin_token (also $IMAPFRESH_ADMIN_TOKEN)\n", CTL_DEFAULT_CONFIG);
}

static int
ctl_load_config(struct ctl *c, const char *file, char **overrides, int n_overrides)
{
	char err[1400];

	config_defaults(&c->cfg);
	if (file == NULL && getenv("IMAPFRESH_CONFIG") != NULL && getenv("IMAPFRESH_CONFIG")[0])
		file = getenv("IMAPFRESH_CONFIG");
	if (file == NULL && access(CTL_DEFAULT_CONFIG, R_OK) == 0)
		file = CTL_DEFAULT_CONFIG;
	c->config_file = file;
	if (file != NULL && config_load_file(&c->cfg, file, err, sizeof(err)) < 0) {
		ctl_err("%s", err);
		return -1;
	}
	for (int i = 0; i < n_overrides; i++)
		if (config_set_option(&c->cfg, overrides[i], err, sizeof(err)) < 0) {
			ctl_err("-o %s", err);
			return -1;
		}
	if (config_load_secrets(&c->cfg, err, sizeof(err)) < 0) {
		ctl_err("%s", err);
		return -1;
	}
	c->redis = strcmp(c->cfg.state, "memory") != 0;
	config_redact_url(c->cfg.state, c->shown, sizeof(c->shown));
	return 0;
}

int
main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'J' },
		{ "admin", required_argument, NULL, 'A' },
		{ "token", required_argument, NULL, 'T' },
		{ "follow", no_argument, NULL, 'f' },
		{ "config", required_argument, NULL, 'c' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	static struct ctl c;
	char *overrides[argc + 1], *end;	/* on the stack: every return frees it */
	const char *file = NULL, *cmd;
	int n_overrides = 0, ch, rc;

	c.count = 20;
	while ((ch = getopt_long(argc, argv, "c:o:n:fhV", longopts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			file = optarg;
			break;
		case 'o':
			overrides[n_overrides++] = optarg;
			break;
		case 'n':
			c.count = strtol(optarg, &end, 10);
			if (*end != '\0' || c.count < 1 || c.count > 1000000) {
				ctl_err("-n %s: a count from 1 to 1000000", optarg);
				return CTL_EXIT_USAGE;
			}
			break;
		case 'f':
			c.follow = 1;
			break;
		case 'J':
			c.json = 1;
			break;
		case 'A':
			c.admin = optarg;
			break;
		case 'T':
			c.token = optarg;
			break;
		case 'h':
			ctl_usage(stdout);
			return CTL_EXIT_OK;
		case 'V':
			printf("imapfresh-ctl %s\n", PACKAGE_VERSION);
			return CTL_EXIT_OK;
		default:
			ctl_usage(stderr);
			return CTL_EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		ctl_usage(stderr);
		return CTL_EXIT_USAGE;
	}
	cmd = argv[optind++];
	argc -= optind;
	argv += optind;
	if (ctl_load_config(&c, file, overrides, n_overrides) < 0)
		return CTL_EXIT_ERROR;
	if (c.token == NULL)
		c.token = getenv("IMAPFRESH_ADMIN_TOKEN");
	if (c.token == NULL)
		c.token = c.cfg.admin_token;

	if (strcmp(cmd, "sessions") == 0 && argc == 0)
		rc = ctl_cmd_sessions(&c);
	else if (strcmp(cmd, "show") == 0 && argc == 1)
		rc = ctl_cmd_show(&c, argv[0]);
	else if (strcmp(cmd, "user") == 0 && argc == 1)
		rc = ctl_cmd_user(&c, argv[0]);
	else if (strcmp(cmd, "events") == 0 && argc == 0)
		rc = ctl_cmd_events(&c);
	else if (strcmp(cmd, "trace") == 0)
		rc = ctl_cmd_trace(&c, argc, argv);
	else if ((strcmp(cmd, "resync") == 0 || strcmp(cmd, "kick") == 0) && argc == 1)
		rc = ctl_cmd_control(&c, cmd, argv[0]);
	else if (strcmp(cmd, "notify") == 0 && (argc == 1 || argc == 2))
		rc = ctl_cmd_notify(&c, argv[0], argc == 2 ? argv[1] : NULL);
	else if (strcmp(cmd, "upgrade") == 0 && argc == 0)
		rc = ctl_cmd_upgrade(&c);
	else {
		ctl_err("%s: unknown command or wrong arguments", cmd);
		ctl_usage(stderr);
		rc = CTL_EXIT_USAGE;
	}
	if (c.rc != NULL)
		redisFree(c.rc);
	for (size_t i = 0; i < c.n_inst; i++)
		ctl_json_free(c.inst[i].live);
	free(c.inst);
	return rc;
}
