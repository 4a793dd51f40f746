/* track: what a session's client knows of its mailbox, read from the commands and responses that pass. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "feed.h"
#include "log.h"
#include "mutf7.h"
#include "resync.h"
#include "sasl.h"
#include "session.h"
#include "store.h"
#include "trace.h"
#include "track.h"

static char track_no_name[1];

void
track_set_name(char **name, const char *value)
{
	if (*name != NULL && *name != track_no_name)
		free(*name);
	*name = value != NULL && value[0] != '\0' ? strdup(value) : NULL;
	if (*name == NULL)
		*name = track_no_name;
}

void
track_init(struct track *t)
{
	memset(t, 0, sizeof(*t));
	t->user = t->mailbox = t->mailbox_wire = track_no_name;
	seqmap_init(&t->view);
	pending_init(&t->pending);
	uidset_init(&t->vanished);
}

void
track_free(struct track *t)
{
	seqmap_free(&t->view);
	pending_free(&t->pending);
	uidset_free(&t->vanished);
	track_set_name(&t->user, NULL);
	track_set_name(&t->mailbox, NULL);
	track_set_name(&t->mailbox_wire, NULL);
}

void
track_canonical_mailbox(const char *in, int utf8, char *out, size_t outlen)
{
	if (strcasecmp(in, "INBOX") == 0)
		in = "INBOX";
	/* RFC 6855 3: after ENABLE UTF8=ACCEPT names are UTF-8 ('&' is '&');
	 * before, modified UTF-7 (RFC 3501 5.1.3). One mailbox, one key. */
	if (!utf8 && strchr(in, '&') != NULL && mutf7_to_utf8(in, out, outlen) == 0)
		return;
	snprintf(out, outlen, "%s", in);
}

static char *
track_strdup_mailbox(const struct session *s, const struct command_arg *a)
{
	char name[COMMAND_ARG_MAX * 2 + 1];

	if (!a->present || a->truncated)
		return NULL;	/* a name we could not read whole is not tracked */
	track_canonical_mailbox(a->val, s->track.utf8, name, sizeof(name));
	return strdup(name);
}

static void
track_deselect(struct session *s, const char *why)
{
	struct track *t = &s->track;

	if (t->selected)
		log_msg(LOG_LEVEL_DEBUG, s->sid, "mailbox \"%s\" deselected (%s)", t->mailbox, why);
	t->selected = 0;
	track_set_name(&t->mailbox, NULL);
	t->uidvalidity = t->uidnext = 0;
	t->highestmodseq = 0;
	t->readonly = 0;	/* the next SELECT's [READ-ONLY] (or EXAMINE) says it again */
	t->unheard = 0;
	seqmap_reset(&t->view, 0);
	pending_clear(&t->pending);	/* a new view: nothing of the old one is owed */
	t->dirty = 1;
}

void
track_command_sent(struct session *s, struct inflight *f, const struct command *cmd)
{
	f->condstore = cmd->condstore;
	switch (cmd->kind) {
	case CMD_SELECT:
	case CMD_EXAMINE:
	case CMD_APPEND:
		f->mailbox = track_strdup_mailbox(s, command_arg(cmd, 0));
		f->readonly = cmd->kind == CMD_EXAMINE;
		if (cmd->kind != CMD_APPEND && f->mailbox != NULL)
			f->mailbox_wire = strdup(command_arg(cmd, 0)->val);
		if (cmd->kind != CMD_APPEND)
			f->unheard = !store_user_listening(s->srv->store, s->track.suser);
		break;
	case CMD_COPY:
	case CMD_MOVE:
		f->mailbox = track_strdup_mailbox(s, command_arg(cmd, 1));
		break;
	case CMD_LOGIN:
		if (command_arg(cmd, 0)->present && !command_arg(cmd, 0)->truncated)
			f->user = strdup(command_arg(cmd, 0)->val);
		break;
	case CMD_AUTHENTICATE:
		f->sasl_plain = command_arg(cmd, 0)->present &&
		    strcasecmp(command_arg(cmd, 0)->val, "PLAIN") == 0;
		if (f->sasl_plain && cmd->sasl_user != NULL)
			f->user = strdup(cmd->sasl_user);
		break;
	default:
		break;
	}
}

void
track_sasl_line(struct session *s, const char *line, size_t len)
{
	char user[256];

	for (unsigned i = 0; i < s->n_inflight; i++) {
		struct inflight *f = &s->inflight[i];
		if (f->kind != CMD_AUTHENTICATE || !f->sasl_plain || f->user != NULL)
			continue;
		if (sasl_plain_user(line, len, user, sizeof(user)) == 0)
			f->user = strdup(user);
		return;
	}
}

