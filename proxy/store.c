/* store: per-user mailbox generations and sessions' state, kept locally and shared through Redis. */

/*
 * Redis schema (P = redis_prefix, U = user name, I = instance_id or the host
 * name). U sits in a hash tag, {U}, so that one user's keys share a Redis
 * Cluster slot; the prefix may hold no braces for that reason.
 *
 *   P{U}:gen             hash: mailbox name -> generation. HINCRBY 1 for
 *                        every change made through any instance.
 *   P{U}:session:<sid>   hash, one per live session, sid = "<I>:<id>":
 *                        user, instance, client, mailbox, uidvalidity,
 *                        uidnext, count, highestmodseq, synced_gen, started,
 *                        last_resync, resyncs, escalations, stale_detected,
 *                        view. Numbers in decimal, times in unix seconds.
 *                        EXPIRE state_ttl on every save and refresh.
 *   P{U}:sessions        set of the user's sids: SADD on save, SREM on
 *                        forget, EXPIRE state_ttl with each save and refresh.
 *                        Sids of an instance that died linger until the set
 *                        expires: check that P{U}:session:<sid> exists.
 *   channel P{U}:changes one SPUBLISH (PUBLISH without sharded pub/sub)
 *                        per change of U's:
 *                        "<I>\t<U>\t<mailbox>\t<generation>\t<detail>",
 *                        generation being the HINCRBY result. Receivers skip
 *                        their own instance's messages. Users with a tab or
 *                        a line break in their name are not published;
 *                        tabs and line breaks in detail become spaces.
 *                        An instance is subscribed (SSUBSCRIBE, or
 *                        SUBSCRIBE) while it has a session of U: instances
 *                        without one hear nothing of U. The channel carries
 *                        U's hash tag, so it maps to U's slot.
 *   channel Pchanges     the same messages, from outside (an MTA hook) or
 *                        an older instance; every instance subscribes. With
 *                        redis_publish_global, every change is published
 *                        there too (a rolling upgrade from an older version).
 *
 * A change is published from the HINCRBY reply, so that the message carries
 * the shared generation; receivers do not rely on it (each process counts
 * its own generations, compared only within that process), it is there for
 * event logs and tools. Needs Redis 4 or later (HSET with several fields).
 *
 * Session keys must outlive idle sessions (IDLE lasts 30 minutes or more):
 * one timer every state_ttl/3 EXPIREs, in one pipeline, the keys of every
 * session saved here. A session's first save on a link also sets both TTLs
 * and joins the user's set; later saves are one HSET (it keeps the TTL), so
 * a command that changes the record costs Redis one command, not four.
 *
 * Sharded pub/sub (Redis 7) is used when the server knows SPUBLISH (COMMAND
 * INFO when the command link comes up), plain pub/sub otherwise. A user's
 * channel is subscribed with the user's first session here and unsubscribed
 * with its last one. A change published before the subscription took effect
 * would be missed: the user's generations are read (HGETALL P{U}:gen) when
 * subscribing and again once the subscription is confirmed, and every
 * mailbox whose shared generation moved in between counts as changed (at
 * worst a change heard twice: one resync too many). The two reads miss a
 * change made after a session's SELECT but counted before the first read:
 * a SELECT waits until that read is back (store_user_listening(), the
 * listening callback; a session that could not wait checks once,
 * track.unheard). Regaining Redis subscribes every user with
 * sessions here again.
 *
 * Two connections: commands, and SUBSCRIBE (which allows nothing else;
 * hiredis 0.14 cannot route sharded pub/sub replies, it knows SUBSCRIBE and
 * PSUBSCRIBE only: the subscriber link reads its replies itself, with its
 * own libevent events around the hiredis context, store_sub_*, and writes
 * its commands straight into the context's output buffer).
 * Either one failing, or a command failing, starts an outage: both are
 * dropped, the epoch grows, and reconnection is tried after 1 s, 2 s, 4 s...
 * up to 30 s. Regaining both grows the epoch again, rewrites this instance's
 * registry entry and calls the up callback, which saves every live session
 * again: saves made during the outage were dropped, and a restarted Redis
 * has lost the keys (an idle session would otherwise be missing until its
 * state next changed). Host names in the URL are resolved with a blocking
 * lookup at each (re)connect: prefer an address.
 *
 * A Redis that requires a password (the URL's user:password@, or
 * state_password_file) gets AUTH first on both links, pipelined ahead of
 * everything else: its refusal is the first reply, and an outage like a
 * refused connection (logged as a warning once per outage, the URL shown
 * without its password).
 *
 * With redis-sentinel:// the address comes from the sentinels (sentinel.c)
 * at every (re)connection, so a failed command or a lost link also finds a
 * new master; the command link then checks with ROLE that it reached a
 * master, not a replica (an outage if not). A failover announced by a
 * sentinel (+switch-master) drops both links at once and connects to the
 * new master without waiting for the backoff. Either way the outage grows
 * the epoch, so every session resyncs once; the failover is logged and
 * told to the failover callback once the new master is reached.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>

#include "log.h"
#include "sentinel.h"
#include "store.h"
#include "strmap.h"

#define STORE_BACKOFF_FIRST 1	/* seconds before the first reconnection */
#define STORE_BACKOFF_MAX 30
#define STORE_NOTIFY_STACK 16	/* members notified without a malloc */

struct store_user {
	char *name;
	void **members;
	size_t n, cap;
	struct strmap gens;	/* mailbox -> local generation (v.n) */
	uint64_t all;		/* changes to every mailbox at once (notify without one) */
	char last_change[160];	/* what the last change was, for the resync's reason */
	unsigned busy;		/* notify loops running: freeing waits for them */
	/* Redis: the user's channel on the subscriber link. */
	int sub;		/* STORE_SUB_* */
	uint64_t sub_seq;	/* this subscription, for the snapshot replies */
	struct strmap *snap;	/* shared generations read when subscribing */
};

enum { STORE_SUB_NONE, STORE_SUB_ASKED, STORE_SUB_ON };

/* A session saved here and not forgotten yet, for the TTL refresh. */
struct store_live {
	int keyed;		/* TTLs and set membership written on this link */
	char user[];
};

struct store_link {
	struct store *st;
	const char *name;	/* for the log */
	redisAsyncContext *ac;	/* NULL while disconnected */
	int up;			/* SELECT (or PING) answered / SUBSCRIBE confirmed */
	int authing;		/* subscriber link: its first reply is AUTH's */
};

struct store {
	struct event_base *base;
	store_notify_fn notify;
	char instance[256];
	struct strmap users;	/* name -> struct store_user (v.ptr) */

	/* Redis only */
	int redis;
	struct config_redis url;	/* url.auth: the credentials (master's with sentinels) */
	char shown[1100];	/* the state URL without its password, for the log */
	int auth_warned;	/* this outage's refused AUTH was logged as a warning */
	char where[1300];	/* the server, for the log */
	char *prefix, *channel;
	int sharded;		/* SSUBSCRIBE/SPUBLISH: the server knows SPUBLISH */
	int publish_global;	/* every change on Pchanges too, for older instances */
	struct strmap inflight;	/* user -> subscribe requests not answered yet */
	uint64_t sub_seq;
	int ttl;
	struct strmap live;	/* sid -> struct store_live (v.ptr) */
	struct store_link cmd, sub;
	struct event *retry, *tick;
	int healthy;		/* both links up: nothing is being missed */
	int ever_up, warned;	/* warned: this outage was logged as a warning */
	int backoff;		/* seconds before the next reconnection */
	uint64_t epoch;
	struct store_stats stats;
	store_up_fn up_fn;	/* Redis (re)gained: save every live session again */
	void *up_arg;
	char *reg_admin;	/* the registry entry written last (NULL: none) */
	int64_t reg_started;
	int hear_own;		/* an upgrade: another process has our instance name */

	/* redis-sentinel:// only */
	struct sentinel *sentinel;
	char master_name[128];
	char master[300];	/* the address used, "host:port"; "" until named */
	char master_up[300];	/* the last one reached, and found a master */
	store_failover_fn failover_fn;
	void *failover_arg;
	store_listening_fn listening_fn;
};

