#!/usr/bin/env python3
"""Self-test of the stale upstream fixture (stale_imapd.py) and of the
response checker (imapcheck.py), without imapfresh.

It proves the fixture reproduces zone-eu/wildduck#708 directly: connection B
has Archive selected; connection A moves (or copies) a message into Archive;
B then sends what Thunderbird sends (NOOP, GETQUOTAROOT "Archive",
UID FETCH 1:* (FLAGS)) and does not see the message, while UID SEARCH ALL on
B lists it (the signature). Variants: the debounce window, COPY that never
notifies, --debounce-ms 0 (healthy), IDLE without push. Every byte each
client receives goes through imapcheck.Checker, and the fixture must never
violate the protocol: it is stale, not broken.

TAP output (`ok N - ...`, plan at the end), exit status 1 on any failure.
Waits are fixed multiples of the debounce interval and socket deadlines;
nothing asserts that something is fast.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import imapcheck  # noqa: E402
import stale_imapd  # noqa: E402
from stale_imapd import CommandTokenizer, StaleServer  # noqa: E402

HOST = "127.0.0.1"
DEADLINE = 10.0                 # socket deadline for any expected response
DEBOUNCE = 0.1                  # the fixture's default --debounce-ms, in seconds
SETTLE = DEBOUNCE * 3           # "the debounce interval has passed"
USER, PASSWORD = "alice", "alice-pw"
LIT_END = re.compile(rb"\{(\d+)\}\r\n$")

LOGDIR = tempfile.mkdtemp(prefix="stale-selftest-")
ALL_CHECKERS = []               # (label, Checker) of every client of every test


def message(i):
    return (b"From: Ann Example <ann@example.com>\r\n"
            b"To: alice@example.com\r\n"
            b"Subject: test message %d\r\n"
            b"Message-ID: <%d@stale-selftest>\r\n"
            b"\r\n"
            b"body of message %d\r\n" % (i, i, i))


class Fail(AssertionError):
    pass


class TooSlow(Exception):
    """The machine did not get B's commands in before the debounce fired:
    the precondition of a stale-window test, not a failure of the fixture."""


def check(cond, what):
    if not cond:
        raise Fail(what)


# ===================================================================== client

class Reply:
    def __init__(self, tagged, untagged):
        self.tagged = tagged
        self.untagged = untagged        # whole responses, literals inlined

    @property
    def status(self):
        parts = self.tagged.split(b" ", 2)
        return parts[1].decode() if len(parts) > 1 else ""

    def exists(self):
        return [int(m.group(1)) for l in self.untagged for m in [re.match(rb"\* (\d+) EXISTS\r\n$", l)] if m]

    def expunged(self):
        return [int(m.group(1)) for l in self.untagged for m in [re.match(rb"\* (\d+) EXPUNGE\r\n$", l)] if m]

    def fetch_uids(self):
        return [int(m.group(1)) for l in self.untagged
                for m in [re.match(rb"\* \d+ FETCH \(.*?\bUID (\d+)", l, re.S)] if m]

    def fetches(self):
        return [l for l in self.untagged if re.match(rb"\* \d+ FETCH ", l)]

    def search(self):
        for l in self.untagged:
            if l.startswith(b"* SEARCH"):
                return [int(x) for x in l[8:].split()]
        return None

    def __repr__(self):
        return "Reply(%r, %r)" % (self.tagged, self.untagged)


class Client:
    """A raw IMAP client: sends exactly what it is told, reads responses and
    literals by length, and feeds every byte both ways to a Checker."""

    def __init__(self, port, name):
        self.name = name
        self.sock = socket.create_connection((HOST, port), timeout=DEADLINE)
        self.buf = b""
        self.n = 0
        self.check = imapcheck.Checker()
        ALL_CHECKERS.append(("%s (%s)" % (name, CURRENT[0]), self.check))
        self.greeting, _ = self.read_response()

    def send(self, data):
        self.check.sent(data)           # before the server can answer it
        self.sock.sendall(data)

    def _fill(self, timeout=DEADLINE):
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise Fail("%s: no response within %.0fs (have %r)" % (self.name, timeout, self.buf[-200:]))
        if not chunk:
            raise EOFError("%s: connection closed" % self.name)
        self.check.received(chunk)
        self.buf += chunk

    def readline(self):
        while b"\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self):
        line = self.readline()
        parts, lits = [line], []
        while True:
            m = LIT_END.search(line)
            if not m:
                return b"".join(parts), lits
            lit = self.read_exact(int(m.group(1)))
            lits.append(lit)
            line = self.readline()
            parts += [lit, line]

    def next_tag(self):
        self.n += 1
        return "%s%d" % (self.name, self.n)

    def begin(self, text):
        tag = self.next_tag()
        self.send(tag.encode() + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
        return tag

    def wait(self, tag):
        untagged = []
        while True:
            resp, _ = self.read_response()
            if resp.startswith(tag.encode() + b" "):
                return Reply(resp, untagged)
            untagged.append(resp)

    def cmd(self, text, expect="OK"):
        r = self.wait(self.begin(text))
        if expect and r.status != expect:
            raise Fail("%s: %r: expected %s, got %r" % (self.name, text, expect, r.tagged))
        return r

    def continuation(self):
        """Read up to a '+' line; returns the untagged responses before it."""
        seen = []
        while True:
            resp, _ = self.read_response()
            if resp.startswith(b"+"):
                return seen
            seen.append(resp)

    def quiet(self, seconds):
        """Listen for `seconds`; return whatever arrived (it stays buffered)."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return self.buf
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return self.buf
            if not chunk:
                raise EOFError("%s: connection closed" % self.name)
            self.check.received(chunk)
            self.buf += chunk

    def append(self, mailbox, data, flags="", sync=False):
        """APPEND with a non-synchronizing literal (LITERAL+), or a
        synchronizing one (wait for '+')."""
        tag = self.next_tag()
        head = "%s APPEND %s %s{%d%s}\r\n" % (tag, mailbox, flags + " " if flags else "", len(data),
                                              "" if sync else "+")
        self.send(head.encode())
        if sync:
            self.continuation()
        self.send(data + b"\r\n")
        r = self.wait(tag)
        check(r.status == "OK", "%s: APPEND failed: %r" % (self.name, r.tagged))
        return r

    def login(self, user=USER, password=PASSWORD):
        return self.cmd('LOGIN %s "%s"' % (user, password.replace("\\", "\\\\").replace('"', '\\"')))

    def logout(self):
        r = self.cmd("LOGOUT")
        check(any(l.startswith(b"* BYE") for l in r.untagged), "LOGOUT without BYE")
        self.close()
        return r

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.check.finish()

    def assert_clean(self):
        check(not self.check.errors, "checker on %s: %s" % (self.name, "; ".join(self.check.errors)))


