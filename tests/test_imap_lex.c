/* test_imap_lex: checks the IMAP tokenizer's token streams, identical however the input is split. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "imap_lex.h"
#include "tap.h"

#define F_POS 0x1	/* render @index.depth after each token */
#define F_REJECT 0x2	/* reject every literal of 100 bytes or more */
#define F_AUTH 0x4	/* after an AUTHENTICATE command, expect two text lines */

#define UNLIMITED SIZE_MAX	/* max_line 0 for the lexer */

/* An input with NULs in it. */
#define BIN(s) .in = (s), .inlen = sizeof(s) - 1

struct lcase {
	const char *name;
	enum imap_lex_mode mode;
	const char *in;
	size_t inlen;		/* 0: strlen(in) */
	const char *want;
	size_t max_line;	/* 0: 1024 */
	size_t max_token;	/* 0: 256 */
	uint64_t max_literal;	/* 0: unlimited */
	unsigned flags;
};

/* A growing string. */
struct out {
	char *s;
	size_t len, cap;
};

static void
out_add(struct out *o, const char *s, size_t n)
{
	if (o->len + n + 1 > o->cap) {
		size_t cap = o->cap ? o->cap : 256;

		while (cap < o->len + n + 1)
			cap *= 2;
		o->s = realloc(o->s, cap);
		if (o->s == NULL)
			abort();
		o->cap = cap;
	}
	memcpy(o->s + o->len, s, n);
	o->len += n;
	o->s[o->len] = '\0';
}

static void
out_str(struct out *o, const char *s)
{
	out_add(o, s, strlen(s));
}

/* Bytes as text: CR, LF and other non-printables are escaped. */
static void
out_esc(struct out *o, const char *s, size_t n)
{
	char tmp[8];
	size_t i;

	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '\r')
			out_str(o, "\\r");
		else if (c == '\n')
			out_str(o, "\\n");
		else if (c < 0x20 || c >= 0x7f) {
			snprintf(tmp, sizeof(tmp), "\\x%02x", c);
			out_str(o, tmp);
		} else
			out_add(o, s + i, 1);
	}
}

/* The consumer side: renders tokens and checks the contract on the way. */
struct drv {
	struct imap_lex *lx;
	const struct lcase *c;
	struct imap_lex_limits lim;
	struct out out;
	int fast;		/* move payload via literal_remaining/skip_literal */
	int in_data;		/* merging LITERAL_DATA chunks */
	unsigned lit_index, lit_depth;	/* of the last LITERAL, which DATA shares */
	int auth_lines;
	size_t ntok, max_tok;
};

static void
drv_pos(struct drv *d, unsigned index, unsigned depth)
{
	char tmp[48];

	if (d->c->flags & F_POS) {
		snprintf(tmp, sizeof(tmp), depth ? "@%u.%u" : "@%u", index, depth);
		out_str(&d->out, tmp);
	}
}

static void
drv_end_data(struct drv *d)
{
	if (d->in_data) {
		out_str(&d->out, ")");
		drv_pos(d, d->lit_index, d->lit_depth);
		d->in_data = 0;
	}
}

static void
drv_sep(struct drv *d)
{
	drv_end_data(d);
	if (d->out.len > 0)
		out_str(&d->out, " ");
}

static void
drv_data(struct drv *d, const char *s, size_t n)
{
	if (!d->in_data) {
		drv_sep(d);
		out_str(&d->out, "D(");
		d->in_data = 1;
	}
	out_esc(&d->out, s, n);
}

static void
drv_lit(struct out *o, uint64_t size, unsigned flags)
{
	char tmp[48];

	snprintf(tmp, sizeof(tmp), "%s{%llu%s}", (flags & IMAP_LIT_BINARY) ? "~" : "",
	    (unsigned long long)size, (flags & IMAP_LIT_NONSYNC) ? "+" : "");
	out_str(o, tmp);
}

static void
drv_token(struct drv *d, const struct imap_tok *t, const char *win, size_t wlen)
{
	int start_ok;

	if (t->type == IMAP_TOK_LITERAL_DATA) {
		if (t->len == 0 || t->str < win || t->str + t->len > win + wlen)
			out_str(&d->out, " !DATA-OUTSIDE-WINDOW");
		if (t->index != d->lit_index || t->depth != d->lit_depth)
			out_str(&d->out, " !DATA-POS");
		drv_data(d, t->str, t->len);
		return;
	}
	drv_sep(d);
	switch (t->type) {
	case IMAP_TOK_ATOM:
	case IMAP_TOK_QUOTED:
	case IMAP_TOK_TEXT:
		out_str(&d->out, t->type == IMAP_TOK_ATOM ? "A(" : t->type == IMAP_TOK_QUOTED ? "Q(" : "T(");
		out_esc(&d->out, t->str, t->len);
		out_str(&d->out, ")");
		if (t->len > d->lim.max_token)
			out_str(&d->out, "!OVER-MAX-TOKEN");
		break;
	case IMAP_TOK_LIST_BEGIN:
		out_str(&d->out, "(");
		break;
	case IMAP_TOK_LIST_END:
		out_str(&d->out, ")");
		break;
	case IMAP_TOK_LITERAL:
		out_str(&d->out, "L");
		drv_lit(&d->out, t->literal_size, t->literal_flags);
		d->lit_index = t->index;
		d->lit_depth = t->depth;
		break;
	case IMAP_TOK_LITERAL_DATA:
		break;
	case IMAP_TOK_LITERAL_END:
		out_str(&d->out, "E");
		break;
	case IMAP_TOK_EOL:
		out_str(&d->out, "EOL");
		break;
	case IMAP_TOK_ERROR:
		if (t->err == IMAP_LEX_ERR_SYNTAX)
			out_str(&d->out, "ERR(syntax)");
		else if (t->err == IMAP_LEX_ERR_TOO_LONG)
			out_str(&d->out, "ERR(toolong)");
		else if (t->err == IMAP_LEX_ERR_LITERAL_TOO_BIG) {
			out_str(&d->out, "ERR(big");
			drv_lit(&d->out, t->literal_size, t->literal_flags);
			out_str(&d->out, ")");
		} else
			out_str(&d->out, "ERR(?)");
		if (t->errmsg == NULL)
			out_str(&d->out, "!NO-ERRMSG");
		break;
	}
	drv_pos(d, t->index, t->depth);

	if ((d->c->flags & F_AUTH) && t->type == IMAP_TOK_ATOM && t->index == 1 &&
	    t->len == 12 && memcmp(t->str, "AUTHENTICATE", 12) == 0)
		d->auth_lines = 2;
	if (t->type == IMAP_TOK_EOL && d->auth_lines > 0) {
		imap_lex_expect_text_line(d->lx);
		d->auth_lines--;
	}
	start_ok = t->type == IMAP_TOK_EOL;
	if ((d->c->flags & F_REJECT) && t->type == IMAP_TOK_LITERAL && t->literal_size >= 100) {
		imap_lex_reject_literal(d->lx);
		out_str(&d->out, " REJ");
		/* a non-sync payload is still coming: not a new command yet */
		start_ok = !(t->literal_flags & IMAP_LIT_NONSYNC);
	}
	/* at_command_start() must hold exactly between commands. */
	if (!imap_lex_at_command_start(d->lx) != !start_ok)
		out_str(&d->out, " !AT-START-WRONG");
}

/* Feed one window; each window is its own allocation so ASan sees overreads. */
static void
drv_window(struct drv *d, const char *src, size_t wlen)
{
	char *win = malloc(wlen ? wlen : 1);
	struct imap_tok tok;
	size_t off = 0, used, n;
	uint64_t rem;
	enum imap_lex_status r;

	if (win == NULL)
		abort();
	memcpy(win, src, wlen);
	for (;;) {
		if (d->fast && off < wlen && (rem = imap_lex_literal_remaining(d->lx)) > 0) {
			n = wlen - off < rem ? wlen - off : (size_t)rem;
			drv_data(d, win + off, n);
			imap_lex_skip_literal(d->lx, n);
			off += n;
			continue;
		}
		used = (size_t)-1;
		r = imap_lex_next(d->lx, win + off, wlen - off, &used, &tok);
		if (used > wlen - off) {
			out_str(&d->out, " !USED-TOO-MUCH");
			break;
		}
		off += used;
		if (r == IMAP_LEX_MORE) {
			if (off != wlen)
				out_str(&d->out, " !MORE-BEFORE-END");
			break;
		}
		drv_token(d, &tok, win, wlen);
		if (++d->ntok > d->max_tok) {
			out_str(&d->out, " !RUNAWAY");
			break;
		}
	}
	free(win);
}

