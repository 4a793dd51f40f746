/* feed: the backend's own change feed (WildDuck's wd_events on its Redis), turned into mailbox changes of the users with sessions here. */
#ifndef FEED_H
#define FEED_H

#include <stdint.h>

struct server;
struct feed;

struct feed_stats {
	int configured;			/* backend_events is not none */
	int connected;			/* subscribed to the backend's channel */
	uint64_t events;		/* messages received on it */
	uint64_t matched;		/* ... about a user with sessions here */
	uint64_t lookups, lookup_failures;	/* login name -> backend user id */
	uint64_t losses;		/* times the feed was lost */
};

/* NULL without error when backend_events = none; NULL with err set on a
 * configuration it cannot use. Connects asynchronously and keeps retrying. */
struct feed *feed_new(struct server *srv, char *err, size_t errlen);
void feed_free(struct feed *f);

/* backend_redis's credentials from cfg (a reload's), used from the next
 * connection on. */
struct config;
void feed_set_auth(struct feed *f, const struct config *cfg);

/* A session authenticated as user: its backend id is looked up (async, from
 * the backend's API) unless known and fresh. Never waits. */
void feed_user_joined(struct feed *f, const char *user);

/* The user's backend id as resolved, or NULL. */
const char *feed_backend_id(const struct feed *f, const char *user);

/* Grows whenever changes may have been missed (the feed lost, or regained):
 * sessions synced under an older epoch are possibly stale. 0 without a feed. */
uint64_t feed_epoch(const struct feed *f);

void feed_get_stats(const struct feed *f, struct feed_stats *out);

/* One wd_events message: the 24-hex user id it is about, into id[25];
 * 0, or -1 when it is not such a message. */
int feed_parse_event(const char *msg, size_t len, char id[25]);

#endif
