/* fuzz_seqmap: seqmap and uidset driven by random operation sequences, compared with simple models. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "seqmap.h"
#include "uidset.h"

/*
 * Input: a sequence of operations, one opcode byte and its operands each.
 *
 * seqmap against a mailbox: the model is the mailbox a consistent server
 * holds (ascending UIDs). "Server" operations change it and tell the seqmap
 * what a server would say (a new message: EXISTS; an expunge: EXPUNGE n or,
 * QRESYNC, VANISHED uid; a FETCH: the UID at a position). After each, every
 * position the seqmap knows must hold the mailbox's UID there, the count
 * must match, and seqmap_consistent() must accept the mailbox's UID set.
 * "Garbage" operations (numbers a broken server might send) suspend that
 * comparison until the next seqmap_assign() or reset; the structural
 * invariants are checked after every operation either way.
 *
 * uidset against a naive model: a sorted array of disjoint ranges rebuilt
 * from scratch by sort and merge; add/contains/nth/rank/max/count/equal
 * must agree, and format -> parse must give the set back.
 */

#define MAXMSG 4096

struct mailbox {
	uint32_t uid[MAXMSG];
	uint32_t n, next_uid;
};

/* ------------------------------------------------------------ uidset model */

struct model {
	struct uidset_range r[512];
	size_t n;
};

