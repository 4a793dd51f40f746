/* test_config: checks config parsing, defaults, validation, warnings, and that every key is documented. */
#include "config.h"
#include "sentinel.h"
#include "tap.h"
#include <arpa/inet.h>
#include <netinet/in.h>

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LONG_VALUE "\x01long"	/* stands for a value one byte over the field */

static char err[2048];
static char tmpdir[256];

static int
set(struct config *cfg, const char *key, const char *value)
{
	err[0] = '\0';
	return config_set(cfg, key, value, err, sizeof err);
}

/* ok() that shows the error text when it fails. */
static void
ok_err(int cond, const char *what)
{
	if (!ok(cond, "%s", what))
		diag("err = \"%s\"", err);
}

static int
key_known(const char *key)
{
	int i;

	for (i = 0; config_keys[i]; i++)
		if (strcmp(config_keys[i], key) == 0)
			return 1;
	return 0;
}

static const struct config_key *
key_row(const char *key)
{
	const struct config_key *k;

	for (k = config_table; k->name; k++)
		if (strcmp(k->name, key) == 0)
			return k;
	return NULL;
}

static void
test_defaults(void)
{
	struct config c;

	memset(&c, 0x5a, sizeof c);	/* defaults must set everything, not rely on zeroed memory */
	config_defaults(&c);
	ok(c.n_listen == 0 && c.n_listen_tls == 0, "default: no listeners");
	ok(c.tls_cert[0] == '\0' && c.tls_key[0] == '\0', "default: no certificate or key");
	ok(strcmp(c.tls_ciphers, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS") == 0,
	    "default tls_ciphers is %s", c.tls_ciphers);
	ok(c.require_tls == 1, "default require_tls = yes");
	ok(strcmp(c.secure_networks, "127.0.0.0/8, ::1") == 0,
	    "default secure_networks is loopback (as Dovecot): %s", c.secure_networks);
	/* Checked here, not by binding it: the tests never take 8143 from a demo. */
	ok(strcmp(c.admin_listen, "127.0.0.1:8143") == 0, "default admin_listen is %s",
	    c.admin_listen);
	ok(c.upstream.host[0] == '\0' && strcmp(c.upstream.port, "143") == 0,
	    "default upstream: no host, port 143");
	ok(c.upstream_tls == UPSTREAM_TLS_NONE, "default upstream_tls = none");
	ok(c.upstream_tls_verify == 1, "default upstream_tls_verify = yes");
	ok(c.upstream_ca[0] == '\0' && c.upstream_sni[0] == '\0', "default upstream_ca, upstream_sni empty");
	ok(strcmp(c.state, "memory") == 0, "default state = memory");
	ok(c.resync == 1, "default resync = yes");
	ok(strcmp(c.resync_on, "GETQUOTAROOT, FETCH, UID FETCH") == 0, "default resync_on is %s",
	    c.resync_on);
	ok(c.resync_after == 0, "default resync_after = 0 (off)");
	ok(strcmp(c.redis_prefix, "imapfresh:") == 0, "default redis_prefix = imapfresh:");
	ok(c.redis_publish_global == 0, "default redis_publish_global = no");
	ok(c.instance_id[0] == '\0', "default instance_id empty (the host name)");
	ok(c.state_ttl == 3600, "default state_ttl = 1h");
	ok(c.max_clients == 10000, "default max_clients = 10000");
	ok(c.max_line == 64 * 1024, "default max_line = 64k");
	ok(c.max_literal == 100ULL << 20, "default max_literal = 100M");
	ok(c.timeout_connect == 10, "default timeout_connect = 10s");
	ok(c.timeout_tls_handshake == 30, "default timeout_tls_handshake = 30s");
	ok(c.timeout_preauth == 60, "default timeout_preauth = 60s");
	ok(c.timeout_idle == 1800, "default timeout_idle = 30m");
	ok(c.upgrade_drain_timeout == 60, "default upgrade_drain_timeout = 60s");
	ok(c.log_level == LOG_LEVEL_INFO, "default log_level = info");
	ok(c.pid_file[0] == '\0' && c.user[0] == '\0', "default pid_file, user empty");
	ok(c.upstream_port_auto == 1 && c.tls_key_auto == 1, "default: derived fields follow");
}

/* The table is the single source: check it is self-consistent. */
static void
test_table(void)
{
	const struct config_key *k, *j;
	int n = 0, names_match = 1, dups = 0, bad_defaults = 0, bad_ranges = 0, no_help = 0;
	struct config c;

	for (k = config_table; k->name; k++, n++) {
		if (!config_keys[n] || strcmp(config_keys[n], k->name) != 0)
			names_match = 0;
		for (j = k + 1; j->name; j++)
			if (strcmp(j->name, k->name) == 0)
				dups++;
		config_defaults(&c);
		if (k->def && set(&c, k->name, k->def) != 0) {
			bad_defaults++;
			diag("default of %s: %s", k->name, err);
		}
		if (k->type == CONFIG_T_INT || k->type == CONFIG_T_SIZE || k->type == CONFIG_T_DURATION) {
			uint64_t cap = k->size >= 8 ? UINT64_MAX : INT_MAX;

			if (k->max > cap || (k->max && k->min > k->max)) {
				bad_ranges++;
				diag("range of %s does not fit its field", k->name);
			}
		}
		if (!k->help || !k->help[0] || (k->type == CONFIG_T_ENUM && !k->choices))
			no_help++;
	}
	ok(n > 0 && names_match && config_keys[n] == NULL, "config_keys[] lists the %d table rows in order", n);
	ok(n == 53, "53 keys (got %d); update the tests and docs when adding one", n);
	ok(dups == 0, "no key twice in the table");
	ok(bad_defaults == 0, "every default parses");
	ok(bad_ranges == 0, "every numeric range fits its field");
	ok(no_help == 0, "every key has help (and enums their choices)");
}

/* Values each key must reject, with the exact one-line error. */
static const struct {
	const char *key, *value, *error;
} bad_values[] = {
	{ "listen", "127.0.0.1", "listen: missing port: 127.0.0.1" },
	{ "listen", "127.0.0.1:", "listen: missing port: 127.0.0.1:" },
	{ "listen", ":143", "listen: missing host: :143" },
	{ "listen", "::1:143", "listen: IPv6 address needs brackets, as in [::1]:143: ::1:143" },
	{ "listen", "[::1]143", "listen: expected ':' after ']': [::1]143" },
	{ "listen", "[::1:143", "listen: missing ']': [::1:143" },
	{ "listen", "[]:143", "listen: missing host: []:143" },
	{ "listen", "127.0.0.1:0", "listen: port not in 1..65535: 127.0.0.1:0" },
	{ "listen", "127.0.0.1:65536", "listen: port not in 1..65535: 127.0.0.1:65536" },
	{ "listen", "127.0.0.1:imap", "listen: port not in 1..65535: 127.0.0.1:imap" },
	{ "listen", "127.0.0.1:-1", "listen: port not in 1..65535: 127.0.0.1:-1" },
	{ "listen", "user@host:143", "listen: bad host: user@host:143" },
	{ "listen_tls", "localhost", "listen_tls: missing port: localhost" },
	{ "tls_cert", LONG_VALUE, "tls_cert: too long (max 1023 bytes)" },
	{ "tls_key", LONG_VALUE, "tls_key: too long (max 1023 bytes)" },
	{ "tls_ciphers", "", "tls_ciphers: must not be empty" },
	{ "tls_ciphers", LONG_VALUE, "tls_ciphers: too long (max 511 bytes)" },
	{ "require_tls", "maybe", "require_tls: expected yes or no, got \"maybe\"" },
	{ "require_tls", "", "require_tls: expected yes or no, got \"\"" },
	{ "require_tls", "2", "require_tls: expected yes or no, got \"2\"" },
	{ "upstream", "::1", "upstream: IPv6 address needs brackets, as in [::1]:143: ::1" },
	{ "upstream", "mail:99999", "upstream: port not in 1..65535: mail:99999" },
	{ "upstream", "mail:", "upstream: missing port: mail:" },
	{ "upstream_tls", "ssl", "upstream_tls: expected none, starttls or tls, got \"ssl\"" },
	{ "upstream_tls", "", "upstream_tls: expected none, starttls or tls, got \"\"" },
	{ "upstream_tls_verify", "sure", "upstream_tls_verify: expected yes or no, got \"sure\"" },
	{ "upstream_ca", LONG_VALUE, "upstream_ca: too long (max 1023 bytes)" },
	{ "upstream_sni", LONG_VALUE, "upstream_sni: too long (max 255 bytes)" },
	{ "state", "redis:/x", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis:/x\"" },
	{ "state", "", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"\"" },
	{ "state", "Memory", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"Memory\"" },
	{ "state", "redis://", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis://\"" },
	{ "state", "redis://h:0", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis://h:0\"" },
	{ "state", "redis://h/x", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis://h/x\"" },
	/* Credentials: a bad one is named, and its password never shown. */
	{ "state", "redis://s3cret@h", "state: expected user:password@ or :password@ before the host (a name alone before '@' is a password to some clients, a user to others: write which), got \"redis://***@h\"" },
	{ "state", "redis://:@h", "state: expected a password after ':' in :password@, got \"redis://:***@h\"" },
	{ "state", "redis://:s3%zzcret@h", "state: expected a password whose '%' starts a %XX escape (write '%' itself as %25), got \"redis://:***@h\"" },
	{ "state", "redis://:s3cret%@h", "state: expected a password whose '%' starts a %XX escape (write '%' itself as %25), got \"redis://:***@h\"" },
	{ "state", "redis://us%4ger:s3cret@h", "state: expected a user whose '%' starts a %XX escape (write '%' itself as %25), got \"redis://us%4ger:***@h\"" },
	{ "state", "redis://:s3%00cret@h", "state: expected a password without %00, got \"redis://:***@h\"" },
	{ "state", "redis://:s3/cret@h/1", "state: expected a user and password with any '/' written %2F, got \"redis://:***@h/1\"" },
	{ "state", "redis://:s3cret@h:0", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis://:***@h:0\"" },
	{ "state", "redis+unix://:s3cret@rel.sock", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis+unix://:***@rel.sock\"" },
	{ "state", "redis-sentinel://s3cret@h1/m", "state: expected user:password@ or :password@ before the host (a name alone before '@' is a password to some clients, a user to others: write which), got \"redis-sentinel://***@h1/m\"" },
	{ "state", "redis-sentinel://:s3%g0cret@h1/m", "state: expected a password whose '%' starts a %XX escape (write '%' itself as %25), got \"redis-sentinel://:***@h1/m\"" },
	{ "backend_redis", "redis://s3cret@h", "backend_redis: expected user:password@ or :password@ before the host (a name alone before '@' is a password to some clients, a user to others: write which), got \"redis://***@h\"" },
	{ "backend_redis", "redis://:s3cret@h:99999", "backend_redis: expected empty, redis://[[user]:password@]host[:port][/db] or redis+unix://[[user]:password@]/path, got \"redis://:***@h:99999\"" },
	{ "sentinel_user", LONG_VALUE, "sentinel_user: too long (max 127 bytes)" },
	{ "sentinel_password", LONG_VALUE, "sentinel_password: too long (max 511 bytes)" },
	{ "state_password_file", LONG_VALUE, "state_password_file: too long (max 1023 bytes)" },
	{ "sentinel_password_file", LONG_VALUE, "sentinel_password_file: too long (max 1023 bytes)" },
	{ "backend_redis_password_file", LONG_VALUE, "backend_redis_password_file: too long (max 1023 bytes)" },
	{ "state", "redis+unix://rel.sock", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis+unix://rel.sock\"" },
	{ "state", "redis-sentinel://h1,h2", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel://h1,h2\"" },
	{ "state", "redis-sentinel:///m", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel:///m\"" },
	{ "state", "redis-sentinel://h1,/m", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel://h1,/m\"" },
	{ "state", "redis-sentinel://h1/", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel://h1/\"" },
	{ "state", "redis-sentinel://h1:0/m", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel://h1:0/m\"" },
	{ "state", "redis-sentinel://h1/m/x", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel://h1/m/x\"" },
	{ "state", "redis-sentinel://h1/m x", "state: expected memory, redis://[[user]:password@]host[:port][/db], redis+unix://[[user]:password@]/path or redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db], got \"redis-sentinel://h1/m x\"" },
	{ "resync", "sometimes", "resync: expected yes or no, got \"sometimes\"" },
	{ "redis_publish_global", "both", "redis_publish_global: expected yes or no, got \"both\"" },
	{ "resync_on", "", "resync_on: must not be empty" },
	{ "resync_on", "FETCH,", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"FETCH,\"" },
	{ "resync_on", "FETCH,,STATUS", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"FETCH,,STATUS\"" },
	{ "resync_on", "FETCH STATUS", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"FETCH STATUS\"" },
	{ "resync_on", "UID", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"UID\"" },
	{ "resync_on", "UIDFETCH;", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"UIDFETCH;\"" },
	{ "resync_on", "UID UID FETCH", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"UID UID FETCH\"" },
	{ "resync_on", "X_Y", "resync_on: expected comma-separated IMAP commands, as in FETCH, UID FETCH, got \"X_Y\"" },
	{ "resync_after", "-1", "resync_after: not a duration: -1" },
	{ "resync_after", "1d", "resync_after: not a duration: 1d" },
	{ "redis_prefix", "", "redis_prefix: must not be empty" },
	{ "redis_prefix", "my app:", "redis_prefix: expected printable characters without spaces or braces, got \"my app:\"" },
	{ "redis_prefix", "a{b}:", "redis_prefix: expected printable characters without spaces or braces, got \"a{b}:\"" },
	{ "redis_prefix", LONG_VALUE, "redis_prefix: too long (max 127 bytes)" },
	{ "instance_id", "mail 1", "instance_id: expected letters, digits, '.', '-' and '_', got \"mail 1\"" },
	{ "instance_id", "a:b", "instance_id: expected letters, digits, '.', '-' and '_', got \"a:b\"" },
	{ "instance_id", LONG_VALUE, "instance_id: too long (max 127 bytes)" },
	{ "state_ttl", "59", "state_ttl: must be at least 1m, got 59" },
	{ "state_ttl", "0", "state_ttl: must be at least 1m, got 0" },
	{ "state_ttl", "1w", "state_ttl: not a duration: 1w" },
	{ "max_clients", "0", "max_clients: 0 out of range 1..1000000" },
	{ "max_clients", "1000001", "max_clients: 1000001 out of range 1..1000000" },
	{ "max_clients", "99999999999999999999", "max_clients: 99999999999999999999 out of range 1..1000000" },
	{ "max_clients", "-1", "max_clients: not an integer: -1" },
	{ "max_clients", "10k", "max_clients: not an integer: 10k" },
	{ "max_clients", "", "max_clients: not an integer: " },
	{ "workers", "0", "workers: 0 out of range 1..64" },
	{ "workers", "65", "workers: 65 out of range 1..64" },
	{ "busy_poll", "-1", "busy_poll: not an integer: -1" },
	{ "busy_poll", "100001", "busy_poll: 100001 out of range 0..100000" },
	{ "select_wait", "10001", "select_wait: 10001 out of range 0..10000" },
	{ "max_line", "12x", "max_line: not a size: 12x" },
	{ "max_line", "1023", "max_line: 1023 out of range 1k..16M" },
	{ "max_line", "16777217", "max_line: 16777217 out of range 1k..16M" },
	{ "max_line", "17M", "max_line: 17M out of range 1k..16M" },
	{ "max_line", "1G", "max_line: 1G out of range 1k..16M" },
	{ "max_line", "99999999999999999999G", "max_line: 99999999999999999999G out of range 1k..16M" },
	{ "max_line", "64 k", "max_line: not a size: 64 k" },
	{ "max_line", "64kk", "max_line: not a size: 64kk" },
	{ "max_line", "64kB", "max_line: not a size: 64kB" },
	{ "max_line", "1.5M", "max_line: not a size: 1.5M" },
	{ "max_line", "k", "max_line: not a size: k" },
	{ "max_line", "-1", "max_line: not a size: -1" },
	{ "max_line", "0x4000", "max_line: not a size: 0x4000" },
	{ "max_line", "", "max_line: not a size: " },
	{ "max_literal", "0", "max_literal: must be at least 1, got 0" },
	{ "max_literal", "0k", "max_literal: must be at least 1, got 0k" },
	{ "max_literal", "99999999999999999999G", "max_literal: too large: 99999999999999999999G" },
	{ "max_literal", "99999999999999999999", "max_literal: too large: 99999999999999999999" },
	{ "max_literal", "18446744073709551616", "max_literal: too large: 18446744073709551616" },
	{ "max_literal", "17179869184G", "max_literal: too large: 17179869184G" },
	{ "max_literal", "1T", "max_literal: not a size: 1T" },
	{ "timeout_connect", "0", "timeout_connect: must be at least 1s, got 0" },
	{ "timeout_connect", "0m", "timeout_connect: must be at least 1s, got 0m" },
	{ "timeout_connect", "10x", "timeout_connect: not a duration: 10x" },
	{ "timeout_tls_handshake", "1d", "timeout_tls_handshake: not a duration: 1d" },
	{ "timeout_tls_handshake", "5 s", "timeout_tls_handshake: not a duration: 5 s" },
	{ "timeout_preauth", "-5", "timeout_preauth: not a duration: -5" },
	{ "timeout_preauth", "1k", "timeout_preauth: not a duration: 1k" },
	{ "timeout_idle", "596524h", "timeout_idle: too large: 596524h" },
	{ "timeout_idle", "2147483648", "timeout_idle: too large: 2147483648" },
	{ "timeout_idle", "99999999999999999999h", "timeout_idle: too large: 99999999999999999999h" },
	{ "timeout_idle", "", "timeout_idle: not a duration: " },
	{ "upgrade_drain_timeout", "0", "upgrade_drain_timeout: must be at least 1s, got 0" },
	{ "log_level", "verbose", "log_level: expected error, warning, notice, info or debug, got \"verbose\"" },
	{ "pid_file", LONG_VALUE, "pid_file: too long (max 1023 bytes)" },
	{ "user", LONG_VALUE, "user: too long (max 63 bytes)" },
	{ "admin_listen", "nohostport", "admin_listen: expected empty or host:port, got \"nohostport\"" },
	{ "admin_token", LONG_VALUE, "admin_token: too long (max 255 bytes)" },
	{ "event_log", LONG_VALUE, "event_log: too long (max 1023 bytes)" },
	{ "event_stream_max", "-1", "event_stream_max: not an integer: -1" },
	{ "trace", "some", "trace: expected off, all, user NAME or client ADDR, optionally followed by bodies, got \"some\"" },
	{ "trace", "user", "trace: expected off, all, user NAME or client ADDR, optionally followed by bodies, got \"user\"" },
	{ "trace_file", LONG_VALUE, "trace_file: too long (max 1023 bytes)" },
	{ "trace_stream_max", "x", "trace_stream_max: not an integer: x" },
	{ "proxy_protocol_trusted", "10.0.0.0/33", "proxy_protocol_trusted: expected comma-separated addresses or networks, as in 10.0.0.0/8, ::1, got \"10.0.0.0/33\"" },
	{ "proxy_protocol_trusted", "example.org", "proxy_protocol_trusted: expected comma-separated addresses or networks, as in 10.0.0.0/8, ::1, got \"example.org\"" },
	{ "secure_networks", "localhost", "secure_networks: expected comma-separated addresses or networks, as in 10.0.0.0/8, ::1, got \"localhost\"" },
	{ "upstream_client_address", "xff", "upstream_client_address: expected none, id, proxy-v1 or proxy-v2, got \"xff\"" },
	{ "backend_events", "dovecot", "backend_events: expected none or wildduck, got \"dovecot\"" },
	{ "backend_redis", "http://x", "backend_redis: expected empty, redis://[[user]:password@]host[:port][/db] or redis+unix://[[user]:password@]/path, got \"http://x\"" },
	{ "backend_api", "https://api", "backend_api: expected empty or http://host[:port][/path] (no TLS: keep the API on a private link), got \"https://api\"" },
	{ "backend_api_token", LONG_VALUE, "backend_api_token: too long (max 255 bytes)" },
	{ "backend_id_ttl", "0", "backend_id_ttl: must be at least 1s, got 0" },
};

/* Values each key must accept (their effect is checked in test_good_values). */
static const struct {
	const char *key, *value;
} good_values[] = {
	{ "listen", "127.0.0.1:1143" }, { "listen", "[::1]:1143" }, { "listen", "" },
	{ "listen_tls", "0.0.0.0:993" }, { "tls_cert", "/etc/ssl/a.pem" }, { "tls_key", "" },
	{ "tls_ciphers", "HIGH" }, { "require_tls", "no" }, { "upstream", "mail" },
	{ "upstream_tls", "starttls" }, { "upstream_tls_verify", "off" },
	{ "upstream_ca", "/etc/ssl/ca.pem" }, { "upstream_sni", "imap.example.org" },
	{ "state", "redis://127.0.0.1" }, { "state", "redis-sentinel://10.0.0.1,10.0.0.2:26380/mymaster/2" },
	{ "state", "redis://:pw@h" }, { "state", "redis://app:p%40ss@[::1]:6380/2" },
	{ "state", "redis+unix://:pw@/run/redis.sock" }, { "state", "redis-sentinel://app:pw@s1,s2/m" },
	{ "state", "redis://app:@h" }, { "state_password_file", "/etc/imapfresh/redis.pass" },
	{ "sentinel_user", "sentinel-reader" }, { "sentinel_password", "s3nt" },
	{ "sentinel_password_file", "" }, { "backend_redis_password_file", "/etc/imapfresh/wd.pass" },
	{ "backend_redis", "redis://:pw@127.0.0.1" },
	{ "resync", "no" }, { "resync_on", "fetch" },
	{ "resync_on", "UID FETCH, GETQUOTAROOT, X-CUSTOM2" }, { "resync_after", "15m" },
	{ "redis_prefix", "mail:imapfresh:" }, { "instance_id", "mx1.example.org" },
	{ "redis_publish_global", "yes" },
	{ "instance_id", "" }, { "state_ttl", "60" }, { "state_ttl", "24h" },
	{ "max_clients", "1" }, { "workers", "64" }, { "busy_poll", "50" }, { "select_wait", "0" }, { "max_line", "16M" },
	{ "max_literal", "1" }, { "timeout_connect", "1" }, { "timeout_tls_handshake", "1m" },
	{ "timeout_preauth", "2h" }, { "timeout_idle", "2147483647" }, { "upgrade_drain_timeout", "10m" }, { "log_level", "DEBUG" },
	{ "pid_file", "/run/imapfresh.pid" }, { "user", "nobody" },
	{ "admin_listen", "" }, { "admin_listen", "[::1]:8143" }, { "admin_token", "s3cr3t" },
	{ "event_log", "/var/log/imapfresh/events.log" }, { "event_stream_max", "0" },
	{ "trace", "all" }, { "trace", "user alice bodies" }, { "trace", "client 10.0." },
	{ "trace_file", "/tmp/t.log" }, { "trace_stream_max", "100" },
	{ "proxy_protocol_trusted", "10.0.0.0/8, ::1, 192.0.2.7" },
	{ "secure_networks", "" }, { "secure_networks", "127.0.0.1, 10.1.0.0/16, fd00::/8" },
	{ "upstream_client_address", "proxy-v2" }, { "upstream_client_address", "id" },
	{ "backend_events", "wildduck" }, { "backend_redis", "redis://127.0.0.1:6379/3" },
	{ "backend_api", "http://127.0.0.1:8080/api" }, { "backend_api_token", "t0k3n" },
	{ "backend_id_ttl", "10m" },
};

static void
test_bad_values(void)
{
	char longval[2048];
	struct config c, before;
	size_t i;
	int rc, unchanged;

	for (i = 0; i < sizeof bad_values / sizeof *bad_values; i++) {
		const char *v = bad_values[i].value;

		if (strcmp(v, LONG_VALUE) == 0) {
			const struct config_key *k = key_row(bad_values[i].key);
			size_t n = k ? k->size : 1;

			memset(longval, 'a', n);	/* n bytes + NUL: one over the field */
			longval[n] = '\0';
			v = longval;
		}
		config_defaults(&c);
		before = c;
		rc = set(&c, bad_values[i].key, v);
		unchanged = memcmp(&c, &before, sizeof c) == 0;
		if (!ok(rc == -1 && unchanged && strcmp(err, bad_values[i].error) == 0,
		    "%s = \"%.40s\" rejected, config untouched", bad_values[i].key, v))
			diag("rc %d, unchanged %d, err \"%s\", want \"%s\"", rc, unchanged, err,
			    bad_values[i].error);
	}
	config_defaults(&c);
	ok_err(set(&c, "lisen", "127.0.0.1:143") == -1 && strcmp(err, "unknown key \"lisen\"") == 0,
	    "unknown key named in error");
	ok_err(set(&c, "Listen", "127.0.0.1:143") == -1 && strcmp(err, "unknown key \"Listen\"") == 0,
	    "keys are case-sensitive");
	/* A tiny buffer still gets a terminated prefix, and NULL is allowed. */
	memset(err, 'x', sizeof err);
	rc = config_set(&c, "max_line", "12x", err, 9);
	ok(rc == -1 && strcmp(err, "max_line") == 0, "error truncated to buffer: \"%s\"", err);
	ok(config_set(&c, "max_line", "12x", NULL, 0) == -1, "NULL error buffer allowed");
}

static void
test_coverage(void)
{
	size_t i;
	int k, missing = 0;

	/* A new key must come with tests: at least one good and one bad value. */
	for (k = 0; config_keys[k]; k++) {
		int good = 0, bad = 0;

		for (i = 0; i < sizeof good_values / sizeof *good_values; i++)
			good += strcmp(good_values[i].key, config_keys[k]) == 0;
		for (i = 0; i < sizeof bad_values / sizeof *bad_values; i++)
			bad += strcmp(bad_values[i].key, config_keys[k]) == 0;
		if (!good || !bad) {
			missing++;
			diag("%s: %d good and %d bad test values", config_keys[k], good, bad);
		}
	}
	ok(missing == 0, "every key has good and bad test values");
	for (i = 0, missing = 0; i < sizeof bad_values / sizeof *bad_values; i++)
		missing += !key_known(bad_values[i].key);
	for (i = 0; i < sizeof good_values / sizeof *good_values; i++)
		missing += !key_known(good_values[i].key);
	ok(missing == 0, "test tables name only real keys");
}

static void
test_good_values(void)
{
	char name[128], buf[1100];
	struct config c;
	size_t i;
	int failed = 0;

	for (i = 0; i < sizeof good_values / sizeof *good_values; i++) {
		config_defaults(&c);
		if (set(&c, good_values[i].key, good_values[i].value) != 0) {
			failed++;
			diag("%s = %s: %s", good_values[i].key, good_values[i].value, err);
		}
	}
	ok(failed == 0, "every good value accepted");

	/* listen: repeatable, IPv6, normalized port, "" clears, capacity. */
	config_defaults(&c);
	ok(set(&c, "listen", "127.0.0.1:1143") == 0 && set(&c, "listen", "[::1]:01143") == 0
	    && set(&c, "listen", "[fe80::1%eth0]:143") == 0 && set(&c, "listen", "localhost:143") == 0
	    && c.n_listen == 4 && c.n_listen_tls == 0, "listen repeats (n_listen %d)", c.n_listen);
	ok(strcmp(c.listen[0].host, "127.0.0.1") == 0 && strcmp(c.listen[0].port, "1143") == 0,
	    "listen[0] = 127.0.0.1 1143");
	ok(strcmp(c.listen[1].host, "::1") == 0 && strcmp(c.listen[1].port, "1143") == 0,
	    "listen[1] = ::1 1143, brackets dropped, port normalized (%s)", c.listen[1].port);
	ok(strcmp(c.listen[2].host, "fe80::1%eth0") == 0, "IPv6 zone kept");
	ok(strcmp(c.listen[3].host, "localhost") == 0, "host names allowed");
	ok(set(&c, "listen", "") == 0 && c.n_listen == 0 && c.listen[0].host[0] == '\0',
	    "listen = \"\" clears the list");
	for (i = 0; i < CONFIG_MAX_LISTEN; i++) {
		snprintf(name, sizeof name, "127.0.0.1:%zu", 1000 + i);
		set(&c, "listen", name);
	}
	ok(c.n_listen == CONFIG_MAX_LISTEN, "%d listeners fit", CONFIG_MAX_LISTEN);
	ok_err(set(&c, "listen", "127.0.0.1:2000") == -1
	    && strcmp(err, "listen: more than 16 addresses: 127.0.0.1:2000") == 0
	    && c.n_listen == CONFIG_MAX_LISTEN, "one listener too many");
	ok(set(&c, "listen_tls", "[::]:993") == 0 && c.n_listen_tls == 1
	    && strcmp(c.listen_tls[0].host, "::") == 0 && strcmp(c.listen_tls[0].port, "993") == 0,
	    "listen_tls has its own list");

	/* upstream port follows upstream_tls until given, whatever the order. */
	config_defaults(&c);
	ok(set(&c, "upstream", "mail.example.org") == 0 && strcmp(c.upstream.port, "143") == 0,
	    "upstream without port: 143");
	ok(set(&c, "upstream_tls", "tls") == 0 && strcmp(c.upstream.port, "993") == 0
	    && c.upstream_tls == UPSTREAM_TLS_TLS, "upstream_tls = tls moves it to 993");
	ok(set(&c, "upstream_tls", "StartTLS") == 0 && strcmp(c.upstream.port, "143") == 0
	    && c.upstream_tls == UPSTREAM_TLS_STARTTLS, "starttls (any case) back to 143");
	ok(set(&c, "upstream_tls", "tls") == 0 && set(&c, "upstream", "[::1]:1143") == 0
	    && strcmp(c.upstream.host, "::1") == 0 && strcmp(c.upstream.port, "1143") == 0,
	    "explicit upstream port kept");
	ok(set(&c, "upstream_tls", "none") == 0 && strcmp(c.upstream.port, "1143") == 0
	    && c.upstream_port_auto == 0, "explicit port survives an upstream_tls change");
	config_defaults(&c);
	ok(set(&c, "upstream_tls", "tls") == 0 && set(&c, "upstream", "[2001:db8::1]") == 0
	    && strcmp(c.upstream.port, "993") == 0 && strcmp(c.upstream.host, "2001:db8::1") == 0,
	    "upstream_tls before upstream: 993 too");
	ok(set(&c, "upstream", "") == 0 && c.upstream.host[0] == '\0', "upstream = \"\" clears it");

	/* An address literal is also kept as a socket address, following the port. */
	config_defaults(&c);
	{
		const struct sockaddr_in *in4 = (const struct sockaddr_in *)&c.upstream_sa;
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&c.upstream_sa;

		ok(set(&c, "upstream", "127.0.0.1") == 0 && c.upstream_salen == sizeof *in4
		    && in4->sin_family == AF_INET && ntohs(in4->sin_port) == 143
		    && ntohl(in4->sin_addr.s_addr) == 0x7f000001, "IPv4 literal: socket address, port 143");
		ok(set(&c, "upstream_tls", "tls") == 0 && ntohs(in4->sin_port) == 993,
		    "its port follows upstream_tls = tls");
		ok(set(&c, "upstream", "[::1]:1143") == 0 && c.upstream_salen == sizeof *in6
		    && in6->sin6_family == AF_INET6 && ntohs(in6->sin6_port) == 1143
		    && IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr), "IPv6 literal: socket address, port 1143");
		ok(set(&c, "upstream", "mail.example.org") == 0 && c.upstream_salen == 0,
		    "a name: no socket address (resolved per session)");
	}

	/* tls_key follows tls_cert until given; "" gives it back. */
	config_defaults(&c);
	ok(set(&c, "tls_cert", "/a.pem") == 0 && strcmp(c.tls_key, "/a.pem") == 0,
	    "tls_key defaults to tls_cert");
	ok(set(&c, "tls_key", "/k.pem") == 0 && set(&c, "tls_cert", "/b.pem") == 0
	    && strcmp(c.tls_key, "/k.pem") == 0 && strcmp(c.tls_cert, "/b.pem") == 0,
	    "explicit tls_key kept when tls_cert changes");
	ok(set(&c, "tls_key", "") == 0 && strcmp(c.tls_key, "/b.pem") == 0,
	    "tls_key = \"\" follows tls_cert again");

	/* Booleans, every spelling. */
	{
		static const char *const yes[] = { "yes", "true", "on", "1", "YES", "True", "ON" };
		static const char *const no[] = { "no", "false", "off", "0", "No", "FALSE", "Off" };
		int bad = 0;

		for (i = 0; i < sizeof yes / sizeof *yes; i++) {
			config_defaults(&c);
			c.require_tls = 0;
			c.upstream_tls_verify = 0;
			bad += set(&c, "require_tls", yes[i]) != 0 || c.require_tls != 1;
			bad += set(&c, "upstream_tls_verify", yes[i]) != 0 || c.upstream_tls_verify != 1;
			bad += set(&c, "require_tls", no[i]) != 0 || c.require_tls != 0;
			bad += set(&c, "upstream_tls_verify", no[i]) != 0 || c.upstream_tls_verify != 0;
		}
		ok(bad == 0, "booleans: yes/no true/false on/off 1/0, any case");
	}

	/* Enums map to their index. */
	{
		static const char *const levels[] = { "error", "warning", "notice", "info", "debug" };
		static const enum log_level want[] = {
			LOG_LEVEL_ERROR, LOG_LEVEL_WARNING, LOG_LEVEL_NOTICE, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG,
		};
		int bad = 0;

		for (i = 0; i < 5; i++)
			bad += set(&c, "log_level", levels[i]) != 0 || c.log_level != want[i];
		ok(bad == 0, "log_level names map to enum log_level");
	}

	/* Numbers, at and around the edges. */
	config_defaults(&c);
	ok(set(&c, "max_clients", "1000000") == 0 && c.max_clients == 1000000, "max_clients upper bound");
	ok(set(&c, "max_clients", "007") == 0 && c.max_clients == 7, "leading zeros are decimal");
	ok(set(&c, "max_line", "1k") == 0 && c.max_line == 1024, "max_line = 1k is 1024");
	ok(set(&c, "max_line", "1K") == 0 && c.max_line == 1024, "K as k");
	ok(set(&c, "max_line", "1024") == 0 && c.max_line == 1024, "plain bytes");
	ok(set(&c, "max_line", "16M") == 0 && c.max_line == 16777216, "max_line = 16M upper bound");
	ok(set(&c, "max_line", "16777216") == 0 && c.max_line == 16777216, "16777216 as 16M");
	ok(set(&c, "max_line", "2m") == 0 && c.max_line == 2097152, "m as M");
	ok(set(&c, "max_literal", "16G") == 0 && c.max_literal == 16ULL << 30, "max_literal = 16G");
	ok(set(&c, "max_literal", "2g") == 0 && c.max_literal == 2ULL << 30, "g as G");
	ok(set(&c, "max_literal", "17179869183G") == 0 && c.max_literal == 17179869183ULL << 30,
	    "largest G that fits 64 bits");
	ok(set(&c, "max_literal", "18446744073709551615") == 0 && c.max_literal == UINT64_MAX,
	    "max_literal = 2^64-1 fits");
	ok(set(&c, "timeout_idle", "90") == 0 && c.timeout_idle == 90, "duration: plain seconds");
	ok(set(&c, "timeout_idle", "90s") == 0 && c.timeout_idle == 90, "duration: s");
	ok(set(&c, "timeout_idle", "2m") == 0 && c.timeout_idle == 120, "duration: m");
	ok(set(&c, "timeout_idle", "2h") == 0 && c.timeout_idle == 7200, "duration: h");
	ok(set(&c, "timeout_idle", "596523h") == 0 && c.timeout_idle == 2147482800,
	    "duration: largest h that fits an int");
	ok(set(&c, "timeout_connect", "2147483647") == 0 && c.timeout_connect == INT_MAX,
	    "duration: INT_MAX seconds");

	/* Strings: boundaries and the state forms. */
	memset(buf, 'a', 1023);
	buf[1023] = '\0';
	ok(set(&c, "tls_cert", buf) == 0 && strlen(c.tls_cert) == 1023, "1023-byte path fits");
	memset(buf, 'u', 63);
	buf[63] = '\0';
	ok(set(&c, "user", buf) == 0 && strlen(c.user) == 63, "63-byte user fits");
	ok(set(&c, "state", "redis://[::1]:6380/2") == 0 && strcmp(c.state, "redis://[::1]:6380/2") == 0,
	    "state: redis URL stored as given");
	ok(set(&c, "state", "redis+unix:///run/redis/redis.sock") == 0, "state: redis+unix");
	ok(set(&c, "state", "memory") == 0 && strcmp(c.state, "memory") == 0, "state: memory");
	ok(set(&c, "upstream_sni", "") == 0 && c.upstream_sni[0] == '\0', "strings may be emptied");

	/* resync_on is stored normalised: upper case, ", " between items. */
	ok(set(&c, "resync_on", " fetch ,uid\t  Fetch,getQuotaRoot ") == 0
	    && strcmp(c.resync_on, "FETCH, UID FETCH, GETQUOTAROOT") == 0,
	    "resync_on normalised: \"%s\" (%s)", c.resync_on, err);
	ok_err(set(&c, "resync_on", "x-1") == 0 && strcmp(c.resync_on, "X-1") == 0,
	    "resync_on: one item, digits and '-'");
	memset(buf, 0, sizeof buf);
	for (i = 0; i < 64; i++)
		strcat(buf, i ? ",ABC" : "ABC");	/* 255 bytes, 318 once normalised */
	ok(set(&c, "resync_on", buf) == -1 && strcmp(err, "resync_on: too long (max 255 bytes)") == 0
	    && strcmp(c.resync_on, "X-1") == 0, "resync_on: the normalised length counts (%s)", err);
	ok(set(&c, "resync_after", "0") == 0 && c.resync_after == 0
	    && set(&c, "resync_after", "90s") == 0 && c.resync_after == 90, "resync_after: 0 and 90s");
	ok(set(&c, "state_ttl", "1m") == 0 && c.state_ttl == 60, "state_ttl: 1m is the minimum");
	ok(set(&c, "redis_prefix", "x") == 0 && strcmp(c.redis_prefix, "x") == 0, "redis_prefix: one byte");
}

static void
test_parse_addr(void)
{
	struct config_addr a, keep;
	struct config_redis r;
	struct sentinel_url su;

	ok(config_parse_addr("mail", "143", &a) == 0 && strcmp(a.host, "mail") == 0
	    && strcmp(a.port, "143") == 0, "host alone takes the default port");
	ok(config_parse_addr("[::1]", "993", &a) == 0 && strcmp(a.host, "::1") == 0
	    && strcmp(a.port, "993") == 0, "[v6] alone takes the default port");
	ok(config_parse_addr("mail:110", "143", &a) == 0 && strcmp(a.port, "110") == 0,
	    "given port beats the default");
	memset(&keep, 0x33, sizeof keep);
	a = keep;
	ok(config_parse_addr("mail", NULL, &a) == -1 && memcmp(&a, &keep, sizeof a) == 0,
	    "no port and no default: error, out untouched");
	ok(config_parse_addr("", "143", &a) == -1, "empty address refused");
	ok(config_parse_addr("[::1]:143:1", NULL, &a) == -1, "junk after port refused");

	ok(config_parse_redis("redis://cache", &r) == 0 && strcmp(r.host, "cache") == 0
	    && strcmp(r.port, "6379") == 0 && r.db == 0 && r.path[0] == '\0', "redis://host: 6379, db 0");
	ok(config_parse_redis("redis://[::1]:6380/3", &r) == 0 && strcmp(r.host, "::1") == 0
	    && strcmp(r.port, "6380") == 0 && r.db == 3, "redis://[v6]:port/db");
	ok(config_parse_redis("redis://cache/", &r) == 0 && r.db == 0, "redis://host/ is db 0");
	ok(config_parse_redis("redis+unix:///run/r.sock", &r) == 0 && strcmp(r.path, "/run/r.sock") == 0
	    && r.host[0] == '\0', "redis+unix:///path");
	ok(config_parse_redis("memory", &r) == -1 && config_parse_redis("redis://h/1/2", &r) == -1
	    && config_parse_redis("redis://h/9999999999", &r) == -1, "not redis URLs refused");
	ok(config_parse_redis("redis-sentinel://h/m", &r) == -1, "a sentinel URL is not a redis:// one");

	ok(sentinel_parse_url("redis-sentinel://s1,[::1]:26380,10.0.0.3:1/mymaster", &su) == 0
	    && su.n == 3 && strcmp(su.addr[0].host, "s1") == 0 && strcmp(su.addr[0].port, "26379") == 0
	    && strcmp(su.addr[1].host, "::1") == 0 && strcmp(su.addr[1].port, "26380") == 0
	    && strcmp(su.addr[2].port, "1") == 0 && strcmp(su.master, "mymaster") == 0 && su.db == 0,
	    "redis-sentinel://: sentinels in order, 26379 by default, the master's name");
	ok(sentinel_parse_url("redis-sentinel://s1/m-1/7", &su) == 0 && su.n == 1 && su.db == 7
	    && strcmp(su.master, "m-1") == 0, "redis-sentinel://host/master/db");
	ok(sentinel_parse_url("redis-sentinel://s1/m/", &su) == 0 && su.db == 0, "master/ is db 0");
	ok(sentinel_parse_url("redis-sentinel://s1", &su) == -1
	    && sentinel_parse_url("redis-sentinel://s1,,s2/m", &su) == -1
	    && sentinel_parse_url("redis-sentinel://s1/m/1/2", &su) == -1
	    && sentinel_parse_url("redis-sentinel://s1/m\tx", &su) == -1
	    && sentinel_parse_url("redis://s1/1", &su) == -1, "bad sentinel URLs refused");
	ok(sentinel_parse_url("redis-sentinel://a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p/m", &su) == 0 && su.n == 16
	    && sentinel_parse_url("redis-sentinel://a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q/m", &su) == -1,
	    "up to 16 sentinels");
}

/* user:password@ in Redis URLs: the forms, percent-decoding, the AUTH sent, redaction. */
static void
test_redis_auth(void)
{
	struct config_redis r;
	struct sentinel_url su;
	const char *argv[3];
	size_t argvlen[3];
	char buf[300];

	ok(config_parse_redis("redis://cache", &r) == 0 && r.auth.user[0] == '\0'
	    && r.auth.password[0] == '\0' && config_auth_argv(&r.auth, argv, argvlen) == 0,
	    "no userinfo: no credentials, no AUTH");
	ok(config_parse_redis("redis://:s3cret@cache:6380/2", &r) == 0 && strcmp(r.host, "cache") == 0
	    && strcmp(r.port, "6380") == 0 && r.db == 2 && r.auth.user[0] == '\0'
	    && strcmp(r.auth.password, "s3cret") == 0, ":password@: a password alone");
	ok(config_auth_argv(&r.auth, argv, argvlen) == 2 && strcmp(argv[0], "AUTH") == 0
	    && strcmp(argv[1], "s3cret") == 0 && argvlen[1] == 6, "AUTH password");
	ok(config_parse_redis("redis://app:s3cret@[::1]/1", &r) == 0 && strcmp(r.host, "::1") == 0
	    && r.db == 1 && strcmp(r.auth.user, "app") == 0 && strcmp(r.auth.password, "s3cret") == 0,
	    "user:password@ (Redis 6 ACL user)");
	ok(config_auth_argv(&r.auth, argv, argvlen) == 3 && strcmp(argv[1], "app") == 0
	    && strcmp(argv[2], "s3cret") == 0, "AUTH user password");
	ok(config_parse_redis("redis://a%3Ab%40c:p%40ss%3Aw%2Frd%25@h", &r) == 0
	    && strcmp(r.auth.user, "a:b@c") == 0 && strcmp(r.auth.password, "p@ss:w/rd%") == 0,
	    "user and password percent-decoded (%%3A %%40 %%2F %%25)");
	ok(config_parse_redis("redis://:p@ss:w@rd@h:7000", &r) == 0 && strcmp(r.host, "h") == 0
	    && strcmp(r.port, "7000") == 0 && strcmp(r.auth.password, "p@ss:w@rd") == 0,
	    "raw '@' and ':' in the password: the last '@' ends it");
	ok(config_parse_redis("redis://:pa ss+w%20@h", &r) == 0 && strcmp(r.auth.password, "pa ss+w ") == 0,
	    "'+' and spaces kept, %%20 decoded");
	ok(config_parse_redis("redis+unix://:s3cret@/run/redis.sock", &r) == 0
	    && strcmp(r.path, "/run/redis.sock") == 0 && strcmp(r.auth.password, "s3cret") == 0,
	    "redis+unix://:password@/path");
	ok(config_parse_redis("redis+unix://app:s3cret@/run/redis.sock", &r) == 0
	    && strcmp(r.auth.user, "app") == 0, "redis+unix://user:password@/path");
	ok(config_parse_redis("redis+unix:///run/a@b.sock", &r) == 0 && strcmp(r.path, "/run/a@b.sock") == 0
	    && r.auth.password[0] == '\0', "an '@' in a socket path is no userinfo");
	ok(config_parse_redis("redis://app:@h", &r) == 0 && strcmp(r.auth.user, "app") == 0
	    && r.auth.password[0] == '\0', "user:@ parses (its password must come from a file)");
	ok(sentinel_parse_url("redis-sentinel://app:m%40ster@s1,s2:26380/mymaster/3", &su) == 0
	    && su.n == 2 && strcmp(su.addr[0].host, "s1") == 0 && strcmp(su.master, "mymaster") == 0
	    && su.db == 3 && strcmp(su.auth.user, "app") == 0 && strcmp(su.auth.password, "m@ster") == 0,
	    "redis-sentinel://user:password@...: the master's credentials");
	ok(sentinel_parse_url("redis-sentinel://s1/my@master", &su) == 0 && strcmp(su.master, "my@master") == 0
	    && su.auth.password[0] == '\0', "an '@' in a master's name is no userinfo");
	ok(config_parse_redis("redis://s3cret@h", &r) == -1 && config_parse_redis("redis://:@h", &r) == -1
	    && config_parse_redis("redis://:a%4@h", &r) == -1 && config_parse_redis("redis://:a%@h", &r) == -1
	    && config_parse_redis("redis://:a%00b@h", &r) == -1
	    && config_parse_redis("redis://:a/b@h", &r) == -1
	    && sentinel_parse_url("redis-sentinel://s3cret@s1/m", &su) == -1,
	    "bad userinfo refused (no ':', empty, bad %%XX, %%00, raw '/')");
	{
		char big[700];

		memset(big, 'p', sizeof big);
		memcpy(big, "redis://:", 9);
		memcpy(big + 9 + 512, "@h", 3);	/* a 512-byte password */
		ok(config_redis_reason(big, &r) != NULL && strstr(config_redis_reason(big, &r),
		    "at most 511 bytes"), "a password over 511 bytes refused");
	}

	ok(strcmp(config_redact_url("redis://:s3cret@h:1/2", buf, sizeof buf), "redis://:***@h:1/2") == 0,
	    "redacted: %s", buf);
	ok(strcmp(config_redact_url("redis://app:s3cret@h", buf, sizeof buf), "redis://app:***@h") == 0,
	    "redacted, user kept: %s", buf);
	ok(strcmp(config_redact_url("redis://:p@ss@h", buf, sizeof buf), "redis://:***@h") == 0,
	    "redacted up to the last '@': %s", buf);
	ok(strcmp(config_redact_url("redis://s3cret@h", buf, sizeof buf), "redis://***@h") == 0,
	    "a name alone before '@' redacted whole: %s", buf);
	ok(strcmp(config_redact_url("redis+unix://:s3cret@/run/r.sock", buf, sizeof buf),
	    "redis+unix://:***@/run/r.sock") == 0, "redacted: %s", buf);
	ok(strcmp(config_redact_url("redis-sentinel://app:s3cret@s1,s2/m", buf, sizeof buf),
	    "redis-sentinel://app:***@s1,s2/m") == 0, "redacted: %s", buf);
	ok(strcmp(config_redact_url("redis+unix:///run/a@b.sock", buf, sizeof buf),
	    "redis+unix:///run/a@b.sock") == 0, "an '@' in a socket path is kept: %s", buf);
	ok(strcmp(config_redact_url("redis://h:1/2", buf, sizeof buf), "redis://h:1/2") == 0
	    && strcmp(config_redact_url("memory", buf, sizeof buf), "memory") == 0,
	    "nothing to redact: unchanged");
	ok(config_auth_unneeded("ERR AUTH <password> called without any password configured for the "
	    "default user. Are you sure your configuration is correct?")
	    && config_auth_unneeded("ERR Client sent AUTH, but no password is set")
	    && !config_auth_unneeded("WRONGPASS invalid username-password pair or user is disabled.")
	    && !config_auth_unneeded("ERR invalid password"), "AUTH to a server without a password "
	    "is no refusal; WRONGPASS is");
}

/* Write content to a new temp file; path receives its name. */
static void
write_temp(const char *content, size_t len, char *path, size_t pathlen)
{
	int fd;

	snprintf(path, pathlen, "%s/test_config.XXXXXX", tmpdir);
	fd = mkstemp(path);
	if (fd < 0 || write(fd, content, len) != (ssize_t)len) {
		diag("cannot write %s", path);
		exit(99);
	}
	close(fd);
}

static int
load(struct config *cfg, const char *content, size_t len, char *path, size_t pathlen)
{
	int rc;

	write_temp(content, len, path, pathlen);
	config_defaults(cfg);
	err[0] = '\0';
	rc = config_load_file(cfg, path, err, sizeof err);
	unlink(path);
	return rc;
}

/* Load a string literal (NULs included) as a file. */
#define LOAD(cfg, text) load(cfg, text, sizeof(text) - 1, path, sizeof path)

static void
test_file(void)
{
	static const char good[] =
	    "# imapfresh test\n"
	    "\n"
	    "   listen = 127.0.0.1:1143   # trailing comment\n"
	    "listen=[::1]:1143\n"
	    "\t# indented comment\n"
	    "listen_tls = \"127.0.0.1:1993\"\n"
	    "tls_ciphers = \"HIGH:!aNULL # not a comment\"\n"
	    "pid_file = /run/a#b\n"
	    "user = \"nobody\"   # comment after quotes\n"
	    "upstream\t=\tmail.example.org\r\n"
	    "upstream_sni =\n"
	    "upstream_ca = # only a comment\n"
	    "state = redis://127.0.0.1:6379/1\n"
	    "max_line = 1M\n"
	    "tls_cert = \" /spaced path.pem \"\n"
	    "timeout_idle = 45m";	/* no final newline */
	char path[512], want[1024];
	struct config c;

	ok_err(LOAD(&c, good) == 0, "sample file loads");
	ok(c.n_listen == 2 && strcmp(c.listen[0].host, "127.0.0.1") == 0
	    && strcmp(c.listen[1].host, "::1") == 0, "file: two listeners, comment stripped");
	ok(c.n_listen_tls == 1 && strcmp(c.listen_tls[0].port, "1993") == 0, "file: quoted value unquoted");
	ok(strcmp(c.tls_ciphers, "HIGH:!aNULL # not a comment") == 0, "file: '#' kept inside quotes");
	ok(strcmp(c.pid_file, "/run/a#b") == 0, "file: '#' without space before it is data");
	ok(strcmp(c.user, "nobody") == 0, "file: comment after a quoted value");
	ok(strcmp(c.upstream.host, "mail.example.org") == 0 && strcmp(c.upstream.port, "143") == 0,
	    "file: tabs and CRLF trimmed");
	ok(c.upstream_sni[0] == '\0' && c.upstream_ca[0] == '\0', "file: empty values");
	ok(strcmp(c.state, "redis://127.0.0.1:6379/1") == 0, "file: state");
	ok(c.max_line == 1 << 20, "file: max_line");
	ok(strcmp(c.tls_cert, " /spaced path.pem ") == 0, "file: quotes keep surrounding spaces");
	ok(c.timeout_idle == 2700, "file: last line without newline");

	/* Errors carry file and line, counting blank and comment lines. */
	ok(LOAD(&c, "# c\n\nlisten = 127.0.0.1:143\nlisen = x\nlisten = y\n") == -1,
	    "unknown key fails the load");
	snprintf(want, sizeof want, "%s:4: unknown key \"lisen\"", path);
	ok_err(strcmp(err, want) == 0, "unknown key: file:line prefix");
	ok(c.n_listen == 1, "load stops at the first error");
	LOAD(&c, "max_clients = 5\n  max_line = 12x  # bad\n");
	snprintf(want, sizeof want, "%s:2: max_line: not a size: 12x", path);
	ok_err(strcmp(err, want) == 0, "bad value: file:line: key: reason");
	LOAD(&c, "listen 127.0.0.1:143\n");
	snprintf(want, sizeof want, "%s:1: expected key = value, got \"listen 127.0.0.1:143\"", path);
	ok_err(strcmp(err, want) == 0, "line without '=' is an error");
	LOAD(&c, "\n\ntls_cert = \"/x.pem\n");
	snprintf(want, sizeof want, "%s:3: tls_cert: missing closing quote", path);
	ok_err(strcmp(err, want) == 0, "unterminated quote");
	LOAD(&c, "user = \"a\" b\n");
	snprintf(want, sizeof want, "%s:1: user: text after closing quote: b", path);
	ok_err(strcmp(err, want) == 0, "text after a quoted value");
	LOAD(&c, " = x\n");
	snprintf(want, sizeof want, "%s:1: missing key before '='", path);
	ok_err(strcmp(err, want) == 0, "'=' without a key");
	LOAD(&c, "user = a\nuser = b\0c\n");
	snprintf(want, sizeof want, "%s:2: NUL byte in line", path);
	ok_err(strcmp(err, want) == 0, "NUL byte refused");

	snprintf(path, sizeof path, "%s/no-such-file.conf", tmpdir);
	config_defaults(&c);
	snprintf(want, sizeof want, "%s: No such file or directory", path);
	ok_err(config_load_file(&c, path, err, sizeof err) == -1 && strcmp(err, want) == 0,
	    "missing file: path: reason");

	/* -o uses the same rules as a file line. */
	config_defaults(&c);
	ok_err(config_set_option(&c, "max_line=1M", err, sizeof err) == 0 && c.max_line == 1 << 20,
	    "-o key=value");
	ok_err(config_set_option(&c, " user = \"x y\" ", err, sizeof err) == 0
	    && strcmp(c.user, "x y") == 0, "-o with spaces and quotes");
	ok_err(config_set_option(&c, "timeout_idle=a=b", err, sizeof err) == -1
	    && strcmp(err, "timeout_idle: not a duration: a=b") == 0, "-o: value split at the first '='");
	ok_err(config_set_option(&c, "max_line", err, sizeof err) == -1
	    && strcmp(err, "expected key = value, got \"max_line\"") == 0, "-o without '='");
}

/* A config that passes validation, built on real temp files. */
static void
valid_config(struct config *c, const char *cert)
{
	config_defaults(c);
	set(c, "listen", "127.0.0.1:1143");
	set(c, "listen_tls", "127.0.0.1:1993");
	set(c, "tls_cert", cert);
	set(c, "upstream", "127.0.0.1:143");
}

static char warned[4096];

static void
collect(void *arg, const char *msg)
{
	int *count = arg;

	(*count)++;
	snprintf(warned + strlen(warned), sizeof warned - strlen(warned), "%s|", msg);
}

static int
warnings(const struct config *c)
{
	int count = 0, n;

	warned[0] = '\0';
	n = config_warnings(c, collect, &count);
	return n == count ? n : -1;
}

static void
test_validate(void)
{
	char cert[512], want[1024], addr[64];
	struct config c;
	int i;

	write_temp("-----BEGIN CERTIFICATE-----\n", 28, cert, sizeof cert);

	valid_config(&c, cert);
	ok_err(config_validate(&c, err, sizeof err) == 0, "complete config validates");
	ok(warnings(&c) == 0, "and has no warnings (%s)", warned);

	config_defaults(&c);
	set(&c, "upstream", "mail");
	ok_err(config_validate(&c, err, sizeof err) == -1
	    && strcmp(err, "listen: no listener; set listen or listen_tls") == 0, "no listener");

	config_defaults(&c);
	set(&c, "listen_tls", "127.0.0.1:1993");
	set(&c, "tls_cert", cert);
	set(&c, "upstream", "mail");
	ok_err(config_validate(&c, err, sizeof err) == 0, "listen_tls alone is enough");
	set(&c, "upstream", "");
	ok_err(config_validate(&c, err, sizeof err) == -1
	    && strcmp(err, "upstream: not set; it is required (host[:port])") == 0, "no upstream");

	valid_config(&c, cert);
	set(&c, "tls_cert", "");
	set(&c, "require_tls", "no");
	ok_err(config_validate(&c, err, sizeof err) == -1
	    && strcmp(err, "listen_tls: 127.0.0.1:1993 needs tls_cert") == 0, "listen_tls needs tls_cert");

	config_defaults(&c);
	set(&c, "listen", "127.0.0.1:1143");
	set(&c, "upstream", "mail");
	ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err, "require_tls: plaintext "
	    "listener 127.0.0.1:1143 cannot offer STARTTLS without tls_cert; set tls_cert or "
	    "require_tls = no") == 0, "require_tls with a plaintext listener and no tls_cert");
	set(&c, "listen", "");
	set(&c, "listen", "[::1]:143");
	ok_err(config_validate(&c, err, sizeof err) == -1 && strstr(err, "listener [::1]:143 cannot"),
	    "IPv6 listener shown bracketed");
	set(&c, "require_tls", "no");
	ok_err(config_validate(&c, err, sizeof err) == 0, "require_tls = no allows plaintext only");
	ok(warnings(&c) == 1 && strcmp(warned, "require_tls: no; passwords may cross plaintext "
	    "listener [::1]:143 in the clear|") == 0, "but warns about it: %s", warned);
	set(&c, "tls_key", cert);
	ok_err(config_validate(&c, err, sizeof err) == -1
	    && strcmp(err, "tls_key: set without tls_cert") == 0, "tls_key without tls_cert");

	valid_config(&c, "/nonexistent/cert.pem");
	ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err,
	    "tls_cert: cannot read /nonexistent/cert.pem: No such file or directory") == 0,
	    "unreadable tls_cert");
	valid_config(&c, tmpdir);
	snprintf(want, sizeof want, "tls_cert: not a regular file: %s", tmpdir);
	ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err, want) == 0, "directory as tls_cert");
	valid_config(&c, cert);
	set(&c, "tls_key", "/nonexistent/key.pem");
	ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err,
	    "tls_key: cannot read /nonexistent/key.pem: No such file or directory") == 0,
	    "unreadable tls_key");
	set(&c, "tls_key", cert);
	ok_err(config_validate(&c, err, sizeof err) == 0, "separate readable tls_key");
	set(&c, "upstream_ca", "/nonexistent/ca.pem");
	ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err,
	    "upstream_ca: cannot read /nonexistent/ca.pem: No such file or directory") == 0,
	    "unreadable upstream_ca");

	valid_config(&c, cert);
	set(&c, "workers", "2");
	ok_err(config_validate(&c, err, sizeof err) == -1 && strncmp(err, "workers: 2 workers need "
	    "state = redis://...", 41) == 0, "several workers with state = memory refused");
	set(&c, "state", "redis://127.0.0.1:6379");
	ok_err(config_validate(&c, err, sizeof err) == 0, "several workers with Redis state");

	/* Credentials: one password from one place, the files' read as is. */
	{
		char pw[512], pw2[512], empty[512];

		write_temp("s3cret file\nsecond line\n", 24, pw, sizeof pw);
		write_temp("  w%40d\r\n", 9, pw2, sizeof pw2);
		write_temp("\nx\n", 3, empty, sizeof empty);
		valid_config(&c, cert);
		set(&c, "state", "redis://app:@127.0.0.1");
		ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err, "state: "
		    "redis://app:***@127.0.0.1 names user \"app\" without a password: write "
		    "user:PASSWORD@ or set state_password_file") == 0, "a user without a password refused");
		set(&c, "state_password_file", pw);
		ok_err(config_validate(&c, err, sizeof err) == 0 && config_load_secrets(&c, err,
		    sizeof err) == 0 && strcmp(c.state_password, "s3cret file") == 0,
		    "state_password_file: its first line is the password");
		set(&c, "state", "redis://:urlpw@127.0.0.1");
		ok_err(config_validate(&c, err, sizeof err) == -1 && strstr(err, "state: "
		    "redis://:***@127.0.0.1 has a password and state_password_file is set")
		    && !strstr(err, "urlpw"), "a password in the URL and in a file refused");
		set(&c, "state", "redis-sentinel://:urlpw@s1/m");
		ok_err(config_validate(&c, err, sizeof err) == -1 && strstr(err, "has a password and "
		    "state_password_file is set"), "the same with a sentinel URL");
		set(&c, "state", "redis://127.0.0.1");
		set(&c, "backend_redis_password_file", pw2);
		set(&c, "sentinel_password_file", pw2);
		ok_err(config_validate(&c, err, sizeof err) == 0 && config_load_secrets(&c, err,
		    sizeof err) == 0 && strcmp(c.backend_redis_password, "  w%40d") == 0
		    && strcmp(c.sentinel_password, "  w%40d") == 0,
		    "password files: not decoded, not trimmed but for the line end");
		set(&c, "sentinel_password", "x");
		ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err, "sentinel_password: set, "
		    "and sentinel_password_file too: give it in one place") == 0,
		    "sentinel_password and its file refused together");
		set(&c, "sentinel_password_file", "");
		set(&c, "sentinel_password", "");
		set(&c, "sentinel_user", "reader");
		ok_err(config_validate(&c, err, sizeof err) == -1 && strcmp(err, "sentinel_user: set "
		    "without sentinel_password") == 0, "sentinel_user without a password refused");
		set(&c, "sentinel_user", "");
		set(&c, "backend_redis_password_file", empty);
		ok_err(config_load_secrets(&c, err, sizeof err) == -1 && strstr(err,
		    "backend_redis_password_file: ") && strstr(err, ": no password on its first line"),
		    "an empty first line refused");
		set(&c, "backend_redis_password_file", "/nonexistent/pw");
		ok_err(config_validate(&c, err, sizeof err) == -1 && strstr(err,
		    "backend_redis_password_file: cannot read /nonexistent/pw"),
		    "an unreadable password file refused");
		unlink(pw);
		unlink(pw2);
		unlink(empty);
	}

	valid_config(&c, cert);
	set(&c, "user", "imapfresh-no-such-user");
	ok_err(config_validate(&c, err, sizeof err) == -1
	    && strcmp(err, "user: no such user \"imapfresh-no-such-user\"") == 0, "unknown user");
	set(&c, "user", "root");
	ok_err(config_validate(&c, err, sizeof err) == 0, "existing user");

	valid_config(&c, cert);
	set(&c, "listen", "127.0.0.1:1993");
	ok_err(config_validate(&c, err, sizeof err) == -1
	    && strcmp(err, "listen: 127.0.0.1:1993 given twice") == 0, "same address in both lists");
	valid_config(&c, cert);
	set(&c, "listen", "");
	set(&c, "listen_tls", "");
	for (i = 0; i < CONFIG_MAX_LISTEN; i++) {
		snprintf(addr, sizeof addr, "[::1]:%d", 2000 + i);
		set(&c, "listen", addr);
		snprintf(addr, sizeof addr, "[::1]:%d", 3000 + i);
		set(&c, "listen_tls", addr);
	}
	ok_err(c.n_listen + c.n_listen_tls == 2 * CONFIG_MAX_LISTEN
	    && config_validate(&c, err, sizeof err) == 0, "both lists full and distinct");

	/* Warnings: legal but unwise. */
	valid_config(&c, cert);
	set(&c, "timeout_idle", "29m");
	ok_err(config_validate(&c, err, sizeof err) == 0, "timeout_idle = 29m still validates");
	ok(warnings(&c) == 1 && strcmp(warned, "timeout_idle: below the 30 minutes RFC 9051 requires|") == 0,
	    "timeout_idle = 29m warns: %s", warned);
	set(&c, "timeout_idle", "1800");
	ok(warnings(&c) == 0, "timeout_idle = 1800 does not warn");
	set(&c, "upstream_ca", cert);
	set(&c, "upstream_sni", "imap.example.org");
	ok(warnings(&c) == 2 && strcmp(warned, "upstream_ca: ignored with upstream_tls = none|"
	    "upstream_sni: ignored with upstream_tls = none|") == 0,
	    "upstream_ca, upstream_sni ignored without upstream TLS: %s", warned);
	set(&c, "upstream_tls", "tls");
	ok(warnings(&c) == 0, "but used with upstream_tls = tls");
	set(&c, "upstream_tls_verify", "no");
	ok(warnings(&c) == 1 && strstr(warned, "upstream_tls_verify: no;") == warned,
	    "unchecked upstream certificate warns: %s", warned);
	ok(config_warnings(&c, NULL, NULL) == 1, "warnings counted without a callback");

	unlink(cert);
}

