/* relay: moving a session's bytes between its two sockets with fewer syscalls than libevent 2.1 makes. */
#ifndef RELAY_H
#define RELAY_H

#include <stddef.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>

#define RELAY_MAX_IO (256 * 1024)	/* largest single read or write */

/* Raise libevent's per-call read and write sizes on bev. */
void relay_io_sizes(struct bufferevent *bev);
/* In a read callback of a plain socket bufferevent: read on past libevent's
 * 4 KiB, up to cap bytes of input. */
void relay_read_more(struct bufferevent *bev, size_t cap);
/* Move n bytes from the front of `from` to the peer `to`: into its socket
 * directly when its output is empty, the rest into its output buffer. */
void relay_move(struct bufferevent *to, struct evbuffer *from, size_t n);

#endif
