/* imapfresh-bench: an IMAP load generator on libevent, for imapfresh or any IMAP server or proxy.
 *
 * One event loop per thread (--threads, default 1), raw non-blocking sockets,
 * OpenSSL directly on the socket (no bufferevent copies), and a streaming
 * response scanner that never buffers a response: it keeps the first bytes of
 * each response (tag, status) and the last bytes of each physical line (to see
 * a {n} literal announcement), and skips literal payloads by count. So the
 * client costs far less per byte and per round trip than the server it drives.
 *
 * Workloads (see bench/README.md and --help): fetch, noop, sessions,
 * handshakes, idle, resync, and seed (fills a mailbox with APPEND).
 *
 * --compress: COMPRESS DEFLATE (RFC 4978) after LOGIN. From its tagged OK on,
 * what is sent is deflated (raw, 32 KiB window, a sync flush per command)
 * and what is received is inflated before the scanner sees it: throughput
 * counts the inflated bytes (what the client gets), wire_bytes what came
 * over the link (what TLS carried).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#define ZLIB_CONST
#include <zlib.h>

#define BENCH_VERSION "1"
#define READ_BUF (256 * 1024)	/* one per thread: the scanner keeps nothing of it */
#define READ_BUDGET (1024 * 1024)	/* bytes read per callback before yielding */
#define ZBUF (256 * 1024)	/* one per thread: inflated bytes on their way to the scanner */
/* Deflating commands: the window is RFC 4978's (raw, 2^15), the level zlib's
 * default. memLevel only sizes the client's own hash table, which a few
 * bytes per command never fill; 1 keeps 10,000 idle sessions cheap here and
 * changes nothing for the server, whose inflate window is fixed at 32 KiB. */
#define ZLEVEL Z_DEFAULT_COMPRESSION
#define ZMEMLEVEL 1
#define HEAD_MAX 96		/* first bytes of a response kept (tag, status, text) */
#define TAIL_MAX 32		/* last bytes of a physical line kept ({n} announcements) */
#define RECONNECT_DELAY_MS 100
#define MAX_ERRORS_WITHOUT_PROGRESS 200

/* ------------------------------------------------------------------ time */

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------- histogram */

/* Log-linear: exact below 128 ns, then 64 buckets per power of two (1.6 %). */
#define HIST_SUB_BITS 6
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_MAX_MSB 47
#define HIST_BUCKETS (2 * HIST_SUB + (HIST_MAX_MSB - HIST_SUB_BITS) * HIST_SUB)

struct hist {
	uint64_t count, sum, max;
	uint64_t b[HIST_BUCKETS];
};

static unsigned
hist_index(uint64_t v)
{
	unsigned msb;

	if (v < 2 * HIST_SUB)
		return (unsigned)v;
	msb = 63u - (unsigned)__builtin_clzll(v);
	if (msb > HIST_MAX_MSB)
		return HIST_BUCKETS - 1;
	return 2 * HIST_SUB + (msb - HIST_SUB_BITS - 1) * HIST_SUB +
	    (unsigned)((v >> (msb - HIST_SUB_BITS)) & (HIST_SUB - 1));
}

/* Middle of bucket i, in ns. */
static double
hist_value(unsigned i)
{
	unsigned octave, sub, shift;

	if (i < 2 * HIST_SUB)
		return (double)i;
	octave = (i - 2 * HIST_SUB) / HIST_SUB;
	sub = (i - 2 * HIST_SUB) % HIST_SUB;
	shift = octave + 1;
	return (double)(((uint64_t)(HIST_SUB + sub) << shift) + ((uint64_t)1 << shift) / 2);
}

static void
hist_add(struct hist *h, uint64_t v)
{
	h->b[hist_index(v)]++;
	h->count++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
}

static void
hist_merge(struct hist *into, const struct hist *h)
{
	for (unsigned i = 0; i < HIST_BUCKETS; i++)
		into->b[i] += h->b[i];
	into->count += h->count;
	into->sum += h->sum;
	if (h->max > into->max)
		into->max = h->max;
}

/* Percentile p (0..100) in microseconds; 0 when empty. */
static double
hist_pct_us(const struct hist *h, double p)
{
	uint64_t want, seen = 0;

	if (h->count == 0)
		return 0;
	want = (uint64_t)((double)h->count * p / 100.0 + 0.5);
	if (want < 1)
		want = 1;
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		seen += h->b[i];
		if (seen >= want) {
			double v = hist_value(i);
			return (v > (double)h->max ? (double)h->max : v) / 1000.0;
		}
	}
	return (double)h->max / 1000.0;
}

/* --------------------------------------------------------------- options */

enum workload {
	WL_FETCH, WL_NOOP, WL_SESSIONS, WL_IDLE, WL_HANDSHAKES, WL_RESYNC, WL_SEED, WL_COMMAND,
};

static const char *const workload_names[] = {
	[WL_FETCH] = "fetch", [WL_NOOP] = "noop", [WL_SESSIONS] = "sessions",
	[WL_IDLE] = "idle", [WL_HANDSHAKES] = "handshakes", [WL_RESYNC] = "resync",
	[WL_SEED] = "seed", [WL_COMMAND] = "command",
};

static struct options {
	const char *host;
	int port;
	int tls, starttls;
	const char *user, *pass;
	enum workload wl;
	int concurrency;	/* connections (resync: pairs) */
	int threads;
	double duration, warmup;
	long long count;
	int change_every;	/* resync: one round in N changes the mailbox first (0: none) */
	const char *mailbox;
	int json;
	int connect_burst;	/* connections being set up at once, per thread */
	double setup_timeout;	/* idle: give up waiting for everyone after this */
	double stall_timeout;	/* idle: ... or after this long without progress */
	const char *sni;
	const char *ca;		/* verify the server with this CA (default: no verification) */
	const char *label;	/* free text echoed in the output (the script's target name) */
	int seed_big, seed_small;
	long big_size, small_size;
	const char *command;	/* workload command: the command repeated */
	int compress;		/* COMPRESS DEFLATE after LOGIN */
	int seed_pattern;	/* seed: the old letter pattern instead of mail-like content */
} opt = {
	.host = "127.0.0.1", .port = 143, .user = NULL, .pass = NULL, .wl = WL_NOOP,
	.concurrency = 0, .threads = 1, .duration = 10, .warmup = -1, .count = 0,
	.mailbox = "INBOX", .change_every = 2, .connect_burst = 64, .setup_timeout = 300, .stall_timeout = 15,
	.command = "UID FETCH 1:* (FLAGS)",
	.seed_big = 50, .seed_small = 1000, .big_size = 1024 * 1024, .small_size = 2048,
};

static struct sockaddr_storage target_addr;
static socklen_t target_addrlen;
static SSL_CTX *ssl_ctx;

/* ------------------------------------------------------- shared run state */

enum run_phase { PHASE_WARMUP, PHASE_MEASURE, PHASE_DONE };

static atomic_int run_phase = PHASE_WARMUP;
static atomic_int run_stop;
static atomic_llong ops_done;		/* measured operations, for --count */
static atomic_int idle_held, idle_failed;
static atomic_int fatal_error;
static char fatal_msg[256];
static pthread_mutex_t fatal_lock = PTHREAD_MUTEX_INITIALIZER;

static void
set_fatal(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&fatal_lock);
	if (!atomic_load(&fatal_error)) {
		va_start(ap, fmt);
		vsnprintf(fatal_msg, sizeof(fatal_msg), fmt, ap);
		va_end(ap);
		atomic_store(&fatal_error, 1);
	}
	pthread_mutex_unlock(&fatal_lock);
	atomic_store(&run_stop, 1);
}

/* --------------------------------------------------------- per-thread data */

struct stats {
	struct hist lat;		/* per operation */
	struct hist rs_changed, rs_unchanged;		/* resync: GETQUOTAROOT + UID FETCH */
	struct hist rs_gqr_changed, rs_gqr_unchanged;	/* resync: GETQUOTAROOT alone */
	uint64_t ops, bytes, literal_bytes, errors, setup_ok;
	uint64_t wire_bytes;		/* received as they came over the link (compressed or not) */
	uint64_t progress;		/* anything completed, measured or not */
	char last_error[200];
};

enum conn_phase {
	C_IDLE_SLOT,		/* not connected (waiting to start or restart) */
	C_CONNECTING,
	C_TLS,			/* implicit TLS handshake */
	C_GREETING,
	C_STARTTLS,		/* STARTTLS sent, waiting for OK */
	C_STARTTLS_HS,
	C_LOGIN,
	C_COMPRESS,		/* COMPRESS DEFLATE sent, waiting for OK */
	C_SELECT,
	C_RUN,			/* the workload's own commands */
	C_LOGOUT,
	C_HOLD,			/* idle: in IDLE, holding */
};

struct worker;

struct conn {
	struct worker *w;
	int idx;
	int fd;
	SSL *ssl;
	struct event *ev;
	short ev_flags;		/* what ev waits for now; 0 = not added */
	enum conn_phase phase;
	int in_setup;		/* counted in worker->setting_up */
	int ssl_want_write;	/* SSL_read/SSL_write/handshake wants the socket writable */

	char *out;
	size_t out_len, out_off, out_cap;
	size_t out_z;		/* compressing: out[out_z..out_len) is not deflated yet */

	/* COMPRESS=DEFLATE, once the server's tagged OK came */
	int z_on;
	z_stream zin, zout;

