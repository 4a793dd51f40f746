"""imapcheck: a client-side checker for an IMAP response stream.

Feed it every byte the client receives (and, for the tag and solicitation
checks, every byte it sends), in chunks split anywhere; it keeps the client's
view of the selected mailbox and records protocol violations as strings:

    c = Checker()
    c.sent(b"a1 SELECT INBOX\\r\\n")
    c.received(b"* 3 EXISTS\\r\\n* 0 RECENT\\r\\na1 OK [READ-WRITE] done\\r\\n")
    c.errors   -> []            list of violation descriptions
    c.warnings -> []            unknown untagged response names
    c.count    -> 3             messages in the client's view (None: no mailbox)
    c.uids     -> {seq: uid}    where a FETCH with UID revealed it
    c.finish() -> flags a response cut off mid-way (call at end of stream)

Checks:
  * EXISTS never shrinks: after k EXPUNGEs the count is count-k and a later
    EXISTS must be >= it (the SELECT/EXAMINE answer starts a new count).
  * EXPUNGE n and FETCH n need 1 <= n <= count.
  * UIDs revealed by FETCH ascend with sequence numbers, and a sequence
    number keeps its UID until an EXPUNGE renumbers it.
  * With sent data: every tagged response answers a command that was sent
    and is still in progress; SEARCH/ESEARCH only while a SEARCH is in
    progress; EXPUNGE neither while a FETCH/STORE/SEARCH (not UID) is in
    progress, even pipelined with other commands, nor when no command is
    (RFC 3501 7.4.1, 5.5).
  * Every response parses: tag/status, balanced parentheses and quotes,
    known numeric responses, FETCH attribute pairs, CRLF line ends.

It is deliberately independent of stale_imapd.py (its own parser), so a
parsing mistake in the fixture is not mirrored here. Standard library only.
"""

import re

LITERAL_END = re.compile(rb"~?\{(\d+)\}\r?\n$")
CLIENT_LITERAL_END = re.compile(rb"~?\{(\d+)(\+?)\}\r?\n$")
TAG_RE = re.compile(rb'[^\x00-\x20\x7f(){%*"\\+]+$')
STATUS = (b"OK", b"NO", b"BAD", b"PREAUTH", b"BYE")
# untagged data responses we know; others are noted in .warnings (an
# extension the client did not enable is suspicious, not necessarily wrong)
DATA_RESPONSES = {b"CAPABILITY", b"LIST", b"LSUB", b"STATUS", b"SEARCH", b"ESEARCH", b"FLAGS",
                  b"QUOTA", b"QUOTAROOT", b"NAMESPACE", b"ENABLED", b"ID", b"SORT", b"THREAD",
                  b"METADATA", b"VANISHED", b"XLIST", b"ACL", b"MYRIGHTS", b"LISTRIGHTS"}
SEARCH_COMMANDS = {"SEARCH", "UID SEARCH", "SORT", "UID SORT"}
NO_EXPUNGE_DURING = {"FETCH", "STORE", "SEARCH"}
MAX_LINE = 1 << 20


class ParseError(Exception):
    pass


class Lit(bytes):
    """A literal inside a parsed response."""


def tokenize(segments):
    """Response bytes -> nested lists of tokens. segments alternate text and
    Lit (the literals, already read by length). Atoms keep bracketed parts
    whole (BODY[HEADER.FIELDS (A B)]<0>)."""
    top = []
    stack = [top]
    for seg in segments:
        if isinstance(seg, Lit):
            stack[-1].append(seg)
            continue
        i, n = 0, len(seg)
        while i < n:
            c = seg[i:i + 1]
            if c == b" ":
                i += 1
            elif c == b"(":
                new = []
                stack[-1].append(new)
                stack.append(new)
                i += 1
            elif c == b")":
                if len(stack) == 1:
                    raise ParseError("unbalanced ')'")
                stack.pop()
                i += 1
            elif c == b'"':
                j, out = i + 1, bytearray()
                while True:
                    if j >= n:
                        raise ParseError("unterminated quoted string")
                    ch = seg[j]
                    if ch == 0x5C:
                        if j + 1 >= n or seg[j + 1] not in b'"\\':
                            raise ParseError("bad escape in quoted string")
                        out.append(seg[j + 1])
                        j += 2
                    elif ch == 0x22:
                        break
                    elif ch in (0x0D, 0x0A):
                        raise ParseError("CR/LF in quoted string")
                    else:
                        out.append(ch)
                        j += 1
                stack[-1].append(("q", bytes(out)))
                i = j + 1
            else:
                j, depth = i, 0
                while j < n:
                    ch = seg[j:j + 1]
                    if ch == b"[":
                        depth += 1
                    elif ch == b"]" and depth:
                        depth -= 1
                    elif depth == 0 and ch in b" ()":
                        break
                    elif depth == 0 and ch in b'"{':
                        raise ParseError("unexpected %r in atom" % ch)
                    j += 1
                if depth:
                    raise ParseError("unbalanced '['")
                stack[-1].append(seg[i:j])
                i = j
    if len(stack) != 1:
        raise ParseError("unbalanced '('")
    return top


