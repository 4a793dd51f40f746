"""Faults and hostile inputs (issue 6): imapfresh must survive each one, the
session at fault gets a defined answer (usually * BYE, or BAD), and a second,
healthy session through the same process keeps working throughout.

Upstream faults use FakeUpstream, a scripted IMAP server in this process
that greets, accepts any LOGIN and then misbehaves as a test asks (dies in
the middle of a literal, never greets, sends garbage or a 1 GB line, sends
200 MB to a client that does not read). It also records every byte it got,
so tests can check what imapfresh sent upstream. Redis faults use a Redis
of the test's own. Memory is read from /proc/<pid>/status (VmRSS).

tests/README.md lists every fault with what the client gets.
"""

import base64
import hashlib
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import servers
import tap
from imapraw import ProtocolError, capabilities, status
from servers import HOST, DEFAULT_USERS as USERS
from tap import test

TIMEOUT = 10.0
MB = 1024 * 1024


def check(cond, msg, *args):
    if not cond:
        raise AssertionError(msg % args if args else msg)


def rss_kb(pid):
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def is_asan(pid):
    try:
        with open("/proc/%d/maps" % pid) as f:
            return "libasan" in f.read() or "asan" in os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return False


def rss_limit_kb(proc):
    """How much VmRSS may grow during one of these tests: 32 MB, or 96 MB
    under AddressSanitizer (its allocator and shadow pages grow too)."""
    return (96 if is_asan(proc.pid) else 32) * 1024


class RssWatch:
    """Samples a process's VmRSS every 50 ms in the background; .peak()."""

    def __init__(self, pid):
        self.pid = pid
        self.base = rss_kb(pid)
        self.max = self.base
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop_ev.wait(0.05):
            self.max = max(self.max, rss_kb(self.pid))

    def growth(self):
        return self.max - self.base

    def stop(self):
        self.stop_ev.set()
        self.t.join(2)
        return self.growth()


def alive(p):
    check(p.alive(), "imapfresh exited (status %s)%s", p.proc.returncode, p.log_tail(15))


def healthy(ctx, port=None, user="bob", tls=True):
    """A logged-in session with INBOX selected, to check later that it still works."""
    c = ctx.raw_tls(port) if tls else ctx.raw_plain(port)
    g = c.readline()
    check(g.startswith(b"* OK"), "healthy session greeting %r", g)
    c.login(user, USERS[user], "h0")
    c.expect_ok("h1", "SELECT INBOX")
    return c


def still_healthy(c, tag="hz"):
    c.expect_ok(tag + "a", "NOOP")
    c.expect_ok(tag + "b", "UID FETCH 1:* (UID)")


def wait_until(pred, what, deadline=10.0, step=0.05):
    end = time.monotonic() + deadline
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("timed out after %.0fs waiting for %s" % (deadline, what))
        time.sleep(step)


def read_all_until_eof(conn, timeout=TIMEOUT):
    """What the peer sends until it closes (a reset counts as a close)."""
    try:
        return conn.read_until_eof(timeout)
    except (ConnectionResetError, BrokenPipeError):
        return conn.buf


# ------------------------------------------------------- a scripted upstream

class FakeConn:
    """One connection to FakeUpstream: line/literal reading, recording."""

    def __init__(self, sock, server):
        self.sock = sock
        self.server = server
        self.buf = b""
        self.received = bytearray()
        self.user = None
        self.closed = False

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError
        self.received += chunk
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

    def command(self, on_literal=None):
        """A whole command (literals included); for each literal
        on_literal(size, nonsync) may take over (return False: stop)."""
        parts = []
        while True:
            line = self.readline()
            parts.append(line)
            m = re.search(rb"~?\{(\d+)(\+?)\}\r?\n$", line)
            if not m:
                return b"".join(parts)
            size, nonsync = int(m.group(1)), bool(m.group(2))
            if on_literal is not None and on_literal(self, size, nonsync) is False:
                return None
            if not nonsync:
                self.send(b"+ go ahead\r\n")
            parts.append(self.read_exact(size))

    def close(self):
        self.closed = True
        for fn in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                fn()
            except OSError:
                pass


class FakeUpstream:
    """A threaded IMAP server on 127.0.0.1 for fault tests.

    hooks: name -> fn(fc, tag, raw) run for a command of that name (upper
    case) instead of the default answer; it returns False to end the
    connection. greet(fc) replaces the greeting (return False: no IMAP
    loop at all). Users log in with any password; fc.user says who."""

    CAPS = b"IMAP4rev1 LITERAL+ IDLE UIDPLUS"

    def __init__(self, hooks=None, greet=None, on_literal=None):
        self.hooks = dict(hooks or {})
        self.greet = greet
        self.on_literal = on_literal
        self.conns = []
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((HOST, 0))
        self.srv.listen(256)
        self.port = self.srv.getsockname()[1]
        self.addr = "%s:%d" % (HOST, self.port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                s, _ = self.srv.accept()
            except OSError:
                return
            fc = FakeConn(s, self)
            self.conns.append(fc)
            threading.Thread(target=self._serve, args=(fc,), daemon=True).start()

    def _serve(self, fc):
        try:
            if self.greet is not None:
                if self.greet(fc) is False:
                    return
            else:
                fc.send(b"* OK [CAPABILITY " + self.CAPS + b"] fake upstream ready\r\n")
            while True:
                raw = fc.command(self.on_literal)
                if raw is None:
                    return
                words = raw.split(b" ", 3)
                tag = words[0]
                name = words[1].rstrip(b"\r\n").upper() if len(words) > 1 else b""
                if name == b"UID" and len(words) > 2:
                    name = b"UID " + words[2].rstrip(b"\r\n").upper()
                hook = self.hooks.get(name.decode("latin-1"))
                if hook is not None:
                    if hook(fc, tag, raw) is False:
                        return
                    continue
                if self._default(fc, tag, name, raw) is False:
                    return
        except (EOFError, OSError):
            pass
        finally:
            fc.close()

    def _default(self, fc, tag, name, raw):
        if name == b"LOGIN":
            fc.user = raw.split(b" ")[2].strip(b'"').decode("latin-1")
            fc.send(tag + b" OK [CAPABILITY " + self.CAPS + b"] Logged in\r\n")
        elif name in (b"SELECT", b"EXAMINE"):
            fc.send(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n"
                    b"* OK [UIDNEXT 2] Predicted next UID\r\n" + tag + b" OK [READ-WRITE] Selected\r\n")
        elif name in (b"FETCH", b"UID FETCH"):
            fc.send(b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n" + tag + b" OK Fetch completed\r\n")
        elif name == b"UID SEARCH":
            fc.send(b"* SEARCH 1\r\n" + tag + b" OK Search completed\r\n")
        elif name == b"CAPABILITY":
            fc.send(b"* CAPABILITY " + self.CAPS + b"\r\n" + tag + b" OK done\r\n")
        elif name == b"IDLE":
            fc.send(b"+ idling\r\n")
            fc.readline()
            fc.send(tag + b" OK Idle completed\r\n")
        elif name == b"LOGOUT":
            fc.send(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
            return False
        else:
            fc.send(tag + b" OK " + name + b" completed\r\n")
        return True

    def received(self):
        return [bytes(c.received) for c in self.conns]

    def close(self):
        try:
            self.srv.close()
        except OSError:
            pass
        for c in list(self.conns):
            c.close()


def fake_proxy(ctx, name, fake, options=()):
    """imapfresh in front of a FakeUpstream; plaintext logins allowed."""
    fake_opts = [("require_tls", "no")] + list(options)
    ctx.closers.append(fake.close)
    return ctx.proxy(name, fake_opts, upstream=fake.addr)


def fake_login(ctx, p, user, tls=False):
    c = ctx.raw_tls(p.tls_port) if tls else ctx.raw_plain(p.port)
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting through imapfresh: %r", g)
    c.expect_ok("L", "LOGIN %s anything" % user)
    return c


# ================================================================= Redis

def own_redis(ctx, name, extra=()):
    """A Redis only this test uses (it gets killed and slowed)."""
    r = servers.Redis(os.path.join(ctx.env.tmp, "%s-%x" % (name, random.getrandbits(32))))
    if extra:
        exe = shutil.which("redis-server")
        os.makedirs(r.dir, exist_ok=True)
        r.proc = servers.spawn([exe, "--bind", HOST, "--port", str(r.port), "--save", "",
                                "--appendonly", "no", "--dir", r.dir] + list(extra), r.log)
        servers.wait_ports([r.port], r.proc, 15, "redis-server", r.log)
        wait_until(lambda: r.command("PING") == b"+PONG", "redis PING")
    else:
        r.start()
    ctx.closers.append(lambda: r.proc and r.stop())
    return r


def redis_keys(r, pattern="*"):
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(r.port), "--raw", "--scan",
                          "--pattern", pattern], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
    return [k for k in out.stdout.decode("latin-1").splitlines() if k]


def timed(conn, tag, cmd, limit):
    t0 = time.monotonic()
    r = conn.expect_ok(tag, cmd)
    dt = time.monotonic() - t0
    check(dt < limit, "%s took %.2fs through imapfresh (limit %.1fs): blocked on Redis?", cmd,
          dt, limit)
    return r


def append(conn, tag, mailbox, msg):
    conn.send(b"%s APPEND %s {%d}\r\n" % (tag.encode(), mailbox.encode(), len(msg)))
    conn.wait_continuation()
    conn.send(msg + b"\r\n")
    tagged, _, _ = conn.wait_tagged(tag)
    return status(tagged, "OK")


def message(subject, body=b"fault test body\r\n"):
    return (b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + ("%x" % random.getrandbits(64)).encode()
            + b"@fault.test>\r\n\r\n" + body)


@test("fault: Redis killed, then restarted: sessions go on, new ones log in, state comes back",
      timeout=90, proxy_only=True)
def t_redis_killed(ctx):
    r = own_redis(ctx, "redis-kill")
    p = ctx.proxy("redis-kill", [("state", r.url), ("instance_id", "fault-kill")])
    a, _ = ctx.session("alice", p.tls_port)
    mb = ctx.mailbox(a)
    a.expect_ok("a1", "SELECT " + mb)
    b = healthy(ctx, p.tls_port, "alice")
    wait_until(lambda: len(redis_keys(r, "imapfresh:{alice}:session:*")) == 2,
               "both sessions' keys in Redis")
    r.proc.send_signal(signal.SIGKILL)
    r.proc.wait(5)
    # Every command goes on without Redis.
    append(a, "a2", mb, message("while redis is dead"))
    timed(a, "a3", "FETCH 1:* (UID FLAGS)", 3.0)
    still_healthy(b, "b1")
    c, _ = ctx.session("bob", p.tls_port)
    timed(c, "c1", "SELECT INBOX", 3.0)
    alive(p)
    # Redis back on the same port: imapfresh reconnects (backoff 1 s, 2 s,
    # 4 s ...) and writes every live session's state again, the idle ones
    # and bob's (logged in during the outage, its saves dropped) included.
    r2 = servers.Redis(r.dir, port=r.port)
    r2.start()
    ctx.closers.append(lambda: r2.proc and r2.stop())
    wait_until(lambda: "reconnected" in _log_since(p.log, 0), "imapfresh reconnecting", 40, 0.2)
    wait_until(lambda: len(redis_keys(r2, "imapfresh:{alice}:session:*")) == 2
               and len(redis_keys(r2, "imapfresh:{bob}:session:*")) == 1,
               "every live session's key in the restarted Redis", 10, 0.1)
    # The outage grew the store's epoch: the next trigger resyncs.
    timed(a, "a4", "UID FETCH 1:* (UID)", 3.0)
    append(a, "a5", mb, message("after redis came back"))
    still_healthy(b, "b2")
    alive(p)


def redis_hash(r, key):
    """HGETALL key as a dict of str (empty when the key is missing)."""
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(r.port), "--raw", "HGETALL", key],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=10)
    lines = out.stdout.decode("latin-1").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return dict(zip(lines[0::2], lines[1::2])) if out.returncode == 0 else {}


