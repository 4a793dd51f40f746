/* imap_lex: turns windows of IMAP bytes (either direction) into tokens, literal-aware, with bounded memory and no I/O. */
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "imap_lex.h"

/*
 * Edge cases, chosen after Dovecot's lib-imap imap-parser.c:
 * - CRLF ends a line; a bare LF does too (Dovecot accepts it everywhere,
 *   also after a literal announcement). A CR not followed by LF is a syntax
 *   error ("CR sent without LF" in Dovecot).
 * - NUL outside literal payloads is a syntax error: Dovecot rejects it in
 *   atoms and quoted strings; we also reject it in TEXT, where Dovecot does
 *   not look.
 * - Other CTLs (and DEL) are errors in atoms and between tokens but allowed
 *   inside quoted strings and TEXT, as RFC 3501 TEXT-CHAR allows them.
 * - Unlike Dovecot, 8-bit bytes are accepted in atoms: we forward, the
 *   server judges.
 * - '{' inside an atom is a syntax error, as in Dovecot: a literal must not
 *   hide inside an atom. Error recovery still honours a {n}/{n+} that ends
 *   the line, so the stream stays in sync either way.
 * - '(' and '"' right after an atom end it (no SP needed); ')' ends it too.
 * - In a quoted string a backslash escapes any next byte (Dovecot's
 *   str_unescape does the same); CR, LF and NUL are errors even if escaped.
 */

/* What may continue a fast run of a token, per byte. */
#define CA 0x1	/* atom byte needing no attention */
#define CQ 0x2	/* byte taken as is inside "..." */
#define CT 0x4	/* byte taken as is in TEXT */
#define CP 0x8	/* byte of a plain line needing no attention, outside "..." */

static const unsigned char imap_lex_cls[256] = {
	[0x01 ... 0x09] = CQ | CT,
	[0x0b ... 0x0c] = CQ | CT,
	[0x0e ... 0x1f] = CQ | CT,
	[' '] = CQ | CT | CP,
	['!'] = CA | CQ | CT | CP,
	['"'] = CT,
	['#' ... '\''] = CA | CQ | CT | CP,
	['('] = CQ | CT,
	[')'] = CQ | CT,
	['*' ... 'Z'] = CA | CQ | CT | CP,
	['['] = CQ | CT,
	['\\'] = CA | CT | CP,
	[']'] = CQ | CT | CP,
	['^' ... 'z'] = CA | CQ | CT | CP,
	['{'] = CQ | CT,
	['|' ... '~'] = CA | CQ | CT | CP,
	[0x7f] = CQ | CT,
	[0x80 ... 0xff] = CA | CQ | CT | CP,
};

enum imap_lex_state {
	LX_START,	/* between tokens */
	LX_ATOM,	/* in an atom; brackets tracked by bracket/bquote */
	LX_QUOTED,	/* in "..." */
	LX_QUOTED_ESC,	/* after a backslash in "..." */
	LX_TILDE,	/* '~' at token start: literal8 or an atom */
	LX_LIT_SIZE,	/* after '{': digits */
	LX_LIT_PLUS,	/* after '{n+': want '}' */
	LX_LIT_CR,	/* after '}': want CRLF or LF */
	LX_LIT_LF,	/* after '}' CR: want LF */
	LX_LIT_DATA,	/* literal payload, lit_left bytes to go */
	LX_CR,		/* CR between tokens: want LF */
	LX_STATUS,	/* server: after OK/NO/BAD/BYE/PREAUTH at index 1 */
	LX_CONT,	/* server: after the "+" tag */
	LX_TEXT,	/* raw text up to the end of the line */
	LX_SKIP,	/* error recovery: skipping to the end of the line */
	LX_SKIP_DATA,	/* error recovery: skipping a literal payload */
	LX_EOL,		/* EOL owed, nothing to consume */
};

/* While skipping, how far the line's tail looks like "{digits[+]}" CR. */
enum imap_lex_tail {
	SK_NONE,
	SK_DIGITS,
	SK_PLUS,
	SK_CLOSE,
	SK_CLOSE_CR,
};

struct imap_lex {
	enum imap_lex_mode mode;
	struct imap_lex_limits lim;
	enum imap_lex_state st;

	char *tbuf;		/* the token being built; never more than max_token */
	size_t tlen, tcap;