static void
case_limits(const struct lcase *c, struct imap_lex_limits *lim)
{
	lim->max_line = c->max_line == 0 ? 1024 : c->max_line == UNLIMITED ? 0 : c->max_line;
	lim->max_token = c->max_token ? c->max_token : 256;
	lim->max_literal = c->max_literal;
}

static size_t
case_len(const struct lcase *c)
{
	return c->inlen ? c->inlen : strlen(c->in);
}

/*
 * Lex the case's input cut into windows at s1 and s2 (s1 <= s2), or into
 * windows of step bytes if step > 0. Returns the rendering (malloc'd).
 */
static char *
lex_split(const struct lcase *c, size_t s1, size_t s2, size_t step, int fast)
{
	struct drv d;
	size_t n = case_len(c), pos;

	memset(&d, 0, sizeof(d));
	d.c = c;
	d.fast = fast;
	case_limits(c, &d.lim);
	d.lx = imap_lex_new(c->mode, &d.lim);
	if (d.lx == NULL)
		abort();
	d.max_tok = 4 * n + 16;
	if (!imap_lex_at_command_start(d.lx))
		out_str(&d.out, "!NOT-AT-START ");
	if (step > 0) {
		for (pos = 0; pos < n; pos += step)
			drv_window(&d, c->in + pos, n - pos < step ? n - pos : step);
	} else {
		drv_window(&d, c->in, s1);
		drv_window(&d, c->in + s1, s2 - s1);
		drv_window(&d, c->in + s2, n - s2);
	}
	drv_end_data(&d);
	imap_lex_free(d.lx);
	if (d.out.s == NULL)
		out_str(&d.out, "");
	return d.out.s;
}

static int
check_same(const char *what, const struct lcase *c, const char *want, char *got,
    size_t s1, size_t s2)
{
	int same = strcmp(got, want) == 0;

	if (!same) {
		diag("%s: %s (cuts at %zu,%zu)", c->name, what, s1, s2);
		diag("  want: %s", want);
		diag("  got:  %s", got);
	}
	free(got);
	return same;
}

/* All the ways of feeding one input; a few test points per case. */
static void
run_case(const struct lcase *c)
{
	size_t n = case_len(c), s1, s2;
	int all;

	ok(check_same("whole", c, c->want, lex_split(c, n, n, 0, 0), n, n),
	    "%s: whole input", c->name);

	all = 1;
	for (s1 = 0; s1 <= n && all; s1++)
		all = check_same("split", c, c->want, lex_split(c, s1, s1, 0, 0), s1, s1);
	ok(all, "%s: all %zu single split points", c->name, n + 1);

	ok(check_same("bytewise", c, c->want, lex_split(c, 0, 0, 1, 0), 1, 1),
	    "%s: 1-byte windows", c->name);

	if (n <= 200) {
		all = 1;
		for (s1 = 0; s1 <= n && all; s1++)
			for (s2 = s1; s2 <= n && all; s2++)
				all = check_same("split2", c, c->want,
				    lex_split(c, s1, s2, 0, 0), s1, s2);
		ok(all, "%s: all pairs of split points", c->name);
	}

	all = 1;
	for (s1 = 0; s1 <= n && all; s1++)
		all = check_same("fast path", c, c->want, lex_split(c, s1, s1, 0, 1), s1, s1);
	if (all)
		all = check_same("fast path bytewise", c, c->want, lex_split(c, 0, 0, 1, 1), 1, 1);
	ok(all, "%s: skip_literal fast path, every split", c->name);
}

#define TEN "0123456789"
#define HUNDRED TEN TEN TEN TEN TEN TEN TEN TEN TEN TEN

