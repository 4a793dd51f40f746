/* renumber: a session's client keeps its message numbers while the server's differ (expunges held back, pending.h): commands in, responses out, and when the held expunges may be told. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "pending.h"
#include "renumber.h"
#include "session.h"

static const char RENUMBER_EXPUNGEISSUED[] =
    "NO [EXPUNGEISSUED] Some of the requested messages no longer exist.";

void
renumber_cmd_reset(struct renumber_cmd *rc)
{
	rc->n = 0;
	rc->overflow = 0;
	rc->keys_from = 0;
	rc->skip = 0;
	rc->skip_list = 0;
	rc->list_depth = 0;
	rc->modseq = 0;
}

/* Search keys and how many arguments each takes (RFC 3501 6.4.4, RFC 9051
 * 6.4.4, and the extensions clients use); a key not listed takes none. */
static const struct {
	const char *name;
	unsigned args;
} renumber_keys[] = {
	{ "BCC", 1 }, { "BEFORE", 1 }, { "BODY", 1 }, { "CC", 1 }, { "FROM", 1 },
	{ "KEYWORD", 1 }, { "ON", 1 }, { "SINCE", 1 }, { "SUBJECT", 1 }, { "TEXT", 1 },
	{ "TO", 1 }, { "UNKEYWORD", 1 }, { "LARGER", 1 }, { "SMALLER", 1 },
	{ "SENTBEFORE", 1 }, { "SENTON", 1 }, { "SENTSINCE", 1 }, { "UID", 1 },
	{ "HEADER", 2 }, { "CHARSET", 1 }, { "RETURN", 1 }, { "OLDER", 1 }, { "YOUNGER", 1 },
	{ "SAVEDBEFORE", 1 }, { "SAVEDON", 1 }, { "SAVEDSINCE", 1 }, { "EMAILID", 1 },
	{ "THREADID", 1 }, { "FILTER", 1 }, { "ANNOTATION", 3 }, { "X-GM-RAW", 1 },
	{ "X-GM-MSGID", 1 }, { "X-GM-THRID", 1 }, { "X-GM-LABELS", 1 },
};

/* A sequence set as a client writes one: digits, '*', ':' and ','. */
static int
renumber_is_set(const char *s, size_t len)
{
	if (len == 0 || !((s[0] >= '0' && s[0] <= '9') || s[0] == '*'))
		return 0;
	for (size_t i = 0; i < len; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || s[i] == '*' || s[i] == ':' || s[i] == ','))
			return 0;
	return 1;
}

static void
renumber_record(struct renumber_cmd *rc, const struct imap_tok *tok, size_t end)
{
	if (rc->n == RENUMBER_SETS || end > UINT32_MAX) {
		rc->overflow = 1;
		return;
	}
	rc->at[rc->n].off = (uint32_t)(end - tok->len);
	rc->at[rc->n].len = (uint32_t)tok->len;
	rc->n++;
}

/* One token of search keys: sequence sets in key position are recorded. */
static void
renumber_search_token(struct renumber_cmd *rc, const struct imap_tok *tok, size_t end)
{
	if (tok->type == IMAP_TOK_LITERAL_DATA || tok->type == IMAP_TOK_LITERAL_END ||
	    tok->type == IMAP_TOK_EOL)
		return;
	if (rc->skip_list) {
		if (tok->type == IMAP_TOK_LIST_END && tok->depth == rc->list_depth)
			rc->skip_list = 0;
		return;
	}
	if (tok->type == IMAP_TOK_LIST_END)
		return;	/* a group of keys closes */
	if (rc->skip > 0) {
		rc->skip--;
		if (tok->type == IMAP_TOK_LIST_BEGIN) {
			rc->skip_list = 1;
			rc->list_depth = tok->depth;
		}
		if (rc->modseq) {
			rc->modseq = 0;
			if (tok->type == IMAP_TOK_QUOTED || tok->type == IMAP_TOK_LITERAL)
				rc->skip += 2;	/* MODSEQ "/flags/\\Seen" all n */
		}
		return;
	}
	if (tok->type != IMAP_TOK_ATOM)
		return;	/* a group opens, or a stray string */
	if (renumber_is_set(tok->str, tok->len)) {
		renumber_record(rc, tok, end);
		return;
	}
	if (tok->len == 6 && strncasecmp(tok->str, "MODSEQ", 6) == 0) {
		rc->skip = 1;
		rc->modseq = 1;
		return;
	}
	for (size_t i = 0; i < sizeof(renumber_keys) / sizeof(renumber_keys[0]); i++)
		if (strlen(renumber_keys[i].name) == tok->len &&
		    strncasecmp(renumber_keys[i].name, tok->str, tok->len) == 0) {
			rc->skip = renumber_keys[i].args;
			return;
		}
}

