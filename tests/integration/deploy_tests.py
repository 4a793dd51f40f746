"""Deployment behind load balancers and in front of real servers: PROXY
protocol from trusted balancers only, the real client address passed to
Dovecot by ID or by a PROXY header, and the client's own ID before login.
"""

import re
import socket
import struct
import time

import imapraw
from servers import HOST, DEFAULT_USERS as USERS
from tap import test

TIMEOUT = 10.0


def check(cond, msg, *args):
    if not cond:
        raise AssertionError(msg % args if args else msg)


def v2_header(src_ip, src_port, dst_ip, dst_port):
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    body = (socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) +
            struct.pack("!HH", src_port, dst_port))
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def raw(ctx, port):
    c = imapraw.Conn(HOST, port, timeout=TIMEOUT)
    ctx.closers.append(c.close)
    ctx.conns.append(c)
    return c


def wait_log(ctx, mark, pattern, what):
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        text = ctx.dovecot.log_since(mark)
        m = re.search(pattern, text)
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError("Dovecot never logged %s; log:\n%s" % (what, ctx.dovecot.log_since(mark)[-1500:]))


def proxy_with(ctx, name, *options, upstream=None):
    return ctx.proxy(name, options=[("require_tls", "no")] + list(options), upstream=upstream)


def login_behind(ctx, p, header, what, ip):
    """A balancer's header, then alice logs in: Dovecot must log ip as rip."""
    mark = ctx.dovecot.log_size()
    c = raw(ctx, p.port)
    c.send(header)
    check(c.readline().startswith(b"* OK"), "greeting after " + what)
    c.login("alice", USERS["alice"])
    wait_log(ctx, mark, r"Login: user=<alice>.*rip=" + re.escape(ip), "rip=" + ip)


@test("deploy: PROXY v1 from a trusted balancer; Dovecot logs the real client address (ID)",
      proxy_only=True)
def t_proxy_v1_id(ctx):
    p = proxy_with(ctx, "pp-v1", ("proxy_protocol_trusted", "127.0.0.1"),
                   ("upstream_client_address", "id"))
    login_behind(ctx, p, b"PROXY TCP4 192.0.2.10 127.0.0.1 50123 143\r\n", "the PROXY header",
                 "192.0.2.10")


@test("deploy: PROXY v2 from a trusted balancer, passed on as a PROXY header (proxy-v2)",
      proxy_only=True)
def t_proxy_v2_proxy(ctx):
    p = proxy_with(ctx, "pp-v2", ("proxy_protocol_trusted", "127.0.0.0/8"),
                   ("upstream_client_address", "proxy-v2"),
                   upstream="%s:%d" % (HOST, ctx.dovecot.haproxy_port))
    login_behind(ctx, p, v2_header("198.51.100.7", 40000, "127.0.0.1", 143), "the v2 header",
                 "198.51.100.7")


@test("deploy: a PROXY header from an untrusted address is refused; others unaffected",
      proxy_only=True)
def t_proxy_untrusted(ctx):
    p = proxy_with(ctx, "pp-untrusted")     # nobody is trusted
    c = raw(ctx, p.port)
    check(c.readline().startswith(b"* OK"), "greeting")
    c.send(b"PROXY TCP4 192.0.2.99 127.0.0.1 50123 143\r\n")
    rest = c.read_until_eof()
    check(b"* BYE" in rest, "the header is answered with BYE: %r", rest)
    ok = raw(ctx, p.port)
    check(ok.readline().startswith(b"* OK"), "another client is served")
    ok.login("alice", USERS["alice"])
    check("PROXY header from an untrusted address" in open(p.log).read(), "logged")


@test("deploy: a trusted balancer that sends no PROXY header is refused", proxy_only=True)
def t_proxy_missing(ctx):
    p = proxy_with(ctx, "pp-missing", ("proxy_protocol_trusted", "127.0.0.1"))
    c = raw(ctx, p.port)
    c.send(b"a1 LOGIN alice x\r\n")
    rest = c.read_until_eof()
    check(b"a1 OK" not in rest and b"* OK" not in rest, "nothing served: %r", rest)
    check("did not start with a PROXY header" in open(p.log).read(), "logged")


@test("deploy: the client's own ID before login is forwarded, with the proxy's fields added",
      proxy_only=True)
def t_client_id(ctx):
    p = proxy_with(ctx, "pp-id", ("upstream_client_address", "id"))
    mark = ctx.dovecot.log_size()
    c = raw(ctx, p.port)
    c.readline()
    tagged, untagged, _ = c.expect_ok("I1", 'ID ("name" "deploy-test" "version" "1")')
    check(any(l.startswith(b"* ID") for l in untagged), "the client gets Dovecot's ID answer")
    check(len([l for l in untagged if l.startswith(b"* ID")]) == 1, "exactly one: %r", untagged)
    m = wait_log(ctx, mark, r"ID sent: .*name=deploy-test.*", "the client's ID")
    check("x-session-id=" in m.group(0) and "x-originating-ip=127.0.0.1" in m.group(0),
          "the proxy's fields travel with the client's ID: %s", m.group(0))
    c.login("alice", USERS["alice"])
