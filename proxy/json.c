/* json: a string member out of a small flat JSON object (webhook bodies, API answers), and a string written as JSON. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <event2/buffer.h>

#include "json.h"
#include "utf8.h"

char *
json_string_member(const char *body, const char *key)
{
	size_t klen = strlen(key);
	const char *p = body;

	while ((p = strchr(p, '"')) != NULL) {
		const char *q = p + 1;
		char *out, *o;

		if (strncmp(q, key, klen) != 0 || q[klen] != '"') {
			/* skip this string whole, escapes included */
			for (q = p + 1; *q && *q != '"'; q++)
				if (*q == '\\' && q[1])
					q++;
			if (*q == '\0')
				return NULL;
			p = q + 1;
			continue;
		}
		q += klen + 1;
		q += strspn(q, " \t\r\n");
		if (*q != ':') {	/* a value that looks like the key */
			p = q;
			continue;
		}
		q++;
		q += strspn(q, " \t\r\n");
		if (*q++ != '"' || (out = malloc(strlen(q) + 1)) == NULL)
			return NULL;
		for (o = out; *q && *q != '"'; q++) {
			if (*q == '\\' && q[1]) {
				q++;
				if (*q == 'u') {	/* \uXXXX: only what a mailbox name needs, as UTF-8 */
					unsigned cp = 0;
					if (sscanf(q + 1, "%4x", &cp) != 1 || cp == 0) {
						free(out);
						return NULL;
					}
					q += 4;
					if (cp < 0x80)
						*o++ = (char)cp;
					else if (cp < 0x800) {
						*o++ = (char)(0xc0 | (cp >> 6));
						*o++ = (char)(0x80 | (cp & 0x3f));
					} else {
						*o++ = (char)(0xe0 | (cp >> 12));
						*o++ = (char)(0x80 | ((cp >> 6) & 0x3f));
						*o++ = (char)(0x80 | (cp & 0x3f));
					}
					continue;
				}
				*o++ = *q == 'n' ? '\n' : *q == 't' ? '\t' : *q == 'r' ? '\r' : *q;
				continue;
			}
			*o++ = *q;
		}
		if (*q != '"') {
			free(out);
			return NULL;
		}
		*o = '\0';
		return out;
	}
	return NULL;
}


void
json_write_string(struct evbuffer *out, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n;

	if (s == NULL) {
		evbuffer_add(out, "null", 4);
		return;
	}
	n = strlen(s);
	evbuffer_add(out, "\"", 1);
	while (n > 0) {
		size_t run = 0, k;

		/* Plain bytes go out in runs. */
		while (run < n && p[run] >= 0x20 && p[run] < 0x7f && p[run] != '"' &&
		    p[run] != '\\')
			run++;
		if (run > 0) {
			evbuffer_add(out, p, run);
			p += run;
			n -= run;
			continue;
		}
		switch (*p) {
		case '"': evbuffer_add(out, "\\\"", 2); k = 1; break;
		case '\\': evbuffer_add(out, "\\\\", 2); k = 1; break;
		case '\n': evbuffer_add(out, "\\n", 2); k = 1; break;
		case '\r': evbuffer_add(out, "\\r", 2); k = 1; break;
		case '\t': evbuffer_add(out, "\\t", 2); k = 1; break;
		default:
			if (*p < 0x20 || *p == 0x7f) {
				evbuffer_add_printf(out, "\\u%04x", *p);
				k = 1;
			} else if ((k = utf8_len(p, n)) > 0)
				evbuffer_add(out, p, k);
			else {
				evbuffer_add(out, "\\ufffd", 6);
				k = 1;
			}
			break;
		}
		p += k;
		n -= k;
	}
	evbuffer_add(out, "\"", 1);
}