	size_t line;		/* bytes of this command so far, payloads excluded */
	unsigned index, depth;
	unsigned bracket;	/* '[' nesting inside the current atom */
	unsigned char bquote;	/* 1: in "..." in brackets, 2: after its backslash */
	unsigned char fresh;	/* no byte of the command consumed yet */
	unsigned char text_next;
	unsigned char textline;	/* the line has reached TEXT: no literals on it */

	uint64_t lit_size, lit_left;
	unsigned lit_flags, lit_digits;

	enum imap_lex_tail sk;
	uint64_t sk_size;
	unsigned sk_digits;
	unsigned char sk_nonsync;
};

#define IMAP_LEX_DEFAULT_MAX 65536
#define IMAP_LEX_MAX_DIGITS 20
#define IMAP_LEX_START_CAP 64	/* token buffer bytes of a new or quiet lexer */

void
imap_lex_set_limits(struct imap_lex *lx, const struct imap_lex_limits *limits)
{
	if (limits != NULL) {
		lx->lim = *limits;
	} else {
		lx->lim.max_line = IMAP_LEX_DEFAULT_MAX;
		lx->lim.max_token = IMAP_LEX_DEFAULT_MAX;
		lx->lim.max_literal = 0;
	}
	/* The '+' tag needs one byte of token buffer. */
	if (lx->lim.max_token == 0)
		lx->lim.max_token = 1;
}

struct imap_lex *
imap_lex_new(enum imap_lex_mode mode, const struct imap_lex_limits *limits)
{
	struct imap_lex *lx;

	lx = calloc(1, sizeof(*lx));
	if (lx == NULL)
		return NULL;
	lx->mode = mode;
	imap_lex_set_limits(lx, limits);
	/* Start small: most tokens are short, and there is one lexer per direction per session. */
	lx->tcap = lx->lim.max_token < IMAP_LEX_START_CAP ? lx->lim.max_token : IMAP_LEX_START_CAP;
	lx->tbuf = malloc(lx->tcap);
	if (lx->tbuf == NULL) {
		free(lx);
		return NULL;
	}
	lx->st = LX_START;
	lx->fresh = 1;
	return lx;
}

void
imap_lex_free(struct imap_lex *lx)
{
	if (lx == NULL)
		return;
	free(lx->tbuf);
	free(lx);
}

/* Grow the token buffer to hold need bytes; callers keep need <= max_token. */
static int
imap_lex_reserve(struct imap_lex *lx, size_t need)
{
	size_t cap = lx->tcap;
	char *nb;

	if (need <= cap)
		return 0;
	while (cap < need)
		cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
	if (cap > lx->lim.max_token && need <= lx->lim.max_token)
		cap = lx->lim.max_token;
	nb = realloc(lx->tbuf, cap);
	if (nb == NULL)
		return -1;
	lx->tbuf = nb;
	lx->tcap = cap;
	return 0;
}

/* Account for one byte of the command line; 0 when that breaks max_line. */
static int
imap_lex_count(struct imap_lex *lx)
{
	if (lx->lim.max_line != 0 && lx->line >= lx->lim.max_line)
		return 0;
	lx->line++;
	lx->fresh = 0;
	return 1;
}

/* Append p[*pos] to the token; NULL, or why it could not. */
static const char *
imap_lex_put(struct imap_lex *lx, const unsigned char *p, size_t *pos)
{
	if (lx->tlen >= lx->lim.max_token)
		return "token too long";
	if (!imap_lex_count(lx))
		return "line too long";
	if (imap_lex_reserve(lx, lx->tlen + 1) < 0)
		return "out of memory";
	lx->tbuf[lx->tlen++] = (char)p[(*pos)++];
	return NULL;
}

/*
 * The hot path: append the run of bytes of class cl at p[*pos..len) in one
 * go. The run is cut exactly where a limit would be crossed, so errors (and
 * hence recovery) happen at the same byte however the input is split.
 * Returns NULL, or why the run could not go on.
 */
static const char *
imap_lex_run(struct imap_lex *lx, const unsigned char *p, size_t len, size_t *pos,
    unsigned char cl)
{
	size_t i = *pos, end = len, room, n;
	const char *why = "token too long";

	room = lx->tlen < lx->lim.max_token ? lx->lim.max_token - lx->tlen : 0;
	if (lx->lim.max_line != 0 && lx->lim.max_line - lx->line < room) {
		room = lx->lim.max_line - lx->line;
		why = "line too long";
	}
	if (end - i > room)
		end = i + room;
	while (i < end && (imap_lex_cls[p[i]] & cl))
		i++;
	n = i - *pos;
	if (n > 0) {
		if (imap_lex_reserve(lx, lx->tlen + n) < 0)
			return "out of memory";
		memcpy(lx->tbuf + lx->tlen, p + *pos, n);
		lx->tlen += n;
		lx->line += n;
		lx->fresh = 0;
		*pos = i;
	}
	if (i == end && i < len && (imap_lex_cls[p[i]] & cl))
		return why;
	return NULL;
}

