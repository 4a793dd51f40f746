/* test_repair: the repair plan (repair.c) against a reference model: random client views, held expunges and mailboxes. */
#include <stdlib.h>
#include <string.h>

#include "repair.h"
#include "tap.h"

#define MAXM 40

/* One random case and what the client must end up seeing. */
struct scenario {
	uint32_t count;
	uint32_t uid[MAXM + 1];		/* the client's positions' UIDs */
	int known[MAXM + 1];		/* the view knows it */
	int held[MAXM + 1];		/* the server expunged it, the client was not told */
	int unlisted[MAXM + 1];		/* the stale server numbers it but gives no UID */
	uint32_t truth[2 * MAXM];	/* what the mailbox holds, ascending */
	unsigned ntruth;
};

static void
scenario_make(struct scenario *sc, unsigned seed)
{
	uint32_t uid = 0, top;

	srand(seed);
	memset(sc, 0, sizeof(*sc));
	sc->count = (uint32_t)(rand() % MAXM);
	for (uint32_t k = 1; k <= sc->count; k++) {
		uid += 1 + (uint32_t)rand() % 3;
		sc->uid[k] = uid;
		sc->known[k] = rand() % 4 != 0;
		sc->held[k] = rand() % 6 == 0;
		/* expunged (held, or at random), else kept */
		if (!sc->held[k] && rand() % 5 != 0)
			sc->truth[sc->ntruth++] = uid;
		/* A stale server lists a position it cannot fetch: mostly one whose
		 * message is gone, now and then one it still has. */
		else if (!sc->known[k] && !sc->held[k] && rand() % 2 == 0)
			sc->unlisted[k] = 1;
		if (!sc->known[k] && !sc->held[k] && rand() % 40 == 0)
			sc->unlisted[k] = 1;
	}
	top = uid;
	/* New messages: above every UID the client had, or now and then a
	 * gap below it (the case no legal sequence expresses). */
	if (rand() % 8 == 0 && sc->count > 2) {
		for (uint32_t g = 1; g < top; g++) {
			int have = 0;
			for (uint32_t k = 1; k <= sc->count; k++)
				have |= sc->uid[k] == g;
			if (!have) {
				/* insert g in order */
				unsigned i = sc->ntruth;
				while (i > 0 && sc->truth[i - 1] > g) {
					sc->truth[i] = sc->truth[i - 1];
					i--;
				}
				sc->truth[i] = g;
				sc->ntruth++;
				break;
			}
		}
	}
	for (int a = rand() % 4; a > 0; a--)
		sc->truth[sc->ntruth++] = (top += 1 + (uint32_t)rand() % 2);
}

/* The reference: does a legal sequence exist, and is the plan's result the truth? */
static int
check_plan(const struct scenario *sc, const struct repair_plan *plan, char *why, size_t len)
{
	uint32_t view[3 * MAXM], n = sc->count, top = 0;
	int below = 0;

	/* The client can know a UID it was told or the server lists; an unlisted
	 * unknown position is taken as gone. */
	for (uint32_t k = 1; k <= sc->count; k++)
		if (sc->known[k] || (!sc->held[k] && !sc->unlisted[k]))
			top = sc->uid[k] > top ? sc->uid[k] : top;
	for (unsigned i = 0; i < sc->ntruth; i++) {
		int kept = 0;
		for (uint32_t k = 1; k <= sc->count; k++)
			kept |= !sc->held[k] && !sc->unlisted[k] && sc->uid[k] == sc->truth[i];
		if (sc->truth[i] <= top && !kept)
			below = 1;
	}
	if (below != (plan->disconnect != NULL)) {
		snprintf(why, len, "disconnect %s, expected %s", plan->disconnect ? "yes" : "no",
		    below ? "yes" : "no");
		return 0;
	}
	if (below)
		return 1;
	/* Apply: EXPUNGE highest first, then EXISTS with the added UIDs. */
	for (uint32_t k = 1; k <= n; k++)
		view[k] = sc->uid[k];
	for (size_t i = plan->expunge.n; i > 0; i--)
		for (uint32_t k = plan->expunge.r[i - 1].hi; k >= plan->expunge.r[i - 1].lo && k > 0; k--) {
			if (k > n) {
				snprintf(why, len, "EXPUNGE %u of %u", k, n);
				return 0;
			}
			memmove(&view[k], &view[k + 1], (n - k) * sizeof(view[0]));
			n--;
		}
	for (uint64_t i = 1; i <= plan->added.count; i++)
		view[++n] = uidset_nth(&plan->added, i);
	if (n != sc->ntruth) {
		snprintf(why, len, "the client ends with %u messages, the mailbox has %u", n, sc->ntruth);
		return 0;
	}
	for (uint32_t k = 1; k <= n; k++)
		if (view[k] != sc->truth[k - 1]) {
			snprintf(why, len, "position %u holds UID %u, the mailbox %u", k, view[k],
			    sc->truth[k - 1]);
			return 0;
		}
	return 1;
}

