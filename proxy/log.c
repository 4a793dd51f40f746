/* log: leveled log lines to stderr or syslog, each prefixed by its session. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <sys/time.h>

#include "log.h"

static int log_to_stderr = 1;
static char log_tag[32];	/* "worker N" when there are several */
static enum log_level log_threshold = LOG_LEVEL_INFO;

static const char *const log_names[] = { "error", "warning", "notice", "info", "debug" };
static const int log_syslog_prio[] = { LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG };

void
log_init(int to_stderr, enum log_level level)
{
	log_to_stderr = to_stderr;
	log_threshold = level;
	if (!to_stderr)
		openlog("imapfresh", LOG_PID | LOG_NDELAY, LOG_MAIL);
}

void
log_set_tag(const char *tag)
{
	snprintf(log_tag, sizeof(log_tag), "%s", tag);
}

void
log_set_level(enum log_level level)
{
	log_threshold = level;
}

int
log_enabled(enum log_level level)
{
	return level <= log_threshold;
}

void
log_msg(enum log_level level, const char *sid, const char *fmt, ...)
{
	char line[2048];
	va_list ap;
	int n = 0;

	if (!log_enabled(level))
		return;
	if (log_tag[0] != '\0')
		n = snprintf(line, sizeof(line), "[%s] ", log_tag);
	if (sid != NULL)
		n += snprintf(line + n, sizeof(line) - n, "%s: ", sid);
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);

	if (log_to_stderr) {
		struct timeval tv;
		struct tm tm;
		char ts[32];

		gettimeofday(&tv, NULL);
		gmtime_r(&tv.tv_sec, &tm);
		strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
		fprintf(stderr, "%s.%03dZ %s: %s\n", ts, (int)(tv.tv_usec / 1000),
		    log_names[level], line);
	} else
		syslog(log_syslog_prio[level], "%s: %s", log_names[level], line);
}
