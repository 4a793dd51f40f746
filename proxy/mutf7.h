/* mutf7: IMAP's modified UTF-7 mailbox names (RFC 3501 5.1.3) decoded to UTF-8, so that one mailbox has one name whatever form a session uses (RFC 6855). */
#ifndef MUTF7_H
#define MUTF7_H

#include <stddef.h>

/* Decode in (NUL-terminated) into out as UTF-8. Returns 0, or -1 when in is
 * not valid modified UTF-7 (then out is untouched) or out is too small. */
int mutf7_to_utf8(const char *in, char *out, size_t outlen);

#endif
