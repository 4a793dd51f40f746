/* seqmap: a client's view of its selected mailbox: message count and sequence number -> UID, as far as known. */
#include <stdlib.h>
#include <string.h>

#include "seqmap.h"

void
seqmap_init(struct seqmap *m)
{
	memset(m, 0, sizeof(*m));
}

void
seqmap_free(struct seqmap *m)
{
	free(m->runs);
	seqmap_init(m);
}

void
seqmap_reset(struct seqmap *m, uint32_t count)
{
	m->n = 0;
	m->count = count;
}

void
seqmap_exists(struct seqmap *m, uint32_t count)
{
	/* EXISTS never shrinks the mailbox; a smaller number is the server's bug,
	 * and what we knew about positions above it can no longer be trusted. */
	if (count < m->count) {
		while (m->n > 0 && (uint64_t)m->runs[m->n - 1].seq + m->runs[m->n - 1].len - 1 > count) {
			struct seqmap_run *r = &m->runs[m->n - 1];
			if (r->seq > count)
				m->n--;
			else
				r->len = count - r->seq + 1;
		}
	}
	m->count = count;
}

static int
seqmap_insert(struct seqmap *m, size_t at, struct seqmap_run run)
{
	if (m->n == m->cap) {
		size_t cap = m->cap ? m->cap * 2 : 4;
		struct seqmap_run *r = realloc(m->runs, cap * sizeof(*r));
		if (r == NULL)
			return -1;
		m->runs = r;
		m->cap = cap;
	}
	memmove(&m->runs[at + 1], &m->runs[at], (m->n - at) * sizeof(*m->runs));
	m->runs[at] = run;
	m->n++;
	return 0;
}

static void
seqmap_delete(struct seqmap *m, size_t at)
{
	memmove(&m->runs[at], &m->runs[at + 1], (m->n - at - 1) * sizeof(*m->runs));
	m->n--;
}

/* Everything after position seq moves down by one. */
static void
seqmap_remove_position(struct seqmap *m, uint32_t seq)
{
	for (size_t i = 0; i < m->n; i++) {
		struct seqmap_run *r = &m->runs[i];

		if (r->seq > seq) {
			r->seq--;
		} else if ((uint64_t)seq < (uint64_t)r->seq + r->len) {
			uint32_t before = seq - r->seq, after = r->len - before - 1;
			if (before == 0 && after == 0) {
				seqmap_delete(m, i--);
			} else if (before == 0) {
				r->uid++;
				r->len--;
			} else if (after == 0) {
				r->len--;
			} else {
				struct seqmap_run tail = { seq, r->uid + before + 1, after };
				r->len = before;
				if (seqmap_insert(m, i + 1, tail) < 0)
					m->n = i + 1;	/* out of memory: forget the rest */
				i++;
			}
		}
	}
	if (m->count > 0)
		m->count--;
}

/* Positions seq .. seq+n-1 are gone; everything after moves down by n. */
static void
seqmap_remove_positions(struct seqmap *m, uint32_t seq, uint32_t n)
{
	uint64_t end = (uint64_t)seq + n;	/* first position kept after the hole */

	for (size_t i = 0; i < m->n; i++) {
		struct seqmap_run *r = &m->runs[i];
		uint64_t rs = r->seq, re = (uint64_t)r->seq + r->len;	/* [rs, re) */

		if (rs >= end) {
			r->seq -= n;
		} else if (re > seq) {
			uint64_t cut_lo = rs > seq ? rs : seq, cut_hi = re < end ? re : end;
			uint32_t before = (uint32_t)(cut_lo - rs), after = (uint32_t)(re - cut_hi);

			if (before == 0 && after == 0) {
				seqmap_delete(m, i--);
			} else if (before == 0) {
				r->uid += (uint32_t)(cut_hi - rs);
				r->len = after;
				r->seq = seq;
			} else if (after == 0) {
				r->len = before;
			} else {
				struct seqmap_run tail = { seq, r->uid + (uint32_t)(cut_hi - rs), after };
				r->len = before;
				if (seqmap_insert(m, i + 1, tail) < 0)
					m->n = i + 1;	/* out of memory: forget the rest */
				i++;
			}
		}
	}
	m->count = m->count > n ? m->count - n : 0;
}

/* VANISHED lo:hi (RFC 7162): known messages in the range go; in a gap of
 * unknown positions whose UIDs the range overlaps, as many positions as
 * the overlap could hold go (all of them when it covers the gap's UIDs).
 * Work is per run, never per UID: a server may say 1:4294967295. */
