/* admin: the operators' HTTP endpoint: /metrics, /healthz, /sessions and session controls. */

/*
 *   GET  /metrics                 Prometheus text format 0.0.4 (metrics.c)
 *   GET  /healthz                 200 "ok", 503 while shutting down
 *   GET  /sessions                JSON array of this instance's live sessions
 *   GET  /sessions/<sid>          one session in full, with the client's view
 *   POST /sessions/<sid>/kick     end it (* BYE [UNAVAILABLE])
 *   POST /sessions/<sid>/resync   resync on its next trigger command
 *   GET  /trace, POST /trace      the trace spec in force; set it (spec=...)
 *   GET  /, /status, /status/...  the status pages (HTML, status.c)
 *
 * <sid> is "s42", "42" or "<instance>:s42". With admin_token set every request
 * needs "Authorization: Bearer <token>"; the pages a browser opens (GET only,
 * status_is_page()) also take it as ?token=, since a browser cannot add the
 * header to an address typed in. Bodies over 4 KiB get 413. While
 * Redis holds the state, this instance's address is kept in the instances
 * registry (store_register_instance) for imapfresh-ctl.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "admin.h"
#include "feed.h"
#include "json.h"
#include "log.h"
#include "metrics.h"
#include "resync.h"
#include "seqmap.h"
#include "server.h"
#include "session.h"
#include "status.h"
#include "store.h"
#include "trace.h"
#include "uidset.h"
#include "upgrade.h"

#define ADMIN_MAX_BODY 4096		/* larger request bodies get 413 */
#define ADMIN_MAX_HEADERS 8192
#define ADMIN_TIMEOUT_SECS 10		/* a stalled operator client is dropped */
#define ADMIN_REGISTER_SECS 10		/* registry refresh; ctl treats 60 s as gone */

struct admin {
	struct server *srv;
	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	struct event *ev_register;
	char address[320];	/* host:port as bound, for the registry */
};

/* --- JSON --- */

/* A JSON string, "" for NULL. Names come from clients and servers: bytes
 * that are not UTF-8 become U+FFFD so the document always parses. */
static void
admin_json_str(struct evbuffer *out, const char *s)
{
	json_write_string(out, s != NULL ? s : "");
}

/* ,"key": then the value written by the caller; first omits the comma. */
static void
admin_json_key(struct evbuffer *out, const char *key, int first)
{
	evbuffer_add_printf(out, "%s\"%s\":", first ? "" : ",", key);
}

static void
admin_json_kstr(struct evbuffer *out, const char *key, const char *value)
{
	admin_json_key(out, key, 0);
	if (value == NULL)
		evbuffer_add(out, "null", 4);
	else
		admin_json_str(out, value);
}

static void
admin_json_knum(struct evbuffer *out, const char *key, uint64_t value)
{
	admin_json_key(out, key, 0);
	evbuffer_add_printf(out, "%" PRIu64, value);
}

static void
admin_json_kbool(struct evbuffer *out, const char *key, int value)
{
	admin_json_key(out, key, 0);
	evbuffer_add_printf(out, "%s", value ? "true" : "false");
}

/* A UID set as a sequence set string, however long. */
static void
admin_json_kuids(struct evbuffer *out, const char *key, const struct uidset *set)
{
	size_t len = uidset_format(set, NULL, 0) + 1;
	char *buf = malloc(len);

	if (buf == NULL) {
		admin_json_kstr(out, key, NULL);
		return;
	}
	uidset_format(set, buf, len);
	admin_json_kstr(out, key, buf);
	free(buf);
}

/* --- sessions --- */

static const char *
admin_phase_name(enum resync_phase p)
{
	switch (p) {
	case RESYNC_NONE:
		return "none";
	case RESYNC_WAIT_QUIET:
		return "wait-quiet";
	case RESYNC_IDLE_DONE:
		return "idle-done";
	case RESYNC_CHECK:
		return "check";
	case RESYNC_ESCALATE:
		return "escalate";
	case RESYNC_IDLE_REENTER:
		return "idle-reenter";
	}
	return "?";
}


