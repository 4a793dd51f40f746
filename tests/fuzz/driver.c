/* driver: main() of every fuzz target: replays the seed corpus and the regression inputs as TAP,
 * and with libFuzzer (configure --enable-fuzzing) also runs a short fuzz session. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "fuzz.h"

/*
 * tests/fuzz/fuzz_<target> with no arguments (make check):
 *
 *   ok 1 - <target>: N seed inputs replayed, invariants hold
 *   ok 2 - <target>: regression <file>          (one per crash-*, timeout-*,
 *                                                leak-*, oom-*, regress-* file)
 *   ok 3 - <target>: N runs, no crash            (--enable-fuzzing only)
 *
 * Every input runs in a child process (a crash or a hang fails that input
 * only, and names it). The corpus is $FUZZ_CORPUS, else
 * $top_srcdir/tests/fuzz/corpus/<target>, else next to this source file.
 *
 * With arguments: the replay build runs the named files and directories
 * through the target (a reproduction tool); the libFuzzer build hands them
 * to libFuzzer unchanged (scripts/fuzz uses that).
 *
 * Exit status 1 when a point failed, except under automake's TAP driver.
 *
 * Environment: FUZZ_RUNS (default 20000) and FUZZ_TIME (seconds, default
 * 20) bound the make check fuzz session, whichever comes first;
 * FUZZ_INPUT_TIMEOUT (seconds, default 5) bounds one input.
 */

void
fuzz_fail(const char *file, int line, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "FUZZ INVARIANT BROKEN at %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	fflush(stderr);
	abort();
}

void
fuzz_buf_add(struct fuzz_buf *b, const void *data, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		unsigned char *p;

		while (cap < b->len + n)
			cap *= 2;
		if ((p = realloc(b->p, cap)) == NULL)
			abort();
		b->p = p;
		b->cap = cap;
	}
	if (n > 0)
		memcpy(b->p + b->len, data, n);
	b->len += n;
}

