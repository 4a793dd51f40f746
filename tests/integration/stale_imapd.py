#!/usr/bin/env python3
"""stale-imapd: a deliberately stale IMAP4rev1 server, the test upstream for
imapfresh's stale-session fix (issue 3).

Why it exists
-------------
WildDuck (zone-eu/wildduck#708) keeps, per IMAP session, its own list of the
selected mailbox's UIDs. Changes made by *other* sessions reach that list only
through journal notifications that are published over Redis, debounced, and
then emitted to the client only at the end of some commands. Commands that do
not emit them (FETCH, STORE, APPEND) and FETCH ranges resolved against the
stale list make a client's long-lived connection miss messages that another
connection moved or copied in. This fixture reproduces exactly that session
model so the proxy's repairs (injected NOOP / UID SEARCH / re-SELECT) can be
tested without a WildDuck, MongoDB and Redis.

What is modelled (and how)
--------------------------
* Store: one in-memory store shared by every connection: users, their
  mailboxes (INBOX, Archive, Trash at start; CREATE adds), messages, quota.
* Journal: every change to a mailbox (new message, expunge, flag change) is
  appended to that mailbox's journal with a modseq and the id of the session
  that made it (WildDuck's `ignore: session.id`: a session never receives its
  own changes back; it already answered them itself, immediately).
* Notification: after a command changed a mailbox, a notification is
  published for (user, mailbox). It is debounced like WildDuck's
  imap-notifier: a trailing timer of --debounce-ms, restarted by every new
  notification, but never held longer than 10 x debounce. When it fires,
  every session of that user with that mailbox selected pulls the journal
  entries newer than what it pulled before into its pending queue.
  --drop-notifications N loses every Nth notification of a mailbox (lock
  contention); its entries stay in the journal and are pulled by the next
  notification of that mailbox, as in WildDuck. --copy-notifies no makes
  COPY write no journal entries at all: only a new SELECT shows the copies.
* Emission: a session's pending queue is applied to its uid_list, and the
  `* n EXISTS` / `* n EXPUNGE` / `* n FETCH (UID u FLAGS (...))` responses are
  sent, only at the end of successful commands that are not in
  --no-apply-after (default FETCH,STORE,APPEND, matching WildDuck's
  disableNotifications; a name covers its UID form too), and during IDLE when
  --idle-push yes. Plain FETCH/STORE/SEARCH never emit EXPUNGE (RFC 3501
  7.4.1): the queue is applied up to its first EXPUNGE only.
* Views: FETCH, STORE, COPY, MOVE, EXPUNGE resolve sequence and UID sets
  against the session's uid_list (WildDuck's selected.uidList): UIDs the
  session does not know are silently skipped. SEARCH reads the store: UID
  SEARCH returns UIDs the session cannot FETCH (the bug's signature), plain
  SEARCH omits them (they have no sequence number).
* A pending EXISTS whose UID is lower than the session's highest known UID
  cannot be announced without renumbering, so it is dropped (the session
  stays stale until the next SELECT), never emitted out of order.

Protocol: IMAP4rev1 with LITERAL+ UIDPLUS MOVE IDLE QUOTA NAMESPACE UNSELECT;
AUTH=PLAIN and SASL-IR are advertised before login only. With qresync=True
(--qresync yes) also ENABLE CONDSTORE QRESYNC: ENABLE QRESYNC makes the
session report expunges as * VANISHED <uid> (RFC 7162 3.2.10), and SELECT
accepts a (CONDSTORE) parameter; no MODSEQs are kept.

CLI
---
  stale_imapd.py --port P [--host 127.0.0.1] [--user NAME:PASS]...
                 [--debounce-ms N] [--idle-push yes|no] [--copy-notifies yes|no]
                 [--drop-notifications N] [--no-apply-after FETCH,STORE,APPEND] [--qresync yes|no]
                 [--log FILE]
prints STALE_PORT=P and READY=1 once listening; runs until SIGTERM/SIGINT.
--port 0 picks a free port.

Python API (same options as keywords)
-------------------------------------
  srv = StaleServer(port=0, debounce_ms=100, ...); port = srv.start(); srv.stop()
  port, stop = start_background(debounce_ms=0, ...)
  srv.deliver("alice", "INBOX", raw_bytes) -> uid    (an external delivery,
                                                      notified like any change)
  srv.mailbox_uids("alice", "Archive") -> [uids in the store]
"""

import argparse
import asyncio
import base64
import bisect
import datetime
import email.parser
import email.policy
import email.utils
import re
import signal
import sys
import threading
import time

HOST = "127.0.0.1"
CAPABILITIES = "IMAP4rev1 LITERAL+ UIDPLUS MOVE IDLE QUOTA NAMESPACE UNSELECT"
# Advertised before authentication only, as Dovecot does: a client must know
# AUTHENTICATE PLAIN (and its initial response) is there to use it.
PREAUTH_EXTRA = "AUTH=PLAIN SASL-IR"
DELIMITER = "/"
INITIAL_MAILBOXES = ("INBOX", "Archive", "Trash")
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
QUOTA_LIMIT_KB = 1024 * 1024
MAX_LINE = 1024 * 1024
MAX_LITERAL = 64 * 1024 * 1024
DEFAULT_NO_APPLY = ("FETCH", "STORE", "APPEND")
# Same accounts as servers.py's Dovecot, so a test can point at either.
DEFAULT_USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": 'se cr"et'}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
          "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class BadCommand(Exception):
    """Answered with `tag BAD <message>`."""


class NoCommand(Exception):
    """Answered with `tag NO <message>`."""


class ConnectionDone(Exception):
    """The client went away (or LOGOUT): end the session quietly."""


# ===================================================================== tokenizer

class Atom(str):
    """An atom (including flags like \\Seen and fetch items like BODY[...])."""


class QString(str):
    """A quoted string, unescaped."""


class Literal(bytes):
    """A literal's payload."""


LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}$")


class CommandTokenizer:
    """Turns one client command, fed line by line with its literals in
    between, into a token tree: Atom / QString / Literal / list (for a
    parenthesised list).

    Incremental because a command with a synchronizing literal is not complete
    until we have answered `+` and read the literal: feed_line() returns
    (size, synchronizing) when the line announces a literal, then the caller
    reads it and calls feed_literal() and feed_line() with the next line.
    A syntax error is recorded in .error rather than raised, and the literal
    announcement at the end of the line is still reported, so the reader can
    skip a non-synchronizing literal the client sends regardless.

    Bracketed parts of an atom are kept whole: BODY.PEEK[HEADER.FIELDS (A B)]<0.10>
    is one atom even though it holds spaces and parentheses (RFC 3501 section
    and partial syntax)."""

    def __init__(self):
        self.tokens = []
        self._stack = [self.tokens]
        self.error = None

    def feed_line(self, line):
        """line: bytes without CRLF. Returns (n, sync) or None."""
        m = LITERAL_AT_END.search(line)
        if self.error is None:
            try:
                self._scan(line[:m.start()] if m else line)
            except BadCommand as e:
                self.error = str(e)
        if m:
            if self.error is None and m.start() > 0 and line[m.start() - 1:m.start()] not in b" (":
                self.error = "literal must follow a space or '('"
            return int(m.group(1)), m.group(2) != b"+"
        if self.error is None and len(self._stack) != 1:
            self.error = "unbalanced parentheses"
        return None

    def feed_literal(self, data):
        if self.error is None:
            self._stack[-1].append(Literal(data))

    def _scan(self, line):
        i, n = 0, len(line)
        while i < n:
            c = line[i:i + 1]
            if c == b" ":
                i += 1
            elif c == b"(":
                new = []
                self._stack[-1].append(new)
                self._stack.append(new)
                i += 1
            elif c == b")":
                if len(self._stack) == 1:
                    raise BadCommand("unexpected ')'")
                self._stack.pop()
                i += 1
            elif c == b'"':
                i = self._quoted(line, i)
            elif c == b"{":
                raise BadCommand("literal announcement not at end of line")
            else:
                i = self._atom(line, i)

    def _quoted(self, line, i):
        out = bytearray()
        j = i + 1
        while j < len(line):
            c = line[j]
            if c == 0x5C:  # backslash: only \" and \\ are valid escapes
                if j + 1 >= len(line) or line[j + 1] not in b'"\\':
                    raise BadCommand("bad escape in quoted string")
                out.append(line[j + 1])
                j += 2
            elif c == 0x22:
                self._stack[-1].append(QString(bytes(out).decode("utf-8", "surrogateescape")))
                return j + 1
            else:
                out.append(c)
                j += 1
        raise BadCommand("unterminated quoted string")

    def _atom(self, line, i):
        j, depth = i, 0
        while j < len(line):
            c = line[j:j + 1]
            if c == b"[":
                depth += 1
            elif c == b"]" and depth:
                depth -= 1
            elif depth == 0 and c in b" ()":
                break
            elif depth == 0 and c in b'"':
                raise BadCommand("'\"' inside an atom")
            elif c in b"\r\n\0":
                raise BadCommand("control character in command")
            j += 1
        if depth:
            raise BadCommand("unbalanced '['")
        self._stack[-1].append(Atom(line[i:j].decode("utf-8", "surrogateescape")))
        return j


