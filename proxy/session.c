/* session: one client connection paired with its own upstream connection. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <event2/bufferevent_ssl.h>

#include "log.h"
#include "memtrim.h"
#include "metrics.h"
#include "session.h"
#include "trace.h"
#include "tls.h"
#include "proxyproto.h"
#include "relay.h"
#include "upstream.h"

#define SESSION_CLOSE_FLUSH_SECS 10	/* how long a closing session may flush */

static const char *const session_state_names[] = {
	[SESSION_PROXY_HEADER] = "proxy-header",
	[SESSION_CONNECTING] = "connecting",
	[SESSION_GREETING] = "greeting",
	[SESSION_UPSTREAM_STARTTLS] = "upstream-starttls",
	[SESSION_RUNNING] = "running",
	[SESSION_CLIENT_STARTTLS] = "client-starttls",
	[SESSION_CLOSING] = "closing",
	[SESSION_DEAD] = "dead",
};

static void session_client_read_cb(struct bufferevent *bev, void *arg);
static void session_client_write_cb(struct bufferevent *bev, void *arg);
static void session_client_event_cb(struct bufferevent *bev, short what, void *arg);
static void session_free_cb(evutil_socket_t fd, short what, void *arg);
static void session_reap_cb(evutil_socket_t fd, short what, void *arg);
static void session_busy_free(struct session *s);

const char *
session_state_name(enum session_state st)
{
	return session_state_names[st];
}

void
session_enter(struct session *s, enum session_state next, const char *why)
{
	log_msg(LOG_LEVEL_DEBUG, s->sid, "state %s -> %s (%s)", session_state_names[s->state],
	    session_state_names[next], why);
	s->state = next;
	session_set_timeouts(s);
}

/* The address and port of an IPv4/IPv6 socket address; 0 for anything else. */
static int
session_addr_parts(const struct sockaddr *sa, char *ip, size_t iplen, unsigned *port)
{
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
		inet_ntop(AF_INET, &sin->sin_addr, ip, (socklen_t)iplen);
		*port = ntohs(sin->sin_port);
		return AF_INET;
	}
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
		inet_ntop(AF_INET6, &sin6->sin6_addr, ip, (socklen_t)iplen);
		*port = ntohs(sin6->sin6_port);
		return AF_INET6;
	}
	snprintf(ip, iplen, "?");
	*port = 0;
	return 0;
}

static void
session_format_addr(struct sockaddr *sa, char *buf, size_t len)
{
	char host[INET6_ADDRSTRLEN];
	unsigned port;

	switch (session_addr_parts(sa, host, sizeof(host), &port)) {
	case AF_INET:
		snprintf(buf, len, "%s:%u", host, port);
		break;
	case AF_INET6:
		snprintf(buf, len, "[%s]:%u", host, port);
		break;
	default:
		snprintf(buf, len, "unix");
	}
}

void
session_set_client_callbacks(struct session *s)
{
	bufferevent_setcb(s->client, session_client_read_cb, session_client_write_cb,
	    session_client_event_cb, s);
	s->client_link = relay_link_of(s->client);
	relay_input_cap(s->client, s->client_link, SESSION_READ_HIGH);
	relay_io_sizes(s->client);
	bufferevent_enable(s->client, EV_READ | EV_WRITE);
}

static void
session_login_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session *s = arg;

	if (!s->authenticated)
		session_close(s, "Disconnected: no login in time", "no login within timeout_preauth");
}

/* timeout_preauth bounds the whole time before login, not just silences: a
 * client trickling a byte now and then must not hold a slot for ever. */
static void
session_login_deadline(struct session *s)
{
	struct timeval t = { s->srv->cfg.timeout_preauth, 0 };

	s->ev_login = evtimer_new(s->srv->base, session_login_deadline_cb, s);
	if (s->ev_login != NULL)
		evtimer_add(s->ev_login, &t);
}

int
session_link_secure(const struct session *s)
{
	/* The real client's address: behind a balancer, not the balancer's. */
	return !s->srv->cfg.require_tls || s->client_tls ||
	    (!s->client_unknown && proxyproto_trusted(s->srv->secure,
	    (const struct sockaddr *)&s->client_sa));
}

