/* config: reads and checks imapfresh's key = value settings, all driven by one table of keys. */
#include "config.h"

#include <arpa/inet.h>
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "sentinel.h"

/* Numbers are stored through 4- or 8-byte fields; enums share int's layout. */
_Static_assert(sizeof(int) == 4, "int fields are stored as 32 bits");
_Static_assert(sizeof(enum upstream_tls_mode) == sizeof(int), "enum stored as int");
_Static_assert(sizeof(enum log_level) == sizeof(int), "enum stored as int");

/* Choice names, indexed by the enum they stand for. */
static const char *const config_upstream_tls_names[] = { "none", "starttls", "tls", NULL };
static const char *const config_client_address_names[] = {
	"none", "id", "proxy-v1", "proxy-v2", NULL,
};
static const char *const config_backend_events_names[] = { "none", "wildduck", NULL };
static const char *const config_log_level_names[] = {
	"error", "warning", "notice", "info", "debug", NULL,
};
_Static_assert(sizeof config_upstream_tls_names / sizeof *config_upstream_tls_names
    == UPSTREAM_TLS_TLS + 2, "one name per upstream_tls_mode");
_Static_assert(sizeof config_client_address_names / sizeof *config_client_address_names
    == CLIENT_ADDRESS_PROXY_V2 + 2, "one name per client_address_mode");
_Static_assert(sizeof(enum client_address_mode) == sizeof(int), "enum stored as int");
_Static_assert(sizeof config_backend_events_names / sizeof *config_backend_events_names
    == BACKEND_EVENTS_WILDDUCK + 2, "one name per backend_events_mode");
_Static_assert(sizeof(enum backend_events_mode) == sizeof(int), "enum stored as int");
_Static_assert(sizeof config_log_level_names / sizeof *config_log_level_names
    == LOG_LEVEL_DEBUG + 2, "one name per log_level");

static const char *config_check_state(const char *value);
static const char *config_check_commands(const char *value);
static const char *config_check_prefix(const char *value);
static const char *config_check_optional_addr(const char *value);
static const char *config_check_trace(const char *value);
static const char *config_check_cidrs(const char *value);
static const char *config_check_instance(const char *value);
static const char *config_check_optional_redis(const char *value);
static const char *config_check_http_url(const char *value);

/*
 * The keys. One row each: X(name, TYPE, designated initializers...). The
 * struct field carries the key's name, so offset and size come for free.
 * Defaults are written as a user would write them and go through the parser.
 */
