/* test_seqmap: the sequence -> UID view and UID sets, checked against a plain array model. */
#include <stdlib.h>
#include <string.h>

#include "seqmap.h"
#include "tap.h"
#include "uidset.h"

/* The model: every position's UID (0 = unknown), as a client would see it. */
struct model {
	uint32_t uid[1024];
	uint32_t count;
};

static int
model_matches(const struct model *md, const struct seqmap *m)
{
	if (md->count != m->count)
		return 0;
	for (uint32_t s = 1; s <= md->count; s++) {
		uint32_t got = seqmap_uid(m, s);
		/* What the client learnt stays known: a view that forgets (or never
		 * learns) fails here, as does one that knows a wrong UID. */
		if (md->uid[s - 1] != 0 && got != md->uid[s - 1])
			return 0;
		if (md->uid[s - 1] == 0 && got != 0)
			return 0;
	}
	return 1;
}

static void
test_uidset(void)
{
	struct uidset a, b;
	char buf[128];

	uidset_init(&a);
	uidset_init(&b);
	ok(uidset_parse(&a, "1:5,7,9:12", 10) == 0 && a.count == 10, "parse a sequence set");
	uidset_format(&a, buf, sizeof(buf));
	ok(strcmp(buf, "1:5,7,9:12") == 0, "format it back (%s)", buf);
	ok(uidset_parse(&b, "12 11 10 9 7 5 4 3 2 1", 22) == 0 && uidset_equal(&a, &b),
	    "SEARCH-style list in any order equals the range form");
	ok(uidset_nth(&a, 6) == 7 && uidset_nth(&a, 7) == 9 && uidset_nth(&a, 11) == 0, "nth");
	ok(uidset_rank(&a, 9) == 7 && uidset_rank(&a, 6) == 0, "rank");
	uidset_add(&a, 6);
	uidset_add(&a, 8);
	uidset_format(&a, buf, sizeof(buf));
	ok(strcmp(buf, "1:12") == 0 && a.n == 1 && a.count == 12, "adding the gaps merges ranges (%s)", buf);
	uidset_add_range(&a, 20, 15);
	ok(a.n == 2 && a.count == 18 && uidset_max(&a) == 20, "reversed range added");
	uidset_clear(&b);
	ok(uidset_parse(&b, "1:x", 3) < 0 && uidset_parse(&b, "0", 1) < 0 &&
	    uidset_parse(&b, "4294967296", 10) < 0 && uidset_parse(&b, "5*", 2) < 0,
	    "bad sets refused (letters, zero, overflow, junk)");
	uidset_clear(&b);
	ok(uidset_parse(&b, "", 0) == 0 && b.count == 0 && uidset_format(&b, buf, sizeof(buf)) == 0,
	    "empty set");
	uidset_free(&a);
	uidset_free(&b);
}

static void
test_seqmap_basics(void)
{
	struct seqmap m;
	struct uidset truth;

	seqmap_init(&m);
	uidset_init(&truth);
	seqmap_reset(&m, 5);
	for (uint32_t s = 1; s <= 5; s++)
		seqmap_learn(&m, s, s + 10);
	ok(m.n == 1 && seqmap_known(&m) == 5, "consecutive UIDs form one run");
	seqmap_expunge(&m, 3);
	ok(m.count == 4 && seqmap_uid(&m, 3) == 14 && m.n == 2, "EXPUNGE splits the run and shifts");
	uidset_parse(&truth, "11,12,14,15", 11);
	ok(seqmap_consistent(&m, &truth), "consistent with the truth");
	uidset_clear(&truth);
	uidset_parse(&truth, "11,12,14,16", 11);
	ok(!seqmap_consistent(&m, &truth), "a replaced message is seen even with the same count");
	seqmap_exists(&m, 5);
	uidset_clear(&truth);
	uidset_parse(&truth, "11,12,14,15,16", 14);
	ok(seqmap_consistent(&m, &truth), "unknown new position agrees with anything");
	uidset_clear(&truth);
	uidset_parse(&truth, "11,12,14,15", 11);
	ok(!seqmap_consistent(&m, &truth), "count mismatch is inconsistent");
	seqmap_vanished(&m, 12);
	ok(m.count == 4 && seqmap_uid(&m, 2) == 14, "VANISHED of a known UID");
	seqmap_vanished(&m, 13);	/* 11 and 14 are neighbours: 13 cannot be here */
	ok(m.count == 4 && seqmap_uid(&m, 2) == 14, "VANISHED of a UID with no place is ignored");
	seqmap_reset(&m, 4);
	seqmap_learn(&m, 1, 11);
	seqmap_learn(&m, 4, 20);	/* positions 2 and 3 unknown */
	seqmap_vanished(&m, 15);
	ok(m.count == 3 && seqmap_uid(&m, 3) == 20 && seqmap_uid(&m, 1) == 11,
	    "VANISHED of an unknown UID in a gap shifts the runs after it (uid(3)=%u)", seqmap_uid(&m, 3));
	uidset_clear(&truth);
	uidset_parse(&truth, "3:5,9", 5);
	seqmap_assign(&m, &truth);
	ok(m.count == 4 && seqmap_uid(&m, 4) == 9 && seqmap_consistent(&m, &truth), "assign");
	seqmap_free(&m);
	uidset_free(&truth);
}

