/* resync: bringing a stale upstream session back in line with its mailbox, without the client noticing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "events.h"
#include "log.h"
#include "metrics.h"
#include "renumber.h"
#include "repair.h"
#include "resync.h"
#include "session.h"
#include "store.h"

#define RESYNC_BIT(kind, uid) (1ULL << ((unsigned)(kind) * 2 + ((uid) ? 1 : 0)))

static const char *const resync_phase_names[] = {
	[RESYNC_NONE] = "none", [RESYNC_WAIT_QUIET] = "wait-quiet",
	[RESYNC_IDLE_DONE] = "idle-done", [RESYNC_CHECK] = "check",
	[RESYNC_ESCALATE] = "escalate", [RESYNC_IDLE_REENTER] = "idle-reenter",
};

/* Every change of phase goes through here, logged like session_enter(). */
static void
resync_enter(struct session *s, enum resync_phase next, const char *why)
{
	log_msg(LOG_LEVEL_DEBUG, s->sid, "resync %s -> %s (%s)", resync_phase_names[s->resync.phase],
	    resync_phase_names[next], why);
	s->resync.phase = next;
}

void
resync_init(struct resync *r)
{
	memset(r, 0, sizeof(*r));
	uidset_init(&r->truth);
	seqmap_init(&r->server_view);
}

void
resync_free(struct resync *r)
{
	uidset_free(&r->truth);
	seqmap_free(&r->server_view);
	free(r->idle_tag);
	free(r->reason_buf);
}

int
resync_parse_triggers(const char *list, unsigned long long *mask, char extra[8][32])
{
	char buf[256], *item, *save = NULL;
	int n_extra = 0;

	*mask = 0;
	for (int i = 0; i < 8; i++)
		extra[i][0] = '\0';
	snprintf(buf, sizeof(buf), "%s", list);
	for (item = strtok_r(buf, ",", &save); item != NULL; item = strtok_r(NULL, ",", &save)) {
		int uid = 0;
		enum command_kind kind;

		item += strspn(item, " ");
		if (strncasecmp(item, "UID ", 4) == 0) {
			uid = 1;
			item += 4 + strspn(item + 4, " ");
		}
		item[strcspn(item, " ")] = '\0';
		if (*item == '\0')
			continue;
		if ((kind = command_kind_from_name(item)) == CMD_UNKNOWN) {
			if (n_extra == 8 || strlen(item) + (uid ? 4 : 0) >= 32)
				return -1;
			snprintf(extra[n_extra++], 32, "%s%s", uid ? "UID " : "", item);
			continue;
		}
		*mask |= RESYNC_BIT(kind, uid);
	}
	return 0;
}

const char *
resync_why_stale(const struct session *s)
{
	const struct track *t = &s->track;
	struct repair_staleness in = {
		.requested = s->resync.requested,
		.has_user = t->suser != NULL,
		.unheard = t->selected && t->unheard,
		.gen_now = t->suser != NULL ? store_gen(t->suser, t->mailbox) : 0,
		.gen_synced = t->synced_gen,
		.epoch_now = server_epoch(s->srv),
		.epoch_synced = t->synced_epoch,
		.since_sync = (long long)(time(NULL) - t->last_sync),
		.resync_after = (long long)s->srv->cfg.resync_after,
	};

	return repair_why_stale(&in);
}

/* The reason, with what the user's last change was when that is why. */
static const char *
resync_reason_detail(struct session *s, const char *reason)
{
	const struct track *t = &s->track;
	const char *last;

	if (t->suser == NULL || store_gen(t->suser, t->mailbox) <= t->synced_gen ||
	    (last = store_user_last_change(t->suser)) == NULL)
		return reason;
	size_t len = strlen(reason) + strlen(last) + 4;
	char *buf = malloc(len);

	if (buf == NULL)
		return reason;
	snprintf(buf, len, "%s (%s)", reason, last);
	free(s->resync.reason_buf);	/* r->reason is set to the new one by the caller */
	s->resync.reason_buf = buf;
	return buf;
}

/* Nothing in flight and nothing half-said: safe to put our commands between. */
static int
resync_quiet_now(const struct session *s)
{
	return s->n_inflight == 0 &&
	    (s->wait == WAIT_NONE || (s->resync.for_idle && s->wait == WAIT_IDLE));
}

static void
resync_quote(const char *name, char *out, size_t len)
{
	size_t o = 0;

	out[o++] = '"';
	for (; *name && o + 3 < len; name++) {
		if (*name == '"' || *name == '\\')
			out[o++] = '\\';
		out[o++] = *name;
	}
	out[o++] = '"';
	out[o] = '\0';
}

