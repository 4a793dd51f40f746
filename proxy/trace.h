/* trace: protocol traces of the sessions an operator picked, every secret redacted. */
#ifndef TRACE_H
#define TRACE_H

#include <stddef.h>

#include "imap_lex.h"

struct server;
struct session;
struct evbuffer;

enum trace_dir {
	TRACE_C2P,	/* client to proxy */
	TRACE_P2U,	/* proxy to upstream */
	TRACE_U2P,	/* upstream to proxy */
	TRACE_P2C,	/* proxy to client */
};

/* What became of a line imapfresh read (recorded with it). */
enum trace_fate {
	TRACE_FORWARDED,	/* sent on unchanged */
	TRACE_REWRITTEN,	/* sent on changed (the new line is recorded too) */
	TRACE_HIDDEN,		/* consumed by imapfresh: an answer to its own command */
	TRACE_REFUSED,		/* answered by imapfresh, never sent upstream */
	TRACE_HELD,		/* kept back while a resync runs; forwarded later */
	TRACE_LOCAL,		/* handled by imapfresh (STARTTLS) */
};

/* Process-wide: which sessions are traced. spec is "off", "all",
 * "user NAME", "client ADDR" (an address, or address prefix ending in '.' or
 * ':'), optionally followed by " bodies" to record literal payloads instead
 * of their size and hash. -1 with err set on a bad spec. Sessions already
 * running are re-evaluated at once. */
int trace_set(struct server *srv, const char *spec, char *err, size_t errlen);
const char *trace_get(const struct server *srv);	/* the spec in force */
void trace_free_rules(struct server *srv);

/* (Re)decide whether s is traced: at connect, and when its user becomes
 * known. Sets or clears s->trace. */
void trace_session_update(struct session *s);
void trace_session_end(struct session *s);

/* Every token of every line read from the client (C2P) or the upstream
 * (U2P). secret: the token is a password, a SASL response or part of one;
 * it is recorded as "<redacted>". */
void trace_token(struct session *s, enum trace_dir dir, const struct imap_tok *tok, int secret);

/* Literal payload bytes that bypassed the lexer (bulk moves): n bytes at the
 * front of buf. */
void trace_literal_bytes(struct session *s, enum trace_dir dir, struct evbuffer *buf, size_t n);

/* The line just read in direction dir (C2P or U2P) is complete and this is
 * what happened to it. */
void trace_fate(struct session *s, enum trace_dir dir, enum trace_fate fate);

/* A line imapfresh wrote itself: an injected command (P2U, injected set), a
 * rewritten or synthesised response (P2C). line has no CRLF. */
void trace_line(struct session *s, enum trace_dir dir, const char *line, size_t len, int injected);

#endif
