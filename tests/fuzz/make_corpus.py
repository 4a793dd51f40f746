#!/usr/bin/env python3
"""Regenerate the fuzz seed corpus (tests/fuzz/corpus/<target>/seed-*).

    tests/fuzz/make_corpus.py [--out tests/fuzz/corpus]

Starts a throwaway Dovecot (tests/integration/servers.py), runs realistic
sessions against it (login forms, SELECT/EXAMINE, FETCH of every common
item, APPEND with synchronizing, non-synchronizing and binary literals,
MULTIAPPEND, IDLE woken by another session, CONDSTORE/QRESYNC with VANISHED
and ESEARCH, MOVE/COPY/EXPUNGE, quota, errors) and records each session's
bytes both ways:

  lex_client/seed-<name>   3 option bytes + what the client sent
  lex_server/seed-<name>   3 option bytes + what Dovecot answered
  track/seed-<name>        4 option bytes + Dovecot's answers after login
  seqmap/seed-<n>          operation sequences (deterministic, no Dovecot)

plus hand-written inputs for what Dovecot does not send here (see HAND).
The option bytes are documented at the top of each target's source.
Regression inputs (crash-*, timeout-*, regress-*) are never touched.
Needs dovecot (Debian: dovecot-imapd); Python 3 standard library only.
"""

import argparse
import base64
import hashlib
import os
import random
import shutil
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import servers  # noqa: E402
from servers import HOST, DEFAULT_USERS as USERS  # noqa: E402