# ===================================================================== TAP

TESTS = []
CURRENT = ["-"]


def test(name):
    def deco(fn):
        TESTS.append((name, fn))
        return fn
    return deco


class Fixture:
    """One stale-imapd for a test, with its own protocol log; closes clients
    and checks their streams on exit."""

    def __init__(self, **opts):
        self.label = re.sub(r"\W+", "-", CURRENT[0]).strip("-")[:60]
        self.log = os.path.join(LOGDIR, "%s.log" % self.label)
        self.srv = StaleServer(log=self.log, **opts)
        self.clients = []

    def __enter__(self):
        self.port = self.srv.start()
        return self

    def client(self, name, login=True, select=None):
        c = Client(self.port, name)
        self.clients.append(c)
        if login:
            c.login()
        if select:
            c.cmd("SELECT %s" % select)
        return c

    def __exit__(self, exc_type, *a):
        for c in self.clients:
            c.close()
        self.srv.stop()
        if exc_type is None:
            for c in self.clients:
                c.assert_clean()


def stale_setup(fx):
    """B selects Archive (empty), A selects INBOX and appends 3 messages.
    Returns (A, B)."""
    b = fx.client("B", select="Archive")
    a = fx.client("A", select="INBOX")
    for i in (1, 2, 3):
        r = a.append("INBOX", message(i))
        check(r.exists() == [i], "A's own APPEND must announce EXISTS %d: %r" % (i, r))
    check(a.cmd("UID FETCH 1:* (UID)").fetch_uids() == [1, 2, 3], "A sees UIDs 1..3")
    return a, b


def run():
    n = failed = 0
    for name, fn in TESTS:
        n += 1
        CURRENT[0] = name
        try:
            fn()
            print("ok %d - %s" % (n, name))
        except SkipTest as e:
            print("ok %d - %s # SKIP %s" % (n, name, e))
        except Exception as e:
            failed += 1
            print("not ok %d - %s" % (n, name))
            for line in ("%s: %s" % (type(e).__name__, e)).splitlines():
                print("# " + line)
            for line in traceback.format_exc().rstrip().splitlines()[-8:]:
                print("# " + line)
        sys.stdout.flush()
    print("1..%d" % n)
    if failed:
        print("# %d of %d failed; fixture protocol logs in %s" % (failed, n, LOGDIR))
    else:
        shutil.rmtree(LOGDIR, ignore_errors=True)
    return 1 if failed else 0


class SkipTest(Exception):
    pass


# ===================================================================== tokenizer

