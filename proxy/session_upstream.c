/* session_upstream: the upstream's bytes, response by response: streamed, rewritten or consumed here. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "capability.h"
#include "compress.h"
#include "log.h"
#include "relay.h"
#include "renumber.h"
#include "metrics.h"
#include "trace.h"
#include "session.h"
#include "upstream.h"

static int
session_upstream_is_status(const char *word)
{
	return strcmp(word, "OK") == 0 || strcmp(word, "NO") == 0 || strcmp(word, "BAD") == 0 ||
	    strcmp(word, "BYE") == 0 || strcmp(word, "PREAUTH") == 0;
}

/* Does this response complete a LOGIN or AUTHENTICATE successfully? */
static int
session_upstream_logs_in(struct session *s)
{
	struct inflight *f;

	if (strcmp(s->busy->resp_word, "OK") != 0 || (f = session_inflight_find(s, s->busy->resp_tag)) == NULL)
		return 0;
	return f->kind == CMD_LOGIN || f->kind == CMD_AUTHENTICATE;
}

static void
session_upstream_policy(struct session *s, struct capability_policy *p)
{
	/* STARTTLS is valid only before authentication. */
	p->offer_starttls = !s->client_tls && !s->authenticated && !session_upstream_logs_in(s) &&
	    s->srv->tls_server != NULL;
	p->login_disabled = !session_link_secure(s);
	/* Like Dovecot: once authenticated (COMPRESS is valid only then). */
	p->offer_compress = (s->authenticated || session_upstream_logs_in(s)) &&
	    !compress_active(s->client);
}

static void
session_upstream_reset(struct session *s)
{
	s->resp_mode = RESP_UNDECIDED;
	s->busy->resp_tag[0] = '\0';
	s->busy->resp_word[0] = '\0';
	s->busy->resp_status_text[0] = '\0';
	s->resp_passed = 0;
	s->resp_held_expunge = 0;
	s->resp_held_vanished = 0;
	s->resp_expunge_issued = 0;
	s->up_resp_start = s->up_deferred;
	if (s->busy->resp_text != NULL)
		evbuffer_drain(s->busy->resp_text, evbuffer_get_length(s->busy->resp_text));
}

/* The rewritten line's buffer, made on the first rewrite (most sessions
 * rewrite only their greeting and CAPABILITY): NULL when out of memory. */
static struct evbuffer *
session_upstream_text(struct session *s)
{
	if (s->busy->resp_text == NULL)
		s->busy->resp_text = evbuffer_new();
	return s->busy->resp_text;
}

static void session_upstream_release(struct session *s, size_t n);

static void
session_upstream_flush(struct session *s)
{
	size_t n = evbuffer_get_length(s->busy->uline);

	if (n == 0)
		return;
	if (s->resp_mode == RESP_SWALLOW || s->client == NULL) {
		evbuffer_drain(s->busy->uline, n);
		return;
	}
	s->srv->stats.bytes_upstream_to_client += n;
	s->resp_passed = 1;
	relay_move(s->client, s->client_link, s->busy->uline, n);
}

/* Take the undecided response's bytes out of the upstream input, after
 * passing on what precedes them. */
static void
session_upstream_spill(struct session *s)
{
	if (s->up == NULL)
		return;
	session_upstream_release(s, s->up_resp_start);
	evbuffer_remove_buffer(bufferevent_get_input(s->up), s->busy->uline, s->up_deferred);
	s->up_deferred = 0;
}

/* An undecided response's bytes wait in the upstream input behind the PASS
 * bytes before them: passed along with them, or taken out to be hidden or
 * rewritten. */
static void
session_upstream_set_mode(struct session *s, enum resp_mode mode)
{
	if (s->resp_mode == RESP_UNDECIDED && mode != RESP_PASS)
		session_upstream_spill(s);
	s->resp_mode = mode;
	if (mode == RESP_PASS)
		session_upstream_flush(s);
}

void
session_upstream_identify(struct session *s, const struct imap_tok *tok)
{
	if (tok->index >= 2 && tok->type != IMAP_TOK_TEXT)
		return;	/* the common case: deep inside a response */
	if (tok->index == 0 && tok->type == IMAP_TOK_ATOM && tok->len <= COMMAND_TAG_MAX) {
		memcpy(s->busy->resp_tag, tok->str, tok->len);
		s->busy->resp_tag[tok->len] = '\0';
	} else if (tok->index == 1 && tok->depth == 0 && tok->type == IMAP_TOK_ATOM) {
		size_t n = tok->len < sizeof(s->busy->resp_word) - 1 ? tok->len : sizeof(s->busy->resp_word) - 1;
		for (size_t i = 0; i < n; i++)
			s->busy->resp_word[i] = (char)toupper((unsigned char)tok->str[i]);
		s->busy->resp_word[n] = '\0';
	}
	if (tok->type == IMAP_TOK_TEXT) {
		size_t n = tok->len < sizeof(s->busy->resp_status_text) - 1 ? tok->len :
		    sizeof(s->busy->resp_status_text) - 1;
		memcpy(s->busy->resp_status_text, tok->str, n);
		s->busy->resp_status_text[n] = '\0';
	}
}

