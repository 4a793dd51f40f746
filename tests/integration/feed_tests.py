"""The backend's own change feed (issue 15, part 1), with a stand-in for
WildDuck: its Redis (a real redis-server, where the test publishes the
wd_events messages WildDuck publishes) and its API's /users/resolve (a small
HTTP server here). In front of the stale fixture with notifications off, a
delivery stays invisible to B until the feed says the user changed.
tests/wildduck/ runs the same scenarios against a real WildDuck.
"""

import http.server
import json
import os
import threading

import servers
import stale_tests
from admin_tests import get_json, metric, scrape
from stale_tests import Fixture, NEVER, check, login, message, wait_for
from servers import HOST
from tap import test

ALICE_ID = "5f1e1b2c3d4e5f6a7b8c9d0e"


class FakeApi:
    """GET /users/resolve/<name> as WildDuck answers it; records the requests."""

    def __init__(self, ids, token=None):
        self.ids, self.token, self.requests = dict(ids), token, []
        api = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                api.requests.append((self.path, self.headers.get("X-Access-Token")))
                name = self.path.rsplit("/", 1)[-1]
                if api.token and self.headers.get("X-Access-Token") != api.token:
                    code, body = 403, {"error": "Invalid accessToken value"}
                elif self.path.startswith("/users/resolve/") and name in api.ids:
                    code, body = 200, {"success": True, "id": api.ids[name]}
                else:
                    code, body = 404, {"error": "This user does not exist"}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def bed(ctx, name, token=None, extra=()):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "backend-redis-%s-%d" % (name, id(ctx))))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    api = FakeApi({"alice": ALICE_ID}, token)
    ctx.closers.append(api.close)
    opts = [("backend_events", "wildduck"), ("backend_redis", redis.url),
            ("backend_api", "http://%s:%d" % (HOST, api.port))] + list(extra)
    if token:
        opts.append(("backend_api_token", token))
    fx = Fixture(ctx, options=NEVER, proxy_options=opts, name=name)
    return fx, redis, api


def feed_connected(port):
    return metric(scrape(port), "imapfresh_backend_feed_connected") == 1


def publish(redis, payload):
    return stale_tests.redis_cli(redis, "PUBLISH", "wd_events", payload)


@test("feed: a wd_events message for the user's id makes B see a delivery made behind "
      "imapfresh's back; other ids and garbage change nothing", proxy_only=True)
def t_feed_event(ctx):
    events = stale_tests.upstream_log_path(ctx, "feed-events")
    fx, redis, api = bed(ctx, "feed", token="tok3n", extra=[("event_log", events)])
    port = fx.proxy.admin_port
    wait_for(lambda: feed_connected(port), "the feed to subscribe")
    b = login(ctx, fx.proxy.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: any(s.get("backend_id") == ALICE_ID for s in get_json(port, "/sessions")),
             "alice's backend id to be resolved")
    check(api.requests == [("/users/resolve/alice", "tok3n")], "one lookup, with the token: %s",
          api.requests)
    uid = fx.server.deliver("alice", "Archive", message(1, "feed"))
    publish(redis, '{"e":"%s"}' % ("0" * 24))           # another user
    publish(redis, 'not json')
    publish(redis, '{"e":"short"}')
    wait_for(lambda: metric(scrape(port), "imapfresh_backend_feed_events_total") == 3,
             "three events received")
    check(b.uid_fetch_all("F1") == [] and fx.injected() == [], "nothing for alice yet")
    publish(redis, '{"e":"%s","p":{"action":"COPY"}}' % ALICE_ID)
    wait_for(lambda: metric(scrape(port), "imapfresh_backend_feed_matched_total") == 1,
             "alice's event matched")
    check(b.uid_fetch_all("F2") == [uid], "B sees the delivery")
    check(fx.injected()[:2] == ["NOOP", "UID SEARCH ALL"], "one resync: %s", fx.injected())
    steps = [json.loads(l) for l in open(events)]
    check(steps and steps[0]["step"] == "check" and "WildDuck reported" in steps[0]["reason"],
          "the sync event log says why: %s", steps[:1])
    b2 = login(ctx, fx.proxy.tls_port, "B2")
    check(len(api.requests) == 1, "a second session of alice: no new lookup (%s)", api.requests)
    b.assert_clean()
    b2.close()


