#!/usr/bin/env python3
"""imapfresh integration tests: real Dovecot behind the proxy, TAP output.

    run.py --binary build/proxy/imapfresh        all tests through the proxy
    run.py --direct                              clients talk straight to
                                                 Dovecot (validates the harness;
                                                 proxy-only tests are skipped)
    run.py --only NAME-SUBSTRING ... --keep --list

Everything listens on 127.0.0.1 in a temporary directory; every process this
starts is stopped at exit. Socket reads have a 10 s deadline; each test has
its own overall deadline so one hang fails one test.
"""

import argparse
import atexit
import base64
import hashlib
import imaplib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import imapraw  # noqa: E402
import servers  # noqa: E402
import tap  # noqa: E402
from imapraw import capabilities, greeting_text, status, ProtocolError  # noqa: E402
from servers import HOST, DEFAULT_USERS as USERS  # noqa: E402
from tap import test, Skip  # noqa: E402

TIMEOUT = 10.0          # per socket operation: a protocol deadline
BIG = 20 * 1024 * 1024  # test g


def check(cond, msg, *args):
    if not cond:
        raise AssertionError(msg % args if args else msg)


# ------------------------------------------------------------------ fixtures

class Env:
    """Session-wide fixtures: one Dovecot, one Redis, one default proxy."""

    def __init__(self, tmp, binary, direct):
        self.tmp = tmp
        self.binary = binary
        self.direct = direct
        self.dovecot = servers.Dovecot(os.path.join(tmp, "dovecot"))
        self.redis = servers.Redis(os.path.join(tmp, "redis"))
        self.proxy = None
        self.instances = 0
        self.lock = threading.Lock()

    @property
    def ca(self):
        return self.dovecot.certs["ca"]

    def start(self):
        self.dovecot.setup().start()
        self.redis.start()
        if not self.direct:
            self.proxy = self.new_proxy("default")
            self.proxy.start()

    def new_proxy(self, name, options=(), upstream=None, upstream_tls="none",
                  listen=True, listen_tls=True, secure_loopback=False):
        with self.lock:
            self.instances += 1
            n = self.instances
        # The suite connects from loopback, which secure_networks trusts by
        # default: off, so that require_tls's refusals stay tested (firstrun_tests
        # covers the default).
        if not secure_loopback:
            options = [("secure_networks", "")] + list(options)
        return servers.Imapfresh(
            self.binary, os.path.join(self.tmp, "proxy"),
            upstream or "%s:%d" % (HOST, self.dovecot.port),
            self.dovecot.certs["cert"], self.dovecot.certs["key"],
            upstream_tls=upstream_tls, options=options, listen=listen,
            listen_tls=listen_tls, name="%s-%d" % (name, n))

    def ensure_default_proxy(self):
        if self.direct or (self.proxy and self.proxy.alive()):
            return None
        rc = self.proxy.proc.returncode if self.proxy and self.proxy.proc else None
        self.proxy = self.new_proxy("default")
        self.proxy.start()
        return rc

    def stop(self):
        for s in (self.proxy, self.redis, self.dovecot):
            if s is not None:
                try:
                    s.stop()
                except Exception:
                    pass


class Ctx:
    """Per-test handle: addresses, tracked connections and proxies."""

    def __init__(self, env, t):
        self.env = env
        self.direct = env.direct
        self.closers = []       # callables run at cleanup
        self.conns = []         # imapraw.Conn, for transcripts
        self.proxies = []
        self.restarted = env.ensure_default_proxy()
        self.dc_mark = env.dovecot.log_size()
        self.px_mark = self._proxy_log_size()
        self.counter = 0

    def _proxy_log_size(self):
        p = self.env.proxy
        try:
            return os.path.getsize(p.log) if p else 0
        except OSError:
            return 0

    # addresses of the thing under test (the proxy, or Dovecot in --direct)
    @property
    def plain_port(self):
        return self.env.dovecot.port if self.direct else self.env.proxy.port

    @property
    def tls_port(self):
        return self.env.dovecot.tls_port if self.direct else self.env.proxy.tls_port

    @property
    def dovecot(self):
        return self.env.dovecot

    def sslctx(self):
        return imapraw.client_context(cafile=self.env.ca)

    def raw(self, port, tls=False, timeout=TIMEOUT):
        c = imapraw.Conn(HOST, port, tls=tls, ctx=self.sslctx() if tls else None,
                         timeout=timeout, server_hostname=HOST)
        self.conns.append(c)
        self.closers.append(c.close)
        return c

    def raw_tls(self, port=None, timeout=TIMEOUT):
        return self.raw(port or self.tls_port, True, timeout)

    def raw_plain(self, port=None, timeout=TIMEOUT):
        return self.raw(port or self.plain_port, False, timeout)

    def session(self, user="alice", port=None, timeout=TIMEOUT):
        """Logged-in raw session over implicit TLS; returns (conn, caps)."""
        c = self.raw_tls(port, timeout)
        greeting = c.readline()
        check(greeting.startswith(b"* OK"), "greeting: %r", greeting)
        tagged, untagged, _ = c.login(user, USERS[user])
        caps = capabilities(tagged)
        if caps is None:
            _, lines, _ = c.expect_ok("C0", "CAPABILITY")
            caps = capabilities([l for l in lines if l.upper().startswith(b"* CAPABILITY")][0])
        return c, caps

    def imap_tls(self, port=None, timeout=TIMEOUT):
        im = imaplib.IMAP4_SSL(HOST, port or self.tls_port, ssl_context=self.sslctx(),
                               timeout=timeout)
        self.closers.append(im.shutdown)
        return im

    def imap_plain(self, port=None, timeout=TIMEOUT):
        im = imaplib.IMAP4(HOST, port or self.plain_port, timeout=timeout)
        self.closers.append(im.shutdown)
        return im

    def proxy(self, name, options=(), upstream=None, upstream_tls="none",
              listen=True, listen_tls=True, start=True, secure_loopback=False):
        if self.direct:
            raise Skip("needs imapfresh")
        p = self.env.new_proxy(name, options, upstream, upstream_tls, listen, listen_tls,
                               secure_loopback)
        self.proxies.append(p)
        if start:
            p.start()
        return p

    def mailbox(self, conn, prefix="T"):
        """A fresh mailbox on conn (raw session), created."""
        self.counter += 1
        name = "%s%d_%d_%04x" % (prefix, os.getpid(), self.counter, random.getrandbits(16))
        conn.expect_ok("MB%d" % self.counter, "CREATE " + name)
        return name

    def cleanup(self):
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:
                pass
        self.closers = []
        reports = []
        for q in self.proxies:
            was_running = q.alive()
            try:
                rc = q.stop()
            except servers.SanitizerError as e:    # every proxy is stopped first
                reports.append(str(e))
                continue
            if was_running and rc != 0:
                tap.diag("note: %s did not exit 0 within 10s of SIGTERM (status %s)"
                         % (q.name, rc))
        if reports:
            raise AssertionError("\n".join(reports))
        p = self.env.proxy
        if p is not None and not p.alive():
            raise AssertionError("the default imapfresh instance exited during this "
                                 "test (status %s)%s" % (p.proc.returncode, p.log_tail()))

    def failure_report(self):
        out = []
        if self.restarted is not None:
            out.append("(default imapfresh had exited with %s before this test; restarted)"
                       % self.restarted)
        for c in self.conns[-3:]:
            out.append("--- transcript %s:%d (last exchanges) ---" % (c.host, c.port))
            for d, b in c.transcript[-8:]:
                out.append("%s: %r" % (d, b[:200]))
        p = self.env.proxy
        if p is not None:
            try:
                with open(p.log, "rb") as f:
                    f.seek(self.px_mark)
                    text = f.read()[-4000:].decode("utf-8", "replace")
                out.append("--- default imapfresh log during this test ---")
                out += text.splitlines()[-20:]
            except OSError:
                pass
        for q in self.proxies:
            out.append(servers.log_tail(q.log, 20).strip())
        text = self.env.dovecot.log_since(self.dc_mark).splitlines()
        if text:
            out.append("--- dovecot log during this test (tail) ---")
            out += text[-15:]
        return "\n".join(out)


