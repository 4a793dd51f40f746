/* test_relay: relay's read callback, relay_read_more() and relay_move() on socketpairs, byte for byte. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "relay.h"
#include "tap.h"

#define LIBEVENT_READ 4096		/* libevent 2.1's EVBUFFER_MAX_READ */
#define CAP (128 * 1024)		/* the proxy's SESSION_READ_HIGH */
#define STREAM_LEN (8 * 1024 * 1024)
#define MAX_WRITE 70000

/* splitmix64: the data pattern and every random choice. */
static uint64_t
rnd(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static unsigned char *
pattern(size_t len, uint64_t seed)
{
	unsigned char *p = malloc(len ? len : 1);

	for (size_t i = 0; i < len; i++)
		p[i] = (unsigned char)(rnd(&seed) >> 56);
	return p;
}

static void
pair(int sv[2])
{
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
		perror("socketpair");
		exit(99);
	}
	evutil_make_socket_nonblocking(sv[0]);
	evutil_make_socket_nonblocking(sv[1]);
}

static size_t
inq(int fd)
{
	int n = 0;

	if (ioctl(fd, FIONREAD, &n) < 0)
		return (size_t)-1;
	return (size_t)n;
}

/* Put bytes into a bufferevent's input as if it had read them. */
static void
input_add(struct bufferevent *bev, const void *p, size_t n)
{
	struct evbuffer *in = bufferevent_get_input(bev);

	evbuffer_unfreeze(in, 0);
	evbuffer_add(in, p, n);
	evbuffer_freeze(in, 0);
}

/* Read everything fd holds now; returns the bytes read. */
static size_t
read_all(int fd, unsigned char *buf, size_t room)
{
	size_t got = 0;

	while (got < room) {
		ssize_t r = read(fd, buf + got, room - got);

		if (r <= 0)
			break;
		got += (size_t)r;
	}
	return got;
}

/* ------------------------------------------------------------------ */
/* A writer pushing a pattern into one end, a bufferevent reading the other
 * with relay_read_more() in its read callback, as the proxy does. */

enum consume { CONSUME_RANDOM, CONSUME_ALL };

/* How the reading bufferevent is set up: libevent alone, with
 * relay_read_more() in the read callback, and that through
 * relay_read_hook()'s read callback (as the proxy's plain sockets). */
enum reader { READER_LIBEVENT, READER_MORE, READER_HOOKED };
static const char *const reader_name[] = { "libevent alone", "with relay_read_more",
	"hooked, with relay_read_more" };

struct stream {
	struct event_base *base;
	struct bufferevent *bev;
	int rfd, wfd;
	struct event *wev, *drain, *watchdog;
	const unsigned char *pat;
	size_t len, woff, roff;
	enum consume policy;
	uint64_t rng;
	unsigned char *scratch;
	int writer_done, prewritten, mismatch, timeout, events_after_end;
	short what;			/* the event callback's report */
	int err;			/* errno with it */
	size_t max_entry, max_after, max_added;
	unsigned long callbacks, past;	/* callbacks; ones where relay_read_more read */
};

/* Take n bytes off the input and check them against the pattern. */
static void
stream_consume(struct stream *st, size_t n)
{
	struct evbuffer *in = bufferevent_get_input(st->bev);

	while (n > 0) {
		size_t k = n < 65536 ? n : 65536;
		int r = evbuffer_remove(in, st->scratch, k);

		if (r <= 0)
			break;
		if (st->roff + (size_t)r > st->len || memcmp(st->scratch, st->pat + st->roff, (size_t)r) != 0) {
			if (!st->mismatch)
				diag("mismatch in the %zu bytes at offset %zu", (size_t)r, st->roff);
			st->mismatch = 1;
		}
		st->roff += (size_t)r;
		n -= (size_t)r;
	}
}

