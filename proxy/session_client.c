/* session_client: the client's bytes, command by command: forwarded upstream, refused, or handled here. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "compress.h"
#include "log.h"
#include "relay.h"
#include "session.h"
#include "store.h"
#include "tls.h"
#include "trace.h"

/* Says which settings decide, for whoever reads it at the client's end. */
static const char SESSION_PRIVACY[] =
    "NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) "
    "connections (use STARTTLS; imapfresh settings: require_tls, secure_networks).";

static void
session_client_reset(struct session *s)
{
	command_reset(&s->busy->cmd);
	s->cmd_reject = 0;
	s->cmd_reject_resp = NULL;
	s->cmd_forwarded = 0;
	s->cmd_local = 0;
	s->line_is_continuation = 0;
	renumber_cmd_reset(&s->busy->rn);
}

static void
session_client_reject(struct session *s, const char *resp)
{
	s->cmd_reject = 1;
	s->cmd_reject_resp = resp;
}

/* The client's own ID, extended with our fields; -1 when it cannot be. */
static int
session_client_rewrite_id(struct session *s)
{
	size_t len = evbuffer_get_length(s->busy->cline), end = len;
	const char *line = (const char *)evbuffer_pullup(s->busy->cline, -1);
	struct evbuffer *nb;
	char fields[400];

	while (end > 0 && (line[end - 1] == '\n' || line[end - 1] == '\r'))
		end--;
	session_id_fields(s, fields, sizeof(fields));
	if ((nb = evbuffer_new()) == NULL)
		return -1;
	if (end > 0 && line[end - 1] == ')') {
		evbuffer_add(nb, line, end - 1);
		evbuffer_add_printf(nb, "%s%s)\r\n", end > 1 && line[end - 2] == '(' ? "" : " ",
		    fields);
	} else if (end >= 3 && strncasecmp(line + end - 3, "NIL", 3) == 0) {
		evbuffer_add(nb, line, end - 3);
		evbuffer_add_printf(nb, "(%s)\r\n", fields);
	} else {
		evbuffer_free(nb);
		return -1;	/* not an ID we can extend: ours goes first */
	}
	evbuffer_drain(s->busy->cline, len);
	evbuffer_add_buffer(s->busy->cline, nb);
	evbuffer_free(nb);
	return 0;
}

/* "PROXY TCP4 ..." read as a command: a PROXY header from an address that
 * may not send one. */
static int
session_client_is_proxy_header(const struct session *s)
{
	return !s->authenticated && strcmp(s->busy->cmd.tag, "PROXY") == 0 &&
	    (strcmp(s->busy->cmd.name, "TCP4") == 0 || strcmp(s->busy->cmd.name, "TCP6") == 0 ||
	    strcmp(s->busy->cmd.name, "UNKNOWN") == 0);
}

/* The first segment of a command has arrived: forward it, refuse it, or keep it. */
static void
session_client_decide(struct session *s, int whole_line)
{
	struct server *srv = s->srv;

	switch (s->busy->cmd.kind) {
	case CMD_STARTTLS:
		if (!whole_line)
			session_client_reject(s, "BAD STARTTLS takes no arguments");
		else if (s->client_tls)
			session_client_reject(s, "BAD TLS is already active");
		else if (srv->tls_server == NULL)
			session_client_reject(s, "BAD STARTTLS is not available");
		else if (s->n_inflight > 0)
			session_client_reject(s, "BAD STARTTLS must not be pipelined");
		else
			s->cmd_local = 1;
		break;
	case CMD_LOGIN:
	case CMD_AUTHENTICATE:
		if (!session_link_secure(s)) {
			session_client_reject(s, SESSION_PRIVACY);
			log_msg(LOG_LEVEL_INFO, s->sid, "%s refused: plaintext link from %s "
			    "(require_tls = yes; the client is not in secure_networks)", s->busy->cmd.name,
			    s->client_addr);
		}
		break;
	case CMD_COMPRESS:
		/* RFC 4978: terminated here, like TLS; the upstream link stays as it is. */
		if (!whole_line || strcasecmp(command_arg(&s->busy->cmd, 0)->val, "DEFLATE") != 0)
			session_client_reject(s, "BAD COMPRESS takes one argument: DEFLATE");
		else if (compress_active(s->client))
			session_client_reject(s, "NO [COMPRESSIONACTIVE] DEFLATE is already active");
		else if (!s->authenticated)
			session_client_reject(s, "BAD COMPRESS is valid only after authentication");
		else if (s->n_inflight > 0)
			session_client_reject(s, "BAD COMPRESS must not be pipelined");
		else
			s->cmd_local = 1;
		break;
	default:
		break;
	}
	if (!s->cmd_reject && !s->cmd_local) {
		/* Numbers the client may use but the server no longer has. */
		const char *why = renumber_client_refusal(s);
		if (why != NULL)
			session_client_reject(s, why);
	}
	if (s->cmd_reject)
		log_msg(LOG_LEVEL_DEBUG, s->sid, "refusing %s: %s", s->busy->cmd.name, s->cmd_reject_resp);
}

