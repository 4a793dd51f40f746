"""The stale-session fix on a real WildDuck 1.46.1 (issue 15, part 4), with
changes made behind imapfresh's back: straight to WildDuck over IMAP, through
its API, and through a second imapfresh instance that shares nothing with
the first. Directly against WildDuck the cached connection B misses the
moved message (zone-eu/wildduck#708); through imapfresh following WildDuck's
wd_events feed it sees it; with the feed off it misses it again, so the feed
does the work.

The bed (tests/wildduck/bed.py: WildDuck, congodb as its MongoDB, a Redis)
is started once for this module. B acts within a few milliseconds of the
move, well inside WildDuck's own 100 ms hold-back of journal events; through
imapfresh it waits first until the feed has told imapfresh (a metric), which
WildDuck publishes 10 to 20 ms after the command.
"""

import atexit
import os
import re
import sys
import time

import stale_tests
from admin_tests import get_json, metric, scrape
from stale_tests import Client, check, wait_for
from servers import HOST
from tap import test, Skip

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "wildduck"))
import bed as wdbed  # noqa: E402

_bed = {}
UIDS = re.compile(rb"UID (\d+)")


def wildduck(ctx):
    """The module's WildDuck bed, started at first use."""
    if "bed" not in _bed:
        why = wdbed.missing()
        if why:
            if os.environ.get("IMAPFRESH_ALLOW_SKIP") == "1":
                raise Skip("WildDuck bed: " + why)
            raise AssertionError("WildDuck bed: %s (scripts/test installs it)" % why)
        b = wdbed.Bed(d=os.path.join(ctx.env.tmp, "wildduck"))
        b.start()
        atexit.register(b.stop)
        _bed["bed"] = b
    return _bed["bed"]


def message(i):
    return (b"From: ann@example.com\r\nTo: someone@example.com\r\nSubject: wd %d\r\n"
            b"Message-ID: <%d.wd@imapfresh-test>\r\n\r\nbody %d\r\n" % (i, i, i))


def raw_login(port, label, user, pw, tls=False, ctx=None):
    c = Client(port, label, tls=tls, ctx=ctx.sslctx() if tls else None)
    ctx.closers.append(c.close)
    ctx.conns.append(c)
    check(c.readline().startswith(b"* OK"), "%s: no greeting" % label)
    c.login(user, pw)
    return c


def feed_proxy(ctx, b, name, feed=True):
    opts = []
    if feed:
        opts = [("backend_events", "wildduck"),
                ("backend_redis", "redis://%s:%d/3" % (HOST, b.redis_port)),
                ("backend_api", b.api_url)]
    return ctx.proxy(name, options=opts, upstream="%s:%d" % (HOST, b.imap_port))


def matched(p):
    return metric(scrape(p.admin_port), "imapfresh_backend_feed_matched_total")


