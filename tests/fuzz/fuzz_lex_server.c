/* fuzz_lex_server: the tokenizer in server mode (responses), see fuzz_lex.h. */
#define FUZZ_LEX_MODE IMAP_LEX_SERVER
#include "fuzz_lex.h"
