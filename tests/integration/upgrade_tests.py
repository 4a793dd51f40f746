"""Zero-downtime upgrade (SIGUSR2, imapfresh-ctl upgrade; proxy/upgrade.c).

What is promised, and tested here:
  - the listening sockets pass to the new process: a client connecting all
    along is never refused and never sees an error;
  - a command under way in the old process runs to its end (a FETCH gets
    all its bytes and its tagged OK); a session in IDLE is left idling
    (changes still reach it) and its DONE is answered; only then, once the
    session has been quiet between commands for a second, does it get
    "* BYE" and the connection closes;
  - at upgrade_drain_timeout a session still idling gets "* BYE";
  - new connections, the admin endpoint and the pid file belong to the new
    process; the old one exits once its last session is gone;
  - a new process that cannot start changes nothing: the old one goes on;
  - systemd learns the new main pid (MAINPID= on $NOTIFY_SOCKET).
"""

import json
import os
import random
import re
import signal
import socket
import threading
import time

import imapraw
import servers
from servers import HOST, DEFAULT_USERS as USERS
from tap import test

TIMEOUT = 10.0
BIG = 16 * 1024 * 1024      # more than every socket buffer on the way


def check(cond, msg, *args):
    if not cond:
        raise AssertionError(msg % args if args else msg)


def plain_proxy(ctx, name, *options, start=True, env=None):
    p = ctx.proxy(name, options=[("require_tls", "no")] + list(options), start=False)
    p.env = env
    if start:
        p.start()
    return p


def workers_proxy(ctx, name, inst):
    """Two workers, Redis state under its own prefix and instance name."""
    # Worker N serves admin on admin_listen's port + N: two free ports in a row.
    port = servers.free_port_pair()
    p = plain_proxy(ctx, name, ("workers", "2"), ("state", ctx.env.redis.url),
                    ("instance_id", inst), ("redis_prefix", inst + ":"),
                    ("admin_listen", "%s:%d" % (HOST, port)), start=False)
    p.admin_port = port
    p.start()
    return p


def conn(ctx, p):
    c = imapraw.Conn(HOST, p.port, timeout=TIMEOUT)
    ctx.closers.append(c.close)
    ctx.conns.append(c)
    return c


def login(ctx, p, user="alice"):
    c = conn(ctx, p)
    g = c.readline()
    check(g.startswith(b"* OK"), "greeting: %r", g)
    c.login(user, USERS[user])
    return c


