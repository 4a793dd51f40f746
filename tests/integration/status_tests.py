"""The admin endpoint's status pages (issue 19), in a real browser: headless
Chromium loads /status and a session's page, runs their script, and the
rendered DOM is checked against live sessions on Dovecot, two instances
sharing a Redis; hostile mailbox names stay text; the token is required.
"""

import html.parser
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse

import servers
import stale_tests
from admin_tests import get_json, http_req, wait_session
from clients_tests import need
from servers import HOST
from stale_tests import append, check, login, message, wait_for
from tap import test

TOKEN = "st-t0ken/+&="
# What a client may name a mailbox: markup, quotes, an ampersand ("&-" is
# modified UTF-7's "&", so the name shown ends in &'").
HOSTILE_WIRE = "Evil<script>document.body.dataset.pwned=1<b>bold&-'"
HOSTILE = "Evil<script>document.body.dataset.pwned=1<b>bold&'"


class Dom(html.parser.HTMLParser):
    """The rendered DOM as Chromium serialised it: every element with its
    attributes, the text of each, and the tags found inside each."""

    VOID = {"meta", "input", "br", "img", "link", "hr"}

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.elems, self.stack = [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        e = {"tag": tag, "attrs": dict(attrs), "text": "", "inner_tags": [],
             "parent": self.stack[-1] if self.stack else None}
        for p in self.stack:
            p["inner_tags"].append(tag)
        self.elems.append(e)
        if tag not in self.VOID:
            self.stack.append(e)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        for p in self.stack:
            p["text"] += data

    def find(self, tag=None, **attrs):
        out = []
        for e in self.elems:
            if tag and e["tag"] != tag:
                continue
            if all(e["attrs"].get(k.rstrip("_")) == v for k, v in attrs.items()):
                out.append(e)
        return out

    def children(self, parent, tag):
        return [e for e in self.elems if e["parent"] is parent and e["tag"] == tag]

    def cells(self, row):
        """{first class word: (text, inner tags)} of a table row."""
        return {c["attrs"].get("class", "").split()[0]: (c["text"], c["inner_tags"])
                for c in self.children(row, "td")}


def chromium(ctx, url, budget_ms=3000):
    """The DOM after the page's script ran (virtual time: its timers fire)."""
    need("chromium")
    prof = tempfile.mkdtemp(prefix="chromium-", dir=ctx.env.tmp)
    ctx.closers.append(lambda: shutil.rmtree(prof, ignore_errors=True))
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--no-first-run", "--disable-extensions", "--user-data-dir=" + prof,
                        "--virtual-time-budget=%d" % budget_ms, "--dump-dom", url],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90)
    check(r.returncode == 0 and r.stdout.strip(), "chromium exit %d: %s", r.returncode,
          r.stderr.decode("utf-8", "replace")[-800:])
    return r.stdout.decode("utf-8")


def page_url(port, path, **query):
    q = urllib.parse.urlencode(query)
    return "http://%s:%d%s%s" % (HOST, port, path, "?" + q if q else "")


def client_addr(c):
    host, port = c.sock.getsockname()[:2]
    return "%s:%d" % (host, port)


@test("status: /status in headless Chromium shows the live sessions of both instances (user, "
      "client, mailbox, state); a hostile mailbox name stays text", proxy_only=True, timeout=120)
