/* proxyproto: PROXY protocol v1/v2: reading a load balancer's header, writing one for the upstream. */
#ifndef PROXYPROTO_H
#define PROXYPROTO_H

#include <stddef.h>
#include <sys/socket.h>

#define PROXYPROTO_MAX_HEADER 536	/* v2: 16 + 520 bytes of addresses and TLVs; v1: 107 */

/* The networks whose connections must start with a header. */
struct proxyproto_trust;
int proxyproto_trust_parse(const char *list, struct proxyproto_trust **out);
void proxyproto_trust_free(struct proxyproto_trust *t);
int proxyproto_trusted(const struct proxyproto_trust *t, const struct sockaddr *peer);

enum proxyproto_result {
	PROXYPROTO_MORE = 0,	/* not enough bytes yet */
	PROXYPROTO_DONE = 1,	/* *used bytes are the header */
	PROXYPROTO_ERROR = -1,	/* not a valid header */
};

/* Parse the first len bytes the peer sent. On DONE, src holds the client's
 * address, or has family AF_UNSPEC for a LOCAL (health check) or UNKNOWN
 * header. err gets a reason on ERROR. No I/O. */
enum proxyproto_result proxyproto_parse(const unsigned char *buf, size_t len, size_t *used,
    struct sockaddr_storage *src, const char **err);

/* A header (version 1 or 2) saying src connected to dst; returns its length,
 * 0 when it does not fit or the families differ. */
size_t proxyproto_write(int version, const struct sockaddr *src, const struct sockaddr *dst,
    unsigned char *out, size_t outlen);

#endif