/* What of the upstream's capabilities imapfresh itself uses: each list
 * replaces the last (the one after login counts). */
static void
session_upstream_note_caps(struct session *s, const char *list, size_t len)
{
	s->up_esearch = capability_has(list, len, "ESEARCH") || capability_has(list, len, "IMAP4rev2");
}

/* Record what identifies the response, before its bytes move on. */
static void
session_upstream_observe(struct session *s, const struct imap_tok *tok)
{
	struct capability_policy p;
	struct evbuffer *text;
	char *out;

	session_upstream_identify(s, tok);
	if (s->state == SESSION_RUNNING)
		track_token(s, tok);
	if (s->trace != NULL)
		trace_token(s, TRACE_U2P, tok, 0);
	if (s->resp_mode == RESP_SWALLOW)
		return;

	if (tok->type == IMAP_TOK_TEXT && session_upstream_is_status(s->busy->resp_word) &&
	    capability_in_text(tok->str, tok->len)) {
		/* Before upstream STARTTLS the list describes a link the client never sees. */
		int drop = s->state == SESSION_GREETING &&
		    s->srv->cfg.upstream_tls == UPSTREAM_TLS_STARTTLS;
		struct evbuffer_iovec v;

		session_upstream_policy(s, &p);
		session_upstream_note_caps(s, tok->str, tok->len);
		if ((text = session_upstream_text(s)) == NULL ||
		    evbuffer_reserve_space(text, tok->len + CAPABILITY_EXTRA, &v, 1) < 1)
			return;
		out = v.iov_base;
		v.iov_len = capability_rewrite_text(tok->str, tok->len, &p, drop, out);
		if (v.iov_len == 0) {
			memcpy(out, "Ready.", 6);	/* resp-text must not be empty */
			v.iov_len = 6;
		}
		evbuffer_commit_space(text, &v, 1);
		session_upstream_set_mode(s, RESP_REWRITE);
	} else if (s->resp_mode == RESP_REWRITE && tok->type == IMAP_TOK_ATOM && tok->index >= 2 &&
	    (text = session_upstream_text(s)) != NULL) {
		/* A CAPABILITY line: collect the names, rewritten at EOL. */
		if (evbuffer_get_length(text) > 0)
			evbuffer_add(text, " ", 1);
		evbuffer_add(text, tok->str, tok->len);
	}
}

/* The command a tagged response completes; NULL for "*", "+" or a tag in
 * nothing in flight. */
static struct inflight *
session_upstream_completes(struct session *s)
{
	if (strcmp(s->busy->resp_tag, "*") == 0 || strcmp(s->busy->resp_tag, "+") == 0)
		return NULL;
	return session_inflight_find(s, s->busy->resp_tag);
}

/* "* n WORD" goes on as "* k WORD": the bytes read so far are replaced,
 * the rest of the response streams as it is. */
static void
session_upstream_renumber_prefix(struct session *s, uint32_t k, const struct imap_tok *word)
{
	session_upstream_spill(s);
	evbuffer_drain(s->busy->uline, evbuffer_get_length(s->busy->uline));
	evbuffer_add_printf(s->busy->uline, "* %u %.*s", k, (int)word->len, word->str);
	s->track.resp_num = k;
	session_upstream_set_mode(s, RESP_PASS);
}

/*
 * "* VANISHED uids" (RFC 7162 3.2.10: what a QRESYNC session gets instead of
 * EXPUNGE, under the same rule): held like an EXPUNGE where the client may
 * not hear it, as the client positions of those UIDs; where the view cannot
 * place them (unknown positions), by UID in pending.vanished until the
 * resync's list places them (repair_place()).
 * "* VANISHED (EARLIER) ..." answers a command and changes no number.
 */