void
renumber_client_token(struct session *s, const struct imap_tok *tok, size_t end)
{
	struct renumber_cmd *rc = &s->busy->rn;
	const struct command *cmd = &s->busy->cmd;
	unsigned first = cmd->uid ? 3 : 2;

	switch (cmd->kind) {
	case CMD_FETCH:
	case CMD_STORE:
	case CMD_COPY:
	case CMD_MOVE:
		if (!cmd->uid && tok->index == first && tok->depth == 0 && tok->type == IMAP_TOK_ATOM)
			renumber_record(rc, tok, end);
		return;
	case CMD_SEARCH:
	case CMD_SORT:
	case CMD_THREAD:
		break;
	default:
		return;
	}
	if (tok->index < first)
		return;
	if (tok->index == first && tok->depth == 0 && rc->keys_from == 0) {
		/* SORT [RETURN (...)] (criteria) charset keys; THREAD algorithm charset keys */
		rc->keys_from = first;
		if (cmd->kind != CMD_SEARCH)
			rc->keys_from += 2;
		if (cmd->kind == CMD_SORT && tok->type == IMAP_TOK_ATOM && tok->len == 6 &&
		    strncasecmp(tok->str, "RETURN", 6) == 0)
			rc->keys_from += 2;
	}
	if (tok->index < rc->keys_from)
		return;
	renumber_search_token(rc, tok, end);
}

/* Sequence set i of the segment, in the server's numbering. */
static int
renumber_map(struct session *s, const char *seg, unsigned i, struct uidset *out, int *held)
{
	uidset_clear(out);
	return pending_set_to_server(&s->track.pending, seg + s->busy->rn.at[i].off, s->busy->rn.at[i].len,
	    s->track.view.count, out, held);
}

const char *
renumber_client_refusal(struct session *s)
{
	struct renumber_cmd *rc = &s->busy->rn;
	const char *seg, *why = NULL;
	struct uidset set;
	int held;

	if (!pending_any(&s->track.pending) || (rc->n == 0 && !rc->overflow))
		return NULL;
	if (rc->overflow)
		return RENUMBER_EXPUNGEISSUED;
	if (s->busy->cmd.kind == CMD_SEARCH || s->busy->cmd.kind == CMD_SORT || s->busy->cmd.kind == CMD_THREAD)
		return NULL;	/* a key naming only expunged messages just matches none */
	seg = (const char *)evbuffer_pullup(s->busy->cline, -1);
	uidset_init(&set);
	if (renumber_map(s, seg, 0, &set, &held) == 0) {
		/* RFC 2180 4.1.2 / 4.2.1 and 4.4: data for the messages that are
		 * left and a tagged NO; a COPY or MOVE copies nothing. */
		if (set.count == 0 || (held && (s->busy->cmd.kind == CMD_COPY || s->busy->cmd.kind == CMD_MOVE)))
			why = RENUMBER_EXPUNGEISSUED;
	}
	uidset_free(&set);
	return why;
}

