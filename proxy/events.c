/* events: the sync event log: one JSON line per resync decision, to a file and a bounded Redis stream. */

/*
 * {"time":"2025-03-01T10:00:00.123Z","instance":"mx1","session":"mx1:s7",
 *  "user":"alice","client":"127.0.0.1:40312","mailbox":"Archive","step":"check",
 *  "trigger":"UID FETCH","reason":"generation changed","gen_synced":3,"gen_now":4,
 *  "client_count":0,"server_uids":null,"server_uid_count":null,
 *  "server_uids_truncated":false,"sent_to_client":null}
 *
 * One object per line (appended with one write(2)) to event_log, and the same
 * text as field "json" of the stream P + "events" (XADD MAXLEN ~
 * event_stream_max). Strings are escaped for JSON; bytes that are not UTF-8
 * become U+FFFD.
 *
 * Events of the whole instance have the same fields, those of a session
 * null: step "failover" (state = redis-sentinel://, the Redis master moved;
 * every session resyncs once) with reason "redis master A -> B".
 */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <event2/buffer.h>

#include "events.h"
#include "json.h"
#include "log.h"
#include "session.h"
#include "store.h"
#include "uidset.h"

#define EVENTS_UIDS_MAX 2048	/* longest server_uids string; longer is cut at a comma */

struct events {
	int fd;			/* event_log, or -1 */
	char path[1024];
	int warned;		/* a write failure was logged */
	struct events_recent recent[EVENTS_RECENT];	/* a ring */
	size_t n_recent, next_recent;
};

/* Opened as root before the privileges are dropped to user: make the file
 * the user's, or a reload (which reopens it) could not open it again. */
static void
events_give_to_user(int fd, const char *user)
{
	struct passwd *pw;
	struct stat st;

	if (geteuid() != 0 || user[0] == '\0' || (pw = getpwnam(user)) == NULL ||
	    fstat(fd, &st) < 0 || st.st_uid == pw->pw_uid)
		return;
	if (fchown(fd, pw->pw_uid, (gid_t)-1) < 0)
		log_warning("event_log: cannot give it to %s: %s", user, strerror(errno));
}

int
events_open(struct server *srv, char *err, size_t errlen)
{
	struct events *e = srv->events;
	const char *path = srv->cfg.event_log;
	int fd;

	if (e == NULL) {
		if ((e = calloc(1, sizeof(*e))) == NULL) {
			snprintf(err, errlen, "event_log: out of memory");
			return -1;
		}
		e->fd = -1;
		srv->events = e;
	}
	if (path[0] == '\0') {
		if (e->fd >= 0)
			close(e->fd);
		e->fd = -1;
		e->path[0] = '\0';
		return 0;
	}
	/* Reopened on every reload: that is how a rotated file is let go. */
	if ((fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640)) < 0) {
		snprintf(err, errlen, "event_log %s: %s", path, strerror(errno));
		return -1;	/* the file open before, if any, stays */
	}
	events_give_to_user(fd, srv->cfg.user);
	if (e->fd >= 0)
		close(e->fd);
	e->fd = fd;
	e->warned = 0;
	snprintf(e->path, sizeof(e->path), "%s", path);
	return 0;
}

void
events_close(struct server *srv)
{
	struct events *e = srv->events;

	if (e == NULL)
		return;
	if (e->fd >= 0)
		close(e->fd);
	free(e);
	srv->events = NULL;
}

static void
events_json_key(struct evbuffer *b, const char *key, int first)
{
	evbuffer_add_printf(b, "%s\"%s\":", first ? "{" : ",", key);
}

/* "1:5,7", cut at a comma when longer than EVENTS_UIDS_MAX. */
static int
events_format_uids(const struct uidset *set, char *buf, size_t len)
{
	char *comma;

	if (uidset_format(set, buf, len) < len)
		return 0;
	if ((comma = strrchr(buf, ',')) != NULL)
		*comma = '\0';
	return 1;
}

const struct events_recent *
events_recent(const struct server *srv, size_t i)
{
	const struct events *e = srv->events;

	if (e == NULL || i >= e->n_recent)
		return NULL;
	return &e->recent[(e->next_recent + EVENTS_RECENT - 1 - i) % EVENTS_RECENT];
}