def t_status_page(ctx):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-status-%d" % id(ctx)))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    common = [("state", redis.url), ("redis_prefix", "st:"), ("admin_token", TOKEN)]
    pa = ctx.proxy("status-a", options=common + [("instance_id", "st-a")])
    pb = ctx.proxy("status-b", options=common + [("instance_id", "st-b")])
    a = login(ctx, pa.tls_port, "A")
    a.expect_ok("S1", "SELECT INBOX")
    b = login(ctx, pb.tls_port, "B", user="bob")
    b.expect_ok("C1", 'CREATE "%s"' % HOSTILE_WIRE)
    b.expect_ok("S1", 'SELECT "%s"' % HOSTILE_WIRE)
    sa = wait_session(pa.admin_port, "alice", "INBOX", token=TOKEN)
    sb = wait_session(pb.admin_port, "bob", HOSTILE, token=TOKEN)
    # Instance a's page gathers b's rows through the registry.
    wait_for(lambda: sb["id"] in http_req(pa.admin_port, "GET", "/status", token=TOKEN)[2],
             "instance a's page to show b's session", deadline=15)

    dom = Dom(chromium(ctx, page_url(pa.admin_port, "/status", token=TOKEN, refresh=1)))
    body = dom.find("body")[0]
    # The script ran: it refreshed the live part at least once (virtual time).
    check(int(body["attrs"].get("data-refreshed", "0")) >= 1,
          "the page's script did not refresh it: %r", body["attrs"])
    check("pwned" not in str(body["attrs"]), "the mailbox name ran as script: %r",
          body["attrs"])
    check(len(dom.find("script")) == 1, "%d script elements (only the page's own)",
          len(dom.find("script")))
    rows = {r["attrs"]["data-sid"]: dom.cells(r) for r in dom.find("tr")
            if "session" in r["attrs"].get("class", "").split()}
    check(set(rows) == {sa["id"], sb["id"]}, "session rows %s, want %s and %s", sorted(rows),
          sa["id"], sb["id"])
    ra, rb = rows[sa["id"]], rows[sb["id"]]
    for row, user, conn, box in ((ra, "alice", a, "INBOX"), (rb, "bob", b, HOSTILE)):
        check(row["user"][0] == user, "user %r, want %r", row["user"][0], user)
        check(row["client"][0] == client_addr(conn), "client %r, want %r", row["client"][0],
              client_addr(conn))
        check(row["mailbox"][0] == box, "mailbox %r, want %r", row["mailbox"][0], box)
        check(row["mailbox"][1] == [], "markup inside the mailbox cell: %r", row["mailbox"][1])
        check(row["state"][0] == "running", "state %r", row["state"][0])
        check(row["behind"][0].startswith("in sync"), "view %r", row["behind"][0])
    check(row["id"][1] == ["a"], "session cell holds its link: %r", row["id"])
    # The links carry the token (added by the script), b's to b's own endpoint.
    want = "http://%s:%d/status/session/%s?token=%s" % (HOST, pb.admin_port, sb["sid"],
                                                         urllib.parse.quote(TOKEN, safe=""))
    links = [e["attrs"].get("href") for e in dom.find("a")]
    check(want in links, "b's session links to b's own page with the token: %r", links)
    insts = [e["attrs"].get("data-instance") for e in dom.find("tr")
             if "instance" in e["attrs"].get("class", "").split()]
    check(sorted(insts) == ["st-a", "st-b"], "instances %r", insts)

    # A change through b makes a's session stale; its next UID FETCH resyncs,
    # and the event shows up on the page with the hostile name escaped too.
    a2 = login(ctx, pb.tls_port, "A2")
    uid = append(a2, "A1", "INBOX", message(1, "status"))
    wait_for(lambda: get_json(pa.admin_port, "/sessions/" + sa["sid"],
                              token=TOKEN)["possibly_stale"], "a to hear of the APPEND")
    check(uid > 0 and uid in a.uid_fetch_all("F1"), "a sees the appended message")
    dom = Dom(chromium(ctx, page_url(pa.admin_port, "/status", token=TOKEN)))
    steps = [dom.cells(r)["step"][0] for r in dom.find("tr")
             if "event" in r["attrs"].get("class", "").split() and
             dom.cells(r)["session"][0] == sa["id"]]
    check(steps[:2] == ["in-sync", "check"], "a's events, newest first: %r", steps)

    # Instances in the registry that do not answer: one refuses connections,
    # one accepts and never answers. The page still comes, naming them.
    hole = socket.socket()
    hole.bind((HOST, 0))
    hole.listen(4)
    ctx.closers.append(hole.close)
    now = int(time.time())
    for name, port in (("st-gone", servers.free_port()), ("st-hole", hole.getsockname()[1])):
        stale_tests.redis_cli(redis, "HSET", "st:instances", name,
                              "%s:%d\t1\t%d\t%d" % (HOST, port, now, now))
    st, _, text = http_req(pa.admin_port, "GET", "/status", token=TOKEN)
    dom = Dom(text)
    rows = {r["attrs"].get("data-instance"): r for r in dom.find("tr")
            if "instance" in r["attrs"].get("class", "").split()}
    check(st == 200 and sorted(rows) == ["st-a", "st-b", "st-gone", "st-hole"],
          "instances %d %r", st, sorted(rows))
    for name in ("st-gone", "st-hole"):
        check("unreachable" in rows[name]["attrs"]["class"], "%s: %r", name, rows[name])
    check("no answer" in rows["st-hole"]["text"], "st-hole: %r", rows["st-hole"]["text"])
    check(sb["id"] in text, "b's session still there")


@test("status: with admin_token the page is refused without it (401, also in Chromium); "
      "?token= opens the pages only, not the other endpoints", proxy_only=True)