static int
cmp_range(const void *a, const void *b)
{
	const struct uidset_range *x = a, *y = b;

	return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static void
model_add(struct model *m, uint32_t lo, uint32_t hi)
{
	size_t o = 0;

	if (lo > hi) {
		uint32_t t = lo;
		lo = hi;
		hi = t;
	}
	if (m->n == sizeof(m->r) / sizeof(m->r[0]))
		return;
	m->r[m->n].lo = lo;
	m->r[m->n].hi = hi;
	m->n++;
	qsort(m->r, m->n, sizeof(m->r[0]), cmp_range);
	for (size_t i = 1; i < m->n; i++) {
		if ((uint64_t)m->r[o].hi + 1 >= m->r[i].lo) {
			if (m->r[i].hi > m->r[o].hi)
				m->r[o].hi = m->r[i].hi;
		} else
			m->r[++o] = m->r[i];
	}
	m->n = m->n ? o + 1 : 0;
}

static uint64_t
model_count(const struct model *m)
{
	uint64_t c = 0;

	for (size_t i = 0; i < m->n; i++)
		c += (uint64_t)m->r[i].hi - m->r[i].lo + 1;
	return c;
}

static int
model_contains(const struct model *m, uint32_t u)
{
	for (size_t i = 0; i < m->n; i++)
		if (u >= m->r[i].lo && u <= m->r[i].hi)
			return 1;
	return 0;
}

static uint32_t
model_nth(const struct model *m, uint64_t k)
{
	for (size_t i = 0; i < m->n && k >= 1; i++) {
		uint64_t len = (uint64_t)m->r[i].hi - m->r[i].lo + 1;
		if (k <= len)
			return (uint32_t)(m->r[i].lo + (k - 1));
		k -= len;
	}
	return 0;
}

static uint64_t
model_rank(const struct model *m, uint32_t u)
{
	uint64_t before = 0;

	for (size_t i = 0; i < m->n; i++) {
		if (u >= m->r[i].lo && u <= m->r[i].hi)
			return before + (u - m->r[i].lo) + 1;
		before += (uint64_t)m->r[i].hi - m->r[i].lo + 1;
	}
	return 0;
}

/* The model never holds UID 0 (IMAP has none); neither do the operands. */
static uint32_t
pick_uid(uint32_t raw)
{
	switch (raw >> 30) {
	case 0:
		return (raw & 0xff) + 1;		/* small, dense */
	case 1:
		return (raw & 0xffff) + 1;
	case 2:
		return UINT32_MAX - (raw & 0xff);	/* at the top of the range */
	default:
		return raw ? raw : 1;
	}
}

static void
check_uidset(const struct uidset *s, const struct model *m)
{
	uint64_t c = 0;

	FUZZ_CHECK(s->n <= s->cap, "uidset n > cap");
	for (size_t i = 0; i < s->n; i++) {
		FUZZ_CHECK(s->r[i].lo <= s->r[i].hi, "range %zu reversed", i);
		if (i + 1 < s->n)
			FUZZ_CHECK((uint64_t)s->r[i].hi + 1 < s->r[i + 1].lo,
			    "ranges %zu and %zu touch or overlap: %u:%u %u:%u", i, i + 1, s->r[i].lo,
			    s->r[i].hi, s->r[i + 1].lo, s->r[i + 1].hi);
		c += (uint64_t)s->r[i].hi - s->r[i].lo + 1;
	}
	FUZZ_CHECK(c == s->count, "count %llu, ranges hold %llu", (unsigned long long)s->count,
	    (unsigned long long)c);
	if (m == NULL)
		return;
	FUZZ_CHECK(s->n == m->n, "%zu ranges, model %zu", s->n, m->n);
	for (size_t i = 0; i < s->n; i++)
		FUZZ_CHECK(s->r[i].lo == m->r[i].lo && s->r[i].hi == m->r[i].hi,
		    "range %zu: %u:%u, model %u:%u", i, s->r[i].lo, s->r[i].hi, m->r[i].lo, m->r[i].hi);
	FUZZ_CHECK(s->count == model_count(m), "count");
	FUZZ_CHECK(uidset_max(s) == (m->n ? m->r[m->n - 1].hi : 0), "max %u", uidset_max(s));
}

static void
roundtrip(const struct uidset *s)
{
	size_t need = uidset_format(s, NULL, 0);
	char *buf = malloc(need + 1);
	struct uidset back;

	if (buf == NULL)
		abort();
	FUZZ_CHECK(uidset_format(s, buf, need + 1) == need, "format length changed");
	FUZZ_CHECK(strlen(buf) == need, "formatted %zu, said %zu", strlen(buf), need);
	uidset_init(&back);
	FUZZ_CHECK(uidset_parse(&back, buf, need) == 0 || need == 0, "cannot parse own output %s",
	    fuzz_escape(buf, need, 200));
	FUZZ_CHECK(uidset_equal(&back, s), "format/parse roundtrip differs: %s",
	    fuzz_escape(buf, need, 200));
	uidset_free(&back);
	free(buf);
}

static void
fuzz_uidset(struct fuzz_in *in)
{
	struct uidset s, other;
	struct model m = { .n = 0 };

	uidset_init(&s);
	uidset_init(&other);
	while (fuzz_more(in)) {
		uint8_t op = fuzz_u8(in);
		uint32_t a = pick_uid(fuzz_u32(in)), b;

		switch (op % 8) {
		case 0:
		case 1:
			b = pick_uid(fuzz_u32(in));
			if (m.n == sizeof(m.r) / sizeof(m.r[0]))
				break;
			FUZZ_CHECK(uidset_add_range(&s, a, b) == 0, "add_range failed");
			model_add(&m, a, b);
			break;
		case 2:
			if (m.n == sizeof(m.r) / sizeof(m.r[0]))
				break;
			FUZZ_CHECK(uidset_add(&s, a) == 0, "add failed");
			model_add(&m, a, a);
			break;
		case 3:
			FUZZ_CHECK(uidset_contains(&s, a) == model_contains(&m, a), "contains %u", a);
			break;
		case 4: {
			uint64_t k = fuzz_u32(in) % (model_count(&m) + 2);
			FUZZ_CHECK(uidset_nth(&s, k) == model_nth(&m, k), "nth %llu: %u, model %u",
			    (unsigned long long)k, uidset_nth(&s, k), model_nth(&m, k));
			if (k >= 1 && k <= model_count(&m))
				FUZZ_CHECK(uidset_rank(&s, model_nth(&m, k)) == k, "rank(nth(%llu))",
				    (unsigned long long)k);
			break;
		}
		case 5:
			FUZZ_CHECK(uidset_rank(&s, a) == model_rank(&m, a), "rank %u", a);
			break;
		case 6:
			roundtrip(&s);
			break;
		default: {
			/* Arbitrary text through the parser: whatever it accepts roundtrips. */
			size_t len = fuzz_u8(in) % 64;
			const char *text = (const char *)in->p + in->pos;

			if (len > in->len - in->pos)
				len = in->len - in->pos;
			in->pos += len;
			uidset_clear(&other);
			if (uidset_parse(&other, text, len) == 0) {
				check_uidset(&other, NULL);
				FUZZ_CHECK(uidset_nth(&other, 1) != 0 || other.count == 0, "UID 0 parsed");
				roundtrip(&other);
			}
			FUZZ_CHECK(uidset_equal(&s, &s), "not equal to itself");
			break;
		}
		}
		check_uidset(&s, &m);
	}
	uidset_free(&s);
	uidset_free(&other);
}

/* ------------------------------------------------------------ seqmap vs mailbox */

static void
check_seqmap(const struct seqmap *v, const struct mailbox *mb, int model_ok)
{
	uint64_t known = 0;

	FUZZ_CHECK(v->n <= v->cap, "n > cap");
	for (size_t i = 0; i < v->n; i++) {
		const struct seqmap_run *r = &v->runs[i];
		uint64_t last_seq = (uint64_t)r->seq + r->len - 1, last_uid = (uint64_t)r->uid + r->len - 1;

		FUZZ_CHECK(r->len >= 1 && r->seq >= 1 && r->uid >= 1, "run %zu: seq %u uid %u len %u",
		    i, r->seq, r->uid, r->len);
		FUZZ_CHECK(last_seq <= v->count, "run %zu ends at %llu, count %u", i,
		    (unsigned long long)last_seq, v->count);
		FUZZ_CHECK(last_uid <= UINT32_MAX, "run %zu UID overflow", i);
		if (i + 1 < v->n) {
			const struct seqmap_run *b = &v->runs[i + 1];
			FUZZ_CHECK(last_seq < b->seq, "runs %zu/%zu overlap", i, i + 1);
			FUZZ_CHECK(last_uid < b->uid && b->uid - last_uid >= b->seq - last_seq,
			    "runs %zu/%zu: seq %u+%u uid %u, next seq %u uid %u", i, i + 1,
			    r->seq, r->len, r->uid, b->seq, b->uid);
		}
		known += r->len;
	}
	FUZZ_CHECK(known == seqmap_known(v), "known");
	FUZZ_CHECK(known <= v->count, "known %llu > count %u", (unsigned long long)known, v->count);
	if (!model_ok)
		return;
	FUZZ_CHECK(v->count == mb->n, "count %u, mailbox holds %u", v->count, mb->n);
	for (size_t i = 0; i < v->n; i++) {
		const struct seqmap_run *r = &v->runs[i];
		for (uint32_t k = 0; k < r->len; k++)
			FUZZ_CHECK(mb->uid[r->seq + k - 1] == r->uid + k,
			    "view says seq %u is UID %u, mailbox has %u", r->seq + k, r->uid + k,
			    mb->uid[r->seq + k - 1]);
	}
	{
		struct uidset truth;
		uidset_init(&truth);
		for (uint32_t k = 0; k < mb->n; k++)
			uidset_add(&truth, mb->uid[k]);
		FUZZ_CHECK(seqmap_consistent(v, &truth), "seqmap_consistent rejects the mailbox");
		uidset_free(&truth);
	}
}

static void
mb_remove(struct mailbox *mb, uint32_t seq)
{
	memmove(&mb->uid[seq - 1], &mb->uid[seq], (mb->n - seq) * sizeof(mb->uid[0]));
	mb->n--;
}

static void
fuzz_seqmap(struct fuzz_in *in)
{
	struct seqmap v;
	struct mailbox *mb = calloc(1, sizeof(*mb));
	int model_ok = 1;

	if (mb == NULL)
		abort();
	seqmap_init(&v);
	mb->next_uid = 1;
	while (fuzz_more(in)) {
		uint8_t op = fuzz_u8(in);
		uint32_t x = fuzz_u32(in);

		switch (op % 12) {
		case 0:
		case 1: {
			/* New messages arrive: EXISTS (UIDs may jump). */
			uint32_t add = x % 8 + 1, gap = (x >> 8) % 4;
			while (add-- > 0 && mb->n < MAXMSG && mb->next_uid < UINT32_MAX - 8) {
				mb->next_uid += gap;
				mb->uid[mb->n++] = mb->next_uid++;
			}
			seqmap_exists(&v, mb->n);
			break;
		}
		case 2:
		case 3:
			/* A FETCH reveals a UID. */
			if (mb->n > 0) {
				uint32_t seq = x % mb->n + 1;
				seqmap_learn(&v, seq, mb->uid[seq - 1]);
			}
			break;
		case 4:
			/* A FETCH of a range reveals many. */
			if (mb->n > 0) {
				uint32_t from = x % mb->n + 1, len = (x >> 16) % 64;
				for (uint32_t q = from; q <= mb->n && q < from + len; q++)
					seqmap_learn(&v, q, mb->uid[q - 1]);
			}
			break;
		case 5:
			/* EXPUNGE n. */
			if (mb->n > 0) {
				uint32_t seq = x % mb->n + 1;
				mb_remove(mb, seq);
				seqmap_expunge(&v, seq);
			}
			break;
		case 6:
			/* VANISHED uid (QRESYNC): the message is gone, wherever it was. */
			if (mb->n > 0) {
				uint32_t seq = x % mb->n + 1, uid = mb->uid[seq - 1];
				mb_remove(mb, seq);
				seqmap_vanished(&v, uid);
			}
			break;
		case 7:
			/* Re-SELECT: count known, UIDs not. */
			seqmap_reset(&v, mb->n);
			model_ok = 1;
			break;
		case 8: {
			/* The resync's repair: the whole view assigned. */
			struct uidset truth;
			uidset_init(&truth);
			for (uint32_t k = 0; k < mb->n; k++)
				uidset_add(&truth, mb->uid[k]);
			FUZZ_CHECK(seqmap_assign(&v, &truth) == 0, "assign failed");
			FUZZ_CHECK(seqmap_known(&v) == v.count, "assign left unknown positions");
			uidset_free(&truth);
			model_ok = 1;
			break;
		}
		case 9:
			/* Garbage: a FETCH with numbers no mailbox backs. */
			seqmap_learn(&v, pick_uid(x) % 100000, pick_uid(fuzz_u32(in)));
			model_ok = 0;
			break;
		case 10:
			/* Garbage: EXISTS/EXPUNGE/VANISHED with arbitrary numbers. */
			switch (x % 3) {
			case 0:
				seqmap_exists(&v, fuzz_u32(in) % 100000);
				break;
			case 1:
				seqmap_expunge(&v, fuzz_u32(in));
				break;
			default:
				seqmap_vanished(&v, pick_uid(fuzz_u32(in)));
				break;
			}
			model_ok = 0;
			break;
		default: {
			/* Read back: known UIDs as a set, positions one by one. */
			struct uidset known;
			uidset_init(&known);
			FUZZ_CHECK(seqmap_known_uids(&v, &known) == 0, "known_uids failed");
			FUZZ_CHECK(known.count == seqmap_known(&v), "known_uids %llu, known %u",
			    (unsigned long long)known.count, seqmap_known(&v));
			check_uidset(&known, NULL);
			if (v.count <= MAXMSG)
				for (uint32_t q = 1; q <= v.count; q++) {
					uint32_t u = seqmap_uid(&v, q);
					FUZZ_CHECK(u == 0 || uidset_contains(&known, u), "uid %u", u);
					if (model_ok)
						FUZZ_CHECK(u == 0 || u == mb->uid[q - 1], "seq %u", q);
				}
			uidset_free(&known);
			break;
		}
		}
		check_seqmap(&v, mb, model_ok);
	}
	seqmap_free(&v);
	free(mb);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_in in = { data, size, 0 };

	if (size < 1)
		return 0;
	/* The first byte picks the structure under test. */
	if (fuzz_u8(&in) & 1)
		fuzz_uidset(&in);
	else
		fuzz_seqmap(&in);
	return 0;
}