@test("tokenizer: atoms with sections, quoted strings, lists, literals")
def t_tokenizer():
    t = CommandTokenizer()
    check(t.feed_line(b'a1 UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (From To)]<0.100> FLAGS)') is None,
          "no literal expected")
    check(t.error is None, t.error)
    check(t.tokens == ["a1", "UID", "FETCH", "1:*", ["UID", "BODY.PEEK[HEADER.FIELDS (From To)]<0.100>", "FLAGS"]],
          "tokens: %r" % t.tokens)
    t = CommandTokenizer()
    check(t.feed_line(b'a2 LOGIN "se cr\\"et" {3}') == (3, True), "sync literal announced")
    t.feed_literal(b"x y")
    check(t.feed_line(b' (\\Seen "a b") {2+}') == (2, False), "non-sync literal announced")
    t.feed_literal(b"\r\n")
    check(t.feed_line(b"") is None and t.error is None, "complete: %r" % t.error)
    check(t.tokens == ["a2", "LOGIN", 'se cr"et', b"x y", ["\\Seen", "a b"], b"\r\n"], "tokens: %r" % t.tokens)
    check(isinstance(t.tokens[3], stale_imapd.Literal) and isinstance(t.tokens[2], stale_imapd.QString),
          "token types")
    for bad in (b'a3 LOGIN "open', b"a4 FETCH 1 (FLAGS", b"a5 FETCH 1 FLAGS)", b"a6 X {3} y",
                b"a7 FETCH 1 BODY[HEADER"):
        t = CommandTokenizer()
        t.feed_line(bad)
        check(t.error, "should not parse: %r" % bad)
    t = CommandTokenizer()
    check(t.feed_line(b'a8 LOGIN "open {4+}') == (4, False) and t.error,
          "a bad line still reports its trailing literal, so it can be skipped")


# ===================================================================== fixture basics

@test("fixture: greeting, CAPABILITY, LOGIN (atom, quoted, sync and non-sync literals), state errors")
def t_login():
    with Fixture() as fx:
        c = fx.client("L", login=False)
        check(re.match(rb"\* OK \[CAPABILITY IMAP4rev1 LITERAL\+ UIDPLUS MOVE IDLE QUOTA NAMESPACE UNSELECT"
                       rb"[^\]]*\] stale-imapd ready\r\n$", c.greeting), "greeting %r" % c.greeting)
        caps = c.cmd("CAPABILITY").untagged[0].split()
        for cap in (b"IMAP4rev1", b"LITERAL+", b"UIDPLUS", b"MOVE", b"IDLE", b"QUOTA", b"NAMESPACE", b"UNSELECT"):
            check(cap in caps, "capability %s" % cap)
        c.cmd("SELECT INBOX", expect="BAD")
        c.cmd("LOGIN alice wrong", expect="NO")
        c.cmd("FROBNICATE", expect="BAD")
        c.cmd("LOGIN alice alice-pw")
        c.cmd("LOGIN alice alice-pw", expect="BAD")
        c.logout()

        c = fx.client("Q", login=False)
        c.login("carol", 'se cr"et')                 # quoted, with an escaped quote
        c.close()

        c = fx.client("S", login=False)              # synchronizing literals
        tag = c.next_tag()
        c.send(b"%s LOGIN {5}\r\n" % tag.encode())
        c.continuation()
        c.send(b"carol {8}\r\n")
        c.continuation()
        c.send(b'se cr"et\r\n')
        check(c.wait(tag).status == "OK", "LOGIN with sync literals")
        c.close()

        c = fx.client("N", login=False)              # LITERAL+ in one write
        r = c.cmd('LOGIN {5+}\r\nalice {8+}\r\nalice-pw')
        check(b"[CAPABILITY" in r.tagged and b"AUTH=PLAIN" not in r.tagged, "post-login capabilities %r" % r.tagged)
        c.close()


@test("fixture: AUTHENTICATE PLAIN with SASL-IR, with a continuation, cancelled")
def t_authenticate():
    import base64
    with Fixture() as fx:
        c = fx.client("P", login=False)
        ir = base64.b64encode(b"\0bob\0bob-pw").decode()
        c.cmd("AUTHENTICATE PLAIN " + ir)
        c.cmd("SELECT INBOX")
        c = fx.client("C", login=False)
        tag = c.begin("AUTHENTICATE PLAIN")
        c.continuation()
        c.send(base64.b64encode(b"\0bob\0bob-pw") + b"\r\n")
        check(c.wait(tag).status == "OK", "AUTHENTICATE with continuation")
        c = fx.client("X", login=False)
        tag = c.begin("AUTHENTICATE PLAIN")
        c.continuation()
        c.send(b"*\r\n")
        check(c.wait(tag).status == "BAD", "cancelled AUTHENTICATE is BAD")
        c.cmd("AUTHENTICATE PLAIN " + base64.b64encode(b"\0bob\0nope").decode(), expect="NO")


