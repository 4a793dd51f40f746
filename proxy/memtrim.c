/* memtrim: the heap's free pages back to the kernel once a burst of sessions is over. */
#include <stdlib.h>
#include <sys/time.h>
#include "config-auto.h"
#ifdef HAVE_MALLOC_H
#include <malloc.h>
#endif
#include "log.h"
#include "memtrim.h"

/*
 * Setting a session up takes far more memory for a moment than the session
 * keeps: a TLS handshake's buffers (OpenSSL's init_buf and record buffers,
 * 16 KiB and more each), libevent's read chains, the upstream's login. When
 * many are set up side by side, that memory is freed between allocations the
 * sessions keep: glibc reuses it, but gives back to the kernel only the top
 * of the heap past M_TRIM_THRESHOLD (4 MiB, main.c), never a free page in
 * the middle. malloc_trim() does. Called once sessions stopped coming and
 * going for a moment: while they keep coming, their memory is reused anyway.
 */
struct memtrim {
	struct event *ev;
};

static void
memtrim_cb(evutil_socket_t fd, short what, void *arg)
{
	struct memtrim *mt = arg;
#ifdef HAVE_MALLOC_TRIM
	struct timeval t0, t1, d;

	gettimeofday(&t0, NULL);
	malloc_trim(0);
	gettimeofday(&t1, NULL);
	timersub(&t1, &t0, &d);
	log_debug("memtrim: heap trimmed in %ld us", (long)(d.tv_sec * 1000000 + d.tv_usec));
#endif
	(void)mt;
}

struct memtrim *
memtrim_new(struct event_base *base)
{
	struct memtrim *mt = calloc(1, sizeof(*mt));

	if (mt == NULL)
		return NULL;
	if ((mt->ev = evtimer_new(base, memtrim_cb, mt)) == NULL) {
		free(mt);
		return NULL;
	}
	return mt;
}

void
memtrim_note(struct memtrim *mt)
{
	static const struct timeval quiet = { 0, MEMTRIM_QUIET_MS * 1000 };

	if (mt != NULL)
		evtimer_add(mt->ev, &quiet);	/* pending: pushed back */
}

void
memtrim_free(struct memtrim *mt)
{
	if (mt == NULL)
		return;
	event_free(mt->ev);
	free(mt);
}
