/* metrics: latency histograms and the Prometheus text rendering of every counter. */
/* STUB: to be replaced by the real implementation. */
#include <time.h>
#include "metrics.h"

void metrics_observe(struct metrics_histogram *h, uint64_t usec) { h->count++; h->sum_usec += usec; }
void metrics_render(struct server *srv, struct evbuffer *out) { (void)srv; (void)out; }
uint64_t
metrics_now_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
