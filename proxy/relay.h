/* relay: moving a session's bytes between its two sockets, and capping their unread input, with less work than libevent 2.1 does. */
#ifndef RELAY_H
#define RELAY_H

#include <stddef.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>

#define RELAY_MAX_IO (256 * 1024)	/* largest single read or write */

/* What a bufferevent is, asked once when it is set up: libevent answers
 * through locked control calls that cost more than a NOOP's write. */
enum relay_link {
	RELAY_FILTER = 0,	/* COMPRESS over a link: libevent's own I/O only */
	RELAY_SOCKET,		/* plain socket */
	RELAY_TLS,
};

enum relay_link relay_link_of(struct bufferevent *bev);
/* A plain socket bufferevent with a file descriptor reads through relay's
 * own read callback from now on (not libevent's, which makes a system call
 * more per read); the rest of the bufferevent is unchanged. Set its fd
 * (connect) first: bufferevent_setfd() puts libevent's callback back. */
void relay_read_hook(struct bufferevent *bev);
/* Raise libevent's per-call read and write sizes on bev. */
void relay_io_sizes(struct bufferevent *bev);
/* In a read callback of a plain socket bufferevent: read on past libevent's
 * 4 KiB, up to cap bytes of input. */
void relay_read_more(struct bufferevent *bev, enum relay_link link, size_t cap);
/* Bound bev's unread input to about cap bytes: for good on a TLS bufferevent,
 * and on the others through relay_input_cap_check() after each read. */
void relay_input_cap(struct bufferevent *bev, enum relay_link link, size_t cap);
void relay_input_cap_check(struct bufferevent *bev, enum relay_link link, size_t cap);
/* Move n bytes from the front of `from` to the peer `to`: into its socket
 * directly when it is a plain one and its output is empty, the rest into its
 * output buffer. */
void relay_move(struct bufferevent *to, enum relay_link link, struct evbuffer *from, size_t n);

#endif
