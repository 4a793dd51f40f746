/* command: what a client command is, read from its tokens as they stream by. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <ctype.h>

#include "command.h"
#include "sasl.h"

static const struct {
	const char *name;
	enum command_kind kind;
} command_table[] = {
	{ "CAPABILITY", CMD_CAPABILITY }, { "STARTTLS", CMD_STARTTLS },
	{ "LOGIN", CMD_LOGIN }, { "AUTHENTICATE", CMD_AUTHENTICATE },
	{ "IDLE", CMD_IDLE }, { "LOGOUT", CMD_LOGOUT }, { "COMPRESS", CMD_COMPRESS },
	{ "SELECT", CMD_SELECT }, { "EXAMINE", CMD_EXAMINE }, { "CLOSE", CMD_CLOSE },
	{ "UNSELECT", CMD_UNSELECT }, { "FETCH", CMD_FETCH }, { "STORE", CMD_STORE },
	{ "SEARCH", CMD_SEARCH }, { "COPY", CMD_COPY }, { "MOVE", CMD_MOVE },
	{ "EXPUNGE", CMD_EXPUNGE }, { "APPEND", CMD_APPEND }, { "NOOP", CMD_NOOP },
	{ "CHECK", CMD_CHECK }, { "GETQUOTAROOT", CMD_GETQUOTAROOT },
	{ "UNAUTHENTICATE", CMD_UNAUTHENTICATE }, { "ID", CMD_ID },
	{ "SORT", CMD_SORT }, { "THREAD", CMD_THREAD },
};

void
command_reset(struct command *cmd)
{
	cmd->tag[0] = '\0';
	cmd->tag_ok = 0;
	cmd->name[0] = '\0';
	cmd->kind = CMD_NONE;
	cmd->uid = 0;
	cmd->ntokens = 0;
	cmd->literals = 0;
	cmd->condstore = 0;
	free(cmd->sasl_user);
	cmd->sasl_user = NULL;
	free(cmd->args);
	cmd->args = NULL;
}

const struct command_arg *
command_arg(const struct command *cmd, unsigned i)
{
	static const struct command_arg none;

	return cmd->args != NULL && i < COMMAND_NARGS ? &cmd->args[i] : &none;
}

/* Only these commands' arguments matter to imapfresh. */
static int
command_keeps_args(enum command_kind kind)
{
	switch (kind) {
	case CMD_SELECT:
	case CMD_EXAMINE:
	case CMD_APPEND:
	case CMD_COPY:
	case CMD_MOVE:
	case CMD_LOGIN:
	case CMD_AUTHENTICATE:
	case CMD_COMPRESS:
		return 1;
	default:
		return 0;
	}
}

const char *
command_kind_name(enum command_kind kind)
{
	for (size_t i = 0; i < sizeof(command_table) / sizeof(command_table[0]); i++)
		if (command_table[i].kind == kind)
			return command_table[i].name;
	return kind == CMD_NONE ? "(none)" : "(other)";
}

enum command_kind
command_kind_from_name(const char *name)
{
	/* Every command is looked up: the first letter settles most rows. */
	int c = toupper((unsigned char)name[0]);

	for (size_t i = 0; i < sizeof(command_table) / sizeof(command_table[0]); i++)
		if (command_table[i].name[0] == c && strcasecmp(command_table[i].name, name) == 0)
			return command_table[i].kind;
	return CMD_UNKNOWN;
}

/* Every command's name: ASCII case folding and exact compares, not the
 * locale's toupper() and strcasecmp() (command names are atoms, RFC 9051 9). */
static void
command_set_name(struct command *cmd, const char *s, size_t len)
{
	if (len >= sizeof(cmd->name))
		len = sizeof(cmd->name) - 1;
	for (size_t i = 0; i < len; i++)
		cmd->name[i] = (char)(s[i] >= 'a' && s[i] <= 'z' ? s[i] - ('a' - 'A') : s[i]);
	cmd->name[len] = '\0';
	cmd->kind = CMD_UNKNOWN;
	for (size_t i = 0; i < sizeof(command_table) / sizeof(command_table[0]); i++)
		if (command_table[i].name[0] == cmd->name[0] &&
		    strcmp(command_table[i].name, cmd->name) == 0) {
			cmd->kind = command_table[i].kind;
			break;
		}
}

int
command_arg_is_secret(const struct command *cmd, unsigned argi)
{
	return (cmd->kind == CMD_LOGIN && argi == 1) ||
	    (cmd->kind == CMD_AUTHENTICATE && argi == 1);
}

/* Index of the first argument: after the tag, the name and a UID prefix. */
static unsigned
command_first_arg(const struct command *cmd)
{
	return cmd->uid ? 3 : 2;
}