/* The oldest command in flight owns the untagged responses now arriving:
 * once a SELECT's responses begin, they describe the new mailbox. */
static void
track_select_begins(struct session *s)
{
	struct track *t = &s->track;
	struct inflight *f = s->n_inflight ? &s->inflight[0] : NULL;

	if (f == NULL || f->started || (f->kind != CMD_SELECT && f->kind != CMD_EXAMINE))
		return;
	f->started = 1;
	track_deselect(s, "SELECT begins");
	t->select_exists = 0;
}

/* s[0..len) as a number: 1 with *v when it is 1+ digits that fit 64 bits. */
static int
track_decimal(const char *s, size_t len, uint64_t *v)
{
	uint64_t x = 0;

	if (len == 0)
		return 0;
	for (size_t i = 0; i < len; i++) {
		unsigned d = (unsigned)(s[i] - '0');

		/* Below 20 digits nothing can overflow: no test on the hot path. */
		if (s[i] < '0' || s[i] > '9' || (i >= 19 && x > (UINT64_MAX - d) / 10))
			return 0;
		x = x * 10 + d;
	}
	*v = x;
	return 1;
}

/* s[0..len) as a 32-bit number, 0 when it is not one. */
static uint32_t
track_number(const char *s, size_t len)
{
	uint64_t v;

	if (len > 10 || !track_decimal(s, len, &v) || v > UINT32_MAX)
		return 0;
	return (uint32_t)v;
}

static int
track_atom_is(const struct imap_tok *tok, const char *word)
{
	return tok->type == IMAP_TOK_ATOM && tok->len == strlen(word) &&
	    strncasecmp(tok->str, word, tok->len) == 0;
}

/* The digits at p[*at..len) as a number, and *at past them; 0 when none or too big. */
static uint32_t
track_digits(const char *p, size_t len, size_t *at)
{
	size_t i = *at;
	uint64_t v = 0;

	/* One pass: this reads two numbers of every line of a FLAGS sweep. */
	while (i < len && p[i] >= '0' && p[i] <= '9') {
		if (i - *at == 10)
			return 0;	/* 11 digits: more than 32 bits */
		v = v * 10 + (unsigned)(p[i] - '0');
		i++;
	}
	*at = i;
	return v <= UINT32_MAX ? (uint32_t)v : 0;
}

int
track_fetch_line(const char *p, size_t len, uint32_t *num, uint32_t *uid)
{
	size_t at = 2;

	if (len < 2 || p[0] != '*' || p[1] != ' ' || (*num = track_digits(p, len, &at)) == 0)
		return 0;
	if (len - at < 12 || (memcmp(p + at, " FETCH (UID ", 12) != 0 &&
	    strncasecmp(p + at, " FETCH (UID ", 12) != 0))
		return 0;
	at += 12;
	if ((*uid = track_digits(p, len, &at)) == 0 || at >= len)
		return 0;
	return p[at] == ' ' || p[at] == ')';
}

/* A response starts: nothing known of it yet. */
static void
track_response_begin(struct track *t)
{
	t->resp = TRACK_RESP_OTHER;
	t->resp_num = 0;
	t->fetch_uid_next = 0;
	t->fetch_uid = 0;
	t->vanished_earlier = 0;
	if (t->vanished.count > 0)
		uidset_clear(&t->vanished);
	t->esearch_all_next = 0;
}

void
track_fetch_seen(struct session *s, uint32_t num, uint32_t uid)
{
	struct track *t = &s->track;

	track_response_begin(t);
	t->resp = TRACK_RESP_FETCH;
	t->resp_num = num;
	t->fetch_uid = uid;
}

void
track_fetch_next(struct session *s, uint32_t num, uint32_t uid)
{
	if (seqmap_learn(&s->track.view, num, uid))
		s->track.dirty = 1;
}

int
track_code_value(const char *text, size_t len, const char *name, uint64_t *v)
{
	size_t n = strlen(name), i;

	if (len < n + 4 || text[0] != '[' || strncasecmp(text + 1, name, n) != 0 ||
	    text[n + 1] != ' ')
		return 0;
	for (i = n + 2; i < len && text[i] >= '0' && text[i] <= '9'; i++)
		;
	return i < len && text[i] == ']' && track_decimal(text + n + 2, i - (n + 2), v);
}

