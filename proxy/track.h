/* track: what a session's client knows of its mailbox, read from the commands and responses that pass. */
#ifndef TRACK_H
#define TRACK_H

#include <stdint.h>
#include <time.h>

#include "command.h"
#include "imap_lex.h"
#include "pending.h"
#include "seqmap.h"
#include "uidset.h"

struct session;
struct inflight;
struct store_user;

/* The kind of untagged response being read. */
enum track_resp {
	TRACK_RESP_OTHER,
	TRACK_RESP_EXISTS,
	TRACK_RESP_EXPUNGE,
	TRACK_RESP_FETCH,
	TRACK_RESP_SEARCH,
	TRACK_RESP_ESEARCH,
	TRACK_RESP_VANISHED,
	TRACK_RESP_STATUS,	/* OK/NO/BAD/BYE with resp-text */
	TRACK_RESP_ENABLED,	/* ENABLED: what the server enabled (RFC 5161) */
};

/* Names are heap strings as long as they are (an idle session's memory is
 * mostly what it holds), never NULL: "" until set (track_set_name()). */
struct track {
	char *user;			/* "" until authenticated */
	struct store_user *suser;	/* the user's generations, once authenticated */
	int selected;
	char *mailbox;			/* canonical name: INBOX upper-cased, UTF-8 */
	char *mailbox_wire;		/* as the client named it (the re-SELECT's) */
	int readonly, condstore;
	int qresync;			/* ENABLE QRESYNC: expunges are told as VANISHED (RFC 7162 3.2.10) */
	int utf8;			/* ENABLE UTF8=ACCEPT (RFC 6855) */
	uint32_t uidvalidity, uidnext;
	uint64_t highestmodseq;
	struct seqmap view;		/* the client's count and seq -> UID */
	struct pending pending;		/* expunges made upstream, not told to the client yet */
	uint64_t synced_gen;		/* generation the session last matched */
	int unheard;			/* selected while a change could go unheard: check once */
	uint64_t synced_epoch;		/* store epoch at that time */
	time_t last_sync;
	int dirty;			/* changed since the last store write */

	/* The response being read. */
	enum track_resp resp;
	uint32_t resp_num;		/* the number before EXISTS/EXPUNGE/FETCH */
	int fetch_uid_next;		/* the previous FETCH item was UID */
	uint32_t fetch_uid;
	int vanished_earlier;
	struct uidset vanished;		/* the UIDs of a VANISHED response, applied at its end */
	int esearch_all_next;		/* the next ESEARCH atom is the ALL set */
	uint32_t select_exists;		/* EXISTS seen in the current SELECT response */

	/* Where the results of imapfresh's own SEARCH and FETCH go (resync). */
	struct uidset *search_sink;
	struct seqmap *fetch_sink;
};

void track_init(struct track *t);
void track_free(struct track *t);

/* One name per mailbox, for generations: "INBOX" in any case is INBOX, a
 * modified UTF-7 name (a session without UTF8=ACCEPT) is decoded to UTF-8. */
/* *name = a copy of value ("" for NULL, or when out of memory). */
void track_set_name(char **name, const char *value);
void track_canonical_mailbox(const char *in, int utf8, char *out, size_t outlen);

/* A client command went upstream whole: note what its completion will mean. */
void track_command_sent(struct session *s, struct inflight *f, const struct command *cmd);

/* A client line in an AUTHENTICATE exchange (the user is read, not the password). */
void track_sasl_line(struct session *s, const char *line, size_t len);

/* Every token of every upstream response; to_client says whether the
 * response reaches the client (the view changes only when it does). */
void track_token(struct session *s, const struct imap_tok *tok);
void track_response_end(struct session *s, int to_client);

/* A response code's number: 1 when text[0..len) starts "[name n]" (name in
 * any case, n decimal digits that fit 64 bits), with n in *v. */
int track_code_value(const char *text, size_t len, const char *name, uint64_t *v);

/* The line at the start of p[0..len) read as "* num FETCH (UID uid ...":
 * 1 with num and uid, else 0. Only its prefix is read: whether the line is
 * whole and plain is imap_lex_plain_line()'s to say. A sync of a big mailbox
 * is thousands of these; they need no tokens. */
int track_fetch_line(const char *p, size_t len, uint32_t *num, uint32_t *uid);

/* What the tokens of such a line would have told the tracker; its end is
 * track_response_end() as usual. */
void track_fetch_seen(struct session *s, uint32_t num, uint32_t uid);

/* A FETCH's (seq, UID) reaching the client, into its view: how
 * track_response_end() ends one, and all a line after the first of a run
 * (session_upstream's fast path) needs. */
void track_fetch_next(struct session *s, uint32_t num, uint32_t uid);

/* A tagged completion of a client command. */
void track_completed(struct session *s, struct inflight *f, int ok, const char *text);

/* The session's mailbox is what the server holds as of generation gen. */
void track_synced(struct session *s, uint64_t gen);

/* Write the session's state to the store if it changed (one write per
 * completed command at most). */
void track_save(struct session *s);
/* Write it whether it changed or not (Redis regained: the key may be gone);
 * 1 when the session has state to write (an authenticated user). */
int track_save_again(struct session *s);
void track_forget(struct session *s);

#endif
