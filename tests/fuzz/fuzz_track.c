/* fuzz_track: the session state tracker fed arbitrary upstream response streams, its view checked after each response. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <event2/event.h>

#include "fuzz.h"
#include "config.h"
#include "imap_lex.h"
#include "log.h"
#include "resync.h"
#include "seqmap.h"
#include "server.h"
#include "session.h"
#include "store.h"
#include "track.h"

/*
 * A calloc'ed session (no bufferevents: s->client = s->up = NULL) of a
 * minimal server (config_defaults, state = memory), given a state by the
 * first option bytes, then the rest of the input lexed in server mode with
 * the session's limits and every token fed to track_token(), every untagged
 * response ended with track_response_end() and every tagged completion of a
 * command in flight retired with track_completed(), as session_upstream.c
 * does. Only track_*, seqmap, uidset and the in-flight queue run.
 *
 *   byte 0: bit 0  a mailbox (INBOX) is selected; byte 1 = its message count,
 *                  every position's UID known (2 * seq + 1)
 *           bit 1  a SELECT INBOX is in flight (tag S1), first in the queue
 *           bit 2  a resync escalation's FETCH 1:* (UID) collects into fetch_sink
 *           bit 3  a resync check is under way: UID SEARCH results go to
 *                  search_sink and resync_search_result() compares them
 *           bit 4  the session is logged in (LOGIN completed as "fuzzuser")
 *           bit 5  literal payloads are moved with imap_lex_skip_literal()
 *           bit 6  four more commands in flight, tags A1..A4, kinds from
 *                  the nibbles of bytes 2 and 3
 *           bit 7  every third untagged response is hidden from the client
 *
 * A VANISHED set applied to a view whose every UID is known must lower the
 * count by exactly the known UIDs it holds.
 *
 * After every response: the seqmap invariants (runs sorted, non-overlapping,
 * within the message count, UIDs ascending with room for the unknown
 * positions between runs), and the tracker's own fields in range.
 */

static struct server srv;
static int initialised;

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char err[256];

	if (initialised)
		return 0;
	initialised = 1;
	log_init(1, LOG_LEVEL_ERROR);
	memset(&srv, 0, sizeof(srv));
	config_defaults(&srv.cfg);
	snprintf(srv.cfg.state, sizeof(srv.cfg.state), "memory");
	srv.base = event_base_new();
	TAILQ_INIT(&srv.sessions);
	snprintf(srv.instance, sizeof(srv.instance), "fuzz");
	if (srv.base == NULL ||
	    (srv.store = store_new(srv.base, &srv.cfg, session_store_notify, err, sizeof(err))) == NULL) {
		fprintf(stderr, "fuzz_track: setup failed: %s\n", err);
		abort();
	}
	return 0;
}

static void
check_seqmap(const struct seqmap *m)
{
	uint64_t known = 0;

	FUZZ_CHECK(m->n <= m->cap, "n %zu > cap %zu", m->n, m->cap);
	FUZZ_CHECK(m->n == 0 || m->runs != NULL, "runs NULL");
	for (size_t i = 0; i < m->n; i++) {
		const struct seqmap_run *r = &m->runs[i];
		uint64_t last_seq = (uint64_t)r->seq + r->len - 1, last_uid = (uint64_t)r->uid + r->len - 1;

		FUZZ_CHECK(r->len >= 1, "run %zu empty", i);
		FUZZ_CHECK(r->seq >= 1 && r->uid >= 1, "run %zu starts at seq %u uid %u", i, r->seq,
		    r->uid);
		FUZZ_CHECK(last_seq <= m->count, "run %zu (seq %u len %u) beyond count %u", i, r->seq,
		    r->len, m->count);
		FUZZ_CHECK(last_uid <= UINT32_MAX, "run %zu UIDs overflow (uid %u len %u)", i, r->uid,
		    r->len);
		if (i + 1 < m->n) {
			const struct seqmap_run *b = &m->runs[i + 1];
			FUZZ_CHECK(last_seq < b->seq, "runs %zu and %zu overlap or are unsorted "
			    "(seq %u+%u, next %u)", i, i + 1, r->seq, r->len, b->seq);
			FUZZ_CHECK(last_uid < b->uid, "UIDs not ascending between runs %zu and "
			    "%zu (uid %u+%u, next %u)", i, i + 1, r->uid, r->len, b->uid);
			FUZZ_CHECK(b->uid - last_uid >= b->seq - last_seq, "no room for the UIDs "
			    "of the %llu unknown positions between runs %zu and %zu",
			    (unsigned long long)(b->seq - last_seq - 1), i, i + 1);
		}
		FUZZ_CHECK(seqmap_uid(m, r->seq) == r->uid, "seqmap_uid disagrees with run %zu", i);
		known += r->len;
	}
	FUZZ_CHECK(known == seqmap_known(m), "seqmap_known %u, runs hold %llu", seqmap_known(m),
	    (unsigned long long)known);
	FUZZ_CHECK(known <= m->count, "%llu known positions, count %u", (unsigned long long)known,
	    m->count);
}

