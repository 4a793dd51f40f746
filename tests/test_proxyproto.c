/* test_proxyproto: PROXY v1/v2 headers parsed at every split, written and read back, trust lists. */
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "proxyproto.h"
#include "tap.h"

static const char *
addr_str(const struct sockaddr_storage *ss, char *buf, size_t len)
{
	const void *a = ss->ss_family == AF_INET ? (const void *)&((const struct sockaddr_in *)ss)->sin_addr :
	    (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr;
	unsigned port = ntohs(ss->ss_family == AF_INET ? ((const struct sockaddr_in *)ss)->sin_port :
	    ((const struct sockaddr_in6 *)ss)->sin6_port);
	char ip[INET6_ADDRSTRLEN];

	if (ss->ss_family == AF_UNSPEC)
		return "unspec";
	inet_ntop(ss->ss_family, a, ip, sizeof(ip));
	snprintf(buf, len, "%s/%u", ip, port);
	return buf;
}

/* Parse header+trailer fed as growing prefixes: MORE until the header is whole. */
static void
check_parse(const char *name, const unsigned char *hdr, size_t hlen, const char *want)
{
	unsigned char buf[700];
	struct sockaddr_storage ss;
	const char *err;
	size_t used = 0, bad = 0;
	char got[80];

	memcpy(buf, hdr, hlen);
	memcpy(buf + hlen, "a1 NOOP\r\n", 9);	/* what follows must not be consumed */
	for (size_t n = 1; n < hlen; n++)
		bad += proxyproto_parse(buf, n, &used, &ss, &err) != PROXYPROTO_MORE;
	ok(bad == 0, "%s: every prefix asks for more (%zu did not)", name, bad);
	ok(proxyproto_parse(buf, hlen + 9, &used, &ss, &err) == PROXYPROTO_DONE && used == hlen &&
	    strcmp(addr_str(&ss, got, sizeof(got)), want) == 0,
	    "%s: parsed as %s, %zu bytes used (got %s)", name, want, used, got);
}

static void
check_error(const char *name, const char *hdr)
{
	struct sockaddr_storage ss;
	const char *err = NULL;
	size_t used;

	ok(proxyproto_parse((const unsigned char *)hdr, strlen(hdr), &used, &ss, &err) ==
	    PROXYPROTO_ERROR && err != NULL, "%s refused (%s)", name, err ? err : "no reason");
}

int
main(void)
{
	const char *v1 = "PROXY TCP4 192.0.2.10 198.51.100.1 50123 143\r\n";
	const char *v1u = "PROXY UNKNOWN\r\n";
	const char *v16 = "PROXY TCP6 2001:db8::1 2001:db8::2 4000 993\r\n";
	unsigned char out[PROXYPROTO_MAX_HEADER];
	struct sockaddr_in src = { 0 }, dst = { 0 };
	struct sockaddr_in6 src6 = { 0 }, dst6 = { 0 };
	struct proxyproto_trust *t;
	size_t n;

	check_parse("v1 TCP4", (const unsigned char *)v1, strlen(v1), "192.0.2.10/50123");
	check_parse("v1 TCP6", (const unsigned char *)v16, strlen(v16), "2001:db8::1/4000");
	check_parse("v1 UNKNOWN", (const unsigned char *)v1u, strlen(v1u), "unspec");
	check_error("not a header", "a1 LOGIN x y\r\n");
	check_error("v1 with a bad address", "PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n");
	check_error("v1 with a bad port", "PROXY TCP4 1.1.1.1 1.1.1.1 99999 2\r\n");
	check_error("v1 with too few fields", "PROXY TCP4 1.1.1.1\r\n");
	{
		char longline[200];
		memset(longline, 'x', sizeof(longline));
		memcpy(longline, "PROXY ", 6);
		longline[sizeof(longline) - 1] = '\0';
		check_error("v1 without CRLF in 107 bytes", longline);
	}

	src.sin_family = dst.sin_family = AF_INET;
	inet_pton(AF_INET, "203.0.113.5", &src.sin_addr);
	inet_pton(AF_INET, "10.1.2.3", &dst.sin_addr);
	src.sin_port = htons(41000);
	dst.sin_port = htons(143);
	n = proxyproto_write(2, (struct sockaddr *)&src, (struct sockaddr *)&dst, out, sizeof(out));
	ok(n == 28, "v2 IPv4 header is 28 bytes (%zu)", n);
	check_parse("v2 TCP4 written by us", out, n, "203.0.113.5/41000");
	n = proxyproto_write(1, (struct sockaddr *)&src, (struct sockaddr *)&dst, out, sizeof(out));
	ok(n > 0 && memcmp(out, "PROXY TCP4 203.0.113.5 10.1.2.3 41000 143\r\n", n) == 0,
	    "v1 written: %.*s", (int)n - 2, out);
	check_parse("v1 written by us", out, n, "203.0.113.5/41000");
	src6.sin6_family = dst6.sin6_family = AF_INET6;
	inet_pton(AF_INET6, "2001:db8::7", &src6.sin6_addr);
	inet_pton(AF_INET6, "2001:db8::8", &dst6.sin6_addr);
	src6.sin6_port = htons(5);
	n = proxyproto_write(2, (struct sockaddr *)&src6, (struct sockaddr *)&dst6, out, sizeof(out));
	check_parse("v2 TCP6 written by us", out, n, "2001:db8::7/5");
	ok(proxyproto_write(2, (struct sockaddr *)&src, (struct sockaddr *)&dst6, out, sizeof(out)) == 0,
	    "mixed families give no header");
	{
		unsigned char local[16];
		memcpy(local, out, 12);	/* the v2 signature */
		local[12] = 0x20;	/* LOCAL: a health check */
		local[13] = 0x00;
		local[14] = local[15] = 0;
		check_parse("v2 LOCAL", local, 16, "unspec");
	}

	ok(proxyproto_trust_parse("10.0.0.0/8, 192.0.2.7, ::1, 2001:db8::/32", &t) == 0, "trust list");
	inet_pton(AF_INET, "10.200.3.4", &src.sin_addr);
	ok(proxyproto_trusted(t, (struct sockaddr *)&src), "10.200.3.4 in 10.0.0.0/8");
	inet_pton(AF_INET, "11.0.0.1", &src.sin_addr);
	ok(!proxyproto_trusted(t, (struct sockaddr *)&src), "11.0.0.1 not trusted");
	inet_pton(AF_INET, "192.0.2.8", &src.sin_addr);
	ok(!proxyproto_trusted(t, (struct sockaddr *)&src), "a single address is /32");
	inet_pton(AF_INET6, "::ffff:10.9.9.9", &src6.sin6_addr);
	ok(proxyproto_trusted(t, (struct sockaddr *)&src6), "an IPv4-mapped address matches its IPv4 network");
	inet_pton(AF_INET6, "2001:db9::1", &src6.sin6_addr);
	ok(!proxyproto_trusted(t, (struct sockaddr *)&src6), "2001:db9::1 not in 2001:db8::/32");
	proxyproto_trust_free(t);
	ok(proxyproto_trust_parse("10.0.0.0/33", &t) < 0, "a bad prefix length is refused");
	ok(proxyproto_trust_parse("", &t) == 0 && !proxyproto_trusted(t, (struct sockaddr *)&src),
	    "an empty list trusts nobody");
	proxyproto_trust_free(t);
	return tap_done();
}
