/* workers: with workers > 1 the first process forks the workers and keeps them running; signals pass through it. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "log.h"
#include "upgrade.h"
#include "workers.h"

#define WORKERS_MAX 64
#define WORKERS_EARLY_SECS 2	/* a worker dying this soon after its start failed to start */

struct workers {
	struct server *srv;
	pid_t pid[WORKERS_MAX];
	time_t started[WORKERS_MAX];
	int live;
	int stopping;
	int handed_over;	/* a new master serves: ours only drain */
	int ready[WORKERS_MAX];	/* as a new master: which reported serving */
	int n_ready;
	int status;		/* the master's exit status */
	sigset_t old_mask;
};

/* Fork worker i. Returns 1 in the worker, 0 in the master, -1 on failure. */
static int
workers_spawn(struct workers *w, int i)
{
	char tag[32];
	pid_t pid = fork();

	if (pid < 0) {
		log_error("worker %d: fork: %s", i, strerror(errno));
		return -1;
	}
	if (pid == 0) {
		sigprocmask(SIG_SETMASK, &w->old_mask, NULL);
#ifdef __linux__
		/* A worker must not outlive its master (kill -9 of the master). */
		prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif
		w->srv->worker = i;
		upgrade_worker_fds(i);
		snprintf(tag, sizeof(tag), "worker %d", i);
		log_set_tag(tag);
		return 1;
	}
	w->pid[i] = pid;
	w->started[i] = time(NULL);
	w->live++;
	return 0;
}

static void
workers_signal_all(struct workers *w, int sig)
{
	for (int i = 0; i < w->srv->workers; i++)
		if (w->pid[i] > 0)
			kill(w->pid[i], sig);
}

/* sig is the one the master got, passed on so that the workers' logs name it. */
static void
workers_stop(struct workers *w, int status, int sig)
{
	if (!w->stopping)
		w->status = status;
	w->stopping = 1;
	workers_signal_all(w, sig);
}

static void
workers_describe(int st, char *buf, size_t len)
{
	if (WIFEXITED(st))
		snprintf(buf, len, "exited with status %d", WEXITSTATUS(st));
	else if (WIFSIGNALED(st))
		snprintf(buf, len, "was killed by signal %d", WTERMSIG(st));
	else
		snprintf(buf, len, "stopped (status %d)", st);
}

/* Reap dead workers; restart those that died in service. Returns 1 in a
 * freshly forked worker. */
static int
workers_reap(struct workers *w)
{
	char how[64];
	pid_t pid;
	int st;

	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		int i;

		for (i = 0; i < w->srv->workers && w->pid[i] != pid; i++)
			;
		if (i == w->srv->workers)
			continue;
		w->pid[i] = 0;
		w->live--;
		if (w->stopping || w->handed_over)
			continue;
		workers_describe(st, how, sizeof(how));
		if (time(NULL) - w->started[i] < WORKERS_EARLY_SECS &&
		    WIFEXITED(st) && WEXITSTATUS(st) != 0) {
			/* Its own error is on stderr or in the log already. */
			log_error("worker %d (pid %ld) %s at start: stopping", i, (long)pid, how);
			workers_stop(w, WEXITSTATUS(st), SIGTERM);
			continue;
		}
		log_warning("worker %d (pid %ld) %s; starting a new one", i, (long)pid, how);
		/* One that keeps dying young is restarted once a second, not in a spin
		 * (signals stay blocked meanwhile, none is lost). */
		if (time(NULL) - w->started[i] < WORKERS_EARLY_SECS)
			sleep(1);
		if (workers_spawn(w, i) == 1)
			return 1;
	}
	return 0;
}

/* As the new master of an upgrade: worker i serves (SIGRTMIN from it). */
static void
workers_ready(struct workers *w, int i)
{
	if (!upgrade_must_report() || i < 0 || i >= w->srv->workers || w->ready[i])
		return;
	w->ready[i] = 1;
	if (++w->n_ready == w->srv->workers && upgrade_master_ready(w->srv) < 0)
		workers_stop(w, 1, SIGTERM);
}

int
workers_start(struct server *srv)
{
	static struct workers w;
	struct timespec tick = { 0, 100 * 1000000L };	/* polling an upgrade's pipe */
	siginfo_t si;
	sigset_t set;
	int sig;

	w.srv = srv;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGRTMIN);	/* a worker serves (upgrade.c) */
	/* Blocked before the first fork: no signal is lost between them. */
	sigprocmask(SIG_BLOCK, &set, &w.old_mask);
	for (int i = 0; i < srv->workers; i++) {
		int r = workers_spawn(&w, i);

		if (r == 1)
			return WORKERS_CHILD;
		if (r < 0) {
			workers_stop(&w, 1, SIGTERM);
			break;
		}
	}
	if (!w.stopping) {
		log_notice("imapfresh master: %d workers started", srv->workers);
		if (!upgrade_must_report())
			upgrade_sd_notify("READY=1");	/* else the old master names us */
	}
	while (w.live > 0) {
		if (upgrade_master_starting() && upgrade_master_poll(srv) > 0 && !w.stopping) {
			w.handed_over = 1;
			workers_signal_all(&w, SIGUSR2);
		}
		sig = upgrade_master_starting() ? sigtimedwait(&set, &si, &tick) :
		    sigwaitinfo(&set, &si);
		if (sig < 0)
			continue;	/* EINTR, or the tick */
		if (sig == SIGRTMIN) {
			workers_ready(&w, si.si_value.sival_int);
			continue;
		}
		switch (sig) {
		case SIGTERM:
		case SIGINT:
			log_notice("master: %s: stopping the workers", sig == SIGTERM ? "SIGTERM" : "SIGINT");
			workers_stop(&w, 0, sig);
			break;
		case SIGHUP:
			log_notice("master: SIGHUP: passed on to the workers");
			workers_signal_all(&w, SIGHUP);
			break;
		case SIGUSR2:
			if (w.stopping || w.handed_over)
				log_warning("master: SIGUSR2 ignored: %s", w.stopping ? "stopping" :
				    "handed over already");
			else
				upgrade_master_start(srv);
			break;
		case SIGCHLD:
			if (workers_reap(&w))
				return WORKERS_CHILD;
			break;
		}
	}
	return w.status;
}
