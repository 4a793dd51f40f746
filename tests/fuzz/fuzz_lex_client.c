/* fuzz_lex_client: the tokenizer in client mode (commands), see fuzz_lex.h. */
#define FUZZ_LEX_MODE IMAP_LEX_CLIENT
#include "fuzz_lex.h"