	/* response scanner */
	uint64_t lit_rem;
	char head[HEAD_MAX];
	size_t head_len;
	int first_line;		/* the head is still being collected */
	char tail[TAIL_MAX];
	size_t tail_len;

	/* the command we wait for */
	char tag[24];
	unsigned seq;
	uint64_t t_cmd, t_start;

	/* resync pairs: observer (even index) and changer (odd) */
	struct conn *peer;
	int ready;
	int iter;		/* resync iteration: odd ones change the mailbox first */
	int rs_step;		/* resync: 1 GETQUOTAROOT sent, 2 UID FETCH sent; seed: 1 appending */
	uint64_t t_gqr, gqr_lat;
	unsigned gen;		/* bumped at every close: callbacks notice a replaced socket */

	/* seed */
	int seed_done;
	int append_pending;	/* "+" awaited: the literal goes out then */
	size_t append_len;
};

struct worker {
	int id;
	struct event_base *base;
	struct event *tick;
	struct conn *conns;
	int nconns;
	int setting_up;
	int *waiting;		/* queue of connection indexes waiting to start */
	int wait_head, wait_tail, wait_cap;
	struct stats st;
	uint64_t errors_since_progress;
	char *rbuf;
	unsigned char *zbuf;	/* inflated bytes (--compress) */
	unsigned char *zplain;	/* commands being deflated (--compress) */
	size_t zplain_cap;
	pthread_t thread;
	char *message;		/* seed: message buffer */
};