/* upstream_client_address = id: the client's address travels in one ID, sent
 * with its first command: its own ID when that is what it sends first. */
static void
session_client_send_id(struct session *s)
{
	char fields[400];

	s->id_pending = 0;
	if (s->busy->cmd.kind == CMD_ID && s->busy->cmd.literals == 0 && !s->line_is_continuation &&
	    session_client_rewrite_id(s) == 0)
		return;
	session_id_fields(s, fields, sizeof(fields));
	session_inject(s, RESYNC_CMD_ID, "ID (%s)", fields);
	s->id_responses_hidden++;
}

static void
session_client_forward(struct session *s)
{
	int held = 0;

	if (!s->line_is_continuation)
		held = renumber_client_rewrite(s);
	if (s->id_pending && !s->cmd_forwarded)
		session_client_send_id(s);

	s->srv->stats.bytes_client_to_upstream += evbuffer_get_length(s->busy->cline);
	/* More of a pipelined burst waits to be read: queue, so that the burst
	 * leaves in one write instead of one per command. */
	if (evbuffer_get_length(bufferevent_get_input(s->client)) > 0)
		evbuffer_add_buffer(bufferevent_get_output(s->up), s->busy->cline);
	else
		relay_move(s->up, s->up_link, s->busy->cline, evbuffer_get_length(s->busy->cline));
	if (!s->cmd_forwarded && s->busy->cmd.tag_ok && !s->line_is_continuation) {
		struct inflight *f = session_inflight_push(s, &s->busy->cmd);
		if (f != NULL)
			f->expunge_issued = held;
	} else if (held && s->n_inflight > 0)
		s->inflight[s->n_inflight - 1].expunge_issued = 1;
	s->cmd_forwarded = 1;
}

static void
session_client_fate(struct session *s, enum trace_fate fate)
{
	if (s->trace != NULL)
		trace_fate(s, TRACE_C2P, fate);
}

static void
session_client_finish_reject(struct session *s)
{
	evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
	s->srv->stats.rejected_commands++;
	if (s->busy->cmd.tag_ok)
		session_reply(s, "%s %s", s->busy->cmd.tag, s->cmd_reject_resp);
	else
		session_reply(s, "* %s", s->cmd_reject_resp);
	session_client_reset(s);
}

/* Our answer to STARTTLS is queued; nothing the client pipelined after it may
 * be read as TLS data or as a command (CVE-2011-0411), so drop it. */
static void
session_client_starttls(struct session *s)
{
	struct evbuffer *in = bufferevent_get_input(s->client);

	evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
	if (evbuffer_get_length(in) > 0) {
		log_msg(LOG_LEVEL_NOTICE, s->sid, "discarding %zu bytes pipelined after STARTTLS",
		    evbuffer_get_length(in));
		evbuffer_drain(in, evbuffer_get_length(in));
	}
	session_reply(s, "%s OK Begin TLS negotiation now", s->busy->cmd.tag);
	session_client_reset(s);
	bufferevent_disable(s->client, EV_READ);
	session_enter(s, SESSION_CLIENT_STARTTLS, "client STARTTLS");
}