void
session_login_done(struct session *s)
{
	if (s->ev_login != NULL) {
		event_free(s->ev_login);
		s->ev_login = NULL;
	}
}

/* The client socket is ours to use: TLS or not, then the upstream. */
static void
session_start(struct session *s, int fd)
{
	struct server *srv = s->srv;
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (s->listener_tls) {
		SSL *ssl = SSL_new(srv->tls_server);
		s->client = ssl ? tls_bufferevent_new(srv->base, fd, ssl, 1) : NULL;
		s->client_tls = s->client_tls_pending = 1;
	} else
		/* Callbacks not deferred: a socket bufferevent calls them only
		 * from its own events (read, write, timeout), never from a call
		 * of ours, and a deferred one costs a second dispatch per read. */
		s->client = bufferevent_socket_new(srv->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (s->client == NULL) {
		close(fd);
		log_msg(LOG_LEVEL_ERROR, s->sid, "out of memory setting up the session");
		session_close(s, NULL, "setup failed");
		return;
	}
	session_set_client_callbacks(s);
	relay_read_hook(s->client);
	trace_session_update(s);
	session_login_deadline(s);
	if (srv->n_sessions > (unsigned)srv->cfg.max_clients) {
		srv->stats.refused_max_clients++;
		log_msg(LOG_LEVEL_WARNING, s->sid, "max_clients (%d) reached, refusing",
		    srv->cfg.max_clients);
		session_close(s, "[UNAVAILABLE] Too many connections, try again later",
		    "max_clients reached");
		return;
	}
	session_enter(s, SESSION_CONNECTING, "client accepted");
	upstream_connect(s);
}

static void
session_proxy_done(struct session *s)
{
	event_free(s->ev_proxy);
	s->ev_proxy = NULL;
}

/* A trusted balancer speaks first. The header is peeked, then exactly its
 * bytes consumed, so whatever follows (a TLS ClientHello) stays unread. */
static void
session_proxy_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session *s = arg;
	unsigned char buf[PROXYPROTO_MAX_HEADER];
	struct sockaddr_storage src;
	const char *err = NULL;
	size_t used = 0;
	ssize_t n;

	if (what & EV_TIMEOUT) {
		err = "no PROXY header in time";
		goto fail;
	}
	n = recv(fd, buf, sizeof(buf), MSG_PEEK);
	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		err = "closed before its PROXY header";
		goto fail;
	}
	switch (proxyproto_parse(buf, (size_t)n, &used, &src, &err)) {
	case PROXYPROTO_MORE:
		if ((size_t)n < sizeof(buf))
			return;
		err = "PROXY header too long";
		goto fail;
	case PROXYPROTO_ERROR:
		goto fail;
	case PROXYPROTO_DONE:
		break;
	}
	if (recv(fd, buf, used, 0) != (ssize_t)used) {
		err = "cannot read the PROXY header";
		goto fail;
	}
	if (src.ss_family != AF_UNSPEC) {
		char was[64];
		snprintf(was, sizeof(was), "%s", s->client_addr);
		memcpy(&s->client_sa, &src, sizeof(s->client_sa));	/* INET or INET6 */
		session_format_addr((struct sockaddr *)&src, s->client_addr, sizeof(s->client_addr));
		log_msg(LOG_LEVEL_INFO, s->sid, "PROXY header from %s: client %s", was, s->client_addr);
	} else
		s->client_unknown = 1;
	session_proxy_done(s);
	session_start(s, fd);
	return;
fail:
	s->srv->stats.proxy_protocol_refused++;
	log_msg(LOG_LEVEL_WARNING, s->sid, "refusing connection from %s: %s", s->client_addr, err);
	session_proxy_done(s);
	close(fd);
	session_close(s, NULL, err);
}

