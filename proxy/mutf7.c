/* mutf7: IMAP's modified UTF-7 mailbox names (RFC 3501 5.1.3) decoded to UTF-8, so that one mailbox has one name whatever form a session uses (RFC 6855). */
#include <stdint.h>
#include <string.h>

#include "mutf7.h"

/* RFC 3501 5.1.3: modified BASE64 uses ',' for '/'. */
static int
mutf7_b64(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == ',')
		return 63;
	return -1;
}

static int
mutf7_put(char *out, size_t outlen, size_t *o, uint32_t cp)
{
	char b[4];
	size_t n;

	if (cp < 0x80) {
		b[0] = (char)cp;
		n = 1;
	} else if (cp < 0x800) {
		b[0] = (char)(0xc0 | (cp >> 6));
		b[1] = (char)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		b[0] = (char)(0xe0 | (cp >> 12));
		b[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		b[2] = (char)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		b[0] = (char)(0xf0 | (cp >> 18));
		b[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		b[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
		b[3] = (char)(0x80 | (cp & 0x3f));
		n = 4;
	}
	if (*o + n >= outlen)
		return -1;
	memcpy(out + *o, b, n);
	*o += n;
	return 0;
}

int
mutf7_to_utf8(const char *in, char *out, size_t outlen)
{
	char tmp[4096];
	size_t o = 0;

	if (outlen > sizeof(tmp))
		outlen = sizeof(tmp);
	for (const char *p = in; *p; ) {
		uint32_t bits = 0, high = 0;
		int nbits = 0, units = 0;

		if ((unsigned char)*p >= 0x80 || (unsigned char)*p < 0x20)
			return -1;	/* 8-bit or control: not modified UTF-7 */
		if (*p != '&') {
			if (o + 1 >= outlen)
				return -1;
			tmp[o++] = *p++;
			continue;
		}
		if (p[1] == '-') {	/* "&-" is '&' */
			if (o + 1 >= outlen)
				return -1;
			tmp[o++] = '&';
			p += 2;
			continue;
		}
		for (p++; *p && *p != '-'; p++) {
			int v = mutf7_b64(*p);

			if (v < 0)
				return -1;
			bits = (bits << 6) | (uint32_t)v;
			nbits += 6;
			if (nbits < 16)
				continue;
			nbits -= 16;
			uint32_t u = (bits >> nbits) & 0xffff;
			units++;
			if (high) {
				if (u < 0xdc00 || u > 0xdfff)
					return -1;
				if (mutf7_put(tmp, outlen, &o, 0x10000 + ((high - 0xd800) << 10) +
				    (u - 0xdc00)) < 0)
					return -1;
				high = 0;
			} else if (u >= 0xd800 && u <= 0xdbff)
				high = u;
			else if ((u >= 0xdc00 && u <= 0xdfff) || (u >= 0x20 && u < 0x7f) ||
			    mutf7_put(tmp, outlen, &o, u) < 0)
				return -1;	/* a lone low surrogate, or printable ASCII encoded */
		}
		/* the run ends with '-', whole code units, and zero padding bits */
		if (*p != '-' || units == 0 || high || nbits >= 6 ||
		    (bits & ((1u << nbits) - 1)) != 0)
			return -1;
		p++;
	}
	tmp[o] = '\0';
	memcpy(out, tmp, o + 1);
	return 0;
}