/*
 * RFC 4978 3: "the server ... MUST start compression immediately after the
 * tagged OK". The OK is queued on the link as it is; everything written
 * after it goes through the compressor, in order. The client sends nothing
 * more before it has the OK, so nothing read yet is compressed.
 */
static void
session_client_compress(struct session *s)
{
	struct bufferevent *bev;

	evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));	/* ours, not the server's */
	session_reply(s, "%s OK DEFLATE active", s->busy->cmd.tag);
	session_client_reset(s);
	if ((bev = compress_wrap(s->client)) == NULL) {
		session_close(s, NULL, "cannot start DEFLATE (out of memory)");
		return;
	}
	s->client = bev;
	session_set_client_callbacks(s);
	session_set_timeouts(s);
	log_msg(LOG_LEVEL_INFO, s->sid, "client link compressed (COMPRESS=DEFLATE)");
}

void
session_client_starttls_flushed(struct session *s)
{
	SSL *ssl = SSL_new(s->srv->tls_server);

	s->client = ssl ? tls_upgrade(s->client, ssl, 1) : NULL;
	if (s->client == NULL) {
		s->client_eof = 1;
		session_close(s, NULL, "cannot start client TLS");
		return;
	}
	s->client_tls = s->client_tls_pending = 1;
	session_set_client_callbacks(s);
	session_enter(s, SESSION_RUNNING, "client TLS handshake started");
	session_upstream_process(s);
}

static const char *
session_client_error_resp(const struct imap_tok *tok, char *buf, size_t len, const struct config *cfg)
{
	switch (tok->err) {
	case IMAP_LEX_ERR_TOO_LONG:
		return "BAD [TOOBIG] Command line too long";
	case IMAP_LEX_ERR_LITERAL_TOO_BIG:
		snprintf(buf, len, "BAD [TOOBIG] Literal too large (max_literal is %llu bytes)",
		    (unsigned long long)cfg->max_literal);
		return buf;
	default:
		snprintf(buf, len, "BAD Error in IMAP command: %s", tok->errmsg ? tok->errmsg : "syntax");
		return buf;
	}
}

/*
 * A SELECT or EXAMINE of a user whose changes this instance is only starting
 * to hear (the user's first session here: the channel being subscribed, the
 * first read of the generations not back) waits for it, a Redis round trip:
 * a change made after the server took the SELECT but counted in Redis before
 * that read would otherwise go unseen (store.c). session_store_listening()
 * lets it go on, or select_wait (a slow Redis holds no command longer; the
 * session then checks once). A released command passes.
 */
static int
session_client_waits_listening(const struct session *s)
{
	const struct command *cmd = &s->busy->cmd;	/* a command is being read: busy is there */

	return (cmd->kind == CMD_SELECT || cmd->kind == CMD_EXAMINE) && !s->no_hold &&
	    s->track.suser != NULL && !store_user_listening(s->srv->store, s->track.suser);
}

/* A trigger command on a possibly stale session waits, its first segment
 * kept in cline, until the resync is over. */
static int
session_client_hold(struct session *s, const struct imap_tok *tok)
{
	int for_resync;

	if (s->cmd_reject || s->cmd_local)
		return 0;
	if (session_client_waits_listening(s) && session_wait_listening(s) == 0) {
		for_resync = 0;
		log_msg(LOG_LEVEL_DEBUG, s->sid, "%s waits until this instance hears %s's changes",
		    s->busy->cmd.name, s->track.user);
	} else if (resync_hold(s, &s->busy->cmd))
		for_resync = 1;
	else
		return 0;
	session_client_fate(s, TRACE_HELD);
	s->held = 1;
	s->held_tok = tok->type;
	s->held_lit_flags = tok->literal_flags;
	if (for_resync)
		resync_quiet(s);
	return 1;
}

