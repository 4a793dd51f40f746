/* upgrade: zero-downtime restart: re-exec, listeners handed over, the old process drains. */

/*
 * SIGUSR2 (imapfresh-ctl upgrade): the old process stops accepting (the
 * kernel queues new connections meanwhile, none is refused), forks and
 * execs the binary now at its own path, with the same arguments, so the new
 * process reads the configuration afresh. The listening sockets, the admin
 * endpoint's included, are inherited across exec: IMAPFRESH_LISTEN_FDS
 * names each by descriptor and key. The new process binds only what it was
 * not given, and once it serves (bound, daemonized) it writes its pid down
 * a pipe, then into the pid file. Then the old one tells systemd the new
 * main pid, closes its copies of the listeners and drains:
 *
 *   - a session between commands, quiet for UPGRADE_QUIET_USECS, gets
 *     "* BYE" and is closed: the client reconnects, to the new process;
 *   - a command under way runs to its tagged response (a FETCH gets all its
 *     bytes), then the session is between commands as above;
 *   - IDLE is left alone: the client's DONE is answered as always;
 *   - at upgrade_drain_timeout every session left gets "* BYE" at once (an
 *     idling one included; one inside a literal is just closed), with the
 *     shutdown's 10 s for the output to drain.
 *
 * The old process exits when its last session is gone. If the new process
 * fails to start, or does not report within UPGRADE_READY_SECS, the old
 * one accepts again and nothing changed.
 *
 * With workers > 1 the master owns the sockets: it binds every worker's
 * set (its own SO_REUSEPORT listeners, its admin port) before forking, keys
 * "w<N>:listen=...", so a worker restarted, or a new generation of
 * workers, takes over the very socket and its queue. SIGUSR2 goes to the
 * master, which execs the new master with all of them; that one reports
 * once each of its workers has (SIGRTMIN from each worker). Then the old
 * master sends SIGUSR2 to its workers, which hand over as above, and it
 * exits when they all have. Worker instance names carry the generation
 * ("<id>-w0-g1"), so old and new workers never share session ids.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <event2/event.h>
#include <event2/listener.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "admin.h"
#include "log.h"
#include "metrics.h"
#include "server.h"
#include "session.h"
#include "store.h"
#include "upgrade.h"

#define UPGRADE_READY_SECS 30		/* the new process's start-up, at most */
#define UPGRADE_SCAN_USECS 250000	/* how often draining looks for idle sessions */
#define UPGRADE_QUIET_USECS 1000000	/* between commands this long: idle */
#define UPGRADE_OLD_GRACE_SECS 15	/* the old process's flush after its deadline, and more */
#define UPGRADE_BYE "[UNAVAILABLE] imapfresh is restarting, please reconnect"

struct upgrade_fd {
	int fd;
	int taken;
	char key[340];
};

enum upgrade_state {
	UPGRADE_NONE,
	UPGRADE_STARTING,	/* the new process is starting; not accepting */
	UPGRADE_DRAINING,	/* handed over: only the sessions are left */
};

static struct {
	/* how this process was started, for the next one */
	char exe[4096];
	char **argv;
	char cwd[4096];		/* relative paths in argv: daemonizing left it */
	/* passed by the old process (and, in a master, every worker's) */
	struct upgrade_fd *fds;
	int n_fds, cap_fds;
	int ready_fd;
	uint64_t next_session;
	int has_next;
	int generation;		/* upgrades since the service started */
	/* as the old process */
	enum upgrade_state state;
	pid_t child;
	int pipe_rd;
	char reply[32];
	size_t reply_len;
	struct timespec ready_by;	/* a master's deadline for the new one */
	struct event *ev_ready, *ev_timeout, *ev_child, *ev_scan, *ev_deadline;
	struct event *ev_overlap;	/* as the new process: the old one may still live */
} up = { .ready_fd = -1, .pipe_rd = -1 };