/* [UIDVALIDITY n], [UIDNEXT n], [HIGHESTMODSEQ n], [READ-ONLY] in resp-text. */
static void
track_resp_code(struct session *s, const char *text, size_t len)
{
	struct track *t = &s->track;
	uint64_t v;

	if (len < 3 || text[0] != '[')
		return;
	if (track_code_value(text, len, "UIDVALIDITY", &v) && v <= UINT32_MAX)
		t->uidvalidity = (uint32_t)v;
	else if (track_code_value(text, len, "UIDNEXT", &v) && v <= UINT32_MAX)
		t->uidnext = (uint32_t)v;
	else if (track_code_value(text, len, "HIGHESTMODSEQ", &v))
		t->highestmodseq = v;
	else if (len >= 11 && strncasecmp(text, "[READ-ONLY]", 11) == 0)
		t->readonly = 1;
	else
		return;
	t->dirty = 1;
}

/* VANISHED: each UID range leaves the view, range by range. */
static void
track_vanished(struct track *t, const struct uidset *gone)
{
	for (size_t i = gone->n; i > 0; i--)
		seqmap_vanished_range(&t->view, gone->r[i - 1].lo, gone->r[i - 1].hi);
}

void
track_token(struct session *s, const struct imap_tok *tok)
{
	struct track *t = &s->track;

	if (tok->index == 0) {
		track_response_begin(t);
		return;
	}
	if (s->busy->resp_tag[0] != '*' || s->busy->resp_tag[1] != '\0')
		return;
	if (tok->index == 1 && tok->depth == 0) {
		if ((t->resp_num = track_number(tok->str, tok->len)) == 0) {
			if (track_atom_is(tok, "SEARCH"))
				t->resp = TRACK_RESP_SEARCH;
			else if (track_atom_is(tok, "ESEARCH"))
				t->resp = TRACK_RESP_ESEARCH;
			else if (track_atom_is(tok, "VANISHED"))
				t->resp = TRACK_RESP_VANISHED;
			else if (track_atom_is(tok, "ENABLED"))
				t->resp = TRACK_RESP_ENABLED;
			else if (track_atom_is(tok, "OK") || track_atom_is(tok, "NO") ||
			    track_atom_is(tok, "BAD"))
				t->resp = TRACK_RESP_STATUS;
		}
		return;
	}
	switch (t->resp) {
	case TRACK_RESP_OTHER:
		if (tok->index == 2 && t->resp_num > 0) {
			if (track_atom_is(tok, "EXISTS"))
				t->resp = TRACK_RESP_EXISTS;
			else if (track_atom_is(tok, "EXPUNGE"))
				t->resp = TRACK_RESP_EXPUNGE;
			else if (track_atom_is(tok, "FETCH"))
				t->resp = TRACK_RESP_FETCH;
		}
		break;
	case TRACK_RESP_FETCH:
		/* Only the top level of the FETCH list: UID inside a BODYSTRUCTURE is not ours. */
		if (tok->depth != 1 || tok->type == IMAP_TOK_LIST_BEGIN)
			break;
		if (t->fetch_uid_next && tok->type == IMAP_TOK_ATOM)
			t->fetch_uid = track_number(tok->str, tok->len);
		t->fetch_uid_next = track_atom_is(tok, "UID");
		break;
	case TRACK_RESP_SEARCH:
		if (tok->type == IMAP_TOK_ATOM && t->search_sink != NULL) {
			uint32_t uid = track_number(tok->str, tok->len);
			if (uid > 0)
				uidset_add(t->search_sink, uid);
		}
		break;
	case TRACK_RESP_ESEARCH:
		if (tok->depth > 0 || tok->type != IMAP_TOK_ATOM)
			break;
		if (t->esearch_all_next && t->search_sink != NULL)
			uidset_parse(t->search_sink, tok->str, tok->len);
		t->esearch_all_next = track_atom_is(tok, "ALL");
		break;
	case TRACK_RESP_VANISHED:
		if (tok->depth == 1 && track_atom_is(tok, "EARLIER"))
			t->vanished_earlier = 1;
		else if (tok->depth == 0 && tok->type == IMAP_TOK_ATOM && !t->vanished_earlier &&
		    uidset_parse(&t->vanished, tok->str, tok->len) < 0)
			uidset_clear(&t->vanished);	/* not a set: nothing is taken from the view */
		break;
	case TRACK_RESP_ENABLED:
		if (tok->depth != 0 || tok->type != IMAP_TOK_ATOM)
			break;
		/* RFC 7162 3.2.3: enabling QRESYNC enables CONDSTORE as well. */
		if (track_atom_is(tok, "QRESYNC"))
			t->qresync = t->condstore = 1;
		else if (track_atom_is(tok, "CONDSTORE"))
			t->condstore = 1;
		else if (track_atom_is(tok, "UTF8=ACCEPT") || track_atom_is(tok, "UTF8=ONLY"))
			t->utf8 = 1;
		break;
	case TRACK_RESP_STATUS:
		if (tok->type == IMAP_TOK_TEXT)
			track_resp_code(s, tok->str, tok->len);
		break;
	default:
		break;
	}
}