static void session_client_act(struct session *s, const struct imap_tok *tok);

void
session_client_release(struct session *s)
{
	struct imap_tok tok;

	if (!s->held)
		return;
	memset(&tok, 0, sizeof(tok));
	tok.type = s->held_tok;
	tok.literal_flags = s->held_lit_flags;
	s->held = 0;
	s->no_hold = 1;
	session_client_act(s, &tok);
	s->no_hold = 0;
	session_client_process(s);
}

/* A token's bytes are already in cline: act on it. */
static void
session_client_act(struct session *s, const struct imap_tok *tok)
{
	switch (tok->type) {
	case IMAP_TOK_ERROR:
		if (s->cmd_forwarded || s->line_is_continuation) {
			/* Part of it is upstream already: there is no clean way back. */
			session_close(s, "Protocol error: command line could not be parsed",
			    tok->errmsg ? tok->errmsg : "client protocol error");
			return;
		}
		session_client_reject(s, session_client_error_resp(tok, s->busy->reject_buf, sizeof(s->busy->reject_buf),
		    &s->srv->cfg));
		log_msg(LOG_LEVEL_INFO, s->sid, "client command refused: %s",
		    tok->errmsg ? tok->errmsg : "error");
		evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
		break;
	case IMAP_TOK_LITERAL:
		if (!s->cmd_forwarded && !s->cmd_reject && !s->line_is_continuation) {
			session_client_decide(s, 0);
			if (session_client_hold(s, tok))
				return;
		}
		if (s->cmd_reject || s->cmd_local) {
			if (s->cmd_local)
				session_client_reject(s, "BAD STARTTLS takes no arguments");
			evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
			session_client_fate(s, TRACE_REFUSED);
			if (!(tok->literal_flags & IMAP_LIT_NONSYNC)) {
				imap_lex_reject_literal(s->busy->clex);
				session_client_finish_reject(s);
			}
			break;
		}
		session_client_fate(s, TRACE_FORWARDED);
		session_client_forward(s);
		if (!(tok->literal_flags & IMAP_LIT_NONSYNC))
			s->wait = WAIT_LITERAL;
		break;
	case IMAP_TOK_EOL:
		if (s->cmd_reject) {
			session_client_fate(s, TRACE_REFUSED);
			session_client_finish_reject(s);
			break;
		}
		if (s->line_is_continuation) {
			if (s->wait == WAIT_IDLE && resync_client_idle_line(s)) {
				/* DONE while we refresh the idling client: ours to answer. */
				session_client_fate(s, TRACE_HIDDEN);
				evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
				session_client_reset(s);
				break;
			}
			session_client_fate(s, TRACE_FORWARDED);
			session_client_forward(s);
			if (s->wait == WAIT_IDLE) {
				s->wait = WAIT_NONE;	/* that was DONE */
				s->idling = 0;
			}
			session_client_reset(s);
			break;
		}
		if (!s->cmd_forwarded) {
			if (session_client_is_proxy_header(s)) {
				s->srv->stats.proxy_protocol_refused++;
				session_close(s, "PROXY protocol header refused from this address",
				    "PROXY header from an untrusted address");
				return;
			}
			session_client_decide(s, 1);
			if (session_client_hold(s, tok))
				return;
			if (s->cmd_reject) {
				session_client_fate(s, TRACE_REFUSED);
				session_client_finish_reject(s);
				break;
			}
			if (s->cmd_local) {
				session_client_fate(s, TRACE_LOCAL);
				if (s->busy->cmd.kind == CMD_COMPRESS)
					session_client_compress(s);
				else
					session_client_starttls(s);
				break;
			}
		}
		session_client_fate(s, TRACE_FORWARDED);
		session_client_forward(s);
		s->srv->stats.commands++;
		if (s->n_inflight > 0 && !s->inflight[s->n_inflight - 1].sent_whole &&
		    !s->inflight[s->n_inflight - 1].injected) {
			struct inflight *f = &s->inflight[s->n_inflight - 1];
			f->sent_whole = 1;
			track_command_sent(s, f, &s->busy->cmd);
		}
		if (s->busy->cmd.kind == CMD_AUTHENTICATE)
			s->wait = WAIT_AUTH;
		else if (s->busy->cmd.kind == CMD_IDLE)
			s->wait = WAIT_IDLE;
		session_client_reset(s);
		break;
	default:
		if (s->cmd_reject)
			evbuffer_drain(s->busy->cline, evbuffer_get_length(s->busy->cline));
		break;
	}
}

