/* memtrim: the heap's free pages back to the kernel once a burst of sessions is over. */
#ifndef MEMTRIM_H
#define MEMTRIM_H

#include <event2/event.h>

/* Quiet time after the last session started or ended before the trim. */
#define MEMTRIM_QUIET_MS 500

struct memtrim;

struct memtrim *memtrim_new(struct event_base *base);
/* A session started or ended: trim once MEMTRIM_QUIET_MS pass without another. */
void memtrim_note(struct memtrim *mt);
void memtrim_free(struct memtrim *mt);

#endif