void
session_accept(struct server *srv, int fd, struct sockaddr *sa, int salen, int tls)
{
	struct session *s;
	socklen_t len = sizeof(s->local_sa);

	if ((s = calloc(1, sizeof(*s))) == NULL) {
		close(fd);
		return;
	}
	s->srv = srv;
	/* Worker w of n numbers its sessions w+1, w+1+n, ...: unique in a shared log. */
	s->id = srv->next_session_id++ * (uint64_t)(srv->workers > 0 ? srv->workers : 1) +
	    (uint64_t)srv->worker + 1;
	snprintf(s->sid, sizeof(s->sid), "s%llu", (unsigned long long)s->id);
	session_format_addr(sa, s->client_addr, sizeof(s->client_addr));
	memcpy(&s->client_sa, sa, (size_t)salen < sizeof(s->client_sa) ? (size_t)salen :
	    sizeof(s->client_sa));	/* at least the family */
	getsockname(fd, (struct sockaddr *)&s->local_sa, &len);
	s->listener_tls = tls;
	s->proxy_fd = -1;
	session_enter(s, SESSION_PROXY_HEADER, "accepted");
	gettimeofday(&s->started, NULL);
	track_init(&s->track);
	resync_init(&s->resync);
	TAILQ_INSERT_TAIL(&srv->sessions, s, entry);
	srv->n_sessions++;
	srv->stats.accepted++;
	memtrim_note(srv->memtrim);

	if (srv->ev_reap == NULL)
		srv->ev_reap = event_new(srv->base, -1, 0, session_reap_cb, srv);
	s->max_line = srv->cfg.max_line;	/* new settings apply to new sessions */
	s->max_literal = srv->cfg.max_literal;
	if (srv->ev_reap == NULL) {
		close(fd);
		log_msg(LOG_LEVEL_ERROR, s->sid, "out of memory setting up the session");
		session_close(s, NULL, "setup failed");
		return;
	}
	log_msg(LOG_LEVEL_INFO, s->sid, "connect from %s%s", s->client_addr, tls ? " (tls)" : "");
	if (proxyproto_trusted(srv->trusted, sa)) {
		struct timeval t = { srv->cfg.timeout_preauth, 0 };

		evutil_make_socket_nonblocking(fd);
		s->ev_proxy = event_new(srv->base, fd, EV_READ | EV_PERSIST, session_proxy_read_cb, s);
		if (s->ev_proxy == NULL || event_add(s->ev_proxy, &t) < 0) {
			close(fd);
			session_close(s, NULL, "setup failed");
		}
		return;
	}
	session_start(s, fd);
}

void
session_set_timeouts(struct session *s)
{
	const struct config *cfg = &s->srv->cfg;
	struct timeval t = { 0, 0 };
	struct bufferevent *under;

	if (s->client == NULL)
		return;
	if (s->state == SESSION_CLOSING || s->state == SESSION_DEAD)
		t.tv_sec = SESSION_CLOSE_FLUSH_SECS;
	else if (s->client_tls_pending)
		t.tv_sec = cfg->timeout_tls_handshake;
	else if (s->authenticated)
		t.tv_sec = cfg->timeout_idle;
	else
		t.tv_sec = cfg->timeout_preauth;
	bufferevent_set_timeouts(s->client, &t, &t);
	/* COMPRESS: a closing session may wait on the link under the filter
	 * (session_client_flushed), which must not outwait the flush limit. */
	if ((under = bufferevent_get_underlying(s->client)) != NULL)
		bufferevent_set_timeouts(under, &t, &t);
}

void
session_reply(struct session *s, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n;

	if (s->client == NULL)
		return;
	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 2, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 3)
		n = (int)sizeof(line) - 3;
	if (s->trace != NULL)
		trace_line(s, TRACE_P2C, line, (size_t)n, 0);
	memcpy(line + n, "\r\n", 2);
	session_upstream_release_pending(s);	/* what the upstream said before goes first */
	evbuffer_add(bufferevent_get_output(s->client), line, (size_t)n + 2);
}

static void
session_schedule_free(struct session *s)
{
	if (s->state == SESSION_DEAD)
		return;
	session_enter(s, SESSION_DEAD, "output flushed, free scheduled");
	/* One event for the server, not one per session: an idle session
	 * carries no event of its own for this. */
	if (s->srv->reap_tail == NULL)
		s->srv->reap_tail = &s->srv->reap;
	s->next_reap = NULL;
	*s->srv->reap_tail = s;
	s->srv->reap_tail = &s->next_reap;
	event_active(s->srv->ev_reap, EV_TIMEOUT, 0);
}

