/* config: the daemon's settings, parsed from a key = value file and -o overrides. */
#ifndef CONFIG_H
#define CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CONFIG_MAX_LISTEN 16

enum upstream_tls_mode {
	UPSTREAM_TLS_NONE,
	UPSTREAM_TLS_STARTTLS,
	UPSTREAM_TLS_TLS,
};

enum backend_events_mode {
	BACKEND_EVENTS_NONE,
	BACKEND_EVENTS_WILDDUCK,	/* WildDuck's wd_events on its Redis */
};

enum client_address_mode {
	CLIENT_ADDRESS_NONE,	/* the upstream sees imapfresh's address */
	CLIENT_ADDRESS_ID,	/* ID ("x-originating-ip" ...) before the first command */
	CLIENT_ADDRESS_PROXY_V1,	/* PROXY protocol v1 header on connect */
	CLIENT_ADDRESS_PROXY_V2,	/* PROXY protocol v2 header on connect */
};

enum log_level {
	LOG_LEVEL_ERROR,
	LOG_LEVEL_WARNING,
	LOG_LEVEL_NOTICE,
	LOG_LEVEL_INFO,
	LOG_LEVEL_DEBUG,
};

struct config_addr {
	char host[256];		/* literal IPv4/IPv6 address or name, no brackets */
	char port[16];
};

struct config {
	/* listeners */
	struct config_addr listen[CONFIG_MAX_LISTEN];
	int n_listen;
	struct config_addr listen_tls[CONFIG_MAX_LISTEN];
	int n_listen_tls;

	/* client-side TLS */
	char tls_cert[1024];	/* PEM chain; "" = no TLS offered */
	char tls_key[1024];
	char tls_ciphers[512];	/* TLS 1.2 cipher list (OpenSSL syntax) */
	int require_tls;	/* LOGIN/AUTHENTICATE only over TLS */
	char secure_networks[1024];	/* CIDRs secure without TLS (loopback, like Dovecot) */

	/* upstream */
	struct config_addr upstream;
	enum upstream_tls_mode upstream_tls;
	int upstream_tls_verify;
	char upstream_ca[1024];	/* CA file; "" = system default store */
	char upstream_sni[256];	/* "" = upstream host when it is a name */

	/* state */
	char state[1024];	/* "memory", redis://[[user]:password@]host[:port][/db] or
				   redis+unix://[[user]:password@]/path (config_parse_redis),
				   redis-sentinel://[[user]:password@]host[:port],.../master[/db]
				   (sentinel_parse_url); print it through config_redact_url() */
	char state_password_file[1024];	/* the state store's password, instead of the URL's */
	char sentinel_user[128];	/* the sentinels' own credentials (not the master's) */
	char sentinel_password[512];
	char sentinel_password_file[1024];

	/* limits */
	int max_clients;	/* per worker */
	int workers;		/* processes serving clients (workers.c) */
	int busy_poll;		/* microseconds of polling after traffic (loop.c) */
	size_t max_line;
	uint64_t max_literal;

	/* timeouts, in seconds */
	int timeout_connect;	/* upstream TCP connect */
	int timeout_tls_handshake;
	int timeout_preauth;	/* idle before authentication */
	int timeout_idle;	/* idle once authenticated, IDLE included */
	int upgrade_drain_timeout;	/* the old process's sessions after an upgrade (upgrade.c) */

	/* stale-session fix */
	int resync;			/* resync stale sessions at all */
	char resync_on[256];		/* trigger commands: "GETQUOTAROOT, FETCH, UID FETCH" */
	int resync_after;		/* seconds; 0 = only on detected changes */
	char redis_prefix[128];		/* key prefix, "imapfresh:" */
	int redis_publish_global;	/* changes on Pchanges too (rolling upgrades) */
	int select_wait;		/* ms a SELECT waits for the user's channel (session_client.c) */
	char instance_id[128];		/* this instance in keys and messages; "" = host name */
	int state_ttl;			/* seconds a session key outlives its last refresh */

