"""Real client programs through imapfresh (issue 16, part 4), each compared
with the same program run directly against Dovecot: isync's mbsync,
offlineimap3, interimap (a QRESYNC client, once per run and with its session
kept open), neomutt (driven in a pseudo-terminal) and curl (UID SEARCH ALL,
then a UID FETCH per message it lacks). Each syncs a mailbox
to a local store over TLS, another connection then moves a message in and
expunges one (and flags one), and the program syncs again: the local store
must hold exactly what the server holds, through imapfresh and directly
alike. Python's imaplib plays the clients whose every response is checked:
CONDSTORE, QRESYNC (a model built only from what it was told), and
UTF8=ACCEPT beside modified UTF-7 (on WildDuck: Dovecot 2.3 has no
UTF8=ACCEPT)."""

import base64
import glob
import grp
import imaplib
import itertools
import os
import pwd
import random
import re
import shutil
import subprocess
import time

import imapraw
import wildduck_tests as wd
from seqnum_tests import uid_set
from stale_tests import check
from servers import HOST, DEFAULT_USERS as USERS
from tap import test, Skip


def need(tool):
    """Fail (or skip, with IMAPFRESH_ALLOW_SKIP=1) when tool is not on PATH."""
    if shutil.which(tool) is None:
        if os.environ.get("IMAPFRESH_ALLOW_SKIP") == "1":
            raise Skip(tool + " not installed")
        raise AssertionError("%s not installed (scripts/test installs it)" % tool)


def normal(body):
    """A message as mbsync stores it: LF line ends, its own X-TUID header out."""
    lines = body.replace(b"\r\n", b"\n").split(b"\n")
    return b"\n".join(l for l in lines if not l.startswith(b"X-TUID: "))


def body_hashes(maildir):
    out = []
    for f in glob.glob(os.path.join(maildir, "*", "*")):
        if os.path.basename(os.path.dirname(f)) in ("cur", "new"):
            with open(f, "rb") as fh:
                out.append(normal(fh.read()))
    return sorted(out)


def logged_in(ctx, port, user="carol"):
    """A TLS connection to port, logged in as user, closed with the test."""
    c = imapraw.Conn(HOST, port, tls=True, ctx=ctx.sslctx(), server_hostname=HOST)
    ctx.closers.append(c.close)
    c.readline()
    c.login(user, USERS[user])
    return c


def server_bodies(ctx, box):
    c = logged_in(ctx, ctx.dovecot.tls_port)
    c.expect_ok("S", "EXAMINE " + box)
    _, _, lits = c.command("F", "FETCH 1:* BODY.PEEK[]")
    c.close()
    return sorted(normal(x) for x in lits)


def mbsync(ctx, port, box, local, name):
    conf = os.path.join(ctx.env.tmp, "mbsync-%s.rc" % name)
    os.makedirs(local, exist_ok=True)
    with open(conf, "w") as f:
        f.write("IMAPAccount a\nHost localhost\nPort %d\nUser carol\nPass \"%s\"\n"
                "SSLType IMAPS\nCertificateFile %s\n\n"
                "IMAPStore remote\nAccount a\n\n"
                "MaildirStore local\nPath %s/\nInbox %s/INBOX\n\n"
                "Channel c\nFar :remote:%s\nNear :local:%s\nSync Pull\nCreate Near\n"
                "Expunge Near\nSyncState *\n"
                % (port, USERS["carol"].replace('"', '\\"'), ctx.env.ca, local, local, box, box))
    r = subprocess.run(["mbsync", "-c", conf, "-a"], capture_output=True, timeout=120)
    check(r.returncode == 0, "mbsync (%s) failed: %s", name, r.stderr.decode()[-800:])
    return body_hashes(os.path.join(local, box))


def message(i, size=300):
    rnd = random.Random(i)
    return (b"From: x@example.com\r\nSubject: mbsync %d\r\nMessage-ID: <%d.mb@t>\r\n\r\n" % (i, i)
            + bytes(rnd.randrange(32, 127) for _ in range(size)) + b"\r\n")


def fill(a, prefix, first, n, step=4000, flags=b"", sources=1):
    """Through a: a fresh mailbox (prefix + pid + random) of n messages, message(first + i,
    300 + step * i), with flags, and a source mailbox (its name + "_src") of `sources`
    messages numbered from first + 90. Returns (box, source)."""
    box = "%s%d_%04x" % (prefix, os.getpid(), random.getrandbits(16))
    other = box + "_src"
    for b in (box, other):
        a.expect_ok("C" + b[-2:], "CREATE " + b)
    for i in range(n):
        m = message(first + i, 300 + step * i)
        a.expect_ok("P%d" % i, b"APPEND %s %s{%d+}\r\n%s" % (box.encode(), flags, len(m), m))
    for i in range(sources):
        m = message(first + 90 + i)
        a.expect_ok("Q%d" % i, b"APPEND %s {%d+}\r\n%s" % (other.encode(), len(m), m))
    return box, other


def move_in_and_expunge(a, box, other, k, n=""):
    """Through a: the first message of other moved into box, then box's message k expunged
    (n suffixes the tags); box stays selected."""
    a.expect_ok("S1%s" % n, "SELECT " + other)
    a.expect_ok("M1%s" % n, "MOVE 1 " + box)
    a.expect_ok("S2%s" % n, "SELECT " + box)
    a.expect_ok("D1%s" % n, "STORE %d +FLAGS.SILENT (\\Deleted)" % k)
    a.expect_ok("X1%s" % n, "EXPUNGE")


@test("clients: mbsync (isync) syncs, then resyncs after another connection's move and expunge, "
      "the same through imapfresh as directly", proxy_only=True, timeout=180)