void
track_response_end(struct session *s, int to_client)
{
	struct track *t = &s->track;

	if (strcmp(s->busy->resp_tag, "*") != 0)
		return;
	if (t->resp == TRACK_RESP_EXISTS || t->resp == TRACK_RESP_STATUS ||
	    t->resp == TRACK_RESP_FETCH)
		track_select_begins(s);
	switch (t->resp) {
	case TRACK_RESP_EXISTS:
		t->select_exists = t->resp_num;
		if (to_client) {
			seqmap_exists(&t->view, t->resp_num);
			t->dirty = 1;
		}
		break;
	case TRACK_RESP_EXPUNGE:
		if (to_client) {
			seqmap_expunge(&t->view, t->resp_num);
			t->dirty = 1;
		}
		break;
	case TRACK_RESP_VANISHED:
		if (to_client && t->vanished.count > 0) {
			track_vanished(t, &t->vanished);
			t->dirty = 1;
		}
		break;
	case TRACK_RESP_SEARCH:
	case TRACK_RESP_ESEARCH:
		if (t->search_sink != NULL)
			resync_search_result(s);
		break;
	case TRACK_RESP_FETCH:
		if (t->fetch_uid == 0)
			break;
		if (t->fetch_sink != NULL)
			seqmap_learn(t->fetch_sink, t->resp_num, t->fetch_uid);
		else if (to_client)
			track_fetch_next(s, t->resp_num, t->fetch_uid);
		break;
	default:
		break;
	}
}

/* Generations are per user; a session whose user imapfresh could not read
 * (an unknown SASL mechanism) is tracked alone under a private name. */
static void
track_join_user(struct session *s, const char *user)
{
	struct track *t = &s->track;

	if (t->suser != NULL)
		store_user_leave(s->srv->store, t->suser, s);
	if (user != NULL)
		track_set_name(&t->user, user);
	else {
		char private[sizeof(s->sid) + 1];

		snprintf(private, sizeof(private), "#%s", s->sid);
		track_set_name(&t->user, private);
	}
	t->suser = store_user_join(s->srv->store, t->user, s);
	feed_user_joined(s->srv->feed, t->user);	/* its backend id, looked up async */
	t->dirty = 1;
	trace_session_update(s);	/* "trace user NAME" can match now */
	log_msg(LOG_LEVEL_INFO, s->sid, "authenticated as %s", user ? user : "(unknown user)");
}

void
track_synced(struct session *s, uint64_t gen)
{
	struct track *t = &s->track;

	t->synced_gen = gen;
	t->synced_epoch = server_epoch(s->srv);
	t->last_sync = time(NULL);
	t->dirty = 1;
}

/* This session changed a mailbox; when it is the one selected here, the
 * server told this session itself, so it stays in sync. */
static void
track_bump(struct session *s, const char *mailbox, const char *detail)
{
	struct track *t = &s->track;
	uint64_t before, after;

	if (t->suser == NULL || mailbox == NULL)
		return;
	before = store_gen(t->suser, mailbox);
	after = store_bump(s->srv->store, t->suser, mailbox, s, detail);
	if (t->selected && strcmp(t->mailbox, mailbox) == 0 && t->synced_gen == before)
		track_synced(s, after);
	log_msg(LOG_LEVEL_DEBUG, s->sid, "mailbox \"%s\" changed (%s): generation %llu", mailbox,
	    detail, (unsigned long long)after);
}

/* " [COPYUID 17 5:6 1:2]" out of a completion's text, or "". */
static void
track_uid_code(const char *text, const char *name, char *out, size_t len)
{
	const char *code = text ? strstr(text, name) : NULL;

	out[0] = '\0';
	if (code != NULL)
		snprintf(out, len, " %.*s", (int)(strcspn(code, "]") + 1), code);
}

