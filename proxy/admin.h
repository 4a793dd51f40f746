/* admin: the operators' HTTP endpoint: /metrics, /healthz, /sessions and session controls. */
#ifndef ADMIN_H
#define ADMIN_H

#include <stddef.h>

struct server;

/* Bind admin_listen (nothing when it is empty); -1 with err set. */
int admin_start(struct server *srv, char *err, size_t errlen);
void admin_stop(struct server *srv);

/* Upgrade (upgrade.c): the listening socket to pass on, -1 when off; then
 * the endpoint closed without leaving the instances registry. */
int admin_listener_fd(const struct server *srv);

/* A listening socket on spec, its port + port_offset (worker N's); -1 with
 * err set. The master of workers binds them all (upgrade.c). */
int admin_bind(const char *spec, int port_offset, char *err, size_t errlen);
void admin_release(struct server *srv);

#endif
