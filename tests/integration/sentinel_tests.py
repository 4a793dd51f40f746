"""Redis Sentinel (issue 18): state = redis-sentinel://s1,s2,s3/mymaster.

A real master, a replica and three sentinels (servers.RedisSentinels), two
imapfresh instances finding the master through them, and the stale upstream
fixture with notifications that never fire (stale_tests.NEVER): what B sees
of a change made through A, only imapfresh told it (A's instance published
it on Redis, B's heard it). The master is SIGKILLed mid-session; after the
sentinels' failover both instances must be on the new master, the sessions
untouched, a change through A must again reach B, and both sync event logs
must say that the master moved. Then: discovery past sentinels that are
down, silent or name a replica (FakeSentinel), and a manual failover that
leaves the old master up, which only the sentinels' announcement reveals.
"""

import json
import os
import re
import socket
import threading

import servers
import stale_imapd
from admin_tests import ctl_ok, http_req
from servers import HOST
from stale_tests import NEVER, append, check, login, message, thunderbird_revisit, wait_for
from tap import test


def _log(p):
    with open(p.log, "rb") as f:
        return f.read().decode("utf-8", "replace")


def _events(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    except FileNotFoundError:
        return []


class FakeSentinel:
    """Speaks enough of a sentinel's protocol to mislead: names `master`
    ((host, port)) as the master and confirms SUBSCRIBEs, or with master None
    accepts connections and never answers."""

    def __init__(self, master=None):
        self.master = master
        self.asked = 0
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                cmd = servers.resp_read(f)
                if self.master is None:
                    continue
                name = (cmd[0] if isinstance(cmd, list) and cmd else b"").upper()
                if name == b"SENTINEL":
                    self.asked += 1
                    host, port = (a.encode() for a in (self.master[0], str(self.master[1])))
                    c.sendall(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                              % (len(host), host, len(port), port))
                elif name == b"SUBSCRIBE":
                    c.sendall(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n"
                              % (len(cmd[1]), cmd[1]))
                else:
                    c.sendall(b"-ERR unknown command\r\n")
        except (OSError, ValueError):
            pass

    def stop(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def _heard(p):
    """Change messages p heard from the other instance (debug log lines)."""
    return _log(p).count("change from")


@test("sentinel: master SIGKILLed mid-session: imapfresh follows the failover, sessions keep "
      "working, changes reach the other instance again, the event log says so",
      proxy_only=True, timeout=90)
def t_sentinel_failover(ctx):
    rs = servers.RedisSentinels(os.path.join(ctx.env.tmp, "sentinel-%d" % id(ctx)))
    rs.start()
    ctx.closers.append(rs.stop)
    server = stale_imapd.StaleServer(**NEVER)
    port = server.start()
    ctx.closers.append(server.stop)
    events = {n: os.path.join(ctx.env.tmp, "sentinel-events-%s-%d.log" % (n, id(ctx)))
              for n in ("a", "b")}
    proxies = {}
    for n in ("a", "b"):
        proxies[n] = ctx.proxy("sentinel-" + n, upstream="%s:%d" % (HOST, port), options=[
            ("state", rs.url), ("log_level", "debug"), ("instance_id", "sentinel-" + n),
            ("event_log", events[n])])
    pa, pb = proxies["a"], proxies["b"]
    old = "%s:%d" % (HOST, rs.master.port)
    new = "%s:%d" % (HOST, rs.replica.port)
    for p in (pa, pb):
        wait_for(lambda: "redis %s (sentinel mymaster): connected" % old in _log(p),
                 "%s to reach the master through the sentinels" % p.name)

    a = login(ctx, pa.tls_port, "A")
    b = login(ctx, pb.tls_port, "B")
    uids = [append(a, "P%d" % i, "INBOX", message(i, "sentinel")) for i in range(2)]
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT Archive")
    check(b.uid_fetch_all("F0") == [], "Archive starts empty")
    heard = _heard(pb)
    a.expect_ok("M1", "UID MOVE %d Archive" % uids[0])
    wait_for(lambda: _heard(pb) >= heard + 2, "instance B to hear of the MOVE (INBOX, Archive)")
    check(len(thunderbird_revisit(b)) == 1, "before the failover B sees the moved message")

    rs.master.kill()
    for p in (pa, pb):
        wait_for(lambda: "failed over from %s to %s" % (old, new) in _log(p),
                 "%s to follow the failover to %s" % (p.name, new), deadline=30)
    check(rs.master_port() == rs.replica.port, "the sentinels name the replica now")

    # Nothing closed, every command answered.
    a.expect_ok("N1", "NOOP")
    b.expect_ok("N2", "NOOP")
    # B's first trigger after the failover resyncs it once (changes may have
    # been missed meanwhile), so what follows is only what it hears.
    check(len(thunderbird_revisit(b)) == 1, "after the failover B still sees its message")
    heard = _heard(pb)
    a.expect_ok("M2", "UID MOVE %d Archive" % uids[1])
    wait_for(lambda: _heard(pb) >= heard + 2,
             "instance B to hear, through the new master, of a MOVE made after the failover")
    seen = thunderbird_revisit(b)
    check(len(seen) == 2, "after the failover B sees the second moved message, saw %s", seen)
    a.expect_ok("N3", "NOOP")
    a.assert_clean()
    b.assert_clean()
    gen = servers.resp_command(rs.replica.port, "HGET", "imapfresh:{alice}:gen", "Archive")
    check(gen is not None and int(gen) >= 2, "the new master counts Archive's changes: %r", gen)
    stream = servers.resp_command(rs.replica.port, "XRANGE", "imapfresh:events", "-", "+") or []
    logged = [json.loads(e[1][1]) for e in stream if isinstance(e, list)]
    check(sorted(e["instance"] for e in logged if e["step"] == "failover") ==
          ["sentinel-a", "sentinel-b"], "the failover in the new master's event stream too")

    st, _, page = http_req(pb.admin_port, "GET", "/status")
    check(st == 200 and "redis master %s -&gt; %s" % (old, new) in page,
          "the status page's recent events show the failover: %s", page[-2000:])
    # imapfresh-ctl finds the new master through the sentinels too.
    out = ctl_ok(ctx, "-c", pa.conf, "-o", "state=" + rs.url, "events", "-n", "100")
    check(re.search(r'failover .*reason="redis master %s -> %s"' % (old, new), out),
          "imapfresh-ctl events shows the failover: %s", out[-1500:])
    out = ctl_ok(ctx, "-c", pa.conf, "-o", "state=" + rs.url, "--json", "user", "alice")
    check("Archive" in out and "sentinel-b" in out, "imapfresh-ctl user alice: %s", out[-1500:])

    for n, p in proxies.items():
        check(p.alive(), "%s still runs", p.name)
        moved = [e for e in _events(events[n]) if e.get("step") == "failover"]
        check(len(moved) == 1 and moved[0]["reason"] == "redis master %s -> %s" % (old, new)
              and moved[0]["session"] is None and moved[0]["instance"] == "sentinel-" + n,
              "%s's event log has the failover once: %s", p.name, moved)
    after = [e for e in _events(events["b"]) if e.get("step") == "check" and
             re.search(r"state store", e.get("reason") or "")]
    check(after, "B's event log shows its resync for changes possibly missed during the failover")


@test("sentinel: sentinels that are down, silent or name a replica are skipped; imapfresh ends "
      "on the master (ROLE), and sessions are stored there", proxy_only=True, timeout=60)
def t_sentinel_discovery(ctx):
    rs = servers.RedisSentinels(os.path.join(ctx.env.tmp, "sentinel-%d" % id(ctx)))
    rs.start()
    ctx.closers.append(rs.stop)
    silent = FakeSentinel()
    liar = FakeSentinel((HOST, rs.replica.port))
    ctx.closers += [silent.stop, liar.stop]
    down = servers.free_port()
    url = "redis-sentinel://%s/%s" % (",".join("%s:%d" % (HOST, p) for p in
                                               [down, silent.port, liar.port] + rs.ports), rs.name)
    p = ctx.proxy("sentinel-discovery", options=[("state", url), ("instance_id", "sentinel-d")])
    master = "%s:%d" % (HOST, rs.master.port)
    wait_for(lambda: "redis %s (sentinel mymaster): connected" % master in _log(p),
             "imapfresh to reach the master past the misleading sentinels", deadline=30)
    log = _log(p)
    check(liar.asked >= 1, "the lying sentinel was asked")
    check(re.search(r"sentinel 127\.0\.0\.1:%d: Connection refused" % down, log),
          "the sentinel that is down was skipped:\n%s", log[-3000:])
    check("sentinel 127.0.0.1:%d: no answer in time" % silent.port in log,
          "the silent sentinel was given up:\n%s", log[-3000:])
    check("ROLE: not a master" in log, "the replica the liar named was refused:\n%s", log[-3000:])
    check("%s:%d (sentinel mymaster): connected" % (HOST, rs.replica.port) not in log and
          "failed over" not in log, "never settled on the replica, no failover:\n%s", log[-3000:])
    a = login(ctx, p.tls_port, "A")
    a.expect_ok("S1", "SELECT INBOX")
    a.uid_fetch_all("F1")
    wait_for(lambda: servers.resp_command(rs.master.port, "KEYS", "imapfresh:{alice}:session:*"),
             "the session's record on the master")


@test("sentinel: a manual failover (SENTINEL FAILOVER, the old master alive): imapfresh moves "
      "to the new master when the sentinels announce it, and writes there", proxy_only=True, timeout=60)
def t_sentinel_manual_failover(ctx):
    rs = servers.RedisSentinels(os.path.join(ctx.env.tmp, "sentinel-%d" % id(ctx)))
    rs.start()
    ctx.closers.append(rs.stop)
    p = ctx.proxy("sentinel-manual", options=[("state", rs.url), ("instance_id", "sentinel-m")])
    old = "%s:%d" % (HOST, rs.master.port)
    new = "%s:%d" % (HOST, rs.replica.port)
    wait_for(lambda: "redis %s (sentinel mymaster): connected" % old in _log(p),
             "imapfresh to reach the master")
    a = login(ctx, p.tls_port, "A")
    box = ctx.mailbox(a, "Sentinel")
    uid = append(a, "P1", "INBOX", message(1, "manual"))
    a.expect_ok("S1", "SELECT INBOX")
    check(servers.resp_command(rs.ports[0], "SENTINEL", "FAILOVER", rs.name) == b"OK",
          "SENTINEL FAILOVER accepted")
    wait_for(lambda: "failed over from %s to %s" % (old, new) in _log(p),
             "imapfresh to follow the failover to %s" % new, deadline=30)
    # The sentinels demote the old master only some 8 s after the failover
    # (it must report itself a master for that long): it is one still, so
    # imapfresh moved because they announced the failover, not because its
    # links were cut or its writes refused.
    role = servers.resp_command(rs.master.port, "ROLE")
    check(role and role[0] == b"master", "the old master is still one: %r", role)
    a.expect_ok("M1", "UID MOVE %d %s" % (uid, box))
    wait_for(lambda: int(servers.resp_command(rs.replica.port, "HGET", "imapfresh:{alice}:gen",
                                              box) or 0) >= 1,
             "the MOVE counted on the new master")
    check(servers.resp_command(rs.replica.port, "KEYS", "imapfresh:{alice}:session:*"),
          "the session's record written again on the new master")
