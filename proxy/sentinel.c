/* sentinel: finds the Redis master through Redis Sentinel and tells when it fails over. */

/*
 * Discovery: SENTINEL get-master-addr-by-name <master> to the sentinels in
 * the URL's order, until one names an address, starting with the one after
 * the sentinel that answered last: the store asks again when the address
 * named was wrong (not a master), and a sentinel that has not heard of a
 * failover yet must not be asked first again. A sentinel that cannot be
 * reached, answers an error, does not know the name, or gives no answer
 * within SENTINEL_QUERY_TIMEOUT seconds is skipped (hiredis 0.14 has no
 * timeouts of its own on an async context: a timer gives the connection
 * up). One connection per discovery: they are rare (start, lost link,
 * failed command).
 *
 * Watch: one connection SUBSCRIBEd to +switch-master on one sentinel. Every
 * sentinel publishes "<master> <old ip> <old port> <new ip> <new port>" once
 * it learns of a failover, so one is enough; when it is lost, or does not
 * confirm the SUBSCRIBE within SENTINEL_QUERY_TIMEOUT, the next one is
 * watched, after 1 s, 2 s, 4 s ... 30 s. A failover announced while no
 * sentinel is watched is still noticed by the store: the old master is gone
 * or refuses writes (READONLY), and the store then asks again.
 *
 * Sentinels that require a password (sentinel_password, sentinel_user) get
 * AUTH first on every connection; a refusal fails that sentinel as an
 * error answer does. The master's own credentials are the store's.
 *
 * What a sentinel says is trusted no further than the store's ROLE check
 * on the address it names.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>

#include "log.h"
#include "sentinel.h"

#define SENTINEL_DEFAULT_PORT "26379"
#define SENTINEL_QUERY_TIMEOUT 2	/* seconds one sentinel has to answer */
#define SENTINEL_BACKOFF_MAX 30
#define SENTINEL_CHANNEL "+switch-master"

struct sentinel {
	struct event_base *base;
	struct sentinel_url url;
	sentinel_found_fn found;
	sentinel_switch_fn switched;
	void *arg;
	struct config_redis_auth auth;	/* the sentinels' own (sentinel_password) */

	/* discovery */
	redisAsyncContext *query;	/* NULL between sentinels and discoveries */
	struct event *query_timer;
	int querying;		/* a discovery is running */
	int next;		/* the sentinel asked now, or first next time */
	int tried;		/* sentinels given up in this discovery */
	char why[300];		/* the last one's failure */

	/* watch */
	redisAsyncContext *watch;
	struct event *watch_timer;
	int watched;		/* index of the sentinel watched (or tried next) */
	int subscribed;		/* it confirmed the SUBSCRIBE */
	int backoff;		/* seconds before watching the next one */
};

static void sentinel_ask(struct sentinel *sn);
static void sentinel_watch(struct sentinel *sn);

int
sentinel_parse_url(const char *url, struct sentinel_url *out)
{
	static const char scheme[] = "redis-sentinel://";
	struct sentinel_url u;
	const char *p, *end, *comma, *name;
	char item[300];
	size_t len;
	unsigned long db = 0;
	char *dbend;

	memset(&u, 0, sizeof(u));
	if (strncmp(url, scheme, sizeof(scheme) - 1) != 0)
		return -1;
	if (config_url_userinfo(url + sizeof(scheme) - 1, &u.auth, &p) != NULL)
		return -1;
	if ((end = strchr(p, '/')) == NULL)
		return -1;		/* the master's name is required */
	while (p < end) {
		comma = memchr(p, ',', (size_t)(end - p));
		len = (size_t)((comma ? comma : end) - p);
		if (len == 0 || len >= sizeof(item) || u.n == SENTINEL_MAX)
			return -1;
		memcpy(item, p, len);
		item[len] = '\0';
		if (config_parse_addr(item, SENTINEL_DEFAULT_PORT, &u.addr[u.n]) < 0)
			return -1;
		u.n++;
		p = comma ? comma + 1 : end;
		if (comma && p == end)
			return -1;	/* a trailing comma */
	}
	if (u.n == 0)
		return -1;
	name = end + 1;
	len = strcspn(name, "/");
	if (len == 0 || len >= sizeof(u.master))
		return -1;
	for (size_t i = 0; i < len; i++)
		if (!isgraph((unsigned char)name[i]))
			return -1;	/* it goes into a command and a space-separated message */
	memcpy(u.master, name, len);
	/* "/db" as in redis://; "/" alone is db 0. */
	if (name[len] == '/' && name[len + 1]) {
		if (!isdigit((unsigned char)name[len + 1]) || strlen(name + len + 1) > 9)
			return -1;
		db = strtoul(name + len + 1, &dbend, 10);
		if (*dbend)
			return -1;
	}
	u.db = (int)db;
	if (out)
		*out = u;
	return 0;
}