static void
run_plan(const struct scenario *sc, int with_server_uids, struct repair_plan *plan)
{
	struct seqmap view, server;
	struct pending held;
	struct uidset truth;
	uint32_t n = 0;

	seqmap_init(&view);
	seqmap_init(&server);
	pending_init(&held);
	uidset_init(&truth);
	seqmap_reset(&view, sc->count);
	for (uint32_t k = 1; k <= sc->count; k++)
		n += !sc->held[k];
	if (with_server_uids)
		seqmap_reset(&server, n);
	n = 0;
	for (uint32_t k = 1; k <= sc->count; k++) {
		if (sc->known[k])
			seqmap_learn(&view, k, sc->uid[k]);
		if (sc->held[k])
			uidset_add(&held.pos, k);
		else if (++n, with_server_uids && !sc->unlisted[k])
			seqmap_learn(&server, n, sc->uid[k]);
	}
	for (unsigned i = 0; i < sc->ntruth; i++)
		uidset_add(&truth, sc->truth[i]);
	repair_make_plan(&view, &held, &server, &truth, plan);
	seqmap_free(&view);
	seqmap_free(&server);
	pending_free(&held);
	uidset_free(&truth);
}

static void
test_examples(void)
{
	struct scenario sc;
	struct repair_plan plan;
	char why[160] = "";

	repair_plan_init(&plan);
	/* 5 known messages, the first and the last expunged, one new */
	memset(&sc, 0, sizeof(sc));
	sc.count = 5;
	for (uint32_t k = 1; k <= 5; k++)
		sc.uid[k] = 10 + k, sc.known[k] = 1;
	sc.ntruth = 4;
	memcpy(sc.truth, (uint32_t[]){ 12, 13, 14, 20 }, sizeof(uint32_t) * 4);
	run_plan(&sc, 0, &plan);
	ok(!plan.disconnect && plan.expunge.count == 2 && uidset_contains(&plan.expunge, 1) &&
	    uidset_contains(&plan.expunge, 5) && plan.added.count == 1 &&
	    uidset_contains(&plan.added, 20), "first and last expunged, one added");
	ok(check_plan(&sc, &plan, why, sizeof(why)), "... and the client ends with the mailbox %s", why);
	/* position 1 held (the server expunged it), unknown to the view */
	sc.known[1] = 0;
	sc.held[1] = 1;
	run_plan(&sc, 1, &plan);
	ok(!plan.disconnect && uidset_contains(&plan.expunge, 1) && plan.expunge.count == 2,
	    "a held position goes, its UID unknown");
	/* an unknown position the server cannot name */
	sc.held[1] = 0;
	run_plan(&sc, 0, &plan);
	ok(plan.disconnect != NULL, "an unknown UID with no server list: disconnect (%s)",
	    plan.disconnect ? plan.disconnect : "none");
	/* a message below the client's highest UID: it had 11..14 and 17 */
	sc.known[1] = 1;
	sc.uid[5] = 17;
	sc.ntruth = 5;
	memcpy(sc.truth, (uint32_t[]){ 12, 13, 14, 15, 17 }, sizeof(uint32_t) * 5);
	run_plan(&sc, 0, &plan);
	ok(plan.disconnect != NULL, "UID 15 below the client's 17: no legal sequence");
	repair_plan_free(&plan);
}

static void
test_model(void)
{
	unsigned bad = 0, disconnects = 0, cases = 0;
	char why[160];

	for (unsigned seed = 1; seed <= 3000; seed++) {
		struct scenario sc;
		struct repair_plan plan;

		scenario_make(&sc, seed);
		repair_plan_init(&plan);
		run_plan(&sc, 1, &plan);
		if (!check_plan(&sc, &plan, why, sizeof(why))) {
			if (bad++ < 5)
				diag("seed %u: %s", seed, why);
		}
		disconnects += plan.disconnect != NULL;
		cases++;
		repair_plan_free(&plan);
	}
	ok(bad == 0, "model: %u random views and mailboxes (%u with no legal sequence), %u wrong",
	    cases, disconnects, bad);
	ok(disconnects > 0 && disconnects < cases / 2, "both outcomes were drawn");
}