/* Whole text of a file under top_srcdir, or NULL. */
static char *
slurp(const char *rel)
{
	const char *top = getenv("top_srcdir");
	char path[1024];
	char *buf;
	long n;
	FILE *f;

	snprintf(path, sizeof path, "%s/%s", top && *top ? top : ".", rel);
	if (!(f = fopen(path, "r"))) {
		diag("cannot open %s", path);
		return NULL;
	}
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	rewind(f);
	buf = malloc((size_t)n + 1);
	if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
		free(buf);
		buf = NULL;
	}
	if (buf)
		buf[n] = '\0';
	fclose(f);
	return buf;
}

/* The line starting at p, trimmed, into buf. */
static const char *
line_at(const char *p, char *buf, size_t len)
{
	size_t n = strcspn(p, "\n");

	while (n && (*p == ' ' || *p == '\t'))
		p++, n--;
	while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\r'))
		n--;
	if (n >= len)
		n = len - 1;
	memcpy(buf, p, n);
	buf[n] = '\0';
	return buf;
}

/* Does any line of text, trimmed, equal want (or start with it, then a space)? */
static int
has_line(const char *text, const char *want, int prefix)
{
	char buf[1024];
	const char *p;
	size_t n = strlen(want);

	for (p = text; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		line_at(p, buf, sizeof buf);
		if (prefix ? strncmp(buf, want, n) == 0 && (buf[n] == ' ' || buf[n] == '\0')
		    : strcmp(buf, want) == 0)
			return 1;
	}
	return 0;
}