/* One session as a JSON object; full adds the view and the resync detail. */
static void
admin_json_session(struct evbuffer *out, const struct session *s, int full)
{
	const struct track *t = &s->track;
	const struct resync *r = &s->resync;
	char id[200];
	time_t now = time(NULL);
	uint64_t gen = t->suser != NULL && t->selected ? store_gen(t->suser, t->mailbox) : 0;
	const char *stale = (s->track.selected ? resync_why_stale(s) : NULL);

	snprintf(id, sizeof(id), "%s:%s", s->srv->instance, s->sid);
	evbuffer_add(out, "{", 1);
	admin_json_key(out, "id", 1);
	admin_json_str(out, id);
	admin_json_kstr(out, "sid", s->sid);
	admin_json_kstr(out, "instance", s->srv->instance);
	admin_json_kstr(out, "user", t->user[0] ? t->user : NULL);
	if (s->srv->feed != NULL)
		admin_json_kstr(out, "backend_id", feed_backend_id(s->srv->feed, t->user));
	admin_json_kstr(out, "client", s->client_addr);
	admin_json_kstr(out, "state", session_state_name(s->state));
	admin_json_kbool(out, "authenticated", s->authenticated);
	admin_json_kbool(out, "tls", s->client_tls && !s->client_tls_pending);
	admin_json_kstr(out, "mailbox", t->selected ? t->mailbox : NULL);
	admin_json_knum(out, "count", t->selected ? t->view.count : 0);
	admin_json_knum(out, "uidvalidity", t->uidvalidity);
	admin_json_knum(out, "uidnext", t->uidnext);
	admin_json_knum(out, "synced_gen", t->synced_gen);
	admin_json_knum(out, "gen", gen);
	admin_json_kbool(out, "possibly_stale", stale != NULL);
	admin_json_knum(out, "started", (uint64_t)s->started.tv_sec);
	admin_json_knum(out, "age", now > s->started.tv_sec ? (uint64_t)(now - s->started.tv_sec) : 0);
	admin_json_knum(out, "last_resync", (uint64_t)s->resync.last_done);
	admin_json_knum(out, "resyncs", s->resync.n_resyncs);
	admin_json_knum(out, "escalations", s->resync.n_escalations);
	admin_json_knum(out, "stale_detected", s->resync.n_stale);
	admin_json_kstr(out, "resync_phase", admin_phase_name(r->phase));
	admin_json_kbool(out, "traced", s->trace != NULL);
	if (full) {
		struct uidset known;

		admin_json_kstr(out, "stale_reason", stale);
		admin_json_kbool(out, "listener_tls", s->listener_tls);
		admin_json_kbool(out, "selected", t->selected);
		admin_json_kbool(out, "readonly", t->readonly);
		admin_json_kbool(out, "condstore", t->condstore);
		admin_json_knum(out, "highestmodseq", t->highestmodseq);
		admin_json_knum(out, "last_sync", (uint64_t)t->last_sync);
		admin_json_knum(out, "synced_epoch", t->synced_epoch);
		admin_json_knum(out, "epoch", server_epoch(s->srv));
		admin_json_kbool(out, "idling", s->idling);
		admin_json_kbool(out, "held", s->held);
		admin_json_kbool(out, "resync_requested", s->resync.requested);
		admin_json_knum(out, "inflight", s->n_inflight);
		/* The client's view: what its sequence numbers mean to it. */
		admin_json_key(out, "view", 0);
		evbuffer_add(out, "{", 1);
		admin_json_key(out, "count", 1);
		evbuffer_add_printf(out, "%u", t->view.count);
		admin_json_knum(out, "known", seqmap_known(&t->view));
		uidset_init(&known);
		if (seqmap_known_uids(&t->view, &known) == 0)
			admin_json_kuids(out, "uids", &known);
		else
			admin_json_kstr(out, "uids", NULL);
		uidset_free(&known);
		evbuffer_add(out, "}", 1);
		/* The last check: what UID SEARCH ALL said the mailbox held. */
		admin_json_key(out, "last_check", 0);
		if (s->resync.n_resyncs == 0) {
			evbuffer_add(out, "null", 4);
		} else {
			evbuffer_add(out, "{", 1);
			admin_json_key(out, "trigger", 1);
			admin_json_str(out, r->trigger);
			admin_json_kstr(out, "reason", r->reason);
			admin_json_knum(out, "gen_before", r->gen_before);
			admin_json_knum(out, "gen", r->gen);
			admin_json_knum(out, "server_count", r->truth.count);
			admin_json_kuids(out, "server_uids", &r->truth);
			evbuffer_add(out, "}", 1);
		}
	}
	evbuffer_add(out, "}", 1);
}

