/* proxyproto: PROXY protocol v1/v2: reading a load balancer's header, writing one for the upstream. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "proxyproto.h"

static const unsigned char proxyproto_v2_sig[12] = {
	0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
};

struct proxyproto_net {
	int family;
	unsigned char addr[16];
	int bits;
};

struct proxyproto_trust {
	size_t n;
	struct proxyproto_net net[];
};

int
proxyproto_trust_parse(const char *list, struct proxyproto_trust **out)
{
	char buf[1024], *save = NULL;
	struct proxyproto_trust *t;
	size_t cap = 1;

	*out = NULL;
	for (const char *p = list; *p; p++)
		cap += *p == ',';
	if ((t = calloc(1, sizeof(*t) + cap * sizeof(t->net[0]))) == NULL)
		return -1;
	snprintf(buf, sizeof(buf), "%s", list);
	for (char *item = strtok_r(buf, ", ", &save); item != NULL; item = strtok_r(NULL, ", ", &save)) {
		struct proxyproto_net *n = &t->net[t->n];
		char *slash = strchr(item, '/');

		if (t->n == cap) {
			free(t);
			return -1;
		}
		n->family = strchr(item, ':') ? AF_INET6 : AF_INET;
		n->bits = n->family == AF_INET6 ? 128 : 32;
		if (slash != NULL) {
			*slash = '\0';
			n->bits = atoi(slash + 1);
		}
		if (inet_pton(n->family, item, n->addr) != 1 || n->bits < 0 ||
		    n->bits > (n->family == AF_INET6 ? 128 : 32)) {
			free(t);
			return -1;
		}
		t->n++;
	}
	*out = t;
	return 0;
}

void
proxyproto_trust_free(struct proxyproto_trust *t)
{
	free(t);
}

static int
proxyproto_prefix_match(const unsigned char *a, const unsigned char *b, int bits)
{
	int bytes = bits / 8, rest = bits % 8;

	if (memcmp(a, b, (size_t)bytes) != 0)
		return 0;
	return rest == 0 || ((a[bytes] ^ b[bytes]) & (0xff << (8 - rest))) == 0;
}

int
proxyproto_trusted(const struct proxyproto_trust *t, const struct sockaddr *peer)
{
	const unsigned char *addr;
	unsigned char mapped[4];
	int family = peer->sa_family;

	if (t == NULL)
		return 0;
	if (family == AF_INET)
		addr = (const unsigned char *)&((const struct sockaddr_in *)peer)->sin_addr;
	else if (family == AF_INET6) {
		addr = (const unsigned char *)&((const struct sockaddr_in6 *)peer)->sin6_addr;
		if (IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)addr)) {
			memcpy(mapped, addr + 12, 4);	/* ::ffff:10.0.0.1 is 10.0.0.1 */
			addr = mapped;
			family = AF_INET;
		}
	} else
		return 0;
	for (size_t i = 0; i < t->n; i++)
		if (t->net[i].family == family &&
		    proxyproto_prefix_match(t->net[i].addr, addr, t->net[i].bits))
			return 1;
	return 0;
}

static int
proxyproto_set_addr(struct sockaddr_storage *ss, int family, const char *host, const char *port)
{
	char *end;
	long p = strtol(port, &end, 10);

	if (*end != '\0' || end == port || p < 0 || p > 65535)
		return -1;
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)p);
		return inet_pton(AF_INET, host, &sin->sin_addr) == 1 ? 0 : -1;
	}
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = htons((uint16_t)p);
	return inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1 ? 0 : -1;
}

/* "PROXY TCP4 198.51.100.1 203.0.113.7 56324 143\r\n", at most 107 bytes. */
static enum proxyproto_result
proxyproto_parse_v1(const unsigned char *buf, size_t len, size_t *used,
    struct sockaddr_storage *src, const char **err)
{
	const unsigned char *crlf = NULL;
	char line[108], *w[6], *save = NULL;
	int n = 0;

	for (size_t i = 0; i + 1 < len && i < 107; i++)
		if (buf[i] == '\r' && buf[i + 1] == '\n') {
			crlf = buf + i;
			break;
		}
	if (crlf == NULL) {
		if (len >= 107) {
			*err = "PROXY v1 header without CRLF within 107 bytes";
			return PROXYPROTO_ERROR;
		}
		return PROXYPROTO_MORE;
	}
	memcpy(line, buf, (size_t)(crlf - buf));
	line[crlf - buf] = '\0';
	*used = (size_t)(crlf - buf) + 2;
	for (char *t = strtok_r(line, " ", &save); t != NULL && n < 6; t = strtok_r(NULL, " ", &save))
		w[n++] = t;
	memset(src, 0, sizeof(*src));
	if (n >= 2 && strcmp(w[1], "UNKNOWN") == 0)
		return PROXYPROTO_DONE;	/* the balancer does not know: keep the peer's address */
	if (n != 6 || (strcmp(w[1], "TCP4") != 0 && strcmp(w[1], "TCP6") != 0) ||
	    proxyproto_set_addr(src, w[1][3] == '4' ? AF_INET : AF_INET6, w[2], w[4]) < 0) {
		*err = "malformed PROXY v1 header";
		return PROXYPROTO_ERROR;
	}
	return PROXYPROTO_DONE;
}

