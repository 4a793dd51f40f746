"""Protocol traces and the sync event log, end to end: imapfresh in front of
Dovecot (and of the stale upstream fixture), with trace, trace_file,
event_log and, with a private Redis, the trace and events streams.

What matters most: a password never reaches any output (the trace file, the
daemon log, the Redis streams), whatever the login form, even with bodies.
"""

import base64
import hashlib
import json
import os
import re
import signal
import time

import servers
from servers import HOST, DEFAULT_USERS as USERS
from stale_tests import Client, Fixture, append, check, login, message, prepare, redis_cli, \
    thunderbird_revisit, wait_for
from tap import test

TIMEOUT = 10.0
RECORD = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) (\S+) (\S+) "
                    r"(C>P|P>U\*?|U>P|P>C\*?|---) ?(.*)$")


def tmpfile(ctx, name):
    ctx.counter += 1
    return os.path.join(ctx.env.tmp, "%s-%d-%d" % (name, os.getpid(), ctx.counter))


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def records(path):
    """The trace file as dicts; every line must parse."""
    out = []
    for line in read(path).splitlines():
        m = RECORD.match(line)
        check(m, "trace line does not parse: %r", line)
        out.append(dict(zip(("ts", "sid", "client", "user", "dir", "rest"), m.groups()),
                        raw=line))
    return out


def events(path):
    out = []
    for line in read(path).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise AssertionError("event_log line is not JSON (%s): %r" % (e, line))
    return out


def traced_proxy(ctx, name, spec, extra=(), upstream=None):
    tf, ef = tmpfile(ctx, name + ".trace"), tmpfile(ctx, name + ".events")
    opts = [("trace", spec), ("trace_file", tf), ("event_log", ef),
            ("instance_id", "it-" + name)] + list(extra)
    p = ctx.proxy(name, options=opts, upstream=upstream)
    return p, tf, ef


def sid_of(recs, marker):
    """The session id of the record whose line contains marker."""
    for r in recs:
        if marker in r["rest"]:
            return r["sid"]
    raise AssertionError("no trace record contains %r" % marker)


def resync_scenario(ctx, port):
    """A moves a message into the mailbox B has selected; B's UID FETCH then
    triggers a resync. Returns (a, b, mailbox, uid)."""
    a = login(ctx, port, "A")
    b = login(ctx, port, "B")
    box = ctx.mailbox(a, "Tr")
    uid = append(a, "P1", "INBOX", message(1, "trace"))
    a.expect_ok("S1", "SELECT INBOX")
    b.expect_ok("S2", "SELECT %s" % box)
    check(b.uid_fetch_all("F0") == [], "the new mailbox starts empty")
    tagged, _, _ = a.expect_ok("M1", "UID MOVE %d %s" % (uid, box))
    seen = b.uid_fetch_all("RF1")
    check(len(seen) == 1, "B sees the moved message: %s", seen)
    b.assert_clean()
    return a, b, box, seen[0]


def no_secrets(texts, secrets, where):
    for name, text in texts.items():
        for s in secrets:
            check(s not in text, "%s: %r found in %s", where, s, name)


def secret_forms(user, pw):
    """The password as sent in every form a login could carry it."""
    pwb = pw.encode()
    forms = {pw, pw.replace("\\", "\\\\").replace('"', '\\"'),
             base64.b64encode(b"\0" + user.encode() + b"\0" + pwb).decode(),
             base64.b64encode(user.encode() + b"\0" + user.encode() + b"\0" + pwb).decode()}
    return sorted(forms)


# ----------------------------------------------------------------- traces

@test("trace: user alice: C>P, P>U*, U>P, P>C with the session id; injected NOOP/UID SEARCH "
      "on a resync; bob untraced; events check -> in-sync", proxy_only=True)
