/* utf8: how long the well-formed UTF-8 sequence at a byte is, for the escapers that show anything else as U+FFFD. */
#ifndef UTF8_H
#define UTF8_H

#include <stddef.h>

/* The length (1-4) of the well-formed UTF-8 sequence (RFC 3629: no overlong
 * forms, no surrogates, nothing past U+10FFFF) at p, of which avail bytes
 * may be read; 0 when there is none. A NUL-terminated string may pass 4:
 * reading stops at the first byte that is not a continuation byte. */
size_t utf8_len(const unsigned char *p, size_t avail);

#endif
