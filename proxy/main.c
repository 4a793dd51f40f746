/* main: command line, daemon start-up and the event loop. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>
#include <event2/event.h>

#include "config-auto.h"
#if defined(HAVE_MALLOC_H) && defined(HAVE_MALLOPT)
#include <malloc.h>
#endif
#include "log.h"
#include "loop.h"
#include "workers.h"
#include "server.h"
#include "tls.h"
#include "upgrade.h"

#define MAIN_EXIT_RUNTIME 1
#define MAIN_EXIT_CONFIG 2
#define MAIN_DEFAULT_CONFIG SYSCONFDIR "/imapfresh.conf"

static void
main_usage(FILE *f)
{
	fprintf(f, "usage: imapfresh [-f] [-t] [-v] [-c file] [-o key=value]...\n"
	    "  -c file       configuration file (default %s when it exists)\n"
	    "  -o key=value  set a configuration key, overriding the file (repeatable)\n"
	    "  -f            stay in the foreground and log to stderr\n"
	    "  -t            check the configuration and exit\n"
	    "  -v            print the version and exit\n", MAIN_DEFAULT_CONFIG);
}

/* With epoll's changelist, the add and delete of an event in one loop pass
 * (a write queued then done) cost no epoll_ctl. Its caveat: a socket must
 * never be dup()ed, or the kernel keeps a registration libevent has deleted
 * (tls_upgrade() hands the socket itself over for that reason). */
static struct event_base *
main_event_base(void)
{
	struct event_config *ec = event_config_new();
	struct event_base *base;

	if (ec == NULL)
		return NULL;
	event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
	base = event_base_new_with_config(ec);
	event_config_free(ec);
	return base;
}

/* More sessions need more descriptors than the usual soft limit of 1024. */
static void
main_raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/*
 * Bulk transfers allocate and free 128 KiB buffer chains all the time.
 * glibc's defaults give that memory back to the kernel when the top of the
 * heap frees up and take it again on the next chain: under TLS FETCH that
 * was a page fault per 48 KB relayed and a brk() per 350 KB. Keep up to
 * 4 MiB of free heap instead.
 */
static void
main_tune_malloc(void)
{
#if defined(HAVE_MALLOC_H) && defined(HAVE_MALLOPT) && defined(M_TRIM_THRESHOLD)
	mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 4 * 1024 * 1024);
#endif
}

static int
main_drop_privileges(const char *user, char *err, size_t errlen)
{
	struct passwd *pw;

	if (user[0] == '\0')
		return 0;
	if ((pw = getpwnam(user)) == NULL) {
		snprintf(err, errlen, "user: no such user \"%s\"", user);
		return -1;
	}
	if (getuid() == pw->pw_uid && geteuid() == pw->pw_uid && getgid() == pw->pw_gid)
		return 0;	/* started by an upgrade of a process that had switched */
	if (initgroups(pw->pw_name, pw->pw_gid) < 0 || setgid(pw->pw_gid) < 0 ||
	    setuid(pw->pw_uid) < 0) {
		snprintf(err, errlen, "user: cannot switch to \"%s\": %s", user, strerror(errno));
		return -1;
	}
	return 0;
}

static int
main_daemonize(void)
{
	int fd;

	switch (fork()) {
	case -1:
		return -1;
	case 0:
		break;
	default:
		_exit(0);
	}
	if (setsid() < 0)
		return -1;
	if (chdir("/") < 0)
		return -1;
	if ((fd = open("/dev/null", O_RDWR)) >= 0) {
		dup2(fd, STDIN_FILENO);
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		if (fd > STDERR_FILENO)
			close(fd);
	}
	return 0;
}

/* Worker N is instance <instance_id or host name>-wN: its own entry in the
 * registry, its own session keys. An override, so that a reload keeps it.
 * After G upgrades it is <...>-wN-gG: the old worker N, still draining, is
 * another instance. */
static void
main_worker_instance(struct server *srv, char **overrides, int *n_overrides)
{
	static char setting[sizeof(srv->cfg.instance_id) + 32];
	char base[sizeof(srv->cfg.instance_id)] = "imapfresh";

	if (srv->cfg.instance_id[0] != '\0')
		snprintf(base, sizeof(base), "%s", srv->cfg.instance_id);
	else if (gethostname(base, sizeof(base) - 1) < 0 || base[0] == '\0')
		snprintf(base, sizeof(base), "imapfresh");
	if (upgrade_generation() > 0)
		snprintf(setting, sizeof(setting), "instance_id=%.*s-w%d-g%d",
		    (int)sizeof(srv->cfg.instance_id) - 24, base, srv->worker, upgrade_generation());
	else
		snprintf(setting, sizeof(setting), "instance_id=%.*s-w%d",
		    (int)sizeof(srv->cfg.instance_id) - 8, base, srv->worker);
	snprintf(srv->cfg.instance_id, sizeof(srv->cfg.instance_id), "%.*s",
	    (int)sizeof(srv->cfg.instance_id) - 1, setting + strlen("instance_id="));
	overrides[(*n_overrides)++] = setting;
	srv->n_overrides = *n_overrides;
}

static void
main_warn(void *arg, const char *msg)
{
	log_warning("%s", msg);
}