/* Kept in memory for the status page, and the session's last step. */
static void
events_remember(struct session *s, const struct events_resync *ev, const struct timeval *tv,
    const char *ts, const char *sid)
{
	struct events *e = s->srv->events;
	struct events_recent *r;

	snprintf(s->resync.last_step, sizeof(s->resync.last_step), "%s", ev->step);
	s->resync.last_step_at = time(NULL);
	if (e == NULL)
		return;
	r = &e->recent[e->next_recent];
	e->next_recent = (e->next_recent + 1) % EVENTS_RECENT;
	if (e->n_recent < EVENTS_RECENT)
		e->n_recent++;
	r->at = tv->tv_sec;
	r->at_ms = (uint64_t)tv->tv_sec * 1000 + (uint64_t)tv->tv_usec / 1000;
	snprintf(r->time, sizeof(r->time), "%s", ts);
	snprintf(r->session, sizeof(r->session), "%s", sid);
	snprintf(r->user, sizeof(r->user), "%s", s->track.user ? s->track.user : "");
	snprintf(r->client, sizeof(r->client), "%s", s->client_addr);
	snprintf(r->mailbox, sizeof(r->mailbox), "%s", s->track.selected ? s->track.mailbox : "");
	snprintf(r->step, sizeof(r->step), "%s", ev->step ? ev->step : "");
	snprintf(r->trigger, sizeof(r->trigger), "%s", ev->trigger ? ev->trigger : "");
	snprintf(r->reason, sizeof(r->reason), "%s", ev->reason ? ev->reason : "");
	snprintf(r->sent, sizeof(r->sent), "%s", ev->sent_to_client ? ev->sent_to_client : "");
	r->gen_synced = ev->gen_synced;
	r->gen_now = ev->gen_now;
	r->client_count = ev->client_count;
}

