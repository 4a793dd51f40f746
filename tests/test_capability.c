/* test_capability: capability lists as the client sees them through the proxy. */
#include <string.h>

#include "capability.h"
#include "tap.h"

static void
check_list(const char *in, int starttls, int logindisabled, const char *want)
{
	struct capability_policy p = { starttls, logindisabled, 0 };
	char out[1024];
	size_t n = capability_rewrite(in, strlen(in), &p, out);

	out[n] = '\0';
	ok(strcmp(out, want) == 0, "list \"%s\" (starttls=%d logindisabled=%d) -> \"%s\" (got \"%s\")",
	    in, starttls, logindisabled, want, out);
}

static void
check_text(const char *in, int drop, const char *want)
{
	struct capability_policy p = { 0, 0, 0 };
	char out[1024];
	size_t n = capability_rewrite_text(in, strlen(in), &p, drop, out);

	out[n] = '\0';
	ok(strcmp(out, want) == 0, "text \"%s\" drop=%d -> \"%s\" (got \"%s\")", in, drop, want, out);
}

int
main(void)
{
	{
		struct capability_policy p = { 0, 0, 1 };
		char out[256];
		const char *in = "IMAP4rev1 COMPRESS=DEFLATE IDLE";
		size_t n = capability_rewrite(in, strlen(in), &p, out);

		out[n] = '\0';
		ok(strcmp(out, "IMAP4rev1 IDLE COMPRESS=DEFLATE") == 0,
		    "the server's COMPRESS= goes, imapfresh's own comes (%s)", out);
	}
	ok(capability_has("IMAP4rev1 ESEARCH IDLE", 22, "esearch") &&
	    !capability_has("IMAP4rev1 ESEARCHX IDLE", 23, "ESEARCH") &&
	    capability_has("[CAPABILITY IMAP4rev2 IDLE] Logged in", 37, "IMAP4rev2") &&
	    !capability_has("[CAPABILITY IMAP4rev1] ESEARCH soon", 35, "ESEARCH") &&
	    !capability_has("", 0, "ESEARCH"),
	    "capability_has: whole names, any case, inside a code only up to its ]");
	/* What the upstream says about its own link goes; what the client link offers comes. */
	check_list("IMAP4rev1 STARTTLS AUTH=PLAIN LOGINDISABLED", 0, 0, "IMAP4rev1 AUTH=PLAIN");
	check_list("IMAP4rev1 AUTH=PLAIN AUTH=LOGIN SASL-IR", 1, 1, "IMAP4rev1 SASL-IR STARTTLS LOGINDISABLED");
	check_list("IMAP4rev1 COMPRESS=DEFLATE IDLE", 0, 0, "IMAP4rev1 IDLE");
	check_list("imap4rev1 starttls compress=deflate auth=plain", 0, 1, "imap4rev1 LOGINDISABLED");
	check_list("IMAP4rev1  LITERAL+   IDLE", 0, 0, "IMAP4rev1 LITERAL+ IDLE");
	check_list("", 1, 0, "STARTTLS");
	check_list("STARTTLSX AUTH=PLAINX", 0, 0, "STARTTLSX AUTH=PLAINX");
	check_list("IMAP4rev1 STARTTLS", 1, 0, "IMAP4rev1 STARTTLS");

	check_text("[CAPABILITY IMAP4rev1 STARTTLS IDLE] Dovecot ready.", 0,
	    "[CAPABILITY IMAP4rev1 IDLE] Dovecot ready.");
	check_text("[CAPABILITY IMAP4rev1 STARTTLS IDLE] Dovecot ready.", 1, "Dovecot ready.");
	check_text("[CAPABILITY IMAP4rev1]", 1, "");
	check_text("Logged in", 0, "Logged in");
	check_text("[ALERT] [CAPABILITY X] hi", 0, "[ALERT] [CAPABILITY X] hi");
	check_text("[CAPABILITY IMAP4rev1 no close bracket", 0, "[CAPABILITY IMAP4rev1 no close bracket");
	ok(capability_in_text("[capability IMAP4rev1] x", 24), "response code matched case-insensitively");
	ok(!capability_in_text("[CAPABILITYX] x", 15), "a longer code name is not CAPABILITY");
	return tap_done();
}