def t_status_token(ctx):
    p = ctx.proxy("status-token", options=[("admin_token", TOKEN)])
    c = login(ctx, p.tls_port, "A")
    c.expect_ok("S1", "SELECT INBOX")
    s = wait_session(p.admin_port, "alice", "INBOX", token=TOKEN)
    for path in ("/", "/status", "/status/session/" + s["sid"], "/status/part"):
        st, h, body = http_req(p.admin_port, "GET", path)
        check(st == 401 and "alice" not in body, "%s without a token: %d %r", path, st, body)
        st, _, body = http_req(p.admin_port, "GET", path + "?token=wrong")
        check(st == 401, "%s with a wrong ?token=: %d", path, st)
        st, _, body = http_req(p.admin_port, "GET", path, token=TOKEN)
        check(st == 200 and "alice" in body, "%s with the bearer token: %d", path, st)
    q = "?token=" + urllib.parse.quote(TOKEN, safe="")
    for path in ("/", "/status", "/status/session/" + s["sid"]):
        st, h, body = http_req(p.admin_port, "GET", path + q)
        check(st == 200 and "alice" in body, "%s?token=: %d", path, st)
        check(h.get("Referrer-Policy") == "no-referrer" and
              "script-src 'nonce-" in h.get("Content-Security-Policy", ""), "headers %r", h)
    for path in ("/sessions", "/metrics", "/status/part"):
        st, _, _ = http_req(p.admin_port, "GET", path + q)
        check(st == 401, "?token= opened %s: %d", path, st)
    st, _, _ = http_req(p.admin_port, "POST", "/trace" + q, body="spec=all")
    check(st == 401, "?token= on POST /trace: %d", st)
    # What a browser without the token sees.
    dom = Dom(chromium(ctx, page_url(p.admin_port, "/status")))
    check(not dom.find("tr") and "alice" not in str(dom.elems), "a page without the token: %r",
          [e["text"][:200] for e in dom.find("body")])


@test("status: a session's page shows its view (count, UIDVALIDITY, UIDNEXT, known UIDs, "
      "pending expunges, generation); its trace toggle traces it and stops", proxy_only=True)
def t_status_session(ctx):
    p = ctx.proxy("status-session")
    c = login(ctx, p.tls_port, "A")
    box = ctx.mailbox(c, "St")
    uids = [append(c, "A%d" % i, box, message(i, "status-view")) for i in range(3)]
    c.expect_ok("S1", "SELECT %s" % box)
    s = wait_session(p.admin_port, "alice", box)
    full = get_json(p.admin_port, "/sessions/" + s["sid"])
    url = page_url(p.admin_port, "/status/session/" + s["id"])
    dom = Dom(chromium(ctx, url))
    dd = {e["attrs"]["class"].split()[0]: e["text"] for e in dom.find("dd")}
    check(dd["user"] == "alice" and dd["client"] == client_addr(c) and dd["mailbox"] == box and
          dd["state"] == "running", "session %r", dd)
    check(dd["count"] == "3" == str(full["view"]["count"]), "count %r / %r", dd["count"],
          full["view"]["count"])
    check(dd["uidvalidity"] == str(full["uidvalidity"]) and full["uidvalidity"] > 0,
          "uidvalidity %r / %r", dd["uidvalidity"], full["uidvalidity"])
    check(dd["uidnext"] == str(full["uidnext"]) == str(uids[-1] + 1), "uidnext %r / %r",
          dd["uidnext"], full["uidnext"])
    check(dd["pending"] == "0" and dd["gen"].startswith(str(full["synced_gen"])),
          "pending %r gen %r", dd["pending"], dd["gen"])
    check(dd["traced"] == "not traced" and dd["spec"] == "off", "trace %r", dd)
    # Known UIDs: the client learned them only once it fetched them.
    check(len(c.uid_fetch_all("F1")) == 3, "three messages")
    dd = {e["attrs"]["class"].split()[0]: e["text"]
          for e in Dom(chromium(ctx, url)).find("dd")}
    check(dd["known"] == "3 of 3" and dd["uids"] == "%d:%d" % (uids[0], uids[-1]),
          "known %r uids %r", dd["known"], dd["uids"])

    # The toggle posts what its data attributes say to /trace, as the script does.
    def toggle():
        dom = Dom(chromium(ctx, url))
        b = dom.find("button", id="trace-toggle")
        check(len(b) == 1, "one trace toggle: %r", b)
        st, _, body = http_req(p.admin_port, "POST", b[0]["attrs"]["data-post"],
                               body=b[0]["attrs"]["data-body"])
        check(st == 200, "toggle: %d %s", st, body)
    toggle()
    check(get_json(p.admin_port, "/trace")["trace"] == "user alice", "trace spec after the toggle")
    dd = {e["attrs"]["class"].split()[0]: e["text"]
          for e in Dom(chromium(ctx, url)).find("dd")}
    check(dd["traced"] == "traced" and dd["spec"] == "user alice", "traced now: %r", dd)
    toggle()
    check(get_json(p.admin_port, "/trace")["trace"] == "off", "the toggle turned it off")
    st, _, body = http_req(p.admin_port, "GET", "/status/session/s999999")
    check(st == 404 and "No live session" in body, "an unknown session: %d", st)
