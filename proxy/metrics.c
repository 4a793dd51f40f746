/* metrics: latency histograms and the Prometheus text rendering of every counter. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <event2/buffer.h>

#include "config-auto.h"
#include "feed.h"
#include "metrics.h"
#include "resync.h"
#include "server.h"
#include "session.h"
#include "store.h"

/* Upper bounds (le) of the buckets: 100 us to 10 s, 1-2.5-5 per decade, so
 * that a fast local Dovecot and a slow remote server both land mid-range. */
const uint64_t metrics_bucket_usec[METRICS_BUCKETS] = {
	100, 250, 500,
	1000, 2500, 5000,
	10000, 25000, 50000,
	100000, 250000, 500000,
	1000000, 2500000, 5000000,
	10000000,
};

void
metrics_observe(struct metrics_histogram *h, uint64_t usec)
{
	h->count++;
	h->sum_usec += usec;
	/* Past the last bound it is only in count: the +Inf bucket. */
	for (int i = 0; i < METRICS_BUCKETS; i++)
		if (usec <= metrics_bucket_usec[i]) {
			h->bucket[i]++;
			break;
		}
}

uint64_t
metrics_now_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* HELP and TYPE precede a family's samples, once. */
static void
metrics_family(struct evbuffer *out, const char *name, const char *type, const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void
metrics_sample(struct evbuffer *out, const char *name, uint64_t value)
{
	evbuffer_add_printf(out, "%s %" PRIu64 "\n", name, value);
}

static void
metrics_counter(struct evbuffer *out, const char *name, const char *help, uint64_t value)
{
	metrics_family(out, name, "counter", help);
	metrics_sample(out, name, value);
}

static void
metrics_gauge(struct evbuffer *out, const char *name, const char *help, uint64_t value)
{
	metrics_family(out, name, "gauge", help);
	metrics_sample(out, name, value);
}

/* A label value: backslash, double quote and line feed escaped (0.0.4). */
static void
metrics_label_value(struct evbuffer *out, const char *v)
{
	for (; *v; v++) {
		if (*v == '\\' || *v == '"')
			evbuffer_add_printf(out, "\\%c", *v);
		else if (*v == '\n')
			evbuffer_add(out, "\\n", 2);
		else
			evbuffer_add(out, v, 1);
	}
}

/* Seconds as Prometheus wants them: bounds are exact decimals, %g keeps them short. */
static void
metrics_seconds(char *buf, size_t len, uint64_t usec)
{
	snprintf(buf, len, "%g", (double)usec / 1e6);
}

static void
metrics_histogram(struct evbuffer *out, const char *name, const char *help,
    const struct metrics_histogram *h)
{
	uint64_t cumulative = 0;
	char le[32];

	metrics_family(out, name, "histogram", help);
	for (int i = 0; i < METRICS_BUCKETS; i++) {
		cumulative += h->bucket[i];
		metrics_seconds(le, sizeof(le), metrics_bucket_usec[i]);
		evbuffer_add_printf(out, "%s_bucket{le=\"%s\"} %" PRIu64 "\n", name, le, cumulative);
	}
	evbuffer_add_printf(out, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, h->count);
	evbuffer_add_printf(out, "%s_sum %" PRIu64 ".%06" PRIu64 "\n", name,
	    h->sum_usec / 1000000u, h->sum_usec % 1000000u);
	evbuffer_add_printf(out, "%s_count %" PRIu64 "\n", name, h->count);
}

static void
metrics_sessions(struct evbuffer *out, struct server *srv)
{
	uint64_t by_state[SESSION_DEAD + 1] = { 0 }, authenticated = 0, resyncing = 0, traced = 0;
	struct session *s;

	TAILQ_FOREACH(s, &srv->sessions, entry) {
		if ((unsigned)s->state <= SESSION_DEAD)
			by_state[s->state]++;
		authenticated += s->authenticated != 0;
		resyncing += s->resync.phase != RESYNC_NONE;
		traced += s->trace != NULL;
	}
	metrics_family(out, "imapfresh_sessions", "gauge", "Live sessions by state.");
	for (int st = 0; st <= SESSION_DEAD; st++)
		evbuffer_add_printf(out, "imapfresh_sessions{state=\"%s\"} %" PRIu64 "\n",
		    session_state_name((enum session_state)st), by_state[st]);
	metrics_gauge(out, "imapfresh_sessions_authenticated", "Live sessions past LOGIN or "
	    "AUTHENTICATE.", authenticated);
	metrics_gauge(out, "imapfresh_sessions_resyncing", "Live sessions with a resync under way.",
	    resyncing);
	metrics_gauge(out, "imapfresh_sessions_traced", "Live sessions being traced.", traced);
	metrics_gauge(out, "imapfresh_sessions_busy", "Live sessions holding per-command state "
	    "(a command, response or resync under way); idle ones hold none.", srv->n_busy);
}

void
metrics_render(struct server *srv, struct evbuffer *out)
{
	const struct server_stats *st = &srv->stats;
	struct feed_stats fs;
	struct store_stats ss;

	store_get_stats(srv->store, &ss);

	metrics_family(out, "imapfresh_build_info", "gauge", "Always 1; the labels say which "
	    "imapfresh this is.");
	evbuffer_add_printf(out, "imapfresh_build_info{version=\"");
	metrics_label_value(out, PACKAGE_VERSION);
	evbuffer_add_printf(out, "\",instance=\"");
	metrics_label_value(out, srv->instance);
	evbuffer_add_printf(out, "\"} 1\n");
	metrics_gauge(out, "imapfresh_process_start_time_seconds", "Start time of the process, "
	    "unix seconds.", (uint64_t)srv->started);

	metrics_counter(out, "imapfresh_connections_accepted_total", "Client connections accepted.",
	    st->accepted);
	metrics_family(out, "imapfresh_connections_refused_total", "counter", "Client connections "
	    "refused, by reason.");
	evbuffer_add_printf(out, "imapfresh_connections_refused_total{reason=\"max_clients\"} %"
	    PRIu64 "\n", st->refused_max_clients);
	evbuffer_add_printf(out, "imapfresh_connections_refused_total{reason=\"proxy_protocol\"} %"
	    PRIu64 "\n", st->proxy_protocol_refused);
	metrics_counter(out, "imapfresh_connections_closed_total", "Client connections closed.",
	    st->closed);
	/* The limit next to the sessions, so that an alert can compare them (per worker). */
	metrics_gauge(out, "imapfresh_max_clients", "Client connections served at once "
	    "(max_clients).", (uint64_t)srv->cfg.max_clients);
	metrics_sessions(out, srv);

	metrics_family(out, "imapfresh_bytes_total", "counter", "Bytes relayed, by direction.");
	evbuffer_add_printf(out, "imapfresh_bytes_total{direction=\"client_to_upstream\"} %" PRIu64
	    "\n", st->bytes_client_to_upstream);
	evbuffer_add_printf(out, "imapfresh_bytes_total{direction=\"upstream_to_client\"} %" PRIu64
	    "\n", st->bytes_upstream_to_client);
	metrics_counter(out, "imapfresh_tls_handshakes_total", "Client TLS handshakes completed.",
	    st->tls_handshakes);
	metrics_counter(out, "imapfresh_tls_handshake_failures_total", "TLS handshakes failed, "
	    "client or upstream side.", st->tls_handshake_failures);
	metrics_counter(out, "imapfresh_upstream_connect_failures_total", "Upstream connections "
	    "that failed (connect, TLS, greeting).", st->upstream_connect_failures);
	metrics_histogram(out, "imapfresh_upstream_connect_seconds", "Upstream connect start to "
	    "ready (greeting, TLS).", &srv->metrics.upstream_connect);

	metrics_counter(out, "imapfresh_commands_total", "Client commands read.", st->commands);
	metrics_counter(out, "imapfresh_commands_rejected_total", "Client commands answered by "
	    "imapfresh and not forwarded (BAD, NO [PRIVACYREQUIRED], TOOBIG).", st->rejected_commands);
	metrics_histogram(out, "imapfresh_command_duration_seconds", "Forwarded command to its "
	    "tagged completion from the upstream.", &srv->metrics.command_latency);

	metrics_counter(out, "imapfresh_resync_checks_total", "Trigger commands examined for "
	    "staleness.", st->resync_checks);
	metrics_counter(out, "imapfresh_resync_injections_total", "NOOP + UID SEARCH injected.",
	    st->resync_injections);
	metrics_counter(out, "imapfresh_resync_stale_detected_total", "Sessions found stale after "
	    "the NOOP.", st->stale_detected);
	metrics_counter(out, "imapfresh_resync_escalations_total", "Transparent re-SELECTs.",
	    st->resync_escalations);
	metrics_counter(out, "imapfresh_resync_idle_refreshes_total", "Idling clients refreshed.",
	    st->resync_idle_refreshes);
	metrics_counter(out, "imapfresh_resync_disconnects_total", "Sessions ended because no "
	    "legal repair existed.", st->resync_disconnects);
	metrics_counter(out, "imapfresh_notifications_total", "Changes told through POST /notify "
	    "(made behind imapfresh's back).", st->notifications);
	metrics_histogram(out, "imapfresh_resync_duration_seconds", "Trigger held (or idle refresh "
	    "begun) to released.", &srv->metrics.resync_latency);

	metrics_gauge(out, "imapfresh_redis_configured", "1 when state is a Redis URL.",
	    (uint64_t)(ss.redis != 0));
	metrics_gauge(out, "imapfresh_redis_connected", "1 while the Redis command link is up.",
	    (uint64_t)(ss.connected != 0));
	metrics_counter(out, "imapfresh_redis_errors_total", "Failed Redis commands and "
	    "connections, and writes dropped while it was down.", ss.errors);
	metrics_counter(out, "imapfresh_redis_reconnects_total", "Redis outages ended.",
	    ss.reconnects);
	metrics_counter(out, "imapfresh_redis_failovers_total", "New Redis masters reached after "
	    "a failover (state = redis-sentinel://).", ss.failovers);
	metrics_counter(out, "imapfresh_redis_published_total", "Mailbox changes published to "
	    "the other instances.", ss.published);
	metrics_counter(out, "imapfresh_redis_received_total", "Mailbox changes heard from the "
	    "other instances.", ss.received);
	metrics_counter(out, "imapfresh_store_changes_received_total", "Change messages Redis "
	    "delivered to this instance (its own included): only those of users with sessions "
	    "here.", ss.messages);
	metrics_gauge(out, "imapfresh_redis_user_channels", "Users' change channels subscribed "
	    "(users with sessions here).", ss.channels);

	feed_get_stats(srv->feed, &fs);
	metrics_gauge(out, "imapfresh_backend_feed_configured", "1 when backend_events is set.",
	    (uint64_t)(fs.configured != 0));
	metrics_gauge(out, "imapfresh_backend_feed_connected", "1 while subscribed to the "
	    "backend's change feed.", (uint64_t)(fs.connected != 0));
	metrics_counter(out, "imapfresh_backend_feed_events_total", "Messages received on the "
	    "backend's change feed.", fs.events);
	metrics_counter(out, "imapfresh_backend_feed_matched_total", "... about a user with "
	    "sessions here.", fs.matched);
	metrics_counter(out, "imapfresh_backend_feed_lookups_total", "Login names looked up in "
	    "the backend's API.", fs.lookups);
	metrics_counter(out, "imapfresh_backend_feed_lookup_failures_total", "... that failed.",
	    fs.lookup_failures);
	metrics_counter(out, "imapfresh_backend_feed_losses_total", "Times the feed was lost "
	    "(every session then resyncs once).", fs.losses);
}