static int
upgrade_add_fd(int fd, const char *key, size_t key_len)
{
	struct upgrade_fd *f;

	if (up.n_fds == up.cap_fds) {
		int cap = up.cap_fds ? up.cap_fds * 2 : 8;
		struct upgrade_fd *n = realloc(up.fds, (size_t)cap * sizeof(*n));

		if (n == NULL)
			return -1;
		up.fds = n;
		up.cap_fds = cap;
	}
	f = &up.fds[up.n_fds++];
	f->fd = fd;
	f->taken = 0;
	snprintf(f->key, sizeof(f->key), "%.*s", (int)key_len, key);
	return 0;
}

static void
upgrade_parse_fds(const char *v)
{
	while (v != NULL && *v != '\0') {
		const char *end = strchr(v, ','), *colon;
		size_t len = end ? (size_t)(end - v) : strlen(v);
		char *num_end;
		long fd = strtol(v, &num_end, 10);
		int listening = 0;
		socklen_t sl = sizeof(listening);

		colon = num_end;
		if (*colon == ':' && fd > 2 && (size_t)(colon + 1 - v) < len &&
		    len - (size_t)(colon + 1 - v) < sizeof(up.fds[0].key) &&
		    fcntl((int)fd, F_GETFD) >= 0 &&
		    getsockopt((int)fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &sl) == 0 && listening &&
		    upgrade_add_fd((int)fd, colon + 1, len - (size_t)(colon + 1 - v)) == 0) {
			fcntl((int)fd, F_SETFD, FD_CLOEXEC);	/* ours now; not for later children */
		} else
			fprintf(stderr, "imapfresh: %s: ignoring \"%.*s\": not a listening socket\n",
			    UPGRADE_ENV_FDS, (int)len, v);
		v = end ? end + 1 : NULL;
	}
}

void
upgrade_init(int argc, char **argv)
{
	ssize_t n = readlink("/proc/self/exe", up.exe, sizeof(up.exe) - 1);
	const char *v;

	/* The path, not /proc/self/exe: that stays the old binary once replaced. */
	if (n > 0) {
		const char *del = " (deleted)";
		size_t dl = strlen(del);

		up.exe[n] = '\0';
		if ((size_t)n > dl && strcmp(up.exe + n - dl, del) == 0)
			up.exe[n - dl] = '\0';
	} else
		snprintf(up.exe, sizeof(up.exe), "%s", argv[0]);
	if (getcwd(up.cwd, sizeof(up.cwd)) == NULL)
		up.cwd[0] = '\0';
	/* getopt() may permute the array; the strings stay. */
	if ((up.argv = calloc((size_t)argc + 1, sizeof(*up.argv))) != NULL)
		memcpy(up.argv, argv, (size_t)argc * sizeof(*argv));
	upgrade_parse_fds(getenv(UPGRADE_ENV_FDS));
	if ((v = getenv(UPGRADE_ENV_READY)) != NULL && atoi(v) > 2 && fcntl(atoi(v), F_GETFD) >= 0) {
		up.ready_fd = atoi(v);
		fcntl(up.ready_fd, F_SETFD, FD_CLOEXEC);
	}
	if ((v = getenv(UPGRADE_ENV_NEXT)) != NULL) {
		up.next_session = strtoull(v, NULL, 10);
		up.has_next = 1;
	}
	if ((v = getenv(UPGRADE_ENV_GENERATION)) != NULL && atoi(v) > 0)
		up.generation = atoi(v);
	unsetenv(UPGRADE_ENV_GENERATION);
	unsetenv(UPGRADE_ENV_FDS);
	unsetenv(UPGRADE_ENV_READY);
	unsetenv(UPGRADE_ENV_NEXT);
}

int
upgrade_take_fd(const char *key)
{
	for (int i = 0; i < up.n_fds; i++)
		if (!up.fds[i].taken && strcmp(up.fds[i].key, key) == 0) {
			up.fds[i].taken = 1;
			return up.fds[i].fd;
		}
	return -1;
}