/* Free the sessions scheduled, oldest first, out of any of their callbacks. */
static void
session_reap_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;
	struct session *s;

	while ((s = srv->reap) != NULL) {
		if ((srv->reap = s->next_reap) == NULL)
			srv->reap_tail = &srv->reap;
		session_free_cb(-1, 0, s);
	}
}

/* COMPRESS's link under the filter drained while closing: the filter's own
 * write callback does not say so. */
static void
session_under_drained_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
	struct session *s = arg;

	if (info->n_deleted > 0 && evbuffer_get_length(buf) == 0 && s->state == SESSION_CLOSING)
		session_schedule_free(s);
}

/* Everything for the client reached its socket, through COMPRESS's filter
 * and the link under it: only then may the link close (and close_notify go). */
static int
session_client_flushed(struct session *s)
{
	struct bufferevent *under = bufferevent_get_underlying(s->client);
	struct evbuffer *uout;

	if (evbuffer_get_length(bufferevent_get_output(s->client)) > 0)
		return 0;
	if (under == NULL || evbuffer_get_length(uout = bufferevent_get_output(under)) == 0)
		return 1;
	if (s->under_drained == NULL)
		s->under_drained = evbuffer_add_cb(uout, session_under_drained_cb, s);
	return 0;
}

void
session_close(struct session *s, const char *bye, const char *why)
{
	if (s->state == SESSION_CLOSING || s->state == SESSION_DEAD)
		return;
	log_msg(s->quiet_close ? LOG_LEVEL_DEBUG : LOG_LEVEL_INFO, s->sid, "closing: %s", why);
	if (!session_upstream_cut(s) && bye != NULL) {
		log_msg(LOG_LEVEL_INFO, s->sid, "no BYE: the client is inside a literal");
		bye = NULL;
	}
	if (s->up != NULL) {
		tls_close_notify(s->up);
		bufferevent_free(s->up);
		s->up = NULL;
	}
	session_enter(s, SESSION_CLOSING, why);
	if (s->client == NULL || s->client_eof || s->srv->ev_reap == NULL) {
		if (s->srv->ev_reap == NULL)
			session_free_cb(-1, 0, s);	/* setup failed before deferral existed */
		else
			session_schedule_free(s);
		return;
	}
	/* A TLS handshake still under way must keep reading, or the BYE never
	 * gets out; client input is ignored from now on either way. */
	if (!s->client_tls_pending)
		bufferevent_disable(s->client, EV_READ);
	if (bye != NULL)
		session_reply(s, "* BYE %s", bye);
	if (session_client_flushed(s))
		session_schedule_free(s);
	else
		bufferevent_setwatermark(s->client, EV_WRITE, 0, 0);
}

static void
session_free_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session *s = arg;
	struct timeval now, age;

	gettimeofday(&now, NULL);
	timersub(&now, &s->started, &age);
	log_msg(LOG_LEVEL_INFO, s->sid, "disconnected after %ld.%03lds", (long)age.tv_sec,
	    (long)age.tv_usec / 1000);
	if (s->client != NULL) {
		struct bufferevent *under = bufferevent_get_underlying(s->client);
		if (s->under_drained != NULL)
			evbuffer_remove_cb_entry(bufferevent_get_output(under), s->under_drained);
		if (!s->client_eof_error)
			tls_close_notify(s->client);
		bufferevent_free(s->client);
	}
	if (s->up != NULL)
		bufferevent_free(s->up);
	if (s->ev_proxy != NULL) {
		close(event_get_fd(s->ev_proxy));	/* still waiting for the header */
		event_free(s->ev_proxy);
	}
	session_login_done(s);
	if (s->ev_listen != NULL)
		event_free(s->ev_listen);
	trace_session_end(s);
	track_forget(s);
	track_free(&s->track);
	resync_free(&s->resync);
	while (s->n_inflight > 0)
		session_inflight_remove(s, &s->inflight[s->n_inflight - 1]);
	session_busy_free(s);	/* frees arguments of a command cut short */
	free(s->inflight);
	TAILQ_REMOVE(&s->srv->sessions, s, entry);
	s->srv->n_sessions--;
	s->srv->stats.closed++;
	memtrim_note(s->srv->memtrim);
	server_session_gone(s->srv, s);
	free(s);
}