/* The time now, as events give it: 2025-03-01T10:00:00.123Z. */
static void
events_now(struct timeval *tv, char *ts, size_t tslen)
{
	struct tm tm;
	size_t len;

	gettimeofday(tv, NULL);
	gmtime_r(&tv->tv_sec, &tm);
	len = strftime(ts, tslen, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(ts + len, tslen - len, ".%03dZ", (int)(tv->tv_usec / 1000));
}

/* Write the finished line b to the file and (stream) the Redis stream. */
static void
events_emit(struct server *srv, struct evbuffer *b, int stream)
{
	struct events *e = srv->events;
	size_t len = evbuffer_get_length(b);
	const char *text;

	if ((text = (const char *)evbuffer_pullup(b, -1)) == NULL)
		return;
	if (e != NULL && e->fd >= 0 && write(e->fd, text, len) < 0 && !e->warned) {
		e->warned = 1;
		log_warning("event_log %s: %s", e->path, strerror(errno));
	}
	if (stream) {
		char *json = malloc(len);
		if (json != NULL) {
			const char *fields[2] = { "json", json };

			memcpy(json, text, len - 1);	/* without the newline */
			json[len - 1] = '\0';
			store_stream_add(srv->store, "events", (size_t)srv->cfg.event_stream_max,
			    fields, 1);
			free(json);
		}
	}
}

void
events_failover(struct server *srv, const char *from, const char *to)
{
	struct events *e = srv->events;
	struct events_recent *r;
	struct store_stats ss;
	struct evbuffer *b;
	struct timeval tv;
	char ts[40], reason[700];
	int stream = 0;

	snprintf(reason, sizeof(reason), "redis master %s -> %s", from, to);
	events_now(&tv, ts, sizeof(ts));
	if (e != NULL) {	/* the status page's recent events */
		r = &e->recent[e->next_recent];
		e->next_recent = (e->next_recent + 1) % EVENTS_RECENT;
		if (e->n_recent < EVENTS_RECENT)
			e->n_recent++;
		memset(r, 0, sizeof(*r));
		r->at = tv.tv_sec;
		r->at_ms = (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
		/* Cut to fit, as every recent event's strings. */
		snprintf(r->time, sizeof(r->time), "%.*s", (int)sizeof(r->time) - 1, ts);
		snprintf(r->step, sizeof(r->step), "failover");
		snprintf(r->reason, sizeof(r->reason), "%.*s", (int)sizeof(r->reason) - 1, reason);
	}
	if (srv->store != NULL && srv->cfg.event_stream_max > 0) {
		store_get_stats(srv->store, &ss);
		stream = ss.redis;
	}
	if ((e == NULL || e->fd < 0) && !stream)
		return;
	if ((b = evbuffer_new()) == NULL)
		return;
	events_json_key(b, "time", 1);
	json_write_string(b, ts);
	events_json_key(b, "instance", 0);
	json_write_string(b, srv->instance);
	evbuffer_add_printf(b, ",\"session\":null,\"user\":null,\"client\":null,\"mailbox\":null");
	events_json_key(b, "step", 0);
	json_write_string(b, "failover");
	events_json_key(b, "trigger", 0);
	json_write_string(b, NULL);
	events_json_key(b, "reason", 0);
	json_write_string(b, reason);
	evbuffer_add_printf(b, ",\"gen_synced\":0,\"gen_now\":0,\"client_count\":0,"
	    "\"server_uids\":null,\"server_uid_count\":null,\"server_uids_truncated\":false,"
	    "\"sent_to_client\":null}\n");
	events_emit(srv, b, stream);
	evbuffer_free(b);
}

void
events_resync(struct session *s, const struct events_resync *ev)
{
	struct server *srv = s->srv;
	struct events *e = srv->events;
	struct store_stats ss;
	int stream = 0, truncated = 0;
	struct evbuffer *b;
	struct timeval tv;
	char ts[40], sid[200], uids[EVENTS_UIDS_MAX];

	if (srv->store != NULL && srv->cfg.event_stream_max > 0) {
		store_get_stats(srv->store, &ss);
		stream = ss.redis;
	}
	events_now(&tv, ts, sizeof(ts));
	snprintf(sid, sizeof(sid), "%s:%s", srv->instance, s->sid);
	events_remember(s, ev, &tv, ts, sid);
	if ((e == NULL || e->fd < 0) && !stream)
		return;
	if ((b = evbuffer_new()) == NULL)
		return;
	if (ev->server_uids != NULL)
		truncated = events_format_uids(ev->server_uids, uids, sizeof(uids));

	events_json_key(b, "time", 1);
	json_write_string(b, ts);
	events_json_key(b, "instance", 0);
	json_write_string(b, srv->instance);
	events_json_key(b, "session", 0);
	json_write_string(b, sid);
	events_json_key(b, "user", 0);
	json_write_string(b, s->track.user[0] ? s->track.user : NULL);
	events_json_key(b, "client", 0);
	json_write_string(b, s->client_addr);
	events_json_key(b, "mailbox", 0);
	json_write_string(b, s->track.selected ? s->track.mailbox : NULL);
	events_json_key(b, "step", 0);
	json_write_string(b, ev->step);
	events_json_key(b, "trigger", 0);
	json_write_string(b, ev->trigger != NULL && ev->trigger[0] ? ev->trigger : NULL);
	events_json_key(b, "reason", 0);
	json_write_string(b, ev->reason);
	evbuffer_add_printf(b, ",\"gen_synced\":%llu,\"gen_now\":%llu,\"client_count\":%lu",
	    (unsigned long long)ev->gen_synced, (unsigned long long)ev->gen_now,
	    (unsigned long)ev->client_count);
	events_json_key(b, "server_uids", 0);
	json_write_string(b, ev->server_uids != NULL ? uids : NULL);
	if (ev->server_uids != NULL)
		evbuffer_add_printf(b, ",\"server_uid_count\":%llu",
		    (unsigned long long)ev->server_uids->count);
	else
		evbuffer_add_printf(b, ",\"server_uid_count\":null");
	evbuffer_add_printf(b, ",\"server_uids_truncated\":%s", truncated ? "true" : "false");
	events_json_key(b, "sent_to_client", 0);
	json_write_string(b, ev->sent_to_client);
	evbuffer_add(b, "}\n", 2);
	events_emit(srv, b, stream);
	evbuffer_free(b);
}
