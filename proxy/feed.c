/* feed: the backend's own change feed (WildDuck's wd_events on its Redis), turned into mailbox changes of the users with sessions here. */

/*
 * WildDuck publishes every change to a user's mailboxes (delivery, API,
 * its own IMAP sessions) on its Redis, channel "wd_events":
 * {"e":"<user id>"} or {"e":"<user id>","p":{...}}, the id being the 24-hex
 * MongoDB id of the user. imapfresh subscribes, keeps a table of the login
 * names of its sessions' users and their ids (GET <backend_api>/users/
 * resolve/<name>, asynchronously after LOGIN, kept backend_id_ttl), and
 * turns an event about a known id into a change of every mailbox of that
 * user, here only: every instance has its own subscription. An event about
 * any other id costs one hash look-up.
 *
 * The feed lost (or regained) grows the feed epoch: changes may have been
 * missed meanwhile, so every session resyncs once, as for imapfresh's own
 * Redis. Reconnection after 1 s, 2 s, 4 s ... 30 s.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>

#include "feed.h"
#include "json.h"
#include "log.h"
#include "server.h"
#include "store.h"
#include "strmap.h"

#define FEED_CHANNEL "wd_events"
#define FEED_BACKOFF_MAX 30
#define FEED_HTTP_TIMEOUT 5

enum feed_lookup { FEED_UNRESOLVED, FEED_PENDING, FEED_RESOLVED, FEED_FAILED };

/* A user with sessions here (or had), in two maps: by name and by id. */
struct feed_user {
	char id[25];			/* "" until resolved */
	enum feed_lookup lookup;
	time_t at;			/* when the lookup ended */
	char name[];
};

struct feed {
	struct server *srv;
	struct config_redis redis;	/* redis.auth: backend_redis's credentials */
	char shown[1100];		/* backend_redis without its password */
	int warn_next;			/* the next loss is a warning (a refused AUTH) */
	int auth_warned;		/* ... logged once per outage */
	struct config_http_url api;
	char token[256];
	int ttl;
	redisAsyncContext *ac;
	int up;
	int backoff;
	struct event *retry;
	uint64_t epoch;
	struct evhttp_connection *http;
	struct strmap by_name;	/* owns its struct feed_user values */
	struct strmap by_id;	/* the resolved ones again */
	struct feed_stats stats;
};

/* The live feed: HTTP answers find it here, never through a pointer they
 * kept (it may be gone by the time they come). */
static struct feed *feed_current;

static struct feed_user *
feed_find_name(const struct feed *f, const char *name)
{
	const struct strmap_entry *e = strmap_find(&f->by_name, name);

	return e ? e->v.ptr : NULL;
}

static struct feed_user *
feed_find_id(const struct feed *f, const char *id)
{
	const struct strmap_entry *e = strmap_find(&f->by_id, id);

	return e ? e->v.ptr : NULL;
}

int
feed_parse_event(const char *msg, size_t len, char id[25])
{
	char *copy, *e;
	int ok = -1;

	if (len == 0 || len > 65536 || (copy = malloc(len + 1)) == NULL)
		return -1;
	memcpy(copy, msg, len);
	copy[len] = '\0';
	if (strlen(copy) == len && (e = json_string_member(copy, "e")) != NULL) {
		if (strlen(e) == 24 && strspn(e, "0123456789abcdefABCDEF") == 24) {
			memcpy(id, e, 25);
			ok = 0;
		}
		free(e);
	}
	free(copy);
	return ok;
}

/* --- the backend's Redis --- */

static void feed_connect(struct feed *f);

static void
feed_lost(struct feed *f, const char *why)
{
	struct timeval tv = { f->backoff, 0 };

	if (f->up || f->stats.losses == 0 || f->backoff == 1 || f->warn_next)
		log_warning("backend feed %s:%s lost: %s; every session resyncs once, retrying in "
		    "%d s", f->redis.path[0] ? f->redis.path : f->redis.host, f->redis.port, why,
		    f->backoff);
	if (f->up)
		f->epoch++;	/* changes published meanwhile are missed */
	f->warn_next = 0;
	f->up = 0;
	f->stats.connected = 0;
	f->stats.losses++;
	evtimer_add(f->retry, &tv);
	f->backoff = f->backoff * 2 > FEED_BACKOFF_MAX ? FEED_BACKOFF_MAX : f->backoff * 2;
}

