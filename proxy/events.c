/* events: the sync event log: one JSON line per resync decision, to a file and a bounded Redis stream. */
/* STUB: to be replaced by the real implementation. */
#include "events.h"
#include "session.h"

int events_open(struct server *srv, char *err, size_t errlen) { (void)srv; (void)err; (void)errlen; return 0; }
void events_close(struct server *srv) { (void)srv; }
void events_resync(struct session *s, const struct events_resync *ev) { (void)s; (void)ev; }
