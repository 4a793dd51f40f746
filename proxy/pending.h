/* pending: expunges the server has made that the client has not been told yet, and the renumbering between the two views they cause. */
#ifndef PENDING_H
#define PENDING_H

#include <stddef.h>
#include <stdint.h>

#include "uidset.h"

/*
 * RFC 3501 7.4.1 / RFC 9051 7.5.1: "An EXPUNGE response MUST NOT be sent when
 * no command is in progress, nor while responding to a FETCH, STORE, or
 * SEARCH command." When the server expunges at such a moment (an injected
 * NOOP behind a client's FETCH), the client must not hear of it yet, so its
 * message numbers and the server's part: the client's position k is the
 * server's k minus the held positions below it. The set holds client
 * positions; with none held both numberings are the same.
 */
struct pending {
	struct uidset pos;	/* client positions the server has expunged */
	/* UIDs the server said VANISHED (RFC 7162) at client positions not
	 * known when they came (after SELECT ... QRESYNC the client was told
	 * only some UIDs): placed by the server's list (repair_place), or told
	 * as they are, by UID, once the client may hear them. */
	struct uidset vanished;
};

void pending_init(struct pending *p);
void pending_clear(struct pending *p);
void pending_free(struct pending *p);

static inline int
pending_any(const struct pending *p)
{
	return p->pos.count > 0;
}

/* VANISHED UIDs not placed yet: the two numberings differ in unknown places. */
static inline int
pending_unplaced(const struct pending *p)
{
	return p->vanished.count > 0;
}

static inline uint32_t
pending_count(const struct pending *p)
{
	return (uint32_t)p->pos.count;
}

int pending_is(const struct pending *p, uint32_t k);

/* Client position k as the server numbers it; 0 when k is held (expunged). */
uint32_t pending_to_server(const struct pending *p, uint32_t k);

/* Server message n as the client numbers it. */
uint32_t pending_to_client(const struct pending *p, uint32_t n);

/* The server said "* n EXPUNGE" and the client may not hear it: hold it.
 * Returns the client position held. */
uint32_t pending_hold(struct pending *p, uint32_t n);

/* Hold these client positions (a VANISHED placed in the client's view, a
 * repair's expunges): -1 when out of memory. */
int pending_hold_positions(struct pending *p, const struct uidset *positions);

/*
 * A client's sequence set (RFC 3501 sequence-set, '*' = client_count) as the
 * server numbers it: the server positions of the messages it names that the
 * server still has, into out. *held tells whether it named any held one.
 * Returns -1 for what is not a plain sequence set ("$", syntax): leave it.
 */
int pending_set_to_server(const struct pending *p, const char *set, size_t len,
    uint32_t client_count, struct uidset *out, int *held);

/* Server positions (a set) as client positions, into out (added). */
int pending_set_to_client(const struct pending *p, const struct uidset *server, struct uidset *out);

/*
 * A SEARCH, SORT or ESEARCH response line (without CRLF) whose numbers are
 * server message numbers, renumbered for the client: returns a malloc'd
 * line (*outlen set), NULL when out of memory. Numbers inside parentheses
 * ("(MODSEQ n)") and an ESEARCH with the UID indicator are left as they are.
 */
char *pending_renumber_search(const struct pending *p, const char *line, size_t len,
    size_t *outlen);

#endif