static void conn_start(struct conn *c);
static void conn_fail(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void conn_event_cb(evutil_socket_t fd, short what, void *arg);
static void conn_after_setup(struct conn *c);
static void conn_restart_later(struct conn *c);
static void conn_update_events(struct conn *c);

static int
measuring(void)
{
	return atomic_load_explicit(&run_phase, memory_order_relaxed) == PHASE_MEASURE;
}

/* --------------------------------------------------------------- output */

static void
out_reserve(struct conn *c, size_t n)
{
	if (c->out_off > 0 && c->out_off == c->out_len)
		c->out_off = c->out_len = c->out_z = 0;
	if (c->out_len + n <= c->out_cap)
		return;
	if (c->out_off > 0) {
		memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
		c->out_len -= c->out_off;
		c->out_z = c->out_z > c->out_off ? c->out_z - c->out_off : 0;
		c->out_off = 0;
		if (c->out_len + n <= c->out_cap)
			return;
	}
	size_t cap = c->out_cap ? c->out_cap : 256;
	while (cap < c->out_len + n)
		cap *= 2;
	char *p = realloc(c->out, cap);
	if (p == NULL) {
		fprintf(stderr, "imapfresh-bench: out of memory\n");
		exit(1);
	}
	c->out = p;
	c->out_cap = cap;
}

static void
out_add(struct conn *c, const void *data, size_t n)
{
	out_reserve(c, n);
	memcpy(c->out + c->out_len, data, n);
	c->out_len += n;
}

static void out_printf(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
out_printf(struct conn *c, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	out_reserve(c, (size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf(c->out + c->out_len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	c->out_len += (size_t)n;
}

/* Append an IMAP quoted string. */
static void
out_quoted(struct conn *c, const char *s)
{
	out_add(c, "\"", 1);
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			out_add(c, "\\", 1);
		out_add(c, s, 1);
	}
	out_add(c, "\"", 1);
}

static int conn_flush(struct conn *c);

/* Compressing: deflate what was queued since the last flush, with a sync
 * flush, so that the server can act on every command as it arrives. */
static int
conn_deflate_out(struct conn *c)
{
	struct worker *w = c->w;
	z_stream *z = &c->zout;
	size_t n;
	int rc;

	if (!c->z_on || c->out_z >= c->out_len)
		return 0;
	n = c->out_len - c->out_z;
	if (n > w->zplain_cap) {
		unsigned char *p = realloc(w->zplain, n);
		if (p == NULL) {
			fprintf(stderr, "imapfresh-bench: out of memory\n");
			exit(1);
		}
		w->zplain = p;
		w->zplain_cap = n;
	}
	memcpy(w->zplain, c->out + c->out_z, n);
	c->out_len = c->out_z;
	z->next_in = w->zplain;
	z->avail_in = (uInt)n;
	do {
		out_reserve(c, n / 4 + 4096);
		z->next_out = (Bytef *)c->out + c->out_len;
		z->avail_out = (uInt)(c->out_cap - c->out_len);
		rc = deflate(z, Z_SYNC_FLUSH);
		c->out_len = (size_t)((char *)z->next_out - c->out);
		if (rc != Z_OK && rc != Z_BUF_ERROR) {
			conn_fail(c, "deflate failed (%d)", rc);
			return -1;
		}
	} while (z->avail_out == 0);
	c->out_z = c->out_len;
	return 0;
}

/* Write now what is queued (the latency clock is running), else when writable. */
static void
conn_send_now(struct conn *c)
{
	if (c->fd >= 0 && (c->phase != C_CONNECTING && c->phase != C_TLS &&
	    c->phase != C_STARTTLS_HS) && conn_flush(c) < 0)
		return;
	conn_update_events(c);
}

/* Start a command: new tag, its text, CRLF. The clock starts now. */
static void cmd_send(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
cmd_send(struct conn *c, const char *fmt, ...)
{
	va_list ap;
	char line[512];

	snprintf(c->tag, sizeof(c->tag), "%c%u", 'a' + (c->idx % 26), ++c->seq);
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	out_printf(c, "%s %s\r\n", c->tag, line);
	c->t_cmd = now_ns();
	conn_send_now(c);
}

/* Flush what can be written. Returns -1 on a fatal error (connection failed). */
static int
conn_flush(struct conn *c)
{
	if (conn_deflate_out(c) < 0)
		return -1;
	while (c->out_off < c->out_len) {
		size_t n = c->out_len - c->out_off;
		if (c->ssl != NULL) {
			int r;
			ERR_clear_error();
			r = SSL_write(c->ssl, c->out + c->out_off, n > INT_MAX ? INT_MAX : (int)n);
			if (r <= 0) {
				int e = SSL_get_error(c->ssl, r);
				if (e == SSL_ERROR_WANT_WRITE) {
					c->ssl_want_write = 1;
					return 0;
				}
				if (e == SSL_ERROR_WANT_READ)
					return 0;
				conn_fail(c, "TLS write failed (%d)", e);
				return -1;
			}
			c->out_off += (size_t)r;
		} else {
			ssize_t r = send(c->fd, c->out + c->out_off, n, MSG_NOSIGNAL);
			if (r < 0) {
				if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
					return 0;
				conn_fail(c, "write: %s", strerror(errno));
				return -1;
			}
			c->out_off += (size_t)r;
		}
	}
	c->out_off = c->out_len = c->out_z = 0;
	return 0;
}

/* -------------------------------------------------------------- events */

static void
conn_set_events(struct conn *c, short flags)
{
	if (flags == c->ev_flags)
		return;
	if (c->ev_flags)
		event_del(c->ev);
	c->ev_flags = flags;
	if (flags) {
		event_assign(c->ev, c->w->base, c->fd, flags | EV_PERSIST, conn_event_cb, c);
		event_add(c->ev, NULL);
	}
}

static void
conn_update_events(struct conn *c)
{
	short f = EV_READ;

	if (c->fd < 0)
		return;
	if (c->phase == C_CONNECTING)
		f = EV_WRITE;
	else if (c->out_off < c->out_len || c->ssl_want_write)
		f |= EV_WRITE;
	conn_set_events(c, f);
}

/* ------------------------------------------------------------ lifecycle */

static void
worker_setup_done(struct conn *c)
{
	struct worker *w = c->w;

	if (!c->in_setup)
		return;
	c->in_setup = 0;
	w->setting_up--;
	while (w->setting_up < opt.connect_burst && w->wait_head != w->wait_tail) {
		int i = w->waiting[w->wait_head];
		w->wait_head = (w->wait_head + 1) % w->wait_cap;
		conn_start(&w->conns[i]);
	}
}

static void
conn_close_fd(struct conn *c)
{
	if (c->ev_flags) {
		event_del(c->ev);
		c->ev_flags = 0;
	}
	if (c->ssl != NULL) {
		SSL_free(c->ssl);
		c->ssl = NULL;
	}
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
	if (c->z_on) {
		inflateEnd(&c->zin);
		deflateEnd(&c->zout);
		c->z_on = 0;
	}
	c->out_off = c->out_len = c->out_z = 0;
	c->ssl_want_write = 0;
	c->phase = C_IDLE_SLOT;
	c->gen++;
	worker_setup_done(c);
}

static void
conn_fail(struct conn *c, const char *fmt, ...)
{
	struct worker *w = c->w;
	va_list ap;
	int was_setup = c->in_setup;
	enum conn_phase ph = c->phase;

	va_start(ap, fmt);
	vsnprintf(w->st.last_error, sizeof(w->st.last_error), fmt, ap);
	va_end(ap);
	w->st.errors++;
	w->errors_since_progress++;
	conn_close_fd(c);
	if (atomic_load(&run_stop))
		return;
	if (w->errors_since_progress > MAX_ERRORS_WITHOUT_PROGRESS && w->st.progress == 0) {
		set_fatal("%d errors and nothing completed; last: %s", MAX_ERRORS_WITHOUT_PROGRESS,
		    w->st.last_error);
		return;
	}
	switch (opt.wl) {
	case WL_IDLE:
		if (!was_setup && ph == C_HOLD)
			atomic_fetch_sub(&idle_held, 1);
		atomic_fetch_add(&idle_failed, 1);
		break;
	case WL_SEED:
		set_fatal("seeding failed: %s", w->st.last_error);
		break;
	case WL_RESYNC:
		set_fatal("resync connection failed: %s", w->st.last_error);
		break;
	default:
		conn_restart_later(c);
	}
}

static void
conn_restart_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	conn_start(arg);
}

static void
conn_restart_later(struct conn *c)
{
	struct timeval tv = { 0, RECONNECT_DELAY_MS * 1000 };

	event_base_once(c->w->base, -1, EV_TIMEOUT, conn_restart_cb, c, &tv);
}

/* Queue or start a connection, honouring --connect-burst. */
static void
conn_schedule(struct conn *c)
{
	struct worker *w = c->w;

	if (w->setting_up < opt.connect_burst) {
		conn_start(c);
		return;
	}
	w->waiting[w->wait_tail] = c->idx;
	w->wait_tail = (w->wait_tail + 1) % w->wait_cap;
}

static void
conn_start(struct conn *c)
{
	struct worker *w = c->w;
	int one = 1;

	if (atomic_load(&run_stop))
		return;
	c->lit_rem = 0;
	c->head_len = c->tail_len = 0;
	c->first_line = 1;
	c->tag[0] = '\0';
	c->ready = 0;
	c->t_start = now_ns();
	c->fd = socket(target_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		if (!c->in_setup) {
			c->in_setup = 1;
			w->setting_up++;
		}
		conn_fail(c, "socket: %s", strerror(errno));
		return;
	}
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (!c->in_setup) {
		c->in_setup = 1;
		w->setting_up++;
	}
	c->phase = C_CONNECTING;
	if (connect(c->fd, (struct sockaddr *)&target_addr, target_addrlen) < 0 &&
	    errno != EINPROGRESS) {
		conn_fail(c, "connect: %s", strerror(errno));
		return;
	}
	conn_update_events(c);
}

static int
conn_tls_begin(struct conn *c)
{
	if ((c->ssl = SSL_new(ssl_ctx)) == NULL) {
		conn_fail(c, "SSL_new failed");
		return -1;
	}
	SSL_set_fd(c->ssl, c->fd);
	SSL_set_connect_state(c->ssl);
	if (opt.sni != NULL && opt.sni[0])
		SSL_set_tlsext_host_name(c->ssl, opt.sni);
	if (opt.ca != NULL && opt.sni != NULL && opt.sni[0])
		SSL_set1_host(c->ssl, opt.sni);
	return 0;
}

/* Returns 1 when done, 0 when waiting, -1 on failure (connection gone). */
static int
conn_tls_step(struct conn *c)
{
	int r, e;

	ERR_clear_error();
	r = SSL_do_handshake(c->ssl);
	if (r == 1) {
		c->ssl_want_write = 0;
		return 1;
	}
	e = SSL_get_error(c->ssl, r);
	if (e == SSL_ERROR_WANT_READ) {
		c->ssl_want_write = 0;
		conn_update_events(c);
		return 0;
	}
	if (e == SSL_ERROR_WANT_WRITE) {
		c->ssl_want_write = 1;
		conn_update_events(c);
		return 0;
	}
	{
		char buf[160];
		unsigned long le = ERR_get_error();
		ERR_error_string_n(le, buf, sizeof(buf));
		conn_fail(c, "TLS handshake failed: %s", le ? buf : (e == SSL_ERROR_SYSCALL ?
		    "connection closed" : "error"));
	}
	return -1;
}

/* The server accepted COMPRESS DEFLATE: both directions are raw DEFLATE
 * from its tagged OK on (RFC 4978 3). What is queued already went out. */
static int
conn_compress_start(struct conn *c)
{
	memset(&c->zin, 0, sizeof(c->zin));
	memset(&c->zout, 0, sizeof(c->zout));
	if (inflateInit2(&c->zin, -15) != Z_OK) {
		conn_fail(c, "inflateInit2 failed");
		return -1;
	}
	if (deflateInit2(&c->zout, ZLEVEL, Z_DEFLATED, -15, ZMEMLEVEL,
	    Z_DEFAULT_STRATEGY) != Z_OK) {
		inflateEnd(&c->zin);
		conn_fail(c, "deflateInit2 failed");
		return -1;
	}
	c->z_on = 1;
	c->out_z = c->out_len;
	return 0;
}

/* ---------------------------------------------------------- workloads */

/* Does this resync round change the mailbox first? */
static int
rs_changes(const struct conn *a)
{
	return opt.change_every > 0 && a->iter % opt.change_every == 1 % opt.change_every;
}

static void
rs_observer_next(struct conn *a)
{
	struct conn *b = a->peer;

	if (atomic_load(&run_stop))
		return;
	a->iter++;
	a->rs_step = 0;
	if (rs_changes(a)) {
		/* change the mailbox through the second connection first */
		size_t len;
		const char *msg = "From: bench@example.org\r\nSubject: resync bench\r\n\r\nchange\r\n";
		len = strlen(msg);
		b->append_pending = 1;
		b->append_len = len;
		cmd_send(b, "APPEND \"%s\" {%zu}", opt.mailbox, len);
	} else {
		a->rs_step = 1;
		a->t_gqr = now_ns();
		cmd_send(a, "GETQUOTAROOT \"INBOX\"");
	}
}

/*
 * Seeded message content. Its size is all that matters without COMPRESS;
 * with it, what deflate makes of the content is what is measured. So by
 * default (--seed-content mail) it is shaped like mail: text in words of
 * English drawn at random (common words more often: deflate gets ~2.8x out
 * of a stream of it, as out of real prose), and for messages of 16 KiB or
 * more a multipart/mixed with a short text and a base64 attachment of
 * random bytes (a photo, a PDF, an archive: already compressed, deflate
 * gets ~1.3x out of its base64). Deterministic per message; sizes exactly
 * as asked.
 * --seed-content pattern is the earlier content: the letters a-z in turn,
 * which deflates about 300x and so overstates any compression.
 */
static const char *const seed_words[] = {
	"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "was", "with",
	"be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
	"have", "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we",
	"their", "has", "would", "when", "if", "so", "no", "will", "my", "more", "can", "out",
	"up", "about", "who", "what", "said", "them", "some", "could", "him", "into", "its",
	"then", "two", "time", "only", "do", "like", "other", "now", "over", "than", "also",
	"first", "people", "any", "may", "new", "after", "very", "most", "made", "well", "our",
	"even", "because", "these", "where", "way", "many", "much", "before", "such", "through",
	"me", "back", "years", "just", "should", "work", "day", "good", "long", "those", "own",
	"down", "both", "still", "how", "here", "while", "last", "world", "great", "did",
	"must", "year", "see", "state", "part", "between", "under", "old", "life", "never",
	"same", "another", "know", "take", "place", "each", "might", "around", "however",
	"against", "since", "three", "again", "come", "few", "high", "right", "small", "think",
	"off", "without", "home", "every", "thing", "during", "system", "end", "got", "us",
	"used", "give", "found", "number", "next", "case", "fact", "group", "began", "often",
	"until", "order", "public", "side", "meeting", "report", "invoice", "attached",
	"please", "thanks", "regards", "monday", "project", "server", "mailbox", "account",
};

static uint64_t
seed_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15u);	/* splitmix64 */

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
	return z ^ (z >> 31);
}

/* Exactly len bytes of lines of words, each line ending in CRLF (a last
 * byte alone is a space). */
static void
seed_text(char *p, size_t len, uint64_t *rng)
{
	const size_t nwords = sizeof(seed_words) / sizeof(seed_words[0]);
	size_t i = 0;
	int cap = 1;

	while (i < len) {
		size_t left = len - i, max, ll = 0;
		if (left <= 2) {
			memcpy(p + i, left == 2 ? "\r\n" : " ", left);
			break;
		}
		max = left - 2 < 72 ? left - 2 : 72;
		for (;;) {
			uint64_t r = seed_rand(rng);
			/* the product of two uniform picks: common words first */
			size_t k = (size_t)(((r & 0xffff) % nwords) * (((r >> 16) & 0xffff) % nwords) /
			    nwords);
			const char *wd = seed_words[k];
			size_t wl = strlen(wd), need = wl + (ll > 0) + 1;
			unsigned punct = (unsigned)((r >> 32) % 100);
			if (ll + need > max)
				break;
			if (ll > 0)
				p[i + ll++] = ' ';
			memcpy(p + i + ll, wd, wl);
			if (cap && p[i + ll] >= 'a' && p[i + ll] <= 'z')
				p[i + ll] = (char)(p[i + ll] - 'a' + 'A');
			ll += wl;
			cap = punct < 8;
			if (punct < 8)
				p[i + ll++] = '.';
			else if (punct < 13)
				p[i + ll++] = ',';
		}
		while (ll < 1)	/* no word fits the last few bytes */
			p[i + ll++] = '.';
		memcpy(p + i + ll, "\r\n", 2);
		i += ll + 2;
	}
}

/* Exactly len bytes of base64 lines (76 characters and CRLF) of random bytes. */
static void
seed_base64(char *p, size_t len, uint64_t *rng)
{
	static const char b64[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	uint64_t r = 0;
	int bits = 0;

	for (size_t i = 0, col = 0; i < len; i++) {
		if (col == 76 && len - i >= 2) {
			memcpy(p + i, "\r\n", 2);
			i++;
			col = 0;
			continue;
		}
		if (bits < 6) {
			r = seed_rand(rng);
			bits = 64;
		}
		p[i] = b64[r & 63];
		r >>= 6;
		bits -= 6;
		col++;
	}
}

/* Message n (0-based) of about size bytes (exactly, unless its headers need
 * more) into *buf; returns its size, -1 when out of memory. */
static long
seed_message(char **buf, int n, long size)
{
	char head[1024], mid[512], tail[128], bound[48];
	uint64_t rng = 0x5eed0000u + (uint64_t)n;
	size_t hl, ml = 0, tl = 0, text = 0;
	int multipart = !opt.seed_pattern && size >= 16384;
	char *m;

	snprintf(bound, sizeof(bound), "=_bench-%d-boundary", n + 1);
	hl = (size_t)snprintf(head, sizeof(head),
	    "From: imapfresh-bench <bench@example.org>\r\nTo: bench@example.org\r\n"
	    "Subject: bench message %d (%ld bytes)\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
	    "Message-ID: <bench-%d-%ld@example.org>\r\nMIME-Version: 1.0\r\n", n + 1, size, n + 1,
	    size);
	if (multipart) {
		hl += (size_t)snprintf(head + hl, sizeof(head) - hl,
		    "Content-Type: multipart/mixed; boundary=\"%s\"\r\n\r\n"
		    "This is a multi-part message in MIME format.\r\n\r\n--%s\r\n"
		    "Content-Type: text/plain; charset=us-ascii\r\n\r\n", bound, bound);
		text = 1200;
		ml = (size_t)snprintf(mid, sizeof(mid),
		    "\r\n--%s\r\nContent-Type: application/pdf; name=\"report-%d.pdf\"\r\n"
		    "Content-Transfer-Encoding: base64\r\n"
		    "Content-Disposition: attachment; filename=\"report-%d.pdf\"\r\n\r\n",
		    bound, n + 1, n + 1);
		tl = (size_t)snprintf(tail, sizeof(tail), "\r\n--%s--\r\n", bound);
	} else
		hl += (size_t)snprintf(head + hl, sizeof(head) - hl,
		    "Content-Type: text/plain; charset=us-ascii\r\n\r\n");
	if ((long)(hl + text + ml + tl) + 80 > size)
		size = (long)(hl + text + ml + tl) + 80;
	free(*buf);
	if ((*buf = m = malloc((size_t)size)) == NULL)
		return -1;
	memcpy(m, head, hl);
	if (multipart) {
		size_t b64 = (size_t)size - hl - text - ml - tl;
		seed_text(m + hl, text, &rng);
		memcpy(m + hl + text, mid, ml);
		seed_base64(m + hl + text + ml, b64, &rng);
		memcpy(m + hl + text + ml + b64, tail, tl);
	} else if (!opt.seed_pattern)
		seed_text(m + hl, (size_t)size - hl, &rng);
	else
		for (long i = (long)hl; i < size;) {
			long left = size - i;
			if (left <= 2) {
				memset(m + i, 'x', (size_t)left);
				if (left == 2)
					memcpy(m + i, "\r\n", 2);
				break;
			}
			long line = left - 2 < 76 ? left - 2 : 76;
			for (long j = 0; j < line; j++)
				m[i + j] = (char)('a' + (char)((i + j + n) % 26));
			memcpy(m + i + line, "\r\n", 2);
			i += line + 2;
		}
	return size;
}

static void
seed_next(struct conn *c)
{
	struct worker *w = c->w;
	int n = c->seed_done;
	long size;

	if (n >= opt.seed_big + opt.seed_small) {
		c->phase = C_LOGOUT;
		cmd_send(c, "LOGOUT");
		return;
	}
	size = seed_message(&w->message, n, n < opt.seed_big ? opt.big_size : opt.small_size);
	if (size < 0) {
		set_fatal("out of memory");
		return;
	}
	c->append_pending = 1;
	c->append_len = (size_t)size;
	cmd_send(c, "APPEND \"%s\" (\\Seen) {%ld}", opt.mailbox, size);
}

/* The session is logged in (and has its mailbox selected where needed). */
static void
workload_begin(struct conn *c)
{
	c->phase = C_RUN;
	switch (opt.wl) {
	case WL_FETCH:
		cmd_send(c, "FETCH 1:* BODY.PEEK[]");
		break;
	case WL_NOOP:
		cmd_send(c, "NOOP");
		break;
	case WL_COMMAND:
		cmd_send(c, "%s", opt.command);
		break;
	case WL_SESSIONS:
		c->phase = C_LOGOUT;
		cmd_send(c, "LOGOUT");
		break;
	case WL_IDLE:
		cmd_send(c, "IDLE");
		break;
	case WL_RESYNC:
		c->ready = 1;
		if (c->peer->ready) {
			struct conn *a = (c->idx % 2 == 0) ? c : c->peer;
			a->iter = 0;
			rs_observer_next(a);
		}
		break;
	case WL_SEED:
		cmd_send(c, "CREATE \"%s\"", opt.mailbox);
		break;
	case WL_HANDSHAKES:
		break;
	}
}

static void
count_op(struct conn *c, uint64_t lat)
{
	struct worker *w = c->w;

	w->st.progress++;
	w->errors_since_progress = 0;
	if (!measuring())
		return;
	w->st.ops++;
	hist_add(&w->st.lat, lat);
	if (opt.count > 0 && atomic_fetch_add(&ops_done, 1) + 1 >= opt.count)
		atomic_store(&run_stop, 1);
}

/* Logged in (and compressing, with --compress): SELECT, or the workload at once. */
static void
conn_after_login(struct conn *c)
{
	struct worker *w = c->w;

	if (opt.wl == WL_SEED || (opt.wl == WL_RESYNC && c->idx % 2 == 1)) {
		worker_setup_done(c);
		w->st.setup_ok++;
		workload_begin(c);
		return;
	}
	c->phase = C_SELECT;
	out_printf(c, "%c%u SELECT ", 'a' + (c->idx % 26), ++c->seq);
	snprintf(c->tag, sizeof(c->tag), "%c%u", 'a' + (c->idx % 26), c->seq);
	out_quoted(c, opt.mailbox);
	out_add(c, "\r\n", 2);
	conn_update_events(c);
}

/* A complete tagged response to the command we sent. */
static void
on_tagged(struct conn *c, int ok, const char *text)
{
	uint64_t t = now_ns();
	struct worker *w = c->w;

	switch (c->phase) {
	case C_STARTTLS:
		if (!ok) {
			conn_fail(c, "STARTTLS refused: %s", text);
			return;
		}
		c->phase = C_STARTTLS_HS;
		if (conn_tls_begin(c) < 0)
			return;
		if (conn_tls_step(c) == 1)
			conn_after_setup(c);	/* cannot happen in one step, but harmless */
		return;
	case C_LOGIN:
		if (!ok) {
			conn_fail(c, "LOGIN refused: %s", text);
			return;
		}
		if (opt.compress) {
			c->phase = C_COMPRESS;
			cmd_send(c, "COMPRESS DEFLATE");
			return;
		}
		conn_after_login(c);
		return;
	case C_COMPRESS:
		if (!ok) {
			conn_fail(c, "COMPRESS refused: %s", text);
			return;
		}
		if (conn_compress_start(c) < 0)
			return;
		conn_after_login(c);
		return;
	case C_SELECT:
		if (!ok) {
			conn_fail(c, "SELECT %s refused: %s", opt.mailbox, text);
			return;
		}
		worker_setup_done(c);
		w->st.setup_ok++;
		workload_begin(c);
		return;
	case C_LOGOUT:
		if (opt.wl == WL_SESSIONS)
			count_op(c, t - c->t_start);
		conn_close_fd(c);
		if (opt.wl == WL_SEED) {
			atomic_store(&run_stop, 1);
			return;
		}
		conn_schedule(c);
		return;
	case C_RUN:
		break;
	default:
		return;
	}
	/* C_RUN */
	switch (opt.wl) {
	case WL_FETCH:
	case WL_NOOP:
	case WL_COMMAND:
		if (!ok) {
			conn_fail(c, "%s refused: %s", opt.wl == WL_FETCH ? "FETCH" :
			    opt.wl == WL_NOOP ? "NOOP" : opt.command, text);
			return;
		}
		count_op(c, t - c->t_cmd);
		if (!atomic_load(&run_stop))
			cmd_send(c, "%s", opt.wl == WL_FETCH ? "FETCH 1:* BODY.PEEK[]" :
			    opt.wl == WL_NOOP ? "NOOP" : opt.command);
		return;
	case WL_IDLE:
		/* IDLE ended by the server: count as a lost session */
		conn_fail(c, "IDLE ended by the server: %s", text);
		return;
	case WL_SEED:
		if (c->rs_step == 0) {
			c->rs_step = 1;	/* CREATE answered; NO when it exists: fine */
		} else if (!ok) {
			conn_fail(c, "APPEND refused: %s", text);
			return;
		} else {
			c->seed_done++;
			w->st.progress++;
			if (measuring()) {
				w->st.ops++;
				w->st.bytes += c->append_len;
			}
		}
		seed_next(c);
		return;
	case WL_RESYNC:
		if (!ok) {
			conn_fail(c, "resync command refused: %s", text);
			return;
		}
		if (c->idx % 2 == 1) {
			/* the changer's APPEND is done: now the observer */
			struct conn *a = c->peer;
			a->rs_step = 1;
			a->t_gqr = now_ns();
			cmd_send(a, "GETQUOTAROOT \"INBOX\"");
			return;
		}
		if (c->rs_step == 1) {
			c->gqr_lat = t - c->t_gqr;
			c->rs_step = 2;
			cmd_send(c, "UID FETCH 1:* (FLAGS)");
			return;
		}
		{
			uint64_t total = t - c->t_gqr;
			uint64_t gqr = c->gqr_lat;
			int changed = rs_changes(c);
			w->st.progress++;
			w->errors_since_progress = 0;
			if (measuring()) {
				hist_add(changed ? &w->st.rs_changed : &w->st.rs_unchanged, total);
				hist_add(changed ? &w->st.rs_gqr_changed : &w->st.rs_gqr_unchanged, gqr);
				w->st.ops++;
				if (opt.count > 0 && atomic_fetch_add(&ops_done, 1) + 1 >= opt.count)
					atomic_store(&run_stop, 1);
			}
			rs_observer_next(c);
		}
		return;
	default:
		return;
	}
}

static void
on_continuation(struct conn *c)
{
	if (c->append_pending) {
		struct worker *w = c->w;
		c->append_pending = 0;
		if (opt.wl == WL_SEED)
			out_add(c, w->message, c->append_len);
		else
			out_add(c, "From: bench@example.org\r\nSubject: resync bench\r\n\r\nchange\r\n",
			    c->append_len);
		out_add(c, "\r\n", 2);
		conn_update_events(c);
		return;
	}
	if (opt.wl == WL_IDLE && c->phase == C_RUN) {
		c->phase = C_HOLD;
		c->w->st.progress++;
		atomic_fetch_add(&idle_held, 1);
	}
}

/* LOGIN with the user and password quoted (cmd_send's line is not meant for them). */
static void
conn_send_login(struct conn *c)
{
	out_printf(c, "%c%u LOGIN ", 'a' + (c->idx % 26), ++c->seq);
	snprintf(c->tag, sizeof(c->tag), "%c%u", 'a' + (c->idx % 26), c->seq);
	out_quoted(c, opt.user);
	out_add(c, " ", 1);
	out_quoted(c, opt.pass);
	out_add(c, "\r\n", 2);
	conn_update_events(c);
}

/* Called once connected (and through implicit TLS, if any): wait for the greeting. */
static void
conn_after_setup(struct conn *c)
{
	if (c->phase == C_STARTTLS_HS) {
		if (opt.wl == WL_HANDSHAKES) {
			count_op(c, now_ns() - c->t_start);
			conn_close_fd(c);
			conn_schedule(c);
			return;
		}
		c->phase = C_LOGIN;
		conn_send_login(c);
		return;
	}
	c->phase = C_GREETING;
	conn_update_events(c);
}

static void
on_greeting(struct conn *c, const char *head, size_t len)
{
	if (len >= 5 && strncasecmp(head, "* BYE", 5) == 0) {
		conn_fail(c, "greeting: %.*s", (int)(len > 80 ? 80 : len), head);
		return;
	}
	if (opt.wl == WL_HANDSHAKES && !opt.starttls) {
		count_op(c, now_ns() - c->t_start);
		conn_close_fd(c);
		conn_schedule(c);
		return;
	}
	if (opt.starttls) {
		c->phase = C_STARTTLS;
		cmd_send(c, "STARTTLS");
		return;
	}
	if (len >= 10 && strncasecmp(head, "* PREAUTH ", 10) == 0) {
		c->phase = C_LOGIN;
		on_tagged(c, 1, "preauth");
		return;
	}
	c->phase = C_LOGIN;
	conn_send_login(c);
}

/* One complete response (literals included); head holds its first bytes. */
static void
on_response(struct conn *c)
{
	const char *h = c->head;
	size_t n = c->head_len, tl;
	char text[HEAD_MAX + 1];

	while (n > 0 && (h[n - 1] == '\r' || h[n - 1] == '\n'))
		n--;
	if (c->phase == C_GREETING) {
		if (n >= 1 && h[0] == '*')
			on_greeting(c, h, n);
		return;
	}
	if (n >= 1 && h[0] == '+') {
		on_continuation(c);
		return;
	}
	if (n >= 2 && h[0] == '*' && h[1] == ' ') {
		if (n >= 5 && strncasecmp(h, "* BYE", 5) == 0 && c->phase != C_LOGOUT)
			conn_fail(c, "server said: %.*s", (int)(n > 80 ? 80 : n), h);
		return;
	}
	tl = strlen(c->tag);
	if (tl == 0 || n <= tl || memcmp(h, c->tag, tl) != 0 || h[tl] != ' ')
		return;	/* not ours (or a truncated tag): ignore */
	memcpy(text, h + tl + 1, n - tl - 1);
	text[n - tl - 1] = '\0';
	c->tag[0] = '\0';
	on_tagged(c, strncasecmp(text, "OK", 2) == 0, text);
}

/* Is the physical line that just ended (tail, CRLF included) a literal announcement? */
static int
tail_literal(const char *t, size_t n, uint64_t *size)
{
	size_t i;
	uint64_t v = 0, mul = 1;
	int digits = 0;

	while (n > 0 && (t[n - 1] == '\n' || t[n - 1] == '\r'))
		n--;
	if (n < 3 || t[n - 1] != '}')
		return 0;
	i = n - 1;
	if (i > 0 && t[i - 1] == '+')
		i--;
	while (i > 0 && t[i - 1] >= '0' && t[i - 1] <= '9' && digits < 19) {
		v += (uint64_t)(t[i - 1] - '0') * mul;
		mul *= 10;
		digits++;
		i--;
	}
	if (digits == 0 || i == 0 || t[i - 1] != '{')
		return 0;
	*size = v;
	return 1;
}

static void conn_inflate_scan(struct conn *c, const char *p, size_t len);

/* Scan received bytes: count, skip literals, find the end of each response. */
static void
conn_scan(struct conn *c, const char *p, size_t len)
{
	const char *end = p + len;
	struct worker *w = c->w;
	int meas = measuring();
	unsigned gen = c->gen;
	int was_z = c->z_on;

	if (meas)
		w->st.bytes += len;
	while (p < end && c->gen == gen) {
		if (c->lit_rem > 0) {
			size_t n = (size_t)((uint64_t)(end - p) < c->lit_rem ? (uint64_t)(end - p) : c->lit_rem);
			c->lit_rem -= n;
			p += n;
			if (meas)
				w->st.literal_bytes += n;
			continue;
		}
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *seg_end = nl ? nl + 1 : end;
		size_t seg = (size_t)(seg_end - p);

		if (c->first_line && c->head_len < HEAD_MAX) {
			size_t k = HEAD_MAX - c->head_len < seg ? HEAD_MAX - c->head_len : seg;
			memcpy(c->head + c->head_len, p, k);
			c->head_len += k;
		}
		if (seg >= TAIL_MAX) {
			memcpy(c->tail, seg_end - TAIL_MAX, TAIL_MAX);
			c->tail_len = TAIL_MAX;
		} else {
			if (c->tail_len + seg > TAIL_MAX) {
				size_t drop = c->tail_len + seg - TAIL_MAX;
				memmove(c->tail, c->tail + drop, c->tail_len - drop);
				c->tail_len -= drop;
			}
			memcpy(c->tail + c->tail_len, p, seg);
			c->tail_len += seg;
		}
		p = seg_end;
		if (nl == NULL)
			break;
		uint64_t lit;
		if (tail_literal(c->tail, c->tail_len, &lit)) {
			c->first_line = 0;
			c->tail_len = 0;
			c->lit_rem = lit;
			if (lit == 0)
				continue;
			continue;
		}
		on_response(c);
		c->head_len = c->tail_len = 0;
		c->first_line = 1;
		if (!was_z && c->z_on && c->gen == gen) {
			/* that was COMPRESS's OK: the rest of this read is compressed */
			if (meas)
				w->st.bytes -= (uint64_t)(end - p);
			conn_inflate_scan(c, p, (size_t)(end - p));
			return;
		}
	}
}

/* Compressed bytes from the link: inflate them and scan what comes out. */
static void
conn_inflate_scan(struct conn *c, const char *p, size_t len)
{
	struct worker *w = c->w;
	unsigned gen = c->gen;
	z_stream *z = &c->zin;

	z->next_in = (const Bytef *)p;
	z->avail_in = (uInt)len;
	for (;;) {
		size_t n;
		int rc;

		z->next_out = w->zbuf;
		z->avail_out = ZBUF;
		rc = inflate(z, Z_SYNC_FLUSH);
		/* Z_STREAM_END: the server finished the stream (after LOGOUT's BYE) */
		if (rc != Z_OK && rc != Z_BUF_ERROR && rc != Z_STREAM_END) {
			conn_fail(c, "inflate: %s", z->msg != NULL ? z->msg : "error");
			return;
		}
		n = ZBUF - z->avail_out;
		if (n > 0)
			conn_scan(c, (const char *)w->zbuf, n);
		if (c->gen != gen)
			return;	/* closed meanwhile: the stream is gone */
		if (z->avail_out > 0)
			break;	/* all in, all out */
	}
}

/* Read what is there (up to a budget), scanning as we go. */
static void
conn_read(struct conn *c)
{
	struct worker *w = c->w;
	size_t total = 0;
	unsigned gen = c->gen;

	while (c->gen == gen && total < READ_BUDGET) {
		ssize_t r;
		if (c->phase == C_TLS || c->phase == C_STARTTLS_HS)
			break;	/* STARTTLS accepted: the handshake goes on from the event callback */
		if (c->ssl != NULL) {
			int n, e;
			ERR_clear_error();
			n = SSL_read(c->ssl, w->rbuf, READ_BUF);
			if (n <= 0) {
				e = SSL_get_error(c->ssl, n);
				if (e == SSL_ERROR_WANT_READ)
					break;
				if (e == SSL_ERROR_WANT_WRITE) {
					c->ssl_want_write = 1;
					break;
				}
				if (e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL)
					conn_fail(c, "connection closed by the server");
				else
					conn_fail(c, "TLS read failed (%d)", e);
				return;
			}
			r = n;
		} else {
			r = recv(c->fd, w->rbuf, READ_BUF, 0);
			if (r < 0) {
				if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
					break;
				conn_fail(c, "read: %s", strerror(errno));
				return;
			}
			if (r == 0) {
				conn_fail(c, "connection closed by the server");
				return;
			}
		}
		total += (size_t)r;
		if (measuring())
			w->st.wire_bytes += (uint64_t)r;
		if (c->z_on)
			conn_inflate_scan(c, w->rbuf, (size_t)r);
		else
			conn_scan(c, w->rbuf, (size_t)r);
		if (c->gen == gen && c->ssl == NULL && (size_t)r < READ_BUF)
			break;
	}
	/* Decrypted bytes left in OpenSSL: the socket will not say so. */
	if (c->gen == gen && c->ssl != NULL && c->ev_flags && SSL_pending(c->ssl) > 0)
		event_active(c->ev, EV_READ, 1);
}

static void
conn_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;
	unsigned gen = c->gen;

	(void)fd;

	if (c->phase == C_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err != 0) {
			conn_fail(c, "connect: %s", strerror(err));
			return;
		}
		if (opt.tls) {
			c->phase = C_TLS;
			if (conn_tls_begin(c) < 0)
				return;
		} else {
			conn_after_setup(c);
			return;
		}
	}
	if (c->phase == C_TLS || c->phase == C_STARTTLS_HS) {
		int r = conn_tls_step(c);
		if (r <= 0)
			return;
		conn_after_setup(c);
		if (c->gen != gen)
			return;
		/* the greeting may already sit in OpenSSL's buffer */
	}
	if (what & EV_WRITE || c->ssl_want_write) {
		c->ssl_want_write = 0;
		if (conn_flush(c) < 0)
			return;
	}
	conn_read(c);
	if (c->gen != gen)
		return;
	if (c->out_off < c->out_len && conn_flush(c) < 0)
		return;
	conn_update_events(c);
}

/* ------------------------------------------------------------- workers */

static void
worker_tick(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;

	(void)fd;
	(void)what;
	if (atomic_load(&run_stop))
		event_base_loopbreak(w->base);
}

static void *
worker_main(void *arg)
{
	struct worker *w = arg;
	struct timeval tv = { 0, 20000 };

	w->tick = event_new(w->base, -1, EV_PERSIST, worker_tick, w);
	event_add(w->tick, &tv);
	for (int i = 0; i < w->nconns; i++)
		conn_schedule(&w->conns[i]);
	event_base_dispatch(w->base);
	for (int i = 0; i < w->nconns; i++) {
		struct conn *c = &w->conns[i];
		if (c->fd >= 0 && c->ev_flags) {
			event_del(c->ev);
			c->ev_flags = 0;
		}
	}
	return NULL;
}

static int
worker_init(struct worker *w, int id, int n)
{
	w->id = id;
	w->base = event_base_new();
	w->nconns = n;
	w->conns = calloc((size_t)(n ? n : 1), sizeof(*w->conns));
	w->wait_cap = n + 1;
	w->waiting = calloc((size_t)w->wait_cap, sizeof(int));
	w->rbuf = malloc(READ_BUF);
	if (w->base == NULL || w->conns == NULL || w->waiting == NULL || w->rbuf == NULL)
		return -1;
	if (opt.compress && (w->zbuf = malloc(ZBUF)) == NULL)
		return -1;
	for (int i = 0; i < n; i++) {
		struct conn *c = &w->conns[i];
		c->w = w;
		c->idx = i;
		c->fd = -1;
		c->ev = event_new(w->base, -1, 0, conn_event_cb, c);
		if (c->ev == NULL)
			return -1;
	}
	if (opt.wl == WL_RESYNC)
		for (int i = 0; i + 1 < n; i += 2) {
			w->conns[i].peer = &w->conns[i + 1];
			w->conns[i + 1].peer = &w->conns[i];
		}
	return 0;
}

static void
worker_free(struct worker *w)
{
	for (int i = 0; i < w->nconns; i++) {
		struct conn *c = &w->conns[i];
		if (c->ssl)
			SSL_free(c->ssl);
		if (c->fd >= 0)
			close(c->fd);
		if (c->ev)
			event_free(c->ev);
		if (c->z_on) {
			inflateEnd(&c->zin);
			deflateEnd(&c->zout);
		}
		free(c->out);
	}
	if (w->tick)
		event_free(w->tick);
	free(w->conns);
	free(w->waiting);
	free(w->rbuf);
	free(w->zbuf);
	free(w->zplain);
	free(w->message);
	event_base_free(w->base);
}

/* ---------------------------------------------------------------- main */

static void
usage(FILE *f)
{
	fprintf(f,
	    "usage: imapfresh-bench --host H --port P [--tls | --starttls] [--compress]\n"
	    "           --user U --pass P --workload NAME [--concurrency N]\n"
	    "           [--duration S | --count N] [--warmup S] [--mailbox M] [--threads T]\n"
	    "           [--json] [--label TEXT]\n"
	    "\n"
	    "workloads:\n"
	    "  fetch       FETCH 1:* BODY.PEEK[] in a loop on the selected mailbox: MB/s\n"
	    "  noop        NOOP round trips: p50/p99 in microseconds\n"
	    "  sessions    connect, [TLS], LOGIN, SELECT, LOGOUT in a loop: sessions/s\n"
	    "  handshakes  connect, TLS handshake, read the greeting, close: handshakes/s\n"
	    "  idle        open N (--concurrency, or idle:N) sessions, LOGIN, SELECT, IDLE; print\n"
	    "              READY held=N failed=F, hold until SIGTERM/SIGINT (or --duration)\n"
	    "  resync      N pairs: one connection APPENDs to --mailbox, the other (which has it\n"
	    "              selected) then sends GETQUOTAROOT \"INBOX\" + UID FETCH 1:* (FLAGS);\n"
	    "              alternates with rounds without the change: p50 of both\n"
	    "  seed        CREATE --mailbox and APPEND --seed-big messages of --big-size bytes\n"
	    "              and --seed-small of --small-size bytes (one connection)\n"
	    "  command     --command TEXT (default \"UID FETCH 1:* (FLAGS)\") in a loop: ops/s,\n"
	    "              MB/s and latency\n"
	    "\n"
	    "options:\n"
	    "  --host H --port P     target (default 127.0.0.1:143)\n"
	    "  --tls                 implicit TLS; --starttls: STARTTLS after the greeting\n"
	    "  --sni NAME            SNI to send; --ca FILE: verify the server (default: no check)\n"
	    "  --user U --pass P     account (LOGIN)\n"
	    "  --compress            COMPRESS DEFLATE after LOGIN (RFC 4978): commands deflated,\n"
	    "                        responses inflated; MB/s counts inflated bytes, wire_bytes\n"
	    "                        the compressed ones\n"
	    "  --concurrency N       connections (resync: pairs); defaults: fetch 4, noop 1,\n"
	    "                        sessions 8, handshakes 8, idle 100, resync 1, seed 1\n"
	    "  --duration S          measured seconds (default 10); --count N: stop after N ops\n"
	    "  --warmup S            unmeasured seconds first (default 1 with --duration, else 0)\n"
	    "  --threads T           event loops (default 1); connections are split among them\n"
	    "  --connect-burst N     sessions being set up at once per thread (default 64)\n"
	    "  --setup-timeout S     idle: how long to wait for all sessions (default 300)\n"
	    "  --stall-timeout S     idle: stop waiting after S seconds without progress (15)\n"
	    "  --mailbox M           mailbox to SELECT / seed (default INBOX)\n"
	    "  --change-every N      resync: one round in N changes the mailbox first (default 2:\n"
	    "                        alternate; 0: never)\n"
	    "  --command TEXT        the command workload's command (no tag, no CRLF)\n"
	    "  --seed-big N --seed-small N --big-size B --small-size B   seed sizes\n"
	    "                        (default 50 x 1 MiB + 1000 x 2 KiB; sizes take k/m suffixes)\n"
	    "  --seed-content C      mail (default): small messages are English-like text, big\n"
	    "                        ones a short text and a base64 attachment of random bytes;\n"
	    "                        pattern: the letters a-z in turn (deflates ~300x)\n"
	    "  --json                one JSON object on stdout instead of text\n"
	    "  --label TEXT          echoed in the output\n");
}

static long
parse_size(const char *s)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (*end == 'k' || *end == 'K')
		v *= 1024;
	else if (*end == 'm' || *end == 'M')
		v *= 1024 * 1024;
	return v;
}

