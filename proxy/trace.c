/* trace: protocol traces of the sessions an operator picked, every secret redacted. */
/* STUB: to be replaced by the real implementation. */
#include "session.h"
#include "trace.h"

int trace_set(struct server *srv, const char *spec, char *err, size_t errlen) { (void)srv; (void)spec; (void)err; (void)errlen; return 0; }
const char *trace_get(const struct server *srv) { (void)srv; return "off"; }
void trace_free_rules(struct server *srv) { (void)srv; }
void trace_session_update(struct session *s) { (void)s; }
void trace_session_end(struct session *s) { (void)s; }
void trace_token(struct session *s, enum trace_dir dir, const struct imap_tok *tok, int secret) { (void)s; (void)dir; (void)tok; (void)secret; }
void trace_literal_bytes(struct session *s, enum trace_dir dir, struct evbuffer *buf, size_t n) { (void)s; (void)dir; (void)buf; (void)n; }
void trace_fate(struct session *s, enum trace_dir dir, enum trace_fate fate) { (void)s; (void)dir; (void)fate; }
void trace_line(struct session *s, enum trace_dir dir, const char *line, size_t len, int injected) { (void)s; (void)dir; (void)line; (void)len; (void)injected; }
