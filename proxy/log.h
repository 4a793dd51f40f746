/* log: leveled log lines to stderr or syslog, each prefixed by its session. */
#ifndef LOG_H
#define LOG_H

#include "config.h"

void log_init(int to_stderr, enum log_level level);
void log_set_level(enum log_level level);
/* Every line from now on starts with [tag] (the worker, when there are several). */
void log_set_tag(const char *tag);
int log_enabled(enum log_level level);

/* sid may be NULL for process-wide events. */
void log_msg(enum log_level level, const char *sid, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_error(...) log_msg(LOG_LEVEL_ERROR, NULL, __VA_ARGS__)
#define log_warning(...) log_msg(LOG_LEVEL_WARNING, NULL, __VA_ARGS__)
#define log_notice(...) log_msg(LOG_LEVEL_NOTICE, NULL, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, NULL, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, NULL, __VA_ARGS__)

#endif
