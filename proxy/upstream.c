/* upstream: a session's link to the backend server: connect, TLS, STARTTLS. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <event2/bufferevent_ssl.h>
#include <event2/dns.h>

#include "log.h"
#include "metrics.h"
#include "proxyproto.h"
#include "relay.h"
#include "session.h"
#include "tls.h"
#include "upstream.h"

static void upstream_read_cb(struct bufferevent *bev, void *arg);
static void upstream_write_cb(struct bufferevent *bev, void *arg);
static void upstream_event_cb(struct bufferevent *bev, short what, void *arg);

static void
upstream_set_callbacks(struct session *s)
{
	bufferevent_setcb(s->up, upstream_read_cb, upstream_write_cb, upstream_event_cb, s);
	s->up_link = relay_link_of(s->up);
	relay_input_cap(s->up, s->up_link, SESSION_READ_HIGH);
	relay_io_sizes(s->up);
	bufferevent_enable(s->up, EV_READ | EV_WRITE);
}

/* Until the greeting arrives, timeout_connect bounds the wait. */
static void
upstream_set_connect_timeout(struct session *s)
{
	struct timeval t = { s->srv->cfg.timeout_connect, 0 };

	bufferevent_set_timeouts(s->up, &t, &t);
}

static void
upstream_fail(struct session *s, const char *what, const char *detail)
{
	const struct config *cfg = &s->srv->cfg;
	char bye[600], why[700], addr[300];

	s->srv->stats.upstream_connect_failures++;
	snprintf(why, sizeof(why), "upstream %s %s: %s",
	    config_fmt_addr(&cfg->upstream, addr, sizeof(addr)), what, detail);
	snprintf(bye, sizeof(bye), "[UNAVAILABLE] Backend server unavailable (%s)", what);
	log_msg(LOG_LEVEL_WARNING, s->sid, "%s", why);
	s->srv->stats.upstream_last_failure = time(NULL);
	snprintf(s->srv->stats.upstream_last_error, sizeof(s->srv->stats.upstream_last_error),
	    "%s: %s", what, detail);
	session_close(s, bye, why);
}