/* host:port of sentinel i, for the log. */
static const char *
sentinel_where(const struct sentinel *sn, int i, char *buf, size_t len)
{
	return config_fmt_addr(&sn->url.addr[i], buf, len);
}

/* A context of ours given up: its callbacks, run while hiredis frees it
 * (now, or once the callback we are in returns), see data NULL. free_it = 0
 * when hiredis frees it itself (connect failure, disconnection). */
static void
sentinel_drop(redisAsyncContext **slot, int free_it)
{
	redisAsyncContext *ac = *slot;

	if (ac == NULL)
		return;
	*slot = NULL;
	ac->data = NULL;
	if (free_it)
		redisAsyncFree(ac);
}

static void sentinel_query_failed(struct sentinel *sn, const char *why, int free_it);
static void sentinel_watch_lost(struct sentinel *sn, const char *why, int free_it);

/* AUTH's answer, on either connection: a refusal fails it as an error
 * answer would (the next sentinel is tried). */
static void
sentinel_on_auth(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct sentinel *sn = ac->data;
	const redisReply *r = reply;
	char why[400];

	(void)privdata;
	if (sn == NULL || r == NULL || r->type != REDIS_REPLY_ERROR ||
	    config_auth_unneeded(r->str))
		return;
	snprintf(why, sizeof(why), "AUTH%s%s refused (sentinel_user, sentinel_password): %.150s",
	    sn->auth.user[0] ? " as " : "", sn->auth.user, r->str);
	if (ac == sn->query)
		sentinel_query_failed(sn, why, 1);
	else if (ac == sn->watch)
		sentinel_watch_lost(sn, why, 1);
}

/* A connection to sentinel i with our callbacks; NULL with why set. */
static redisAsyncContext *
sentinel_open(struct sentinel *sn, int i, redisConnectCallback *on_connect,
    redisDisconnectCallback *on_disconnect, char *why, size_t whylen)
{
	const struct config_addr *a = &sn->url.addr[i];
	redisAsyncContext *ac = redisAsyncConnect(a->host, atoi(a->port));
	const char *argv[3];
	size_t argvlen[3];
	int argc;

	if (ac == NULL || ac->err) {
		snprintf(why, whylen, "%s", ac ? ac->c.errstr : "out of memory");
		if (ac)
			redisAsyncFree(ac);
		return NULL;
	}
	if (redisLibeventAttach(ac, sn->base) != REDIS_OK) {
		snprintf(why, whylen, "cannot attach to the event loop");
		redisAsyncFree(ac);
		return NULL;
	}
	ac->data = sn;
	redisAsyncSetConnectCallback(ac, on_connect);
	redisAsyncSetDisconnectCallback(ac, on_disconnect);
	/* Before anything else, when the sentinels require a password. */
	if ((argc = config_auth_argv(&sn->auth, argv, argvlen)) > 0 &&
	    redisAsyncCommandArgv(ac, sentinel_on_auth, NULL, argc, argv, argvlen) != REDIS_OK) {
		snprintf(why, whylen, "cannot queue AUTH");
		ac->data = NULL;
		redisAsyncFree(ac);
		return NULL;
	}
	return ac;
}

/* --- discovery --- */

/* The discovery ends: with an address, or none (every sentinel failed). */
static void
sentinel_done(struct sentinel *sn, const char *host, const char *port)
{
	evtimer_del(sn->query_timer);
	sentinel_drop(&sn->query, 1);
	sn->querying = 0;
	sn->found(sn->arg, host, port, host ? NULL : sn->why);
}

/* The sentinel asked now failed: ask the next one. */
static void
sentinel_query_failed(struct sentinel *sn, const char *why, int free_it)
{
	char where[300];

	evtimer_del(sn->query_timer);
	sentinel_drop(&sn->query, free_it);
	snprintf(sn->why, sizeof(sn->why), "sentinel %s: %s",
	    sentinel_where(sn, sn->next, where, sizeof(where)), why);
	log_info("redis sentinel %s: %s", sn->url.master, sn->why);
	sn->tried++;
	sn->next = (sn->next + 1) % sn->url.n;
	sentinel_ask(sn);
}