/* --- HTTP plumbing --- */

static const char *
admin_reason(int code)
{
	switch (code) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 503: return "Service Unavailable";
	default: return "Error";
	}
}

static void
admin_send(struct evhttp_request *req, int code, const char *type, struct evbuffer *body)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);

	evhttp_add_header(h, "Content-Type", type);
	evhttp_add_header(h, "Cache-Control", "no-store");
	evhttp_send_reply(req, code, admin_reason(code), body);
}

static void
admin_send_json(struct evhttp_request *req, int code, struct evbuffer *body)
{
	admin_send(req, code, "application/json", body);
}

static void
admin_error(struct evhttp_request *req, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
admin_error(struct evhttp_request *req, int code, const char *fmt, ...)
{
	struct evbuffer *out = evbuffer_new();
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (out == NULL) {
		evhttp_send_error(req, code, admin_reason(code));
		return;
	}
	evbuffer_add(out, "{\"error\":", 9);
	admin_json_str(out, msg);
	evbuffer_add(out, "}\n", 2);
	admin_send_json(req, code, out);
	evbuffer_free(out);
}

static int
admin_sha256(const char *data, size_t len, unsigned char md[32])
{
	unsigned int mdlen = 0;

	return EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) == 1 && mdlen == 32 ? 0 : -1;
}

/* Bearer token check in constant time: digests of equal length are compared,
 * so neither the token's content nor its length leaks through timing. A GET
 * of a status page may give it as ?token= instead (a browser's address). */
static int
admin_authorized(const struct admin *adm, struct evhttp_request *req, const char *path)
{
	const char *token = adm->srv->cfg.admin_token, *auth, *given = NULL, *query;
	unsigned char want[32], got[32];
	struct evkeyvalq kv;
	int ok = 0;

	if (token[0] == '\0')
		return 1;
	TAILQ_INIT(&kv);
	auth = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
	if (auth != NULL && strncasecmp(auth, "Bearer ", 7) == 0) {
		for (given = auth + 7; *given == ' '; given++)
			;
	} else if (auth == NULL && evhttp_request_get_command(req) == EVHTTP_REQ_GET &&
	    status_is_page(path) && evhttp_request_get_evhttp_uri(req) != NULL &&
	    (query = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req))) != NULL &&
	    evhttp_parse_query_str(query, &kv) == 0)
		given = evhttp_find_header(&kv, "token");
	if (given != NULL && admin_sha256(token, strlen(token), want) == 0 &&
	    admin_sha256(given, strlen(given), got) == 0)
		ok = CRYPTO_memcmp(want, got, sizeof(want)) == 0;
	evhttp_clear_headers(&kv);
	return ok;
}

static const char *
admin_method_name(enum evhttp_cmd_type m)
{
	return m == EVHTTP_REQ_GET ? "GET" : m == EVHTTP_REQ_POST ? "POST" : "other";
}

static void
admin_peer(struct evhttp_request *req, char *buf, size_t len)
{
	struct evhttp_connection *c = evhttp_request_get_connection(req);
	char *addr = NULL;
	ev_uint16_t port = 0;

	if (c != NULL)
		evhttp_connection_get_peer(c, &addr, &port);
	snprintf(buf, len, "%s:%u", addr ? addr : "?", (unsigned)port);
}