int
session_out_full(struct evbuffer *out)
{
	return evbuffer_get_length(out) >= SESSION_OUT_HIGH;
}

/* The peer's output is full: stop reading `from` until it drains to the low
 * mark, where the write callback of the other side resumes us. */
void
session_pause_reading(struct session *s, struct bufferevent *from)
{
	struct bufferevent *to = from == s->client ? s->up : s->client;

	if (to == NULL)
		return;
	bufferevent_disable(from, EV_READ);
	if (from == s->client)
		s->client_paused = 1;
	else
		s->up_paused = 1;
	bufferevent_setwatermark(to, EV_WRITE, SESSION_OUT_LOW, 0);
}

/* The other side's output drained to the low mark: read `from` again, and
 * process what already waits in its input (no read callback will say so). */
void
session_resume_reading(struct session *s, struct bufferevent *from)
{
	struct bufferevent *to = from == s->client ? s->up : s->client;

	if (from == NULL || to == NULL)
		return;
	if (from == s->client)
		s->client_paused = 0;
	else
		s->up_paused = 0;
	bufferevent_setwatermark(to, EV_WRITE, 0, 0);
	bufferevent_enable(from, EV_READ);
	if (from == s->client)
		session_client_process(s);
	else
		session_upstream_process(s);
}

static void
session_client_read_cb(struct bufferevent *bev, void *arg)
{
	struct session *s = arg;

	relay_read_more(bev, s->client_link, SESSION_READ_HIGH);
	session_client_process(s);
	/* s->client, not bev: STARTTLS replaces the bufferevent. */
	if (s->client != NULL)
		relay_input_cap_check(s->client, s->client_link, SESSION_READ_HIGH);
}

static void
session_client_write_cb(struct bufferevent *bev, void *arg)
{
	struct session *s = arg;
	size_t pending = evbuffer_get_length(bufferevent_get_output(bev));

	if (s->state == SESSION_CLOSING) {
		if (pending == 0 && session_client_flushed(s))
			session_schedule_free(s);
		return;
	}
	if (s->state == SESSION_CLIENT_STARTTLS && pending == 0) {
		session_client_starttls_flushed(s);
		return;
	}
	if (s->up_paused && pending <= SESSION_OUT_LOW)
		session_resume_reading(s, s->up);
}

static void
session_client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct session *s = arg;
	char why[512];

	if (what & BEV_EVENT_CONNECTED) {
		s->client_tls_pending = 0;
		s->srv->stats.tls_handshakes++;
		tls_describe(bev, why, sizeof(why));
		log_msg(LOG_LEVEL_INFO, s->sid, "client TLS established: %s", why);
		session_set_timeouts(s);
		return;
	}
	if (what & BEV_EVENT_TIMEOUT) {
		if (s->state == SESSION_CLOSING) {
			session_schedule_free(s);
		} else if (s->client_tls_pending) {
			s->srv->stats.tls_handshake_failures++;
			s->client_eof = 1;
			session_close(s, NULL, "client TLS handshake timed out");
		} else
			session_close(s, "Disconnected for inactivity", "client idle timeout");
		return;
	}
	/* EOF or error: the client is gone, nothing more can reach it. */
	s->client_eof = 1;
	s->client_eof_error = (what & BEV_EVENT_ERROR) != 0;
	if (s->state == SESSION_CLOSING) {
		session_schedule_free(s);
		return;
	}
	if (s->client_tls_pending && tls_peer_silent(bev)) {
		/* Not a byte of a ClientHello: a port probe (a readiness or health
		 * check), routine rather than a failed handshake. */
		s->quiet_close = 1;
		session_close(s, NULL, "closed before its TLS handshake began (a port probe?)");
	} else if (s->client_tls_pending) {
		s->srv->stats.tls_handshake_failures++;
		tls_error_describe(bev, why, sizeof(why));
		session_close(s, NULL, why);
	} else if ((what & BEV_EVENT_ERROR) && EVUTIL_SOCKET_ERROR() != 0) {
		snprintf(why, sizeof(why), "client connection error: %s",
		    evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
		session_close(s, NULL, why);
	} else
		session_close(s, NULL, s->logged_out ? "client logged out" :
		    "client closed the connection");
}

