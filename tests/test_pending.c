/* test_pending: held expunges and the renumbering between the client's and the server's message numbers, against a plain array model. */
#include <stdlib.h>
#include <string.h>

#include "pending.h"
#include "tap.h"
#include "uidset.h"

#define N 64

/* The model: held[k] for client positions 1..count. */
struct model {
	int held[N + 1];
	uint32_t count;
};

static uint32_t
model_to_server(const struct model *m, uint32_t k)
{
	uint32_t n = 0;

	if (k <= m->count && m->held[k])
		return 0;
	for (uint32_t i = 1; i <= k; i++)
		if (i > m->count || !m->held[i])
			n++;
	return n;
}

static uint32_t
model_to_client(const struct model *m, uint32_t n)
{
	for (uint32_t k = 1;; k++)
		if ((k > m->count || !m->held[k]) && --n == 0)
			return k;
}

static void
test_examples(void)
{
	struct pending p;
	struct uidset out;
	int held;
	char buf[256];
	size_t len;
	char *line;

	pending_init(&p);
	uidset_init(&out);
	ok(!pending_any(&p) && pending_to_server(&p, 5) == 5 && pending_to_client(&p, 5) == 5,
	    "nothing held: one numbering");
	ok(pending_hold(&p, 3) == 3 && pending_hold(&p, 1) == 1, "hold 3, then 1 (server numbers)");
	ok(pending_hold(&p, 2) == 4, "server's 2 is then the client's 4");
	ok(pending_count(&p) == 3 && pending_to_server(&p, 2) == 1 && pending_to_server(&p, 5) == 2 &&
	    pending_to_server(&p, 3) == 0, "client 2 -> 1, 5 -> 2, 3 held");
	ok(pending_to_client(&p, 1) == 2 && pending_to_client(&p, 2) == 5, "server 1 -> 2, 2 -> 5");

	/* client positions 1..8, held 1,3,4 */
	ok(pending_set_to_server(&p, "2,5:*", 5, 8, &out, &held) == 0 && !held, "2,5:* parsed");
	uidset_format(&out, buf, sizeof(buf));
	ok(strcmp(buf, "1:5") == 0, "2,5:* of 8 is the server's 1:5 (%s)", buf);
	uidset_clear(&out);
	ok(pending_set_to_server(&p, "3:4", 3, 8, &out, &held) == 0 && held && out.count == 0,
	    "3:4 names only held messages: empty, held");
	uidset_clear(&out);
	ok(pending_set_to_server(&p, "4:2", 3, 8, &out, &held) == 0 && held && out.count == 1 &&
	    uidset_contains(&out, 1), "a reversed range");
	ok(pending_set_to_server(&p, "$", 1, 8, &out, &held) < 0 &&
	    pending_set_to_server(&p, "1:x", 3, 8, &out, &held) < 0 &&
	    pending_set_to_server(&p, "0", 1, 8, &out, &held) < 0 &&
	    pending_set_to_server(&p, "*", 1, 0, &out, &held) < 0 &&
	    pending_set_to_server(&p, "4294967296", 10, 8, &out, &held) < 0 &&
	    pending_set_to_server(&p, "1,", 2, 8, &out, &held) < 0,
	    "not plain sets: $, junk, zero, '*' of nothing, overflow, trailing comma");

	line = pending_renumber_search(&p, "* SEARCH 1 2 3 (MODSEQ 4)", 25, &len);
	ok(line && strcmp(line, "* SEARCH 2 5 6 (MODSEQ 4)") == 0, "SEARCH renumbered, MODSEQ kept (%s)",
	    line ? line : "NULL");
	free(line);
	line = pending_renumber_search(&p, "* SORT 3 1", 10, &len);
	ok(line && strcmp(line, "* SORT 6 2") == 0, "SORT keeps its order (%s)", line ? line : "NULL");
	free(line);
	line = pending_renumber_search(&p, "* SEARCH", 8, &len);
	ok(line && strcmp(line, "* SEARCH") == 0, "an empty SEARCH");
	free(line);
	{
		const char *in = "* ESEARCH (TAG \"a b) 1\") MIN 1 MAX 3 COUNT 3 ALL 1:3";
		line = pending_renumber_search(&p, in, strlen(in), &len);
		ok(line && strcmp(line, "* ESEARCH (TAG \"a b) 1\") MIN 2 MAX 6 COUNT 3 ALL 2,5:6") == 0,
		    "ESEARCH MIN/MAX/ALL renumbered, tag and COUNT kept (%s)", line ? line : "NULL");
		free(line);
		in = "* ESEARCH (TAG \"x\") UID MIN 1 ALL 1:3";
		line = pending_renumber_search(&p, in, strlen(in), &len);
		ok(line && strcmp(line, in) == 0, "ESEARCH with UID: as it is");
		free(line);
		in = "* ESEARCH (TAG \"x\") PARTIAL (1:2 1,2) MIN 1";
		line = pending_renumber_search(&p, in, strlen(in), &len);
		ok(line && strcmp(line, "* ESEARCH (TAG \"x\") PARTIAL (1:2 1,2) MIN 2") == 0,
		    "a list value is one value (%s)", line ? line : "NULL");
		free(line);
	}
	pending_clear(&p);
	ok(!pending_any(&p), "cleared");
	uidset_free(&out);
	pending_free(&p);
}