def t_mbsync(ctx):
    need("mbsync")
    a = logged_in(ctx, ctx.tls_port)
    box, other = fill(a, "Mb", 0, 5)
    via, direct = os.path.join(ctx.env.tmp, "mb-via"), os.path.join(ctx.env.tmp, "mb-direct")
    first_via = mbsync(ctx, ctx.tls_port, box, via, "via")
    first_direct = mbsync(ctx, ctx.dovecot.tls_port, box, direct, "direct")
    check(first_via == first_direct == server_bodies(ctx, box), "first sync: %d via, %d direct",
          len(first_via), len(first_direct))
    # A change on another connection: one message moved in, one expunged.
    move_in_and_expunge(a, box, other, 2)
    now = server_bodies(ctx, box)
    second_via = mbsync(ctx, ctx.tls_port, box, via, "via")
    second_direct = mbsync(ctx, ctx.dovecot.tls_port, box, direct, "direct")
    check(second_via == now, "through imapfresh the Maildir holds what the server holds: %d vs %d",
          len(second_via), len(now))
    check(second_direct == now, "and directly: %d vs %d", len(second_direct), len(now))


def offlineimap(ctx, port, box, local, name):
    home = os.path.join(ctx.env.tmp, "oi-%s" % name)
    os.makedirs(local, exist_ok=True)
    os.makedirs(home, exist_ok=True)
    conf = os.path.join(home, "offlineimaprc")
    with open(conf, "w") as f:
        f.write("[general]\naccounts = a\nmetadata = %s/meta\n\n"
                "[Account a]\nlocalrepository = L\nremoterepository = R\n\n"
                "[Repository L]\ntype = Maildir\nlocalfolders = %s\n\n"
                "[Repository R]\ntype = IMAP\nremotehost = localhost\nremoteport = %d\n"
                "remoteuser = carol\nremotepass = %s\nssl = yes\nsslcacertfile = %s\n"
                "folderfilter = lambda f: f == %r\nreadonly = True\n"
                % (home, local, port, USERS["carol"], ctx.env.ca, box))
    r = subprocess.run(["offlineimap", "-c", conf, "-u", "basic", "-o"], capture_output=True,
                       timeout=120, env=dict(os.environ, HOME=home))
    check(r.returncode == 0, "offlineimap (%s) failed: %s", name,
          (r.stdout + r.stderr).decode()[-800:])
    return body_hashes(os.path.join(local, box))


@test("clients: offlineimap3 syncs, then resyncs after another connection's move and expunge, "
      "the same through imapfresh as directly", proxy_only=True, timeout=180)
def t_offlineimap(ctx):
    need("offlineimap")
    a = logged_in(ctx, ctx.tls_port)
    box, other = fill(a, "Oi", 200, 4, step=3000)
    via, direct = os.path.join(ctx.env.tmp, "oi-via"), os.path.join(ctx.env.tmp, "oi-direct")
    first_via = offlineimap(ctx, ctx.tls_port, box, via, "via")
    first_direct = offlineimap(ctx, ctx.dovecot.tls_port, box, direct, "direct")
    check(first_via == first_direct == server_bodies(ctx, box), "first sync: %d via, %d direct",
          len(first_via), len(first_direct))
    move_in_and_expunge(a, box, other, 1)
    now = server_bodies(ctx, box)
    check(offlineimap(ctx, ctx.tls_port, box, via, "via") == now, "through imapfresh")
    check(offlineimap(ctx, ctx.dovecot.tls_port, box, direct, "direct") == now, "directly")


SEARCHED = re.compile(rb"^\* SEARCH((?: \d+)*)\s*$", re.M)


def server_uid_bodies(ctx, box):
    """UID -> body of each message of box, from Dovecot directly."""
    c = logged_in(ctx, ctx.dovecot.tls_port)
    c.expect_ok("S", "EXAMINE " + box)
    _, lines, lits = c.command("F", "UID FETCH 1:* BODY.PEEK[]")
    c.close()
    fetched = [l for l in lines if b" FETCH " in l]
    check(len(fetched) == len(lits), "one literal per FETCH: %d, %d", len(fetched), len(lits))
    return {int(FETCH_UID.search(l[:l.index(lit)]).group(1)): lit for l, lit in zip(fetched, lits)}


class CurlClient:
    """curl as a mail client of box on the server on port (imaps, carol): sync() lists the
    mailbox's UIDs (UID SEARCH ALL as a custom command: curl SELECTs the URL's mailbox, then
    prints the untagged responses; its URL search form imaps://.../BOX?ALL sends SEARCH, which
    names sequence numbers), drops what the server no longer lists and downloads what it does
    not hold yet, all in one curl run (one session, a UID FETCH ... BODY[] per message), into
    held: UID -> body."""

    def __init__(self, ctx, port, box, name):
        self.name, self.box = name, box
        self.url = "imaps://localhost:%d/%s" % (port, box)
        self.dir = os.path.join(ctx.env.tmp, "curl-%s" % name)
        os.makedirs(self.dir, exist_ok=True)
        # "carol:<password>" is one argv element: the password holds a space and a quote.
        self.common = ["curl", "-s", "-S", "--max-time", "20", "--cacert", ctx.env.ca,
                       "--user", "carol:" + USERS["carol"]]
        self.held = {}
        self.runs = 0

    def curl(self, *args):
        r = subprocess.run(self.common + list(args), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=40)
        check(r.returncode == 0, "curl (%s) %s: rc %d %s", self.name, " ".join(args[:2]),
              r.returncode, r.stderr.decode(errors="replace")[-500:])
        return r.stdout

    def listed(self):
        """The UIDs curl lists in box."""
        out = self.curl(self.url, "-X", "UID SEARCH ALL")
        found = SEARCHED.findall(out)
        check(len(found) == 1, "curl (%s): one * SEARCH line, got %r", self.name, out[:300])
        return [int(u) for u in found[0].split()]

    def sync(self):
        """One sync; returns a copy of what curl holds (UID -> body)."""
        self.runs += 1
        uids = self.listed()
        for u in set(self.held) - set(uids):
            del self.held[u]
        new = [u for u in uids if u not in self.held]
        if new:
            args = []
            for u in new:
                args += ["%s;UID=%d" % (self.url, u), "-o",
                         os.path.join(self.dir, "%d-%d.eml" % (self.runs, u))]
            self.curl(*args)
            for u in new:
                with open(os.path.join(self.dir, "%d-%d.eml" % (self.runs, u)), "rb") as f:
                    self.held[u] = f.read()
        return dict(self.held)