def astring(tok, what="argument"):
    """An astring argument (atom, quoted string or literal) as str."""
    if isinstance(tok, Literal):
        return tok.decode("utf-8", "surrogateescape")
    if isinstance(tok, str):
        return str(tok)
    raise BadCommand("%s must be a string" % what)


def render_tokens(tokens):
    """Tokens back to readable text, for the protocol log."""
    out = []
    for t in tokens:
        if isinstance(t, list):
            out.append("(" + render_tokens(t) + ")")
        elif isinstance(t, Literal):
            head = bytes(t[:120]).decode("utf-8", "backslashreplace")
            out.append("{%d}%r%s" % (len(t), head, "..." if len(t) > 120 else ""))
        elif isinstance(t, QString):
            out.append('"%s"' % t.replace("\\", "\\\\").replace('"', '\\"'))
        else:
            out.append(str(t))
    return " ".join(out)


# ===================================================================== formatting

def imap_string(value):
    """A string as IMAP: quoted when it can be, else a literal (8-bit, CR/LF)."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if any(b > 0x7E or b in (0x0D, 0x0A, 0x00) for b in value):
        return b"{%d}\r\n" % len(value) + value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def nstring(value):
    return b"NIL" if value is None else imap_string(value)


def literal(data):
    return b"{%d}\r\n" % len(data) + data


def fmt_flags(flags):
    system = [f for f in SYSTEM_FLAGS if f in flags]
    keywords = sorted(f for f in flags if f not in SYSTEM_FLAGS)
    return "(" + " ".join(system + keywords) + ")"


def fmt_set(numbers):
    """[1,2,3,5] -> '1:3,5' (COPYUID sets)."""
    out, run = [], []
    for n in numbers:
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else "%d:%d" % (run[0], run[-1]))
        run = [n]
    if run:
        out.append(str(run[0]) if len(run) == 1 else "%d:%d" % (run[0], run[-1]))
    return ",".join(out)


def fmt_internaldate(dt):
    off = dt.utcoffset() or datetime.timedelta(0)
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return "%02d-%s-%04d %02d:%02d:%02d %s%02d%02d" % (
        dt.day, MONTHS[dt.month - 1], dt.year, dt.hour, dt.minute, dt.second,
        sign, minutes // 60, minutes % 60)


def parse_internaldate(text):
    """'dd-Mon-yyyy hh:mm:ss +zzzz' (day may be space-padded)."""
    m = re.fullmatch(r"\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", text)
    if not m:
        raise BadCommand("invalid date-time")
    lower = [x.lower() for x in MONTHS]
    if m.group(2).lower() not in lower:
        raise BadCommand("invalid month in date-time")
    month = lower.index(m.group(2).lower()) + 1
    off = datetime.timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
    tz = datetime.timezone(off if m.group(7) == "+" else -off)
    try:
        return datetime.datetime(int(m.group(3)), month, int(m.group(1)), int(m.group(4)),
                                 int(m.group(5)), int(m.group(6)), tzinfo=tz)
    except ValueError:
        raise BadCommand("invalid date-time")


def parse_search_date(text):
    """SEARCH date: 'd-Mon-yyyy' -> datetime.date."""
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
    lower = [x.lower() for x in MONTHS]
    if not m or m.group(2).lower() not in lower:
        raise BadCommand("invalid search date")
    try:
        return datetime.date(int(m.group(3)), lower.index(m.group(2).lower()) + 1, int(m.group(1)))
    except ValueError:
        raise BadCommand("invalid search date")


def canonical_flag(flag):
    """System flags are case-insensitive; keep one spelling of each."""
    for f in SYSTEM_FLAGS + ("\\Recent",):
        if flag.lower() == f.lower():
            return f
    if flag.startswith("\\"):
        raise BadCommand("unknown system flag %s" % flag)
    return flag


# ===================================================================== sequence sets

def parse_sequence_set(text):
    """'1,3:5,7:*' -> [(1,1),(3,5),(7,None)]; None stands for '*'."""
    if not isinstance(text, Atom) or not text:
        raise BadCommand("invalid sequence set")
    ranges = []
    for part in text.split(","):
        ends = part.split(":")
        if len(ends) > 2:
            raise BadCommand("invalid sequence set %s" % text)
        vals = []
        for e in ends:
            if e == "*":
                vals.append(None)
            elif e.isdigit() and e[0] != "0" and int(e) < 2 ** 32:
                vals.append(int(e))
            else:
                raise BadCommand("invalid sequence set %s" % text)
        ranges.append((vals[0], vals[-1]))
    return ranges


def resolve_seqs(ranges, count):
    """Sequence numbers (1..count) selected by ranges. A number above count is
    an error (the client used a number it cannot know); '*' on an empty
    mailbox selects nothing."""
    out = set()
    for a, b in ranges:
        if count == 0 and (a is None or b is None):
            continue
        a = count if a is None else a
        b = count if b is None else b
        lo, hi = min(a, b), max(a, b)
        if hi > count:
            raise BadCommand("invalid message sequence number %d (%d messages)" % (hi, count))
        out.update(range(lo, hi + 1))
    return sorted(out)


def resolve_uids(ranges, uids):
    """UIDs of the sorted list `uids` selected by ranges. '*' is the largest
    UID in `uids`; RFC 3501: 'n:*' with n above it still selects it."""
    if not uids:
        return []
    top = uids[-1]
    out = set()
    for a, b in ranges:
        a = top if a is None else a
        b = top if b is None else b
        lo, hi = min(a, b), max(a, b)
        out.update(uids[bisect.bisect_left(uids, lo):bisect.bisect_right(uids, hi)])
    return sorted(out)


# ===================================================================== MIME (for FETCH)

class MimePart:
    """Just enough MIME to answer BODY[...] sections, ENVELOPE and
    BODYSTRUCTURE from the exact stored bytes."""

    def __init__(self, raw):
        self.raw = raw
        # BODY[HEADER] includes the blank line that ends the header.
        crlf, lf = raw.find(b"\r\n\r\n"), raw.find(b"\n\n")
        if raw.startswith((b"\r\n", b"\n")):          # no header fields at all
            n = 2 if raw.startswith(b"\r\n") else 1
            self.header, self.body = raw[:n], raw[n:]
        elif crlf >= 0 and (lf < 0 or crlf < lf):
            self.header, self.body = raw[:crlf + 4], raw[crlf + 4:]
        elif lf >= 0:
            self.header, self.body = raw[:lf + 2], raw[lf + 2:]
        else:
            self.header, self.body = raw, b""
        self.headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(self.header)
        self._subparts = None

    @property
    def ctype(self):
        return self.headers.get_content_maintype().upper(), self.headers.get_content_subtype().upper()

    @property
    def subparts(self):
        if self._subparts is None:
            self._subparts = []
            boundary = self.headers.get_param("boundary") if self.ctype[0] == "MULTIPART" else None
            if boundary:
                self._subparts = [MimePart(p) for p in split_multipart(self.body, str(boundary).encode())]
        return self._subparts

    def header_fields(self, names, negate):
        """HEADER.FIELDS / HEADER.FIELDS.NOT: whole fields (with
        continuation lines) whose name is / is not listed, then the blank line."""
        wanted = set(n.lower() for n in names)
        out, keep = [], False
        for line in self.header.splitlines(keepends=True):
            if line in (b"\r\n", b"\n"):
                break
            if line[:1] in (b" ", b"\t"):
                if keep:
                    out.append(line)
                continue
            name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
            keep = (name in wanted) != negate
            if keep:
                out.append(line)
        return b"".join(out) + b"\r\n"


def split_multipart(body, boundary):
    delim = b"--" + boundary
    parts, cur = [], None
    for line in body.splitlines(keepends=True):
        s = line.rstrip()
        if s == delim + b"--":
            break
        if s == delim:
            if cur is not None:
                parts.append(_strip_eol(b"".join(cur)))
            cur = []
        elif cur is not None:
            cur.append(line)
    if cur is not None:
        parts.append(_strip_eol(b"".join(cur)))
    return parts


def _strip_eol(b):
    # The line break before a boundary delimiter belongs to the delimiter.
    return b[:-2] if b.endswith(b"\r\n") else b[:-1] if b.endswith(b"\n") else b


def _hval(headers, name):
    v = headers.get(name)
    if v is None:
        return None
    return re.sub(r"\r?\n[ \t]*", " ", str(v)).strip().encode("ascii", "surrogateescape")


def envelope(part):
    h = part.headers

    def addresses(name, default=None):
        vals = h.get_all(name)
        if not vals:
            return default if default is not None else b"NIL"
        out = []
        for display, addr in email.utils.getaddresses([re.sub(r"\r?\n[ \t]*", " ", str(v)) for v in vals]):
            if not addr and not display:
                continue
            mbox, _, host = addr.partition("@")
            out.append(b"(" + nstring(display or None) + b" NIL " + nstring(mbox) + b" "
                       + (nstring(host) if host else b"NIL") + b")")
        return b"(" + b"".join(out) + b")" if out else b"NIL"

    frm = addresses("From")
    fields = [nstring(_hval(h, "Date")), nstring(_hval(h, "Subject")), frm,
              addresses("Sender", frm), addresses("Reply-To", frm), addresses("To"),
              addresses("Cc"), addresses("Bcc"), nstring(_hval(h, "In-Reply-To")),
              nstring(_hval(h, "Message-ID"))]
    return b"(" + b" ".join(fields) + b")"


def bodystructure(part):
    """Non-extensible structure (extension data is optional in both BODY and
    BODYSTRUCTURE, RFC 3501 7.4.2)."""
    main, sub = part.ctype
    if main == "MULTIPART" and part.subparts:
        return b"(" + b"".join(bodystructure(p) for p in part.subparts) + b" " + imap_string(sub) + b")"
    if main == "MULTIPART":
        main, sub = "TEXT", "PLAIN"
    params = [(k, v) for k, v in (part.headers.get_params() or [])[1:]] if part.headers.get("Content-Type") else []
    if main == "TEXT" and not any(k.lower() == "charset" for k, _ in params):
        params.append(("charset", "us-ascii"))
    plist = b"(" + b" ".join(imap_string(k.upper()) + b" " + imap_string(str(v)) for k, v in params) + b")" \
        if params else b"NIL"
    enc = _hval(part.headers, "Content-Transfer-Encoding") or b"7BIT"
    fields = [imap_string(main), imap_string(sub), plist, nstring(_hval(part.headers, "Content-ID")),
              nstring(_hval(part.headers, "Content-Description")), imap_string(enc.upper()),
              b"%d" % len(part.body)]
    if main == "TEXT":
        fields.append(b"%d" % part.body.count(b"\n"))
    elif (main, sub) == ("MESSAGE", "RFC822"):
        inner = MimePart(part.body)
        fields += [envelope(inner), bodystructure(inner), b"%d" % part.body.count(b"\n")]
    return b"(" + b" ".join(fields) + b")"


# ===================================================================== store

class Message:
    __slots__ = ("uid", "flags", "internal_date", "raw", "_mime")

    def __init__(self, uid, raw, flags=(), internal_date=None):
        self.uid = uid
        self.raw = bytes(raw)
        self.flags = set(flags)
        self.internal_date = internal_date or datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        self._mime = None

    @property
    def mime(self):
        if self._mime is None:
            self._mime = MimePart(self.raw)
        return self._mime


class JournalEntry:
    """One change to a mailbox. origin is the id of the session that made it
    (None for external deliveries): that session never pulls it back."""
    __slots__ = ("modseq", "kind", "uid", "flags", "origin")

    def __init__(self, modseq, kind, uid, flags, origin):
        self.modseq, self.kind, self.uid, self.flags, self.origin = modseq, kind, uid, flags, origin


class Mailbox:
    _uidvalidity_seq = 0

    def __init__(self, user, name):
        self.user = user
        self.name = name
        # Distinct per mailbox and per run, like a real server's.
        Mailbox._uidvalidity_seq += 1
        self.uidvalidity = (int(time.time()) & 0x3FFFFFFF) + Mailbox._uidvalidity_seq
        self.uidnext = 1
        self.messages = {}          # uid -> Message, insertion (= uid) order
        self.journal = []           # journal[i].modseq == i + 1
        # notification debounce state (see Store.notify)
        self.timer = None
        self.held_since = None
        self.published = 0

    @property
    def modseq(self):
        return len(self.journal)

    def uids(self):
        return list(self.messages)

    def add(self, raw, flags=(), internal_date=None):
        msg = Message(self.uidnext, raw, flags, internal_date)
        self.uidnext += 1
        self.messages[msg.uid] = msg
        return msg

    def record(self, kind, uid, flags, origin):
        self.journal.append(JournalEntry(len(self.journal) + 1, kind, uid, tuple(sorted(flags)), origin))

    def size(self):
        return sum(len(m.raw) for m in self.messages.values())


class User:
    def __init__(self, name, password):
        self.name = name
        self.password = password
        self.mailboxes = {}
        self.sessions = set()
        for n in INITIAL_MAILBOXES:
            self.mailboxes[n] = Mailbox(self, n)

    def mailbox(self, name):
        return self.mailboxes.get("INBOX" if name.upper() == "INBOX" else name)

    def quota_used_kb(self):
        return (sum(mb.size() for mb in self.mailboxes.values()) + 1023) // 1024


class Store:
    """Everything the sessions share, plus the notification machinery. Lives in
    the event loop's thread; nothing here is locked."""

    def __init__(self, opts, loop):
        self.opts = opts
        self.loop = loop
        self.users = {name: User(name, pw) for name, pw in opts["users"].items()}
        self.log = opts["logger"]

    def notify(self, mb):
        """Publish 'mailbox changed' for mb (WildDuck: notifier.fire()).
        Trailing debounce per (user, mailbox), held at most 10 x debounce."""
        mb.published += 1
        n = self.opts["drop_notifications"]
        if n and mb.published % n == 0:
            self.log.event("notification %d for %s/%s dropped" % (mb.published, mb.user.name, mb.name))
            return
        delay = self.opts["debounce_ms"] / 1000.0
        if delay <= 0:
            self._fire(mb)
            return
        now = self.loop.time()
        if mb.timer is not None:
            mb.timer.cancel()
            if now - mb.held_since >= 10 * delay:
                self._fire(mb)
                return
        else:
            mb.held_since = now
        mb.timer = self.loop.call_later(delay, self._fire, mb)

    def _fire(self, mb):
        if mb.timer is not None:
            mb.timer.cancel()
        mb.timer = None
        for s in list(mb.user.sessions):
            if s.selected is mb:
                s.pull_journal()