@test("fixture: APPEND/FETCH/STORE/SEARCH/COPY/STATUS/LIST/CREATE/QUOTA/EXPUNGE/CLOSE round trip")
def t_roundtrip():
    with Fixture() as fx:
        a = fx.client("A", select="INBOX")
        raw = message(1)
        r = a.append("INBOX", raw, flags="(\\Flagged) \"05-Mar-2024 10:11:12 +0100\"", sync=True)
        m = re.search(rb"\[APPENDUID (\d+) 1\]", r.tagged)
        check(m, "APPENDUID: %r" % r.tagged)
        uidvalidity = int(m.group(1))
        a.append("INBOX", message(2))
        r = a.cmd("FETCH 1 (UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[])")
        check(r.untagged[0].startswith(b"* 1 FETCH (UID 1 FLAGS (\\Flagged) RFC822.SIZE %d "
                                       b"INTERNALDATE \"05-Mar-2024 10:11:12 +0100\" BODY[] {%d}\r\n"
                                       % (len(raw), len(raw))) and raw in r.untagged[0],
              "FETCH 1: %r" % r.untagged)
        r = a.cmd("UID FETCH 2 (BODY.PEEK[HEADER.FIELDS (Subject)])")
        check(b"BODY[HEADER.FIELDS (SUBJECT)] {27}\r\nSubject: test message 2\r\n\r\n" in r.untagged[0],
              "HEADER.FIELDS: %r" % r.untagged)
        check(a.cmd("UID FETCH 99:* (FLAGS)").fetch_uids() == [2], "n:* above the top still gives the top")
        check(a.cmd("UID FETCH 7 (FLAGS)").fetches() == [], "unknown UID: no data")
        a.cmd("FETCH 3 (FLAGS)", expect="BAD")
        r = a.cmd("FETCH 2 (BODY[TEXT])")
        check(b"FLAGS (\\Seen)" in r.untagged[0], "non-peek BODY sets \\Seen and says so: %r" % r.untagged)
        r = a.cmd("STORE 1 +FLAGS (\\Deleted)")
        check(r.untagged == [b"* 1 FETCH (FLAGS (\\Flagged \\Deleted))\r\n"], "STORE: %r" % r.untagged)
        check(a.cmd("UID STORE 1 -FLAGS.SILENT (\\Flagged)").untagged == [], ".SILENT")
        check(a.cmd("SEARCH DELETED").search() == [1], "SEARCH DELETED")
        check(a.cmd("UID SEARCH OR SUBJECT \"message 2\" UID 1").search() == [1, 2], "SEARCH OR")
        check(a.cmd("SEARCH NOT SEEN").search() == [1], "SEARCH NOT SEEN")
        r = a.cmd("CREATE Work/Sub")
        r = a.cmd("COPY 1:2 Work/Sub")
        check(re.search(rb"\[COPYUID \d+ 1:2 1:2\]", r.tagged), "COPYUID: %r" % r.tagged)
        a.cmd("COPY 1 Nowhere", expect="NO")
        r = a.cmd('STATUS "Work/Sub" (MESSAGES UIDNEXT UIDVALIDITY UNSEEN)')
        check(re.match(rb'\* STATUS "Work/Sub" \(MESSAGES 2 UIDNEXT 3 UIDVALIDITY \d+ UNSEEN 1\)', r.untagged[0]),
              "STATUS: %r" % r.untagged)
        names = [l.rsplit(b" ", 1)[1].strip() for l in a.cmd('LIST "" "*"').untagged]
        check(names == [b'"INBOX"', b'"Archive"', b'"Trash"', b'"Work/Sub"'], "LIST: %r" % names)
        r = a.cmd('GETQUOTAROOT "INBOX"')
        check(r.untagged[0] == b'* QUOTAROOT "INBOX" ""\r\n'
              and re.match(rb'\* QUOTA "" \(STORAGE \d+ \d+\)\r\n$', r.untagged[1]), "QUOTA: %r" % r.untagged)
        r = a.cmd("EXPUNGE")
        check(r.expunged() == [1], "EXPUNGE: %r" % r.untagged)
        a.cmd("STORE 1 +FLAGS (\\Deleted)")
        check(a.cmd("CLOSE").untagged == [], "CLOSE expunges silently")
        a.cmd("FETCH 1 (FLAGS)", expect="BAD")
        r = a.cmd("SELECT INBOX")
        check(r.exists() == [0] and b"[UIDVALIDITY %d]" % uidvalidity in b"".join(r.untagged)
              and b"[UIDNEXT 3]" in b"".join(r.untagged) and b"[READ-WRITE]" in r.tagged, "SELECT: %r" % r)
        a.cmd("UNSELECT")
        a.logout()


# ===================================================================== the bug, directly

