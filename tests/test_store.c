/* test_store: checks mailbox generations, notification and the Redis store against a real redis-server. */
#include "config.h"
#include "log.h"
#include "store.h"
#include "tap.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>

#define WAIT_STEP_MS 20

/* Run the loop until cond holds, at most secs seconds: never a timing assertion. */
#define WAIT(cond, secs) do { \
	int wait_i_; \
	for (wait_i_ = 0; wait_i_ < (secs) * (1000 / WAIT_STEP_MS) && !(cond); wait_i_++) \
		spin(WAIT_STEP_MS); \
} while (0)

static struct event_base *base;
static pid_t redis_pid;
static int redis_port;
static char redis_sock[108];	/* the server's unix socket too */
static const int redis_db = 2;	/* not 0, so that SELECT is exercised */

/* Members are addresses; what notify() saw is recorded in order. */
static int ma1, ma2, ma3, mb1, mb2;
static struct {
	void *member;
	char mailbox[64];
} notes[64];
static int n_notes;

/* When leave_on is notified, it makes leave_who[] leave leave_user. */
static struct store *leave_store;
static struct store_user *leave_user;
static void *leave_on, *leave_who[4];

static void
notify(void *member, const char *mailbox)
{
	int i;

	if (n_notes < (int)(sizeof notes / sizeof *notes)) {
		notes[n_notes].member = member;
		snprintf(notes[n_notes].mailbox, sizeof notes[n_notes].mailbox, "%s", mailbox);
		n_notes++;
	}
	if (leave_on && (member == leave_on || leave_on == (void *)&leave_on)) {
		leave_on = NULL;	/* once */
		for (i = 0; i < 4; i++)
			if (leave_who[i])
				store_user_leave(leave_store, leave_user, leave_who[i]);
	}
}

/* How often member was notified of mailbox since the notes were reset. */
static int
notified(const void *member, const char *mailbox)
{
	int i, n = 0;

	for (i = 0; i < n_notes; i++)
		n += notes[i].member == member && strcmp(notes[i].mailbox, mailbox) == 0;
	return n;
}

static void
spin(int ms)
{
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

	event_base_loopexit(base, &tv);
	event_base_dispatch(base);
}

static struct store_stats
stats(const struct store *st)
{
	struct store_stats s;

	store_get_stats(st, &s);
	return s;
}

/* --- the redis-server under test --- */

static int
on_path(const char *prog)
{
	const char *path = getenv("PATH");
	char buf[1024];
	const char *p, *end;

	for (p = path ? path : "/usr/bin:/bin"; *p; p = *end ? end + 1 : end) {
		end = strchr(p, ':');
		if (!end)
			end = p + strlen(p);
		snprintf(buf, sizeof buf, "%.*s/%s", (int)(end - p), p, prog);
		if (access(buf, X_OK) == 0)
			return 1;
	}
	return 0;
}