struct inflight *
session_inflight_push(struct session *s, const struct command *cmd)
{
	struct inflight *f;

	if (s->n_inflight == s->cap_inflight) {
		unsigned cap = s->cap_inflight ? s->cap_inflight * 2 : 1;	/* most clients send one at a time */
		struct inflight *n = realloc(s->inflight, cap * sizeof(*n));
		if (n == NULL)
			return NULL;
		s->inflight = n;
		s->cap_inflight = cap;
	}
	f = &s->inflight[s->n_inflight];
	memset(f, 0, sizeof(*f));
	if (strlen(cmd->tag) < sizeof(f->tag_inline))
		memcpy(f->tag_inline, cmd->tag, strlen(cmd->tag) + 1);
	else if ((f->tag_heap = strdup(cmd->tag)) == NULL)
		return NULL;
	s->n_inflight++;
	f->kind = cmd->kind;
	f->uid = cmd->uid;
	f->sent_usec = metrics_now_usec();
	s->last_active_usec = f->sent_usec;
	return f;
}

struct inflight *
session_inject(struct session *s, enum resync_cmd purpose, const char *fmt, ...)
{
	char line[COMMAND_TAG_MAX + 2 * COMMAND_ARG_MAX + 64];
	struct command cmd = { .kind = CMD_NONE };
	struct inflight *f;
	va_list ap;
	int n;

	/* Our tags never match a client command in flight: we inject only
	 * when none is, and the tag space is our own. */
	command_reset(&cmd);
	do
		snprintf(cmd.tag, sizeof(cmd.tag), "imapfresh.%llu",
		    (unsigned long long)++s->up_tag_seq);
	while (session_inflight_find(s, cmd.tag) != NULL);
	cmd.kind = CMD_UNKNOWN;
	if ((f = session_inflight_push(s, &cmd)) == NULL)
		return NULL;
	f->injected = 1;
	f->purpose = purpose;
	f->sent_whole = 1;
	n = snprintf(line, sizeof(line), "%s ", session_inflight_tag(f));
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 2, fmt, ap);
	va_end(ap);
	if ((size_t)n > sizeof(line) - 3)
		n = (int)sizeof(line) - 3;
	session_send_own(s, line, (size_t)n);
	return f;
}

struct inflight *
session_inflight_find(struct session *s, const char *tag)
{
	for (unsigned i = 0; i < s->n_inflight; i++)
		if (strcmp(session_inflight_tag(&s->inflight[i]), tag) == 0)
			return &s->inflight[i];
	return NULL;
}

const char *
session_inflight_tag(const struct inflight *f)
{
	return f->tag_heap != NULL ? f->tag_heap : f->tag_inline;
}

void
session_inflight_remove(struct session *s, struct inflight *f)
{
	unsigned i = (unsigned)(f - s->inflight);

	free(f->tag_heap);
	free(f->mailbox);
	free(f->mailbox_wire);
	free(f->user);
	memmove(&s->inflight[i], &s->inflight[i + 1], (s->n_inflight - i - 1) * sizeof(*f));
	s->n_inflight--;
	s->last_active_usec = metrics_now_usec();
}

static void
session_busy_destroy(struct session_busy *b)
{
	command_reset(&b->cmd);
	uidset_free(&b->resp_held_positions);
	imap_lex_free(b->clex);
	imap_lex_free(b->ulex);
	if (b->cline != NULL)
		evbuffer_free(b->cline);
	if (b->uline != NULL)
		evbuffer_free(b->uline);
	if (b->resp_text != NULL)
		evbuffer_free(b->resp_text);
	free(b);
}