static const struct lcase cases[] = {
	/* client: plain commands */
	{ .name = "simple", .mode = IMAP_LEX_CLIENT, .in = "a1 NOOP\r\n",
	  .want = "A(a1)@0 A(NOOP)@1 EOL@2", .flags = F_POS },
	{ .name = "login atoms", .mode = IMAP_LEX_CLIENT, .in = "a2 LOGIN bob secret\r\n",
	  .want = "A(a2) A(LOGIN) A(bob) A(secret) EOL" },
	{ .name = "two commands", .mode = IMAP_LEX_CLIENT, .in = "a1 NOOP\r\na2 CAPABILITY\r\n",
	  .want = "A(a1)@0 A(NOOP)@1 EOL@2 A(a2)@0 A(CAPABILITY)@1 EOL@2", .flags = F_POS },
	{ .name = "quoted escapes", .mode = IMAP_LEX_CLIENT,
	  .in = "a3 LOGIN \"bob \\\"the\\\" user\" \"p\\\\w\\\"d\" \"\" \"caf\xc3\xa9 (x) {5}\"\r\n",
	  .want = "A(a3) A(LOGIN) Q(bob \"the\" user) Q(p\\w\"d) Q() Q(caf\\xc3\\xa9 (x) {5}) EOL" },
	{ .name = "quoted then atom, no space", .mode = IMAP_LEX_CLIENT,
	  .in = "a3 X \"a\"b c\"d\"(e)\r\n",
	  .want = "A(a3) A(X) Q(a) A(b) A(c) Q(d) ( A(e) ) EOL" },
	{ .name = "nested lists", .mode = IMAP_LEX_CLIENT,
	  .in = "a4 STORE 1:3 +FLAGS (\\Seen (\\Deleted x) \"y\" ()) z\r\n",
	  .want = "A(a4)@0 A(STORE)@1 A(1:3)@2 A(+FLAGS)@3 (@4 A(\\Seen)@4.1 (@4.1 "
		  "A(\\Deleted)@4.2 A(x)@4.2 )@4.1 Q(y)@4.1 (@4.1 )@4.1 )@4 A(z)@5 EOL@6",
	  .flags = F_POS },
	{ .name = "fetch brackets", .mode = IMAP_LEX_CLIENT,
	  .in = "a5 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100> BODY[])\r\n",
	  .want = "A(a5)@0 A(FETCH)@1 A(1:*)@2 (@3 A(FLAGS)@3.1 "
		  "A(BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>)@3.1 A(BODY[])@3.1 )@3 EOL@4",
	  .flags = F_POS },
	{ .name = "brackets: nesting and quotes", .mode = IMAP_LEX_CLIENT,
	  .in = "a6 FETCH 1 BODY[HEADER.FIELDS (\"X-A )]\\\"\" Y)] BODY[1.[2 (]] x\r\n",
	  .want = "A(a6) A(FETCH) A(1) A(BODY[HEADER.FIELDS (\"X-A )]\\\"\" Y)]) "
		  "A(BODY[1.[2 (]]) A(x) EOL" },
	{ .name = "unclosed bracket ends at EOL", .mode = IMAP_LEX_CLIENT,
	  .in = "a6 FETCH 1 BODY[TEXT (x\r\na7 NOOP\r\n",
	  .want = "A(a6) A(FETCH) A(1) A(BODY[TEXT (x) EOL A(a7) A(NOOP) EOL" },
	{ .name = "list-wildcards and ]", .mode = IMAP_LEX_CLIENT,
	  .in = "a7 LIST \"\" %/*]\r\n",
	  .want = "A(a7) A(LIST) Q() A(%/*]) EOL" },
	{ .name = "8-bit atom", .mode = IMAP_LEX_CLIENT, .in = "a7 SELECT Gr\xc3\xbc\xc3\x9f" "e\r\n",
	  .want = "A(a7) A(SELECT) A(Gr\\xc3\\xbc\\xc3\\x9fe) EOL" },
	{ .name = "multiple spaces", .mode = IMAP_LEX_CLIENT, .in = "  c1   SELECT    INBOX  \r\n",
	  .want = "A(c1)@0 A(SELECT)@1 A(INBOX)@2 EOL@3", .flags = F_POS },
	{ .name = "bare LF line endings", .mode = IMAP_LEX_CLIENT,
	  .in = "c2 NOOP\nc3 LOGIN {2}\nab \"x\"\nc4 X\r\n",
	  .want = "A(c2) A(NOOP) EOL A(c3) A(LOGIN) L{2} D(ab) E Q(x) EOL A(c4) A(X) EOL" },
	{ .name = "empty lines", .mode = IMAP_LEX_CLIENT, .in = "\r\n\nc4 NOOP\r\n",
	  .want = "EOL@0 EOL@0 A(c4)@0 A(NOOP)@1 EOL@2", .flags = F_POS },
	{ .name = "unclosed list at EOL", .mode = IMAP_LEX_CLIENT,
	  .in = "c5 FETCH 1 (FLAGS (UID\r\nc6 NOOP\r\n",
	  .want = "A(c5)@0 A(FETCH)@1 A(1)@2 (@3 A(FLAGS)@3.1 (@3.1 A(UID)@3.2 EOL@4.2 "
		  "A(c6)@0 A(NOOP)@1 EOL@2", .flags = F_POS },
	{ .name = "tilde atoms", .mode = IMAP_LEX_CLIENT, .in = "b2 X ~foo ~ a~b (~)\r\n",
	  .want = "A(b2) A(X) A(~foo) A(~) A(a~b) ( A(~) ) EOL" },

	/* client: literals */
	{ .name = "sync literals (LOGIN)", .mode = IMAP_LEX_CLIENT,
	  .in = "a8 LOGIN {3}\r\nbob {6}\r\nsecret\r\n",
	  .want = "A(a8)@0 A(LOGIN)@1 L{3}@2 D(bob)@2 E@2 L{6}@3 D(secret)@3 E@3 EOL@4",
	  .flags = F_POS },
	{ .name = "non-sync literal", .mode = IMAP_LEX_CLIENT,
	  .in = "a9 LOGIN {3+}\r\nbob \"pw\"\r\n",
	  .want = "A(a9) A(LOGIN) L{3+} D(bob) E Q(pw) EOL" },
	{ .name = "literal8", .mode = IMAP_LEX_CLIENT,
	  BIN("b1 APPEND INBOX ~{5}\r\nab\0\r\n ~{2+}\r\n\r\n\r\n"),
	  .want = "A(b1) A(APPEND) A(INBOX) L~{5} D(ab\\x00\\r\\n) E L~{2+} D(\\r\\n) E EOL" },
	{ .name = "zero-length literals", .mode = IMAP_LEX_CLIENT,
	  .in = "b3 LOGIN {0}\r\n {0+}\r\n\r\nb4 X {00}\r\n\r\n",
	  .want = "A(b3)@0 A(LOGIN)@1 L{0}@2 E@2 L{0+}@3 E@3 EOL@4 A(b4)@0 A(X)@1 L{0}@2 E@2 EOL@3",
	  .flags = F_POS },
	{ .name = "MULTIAPPEND with flags and date", .mode = IMAP_LEX_CLIENT,
	  .in = "b5 APPEND Drafts (\\Seen $Label) \"05-Jan-2024 10:00:00 +0100\" {12+}\r\n"
		"Subject: x\r\n (\\Draft) {5}\r\nhello\r\n",
	  .want = "A(b5)@0 A(APPEND)@1 A(Drafts)@2 (@3 A(\\Seen)@3.1 A($Label)@3.1 )@3 "
		  "Q(05-Jan-2024 10:00:00 +0100)@4 L{12+}@5 D(Subject: x\\r\\n)@5 E@5 "
		  "(@6 A(\\Draft)@6.1 )@6 L{5}@7 D(hello)@7 E@7 EOL@8", .flags = F_POS },
	{ .name = "literal inside a list", .mode = IMAP_LEX_CLIENT,
	  .in = "l1 X (a {1}\r\nb c)\r\n",
	  .want = "A(l1)@0 A(X)@1 (@2 A(a)@2.1 L{1}@2.1 D(b)@2.1 E@2.1 A(c)@2.1 )@2 EOL@3",
	  .flags = F_POS },
	{ .name = "literal payload looks like commands", .mode = IMAP_LEX_CLIENT,
	  BIN("l2 APPEND INBOX {24}\r\na LOGIN x y\r\n{5}\r\n\"(\0)\r\n l3\r\n"),
	  .want = "A(l2) A(APPEND) A(INBOX) L{24} D(a LOGIN x y\\r\\n{5}\\r\\n\"(\\x00)\\r\\n) E A(l3) EOL" },
	{ .name = "largest literal size", .mode = IMAP_LEX_CLIENT,
	  .in = "e0 X {18446744073709551615+}\r\nab",
	  .want = "A(e0) A(X) L{18446744073709551615+} D(ab)" },

	/* client: errors and recovery */
	{ .name = "unexpected )", .mode = IMAP_LEX_CLIENT, .in = "c6 NOOP )\r\nc7 NOOP\r\n",
	  .want = "A(c6)@0 A(NOOP)@1 ERR(syntax)@2 EOL@2 A(c7)@0 A(NOOP)@1 EOL@2", .flags = F_POS },
	{ .name = "NUL in atom", .mode = IMAP_LEX_CLIENT,
	  BIN("c8 LO\0GIN x\r\nc9 NOOP\r\n"),
	  .want = "A(c8) ERR(syntax) EOL A(c9) A(NOOP) EOL" },
	{ .name = "NUL between tokens", .mode = IMAP_LEX_CLIENT,
	  BIN("c8 \0 x\r\nc9 NOOP\r\n"),
	  .want = "A(c8) ERR(syntax) EOL A(c9) A(NOOP) EOL" },
	{ .name = "NUL in quoted", .mode = IMAP_LEX_CLIENT,
	  BIN("c8 LOGIN \"a\0\" x\r\nc9 NOOP\r\n"),
	  .want = "A(c8) A(LOGIN) ERR(syntax) EOL A(c9) A(NOOP) EOL" },
	{ .name = "CTL in atom, TAB as separator", .mode = IMAP_LEX_CLIENT,
	  .in = "c8 a\x01 x\r\nc9\tNOOP\r\nd0 NOOP\r\n",
	  .want = "A(c8) ERR(syntax) EOL ERR(syntax) EOL A(d0) A(NOOP) EOL" },
	{ .name = "bare CR between tokens", .mode = IMAP_LEX_CLIENT,
	  .in = "d1 NOOP\rd2 NOOP\r\nd3 NOOP\r\n",
	  .want = "A(d1) A(NOOP) ERR(syntax) EOL A(d3) A(NOOP) EOL" },
	{ .name = "bare CR in quoted", .mode = IMAP_LEX_CLIENT,
	  .in = "d1 LOGIN \"a\rb\" c\r\nd3 NOOP\r\n",
	  .want = "A(d1) A(LOGIN) ERR(syntax) EOL A(d3) A(NOOP) EOL" },
	{ .name = "LF in quoted ends the line", .mode = IMAP_LEX_CLIENT,
	  .in = "d1 LOGIN \"ab\nd3 NOOP\r\n",
	  .want = "A(d1) A(LOGIN) ERR(syntax) EOL A(d3) A(NOOP) EOL" },
	{ .name = "escaped CR in quoted", .mode = IMAP_LEX_CLIENT,
	  .in = "d1 LOGIN \"ab\\\r\nd3 NOOP\r\n",
	  .want = "A(d1) A(LOGIN) ERR(syntax) EOL A(d3) A(NOOP) EOL" },
	{ .name = "bad literal syntax", .mode = IMAP_LEX_CLIENT,
	  .in = "e1 LOGIN {abc}\r\ne2 X {}\r\ne3 X {+}\r\ne4 X {5++}\r\ne5 X {5 }\r\ne6 NOOP\r\n",
	  .want = "A(e1) A(LOGIN) ERR(syntax) EOL A(e2) A(X) ERR(syntax) EOL "
		  "A(e3) A(X) ERR(syntax) EOL A(e4) A(X) ERR(syntax) EOL "
		  "A(e5) A(X) ERR(syntax) EOL A(e6) A(NOOP) EOL" },
	{ .name = "{5}x", .mode = IMAP_LEX_CLIENT,
	  .in = "e3 LOGIN {5}x\r\ne4 LOGIN {5}\rx\r\ne5 X {5} \r\ne6 NOOP\r\n",
	  .want = "A(e3) A(LOGIN) ERR(syntax) EOL A(e4) A(LOGIN) ERR(syntax) EOL "
		  "A(e5) A(X) ERR(syntax) EOL A(e6) A(NOOP) EOL" },
	{ .name = "literal size overflow", .mode = IMAP_LEX_CLIENT,
	  .in = "e5 X {18446744073709551616}\r\ne6 X {000000000000000000001+}\r\ne7 NOOP\r\n",
	  .want = "A(e5) A(X) ERR(syntax) EOL A(e6) A(X) ERR(syntax) EOL A(e7) A(NOOP) EOL" },
	{ .name = "brace inside an atom (sync)", .mode = IMAP_LEX_CLIENT,
	  .in = "k1 X ab{3}\r\nxyz\r\nk2 NOOP\r\n",
	  .want = "A(k1) A(X) ERR(syntax) EOL A(xyz) EOL A(k2) A(NOOP) EOL" },
	{ .name = "brace inside an atom (non-sync)", .mode = IMAP_LEX_CLIENT,
	  .in = "k3 X ab{3+}\r\nxyz\r\nk4 NOOP\r\n",
	  .want = "A(k3) A(X) ERR(syntax) EOL A(k4) A(NOOP) EOL" },
	{ .name = "brace inside brackets", .mode = IMAP_LEX_CLIENT,
	  .in = "k5 FETCH 1 BODY[HEADER.FIELDS ({4+}\r\nFROM)]\r\nk6 NOOP\r\n",
	  .want = "A(k5) A(FETCH) A(1) ERR(syntax) EOL A(k6) A(NOOP) EOL" },
	{ .name = "error skips a non-sync literal, then a sync one", .mode = IMAP_LEX_CLIENT,
	  .in = "x1 FETCH ) {5+}\r\nab\r\nc {3}\r\nx2 NOOP\r\n",
	  .want = "A(x1) A(FETCH) ERR(syntax) EOL A(x2) A(NOOP) EOL" },
	{ .name = "client error: sync literal ends the command", .mode = IMAP_LEX_CLIENT,
	  .in = "x1 FETCH ) {5}\r\nab\r\nc\r\n",
	  .want = "A(x1) A(FETCH) ERR(syntax) EOL A(ab) EOL A(c) EOL" },
	{ .name = "literal over max_literal, sync", .mode = IMAP_LEX_CLIENT, .max_literal = 10,
	  .in = "f1 APPEND INBOX {10}\r\n0123456789\r\nf2 APPEND INBOX ~{11}\r\nf3 NOOP\r\n",
	  .want = "A(f1)@0 A(APPEND)@1 A(INBOX)@2 L{10}@3 D(0123456789)@3 E@3 EOL@4 "
		  "A(f2)@0 A(APPEND)@1 A(INBOX)@2 ERR(big~{11})@3 EOL@3 A(f3)@0 A(NOOP)@1 EOL@2",
	  .flags = F_POS },
	{ .name = "literal over max_literal, non-sync", .mode = IMAP_LEX_CLIENT, .max_literal = 10,
	  .in = "f3 APPEND INBOX {11+}\r\nf4 LOGOUT\r\n (x) {4+}\r\nf6 X\r\nf5 NOOP\r\n",
	  .want = "A(f3) A(APPEND) A(INBOX) ERR(big{11+}) EOL A(f5) A(NOOP) EOL" },
	{ .name = "literal over max_literal, non-sync, then sync", .mode = IMAP_LEX_CLIENT,
	  .max_literal = 10,
	  .in = "f3 APPEND INBOX {11+}\r\nf4 LOGOUT\r\n (x) {300}\r\nf5 NOOP\r\n",
	  .want = "A(f3) A(APPEND) A(INBOX) ERR(big{11+}) EOL A(f5) A(NOOP) EOL" },
	{ .name = "line over max_line", .mode = IMAP_LEX_CLIENT, .max_line = 32,
	  .in = "g1 SEARCH TEXT aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\ng2 NOOP\r\n",
	  .want = "A(g1) A(SEARCH) A(TEXT) ERR(toolong) EOL A(g2) A(NOOP) EOL" },
	{ .name = "overlong line ending in a non-sync literal", .mode = IMAP_LEX_CLIENT,
	  .max_line = 32,
	  .in = "g3 APPEND INBOX xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx {21+}\r\na LOGIN x y\r\nb NOOP\r\n"
		"\r\ng4 NOOP\r\n",
	  .want = "A(g3) A(APPEND) A(INBOX) ERR(toolong) EOL A(g4) A(NOOP) EOL" },
	{ .name = "line limit hit inside the literal announcement", .mode = IMAP_LEX_CLIENT,
	  .max_line = 32,
	  .in = "g5 APPEND INBOX xxxxxxxxxxxx {13+}\r\na LOGIN x y\r\n\r\ng6 NOOP\r\n",
	  .want = "A(g5) A(APPEND) A(INBOX) A(xxxxxxxxxxxx) ERR(toolong) EOL A(g6) A(NOOP) EOL" },
	{ .name = "line limit hit at the announcement's CR", .mode = IMAP_LEX_CLIENT,
	  .max_line = 30,
	  .in = "g7 APPEND INBOX xxxxxxxx {13+}\r\na LOGIN x y\r\n\r\ng8 NOOP\r\n",
	  .want = "A(g7) A(APPEND) A(INBOX) A(xxxxxxxx) ERR(toolong) EOL A(g8) A(NOOP) EOL" },
	{ .name = "line limit hit at the announcement's LF", .mode = IMAP_LEX_CLIENT,
	  .max_line = 31,
	  .in = "g7 APPEND INBOX xxxxxxxx {13+}\r\na LOGIN x y\r\n\r\ng8 NOOP\r\n",
	  .want = "A(g7) A(APPEND) A(INBOX) A(xxxxxxxx) ERR(toolong) EOL A(g8) A(NOOP) EOL" },
	{ .name = "max_line excludes literal payloads", .mode = IMAP_LEX_CLIENT, .max_line = 13,
	  .in = "m1 X {10}\r\n0123456789\r\n",
	  .want = "A(m1) A(X) L{10} D(0123456789) E EOL" },
	{ .name = "max_line counts CRLF", .mode = IMAP_LEX_CLIENT, .max_line = 12,
	  .in = "m1 X {10}\r\n0123456789\r\nm2 Y\r\n",
	  .want = "A(m1) A(X) L{10} D(0123456789) E ERR(toolong) EOL A(m2) A(Y) EOL" },
	{ .name = "token over max_token", .mode = IMAP_LEX_CLIENT, .max_token = 8,
	  .in = "h1 LOGIN abcdefgh abcdefghi x\r\nh2 LOGIN \"1234567\\\"\" \"123456789\"\r\nh3 NOOP\r\n",
	  .want = "A(h1) A(LOGIN) A(abcdefgh) ERR(toolong) EOL "
		  "A(h2) A(LOGIN) Q(1234567\") ERR(toolong) EOL A(h3) A(NOOP) EOL" },
	{ .name = "max_token inside brackets", .mode = IMAP_LEX_CLIENT, .max_token = 13,
	  .in = "h4 FETCH 1 BODY[1 (2)]<> BODY[1 (23)]<>\r\nh5 NOOP\r\n",
	  .want = "A(h4) A(FETCH) A(1) A(BODY[1 (2)]<>) ERR(toolong) EOL A(h5) A(NOOP) EOL" },

	/* client: consumer actions */
	{ .name = "reject_literal then a new command", .mode = IMAP_LEX_CLIENT, .flags = F_REJECT,
	  .in = "i1 APPEND INBOX {100}\r\ni2 NOOP\r\ni3 APPEND INBOX (\\Seen) {3}\r\nabc\r\n",
	  .want = "A(i1) A(APPEND) A(INBOX) L{100} REJ A(i2) A(NOOP) EOL "
		  "A(i3) A(APPEND) A(INBOX) ( A(\\Seen) ) L{3} D(abc) E EOL" },
	{ .name = "reject a non-sync literal: payload dropped", .mode = IMAP_LEX_CLIENT,
	  .flags = F_REJECT,
	  .in = "i1 APPEND INBOX {100+}\r\n" HUNDRED " x\r\ni2 NOOP\r\n",
	  .want = "A(i1) A(APPEND) A(INBOX) L{100+} REJ EOL A(i2) A(NOOP) EOL" },
	{ .name = "expect_text_line (AUTHENTICATE)", .mode = IMAP_LEX_CLIENT, .flags = F_AUTH | F_POS,
	  .in = "j1 AUTHENTICATE PLAIN\r\nAGJvYgBwdw==\r\n\"{5}( x\r\nj2 NOOP\r\n",
	  .want = "A(j1)@0 A(AUTHENTICATE)@1 A(PLAIN)@2 EOL@3 T(AGJvYgBwdw==)@0 EOL@1 "
		  "T(\"{5}( x)@0 EOL@1 A(j2)@0 A(NOOP)@1 EOL@2" },
	{ .name = "expect_text_line: empty and * lines", .mode = IMAP_LEX_CLIENT, .flags = F_AUTH,
	  .in = "j3 AUTHENTICATE X\r\n\r\n*\nj4 NOOP\r\n",
	  .want = "A(j3) A(AUTHENTICATE) A(X) EOL T() EOL T(*) EOL A(j4) A(NOOP) EOL" },
	{ .name = "expect_text_line: bare CR and NUL", .mode = IMAP_LEX_CLIENT, .flags = F_AUTH,
	  BIN("j5 AUTHENTICATE X\r\nab\rc {1}\r\nd\0e {1+}\r\nj6 NOOP\r\n"),
	  .want = "A(j5) A(AUTHENTICATE) A(X) EOL T(ab) ERR(syntax) EOL ERR(syntax) EOL A(j6) A(NOOP) EOL" },

	/* server responses */
	{ .name = "untagged OK with CAPABILITY code", .mode = IMAP_LEX_SERVER,
	  .in = "* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n",
	  .want = "A(*)@0 A(OK)@1 T([CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.)@2 EOL@3",
	  .flags = F_POS },
	{ .name = "tagged OK/NO/BAD", .mode = IMAP_LEX_SERVER,
	  .in = "a1 OK LOGIN completed\r\na2 NO [AUTHENTICATIONFAILED] \"bad {5} (x\r\n"
		"a3 bad Unknown command\r\na4 OK\r\na5 OK \r\na6 ok(x\r\n",
	  .want = "A(a1) A(OK) T(LOGIN completed) EOL A(a2) A(NO) T([AUTHENTICATIONFAILED] \"bad {5} (x) EOL "
		  "A(a3) A(bad) T(Unknown command) EOL A(a4) A(OK) EOL A(a5) A(OK) T() EOL "
		  "A(a6) A(ok) T((x) EOL" },
	{ .name = "BYE and PREAUTH", .mode = IMAP_LEX_SERVER,
	  .in = "* PREAUTH [CAPABILITY IMAP4rev1] Logged in as bob\r\n* BYE Logging out\r\n",
	  .want = "A(*) A(PREAUTH) T([CAPABILITY IMAP4rev1] Logged in as bob) EOL "
		  "A(*) A(BYE) T(Logging out) EOL" },
	{ .name = "continuations", .mode = IMAP_LEX_SERVER,
	  .in = "+ Ready for literal\r\n+ \r\n+\r\n+ dGVzdA==\r\n+  two\n",
	  .want = "A(+)@0 T(Ready for literal)@1 EOL@2 A(+)@0 T()@1 EOL@2 A(+)@0 T()@1 EOL@2 "
		  "A(+)@0 T(dGVzdA==)@1 EOL@2 A(+)@0 T( two)@1 EOL@2", .flags = F_POS },
	{ .name = "FETCH with BODY[] literal", .mode = IMAP_LEX_SERVER,
	  .in = "* 12 FETCH (UID 5 BODY[] {35}\r\nSubject: {5}\r\n\r\nhello\r\n* 13 FETCH ( FLAGS (\\Seen))\r\n"
		"* 3 EXISTS\r\n",
	  .want = "A(*)@0 A(12)@1 A(FETCH)@2 (@3 A(UID)@3.1 A(5)@3.1 A(BODY[])@3.1 L{35}@3.1 "
		  "D(Subject: {5}\\r\\n\\r\\nhello\\r\\n* 13 FETCH ()@3.1 E@3.1 A(FLAGS)@3.1 "
		  "(@3.1 A(\\Seen)@3.2 )@3.1 )@3 EOL@4 A(*)@0 A(3)@1 A(EXISTS)@2 EOL@3",
	  .flags = F_POS },
	{ .name = "FETCH with literal8 and header fields", .mode = IMAP_LEX_SERVER,
	  BIN("* 1 FETCH (BINARY[1] ~{3}\r\nA\0B BODY[HEADER.FIELDS (FROM)] {0}\r\n)\r\n"),
	  .want = "A(*) A(1) A(FETCH) ( A(BINARY[1]) L~{3} D(A\\x00B) E A(BODY[HEADER.FIELDS (FROM)]) "
		  "L{0} E ) EOL" },
	{ .name = "EXISTS, EXPUNGE, SEARCH, CAPABILITY", .mode = IMAP_LEX_SERVER,
	  .in = "* 3 EXISTS\r\n* 5 EXPUNGE\r\n* SEARCH 1 2 3\r\n* SEARCH\r\n"
		"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR\r\n* 5 OK x\r\n",
	  .want = "A(*) A(3) A(EXISTS) EOL A(*) A(5) A(EXPUNGE) EOL A(*) A(SEARCH) A(1) A(2) A(3) EOL "
		  "A(*) A(SEARCH) EOL A(*) A(CAPABILITY) A(IMAP4rev1) A(LITERAL+) A(SASL-IR) EOL "
		  "A(*) A(5) A(OK) A(x) EOL" },
	{ .name = "LIST and FLAGS", .mode = IMAP_LEX_SERVER,
	  .in = "* LIST (\\HasNoChildren) \"/\" \"a b\"\r\n* FLAGS (\\Answered \\Seen $Forwarded)\r\n",
	  .want = "A(*) A(LIST) ( A(\\HasNoChildren) ) Q(/) Q(a b) EOL "
		  "A(*) A(FLAGS) ( A(\\Answered) A(\\Seen) A($Forwarded) ) EOL" },
	{ .name = "server: + is only special as the tag", .mode = IMAP_LEX_SERVER,
	  .in = "* FLAGS (+x)\r\n",
	  .want = "A(*) A(FLAGS) ( A(+x) ) EOL" },
	{ .name = "server: literal over max_literal is skipped", .mode = IMAP_LEX_SERVER,
	  .max_literal = 4,
	  .in = "* 1 FETCH (BODY[] {11}\r\n* 2 EXPUNGE)\r\n* 3 EXISTS\r\n",
	  .want = "A(*) A(1) A(FETCH) ( A(BODY[]) ERR(big{11}) EOL A(*) A(3) A(EXISTS) EOL" },
	{ .name = "server: error skips even a sync literal", .mode = IMAP_LEX_SERVER,
	  .in = "* 1 FETCH ) {5}\r\nab\r\nc\r\n* 2 EXISTS\r\n",
	  .want = "A(*) A(1) A(FETCH) ERR(syntax) EOL A(*) A(2) A(EXISTS) EOL" },
	{ .name = "server: NUL and bare CR in text", .mode = IMAP_LEX_SERVER,
	  BIN("* OK a\0b {1}\r\n* OK a\rb {1}\r\n* 1 EXISTS\r\n"),
	  .want = "A(*) A(OK) ERR(syntax) EOL A(*) A(OK) T(a) ERR(syntax) EOL A(*) A(1) A(EXISTS) EOL" },
	{ .name = "server: text over max_token", .mode = IMAP_LEX_SERVER, .max_token = 8,
	  .max_line = UNLIMITED,
	  .in = "* OK 12345678\r\n* NO 123456789 {3}\r\n* 1 EXISTS\r\n",
	  .want = "A(*) A(OK) T(12345678) EOL A(*) A(NO) ERR(toolong) EOL A(*) A(1) A(EXISTS) EOL" },
};