/* The request body, NUL-terminated (bounded by evhttp_set_max_body_size). */
static char *
admin_body(struct evhttp_request *req)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(req);
	size_t len = evbuffer_get_length(in);
	char *body = malloc(len + 1);

	if (body == NULL)
		return NULL;
	evbuffer_copyout(in, body, len);
	body[len] = '\0';
	return body;
}

/* --- handlers --- */

static void
admin_metrics(struct admin *adm, struct evhttp_request *req)
{
	struct evbuffer *out = evbuffer_new();

	if (out == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	metrics_render(adm->srv, out);
	admin_send(req, 200, "text/plain; version=0.0.4; charset=utf-8", out);
	evbuffer_free(out);
}

static void
admin_healthz(struct admin *adm, struct evhttp_request *req)
{
	struct evbuffer *out = evbuffer_new();
	int down = adm->srv->shutting_down;
	char pid[24];

	snprintf(pid, sizeof(pid), "%ld", (long)getpid());

	if (out == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	evbuffer_add_printf(out, "%s\n", down ? "shutting down" : "ok");
	/* Which process answers: it changes with an upgrade (upgrade.c). */
	evhttp_add_header(evhttp_request_get_output_headers(req), "X-Imapfresh-Pid", pid);
	admin_send(req, down ? 503 : 200, "text/plain; charset=utf-8", out);
	evbuffer_free(out);
}

static void
admin_sessions(struct admin *adm, struct evhttp_request *req)
{
	struct evbuffer *out = evbuffer_new();
	struct session *s;
	int first = 1;

	if (out == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	evbuffer_add(out, "[", 1);
	TAILQ_FOREACH(s, &adm->srv->sessions, entry) {
		if (s->state == SESSION_DEAD)
			continue;
		if (!first)
			evbuffer_add(out, ",", 1);
		evbuffer_add(out, "\n", 1);
		admin_json_session(out, s, 0);
		first = 0;
	}
	evbuffer_add(out, "\n]\n", 3);
	admin_send_json(req, 200, out);
	evbuffer_free(out);
}

/* "s42", "42" or "<instance>:s42"; NULL with a 404 sent when it is not here. */
static struct session *
admin_find_session(struct admin *adm, struct evhttp_request *req, const char *sid)
{
	const char *colon = strrchr(sid, ':'), *num = colon ? colon + 1 : sid;
	char *end;
	unsigned long long id;
	struct session *s;

	if (colon != NULL && ((size_t)(colon - sid) != strlen(adm->srv->instance) ||
	    strncmp(sid, adm->srv->instance, (size_t)(colon - sid)) != 0)) {
		admin_error(req, 404, "session %s is not on this instance (%s)", sid,
		    adm->srv->instance);
		return NULL;
	}
	if (*num == 's')
		num++;
	errno = 0;
	id = strtoull(num, &end, 10);
	if (*num < '0' || *num > '9' || *end != '\0' || errno != 0) {
		admin_error(req, 404, "not a session id: %s (expected s<number>)", sid);
		return NULL;
	}
	if ((s = session_find(adm->srv, id)) == NULL)
		admin_error(req, 404, "no live session s%llu on %s", id, adm->srv->instance);
	return s;
}

static void
admin_session(struct admin *adm, struct evhttp_request *req, const char *sid, const char *action)
{
	enum evhttp_cmd_type m = evhttp_request_get_command(req);
	struct session *s;
	struct evbuffer *out;
	char peer[96];

	if (action == NULL ? m != EVHTTP_REQ_GET : m != EVHTTP_REQ_POST) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
		    action == NULL ? "GET" : "POST");
		admin_error(req, 405, "%s needs %s", action ? action : "a session",
		    action == NULL ? "GET" : "POST");
		return;
	}
	if (action != NULL && strcmp(action, "kick") != 0 && strcmp(action, "resync") != 0) {
		admin_error(req, 404, "unknown session action: %s (kick or resync)", action);
		return;
	}
	if ((s = admin_find_session(adm, req, sid)) == NULL)
		return;
	if ((out = evbuffer_new()) == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	if (action == NULL) {
		admin_json_session(out, s, 1);
		evbuffer_add(out, "\n", 1);
		admin_send_json(req, 200, out);
		evbuffer_free(out);
		return;
	}
	admin_peer(req, peer, sizeof(peer));
	evbuffer_add_printf(out, "{\"ok\":true,\"action\":\"%s\",\"id\":\"", action);
	evbuffer_add_printf(out, "%s:%s\"", adm->srv->instance, s->sid);
	if (strcmp(action, "kick") == 0) {
		log_msg(LOG_LEVEL_NOTICE, s->sid, "kicked by the operator (admin, from %s)", peer);
		evbuffer_add_printf(out, ",\"message\":\"session closed\"}\n");
		session_kick(s, "kicked by the operator");
	} else {
		log_msg(LOG_LEVEL_INFO, s->sid, "admin: resync requested from %s", peer);
		session_request_resync(s);
		evbuffer_add_printf(out, ",\"message\":\"%s\"}\n", s->track.selected ?
		    "resync on the next trigger command" :
		    "resync on the next trigger command once a mailbox is selected");
	}
	admin_send_json(req, 200, out);
	evbuffer_free(out);
}

/* spec from the query (?spec=...), a form body (spec=...) or a raw body. */
static char *
admin_trace_spec(struct evhttp_request *req)
{
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *query = uri ? evhttp_uri_get_query(uri) : NULL, *v;
	struct evkeyvalq kv;
	char *body, *spec = NULL;
	size_t len;

	TAILQ_INIT(&kv);
	if (query != NULL && evhttp_parse_query_str(query, &kv) == 0 &&
	    (v = evhttp_find_header(&kv, "spec")) != NULL) {
		spec = strdup(v);
		evhttp_clear_headers(&kv);
		return spec;
	}
	evhttp_clear_headers(&kv);
	if ((body = admin_body(req)) == NULL)
		return NULL;
	if (strncmp(body, "spec=", 5) == 0) {
		if (evhttp_parse_query_str(body, &kv) == 0 && (v = evhttp_find_header(&kv, "spec")))
			spec = strdup(v);
		evhttp_clear_headers(&kv);
		free(body);
		return spec;
	}
	/* A raw body: the spec itself, trimmed. */
	len = strlen(body);
	while (len > 0 && strchr(" \t\r\n", body[len - 1]))
		body[--len] = '\0';
	spec = strdup(body + strspn(body, " \t\r\n"));
	free(body);
	return spec;
}

static void
admin_trace(struct admin *adm, struct evhttp_request *req)
{
	enum evhttp_cmd_type m = evhttp_request_get_command(req);
	struct evbuffer *out;
	char err[512] = "", peer[96], *spec;

	if (m != EVHTTP_REQ_GET && m != EVHTTP_REQ_POST) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, POST");
		admin_error(req, 405, "/trace takes GET or POST");
		return;
	}
	if (m == EVHTTP_REQ_POST) {
		if ((spec = admin_trace_spec(req)) == NULL || spec[0] == '\0') {
			free(spec);
			admin_error(req, 400, "give spec=off|all|user NAME|client ADDR [bodies]");
			return;
		}
		if (trace_set(adm->srv, spec, err, sizeof(err)) < 0) {
			admin_error(req, 400, "%s", err[0] ? err : "bad trace spec");
			free(spec);
			return;
		}
		admin_peer(req, peer, sizeof(peer));
		log_notice("admin: trace set to \"%s\" (from %s)", trace_get(adm->srv), peer);
		free(spec);
	}
	if ((out = evbuffer_new()) == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	evbuffer_add(out, "{\"instance\":", 12);
	admin_json_str(out, adm->srv->instance);
	evbuffer_add(out, ",\"trace\":", 9);
	admin_json_str(out, trace_get(adm->srv));
	evbuffer_add(out, "}\n", 2);
	admin_send_json(req, 200, out);
	evbuffer_free(out);
}

/* A parameter of the query string or of a form body. */
static char *
admin_param(struct evhttp_request *req, const char *body, const char *name)
{
	struct evkeyvalq kv;
	const char *q = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req)), *v = NULL;
	char *out = NULL;

	TAILQ_INIT(&kv);
	if (q != NULL && evhttp_parse_query_str(q, &kv) == 0 && (v = evhttp_find_header(&kv, name)))
		out = strdup(v);
	evhttp_clear_headers(&kv);
	if (out == NULL && body != NULL && evhttp_parse_query_str(body, &kv) == 0 &&
	    (v = evhttp_find_header(&kv, name)))
		out = strdup(v);
	evhttp_clear_headers(&kv);
	return out;
}

