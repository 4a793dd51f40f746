"""Real client programs through imapfresh (issue 16, part 4), each compared
with the same program run directly against Dovecot: isync's mbsync. It
syncs a mailbox to a local Maildir over TLS, another connection then moves
a message in and expunges one, and mbsync syncs again: the Maildir must hold
exactly what the server holds, through imapfresh and directly alike."""

import glob
import os
import random
import shutil
import subprocess

import imapraw
from stale_tests import check
from servers import HOST, DEFAULT_USERS as USERS
from tap import test, Skip


def need(tool):
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


def server_bodies(ctx, box):
    c = imapraw.Conn(HOST, ctx.dovecot.tls_port, tls=True, ctx=ctx.sslctx(), server_hostname=HOST)
    ctx.closers.append(c.close)
    c.readline()
    c.login("carol", USERS["carol"])
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


@test("clients: mbsync (isync) syncs, then resyncs after another connection's move and expunge, "
      "the same through imapfresh as directly", proxy_only=True, timeout=180)
def t_mbsync(ctx):
    need("mbsync")
    a = imapraw.Conn(HOST, ctx.tls_port, tls=True, ctx=ctx.sslctx(), server_hostname=HOST)
    ctx.closers.append(a.close)
    a.readline()
    a.login("carol", USERS["carol"])
    box = "Mb%d_%04x" % (os.getpid(), random.getrandbits(16))
    other = box + "_src"
    for b in (box, other):
        a.expect_ok("C" + b[-2:], "CREATE " + b)
    for i in range(5):
        m = message(i, 300 + 4000 * i)
        a.expect_ok("P%d" % i, b"APPEND %s {%d+}\r\n%s" % (box.encode(), len(m), m))
    m = message(99)
    a.expect_ok("P9", b"APPEND %s {%d+}\r\n%s" % (other.encode(), len(m), m))
    via, direct = os.path.join(ctx.env.tmp, "mb-via"), os.path.join(ctx.env.tmp, "mb-direct")
    first_via = mbsync(ctx, ctx.tls_port, box, via, "via")
    first_direct = mbsync(ctx, ctx.dovecot.tls_port, box, direct, "direct")
    check(first_via == first_direct == server_bodies(ctx, box), "first sync: %d via, %d direct",
          len(first_via), len(first_direct))
    # A change on another connection: one message moved in, one expunged.
    a.expect_ok("S1", "SELECT " + other)
    a.expect_ok("M1", "MOVE 1 " + box)
    a.expect_ok("S2", "SELECT " + box)
    a.expect_ok("D1", "STORE 2 +FLAGS.SILENT (\\Deleted)")
    a.expect_ok("X1", "EXPUNGE")
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
    a = imapraw.Conn(HOST, ctx.tls_port, tls=True, ctx=ctx.sslctx(), server_hostname=HOST)
    ctx.closers.append(a.close)
    a.readline()
    a.login("carol", USERS["carol"])
    box = "Oi%d_%04x" % (os.getpid(), random.getrandbits(16))
    other = box + "_src"
    for b in (box, other):
        a.expect_ok("C" + b[-2:], "CREATE " + b)
    for i in range(4):
        m = message(200 + i, 500 + 3000 * i)
        a.expect_ok("P%d" % i, b"APPEND %s {%d+}\r\n%s" % (box.encode(), len(m), m))
    m = message(299)
    a.expect_ok("P9", b"APPEND %s {%d+}\r\n%s" % (other.encode(), len(m), m))
    via, direct = os.path.join(ctx.env.tmp, "oi-via"), os.path.join(ctx.env.tmp, "oi-direct")
    first_via = offlineimap(ctx, ctx.tls_port, box, via, "via")
    first_direct = offlineimap(ctx, ctx.dovecot.tls_port, box, direct, "direct")
    check(first_via == first_direct == server_bodies(ctx, box), "first sync: %d via, %d direct",
          len(first_via), len(first_direct))
    a.expect_ok("S1", "SELECT " + other)
    a.expect_ok("M1", "MOVE 1 " + box)
    a.expect_ok("S2", "SELECT " + box)
    a.expect_ok("D1", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.expect_ok("X1", "EXPUNGE")
    now = server_bodies(ctx, box)
    check(offlineimap(ctx, ctx.tls_port, box, via, "via") == now, "through imapfresh")
    check(offlineimap(ctx, ctx.dovecot.tls_port, box, direct, "direct") == now, "directly")


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
