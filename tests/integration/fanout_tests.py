"""Change fan-out by interest (issue 18, part 2): a user's changes are
published on the user's own channel, P{U}:changes (sharded pub/sub where
Redis has it, plain otherwise), which an instance subscribes while it has a
session of the user. Two instances on one Redis in front of the stale
fixture with notifications that never fire (stale_tests.NEVER): a delivery
into it stays invisible to a session unless imapfresh hears of a change.
"""

import os
import re
import socket
import threading

import servers
import stale_imapd
import stale_tests
from admin_tests import get_json, scrape, metric
from notify_tests import notify
from stale_tests import NEVER, check, login, message, wait_for, redis_cli
from servers import HOST
from tap import test

PREFIX = "fo:"


def start_redis(ctx, name, plain=False):
    """A Redis 7; plain: without SPUBLISH, as before Redis 7 (plain pub/sub)."""
    args = ["--rename-command", "SPUBLISH", ""] if plain else []
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-%s-%d" % (name, id(ctx))), args=args)
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    return redis


def start_upstream(ctx, name):
    up_log = stale_tests.upstream_log_path(ctx, name)
    server = stale_imapd.StaleServer(log=up_log, **NEVER)
    ctx.closers.append(server.stop)
    return server, "%s:%d" % (HOST, server.start())


def instance(ctx, name, url, up, options=()):
    return ctx.proxy(name, upstream=up, options=[("state", url), ("redis_prefix", PREFIX),
                                                 ("instance_id", name)] + list(options))


def calls(redis, command):
    """How many times Redis ran command (INFO commandstats)."""
    m = re.search(r"^cmdstat_%s:calls=(\d+)" % command,
                  "\n".join(redis_cli(redis, "INFO", "commandstats")), re.M)
    return int(m.group(1)) if m else 0


def numsub(redis, user, plain):
    out = redis_cli(redis, "PUBSUB", "NUMSUB" if plain else "SHARDNUMSUB",
                    "%s{%s}:changes" % (PREFIX, user))
    return int(out[1])


def received(p):
    return metric(scrape(p.admin_port), "imapfresh_store_changes_received_total")


def channels(p):
    return metric(scrape(p.admin_port), "imapfresh_redis_user_channels")


def both_up(redis):
    wait_for(lambda: redis_cli(redis, "PUBSUB", "NUMSUB", PREFIX + "changes")[1:] == ["2"],
             "both instances subscribed to the global channel")


def stale_on(p):
    return any(s["possibly_stale"] for s in get_json(p.admin_port, "/sessions"))


def behind(p):
    """A session's mailbox moved on since it last matched it (a change was
    heard or read): not merely possibly stale for another reason."""
    return any(s["gen"] > s["synced_gen"] for s in get_json(p.admin_port, "/sessions"))


def interest(ctx, plain):
    kind = "plain" if plain else "sharded"
    redis = start_redis(ctx, "fanout-" + kind, plain)
    server, up = start_upstream(ctx, "fanout-" + kind)
    pa = instance(ctx, "fo-a", redis.url, up)
    pb = instance(ctx, "fo-b", redis.url, up)
    both_up(redis)
    a1 = login(ctx, pa.tls_port, "A1")
    b1 = login(ctx, pb.tls_port, "B1", user="bob")
    b1.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: numsub(redis, "alice", plain) == 1 and numsub(redis, "bob", plain) == 1,
             "alice's channel subscribed by a, bob's by b")
    other = redis_cli(redis, "PUBSUB", "SHARDNUMSUB" if plain else "NUMSUB",
                      "%s{alice}:changes" % PREFIX)
    check(other[1:] == ["0"], "%s pub/sub only: %s", kind, other)

    # (b) alice's change, then bob's, both through a: b hears bob's only.
    # Published in that order on one link, alice's would have reached b first.
    notify(pa.admin_port, "user=alice&mailbox=Archive")
    uid = server.deliver("bob", "Archive", message(1, "fanout"))
    notify(pa.admin_port, "user=bob&mailbox=Archive")
    wait_for(lambda: received(pb) >= 1, "b to hear bob's change")
    check(received(pb) == 1, "b received bob's change only, not alice's: %d", received(pb))
    check(channels(pb) == 1 and channels(pa) == 1, "one user's channel on each instance")
    wait_for(lambda: stale_on(pb), "bob's session on b to be marked")
    check(b1.uid_fetch_all("F1") == [uid], "bob, on b, sees the delivery")
    # a hears its own alice message back (it has her session), not bob's.
    notify(pa.admin_port, "user=alice&mailbox=INBOX")
    wait_for(lambda: received(pa) >= 2, "a to hear its two alice messages")
    check(received(pa) == 2, "a received alice's two messages only: %d", received(pa))

    # (d) b unsubscribes bob's channel with bob's last session there.
    unsub = "unsubscribe" if plain else "sunsubscribe"
    b2 = login(ctx, pb.tls_port, "B2", user="bob")
    b2.expect_ok("N1", "NOOP")
    b1.close()
    wait_for(lambda: len(get_json(pb.admin_port, "/sessions")) == 1, "b1's session to end")
    check(numsub(redis, "bob", plain) == 1, "bob's channel kept while b2 is there")
    b2.close()
    wait_for(lambda: numsub(redis, "bob", plain) == 0, "bob's channel unsubscribed")
    check(calls(redis, unsub) == 1, "one %s, with the last session: %d", unsub,
          calls(redis, unsub))
    wait_for(lambda: channels(pb) == 0, "b's channels gauge back to 0")
    # Nothing of bob's reaches b any more; the global channel still does.
    before = received(pb)
    notify(pa.admin_port, "user=bob&mailbox=Archive")
    redis_cli(redis, "PUBLISH", PREFIX + "changes", "mta\tbob\tArchive\t0\tdelivered")
    wait_for(lambda: received(pb) > before, "b to hear the global channel's message")
    check(received(pb) == before + 1, "b heard the global message only: %d -> %d", before,
          received(pb))
    a1.close()
    wait_for(lambda: numsub(redis, "alice", plain) == 0, "alice's channel unsubscribed on a")