# ===================================================================== protocol log

class ProtocolLog:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace") if path else None

    def write(self, cid, direction, text):
        if self.f:
            stamp = time.strftime("%H:%M:%S") + ".%03d" % (int(time.time() * 1000) % 1000)
            for line in text.splitlines() or [""]:
                self.f.write("%s [%s] %s %s\n" % (stamp, cid, direction, line))

    def event(self, text):
        self.write("-", "#", text)

    def close(self):
        if self.f:
            self.f.close()
            self.f = None


# ===================================================================== session

class FetchItem:
    __slots__ = ("name", "section", "path", "part", "fields", "partial", "peek")

    def __init__(self, name, section=None, path=(), part="", fields=(), partial=None, peek=False):
        self.name, self.section, self.path, self.part = name, section, path, part
        self.fields, self.partial, self.peek = fields, partial, peek


FETCH_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
SIMPLE_FETCH = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
                "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
SECTION_RE = re.compile(r"^(BODY(?:\.PEEK)?)\[(.*)\](?:<(\d+)\.(\d+)>)?$", re.I | re.S)

# command name -> (allowed states, may be prefixed by UID)
NOT_AUTH, AUTH, SELECTED = "not-authenticated", "authenticated", "selected"
ANY = (NOT_AUTH, AUTH, SELECTED)
AUTHED = (AUTH, SELECTED)
COMMANDS = {
    "CAPABILITY": ANY, "NOOP": ANY, "LOGOUT": ANY,
    "LOGIN": (NOT_AUTH,), "AUTHENTICATE": (NOT_AUTH,),
    "SELECT": AUTHED, "EXAMINE": AUTHED, "CREATE": AUTHED, "LIST": AUTHED, "LSUB": AUTHED,
    "STATUS": AUTHED, "APPEND": AUTHED, "NAMESPACE": AUTHED, "GETQUOTA": AUTHED,
    "GETQUOTAROOT": AUTHED, "SUBSCRIBE": AUTHED, "UNSUBSCRIBE": AUTHED, "IDLE": AUTHED,
    "CHECK": (SELECTED,), "CLOSE": (SELECTED,), "UNSELECT": (SELECTED,), "EXPUNGE": (SELECTED,),
    "SEARCH": (SELECTED,), "FETCH": (SELECTED,), "STORE": (SELECTED,), "COPY": (SELECTED,),
    "MOVE": (SELECTED,), "ENABLE": AUTHED,
}
# tag = 1*<any ASTRING-CHAR except "+">
TAG_RE = re.compile(r'[^\x00-\x20\x7f(){%*"\\+]+')
UID_COMMANDS = {"FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE"}