static void
sentinel_on_master(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct sentinel *sn = ac->data;
	const redisReply *r = reply;
	char host[256], port[16], why[300];

	(void)privdata;
	if (sn == NULL || r == NULL)	/* given up */
		return;
	if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
	    r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING &&
	    r->element[0]->len < sizeof(host) && r->element[1]->len < sizeof(port)) {
		snprintf(host, sizeof(host), "%s", r->element[0]->str);
		snprintf(port, sizeof(port), "%s", r->element[1]->str);
		sn->next = (sn->next + 1) % sn->url.n;
		sentinel_done(sn, host, port);
		return;
	}
	if (r->type == REDIS_REPLY_ERROR)
		snprintf(why, sizeof(why), "%.200s", r->str);
	else if (r->type == REDIS_REPLY_NIL)
		snprintf(why, sizeof(why), "monitors no master named %s", sn->url.master);
	else
		snprintf(why, sizeof(why), "unexpected answer to SENTINEL get-master-addr-by-name");
	sentinel_query_failed(sn, why, 1);
}

static void
sentinel_on_query_connect(const redisAsyncContext *ac, int status)
{
	struct sentinel *sn = ac->data;

	if (status == REDIS_OK || sn == NULL)
		return;
	/* hiredis frees the context when this returns. */
	sentinel_query_failed(sn, ac->c.errstr[0] ? ac->c.errstr : "cannot connect", 0);
}

static void
sentinel_on_query_disconnect(const redisAsyncContext *ac, int status)
{
	struct sentinel *sn = ac->data;

	(void)status;
	if (sn == NULL)
		return;
	sentinel_query_failed(sn, ac->c.errstr[0] ? ac->c.errstr : "connection closed", 0);
}

static void
sentinel_on_query_timeout(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	sentinel_query_failed(arg, "no answer in time", 1);
}

/* Ask sentinel sn->next, or end the discovery when every one was tried. */
static void
sentinel_ask(struct sentinel *sn)
{
	struct timeval tv = { SENTINEL_QUERY_TIMEOUT, 0 };
	char why[200];

	if (sn->tried >= sn->url.n) {
		sentinel_done(sn, NULL, NULL);
		return;
	}
	sn->query = sentinel_open(sn, sn->next, sentinel_on_query_connect,
	    sentinel_on_query_disconnect, why, sizeof(why));
	if (sn->query == NULL) {
		sentinel_query_failed(sn, why, 0);
		return;
	}
	if (redisAsyncCommand(sn->query, sentinel_on_master, NULL,
	    "SENTINEL get-master-addr-by-name %s", sn->url.master) != REDIS_OK) {
		sentinel_query_failed(sn, "cannot queue the command", 1);
		return;
	}
	evtimer_add(sn->query_timer, &tv);
}

void
sentinel_discover(struct sentinel *sn)
{
	if (sn->querying)
		return;
	sn->querying = 1;
	sn->tried = 0;
	sn->why[0] = '\0';
	sentinel_ask(sn);
}

/* --- watch --- */

static void
sentinel_watch_lost(struct sentinel *sn, const char *why, int free_it)
{
	struct timeval tv = { sn->backoff, 0 };
	char where[300];

	sentinel_drop(&sn->watch, free_it);
	sn->subscribed = 0;
	evtimer_del(sn->watch_timer);
	log_info("redis sentinel %s: watching sentinel %s for failovers: %s; trying the next "
	    "sentinel in %d s", sn->url.master, sentinel_where(sn, sn->watched, where, sizeof(where)),
	    why, sn->backoff);
	sn->watched = (sn->watched + 1) % sn->url.n;
	evtimer_add(sn->watch_timer, &tv);
	sn->backoff = sn->backoff * 2 > SENTINEL_BACKOFF_MAX ? SENTINEL_BACKOFF_MAX : sn->backoff * 2;
}

/* "<master> <old ip> <old port> <new ip> <new port>" */
static void
sentinel_heard(struct sentinel *sn, const char *msg)
{
	char name[128], oldip[256], oldport[16], ip[256], port[16];

	if (sscanf(msg, "%127s %255s %15s %255s %15s", name, oldip, oldport, ip, port) != 5) {
		log_debug("redis sentinel: malformed %s message ignored", SENTINEL_CHANNEL);
		return;
	}
	if (strcmp(name, sn->url.master) != 0)
		return;		/* another master the sentinels watch */
	log_notice("redis sentinel %s: failover announced: master %s:%s -> %s:%s", sn->url.master,
	    oldip, oldport, ip, port);
	sn->switched(sn->arg, ip, port);
}