void
upgrade_sd_notify(const char *msg)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t len;
	int fd;

	if (path == NULL || (path[0] != '/' && path[0] != '@') ||
	    (len = strlen(path)) >= sizeof(sa.sun_path))
		return;
	memcpy(sa.sun_path, path, len);
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = '\0';	/* abstract namespace */
	if ((fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0)
		return;
	if (sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa,
	    (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) < 0)
		log_warning("NOTIFY_SOCKET %s: %s", path, strerror(errno));
	close(fd);
}

static void
upgrade_overlap_end_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;

	if (srv->store != NULL)
		store_upgrade_overlap(srv->store, 0, 0);
}

/* Until the old process is surely gone, its changes reach us through Redis
 * under our own instance name. */
static void
upgrade_overlap(struct server *srv)
{
	struct timeval t = { srv->cfg.upgrade_drain_timeout + UPGRADE_OLD_GRACE_SECS, 0 };

	if (srv->store == NULL || (up.ev_overlap = evtimer_new(srv->base, upgrade_overlap_end_cb,
	    srv)) == NULL)
		return;
	store_upgrade_overlap(srv->store, 1, 0);
	event_add(up.ev_overlap, &t);
}

void
upgrade_started(struct server *srv)
{
	char msg[64];
	int n;

	for (int i = 0; i < up.n_fds; i++)
		if (!up.fds[i].taken) {
			log_notice("upgrade: %s is no longer configured: closed", up.fds[i].key);
			close(up.fds[i].fd);
			up.fds[i].taken = 1;
		}
	if (up.has_next && up.next_session > srv->next_session_id)
		srv->next_session_id = up.next_session;	/* sids unique across both */
	if (up.ready_fd >= 0) {
		n = snprintf(msg, sizeof(msg), "%ld\n", (long)getpid());
		if (write(up.ready_fd, msg, (size_t)n) != n) {
			/* The old process gave up on us and accepts again. */
			log_error("upgrade: the old process is not waiting any more (%s); exiting",
			    strerror(errno));
			exit(1);
		}
		close(up.ready_fd);
		up.ready_fd = -1;
		upgrade_write_pid(srv->cfg.pid_file);
		log_notice("upgrade: serving; the old process hands over");
		upgrade_overlap(srv);
	} else if (srv->workers > 1) {
		union sigval v = { .sival_int = srv->worker };

		sigqueue(getppid(), SIGRTMIN, v);	/* a new master waits for each worker */
	} else {
		snprintf(msg, sizeof(msg), "READY=1\nMAINPID=%ld", (long)getpid());
		upgrade_sd_notify(msg);
	}
}

int
upgrade_generation(void)
{
	return up.generation;
}

int
upgrade_accepting(const struct server *srv)
{
	return up.state == UPGRADE_NONE;
}

int
upgrade_draining(const struct server *srv)
{
	return up.state == UPGRADE_DRAINING;
}

/* --- the new process --- */

/* In the forked child: only the listeners and the pipe cross the exec. */
static void
upgrade_exec(const int *keep, int n_keep, const char *fds, int ready_fd, uint64_t next)
{
	DIR *d = opendir("/proc/self/fd");
	char buf[32];
	sigset_t none;

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);	/* a master blocks the ones it waits for */
	if (d != NULL) {
		struct dirent *e;

		while ((e = readdir(d)) != NULL) {
			int fd = atoi(e->d_name), i;

			if (fd <= STDERR_FILENO || fd == dirfd(d))
				continue;
			for (i = 0; i < n_keep && keep[i] != fd; i++)
				;
			if (i == n_keep)
				fcntl(fd, F_SETFD, FD_CLOEXEC);	/* upstream sockets above all */
		}
		closedir(d);
	}
	for (int i = 0; i < n_keep; i++)
		fcntl(keep[i], F_SETFD, 0);
	setenv(UPGRADE_ENV_FDS, fds, 1);
	snprintf(buf, sizeof(buf), "%d", ready_fd);
	setenv(UPGRADE_ENV_READY, buf, 1);
	snprintf(buf, sizeof(buf), "%llu", (unsigned long long)next);
	setenv(UPGRADE_ENV_NEXT, buf, 1);
	snprintf(buf, sizeof(buf), "%d", up.generation + 1);
	setenv(UPGRADE_ENV_GENERATION, buf, 1);
	if (up.cwd[0] != '\0' && chdir(up.cwd) < 0)
		fprintf(stderr, "imapfresh: upgrade: %s: %s\n", up.cwd, strerror(errno));
	if (up.argv != NULL) {
		if (strchr(up.exe, '/') != NULL)
			execv(up.exe, up.argv);
		else
			execvp(up.exe, up.argv);
	}
	fprintf(stderr, "imapfresh: upgrade: cannot run %s: %s\n", up.exe, strerror(errno));
	_exit(127);
}