class Session:
    """One client connection: its state, its selected mailbox, its own view
    of that mailbox (uid_list) and its queue of not-yet-emitted changes."""

    _ids = 0

    def __init__(self, server, reader, writer):
        Session._ids += 1
        self.id = Session._ids
        self.server = server
        self.store = server.store
        self.opts = server.opts
        self.log = server.log
        self.reader, self.writer = reader, writer
        self.state = NOT_AUTH
        self.user = None
        self.selected = None
        self.read_only = False
        self.qresync = False            # ENABLE QRESYNC: expunges told as VANISHED
        self.uid_list = []          # the session's view: seq n is uid_list[n-1]
        self.pending = []           # journal entries pulled, not yet emitted
        self.journal_pos = 0        # modseq up to which the journal was pulled
        self.idling = False
        self.wakeup = asyncio.Event()
        self._touched = []          # mailboxes changed by the current command

    # ------------------------------------------------------------ I/O
    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        if self.log.f:
            shown = data[:400].decode("utf-8", "backslashreplace").rstrip("\r\n")
            self.log.write(self.id, "S:", shown + (" ...(%d bytes)" % len(data) if len(data) > 400 else ""))
        self.writer.write(data)

    async def flush(self):
        await self.writer.drain()

    async def read_line(self):
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise ConnectionDone()
        except asyncio.LimitOverrunError:
            self.send("* BYE line too long")
            raise ConnectionDone()
        except (ConnectionError, OSError):
            raise ConnectionDone()
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    async def read_command(self):
        """Read one whole command (lines and literals). Returns the tokenizer;
        its .error is set when the command could not be parsed."""
        tok = CommandTokenizer()
        pieces = []
        line = await self.read_line()
        while True:
            pieces.append(line.decode("utf-8", "backslashreplace"))
            need = tok.feed_line(line)
            if need is None:
                break
            n, sync = need
            if n > MAX_LITERAL:
                self.send("* BYE literal too large")
                raise ConnectionDone()
            if sync and tok.error:
                break                   # do not invite a literal we will refuse
            if sync:
                self.send("+ Ready")
                await self.flush()
            try:
                data = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                raise ConnectionDone()
            tok.feed_literal(data)
            pieces.append("<literal %d bytes>" % n)
            line = await self.read_line()
        if self.log.f:
            self._log_command(tok, pieces)
        return tok

    def _log_command(self, tok, pieces):
        t = tok.tokens
        name = " ".join(str(x).upper() for x in t[1:3] if isinstance(x, Atom))
        if tok.error is None and name.startswith(("LOGIN", "AUTHENTICATE")):
            # Never log a secret: the user name for LOGIN, the mechanism for
            # AUTHENTICATE, nothing after.
            self.log.write(self.id, "C:", render_tokens(t[:3]) + " <redacted>")
        elif tok.error is None:
            self.log.write(self.id, "C:", render_tokens(t))
        elif re.search(r"\b(LOGIN|AUTHENTICATE)\b", pieces[0], re.I):
            self.log.write(self.id, "C:", pieces[0].split(" ")[0] + " <unparsable LOGIN/AUTHENTICATE redacted>")
        else:
            self.log.write(self.id, "C:", " | ".join(pieces) + "   [parse error: %s]" % tok.error)

    # ------------------------------------------------------------ main loop
    async def run(self):
        self.log.write(self.id, "#", "connected")
        try:
            self.send("* OK [CAPABILITY %s] stale-imapd ready" % self.capabilities())
            await self.flush()
            while True:
                tok = await self.read_command()
                await self.dispatch(tok)
                await self.flush()
        except ConnectionDone:
            pass
        except (ConnectionError, OSError):
            pass
        except Exception:
            # A fixture bug: say so on the wire and in the log, not silently.
            import traceback
            self.log.write(self.id, "!", traceback.format_exc())
            try:
                self.send("* BYE stale-imapd internal error")
            except Exception:
                pass
            raise
        finally:
            self.detach()
            try:
                self.writer.close()
            except Exception:
                pass
            self.log.write(self.id, "#", "closed")

    def detach(self):
        if self.user is not None:
            self.user.sessions.discard(self)

    def capabilities(self):
        extra = " ENABLE CONDSTORE QRESYNC" if self.opts.get("qresync") else ""
        return CAPABILITIES + extra + (" " + PREAUTH_EXTRA if self.state == NOT_AUTH else "")

    def send_expunge(self, seq, uid):
        """RFC 7162 3.2.10: a QRESYNC session gets VANISHED, never EXPUNGE."""
        self.send("* VANISHED %d" % uid if self.qresync else "* %d EXPUNGE" % seq)

    async def dispatch(self, tok):
        t = tok.tokens
        tag = t[0] if t and isinstance(t[0], Atom) and TAG_RE.fullmatch(t[0]) else None
        if tag is None:
            self.send("* BAD Invalid tag")
            return
        if tok.error:
            self.send("%s BAD %s" % (tag, tok.error))
            return
        if len(t) < 2 or not isinstance(t[1], Atom):
            self.send("%s BAD Missing command" % tag)
            return
        name, args, uid = t[1].upper(), t[2:], False
        if name == "UID":
            if not args or not isinstance(args[0], Atom) or args[0].upper() not in UID_COMMANDS:
                self.send("%s BAD Unknown UID command" % tag)
                return
            name, args, uid = args[0].upper(), args[1:], True
        if name not in COMMANDS:
            self.send("%s BAD Unknown command %s" % (tag, name))
            return
        if self.state not in COMMANDS[name]:
            self.send("%s BAD %s not allowed in %s state" % (tag, name, self.state))
            return
        self._touched = []
        try:
            handler = getattr(self, "cmd_" + name.lower())
            result = await handler(tag, args, uid)
        except BadCommand as e:
            self.send("%s BAD %s" % (tag, e))
            return
        except NoCommand as e:
            self.send("%s NO %s" % (tag, e))
            return
        finally:
            # Publish what this command changed (WildDuck: fire() after the
            # journal write), whether or not the command then failed.
            for mb in self._touched:
                self.store.notify(mb)
            self._touched = []
        if result is None:
            return                      # the handler answered itself (LOGOUT, IDLE)
        if self.selected is not None and name not in self.opts["no_apply_after"]:
            # RFC 3501 7.4.1: no EXPUNGE while answering FETCH, STORE, SEARCH.
            self.emit_pending(allow_expunge=uid or name not in ("FETCH", "STORE", "SEARCH"))
        self.send("%s %s" % (tag, result))

    # ------------------------------------------------------------ notifications
    def journal(self, mb, kind, uid, flags=()):
        mb.record(kind, uid, flags, self.id)
        if mb not in self._touched:
            self._touched.append(mb)

    def pull_journal(self):
        """Called by Store._fire: this session's listener got the event."""
        mb = self.selected
        for e in mb.journal[self.journal_pos:]:
            if e.origin != self.id:
                self.pending.append(e)
        self.journal_pos = mb.modseq
        if self.pending and self.idling:
            self.wakeup.set()

    def emit_pending(self, allow_expunge=True):
        """Apply the queue to uid_list, sending what the client must hear.
        Consecutive new messages are announced with one EXISTS."""
        new = False
        while self.pending:
            e = self.pending[0]
            if e.kind == "EXPUNGE" and not allow_expunge:
                break
            self.pending.pop(0)
            if e.kind == "EXISTS":
                if self.uid_list and e.uid <= self.uid_list[-1]:
                    continue  # known already, or would need renumbering: stay stale
                self.uid_list.append(e.uid)
                new = True
                continue
            if new:
                self.send("* %d EXISTS" % len(self.uid_list))
                new = False
            i = self.index_of(e.uid)
            if i is None:
                continue
            if e.kind == "EXPUNGE":
                del self.uid_list[i]
                self.send_expunge(i + 1, e.uid)
            else:
                msg = self.selected.messages.get(e.uid)
                flags = msg.flags if msg is not None else set(e.flags)
                self.send("* %d FETCH (UID %d FLAGS %s)" % (i + 1, e.uid, fmt_flags(flags)))
        if new:
            self.send("* %d EXISTS" % len(self.uid_list))

    def index_of(self, uid):
        i = bisect.bisect_left(self.uid_list, uid)
        return i if i < len(self.uid_list) and self.uid_list[i] == uid else None

    def select(self, mb, read_only):
        self.selected = mb
        self.read_only = read_only
        self.uid_list = mb.uids()
        self.pending = []
        self.journal_pos = mb.modseq
        self.state = SELECTED

    def deselect(self):
        self.selected = None
        self.uid_list = []
        self.pending = []
        self.state = AUTH

    def resolve(self, set_tok, uid):
        """Sequence or UID set -> UIDs, always against this session's view."""
        ranges = parse_sequence_set(set_tok)
        if uid:
            return resolve_uids(ranges, self.uid_list)
        return [self.uid_list[s - 1] for s in resolve_seqs(ranges, len(self.uid_list))]

    def mailbox_arg(self, tok):
        name = astring(tok, "mailbox name")
        mb = self.user.mailbox(name)
        return name, mb

    # own changes: the acting session answers them at once
    def announce_new(self, mb, uids):
        if mb is self.selected and uids:
            for u in uids:
                if not self.uid_list or u > self.uid_list[-1]:
                    self.uid_list.append(u)
            self.send("* %d EXISTS" % len(self.uid_list))

    def expunge_uids(self, mb, uids, announce):
        """Remove uids from mb; announce EXPUNGE for those in our view."""
        for u in sorted(uids):
            if mb.messages.pop(u, None) is None:
                continue
            self.journal(mb, "EXPUNGE", u)
            if mb is self.selected:
                i = self.index_of(u)
                if i is not None:
                    del self.uid_list[i]
                    if announce:
                        self.send_expunge(i + 1, u)

    # ------------------------------------------------------------ any state
    async def cmd_capability(self, tag, args, uid):
        self.send("* CAPABILITY " + self.capabilities())
        return "OK CAPABILITY completed"

    async def cmd_noop(self, tag, args, uid):
        return "OK NOOP completed"

    async def cmd_logout(self, tag, args, uid):
        self.send("* BYE stale-imapd logging out")
        self.send("%s OK LOGOUT completed" % tag)
        await self.flush()
        raise ConnectionDone()

    # ------------------------------------------------------------ not authenticated
    def _login(self, name, password):
        user = self.store.users.get(name)
        if user is None or user.password != password:
            raise NoCommand("[AUTHENTICATIONFAILED] Invalid credentials")
        self.user = user
        self.state = AUTH
        user.sessions.add(self)
        return "OK [CAPABILITY %s] Logged in" % self.capabilities()

    async def cmd_login(self, tag, args, uid):
        if len(args) != 2:
            raise BadCommand("LOGIN needs user name and password")
        return self._login(astring(args[0], "user name"), astring(args[1], "password"))

    async def cmd_authenticate(self, tag, args, uid):
        if not args or len(args) > 2 or not isinstance(args[0], Atom):
            raise BadCommand("AUTHENTICATE needs a mechanism")
        if args[0].upper() != "PLAIN":
            raise NoCommand("Unsupported authentication mechanism")
        if len(args) == 2:
            response = astring(args[1])            # SASL-IR
        else:
            self.send("+ ")
            await self.flush()
            response = (await self.read_line()).decode("latin-1")
            self.log.write(self.id, "C:", "<SASL response redacted>")
        if response.strip() == "*":
            raise BadCommand("Authentication cancelled")
        try:
            decoded = b"" if response == "=" else base64.b64decode(response, validate=True)
            authzid, authcid, password = decoded.split(b"\0")
        except Exception:
            raise BadCommand("Invalid SASL PLAIN response")
        authcid = authcid.decode("utf-8", "surrogateescape")
        if authzid and authzid.decode("utf-8", "surrogateescape") != authcid:
            raise NoCommand("[AUTHORIZATIONFAILED] No proxy authorization")
        return self._login(authcid, password.decode("utf-8", "surrogateescape"))

    # ------------------------------------------------------------ authenticated
    async def cmd_enable(self, tag, args, uid):
        if not self.opts.get("qresync"):
            raise BadCommand("ENABLE is not offered (--qresync)")
        names = [str(a).upper() for a in args]
        if "QRESYNC" in names:
            self.qresync = True
            self.send("* ENABLED CONDSTORE QRESYNC")
        elif "CONDSTORE" in names:
            self.send("* ENABLED CONDSTORE")
        return "OK ENABLE completed"

    async def cmd_select(self, tag, args, uid, read_only=False):
        # SELECT box (CONDSTORE) is accepted where ENABLE is offered (no MODSEQs kept)
        if len(args) == 2 and self.opts.get("qresync") and isinstance(args[1], list):
            args = args[:1]
        if len(args) != 1:
            raise BadCommand("SELECT takes one mailbox name")
        name, mb = self.mailbox_arg(args[0])
        if self.selected is not None:
            self.deselect()             # RFC 3501: even a failed SELECT deselects
        if mb is None:
            raise NoCommand("[NONEXISTENT] Mailbox does not exist")
        self.select(mb, read_only)
        self.send("* FLAGS " + fmt_flags(SYSTEM_FLAGS))
        if read_only:
            self.send("* OK [PERMANENTFLAGS ()] Read-only mailbox")
        else:
            self.send("* OK [PERMANENTFLAGS %s] Flags permitted" % fmt_flags(SYSTEM_FLAGS + ("\\*",)))
        self.send("* %d EXISTS" % len(self.uid_list))
        self.send("* 0 RECENT")
        unseen = [i for i, u in enumerate(self.uid_list, 1) if "\\Seen" not in mb.messages[u].flags]
        if unseen:
            self.send("* OK [UNSEEN %d] First unseen" % unseen[0])
        self.send("* OK [UIDVALIDITY %d] UIDs valid" % mb.uidvalidity)
        self.send("* OK [UIDNEXT %d] Predicted next UID" % mb.uidnext)
        return "OK [%s] %s completed" % ("READ-ONLY" if read_only else "READ-WRITE",
                                         "EXAMINE" if read_only else "SELECT")

    async def cmd_examine(self, tag, args, uid):
        return await self.cmd_select(tag, args, uid, read_only=True)

    async def cmd_create(self, tag, args, uid):
        if len(args) != 1:
            raise BadCommand("CREATE takes one mailbox name")
        name = astring(args[0], "mailbox name").rstrip(DELIMITER)
        if not name:
            raise BadCommand("empty mailbox name")
        if self.user.mailbox(name) is not None:
            raise NoCommand("[ALREADYEXISTS] Mailbox exists")
        self.user.mailboxes[name] = Mailbox(self.user, name)
        return "OK CREATE completed"

    def _list(self, args, verb):
        if len(args) != 2 or isinstance(args[0], list) or isinstance(args[1], list):
            raise BadCommand("%s takes a reference and a pattern" % verb)
        ref, pattern = astring(args[0]), astring(args[1])
        if pattern == "":
            self.send('* %s (\\Noselect) "%s" ""' % (verb, DELIMITER))
            return "OK %s completed" % verb
        full = ref + pattern
        rx = "".join(".*" if c == "*" else "[^%s]*" % re.escape(DELIMITER) if c == "%" else re.escape(c)
                     for c in full)
        names = list(self.user.mailboxes)
        for n in names:
            if re.fullmatch(rx, n) or (n == "INBOX" and re.fullmatch(rx, "INBOX", re.I)):
                has_children = any(o.startswith(n + DELIMITER) for o in names)
                attrs = "\\HasChildren" if has_children else "\\HasNoChildren"
                self.send(b"* " + verb.encode() + b" (" + attrs.encode() + b') "' + DELIMITER.encode()
                          + b'" ' + imap_string(n))
        return "OK %s completed" % verb

    async def cmd_list(self, tag, args, uid):
        return self._list(args, "LIST")

    async def cmd_lsub(self, tag, args, uid):
        return self._list(args, "LSUB")       # everything is subscribed

    async def cmd_subscribe(self, tag, args, uid):
        if len(args) != 1:
            raise BadCommand("SUBSCRIBE takes one mailbox name")
        return "OK SUBSCRIBE completed"

    async def cmd_unsubscribe(self, tag, args, uid):
        if len(args) != 1:
            raise BadCommand("UNSUBSCRIBE takes one mailbox name")
        return "OK UNSUBSCRIBE completed"

    async def cmd_namespace(self, tag, args, uid):
        self.send('* NAMESPACE (("" "%s")) NIL NIL' % DELIMITER)
        return "OK NAMESPACE completed"

    async def cmd_status(self, tag, args, uid):
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise BadCommand("STATUS takes a mailbox and a list of items")
        name, mb = self.mailbox_arg(args[0])
        if mb is None:
            raise NoCommand("[NONEXISTENT] Mailbox does not exist")
        out = []
        for item in args[1]:
            item = str(item).upper()
            if item == "MESSAGES":
                out.append("MESSAGES %d" % len(mb.messages))
            elif item == "RECENT":
                out.append("RECENT 0")
            elif item == "UIDNEXT":
                out.append("UIDNEXT %d" % mb.uidnext)
            elif item == "UIDVALIDITY":
                out.append("UIDVALIDITY %d" % mb.uidvalidity)
            elif item == "UNSEEN":
                out.append("UNSEEN %d" % sum(1 for m in mb.messages.values() if "\\Seen" not in m.flags))
            else:
                raise BadCommand("unknown STATUS item %s" % item)
        self.send(b"* STATUS " + imap_string(mb.name) + b" (" + " ".join(out).encode() + b")")
        return "OK STATUS completed"

    async def cmd_getquotaroot(self, tag, args, uid):
        if len(args) != 1:
            raise BadCommand("GETQUOTAROOT takes one mailbox name")
        name, mb = self.mailbox_arg(args[0])
        if mb is None:
            raise NoCommand("[NONEXISTENT] Mailbox does not exist")
        self.send(b"* QUOTAROOT " + imap_string(name) + b' ""')
        self.send('* QUOTA "" (STORAGE %d %d)' % (self.user.quota_used_kb(), self.opts["quota_kb"]))
        return "OK GETQUOTAROOT completed"

    async def cmd_getquota(self, tag, args, uid):
        if len(args) != 1:
            raise BadCommand("GETQUOTA takes one quota root")
        if astring(args[0]) != "":
            raise NoCommand("No such quota root")
        self.send('* QUOTA "" (STORAGE %d %d)' % (self.user.quota_used_kb(), self.opts["quota_kb"]))
        return "OK GETQUOTA completed"

    async def cmd_append(self, tag, args, uid):
        if not args:
            raise BadCommand("APPEND needs a mailbox")
        name, mb = self.mailbox_arg(args[0])
        rest = list(args[1:])
        flags, date = set(), None
        if rest and isinstance(rest[0], list):
            flags = {canonical_flag(astring(f)) for f in rest.pop(0)}
            flags.discard("\\Recent")
        if rest and isinstance(rest[0], QString):
            date = parse_internaldate(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], Literal):
            raise BadCommand("APPEND message must be one literal")
        if mb is None:
            raise NoCommand("[TRYCREATE] Mailbox does not exist")
        msg = mb.add(rest[0], flags, date)
        self.journal(mb, "EXISTS", msg.uid, msg.flags)
        self.announce_new(mb, [msg.uid])
        return "OK [APPENDUID %d %d] APPEND completed" % (mb.uidvalidity, msg.uid)

    async def cmd_idle(self, tag, args, uid):
        if args:
            raise BadCommand("IDLE takes no arguments")
        if self.selected is not None:
            self.emit_pending()
        self.send("+ idling")
        await self.flush()
        self.idling = True
        reader = asyncio.ensure_future(self.read_line())
        try:
            while True:
                waker = asyncio.ensure_future(self.wakeup.wait())
                done, _ = await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
                if waker not in done:
                    waker.cancel()
                self.wakeup.clear()
                if self.opts["idle_push"] and self.selected is not None and self.pending:
                    self.emit_pending()
                    await self.flush()
                if reader in done:
                    line = reader.result()    # raises ConnectionDone on EOF
                    self.log.write(self.id, "C:", line.decode("utf-8", "backslashreplace"))
                    if line.strip().upper() != b"DONE":
                        self.send("%s BAD Expected DONE" % tag)
                        return None
                    break
        finally:
            self.idling = False
            if not reader.done():
                reader.cancel()
        # Not in no_apply_after: dispatch() applies what the server held back.
        return "OK IDLE terminated"

    # ------------------------------------------------------------ selected
    async def cmd_check(self, tag, args, uid):
        return "OK CHECK completed"

    async def cmd_close(self, tag, args, uid):
        mb = self.selected
        if not self.read_only:
            # CLOSE expunges silently (no EXPUNGE responses), others are told.
            self.expunge_uids(mb, [u for u, m in mb.messages.items() if "\\Deleted" in m.flags], announce=False)
        self.deselect()
        return "OK CLOSE completed"

    async def cmd_unselect(self, tag, args, uid):
        self.deselect()
        return "OK UNSELECT completed"

    async def cmd_expunge(self, tag, args, uid):
        mb = self.selected
        if self.read_only:
            raise NoCommand("[READ-ONLY] Mailbox is read-only")
        if uid:
            if len(args) != 1:
                raise BadCommand("UID EXPUNGE takes a UID set")
            candidates = self.resolve(args[0], True)
        else:
            if args:
                raise BadCommand("EXPUNGE takes no arguments")
            # All \Deleted messages, also those this session cannot see.
            candidates = list(mb.messages)
        doomed = [u for u in candidates if u in mb.messages and "\\Deleted" in mb.messages[u].flags]
        self.expunge_uids(mb, doomed, announce=True)
        return "OK EXPUNGE completed"

    async def cmd_search(self, tag, args, uid):
        args = list(args)
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            if astring(args[1]).upper() not in ("US-ASCII", "UTF-8"):
                raise NoCommand("[BADCHARSET (US-ASCII UTF-8)] Unsupported charset")
            args = args[2:]
        if not args:
            raise BadCommand("SEARCH needs criteria")
        query = SearchQuery(args, self)
        mb = self.selected
        hits = []
        # The store, not the view: this is where UID SEARCH sees what FETCH cannot.
        for msg in mb.messages.values():
            seq = self.index_of(msg.uid)
            seq = None if seq is None else seq + 1
            if query.match(msg, seq):
                if uid:
                    hits.append(msg.uid)
                elif seq is not None:
                    hits.append(seq)
        self.send("* SEARCH" + "".join(" %d" % h for h in sorted(hits)))
        return "OK SEARCH completed"

    async def cmd_fetch(self, tag, args, uid):
        if len(args) != 2:
            raise BadCommand("FETCH takes a set and data items")
        items = parse_fetch_items(args[1])
        uids = self.resolve(args[0], uid)
        mb = self.selected
        if uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
        sets_seen = not self.read_only and any(
            (i.name == "BODY" and i.section is not None and not i.peek) or i.name in ("RFC822", "RFC822.TEXT")
            for i in items)
        if sets_seen and not any(i.name == "FLAGS" for i in items):
            items.append(FetchItem("FLAGS"))
        for u in uids:
            msg = mb.messages.get(u)
            if msg is None:
                continue            # expunged by another session, not yet told: no data
            if sets_seen and "\\Seen" not in msg.flags:
                msg.flags.add("\\Seen")
                self.journal(mb, "FLAGS", u, msg.flags)
            self.send(b"* %d FETCH (" % (self.index_of(u) + 1)
                      + b" ".join(fetch_item(msg, i) for i in items) + b")")
        return "OK FETCH completed"

    async def cmd_store(self, tag, args, uid):
        if len(args) < 3 or not isinstance(args[1], Atom):
            raise BadCommand("STORE takes a set, an action and flags")
        m = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", args[1].upper())
        if not m:
            raise BadCommand("invalid STORE action %s" % args[1])
        flag_toks = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
        if any(not isinstance(f, Atom) for f in flag_toks):
            raise BadCommand("flags must be atoms")
        flags = {canonical_flag(f) for f in flag_toks} - {"\\Recent"}
        if self.read_only:
            raise NoCommand("[READ-ONLY] Mailbox is read-only")
        mb = self.selected
        for u in self.resolve(args[0], uid):
            msg = mb.messages.get(u)
            if msg is None:
                continue
            before = set(msg.flags)
            if m.group(1) == "+":
                msg.flags |= flags
            elif m.group(1) == "-":
                msg.flags -= flags
            else:
                msg.flags = set(flags)
            if msg.flags != before:
                self.journal(mb, "FLAGS", u, msg.flags)
            if not m.group(2):
                self.send("* %d FETCH (%sFLAGS %s)" % (self.index_of(u) + 1, "UID %d " % u if uid else "",
                                                       fmt_flags(msg.flags)))
        return "OK STORE completed"

    def _copy(self, args, uid, verb):
        if len(args) != 2:
            raise BadCommand("%s takes a set and a mailbox" % verb)
        uids = [u for u in self.resolve(args[0], uid) if u in self.selected.messages]
        name, target = self.mailbox_arg(args[1])
        if target is None:
            raise NoCommand("[TRYCREATE] Mailbox does not exist")
        pairs = []
        for u in uids:
            src = self.selected.messages[u]
            new = target.add(src.raw, src.flags, src.internal_date)
            pairs.append((u, new.uid))
        return target, pairs

    async def cmd_copy(self, tag, args, uid):
        target, pairs = self._copy(args, uid, "COPY")
        if self.opts["copy_notifies"]:
            for _, new in pairs:
                self.journal(target, "EXISTS", new, target.messages[new].flags)
        self.announce_new(target, [new for _, new in pairs])
        if not pairs:
            return "OK No messages copied"
        return "OK [COPYUID %d %s %s] COPY completed" % (
            target.uidvalidity, fmt_set([p[0] for p in pairs]), fmt_set([p[1] for p in pairs]))

    async def cmd_move(self, tag, args, uid):
        if self.read_only:
            raise NoCommand("[READ-ONLY] Mailbox is read-only")
        if len(args) == 2 and self.user.mailbox(astring(args[1], "mailbox name")) is self.selected:
            raise NoCommand("[CANNOT] Source and destination are the same mailbox")
        target, pairs = self._copy(args, uid, "MOVE")
        if not pairs:
            return "OK No messages moved"
        for _, new in pairs:
            # MOVE always journals: WildDuck's #708 case is a MOVE.
            self.journal(target, "EXISTS", new, target.messages[new].flags)
        self.send("* OK [COPYUID %d %s %s] Moved" % (
            target.uidvalidity, fmt_set([p[0] for p in pairs]), fmt_set([p[1] for p in pairs])))
        self.expunge_uids(self.selected, [p[0] for p in pairs], announce=True)
        return "OK MOVE completed"