/* A change waiting for its HINCRBY reply, to be published then. */
struct store_pub {
	size_t head_len;	/* "<I>\t<U>\t<mailbox>", then NUL, then detail */
	size_t user_off, user_len;	/* U in text */
	char text[];
};

/* A generations snapshot asked for while subscribing u. */
struct store_snap_req {
	uint64_t seq;		/* u->sub_seq when asked */
	char user[];
};

static void store_lost(struct store *st, const char *what, const char *why);
static void store_register_write(struct store *st);
static void store_live_unkeyed(struct store *st);
static void store_user_subscribe(struct store *st, struct store_user *u);
static void store_user_unsubscribe(struct store *st, struct store_user *u);
static void store_subs_reset(struct store *st);
static void store_subs_all(struct store *st);

static char *
store_strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *
store_strf(const char *fmt, ...)
{
	va_list ap;
	char *s;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0 || !(s = malloc((size_t)n + 1)))
		return NULL;
	va_start(ap, fmt);
	vsnprintf(s, (size_t)n + 1, fmt, ap);
	va_end(ap);
	return s;
}

/* --- users and notification (no I/O) --- */

static void
store_user_snap_free(struct store_user *u)
{
	if (u->snap) {
		strmap_clear(u->snap, NULL);
		free(u->snap);
		u->snap = NULL;
	}
}

static void
store_user_destroy(void *p)
{
	struct store_user *u = p;

	store_user_snap_free(u);
	strmap_clear(&u->gens, NULL);
	free(u->members);
	free(u->name);
	free(u);
}

static void
store_user_free(struct store *st, struct store_user *u)
{
	store_user_unsubscribe(st, u);
	strmap_del(&st->users, u->name);
	store_user_destroy(u);
}

static int
store_user_has(const struct store_user *u, const void *member)
{
	size_t i;

	for (i = 0; i < u->n; i++)
		if (u->members[i] == member)
			return 1;
	return 0;
}

struct store_user *
store_user_join(struct store *st, const char *user, void *member)
{
	struct strmap_entry *e = strmap_get(&st->users, user);
	struct store_user *u;
	void **grown;

	if (!e)
		goto oom;
	if (!(u = e->v.ptr)) {
		if (!(u = calloc(1, sizeof *u)) || !(u->name = strdup(user))) {
			free(u);
			strmap_del(&st->users, user);
			goto oom;
		}
		e->v.ptr = u;
	}
	if (u->n == u->cap) {
		if (!(grown = realloc(u->members, (u->cap ? u->cap * 2 : 4) * sizeof *grown))) {
			if (u->n == 0)
				store_user_free(st, u);
			goto oom;
		}
		u->members = grown;
		u->cap = u->cap ? u->cap * 2 : 4;
	}
	u->members[u->n++] = member;
	if (u->sub == STORE_SUB_NONE)	/* the user's first session here */
		store_user_subscribe(st, u);
	return u;
oom:
	log_error("store: out of memory; user %s not tracked", user);
	return NULL;
}

void
store_user_leave(struct store *st, struct store_user *u, void *member)
{
	size_t i;

	if (!u)
		return;
	for (i = 0; i < u->n; i++)
		if (u->members[i] == member) {
			/* Order is irrelevant, and notify loops work on a snapshot. */
			u->members[i] = u->members[--u->n];
			break;
		}
	if (u->n == 0 && u->busy == 0)
		store_user_free(st, u);
}

const char *
store_user_name(const struct store_user *u)
{
	return u->name;
}

const char *
store_user_last_change(const struct store_user *u)
{
	return u && u->last_change[0] ? u->last_change : NULL;
}

uint64_t
store_gen(struct store_user *u, const char *mailbox)
{
	const struct strmap_entry *e = u ? strmap_find(&u->gens, mailbox) : NULL;

	return (e ? e->v.n : 0) + (u ? u->all : 0);
}

/* u's members may go on with what waited for store_user_listening(). The
 * callback defers its work, so the members stay put meanwhile. */
static void
store_tell_listening(struct store *st, struct store_user *u)
{
	if (st->listening_fn)
		for (size_t i = 0; i < u->n; i++)
			st->listening_fn(u->members[i]);
}

int
store_user_listening(const struct store *st, const struct store_user *u)
{
	if (!st->redis || !st->healthy)
		return 1;
	if (u == NULL)
		return 0;
	return u->sub != STORE_SUB_ASKED || u->snap != NULL;
}

/*
 * Tell u's members, except one, that mailbox changed. A notify callback may
 * make any member leave, even close every session of the user: it works on
 * a snapshot, skips members gone meanwhile, and keeps u alive until done.
 * mailbox must outlive u's members (the key of u's generation entry does).
 */
static void
store_notify(struct store *st, struct store_user *u, const char *mailbox, const void *except)
{
	void *stack[STORE_NOTIFY_STACK], **snap = stack;
	size_t n = u->n, i;

	if (n == 0 || !st->notify)
		return;
	if (n > STORE_NOTIFY_STACK && !(snap = malloc(n * sizeof *snap))) {
		log_error("store: out of memory; sessions of %s not told of a change", u->name);
		return;
	}
	memcpy(snap, u->members, n * sizeof *snap);
	u->busy++;
	for (i = 0; i < n; i++)
		if (snap[i] != except && store_user_has(u, snap[i]))
			st->notify(snap[i], mailbox);
	u->busy--;
	if (snap != stack)
		free(snap);
	if (u->n == 0 && u->busy == 0)
		store_user_free(st, u);
}

/* Count a change of u's mailbox here and tell its members. u may be gone after. */
static void
store_note_change(struct store_user *u, const char *detail)
{
	/* Cut to fit, on purpose (a log and /sessions field). */
	size_t n = detail ? strnlen(detail, sizeof(u->last_change) - 1) : 0;

	if (n > 0)
		memcpy(u->last_change, detail, n);
	u->last_change[n] = '\0';
}

static uint64_t
store_changed(struct store *st, struct store_user *u, const char *mailbox, const void *except,
    const char *detail)
{
	struct strmap_entry *e = strmap_get(&u->gens, mailbox);
	uint64_t gen;

	if (!e) {
		log_error("store: out of memory; change of %s not counted", mailbox);
		return store_gen(u, mailbox);
	}
	gen = ++e->v.n + u->all;
	store_note_change(u, detail);
	store_notify(st, u, e->key, except);
	return gen;
}

/* Every one of u's mailboxes changed (a notification naming none). */
static void
store_changed_all(struct store *st, struct store_user *u, const char *detail)
{
	u->all++;
	store_note_change(u, detail);
	store_notify(st, u, "", NULL);
}

/* --- Redis links --- */

/* Commands are queued while connecting too; only between attempts are they dropped. */
static int
store_link_ok(const struct store_link *link)
{
	return link->ac != NULL;
}

/*
 * Drop both links. Their contexts are marked (data = NULL) before being
 * freed, so that the callbacks hiredis runs while freeing (NULL replies, the
 * disconnect callback), now or deferred when inside one of its callbacks,
 * recognise a link given up and touch nothing.
 */
static void
store_teardown(struct store *st)
{
	struct store_link *links[2] = { &st->cmd, &st->sub };
	redisAsyncContext *ac;
	int i;

	for (i = 0; i < 2; i++) {
		if (!(ac = links[i]->ac))
			continue;
		links[i]->ac = NULL;
		links[i]->up = 0;
		ac->data = NULL;
		redisAsyncFree(ac);
	}
}

static void
store_schedule_retry(struct store *st)
{
	struct timeval tv = { st->backoff, 0 };

	if (evtimer_pending(st->retry, NULL))
		return;
	evtimer_add(st->retry, &tv);
	st->backoff = st->backoff * 2 > STORE_BACKOFF_MAX ? STORE_BACKOFF_MAX : st->backoff * 2;
}

/* A link or a command failed: an outage starts (or goes on). Changes made
 * elsewhere may be missed from now on, hence the epoch. */
static void
store_lost(struct store *st, const char *what, const char *why)
{
	st->stats.errors++;
	if (st->healthy) {
		st->healthy = 0;
		st->epoch++;
	}
	if (!st->warned) {
		st->warned = 1;
		log_warning("redis %s: %s: %s; changes through other instances are missed until "
		    "it is back", st->where, what, why);
	} else {
		log_info("redis %s: %s: %s; retrying in %d s", st->where, what, why, st->backoff);
	}
	store_teardown(st);
	store_live_unkeyed(st);
	store_subs_reset(st);
	store_schedule_retry(st);
}