/* For every max_line (or max_token) below what the command needs, the error
 * must come and recovery must land on the next command, for every split. */
static void
sweep(const char *name, enum imap_lex_mode mode, const char *in, const char *suffix,
    size_t from, size_t to, int tokens)
{
	struct lcase c;
	size_t lim, n = strlen(in), s1, slen = strlen(suffix);
	char *whole, *got;
	int good = 1;

	for (lim = from; lim <= to && good; lim++) {
		memset(&c, 0, sizeof(c));
		c.name = name;
		c.mode = mode;
		c.in = in;
		if (tokens)
			c.max_token = lim;
		else
			c.max_line = lim;
		whole = lex_split(&c, n, n, 0, 0);
		if (strlen(whole) < slen || strcmp(whole + strlen(whole) - slen, suffix) != 0 ||
		    strstr(whole, "ERR(toolong) EOL") == NULL) {
			diag("%s: limit %zu: got %s", name, lim, whole);
			good = 0;
		}
		c.want = whole;
		for (s1 = 0; s1 <= n && good; s1++)
			good = check_same("sweep split", &c, whole, lex_split(&c, s1, s1, 0, 0), s1, s1);
		if (good)
			good = check_same("sweep bytewise", &c, whole, lex_split(&c, 0, 0, 1, 0), 1, 1);
		if (good) {
			got = lex_split(&c, 0, 0, 3, 1);
			good = check_same("sweep fast", &c, whole, got, 3, 3);
		}
		free(whole);
	}
	ok(good, "%s: recovery for every %s limit in [%zu, %zu]", name,
	    tokens ? "max_token" : "max_line", from, to);
}