static int
session_upstream_renumber_vanished(struct session *s, const struct imap_tok *tok)
{
	struct uidset uids;
	int held = 0;

	if (tok->index < 2)
		return tok->type != IMAP_TOK_EOL;	/* the set, or (EARLIER), decides */
	if (tok->index != 2 || tok->depth != 0 || tok->type != IMAP_TOK_ATOM)
		return 0;
	if (renumber_expunge_allowed(s)) {
		renumber_flush(s);
		return 0;
	}
	uidset_init(&uids);
	uidset_clear(&s->busy->resp_held_positions);
	if (uidset_parse(&uids, tok->str, tok->len) < 0) {
		uidset_free(&uids);
		log_msg(LOG_LEVEL_NOTICE, s->sid, "a VANISHED the client may not hear yet names "
		    "no UID set: passed on as it came");
		return 0;
	}
	if (!pending_unplaced(&s->track.pending) &&
	    seqmap_positions_of(&s->track.view, &uids, &s->busy->resp_held_positions) == 0)
		held = 1;	/* placed at the response's end */
	else {
		/* Positions the view does not know (after SELECT ... QRESYNC it
		 * knows only the changed messages): held by UID until the
		 * resync's list places them or the client may hear them. */
		for (size_t i = 0; i < uids.n; i++)
			if (uidset_add_range(&s->track.pending.vanished, uids.r[i].lo, uids.r[i].hi) < 0) {
				uidset_free(&uids);
				session_close(s, "[UNAVAILABLE] Out of memory", "out of memory");
				return 1;
			}
		log_msg(LOG_LEVEL_DEBUG, s->sid, "VANISHED %.*s held by UID: its positions are "
		    "not known yet", (int)tok->len, tok->str);
	}
	uidset_free(&uids);
	s->resp_held_vanished = held;
	session_upstream_set_mode(s, RESP_SWALLOW);
	return 1;
}

/*
 * Message numbers, while the client's differ from the server's (pending.h):
 * an EXPUNGE the client may not hear yet is held, EXISTS and FETCH numbers
 * are renumbered, a search's answer is rewritten, and a tagged OK to a
 * command that named a held message becomes NO [EXPUNGEISSUED]. Returns 1
 * when the response is decided (or must wait for its next token).
 */
static int
session_upstream_renumber(struct session *s, const struct imap_tok *tok, struct inflight *f)
{
	struct pending *p = &s->track.pending;

	if (s->n_inflight > 0 && !s->inflight[0].injected && !s->inflight[0].started &&
	    (s->inflight[0].kind == CMD_SELECT || s->inflight[0].kind == CMD_EXAMINE))
		pending_clear(p);	/* what arrives now describes the new mailbox */
	if (strcmp(s->busy->resp_tag, "*") != 0) {
		if (f == NULL)	/* "+", or a tag in nothing in flight (ours are decided already) */
			return 0;
		renumber_flush(s);	/* before the completion: the client may hear them now */
		if (f->expunge_issued && (f->kind == CMD_FETCH || f->kind == CMD_STORE) &&
		    strcmp(s->busy->resp_word, "OK") == 0) {
			s->resp_expunge_issued = 1;
			session_upstream_set_mode(s, RESP_SWALLOW);
			return 1;
		}
		return 0;
	}
	if (s->busy->resp_word[0] >= '0' && s->busy->resp_word[0] <= '9') {
		uint32_t n = (uint32_t)strtoul(s->busy->resp_word, NULL, 10);

		if (tok->index < 2)
			return tok->type != IMAP_TOK_EOL;	/* the word after the number decides */
		if (tok->index != 2 || tok->type != IMAP_TOK_ATOM || n == 0)
			return 0;
		if (tok->len == 7 && strncasecmp(tok->str, "EXPUNGE", 7) == 0) {
			if (renumber_expunge_allowed(s)) {
				renumber_flush(s);	/* now both number alike */
				return 0;
			}
			s->resp_held_expunge = n;
			session_upstream_set_mode(s, RESP_SWALLOW);
			return 1;
		}
		if (!pending_any(p))
			return 0;
		if (tok->len == 6 && strncasecmp(tok->str, "EXISTS", 6) == 0) {
			session_upstream_renumber_prefix(s, n + pending_count(p), tok);
			return 1;
		}
		if (tok->len == 5 && strncasecmp(tok->str, "FETCH", 5) == 0) {
			session_upstream_renumber_prefix(s, pending_to_client(p, n), tok);
			return 1;
		}
		return 0;
	}
	if (strcmp(s->busy->resp_word, "VANISHED") == 0)
		return session_upstream_renumber_vanished(s, tok);
	if (renumber_search_response(s)) {
		session_upstream_set_mode(s, RESP_RENUMBER);
		return 1;
	}
	return 0;
}

