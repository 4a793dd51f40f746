/* uidset: a sorted set of UIDs kept as ranges, parsed from and written as IMAP sequence sets. */
#ifndef UIDSET_H
#define UIDSET_H

#include <stddef.h>
#include <stdint.h>

struct uidset_range {
	uint32_t lo, hi;	/* inclusive */
};

struct uidset {
	struct uidset_range *r;
	size_t n, cap;
	uint64_t count;		/* UIDs in the set */
};

void uidset_init(struct uidset *set);
void uidset_clear(struct uidset *set);
void uidset_free(struct uidset *set);

/* Add lo..hi (any order). Returns -1 only when out of memory. */
int uidset_add_range(struct uidset *set, uint32_t lo, uint32_t hi);
int uidset_add(struct uidset *set, uint32_t uid);
int uidset_contains(const struct uidset *set, uint32_t uid);

/* The k-th smallest UID (k from 1), 0 when k is out of range. */
uint32_t uidset_nth(const struct uidset *set, uint64_t k);

/* 1-based position of uid among the set's UIDs, 0 when absent. */
uint64_t uidset_rank(const struct uidset *set, uint32_t uid);

uint32_t uidset_max(const struct uidset *set);
/* Does the set hold every UID from lo to hi? */
int uidset_covers(const struct uidset *set, uint32_t lo, uint32_t hi);
/* Does it hold any UID from lo to hi? */
int uidset_covers_any(const struct uidset *set, uint32_t lo, uint32_t hi);
int uidset_equal(const struct uidset *a, const struct uidset *b);

/* Parse "1:5,7,9:12" (a sequence set without '*'), or with space as the
 * separator as in "* SEARCH 1 2 3". Returns -1 on bad syntax. */
int uidset_parse(struct uidset *set, const char *s, size_t len);

/* Write "1:5,7" into buf (NUL-terminated, "" for an empty set). Returns the
 * length it needs, like snprintf. */
size_t uidset_format(const struct uidset *set, char *buf, size_t len);

#endif
