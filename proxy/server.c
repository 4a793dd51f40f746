/* server: listeners, the session registry, signals, shutdown and reload. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <event2/dns.h>

#include "feed.h"
#include "log.h"
#include "memtrim.h"
#include "server.h"
#include "admin.h"
#include "events.h"
#include "proxyproto.h"
#include "resync.h"
#include "session.h"
#include "store.h"
#include "tls.h"
#include "trace.h"
#include "track.h"
#include "upgrade.h"

#define SERVER_SHUTDOWN_GRACE_SECS 10	/* longest wait for BYEs to flush */
#define SERVER_ACCEPT_RETRY_SECS 1	/* pause after running out of descriptors */

int
server_load_config(struct config *cfg, const char *file, char *const *overrides, int n_overrides,
    char *err, size_t errlen)
{
	config_defaults(cfg);
	if (file != NULL && config_load_file(cfg, file, err, errlen) < 0)
		return -1;
	for (int i = 0; i < n_overrides; i++) {
		char key[128], sub[1400];
		const char *eq = strchr(overrides[i], '=');
		size_t klen;

		if (eq == NULL || (klen = (size_t)(eq - overrides[i])) >= sizeof(key)) {
			snprintf(err, errlen, "-o %s: expected key=value", overrides[i]);
			return -1;
		}
		memcpy(key, overrides[i], klen);
		key[klen] = '\0';
		while (klen > 0 && key[klen - 1] == ' ')
			key[--klen] = '\0';
		if (config_set(cfg, key, eq + 1 + strspn(eq + 1, " "), sub, sizeof(sub)) < 0) {
			snprintf(err, errlen, "-o %s", sub);
			return -1;
		}
	}
	if (config_validate(cfg, err, errlen) < 0)
		return -1;
	return config_load_secrets(cfg, err, errlen);
}

static void
server_accept_cb(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa, int salen,
    void *arg)
{
	struct server_listener *l = arg;

	if (l->srv->shutting_down) {
		close(fd);
		return;
	}
	session_accept(l->srv, fd, sa, salen, l->tls);
}

static void
server_listen_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;

	if (upgrade_accepting(srv))
		for (int i = 0; i < srv->n_listeners; i++)
			evconnlistener_enable(srv->listeners[i].lev);
}

/* Out of descriptors: accept() would fail in a tight loop, so pause a moment. */
static void
server_accept_error_cb(struct evconnlistener *lev, void *arg)
{
	struct server_listener *l = arg;
	struct server *srv = l->srv;
	int err = EVUTIL_SOCKET_ERROR();
	struct timeval t = { SERVER_ACCEPT_RETRY_SECS, 0 };

	log_warning("accept on %s: %s; pausing new connections for %ds", l->name,
	    evutil_socket_error_to_string(err), SERVER_ACCEPT_RETRY_SECS);
	for (int i = 0; i < srv->n_listeners; i++)
		evconnlistener_disable(srv->listeners[i].lev);
	event_add(srv->ev_listen_retry, &t);
}