static void
test_docs(void)
{
	char *sample = slurp("etc/imapfresh.conf.sample");
	char *man = slurp("man/imapfresh.conf.5");
	const struct config_key *k;
	char want[1200];
	int missing_sample = 0, missing_man = 0, struct_ok = 1;
	struct config c;
	char path[512];

	ok(sample != NULL, "etc/imapfresh.conf.sample readable");
	ok(man != NULL, "man/imapfresh.conf.5 readable");
	for (k = config_table; k->name && sample && man; k++) {
		const char *entry, *end;

		/* Sample: the default as a commented-out line, or at least a "#key =" line. */
		if (k->def)
			snprintf(want, sizeof want, "#%s = %s", k->name, k->def);
		else
			snprintf(want, sizeof want, "#%s =", k->name);
		if (!has_line(sample, want, !k->def)) {
			missing_sample++;
			diag("sample lacks a \"%s\" line", want);
		}
		/* Man page: an ".It Cm key" entry whose text shows the default. */
		snprintf(want, sizeof want, "\n.It Cm %s", k->name);
		entry = strstr(man, want);
		while (entry && entry[strlen(want)] != ' ' && entry[strlen(want)] != '\n')
			entry = strstr(entry + 1, want);
		end = entry ? strstr(entry + 1, "\n.It ") : NULL;
		if (!entry || (k->def && !strstr(entry, k->def))
		    || (k->def && end && strstr(entry, k->def) > end)) {
			missing_man++;
			diag("imapfresh.conf(5) lacks an entry for %s showing its default", k->name);
		}
	}
	ok(sample && missing_sample == 0, "every key documented in imapfresh.conf.sample");
	ok(man && missing_man == 0, "every key documented in imapfresh.conf(5)");

	/* The sample's working example must itself load and validate. */
	if (sample) {
		write_temp(sample, strlen(sample), path, sizeof path);
		config_defaults(&c);
		struct_ok = config_load_file(&c, path, err, sizeof err) == 0;
		unlink(path);
		/* Certificate paths in the sample need not exist here: check the rest. */
		set(&c, "tls_cert", "");
		set(&c, "listen_tls", "");
		set(&c, "require_tls", "no");
	}
	ok_err(sample && struct_ok && c.n_listen == 1 && strcmp(c.upstream.port, "143") == 0
	    && config_validate(&c, err, sizeof err) == 0, "sample's example loads and validates");
	free(sample);
	free(man);
}

int
main(void)
{
	const char *t = getenv("TMPDIR");

	snprintf(tmpdir, sizeof tmpdir, "%s", t && *t ? t : "/tmp");
	test_defaults();
	test_table();
	test_coverage();
	test_bad_values();
	test_good_values();
	test_parse_addr();
	test_redis_auth();
	test_file();
	test_validate();
	test_docs();
	return tap_done();
}
