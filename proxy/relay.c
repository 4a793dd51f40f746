/* relay: moving a session's bytes between its two sockets, and capping their unread input, with less work than libevent 2.1 does. */
#include <errno.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <event2/bufferevent_ssl.h>
#include <event2/bufferevent_struct.h>
#include <event2/event.h>

#include "relay.h"

#define RELAY_LIBEVENT_READ 4096	/* libevent 2.1's EVBUFFER_MAX_READ */
#define RELAY_CHUNK (64 * 1024)
#define RELAY_SMALL_READ 512	/* a chain of it is a 1 KiB allocation */

/* TLS bufferevents read whole records and must write through SSL; a filter
 * (COMPRESS) reports its underlying socket: never write around it. */
enum relay_link
relay_link_of(struct bufferevent *bev)
{
	if (bufferevent_openssl_get_ssl(bev) != NULL)
		return RELAY_TLS;
	return bufferevent_get_underlying(bev) == NULL ? RELAY_SOCKET : RELAY_FILTER;
}

void
relay_io_sizes(struct bufferevent *bev)
{
	/* libevent's defaults: 16 KiB a write, one TLS record a read. */
	bufferevent_set_max_single_read(bev, RELAY_MAX_IO);
	bufferevent_set_max_single_write(bev, RELAY_MAX_IO);
}

/* Read fd into in until it would block or in holds cap bytes. */
static void
relay_read_into(struct evbuffer *in, evutil_socket_t fd, size_t have, size_t cap)
{
	while (have < cap) {
		struct evbuffer_iovec v[2];
		size_t want = cap - have < RELAY_CHUNK ? cap - have : RELAY_CHUNK;
		int avail = 0, nv, all_waiting = 0;
		ssize_t n;

		/* Read only bytes that wait: a read of an empty socket would take
		 * a pending error (ECONNRESET) that libevent must report. */
		if (ioctl(fd, FIONREAD, &avail) < 0 || avail <= 0)
			return;
		if ((size_t)avail <= want)
			want = (size_t)avail, all_waiting = 1;
		nv = evbuffer_reserve_space(in, (ev_ssize_t)want, v, 2);
		if (nv < 1)
			return;
		/* reserve_space may offer more than asked: never read past cap. */
		if (v[0].iov_len >= want)
			v[0].iov_len = want, nv = 1;
		else if (nv == 2 && v[0].iov_len + v[1].iov_len > want)
			v[1].iov_len = want - v[0].iov_len;
		do
			n = readv(fd, (struct iovec *)v, nv);
		while (n < 0 && errno == EINTR);
		if (n <= 0) {
			evbuffer_commit_space(in, v, 0);
			return;
		}
		if ((size_t)n <= v[0].iov_len)
			v[0].iov_len = (size_t)n, nv = 1;
		else
			v[1].iov_len = (size_t)n - v[0].iov_len;
		evbuffer_commit_space(in, v, nv);
		have += (size_t)n;
		if ((size_t)n < want || all_waiting)
			return;	/* the socket is drained */
	}
}

/*
 * libevent 2.1's socket read callback asks the kernel how much waits
 * (ioctl FIONREAD) before every read: one system call in four of a NOOP
 * round trip through the proxy, about 2 us of its CPU. This callback does
 * what bufferevent_readcb() does, without asking: read up to 4 KiB (as
 * libevent does; relay_read_more() takes the rest) into the input, then the
 * read callback, or on EOF, an error or the read timeout, read disabled and
 * the event callback. The bufferevent keeps its own read event: enabling,
 * disabling, timeouts and the watermark's suspension are libevent's as
 * before, only the function the event runs is ours.
 */
static void
relay_socket_read_cb(evutil_socket_t fd, short what, void *arg)
{
	/* Bytes past a small chain land here and are copied: a chain sized for
	 * 4 KiB is an 8 KiB allocation per read, outside malloc's fast path,
	 * while most reads are a command or a response line. */
	static char spill[RELAY_LIBEVENT_READ];
	struct bufferevent *bev = arg;
	struct evbuffer_iovec v;
	struct iovec iov[2];
	size_t want = RELAY_LIBEVENT_READ, have;
	short report = BEV_EVENT_READING;
	int err = 0;
	ssize_t n;

	bufferevent_incref(bev);	/* the callbacks may free it */
	if (what & EV_TIMEOUT) {
		report |= BEV_EVENT_TIMEOUT;
		goto failed;
	}
	have = evbuffer_get_length(bev->input);
	if (bev->wm_read.high != 0) {
		if (have >= bev->wm_read.high) {
			/* Setting it again suspends reading, as libevent would. */
			bufferevent_setwatermark(bev, EV_READ, bev->wm_read.low, bev->wm_read.high);
			goto done;
		}
		if (bev->wm_read.high - have < want)
			want = bev->wm_read.high - have;
	}
	evbuffer_unfreeze(bev->input, 0);
	if (evbuffer_reserve_space(bev->input, RELAY_SMALL_READ, &v, 1) < 1) {
		evbuffer_freeze(bev->input, 0);
		report |= BEV_EVENT_ERROR;
		goto failed;
	}
	iov[0].iov_base = v.iov_base;
	iov[0].iov_len = v.iov_len < want ? v.iov_len : want;
	iov[1].iov_base = spill;
	iov[1].iov_len = want - iov[0].iov_len;
	do
		n = readv(fd, iov, iov[1].iov_len > 0 ? 2 : 1);
	while (n < 0 && errno == EINTR);
	err = errno;
	if (n <= 0) {
		evbuffer_commit_space(bev->input, &v, 0);
		evbuffer_freeze(bev->input, 0);
		if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK))
			goto done;
		report |= n == 0 ? BEV_EVENT_EOF : BEV_EVENT_ERROR;
		goto failed;
	}
	v.iov_len = (size_t)n < iov[0].iov_len ? (size_t)n : iov[0].iov_len;
	evbuffer_commit_space(bev->input, &v, 1);
	if ((size_t)n > v.iov_len)
		evbuffer_add(bev->input, spill, (size_t)n - v.iov_len);
	evbuffer_freeze(bev->input, 0);
	if (bev->readcb != NULL && evbuffer_get_length(bev->input) >= bev->wm_read.low)
		bev->readcb(bev, bev->cbarg);
	goto done;