	/* operations */
	char admin_listen[300];		/* host:port of the HTTP endpoint; "" = off */
	char admin_token[256];		/* bearer token required by it; "" = none */
	char event_log[1024];		/* sync events as JSON lines; "" = none */
	int event_stream_max;		/* Redis stream length for events; 0 = no stream */
	char trace[300];		/* which sessions are traced at start */
	char trace_file[1024];		/* where traces go; "" = the log */
	int trace_stream_max;		/* Redis stream length for traces; 0 = no stream */
	char proxy_protocol_trusted[1024];	/* CIDRs allowed to send a PROXY header */

	/* the backend's own change feed (feed.c) */
	enum backend_events_mode backend_events;
	char backend_redis[1024];	/* WildDuck's Redis URL, with credentials as state's */
	char backend_redis_password_file[1024];
	char backend_api[1024];		/* http://host[:port][/path] of its API */
	char backend_api_token[256];	/* X-Access-Token; "" = none */
	int backend_id_ttl;		/* seconds a resolved user id is kept */
	enum client_address_mode upstream_client_address;	/* how the upstream learns it */

	/* process */
	enum log_level log_level;
	char pid_file[1024];
	char user[64];		/* drop privileges to this user after binding; "" = stay */

	/* Derived defaults, kept current by every config_set(): while set, the
	 * field follows the key it depends on, whatever order keys come in. */
	int upstream_port_auto;	/* upstream.port is 143, or 993 with upstream_tls = tls */
	/* Passwords read from the *_password_file keys by config_load_secrets()
	 * ("" when the key is empty); sentinel_password_file's goes into
	 * sentinel_password. */
	char state_password[512];
	char backend_redis_password[512];
	int tls_key_auto;	/* tls_key is a copy of tls_cert (one combined PEM) */
	/* upstream as a socket address when its host is an address literal (it
	 * then needs no resolver); upstream_salen 0 when the host is a name. */
	struct sockaddr_storage upstream_sa;
	socklen_t upstream_salen;
};

/* How config_set() reads a value; one per row of config_table. */
enum config_type {
	CONFIG_T_ADDRS,		/* repeatable host:port, port required; "" clears the list */
	CONFIG_T_ADDR,		/* host[:port]; a missing port is derived (upstream) */
	CONFIG_T_STRING,	/* copied as is; min = minimum length */
	CONFIG_T_BOOL,		/* yes/no, true/false, on/off, 1/0 */
	CONFIG_T_ENUM,		/* one of choices[], stored as its index */
	CONFIG_T_INT,		/* decimal, within min..max */
	CONFIG_T_SIZE,		/* bytes, optional k/m/g suffix (binary), within min..max */
	CONFIG_T_DURATION,	/* seconds, optional s/m/h suffix, within min..max */
};

/* One key: everything the parser, the defaults and the docs check know about it. */
struct config_key {
	const char *name;
	enum config_type type;
	size_t offset;		/* of the field in struct config */
	size_t size;		/* of the field (the whole array for CONFIG_T_ADDRS) */
	size_t count_offset;	/* CONFIG_T_ADDRS: of the int counting the elements */
	const char *def;	/* default, in config-file syntax; NULL = empty/none */
	uint64_t min, max;	/* range for numbers (max 0 = what the field holds); min length for strings */
	const char *const *choices;	/* CONFIG_T_ENUM: NULL-terminated, in enum order */
	const char *(*check)(const char *value);	/* CONFIG_T_STRING: NULL if fine, else what was expected */
	int file;		/* CONFIG_T_STRING: a path config_validate() must be able to read */
	const char *help;	/* one line, for the docs */
};

/* The key table, terminated by a row with name == NULL. */
extern const struct config_key config_table[];

/* Set every key to its default. */
void config_defaults(struct config *cfg);

/* Apply one "key = value" assignment. On error returns -1 and writes one line
 * naming the key into err (e.g. "max_line: not a size: 12x"). Keys that may be
 * repeated (listen, listen_tls) append; others overwrite. */
int config_set(struct config *cfg, const char *key, const char *value, char *err, size_t errlen);