/* A link became ready; with both, nothing is missed any more. */
static void
store_link_up(struct store_link *link)
{
	struct store *st = link->st;

	link->up = 1;
	if (st->healthy || !st->cmd.up || !st->sub.up)
		return;
	st->healthy = 1;
	st->epoch++;		/* what happened while down (or before) was missed */
	st->warned = 0;
	st->auth_warned = 0;
	st->backoff = STORE_BACKOFF_FIRST;
	if (st->ever_up) {
		st->stats.reconnects++;
		log_notice("redis %s: reconnected; changes made meanwhile were missed", st->where);
	} else {
		log_notice("redis %s: connected", st->where);
	}
	st->ever_up = 1;
	/* A failover: a master reached before, another now (not an address a
	 * sentinel named wrongly, refused by ROLE). */
	if (st->master_up[0] && strcmp(st->master_up, st->master) != 0) {
		st->stats.failovers++;
		log_notice("redis sentinel %s: failed over from %s to %s; every session resyncs once",
		    st->master_name, st->master_up, st->master);
		if (st->failover_fn)
			st->failover_fn(st->failover_arg, st->master_up, st->master);
	}
	memcpy(st->master_up, st->master, sizeof st->master_up);
	store_subs_all(st);
	/* A restarted Redis has none of our keys, and what was saved during the
	 * outage was dropped: write the registry entry and every live session's
	 * state again now, not when each next changes. */
	store_register_write(st);
	if (st->up_fn)
		st->up_fn(st->up_arg);
}

/* A NOAUTH refusal without credentials configured: say where they go. */
static const char *
store_noauth_hint(const struct store *st, const redisReply *r)
{
	if (r->type != REDIS_REPLY_ERROR || strncmp(r->str, "NOAUTH", 6) != 0 ||
	    st->url.auth.password[0])
		return "";
	return " (this Redis requires a password: state = redis://:PASSWORD@host, or "
	    "state_password_file)";
}

/* AUTH refused on a link: an outage like a failed connection, logged as a
 * warning once per outage even when it began otherwise (Redis restarted
 * with another password), naming the URL without its password. */
static void
store_auth_refused(struct store *st, struct store_link *link, const redisReply *r)
{
	char why[1700];

	snprintf(why, sizeof why, "AUTH%s%s refused: %.*s (state = %s)",
	    st->url.auth.user[0] ? " as " : "", st->url.auth.user,
	    (int)(r->len > 200 ? 200 : r->len), r->str, st->shown);
	if (!st->auth_warned) {
		st->auth_warned = 1;
		st->warned = 0;
	}
	store_lost(st, link->name, why);
}

/* AUTH's answer on the command link. */
static void
store_on_auth(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct store_link *link = ac->data;

	(void)privdata;
	if (!r || !link || r->type != REDIS_REPLY_ERROR)
		return;
	if (config_auth_unneeded(r->str)) {
		log_debug("redis %s: %s: AUTH not needed: %s", link->st->where, link->name, r->str);
		return;
	}
	store_auth_refused(link->st, link, r);
}

/* The reply to a command that must not fail: anything but an error is fine. */
static int
store_reply_ok(redisAsyncContext *ac, const redisReply *r, const char *command)
{
	struct store_link *link = ac->data;
	char why[300];

	if (!r || !link)	/* the link is being freed: its loss is counted already */
		return 0;
	if (r->type != REDIS_REPLY_ERROR)
		return 1;
	snprintf(why, sizeof why, "%s failed: %.*s%s", command, (int)(r->len > 200 ? 200 : r->len),
	    r->str, store_noauth_hint(link->st, r));
	store_lost(link->st, "command", why);
	return 0;
}

static void
store_on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	store_reply_ok(ac, reply, privdata);
}

/* COMMAND INFO SPUBLISH answered, the last of the command link's first
 * commands: [nil] when the server has no sharded pub/sub (before Redis 7),
 * an error when it has no COMMAND (or the ACL forbids it): plain then. */
static void
store_on_probe(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct store_link *link = ac->data;
	struct store *st;

	(void)privdata;
	if (!r || !link)
		return;
	st = link->st;
	st->sharded = r->type == REDIS_REPLY_ARRAY && r->elements == 1
	    && r->element[0]->type == REDIS_REPLY_ARRAY;
	log_info("redis %s: %s pub/sub for users' changes", st->where,
	    st->sharded ? "sharded" : "plain");
	store_link_up(link);
}

static void
store_on_published(redisAsyncContext *ac, void *reply, void *privdata)
{
	if (store_reply_ok(ac, reply, privdata))
		((struct store_link *)ac->data)->st->stats.published++;
}

/* Queue a command on the command link, its name as the callback's privdata
 * (for the log); a refusal is a failed command. */
