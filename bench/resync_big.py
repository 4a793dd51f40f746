#!/usr/bin/env python3
"""bench/resync_big.py BINARY [MESSAGES] [WORKDIR]: one resync on a big mailbox.

For the injected search in both forms (ESEARCH `UID SEARCH RETURN (ALL) ALL`,
and plain `UID SEARCH ALL` from a Dovecot whose imap_capability leaves
ESEARCH out), a Maildir of MESSAGES (default 100,000) messages written
straight to disk, and imapfresh (memory state) in front: the answer's size,
the direct NOOP round trip, the server's own search time, GETQUOTAROOT
through imapfresh unchanged and right after another session's APPEND (the
resync: NOOP + search injected), and the direct NOOP after another session's
APPEND (what the server's own sync of the change costs). Medians of 9 rounds,
microseconds, as a Markdown table. LL=info shows imapfresh's resync lines.
"""
import sys, socket, time, shutil, os, statistics, pwd
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
import servers
BIN = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 100000; ROUNDS = 9
WORK = sys.argv[3] if len(sys.argv) > 3 else "/tmp/imapfresh-resync-big"
CAPS_NO_ESEARCH = ("IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MULTIAPPEND "
    "UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC WITHIN LIST-STATUS "
    "BINARY MOVE LITERAL+ SPECIAL-USE QUOTA")
def dovecot(d, esearch):
    shutil.rmtree(d, ignore_errors=True); os.makedirs(d); os.chmod(d, 0o755)
    dc = servers.Dovecot(d).setup()
    if not esearch:
        with open(dc.conf, "a") as f: f.write("\nprotocol imap {\n  imap_capability = %s\n}\n" % CAPS_NO_ESEARCH)
    md = os.path.join(d, "home", "bob", "Maildir")
    for sub in ("cur", "new", "tmp"): os.makedirs(os.path.join(md, sub), exist_ok=True)
    body = b"From: a@example.org\r\nSubject: m\r\n\r\nhello\r\n"
    t0 = int(time.time()) - N
    for i in range(N):
        with open(os.path.join(md, "cur", "%d.M%dP1.bench:2,S" % (t0 + i, i)), "wb") as f: f.write(body)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for root, dirs, files in os.walk(os.path.join(d, "home")):
            for x in dirs + files: os.chown(os.path.join(root, x), nobody.pw_uid, nobody.pw_gid)
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
    return dc.start()
class C:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port)); self.buf = b""; self.n = 0
        self.read_line()
    def read_line(self):
        while b"\r\n" not in self.buf: self.buf += self.s.recv(1 << 20)
        l, self.buf = self.buf.split(b"\r\n", 1); return l
    def cmd(self, line):
        self.n += 1; tag = b"t%d" % self.n
        t = time.perf_counter(); self.s.sendall(tag + b" " + line + b"\r\n"); size = 0
        while True:
            l = self.read_line(); size += len(l) + 2
            if l.startswith(tag + b" "):
                return time.perf_counter() - t, size, l
def med(xs): return statistics.median(xs) * 1e6
out = []
for esearch in (True, False):
    d = os.path.join(WORK, "esearch" if esearch else "search")
    dc = dovecot(d, esearch)
    px = servers.Imapfresh(BIN, d + "/px", "127.0.0.1:%d" % dc.port, None, None,
        options=[("require_tls", "no"), ("log_level", os.environ.get("LL", "notice"))], listen_tls=False, name="px")
    px.start(); time.sleep(0.5)
    direct = C(dc.port); direct.cmd(b"LOGIN bob bob-pw")
    t, size, _ = direct.cmd(b"SELECT INBOX")   # indexes the Maildir once
    a = C(px.port); a.cmd(b"LOGIN bob bob-pw"); a.cmd(b"SELECT INBOX"); a.cmd(b"UID FETCH 1:* (UID)")
    b = C(px.port); b.cmd(b"LOGIN bob bob-pw")
    d2 = C(dc.port); d2.cmd(b"LOGIN bob bob-pw")
    noop, search_all, search_ret, unchanged, changed, noop_changed = [], [], [], [], [], []
    sizes = {}
    for r in range(ROUNDS):
        noop.append(direct.cmd(b"NOOP")[0])
        t, sizes["UID SEARCH ALL"], _ = direct.cmd(b"UID SEARCH ALL"); search_all.append(t)
        if esearch:
            t, sizes["UID SEARCH RETURN (ALL) ALL"], _ = direct.cmd(b"UID SEARCH RETURN (ALL) ALL"); search_ret.append(t)
        unchanged.append(a.cmd(b"GETQUOTAROOT INBOX")[0])
        b.cmd(b"APPEND INBOX {5+}\r\nhello")
        t, _, st = a.cmd(b"GETQUOTAROOT INBOX"); changed.append(t)
        a.cmd(b"UID FETCH %d:* (UID)" % (N + r + 1))
        d2.cmd(b"APPEND INBOX {5+}\r\nhello"); noop_changed.append(direct.cmd(b"NOOP")[0])
    form = "ESEARCH (UID SEARCH RETURN (ALL) ALL)" if esearch else "SEARCH (UID SEARCH ALL)"
    srv = med(search_ret) if esearch else med(search_all)
    out.append("| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f |" % (form, sizes["UID SEARCH RETURN (ALL) ALL"] if esearch else sizes["UID SEARCH ALL"],
        med(noop), srv, med(unchanged), med(changed), med(changed) - med(unchanged), 2 * med(noop) + srv))
    out.append("  direct NOOP after another session's APPEND: %.0f us" % med(noop_changed))
    if os.environ.get("LL"): os.system("grep -h 'resync\\|inject\\|check' %s/px/*.log | tail -12" % d)
    px.stop(); dc.stop()
    shutil.rmtree(d, ignore_errors=True)
print("messages: %d, rounds: %d (medians, us)" % (N, ROUNDS))
print("| injected search | answer bytes | NOOP RTT direct | server's search | GETQUOTAROOT unchanged | changed (resync) | added by the resync | 2 x NOOP + search |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
print("\n".join(out))