static void
stream_read_cb(struct bufferevent *bev, void *arg)
{
	struct stream *st = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	size_t before = evbuffer_get_length(in), after, n;

	st->callbacks++;
	if (before > st->max_entry)
		st->max_entry = before;
	relay_read_more(bev, relay_link_of(bev), CAP);
	after = evbuffer_get_length(in);
	if (after > st->max_after)
		st->max_after = after;
	if (after > before) {
		st->past++;
		if (after - before > st->max_added)
			st->max_added = after - before;
	}
	if (st->policy == CONSUME_ALL || st->writer_done || rnd(&st->rng) % 4 == 0)
		n = after;
	else
		n = (size_t)(rnd(&st->rng) % (after + 1));
	stream_consume(st, n);
	/* Left bytes and no more may come (input at the high watermark, or the
	 * writer waiting on us): no read callback would say so, drain later. */
	if (evbuffer_get_length(in) > 0 && !evtimer_pending(st->drain, NULL)) {
		struct timeval tv = { 0, 1000 };

		evtimer_add(st->drain, &tv);
	}
}

/* Without relay: a read callback that only consumes. */
static void
plain_read_cb(struct bufferevent *bev, void *arg)
{
	struct stream *st = arg;

	st->callbacks++;
	stream_consume(st, evbuffer_get_length(bufferevent_get_input(bev)));
}

static void
stream_drain_cb(evutil_socket_t fd, short what, void *arg)
{
	struct stream *st = arg;

	stream_consume(st, evbuffer_get_length(bufferevent_get_input(st->bev)));
}

static void
stream_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct stream *st = arg;

	if (st->what != 0) {
		st->events_after_end++;
		return;
	}
	st->what = what;
	st->err = EVUTIL_SOCKET_ERROR();
	stream_consume(st, evbuffer_get_length(bufferevent_get_input(bev)));
	event_base_loopexit(st->base, NULL);
}

/* Write one random-size chunk (or what fits); close the end when done. */
static int
stream_write(struct stream *st)
{
	while (st->woff < st->len) {
		size_t k = 1 + (size_t)(rnd(&st->rng) % MAX_WRITE);
		ssize_t w;

		if (k > st->len - st->woff)
			k = st->len - st->woff;
		w = write(st->wfd, st->pat + st->woff, k);
		if (w < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
		st->woff += (size_t)w;
		if ((size_t)w < k)
			return 0;
	}
	close(st->wfd);
	st->wfd = -1;
	st->writer_done = 1;
	return 1;
}

static void
stream_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct stream *st = arg;

	if (stream_write(st) != 0)
		event_del(st->wev);
}

static void
stream_watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
	struct stream *st = arg;

	st->timeout = 1;
	event_base_loopbreak(st->base);
}

/*
 * Stream len bytes of a seeded pattern. prewrite: everything that fits goes
 * into the socket (and the writer closes, if that is all) before the loop
 * runs. reset: the reader's end first sends the writer a byte it never reads,
 * so the writer's close resets the reader (ECONNRESET). reader: see enum
 * reader. Returns when the
 * reader is done (EOF, error, or the watchdog); stream_free() after.
 */
static void
stream_run(struct stream *st, uint64_t seed, size_t len, enum consume policy, int prewrite, int reset,
    enum reader reader)
{
	int sv[2];
	struct timeval wd = { 120, 0 };

