/* metrics: latency histograms and the Prometheus text rendering of every counter. */
#ifndef METRICS_H
#define METRICS_H

#include <stdint.h>

struct server;
struct evbuffer;

/* Fixed buckets, 100 us to 10 s (metrics_bucket_usec); slower is only in +Inf. */
#define METRICS_BUCKETS 16
extern const uint64_t metrics_bucket_usec[METRICS_BUCKETS];	/* upper bounds, inclusive */

struct metrics_histogram {
	uint64_t count;
	uint64_t sum_usec;
	uint64_t bucket[METRICS_BUCKETS];	/* per bucket; made cumulative at render time */
};

struct metrics {
	struct metrics_histogram command_latency;	/* forwarded -> tagged completion */
	struct metrics_histogram upstream_connect;	/* connect start -> upstream ready */
	struct metrics_histogram resync_latency;	/* trigger held -> released */
};

void metrics_observe(struct metrics_histogram *h, uint64_t usec);

/* Every counter, gauge and histogram of srv, Prometheus text format 0.0.4. */
void metrics_render(struct server *srv, struct evbuffer *out);

/* Monotonic microseconds, for latencies. */
uint64_t metrics_now_usec(void);

#endif