/* Is this command one of resync_on? */
static int
resync_is_trigger(const struct server *srv, const struct command *cmd)
{
	char name[40];

	if (srv->resync_mask & RESYNC_BIT(cmd->kind, cmd->uid))
		return 1;
	if (cmd->kind != CMD_UNKNOWN || srv->resync_extra[0][0] == '\0')
		return 0;
	snprintf(name, sizeof(name), "%s%s", cmd->uid ? "UID " : "", cmd->name);
	for (int i = 0; i < 8 && srv->resync_extra[i][0]; i++)
		if (strcasecmp(srv->resync_extra[i], name) == 0)
			return 1;
	return 0;
}

static void
resync_event(struct session *s, const char *step, const char *sent)
{
	struct resync *r = &s->resync;
	struct events_resync ev = {
		.step = step, .trigger = r->trigger, .reason = r->reason,
		.gen_synced = r->gen_before, .gen_now = r->gen,
		.client_count = s->track.view.count,
		.server_uids = strcmp(step, "check") != 0 && strcmp(step, "idle-refresh") != 0 &&
		    (r->phase == RESYNC_CHECK || r->phase == RESYNC_ESCALATE) ? &r->truth : NULL,
		.sent_to_client = sent,
	};

	events_resync(s, &ev);
}

/* What the mailbox holds: with ESEARCH (RFC 4731) as ranges, a few bytes
 * for a mailbox of 100,000 messages instead of one number per message. */
static void
resync_inject_search(struct session *s)
{
	session_inject(s, RESYNC_CMD_SEARCH, s->up_esearch ? "UID SEARCH RETURN (ALL) ALL" :
	    "UID SEARCH ALL");
}

static void
resync_start_check(struct session *s)
{
	struct resync *r = &s->resync;
	struct track *t = &s->track;

	s->resync.requested = 0;
	r->gen_before = t->synced_gen;
	r->gen = t->suser ? store_gen(t->suser, t->mailbox) : 0;
	r->unheard = !store_user_listening(s->srv->store, t->suser);
	r->failed = 0;
	r->matched_at_search = 0;
	uidset_clear(&r->truth);
	t->search_sink = &r->truth;
	resync_enter(s, RESYNC_CHECK, "NOOP + UID SEARCH injected");
	r->pending = 2;
	session_inject(s, RESYNC_CMD_NOOP, "NOOP");
	resync_inject_search(s);
	s->srv->stats.resync_injections++;
	s->resync.n_resyncs++;
	log_msg(LOG_LEVEL_INFO, s->sid, "resync \"%s\": %s; injecting NOOP + UID SEARCH ALL",
	    t->mailbox, r->reason);
	resync_event(s, "check", NULL);
}

int
resync_hold(struct session *s, const struct command *cmd)
{
	struct resync *r = &s->resync;
	const char *reason;

	if (s->no_hold) {
		s->no_hold = 0;
		return 0;
	}
	if (!s->srv->cfg.resync || !s->track.selected || r->phase != RESYNC_NONE ||
	    !resync_is_trigger(s->srv, cmd))
		return 0;
	s->srv->stats.resync_checks++;
	if ((reason = resync_why_stale(s)) == NULL)
		return 0;
	r->reason = resync_reason_detail(s, reason);
	r->for_idle = 0;
	snprintf(r->trigger, sizeof(r->trigger), "%s%s", cmd->uid ? "UID " : "", cmd->name);
	s->resync.start_usec = metrics_now_usec();
	resync_enter(s, RESYNC_WAIT_QUIET, reason);	/* the caller starts it with resync_quiet() */
	return 1;
}

void
resync_quiet(struct session *s)
{
	if (s->resync.phase == RESYNC_WAIT_QUIET && resync_quiet_now(s))
		resync_start_check(s);
}