#define CONFIG_TABLE(X) \
	X(listen, ADDRS, .count_offset = offsetof(struct config, n_listen), \
	    .help = "plaintext listener host:port, repeatable; STARTTLS offered when tls_cert is set") \
	X(listen_tls, ADDRS, .count_offset = offsetof(struct config, n_listen_tls), \
	    .help = "implicit-TLS listener host:port, repeatable; needs tls_cert") \
	X(tls_cert, STRING, .file = 1, \
	    .help = "PEM certificate chain presented to clients") \
	X(tls_key, STRING, .file = 1, \
	    .help = "PEM private key; empty means it is in the tls_cert file") \
	X(tls_ciphers, STRING, .def = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS", .min = 1, \
	    .help = "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's)") \
	X(require_tls, BOOL, .def = "yes", \
	    .help = "refuse LOGIN and AUTHENTICATE until the client link is TLS") \
	X(secure_networks, STRING, .def = "127.0.0.0/8, ::1", .check = config_check_cidrs, \
	    .help = "networks whose plaintext connections count as secure for require_tls; empty = none") \
	X(upstream, ADDR, \
	    .help = "IMAP server host[:port]; port 143, or 993 with upstream_tls = tls") \
	X(upstream_tls, ENUM, .def = "none", .choices = config_upstream_tls_names, \
	    .help = "TLS to the IMAP server: none, starttls or tls") \
	X(upstream_tls_verify, BOOL, .def = "yes", \
	    .help = "check the IMAP server's certificate and name") \
	X(upstream_ca, STRING, .file = 1, \
	    .help = "PEM CA file to check the IMAP server with; empty = system store") \
	X(upstream_sni, STRING, \
	    .help = "server name sent and checked upstream; empty = upstream host name") \
	X(state, STRING, .def = "memory", .check = config_check_state, \
	    .help = "session state store: memory, redis://[[user]:password@]host[:port][/db] or " \
	    "redis-sentinel://[[user]:password@]host[:port],.../master[/db]") \
	X(state_password_file, STRING, .file = 1, \
	    .help = "file whose first line is the state store's Redis password, instead of " \
	    "the URL's") \
	X(sentinel_user, STRING, \
	    .help = "user the sentinels of a redis-sentinel:// state require (Redis 6.2 ACL); " \
	    "empty = none") \
	X(sentinel_password, STRING, \
	    .help = "password the sentinels themselves require (the URL's is the master's); " \
	    "empty = none") \
	X(sentinel_password_file, STRING, .file = 1, \
	    .help = "file whose first line is sentinel_password") \
	X(resync, BOOL, .def = "yes", \
	    .help = "resync a stale session before the commands in resync_on") \
	X(resync_on, STRING, .def = "GETQUOTAROOT, FETCH, UID FETCH", .min = 1, \
	    .check = config_check_commands, \
	    .help = "comma-separated commands that trigger the staleness check") \
	X(resync_after, DURATION, .def = "0", \
	    .help = "also resync a session not synced for this long; 0 = off") \
	X(redis_prefix, STRING, .def = "imapfresh:", .min = 1, .check = config_check_prefix, \
	    .help = "prefix of every Redis key and channel") \
	X(redis_publish_global, BOOL, .def = "no", \
	    .help = "also publish every change on <redis_prefix>changes, for instances of " \
	    "earlier versions during a rolling upgrade") \
	X(select_wait, INT, .def = "100", .min = 0, .max = 10000, \
	    .help = "milliseconds a user's first SELECT here waits for this instance to hear " \
	    "the user's changes; 0 = never (the session checks its mailbox once instead)") \
	X(instance_id, STRING, .check = config_check_instance, \
	    .help = "this instance's name in Redis keys and messages; empty = host name") \
	X(state_ttl, DURATION, .def = "1h", .min = 60, \
	    .help = "how long a session's Redis key outlives its last refresh") \
	X(admin_listen, STRING, .def = "127.0.0.1:8143", .check = config_check_optional_addr, \
	    .help = "host:port of the operators' HTTP endpoint; empty = off") \
	X(admin_token, STRING, \
	    .help = "token the HTTP endpoint requires (Authorization: Bearer); empty = none") \
	X(event_log, STRING, \
	    .help = "file the sync events are appended to as JSON lines; empty = none") \
	X(event_stream_max, INT, .def = "10000", .min = 0, .max = 10000000, \
	    .help = "length of the Redis stream of sync events; 0 = no stream") \
	X(trace, STRING, .def = "off", .check = config_check_trace, \
	    .help = "sessions traced from the start: off, all, user NAME or client ADDR [bodies]") \
	X(trace_file, STRING, \
	    .help = "file protocol traces are appended to; empty = the log") \
	X(trace_stream_max, INT, .def = "10000", .min = 0, .max = 10000000, \
	    .help = "length of the Redis stream of trace lines; 0 = no stream") \
	X(backend_events, ENUM, .def = "none", .choices = config_backend_events_names, \
	    .help = "the backend's own change feed to follow: none or wildduck") \
	X(backend_redis, STRING, .check = config_check_optional_redis, \
	    .help = "the backend's Redis (WildDuck's wd_events): redis://[[user]:password@]host[:port]") \
	X(backend_redis_password_file, STRING, .file = 1, \
	    .help = "file whose first line is backend_redis's password, instead of the URL's") \
	X(backend_api, STRING, .check = config_check_http_url, \
	    .help = "the backend's HTTP API, for a login name's user id: http://host[:port]") \
	X(backend_api_token, STRING, \
	    .help = "access token sent to backend_api (X-Access-Token); empty = none") \
	X(backend_id_ttl, DURATION, .def = "1h", .min = 1, \
	    .help = "how long a resolved backend user id is kept before it is looked up again") \
	X(proxy_protocol_trusted, STRING, .check = config_check_cidrs, \
	    .help = "comma-separated networks whose connections start with a PROXY header") \
	X(upstream_client_address, ENUM, .def = "none", .choices = config_client_address_names, \
	    .help = "how the upstream learns the client's address: none, id, proxy-v1 or proxy-v2") \
	X(max_clients, INT, .def = "10000", .min = 1, .max = 1000000, \
	    .help = "client connections accepted at once, per worker") \
	X(workers, INT, .def = "1", .min = 1, .max = 64, \
	    .help = "processes serving clients; more than one needs state = redis://...") \
	X(busy_poll, INT, .def = "0", .min = 0, .max = 100000, \
	    .help = "microseconds to keep polling after traffic instead of sleeping; 0 = off") \
	X(max_line, SIZE, .def = "64k", .min = 1024, .max = 16 << 20, \
	    .help = "longest command or response line, literals excluded") \
	X(max_literal, SIZE, .def = "100M", .min = 1, \
	    .help = "largest literal passed through") \
	X(timeout_connect, DURATION, .def = "10s", .min = 1, \
	    .help = "upstream TCP connect timeout") \
	X(timeout_tls_handshake, DURATION, .def = "30s", .min = 1, \
	    .help = "TLS handshake timeout, either side") \
	X(timeout_preauth, DURATION, .def = "60s", .min = 1, \
	    .help = "time a client has to log in, from connect") \
	X(timeout_idle, DURATION, .def = "30m", .min = 1, \
	    .help = "idle time allowed once authenticated (RFC 9051: at least 30m)") \
	X(upgrade_drain_timeout, DURATION, .def = "60s", .min = 1, \
	    .help = "after an upgrade (SIGUSR2), how long the old process's sessions may stay") \
	X(log_level, ENUM, .def = "info", .choices = config_log_level_names, \
	    .help = "error, warning, notice, info or debug") \
	X(pid_file, STRING, \
	    .help = "file to write the process id to; empty = none") \
	X(user, STRING, \
	    .help = "user to switch to after binding the listeners; empty = stay")

#define CONFIG_ROW(key, t, ...) { .name = #key, .type = CONFIG_T_##t, \
	.offset = offsetof(struct config, key), \
	.size = sizeof(((struct config *)0)->key), __VA_ARGS__ },
#define CONFIG_NAME(key, ...) #key,

const struct config_key config_table[] = { CONFIG_TABLE(CONFIG_ROW) { .name = NULL } };
const char *const config_keys[] = { CONFIG_TABLE(CONFIG_NAME) NULL };

/* Booleans: every spelling people reach for. */
static const struct {
	const char *word;
	int value;
} config_bool_words[] = {
	{ "yes", 1 }, { "no", 0 }, { "true", 1 }, { "false", 0 },
	{ "on", 1 }, { "off", 0 }, { "1", 1 }, { "0", 0 },
};

/* Number suffixes; a zero mult ends a list. */
struct config_unit {
	char suffix;
	uint64_t mult;
};
static const struct config_unit config_size_units[] = {
	{ 'k', 1ULL << 10 }, { 'K', 1ULL << 10 }, { 'm', 1ULL << 20 }, { 'M', 1ULL << 20 },
	{ 'g', 1ULL << 30 }, { 'G', 1ULL << 30 }, { 0, 0 },
};
static const struct config_unit config_duration_units[] = {
	{ 's', 1 }, { 'm', 60 }, { 'h', 3600 }, { 0, 0 },
};
/* Printing prefers the largest exact unit, so list them largest first. */
static const struct config_unit config_size_print[] = {
	{ 'G', 1ULL << 30 }, { 'M', 1ULL << 20 }, { 'k', 1ULL << 10 }, { 0, 0 },
};
static const struct config_unit config_duration_print[] = {
	{ 'h', 3600 }, { 'm', 60 }, { 's', 1 }, { 0, 0 },
};

static int config_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Every error path writes one line and returns -1, so callers can `return config_err(...)`. */
static int
config_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -1;
}

static const struct config_key *
config_find(const char *name)
{
	const struct config_key *k;

	for (k = config_table; k->name; k++)
		if (strcmp(k->name, name) == 0)
			return k;
	return NULL;
}

const char *
config_fmt_addr(const struct config_addr *a, char *buf, size_t len)
{
	snprintf(buf, len, strchr(a->host, ':') ? "[%s]:%s" : "%s:%s", a->host, a->port);
	return buf;
}