static int
resolve_target(void)
{
	struct addrinfo hints, *res;
	char port[16];
	int r;

	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	snprintf(port, sizeof(port), "%d", opt.port);
	if ((r = getaddrinfo(opt.host, port, &hints, &res)) != 0) {
		fprintf(stderr, "imapfresh-bench: %s: %s\n", opt.host, gai_strerror(r));
		return -1;
	}
	memcpy(&target_addr, res->ai_addr, res->ai_addrlen);
	target_addrlen = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

static int
setup_tls(void)
{
	ssl_ctx = SSL_CTX_new(TLS_client_method());
	if (ssl_ctx == NULL)
		return -1;
	SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
	SSL_CTX_set_mode(ssl_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	/* every handshake is a full one: no session cache, no tickets kept */
	SSL_CTX_set_session_cache_mode(ssl_ctx, SSL_SESS_CACHE_OFF);
	if (opt.ca != NULL) {
		if (SSL_CTX_load_verify_locations(ssl_ctx, opt.ca, NULL) != 1) {
			fprintf(stderr, "imapfresh-bench: cannot load CA %s\n", opt.ca);
			return -1;
		}
		SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, NULL);
	} else
		SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL);
	return 0;
}

static void
json_str(const char *s)
{
	putchar('"');
	for (; s && *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			printf("\\u%04x", (unsigned char)*s);
		else
			putchar(*s);
	}
	putchar('"');
}