# ===================================================================== FETCH items

def parse_fetch_items(tok):
    raw = tok if isinstance(tok, list) else [tok]
    if isinstance(tok, Atom) and tok.upper() in FETCH_MACROS:
        raw = [Atom(x) for x in FETCH_MACROS[tok.upper()]]
    if not raw:
        raise BadCommand("empty FETCH item list")
    items = []
    for t in raw:
        if not isinstance(t, Atom):
            raise BadCommand("invalid FETCH item")
        up = t.upper()
        if up in SIMPLE_FETCH:
            items.append(FetchItem(up))
            continue
        m = SECTION_RE.match(t)
        if not m:
            raise BadCommand("unsupported FETCH item %s" % t)
        items.append(parse_section(m))
    return items


def parse_section(m):
    spec = m.group(2)
    fields = ()
    if "(" in spec:
        spec, _, flist = spec.partition("(")
        if not flist.endswith(")"):
            raise BadCommand("invalid header list")
        fields = tuple(f.strip('"') for f in flist[:-1].split())
        if not fields:
            raise BadCommand("empty header list")
    spec = spec.strip().upper()
    path = []
    rest = spec.split(".") if spec else []
    while rest and rest[0].isdigit():
        path.append(int(rest.pop(0)))
    part = ".".join(rest)
    if part not in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
        raise BadCommand("unsupported section %s" % spec)
    if (part in ("HEADER.FIELDS", "HEADER.FIELDS.NOT")) != bool(fields):
        raise BadCommand("header list must go with HEADER.FIELDS")
    if part == "MIME" and not path:
        raise BadCommand("MIME needs a part number")
    partial = (int(m.group(3)), int(m.group(4))) if m.group(3) is not None else None
    section = spec + (" (" + " ".join(f.upper() for f in fields) + ")" if fields else "")
    return FetchItem("BODY", section=section, path=tuple(path), part=part, fields=fields,
                     partial=partial, peek=m.group(1).upper() == "BODY.PEEK")