@test("fanout: a user's changes reach only instances with a session of the user; the channel "
      "goes with the last session (sharded pub/sub)", proxy_only=True, timeout=60)
def t_fanout_sharded(ctx):
    interest(ctx, plain=False)


@test("fanout: the same with plain pub/sub (a Redis without SPUBLISH)", proxy_only=True,
      timeout=60)
def t_fanout_plain(ctx):
    interest(ctx, plain=True)


class HoldRelay:
    """A TCP relay to Redis that holds a connection's traffic, from the
    command subscribing a channel containing pattern on (or any command that
    matches the regular expression commands and names pattern), until
    release(). Each connection is held by its own first such command."""

    def __init__(self, port, pattern, commands=rb"\r\nS?SUBSCRIBE\r\n"):
        self.target = port
        self.pattern = pattern
        self.commands = commands
        self.seen = threading.Event()
        self.released = threading.Event()
        self.lsock = socket.socket()
        self.lsock.bind((HOST, 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            s = socket.create_connection((HOST, self.target))
            self.socks += [c, s]
            threading.Thread(target=self._pipe, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, False), daemon=True).start()

    def _pipe(self, src, dst, upward):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upward and not self.released.is_set() and self.pattern in data \
                        and re.search(self.commands, data, re.I):
                    self.seen.set()
                    self.released.wait(30)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self):
        self.released.set()

    def stop(self):
        self.released.set()
        self.lsock.close()
        for s in self.socks:
            s.close()


@test("fanout: a change published while the user's channel is being subscribed is not missed",
      proxy_only=True, timeout=60)
