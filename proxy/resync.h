/* resync: bringing a stale upstream session back in line with its mailbox, without the client noticing. */
#ifndef RESYNC_H
#define RESYNC_H

#include <stdint.h>
#include <time.h>

#include "command.h"
#include "seqmap.h"
#include "uidset.h"

struct session;
struct inflight;

enum resync_phase {
	RESYNC_NONE,		/* nothing under way */
	RESYNC_WAIT_QUIET,	/* trigger held until the commands in flight finish */
	RESYNC_IDLE_DONE,	/* our DONE sent; waiting for the client's IDLE to complete upstream */
	RESYNC_CHECK,		/* NOOP + UID SEARCH in flight */
	RESYNC_ESCALATE,	/* [FETCH 1:* (UID)] + re-SELECT + UID SEARCH in flight */
	RESYNC_IDLE_REENTER,	/* the client's IDLE re-issued; its "+" is ours */
};

/* What an injected command is for. */
enum resync_cmd {
	RESYNC_CMD_NOOP,
	RESYNC_CMD_SEARCH,
	RESYNC_CMD_FETCH_UIDS,
	RESYNC_CMD_SELECT,
	RESYNC_CMD_IDLE,	/* the client's IDLE, re-entered under its own tag */
	RESYNC_CMD_ID,		/* not a resync: ID telling the upstream the client's address */
};

struct resync {
	enum resync_phase phase;
	int for_idle;			/* refreshing a client that is idling */
	int client_done;		/* the client sent DONE during the refresh */
	char *idle_tag;			/* the client's IDLE tag, while refreshing it (heap) */
	unsigned pending;		/* injected commands not completed */
	int failed;			/* one of them was refused */
	uint64_t gen;			/* the generation being synced to */
	int unheard;			/* ... while a change could go unheard (track.unheard) */
	struct uidset truth;		/* UID SEARCH ALL: what the mailbox holds */
	struct seqmap server_view;	/* FETCH 1:* (UID): the server session's seq -> UID */
	int matched_at_search;		/* the view matched the SEARCH result when it came */
	uint32_t old_uidvalidity;
	const char *reason;		/* why this resync started, for the log */
	char *reason_buf;		/* ... when it names the change that caused it (heap) */
	char trigger[40];		/* the held command ("UID FETCH"), or "IDLE" */
	uint64_t gen_before;		/* the generation the session had matched */
	uint64_t start_usec;		/* the trigger was held (latency histogram) */
	int requested;			/* an operator asked for one at the next trigger */
	/* per-session totals, for the store and the admin endpoint */
	time_t last_done;
	char last_step[16];		/* the last event's step ("in-sync", "repaired"...) */
	time_t last_step_at;
	uint64_t n_resyncs, n_escalations, n_stale;
};

void resync_init(struct resync *r);
void resync_free(struct resync *r);

/* Parse resync_on: commands imapfresh knows go into mask, others (by name)
 * into extra (up to 8 of 32 bytes); -1 when there are too many others. */
int resync_parse_triggers(const char *list, unsigned long long *mask, char extra[8][32]);

/* The client's command (first segment read, nothing forwarded) is a trigger
 * and the session may be stale: hold it. Returns 1 when the command is held;
 * the caller then calls resync_quiet() to start the resync as soon as nothing
 * else is in flight, and the client side resumes with
 * session_client_release() when it is over. */
int resync_hold(struct session *s, const struct command *cmd);

/* Why the session may no longer match its mailbox (for the log and the admin
 * endpoint), or NULL when nothing says so. No I/O: the hot path. */
const char *resync_why_stale(const struct session *s);

/* Nothing is in flight any more: a held resync may start. */
void resync_quiet(struct session *s);

/* One of the user's mailboxes changed (store notification). */
void resync_mailbox_changed(struct session *s, const char *mailbox);

/* May the client's bytes be read now? */
int resync_client_may_read(const struct session *s);

/* The client sent a line while idling: returns 1 when the resync took it
 * (a DONE during a refresh), so it must not be forwarded. */
int resync_client_idle_line(struct session *s);

/* Should the upstream response being read reach the client? Decided once the
 * tag and first word are known. */
int resync_response_hidden(struct session *s);

/* A continuation "+" from the upstream: returns 1 when it is ours. */
int resync_continuation(struct session *s);

/* Our UID SEARCH result is complete. */
void resync_search_result(struct session *s);

/* A tagged completion of one of our commands (f->injected). */
void resync_completed(struct session *s, struct inflight *f, int ok, const char *text);

/* The tagged completion of the client's IDLE that we ended ourselves:
 * returns 1 when it is (it is hidden; the check follows). */
int resync_idle_completed(struct session *s);

#endif
