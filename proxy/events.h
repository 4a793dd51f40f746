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

#endif
