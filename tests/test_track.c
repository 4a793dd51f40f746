/* test_track: track_fetch_line, the tracker's reading of a whole "* n FETCH (UID u ...)" line. */
#include <stdint.h>
#include <string.h>

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
};

int
main(void)
{
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
	return tap_done();
}
