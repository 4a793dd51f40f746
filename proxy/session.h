/* session: one client connection paired with its own upstream connection. */
#ifndef SESSION_H
#define SESSION_H

#include <stdint.h>
#include <time.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <event2/bufferevent.h>
#include <event2/buffer.h>

#include "command.h"
#include "imap_lex.h"
#include "renumber.h"
#include "resync.h"
#include "server.h"
#include "track.h"

enum session_state {
	SESSION_PROXY_HEADER,		/* waiting for a trusted balancer's PROXY header */
	SESSION_CONNECTING,		/* upstream TCP (and TLS) connect under way */
	SESSION_GREETING,		/* waiting for the upstream greeting */
	SESSION_UPSTREAM_STARTTLS,	/* our STARTTLS sent upstream, then its handshake */
	SESSION_RUNNING,		/* relaying commands and responses */
	SESSION_CLIENT_STARTTLS,	/* our "OK Begin TLS" is flushing to the client */
	SESSION_CLOSING,		/* final output flushing to the client */
	SESSION_DEAD,			/* free scheduled */
};

/* What the client is allowed to send next besides new commands. */
enum session_wait {
	WAIT_NONE,
	WAIT_LITERAL,	/* a synchronizing literal waits for the upstream's "+" */
	WAIT_AUTH,	/* AUTHENTICATE exchange: client lines are SASL responses */
	WAIT_IDLE,	/* IDLE: the next client line is DONE */
};

#define INFLIGHT_TAG_INLINE 24	/* tags shorter than this (nearly all) live in the entry */

/* A command the upstream has (at least partly) received and not yet
 * completed. An idling session keeps one (its IDLE): kept small. */
struct inflight {
	char tag_inline[INFLIGHT_TAG_INLINE];	/* the tag: session_inflight_tag() */
	char *tag_heap;		/* ... a copy of it when it is longer */
	enum command_kind kind;
	enum resync_cmd purpose;	/* what an injected command is for */
	char *mailbox;		/* SELECT/EXAMINE/APPEND/COPY/MOVE target, canonical */
	char *mailbox_wire;	/* SELECT/EXAMINE: the name as sent */
	char *user;		/* LOGIN / AUTHENTICATE PLAIN identity, until the OK */
	uint64_t sent_usec;	/* when it went upstream, for the latency histogram */
	unsigned char uid;	/* UID FETCH, UID MOVE, ... */
	unsigned char sent_whole;	/* its last line has gone upstream */
	unsigned char injected;	/* imapfresh's own: never shown to the client */
	unsigned char started;	/* SELECT: its untagged responses have begun */
	unsigned char sasl_plain;	/* AUTHENTICATE PLAIN: the user can be read */
	unsigned char readonly;	/* EXAMINE */
	unsigned char condstore;	/* turns CONDSTORE on when it succeeds */
	unsigned char expunge_issued;	/* it named messages expunged but not yet told: OK becomes NO */
	unsigned char unheard;	/* SELECT sent while the user's changes could go unheard */
};

/* How the current upstream response travels to the client. */
enum resp_mode {
	RESP_UNDECIDED,	/* tag and first word not seen yet */
	RESP_PASS,	/* bytes stream through as they are lexed */
	RESP_REWRITE,	/* held to the end of the line, then rewritten */
	RESP_SWALLOW,	/* consumed by imapfresh, never shown to the client */
	RESP_RENUMBER,	/* held to the end of the line, its message numbers renumbered */
};

/* A session's addresses are IPv4 or IPv6 (anything else only says its
 * family): 28 bytes, where a sockaddr_storage takes 128. */
union session_addr {
	struct sockaddr sa;
	struct sockaddr_in sin;
	struct sockaddr_in6 sin6;
};

/*
 * What a session needs only while a command, a response or its upstream
 * STARTTLS is under way: taken when first needed (session_busy()), given
 * back when the session is at rest again (session_busy_put()), so that an
 * idle session (10,000s of them, mostly in IDLE) carries none of it. The
 * lexers are here too: at rest both are at a line start, as good as new.
 */
