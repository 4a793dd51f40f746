"""Redis that requires authentication: state = redis://:PASSWORD@host,
redis://USER:PASSWORD@host (Redis 6 ACL users), redis-sentinel:// with an
authenticated master and sentinels of their own password, and the backend's
Redis (backend_redis) with a password file.

Each Redis here refuses every command before AUTH (requirepass, or the
default user switched off), so what works at all went through AUTH. The
password must never appear in the log, the admin endpoint's JSON, /metrics,
the status page or imapfresh-ctl's output.
"""

import json
import os
import re
import signal

import servers
from admin_tests import ctl, ctl_ok, get_json, http_req, metric, scrape
from feed_tests import ALICE_ID, FakeApi, feed_connected
from sentinel_tests import _log
from servers import HOST
from stale_tests import (Fixture, NEVER, append, check, login, message, thunderbird_revisit,
                         wait_for)
import stale_imapd
from tap import test

# Characters that must survive the URL: ':' and '@' raw, '/' and '%' encoded.
SECRET = "s3cr:t@p/ss%x"
SECRET_URL = "s3cr:t@p%2Fss%25x"


def _redis(ctx, name, args=(), auth=None):
    r = servers.Redis(os.path.join(ctx.env.tmp, "%s-%d" % (name, id(ctx))), args=list(args),
                      auth=auth)
    r.start()
    ctx.closers.append(lambda: r.proc and r.stop())
    return r


def _cmd(redis, *args):
    """A command to a Redis with redis.auth; the parsed reply."""
    return servers.resp_command(redis.port, *args, auth=redis.auth)