static void
check_view(const struct session *s)
{
	check_seqmap(&s->track.view);
	FUZZ_CHECK(s->track.mailbox != NULL && s->track.user != NULL &&
	    s->track.mailbox_wire != NULL, "a name is NULL");
	FUZZ_CHECK(s->track.selected || s->track.mailbox[0] == '\0',
	    "a mailbox name while none is selected");
}

static const enum command_kind kinds[16] = {
	CMD_FETCH, CMD_SELECT, CMD_EXAMINE, CMD_MOVE, CMD_COPY, CMD_APPEND, CMD_EXPUNGE, CMD_CLOSE,
	CMD_UNSELECT, CMD_LOGIN, CMD_AUTHENTICATE, CMD_UNAUTHENTICATE, CMD_STORE, CMD_NOOP, CMD_IDLE,
	CMD_GETQUOTAROOT,
};

static void
set_arg(struct command_arg *a, const char *v)
{
	snprintf(a->val, sizeof(a->val), "%s", v);
	a->len = strlen(v);
	a->present = 1;
}

/* A command as session_client.c leaves it in flight once sent whole. */
static void
push(struct session *s, const char *tag, enum command_kind kind, int uid, const char *mbox)
{
	struct command cmd;
	struct inflight *f;

	memset(&cmd, 0, sizeof(cmd));		/* command.h: starts zeroed */
	snprintf(cmd.tag, sizeof(cmd.tag), "%s", tag);
	cmd.tag_ok = 1;
	cmd.kind = kind;
	cmd.uid = uid;
	if ((cmd.args = calloc(COMMAND_NARGS, sizeof(*cmd.args))) == NULL)
		abort();
	switch (kind) {
	case CMD_COPY:
	case CMD_MOVE:
		set_arg(&cmd.args[0], "1:*");
		set_arg(&cmd.args[1], mbox);
		break;
	case CMD_LOGIN:
		set_arg(&cmd.args[0], "fuzzuser");
		break;
	case CMD_AUTHENTICATE:
		set_arg(&cmd.args[0], "PLAIN");
		cmd.sasl_user = strdup("fuzzuser");	/* command_reset frees it */
		break;
	default:
		set_arg(&cmd.args[0], mbox);
		break;
	}
	if ((f = session_inflight_push(s, &cmd)) == NULL)
		abort();
	f->sent_whole = 1;
	track_command_sent(s, f, &cmd);
	command_reset(&cmd);	/* frees the arguments */
}

/* session_upstream_completed(), without the client side. */
static void
completed(struct session *s)
{
	struct inflight *f = session_inflight_find(s, s->busy->resp_tag);

	if (f == NULL)
		return;
	track_completed(s, f, strcmp(s->busy->resp_word, "OK") == 0, s->busy->resp_status_text);
	session_inflight_remove(s, f);
	track_save(s);
}

/* How many UIDs two sets share. */
static uint64_t
overlap(const struct uidset *a, const struct uidset *b)
{
	uint64_t n = 0;

	for (size_t i = 0, j = 0; i < a->n && j < b->n;) {
		uint32_t lo = a->r[i].lo > b->r[j].lo ? a->r[i].lo : b->r[j].lo;
		uint32_t hi = a->r[i].hi < b->r[j].hi ? a->r[i].hi : b->r[j].hi;

		if (lo <= hi)
			n += (uint64_t)hi - lo + 1;
		if (a->r[i].hi < b->r[j].hi)
			i++;
		else
			j++;
	}
	return n;
}

/* With every position's UID known, a VANISHED (not EARLIER) response removes
 * exactly the known UIDs its sets hold, at its end: the count must drop by
 * that much. The view is noted at its first set (the sets accumulate in
 * track.vanished until the end). */
static int vanished_check;
static uint32_t vanished_count;
static struct uidset vanished_known;

static void
vanished_note(const struct session *s, const struct imap_tok *tok)
{
	const struct seqmap *v = &s->track.view;

	/* tok->index < 2: the tag of the next response (read before track_token()
	 * resets resp) is not a VANISHED set, corpus regress-vanished-check-next-tag. */
	if (vanished_check || s->track.resp != TRACK_RESP_VANISHED || tok->index < 2 ||
	    tok->depth != 0 || tok->type != IMAP_TOK_ATOM || s->track.vanished_earlier ||
	    seqmap_known(v) != v->count)
		return;
	uidset_clear(&vanished_known);
	if (seqmap_known_uids(v, &vanished_known) == 0) {
		vanished_check = 1;
		vanished_count = v->count;
	}
}

