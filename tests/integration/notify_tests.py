"""Changes made behind imapfresh's back (issue 15, part 2): POST /notify,
imapfresh-ctl notify and the Redis message mark a user's mailbox changed on
every instance, so that the next trigger command resyncs and an idling
client is refreshed.

Each test runs imapfresh in front of the stale fixture with notifications
that never fire (stale_tests.NEVER): a delivery into it (fx.server.deliver,
LMTP-like, no command through imapfresh) stays invisible to B unless
imapfresh is told. What imapfresh injected is read from what the fixture
received.
"""

import json
import os
import re
import subprocess

import servers
import stale_imapd
import stale_tests
from admin_tests import ctl_ok, get_json, http_req, scrape, metric
from stale_tests import Fixture, NEVER, check, login, message, wait_for
from servers import HOST
import tap
from tap import test


def setup(ctx, proxy_options=(), name="notify"):
    fx = Fixture(ctx, options=NEVER, proxy_options=proxy_options, name=name)
    b = login(ctx, fx.proxy.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    return fx, b


def deliver(fx, i, box="Archive"):
    return fx.server.deliver("alice", box, message(i, "notify"))


def notify(port, body):
    st, _, text = http_req(port, "POST", "/notify", body=body)
    check(st == 200, "POST /notify %s: %d %s", body, st, text)
    return json.loads(text)


@test("notify: a delivery behind imapfresh's back is seen after POST /notify, not before",
      proxy_only=True)
def t_notify_post(ctx):
    fx, b = setup(ctx)
    check(b.uid_fetch_all("F0") == [], "Archive starts empty")
    uid = deliver(fx, 1)
    check(b.uid_fetch_all("F1") == [], "unnotified, B (and imapfresh) know nothing of it")
    check(fx.injected() == [], "nothing injected yet: %s", fx.injected())
    js = notify(fx.proxy.admin_port, "user=alice&mailbox=Archive")
    check(js["user"] == "alice" and js["mailbox"] == "Archive" and js["sessions_here"] == 1,
          "answer: %s", js)
    check(b.uid_fetch_all("F2") == [uid], "after the notify B sees the delivery")
    check(fx.injected()[:2] == ["NOOP", "UID SEARCH ALL"], "the upstream got the check: %s",
          fx.injected())
    n = len(fx.injected())
    check(b.uid_fetch_all("F3") == [uid] and len(fx.injected()) == n, "one resync only")
    fams = scrape(fx.proxy.admin_port)
    check(metric(fams, "imapfresh_notifications_total") == 1, "counted in the metrics")
    b.assert_clean()


@test("notify: without a mailbox, every mailbox of the user; other users untouched",
      proxy_only=True)
def t_notify_all(ctx):
    fx, b = setup(ctx, name="notify-all")
    uid = deliver(fx, 2)
    notify(fx.proxy.admin_port, "user=bob")
    check(b.uid_fetch_all("F1") == [] and fx.injected() == [], "bob's notify is not alice's")
    js = notify(fx.proxy.admin_port, "user=alice")
    check(js["mailbox"] == "", "every mailbox: %s", js)
    check(b.uid_fetch_all("F2") == [uid], "B sees the delivery")
    b.assert_clean()


@test("notify: an idling client is refreshed at once", proxy_only=True)
def t_notify_idle(ctx):
    fx, b = setup(ctx, name="notify-idle")
    b.send(b"I1 IDLE\r\n")
    b.wait_continuation()
    deliver(fx, 3)
    notify(fx.proxy.admin_port, "user=alice&mailbox=archive")  # any case but INBOX: as given
    notify(fx.proxy.admin_port, "user=alice&mailbox=Archive")
    got = b.readline()
    check(re.match(rb"\* 1 EXISTS", got), "EXISTS while idling: %r", got)
    b.send(b"DONE\r\n")
    tagged, _, _ = b.wait_tagged("I1")
    check(tagged.startswith(b"I1 OK"), "IDLE ends: %r", tagged)
    b.assert_clean()


@test("notify: refused without POST, without a user, without the admin token", proxy_only=True)
def t_notify_refused(ctx):
    fx, b = setup(ctx, proxy_options=[("admin_token", "s3cret")], name="notify-token")
    port = fx.proxy.admin_port
    st, _, _ = http_req(port, "POST", "/notify", body="user=alice")
    check(st == 401, "no token: %d", st)
    st, hdr, _ = http_req(port, "GET", "/notify?user=alice", token="s3cret")
    check(st == 405 and hdr.get("Allow") == "POST, PUT", "GET: %d %s", st, hdr)
    st, _, text = http_req(port, "POST", "/notify", body="mailbox=Archive", token="s3cret")
    check(st == 400 and "user" in text, "no user: %d %s", st, text)
    st, _, text = http_req(port, "POST", "/notify?user=alice&mailbox=Archive", body="",
                           token="s3cret")
    check(st == 200, "parameters in the query string: %d %s", st, text)


@test("notify: the JSON body Dovecot's push_notification ox driver PUTs on a new message",
      proxy_only=True)
def t_notify_dovecot_ox(ctx):
    fx, b = setup(ctx, name="notify-ox")
    uid = deliver(fx, 7)
    # The body of push-notification-driver-ox.c (Dovecot 2.3), as it sends it.
    body = ('{"user":"alice","event":"messageNew","folder":"Archive","imap-uidvalidity":1,'
            '"imap-uid":%d,"from":"\\"Ann\\" <ann@example.com>","subject":"a \\u00e9 b",'
            '"snippet":"body","unseen":1}' % uid)
    st, _, text = http_req(fx.proxy.admin_port, "PUT", "/notify", body=body,
                           headers={"Content-Type": "application/json; charset=utf-8"})
    check(st == 200 and json.loads(text)["mailbox"] == "Archive", "PUT: %d %s", st, text)
    check(b.uid_fetch_all("F1") == [uid], "B sees the delivery")
    st, _, text = http_req(fx.proxy.admin_port, "PUT", "/notify", body='{"event":"messageNew"}',
                           headers={"Content-Type": "application/json"})
    check(st == 400, "no user in the JSON: %d %s", st, text)
    b.assert_clean()


@test("notify: imapfresh-ctl notify USER MAILBOX", proxy_only=True)
def t_notify_ctl(ctx):
    fx, b = setup(ctx, name="notify-ctl")
    uid = deliver(fx, 4)
    out = ctl_ok(ctx, "-c", fx.proxy.conf, "notify", "alice", "Archive")
    check("alice" in out and "Archive" in out, "ctl output: %r", out)
    check(b.uid_fetch_all("F1") == [uid], "B sees the delivery")
    b.assert_clean()


@test("notify/redis: told through one instance or a bare PUBLISH, a session on another resyncs",
      proxy_only=True)
def t_notify_redis(ctx):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-notify-%d" % id(ctx)))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    up_log = stale_tests.upstream_log_path(ctx, "notify-redis")
    server = stale_imapd.StaleServer(log=up_log, **NEVER)
    ctx.closers.append(server.stop)
    up = "%s:%d" % (HOST, server.start())
    common = [("state", redis.url), ("redis_prefix", "nt:")]
    pa = ctx.proxy("notify-a", options=common + [("instance_id", "nt-a")], upstream=up)
    pb = ctx.proxy("notify-b", options=common + [("instance_id", "nt-b")], upstream=up)
    b = login(ctx, pb.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: stale_tests.redis_cli(redis, "PUBSUB", "NUMSUB", "nt:changes")[1:] == ["2"],
             "both instances subscribed")
    uid = server.deliver("alice", "Archive", message(5, "notify-redis"))
    js = notify(pa.admin_port, "user=alice&mailbox=Archive")
    check(js["sessions_here"] == 0 and js["published"] is True, "instance a: %s", js)
    stale_on_b = lambda: any(s["possibly_stale"] for s in get_json(pb.admin_port, "/sessions"))
    wait_for(stale_on_b, "instance b to hear of it (Redis pub/sub is asynchronous)")
    check(b.uid_fetch_all("F1") == [uid], "B, on instance b, sees the delivery")
    # The documented message, as an MTA hook or a webmail would send it.
    uid2 = server.deliver("alice", "Archive", message(6, "notify-redis"))
    stale_tests.redis_cli(redis, "PUBLISH", "nt:changes", "mta\talice\tArchive\t0\tdelivered")
    wait_for(stale_on_b, "instance b to hear the bare PUBLISH")
    check(b.uid_fetch_all("F2") == [uid, uid2], "and after a bare PUBLISH")
    check(stale_tests.injected_from(up_log).count("UID SEARCH ALL") >= 2, "two resyncs upstream")
    b.assert_clean()


LDA = "/usr/lib/dovecot/dovecot-lda"


@test("notify/dovecot: a delivery (dovecot-lda) pushed by Dovecot's push_notification ox driver "
      "shows in the open session's next UID FETCH n:*", proxy_only=True, timeout=60)
def t_notify_dovecot_push(ctx):
    d = servers.Dovecot(os.path.join(ctx.env.tmp, "dovecot-push-%d" % id(ctx)))
    d.setup()
    p = ctx.proxy("notify-push", upstream="%s:%d" % (HOST, d.port), start=False)
    with open(d.conf, "a") as f:
        f.write("\n# issue 15: new mail is pushed to imapfresh's /notify\n"
                "protocol lda {\n  mail_plugins = $mail_plugins notify push_notification\n}\n"
                "protocol lmtp {\n  mail_plugins = $mail_plugins notify push_notification\n}\n"
                "mail_attribute_dict = file:%%h/dovecot-metadata\n"
                "plugin {\n  push_notification_driver = ox:url=http://%s:%d/notify "
                "user_from_metadata\n}\n" % (HOST, p.admin_port))
    d.start()
    ctx.closers.append(d.stop)
    p.start()

    def run(argv, data=None):
        r = subprocess.run(argv, input=data, capture_output=True, timeout=30)
        check(r.returncode == 0, "%s: %s", " ".join(argv), r.stderr.decode()[-500:])

    def doveadm(*args):
        run(["doveadm", "-c", d.conf] + list(args))

    def deliver_lda(msg):
        """A delivery as an MTA makes it: the ox driver reports MessageNew
        (LDA, LMTP), not an IMAP APPEND or doveadm save."""
        run([LDA, "-c", d.conf, "-d", "alice"], data=msg)

    b = login(ctx, p.tls_port, "B")
    b.expect_ok("S1", "SELECT INBOX")
    check(b.uid_fetch_all("F0") == [], "INBOX starts empty")
    # Without a push (the ox driver needs the user's metadata): Dovecot's
    # UID FETCH answers from the session's view, the new message is not in it.
    deliver_lda(message(1, "push"))
    first = b.uid_fetch_all("F1")
    # With the metadata set, the delivery is pushed to imapfresh.
    doveadm("mailbox", "metadata", "set", "-u", "alice", "-s", "",
            "/private/vendor/vendor.dovecot/http-notify", "user=alice")
    before = metric(scrape(p.admin_port), "imapfresh_notifications_total")
    deliver_lda(message(2, "push"))
    wait_for(lambda: metric(scrape(p.admin_port), "imapfresh_notifications_total") == before + 1,
             "Dovecot's PUT to reach imapfresh")
    second = b.uid_fetch_all("F2")
    check(len(second) == 2, "after the push, UID FETCH 1:* shows both messages: %s (first "
          "fetch, without a push: %s)", second, first)
    b.assert_clean()
    tap.diag("without a push the first UID FETCH showed %d of 1 message(s)" % len(first))
