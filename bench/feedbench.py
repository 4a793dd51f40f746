#!/usr/bin/env python3
"""bench/feedbench.py: NOOP and resync latency through imapfresh with backend_events off and
on (an idle WildDuck-style feed: a Redis and a stand-in API), side by side, three alternating
rounds, then NOOP while 200,000 wd_events messages for users with no session here arrive.
Needs a built tree (build/) and Dovecot, Redis, redis-benchmark. Ad hoc: issue 15 asks that
the figures do not move with the feed on."""
import json, os, subprocess, sys, time, statistics
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
import servers
from feed_tests import FakeApi
from servers import HOST
BIN = os.environ.get("IMAPFRESH_BIN", "build/proxy/imapfresh")
LG = os.environ.get("IMAPFRESH_BENCH", "build/bench/imapfresh-bench")
import tempfile; d = tempfile.mkdtemp(prefix="feedbench-"); os.makedirs(d, exist_ok=True)
dc = servers.Dovecot(os.path.join(d, "dc"), users={"bench": "bench-pw"}).setup().start()
rd = servers.Redis(os.path.join(d, "redis")); rd.start()
api = FakeApi({"bench": "5f1e1b2c3d4e5f6a7b8c9d0e"})
def proxy(name, opts):
    p = servers.Imapfresh(BIN, os.path.join(d, name), "%s:%d" % (HOST, dc.port), None, None,
                          options=[("require_tls", "no"), ("log_level", "notice")] + opts, listen_tls=False, name=name)
    p.start(); return p
off = proxy("off", [])
on = proxy("on", [("backend_events", "wildduck"), ("backend_redis", rd.url), ("backend_api", "http://%s:%d" % (HOST, api.port))])
def lg(port, *args):
    r = subprocess.run([LG, "--host", HOST, "--port", str(port), "--user", "bench", "--pass", "bench-pw", "--json"] + list(args), capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1])
lg(off.port, "--workload", "seed", "--mailbox", "resync", "--seed-big", "0", "--seed-small", "20")
res = {"off": {"noop": [], "chg": [], "unchg": []}, "on": {"noop": [], "chg": [], "unchg": []}}
for rnd in range(3):
    for name, p in (("off", off), ("on", on)):
        n = lg(p.port, "--workload", "noop", "--duration", "2", "--warmup", "0.5")
        res[name]["noop"].append(n.get("lat_p50_us"))
        r = lg(p.port, "--workload", "resync", "--mailbox", "resync", "--count", "60")
        res[name]["chg"].append(r.get("changed_p50_us")); res[name]["unchg"].append(r.get("unchanged_p50_us"))
for name in ("off", "on"):
    print(name, {k: (statistics.median(v), v) for k, v in res[name].items()})
# events for users with no session here, as fast as redis-benchmark sends them, during a NOOP run
flood = subprocess.Popen(["redis-benchmark", "-h", HOST, "-p", str(rd.port), "-n", "200000", "-c", "2", "-q", "PUBLISH", "wd_events", '{"e":"aaaaaaaaaaaaaaaaaaaaaaaa"}'], stdout=subprocess.PIPE, text=True)
t0 = time.time(); n = lg(on.port, "--workload", "noop", "--duration", "2", "--warmup", "0.5")
out = flood.communicate()[0]
print("on+flood noop p50", n.get("lat_p50_us"), "flood:", out.strip()[-80:])
m = subprocess.run(["curl", "-s", "http://%s:%d/metrics" % (HOST, on.admin_port)], capture_output=True, text=True).stdout
print([l for l in m.splitlines() if l.startswith("imapfresh_backend_feed_events_total") or l.startswith("imapfresh_backend_feed_matched")])
for x in (off, on): x.stop()
rd.stop(); dc.stop(); api.close()