/* What session_upstream_observe() does with a response's tokens, minus I/O. */
static void
observe(struct session *s, const struct imap_tok *tok)
{
	vanished_note(s, tok);
	session_upstream_identify(s, tok);
	track_token(s, tok);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct imap_lex_limits ul = { .max_line = 0, .max_token = 1024 * 1024, .max_literal = 0 };
	struct session *s;
	struct imap_lex *lx;
	struct seqmap fetch_sink;
	struct uidset search_sink;
	unsigned flags, count, responses = 0;
	size_t pos;

	if (size < 4)
		return 0;
	LLVMFuzzerInitialize(NULL, NULL);
	vanished_check = 0;
	flags = data[0];
	count = data[1];
	if ((s = calloc(1, sizeof(*s))) == NULL || (s->busy = calloc(1, sizeof(*s->busy))) == NULL ||
	    (lx = imap_lex_new(IMAP_LEX_SERVER, &ul)) == NULL)
		abort();	/* its busy state: the response fields only, no buffers */
	s->srv = &srv;
	s->id = ++srv.next_session_id;
	snprintf(s->sid, sizeof(s->sid), "s%llu", (unsigned long long)s->id);
	snprintf(s->client_addr, sizeof(s->client_addr), "127.0.0.1:1");
	s->state = SESSION_RUNNING;
	s->client = s->up = NULL;
	s->authenticated = 1;
	track_init(&s->track);
	resync_init(&s->resync);
	seqmap_init(&fetch_sink);
	uidset_init(&search_sink);

	if (flags & 0x10) {
		push(s, "L1", CMD_LOGIN, 0, NULL);
		snprintf(s->busy->resp_tag, sizeof(s->busy->resp_tag), "L1");
		snprintf(s->busy->resp_word, sizeof(s->busy->resp_word), "OK");
		completed(s);
	}
	if (flags & 0x01) {
		struct track *t = &s->track;
		t->selected = 1;
		track_set_name(&t->mailbox, "INBOX");
		t->uidvalidity = 1234;
		t->uidnext = 2 * count + 3;
		seqmap_reset(&t->view, count);
		for (unsigned q = 1; q <= count; q++)
			seqmap_learn(&t->view, q, 2 * q + 1);
		check_view(s);
	}
	if (flags & 0x02)
		push(s, "S1", CMD_SELECT, 0, "INBOX");
	if (flags & 0x04)
		s->track.fetch_sink = &fetch_sink;
	if (flags & 0x08) {
		s->track.search_sink = &search_sink;
		s->resync.phase = RESYNC_CHECK;
	}
	if (flags & 0x40) {
		for (int i = 0; i < 4; i++) {
			unsigned k = (data[2 + i / 2] >> (4 * (i % 2))) & 15;
			char tag[8];
			snprintf(tag, sizeof(tag), "A%d", i + 1);
			push(s, tag, kinds[k], i & 1, (k & 1) ? "INBOX" : "Archive");
		}
	}

	pos = 4;
	for (;;) {
		struct imap_tok tok;
		size_t used = 0, avail = size - pos;
		uint64_t rem = imap_lex_literal_remaining(lx);
		enum imap_lex_status st;

		if ((flags & 0x20) && rem > 0 && avail > 0) {
			size_t n = avail < rem ? avail : (size_t)rem;
			imap_lex_skip_literal(lx, n);	/* the bulk path: not shown to track */
			pos += n;
			continue;
		}
		st = imap_lex_next(lx, avail ? (const char *)data + pos : NULL, avail, &used, &tok);
		FUZZ_CHECK(used <= avail, "used %zu of %zu", used, avail);
		pos += used;
		if (st == IMAP_LEX_MORE)
			break;
		if (tok.type == IMAP_TOK_ERROR)
			break;	/* the proxy closes the session on an upstream protocol error */
		observe(s, &tok);
		if (tok.type != IMAP_TOK_EOL)
			continue;
		if (strcmp(s->busy->resp_tag, "*") == 0) {
			int to_client = !((flags & 0x80) && responses % 3 == 2);
			track_response_end(s, to_client);
			if (vanished_check && to_client && s->track.resp == TRACK_RESP_VANISHED) {
				uint32_t want = vanished_count -
				    (uint32_t)overlap(&s->track.vanished, &vanished_known);
				FUZZ_CHECK(s->track.view.count == want, "VANISHED on a fully known "
				    "view: count %u, expected %u", s->track.view.count, want);
			}
		} else if (strcmp(s->busy->resp_tag, "+") != 0)
			completed(s);
		responses++;
		vanished_check = 0;
		check_view(s);
		s->busy->resp_tag[0] = s->busy->resp_word[0] = s->busy->resp_status_text[0] = '\0';
	}
	check_view(s);
	check_seqmap(&fetch_sink);
	track_save(s);

	imap_lex_free(lx);
	s->track.fetch_sink = NULL;
	s->track.search_sink = NULL;
	seqmap_free(&fetch_sink);
	uidset_free(&search_sink);
	while (s->n_inflight > 0)
		session_inflight_remove(s, &s->inflight[s->n_inflight - 1]);
	free(s->inflight);
	track_forget(s);
	track_free(&s->track);
	resync_free(&s->resync);
	free(s->busy);
	free(s);
	return 0;
}