def t_trace_user_resync(ctx):
    p, tf, ef = traced_proxy(ctx, "trace-user", "user alice")
    bob = login(ctx, p.tls_port, "BOB", user="bob")
    bob.expect_ok("BOBTAG1", "NOOP")
    a, b, box, uid = resync_scenario(ctx, p.tls_port)
    recs = records(tf)
    check(recs, "the trace file is empty")
    check(all(r["sid"].startswith("it-trace-user:s") for r in recs),
          "every record carries instance:session: %s", {r["sid"] for r in recs})
    check(all(re.match(r"127\.0\.0\.1:\d+$", r["client"]) for r in recs), "client addresses")
    check(not any("BOBTAG1" in r["raw"] or r["user"] == "bob" for r in recs),
          "bob's session must not be traced")
    sb = sid_of(recs, "RF1 UID FETCH 1:* (FLAGS)")
    mine = [r for r in recs if r["sid"] == sb]
    dirs = {r["dir"] for r in mine}
    for d in ("C>P", "P>U*", "U>P", "P>C"):
        check(d in dirs, "B's trace has no %s line: %s", d, sorted(dirs))
    # The greeting and the login, kept until the user was known.
    check(any(r["dir"] == "U>P" and r["rest"].startswith("* OK ") for r in mine),
          "the greeting is in the trace")
    check(any(r["dir"] == "C>P" and re.match(r"L1 LOGIN \"alice\" <redacted> => forwarded$",
                                              r["rest"]) for r in mine),
          "the LOGIN line, password redacted: %s",
          [r["rest"] for r in mine if "LOGIN" in r["rest"]])
    check(all(r["user"] == "alice" for r in mine), "user alice on B's records")
    lines = [(r["dir"], r["rest"]) for r in mine]
    held = lines.index(("C>P", "RF1 UID FETCH 1:* (FLAGS) => held"))
    rel = lines.index(("C>P", "RF1 UID FETCH 1:* (FLAGS) => forwarded (was held)"))
    # The resync is injected while the command is being held: between the
    # client's previous line and the release.
    start = max(i for i in range(held) if lines[i][0] == "C>P") + 1
    window = lines[start:rel]
    check(held < rel, "held, then released")
    check(any(d == "P>U*" and re.match(r"imapfresh\.\d+ NOOP$", l) for d, l in window) and
          any(d == "P>U*" and re.match(r"imapfresh\.\d+ UID SEARCH RETURN \(ALL\) ALL$", l)
              for d, l in window),
          "injected NOOP and UID SEARCH (ESEARCH's form: Dovecot offers it) around the held "
          "command: %s", window)
    check(any(d == "U>P" and l.startswith("* ESEARCH") and l.endswith("=> hidden")
              for d, l in window), "its ranges answer, hidden: %s", window)
    check(any(d == "U>P" and re.match(r"imapfresh\.\d+ OK .* => hidden$", l) for d, l in window),
          "our completions are hidden: %s", window)
    no_secrets({"trace": read(tf), "log": read(p.log)}, secret_forms("alice", USERS["alice"]) +
               secret_forms("bob", USERS["bob"]), "passwords")

    evs = [e for e in events(ef) if e["session"] == sb]
    steps = [e["step"] for e in evs]
    check(steps[:2] == ["check", "in-sync"], "events for B: check, in-sync; got %s", steps)
    e = evs[1]
    check(e["mailbox"] == box and e["user"] == "alice" and e["trigger"] == "UID FETCH",
          "event fields: %s", e)
    check(e["instance"] == "it-trace-user" and e["client"].startswith("127.0.0.1:"), "%s", e)
    check(isinstance(e["server_uid_count"], int) and isinstance(e["server_uids"], str),
          "the UID SEARCH result: %s", e)
    check(e["gen_now"] > e["gen_synced"] and e["client_count"] == 1, "generations/count: %s", e)
    check(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", e["time"]), "time: %s", e["time"])


@test("trace: passwords never in the trace file or the log (LOGIN quoted/atom/literal/LITERAL+, "
      "AUTHENTICATE PLAIN SASL-IR and continuation), even with bodies", proxy_only=True)
def t_trace_no_passwords(ctx):
    to_file, tf, ef = traced_proxy(ctx, "trace-pw", "all bodies")
    to_log = ctx.proxy("trace-pw-log", options=[("trace", "all bodies"), ("log_level", "debug")])
    secrets = []
    for u in USERS:
        secrets += secret_forms(u, USERS[u])
    for p in (to_file, to_log):
        c = Client(p.tls_port, "quoted", tls=True, ctx=ctx.sslctx())
        ctx.closers.append(c.close)
        c.readline()
        c.login("alice", USERS["alice"])
        c.expect_ok("N1", "NOOP")

        c = ctx.raw_tls(p.tls_port)
        c.readline()
        c.expect_ok("a", "LOGIN bob " + USERS["bob"])       # an atom

        pw = USERS["carol"].encode()
        c = ctx.raw_tls(p.tls_port)
        c.readline()
        c.send(b"a LOGIN {5}\r\n")
        c.wait_continuation()
        c.send(b"carol {%d}\r\n" % len(pw))
        c.wait_continuation()
        c.send(pw + b"\r\n")
        tagged, _, _ = c.wait_tagged("a")
        check(tagged.startswith(b"a OK"), "literal LOGIN: %r", tagged)

        c = ctx.raw_tls(p.tls_port)
        c.readline()
        c.send(b"a LOGIN {5+}\r\ncarol {%d+}\r\n%s\r\n" % (len(pw), pw))
        tagged, _, _ = c.wait_tagged("a")
        check(tagged.startswith(b"a OK"), "LITERAL+ LOGIN: %r", tagged)

        c = ctx.raw_tls(p.tls_port)
        c.readline()
        ir = base64.b64encode(b"\0alice\0" + USERS["alice"].encode()).decode()
        c.expect_ok("a", "AUTHENTICATE PLAIN " + ir)

        c = ctx.raw_tls(p.tls_port)
        c.readline()
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        c.wait_continuation()
        c.send(base64.b64encode(b"\0bob\0" + USERS["bob"].encode()) + b"\r\n")
        tagged, _, _ = c.wait_tagged("a")
        check(tagged.startswith(b"a OK"), "SASL continuation: %r", tagged)
        c.expect_ok("b", "NOOP")

    trace, log = read(tf), read(to_log.log)
    check(trace.count("<redacted>") >= 7, "redactions in the trace file:\n%s", trace[-3000:])
    check("AUTHENTICATE PLAIN <redacted> => forwarded" in trace, "SASL-IR redacted")
    check(re.search(r"C>P <redacted> => forwarded", trace), "the SASL line redacted")
    check("trace " in log and "C>P" in log and "<redacted>" in log,
          "with trace_file empty, traces go to the log with a trace marker:\n%s", log[-2000:])
    no_secrets({"trace file": trace, "trace log": log, "log": read(to_file.log)}, secrets,
               "passwords")


@test("trace: literal payloads as size + sha256 both ways (bulk included), bodies mode shows them",
      proxy_only=True)
def t_trace_literals(ctx):
    p, tf, _ = traced_proxy(ctx, "trace-lit", "all")
    c = login(ctx, p.tls_port, "L")
    box = ctx.mailbox(c, "Lit")
    body = b"".join(b"line %05d of a big traced message\r\n" % i for i in range(3000))
    msg = message(7, "literal") + body
    c.expect_ok("AP1", b"APPEND %s {%d+}\r\n%s" % (box.encode(), len(msg), msg))
    c.expect_ok("EX1", "EXAMINE " + box)
    _, _, lits = c.expect_ok("FB1", "FETCH 1 (BODY.PEEK[])")
    check(lits == [msg], "the body comes back whole")
    h = hashlib.sha256(msg).hexdigest()
    recs = records(tf)
    want = "<literal %d bytes sha256:%s>" % (len(msg), h)
    cp = [r for r in recs if r["dir"] == "C>P" and r["rest"].startswith(want)]
    up = [r for r in recs if r["dir"] == "U>P" and r["rest"].startswith(want)]
    check(cp and up, "the APPEND and the FETCH payloads as %s:\n%s", want,
          "\n".join(r["raw"][:200] for r in recs[-12:]))
    check(any(r["rest"] == "AP1 APPEND %s {%d+} => forwarded" % (box, len(msg)) for r in recs),
          "the APPEND line up to its literal")
    check(b"line 00042" not in read(tf).encode(), "no payload without bodies")

    p2, tf2, _ = traced_proxy(ctx, "trace-bodies", "all bodies")
    c2 = login(ctx, p2.tls_port, "L2")
    small = message(8, "bodies")
    c2.expect_ok("AP2", b"APPEND %s {%d+}\r\n%s" % (box.encode(), len(small), small))
    text = read(tf2)
    check('<literal %d bytes "From: ann@example.com\\r\\nTo:' % len(small) in text,
          "bodies: the payload escaped:\n%s", text[-1500:])
    c2.expect_ok("EX2", "EXAMINE " + box)
    c2.expect_ok("FB2", "FETCH 1 (BODY.PEEK[])")
    capped = [r["raw"] for r in records(tf2) if "\u2026(+" in r["raw"]]
    check(capped and all(len(l.encode()) < 4096 + 300 for l in capped),
          "the big body is capped at 4 KiB with the rest counted")


@test("trace: stale upstream: events check -> stale -> repaired; the re-SELECT injected",
      proxy_only=True)
def t_trace_stale_events(ctx):
    tf, ef = tmpfile(ctx, "trace-stale.trace"), tmpfile(ctx, "trace-stale.events")
    fx = Fixture(ctx, options={"copy_notifies": False},
                 proxy_options=[("trace", "all"), ("trace_file", tf), ("event_log", ef),
                                ("instance_id", "it-stale")])
    a, b, uids, _ = prepare(ctx, fx)
    a.expect_ok("C1", "UID COPY %d Archive" % uids[2])
    time.sleep(0.5)
    seen = thunderbird_revisit(b)
    check(len(seen) == 1, "B sees the copied message: %s", seen)
    b.assert_clean()
    recs = records(tf)
    sb = sid_of(recs, "T2 GETQUOTAROOT")
    evs = [e for e in events(ef) if e["session"] == sb]
    steps = [e["step"] for e in evs]
    check(steps[:3] == ["check", "stale", "repaired"], "steps for B: %s", steps)
    rep = evs[2]
    check(rep["trigger"] == "GETQUOTAROOT" and rep["mailbox"] == "Archive", "%s", rep)
    check(rep["sent_to_client"] and "EXISTS" in rep["sent_to_client"],
          "what the client was told: %s", rep)
    check(evs[1]["server_uid_count"] == 1 and evs[1]["client_count"] == 0, "stale: %s", evs[1])
    mine = [(r["dir"], r["rest"]) for r in recs if r["sid"] == sb]
    check(any(d == "P>U*" and re.match(r"imapfresh\.\d+ (SELECT|EXAMINE) \"?Archive", l)
              for d, l in mine), "the re-SELECT is in the trace as injected: %s",
          [x for x in mine if x[0] == "P>U*"])
    check(any(d == "P>C" and re.match(r"\* 1 EXISTS$", l) for d, l in mine),
          "the synthesised EXISTS is a P>C line")


@test("trace: SIGHUP with trace = all in the file traces live sessions at once", proxy_only=True)
def t_trace_reload(ctx):
    tf = tmpfile(ctx, "trace-hup.trace")
    p = ctx.proxy("trace-hup")
    c = login(ctx, p.tls_port, "H")
    c.expect_ok("H1", "NOOP")
    with open(p.conf, "a") as f:
        f.write("trace = all\ntrace_file = %s\n" % tf)
    p.signal(signal.SIGHUP)
    wait_for(lambda: "reload complete" in read(p.log), "the reload")
    c.expect_ok("H2", "NOOP")
    text = read(tf)
    check("C>P H2 NOOP => forwarded" in text and "H1 NOOP" not in text,
          "the live session is traced from the reload on:\n%s", text)


# ------------------------------------------------------------------ Redis

@test("trace/redis: the trace and events streams exist, fields as documented, no password",
      proxy_only=True)
def t_trace_redis_streams(ctx):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-trace-%d" % id(ctx)))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    p = ctx.proxy("trace-redis", options=[("state", redis.url), ("trace", "all"),
                                          ("trace_stream_max", "500"),
                                          ("event_stream_max", "100"),
                                          ("instance_id", "it-redis")])
    wait_for(lambda: "connected" in read(p.log), "the proxy to reach Redis")
    a, b, box, uid = resync_scenario(ctx, p.tls_port)
    wait_for(lambda: int((redis_cli(redis, "XLEN", "imapfresh:events") or ["0"])[0]) >= 2,
             "events in the stream")
    wait_for(lambda: int((redis_cli(redis, "XLEN", "imapfresh:trace") or ["0"])[0]) > 10,
             "trace lines in the stream")
    ev = redis_cli(redis, "XRANGE", "imapfresh:events", "-", "+")
    # --raw XRANGE: id, "json", value per entry
    objs = [json.loads(ev[i + 2]) for i in range(0, len(ev) - 2, 3) if ev[i + 1] == "json"]
    steps = [o["step"] for o in objs if o["mailbox"] == box]
    check(steps[:2] == ["check", "in-sync"], "events stream steps: %s", steps)
    tr = redis_cli(redis, "XRANGE", "imapfresh:trace", "-", "+", "COUNT", "1")
    fields = dict(zip(tr[1::2], tr[2::2]))
    for f in ("ts", "instance", "sid", "client", "user", "dir", "line", "fate"):
        check(f in fields, "trace stream field %s missing: %s", f, fields)
    check(fields["instance"] == "it-redis" and fields["sid"].startswith("it-redis:s"), "%s", fields)
    everything = "\n".join(redis_cli(redis, "XRANGE", "imapfresh:trace", "-", "+"))
    check("P>U*" in everything and "UID SEARCH RETURN (ALL) ALL" in everything,
          "injected lines in the stream")
    check("<redacted>" in everything, "the login, redacted")
    no_secrets({"trace stream": everything, "log": read(p.log)},
               secret_forms("alice", USERS["alice"]), "passwords")
