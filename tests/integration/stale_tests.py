"""The stale-session fix, end to end: imapfresh in front of the stale upstream
fixture (stale_imapd.py, which behaves like WildDuck's session handling), in
front of Dovecot, and with two instances sharing one Redis.

Every byte each client receives goes through imapcheck.Checker, so a
repair that breaks the protocol (EXISTS shrinking, a wrong EXPUNGE number, a
stray tagged or SEARCH response) fails the test even when the message shows.
Waits are fixed multiples of the fixture's debounce interval and socket
deadlines; nothing asserts that something is fast.
"""

import itertools
import os
import re
import socket
import time

import imapcheck
import imapraw
import servers
import stale_imapd
import tap
from servers import HOST, DEFAULT_USERS as USERS
from tap import test

TIMEOUT = 10.0
DEBOUNCE = 0.1          # the fixture's default debounce, seconds
SETTLE = DEBOUNCE * 5   # "the debounce interval has certainly passed"
# A fixture that never heals a session on its own within a test: a test that
# says imapfresh repaired something must not pass because the fixture's
# notification happened to land (B's command > 100 ms after the change).
NEVER = {"debounce_ms": 60000}
_log_seq = itertools.count(1)


def upstream_log_path(ctx, name):
    """A fresh file for a fixture's protocol log (never one an earlier test
    wrote: the fixture appends)."""
    return os.path.join(ctx.env.tmp, "%s-upstream-%d-%d.log" % (name, os.getpid(), next(_log_seq)))
UIDS = re.compile(rb"UID (\d+)")


def check(cond, msg, *args):
    if not cond:
        raise AssertionError(msg % args if args else msg)


class Client(imapraw.Conn):
    """A raw connection whose every byte, both ways, feeds a Checker."""

    def __init__(self, port, label, tls=False, ctx=None):
        self.checker = imapcheck.Checker()
        self.label = label
        super().__init__(HOST, port, tls=tls, ctx=ctx, timeout=TIMEOUT, server_hostname=HOST)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.checker.sent(data)
        super().send(data)

    def _fill(self):
        before = len(self.buf)
        super()._fill()
        self.checker.received(self.buf[before:])

    def assert_clean(self):
        check(not self.checker.errors, "%s: protocol violations seen by the client: %s",
              self.label, self.checker.errors[:5])

    def uid_fetch_all(self, tag):
        _, untagged, _ = self.expect_ok(tag, "UID FETCH 1:* (FLAGS)")
        return sorted(int(m.group(1)) for l in untagged for m in [UIDS.search(l)] if m)


def message(i, tag="stale"):
    return (b"From: ann@example.com\r\nTo: alice@example.com\r\n"
            b"Subject: %s %d\r\nMessage-ID: <%d.%s@imapfresh-test>\r\n\r\nbody %d\r\n"
            % (tag.encode(), i, i, tag.encode(), i))


def login(ctx, port, label, user="alice"):
    c = Client(port, label, tls=True, ctx=ctx.sslctx())
    ctx.closers.append(c.close)
    ctx.conns.append(c)
    check(c.readline().startswith(b"* OK"), "%s: no greeting" % label)
    c.login(user, USERS[user])
    return c


def append(c, tag, mailbox, msg):
    tagged, _, _ = c.expect_ok(tag, b"APPEND %s {%d+}\r\n%s" % (mailbox.encode(), len(msg), msg))
    m = re.search(rb"APPENDUID \d+ (\d+)", tagged)
    check(m, "APPEND gave no APPENDUID: %r", tagged)
    return int(m.group(1))