/* Random EXISTS / EXPUNGE / learn / VANISHED against the array model. */
static void
test_seqmap_random(void)
{
	struct model md;
	struct seqmap m;
	unsigned seed = 12345, mismatches = 0, steps = 0, learn_wrong = 0;
	uint32_t next_uid = 1;

	memset(&md, 0, sizeof(md));
	seqmap_init(&m);
	/* The "server" holds real UIDs; the model records what the client learnt. */
	uint32_t real[1024];
	for (int i = 0; i < 20000; i++) {
		int op = (int)(rand_r(&seed) % 10);
		if (op < 3 && md.count < 1000) {	/* new messages */
			uint32_t k = 1 + rand_r(&seed) % 3;
			for (uint32_t j = 0; j < k; j++) {
				real[md.count] = next_uid;
				next_uid += 1 + (rand_r(&seed) % 4 == 0);
				md.uid[md.count++] = 0;
			}
			seqmap_exists(&m, md.count);
		} else if (op < 5 && md.count > 0) {	/* EXPUNGE */
			uint32_t s = 1 + rand_r(&seed) % md.count;
			memmove(&real[s - 1], &real[s], (md.count - s) * sizeof(real[0]));
			memmove(&md.uid[s - 1], &md.uid[s], (md.count - s) * sizeof(md.uid[0]));
			md.count--;
			seqmap_expunge(&m, s);
		} else if (op < 6 && md.count > 0) {	/* VANISHED by UID */
			uint32_t s = 1 + rand_r(&seed) % md.count;
			uint32_t uid = real[s - 1];
			memmove(&real[s - 1], &real[s], (md.count - s) * sizeof(real[0]));
			memmove(&md.uid[s - 1], &md.uid[s], (md.count - s) * sizeof(md.uid[0]));
			md.count--;
			seqmap_vanished(&m, uid);
		} else if (md.count > 0) {	/* FETCH reveals a UID */
			uint32_t s = 1 + rand_r(&seed) % md.count;
			int was_known = md.uid[s - 1] != 0;
			md.uid[s - 1] = real[s - 1];
			/* A FLAGS sweep over known messages must report no change. */
			if (seqmap_learn(&m, s, real[s - 1]) == was_known)
				learn_wrong++;
		}
		steps += i % 7 == 0;
		if (i % 7 == 0 && !model_matches(&md, &m))
			mismatches++;
	}
	ok(mismatches == 0, "random operations: view matches the model at every 7th step (%u of %u checks off)",
	    mismatches, steps);
	ok(learn_wrong == 0, "learn says changed exactly when the UID was unknown (%u wrong)", learn_wrong);
	{
		struct uidset truth;
		uidset_init(&truth);
		for (uint32_t s = 0; s < md.count; s++)
			uidset_add(&truth, real[s]);
		ok(seqmap_consistent(&m, &truth), "and is consistent with the server's UIDs");
		uidset_add(&truth, next_uid + 5);
		ok(!seqmap_consistent(&m, &truth), "and not once the server holds one more");
		uidset_free(&truth);
	}
	seqmap_free(&m);
}

/*
 * VANISHED lo:hi (QRESYNC) against the model, where the range says exactly
 * which positions go: UIDs without holes and the range within them (known
 * and unknown positions mixed), or holes and every position known (any
 * range, 1:4294967295 included). Where a range overlaps only part of a gap
 * of unknown positions and the UIDs have holes, no client can tell how
 * many of the gap went; seqmap_vanished_range() documents its choice.
 */