static void
upgrade_listeners_enable(struct server *srv, int on)
{
	for (int i = 0; i < srv->n_listeners; i++)
		if (on)
			evconnlistener_enable(srv->listeners[i].lev);
		else
			evconnlistener_disable(srv->listeners[i].lev);
}

static void
upgrade_stop_waiting(void)
{
	if (up.ev_ready != NULL)
		event_free(up.ev_ready);
	if (up.ev_timeout != NULL)
		event_free(up.ev_timeout);
	up.ev_ready = up.ev_timeout = NULL;
	if (up.pipe_rd >= 0)
		close(up.pipe_rd);
	up.pipe_rd = -1;
	up.reply_len = 0;
}

static void
upgrade_failed(struct server *srv, const char *why)
{
	log_error("upgrade failed: %s; this process goes on serving", why);
	upgrade_stop_waiting();
	up.state = UPGRADE_NONE;
	if (!srv->shutting_down)
		upgrade_listeners_enable(srv, 1);
}

/* --- draining --- */

/* Between commands: nothing under way either way, nothing read half. */
static int
upgrade_between_commands(const struct session *s)
{
	return s->state == SESSION_RUNNING && s->n_inflight == 0 && s->wait == WAIT_NONE &&
	    !s->held && s->resync.phase == RESYNC_NONE && s->client != NULL &&
	    (s->busy == NULL || (evbuffer_get_length(s->busy->cline) == 0 &&
	    imap_lex_at_command_start(s->busy->clex))) &&
	    evbuffer_get_length(bufferevent_get_input(s->client)) == 0;
}

static uint64_t
upgrade_quiet_usecs(const struct session *s, uint64_t now)
{
	struct timeval tv, age;

	if (s->last_active_usec != 0)
		return now > s->last_active_usec ? now - s->last_active_usec : 0;
	gettimeofday(&tv, NULL);	/* no command yet: quiet since it connected */
	timersub(&tv, &s->started, &age);
	return age.tv_sec < 0 ? 0 : (uint64_t)age.tv_sec * 1000000u + (uint64_t)age.tv_usec;
}

static void
upgrade_scan_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;
	uint64_t now = metrics_now_usec();
	struct session *s;

	TAILQ_FOREACH(s, &srv->sessions, entry)
		if (upgrade_between_commands(s) && upgrade_quiet_usecs(s, now) >= UPGRADE_QUIET_USECS)
			session_close(s, UPGRADE_BYE, "upgrade: idle, the new process serves now");
}

static void
upgrade_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;
	struct session *s;

	log_notice("upgrade: upgrade_drain_timeout (%ds) reached, %u sessions left",
	    srv->cfg.upgrade_drain_timeout, srv->n_sessions);
	TAILQ_FOREACH(s, &srv->sessions, entry)
		session_close(s, UPGRADE_BYE, "upgrade: drain deadline");
	server_shutdown(srv, "upgrade drain deadline");
}

/* The new process serves: it takes the connections from now on. pid 0: a
 * worker whose master hands over to a new generation of workers. */