/* Direct calls, to pin down what *used and the accessors report. */
/* The plain-line verdict byte by byte, as imap_lex_plain_line() gave it
 * before it looked at 16 bytes at a time: the reference for test_plain_fast. */
static size_t
plain_line_ref(const char *buf, size_t len)
{
	const unsigned char *p = (const unsigned char *)buf, *nl;
	size_t n, i = 0, end;
	long depth = 0;

	if (len < 2 || (nl = memchr(p, '\n', len)) == NULL)
		return 0;
	n = (size_t)(nl - p) + 1;
	if (n < 2 || p[n - 2] != '\r')
		return 0;
	for (end = n - 2; i < end; i++) {
		unsigned char c = p[i];

		if (c == '(')
			depth++;
		else if (c == ')') {
			if (--depth < 0)
				return 0;
		} else if (c == '"') {
			for (i++;; i++) {
				if (i >= end)
					return 0;
				if (p[i] == '"')
					break;
				if (p[i] == '\\') {
					if (i + 1 >= end || p[i + 1] == '\0' || p[i + 1] == '\r')
						return 0;
					i++;
				} else if (p[i] == '\0' || p[i] == '\r' || p[i] == '\n')
					return 0;
			}
		} else if (c < 0x20 || c == 0x7f || c == '[' || c == '{')
			return 0;
	}
	return n;
}