static void
session_upstream_decide(struct session *s, const struct imap_tok *tok)
{
	struct inflight *f;

	if (s->state == SESSION_UPSTREAM_STARTTLS) {
		session_upstream_set_mode(s, RESP_SWALLOW);
		return;
	}
	if (tok->index == 0 && tok->type != IMAP_TOK_EOL) {
		if (strcmp(s->busy->resp_tag, "+") == 0)
			session_upstream_set_mode(s, resync_response_hidden(s) ? RESP_SWALLOW : RESP_PASS);
		return;	/* wait for the word after the tag */
	}
	/* One look-up of the command a tagged response completes, for both uses. */
	f = session_upstream_completes(s);
	if (resync_response_hidden(s) || (f != NULL && f->injected)) {
		session_upstream_set_mode(s, RESP_SWALLOW);
		return;
	}
	if (s->state == SESSION_RUNNING && session_upstream_renumber(s, tok, f))
		return;
	if (s->id_responses_hidden > 0 && strcmp(s->busy->resp_tag, "*") == 0 &&
	    strcmp(s->busy->resp_word, "ID") == 0) {
		s->id_responses_hidden--;	/* the answer to our own ID comes first */
		session_upstream_set_mode(s, RESP_SWALLOW);
		return;
	}
	if (strcmp(s->busy->resp_tag, "*") == 0 && strcmp(s->busy->resp_word, "CAPABILITY") == 0 &&
	    tok->type != IMAP_TOK_EOL) {
		session_upstream_set_mode(s, RESP_REWRITE);
		return;
	}
	if (session_upstream_is_status(s->busy->resp_word) && tok->type != IMAP_TOK_TEXT &&
	    tok->type != IMAP_TOK_EOL && tok->index < 2)
		return;	/* the resp-text decides */
	session_upstream_set_mode(s, RESP_PASS);
}

/* The line is built in uline (its raw bytes are not needed any more), then
 * relayed like any other: a greeting or LOGIN reply costs no extra loop pass. */
static void
session_upstream_write_rewritten(struct session *s)
{
	struct evbuffer *out = s->busy->uline, *text;
	struct capability_policy p;

	evbuffer_drain(s->busy->uline, evbuffer_get_length(s->busy->uline));
	if ((text = session_upstream_text(s)) == NULL)
		return;
	if (strcmp(s->busy->resp_word, "CAPABILITY") == 0) {
		size_t len = evbuffer_get_length(text);
		char *list = (char *)evbuffer_pullup(text, -1);
		struct evbuffer_iovec v;

		session_upstream_note_caps(s, list, len);
		session_upstream_policy(s, &p);
		if (evbuffer_reserve_space(out, len + CAPABILITY_EXTRA + 20, &v, 1) < 1)
			return;
		memcpy(v.iov_base, "* CAPABILITY ", 13);
		v.iov_len = 13 + capability_rewrite(list, len, &p, (char *)v.iov_base + 13);
		if (s->trace != NULL)
			trace_line(s, TRACE_P2C, v.iov_base, v.iov_len, 0);
		memcpy((char *)v.iov_base + v.iov_len, "\r\n", 2);
		v.iov_len += 2;
		evbuffer_commit_space(out, &v, 1);
	} else {
		if (s->trace != NULL) {
			char line[1200];
			int n = snprintf(line, sizeof(line), "%s %s %.*s", s->busy->resp_tag, s->busy->resp_word,
			    (int)evbuffer_get_length(text),
			    (const char *)evbuffer_pullup(text, -1));
			trace_line(s, TRACE_P2C, line, n < (int)sizeof(line) ? (size_t)n :
			    sizeof(line) - 1, 0);
		}
		evbuffer_add_printf(out, "%s %s ", s->busy->resp_tag, s->busy->resp_word);
		evbuffer_add_buffer(out, text);
		evbuffer_add(out, "\r\n", 2);
	}
	relay_move(s->client, s->client_link, out, evbuffer_get_length(out));
}

/* A search's answer, its message numbers in the client's numbering. */
static void
session_upstream_write_renumbered(struct session *s)
{
	size_t len = evbuffer_get_length(s->busy->uline), outlen = 0;
	const char *line = (const char *)evbuffer_pullup(s->busy->uline, -1);
	char *out;

	while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
		len--;
	if ((out = pending_renumber_search(&s->track.pending, line, len, &outlen)) == NULL) {
		session_upstream_flush(s);	/* out of memory: as it came */
		return;
	}
	if (s->trace != NULL)
		trace_line(s, TRACE_P2C, out, outlen, 0);
	evbuffer_drain(s->busy->uline, evbuffer_get_length(s->busy->uline));
	evbuffer_add(s->busy->uline, out, outlen);
	evbuffer_add(s->busy->uline, "\r\n", 2);
	free(out);
	s->srv->stats.bytes_upstream_to_client += evbuffer_get_length(s->busy->uline);
	relay_move(s->client, s->client_link, s->busy->uline, evbuffer_get_length(s->busy->uline));
}

/* The server expunged message n while the client may not hear of it. */
static void
session_upstream_hold_expunge(struct session *s, uint32_t n)
{
	struct track *t = &s->track;

	if (pending_to_client(&t->pending, n) > t->view.count) {
		log_msg(LOG_LEVEL_WARNING, s->sid, "upstream expunged message %u of %u", n,
		    t->view.count - pending_count(&t->pending));
		return;
	}
	pending_hold(&t->pending, n);
	t->dirty = 1;
	log_msg(LOG_LEVEL_DEBUG, s->sid, "expunge of message %u held: %u held in all", n,
	    pending_count(&t->pending));
}