static int
server_bind(struct server *srv, const struct config_addr *a, int tls, char *err, size_t errlen)
{
	struct evutil_addrinfo hints = { 0 }, *res = NULL;
	struct server_listener *l = &srv->listeners[srv->n_listeners];
	char key[320];
	int gai, fd;

	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = EVUTIL_AI_PASSIVE | EVUTIL_AI_ADDRCONFIG;
	snprintf(l->name, sizeof(l->name), "%s:%s", a->host, a->port);
	if ((gai = evutil_getaddrinfo(a->host[0] ? a->host : NULL, a->port, &hints, &res)) != 0) {
		snprintf(err, errlen, "%s %s: %s", tls ? "listen_tls" : "listen", l->name,
		    evutil_gai_strerror(gai));
		return -1;
	}
	l->srv = srv;
	l->tls = tls;
	snprintf(key, sizeof(key), "%s=%s", tls ? "listen_tls" : "listen", l->name);
	if ((fd = upgrade_take_fd(key)) >= 0) {
		/* Passed on by the process we replace, or by our master (upgrade.c):
		 * already bound and listening. */
		evutil_freeaddrinfo(res);
		evutil_make_socket_nonblocking(fd);
		l->lev = evconnlistener_new(srv->base, server_accept_cb, l, LEV_OPT_CLOSE_ON_FREE |
		    LEV_OPT_CLOSE_ON_EXEC, 0, fd);
		if (l->lev == NULL) {
			snprintf(err, errlen, "%s %s: cannot use the socket passed on",
			    tls ? "listen_tls" : "listen", l->name);
			close(fd);
			return -1;
		}
		evconnlistener_set_error_cb(l->lev, server_accept_error_cb);
		srv->n_listeners++;
		log_notice("listening on %s%s, socket passed on", l->name, tls ? " (implicit TLS)" :
		    srv->tls_server ? " (STARTTLS)" : "");
		return 0;
	}
	/* Workers' sockets come from the master; should one be missing, several
	 * workers each bind every listener and the kernel spreads connections. */
	l->lev = evconnlistener_new_bind(srv->base, server_accept_cb, l,
	    LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC |
	    (srv->workers > 1 ? LEV_OPT_REUSEABLE_PORT : 0), 1024,
	    res->ai_addr, (int)res->ai_addrlen);
	evutil_freeaddrinfo(res);
	if (l->lev == NULL) {
		snprintf(err, errlen, "%s %s: %s", tls ? "listen_tls" : "listen", l->name,
		    strerror(errno));
		return -1;
	}
	evconnlistener_set_error_cb(l->lev, server_accept_error_cb);
	srv->n_listeners++;
	log_notice("listening on %s%s", l->name, tls ? " (implicit TLS)" :
	    srv->tls_server ? " (STARTTLS)" : "");
	return 0;
}

static void
server_signal_cb(evutil_socket_t sig, short what, void *arg)
{
	struct server *srv = arg;

	if (sig == SIGHUP)
		server_reload(srv);
	else if (sig == SIGUSR2)
		upgrade_start(srv);
	else
		server_shutdown(srv, sig == SIGTERM ? "SIGTERM" : "SIGINT");
}

static int
server_load_tls(const struct config *cfg, SSL_CTX **server_ctx, SSL_CTX **client_ctx, char *err,
    size_t errlen)
{
	*server_ctx = tls_server_ctx_new(cfg, err, errlen);
	if (*server_ctx == NULL && err[0] != '\0')
		return -1;
	*client_ctx = tls_client_ctx_new(cfg, err, errlen);
	if (*client_ctx == NULL) {
		if (*server_ctx != NULL)
			SSL_CTX_free(*server_ctx);
		return -1;
	}
	return 0;
}

/* resync_on names commands; unknown ones are a configuration error. */
static int
server_load_resync(struct server *srv, const struct config *cfg, char *err, size_t errlen)
{
	if (resync_parse_triggers(cfg->resync_on, &srv->resync_mask, srv->resync_extra) < 0) {
		snprintf(err, errlen, "resync_on: at most 8 commands of up to 31 characters that "
		    "imapfresh does not know: %s", cfg->resync_on);
		return -1;
	}
	return 0;
}

/* Redis (re)gained (store.c): a restarted Redis lost every session key and
 * saves made during the outage were dropped, so every live session's state
 * is written again now, an idle session's included. */
static void
server_store_up(void *arg)
{
	struct server *srv = arg;
	struct session *s;
	unsigned n = 0;

	TAILQ_FOREACH(s, &srv->sessions, entry)
		if (s->state != SESSION_DEAD)
			n += (unsigned)track_save_again(s);
	if (n > 0)
		log_info("redis: state of %u live sessions written again", n);
}

/* The Redis master moved: the event log says so (every session resyncs once). */
static void
server_store_failover(void *arg, const char *from, const char *to)
{
	events_failover(arg, from, to);
}

