/* upstream: a session's link to the backend server: connect, TLS, STARTTLS. */
#ifndef UPSTREAM_H
#define UPSTREAM_H

struct session;

/* Start connecting (name resolution never blocks). Failures close the session
 * with a BYE that says why. */
void upstream_connect(struct session *s);

/* After the upstream's OK to our STARTTLS: switch the link to TLS. */
void upstream_starttls(struct session *s);

#endif