def curl_client(ctx, port, name):
    """curl's life on a fresh mailbox of its own through port: a full sync, another
    connection (to Dovecot directly) moves a message in from a second mailbox and expunges
    one, a sync again. Returns what curl held after each sync; each equals the server's."""
    a = logged_in(ctx, ctx.dovecot.tls_port)
    box, other = fill(a, "Cu%s_" % name, 600, 5)
    c = CurlClient(ctx, port, box, name)
    first = c.sync()
    now = server_uid_bodies(ctx, box)
    check(first == now, "first sync (%s): curl holds UIDs %s, the server %s (bodies %s)",
          name, sorted(first), sorted(now), "equal" if sorted(first.values()) ==
          sorted(now.values()) else "differ")
    # Another connection: one message moved in, one expunged, nothing else.
    move_in_and_expunge(a, box, other, 2)
    a.close()
    second = c.sync()
    now = server_uid_bodies(ctx, box)
    check(second == now, "second sync (%s): curl holds UIDs %s, the server %s (bodies %s)",
          name, sorted(second), sorted(now), "equal" if sorted(second.values()) ==
          sorted(now.values()) else "differ")
    return first, second


@test("clients: curl as a mail client (UID SEARCH ALL, a UID FETCH per new message) syncs, "
      "then resyncs after another connection's move and expunge, the same through imapfresh "
      "as directly", proxy_only=True, timeout=60)
def t_curl_client(ctx):
    need("curl")
    via = curl_client(ctx, ctx.tls_port, "via")
    direct = curl_client(ctx, ctx.dovecot.tls_port, "direct")
    check(via == direct, "through imapfresh UIDs %s, directly %s",
          [sorted(x) for x in via], [sorted(x) for x in direct])


@test("clients: a CONDSTORE client (Python imaplib) is never told a modseq that skips a change: "
      "CHANGEDSINCE after a resync still returns it")
def t_condstore_modseq(ctx):
    import imaplib
    port = ctx.tls_port
    a = imaplib.IMAP4_SSL(HOST, port, ssl_context=ctx.sslctx())
    b = imaplib.IMAP4_SSL(HOST, port, ssl_context=ctx.sslctx())
    ctx.closers += [a.shutdown, b.shutdown]
    for c in (a, b):
        c.login("bob", USERS["bob"])
    box = "Cs%d_%04x" % (os.getpid(), random.getrandbits(16))
    a.create(box)
    for i in range(3):
        a.append(box, None, None, message(300 + i))
    typ, data = b._simple_command("SELECT", box, "(CONDSTORE)")
    check(typ == "OK", "SELECT (CONDSTORE): %s %s", typ, data)
    b.state = "SELECTED"        # imaplib's select() cannot pass (CONDSTORE)
    code = [x for x in b.untagged_responses.get("OK", []) if b"HIGHESTMODSEQ" in x]
    check(code, "HIGHESTMODSEQ given: %r", b.untagged_responses)
    m0 = int(code[-1].split()[1].rstrip(b"]"))
    a.select(box)
    a.store("2", "+FLAGS", "(\\Flagged)")       # a change B has not heard of
    a.append(box, None, None, message(399))      # and a move-like change of the mailbox
    typ, data = b.fetch("1:*", "(UID FLAGS)")      # a trigger through imapfresh: resync first
    check(typ == "OK", "FETCH: %s", typ)
    typ, data = b.uid("FETCH", "1:*", "(FLAGS) (CHANGEDSINCE %d)" % m0)
    changed = b" ".join(x if isinstance(x, bytes) else x[0] for x in data if x)
    check(b"\\Flagged" in changed, "CHANGEDSINCE %d still returns the flag change: %r", m0, data)
    typ, data = b.noop()
    check(typ == "OK", "NOOP")


MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                 "T": "\\Deleted"}
FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")


def maildir_messages(maildir, norm=None):
    """(flags, body) of each message of a Maildir folder, sorted; flags from the file name's
    info part (":2,FS"), keywords and \\Recent left out; body through norm (default normal)."""
    for _ in range(50):
        out = []
        try:
            for sub in ("cur", "new"):
                for f in glob.glob(os.path.join(maildir, sub, "*")):
                    info = os.path.basename(f).partition(":2,")[2]
                    with open(f, "rb") as fh:
                        out.append((" ".join(sorted(MAILDIR_FLAGS[c] for c in info
                                                    if c in MAILDIR_FLAGS)),
                                    (norm or normal)(fh.read())))
            return sorted(out)
        except FileNotFoundError:
            continue    # a client renamed it (new flags) while we listed: list again
    raise AssertionError("%s: files kept vanishing while listed" % maildir)


def server_messages(ctx, box, user="carol"):
    """(flags, body) of each message of box as Dovecot holds it, sorted."""
    c = logged_in(ctx, ctx.dovecot.tls_port, user)
    c.expect_ok("S", "EXAMINE " + box)
    _, lines, lits = c.command("F", "FETCH 1:* (FLAGS BODY.PEEK[])")
    c.close()
    out = []
    for line, lit in zip([l for l in lines if b" FETCH " in l], lits):
        flags = FLAGS.search(line[:line.index(lit)]).group(1).decode().split()
        out.append((" ".join(sorted(f for f in flags if f != "\\Recent")), normal(lit)))
    return sorted(out)