int
renumber_client_rewrite(struct session *s)
{
	struct renumber_cmd *rc = &s->busy->rn;
	struct evbuffer *nb;
	const char *seg;
	size_t len, from = 0;
	struct uidset set;
	int any_held = 0;

	if (rc->n == 0 || !pending_any(&s->track.pending)) {
		rc->n = 0;
		return 0;
	}
	len = evbuffer_get_length(s->busy->cline);
	seg = (const char *)evbuffer_pullup(s->busy->cline, -1);
	if ((nb = evbuffer_new()) == NULL)
		return 0;
	uidset_init(&set);
	for (unsigned i = 0; i < rc->n; i++) {
		int held = 0;

		if (rc->at[i].off + rc->at[i].len > len || rc->at[i].off < from)
			continue;
		evbuffer_add(nb, seg + from, rc->at[i].off - from);
		from = rc->at[i].off + rc->at[i].len;
		if (renumber_map(s, seg, i, &set, &held) < 0) {
			evbuffer_add(nb, seg + rc->at[i].off, rc->at[i].len);	/* "$": as it is */
			continue;
		}
		any_held |= held;
		if (set.count == 0) {
			evbuffer_add(nb, "NOT ALL", 7);	/* a search key that matches none */
			continue;
		}
		size_t need = uidset_format(&set, NULL, 0) + 1;
		char *txt = malloc(need);
		if (txt != NULL) {
			uidset_format(&set, txt, need);
			evbuffer_add(nb, txt, need - 1);
			free(txt);
		}
	}
	evbuffer_add(nb, seg + from, len - from);
	uidset_free(&set);
	evbuffer_drain(s->busy->cline, len);
	evbuffer_add_buffer(s->busy->cline, nb);
	evbuffer_free(nb);
	rc->n = 0;
	return any_held;
}

/* RFC 3501 7.4.1: "An EXPUNGE response MUST NOT be sent ... while responding
 * to a FETCH, STORE, or SEARCH command"; SORT and THREAD answer in message
 * numbers as SEARCH does. The UID forms are other commands and may get one. */
static int
renumber_forbids(enum command_kind kind, int uid)
{
	return !uid && (kind == CMD_FETCH || kind == CMD_STORE || kind == CMD_SEARCH ||
	    kind == CMD_SORT || kind == CMD_THREAD);
}

int
renumber_expunge_allowed(const struct session *s)
{
	int in_progress = 0;

	/* "... nor when no command is in progress": a held command is in progress
	 * for the client, and so is an IDLE imapfresh is refreshing. */
	if (s->held) {
		if (renumber_forbids(s->busy->cmd.kind, s->busy->cmd.uid))
			return 0;
		in_progress = 1;
	}
	if (s->resync.for_idle && s->resync.phase != RESYNC_NONE)
		in_progress = 1;
	for (unsigned i = 0; i < s->n_inflight; i++) {
		const struct inflight *f = &s->inflight[i];

		if (f->injected)
			continue;
		if (renumber_forbids(f->kind, f->uid))
			return 0;
		/* "A command is not 'in progress' until the complete command has been received." */
		if (f->sent_whole)
			in_progress = 1;
	}
	return in_progress;
}

/* A set of UIDs told in lines of "prefix" and ranges, none too long. */
static void
renumber_reply_uids(struct session *s, const char *prefix, const struct uidset *uids)
{
	char line[900];
	size_t o = 0;

	for (size_t i = 0; i <= uids->n; i++) {
		char part[32];
		int n = 0;

		if (i < uids->n)
			n = uids->r[i].lo == uids->r[i].hi ? snprintf(part, sizeof(part), "%u", uids->r[i].lo) :
			    snprintf(part, sizeof(part), "%u:%u", uids->r[i].lo, uids->r[i].hi);
		if (o > 0 && (i == uids->n || o + (size_t)n + 1 >= sizeof(line))) {
			session_reply(s, "%s%.*s", prefix, (int)o, line);
			o = 0;
		}
		if (i < uids->n)
			o += (size_t)snprintf(line + o, sizeof(line) - o, "%s%s", o ? "," : "", part);
	}
}

