/* test_feed: reading WildDuck's wd_events messages and the small JSON bodies imapfresh is sent (feed.c, json.c). */
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "feed.h"
#include "json.h"
#include "tap.h"

static int
member_is(const char *body, const char *key, const char *want)
{
	char *got = json_string_member(body, key);
	int same = want == NULL ? got == NULL : got != NULL && strcmp(got, want) == 0;

	if (!same)
		diag("%s in %s: got %s, want %s", key, body, got ? got : "NULL", want ? want : "NULL");
	free(got);
	return same;
}

int
main(void)
{
	char id[25];
	struct config_http_url u;

	ok(member_is("{\"user\":\"alice\",\"folder\":\"INBOX\"}", "folder", "INBOX"), "a member");
	ok(member_is("{\"event\":\"user\",\"user\":\"bob\"}", "user", "bob"),
	    "a value that looks like the key is not taken for it");
	ok(member_is("{ \"user\" : \"a\\\"b\\\\c\" }", "user", "a\"b\\c"), "escapes, blanks");
	ok(member_is("{\"subject\":\"\\u00e9\\u20ac\"}", "subject", "\xc3\xa9\xe2\x82\xac"),
	    "\\u escapes as UTF-8");
	ok(member_is("{\"n\":5}", "n", NULL) && member_is("{}", "user", NULL) &&
	    member_is("{\"user\":\"unterminated", "user", NULL) && member_is("", "user", NULL) &&
	    member_is("{\"user\":\"\\u0000\"}", "user", NULL),
	    "not a string, absent, unterminated, empty body, NUL escape");
	ok(member_is("{\"id\":\"5f1e1b2c3d4e5f6a7b8c9d0e\",\"success\":true}", "id",
	    "5f1e1b2c3d4e5f6a7b8c9d0e"), "WildDuck's /users/resolve answer");

	ok(feed_parse_event("{\"e\":\"5f1e1b2c3d4e5f6a7b8c9d0e\"}", 32, id) == 0 &&
	    strcmp(id, "5f1e1b2c3d4e5f6a7b8c9d0e") == 0, "a wd_events message");
	{
		const char *m = "{\"e\":\"5f1e1b2c3d4e5f6a7b8c9d0e\",\"p\":{\"action\":\"COPY\"}}";
		ok(feed_parse_event(m, strlen(m), id) == 0, "with a payload");
	}
	ok(feed_parse_event("{\"e\":\"short\"}", 13, id) < 0 &&
	    feed_parse_event("not json", 8, id) < 0 &&
	    feed_parse_event("{\"e\":\"5f1e1b2c3d4e5f6a7b8c9d0z\"}", 32, id) < 0 &&
	    feed_parse_event("{\"e\":\"5f1e1b2c3d4e\0f6a7b8c9d0e\"}", 32, id) < 0 &&
	    feed_parse_event("", 0, id) < 0, "refused: short, not JSON, not hex, NUL, empty");

	ok(config_parse_http_url("http://127.0.0.1:8080", &u) == 0 && strcmp(u.host, "127.0.0.1") == 0 &&
	    strcmp(u.port, "8080") == 0 && u.path[0] == '\0', "http://host:port");
	ok(config_parse_http_url("http://api.example/wd/", &u) == 0 && strcmp(u.port, "80") == 0 &&
	    strcmp(u.path, "/wd") == 0, "default port, a path without its trailing slash");
	ok(config_parse_http_url("http://[::1]:81", &u) == 0 && strcmp(u.host, "::1") == 0,
	    "IPv6 literal");
	ok(config_parse_http_url("https://x", &u) < 0 && config_parse_http_url("http://", &u) < 0 &&
	    config_parse_http_url("x:80", &u) < 0, "refused: https, no host, no scheme");
	{
		struct config cfg;
		char err[300];

		config_defaults(&cfg);
		ok(config_set_option(&cfg, "backend_events=wildduck", err, sizeof(err)) == 0 &&
		    config_set_option(&cfg, "upstream=127.0.0.1", err, sizeof(err)) == 0 &&
		    config_set_option(&cfg, "listen=127.0.0.1:1143", err, sizeof(err)) == 0 &&
		    config_set_option(&cfg, "require_tls=no", err, sizeof(err)) == 0 &&
		    config_validate(&cfg, err, sizeof(err)) < 0 && strstr(err, "backend_redis"),
		    "wildduck without its Redis and API: refused (%s)", err);
		ok(config_set_option(&cfg, "backend_redis=redis://127.0.0.1/3", err, sizeof(err)) == 0 &&
		    config_set_option(&cfg, "backend_api=http://127.0.0.1:8080", err, sizeof(err)) == 0 &&
		    config_validate(&cfg, err, sizeof(err)) == 0, "with both: valid");
		ok(config_set_option(&cfg, "backend_api=https://x", err, sizeof(err)) < 0,
		    "backend_api must be http (%s)", err);
	}
	return tap_done();
}