void
seqmap_vanished_range(struct seqmap *m, uint32_t lo, uint32_t hi)
{
	/* Positions and UIDs are read from the layout as it was, and holes are
	 * cut from the highest position down, so every hole's position, taken
	 * from the old layout, is still right when it is cut. */
	size_t n = m->n;
	struct seqmap_run *old = n ? malloc(n * sizeof(*old)) : NULL;
	uint32_t count = m->count;

	if (n > 0 && old == NULL)
		return;
	if (n > 0)
		memcpy(old, m->runs, n * sizeof(*old));
	for (size_t i = n;; i--) {
		/* The gap of unknown positions above run i-1 (below run i). */
		uint64_t gap_seq = i > 0 ? (uint64_t)old[i - 1].seq + old[i - 1].len : 1;
		uint64_t gap_end = i < n ? old[i].seq : (uint64_t)count + 1;
		uint64_t uid_lo = i > 0 ? (uint64_t)old[i - 1].uid + old[i - 1].len : 1;
		uint64_t uid_hi = i < n ? (uint64_t)old[i].uid - 1 : UINT32_MAX;
		uint64_t olo = lo > uid_lo ? lo : uid_lo, ohi = hi < uid_hi ? hi : uid_hi;

		if (gap_end > gap_seq && olo <= ohi) {
			uint64_t gap = gap_end - gap_seq, overlap = ohi - olo + 1;
			seqmap_remove_positions(m, (uint32_t)gap_seq,
			    (uint32_t)(overlap < gap ? overlap : gap));
		}
		if (i == 0)
			break;
		{
			const struct seqmap_run *r = &old[i - 1];
			uint64_t rlo = r->uid, rhi = (uint64_t)r->uid + r->len - 1;
			uint64_t clo = lo > rlo ? lo : rlo, chi = hi < rhi ? hi : rhi;

			if (clo <= chi)
				seqmap_remove_positions(m, r->seq + (uint32_t)(clo - rlo),
				    (uint32_t)(chi - clo + 1));
		}
	}
	free(old);
}

void
seqmap_expunge(struct seqmap *m, uint32_t seq)
{
	if (seq >= 1 && seq <= m->count)
		seqmap_remove_position(m, seq);
}

void
seqmap_expunge_set(struct seqmap *m, const struct uidset *positions)
{
	for (size_t i = positions->n; i > 0; i--)
		for (uint64_t k = positions->r[i - 1].hi; k >= positions->r[i - 1].lo; k--)
			seqmap_expunge(m, (uint32_t)k);
}

void
seqmap_vanished(struct seqmap *m, uint32_t uid)
{
	seqmap_vanished_range(m, uid, uid);
}

uint32_t
seqmap_uid(const struct seqmap *m, uint32_t seq)
{
	for (size_t i = 0; i < m->n; i++) {
		const struct seqmap_run *r = &m->runs[i];
		if (seq < r->seq)
			return 0;
		if ((uint64_t)seq < (uint64_t)r->seq + r->len)
			return r->uid + (seq - r->seq);
	}
	return 0;
}

uint32_t
seqmap_known(const struct seqmap *m)
{
	uint32_t known = 0;

	for (size_t i = 0; i < m->n; i++)
		known += m->runs[i].len;
	return known;
}

/* Join run i with run i+1 when they continue each other. */
static void
seqmap_merge_next(struct seqmap *m, size_t i)
{
	struct seqmap_run *a = &m->runs[i], *b = &m->runs[i + 1];

	if (i + 1 < m->n && (uint64_t)a->seq + a->len == b->seq &&
	    (uint64_t)a->uid + a->len == b->uid) {
		a->len += b->len;
		seqmap_delete(m, i + 1);
	}
}

