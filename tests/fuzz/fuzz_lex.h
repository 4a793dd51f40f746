/* fuzz_lex: the IMAP tokenizer fed arbitrary bytes in one mode (FUZZ_LEX_MODE), checked against its contract. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "imap_lex.h"

/*
 * Input: 3 option bytes, then the byte stream.
 *   byte 0: bits 0-1 limits (0: as a session uses them, 1: tiny, 2: small,
 *           3: tiny token, big line, max_literal 64)
 *           bit 2: refuse some synchronizing literals (imap_lex_reject_literal,
 *                  as the proxy does for a refused command or BAD [TOOBIG])
 *           bit 3: the line after an AUTHENTICATE command is a SASL text line
 *                  (imap_lex_expect_text_line, as on the upstream's "+")
 *   bytes 1-2: where the stream is split in two windows (mod its length)
 *
 * The stream is lexed four ways: whole, split at that point, one byte per
 * call (inputs over 512 bytes: chunks of 1 + split % 97 bytes), and with literal payloads moved by the caller through
 * imap_lex_literal_remaining()/imap_lex_skip_literal() (the proxy's bulk
 * path). Each way must give the same token stream (LITERAL_DATA chunks
 * merged) and keep the contract of imap_lex.h on every token: used within
 * the window, the whole window used on MORE, token strings within limits,
 * payload inside the window, list depths that add up, one EOL per command
 * (right after any ERROR), literal sizes matching their payload, and the
 * line limit held until the error that reports it. Whole, at each line
 * start, a line imap_lex_plain_line() calls plain must lex to its EOL at
 * exactly the length it gave, with no ERROR and no LITERAL.
 */

#ifndef FUZZ_LEX_MODE
#error "define FUZZ_LEX_MODE"
#endif

enum lex_way { WAY_WHOLE, WAY_SPLIT, WAY_BYTES, WAY_SKIP };

struct lex_run {
	struct imap_lex *lx;
	struct imap_lex_limits lim;
	unsigned opts;
	enum lex_way way;
	struct fuzz_buf out;	/* the rendering compared between ways */
	/* contract state */
	int in_data;		/* between LITERAL and LITERAL_END */
	uint64_t lit_size, lit_got;
	unsigned lit_index, lit_depth;
	unsigned depth;		/* our count of open lists */
	unsigned last_index;
	int after_error;	/* ERROR seen: EOL must come next */
	int bad_depth;		/* an unexpected ')' error: depths restart */
	size_t line_bytes;	/* bytes of this command outside payloads, before any error */
	int auth_cmd;		/* this command is AUTHENTICATE */
	int zero_streak;	/* tokens in a row that consumed nothing */
	unsigned tokens;
	int plain;		/* imap_lex_plain_line said this line ends at plain_end */
	size_t plain_end;
};

static void
lex_limits(unsigned opts, struct imap_lex_limits *lim)
{
	switch (opts & 3) {
	case 0:
		if (FUZZ_LEX_MODE == IMAP_LEX_CLIENT)
			*lim = (struct imap_lex_limits){ 65536, 65536, 100 * 1024 * 1024 };
		else
			*lim = (struct imap_lex_limits){ 0, 1024 * 1024, 0 };
		break;
	case 1:
		*lim = (struct imap_lex_limits){ 40, 8, 16 };
		break;
	case 2:
		*lim = (struct imap_lex_limits){ 300, 64, 0 };
		break;
	default:
		*lim = (struct imap_lex_limits){ 0, 3, 64 };
		break;
	}
}

static void
lex_render(struct lex_run *r, const struct imap_tok *t)
{
	unsigned char hdr[32];
	size_t n = 0;

	if (t->type == IMAP_TOK_LITERAL_DATA) {
		fuzz_buf_add(&r->out, t->str, t->len);	/* merged with its neighbours */
		return;
	}
	hdr[n++] = 0xff;	/* token separator; a payload's bytes run between two */
	hdr[n++] = (unsigned char)t->type;
	hdr[n++] = (unsigned char)t->err;
	memcpy(hdr + n, &t->index, sizeof(t->index));
	n += sizeof(t->index);
	memcpy(hdr + n, &t->depth, sizeof(t->depth));
	n += sizeof(t->depth);
	if (t->type == IMAP_TOK_LITERAL || t->err == IMAP_LEX_ERR_LITERAL_TOO_BIG) {
		memcpy(hdr + n, &t->literal_size, sizeof(t->literal_size));
		n += sizeof(t->literal_size);
		hdr[n++] = (unsigned char)t->literal_flags;
	}
	fuzz_buf_add(&r->out, hdr, n);
	if (t->type == IMAP_TOK_ATOM || t->type == IMAP_TOK_QUOTED || t->type == IMAP_TOK_TEXT) {
		uint32_t len = (uint32_t)t->len;
		fuzz_buf_add(&r->out, &len, sizeof(len));
		fuzz_buf_add(&r->out, t->str, t->len);
	}
}