/* The greeting is through: start STARTTLS upstream, or start relaying. */
static void
session_upstream_greeted(struct session *s)
{
	if (strcmp(s->busy->resp_word, "BYE") == 0) {
		s->upstream_bye = 1;
		return;	/* the upstream closes; its event callback ends the session */
	}
	if (strcmp(s->busy->resp_word, "PREAUTH") == 0) {
		s->authenticated = 1;
		session_login_done(s);
	}
	if (s->srv->cfg.upstream_tls == UPSTREAM_TLS_STARTTLS) {
		char line[48];
		int n;

		snprintf(s->busy->up_tag, sizeof(s->busy->up_tag), "imapfresh.%llu", (unsigned long long)++s->up_tag_seq);
		n = snprintf(line, sizeof(line), "%s STARTTLS", s->busy->up_tag);
		session_send_own(s, line, (size_t)n);
		session_enter(s, SESSION_UPSTREAM_STARTTLS, "upstream greeting received");
	} else
		session_upstream_start(s);
}

void
session_upstream_start(struct session *s)
{
	metrics_observe(&s->srv->metrics.upstream_connect,
	    metrics_now_usec() - s->connect_start_usec);
	s->srv->stats.upstream_last_ready = time(NULL);
	bufferevent_set_timeouts(s->up, NULL, NULL);
	/* The client's address goes with its first command (session_client_forward). */
	s->id_pending = s->srv->cfg.upstream_client_address == CLIENT_ADDRESS_ID;
	session_enter(s, SESSION_RUNNING, "upstream ready");
	session_client_process(s);
}

/* Operators grep for failed logins: the name (made printable, a literal may
 * hold anything), the client, the server's words; never the password. */
static void
session_upstream_log_failed_login(struct session *s, const struct inflight *f)
{
	char user[128];
	size_t i;

	snprintf(user, sizeof(user), "%s", f->user != NULL ? f->user : "?");
	for (i = 0; user[i] != '\0'; i++)
		if ((unsigned char)user[i] < 0x20 || user[i] == 0x7f)
			user[i] = '?';
	log_msg(LOG_LEVEL_INFO, s->sid, "login failed: user=<%s> from %s: %s %s", user,
	    s->client_addr, s->busy->resp_word, s->busy->resp_status_text);
}

/* A tagged completion: the command is done, for the upstream and for us. */
static void
session_upstream_completed(struct session *s)
{
	struct inflight *f = session_inflight_find(s, s->busy->resp_tag);
	int ok = strcmp(s->busy->resp_word, "OK") == 0;

	if (f == NULL)
		return;
	if (f->injected) {
		struct inflight done = *f;	/* resync may push new entries */
		session_inflight_remove(s, f);
		if (done.purpose == RESYNC_CMD_ID) {
			if (!ok)
				log_msg(LOG_LEVEL_WARNING, s->sid, "upstream refused our ID: %s",
				    s->busy->resp_status_text);
			return;
		}
		resync_completed(s, &done, ok, s->busy->resp_status_text);
		return;
	}
	if (f->kind == CMD_IDLE && resync_idle_completed(s)) {
		session_inflight_remove(s, f);
		resync_quiet(s);
		return;
	}
	if (!f->sent_whole && s->wait == WAIT_LITERAL) {
		/* Refused instead of "+": the client will not send that literal. */
		imap_lex_reject_literal(s->busy->clex);
		evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
		command_reset(&s->busy->cmd);
		renumber_cmd_reset(&s->busy->rn);	/* as after any command */
		s->cmd_forwarded = 0;
		s->wait = WAIT_NONE;
	}
	if ((f->kind == CMD_AUTHENTICATE && s->wait == WAIT_AUTH) ||
	    (f->kind == CMD_IDLE && s->wait == WAIT_IDLE)) {
		s->wait = WAIT_NONE;
		s->idling = 0;
	}
	if (ok && (f->kind == CMD_LOGIN || f->kind == CMD_AUTHENTICATE)) {
		s->authenticated = 1;
		session_login_done(s);
		session_set_timeouts(s);
	} else if (f->kind == CMD_LOGIN || f->kind == CMD_AUTHENTICATE) {
		session_upstream_log_failed_login(s, f);
	} else if (ok && f->kind == CMD_LOGOUT) {
		s->logged_out = 1;
	} else if (ok && f->kind == CMD_UNAUTHENTICATE) {
		s->authenticated = 0;
		session_set_timeouts(s);
	}
	metrics_observe(&s->srv->metrics.command_latency, metrics_now_usec() - f->sent_usec);
	track_completed(s, f, ok, s->busy->resp_status_text);
	session_inflight_remove(s, f);
	track_save(s);
	if (s->n_inflight == 0)
		resync_quiet(s);
}

