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

void
seqmap_expunge(struct seqmap *m, uint32_t seq)
{
	if (seq >= 1 && seq <= m->count)
		seqmap_remove_position(m, seq);
}

void
seqmap_vanished(struct seqmap *m, uint32_t uid)
{
	size_t i;

	for (i = 0; i < m->n; i++) {
		struct seqmap_run *r = &m->runs[i];
		if (uid < r->uid)
			break;
		if ((uint64_t)uid < (uint64_t)r->uid + r->len) {
			seqmap_remove_position(m, r->seq + (uid - r->uid));
			return;
		}
	}
	/* Unknown position: it can only be in the gap of unknown positions
	 * between the runs around its UID; without such a gap it is not here. */
	{
		uint64_t gap_first = i > 0 ? (uint64_t)m->runs[i - 1].seq + m->runs[i - 1].len : 1;
		uint64_t gap_last = i < m->n ? (uint64_t)m->runs[i].seq - 1 : m->count;

		if (gap_first > gap_last)
			return;
	}
	for (; i < m->n; i++)
		m->runs[i].seq--;
	if (m->count > 0)
		m->count--;
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

void
seqmap_learn(struct seqmap *m, uint32_t seq, uint32_t uid)
{
	size_t i;

	if (seq < 1 || uid == 0)
		return;
	if (seq > m->count)
		m->count = seq;	/* FETCH implies the message exists */
	for (i = 0; i < m->n && (uint64_t)m->runs[i].seq + m->runs[i].len <= seq; i++)
		;
	if (i < m->n && m->runs[i].seq <= seq) {
		struct seqmap_run *r = &m->runs[i];
		if ((uint64_t)r->uid + (seq - r->seq) == uid)
			return;
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
			return;
	}
	seqmap_merge_next(m, i);
	if (i > 0)
		seqmap_merge_next(m, i - 1);
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