static void
report(struct stats *st, double elapsed, int nconns, int held, int failed)
{
	double ops_s = elapsed > 0 ? (double)st->ops / elapsed : 0;
	double mb_s = elapsed > 0 ? (double)st->bytes / elapsed / 1e6 : 0;
	double wire_mb_s = elapsed > 0 ? (double)st->wire_bytes / elapsed / 1e6 : 0;
	/* received bytes inflated / as received; seed's bytes are the ones it sent */
	double zratio = st->wire_bytes && opt.wl != WL_SEED ?
	    (double)st->bytes / (double)st->wire_bytes : 0;
	const char *err = fatal_error ? fatal_msg : st->last_error;

	if (opt.json) {
		printf("{\"tool\":\"imapfresh-bench\",\"version\":" BENCH_VERSION ",\"label\":");
		json_str(opt.label ? opt.label : "");
		printf(",\"workload\":\"%s\",\"host\":", workload_names[opt.wl]);
		json_str(opt.host);
		printf(",\"port\":%d,\"tls\":%s,\"starttls\":%s,\"concurrency\":%d,\"threads\":%d,"
		    "\"connections\":%d,\"elapsed_s\":%.3f,\"ops\":%" PRIu64 ",\"ops_per_s\":%.2f,"
		    "\"bytes\":%" PRIu64 ",\"literal_bytes\":%" PRIu64 ",\"mb_per_s\":%.2f,"
		    "\"lat_p50_us\":%.1f,\"lat_p90_us\":%.1f,\"lat_p99_us\":%.1f,\"lat_max_us\":%.1f,"
		    "\"lat_mean_us\":%.1f,\"errors\":%" PRIu64 ",\"compress\":%s,"
		    "\"wire_bytes\":%" PRIu64 ",\"wire_mb_per_s\":%.2f,"
		    "\"compression_ratio\":%.3f",
		    opt.port, opt.tls ? "true" : "false", opt.starttls ? "true" : "false",
		    opt.concurrency, opt.threads, nconns, elapsed, st->ops, ops_s, st->bytes,
		    st->literal_bytes, mb_s, hist_pct_us(&st->lat, 50), hist_pct_us(&st->lat, 90),
		    hist_pct_us(&st->lat, 99), (double)st->lat.max / 1000.0,
		    st->lat.count ? (double)st->lat.sum / (double)st->lat.count / 1000.0 : 0,
		    st->errors, opt.compress ? "true" : "false", st->wire_bytes, wire_mb_s, zratio);
		if (opt.wl == WL_IDLE)
			printf(",\"held\":%d,\"failed\":%d", held, failed);
		if (opt.wl == WL_RESYNC)
			printf(",\"changed_n\":%" PRIu64 ",\"unchanged_n\":%" PRIu64
			    ",\"changed_p50_us\":%.1f,\"unchanged_p50_us\":%.1f"
			    ",\"changed_p99_us\":%.1f,\"unchanged_p99_us\":%.1f"
			    ",\"changed_gqr_p50_us\":%.1f,\"unchanged_gqr_p50_us\":%.1f",
			    st->rs_changed.count, st->rs_unchanged.count,
			    hist_pct_us(&st->rs_changed, 50), hist_pct_us(&st->rs_unchanged, 50),
			    hist_pct_us(&st->rs_changed, 99), hist_pct_us(&st->rs_unchanged, 99),
			    hist_pct_us(&st->rs_gqr_changed, 50), hist_pct_us(&st->rs_gqr_unchanged, 50));
		printf(",\"fatal\":%s,\"last_error\":", fatal_error ? "true" : "false");
		json_str(err);
		printf("}\n");
		return;
	}
	printf("%s%s%s %s:%d%s%s, %d connection(s), %d thread(s), %.2f s measured\n",
	    opt.label ? opt.label : "", opt.label ? ": " : "", workload_names[opt.wl], opt.host,
	    opt.port, opt.tls ? " tls" : opt.starttls ? " starttls" : "",
	    opt.compress ? " compress" : "", nconns, opt.threads, elapsed);
	printf("  ops %" PRIu64 " (%.1f/s)  errors %" PRIu64 "\n", st->ops, ops_s, st->errors);
	if (opt.wl == WL_FETCH || opt.wl == WL_SEED || opt.wl == WL_COMMAND)
		printf("  bytes %" PRIu64 " (literal payload %" PRIu64 "): %.1f MB/s\n", st->bytes,
		    st->literal_bytes, mb_s);
	if (opt.compress && opt.wl != WL_SEED)
		printf("  received on the wire (COMPRESS=DEFLATE) %" PRIu64 " bytes: %.1f MB/s, "
		    "%.2fx smaller\n", st->wire_bytes, wire_mb_s, zratio);
	if (st->lat.count)
		printf("  latency us: p50 %.1f  p90 %.1f  p99 %.1f  max %.1f\n",
		    hist_pct_us(&st->lat, 50), hist_pct_us(&st->lat, 90), hist_pct_us(&st->lat, 99),
		    (double)st->lat.max / 1000.0);
	if (opt.wl == WL_IDLE)
		printf("  idle sessions held %d, failed %d\n", held, failed);
	if (opt.wl == WL_RESYNC)
		printf("  GETQUOTAROOT + UID FETCH p50 us: after a change %.1f (n=%" PRIu64
		    "), without %.1f (n=%" PRIu64 "); GETQUOTAROOT alone %.1f vs %.1f\n",
		    hist_pct_us(&st->rs_changed, 50), st->rs_changed.count,
		    hist_pct_us(&st->rs_unchanged, 50), st->rs_unchanged.count,
		    hist_pct_us(&st->rs_gqr_changed, 50), hist_pct_us(&st->rs_gqr_unchanged, 50));
	if (err[0])
		printf("  %s: %s\n", fatal_error ? "FATAL" : "last error", err);
}

