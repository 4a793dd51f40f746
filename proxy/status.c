/* status: the admin endpoint's status pages (HTML): live sessions, health and sync events of every instance, one session's view. */

/*
 *   GET /, /status            every live instance: health, sessions, recent sync events
 *   GET /status/part          this instance's rows only (what the page asks the others for)
 *   GET /status/session/<id>  one session of this instance: its view, resync state, trace
 *
 * The page is rendered here, on the server, escaped here; its inline script
 * only fetches the same page again every few seconds and swaps the live part
 * in (DOMParser: nothing fetched is run), adds ?token= to links, and posts
 * the trace and resync buttons with the bearer token. The other instances
 * are found in the instances registry (Redis) and asked for /status/part
 * with the same token; one that does not answer within STATUS_PEER_SECS is
 * shown as unreachable. Every value goes through status_esc(): user and
 * mailbox names are whatever clients sent. A per-response CSP nonce means
 * nothing but our own script and style could run even if escaping failed.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <openssl/rand.h>

#include "config.h"
#include "events.h"
#include "feed.h"
#include "pending.h"
#include "resync.h"
#include "seqmap.h"
#include "server.h"
#include "session.h"
#include "status.h"
#include "store.h"
#include "trace.h"
#include "uidset.h"
#include "utf8.h"

#define STATUS_PEER_SECS 3		/* another instance's rows wait this long at most */
#define STATUS_PEER_MAX_BODY (4 << 20)
#define STATUS_REFRESH_SECS 5		/* default; ?refresh=N, 1 to 3600 */
#define STATUS_REGISTRY_GONE 60		/* registry entries older than this are gone (as ctl) */
#define STATUS_UIDS_SHOWN 400		/* longest known-UIDs string shown */
#define STATUS_MARK_SESSIONS "\n<!--imapfresh:sessions-->\n"
#define STATUS_MARK_EVENTS "\n<!--imapfresh:events-->\n"

/* --- escaping and small pieces --- */

/* Text for an element or a quoted attribute: & < > " ' escaped, control
 * bytes and bytes that are not UTF-8 shown as U+FFFD. */
static void
status_esc(struct evbuffer *out, const char *s)
{
	const unsigned char *p = (const unsigned char *)(s ? s : "");
	size_t n;

	while (*p) {
		switch (*p) {
		case '&': evbuffer_add(out, "&amp;", 5); p++; continue;
		case '<': evbuffer_add(out, "&lt;", 4); p++; continue;
		case '>': evbuffer_add(out, "&gt;", 4); p++; continue;
		case '"': evbuffer_add(out, "&quot;", 6); p++; continue;
		case '\'': evbuffer_add(out, "&#39;", 5); p++; continue;
		}
		if (*p < 0x20 || *p == 0x7f) {
			evbuffer_add(out, "\xef\xbf\xbd", 3);
			p++;
		} else if (*p < 0x80) {
			evbuffer_add(out, p++, 1);
		} else if ((n = utf8_len(p, 4)) > 0) {
			evbuffer_add(out, p, n);
			p += n;
		} else {
			evbuffer_add(out, "\xef\xbf\xbd", 3);
			p++;
		}
	}
}

/* <td class="cls">escaped text</td>; NULL or "" shows a dash. */
static void
status_td(struct evbuffer *out, const char *cls, const char *text)
{
	evbuffer_add_printf(out, "<td class=\"%s\">", cls);
	if (text == NULL || text[0] == '\0')
		evbuffer_add(out, "\xe2\x80\x93", 3);
	else
		status_esc(out, text);
	evbuffer_add(out, "</td>", 5);
}

/* "12 s ago", "3 min ago", ... or "never" for 0. */
static void
status_ago(char *buf, size_t len, time_t now, time_t t)
{
	long d = (long)(now - t);

	if (t == 0)
		snprintf(buf, len, "never");
	else if (d < 1)
		snprintf(buf, len, "just now");
	else if (d < 120)
		snprintf(buf, len, "%ld s ago", d);
	else if (d < 7200)
		snprintf(buf, len, "%ld min ago", d / 60);
	else if (d < 172800)
		snprintf(buf, len, "%ld h ago", d / 3600);
	else
		snprintf(buf, len, "%ld d ago", d / 86400);
}

/* "2 d 3 h", "5 min", "12 s": how long something has been up. */
static void
status_span(char *buf, size_t len, long d)
{
	if (d < 120)
		snprintf(buf, len, "%ld s", d < 0 ? 0 : d);
	else if (d < 7200)
		snprintf(buf, len, "%ld min", d / 60);
	else if (d < 172800)
		snprintf(buf, len, "%ld h %ld min", d / 3600, d / 60 % 60);
	else
		snprintf(buf, len, "%ld d %ld h", d / 86400, d / 3600 % 24);
}