/*
 * A QRESYNC client is told as "* VANISHED uids" (RFC 7162 3.2.10: "the
 * server MUST NOT send EXPUNGE responses"), in lines of bounded length.
 * Returns -1 when a held position's UID is unknown: it cannot be named.
 */
static int
renumber_flush_vanished(struct session *s)
{
	struct pending *p = &s->track.pending;
	struct uidset uids;

	uidset_init(&uids);
	for (size_t i = 0; i < p->pos.n; i++)
		for (uint64_t k = p->pos.r[i].lo; k <= p->pos.r[i].hi; k++) {
			uint32_t uid = seqmap_uid(&s->track.view, (uint32_t)k);
			if (uid == 0) {
				uidset_free(&uids);
				return -1;
			}
			uidset_add(&uids, uid);
		}
	renumber_reply_uids(s, "* VANISHED ", &uids);
	uidset_free(&uids);
	return 0;
}

/* VANISHED UIDs never placed: told by UID, as the server said them (RFC
 * 7162 3.2.10: a QRESYNC client hears expunges as VANISHED), now that the
 * client may hear them. The view drops them where their UIDs fall. */
static int
renumber_flush_unplaced(struct session *s)
{
	struct pending *p = &s->track.pending;
	struct uidset *v = &p->vanished;

	if (!s->track.qresync || pending_any(p)) {
		/* Positions held beside UIDs not placed: no order to tell both in. */
		session_close(s, "[UNAVAILABLE] Mailbox state changed; please reconnect",
		    "VANISHED UIDs at positions never known");
		return -1;
	}
	renumber_reply_uids(s, "* VANISHED ", v);
	for (size_t i = 0; i < v->n; i++)
		seqmap_vanished_range(&s->track.view, v->r[i].lo, v->r[i].hi);
	log_msg(LOG_LEVEL_DEBUG, s->sid, "told the client of %llu VANISHED UIDs held",
	    (unsigned long long)v->count);
	uidset_clear(v);
	s->track.dirty = 1;
	return 0;
}

void
renumber_flush(struct session *s)
{
	struct pending *p = &s->track.pending;
	uint32_t told = 0;

	if ((!pending_any(p) && !pending_unplaced(p)) || !renumber_expunge_allowed(s))
		return;
	if (pending_unplaced(p) && renumber_flush_unplaced(s) < 0)
		return;
	if (!pending_any(p))
		return;
	if (s->track.qresync && renumber_flush_vanished(s) < 0) {
		session_close(s, "[UNAVAILABLE] Mailbox state changed; please reconnect",
		    "held expunges of messages whose UIDs the QRESYNC client was never told");
		return;
	}
	/* Highest first: each one leaves the numbers of those below as they are. */
	if (!s->track.qresync)
		for (size_t i = p->pos.n; i > 0; i--)
			for (uint64_t k = p->pos.r[i - 1].hi; k >= p->pos.r[i - 1].lo; k--)
				session_reply(s, "* %llu EXPUNGE", (unsigned long long)k);
	seqmap_expunge_set(&s->track.view, &p->pos);
	told = pending_count(p);
	pending_clear(p);
	s->track.dirty = 1;
	log_msg(LOG_LEVEL_DEBUG, s->sid, "told the client of %u held expunges", told);
}

int
renumber_search_response(const struct session *s)
{
	if (!pending_any(&s->track.pending))
		return 0;
	if (strcmp(s->busy->resp_word, "SEARCH") != 0 && strcmp(s->busy->resp_word, "SORT") != 0 &&
	    strcmp(s->busy->resp_word, "ESEARCH") != 0)
		return 0;
	/* The oldest search in flight is the one answered. */
	for (unsigned i = 0; i < s->n_inflight; i++) {
		const struct inflight *f = &s->inflight[i];

		if (!f->injected && (f->kind == CMD_SEARCH || f->kind == CMD_SORT))
			return !f->uid;
	}
	return 0;
}