static void
session_upstream_continuation(struct session *s)
{
	if (s->resp_mode == RESP_SWALLOW) {
		resync_continuation(s);	/* the "+" to the IDLE we re-entered */
		return;
	}
	if (s->wait == WAIT_IDLE) {
		s->idling = 1;
		renumber_flush(s);	/* RFC 2177: the server may send EXPUNGE while idling */
	} else if (s->wait == WAIT_LITERAL)
		s->wait = WAIT_NONE;
	else if (s->wait == WAIT_AUTH && imap_lex_at_command_start(s->busy->clex))
		imap_lex_expect_text_line(s->busy->clex);
}

/* Our own STARTTLS got its answer. Returns 1 when the link was replaced. */
static int
session_upstream_starttls_done(struct session *s)
{
	if (strcmp(s->busy->resp_tag, s->busy->up_tag) != 0)
		return 0;
	if (strcmp(s->busy->resp_word, "OK") != 0) {
		log_msg(LOG_LEVEL_WARNING, s->sid, "upstream refused STARTTLS");
		session_close(s, "[UNAVAILABLE] Backend server refused STARTTLS",
		    "upstream refused STARTTLS");
		return 1;
	}
	upstream_starttls(s);
	return 1;
}

/* The response is complete. Returns 1 when processing must stop. */
static int
session_upstream_eol(struct session *s)
{
	enum session_state st = s->state;

	/* Outside RUNNING a response may change the link: nothing stays behind. */
	if (st != SESSION_RUNNING)
		session_upstream_release_pending(s);
	if (s->trace != NULL)
		trace_fate(s, TRACE_U2P, s->resp_mode == RESP_REWRITE || s->resp_mode == RESP_RENUMBER ?
		    TRACE_REWRITTEN :
		    s->resp_mode == RESP_SWALLOW ? TRACE_HIDDEN : TRACE_FORWARDED);
	if (s->resp_mode == RESP_REWRITE)
		session_upstream_write_rewritten(s);
	else if (s->resp_mode == RESP_RENUMBER)
		session_upstream_write_renumbered(s);
	else
		session_upstream_flush(s);
	if (s->resp_expunge_issued)
		session_reply(s, "%s NO [EXPUNGEISSUED] Some of the requested messages no longer exist.",
		    s->busy->resp_tag);

	if (st == SESSION_UPSTREAM_STARTTLS) {
		int replaced = session_upstream_starttls_done(s);
		session_upstream_reset(s);
		return replaced;
	}
	if (strcmp(s->busy->resp_tag, "+") == 0)
		session_upstream_continuation(s);
	else if (strcmp(s->busy->resp_tag, "*") == 0) {
		if (strcmp(s->busy->resp_word, "BYE") == 0 && s->resp_mode != RESP_SWALLOW)
			s->upstream_bye = 1;
		if (st == SESSION_RUNNING)
			track_response_end(s, s->resp_mode != RESP_SWALLOW);
		if (s->resp_held_expunge > 0)
			session_upstream_hold_expunge(s, s->resp_held_expunge);
		if (s->resp_held_vanished) {
			pending_hold_positions(&s->track.pending, &s->busy->resp_held_positions);
			s->track.dirty = 1;
		}
	} else if (st == SESSION_RUNNING)
		session_upstream_completed(s);
	if (st == SESSION_GREETING)
		session_upstream_greeted(s);
	session_upstream_reset(s);
	return s->state != SESSION_RUNNING;
}

/* Big literal payloads (message bodies) move in bulk. */
static int
session_upstream_move_literal(struct session *s, struct evbuffer *in)
{
	uint64_t rem = imap_lex_literal_remaining(s->busy->ulex);
	size_t avail = evbuffer_get_length(in), n;

	if (rem == 0 || avail == 0 || s->resp_mode != RESP_PASS)
		return 0;
	n = avail < rem ? avail : (size_t)rem;
	if (s->trace != NULL)
		trace_literal_bytes(s, TRACE_U2P, in, n);
	s->srv->stats.bytes_upstream_to_client += n;
	s->resp_passed = 1;
	relay_move(s->client, s->client_link, in, n);
	imap_lex_skip_literal(s->busy->ulex, n);
	return 1;
}

static int
session_upstream_may_process(const struct session *s)
{
	return s->up != NULL && !s->up_paused && s->client != NULL &&
	    (s->state == SESSION_GREETING || s->state == SESSION_UPSTREAM_STARTTLS ||
	    s->state == SESSION_RUNNING);
}

