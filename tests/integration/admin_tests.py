"""The operators' tools, end to end against Dovecot: the admin endpoint
(/metrics, /healthz, /sessions, controls, the token) and imapfresh-ctl, in
memory mode through the admin endpoint and in Redis mode with two instances
found through the instances registry.

imapfresh-ctl is looked up next to the daemon (<build>/tools/imapfresh-ctl
for <build>/proxy/imapfresh), or in $IMAPFRESH_CTL.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time

import servers
import stale_tests
from servers import HOST
from stale_tests import append, check, login, message, wait_for
from tap import test

TIMEOUT = 10.0
PROM_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


# ------------------------------------------------------------------ helpers

def http_req(port, method, path, body=None, token=None, headers=None):
    """(status, headers dict, body text) from an admin endpoint."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = "Bearer " + token
    if body is not None and "Content-Type" not in h:
        h["Content-Type"] = "application/x-www-form-urlencoded"
    c = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode("utf-8", "replace")
    finally:
        c.close()


def get_json(port, path, token=None):
    st, _, body = http_req(port, "GET", path, token=token)
    check(st == 200, "GET %s: %d %s", path, st, body[:300])
    return json.loads(body)


def parse_prometheus(text):
    """A strict reader of text format 0.0.4: HELP and TYPE once per family,
    before its samples; samples 'name{labels} value'; counters end in
    _total; histograms have cumulative buckets ending in +Inf == _count.
    Returns {family: {"type":..., "samples": [(name, labels, value)]}}."""
    fams, order = {}, []
    check(text.endswith("\n"), "metrics text does not end in a newline")
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            check(len(parts) == 4 and parts[3], "line %d: bad %s", n, line)
            f = fams.setdefault(parts[2], {"type": None, "help": None, "samples": []})
            check(not f["samples"], "line %d: HELP/TYPE after samples: %s", n, line)
            key = "help" if parts[1] == "HELP" else "type"
            check(f[key] is None, "line %d: repeated %s", n, line)
            if key == "type":
                check(parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"),
                      "line %d: type %r", n, parts[3])
            f[key] = parts[3]
            if parts[2] not in order:
                order.append(parts[2])
            continue
        check(not line.startswith("#") and line, "line %d: stray line %r", n, line)
        m = PROM_SAMPLE.match(line)
        check(m, "line %d: not a sample: %r", n, line)
        name, labels_text, value = m.group(1), m.group(3), m.group(4)
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = PROM_LABEL.match(labels_text, pos)
                check(lm, "line %d: bad labels %r", n, labels_text)
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
        float(value)  # raises on a non-number
        fam = name
        if fam not in fams:
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and fams.get(name[:-len(suffix)], {}).get("type") \
                        == "histogram":
                    fam = name[:-len(suffix)]
        check(fam in fams and fams[fam]["type"] and fams[fam]["help"],
              "line %d: sample %s before its HELP and TYPE", n, name)
        fams[fam]["samples"].append((name, labels, float(value)))
    for name, f in fams.items():
        check(f["samples"], "family %s has no samples", name)
        if f["type"] == "counter":
            check(name.endswith("_total"), "counter %s does not end in _total", name)
        if f["type"] == "histogram":
            buckets = [(s[1]["le"], s[2]) for s in f["samples"] if s[0] == name + "_bucket"]
            count = [s[2] for s in f["samples"] if s[0] == name + "_count"]
            check(buckets and buckets[-1][0] == "+Inf" and count and buckets[-1][1] == count[0],
                  "histogram %s: +Inf bucket must equal _count", name)
            values = [v for _, v in buckets]
            check(values == sorted(values), "histogram %s buckets not cumulative", name)
            bounds = [float(le) for le, _ in buckets[:-1]]
            check(bounds == sorted(bounds), "histogram %s bounds not ascending", name)
    return fams


def metric(fams, name, **labels):
    """The value of one sample (labels must match exactly those given)."""
    for fam in fams.values():
        for n, l, v in fam["samples"]:
            if n == name and all(l.get(k) == v2 for k, v2 in labels.items()):
                return v
    raise AssertionError("no sample %s%s" % (name, labels or ""))


def scrape(port, token=None):
    st, h, body = http_req(port, "GET", "/metrics", token=token)
    check(st == 200, "/metrics: %d", st)
    check(h.get("Content-Type", "").startswith("text/plain; version=0.0.4"),
          "content type %r", h.get("Content-Type"))
    return parse_prometheus(body)