class Fixture:
    """A stale upstream plus an imapfresh in front of it. The upstream logs
    every command it receives: injected() reads imapfresh's own from there,
    not from imapfresh's log."""

    def __init__(self, ctx, options=(), proxy_options=(), name="stale"):
        self.upstream_log = upstream_log_path(ctx, name)
        self.server = stale_imapd.StaleServer(**dict(options, log=self.upstream_log))
        self.port = self.server.start()
        ctx.closers.append(self.server.stop)
        self.proxy = ctx.proxy(name, options=list(proxy_options),
                               upstream="%s:%d" % (HOST, self.port))

    def proxy_log(self):
        with open(self.proxy.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def injected(self):
        return injected_from(self.upstream_log)


def injected_from(upstream_log):
    """The commands a stale fixture logging to upstream_log received under
    imapfresh's own tags, as "NOOP", "UID SEARCH ALL", 'SELECT "Archive"' ...
    in order."""
    out = []
    with open(upstream_log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"\S+ \[[^\]]*\] C: imapfresh\.\d+ (.*)$", line.rstrip("\n"))
            if m:
                out.append(m.group(1))
    return out


def prepare(ctx, fx, n=3):
    """A selects INBOX with n messages; B (the cached connection) selects Archive."""
    a = login(ctx, fx.proxy.tls_port, "A")
    b = login(ctx, fx.proxy.tls_port, "B")
    uids = [append(a, "P%d" % i, "INBOX", message(i)) for i in range(n)]
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT Archive")
    before = b.uid_fetch_all("F0")
    return a, b, uids, before


def thunderbird_revisit(b, box="Archive"):
    """What Thunderbird sends on a folder its cached connection has selected."""
    b.expect_ok("T1", "NOOP")
    b.expect_ok("T2", 'GETQUOTAROOT "%s"' % box)
    return b.uid_fetch_all("T3")


# ------------------------------------------------------------------ the bug

def _direct_bug(ctx, options, act):
    """Directly against the fixture, B does not see what A moved or copied in."""
    server = stale_imapd.StaleServer(**dict(NEVER, **dict(options)))
    port = server.start()
    ctx.closers.append(server.stop)
    a = Client(port, "A")
    b = Client(port, "B")
    ctx.closers += [a.close, b.close]
    for c in (a, b):
        c.readline()
        c.login("alice", USERS["alice"])
    uid = append(a, "P1", "INBOX", message(1))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT Archive")
    a.expect_ok("M1", "UID %s %d Archive" % (act, uid))
    seen = thunderbird_revisit(b)
    _, untagged, _ = b.expect_ok("U1", "UID SEARCH ALL")
    return seen, untagged


@test("stale: bug reproduced directly: MOVE within the debounce window is not seen", proxy_only=True)
def t_direct_move(ctx):
    seen, search = _direct_bug(ctx, {}, "MOVE")
    check(seen == [], "the fixture should be stale, but B saw %s", seen)
    check(any(re.search(rb"SEARCH \d", l) for l in search), "UID SEARCH should list it: %r", search)


@test("stale: bug reproduced directly: COPY that never notifies is not seen", proxy_only=True)
def t_direct_copy(ctx):
    seen, search = _direct_bug(ctx, {"copy_notifies": False}, "COPY")
    check(seen == [], "the fixture should be stale, but B saw %s", seen)
    check(any(re.search(rb"SEARCH \d", l) for l in search), "UID SEARCH should list it: %r", search)


# -------------------------------------------------------------- the repair

@test("stale: through imapfresh, Thunderbird's NOOP/GETQUOTAROOT/UID FETCH sees a moved message",
      proxy_only=True)
def t_repair_move(ctx):
    fx = Fixture(ctx, options=NEVER)
    a, b, uids, before = prepare(ctx, fx)
    check(before == [], "Archive starts empty: %s", before)
    tagged, _, _ = a.expect_ok("M1", "UID MOVE %d Archive" % uids[0])
    seen = thunderbird_revisit(b)
    check(len(seen) == 1, "B should see the moved message at once, saw %s", seen)
    b.assert_clean()
    a.assert_clean()
    got = fx.injected()
    check(got[:2] == ["NOOP", "UID SEARCH ALL"] and 'SELECT "Archive"' in got,
          "the upstream received the check and the re-SELECT: %s", got)


@test("stale: through imapfresh, a bare UID FETCH n:* sees a moved message", proxy_only=True)
def t_repair_bare_fetch(ctx):
    fx = Fixture(ctx)
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("M1", "UID MOVE %d:%d Archive" % (uids[0], uids[1]))
    # The fixture's notification lands now; B's session shows it only after
    # a NOOP, and B sends none: only imapfresh's NOOP can show it.
    time.sleep(SETTLE)
    seen = b.uid_fetch_all("F1")
    check(len(seen) == 2, "B should see both moved messages, saw %s", seen)
    b.assert_clean()
    got = fx.injected()
    check(got == ["NOOP", "UID SEARCH ALL"], "the injected NOOP was enough, no re-SELECT: %s", got)


@test("stale: through imapfresh, a COPY that never notifies is repaired by re-SELECT",
      proxy_only=True)
def t_repair_copy(ctx):
    fx = Fixture(ctx, options={"copy_notifies": False})
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("C1", "UID COPY %d Archive" % uids[2])
    time.sleep(SETTLE)  # no notification ever comes: waiting does not help the server
    seen = thunderbird_revisit(b)
    check(len(seen) == 1, "B should see the copied message, saw %s", seen)
    b.assert_clean()
    check('SELECT "Archive"' in fx.injected(), "the upstream got the re-SELECT: %s", fx.injected())


@test("stale: through imapfresh, an expunge by another session reaches the cached connection",
      proxy_only=True)
def t_repair_expunge(ctx):
    fx = Fixture(ctx)
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("M1", "UID MOVE %d:%d Archive" % (uids[0], uids[2]))
    check(len(b.uid_fetch_all("F1")) == 3, "B sees the three moved messages")
    a.expect_ok("S3", "SELECT Archive")
    a.expect_ok("E1", "UID STORE %d +FLAGS.SILENT (\\Deleted)" % thunderbird_uids(a)[1])
    a.expect_ok("E2", "EXPUNGE")
    seen = b.uid_fetch_all("F2")
    check(len(seen) == 2, "B should see two messages after the expunge, saw %s", seen)
    b.assert_clean()


def thunderbird_uids(c):
    return c.uid_fetch_all("TU")


def _expunge_then_fetch(ctx, position):
    """A expunges the message at position of B's stale Archive; B's plain
    FETCH (a trigger) must not hear of it and must mean B's numbers. The
    fixture never notifies within the test, so only the re-SELECT repairs."""
    fx = Fixture(ctx, options=NEVER)
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("M1", "UID MOVE %d:%d Archive" % (uids[0], uids[2]))
    seen = b.uid_fetch_all("F1")
    check(len(seen) == 3, "B sees the three moved messages: %s", seen)
    a.expect_ok("S3", "SELECT Archive")
    a.expect_ok("E1", "UID STORE %d +FLAGS.SILENT (\\Deleted)" % seen[position - 1])
    a.expect_ok("E2", "EXPUNGE")
    tagged, lines, _ = b.command("F2", "FETCH 1:3 (UID)")
    check(not any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines), "EXPUNGE during FETCH: %r",
          lines)
    got = {int(m.group(1)): int(m.group(2)) for l in lines
           for m in [re.match(rb"\* (\d+) FETCH \(UID (\d+)", l)] if m}
    want = {i + 1: u for i, u in enumerate(seen) if i != position - 1}
    check(got == want, "FETCH 1:3 in B's numbers: got %r, want %r", got, want)
    check(re.match(rb"F2 (OK|NO)", tagged), "F2: %r", tagged)
    _, lines, _ = b.expect_ok("N1", "NOOP")
    check([l for l in lines if b"EXPUNGE" in l] == [b"* %d EXPUNGE\r\n" % position],
          "NOOP tells B of the expunge: %r", lines)
    left = b.uid_fetch_all("F3")
    check(left == [u for i, u in enumerate(seen) if i != position - 1], "B's view: %s", left)
    b.assert_clean()
    check('SELECT "Archive"' in fx.injected(), "the re-SELECT path was taken: %s", fx.injected())