/* The first n deferred bytes (all PASS) go to the client in one move. */
static void
session_upstream_release(struct session *s, size_t n)
{
	struct evbuffer *in;

	if (n == 0 || s->up == NULL)
		return;
	in = bufferevent_get_input(s->up);
	if (n > s->up_resp_start)
		s->resp_passed = 1;
	s->up_resp_start = n < s->up_resp_start ? s->up_resp_start - n : 0;
	s->up_deferred -= n;
	if (s->client == NULL) {
		evbuffer_drain(in, n);
		return;
	}
	s->srv->stats.bytes_upstream_to_client += n;
	relay_move(s->client, s->client_link, in, n);
}

/*
 * PASS bytes stay in the upstream input until the end of the window, a
 * literal, an error or a line of imapfresh's own for the client, then move in
 * one piece: a FETCH of a thousand lines costs a buffer move and a write,
 * not one per line. An undecided response's bytes wait behind them.
 */
void
session_upstream_release_pending(struct session *s)
{
	session_upstream_release(s, s->resp_mode == RESP_PASS ? s->up_deferred : s->up_resp_start);
}

/*
 * The session ends: pass on what was read, and say whether a line of ours
 * (the BYE) may follow. A response cut mid-line gets its line ended first; one
 * cut inside a literal cannot be ended, as any byte would be read as payload,
 * so that client sees only the connection close.
 */
int
session_upstream_cut(struct session *s)
{
	if (s->client == NULL || s->busy == NULL)	/* at rest: at a line start */
		return 1;
	session_upstream_release_pending(s);
	if (imap_lex_at_command_start(s->busy->ulex) || s->resp_mode != RESP_PASS || !s->resp_passed)
		return 1;
	if (imap_lex_literal_remaining(s->busy->ulex) > 0)
		return 0;
	evbuffer_add(bufferevent_get_output(s->client), "\r\n", 2);
	return 1;
}

/*
 * The input bytes after the deferred ones, as one contiguous run: kept from
 * token to token while nothing is taken out of the input, so a thousand-line
 * FETCH is not a chain walk per token.
 */
struct upstream_view {
	const char *p;
	size_t len;
	size_t in_len;		/* input length the view was taken at */
	size_t at;		/* ... and s->up_deferred */
};

static void
session_upstream_view(struct session *s, struct evbuffer *in, struct upstream_view *view)
{
	struct evbuffer_iovec v;
	struct evbuffer_ptr at;
	size_t in_len = evbuffer_get_length(in);

	if (view->len > 0 && view->in_len == in_len && view->at == s->up_deferred)
		return;
	view->in_len = in_len;
	if (evbuffer_ptr_set(in, &at, s->up_deferred, EVBUFFER_PTR_SET) < 0 ||
	    evbuffer_peek(in, -1, &at, &v, 1) < 1)
		v.iov_base = NULL, v.iov_len = 0;
	view->p = v.iov_base;
	view->len = v.iov_len;
}

/* Deferred bytes go out at 64 KiB; a long undecided line must not fill the
 * input, so it waits in uline. 1 when bytes went to the client. */
static int
session_upstream_bound(struct session *s)
{
	if (s->up_deferred < SESSION_OUT_LOW)
		return 0;
	session_upstream_release_pending(s);
	if (s->resp_mode == RESP_UNDECIDED)
		session_upstream_spill(s);
	return 1;
}

/*
 * "* n FETCH (UID u ...)" whole, without its tokens: a sync of a big mailbox
 * is thousands of these lines, and the tracker needs only n and u. Only a
 * plain line (imap_lex_plain_line: complete, no literal, no error) on a
 * session neither traced nor in the middle of a response qualifies; one
 * that resync hides goes the token way. Returns the bytes taken, 0 for none;
 * the line's end may have ended the session (state no longer RUNNING).
 */
static int
session_upstream_fetch_fast(const struct session *s)
{
	return s->state == SESSION_RUNNING && s->trace == NULL && s->resp_mode == RESP_UNDECIDED &&
	    !pending_any(&s->track.pending);
}

