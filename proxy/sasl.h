/* sasl: reading the user name out of a SASL PLAIN response, never keeping the password. */
#ifndef SASL_H
#define SASL_H

#include <stddef.h>

/* b64 is the client's base64 PLAIN response (RFC 4616: [authzid] NUL authcid
 * NUL passwd). Writes the identity the session acts as (authzid when given,
 * else authcid) into user. Returns 0, or -1 when it is not a PLAIN message.
 * The decoded bytes are wiped before returning. */
int sasl_plain_user(const char *b64, size_t len, char *user, size_t userlen);

#endif