void
fuzz_buf_free(struct fuzz_buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

const char *
fuzz_escape(const void *data, size_t n, size_t max)
{
	static char out[4 * 1024 + 16];
	const unsigned char *s = data;
	size_t o = 0;

	if (max > 1024)
		max = 1024;
	for (size_t i = 0; i < n && i < max; i++) {
		unsigned char c = s[i];
		if (c == '\r')
			o += (size_t)snprintf(out + o, sizeof(out) - o, "\\r");
		else if (c == '\n')
			o += (size_t)snprintf(out + o, sizeof(out) - o, "\\n");
		else if (c < 0x20 || c >= 0x7f || c == '\\')
			o += (size_t)snprintf(out + o, sizeof(out) - o, "\\x%02x", c);
		else
			out[o++] = (char)c;
	}
	if (n > max)
		o += (size_t)snprintf(out + o, sizeof(out) - o, "...(%zu bytes)", n);
	out[o] = '\0';
	return out;
}

/* ------------------------------------------------------------ corpus */

static char target[64];

static void
target_name(const char *argv0)
{
	const char *b = strrchr(argv0, '/');

	b = b ? b + 1 : argv0;
	if (strncmp(b, "lt-", 3) == 0)
		b += 3;
	if (strncmp(b, "fuzz_", 5) == 0)
		b += 5;
	snprintf(target, sizeof(target), "%s", b);
	target[strcspn(target, ".")] = '\0';
}

static int
is_dir(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static void
corpus_dir(char *out, size_t len)
{
	const char *env = getenv("FUZZ_CORPUS"), *top = getenv("top_srcdir");
	char here[PATH_MAX];

	if (env && *env) {
		snprintf(out, len, "%s", env);
		return;
	}
	if (top && *top) {
		snprintf(out, len, "%s/tests/fuzz/corpus/%s", top, target);
		if (is_dir(out))
			return;
	}
	snprintf(here, sizeof(here), "%s", __FILE__);
	if (strrchr(here, '/'))
		*strrchr(here, '/') = '\0';
	else
		snprintf(here, sizeof(here), ".");
	snprintf(out, len, "%s/corpus/%s", here, target);
}

struct files {
	char **v;
	size_t n, cap;
};

static void
files_add(struct files *f, const char *path)
{
	if (f->n == f->cap) {
		f->cap = f->cap ? f->cap * 2 : 64;
		if ((f->v = realloc(f->v, f->cap * sizeof(*f->v))) == NULL)
			abort();
	}
	if ((f->v[f->n++] = strdup(path)) == NULL)
		abort();
}

static int
cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Regular files of path (a file or a directory, not recursive), sorted. */
static void
collect(const char *path, struct files *f)
{
	DIR *d;
	struct dirent *e;
	char p[PATH_MAX];
	size_t first = f->n;

	if (!is_dir(path)) {
		files_add(f, path);
		return;
	}
	if ((d = opendir(path)) == NULL)
		return;
	while ((e = readdir(d)) != NULL) {
		struct stat st;
		if (e->d_name[0] == '.')
			continue;
		snprintf(p, sizeof(p), "%s/%s", path, e->d_name);
		if (stat(p, &st) == 0 && S_ISREG(st.st_mode))
			files_add(f, p);
	}
	closedir(d);
	qsort(f->v + first, f->n - first, sizeof(*f->v), cmp_str);
}

static int
is_regression(const char *path)
{
	const char *b = strrchr(path, '/');
	static const char *const prefixes[] = { "crash-", "timeout-", "leak-", "oom-", "regress-",
		"slow-unit-", NULL };

	b = b ? b + 1 : path;
	for (int i = 0; prefixes[i]; i++)
		if (strncmp(b, prefixes[i], strlen(prefixes[i])) == 0)
			return 1;
	return 0;
}

static unsigned char *
read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	unsigned char *buf = NULL;
	size_t cap = 0, n = 0, r;

	if (f == NULL)
		return NULL;
	do {
		if (n == cap) {
			cap = cap ? cap * 2 : 4096;
			if ((buf = realloc(buf, cap)) == NULL)
				abort();
		}
		r = fread(buf + n, 1, cap - n, f);
		n += r;
	} while (r > 0);
	fclose(f);
	*len = n;
	return buf;
}

static unsigned
env_num(const char *name, unsigned def)
{
	const char *v = getenv(name);

	return v && *v ? (unsigned)strtoul(v, NULL, 10) : def;
}

/* Run one input in a child; returns 0 when it passed, else describes why in why. */
static int
replay_one(const char *path, char *why, size_t whylen)
{
	pid_t pid;
	int status;
	unsigned timeout = env_num("FUZZ_INPUT_TIMEOUT", 5);

	fflush(stdout);
	fflush(stderr);
	if ((pid = fork()) < 0) {
		snprintf(why, whylen, "fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		size_t len;
		unsigned char *data = read_file(path, &len), *copy;

		if (data == NULL) {
			fprintf(stderr, "%s: %s\n", path, strerror(errno));
			_exit(3);
		}
		/* An exact-size heap copy, so that ASan sees any read past the end. */
		if ((copy = malloc(len ? len : 1)) == NULL)
			_exit(3);
		memcpy(copy, data, len);
		free(data);
		signal(SIGALRM, SIG_DFL);
		alarm(timeout);
		LLVMFuzzerTestOneInput(copy, len);
		free(copy);
		fflush(stderr);
		_exit(0);
	}
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
		snprintf(why, whylen, "hung: still running after %us (FUZZ_INPUT_TIMEOUT)", timeout);
	else if (WIFSIGNALED(status))
		snprintf(why, whylen, "killed by signal %d (%s)", WTERMSIG(status),
		    strsignal(WTERMSIG(status)));
	else
		snprintf(why, whylen, "exit status %d (a sanitizer report or a broken invariant; "
		    "see the log above)", WEXITSTATUS(status));
	return -1;
}

static int tap_n, tap_failed;

static void tap(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void
tap(int ok, const char *fmt, ...)
{
	va_list ap;

	printf("%sok %d - %s: ", ok ? "" : "not ", ++tap_n, target);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!ok)
		tap_failed++;
}

/* The seed corpus as one test point, each regression input as its own. */
static void
replay_corpus(const char *dir)
{
	struct files f = { 0 };
	char why[256];
	unsigned seeds = 0, seed_fail = 0;

	collect(dir, &f);
	for (size_t i = 0; i < f.n; i++) {
		if (is_regression(f.v[i]))
			continue;
		seeds++;
		if (replay_one(f.v[i], why, sizeof(why)) < 0) {
			seed_fail++;
			printf("# seed %s: %s\n", f.v[i], why);
		}
	}
	if (seeds == 0)
		tap(0, "no seed inputs in %s", dir);
	else if (seed_fail)
		tap(0, "%u of %u seed inputs failed", seed_fail, seeds);
	else
		tap(1, "%u seed inputs replayed, invariants hold", seeds);
	for (size_t i = 0; i < f.n; i++) {
		const char *b = strrchr(f.v[i], '/');
		if (!is_regression(f.v[i]))
			continue;
		if (replay_one(f.v[i], why, sizeof(why)) < 0) {
			tap(0, "regression input %s", b ? b + 1 : f.v[i]);
			printf("# %s: %s\n", f.v[i], why);
		} else
			tap(1, "regression input %s", b ? b + 1 : f.v[i]);
	}
	for (size_t i = 0; i < f.n; i++)
		free(f.v[i]);
	free(f.v);
}

#ifdef IMAPFRESH_FUZZING

int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*cb)(const uint8_t *data, size_t size));

static volatile unsigned long *fuzz_runs;

static int
counting_cb(const uint8_t *data, size_t size)
{
	(*fuzz_runs)++;
	return LLVMFuzzerTestOneInput(data, size);
}