/*
 * POST /notify user=NAME[&mailbox=NAME]: a change imapfresh could not see
 * (a delivery, webmail, a client straight to the server). The user's
 * sessions, on every instance, resync at their next trigger command; idling
 * ones are refreshed now. Without a mailbox, every mailbox of the user.
 * PUT (or POST) with a JSON body {"user":...,"folder":...} is what Dovecot's
 * push_notification "ox" driver sends on a new message.
 */
static void
admin_notify(struct admin *adm, struct evhttp_request *req)
{
	char *body = NULL, *user = NULL, *mailbox = NULL, canon[2 * COMMAND_ARG_MAX + 1] = "";
	char peer[96], detail[160];
	struct evbuffer *out;
	int local;

	if (evhttp_request_get_command(req) != EVHTTP_REQ_POST &&
	    evhttp_request_get_command(req) != EVHTTP_REQ_PUT) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "POST, PUT");
		admin_error(req, 405, "/notify takes POST or PUT");
		return;
	}
	body = admin_body(req);
	if (body != NULL && body[strspn(body, " \t\r\n")] == '{') {
		user = json_string_member(body, "user");
		if ((mailbox = json_string_member(body, "folder")) == NULL)
			mailbox = json_string_member(body, "mailbox");
	} else {
		user = admin_param(req, body, "user");
		mailbox = admin_param(req, body, "mailbox");
	}
	if (user == NULL || user[0] == '\0' || strlen(user) > 255 ||
	    (mailbox != NULL && strlen(mailbox) > COMMAND_ARG_MAX)) {
		admin_error(req, 400, "give user=NAME (and mailbox=NAME, or none for every mailbox)");
		goto done;
	}
	if (mailbox != NULL)
		track_canonical_mailbox(mailbox, 1, canon, sizeof(canon));	/* UTF-8 */
	admin_peer(req, peer, sizeof(peer));
	snprintf(detail, sizeof(detail), "notify from %s", peer);
	local = store_notify_change(adm->srv->store, user, canon, detail);
	adm->srv->stats.notifications++;
	log_info("admin: notify %s \"%s\" from %s: %d session(s) here", user,
	    canon[0] ? canon : "(every mailbox)", peer, local);
	if ((out = evbuffer_new()) == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		goto done;
	}
	evbuffer_add(out, "{\"instance\":", 12);
	admin_json_str(out, adm->srv->instance);
	admin_json_kstr(out, "user", user);
	admin_json_kstr(out, "mailbox", canon);
	admin_json_knum(out, "sessions_here", (uint64_t)local);
	admin_json_kbool(out, "published", strcmp(adm->srv->cfg.state, "memory") != 0);
	evbuffer_add(out, "}\n", 2);
	admin_send_json(req, 200, out);
	evbuffer_free(out);