static void
store_command(struct store *st, redisCallbackFn *fn, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void
store_command(struct store *st, redisCallbackFn *fn, const char *name, const char *fmt, ...)
{
	va_list ap;
	int rc;

	if (!st->cmd.ac)
		return;
	va_start(ap, fmt);
	rc = redisvAsyncCommand(st->cmd.ac, fn, (void *)name, fmt, ap);
	va_end(ap);
	if (rc != REDIS_OK)
		store_lost(st, "command", name);
}

/* Our own change, counted in Redis between the snapshots taken while
 * subscribing its user (this link runs in order: after the first snapshot,
 * before the second): not one to hear of again. */
static void
store_snap_own(struct store *st, const struct store_pub *p)
{
	char user[1024];
	struct strmap_entry *e;
	struct store_user *u;

	if (p->user_len >= sizeof user)
		return;
	memcpy(user, p->text + p->user_off, p->user_len);
	user[p->user_len] = '\0';
	if ((e = strmap_find(&st->users, user)) && (u = e->v.ptr)->snap
	    && (e = strmap_get(u->snap, p->text + p->user_off + p->user_len + 1)))
		e->v.n++;
}

/* HINCRBY answered: publish the change with the shared generation. */
static void
store_on_hincrby(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct store_pub *p = privdata;
	const redisReply *r = reply;
	struct store *st;
	char *msg, *chan;

	if (store_reply_ok(ac, r, "HINCRBY") && r->type == REDIS_REPLY_INTEGER) {
		st = ((struct store_link *)ac->data)->st;
		store_snap_own(st, p);
		msg = store_strf("%s\t%lld\t%s", p->text, r->integer, p->text + p->head_len + 1);
		/* To the instances with a session of the user only. */
		chan = store_strf("%s{%.*s}:changes", st->prefix, (int)p->user_len,
		    p->text + p->user_off);
		/* Heard by every instance, this one and those with the user too:
		 * those hear it twice, one resync too many at most. */
		if (msg && st->publish_global)
			store_command(st, store_on_reply, "PUBLISH", "PUBLISH %s %s", st->channel, msg);
		if (msg && chan)
			store_command(st, store_on_published, "PUBLISH", "%s %s %s",
			    st->sharded ? "SPUBLISH" : "PUBLISH", chan, msg);
		free(msg);
		free(chan);
	}
	free(p);
}

static void
store_publish(struct store *st, const char *user, const char *mailbox, const char *detail)
{
	struct store_pub *p;
	size_t i;

	if (!st->redis)
		return;
	if (!store_link_ok(&st->cmd)) {
		st->stats.errors++;	/* dropped: the other instances won't hear of it */
		return;
	}
	if (strpbrk(user, "\t\r\n")) {
		log_debug("store: user name with a tab or line break, change not published");
		return;
	}
	if (!detail)
		detail = "";
	p = malloc(sizeof *p + strlen(st->instance) + strlen(user) + strlen(mailbox)
	    + strlen(detail) + 4);
	if (!p) {
		st->stats.errors++;
		return;
	}
	p->head_len = (size_t)sprintf(p->text, "%s\t%s\t%s", st->instance, user, mailbox);
	p->user_off = strlen(st->instance) + 1;
	p->user_len = strlen(user);
	strcpy(p->text + p->head_len + 1, detail);
	/* The receiver splits detail off at the last tab. */
	for (i = p->head_len + 1; p->text[i]; i++)
		if (p->text[i] == '\t' || p->text[i] == '\r' || p->text[i] == '\n')
			p->text[i] = ' ';
	if (redisAsyncCommand(st->cmd.ac, store_on_hincrby, p, "HINCRBY %s{%s}:gen %s 1",
	    st->prefix, user, mailbox) != REDIS_OK) {
		free(p);
		store_lost(st, "command", "HINCRBY");
	}
}

/* A change message: "<I>\t<U>\t<mailbox>\t<generation>\t<detail>"; the
 * mailbox may hold tabs, so it is found from both ends. */
static void
store_heard(struct store *st, const char *payload, size_t len)
{
	char *msg = malloc(len + 1), *user, *mailbox, *gen, *detail;
	struct strmap_entry *e;

	if (!msg)
		return;
	memcpy(msg, payload, len);
	msg[len] = '\0';
	if (strlen(msg) != len || !(user = strchr(msg, '\t'))
	    || !(mailbox = strchr(user + 1, '\t')) || !(detail = strrchr(msg, '\t'))
	    || detail <= mailbox) {
		log_debug("store: malformed change message ignored");
		goto out;
	}
	*detail = '\0';
	if (!(gen = strrchr(msg, '\t')) || gen <= mailbox) {
		log_debug("store: malformed change message ignored");
		goto out;
	}
	*user++ = '\0';
	*mailbox++ = '\0';
	*gen = '\0';
	st->stats.messages++;
	if (!st->hear_own && strcmp(msg, st->instance) == 0)	/* our own, counted when made */
		goto out;
	st->stats.received++;
	if ((e = strmap_find(&st->users, user))) {
		log_debug("store: change from %s: %s \"%s\" (%s)", msg, user, mailbox, detail + 1);
		char from[200];

		snprintf(from, sizeof(from), "%s (through %s)", detail + 1, msg);
		if (mailbox[0] == '\0')
			store_changed_all(st, e->v.ptr, from);
		else
			store_changed(st, e->v.ptr, mailbox, NULL, from);
	}
out:
	free(msg);
}

/* --- the subscriber link: its own reading, for sharded pub/sub --- */

/* Libevent events around the subscriber link's hiredis context, in place
 * of hiredis's adapter: replies are read and routed here, never by hiredis
 * (it would take an "ssubscribe" or "smessage" for an unknown reply). */
struct store_sub_events {
	struct store *st;
	redisAsyncContext *ac;
	struct event *rev, *wev;
};

/* Queue one command on the subscriber link; no reply callback: its answer
 * (a subscribe confirmation, or an error) comes through store_sub_reply(). */
static void
store_sub_sendv(struct store *st, int argc, const char **argv, const size_t *argvlen)
{
	redisAsyncContext *ac = st->sub.ac;
	char *cmd;
	int len;

	if (!ac)
		return;
	if ((len = redisFormatCommandArgv(&cmd, argc, argv, argvlen)) < 0) {
		store_lost(st, "subscriber link", "out of memory");
		return;
	}
	if (redisAppendFormattedCommand(&ac->c, cmd, (size_t)len) != REDIS_OK) {
		explicit_bzero(cmd, (size_t)len);	/* it may be AUTH's */
		redisFreeCommand(cmd);
		store_lost(st, "subscriber link", argv[0]);
		return;
	}
	explicit_bzero(cmd, (size_t)len);
	redisFreeCommand(cmd);
	if (ac->ev.addWrite)
		ac->ev.addWrite(ac->ev.data);
}

static void
store_sub_send(struct store *st, const char *command, const char *channel)
{
	const char *argv[2] = { command, channel };
	size_t argvlen[2] = { strlen(command), strlen(channel) };

	store_sub_sendv(st, 2, argv, argvlen);
}

/* The user whose channel this is ("P{U}:changes"), copied to out; NULL for
 * another channel. */
static const char *
store_channel_user(const struct store *st, const char *channel, size_t len, char *out,
    size_t outlen)
{
	size_t plen = strlen(st->prefix), slen = sizeof("}:changes") - 1;

	if (len < plen + 1 + slen || len - plen - 1 - slen >= outlen
	    || memcmp(channel, st->prefix, plen) != 0 || channel[plen] != '{'
	    || memcmp(channel + len - slen, "}:changes", slen) != 0)
		return NULL;
	memcpy(out, channel + plen + 1, len - plen - 1 - slen);
	out[len - plen - 1 - slen] = '\0';
	return out;
}

static void store_sub_confirmed(struct store *st, const char *user);

/* One reply on the subscriber link. */
static void
store_sub_reply(struct store *st, const redisReply *r)
{
	const char *kind;
	char user[1024], why[500];

	if (st->sub.authing) {
		st->sub.authing = 0;
		if (r->type == REDIS_REPLY_ERROR && !config_auth_unneeded(r->str))
			store_auth_refused(st, &st->sub, r);
		return;
	}
	if (r->type == REDIS_REPLY_ERROR) {
		snprintf(why, sizeof why, "refused: %.*s%s", (int)(r->len > 200 ? 200 : r->len), r->str,
		    store_noauth_hint(st, r));
		store_lost(st, "subscriber link", why);
		return;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || r->element[0]->type !=
	    REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING)
		return;
	kind = r->element[0]->str;
	if (strcmp(kind, "message") == 0 || strcmp(kind, "smessage") == 0) {
		if (r->element[2]->type == REDIS_REPLY_STRING)
			store_heard(st, r->element[2]->str, r->element[2]->len);
	} else if (strcmp(kind, "subscribe") == 0 || strcmp(kind, "ssubscribe") == 0) {
		if (strcmp(r->element[1]->str, st->channel) == 0)
			store_link_up(&st->sub);
		else if (store_channel_user(st, r->element[1]->str, r->element[1]->len, user,
		    sizeof user))
			store_sub_confirmed(st, user);
	}
	/* (s)unsubscribe confirmations: nothing waits for them. */
}

static void
store_sub_on_read(evutil_socket_t fd, short what, void *arg)
{
	struct store_sub_events *e = arg;
	struct store *st = e->st;
	redisAsyncContext *ac = e->ac;
	void *reply;
	char why[200];

	(void)fd;
	(void)what;
	if (!(ac->c.flags & REDIS_CONNECTED)) {
		/* Completes (or fails: the context is gone then) the connection. */
		redisAsyncHandleWrite(ac);
		return;
	}
	if (redisBufferRead(&ac->c) != REDIS_OK) {
		snprintf(why, sizeof why, "%s", ac->c.errstr[0] ? ac->c.errstr : "connection closed");
		store_lost(st, "subscriber link", why);
		return;
	}
	for (;;) {
		if (redisGetReply(&ac->c, &reply) != REDIS_OK) {
			snprintf(why, sizeof why, "%s", ac->c.errstr[0] ? ac->c.errstr : "bad reply");
			store_lost(st, "subscriber link", why);
			return;
		}
		if (!reply)
			break;
		store_sub_reply(st, reply);
		freeReplyObject(reply);
		if (st->sub.ac != ac)	/* lost meanwhile: the context is freed */
			return;
	}
}

static void
store_sub_on_write(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	redisAsyncHandleWrite(((struct store_sub_events *)arg)->ac);
}

static void
store_sub_add_read(void *p)
{
	event_add(((struct store_sub_events *)p)->rev, NULL);
}

static void
store_sub_del_read(void *p)
{
	event_del(((struct store_sub_events *)p)->rev);
}

static void
store_sub_add_write(void *p)
{
	event_add(((struct store_sub_events *)p)->wev, NULL);
}

static void
store_sub_del_write(void *p)
{
	event_del(((struct store_sub_events *)p)->wev);
}

static void
store_sub_cleanup(void *p)
{
	struct store_sub_events *e = p;

	event_free(e->rev);
	event_free(e->wev);
	free(e);
}

static int
store_sub_attach(struct store *st, redisAsyncContext *ac)
{
	struct store_sub_events *e;

	if (ac->ev.data || !(e = calloc(1, sizeof *e)))
		return -1;
	e->st = st;
	e->ac = ac;
	e->rev = event_new(st->base, ac->c.fd, EV_READ | EV_PERSIST, store_sub_on_read, e);
	e->wev = event_new(st->base, ac->c.fd, EV_WRITE, store_sub_on_write, e);
	if (!e->rev || !e->wev) {
		if (e->rev)
			event_free(e->rev);
		if (e->wev)
			event_free(e->wev);
		free(e);
		return -1;
	}
	ac->ev.addRead = store_sub_add_read;
	ac->ev.delRead = store_sub_del_read;
	ac->ev.addWrite = store_sub_add_write;
	ac->ev.delWrite = store_sub_del_write;
	ac->ev.cleanup = store_sub_cleanup;
	ac->ev.data = e;
	event_add(e->rev, NULL);
	event_add(e->wev, NULL);
	return 0;
}

/* --- users' channels --- */

static void
store_snap_ask(struct store *st, struct store_user *u, redisCallbackFn *fn)
{
	struct store_snap_req *q;

	if (!st->cmd.ac || !(q = malloc(sizeof *q + strlen(u->name) + 1))) {
		st->stats.errors++;
		return;
	}
	q->seq = u->sub_seq;
	strcpy(q->user, u->name);
	if (redisAsyncCommand(st->cmd.ac, fn, q, "HGETALL %s{%s}:gen", st->prefix, u->name)
	    != REDIS_OK) {
		free(q);
		store_lost(st, "command", "HGETALL");
	}
}

/* A snapshot reply for the subscription it was asked for, or NULL. */
static struct store_user *
store_snap_user(redisAsyncContext *ac, const redisReply *r, const struct store_snap_req *q)
{
	struct store_link *link = ac->data;
	struct strmap_entry *e;
	struct store_user *u;

	if (!store_reply_ok(ac, r, "HGETALL") || r->type != REDIS_REPLY_ARRAY)
		return NULL;
	e = strmap_find(&link->st->users, q->user);
	u = e ? e->v.ptr : NULL;
	return u && u->sub_seq == q->seq && u->sub != STORE_SUB_NONE ? u : NULL;
}

/* The user's generations before subscribing. */
static void
store_on_snap_before(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct store_user *u = store_snap_user(ac, r, privdata);
	struct strmap_entry *e;
	size_t i;

	free(privdata);
	if (!u)
		return;
	store_user_snap_free(u);
	if (!(u->snap = calloc(1, sizeof *u->snap)))
		return;
	for (i = 0; i + 1 < r->elements; i += 2)
		if (r->element[i]->type == REDIS_REPLY_STRING
		    && r->element[i + 1]->type == REDIS_REPLY_STRING
		    && (e = strmap_get(u->snap, r->element[i]->str)))
			e->v.n = strtoull(r->element[i + 1]->str, NULL, 10);
	store_tell_listening(((struct store_link *)ac->data)->st, u);
}

/* The user's generations once subscribed: what moved since the snapshot
 * was published while the subscription was not there yet. */
static void
store_on_snap_after(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct store_snap_req *q = privdata;
	struct store_user *u = store_snap_user(ac, r, q);
	struct store *st;
	struct strmap *snap;
	struct strmap_entry *e;
	const char *mailbox;
	uint64_t was;
	size_t i;

	if (!u || !u->snap) {	/* no snapshot before: HGETALL refused, the link lost */
		free(q);
		return;
	}
	st = ((struct store_link *)ac->data)->st;
	snap = u->snap;
	u->snap = NULL;
	for (i = 0; i + 1 < r->elements; i += 2) {
		if (r->element[i]->type != REDIS_REPLY_STRING
		    || r->element[i + 1]->type != REDIS_REPLY_STRING)
			continue;
		mailbox = r->element[i]->str;
		e = strmap_find(snap, mailbox);
		was = e ? e->v.n : 0;
		if (strtoull(r->element[i + 1]->str, NULL, 10) == was)
			continue;
		/* Notifying may free the user: look it up again each time. */
		e = strmap_find(&st->users, q->user);
		if (!e || ((struct store_user *)e->v.ptr)->sub_seq != q->seq)
			break;
		log_debug("store: %s \"%s\" changed while subscribing", q->user, mailbox);
		if (mailbox[0] == '\0')
			store_changed_all(st, e->v.ptr, "a change through another instance");
		else
			store_changed(st, e->v.ptr, mailbox, NULL, "a change through another instance");
	}
	strmap_clear(snap, NULL);
	free(snap);
	free(q);
}

/* Subscribe u's channel (its first session here, or Redis regained): the
 * generations are read now and again once subscribed. */
static void
store_user_subscribe(struct store *st, struct store_user *u)
{
	struct strmap_entry *e;

	if (!st->redis || !st->healthy || strpbrk(u->name, "\t\r\n"))
		return;
	if (!(e = strmap_get(&st->inflight, u->name))) {
		st->stats.errors++;
		return;
	}
	e->v.n++;
	u->sub = STORE_SUB_ASKED;
	u->sub_seq = ++st->sub_seq;
	store_user_snap_free(u);
	store_snap_ask(st, u, store_on_snap_before);
	{
		char *chan = store_strf("%s{%s}:changes", st->prefix, u->name);

		if (chan)
			store_sub_send(st, st->sharded ? "SSUBSCRIBE" : "SUBSCRIBE", chan);
		free(chan);
	}
}

/* A subscribe confirmed; once the last one asked for u is, u hears every
 * change from now on, and what was published before is read. */
static void
store_sub_confirmed(struct store *st, const char *user)
{
	struct strmap_entry *e = strmap_find(&st->inflight, user);
	struct store_user *u;

	if (e && e->v.n > 1) {
		e->v.n--;
		return;
	}
	if (e)
		strmap_del(&st->inflight, user);
	if (!(e = strmap_find(&st->users, user)) || (u = e->v.ptr)->sub != STORE_SUB_ASKED)
		return;
	u->sub = STORE_SUB_ON;
	st->stats.channels++;
	store_snap_ask(st, u, store_on_snap_after);
	store_tell_listening(st, u);	/* in case the first read's answer was lost */
}

/* u's last session here is gone. */
static void
store_user_unsubscribe(struct store *st, struct store_user *u)
{
	char *chan;

	if (u->sub == STORE_SUB_NONE)
		return;
	if (u->sub == STORE_SUB_ON)
		st->stats.channels--;
	u->sub = STORE_SUB_NONE;
	store_user_snap_free(u);
	if (!st->sub.ac || !(chan = store_strf("%s{%s}:changes", st->prefix, u->name)))
		return;
	store_sub_send(st, st->sharded ? "SUNSUBSCRIBE" : "UNSUBSCRIBE", chan);
	free(chan);
}

/* Redis lost: no channel is subscribed any more. */
static void
store_subs_reset(struct store *st)
{
	struct store_user *u;

	strmap_clear(&st->inflight, NULL);
	for (size_t i = 0; i < st->users.nb; i++)
		for (struct strmap_entry *e = st->users.b[i]; e; e = e->next)
			if ((u = e->v.ptr)) {
				u->sub = STORE_SUB_NONE;
				store_user_snap_free(u);
				store_tell_listening(st, u);	/* an outage: the epoch covers it */
			}
	st->stats.channels = 0;
}

/* Redis (re)gained: every user with sessions here listens again. */
static void
store_subs_all(struct store *st)
{
	for (size_t i = 0; i < st->users.nb; i++)
		for (struct strmap_entry *e = st->users.b[i]; e; e = e->next)
			if (e->v.ptr && ((struct store_user *)e->v.ptr)->sub == STORE_SUB_NONE)
				store_user_subscribe(st, e->v.ptr);
}

static void
store_on_connect(const redisAsyncContext *cac, int status)
{
	struct store_link *link = cac->data;
	redisAsyncContext *ac;

	if (status == REDIS_OK || !link)
		return;
	/* hiredis frees the context when this returns. */
	ac = link->ac;
	ac->data = NULL;
	link->ac = NULL;
	store_lost(link->st, link->name, ac->c.errstr[0] ? ac->c.errstr : "cannot connect");
}

static void
store_on_disconnect(const redisAsyncContext *cac, int status)
{
	struct store_link *link = cac->data;
	redisAsyncContext *ac;

	if (!link)		/* given up by store_teardown */
		return;
	ac = link->ac;
	ac->data = NULL;
	link->ac = NULL;
	link->up = 0;
	store_lost(link->st, link->name, status == REDIS_OK || !ac->c.errstr[0]
	    ? "connection closed" : ac->c.errstr);
}

/* Open one link; 0, or -1 after store_lost(). */
static int
store_link_open(struct store *st, struct store_link *link)
{
	const struct config_redis *u = &st->url;
	redisAsyncContext *ac;
	char why[200];

	ac = u->path[0] ? redisAsyncConnectUnix(u->path) : redisAsyncConnect(u->host, atoi(u->port));
	if (!ac || ac->err) {
		snprintf(why, sizeof why, "%s", ac ? ac->c.errstr : "out of memory");
		if (ac)
			redisAsyncFree(ac);
		store_lost(st, link->name, why);
		return -1;
	}
	ac->data = link;
	link->ac = ac;
	link->up = 0;
	link->authing = 0;
	if ((link == &st->sub ? store_sub_attach(st, ac) : redisLibeventAttach(ac, st->base))
	    != REDIS_OK) {
		store_lost(st, link->name, "cannot attach to the event loop");
		return -1;
	}
	redisAsyncSetConnectCallback(ac, store_on_connect);
	redisAsyncSetDisconnectCallback(ac, store_on_disconnect);
	return 0;
}

/* A sentinel's master must say it is one: a replica (a sentinel's stale
 * answer, or a master demoted since) refuses writes. */
static void
store_on_role(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;

	if (!store_reply_ok(ac, r, privdata))
		return;
	if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
	    r->element[0]->type != REDIS_REPLY_STRING || strcmp(r->element[0]->str, "master") != 0)
		store_lost(((struct store_link *)ac->data)->st, "command",
		    "ROLE: not a master; asking the sentinels again");
}