def debounce_window_attempt():
    with Fixture() as fx:                       # default options
        a, b = stale_setup(fx)
        started = time.monotonic()
        r = a.cmd("UID MOVE 2 Archive")
        check(re.search(rb"^\* OK \[COPYUID \d+ 2 1\]", r.untagged[0]) and r.expunged() == [2],
              "A's own MOVE: COPYUID then EXPUNGE 2: %r" % r)
        # What Thunderbird sends on B, inside the debounce window.
        noop = b.cmd("NOOP")
        quota = b.cmd('GETQUOTAROOT "Archive"')
        fetch = b.cmd("UID FETCH 1:* (FLAGS)")
        search = b.cmd("UID SEARCH ALL")
        plain = b.cmd("SEARCH ALL")
        if time.monotonic() - started >= DEBOUNCE:
            raise TooSlow("B's commands took longer than the debounce window")
        check(noop.exists() == [] and noop.untagged == [], "NOOP must show nothing: %r" % noop)
        check(quota.exists() == [] and len(quota.untagged) == 2, "GETQUOTAROOT shows nothing new: %r" % quota)
        check(fetch.fetches() == [], "UID FETCH 1:* misses the moved message: %r" % fetch)
        check(search.search() == [1], "UID SEARCH ALL lists it (the signature): %r" % search)
        check(plain.search() == [], "plain SEARCH cannot number it: %r" % plain)
        check(fx.srv.mailbox_uids(USER, "Archive") == [1], "the store has it")
        # The window passes: the debounced notification arrives; NOOP shows it.
        time.sleep(SETTLE)
        fetch = b.cmd("UID FETCH 1:* (FLAGS)")
        check(fetch.fetches() == [] and fetch.exists() == [], "FETCH never emits the queue: %r" % fetch)
        noop = b.cmd("NOOP")
        check(noop.exists() == [1], "after the debounce NOOP announces it: %r" % noop)
        check(b.cmd("UID FETCH 1:* (FLAGS)").fetch_uids() == [1], "and UID FETCH returns it")
        check(b.check.count == 1 and b.check.uids == {1: 1}, "checker view of B: %r %r"
              % (b.check.count, b.check.uids))
        a.logout()
        b.logout()


@test("bug (a): inside the debounce window B's NOOP/GETQUOTAROOT/UID FETCH miss a moved message, UID SEARCH lists it")
def t_debounce_window():
    for attempt in range(3):
        try:
            debounce_window_attempt()
            return
        except TooSlow:
            continue
    raise SkipTest("machine too slow to get 5 commands in within %.0f ms (3 tries)" % (DEBOUNCE * 1000))


@test("bug (b): --copy-notifies no: after the debounce B's NOOP, GETQUOTAROOT, IDLE show nothing; SELECT does")
def t_copy_never_notifies():
    with Fixture(copy_notifies=False) as fx:
        a, b = stale_setup(fx)
        r = a.cmd("UID COPY 2 Archive")
        check(re.search(rb"\[COPYUID \d+ 2 1\]", r.tagged), "COPYUID: %r" % r.tagged)
        time.sleep(SETTLE)
        check(b.cmd("NOOP").untagged == [], "NOOP shows nothing")
        check(len(b.cmd('GETQUOTAROOT "Archive"').untagged) == 2, "GETQUOTAROOT shows nothing new")
        tag = b.begin("IDLE")
        check(b.continuation() == [], "nothing on IDLE entry")
        check(b.quiet(SETTLE) == b"", "nothing while idling")
        b.send(b"DONE\r\n")
        r = b.wait(tag)
        check(r.status == "OK" and r.untagged == [], "nothing at DONE: %r" % r)
        check(b.cmd("UID FETCH 1:* (FLAGS)").fetches() == [], "UID FETCH 1:* misses the copy")
        check(b.cmd("UID SEARCH ALL").search() == [1], "UID SEARCH ALL lists it")
        r = b.cmd("SELECT Archive")
        check(r.exists() == [1], "a new SELECT shows it: %r" % r)
        check(b.cmd("UID FETCH 1:* (FLAGS)").fetch_uids() == [1], "then UID FETCH returns it")
        a.logout()
        b.logout()


@test("bug (c): --debounce-ms 0: B's NOOP right after the MOVE announces it (the fixture is only stale by option)")
def t_no_debounce():
    with Fixture(debounce_ms=0) as fx:
        a, b = stale_setup(fx)
        a.cmd("UID MOVE 2 Archive")
        check(b.cmd("NOOP").exists() == [1], "NOOP announces the moved message")
        check(b.cmd("UID FETCH 1:* (FLAGS)").fetch_uids() == [1], "UID FETCH returns it")
        check(b.cmd("UID SEARCH ALL").search() == [1], "UID SEARCH agrees")
        a.logout()
        b.logout()