static enum imap_lex_status
imap_lex_emit(struct imap_lex *lx, struct imap_tok *tok, enum imap_tok_type type,
    const char *s, size_t n)
{
	*tok = (struct imap_tok){
		.type = type, .str = s, .len = n,
		.index = lx->index, .depth = lx->depth,
	};
	return IMAP_LEX_TOKEN;
}

/* A top-level item is complete: the next one gets the next index. */
static void
imap_lex_done(struct imap_lex *lx)
{
	if (lx->depth == 0)
		lx->index++;
}

static void
imap_lex_reset(struct imap_lex *lx)
{
	lx->st = LX_START;
	lx->index = 0;
	lx->depth = 0;
	lx->line = 0;
	lx->tlen = 0;
	lx->bracket = 0;
	lx->bquote = 0;
	lx->sk = SK_NONE;
	lx->textline = 0;
	lx->fresh = 1;
}

/* EOL carries the number of top-level items and any unclosed depth. */
static enum imap_lex_status
imap_lex_eol(struct imap_lex *lx, struct imap_tok *tok)
{
	imap_lex_emit(lx, tok, IMAP_TOK_EOL, NULL, 0);
	if (lx->depth > 0)
		tok->index++;
	imap_lex_reset(lx);
	return IMAP_LEX_TOKEN;
}

static enum imap_lex_status
imap_lex_fail(struct imap_lex *lx, struct imap_tok *tok, enum imap_lex_err err, const char *msg)
{
	imap_lex_emit(lx, tok, IMAP_TOK_ERROR, NULL, 0);
	tok->err = err;
	tok->errmsg = msg;
	/* Hand a half-read literal announcement over to the skipper, which must
	   still notice it if the line ends right after it. */
	lx->sk = SK_NONE;
	lx->sk_size = lx->lit_size;
	lx->sk_digits = lx->lit_digits;
	lx->sk_nonsync = (lx->lit_flags & IMAP_LIT_NONSYNC) != 0;
	switch (lx->st) {
	case LX_LIT_SIZE:
		lx->sk = SK_DIGITS;
		break;
	case LX_LIT_PLUS:
		lx->sk = SK_PLUS;
		break;
	case LX_LIT_CR:
		lx->sk = SK_CLOSE;
		break;
	case LX_LIT_LF:
		lx->sk = SK_CLOSE_CR;
		break;
	default:
		break;
	}
	lx->st = LX_SKIP;
	lx->fresh = 0;
	lx->bracket = 0;
	lx->bquote = 0;
	return IMAP_LEX_TOKEN;
}

static int
imap_lex_ieq(const char *s, size_t n, const char *word)
{
	size_t i;

	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c >= 'a' && c <= 'z')
			c -= 'a' - 'A';
		if (word[i] == '\0' || c != (unsigned char)word[i])
			return 0;
	}
	return word[n] == '\0';
}

static int
imap_lex_is_status(const char *s, size_t n)
{
	return imap_lex_ieq(s, n, "OK") || imap_lex_ieq(s, n, "NO") ||
	    imap_lex_ieq(s, n, "BAD") || imap_lex_ieq(s, n, "BYE") ||
	    imap_lex_ieq(s, n, "PREAUTH");
}

static enum imap_lex_status
imap_lex_atom_done(struct imap_lex *lx, struct imap_tok *tok)
{
	imap_lex_emit(lx, tok, IMAP_TOK_ATOM, lx->tbuf, lx->tlen);
	lx->st = LX_START;
	lx->bracket = 0;
	/* resp-text is free-form (unbalanced quotes, braces, parens), so it
	   must not be tokenized. */
	if (lx->mode == IMAP_LEX_SERVER && lx->depth == 0 && lx->index == 1 &&
	    imap_lex_is_status(lx->tbuf, lx->tlen))
		lx->st = LX_STATUS;
	imap_lex_done(lx);
	return IMAP_LEX_TOKEN;
}