static void
lex_command_end(struct lex_run *r)
{
	r->depth = 0;
	r->last_index = 0;
	r->after_error = 0;
	r->bad_depth = 0;
	r->line_bytes = 0;
	r->in_data = 0;
}

/* Check one token against the contract, act on it as the proxy would. */
static void
lex_token(struct lex_run *r, const struct imap_tok *t, const char *win, size_t wlen, size_t used)
{
	r->tokens++;
	r->zero_streak = used == 0 ? r->zero_streak + 1 : 0;
	FUZZ_CHECK(r->zero_streak < 64, "no progress: %d tokens in a row without consuming",
	    r->zero_streak);

	if (r->after_error)
		FUZZ_CHECK(t->type == IMAP_TOK_EOL, "token type %d after ERROR, EOL expected",
		    t->type);
	if (r->in_data) {
		FUZZ_CHECK(t->type == IMAP_TOK_LITERAL_DATA || t->type == IMAP_TOK_LITERAL_END,
		    "token type %d inside a literal payload", t->type);
	} else
		FUZZ_CHECK(t->type != IMAP_TOK_LITERAL_DATA && t->type != IMAP_TOK_LITERAL_END,
		    "literal payload token type %d outside a literal", t->type);
	if (t->type != IMAP_TOK_LITERAL_DATA && t->type != IMAP_TOK_ERROR &&
	    t->type != IMAP_TOK_EOL && !r->bad_depth) {
		FUZZ_CHECK(t->index >= r->last_index, "index went back from %u to %u",
		    r->last_index, t->index);
		r->last_index = t->index;
	}

	switch (t->type) {
	case IMAP_TOK_ATOM:
	case IMAP_TOK_QUOTED:
	case IMAP_TOK_TEXT:
		FUZZ_CHECK(t->len <= r->lim.max_token, "token of %zu bytes over max_token %zu",
		    t->len, r->lim.max_token);
		FUZZ_CHECK(t->len == 0 || t->str != NULL, "NULL string");
		if (t->type == IMAP_TOK_ATOM)
			FUZZ_CHECK(t->len > 0, "empty atom");
		if (t->type != IMAP_TOK_QUOTED)
			FUZZ_CHECK(memchr(t->str, '\0', t->len) == NULL && memchr(t->str, '\n', t->len) ==
			    NULL, "NUL or LF in %s", fuzz_escape(t->str, t->len, 80));
		if (t->type == IMAP_TOK_ATOM && t->index == 1 && t->depth == 0 &&
		    t->len == 12 && strncasecmp(t->str, "AUTHENTICATE", 12) == 0)
			r->auth_cmd = 1;
		FUZZ_CHECK(t->depth == r->depth || r->bad_depth, "depth %u, %u lists open",
		    t->depth, r->depth);
		break;
	case IMAP_TOK_LIST_BEGIN:
		FUZZ_CHECK(t->depth == r->depth || r->bad_depth, "LIST_BEGIN depth %u, %u open",
		    t->depth, r->depth);
		r->depth++;
		break;
	case IMAP_TOK_LIST_END:
		FUZZ_CHECK(r->depth > 0 || r->bad_depth, "')' with no list open");
		if (r->depth > 0)
			r->depth--;
		FUZZ_CHECK(t->depth == r->depth || r->bad_depth, "LIST_END depth %u, %u open",
		    t->depth, r->depth);
		break;
	case IMAP_TOK_LITERAL:
		FUZZ_CHECK(r->lim.max_literal == 0 || t->literal_size <= r->lim.max_literal,
		    "literal of %llu over max_literal", (unsigned long long)t->literal_size);
		FUZZ_CHECK((t->literal_flags & ~(unsigned)(IMAP_LIT_NONSYNC | IMAP_LIT_BINARY)) == 0,
		    "flags %u", t->literal_flags);
		FUZZ_CHECK(imap_lex_literal_remaining(r->lx) == t->literal_size,
		    "remaining %llu right after a literal of %llu",
		    (unsigned long long)imap_lex_literal_remaining(r->lx),
		    (unsigned long long)t->literal_size);
		r->in_data = 1;
		r->lit_size = t->literal_size;
		r->lit_got = 0;
		r->lit_index = t->index;
		r->lit_depth = t->depth;
		break;
	case IMAP_TOK_LITERAL_DATA:
		FUZZ_CHECK(t->len > 0, "empty LITERAL_DATA");
		FUZZ_CHECK(t->str >= win && t->str + t->len <= win + used,
		    "LITERAL_DATA outside the consumed part of the window");
		FUZZ_CHECK(t->index == r->lit_index && t->depth == r->lit_depth,
		    "LITERAL_DATA position %u.%u, literal's %u.%u", t->index, t->depth,
		    r->lit_index, r->lit_depth);
		r->lit_got += t->len;
		FUZZ_CHECK(r->lit_got <= r->lit_size, "payload %llu bytes over its size %llu",
		    (unsigned long long)r->lit_got, (unsigned long long)r->lit_size);
		FUZZ_CHECK(imap_lex_literal_remaining(r->lx) == r->lit_size - r->lit_got,
		    "remaining %llu, expected %llu",
		    (unsigned long long)imap_lex_literal_remaining(r->lx),
		    (unsigned long long)(r->lit_size - r->lit_got));
		break;
	case IMAP_TOK_LITERAL_END:
		FUZZ_CHECK(r->lit_got == r->lit_size, "LITERAL_END after %llu of %llu bytes",
		    (unsigned long long)r->lit_got, (unsigned long long)r->lit_size);
		FUZZ_CHECK(imap_lex_literal_remaining(r->lx) == 0, "remaining after LITERAL_END");
		r->in_data = 0;
		break;
	case IMAP_TOK_EOL:
		FUZZ_CHECK(t->depth == r->depth || r->bad_depth || r->after_error,
		    "EOL depth %u, %u open", t->depth, r->depth);
		FUZZ_CHECK(imap_lex_at_command_start(r->lx), "not at a command start after EOL");
		lex_command_end(r);
		if (r->auth_cmd && (r->opts & 8))
			imap_lex_expect_text_line(r->lx);
		r->auth_cmd = 0;
		break;
	case IMAP_TOK_ERROR:
		FUZZ_CHECK(t->err != IMAP_LEX_ERR_NONE, "ERROR without err");
		FUZZ_CHECK(t->errmsg != NULL, "ERROR without errmsg");
		FUZZ_CHECK(!r->after_error, "two ERRORs in one command");
		if (t->err == IMAP_LEX_ERR_LITERAL_TOO_BIG)
			FUZZ_CHECK(r->lim.max_literal != 0 && t->literal_size > r->lim.max_literal,
			    "LITERAL_TOO_BIG for %llu", (unsigned long long)t->literal_size);
		r->after_error = 1;
		break;
	}
	FUZZ_CHECK(t->type == IMAP_TOK_LITERAL_DATA || t->type == IMAP_TOK_LITERAL ||
	    imap_lex_literal_remaining(r->lx) == 0 || t->type == IMAP_TOK_ERROR,
	    "literal_remaining %llu after token type %d",
	    (unsigned long long)imap_lex_literal_remaining(r->lx), t->type);
	lex_render(r, t);

	/* Client mode, as the proxy: refuse some synchronizing literals. */
	if (t->type == IMAP_TOK_LITERAL && (r->opts & 4) && (t->literal_size % 3) == 1) {
		imap_lex_reject_literal(r->lx);
		fuzz_buf_add(&r->out, "\xfe", 1);
		if (FUZZ_LEX_MODE == IMAP_LEX_CLIENT && !(t->literal_flags & IMAP_LIT_NONSYNC)) {
			/* The next byte starts a new command, no EOL. */
			FUZZ_CHECK(imap_lex_literal_remaining(r->lx) == 0, "rejected literal still open");
			lex_command_end(r);
			r->auth_cmd = 0;
		} else {
			/* Payload and rest of the command skipped, then EOL. */
			r->in_data = 0;
			r->after_error = 1;
		}
	}
}

