/* store: per-user mailbox generations and per-session state, in memory or in a Redis shared by instances. */
#ifndef STORE_H
#define STORE_H

#include <stddef.h>
#include <stdint.h>
#include <event2/event.h>

#include "config.h"

struct store;
struct store_user;	/* one user with live sessions on this instance */

/* Called for every member of a user when one of the user's mailboxes changed
 * (through this instance, or another one sharing the Redis: an instance
 * hears of the users it has sessions of only, see store.c). It may make
 * members leave, itself or others, even the last one: those not notified yet
 * are skipped. mailbox is valid during the call only; "" is every mailbox. */
typedef void (*store_notify_fn)(void *member, const char *mailbox);

/* Connects asynchronously when cfg->state is a redis:// URL (or finds the
 * master through the sentinels of a redis-sentinel:// URL); never blocks
 * (but for resolving a host name in the URL), and succeeds with Redis down:
 * it keeps retrying. NULL with err set on a bad configuration. The key
 * schema and the reconnection policy are described at the top of store.c. */
struct store *store_new(struct event_base *base, const struct config *cfg, store_notify_fn notify,
    char *err, size_t errlen);
/* Called each time Redis is (re)gained, the first connection included: both
 * links up, the epoch grown. Whatever was saved while Redis was away was
 * dropped, and a restarted Redis may have lost every key, so the caller
 * writes the state of every live session again (store_session_save()) from
 * here. The store itself rewrites the instances registry entry. */
typedef void (*store_up_fn)(void *arg);
void store_set_up_callback(struct store *st, store_up_fn fn, void *arg);

/* An upgrade (upgrade.c): the old and the new process share the instance
 * name for a while. With on, changes published under it are heard too: the
 * other process's, and ours once more (a spare resync, harmless). The
 * handed-over old process no longer writes the instances registry entry. */
void store_upgrade_overlap(struct store *st, int on, int handed_over);

/* With state = redis-sentinel://, the sentinels named a new master (a
 * failover): from and to are "host:port". Called once the new master is
 * reached, after the up callback. */
typedef void (*store_failover_fn)(void *arg, const char *from, const char *to);
void store_set_failover_callback(struct store *st, store_failover_fn fn, void *arg);

/* Called for every member of a user once store_user_listening() may have
 * become true for it (the first read of its generations came back, or
 * Redis was lost: the epoch covers an outage). It must not make members
 * leave: defer whatever it does. */
typedef void (*store_listening_fn)(void *member);
void store_set_listening_callback(struct store *st, store_listening_fn fn);

/* Before event_base_free(). What is queued for Redis is written out as far as
 * it goes without blocking; users still joined are freed with the store. */
void store_free(struct store *st);

/* A session (member, opaque here) authenticated as user. */
struct store_user *store_user_join(struct store *st, const char *user, void *member);
void store_user_leave(struct store *st, struct store_user *u, void *member);
const char *store_user_name(const struct store_user *u);

/* What the user's last change was ("UID MOVE to Archive", "notify from ...",
 * "WildDuck event"...), or NULL: the reason a resync gives. */
const char *store_user_last_change(const struct store_user *u);

/* This instance's generation counter for one of the user's mailboxes: it
 * only grows, with every change seen or heard of. No I/O: the hot path. */
uint64_t store_gen(struct store_user *u, const char *mailbox);

/* Will this instance learn of every change of u's made from now on? Not
 * while u's channel is being subscribed and the first generations read has
 * not come back (a change counted before that read and published before the
 * subscription is neither heard nor seen as a difference), nor for a user
 * not joined yet (NULL). Memory state, and Redis down (the epoch covers
 * that), always. */
int store_user_listening(const struct store *st, const struct store_user *u);

/* A command through this instance changed the mailbox: bump it here, notify
 * the user's other members, and (Redis) HINCRBY the shared generation and
 * PUBLISH the change for the other instances, asynchronously. except (may be
 * NULL) is the member that made the change, not notified. Returns the new
 * local generation. detail (may be NULL) is kept for the event log:
 * e.g. "MOVE from INBOX" or "COPYUID 17 5:6". */
uint64_t store_bump(struct store *st, struct store_user *u, const char *mailbox,
    void *except, const char *detail);

/* A change imapfresh did not see (a delivery, webmail, another client, told
 * through POST /notify): mailbox "" is every mailbox of the user. Counted
 * here for the user's sessions, if any, and published to the other
 * instances like a change of ours. Returns this instance's sessions of the
 * user. */