/* The session ends (its busy state may hold a command cut short). */
static void
session_busy_free(struct session *s)
{
	if (s->busy == NULL)
		return;
	session_busy_destroy(s->busy);
	s->busy = NULL;
	s->srv->n_busy--;
}

void
session_busy_pool_free(struct server *srv)
{
	struct session_busy *b;

	while ((b = srv->busy_pool) != NULL) {
		srv->busy_pool = b->next_free;
		session_busy_destroy(b);
	}
	srv->n_busy_pool = 0;
}

/* A new busy state: zeroed is the rest state (empty tag, word and text, no
 * arguments), its lexers at a line start. */
static struct session_busy *
session_busy_new(void)
{
	/* Responses may be long (SEARCH of a big mailbox) and stream through;
	 * only single tokens are bounded. */
	struct imap_lex_limits ul = { .max_line = 0, .max_token = 1024 * 1024, .max_literal = 0 };
	struct session_busy *b;

	if ((b = calloc(1, sizeof(*b))) == NULL)
		return NULL;
	command_reset(&b->cmd);
	renumber_cmd_reset(&b->rn);
	uidset_init(&b->resp_held_positions);
	b->clex = imap_lex_new(IMAP_LEX_CLIENT, NULL);	/* limits: session_busy() */
	b->ulex = imap_lex_new(IMAP_LEX_SERVER, &ul);
	b->cline = evbuffer_new();
	b->uline = evbuffer_new();
	if (b->clex == NULL || b->ulex == NULL || b->cline == NULL || b->uline == NULL) {
		session_busy_destroy(b);
		return NULL;
	}
	return b;
}

struct session_busy *
session_busy(struct session *s)
{
	struct server *srv = s->srv;
	struct imap_lex_limits cl = {
		.max_line = s->max_line, .max_token = s->max_line, .max_literal = s->max_literal,
	};
	struct session_busy *b;

	if (s->busy != NULL)
		return s->busy;
	if ((b = srv->busy_pool) != NULL) {
		srv->busy_pool = b->next_free;
		srv->n_busy_pool--;
		b->next_free = NULL;
	} else if ((b = session_busy_new()) == NULL) {
		log_msg(LOG_LEVEL_ERROR, s->sid, "out of memory for a command");
		session_close(s, "[UNAVAILABLE] Out of memory", "out of memory");
		return NULL;
	}
	imap_lex_set_limits(b->clex, &cl);
	s->busy = b;
	srv->n_busy++;
	return b;
}

/*
 * At rest: nothing half-done refers to the busy state. No command being read,
 * refused, held or half forwarded; no response being read or waiting in the
 * upstream input; no resync; nothing in flight but the client's IDLE, idling
 * (it ends with the client's DONE, read as a new line); both lexers at a
 * line start owing nothing to the next (imap_lex_at_rest()).
 */
static int
session_at_rest(const struct session *s)
{
	const struct session_busy *b = s->busy;

	return s->state == SESSION_RUNNING && s->nest == 0 && !s->held &&
	    s->resync.phase == RESYNC_NONE &&
	    ((s->n_inflight == 0 && s->wait == WAIT_NONE) ||
	    (s->n_inflight == 1 && s->wait == WAIT_IDLE && s->idling)) &&
	    !s->cmd_forwarded && !s->cmd_reject && !s->cmd_local && !s->line_is_continuation &&
	    b->cmd.ntokens == 0 && b->cmd.args == NULL && b->cmd.sasl_user == NULL &&
	    evbuffer_get_length(b->cline) == 0 && imap_lex_at_rest(b->clex) &&
	    s->resp_mode == RESP_UNDECIDED && s->up_deferred == 0 && s->up_resp_start == 0 &&
	    evbuffer_get_length(b->uline) == 0 && imap_lex_at_rest(b->ulex);
}

