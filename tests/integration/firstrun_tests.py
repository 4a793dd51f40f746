"""What a newcomer meets first (issue 19, part 4): plaintext LOGIN from
loopback (secure_networks), TLS links that end with close_notify on both
sides, a port probe that is not a failed handshake, the admin port of a
second instance, and the log lines for LOGOUT, failed logins and signals."""

import base64
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import zlib

import imapraw
import servers
from admin_tests import ctl_path, log_text, metric, scrape
from imapraw import capabilities, status
from servers import HOST, DEFAULT_USERS as USERS
from stale_tests import check, wait_for
from tap import test

TIMEOUT = 10.0


# ------------------------------------------------------------------ helpers

def strict_context(ctx):
    return imapraw.client_context(cafile=ctx.env.ca)


def recv_line(sock, buf):
    while b"\r\n" not in buf[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("EOF before a full line; got %r" % buf[0][-200:])
        buf[0] += chunk
    line, buf[0] = buf[0].split(b"\r\n", 1)
    return line


def cmd(sock, buf, tag, line):
    sock.sendall(tag + b" " + line + b"\r\n")
    while True:
        got = recv_line(sock, buf)
        if got.startswith(tag + b" "):
            return got


def read_to_eof(sock, buf):
    """Everything up to the server's EOF, with suppress_ragged_eofs=False:
    a close without close_notify raises SSLEOFError, which fails the test."""
    data = buf[0]
    sock.settimeout(TIMEOUT)
    while True:
        try:
            chunk = sock.recv(65536)
        except ssl.SSLEOFError as e:
            raise AssertionError("the TLS link ended without close_notify (%s) after %d "
                                 "bytes, ending %r" % (e, len(data), data[-40:]))
        if not chunk:
            return data
        data += chunk


def strict_tls(ctx, port, starttls):
    """A TLS connection that does not forgive a missing close_notify."""
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    buf = [b""]
    if starttls:
        recv_line(raw, buf)
        status(cmd(raw, buf, b"s", b"STARTTLS"), "OK")
        check(buf[0] == b"", "bytes after the STARTTLS OK: %r", buf[0])
    sock = strict_context(ctx).wrap_socket(raw, server_hostname=HOST,
                                           suppress_ragged_eofs=False)
    sock.settimeout(TIMEOUT)
    ctx.closers.append(sock.close)
    if not starttls:
        recv_line(sock, buf)
    return sock, buf


def login_logout_clean_eof(ctx, port, starttls):
    sock, buf = strict_tls(ctx, port, starttls)
    status(cmd(sock, buf, b"l", b'LOGIN "alice" "%s"' % USERS["alice"].encode()), "OK")
    status(cmd(sock, buf, b"o", b"LOGOUT"), "OK")
    rest = read_to_eof(sock, buf)
    check(b"\r\n" not in rest.strip(), "bytes after LOGOUT's OK: %r", rest)


def wait_log(p, pattern, what, deadline=10.0):
    wait_for(lambda: re.search(pattern, log_text(p), re.M), what, deadline)
    return re.search(pattern, log_text(p), re.M)


# --------------------------------------------------- close_notify, client side

@test("firstrun: after LOGOUT imapfresh ends the TLS link with close_notify: implicit TLS "
      "and STARTTLS, a strict client (suppress_ragged_eofs=False) sees a clean EOF",
      proxy_only=True)
def t_close_notify_client(ctx):
    p = ctx.proxy("closenotify")
    login_logout_clean_eof(ctx, p.tls_port, starttls=False)
    login_logout_clean_eof(ctx, p.port, starttls=True)
    # The client closes first: its close_notify is answered with ours.
    sock, buf = strict_tls(ctx, p.tls_port, starttls=False)
    status(cmd(sock, buf, b"l", b'LOGIN "alice" "%s"' % USERS["alice"].encode()), "OK")
    try:
        sock.unwrap()       # sends close_notify, waits for the server's
    except (ssl.SSLError, OSError) as e:
        raise AssertionError("no close_notify in answer to the client's: %r" % e)
    wait_log(p, r"closing: client closed the connection", "the close in the log")


def compressed_fetch_then_logout(ctx, name):
    """A 6 MB message, then over strict TLS: LOGIN, SELECT, COMPRESS DEFLATE
    and a FETCH of it with LOGOUT behind, sent together and not read.
    Returns the proxy, the socket, its read buffer and the message."""
    p = ctx.proxy(name)
    c, _ = ctx.session("alice", p.tls_port, timeout=30)
    box = ctx.mailbox(c, "Z")
    body = base64.encodebytes(os.urandom(6 << 20))       # compresses little
    msg = b"Subject: big\r\n\r\n" + body.replace(b"\n", b"\r\n")
    c.expect_ok("a", b"APPEND %s {%d+}\r\n%s" % (box.encode(), len(msg), msg))
    c.close()
    sock, buf = strict_tls(ctx, p.tls_port, starttls=False)
    status(cmd(sock, buf, b"l", b'LOGIN "alice" "%s"' % USERS["alice"].encode()), "OK")
    status(cmd(sock, buf, b"s", b"SELECT " + box.encode()), "OK")
    status(cmd(sock, buf, b"z", b"COMPRESS DEFLATE"), "OK")
    out = zlib.compressobj(6, zlib.DEFLATED, -15)
    sock.sendall(out.compress(b"f FETCH 1 BODY[]\r\no LOGOUT\r\n") +
                 out.flush(zlib.Z_SYNC_FLUSH))
    return p, sock, buf, msg


@test("firstrun: with COMPRESS=DEFLATE, a big FETCH and LOGOUT sent together, read only "
      "later: all of it arrives, then close_notify (the link under the filter drains first)",
      proxy_only=True, timeout=90)
def t_close_notify_compress(ctx):
    p, sock, buf, msg = compressed_fetch_then_logout(ctx, "closenotify-z")
    check(buf[0] == b"", "bytes after COMPRESS's OK: %r", buf[0])
    inz = zlib.decompressobj(-15)
    # Not reading: the session ends (the upstream closes after LOGOUT)
    # while its last compressed bytes still wait under the filter.
    wait_log(p, r"closing: client logged out$", "the LOGOUT's close", 30)
    text = inz.decompress(read_to_eof(sock, [b""]))
    check(msg in text, "the FETCH came back cut: %d bytes of %d", len(text), len(msg))
    check(re.search(rb"\r\no OK", text), "no LOGOUT OK before the clean EOF: %r", text[-300:])


@test("firstrun: with COMPRESS=DEFLATE, a client that never reads after LOGOUT does not hold "
      "its session past the 10 s close flush (the link under the filter times out too)",
      proxy_only=True, timeout=90)
def t_compress_close_no_reader(ctx):
    p, sock, buf, msg = compressed_fetch_then_logout(ctx, "closenotify-zstuck")
    m = wait_log(p, r"(s\d+): closing: client logged out$", "the LOGOUT's close", 30)
    # timeout_idle (30 min) would keep it; the close flush limit is 10 s.
    wait_log(p, r"%s: disconnected after" % m.group(1), "the session freed", 40)


# ------------------------------------------------- close_notify, upstream side

class TlsUpstream:
    """A tiny IMAP server over TLS, as imapfresh's upstream: notes, per
    connection, whether imapfresh's end came with close_notify."""

    def __init__(self, ctx):
        self.sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.sctx.load_cert_chain(ctx.env.dovecot.certs["cert"], ctx.env.dovecot.certs["key"])
        self.lsock = socket.socket()
        self.lsock.bind((HOST, 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        # "clean", "ragged: ..." or "logout-answered", for connections that
        # carried a command (not those of the harness's port probes, whose
        # ends race with the test's)
        self.ends = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _end(self, what, used):
        if used:
            with self.lock:
                self.ends.append(what)

    def _serve(self, raw):
        try:
            raw.settimeout(TIMEOUT)
            s = self.sctx.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
        except (ssl.SSLError, OSError):
            raw.close()     # the harness's port probes
            return
        buf, used = [b""], False
        try:
            s.sendall(b"* OK [CAPABILITY IMAP4rev1] fake ready\r\n")
            while True:
                line = recv_line(s, buf)
                used = True
                tag, _, rest = line.partition(b" ")
                word = rest.split(b" ", 1)[0].upper()
                if word == b"LOGOUT":
                    s.sendall(b"* BYE logging out\r\n" + tag + b" OK done\r\n")
                    s.unwrap()      # close_notify, and wait for imapfresh's
                    self._end("logout-answered", used)
                    return
                s.sendall(tag + b" OK done\r\n")
        except AssertionError:      # recv_line: a clean EOF (close_notify)
            self._end("clean", used)
        except ssl.SSLEOFError as e:
            self._end("ragged: %s" % e, used)
        except (ssl.SSLError, OSError) as e:
            self._end("error: %r" % e, used)
        finally:
            s.close()

    def wait_ends(self, n):
        wait_for(lambda: len(self.ends) >= n, "%d upstream connection ends" % n)
        with self.lock:
            return list(self.ends)

    def close(self):
        self.lsock.close()


@test("firstrun: imapfresh ends its upstream TLS link with close_notify, when the client "
      "leaves and after LOGOUT (a strict TLS server as the upstream)", proxy_only=True)
def t_close_notify_upstream(ctx):
    up = TlsUpstream(ctx)
    ctx.closers.append(up.close)
    p = ctx.proxy("closenotify-up", [("upstream_tls_verify", "no")],
                  upstream="%s:%d" % (HOST, up.port), upstream_tls="tls")
    # The client goes away without a word: imapfresh closes the upstream.
    c = ctx.raw_tls(p.tls_port)
    c.readline()
    c.expect_ok("n", "NOOP")
    c.close()
    ends = up.wait_ends(1)
    check(ends[0] == "clean", "upstream link after the client left: %s", ends[0])
    # LOGOUT: the upstream sends close_notify first and waits for imapfresh's.
    c = ctx.raw_tls(p.tls_port)
    c.readline()
    c.expect_ok("o", "LOGOUT")
    ends = up.wait_ends(2)
    check(ends[1] == "logout-answered", "upstream link after LOGOUT: %s", ends[1])


# ------------------------------------------------------------- port probes

@test("firstrun: a TCP connect closed before any ClientHello byte is no TLS handshake "
      "failure (/metrics) and logs no error; a garbage handshake still counts", proxy_only=True)
def t_probe_not_handshake_failure(ctx):
    p = ctx.proxy("probe")
    # The harness's own port probes at start are over first.
    wait_for(lambda: log_text(p).count("connect from") == log_text(p).count("disconnected after"),
             "the harness's probes to end")
    before = metric(scrape(p.admin_port), "imapfresh_tls_handshake_failures_total")
    mark = os.path.getsize(p.log)
    s = socket.create_connection((HOST, p.tls_port), timeout=TIMEOUT)
    s.close()
    wait_for(lambda: "disconnected after" in log_text(p)[mark:], "the probe's end in the log")
    logged = log_text(p)[mark:]
    check("closing:" not in logged and "error:" not in logged,
          "a port probe logged at info: %r", logged)
    after = metric(scrape(p.admin_port), "imapfresh_tls_handshake_failures_total")
    check(after == before, "a port probe counted as a TLS handshake failure: %s -> %s",
          before, after)
    s = socket.create_connection((HOST, p.tls_port), timeout=TIMEOUT)
    s.sendall(b"a LOGIN not tls\r\n")
    s.settimeout(TIMEOUT)
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
    wait_for(lambda: metric(scrape(p.admin_port), "imapfresh_tls_handshake_failures_total")
             == before + 1, "a garbage handshake counted")


# ----------------------------------------------------------- secure_networks

@test("firstrun: plaintext LOGIN from loopback works by default (secure_networks), and "
      "secure_networks empty refuses it with a text that names require_tls", proxy_only=True)
def t_loopback_secure(ctx):
    p = ctx.proxy("loopback", secure_loopback=True)
    c = ctx.raw_plain(p.port)
    caps = capabilities(c.readline())
    check("LOGINDISABLED" not in caps and "AUTH=PLAIN" in caps,
          "loopback plaintext caps: %s", sorted(caps))
    c.login("alice", USERS["alice"])
    c.expect_ok("s", "SELECT INBOX")
    q = ctx.proxy("loopback-off", [("secure_networks", "")], secure_loopback=True)
    c = ctx.raw_plain(q.port)
    caps = capabilities(c.readline())
    check("LOGINDISABLED" in caps, "secure_networks empty: caps %s", sorted(caps))
    tagged, _, _ = c.command("a", "LOGIN alice " + USERS["alice"])
    status(tagged, "NO")
    check(b"[PRIVACYREQUIRED]" in tagged and b"require_tls" in tagged,
          "the refusal does not name require_tls: %r", tagged)
    wait_log(q, r"LOGIN refused: plaintext link from 127\.0\.0\.1:\d+ \(require_tls",
             "the refusal in the log")


def proxy_v1(src):
    return b"PROXY TCP4 %s 127.0.0.1 40000 143\r\n" % src.encode()


@test("firstrun: behind a PROXY header secure_networks judges the real client, not the "
      "balancer on loopback", proxy_only=True)
def t_loopback_secure_proxy(ctx):
    p = ctx.proxy("loopback-pp", [("proxy_protocol_trusted", "127.0.0.1")],
                  secure_loopback=True)
    for src, allowed in (("192.0.2.7", False), ("127.0.0.9", True)):
        c = ctx.raw_plain(p.port)
        c.send(proxy_v1(src))
        c.readline()
        tagged, _, _ = c.command("a", "LOGIN alice " + USERS["alice"])
        if allowed:
            status(tagged, "OK")
        else:
            status(tagged, "NO")
            check(b"[PRIVACYREQUIRED]" in tagged, "client %s: %r", src, tagged)
    c = ctx.raw_plain(p.port)       # a LOCAL header names no client: not secure
    c.send(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
    c.readline()
    status(c.command("a", "LOGIN alice " + USERS["alice"])[0], "NO")


# -------------------------------------------------------------- admin port

@test("firstrun: a second instance with the same admin_listen stops at start with an error "
      "that names admin_listen and says what to do", proxy_only=True)
def t_admin_port_clash(ctx):
    p = ctx.proxy("admin-first")
    q = ctx.proxy("admin-second", start=False)
    q.admin_port = p.admin_port
    try:
        q.start(deadline=5)
    except servers.FixtureError:
        pass
    rc = q.wait(10)
    text = log_text(q)
    check(rc == 1, "second instance: exit status %s:\n%s", rc, text[-800:])
    check(re.search(r"admin_listen 127\.0\.0\.1:%d: .*in use.*another imapfresh.*admin_listen ="
                    % p.admin_port, text), "the error: %r", text[-600:])
    check(p.alive(), "the first instance died")


# -------------------------------------------------------------- log lines

@test("firstrun: LOGOUT is logged as 'client logged out', not as an upstream close",
      proxy_only=True)
def t_logout_log_line(ctx):
    p = ctx.proxy("logout-log")
    c, _ = ctx.session("alice", p.tls_port)
    c.expect_ok("o", "LOGOUT")
    c.read_until_eof()
    wait_log(p, r"closing: client logged out$", "the LOGOUT in the log")
    check("upstream closed the connection" not in log_text(p),
          "LOGOUT logged as an upstream close: %r", log_text(p)[-600:])


@test("firstrun: a refused LOGIN and AUTHENTICATE are logged at info with user and client, "
      "never the password", timeout=90, proxy_only=True)
def t_failed_login_log_line(ctx):
    p = ctx.proxy("loginfail-log")
    c = ctx.raw_tls(p.tls_port, timeout=25)
    c.readline()
    status(c.command("a", "LOGIN alice wrong-Pa55word")[0], "NO")
    port = c.sock.getsockname()[1]
    wait_log(p, r"login failed: user=<alice> from 127\.0\.0\.1:%d: NO" % port,
             "the failed LOGIN in the log")
    ir = base64.b64encode(b"\0bob\0other-Pa55word").decode()
    status(c.command("b", "AUTHENTICATE PLAIN " + ir)[0], "NO")
    wait_log(p, r"login failed: user=<bob> from 127\.0\.0\.1:%d" % port,
             "the failed AUTHENTICATE in the log")
    text = log_text(p)
    check("Pa55word" not in text, "a password in the log")


def wait_signal_line(p, name):
    rc = p.wait(15)
    check(rc == 0, "exit status %s after %s", rc, name)
    return log_text(p)


@test("firstrun: SIGINT is logged as SIGINT, by one process and by each worker "
      "(the master passes on the signal it got)", proxy_only=True, timeout=60)
def t_signal_names(ctx):
    p = ctx.proxy("sigint")
    p.signal(signal.SIGINT)
    text = wait_signal_line(p, "SIGINT")
    check(re.search(r"SIGINT: shutting down", text) and "SIGTERM" not in text,
          "the shutdown line: %r", text[-600:])
    q = ctx.proxy("sigint-workers", [("workers", "2"), ("state", ctx.env.redis.url),
                                     ("admin_listen", "")])
    wait_for(lambda: len(re.findall(r"imapfresh \S+ started", log_text(q))) >= 2,
             "both workers started")
    q.signal(signal.SIGINT)
    text = wait_signal_line(q, "SIGINT")
    check(len(re.findall(r"worker \d.*SIGINT: shutting down", text)) == 2 and
          "SIGTERM" not in text, "the workers' shutdown lines: %r", text[-900:])


# ------------------------------------------------------------ imapfresh-ctl

@test("firstrun: imapfresh-ctl without -c reads $IMAPFRESH_CONFIG; without either it says "
      "which configuration it lacked", proxy_only=True)
def t_ctl_finds_config(ctx):
    d = os.path.join(ctx.env.tmp, "proxy")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "ctl-env.conf")
    with open(conf, "w") as f:
        f.write("state = %s\nredis_prefix = firstrun-ctl:\n" % ctx.env.redis.url)

    def run(env_conf):
        env = dict(os.environ)
        env.pop("IMAPFRESH_CONFIG", None)
        if env_conf:
            env["IMAPFRESH_CONFIG"] = env_conf
        r = subprocess.run([ctl_path(ctx), "events", "-n", "1"], env=env, timeout=20,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        return r.returncode, r.stderr.decode(errors="replace")

    rc, err = run(conf)
    check(rc == 0 and "no event source" not in err, "with IMAPFRESH_CONFIG: %d %r", rc, err)
    usage = subprocess.run([ctl_path(ctx), "-h"], stdout=subprocess.PIPE, timeout=20).stdout
    default = re.search(rb"else (\S+)", usage)
    if default and os.path.exists(default.group(1).decode()):
        return      # this host has an installed configuration: it is read instead
    rc, err = run(None)
    check(rc == 1 and "no event source" in err, "without a configuration: %d %r", rc, err)
    check("-c FILE" in err or " has no Redis state" in err,
          "the error does not say which configuration: %r", err)