void
track_completed(struct session *s, struct inflight *f, int ok, const char *text)
{
	struct track *t = &s->track;
	char detail[2 * COMMAND_ARG_MAX + 200];

	if (ok && f->condstore)
		t->condstore = 1;	/* for the rest of the session: re-SELECTs ask for it */
	switch (f->kind) {
	case CMD_LOGIN:
	case CMD_AUTHENTICATE:
		if (ok)
			track_join_user(s, f->user);
		break;
	case CMD_SELECT:
	case CMD_EXAMINE:
		if (!ok || f->mailbox == NULL) {
			track_deselect(s, ok ? "name not tracked" : "SELECT failed");
			break;
		}
		if (!f->started)	/* no untagged data came: still a fresh view */
			track_select_begins(s);
		t->selected = 1;
		track_set_name(&t->mailbox, f->mailbox);
		track_set_name(&t->mailbox_wire, f->mailbox_wire ? f->mailbox_wire : f->mailbox);
		t->readonly = t->readonly || f->readonly;
		track_synced(s, t->suser ? store_gen(t->suser, t->mailbox) : 0);
		t->unheard = f->unheard;
		log_msg(LOG_LEVEL_DEBUG, s->sid, "mailbox \"%s\" selected: %u messages, UIDVALIDITY %u",
		    t->mailbox, t->view.count, t->uidvalidity);
		break;
	case CMD_CLOSE:
		if (ok && t->selected) {
			snprintf(detail, sizeof(detail), "CLOSE");
			track_bump(s, t->mailbox, detail);
		}
		/* FALLTHROUGH */
	case CMD_UNSELECT:
		if (ok)
			track_deselect(s, "closed");
		break;
	case CMD_UNAUTHENTICATE:
		if (ok) {
			track_deselect(s, "UNAUTHENTICATE");
			if (t->suser != NULL)
				store_user_leave(s->srv->store, t->suser, s);
			t->suser = NULL;
			track_set_name(&t->user, NULL);
		}
		break;
	case CMD_MOVE:
		if (ok && t->selected) {
			snprintf(detail, sizeof(detail), "%sMOVE to %s", f->uid ? "UID " : "",
			    f->mailbox ? f->mailbox : "?");
			track_bump(s, t->mailbox, detail);
		}
		/* FALLTHROUGH */
	case CMD_COPY:
		if (ok) {
			char code[100];

			track_uid_code(text, "[COPYUID ", code, sizeof(code));
			snprintf(detail, sizeof(detail), "%s%s from %s%s", f->uid ? "UID " : "",
			    f->kind == CMD_MOVE ? "MOVE" : "COPY", t->selected ? t->mailbox : "?", code);
			track_bump(s, f->mailbox, detail);
		}
		break;
	case CMD_APPEND:
		if (ok) {
			char code[100];

			track_uid_code(text, "[APPENDUID ", code, sizeof(code));
			snprintf(detail, sizeof(detail), "APPEND%s", code);
			track_bump(s, f->mailbox, detail);
		}
		break;
	case CMD_EXPUNGE:
		if (ok && t->selected)
			track_bump(s, t->mailbox, f->uid ? "UID EXPUNGE" : "EXPUNGE");
		break;
	default:
		break;
	}
}

void
track_save(struct session *s)
{
	struct track *t = &s->track;
	char view[4096], sid[200];
	struct uidset known;
	struct store_session_record rec;

	if (!t->dirty || t->suser == NULL)
		return;
	t->dirty = 0;
	uidset_init(&known);
	seqmap_known_uids(&t->view, &known);
	if (uidset_format(&known, view, sizeof(view)) >= sizeof(view))
		snprintf(view, sizeof(view), "(%llu UIDs in %zu ranges)",
		    (unsigned long long)known.count, known.n);
	uidset_free(&known);
	snprintf(sid, sizeof(sid), "%s:%s", s->srv->instance, s->sid);
	memset(&rec, 0, sizeof(rec));
	rec.sid = sid;
	rec.user = t->user;
	rec.client = s->client_addr;
	rec.mailbox = t->selected ? t->mailbox : "";
	rec.uidvalidity = t->uidvalidity;
	rec.uidnext = t->uidnext;
	rec.count = t->view.count;
	rec.highestmodseq = t->highestmodseq;
	rec.synced_gen = t->synced_gen;
	rec.started = s->started.tv_sec;
	rec.last_resync = s->resync.last_done;
	rec.resyncs = s->resync.n_resyncs;
	rec.escalations = s->resync.n_escalations;
	rec.stale_detected = s->resync.n_stale;
	rec.view = view;
	rec.backend_id = feed_backend_id(s->srv->feed, t->user);
	store_session_save(s->srv->store, &rec);
}

int
track_save_again(struct session *s)
{
	if (s->track.suser == NULL)
		return 0;
	s->track.dirty = 1;
	track_save(s);
	return 1;
}

void
track_forget(struct session *s)
{
	struct track *t = &s->track;
	char sid[200];

	if (t->suser == NULL)
		return;
	snprintf(sid, sizeof(sid), "%s:%s", s->srv->instance, s->sid);
	store_session_forget(s->srv->store, t->user, sid);
	store_user_leave(s->srv->store, t->suser, s);
	t->suser = NULL;
}
