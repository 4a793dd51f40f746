/* events: the sync event log: one JSON line per resync decision, to a file and a bounded Redis stream. */
#ifndef EVENTS_H
#define EVENTS_H

#include <stddef.h>
#include <stdint.h>

struct server;
struct session;
struct uidset;

struct events_resync {
	const char *step;	/* "check", "in-sync", "stale", "repaired", "disconnect",
				   "refused", "idle-refresh" */
	const char *trigger;	/* the held command's name, "IDLE", or NULL */
	const char *reason;	/* why the session was suspected */
	uint64_t gen_synced;	/* the generation the session had matched */
	uint64_t gen_now;	/* the generation it is being synced to */
	uint32_t client_count;	/* messages the client sees */
	const struct uidset *server_uids;	/* UID SEARCH result, or NULL */
	const char *sent_to_client;	/* what imapfresh told the client, or NULL */
};

/* Open event_log (config) and remember the Redis store; -1 with err set
 * when the file cannot be opened. Called at start and on reload. */
int events_open(struct server *srv, char *err, size_t errlen);
void events_close(struct server *srv);

void events_resync(struct session *s, const struct events_resync *ev);

/* The Redis master moved (redis-sentinel://): step "failover", no session. */
void events_failover(struct server *srv, const char *from, const char *to);

/* The last EVENTS_RECENT events of this instance are also kept in memory,
 * whether or not a file or a stream is configured (the status page). Long
 * values are cut, maybe inside a UTF-8 sequence. */
#define EVENTS_RECENT 50
struct events_recent {
	time_t at;
	uint64_t at_ms;		/* unix milliseconds: orders events of several instances */
	char time[32];		/* as in the log: 2025-03-01T10:00:00.123Z */
	char session[160], user[128], client[64], mailbox[160];
	char step[16], trigger[40], reason[160], sent[160];
	uint64_t gen_synced, gen_now;
	uint32_t client_count;
};
/* The i-th most recent (0 the newest), NULL past the last one. */
const struct events_recent *events_recent(const struct server *srv, size_t i);

#endif