static void
upgrade_handover(struct server *srv, long pid)
{
	struct timeval scan = { 0, UPGRADE_SCAN_USECS };
	struct timeval deadline = { srv->cfg.upgrade_drain_timeout, 0 };
	char msg[64];

	upgrade_stop_waiting();
	if (pid > 0) {
		snprintf(msg, sizeof(msg), "MAINPID=%ld\nREADY=1", pid);
		upgrade_sd_notify(msg);
	}
	for (int i = 0; i < srv->n_listeners; i++)
		evconnlistener_free(srv->listeners[i].lev);	/* our copy; the queue lives on */
	srv->n_listeners = 0;
	if (pid > 0) {
		admin_release(srv);
		if (srv->store != NULL)
			store_upgrade_overlap(srv->store, 1, 1);
	} else
		admin_stop(srv);	/* the new worker is another instance */
	up.state = UPGRADE_DRAINING;
	if (pid > 0) {
		log_notice("upgrade: pid %ld serves now; draining %u sessions "
		    "(upgrade_drain_timeout %ds)", pid, srv->n_sessions,
		    srv->cfg.upgrade_drain_timeout);
		log_set_tag("draining");
	} else {
		log_notice("upgrade: a new generation of workers serves now; draining %u sessions "
		    "(upgrade_drain_timeout %ds)", srv->n_sessions, srv->cfg.upgrade_drain_timeout);
		snprintf(msg, sizeof(msg), "worker %d, draining", srv->worker);
		log_set_tag(msg);
	}
	if (srv->n_sessions == 0) {
		event_base_loopexit(srv->base, NULL);
		return;
	}
	up.ev_scan = event_new(srv->base, -1, EV_PERSIST, upgrade_scan_cb, srv);
	up.ev_deadline = evtimer_new(srv->base, upgrade_deadline_cb, srv);
	if (up.ev_scan != NULL)
		event_add(up.ev_scan, &scan);
	if (up.ev_deadline != NULL)
		event_add(up.ev_deadline, &deadline);
	upgrade_scan_cb(-1, 0, srv);
}

/* The pid line the new process writes: 1 with *pid set, 0 for more to
 * come, -1 when it will never come. */
static int
upgrade_read_reply(long *pid)
{
	ssize_t n = read(up.pipe_rd, up.reply + up.reply_len, sizeof(up.reply) - 1 - up.reply_len);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n > 0) {
		up.reply_len += (size_t)n;
		up.reply[up.reply_len] = '\0';
		if (strchr(up.reply, '\n') != NULL && (*pid = atol(up.reply)) > 0)
			return 1;
		if (up.reply_len < sizeof(up.reply) - 1)
			return 0;
	}
	return -1;
}

static void
upgrade_ready_cb(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;
	long pid = 0;
	int r = upgrade_read_reply(&pid);

	if (r > 0)
		upgrade_handover(srv, pid);
	else if (r < 0)
		upgrade_failed(srv, "the new process exited before serving (its error is in the log)");
}

static void
upgrade_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	if (up.child > 0)
		kill(up.child, SIGTERM);
	upgrade_failed(arg, "the new process did not report ready in time");
}

static void
upgrade_child_cb(evutil_socket_t sig, short what, void *arg)
{
	pid_t pid;
	int st;

	while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
		if (pid == up.child) {
			up.child = 0;
			if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
				log_warning("upgrade: the new process (pid %ld) ended, status %d",
				    (long)pid, st);
		}
}

/* Fork and exec the new binary, keep[0..n_keep) crossing the exec as list
 * says (keep has room for one more: the pipe). 0, or -1 logged. */
static int
upgrade_spawn(int *keep, int n_keep, const char *list, uint64_t next)
{
	int p[2];
	pid_t pid;

	if (pipe(p) < 0 || fcntl(p[0], F_SETFD, FD_CLOEXEC) < 0 ||
	    fcntl(p[1], F_SETFD, FD_CLOEXEC) < 0) {
		log_error("upgrade: pipe: %s", strerror(errno));
		return -1;
	}
	keep[n_keep++] = p[1];
	if ((pid = fork()) < 0) {
		log_error("upgrade: fork: %s", strerror(errno));
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid == 0)
		upgrade_exec(keep, n_keep, list, p[1], next);
	close(p[1]);
	evutil_make_socket_nonblocking(p[0]);
	up.child = pid;
	up.pipe_rd = p[0];
	up.reply_len = 0;
	up.state = UPGRADE_STARTING;
	return 0;
}