/* Apply one "key = value" text as a file line would (-o key=value): the
 * key and value are trimmed, a quoted value ("...") is unquoted, and an
 * unquoted value loses a trailing " # comment". */
int config_set_option(struct config *cfg, const char *assignment, char *err, size_t errlen);

/* Parse a file of "key = value" lines ('#' comments, blank lines). Errors are
 * prefixed with "FILE:LINE: ". */
int config_load_file(struct config *cfg, const char *path, char *err, size_t errlen);

/* Cross-key checks after everything is set (e.g. tls_key without tls_cert,
 * require_tls with a plaintext listener but no certificate, no upstream). */
int config_validate(const struct config *cfg, char *err, size_t errlen);

/* Report, one line each, settings that are legal but unwise (e.g. timeout_idle
 * under the 30 minutes RFC 9051 asks for). Returns how many were reported. */
int config_warnings(const struct config *cfg, void (*warn)(void *arg, const char *msg), void *arg);

/* Parse "host:port", "[v6]:port", "host"; default_port used when port is absent
 * (may be NULL: then a missing port is an error). Port must be 1..65535. */
int config_parse_addr(const char *s, const char *default_port, struct config_addr *out);

/* host:port for messages, bracketing IPv6 as a user would write it; returns buf. */
const char *config_fmt_addr(const struct config_addr *a, char *buf, size_t len);

/* What a Redis link sends first, before any other command: AUTH password,
 * or AUTH user password (Redis 6 ACL users). No AUTH when password is "". */
struct config_redis_auth {
	char user[128];
	char password[512];
};

/* A parsed "state" value other than "memory". */
struct config_redis {
	char host[256];		/* "" for a unix socket */
	char port[16];		/* default 6379 */
	char path[1024];	/* unix socket path, or "" */
	int db;			/* default 0 */
	struct config_redis_auth auth;	/* from the URL's user:password@, percent-decoded */
};

/* Parse redis://[[user]:password@]host[:port][/db] or
 * redis+unix://[[user]:password@]/path; -1 if it is neither. */
int config_parse_redis(const char *url, struct config_redis *out);
/* The same, saying what is wrong (NULL when it parses). */
const char *config_redis_reason(const char *url, struct config_redis *out);

/* The userinfo of a URL (s: what follows "scheme://"): the credentials of
 * "[user]:password@" percent-decoded into auth (zeroed without any), *rest
 * pointing after the '@' (at s without one). NULL, or why it is wrong. */
const char *config_url_userinfo(const char *s, struct config_redis_auth *auth, const char **rest);

/* url with its password (whatever sits between "://" and the last '@',
 * unless the authority is empty, as in redis+unix:///path) replaced by
 * "***", for logs and messages: redis://user:***@host/1. Returns buf. */
const char *config_redact_url(const char *url, char *buf, size_t len);

/* The AUTH command for auth as argv (argv[0] "AUTH"): its argc, 0 when
 * auth has no password (send nothing). */
int config_auth_argv(const struct config_redis_auth *auth, const char *argv[3], size_t argvlen[3]);

/* An error answered to AUTH that is no refusal: the server has no password
 * to check (Redis 6: "ERR AUTH <password> called without any password
 * configured ...", before: "ERR Client sent AUTH, but no password is set").
 * The link works without one: a password may be configured here before the
 * server requires it. */
int config_auth_unneeded(const char *error);

/* Read the *_password_file keys into state_password, backend_redis_password
 * and sentinel_password (the first line of each file, as is). At start and
 * on every reload, after config_validate(); the daemon has dropped its
 * privileges by a reload, so the files must be readable by its user. */
int config_load_secrets(struct config *cfg, char *err, size_t errlen);

/* A parsed http://host[:port][/path]. */
struct config_http_url {
	char host[256];
	char port[16];		/* default 80 */
	char path[512];		/* "" or "/prefix", no trailing slash */
};

int config_parse_http_url(const char *url, struct config_http_url *out);

/* Names of every key the parser accepts, NULL-terminated (for tests and docs checks). */
extern const char *const config_keys[];

#endif