@test("fault: Redis restarted while a session idles with a mailbox selected: its state key, its "
      "sessions set entry and the instances registry come back at once, unchanged",
      timeout=90, proxy_only=True)
def t_redis_restart_idle_state(ctx):
    r = own_redis(ctx, "redis-idle")
    inst = "fault-idle-%06x" % random.getrandbits(24)
    p = ctx.proxy("redis-idle", [("state", r.url), ("instance_id", inst)])
    a, _ = ctx.session("alice", p.tls_port)
    mb = ctx.mailbox(a)
    append(a, "a1", mb, message("idle one"))
    append(a, "a2", mb, message("idle two"))
    a.expect_ok("a3", "SELECT " + mb)
    a.expect_ok("a4", "FETCH 1:* (UID)")       # every UID known: a view to compare
    key = wait_until(lambda: redis_keys(r, "imapfresh:{alice}:session:%s:*" % inst),
                     "the session's key")[0]
    sid = key.split(":session:", 1)[1]

    def settled(rr):
        h = redis_hash(rr, key)
        return h if h.get("mailbox") == mb and h.get("count") == "2" and h.get("view") else None
    before = wait_until(lambda: settled(r), "the key showing %s with 2 messages" % mb)
    wait_until(lambda: r.command("HEXISTS", "imapfresh:instances", inst) == b":1",
               "the instance in the registry")
    check(r.command("SISMEMBER", "imapfresh:{alice}:sessions", sid) == b":1",
          "%s not in the user's sessions set", sid)
    r.proc.send_signal(signal.SIGKILL)
    r.proc.wait(5)
    wait_until(lambda: "missed until" in _log_since(p.log, 0), "imapfresh noticing the outage",
               10, 0.1)
    r2 = servers.Redis(r.dir, port=r.port)     # an empty Redis (no persistence)
    r2.start()
    ctx.closers.append(lambda: r2.proc and r2.stop())
    wait_until(lambda: "reconnected" in _log_since(p.log, 0), "imapfresh reconnecting", 40, 0.1)
    # The client does nothing: the key must come back on its own, at once
    # (before, it came back only when the session's state next changed).
    after = wait_until(lambda: redis_hash(r2, key), "the idle session's key in the restarted "
                       "Redis within 5 s of reconnecting", 5, 0.1)
    check(after == before, "the key came back different:\n before %r\n after  %r", before, after)
    ttl = int(r2.command("TTL", key).lstrip(b":"))
    check(ttl > 0, "the key came back without a TTL (%d)", ttl)
    check(r2.command("SISMEMBER", "imapfresh:{alice}:sessions", sid) == b":1",
          "%s not back in the user's sessions set", sid)
    wait_until(lambda: r2.command("HEXISTS", "imapfresh:instances", inst) == b":1",
               "the instances registry entry back (before its 10 s refresh)", 5, 0.1)
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(r2.port), "--raw", "HGET",
                          "imapfresh:instances", inst], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, timeout=10).stdout.decode()
    check(out.startswith("%s:%d\t" % (HOST, p.admin_port)),
          "registry entry %r does not name the admin endpoint %s:%d", out, HOST, p.admin_port)
    still_healthy(a, "a5")
    alive(p)


@test("fault: slow Redis (DEBUG SLEEP 2 while sessions run): no command waits for it",
      timeout=60, proxy_only=True)
def t_redis_slow(ctx):
    r = own_redis(ctx, "redis-slow", ["--enable-debug-command", "yes"])
    p = ctx.proxy("redis-slow", [("state", r.url), ("instance_id", "fault-slow")])
    a, _ = ctx.session("alice", p.tls_port)
    mb = ctx.mailbox(a)
    a.expect_ok("a1", "SELECT " + mb)
    append(a, "a2", mb, message("before the sleep"))
    b = healthy(ctx, p.tls_port, "alice")
    b.expect_ok("b0", "SELECT " + mb)
    wait_until(lambda: redis_keys(r, "imapfresh:{alice}:session:*"), "session keys in Redis")
    slept = []

    def sleep():
        slept.append(r.command("DEBUG", "SLEEP", "2"))
        slept.append(time.monotonic())
    th = threading.Thread(target=sleep, daemon=True)
    th.start()
    time.sleep(0.2)     # Redis is asleep now
    # A change (HINCRBY + PUBLISH queued), a trigger on the other session
    # (resync from the local generation), logins and selects.
    append(a, "a3", mb, message("while redis sleeps"))
    timed(b, "b1", "FETCH 1:* (UID)", 1.5)
    timed(a, "a4", "NOOP", 1.5)
    c, _ = ctx.session("bob", p.tls_port)
    timed(c, "c1", "SELECT INBOX", 1.5)
    done = time.monotonic()
    th.join(10)
    check(slept and slept[0] == b"+OK", "DEBUG SLEEP answered %r", slept)
    check(done < slept[1], "the commands completed only after Redis woke up")
    _, untagged, _ = b.expect_ok("b2", "FETCH 1:* (UID)")
    uids = re.findall(rb"UID (\d+)", b"".join(untagged))
    check(len(uids) == 2, "the other session sees %d messages, expected 2: %r", len(uids), untagged)
    alive(p)


# ================================================= upstream dies mid-literal

@test("fault: upstream dies in the middle of a large FETCH literal: client connection ends with no byte after the 5 MB, "
      "others unaffected", timeout=60, proxy_only=True)
def t_upstream_dies_mid_fetch(ctx):
    size = 50 * MB
    chunk = bytes(random.Random(1).randbytes(MB)).replace(b"\r", b"x").replace(b"\n", b"y")

    def fetch(fc, tag, raw):
        if fc.user != "victim":
            return fake._default(fc, tag, b"FETCH", raw)
        fc.send(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % size)
        for _ in range(5):          # 5 MB of 50, then the server dies
            fc.send(chunk)
        return False
    fake = FakeUpstream({"FETCH": fetch})
    p = fake_proxy(ctx, "up-die-fetch", fake)
    h = fake_login(ctx, p, "healthy")
    h.expect_ok("h1", "SELECT INBOX")
    v = fake_login(ctx, p, "victim")
    v.expect_ok("v1", "SELECT INBOX")
    watch = RssWatch(p.proc.pid)
    v.send(b"v2 FETCH 1 (BODY[])\r\n")
    t0 = time.monotonic()
    data = read_all_until_eof(v, 15)
    grew = watch.stop()
    check(time.monotonic() - t0 < 12, "the client was not disconnected")
    head = b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % size
    check(data.startswith(head), "client got %r", data[:80])
    body = data[len(head):]
    check(body[:5 * MB] == (chunk * 5)[:len(body[:5 * MB])], "literal bytes differ from the upstream's")
    check(len(body) >= 5 * MB, "client got only %d of the 5 MB the upstream sent", len(body))
    # Inside a literal any byte is payload: a BYE there would become part of the message.
    check(len(body) == 5 * MB, "after the truncated literal the client got %r",
          body[5 * MB:][:120])
    check(grew < rss_limit_kb(p.proc), "imapfresh RSS grew by %d KiB", grew)
    alive(p)
    h.expect_ok("h2", "NOOP")
    h.expect_ok("h3", "FETCH 1 (FLAGS)")