@test("stale/qresync: an escalation behind a QRESYNC client's FETCH tells it VANISHED, never "
      "EXPUNGE, after the FETCH", proxy_only=True)
def t_repair_expunge_qresync(ctx):
    fx = Fixture(ctx, options=dict(NEVER, qresync=True))
    a, b, uids, _ = prepare(ctx, fx)
    _, lines, _ = b.expect_ok("E1", "ENABLE QRESYNC")
    check(any(l.startswith(b"* ENABLED") for l in lines), "enabled: %r", lines)
    a.expect_ok("M1", "UID MOVE %d:%d Archive" % (uids[0], uids[2]))
    seen = b.uid_fetch_all("F1")
    check(len(seen) == 3, "B sees the three moved messages: %s", seen)
    a.expect_ok("S3", "SELECT Archive")
    a.expect_ok("E1", "UID STORE %d +FLAGS.SILENT (\\Deleted)" % seen[0])
    a.expect_ok("E2", "EXPUNGE")
    tagged, lines, _ = b.command("F2", "FETCH 1:3 (UID)")
    check(not any(re.match(rb"\* (\d+ EXPUNGE|VANISHED)", l) for l in lines),
          "no EXPUNGE/VANISHED during FETCH: %r", lines)
    _, lines, _ = b.expect_ok("N1", "NOOP")
    check(not any(b"EXPUNGE" in l for l in lines), "never EXPUNGE to a QRESYNC client: %r", lines)
    check([l for l in lines if l.startswith(b"* VANISHED")] == [b"* VANISHED %d\r\n" % seen[0]],
          "VANISHED of the expunged UID: %r", lines)
    check(b.uid_fetch_all("F3") == seen[1:], "B's view")
    check('SELECT "Archive" (CONDSTORE)' in fx.injected(),
          "the re-SELECT asked for CONDSTORE (QRESYNC enables it): %s", fx.injected())


