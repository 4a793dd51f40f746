/* test_command: recognising commands and their arguments from tokens. */
#include <string.h>

#include "command.h"
#include "sasl.h"
#include "tap.h"

static struct imap_tok
tok(enum imap_tok_type type, unsigned index, unsigned depth, const char *str)
{
	struct imap_tok t;

	memset(&t, 0, sizeof(t));
	t.type = type;
	t.index = index;
	t.depth = depth;
	t.str = str;
	t.len = str ? strlen(str) : 0;
	return t;
}

static void
feed(struct command *c, enum imap_tok_type type, unsigned index, unsigned depth, const char *str)
{
	struct imap_tok t = tok(type, index, depth, str);

	command_feed(c, &t);
}

int
main(void)
{
	struct command c = { .kind = CMD_NONE };
	char longtag[COMMAND_TAG_MAX + 10];

	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "a1");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "login");
	feed(&c, IMAP_TOK_QUOTED, 2, 0, "bob");
	feed(&c, IMAP_TOK_QUOTED, 3, 0, "s3cret");
	ok(strcmp(c.tag, "a1") == 0 && c.tag_ok, "tag read");
	ok(c.kind == CMD_LOGIN && strcmp(c.name, "LOGIN") == 0, "LOGIN recognised case-insensitively");
	ok(strcmp(command_arg(&c, 0)->val, "bob") == 0, "LOGIN user kept");
	ok(!command_arg(&c, 1)->present && strstr(command_arg(&c, 1)->val, "s3cret") == NULL, "LOGIN password never stored");

	/* RFC 7162 3.1: commands that turn CONDSTORE on. */
	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "s");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "SELECT");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "INBOX");
	feed(&c, IMAP_TOK_LIST_BEGIN, 3, 0, NULL);
	feed(&c, IMAP_TOK_ATOM, 3, 1, "condstore");
	ok(c.condstore, "SELECT INBOX (CONDSTORE)");
	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "s");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "SELECT");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "CONDSTORE");
	ok(!c.condstore, "a mailbox named CONDSTORE does not");
	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "f");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "UID");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "FETCH");
	feed(&c, IMAP_TOK_ATOM, 3, 0, "1:*");
	feed(&c, IMAP_TOK_LIST_BEGIN, 4, 0, NULL);
	feed(&c, IMAP_TOK_ATOM, 4, 1, "FLAGS");
	feed(&c, IMAP_TOK_LIST_END, 4, 0, NULL);
	feed(&c, IMAP_TOK_LIST_BEGIN, 5, 0, NULL);
	feed(&c, IMAP_TOK_ATOM, 5, 1, "CHANGEDSINCE");
	ok(c.condstore, "UID FETCH ... (CHANGEDSINCE n)");
	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "w");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "STORE");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "1");
	feed(&c, IMAP_TOK_LIST_BEGIN, 3, 0, NULL);
	feed(&c, IMAP_TOK_ATOM, 3, 1, "UNCHANGEDSINCE");
	ok(c.condstore, "STORE 1 (UNCHANGEDSINCE n)");
	command_reset(&c);
	ok(!c.condstore, "reset");

	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "a2");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "AUTHENTICATE");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "PLAIN");
	feed(&c, IMAP_TOK_ATOM, 3, 0, "AGJvYgBzM2NyZXQ=");
	ok(c.kind == CMD_AUTHENTICATE && strcmp(command_arg(&c, 0)->val, "PLAIN") == 0, "AUTHENTICATE mechanism kept");
	ok(!command_arg(&c, 1)->present, "SASL initial response never stored");

	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "a3");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "uid");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "move");
	feed(&c, IMAP_TOK_ATOM, 3, 0, "1:5");
	feed(&c, IMAP_TOK_LITERAL, 4, 0, NULL);
	feed(&c, IMAP_TOK_LITERAL_DATA, 4, 0, "Arch");
	feed(&c, IMAP_TOK_LITERAL_DATA, 4, 0, "ive");
	feed(&c, IMAP_TOK_LITERAL_END, 4, 0, NULL);
	ok(c.uid && c.kind == CMD_MOVE, "UID MOVE recognised");
	ok(strcmp(command_arg(&c, 0)->val, "1:5") == 0, "UID MOVE sequence set is argument 0");
	ok(strcmp(command_arg(&c, 1)->val, "Archive") == 0, "literal argument joined across chunks");
	ok(c.literals == 1, "literal counted");

	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "a4");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "APPEND");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "Drafts");
	feed(&c, IMAP_TOK_LIST_BEGIN, 3, 0, NULL);
	feed(&c, IMAP_TOK_ATOM, 3, 1, "\\Seen");
	feed(&c, IMAP_TOK_LIST_END, 3, 0, NULL);
	ok(c.kind == CMD_APPEND && strcmp(command_arg(&c, 0)->val, "Drafts") == 0, "APPEND mailbox kept");
	ok(!command_arg(&c, 1)->present, "tokens inside a list are not top-level arguments");
	ok(c.ntokens == 4, "top-level tokens counted (%u)", c.ntokens);
	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "a4b");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "FETCH");
	feed(&c, IMAP_TOK_ATOM, 2, 0, "1:*");
	ok(c.kind == CMD_FETCH && !c.uid && c.args == NULL,
	    "FETCH recognised; no argument storage for commands imapfresh only forwards");

	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, "a5");
	feed(&c, IMAP_TOK_ATOM, 1, 0, "XYZZY");
	ok(c.kind == CMD_UNKNOWN && strcmp(c.name, "XYZZY") == 0, "unknown command kept by name");

	memset(longtag, 'x', sizeof(longtag) - 1);
	longtag[sizeof(longtag) - 1] = '\0';
	command_reset(&c);
	feed(&c, IMAP_TOK_ATOM, 0, 0, longtag);
	ok(!c.tag_ok, "over-long tag is not echoed");

	/* SASL PLAIN: the identity is read, the password is not kept. */
	{
		char user[64];

		/* "\0alice\0s3cret" and "admin\0alice\0s3cret" */
		ok(sasl_plain_user("AGFsaWNlAHMzY3JldA==", 20, user, sizeof(user)) == 0 &&
		    strcmp(user, "alice") == 0, "PLAIN without authzid: authcid (%s)", user);
		ok(sasl_plain_user("YWRtaW4AYWxpY2UAczNjcmV0", 24, user, sizeof(user)) == 0 &&
		    strcmp(user, "admin") == 0, "PLAIN with authzid: the identity acted as (%s)", user);
		ok(sasl_plain_user("YWxpY2U=", 8, user, sizeof(user)) < 0, "no NUL separators: not PLAIN");
		ok(sasl_plain_user("not base64!", 11, user, sizeof(user)) < 0, "not base64");
		ok(sasl_plain_user("*", 1, user, sizeof(user)) < 0, "a cancelled exchange");
		ok(sasl_plain_user("AGFsaWNlAHMzY3JldA==", 20, user, 3) < 0, "a user longer than the buffer");

		command_reset(&c);
		feed(&c, IMAP_TOK_ATOM, 0, 0, "a6");
		feed(&c, IMAP_TOK_ATOM, 1, 0, "AUTHENTICATE");
		feed(&c, IMAP_TOK_ATOM, 2, 0, "PLAIN");
		feed(&c, IMAP_TOK_ATOM, 3, 0, "AGFsaWNlAHMzY3JldA==");
		ok(c.sasl_user != NULL && strcmp(c.sasl_user, "alice") == 0 && !command_arg(&c, 1)->present,
		    "SASL-IR: user read (%s), response not stored", c.sasl_user ? c.sasl_user : "none");
		ok(command_kind_from_name("getquotaroot") == CMD_GETQUOTAROOT &&
		    command_kind_from_name("XYZZY") == CMD_UNKNOWN, "kinds by name");
	}

	command_reset(&c);
	ok(c.kind == CMD_NONE && c.tag[0] == '\0', "reset clears the command");
	ok(strcmp(command_kind_name(CMD_GETQUOTAROOT), "GETQUOTAROOT") == 0, "kind names");
	return tap_done();
}