# ------------------------------------------------------------------- helpers

def message(subject, body=b"", extra=b""):
    if isinstance(body, str):
        body = body.encode()
    return (b"From: alice@example.org\r\nTo: bob@example.org\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Message-ID: <" + ("%x" % random.getrandbits(64)).encode() + b"@imapfresh.test>\r\n"
            + extra + b"\r\n" + (body or b"Hello from the imapfresh tests.\r\n"))


def caps_of(untagged, tagged=b""):
    for l in untagged:
        if l.upper().startswith(b"* CAPABILITY"):
            return capabilities(l)
    return capabilities(tagged)


def capability_cmd(conn, tag="CAP"):
    tagged, untagged, _ = conn.expect_ok(tag, "CAPABILITY")
    caps = caps_of(untagged)
    check(caps is not None, "no * CAPABILITY line: %r", untagged)
    return caps


def append_sync(conn, tag, mailbox, msg, flags=b""):
    conn.send(b"%s APPEND %s %s{%d}\r\n" % (tag.encode(), mailbox.encode(),
                                            flags + b" " if flags else b"", len(msg)))
    conn.wait_continuation()
    conn.send(msg + b"\r\n")
    tagged, _, _ = conn.wait_tagged(tag)
    return status(tagged, "OK")


def fetch_bodies(conn, tag, mailbox, seqset="1:*"):
    conn.expect_ok(tag + "S", "EXAMINE " + mailbox)
    _, untagged, lits = conn.expect_ok(tag, "FETCH %s (BODY.PEEK[])" % seqset)
    return lits


def exists_count(untagged):
    for l in untagged:
        m = re.match(rb"\* (\d+) EXISTS", l)
        if m:
            return int(m.group(1))
    return None


def assert_plain_policy(caps, where):
    check(caps is not None, "%s: no capability list", where)
    check("IMAP4REV1" in caps, "%s: no IMAP4rev1 in %s", where, sorted(caps))
    check("STARTTLS" in caps, "%s: STARTTLS missing: %s", where, sorted(caps))
    check("LOGINDISABLED" in caps, "%s: LOGINDISABLED missing: %s", where, sorted(caps))
    auth = [c for c in caps if c.startswith("AUTH=")]
    check(not auth, "%s: AUTH= offered on a non-TLS link: %s", where, auth)
    check("COMPRESS=DEFLATE" not in caps, "%s: COMPRESS=DEFLATE offered", where)


def assert_tls_policy(caps, where):
    check(caps is not None, "%s: no capability list", where)
    check("STARTTLS" not in caps, "%s: STARTTLS offered on TLS: %s", where, sorted(caps))
    check("LOGINDISABLED" not in caps, "%s: LOGINDISABLED on TLS: %s", where, sorted(caps))
    check("COMPRESS=DEFLATE" not in caps, "%s: COMPRESS=DEFLATE offered", where)


def login_lines(ctx, user, mark, deadline=5.0):
    return ctx.dovecot.wait_log(
        mark, lambda l: re.search(r"imap-login: (Info: )?Login: user=<%s>" % re.escape(user), l),
        deadline)


def roundtrip(conn, ctx, tag="R"):
    """select/append/fetch on a fresh mailbox of a logged-in raw session."""
    mb = ctx.mailbox(conn)
    conn.expect_ok(tag + "1", "SELECT " + mb)
    msg = message("roundtrip " + tag, "line one\r\nline two \xe9\r\n".encode("latin-1"))
    append_sync(conn, tag + "2", mb, msg)
    bodies = fetch_bodies(conn, tag + "3", mb)
    check(bodies == [msg], "fetched %r, appended %r", bodies, msg)


# ======================================================== harness (direct)

@test("harness: dovecot greeting, pre-login STARTTLS/AUTH=, post-login COMPRESS=DEFLATE")
def t_harness_dovecot(ctx):
    c = ctx.raw_plain(ctx.dovecot.port)
    g = c.readline()
    check(greeting_text(g) == servers.GREETING, "greeting %r", g)
    caps = capabilities(g)
    check("STARTTLS" in caps and "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps,
          "dovecot pre-login caps %s", caps)
    tagged, _, _ = c.login("alice", USERS["alice"])
    caps = capabilities(tagged)
    # The proxy tests assert these are hidden, so Dovecot must offer them.
    check("COMPRESS=DEFLATE" in caps, "dovecot does not offer COMPRESS=DEFLATE: %s", caps)
    check("LITERAL+" in caps and "MULTIAPPEND" in caps and "QUOTA" in caps
          and "IDLE" in caps, "dovecot caps %s", caps)


@test("harness: dovecot logs ', TLS' for TLS logins only; mail runs unprivileged")
def t_harness_log(ctx):
    mark = ctx.dovecot.log_size()
    c = ctx.raw_plain(ctx.dovecot.port)
    c.readline()
    c.login("bob", USERS["bob"])
    lines = login_lines(ctx, "bob", mark)
    check(lines and ", TLS" not in lines[-1], "plaintext login logged as %r", lines)
    mark = ctx.dovecot.log_size()
    c2 = ctx.raw_tls(ctx.dovecot.tls_port)
    c2.readline()
    c2.login("bob", USERS["bob"])
    lines = login_lines(ctx, "bob", mark)
    check(lines and ", TLS" in lines[-1], "TLS login logged as %r", lines)
    m = re.search(r"mpid=(\d+)", lines[-1])
    if m and os.geteuid() == 0:
        with open("/proc/%s/status" % m.group(1)) as f:
            uid = [l for l in f if l.startswith("Uid:")][0].split()[1]
        check(uid != "0", "dovecot mail process runs as root")


@test("harness: redis on loopback answers PING")
def t_harness_redis(ctx):
    check(ctx.env.redis.command("PING") == b"+PONG", "no PONG")


# ================================================= a. plaintext + STARTTLS

@test("a: plaintext greeting is Dovecot's text; caps STARTTLS+LOGINDISABLED, no AUTH=, no COMPRESS",
      proxy_only=True)
def t_plain_greeting(ctx):
    c = ctx.raw_plain()
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting %r", g)
    check(greeting_text(g) == servers.GREETING, "greeting text %r, Dovecot's is %r",
          greeting_text(g), servers.GREETING)
    caps = capabilities(g)
    check(caps is not None, "greeting carries no [CAPABILITY] list (Dovecot's does): %r", g)
    assert_plain_policy(caps, "greeting")