static size_t
session_upstream_fetch_line(struct session *s, const struct upstream_view *view)
{
	struct imap_tok tag = { .type = IMAP_TOK_ATOM, .len = 1, .index = 0 }, word = tag;
	uint32_t num, uid;
	size_t n, total;

	/* The prefix first: it turns most other lines away in a few bytes. */
	if (!session_upstream_fetch_fast(s) || !track_fetch_line(view->p, view->len, &num, &uid) ||
	    (n = imap_lex_plain_line(s->busy->ulex, view->p, view->len)) == 0)
		return 0;
	/* What its first two tokens would have told. */
	tag.str = view->p;
	word.str = view->p + 2;
	word.len = (size_t)((const char *)memchr(word.str, ' ', n - 2) - word.str);
	word.index = 1;
	session_upstream_identify(s, &tag);
	session_upstream_identify(s, &word);
	if (resync_response_hidden(s)) {
		s->busy->resp_tag[0] = s->busy->resp_word[0] = '\0';
		return 0;
	}
	track_fetch_seen(s, num, uid);
	s->resp_mode = RESP_PASS;
	s->up_deferred += n;
	if (session_upstream_eol(s))
		return n;

	/* The lines after it, while they are more of the same: no resync under
	   way (nothing hidden, no sink), a SELECT's start already seen. Each
	   changes only the view, as the line above did through its end. */
	total = n;
	while (session_upstream_fetch_fast(s) && s->resync.phase == RESYNC_NONE &&
	    s->track.fetch_sink == NULL && s->up_deferred < SESSION_OUT_LOW &&
	    track_fetch_line(view->p + total, view->len - total, &num, &uid) &&
	    (n = imap_lex_plain_line(s->busy->ulex, view->p + total, view->len - total)) != 0) {
		track_fetch_next(s, num, uid);
		s->up_deferred += n;
		total += n;
	}
	s->up_resp_start = s->up_deferred;
	return total;
}

static void
session_upstream_run(struct session *s)
{
	struct upstream_view view = { NULL, 0, 0, 0 };
	struct evbuffer *in;

	while (session_upstream_may_process(s)) {
		struct imap_tok tok;
		size_t used = 0;
		enum imap_lex_status st;
		int moved = 0;	/* bytes went to the client: check its watermark */

		in = bufferevent_get_input(s->up);
		/* At rest (busy state NULL) a response starts: bytes bring the
		 * busy state back. */
		if (s->busy == NULL && (evbuffer_get_length(in) == 0 || session_busy(s) == NULL))
			break;
		if (s->up_deferred == 0 && session_upstream_move_literal(s, in)) {
			moved = 1;
			goto next;
		}
		session_upstream_view(s, in, &view);
		if ((used = session_upstream_fetch_line(s, &view)) > 0) {
			if (s->state != SESSION_RUNNING)
				return;	/* as session_upstream_eol() tells the token path */
			view.p += used;
			view.len -= used;
			view.at = s->up_deferred;
			moved = session_upstream_bound(s);
			goto next;
		}
		st = imap_lex_next(s->busy->ulex, view.p, view.len, &used, &tok);
		view.p += used;
		view.len -= used;
		if (st == IMAP_LEX_TOKEN)
			session_upstream_observe(s, &tok);
		if (s->resp_mode == RESP_PASS || s->resp_mode == RESP_UNDECIDED)
			s->up_deferred += used;
		else if (used > 0)
			evbuffer_remove_buffer(in, s->busy->uline, used);
		view.at = s->up_deferred;
		moved = session_upstream_bound(s);
		if (st != IMAP_LEX_TOKEN) {
			if (used == 0 || evbuffer_get_length(in) <= s->up_deferred)
				break;
			goto next;
		}
		if (tok.type == IMAP_TOK_LITERAL || tok.type == IMAP_TOK_ERROR)
			session_upstream_release_pending(s);
		if (tok.type == IMAP_TOK_ERROR) {
			log_msg(LOG_LEVEL_WARNING, s->sid, "upstream protocol error: %s",
			    tok.errmsg ? tok.errmsg : "?");
			session_close(s, "[UNAVAILABLE] Backend server protocol error",
			    "upstream protocol error");
			return;
		}
		if (s->resp_mode == RESP_UNDECIDED)
			session_upstream_decide(s, &tok);
		if (tok.type == IMAP_TOK_LITERAL &&
		    (s->resp_mode == RESP_REWRITE || s->resp_mode == RESP_RENUMBER))
			session_upstream_set_mode(s, RESP_PASS);	/* not a list we rewrite */
		if (tok.type == IMAP_TOK_LITERAL && s->trace != NULL)
			trace_fate(s, TRACE_U2P, s->resp_mode == RESP_SWALLOW ? TRACE_HIDDEN :
			    TRACE_FORWARDED);
		if (tok.type == IMAP_TOK_EOL) {
			if (session_upstream_eol(s))
				return;
			moved = 1;
		} else if (s->resp_mode == RESP_SWALLOW)
			session_upstream_flush(s);
		if (tok.type == IMAP_TOK_LITERAL)
			moved = 1;
next:
		if (moved && s->client != NULL && session_out_full(bufferevent_get_output(s->client)))
			session_pause_reading(s, s->up);
	}
	if (s->up != NULL && s->client != NULL) {
		session_upstream_release_pending(s);
		if (session_out_full(bufferevent_get_output(s->client)))
			session_pause_reading(s, s->up);
	}
}

void
session_upstream_process(struct session *s)
{
	s->nest++;
	session_upstream_run(s);
	s->nest--;
	session_busy_put(s);
}