done:
	free(body);
	free(user);
	free(mailbox);
}

static void
admin_request_cb(struct evhttp_request *req, void *arg)
{
	struct admin *adm = arg;
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *raw = uri ? evhttp_uri_get_path(uri) : NULL;
	enum evhttp_cmd_type m = evhttp_request_get_command(req);
	char *path, *rest, *slash;
	size_t len = 0;

	if ((path = evhttp_uridecode(raw && raw[0] ? raw : "/", 0, &len)) == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	if (strlen(path) != len) {
		admin_error(req, 400, "NUL in the path");
		goto out;
	}
	if (!admin_authorized(adm, req, path)) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate",
		    "Bearer realm=\"imapfresh\"");
		admin_error(req, 401, status_is_page(path) ?
		    "a valid token is required: Authorization: Bearer, or ?token= on this page" :
		    "a valid Authorization: Bearer token is required");
		goto out;
	}
	log_debug("admin: %s %s", admin_method_name(m), path);
	if (strcmp(path, "/metrics") == 0 || strcmp(path, "/healthz") == 0 ||
	    strcmp(path, "/sessions") == 0 || strcmp(path, "/sessions/") == 0) {
		if (m != EVHTTP_REQ_GET) {
			evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET");
			admin_error(req, 405, "%s takes GET", path);
		} else if (path[1] == 'm')
			admin_metrics(adm, req);
		else if (path[1] == 'h')
			admin_healthz(adm, req);
		else
			admin_sessions(adm, req);
	} else if (strcmp(path, "/trace") == 0) {
		admin_trace(adm, req);
	} else if (strcmp(path, "/notify") == 0) {
		admin_notify(adm, req);
	} else if (strncmp(path, "/sessions/", 10) == 0) {
		rest = path + 10;
		if ((slash = strchr(rest, '/')) != NULL)
			*slash++ = '\0';
		admin_session(adm, req, rest, slash);
	} else if (!status_request(adm->srv, req, path, adm->address)) {
		admin_error(req, 404, "no such endpoint: %s (try /status, /metrics, /healthz, "
		    "/sessions, /trace, /notify)", path);
	}