void
resync_mailbox_changed(struct session *s, const char *mailbox)
{
	struct resync *r = &s->resync;
	struct inflight *idle = NULL;

	if (!s->srv->cfg.resync || !s->track.selected ||
	    (mailbox[0] != '\0' && strcmp(mailbox, s->track.mailbox) != 0) ||
	    s->state != SESSION_RUNNING || s->wait != WAIT_IDLE || !s->idling ||
	    r->phase != RESYNC_NONE)
		return;
	for (unsigned i = 0; i < s->n_inflight; i++)
		if (s->inflight[i].kind == CMD_IDLE)
			idle = &s->inflight[i];
	if (idle == NULL || s->n_inflight != 1)
		return;
	/* End the upstream IDLE ourselves; the client goes on idling. */
	track_set_name(&r->idle_tag, session_inflight_tag(idle));
	r->for_idle = 1;
	r->client_done = 0;
	r->reason = resync_reason_detail(s, "mailbox changed while the client idles");
	resync_enter(s, RESYNC_IDLE_DONE, "mailbox changed while the client idles");
	snprintf(r->trigger, sizeof(r->trigger), "IDLE");
	s->resync.start_usec = metrics_now_usec();
	s->idling = 0;
	s->srv->stats.resync_idle_refreshes++;
	session_send_own(s, "DONE", 4);
	log_msg(LOG_LEVEL_INFO, s->sid, "resync \"%s\": %s; ending the upstream IDLE",
	    s->track.mailbox, r->reason);
	r->gen_before = s->track.synced_gen;
	r->gen = store_gen(s->track.suser, s->track.mailbox);
	r->unheard = !store_user_listening(s->srv->store, s->track.suser);
	resync_event(s, "idle-refresh", NULL);
}

int
resync_client_may_read(const struct session *s)
{
	const struct resync *r = &s->resync;

	if (r->phase == RESYNC_NONE || r->phase == RESYNC_WAIT_QUIET ||
	    r->phase == RESYNC_IDLE_REENTER)
		return 1;
	/* Refreshing an idling client: only its DONE can come, and is taken. */
	return r->for_idle && !r->client_done;
}

int
resync_client_idle_line(struct session *s)
{
	struct resync *r = &s->resync;

	if (!r->for_idle || r->phase == RESYNC_NONE || r->phase == RESYNC_IDLE_REENTER)
		return 0;
	r->client_done = 1;
	s->wait = WAIT_NONE;
	return 1;
}

int
resync_response_hidden(struct session *s)
{
	struct resync *r = &s->resync;
	struct inflight *f;

	if (r->phase == RESYNC_NONE || r->phase == RESYNC_WAIT_QUIET)
		return 0;
	if (strcmp(s->busy->resp_tag, "+") == 0)
		return r->phase == RESYNC_IDLE_REENTER;
	if (strcmp(s->busy->resp_tag, "*") != 0) {
		if (r->phase == RESYNC_IDLE_DONE && strcmp(s->busy->resp_tag, r->idle_tag) == 0)
			return 1;
		return (f = session_inflight_find(s, s->busy->resp_tag)) != NULL && f->injected;
	}
	if (r->phase == RESYNC_ESCALATE)
		return 1;	/* the re-SELECT's data would contradict the client's view */
	return r->phase == RESYNC_CHECK &&
	    (strcmp(s->busy->resp_word, "SEARCH") == 0 || strcmp(s->busy->resp_word, "ESEARCH") == 0);
}

int
resync_continuation(struct session *s)
{
	if (s->resync.phase != RESYNC_IDLE_REENTER)
		return 0;
	resync_enter(s, RESYNC_NONE, "the re-entered IDLE is idling");
	s->idling = s->wait == WAIT_IDLE;	/* the client may have said DONE already */
	return 1;
}

/* The resync is over: let the client go on. */
static void
resync_finish(struct session *s, int synced, const char *outcome)
{
	struct resync *r = &s->resync;
	struct track *t = &s->track;
	int for_idle = r->for_idle;

	t->search_sink = NULL;
	t->fetch_sink = NULL;
	if (synced) {
		track_synced(s, r->gen);
		t->unheard = r->unheard;	/* still not listening when it began: check again */
		s->resync.last_done = time(NULL);
	}
	log_msg(LOG_LEVEL_INFO, s->sid, "resync \"%s\": %s", t->mailbox, outcome);
	metrics_observe(&s->srv->metrics.resync_latency, metrics_now_usec() - s->resync.start_usec);
	resync_enter(s, RESYNC_NONE, outcome);
	r->for_idle = 0;
	track_save(s);
	if (!for_idle) {
		session_client_release(s);
		return;
	}
	if (r->client_done) {
		session_reply(s, "%s OK Idle completed", r->idle_tag);
		session_client_process(s);
		return;
	}
	/* Back to idling upstream, under the client's own tag. */
	{
		struct command idle = { .kind = CMD_NONE };
		struct inflight *f;

		command_reset(&idle);
		snprintf(idle.tag, sizeof(idle.tag), "%s", r->idle_tag);
		idle.tag_ok = 1;
		idle.kind = CMD_IDLE;
		if ((f = session_inflight_push(s, &idle)) != NULL)
			f->sent_whole = 1;
		char line[COMMAND_TAG_MAX + 8];
		int n = snprintf(line, sizeof(line), "%s IDLE", r->idle_tag);
		session_send_own(s, line, (size_t)n);
		resync_enter(s, RESYNC_IDLE_REENTER, "the client's IDLE re-entered");
	}
}