/* Host names and literals only: this rejects URL debris such as "user@". */
static int
config_host_ok(const char *host, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (!isalnum((unsigned char)host[i]) && !strchr(".-_:%", host[i]))
			return 0;
	return 1;
}

/*
 * Parse an address into out. Returns NULL or why it is wrong. A NULL
 * default_port makes the port mandatory; "" leaves a missing one empty.
 */
static const char *
config_addr_reason(const char *s, const char *default_port, struct config_addr *out)
{
	struct config_addr a;
	const char *host, *port, *colon;
	size_t hlen;
	unsigned long n;
	char *end;

	if (*s == '[') {
		const char *close = strchr(s, ']');

		if (!close)
			return "missing ']'";
		host = s + 1;
		hlen = (size_t)(close - host);
		if (close[1] == ':')
			port = close + 2;
		else if (close[1] == '\0')
			port = NULL;
		else
			return "expected ':' after ']'";
	} else {
		colon = strchr(s, ':');
		/* "::1:143" cannot be split safely: insist on brackets. */
		if (colon && strchr(colon + 1, ':'))
			return "IPv6 address needs brackets, as in [::1]:143";
		host = s;
		hlen = colon ? (size_t)(colon - s) : strlen(s);
		port = colon ? colon + 1 : NULL;
	}
	if (hlen == 0)
		return "missing host";
	if (hlen >= sizeof a.host)
		return "host name too long";
	if (!config_host_ok(host, hlen))
		return "bad host";

	memset(&a, 0, sizeof a);
	memcpy(a.host, host, hlen);
	if (port && *port == '\0')
		return "missing port";
	if (port) {
		if (!isdigit((unsigned char)*port) || strlen(port) > 5)
			return "port not in 1..65535";
		n = strtoul(port, &end, 10);
		if (*end || n < 1 || n > 65535)
			return "port not in 1..65535";
		snprintf(a.port, sizeof a.port, "%lu", n);
	} else if (!default_port) {
		return "missing port";
	} else {
		snprintf(a.port, sizeof a.port, "%s", default_port);
	}
	*out = a;
	return NULL;
}

int
config_parse_addr(const char *s, const char *default_port, struct config_addr *out)
{
	return config_addr_reason(s, default_port, out) ? -1 : 0;
}

/* What config_redis_reason() says of a value that is no Redis URL at all. */
static const char config_redis_expected[] = "memory, redis://[[user]:password@]host[:port][/db], "
    "redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]"
    "host[:port][,host[:port]...]/master[/db]";

static int
config_hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Percent-decode s[0..len) into out (NUL-terminated); NULL or why not. */
static const char *
config_pct_decode(const char *s, size_t len, char *out, size_t outlen, const char *what)
{
	static char why[128];
	size_t i, o = 0;
	int hi, lo;

	for (i = 0; i < len; i++) {
		char c = s[i];

		if (c == '%') {
			if (i + 2 >= len || (hi = config_hexval(s[i + 1])) < 0 ||
			    (lo = config_hexval(s[i + 2])) < 0) {
				snprintf(why, sizeof why, "a %s whose '%%' starts a %%XX escape (write "
				    "'%%' itself as %%25)", what);
				return why;
			}
			c = (char)(hi << 4 | lo);
			i += 2;
			if (c == '\0') {
				snprintf(why, sizeof why, "a %s without %%00", what);
				return why;
			}
		}
		if (o + 1 >= outlen) {
			snprintf(why, sizeof why, "a %s of at most %zu bytes", what, outlen - 1);
			return why;
		}
		out[o++] = c;
	}
	out[o] = '\0';
	return NULL;
}

const char *
config_url_userinfo(const char *s, struct config_redis_auth *auth, const char **rest)
{
	const char *aend = s + strcspn(s, "/"), *at = NULL, *colon, *why, *p;

	memset(auth, 0, sizeof *auth);
	*rest = s;
	/* The authority ends at the first '/': the last '@' before it ends the
	 * userinfo, so a raw '@' or ':' in the password needs no escaping. */
	for (p = s; p < aend; p++)
		if (*p == '@')
			at = p;
	if (!at)
		return NULL;
	colon = memchr(s, ':', (size_t)(at - s));
	if (!colon)
		return "user:password@ or :password@ before the host (a name alone before '@' "
		    "is a password to some clients, a user to others: write which)";
	if (colon == s && at == colon + 1)
		return "a password after ':' in :password@";
	if ((why = config_pct_decode(s, (size_t)(colon - s), auth->user, sizeof auth->user,
	    "user")) || (why = config_pct_decode(colon + 1, (size_t)(at - colon - 1),
	    auth->password, sizeof auth->password, "password")))
		return why;
	*rest = at + 1;
	return NULL;
}

const char *
config_redact_url(const char *url, char *buf, size_t len)
{
	const char *start = strstr(url, "://"), *at = strrchr(url, '@'), *colon;

	/* "scheme:///path": no userinfo, an '@' is the path's. */
	if (!start || !at || at < start + 3 || start[3] == '/') {
		snprintf(buf, len, "%s", url);
		return buf;
	}
	start += 3;
	colon = memchr(start, ':', (size_t)(at - start));
	/* The user stays when it is plainly one (no '/' in it, a ':' after). */
	if (colon && !memchr(start, '/', (size_t)(colon - start)))
		snprintf(buf, len, "%.*s:***%s", (int)(colon - url), url, at);
	else
		snprintf(buf, len, "%.*s***%s", (int)(start - url), url, at);
	return buf;
}

int
config_auth_argv(const struct config_redis_auth *auth, const char *argv[3], size_t argvlen[3])
{
	int n = 0;

	if (!auth->password[0])
		return 0;
	argv[n] = "AUTH";
	argvlen[n++] = 4;
	if (auth->user[0]) {
		argv[n] = auth->user;
		argvlen[n++] = strlen(auth->user);
	}
	argv[n] = auth->password;
	argvlen[n++] = strlen(auth->password);
	return n;
}

int
config_auth_unneeded(const char *error)
{
	return strstr(error, "without any password configured") != NULL ||
	    strstr(error, "no password is set") != NULL;
}