def find_part(mime, path):
    for n in path:
        if mime.ctype[0] == "MULTIPART" and mime.subparts:
            if n > len(mime.subparts):
                return None
            mime = mime.subparts[n - 1]
        elif mime.ctype == ("MESSAGE", "RFC822"):
            inner = MimePart(mime.body)
            mime = inner.subparts[n - 1] if inner.subparts and n <= len(inner.subparts) else inner if n == 1 else None
            if mime is None:
                return None
        elif n != 1:
            return None
    return mime


def section_bytes(msg, item):
    part = find_part(msg.mime, item.path)
    if part is None:
        return b""
    if item.part == "":
        return msg.raw if not item.path else part.body
    if item.part == "MIME":
        return part.header
    target = part
    if item.path:
        # HEADER/TEXT of a part refer to the message inside a message/rfc822 part.
        if part.ctype != ("MESSAGE", "RFC822"):
            return b""
        target = MimePart(part.body)
    if item.part == "HEADER":
        return target.header
    if item.part == "TEXT":
        return target.body
    return target.header_fields(item.fields, item.part.endswith(".NOT"))


def fetch_item(msg, item):
    n = item.name
    if n == "UID":
        return b"UID %d" % msg.uid
    if n == "FLAGS":
        return b"FLAGS " + fmt_flags(msg.flags).encode()
    if n == "INTERNALDATE":
        return b'INTERNALDATE "' + fmt_internaldate(msg.internal_date).encode() + b'"'
    if n == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % len(msg.raw)
    if n == "ENVELOPE":
        return b"ENVELOPE " + envelope(msg.mime)
    if n in ("BODYSTRUCTURE",) or (n == "BODY" and item.section is None):
        return n.encode() + b" " + bodystructure(msg.mime)
    if n == "RFC822":
        return b"RFC822 " + literal(msg.raw)
    if n == "RFC822.HEADER":
        return b"RFC822.HEADER " + literal(msg.mime.header)
    if n == "RFC822.TEXT":
        return b"RFC822.TEXT " + literal(msg.mime.body)
    data = section_bytes(msg, item)
    name = b"BODY[" + item.section.encode() + b"]"
    if item.partial:
        start, length = item.partial
        data = data[start:start + length]
        name += b"<%d>" % start
    return name + b" " + literal(data)


