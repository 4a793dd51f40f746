"""COMPRESS=DEFLATE (RFC 4978) towards the client, terminated by imapfresh
(issue 16, part 3): after the tagged OK both directions are raw DEFLATE,
over TLS; messages come back byte for byte, 8-bit and large ones included.
Each message is compared with what Dovecot itself returns."""

import os
import random
import re
import zlib

import imapraw
from stale_tests import check
from servers import HOST, DEFAULT_USERS as USERS
from tap import test


class Deflated(imapraw.Conn):
    """A raw connection that switches to raw DEFLATE both ways on deflate()."""

    def deflate(self):
        self.out = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inz = zlib.decompressobj(-15)
        self.wire_in = self.wire_out = 0

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        if getattr(self, "out", None) is None:
            return super().send(data)
        self.transcript.append(("C", data[:300]))
        z = self.out.compress(data) + self.out.flush(zlib.Z_SYNC_FLUSH)
        self.wire_out += len(z)
        self.sock.sendall(z)

    def _fill(self):
        if getattr(self, "inz", None) is None:
            return super()._fill()
        while True:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError("connection closed by server")
            self.wire_in += len(chunk)
            data = self.inz.decompress(chunk)
            if data:
                self.transcript.append(("S", data[:300]))
                self.buf += data
                return


def messages():
    rnd = random.Random(16)
    eight = (b"From: ann@example.com\r\nSubject: =?utf-8?q?8bit?=\r\nContent-Type: text/plain; "
             b"charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             + "Grüße, ¡Olé! 日本語\r\n".encode() * 200)
    binary = bytes(rnd.randrange(1, 256) for _ in range(200000)).replace(b"\r\n", b"xx")
    binmsg = b"From: b@example.com\r\nSubject: 8-bit body\r\n\r\n" + binary.replace(b"\n", b" ").replace(b"\r", b" ") + b"\r\n"
    big = b"From: c@example.com\r\nSubject: big\r\n\r\n" + b"".join(
        b"%08d %s\r\n" % (i, bytes(rnd.randrange(33, 127) for _ in range(60)))
        for i in range(20 * 1024 * 1024 // 70))
    return [eight, binmsg, big]


def session(ctx, port, cls=imapraw.Conn):
    c = cls(HOST, port, tls=True, ctx=ctx.sslctx(), timeout=30, server_hostname=HOST)
    ctx.closers.append(c.close)
    ctx.conns.append(c)
    check(c.readline().startswith(b"* OK"), "greeting")
    c.login("bob", USERS["bob"])
    return c


def fetch_bodies(c, n):
    out = []
    for i in range(1, n + 1):
        tagged, untagged, lits = c.command("F%d" % i, "FETCH %d BODY.PEEK[]" % i)
        check(tagged.startswith(b"F%d OK" % i) and len(lits) == 1, "FETCH %d: %r", i, tagged)
        out.append(lits[0])
    return out


@test("compress: COMPRESS DEFLATE over TLS; 8-bit, binary-ish and 20 MB messages come back "
      "byte for byte, as Dovecot returns them", proxy_only=True, timeout=180)
def t_compress_roundtrip(ctx):
    c = session(ctx, ctx.tls_port, Deflated)
    _, lines, _ = c.expect_ok("C0", "CAPABILITY")
    check(b"COMPRESS=DEFLATE" in b"".join(lines), "offered: %r", lines)
    tagged, _, _ = c.command("Z1", "COMPRESS DEFLATE")
    check(tagged.startswith(b"Z1 OK"), "COMPRESS: %r", tagged)
    c.deflate()
    box = "Cz%d_%04x" % (os.getpid(), random.getrandbits(16))
    c.expect_ok("M1", "CREATE " + box)
    msgs = messages()
    for i, m in enumerate(msgs):
        c.expect_ok("A%d" % i, b"APPEND %s {%d+}\r\n%s" % (box.encode(), len(m), m))
    c.expect_ok("S1", "SELECT " + box)
    got = fetch_bodies(c, len(msgs))
    check(got == msgs, "through DEFLATE: bodies %s", [len(x) for x in got])
    tagged, _, _ = c.command("Z2", "COMPRESS DEFLATE")
    check(re.match(rb"Z2 NO \[COMPRESSIONACTIVE\]", tagged), "second COMPRESS: %r", tagged)
    check(c.wire_in < sum(len(m) for m in msgs), "it is compressed: %d bytes on the wire for "
          "%d", c.wire_in, sum(len(m) for m in msgs))
    direct = session(ctx, ctx.dovecot.tls_port)
    direct.expect_ok("S2", "SELECT " + box)
    check(fetch_bodies(direct, len(msgs)) == got, "the same bytes as Dovecot returns")
    c.expect_ok("L1", "LOGOUT")


@test("compress: refused before login, with a wrong argument, and pipelined", proxy_only=True)
def t_compress_refusals(ctx):
    c = imapraw.Conn(HOST, ctx.tls_port, tls=True, ctx=ctx.sslctx(), server_hostname=HOST)
    ctx.closers.append(c.close)
    c.readline()
    tagged, _, _ = c.command("Z0", "COMPRESS DEFLATE")
    check(tagged.startswith(b"Z0 BAD"), "before login: %r", tagged)
    c.login("bob", USERS["bob"])
    tagged, _, _ = c.command("Z1", "COMPRESS GZIP")
    check(tagged.startswith(b"Z1 BAD"), "GZIP: %r", tagged)
    c.send(b"N1 NOOP\r\nZ2 COMPRESS DEFLATE\r\n")
    seen = {}
    while len(seen) < 2:        # tagged answers may come in either order
        line = c.readline()
        if line[:3] in (b"N1 ", b"Z2 "):
            seen[line[:2]] = line
    check(seen[b"Z2"].startswith(b"Z2 BAD"), "pipelined: %r", seen)
    c.expect_ok("N2", "NOOP")       # and the session goes on uncompressed
