/* test_track: the tracker's readers of whole lines ("* n FETCH (UID u ...)") and of response codes. */
#include <stdint.h>
#include <string.h>

#include "mutf7.h"
#include "track.h"
#include "tap.h"

static const struct {
	const char *line;
	uint32_t num, uid;	/* 0, 0: not such a line */
} cases[] = {
	{ "* 12 FETCH (UID 40 FLAGS (\\Seen))\r\n", 12, 40 },
	{ "* 1 fetch (uid 7)\r\n", 1, 7 },
	{ "* 4294967295 FETCH (UID 4294967295 MODSEQ (3))\r\n", 4294967295u, 4294967295u },
	{ "* 3 FETCH (UID 9\r\n", 0, 0 },		/* no SP or ')' after the UID */
	{ "* 4294967296 FETCH (UID 1)\r\n", 0, 0 },	/* over 32 bits */
	{ "* 0 FETCH (UID 1)\r\n", 0, 0 },
	{ "* 5 FETCH (UID 0)\r\n", 0, 0 },
	{ "* 5 FETCH (FLAGS () UID 3)\r\n", 0, 0 },	/* UID not first: the tokens find it */
	{ "* 5 FETCH  (UID 3)\r\n", 0, 0 },
	{ "* 5 EXISTS\r\n", 0, 0 },
	{ "a1 5 FETCH (UID 3)\r\n", 0, 0 },
	{ "*  5 FETCH (UID 3)\r\n", 0, 0 },
	{ "* 5 FETCH (UIDX 3)\r\n", 0, 0 },
	{ "* 5 FETCH (UID 3x)\r\n", 0, 0 },
	{ "* 5", 0, 0 },
	{ "* 0000000007 FETCH (UID 0000000008)\r\n", 7, 8 },	/* ten digits, leading zeros */
	{ "* 00000000007 FETCH (UID 8)\r\n", 0, 0 },		/* eleven digits */
	{ "* 99999999999 FETCH (UID 8)\r\n", 0, 0 },
	{ "* 7 FETCH (UID 18446744073709551617)\r\n", 0, 0 },	/* would wrap 64 bits */
};

static int
canon_is(const char *in, int utf8, const char *want)
{
	char out[512];

	track_canonical_mailbox(in, utf8, out, sizeof(out));
	if (strcmp(out, want) != 0)
		diag("%s (utf8 %d): got \"%s\", want \"%s\"", in, utf8, out, want);
	return strcmp(out, want) == 0;
}

static void
test_canonical(void)
{
	char out[8];

	ok(canon_is("Entw&APw-rfe", 0, "Entw\xc3\xbcrfe") && canon_is("Entw\xc3\xbcrfe", 1,
	    "Entw\xc3\xbcrfe"), "modified UTF-7 and UTF-8 name the same mailbox");
	ok(canon_is("~peter/mail/&U,BTFw-/&ZeVnLIqe-", 0,
	    "~peter/mail/\xe5\x8f\xb0\xe5\x8c\x97/\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e"),
	    "RFC 3501 5.1.3's example");
	ok(canon_is("&2D3eAA-", 0, "\xf0\x9f\x98\x80"), "a surrogate pair");
	ok(canon_is("a&-b", 0, "a&b") && canon_is("a&-b", 1, "a&-b") && canon_is("Entw&APw-rfe", 1,
	    "Entw&APw-rfe"), "'&-' is '&'; after UTF8=ACCEPT '&' is itself");
	ok(canon_is("inbox", 0, "INBOX") && canon_is("Inbox", 1, "INBOX") &&
	    canon_is("INBOX.Sent", 0, "INBOX.Sent"), "INBOX in any case");
	ok(canon_is("&AGE-", 0, "&AGE-") && canon_is("&Jjo!", 0, "&Jjo!") && canon_is("&APw", 0, "&APw") &&
	    canon_is("&3gA-", 0, "&3gA-") && canon_is("&2D0-", 0, "&2D0-") &&
	    canon_is("&APw-\xc3\xbc", 0, "&APw-\xc3\xbc") && canon_is("&APx-", 0, "&APx-"),
	    "not modified UTF-7 (ASCII encoded, bad char, unterminated, lone surrogates, 8-bit, "
	    "padding bits): kept as given");
	ok(mutf7_to_utf8("&ZeVnLIqe-", out, sizeof(out)) < 0, "an output too small is refused");
}

int
main(void)
{
	test_canonical();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint32_t num = 0, uid = 0;
		int want = cases[i].num != 0;
		int got = track_fetch_line(cases[i].line, strlen(cases[i].line), &num, &uid);

		ok(got == want && (!want || (num == cases[i].num && uid == cases[i].uid)),
		    "track_fetch_line %zu: %s num %u uid %u", i, got ? "yes" : "no", num, uid);
	}
	/* Never a byte past the line it is given. */
	{
		uint32_t num, uid;
		const char *l = "* 7 FETCH (UID 8)\r\n";

		ok(!track_fetch_line(l, 16, &num, &uid), "the UID's end is within the length given");
		ok(track_fetch_line(l, 17, &num, &uid) && uid == 8, "... and ')' at its last byte");
	}
	/* Response codes: the number after the name, strictly. */
	{
		static const struct {
			const char *text, *name;
			int want;
			uint64_t v;
		} codes[] = {
			{ "[UIDNEXT 41]", "UIDNEXT", 1, 41 },
			{ "[uidnext 41] Predicted next UID", "UIDNEXT", 1, 41 },
			{ "[UIDVALIDITY 4294967296]", "UIDVALIDITY", 1, 4294967296ull },
			{ "[HIGHESTMODSEQ 18446744073709551615]", "HIGHESTMODSEQ", 1, UINT64_MAX },
			{ "[HIGHESTMODSEQ 18446744073709551616]", "HIGHESTMODSEQ", 0, 0 },
			{ "[UIDNEXT -1]", "UIDNEXT", 0, 0 },
			{ "[UIDNEXT  41]", "UIDNEXT", 0, 0 },
			{ "[UIDNEXT 41x]", "UIDNEXT", 0, 0 },
			{ "[UIDNEXT 41", "UIDNEXT", 0, 0 },
			{ "[UIDNEXT ]", "UIDNEXT", 0, 0 },
			{ "[UIDNEXTX 41]", "UIDNEXT", 0, 0 },
			{ "[UIDVALIDITY 3]", "UIDNEXT", 0, 0 },
			{ "UIDNEXT 41]", "UIDNEXT", 0, 0 },
		};

		for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
			uint64_t v = 0;
			int got = track_code_value(codes[i].text, strlen(codes[i].text),
			    codes[i].name, &v);

			ok(got == codes[i].want && (!got || v == codes[i].v),
			    "track_code_value %s: %d %llu", codes[i].text, got, (unsigned long long)v);
		}
		{
			uint64_t v;

			ok(!track_code_value("[UIDNEXT 41]", 11, "UIDNEXT", &v),
			    "a code's ']' past the length given is not read");
		}
	}
	return tap_done();
}