out:
	free(path);
}

/* --- the instances registry --- */

static void
admin_register_cb(evutil_socket_t fd, short what, void *arg)
{
	struct admin *adm = arg;
	struct timeval tv = { ADMIN_REGISTER_SECS, 0 };

	/* First run after daemonising, so the pid is the daemon's. */
	store_register_instance(adm->srv->store, adm->address, (int64_t)adm->srv->started, 1);
	evtimer_add(adm->ev_register, &tv);
}

/* The address others should dial: the bound one, a wildcard replaced by the
 * host name (the port may have been 0 in the configuration). */
static void
admin_bound_address(struct admin *adm, int fd)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[INET6_ADDRSTRLEN] = "", name[256];
	unsigned port = 0;
	int wildcard = 0;

	if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
		snprintf(adm->address, sizeof(adm->address), "%s", adm->srv->cfg.admin_listen);
		return;
	}
	if (ss.ss_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
		wildcard = sin->sin_addr.s_addr == htonl(INADDR_ANY);
		inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
		port = ntohs(sin->sin_port);
	} else if (ss.ss_family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
		wildcard = IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr);
		inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
		port = ntohs(sin6->sin6_port);
	}
	if (wildcard && gethostname(name, sizeof(name) - 1) == 0) {
		name[sizeof(name) - 1] = '\0';
		snprintf(adm->address, sizeof(adm->address), "%s:%u", name, port);
	} else
		snprintf(adm->address, sizeof(adm->address), strchr(host, ':') ? "[%s]:%u" : "%s:%u",
		    host, port);
}