/*
 * The common case in one go: a plain atom (no brackets), wholly inside the
 * window and within the limits, ended by SP, a paren, a quote or the line end.
 * Anything else (a bracket, the window's end, a limit, an invalid byte) leaves
 * the state untouched for the byte-exact path of LX_ATOM. Returns 1 when the
 * atom is in tbuf and consumed.
 */
static int
imap_lex_atom_fast(struct imap_lex *lx, const unsigned char *p, size_t len, size_t *pos)
{
	size_t i = *pos + 1, n;
	unsigned char c;

	while (i < len && (imap_lex_cls[p[i]] & CA))
		i++;
	if (i == len)
		return 0;
	c = p[i];
	if (c != ' ' && c != ')' && c != '(' && c != '"' && c != '\r' && c != '\n')
		return 0;
	n = i - *pos;
	if (n > lx->lim.max_token || (lx->lim.max_line != 0 && lx->lim.max_line - lx->line < n) ||
	    imap_lex_reserve(lx, n) < 0)
		return 0;
	memcpy(lx->tbuf, p + *pos, n);
	lx->tlen = n;
	lx->line += n;
	lx->fresh = 0;
	lx->bquote = 0;
	*pos = i;
	return 1;
}

/* A complete "{n}" CRLF: hand out the literal, or refuse it by max_literal. */
static enum imap_lex_status
imap_lex_literal(struct imap_lex *lx, struct imap_tok *tok)
{
	if (lx->lim.max_literal != 0 && lx->lit_size > lx->lim.max_literal) {
		imap_lex_emit(lx, tok, IMAP_TOK_ERROR, NULL, 0);
		tok->err = IMAP_LEX_ERR_LITERAL_TOO_BIG;
		tok->errmsg = "literal too big";
		tok->literal_size = lx->lit_size;
		tok->literal_flags = lx->lit_flags;
		lx->sk = SK_NONE;
		/* A client waiting for "+" sends nothing more of this command. */
		if (lx->mode == IMAP_LEX_CLIENT && !(lx->lit_flags & IMAP_LIT_NONSYNC)) {
			lx->st = LX_EOL;
		} else {
			lx->lit_left = lx->lit_size;
			lx->st = LX_SKIP_DATA;
		}
		return IMAP_LEX_TOKEN;
	}
	imap_lex_emit(lx, tok, IMAP_TOK_LITERAL, NULL, 0);
	tok->literal_size = lx->lit_size;
	tok->literal_flags = lx->lit_flags;
	lx->lit_left = lx->lit_size;
	lx->st = LX_LIT_DATA;
	return IMAP_LEX_TOKEN;
}

static void
imap_lex_lit_begin(struct imap_lex *lx, unsigned flags)
{
	lx->lit_size = 0;
	lx->lit_digits = 0;
	lx->lit_flags = flags;
	lx->st = LX_LIT_SIZE;
}

/* Error recovery: skip to the end of the line, watching its tail for a
   literal announcement. Returns 1 at the end of the command. */
static int
imap_lex_skip(struct imap_lex *lx, const unsigned char *p, size_t len, size_t *pos)
{
	size_t i = *pos;
	unsigned char c;
	unsigned d;

	while (i < len) {
		if (lx->textline) {
			/* Normal lexing would not have seen a literal here either. */
			while (i < len && p[i] != '\n')
				i++;
			if (i == len)
				break;
		} else if (lx->sk == SK_NONE) {
			while (i < len && p[i] != '\n' && p[i] != '{')
				i++;
			if (i == len)
				break;
		}
		c = p[i++];
		switch (c) {
		case '\n':
			*pos = i;
			if (lx->sk != SK_CLOSE && lx->sk != SK_CLOSE_CR)
				return 1;
			if (lx->mode == IMAP_LEX_CLIENT && !lx->sk_nonsync)
				return 1;
			lx->lit_left = lx->sk_size;
			lx->sk = SK_NONE;
			lx->st = LX_SKIP_DATA;
			return 0;
		case '{':
			lx->sk = SK_DIGITS;
			lx->sk_size = 0;
			lx->sk_digits = 0;
			lx->sk_nonsync = 0;
			break;
		case '+':
			if (lx->sk == SK_DIGITS && lx->sk_digits > 0) {
				lx->sk = SK_PLUS;
				lx->sk_nonsync = 1;
			} else {
				lx->sk = SK_NONE;
			}
			break;
		case '}':
			if ((lx->sk == SK_DIGITS && lx->sk_digits > 0) || lx->sk == SK_PLUS)
				lx->sk = SK_CLOSE;
			else
				lx->sk = SK_NONE;
			break;
		case '\r':
			lx->sk = lx->sk == SK_CLOSE ? SK_CLOSE_CR : SK_NONE;
			break;
		default:
			d = (unsigned)(c - '0');
			if (d <= 9 && lx->sk == SK_DIGITS && lx->sk_digits < IMAP_LEX_MAX_DIGITS &&
			    lx->sk_size <= (UINT64_MAX - d) / 10) {
				lx->sk_size = lx->sk_size * 10 + d;
				lx->sk_digits++;
			} else {
				lx->sk = SK_NONE;
			}
			break;
		}
	}
	*pos = i;
	return 0;
}