int
seqmap_learn(struct seqmap *m, uint32_t seq, uint32_t uid)
{
	size_t i;
	int grew = 0;

	if (seq < 1 || uid == 0)
		return 0;
	if (seq > m->count) {
		m->count = seq;	/* FETCH implies the message exists */
		grew = 1;
	}
	for (i = 0; i < m->n && (uint64_t)m->runs[i].seq + m->runs[i].len <= seq; i++)
		;
	if (i < m->n && m->runs[i].seq <= seq) {
		struct seqmap_run *r = &m->runs[i];
		if ((uint64_t)r->uid + (seq - r->seq) == uid)
			return grew;
		/* The server contradicts what we knew: trust it, forget the run. */
		seqmap_delete(m, i);
	}
	/* UIDs ascend: runs that contradict the order around seq are stale. */
	for (size_t j = 0; j < m->n; j++) {
		const struct seqmap_run *r = &m->runs[j];
		int stale = (r->seq < seq && (uint64_t)r->uid + (seq - r->seq) > uid) ||
		    (r->seq > seq && r->uid < (uint64_t)uid + (r->seq - seq));
		if (stale)
			seqmap_delete(m, j--);
	}
	for (i = 0; i < m->n && m->runs[i].seq < seq; i++)
		;
	{
		struct seqmap_run run = { seq, uid, 1 };
		if (seqmap_insert(m, i, run) < 0)
			return grew;
	}
	seqmap_merge_next(m, i);
	if (i > 0)
		seqmap_merge_next(m, i - 1);
	return 1;
}

int
seqmap_consistent(const struct seqmap *m, const struct uidset *truth)
{
	if (truth->count != m->count)
		return 0;
	for (size_t i = 0; i < m->n; i++) {
		const struct seqmap_run *r = &m->runs[i];
		if (uidset_rank(truth, r->uid) != r->seq ||
		    uidset_rank(truth, r->uid + r->len - 1) != (uint64_t)r->seq + r->len - 1)
			return 0;
	}
	return 1;
}

int
seqmap_known_uids(const struct seqmap *m, struct uidset *out)
{
	uidset_clear(out);
	for (size_t i = 0; i < m->n; i++)
		if (uidset_add_range(out, m->runs[i].uid, m->runs[i].uid + m->runs[i].len - 1) < 0)
			return -1;
	return 0;
}

int
seqmap_assign(struct seqmap *m, const struct uidset *uids)
{
	uint32_t seq = 1;

	m->n = 0;
	for (size_t i = 0; i < uids->n; i++) {
		struct seqmap_run run = { seq, uids->r[i].lo, uids->r[i].hi - uids->r[i].lo + 1 };
		if (seqmap_insert(m, m->n, run) < 0)
			return -1;
		seq += run.len;
	}
	m->count = (uint32_t)uids->count;
	return 0;
}

int
seqmap_copy(struct seqmap *dst, const struct seqmap *src)
{
	dst->n = 0;
	dst->count = src->count;
	for (size_t i = 0; i < src->n; i++)
		if (seqmap_insert(dst, dst->n, src->runs[i]) < 0)
			return -1;
	return 0;
}

int
seqmap_append(struct seqmap *m, const struct uidset *uids)
{
	for (size_t i = 0; i < uids->n; i++) {
		struct seqmap_run run = { m->count + 1, uids->r[i].lo, uids->r[i].hi - uids->r[i].lo + 1 };

		if (seqmap_insert(m, m->n, run) < 0)
			return -1;
		m->count += run.len;
		if (m->n > 1)
			seqmap_merge_next(m, m->n - 2);
	}
	return 0;
}

int
seqmap_positions_of(const struct seqmap *m, const struct uidset *uids, struct uidset *out)
{
	for (size_t i = 0; i <= m->n; i++) {
		/* The gap of unknown positions before run i, and the UIDs it may hold. */
		uint64_t gap_seq = i > 0 ? (uint64_t)m->runs[i - 1].seq + m->runs[i - 1].len : 1;
		uint64_t gap_end = i < m->n ? m->runs[i].seq : (uint64_t)m->count + 1;
		uint64_t uid_lo = i > 0 ? (uint64_t)m->runs[i - 1].uid + m->runs[i - 1].len : 1;
		uint64_t uid_hi = i < m->n ? (uint64_t)m->runs[i].uid - 1 : UINT32_MAX;

		if (gap_end > gap_seq)
			for (size_t k = 0; k < uids->n; k++)
				if (uids->r[k].lo <= uid_hi && uids->r[k].hi >= uid_lo)
					return -1;
		if (i == m->n)
			break;
		{
			const struct seqmap_run *r = &m->runs[i];
			uint64_t rlo = r->uid, rhi = (uint64_t)r->uid + r->len - 1;

			for (size_t k = 0; k < uids->n; k++) {
				uint64_t lo = uids->r[k].lo > rlo ? uids->r[k].lo : rlo;
				uint64_t hi = uids->r[k].hi < rhi ? uids->r[k].hi : rhi;

				if (lo <= hi && uidset_add_range(out, (uint32_t)(r->seq + (lo - rlo)),
				    (uint32_t)(r->seq + (hi - rlo))) < 0)
					return -1;
			}
		}
	}
	return 0;
}