/* A port nobody listens on right now. */
static int
free_port(void)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof sin;
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd >= 0 && bind(fd, (struct sockaddr *)&sin, sizeof sin) == 0
	    && getsockname(fd, (struct sockaddr *)&sin, &len) == 0)
		port = ntohs(sin.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

/* A synchronous query on redis_db (tests only); NULL when unreachable. */
static redisReply *
vquery(const char *fmt, va_list ap)
{
	struct timeval tv = { 2, 0 };
	redisContext *c = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
	redisReply *r = NULL, *sel;

	if (c && !c->err && (sel = redisCommand(c, "SELECT %d", redis_db))) {
		freeReplyObject(sel);
		r = redisvCommand(c, fmt, ap);
	}
	if (c)
		redisFree(c);
	return r;
}

static redisReply *
query(const char *fmt, ...)
{
	redisReply *r;
	va_list ap;

	va_start(ap, fmt);
	r = vquery(fmt, ap);
	va_end(ap);
	return r;
}

/* An integer reply (EXISTS, TTL, HGET of a number...), or -1000. */
static long long
query_int(const char *fmt, ...)
{
	redisReply *r;
	long long v = -1000;
	va_list ap;

	va_start(ap, fmt);
	r = vquery(fmt, ap);
	va_end(ap);
	if (r && r->type == REDIS_REPLY_INTEGER)
		v = r->integer;
	else if (r && r->type == REDIS_REPLY_STRING)
		v = atoll(r->str);
	if (r)
		freeReplyObject(r);
	return v;
}

static void
redis_stop(void)
{
	if (redis_pid > 0) {
		kill(redis_pid, SIGKILL);
		waitpid(redis_pid, NULL, 0);
		redis_pid = 0;
		unlink(redis_sock);
	}
}

static int
redis_start(void)
{
	char port[16];
	pid_t parent = getpid();
	int i, status;
	redisReply *r;

	snprintf(port, sizeof port, "%d", redis_port);
	redis_pid = fork();
	if (redis_pid < 0)
		return -1;
	if (redis_pid == 0) {
		/* Dies with the test, whatever kills it. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(1);
		if (!freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr))
			_exit(1);
		execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1",
		    "--unixsocket", redis_sock, "--unixsocketperm", "700",
		    "--save", "", "--appendonly", "no", (char *)NULL);
		_exit(127);
	}
	for (i = 0; i < 250; i++) {
		if (waitpid(redis_pid, &status, WNOHANG) == redis_pid) {
			redis_pid = 0;
			return -1;
		}
		if ((r = query("PING"))) {
			freeReplyObject(r);
			return 0;
		}
		usleep(20000);
	}
	return -1;
}

/* --- memory mode --- */

static void
test_memory(void)
{
	struct config cfg;
	struct store *st;
	struct store_user *u, *u2, *u3, *bob;
	struct store_stats s;
	char err[256] = "";

	config_defaults(&cfg);
	st = store_new(base, &cfg, notify, err, sizeof err);
	if (!ok(st != NULL, "memory store created"))
		diag("err = %s", err);
	if (!st)
		return;
	s = stats(st);
	ok(s.redis == 0 && s.connected == 0 && s.errors == 0, "memory: no Redis in the stats");
	ok(store_epoch(st) == 0, "memory: epoch starts at 0");

	u = store_user_join(st, "alice", &ma1);
	u2 = store_user_join(st, "alice", &ma2);
	u3 = store_user_join(st, "alice", &ma3);
	bob = store_user_join(st, "bob", &mb1);
	ok(u && u == u2 && u == u3 && bob && bob != u, "one record per user, shared by its members");
	ok(u && strcmp(store_user_name(u), "alice") == 0, "store_user_name");
	ok(store_gen(u, "INBOX") == 0, "a mailbox's generation starts at 0");

	n_notes = 0;
	ok(store_bump(st, u, "INBOX", &ma1, "APPEND") == 1 && store_gen(u, "INBOX") == 1,
	    "bump returns and stores generation 1");
	ok(n_notes == 2 && notified(&ma2, "INBOX") == 1 && notified(&ma3, "INBOX") == 1,
	    "the user's other members notified once each (%d notes)", n_notes);
	ok(notified(&ma1, "INBOX") == 0, "the member that made the change is not notified");
	ok(notified(&mb1, "INBOX") == 0 && store_gen(bob, "INBOX") == 0,
	    "another user's members and generations untouched");
	ok(store_gen(u, "inbox") == 0 && store_gen(u, "Sent") == 0,
	    "other mailboxes (names compared exactly) stay at 0");

	n_notes = 0;
	ok(store_bump(st, u, "Sent", NULL, NULL) == 1 && n_notes == 3,
	    "bump without except notifies every member");
	ok(store_bump(st, u, "INBOX", NULL, NULL) == 2 && store_gen(u, "INBOX") == 2,
	    "generations only grow");

	/* The first member notified closes the other two: they are not notified. */
	n_notes = 0;
	leave_store = st;
	leave_user = u;
	leave_on = (void *)&leave_on;	/* whoever comes first */
	leave_who[0] = &ma2;
	leave_who[1] = &ma3;
	leave_who[2] = NULL;
	/* The notified member leaves itself too: it is first, so it is ma2 or ma3. */
	store_bump(st, u, "INBOX", &ma1, NULL);
	ok(n_notes == 1 && (notes[0].member == &ma2 || notes[0].member == &ma3),
	    "members that left during notify are skipped (%d notes)", n_notes);
	ok(store_gen(u, "INBOX") == 3, "the user record survives with ma1 left");
	n_notes = 0;
	store_bump(st, u, "Drafts", NULL, NULL);
	ok(n_notes == 1 && notes[0].member == &ma1, "only ma1 remains a member");

	/* The last members leave inside notify: the record is freed after the loop. */
	u2 = store_user_join(st, "alice", &ma2);
	n_notes = 0;
	leave_on = &ma2;
	leave_who[0] = &ma1;
	leave_who[1] = &ma2;
	store_bump(st, u, "INBOX", NULL, NULL);
	ok(n_notes >= 1 && n_notes <= 2 && notified(&ma2, "INBOX") == 1,
	    "every member may leave during notify (%d notes)", n_notes);
	u = store_user_join(st, "alice", &ma1);
	ok(u && store_gen(u, "INBOX") == 0 && store_gen(u, "Sent") == 0,
	    "record freed after the last leave: a new one starts at 0");

	/* Plain leave of the last member, then a new join. */
	store_bump(st, bob, "INBOX", NULL, NULL);
	store_user_leave(st, bob, &mb1);
	bob = store_user_join(st, "bob", &mb1);
	ok(bob && store_gen(bob, "INBOX") == 0, "last leave frees the record");
	store_user_leave(st, bob, &mb2);	/* not a member: ignored */
	ok(store_gen(bob, "INBOX") == 0 && strcmp(store_user_name(bob), "bob") == 0,
	    "leave of a non-member is ignored");

	{
		struct store_session_record rec = { .sid = "x:1", .user = "alice", .client = "::1",
			.mailbox = "", .view = "" };

		store_session_save(st, &rec);
		store_session_forget(st, "alice", "x:1");
		ok(stats(st).errors == 0 && store_epoch(st) == 0, "memory: save and forget are no-ops");
	}
	store_user_leave(st, u, &ma1);
	store_user_leave(st, bob, &mb1);
	store_free(st);

	snprintf(cfg.state, sizeof cfg.state, "redis:/nowhere");
	err[0] = '\0';
	ok(store_new(base, &cfg, notify, err, sizeof err) == NULL && err[0],
	    "bad state refused: %s", err);
}

/* --- Redis mode --- */

static void
redis_config(struct config *cfg, const char *instance, int ttl)
{
	config_defaults(cfg);
	snprintf(cfg->state, sizeof cfg->state, "redis://127.0.0.1:%d/%d", redis_port, redis_db);
	snprintf(cfg->redis_prefix, sizeof cfg->redis_prefix, "t:");
	snprintf(cfg->instance_id, sizeof cfg->instance_id, "%s", instance);
	cfg->state_ttl = ttl;	/* below the config minimum, to see the refresh quickly */
}

static int
hash_has(const redisReply *r, const char *field, const char *value)
{
	size_t i;

	for (i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2)
		if (strcmp(r->element[i]->str, field) == 0)
			return strcmp(r->element[i + 1]->str, value) == 0;
	return 0;
}

static void
test_save(struct store *a)
{
	struct store_session_record rec = {
		.sid = "a:17", .user = "alice", .client = "127.0.0.1:5555", .mailbox = "INBOX",
		.uidvalidity = 4000000000u, .uidnext = 42, .count = 7, .highestmodseq = 1ULL << 40,
		.synced_gen = 3, .started = 1700000000, .last_resync = 0, .resyncs = 5,
		.escalations = 1, .stale_detected = 2, .view = "1:5,9",
	};
	redisReply *r;
	long long ttl;
	int fields;

	store_session_save(a, &rec);
	WAIT(query_int("EXISTS t:{alice}:session:a:17") == 1, 5);
	r = query("HGETALL t:{alice}:session:a:17");
	fields = r && r->type == REDIS_REPLY_ARRAY ? (int)r->elements / 2 : -1;
	ok(fields == 16, "save: the session hash has 16 fields (%d)", fields);
	ok(hash_has(r, "user", "alice") && hash_has(r, "instance", "A")
	    && hash_has(r, "client", "127.0.0.1:5555") && hash_has(r, "mailbox", "INBOX"),
	    "save: user, instance, client, mailbox");
	ok(hash_has(r, "uidvalidity", "4000000000") && hash_has(r, "uidnext", "42")
	    && hash_has(r, "count", "7") && hash_has(r, "highestmodseq", "1099511627776")
	    && hash_has(r, "synced_gen", "3"), "save: uidvalidity, uidnext, count, highestmodseq, synced_gen");
	ok(hash_has(r, "started", "1700000000") && hash_has(r, "last_resync", "0")
	    && hash_has(r, "resyncs", "5") && hash_has(r, "escalations", "1")
	    && hash_has(r, "stale_detected", "2") && hash_has(r, "view", "1:5,9"),
	    "save: started, last_resync, counters, view");
	if (r)
		freeReplyObject(r);
	ttl = query_int("TTL t:{alice}:session:a:17");
	ok(ttl > 0 && ttl <= 3, "save: session key expires within state_ttl (TTL %lld)", ttl);
	ok(query_int("SISMEMBER t:{alice}:sessions a:17") == 1, "save: sid in the user's sessions set");
	ttl = query_int("TTL t:{alice}:sessions");
	ok(ttl > 0 && ttl <= 3, "save: the sessions set expires too (TTL %lld)", ttl);

	/* An idle session: the tick (every state_ttl/3) puts the TTL back. */
	query_int("EXPIRE t:{alice}:session:a:17 1000");
	WAIT(query_int("TTL t:{alice}:session:a:17") <= 3, 6);
	ttl = query_int("TTL t:{alice}:session:a:17");
	ok(ttl > 0 && ttl <= 3, "refresh tick re-EXPIREs an idle session's key (TTL %lld)", ttl);
	spin(4500);		/* longer than state_ttl, without any save */
	ok(query_int("EXISTS t:{alice}:session:a:17") == 1
	    && query_int("SISMEMBER t:{alice}:sessions a:17") == 1,
	    "an idle session's keys outlive state_ttl");

	store_session_forget(a, "alice", "a:17");
	WAIT(query_int("EXISTS t:{alice}:session:a:17") == 0, 5);
	ok(query_int("EXISTS t:{alice}:session:a:17") == 0, "forget: session key deleted");
	ok(query_int("SISMEMBER t:{alice}:sessions a:17") == 0, "forget: sid removed from the set");
	ok(stats(a).errors == 0, "no errors so far (%llu)", (unsigned long long)stats(a).errors);
}

/* The up callback: what a server does there, save its live sessions. */
static int up_calls;
static struct store_session_record up_rec = { .sid = "a:55", .user = "alice", .client = "y",
	.mailbox = "INBOX", .count = 3, .view = "1:3" };

static void
on_up(void *arg)
{
	up_calls++;
	store_session_save(arg, &up_rec);
}

static void
test_redis(void)
{
	struct config ca, cb;
	struct store *a, *b, *c;
	struct store_user *ua, *ub, *ubob, *ucarol;
	struct store_stats sa, sb;
	char err[256] = "";
	uint64_t ea, eb, errs;
	struct store_session_record rec = { .sid = "a:99", .user = "alice", .client = "x",
		.mailbox = "", .view = "" };

	redis_config(&ca, "A", 3);
	redis_config(&cb, "B", 60);
	a = store_new(base, &ca, notify, err, sizeof err);
	b = store_new(base, &cb, notify, err, sizeof err);
	if (!ok(a && b, "two Redis stores created (A and B)")) {
		diag("err = %s", err);
		store_free(a);
		store_free(b);
		return;
	}
	store_set_up_callback(a, on_up, a);
	WAIT(store_epoch(a) == 1 && store_epoch(b) == 1, 10);
	sa = stats(a);
	sb = stats(b);
	ok(sa.redis && sa.connected && sb.redis && sb.connected, "both connected");
	ok(up_calls == 1, "up callback called once on the first connection (%d)", up_calls);
	ok(store_epoch(a) == 1 && store_epoch(b) == 1,
	    "epoch 1 once connected and subscribed (A %llu, B %llu)",
	    (unsigned long long)store_epoch(a), (unsigned long long)store_epoch(b));
	ok(sa.errors == 0 && sb.errors == 0 && sa.reconnects == 0, "no errors, no reconnects");

	ua = store_user_join(a, "alice", &ma1);
	store_user_join(a, "alice", &ma2);
	ub = store_user_join(b, "alice", &mb1);
	ubob = store_user_join(a, "bob", &ma3);

	/* A's change: B hears it, A ignores its own message. */
	n_notes = 0;
	ok(store_bump(a, ua, "INBOX", &ma1, "APPEND") == 1, "A: bump to 1");
	ok(notified(&ma2, "INBOX") == 1 && notified(&ma1, "INBOX") == 0,
	    "A's other member notified at once, not the changer");
	WAIT(query_int("HGET t:{alice}:gen INBOX") == 1, 5);
	ok(query_int("HGET t:{alice}:gen INBOX") == 1, "HINCRBY: t:{alice}:gen INBOX = 1 in Redis");
	WAIT(store_gen(ub, "INBOX") == 1, 5);
	ok(store_gen(ub, "INBOX") == 1, "B's local generation raised by A's change");
	ok(notified(&mb1, "INBOX") == 1, "B's member notified of A's change");
	WAIT(stats(a).published == 1, 5);
	ok(stats(a).published == 1 && stats(b).received == 1, "A published 1, B received 1");

	/* B's change reaches A after A's own message, on the same link: once A
	 * has B's (another mailbox, so it can't be mistaken), A is done with its own. */
	ok(store_bump(b, ub, "Archive", &mb1, NULL) == 1, "B: bump Archive to 1");
	WAIT(store_gen(ua, "Archive") == 1, 5);
	ok(store_gen(ua, "Archive") == 1 && notified(&ma1, "Archive") == 1,
	    "A heard B's change and notified its members");
	ok(store_gen(ua, "INBOX") == 1 && stats(a).received == 1,
	    "A ignored its own message: INBOX still 1 (%llu), received %llu",
	    (unsigned long long)store_gen(ua, "INBOX"), (unsigned long long)stats(a).received);
	ok(query_int("HGET t:{alice}:gen Archive") == 1, "Redis: Archive 1 too");

	/* A change of a user with no members on B does not reach B: A's next
	 * change of alice, published after it, does. */
	sb = stats(b);
	store_bump(a, ubob, "Sent", NULL, NULL);
	store_bump(a, ua, "Drafts", NULL, NULL);
	WAIT(store_gen(ub, "Drafts") == 1, 5);
	ok(store_gen(ub, "Drafts") == 1 && stats(b).received == sb.received + 1
	    && stats(b).messages == sb.messages + 1,
	    "B hears nothing of users without members there (messages %llu -> %llu)",
	    (unsigned long long)sb.messages, (unsigned long long)stats(b).messages);
	ucarol = store_user_join(b, "bob", &mb2);
	ok(ucarol && store_gen(ucarol, "Sent") == 0, "B's new member of bob starts at 0");
	store_user_leave(b, ucarol, &mb2);
	ok(stats(a).channels == 2 && stats(b).channels == 1,
	    "one channel per user with members (A %llu, B %llu)",
	    (unsigned long long)stats(a).channels, (unsigned long long)stats(b).channels);

	test_save(a);

	store_register_instance(a, "127.0.0.1:8143", 1700000000, 1);
	WAIT(query_int("HEXISTS t:instances A") == 1, 5);
	ok(query_int("HEXISTS t:instances A") == 1, "registry: A's entry written");
	WAIT(query_int("EXISTS t:{alice}:session:a:55") == 1, 5);
	ok(query_int("EXISTS t:{alice}:session:a:55") == 1, "a save from the up callback is written");

	/* Redis dies: an outage, bumps still work locally, saves dropped. */
	ea = store_epoch(a);
	eb = store_epoch(b);
	redis_stop();
	WAIT(store_epoch(a) == ea + 1 && store_epoch(b) == eb + 1, 10);
	sa = stats(a);
	ok(store_epoch(a) == ea + 1 && store_epoch(b) == eb + 1,
	    "Redis lost: epoch grows once (A %llu, B %llu)",
	    (unsigned long long)store_epoch(a), (unsigned long long)store_epoch(b));
	ok(sa.errors >= 1 && stats(b).errors >= 1 && !sa.connected, "errors counted, not connected");
	n_notes = 0;
	ok(store_bump(a, ua, "INBOX", &ma1, NULL) == 2 && notified(&ma2, "INBOX") == 1,
	    "while down, bump works locally and notifies");
	errs = stats(a).errors;
	store_session_save(a, &rec);
	ok(stats(a).errors == errs + 1, "while down, a save is dropped and counted");
	spin(1500);		/* a failed reconnection attempt */
	ok(store_epoch(a) == ea + 1, "failed reconnections do not grow the epoch");

	/* Redis is back on the same port. */
	if (!ok(redis_start() == 0, "redis-server restarted"))
		goto out;
	WAIT(stats(a).reconnects == 1 && stats(b).reconnects == 1
	    && store_epoch(a) == ea + 2 && store_epoch(b) == eb + 2, 40);
	ok(stats(a).reconnects == 1 && stats(b).reconnects == 1 && stats(a).connected,
	    "both reconnected");
	ok(store_epoch(a) == ea + 2 && store_epoch(b) == eb + 2, "epoch grows again on reconnect");
	ok(up_calls == 2, "up callback called again on reconnect (%d calls)", up_calls);
	/* The fresh Redis is empty: what the up callback saves, and the
	 * registry entry, are back without any other save or refresh. */
	WAIT(query_int("EXISTS t:{alice}:session:a:55") == 1
	    && query_int("HEXISTS t:instances A") == 1, 5);
	ok(query_int("EXISTS t:{alice}:session:a:55") == 1
	    && query_int("SISMEMBER t:{alice}:sessions a:55") == 1
	    && query_int("HGET t:{alice}:session:a:55 count") == 3,
	    "reconnect: the up callback's save is in the restarted Redis");
	ok(query_int("HEXISTS t:instances A") == 1,
	    "reconnect: the registry entry is written again by the store");
	store_session_forget(a, "alice", "a:55");
	store_register_instance(a, "127.0.0.1:8143", 1700000000, 0);
	WAIT(query_int("HEXISTS t:instances A") == 0, 5);
	ok(query_int("HEXISTS t:instances A") == 0, "registry: A's entry deleted");
	n_notes = 0;
	store_bump(a, ua, "INBOX", &ma1, NULL);
	WAIT(store_gen(ub, "INBOX") == 2, 5);
	ok(store_gen(ub, "INBOX") == 2 && notified(&mb1, "INBOX") == 1,
	    "pub/sub between A and B works again (B gen %llu)",
	    (unsigned long long)store_gen(ub, "INBOX"));
	ok(query_int("HGET t:{alice}:gen INBOX") == 1, "a fresh Redis counts from 1");

	/* Freeing with commands in flight: what is queued still reaches Redis. */
	rec.sid = "a:100";
	store_session_save(a, &rec);
	WAIT(query_int("EXISTS t:{alice}:session:a:100") == 1, 5);
	query_int("EXPIRE t:{alice}:session:a:100 1000");	/* only the DEL removes it now */
	store_bump(a, ua, "Trash", NULL, NULL);
	store_session_forget(a, "alice", "a:100");
	store_user_leave(a, ua, &ma1);
	store_user_leave(a, ua, &ma2);
	store_user_leave(a, ubob, &ma3);
	store_free(a);
	a = NULL;
	WAIT(query_int("EXISTS t:{alice}:session:a:100") == 0, 5);
	ok(query_int("EXISTS t:{alice}:session:a:100") == 0, "store_free flushes queued commands");

	/* The same server through its unix socket. */
	redis_config(&ca, "U", 60);
	snprintf(ca.state, sizeof ca.state, "redis+unix://%s", redis_sock);
	c = store_new(base, &ca, notify, err, sizeof err);
	ok(c != NULL, "redis+unix store created");
	if (c) {
		WAIT(store_epoch(c) == 1, 10);
		ok(stats(c).connected && store_epoch(c) == 1, "redis+unix: connected and subscribed");
		ucarol = store_user_join(c, "alice", &mb2);
		store_bump(b, ub, "INBOX", &mb1, NULL);
		WAIT(store_gen(ucarol, "INBOX") == 1, 5);
		ok(store_gen(ucarol, "INBOX") == 1 && notified(&mb2, "INBOX") == 1,
		    "redis+unix: hears B's change");
		store_user_leave(c, ucarol, &mb2);
		store_free(c);
	}

	/* Nothing listening: the store is made anyway and keeps trying. */
	redis_config(&ca, "C", 60);
	snprintf(ca.state, sizeof ca.state, "redis://127.0.0.1:%d", free_port());
	c = store_new(base, &ca, notify, err, sizeof err);
	ok(c != NULL, "store_new does not need Redis to be up");
	if (c) {
		WAIT(stats(c).errors >= 1, 5);
		ok(stats(c).errors >= 1 && !stats(c).connected && store_epoch(c) == 0,
		    "unreachable Redis: errors counted, epoch 0");
		store_free(c);	/* with a reconnection pending */
	}
out:
	store_user_leave(b, ub, &mb1);
	store_free(a);
	store_free(b);
}

int
main(void)
{
	if (!on_path("redis-server")) {
		printf("1..0 # SKIP redis-server not installed\n");
		return 0;
	}
	signal(SIGPIPE, SIG_IGN);
	log_init(1, LOG_LEVEL_WARNING);
	base = event_base_new();
	atexit(redis_stop);
	test_memory();

	redis_port = free_port();
	snprintf(redis_sock, sizeof redis_sock, "%s/test_store.%d.sock",
	    getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
	if (ok(redis_port > 0 && redis_start() == 0, "redis-server started on port %d", redis_port))
		test_redis();
	redis_stop();
	event_base_free(base);
	return tap_done();
}
