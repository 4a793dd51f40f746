/* seqmap: a client's view of its selected mailbox: message count and sequence number -> UID, as far as known. */
#ifndef SEQMAP_H
#define SEQMAP_H

#include <stddef.h>
#include <stdint.h>

#include "uidset.h"

/* UIDs ascend with sequence numbers, so a run of consecutive sequence numbers
 * with consecutive UIDs is one entry; a whole mailbox is usually a few runs. */
struct seqmap_run {
	uint32_t seq, uid, len;
};

struct seqmap {
	uint32_t count;		/* messages, from EXISTS / EXPUNGE */
	struct seqmap_run *runs;	/* sorted by seq; unknown positions are in no run */
	size_t n, cap;
};

void seqmap_init(struct seqmap *m);
void seqmap_free(struct seqmap *m);
void seqmap_reset(struct seqmap *m, uint32_t count);	/* after SELECT: count known, UIDs not */

void seqmap_exists(struct seqmap *m, uint32_t count);
void seqmap_expunge(struct seqmap *m, uint32_t seq);
/* Every position in the set is expunged; removed highest first, so each
 * removal leaves the numbers of those below as they are. */
void seqmap_expunge_set(struct seqmap *m, const struct uidset *positions);
/* VANISHED (QRESYNC): the message with this UID is gone; its position need
 * not be known, only that it lies between the known runs around its UID. */
void seqmap_vanished(struct seqmap *m, uint32_t uid);
/* The same for every UID of lo:hi, in time proportional to the runs. */
void seqmap_vanished_range(struct seqmap *m, uint32_t lo, uint32_t hi);
/* A FETCH response showed that seq has this UID. 1 when the view changed,
 * 0 when it already knew (a FLAGS sweep over known messages writes nothing). */
int seqmap_learn(struct seqmap *m, uint32_t seq, uint32_t uid);

/* UID at seq, 0 when unknown. */
uint32_t seqmap_uid(const struct seqmap *m, uint32_t seq);
/* How many positions have a known UID. */
uint32_t seqmap_known(const struct seqmap *m);

/* Does the view agree with the mailbox holding exactly these UIDs? Unknown
 * positions agree with anything; the count must match. */
int seqmap_consistent(const struct seqmap *m, const struct uidset *truth);

/* The positions of the messages with these UIDs, into out: 0, or -1 when a
 * UID may be at a position whose UID is unknown (the set overlaps the UIDs a
 * gap of unknown positions could hold). UIDs the view cannot hold are left
 * out. */
int seqmap_positions_of(const struct seqmap *m, const struct uidset *uids, struct uidset *out);

/* The known UIDs as a set. */
int seqmap_known_uids(const struct seqmap *m, struct uidset *out);

/* Messages with these UIDs follow the last one. */
int seqmap_append(struct seqmap *m, const struct uidset *uids);

/* dst becomes a copy of src. */
int seqmap_copy(struct seqmap *dst, const struct seqmap *src);

/* Replace the view by a fully known one. */
int seqmap_assign(struct seqmap *m, const struct uidset *uids);

#endif
