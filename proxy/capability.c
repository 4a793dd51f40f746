/* capability: rewriting the upstream's capability lists to what the client can use through the proxy. */
#include <string.h>
#include <strings.h>

#include "capability.h"

static int
capability_has_prefix(const char *s, size_t len, const char *prefix)
{
	size_t n = strlen(prefix);

	return len >= n && strncasecmp(s, prefix, n) == 0;
}

static int
capability_is(const char *s, size_t len, const char *name)
{
	return len == strlen(name) && strncasecmp(s, name, len) == 0;
}

/* What the upstream says about its own link, or what imapfresh cannot carry. */
static int
capability_dropped(const char *s, size_t len, const struct capability_policy *p)
{
	return capability_is(s, len, "STARTTLS") || capability_is(s, len, "LOGINDISABLED") ||
	    capability_has_prefix(s, len, "COMPRESS=") ||
	    (p->login_disabled && capability_has_prefix(s, len, "AUTH="));
}

static size_t
capability_append(char *out, size_t o, const char *s, size_t len)
{
	if (o > 0)
		out[o++] = ' ';
	memcpy(out + o, s, len);
	return o + len;
}

size_t
capability_rewrite(const char *in, size_t len, const struct capability_policy *p, char *out)
{
	size_t i = 0, o = 0;

	while (i < len) {
		size_t start, n;

		while (i < len && in[i] == ' ')
			i++;
		start = i;
		while (i < len && in[i] != ' ')
			i++;
		n = i - start;
		if (n > 0 && !capability_dropped(in + start, n, p))
			o = capability_append(out, o, in + start, n);
	}
	if (p->offer_starttls)
		o = capability_append(out, o, "STARTTLS", 8);
	if (p->login_disabled)
		o = capability_append(out, o, "LOGINDISABLED", 13);
	if (p->offer_compress)
		o = capability_append(out, o, "COMPRESS=DEFLATE", 16);
	return o;
}

int
capability_in_text(const char *text, size_t len)
{
	return capability_has_prefix(text, len, "[CAPABILITY ");
}

size_t
capability_rewrite_text(const char *in, size_t len, const struct capability_policy *p,
    int drop, char *out)
{
	const char *close;
	size_t code = sizeof("[CAPABILITY ") - 1, o = 0, rest;

	if (!capability_in_text(in, len) || (close = memchr(in, ']', len)) == NULL) {
		memcpy(out, in, len);
		return len;
	}
	rest = (size_t)(close - in) + 1;
	if (!drop) {
		memcpy(out, in, code);
		o = code + capability_rewrite(in + code, (size_t)(close - in) - code, p, out + code);
		out[o++] = ']';
	} else if (rest < len && in[rest] == ' ')
		rest++;	/* no leading space once the code is gone */
	memcpy(out + o, in + rest, len - rest);
	return o + len - rest;
}

int
capability_has(const char *list, size_t len, const char *name)
{
	size_t n = strlen(name), i = 0;

	while (i < len) {
		size_t start;

		while (i < len && (list[i] == ' ' || list[i] == '[' || list[i] == ']'))
			i++;
		start = i;
		while (i < len && list[i] != ' ' && list[i] != ']')
			i++;
		if (i - start == n && strncasecmp(list + start, name, n) == 0)
			return 1;
		if (i < len && list[i] == ']')
			break;	/* the end of a [CAPABILITY ...] code */
	}
	return 0;
}