/* Our own socket rather than evhttp_bind_socket(), for an error that says why. */
int
admin_bind(const char *spec, int port_offset, char *err, size_t errlen)
{
	struct config_addr a;
	struct evutil_addrinfo hints = { 0 }, *res = NULL;
	int fd, one = 1, gai;

	if (config_parse_addr(spec, NULL, &a) < 0) {
		snprintf(err, errlen, "admin_listen %s: expected host:port", spec);
		return -1;
	}
	/* Worker N serves on the configured port + N (a port 0 stays "any"). */
	if (port_offset > 0 && atoi(a.port) > 0)
		snprintf(a.port, sizeof(a.port), "%d", atoi(a.port) + port_offset);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = EVUTIL_AI_PASSIVE;
	if ((gai = evutil_getaddrinfo(a.host[0] ? a.host : NULL, a.port, &hints, &res)) != 0) {
		snprintf(err, errlen, "admin_listen %s: %s", spec, evutil_gai_strerror(gai));
		return -1;
	}
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(fd, res->ai_addr, (socklen_t)res->ai_addrlen) < 0 || listen(fd, 64) < 0) {
		int e = errno;
		/* Most often a second imapfresh on the host with the same default. */
		snprintf(err, errlen, "admin_listen %s%s%s: %s%s", spec,
		    port_offset > 0 ? ", worker's port " : "", port_offset > 0 ? a.port : "",
		    strerror(e), e == EADDRINUSE ? " (another imapfresh on this host? give each "
		    "instance its own admin_listen = host:port, or admin_listen = (empty) for none)" : "");
		if (fd >= 0)
			close(fd);
		evutil_freeaddrinfo(res);
		return -1;
	}
	evutil_freeaddrinfo(res);
	return fd;
}

int
admin_start(struct server *srv, char *err, size_t errlen)
{
	struct admin *adm;
	char key[320];
	int fd;

	if (srv->cfg.admin_listen[0] == '\0')
		return 0;
	snprintf(key, sizeof(key), "admin=%s", srv->cfg.admin_listen);
	if ((fd = upgrade_take_fd(key)) >= 0)
		evutil_make_socket_nonblocking(fd);	/* passed on by the process we replace */
	else if ((fd = admin_bind(srv->cfg.admin_listen, srv->worker, err, errlen)) < 0)
		return -1;
	if ((adm = calloc(1, sizeof(*adm))) == NULL || (adm->http = evhttp_new(srv->base)) == NULL ||
	    (adm->bound = evhttp_accept_socket_with_handle(adm->http, fd)) == NULL ||
	    (adm->ev_register = evtimer_new(srv->base, admin_register_cb, adm)) == NULL) {
		snprintf(err, errlen, "admin_listen %s: cannot set up the HTTP endpoint",
		    srv->cfg.admin_listen);
		if (adm != NULL && adm->http != NULL)
			evhttp_free(adm->http);	/* closes fd once accepted */
		else
			close(fd);
		free(adm);
		return -1;
	}
	adm->srv = srv;
	srv->admin = adm;
	admin_bound_address(adm, fd);
	evhttp_set_max_body_size(adm->http, ADMIN_MAX_BODY);
	evhttp_set_max_headers_size(adm->http, ADMIN_MAX_HEADERS);
	evhttp_set_timeout(adm->http, ADMIN_TIMEOUT_SECS);
	evhttp_set_allowed_methods(adm->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_PUT);
	evhttp_set_gencb(adm->http, admin_request_cb, adm);
	{
		struct timeval now = { 0, 0 };
		evtimer_add(adm->ev_register, &now);
	}
	log_notice("admin endpoint on http://%s/ (/metrics, /healthz, /sessions)%s", adm->address,
	    srv->cfg.admin_token[0] ? ", token required" : "");
	return 0;
}

/* deregister 0: an upgrade's new process took the endpoint and the
 * registry entry over (same instance name): no HDEL. */
static void
admin_end(struct server *srv, int deregister)
{
	struct admin *adm = srv->admin;

	if (adm == NULL)
		return;
	if (deregister && srv->store != NULL)
		store_register_instance(srv->store, adm->address, (int64_t)srv->started, 0);
	status_stop(srv);
	event_free(adm->ev_register);
	evhttp_free(adm->http);
	free(adm);
	srv->admin = NULL;
}

void
admin_stop(struct server *srv)
{
	admin_end(srv, 1);
}

int
admin_listener_fd(const struct server *srv)
{
	return srv->admin != NULL ? (int)evhttp_bound_socket_get_fd(srv->admin->bound) : -1;
}

void
admin_release(struct server *srv)
{
	admin_end(srv, 0);
}