@test("bug (d): --idle-push no: an idling B hears nothing of a MOVE; DONE then applies it before the tagged OK")
def t_idle_no_push():
    with Fixture(idle_push=False) as fx:
        a, b = stale_setup(fx)
        tag = b.begin("IDLE")
        b.continuation()
        a.cmd("UID MOVE 2 Archive")
        check(b.quiet(SETTLE) == b"", "nothing pushed while idling")
        b.send(b"DONE\r\n")
        r = b.wait(tag)
        check(r.exists() == [1] and r.status == "OK", "DONE applies the queue: %r" % r)
        a.logout()
        b.logout()


@test("control: --idle-push yes (default): an idling B is told of the MOVE without ending IDLE")
def t_idle_push():
    with Fixture() as fx:
        a, b = stale_setup(fx)
        tag = b.begin("IDLE")
        b.continuation()
        a.cmd("UID MOVE 2 Archive")
        resp, _ = b.read_response()            # socket deadline, not a speed assertion
        check(resp == b"* 1 EXISTS\r\n", "pushed during IDLE: %r" % resp)
        b.send(b"DONE\r\n")
        check(b.wait(tag).untagged == [], "nothing left for DONE")
        a.logout()
        b.logout()


# ===================================================================== more of the model

@test("model: flag changes and EXPUNGE reach another session after the debounce, on NOOP")
def t_propagation():
    with Fixture() as fx:
        a, b = stale_setup(fx)
        b.cmd("SELECT INBOX")
        check(b.cmd("UID FETCH 1:* (FLAGS)").fetch_uids() == [1, 2, 3], "B sees 1..3")
        a.cmd("STORE 1 +FLAGS (\\Seen)")
        r = a.cmd("UID STORE 3 +FLAGS (\\Deleted)")
        check(r.untagged == [b"* 3 FETCH (UID 3 FLAGS (\\Deleted))\r\n"], "UID STORE reply: %r" % r.untagged)
        check(a.cmd("EXPUNGE").expunged() == [3], "A's own EXPUNGE")
        time.sleep(SETTLE)
        r = b.cmd("NOOP")
        check(r.untagged == [b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n", b"* 3 FETCH (UID 3 FLAGS (\\Deleted))\r\n",
                             b"* 3 EXPUNGE\r\n"], "B's NOOP: %r" % r.untagged)
        check(b.check.count == 2, "B's view has 2 messages")
        a.logout()
        b.logout()


@test("model: plain FETCH never emits EXPUNGE (RFC 3501 7.4.1) even with an empty --no-apply-after; UID FETCH does")
def t_no_expunge_during_fetch():
    with Fixture(no_apply_after="") as fx:
        a, b = stale_setup(fx)
        b.cmd("SELECT INBOX")
        a.cmd("STORE 2 +FLAGS.SILENT (\\Deleted)")
        a.cmd("EXPUNGE")
        a.append("INBOX", message(4))
        time.sleep(SETTLE)
        r = b.cmd("FETCH 1 (FLAGS)")
        # The flag change queued before the EXPUNGE may be told; the EXPUNGE
        # and the EXISTS queued behind it may not.
        check(r.fetches() == [b"* 1 FETCH (FLAGS ())\r\n", b"* 2 FETCH (UID 2 FLAGS (\\Deleted))\r\n"]
              and r.expunged() == [] and r.exists() == [],
              "no EXPUNGE during FETCH, nor what queues behind it: %r" % r.untagged)
        r = b.cmd("UID FETCH 1 (FLAGS)")
        check(r.expunged() == [2] and r.exists() == [3], "UID FETCH then applies the queue: %r" % r.untagged)
        a.logout()
        b.logout()


@test("model: --drop-notifications 2 loses the 2nd notification; the 3rd catches up from the journal")
def t_drop_notifications():
    with Fixture(drop_notifications=2) as fx:
        a, b = stale_setup(fx)
        a.cmd("UID MOVE 1 Archive")
        time.sleep(SETTLE)
        check(b.cmd("NOOP").exists() == [1], "1st notification delivered")
        a.cmd("UID MOVE 2 Archive")
        time.sleep(SETTLE)
        check(b.cmd("NOOP").untagged == [], "2nd notification lost")
        check(b.cmd("UID SEARCH ALL").search() == [1, 2], "UID SEARCH sees both")
        check(b.cmd("UID FETCH 1:* (UID)").fetch_uids() == [1], "UID FETCH only the first")
        a.cmd("UID MOVE 3 Archive")
        time.sleep(SETTLE)
        check(b.cmd("NOOP").exists() == [3], "3rd notification pulls both pending entries")
        a.logout()
        b.logout()


