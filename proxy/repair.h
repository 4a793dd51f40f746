/* repair: what a stale session's client must be told to match its mailbox again: a pure plan from plain data, no session, no I/O. */
#ifndef REPAIR_H
#define REPAIR_H

#include <stdint.h>

#include "pending.h"
#include "seqmap.h"
#include "uidset.h"

/* What says a session may no longer match its mailbox. */
struct repair_staleness {
	int requested;			/* an operator asked */
	int has_user;			/* generations are known for the user */
	int unheard;			/* selected (or last matched) while a change could go unheard */
	uint64_t gen_now, gen_synced;	/* the mailbox's generation, now and when last matched */
	uint64_t epoch_now, epoch_synced;	/* the state store's epoch, likewise */
	long long since_sync;		/* seconds since the session last matched */
	long long resync_after;		/* resync_after, 0 = off */
};

/* Why the session may be stale (for the log), or NULL when it is not. */
const char *repair_why_stale(const struct repair_staleness *in);

/* Does the server's view, the client's less the expunges it was not told
 * yet, hold exactly the mailbox's UIDs (unknown positions agree with any)? */
int repair_view_matches(const struct seqmap *view, const struct pending *held,
    const struct uidset *truth);

/*
 * The server's list (truth, read after the VANISHED UIDs in held->vanished
 * were said) places what the client's view does not know: the positions the
 * client has that are not held are, in order, truth and those UIDs together
 * (RFC 3501 2.3.1.1: UIDs ascend with sequence numbers). When they fit the
 * UIDs the view knows, every position's UID is learnt and the client
 * positions of the vanished UIDs are added to positions; 0. Otherwise -1 and
 * the view is left as it was (the caller escalates).
 */
int repair_place(struct seqmap *view, const struct pending *held, const struct uidset *truth,
    struct uidset *positions);

/* Must the server's own list be read to know every position the client has
 * (some UIDs the client was never shown)? */
int repair_needs_server_list(const struct seqmap *view, const struct pending *held);

struct repair_plan {
	const char *disconnect;	/* non-NULL: no legal sequence of responses exists */
	struct uidset expunge;	/* client positions the mailbox no longer holds */
	struct uidset kept;	/* the UIDs of the other client positions */
	struct uidset added;	/* UIDs new to the client, all above any it has seen */
};

void repair_plan_init(struct repair_plan *plan);
void repair_plan_free(struct repair_plan *plan);

/*
 * view: what the client was told (count, seq -> UID where known); held: the
 * expunges it was not told yet (client positions); server: the stale server
 * session's own list, by the server's numbering (what an injected
 * "FETCH 1:* (UID)" returned; count 0 when it was not asked, the view being
 * fully known). A position the server numbers but gave no UID for holds a
 * message it no longer has (RFC 2180 4.1.2); should that be wrong, the
 * mailbox holds a UID the plan cannot place and it says to disconnect.
 * truth: UID SEARCH ALL after the re-SELECT.
 *
 * The client can be told only EXPUNGEs of positions it has and one EXISTS
 * for messages after them (RFC 3501 7.4.1: EXISTS never shrinks the count;
 * 2.3.1.1: UIDs ascend, so a message new to the client must lie above every
 * UID it has seen). Where that cannot express the change, the plan says to
 * disconnect.
 */
int repair_make_plan(const struct seqmap *view, const struct pending *held,
    const struct seqmap *server, const struct uidset *truth, struct repair_plan *plan);

#endif
