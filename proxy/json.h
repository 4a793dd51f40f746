/* json: a string member out of a small flat JSON object (webhook bodies, API answers), and a string written as JSON. */
#ifndef JSON_H
#define JSON_H

/* The string value of member key in body ({"user":"...","folder":"INBOX"}),
 * unescaped (\\uXXXX as UTF-8), malloc'd; NULL when absent or not a string.
 * Members are found by name at any depth: enough for the flat objects read
 * here (Dovecot's push_notification "ox" body, WildDuck's answers). */
char *json_string_member(const char *body, const char *key);

struct evbuffer;
/* s as a JSON string (RFC 8259 7): quote, backslash and control bytes
 * escaped, well-formed UTF-8 as it is, any other byte as U+FFFD; NULL as
 * null. */
void json_write_string(struct evbuffer *out, const char *s);

#endif