int store_notify_change(struct store *st, const char *user, const char *mailbox,
    const char *detail);

/* The same for this instance only (a feed every instance hears itself). */
int store_notify_local(struct store *st, const char *user, const char *mailbox,
    const char *detail);

/* A value kept for a user beside its keys, P{U}:<name>, with a TTL (the
 * user's id in the backend, feed.c). Async: the answer goes to fn with the
 * user's name, never a pointer the store kept; value NULL when there is
 * none (or no Redis: then fn runs at once). */
typedef void (*store_value_fn)(const char *user, const char *value);
void store_user_value_get(struct store *st, const char *user, const char *name, store_value_fn fn);
void store_user_value_put(struct store *st, const char *user, const char *name, const char *value,
    int ttl);

/* Per-session state as written to Redis (HSET, with the TTL refreshed). */
struct store_session_record {
	const char *sid;		/* unique across instances: "<instance>:<id>" */
	const char *user;
	const char *client;		/* client address */
	const char *mailbox;		/* "" when none selected */
	uint32_t uidvalidity, uidnext, count;
	uint64_t highestmodseq;
	uint64_t synced_gen;
	int64_t started, last_resync;	/* unix seconds; 0 = never */
	uint64_t resyncs, escalations, stale_detected;
	const char *view;		/* client's known UIDs as a sequence set */
	const char *backend_id;		/* the user's id in the backend (feed.c), or NULL */
};

/* Write a session's state (async, coalesced by the caller), or delete it.
 * Saved sessions' keys are kept from expiring by the store until forgotten;
 * while Redis is down, saves and forgets are dropped (stats.errors): the up
 * callback saves every live session again when Redis is back. */
void store_session_save(struct store *st, const struct store_session_record *rec);
void store_session_forget(struct store *st, const char *user, const char *sid);

/* Append an entry to the capped Redis stream P + name (XADD ... MAXLEN ~
 * maxlen * f1 v1 f2 v2 ...); fields holds nfields name/value pairs of
 * NUL-terminated strings. Async, fire and forget: a refused XADD is counted
 * (stats.errors) and logged once, but is no outage; while Redis is down the
 * entry is dropped (stats.errors). Nothing with state = memory. */
void store_stream_add(struct store *st, const char *name, size_t maxlen,
    const char *const *fields, size_t nfields);

/* Grows whenever changes may have been missed (Redis lost or regained,
 * once each per outage; also when Redis is first reached): sessions synced
 * under an older epoch are possibly stale. Constant with state = memory. */
uint64_t store_epoch(const struct store *st);

struct store_stats {
	int redis;			/* configured with Redis */
	int connected;			/* command link up */
	uint64_t errors;		/* failed commands and connections, writes dropped while down */
	uint64_t reconnects;		/* outages ended (the first connection is not one) */
	uint64_t failovers;		/* new masters reached (redis-sentinel://) */
	uint64_t published, received;	/* change notifications; received: from other instances */
	uint64_t messages;		/* change messages Redis delivered here, our own included */
	uint64_t channels;		/* users' channels subscribed (users with sessions here) */
};
/* All zero when st is NULL (no store yet). */
void store_get_stats(const struct store *st, struct store_stats *out);

/* The credentials of cfg (a reload's: the state URL's, state_password,
 * sentinel_user and sentinel_password), used from the next connection on;
 * links up stay as they are. Nothing with state = memory. */
void store_set_auth(struct store *st, const struct config *cfg);

/* Write (up) or delete this instance's entry in the instances registry
 * (P + "instances": instance -> "<admin address>\t<pid>\t<started>\t<refreshed>"),
 * for imapfresh-ctl. Async; nothing with state = memory. An entry written
 * (up) is written again whenever Redis is regained, until deleted. */
void store_register_instance(struct store *st, const char *admin_address, int64_t started, int up);

/* Read the instances registry (HGETALL; the status page's fan-out). fn gets
 * the fields and values in turn (kv[0] an instance, kv[1] its entry, ...) and
 * n, their number; kv NULL and n 0 without Redis or on a failure (then fn
 * may run before this returns). Never a pointer the store kept. */
typedef void (*store_instances_fn)(const char *const *kv, size_t n);
void store_instances_get(struct store *st, store_instances_fn fn);

#endif