static void
resync_disconnect(struct session *s, const char *why)
{
	s->resync.reason = why;
	resync_event(s, "disconnect", "* BYE [UNAVAILABLE] Mailbox state changed; please reconnect");
	s->srv->stats.resync_disconnects++;
	log_msg(LOG_LEVEL_WARNING, s->sid, "resync \"%s\": %s; ending the session so the client "
	    "selects the mailbox afresh", s->track.mailbox, why);
	session_close(s, "[UNAVAILABLE] Mailbox state changed; please reconnect", why);
}

static void
resync_escalate(struct session *s)
{
	struct resync *r = &s->resync;
	struct track *t = &s->track;
	char quoted[2 * COMMAND_ARG_MAX + 3];

	s->srv->stats.stale_detected++;
	s->srv->stats.resync_escalations++;
	s->resync.n_stale++;
	s->resync.n_escalations++;
	log_msg(LOG_LEVEL_NOTICE, s->sid, "resync \"%s\": stale session detected (client sees %u "
	    "messages, the mailbox holds %llu); re-selecting", t->mailbox, t->view.count,
	    (unsigned long long)r->truth.count);
	resync_event(s, "stale", NULL);
	resync_enter(s, RESYNC_ESCALATE, "the view does not match the mailbox");
	r->failed = 0;
	r->pending = 0;
	r->old_uidvalidity = t->uidvalidity;
	/* The server numbers what the client has, less the expunges it was not told. */
	seqmap_reset(&r->server_view, t->view.count - pending_count(&t->pending));
	t->search_sink = NULL;
	/* Where the client's positions are not all known, the stale server
	 * session's own list says which UID each position holds. */
	if (repair_needs_server_list(&t->view, &t->pending)) {
		t->fetch_sink = &r->server_view;
		session_inject(s, RESYNC_CMD_FETCH_UIDS, "FETCH 1:* (UID)");
		r->pending++;
	}
	resync_quote(t->mailbox_wire, quoted, sizeof(quoted));
	session_inject(s, RESYNC_CMD_SELECT, "%s %s%s", t->readonly ? "EXAMINE" : "SELECT", quoted,
	    t->condstore ? " (CONDSTORE)" : "");
	uidset_clear(&r->truth);
	resync_inject_search(s);
	r->pending += 2;
}

/* After the re-SELECT: tell the client exactly what changed, as EXPUNGEs and
 * an EXISTS, so its sequence numbers match the server's again. Where the
 * client may not hear an EXPUNGE now (its held command is a FETCH, STORE or
 * SEARCH), the expunges are held and its numbers renumbered until it may. */
static void
resync_apply(struct session *s)
{
	struct resync *r = &s->resync;
	struct track *t = &s->track;
	struct repair_plan plan;
	uint32_t count = t->view.count, expunged, added;
	char sent[512] = "";
	size_t o = 0;

	if (t->uidvalidity != r->old_uidvalidity) {
		resync_disconnect(s, "UIDVALIDITY changed");
		return;
	}
	repair_plan_init(&plan);
	if (repair_make_plan(&t->view, &t->pending, &r->server_view, &r->truth, &plan) < 0)
		plan.disconnect = "out of memory";
	if (plan.disconnect != NULL) {
		resync_disconnect(s, plan.disconnect);
		repair_plan_free(&plan);
		return;
	}
	expunged = (uint32_t)plan.expunge.count;
	added = (uint32_t)plan.added.count;
	/* The kept positions' UIDs are known now (the unknown ones learnt from
	 * the server's list); the new messages follow them, range by range. */
	if (seqmap_known(&t->view) < count) {
		uint32_t nth = 0;

		for (uint32_t pos = 1; pos <= count; pos++)
			if (!uidset_contains(&plan.expunge, pos))
				seqmap_learn(&t->view, pos, uidset_nth(&plan.kept, ++nth));
	}
	seqmap_append(&t->view, &plan.added);
	pending_clear(&t->pending);
	pending_hold_positions(&t->pending, &plan.expunge);
	if (renumber_expunge_allowed(s)) {
		for (size_t i = plan.expunge.n; i > 0; i--)
			for (uint64_t k = plan.expunge.r[i - 1].hi; k >= plan.expunge.r[i - 1].lo; k--)
				if (o + 24 < sizeof(sent))
					o += (size_t)snprintf(sent + o, sizeof(sent) - o, "%s* %llu EXPUNGE",
					    o ? "; " : "", (unsigned long long)k);
		renumber_flush(s);
		if (s->state != SESSION_RUNNING) {	/* a QRESYNC client could not be told */
			repair_plan_free(&plan);
			return;
		}
		seqmap_assign(&t->view, &r->truth);
		if (added > 0) {
			session_reply(s, "* %u EXISTS", count - expunged + added);
			if (o + 24 < sizeof(sent))
				snprintf(sent + o, sizeof(sent) - o, "%s* %u EXISTS", o ? "; " : "",
				    count - expunged + added);
		}
	} else {
		if (added > 0) {
			session_reply(s, "* %u EXISTS", count + added);
			o += (size_t)snprintf(sent + o, sizeof(sent) - o, "* %u EXISTS", count + added);
		}
		if (expunged > 0)
			snprintf(sent + o, sizeof(sent) - o, "%s(%u EXPUNGEs held until the client "
			    "may hear them)", o ? "; " : "", expunged);
	}
	resync_event(s, "repaired", sent);
	t->dirty = 1;
	repair_plan_free(&plan);
	{
		char outcome[160];
		snprintf(outcome, sizeof(outcome), "re-selected; client told of %u expunged and %u new "
		    "messages", expunged, added);
		resync_finish(s, 1, outcome);
	}
}