const char *
config_redis_reason(const char *url, struct config_redis *out)
{
	static const char tcp[] = "redis://", unix_[] = "redis+unix://";
	const char *expected = config_redis_expected;
	struct config_redis r;
	struct config_addr a;
	char hostport[sizeof a.host + sizeof a.port + 4];
	const char *rest, *slash, *why;
	unsigned long db = 0;
	char *end;

	memset(&r, 0, sizeof r);
	if (strncmp(url, unix_, sizeof unix_ - 1) == 0) {
		rest = url + sizeof unix_ - 1;
		if ((why = config_url_userinfo(rest, &r.auth, &rest)))
			return why;
		if (rest[0] != '/' || rest[1] == '\0' || strlen(rest) >= sizeof r.path)
			return expected;
		snprintf(r.path, sizeof r.path, "%s", rest);
	} else if (strncmp(url, tcp, sizeof tcp - 1) == 0) {
		rest = url + sizeof tcp - 1;
		if ((why = config_url_userinfo(rest, &r.auth, &rest)))
			return why;
		/* A '/' in the password cut the authority short. */
		if (rest == url + sizeof tcp - 1 && strchr(rest, '@'))
			return "a user and password with any '/' written %2F";
		slash = strchr(rest, '/');
		if (!slash)
			slash = rest + strlen(rest);
		if ((size_t)(slash - rest) >= sizeof hostport)
			return expected;
		memcpy(hostport, rest, (size_t)(slash - rest));
		hostport[slash - rest] = '\0';
		if (config_addr_reason(hostport, "6379", &a))
			return expected;
		/* "/" alone is db 0, as redis-cli reads it. */
		if (*slash && slash[1]) {
			if (!isdigit((unsigned char)slash[1]) || strlen(slash + 1) > 9)
				return expected;
			db = strtoul(slash + 1, &end, 10);
			if (*end)
				return expected;
		}
		memcpy(r.host, a.host, sizeof r.host);
		memcpy(r.port, a.port, sizeof r.port);
		r.db = (int)db;
	} else {
		return expected;
	}
	if (out)
		*out = r;
	return NULL;
}

int
config_parse_redis(const char *url, struct config_redis *out)
{
	return config_redis_reason(url, out) ? -1 : 0;
}

static const char *
config_check_state(const char *value)
{
	struct config_redis_auth auth;
	const char *why, *rest, *uwhy;

	if (strcmp(value, "memory") == 0 || !(why = config_redis_reason(value, NULL)) ||
	    sentinel_parse_url(value, NULL) == 0)
		return NULL;
	if (strncmp(value, "redis-sentinel://", 17) == 0 &&
	    (uwhy = config_url_userinfo(value + 17, &auth, &rest)))
		return uwhy;
	return why;
}

static const char *
config_check_optional_redis(const char *value)
{
	const char *why;

	if (value[0] == '\0' || !(why = config_redis_reason(value, NULL)))
		return NULL;
	if (why != config_redis_expected)
		return why;
	return "empty, redis://[[user]:password@]host[:port][/db] or "
	    "redis+unix://[[user]:password@]/path";
}

static const char *
config_check_http_url(const char *value)
{
	struct config_http_url u;

	if (value[0] == '\0' || config_parse_http_url(value, &u) == 0)
		return NULL;
	return "empty or http://host[:port][/path] (no TLS: keep the API on a private link)";
}

int
config_parse_http_url(const char *url, struct config_http_url *out)
{
	static const char http[] = "http://";
	const char *rest, *slash;
	char hostport[sizeof out->host + sizeof out->port + 4];
	struct config_addr a;

	if (strncmp(url, http, sizeof http - 1) != 0)
		return -1;
	rest = url + sizeof http - 1;
	slash = rest + strcspn(rest, "/");
	if (slash == rest || (size_t)(slash - rest) >= sizeof hostport ||
	    strlen(slash) >= sizeof out->path)
		return -1;
	memcpy(hostport, rest, (size_t)(slash - rest));
	hostport[slash - rest] = '\0';
	if (config_addr_reason(hostport, "80", &a))
		return -1;
	memcpy(out->host, a.host, sizeof out->host);
	memcpy(out->port, a.port, sizeof out->port);
	snprintf(out->path, sizeof out->path, "%s", slash);
	/* no trailing slash: paths are appended as "/users/..." */
	for (size_t n = strlen(out->path); n > 0 && out->path[n - 1] == '/'; n--)
		out->path[n - 1] = '\0';
	return 0;
}

/* One resync_on item, trimmed: a command word (letters, digits, '-'),
 * optionally after "UID" and blanks. Returns the word's length, or 0. */
static size_t
config_command_item(const char *s, size_t len)
{
	size_t i = 0, word;

	if (len > 3 && strncasecmp(s, "UID", 3) == 0 && (s[3] == ' ' || s[3] == '\t')) {
		for (i = 3; i < len && (s[i] == ' ' || s[i] == '\t'); i++)
			;
	}
	for (word = i; i < len && (isalnum((unsigned char)s[i]) || s[i] == '-'); i++)
		;
	if (i != len || i == word)
		return 0;
	/* A bare "UID" names no command. */
	if (word == 0 && len == 3 && strncasecmp(s, "UID", 3) == 0)
		return 0;
	return len;
}

/*
 * Walk the comma-separated items of a resync_on value; with out, write the
 * normalised list there ("UID  fetch ,x" -> "UID FETCH, X"). Returns 0, or
 * -1 on a bad item or when out is too small.
 */
static int
config_commands(const char *value, char *out, size_t outlen)
{
	const char *p = value, *end;
	size_t used = 0, len, i;

	for (;;) {
		end = strchr(p, ',');
		if (!end)
			end = p + strlen(p);
		while (p < end && isspace((unsigned char)*p))
			p++;
		len = (size_t)(end - p);
		while (len && isspace((unsigned char)p[len - 1]))
			len--;
		if (!config_command_item(p, len))
			return -1;
		if (out) {
			if (used + len + 3 > outlen)
				return -1;
			if (used) {
				memcpy(out + used, ", ", 2);
				used += 2;
			}
			for (i = 0; i < len; i++) {
				/* Blanks after UID collapse to one space. */
				if (isspace((unsigned char)p[i]) && isspace((unsigned char)p[i + 1]))
					continue;
				out[used++] = isspace((unsigned char)p[i]) ? ' '
				    : (char)toupper((unsigned char)p[i]);
			}
			out[used] = '\0';
		}
		if (*end == '\0')
			return 0;
		p = end + 1;
	}
}