@test("a: plaintext CAPABILITY command: STARTTLS+LOGINDISABLED, no AUTH=, no COMPRESS",
      proxy_only=True)
def t_plain_capability(ctx):
    c = ctx.raw_plain()
    c.readline()
    assert_plain_policy(capability_cmd(c), "CAPABILITY")


@test("a: LOGIN before STARTTLS gets tagged NO [PRIVACYREQUIRED], not forwarded",
      proxy_only=True)
def t_plain_login_refused(ctx):
    mark = ctx.dovecot.log_size()
    c = ctx.raw_plain()
    c.readline()
    tagged, _, _ = c.command("a", "LOGIN alice " + USERS["alice"])
    status(tagged, "NO")
    check(b"[PRIVACYREQUIRED]" in tagged.upper(), "no [PRIVACYREQUIRED]: %r", tagged)
    c.expect_ok("b", "NOOP")
    tagged, _, _ = c.command("c", "SELECT INBOX")
    check(not tagged.upper().startswith(b"C OK"), "SELECT worked after refused LOGIN: %r", tagged)
    time.sleep(0.3)
    leaked = [l for l in ctx.dovecot.log_since(mark).splitlines() if "user=<alice>" in l]
    check(not leaked, "credentials reached Dovecot: %r", leaked)


@test("a: AUTHENTICATE PLAIN before STARTTLS is refused", proxy_only=True)
def t_plain_auth_refused(ctx):
    c = ctx.raw_plain()
    c.readline()
    ir = base64.b64encode(b"\0alice\0" + USERS["alice"].encode()).decode()
    tagged, _, _ = c.command("a", "AUTHENTICATE PLAIN " + ir)
    check(re.match(rb"a (NO|BAD)", tagged), "AUTHENTICATE on plaintext: %r", tagged)
    c.expect_ok("b", "NOOP")
    tagged, _, _ = c.command("c", "SELECT INBOX")
    check(not tagged.startswith(b"c OK"), "SELECT worked: %r", tagged)


@test("a: STARTTLS (imaplib): caps lose STARTTLS/LOGINDISABLED, gain AUTH=PLAIN; login/select/append/fetch")
def t_starttls_imaplib(ctx):
    im = ctx.imap_plain()
    im.starttls(ssl_context=ctx.sslctx())
    typ, data = im.capability()
    caps = set(data[0].decode().upper().split())
    check("STARTTLS" not in caps, "STARTTLS still offered: %s", caps)
    check("LOGINDISABLED" not in caps, "LOGINDISABLED still offered: %s", caps)
    check("AUTH=PLAIN" in caps, "AUTH=PLAIN missing after STARTTLS: %s", caps)
    check("COMPRESS=DEFLATE" not in caps, "COMPRESS offered")
    im.login("alice", USERS["alice"])
    mb = "ST%d_%04x" % (os.getpid(), random.getrandbits(16))
    check(im.create(mb)[0] == "OK", "create")
    typ, _ = im.select(mb)
    check(typ == "OK", "select %s", typ)
    msg = message("starttls imaplib")
    typ, _ = im.append(mb, None, None, msg)
    check(typ == "OK", "append %s", typ)
    typ, data = im.fetch("1", "(BODY.PEEK[])")
    check(typ == "OK" and data[0][1] == msg, "fetch %r", data)
    if not ctx.direct:
        typ, data = im.capability()
        caps = set(data[0].decode().upper().split())
        check("COMPRESS=DEFLATE" in caps, "post-login COMPRESS=DEFLATE (imapfresh's own): %s",
              caps)
    im.logout()


@test("a: post-login capabilities (LOGIN OK code and CAPABILITY) offer imapfresh's own "
      "COMPRESS=DEFLATE once, the server's never", proxy_only=True)
def t_compress_post_login(ctx):
    c = ctx.raw_tls()
    c.readline()
    tagged, untagged, _ = c.login("alice", USERS["alice"])
    code = capabilities(tagged)
    if code is not None:
        check(re.findall(rb"COMPRESS=[A-Z]+", tagged) == [b"COMPRESS=DEFLATE"],
              "LOGIN OK code: %r", tagged)
    _, lines, _ = c.expect_ok("C1", "CAPABILITY")
    line = [l for l in lines if l.upper().startswith(b"* CAPABILITY")][0]
    check(re.findall(rb"COMPRESS=[A-Z]+", line) == [b"COMPRESS=DEFLATE"], "CAPABILITY: %r", line)
    caps = capabilities(line)
    check("IMAP4REV1" in caps and "IDLE" in caps, "post-login caps lost entries: %s", caps)


@test("a: bytes pipelined after STARTTLS are discarded, not executed", proxy_only=True)
def t_starttls_pipelined(ctx):
    c = ctx.raw_plain()
    c.readline()
    c.send(b"a STARTTLS\r\nb NOOP\r\n")
    tagged, before, _ = c.wait_tagged("a")
    status(tagged, "OK")
    check(not [l for l in before if l.startswith(b"b ")], "b answered before TLS: %r", before)
    # Anything the proxy sent in plaintext after 'a OK' would be buffered.
    c.starttls(ctx.sslctx(), HOST)
    c.send(b"c NOOP\r\n")
    tagged, untagged, _ = c.wait_tagged("c")
    status(tagged, "OK")
    check(not [l for l in untagged if l.startswith(b"b ")], "pipelined b was executed: %r", untagged)
    c.settimeout(1.0)
    try:
        extra = c.readline()
        check(not extra.startswith(b"b "), "pipelined b was executed: %r", extra)
    except ProtocolError:
        pass  # nothing more: good
    c.settimeout(TIMEOUT)
    caps = capability_cmd(c, "d")
    check("STARTTLS" not in caps and "LOGINDISABLED" not in caps, "caps %s", caps)
    c.login("alice", USERS["alice"], "e")


# ===================================================== b. implicit TLS

@test("b: implicit TLS: caps without STARTTLS/LOGINDISABLED; login/select/append/fetch")
def t_tls_listener(ctx):
    c = ctx.raw_tls()
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting %r", g)
    gc = capabilities(g)
    if gc is not None:
        assert_tls_policy(gc, "greeting")
    caps = capability_cmd(c)
    assert_tls_policy(caps, "CAPABILITY")
    check("AUTH=PLAIN" in caps, "no AUTH=PLAIN on TLS: %s", caps)
    c.login("alice", USERS["alice"])
    roundtrip(c, ctx)
    c.expect_ok("Z", "LOGOUT")


@test("b: imaplib IMAP4_SSL login/select/append/fetch")
def t_tls_imaplib(ctx):
    im = ctx.imap_tls()
    check("STARTTLS" not in im.capabilities, "caps %s", im.capabilities)
    im.login("bob", USERS["bob"])
    mb = "SSL%d_%04x" % (os.getpid(), random.getrandbits(16))
    im.create(mb)
    check(im.select(mb)[0] == "OK", "select")
    msg = message("imaplib ssl")
    check(im.append(mb, None, None, msg)[0] == "OK", "append")
    typ, data = im.fetch("1", "(BODY.PEEK[])")
    check(data[0][1] == msg, "fetch %r", data)
    im.logout()