void
session_busy_put(struct session *s)
{
	struct server *srv = s->srv;
	struct session_busy *b = s->busy;

	if (b == NULL || !session_at_rest(s))
		return;
	s->busy = NULL;
	srv->n_busy--;
	if (srv->n_busy_pool >= SESSION_BUSY_POOL) {
		session_busy_destroy(b);
		return;
	}
	/* As new: the rest state (the response fields are reset after each
	 * response, the command after each command) with small buffers. */
	command_reset(&b->cmd);
	renumber_cmd_reset(&b->rn);
	uidset_free(&b->resp_held_positions);
	b->resp_tag[0] = b->resp_word[0] = b->resp_status_text[0] = '\0';
	if (b->resp_text != NULL)
		evbuffer_drain(b->resp_text, evbuffer_get_length(b->resp_text));
	imap_lex_shrink(b->clex);
	imap_lex_shrink(b->ulex);
	b->next_free = srv->busy_pool;
	srv->busy_pool = b;
	srv->n_busy_pool++;
}

void
session_send_own(struct session *s, const char *line, size_t len)
{
	struct evbuffer *out = bufferevent_get_output(s->up);

	if (s->trace != NULL)
		trace_line(s, TRACE_P2U, line, len, 1);
	evbuffer_add(out, line, len);
	evbuffer_add(out, "\r\n", 2);
}

/* The ID parameters that tell the upstream who the client really is
 * (Dovecot honours them from login_trusted_networks). */
void
session_id_fields(struct session *s, char *buf, size_t len)
{
	char ip[INET6_ADDRSTRLEN], lip[INET6_ADDRSTRLEN];
	unsigned port, lport;

	session_addr_parts((const struct sockaddr *)&s->client_sa, ip, sizeof(ip), &port);
	session_addr_parts((const struct sockaddr *)&s->local_sa, lip, sizeof(lip), &lport);
	snprintf(buf, len, "\"x-originating-ip\" \"%s\" \"x-originating-port\" \"%u\" "
	    "\"x-connected-ip\" \"%s\" \"x-connected-port\" \"%u\" \"x-session-id\" \"%s:%s\"",
	    ip, port, lip, lport, s->srv->instance, s->sid);
}

struct session *
session_find(struct server *srv, uint64_t id)
{
	struct session *s;

	TAILQ_FOREACH(s, &srv->sessions, entry)
		if (s->id == id)
			return s->state == SESSION_DEAD ? NULL : s;
	return NULL;
}

void
session_kick(struct session *s, const char *why)
{
	session_close(s, "[UNAVAILABLE] Disconnected by the administrator", why);
}

void
session_request_resync(struct session *s)
{
	s->resync.requested = 1;
	log_msg(LOG_LEVEL_INFO, s->sid, "resync requested by the operator");
}

/* The store tells every session of a user when one of its mailboxes changed. */
void
session_store_notify(void *member, const char *mailbox)
{
	resync_mailbox_changed(member, mailbox);
}

/* The session's own timer (freed with it): a waiting SELECT goes on. */
static void
session_listening_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session *s = arg;

	(void)fd;
	(void)what;
	if (s->state == SESSION_RUNNING && s->held && s->resync.phase == RESYNC_NONE)
		session_client_release(s);
}

/* Release the session's waiting SELECT after tv, from the loop: a store
 * callback's zero wait replaces select_wait's. */
static int
session_wake_after(struct session *s, const struct timeval *tv)
{
	if (s->ev_listen == NULL &&
	    (s->ev_listen = evtimer_new(s->srv->base, session_listening_cb, s)) == NULL)
		return -1;
	return evtimer_add(s->ev_listen, tv);
}

void
session_store_listening(void *member)
{
	struct session *s = member;
	struct timeval now = { 0, 0 };

	if (!s->held || s->resync.phase != RESYNC_NONE)
		return;	/* only a SELECT waiting for it holds without a resync */
	if (session_wake_after(s, &now) < 0)
		session_close(s, "[UNAVAILABLE] Out of memory", "out of memory");
}

int
session_wait_listening(struct session *s)
{
	/* A slow Redis must not hold a SELECT longer than select_wait: it then
	   goes on, and the session checks its mailbox once (track.unheard). */
	int ms = s->srv->cfg.select_wait;
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

	if (ms == 0)
		return -1;
	return session_wake_after(s, &tv);
}