void
upstream_connect(struct session *s)
{
	struct server *srv = s->srv;
	const struct config *cfg = &srv->cfg;
	int r;

	s->connect_start_usec = metrics_now_usec();

	if (cfg->upstream_tls == UPSTREAM_TLS_TLS) {
		SSL *ssl = tls_upstream_ssl_new(srv->tls_client, cfg);
		s->up = ssl ? tls_bufferevent_new(srv->base, -1, ssl, 0) : NULL;
	} else
		/* Not deferred, as the client's socket (session_start()); its
		 * connect reports defer themselves. */
		s->up = bufferevent_socket_new(srv->base, -1, BEV_OPT_CLOSE_ON_FREE);
	if (s->up == NULL) {
		upstream_fail(s, "setup", "out of memory");
		return;
	}
	upstream_set_callbacks(s);
	upstream_set_connect_timeout(s);
	/* An address literal needs no resolver: libevent's getaddrinfo parses one
	 * with sscanf, twice, 6 % of a session's instructions. Names are resolved
	 * for every session, so that DNS changes apply. */
	if (cfg->upstream_salen > 0)
		r = bufferevent_socket_connect(s->up, (const struct sockaddr *)&cfg->upstream_sa,
		    (int)cfg->upstream_salen);
	else
		r = bufferevent_socket_connect_hostname(s->up, srv->dns, AF_UNSPEC,
		    cfg->upstream.host, atoi(cfg->upstream.port));
	if (r < 0) {
		int dns_err = bufferevent_socket_get_dns_error(s->up);
		upstream_fail(s, "connect", dns_err ? evutil_gai_strerror(dns_err) :
		    evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
	}
}

void
upstream_starttls(struct session *s)
{
	SSL *ssl = tls_upstream_ssl_new(s->srv->tls_client, &s->srv->cfg);

	s->up = ssl ? tls_upgrade(s->up, ssl, 0) : NULL;
	if (s->up == NULL) {
		upstream_fail(s, "STARTTLS", "cannot set up TLS");
		return;
	}
	upstream_set_callbacks(s);
	upstream_set_connect_timeout(s);
}

/* upstream_client_address = proxy-v1/v2: the header goes first, before the
 * server says anything. */
static void
upstream_send_proxy_header(struct session *s)
{
	enum client_address_mode mode = s->srv->cfg.upstream_client_address;
	unsigned char hdr[PROXYPROTO_MAX_HEADER];
	size_t n;

	if (mode != CLIENT_ADDRESS_PROXY_V1 && mode != CLIENT_ADDRESS_PROXY_V2)
		return;
	n = proxyproto_write(mode == CLIENT_ADDRESS_PROXY_V1 ? 1 : 2,
	    (struct sockaddr *)&s->client_sa, (struct sockaddr *)&s->local_sa, hdr, sizeof(hdr));
	if (n == 0) {
		log_msg(LOG_LEVEL_WARNING, s->sid, "no PROXY header for %s (address family)",
		    s->client_addr);
		return;
	}
	evbuffer_add(bufferevent_get_output(s->up), hdr, n);
}

static void
upstream_read_cb(struct bufferevent *bev, void *arg)
{
	struct session *s = arg;

	relay_read_more(bev, s->up_link, SESSION_READ_HIGH);
	session_upstream_process(s);
	/* s->up, not bev: a failure frees it, STARTTLS replaces it. */
	if (s->up != NULL)
		relay_input_cap_check(s->up, s->up_link, SESSION_READ_HIGH);
}

static void
upstream_write_cb(struct bufferevent *bev, void *arg)
{
	struct session *s = arg;

	if (s->client_paused &&
	    evbuffer_get_length(bufferevent_get_output(bev)) <= SESSION_OUT_LOW)
		session_resume_reading(s, s->client);
}

static void
upstream_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct session *s = arg;
	char detail[512];
	int one = 1;

	if (what & BEV_EVENT_CONNECTED) {
		setsockopt(bufferevent_getfd(bev), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		relay_read_hook(bev);	/* connected: its fd is set for good */
		if (bufferevent_openssl_get_ssl(bev) != NULL) {
			tls_describe(bev, detail, sizeof(detail));
			log_msg(LOG_LEVEL_DEBUG, s->sid, "upstream TLS established: %s", detail);
		}
		if (s->state == SESSION_CONNECTING) {
			upstream_send_proxy_header(s);
			session_enter(s, SESSION_GREETING, "upstream connected");
		}
		else if (s->state == SESSION_UPSTREAM_STARTTLS)
			session_upstream_start(s);
		return;
	}
	if (what & BEV_EVENT_TIMEOUT) {
		upstream_fail(s, s->state == SESSION_CONNECTING ? "connect" : "greeting",
		    "timed out");
		return;
	}
	if (s->state < SESSION_RUNNING) {
		int err = EVUTIL_SOCKET_ERROR();

		const char *phase = s->state == SESSION_CONNECTING ? "connect" :
		    s->state == SESSION_GREETING ? "greeting" : "STARTTLS";

		detail[0] = '\0';
		if (bufferevent_socket_get_dns_error(bev))
			snprintf(detail, sizeof(detail), "%s",
			    evutil_gai_strerror(bufferevent_socket_get_dns_error(bev)));
		else if (bufferevent_openssl_get_ssl(bev) != NULL) {
			tls_error_describe(bev, detail, sizeof(detail));
			if (strncmp(detail, "connection closed", 17) != 0) {
				s->srv->stats.tls_handshake_failures++;
				phase = "TLS";
			} else
				detail[0] = '\0';
		}
		if (detail[0] == '\0')
			snprintf(detail, sizeof(detail), "%s", (what & BEV_EVENT_ERROR) && err ?
			    evutil_socket_error_to_string(err) : "connection closed");
		upstream_fail(s, phase, detail);
		return;
	}
	/* Running: pass on whatever the upstream said last, then close. */
	s->up_paused = 0;
	session_upstream_process(s);
	session_close(s, s->upstream_bye ? NULL :
	    "[UNAVAILABLE] Backend server closed the connection",
	    s->logged_out ? "client logged out" : "upstream closed the connection");
}