/* Open both links and queue their first commands, sent once connected:
 * their replies tell when each link is usable. */
static void
store_connect(struct store *st)
{
	const char *argv[3];
	size_t argvlen[3];
	int argc;

	if (store_link_open(st, &st->cmd) < 0 || store_link_open(st, &st->sub) < 0)
		return;
	/* AUTH before anything else on both links (pipelined: a refusal is
	 * answered first, and ends the attempt before the rest counts). */
	if ((argc = config_auth_argv(&st->url.auth, argv, argvlen)) > 0) {
		if (redisAsyncCommandArgv(st->cmd.ac, store_on_auth, NULL, argc, argv, argvlen)
		    != REDIS_OK) {
			store_lost(st, "command", "AUTH");
			return;
		}
		st->sub.authing = 1;
		store_sub_sendv(st, argc, argv, argvlen);
		if (!st->sub.ac)
			return;
	}
	if (st->sentinel)
		store_command(st, store_on_role, "ROLE", "ROLE");
	if (st->url.db)
		store_command(st, store_on_reply, "SELECT", "SELECT %d", st->url.db);
	else
		store_command(st, store_on_reply, "PING", "PING");
	store_command(st, store_on_probe, "COMMAND", "COMMAND INFO SPUBLISH");
	/* Channels are not per database: no SELECT on this one. Users' channels
	 * are subscribed once both links are up (the kind of pub/sub known). */
	store_sub_send(st, "SUBSCRIBE", st->channel);
}