int
command_token_is_secret(const struct command *cmd, const struct imap_tok *tok)
{
	if (tok->depth > 0 || tok->index < command_first_arg(cmd))
		return 0;
	return command_arg_is_secret(cmd, tok->index - command_first_arg(cmd));
}

static void
command_arg_append(struct command_arg *a, const char *s, size_t len)
{
	size_t room = COMMAND_ARG_MAX - a->len;

	if (len > room) {
		len = room;
		a->truncated = 1;
	}
	memcpy(a->val + a->len, s, len);
	a->len += len;
	a->val[a->len] = '\0';
	a->present = 1;
}

static int
command_word_is(const struct imap_tok *tok, const char *word)
{
	return tok->len == strlen(word) && strncasecmp(tok->str, word, tok->len) == 0;
}

/* SELECT/EXAMINE (CONDSTORE) or (QRESYNC ...), FETCH ... MODSEQ or
 * (CHANGEDSINCE n), STORE (UNCHANGEDSINCE n), SEARCH MODSEQ. */
static int
command_enables_condstore(const struct command *cmd, const struct imap_tok *tok)
{
	switch (cmd->kind) {
	case CMD_SELECT:
	case CMD_EXAMINE:
		return tok->depth == 1 && (command_word_is(tok, "CONDSTORE") ||
		    command_word_is(tok, "QRESYNC"));
	case CMD_FETCH:
		return tok->depth >= 1 && (command_word_is(tok, "MODSEQ") ||
		    command_word_is(tok, "CHANGEDSINCE"));
	case CMD_STORE:
		return tok->depth == 1 && command_word_is(tok, "UNCHANGEDSINCE");
	case CMD_SEARCH:
		return command_word_is(tok, "MODSEQ");
	default:
		return 0;
	}
}

void
command_feed(struct command *cmd, const struct imap_tok *tok)
{
	struct command_arg *arg = NULL;
	unsigned argi;

	if (tok->type == IMAP_TOK_EOL || tok->type == IMAP_TOK_ERROR)
		return;
	if (tok->type == IMAP_TOK_LITERAL)
		cmd->literals++;
	if (tok->depth == 0 && tok->index + 1 > cmd->ntokens)
		cmd->ntokens = tok->index + 1;

	if (tok->index == 0 && tok->type == IMAP_TOK_ATOM) {
		if (tok->len <= COMMAND_TAG_MAX) {
			memcpy(cmd->tag, tok->str, tok->len);
			cmd->tag[tok->len] = '\0';
			cmd->tag_ok = tok->len > 0;
		}
		return;
	}
	if (tok->index == 1 && tok->type == IMAP_TOK_ATOM) {
		if (tok->len == 3 && strncasecmp(tok->str, "UID", 3) == 0)
			cmd->uid = 1;
		else
			command_set_name(cmd, tok->str, tok->len);
		return;
	}
	if (tok->index == 2 && cmd->uid && tok->type == IMAP_TOK_ATOM) {
		command_set_name(cmd, tok->str, tok->len);
		return;
	}

	/* RFC 7162 3.1: these turn CONDSTORE on for the rest of the session. */
	if (tok->type == IMAP_TOK_ATOM && tok->index >= command_first_arg(cmd) &&
	    command_enables_condstore(cmd, tok))
		cmd->condstore = 1;
	/* Arguments: keep top-level atoms, strings and literals, never secrets. */
	if (tok->depth > 0 || tok->index < command_first_arg(cmd))
		return;
	argi = tok->index - command_first_arg(cmd);
	if (cmd->kind == CMD_AUTHENTICATE && argi == 1 && tok->type == IMAP_TOK_ATOM &&
	    strcasecmp(command_arg(cmd, 0)->val, "PLAIN") == 0) {
		char user[256];

		free(cmd->sasl_user);
		cmd->sasl_user = NULL;
		if (sasl_plain_user(tok->str, tok->len, user, sizeof(user)) == 0 && user[0] != '\0')
			cmd->sasl_user = strdup(user);
	}
	if (argi >= COMMAND_NARGS || command_arg_is_secret(cmd, argi) ||
	    !command_keeps_args(cmd->kind))
		return;
	if (cmd->args == NULL && (cmd->args = calloc(COMMAND_NARGS, sizeof(*cmd->args))) == NULL)
		return;
	arg = &cmd->args[argi];
	switch (tok->type) {
	case IMAP_TOK_ATOM:
	case IMAP_TOK_QUOTED:
	case IMAP_TOK_LITERAL_DATA:
		command_arg_append(arg, tok->str, tok->len);
		break;
	case IMAP_TOK_LITERAL:
		arg->present = 1;
		break;
	default:
		break;
	}
}