static void
status_utc(char *buf, size_t len, time_t t)
{
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(buf, len, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

static const char *
status_phase_name(enum resync_phase p)
{
	switch (p) {
	case RESYNC_NONE: return "none";
	case RESYNC_WAIT_QUIET: return "wait-quiet";
	case RESYNC_IDLE_DONE: return "idle-done";
	case RESYNC_CHECK: return "check";
	case RESYNC_ESCALATE: return "escalate";
	case RESYNC_IDLE_REENTER: return "idle-reenter";
	}
	return "?";
}

/* --- this instance's rows --- */

/* One <tr> of the instances table: who we are and what we depend on. */
static void
status_health_row(struct server *srv, struct evbuffer *out, const char *self, time_t now)
{
	const struct server_stats *st = &srv->stats;
	struct store_stats ss;
	struct feed_stats fs;
	char buf[800], ago[40], addr[300];

	evbuffer_add(out, "<tr class=\"instance\" data-instance=\"", 36);
	status_esc(out, srv->instance);
	evbuffer_add(out, "\">", 2);
	status_td(out, "name", srv->instance);
	status_td(out, "admin", self);
	status_span(ago, sizeof(ago), (long)(now - srv->started));
	snprintf(buf, sizeof(buf), "%s%s", ago, srv->shutting_down ? ", shutting down" : "");
	status_td(out, srv->shutting_down ? "up bad" : "up", buf);
	snprintf(buf, sizeof(buf), "%u", srv->n_sessions);
	status_td(out, "count", buf);

	/* The upstream: what the last connection attempt came to. */
	config_fmt_addr(&srv->cfg.upstream, addr, sizeof(addr));
	if (st->upstream_last_failure != 0 && st->upstream_last_failure >= st->upstream_last_ready) {
		status_ago(ago, sizeof(ago), now, st->upstream_last_failure);
		snprintf(buf, sizeof(buf), "%s failing (%s, %s)", addr, st->upstream_last_error, ago);
		status_td(out, "upstream bad", buf);
	} else if (st->upstream_last_ready != 0) {
		status_ago(ago, sizeof(ago), now, st->upstream_last_ready);
		snprintf(buf, sizeof(buf), "%s ok (last connection ready %s)", addr, ago);
		status_td(out, "upstream ok", buf);
	} else {
		snprintf(buf, sizeof(buf), "%s (no connection yet)", addr);
		status_td(out, "upstream", buf);
	}

	store_get_stats(srv->store, &ss);
	if (!ss.redis)
		status_td(out, "redis", "not used (state = memory)");
	else {
		snprintf(buf, sizeof(buf), "%s (%" PRIu64 " errors, %" PRIu64 " reconnects)",
		    ss.connected ? "connected" : "DOWN", ss.errors, ss.reconnects);
		status_td(out, ss.connected ? "redis ok" : "redis bad", buf);
	}

	feed_get_stats(srv->feed, &fs);
	if (!fs.configured)
		status_td(out, "feed", "none");
	else {
		snprintf(buf, sizeof(buf), "%s (%" PRIu64 " events, %" PRIu64 " losses)",
		    fs.connected ? "subscribed" : "LOST", fs.events, fs.losses);
		status_td(out, fs.connected ? "feed ok" : "feed bad", buf);
	}
	status_td(out, "trace", trace_get(srv));
	evbuffer_add(out, "</tr>\n", 6);
}

/* How far the client's view is behind its mailbox, and why we think so. */
static void
status_behind(const struct session *s, char *buf, size_t len, int *bad)
{
	const struct track *t = &s->track;
	const char *why;
	uint64_t gen;

	*bad = 0;
	if (!t->selected || t->suser == NULL) {
		snprintf(buf, len, "no mailbox selected");
		return;
	}
	gen = store_gen(t->suser, t->mailbox);
	why = resync_why_stale(s);
	if (why == NULL && !pending_any(&t->pending)) {
		snprintf(buf, len, "in sync (generation %" PRIu64 ")", gen);
		return;
	}
	*bad = 1;
	if (why != NULL && gen > t->synced_gen)
		snprintf(buf, len, "%" PRIu64 " change%s behind: %s", gen - t->synced_gen,
		    gen - t->synced_gen == 1 ? "" : "s", why);
	else if (why != NULL)
		snprintf(buf, len, "possibly stale: %s", why);
	else
		snprintf(buf, len, "%u expunge%s not told yet", pending_count(&t->pending),
		    pending_count(&t->pending) == 1 ? "" : "s");
}

/* The last resync and what came of it. */
static void
status_last_resync(const struct session *s, char *buf, size_t len, time_t now)
{
	const struct resync *r = &s->resync;
	char ago[40];

	if (r->last_step[0] == '\0' && r->last_done == 0) {
		snprintf(buf, len, "none yet");
		return;
	}
	status_ago(ago, sizeof(ago), now, r->last_step_at ? r->last_step_at : r->last_done);
	snprintf(buf, len, "%s: %s (%" PRIu64 " resync%s, %" PRIu64 " stale)", ago,
	    r->last_step[0] ? r->last_step : "done", r->n_resyncs, r->n_resyncs == 1 ? "" : "s",
	    r->n_stale);
}

/* A link to a session's page: relative here, absolute (base) for the rows
 * another instance shows. class tok: the script adds ?token= to it. */
static void
status_session_link(struct server *srv, struct evbuffer *out, const struct session *s,
    const char *base)
{
	evbuffer_add(out, "<td class=\"id\"><a class=\"tok\" href=\"", 36);
	status_esc(out, base);
	evbuffer_add_printf(out, "/status/session/%s\">", s->sid);
	status_esc(out, srv->instance);
	evbuffer_add_printf(out, ":%s</a></td>", s->sid);
}

static void
status_session_rows(struct server *srv, struct evbuffer *out, const char *base, time_t now)
{
	struct session *s;
	char buf[400], age[40];
	int bad;

	TAILQ_FOREACH(s, &srv->sessions, entry) {
		if (s->state == SESSION_DEAD)
			continue;
		evbuffer_add_printf(out, "<tr class=\"session\" data-sid=\"");
		status_esc(out, srv->instance);
		evbuffer_add_printf(out, ":%s\">", s->sid);
		status_session_link(srv, out, s, base);
		status_td(out, "user", s->track.user);
		status_td(out, "client", s->client_addr);
		status_td(out, "mailbox", s->track.selected ? s->track.mailbox : NULL);
		status_td(out, "state", session_state_name(s->state));
		status_behind(s, buf, sizeof(buf), &bad);
		status_td(out, bad ? "behind bad" : "behind", buf);
		status_last_resync(s, buf, sizeof(buf), now);
		status_td(out, "resync", buf);
		status_span(age, sizeof(age), (long)(now - s->started.tv_sec));
		status_td(out, "age", age);
		evbuffer_add(out, "</tr>\n", 6);
	}
}

static void
status_event_rows(struct server *srv, struct evbuffer *out)
{
	const struct events_recent *e;
	char gens[80];
	size_t i;

	for (i = 0; (e = events_recent(srv, i)) != NULL; i++) {
		evbuffer_add_printf(out, "<tr class=\"event\" data-t=\"%" PRIu64 "\">", e->at_ms);
		status_td(out, "time", e->time);
		status_td(out, "session", e->session);
		status_td(out, "user", e->user);
		status_td(out, "mailbox", e->mailbox);
		status_td(out, strcmp(e->step, "in-sync") == 0 ? "step ok" :
		    strcmp(e->step, "check") == 0 || strcmp(e->step, "idle-refresh") == 0 ? "step" :
		    "step bad", e->step);
		status_td(out, "trigger", e->trigger);
		status_td(out, "reason", e->reason);
		snprintf(gens, sizeof(gens), "%" PRIu64 " \xe2\x86\x92 %" PRIu64, e->gen_synced,
		    e->gen_now);
		status_td(out, "gen", gens);
		status_td(out, "sent", e->sent);
		evbuffer_add(out, "</tr>\n", 6);
	}
}

/* --- the page's frame --- */

static const char status_css[] =
	"body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}"
	"h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}"
	"table{border-collapse:collapse;width:100%;background:#fff}"
	"th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}"
	"th{background:#eee}td.bad{color:#a00;font-weight:600}td.ok{color:#060}"
	"tr.unreachable td{color:#a00}.muted{color:#777}#note{margin-left:1em}"
	"dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{color:#555}"
	"dd{margin:0;word-break:break-all}button{margin-right:.5em}"
	"td.time,td.id,td.state,td.age,td.up,td.gen,td.step,td.session,td.trigger{white-space:nowrap}";

/* What the script does; the page stays whole without it. */
static const char status_js[] =
	"(function(){"
	"var q=new URLSearchParams(location.search),tok=q.get('token'),"
	"secs=Math.min(3600,Math.max(1,parseInt(q.get('refresh')||'%d',10)||%d)),"
	"note=document.getElementById('note'),auto=document.getElementById('auto');"
	"function say(t){note.textContent=t;}"
	"function fix(root){"
	/* ?token= onto our links, so following one keeps working */
	"if(tok)root.querySelectorAll('a.tok').forEach(function(a){"
	"var u=new URL(a.getAttribute('href'),location.href);u.searchParams.set('token',tok);"
	"a.href=u.toString();});"
	/* every instance's events, newest first */
	"var tb=root.querySelector('#events tbody');if(tb){"
	"Array.prototype.slice.call(tb.rows).sort(function(a,b){"
	"return (+b.dataset.t||0)-(+a.dataset.t||0);}).forEach(function(r){tb.appendChild(r);});}"
	"root.querySelectorAll('button[data-post]').forEach(function(b){"
	"b.addEventListener('click',function(){post(b.dataset.post,b.dataset.body||'');});});}"
	"function hdrs(){var h={};if(tok)h['Authorization']='Bearer '+tok;return h;}"
	"function post(path,body){var h=hdrs();"
	"h['Content-Type']='application/x-www-form-urlencoded';"
	"fetch(path,{method:'POST',headers:h,body:body,cache:'no-store'})"
	".then(function(r){return r.text().then(function(t){"
	"say((r.ok?'done: ':'refused: ')+t.slice(0,200));refresh(true);});})"
	".catch(function(e){say('failed: '+e.message);});}"
	"var timer=null;"
	"function later(){clearTimeout(timer);timer=setTimeout(function(){refresh(false);},secs*1000);}"
	"function refresh(now){if(!now&&!auto.checked)return later();"
	"fetch(location.href,{cache:'no-store',headers:hdrs()}).then(function(r){"
	"if(!r.ok)throw new Error('HTTP '+r.status);return r.text();}).then(function(t){"
	"var d=new DOMParser().parseFromString(t,'text/html'),n=d.getElementById('live');"
	"if(!n)throw new Error('no live part in the answer');"
	"n=document.adoptNode(n);fix(n);document.getElementById('live').replaceWith(n);"
	"document.body.dataset.refreshed=String(+(document.body.dataset.refreshed||0)+1);"
	"say('updated '+new Date().toLocaleTimeString());"
	"}).catch(function(e){say('refresh failed: '+e.message+' (showing older data)');})"
	".then(later);}"
	"fix(document);auto.addEventListener('change',later);"
	"say('refreshing every '+secs+' s');later();"
	"})();";

static void
status_nonce(char *buf, size_t len)
{
	unsigned char r[16];
	size_t i;

	if (RAND_bytes(r, sizeof(r)) != 1)	/* never in practice; a nonce still differs */
		for (i = 0; i < sizeof(r); i++)
			r[i] = (unsigned char)(rand() ^ (int)time(NULL));
	for (i = 0; i < sizeof(r) && 2 * i + 2 < len; i++)
		snprintf(buf + 2 * i, 3, "%02x", r[i]);
}

static void
status_head(struct server *srv, struct evbuffer *out, const char *nonce, const char *title)
{
	evbuffer_add_printf(out, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
	    "<meta name=\"viewport\" content=\"width=device-width\"><title>");
	status_esc(out, title);
	evbuffer_add_printf(out, "</title><style nonce=\"%s\">%s</style></head>\n<body>\n"
	    "<header><h1>", nonce, status_css);
	status_esc(out, title);
	evbuffer_add_printf(out, "</h1><p class=\"muted\">served by <b>");
	status_esc(out, srv->instance);
	evbuffer_add_printf(out, "</b> \xc2\xb7 <a class=\"tok\" href=\"/status\">all "
	    "sessions</a> \xc2\xb7 <label><input type=\"checkbox\" id=\"auto\" checked> "
	    "refresh</label><span id=\"note\"></span></p></header>\n");
}

/* The part the script swaps in, stamped with when it was made. */
static void
status_main(struct evbuffer *out)
{
	char now[40];

	status_utc(now, sizeof(now), time(NULL));
	evbuffer_add_printf(out, "<main id=\"live\">\n<p class=\"muted asof\">as of %s</p>\n", now);
}

static void
status_tail(struct evbuffer *out, const char *nonce)
{
	evbuffer_add_printf(out, "<script nonce=\"%s\">", nonce);
	evbuffer_add_printf(out, status_js, STATUS_REFRESH_SECS, STATUS_REFRESH_SECS);
	evbuffer_add_printf(out, "</script>\n</body></html>\n");
}

static void
status_send(struct evhttp_request *req, int code, const char *reason, const char *type,
    const char *nonce, struct evbuffer *body)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);
	char csp[300];

	evhttp_add_header(h, "Content-Type", type);
	evhttp_add_header(h, "Cache-Control", "no-store");
	evhttp_add_header(h, "X-Content-Type-Options", "nosniff");
	/* The token may be in the address: never send it on. */
	evhttp_add_header(h, "Referrer-Policy", "no-referrer");
	snprintf(csp, sizeof(csp), "default-src 'none'; script-src 'nonce-%s'; style-src "
	    "'nonce-%s'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
	    "frame-ancestors 'none'", nonce, nonce);
	evhttp_add_header(h, "Content-Security-Policy", csp);
	evhttp_send_reply(req, code, reason, body);
}