/* Random holds, sets and lines against the model. */
static void
test_model(void)
{
	unsigned bad = 0, runs = 0, sets = 0;

	srand(7);
	for (int round = 0; round < 400; round++) {
		struct model m = { { 0 }, (uint32_t)(1 + rand() % N) };
		struct pending p;
		uint32_t server_count = m.count;

		pending_init(&p);
		for (int h = rand() % 8; h > 0 && server_count > 0; h--) {
			uint32_t n = 1 + (uint32_t)rand() % server_count, k = model_to_client(&m, n);
			if (pending_hold(&p, n) != k)
				bad++;
			m.held[k] = 1;
			server_count--;
		}
		for (uint32_t k = 1; k <= m.count; k++)
			if (pending_to_server(&p, k) != model_to_server(&m, k) || pending_is(&p, k) != m.held[k])
				bad++;
		for (uint32_t n = 1; n <= server_count + 3; n++)
			if (pending_to_client(&p, n) != model_to_client(&m, n))
				bad++;
		/* a random client set, as text */
		for (int t = 0; t < 4; t++) {
			char text[256];
			size_t o = 0;
			int want_held = 0, held;
			struct uidset out, want;
			uidset_init(&out);
			uidset_init(&want);
			for (int r = 1 + rand() % 3; r > 0; r--) {
				uint32_t a = 1 + (uint32_t)rand() % m.count, b = 1 + (uint32_t)rand() % m.count;
				int star = rand() % 5 == 0;
				o += (size_t)snprintf(text + o, sizeof(text) - o, "%s%u", o ? "," : "", a);
				if (star || rand() % 2)
					o += star ? (size_t)snprintf(text + o, sizeof(text) - o, ":*") :
					    (size_t)snprintf(text + o, sizeof(text) - o, ":%u", b);
				else
					b = a;
				if (star)
					b = m.count;
				for (uint32_t k = a < b ? a : b; k <= (a < b ? b : a); k++) {
					if (m.held[k])
						want_held = 1;
					else
						uidset_add(&want, model_to_server(&m, k));
				}
			}
			if (pending_set_to_server(&p, text, o, m.count, &out, &held) != 0 ||
			    !uidset_equal(&out, &want) || held != want_held) {
				bad++;
				diag("set %s of %u: wrong", text, m.count);
			}
			/* and back: server positions to client positions */
			{
				struct uidset back, want_back;
				uidset_init(&back);
				uidset_init(&want_back);
				pending_set_to_client(&p, &want, &back);
				for (size_t i = 0; i < want.n; i++)
					for (uint32_t n = want.r[i].lo; n <= want.r[i].hi; n++)
						uidset_add(&want_back, model_to_client(&m, n));
				if (!uidset_equal(&back, &want_back))
					bad++;
				uidset_free(&back);
				uidset_free(&want_back);
			}
			sets++;
			uidset_free(&out);
			uidset_free(&want);
		}
		pending_free(&p);
		runs++;
	}
	ok(bad == 0, "model: %u rounds, %u sets: holds, both numberings, sets both ways (%u wrong)",
	    runs, sets, bad);
}

int
main(void)
{
	test_examples();
	test_model();
	return tap_done();
}
