/* renumber: a session's client keeps its message numbers while the server's differ (expunges held back, pending.h): commands in, responses out, and when the held expunges may be told. */
#ifndef RENUMBER_H
#define RENUMBER_H

#include <stddef.h>

#include "command.h"
#include "imap_lex.h"

struct session;

#define RENUMBER_SETS 16

/* The sequence sets of the client command being read, where they lie in
 * the segment not yet forwarded (s->busy->cline). */
struct renumber_cmd {
	unsigned n;
	struct {
		uint32_t off, len;	/* within one command segment (max_line bounds it) */
	} at[RENUMBER_SETS];
	int overflow;		/* more sets than fit: the command cannot be renumbered */
	/* the search-key walker (SEARCH, SORT, THREAD) */
	unsigned keys_from;	/* top-level index where search keys begin */
	unsigned skip;		/* arguments of the last key still to pass over */
	int skip_list;		/* passing over a list argument ... */
	unsigned list_depth;	/* ... that closes at this depth */
	int modseq;		/* after MODSEQ: an entry name means two more arguments */
};

void renumber_cmd_reset(struct renumber_cmd *rc);

/* A token of a client command, its bytes the last of s->busy->cline (end = its length). */
void renumber_client_token(struct session *s, const struct imap_tok *tok, size_t end);

/* At the first segment's end: the response to give instead of forwarding
 * (the command names only expunged messages, or would copy one), or NULL. */
const char *renumber_client_refusal(struct session *s);

/* Just before the segment in s->busy->cline goes upstream: its sequence sets in
 * the server's numbering. Returns 1 when they named a held message. */
int renumber_client_rewrite(struct session *s);

/* May the client hear of an expunge now (RFC 3501 7.4.1)? */
int renumber_expunge_allowed(const struct session *s);

/* Tell the client the held expunges, when it may hear them. */
void renumber_flush(struct session *s);

/* Does a response of this kind carry message numbers to renumber: a SEARCH,
 * SORT or ESEARCH answering a command that is not a UID one? */
int renumber_search_response(const struct session *s);

#endif
