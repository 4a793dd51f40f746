/* loop: the process's event loop, optionally busy-polling after traffic. */
#include <stdint.h>
#include <time.h>

#include <event2/event.h>

#include "loop.h"
#include "server.h"

/* Grows whenever the proxy moves bytes or connections: the sign of traffic. */
static uint64_t
loop_traffic(const struct server *srv)
{
	const struct server_stats *st = &srv->stats;

	return st->accepted + st->closed + st->bytes_client_to_upstream +
	    st->bytes_upstream_to_client;
}

static uint64_t
loop_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* 0 while the loop should go on. */
static int
loop_once(struct server *srv, int flags)
{
	if (event_base_loop(srv->base, flags) != 0)
		return 1;	/* nothing left to wait for, or an error */
	return event_base_got_exit(srv->base) || event_base_got_break(srv->base);
}

/*
 * A round trip through a proxy wakes it twice, and waking a sleeping process
 * costs tens of microseconds on a virtual machine. With busy_poll the loop
 * polls without sleeping until busy_poll microseconds pass with no traffic,
 * so the next request of an active client finds it awake: lower latency for
 * a core kept busy while traffic flows. Like haproxy's busy-polling.
 */
void
loop_run(struct server *srv)
{
	for (;;) {
		uint64_t before = loop_traffic(srv), seen, until;

		if (loop_once(srv, EVLOOP_ONCE))
			return;
		/* A timer or a signal is no reason to stay awake. */
		if (srv->cfg.busy_poll == 0 || (seen = loop_traffic(srv)) == before)
			continue;
		until = loop_now_us() + (uint64_t)srv->cfg.busy_poll;
		do {
			uint64_t now, traffic;

			if (loop_once(srv, EVLOOP_NONBLOCK))
				return;
			now = loop_now_us();
			if ((traffic = loop_traffic(srv)) != seen) {
				seen = traffic;
				until = now + (uint64_t)srv->cfg.busy_poll;
			}
			if (now >= until)
				break;
		} while (srv->cfg.busy_poll > 0);
	}
}