static void
feed_on_message(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct feed *f = ac->data;
	struct feed_user *u;
	char id[25];

	(void)privdata;
	if (f == NULL || r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
	    r->element[0]->type != REDIS_REPLY_STRING)
		return;
	if (strcmp(r->element[0]->str, "subscribe") == 0) {
		f->up = 1;
		f->stats.connected = 1;
		f->backoff = 1;
		f->auth_warned = 0;
		f->epoch++;	/* what happened while away is unknown */
		log_notice("backend feed: subscribed to %s", FEED_CHANNEL);
		return;
	}
	if (strcmp(r->element[0]->str, "message") != 0 || r->element[2]->type != REDIS_REPLY_STRING)
		return;
	f->stats.events++;
	if (feed_parse_event(r->element[2]->str, r->element[2]->len, id) < 0 ||
	    (u = feed_find_id(f, id)) == NULL)
		return;
	f->stats.matched++;
	log_debug("backend feed: event for %s (%s)", u->name, id);
	store_notify_local(f->srv->store, u->name, "", "a change WildDuck reported (wd_events)");
}

static void
feed_on_connect(const redisAsyncContext *cac, int status)
{
	struct feed *f = cac->data;

	if (status != REDIS_OK && f != NULL) {
		f->ac = NULL;	/* hiredis frees the context */
		feed_lost(f, cac->c.errstr[0] ? cac->c.errstr : "cannot connect");
	}
}

static void
feed_on_disconnect(const redisAsyncContext *cac, int status)
{
	struct feed *f = cac->data;

	if (f == NULL)
		return;
	f->ac = NULL;
	feed_lost(f, status == REDIS_OK || !cac->c.errstr[0] ? "connection closed" : cac->c.errstr);
}

/* AUTH's answer: refused, the attempt fails as a lost connection does. */
static void
feed_on_auth(redisAsyncContext *ac, void *reply, void *privdata)
{
	const redisReply *r = reply;
	struct feed *f = ac->data;
	char why[1500];

	(void)privdata;
	if (f == NULL || r == NULL || r->type != REDIS_REPLY_ERROR || config_auth_unneeded(r->str))
		return;
	snprintf(why, sizeof(why), "AUTH%s%s refused: %.200s (backend_redis = %s)",
	    f->redis.auth.user[0] ? " as " : "", f->redis.auth.user, r->str, f->shown);
	if (!f->auth_warned)
		f->auth_warned = f->warn_next = 1;
	f->ac = NULL;
	ac->data = NULL;	/* its callbacks, now or deferred, touch nothing */
	redisAsyncFree(ac);
	feed_lost(f, why);
}

static void
feed_connect(struct feed *f)
{
	redisAsyncContext *ac = f->redis.path[0] ? redisAsyncConnectUnix(f->redis.path) :
	    redisAsyncConnect(f->redis.host, atoi(f->redis.port));
	const char *argv[3];
	size_t argvlen[3];
	int argc;

	if (ac == NULL || ac->err) {
		feed_lost(f, ac ? ac->c.errstr : "out of memory");
		if (ac)
			redisAsyncFree(ac);
		return;
	}
	ac->data = f;
	f->ac = ac;
	if (redisLibeventAttach(ac, f->srv->base) != REDIS_OK) {
		f->ac = NULL;
		ac->data = NULL;
		redisAsyncFree(ac);
		feed_lost(f, "cannot attach to the event loop");
		return;
	}
	redisAsyncSetConnectCallback(ac, feed_on_connect);
	redisAsyncSetDisconnectCallback(ac, feed_on_disconnect);
	if ((argc = config_auth_argv(&f->redis.auth, argv, argvlen)) > 0 &&
	    redisAsyncCommandArgv(ac, feed_on_auth, NULL, argc, argv, argvlen) != REDIS_OK)
		log_warning("backend feed: AUTH could not be queued");
	/* Channels are not per database: no SELECT. */
	if (redisAsyncCommand(ac, feed_on_message, NULL, "SUBSCRIBE %s", FEED_CHANNEL) != REDIS_OK)
		log_warning("backend feed: SUBSCRIBE could not be queued");
}

static void
feed_on_retry(evutil_socket_t fd, short what, void *arg)
{
	struct feed *f = arg;

	(void)fd;
	(void)what;
	if (f->ac == NULL)
		feed_connect(f);
}

/* --- login name -> backend id --- */

#define FEED_RESOLVE_PATH "/users/resolve/"

static void feed_set_id(struct feed *f, struct feed_user *u, const char *id);