static void
rm_scratch(const char *dir)
{
	struct files f = { 0 };

	collect(dir, &f);
	for (size_t i = 0; i < f.n; i++) {
		unlink(f.v[i]);
		free(f.v[i]);
	}
	free(f.v);
	rmdir(dir);
}

/* The seeds (not the regression inputs: they would stop the session at
 * once) into the scratch corpus. */
static void
copy_seeds(const char *corpus, const char *scratch)
{
	struct files f = { 0 };
	char to[PATH_MAX];

	collect(corpus, &f);
	for (size_t i = 0; i < f.n; i++) {
		size_t len;
		unsigned char *data;
		FILE *out;

		if (!is_regression(f.v[i]) && (data = read_file(f.v[i], &len)) != NULL) {
			snprintf(to, sizeof(to), "%s/%s", scratch, strrchr(f.v[i], '/') + 1);
			if ((out = fopen(to, "wb")) != NULL) {
				fwrite(data, 1, len, out);
				fclose(out);
			}
			free(data);
		}
		free(f.v[i]);
	}
	free(f.v);
}

/* A short libFuzzer session on a scratch copy of the seeds. */
static void
fuzz_session(char *argv0, const char *corpus)
{
	char scratch[] = "/tmp/imapfresh-fuzz.XXXXXX";
	char runs[64], secs[64], artifact[PATH_MAX + 32], cwd[PATH_MAX];
	unsigned nruns = env_num("FUZZ_RUNS", 20000), nsecs = env_num("FUZZ_TIME", 20);
	time_t t0 = time(NULL);
	pid_t pid;
	int status;

	fuzz_runs = mmap(NULL, sizeof(*fuzz_runs), PROT_READ | PROT_WRITE,
	    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (fuzz_runs == MAP_FAILED || mkdtemp(scratch) == NULL) {
		tap(0, "fuzz session: setup failed: %s", strerror(errno));
		return;
	}
	*fuzz_runs = 0;
	copy_seeds(corpus, scratch);
	if (getcwd(cwd, sizeof(cwd)) == NULL)
		snprintf(cwd, sizeof(cwd), ".");
	snprintf(runs, sizeof(runs), "-runs=%u", nruns);
	snprintf(secs, sizeof(secs), "-max_total_time=%u", nsecs);
	/* Crash inputs land in the build directory, named after the target. */
	snprintf(artifact, sizeof(artifact), "-artifact_prefix=%s/fuzz-%s-", cwd, target);
	fflush(stdout);
	fflush(stderr);
	if ((pid = fork()) == 0) {
		char *args[] = { argv0, runs, secs, "-timeout=10", "-rss_limit_mb=2048",
			"-print_final_stats=1", artifact, scratch, NULL };
		int argc = (int)(sizeof(args) / sizeof(args[0])) - 1;
		char **argv = args;
		/* libFuzzer writes to stderr: the test log, not the TAP stream. */
		_exit(LLVMFuzzerRunDriver(&argc, &argv, counting_cb));
	}
	while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
		tap(1, "%lu runs, no crash (%lds)", *fuzz_runs, (long)(time(NULL) - t0));
	else {
		tap(0, "fuzz session failed after %lu runs: %s %d; the input is in %s/fuzz-%s-*",
		    *fuzz_runs, pid > 0 && WIFSIGNALED(status) ? "signal" : "libFuzzer exit status",
		    pid > 0 ? (WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status)) : -1,
		    cwd, target);
		printf("# reproduce: %s %s/fuzz-%s-<hash>; scripts/fuzz %s explains\n", argv0, cwd,
		    target, target);
	}
	rm_scratch(scratch);
}
#endif

int
main(int argc, char **argv)
{
	char dir[PATH_MAX];

	target_name(argv[0]);
#ifdef IMAPFRESH_FUZZING
	if (argc > 1)
		return LLVMFuzzerRunDriver(&argc, &argv, LLVMFuzzerTestOneInput);
#endif
	LLVMFuzzerInitialize(&argc, &argv);
	if (argc > 1) {
		/* Replay the given files or directories (a reproduction tool). */
		struct files f = { 0 };
		char why[256];

		for (int i = 1; i < argc; i++)
			collect(argv[i], &f);
		for (size_t i = 0; i < f.n; i++) {
			int r = replay_one(f.v[i], why, sizeof(why));
			tap(r == 0, "%s%s%s", f.v[i], r == 0 ? "" : ": ", r == 0 ? "" : why);
		}
		printf("1..%d\n", tap_n);
		return tap_failed ? 1 : 0;
	}
	corpus_dir(dir, sizeof(dir));
	printf("# %s: corpus %s\n", target, dir);
	replay_corpus(dir);
#ifdef IMAPFRESH_FUZZING
	fuzz_session(argv[0], dir);
#endif
	printf("1..%d\n", tap_n);
	/* Under automake's TAP driver (it sets AM_TAP_AWK) the "not ok" points
	 * are what counts; a non-zero exit would add a spurious ERROR. */
	if (getenv("AM_TAP_AWK") != NULL)
		return 0;
	return tap_failed ? 1 : 0;
}
