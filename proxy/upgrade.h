/* upgrade: zero-downtime restart: re-exec, listeners handed over, the old process drains. */
#ifndef UPGRADE_H
#define UPGRADE_H

struct server;
struct session;

/* Environment the old process passes to the new one. */
#define UPGRADE_ENV_FDS "IMAPFRESH_LISTEN_FDS"		/* "fd:key,fd:key..." */
#define UPGRADE_ENV_READY "IMAPFRESH_UPGRADE_READY_FD"	/* write "<pid>\n" when serving */
#define UPGRADE_ENV_NEXT "IMAPFRESH_UPGRADE_NEXT_SESSION"	/* first session number */
#define UPGRADE_ENV_GENERATION "IMAPFRESH_UPGRADE_GENERATION"	/* upgrades so far */

/* At start, before anything else: remember how this process was started
 * (the binary's path, argv) and read what an old process passed on. */
void upgrade_init(int argc, char **argv);

/* A listening socket the old process passed under key ("listen=host:port",
 * "listen_tls=host:port", "admin=spec"), or -1: bind one. */
int upgrade_take_fd(const char *key);

/* Start-up is complete (bound, daemonized, pid file written): close the
 * passed sockets nobody took, tell the old process or systemd we serve. */
void upgrade_started(struct server *srv);

/* SIGUSR2: start the new binary and hand everything over to it. In a
 * worker (workers > 1): hand over to the new generation and drain. */
void upgrade_start(struct server *srv);

/* Accepting is on: no upgrade under way or done. */
int upgrade_accepting(const struct server *srv);

/* This process handed its listeners over and only drains its sessions. */
int upgrade_draining(const struct server *srv);

/* systemd's notification socket ($NOTIFY_SOCKET), when there is one. */
void upgrade_sd_notify(const char *msg);

void upgrade_free(struct server *srv);

/* Upgrades since the service started (worker instance names carry it). */
int upgrade_generation(void);

/* pid_file: written; removed only while it still holds our pid. */
void upgrade_write_pid(const char *path);
void upgrade_remove_pid(const char *path);

/* --- the master of workers > 1 (workers.c, main.c) --- */

/* Before forking: every worker's listeners and admin socket, passed by the
 * master we replace or bound now, keys "w<N>:...". -1 with err set. */
int upgrade_master_bind(struct server *srv, char *err, size_t errlen);

/* In worker N just after fork: its own sockets only. */
void upgrade_worker_fds(int worker);

/* SIGUSR2 in the master: exec the new master with every socket. -1: not. */
int upgrade_master_start(struct server *srv);
int upgrade_master_starting(void);

/* While starting: 0 waiting, 1 the new master serves (our copies closed,
 * systemd told: now tell the workers), -1 failed (logged). */
int upgrade_master_poll(struct server *srv);

/* Started by an upgrade: the old process waits for our report (a single
 * process's comes from upgrade_started(); a new master's once every worker
 * serves, they send SIGRTMIN), and the pid file is written only then.
 * upgrade_master_ready() -1: nobody waits any more. */
int upgrade_must_report(void);
int upgrade_master_ready(struct server *srv);

#endif