	memset(st, 0, sizeof(*st));
	pair(sv);
	st->rfd = sv[0];
	st->wfd = sv[1];
	st->rng = seed;
	st->len = len;
	st->pat = pattern(len, seed ^ 0x5eed);
	st->policy = policy;
	st->scratch = malloc(65536);
	st->base = event_base_new();
	st->bev = bufferevent_socket_new(st->base, sv[0], BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	bufferevent_setcb(st->bev, reader != READER_LIBEVENT ? stream_read_cb : plain_read_cb, NULL,
	    stream_event_cb, st);
	bufferevent_setwatermark(st->bev, EV_READ, 0, CAP);
	relay_io_sizes(st->bev);
	st->drain = evtimer_new(st->base, stream_drain_cb, st);
	st->watchdog = evtimer_new(st->base, stream_watchdog_cb, st);
	evtimer_add(st->watchdog, &wd);
	st->wev = event_new(st->base, sv[1], EV_WRITE | EV_PERSIST, stream_write_cb, st);
	if (reset && write(sv[0], "x", 1) != 1)
		diag("reset: cannot write the unread byte");
	if (!prewrite || stream_write(st) == 0)
		event_add(st->wev, NULL);
	st->prewritten = st->writer_done;
	bufferevent_enable(st->bev, EV_READ);
	if (reader == READER_HOOKED)
		relay_read_hook(st->bev);
	event_base_dispatch(st->base);
}

static void
stream_free(struct stream *st)
{
	if (st->wfd >= 0)
		close(st->wfd);
	event_free(st->wev);
	event_free(st->drain);
	event_free(st->watchdog);
	bufferevent_free(st->bev);
	event_base_free(st->base);
	free((void *)st->pat);
	free(st->scratch);
}

static void
test_stream(uint64_t seed, enum reader reader)
{
	struct stream st;

	stream_run(&st, seed, STREAM_LEN, CONSUME_RANDOM, 0, 0, reader);
	ok(!st.timeout && !st.mismatch && st.roff == st.len && st.what == (BEV_EVENT_READING | BEV_EVENT_EOF),
	    "stream seed %llu, %s: %zu of %zu bytes consumed, identical and in order, then EOF (event 0x%x)",
	    (unsigned long long)seed, reader_name[reader], st.roff, st.len, (unsigned)st.what);
	ok(st.max_entry <= CAP + LIBEVENT_READ && st.max_after <= CAP + LIBEVENT_READ,
	    "stream seed %llu, %s: input at most cap + one libevent read in %lu callbacks "
	    "(largest %zu on entry, %zu after relay_read_more)",
	    (unsigned long long)seed, reader_name[reader], st.callbacks, st.max_entry, st.max_after);
	ok(st.past > 0 && st.max_after > LIBEVENT_READ,
	    "stream seed %llu, %s: read past libevent's 4 KiB in %lu callbacks (up to %zu bytes more, %zu in the input)",
	    (unsigned long long)seed, reader_name[reader], st.past, st.max_added, st.max_after);
	stream_free(&st);
}

/* The writer sends len bytes and closes; everything and then EOF arrive. */
static void
test_eof(size_t len, enum reader reader)
{
	struct stream st;

	stream_run(&st, len, len, CONSUME_ALL, 1, 0, reader);
	ok(!st.timeout && !st.mismatch && st.roff == len && st.what == (BEV_EVENT_READING | BEV_EVENT_EOF) &&
	    st.events_after_end == 0,
	    "EOF after %zu bytes, %s: %zu arrive identical, then EOF is reported (event 0x%x, %lu callbacks, "
	    "%lu read past 4 KiB, %s)", len, reader_name[reader], st.roff, (unsigned)st.what, st.callbacks,
	    st.past, st.prewritten ? "all in the socket before the loop" : "written as the reader read");
	stream_free(&st);
}

/*
 * The writer sends len bytes and closes with a byte of ours unread: the
 * reader's socket holds a reset behind the data. libevent alone reports it
 * as BEV_EVENT_ERROR (ECONNRESET); relay_read_more must leave it for that
 * report ("EOF and errors stay in the socket", relay.c).
 */
static void
test_reset(size_t len)
{
	struct stream st;
	short plain_what;
	int plain_err;

	stream_run(&st, len, len, CONSUME_ALL, 1, 1, READER_LIBEVENT);
	plain_what = st.what;
	plain_err = st.err;
	ok(!st.timeout && !st.mismatch && st.roff == len && st.what == (BEV_EVENT_READING | BEV_EVENT_ERROR) &&
	    st.err == ECONNRESET,
	    "reset after %zu bytes, libevent alone: all bytes, then ERROR (event 0x%x, %s, %s)",
	    len, (unsigned)st.what, strerror(st.err), st.prewritten ? "all written before the loop" : "NOT prewritten");
	stream_free(&st);

	for (enum reader r = READER_MORE; r <= READER_HOOKED; r++) {
		stream_run(&st, len, len, CONSUME_ALL, 1, 1, r);
		ok(!st.timeout && !st.mismatch && st.roff == len && st.what == plain_what &&
		    st.err == plain_err,
		    "reset after %zu bytes, %s: all bytes, then the same report "
		    "(event 0x%x, %s; libevent alone: 0x%x, %s)",
		    len, reader_name[r], (unsigned)st.what, strerror(st.err), (unsigned)plain_what,
		    strerror(plain_err));
		stream_free(&st);
	}
}

/* ------------------------------------------------------------------ */
/* relay_read_more() outside its conditions leaves input and socket alone. */

static SSL_CTX *tls_ctx;

static struct bufferevent *
tls_bev(struct event_base *base, int fd)
{
	SSL *ssl;

	if (tls_ctx == NULL)
		tls_ctx = SSL_CTX_new(TLS_method());
	ssl = tls_ctx ? SSL_new(tls_ctx) : NULL;
	if (ssl == NULL)
		return NULL;
	/* Accepting: it writes nothing before a ClientHello comes. */
	return bufferevent_openssl_socket_new(base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
	    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
}

/* A bufferevent on a fresh pair with `have` bytes of input and `sock` bytes
 * waiting in its socket; relay_read_more(cap); report what moved. */
static int
read_more_case(const char *name, int tls, int enabled, size_t have, size_t sock, size_t cap,
    size_t want_in, size_t want_sock)
{
	struct event_base *base = event_base_new();
	struct bufferevent *bev;
	unsigned char *filler = malloc(have ? have : 1), *pat = pattern(sock, 7), *got;
	size_t in_len, left;
	int sv[2], same = 1, frozen;

	pair(sv);
	bev = tls ? tls_bev(base, sv[0]) : bufferevent_socket_new(base, sv[0],
	    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (bev == NULL) {
		ok(0, "%s: cannot make the bufferevent", name);
		return 0;
	}
	bufferevent_setwatermark(bev, EV_READ, 0, CAP);
	if (enabled)
		bufferevent_enable(bev, EV_READ);
	else
		bufferevent_disable(bev, EV_READ);
	memset(filler, 'f', have);
	input_add(bev, filler, have);
	if (write(sv[1], pat, sock) != (ssize_t)sock)
		diag("%s: short write", name);

	relay_read_more(bev, relay_link_of(bev), cap);
	in_len = evbuffer_get_length(bufferevent_get_input(bev));
	left = inq(sv[0]);
	/* What was read follows the old input, in the socket's order. */
	if (in_len > have && in_len <= have + sock) {
		got = malloc(in_len);
		evbuffer_copyout(bufferevent_get_input(bev), got, in_len);
		same = memcmp(got, filler, have) == 0 && memcmp(got + have, pat, in_len - have) == 0;
		free(got);
	}
	/* libevent keeps the input's end frozen between its reads: still so. */
	frozen = evbuffer_add(bufferevent_get_input(bev), "x", 1) < 0;
	ok(in_len == want_in && left == want_sock && same && frozen,
	    "%s: input %zu -> %zu (want %zu), socket %zu -> %zu (want %zu)%s%s",
	    name, have, in_len, want_in, sock, left, want_sock, same ? "" : ", data out of order",
	    frozen ? "" : ", input end left unfrozen");
	bufferevent_free(bev);
	close(sv[1]);
	event_base_free(base);
	free(filler);
	free(pat);
	return 1;
}

static void
test_read_more_conditions(void)
{
	read_more_case("reading disabled", 0, 0, 5000, 20000, CAP, 5000, 20000);
	read_more_case("4095 bytes of input", 0, 1, 4095, 20000, CAP, 4095, 20000);
	read_more_case("empty input", 0, 1, 0, 20000, CAP, 0, 20000);
	read_more_case("input already at the cap", 0, 1, 12000, 20000, 10000, 12000, 20000);
	read_more_case("TLS bufferevent", 1, 1, 5000, 20000, CAP, 5000, 20000);
	read_more_case("4096 bytes of input, cap 10000", 0, 1, 4096, 20000, 10000, 10000, 20000 - 5904);
	read_more_case("4096 bytes of input, cap 128 KiB", 0, 1, 4096, 20000, CAP, 24096, 0);
	read_more_case("4096 bytes of input, cap one byte above", 0, 1, 4096, 20000, 4097, 4097, 19999);
}

/* ------------------------------------------------------------------ */
/* The hooked reader under libevent's own controls: read timeout, disable
 * and enable, the read high watermark. Each against libevent alone. */

struct ctl {
	struct event_base *base;
	struct bufferevent *bev;
	int peer;
	unsigned long reads;
	short what;
	size_t got, max_in;
};

static void
ctl_read_cb(struct bufferevent *bev, void *arg)
{
	struct ctl *c = arg;
	size_t have = evbuffer_get_length(bufferevent_get_input(bev));

	c->reads++;
	if (have > c->max_in)
		c->max_in = have;
}

static void
ctl_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct ctl *c = arg;

	c->what = what;
	event_base_loopexit(c->base, NULL);
}

static void
ctl_init(struct ctl *c, int hooked)
{
	int sv[2];

	memset(c, 0, sizeof(*c));
	pair(sv);
	c->peer = sv[1];
	c->base = event_base_new();
	c->bev = bufferevent_socket_new(c->base, sv[0], BEV_OPT_CLOSE_ON_FREE);
	bufferevent_setcb(c->bev, ctl_read_cb, NULL, ctl_event_cb, c);
	bufferevent_enable(c->bev, EV_READ);
	if (hooked)
		relay_read_hook(c->bev);
}

static void
ctl_run(struct ctl *c, long usec)
{
	struct timeval tv = { 0, usec };

	event_base_loopexit(c->base, &tv);
	event_base_dispatch(c->base);
}

static void
ctl_free(struct ctl *c)
{
	bufferevent_free(c->bev);
	close(c->peer);
	/* A bufferevent freed with reading suspended by its watermark is
	 * finalized by the loop: libevent 2.1's event_base_free() alone
	 * leaks it (with or without relay's reader). */
	event_base_loop(c->base, EVLOOP_NONBLOCK);
	event_base_free(c->base);
}

static void
test_hook_controls(void)
{
	struct ctl c;
	short what[2];
	int enabled[2];
	unsigned long reads[2];
	size_t max_in[2], got[2];
	char buf[300];

	memset(buf, 'x', sizeof(buf));
	for (int hooked = 0; hooked <= 1; hooked++) {
		struct timeval t = { 0, 30000 };

		/* Read timeout: reported as READING|TIMEOUT, reading disabled. */
		ctl_init(&c, hooked);
		bufferevent_set_timeouts(c.bev, &t, NULL);
		ctl_run(&c, 2000000);
		what[hooked] = c.what;
		enabled[hooked] = bufferevent_get_enabled(c.bev) & EV_READ;
		ctl_free(&c);
	}
	ok(what[1] == what[0] && what[0] == (BEV_EVENT_READING | BEV_EVENT_TIMEOUT) &&
	    enabled[0] == 0 && enabled[1] == 0,
	    "read timeout: hooked 0x%x (reading %s), libevent alone 0x%x (reading %s)",
	    (unsigned)what[1], enabled[1] ? "on" : "off", (unsigned)what[0], enabled[0] ? "on" : "off");

	for (int hooked = 0; hooked <= 1; hooked++) {
		/* Disabled: bytes wait in the socket; enabled: they are read. */
		ctl_init(&c, hooked);
		bufferevent_disable(c.bev, EV_READ);
		if (write(c.peer, buf, 100) != 100)
			diag("write failed");
		ctl_run(&c, 30000);
		reads[hooked] = c.reads;
		bufferevent_enable(c.bev, EV_READ);
		ctl_run(&c, 30000);
		got[hooked] = evbuffer_get_length(bufferevent_get_input(c.bev));
		ctl_free(&c);
	}
	ok(reads[0] == 0 && reads[1] == 0 && got[0] == 100 && got[1] == 100,
	    "disabled, then enabled: hooked %lu reads then %zu bytes, libevent alone %lu then %zu",
	    reads[1], got[1], reads[0], got[0]);

	for (int hooked = 0; hooked <= 1; hooked++) {
		/* High watermark 100 with 300 bytes waiting and nothing taken:
		   the input stops at 100 and reading is suspended; taking it
		   reads on. libevent 2.1 alone keeps calling the read callback
		   meanwhile (over a million times in 50 ms here); the hooked
		   reader calls it once. */
		ctl_init(&c, hooked);
		bufferevent_setwatermark(c.bev, EV_READ, 0, 100);
		if (write(c.peer, buf, 300) != 300)
			diag("write failed");
		ctl_run(&c, 50000);
		reads[hooked] = c.reads;
		max_in[hooked] = c.max_in;
		evbuffer_drain(bufferevent_get_input(c.bev), 100);
		ctl_run(&c, 30000);
		got[hooked] = evbuffer_get_length(bufferevent_get_input(c.bev));
		ctl_free(&c);
	}
	ok(max_in[1] == 100 && max_in[0] == 100 && reads[1] <= 2 && got[1] == 100 && got[0] == 100,
	    "read high watermark: hooked input at most %zu in %lu callbacks, then %zu more once taken; "
	    "libevent alone %zu in %lu, then %zu", max_in[1], reads[1], got[1], max_in[0], reads[0], got[0]);
}

/* ------------------------------------------------------------------ */
/* relay_move(): straight to the socket when nothing is queued, behind the
 * queue otherwise, and the peer gets every byte in call order. */

#define NSRC 3

struct mover {
	struct event_base *base;
	struct bufferevent *to;
	int peer;			/* the other end of to's socket */
	struct evbuffer *src[NSRC];
	uint64_t src_seed[NSRC];
	unsigned char *expect, *recv;
	size_t expect_len, expect_room, recv_len, recv_room;
	uint64_t rng;
};

static void
mover_refill(struct mover *m, int i, size_t atleast)
{
	while (evbuffer_get_length(m->src[i]) < atleast) {
		unsigned char chunk[4096];

		for (size_t j = 0; j < sizeof(chunk); j++)
			chunk[j] = (unsigned char)(rnd(&m->src_seed[i]) >> 56);
		evbuffer_add(m->src[i], chunk, sizeof(chunk));
	}
}

struct move_result {
	size_t out_before, out_after, sock_before, sock_after, src_before, src_after;
};

/* relay_move n bytes of source i, remembering them as expected next. */
static struct move_result
mover_move(struct mover *m, int i, size_t n)
{
	struct evbuffer *out = bufferevent_get_output(m->to);
	struct move_result r;

	mover_refill(m, i, n);
	if (m->expect_len + n > m->expect_room) {
		m->expect_room = (m->expect_len + n) * 2;
		m->expect = realloc(m->expect, m->expect_room);
	}
	evbuffer_copyout(m->src[i], m->expect + m->expect_len, n);
	m->expect_len += n;
	r.out_before = evbuffer_get_length(out);
	r.sock_before = inq(m->peer);
	r.src_before = evbuffer_get_length(m->src[i]);
	relay_move(m->to, relay_link_of(m->to), m->src[i], n);
	r.out_after = evbuffer_get_length(out);
	r.sock_after = inq(m->peer);
	r.src_after = evbuffer_get_length(m->src[i]);
	return r;
}

/* Read what the peer end holds (at most max bytes). */
static void
mover_read(struct mover *m, size_t max)
{
	if (m->recv_len + max + 1 > m->recv_room) {
		m->recv_room = (m->recv_len + max + 1) * 2;
		m->recv = realloc(m->recv, m->recv_room);
	}
	m->recv_len += read_all(m->peer, m->recv + m->recv_len, max);
}

/* Run the loop and read until every expected byte is in; 0 if it stalls. */
static int
mover_flush(struct mover *m)
{
	int idle = 0;

	while (m->recv_len < m->expect_len || evbuffer_get_length(bufferevent_get_output(m->to)) > 0) {
		size_t before = m->recv_len;
		struct pollfd p = { m->peer, POLLIN, 0 };

		event_base_loop(m->base, EVLOOP_NONBLOCK);
		mover_read(m, 1 << 20);
		if (m->recv_len > before) {
			idle = 0;
			continue;
		}
		/* Nothing queued and the socket read dry: nothing more will come. */
		if (m->recv_len > m->expect_len || ++idle > 50 ||
		    evbuffer_get_length(bufferevent_get_output(m->to)) == 0)
			return 0;
		poll(&p, 1, 100);
	}
	return 1;
}

static void
mover_init(struct mover *m, uint64_t seed, int sndbuf)
{
	int sv[2];

	memset(m, 0, sizeof(*m));
	pair(sv);
	if (sndbuf > 0)
		setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	m->base = event_base_new();
	m->to = bufferevent_socket_new(m->base, sv[0], BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	relay_io_sizes(m->to);
	bufferevent_enable(m->to, EV_READ | EV_WRITE);
	m->peer = sv[1];
	m->rng = seed;
	for (int i = 0; i < NSRC; i++) {
		m->src[i] = evbuffer_new();
		m->src_seed[i] = seed * 31 + (uint64_t)i;
	}
}

static void
mover_free(struct mover *m)
{
	bufferevent_free(m->to);
	close(m->peer);
	for (int i = 0; i < NSRC; i++)
		evbuffer_free(m->src[i]);
	event_base_free(m->base);
	free(m->expect);
	free(m->recv);
}

static int
mover_same(const struct mover *m)
{
	if (m->recv_len != m->expect_len)
		return 0;
	for (size_t i = 0; i < m->recv_len; i++)
		if (m->recv[i] != m->expect[i]) {
			diag("first difference at byte %zu of %zu", i, m->recv_len);
			return 0;
		}
	return 1;
}

static size_t
move_size(uint64_t *rng)
{
	switch (rnd(rng) % 8) {
	case 0:
		return 0;
	case 1: case 2:
		return 1 + (size_t)(rnd(rng) % 100);
	default:
		return 1 + (size_t)(rnd(rng) % MAX_WRITE);
	}
}

static void
test_move(uint64_t seed)
{
	struct mover m;
	struct move_result r;
	size_t direct = 0, queued_part = 0, n;
	int calls, bad, flushed, direct_calls = 0, behind_calls = 0, partial_calls = 0;

	mover_init(&m, seed, 4096);

	/* Idle peer: written straight into the socket. */
	r = mover_move(&m, 0, 1000);
	ok(r.out_after == 0 && r.sock_after == 1000 && r.src_after == r.src_before - 1000,
	    "move seed %llu: 1000 bytes to an idle peer go straight to its socket "
	    "(output %zu, socket %zu)", (unsigned long long)seed, r.out_after, r.sock_after);

	/* Fill the socket (nobody reads): the call that does not fit queues the rest. */
	for (calls = 0; calls < 1000; calls++) {
		r = mover_move(&m, (int)(rnd(&m.rng) % NSRC), 65536);
		if (r.out_after > 0)
			break;
	}
	direct = r.sock_after - r.sock_before;
	queued_part = r.out_after;
	ok(calls < 1000 && r.out_before == 0 && queued_part > 0 && direct + queued_part == 65536 &&
	    r.src_after == r.src_before - 65536,
	    "move seed %llu: socket full after %d calls: of 65536 bytes %zu written, %zu queued",
	    (unsigned long long)seed, calls + 1, direct, queued_part);

	/* Later moves queue behind it, nothing reaches the socket. */
	bad = 0;
	for (int i = 0; i < 30; i++) {
		n = move_size(&m.rng);
		r = mover_move(&m, (int)(rnd(&m.rng) % NSRC), n);
		if (r.out_after != r.out_before + n || r.sock_after != r.sock_before || r.src_after != r.src_before - n)
			bad++;
	}
	ok(bad == 0, "move seed %llu: 30 moves behind a queue are queued whole (%d were not)",
	    (unsigned long long)seed, bad);

	/* Interleave moves with the peer reading and the loop flushing. */
	bad = 0;
	for (int i = 0; i < 1500; i++) {
		if (rnd(&m.rng) % 5 < 3) {
			n = move_size(&m.rng);
			r = mover_move(&m, (int)(rnd(&m.rng) % NSRC), n);
			if (r.src_after != r.src_before - n)
				bad++;
			else if (r.out_before > 0) {
				behind_calls += n > 0;
				if (r.out_after != r.out_before + n || r.sock_after != r.sock_before)
					bad++;
			} else {
				size_t wrote = r.sock_after - r.sock_before;

				if (r.sock_after < r.sock_before || wrote + r.out_after != n)
					bad++;
				direct_calls += wrote > 0;
				partial_calls += wrote > 0 && r.out_after > 0;
			}
		} else if (rnd(&m.rng) % 5 < 4) {
			mover_read(&m, (size_t)(rnd(&m.rng) % 300000));
			if (rnd(&m.rng) % 2)
				event_base_loop(m.base, EVLOOP_NONBLOCK);
		} else if (!mover_flush(&m)) {
			diag("flush %d: %zu of %zu bytes arrived", i, m.recv_len, m.expect_len);
			bad++;		/* the peer idle again: the next move goes straight */
			break;
		}
	}
	ok(bad == 0 && direct_calls > 0 && behind_calls > 0,
	    "move seed %llu: 1500 interleaved steps: every move wrote or queued exactly its bytes "
	    "(%d did not; %d wrote directly, %d of them partly; %d queued behind)",
	    (unsigned long long)seed, bad, direct_calls, partial_calls, behind_calls);

	flushed = mover_flush(&m);
	ok(flushed && mover_same(&m),
	    "move seed %llu: the peer reads all %zu bytes in call order (got %zu)",
	    (unsigned long long)seed, m.expect_len, m.recv_len);
	mover_free(&m);
}

/* Write disabled, no socket, TLS: relay_move queues every byte. */
static void
test_move_queues(void)
{
	struct mover m;
	struct move_result r;
	struct bufferevent *plain;
	int sv[2], flushed;

	mover_init(&m, 99, 0);
	bufferevent_disable(m.to, EV_WRITE);
	r = mover_move(&m, 0, 3000);
	ok(r.out_after == 3000 && r.sock_after == 0 && r.src_after == r.src_before - 3000,
	    "EV_WRITE disabled: 3000 bytes queued (output %zu), none in the socket (%zu)",
	    r.out_after, r.sock_after);
	r = mover_move(&m, 1, 500);
	bufferevent_enable(m.to, EV_WRITE);
	flushed = mover_flush(&m);
	ok(r.out_after == 3500 && r.sock_after == 0 && flushed && mover_same(&m),
	    "EV_WRITE enabled again: the queue goes out in order (%zu of %zu bytes)", m.recv_len, m.expect_len);
	mover_free(&m);

	/* A bufferevent without a socket yet (an upstream before connect). */
	mover_init(&m, 98, 0);
	plain = m.to;
	m.to = bufferevent_socket_new(m.base, -1, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	bufferevent_enable(m.to, EV_WRITE);
	r = mover_move(&m, 0, 2000);
	ok(r.out_after == 2000 && r.src_after == r.src_before - 2000 && inq(m.peer) == 0,
	    "no socket yet: 2000 bytes queued (output %zu)", r.out_after);
	bufferevent_free(m.to);
	m.to = plain;
	mover_free(&m);

	/* TLS: the output holds plaintext for SSL_write, never the socket. */
	mover_init(&m, 97, 0);
	plain = m.to;
	pair(sv);
	m.to = tls_bev(m.base, sv[0]);
	if (m.to == NULL) {
		ok(0, "TLS bufferevent: cannot make one");
		m.to = plain;
	} else {
		int peer = m.peer;

		m.peer = sv[1];
		bufferevent_enable(m.to, EV_WRITE);
		r = mover_move(&m, 0, 2000);
		ok(r.out_after == 2000 && r.sock_after == 0 && r.src_after == r.src_before - 2000,
		    "TLS bufferevent: 2000 bytes queued as plaintext (output %zu), none in the socket (%zu)",
		    r.out_after, r.sock_after);
		bufferevent_free(m.to);
		close(sv[1]);
		m.to = plain;
		m.peer = peer;
	}
	mover_free(&m);
}

int
main(void)
{
	signal(SIGPIPE, SIG_IGN);

	/* 1. bulk reads past libevent's 4 KiB, within the cap. */
	for (uint64_t seed = 1; seed <= 3; seed++)
		test_stream(seed, READER_MORE);
	for (uint64_t seed = 4; seed <= 6; seed++)
		test_stream(seed, READER_HOOKED);

	/* 2. EOF right behind the data: at every boundary relay_read_more meets
	   (and the hooked reader's own: its small chain, its 4 KiB). */
	for (enum reader r = READER_MORE; r <= READER_HOOKED; r++) {
		test_eof(1, r);
		test_eof(512, r);
		test_eof(1000, r);
		test_eof(LIBEVENT_READ, r);		/* read-more finds EOF at once */
		test_eof(LIBEVENT_READ + 1, r);
		test_eof(LIBEVENT_READ + 65536, r);	/* one full chunk, then EOF */
		test_eof(CAP, r);
		test_eof(CAP + 1, r);
		test_eof(300000, r);			/* more than the socket holds */
	}
	/* ... and a reset behind the data: one partial read, two that drain
	 * the socket exactly so read-more's next read meets the reset. */
	test_reset(5000);
	test_reset(LIBEVENT_READ);
	test_reset(LIBEVENT_READ + 65536);

	/* 3. nothing read when disabled, below 4 KiB, at the cap or over TLS. */
	test_read_more_conditions();

	/* 3b. the hooked reader under libevent's timeout, enable and watermark. */
	test_hook_controls();

	/* 4. relay_move: direct, queued, in order. */
	for (uint64_t seed = 1; seed <= 3; seed++)
		test_move(seed);

	/* 5. nothing written directly when it may not be. */
	test_move_queues();

	SSL_CTX_free(tls_ctx);
	return tap_done();
}