struct session_busy {
	struct session_busy *next_free;	/* in the server's pool (srv->busy_pool) */
	struct imap_lex *clex, *ulex;	/* at rest both at a line start, so shared */
	/* client to upstream */
	struct evbuffer *cline;		/* raw bytes of the command segment being read */
	struct command cmd;		/* the command being read */
	struct renumber_cmd rn;		/* its sequence sets, for renumbering */
	char reject_buf[160];		/* cmd_reject_resp when it is built here */
	/* upstream to client */
	struct evbuffer *uline;		/* raw bytes of the response held so far */
	struct evbuffer *resp_text;	/* rewritten line under construction (NULL until one) */
	char resp_tag[COMMAND_TAG_MAX + 1];
	char resp_word[16];		/* OK, NO, CAPABILITY, EXISTS, ... (index 1) */
	char resp_status_text[256];	/* resp-text of the response being read */
	struct uidset resp_held_positions;	/* a held VANISHED's client positions */
	char up_tag[24];		/* tag of imapfresh's own upstream STARTTLS */
};

struct session {
	uint64_t id;
	char sid[24];			/* "s" + id, the log prefix */
	struct server *srv;
	TAILQ_ENTRY(session) entry;
	enum session_state state;
	char client_addr[64];
	union session_addr client_sa;	/* the real client (after a PROXY header) */
	union session_addr local_sa;	/* where it connected to */
	int proxy_fd;			/* the socket while its PROXY header is read */
	struct event *ev_proxy;
	struct event *ev_login;		/* the pre-login deadline (timeout_preauth) */
	struct event *ev_listen;	/* a SELECT waiting for the user's channel (select_wait) */
	unsigned id_responses_hidden;	/* "* ID" answers to our own ID still to come */
	int id_pending;			/* upstream_client_address = id, not yet sent */
	int listener_tls;		/* accepted on listen_tls */
	int client_tls;			/* client link is TLS now */
	uint8_t client_link, up_link;	/* enum relay_link of s->client, s->up */
	int client_tls_pending;		/* handshake not finished yet */
	int authenticated;
	int client_eof;
	int client_unknown;		/* a PROXY header named no client (LOCAL, UNKNOWN) */
	int logged_out;			/* the upstream completed the client's LOGOUT */
	int quiet_close;		/* the close is routine: logged at debug (a port probe) */
	int client_eof_error;		/* the client link broke: no close_notify on it */
	struct evbuffer_cb_entry *under_drained;	/* closing with COMPRESS: see session.c */

	struct bufferevent *client;
	struct bufferevent *up;
	size_t max_line;		/* the client lexer's limits, as configured at accept */
	uint64_t max_literal;
	struct session *next_reap;	/* on srv->reap once its free is scheduled */
	struct session_busy *busy;	/* NULL while the session is at rest */
	unsigned nest;			/* client/upstream processing under way (re-entered) */

	/* client to upstream */
	int cmd_reject;			/* answer locally, forward nothing */
	const char *cmd_reject_resp;	/* the tagged response to give */
	int cmd_forwarded;		/* some segment already went upstream */
	int cmd_local;			/* handled by imapfresh (STARTTLS) */
	int line_is_continuation;	/* a DONE or SASL line, not a command */
	enum session_wait wait;
	struct inflight *inflight;	/* FIFO, oldest first */
	unsigned n_inflight, cap_inflight;

	/* upstream to client */
	enum resp_mode resp_mode;
	int resp_passed;		/* some of this response reached the client */
	size_t up_deferred;		/* bytes lexed but still in the upstream input:
					   PASS ones, then the undecided response's */
	size_t up_resp_start;		/* where in those the current response starts */
	int upstream_bye;		/* the upstream said BYE itself */
	int up_esearch;			/* the upstream offers ESEARCH (RFC 4731) or IMAP4rev2 */
	uint32_t resp_held_expunge;	/* "* n EXPUNGE" the client may not hear yet */
	int resp_held_vanished;		/* "* VANISHED" likewise: the positions below */
	int resp_expunge_issued;	/* a tagged OK that becomes NO [EXPUNGEISSUED] */
	int up_paused, client_paused;	/* reading stopped for backpressure */
	uint64_t up_tag_seq;

	struct timeval started;
	uint64_t last_active_usec;	/* a command started or ended (upgrade.c) */

	struct track track;		/* what the client knows of its mailbox */
	struct resync resync;		/* repairing a stale upstream session */
	int held;			/* a trigger command waits for a resync */
	int no_hold;			/* the released command goes on unchecked */
	int idling;			/* the upstream said "+" to the client's IDLE */
	struct trace_session *trace;	/* non-NULL while this session is traced */
	uint64_t connect_start_usec;	/* upstream connect began */
	enum imap_tok_type held_tok;	/* the token its first segment ended with */
	unsigned held_lit_flags;
};