@test("model: an external delivery (StaleServer.deliver) is debounced like any change")
def t_deliver():
    with Fixture(debounce_ms=100) as fx:
        a, b = stale_setup(fx)
        uid = fx.srv.deliver(USER, "Archive", message(9))
        check(uid == 1, "delivered as UID 1")
        time.sleep(SETTLE)
        check(b.cmd("CHECK").exists() == [1], "CHECK applies the queue too")
        a.logout()
        b.logout()


@test("API: start_background(**options) returns (port, stop); stop() closes connected clients")
def t_start_background():
    port, stop = stale_imapd.start_background(users={"erin": "pw"}, debounce_ms=0)
    try:
        c = Client(port, "E")
        c.login("erin", "pw")
        c.cmd("SELECT INBOX")
    finally:
        stop()
    try:
        c.sock.settimeout(DEADLINE)
        check(c.sock.recv(100) == b"", "connection closed by stop()")
    except (ConnectionResetError, BrokenPipeError):
        pass
    c.close()
    check(not c.check.errors, "checker: %r" % c.check.errors)


@test("CLI: --port 0 prints STALE_PORT and READY=1, serves, logs with the password redacted, exits 0 on SIGTERM")
def t_cli():
    log = os.path.join(LOGDIR, "cli.log")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "stale_imapd.py"), "--port", "0",
                             "--user", "dave:Zq-s3cret-9", "--debounce-ms", "0", "--idle-push", "no",
                             "--copy-notifies", "no", "--drop-notifications", "0",
                             "--no-apply-after", "FETCH,STORE,APPEND", "--log", log],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = None
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("STALE_PORT="):
                port = int(line.split("=", 1)[1])
            if line.strip() == "READY=1":
                break
        check(port, "no STALE_PORT line")
        c = Client(port, "CLI")
        c.login("dave", "Zq-s3cret-9")
        c.cmd("SELECT INBOX")
        c.logout()
        proc.send_signal(signal.SIGTERM)
        check(proc.wait(DEADLINE) == 0, "exit status %s" % proc.returncode)
        text = open(log).read()
        check("LOGIN dave <redacted>" in text and "Zq-s3cret-9" not in text, "log redaction")
        check("SELECT INBOX" in text and "S: * BYE" in text, "log has both directions")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ===================================================================== checker

GOOD = [
    (None, b"* OK [CAPABILITY IMAP4rev1] ready\r\n"),
    (b"a1 LOGIN u p\r\n", b"a1 OK done\r\n"),
    (b"a2 SELECT INBOX\r\n", b"* FLAGS (\\Seen)\r\n* OK [PERMANENTFLAGS (\\Seen \\*)] ok\r\n* 3 EXISTS\r\n"
                             b"* 0 RECENT\r\n* OK [UIDVALIDITY 7] v\r\na2 OK [READ-WRITE] selected\r\n"),
    (b"a3 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY[])\r\n",
     b"* 1 FETCH (UID 4 FLAGS (\\Seen) BODY[HEADER.FIELDS (SUBJECT)] {12}\r\nSubject: x\r\n BODY[] {5}\r\n(a\r\n)"
     b")\r\n* 2 FETCH (UID 8 FLAGS ())\r\n* 3 FETCH (UID 9 FLAGS ())\r\na3 OK fetched\r\n"),
    (b"a4 NOOP\r\n", b"* 2 EXPUNGE\r\n* 4 EXISTS\r\n* 3 FETCH (UID 12 FLAGS (\\Seen))\r\na4 OK noop\r\n"),
    (b"a5 UID SEARCH ALL\r\n", b"* SEARCH 4 9 12 13\r\na5 OK searched\r\n"),
    (b"a6 IDLE\r\n", b"+ idling\r\n* 5 EXISTS\r\n"),
    (b"DONE\r\n", b"a6 OK done\r\n"),
    (b"a7 APPEND INBOX {3+}\r\nabc\r\n", b"* 6 EXISTS\r\na7 OK [APPENDUID 7 14] appended\r\n"),
    (b"a8 FROB {3}\r\n", b"a8 BAD refused before '+': the literal never comes\r\n"),
    (b"a9 APPEND INBOX (\\Seen) {3}\r\n", b"+ Ready\r\n"),
    (b"xyz\r\n", b"* 7 EXISTS\r\na9 OK [APPENDUID 7 15] appended\r\n"),
    (b"a10 LOGOUT\r\n", b"* BYE bye\r\na10 OK logged out\r\n"),
]


def feed(pairs, chunk=None):
    c = imapcheck.Checker()
    for sent, recv in pairs:
        if sent:
            c.sent(sent)
        if chunk is None:
            c.received(recv)
        else:
            for i in range(0, len(recv), chunk):
                c.received(recv[i:i + chunk])
    c.finish()
    return c