def read_pid(p):
    try:
        with open(p.pid_file) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid):
    """Live child processes of pid (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return sorted(out)


def log_text(p):
    with open(p.log, "rb") as f:
        return f.read().decode("utf-8", "replace")


def wait_for(what, pred, p, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("%s did not happen within %.0fs%s" % (what, timeout, p.log_tail()))


def own_new_process(ctx, pid):
    """The new process is no child of ours: stop it when the test ends."""
    servers.register_pid(pid)

    def stop():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + TIMEOUT
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    ctx.closers.insert(0, stop)      # closers run in reverse: this one last


def upgrade(ctx, p, how=None):
    """Upgrade p (SIGUSR2, or how()); returns the new pid once the old
    process has handed over (closed its listeners)."""
    old = p.proc.pid
    mark = len(log_text(p))
    if how is None:
        p.signal(signal.SIGUSR2)
    else:
        how()
    new = wait_for("a new pid in the pid file",
                   lambda: read_pid(p) if read_pid(p) not in (0, old) else 0, p)
    own_new_process(ctx, new)
    wait_for("the hand-over", lambda: ("upgrade: pid %d serves now" % new) in log_text(p)[mark:], p)
    return new


def admin_get(p, path):
    s = socket.create_connection((HOST, p.admin_port), timeout=TIMEOUT)
    try:
        s.sendall(b"GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % path.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    check(b" 200 " in head.split(b"\r\n")[0], "GET %s: %r", path, data[:300])
    return json.loads(body)


def healthz_pid(p):
    return healthz_pid_at(p.admin_port)


def healthz_pid_at(port):
    s = socket.create_connection((HOST, port), timeout=TIMEOUT)
    try:
        s.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    check(data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0], "healthz: %r", data)
    m = re.search(rb"X-Imapfresh-Pid: (\d+)", data, re.I)
    check(m, "no X-Imapfresh-Pid in %r", data)
    return int(m.group(1))


def message(size, seed):
    rnd = random.Random(seed)
    head = b"From: alice@example.org\r\nSubject: upgrade\r\n\r\n"
    line = bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(998)) + b"\r\n"
    body = line * (size // len(line) + 1)
    return head + body[:size - len(head)]


def append(c, tag, mailbox, msg):
    c.send(b"%s APPEND %s {%d}\r\n" % (tag.encode(), mailbox.encode(), len(msg)))
    c.wait_continuation()
    c.send(msg + b"\r\n")
    tagged, _, _ = c.wait_tagged(tag)
    imapraw.status(tagged, "OK")


def new_mailbox(ctx, c):
    name = "Up%d_%04x" % (os.getpid(), random.getrandbits(16))
    c.expect_ok("MB", "CREATE " + name)
    return name


def expect_bye_then_eof(c, what):
    rest = c.read_until_eof(TIMEOUT)
    check(b"* BYE " in rest, "%s: no * BYE before the close: %r", what, rest[-300:])
    return rest


# ------------------------------------------------------------------ tests

@test("upgrade: a FETCH under way completes (every byte, tagged OK), an IDLE is left idling "
      "and its DONE answered; BYE only afterwards; the old process then exits",
      proxy_only=True, timeout=120)
def t_upgrade_commands_finish(ctx):
    p = plain_proxy(ctx, "upg-cmd")
    setup = login(ctx, p)
    mbox = new_mailbox(ctx, setup)
    big = message(BIG, 1)
    append(setup, "A1", mbox, big)
    setup.expect_ok("Z", "LOGOUT")

    fetcher = ctx.raw(p.tls_port, tls=True)     # TLS sessions are handed nothing either
    check(fetcher.readline().startswith(b"* OK"), "TLS greeting")
    fetcher.login("alice", USERS["alice"])
    fetcher.expect_ok("S1", "SELECT " + mbox)
    fetcher.send(b"F1 FETCH 1 BODY.PEEK[]\r\n")
    first = fetcher.readline()
    m = re.match(rb"\* 1 FETCH \(BODY\[\] \{(\d+)\}\r\n$", first)
    check(m and int(m.group(1)) == len(big), "FETCH start: %r", first)
    # Read no more: the FETCH stays under way (backpressure) through the upgrade:
    # the socket buffers on the way hold far less than the message.
    got = fetcher.read_exact(4096)
    tls = [x for x in admin_get(p, "/sessions") if x.get("tls")]
    check(len(tls) == 1 and admin_get(p, "/sessions/" + tls[0]["sid"]).get("inflight") == 1,
          "the FETCH should be under way in the old process: %r", tls)

    idler = login(ctx, p)
    idler.expect_ok("S2", "SELECT " + mbox)
    idler.send(b"I1 IDLE\r\n")
    idler.wait_continuation()

    new = upgrade(ctx, p)
    check(new != p.proc.pid, "same pid")
    check(p.alive(), "the old process exited with two sessions under way%s", p.log_tail())

    # A change made through the new process reaches the idling old session.
    other = login(ctx, p)
    append(other, "A2", mbox, message(2000, 2))
    other.expect_ok("Z", "LOGOUT")
    line = idler.readline()
    check(re.match(rb"\* 2 EXISTS", line), "idling session after the upgrade: %r", line)

    # Held past the drain's quiet second (and some scans): still nobody is cut.
    time.sleep(2)
    check(p.alive(), "the old process exited with two sessions under way%s", p.log_tail())
    # The FETCH goes on to its end.
    got += fetcher.read_exact(len(big) - len(got))
    check(got == big, "FETCH body differs from the message (%d bytes)", len(got))
    tail = fetcher.readline()
    while not tail.startswith(b"F1 "):
        check(tail.startswith(b"*") or tail.strip() == b")", "FETCH tail: %r", tail)
        tail = fetcher.readline()
    imapraw.status(tail, "OK")
    check(p.alive(), "the old process exited while the IDLE still ran%s", p.log_tail())

    # DONE is answered like always.
    idler.send(b"DONE\r\n")
    tagged, untagged, _ = idler.wait_tagged("I1")
    imapraw.status(tagged, "OK")
    check(not any(l.startswith(b"* BYE") for l in untagged), "BYE inside the IDLE: %r", untagged)

    # Then, quiet between commands, both are told to go.
    for c, what in ((fetcher, "fetcher"), (idler, "idler")):
        expect_bye_then_eof(c, what)
    rc = p.wait(TIMEOUT)
    check(rc == 0, "the old process: exit status %r%s", rc, p.log_tail())
    check(pid_alive(new), "the new process is gone%s", p.log_tail())


def login_logout_loop(p, stop, results):
    """Connect, greeting, LOGIN, LOGOUT, over and over; every failure kept."""
    while not stop.is_set():
        try:
            c = imapraw.Conn(HOST, p.port, timeout=TIMEOUT)
            try:
                g = c.readline()
                check(g.startswith(b"* OK"), "greeting %r", g)
                c.login("bob", USERS["bob"], tag="a")
                tagged, untagged, _ = c.command("b", "LOGOUT")
                imapraw.status(tagged, "OK")
                check(any(l.startswith(b"* BYE") for l in untagged), "LOGOUT without BYE")
            finally:
                c.close()
            results.append((time.monotonic(), None))
        except Exception as e:  # noqa: BLE001 -- every kind counts as a failure
            results.append((time.monotonic(), "%s: %s" % (type(e).__name__, e)))


@test("upgrade: clients connecting and logging in throughout the switch see no refusal "
      "and no error", proxy_only=True, timeout=120)
def t_upgrade_no_refusal(ctx):
    p = plain_proxy(ctx, "upg-loop")
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=login_logout_loop, args=(p, stop, results), daemon=True)
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for("clients served before the upgrade", lambda: len(results) >= 20, p)
        new = upgrade(ctx, p)
        handed = time.monotonic()
        wait_for("the old process's exit", lambda: not p.alive(), p)
        n = len(results)
        wait_for("clients served after the upgrade", lambda: len(results) >= n + 20, p)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    errors = [e for _, e in results if e]
    check(not errors, "%d of %d client runs failed, first: %s%s", len(errors), len(results),
          errors[:3], p.log_tail())
    check(any(t > handed for t, _ in results), "no client run after the hand-over")
    check(healthz_pid(p) == new, "healthz is not answered by the new process")


@test("upgrade: imapfresh-ctl upgrade; pid file, admin endpoint and new connections belong "
      "to the new process; systemd told MAINPID; the old one exits", proxy_only=True, timeout=90)
def t_upgrade_ctl(ctx):
    import admin_tests
    notify_path = os.path.join(ctx.env.tmp, "notify-%d.sock" % random.getrandbits(24))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(TIMEOUT)
    ctx.closers.append(notify.close)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    p = plain_proxy(ctx, "upg-ctl", env=env)
    old = p.proc.pid
    msg = notify.recv(4096).decode()
    check("READY=1" in msg.split("\n") and "MAINPID=%d" % old in msg.split("\n"),
          "start-up notification: %r", msg)
    check(read_pid(p) == old and healthz_pid(p) == old, "before: pid file / healthz")
    before = login(ctx, p)      # served by the old process all along
    before.expect_ok("N1", "NOOP")

    out = []

    def run_ctl():
        out.append(admin_tests.ctl(ctx, "-c", p.conf, "upgrade"))
    new = upgrade(ctx, p, run_ctl)
    rc, stdout, stderr = out[0]
    check(rc == 0 and ("pid %d serves now" % new) in stdout, "ctl upgrade: %d %r %r",
          rc, stdout, stderr)
    msg = notify.recv(4096).decode()
    check(msg.split("\n") == ["MAINPID=%d" % new, "READY=1"], "upgrade notification: %r", msg)
    check(read_pid(p) == new, "pid file after: %d", read_pid(p))
    check(healthz_pid(p) == new, "healthz after the upgrade is not the new process")

    after = login(ctx, p)
    after.expect_ok("N2", "NOOP")
    sessions = admin_tests.ctl(ctx, "-c", p.conf, "--json", "sessions")
    check(sessions[0] == 0 and sessions[1].count('"user":"alice"') == 1,
          "the new process's /sessions should hold only the new session: %r", sessions)
    # The quiet session of the old process is told to go, then the old one exits.
    expect_bye_then_eof(before, "old session")
    check(p.wait(TIMEOUT) == 0, "old process exit%s", p.log_tail())
    check(pid_alive(new) and read_pid(p) == new, "the new process or its pid file is gone")
    after.expect_ok("N3", "NOOP")
    # And it can be upgraded in turn (the listeners it took over are passed on).
    os.kill(new, signal.SIGUSR2)
    third = wait_for("a second upgrade", lambda: read_pid(p) if read_pid(p) not in (0, new) else 0, p)
    own_new_process(ctx, third)
    wait_for("the second hand-over", lambda: healthz_pid(p) == third, p)
    login(ctx, p).expect_ok("N4", "NOOP")


@test("upgrade: at upgrade_drain_timeout a session still in IDLE gets * BYE; the old "
      "process then exits", proxy_only=True, timeout=90)
def t_upgrade_drain_deadline(ctx):
    p = plain_proxy(ctx, "upg-deadline", ("upgrade_drain_timeout", "2s"))
    idler = login(ctx, p)
    idler.expect_ok("S1", "SELECT INBOX")
    idler.send(b"I1 IDLE\r\n")
    idler.wait_continuation()
    upgrade(ctx, p)
    check(p.alive(), "the old process left before its idling session%s", p.log_tail())
    rest = expect_bye_then_eof(idler, "idler")
    check(b"I1 " not in rest, "the IDLE got a tagged answer without DONE: %r", rest)
    check(b"restarting" in rest, "BYE text: %r", rest)
    check(p.wait(TIMEOUT) == 0, "old process exit%s", p.log_tail())
    check("upgrade_drain_timeout (2s) reached, 1 sessions left" in log_text(p),
          "the deadline was not what ended it%s", p.log_tail())


@test("upgrade: a new process that cannot start changes nothing: the old one serves on",
      proxy_only=True, timeout=60)
def t_upgrade_failed_start(ctx):
    p = plain_proxy(ctx, "upg-fail")
    old = p.proc.pid
    c = login(ctx, p)
    with open(p.conf, "a") as f:
        f.write("no_such_key = 1\n")
    mark = len(log_text(p))
    p.signal(signal.SIGUSR2)
    wait_for("the failure", lambda: "upgrade failed" in log_text(p)[mark:], p)
    check(p.alive() and read_pid(p) == old, "old process or pid file changed%s", p.log_tail())
    c.expect_ok("N1", "NOOP")
    login(ctx, p).expect_ok("N2", "NOOP")       # accepting again
    check(healthz_pid(p) == old, "healthz")


@test("upgrade: workers = 2: the master passes every worker's sockets; clients see no "
      "refusal; an old worker's IDLE session is answered, then BYE; old master and workers "
      "exit; the new workers are new instances", proxy_only=True, timeout=120)
def t_upgrade_workers(ctx):
    import admin_tests
    import stale_tests
    inst = "upw%04x" % random.getrandbits(16)
    prefix = inst + ":"
    p = workers_proxy(ctx, "upg-workers", inst)
    old_master = p.proc.pid
    check(read_pid(p) == old_master, "pid file before: %d", read_pid(p))
    old_workers = {healthz_pid_at(p.admin_port), healthz_pid_at(p.admin_port + 1)}
    idler = login(ctx, p)
    idler.expect_ok("S1", "SELECT INBOX")
    idler.send(b"I1 IDLE\r\n")
    idler.wait_continuation()
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=login_logout_loop, args=(p, stop, results), daemon=True)
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for("clients served before the upgrade", lambda: len(results) >= 20, p)
        mark = len(log_text(p))
        p.signal(signal.SIGUSR2)
        new_master = wait_for("a new pid in the pid file",
                              lambda: read_pid(p) if read_pid(p) not in (0, old_master) else 0, p)
        own_new_process(ctx, new_master)
        wait_for("the hand-over", lambda: ("upgrade: pid %d serves now" % new_master)
                 in log_text(p)[mark:], p)
        handed = time.monotonic()
        n = len(results)
        wait_for("clients served after the upgrade", lambda: len(results) >= n + 20, p)
        # Each admin port is answered by a worker of the new master now.
        new_workers = {healthz_pid_at(p.admin_port), healthz_pid_at(p.admin_port + 1)}
        check(not new_workers & old_workers and len(new_workers) == 2,
              "admin ports: old workers %s, now %s", old_workers, new_workers)
        check(p.alive(), "the old master left before its idling session's worker")
        idler.send(b"DONE\r\n")
        imapraw.status(idler.wait_tagged("I1")[0], "OK")
        expect_bye_then_eof(idler, "idler")
        check(p.wait(TIMEOUT) == 0, "old master exit%s", p.log_tail())
        for pid in old_workers:
            check(not pid_alive(pid), "old worker %d still runs", pid)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    errors = [e for _, e in results if e]
    check(not errors, "%d of %d client runs failed, first: %s%s", len(errors), len(results),
          errors[:3], p.log_tail())
    check(any(t > handed for t, _ in results), "no client run after the hand-over")
    check(read_pid(p) == new_master and pid_alive(new_master), "pid file after: %d", read_pid(p))
    # The registry: the new generation's instances, the old ones gone.
    want = [inst + "-w0-g1", inst + "-w1-g1"]
    wait_for("the registry of the new workers only", lambda: sorted(
        stale_tests.redis_cli(ctx.env.redis, "HKEYS", prefix + "instances")) == want, p)
    after = login(ctx, p)
    after.expect_ok("S2", "SELECT INBOX")
    wait_for("the new session listed under a new instance", lambda: "-g1:s" in admin_tests.ctl(
        ctx, "-c", p.conf, "-o", "state=" + ctx.env.redis.url, "-o", "redis_prefix=" + prefix,
        "--json", "sessions")[1], p)


@test("upgrade: with Redis state the old process hears changes made through the new one "
      "(same instance name) while it drains", proxy_only=True, timeout=90)
def t_upgrade_redis_overlap(ctx):
    p = plain_proxy(ctx, "upg-redis", ("state", ctx.env.redis.url),
                    ("instance_id", "upg%04x" % random.getrandbits(16)))
    idler = login(ctx, p)
    mbox = new_mailbox(ctx, idler)
    idler.expect_ok("S1", "SELECT " + mbox)
    idler.send(b"I1 IDLE\r\n")
    idler.wait_continuation()
    upgrade(ctx, p)
    other = login(ctx, p)       # the new process
    append(other, "A1", mbox, message(2000, 3))
    other.expect_ok("Z", "LOGOUT")
    line = idler.readline()
    check(re.match(rb"\* 1 EXISTS", line), "idling session: %r", line)
    idler.send(b"DONE\r\n")
    imapraw.status(idler.wait_tagged("I1")[0], "OK")
    expect_bye_then_eof(idler, "idler")
    check(p.wait(TIMEOUT) == 0, "old process exit%s", p.log_tail())
    m = re.search(r"\[draining\] resync totals: .*?(\d+) idle refreshes", log_text(p))
    check(m and int(m.group(1)) >= 1, "the old process never heard the change: %s%s",
          m and m.group(0), p.log_tail())


@test("upgrade: SIGUSR2 to one worker: it hands over and drains, the master starts a fresh "
      "one on the same sockets; nobody is refused", proxy_only=True, timeout=90)
def t_upgrade_one_worker(ctx):
    p = workers_proxy(ctx, "upg-one", "upo%04x" % random.getrandbits(16))
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=login_logout_loop, args=(p, stop, results), daemon=True)
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for("clients served", lambda: len(results) >= 20, p)
        workers = children(p.proc.pid)
        check(len(workers) == 2, "worker pids: %s", workers)
        os.kill(workers[0], signal.SIGUSR2)
        wait_for("the worker's exit", lambda: not pid_alive(workers[0]), p)
        wait_for("a fresh worker", lambda: len(children(p.proc.pid)) == 2, p)
        n = len(results)
        wait_for("clients served after", lambda: len(results) >= n + 20, p)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    errors = [e for _, e in results if e]
    check(not errors, "%d of %d client runs failed, first: %s%s", len(errors), len(results),
          errors[:3], p.log_tail())
    check(p.alive() and read_pid(p) == p.proc.pid, "the master should go on")