static void
test_staleness(void)
{
	struct repair_staleness in = { .requested = 0, .has_user = 1, .gen_now = 5, .gen_synced = 5,
		.epoch_now = 2, .epoch_synced = 2, .since_sync = 10, .resync_after = 0 };

	ok(repair_why_stale(&in) == NULL, "same generation, same epoch, no resync_after: in sync");
	in.gen_now = 6;
	ok(repair_why_stale(&in) && strstr(repair_why_stale(&in), "mailbox changed"),
	    "the generation moved");
	in.has_user = 0;
	ok(repair_why_stale(&in) == NULL, "no user: generations say nothing");
	in.epoch_now = 3;
	ok(repair_why_stale(&in) && strstr(repair_why_stale(&in), "state store"), "the epoch moved");
	in.epoch_now = 2;
	in.resync_after = 10;
	ok(repair_why_stale(&in) && strstr(repair_why_stale(&in), "resync_after"),
	    "resync_after elapsed (10 s of 10)");
	in.since_sync = 9;
	ok(repair_why_stale(&in) == NULL, "9 s of 10: not yet");
	in.unheard = 1;
	ok(repair_why_stale(&in) && strstr(repair_why_stale(&in), "subscribing"),
	    "selected while the user's changes could go unheard");
	in.requested = 1;
	ok(repair_why_stale(&in) && strstr(repair_why_stale(&in), "operator"), "an operator asked");
}

/* The server's view against random truths, and when its list is needed. */
static void
test_view_matches(void)
{
	unsigned bad = 0, matches = 0, cases = 0;

	for (unsigned seed = 1; seed <= 2000; seed++) {
		struct scenario sc;
		struct seqmap view;
		struct pending held;
		struct uidset truth, server;
		int want = 1, need = 0;

		scenario_make(&sc, seed);
		seqmap_init(&view);
		pending_init(&held);
		uidset_init(&truth);
		uidset_init(&server);
		seqmap_reset(&view, sc.count);
		for (uint32_t k = 1; k <= sc.count; k++) {
			if (sc.known[k])
				seqmap_learn(&view, k, sc.uid[k]);
			if (sc.held[k])
				uidset_add(&held.pos, k);
			else
				uidset_add(&server, sc.uid[k]);
			need |= !sc.known[k] && !sc.held[k];
		}
		/* Half the time the mailbox is exactly the server's view. */
		if (seed % 2) {
			uidset_free(&truth);
			truth = server;		/* the set moves over */
			uidset_init(&server);
		} else
			for (unsigned i = 0; i < sc.ntruth; i++)
				uidset_add(&truth, sc.truth[i]);
		/* the reference: same count, every known non-held position at its rank */
		{
			uint32_t n = 0;
			uint64_t count = 0;
			for (uint32_t k = 1; k <= sc.count; k++)
				count += !sc.held[k];
			if (count != truth.count)
				want = 0;
			for (uint32_t k = 1; k <= sc.count && want; k++) {
				if (sc.held[k])
					continue;
				n++;
				if (sc.known[k] && uidset_rank(&truth, sc.uid[k]) != n)
					want = 0;
			}
		}
		if (repair_view_matches(&view, &held, &truth) != want)
			bad++;
		if (repair_needs_server_list(&view, &held) != need)
			bad++;
		matches += want;
		cases++;
		seqmap_free(&view);
		pending_free(&held);
		uidset_free(&truth);
		uidset_free(&server);
	}
	ok(bad == 0 && matches > 0 && matches < cases, "server view vs mailbox and the need for its "
	    "list: %u cases (%u matching), %u wrong", cases, matches, bad);
}

/* repair_place against a model: a mailbox, what the client knows of it,
 * expunges held by position and VANISHED UIDs held because their positions
 * were unknown; the server's list then places them all. */