/* Start a session on an accepted socket. */
void session_accept(struct server *srv, int fd, struct sockaddr *sa, int salen, int tls);

/* Enter a new state, logging the transition. */
void session_enter(struct session *s, enum session_state next, const char *why);

/* Close: send "* BYE text" (unless bye is NULL), flush, then free out of the
 * callback. Safe to call more than once. */
void session_close(struct session *s, const char *bye, const char *why);

/* (Re)attach the client bufferevent's callbacks, after accept or STARTTLS. */
void session_set_client_callbacks(struct session *s);

/* Write a line (CRLF added) to the client. */
void session_reply(struct session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* May the client log in on its link as it is now: TLS, require_tls off, or a
 * client address in secure_networks. */
int session_link_secure(const struct session *s);

/* The client authenticated: the pre-login deadline is off. */
void session_login_done(struct session *s);

/* Apply the timeouts that fit the session's state. */
void session_set_timeouts(struct session *s);

/* Backpressure: stop reading the peer while out is above the high mark. */
int session_out_full(struct evbuffer *out);
void session_pause_reading(struct session *s, struct bufferevent *from);
void session_resume_reading(struct session *s, struct bufferevent *from);

/* In-flight command queue. */
struct inflight *session_inflight_push(struct session *s, const struct command *cmd);
/* Send one of imapfresh's own commands upstream (tag chosen here). */
struct inflight *session_inject(struct session *s, enum resync_cmd purpose, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
struct inflight *session_inflight_find(struct session *s, const char *tag);
const char *session_inflight_tag(const struct inflight *f);
void session_inflight_remove(struct session *s, struct inflight *f);

/* Send a line imapfresh wrote itself upstream (CRLF added), traced as such. */
void session_send_own(struct session *s, const char *line, size_t len);

/* "x-originating-ip" "..." ... for ID commands sent upstream. */
void session_id_fields(struct session *s, char *buf, size_t len);

/* Operator controls (admin endpoint, imapfresh-ctl). */
struct session *session_find(struct server *srv, uint64_t id);
void session_kick(struct session *s, const char *why);
void session_request_resync(struct session *s);

/* store_notify_fn: one of the user's mailboxes changed. */
void session_store_notify(void *member, const char *mailbox);
/* store_listening_fn: a SELECT waiting for the user's changes to be heard
 * goes on (deferred, found again by id). */
void session_store_listening(void *member);
/* A SELECT starts waiting for that: it goes on after select_wait at the
 * latest. -1 when it does not wait (select_wait 0, out of memory). */
int session_wait_listening(struct session *s);

/* session_client.c: the client's bytes, command by command. */
void session_client_process(struct session *s);
/* A held command may go on (the resync is over). */
void session_client_release(struct session *s);
/* Our "OK Begin TLS negotiation" reached the client: start the handshake. */
void session_client_starttls_flushed(struct session *s);
/* session_upstream.c: the upstream's bytes, response by response. */
void session_upstream_process(struct session *s);
/* Pass on the upstream bytes that wait to go to the client (before a line of our own). */
void session_upstream_release_pending(struct session *s);
/* The session ends: flush what was read; 0 when no line may follow (cut inside a literal). */
int session_upstream_cut(struct session *s);
/* Note the tag, first word and resp-text of the response being read. */
void session_upstream_identify(struct session *s, const struct imap_tok *tok);
void session_upstream_start(struct session *s);

/* The busy state, allocated when NULL; NULL (and the session closing) when
 * out of memory. */
struct session_busy *session_busy(struct session *s);
/* Give the busy state back if nothing half-done refers to it (and no
 * processing is under way further up the stack): to the server's pool of
 * SESSION_BUSY_POOL, reused by the next session that needs one, or freed. */
void session_busy_put(struct session *s);
/* Free the pool (server_free). */
void session_busy_pool_free(struct server *srv);
#define SESSION_BUSY_POOL 16

const char *session_state_name(enum session_state st);

#define SESSION_OUT_HIGH (256 * 1024)	/* stop reading the peer above this */
#define SESSION_OUT_LOW (64 * 1024)	/* resume once drained to this */
#define SESSION_READ_HIGH (128 * 1024)	/* per-direction input cap */

#endif