@test("stale/qresync: a VANISHED for a message the client was never shown a UID of is held by "
      "UID, placed by the server's list, and told after the FETCH", proxy_only=True)
def t_qresync_vanished_unplaced(ctx):
    # debounce 0: the fixture queues the expunge for B at once; B's injected
    # NOOP then answers VANISHED before imapfresh has read the server's list.
    fx = Fixture(ctx, options=dict(qresync=True, debounce_ms=0))
    a = login(ctx, fx.proxy.tls_port, "A")
    b = login(ctx, fx.proxy.tls_port, "B")
    uids = [append(a, "P%d" % i, "Archive", message(i)) for i in range(6)]
    a.expect_ok("S2", "SELECT Archive")
    # Gaps in the UIDs: from the count and UIDNEXT alone no position follows.
    a.expect_ok("D0", "UID STORE %d,%d +FLAGS.SILENT (\\Deleted)" % (uids[1], uids[3]))
    a.expect_ok("X0", "EXPUNGE")
    uids = [uids[0], uids[2], uids[4], uids[5]]
    b.expect_ok("E1", "ENABLE QRESYNC")
    b.expect_ok("S1", "SELECT Archive")     # 4 EXISTS, and no UID at all
    a.expect_ok("M1", "UID MOVE %d Trash" % uids[2])   # an expunge, no flag change first
    _, lines, _ = b.command("F1", "FETCH 3:4 (UID)")
    check(not any(re.match(rb"\* (\d+ EXPUNGE|VANISHED)", l) for l in lines),
          "no EXPUNGE/VANISHED during FETCH: %r", lines)
    got = [(int(m.group(1)), int(m.group(2))) for m in
           (re.match(rb"\* (\d+) FETCH \(UID (\d+)\)", l) for l in lines) if m]
    check(got == [(4, uids[3])], "B's message 4 is UID %d, its 3 (expunged) names no other: %r",
          uids[3], lines)
    check(fx.injected() == ["NOOP", "UID SEARCH ALL"],
          "placed by the list, no re-SELECT: %s", fx.injected())
    _, lines, _ = b.expect_ok("N1", "NOOP")
    check([l for l in lines if re.match(rb"\* (\d+ EXPUNGE|VANISHED)", l)] ==
          [b"* VANISHED %d\r\n" % uids[2]], "VANISHED of the expunged UID: %r", lines)
    check(b.uid_fetch_all("F2") == uids[:2] + uids[3:], "B's view")


@test("stale: a plain FETCH after another session expunged B's first message: held, renumbered",
      proxy_only=True)
def t_repair_expunge_seq_first(ctx):
    _expunge_then_fetch(ctx, 1)


@test("stale: a plain FETCH after another session expunged B's last message: held, renumbered",
      proxy_only=True)
def t_repair_expunge_seq_last(ctx):
    _expunge_then_fetch(ctx, 3)


@test("stale: an idling client is refreshed: EXISTS arrives while it idles (server never pushes)",
      proxy_only=True)
def t_repair_idle(ctx):
    fx = Fixture(ctx, options={"idle_push": False})
    a, b, uids, _ = prepare(ctx, fx)
    b.send(b"I1 IDLE\r\n")
    line, _ = b.wait_continuation()
    a.expect_ok("M1", "UID MOVE %d Archive" % uids[0])
    b.settimeout(TIMEOUT)
    got = b.readline()
    check(re.match(rb"\* 1 EXISTS", got), "B should get * 1 EXISTS while idling, got %r", got)
    b.send(b"DONE\r\n")
    tagged, others, _ = b.wait_tagged("I1")
    check(tagged.startswith(b"I1 OK"), "DONE ends the client's IDLE: %r", tagged)
    check(not any(l.startswith(b"+") for l in others), "no second continuation: %r", others)
    check(len(b.uid_fetch_all("F1")) == 1, "and the message is fetchable")
    b.assert_clean()