static void
test_vanished_range_random(void)
{
	unsigned seed = 777, bad = 0, rounds = 0;

	for (int round = 0; round < 4000; round++) {
		struct model md;
		struct seqmap m;
		uint32_t real[64], uid = 0, n = 1 + rand_r(&seed) % 40, lo, hi;
		int holes = round % 2;

		memset(&md, 0, sizeof(md));
		seqmap_init(&m);
		seqmap_reset(&m, n);
		md.count = n;
		for (uint32_t i = 0; i < n; i++) {
			real[i] = (uid += holes ? 1 + rand_r(&seed) % 3 : 1);
			if (holes || rand_r(&seed) % 3 != 0) {
				md.uid[i] = real[i];
				seqmap_learn(&m, i + 1, real[i]);
			}
		}
		lo = 1 + rand_r(&seed) % uid;
		hi = lo + rand_r(&seed) % 8;
		if (!holes && hi > uid)
			hi = uid;
		if (holes && rand_r(&seed) % 10 == 0)
			hi = UINT32_MAX;
		for (uint32_t i = md.count; i > 0; i--)
			if (real[i - 1] >= lo && real[i - 1] <= hi) {
				memmove(&real[i - 1], &real[i], (md.count - i) * sizeof(real[0]));
				memmove(&md.uid[i - 1], &md.uid[i], (md.count - i) * sizeof(md.uid[0]));
				md.count--;
			}
		seqmap_vanished_range(&m, lo, hi);
		if (!model_matches(&md, &m)) {
			if (bad++ < 3)
				diag("round %d: %u messages, VANISHED %u:%u: count %u, want %u", round, n, lo,
				    hi, m.count, md.count);
		}
		rounds++;
		seqmap_free(&m);
	}
	ok(bad == 0, "VANISHED ranges: %u random views, count and every known UID as the model (%u wrong)",
	    rounds, bad);
}

/* seqmap_positions_of(): the positions of a UID set, or -1 where a set
 * reaches UIDs a gap of unknown positions could hold. */
static void
test_positions_of(void)
{
	unsigned seed = 99, bad = 0, placed = 0, refused = 0;

	for (int round = 0; round < 3000; round++) {
		struct seqmap m;
		struct uidset set, got, want;
		uint32_t uid[41], n = 1 + rand_r(&seed) % 40, u = 0, lo, hi;
		int known[41], gap_hit = 0;

		seqmap_init(&m);
		uidset_init(&set);
		uidset_init(&got);
		uidset_init(&want);
		seqmap_reset(&m, n);
		for (uint32_t k = 1; k <= n; k++) {
			uid[k] = (u += 1 + rand_r(&seed) % 3);
			known[k] = rand_r(&seed) % 4 != 0;
			if (known[k])
				seqmap_learn(&m, k, uid[k]);
		}
		lo = 1 + rand_r(&seed) % (u + 3);
		hi = lo + rand_r(&seed) % 6;
		uidset_add_range(&set, lo, hi);
		/* the reference: an unknown position whose possible UIDs meet the set */
		for (uint32_t k = 1; k <= n; k++) {
			uint32_t below = 0, above = UINT32_MAX;
			if (known[k]) {
				if (uid[k] >= lo && uid[k] <= hi)
					uidset_add(&want, k);
				continue;
			}
			for (uint32_t j = k; j > 1 && !below; j--)
				if (known[j - 1])
					below = uid[j - 1];
			for (uint32_t j = k + 1; j <= n && above == UINT32_MAX; j++)
				if (known[j])
					above = uid[j] - 1;
			if (hi > below && lo <= above)
				gap_hit = 1;
		}
		if (seqmap_positions_of(&m, &set, &got) < 0) {
			refused++;
			bad += !gap_hit;
		} else {
			placed++;
			bad += gap_hit || !uidset_equal(&got, &want);
		}
		seqmap_free(&m);
		uidset_free(&set);
		uidset_free(&got);
		uidset_free(&want);
	}
	ok(bad == 0 && placed > 0 && refused > 0, "positions of UID sets: %u placed, %u refused "
	    "(a gap could hold them), %u wrong", placed, refused, bad);
}

int
main(void)
{
	test_uidset();
	test_seqmap_basics();
	test_seqmap_random();
	test_vanished_range_random();
	test_positions_of();
	return tap_done();
}
