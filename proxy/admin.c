/* admin: the operators' HTTP endpoint: /metrics, /healthz, /sessions and session controls. */
/* STUB: to be replaced by the real implementation. */
#include "admin.h"

int admin_start(struct server *srv, char *err, size_t errlen) { (void)srv; (void)err; (void)errlen; return 0; }
void admin_stop(struct server *srv) { (void)srv; }