/* The master's address from now on (a failover once reached, store_link_up()). */
static void
store_use_master(struct store *st, const char *host, const char *port)
{
	char addr[sizeof st->master];

	snprintf(addr, sizeof addr, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
	if (strcmp(addr, st->master) == 0)
		return;
	memcpy(st->master, addr, sizeof st->master);
	snprintf(st->url.host, sizeof st->url.host, "%s", host);
	snprintf(st->url.port, sizeof st->url.port, "%s", port);
	snprintf(st->where, sizeof st->where, "%s (sentinel %s)", st->master, st->master_name);
}

/* The sentinels named the master (host NULL: none did). */
static void
store_on_master(void *arg, const char *host, const char *port, const char *why)
{
	struct store *st = arg;

	if (st->cmd.ac || st->sub.ac)
		return;		/* a failover announcement got there first */
	if (!host) {
		store_lost(st, "sentinel", why && why[0] ? why : "no sentinel named the master");
		return;
	}
	store_use_master(st, host, port);
	store_connect(st);
}

/* A sentinel announced a failover: go to the new master now, not at the next retry. */
static void
store_on_switch(void *arg, const char *host, const char *port)
{
	struct store *st = arg;
	char old[sizeof st->master];

	memcpy(old, st->master, sizeof old);
	store_use_master(st, host, port);
	if (strcmp(old, st->master) == 0 && (st->cmd.ac || st->sub.ac))
		return;		/* there already, or on the way */
	store_lost(st, "failover", "the sentinels named a new master");
	evtimer_del(st->retry);
	st->backoff = STORE_BACKOFF_FIRST;
	store_connect(st);
}

/* (Re)connect: to the URL's address, or where the sentinels say the master is. */
static void
store_find_master(struct store *st)
{
	if (st->sentinel)
		sentinel_discover(st->sentinel);
	else
		store_connect(st);
}

static void
store_on_retry(evutil_socket_t fd, short what, void *arg)
{
	struct store *st = arg;

	if (!st->cmd.ac && !st->sub.ac)
		store_find_master(st);
}

/* Keep the keys of sessions saved here from expiring while they sit idle. */
static void
store_on_tick(evutil_socket_t fd, short what, void *arg)
{
	struct store *st = arg;
	struct store_live *l;
	struct strmap_entry *e;
	size_t i;

	for (i = 0; i < st->live.nb; i++)
		for (e = st->live.b[i]; e && st->cmd.up; e = e->next) {
			l = e->v.ptr;
			store_command(st, store_on_reply, "EXPIRE",
			    "EXPIRE %s{%s}:session:%s %d", st->prefix, l->user, e->key, st->ttl);
			store_command(st, store_on_reply, "EXPIRE",
			    "EXPIRE %s{%s}:sessions %d", st->prefix, l->user, st->ttl);
		}
}

/* Remember a saved session for the refresh tick (even while Redis is down:
 * its next save, or the tick after, puts it back). NULL when out of memory. */
static struct store_live *
store_live_saved(struct store *st, const char *sid, const char *user)
{
	struct strmap_entry *e = strmap_get(&st->live, sid);
	struct store_live *l;

	if (!e)
		return NULL;
	l = e->v.ptr;
	if (!l || strcmp(l->user, user) != 0) {
		free(l);
		if (!(l = malloc(sizeof *l + strlen(user) + 1))) {
			strmap_del(&st->live, sid);
			return NULL;
		}
		l->keyed = 0;
		strcpy(l->user, user);
		e->v.ptr = l;
	}
	return l;
}

/* The link was lost: the keys may be gone with the server. */
static void
store_live_unkeyed(struct store *st)
{
	for (size_t i = 0; i < st->live.nb; i++)
		for (struct strmap_entry *e = st->live.b[i]; e; e = e->next)
			if (e->v.ptr)
				((struct store_live *)e->v.ptr)->keyed = 0;
}

void
store_session_save(struct store *st, const struct store_session_record *rec)
{
	char num[10][24], *key;		/* the ten numeric fields */
	const char *argv[2 + 2 * 16];	/* HSET key, then 16 fields and values */
	size_t argc = 0;
	int i = 0;
	struct store_live *live;

	if (!st->redis)
		return;
	live = store_live_saved(st, rec->sid, rec->user);
	if (!store_link_ok(&st->cmd)) {
		st->stats.errors++;	/* dropped; the caller saves again on its next change */
		return;
	}
	if (!(key = store_strf("%s{%s}:session:%s", st->prefix, rec->user, rec->sid))) {
		st->stats.errors++;
		return;
	}
#define STORE_FIELD(name, value) (argv[argc++] = (name), argv[argc++] = (value))
#define STORE_NUM(name, fmt, value) (snprintf(num[i], sizeof num[i], fmt, value), \
	STORE_FIELD(name, num[i]), i++)
	STORE_FIELD("HSET", key);
	STORE_FIELD("user", rec->user);
	STORE_FIELD("instance", st->instance);
	STORE_FIELD("client", rec->client ? rec->client : "");
	STORE_FIELD("mailbox", rec->mailbox ? rec->mailbox : "");
	STORE_NUM("uidvalidity", "%lu", (unsigned long)rec->uidvalidity);
	STORE_NUM("uidnext", "%lu", (unsigned long)rec->uidnext);
	STORE_NUM("count", "%lu", (unsigned long)rec->count);
	STORE_NUM("highestmodseq", "%llu", (unsigned long long)rec->highestmodseq);
	STORE_NUM("synced_gen", "%llu", (unsigned long long)rec->synced_gen);
	STORE_NUM("started", "%lld", (long long)rec->started);
	STORE_NUM("last_resync", "%lld", (long long)rec->last_resync);
	STORE_NUM("resyncs", "%llu", (unsigned long long)rec->resyncs);
	STORE_NUM("escalations", "%llu", (unsigned long long)rec->escalations);
	STORE_NUM("stale_detected", "%llu", (unsigned long long)rec->stale_detected);
	STORE_FIELD("view", rec->view ? rec->view : "");
	STORE_FIELD("backend_id", rec->backend_id ? rec->backend_id : "");
#undef STORE_NUM
#undef STORE_FIELD
	if (redisAsyncCommandArgv(st->cmd.ac, store_on_reply, "HSET", (int)argc, argv, NULL)
	    != REDIS_OK)
		store_lost(st, "command", "HSET");
	else if (!live || !live->keyed) {
		store_command(st, store_on_reply, "EXPIRE", "EXPIRE %s %d", key, st->ttl);
		store_command(st, store_on_reply, "SADD", "SADD %s{%s}:sessions %s",
		    st->prefix, rec->user, rec->sid);
		store_command(st, store_on_reply, "EXPIRE", "EXPIRE %s{%s}:sessions %d",
		    st->prefix, rec->user, st->ttl);
		if (live && store_link_ok(&st->cmd))
			live->keyed = 1;
	}
	free(key);
}