#define LINE_TOO_LONG(lx, tok) \
	imap_lex_fail((lx), (tok), IMAP_LEX_ERR_TOO_LONG, "line too long")

/* One token, or MORE with the window used up; *pos is what was consumed. */
static enum imap_lex_status
imap_lex_step(struct imap_lex *lx, const unsigned char *p, size_t len, size_t *pos,
    struct imap_tok *tok)
{
	const char *why;
	unsigned char c;
	size_t n;

	for (;;) {
		switch (lx->st) {
		case LX_START:
			if (*pos == len)
				return IMAP_LEX_MORE;
			if (lx->fresh && lx->text_next) {
				lx->text_next = 0;
				lx->fresh = 0;
				lx->tlen = 0;
				lx->textline = 1;
				lx->st = LX_TEXT;
				continue;
			}
			c = p[*pos];
			switch (c) {
			case ' ':
				/* Lenient: any number of spaces, even leading ones. */
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				continue;
			case '\r':
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				lx->st = LX_CR;
				continue;
			case '\n':
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				return imap_lex_eol(lx, tok);
			case '(':
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				imap_lex_emit(lx, tok, IMAP_TOK_LIST_BEGIN, NULL, 0);
				lx->depth++;
				return IMAP_LEX_TOKEN;
			case ')':
				if (lx->depth == 0)
					return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "unexpected ')'");
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				lx->depth--;
				imap_lex_emit(lx, tok, IMAP_TOK_LIST_END, NULL, 0);
				imap_lex_done(lx);
				return IMAP_LEX_TOKEN;
			case '"':
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				lx->tlen = 0;
				lx->st = LX_QUOTED;
				continue;
			case '{':
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				imap_lex_lit_begin(lx, 0);
				continue;
			case '~':
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				lx->st = LX_TILDE;
				continue;
			case '+':
				/* A continuation's text is free-form, like resp-text. */
				if (lx->mode == IMAP_LEX_SERVER && lx->index == 0 && lx->depth == 0) {
					if (!imap_lex_count(lx))
						return LINE_TOO_LONG(lx, tok);
					(*pos)++;
					lx->tbuf[0] = '+';
					imap_lex_emit(lx, tok, IMAP_TOK_ATOM, lx->tbuf, 1);
					imap_lex_done(lx);
					lx->st = LX_CONT;
					return IMAP_LEX_TOKEN;
				}
				break;
			default:
				break;
			}
			if (!(imap_lex_cls[c] & CA) && c != '[' && c != ']')
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "invalid character");
			if (imap_lex_cls[c] & CA && imap_lex_atom_fast(lx, p, len, pos))
				return imap_lex_atom_done(lx, tok);
			lx->tlen = 0;
			lx->bracket = 0;
			lx->bquote = 0;
			lx->fresh = 0;
			lx->st = LX_ATOM;
			continue;

		case LX_TILDE:
			if (*pos == len)
				return IMAP_LEX_MORE;
			if (p[*pos] == '{') {
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				imap_lex_lit_begin(lx, IMAP_LIT_BINARY);
				continue;
			}
			/* Just an atom starting with '~'; the byte is already counted. */
			lx->tbuf[0] = '~';
			lx->tlen = 1;
			lx->bracket = 0;
			lx->bquote = 0;
			lx->st = LX_ATOM;
			continue;