@test("stale: with resync = no, the cached connection stays stale (the fix is what fixes it)",
      proxy_only=True)
def t_resync_disabled(ctx):
    fx = Fixture(ctx, options=NEVER, proxy_options=[("resync", "no")])
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("M1", "UID MOVE %d Archive" % uids[0])
    seen = thunderbird_revisit(b)
    check(seen == [], "without resync B should miss the message, saw %s", seen)
    check(fx.injected() == [], "nothing injected: %s", fx.injected())


@test("stale: resync_after covers changes imapfresh cannot see (a delivery behind its back)",
      proxy_only=True)
def t_resync_after(ctx):
    fx = Fixture(ctx, options={"debounce_ms": 60000}, proxy_options=[("resync_after", "3s")])
    a, b, uids, _ = prepare(ctx, fx)
    # Delivered by the server itself (LMTP-like): no command through imapfresh.
    fx.server.deliver("alice", "Archive", message(99, "lmtp"))
    check(b.uid_fetch_all("F1") == [], "right away nothing says the session is stale")
    time.sleep(3.5)   # longer than resync_after
    seen = b.uid_fetch_all("F2")
    check(len(seen) == 1, "after resync_after the delivery is seen, saw %s", seen)
    b.assert_clean()


@test("stale: a session that needs no resync gets nothing injected", proxy_only=True)
def t_no_resync_needed(ctx):
    fx = Fixture(ctx)
    a, b, uids, _ = prepare(ctx, fx)
    for i in range(3):
        b.uid_fetch_all("F%d" % i)
        b.expect_ok("Q%d" % i, 'GETQUOTAROOT "Archive"')
    check(fx.injected() == [], "the upstream got nothing of imapfresh's: %s", fx.injected())
    b.assert_clean()


@test("stale: a trigger pipelined behind other commands waits for them, then resyncs",
      proxy_only=True)
def t_repair_pipelined(ctx):
    fx = Fixture(ctx, options=NEVER)
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("M1", "UID MOVE %d Archive" % uids[1])
    b.send(b"T1 NOOP\r\nT2 GETQUOTAROOT \"Archive\"\r\nT3 UID FETCH 1:* (FLAGS)\r\nT4 NOOP\r\n")
    lines = []
    for tag in ("T1", "T2", "T3", "T4"):
        tagged, untagged, _ = b.wait_tagged(tag)
        check(tagged.startswith(tag.encode() + b" OK"), "%s: %r", tag, tagged)
        lines += untagged
    check(sum(1 for l in lines if b" FETCH " in l and b"UID " in l) == 1,
          "the pipelined UID FETCH shows the moved message: %r", lines)
    b.assert_clean()
    check(fx.injected()[:2] == ["NOOP", "UID SEARCH ALL"], "injected: %s", fx.injected())


# ------------------------------------------------------------- Dovecot

@test("stale: against Dovecot the same moves cause no escalation and nothing extra", proxy_only=True)
def t_dovecot_no_escalation(ctx):
    p = ctx.proxy("dovecot-resync")
    a = login(ctx, p.tls_port, "A")
    b = login(ctx, p.tls_port, "B")
    box = ctx.mailbox(a, "Arch")
    uids = [append(a, "P%d" % i, "INBOX", message(i, "dovecot")) for i in range(2)]
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT %s" % box)
    a.expect_ok("M1", "UID MOVE %d:%d %s" % (uids[0], uids[1], box))
    b.expect_ok("T1", "NOOP")
    seen = b.uid_fetch_all("T3")
    check(len(seen) == 2, "B sees both messages: %s", seen)
    b.assert_clean()
    a.assert_clean()
    log = open(p.log).read()
    check("stale session detected" not in log, "Dovecot is never stale:\n%s", log[-2000:])