/* Wait up to secs for a stop signal (or run_stop); returns 1 if a signal came. */
static int
wait_signal(const sigset_t *set, double secs)
{
	uint64_t end = now_ns() + (uint64_t)(secs * 1e9);

	for (;;) {
		uint64_t now = now_ns();
		struct timespec ts;
		if (atomic_load(&run_stop))
			return 0;
		if (now >= end)
			return 0;
		uint64_t left = end - now;
		if (left > 20000000)
			left = 20000000;
		ts.tv_sec = (time_t)(left / 1000000000u);
		ts.tv_nsec = (long)(left % 1000000000u);
		if (sigtimedwait(set, NULL, &ts) > 0)
			return 1;
	}
}

int
main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "host", required_argument, NULL, 'H' },
		{ "port", required_argument, NULL, 'p' },
		{ "tls", no_argument, NULL, 'T' },
		{ "starttls", no_argument, NULL, 'S' },
		{ "user", required_argument, NULL, 'u' },
		{ "pass", required_argument, NULL, 'P' },
		{ "workload", required_argument, NULL, 'w' },
		{ "concurrency", required_argument, NULL, 'c' },
		{ "duration", required_argument, NULL, 'd' },
		{ "count", required_argument, NULL, 'n' },
		{ "warmup", required_argument, NULL, 'W' },
		{ "mailbox", required_argument, NULL, 'm' },
		{ "threads", required_argument, NULL, 't' },
		{ "json", no_argument, NULL, 'j' },
		{ "connect-burst", required_argument, NULL, 'b' },
		{ "setup-timeout", required_argument, NULL, 'o' },
		{ "stall-timeout", required_argument, NULL, 6 },
		{ "sni", required_argument, NULL, 'I' },
		{ "ca", required_argument, NULL, 'C' },
		{ "label", required_argument, NULL, 'l' },
		{ "seed-big", required_argument, NULL, 1 },
		{ "seed-small", required_argument, NULL, 2 },
		{ "big-size", required_argument, NULL, 3 },
		{ "small-size", required_argument, NULL, 4 },
		{ "command", required_argument, NULL, 5 },
		{ "compress", no_argument, NULL, 7 },
		{ "seed-content", required_argument, NULL, 8 },
		{ "change-every", required_argument, NULL, 9 },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int ch, duration_set = 0, nconns, nthreads;
	struct worker *workers;
	sigset_t sigs;
	struct stats total;
	uint64_t t0, t1;
	double elapsed;
	const char *wl = "noop";

	while ((ch = getopt_long(argc, argv, "H:p:TSu:P:w:c:d:n:W:m:t:jb:o:I:C:l:h", longopts,
	    NULL)) != -1) {
		switch (ch) {
		case 'H': opt.host = optarg; break;
		case 'p': opt.port = atoi(optarg); break;
		case 'T': opt.tls = 1; break;
		case 'S': opt.starttls = 1; break;
		case 'u': opt.user = optarg; break;
		case 'P': opt.pass = optarg; break;
		case 'w': wl = optarg; break;
		case 'c': opt.concurrency = atoi(optarg); break;
		case 'd': opt.duration = atof(optarg); duration_set = 1; break;
		case 'n': opt.count = atoll(optarg); break;
		case 'W': opt.warmup = atof(optarg); break;
		case 'm': opt.mailbox = optarg; break;
		case 't': opt.threads = atoi(optarg); break;
		case 'j': opt.json = 1; break;
		case 'b': opt.connect_burst = atoi(optarg); break;
		case 'o': opt.setup_timeout = atof(optarg); break;
		case 'I': opt.sni = optarg; break;
		case 'C': opt.ca = optarg; break;
		case 'l': opt.label = optarg; break;
		case 1: opt.seed_big = atoi(optarg); break;
		case 2: opt.seed_small = atoi(optarg); break;
		case 3: opt.big_size = parse_size(optarg); break;
		case 4: opt.small_size = parse_size(optarg); break;
		case 5: opt.command = optarg; break;
		case 6: opt.stall_timeout = atof(optarg); break;
		case 7: opt.compress = 1; break;
		case 9: opt.change_every = atoi(optarg); break;
		case 8:
			if (strcmp(optarg, "mail") == 0)
				opt.seed_pattern = 0;
			else if (strcmp(optarg, "pattern") == 0)
				opt.seed_pattern = 1;
			else {
				fprintf(stderr, "imapfresh-bench: --seed-content is mail or pattern\n");
				return 2;
			}
			break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc && strcmp(wl, "idle") == 0)
		opt.concurrency = atoi(argv[optind++]);	/* "--workload idle N" */
	if (optind < argc) {
		fprintf(stderr, "imapfresh-bench: unexpected argument %s\n", argv[optind]);
		return 2;
	}
	{
		char name[32];
		const char *colon = strpbrk(wl, ":= ");
		size_t n = colon ? (size_t)(colon - wl) : strlen(wl);
		int found = 0;
		snprintf(name, sizeof(name), "%.*s", (int)n, wl);
		for (size_t i = 0; i < sizeof(workload_names) / sizeof(workload_names[0]); i++)
			if (strcasecmp(name, workload_names[i]) == 0) {
				opt.wl = (enum workload)i;
				found = 1;
			}
		if (!found) {
			fprintf(stderr, "imapfresh-bench: unknown workload %s\n", wl);
			return 2;
		}
		if (colon && opt.wl == WL_IDLE)
			opt.concurrency = atoi(colon + 1);
	}
	if (opt.wl != WL_HANDSHAKES && (opt.user == NULL || opt.pass == NULL)) {
		fprintf(stderr, "imapfresh-bench: --user and --pass are needed\n");
		return 2;
	}
	if (opt.wl == WL_HANDSHAKES && !opt.tls && !opt.starttls) {
		fprintf(stderr, "imapfresh-bench: handshakes needs --tls or --starttls\n");
		return 2;
	}
	if (opt.wl == WL_HANDSHAKES && opt.compress) {
		fprintf(stderr, "imapfresh-bench: handshakes does not log in: no --compress\n");
		return 2;
	}
	if (opt.tls && opt.starttls) {
		fprintf(stderr, "imapfresh-bench: --tls and --starttls exclude each other\n");
		return 2;
	}
	if (opt.concurrency <= 0) {
		static const int defaults[] = {
			[WL_FETCH] = 4, [WL_NOOP] = 1, [WL_SESSIONS] = 8, [WL_IDLE] = 100,
			[WL_HANDSHAKES] = 8, [WL_RESYNC] = 1, [WL_SEED] = 1, [WL_COMMAND] = 1,
		};
		opt.concurrency = defaults[opt.wl];
	}
	if (opt.wl == WL_SEED) {
		opt.concurrency = 1;
		opt.threads = 1;
		opt.count = 0;
	}
	if (opt.threads < 1)
		opt.threads = 1;
	if (opt.warmup < 0)
		opt.warmup = (opt.count > 0 || opt.wl == WL_IDLE || opt.wl == WL_SEED) ? 0 : 1;
	if (opt.connect_burst < 1)
		opt.connect_burst = 1;
	nconns = opt.wl == WL_RESYNC ? 2 * opt.concurrency : opt.concurrency;
	nthreads = opt.threads;
	if (opt.wl == WL_RESYNC && nthreads > opt.concurrency)
		nthreads = opt.concurrency;
	if (nthreads > nconns)
		nthreads = nconns;
	opt.threads = nthreads;
	if (opt.sni == NULL && opt.host[0] && inet_addr(opt.host) == INADDR_NONE &&
	    strchr(opt.host, ':') == NULL)
		opt.sni = opt.host;

	if (resolve_target() < 0 || ((opt.tls || opt.starttls) && setup_tls() < 0))
		return 1;

	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	workers = calloc((size_t)nthreads, sizeof(*workers));
	if (workers == NULL)
		return 1;
	for (int t = 0; t < nthreads; t++) {
		int n;
		if (opt.wl == WL_RESYNC) {
			int pairs = opt.concurrency / nthreads + (t < opt.concurrency % nthreads);
			n = 2 * pairs;
		} else
			n = nconns / nthreads + (t < nconns % nthreads);
		if (worker_init(&workers[t], t, n) < 0) {
			fprintf(stderr, "imapfresh-bench: out of memory\n");
			return 1;
		}
	}
	atomic_store(&run_phase, opt.warmup > 0 ? PHASE_WARMUP : PHASE_MEASURE);
	t0 = now_ns();
	for (int t = 0; t < nthreads; t++)
		pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]);

	if (opt.wl == WL_IDLE) {
		uint64_t deadline = now_ns() + (uint64_t)(opt.setup_timeout * 1e9);
		uint64_t last_change = now_ns();
		int got_signal = 0, last = -1;
		while (!atomic_load(&run_stop) && atomic_load(&idle_held) + atomic_load(&idle_failed) <
		    nconns && now_ns() < deadline) {
			int done = atomic_load(&idle_held) + atomic_load(&idle_failed);
			if (done != last) {
				last = done;
				last_change = now_ns();
			} else if (now_ns() - last_change > (uint64_t)(opt.stall_timeout * 1e9))
				break;	/* the rest are stuck (e.g. a full accept queue) */
			if (wait_signal(&sigs, 0.02)) {
				got_signal = 1;
				break;
			}
		}
		t1 = now_ns();
		if (!opt.json || !got_signal) {
			fprintf(opt.json ? stderr : stdout,
			    "READY held=%d failed=%d pending=%d setup_s=%.2f\n", atomic_load(&idle_held),
			    atomic_load(&idle_failed), nconns - atomic_load(&idle_held) -
			    atomic_load(&idle_failed), (double)(t1 - t0) / 1e9);
			fflush(opt.json ? stderr : stdout);
		}
		if (!got_signal && !atomic_load(&run_stop)) {
			if (duration_set)
				wait_signal(&sigs, opt.duration);
			else
				while (!atomic_load(&run_stop) && !wait_signal(&sigs, 3600))
					;
		}
		elapsed = (double)(t1 - t0) / 1e9;
	} else if (opt.count > 0 || opt.wl == WL_SEED) {
		if (opt.warmup > 0 && !wait_signal(&sigs, opt.warmup))
			atomic_store(&run_phase, PHASE_MEASURE);
		t0 = now_ns();
		while (!atomic_load(&run_stop))
			if (wait_signal(&sigs, 3600))
				break;
		t1 = now_ns();
		elapsed = (double)(t1 - t0) / 1e9;
	} else {
		int sig = 0;
		if (opt.warmup > 0)
			sig = wait_signal(&sigs, opt.warmup);
		atomic_store(&run_phase, PHASE_MEASURE);
		t0 = now_ns();
		if (!sig)
			wait_signal(&sigs, opt.duration);
		atomic_store(&run_phase, PHASE_DONE);
		t1 = now_ns();
		elapsed = (double)(t1 - t0) / 1e9;
	}
	atomic_store(&run_phase, PHASE_DONE);
	atomic_store(&run_stop, 1);
	for (int t = 0; t < nthreads; t++)
		pthread_join(workers[t].thread, NULL);

	memset(&total, 0, sizeof(total));
	for (int t = 0; t < nthreads; t++) {
		struct stats *s = &workers[t].st;
		hist_merge(&total.lat, &s->lat);
		hist_merge(&total.rs_changed, &s->rs_changed);
		hist_merge(&total.rs_unchanged, &s->rs_unchanged);
		hist_merge(&total.rs_gqr_changed, &s->rs_gqr_changed);
		hist_merge(&total.rs_gqr_unchanged, &s->rs_gqr_unchanged);
		total.ops += s->ops;
		total.bytes += s->bytes;
		total.literal_bytes += s->literal_bytes;
		total.wire_bytes += s->wire_bytes;
		total.errors += s->errors;
		if (s->last_error[0])
			memcpy(total.last_error, s->last_error, sizeof(total.last_error));
	}
	report(&total, elapsed, nconns, atomic_load(&idle_held), atomic_load(&idle_failed));
	for (int t = 0; t < nthreads; t++)
		worker_free(&workers[t]);
	free(workers);
	if (ssl_ctx)
		SSL_CTX_free(ssl_ctx);
	if (atomic_load(&fatal_error)) {
		fprintf(stderr, "imapfresh-bench: %s\n", fatal_msg);
		return 1;
	}
	return 0;
}
