/* capability: rewriting the upstream's capability lists to what the client can use through the proxy. */
#ifndef CAPABILITY_H
#define CAPABILITY_H

#include <stddef.h>

struct capability_policy {
	int offer_starttls;	/* client link is plaintext and a certificate is loaded */
	int login_disabled;	/* require_tls applies: LOGINDISABLED, no AUTH= */
	int offer_compress;	/* COMPRESS=DEFLATE, terminated by imapfresh (compress.c) */
};

/* Rewrite a space-separated capability list (no "CAPABILITY" word). out must
 * hold len + CAPABILITY_EXTRA bytes. Returns the output length. */
#define CAPABILITY_EXTRA 64
size_t capability_rewrite(const char *in, size_t len, const struct capability_policy *p, char *out);

/* Rewrite resp-text when it starts with a [CAPABILITY ...] code; other text is
 * copied as is. out must hold len + CAPABILITY_EXTRA bytes. With drop set the
 * code is removed instead (its list would describe a link the client never
 * sees, such as the upstream before upstream STARTTLS). */
size_t capability_rewrite_text(const char *in, size_t len, const struct capability_policy *p,
    int drop, char *out);

/* Does a capability list (or resp-text with a [CAPABILITY ...] code) name
 * this capability (any case)? */
int capability_has(const char *list, size_t len, const char *name);

/* Does resp-text start with a [CAPABILITY ...] code? */
int capability_in_text(const char *text, size_t len);

#endif
