/* repair: what a stale session's client must be told to match its mailbox again: a pure plan from plain data, no session, no I/O. */
#include <string.h>

#include "repair.h"

const char *
repair_why_stale(const struct repair_staleness *in)
{
	if (in->requested)
		return "requested by the operator";
	if (in->has_user && in->gen_now > in->gen_synced)
		return "mailbox changed since the session last matched it";
	if (in->unheard)
		return "selected while this instance was still subscribing to the user's changes";
	if (in->epoch_now != in->epoch_synced)
		return "changes may have been missed while the state store or the backend feed was unreachable";
	if (in->resync_after > 0 && in->since_sync >= in->resync_after)
		return "resync_after elapsed";
	return NULL;
}

int
repair_view_matches(const struct seqmap *view, const struct pending *held,
    const struct uidset *truth)
{
	struct seqmap server;
	int same;

	if (!pending_any(held))
		return seqmap_consistent(view, truth);
	seqmap_init(&server);
	if (seqmap_copy(&server, view) < 0) {
		seqmap_free(&server);
		return 0;
	}
	seqmap_expunge_set(&server, &held->pos);
	same = seqmap_consistent(&server, truth);
	seqmap_free(&server);
	return same;
}

/* The UIDs of a set in ascending order, one at a time. */
struct repair_walk {
	const struct uidset *set;
	size_t i;
	uint64_t next;
};

static uint32_t
repair_walk_next(struct repair_walk *w)
{
	if (w->i < w->set->n && w->next > w->set->r[w->i].hi)
		w->i++;
	if (w->i >= w->set->n)
		return 0;
	if (w->next < w->set->r[w->i].lo)
		w->next = w->set->r[w->i].lo;
	return (uint32_t)w->next++;
}

int
repair_place(struct seqmap *view, const struct pending *held, const struct uidset *truth,
    struct uidset *positions)
{
	struct uidset all;
	struct repair_walk w;
	int fits = 1;

	uidset_init(&all);
	for (size_t i = 0; i < truth->n && fits; i++)
		fits = uidset_add_range(&all, truth->r[i].lo, truth->r[i].hi) == 0;
	/* A vanished UID the list still holds: it was read before the VANISHED. */
	for (size_t i = 0; i < held->vanished.n && fits; i++)
		fits = !uidset_covers_any(truth, held->vanished.r[i].lo, held->vanished.r[i].hi) &&
		    uidset_add_range(&all, held->vanished.r[i].lo, held->vanished.r[i].hi) == 0;
	if (fits && all.count != (uint64_t)view->count - pending_count(held))
		fits = 0;
	/* Two passes: check every known UID first, so a misfit changes nothing. */
	for (int learn = 0; learn < 2 && fits; learn++) {
		w = (struct repair_walk){ &all, 0, 0 };
		for (uint32_t pos = 1; pos <= view->count && fits; pos++) {
			uint32_t known, uid;

			if (pending_is(held, pos))
				continue;
			uid = repair_walk_next(&w);
			known = seqmap_uid(view, pos);
			if (!learn)
				fits = known == 0 || known == uid;
			else {
				if (known == 0)
					seqmap_learn(view, pos, uid);
				if (uidset_contains(&held->vanished, uid))
					fits = uidset_add(positions, pos) == 0;
			}
		}
	}
	uidset_free(&all);
	return fits ? 0 : -1;
}

int
repair_needs_server_list(const struct seqmap *view, const struct pending *held)
{
	uint32_t unknown = view->count - seqmap_known(view), unknown_held = 0;

	/* Held positions need no UID: they go whatever it was. */
	for (size_t i = 0; i < held->pos.n; i++)
		for (uint64_t k = held->pos.r[i].lo; k <= held->pos.r[i].hi; k++)
			unknown_held += seqmap_uid(view, (uint32_t)k) == 0;
	return unknown > unknown_held;
}

void
repair_plan_init(struct repair_plan *plan)
{
	plan->disconnect = NULL;
	uidset_init(&plan->expunge);
	uidset_init(&plan->kept);
	uidset_init(&plan->added);
}

void
repair_plan_free(struct repair_plan *plan)
{
	uidset_free(&plan->expunge);
	uidset_free(&plan->kept);
	uidset_free(&plan->added);
}

int
repair_make_plan(const struct seqmap *view, const struct pending *held,
    const struct seqmap *server, const struct uidset *truth, struct repair_plan *plan)
{
	uint32_t top = 0;	/* the highest UID the client can know of */
	size_t run = 0;

	plan->disconnect = NULL;
	uidset_clear(&plan->expunge);
	uidset_clear(&plan->kept);
	uidset_clear(&plan->added);
	for (uint32_t k = 1; k <= view->count; k++) {
		uint32_t uid = 0;

		while (run < view->n && (uint64_t)view->runs[run].seq + view->runs[run].len <= k)
			run++;
		if (run < view->n && view->runs[run].seq <= k)
			uid = view->runs[run].uid + (k - view->runs[run].seq);

		if (uid > top)
			top = uid;
		if (pending_is(held, k)) {
			/* The server expunged it already: it goes, known or not. */
			if (uidset_add(&plan->expunge, k) < 0)
				return -1;
			continue;
		}
		if (uid == 0) {
			uint32_t n = pending_to_server(held, k);

			if (n > server->count) {
				plan->disconnect = "the client's view could not be read back";
				return 0;
			}
			if ((uid = seqmap_uid(server, n)) == 0) {
				/* The server numbers it but has nothing there: gone. */
				if (uidset_add(&plan->expunge, k) < 0)
					return -1;
				continue;
			}
		}
		if (uid > top)
			top = uid;
		if (uidset_contains(truth, uid)) {
			if (uidset_add(&plan->kept, uid) < 0)
				return -1;
		} else if (uidset_add(&plan->expunge, k) < 0)
			return -1;
	}
	/* What the mailbox holds beyond the kept messages must all lie above top. */
	for (size_t i = 0; i < truth->n; i++) {
		uint32_t lo = truth->r[i].lo, hi = truth->r[i].hi;
		uint32_t below = hi < top ? hi : top;

		if (lo <= below && !uidset_covers(&plan->kept, lo, below)) {
			plan->disconnect = "a message appeared below UIDs the client has";
			return 0;
		}
		if (hi > top && uidset_add_range(&plan->added, lo > top ? lo : top + 1, hi) < 0)
			return -1;
	}
	return 0;
}
