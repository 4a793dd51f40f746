/* test_trace: protocol traces and the sync event log, driven on fake sessions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <event2/buffer.h>
#include <openssl/evp.h>

#include "command.h"
#include "config.h"
#include "events.h"
#include "imap_lex.h"
#include "log.h"
#include "session.h"
#include "tap.h"
#include "trace.h"
#include "uidset.h"

static struct server srv;
static char dir[64], trace_path[128], event_path[128];

static struct session *
new_session(uint64_t id, const char *addr)
{
	struct session *s = calloc(1, sizeof(*s));

	track_init(&s->track);
	s->id = id;
	snprintf(s->sid, sizeof(s->sid), "s%llu", (unsigned long long)id);
	snprintf(s->client_addr, sizeof(s->client_addr), "%s", addr);
	s->srv = &srv;
	s->state = SESSION_RUNNING;
	TAILQ_INSERT_TAIL(&srv.sessions, s, entry);
	srv.n_sessions++;
	trace_session_update(s);
	return s;
}

static void
end_session(struct session *s)
{
	trace_session_end(s);
	TAILQ_REMOVE(&srv.sessions, s, entry);
	srv.n_sessions--;
	track_free(&s->track);
	free(s);
}

/* The whole file, NUL-terminated (static, overwritten each call). */
static const char *
slurp(const char *path)
{
	static char buf[1 << 20];
	FILE *f = fopen(path, "rb");
	size_t n = 0;

	buf[0] = '\0';
	if (f == NULL)
		return buf;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

static void
reset_file(const char *path)
{
	if (truncate(path, 0) < 0)
		diag("truncate %s failed", path);
}

/* ok(), and on failure the text as # lines (never inside the description). */
static void
ok_text(int cond, const char *what, const char *text)
{
	if (!ok(cond, "%s", what)) {
		char line[8192];
		const char *p = text, *nl;

		while (*p) {
			nl = strchr(p, '\n');
			snprintf(line, sizeof(line), "%.*s",
			    (int)(nl ? nl - p : (long)strlen(p)), p);
			diag("%s", line);
			p = nl ? nl + 1 : p + strlen(p);
		}
	}
}

static int
count_lines(const char *text)
{
	int n = 0;

	for (; *text; text++)
		n += *text == '\n';
	return n;
}

/* The part of line i (from 0) after the direction, without the newline. */
static const char *
line_after(const char *text, int i, const char *dirtag)
{
	static char out[8192];
	const char *p = text, *nl, *d;

	for (; i > 0 && p != NULL; i--)
		if ((p = strchr(p, '\n')) != NULL)
			p++;
	if (p == NULL || (nl = strchr(p, '\n')) == NULL)
		return "";
	snprintf(out, sizeof(out), "%.*s", (int)(nl - p), p);
	if ((d = strstr(out, dirtag)) == NULL)
		return "";
	return d + strlen(dirtag) + 1;
}

/*
 * Feed text as the session code does: tokens from the lexer (client mode
 * for C2P, with command_feed() and the secret flag; server mode for U2P), and
 * a fate at every literal announcement and end of line. sasl: the line is an
 * AUTHENTICATE response (text, secret).
 */
static void
feed(struct session *s, enum trace_dir d, const char *text, enum trace_fate fate, int sasl)
{
	struct imap_lex *lx = imap_lex_new(d == TRACE_C2P ? IMAP_LEX_CLIENT : IMAP_LEX_SERVER,
	    NULL);
	struct command cmd = { .kind = CMD_NONE };	/* starts zeroed (command.h) */
	struct imap_tok tok;
	size_t len = strlen(text), used;

	command_reset(&cmd);
	if (sasl)
		imap_lex_expect_text_line(lx);
	for (;;) {
		enum imap_lex_status st = imap_lex_next(lx, text, len, &used, &tok);
		int secret = 0;

		text += used;
		len -= used;
		if (st != IMAP_LEX_TOKEN)
			break;
		if (d == TRACE_C2P && !sasl) {
			command_feed(&cmd, &tok);
			secret = command_token_is_secret(&cmd, &tok);
		} else if (sasl)
			secret = 1;
		trace_token(s, d, &tok, secret);
		if (tok.type == IMAP_TOK_LITERAL || tok.type == IMAP_TOK_EOL)
			trace_fate(s, d, fate);
		if (tok.type == IMAP_TOK_EOL)
			command_reset(&cmd);
	}
	command_reset(&cmd);
	imap_lex_free(lx);
}

static struct imap_tok
mktok(enum imap_tok_type type, unsigned index, const char *str)
{
	struct imap_tok t;

	memset(&t, 0, sizeof(t));
	t.type = type;
	t.index = index;
	t.str = str;
	t.len = str ? strlen(str) : 0;
	return t;
}

static void
sha256_hex(const void *p, size_t n, char *out)
{
	unsigned char md[32];
	unsigned int len = 0;

	EVP_Digest(p, n, md, &len, EVP_sha256(), NULL);
	for (unsigned i = 0; i < len; i++)
		sprintf(out + 2 * i, "%02x", md[i]);
}

static void
test_rendering(struct session *s)
{
	const char *t;

	reset_file(trace_path);
	feed(s, TRACE_C2P, "a1 SELECT \"Sent Items\"\r\n", TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok(count_lines(t) == 1, "one line per command");
	ok(strlen(t) > 25 && t[4] == '-' && t[10] == 'T' && t[19] == '.' && t[23] == 'Z' &&
	    t[24] == ' ', "ISO timestamp with milliseconds: %.25s", t);
	ok_text(strstr(t, " unit:s1 127.0.0.1:5555 - C>P a1 SELECT \"Sent Items\" => forwarded\n")
	    != NULL, "session id, client, no user yet, direction, line, fate", t);

	reset_file(trace_path);
	feed(s, TRACE_C2P, "a2 SELECT \"a\\\"b\\\\c\"\r\n", TRACE_FORWARDED, 0);
	feed(s, TRACE_C2P, "a3 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)])\r\n",
	    TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok(strcmp(line_after(t, 0, "C>P"), "a2 SELECT \"a\\\"b\\\\c\" => forwarded") == 0,
	    "quoted strings are re-quoted: %s", line_after(t, 0, "C>P"));
	ok(strcmp(line_after(t, 1, "C>P"),
	    "a3 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]) => forwarded") == 0,
	    "lists and bracketed atoms: %s", line_after(t, 1, "C>P"));

	reset_file(trace_path);
	feed(s, TRACE_U2P, "* OK [CAPABILITY IMAP4rev1 IDLE] Ready.\r\n", TRACE_REWRITTEN, 0);
	feed(s, TRACE_U2P, "+ \r\n", TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok(strcmp(line_after(t, 0, "U>P"),
	    "* OK [CAPABILITY IMAP4rev1 IDLE] Ready. => rewritten") == 0,
	    "server line with resp-text: %s", line_after(t, 0, "U>P"));
	ok(strcmp(line_after(t, 1, "U>P"), "+ => forwarded") == 0, "bare continuation: %s",
	    line_after(t, 1, "U>P"));
}

static void
test_redaction(struct session *s)
{
	const char *t;
	struct imap_tok tk;
	struct evbuffer *b;
	char big[3000];

	reset_file(trace_path);
	feed(s, TRACE_C2P, "b1 LOGIN alice Atom-Secret-1\r\n", TRACE_FORWARDED, 0);
	feed(s, TRACE_C2P, "b2 LOGIN \"alice\" \"Quoted Secret 2\"\r\n", TRACE_FORWARDED, 0);
	feed(s, TRACE_C2P, "b3 LOGIN {5}\r\nalice {14}\r\nLiteralSecret3\r\n", TRACE_FORWARDED, 0);
	feed(s, TRACE_C2P, "b4 AUTHENTICATE PLAIN AGFsaWNlAElSU2VjcmV0NA==\r\n", TRACE_FORWARDED,
	    0);
	feed(s, TRACE_C2P, "b5 AUTHENTICATE PLAIN\r\n", TRACE_FORWARDED, 0);
	feed(s, TRACE_C2P, "AGFsaWNlAFNBU0xTZWNyZXQ1\r\n", TRACE_FORWARDED, 1);
	t = slurp(trace_path);
	ok_text(strstr(t, "Atom-Secret-1") == NULL && strstr(t, "Quoted Secret 2") == NULL &&
	    strstr(t, "LiteralSecret3") == NULL && strstr(t, "AGFsaWNlAElSU2VjcmV0NA") == NULL &&
	    strstr(t, "AGFsaWNlAFNBU0xTZWNyZXQ1") == NULL, "no password in the trace", t);
	ok(strcmp(line_after(t, 0, "C>P"), "b1 LOGIN alice <redacted> => forwarded") == 0,
	    "LOGIN atom password: %s", line_after(t, 0, "C>P"));
	ok(strcmp(line_after(t, 1, "C>P"), "b2 LOGIN \"alice\" <redacted> => forwarded") == 0,
	    "LOGIN quoted password: %s", line_after(t, 1, "C>P"));
	ok(strcmp(line_after(t, 2, "C>P"), "b3 LOGIN {5} => forwarded") == 0 &&
	    strcmp(line_after(t, 3, "C>P"), "<literal 5 bytes sha256:"
	    "2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90> <redacted> "
	    "=> forwarded") == 0 && strcmp(line_after(t, 4, "C>P"), "<redacted> => forwarded") == 0,
	    "LOGIN literal password: announcement and payload redacted: %s | %s | %s",
	    line_after(t, 2, "C>P"), line_after(t, 3, "C>P"), line_after(t, 4, "C>P"));
	ok(strcmp(line_after(t, 5, "C>P"), "b4 AUTHENTICATE PLAIN <redacted> => forwarded") == 0,
	    "SASL-IR: %s", line_after(t, 5, "C>P"));
	ok(strcmp(line_after(t, 7, "C>P"), "<redacted> => forwarded") == 0, "SASL line: %s",
	    line_after(t, 7, "C>P"));

	/* A long secret literal moved in bulk, with bodies on: still redacted. */
	trace_set(&srv, "all bodies", big, sizeof(big));
	reset_file(trace_path);
	feed(s, TRACE_C2P, "b6 LOGIN alice {2000}\r\n", TRACE_FORWARDED, 0);
	memset(big, 'Q', 2000);
	memcpy(big + 1000, "BulkSecret6", 11);
	b = evbuffer_new();
	evbuffer_add(b, big, 2000);
	trace_literal_bytes(s, TRACE_C2P, b, 2000);
	evbuffer_free(b);
	tk = mktok(IMAP_TOK_LITERAL_END, 3, NULL);
	trace_token(s, TRACE_C2P, &tk, 1);
	tk = mktok(IMAP_TOK_EOL, 4, NULL);
	trace_token(s, TRACE_C2P, &tk, 0);
	trace_fate(s, TRACE_C2P, TRACE_FORWARDED);
	feed(s, TRACE_C2P, "b7 LOGIN alice {12}\r\nLitSecret7xx\r\n", TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok_text(strstr(t, "BulkSecret6") == NULL && strstr(t, "QQQQ") == NULL &&
	    strstr(t, "LitSecret7") == NULL, "bodies never show a secret literal", t);
	ok(strcmp(line_after(t, 1, "C>P"), "<redacted> => forwarded") == 0, "bulk secret: %s",
	    line_after(t, 1, "C>P"));
	trace_set(&srv, "all", big, sizeof(big));
}

static void
test_literals(struct session *s)
{
	const char *t;
	struct imap_tok tk;
	struct evbuffer *b;
	char want[200], hex[65], payload[5000];
	static const char *const parts[] = { "first chunk, ", "second chunk, ", "third." };

	reset_file(trace_path);
	feed(s, TRACE_C2P, "c1 APPEND INBOX (\\Seen) {11+}\r\nhello world\r\n", TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok(strcmp(line_after(t, 0, "C>P"), "c1 APPEND INBOX (\\Seen) {11+} => forwarded") == 0,
	    "a segment ends at the literal: %s", line_after(t, 0, "C>P"));
	ok(strcmp(line_after(t, 1, "C>P"), "<literal 11 bytes sha256:"
	    "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9> => forwarded") == 0,
	    "payload as size and sha256: %s", line_after(t, 1, "C>P"));

	/* Upstream: a FETCH body moved in bulk, from a buffer of several chains. */
	reset_file(trace_path);
	feed(s, TRACE_U2P, "* 1 FETCH (UID 7 BODY[] {40}\r\n", TRACE_FORWARDED, 0);
	b = evbuffer_new();
	payload[0] = '\0';
	for (int i = 0; i < 3; i++) {
		evbuffer_add_reference(b, parts[i], strlen(parts[i]), NULL, NULL);
		strcat(payload, parts[i]);
	}
	evbuffer_add(b, "TAIL-NOT-PAYLOAD", 16);
	trace_literal_bytes(s, TRACE_U2P, b, strlen(payload));
	evbuffer_free(b);
	tk = mktok(IMAP_TOK_LITERAL_END, 2, NULL);
	trace_token(s, TRACE_U2P, &tk, 0);
	tk = mktok(IMAP_TOK_LIST_END, 2, NULL);
	trace_token(s, TRACE_U2P, &tk, 0);
	tk = mktok(IMAP_TOK_EOL, 3, NULL);
	trace_token(s, TRACE_U2P, &tk, 0);
	trace_fate(s, TRACE_U2P, TRACE_FORWARDED);
	t = slurp(trace_path);
	sha256_hex(payload, strlen(payload), hex);
	snprintf(want, sizeof(want), "<literal %zu bytes sha256:%s>) => forwarded", strlen(payload),
	    hex);
	ok(strcmp(line_after(t, 0, "U>P"), "* 1 FETCH (UID 7 BODY[] {40} => forwarded") == 0 &&
	    strcmp(line_after(t, 1, "U>P"), want) == 0,
	    "bulk payload hashed across chains, only n bytes: %s", line_after(t, 1, "U>P"));

	/* bodies: the bytes themselves, escaped. */
	trace_set(&srv, "all bodies", want, sizeof(want));
	reset_file(trace_path);
	feed(s, TRACE_U2P, "* 2 FETCH (BODY[TEXT] {11}\r\nhi\r\n\"x\"\\\x01\xc3\xa9 FLAGS ())\r\n",
	    TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok(strcmp(line_after(t, 1, "U>P"),
	    "<literal 11 bytes \"hi\\r\\n\\\"x\\\"\\\\\\x01\\xc3\\xa9\"> FLAGS ()) "
	    "=> forwarded") == 0,
	    "bodies mode shows the escaped payload: %s", line_after(t, 1, "U>P"));
	reset_file(trace_path);
	feed(s, TRACE_U2P, "* 3 FETCH (BODY[] {0}\r\n)\r\n", TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok(strcmp(line_after(t, 1, "U>P"), "<literal 0 bytes \"\">) => forwarded") == 0,
	    "empty literal in bodies mode: %s", line_after(t, 1, "U>P"));
	trace_set(&srv, "all", want, sizeof(want));
}

static void
test_fates(struct session *s)
{
	const char *t;
	struct imap_tok tk;

	reset_file(trace_path);
	feed(s, TRACE_C2P, "d1 UID FETCH 1:* (FLAGS)\r\n", TRACE_HELD, 0);
	trace_line(s, TRACE_P2U, "imapfresh.3 NOOP", 16, 1);
	trace_line(s, TRACE_P2U, "imapfresh.4 UID SEARCH ALL", 26, 1);
	feed(s, TRACE_U2P, "* 4 EXISTS\r\n", TRACE_FORWARDED, 0);
	feed(s, TRACE_U2P, "imapfresh.3 OK NOOP completed\r\n", TRACE_HIDDEN, 0);
	trace_line(s, TRACE_P2C, "* 3 EXPUNGE", 11, 0);
	trace_fate(s, TRACE_C2P, TRACE_FORWARDED);	/* the held command goes on */
	t = slurp(trace_path);
	ok_text(count_lines(t) == 7, "seven records", t);
	ok(strcmp(line_after(t, 0, "C>P"), "d1 UID FETCH 1:* (FLAGS) => held") == 0, "held: %s",
	    line_after(t, 0, "C>P"));
	ok(strcmp(line_after(t, 1, "P>U*"), "imapfresh.3 NOOP") == 0 &&
	    strcmp(line_after(t, 2, "P>U*"), "imapfresh.4 UID SEARCH ALL") == 0,
	    "injected lines marked P>U*: %s", line_after(t, 1, "P>U*"));
	ok(strcmp(line_after(t, 4, "U>P"), "imapfresh.3 OK NOOP completed => hidden") == 0,
	    "hidden: %s", line_after(t, 4, "U>P"));
	ok(strcmp(line_after(t, 5, "P>C"), "* 3 EXPUNGE") == 0, "proxy to client: %s",
	    line_after(t, 5, "P>C"));
	ok(strcmp(line_after(t, 6, "C>P"), "d1 UID FETCH 1:* (FLAGS) => forwarded (was held)") == 0,
	    "a fate with no new token applies to the previous line: %s", line_after(t, 6, "C>P"));

	/* A refused non-synchronizing literal: refused at the announcement, and
	 * again at the EOL after its skipped payload: recorded once. */
	reset_file(trace_path);
	feed(s, TRACE_C2P, "d2 COMPRESS {3+}\r\n", TRACE_REFUSED, 0);
	tk = mktok(IMAP_TOK_EOL, 3, NULL);
	trace_token(s, TRACE_C2P, &tk, 0);
	trace_fate(s, TRACE_C2P, TRACE_REFUSED);
	feed(s, TRACE_C2P, "d3 STARTTLS\r\n", TRACE_LOCAL, 0);
	feed(s, TRACE_C2P, "\r\n", TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	ok_text(count_lines(t) == 3 &&
	    strcmp(line_after(t, 0, "C>P"), "d2 COMPRESS {3+} => refused") == 0,
	    "refused once", t);
	ok(strcmp(line_after(t, 1, "C>P"), "d3 STARTTLS => local") == 0, "local: %s",
	    line_after(t, 1, "C>P"));
	ok(strcmp(line_after(t, 2, "C>P"), "=> forwarded") == 0, "an empty line: '%s'",
	    line_after(t, 2, "C>P"));

	/* The session ends in the middle of a line. */
	reset_file(trace_path);
	feed(s, TRACE_C2P, "d4 NOOP x", TRACE_FORWARDED, 0);
}

static void
test_cap(struct session *s)
{
	static char cmd[12000];
	const char *t, *l;

	reset_file(trace_path);
	memcpy(cmd, "e1 NOOP ", 8);
	memset(cmd + 8, 'x', 10000);
	memcpy(cmd + 10008, "\r\n", 3);
	feed(s, TRACE_C2P, cmd, TRACE_FORWARDED, 0);
	t = slurp(trace_path);
	l = line_after(t, 0, "C>P");
	ok(strlen(l) < 4096 + 64 && strstr(l, "x\xe2\x80\xa6(+5912 bytes) => forwarded") != NULL,
	    "a line is capped at 4 KiB, the rest counted: %zu bytes, ends %s", strlen(l),
	    strlen(l) > 40 ? l + strlen(l) - 40 : l);
	memset(cmd, 'y', 9000);
	reset_file(trace_path);
	trace_line(s, TRACE_P2C, cmd, 9000, 0);
	t = slurp(trace_path);
	l = line_after(t, 0, "P>C");
	ok(strlen(l) < 4096 + 64 && strstr(l, "y\xe2\x80\xa6(+4904 bytes)") != NULL,
	    "own lines are capped too: %zu", strlen(l));
}

static void
test_rules(void)
{
	char err[300];
	struct session *a, *b, *c, *v6;
	const char *t;

	ok(trace_set(&srv, "sometimes", err, sizeof(err)) < 0 && strstr(err, "trace") != NULL,
	    "a bad spec is refused: %s", err);
	ok(strcmp(trace_get(&srv), "all") == 0, "and the rules in force stay");

	ok(trace_set(&srv, "user alice", err, sizeof(err)) == 0, "user rule");
	reset_file(trace_path);
	a = new_session(2, "127.0.0.1:6000");
	b = new_session(3, "127.0.0.1:6001");
	ok(a->trace != NULL && b->trace != NULL, "before login every session is a candidate");
	feed(a, TRACE_C2P, "f1 LOGIN alice pw\r\n", TRACE_FORWARDED, 0);
	feed(b, TRACE_C2P, "f1 LOGIN bob pw\r\n", TRACE_FORWARDED, 0);
	ok(slurp(trace_path)[0] == '\0', "nothing written while the user is unknown");
	track_set_name(&a->track.user, "alice");
	a->authenticated = 1;
	trace_session_update(a);
	track_set_name(&b->track.user, "bob");
	b->authenticated = 1;
	trace_session_update(b);
	t = slurp(trace_path);
	ok(a->trace != NULL && b->trace == NULL, "alice traced, bob not");
	ok_text(strstr(t, "unit:s2 127.0.0.1:6000 alice C>P f1 LOGIN alice <redacted> => forwarded")
	    != NULL && strstr(t, "unit:s3") == NULL,
	    "alice's earlier lines written once she is known", t);
	feed(b, TRACE_C2P, "f2 NOOP\r\n", TRACE_FORWARDED, 0);
	ok(strstr(slurp(trace_path), "unit:s3") == NULL, "bob stays out");

	ok(trace_set(&srv, "client 10.1.", err, sizeof(err)) == 0, "client prefix rule");
	c = new_session(4, "10.1.2.3:999");
	v6 = new_session(5, "[::1]:999");
	ok(a->trace == NULL && c->trace != NULL && v6->trace == NULL,
	    "live sessions re-evaluated at once; the prefix matches 10.1.2.3 only");
	ok(trace_set(&srv, "client ::1", err, sizeof(err)) == 0 && v6->trace != NULL &&
	    c->trace == NULL, "an IPv6 address matches [::1]:port");
	ok(trace_set(&srv, "client [::1] bodies", err, sizeof(err)) == 0 && v6->trace != NULL &&
	    strcmp(trace_get(&srv), "client [::1] bodies") == 0, "bracketed, with bodies");
	ok(trace_set(&srv, "off", err, sizeof(err)) == 0 && v6->trace == NULL && c->trace == NULL &&
	    strcmp(trace_get(&srv), "off") == 0, "off: nothing traced");
	trace_session_update(a);
	ok(a->trace == NULL, "and new decisions say no");
	end_session(a);
	end_session(b);
	end_session(c);
	end_session(v6);
}

static void
test_events(struct session *s)
{
	char err[300];
	struct uidset set;
	struct events_resync ev = { 0 };
	const char *t;

	snprintf(srv.cfg.event_log, sizeof(srv.cfg.event_log), "%s", event_path);
	ok(events_open(&srv, err, sizeof(err)) == 0, "event_log opened");
	uidset_init(&set);
	uidset_add_range(&set, 1, 5);
	uidset_add(&set, 7);
	track_set_name(&s->track.user, "al\"ice\n\xff");
	s->track.selected = 1;
	track_set_name(&s->track.mailbox, "Caf\xc3\xa9");
	ev.step = "stale";
	ev.trigger = "UID FETCH";
	ev.reason = "generation changed";
	ev.gen_synced = 3;
	ev.gen_now = 4;
	ev.client_count = 5;
	ev.server_uids = &set;
	events_resync(s, &ev);
	ev.step = "repaired";
	ev.server_uids = NULL;
	ev.trigger = "";
	ev.sent_to_client = "* 6 EXISTS";
	events_resync(s, &ev);
	t = slurp(event_path);
	ok(count_lines(t) == 2, "one JSON line per event");
	ok_text(strstr(t, "\"instance\":\"unit\",\"session\":\"unit:s1\","
	    "\"user\":\"al\\\"ice\\n\\ufffd\","
	    "\"client\":\"127.0.0.1:5555\",\"mailbox\":\"Caf\xc3\xa9\",\"step\":\"stale\","
	    "\"trigger\":\"UID FETCH\",\"reason\":\"generation changed\",\"gen_synced\":3,"
	    "\"gen_now\":4,\"client_count\":5,\"server_uids\":\"1:5,7\",\"server_uid_count\":6,"
	    "\"server_uids_truncated\":false,\"sent_to_client\":null}\n") != NULL,
	    "fields, escaping, sequence set", t);
	ok(strncmp(t, "{\"time\":\"", 9) == 0 && t[9 + 23] == 'Z', "time first, ISO with ms");
	ok(strstr(t, "\"step\":\"repaired\",\"trigger\":null") != NULL &&
	    strstr(t, "\"server_uids\":null,\"server_uid_count\":null") != NULL &&
	    strstr(t, "\"sent_to_client\":\"* 6 EXISTS\"}") != NULL, "nulls and sent_to_client");

	reset_file(event_path);
	uidset_clear(&set);
	for (uint32_t u = 1; u < 20000; u += 2)
		uidset_add(&set, u);
	ev.server_uids = &set;
	events_resync(s, &ev);
	t = slurp(event_path);
	ok(strlen(t) < 4096 &&
	    strstr(t, "\"server_uid_count\":10000,\"server_uids_truncated\":true") != NULL,
	    "a huge set is cut (%zu bytes)", strlen(t));
	ok(strstr(t, ",\",") == NULL && strstr(t, "\"server_uids\":\"1,3,5,") != NULL,
	    "at a comma");
	uidset_free(&set);
	s->track.user[0] = '\0';
	s->track.selected = 0;
	srv.cfg.event_log[0] = '\0';
	ok(events_open(&srv, err, sizeof(err)) == 0, "event_log closed");
	snprintf(srv.cfg.event_log, sizeof(srv.cfg.event_log), "%s/no/such/dir/x", dir);
	ok(events_open(&srv, err, sizeof(err)) < 0 && strstr(err, "event_log") != NULL,
	    "an unwritable event_log is an error: %s", err);
	srv.cfg.event_log[0] = '\0';
	events_close(&srv);
}

int
main(void)
{
	char err[300], *d;
	struct session *s;
	const char *t;

	log_init(1, LOG_LEVEL_WARNING);
	snprintf(dir, sizeof(dir), "/tmp/test_trace.XXXXXX");
	if ((d = mkdtemp(dir)) == NULL) {
		printf("Bail out! mkdtemp\n");
		return 1;
	}
	snprintf(trace_path, sizeof(trace_path), "%s/trace.log", dir);
	snprintf(event_path, sizeof(event_path), "%s/events.log", dir);
	config_defaults(&srv.cfg);
	snprintf(srv.cfg.trace_file, sizeof(srv.cfg.trace_file), "%s", trace_path);
	snprintf(srv.instance, sizeof(srv.instance), "unit");
	TAILQ_INIT(&srv.sessions);

	s = new_session(1, "127.0.0.1:5555");
	ok(s->trace == NULL, "trace off: sessions carry nothing");
	ok(trace_set(&srv, "all", err, sizeof(err)) == 0 && s->trace != NULL &&
	    strcmp(trace_get(&srv), "all") == 0, "trace all: the live session is traced at once");

	test_rendering(s);
	test_redaction(s);
	test_literals(s);
	test_fates(s);
	end_session(s);
	t = slurp(trace_path);
	ok_text(strstr(t, "C>P d4 NOOP => unfinished") != NULL, "a line cut short by the end", t);

	s = new_session(1, "127.0.0.1:5555");
	test_cap(s);
	test_events(s);
	test_rules();
	end_session(s);
	trace_free_rules(&srv);

	unlink(trace_path);
	unlink(event_path);
	rmdir(dir);
	return tap_done();
}
