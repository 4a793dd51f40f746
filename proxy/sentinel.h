/* sentinel: finds the Redis master through Redis Sentinel and tells when it fails over. */
#ifndef SENTINEL_H
#define SENTINEL_H

#include <event2/event.h>

#include "config.h"

#define SENTINEL_MAX 16		/* sentinels in one URL */

/* redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db],
 * port 26379 by default. */
struct sentinel_url {
	struct config_addr addr[SENTINEL_MAX];
	int n;
	char master[128];	/* the name the sentinels monitor */
	int db;			/* default 0 */
	struct config_redis_auth auth;	/* the master's credentials, not the sentinels' */
};

/* Parse a redis-sentinel:// URL; -1 if it is not one (out may be NULL). */
int sentinel_parse_url(const char *url, struct sentinel_url *out);

struct sentinel;

/* The master's address (host, port), or NULL host and why when no sentinel
 * named one. Called once per sentinel_discover(). */
typedef void (*sentinel_found_fn)(void *arg, const char *host, const char *port, const char *why);
/* A sentinel announced a failover (+switch-master): the master is now host:port. */
typedef void (*sentinel_switch_fn)(void *arg, const char *host, const char *port);

/* Watches the sentinels for failovers from now on (a SUBSCRIBE on one of
 * them, moving to the next one when it is lost). Never blocks but for
 * resolving a host name in the URL; NULL when out of memory. */
struct sentinel *sentinel_new(struct event_base *base, const struct sentinel_url *url,
    sentinel_found_fn found, sentinel_switch_fn switched, void *arg);
/* The sentinels' own credentials (sentinel_user, sentinel_password), sent
 * first on every connection to a sentinel from now on. */
void sentinel_set_auth(struct sentinel *sn, const struct config_redis_auth *auth);
/* Ask the sentinels, one after the other, where the master is; found() gets
 * the first answer. Asynchronous; while a discovery runs, another one is
 * not started. */
void sentinel_discover(struct sentinel *sn);
/* Callbacks are not called from here on. */
void sentinel_free(struct sentinel *sn);

#endif
