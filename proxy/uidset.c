/* uidset: a sorted set of UIDs kept as ranges, parsed from and written as IMAP sequence sets. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "uidset.h"

void
uidset_init(struct uidset *set)
{
	memset(set, 0, sizeof(*set));
}

void
uidset_clear(struct uidset *set)
{
	set->n = 0;
	set->count = 0;
}

void
uidset_free(struct uidset *set)
{
	free(set->r);
	uidset_init(set);
}

/* Index of the first range whose hi + 1 >= uid: where uid joins or goes. */
static size_t
uidset_lower(const struct uidset *set, uint32_t uid)
{
	size_t lo = 0, hi = set->n;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if ((uint64_t)set->r[mid].hi + 1 < uid)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

int
uidset_add_range(struct uidset *set, uint32_t lo, uint32_t hi)
{
	size_t i, j;

	if (lo > hi) {
		uint32_t t = lo;
		lo = hi;
		hi = t;
	}
	i = uidset_lower(set, lo);
	/* Ranges i..j-1 touch or overlap [lo, hi]: merge them into one. */
	for (j = i; j < set->n && (uint64_t)set->r[j].lo <= (uint64_t)hi + 1; j++) {
		set->count -= (uint64_t)set->r[j].hi - set->r[j].lo + 1;
		if (set->r[j].lo < lo)
			lo = set->r[j].lo;
		if (set->r[j].hi > hi)
			hi = set->r[j].hi;
	}
	if (j == i) {
		if (set->n == set->cap) {
			size_t cap = set->cap ? set->cap * 2 : 4;
			struct uidset_range *r = realloc(set->r, cap * sizeof(*r));
			if (r == NULL)
				return -1;
			set->r = r;
			set->cap = cap;
		}
		memmove(&set->r[i + 1], &set->r[i], (set->n - i) * sizeof(*set->r));
		set->n++;
	} else if (j > i + 1) {
		memmove(&set->r[i + 1], &set->r[j], (set->n - j) * sizeof(*set->r));
		set->n -= j - i - 1;
	}
	set->r[i].lo = lo;
	set->r[i].hi = hi;
	set->count += (uint64_t)hi - lo + 1;
	return 0;
}

int
uidset_add(struct uidset *set, uint32_t uid)
{
	return uidset_add_range(set, uid, uid);
}

int
uidset_contains(const struct uidset *set, uint32_t uid)
{
	size_t i = uidset_lower(set, uid);

	return i < set->n && set->r[i].lo <= uid && uid <= set->r[i].hi;
}

uint32_t
uidset_nth(const struct uidset *set, uint64_t k)
{
	for (size_t i = 0; i < set->n && k > 0; i++) {
		uint64_t len = (uint64_t)set->r[i].hi - set->r[i].lo + 1;
		if (k <= len)
			return set->r[i].lo + (uint32_t)(k - 1);
		k -= len;
	}
	return 0;
}

uint64_t
uidset_rank(const struct uidset *set, uint32_t uid)
{
	uint64_t before = 0;

	for (size_t i = 0; i < set->n; i++) {
		if (uid < set->r[i].lo)
			return 0;
		if (uid <= set->r[i].hi)
			return before + (uid - set->r[i].lo) + 1;
		before += (uint64_t)set->r[i].hi - set->r[i].lo + 1;
	}
	return 0;
}

int
uidset_covers(const struct uidset *set, uint32_t lo, uint32_t hi)
{
	size_t i = uidset_lower(set, lo);

	return i < set->n && set->r[i].lo <= lo && hi <= set->r[i].hi;
}

int
uidset_covers_any(const struct uidset *set, uint32_t lo, uint32_t hi)
{
	size_t i = uidset_lower(set, lo);

	if (i < set->n && set->r[i].hi < lo)
		i++;	/* it ends just below lo */
	return i < set->n && set->r[i].lo <= hi;
}

uint32_t
uidset_max(const struct uidset *set)
{
	return set->n ? set->r[set->n - 1].hi : 0;
}

int
uidset_equal(const struct uidset *a, const struct uidset *b)
{
	return a->n == b->n && a->count == b->count &&
	    (a->n == 0 || memcmp(a->r, b->r, a->n * sizeof(*a->r)) == 0);
}

static int
uidset_number(const char **p, const char *end, uint32_t *out)
{
	uint64_t v = 0;
	const char *start = *p;

	while (*p < end && **p >= '0' && **p <= '9') {
		v = v * 10 + (uint64_t)(**p - '0');
		if (v > UINT32_MAX)
			return -1;
		(*p)++;
	}
	if (*p == start || v == 0)
		return -1;
	*out = (uint32_t)v;
	return 0;
}

int
uidset_parse(struct uidset *set, const char *s, size_t len)
{
	const char *p = s, *end = s + len;

	while (p < end) {
		uint32_t lo, hi;

		if (*p == ',' || *p == ' ') {
			p++;
			continue;
		}
		if (uidset_number(&p, end, &lo) < 0)
			return -1;
		hi = lo;
		if (p < end && *p == ':') {
			p++;
			if (uidset_number(&p, end, &hi) < 0)
				return -1;
		}
		if (p < end && *p != ',' && *p != ' ')
			return -1;
		if (uidset_add_range(set, lo, hi) < 0)
			return -1;
	}
	return 0;
}

size_t
uidset_format(const struct uidset *set, char *buf, size_t len)
{
	size_t o = 0;

	if (len > 0)
		buf[0] = '\0';
	for (size_t i = 0; i < set->n; i++) {
		char part[32];
		int n = set->r[i].lo == set->r[i].hi ?
		    snprintf(part, sizeof(part), "%s%u", i ? "," : "", set->r[i].lo) :
		    snprintf(part, sizeof(part), "%s%u:%u", i ? "," : "", set->r[i].lo, set->r[i].hi);
		if (o + (size_t)n < len)
			memcpy(buf + o, part, (size_t)n + 1);
		o += (size_t)n;
	}
	return o;
}