# ===================================================== c. require_tls=no

@test("c: require_tls=no: plaintext LOGIN works, no LOGINDISABLED", proxy_only=True)
def t_require_tls_no(ctx):
    p = ctx.proxy("notls", [("require_tls", "no")])
    c = ctx.raw_plain(p.port)
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting %r", g)
    caps = capability_cmd(c)
    check("LOGINDISABLED" not in caps, "LOGINDISABLED with require_tls=no: %s", caps)
    c.login("alice", USERS["alice"])
    roundtrip(c, ctx)


# ===================================================== d. upstream TLS modes

def _upstream_tls_login(ctx, mode, port):
    p = ctx.proxy("up" + mode, [("upstream_ca", ctx.env.ca), ("upstream_sni", "localhost"),
                               ("upstream_tls_verify", "yes")],
                  upstream="%s:%d" % (HOST, port), upstream_tls=mode)
    mark = ctx.dovecot.log_size()
    c, _ = ctx.session("bob", p.tls_port)
    roundtrip(c, ctx)
    lines = login_lines(ctx, "bob", mark)
    check(lines, "no Dovecot login line for bob")
    check(", TLS" in lines[-1], "upstream login not over TLS: %r", lines[-1])


@test("d: upstream_tls=starttls (verify, CA, SNI): login works; Dovecot logs TLS", proxy_only=True)
def t_upstream_starttls(ctx):
    _upstream_tls_login(ctx, "starttls", ctx.dovecot.port)


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@test("d: sessions that used STARTTLS, client side and upstream side, leave imapfresh idle "
      "when they are", proxy_only=True)
def t_starttls_idle_cpu(ctx):
    # A dup()ed socket left an epoll registration behind that woke the loop on
    # every pass: a core per such session. A busy loop takes the whole second
    # of CPU; an idle proxy takes a few ticks at most.
    p = ctx.proxy("stidle", [("upstream_ca", ctx.env.ca), ("upstream_sni", "localhost"),
                             ("upstream_tls_verify", "yes")],
                  upstream="%s:%d" % (HOST, ctx.dovecot.port), upstream_tls="starttls")
    c = ctx.raw_plain(p.port)
    c.readline()
    c.expect_ok("a", "STARTTLS")
    c.starttls(ctx.sslctx(), HOST)
    c.login("alice", USERS["alice"])
    c.expect_ok("s", "SELECT INBOX")
    before = cpu_seconds(p.proc.pid)
    time.sleep(2)
    spent = cpu_seconds(p.proc.pid) - before
    check(spent < 0.5, "imapfresh used %.2f s of CPU in 2 s with one idle session", spent)
    c.expect_ok("n", "NOOP")


@test("d: upstream_tls=tls (verify, CA, SNI): login works; Dovecot logs TLS", proxy_only=True)
def t_upstream_tls(ctx):
    _upstream_tls_login(ctx, "tls", ctx.dovecot.tls_port)


@test("d: upstream_tls=none: Dovecot logs a non-TLS login", proxy_only=True)
def t_upstream_none(ctx):
    mark = ctx.dovecot.log_size()
    c, _ = ctx.session("bob")
    lines = login_lines(ctx, "bob", mark)
    check(lines and ", TLS" not in lines[-1], "login line %r", lines)


def _tls_client_or_report(ctx, port):
    """Implicit-TLS connection; a handshake that hangs is reported as such."""
    try:
        return ctx.raw_tls(port)
    except (socket.timeout, TimeoutError) as e:
        raise AssertionError("TLS handshake with imapfresh did not complete within "
                             "%.0fs (no * BYE, no EOF): %s" % (TIMEOUT, e)) from None


def _expect_bye_eof(conn, login=True):
    """The client must get * BYE and then EOF. If the proxy greets first
    (upstream contacted lazily), the failure must come at LOGIN instead."""
    first = conn.readline()
    if first.startswith(b"* OK") and login:
        conn.send(b"a LOGIN bob " + USERS["bob"].encode() + b"\r\n")
        rest = conn.read_until_eof()
    else:
        rest = first + conn.read_until_eof()
    check(re.search(rb"(^|\n)\* BYE", rest), "no * BYE before close: %r", rest)
    check(b"a OK" not in rest, "logged in through an unverified upstream: %r", rest)
    return first


def _verify_fail_proxy(ctx):
    return ctx.proxy("upbad", [("upstream_tls_verify", "yes"), ("upstream_sni", "localhost")],
                     upstream="%s:%d" % (HOST, ctx.dovecot.tls_port), upstream_tls="tls")


@test("d: upstream TLS verify failure (untrusted CA), plaintext client: * BYE, then EOF",
      proxy_only=True)
def t_upstream_verify_fail_plain(ctx):
    p = _verify_fail_proxy(ctx)
    _expect_bye_eof(ctx.raw_plain(p.port))
    check(p.alive(), "imapfresh died")


@test("d: upstream TLS verify failure (untrusted CA), implicit-TLS client: * BYE, then EOF",
      proxy_only=True)
def t_upstream_verify_fail_tls(ctx):
    p = _verify_fail_proxy(ctx)
    _expect_bye_eof(_tls_client_or_report(ctx, p.tls_port))
    check(p.alive(), "imapfresh died")


# ============================================= e. LOGIN / AUTHENTICATE forms

@test("e: LOGIN with atoms and quoted strings")
def t_login_forms(ctx):
    c = ctx.raw_tls()
    c.readline()
    c.expect_ok("a", "LOGIN bob bob-pw")
    c.expect_ok("b", "SELECT INBOX")
    c2 = ctx.raw_tls()
    c2.readline()
    c2.expect_ok("a", b'LOGIN "carol" ' + imapraw.quote(USERS["carol"]))
    c2.expect_ok("b", "SELECT INBOX")


@test("e: LOGIN with synchronizing literals (waits for +), and LITERAL+ if offered")
def t_login_literals(ctx):
    c = ctx.raw_tls()
    g = c.readline()
    pw = USERS["carol"].encode()
    c.send(b"a LOGIN {5}\r\n")
    c.wait_continuation()
    c.send(b"carol {%d}\r\n" % len(pw))
    c.wait_continuation()
    c.send(pw + b"\r\n")
    tagged, _, _ = c.wait_tagged("a")
    status(tagged, "OK")
    c.expect_ok("b", "SELECT INBOX")
    caps = capabilities(g) or set()
    if "LITERAL+" in caps:
        c2 = ctx.raw_tls()
        c2.readline()
        c2.send(b"a LOGIN {5+}\r\ncarol {%d+}\r\n%s\r\n" % (len(pw), pw))
        tagged, untagged, _ = c2.wait_tagged("a")
        status(tagged, "OK")
        check(not [l for l in untagged if l.startswith(b"+")], "+ sent for LITERAL+: %r", untagged)
        c2.expect_ok("b", "SELECT INBOX")


@test("e: AUTHENTICATE PLAIN with SASL-IR")
def t_auth_plain_ir(ctx):
    c = ctx.raw_tls()
    c.readline()
    ir = base64.b64encode(b"\0alice\0" + USERS["alice"].encode()).decode()
    c.expect_ok("a", "AUTHENTICATE PLAIN " + ir)
    c.expect_ok("b", "SELECT INBOX")