		case LX_ATOM:
			for (;;) {
				if (lx->bquote != 2) {
					why = imap_lex_run(lx, p, len, pos, lx->bquote ? CQ : CA);
					if (why != NULL)
						return imap_lex_fail(lx, tok, IMAP_LEX_ERR_TOO_LONG, why);
				}
				if (*pos == len)
					return IMAP_LEX_MORE;
				c = p[*pos];
				if (lx->bquote) {
					/* A quoted string inside brackets stays raw. */
					if (c == '\r' || c == '\n' || c == '\0')
						return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX,
						    "CR, LF or NUL in quoted string");
					if ((why = imap_lex_put(lx, p, pos)) != NULL)
						return imap_lex_fail(lx, tok, IMAP_LEX_ERR_TOO_LONG, why);
					if (lx->bquote == 2)
						lx->bquote = 1;
					else if (c == '"')
						lx->bquote = 0;
					else if (c == '\\')
						lx->bquote = 2;
					continue;
				}
				switch (c) {
				case '[':
				case ']':
				case ' ':
				case '(':
				case ')':
				case '"':
					if (lx->bracket == 0 && c != '[' && c != ']')
						return imap_lex_atom_done(lx, tok);
					if ((why = imap_lex_put(lx, p, pos)) != NULL)
						return imap_lex_fail(lx, tok, IMAP_LEX_ERR_TOO_LONG, why);
					if (c == '[')
						lx->bracket++;
					else if (c == ']' && lx->bracket > 0)
						lx->bracket--;
					else if (c == '"')
						lx->bquote = 1;
					continue;
				case '\r':
				case '\n':
					/* Even inside unclosed brackets: the server judges. */
					return imap_lex_atom_done(lx, tok);
				case '{':
					return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "'{' inside an atom");
				default:
					return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX,
					    "invalid character in atom");
				}
			}

		case LX_QUOTED:
			why = imap_lex_run(lx, p, len, pos, CQ);
			if (why != NULL)
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_TOO_LONG, why);
			if (*pos == len)
				return IMAP_LEX_MORE;
			c = p[*pos];
			if (c == '"') {
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				imap_lex_emit(lx, tok, IMAP_TOK_QUOTED, lx->tbuf, lx->tlen);
				imap_lex_done(lx);
				lx->st = LX_START;
				return IMAP_LEX_TOKEN;
			}
			if (c == '\\') {
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				lx->st = LX_QUOTED_ESC;
				continue;
			}
			return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "CR, LF or NUL in quoted string");

		case LX_QUOTED_ESC:
			if (*pos == len)
				return IMAP_LEX_MORE;
			c = p[*pos];
			if (c == '\r' || c == '\n' || c == '\0')
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "CR, LF or NUL in quoted string");
			if ((why = imap_lex_put(lx, p, pos)) != NULL)
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_TOO_LONG, why);
			lx->st = LX_QUOTED;
			continue;

		case LX_LIT_SIZE:
			if (*pos == len)
				return IMAP_LEX_MORE;
			c = p[*pos];
			if (c >= '0' && c <= '9') {
				unsigned d = (unsigned)(c - '0');

				if (lx->lit_digits >= IMAP_LEX_MAX_DIGITS ||
				    lx->lit_size > (UINT64_MAX - d) / 10)
					return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX,
					    "literal size overflow");
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
				lx->lit_size = lx->lit_size * 10 + d;
				lx->lit_digits++;
				continue;
			}
			if (lx->lit_digits == 0 || (c != '+' && c != '}'))
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "bad literal size");
			if (!imap_lex_count(lx))
				return LINE_TOO_LONG(lx, tok);
			(*pos)++;
			if (c == '+') {
				lx->lit_flags |= IMAP_LIT_NONSYNC;
				lx->st = LX_LIT_PLUS;
			} else {
				lx->st = LX_LIT_CR;
			}
			continue;

		case LX_LIT_PLUS:
			if (*pos == len)
				return IMAP_LEX_MORE;
			if (p[*pos] != '}')
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "bad literal size");
			if (!imap_lex_count(lx))
				return LINE_TOO_LONG(lx, tok);
			(*pos)++;
			lx->st = LX_LIT_CR;
			continue;

		case LX_LIT_CR:
		case LX_LIT_LF:
			if (*pos == len)
				return IMAP_LEX_MORE;
			c = p[*pos];
			if (c != '\n' && (c != '\r' || lx->st == LX_LIT_LF))
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX,
				    "literal announcement not followed by CRLF");
			if (!imap_lex_count(lx))
				return LINE_TOO_LONG(lx, tok);
			(*pos)++;
			if (c == '\r') {
				lx->st = LX_LIT_LF;
				continue;
			}
			return imap_lex_literal(lx, tok);

		case LX_LIT_DATA:
			if (lx->lit_left == 0) {
				imap_lex_emit(lx, tok, IMAP_TOK_LITERAL_END, NULL, 0);
				imap_lex_done(lx);
				lx->st = LX_START;
				return IMAP_LEX_TOKEN;
			}
			if (*pos == len)
				return IMAP_LEX_MORE;
			n = len - *pos;
			if (n > lx->lit_left)
				n = (size_t)lx->lit_left;
			imap_lex_emit(lx, tok, IMAP_TOK_LITERAL_DATA, (const char *)p + *pos, n);
			*pos += n;
			lx->lit_left -= n;
			return IMAP_LEX_TOKEN;

		case LX_CR:
			if (*pos == len)
				return IMAP_LEX_MORE;
			if (p[*pos] != '\n')
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "CR not followed by LF");
			if (!imap_lex_count(lx))
				return LINE_TOO_LONG(lx, tok);
			(*pos)++;
			return imap_lex_eol(lx, tok);

		case LX_STATUS:
		case LX_CONT:
			if (*pos == len)
				return IMAP_LEX_MORE;
			c = p[*pos];
			lx->textline = c != '\r' && c != '\n';
			/* "* OK" CRLF has no text at all; "+" CRLF has an empty one. */
			if (lx->st == LX_STATUS && (c == '\r' || c == '\n')) {
				lx->st = LX_START;
				continue;
			}
			if (c == ' ') {
				if (!imap_lex_count(lx))
					return LINE_TOO_LONG(lx, tok);
				(*pos)++;
			}
			lx->tlen = 0;
			lx->textline = 1;
			lx->st = LX_TEXT;
			continue;

		case LX_TEXT:
			why = imap_lex_run(lx, p, len, pos, CT);
			if (why != NULL)
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_TOO_LONG, why);
			if (*pos == len)
				return IMAP_LEX_MORE;
			c = p[*pos];
			if (c != '\r' && c != '\n')
				return imap_lex_fail(lx, tok, IMAP_LEX_ERR_SYNTAX, "NUL in text");
			imap_lex_emit(lx, tok, IMAP_TOK_TEXT, lx->tbuf, lx->tlen);
			imap_lex_done(lx);
			lx->st = LX_START;
			return IMAP_LEX_TOKEN;

		case LX_SKIP:
			if (imap_lex_skip(lx, p, len, pos))
				return imap_lex_eol(lx, tok);
			if (lx->st == LX_SKIP)
				return IMAP_LEX_MORE;
			continue;

		case LX_SKIP_DATA:
			n = len - *pos;
			if (n > lx->lit_left)
				n = (size_t)lx->lit_left;
			*pos += n;
			lx->lit_left -= n;
			if (lx->lit_left > 0)
				return IMAP_LEX_MORE;
			lx->sk = SK_NONE;
			lx->st = LX_SKIP;
			continue;

		case LX_EOL:
			return imap_lex_eol(lx, tok);
		}
	}
}

