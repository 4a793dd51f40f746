/* strmap: a string-keyed hash map whose entries (and keys) stay put while it grows. */
#include <stdlib.h>
#include <string.h>

#include "strmap.h"

static uint32_t
strmap_hash(const char *s)
{
	uint32_t h = 2166136261u;	/* FNV-1a */

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

struct strmap_entry *
strmap_find(const struct strmap *m, const char *key)
{
	uint32_t h = strmap_hash(key);
	struct strmap_entry *e;

	if (m->nb == 0)
		return NULL;
	for (e = m->b[h & (m->nb - 1)]; e; e = e->next)
		if (e->hash == h && strcmp(e->key, key) == 0)
			return e;
	return NULL;
}

/* Double the buckets once entries outnumber them; chains are relinked, not copied. */
static int
strmap_grow(struct strmap *m)
{
	size_t nb = m->nb ? m->nb * 2 : 16, i;
	struct strmap_entry **b = calloc(nb, sizeof *b), *e, *next;

	if (!b)
		return -1;
	for (i = 0; i < m->nb; i++)
		for (e = m->b[i]; e; e = next) {
			next = e->next;
			e->next = b[e->hash & (nb - 1)];
			b[e->hash & (nb - 1)] = e;
		}
	free(m->b);
	m->b = b;
	m->nb = nb;
	return 0;
}

struct strmap_entry *
strmap_get(struct strmap *m, const char *key)
{
	struct strmap_entry *e = strmap_find(m, key);
	size_t slot;

	if (e)
		return e;
	if (m->n >= m->nb && strmap_grow(m) < 0)
		return NULL;
	if (!(e = calloc(1, sizeof *e)) || !(e->key = strdup(key))) {
		free(e);
		return NULL;
	}
	e->hash = strmap_hash(key);
	slot = e->hash & (m->nb - 1);
	e->next = m->b[slot];
	m->b[slot] = e;
	m->n++;
	return e;
}

void
strmap_del(struct strmap *m, const char *key)
{
	struct strmap_entry **p, *e;

	if (m->nb == 0)
		return;
	for (p = &m->b[strmap_hash(key) & (m->nb - 1)]; (e = *p); p = &e->next)
		if (strcmp(e->key, key) == 0) {
			*p = e->next;
			free(e->key);
			free(e);
			m->n--;
			return;
		}
}

void
strmap_clear(struct strmap *m, void (*free_value)(void *))
{
	struct strmap_entry *e, *next;
	size_t i;

	for (i = 0; i < m->nb; i++)
		for (e = m->b[i]; e; e = next) {
			next = e->next;
			if (free_value)
				free_value(e->v.ptr);
			free(e->key);
			free(e);
		}
	free(m->b);
	memset(m, 0, sizeof *m);
}