class Checker:
    def __init__(self):
        self.errors = []
        self.warnings = []          # unknown untagged response names
        self.count = None
        self.uids = {}
        self.responses = []         # (kind, first line) of every response, for diagnostics
        self.untagged = []          # parsed untagged responses: (keyword, args)
        # receive side
        self._rbuf = bytearray()
        self._segments = []         # current response: text and Lit segments
        self._lit_need = None
        # send side
        self._sbuf = bytearray()
        self._slit_need = 0
        self._scontinue = False     # next client line continues a command (after a literal)
        self._cur_tag = None        # tag of the command being sent
        self._sync_tag = None       # its synchronizing literal awaits the server's '+'
        self._sent_any = False
        self.inflight = {}          # tag -> command name, in send order
        self.completed = set()
        self._idle_tag = None       # IDLE in progress: the client's next line is DONE
        self._auth_tag = None       # AUTHENTICATE in progress: client lines are SASL
        self._select_started = set()

    # ------------------------------------------------------------ reporting
    def _err(self, msg, line=None):
        if line is not None:
            shown = bytes(line[:160]).decode("latin-1").rstrip("\r\n")
            msg = "%s: %r" % (msg, shown)
        self.errors.append(msg)

    def finish(self):
        """End of stream: a response cut off mid-way is an error."""
        if self._rbuf or self._segments or self._lit_need:
            self._err("stream ended inside a response", bytes(self._rbuf) or b"(literal)")

    # ------------------------------------------------------------ client side
    def sent(self, data):
        self._sent_any = True
        self._sbuf += data
        while True:
            if self._slit_need:
                take = min(self._slit_need, len(self._sbuf))
                del self._sbuf[:take]
                self._slit_need -= take
                if self._slit_need:
                    return
                self._scontinue = True
            i = self._sbuf.find(b"\n")
            if i < 0:
                return
            line = bytes(self._sbuf[:i + 1])
            del self._sbuf[:i + 1]
            m = CLIENT_LITERAL_END.search(line)
            cont = self._scontinue
            self._scontinue = False
            if cont:
                self._literal_announced(m)
                continue
            if self._idle_tag is not None and line.strip().upper() == b"DONE":
                self._idle_tag = None
                continue
            if self._auth_tag is not None:
                continue                # a SASL response line
            self._command(line)
            self._literal_announced(m)

    def _literal_announced(self, m):
        if not m:
            return
        self._slit_need = int(m.group(1))
        if m.group(2) != b"+":
            # The client sends it only after '+'; a tagged NO/BAD first means
            # it never comes (see _tagged).
            self._sync_tag = self._cur_tag
        if self._slit_need == 0:
            self._scontinue = True

    def _command(self, line):
        words = line.rstrip(b"\r\n").split(b" ")
        tag = words[0]
        name = words[1].upper().decode("latin-1") if len(words) > 1 else ""
        if name == "UID" and len(words) > 2:
            name = "UID " + words[2].upper().decode("latin-1")
        name = name.split("{")[0]
        tag = tag.decode("latin-1")
        self._cur_tag = tag
        if tag in self.inflight:
            self._err("client reused tag %s while it was in progress" % tag)
        self.inflight[tag] = name
        self.completed.discard(tag)
        if name == "IDLE":
            self._idle_tag = tag
        elif name == "AUTHENTICATE":
            self._auth_tag = tag

    def _oldest(self):
        for tag, name in self.inflight.items():
            return tag, name
        return None, None

    # ------------------------------------------------------------ server side
    def received(self, data):
        self._rbuf += data
        while True:
            if self._lit_need is not None:
                if len(self._rbuf) < self._lit_need:
                    return
                self._segments.append(Lit(bytes(self._rbuf[:self._lit_need])))
                del self._rbuf[:self._lit_need]
                self._lit_need = None
            i = self._rbuf.find(b"\n")
            if i < 0:
                if len(self._rbuf) > MAX_LINE:
                    self._err("response line longer than %d bytes without LF" % MAX_LINE, self._rbuf)
                    self._rbuf.clear()
                return
            line = bytes(self._rbuf[:i + 1])
            del self._rbuf[:i + 1]
            if not line.endswith(b"\r\n"):
                self._err("line not terminated by CRLF", line)
            m = LITERAL_END.search(line)
            if m:
                self._segments.append(line[:m.start()])
                self._lit_need = int(m.group(1))
                continue
            self._segments.append(line.rstrip(b"\r\n"))
            segments, self._segments = self._segments, []
            try:
                self._response(segments)
            except ParseError as e:
                self._err("unparsable response (%s)" % e, segments[0])

    def _response(self, segs):
        first = segs[0]
        self.responses.append((first[:1], first[:120]))
        if first.startswith(b"+"):
            self._sync_tag = None       # the literal may come now
            if self._sent_any and not self.inflight:
                self._err("continuation request with no command in progress", first)
            return
        if first.startswith(b"* "):
            self._untagged(segs, first[2:])
            return
        tag, sp, rest = first.partition(b" ")
        if not TAG_RE.match(tag):
            raise ParseError("bad tag")
        status, _, text = rest.partition(b" ")
        if status.upper() not in (b"OK", b"NO", b"BAD"):
            raise ParseError("tagged response without OK/NO/BAD")
        self._resp_text(text)
        self._tagged(tag.decode("latin-1"), status.upper(), first)

    def _resp_text(self, text):
        """resp-text: an optional [code] (must close), then free text."""
        if text.startswith(b"["):
            depth = 0
            for ch in text:
                if ch == 0x5B:
                    depth += 1
                elif ch == 0x5D:
                    depth -= 1
                    if depth == 0:
                        return
            raise ParseError("unterminated response code")

    def _tagged(self, tag, status, line):
        if not self._sent_any:
            return
        if tag not in self.inflight:
            if tag in self.completed:
                self._err("tagged response for %s, which already completed" % tag, line)
            else:
                self._err("tagged response for tag %s the client never sent" % tag, line)
            return
        name = self.inflight.pop(tag)
        self.completed.add(tag)
        if tag == self._sync_tag:
            # Refused before '+': the announced literal and the rest of that
            # command are never sent.
            self._sync_tag = None
            self._slit_need = 0
            self._scontinue = False
        if tag == self._idle_tag:
            self._idle_tag = None
        if tag == self._auth_tag:
            self._auth_tag = None
        if name in ("SELECT", "EXAMINE"):
            self._select_started.discard(tag)
            if status != b"OK":
                self._deselect()
            elif self.count is None:
                self._err("%s OK without an EXISTS response" % name, line)
        elif name in ("CLOSE", "UNSELECT") and status == b"OK":
            self._deselect()

    def _deselect(self):
        self.count = None
        self.uids = {}

    def _selecting(self):
        """True while the oldest command in progress is a SELECT/EXAMINE:
        the server is answering it, so its EXISTS starts a new count."""
        tag, name = self._oldest()
        if name in ("SELECT", "EXAMINE"):
            if tag not in self._select_started:
                self._select_started.add(tag)
                self._deselect()
            return True
        return False

    def _untagged(self, segs, body):
        segs = [body] + segs[1:]
        # Called for every untagged response: notices a SELECT being answered.
        selecting = self._selecting() if self._sent_any else False
        word, _, rest = body.partition(b" ")
        if word.isdigit():
            kind, _, args = rest.partition(b" ")
            self._numeric(int(word), kind.upper(), args, segs, body, selecting)
            return
        up = word.upper()
        if up in STATUS:
            self._resp_text(rest)
            if self._sent_any and up == b"PREAUTH":
                self._err("PREAUTH after the greeting", body)
            return
        if not word:
            raise ParseError("empty untagged response")
        args = tokenize([rest] + segs[1:])
        self.untagged.append((up.decode("latin-1"), args))
        if up not in DATA_RESPONSES:
            self.warnings.append("unknown untagged response %s" % up.decode("latin-1"))
        if up == b"FLAGS" and not self._sent_any:
            self._deselect()           # no sent data: a FLAGS starts a SELECT answer
        if up in (b"SEARCH", b"ESEARCH", b"SORT") and self._sent_any:
            wanted = [t for t, n in self.inflight.items() if n in SEARCH_COMMANDS]
            if not wanted:
                self._err("unsolicited %s response" % up.decode(), body)
            elif up == b"ESEARCH" and args and isinstance(args[0], list) and len(args[0]) == 2 \
                    and isinstance(args[0][1], tuple) and args[0][1][1].decode("latin-1") not in wanted:
                self._err("ESEARCH for a tag with no SEARCH in progress", body)

    def _numeric(self, n, kind, args, segs, line, selecting):
        if kind in (b"EXISTS", b"RECENT", b"EXPUNGE"):
            if args or len(segs) > 1:
                raise ParseError("%s takes no arguments" % kind.decode())
        if kind == b"EXISTS":
            if self.count is not None and not selecting and n < self.count:
                self._err("EXISTS shrank from %d to %d without EXPUNGE" % (self.count, n), line)
            self.count = n
        elif kind == b"RECENT":
            pass
        elif kind == b"EXPUNGE":
            self._check_expunge_allowed(line)
            if self.count is None:
                self._err("EXPUNGE with no mailbox selected", line)
            elif n < 1 or n > self.count:
                self._err("EXPUNGE %d out of range (%d messages)" % (n, self.count), line)
            else:
                self.count -= 1
                self.uids = {(s if s < n else s - 1): u for s, u in self.uids.items() if s != n}
        elif kind == b"FETCH":
            toks = tokenize([args] + segs[1:])
            if len(toks) != 1 or not isinstance(toks[0], list):
                raise ParseError("FETCH data must be one parenthesised list")
            self._fetch(n, toks[0], line)
        else:
            raise ParseError("unknown numeric response %s" % kind.decode("latin-1"))

    def _check_expunge_allowed(self, line):
        if not self._sent_any:
            return
        names = set(self.inflight.values())
        if not names:
            self._err("EXPUNGE with no command in progress", line)
        elif names <= NO_EXPUNGE_DURING:
            self._err("EXPUNGE while answering %s (RFC 3501 7.4.1)" % "/".join(sorted(names)), line)
        elif names & NO_EXPUNGE_DURING:
            # Pipelined, e.g. FETCH + NOOP: the EXPUNGE may answer the NOOP,
            # but only after the FETCH has completed (responses of pipelined
            # commands come in order; the FETCH's numbers would be ambiguous).
            self._err("EXPUNGE while %s is still in progress (pipelined with %s; RFC 3501 5.5, 7.4.1)"
                      % ("/".join(sorted(names & NO_EXPUNGE_DURING)),
                         "/".join(sorted(names - NO_EXPUNGE_DURING))), line)

    def _fetch(self, n, items, line):
        if len(items) % 2:
            raise ParseError("FETCH attributes must come in name/value pairs")
        if self.count is None:
            self._err("FETCH with no mailbox selected", line)
            return
        if n < 1 or n > self.count:
            self._err("FETCH for message %d of %d" % (n, self.count), line)
            return
        for name, value in zip(items[0::2], items[1::2]):
            if not isinstance(name, bytes) or isinstance(name, Lit):
                raise ParseError("FETCH attribute name is not an atom")
            up = name.upper()
            if up == b"UID":
                if not isinstance(value, bytes) or isinstance(value, Lit) or not value.isdigit() \
                        or int(value) == 0:
                    raise ParseError("UID value is not a number")
                self._learn_uid(n, int(value), line)
            elif up == b"FLAGS" and not isinstance(value, list):
                raise ParseError("FLAGS value is not a list")
            elif up == b"RFC822.SIZE" and not (isinstance(value, bytes) and value.isdigit()):
                raise ParseError("RFC822.SIZE value is not a number")

    def _learn_uid(self, n, uid, line):
        old = self.uids.get(n)
        if old is not None and old != uid:
            self._err("message %d changed UID from %d to %d without EXPUNGE" % (n, old, uid), line)
        for s, u in self.uids.items():
            if (s < n and u >= uid) or (s > n and u <= uid):
                self._err("UIDs out of order: message %d has UID %d, message %d has UID %d"
                          % (s, u, n, uid), line)
                break
        self.uids[n] = uid