/* The fast plain-line scan agrees with the byte-by-byte one on random lines
 * made mostly of what FETCH answers hold, with every special byte mixed in. */
static void
test_plain_fast(void)
{
	static const char alphabet[] = "* 1 FETCH (UID 42 FLAGS (\\Seen))aZ09 ()()\"\\[]{}\x01\x7f\x80\xff\r\n\t\0";
	struct imap_lex *lx = imap_lex_new(IMAP_LEX_SERVER, NULL);
	char line[200];
	unsigned seed = 12345, bad = 0, plain = 0;

	for (int k = 0; k < 200000; k++) {
		size_t len = 0, want = 2 + (seed = seed * 1103515245 + 12345) % 120;
		unsigned special = (seed >> 8) % 4;	/* 0: FETCH bytes only */

		while (len + 2 < want) {
			seed = seed * 1103515245 + 12345;
			size_t pick = (seed >> 8) % (special ? sizeof(alphabet) - 1 : 33);
			line[len++] = alphabet[pick];
		}
		line[len++] = '\r';
		line[len++] = '\n';
		if ((seed >> 20) % 2)
			line[len++] = 'x';	/* the next line's first byte */
		size_t got = imap_lex_plain_line(lx, line, len), ref = plain_line_ref(line, len);

		if (got != ref && bad++ < 3)
			diag("plain line %zu bytes: fast %zu, byte by byte %zu", len, got, ref);
		plain += got != 0;
	}
	ok(bad == 0 && plain > 10000, "plain line: 16-byte scan agrees with the byte loop (%u plain of 200000)", plain);
	imap_lex_free(lx);
}

/* A quiet session gives back a grown token buffer; lexing goes on unchanged,
 * and a shrink in the middle of a token keeps it whole. */
static void
test_shrink(void)
{
	struct imap_lex_limits lim = { .max_line = 4096, .max_token = 2048, .max_literal = 0 };
	struct imap_lex *lx = imap_lex_new(IMAP_LEX_SERVER, &lim);
	char line[1200], want[600];
	struct imap_tok tok;
	size_t used, half;
	enum imap_lex_status r;
	int good = 1;

	memset(want, 'x', 500);
	want[500] = '\0';
	snprintf(line, sizeof(line), "* %s\r\n", want);
	for (int round = 0; round < 3; round++) {
		const char *in = line;

		while ((r = imap_lex_next(lx, in, strlen(in), &used, &tok)) == IMAP_LEX_TOKEN) {
			in += used;
			if (tok.type == IMAP_TOK_ATOM && tok.len == 500)
				good &= memcmp(tok.str, want, 500) == 0;
			if (tok.type == IMAP_TOK_EOL)
				break;
		}
		good &= imap_lex_at_command_start(lx);
		imap_lex_shrink(lx);
	}
	ok(good, "shrink: a 500-byte token lexes the same after each shrink");

	/* Half a token, a shrink (must not give it up), then the rest. */
	half = 2 + 250;
	r = imap_lex_next(lx, line, 2, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_ATOM && tok.len == 1, "shrink: the '*' first");
	r = imap_lex_next(lx, line + 2, half - 2, &used, &tok);
	ok(r == IMAP_LEX_MORE, "shrink: half a token is held");
	imap_lex_shrink(lx);
	r = imap_lex_next(lx, line + half, strlen(line) - half, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_ATOM && tok.len == 500 &&
	    memcmp(tok.str, want, 500) == 0, "shrink: mid-token it changes nothing");
	imap_lex_free(lx);
}

static void
test_api(void)
{
	struct imap_lex_limits lim = { .max_line = 100, .max_token = 100, .max_literal = 0 };
	struct imap_lex *lx = imap_lex_new(IMAP_LEX_CLIENT, &lim);
	struct imap_tok tok;
	size_t used;
	enum imap_lex_status r;
	const char *in = "a1 X {10}\r\n0123";

	ok(lx != NULL && imap_lex_at_command_start(lx), "api: new lexer is at command start");
	r = imap_lex_next(lx, in, strlen(in), &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_ATOM && used == 2 && tok.len == 2 &&
	    memcmp(tok.str, "a1", 2) == 0, "api: the tag is returned having used 2 bytes");
	ok(!imap_lex_at_command_start(lx), "api: not at command start after the tag");
	in += used;
	r = imap_lex_next(lx, in, strlen(in), &used, &tok);
	in += used;
	r = imap_lex_next(lx, in, strlen(in), &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_LITERAL && tok.literal_size == 10 &&
	    tok.literal_flags == 0 && used == 7 && tok.index == 2,
	    "api: LITERAL returned right after its CRLF, payload untouched");
	in += used;
	ok(imap_lex_literal_remaining(lx) == 10, "api: literal_remaining is the literal size");
	imap_lex_skip_literal(lx, 4);
	ok(imap_lex_literal_remaining(lx) == 6, "api: skip_literal(4) leaves 6");
	r = imap_lex_next(lx, "456789 y\r\n", 10, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_LITERAL_DATA && tok.len == 6 && used == 6,
	    "api: after skip_literal, DATA covers only the rest");
	ok(imap_lex_literal_remaining(lx) == 0, "api: nothing remains");
	r = imap_lex_next(lx, NULL, 0, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_LITERAL_END && used == 0,
	    "api: LITERAL_END comes with an empty window");
	r = imap_lex_next(lx, NULL, 0, &used, &tok);
	ok(r == IMAP_LEX_MORE && used == 0, "api: then MORE");
	r = imap_lex_next(lx, " y\r\n", 4, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_ATOM && tok.index == 3 && used == 2,
	    "api: lexing goes on after the literal");
	r = imap_lex_next(lx, "\r\n", 2, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_EOL && used == 2 &&
	    imap_lex_at_command_start(lx), "api: EOL, back at command start");

	/* skip the whole payload: END comes without any window. */
	r = imap_lex_next(lx, "b {3}\r\n", 7, &used, &tok);
	r = imap_lex_next(lx, "{3}\r\n", 5, &used, &tok);
	imap_lex_skip_literal(lx, 3);
	r = imap_lex_next(lx, NULL, 0, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_LITERAL_END,
	    "api: skipping the whole payload yields LITERAL_END");
	imap_lex_free(lx);

	/* limits can change between commands */
	lx = imap_lex_new(IMAP_LEX_CLIENT, &lim);
	lim.max_token = 3;
	imap_lex_set_limits(lx, &lim);
	r = imap_lex_next(lx, "abcd ", 5, &used, &tok);
	ok(r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_ERROR && tok.err == IMAP_LEX_ERR_TOO_LONG,
	    "api: set_limits lowers max_token");
	imap_lex_free(lx);

	/* NULL limits mean defaults */
	lx = imap_lex_new(IMAP_LEX_SERVER, NULL);
	r = imap_lex_next(lx, "* OK hi\r\n", 9, &used, &tok);
	ok(lx != NULL && r == IMAP_LEX_TOKEN && tok.type == IMAP_TOK_ATOM && used == 1,
	    "api: NULL limits work");
	imap_lex_free(lx);
}

