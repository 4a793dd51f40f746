/* test_utf8: utf8_len() against a decoder that computes the code point, on every 1-3 byte input and random 4-byte ones. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "tap.h"
#include "utf8.h"

/* Decode, then refuse overlong forms, surrogates and what is past U+10FFFF. */
static size_t
ref_len(const unsigned char *p, size_t n)
{
	size_t len;
	uint32_t cp;

	if (n == 0)
		return 0;
	if (p[0] < 0x80)
		return 1;
	if ((p[0] & 0xe0) == 0xc0)
		len = 2, cp = p[0] & 0x1f;
	else if ((p[0] & 0xf0) == 0xe0)
		len = 3, cp = p[0] & 0x0f;
	else if ((p[0] & 0xf8) == 0xf0)
		len = 4, cp = p[0] & 0x07;
	else
		return 0;
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (p[i] & 0x3f);
	}
	if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
	    cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return len;
}

int
main(void)
{
	unsigned char b[4];
	unsigned long bad = 0, valid = 0;
	uint32_t seed = 7;

	for (uint32_t x = 0; x < (1u << 24); x++) {
		b[0] = (unsigned char)(x >> 16);
		b[1] = (unsigned char)(x >> 8);
		b[2] = (unsigned char)x;
		for (size_t n = 1; n <= 3; n++) {
			size_t got = utf8_len(b, n), want = ref_len(b, n);

			if (got != want && bad++ < 3)
				diag("%02x %02x %02x (%zu bytes): %zu, want %zu", b[0], b[1], b[2], n, got,
				    want);
			valid += got > 1;
		}
	}
	for (int k = 0; k < 4000000; k++) {
		seed = seed * 1103515245 + 12345;
		b[0] = (unsigned char)(0xf0 + (seed >> 28) % 8);	/* 4-byte leads and a few more */
		for (int i = 1; i < 4; i++) {
			seed = seed * 1103515245 + 12345;
			b[i] = (unsigned char)(seed >> 16);
			if (((seed >> 8) & 3) != 0)
				b[i] = (unsigned char)(0x80 | (b[i] & 0x3f));	/* mostly continuation bytes */
		}
		size_t got = utf8_len(b, 4), want = ref_len(b, 4);

		if (got != want && bad++ < 6)
			diag("%02x %02x %02x %02x: %zu, want %zu", b[0], b[1], b[2], b[3], got, want);
		valid += got == 4;
	}
	ok(bad == 0 && valid > 1000000, "utf8_len agrees with a decoder (%lu differences, %lu valid)",
	    bad, valid);
	b[0] = 0xe2;
	b[1] = 0x82;
	b[2] = '\0';
	ok(utf8_len(b, 4) == 0, "a NUL where a continuation byte belongs ends it");
	ok(utf8_len((const unsigned char *)"\xf0\x9f\x98\x80", 4) == 4 &&
	    utf8_len((const unsigned char *)"\xed\xa0\x80", 3) == 0 &&
	    utf8_len((const unsigned char *)"\xc0\xaf", 2) == 0, "U+1F600 yes; a surrogate, an overlong '/' no");
	return tap_done();
}