@test("e: AUTHENTICATE PLAIN with a continuation (no SASL-IR)")
def t_auth_plain_cont(ctx):
    c = ctx.raw_tls()
    c.readline()
    c.send(b"a AUTHENTICATE PLAIN\r\n")
    line, _ = c.wait_continuation()
    check(line.rstrip(b"\r\n") in (b"+", b"+ "), "continuation %r", line)
    c.send(base64.b64encode(b"\0carol\0" + USERS["carol"].encode()) + b"\r\n")
    tagged, _, _ = c.wait_tagged("a")
    status(tagged, "OK")
    c.expect_ok("b", "SELECT INBOX")


@test("e: failed LOGIN gets NO; the session stays usable and can log in", timeout=90)
def t_login_failed(ctx):
    c = ctx.raw_tls(timeout=25)     # Dovecot delays failures (auth_failure_delay + penalty)
    c.readline()
    tagged, _, _ = c.command("a", "LOGIN alice wrong-password")
    status(tagged, "NO")
    c.expect_ok("b", "NOOP")
    c.login("alice", USERS["alice"], "c")
    c.expect_ok("d", "SELECT INBOX")


# ======================================================= f. SELECT / APPEND

@test("f: SELECT and APPEND with a synchronizing literal")
def t_append_sync(ctx):
    c, _ = ctx.session()
    mb = ctx.mailbox(c)
    _, untagged, _ = c.expect_ok("s", "SELECT " + mb)
    check(exists_count(untagged) == 0, "new mailbox not empty: %r", untagged)
    msg = message("sync literal", b"x" * 3000 + b"\r\n")
    append_sync(c, "a", mb, msg)
    _, untagged, _ = c.expect_ok("n", "NOOP")
    bodies = fetch_bodies(c, "f", mb)
    check(bodies == [msg], "fetched %r", [b[:80] for b in bodies])


@test("f: APPEND with LITERAL+ (no continuation requested)")
def t_append_literal_plus(ctx):
    c, caps = ctx.session()
    check("LITERAL+" in caps, "LITERAL+ not advertised after login: %s", caps)
    mb = ctx.mailbox(c)
    msg = message("literal plus", b"y" * 5000 + b"\r\n")
    c.send(b"a APPEND %s {%d+}\r\n%s\r\n" % (mb.encode(), len(msg), msg))
    tagged, untagged, _ = c.wait_tagged("a")
    status(tagged, "OK")
    check(not [l for l in untagged if l.startswith(b"+")], "continuation for LITERAL+: %r", untagged)
    check(fetch_bodies(c, "f", mb) == [msg], "fetch mismatch")


@test("f: MULTIAPPEND with several literals")
def t_multiappend(ctx):
    c, caps = ctx.session()
    check("MULTIAPPEND" in caps, "MULTIAPPEND not advertised: %s", caps)
    mb = ctx.mailbox(c)
    msgs = [message("multi %d" % i, ("part %d\r\n" % i).encode() * (i * 50 + 1)) for i in range(3)]
    c.send(b"a APPEND %s (\\Seen) {%d}\r\n" % (mb.encode(), len(msgs[0])))
    c.wait_continuation()
    c.send(msgs[0] + b" (\\Flagged) {%d}\r\n" % len(msgs[1]))
    c.wait_continuation()
    c.send(msgs[1] + b" {%d}\r\n" % len(msgs[2]))
    c.wait_continuation()
    c.send(msgs[2] + b"\r\n")
    tagged, _, _ = c.wait_tagged("a")
    status(tagged, "OK")
    check(fetch_bodies(c, "f", mb) == msgs, "fetched messages differ")
    _, untagged, _ = c.expect_ok("g", "FETCH 1:3 (FLAGS)")
    check(b"\\Seen" in untagged[0] and b"\\Flagged" in untagged[1], "flags %r", untagged)


# ======================================================= g. 20 MB message