class Scene:
    """A fresh user with one message in INBOX; B (through imapfresh p, or
    straight to WildDuck when p is None) has Archive selected and synced."""

    def __init__(self, ctx, b, p, tag):
        self.ctx, self.b, self.p = ctx, b, p
        self.user, self.pw = "wd%s%d" % (tag, int(time.time() * 1000) % 10 ** 8), "wd-pw"
        self.uid_user = b.create_user(self.user, self.pw)
        st, res = b.api("POST", "/users/%s/mailboxes" % self.uid_user, {"path": "Archive"})
        check(st == 200 and res.get("success"), "create Archive: %s %s", st, res)
        self.archive = res["id"]
        self.inbox = b.mailboxes(self.uid_user)["INBOX"]
        st, res = b.api("POST", "/users/%s/mailboxes/%s/messages" % (self.uid_user, self.inbox),
                        raw=message(1))
        check(st == 200 and res.get("success"), "upload: %s %s", st, res)
        self.msg = res["message"]["id"]
        if p is None:
            self.B = raw_login(b.imap_port, "B", self.user, self.pw, ctx=ctx)
        else:
            self.B = raw_login(p.tls_port, "B", self.user, self.pw, tls=True, ctx=ctx)
        self.B.expect_ok("S1", 'SELECT "Archive"')
        check(self.B.uid_fetch_all("F0") == [], "Archive starts empty")
        if p is not None and p.options and ("backend_events", "wildduck") in p.options:
            wait_for(lambda: any(s.get("backend_id") == self.uid_user
                                 for s in get_json(p.admin_port, "/sessions")),
                     "B's WildDuck id resolved")
        time.sleep(0.3)     # the upload's own journal events are long settled

    def revisit(self):
        """Thunderbird's revisit of its cached connection, without NOOP."""
        self.B.expect_ok("T1", 'GETQUOTAROOT "Archive"')
        return self.B.uid_fetch_all("T2")

    def after_change(self, change):
        """Make the change, then (through a feed) wait for imapfresh to hear of it."""
        before = matched(self.p) if self.feed() else None
        change()
        if before is not None:
            wait_for(lambda: matched(self.p) > before, "the feed to report the change")
        return self.revisit()

    def feed(self):
        return self.p is not None and ("backend_events", "wildduck") in self.p.options

    # the changes
    def move_imap_direct(self):
        a = raw_login(self.b.imap_port, "A", self.user, self.pw, ctx=self.ctx)
        a.expect_ok("A1", "SELECT INBOX")
        a.expect_ok("A2", "UID MOVE %d Archive" % self.msg)

    def copy_imap_direct(self):
        a = raw_login(self.b.imap_port, "A", self.user, self.pw, ctx=self.ctx)
        a.expect_ok("A1", "SELECT INBOX")
        a.expect_ok("A2", "UID COPY %d Archive" % self.msg)

    def move_api(self):
        st, res = self.b.api("PUT", "/users/%s/mailboxes/%s/messages/%d"
                             % (self.uid_user, self.inbox, self.msg), {"moveTo": self.archive})
        check(st == 200 and res.get("success"), "API move: %s %s", st, res)

    def move_other_proxy(self, other):
        a = raw_login(other.tls_port, "A", self.user, self.pw, tls=True, ctx=self.ctx)
        a.expect_ok("A1", "SELECT INBOX")
        a.expect_ok("A2", "UID MOVE %d Archive" % self.msg)


def _scenario(ctx, how, through, feed=True):
    b = wildduck(ctx)
    p = feed_proxy(ctx, b, "wd-%s" % how, feed=feed) if through else None
    sc = Scene(ctx, b, p, how[:3])
    if how == "imap":
        change = sc.move_imap_direct
    elif how == "copy":
        change = sc.copy_imap_direct
    elif how == "api":
        change = sc.move_api
    else:
        other = feed_proxy(ctx, b, "wd-other", feed=True)
        change = lambda: sc.move_other_proxy(other)
    seen = sc.after_change(change)
    sc.B.assert_clean()
    return seen


@test("wildduck: the bug, directly: B misses a message moved over IMAP straight to WildDuck",
      timeout=120)
def t_wd_direct_imap(ctx):
    check(_scenario(ctx, "imap", through=False) == [], "WildDuck should be stale here")


@test("wildduck: the bug, directly: B misses a message moved through WildDuck's API",
      timeout=120)
def t_wd_direct_api(ctx):
    check(_scenario(ctx, "api", through=False) == [], "WildDuck should be stale here")


@test("wildduck: through imapfresh with the feed: a move straight to WildDuck is seen",
      proxy_only=True, timeout=120)
def t_wd_feed_imap(ctx):
    seen = _scenario(ctx, "imap", through=True)
    check(len(seen) == 1, "B should see the moved message: %s", seen)


@test("wildduck: through imapfresh with the feed: a move through WildDuck's API is seen",
      proxy_only=True, timeout=120)
def t_wd_feed_api(ctx):
    seen = _scenario(ctx, "api", through=True)
    check(len(seen) == 1, "B should see the moved message: %s", seen)


@test("wildduck: through imapfresh with the feed: a move through another imapfresh (nothing "
      "shared but WildDuck) is seen", proxy_only=True, timeout=120)
def t_wd_feed_other_proxy(ctx):
    seen = _scenario(ctx, "other", through=True)
    check(len(seen) == 1, "B should see the moved message: %s", seen)