/* Feed one window until the lexer wants more. */
static void
lex_window(struct lex_run *r, const uint8_t *data, size_t len)
{
	/* An exact-size copy: ASan catches any read past the window. */
	char *win = malloc(len ? len : 1);
	size_t pos = 0;

	if (win == NULL)
		abort();
	memcpy(win, data, len);
	for (;;) {
		struct imap_tok tok;
		size_t used = 12345, avail = len - pos;
		uint64_t rem;
		enum imap_lex_status st;

		rem = imap_lex_literal_remaining(r->lx);
		if (r->way == WAY_SKIP && rem > 0 && avail > 0) {
			/* The proxy's bulk path: move payload without the lexer. */
			size_t n = avail < rem ? avail : (size_t)rem;
			if (n > 1 && (r->tokens & 1))
				n = n / 2 + 1;	/* sometimes only part of it */
			imap_lex_skip_literal(r->lx, n);
			fuzz_buf_add(&r->out, win + pos, n);
			r->lit_got += n;
			pos += n;
			r->zero_streak = 0;
			continue;
		}
		if (r->way == WAY_WHOLE && !r->plain && imap_lex_at_command_start(r->lx)) {
			size_t n = imap_lex_plain_line(r->lx, win + pos, avail);

			FUZZ_CHECK(n <= avail, "plain line of %zu bytes in a %zu-byte window", n, avail);
			r->plain = n > 0;
			r->plain_end = pos + n;
		}
		st = imap_lex_next(r->lx, avail ? win + pos : NULL, avail, &used, &tok);
		FUZZ_CHECK(used <= avail, "used %zu of a %zu-byte window", used, avail);
		if (r->plain && st == IMAP_LEX_TOKEN) {
			FUZZ_CHECK(tok.type != IMAP_TOK_ERROR && tok.type != IMAP_TOK_LITERAL,
			    "token type %d in a line imap_lex_plain_line called plain", tok.type);
			if (tok.type == IMAP_TOK_EOL) {
				FUZZ_CHECK(pos + used == r->plain_end, "plain line ends at %zu, its EOL "
				    "at %zu", r->plain_end, pos + used);
				r->plain = 0;
			}
		}
		if (st == IMAP_LEX_MORE) {
			FUZZ_CHECK(used == avail, "MORE after using %zu of %zu bytes", used, avail);
			if (used > 0)
				r->zero_streak = 0;	/* progress between tokens */
			if (!r->in_data && !r->after_error)
				r->line_bytes += used;
			break;
		}
		FUZZ_CHECK(st == IMAP_LEX_TOKEN, "status %d", st);
		if (!r->in_data && !r->after_error && tok.type != IMAP_TOK_LITERAL_DATA)
			r->line_bytes += used;
		if (r->lim.max_line != 0 && !(tok.type == IMAP_TOK_ERROR &&
		    tok.err == IMAP_LEX_ERR_TOO_LONG))
			FUZZ_CHECK(r->line_bytes <= r->lim.max_line,
			    "%zu bytes of one line with max_line %zu", r->line_bytes, r->lim.max_line);
		lex_token(r, &tok, win + pos, avail, used);
		pos += used;
	}
	free(win);
}

