#!/usr/bin/env python3
"""bench/fanout.py: change fan-out between imapfresh instances (issue 18, part 2).

N instances (8) share one Redis; S sessions (10,000) of U users (2,000), each
session on an instance drawn at random (a round-robin balancer), sit idle
with INBOX selected. A publisher sends R changes per second (1,000) for
users drawn at random, exactly as the binary under test publishes a change
(HINCRBY P{U}:gen, then PUBLISH Pchanges or SPUBLISH P{U}:changes), under a
source name that is no instance's, so every message is foreign to every
instance. Measured over the publishing window: messages each instance
received (its metrics), each instance's CPU (/proc/<pid>/stat), Redis's CPU
(INFO cpu) and memory (INFO memory).

The upstream is a minimal fake IMAP server in this script (greeting,
CAPABILITY, LOGIN, SELECT with an empty mailbox, OK to anything else), not
Dovecot: 10,000 Dovecot sessions cost more than the 2 cores have. Sessions
are clients in one asyncio process, the fake server another.

    bench/fanout.py --label before --binary /tmp/fanout-base/build-o2/proxy/imapfresh --mode global
    bench/fanout.py --label after  --binary build-o2/proxy/imapfresh --mode user
Prints one JSON line; --out appends it to a file.
"""
import argparse, asyncio, json, os, random, re, resource, socket, subprocess, sys, tempfile
import time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
HOST = "127.0.0.1"
PREFIX = "fb:"

# ------------------------------------------------------------ fake upstream

CAPS = b"IMAP4rev1 IDLE UIDPLUS LITERAL+"


