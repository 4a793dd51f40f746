/* workers: with workers > 1 the first process forks the workers and keeps them running; signals pass through it. */
#ifndef WORKERS_H
#define WORKERS_H

#include "server.h"

#define WORKERS_CHILD (-1)

/*
 * Become the master of srv->workers workers. Returns WORKERS_CHILD in a
 * worker (srv->worker set, log lines tagged), which goes on to serve, or in
 * the master once every worker is gone: 0 after SIGTERM/SIGINT, a worker's
 * exit status when one failed to start. A worker that dies in service is
 * replaced; SIGHUP, SIGTERM and SIGINT are passed on. SIGUSR2 starts a new
 * master (upgrade.c); once it serves, the workers get SIGUSR2 and drain, and
 * this returns 0 when they are gone. upgrade_master_bind() first.
 */
int workers_start(struct server *srv);

#endif