@test("fault: upstream dies in the middle of a response line: the line is ended, then * BYE",
      timeout=60, proxy_only=True)
def t_upstream_dies_mid_line(ctx):
    def fetch(fc, tag, raw):
        if fc.user != "victim":
            return fake._default(fc, tag, b"FETCH", raw)
        fc.send(b"* 1 FETCH (UID 1 FLAGS (\\Seen")
        return False
    fake = FakeUpstream({"FETCH": fetch})
    p = fake_proxy(ctx, "up-die-line", fake)
    h = fake_login(ctx, p, "healthy")
    v = fake_login(ctx, p, "victim")
    v.expect_ok("v1", "SELECT INBOX")
    v.send(b"v2 FETCH 1 (FLAGS)\r\n")
    data = read_all_until_eof(v, 15)
    check(data.startswith(b"* 1 FETCH (UID 1 FLAGS (\\Seen\r\n* BYE "),
          "client got %r", data[:200])
    alive(p)
    h.expect_ok("h1", "SELECT INBOX")


@test("fault: upstream dies in the middle of an APPEND literal: client gets * BYE, others "
      "unaffected", timeout=60, proxy_only=True)
def t_upstream_dies_mid_append(ctx):
    got = {}

    def die(fc, size, nonsync):
        if fc.user != "victim":
            return True
        if not nonsync:
            fc.send(b"+ go ahead\r\n")
        got["bytes"] = fc.read_exact(size // 2)
        return False                # and the connection is closed
    fake = FakeUpstream(on_literal=die)
    p = fake_proxy(ctx, "up-die-append", fake)
    h = fake_login(ctx, p, "healthy")
    v = fake_login(ctx, p, "victim")
    msg = message("dies mid-append", b"z" * 400000 + b"\r\n")
    v.send(b"v1 APPEND INBOX {%d}\r\n" % len(msg))
    v.wait_continuation()
    v.send(msg[:len(msg) // 2 + 1000])      # a little more than the upstream reads
    data = read_all_until_eof(v, 10)
    check(re.search(rb"(^|\n)\* BYE", data), "no * BYE after the upstream died: %r", data[:200])
    check(got.get("bytes") == msg[:len(msg) // 2], "the upstream got other bytes than the client sent")
    alive(p)
    h.expect_ok("h1", "SELECT INBOX")
    append(h, "h2", "INBOX", message("healthy append"))


# ============================================= upstream that misbehaves early

@test("fault: upstream accepts but never greets: * BYE after timeout_connect=1s", timeout=40,
      proxy_only=True)
def t_upstream_never_greets(ctx):
    silent = threading.Event()

    def greet(fc):
        silent.wait(30)             # say nothing; the proxy must give up
        return False
    fake = FakeUpstream(greet=greet)
    ctx.closers.append(silent.set)
    p = fake_proxy(ctx, "up-silent", fake, [("timeout_connect", "1s")])
    t0 = time.monotonic()
    c = ctx.raw_plain(p.port)
    data = read_all_until_eof(c, 10)
    dt = time.monotonic() - t0
    check(re.match(rb"\* BYE \[UNAVAILABLE\]", data), "client got %r", data[:200])
    check(dt < 5, "BYE came after %.1fs with timeout_connect=1s", dt)
    c2 = ctx.raw_tls(p.tls_port)
    data = read_all_until_eof(c2, 10)
    check(re.match(rb"\* BYE \[UNAVAILABLE\]", data), "TLS client got %r", data[:200])
    alive(p)


@test("fault: clients sending 64 MB before the upstream has greeted are read only up to the "
      "input cap: memory bounded, their writes block", timeout=60, proxy_only=True)
def t_client_floods_before_greeting(ctx):
    # Nothing takes the client's input before the greeting: only the input
    # cap (relay_input_cap) stops the proxy reading it.
    silent = threading.Event()

    def greet(fc):
        silent.wait(30)
        return False
    fake = FakeUpstream(greet=greet)
    ctx.closers.append(silent.set)
    p = fake_proxy(ctx, "flood-early", fake, [("timeout_connect", "30s")])
    watch = RssWatch(p.proc.pid)
    block = b"a NOOP\r\n" * (MB // 8)
    done = {}

    def flood(name, conn):
        conn.sock.settimeout(None)  # block until the proxy reads, or the test closes it
        try:
            for _ in range(64):
                conn.sock.sendall(block)
            done[name] = "all 64 MB"
        except OSError as e:
            done[name] = str(e)
    for name, conn in (("plain", ctx.raw_plain(p.port)), ("tls", ctx.raw_tls(p.tls_port))):
        threading.Thread(target=flood, args=(name, conn), daemon=True).start()
    time.sleep(3)
    grew = watch.stop()
    check(grew < rss_limit_kb(p.proc), "imapfresh RSS grew by %d KiB", grew)
    check(not done, "a client's 64 MB went through before any greeting: %s", done)
    alive(p)


@test("fault: upstream sends garbage (NUL, TLS bytes, bare CR) at the greeting and after login: "
      "* BYE", timeout=60, proxy_only=True)
def t_upstream_garbage(ctx):
    junk = {
        "nul": b"* OK hello\x00world\r\n",
        "tls": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n",
        "cr": b"* OK bare\rCR\r\n",
    }
    mode = {}

    def greet(fc):
        which = mode.get("greet")
        if which:
            fc.send(junk[which])
            time.sleep(2)
            return False
        fc.send(b"* OK [CAPABILITY " + FakeUpstream.CAPS + b"] fake upstream ready\r\n")

    def select(fc, tag, raw):
        fc.send(junk[fc.user])
        time.sleep(2)
        return False
    fake = FakeUpstream({"SELECT": select}, greet=greet)
    p = fake_proxy(ctx, "up-garbage", fake)
    h = fake_login(ctx, p, "healthy")
    for which in junk:
        mode["greet"] = which
        c = ctx.raw_plain(p.port)
        data = read_all_until_eof(c, 10)
        # Whatever part of the greeting went out, the BYE must start a line
        # of its own, or the client never sees it as a BYE.
        check(re.search(rb"(^|\r\n)\* BYE \[UNAVAILABLE\]", data), "greeting %s: client got %r "
              "(the BYE is not a line of its own)", which, data[:200])
        mode["greet"] = None
        c = fake_login(ctx, p, which)
        c.send(b"s1 SELECT INBOX\r\n")
        data = read_all_until_eof(c, 10)
        check(re.search(rb"(^|\r\n)\* BYE", data), "%s after login: client got %r", which,
              data[:200])
        check(b"\x00" not in data, "%s: NUL reached the client: %r", which, data[:200])
        alive(p)
    h.expect_ok("h1", "NOOP")


@test("fault: upstream sends a 1 GB line (greeting, and after login): * BYE, memory bounded",
      timeout=120, proxy_only=True)
def t_upstream_huge_line(ctx):
    chunk = b"x" * MB
    sent = {}

    def flood(fc, prefix):
        n = 0
        try:
            fc.send(prefix)
            while n < 1024:         # 1 GB, streamed from one 1 MB buffer
                fc.send(chunk)
                n += 1
        except OSError:
            pass
        sent[fc.user or "greeting"] = n

    def greet(fc):
        if not sent.get("login-phase"):
            flood(fc, b"* OK ")
            return False
        fc.send(b"* OK [CAPABILITY " + FakeUpstream.CAPS + b"] ready\r\n")

    def select(fc, tag, raw):
        flood(fc, b"* 1 FETCH (X-HUGE ")
        return False
    fake = FakeUpstream({"SELECT": select}, greet=greet)
    p = fake_proxy(ctx, "up-huge", fake)
    limit = rss_limit_kb(p.proc)
    watch = RssWatch(p.proc.pid)
    c = ctx.raw_plain(p.port)
    data = read_all_until_eof(c, 60)
    check(re.match(rb"\* BYE \[UNAVAILABLE\]", data), "greeting flood: client got %r", data[:200])
    sent["login-phase"] = True
    h = fake_login(ctx, p, "healthy")
    c = fake_login(ctx, p, "flood")
    c.send(b"s1 SELECT INBOX\r\n")
    data = read_all_until_eof(c, 60)
    grew = watch.stop()
    check(b"* BYE" in data[-300:], "flood after login: client got %r ... %r", data[:100],
          data[-200:])
    if not re.search(rb"(^|\n)\* BYE", data[-300:]):
        tap.diag("note: the BYE was glued to the half-sent response line: %r" % data[-160:])
    check(grew < limit, "imapfresh RSS grew by %d KiB (limit %d)", grew, limit)
    tap.diag("1 GB line: upstream got %s MB out before imapfresh hung up; RSS +%d KiB"
             % (sent, grew))
    alive(p)
    h.expect_ok("h1", "NOOP")


@test("fault: upstream answers the resync's UID SEARCH with 1:4294967295: the proxy does not "
      "freeze, other sessions are served", timeout=90, proxy_only=True)
def t_upstream_huge_search(ctx):
    def search(fc, tag, raw):
        if fc.user == "victim" and b"ALL" in raw.upper():
            fc.send(b'* ESEARCH (TAG "%s") UID ALL 1:4294967295\r\n%s OK Search completed\r\n'
                    % (tag, tag))
        else:
            fc.send(b"* SEARCH 1\r\n" + tag + b" OK Search completed\r\n")
    fake = FakeUpstream({"UID SEARCH": search})
    p = fake_proxy(ctx, "up-huge-search", fake)
    h = fake_login(ctx, p, "healthy")
    h.expect_ok("h1", "SELECT INBOX")
    a = fake_login(ctx, p, "victim")
    a.expect_ok("a1", "SELECT INBOX")
    b = fake_login(ctx, p, "victim")
    # b changes a's mailbox: a's next FETCH is held for a resync, whose
    # UID SEARCH ALL gets the huge answer.
    b.send(b"b1 APPEND INBOX {5}\r\n")
    b.wait_continuation()
    b.send(b"hello\r\n")
    status(b.wait_tagged("b1")[0], "OK")
    a.send(b"a2 FETCH 1:* (UID)\r\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    slow = None
    try:
        h.settimeout(5)
        h.expect_ok("h2", "NOOP")
    except ProtocolError:
        slow = time.monotonic() - t0
    dt = time.monotonic() - t0
    check(slow is None and dt < 2, "while one session's resync digested 1:4294967295, another "
          "session's NOOP was not answered for %.1fs: the event loop is busy with a loop over "
          "every UID of the range (resync.c resync_apply / track.c VANISHED)%s",
          dt, p.log_tail(5))
    alive(p)


@test("fault: upstream sends * 4294967295 EXISTS then * VANISHED 1:4294967295: the proxy does "
      "not freeze, other sessions are served", timeout=90, proxy_only=True)
def t_upstream_huge_vanished(ctx):
    def noop(fc, tag, raw):
        if fc.user == "victim":
            fc.send(b"* 4294967295 EXISTS\r\n* VANISHED 1:4294967295\r\n")
        fc.send(tag + b" OK NOOP completed\r\n")
    fake = FakeUpstream({"NOOP": noop})
    p = fake_proxy(ctx, "up-huge-vanished", fake)
    h = fake_login(ctx, p, "healthy")
    h.expect_ok("h1", "SELECT INBOX")
    v = fake_login(ctx, p, "victim")
    v.expect_ok("v1", "SELECT INBOX")
    v.send(b"v2 NOOP\r\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        h.settimeout(5)
        h.expect_ok("h2", "NOOP")
    except ProtocolError:
        pass
    dt = time.monotonic() - t0
    check(dt < 2, "after one upstream session said EXISTS 4294967295 and VANISHED 1:4294967295, "
          "another session's NOOP was not answered for %.1fs: track.c walks the VANISHED range "
          "UID by UID when it is not larger than 4 x the view (the view's count came from the "
          "same server)", dt)
    alive(p)


@test("fault: a QRESYNC VANISHED range wider than the UIDs it removes (8:81 on UIDs 3..15): "
      "the view stays right, no needless re-SELECT", timeout=60, proxy_only=True)
def t_vanished_wide_range(ctx):
    uids = list(range(3, 17, 2))                 # 7 messages: UIDs 3, 5, ... 15
    state = {"left": uids}

    def select(fc, tag, raw):
        fc.selects = getattr(fc, "selects", 0) + 1
        fc.send(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 82] ok\r\n"
                b"%s OK [READ-WRITE] Selected\r\n" % (len(state["left"]), tag))

    def fetch(fc, tag, raw):
        out = b"".join(b"* %d FETCH (UID %d)\r\n" % (i + 1, u) for i, u in enumerate(state["left"]))
        fc.send(out + tag + b" OK Fetch completed\r\n")

    def noop(fc, tag, raw):
        if fc.user == "wide" and state["left"] == uids:
            state["left"] = [u for u in uids if not 8 <= u <= 81]
            fc.send(b"* VANISHED 8:81\r\n")          # UIDs 9, 11, 13, 15 (and others never there)
        fc.send(tag + b" OK NOOP completed\r\n")

    def search(fc, tag, raw):
        fc.send(b"* SEARCH " + b" ".join(b"%d" % u for u in state["left"]) + b"\r\n" + tag
                + b" OK Search completed\r\n")
    fake = FakeUpstream({"SELECT": select, "FETCH": fetch, "UID FETCH": fetch, "NOOP": noop,
                         "UID SEARCH": search})
    p = fake_proxy(ctx, "vanished-wide", fake)
    c = fake_login(ctx, p, "wide")
    c.expect_ok("s", "SELECT INBOX")
    c.expect_ok("f", "FETCH 1:7 (UID)")          # every position's UID is known now
    _, untagged, _ = c.expect_ok("n", "NOOP")
    check(untagged == [b"* VANISHED 8:81\r\n"], "NOOP answered %r", untagged)
    other = fake_login(ctx, p, "wide")
    other.send(b"a APPEND INBOX {5}\r\n")       # bumps the mailbox: c's next FETCH resyncs
    other.wait_continuation()
    other.send(b"hello\r\n")
    status(other.wait_tagged("a")[0], "OK")
    mark = os.path.getsize(p.log)
    _, untagged, _ = c.expect_ok("f2", "FETCH 1:* (UID)")
    logged = _log_since(p.log, mark)
    selects = [fc.selects for fc in fake.conns if getattr(fc, "selects", 0)]
    check("stale session detected" not in logged and max(selects) == 1,
          "a VANISHED range covering UIDs the mailbox never had made imapfresh think the view "
          "was empty: it re-SELECTed (%d SELECTs upstream) and told the client %r; log: %s",
          max(selects), [l for l in untagged if b"EXISTS" in l], logged.strip()[-400:])
    alive(p)


@test("fault: a client that never reads while the upstream sends 200 MB: memory bounded by the "
      "watermarks, then every byte arrives intact", timeout=180, proxy_only=True)
def t_client_never_reads(ctx):
    size = 200 * MB
    block = random.Random(200).randbytes(MB)

    def fetch(fc, tag, raw):
        if fc.user != "reader":
            return fake._default(fc, tag, b"FETCH", raw)
        fc.send(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % size)
        for _ in range(size // MB):
            fc.send(block)
        fc.send(b")\r\n" + tag + b" OK Fetch completed\r\n")
    fake = FakeUpstream({"FETCH": fetch})
    p = fake_proxy(ctx, "up-200mb", fake)
    h = fake_login(ctx, p, "healthy")
    c = fake_login(ctx, p, "reader", tls=False)
    c.expect_ok("s", "SELECT INBOX")
    watch = RssWatch(p.proc.pid)
    c.send(b"f1 FETCH 1 (BODY[])\r\n")
    time.sleep(4)                    # not reading: the proxy must stop reading too
    h.expect_ok("h1", "NOOP")       # other sessions are served meanwhile
    h.expect_ok("h2", "FETCH 1 (FLAGS)")
    paused_growth = watch.growth()
    # Now read it all, hashing as it comes.
    head = c.readline()
    check(head == b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % size, "head %r", head[:100])
    sha = hashlib.sha256()
    left = size
    c.settimeout(30)
    while left > 0:
        if not c.buf:
            c._fill()
        take = c.buf[:left]
        c.buf = c.buf[len(take):]
        sha.update(take)
        left -= len(take)
        c.transcript.clear()
    tail = c.readline()
    check(tail == b")\r\n", "after the literal: %r", tail)
    tagged, _, _ = c.wait_tagged("f1")
    status(tagged, "OK")
    grew = watch.stop()
    want = hashlib.sha256()
    for _ in range(size // MB):
        want.update(block)
    check(sha.digest() == want.digest(), "the 200 MB literal arrived altered")
    limit = rss_limit_kb(p.proc)
    tap.diag("200 MB to a non-reading client: RSS +%d KiB while paused, +%d KiB peak"
             % (paused_growth, grew))
    check(paused_growth < limit, "RSS grew by %d KiB while the client did not read", paused_growth)
    check(grew < limit, "RSS grew by %d KiB", grew)
    alive(p)


# ===================================================== clients that go away

def client_hello_bytes():
    """The first flight of a real TLS client (a ClientHello)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


@test("fault: clients gone mid-literal, mid-TLS-handshake and mid-IDLE: imapfresh and other "
      "sessions unaffected; the half APPEND stores nothing", timeout=90, proxy_only=True)
def t_clients_vanish(ctx):
    h = healthy(ctx)
    c, _ = ctx.session("alice")
    mb = ctx.mailbox(c)
    # 1. Mid-literal: half of an APPEND payload, then gone.
    c.send(b"a1 APPEND %s {100000}\r\n" % mb.encode())
    c.wait_continuation()
    c.send(b"q" * 50000)
    c.close()
    # 2. Mid-TLS handshake: nothing, part of a ClientHello, a whole one.
    hello = client_hello_bytes()
    for piece in (b"", hello[:7], hello[:len(hello) // 2], hello):
        s = socket.create_connection((HOST, ctx.tls_port), timeout=TIMEOUT)
        if piece:
            s.sendall(piece)
        time.sleep(0.05)
        s.close()
    # A reset instead of a close, in the middle of the handshake.
    s = socket.create_connection((HOST, ctx.tls_port), timeout=TIMEOUT)
    s.sendall(hello[:20])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    # 3. Mid-IDLE.
    i, _ = ctx.session("alice")
    i.expect_ok("i0", "SELECT " + mb)
    i.send(b"i1 IDLE\r\n")
    i.wait_continuation()
    i.close()
    time.sleep(0.5)
    still_healthy(h, "h1")
    d, _ = ctx.session("alice")
    _, untagged, _ = d.expect_ok("d1", "STATUS %s (MESSAGES)" % mb)
    check(b"MESSAGES 0" in b"".join(untagged), "the abandoned APPEND stored something: %r",
          untagged)
    # The mailbox the idler had selected is usable by others.
    append(d, "d2", mb, message("after the idler left"))


@test("fault: slowloris before login (a byte every 0.3 s) is cut off by timeout_preauth=1s",
      timeout=40, proxy_only=True)
def t_slowloris(ctx):
    p = ctx.proxy("slowloris", [("timeout_preauth", "1s")])
    h = healthy(ctx, p.tls_port)
    c = ctx.raw_plain(p.port)
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting %r", g)
    t0 = time.monotonic()
    closed = False
    line = b"a NOOP " + b"x" * 200
    for n, ch in enumerate(line):
        try:
            c.sock.sendall(bytes([ch]))
        except OSError:
            closed = True
            break
        c.sock.settimeout(0.3)
        try:
            got = c.sock.recv(4096)
            if not got or b"BYE" in got:
                closed = True
                break
        except socket.timeout:
            pass
        except OSError:
            closed = True
            break
        if time.monotonic() - t0 > 10:
            break
    dt = time.monotonic() - t0
    check(closed, "a client trickling one byte every 0.3 s before login was still connected "
          "after %.1fs with timeout_preauth=1s (%d bytes sent): the pre-auth timeout is an "
          "inactivity timeout, so a slowloris holds the connection (and a max_clients slot) "
          "for as long as it likes", dt, n + 1)
    still_healthy(h)
    alive(p)


@test("fault: a logged-in client silent for timeout_idle=1s gets * BYE and is closed; a TLS "
      "client that never starts its handshake is closed after timeout_tls_handshake=1s",
      timeout=40, proxy_only=True)
def t_idle_and_handshake_timeouts(ctx):
    p = ctx.proxy("timeouts", [("timeout_idle", "1s"), ("timeout_tls_handshake", "1s")])
    c, _ = ctx.session("alice", p.tls_port)
    c.settimeout(10)
    t0 = time.monotonic()
    lines = []
    try:
        while True:
            lines.append(c.readline())
    except (EOFError, OSError):
        pass
    dt = time.monotonic() - t0
    check(any(l.startswith(b"* BYE") for l in lines) and dt >= 0.5,
          "an idle logged-in session with timeout_idle=1s: after %.1fs got %r (want * BYE after "
          "about a second, then the connection closed)", dt, lines)
    raw = socket.create_connection(("127.0.0.1", p.tls_port))
    raw.settimeout(10)
    t0 = time.monotonic()
    try:
        got = raw.recv(4096)
    except OSError:
        got = b""
    dt = time.monotonic() - t0
    raw.close()
    check(got == b"" and dt >= 0.5,
          "a TLS client that sent nothing: after %.1fs recv gave %r (want the proxy to close the "
          "connection after timeout_tls_handshake=1s)", dt, got)
    alive(p)


@test("fault: a 100 MB line without CRLF is refused at max_line (BAD [TOOBIG]) with memory "
      "bounded; the session goes on", timeout=120, proxy_only=True)
def t_100mb_line(ctx):
    p = ctx.proxy("hugeline")
    h = healthy(ctx, p.tls_port)
    c = ctx.raw_plain(p.port)
    c.readline()
    watch = RssWatch(p.proc.pid)
    c.send(b"a1 NOOP ")
    piece = b"y" * MB
    first_bad = None
    for i in range(100):
        c.sock.sendall(piece)
        if first_bad is None and i == 1:
            c.sock.settimeout(0.5)      # is the BAD sent before the line ends?
            try:
                first_bad = c.sock.recv(4096)
            except socket.timeout:
                first_bad = b""
            c.sock.settimeout(TIMEOUT)
            c.buf += first_bad
    c.send(b"\r\n")
    tagged, _, _ = c.wait_tagged("a1")
    grew = watch.stop()
    status(tagged, "BAD")
    check(b"[TOOBIG]" in tagged.upper(), "no [TOOBIG]: %r", tagged)
    c.expect_ok("a2", "NOOP")
    tap.diag("100 MB line: BAD %s; RSS +%d KiB" % (
        "sent before the line ended" if first_bad else "sent at the CRLF", grew))
    check(grew < rss_limit_kb(p.proc), "imapfresh RSS grew by %d KiB", grew)
    still_healthy(h)
    alive(p)


def _pipeline(c, n, kinds, ordered):
    """Send n commands in one write (from a thread: replies are read while
    it sends); returns the tagged replies' tags in arrival order."""
    batch = b"".join(b"p%d %s\r\n" % (i, kinds[i % len(kinds)]) for i in range(n))
    sender = threading.Thread(target=lambda: c.sock.sendall(batch), daemon=True)
    sender.start()
    tags = []
    while len(tags) < n:
        line, _ = c.read_response()
        if line.startswith(b"*"):
            continue
        tag, st = line.split(b" ", 2)[:2]
        check(st == b"OK", "reply %d: %r", len(tags), line[:100])
        if ordered:
            check(tag == b"p%d" % len(tags), "reply %d is for %r: out of order", len(tags), tag)
        tags.append(tag)
        if len(tags) % 500 == 0:
            c.transcript.clear()
    sender.join(10)
    return tags


@test("fault: 10,000 pipelined commands in one write: all answered once, in order", timeout=180,
      proxy_only=True)
def t_10k_pipelined(ctx):
    n = 10000
    # Plaintext: one thread writes while another reads (an SSL socket must
    # not be used from two threads at once).
    p = ctx.proxy("pipeline10k", [("require_tls", "no")])
    c = ctx.raw_plain(p.port, timeout=60)
    c.readline()
    c.login("carol", USERS["carol"])
    mb = ctx.mailbox(c)
    append(c, "a0", mb, message("pipelined"))
    c.expect_ok("s0", "SELECT " + mb)
    # Dovecot runs some pipelined commands side by side (RFC 9051 5.5), so
    # through it: each answered exactly once.
    tags = _pipeline(c, n, [b"NOOP", b"FETCH 1 (FLAGS)", b"UID FETCH 1:* (UID)", b"CHECK"], False)
    check(sorted(tags) == sorted(b"p%d" % i for i in range(n)), "tags answered: %d distinct of %d",
          len(set(tags)), n)
    c.expect_ok("z", "NOOP")
    # A server that answers strictly in order: the proxy must keep that order.
    fake = FakeUpstream()
    q = fake_proxy(ctx, "pipeline10k-fake", fake)
    f = ctx.raw_plain(q.port, timeout=60)
    f.readline()
    f.expect_ok("L", "LOGIN orderly x")
    f.expect_ok("S", "SELECT INBOX")
    _pipeline(f, n, [b"NOOP", b"FETCH 1 (FLAGS)", b"UID FETCH 1:* (UID)", b"CHECK"], True)
    f.expect_ok("z", "NOOP")


@test("fault: max_clients=3 reached: the 4th client gets * BYE [UNAVAILABLE], the others go on",
      timeout=60, proxy_only=True)
def t_max_clients(ctx):
    p = ctx.proxy("maxclients", [("max_clients", "3")])
    sessions = [ctx.session(u, p.tls_port)[0] for u in ("alice", "bob", "carol")]
    for proto in ("plain", "tls"):
        c = ctx.raw_plain(p.port) if proto == "plain" else ctx.raw_tls(p.tls_port)
        data = read_all_until_eof(c, 10)
        check(re.match(rb"\* BYE \[UNAVAILABLE\]", data), "%s client over max_clients got %r",
              proto, data[:200])
    for i, s in enumerate(sessions):
        s.expect_ok("m%d" % i, "SELECT INBOX")
    sessions[0].expect_ok("lo", "LOGOUT")
    sessions[0].close()
    time.sleep(0.3)
    c, _ = wait_until(lambda: _try_session(ctx, p), "a free slot after one client left", 5, 0.2)
    c.expect_ok("n1", "NOOP")
    alive(p)


def _try_session(ctx, p):
    try:
        return ctx.session("alice", p.tls_port)
    except (ProtocolError, EOFError, OSError, AssertionError):
        return None


class LimitedImapfresh(servers.Imapfresh):
    """imapfresh under prlimit --nofile."""

    def __init__(self, *a, nofile=64, **kw):
        super().__init__(*a, **kw)
        self.nofile = nofile

    def argv(self):
        return ["prlimit", "--nofile=%d:%d" % (self.nofile, self.nofile), "--"] + super().argv()


@test("fault: file descriptors exhausted (prlimit --nofile=64): existing sessions go on, "
      "service recovers once clients leave", timeout=90, proxy_only=True)
def t_fd_exhaustion(ctx):
    if not shutil.which("prlimit"):
        raise tap.Skip("prlimit not installed")
    env = ctx.env
    p = LimitedImapfresh(env.binary, os.path.join(env.tmp, "proxy"),
                         "%s:%d" % (HOST, env.dovecot.port), env.dovecot.certs["cert"],
                         env.dovecot.certs["key"], name="nofile-%x" % random.getrandbits(24))
    ctx.proxies.append(p)
    p.start()
    h = healthy(ctx, p.tls_port)
    socks, greeted, bye = [], 0, 0
    for i in range(100):            # far more than 64 descriptors' worth
        try:
            s = socket.create_connection((HOST, p.port), timeout=5)
        except OSError:
            break
        socks.append(s)
    ctx.closers.append(lambda: [s.close() for s in socks])
    time.sleep(1.5)
    readable, _, _ = select.select(socks, [], [], 0.5)
    for s in readable:
        try:
            d = s.recv(4096)
        except OSError:
            continue
        greeted += d.startswith(b"* OK")
        bye += d.startswith(b"* BYE")
    tap.diag("%d connections: %d greeted, %d got * BYE, %d waiting"
             % (len(socks), greeted, bye, len(socks) - greeted - bye))
    alive(p)
    still_healthy(h, "h1")
    for s in socks:
        s.close()
    socks.clear()
    c, _ = wait_until(lambda: _try_session(ctx, p), "service after the clients left", 15, 0.3)
    c.expect_ok("r1", "SELECT INBOX")
    still_healthy(h, "h2")
    alive(p)


@test("fault: SIGHUP with a broken certificate: old one kept, error logged, TLS still works",
      timeout=60, proxy_only=True)
def t_sighup_broken_cert(ctx):
    env = ctx.env
    d = os.path.join(env.tmp, "proxy", "cert-%x" % random.getrandbits(24))
    os.makedirs(d)
    cert, key = os.path.join(d, "server.crt"), os.path.join(d, "server.key")
    shutil.copy(env.dovecot.certs["cert"], cert)
    shutil.copy(env.dovecot.certs["key"], key)
    p = servers.Imapfresh(env.binary, os.path.join(env.tmp, "proxy"),
                          "%s:%d" % (HOST, env.dovecot.port), cert, key,
                          name="badcert-%x" % random.getrandbits(24))
    ctx.proxies.append(p)
    p.start()
    h = healthy(ctx, p.tls_port)
    before = ssl.DER_cert_to_PEM_cert(h.sock.getpeercert(True))
    for what, breaker in (("garbage certificate", lambda: open(cert, "w").write("not a PEM\n")),
                          ("missing key", lambda: os.unlink(key))):
        mark = os.path.getsize(p.log)
        breaker()
        p.signal(signal.SIGHUP)
        logged = wait_until(lambda: _log_since(p.log, mark), "a log line after SIGHUP", 5)
        time.sleep(0.3)
        logged = _log_since(p.log, mark)
        check(re.search(r"(?i)(error|fail|cannot|unable|invalid)", logged),
              "%s: no error logged on reload: %r", what, logged[-500:])
        alive(p)
        c, _ = ctx.session("alice", p.tls_port)
        check(ssl.DER_cert_to_PEM_cert(c.sock.getpeercert(True)) == before,
              "%s: the new session got a different certificate", what)
        c.expect_ok("s1", "SELECT INBOX")
        still_healthy(h, "h" + what[0])
        c3 = ctx.raw_plain(p.port)
        check(c3.readline().startswith(b"* OK"), "plaintext listener after the failed reload")


def _log_since(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


# ============================================================ byte integrity

def eight_bit_message(i):
    rnd = random.Random(80 + i)
    body = b""
    for _ in range(60):
        line = bytes(rnd.randrange(0x20, 0x100) for _ in range(rnd.randrange(1, 200)))
        body += line.replace(b"\x7f", b"~") + b"\r\n"
    return message("8bit %d \xe9t\xe9" % i, body)


def binary_message():
    return (b"From: alice@example.org\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            + bytes(range(256)) * 8 + b"\r\n")


def literal_append(conn, tag, mb, msgs, binary=False):
    """APPEND (MULTIAPPEND when several) with synchronizing literals."""
    pre = b"~" if binary else b""
    conn.send(b"%s APPEND %s %s{%d}\r\n" % (tag.encode(), mb.encode(), pre, len(msgs[0])))
    for i, m in enumerate(msgs):
        conn.wait_continuation()
        nxt = b" %s{%d}\r\n" % (pre, len(msgs[i + 1])) if i + 1 < len(msgs) else b"\r\n"
        conn.send(m + nxt)
    tagged, _, _ = conn.wait_tagged(tag)
    return status(tagged, "OK")


def fetch_all(conn, tag, item="BODY.PEEK[]"):
    _, untagged, lits = conn.expect_ok(tag, "FETCH 1:* (UID %s)" % item)
    return lits


def _integrity(ctx, mk, label):
    a = mk()
    b = mk()
    mb = ctx.mailbox(a, "I")
    src = ctx.mailbox(a, "J")
    caps = capability_list(a)
    msgs = [eight_bit_message(i) for i in range(3)]
    literal_append(a, "a1", mb, msgs[:1])
    literal_append(a, "a2", mb, msgs[1:])                               # MULTIAPPEND, 2
    many = [message("multi %d" % i, b"part %d\r\n" % i * (i + 1)) for i in range(40)]
    literal_append(a, "a3", mb, many)                                   # MULTIAPPEND, 40
    huge = servers_big(8 * MB)
    a.send(b"a4 APPEND %s {%d+}\r\n" % (mb.encode(), len(huge)))       # LITERAL+, 8 MB
    a.send(huge + b"\r\n")
    status(a.wait_tagged("a4")[0], "OK")
    expected = msgs + many + [huge]
    if "BINARY" in caps:
        literal_append(a, "a5", mb, [binary_message()], binary=True)
        expected.append(binary_message())
    else:
        tap.diag("%s: Dovecot does not offer BINARY; literal8 APPEND skipped" % label)
    a.expect_ok("a6", "SELECT " + mb)
    got = fetch_all(a, "a7", "BINARY.PEEK[]" if "BINARY" in caps else "BODY.PEEK[]")
    check(len(got) == len(expected), "%s: %d messages fetched, %d appended", label, len(got),
          len(expected))
    for i, (g, e) in enumerate(zip(got, expected)):
        check(g == e, "%s: message %d differs (%d bytes fetched, %d appended)", label, i + 1,
              len(g), len(e))
    # A resync in the middle: b moves a message into a's selected mailbox,
    # then a's FETCH (a trigger) makes imapfresh check and repair the view.
    moved = eight_bit_message(9)
    literal_append(b, "b1", src, [moved])
    b.expect_ok("b2", "SELECT " + src)
    b.expect_ok("b3", "MOVE 1 " + mb)
    _, untagged, lits = a.expect_ok("a8", "FETCH 1:* (UID BODY.PEEK[])")
    n = len(expected) + 1
    check(any(re.match(rb"\* %d EXISTS" % n, l) for l in untagged) or len(lits) == n,
          "%s: a did not learn of the moved message: %d bodies, untagged %r", label, len(lits),
          [l[:60] for l in untagged if not l.startswith(b"* ") or b"FETCH" not in l][:5])
    got = fetch_all(a, "a9", "BINARY.PEEK[]" if "BINARY" in caps else "BODY.PEEK[]")
    check(got[:len(expected)] == expected, "%s: bodies changed after the resync" % label)
    check(got[-1] == moved, "%s: the moved message differs" % label)


def capability_list(conn):
    _, untagged, _ = conn.expect_ok("cap", "CAPABILITY")
    for l in untagged:
        caps = capabilities(l)
        if caps:
            return caps
    return set()


def servers_big(size):
    rnd = random.Random(size)
    table = bytes(range(256)).replace(b"\x00", b"\x01").replace(b"\r", b"\x0b").replace(b"\n", b"\x0c")
    raw = rnd.randbytes(size).translate(table)
    lines = [raw[i:i + 998] for i in range(0, size, 998)]
    return b"Subject: huge\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"


@test("fault: messages appended (8-bit, literal8 NULs, MULTIAPPEND x40, 8 MB) and fetched stay "
      "byte-identical over TLS, across a resync", timeout=180, proxy_only=True)
def t_integrity_tls(ctx):
    _integrity(ctx, lambda: ctx.session("carol", timeout=30)[0], "TLS")


@test("fault: messages appended and fetched stay byte-identical over plaintext, across a resync",
      timeout=180, proxy_only=True)
def t_integrity_plain(ctx):
    p = ctx.proxy("plain-integrity", [("require_tls", "no")])

    def mk():
        c = ctx.raw_plain(p.port, timeout=30)
        c.readline()
        c.login("carol", USERS["carol"])
        return c
    _integrity(ctx, mk, "plaintext")


# ================================================================== TLS policy

def _tls11_client():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def _tls11_handshake(port):
    """The TLS version negotiated with a client that offers only TLS 1.1, or
    the error the handshake ended with."""
    try:
        with socket.create_connection((HOST, port), timeout=10) as raw:
            with _tls11_client().wrap_socket(raw, server_hostname=HOST) as t:
                return t.version()
    except (ssl.SSLError, OSError) as e:
        return "refused: %s" % e


@test("fault: a client offering only TLS 1.1 is refused (TLS 1.2 minimum); the same client "
      "completes TLS 1.1 with a server that allows it", proxy_only=True)
def t_tls_minimum(ctx):
    # Control: this client really speaks TLS 1.1 when the server allows it.
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(ctx.dovecot.certs["cert"], ctx.dovecot.certs["key"])
    srv_ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    srv_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(1)
    ctx.closers.append(lsock.close)

    def serve():
        try:
            conn, _ = lsock.accept()
            with srv_ctx.wrap_socket(conn, server_side=True) as t:
                t.recv(1)
        except (ssl.SSLError, OSError):
            pass
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    control = _tls11_handshake(lsock.getsockname()[1])
    if control != "TLSv1.1":
        raise tap.Skip("this OpenSSL cannot speak TLS 1.1 at all (%s)" % control)
    got = _tls11_handshake(ctx.tls_port)
    check(got.startswith("refused"), "imapfresh accepted TLS 1.1: %s", got)
    c = ctx.raw_tls()
    check(c.readline().startswith(b"* OK"), "a TLS 1.2+ client is still served")


class _OpenSSL:
    """openssl s_client or s_server in its interactive mode (not -quiet,
    which turns the command letters off): its stdin is sent to the peer, but
    a line "R" (s_client, TLS 1.2) or "r" (s_server) asks for a
    renegotiation instead. Everything it prints is collected."""

    def __init__(self, ctx, argv):
        self.proc = subprocess.Popen(["openssl"] + argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.buf = bytearray()
        ctx.closers.append(self.close)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.buf += chunk

    def send(self, line):
        try:
            self.proc.stdin.write(line + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass            # already gone

    def has(self, what, times=1):
        return bytes(self.buf).count(what) >= times

    def running(self):
        return self.proc.poll() is None

    def after(self, mark):
        """What it printed from mark on (for failure messages)."""
        out = bytes(self.buf)
        return out[max(out.find(mark), 0):][-1500:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def _s_server(ctx, port, extra=()):
    srv = _OpenSSL(ctx, ["s_server", "-accept", "%s:%d" % (HOST, port), "-cert",
                         ctx.dovecot.certs["cert"], "-key", ctx.dovecot.certs["key"]] + list(extra))
    wait_until(lambda: srv.has(b"ACCEPT") or not srv.running(), "openssl s_server listening")
    check(srv.running(), "openssl s_server: %r", bytes(srv.buf))
    return srv


def _client_renegotiates(ctx, port, greeting, answered, connected=None):
    """s_client -tls1_2 to port: after the handshake (then connected() is
    called) and greeting, "R" asks for a renegotiation, then "a NOOP" goes
    out. True when the link still carries data afterwards (answered(client)
    holds, s_client still running); False when s_client gave up. Returns
    (renegotiated, s_client)."""
    c = _OpenSSL(ctx, ["s_client", "-connect", "%s:%d" % (HOST, port), "-tls1_2", "-crlf"])
    wait_until(lambda: c.has(b"Verify return code") or not c.running(), "the TLS handshake")
    if connected:
        connected()
    wait_until(lambda: c.has(greeting) or not c.running(), "the greeting")
    check(c.has(greeting), "no greeting through s_client: %r", bytes(c.buf)[-600:])
    c.send(b"R")
    wait_until(lambda: c.has(b"RENEGOTIATING") or not c.running(), "s_client renegotiating")
    check(c.has(b"RENEGOTIATING"), "s_client did not ask for a renegotiation: %r",
          bytes(c.buf)[-600:])
    time.sleep(0.3)
    c.send(b"a NOOP")
    wait_until(lambda: answered(c) or not c.running(), "s_client to go on or give up", 10)
    renegotiated = answered(c) and c.running()
    c.close()
    return renegotiated, c


@test("fault: a TLS 1.2 client asking imapfresh to renegotiate is refused (no_renegotiation); "
      "imapfresh survives; the same client renegotiates with a server that allows it",
      timeout=60, proxy_only=True)
def t_tls_no_client_renegotiation(ctx):
    if not shutil.which("openssl"):
        raise tap.Skip("no openssl command")
    # Control: s_client's "R" really renegotiates when the server allows it.
    # (OpenSSL 3 servers refuse client-initiated renegotiation by default:
    # this test holds even without SSL_OP_NO_RENEGOTIATION there; the
    # upstream test below is the one that needs it.)
    port = servers.free_port()
    srv = _s_server(ctx, port, ["-client_renegotiation"])
    ok, c = _client_renegotiates(ctx, port, b"* OK control", lambda c: srv.has(b"a NOOP"),
                                 lambda: srv.send(b"* OK control\r"))
    check(ok, "control: s_client did not renegotiate with an openssl s_server that allows it: "
          "%r", c.after(b"RENEGOTIATING"))
    # imapfresh: refused, the NOOP never answered.
    ok, c = _client_renegotiates(ctx, ctx.tls_port, b"* OK", lambda c: c.has(b"a OK"))
    check(not ok and not c.has(b"a OK"), "imapfresh let a client renegotiate TLS: %r",
          c.after(b"RENEGOTIATING"))
    check(c.has(b"no renegotiation"), "s_client did not report a refused renegotiation: %r",
          c.after(b"RENEGOTIATING"))
    alive(ctx.env.proxy)
    h = healthy(ctx, ctx.tls_port)
    still_healthy(h)


def _s_server_session(ctx, port, proxy, greeting):
    """An s_server upstream on port and a client of proxy greeted through it."""
    srv = _s_server(ctx, port, ["-tls1_2"])
    c = ctx.raw_plain(proxy.port)
    wait_until(lambda: srv.has(b"CIPHER is") or not srv.running(), "imapfresh's TLS handshake "
               "with the upstream")
    srv.send(b"* OK " + greeting + b"\r")
    g = c.readline()
    check(g.startswith(b"* OK " + greeting), "greeting %r", g)
    return srv, c


@test("fault: an upstream asking imapfresh to renegotiate TLS is refused (no_renegotiation "
      "alert): the client gets * BYE, imapfresh survives", timeout=60, proxy_only=True)
def t_tls_no_upstream_renegotiation(ctx):
    if not shutil.which("openssl"):
        raise tap.Skip("no openssl command")
    port = servers.free_port()
    p = ctx.proxy("reneg-up", [("upstream_ca", ctx.env.ca), ("upstream_sni", "localhost"),
                               ("require_tls", "no")],
                  upstream="%s:%d" % (HOST, port), upstream_tls="tls")
    # The upstream: s_server, started after the harness's own probes of p.
    srv, c = _s_server_session(ctx, port, p, b"fake upstream")
    srv.send(b"r")          # HelloRequest: the server asks for a renegotiation
    # A refusal (imapfresh's no_renegotiation alert) shows at once; only then
    # (or after 3 s) more data, which a renegotiated link would carry.
    end = time.monotonic() + 3
    while not srv.has(b"no renegotiation") and time.monotonic() < end:
        time.sleep(0.05)
    srv.send(b"* OK still here\r")
    line = c.readline()
    check(not line.startswith(b"* OK still here"), "imapfresh renegotiated TLS with its "
          "upstream: %r", srv.after(b"SSL_do_handshake"))
    check(srv.has(b"no renegotiation"), "the upstream did not see a refused renegotiation: %r",
          srv.after(b"SSL_do_handshake"))
    check(line.startswith(b"* BYE"), "the client got %r, expected * BYE once the upstream "
          "dropped the link", line)
    alive(p)
    # The same imapfresh serves the next client (through a new s_server on
    # the same port: after that error s_server takes no more connections).
    srv.close()
    _s_server_session(ctx, port, p, b"fake upstream again")


# ================================================================== secrets

@test("fault: passwords never reach the debug log, Redis or an admin page (LOGIN, literal, "
      "AUTHENTICATE PLAIN, failed and refused logins)", timeout=120, proxy_only=True)
def t_secrets(ctx):
    tag = "%08x" % random.getrandbits(32)
    user, pw, wrong = "sec" + tag, "Pw-%s-%x!x" % (tag, random.getrandbits(40)), "Wr-%s-nope" % tag
    users_file = os.path.join(ctx.dovecot.dir, "users")
    with open(users_file, "a") as f:
        f.write("%s:{PLAIN}%s::::::\n" % (user, pw))
    # Dovecot re-reads a passwd-file whose mtime changed, to the second; an
    # earlier test may have left a future mtime, so move it on until Dovecot
    # knows the new user (setup, with a deadline; nothing here is timed).
    deadline = time.monotonic() + 20
    for attempt in range(100):
        t = max(time.time(), os.stat(users_file).st_mtime) + 2
        os.utime(users_file, (t, t))
        d = ctx.raw_tls(ctx.dovecot.tls_port, timeout=20)
        d.readline()
        tagged, _, _ = d.command("d%d" % attempt, 'LOGIN "%s" "%s"' % (user, pw))
        d.close()
        if b" OK" in tagged.split(b"\r\n")[0]:
            break                                           # straight to Dovecot
        check(time.monotonic() < deadline, "Dovecot never accepted the new test user: %r", tagged)
        time.sleep(0.5)
    r = ctx.env.redis
    p = ctx.proxy("secrets", [("log_level", "debug"), ("state", r.url),
                              ("instance_id", "secrets-" + tag)])
    pub = RedisSubscriber(r)
    ctx.closers.append(pub.close)
    plain = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode())
    plain2 = base64.b64encode(user.encode() + b"\0" + user.encode() + b"\0" + pw.encode())
    # Refused before TLS (require_tls): must not be logged either.
    c = ctx.raw_plain(p.port)
    c.readline()
    status(c.command("r1", "LOGIN %s %s" % (user, pw))[0], "NO")
    c.send(b"r2 AUTHENTICATE PLAIN " + plain + b"\r\n")
    c.wait_tagged("r2")
    # Each login form over TLS.
    forms = [
        lambda c: c.expect_ok("l1", 'LOGIN "%s" "%s"' % (user, pw)),
        lambda c: (c.send(b"l1 LOGIN {%d}\r\n" % len(user)), c.wait_continuation(),
                   c.send(user.encode() + b" {%d+}\r\n%s\r\n" % (len(pw), pw.encode())),
                   status(c.wait_tagged("l1")[0], "OK")),
        lambda c: c.expect_ok("l1", b"AUTHENTICATE PLAIN " + plain2),
        lambda c: (c.send(b"l1 AUTHENTICATE PLAIN\r\n"), c.wait_continuation(),
                   c.send(plain + b"\r\n"), status(c.wait_tagged("l1")[0], "OK")),
    ]
    for i, form in enumerate(forms):
        c = ctx.raw_tls(p.tls_port, timeout=20)
        c.readline()
        form(c)
        c.expect_ok("s%d" % i, "SELECT INBOX")
        append(c, "p%d" % i, "INBOX", message("secret test %d" % i))
        c.expect_ok("f%d" % i, "FETCH 1:* (UID)")
    c = ctx.raw_tls(p.tls_port, timeout=25)
    c.readline()
    status(c.command("w1", "LOGIN %s %s" % (user, wrong))[0], "NO")
    time.sleep(0.5)
    # Every page of the admin endpoint while the four sessions that logged
    # in with the password are live (their connections stay open).
    pages = admin_pages(p)
    listed = [e for e in json.loads(pages["/sessions"]) if e.get("user") == user]
    check(len(listed) == len(forms), "/sessions lists %d sessions of %s, expected %d: wrong "
          "pages?", len(listed), user, len(forms))
    keys = redis_keys(r)
    check(any(user in k for k in keys), "no Redis key for %s: the state was not written "
          "(keys %r)" % (user, keys[:10]))
    dump = b""
    for k in keys:
        dump += k.encode("latin-1") + b"\n"
        for args in (["DUMP", k], ["HGETALL", k], ["SMEMBERS", k], ["GET", k]):
            out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(r.port), "--raw"] + args,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=10)
            dump += out.stdout
    dump += pub.data()
    with open(p.log, "rb") as f:
        log = f.read()
    check(user.encode() in log, "the debug log does not even name the user: wrong log?")
    for what, secret in (("password", pw.encode()), ("wrong password", wrong.encode()),
                         ("AUTHENTICATE PLAIN", plain), ("AUTHENTICATE PLAIN (authzid)", plain2),
                         ("base64 of the password", base64.b64encode(pw.encode())[:-2])):
        check(secret not in log, "the %s reached imapfresh's log: %r", what,
              [l for l in log.splitlines() if secret in l][:3])
        check(secret not in dump, "the %s reached Redis", what)
        for path, body in pages.items():
            check(secret not in body, "the %s is on the admin page %s", what, path)


def admin_pages(p):
    """Every page the admin endpoint serves with GET: /metrics, /healthz,
    /sessions (and /sessions/), /trace, the status pages, and each live
    session in full, by sid and by instance:sid, and its status page.
    {path: body}; each must answer 200."""
    pages = {}

    def get(path):
        h = http.client.HTTPConnection(HOST, p.admin_port, timeout=TIMEOUT)
        try:
            h.request("GET", path)
            r = h.getresponse()
            body = r.read()
        finally:
            h.close()
        check(r.status == 200, "admin GET %s: %d %r", path, r.status, body[:200])
        pages[path] = body
    for path in ("/metrics", "/healthz", "/sessions", "/sessions/", "/trace", "/", "/status",
                 "/status/part"):
        get(path)
    for e in json.loads(pages["/sessions"]):
        get("/sessions/" + e["sid"])
        get("/sessions/" + e["id"])
        get("/status/session/" + e["id"])
    return pages


class RedisSubscriber:
    """PSUBSCRIBE * on a Redis: everything published while it listens."""

    def __init__(self, r):
        self.sock = socket.create_connection((HOST, r.port), timeout=5)
        self.sock.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$1\r\n*\r\n")
        self.buf = bytearray()
        self.stopped = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stopped:
            try:
                d = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not d:
                return
            self.buf += d

    def data(self):
        time.sleep(0.2)
        return bytes(self.buf)

    def close(self):
        self.stopped = True
        try:
            self.sock.close()
        except OSError:
            pass


# ======================================================= pre-auth discipline

@test("fault: a client cannot reach another session's upstream: literal payloads that look "
      "like commands, imapfresh's own tag form, pipelining", timeout=60, proxy_only=True)
def t_no_cross_session(ctx):
    fake = FakeUpstream()
    p = fake_proxy(ctx, "cross-session", fake)
    a = fake_login(ctx, p, "mallory")
    b = fake_login(ctx, p, "victim")
    # A literal whose payload reads like commands and responses; a tag in
    # imapfresh's own form; all pipelined in one write.
    payload = b"v9 LOGOUT\r\n* 1 EXISTS\r\nimapfresh.1 OK done\r\nL LOGIN victim x"
    sent = (b"imapfresh.1 NOOP\r\n"
            b"a2 APPEND INBOX {%d+}\r\n" % len(payload) + payload + b"\r\n"
            b"imapfresh.2 SELECT INBOX\r\n")
    a.send(sent)
    for tag in (b"imapfresh.1", b"a2", b"imapfresh.2"):
        line, _, _ = a.wait_tagged(tag)
        status(line, "OK")
    line, untagged, _ = b.command("v1", "NOOP")
    status(line, "OK")
    check(untagged == [], "the victim got untagged lines it did not cause: %r", untagged)
    conns = {fc.user: bytes(fc.received) for fc in fake.conns if fc.user}
    check(conns.get("victim") == b"L LOGIN victim anything\r\nv1 NOOP\r\n",
          "the victim's upstream link carried %r", conns.get("victim"))
    check(conns.get("mallory") == b"L LOGIN mallory anything\r\n" + sent,
          "the other client's bytes were not passed as sent: %r", conns.get("mallory"))
    alive(p)


@test("fault: before authentication imapfresh forwards the client's commands as sent and nothing "
      "else; refused LOGIN/AUTHENTICATE and STARTTLS never reach the upstream", proxy_only=True)
def t_preauth_nothing_injected(ctx):
    fake = FakeUpstream()
    ctx.closers.append(fake.close)
    p = ctx.proxy("preauth-rec", upstream=fake.addr)      # require_tls = yes
    c = ctx.raw_plain(p.port)
    c.readline()
    c.expect_ok("a", "CAPABILITY")
    c.expect_ok("b", "NOOP")
    status(c.command("c", "LOGIN alice secret-c")[0], "NO")
    status(c.command("d", "AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0secret-d").decode())[0],
           "NO")
    c.send(b"e LOGIN {5}\r\n")          # refused before its literal is asked for
    line, _ = c.read_response()
    check(line.startswith(b"e NO"), "LOGIN with a literal: %r", line)
    c.expect_ok("f", 'ID ("name" "fault")')
    c.expect_ok("g", "STARTTLS")
    c.starttls(ctx.sslctx(), HOST)
    c.expect_ok("h", "CAPABILITY")
    time.sleep(0.3)
    # (The harness's port probes made upstream connections too: empty ones.)
    got = [r for r in fake.received() if r]
    check(len(got) == 1, "%d upstream connections carried data for one client: %r", len(got),
          got)
    want = b'a CAPABILITY\r\nb NOOP\r\nf ID ("name" "fault")\r\nh CAPABILITY\r\n'
    check(got[0] == want, "the upstream received %r, expected exactly %r", got[0], want)
    alive(p)


# ===================================================== sanitizer reports (last)

class _KeepLast(list):
    """tap.TESTS while the final check below is registered: tests registered
    after it (modules imported after this one) go before it, so that it
    stops the default instance after every other test has used it."""

    def append(self, item):
        self.insert(len(self) - 1, item)



@test("sanitizers: the default imapfresh instance exits cleanly with no sanitizer or leak report",
      timeout=60, proxy_only=True)
def t_default_instance_clean_exit(ctx):
    # Runs last: the next test (if any) starts a new default instance.
    p = ctx.env.proxy
    alive(p)
    ctx.env.proxy = None
    rc = p.stop()       # raises servers.SanitizerError on a report in its log
    check(rc == 0, "default imapfresh exited with status %s on SIGTERM%s", rc, p.log_tail(15))
    ctx.env.proxy = ctx.env.new_proxy("default")
    ctx.env.proxy.start()


tap.TESTS = _KeepLast(tap.TESTS)
