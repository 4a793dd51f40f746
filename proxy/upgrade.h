/* upgrade: zero-downtime restart: re-exec, listeners handed over, the old process drains. */
#ifndef UPGRADE_H
#define UPGRADE_H

struct server;
struct session;

/* Environment the old process passes to the new one. */
#define UPGRADE_ENV_FDS "IMAPFRESH_LISTEN_FDS"		/* "fd:key,fd:key..." */
#define UPGRADE_ENV_READY "IMAPFRESH_UPGRADE_READY_FD"	/* write "<pid>\n" when serving */
#define UPGRADE_ENV_NEXT "IMAPFRESH_UPGRADE_NEXT_SESSION"	/* first session number */

/* At start, before anything else: remember how this process was started
 * (the binary's path, argv) and read what an old process passed on. */
void upgrade_init(int argc, char **argv);

/* A listening socket the old process passed under key ("listen=host:port",
 * "listen_tls=host:port", "admin=spec"), or -1: bind one. */
int upgrade_take_fd(const char *key);

/* Start-up is complete (bound, daemonized, pid file written): close the
 * passed sockets nobody took, tell the old process or systemd we serve. */
void upgrade_started(struct server *srv);

/* SIGUSR2: start the new binary and hand everything over to it. */
void upgrade_start(struct server *srv);

/* Accepting is on: no upgrade under way or done. */
int upgrade_accepting(const struct server *srv);

/* This process handed its listeners over and only drains its sessions. */
int upgrade_draining(const struct server *srv);

/* systemd's notification socket ($NOTIFY_SOCKET), when there is one. */
void upgrade_sd_notify(const char *msg);

void upgrade_free(struct server *srv);

#endif
