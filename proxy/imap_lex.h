/* imap_lex: an I/O-free, literal-aware IMAP tokenizer for both directions: bytes in, tokens out. */
#ifndef IMAP_LEX_H
#define IMAP_LEX_H

#include <stddef.h>
#include <stdint.h>

/*
 * Usage: the caller owns the bytes. It calls imap_lex_next() with a window of
 * input; the lexer consumes some prefix of it (reported in *used) and either
 * produces one token (returns IMAP_LEX_TOKEN) or needs more input (returns
 * IMAP_LEX_MORE, having consumed the whole window). Token strings point either
 * into the caller's window (LITERAL_DATA) or into the lexer's own buffer, and
 * stay valid only until the next call.
 *
 * A "command" (client mode) or "response" (server mode) is the sequence of
 * tokens up to IMAP_TOK_EOL, literals included: a literal announcement
 * ({n}, {n+}, ~{n}) ends a physical line but not the command.
 *
 * Feeding the same bytes split at any points yields the same token sequence
 * (LITERAL_DATA chunks may be split differently; their concatenation is the
 * same).
 *
 * Call imap_lex_next() until it returns IMAP_LEX_MORE: a token may be owed
 * without consuming anything (LITERAL_END once the payload is complete, the
 * EOL after an error), so a call with len == 0 (buf may then be NULL) can
 * still return a token. A token is returned as soon as it is known, without
 * consuming what follows it: an atom ends at the SP, ')' or CR that follows,
 * and a LITERAL is returned right after its CRLF, payload untouched.
 *
 * Positions: LIST_BEGIN and LIST_END carry the list's own index and the depth
 * outside the list; tokens inside have that index and depth >= 1. EOL's index
 * is the number of top-level items and its depth the number of lists left
 * unclosed (0 normally; the line is not rejected for it). ERROR carries the
 * position where the failed item started.
 *
 * Lines end with CRLF or a bare LF; a CR not followed by LF and a NUL outside
 * literal payloads are syntax errors. Atoms may hold 8-bit bytes but no CTL
 * and no '{' ('{' only starts a literal at the start of a token).
 */

enum imap_lex_mode {
	IMAP_LEX_CLIENT,	/* commands sent by a client */
	IMAP_LEX_SERVER,	/* responses sent by a server */
};

enum imap_tok_type {
	IMAP_TOK_ATOM,		/* atom, number, tag, NIL, flag (\Seen), "*", "+";
				   brackets are part of the atom and may contain
				   spaces and parens: BODY[HEADER.FIELDS (FROM)]<0.5> */
	IMAP_TOK_QUOTED,	/* quoted string, unescaped */
	IMAP_TOK_LIST_BEGIN,	/* ( */
	IMAP_TOK_LIST_END,	/* ) */
	IMAP_TOK_LITERAL,	/* {n} {n+} ~{n}: size and flags set; the payload follows */
	IMAP_TOK_LITERAL_DATA,	/* a chunk of literal payload (str/len into the window) */
	IMAP_TOK_LITERAL_END,	/* the payload is complete */
	IMAP_TOK_TEXT,		/* the rest of a line as raw text, without CRLF:
				   server mode: resp-text after OK/NO/BAD/BYE/PREAUTH
				   (including any [code]), and continuation text after "+";
				   client mode: a line after imap_lex_expect_text_line() */
	IMAP_TOK_EOL,		/* end of the command/response */
	IMAP_TOK_ERROR,		/* err set; see below */
};

#define IMAP_LIT_NONSYNC 0x1	/* {n+}: LITERAL+ / LITERAL- */
#define IMAP_LIT_BINARY 0x2	/* ~{n}: literal8 */

enum imap_lex_err {
	IMAP_LEX_ERR_NONE = 0,
	IMAP_LEX_ERR_SYNTAX,		/* malformed input: NUL, bare CR, bad literal, unbalanced ), ... */
	IMAP_LEX_ERR_TOO_LONG,		/* a line (literals excluded) over max_line, or a token over max_token */
	IMAP_LEX_ERR_LITERAL_TOO_BIG,	/* a literal announced over max_literal; size and flags are set */
};