@test("feed: an idling client is refreshed by a wd_events message", proxy_only=True)
def t_feed_idle(ctx):
    fx, redis, api = bed(ctx, "feed-idle")
    port = fx.proxy.admin_port
    wait_for(lambda: feed_connected(port), "the feed to subscribe")
    b = login(ctx, fx.proxy.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: any(s.get("backend_id") for s in get_json(port, "/sessions")), "the id")
    b.send(b"I1 IDLE\r\n")
    b.wait_continuation()
    fx.server.deliver("alice", "Archive", message(2, "feed-idle"))
    publish(redis, '{"e":"%s"}' % ALICE_ID)
    got = b.readline()
    check(got.startswith(b"* 1 EXISTS"), "EXISTS while idling: %r", got)
    b.send(b"DONE\r\n")
    check(b.wait_tagged("I1")[0].startswith(b"I1 OK"), "IDLE ends")
    b.assert_clean()


@test("feed: the backend's Redis lost and back: every session resyncs once; events flow again",
      proxy_only=True)
def t_feed_lost(ctx):
    fx, redis, api = bed(ctx, "feed-lost")
    port = fx.proxy.admin_port
    wait_for(lambda: feed_connected(port), "the feed to subscribe")
    b = login(ctx, fx.proxy.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    b.uid_fetch_all("F0")
    check(fx.injected() == [], "in sync")
    redis.stop()
    wait_for(lambda: not feed_connected(port), "the feed to notice", deadline=15)
    b.uid_fetch_all("F1")
    check(fx.injected()[:2] == ["NOOP", "UID SEARCH ALL"], "possibly stale: a resync: %s",
          fx.injected())
    redis.start()
    wait_for(lambda: feed_connected(port), "the feed to come back", deadline=40)
    n = len(fx.injected())
    b.uid_fetch_all("F2")
    check(len(fx.injected()) > n, "regained: one more resync (changes may have been missed)")
    n = len(fx.injected())
    b.uid_fetch_all("F3")
    check(len(fx.injected()) == n, "then none")
    uid = fx.server.deliver("alice", "Archive", message(3, "feed-lost"))
    publish(redis, '{"e":"%s"}' % ALICE_ID)
    wait_for(lambda: metric(scrape(port), "imapfresh_backend_feed_matched_total") >= 1,
             "the event after the outage")
    check(uid in b.uid_fetch_all("F4"), "events flow again")
    b.assert_clean()


@test("feed: a login name the API cannot resolve is logged and counted; the session works",
      proxy_only=True)
def t_feed_unresolved(ctx):
    fx, redis, api = bed(ctx, "feed-unres")
    api.ids.clear()
    port = fx.proxy.admin_port
    b = login(ctx, fx.proxy.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: metric(scrape(port), "imapfresh_backend_feed_lookup_failures_total") == 1,
             "the failed lookup counted")
    check(b.uid_fetch_all("F1") == [], "the session goes on")
    check("cannot resolve alice" in fx.proxy_log(), "and it is logged")
    b.assert_clean()


@test("feed/redis: with Redis state the resolved id is kept there (TTL): a second instance "
      "asks the API nothing", proxy_only=True)
def t_feed_id_cached(ctx):
    state = servers.Redis(os.path.join(ctx.env.tmp, "state-redis-%d" % id(ctx)))
    state.start()
    ctx.closers.append(lambda: state.proc and state.stop())
    common = [("state", state.url), ("redis_prefix", "fc:"), ("backend_id_ttl", "10m")]
    fx, redis, api = bed(ctx, "feed-cache-a", extra=common + [("instance_id", "fc-a")])
    up = "%s:%d" % (HOST, fx.port)
    pb = ctx.proxy("feed-cache-b", upstream=up, options=common + [
        ("instance_id", "fc-b"), ("backend_events", "wildduck"), ("backend_redis", redis.url),
        ("backend_api", "http://%s:%d" % (HOST, api.port))])
    a = login(ctx, fx.proxy.tls_port, "A")
    wait_for(lambda: stale_tests.redis_cli(state, "GET", "fc:{alice}:backend_id") == [ALICE_ID],
             "the id kept in Redis")
    ttl = int(stale_tests.redis_cli(state, "TTL", "fc:{alice}:backend_id")[0])
    check(0 < ttl <= 600, "with backend_id_ttl as its TTL: %d", ttl)
    b = login(ctx, pb.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: any(s.get("backend_id") == ALICE_ID for s in get_json(pb.admin_port,
                                                                          "/sessions")),
             "instance b to know alice's id")
    check(len(api.requests) == 1, "one API request for both instances: %s", api.requests)
    uid = fx.server.deliver("alice", "Archive", message(4, "feed-cache"))
    publish(redis, '{"e":"%s"}' % ALICE_ID)
    wait_for(lambda: metric(scrape(pb.admin_port), "imapfresh_backend_feed_matched_total") == 1,
             "instance b matched the event")
    check(b.uid_fetch_all("F1") == [uid], "and B sees the delivery")
    a.close()
    b.assert_clean()
