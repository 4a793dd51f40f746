/* status: the admin endpoint's status pages (HTML): live sessions, health and sync events of every instance, one session's view. */
#ifndef STATUS_H
#define STATUS_H

struct server;
struct evhttp_request;

/* A page a browser opens (GET /, /status, /status/session/<id>): the only
 * paths where admin.c accepts the token as ?token=. */
int status_is_page(const char *path);

/* Serve path when it is one of ours (/, /status, /status/part,
 * /status/session/<id>): 1 when handled (answered, or answered later once
 * the other instances have), 0 when not ours. self is this instance's admin
 * address (host:port). */
int status_request(struct server *srv, struct evhttp_request *req, const char *path,
    const char *self);

/* Before the admin endpoint is freed: pages waiting for other instances are
 * dropped unanswered. */
void status_stop(struct server *srv);

#endif