/* Big literal payloads move in bulk, without the lexer looking at them. */
static int
session_client_move_literal(struct session *s, struct evbuffer *in)
{
	uint64_t rem = imap_lex_literal_remaining(s->busy->clex);
	size_t avail = evbuffer_get_length(in), n;

	if (rem <= COMMAND_ARG_MAX || avail == 0)
		return 0;
	n = avail < rem ? avail : (size_t)rem;
	if (s->trace != NULL)
		trace_literal_bytes(s, TRACE_C2P, in, n);
	if (s->cmd_reject)
		evbuffer_drain(in, n);
	else {
		relay_move(s->up, s->up_link, in, n);
		s->srv->stats.bytes_client_to_upstream += n;
	}
	imap_lex_skip_literal(s->busy->clex, n);
	return 1;
}

static void
session_client_run(struct session *s)
{
	struct evbuffer *in;

	if (s->client == NULL)
		return;
	in = bufferevent_get_input(s->client);
	while (s->state == SESSION_RUNNING && !s->client_paused && s->up != NULL && !s->held &&
	    resync_client_may_read(s)) {
		struct evbuffer_iovec v;
		struct imap_tok tok;
		size_t used = 0;
		enum imap_lex_status st;

		/* At rest (busy state NULL) a line starts: bytes bring the busy
		 * state back. */
		if (s->busy == NULL && (evbuffer_get_length(in) == 0 || session_busy(s) == NULL))
			break;
		if (!session_client_move_literal(s, in)) {
			int at_start = imap_lex_at_command_start(s->busy->clex);
			int nv = evbuffer_peek(in, -1, NULL, &v, 1);

			if (nv < 1)
				v.iov_base = NULL, v.iov_len = 0;
			st = imap_lex_next(s->busy->clex, v.iov_base, v.iov_len, &used, &tok);
			if (st == IMAP_LEX_TOKEN) {
				if (at_start && (s->wait == WAIT_AUTH || s->wait == WAIT_IDLE))
					s->line_is_continuation = 1;
				if (!s->line_is_continuation)
					command_feed(&s->busy->cmd, &tok);
				else if (tok.type == IMAP_TOK_TEXT && s->wait == WAIT_AUTH)
					track_sasl_line(s, tok.str, tok.len);
				if (s->trace != NULL)
					trace_token(s, TRACE_C2P, &tok,
					    (s->line_is_continuation && s->wait == WAIT_AUTH) ||
					    (!s->line_is_continuation &&
					    command_token_is_secret(&s->busy->cmd, &tok)));
			}
			/* A refused command's rest (up to 100 MB of an over-long line)
			 * is dropped as it is read, never kept. */
			if (used > 0 && s->cmd_reject)
				evbuffer_drain(in, used);
			else if (used > 0)
				evbuffer_remove_buffer(in, s->busy->cline, used);
			if (st == IMAP_LEX_TOKEN && !s->line_is_continuation && !s->cmd_reject)
				renumber_client_token(s, &tok, evbuffer_get_length(s->busy->cline));
			if (st == IMAP_LEX_TOKEN)
				session_client_act(s, &tok);
			else if (used == 0 || evbuffer_get_length(in) == 0)
				break;
		}
		if (s->up != NULL && session_out_full(bufferevent_get_output(s->up)))
			session_pause_reading(s, s->client);
	}
}

void
session_client_process(struct session *s)
{
	s->nest++;
	session_client_run(s);
	s->nest--;
	session_busy_put(s);
}
