/* command: what a client command is, read from its tokens as they stream by. */
#ifndef COMMAND_H
#define COMMAND_H

#include <stddef.h>
#include "imap_lex.h"

enum command_kind {
	CMD_UNKNOWN,		/* not a command imapfresh acts on */
	CMD_NONE,		/* no command name yet (or an empty line) */
	CMD_CAPABILITY,
	CMD_STARTTLS,
	CMD_LOGIN,
	CMD_AUTHENTICATE,
	CMD_IDLE,
	CMD_LOGOUT,
	CMD_COMPRESS,
	CMD_SELECT,
	CMD_EXAMINE,
	CMD_CLOSE,
	CMD_UNSELECT,
	CMD_FETCH,
	CMD_STORE,
	CMD_SEARCH,
	CMD_COPY,
	CMD_MOVE,
	CMD_EXPUNGE,
	CMD_APPEND,
	CMD_NOOP,
	CMD_CHECK,
	CMD_GETQUOTAROOT,
	CMD_UNAUTHENTICATE,
	CMD_ID,
	CMD_SORT,
	CMD_THREAD,
};

#define COMMAND_TAG_MAX 128
#define COMMAND_ARG_MAX 1024	/* longer arguments are kept truncated */
#define COMMAND_NARGS 2

struct command_arg {
	char val[COMMAND_ARG_MAX + 1];	/* NUL-terminated, astring decoded */
	size_t len;
	int truncated;
	int present;
};

struct command {
	char tag[COMMAND_TAG_MAX + 1];
	int tag_ok;		/* tag present and short enough to echo */
	char name[32];		/* upper-cased, "UID " folded into uid */
	enum command_kind kind;
	int uid;		/* UID FETCH / UID MOVE ... */
	unsigned ntokens;	/* top-level tokens seen */
	/* The first arguments after the name, for the commands whose
	 * arguments imapfresh reads (SELECT, APPEND, COPY, MOVE, LOGIN,
	 * AUTHENTICATE): allocated for those only, so an idle session carries
	 * none. A secret (LOGIN's password, a SASL response) is never stored. */
	struct command_arg *args;
	unsigned literals;	/* literals in this command */
	int condstore;		/* it turns CONDSTORE on (RFC 7162 3.1) */
	char *sasl_user;	/* AUTHENTICATE PLAIN initial response: the user only (or NULL) */
};

/* A command struct starts zeroed; reset frees what the last command held. */
void command_reset(struct command *cmd);

/* Argument i (0 = first after the name): an empty one when not kept. */
const struct command_arg *command_arg(const struct command *cmd, unsigned i);

/* Feed one token of the command (EOL included). */
void command_feed(struct command *cmd, const struct imap_tok *tok);

/* Is top-level argument i (0 = first after the name) a secret? */
int command_arg_is_secret(const struct command *cmd, unsigned argi);

/* Is this token (already fed) part of a secret argument? */
int command_token_is_secret(const struct command *cmd, const struct imap_tok *tok);

const char *command_kind_name(enum command_kind kind);
/* CMD_UNKNOWN for a name imapfresh does not act on. */
enum command_kind command_kind_from_name(const char *name);

#endif
