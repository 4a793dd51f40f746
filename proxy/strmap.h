/* strmap: a string-keyed hash map whose entries (and keys) stay put while it grows. */
#ifndef STRMAP_H
#define STRMAP_H

#include <stddef.h>
#include <stdint.h>

/* Chained, heap-allocated entries: a pointer to one stays good until it is
 * deleted. A zeroed struct strmap is an empty map; to walk it, follow each
 * of the nb chains in b. */
struct strmap_entry {
	struct strmap_entry *next;
	uint32_t hash;
	char *key;
	union {
		void *ptr;
		uint64_t n;
	} v;
};

struct strmap {
	struct strmap_entry **b;
	size_t nb, n;
};

/* key's entry, or NULL. */
struct strmap_entry *strmap_find(const struct strmap *m, const char *key);

/* The entry for key, created zeroed when missing; NULL when out of memory. */
struct strmap_entry *strmap_get(struct strmap *m, const char *key);

/* Unlink and free key's entry; its value is the caller's. */
void strmap_del(struct strmap *m, const char *key);

/* Free every entry, and with free_value each v.ptr; the map is empty again. */
void strmap_clear(struct strmap *m, void (*free_value)(void *));

#endif