@test("stale: against Dovecot an idling client gets the EXISTS once, and DONE works", proxy_only=True)
def t_dovecot_idle(ctx):
    p = ctx.proxy("dovecot-idle")
    a = login(ctx, p.tls_port, "A")
    b = login(ctx, p.tls_port, "B")
    box = ctx.mailbox(a, "Idle")
    uid = append(a, "P1", "INBOX", message(1, "dovecot-idle"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT %s" % box)
    b.send(b"I1 IDLE\r\n")
    b.wait_continuation()
    a.expect_ok("M1", "UID MOVE %d %s" % (uid, box))
    got = b.readline()
    check(got.startswith(b"* 1 EXISTS"), "EXISTS while idling: %r", got)
    b.send(b"DONE\r\n")
    tagged, others, _ = b.wait_tagged("I1")
    check(tagged.startswith(b"I1 OK"), "IDLE ends: %r", tagged)
    check(not any(re.match(rb"\* \d+ EXISTS", l) for l in others),
          "no second EXISTS for the same message: %r", others)
    check(len(b.uid_fetch_all("F1")) == 1, "one message")
    b.assert_clean()
    check("stale session detected" not in open(p.log).read(), "no escalation against Dovecot")


# ---------------------------------------------------------------- Redis

def redis_cli(redis, *args):
    import subprocess
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(redis.port), "--raw"] + list(args),
                         capture_output=True, timeout=10)
    lines = out.stdout.decode("utf-8", "replace").splitlines()
    return [] if lines == [""] else lines   # an empty reply prints one empty line


def wait_for(pred, what, deadline=10.0):
    """Poll until pred() is true; a deadline turns a hang into a failure."""
    end = time.monotonic() + deadline
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