static void
test_place(void)
{
	unsigned wrong = 0, unchanged_bad = 0, cases = 0, vanished_cases = 0;

	for (unsigned seed = 1; seed <= 3000; seed++) {
		unsigned r = seed * 2654435761u;
		uint32_t count = 1 + (r >> 8) % 40, uid[64], next = 1;
		unsigned char known[64] = { 0 }, held_at[64] = { 0 }, gone[64] = { 0 };
		struct seqmap view;
		struct pending held;
		struct uidset truth, positions, want;

		seqmap_init(&view);
		pending_init(&held);
		uidset_init(&truth);
		uidset_init(&positions);
		uidset_init(&want);
		seqmap_reset(&view, count);
		for (uint32_t k = 1; k <= count; k++) {
			r = r * 1103515245u + 12345u;
			next += 1 + (r >> 16) % 3;
			uid[k] = next;
			known[k] = (r >> 20) % 3 == 0;
			held_at[k] = (r >> 22) % 7 == 0;
			gone[k] = !held_at[k] && (r >> 25) % 5 == 0;
			if (known[k])
				seqmap_learn(&view, k, uid[k]);
			if (held_at[k])
				uidset_add(&held.pos, k);
			else if (gone[k]) {
				uidset_add(&held.vanished, uid[k]);
				uidset_add(&want, k);
			} else
				uidset_add(&truth, uid[k]);
		}
		vanished_cases += held.vanished.count > 0;
		if (seed % 3 == 0 && truth.count > 0) {
			/* A list that does not fit (one message short): nothing changes. */
			struct uidset short_truth;
			uint32_t before[64];

			uidset_init(&short_truth);
			for (uint64_t i = 2; i <= truth.count; i++)
				uidset_add(&short_truth, uidset_nth(&truth, i));
			for (uint32_t k = 1; k <= count; k++)
				before[k] = seqmap_uid(&view, k);
			if (repair_place(&view, &held, &short_truth, &positions) != -1 || positions.count)
				wrong++;
			for (uint32_t k = 1; k <= count; k++)
				unchanged_bad += seqmap_uid(&view, k) != before[k];
			uidset_free(&short_truth);
		} else {
			if (repair_place(&view, &held, &truth, &positions) != 0 ||
			    !uidset_equal(&positions, &want))
				wrong++;
			for (uint32_t k = 1; k <= count; k++)
				if (!held_at[k] && seqmap_uid(&view, k) != uid[k])
					wrong++;
		}
		cases++;
		seqmap_free(&view);
		pending_free(&held);
		uidset_free(&truth);
		uidset_free(&positions);
		uidset_free(&want);
	}
	ok(wrong == 0 && unchanged_bad == 0 && vanished_cases > 100,
	    "the server's list places unknown UIDs and held VANISHED UIDs: %u cases (%u with "
	    "VANISHED held), %u wrong, %u changed by a list that did not fit", cases, vanished_cases,
	    wrong, unchanged_bad);
}

/* The case a QRESYNC client met: after SELECT (QRESYNC ...) only message 2's
 * UID is known; another session expunges UID 5. */
static void
test_place_example(void)
{
	struct seqmap view;
	struct pending held;
	struct uidset truth, positions;

	seqmap_init(&view);
	pending_init(&held);
	uidset_init(&truth);
	uidset_init(&positions);
	seqmap_reset(&view, 4);
	seqmap_learn(&view, 2, 3);
	uidset_parse(&truth, "1,3,6", 5);
	uidset_add(&held.vanished, 5);
	ok(repair_place(&view, &held, &truth, &positions) == 0 && positions.count == 1 &&
	    uidset_contains(&positions, 3) && seqmap_uid(&view, 1) == 1 && seqmap_uid(&view, 3) == 5 &&
	    seqmap_uid(&view, 4) == 6, "VANISHED 5 held before the list: the client's message 3");
	uidset_clear(&truth);
	uidset_parse(&truth, "1,4,5,6", 7);	/* message 2 is UID 3, not 4 */
	uidset_clear(&held.vanished);
	seqmap_reset(&view, 4);
	seqmap_learn(&view, 2, 3);
	uidset_clear(&positions);
	ok(repair_place(&view, &held, &truth, &positions) == -1 && seqmap_uid(&view, 1) == 0,
	    "a list that contradicts a known UID places nothing");
	uidset_clear(&truth);
	uidset_parse(&truth, "1,3,5,6", 7);	/* read before the VANISHED: still holds 5 */
	uidset_add(&held.vanished, 5);
	ok(repair_place(&view, &held, &truth, &positions) == -1,
	    "a list that still holds a vanished UID places nothing");
	seqmap_free(&view);
	pending_free(&held);
	uidset_free(&truth);
	uidset_free(&positions);
}

int
main(void)
{
	test_examples();
	test_model();
	test_staleness();
	test_view_matches();
	test_place();
	test_place_example();
	return tap_done();
}
