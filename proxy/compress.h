/* compress: COMPRESS=DEFLATE (RFC 4978) towards the client, terminated here like TLS: a zlib filter bufferevent over the client's link. */
#ifndef COMPRESS_H
#define COMPRESS_H

#include <event2/bufferevent.h>

/* Wrap the client's bufferevent (plain or TLS) in raw DEFLATE both ways:
 * what is written to the result is compressed (flushed with every write,
 * so each batch of responses reaches the client whole), what is read is
 * decompressed. The underlying one is freed with it. NULL when out of
 * memory (the underlying one is then left as it was). */
struct bufferevent *compress_wrap(struct bufferevent *under);

/* Is this bufferevent a compression filter? */
int compress_active(struct bufferevent *bev);

#endif