@test("wildduck: with the feed off, through imapfresh, B misses the moves again (the feed "
      "does the work)", proxy_only=True, timeout=120)
def t_wd_nofeed(ctx):
    check(_scenario(ctx, "imap", through=True, feed=False) == [], "IMAP move: B should miss it")
    check(_scenario(ctx, "api", through=True, feed=False) == [], "API move: B should miss it")
    check(_scenario(ctx, "copy", through=True, feed=False) == [], "IMAP copy: B should miss it")


@test("wildduck: through imapfresh with the feed: a COPY straight to WildDuck is seen",
      proxy_only=True, timeout=120)
def t_wd_feed_copy(ctx):
    seen = _scenario(ctx, "copy", through=True)
    check(len(seen) == 1, "B should see the copied message: %s", seen)


@test("wildduck: an idling client through imapfresh with the feed gets the EXISTS of a move "
      "straight to WildDuck, and DONE works", proxy_only=True, timeout=120)
def t_wd_feed_idle(ctx):
    b = wildduck(ctx)
    p = feed_proxy(ctx, b, "wd-idle")
    sc = Scene(ctx, b, p, "idl")
    sc.B.send(b"I1 IDLE\r\n")
    sc.B.wait_continuation()
    sc.move_imap_direct()
    got = sc.B.readline()
    check(re.match(rb"\* 1 EXISTS", got), "EXISTS while idling: %r", got)
    sc.B.send(b"DONE\r\n")
    tagged, others, _ = sc.B.wait_tagged("I1")
    check(tagged.startswith(b"I1 OK"), "IDLE ends: %r", tagged)
    check(len(sc.B.uid_fetch_all("F1")) == 1, "and the message is there")
    sc.B.assert_clean()


@test("wildduck: the bug, directly: B misses a message copied over IMAP straight to WildDuck",
      timeout=120)
def t_wd_direct_copy(ctx):
    check(_scenario(ctx, "copy", through=False) == [], "WildDuck should be stale here")


@test("wildduck: a UTF8=ACCEPT session and a modified-UTF-7 session of one user resync each "
      "other (one mailbox, one name)", proxy_only=True, timeout=120)
def t_wd_utf8_utf7(ctx):
    b = wildduck(ctx)
    p = feed_proxy(ctx, b, "wd-utf8", feed=False)     # the change passes through imapfresh
    user = "wdutf%d" % (int(time.time() * 1000) % 10 ** 8)
    uid_user = b.create_user(user, "wd-pw")
    st, res = b.api("POST", "/users/%s/mailboxes" % uid_user, {"path": "Entw\u00fcrfe"})
    check(st == 200 and res.get("success"), "create: %s %s", st, res)
    inbox = b.mailboxes(uid_user)["INBOX"]
    st, res = b.api("POST", "/users/%s/mailboxes/%s/messages" % (uid_user, inbox),
                    raw=message(7))
    msg = res["message"]["id"]
    bb = raw_login(p.tls_port, "B", user, "wd-pw", tls=True, ctx=ctx)
    _, lines, _ = bb.expect_ok("E1", "ENABLE UTF8=ACCEPT")
    check(any(b"UTF8=ACCEPT" in l for l in lines), "UTF8=ACCEPT enabled: %r", lines)
    bb.expect_ok("S1", 'SELECT "Entw\u00fcrfe"')        # UTF-8 in a quoted string (RFC 6855)
    check(bb.uid_fetch_all("F0") == [], "empty at first")
    time.sleep(0.3)
    a = raw_login(p.tls_port, "A", user, "wd-pw", tls=True, ctx=ctx)
    a.expect_ok("A1", "SELECT INBOX")
    a.expect_ok("A2", "UID MOVE %d Entw&APw-rfe" % msg)     # modified UTF-7 (RFC 3501 5.1.3)
    bb.expect_ok("T1", 'GETQUOTAROOT "Entw\u00fcrfe"')
    seen = bb.uid_fetch_all("T2")
    check(len(seen) == 1, "B (UTF-8) should see what A (UTF-7) moved in: %s", seen)
    bb.assert_clean()