# ===================================================================== SEARCH

class SearchQuery:
    """SEARCH criteria -> a predicate over (message, sequence number or None).
    Evaluated against the store: seq is None for messages outside the view."""

    FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True),
                 "DRAFT": ("\\Draft", True), "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True),
                 "UNANSWERED": ("\\Answered", False), "UNDELETED": ("\\Deleted", False),
                 "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False),
                 "UNSEEN": ("\\Seen", False)}
    HEADER_KEYS = ("FROM", "TO", "CC", "BCC", "SUBJECT")

    def __init__(self, tokens, session):
        self.session = session
        self.store_uids = session.selected.uids()
        self.pos = 0
        self.tokens = tokens
        self.tree = ("and", self._all(tokens))

    def _all(self, tokens):
        saved = (self.tokens, self.pos)
        self.tokens, self.pos = tokens, 0
        nodes = []
        while self.pos < len(self.tokens):
            nodes.append(self._key())
        self.tokens, self.pos = saved
        return nodes

    def _next(self, what="search key"):
        if self.pos >= len(self.tokens):
            raise BadCommand("missing %s" % what)
        t = self.tokens[self.pos]
        self.pos += 1
        return t

    def _key(self):
        t = self._next()
        if isinstance(t, list):
            return ("and", self._all(t))
        if not isinstance(t, Atom):
            raise BadCommand("invalid search key")
        k = t.upper()
        if k == "ALL":
            return ("all",)
        if k in ("NEW", "RECENT"):
            return ("none",)             # nothing is ever \Recent here
        if k == "OLD":
            return ("all",)
        if k in self.FLAG_KEYS:
            return ("flag",) + self.FLAG_KEYS[k]
        if k in ("KEYWORD", "UNKEYWORD"):
            return ("flag", astring(self._next("keyword")), k == "KEYWORD")
        if k == "NOT":
            return ("not", self._key())
        if k == "OR":
            return ("or", self._key(), self._key())
        if k in ("LARGER", "SMALLER"):
            v = astring(self._next("size"))
            if not v.isdigit():
                raise BadCommand("invalid size")
            return (k.lower(), int(v))
        if k in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
            return ("date", k, parse_search_date(astring(self._next("date"))))
        if k in self.HEADER_KEYS:
            return ("header", k, astring(self._next("string")))
        if k == "HEADER":
            name = astring(self._next("header name"))
            return ("header", name, astring(self._next("string")))
        if k in ("BODY", "TEXT"):
            return (k.lower(), astring(self._next("string")))
        if k == "UID":
            # '*' is the largest UID in the mailbox: the store, like the search.
            return ("uids", set(resolve_uids(parse_sequence_set(self._next("UID set")), self.store_uids)))
        if t[:1].isdigit() or t[:1] == "*":
            ranges = parse_sequence_set(t)
            return ("seqs", set(resolve_seqs(ranges, len(self.session.uid_list))))
        raise BadCommand("unsupported search key %s" % t)

    def match(self, msg, seq):
        return self._eval(self.tree, msg, seq)

    def _eval(self, node, msg, seq):
        op = node[0]
        if op == "and":
            return all(self._eval(n, msg, seq) for n in node[1])
        if op == "all":
            return True
        if op == "none":
            return False
        if op == "not":
            return not self._eval(node[1], msg, seq)
        if op == "or":
            return self._eval(node[1], msg, seq) or self._eval(node[2], msg, seq)
        if op == "flag":
            present = any(f.lower() == node[1].lower() for f in msg.flags)
            return present == node[2]
        if op == "larger":
            return len(msg.raw) > node[1]
        if op == "smaller":
            return len(msg.raw) < node[1]
        if op == "uids":
            return msg.uid in node[1]
        if op == "seqs":
            return seq is not None and seq in node[1]
        if op == "date":
            if node[1].startswith("SENT"):
                try:
                    d = email.utils.parsedate_to_datetime(msg.mime.headers.get("Date", "")).date()
                except (TypeError, ValueError):
                    return False
            else:
                d = msg.internal_date.date()
            kind = node[1].replace("SENT", "")
            return d < node[2] if kind == "BEFORE" else d == node[2] if kind == "ON" else d >= node[2]
        if op == "header":
            vals = msg.mime.headers.get_all(node[1]) or []
            needle = node[2].lower()
            return any(needle in str(v).lower() for v in vals)
        if op == "body":
            return node[1].lower().encode("utf-8", "surrogateescape") in msg.mime.body.lower()
        if op == "text":
            return node[1].lower().encode("utf-8", "surrogateescape") in msg.raw.lower()
        raise AssertionError(op)