def tunnel_imap(home):
    """The command line of Dovecot's imap binary in preauth mode on a Maildir of its own under
    home: interimap's local side, no daemon. As root Dovecot refuses mail access as root and an
    imap binary whose output is a socket (an inetd start), so it then runs as nobody."""
    conf = os.path.join(home, "local-dovecot.conf")
    store = os.path.join(home, "local")
    os.makedirs(store, exist_ok=True)
    with open(conf, "w") as f:
        f.write("mail_location = maildir:%s/Maildir\nssl = no\n"
                "namespace inbox {\n  inbox = yes\n}\n" % store)
    cmd = "/usr/lib/dovecot/imap -c " + conf
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        try:
            gid = grp.getgrnam("nogroup").gr_gid
        except KeyError:
            gid = nobody.pw_gid
        os.chown(store, nobody.pw_uid, gid)
        cmd = "setpriv --reuid=%d --regid=%d --clear-groups %s" % (nobody.pw_uid, gid, cmd)
    return cmd, os.path.join(store, "Maildir")


class Interimap:
    """interimap syncing mailboxes between the server on port (implicit TLS, carol) and a local
    Dovecot of its own, under ctx.env.tmp/imi-<name>: its database, debug log and Maildir."""

    def __init__(self, ctx, port, name):
        self.name = name
        self.home = os.path.join(ctx.env.tmp, "imi-%s" % name)
        os.makedirs(self.home, exist_ok=True)
        cmd, self.maildir = tunnel_imap(self.home)
        self.conf = os.path.join(self.home, "interimap.conf")
        self.log = os.path.join(self.home, "interimap.log")
        with open(self.conf, "w") as f:
            f.write("database = %s/interimap.db\nlogfile = %s\n\n"
                    "[local]\ntype = tunnel\ncommand = %s\n\n"
                    "[remote]\ntype = imaps\nhost = localhost\nport = %d\nusername = carol\n"
                    "password = %s\nSSL_CAfile = %s\n"
                    % (self.home, self.log, cmd, port, USERS["carol"], ctx.env.ca))
        self.env = dict(os.environ, HOME=self.home, USER="carol")
        self.proc = None
        ctx.closers.append(self.stop)

    def argv(self, box, *opts):
        """The command line syncing box, with --debug (IMAP traffic in the log)."""
        return ["interimap", "--config=" + self.conf, "--debug"] + list(opts) + [box]

    def log_tail(self, n=1500):
        """The end of the debug log, for a failure message."""
        try:
            with open(self.log, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def sync(self, box):
        """One run; returns (flags, body) of each message the local copy of box holds."""
        r = subprocess.run(self.argv(box), capture_output=True, timeout=60, env=self.env)
        check(r.returncode == 0, "interimap (%s) failed: %s\n%s", self.name,
              r.stderr.decode("utf-8", "replace")[-500:], self.log_tail())
        return self.local(box)

    def local(self, box):
        """(flags, body) of each message of the local copy of box."""
        return maildir_messages(os.path.join(self.maildir, "." + box))

    def watch(self, box):
        """Start interimap --watch=1 (after a first sync: it needs the database): one session
        on each side kept open, polled every second (LIST ... RETURN (STATUS), a QRESYNC SELECT
        of a mailbox that changed, UNSELECT)."""
        self.mark = os.path.getsize(self.log)
        with open(os.path.join(self.home, "stderr"), "wb") as err:
            self.proc = subprocess.Popen(self.argv(box, "--watch=1"), env=self.env,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def watched(self):
        """The debug log written since watch()."""
        with open(self.log, "rb") as f:
            f.seek(self.mark)
            return f.read().decode("utf-8", "replace")

    def watching(self):
        """Fail unless the watching interimap is still running."""
        if self.proc.poll() is not None:
            with open(os.path.join(self.home, "stderr"), "rb") as f:
                err = f.read()[-500:].decode("utf-8", "replace")
            check(False, "interimap --watch (%s) exited %s: %s\n%s", self.name,
                  self.proc.returncode, err, self.log_tail())

    def wait_polling(self, deadline=15.0):
        """Poll the log until the watching interimap has polled the server twice."""
        end = time.monotonic() + deadline
        while len(re.findall(r"remote: C: \S+ LIST ", self.watched())) < 2:
            self.watching()
            check(time.monotonic() < end, "interimap --watch (%s) never polled\n%s", self.name,
                  self.log_tail())
            time.sleep(0.05)

    def wait_local(self, box, want, what, deadline=15.0):
        """Poll until the local copy of box is want; the watching interimap must stay up."""
        end = time.monotonic() + deadline
        while True:
            got = self.local(box)
            if got == want:
                return
            if self.proc is not None:
                self.watching()
            check(time.monotonic() < end, "%s (%s): local flags %r, server %r\n%s", what,
                  self.name, [f for f, _ in got], [f for f, _ in want], self.log_tail())
            time.sleep(0.05)

    def stop(self):
        """End a watching interimap (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def client_scene(ctx, prefix):
    """carol's connection through the port under test, a fresh mailbox of five messages (all
    \\Seen) and a source mailbox of one; returns (conn, box, source)."""
    a = logged_in(ctx, ctx.tls_port)
    box, other = fill(a, prefix, 400, 5, step=3000, flags=b"(\\Seen) ", sources=2)
    return a, box, other


def client_change(a, box, other, n):
    """Another connection's change: one message moved in from other, message 2 expunged,
    message 3 flagged (n numbers the tags)."""
    move_in_and_expunge(a, box, other, 2, n)
    a.expect_ok("F1%d" % n, "STORE 3 +FLAGS.SILENT (\\Flagged)")
    a.expect_ok("U1%d" % n, "UNSELECT")


@test("clients: interimap (QRESYNC) syncs into a local Dovecot, then resyncs after another "
      "connection's move, expunge and flag change, the same through imapfresh as directly",
      proxy_only=True, timeout=120)
def t_interimap(ctx):
    need("interimap")
    a, box, other = client_scene(ctx, "Qr")
    via = Interimap(ctx, ctx.tls_port, "via")
    direct = Interimap(ctx, ctx.dovecot.tls_port, "direct")
    first_via, first_direct = via.sync(box), direct.sync(box)
    now = server_messages(ctx, box)
    check(first_via == first_direct == now, "first sync: %d via, %d direct, %d on the server",
          len(first_via), len(first_direct), len(now))
    client_change(a, box, other, 1)
    now = server_messages(ctx, box)
    second_via, second_direct = via.sync(box), direct.sync(box)
    check(second_via == now, "through imapfresh the local store holds what the server holds: "
          "%r vs %r", [f for f, _ in second_via], [f for f, _ in now])
    check(second_direct == now, "and directly: %r vs %r", [f for f, _ in second_direct],
          [f for f, _ in now])


@test("clients: interimap --watch keeps its session open; another connection's move, expunge "
      "and flag change reach its local store, the same through imapfresh as directly",
      proxy_only=True, timeout=120)
def t_interimap_watch(ctx):
    need("interimap")
    a, box, other = client_scene(ctx, "Qn")
    via = Interimap(ctx, ctx.tls_port, "nvia")
    direct = Interimap(ctx, ctx.dovecot.tls_port, "ndirect")
    now = server_messages(ctx, box)
    for im in (via, direct):
        check(im.sync(box) == now, "first sync (%s)", im.name)     # --watch needs the database
        im.watch(box)
    for im in (via, direct):
        im.wait_polling()
    client_change(a, box, other, 1)
    now = server_messages(ctx, box)
    for im in (via, direct):
        im.wait_local(box, now, "after the change")
        greetings = len(re.findall(r"remote: S: \* (OK|PREAUTH) \[CAPABILITY ", im.watched()))
        check(greetings == 1, "one remote session (%s), not %d", im.name, greetings)


def mutt_normal(body):
    """A message as neomutt copies it, less the Content-Length: and Lines: headers it adds."""
    head, sep, rest = normal(body).partition(b"\n\n")
    head = b"\n".join(l for l in head.split(b"\n")
                      if not l.startswith((b"Content-Length: ", b"Lines: ")))
    return head + sep + rest


class Neomutt:
    """neomutt on box of the server on port (imaps, carol) under ctx.env.tmp/nm-<name>, driven
    by keys pushed from its muttrc in a pseudo-terminal (script -qec: it needs one). Its
    header cache makes a later run resync with QRESYNC (UID FETCH ... (CHANGEDSINCE m
    VANISHED)) instead of fetching every header again."""

    def __init__(self, ctx, port, box, name):
        self.name, self.box = name, box
        self.home = os.path.join(ctx.env.tmp, "nm-%s" % name)
        os.makedirs(self.home, exist_ok=True)
        self.port, self.ca = port, ctx.env.ca
        self.runs = 0
        self.proc = None
        ctx.closers.append(self.stop)

    def path(self, what):
        """A file or Maildir of this neomutt's own."""
        return os.path.join(self.home, what)

    def start(self, keys):
        """Start one run that opens box and types keys (neomutt's <function> notation)."""
        self.runs += 1
        rc = self.path("muttrc%d" % self.runs)
        with open(rc, "w") as f:
            f.write('set imap_user = carol\nset imap_pass = "%s"\n'
                    "set folder = imaps://localhost:%d/\nset spoolfile = +%s\n"
                    "set ssl_ca_certificates_file = %s\nset ssl_force_tls = yes\n"
                    "set header_cache = %s\nset imap_qresync = yes\n"
                    "set mbox_type = Maildir\nset confirm_create = no\nset confirm_append = no\n"
                    "set wait_key = no\nset quit = yes\nset move = no\nset delete = no\n"
                    "set mark_old = no\nset beep = no\nset imap_check_subscribed = no\n"
                    "set mail_check_stats = no\nset sort = mailbox-order\n"
                    'push "%s<quit>"\n'
                    % (USERS["carol"].replace("\\", "\\\\").replace('"', '\\"'), self.port,
                       self.box, self.ca, self.path("hcache"), keys))
        argv = "neomutt -n -F %s -d 5 -l %s" % (rc, self.path("debug"))
        with open(self.path("screen"), "wb") as screen:
            self.proc = subprocess.Popen(["script", "-qec", argv, "/dev/null"],
                                         stdin=subprocess.DEVNULL, stdout=screen,
                                         stderr=subprocess.STDOUT,
                                         env=dict(os.environ, TERM="xterm", HOME=self.home))

    def copy_all(self, what):
        """Keys that copy every message of box, flags and all, to a Maildir of ours."""
        return "<tag-pattern>~A<enter><tag-prefix><copy-message>%s<enter>" % self.path(what)

    def pause(self):
        """Keys that leave neomutt (its IMAP session open) in a shell escape until resume()."""
        script = self.path("pause.sh")
        with open(script, "w") as f:
            f.write('touch "$1/paused"\ni=0\nwhile [ ! -e "$1/resume" ] && [ $i -lt 600 ]; do\n'
                    '  sleep 0.05; i=$((i + 1))\ndone\n')
        return "<shell-escape>sh %s %s<enter>" % (script, self.home)

    def wait_paused(self, deadline=20.0):
        """Wait until neomutt sits in the shell escape of pause()."""
        end = time.monotonic() + deadline
        while not os.path.exists(self.path("paused")):
            check(self.proc.poll() is None, "neomutt (%s) exited %s before pausing%s",
                  self.name, self.proc.returncode, self.why())
            check(time.monotonic() < end, "neomutt (%s) never paused%s", self.name, self.why())
            time.sleep(0.05)

    def resume(self):
        """End the shell escape: neomutt types on."""
        open(self.path("resume"), "w").close()

    def wait(self):
        """Wait for the run to end; it must end well."""
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = "(killed after 30 s)"
        check(rc == 0, "neomutt (%s) exited %s%s", self.name, rc, self.why())

    def why(self):
        """The IMAP exchange of the last run (neomutt's debug log), for a failure message."""
        logs = sorted(glob.glob(self.path("debug") + "*"), key=os.path.getmtime)
        if not logs:
            return ""
        with open(logs[-1], "rb") as f:
            lines = [l for l in f.read().decode("utf-8", "replace").splitlines()
                     if l.startswith("[") and ("4> " in l or "4< " in l or "<E>" in l)]
        return "\n" + "\n".join(l[:200] for l in lines[-25:])

    def copied(self, what):
        """(flags, body) of each message copied to our Maildir what."""
        return maildir_messages(self.path(what), mutt_normal)

    def stop(self):
        """Kill a run still going."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@test("clients: neomutt keeps its session through another connection's move, expunge and flag "
      "change and resyncs (NOOP, VANISHED), then a new run resyncs from its header cache "
      "(CHANGEDSINCE, VANISHED (EARLIER)): the same through imapfresh as directly",
      proxy_only=True, timeout=120)
def t_neomutt(ctx):
    need("neomutt")
    need("script")
    a, box, other = client_scene(ctx, "Nm")
    muts = [Neomutt(ctx, ctx.tls_port, box, "via"),
            Neomutt(ctx, ctx.dovecot.tls_port, box, "direct")]
    before = server_messages(ctx, box)
    # <imap-fetch-mail> (a NOOP) as a user would press it: neomutt itself, directly as
    # through imapfresh, gives up a copy ("The message index is incorrect") when a flag
    # change arrives unasked during its UID FETCH of a body.
    for m in muts:
        m.start(m.copy_all("first") + m.pause() + "<imap-fetch-mail>" + m.copy_all("second"))
    for m in muts:
        m.wait_paused()
    client_change(a, box, other, 1)       # both sessions are open on box meanwhile
    during = server_messages(ctx, box)
    for m in muts:
        m.resume()
    for m in muts:
        m.wait()
        check(m.copied("first") == before, "%s: the first copy holds what the server held: "
              "%r vs %r", m.name, [f for f, _ in m.copied("first")], [f for f, _ in before])
        check(m.copied("second") == during, "%s: the copy after the change holds what the "
              "server holds: %r vs %r%s", m.name, [f for f, _ in m.copied("second")],
              [f for f, _ in during], m.why())
    # Offline: another message moved in, one more expunged, one more flagged.
    client_change(a, box, other, 2)
    after = server_messages(ctx, box)
    for m in muts:
        m.start(m.copy_all("third"))
        m.wait()
        check(m.copied("third") == after, "%s: the new run's copy holds what the server holds: "
              "%r vs %r%s", m.name, [f for f, _ in m.copied("third")], [f for f, _ in after],
              m.why())


FETCH_DATA = re.compile(rb"^(\d+) \((.*)\)$", re.S)
FETCH_UID = re.compile(rb"\bUID (\d+)")


class QresyncClient(imaplib.IMAP4_SSL):
    """Python's imaplib as a QRESYNC client (RFC 7162): what it knows of its mailbox is built
    only from what it was told, in the order it was told: the UIDs and flags of its messages
    from FETCH, VANISHED and VANISHED (EARLIER), and their number from EXISTS. Every FETCH
    is checked against that model: it must carry a UID (3.2.4) and name by its sequence
    number the message the model has there; an EXPUNGE is a fault (3.2.10), and so is a
    VANISHED during a FETCH, STORE or SEARCH (the same rule as EXPUNGE: RFC 3501 7.4.1)."""

    def __init__(self, ctx, port):
        self.flags = {}         # UID -> flags (sorted, space separated)
        self.exists = 0
        self.uidvalidity = self.modseq = None
        self.faults = []
        self.heard = []         # commands and responses, for a failure message
        self.current = None     # the command in progress
        super().__init__(HOST, port, ssl_context=ctx.sslctx(), timeout=10)
        ctx.closers.append(self.shutdown)
        self.login("carol", USERS["carol"])
        typ, data = self.enable("QRESYNC")
        check(typ == "OK", "ENABLE QRESYNC: %s %s", typ, data)

    def _command(self, name, *args):
        self.current = name if name != "UID" else "UID " + args[0].upper()
        return super()._command(name, *args)

    def _append_untagged(self, typ, dat):
        self.told(typ, dat)
        super()._append_untagged(typ, dat)

    def told(self, typ, dat):
        """One untagged response, applied to the model."""
        if isinstance(dat, tuple):      # a FETCH with a literal: its first line is enough
            dat = dat[0]
        dat = dat or b""
        self.heard.append("* %s %s" % (typ, dat.decode("utf-8", "replace")[:100]))
        if typ == "EXISTS":
            self.exists = int(dat)
        elif typ == "UIDVALIDITY":
            self.uidvalidity = int(dat)
        elif typ == "HIGHESTMODSEQ":
            self.modseq = int(dat)
        elif typ == "EXPUNGE":
            self.faults.append("EXPUNGE %s to a QRESYNC client" % dat.decode())
        elif typ == "VANISHED":
            earlier = dat.upper().startswith(b"(EARLIER) ")
            gone = uid_set(dat.split()[-1]) & set(self.flags)
            for u in gone:
                del self.flags[u]
            if not earlier:     # VANISHED (EARLIER) leaves the count alone (3.2.10)
                self.exists -= len(gone)
                if self.current in ("FETCH", "STORE", "SEARCH"):   # RFC 3501 7.4.1
                    self.faults.append("VANISHED %s during %s" % (dat.decode(), self.current))
        elif typ == "FETCH":
            self.fetched(dat)

    def fetched(self, dat):
        """A FETCH response: the message at that number must be the one the model has."""
        m = FETCH_DATA.match(dat)
        u = FETCH_UID.search(dat)
        if not m or not u:
            self.faults.append("FETCH without UID: %r" % dat[:200])
            return
        seq, uid = int(m.group(1)), int(u.group(1))
        known = sorted(self.flags)
        if seq > self.exists:
            self.faults.append("FETCH %d beyond EXISTS %d: %r" % (seq, self.exists, dat[:200]))
        elif seq <= len(known) and known[seq - 1] != uid:
            self.faults.append("FETCH %d names UID %d, the model has UID %d there"
                               % (seq, uid, known[seq - 1]))
        elif seq > len(known) and known and uid < known[-1]:
            self.faults.append("FETCH %d names UID %d below known ones" % (seq, uid))
        f = FLAGS.search(dat)
        if f:
            self.flags[uid] = " ".join(sorted(x for x in f.group(1).decode().split()
                                              if x != "\\Recent"))
        else:
            self.flags.setdefault(uid, None)

    def run(self, *args):
        """A command (imaplib's _simple_command: anything goes in any state); must be OK, or
        for a FETCH NO [EXPUNGEISSUED]: it named a message expunged meanwhile (RFC 2180 4.1.2,
        the answer imapfresh gives for one it holds back)."""
        self.heard.append("C: " + " ".join(args))
        typ, data = self._simple_command(*args)
        self.heard.append("%s %s" % (typ, data))
        check(typ == "OK" or (typ == "NO" and "FETCH" in args[:2] and data and
                              data[-1].startswith(b"[EXPUNGEISSUED]")),
              "%s: %s %s", args[0], typ, data)
        if args[0] in ("SELECT", "EXAMINE"):
            self.state = "SELECTED"     # imaplib's select() cannot pass (QRESYNC ...)
        return data

    def fetch_new(self):
        """UID FETCH the messages EXISTS announced that the model has no UID for yet."""
        if self.exists > len(self.flags):
            self.run("UID", "FETCH", "%d:*" % (max(self.flags, default=0) + 1), "(FLAGS MODSEQ)")

    def view(self):
        """What the client believes: its message count and each UID's flags."""
        return self.exists, dict(self.flags)

    def agrees(self, what, want=None):
        """Fail, with what the client heard last, on a fault or unless its view is want."""
        check(not self.faults and (want is None or self.view() == want),
              "%s: faults %s; the client's view %r, the server's %r; it heard:\n%s", what,
              self.faults, self.view(), want, "\n".join(self.heard[-30:]))


def server_flags(ctx, box, user="carol"):
    """The server's count and UID -> flags of box, from Dovecot directly."""
    c = logged_in(ctx, ctx.dovecot.tls_port, user)
    c.expect_ok("S", "EXAMINE " + box)
    _, lines, _ = c.command("F", "UID FETCH 1:* (FLAGS)")
    c.close()
    out = {}
    for l in lines:
        u, f = FETCH_UID.search(l), FLAGS.search(l)
        if u and f:
            out[int(u.group(1))] = " ".join(sorted(x for x in f.group(1).decode().split()
                                                   if x != "\\Recent"))
    return len(out), out


def qresync_round(ctx, a, box, other, c, n, trigger):
    """Another connection (a) expunges message 3, moves the next message of other in and
    flags message 1; then client c sends trigger (a FETCH or UID FETCH: through imapfresh
    it resyncs first) and NOOP. Returns c's view, which must be the server's."""
    # Message 3: after the QRESYNC SELECT the client was told the UIDs of changed
    # messages only, so where this one sits is known from the server's list alone.
    move_in_and_expunge(a, box, other, 3, n)
    a.expect_ok("F1%d" % n, "STORE 1 +FLAGS.SILENT (\\Answered)")
    a.expect_ok("U1%d" % n, "UNSELECT")
    c.run(*trigger)
    c.agrees("round %d, %s" % (n, " ".join(trigger[:2])))
    c.run("NOOP")
    c.fetch_new()
    c.agrees("round %d, NOOP" % n, server_flags(ctx, box))
    return c.view()


def qresync_client(ctx, port, name):
    """The QRESYNC client's life on a fresh mailbox of its own through port: a full sync,
    changes while it is away, a QRESYNC SELECT (VANISHED (EARLIER) and the changed flags),
    then two rounds of changes on another connection while it stays selected, each followed
    by a trigger and NOOP. Returns its view at each step; each equals the server's."""
    a = logged_in(ctx, ctx.tls_port)
    box = "Qc%d_%s_%04x" % (os.getpid(), name, random.getrandbits(16))
    other = box + "_src"
    for b in (box, other):
        a.expect_ok("C" + b[-2:], "CREATE " + b)
    for i in range(6):
        m = message(500 + i)
        a.expect_ok("P%d" % i, b"APPEND %s (\\Seen) {%d+}\r\n%s" % (box.encode(), len(m), m))
    for i in range(3):
        m = message(590 + i)
        a.expect_ok("Q%d" % i, b"APPEND %s {%d+}\r\n%s" % (other.encode(), len(m), m))
    views = []
    c = QresyncClient(ctx, port)
    c.run("SELECT", box)
    c.uid("FETCH", "1:*", "(FLAGS MODSEQ)")
    c.agrees("full sync", server_flags(ctx, box))
    views.append(c.view())
    uidvalidity, modseq, uids = c.uidvalidity, c.modseq, sorted(c.flags)
    c.logout()
    # Away: message 3 flagged, messages 2 and 4 expunged, one message moved in.
    a.expect_ok("S1", "SELECT " + box)
    a.expect_ok("F1", "STORE 3 +FLAGS.SILENT (\\Flagged)")
    a.expect_ok("D1", "STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    a.expect_ok("X1", "EXPUNGE")
    a.expect_ok("S2", "SELECT " + other)
    a.expect_ok("M1", "MOVE 1 " + box)
    a.expect_ok("U1", "UNSELECT")
    c = QresyncClient(ctx, port)
    c.flags = {u: views[0][1][u] for u in uids}
    c.run("SELECT", box, "(QRESYNC (%d %d %d:%d))" % (uidvalidity, modseq, uids[0], uids[-1]))
    c.fetch_new()       # what came in meanwhile
    c.agrees("QRESYNC SELECT", server_flags(ctx, box))
    views.append(c.view())
    views.append(qresync_round(ctx, a, box, other, c, 1, ("FETCH", "1:*", "(UID FLAGS)")))
    views.append(qresync_round(ctx, a, box, other, c, 2, ("UID", "FETCH", "1:*", "(FLAGS)")))
    c.logout()
    return views


@test("clients: a QRESYNC client (Python imaplib) resyncs with SELECT (QRESYNC ...) and stays "
      "exact through another connection's expunges and moves: VANISHED, FETCH and EXISTS "
      "alone build the server's view, the same through imapfresh as directly")
def t_qresync_client(ctx):
    via = qresync_client(ctx, ctx.tls_port, "via")
    direct = qresync_client(ctx, ctx.dovecot.tls_port, "direct")
    check(via == direct, "through imapfresh %r, directly %r", via, direct)


def mutf7(name):
    """name in IMAP's modified UTF-7 (RFC 3501 5.1.3): "&" as "&-", each run of other
    characters as UTF-16 (a surrogate pair beyond the BMP) in base64, "," for "/", in & -."""
    out = []
    for printable, run in itertools.groupby(name, lambda ch: " " <= ch <= "~"):
        run = "".join(run)
        if printable:
            out.append(run.replace("&", "&-"))
        else:
            b64 = base64.b64encode(run.encode("utf-16-be")).decode().rstrip("=")
            out.append("&%s-" % b64.replace("/", ","))
    return "".join(out)


class Utf8Client(imaplib.IMAP4_SSL):
    """Python's imaplib through imapfresh as one user's session on WildDuck; with utf8 it
    ENABLEs UTF8=ACCEPT (RFC 6855) and names mailboxes in UTF-8, else in modified UTF-7."""

    def __init__(self, ctx, port, user, pw, utf8):
        super().__init__(HOST, port, ssl_context=ctx.sslctx(), timeout=10)
        ctx.closers.append(self.shutdown)
        self.login(user, pw)
        if utf8:
            typ, data = self.enable("UTF8=ACCEPT")      # imaplib then sends UTF-8
            check(typ == "OK" and any(b"UTF8=ACCEPT" in x for x in
                                      self.untagged_responses.get("ENABLED", [])),
                  "ENABLE UTF8=ACCEPT: %s %s", typ, data)

    def ok(self, *args):
        """A command; must be OK. Returns its untagged data."""
        typ, data = self._simple_command(*args)
        check(typ == "OK", "%s: %s %s", " ".join(args[:2]), typ, data)
        if args[0] in ("SELECT", "EXAMINE"):
            self.state = "SELECTED"
        return self._untagged_response(typ, data, "FETCH" if "FETCH" in args[:2] else args[0])[1]

    def uids(self):
        """UID FETCH 1:* (UID): the UIDs the session knows in its mailbox."""
        data = self.ok("UID", "FETCH", "1:*", "(UID)")
        return sorted(int(m.group(1)) for x in data if x
                      for m in [FETCH_UID.search(x if isinstance(x, bytes) else x[0])] if m)


@test("clients: a UTF8=ACCEPT session and a modified-UTF-7 session (Python imaplib) of one "
      "WildDuck user see each other's moves into a mailbox named with '&' and a character "
      "beyond the BMP, at their next UID FETCH through imapfresh", proxy_only=True, timeout=120)
def t_utf8_client(ctx):
    b = wd.wildduck(ctx)
    p = wd.feed_proxy(ctx, b, "cl-utf8", feed=False)   # only imapfresh can tell the sessions
    user = "clutf%d" % (int(time.time() * 1000) % 10 ** 8)
    b.create_user(user, "wd-pw")
    name = "Entw\u00fcrfe & Co \U0001f4c1"
    utf7 = mutf7(name)
    check(utf7 == "Entw&APw-rfe &- Co &2D3cwQ-", "modified UTF-7: %s", utf7)
    u = Utf8Client(ctx, p.tls_port, user, "wd-pw", utf8=True)
    s = Utf8Client(ctx, p.tls_port, user, "wd-pw", utf8=False)
    u.ok("CREATE", '"%s"' % name)
    listed = s.ok("LIST", '""', '"*"')
    check(any(utf7.encode() in x for x in listed), "the UTF-7 session lists %s: %r", utf7, listed)
    for i in range(2):
        s.append("INBOX", None, None, wd.message(60 + i))
    # The UTF-7 session moves a message in while the UTF-8 session has the mailbox selected.
    u.ok("SELECT", '"%s"' % name)
    check(u.uids() == [], "empty at first")
    time.sleep(0.3)     # WildDuck's journal events of the CREATE and APPENDs are long settled
    s.ok("SELECT", "INBOX")
    inbox = s.uids()
    s.ok("UID", "MOVE", str(inbox[0]), '"%s"' % utf7)
    seen = u.uids()
    check(len(seen) == 1, "the UTF-8 session's next UID FETCH sees what the UTF-7 session moved "
          "in: %s", seen)
    # And the other way round.
    s.ok("SELECT", '"%s"' % utf7)
    check(s.uids() == seen, "the UTF-7 session sees the same message: %s", s.uids())
    u.ok("SELECT", "INBOX")
    time.sleep(0.3)
    u.ok("UID", "MOVE", str(u.uids()[0]), '"%s"' % name)
    got = s.uids()
    check(len(got) == 2 and got[0] == seen[0], "the UTF-7 session's next UID FETCH sees what the "
          "UTF-8 session moved in: %s", got)