def ctl_path(ctx):
    path = os.environ.get("IMAPFRESH_CTL") or os.path.join(
        os.path.dirname(os.path.dirname(ctx.env.binary)), "tools", "imapfresh-ctl")
    check(os.access(path, os.X_OK), "imapfresh-ctl not built at %s (set IMAPFRESH_CTL)", path)
    return path


def ctl(ctx, *args, timeout=20):
    """Run imapfresh-ctl; returns (exit status, stdout, stderr)."""
    r = subprocess.run([ctl_path(ctx)] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def ctl_ok(ctx, *args):
    rc, out, err = ctl(ctx, *args)
    check(rc == 0, "imapfresh-ctl %s: exit %d\nstdout: %s\nstderr: %s",
          " ".join(map(str, args)), rc, out[-1500:], err[-1500:])
    return out


def session_of(port, user, mailbox=None, token=None):
    """The admin entry of user's session (on mailbox), or None."""
    for s in get_json(port, "/sessions", token):
        if s["user"] == user and (mailbox is None or s["mailbox"] == mailbox):
            return s
    return None


def wait_session(port, user, mailbox, token=None):
    wait_for(lambda: session_of(port, user, mailbox, token), "session of %s on %s in /sessions"
             % (user, mailbox))
    return session_of(port, user, mailbox, token)


def log_text(p):
    with open(p.log, "rb") as f:
        return f.read().decode("utf-8", "replace")


def moved_pair(ctx, p, n=1):
    """A selects INBOX holding n new messages; B selects an empty fresh mailbox."""
    a = login(ctx, p.tls_port, "A")
    b = login(ctx, p.tls_port, "B")
    box = ctx.mailbox(a, "Adm")
    uids = [append(a, "P%d" % i, "INBOX", message(i, "admin")) for i in range(n)]
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT %s" % box)
    return a, b, box, uids


# ---------------------------------------------------------------- endpoint

@test("admin: /metrics is strict Prometheus text; resync injections count up after a MOVE",
      proxy_only=True)
def t_admin_metrics(ctx):
    p = ctx.proxy("admin-metrics", options=[("max_clients", "77")])
    a, b, box, uids = moved_pair(ctx, p)
    before = scrape(p.admin_port)
    check(metric(before, "imapfresh_max_clients") == 77, "max_clients exported")
    check(metric(before, "imapfresh_sessions", state="running") >= 2, "two running sessions")
    check(metric(before, "imapfresh_sessions_authenticated") >= 2, "two authenticated")
    check(metric(before, "imapfresh_connections_accepted_total") >= 2, "accepted counted")
    check(metric(before, "imapfresh_tls_handshakes_total") >= 2, "TLS handshakes counted")
    check(metric(before, "imapfresh_command_duration_seconds_count") > 0, "command latencies")
    check(metric(before, "imapfresh_upstream_connect_seconds_count") >= 2, "connect latencies")
    check(metric(before, "imapfresh_bytes_total", direction="upstream_to_client") > 0, "bytes")
    check(metric(before, "imapfresh_redis_configured") == 0, "memory mode: no Redis")
    info = [s for s in before["imapfresh_build_info"]["samples"]]
    check(info and info[0][1].get("version"), "build_info carries the version: %s", info)
    inj = metric(before, "imapfresh_resync_injections_total")
    a.expect_ok("M1", "UID MOVE %d %s" % (uids[0], box))
    seen = b.uid_fetch_all("F1")
    check(len(seen) == 1, "B sees the moved message: %s", seen)
    after = scrape(p.admin_port)
    check(metric(after, "imapfresh_resync_injections_total") >= inj + 1,
          "injections %s -> %s", inj, metric(after, "imapfresh_resync_injections_total"))
    check(metric(after, "imapfresh_resync_checks_total") >= 1, "checks counted")
    check(metric(after, "imapfresh_resync_duration_seconds_count") >= 1, "resync latency")
    b.assert_clean()


@test("admin: imapfresh_sessions_busy: sessions between commands or idling in IDLE (an EXISTS "
      "told, a DONE answered) hold no per-command state; half a command line read holds it",
      proxy_only=True)
def t_admin_sessions_busy(ctx):
    p = ctx.proxy("admin-busy")

    def busy():
        return metric(scrape(p.admin_port), "imapfresh_sessions_busy")

    a = login(ctx, p.tls_port, "A")
    b = login(ctx, p.tls_port, "B")
    box = ctx.mailbox(a, "Busy")
    uid = append(a, "P1", "INBOX", message(1, "busy"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT %s" % box)
    b.send(b"I1 IDLE\r\n")
    b.wait_continuation()
    # One event loop: what the clients have read was processed to its end.
    check(busy() == 0, "A between commands, B idling: %s busy", busy())
    a.expect_ok("M1", "UID MOVE %d %s" % (uid, box))
    got = b.readline()
    check(got.startswith(b"* 1 EXISTS"), "EXISTS while idling: %r", got)
    wait_for(lambda: busy() == 0, "B idling again after the EXISTS (and any refresh)")
    c = login(ctx, p.tls_port, "C")
    c.send(b"H1 NOO")
    wait_for(lambda: busy() == 1, "C's half line read")
    c.send(b"P\r\n")
    tagged, _, _ = c.wait_tagged("H1")
    check(tagged.startswith(b"H1 OK"), "NOOP completes: %r", tagged)
    check(busy() == 0, "C's NOOP done: %s busy", busy())
    b.send(b"DONE\r\n")
    tagged, _, _ = b.wait_tagged("I1")
    check(tagged.startswith(b"I1 OK"), "IDLE ends: %r", tagged)
    check(busy() == 0, "B's IDLE done: %s busy", busy())
    check(len(b.uid_fetch_all("F1")) == 1, "B sees the moved message")
    check(busy() == 0, "after B's UID FETCH: %s busy", busy())
    for c_ in (a, b, c):
        c_.assert_clean()


@test("tls memory: the heap is trimmed (memtrim, logged at debug) once a burst of TLS "
      "sessions is set up, and again once they ended; a session set up after works",
      proxy_only=True)
def t_tls_memtrim(ctx):
    p = ctx.proxy("memtrim", [("log_level", "debug")])

    def trims_since(offset):
        with open(p.log, "rb") as f:
            f.seek(offset)
            return f.read().count(b"memtrim: heap trimmed")

    # The fixture's port probes were sessions too: let their trim pass
    # (MEMTRIM_QUIET_MS is 0.5 s), so that the next one is the burst's.
    time.sleep(1.0)
    mark = os.path.getsize(p.log)
    burst = [login(ctx, p.tls_port, "T%d" % i) for i in range(6)]
    for i, c in enumerate(burst):
        c.expect_ok("S%d" % i, "SELECT INBOX")
    wait_for(lambda: trims_since(mark) > 0, "a heap trim after the sessions were set up")
    mark = os.path.getsize(p.log)
    for i, c in enumerate(burst):
        c.expect_ok("L%d" % i, "LOGOUT")
        c.close()
    wait_for(lambda: trims_since(mark) > 0, "a heap trim after the sessions ended")
    c = login(ctx, p.tls_port, "After")
    c.expect_ok("S9", "SELECT INBOX")
    c.expect_ok("N9", "NOOP")
    c.assert_clean()


@test("admin: tags of 1, 23, 24 and 128 bytes (kept in the in-flight entry or beside it) complete "
      "under their own tags, pipelined, an IDLE's included; the session is at rest after",
      proxy_only=True)
def t_tag_lengths(ctx):
    p = ctx.proxy("tags")
    c = login(ctx, p.tls_port, "A")
    tags = [b"t", b"a" * 22 + b"1", b"b" * 23 + b"2", b"c" * 127 + b"3"]
    c.send(b"".join(t + b" NOOP\r\n" for t in tags))
    for t in tags:
        tagged, _, _ = c.wait_tagged(t)
        check(tagged.startswith(t + b" OK"), "%d-byte tag: %r", len(t), tagged[:200])
    c.expect_ok(b"d" * 127 + b"4", "SELECT INBOX")
    idle = b"e" * 127 + b"5"
    c.send(idle + b" IDLE\r\n")
    c.wait_continuation()
    c.send(b"DONE\r\n")
    tagged, _, _ = c.wait_tagged(idle)
    check(tagged.startswith(idle + b" OK"), "IDLE under a 128-byte tag: %r", tagged[:200])
    # Each completion found its command: nothing left in flight.
    check(metric(scrape(p.admin_port), "imapfresh_sessions_busy") == 0, "the session is at rest")
    c.assert_clean()


@test("admin: /healthz 200 ok; 404 unknown path; 405 wrong method; 413 over 4 KiB",
      proxy_only=True)
def t_admin_health(ctx):
    p = ctx.proxy("admin-health")
    st, h, body = http_req(p.admin_port, "GET", "/healthz")
    check(st == 200 and body.strip() == "ok", "/healthz: %d %r", st, body)
    st, _, body = http_req(p.admin_port, "GET", "/nope")
    check(st == 404 and "error" in json.loads(body), "/nope: %d %r", st, body)
    st, _, _ = http_req(p.admin_port, "POST", "/metrics", body="x")
    check(st == 405, "POST /metrics: %d", st)
    st, _, _ = http_req(p.admin_port, "GET", "/sessions/s1/kick")
    check(st == 405, "GET on a control: %d", st)
    st, _, _ = http_req(p.admin_port, "POST", "/trace", body="spec=" + "x" * 5000)
    check(st == 413, "a 5000-byte body: %d", st)
    st, _, body = http_req(p.admin_port, "POST", "/trace", body="spec=bogus")
    check(st == 400, "a bad trace spec: %d %r", st, body)
    st, _, body = http_req(p.admin_port, "GET", "/sessions/s999999")
    check(st == 404, "unknown session: %d %r", st, body)
    check(p.alive(), "imapfresh still running")


@test("admin: /sessions lists a live session with user and mailbox; /sessions/<sid> its view",
      proxy_only=True)
def t_admin_sessions(ctx):
    p = ctx.proxy("admin-sessions")
    a = login(ctx, p.tls_port, "A")
    box = ctx.mailbox(a, "View")
    for i in range(3):
        append(a, "P%d" % i, box, message(i, "view"))
    a.expect_ok("S1", "SELECT %s" % box)
    uids = a.uid_fetch_all("F1")
    s = wait_session(p.admin_port, "alice", box)
    check(s["state"] == "running" and s["authenticated"] and s["tls"], "entry %s", s)
    check(s["count"] == 3 and s["client"].startswith(HOST), "entry %s", s)
    check(re.match(r"^[A-Za-z0-9._-]+:s\d+$", s["id"]), "id is instance:sid: %r", s["id"])
    for k in ("uidvalidity", "uidnext", "synced_gen", "age", "last_resync", "resyncs",
              "escalations", "resync_phase"):
        check(k in s, "%s missing from %s", k, s)
    full = get_json(p.admin_port, "/sessions/" + s["sid"])
    check(full["view"]["count"] == 3 and full["view"]["known"] == 3, "view %s", full["view"])
    want = "%d:%d" % (uids[0], uids[-1])
    check(full["view"]["uids"] == want, "view uids %r, expected %r", full["view"]["uids"], want)
    check(full["possibly_stale"] is False and full["last_check"] is None, "full %s", full)
    by_id = get_json(p.admin_port, "/sessions/" + s["id"])
    check(by_id["sid"] == s["sid"], "instance:sid form finds it too")
    st, _, _ = http_req(p.admin_port, "GET", "/sessions/other-instance:" + s["sid"])
    check(st == 404, "another instance's sid is not here: %d", st)


@test("admin: admin_token: 401 without or with a wrong token, 200 with it; ctl uses it",
      proxy_only=True)
def t_admin_token(ctx):
    p = ctx.proxy("admin-token", options=[("admin_token", "s3cret-token")])
    for path in ("/metrics", "/healthz", "/sessions"):
        st, h, _ = http_req(p.admin_port, "GET", path)
        check(st == 401 and "Bearer" in h.get("WWW-Authenticate", ""), "%s no token: %d", path, st)
        st, _, _ = http_req(p.admin_port, "GET", path, token="wrong")
        check(st == 401, "%s wrong token: %d", path, st)
        st, _, _ = http_req(p.admin_port, "GET", path, token="s3cret-token-longer")
        check(st == 401, "%s token with a suffix: %d", path, st)
        st, _, _ = http_req(p.admin_port, "GET", path, token="s3cret-token")
        check(st == 200, "%s right token: %d", path, st)
    rc, out, err = ctl(ctx, "-c", p.conf, "sessions")
    check(rc == 1 and "401" in err, "ctl without the token: %d %r", rc, err)
    ctl_ok(ctx, "-c", p.conf, "--token", "s3cret-token", "sessions")
    ctl_ok(ctx, "-c", p.conf, "-o", "admin_token=s3cret-token", "sessions")


@test("admin: a taken admin port fails start (exit 1); the endpoint listens on the address given",
      proxy_only=True)
def t_admin_loopback(ctx):
    # A port that is taken: a clear start-up error naming admin_listen.
    hold = socket.socket()
    hold.bind((HOST, 0))
    hold.listen(1)
    ctx.closers.append(hold.close)
    p = ctx.proxy("admin-taken", start=False)
    p.admin_port = hold.getsockname()[1]
    try:
        p.start(deadline=5)
    except servers.FixtureError:
        pass
    rc = p.wait(10)
    text = log_text(p)
    check(rc == 1, "exit status %s with admin_listen taken:\n%s", rc, text[-800:])
    check("admin_listen" in text and "in use" in text, "the error names admin_listen: %r",
          text[-500:])
    # Loopback only, on a free port: the default port (127.0.0.1:8143,
    # test_config) is never bound here, so a running scripts/demo is safe.
    q = ctx.proxy("admin-loopback")
    st, _, body = http_req(q.admin_port, "GET", "/healthz")
    check(st == 200, "/healthz: %d", st)
    port = "%04X" % q.admin_port
    with open("/proc/net/tcp") as f:
        rows = [l.split() for l in f.readlines()[1:]]
    listening = [r[1] for r in rows if r[3] == "0A" and r[1].endswith(":" + port)]
    check(listening == ["0100007F:" + port], "admin port must listen on 127.0.0.1 only: %s",
          listening)


# ------------------------------------------------------- imapfresh-ctl (memory)

@test("admin: imapfresh-ctl sessions and show a live session (memory mode, admin endpoint)",
      proxy_only=True)
def t_ctl_memory(ctx):
    p = ctx.proxy("admin-ctl")
    a, b, box, uids = moved_pair(ctx, p)
    b_entry = wait_session(p.admin_port, "alice", box)
    out = ctl_ok(ctx, "-c", p.conf, "sessions")
    check(b_entry["id"] in out and "alice" in out and box in out and "INBOX" in out,
          "sessions table:\n%s", out)
    check(out.splitlines()[0].split()[:3] == ["ID", "USER", "CLIENT"], "header:\n%s", out)
    js = json.loads(ctl_ok(ctx, "-c", p.conf, "--json", "sessions"))
    check(any(s["id"] == b_entry["id"] and s["mailbox"] == box for s in js), "json %s", js)
    # A change B has not seen yet: show says so, then the resync repairs it.
    a.expect_ok("M1", "UID MOVE %d %s" % (uids[0], box))
    out = ctl_ok(ctx, "-c", p.conf, "show", b_entry["id"])
    check("POSSIBLY STALE" in out and "mailbox changed since the session last matched it" in out,
          "show before the resync:\n%s", out)
    check(re.search(r"client view\s+0 messages", out), "B's view is empty:\n%s", out)
    seen = b.uid_fetch_all("F1")
    out = ctl_ok(ctx, "-c", p.conf, "show", b_entry["sid"])
    check("in sync" in out and re.search(r"client view\s+1 messages, 1 UIDs known", out),
          "show after the resync:\n%s", out)
    check(re.search(r"last check\s+on UID FETCH", out) and "differences" in out,
          "last check:\n%s", out)
    # Dovecot may answer that check's UID SEARCH before the NOOP's EXISTS;
    # a second check, asked for, sees the mailbox as the client does.
    ctl_ok(ctx, "-c", p.conf, "resync", b_entry["id"])
    check(b.uid_fetch_all("F2") == seen, "the same message")
    out = ctl_ok(ctx, "-c", p.conf, "show", b_entry["sid"])
    check(re.search(r"last check\s+on UID FETCH \(requested by the operator\): the server "
                    r"held 1 messages: %d" % seen[0], out) and "differences  none" in out,
          "second check, no differences:\n%s", out)
    js = json.loads(ctl_ok(ctx, "-c", p.conf, "--json", "show", b_entry["id"]))
    check(js["session"]["view"]["uids"] == str(seen[0]), "json view %s", js["session"]["view"])
    check(js["differences"]["client_only"] == "" and js["differences"]["server_only"] == "",
          "json differences %s", js["differences"])
    out = ctl_ok(ctx, "-c", p.conf, "user", "alice")
    check(box in out and b_entry["id"] in out, "user alice:\n%s", out)
    rc, _, err = ctl(ctx, "-c", p.conf, "show", "s999999")
    check(rc == 1 and "no live session" in err, "unknown sid: %d %r", rc, err)
    rc, _, _ = ctl(ctx, "-c", p.conf, "frobnicate")
    check(rc == 2, "unknown command exits 2: %d", rc)
    b.assert_clean()


@test("admin: imapfresh-ctl kick ends that session with * BYE", proxy_only=True)
def t_ctl_kick(ctx):
    p = ctx.proxy("admin-kick")
    a = login(ctx, p.tls_port, "A")
    other = login(ctx, p.tls_port, "other")
    a.expect_ok("S1", "SELECT INBOX")
    s = wait_session(p.admin_port, "alice", "INBOX")
    out = ctl_ok(ctx, "-c", p.conf, "kick", s["id"])
    check("closed" in out, "kick output: %r", out)
    rest = a.read_until_eof()
    check(re.search(rb"^\* BYE", rest, re.M), "the kicked client gets * BYE: %r", rest)
    check("kicked by the operator" in log_text(p), "the kick is logged")
    other.expect_ok("N1", "NOOP")  # the other session goes on
    wait_for(lambda: session_of(p.admin_port, "alice", "INBOX") is None, "the session to go")
    rc, _, err = ctl(ctx, "-c", p.conf, "kick", s["id"])
    check(rc == 1, "kicking it again fails: %d %r", rc, err)


@test("admin: imapfresh-ctl resync makes the next UID FETCH inject NOOP + UID SEARCH",
      proxy_only=True)
def t_ctl_resync(ctx):
    # In front of the stale fixture, which logs what it receives: whether
    # imapfresh injected anything is read there, not in imapfresh's log.
    events = os.path.join(ctx.env.tmp, "admin-resync-events-%d.jsonl" % id(ctx))
    fx = stale_tests.Fixture(ctx, proxy_options=[("event_log", events)], name="admin-resync")
    p = fx.proxy
    a = login(ctx, p.tls_port, "A")
    box = "Archive"
    append(a, "P1", box, message(1, "rs"))
    a.expect_ok("S1", "SELECT %s" % box)
    a.uid_fetch_all("F1")
    check(fx.injected() == [], "nothing stale yet: %s", fx.injected())
    s = wait_session(p.admin_port, "alice", box)
    out = ctl_ok(ctx, "-c", p.conf, "resync", s["id"])
    check("next trigger" in out, "resync output: %r", out)
    check(get_json(p.admin_port, "/sessions/" + s["sid"])["possibly_stale"], "flagged")
    check(len(a.uid_fetch_all("F2")) == 1, "the fetch still answers")
    check(fx.injected() == ["NOOP", "UID SEARCH ALL"], "the upstream got the check: %s",
          fx.injected())
    check(re.search(r'resync "%s": requested by the operator' % re.escape(box), log_text(p)),
          "and the reason is logged")
    a.uid_fetch_all("F3")
    check(fx.injected() == ["NOOP", "UID SEARCH ALL"], "one resync only: %s", fx.injected())
    full = get_json(p.admin_port, "/sessions/" + s["sid"])
    check(full["resyncs"] == 1 and not full["possibly_stale"], "after: %s", full)
    if os.path.exists(events) and os.path.getsize(events) > 0:  # events.c writes them
        out = ctl_ok(ctx, "-c", p.conf, "-o", "event_log=" + events, "events", "-n", "3")
        check(s["id"] in out and "requested by the operator" in out, "events:\n%s", out)
    a.assert_clean()


# ------------------------------------------------------------------ workers

def _metric(port, name):
    st, _, body = http_req(port, "GET", "/metrics")
    check(st == 200, "GET /metrics: %d", st)
    m = re.search(r"^%s(?:\{[^}]*\})? (\d+)" % re.escape(name), body, re.M)
    check(m is not None, "%s not in /metrics", name)
    return int(m.group(1))


@test("workers: two workers share the listeners, each a registered instance with its own admin "
      "port; a MOVE through one resyncs a session in the other; a killed worker is replaced; "
      "SIGHUP and SIGTERM reach both", proxy_only=True, timeout=120)
def t_workers(ctx):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-workers-%d" % id(ctx)))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    # Worker N serves admin on admin_listen's port + N: two free ports in a row.
    port = servers.free_port_pair()
    # The stale fixture logs what it receives: the resync is read there.
    up_log = stale_tests.upstream_log_path(ctx, "workers")
    upstream = stale_tests.stale_imapd.StaleServer(log=up_log)
    ctx.closers.append(upstream.stop)
    up_port = upstream.start()
    p = ctx.proxy("workers", options=[("state", redis.url), ("redis_prefix", "wk:"),
                                      ("instance_id", "wk"), ("workers", "2"),
                                      ("admin_listen", "%s:%d" % (HOST, port))],
                  upstream="%s:%d" % (HOST, up_port))
    rcli = lambda *a: stale_tests.redis_cli(redis, *a)
    admin = {"wk-w0": port, "wk-w1": port + 1}
    wait_for(lambda: sorted(rcli("HKEYS", "wk:instances")) == ["wk-w0", "wk-w1"],
             "both workers registered")
    reg = dict(zip(*[iter(rcli("HGETALL", "wk:instances"))] * 2))
    for inst, port in admin.items():
        check(reg[inst].split("\t")[0] == "%s:%d" % (HOST, port), "registry %s", reg)
    pids = {inst: int(reg[inst].split("\t")[1]) for inst in admin}
    check(len(set(pids.values())) == 2 and p.proc.pid not in pids.values(),
          "two worker processes besides the master: %s (master %d)", pids, p.proc.pid)

    # The kernel spreads connections: find a session on each worker.
    on = {}
    for i in range(40):
        c = login(ctx, p.tls_port, "W%d" % i)
        port = c.sock.getsockname()[1]
        for inst, ap in admin.items():
            if inst not in on and any(s["client"].endswith(":%d" % port)
                                      for s in get_json(ap, "/sessions")):
                on[inst] = c
        if len(on) == 2:
            break
    check(len(on) == 2, "40 sessions, all on one worker: %s", list(on))
    a, b = on["wk-w0"], on["wk-w1"]
    box = "Archive"
    uid = append(a, "P1", "INBOX", message(1, "workers"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT %s" % box)
    check(stale_tests.injected_from(up_log) == [], "nothing injected yet")
    a.expect_ok("M1", "UID MOVE %d %s" % (uid, box))
    wait_for(lambda: any(s["possibly_stale"] for s in get_json(admin["wk-w1"], "/sessions")),
             "worker 1 to hear of a MOVE made through worker 0")
    check(len(b.uid_fetch_all("F1")) == 1, "the session on worker 1 sees the moved message")
    got = stale_tests.injected_from(up_log)
    check(got[:2] == ["NOOP", "UID SEARCH ALL"] and got.count("NOOP") == 1,
          "worker 1 resynced once before the UID FETCH: the upstream got %s", got)

    # A worker killed outright is replaced; the other worker's sessions go on.
    os.kill(pids["wk-w0"], signal.SIGKILL)
    wait_for(lambda: (rcli("HGET", "wk:instances", "wk-w0") or [""])[0].split("\t")[1:2]
             not in ([], [str(pids["wk-w0"])]), "a new worker 0 in the registry")
    b.expect_ok("N1", "NOOP")
    for i in range(6):
        login(ctx, p.tls_port, "X%d" % i).expect_ok("N2", "NOOP")
    with open(p.log, errors="replace") as f:
        check(re.search(r"worker 0 \(pid %d\) was killed by signal 9; starting a new one"
                        % pids["wk-w0"], f.read()), "the master did not log the replacement")

    # SIGHUP and SIGTERM pass through the master to both workers.
    p.signal(signal.SIGHUP)
    def reloaded():
        with open(p.log, errors="replace") as f:
            text = f.read()
        return all("[worker %d] reload complete" % w in text for w in (0, 1))
    wait_for(reloaded, "both workers to reload")
    new_w0 = int(rcli("HGET", "wk:instances", "wk-w0")[0].split("\t")[1])
    p.signal(signal.SIGTERM)
    check(re.search(rb"^\* BYE", b.read_until_eof(), re.M), "worker 1's client got no BYE")
    check(p.wait(15) == 0, "the master did not exit 0 after SIGTERM")
    for pid in (new_w0, pids["wk-w1"]):
        wait_for(lambda: not os.path.exists("/proc/%d" % pid), "worker %d to exit" % pid)


def _cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (/proc/PID/stat fields 14, 15)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@test("busy_poll: after traffic the loop keeps polling for busy_poll, then sleeps; a reload "
      "sets it; sessions and SIGTERM work while it spins", proxy_only=True, timeout=60)
def t_busy_poll(ctx):
    p = ctx.proxy("busypoll")
    pid = p.proc.pid
    c = login(ctx, p.tls_port, "B")

    def ticks_after_noop(tag):
        c.expect_ok(tag, "NOOP")
        t0 = _cpu_ticks(pid)
        time.sleep(0.5)
        t1 = _cpu_ticks(pid)
        time.sleep(0.5)
        return t1 - t0, _cpu_ticks(pid) - t1

    # Off (the default): the process sleeps as soon as the answer is out.
    after, quiet = ticks_after_noop("B0")
    check(after <= 2 and quiet <= 2, "busy_poll = 0 used CPU after a NOOP: %d, %d ticks",
          after, quiet)

    with open(p.conf, "a") as f:
        f.write("busy_poll = 100000\n")
    p.signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in open(p.log, errors="replace").read(), "the reload")
    # 0.1 s of polling is 10 ticks of a free core; the machine may be busy, so
    # take the best of three rounds, and look for at least 4.
    rounds = [ticks_after_noop("B%d" % i) for i in range(1, 4)]
    check(max(a for a, _ in rounds) >= 4,
          "busy_poll = 100000 did not keep polling after a NOOP: %s ticks", rounds)
    check(all(q <= 2 for _, q in rounds),
          "the loop did not go back to sleep 0.5 s after the traffic: %s ticks", rounds)

    # A second session, and a shutdown, while the loop spins.
    d = login(ctx, p.tls_port, "D")
    d.expect_ok("D1", "SELECT INBOX")
    c.expect_ok("B9", "NOOP")
    p.signal(signal.SIGTERM)
    check(re.search(rb"^\* BYE", d.read_until_eof(), re.M), "no BYE while polling")
    check(p.wait(15) == 0, "imapfresh did not exit 0 on SIGTERM while polling")


# -------------------------------------------------------- imapfresh-ctl (Redis)

@test("admin/redis: two instances in the registry; ctl sessions lists both, show/user/kick work",
      proxy_only=True, timeout=90)
def t_ctl_redis(ctx):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-admin-%d" % id(ctx)))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    common = [("state", redis.url), ("redis_prefix", "adm:")]
    pa = ctx.proxy("admin-redis-a", options=common + [("instance_id", "adm-a")])
    pb = ctx.proxy("admin-redis-b", options=common + [("instance_id", "adm-b")])
    opts = ["-c", pa.conf, "-o", "state=" + redis.url, "-o", "redis_prefix=adm:"]
    rcli = lambda *a: stale_tests.redis_cli(redis, *a)
    wait_for(lambda: len(rcli("HKEYS", "adm:instances")) == 2, "both instances registered")
    reg = dict(zip(*[iter(rcli("HGETALL", "adm:instances"))] * 2))
    check(reg["adm-a"].split("\t")[0] == "%s:%d" % (HOST, pa.admin_port) and
          reg["adm-b"].split("\t")[0] == "%s:%d" % (HOST, pb.admin_port), "registry %s", reg)
    check(int(reg["adm-a"].split("\t")[1]) == pa.proc.pid, "registry pid %s", reg["adm-a"])
    a = login(ctx, pa.tls_port, "A")
    b = login(ctx, pb.tls_port, "B", user="bob")
    box = ctx.mailbox(a, "Rd")
    uid = append(a, "P1", "INBOX", message(1, "redis-admin"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT INBOX")
    b2 = login(ctx, pb.tls_port, "B2")
    b2.expect_ok("S3", "SELECT %s" % box)
    wait_for(lambda: len(rcli("KEYS", "adm:{*}:session:*")) == 3, "three session keys")
    out = ctl_ok(ctx, *(opts + ["sessions"]))
    for sid_prefix, user in (("adm-a:s", "alice"), ("adm-b:s", "bob"), ("adm-b:s", "alice")):
        check(re.search(r"^%s\d+\s+%s\s" % (sid_prefix, user), out, re.M),
              "%s session of %s listed:\n%s", sid_prefix, user, out)
    js = json.loads(ctl_ok(ctx, *(opts + ["--json", "sessions"])))
    check(len(js) == 3 and all(s["instance_live"] and s["state"] == "running" for s in js),
          "json %s", js)
    b2_id = [s["id"] for s in js if s["mailbox"] == box][0]
    # show goes to the owning instance (b), found in the registry
    a.expect_ok("M1", "UID MOVE %d %s" % (uid, box))
    out = ctl_ok(ctx, *(opts + ["show", b2_id]))
    check(b2_id in out and "alice" in out and "shared counter in Redis" in out,
          "show through the registry:\n%s", out)
    wait_for(lambda: "POSSIBLY STALE" in ctl(ctx, *(opts + ["show", b2_id]))[1],
             "instance b to hear of the MOVE")
    check(len(b2.uid_fetch_all("F1")) == 1, "b2 sees the moved message")
    out = ctl_ok(ctx, *(opts + ["user", "alice"]))
    check("INBOX" in out and box in out and b2_id in out, "user alice:\n%s", out)
    out = ctl_ok(ctx, *(opts + ["trace", "status"]))
    check("adm-a: trace" in out and "adm-b: trace" in out, "trace status on both:\n%s", out)
    rc, out, err = ctl(ctx, *(opts + ["events", "-n", "5"]))
    check(rc == 0, "events: %d %s", rc, err)
    if rcli("TYPE", "adm:events") == ["stream"]:   # sync events are written (events.c)
        check(b2_id in out, "the resync of %s among the last events:\n%s", b2_id, out)
        for line in ctl_ok(ctx, *(opts + ["--json", "events", "-n", "5"])).splitlines():
            json.loads(line)
    ctl_ok(ctx, *(opts + ["kick", b2_id]))
    check(re.search(rb"^\* BYE", b2.read_until_eof(), re.M), "kicked via the registry")
    # A clean stop removes the instance from the registry.
    pa.signal(signal.SIGTERM)
    check(pa.wait(15) == 0, "instance a stops cleanly")
    wait_for(lambda: rcli("HKEYS", "adm:instances") == ["adm-b"], "adm-a gone from the registry")
