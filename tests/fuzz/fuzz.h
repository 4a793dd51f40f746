/* fuzz: what every fuzz target provides and the helpers they share (see tests/README.md). */
#ifndef FUZZ_H
#define FUZZ_H

#include <stddef.h>
#include <stdint.h>

/* Each target defines both (libFuzzer's entry points; driver.c calls them
 * in the replay build too). Returns 0; a broken invariant aborts. */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant does not hold: print it and abort (a crash for libFuzzer,
 * a failed input for the replay driver). */
void fuzz_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

#define FUZZ_CHECK(cond, ...) do { \
	if (!(cond)) \
		fuzz_fail(__FILE__, __LINE__, "check failed: " #cond " -- " __VA_ARGS__); \
} while (0)

/* A growing byte string (token stream renderings). */
struct fuzz_buf {
	unsigned char *p;
	size_t len, cap;
};

void fuzz_buf_add(struct fuzz_buf *b, const void *data, size_t n);
void fuzz_buf_free(struct fuzz_buf *b);
/* Printable rendering of bytes for failure messages (static buffer). */
const char *fuzz_escape(const void *data, size_t n, size_t max);

/* A little-endian reader over the fuzz input, for targets that take options
 * and operations from it; reading past the end gives zeros. */
struct fuzz_in {
	const uint8_t *p;
	size_t len, pos;
};

static inline uint8_t
fuzz_u8(struct fuzz_in *in)
{
	return in->pos < in->len ? in->p[in->pos++] : 0;
}

static inline uint32_t
fuzz_u32(struct fuzz_in *in)
{
	uint32_t v = 0;

	for (int i = 0; i < 4; i++)
		v |= (uint32_t)fuzz_u8(in) << (8 * i);
	return v;
}

static inline int
fuzz_more(const struct fuzz_in *in)
{
	return in->pos < in->len;
}

#endif