/*
 * How the tokens see buf: the bytes up to the first line's EOL, or 0 when an
 * ERROR or a LITERAL comes first (or no EOL at all).
 */
static size_t
lex_line_end(enum imap_lex_mode mode, const struct imap_lex_limits *lim, const char *buf,
    size_t len)
{
	struct imap_lex *lx = imap_lex_new(mode, lim);
	struct imap_tok tok;
	size_t at = 0, used, end = 0;

	for (;;) {
		if (imap_lex_next(lx, buf + at, len - at, &used, &tok) != IMAP_LEX_TOKEN)
			break;
		at += used;
		if (tok.type == IMAP_TOK_ERROR || tok.type == IMAP_TOK_LITERAL)
			break;
		if (tok.type == IMAP_TOK_EOL) {
			end = at;
			break;
		}
	}
	imap_lex_free(lx);
	return end;
}

static size_t
plain_line(enum imap_lex_mode mode, const struct imap_lex_limits *lim, const char *buf,
    size_t len)
{
	struct imap_lex *lx = imap_lex_new(mode, lim);
	size_t n = imap_lex_plain_line(lx, buf, len);

	imap_lex_free(lx);
	return n;
}

/* imap_lex_plain_line says yes only where the tokens agree, byte for byte. */
static void
test_plain_line(void)
{
	static const struct {
		const char *in;
		size_t want;	/* 0: not plain */
	} lines[] = {
		{ "* 12 FETCH (UID 40 FLAGS (\\Seen \\Answered))\r\n", 45 },
		{ "* 12 FETCH (UID 40 FLAGS ())\r\n* 13 FETCH", 30 },
		{ "* 1 FETCH (UID 1 MODSEQ (9) X-GM-LABELS (\"a \\\" ( b\"))\r\n", 55 },
		{ "a1 OK done\r\n", 12 },
		{ "* OK [UIDNEXT 5] x\r\n", 0 },		/* '[' */
		{ "* 1 FETCH (BODY[] {5}\r\n", 0 },		/* a literal */
		{ "* 1 FETCH (X {5}\r\n", 0 },
		{ "* 1 FETCH (UID 2))\r\n", 0 },		/* ')' below the top: an error */
		{ "* 1 FETCH (X \"open\r\n", 0 },		/* unclosed quote */
		{ "* 1 FETCH (X \"a\\\r\n", 0 },		/* escaped CR */
		{ "* 1 X\rY\r\n", 0 },			/* bare CR */
		{ "* 1 FETCH (X a\x01" "b)\r\n", 0 },	/* CTL in an atom */
		{ "* 1 FETCH (X \"a\x01" "b\")\r\n", 21 },	/* ... allowed quoted */
		{ "* 1 FETCH (X \"a\x00" "b\")\r\n", 0 },	/* NUL (len set below) */
		{ "* 1 FETCH (UID 2)\n", 0 },			/* bare LF: the tokens judge */
		{ "* 1 FETCH (UID 2)", 0 },			/* incomplete */
		{ "* 3 EXISTS\r\n", 12 },
		{ "\r\n", 2 },
	};
	struct imap_lex_limits lim = { .max_line = 64, .max_token = 64, .max_literal = 0 };
	struct imap_lex *lx;
	struct imap_tok tok;
	size_t i, used, accepted = 0, tried = 0, bad = 0;
	unsigned seed = 12345;

	for (i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
		const char *in = lines[i].in;
		size_t len = i == 13 ? 21 : strlen(in), got;	/* strlen stops at a NUL */

		got = plain_line(IMAP_LEX_SERVER, &lim, in, len);
		ok(got == lines[i].want && (got == 0 || lex_line_end(IMAP_LEX_SERVER, &lim, in, len) == got),
		    "plain line %zu: %zu bytes (want %zu)", i, got, lines[i].want);
	}
	lim.max_line = 20;
	ok(plain_line(IMAP_LEX_SERVER, &lim, lines[0].in, strlen(lines[0].in)) == 0,
	    "plain line: not over max_line");
	lim.max_line = 64;
	lim.max_token = 10;
	ok(plain_line(IMAP_LEX_SERVER, &lim, lines[0].in, strlen(lines[0].in)) == 0,
	    "plain line: not over max_token");
	lim.max_token = 64;

	lx = imap_lex_new(IMAP_LEX_SERVER, &lim);
	imap_lex_next(lx, "* ", 2, &used, &tok);
	ok(imap_lex_plain_line(lx, "1 EXISTS\r\n", 10) == 0, "plain line: only at a line start");
	imap_lex_free(lx);
	lx = imap_lex_new(IMAP_LEX_CLIENT, &lim);
	imap_lex_expect_text_line(lx);
	ok(imap_lex_plain_line(lx, "dGVzdA==\r\n", 10) == 0, "plain line: not for a text line");
	imap_lex_free(lx);

	/* Random lines over the bytes that matter: whenever the fast answer is
	   yes, the tokens end the line at the same byte with no error. */
	for (tried = 0; tried < 200000; tried++) {
		static const char alphabet[] = "a1 ()\"\\[]{}*+~%\r\n\x01\x7f\x80";
		char buf[40];
		size_t len = (seed = seed * 1103515245u + 12345u) % 24, n;
		enum imap_lex_mode mode = tried % 2 ? IMAP_LEX_CLIENT : IMAP_LEX_SERVER;

		for (i = 0; i < len; i++) {
			seed = seed * 1103515245u + 12345u;
			buf[i] = (seed >> 16) % 8 == 0 ? '\0' : alphabet[(seed >> 8) % (sizeof alphabet - 1)];
		}
		buf[len++] = '\r';
		buf[len++] = '\n';
		lim.max_line = lim.max_token = tried % 3 ? 64 : 12;
		n = plain_line(mode, &lim, buf, len);
		if (n > 0) {
			accepted++;
			bad += lex_line_end(mode, &lim, buf, len) != n;
		}
	}
	ok(bad == 0 && accepted > 1000, "plain line: %zu random lines, %zu plain, %zu disagree "
	    "with the tokens", tried, accepted, bad);
}

#if defined(__SANITIZE_ADDRESS__)
#define LEX_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LEX_ASAN 1
#endif
#endif

static size_t
heap_in_use(void)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 33) && !defined(LEX_ASAN)
	return mallinfo2().uordblks;
#else
	return 0;
#endif
}

/* A stream generated on the fly: header, then payload of n bytes, then trailer. */
struct gen {
	const char *hdr, *trl;
	uint64_t n, off;	/* off: position in the whole stream */
};

static size_t
gen_fill(struct gen *g, char *buf, size_t cap)
{
	size_t h = strlen(g->hdr), t = strlen(g->trl), k = 0;
	uint64_t total = h + g->n + t;

	while (k < cap && g->off < total) {
		if (g->off < h)
			buf[k] = g->hdr[g->off];
		else if (g->off < h + g->n)
			buf[k] = (char)('a' + (g->off - h) % 26);
		else
			buf[k] = g->trl[g->off - h - g->n];
		k++;
		g->off++;
	}
	return k;
}