/* "fd:key,..." for IMAPFRESH_LISTEN_FDS. */
static void
upgrade_list_add(char *list, size_t *o, size_t size, int fd, const char *key)
{
	int n = snprintf(list + *o, size - *o, "%s%d:%s", *o ? "," : "", fd, key);

	if (n > 0 && (size_t)n < size - *o)
		*o += (size_t)n;
}

void
upgrade_start(struct server *srv)
{
	struct timeval ready = { UPGRADE_READY_SECS, 0 };
	int n = srv->n_listeners + 2, n_keep = 0, admin_fd;
	size_t o = 0, size = (size_t)n * 360 + 1;
	int *keep = malloc((size_t)n * sizeof(*keep));
	char *list = malloc(size), key[340];

	if (keep == NULL || list == NULL) {
		log_error("upgrade: out of memory");
		goto out;
	}
	if (srv->workers > 1) {
		/* Our master hands over to a new generation of workers (or an
		 * operator restarts this one: the master starts another). */
		if (up.state == UPGRADE_NONE && !srv->shutting_down)
			upgrade_handover(srv, 0);
		goto out;
	}
	if (srv->shutting_down || up.state != UPGRADE_NONE) {
		log_warning("SIGUSR2 ignored: %s", srv->shutting_down ? "shutting down" :
		    up.state == UPGRADE_STARTING ? "an upgrade is under way" :
		    "this process has handed over already");
		goto out;
	}
	list[0] = '\0';
	for (int i = 0; i < srv->n_listeners; i++) {
		keep[n_keep] = evconnlistener_get_fd(srv->listeners[i].lev);
		snprintf(key, sizeof(key), "listen%s=%s", srv->listeners[i].tls ? "_tls" : "",
		    srv->listeners[i].name);
		upgrade_list_add(list, &o, size, keep[n_keep++], key);
	}
	if ((admin_fd = admin_listener_fd(srv)) >= 0) {
		keep[n_keep] = admin_fd;
		snprintf(key, sizeof(key), "admin=%s", srv->cfg.admin_listen);
		upgrade_list_add(list, &o, size, keep[n_keep++], key);
	}
	if (up.ev_child == NULL && (up.ev_child = evsignal_new(srv->base, SIGCHLD, upgrade_child_cb,
	    srv)) != NULL)
		event_add(up.ev_child, NULL);
	/* Until the new process serves, connections wait in the kernel's queue. */
	upgrade_listeners_enable(srv, 0);
	log_notice("SIGUSR2: starting %s; new connections wait for it", up.exe);
	if (upgrade_spawn(keep, n_keep, list, srv->next_session_id) < 0) {
		upgrade_listeners_enable(srv, 1);
		goto out;
	}
	up.ev_ready = event_new(srv->base, up.pipe_rd, EV_READ | EV_PERSIST, upgrade_ready_cb, srv);
	up.ev_timeout = evtimer_new(srv->base, upgrade_timeout_cb, srv);
	if (up.ev_ready == NULL || up.ev_timeout == NULL) {
		kill(up.child, SIGTERM);
		upgrade_failed(srv, "out of memory");
		goto out;
	}
	event_add(up.ev_ready, NULL);
	event_add(up.ev_timeout, &ready);
out:
	free(keep);
	free(list);
}

/* --- the pid file --- */

void
upgrade_write_pid(const char *path)
{
	FILE *f;

	if (path[0] == '\0')
		return;
	if ((f = fopen(path, "w")) == NULL) {
		log_warning("pid_file %s: %s", path, strerror(errno));
		return;
	}
	fprintf(f, "%ld\n", (long)getpid());
	fclose(f);
}