struct imap_tok {
	enum imap_tok_type type;
	const char *str;	/* ATOM, QUOTED, TEXT, LITERAL_DATA: not NUL-terminated */
	size_t len;
	uint64_t literal_size;	/* LITERAL (and LITERAL_TOO_BIG errors) */
	unsigned literal_flags;	/* IMAP_LIT_* */
	unsigned index;		/* position of this token among the top-level
				   tokens of the command/response: 0 is the tag */
	unsigned depth;		/* list nesting depth at this token (0 = top) */
	enum imap_lex_err err;
	const char *errmsg;	/* ERROR: short human-readable reason */
};

/* imap_lex_new()/imap_lex_set_limits() with NULL limits: 64 KiB line and
 * token, literals unlimited. max_token 0 is taken as 1. */
struct imap_lex_limits {
	size_t max_line;	/* bytes of one command/response excluding literal
				   payloads; 0 = unlimited */
	size_t max_token;	/* bytes of one atom/quoted/text token; must be > 0 */
	uint64_t max_literal;	/* largest literal accepted; 0 = unlimited */
};

enum imap_lex_status {
	IMAP_LEX_MORE = 0,	/* window consumed, no token */
	IMAP_LEX_TOKEN = 1,	/* *tok filled */
};

struct imap_lex;

struct imap_lex *imap_lex_new(enum imap_lex_mode mode, const struct imap_lex_limits *limits);
void imap_lex_free(struct imap_lex *lx);
void imap_lex_set_limits(struct imap_lex *lx, const struct imap_lex_limits *limits);

enum imap_lex_status imap_lex_next(struct imap_lex *lx, const char *buf, size_t len,
    size_t *used, struct imap_tok *tok);

/*
 * Error recovery: after an IMAP_TOK_ERROR the lexer skips the rest of the
 * failed command and then emits IMAP_TOK_EOL (so every command ends with
 * exactly one EOL). While skipping it still honours literals so the stream
 * never desynchronises: a non-synchronizing literal's payload (or, in server
 * mode, any literal's payload) is skipped too; in client mode a synchronizing
 * literal at the end of a skipped line ends the command there, because the
 * client will not send the payload until it gets a "+" it will never get.
 * A LITERAL_TOO_BIG error follows the same rule for the literal it names.
 */

/* Client mode: the consumer refuses a synchronizing literal it was just given
 * (IMAP_TOK_LITERAL returned, no payload consumed yet): the client will not
 * send it, so the next byte starts a new command. No EOL is emitted.
 * For a non-synchronizing literal (or in server mode) the payload comes
 * anyway, so it and the rest of the command are skipped, then EOL is emitted.
 * Called at any other time it does nothing. */
void imap_lex_reject_literal(struct imap_lex *lx);

/* The next line (which must not have started yet) is raw text: one TEXT token
 * (possibly empty) then EOL. Used for AUTHENTICATE responses from the client.
 * Called mid-command, it applies to the line after the current command. */
void imap_lex_expect_text_line(struct imap_lex *lx);

/* While in a literal payload: bytes of it not yet consumed. 0 otherwise. */
uint64_t imap_lex_literal_remaining(const struct imap_lex *lx);

/* Consume n payload bytes the caller moved on its own (n <= remaining), without
 * seeing them; the next imap_lex_next() emits LITERAL_END when the payload is done.
 * A larger n is clamped to what remains. */
void imap_lex_skip_literal(struct imap_lex *lx, uint64_t n);

/* True between tokens at the very start of a command/response. */
int imap_lex_at_command_start(const struct imap_lex *lx);

/* At a command's start with nothing owed to the next line (no text line
 * expected): as good as a new lexer with the same limits. */
int imap_lex_at_rest(const struct imap_lex *lx);

/* Between commands: give back a token buffer that grew for a long token, so
 * a quiet session keeps only the small one it started with. */
void imap_lex_shrink(struct imap_lex *lx);

/*
 * At a line start, the length (CRLF included) of the complete line at the
 * start of buf[0..len) when it is plain: no literal, no '[', no NUL, CTL or
 * bare CR outside quoted strings, parens that never close below the top, and
 * within the limits. Such a line lexes to tokens and one EOL with no error, so
 * a consumer that needs none of its tokens may take it whole and leave the
 * lexer where it is. 0 when that is not sure: lex it as usual.
 */
size_t imap_lex_plain_line(const struct imap_lex *lx, const char *buf, size_t len);

#endif