static const char *
config_check_commands(const char *value)
{
	if (config_commands(value, NULL, 0) == 0)
		return NULL;
	return "comma-separated IMAP commands, as in FETCH, UID FETCH";
}

/* Keys are "<prefix>{<user>}:...": a brace in the prefix would move the
 * Redis Cluster hash tag off the user name. */
static const char *
config_check_prefix(const char *value)
{
	for (; *value; value++)
		if (*value <= ' ' || *value >= 0x7f || *value == '{' || *value == '}')
			return "printable characters without spaces or braces";
	return NULL;
}

/* "" or host:port, as listen takes it. */
static const char *
config_check_optional_addr(const char *value)
{
	struct config_addr a;

	if (*value == '\0' || config_parse_addr(value, NULL, &a) == 0)
		return NULL;
	return "empty or host:port";
}

/* off | all | user NAME | client ADDR, optionally followed by "bodies". */
static const char *
config_check_trace(const char *value)
{
	char buf[300], *w[4], *save = NULL;
	int n = 0;

	snprintf(buf, sizeof(buf), "%s", value);
	for (char *t = strtok_r(buf, " ", &save); t != NULL; t = strtok_r(NULL, " ", &save)) {
		if (n == 4)
			return "off, all, user NAME or client ADDR, optionally followed by bodies";
		w[n++] = t;
	}
	if (n > 0 && strcmp(w[n - 1], "bodies") == 0)
		n--;
	if ((n == 1 && (strcmp(w[0], "off") == 0 || strcmp(w[0], "all") == 0)) ||
	    (n == 2 && (strcmp(w[0], "user") == 0 || strcmp(w[0], "client") == 0)))
		return NULL;
	return "off, all, user NAME or client ADDR, optionally followed by bodies";
}

/* Comma-separated IPv4/IPv6 networks: 10.0.0.0/8, ::1, 192.0.2.7 */
static const char *
config_check_cidrs(const char *value)
{
	char buf[1024], *save = NULL;
	const char *msg = "comma-separated addresses or networks, as in 10.0.0.0/8, ::1";

	snprintf(buf, sizeof(buf), "%s", value);
	for (char *t = strtok_r(buf, ", ", &save); t != NULL; t = strtok_r(NULL, ", ", &save)) {
		unsigned char addr[16];
		char *slash = strchr(t, '/');
		int v6 = strchr(t, ':') != NULL;
		long bits = -1;

		if (slash != NULL) {
			char *end;
			*slash = '\0';
			bits = strtol(slash + 1, &end, 10);
			if (*end != '\0' || end == slash + 1 || bits < 0 || bits > (v6 ? 128 : 32))
				return msg;
		}
		if (inet_pton(v6 ? AF_INET6 : AF_INET, t, addr) != 1)
			return msg;
	}
	return NULL;
}

/* The instance name travels in tab-separated messages and in keys. */
static const char *
config_check_instance(const char *value)
{
	for (; *value; value++)
		if (!isalnum((unsigned char)*value) && !strchr(".-_", *value))
			return "letters, digits, '.', '-' and '_'";
	return NULL;
}

/* Largest value a numeric field holds, used when a row leaves max at 0. */
static uint64_t
config_capacity(const struct config_key *k)
{
	return k->size >= sizeof(uint64_t) ? UINT64_MAX : INT_MAX;
}

static uint64_t
config_max(const struct config_key *k)
{
	return k->max ? k->max : config_capacity(k);
}