enum imap_lex_status
imap_lex_next(struct imap_lex *lx, const char *buf, size_t len, size_t *used,
    struct imap_tok *tok)
{
	size_t pos = 0;
	enum imap_lex_status r;

	r = imap_lex_step(lx, (const unsigned char *)buf, len, &pos, tok);
	*used = pos;
	return r;
}

void
imap_lex_reject_literal(struct imap_lex *lx)
{
	if (lx->st != LX_LIT_DATA || lx->lit_left != lx->lit_size)
		return;
	if (lx->mode == IMAP_LEX_CLIENT && !(lx->lit_flags & IMAP_LIT_NONSYNC)) {
		imap_lex_reset(lx);
		return;
	}
	/* The payload comes anyway: drop it and the rest of the command. */
	lx->sk = SK_NONE;
	lx->st = LX_SKIP_DATA;
}

void
imap_lex_expect_text_line(struct imap_lex *lx)
{
	lx->text_next = 1;
}

uint64_t
imap_lex_literal_remaining(const struct imap_lex *lx)
{
	return lx->st == LX_LIT_DATA ? lx->lit_left : 0;
}

void
imap_lex_skip_literal(struct imap_lex *lx, uint64_t n)
{
	if (lx->st != LX_LIT_DATA)
		return;
	if (n > lx->lit_left)
		n = lx->lit_left;
	lx->lit_left -= n;
}