/* 10 MB through 4 KB windows: payload handed out in place, nothing buffered. */
static void
test_big_literal(enum imap_lex_mode mode, const char *hdr, const char *trl, const char *want_head)
{
	struct imap_lex_limits lim = { .max_line = mode == IMAP_LEX_SERVER ? 0 : 8192,
		.max_token = 1024, .max_literal = 0 };
	struct imap_lex *lx = imap_lex_new(mode, &lim);
	struct gen g = { .hdr = hdr, .trl = trl, .n = 10 * 1024 * 1024 };
	struct out head = { 0 };
	struct imap_tok tok;
	char buf[4096];
	size_t len, off, used, h = strlen(hdr), before, peak = 0, now;
	uint64_t data = 0;
	int inwin = 1, content = 1, tail_ok;

	before = heap_in_use();
	while ((len = gen_fill(&g, buf, sizeof(buf))) > 0) {
		for (off = 0;;) {
			if (imap_lex_next(lx, buf + off, len - off, &used, &tok) == IMAP_LEX_MORE)
				break;
			if (tok.type == IMAP_TOK_LITERAL_DATA) {
				size_t i;

				if (tok.str != buf + off || tok.len > len - off)
					inwin = 0;
				for (i = 0; i < tok.len; i++)
					if (tok.str[i] != (char)('a' + (data + i) % 26))
						content = 0;
				data += tok.len;
			} else if (tok.type == IMAP_TOK_LITERAL) {
				out_str(&head, "L");
			} else if (tok.type == IMAP_TOK_LITERAL_END) {
				out_str(&head, "E");
			} else if (tok.type == IMAP_TOK_EOL) {
				out_str(&head, "EOL");
			} else if (tok.type == IMAP_TOK_LIST_BEGIN) {
				out_str(&head, "(");
			} else if (tok.type == IMAP_TOK_LIST_END) {
				out_str(&head, ")");
			} else if (tok.type == IMAP_TOK_ATOM || tok.type == IMAP_TOK_QUOTED) {
				out_add(&head, tok.str, tok.len);
				out_str(&head, ",");
			} else {
				out_str(&head, tok.type == IMAP_TOK_ERROR ? "ERR" : "?");
			}
			off += used;
		}
		now = heap_in_use();
		if (now > before && now - before > peak)
			peak = now - before;
	}
	tail_ok = head.s != NULL && strcmp(head.s, want_head) == 0;
	if (!tail_ok)
		diag("tokens: %s", head.s ? head.s : "(none)");
	ok(tail_ok && data == g.n && inwin && content && g.off == h + g.n + strlen(trl),
	    "10 MB literal in 4 KB windows (%s): all payload in place, tokens right",
	    mode == IMAP_LEX_SERVER ? "server" : "client");
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 33) && !defined(LEX_ASAN)
	ok(peak < 64 * 1024, "10 MB literal (%s): heap grew by %zu bytes only",
	    mode == IMAP_LEX_SERVER ? "server" : "client", peak);
#endif
	free(head.s);
	imap_lex_free(lx);
}

/* A 10 MB line with no limit on it: the token limit alone bounds memory. */
static void
test_big_line(void)
{
	struct imap_lex_limits lim = { .max_line = 0, .max_token = 4096, .max_literal = 0 };
	struct imap_lex *lx = imap_lex_new(IMAP_LEX_SERVER, &lim);
	struct gen g = { .hdr = "* SEARCH ", .trl = "\r\n* 1 EXISTS\r\n", .n = 10 * 1024 * 1024 };
	struct out head = { 0 };
	struct imap_tok tok;
	char buf[4096];
	size_t len, off, used, before, peak = 0, now;

	before = heap_in_use();
	while ((len = gen_fill(&g, buf, sizeof(buf))) > 0) {
		for (off = 0;;) {
			if (imap_lex_next(lx, buf + off, len - off, &used, &tok) == IMAP_LEX_MORE)
				break;
			off += used;
			if (tok.type == IMAP_TOK_ERROR)
				out_str(&head, tok.err == IMAP_LEX_ERR_TOO_LONG ? "ERR(toolong) " : "ERR ");
			else if (tok.type == IMAP_TOK_EOL)
				out_str(&head, "EOL ");
			else if (tok.type == IMAP_TOK_ATOM) {
				out_add(&head, tok.str, tok.len);
				out_str(&head, " ");
			} else
				out_str(&head, "? ");
		}
		now = heap_in_use();
		if (now > before && now - before > peak)
			peak = now - before;
	}
	ok(head.s != NULL && strcmp(head.s, "* SEARCH ERR(toolong) EOL * 1 EXISTS EOL ") == 0,
	    "10 MB atom, max_line unlimited: TOO_LONG at max_token, then recovery");
	if (head.s != NULL && strcmp(head.s, "* SEARCH ERR(toolong) EOL * 1 EXISTS EOL ") != 0)
		diag("got: %s", head.s);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 33) && !defined(LEX_ASAN)
	ok(peak < 64 * 1024, "10 MB atom: heap grew by %zu bytes only", peak);
#endif
	free(head.s);
	imap_lex_free(lx);
}

/* Many tokens on one unlimited server line: index keeps counting. */
static void
test_long_server_line(void)
{
	struct imap_lex_limits lim = { .max_line = 0, .max_token = 16, .max_literal = 0 };
	struct imap_lex *lx = imap_lex_new(IMAP_LEX_SERVER, &lim);
	struct imap_tok tok;
	struct out in = { 0 };
	size_t i, off = 0, used, atoms = 0;
	unsigned eol_index = 0;
	int seq = 1;

	out_str(&in, "* SEARCH");
	for (i = 1; i <= 50000; i++) {
		char tmp[16];

		snprintf(tmp, sizeof(tmp), " %zu", i);
		out_str(&in, tmp);
	}
	out_str(&in, "\r\n");
	while (imap_lex_next(lx, in.s + off, in.len - off, &used, &tok) == IMAP_LEX_TOKEN) {
		off += used;
		if (tok.type == IMAP_TOK_ATOM) {
			char num[24];

			snprintf(num, sizeof(num), "%.*s", (int)tok.len, tok.str);
			if (atoms >= 2 && (size_t)strtoul(num, NULL, 10) != atoms - 1)
				seq = 0;
			if (tok.index != atoms)
				seq = 0;
			atoms++;
		} else if (tok.type == IMAP_TOK_EOL) {
			eol_index = tok.index;
		} else {
			seq = 0;
		}
	}
	ok(seq && atoms == 50002 && eol_index == 50002 && off == in.len,
	    "server: 50002-token line with max_line 0 lexes in order");
	free(in.s);
	imap_lex_free(lx);
}

int
main(void)
{
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		run_case(&cases[i]);

	sweep("line sweep, non-sync literal", IMAP_LEX_CLIENT,
	    "g3 APPEND INBOX (\\Seen) \"x y\" ~{21+}\r\na LOGIN x y\r\nb NOOP\r\n\r\nz Y\r\n",
	    "ERR(toolong) EOL A(z) A(Y) EOL", 5, 39, 0);
	sweep("line sweep, sync literal", IMAP_LEX_CLIENT,
	    "g3 APPEND INBOX (\\Seen) \"x y\" {13}\r\na LOGIN x y\r\n",
	    "ERR(toolong) EOL A(a) A(LOGIN) A(x) A(y) EOL", 13, 35, 0);
	sweep("token sweep, non-sync literal", IMAP_LEX_CLIENT,
	    "g3 APPEND INBOX (\\Seen) \"x y\" BODY[1 (2)] {21+}\r\na LOGIN x y\r\nb NOOP\r\n\r\nz Y\r\n",
	    "ERR(toolong) EOL A(z) A(Y) EOL", 1, 10, 1);
	sweep("line sweep, server literal", IMAP_LEX_SERVER,
	    "* 1 FETCH (BODY[] {12}\r\n* 2 EXPUNGE ENVELOPE NIL)\r\n* 3 EXISTS\r\n",
	    "ERR(toolong) EOL A(*) A(3) A(EXISTS) EOL", 12, 38, 0);

	test_api();
	test_shrink();
	test_plain_fast();
	test_plain_line();
	test_big_literal(IMAP_LEX_CLIENT, "a APPEND INBOX (\\Seen) {10485760+}\r\n", "\r\n",
	    "a,APPEND,INBOX,(\\Seen,)LEEOL");
	test_big_literal(IMAP_LEX_SERVER, "* 1 FETCH (BODY[] {10485760}\r\n", ")\r\n",
	    "*,1,FETCH,(BODY[],LE)EOL");
	test_big_line();
	test_long_server_line();
	return tap_done();
}