/* Digits with at most one unit suffix. Returns 0, -1 on bad syntax, -2 on overflow. */
static int
config_parse_number(const char *s, const struct config_unit *units, uint64_t *out)
{
	uint64_t v = 0, mult = 1;
	const char *p = s;

	if (!isdigit((unsigned char)*p))
		return -1;
	for (; isdigit((unsigned char)*p); p++) {
		if (v > (UINT64_MAX - (uint64_t)(*p - '0')) / 10)
			return -2;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	if (*p) {
		for (; units && units->mult; units++)
			if (units->suffix == *p)
				break;
		if (!units || !units->mult || p[1])
			return -1;
		mult = units->mult;
	}
	if (v > UINT64_MAX / mult)
		return -2;
	*out = v * mult;
	return 0;
}

/* A number as the user would write it: 16M rather than 16777216. */
static const char *
config_fmt_number(const struct config_key *k, uint64_t v, char *buf, size_t len)
{
	const struct config_unit *u = k->type == CONFIG_T_SIZE ? config_size_print
	    : k->type == CONFIG_T_DURATION ? config_duration_print : NULL;

	for (; u && u->mult; u++)
		if (v && v % u->mult == 0) {
			snprintf(buf, len, "%" PRIu64 "%c", v / u->mult, u->suffix);
			return buf;
		}
	snprintf(buf, len, "%" PRIu64, v);
	return buf;
}

static void
config_store(void *field, size_t size, uint64_t v)
{
	if (size >= sizeof(uint64_t)) {
		uint64_t x = v;

		memcpy(field, &x, sizeof x);
	} else {
		uint32_t x = (uint32_t)v;

		memcpy(field, &x, sizeof x);
	}
}

/* "a, b or c", for messages listing what was expected. */
static const char *
config_fmt_choices(const char *const *choices, char *buf, size_t len)
{
	size_t used = 0;
	int i;

	buf[0] = '\0';
	for (i = 0; choices[i] && used < len; i++)
		used += (size_t)snprintf(buf + used, len - used, "%s%s",
		    i == 0 ? "" : choices[i + 1] ? ", " : " or ", choices[i]);
	return buf;
}

static int
config_set_number(struct config *cfg, const struct config_key *k, const char *value,
    char *err, size_t errlen)
{
	static const char *const noun[] = {
		[CONFIG_T_INT] = "an integer", [CONFIG_T_SIZE] = "a size",
		[CONFIG_T_DURATION] = "a duration",
	};
	const struct config_unit *units = k->type == CONFIG_T_SIZE ? config_size_units
	    : k->type == CONFIG_T_DURATION ? config_duration_units : NULL;
	char lo[32], hi[32];
	uint64_t v = 0;
	int rc = config_parse_number(value, units, &v);

	if (rc == -1)
		return config_err(err, errlen, "%s: not %s: %s", k->name, noun[k->type], value);
	/* Unbounded keys only say which side is wrong; bounded ones show the range. */
	if (k->max == 0 && (rc == -2 || v > config_max(k)))
		return config_err(err, errlen, "%s: too large: %s", k->name, value);
	if (k->max == 0 && v < k->min)
		return config_err(err, errlen, "%s: must be at least %s, got %s", k->name,
		    config_fmt_number(k, k->min, lo, sizeof lo), value);
	if (rc == -2 || v < k->min || v > config_max(k))
		return config_err(err, errlen, "%s: %s out of range %s..%s", k->name, value,
		    config_fmt_number(k, k->min, lo, sizeof lo),
		    config_fmt_number(k, k->max, hi, sizeof hi));
	config_store((char *)cfg + k->offset, k->size, v);
	return 0;
}

static int
config_set_addrs(struct config *cfg, const struct config_key *k, const char *value,
    char *err, size_t errlen)
{
	struct config_addr *list = (struct config_addr *)((char *)cfg + k->offset);
	int *n = (int *)((char *)cfg + k->count_offset);
	size_t cap = k->size / sizeof *list;
	const char *why;

	/* Empty clears, so -o can replace the file's listeners instead of adding. */
	if (*value == '\0') {
		memset(list, 0, k->size);
		*n = 0;
		return 0;
	}
	if ((size_t)*n >= cap)
		return config_err(err, errlen, "%s: more than %zu addresses: %s", k->name, cap, value);
	if ((why = config_addr_reason(value, NULL, &list[*n])))
		return config_err(err, errlen, "%s: %s: %s", k->name, why, value);
	(*n)++;
	return 0;
}

/* Apply one value to its field; no derived defaults yet. */
static int
config_apply(struct config *cfg, const struct config_key *k, const char *value,
    char *err, size_t errlen)
{
	void *field = (char *)cfg + k->offset;
	char choices[128], normal[1024];
	const char *why;
	size_t i, len;

	switch (k->type) {
	case CONFIG_T_ADDRS:
		return config_set_addrs(cfg, k, value, err, errlen);
	case CONFIG_T_ADDR:
		if (*value == '\0') {
			memset(field, 0, k->size);
			return 0;
		}
		/* "" keeps a missing port empty for config_derive() to fill. */
		if ((why = config_addr_reason(value, "", field)))
			return config_err(err, errlen, "%s: %s: %s", k->name, why, value);
		return 0;
	case CONFIG_T_STRING:
		/* Command lists are stored normalised; a bad one fails the check below. */
		if (k->check == config_check_commands
		    && config_commands(value, normal, sizeof normal) == 0)
			value = normal;
		len = strlen(value);
		if (len >= k->size)
			return config_err(err, errlen, "%s: too long (max %zu bytes)", k->name, k->size - 1);
		if (len < k->min)
			return config_err(err, errlen, "%s: must not be empty", k->name);
		if (k->check && (why = k->check(value))) {
			char shown[1100];

			/* A URL's password stays out of the message. */
			if (k->check == config_check_state || k->check == config_check_optional_redis)
				value = config_redact_url(value, shown, sizeof shown);
			return config_err(err, errlen, "%s: expected %s, got \"%s\"", k->name, why, value);
		}
		memcpy(field, value, len + 1);
		return 0;
	case CONFIG_T_BOOL:
		for (i = 0; i < sizeof config_bool_words / sizeof *config_bool_words; i++)
			if (strcasecmp(value, config_bool_words[i].word) == 0) {
				config_store(field, k->size, (uint64_t)config_bool_words[i].value);
				return 0;
			}
		return config_err(err, errlen, "%s: expected yes or no, got \"%s\"", k->name, value);
	case CONFIG_T_ENUM:
		for (i = 0; k->choices[i]; i++)
			if (strcasecmp(value, k->choices[i]) == 0) {
				config_store(field, k->size, i);
				return 0;
			}
		return config_err(err, errlen, "%s: expected %s, got \"%s\"", k->name,
		    config_fmt_choices(k->choices, choices, sizeof choices), value);
	case CONFIG_T_INT:
	case CONFIG_T_SIZE:
	case CONFIG_T_DURATION:
		return config_set_number(cfg, k, value, err, errlen);
	}
	return config_err(err, errlen, "%s: unhandled key type", k->name);
}

/* upstream_sa from upstream's host and port, if the host is an address. */
static void
config_derive_upstream_sa(struct config *cfg)
{
	struct sockaddr_in *in4 = (struct sockaddr_in *)&cfg->upstream_sa;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&cfg->upstream_sa;
	uint16_t port = htons((uint16_t)atoi(cfg->upstream.port));

	memset(&cfg->upstream_sa, 0, sizeof cfg->upstream_sa);
	cfg->upstream_salen = 0;
	if (inet_pton(AF_INET, cfg->upstream.host, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = port;
		cfg->upstream_salen = sizeof *in4;
	} else if (inet_pton(AF_INET6, cfg->upstream.host, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = port;
		cfg->upstream_salen = sizeof *in6;
	}
}

/*
 * Keys whose default depends on another key. Setting the key itself pins
 * it (or, when empty, hands it back to the default); after any key, the
 * unpinned ones are recomputed so the order of keys does not matter.
 */
static void
config_derive(struct config *cfg, const struct config_key *k)
{
	if (k->offset == offsetof(struct config, upstream))
		cfg->upstream_port_auto = cfg->upstream.port[0] == '\0';
	if (k->offset == offsetof(struct config, tls_key))
		cfg->tls_key_auto = cfg->tls_key[0] == '\0';
	if (cfg->upstream_port_auto)
		snprintf(cfg->upstream.port, sizeof cfg->upstream.port, "%s",
		    cfg->upstream_tls == UPSTREAM_TLS_TLS ? "993" : "143");
	if (cfg->tls_key_auto)
		snprintf(cfg->tls_key, sizeof cfg->tls_key, "%s", cfg->tls_cert);
	config_derive_upstream_sa(cfg);
}

int
config_set(struct config *cfg, const char *key, const char *value, char *err, size_t errlen)
{
	const struct config_key *k = config_find(key);

	if (!k)
		return config_err(err, errlen, "unknown key \"%s\"", key);
	if (config_apply(cfg, k, value, err, errlen) < 0)
		return -1;
	config_derive(cfg, k);
	return 0;
}

void
config_defaults(struct config *cfg)
{
	const struct config_key *k;
	char err[256];
	int rc;

	memset(cfg, 0, sizeof *cfg);
	cfg->upstream_port_auto = 1;
	cfg->tls_key_auto = 1;
	for (k = config_table; k->name; k++) {
		if (!k->def)
			continue;
		/* Defaults go through the parser; only a bad table row fails here. */
		rc = config_set(cfg, k->name, k->def, err, sizeof err);
		assert(rc == 0);
		(void)rc;
	}
}

static char *
config_trim(char *s)
{
	char *end;

	while (isspace((unsigned char)*s))
		s++;
	end = s + strlen(s);
	while (end > s && isspace((unsigned char)end[-1]))
		*--end = '\0';
	return s;
}

int
config_set_option(struct config *cfg, const char *assignment, char *err, size_t errlen)
{
	char *copy, *key, *raw, *value, *p;
	int rc;

	if (!(copy = strdup(assignment)))
		return config_err(err, errlen, "out of memory");
	if (!(raw = strchr(copy, '='))) {
		rc = config_err(err, errlen, "expected key = value, got \"%s\"", config_trim(copy));
		goto out;
	}
	*raw++ = '\0';
	key = config_trim(copy);
	if (*key == '\0') {
		rc = config_err(err, errlen, "missing key before '='");
		goto out;
	}
	value = raw;
	while (isspace((unsigned char)*value))
		value++;
	if (*value == '"') {
		/* Quoted: taken verbatim, '#' included; only a comment may follow. */
		value++;
		if (!(p = strchr(value, '"'))) {
			rc = config_err(err, errlen, "%s: missing closing quote", key);
			goto out;
		}
		*p++ = '\0';
		while (isspace((unsigned char)*p))
			p++;
		if (*p && *p != '#') {
			rc = config_err(err, errlen, "%s: text after closing quote: %s", key, p);
			goto out;
		}
	} else {
		/* A '#' starts a comment only after whitespace, so "a#b" stays a value. */
		for (p = value; *p; p++)
			if (*p == '#' && p > raw && isspace((unsigned char)p[-1])) {
				*p = '\0';
				break;
			}
		value = config_trim(value);
	}
	rc = config_set(cfg, key, value, err, errlen);
out:
	free(copy);
	return rc;
}

/* One file line: blank and comment lines are skipped, the rest are assignments. */
static int
config_line(struct config *cfg, char *line, size_t len, char *err, size_t errlen)
{
	char *s;

	if (strlen(line) != len)
		return config_err(err, errlen, "NUL byte in line");
	s = config_trim(line);
	if (*s == '\0' || *s == '#')
		return 0;
	return config_set_option(cfg, s, err, errlen);
}

int
config_load_file(struct config *cfg, const char *path, char *err, size_t errlen)
{
	char msg[1400];
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	int lineno = 0, rc = 0;
	FILE *f;

	if (!(f = fopen(path, "r")))
		return config_err(err, errlen, "%s: %s", path, strerror(errno));
	while ((len = getline(&line, &cap, f)) != -1) {
		lineno++;
		if (config_line(cfg, line, (size_t)len, msg, sizeof msg) < 0) {
			rc = config_err(err, errlen, "%s:%d: %s", path, lineno, msg);
			break;
		}
	}
	if (rc == 0 && ferror(f))
		rc = config_err(err, errlen, "%s: %s", path, strerror(errno));
	free(line);
	fclose(f);
	return rc;
}

/* Certificates and CAs are read later, after privileges may be gone: fail now. */
static int
config_check_file(const char *key, const char *path, char *err, size_t errlen)
{
	struct stat st;
	int fd;

	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return config_err(err, errlen, "%s: cannot read %s: %s", key, path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return config_err(err, errlen, "%s: not a regular file: %s", key, path);
	}
	close(fd);
	return 0;
}

/* Any address in both listener lists, or twice in one: bind() would fail later. */
static const struct config_addr *
config_duplicate_listener(const struct config *cfg)
{
	const struct config_addr *all[2 * CONFIG_MAX_LISTEN];
	int n = 0, i, j;

	for (i = 0; i < cfg->n_listen; i++)
		all[n++] = &cfg->listen[i];
	for (i = 0; i < cfg->n_listen_tls; i++)
		all[n++] = &cfg->listen_tls[i];
	for (i = 0; i < n; i++)
		for (j = i + 1; j < n; j++)
			if (!strcmp(all[i]->host, all[j]->host) && !strcmp(all[i]->port, all[j]->port))
				return all[i];
	return NULL;
}

/* The credentials of a Redis URL key against its *_password_file key:
 * one password, from one place. */
static int
config_validate_auth(const char *key, const char *url, const char *file, char *err, size_t errlen)
{
	struct config_redis r;
	struct sentinel_url su;
	const struct config_redis_auth *auth;
	char shown[1100];

	if (config_parse_redis(url, &r) == 0)
		auth = &r.auth;
	else if (sentinel_parse_url(url, &su) == 0)
		auth = &su.auth;
	else
		return 0;
	config_redact_url(url, shown, sizeof shown);
	if (auth->password[0] && file[0])
		return config_err(err, errlen, "%s: %s has a password and %s_password_file is set: "
		    "give it in one place", key, shown, key);
	if (auth->user[0] && !auth->password[0] && !file[0])
		return config_err(err, errlen, "%s: %s names user \"%s\" without a password: write "
		    "user:PASSWORD@ or set %s_password_file", key, shown, auth->user, key);
	return 0;
}

int
config_validate(const struct config *cfg, char *err, size_t errlen)
{
	const struct config_key *k;
	const struct config_addr *dup;
	char addr[300];

	if (cfg->n_listen + cfg->n_listen_tls == 0)
		return config_err(err, errlen, "listen: no listener; set listen or listen_tls");
	if ((dup = config_duplicate_listener(cfg)))
		return config_err(err, errlen, "listen: %s given twice",
		    config_fmt_addr(dup, addr, sizeof addr));
	if (cfg->upstream.host[0] == '\0')
		return config_err(err, errlen, "upstream: not set; it is required (host[:port])");
	if (cfg->n_listen_tls && !cfg->tls_cert[0])
		return config_err(err, errlen, "listen_tls: %s needs tls_cert",
		    config_fmt_addr(&cfg->listen_tls[0], addr, sizeof addr));
	if (!cfg->tls_cert[0] && cfg->tls_key[0])
		return config_err(err, errlen, "tls_key: set without tls_cert");
	if (cfg->require_tls && cfg->n_listen && !cfg->tls_cert[0])
		return config_err(err, errlen, "require_tls: plaintext listener %s cannot offer "
		    "STARTTLS without tls_cert; set tls_cert or require_tls = no",
		    config_fmt_addr(&cfg->listen[0], addr, sizeof addr));
	for (k = config_table; k->name; k++) {
		const char *path = (const char *)cfg + k->offset;

		if (k->file && path[0] && config_check_file(k->name, path, err, errlen) < 0)
			return -1;
	}
	if (config_validate_auth("state", cfg->state, cfg->state_password_file, err, errlen) < 0 ||
	    config_validate_auth("backend_redis", cfg->backend_redis,
	    cfg->backend_redis_password_file, err, errlen) < 0)
		return -1;
	if (cfg->sentinel_password[0] && cfg->sentinel_password_file[0])
		return config_err(err, errlen, "sentinel_password: set, and sentinel_password_file "
		    "too: give it in one place");
	if (cfg->sentinel_user[0] && !cfg->sentinel_password[0] && !cfg->sentinel_password_file[0])
		return config_err(err, errlen, "sentinel_user: set without sentinel_password");
	if (cfg->workers > 1 && strcmp(cfg->state, "memory") == 0)
		return config_err(err, errlen, "workers: %d workers need state = redis://...: a "
		    "user's sessions may be in different workers, which share mailbox changes "
		    "only through Redis", cfg->workers);
	if (cfg->user[0] && !getpwnam(cfg->user))
		return config_err(err, errlen, "user: no such user \"%s\"", cfg->user);
	if (cfg->upstream_tls == UPSTREAM_TLS_TLS &&
	    (cfg->upstream_client_address == CLIENT_ADDRESS_PROXY_V1 ||
	    cfg->upstream_client_address == CLIENT_ADDRESS_PROXY_V2))
		return config_err(err, errlen, "upstream_client_address: a PROXY header cannot "
		    "precede upstream_tls = tls; use id, or upstream_tls = starttls");
	if (cfg->backend_events == BACKEND_EVENTS_WILDDUCK &&
	    (!cfg->backend_redis[0] || !cfg->backend_api[0]))
		return config_err(err, errlen, "backend_events: wildduck needs backend_redis (its "
		    "Redis, where it publishes wd_events) and backend_api (to resolve login names "
		    "to user ids)");
	return 0;
}

static int config_warn(void (*warn)(void *, const char *), void *arg, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
config_warn(void (*warn)(void *, const char *), void *arg, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (warn)
		warn(arg, msg);
	return 1;
}

/* The first line of a secret file into out; -1 with err set (naming key). */
static int
config_read_secret(const char *key, const char *path, char *out, size_t outlen, char *err,
    size_t errlen)
{
	char buf[1024];
	size_t n, len;
	FILE *f;

	if (!(f = fopen(path, "re")))
		return config_err(err, errlen, "%s: cannot read %s: %s", key, path, strerror(errno));
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = '\0';
	len = strcspn(buf, "\r\n");
	if (memchr(buf, '\0', len) || len == 0) {
		explicit_bzero(buf, sizeof buf);
		return config_err(err, errlen, "%s: %s: no password on its first line", key, path);
	}
	if (len >= outlen) {
		explicit_bzero(buf, sizeof buf);
		return config_err(err, errlen, "%s: %s: password longer than %zu bytes", key, path,
		    outlen - 1);
	}
	memcpy(out, buf, len);
	out[len] = '\0';
	explicit_bzero(buf, sizeof buf);
	return 0;
}

int
config_load_secrets(struct config *cfg, char *err, size_t errlen)
{
	if (cfg->state_password_file[0] && config_read_secret("state_password_file",
	    cfg->state_password_file, cfg->state_password, sizeof cfg->state_password, err,
	    errlen) < 0)
		return -1;
	if (cfg->backend_redis_password_file[0] && config_read_secret("backend_redis_password_file",
	    cfg->backend_redis_password_file, cfg->backend_redis_password,
	    sizeof cfg->backend_redis_password, err, errlen) < 0)
		return -1;
	if (cfg->sentinel_password_file[0] && config_read_secret("sentinel_password_file",
	    cfg->sentinel_password_file, cfg->sentinel_password, sizeof cfg->sentinel_password,
	    err, errlen) < 0)
		return -1;
	return 0;
}

int
config_warnings(const struct config *cfg, void (*warn)(void *arg, const char *msg), void *arg)
{
	char addr[300];
	int n = 0;

	if (cfg->timeout_idle < 30 * 60)
		n += config_warn(warn, arg, "timeout_idle: below the 30 minutes RFC 9051 requires");
	if (!cfg->require_tls && cfg->n_listen)
		n += config_warn(warn, arg, "require_tls: no; passwords may cross plaintext "
		    "listener %s in the clear", config_fmt_addr(&cfg->listen[0], addr, sizeof addr));
	if ((cfg->sentinel_password[0] || cfg->sentinel_password_file[0]) &&
	    strncmp(cfg->state, "redis-sentinel://", 17) != 0)
		n += config_warn(warn, arg, "sentinel_password: ignored without state = "
		    "redis-sentinel://");
	if (cfg->upstream_tls == UPSTREAM_TLS_NONE) {
		if (cfg->upstream_ca[0])
			n += config_warn(warn, arg, "upstream_ca: ignored with upstream_tls = none");
		if (cfg->upstream_sni[0])
			n += config_warn(warn, arg, "upstream_sni: ignored with upstream_tls = none");
	} else if (!cfg->upstream_tls_verify) {
		n += config_warn(warn, arg, "upstream_tls_verify: no; the IMAP server's "
		    "certificate is not checked");
	}
	return n;
}