void
store_session_forget(struct store *st, const char *user, const char *sid)
{
	struct strmap_entry *e;

	if (!st->redis)
		return;
	if ((e = strmap_find(&st->live, sid))) {
		free(e->v.ptr);
		strmap_del(&st->live, sid);
	}
	if (!store_link_ok(&st->cmd)) {
		st->stats.errors++;	/* dropped; the key expires on its own */
		return;
	}
	store_command(st, store_on_reply, "DEL", "DEL %s{%s}:session:%s",
	    st->prefix, user, sid);
	store_command(st, store_on_reply, "SREM", "SREM %s{%s}:sessions %s",
	    st->prefix, user, sid);
}

/* A stream entry's reply: an error (Redis < 5, a key of another type) is
 * counted and logged once; traces and events must not start an outage. */
static void
store_on_stream_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct store_link *link = ac->data;
	static int warned;

	(void)privdata;
	if (!r || !link || r->type != REDIS_REPLY_ERROR)
		return;
	link->st->stats.errors++;
	if (!warned) {
		warned = 1;
		log_warning("redis %s: XADD failed: %.*s (further failures not logged)",
		    link->st->where, (int)(r->len > 200 ? 200 : r->len), r->str);
	}
}

void
store_stream_add(struct store *st, const char *name, size_t maxlen, const char *const *fields,
    size_t nfields)
{
	const char *argv[6 + 2 * 16];
	char *key, max[24];
	size_t argc = 0;

	if (!st || !st->redis || nfields == 0 || nfields > 16)
		return;
	if (!store_link_ok(&st->cmd)) {
		st->stats.errors++;	/* dropped */
		return;
	}
	if (!(key = store_strf("%s%s", st->prefix, name))) {
		st->stats.errors++;
		return;
	}
	snprintf(max, sizeof max, "%zu", maxlen);
	argv[argc++] = "XADD";
	argv[argc++] = key;
	argv[argc++] = "MAXLEN";
	argv[argc++] = "~";
	argv[argc++] = max;
	argv[argc++] = "*";
	for (size_t i = 0; i < 2 * nfields; i++)
		argv[argc++] = fields[i];
	if (redisAsyncCommandArgv(st->cmd.ac, store_on_stream_reply, NULL, (int)argc, argv, NULL)
	    != REDIS_OK)
		store_lost(st, "command", "XADD");
	free(key);
}

uint64_t
store_bump(struct store *st, struct store_user *u, const char *mailbox, void *except,
    const char *detail)
{
	if (!u)
		return 0;
	/* Published first: notifying may free u. */
	store_publish(st, u->name, mailbox, detail);
	return store_changed(st, u, mailbox, except, detail);
}

int
store_notify_local(struct store *st, const char *user, const char *mailbox, const char *detail)
{
	struct strmap_entry *e = strmap_find(&st->users, user);
	int local = e ? (int)((struct store_user *)e->v.ptr)->n : 0;

	if (e == NULL)
		return 0;
	if (mailbox[0] == '\0')
		store_changed_all(st, e->v.ptr, detail);
	else
		store_changed(st, e->v.ptr, mailbox, NULL, detail);
	return local;
}

int
store_notify_change(struct store *st, const char *user, const char *mailbox, const char *detail)
{
	store_publish(st, user, mailbox, detail);
	return store_notify_local(st, user, mailbox, detail);
}

struct store_value_req {
	store_value_fn fn;
	char user[];
};

static void
store_on_value(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct store_value_req *q = privdata;
	const redisReply *r = reply;

	/* A link given up (ac->data NULL) answers NULL: the caller asks elsewhere. */
	q->fn(q->user, ac->data != NULL && r != NULL && r->type == REDIS_REPLY_STRING ? r->str :
	    NULL);
	free(q);
}

void
store_user_value_get(struct store *st, const char *user, const char *name, store_value_fn fn)
{
	struct store_value_req *q;

	if (!st->redis || !store_link_ok(&st->cmd) || strpbrk(user, "{}") ||
	    (q = malloc(sizeof(*q) + strlen(user) + 1)) == NULL) {
		fn(user, NULL);
		return;
	}
	q->fn = fn;
	strcpy(q->user, user);
	if (redisAsyncCommand(st->cmd.ac, store_on_value, q, "GET %s{%s}:%s", st->prefix, user,
	    name) != REDIS_OK) {
		free(q);
		store_lost(st, "command", "GET");
		fn(user, NULL);
	}
}

void
store_user_value_put(struct store *st, const char *user, const char *name, const char *value,
    int ttl)
{
	if (!st->redis || !store_link_ok(&st->cmd) || strpbrk(user, "{}"))
		return;
	store_command(st, store_on_reply, "SET", "SET %s{%s}:%s %s EX %d", st->prefix, user, name,
	    value, ttl);
}

uint64_t
store_epoch(const struct store *st)
{
	return st->epoch;
}

void
store_get_stats(const struct store *st, struct store_stats *out)
{
	if (st == NULL) {
		memset(out, 0, sizeof(*out));
		return;
	}
	*out = st->stats;
	out->redis = st->redis;
	out->connected = st->cmd.up;
}

/* The instances registry, P + "instances": a hash of instance ->
 * "<admin address>\t<pid>\t<started>\t<refreshed>" (unix seconds), so that
 * imapfresh-ctl finds every admin endpoint. The caller refreshes it
 * periodically (a killed instance's entry goes stale, never away); while
 * Redis is down writes are skipped, not counted as errors: the entry is
 * remembered and written again as soon as Redis is back (store_link_up()).
 * up = 0 deletes the entry (clean shutdown). */
static void
store_register_write(struct store *st)
{
	char value[512];

	if (!st->reg_admin || !store_link_ok(&st->cmd))
		return;
	snprintf(value, sizeof value, "%s\t%ld\t%lld\t%lld", st->reg_admin, (long)getpid(),
	    (long long)st->reg_started, (long long)time(NULL));
	store_command(st, store_on_reply, "HSET", "HSET %sinstances %s %s", st->prefix,
	    st->instance, value);
}

void
store_register_instance(struct store *st, const char *admin_address, int64_t started, int up)
{
	if (!st->redis)
		return;
	/* Remembered even while Redis is down: regaining it writes the entry. */
	if (!up) {
		free(st->reg_admin);
		st->reg_admin = NULL;
	} else if (!st->reg_admin || strcmp(st->reg_admin, admin_address) != 0) {
		free(st->reg_admin);
		st->reg_admin = strdup(admin_address);
	}
	st->reg_started = started;
	if (!store_link_ok(&st->cmd))
		return;
	if (!up) {
		store_command(st, store_on_reply, "HDEL", "HDEL %sinstances %s", st->prefix,
		    st->instance);
		return;
	}
	store_register_write(st);
}