/* Servers that run pipelined commands side by side (Dovecot) answer the
 * SEARCH from the session's view before the NOOP's EXISTS goes out: compare
 * with the view as it stood when the result came, as well as at the end. */
void
resync_search_result(struct session *s)
{
	struct track *t = &s->track;

	if (s->resync.phase != RESYNC_CHECK)
		return;
	/* The server's list fills in what the view does not know: UIDs the
	 * client was never shown, and where VANISHED UIDs held so far sit. */
	if (pending_unplaced(&t->pending) || seqmap_known(&t->view) < t->view.count) {
		struct uidset positions;

		uidset_init(&positions);
		if (repair_place(&t->view, &t->pending, &s->resync.truth, &positions) == 0 &&
		    pending_hold_positions(&t->pending, &positions) == 0) {
			uidset_clear(&t->pending.vanished);
			t->dirty = 1;
		}
		uidset_free(&positions);
	}
	s->resync.matched_at_search = !pending_unplaced(&t->pending) &&
	    repair_view_matches(&t->view, &t->pending, &s->resync.truth);
}

void
resync_completed(struct session *s, struct inflight *f, int ok, const char *text)
{
	struct resync *r = &s->resync;
	struct track *t = &s->track;

	if (!ok) {
		r->failed = 1;
		log_msg(LOG_LEVEL_WARNING, s->sid, "resync: upstream refused our %s: %s",
		    f->purpose == RESYNC_CMD_NOOP ? "NOOP" : f->purpose == RESYNC_CMD_SEARCH ?
		    "UID SEARCH" : f->purpose == RESYNC_CMD_SELECT ? "SELECT" : "FETCH",
		    text ? text : "");
	}
	if (f->purpose == RESYNC_CMD_FETCH_UIDS)
		t->fetch_sink = NULL;
	if (f->purpose == RESYNC_CMD_SELECT)
		t->search_sink = &r->truth;	/* the UID SEARCH that follows */
	if (r->pending > 0)
		r->pending--;
	if (r->pending > 0)
		return;
	if (r->phase == RESYNC_CHECK) {
		if (r->failed) {
			resync_event(s, "refused", NULL);
			resync_finish(s, 0, "check refused by the server; going on unchecked");
		} else if (r->matched_at_search || (!pending_unplaced(&t->pending) &&
		    repair_view_matches(&t->view, &t->pending, &r->truth))) {
			resync_event(s, "in-sync", NULL);
			resync_finish(s, 1, "in sync");
		} else
			resync_escalate(s);
	} else if (r->phase == RESYNC_ESCALATE) {
		if (r->failed)
			resync_disconnect(s, "re-SELECT refused");
		else
			resync_apply(s);
	}
}

int
resync_idle_completed(struct session *s)
{
	struct resync *r = &s->resync;

	if (r->phase != RESYNC_IDLE_DONE || strcmp(s->busy->resp_tag, r->idle_tag) != 0)
		return 0;
	/* The IDLE we ended is done upstream; the client is still idling. The
	 * check starts once the caller has retired that command. */
	s->wait = r->client_done ? WAIT_NONE : WAIT_IDLE;
	resync_enter(s, RESYNC_WAIT_QUIET, "the IDLE we ended is done upstream");
	return 1;
}