static void
feed_on_resolved(struct evhttp_request *req, void *arg)
{
	char *name = NULL, *body = NULL, *id = NULL;
	struct feed *f = feed_current;
	struct feed_user *u;
	const char *uri = req ? evhttp_request_get_uri(req) : NULL, *at;
	int code = req ? evhttp_request_get_response_code(req) : 0;

	(void)arg;
	if (f == NULL)
		return;
	/* The user is named by the request's own path: nothing to free if
	 * libevent drops the request without calling here. */
	if (uri == NULL || (at = strstr(uri, FEED_RESOLVE_PATH)) == NULL ||
	    (name = evhttp_uridecode(at + strlen(FEED_RESOLVE_PATH), 0, NULL)) == NULL ||
	    (u = feed_find_name(f, name)) == NULL) {
		f->stats.lookup_failures++;
		goto out;
	}
	if (code == 200) {
		struct evbuffer *in = evhttp_request_get_input_buffer(req);
		size_t len = evbuffer_get_length(in);

		if (len < 65536 && (body = malloc(len + 1)) != NULL) {
			evbuffer_copyout(in, body, len);
			body[len] = '\0';
			id = json_string_member(body, "id");
		}
	}
	u->at = time(NULL);
	if (id == NULL || strlen(id) != 24 || strspn(id, "0123456789abcdefABCDEF") != 24) {
		f->stats.lookup_failures++;
		u->lookup = u->id[0] ? FEED_RESOLVED : FEED_FAILED;	/* keep a known id */
		log_warning("backend feed: cannot resolve %s at %s (HTTP %d): changes made behind "
		    "imapfresh's back are not seen for this user", name, f->api.host, code);
		goto out;
	}
	feed_set_id(f, u, id);
	log_info("backend feed: %s is %s", name, id);
	store_user_value_put(f->srv->store, name, "backend_id", id, f->ttl);
out:
	free(id);
	free(body);
	free(name);	/* evhttp_uridecode's */
}

static void
feed_resolve(struct feed *f, struct feed_user *u)
{
	struct evhttp_request *req;
	struct evkeyvalq *h;
	char path[1200], *enc;

	if (f->http == NULL) {
		f->http = evhttp_connection_base_new(f->srv->base, f->srv->dns, f->api.host,
		    (unsigned short)atoi(f->api.port));
		if (f->http == NULL)
			return;
		evhttp_connection_set_timeout(f->http, FEED_HTTP_TIMEOUT);
		evhttp_connection_set_retries(f->http, 1);
	}
	if ((req = evhttp_request_new(feed_on_resolved, NULL)) == NULL)
		return;
	h = evhttp_request_get_output_headers(req);
	evhttp_add_header(h, "Host", f->api.host);
	evhttp_add_header(h, "Accept", "application/json");
	if (f->token[0])
		evhttp_add_header(h, "X-Access-Token", f->token);
	enc = evhttp_uriencode(u->name, -1, 0);
	snprintf(path, sizeof(path), "%s" FEED_RESOLVE_PATH "%s", f->api.path, enc ? enc : "");
	free(enc);
	u->lookup = FEED_PENDING;
	u->at = time(NULL);
	f->stats.lookups++;
	if (evhttp_make_request(f->http, req, EVHTTP_REQ_GET, path) != 0) {
		/* libevent has freed the request; its callback will not run */
		u->lookup = u->id[0] ? FEED_RESOLVED : FEED_FAILED;
		f->stats.lookup_failures++;
	}
}

static void
feed_set_id(struct feed *f, struct feed_user *u, const char *id)
{
	if (strcmp(u->id, id) != 0) {
		struct strmap_entry *e;

		if (u->id[0])
			strmap_del(&f->by_id, u->id);
		u->id[0] = '\0';
		if ((e = strmap_get(&f->by_id, id)) == NULL)
			return;	/* out of memory: unresolved, asked again at the next login */
		memcpy(u->id, id, 25);
		e->v.ptr = u;
	}
	u->lookup = FEED_RESOLVED;
	u->at = time(NULL);
}

/* The id another instance resolved, kept in imapfresh's Redis; or the API. */
static void
feed_on_cached(const char *user, const char *id)
{
	struct feed *f = feed_current;
	struct feed_user *u;

	if (f == NULL || (u = feed_find_name(f, user)) == NULL)
		return;
	if (id != NULL && strlen(id) == 24 && strspn(id, "0123456789abcdefABCDEF") == 24) {
		feed_set_id(f, u, id);
		log_debug("backend feed: %s is %s (from the state store)", user, id);
		return;
	}
	feed_resolve(f, u);
}