@test("checker: a good stream, fed whole, byte by byte and in every split of the FETCH literal, has no errors")
def t_checker_good():
    for chunk in (None, 1, 2, 3, 7):
        c = feed(GOOD, chunk)
        check(c.errors == [], "chunk %s: %r" % (chunk, c.errors))
    check(c.count == 7 and c.uids == {1: 4, 2: 9, 3: 12}, "view: %r %r" % (c.count, c.uids))
    fetch = GOOD[3][1]
    for cut in range(1, len(fetch)):
        c = imapcheck.Checker()
        for sent, recv in GOOD[:3]:
            if sent:
                c.sent(sent)
            c.received(recv)
        c.sent(GOOD[3][0])
        c.received(fetch[:cut])
        c.received(fetch[cut:])
        c.finish()
        check(c.errors == [] and c.uids == {1: 4, 2: 8, 3: 9}, "split at %d: %r" % (cut, c.errors))
    c = imapcheck.Checker()                 # received only: still tracks the view
    for _, recv in GOOD:
        c.received(recv)
    check(c.errors == [] and c.count == 7, "received-only: %r %r" % (c.errors, c.count))


SELECTED = GOOD[:3]                         # logged in, INBOX with 3 messages

BAD_STREAMS = [
    ("shrinking EXISTS", [(b"b1 NOOP\r\n", b"* 2 EXISTS\r\nb1 OK\r\n")], "EXISTS shrank"),
    ("EXISTS below count after EXPUNGE", [(b"b1 NOOP\r\n", b"* 1 EXPUNGE\r\n* 1 EXISTS\r\nb1 OK\r\n")],
     "EXISTS shrank"),
    ("EXPUNGE beyond count", [(b"b1 NOOP\r\n", b"* 4 EXPUNGE\r\nb1 OK\r\n")], "out of range"),
    ("EXPUNGE 0", [(b"b1 NOOP\r\n", b"* 0 EXPUNGE\r\nb1 OK\r\n")], "out of range"),
    ("FETCH beyond count", [(b"b1 NOOP\r\n", b"* 4 FETCH (FLAGS ())\r\nb1 OK\r\n")], "FETCH for message 4"),
    ("unknown tag", [(b"b1 NOOP\r\n", b"zz9 OK done\r\nb1 OK\r\n")], "never sent"),
    ("tag completed twice", [(b"b1 NOOP\r\n", b"b1 OK\r\nb1 OK\r\n")], "already completed"),
    ("unsolicited SEARCH", [(b"b1 NOOP\r\n", b"* SEARCH 1\r\nb1 OK\r\n")], "unsolicited SEARCH"),
    ("unparsable FETCH", [(b"b1 NOOP\r\n", b"* 1 FETCH (UID 1\r\nb1 OK\r\n")], "unparsable"),
    ("unparsable tagged line", [(b"b1 NOOP\r\n", b"b1 MAYBE\r\n")], "unparsable"),
    ("UID changed without EXPUNGE", [(b"b1 UID FETCH 1 (FLAGS)\r\n",
                                      b"* 1 FETCH (UID 5 FLAGS ())\r\n* 1 FETCH (UID 6 FLAGS ())\r\nb1 OK\r\n")],
     "changed UID"),
    ("EXPUNGE during FETCH", [(b"b1 FETCH 1 (FLAGS)\r\n", b"* 1 EXPUNGE\r\nb1 OK\r\n")], "RFC 3501 7.4.1"),
    ("EXPUNGE before a pipelined FETCH completed", [(b"b1 FETCH 1 (FLAGS)\r\nb2 NOOP\r\n",
                                                      b"* 1 EXPUNGE\r\nb1 OK\r\nb2 OK\r\n")],
     "still in progress"),
    ("bare LF", [(b"b1 NOOP\r\n", b"b1 OK\n")], "CRLF"),
]


@test("checker: flags shrinking EXISTS, EXPUNGE/FETCH out of range, unknown or repeated tags, "
      "unsolicited SEARCH, unparsable lines, UID changes, EXPUNGE during FETCH")
def t_checker_bad():
    for name, pairs, want in BAD_STREAMS:
        c = feed(SELECTED + pairs)
        check(any(want in e for e in c.errors), "%s: expected an error containing %r, got %r"
              % (name, want, c.errors))
    c = feed(SELECTED + [(b"b1 FETCH 1 (BODY[] )\r\n", b"* 1 FETCH (BODY[] {10}\r\nabc")])
    check(any("stream ended inside" in e for e in c.errors), "cut-off literal: %r" % c.errors)


@test("checker: no violations in any stream the fixture sent in this run")
def t_all_streams_clean():
    check(len(ALL_CHECKERS) >= 20, "only %d streams were checked" % len(ALL_CHECKERS))
    bad = ["%s: %s" % (label, e) for label, c in ALL_CHECKERS for e in c.errors]
    check(not bad, "\n".join(bad))


if __name__ == "__main__":
    sys.exit(run())