int
imap_lex_at_command_start(const struct imap_lex *lx)
{
	return lx->fresh && lx->st == LX_START;
}

int
imap_lex_at_rest(const struct imap_lex *lx)
{
	return imap_lex_at_command_start(lx) && !lx->text_next;
}

void
imap_lex_shrink(struct imap_lex *lx)
{
	char *nb;

	if (!imap_lex_at_command_start(lx) || lx->tlen != 0 || lx->tcap <= IMAP_LEX_START_CAP)
		return;
	nb = realloc(lx->tbuf, IMAP_LEX_START_CAP);
	if (nb == NULL)
		return;		/* the bigger one stays: still correct */
	lx->tbuf = nb;
	lx->tcap = IMAP_LEX_START_CAP;
}

#ifdef __SSE2__
/*
 * The bytes of p[0..16) a plain line must look at, as bit masks: parens,
 * and everything else that is not CP (CTLs, DEL, '"', '[', '{').
 */
static inline void
imap_lex_specials16(const unsigned char *p, unsigned *parens, unsigned *others)
{
	__m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
	__m128i ctl = _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x1f)), x);
	__m128i o = _mm_or_si128(ctl, _mm_cmpeq_epi8(x, _mm_set1_epi8(0x7f)));

	o = _mm_or_si128(o, _mm_cmpeq_epi8(x, _mm_set1_epi8('"')));
	o = _mm_or_si128(o, _mm_cmpeq_epi8(x, _mm_set1_epi8('[')));
	o = _mm_or_si128(o, _mm_cmpeq_epi8(x, _mm_set1_epi8('{')));
	*others = (unsigned)_mm_movemask_epi8(o);
	*parens = (unsigned)_mm_movemask_epi8(_mm_or_si128(
	    _mm_cmpeq_epi8(x, _mm_set1_epi8('(')), _mm_cmpeq_epi8(x, _mm_set1_epi8(')'))));
}
#endif

size_t
imap_lex_plain_line(const struct imap_lex *lx, const char *buf, size_t len)
{
	const unsigned char *p = (const unsigned char *)buf, *nl;
	size_t n, i = 0, end;
	long depth = 0;

	if (!imap_lex_at_command_start(lx) || lx->text_next || len < 2 ||
	    (nl = memchr(p, '\n', len)) == NULL)
		return 0;
	n = (size_t)(nl - p) + 1;
	if (n < 2 || p[n - 2] != '\r' || n > lx->lim.max_token ||
	    (lx->lim.max_line != 0 && n > lx->lim.max_line))
		return 0;
	end = n - 2;
#ifdef __SSE2__
	/* Sixteen bytes at a time while only parens need a look: the answers to
	   a FLAGS sweep have nothing else. The last block ends at the line's end
	   and skips the bytes already seen. The first block with anything else
	   goes to the byte loop below, which gives the same verdict. */
	while (end >= 16) {
		size_t at = i;
		unsigned keep = 0xffff, parens, others;

		if (i == end)
			return n;
		if (i + 16 > end) {
			at = end - 16;
			keep = (0xffffu << (i - at)) & 0xffff;
		}
		imap_lex_specials16(p + at, &parens, &others);
		if ((others & keep) != 0)
			break;
		for (parens &= keep; parens != 0; parens &= parens - 1) {
			if (p[at + (unsigned)__builtin_ctz(parens)] == '(')
				depth++;
			else if (--depth < 0)
				return 0;
		}
		if (at != i)
			return n;
		i += 16;
	}
#endif
	for (;;) {
		while (i < end && (imap_lex_cls[p[i]] & CP))
			i++;
		if (i == end)
			return n;
		switch (p[i++]) {
		case '(':
			depth++;
			continue;
		case ')':
			if (--depth < 0)
				return 0;
			continue;
		case '"':
			for (;;) {
				while (i < end && (imap_lex_cls[p[i]] & CQ))
					i++;
				if (i == end)
					return 0;	/* not closed on this line */
				if (p[i] == '"')
					break;
				/* A backslash escapes any byte but NUL and CR; NUL
				   and CR are errors anyway. */
				if (p[i] != '\\' || i + 1 == end || p[i + 1] == '\0' || p[i + 1] == '\r')
					return 0;
				i += 2;
			}
			i++;
			continue;
		default:
			/* '{' (a literal, or an error), '[' (an atom whose brackets
			   hide parens), CTLs, NUL, CR: the tokens decide. */
			return 0;
		}
	}
}