def _cmd_db(redis, db, *args):
    """The same in database db (AUTH, SELECT db, the command on one connection)."""
    import socket
    with socket.create_connection((HOST, redis.port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(servers.resp_encode("AUTH", *redis.auth) + servers.resp_encode("SELECT", str(db))
                  + servers.resp_encode(*args))
        servers.resp_read(f)
        servers.resp_read(f)
        return servers.resp_read(f)


def _connected(p):
    return metric(scrape(p.admin_port), "imapfresh_redis_connected") == 1


def _no_secret(ctx, p, *secrets):
    """None of secrets in p's log, its admin JSON, /metrics or status page."""
    st, _, page = http_req(p.admin_port, "GET", "/status")
    places = {
        "log": _log(p),
        "/sessions": json.dumps(get_json(p.admin_port, "/sessions")),
        "/metrics": http_req(p.admin_port, "GET", "/metrics")[2],
        "/status": page,
    }
    for s in get_json(p.admin_port, "/sessions"):
        places["/sessions/" + s["id"]] = http_req(p.admin_port, "GET",
                                                  "/sessions/" + s["id"])[2]
    for where, text in places.items():
        for secret in secrets:
            check(secret not in text, "the password %r shows in %s:\n%s", secret, where,
                  text[-2000:])


@test("redis/auth: state through a Redis with requirepass (password percent-encoded in the "
      "URL): a MOVE through A reaches B's session; keys written; the password shown nowhere",
      proxy_only=True, timeout=60)
def t_auth_requirepass(ctx):
    redis = _redis(ctx, "redis-auth", ["--requirepass", SECRET], auth=[SECRET])
    check(servers.resp_command(redis.port, "PING").startswith("NOAUTH"),
          "the fixture refuses commands without AUTH")
    server = stale_imapd.StaleServer(**NEVER)
    port = server.start()
    ctx.closers.append(server.stop)
    url = "redis://:%s@%s:%d/2" % (SECRET_URL, HOST, redis.port)
    common = [("state", url), ("log_level", "debug")]
    pa = ctx.proxy("auth-a", upstream="%s:%d" % (HOST, port),
                   options=common + [("instance_id", "auth-a")])
    pb = ctx.proxy("auth-b", upstream="%s:%d" % (HOST, port),
                   options=common + [("instance_id", "auth-b")])
    for p in (pa, pb):
        wait_for(lambda: _connected(p), "%s to reach the password-protected Redis" % p.name)
    a = login(ctx, pa.tls_port, "A")
    b = login(ctx, pb.tls_port, "B")
    uid = append(a, "P1", "INBOX", message(1, "auth"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT Archive")
    check(b.uid_fetch_all("F0") == [], "Archive starts empty")
    heard = _log(pb).count("change from")
    a.expect_ok("M1", "UID MOVE %d Archive" % uid)
    wait_for(lambda: _log(pb).count("change from") >= heard + 2, "instance B to hear of the MOVE")
    check(len(thunderbird_revisit(b)) == 1, "B sees the moved message")
    b.assert_clean()
    wait_for(lambda: len(_cmd_db(redis, 2, "KEYS", "imapfresh:{alice}:session:*")) == 2,
             "both sessions' records in db 2 (SELECT after AUTH)")
    check(_cmd_db(redis, 0, "KEYS", "imapfresh:*") == [], "nothing in db 0")
    # imapfresh-ctl reads the same state URL, with AUTH.
    opts = ["-c", pa.conf, "-o", "state=" + url]
    out = ctl_ok(ctx, *(opts + ["sessions"]))
    check(re.search(r"^auth-a:s\d+\s+alice\s", out, re.M) and
          re.search(r"^auth-b:s\d+\s+alice\s", out, re.M), "ctl lists both sessions:\n%s", out)
    rc, out, err = ctl(ctx, "-c", pa.conf, "-o",
                       "state=redis://:wr0ng-pw@%s:%d/2" % (HOST, redis.port), "sessions")
    check(rc != 0 and "AUTH refused: WRONGPASS" in err and "redis://:***@" in err and
          "wr0ng-pw" not in err + out, "ctl with a wrong password: %d %s", rc, err)
    for p in (pa, pb):
        _no_secret(ctx, p, SECRET, SECRET_URL, "s3cr")
    # A bad URL's error message hides the password too.
    for bad in ("redis://:%s@h:0" % SECRET_URL, "redis://s3cret-alone@h"):
        rc, out, err = ctl(ctx, "-c", pa.conf, "-o", "state=" + bad, "sessions")
        check(rc != 0 and "state: expected" in err and "s3cr" not in err + out,
              "the error hides the password: %s", err)


@test("redis/auth: state as a Redis 6 ACL user (user:password@, the default user off)",
      proxy_only=True, timeout=60)
def t_auth_acl_user(ctx):
    redis = _redis(ctx, "redis-acl", ["--user", "default", "off", "--user", "imapfresh", "on",
                                      ">acl-s3cret", "~*", "&*", "+@all"],
                   auth=["imapfresh", "acl-s3cret"])
    check(servers.resp_command(redis.port, "PING", auth=["acl-s3cret"]).startswith("WRONGPASS"),
          "the password alone (the default user) is refused")
    fx = Fixture(ctx, options=NEVER, name="auth-acl", proxy_options=[
        ("state", "redis://imapfresh:acl-s3cret@%s:%d" % (HOST, redis.port)),
        ("instance_id", "auth-acl")])
    wait_for(lambda: _connected(fx.proxy), "imapfresh to log in as the ACL user")
    a = login(ctx, fx.proxy.tls_port, "A")
    a.expect_ok("S1", "SELECT INBOX")
    a.uid_fetch_all("F1")
    wait_for(lambda: _cmd(redis, "KEYS", "imapfresh:{alice}:session:auth-acl:*"),
             "the session's record written as the ACL user")
    users = [c for c in (_cmd(redis, "CLIENT", "LIST") or b"").split(b"\n")
             if b"user=imapfresh" in c]
    check(len(users) >= 2, "both links logged in as imapfresh: %s", users)
    check(metric(scrape(fx.proxy.admin_port), "imapfresh_redis_errors_total") == 0,
          "no Redis error")
    _no_secret(ctx, fx.proxy, "acl-s3cret")


@test("redis/auth: a wrong password: imapfresh serves on, degraded as with Redis down, logs "
      "the refusal once without the password; CONFIG SET requirepass to it: recovered",
      proxy_only=True, timeout=90)
def t_auth_wrong_password(ctx):
    redis = _redis(ctx, "redis-wrong", ["--requirepass", "the-right-one"], auth=["the-right-one"])
    fx = Fixture(ctx, options=NEVER, name="auth-wrong", proxy_options=[
        ("state", "redis://:wr0ng-s3cret@%s:%d" % (HOST, redis.port)),
        ("instance_id", "auth-wrong")])
    p = fx.proxy
    shown = "redis://:***@%s:%d" % (HOST, redis.port)
    refused = re.compile(r"warning: redis %s:%d: (command|subscriber) link: AUTH refused: "
                         r"WRONGPASS .*\(state = %s\)" % (re.escape(HOST), redis.port,
                                                        re.escape(shown)))
    wait_for(lambda: refused.search(_log(p)), "the refusal logged as a warning naming the URL")
    # Retries fail the same way: logged again, but not as warnings.
    wait_for(lambda: len(re.findall(r"AUTH refused", _log(p))) >= 2, "a retry refused too")
    check(len(refused.findall(_log(p))) == 1, "one warning per outage:\n%s", _log(p)[-3000:])
    m = scrape(p.admin_port)
    check(metric(m, "imapfresh_redis_connected") == 0 and
          metric(m, "imapfresh_redis_errors_total") >= 2, "counted as Redis down")
    # Sessions work as when Redis is down.
    b = login(ctx, p.tls_port, "B")
    uid = append(b, "P1", "INBOX", message(1, "wrong"))
    b.expect_ok("S1", "SELECT INBOX")
    check(b.uid_fetch_all("F1") == [uid], "the session works without Redis")
    check(get_json(p.admin_port, "/sessions"), "and is listed")
    _no_secret(ctx, p, "wr0ng-s3cret")
    # The operator makes Redis accept the configured password.
    check(_cmd(redis, "CONFIG", "SET", "requirepass", "wr0ng-s3cret") == b"OK", "CONFIG SET")
    redis.auth = ["wr0ng-s3cret"]
    wait_for(lambda: _connected(p), "imapfresh to get in with the password now right",
             deadline=40)
    check("redis %s:%d: connected" % (HOST, redis.port) in _log(p), "the recovery logged")
    b.uid_fetch_all("F2")
    wait_for(lambda: _cmd(redis, "KEYS", "imapfresh:{alice}:session:auth-wrong:*"),
             "the session's record written once recovered (the up callback)")
    b.expect_ok("N1", "NOOP")
    b.assert_clean()
    _no_secret(ctx, p, "wr0ng-s3cret")


@test("redis/auth: state_password_file: read at start; a new password in it is used after a "
      "reload (SIGHUP) once the links are cut", proxy_only=True, timeout=90)
def t_auth_password_file_reload(ctx):
    redis = _redis(ctx, "redis-file", ["--requirepass", "file-one"], auth=["file-one"])
    pw = os.path.join(ctx.env.tmp, "redis-pass-%d" % id(ctx))
    with open(pw, "w") as f:
        f.write("file-one\n")
    fx = Fixture(ctx, options=NEVER, name="auth-file", proxy_options=[
        ("state", "redis://%s:%d" % (HOST, redis.port)), ("state_password_file", pw),
        ("instance_id", "auth-file")])
    p = fx.proxy
    wait_for(lambda: _connected(p), "imapfresh to log in with the file's password")
    check(_cmd(redis, "CONFIG", "SET", "requirepass", "file-two") == b"OK", "new password")
    redis.auth = ["file-two"]
    with open(pw, "w") as f:
        f.write("file-two\n")
    p.signal(signal.SIGHUP)
    wait_for(lambda: "new state store credentials" in _log(p), "the reload to take them")
    check("take effect only after a restart" not in _log(p), "no restart asked for")
    _cmd(redis, "CLIENT", "KILL", "TYPE", "normal")
    _cmd(redis, "CLIENT", "KILL", "TYPE", "pubsub")
    wait_for(lambda: "reconnected" in _log(p), "imapfresh to reconnect with the new password",
             deadline=40)
    check("AUTH refused" not in _log(p), "never refused:\n%s", _log(p)[-3000:])
    _no_secret(ctx, p, "file-one", "file-two")


@test("redis/auth: redis-sentinel:// with the master's password in the URL and the sentinels' "
      "own (sentinel_password): found, written to, and followed through a failover",
      proxy_only=True, timeout=90)
def t_auth_sentinel(ctx):
    rs = servers.RedisSentinels(os.path.join(ctx.env.tmp, "sentinel-auth-%d" % id(ctx)),
                                master_password="m4ster-pw", sentinel_password="s3ntinel-pw")
    rs.start()
    ctx.closers.append(rs.stop)
    check(servers.resp_command(rs.ports[0], "PING").startswith("NOAUTH"),
          "the sentinels require their password")
    url = "redis-sentinel://:m4ster-pw@%s/%s" % (
        ",".join("%s:%d" % (HOST, port) for port in rs.ports), rs.name)
    p = ctx.proxy("sentinel-auth", options=[("state", url), ("sentinel_password", "s3ntinel-pw"),
                                            ("instance_id", "sentinel-auth")])
    old = "%s:%d" % (HOST, rs.master.port)
    new = "%s:%d" % (HOST, rs.replica.port)
    wait_for(lambda: "redis %s (sentinel mymaster): connected" % old in _log(p),
             "imapfresh to reach the master through the sentinels", deadline=30)
    a = login(ctx, p.tls_port, "A")
    a.expect_ok("S1", "SELECT INBOX")
    a.uid_fetch_all("F1")
    wait_for(lambda: _cmd(rs.master, "KEYS", "imapfresh:{alice}:session:*"),
             "the session's record on the master")
    # imapfresh-ctl asks the sentinels and the master with the same credentials.
    out = ctl_ok(ctx, "-c", p.conf, "-o", "state=" + url, "-o", "sentinel_password=s3ntinel-pw",
                 "sessions")
    check(re.search(r"^sentinel-auth:s\d+\s+alice\s", out, re.M), "ctl lists it:\n%s", out)
    rc, out, err = ctl(ctx, "-c", p.conf, "-o", "state=" + url, "sessions")
    check(rc != 0 and "AUTH refused" not in err and "NOAUTH" in err and "m4ster-pw" not in err,
          "ctl without sentinel_password: the sentinels refuse it: %s", err)
    check(servers.resp_command(rs.ports[0], "SENTINEL", "FAILOVER", rs.name,
                               auth=rs.sentinel_auth) == b"OK", "SENTINEL FAILOVER accepted")
    wait_for(lambda: "failed over from %s to %s" % (old, new) in _log(p),
             "imapfresh to follow the failover to %s" % new, deadline=40)
    a.expect_ok("N1", "NOOP")
    wait_for(lambda: _cmd(rs.replica, "KEYS", "imapfresh:{alice}:session:*"),
             "the session's record written again on the new master (AUTH there too)")
    check("AUTH refused" not in _log(p), "no AUTH refused:\n%s", _log(p)[-3000:])
    _no_secret(ctx, p, "m4ster-pw", "s3ntinel-pw")


@test("redis/auth: a wrong sentinel_password is named in the log; no master is found",
      proxy_only=True, timeout=60)
def t_auth_sentinel_wrong(ctx):
    rs = servers.RedisSentinels(os.path.join(ctx.env.tmp, "sentinel-authw-%d" % id(ctx)),
                                sentinel_password="s3ntinel-pw")
    rs.start()
    ctx.closers.append(rs.stop)
    p = ctx.proxy("sentinel-authw", options=[("state", rs.url),
                                             ("sentinel_password", "wr0ng-pw"),
                                             ("instance_id", "sentinel-authw")])
    wait_for(lambda: re.search(r"warning: redis \(sentinel mymaster\): sentinel: sentinel "
                               r"127\.0\.0\.1:\d+: AUTH refused \(sentinel_user, "
                               r"sentinel_password\): WRONGPASS", _log(p)),
             "the sentinels' refusal in the warning", deadline=30)
    check(metric(scrape(p.admin_port), "imapfresh_redis_connected") == 0, "Redis down")
    _no_secret(ctx, p, "wr0ng-pw", "s3ntinel-pw")


@test("redis/auth: the backend's Redis (backend_redis) with a password from "
      "backend_redis_password_file: the feed subscribes and its events reach the session",
      proxy_only=True, timeout=60)
def t_auth_feed(ctx):
    redis = _redis(ctx, "backend-redis-auth", ["--requirepass", "wd-s3cret"], auth=["wd-s3cret"])
    api = FakeApi({"alice": ALICE_ID})
    ctx.closers.append(api.close)
    pw = os.path.join(ctx.env.tmp, "wd-pass-%d" % id(ctx))
    with open(pw, "w") as f:
        f.write("wd-s3cret\n")
    fx = Fixture(ctx, options=NEVER, name="feed-auth", proxy_options=[
        ("backend_events", "wildduck"), ("backend_redis", "redis://%s:%d" % (HOST, redis.port)),
        ("backend_redis_password_file", pw), ("backend_api", "http://%s:%d" % (HOST, api.port))])
    port = fx.proxy.admin_port
    wait_for(lambda: feed_connected(port), "the feed to subscribe through AUTH")
    b = login(ctx, fx.proxy.tls_port, "B")
    b.expect_ok("S1", "SELECT Archive")
    wait_for(lambda: any(s.get("backend_id") == ALICE_ID for s in get_json(port, "/sessions")),
             "alice's backend id")
    uid = fx.server.deliver("alice", "Archive", message(1, "feed-auth"))
    _cmd(redis, "PUBLISH", "wd_events", '{"e":"%s"}' % ALICE_ID)
    wait_for(lambda: metric(scrape(port), "imapfresh_backend_feed_matched_total") == 1,
             "alice's event matched")
    check(b.uid_fetch_all("F1") == [uid], "B sees the delivery")
    b.assert_clean()
    _no_secret(ctx, fx.proxy, "wd-s3cret")


@test("redis/auth: the backend's Redis refusing the password: the feed is lost, the refusal "
      "logged without the password", proxy_only=True, timeout=60)
def t_auth_feed_wrong(ctx):
    redis = _redis(ctx, "backend-redis-authw", ["--requirepass", "wd-s3cret"],
                   auth=["wd-s3cret"])
    api = FakeApi({"alice": ALICE_ID})
    ctx.closers.append(api.close)
    fx = Fixture(ctx, options=NEVER, name="feed-authw", proxy_options=[
        ("backend_events", "wildduck"),
        ("backend_redis", "redis://:wr0ng-s3cret@%s:%d" % (HOST, redis.port)),
        ("backend_api", "http://%s:%d" % (HOST, api.port))])
    wait_for(lambda: re.search(r"warning: backend feed .* lost: AUTH refused: WRONGPASS .*"
                               r"\(backend_redis = redis://:\*\*\*@", fx.proxy_log()),
             "the refusal logged")
    check(not feed_connected(fx.proxy.admin_port), "the feed is down")
    _no_secret(ctx, fx.proxy, "wr0ng-s3cret")