def t_fanout_subscribe_race(ctx):
    redis = start_redis(ctx, "fanout-race")
    relay = HoldRelay(redis.port, b"{alice}:changes")
    ctx.closers.append(relay.stop)
    server, up = start_upstream(ctx, "fanout-race")
    pa = instance(ctx, "fo-a", redis.url, up)
    pb = instance(ctx, "fo-b", "redis://%s:%d" % (HOST, relay.port), up)
    both_up(redis)
    reads = calls(redis, "hgetall")
    b = login(ctx, pb.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(relay.seen.is_set, "b to ask for alice's channel (held by the relay)")
    wait_for(lambda: calls(redis, "hgetall") > reads, "b to read alice's generations first")
    # Another instance's change, published while b is not subscribed yet.
    uid = server.deliver("alice", "Archive", message(2, "fanout-race"))
    notify(pa.admin_port, "user=alice&mailbox=Archive")
    wait_for(lambda: calls(redis, "spublish") == 1, "a to publish it")
    # (The session may count as possibly stale already, having selected
    # before b's first read of the generations came back: that is the next
    # test's case. Here it must not have heard of the change itself.)
    check(numsub(redis, "alice", False) == 0 and not behind(pb),
          "nobody heard it: b's subscription is still held")
    relay.release()
    wait_for(lambda: behind(pb), "b, once subscribed, to count the change it did not hear")
    check(b.uid_fetch_all("F1") == [uid], "B sees the delivery")
    check(received(pb) == 0, "b heard no message: it read the change (%d)", received(pb))
    b.assert_clean()


def select_while_subscribing(ctx, wait):
    redis = start_redis(ctx, "fanout-unheard")
    # Both of b's links to Redis stop at alice's first command there: the
    # generations read (command link) and the subscription (subscriber link).
    relay = HoldRelay(redis.port, b"{alice}:", rb"\r\n(S?SUBSCRIBE|HGETALL)\r\n")
    ctx.closers.append(relay.stop)
    server, up = start_upstream(ctx, "fanout-unheard")
    pa = instance(ctx, "fo-a", redis.url, up)
    pb = instance(ctx, "fo-b", "redis://%s:%d" % (HOST, relay.port), up,
                  [("select_wait", str(wait))])
    both_up(redis)
    b = login(ctx, pb.tls_port, "B")
    wait_for(relay.seen.is_set, "b to ask for alice's generations and channel (held)")
    b.send(b"S1 SELECT Archive\r\n")
    if not wait:
        tagged, _, _ = b.wait_tagged(b"S1")
        check(tagged.split()[1] == b"OK", "SELECT: %r", tagged)
        check(stale_on(pb), "selected before b hears alice's changes: possibly stale")
    # Another instance's change: counted in Redis before b's first read of
    # the generations gets there, published before b subscribes. Had the
    # server taken the SELECT already, b could learn of it no way but by
    # asking the server.
    uid = server.deliver("alice", "Archive", message(3, "fanout-unheard"))
    notify(pa.admin_port, "user=alice&mailbox=Archive")
    wait_for(lambda: calls(redis, "spublish") == 1, "a to publish it")
    if wait:
        check([s["mailbox"] for s in get_json(pb.admin_port, "/sessions")] == [None],
              "the SELECT waits for b to hear alice's changes")
    relay.release()
    if wait:
        tagged, _, _ = b.wait_tagged(b"S1")
        check(tagged.split()[1] == b"OK", "SELECT: %r", tagged)
    wait_for(lambda: channels(pb) == 1, "b to be subscribed to alice's channel")
    check(received(pb) == 0, "b heard nothing of it (%d)", received(pb))
    check(b.uid_fetch_all("F1") == [uid], "B sees the delivery")
    check(not stale_on(pb), "in sync")
    b.assert_clean()


@test("fanout: a SELECT while the user's channel is being subscribed (the first read of "
      "the generations not back yet) waits for it (select_wait): a change counted before "
      "that read and published before the subscription is not missed", proxy_only=True,
      timeout=60)
def t_fanout_select_waits(ctx):
    select_while_subscribing(ctx, 10000)


@test("fanout: with select_wait = 0 such a SELECT goes on at once and the session checks "
      "its mailbox once: the same change is not missed", proxy_only=True, timeout=60)
def t_fanout_select_no_wait(ctx):
    select_while_subscribing(ctx, 0)


@test("fanout: redis_publish_global = yes also publishes every change on the global channel, "
      "for older instances during a rolling upgrade; no (the default) does not", proxy_only=True,
      timeout=60)
def t_fanout_publish_global(ctx):
    from fault_tests import RedisSubscriber
    redis = start_redis(ctx, "fanout-global")
    server, up = start_upstream(ctx, "fanout-global")
    old = RedisSubscriber(redis)        # as an older instance listens: PSUBSCRIBE * sees it
    ctx.closers.append(old.close)
    pa = ctx.proxy("fo-g", upstream=up, options=[("state", redis.url), ("redis_prefix", PREFIX),
                                                 ("instance_id", "fo-g"),
                                                 ("redis_publish_global", "yes")])
    pb = instance(ctx, "fo-h", redis.url, up)
    both_up(redis)
    notify(pa.admin_port, "user=alice&mailbox=Archive")
    notify(pb.admin_port, "user=bob&mailbox=Archive")
    # The global PUBLISH goes before the user's SPUBLISH on an instance's link.
    wait_for(lambda: calls(redis, "spublish") == 2, "both instances to publish")
    check(calls(redis, "publish") == 1, "one PUBLISH on the global channel, a's: %d",
          calls(redis, "publish"))
    heard = old.data()
    check(b"fo-g\talice\tArchive\t1\t" in heard and b"\tbob\t" not in heard,
          "the global channel carried a's change only: %r", heard[-300:])