static void
sentinel_on_watch(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct sentinel *sn = ac->data;
	const redisReply *r = reply;
	char where[300];

	(void)privdata;
	if (sn == NULL || r == NULL)
		return;
	if (r->type == REDIS_REPLY_ERROR) {
		sentinel_watch_lost(sn, r->str, 1);
		return;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
	    r->element[0]->type != REDIS_REPLY_STRING)
		return;
	if (strcmp(r->element[0]->str, "subscribe") == 0) {
		sn->subscribed = 1;
		sn->backoff = 1;
		evtimer_del(sn->watch_timer);
		log_debug("redis sentinel %s: watching sentinel %s for failovers", sn->url.master,
		    sentinel_where(sn, sn->watched, where, sizeof(where)));
	} else if (strcmp(r->element[0]->str, "message") == 0 &&
	    r->element[2]->type == REDIS_REPLY_STRING) {
		sentinel_heard(sn, r->element[2]->str);
	}
}

static void
sentinel_on_watch_connect(const redisAsyncContext *ac, int status)
{
	struct sentinel *sn = ac->data;

	if (status == REDIS_OK || sn == NULL)
		return;
	sentinel_watch_lost(sn, ac->c.errstr[0] ? ac->c.errstr : "cannot connect", 0);
}

static void
sentinel_on_watch_disconnect(const redisAsyncContext *ac, int status)
{
	struct sentinel *sn = ac->data;

	(void)status;
	if (sn == NULL)
		return;
	sentinel_watch_lost(sn, ac->c.errstr[0] ? ac->c.errstr : "connection closed", 0);
}

static void
sentinel_watch(struct sentinel *sn)
{
	struct timeval tv = { SENTINEL_QUERY_TIMEOUT, 0 };
	char why[200];

	sn->watch = sentinel_open(sn, sn->watched, sentinel_on_watch_connect,
	    sentinel_on_watch_disconnect, why, sizeof(why));
	if (sn->watch == NULL) {
		sentinel_watch_lost(sn, why, 0);
		return;
	}
	if (redisAsyncCommand(sn->watch, sentinel_on_watch, NULL, "SUBSCRIBE %s",
	    SENTINEL_CHANNEL) != REDIS_OK) {
		sentinel_watch_lost(sn, "cannot queue SUBSCRIBE", 1);
		return;
	}
	evtimer_add(sn->watch_timer, &tv);	/* until it confirms */
}

/* Time to watch the next sentinel, or the one watched did not confirm its
 * SUBSCRIBE in time. */
static void
sentinel_on_watch_timer(evutil_socket_t fd, short what, void *arg)
{
	struct sentinel *sn = arg;

	(void)fd;
	(void)what;
	if (sn->watch == NULL)
		sentinel_watch(sn);
	else if (!sn->subscribed)
		sentinel_watch_lost(sn, "no answer to SUBSCRIBE in time", 1);
}

struct sentinel *
sentinel_new(struct event_base *base, const struct sentinel_url *url, sentinel_found_fn found,
    sentinel_switch_fn switched, void *arg)
{
	struct sentinel *sn = calloc(1, sizeof(*sn));

	if (sn == NULL)
		return NULL;
	sn->base = base;
	sn->url = *url;
	sn->found = found;
	sn->switched = switched;
	sn->arg = arg;
	sn->backoff = 1;
	sn->query_timer = evtimer_new(base, sentinel_on_query_timeout, sn);
	sn->watch_timer = evtimer_new(base, sentinel_on_watch_timer, sn);
	if (sn->query_timer == NULL || sn->watch_timer == NULL) {
		sentinel_free(sn);
		return NULL;
	}
	sentinel_watch(sn);
	return sn;
}

void
sentinel_set_auth(struct sentinel *sn, const struct config_redis_auth *auth)
{
	sn->auth = *auth;
}

void
sentinel_free(struct sentinel *sn)
{
	if (sn == NULL)
		return;
	explicit_bzero(&sn->auth, sizeof(sn->auth));
	sentinel_drop(&sn->query, 1);
	sentinel_drop(&sn->watch, 1);
	if (sn->query_timer)
		event_free(sn->query_timer);
	if (sn->watch_timer)
		event_free(sn->watch_timer);
	free(sn);
}