/* An HTML page that only says something (an unknown session...). */
static void
status_message(struct server *srv, struct evhttp_request *req, int code, const char *reason,
    const char *title, const char *text)
{
	struct evbuffer *out = evbuffer_new();
	char nonce[40];

	if (out == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	status_nonce(nonce, sizeof(nonce));
	status_head(srv, out, nonce, title);
	status_main(out);
	evbuffer_add(out, "<p class=\"message\">", 20);
	status_esc(out, text);
	evbuffer_add(out, "</p></main>\n", 12);
	status_tail(out, nonce);
	status_send(req, code, reason, "text/html; charset=utf-8", nonce, out);
	evbuffer_free(out);
}

/* --- the overview, gathered from every instance --- */

struct status_fetch;

struct status_peer {
	struct status_fetch *f;
	char instance[128];
	char address[320];
	struct evhttp_connection *conn;
	struct evbuffer *body;		/* its /status/part, once answered */
	char error[160];
};

struct status_fetch {
	TAILQ_ENTRY(status_fetch) entry;
	struct server *srv;
	struct evhttp_request *req;	/* the browser's: answered once, at the end */
	char self[320];
	int wait_registry;
	struct status_peer *peers;
	size_t n_peers, pending;
	struct event *ev_finish;	/* the answer, out of the HTTP client's callbacks */
};

/* One server per process: the registry's answer finds its pages here. */
static TAILQ_HEAD(, status_fetch) status_fetches = TAILQ_HEAD_INITIALIZER(status_fetches);

static void
status_fetch_free(struct status_fetch *f)
{
	size_t i;

	TAILQ_REMOVE(&status_fetches, f, entry);
	for (i = 0; i < f->n_peers; i++) {
		if (f->peers[i].conn != NULL)
			evhttp_connection_free(f->peers[i].conn);
		if (f->peers[i].body != NULL)
			evbuffer_free(f->peers[i].body);
	}
	free(f->peers);
	if (f->ev_finish != NULL)
		event_free(f->ev_finish);
	free(f);
}

/* Split a peer's part at the two marks into its three sections. */
static int
status_split(struct evbuffer *body, struct evbuffer *health, struct evbuffer *sessions,
    struct evbuffer *events)
{
	struct evbuffer_ptr a, b;
	size_t la = strlen(STATUS_MARK_SESSIONS), lb = strlen(STATUS_MARK_EVENTS);

	a = evbuffer_search(body, STATUS_MARK_SESSIONS, la, NULL);
	if (a.pos < 0)
		return -1;
	b = evbuffer_search(body, STATUS_MARK_EVENTS, lb, &a);
	if (b.pos < 0)
		return -1;
	evbuffer_remove_buffer(body, health, (size_t)a.pos);
	evbuffer_drain(body, la);
	evbuffer_remove_buffer(body, sessions, (size_t)(b.pos - a.pos) - la);
	evbuffer_drain(body, lb);
	evbuffer_add_buffer(events, body);
	return 0;
}

static void
status_unreachable_row(struct evbuffer *out, const struct status_peer *p)
{
	evbuffer_add(out, "<tr class=\"instance unreachable\" data-instance=\"", 48);
	status_esc(out, p->instance);
	evbuffer_add(out, "\">", 2);
	status_td(out, "name", p->instance);
	status_td(out, "admin", p->address);
	evbuffer_add(out, "<td colspan=\"6\" class=\"bad\">", 28);
	status_esc(out, p->error);
	evbuffer_add(out, "</td></tr>\n", 11);
}

static void
status_table(struct evbuffer *out, const char *id, const char *title, const char *heads,
    struct evbuffer *rows, const char *empty, int ncols)
{
	size_t n = evbuffer_get_length(rows);

	evbuffer_add_printf(out, "<h2>%s</h2>\n<table id=\"%s\"><thead><tr>%s</tr></thead><tbody>\n",
	    title, id, heads);
	if (n == 0)
		evbuffer_add_printf(out, "<tr class=\"empty\"><td colspan=\"%d\" class=\"muted\">%s"
		    "</td></tr>\n", ncols, empty);
	evbuffer_add_buffer(out, rows);
	evbuffer_add(out, "</tbody></table>\n", 17);
}

static void
status_fetch_finish(evutil_socket_t fd, short what, void *arg)
{
	struct status_fetch *f = arg;
	struct server *srv = f->srv;
	struct evbuffer *out = evbuffer_new(), *health = evbuffer_new(), *sessions = evbuffer_new(),
	    *events = evbuffer_new();
	time_t now = time(NULL);
	char nonce[40];
	size_t i;

	(void)fd;
	(void)what;
	if (out == NULL || health == NULL || sessions == NULL || events == NULL) {
		evhttp_send_error(f->req, 500, "Out of memory");
		goto done;
	}
	status_health_row(srv, health, f->self, now);
	status_session_rows(srv, sessions, "", now);
	status_event_rows(srv, events);
	for (i = 0; i < f->n_peers; i++) {
		struct status_peer *p = &f->peers[i];

		if (p->body != NULL && status_split(p->body, health, sessions, events) < 0)
			snprintf(p->error, sizeof(p->error), "its answer is not a status part");
		if (p->body == NULL || p->error[0])
			status_unreachable_row(health, p);
	}
	status_nonce(nonce, sizeof(nonce));
	status_head(srv, out, nonce, "imapfresh status");
	status_main(out);
	status_table(out, "instances", "Instances", "<th>instance</th><th>admin</th><th>up</th>"
	    "<th>sessions</th><th>upstream</th><th>Redis</th><th>change feed</th><th>trace</th>",
	    health, "none", 8);
	status_table(out, "sessions", "Live sessions", "<th>session</th><th>user</th><th>client"
	    "</th><th>mailbox</th><th>state</th><th>client's view</th><th>last resync</th>"
	    "<th>age</th>", sessions, "no live sessions", 8);
	status_table(out, "events", "Recent sync events", "<th>time (UTC)</th><th>session</th>"
	    "<th>user</th><th>mailbox</th><th>step</th><th>trigger</th><th>reason</th>"
	    "<th>generation</th><th>told the client</th>", events,
	    "no resync since start", 9);
	evbuffer_add(out, "</main>\n", 8);
	status_tail(out, nonce);
	status_send(f->req, 200, "OK", "text/html; charset=utf-8", nonce, out);
done:
	if (out != NULL)
		evbuffer_free(out);
	if (health != NULL)
		evbuffer_free(health);
	if (sessions != NULL)
		evbuffer_free(sessions);
	if (events != NULL)
		evbuffer_free(events);
	status_fetch_free(f);
}

/* Answer from outside whatever callback we are in. */
static void
status_fetch_done(struct status_fetch *f)
{
	struct timeval zero = { 0, 0 };

	evtimer_add(f->ev_finish, &zero);
}

static void
status_peer_answer(struct evhttp_request *req, void *arg)
{
	struct status_peer *p = arg;
	int code = req != NULL ? evhttp_request_get_response_code(req) : 0;

	if (code == 200 && (p->body = evbuffer_new()) != NULL)
		evbuffer_add_buffer(p->body, evhttp_request_get_input_buffer(req));
	else if (code != 0)
		snprintf(p->error, sizeof(p->error), "its admin endpoint answered %d%s", code,
		    code == 401 ? " (another admin_token?)" : "");
	else
		snprintf(p->error, sizeof(p->error), "no answer (connection failed, or nothing "
		    "within %d s)", STATUS_PEER_SECS);
	if (--p->f->pending == 0)
		status_fetch_done(p->f);
}

/* "host:port" or "[v6]:port" into its parts. */
static int
status_split_address(const char *addr, char *host, size_t hostlen, unsigned short *port)
{
	const char *colon = strrchr(addr, ':');
	long v;
	char *end;

	if (colon == NULL)
		return -1;
	v = strtol(colon + 1, &end, 10);
	if (*end != '\0' || v <= 0 || v > 65535)
		return -1;
	*port = (unsigned short)v;
	if (addr[0] == '[' && colon > addr + 1 && colon[-1] == ']')
		snprintf(host, hostlen, "%.*s", (int)(colon - addr - 2), addr + 1);
	else
		snprintf(host, hostlen, "%.*s", (int)(colon - addr), addr);
	return host[0] ? 0 : -1;
}

static void
status_peer_ask(struct status_fetch *f, struct status_peer *p)
{
	struct server *srv = f->srv;
	struct evhttp_request *req;
	struct evkeyvalq *h;
	char host[300], auth[600];
	unsigned short port;

	if (status_split_address(p->address, host, sizeof(host), &port) < 0) {
		snprintf(p->error, sizeof(p->error), "cannot read its registry address");
		return;
	}
	if ((p->conn = evhttp_connection_base_new(srv->base, srv->dns, host, port)) == NULL ||
	    (req = evhttp_request_new(status_peer_answer, p)) == NULL) {
		snprintf(p->error, sizeof(p->error), "cannot ask it (out of memory)");
		return;
	}
	evhttp_connection_set_timeout(p->conn, STATUS_PEER_SECS);
	evhttp_connection_set_max_body_size(p->conn, STATUS_PEER_MAX_BODY);
	h = evhttp_request_get_output_headers(req);
	evhttp_add_header(h, "Host", p->address);
	evhttp_add_header(h, "Connection", "close");
	if (srv->cfg.admin_token[0]) {
		snprintf(auth, sizeof(auth), "Bearer %s", srv->cfg.admin_token);
		evhttp_add_header(h, "Authorization", auth);
	}
	if (evhttp_make_request(p->conn, req, EVHTTP_REQ_GET, "/status/part") != 0) {
		/* evhttp_make_request freed req */
		snprintf(p->error, sizeof(p->error), "cannot ask it");
		return;
	}
	f->pending++;
}

/* The registry's answer: ask every other live instance for its rows. */
static void
status_registry(const char *const *kv, size_t n)
{
	struct status_fetch *f, *next;
	time_t now = time(NULL);
	size_t i, m;

	for (f = TAILQ_FIRST(&status_fetches); f != NULL; f = next) {
		next = TAILQ_NEXT(f, entry);
		if (!f->wait_registry)
			continue;
		f->wait_registry = 0;
		m = n > 0 && (f->peers = calloc(n / 2, sizeof(*f->peers))) != NULL ? n : 0;
		for (i = 0; i + 1 < m; i += 2) {
			struct status_peer *p = &f->peers[f->n_peers];
			const char *v = kv[i + 1], *tab = strchr(v, '\t'), *last = strrchr(v, '\t');
			long long refreshed = last ? atoll(last + 1) : 0;

			if (strcmp(kv[i], f->srv->instance) == 0 || tab == NULL ||
			    now - refreshed > STATUS_REGISTRY_GONE)
				continue;	/* ourselves, or gone */
			p->f = f;
			snprintf(p->instance, sizeof(p->instance), "%s", kv[i]);
			snprintf(p->address, sizeof(p->address), "%.*s", (int)(tab - v), v);
			f->n_peers++;
			status_peer_ask(f, p);
		}
		if (f->pending == 0)
			status_fetch_done(f);
	}
}

static void
status_overview(struct server *srv, struct evhttp_request *req, const char *self)
{
	struct status_fetch *f = calloc(1, sizeof(*f));

	if (f == NULL || (f->ev_finish = evtimer_new(srv->base, status_fetch_finish, f)) == NULL) {
		free(f);
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	f->srv = srv;
	f->req = req;
	snprintf(f->self, sizeof(f->self), "%s", self);
	f->wait_registry = 1;
	TAILQ_INSERT_TAIL(&status_fetches, f, entry);
	/* Without Redis this answers at once: only this instance. */
	store_instances_get(srv->store, status_registry);
}

/* This instance's rows for another instance's overview; links absolute. */
static void
status_part(struct server *srv, struct evhttp_request *req, const char *self)
{
	struct evbuffer *out = evbuffer_new();
	time_t now = time(NULL);
	char base[340];

	if (out == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	snprintf(base, sizeof(base), "http://%s", self);
	status_health_row(srv, out, self, now);
	evbuffer_add(out, STATUS_MARK_SESSIONS, strlen(STATUS_MARK_SESSIONS));
	status_session_rows(srv, out, base, now);
	evbuffer_add(out, STATUS_MARK_EVENTS, strlen(STATUS_MARK_EVENTS));
	status_event_rows(srv, out);
	status_send(req, 200, "OK", "text/html; charset=utf-8", "none", out);
	evbuffer_free(out);
}

/* --- one session --- */

static void
status_dt(struct evbuffer *out, const char *cls, const char *name, const char *value)
{
	evbuffer_add_printf(out, "<dt>%s</dt><dd class=\"%s\">", name, cls);
	status_esc(out, value && value[0] ? value : "\xe2\x80\x93");
	evbuffer_add(out, "</dd>\n", 6);
}

static void
status_dt_num(struct evbuffer *out, const char *cls, const char *name, uint64_t v)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%" PRIu64, v);
	status_dt(out, cls, name, buf);
}

/* A UID set as a sequence set, cut at a comma when long. */
static void
status_dt_uids(struct evbuffer *out, const char *cls, const char *name, const struct uidset *set)
{
	size_t len = uidset_format(set, NULL, 0) + 1;
	char *buf = malloc(len + 64), *comma;

	if (buf == NULL) {
		status_dt(out, cls, name, "(out of memory)");
		return;
	}
	uidset_format(set, buf, len);
	if (len > STATUS_UIDS_SHOWN) {
		buf[STATUS_UIDS_SHOWN] = '\0';
		if ((comma = strrchr(buf, ',')) != NULL)
			*comma = '\0';
		strcat(buf, ", \xe2\x80\xa6");
	}
	status_dt(out, cls, name, buf);
	free(buf);
}

static void
status_session_view(struct server *srv, struct evbuffer *out, struct session *s, time_t now)
{
	const struct track *t = &s->track;
	const struct resync *r = &s->resync;
	struct uidset known;
	char buf[400], ago[40];
	const char *traced_user = t->user && t->user[0] ? t->user : NULL;
	int bad;

	evbuffer_add(out, "<h2>Session</h2>\n<dl id=\"session\">\n", 35);
	snprintf(buf, sizeof(buf), "%s:%s", srv->instance, s->sid);
	status_dt(out, "id", "session", buf);
	status_dt(out, "user", "user", t->user);
	status_dt(out, "client", "client", s->client_addr);
	snprintf(buf, sizeof(buf), "%s%s", s->client_tls && !s->client_tls_pending ? "TLS" : "plain",
	    s->authenticated ? ", authenticated" : ", not logged in");
	status_dt(out, "link", "link", buf);
	status_dt(out, "state", "state", session_state_name(s->state));
	status_span(ago, sizeof(ago), (long)(now - s->started.tv_sec));
	status_dt(out, "age", "age", ago);
	status_dt_num(out, "inflight", "commands in flight", s->n_inflight);
	status_dt(out, "idling", "idling", s->idling ? "yes" : "no");
	evbuffer_add(out, "</dl>\n", 6);

	evbuffer_add(out, "<h2>The client's view</h2>\n<dl id=\"view\">\n", 42);
	status_dt(out, "mailbox", "mailbox", t->selected ? t->mailbox : NULL);
	if (t->selected) {
		status_dt(out, "access", "access", t->readonly ? "read-only (EXAMINE)" : "read-write");
		status_dt_num(out, "count", "messages", t->view.count);
		status_dt_num(out, "uidvalidity", "UIDVALIDITY", t->uidvalidity);
		status_dt_num(out, "uidnext", "UIDNEXT", t->uidnext);
		if (t->condstore)
			status_dt_num(out, "highestmodseq", "HIGHESTMODSEQ", t->highestmodseq);
		snprintf(buf, sizeof(buf), "%u of %u", seqmap_known(&t->view), t->view.count);
		status_dt(out, "known", "UIDs known", buf);
		uidset_init(&known);
		if (seqmap_known_uids(&t->view, &known) == 0)
			status_dt_uids(out, "uids", "known UIDs", &known);
		uidset_free(&known);
		snprintf(buf, sizeof(buf), "%u%s", pending_count(&t->pending),
		    pending_unplaced(&t->pending) ? " (and VANISHED UIDs not placed yet)" : "");
		status_dt(out, "pending", "expunges not told yet", buf);
		snprintf(buf, sizeof(buf), "%" PRIu64 " (mailbox now %" PRIu64 ")", t->synced_gen,
		    t->suser ? store_gen(t->suser, t->mailbox) : 0);
		status_dt(out, "gen", "generation synced", buf);
		snprintf(buf, sizeof(buf), "%" PRIu64 " (now %" PRIu64 ")", t->synced_epoch,
		    server_epoch(srv));
		status_dt(out, "epoch", "epoch synced", buf);
		status_behind(s, buf, sizeof(buf), &bad);
		status_dt(out, bad ? "behind bad" : "behind", "behind", buf);
	}
	evbuffer_add(out, "</dl>\n", 6);

	evbuffer_add(out, "<h2>Resync</h2>\n<dl id=\"resync\">\n", 33);
	status_dt(out, "phase", "phase now", status_phase_name(r->phase));
	status_last_resync(s, buf, sizeof(buf), now);
	status_dt(out, "last", "last", buf);
	status_dt_num(out, "escalations", "escalations", r->n_escalations);
	if (r->n_resyncs > 0) {
		status_dt(out, "trigger", "last trigger", r->trigger);
		status_dt(out, "reason", "last reason", r->reason);
		status_dt_num(out, "server-count", "server's count at the last check",
		    r->truth.count);
	}
	status_dt(out, "requested", "operator asked for one", r->requested ? "yes" : "no");
	evbuffer_add(out, "</dl>\n<p><button type=\"button\" data-post=\"/sessions/", 52);
	status_esc(out, s->sid);
	evbuffer_add_printf(out, "/resync\">resync at its next command</button></p>\n");

	/* The trace: process-wide rules (trace.c); these set them for this
	 * session's user or client host. */
	evbuffer_add(out, "<h2>Trace</h2>\n<dl id=\"trace\">\n", 31);
	status_dt(out, s->trace ? "traced ok" : "traced", "this session",
	    s->trace ? "traced" : "not traced");
	status_dt(out, "spec", "trace rule in force", trace_get(srv));
	evbuffer_add(out, "</dl>\n<p>", 9);
	if (s->trace != NULL) {
		evbuffer_add_printf(out, "<button type=\"button\" id=\"trace-toggle\" data-post=\"/trace\" "
		    "data-body=\"spec=off\">stop tracing (trace off)</button>");
	} else if (traced_user != NULL) {
		char *enc = evhttp_encode_uri(traced_user);

		evbuffer_add_printf(out, "<button type=\"button\" id=\"trace-toggle\" data-post=\"/trace\" "
		    "data-body=\"spec=user%%20");
		status_esc(out, enc ? enc : "");
		evbuffer_add(out, "\">trace this user</button>", 26);
		free(enc);
	} else
		evbuffer_add_printf(out, "<span class=\"muted\">not logged in: nothing to trace by user"
		    " yet</span>");
	evbuffer_add(out, "</p>\n", 5);
}

static void
status_session_page(struct server *srv, struct evhttp_request *req, const char *id)
{
	const char *colon = strrchr(id, ':'), *num = colon ? colon + 1 : id;
	struct evbuffer *out;
	struct session *s = NULL;
	char nonce[40], title[300], msg[600], *end;
	unsigned long long n;

	if (colon != NULL && ((size_t)(colon - id) != strlen(srv->instance) ||
	    strncmp(id, srv->instance, (size_t)(colon - id)) != 0)) {
		snprintf(msg, sizeof(msg), "Session %s is not on this instance (%s): open it from "
		    "its own instance's status page (its link in the sessions table goes there).",
		    id, srv->instance);
		status_message(srv, req, 404, "Not Found", "imapfresh: no such session", msg);
		return;
	}
	if (*num == 's')
		num++;
	n = strtoull(num, &end, 10);
	if (*num >= '0' && *num <= '9' && *end == '\0')
		s = session_find(srv, n);
	if (s == NULL || s->state == SESSION_DEAD) {
		snprintf(msg, sizeof(msg), "No live session %s on %s: it may have ended.", id,
		    srv->instance);
		status_message(srv, req, 404, "Not Found", "imapfresh: no such session", msg);
		return;
	}
	if ((out = evbuffer_new()) == NULL) {
		evhttp_send_error(req, 500, "Out of memory");
		return;
	}
	status_nonce(nonce, sizeof(nonce));
	snprintf(title, sizeof(title), "imapfresh session %s:%s", srv->instance, s->sid);
	status_head(srv, out, nonce, title);
	status_main(out);
	status_session_view(srv, out, s, time(NULL));
	evbuffer_add(out, "</main>\n", 8);
	status_tail(out, nonce);
	status_send(req, 200, "OK", "text/html; charset=utf-8", nonce, out);
	evbuffer_free(out);
}

/* --- routing --- */

int
status_is_page(const char *path)
{
	return strcmp(path, "/") == 0 || strcmp(path, "/status") == 0 ||
	    strcmp(path, "/status/") == 0 || strncmp(path, "/status/session/", 16) == 0;
}

int
status_request(struct server *srv, struct evhttp_request *req, const char *path,
    const char *self)
{
	if (!status_is_page(path) && strcmp(path, "/status/part") != 0)
		return 0;
	if (evhttp_request_get_command(req) != EVHTTP_REQ_GET) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET");
		evhttp_send_error(req, 405, "Method Not Allowed");
		return 1;
	}
	if (strcmp(path, "/status/part") == 0)
		status_part(srv, req, self);
	else if (strncmp(path, "/status/session/", 16) == 0)
		status_session_page(srv, req, path + 16);
	else
		status_overview(srv, req, self);
	return 1;
}

void
status_stop(struct server *srv)
{
	struct status_fetch *f, *next;

	for (f = TAILQ_FIRST(&status_fetches); f != NULL; f = next) {
		next = TAILQ_NEXT(f, entry);
		if (f->srv == srv)
			status_fetch_free(f);
	}
}
