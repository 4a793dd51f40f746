/* loop: the process's event loop, optionally busy-polling after traffic. */
#ifndef IMAPFRESH_LOOP_H
#define IMAPFRESH_LOOP_H

struct server;

/* Run srv's event loop until it exits (server_shutdown) or has nothing left to
 * wait for. cfg.busy_poll is read on every pass, so a reload changes it. */
void loop_run(struct server *srv);

#endif