static void
lex_run(struct lex_run *r, const uint8_t *data, size_t len, size_t split)
{
	switch (r->way) {
	case WAY_WHOLE:
	case WAY_SKIP:
		lex_window(r, data, len);
		break;
	case WAY_SPLIT:
		lex_window(r, data, split);
		lex_window(r, data + split, len - split);
		break;
	case WAY_BYTES: {
		/* One byte per call; longer inputs in small chunks (cheaper). */
		size_t step = len <= 512 ? 1 : split % 97 + 1;
		for (size_t i = 0; i < len; i += step)
			lex_window(r, data + i, len - i < step ? len - i : step);
		break;
	}
	}
	/* The end of input: whatever is owed without more bytes. */
	lex_window(r, data, 0);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lex_run runs[4];
	unsigned opts;
	size_t split;
	const int nways = 4;

	if (size < 3)
		return 0;
	opts = data[0];
	split = (size_t)data[1] | (size_t)data[2] << 8;
	data += 3;
	size -= 3;
	split = size ? split % (size + 1) : 0;
	memset(runs, 0, sizeof(runs));
	for (int w = 0; w < 4; w++) {
		struct lex_run *r = &runs[w];
		static const enum lex_way ways[4] = { WAY_WHOLE, WAY_SPLIT, WAY_SKIP, WAY_BYTES };

		r->way = ways[w];
		r->opts = opts;
		lex_limits(opts, &r->lim);
		if ((r->lx = imap_lex_new(FUZZ_LEX_MODE, &r->lim)) == NULL)
			abort();
		lex_run(r, data, size, split);
		imap_lex_free(r->lx);
	}
	for (int w = 1; w < nways; w++) {
		const struct fuzz_buf *a = &runs[0].out, *b = &runs[w].out;
		size_t i = 0;

		while (i < a->len && i < b->len && a->p[i] == b->p[i])
			i++;
		if (a->len != b->len || i < a->len) {
			size_t from = i > 40 ? i - 40 : 0;
			fprintf(stderr, "whole:  ...%s\n", fuzz_escape(a->p + from, a->len - from, 120));
			fprintf(stderr, "way %d: ...%s\n", w, fuzz_escape(b->p + from, b->len - from, 120));
			FUZZ_CHECK(0, "token stream differs from the whole-window one at byte %zu "
			    "(way %d: 1 split at %zu, 2 skip_literal, 3 byte by byte)", i, w, split);
		}
	}
	for (int w = 0; w < 4; w++)
		fuzz_buf_free(&runs[w].out);
	return 0;
}