int
main(int argc, char **argv)
{
	static struct server srv;
	char *overrides[argc + 1];	/* lives as long as the process: reload reads it */
	const char *config_file = NULL;
	int n_overrides = 0, foreground = 0, check_only = 0, has_master = 0, ch;
	struct event_base *base;
	char err[2048], upstream[300];

	upgrade_init(argc, argv);	/* before getopt() reorders argv */

	while ((ch = getopt(argc, argv, "c:o:ftvh")) != -1) {
		switch (ch) {
		case 'c':
			config_file = optarg;
			break;
		case 'o':
			overrides[n_overrides++] = optarg;
			break;
		case 'f':
			foreground = 1;
			break;
		case 't':
			check_only = 1;
			break;
		case 'v':
			printf("imapfresh %s\n", PACKAGE_VERSION);
			return 0;
		case 'h':
			main_usage(stdout);
			return 0;
		default:
			main_usage(stderr);
			return MAIN_EXIT_CONFIG;
		}
	}
	if (optind != argc) {
		main_usage(stderr);
		return MAIN_EXIT_CONFIG;
	}
	if (config_file == NULL && access(MAIN_DEFAULT_CONFIG, R_OK) == 0)
		config_file = MAIN_DEFAULT_CONFIG;

	if (server_load_config(&srv.cfg, config_file, overrides, n_overrides, err, sizeof(err)) < 0) {
		fprintf(stderr, "imapfresh: %s\n", err);
		return MAIN_EXIT_CONFIG;
	}
	srv.config_file = config_file;
	srv.overrides = overrides;
	srv.n_overrides = n_overrides;
	log_init(foreground || check_only, srv.cfg.log_level);
	config_warnings(&srv.cfg, main_warn, NULL);

	if (check_only) {
		SSL_CTX *sctx = tls_server_ctx_new(&srv.cfg, err, sizeof(err));
		SSL_CTX *cctx = err[0] ? NULL : tls_client_ctx_new(&srv.cfg, err, sizeof(err));

		if (err[0] != '\0') {
			fprintf(stderr, "imapfresh: %s\n", err);
			return MAIN_EXIT_CONFIG;
		}
		SSL_CTX_free(sctx);
		SSL_CTX_free(cctx);
		printf("imapfresh: configuration ok\n");
		return 0;
	}

	signal(SIGPIPE, SIG_IGN);
	main_raise_nofile();
	main_tune_malloc();
	srv.workers = srv.cfg.workers;
	if (srv.workers > 1) {
		int rc;

		/* The master binds every worker's sockets (they outlive workers
		 * and, passed on, the master: upgrade.c), daemonizes and owns the
		 * pid file; workers report their own start-up errors on the same
		 * stderr. */
		if (upgrade_master_bind(&srv, err, sizeof(err)) < 0) {
			fprintf(stderr, "imapfresh: %s\n", err);
			return MAIN_EXIT_RUNTIME;
		}
		if (!foreground && main_daemonize() < 0) {
			fprintf(stderr, "imapfresh: cannot daemonize: %s\n", strerror(errno));
			return MAIN_EXIT_RUNTIME;
		}
		foreground = 1;
		has_master = 1;
		if (!upgrade_must_report())	/* else once its workers serve */
			upgrade_write_pid(srv.cfg.pid_file);
		if ((rc = workers_start(&srv)) != WORKERS_CHILD) {
			upgrade_remove_pid(srv.cfg.pid_file);
			log_notice("master: exiting");
			return rc;
		}
		main_worker_instance(&srv, overrides, &n_overrides);
	}
	if ((base = main_event_base()) == NULL) {
		fprintf(stderr, "imapfresh: cannot create the event loop\n");
		return MAIN_EXIT_RUNTIME;
	}
	if (server_init(&srv, base, err, sizeof(err)) < 0) {
		fprintf(stderr, "imapfresh: %s\n", err);
		return strncmp(err, "tls", 3) == 0 || strncmp(err, "upstream_ca", 11) == 0 ?
		    MAIN_EXIT_CONFIG : MAIN_EXIT_RUNTIME;
	}
	if (main_drop_privileges(srv.cfg.user, err, sizeof(err)) < 0) {
		fprintf(stderr, "imapfresh: %s\n", err);
		return MAIN_EXIT_RUNTIME;
	}
	if (!foreground) {
		if (main_daemonize() < 0 || event_reinit(base) < 0) {
			fprintf(stderr, "imapfresh: cannot daemonize: %s\n", strerror(errno));
			return MAIN_EXIT_RUNTIME;
		}
	}
	if (!has_master && !upgrade_must_report())	/* else once reported */
		upgrade_write_pid(srv.cfg.pid_file);
	upgrade_started(&srv);
	log_notice("imapfresh %s started, upstream %s (%s)", PACKAGE_VERSION,
	    config_fmt_addr(&srv.cfg.upstream, upstream, sizeof(upstream)),
	    srv.cfg.upstream_tls == UPSTREAM_TLS_TLS ? "tls" :
	    srv.cfg.upstream_tls == UPSTREAM_TLS_STARTTLS ? "starttls" : "plaintext");

	loop_run(&srv);

	server_free(&srv);
	event_base_free(base);
	if (!has_master)
		upgrade_remove_pid(srv.cfg.pid_file);	/* after an upgrade, the new one's */
	log_notice("exiting");
	return 0;
}