def big_message(size, seed=20):
    rnd = random.Random(seed)
    head = (b"From: alice@example.org\r\nSubject: twenty megabytes\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n")
    # Random bytes without NUL/CR/LF (IMAP literals are lines of octets).
    table = bytes(range(256)).replace(b"\x00", b"\x01").replace(b"\r", b"\x0b").replace(b"\n", b"\x0c")
    raw = rnd.randbytes(size).translate(table)
    text = b"The quick brown fox jumps over the lazy dog; \xc3\xa9t\xc3\xa9 8-bit \xff\xfe. "
    parts, pos, i = [head], 0, 0
    total = len(head)
    while total < size:
        n = rnd.randint(40, 990)
        if i % 3 == 0:
            line = (text * (n // len(text) + 1))[:n]
        else:
            line = raw[pos:pos + n]
            pos += n
        parts.append(line + b"\r\n")
        total += n + 2
        i += 1
    return b"".join(parts)


@test("g: 20 MB message appended and fetched back byte-identical", timeout=180)
def t_big_message(ctx):
    msg = big_message(BIG)
    c, _ = ctx.session(timeout=30)
    mb = ctx.mailbox(c)
    append_sync(c, "a", mb, msg)
    c.expect_ok("s", "SELECT " + mb)
    _, untagged, lits = c.expect_ok("f", "FETCH 1 (BODY.PEEK[])")
    check(len(lits) == 1, "expected one literal, got %d", len(lits))
    got = lits[0]
    check(len(got) == len(msg), "size %d != %d", len(got), len(msg))
    check(hashlib.sha256(got).digest() == hashlib.sha256(msg).digest(),
          "content differs (first diff at %d)",
          next((i for i, (x, y) in enumerate(zip(got, msg)) if x != y), -1))


# ================================================================ h. IDLE

@test("h: IDLE receives EXISTS when another session appends; DONE gets OK")
def t_idle(ctx):
    c1, caps = ctx.session("bob")
    check("IDLE" in caps, "IDLE not advertised")
    _, untagged, _ = c1.expect_ok("s", "SELECT INBOX")
    n = exists_count(untagged)
    c1.send(b"i IDLE\r\n")
    c1.wait_continuation()
    c2, _ = ctx.session("bob")
    append_sync(c2, "a", "INBOX", message("idle wakeup"))
    deadline = time.monotonic() + TIMEOUT
    while True:
        check(time.monotonic() < deadline, "no EXISTS during IDLE")
        line = c1.readline()
        m = re.match(rb"\* (\d+) EXISTS", line)
        if m:
            check(int(m.group(1)) == n + 1, "EXISTS %s, expected %d", m.group(1), n + 1)
            break
    c1.send(b"DONE\r\n")
    tagged, _, _ = c1.wait_tagged("i")
    status(tagged, "OK")
    c1.expect_ok("n", "NOOP")


# ========================================================== i. pipelining

@test("i: 100 pipelined commands in one write: tagged responses in order, all OK")
def t_pipelining_order(ctx):
    c, _ = ctx.session()
    mb = ctx.mailbox(c)
    for k in range(3):
        append_sync(c, "a%d" % k, mb, message("pipe %d" % k))
    # Dovecot runs some commands in parallel (RFC 3501 5.5); this mix it
    # completes strictly in order, so any reordering is the proxy's.
    kinds = [b"SELECT " + mb.encode(), b"FETCH 1:* (FLAGS UID)", b"NOOP",
             b"EXAMINE " + mb.encode(), b"UID FETCH 1:* FLAGS", b"CHECK"]
    batch = b"".join(b"p%d %s\r\n" % (i, kinds[i % len(kinds)]) for i in range(100))
    c.send(batch)
    tags = []
    while len(tags) < 100:
        line, _ = c.read_response()
        if line.startswith(b"p"):
            tags.append(line)
    got = [t.split(b" ")[0].decode() for t in tags]
    check(got == ["p%d" % i for i in range(100)], "order: %s", got[:20])
    bad = [t for t in tags if t.split(b" ")[1] != b"OK"]
    check(not bad, "not OK: %r", bad[:3])
    c.expect_ok("z", "NOOP")


@test("i: 100 pipelined parallel-safe commands: each answered once, all OK")
def t_pipelining_all(ctx):
    c, _ = ctx.session()
    mb = ctx.mailbox(c)
    append_sync(c, "a", mb, message("pipe"))
    c.expect_ok("s", "SELECT " + mb)
    kinds = [b"NOOP", b"FETCH 1 (FLAGS)", b"STATUS INBOX (MESSAGES)", b"UID SEARCH ALL",
             b'LIST "" INBOX', b"CAPABILITY", b"NAMESPACE"]
    c.send(b"".join(b"q%d %s\r\n" % (i, kinds[i % len(kinds)]) for i in range(100)))
    tags = []
    while len(tags) < 100:
        line, _ = c.read_response()
        if line.startswith(b"q"):
            tags.append(line)
    got = sorted(t.split(b" ")[0].decode() for t in tags)
    check(got == sorted("q%d" % i for i in range(100)), "tags %s", got[:20])
    bad = [t for t in tags if t.split(b" ")[1] != b"OK"]
    check(not bad, "not OK: %r", bad[:3])


# ===================================================== j. 200 sessions

@test("j: 200 concurrent sessions (TLS): login/select/noop/logout all succeed", timeout=240)
def t_concurrent(ctx):
    n = 200
    errors, done = [], []
    barrier = threading.Barrier(n, timeout=120)
    port = ctx.tls_port
    sslctx = ctx.sslctx()
    lock = threading.Lock()
    socks = []

    def one(i):
        try:
            user = ("alice", "bob")[i % 2]
            im = imaplib.IMAP4_SSL(HOST, port, ssl_context=sslctx, timeout=60)
            with lock:
                socks.append(im)
            im.login(user, USERS[user])
            try:
                barrier.wait()      # all 200 logged in at the same time
            except threading.BrokenBarrierError:
                pass
            check(im.select("INBOX")[0] == "OK", "select")
            check(im.noop()[0] == "OK", "noop")
            check(im.logout()[0] == "BYE", "logout")
            with lock:
                done.append(i)
        except Exception as e:
            barrier.abort()
            with lock:
                errors.append("session %d: %s: %s" % (i, type(e).__name__, e))

    def close_all():
        for im in list(socks):
            try:
                im.shutdown()
            except Exception:
                pass
    ctx.closers.append(close_all)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    check(not errors, "%d failed, e.g. %s", len(errors), errors[:3])
    check(len(done) == n, "only %d of %d sessions completed", len(done), n)


# ======================================================= k. upstream down

class Forwarder:
    """A TCP relay host:port -> 127.0.0.1:target (a stand-in upstream)."""

    def __init__(self, port, target, host=HOST):
        self.srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((host, port))
        self.srv.listen(16)
        self.target = target
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            b = socket.create_connection((HOST, self.target))
            self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(x, y):
        try:
            while True:
                d = x.recv(65536)
                if not d:
                    break
                y.sendall(d)
        except OSError:
            pass
        for s in (x, y):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        for s in [self.srv] + self.socks:
            try:
                s.close()
            except OSError:
                pass


def _check_unavailable(conn):
    first = conn.readline()
    check(first.upper().startswith(b"* BYE [UNAVAILABLE]"), "first line %r", first)
    conn.read_until_eof()


@test("k: upstream down, plaintext client: * BYE [UNAVAILABLE] then EOF", proxy_only=True)
def t_upstream_down_plain(ctx):
    p = ctx.proxy("updown", upstream="%s:%d" % (HOST, servers.free_port()))
    _check_unavailable(ctx.raw_plain(p.port))
    check(p.alive(), "imapfresh exited")


@test("k: upstream down, implicit-TLS client: * BYE [UNAVAILABLE] then EOF", proxy_only=True)
def t_upstream_down_tls(ctx):
    p = ctx.proxy("updown", upstream="%s:%d" % (HOST, servers.free_port()))
    _check_unavailable(_tls_client_or_report(ctx, p.tls_port))
    check(p.alive(), "imapfresh exited")


@test("k: upstream down then back: the same imapfresh keeps running and serves clients",
      proxy_only=True)
def t_upstream_back(ctx):
    port = servers.free_port()      # nothing listens here yet
    p = ctx.proxy("updown", upstream="%s:%d" % (HOST, port))
    for i in range(3):
        c = ctx.raw_plain(p.port)
        _check_unavailable(c)
    check(p.alive(), "imapfresh exited")
    fwd = Forwarder(port, ctx.dovecot.port)
    ctx.closers.append(fwd.close)
    c = ctx.raw_plain(p.port)
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting once upstream is back: %r", g)
    c2, _ = ctx.session("alice", p.tls_port)
    c2.expect_ok("s", "SELECT INBOX")
    check(p.alive(), "imapfresh exited")


@test("k: upstream given as a host name (localhost) is resolved for each session",
      proxy_only=True)
def t_upstream_by_name(ctx):
    # Address literals skip the resolver (upstream.c); names must still use it.
    p = ctx.proxy("upname", upstream="localhost:%d" % ctx.dovecot.port)
    for i in range(2):
        c, _ = ctx.session("alice", p.tls_port)
        c.expect_ok("n%d" % i, "SELECT INBOX")
    check(p.alive(), "imapfresh exited")


@test("k: upstream given as an IPv6 literal ([::1]:port) is connected to", proxy_only=True)
def t_upstream_ipv6_literal(ctx):
    try:
        fwd = Forwarder(0, ctx.dovecot.port, host="::1")
    except OSError as e:
        raise Skip("no IPv6 loopback here: %s" % e)
    ctx.closers.append(fwd.close)
    p = ctx.proxy("upv6", upstream="[::1]:%d" % fwd.srv.getsockname()[1])
    c, _ = ctx.session("alice", p.tls_port)
    c.expect_ok("v1", "SELECT INBOX")
    check(len(fwd.socks) >= 2, "the forwarder on ::1 relayed %d sockets", len(fwd.socks))


# ======================================================== l. max_line

@test("l: max_line=4096: over-long line gets BAD, session recovers (pre-auth)", proxy_only=True)
def t_max_line_preauth(ctx):
    p = ctx.proxy("maxline", [("max_line", "4096")])
    c = ctx.raw_tls(p.tls_port)
    c.readline()
    tagged, untagged, _ = c.command("a1", b"NOOP " + b"x" * 5000)
    status(tagged, "BAD")
    c.expect_ok("a2", "NOOP")
    c.login("alice", USERS["alice"], "a3")
    c.expect_ok("a4", "SELECT INBOX")


@test("l: max_line=4096: over-long line gets BAD, session recovers (authenticated)",
      proxy_only=True)
def t_max_line_auth(ctx):
    p = ctx.proxy("maxline", [("max_line", "4096")])
    c, _ = ctx.session("alice", p.tls_port)
    c.expect_ok("a0", "SELECT INBOX")
    # Dovecot itself would answer this SEARCH with OK: the BAD is the proxy's.
    tagged, untagged, _ = c.command("a1", b'SEARCH TEXT "' + b"x" * 5000 + b'"')
    status(tagged, "BAD")
    c.expect_ok("a2", "NOOP")
    c.expect_ok("a3", "SEARCH TEXT \"" + "x" * 1000 + "\"")


# ====================================================== m. max_literal

@test("m: max_literal=1k: sync literal over the limit gets BAD [TOOBIG] without '+'",
      proxy_only=True)
def t_max_literal_sync(ctx):
    p = ctx.proxy("maxlit", [("max_literal", "1k")])
    c, _ = ctx.session("alice", p.tls_port)
    mb = ctx.mailbox(c)
    c.send(b"a3 APPEND %s {2000}\r\n" % mb.encode())
    line, _ = c.read_response()
    check(not line.startswith(b"+"), "payload was requested: %r", line)
    while not line.startswith(b"a3 "):
        check(line.startswith(b"*"), "unexpected %r", line)
        line, _ = c.read_response()
    status(line, "BAD")
    check(b"[TOOBIG]" in line.upper(), "no [TOOBIG]: %r", line)
    c.expect_ok("a4", "NOOP")
    small = message("small", b"s" * 300)
    append_sync(c, "a7", mb, small)     # under the limit still works
    check(fetch_bodies(c, "f", mb) == [small], "small message lost")


@test("m: max_literal=1k: LITERAL+ over the limit: BAD [TOOBIG], payload swallowed, not executed",
      proxy_only=True)
def t_max_literal_nonsync(ctx):
    p = ctx.proxy("maxlit", [("max_literal", "1k")])
    c, _ = ctx.session("alice", p.tls_port)
    mb = ctx.mailbox(c)
    evil = b"x1 LOGOUT\r\nx2 DELETE %s\r\nx3 NOOP\r\n" % mb.encode()
    payload = (evil * (2000 // len(evil) + 1))[:2000 - len(evil)] + evil
    check(len(payload) == 2000, "payload size")
    c.send(b"a5 APPEND %s {2000+}\r\n%s\r\n" % (mb.encode(), payload))
    tagged, untagged, _ = c.wait_tagged("a5")
    status(tagged, "BAD")
    check(b"[TOOBIG]" in tagged.upper(), "no [TOOBIG]: %r", tagged)
    tagged, untagged2, _ = c.command("a6", "NOOP")
    status(tagged, "OK")
    stray = [l for l in untagged + untagged2 if re.match(rb"(x\d|\* BYE)", l)]
    check(not stray, "payload executed: %r", stray)
    _, untagged, _ = c.expect_ok("a8", "STATUS %s (MESSAGES)" % mb)
    check(b"MESSAGES 0" in b"".join(untagged), "mailbox changed: %r", untagged)


# ================================================================ n. curl

def curl(*args, input_file=None):
    argv = ["curl", "-s", "-S", "--max-time", "30"] + list(args)
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def need_curl():
    if not shutil.which("curl"):
        if os.environ.get("IMAPFRESH_ALLOW_SKIP") == "1":
            raise Skip("curl not installed")
        raise AssertionError("curl not installed (scripts/test installs it)")


@test("n: curl imaps:// lists INBOX and examines it")
def t_curl_imaps(ctx):
    need_curl()
    u = "alice:" + USERS["alice"]
    rc, out, err = curl("-k", "imaps://%s:%d/" % (HOST, ctx.tls_port), "-u", u)
    check(rc == 0, "curl list rc=%d %s", rc, err)
    check(b"INBOX" in out, "LIST output %r", out[:300])
    rc, out, err = curl("-k", "imaps://%s:%d/INBOX" % (HOST, ctx.tls_port), "-u", u,
                        "-X", "EXAMINE INBOX")
    check(rc == 0, "curl examine rc=%d %s", rc, err)
    check(re.search(rb"\d+ EXISTS", out), "EXAMINE output %r", out[:300])
    rc, out, err = curl("-k", "imaps://%s:%d/INBOX" % (HOST, ctx.tls_port), "-u", u)
    check(rc == 0, "curl imaps://.../INBOX rc=%d %s", rc, err)


@test("n: curl --ssl-reqd imap:// (STARTTLS) lists mailboxes")
def t_curl_starttls(ctx):
    need_curl()
    rc, out, err = curl("--ssl-reqd", "-k", "imap://%s:%d/" % (HOST, ctx.plain_port),
                        "-u", "alice:" + USERS["alice"])
    check(rc == 0, "curl rc=%d %s", rc, err)
    check(b"INBOX" in out, "LIST output %r", out[:300])


@test("n: curl -T uploads (APPEND); fetching ;UID=n back matches")
def t_curl_upload(ctx):
    need_curl()
    u = "alice:" + USERS["alice"]
    tag = "curl-%x" % random.getrandbits(48)
    msg = message(tag, "uploaded by curl\r\n\xe4\xf6\xfc 8-bit line\r\n".encode("latin-1") * 50)
    path = os.path.join(ctx.env.tmp, tag + ".eml")
    with open(path, "wb") as f:
        f.write(msg)
    base = "imaps://%s:%d/INBOX" % (HOST, ctx.tls_port)
    rc, out, err = curl("-k", "-T", path, base, "-u", u)
    check(rc == 0, "upload rc=%d %s", rc, err)
    rc, out, err = curl("-k", base, "-u", u, "-X", "UID SEARCH SUBJECT " + tag)
    check(rc == 0, "search rc=%d %s", rc, err)
    m = re.search(rb"\* SEARCH (\d+)", out)
    check(m, "uploaded message not found: %r", out)
    rc, out, err = curl("-k", "%s;UID=%s" % (base, m.group(1).decode()), "-u", u)
    check(rc == 0, "fetch rc=%d %s", rc, err)
    check(out == msg, "fetched %d bytes != uploaded %d", len(out), len(msg))


# ================================================================ o. CLI

def _good_conf(ctx, name):
    p = ctx.env.new_proxy(name)
    os.makedirs(p.dir, exist_ok=True)
    with open(p.conf, "w") as f:
        f.write(p.config_text())
    return p


def _cli(ctx, *args):
    r = subprocess.run([ctx.env.binary] + list(args), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


@test("o: -t accepts a good config (exit 0)", proxy_only=True)
def t_cli_check_ok(ctx):
    p = _good_conf(ctx, "cli")
    rc, out, err = _cli(ctx, "-t", "-c", p.conf)
    check(rc == 0, "-t exit %d: %s%s", rc, out, err)


@test("o: -t with a bad value exits 2; stderr is one line naming the key", proxy_only=True)
def t_cli_check_bad(ctx):
    p = _good_conf(ctx, "cli")
    for key, val in (("max_line", "12x"), ("timeout_idle", "forever"),
                     ("upstream_tls", "sometimes"), ("require_tls", "maybe"),
                     ("max_literal", "-5")):
        rc, out, err = _cli(ctx, "-t", "-c", p.conf, "-o", "%s=%s" % (key, val))
        check(rc == 2, "%s=%s: exit %d (%s)", key, val, rc, err.strip())
        lines = [l for l in err.splitlines() if l.strip()]
        check(len(lines) == 1 and key in lines[0], "%s=%s: stderr %r", key, val, err)


@test("o: -t with an unknown key, or a bad key in the file, exits 2 naming it", proxy_only=True)
def t_cli_check_unknown(ctx):
    p = _good_conf(ctx, "cli")
    rc, out, err = _cli(ctx, "-t", "-c", p.conf, "-o", "no_such_key=1")
    check(rc == 2 and "no_such_key" in err, "exit %d, stderr %r", rc, err)
    with open(p.conf, "a") as f:
        f.write("max_clients = lots\n")
    rc, out, err = _cli(ctx, "-t", "-c", p.conf)
    check(rc == 2 and "max_clients" in err, "exit %d, stderr %r", rc, err)


@test("o: -v prints a version", proxy_only=True)
def t_cli_version(ctx):
    rc, out, err = _cli(ctx, "-v")
    check(rc == 0, "-v exit %d", rc)
    check(re.search(r"\d+\.\d+", out + err), "no version in %r", out + err)


# ============================================================= p. signals

@test("p: SIGTERM: connected idle client gets * BYE; process exits 0", proxy_only=True)
def t_sigterm(ctx):
    p = ctx.proxy("sigterm")
    c, _ = ctx.session("alice", p.tls_port)
    c.expect_ok("s", "SELECT INBOX")
    c2 = ctx.raw_plain(p.port)
    c2.readline()
    time.sleep(0.2)
    p.signal(signal.SIGTERM)
    data = c.read_until_eof()
    check(re.search(rb"(^|\n)\* BYE", data), "no * BYE for the TLS client: %r", data)
    data2 = c2.read_until_eof()
    check(re.search(rb"(^|\n)\* BYE", data2), "no * BYE for the pre-auth client: %r", data2)
    rc = p.wait(10)
    check(rc == 0, "exit status %s after SIGTERM", rc)


@test("p: SIGHUP reload: live session keeps working, new sessions work", proxy_only=True)
def t_sighup(ctx):
    p = ctx.proxy("sighup")
    c, _ = ctx.session("alice", p.tls_port)
    c.expect_ok("s", "SELECT INBOX")
    p.signal(signal.SIGHUP)
    time.sleep(1.0)
    check(p.alive(), "imapfresh exited on SIGHUP (status %s)", p.proc.returncode)
    c.expect_ok("n", "NOOP")
    c.expect_ok("s2", "SELECT INBOX")
    c2, _ = ctx.session("bob", p.tls_port)
    c2.expect_ok("s", "SELECT INBOX")
    c3 = ctx.raw_plain(p.port)
    check(c3.readline().startswith(b"* OK"), "plaintext listener after SIGHUP")
    c.expect_ok("z", "LOGOUT")


# ================================================================ q. quota

@test("q: GETQUOTAROOT INBOX (Dovecot quota plugin)")
def t_quota(ctx):
    c, caps = ctx.session("carol")
    check("QUOTA" in caps, "QUOTA not advertised: %s", caps)
    tagged, untagged, _ = c.expect_ok("q", "GETQUOTAROOT INBOX")
    text = b"".join(untagged)
    check(re.search(rb'\* QUOTAROOT "?INBOX"? "User quota"', text), "QUOTAROOT: %r", text)
    check(re.search(rb'\* QUOTA "User quota" \(STORAGE \d+ 1048576\)', text), "QUOTA: %r", text)


# ================================================================== main

# The stale-session fix registers its tests after the foundation's.
import stale_tests  # noqa: E402,F401
import fault_tests  # noqa: E402,F401  (issue 6: faults, hostile input; runs last)
import admin_tests  # noqa: E402,F401
import trace_tests  # noqa: E402,F401
import deploy_tests  # noqa: E402,F401
import stress_tests  # noqa: E402,F401  (issue 13: model-checked multi-connection stress)
import seqnum_tests  # noqa: E402,F401  (issue 13: message numbers keep their meaning)
import notify_tests  # noqa: E402,F401  (issue 15: changes made behind imapfresh's back)
import feed_tests  # noqa: E402,F401  (issue 15: the backend's change feed)
import wildduck_tests  # noqa: E402,F401  (issue 15: a real WildDuck)
import compress_tests  # noqa: E402,F401  (issue 16: COMPRESS=DEFLATE)
import clients_tests  # noqa: E402,F401  (issue 16: real client programs)
import status_tests  # noqa: E402,F401  (issue 19: the status page, in a browser)
import sentinel_tests  # noqa: E402,F401  (issue 18: Redis Sentinel)
import fanout_tests  # noqa: E402,F401  (issue 18: changes only to instances that need them)
import upgrade_tests  # noqa: E402,F401  (issue 18: zero-downtime upgrade)
import firstrun_tests  # noqa: E402,F401  (issue 19: first-run surprises)
import redis_auth_tests  # noqa: E402,F401  (Redis that requires AUTH)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", help="path to imapfresh")
    ap.add_argument("--direct", action="store_true",
                    help="point clients straight at Dovecot (harness check)")
    ap.add_argument("--only", action="append", help="run tests whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--exit-zero", action="store_true",
                    help="exit 0 after printing the plan (the TAP driver counts failures)")
    a = ap.parse_args()

    if a.list:
        for t in tap.TESTS:
            print(t["name"])
        return 0
    direct = a.direct
    if not direct:
        if not a.binary or not os.access(a.binary, os.X_OK):
            tap.out("not ok 1 - fixture: imapfresh binary at %s" % a.binary)
            tap.out("1..1")
            return 0 if a.exit_zero else 1
        a.binary = os.path.abspath(a.binary)

    base = os.environ.get("IMAPFRESH_TEST_TMP") or ("/tmp" if os.geteuid() == 0 else None)
    tmp = tempfile.mkdtemp(prefix="it-", dir=base)
    os.chmod(tmp, 0o755)
    env = Env(tmp, a.binary, direct)

    def cleanup():
        env.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    atexit.register(cleanup)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tap.diag("imapfresh integration tests (%s); dir %s" %
             ("direct to Dovecot" if direct else a.binary, tmp))
    started = time.monotonic()
    try:
        env.start()
    except Exception as e:
        tap.out("not ok 1 - fixture: dovecot, redis and imapfresh start")
        tap.diag(str(e))
        tap.out("1..1")
        return 0 if a.exit_zero else 1
    passed, failed, skipped = tap.run(lambda t: Ctx(env, t), direct, a.only,
                                      on_failure=lambda ctx: ctx.failure_report())
    tap.diag("%d passed, %d failed, %d skipped in %.1fs"
             % (passed, failed, skipped, time.monotonic() - started))
    if a.keep:
        tap.diag("kept %s" % tmp)
    return 0 if (a.exit_zero or failed == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