async def fake_session(reader, writer):
    writer.write(b"* OK [CAPABILITY " + CAPS + b"] fake ready\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            parts = line.rstrip(b"\r\n").split(b" ", 2)
            tag = parts[0]
            cmd = parts[1].upper() if len(parts) > 1 else b""
            if cmd == b"CAPABILITY":
                writer.write(b"* CAPABILITY " + CAPS + b"\r\n" + tag + b" OK done\r\n")
            elif cmd == b"LOGIN":
                writer.write(tag + b" OK [CAPABILITY " + CAPS + b"] logged in\r\n")
            elif cmd in (b"SELECT", b"EXAMINE"):
                writer.write(b"* FLAGS (\\Seen)\r\n* 0 EXISTS\r\n* 0 RECENT\r\n"
                             b"* OK [UIDVALIDITY 1] ok\r\n* OK [UIDNEXT 1] ok\r\n"
                             + tag + b" OK [READ-WRITE] selected\r\n")
            elif cmd == b"LOGOUT":
                writer.write(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                break
            elif cmd == b"IDLE":
                writer.write(b"+ idling\r\n")
                await reader.readline()
                writer.write(tag + b" OK done\r\n")
            else:
                writer.write(tag + b" OK done\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    writer.close()


async def run_upstream(port):
    srv = await asyncio.start_server(fake_session, HOST, port, backlog=4096)
    print("ready", flush=True)
    async with srv:
        await srv.serve_forever()

# ------------------------------------------------------------ clients


async def client(port, user, held, sem, ready):
    async with sem:
        for attempt in range(20):
            try:
                r, w = await asyncio.open_connection(HOST, port)
                await r.readline()
                w.write(b"a LOGIN %s pw\r\n" % user.encode())
                while not (await r.readline()).startswith(b"a "):
                    pass
                w.write(b"b SELECT INBOX\r\n")
                while not (line := await r.readline()).startswith(b"b "):
                    if not line:
                        raise ConnectionError("closed")
                held.append((r, w))
                ready[0] += 1
                return
            except (ConnectionError, OSError):
                await asyncio.sleep(0.2 * (attempt + 1))


def placement(kind, sessions, users, n, seed):
    """The instance of each session: drawn at random (a round-robin balancer),
    or by user (a balancer that keeps a user's sessions on one instance)."""
    rnd = random.Random(seed)
    return [rnd.randrange(n) if kind == "random" else (i % users) % n for i in range(sessions)]


async def run_clients(ports, sessions, users, seed, kind):
    held, ready, sem = [], [0], asyncio.Semaphore(64)
    jobs = [client(ports[k], "u%d" % (i % users), held, sem, ready)
            for i, k in enumerate(placement(kind, sessions, users, len(ports), seed))]
    await asyncio.gather(*jobs)
    print("ready %d" % ready[0], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

# ------------------------------------------------------------ measuring


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def redis_info(port, section):
    r = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), "INFO", section],
                       capture_output=True, text=True, timeout=10).stdout
    return dict(l.split(":", 1) for l in r.splitlines() if ":" in l)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def scrape(admin_port):
    text = urllib.request.urlopen("http://%s:%d/metrics" % (HOST, admin_port), timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def received(m):
    # after: every message delivered; before (main): the foreign ones, here all of them
    return m.get("imapfresh_store_changes_received_total", m.get("imapfresh_redis_received_total", 0))


def snapshot(instances, redis_port):
    cpu = redis_info(redis_port, "cpu")
    return {"t": time.monotonic(),
            "cpu": [cpu_seconds(p.proc.pid) for p in instances],
            "recv": [received(scrape(p.admin_port)) for p in instances],
            "redis_cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])}


def publish(redis_port, mode, users, rate, duration, seed):
    """rate changes/s for duration s, in batches every 10 ms, as imapfresh publishes them."""
    rnd = random.Random(seed)
    s = socket.create_connection((HOST, redis_port))
    s.setblocking(False)
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < duration:
        due = int((time.monotonic() - t0) * rate)
        out = b""
        while sent < due:
            u = "u%d" % rnd.randrange(users)
            msg = "bench-pub\t%s\tINBOX\t%d\tbench change" % (u, sent)
            out += resp("HINCRBY", "%s{%s}:gen" % (PREFIX, u), "INBOX", "1")
            out += (resp("PUBLISH", PREFIX + "changes", msg) if mode == "global"
                    else resp("SPUBLISH", "%s{%s}:changes" % (PREFIX, u), msg))
            sent += 1
        if out:
            s.setblocking(True)
            s.sendall(out)
            s.setblocking(False)
        try:
            while True:
                if not s.recv(1 << 16):     # replies: read and dropped
                    break
        except BlockingIOError:
            pass
        time.sleep(0.01)
    s.close()
    return sent, time.monotonic() - t0


def report(path):
    """The Markdown tables of a file of JSON lines."""
    runs = [json.loads(l) for l in open(path) if l.strip()]
    print("| run | binary publishes | placement | changes/s | changes sent | received per "
          "instance (min-max) | deliveries by Redis (sum) | instance CPU s (min-max) | "
          "instance CPU % of a core (mean) | Redis CPU s | Redis used_memory | channels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        pi = r["per_instance"]
        recv = [p["received"] for p in pi]
        cpu = [p["cpu_s"] for p in pi]
        pct = sum(p["cpu_pct"] for p in pi) / len(pi)
        print("| %s | %s | %s | %d | %d | %d-%d | %d | %.2f-%.2f | %.2f | %.2f | %.2f MB | %s |" % (
            r["label"], "PUBLISH Pchanges" if r["mode"] == "global" else "SPUBLISH P{U}:changes",
            r.get("placement", "random"), r["rate"], r["changes_sent"], min(recv), max(recv),
            sum(recv), min(cpu), max(cpu), pct, r["redis_cpu_s"], r["redis_used_memory"] / 1e6,
            "%d shard" % r["redis_pubsubshard_channels"] if r["redis_pubsubshard_channels"]
            else "%d plain" % r["redis_pubsub_channels"]))
    print()
    for r in runs:
        print("%s: sessions %d/%d (setup %.1f s), per instance: %s; load average at the end %s"
              % (r["label"], r["sessions_ready"], r["sessions_asked"], r["setup_s"],
                 ", ".join("%d sessions/%d users/%d received/%.2f s" % (
                     p["sessions"], p["users_here"], p["received"], p["cpu_s"])
                     for p in r["per_instance"]), " ".join(r["loadavg"])))


def main():
    if sys.argv[1:2] == ["--report"]:
        return report(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--mode", choices=("global", "user"), required=True,
                    help="how the binary publishes: main's Pchanges, or per-user SPUBLISH")
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--placement", choices=("random", "user"), default="random",
                    help="sessions on instances at random, or all of a user's on one")
    ap.add_argument("--out")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    a = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # 10,000 sockets in one process
    if a.role == "upstream":
        return asyncio.run(run_upstream(int(a.ports)))
    if a.role == "clients":
        return asyncio.run(run_clients([int(p) for p in a.ports.split(",")], a.sessions,
                                       a.users, a.seed, a.placement))

    import servers
    d = tempfile.mkdtemp(prefix="fanout-bench-")
    rd = servers.Redis(os.path.join(d, "redis"))
    rd.start()
    up_port = servers.free_port()
    me = [sys.executable, os.path.abspath(__file__)]
    up = subprocess.Popen(me + ["--role", "upstream", "--ports", str(up_port), "--binary", "x",
                                "--label", "x", "--mode", a.mode], stdout=subprocess.PIPE,
                          text=True)
    assert up.stdout.readline().strip() == "ready"
    insts = []
    for i in range(a.instances):
        p = servers.Imapfresh(a.binary, os.path.join(d, "i%d" % i), "%s:%d" % (HOST, up_port),
                              None, None, listen_tls=False, name="i%d" % i,
                              options=[("require_tls", "no"), ("log_level", "warning"),
                                       ("state", rd.url), ("redis_prefix", PREFIX),
                                       ("instance_id", "i%d" % i), ("max_clients", "20000")])
        p.start()
        insts.append(p)
    t_setup = time.monotonic()
    cl = subprocess.Popen(me + ["--role", "clients", "--ports", ",".join(str(p.port) for p in insts),
                                "--sessions", str(a.sessions), "--users", str(a.users),
                                "--seed", str(a.seed), "--placement", a.placement,
                                "--binary", "x", "--label", "x",
                                "--mode", a.mode],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = cl.stdout.readline().split()
    ready = int(line[1]) if len(line) == 2 else 0
    setup_s = time.monotonic() - t_setup
    # where the sessions are: the same draw as the clients made
    where = [set() for _ in insts]
    for i, k in enumerate(placement(a.placement, a.sessions, a.users, len(insts), a.seed)):
        where[k].add(i % a.users)
    time.sleep(3)           # subscriptions settle
    sess = [scrape(p.admin_port).get("imapfresh_sessions_authenticated", 0) for p in insts]
    chans = [scrape(p.admin_port).get("imapfresh_redis_user_channels") for p in insts]
    q0 = snapshot(insts, rd.port)
    time.sleep(5)           # quiet: what idle sessions cost
    q1 = snapshot(insts, rd.port)
    sent, took = publish(rd.port, a.mode, a.users, a.rate, a.duration, a.seed)
    time.sleep(1)           # the last messages land
    q2 = snapshot(insts, rd.port)
    mem = redis_info(rd.port, "memory")
    stats = redis_info(rd.port, "stats")
    res = {
        "label": a.label, "mode": a.mode, "binary": a.binary, "instances": a.instances,
        "placement": a.placement,
        "sessions_asked": a.sessions, "sessions_ready": ready, "setup_s": round(setup_s, 1),
        "users": a.users, "rate": a.rate, "duration_s": round(took, 1), "changes_sent": sent,
        "per_instance": [{
            "sessions": sess[i], "users_here": len(where[i]), "user_channels": chans[i],
            "received": q2["recv"][i] - q1["recv"][i],
            "cpu_s": round(q2["cpu"][i] - q1["cpu"][i], 2),
            "cpu_pct": round(100 * (q2["cpu"][i] - q1["cpu"][i]) / (q2["t"] - q1["t"]), 1),
            "idle_cpu_pct": round(100 * (q1["cpu"][i] - q0["cpu"][i]) / (q1["t"] - q0["t"]), 1),
            "rss_kib": rss_kib(insts[i].proc.pid),
        } for i in range(len(insts))],
        "redis_cpu_s": round(q2["redis_cpu"] - q1["redis_cpu"], 2),
        "redis_cpu_pct": round(100 * (q2["redis_cpu"] - q1["redis_cpu"]) / (q2["t"] - q1["t"]), 1),
        "redis_idle_cpu_pct": round(100 * (q1["redis_cpu"] - q0["redis_cpu"]) / (q1["t"] - q0["t"]), 1),
        "redis_used_memory": int(mem["used_memory"]),
        "redis_used_memory_rss": int(mem["used_memory_rss"]),
        "redis_pubsub_channels": int(stats.get("pubsub_channels", 0)),
        "redis_pubsubshard_channels": int(stats.get("pubsubshard_channels", 0)),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }
    cl.stdin.write("quit\n")
    cl.stdin.flush()
    cl.wait(timeout=60)
    for p in insts:
        p.stop()
    up.kill()
    up.wait()
    rd.stop()
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