# ===================================================================== server

def make_options(users=None, debounce_ms=100, idle_push=True, copy_notifies=True,
                 drop_notifications=0, no_apply_after=DEFAULT_NO_APPLY, log=None,
                 quota_kb=QUOTA_LIMIT_KB, qresync=False):
    if isinstance(no_apply_after, str):
        no_apply_after = [x for x in no_apply_after.split(",")]
    return {
        "users": dict(users) if users else dict(DEFAULT_USERS),
        "debounce_ms": int(debounce_ms),
        "idle_push": bool(idle_push),
        "copy_notifies": bool(copy_notifies),
        "drop_notifications": int(drop_notifications),
        "no_apply_after": frozenset(x.strip().upper().replace("UID ", "") for x in no_apply_after if x.strip()),
        "log": log,
        "quota_kb": int(quota_kb),
        "qresync": bool(qresync),
    }


class StaleServer:
    """The fixture. start() runs it in a background thread (for tests in the
    same process) and returns the port; stop() ends it and every connection.
    serve_forever() runs it in the calling thread (the CLI)."""

    def __init__(self, host=HOST, port=0, **options):
        self.host = host
        self.port = port
        self.opts = make_options(**options)
        self.log = ProtocolLog(self.opts["log"])
        self.opts["logger"] = self.log
        self.loop = None
        self.store = None
        self._server = None
        self._tasks = set()
        self._sessions = set()
        self._thread = None
        self._stopped = None

    async def _client(self, reader, writer):
        s = Session(self, reader, writer)
        self._sessions.add(s)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await s.run()
        except asyncio.CancelledError:
            pass                    # stop(): end quietly, the connection is closed
        finally:
            self._sessions.discard(s)
            self._tasks.discard(task)

    async def _start(self):
        self.loop = asyncio.get_running_loop()
        self.store = Store(self.opts, self.loop)
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.event("listening on %s:%d options %s" % (
            self.host, self.port, {k: v for k, v in self.opts.items() if k not in ("users", "logger")}))

    async def _shutdown(self):
        self._server.close()
        # Closing the transports ends each session's read with EOF; cancel
        # only what does not end by itself.
        for s in list(self._sessions):
            try:
                s.writer.close()
            except Exception:
                pass
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._server.wait_closed()
        self.log.close()

    async def _main(self, ready):
        await self._start()
        ready()
        await self._stopped.wait()
        await self._shutdown()

    # ------------------------------------------------------------ thread API
    def start(self):
        """Start in a daemon thread; returns the listening port."""
        started = threading.Event()
        failure = []

        def runner():
            try:
                asyncio.run(self._main(started.set))
            except BaseException as e:
                failure.append(e)
                started.set()

        self._thread = threading.Thread(target=runner, name="stale-imapd", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        if not started.is_set():
            raise RuntimeError("stale-imapd did not start")
        return self.port

    def stop(self):
        if self.loop is not None and self._stopped is not None and self._thread is not None:
            try:
                self.loop.call_soon_threadsafe(self._stopped.set)
            except RuntimeError:
                pass                    # loop already closed
            self._thread.join(10)

    def call(self, fn, *args):
        """Run fn(*args) in the server's loop thread and return its result
        (the store is not thread-safe). Not from inside the loop thread."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["r"] = fn(*args)
            except BaseException as e:
                box["e"] = e
            done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise RuntimeError("stale-imapd loop did not answer")
        if "e" in box:
            raise box["e"]
        return box["r"]

    def deliver(self, user, mailbox, raw, flags=()):
        """An external delivery (LMTP-like): journaled and notified to every
        session with the mailbox selected, debounced like any change."""
        def run():
            mb = self.store.users[user].mailbox(mailbox)
            msg = mb.add(raw, flags)
            mb.record("EXISTS", msg.uid, msg.flags, None)
            self.store.notify(mb)
            return msg.uid
        return self.call(run)

    def mailbox_uids(self, user, mailbox):
        return self.call(lambda: self.store.users[user].mailbox(mailbox).uids())

    # ------------------------------------------------------------ CLI
    def serve_forever(self, announce=True):
        async def main():
            loop = asyncio.get_running_loop()

            def ready():
                if announce:
                    print("STALE_PORT=%d" % self.port, flush=True)
                    print("READY=1", flush=True)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._stopped.set)
            await self._main(ready)
        asyncio.run(main())


def start_background(host=HOST, port=0, **options):
    """Start a StaleServer in a background thread: returns (port, stop)."""
    srv = StaleServer(host=host, port=port, **options)
    return srv.start(), srv.stop


def yes_no(v):
    v = v.lower()
    if v in ("yes", "y", "true", "1", "on"):
        return True
    if v in ("no", "n", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError("expected yes or no, got %r" % v)


def user_pass(v):
    if ":" not in v:
        raise argparse.ArgumentTypeError("expected NAME:PASS")
    return tuple(v.split(":", 1))


def main(argv=None):
    p = argparse.ArgumentParser(description="A deliberately stale IMAP server (WildDuck-like session model).")
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--user", action="append", type=user_pass, default=[], metavar="NAME:PASS",
                   help="repeatable; default alice, bob, carol as in servers.py")
    p.add_argument("--debounce-ms", type=int, default=100)
    p.add_argument("--idle-push", type=yes_no, default=True, metavar="yes|no")
    p.add_argument("--copy-notifies", type=yes_no, default=True, metavar="yes|no")
    p.add_argument("--drop-notifications", type=int, default=0, metavar="N")
    p.add_argument("--no-apply-after", default=",".join(DEFAULT_NO_APPLY), metavar="LIST",
                   help="commands after which queued changes are NOT emitted (default %(default)s)")
    p.add_argument("--quota-kb", type=int, default=QUOTA_LIMIT_KB)
    p.add_argument("--qresync", type=yes_no, default=False, metavar="yes|no",
                   help="offer ENABLE CONDSTORE QRESYNC (expunges as VANISHED once enabled)")
    p.add_argument("--log", help="protocol log file (passwords redacted)")
    a = p.parse_args(argv)
    srv = StaleServer(host=a.host, port=a.port, users=dict(a.user) or None, debounce_ms=a.debounce_ms,
                      idle_push=a.idle_push, copy_notifies=a.copy_notifies,
                      drop_notifications=a.drop_notifications, no_apply_after=a.no_apply_after,
                      log=a.log, quota_kb=a.quota_kb, qresync=a.qresync)
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
