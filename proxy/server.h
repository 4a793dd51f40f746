/* server: listeners, the session registry, signals, shutdown and reload. */
#ifndef SERVER_H
#define SERVER_H

#include <stdint.h>
#include <time.h>
#include <sys/queue.h>
#include <openssl/ssl.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "config.h"
#include "metrics.h"

struct session;
struct store;
TAILQ_HEAD(session_list, session);

struct server_listener {
	struct evconnlistener *lev;
	struct server *srv;
	int tls;		/* implicit TLS */
	char name[300];		/* host:port for logs */
};

struct server_stats {
	uint64_t accepted, refused_max_clients, closed;
	uint64_t tls_handshakes;		/* client handshakes completed */
	uint64_t proxy_protocol_refused;	/* PROXY headers from untrusted peers, or bad ones */
	uint64_t upstream_connect_failures, tls_handshake_failures;
	time_t upstream_last_ready, upstream_last_failure;	/* unix seconds, 0 = never */
	char upstream_last_error[200];	/* why the last upstream connection failed */
	uint64_t bytes_client_to_upstream, bytes_upstream_to_client;
	uint64_t commands, rejected_commands;
	/* the stale-session fix */
	uint64_t resync_checks;		/* trigger commands examined */
	uint64_t resync_injections;	/* NOOP + UID SEARCH sent */
	uint64_t resync_escalations;	/* re-SELECTs */
	uint64_t stale_detected;	/* sessions found stale after NOOP */
	uint64_t resync_idle_refreshes;	/* idling clients refreshed */
	uint64_t resync_disconnects;	/* sessions ended because no legal repair existed */
	uint64_t notifications;		/* changes told through POST /notify */
};

struct feed;

struct server {
	struct event_base *base;
	struct evdns_base *dns;
	struct config cfg;
	SSL_CTX *tls_server;	/* NULL: no certificate, no TLS offered */
	SSL_CTX *tls_client;	/* towards the upstream */
	struct store *store;	/* generations and session state */
	struct feed *feed;	/* the backend's change feed, or NULL (feed.c) */
	char instance[128];	/* instance_id, or the host name */
	int worker, workers;	/* this process's index, and cfg.workers as started: a
				   reload must not renumber sessions (workers.c) */
	unsigned long long resync_mask;	/* resync_on, parsed */
	char resync_extra[8][32];	/* resync_on names imapfresh has no kind for */
	struct metrics metrics;		/* latency histograms */
	struct trace_rules *trace_rules;	/* which sessions are traced (trace.c) */
	struct events *events;		/* the sync event log (events.c) */
	struct admin *admin;		/* the HTTP endpoint (admin.c) */
	struct proxyproto_trust *trusted;	/* who may send PROXY headers */
	struct proxyproto_trust *secure;	/* secure_networks: plaintext counts as secure */
	time_t started;

	struct server_listener listeners[2 * CONFIG_MAX_LISTEN];
	int n_listeners;
	struct event *ev_listen_retry;	/* listeners paused on EMFILE */

	struct session_list sessions;
	unsigned n_sessions;
	unsigned n_busy;		/* of them, with busy state (session_busy()) */
	struct session_busy *busy_pool;	/* busy states given back, for reuse */
	unsigned n_busy_pool;
	struct session *reap, **reap_tail;	/* closed ones, freed from ev_reap (FIFO) */
	struct event *ev_reap;		/* made by the first session_accept() */
	struct memtrim *memtrim;	/* heap trim after a burst of sessions */
	uint64_t next_session_id;
	struct server_stats stats;

	int shutting_down;
	struct event *ev_shutdown_deadline;
	struct event *sig_term, *sig_int, *sig_hup, *sig_usr2;

	/* What reload re-reads. */
	const char *config_file;
	char *const *overrides;
	int n_overrides;
};

/* Load TLS contexts and bind every listener. err gets one line on failure. */
int server_init(struct server *srv, struct event_base *base, char *err, size_t errlen);

/* Re-read the configuration and certificates; live sessions are kept. */
void server_reload(struct server *srv);

/* Stop accepting, say BYE to every client, exit the loop once all are gone. */
void server_shutdown(struct server *srv, const char *why);

/* Called by a session as it is freed. */
void server_session_gone(struct server *srv, struct session *s);

void server_free(struct server *srv);

/* Grows whenever changes may have been missed: imapfresh's own Redis or the
 * backend's feed lost or regained. Sessions synced under an older one are
 * possibly stale. */
uint64_t server_epoch(const struct server *srv);

/* Build a configuration from the file (may be NULL) and -o overrides. */
int server_load_config(struct config *cfg, const char *file, char *const *overrides,
    int n_overrides, char *err, size_t errlen);

#endif