class RedisPair:
    """A private Redis, a slow-notifying stale upstream, and two imapfresh
    instances sharing both: whatever B sees early, only imapfresh told it."""

    def __init__(self, ctx, debounce_ms=5000):
        self.redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-%d" % id(self)))
        self.redis.start()
        ctx.closers.append(lambda: self.redis.proc and self.redis.stop())
        self.server = stale_imapd.StaleServer(debounce_ms=debounce_ms)
        self.port = self.server.start()
        ctx.closers.append(self.server.stop)
        common = [("state", self.redis.url), ("log_level", "debug")]
        self.a = ctx.proxy("redis-a", options=common + [("instance_id", "itest-a")],
                           upstream="%s:%d" % (HOST, self.port))
        self.b = ctx.proxy("redis-b", options=common + [("instance_id", "itest-b")],
                           upstream="%s:%d" % (HOST, self.port))

    @staticmethod
    def log(p):
        with open(p.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def heard(self, p, n):
        """p has received at least n change messages from the other instance."""
        return self.log(p).count("change from") >= n


def redis_calls(redis, command):
    """How many times Redis has run command (INFO commandstats)."""
    for line in redis_cli(redis, "INFO", "commandstats"):
        if line.startswith("cmdstat_%s:" % command.lower()):
            return int(re.search(r"calls=(\d+)", line).group(1))
    return 0


@test("stale/redis: a GETQUOTAROOT + UID FETCH that shows nothing new writes nothing to Redis; "
      "a FETCH that shows a new message does", proxy_only=True)
def t_redis_unchanged_round(ctx):
    rp = RedisPair(ctx)
    a = login(ctx, rp.a.tls_port, "A")
    for i in range(3):
        append(a, "P%d" % i, "INBOX", message(i, "quiet"))
    a.expect_ok("S1", "SELECT INBOX")
    a.uid_fetch_all("F0")
    wait_for(lambda: redis_cli(rp.redis, "KEYS", "imapfresh:{alice}:session:*"), "the session's record")
    before = redis_calls(rp.redis, "HSET")
    for i in range(10):
        a.expect_ok("Q%d" % i, 'GETQUOTAROOT "INBOX"')
        a.uid_fetch_all("F%d" % (i + 1))
    check(redis_calls(rp.redis, "HSET") == before, "no session record written for 10 unchanged "
          "rounds: HSET ran %d times", redis_calls(rp.redis, "HSET") - before)
    append(a, "P9", "INBOX", message(9, "quiet"))
    check(len(a.uid_fetch_all("F99")) == 4, "the new message")
    wait_for(lambda: redis_calls(rp.redis, "HSET") > before, "the record written for a new UID")


@test("stale/redis: session keys as documented, with a TTL, gone after LOGOUT", proxy_only=True)
def t_redis_keys(ctx):
    rp = RedisPair(ctx)
    a = login(ctx, rp.a.tls_port, "A")
    append(a, "P1", "INBOX", message(1, "redis"))
    a.expect_ok("S1", "SELECT INBOX")
    a.uid_fetch_all("F1")
    sid_key = lambda: [k for k in redis_cli(rp.redis, "KEYS", "imapfresh:{alice}:session:*")]
    wait_for(lambda: sid_key(), "a session key in Redis")
    key = sid_key()[0]
    check(key.startswith("imapfresh:{alice}:session:itest-a:"), "session key %r", key)
    fields = redis_cli(rp.redis, "HGETALL", key)
    h = dict(zip(fields[0::2], fields[1::2]))
    for f in ("user", "instance", "client", "mailbox", "uidvalidity", "uidnext", "count",
              "synced_gen", "started", "view"):
        check(f in h, "field %s missing from %s: %s", f, key, h)
    check(h["user"] == "alice" and h["instance"] == "itest-a", "user/instance: %s", h)
    wait_for(lambda: dict(zip(*[iter(redis_cli(rp.redis, "HGETALL", key))] * 2)).get("mailbox")
             == "INBOX", "mailbox INBOX in the session key")
    ttl = int(redis_cli(rp.redis, "TTL", key)[0])
    check(ttl > 0, "the session key has a TTL (%d)", ttl)
    members = redis_cli(rp.redis, "SMEMBERS", "imapfresh:{alice}:sessions")
    check(key.split(":session:")[1] in members, "sid in the sessions set: %s", members)
    gen = redis_cli(rp.redis, "HGET", "imapfresh:{alice}:gen", "INBOX")
    check(gen and int(gen[0]) >= 1, "INBOX generation counted in Redis: %s", gen)
    a.send(b"Z1 LOGOUT\r\n")
    a.read_until_eof()
    wait_for(lambda: not sid_key(), "the session key to go after LOGOUT")
    wait_for(lambda: key.split(":session:")[1] not in
             redis_cli(rp.redis, "SMEMBERS", "imapfresh:{alice}:sessions"), "sid removal")


@test("stale/redis: a MOVE through instance A is repaired for a session on instance B",
      proxy_only=True)
def t_redis_two_instances(ctx):
    rp = RedisPair(ctx)
    a = login(ctx, rp.a.tls_port, "A")
    b = login(ctx, rp.b.tls_port, "B")
    uid = append(a, "P1", "INBOX", message(1, "pair"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT Archive")
    check(b.uid_fetch_all("F0") == [], "Archive starts empty")
    heard = rp.log(rp.b).count("change from")
    a.expect_ok("M1", "UID MOVE %d Archive" % uid)
    wait_for(lambda: rp.heard(rp.b, heard + 2), "instance B to hear of the MOVE")
    seen = thunderbird_revisit(b)
    check(len(seen) == 1, "B (other instance) should see the moved message, saw %s", seen)
    b.assert_clean()
    check("resync \"Archive\"" in rp.log(rp.b), "instance B resynced")


@test("stale/redis: Redis killed mid-session and restarted: mail flows, resync resumes",
      proxy_only=True, timeout=120)
def t_redis_restart(ctx):
    rp = RedisPair(ctx)
    a = login(ctx, rp.a.tls_port, "A")
    b = login(ctx, rp.b.tls_port, "B")
    uids = [append(a, "P%d" % i, "INBOX", message(i, "outage")) for i in range(2)]
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT Archive")
    b.uid_fetch_all("F0")
    rp.redis.stop()
    wait_for(lambda: "redis" in rp.log(rp.b) and "missed" in rp.log(rp.b),
             "instance B to notice Redis is gone")
    # Mail keeps flowing without Redis; B, possibly stale, resyncs anyway.
    a.expect_ok("M1", "UID MOVE %d Archive" % uids[0])
    seen = thunderbird_revisit(b)
    check(len(seen) == 1, "during the outage B resyncs as possibly stale, saw %s", seen)
    rp.redis.start()
    wait_for(lambda: "reconnected" in rp.log(rp.a) and "reconnected" in rp.log(rp.b),
             "both instances to reconnect", deadline=60)
    heard = rp.log(rp.b).count("change from")
    a.expect_ok("M2", "UID MOVE %d Archive" % uids[1])
    wait_for(lambda: rp.heard(rp.b, heard + 2), "instance B to hear of the second MOVE")
    seen = thunderbird_revisit(b)
    check(len(seen) == 2, "after the restart changes reach B again, saw %s", seen)
    b.assert_clean()