int
server_init(struct server *srv, struct event_base *base, char *err, size_t errlen)
{
	srv->base = base;
	TAILQ_INIT(&srv->sessions);
	if (srv->cfg.instance_id[0] != '\0')
		snprintf(srv->instance, sizeof(srv->instance), "%s", srv->cfg.instance_id);
	else if (gethostname(srv->instance, sizeof(srv->instance) - 1) < 0)
		snprintf(srv->instance, sizeof(srv->instance), "imapfresh");
	if (server_load_resync(srv, &srv->cfg, err, errlen) < 0)
		return -1;
	if (server_load_tls(&srv->cfg, &srv->tls_server, &srv->tls_client, err, errlen) < 0)
		return -1;
	if ((srv->store = store_new(base, &srv->cfg, session_store_notify, err, errlen)) == NULL)
		return -1;
	store_set_up_callback(srv->store, server_store_up, srv);
	store_set_failover_callback(srv->store, server_store_failover, srv);
	store_set_listening_callback(srv->store, session_store_listening);
	if ((srv->feed = feed_new(srv, err, errlen)) == NULL && err[0])
		return -1;
	srv->started = time(NULL);
	if (proxyproto_trust_parse(srv->cfg.proxy_protocol_trusted, &srv->trusted) < 0) {
		snprintf(err, errlen, "proxy_protocol_trusted: cannot parse %s",
		    srv->cfg.proxy_protocol_trusted);
		return -1;
	}
	if (proxyproto_trust_parse(srv->cfg.secure_networks, &srv->secure) < 0) {
		snprintf(err, errlen, "secure_networks: cannot parse %s", srv->cfg.secure_networks);
		return -1;
	}
	if (trace_set(srv, srv->cfg.trace, err, errlen) < 0 || events_open(srv, err, errlen) < 0 ||
	    admin_start(srv, err, errlen) < 0)
		return -1;
	srv->dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
	if (srv->dns == NULL)
		srv->dns = evdns_base_new(base, 0);	/* no resolv.conf: literal addresses still work */
	srv->ev_listen_retry = evtimer_new(base, server_listen_retry_cb, srv);
	if ((srv->memtrim = memtrim_new(base)) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (int i = 0; i < srv->cfg.n_listen; i++)
		if (server_bind(srv, &srv->cfg.listen[i], 0, err, errlen) < 0)
			return -1;
	for (int i = 0; i < srv->cfg.n_listen_tls; i++)
		if (server_bind(srv, &srv->cfg.listen_tls[i], 1, err, errlen) < 0)
			return -1;
	srv->sig_term = evsignal_new(base, SIGTERM, server_signal_cb, srv);
	srv->sig_int = evsignal_new(base, SIGINT, server_signal_cb, srv);
	srv->sig_hup = evsignal_new(base, SIGHUP, server_signal_cb, srv);
	srv->sig_usr2 = evsignal_new(base, SIGUSR2, server_signal_cb, srv);
	event_add(srv->sig_term, NULL);
	event_add(srv->sig_int, NULL);
	event_add(srv->sig_hup, NULL);
	event_add(srv->sig_usr2, NULL);
	return 0;
}

static int
server_same_listeners(const struct config *a, const struct config *b)
{
	return a->n_listen == b->n_listen && a->n_listen_tls == b->n_listen_tls &&
	    memcmp(a->listen, b->listen, sizeof(a->listen[0]) * a->n_listen) == 0 &&
	    memcmp(a->listen_tls, b->listen_tls, sizeof(a->listen_tls[0]) * a->n_listen_tls) == 0;
}

/* A Redis URL without its credentials into buf: what a reload cannot
 * change without a restart. */
static const char *
server_url_target(const char *url, char *buf, size_t len)
{
	const char *start = strstr(url, "://"), *at = strrchr(url, '@');

	if (start && at && at > start)
		snprintf(buf, len, "%.*s%s", (int)(start + 3 - url), url, at + 1);
	else
		snprintf(buf, len, "%s", url);
	return buf;
}

/* A reload's Redis credentials: used from the next connection when the
 * server stays the same (a password rotated), else at the restart. */
static void
server_reload_auth(struct server *srv, const struct config *next)
{
	char a[1100], b[1100];
	int same_state = strcmp(server_url_target(srv->cfg.state, a, sizeof(a)),
	    server_url_target(next->state, b, sizeof(b))) == 0;
	int same_feed = strcmp(server_url_target(srv->cfg.backend_redis, a, sizeof(a)),
	    server_url_target(next->backend_redis, b, sizeof(b))) == 0;

	if (same_state && (strcmp(srv->cfg.state, next->state) != 0 ||
	    strcmp(srv->cfg.state_password, next->state_password) != 0 ||
	    strcmp(srv->cfg.sentinel_user, next->sentinel_user) != 0 ||
	    strcmp(srv->cfg.sentinel_password, next->sentinel_password) != 0)) {
		store_set_auth(srv->store, next);
		log_notice("reload: new state store credentials, used from its next connection");
	}
	if (same_feed && srv->cfg.backend_events == next->backend_events &&
	    (strcmp(srv->cfg.backend_redis, next->backend_redis) != 0 ||
	    strcmp(srv->cfg.backend_redis_password, next->backend_redis_password) != 0)) {
		feed_set_auth(srv->feed, next);
		log_notice("reload: new backend_redis credentials, used from its next connection");
	}
}

void
server_reload(struct server *srv)
{
	struct config *next = malloc(sizeof(*next));
	SSL_CTX *tls_server, *tls_client;
	char err[2048], target[2][1100];

	log_notice("SIGHUP: reloading configuration");
	if (next == NULL)
		return;
	if (server_load_config(next, srv->config_file, srv->overrides, srv->n_overrides, err,
	    sizeof(err)) < 0 || server_load_resync(srv, next, err, sizeof(err)) < 0 ||
	    server_load_tls(next, &tls_server, &tls_client, err, sizeof(err)) < 0) {
		log_error("reload failed, keeping the running configuration: %s", err);
		free(next);
		return;
	}
	if (!server_same_listeners(&srv->cfg, next))
		log_warning("reload: listener changes take effect only after a restart");
	if (strcmp(server_url_target(srv->cfg.state, target[0], sizeof(target[0])),
	    server_url_target(next->state, target[1], sizeof(target[1]))) != 0 ||
	    strcmp(srv->cfg.redis_prefix, next->redis_prefix) != 0 ||
	    strcmp(srv->cfg.instance_id, next->instance_id) != 0 ||
	    srv->cfg.redis_publish_global != next->redis_publish_global)
		log_warning("reload: state, redis_prefix, redis_publish_global and instance_id take "
		    "effect only after a restart");
	if (srv->cfg.backend_events != next->backend_events ||
	    strcmp(server_url_target(srv->cfg.backend_redis, target[0], sizeof(target[0])),
	    server_url_target(next->backend_redis, target[1], sizeof(target[1]))) != 0 ||
	    strcmp(srv->cfg.backend_api, next->backend_api) != 0 ||
	    strcmp(srv->cfg.backend_api_token, next->backend_api_token) != 0 ||
	    srv->cfg.backend_id_ttl != next->backend_id_ttl)
		log_warning("reload: backend_* keys take effect only after a restart");
	if (srv->cfg.workers != next->workers)
		log_warning("reload: workers takes effect only after a restart");
	server_reload_auth(srv, next);
	/* Listeners stay as bound; everything else is replaced whole. */
	memcpy(next->listen, srv->cfg.listen, sizeof(next->listen));
	memcpy(next->listen_tls, srv->cfg.listen_tls, sizeof(next->listen_tls));
	next->n_listen = srv->cfg.n_listen;
	next->n_listen_tls = srv->cfg.n_listen_tls;
	if (strcmp(srv->cfg.admin_listen, next->admin_listen) != 0)
		log_warning("reload: admin_listen takes effect only after a restart");
	if (strcmp(srv->cfg.proxy_protocol_trusted, next->proxy_protocol_trusted) != 0) {
		struct proxyproto_trust *t = NULL;
		if (proxyproto_trust_parse(next->proxy_protocol_trusted, &t) == 0) {
			proxyproto_trust_free(srv->trusted);
			srv->trusted = t;
		}
	}
	if (strcmp(srv->cfg.secure_networks, next->secure_networks) != 0) {
		struct proxyproto_trust *t = NULL;
		if (proxyproto_trust_parse(next->secure_networks, &t) == 0) {
			proxyproto_trust_free(srv->secure);
			srv->secure = t;
		}
	}
	srv->cfg = *next;
	free(next);
	if (events_open(srv, err, sizeof(err)) < 0)
		log_error("reload: %s", err);
	if (strcmp(trace_get(srv), srv->cfg.trace) != 0 && trace_set(srv, srv->cfg.trace, err,
	    sizeof(err)) < 0)
		log_error("reload: %s", err);
	/* Live sessions hold their own references to the old contexts. */
	if (srv->tls_server != NULL)
		SSL_CTX_free(srv->tls_server);
	SSL_CTX_free(srv->tls_client);
	srv->tls_server = tls_server;
	srv->tls_client = tls_client;
	log_set_level(srv->cfg.log_level);
	log_notice("reload complete; %u live sessions kept", srv->n_sessions);
}

static void
server_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;

	log_warning("shutdown: %u sessions still flushing after %ds, exiting", srv->n_sessions,
	    SERVER_SHUTDOWN_GRACE_SECS);
	event_base_loopexit(srv->base, NULL);
}