class Rec:
    """A plaintext IMAP connection that keeps every byte both ways."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sent = bytearray()
        self.got = bytearray()
        self.buf = b""
        self.mark_got = 0

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sent += data
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("closed")
        self.got += chunk
        self.buf += chunk

    def line(self):
        while b"\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\n") + 1
        l, self.buf = self.buf[:i], self.buf[i:]
        return l

    def response(self):
        """A line with its literals."""
        out = b""
        while True:
            l = self.line()
            out += l
            s = l.rstrip(b"\r\n")
            if s.endswith(b"}") and b"{" in s:
                n = int(s[s.rindex(b"{") + 1:-1].rstrip(b"+"))
                while len(self.buf) < n:
                    self._fill()
                out += self.buf[:n]
                self.buf = self.buf[n:]
                continue
            return out

    def until(self, tag):
        tag = tag.encode() + b" "
        while True:
            r = self.response()
            if r.startswith(tag):
                return r

    def cont(self):
        while True:
            r = self.response()
            if r.startswith(b"+"):
                return r

    def cmd(self, tag, text):
        if isinstance(text, str):
            text = text.encode()
        before = len(self.got) - len(self.buf)
        self.send(tag.encode() + b" " + text + b"\r\n")
        self.until(tag)
        return bytes(self.got[before:len(self.got) - len(self.buf)])

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def msg(subject, body=b"Hello from the fuzz corpus.\r\n"):
    return (b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + hashlib.md5(subject.encode()).hexdigest().encode()
            + b"@fuzz>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            + body)


def append_sync(c, tag, mb, m, flags=b""):
    c.send(b"%s APPEND %s %s{%d}\r\n" % (tag.encode(), mb.encode(), flags, len(m)))
    c.cont()
    c.send(m + b"\r\n")
    return c.until(tag)


def login(c, user="alice"):
    c.line()
    c.cmd("a1", b'LOGIN %s "%s"' % (user.encode(), USERS[user].encode()))


# --------------------------------------------------------------- scenarios

def s_basic(port, mb):
    c = Rec(port)
    c.line()
    c.cmd("a0", "CAPABILITY")
    c.cmd("a1", "LOGIN alice alice-pw")
    c.cmd("a2", 'LIST "" "*"')
    c.cmd("a3", "NAMESPACE")
    c.cmd("a4", "CREATE " + mb)
    for i in range(3):
        append_sync(c, "b%d" % i, mb, msg("basic %d" % i, b"line\r\n" * (i + 1)),
                    b"(\\Seen) " if i == 1 else b"")
    c.cmd("a5", "SELECT " + mb)
    c.cmd("a6", "FETCH 1:* (FLAGS UID RFC822.SIZE INTERNALDATE)")
    c.cmd("a7", "FETCH 1 (BODY.PEEK[] BODYSTRUCTURE ENVELOPE)")
    c.cmd("a8", "UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])")
    c.cmd("a9", "FETCH 2 (BODY.PEEK[TEXT]<0.5> BODY.PEEK[1.MIME])")
    c.cmd("a10", "SEARCH ALL")
    c.cmd("a11", "UID SEARCH SUBJECT basic")
    c.cmd("a12", "STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
    c.cmd("a13", "GETQUOTAROOT INBOX")
    c.cmd("a14", "STORE 1 +FLAGS (\\Flagged)")
    c.cmd("a15", "NOOP")
    c.cmd("a16", "LOGOUT")
    c.close()
    return c


def s_literals(port, mb):
    c = Rec(port)
    c.line()
    c.send(b"a1 LOGIN {5}\r\n")
    c.cont()
    c.send(b"carol {8}\r\n")
    c.cont()
    c.send(USERS["carol"].encode() + b"\r\n")
    c.until("a1")
    c.cmd("a2", "CREATE " + mb)
    m = msg("literal plus", "8-bit \xe9t\xe9 \xff\r\n".encode("latin-1"))
    c.send(b"a3 APPEND %s {%d+}\r\n%s\r\n" % (mb.encode(), len(m), m))
    c.until("a3")
    ms = [msg("multi %d" % i) for i in range(3)]
    c.send(b"a4 APPEND %s (\\Seen) {%d}\r\n" % (mb.encode(), len(ms[0])))
    c.cont()
    c.send(ms[0] + b" (\\Flagged) {%d}\r\n" % len(ms[1]))
    c.cont()
    c.send(ms[1] + b" {%d}\r\n" % len(ms[2]))
    c.cont()
    c.send(ms[2] + b"\r\n")
    c.until("a4")
    bin_msg = msg("binary", b"nul \x00 byte\r\n")
    c.send(b"a5 APPEND %s ~{%d+}\r\n%s\r\n" % (mb.encode(), len(bin_msg), bin_msg))
    c.until("a5")
    c.cmd("a6", "SELECT " + mb)
    c.cmd("a7", "FETCH 1:* (BINARY.PEEK[] BINARY.SIZE[])")
    c.cmd("a8", "SEARCH TEXT {4+}\r\nnull")
    c.cmd("a9", 'SEARCH SUBJECT "quoted \\"string\\""')
    c.cmd("a10", "COPY 1:2 INBOX")
    c.cmd("a11", "MOVE 3 INBOX")
    c.cmd("a12", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    c.cmd("a13", "EXPUNGE")
    c.cmd("a14", "UID EXPUNGE 1:*")
    c.cmd("a15", "CLOSE")
    c.cmd("a16", "LOGOUT")
    c.close()
    return c


def s_auth(port, mb):
    c = Rec(port)
    c.line()
    c.send(b"a1 AUTHENTICATE PLAIN\r\n")
    c.cont()
    c.send(base64.b64encode(b"\0bob\0" + USERS["bob"].encode()) + b"\r\n")
    c.until("a1")
    c.cmd("a2", "EXAMINE INBOX")
    c.cmd("a3", "UNSELECT")
    c.cmd("a4", "LOGOUT")
    c.close()
    return c


def s_errors(port, mb):
    c = Rec(port)
    c.line()
    c.cmd("a1", "LOGIN alice wrong")
    c.cmd("a2", "SELECT INBOX")
    c.cmd("a3", "LOGIN alice alice-pw")
    c.cmd("a4", "SELECT NoSuchMailbox")
    c.cmd("a5", "FETCH 1 (FLAGS)")
    c.cmd("a6", "BOGUS command")
    c.cmd("a7", "FETCH")
    c.cmd("a8", "SELECT INBOX")
    c.cmd("a9", "FETCH 999999 (UID)")
    c.cmd("a10", "UID FETCH 4294967295 (FLAGS)")
    c.cmd("a11", "LOGOUT")
    c.close()
    return c


def s_idle(port, mb):
    c = Rec(port)
    login(c)
    c.cmd("a2", "CREATE " + mb)
    c.cmd("a3", "SELECT " + mb)
    c.send(b"a4 IDLE\r\n")
    c.cont()
    o = Rec(port)
    login(o)
    append_sync(o, "x1", mb, msg("idle wakeup"))
    o.cmd("x2", "SELECT " + mb)
    o.cmd("x3", "STORE 1 +FLAGS (\\Seen)")
    o.close()
    c.sock.settimeout(3)
    seen = b""
    try:
        while b"FETCH" not in seen:
            seen += c.response()
    except (socket.timeout, TimeoutError):
        pass
    c.sock.settimeout(10)
    c.send(b"DONE\r\n")
    c.until("a4")
    c.cmd("a5", "LOGOUT")
    c.close()
    return c


def s_qresync(port, mb):
    c = Rec(port)
    login(c, "bob")
    c.cmd("a2", "ENABLE QRESYNC CONDSTORE")
    c.cmd("a3", "CREATE " + mb)
    for i in range(6):
        append_sync(c, "b%d" % i, mb, msg("qresync %d" % i))
    sel = c.cmd("a4", "SELECT %s (CONDSTORE)" % mb)
    uidvalidity = sel.split(b"UIDVALIDITY ")[1].split(b"]")[0].decode()
    c.cmd("a5", "UID SEARCH RETURN (ALL COUNT MIN MAX) ALL")
    c.cmd("a6", "FETCH 1:* (UID FLAGS MODSEQ)")
    c.cmd("a7", "UID STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    c.cmd("a8", "EXPUNGE")
    c.cmd("a9", "UID MOVE 1 INBOX")
    c.cmd("a10", "UNSELECT")
    c.cmd("a11", "SELECT %s (QRESYNC (%s 1 1:20))" % (mb, uidvalidity))
    c.cmd("a12", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
    c.cmd("a13", "LOGOUT")
    c.close()
    return c


SCENARIOS = [s_basic, s_literals, s_auth, s_errors, s_idle, s_qresync]

# Inputs Dovecot does not produce in these sessions; written by hand.
HAND_SERVER = {
    "vanished": b"* OK [CLOSED] Previous mailbox closed.\r\n* FLAGS (\\Seen)\r\n"
                b"* OK [UIDVALIDITY 99] Ok\r\n* 5 EXISTS\r\n* VANISHED (EARLIER) 1:3,9\r\n"
                b"* 1 FETCH (UID 4 FLAGS ())\r\n* 2 FETCH (UID 5 FLAGS ())\r\n"
                b"* VANISHED 5\r\n* VANISHED 7:8\r\nS1 OK [READ-WRITE] Select completed\r\n",
    "esearch": b"* ESEARCH (TAG \"imapfresh.2\") UID ALL 1:5,7,10:12 COUNT 9\r\n"
               b"imapfresh.2 OK Search completed\r\n* SEARCH 1 2 3 4294967295\r\n",
    "fetch-nested": b"* 3 FETCH (BODYSTRUCTURE ((\"text\" \"plain\" NIL NIL NIL \"7bit\" 5 1)"
                    b" \"mixed\") UID 30 FLAGS (\\Seen) BODY[] {5}\r\nab()c)\r\n"
                    b"* 4 FETCH (UID 41 BINARY[] ~{3}\r\n\x00\x01\x02)\r\n",
    "status-codes": b"* OK [UIDNEXT 4294967295] x\r\n* OK [HIGHESTMODSEQ 18446744073709551615]\r\n"
                    b"* OK [READ-ONLY] ro\r\n* NO [ALERT] disk full\r\n* BYE bye\r\n"
                    b"A1 OK [COPYUID 17 5:6 1:2] Moved\r\nA2 OK [APPENDUID 17 9] Done\r\n",
    "expunge-exists": b"* 10 EXISTS\r\n* 1 FETCH (UID 1)\r\n* 10 FETCH (UID 99)\r\n"
                      b"* 5 EXPUNGE\r\n* 3 EXISTS\r\n* 20 EXISTS\r\n* 0 EXPUNGE\r\n"
                      b"* 4294967295 EXISTS\r\n* 4294967295 EXPUNGE\r\n",
    "continuation": b"+ Ready for literal\r\n+ \r\n+\r\n* CAPABILITY IMAP4rev1 IDLE\r\n",
    "bare-lf": b"* 1 EXISTS\n* 1 FETCH (UID 7)\nA1 OK done\n",
}
HAND_CLIENT = {
    "literal8": b"a APPEND INBOX ~{5+}\r\n\x00\x01\x02\x03\x04\r\n",
    "nested-lists": b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100> (X (Y (Z))))\r\n",
    "auth-lines": b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAGFsaWNlLXB3\r\nb NOOP\r\n",
    "idle-done": b"i IDLE\r\nDONE\r\nn NOOP\r\n",
    "errors": b"a NOOP \x00\r\nb NOOP\rc\r\nd LOGIN {5\r\ne NOOP {2}x\r\nf ) NOOP\r\n"
              b"g APPEND INBOX {99999999999999999999}\r\nh NOOP {3+}\r\nabc\r\n",
    "long-atom": b"a SEARCH TEXT " + b"x" * 300 + b"\r\nb NOOP\r\n",
}


def opts3(opts, split):
    return bytes([opts, split & 0xff, (split >> 8) & 0xff])


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def u32(v):
    return bytes([v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >> 24) & 0xff])


def seqmap_seeds(out):
    """Operation sequences in fuzz_seqmap.c's grammar. Garbage operations
    use small numbers here: the seeds must pass (known bugs have their own
    regress-* inputs)."""
    rnd = random.Random(6)
    small = lambda: rnd.randrange(1 << 16)     # pick_uid: small, dense UIDs
    for i in range(24):
        ops = bytearray([i % 2])
        for _ in range(rnd.randint(8, 80)):
            if i % 2 == 0:                      # seqmap vs mailbox
                op = rnd.randrange(12) if i % 4 == 0 else rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 11])
                ops.append(op)
                ops += u32(rnd.getrandbits(32))
                if op in (9, 10):
                    ops += u32(small())
            else:                               # uidset vs model
                op = rnd.randrange(8)
                ops.append(op)
                ops += u32(rnd.getrandbits(32))
                if op in (0, 1, 4):
                    ops += u32(rnd.getrandbits(32))
                elif op == 7:
                    text = ",".join(rnd.choice(["%d", "%d:%d", "%d %d"]).replace("%d", str(rnd.randrange(1, 99)))
                                    for _ in range(rnd.randint(1, 5))).encode()
                    ops.append(len(text))
                    ops += text
        write(os.path.join(out, "seqmap", "seed-%02d" % i), bytes(ops))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "corpus"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fuzz-corpus-", dir="/tmp")
    os.chmod(tmp, 0o755)
    dc = servers.Dovecot(os.path.join(tmp, "dovecot"))
    try:
        dc.setup().start()
        for fn in SCENARIOS:
            name = fn.__name__[2:]
            mb = "F%s%d" % (name, random.getrandbits(16))
            c = fn(dc.port, mb)
            cl, sv = bytes(c.sent), bytes(c.got)
            write(os.path.join(a.out, "lex_client", "seed-" + name), opts3(0, len(cl) // 2) + cl)
            write(os.path.join(a.out, "lex_client", "seed-%s-small" % name),
                  opts3(2 | 4 | 8, len(cl) // 3) + cl)
            write(os.path.join(a.out, "lex_server", "seed-" + name), opts3(0, len(sv) // 2) + sv)
            write(os.path.join(a.out, "lex_server", "seed-%s-small" % name),
                  opts3(2 | 4, len(sv) // 3) + sv)
            # The tracker: responses after the login, with a SELECT in flight,
            # with the view known, logged in, and with more commands pending.
            after = sv[sv.find(b"\r\n", sv.find(b"a1 OK")) + 2:] if b"a1 OK" in sv else sv
            for flags, tag in ((0x02 | 0x10, "select"), (0x01 | 0x10 | 0x40, "known"),
                               (0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x80, "sinks")):
                write(os.path.join(a.out, "track", "seed-%s-%s" % (name, tag)),
                      bytes([flags, 12, 0x31, 0x75]) + after)
        for name, data in HAND_SERVER.items():
            write(os.path.join(a.out, "lex_server", "seed-hand-" + name), opts3(0, 7) + data)
            write(os.path.join(a.out, "track", "seed-hand-" + name),
                  bytes([0x01 | 0x02 | 0x10 | 0x40, 5, 0x43, 0x65]) + data)
        for name, data in HAND_CLIENT.items():
            write(os.path.join(a.out, "lex_client", "seed-hand-" + name), opts3(8, 5) + data)
            write(os.path.join(a.out, "lex_client", "seed-hand-%s-tiny" % name),
                  opts3(1 | 4, 9) + data)
        seqmap_seeds(a.out)
    finally:
        dc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for t in ("lex_client", "lex_server", "track", "seqmap"):
        d = os.path.join(a.out, t)
        print("%s: %d files" % (t, len(os.listdir(d))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