failed:
	bufferevent_disable(bev, EV_READ);
	if (bev->errorcb != NULL) {
		errno = err;	/* the event callback reads EVUTIL_SOCKET_ERROR() */
		bev->errorcb(bev, report, bev->cbarg);
	}
done:
	bufferevent_decref(bev);
}

void
relay_read_hook(struct bufferevent *bev)
{
	evutil_socket_t fd = bufferevent_getfd(bev);
	int reading = bufferevent_get_enabled(bev) & EV_READ;

	if (fd < 0 || relay_link_of(bev) != RELAY_SOCKET)
		return;
	if (reading)
		bufferevent_disable(bev, EV_READ);
	/* What bufferevent_socket_new() assigns, but our function. */
	event_assign(&bev->ev_read, bev->ev_base, fd, EV_READ | EV_PERSIST | EV_FINALIZE,
	    relay_socket_read_cb, bev);
	if (reading)
		bufferevent_enable(bev, EV_READ);
}

/*
 * libevent 2.1 reads at most 4 KiB per read callback whatever
 * bufferevent_set_max_single_read() says (2.2 lifted it): under bulk traffic
 * that is a loop pass, an ioctl and a 4 KiB chain per 4 KiB. When its read
 * just filled that, read what else waits, up to cap bytes of input. EOF and
 * errors stay in the socket for libevent's next read to report.
 */
void
relay_read_more(struct bufferevent *bev, enum relay_link link, size_t cap)
{
	struct evbuffer *in = bufferevent_get_input(bev);
	size_t have = evbuffer_get_length(in);

	/* The cheap test first: it settles most callbacks. */
	if (have < RELAY_LIBEVENT_READ || link != RELAY_SOCKET ||
	    !(bufferevent_get_enabled(bev) & EV_READ))
		return;
	/* The bufferevent freezes its input's end between its own reads. */
	evbuffer_unfreeze(in, 0);
	relay_read_into(in, bufferevent_getfd(bev), have, cap);
	evbuffer_freeze(in, 0);
}

/*
 * libevent's read high watermark calls back on every change of the input
 * buffer (each read, each token taken out of it) and re-adds the read event
 * with its timeout each time: 9 % of the instructions of a plaintext session.
 * A plain socket's input needs no watermark while it is small: libevent reads
 * at most 4 KiB a callback and relay_read_more() stops at the cap. So the
 * watermark is set only while the input holds half the cap or more (the peer
 * runs ahead of what the session takes), and lifted once it drained to a
 * quarter. A TLS bufferevent reads all that OpenSSL holds in one callback, so
 * it keeps its watermark for good.
 */
void
relay_input_cap(struct bufferevent *bev, enum relay_link link, size_t cap)
{
	bufferevent_setwatermark(bev, EV_READ, 0, link == RELAY_TLS ? cap : 0);
}

void
relay_input_cap_check(struct bufferevent *bev, enum relay_link link, size_t cap)
{
	size_t have, low, high;

	if (link == RELAY_TLS || bufferevent_getwatermark(bev, EV_READ, &low, &high) < 0)
		return;
	have = evbuffer_get_length(bufferevent_get_input(bev));
	if (high == 0 && have >= cap / 2)
		bufferevent_setwatermark(bev, EV_READ, 0, cap);
	else if (high != 0 && have < cap / 4)
		bufferevent_setwatermark(bev, EV_READ, 0, 0);
}

/*
 * A bufferevent writes only when its write event fires, one loop pass after
 * the bytes were queued, with an epoll_ctl on each side of it: more than the
 * write itself costs on a NOOP round trip. When nothing is queued ahead of
 * them, the bytes go straight to the peer's socket; what it does not take is
 * queued as before, and errors are left to the bufferevent's own write.
 */
void
relay_move(struct bufferevent *to, enum relay_link link, struct evbuffer *from, size_t n)
{
	struct evbuffer *out = bufferevent_get_output(to);

	/* Before its connect, an upstream socket's fd is -1: the write fails
	 * and the bytes are queued. */
	if (n > 0 && link == RELAY_SOCKET && evbuffer_get_length(out) == 0 &&
	    (bufferevent_get_enabled(to) & EV_WRITE)) {
		int w = evbuffer_write_atmost(from, bufferevent_getfd(to), (ev_ssize_t)n);

		if (w > 0)
			n -= (size_t)w;
	}
	if (n > 0)
		evbuffer_remove_buffer(from, out, n);
}