void
server_shutdown(struct server *srv, const char *why)
{
	struct session *s;
	struct timeval grace = { SERVER_SHUTDOWN_GRACE_SECS, 0 };

	if (srv->shutting_down)
		return;
	srv->shutting_down = 1;
	log_notice("%s: shutting down, %u sessions", why, srv->n_sessions);
	for (int i = 0; i < srv->n_listeners; i++)
		evconnlistener_disable(srv->listeners[i].lev);
	TAILQ_FOREACH(s, &srv->sessions, entry)
		session_close(s, "Server shutting down", "server shutdown");
	if (srv->n_sessions == 0) {
		event_base_loopexit(srv->base, NULL);
		return;
	}
	srv->ev_shutdown_deadline = evtimer_new(srv->base, server_deadline_cb, srv);
	event_add(srv->ev_shutdown_deadline, &grace);
}

void
server_session_gone(struct server *srv, struct session *s)
{
	if ((srv->shutting_down || upgrade_draining(srv)) && srv->n_sessions == 0)
		event_base_loopexit(srv->base, NULL);
}

void
server_free(struct server *srv)
{
	const struct server_stats *st = &srv->stats;
	struct store_stats ss;

	store_get_stats(srv->store, &ss);
	log_notice("resync totals: %llu checks, %llu injections, %llu stale detected, "
	    "%llu escalations, %llu idle refreshes, %llu disconnects; state store errors %llu",
	    (unsigned long long)st->resync_checks, (unsigned long long)st->resync_injections,
	    (unsigned long long)st->stale_detected, (unsigned long long)st->resync_escalations,
	    (unsigned long long)st->resync_idle_refreshes,
	    (unsigned long long)st->resync_disconnects, (unsigned long long)ss.errors);
	log_notice("totals: %llu sessions accepted, %llu refused (max_clients), %llu upstream "
	    "connect failures, %llu TLS handshake failures, %llu commands (%llu refused), "
	    "%llu bytes to upstream, %llu bytes to clients",
	    (unsigned long long)st->accepted, (unsigned long long)st->refused_max_clients,
	    (unsigned long long)st->upstream_connect_failures,
	    (unsigned long long)st->tls_handshake_failures, (unsigned long long)st->commands,
	    (unsigned long long)st->rejected_commands,
	    (unsigned long long)st->bytes_client_to_upstream,
	    (unsigned long long)st->bytes_upstream_to_client);
	for (int i = 0; i < srv->n_listeners; i++)
		evconnlistener_free(srv->listeners[i].lev);
	admin_stop(srv);
	events_close(srv);
	trace_free_rules(srv);
	proxyproto_trust_free(srv->trusted);
	proxyproto_trust_free(srv->secure);
	if (srv->ev_listen_retry)
		event_free(srv->ev_listen_retry);
	if (srv->ev_shutdown_deadline)
		event_free(srv->ev_shutdown_deadline);
	if (srv->ev_reap)
		event_free(srv->ev_reap);
	session_busy_pool_free(srv);
	memtrim_free(srv->memtrim);
	srv->memtrim = NULL;	/* memtrim_note() of a session freed later does nothing */
	if (srv->sig_term)
		event_free(srv->sig_term);
	if (srv->sig_int)
		event_free(srv->sig_int);
	if (srv->sig_hup)
		event_free(srv->sig_hup);
	if (srv->sig_usr2)
		event_free(srv->sig_usr2);
	upgrade_free(srv);
	feed_free(srv->feed);
	srv->feed = NULL;
	if (srv->dns)
		evdns_base_free(srv->dns, 0);
	if (srv->tls_server)
		SSL_CTX_free(srv->tls_server);
	if (srv->tls_client)
		SSL_CTX_free(srv->tls_client);
	if (srv->store)
		store_free(srv->store);
}

uint64_t
server_epoch(const struct server *srv)
{
	return (srv->store ? store_epoch(srv->store) : 0) + feed_epoch(srv->feed);
}