void
upgrade_remove_pid(const char *path)
{
	char buf[32] = "";
	FILE *f;

	if (path[0] == '\0' || (f = fopen(path, "r")) == NULL)
		return;
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	fclose(f);
	if (atol(buf) == (long)getpid())	/* after an upgrade it is the new process's */
		unlink(path);
}

/* --- the master of workers > 1 --- */

static int
upgrade_bind_listener(const struct config_addr *a, int tls, char *err, size_t errlen)
{
	struct addrinfo hints = { 0 }, *res = NULL;
	int fd, one = 1, gai;

	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG;
	if ((gai = getaddrinfo(a->host[0] ? a->host : NULL, a->port, &hints, &res)) != 0) {
		snprintf(err, errlen, "%s %s:%s: %s", tls ? "listen_tls" : "listen", a->host, a->port,
		    gai_strerror(gai));
		return -1;
	}
	/* Every worker its own socket; the kernel spreads connections. */
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0 ||
	    bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 1024) < 0) {
		snprintf(err, errlen, "%s %s:%s: %s", tls ? "listen_tls" : "listen", a->host, a->port,
		    strerror(errno));
		if (fd >= 0)
			close(fd);
		freeaddrinfo(res);
		return -1;
	}
	freeaddrinfo(res);
	return fd;
}

/* Was a socket under key passed on? It is marked wanted. */
static int
upgrade_master_socket(const char *key, int n_given)
{
	for (int i = 0; i < n_given; i++)
		if (strcmp(up.fds[i].key, key) == 0) {
			up.fds[i].taken = 1;
			return 1;
		}
	return 0;
}

int
upgrade_master_bind(struct server *srv, char *err, size_t errlen)
{
	const struct config *cfg = &srv->cfg;
	int n_given = up.n_fds, fd, j = 0;
	char key[340];

	for (int w = 0; w < srv->workers; w++) {
		for (int tls = 0; tls < 2; tls++) {
			const struct config_addr *a = tls ? cfg->listen_tls : cfg->listen;
			int n = tls ? cfg->n_listen_tls : cfg->n_listen;

			for (int i = 0; i < n; i++) {
				snprintf(key, sizeof(key), "w%d:%s=%s:%s", w, tls ? "listen_tls" : "listen",
				    a[i].host, a[i].port);
				if (upgrade_master_socket(key, n_given))
					continue;
				if ((fd = upgrade_bind_listener(&a[i], tls, err, errlen)) < 0)
					return -1;
				if (upgrade_add_fd(fd, key, strlen(key)) < 0) {
					snprintf(err, errlen, "out of memory");
					return -1;
				}
			}
		}
		if (cfg->admin_listen[0] == '\0')
			continue;
		snprintf(key, sizeof(key), "w%d:admin=%s", w, cfg->admin_listen);
		if (upgrade_master_socket(key, n_given))
			continue;
		if ((fd = admin_bind(cfg->admin_listen, w, err, errlen)) < 0)
			return -1;
		if (upgrade_add_fd(fd, key, strlen(key)) < 0) {
			snprintf(err, errlen, "out of memory");
			return -1;
		}
	}
	/* Passed sockets nothing asks for any more (fewer workers, a listener gone). */
	for (int i = 0; i < up.n_fds; i++) {
		if (i < n_given && !up.fds[i].taken) {
			close(up.fds[i].fd);
			continue;
		}
		up.fds[j] = up.fds[i];
		up.fds[j++].taken = 0;	/* each worker takes its own */
	}
	up.n_fds = j;
	return 0;
}

void
upgrade_worker_fds(int worker)
{
	char prefix[24];
	size_t plen = (size_t)snprintf(prefix, sizeof(prefix), "w%d:", worker);

	for (int i = 0; i < up.n_fds; i++) {
		struct upgrade_fd *f = &up.fds[i];

		if (strncmp(f->key, prefix, plen) == 0)
			memmove(f->key, f->key + plen, strlen(f->key + plen) + 1);
		else if (!f->taken) {
			close(f->fd);	/* another worker's */
			f->taken = 1;
		}
	}
	/* The master's business, not ours. */
	if (up.ready_fd >= 0)
		close(up.ready_fd);
	if (up.pipe_rd >= 0)
		close(up.pipe_rd);
	up.ready_fd = up.pipe_rd = -1;
	up.state = UPGRADE_NONE;
}