void
feed_user_joined(struct feed *f, const char *user)
{
	struct feed_user *u;

	if (f == NULL || user[0] == '#')	/* a session whose user could not be read */
		return;
	if ((u = feed_find_name(f, user)) == NULL) {
		struct strmap_entry *e;

		if ((u = calloc(1, sizeof(*u) + strlen(user) + 1)) == NULL)
			return;
		if ((e = strmap_get(&f->by_name, user)) == NULL) {
			free(u);
			return;
		}
		strcpy(u->name, user);
		e->v.ptr = u;
	}
	if (u->lookup == FEED_PENDING && time(NULL) - u->at < 3 * FEED_HTTP_TIMEOUT)
		return;	/* under way (or lost with its connection: asked again) */
	if (u->lookup == FEED_RESOLVED && time(NULL) - u->at < f->ttl)
		return;
	if (u->lookup == FEED_FAILED && time(NULL) - u->at < 10)
		return;
	u->lookup = FEED_PENDING;
	u->at = time(NULL);
	if (u->id[0] == '\0')
		store_user_value_get(f->srv->store, user, "backend_id", feed_on_cached);
	else
		feed_resolve(f, u);	/* stale: ask the backend itself */
}

const char *
feed_backend_id(const struct feed *f, const char *user)
{
	const struct feed_user *u = f ? feed_find_name(f, user) : NULL;

	return u && u->id[0] ? u->id : NULL;
}

uint64_t
feed_epoch(const struct feed *f)
{
	return f ? f->epoch : 0;
}

void
feed_get_stats(const struct feed *f, struct feed_stats *out)
{
	if (f == NULL) {
		memset(out, 0, sizeof(*out));
		return;
	}
	*out = f->stats;
	out->configured = 1;
}

struct feed *
feed_new(struct server *srv, char *err, size_t errlen)
{
	const struct config *cfg = &srv->cfg;
	struct feed *f;

	err[0] = '\0';
	if (cfg->backend_events == BACKEND_EVENTS_NONE)
		return NULL;
	if ((f = calloc(1, sizeof(*f))) == NULL) {
		snprintf(err, errlen, "backend feed: out of memory");
		return NULL;
	}
	f->srv = srv;
	if (config_parse_redis(cfg->backend_redis, &f->redis) < 0 ||
	    config_parse_http_url(cfg->backend_api, &f->api) < 0) {
		snprintf(err, errlen, "backend feed: backend_redis and backend_api must be set");
		free(f);
		return NULL;
	}
	if (cfg->backend_redis_password[0])
		snprintf(f->redis.auth.password, sizeof(f->redis.auth.password), "%s",
		    cfg->backend_redis_password);
	config_redact_url(cfg->backend_redis, f->shown, sizeof(f->shown));
	snprintf(f->token, sizeof(f->token), "%s", cfg->backend_api_token);
	f->ttl = cfg->backend_id_ttl;
	f->backoff = 1;
	if ((f->retry = evtimer_new(srv->base, feed_on_retry, f)) == NULL) {
		snprintf(err, errlen, "backend feed: out of memory");
		free(f);
		return NULL;
	}
	feed_current = f;
	feed_connect(f);
	return f;
}

void
feed_set_auth(struct feed *f, const struct config *cfg)
{
	struct config_redis r;

	if (f == NULL || config_parse_redis(cfg->backend_redis, &r) < 0)
		return;
	if (cfg->backend_redis_password[0])
		snprintf(r.auth.password, sizeof(r.auth.password), "%s", cfg->backend_redis_password);
	f->redis.auth = r.auth;
	config_redact_url(cfg->backend_redis, f->shown, sizeof(f->shown));
	explicit_bzero(&r, sizeof(r));
}

void
feed_free(struct feed *f)
{
	if (f == NULL)
		return;
	explicit_bzero(&f->redis.auth, sizeof(f->redis.auth));
	if (feed_current == f)
		feed_current = NULL;
	if (f->ac != NULL) {
		f->ac->data = NULL;	/* its callbacks, now or deferred, touch nothing */
		redisAsyncFree(f->ac);
	}
	if (f->http != NULL)
		evhttp_connection_free(f->http);
	if (f->retry != NULL)
		event_free(f->retry);
	strmap_clear(&f->by_id, NULL);
	strmap_clear(&f->by_name, free);
	free(f);
}