static void
store_on_instances(redisAsyncContext *ac, void *reply, void *privdata)
{
	store_instances_fn *fn = privdata;
	const redisReply *r = reply;
	const char **kv = NULL;
	size_t i, n = 0;

	if (ac->data != NULL && r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
	    (kv = calloc(r->elements, sizeof(*kv))) != NULL) {
		for (i = 0; i < r->elements; i++)
			if (r->element[i]->type == REDIS_REPLY_STRING)
				kv[n++] = r->element[i]->str;
		n -= n % 2;
	}
	(*fn)(n ? kv : NULL, n);
	free(kv);
	free(fn);
}

void
store_instances_get(struct store *st, store_instances_fn fn)
{
	store_instances_fn *q;

	if (st == NULL || !st->redis || !store_link_ok(&st->cmd) ||
	    (q = malloc(sizeof(*q))) == NULL) {
		fn(NULL, 0);
		return;
	}
	*q = fn;
	if (redisAsyncCommand(st->cmd.ac, store_on_instances, q, "HGETALL %sinstances",
	    st->prefix) != REDIS_OK) {
		free(q);
		store_lost(st, "command", "HGETALL");
		fn(NULL, 0);
	}
}

void
store_upgrade_overlap(struct store *st, int on, int handed_over)
{
	st->hear_own = on;
	if (handed_over) {
		free(st->reg_admin);	/* the entry is the new process's now */
		st->reg_admin = NULL;
	}
}

void
store_set_up_callback(struct store *st, store_up_fn fn, void *arg)
{
	st->up_fn = fn;
	st->up_arg = arg;
}

void
store_set_failover_callback(struct store *st, store_failover_fn fn, void *arg)
{
	st->failover_fn = fn;
	st->failover_arg = arg;
}

void
store_set_listening_callback(struct store *st, store_listening_fn fn)
{
	st->listening_fn = fn;
}

/* The instance's name: instance_id, or the host name. */
static void
store_instance(struct store *st, const struct config *cfg)
{
	if (cfg->instance_id[0]) {
		snprintf(st->instance, sizeof st->instance, "%s", cfg->instance_id);
		return;
	}
	if (gethostname(st->instance, sizeof st->instance - 1) < 0 || !st->instance[0])
		snprintf(st->instance, sizeof st->instance, "localhost");
	st->instance[sizeof st->instance - 1] = '\0';
}

/* The sentinels' own credentials (sentinel_user, sentinel_password), not the
 * master's from the URL. */
static void
store_sentinel_auth(struct store *st, const struct config *cfg)
{
	struct config_redis_auth sauth;

	if (!st->sentinel)
		return;
	memset(&sauth, 0, sizeof sauth);
	snprintf(sauth.user, sizeof sauth.user, "%s", cfg->sentinel_user);
	snprintf(sauth.password, sizeof sauth.password, "%s", cfg->sentinel_password);
	sentinel_set_auth(st->sentinel, &sauth);
	explicit_bzero(&sauth, sizeof sauth);
}

static int
store_setup_redis(struct store *st, const struct config *cfg, char *err, size_t errlen)
{
	struct timeval tick = { cfg->state_ttl / 3 > 0 ? cfg->state_ttl / 3 : 1, 0 };
	struct sentinel_url su;

	config_redact_url(cfg->state, st->shown, sizeof st->shown);
	if (sentinel_parse_url(cfg->state, &su) == 0) {
		memset(&st->url, 0, sizeof st->url);
		st->url.db = su.db;
		st->url.auth = su.auth;
		snprintf(st->master_name, sizeof st->master_name, "%s", su.master);
	} else if (config_parse_redis(cfg->state, &st->url) < 0) {
		snprintf(err, errlen, "state: not memory or a Redis URL: %s", st->shown);
		return -1;
	}
	if (cfg->state_password[0])
		snprintf(st->url.auth.password, sizeof st->url.auth.password, "%s",
		    cfg->state_password);
	if (!st->base || cfg->state_ttl <= 0 || !cfg->redis_prefix[0]) {
		snprintf(err, errlen, "store: needs an event base, a state_ttl and a redis_prefix");
		return -1;
	}
	st->redis = 1;
	st->ttl = cfg->state_ttl;
	st->publish_global = cfg->redis_publish_global;
	st->backoff = STORE_BACKOFF_FIRST;
	if (st->master_name[0])
		snprintf(st->where, sizeof st->where, "(sentinel %s)", st->master_name);
	else if (st->url.path[0])
		snprintf(st->where, sizeof st->where, "%s", st->url.path);
	else
		snprintf(st->where, sizeof st->where, strchr(st->url.host, ':') ? "[%s]:%s" : "%s:%s",
		    st->url.host, st->url.port);
	st->cmd = (struct store_link){ .st = st, .name = "command link" };
	st->sub = (struct store_link){ .st = st, .name = "subscriber link" };
	st->prefix = strdup(cfg->redis_prefix);
	st->channel = store_strf("%schanges", cfg->redis_prefix);
	st->retry = evtimer_new(st->base, store_on_retry, st);
	st->tick = event_new(st->base, -1, EV_PERSIST, store_on_tick, st);
	if (!st->prefix || !st->channel || !st->retry || !st->tick || event_add(st->tick, &tick) < 0) {
		snprintf(err, errlen, "store: out of memory");
		return -1;
	}
	if (st->master_name[0] &&
	    !(st->sentinel = sentinel_new(st->base, &su, store_on_master, store_on_switch, st))) {
		snprintf(err, errlen, "store: out of memory");
		return -1;
	}
	store_sentinel_auth(st, cfg);
	store_find_master(st);
	return 0;
}

struct store *
store_new(struct event_base *base, const struct config *cfg, store_notify_fn notify,
    char *err, size_t errlen)
{
	struct store *st = calloc(1, sizeof *st);

	if (!st) {
		snprintf(err, errlen, "store: out of memory");
		return NULL;
	}
	st->base = base;
	st->notify = notify;
	store_instance(st, cfg);
	if (strcmp(cfg->state, "memory") != 0 && store_setup_redis(st, cfg, err, errlen) < 0) {
		store_free(st);
		return NULL;
	}
	return st;
}

/* Hand what is queued on the command link to the kernel, as far as it takes
 * it without blocking, so that a last DEL or SREM is not lost at exit. */
static void
store_flush(struct store *st)
{
	redisAsyncContext *ac = st->cmd.ac;
	int done = 0, tries;

	if (!ac || !(ac->c.flags & REDIS_CONNECTED))
		return;
	for (tries = 0; tries < 16 && !done; tries++)
		if (redisBufferWrite(&ac->c, &done) != REDIS_OK)
			break;
}

void
store_set_auth(struct store *st, const struct config *cfg)
{
	struct config_redis r;
	struct sentinel_url su;

	if (!st || !st->redis)
		return;
	if (sentinel_parse_url(cfg->state, &su) == 0)
		r.auth = su.auth;
	else if (config_parse_redis(cfg->state, &r) < 0)
		return;
	if (cfg->state_password[0])
		snprintf(r.auth.password, sizeof r.auth.password, "%s", cfg->state_password);
	st->url.auth = r.auth;
	config_redact_url(cfg->state, st->shown, sizeof st->shown);
	store_sentinel_auth(st, cfg);
	explicit_bzero(&r, sizeof r);
	explicit_bzero(&su, sizeof su);
}

void
store_free(struct store *st)
{
	if (!st)
		return;
	store_flush(st);
	store_teardown(st);	/* callbacks run now see NULL replies and unowned contexts */
	sentinel_free(st->sentinel);
	if (st->retry)
		event_free(st->retry);
	if (st->tick)
		event_free(st->tick);
	strmap_clear(&st->live, free);
	strmap_clear(&st->users, store_user_destroy);
	strmap_clear(&st->inflight, NULL);
	free(st->prefix);
	free(st->channel);
	free(st->reg_admin);
	explicit_bzero(&st->url.auth, sizeof st->url.auth);
	free(st);
}