static enum proxyproto_result
proxyproto_parse_v2(const unsigned char *buf, size_t len, size_t *used,
    struct sockaddr_storage *src, const char **err)
{
	size_t body;
	unsigned char cmd, fam;

	if (len < 16)
		return PROXYPROTO_MORE;
	body = ((size_t)buf[14] << 8) | buf[15];
	if ((buf[12] & 0xf0) != 0x20 || 16 + body > PROXYPROTO_MAX_HEADER) {
		*err = "unsupported PROXY v2 header";
		return PROXYPROTO_ERROR;
	}
	if (len < 16 + body)
		return PROXYPROTO_MORE;
	*used = 16 + body;
	memset(src, 0, sizeof(*src));
	cmd = buf[12] & 0x0f;
	fam = buf[13];
	if (cmd == 0x0)
		return PROXYPROTO_DONE;	/* LOCAL: the balancer's own health check */
	if (cmd != 0x1) {
		*err = "unknown PROXY v2 command";
		return PROXYPROTO_ERROR;
	}
	if (fam == 0x11 && body >= 12) {	/* TCP over IPv4 */
		struct sockaddr_in *sin = (struct sockaddr_in *)src;
		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, buf + 16, 4);
		memcpy(&sin->sin_port, buf + 24, 2);
	} else if (fam == 0x21 && body >= 36) {	/* TCP over IPv6 */
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)src;
		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, buf + 16, 16);
		memcpy(&sin6->sin6_port, buf + 48, 2);
	} else if (fam != 0x00) {
		*err = "unsupported PROXY v2 address family";
		return PROXYPROTO_ERROR;
	}
	return PROXYPROTO_DONE;
}

enum proxyproto_result
proxyproto_parse(const unsigned char *buf, size_t len, size_t *used, struct sockaddr_storage *src,
    const char **err)
{
	size_t n = len < sizeof(proxyproto_v2_sig) ? len : sizeof(proxyproto_v2_sig);

	*err = NULL;
	if (memcmp(buf, proxyproto_v2_sig, n) == 0)
		return len < sizeof(proxyproto_v2_sig) ? PROXYPROTO_MORE :
		    proxyproto_parse_v2(buf, len, used, src, err);
	n = len < 6 ? len : 6;
	if (memcmp(buf, "PROXY ", n) == 0)
		return len < 6 ? PROXYPROTO_MORE : proxyproto_parse_v1(buf, len, used, src, err);
	*err = "connection from a trusted address did not start with a PROXY header";
	return PROXYPROTO_ERROR;
}

size_t
proxyproto_write(int version, const struct sockaddr *src, const struct sockaddr *dst,
    unsigned char *out, size_t outlen)
{
	const struct sockaddr_in *s4 = (const void *)src, *d4 = (const void *)dst;
	const struct sockaddr_in6 *s6 = (const void *)src, *d6 = (const void *)dst;
	const void *sa, *da;
	uint16_t sp, dp;	/* network order */
	size_t alen, n;
	int v4;

	if (src->sa_family != dst->sa_family ||
	    (src->sa_family != AF_INET && src->sa_family != AF_INET6))
		return 0;
	v4 = src->sa_family == AF_INET;
	sa = v4 ? (const void *)&s4->sin_addr : (const void *)&s6->sin6_addr;
	da = v4 ? (const void *)&d4->sin_addr : (const void *)&d6->sin6_addr;
	sp = v4 ? s4->sin_port : s6->sin6_port;
	dp = v4 ? d4->sin_port : d6->sin6_port;
	alen = v4 ? 4 : 16;
	if (version == 1) {
		char a[INET6_ADDRSTRLEN], b[INET6_ADDRSTRLEN];
		int w;

		inet_ntop(src->sa_family, sa, a, sizeof(a));
		inet_ntop(src->sa_family, da, b, sizeof(b));
		w = snprintf((char *)out, outlen, "PROXY %s %s %s %u %u\r\n", v4 ? "TCP4" : "TCP6",
		    a, b, (unsigned)ntohs(sp), (unsigned)ntohs(dp));
		return w > 0 && (size_t)w < outlen ? (size_t)w : 0;
	}
	n = 16 + 2 * alen + 4;
	if (outlen < n)
		return 0;
	memcpy(out, proxyproto_v2_sig, 12);
	out[12] = 0x21;			/* version 2, PROXY */
	out[13] = v4 ? 0x11 : 0x21;	/* TCP over IPv4 / IPv6 */
	out[14] = 0;
	out[15] = (unsigned char)(n - 16);
	memcpy(out + 16, sa, alen);
	memcpy(out + 16 + alen, da, alen);
	memcpy(out + 16 + 2 * alen, &sp, 2);
	memcpy(out + 18 + 2 * alen, &dp, 2);
	return n;
}