int
upgrade_master_start(struct server *srv)
{
	size_t o = 0, size = (size_t)up.n_fds * 360 + 1;
	int *keep = malloc(((size_t)up.n_fds + 1) * sizeof(*keep));
	char *list = malloc(size);
	int rc = -1;

	if (up.state != UPGRADE_NONE)
		log_warning("master: SIGUSR2 ignored: %s", up.state == UPGRADE_STARTING ?
		    "an upgrade is under way" : "this master has handed over already");
	else if (keep == NULL || list == NULL)
		log_error("master: upgrade: out of memory");
	else {
		list[0] = '\0';
		for (int i = 0; i < up.n_fds; i++) {
			keep[i] = up.fds[i].fd;
			upgrade_list_add(list, &o, size, keep[i], up.fds[i].key);
		}
		log_notice("master: SIGUSR2: starting %s; the workers serve on meanwhile", up.exe);
		if ((rc = upgrade_spawn(keep, up.n_fds, list, 0)) == 0) {
			clock_gettime(CLOCK_MONOTONIC, &up.ready_by);
			up.ready_by.tv_sec += UPGRADE_READY_SECS;
		}
	}
	free(keep);
	free(list);
	return rc;
}

int
upgrade_master_starting(void)
{
	return up.state == UPGRADE_STARTING;
}

static void
upgrade_master_failed(const char *why)
{
	log_error("master: upgrade failed: %s; the workers serve on", why);
	upgrade_stop_waiting();
	up.state = UPGRADE_NONE;
}

int
upgrade_master_poll(struct server *srv)
{
	struct timespec now;
	char msg[64];
	long pid = 0;
	int r = upgrade_read_reply(&pid);

	if (r < 0) {
		upgrade_master_failed("the new master exited before serving (its error is in the log)");
		return -1;
	}
	if (r == 0) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec < up.ready_by.tv_sec)
			return 0;
		kill(up.child, SIGTERM);
		upgrade_master_failed("the new master did not report ready in time");
		return -1;
	}
	upgrade_stop_waiting();
	snprintf(msg, sizeof(msg), "MAINPID=%ld\nREADY=1", pid);
	upgrade_sd_notify(msg);
	for (int i = 0; i < up.n_fds; i++)
		close(up.fds[i].fd);	/* the new master's now */
	up.n_fds = 0;
	up.state = UPGRADE_DRAINING;
	log_notice("master: upgrade: pid %ld serves now; the workers drain their sessions", pid);
	return 1;
}

int
upgrade_must_report(void)
{
	return up.ready_fd >= 0;
}

int
upgrade_master_ready(struct server *srv)
{
	char msg[32];
	int n = snprintf(msg, sizeof(msg), "%ld\n", (long)getpid());

	if (write(up.ready_fd, msg, (size_t)n) != n) {
		log_error("master: upgrade: the old master is not waiting any more (%s); stopping",
		    strerror(errno));
		return -1;
	}
	close(up.ready_fd);
	up.ready_fd = -1;
	upgrade_write_pid(srv->cfg.pid_file);
	log_notice("master: upgrade: every worker serves; the old master hands over");
	return 0;
}

void
upgrade_free(struct server *srv)
{
	upgrade_stop_waiting();
	if (up.ev_child != NULL)
		event_free(up.ev_child);
	if (up.ev_scan != NULL)
		event_free(up.ev_scan);
	if (up.ev_deadline != NULL)
		event_free(up.ev_deadline);
	if (up.ev_overlap != NULL)
		event_free(up.ev_overlap);
	up.ev_child = up.ev_scan = up.ev_deadline = up.ev_overlap = NULL;
}
