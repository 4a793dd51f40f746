"""Sequence numbers keep their meaning (issue 13): when another session
expunges, a client's FETCH, STORE and SEARCH still name the messages the
client meant, and it hears of the expunge only where RFC 3501 7.4.1 lets a
server tell it (not during FETCH, STORE or SEARCH).

Each test runs through the default imapfresh (whose resync injects NOOP
before a FETCH on a mailbox another session changed) and, with --direct,
against Dovecot itself: the same assertions hold for both, which proves the
tests. Every byte each client receives goes through imapcheck.Checker.
"""

import re

from stale_tests import Client, append, check, message
from servers import DEFAULT_USERS as USERS
from tap import test

FETCH_UID = re.compile(rb"^\* (\d+) FETCH \(.*?UID (\d+)")
EXPUNGE = re.compile(rb"^\* (\d+) EXPUNGE")


def login(ctx, label, user="bob"):
    c = Client(ctx.tls_port, label, tls=True, ctx=ctx.sslctx())
    ctx.closers.append(c.close)
    ctx.conns.append(c)
    check(c.readline().startswith(b"* OK"), "%s: no greeting" % label)
    c.login(user, USERS[user])
    return c


def setup(ctx, n=8, user="bob"):
    """A and B with the same fresh mailbox of n messages selected; B knows
    every UID (as a client does after its first sync)."""
    a = login(ctx, "A", user)
    b = login(ctx, "B", user)
    box = ctx.mailbox(a, "Seq")
    uids = [append(a, "P%d" % i, box, message(i, "seq")) for i in range(n)]
    a.expect_ok("S1", "SELECT " + box)
    b.expect_ok("S2", "SELECT " + box)
    _, lines, _ = b.expect_ok("S3", "FETCH 1:* (UID)")
    check(fetched(lines) == {i + 1: u for i, u in enumerate(uids)}, "B's view: %r", lines)
    return a, b, box, uids


def fetched(lines):
    out = {}
    for l in lines:
        m = FETCH_UID.match(l)
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


def no_expunge(lines, what):
    check(not any(EXPUNGE.match(l) for l in lines), "EXPUNGE during %s: %r", what, lines)


def expunge_by_a(a, positions):
    a.expect_ok("D1", "STORE %s +FLAGS.SILENT (\\Deleted)" % ",".join(map(str, positions)))
    a.expect_ok("D2", "EXPUNGE")


def heard(b):
    """B's NOOP: the expunges it had not heard of, as sequence numbers."""
    _, lines, _ = b.expect_ok("N1", "NOOP")
    return [int(m.group(1)) for l in lines for m in [EXPUNGE.match(l)] if m]


def remaining(b, box):
    _, lines, _ = b.expect_ok("R1", "UID SEARCH ALL")
    return sorted(int(x) for l in lines if l.startswith(b"* SEARCH")
                  for x in l.split()[2:])


@test("seqnum: FETCH 2,4 after another session expunged 1 and 3 names B's messages 2 and 4")
def t_fetch_after_expunge(ctx):
    a, b, box, uids = setup(ctx)
    expunge_by_a(a, [1, 3])
    tagged, lines, _ = b.command("F1", "FETCH 2,4 (UID)")
    no_expunge(lines, "FETCH")
    check(tagged.startswith(b"F1 OK"), "FETCH of messages that exist: %r", tagged)
    check(fetched(lines) == {2: uids[1], 4: uids[3]}, "FETCH 2,4 answered: %r", lines)
    got = heard(b)
    check(sorted(got) == [1, 3] or got == [1, 2], "NOOP tells B of the two expunges: %r", got)
    _, lines, _ = b.expect_ok("F2", "FETCH 1:* (UID)")
    want = [u for i, u in enumerate(uids) if i not in (0, 2)]
    check(fetched(lines) == {i + 1: u for i, u in enumerate(want)}, "B's view after: %r", lines)
    for c in (a, b):
        c.assert_clean()


@test("seqnum: FETCH, STORE and SEARCH after another session's expunge get no EXPUNGE")
def t_no_expunge_during(ctx):
    a, b, box, uids = setup(ctx, 5)
    expunge_by_a(a, [1])
    _, lines, _ = b.expect_ok("F1", "FETCH 2 (UID FLAGS)")
    no_expunge(lines, "FETCH")
    check(fetched(lines) == {2: uids[1]}, "FETCH 2: %r", lines)
    tagged, lines, _ = b.command("W1", "STORE 2 FLAGS (\\Seen)")
    no_expunge(lines, "STORE")
    check(tagged.startswith(b"W1 OK"), "STORE: %r", tagged)
    tagged, lines, _ = b.command("Q1", "SEARCH ALL")
    no_expunge(lines, "SEARCH")
    nums = [int(x) for l in lines if l.startswith(b"* SEARCH") for x in l.split()[2:]]
    # Dovecot still counts the expunged message 1 (RFC 2180 4.1.1); imapfresh,
    # renumbering, does not: both are B's numbers, 2..5 are there.
    check(set(range(2, 6)) <= set(nums) <= set(range(1, 6)), "SEARCH ALL in B's numbers: %r",
          lines)
    tagged, lines, _ = b.command("Q2", "SEARCH 3:4 NOT DELETED")
    no_expunge(lines, "SEARCH")
    check([l for l in lines if l.startswith(b"* SEARCH")] == [b"* SEARCH 3 4\r\n"],
          "SEARCH 3:4 in B's numbers: %r", lines)
    _, lines, _ = b.expect_ok("Q3", "UID SEARCH 2")
    check([l for l in lines if l.startswith(b"* SEARCH")] == [b"* SEARCH %d\r\n" % uids[1]],
          "UID SEARCH 2 finds B's message 2: %r", lines)
    if not any(EXPUNGE.match(l) for l in lines):
        check(heard(b) == [1], "NOOP tells B")
    _, lines, _ = b.expect_ok("F2", "UID FETCH %d (FLAGS)" % uids[1])
    check(b"\\Seen" in b"".join(lines), "the message B meant got \\Seen: %r", lines)
    _, lines, _ = b.expect_ok("F3", "FETCH 1:* (UID FLAGS)")
    seen = [l for l in lines if b"\\Seen" in l]
    check(len(seen) == 1 and b"UID %d " % uids[1] in seen[0] + b" ", "only it: %r", lines)
    for c in (a, b):
        c.assert_clean()


@test("seqnum: STORE \\Deleted and EXPUNGE after another session's expunge delete only B's choice")
def t_store_deleted(ctx):
    a, b, box, uids = setup(ctx, 6)
    expunge_by_a(a, [1])
    _, lines, _ = b.expect_ok("F0", "FETCH 3 (UID)")
    no_expunge(lines, "FETCH")
    tagged, lines, _ = b.command("W1", "STORE 3 +FLAGS (\\Deleted)")
    no_expunge(lines, "STORE")
    check(tagged.startswith(b"W1 OK"), "STORE 3: %r", tagged)
    b.expect_ok("X1", "EXPUNGE")
    left = remaining(b, box)
    check(left == [u for i, u in enumerate(uids) if i not in (0, 2)],
          "B's message 3 (UID %d) and A's message 1 are gone, nothing else: %r",
          uids[2], left)
    _, lines, _ = b.expect_ok("F1", "FETCH 1:* (UID)")
    check(sorted(fetched(lines).values()) == left, "B's view matches: %r", lines)
    for c in (a, b):
        c.assert_clean()


@test("seqnum: sequence commands pipelined behind a trigger each name the message meant")
def t_pipelined(ctx):
    a, b, box, uids = setup(ctx, 6)
    expunge_by_a(a, [2, 5])
    b.send(b"F1 FETCH 3 (UID)\r\nF2 FETCH 4 (UID)\r\nW1 STORE 6 +FLAGS (\\Flagged)\r\n"
           b"F3 FETCH 6 (UID FLAGS)\r\n")
    seen = {}
    for tag in ("F1", "F2", "W1", "F3"):
        tagged, lines, _ = b.wait_tagged(tag)
        no_expunge(lines, tag)
        check(tagged.startswith(tag.encode() + b" OK"), "%s: %r", tag, tagged)
        seen.update(fetched(lines))
    check(seen == {3: uids[2], 4: uids[3], 6: uids[5]}, "each as B numbers them: %r", seen)
    got = heard(b)
    check(sorted(got) == [2, 5] or got == [2, 4], "NOOP tells B: %r", got)
    _, lines, _ = b.expect_ok("F4", "UID FETCH %d (FLAGS)" % uids[5])
    check(b"\\Flagged" in b"".join(lines), "B's message 6 flagged: %r", lines)
    for c in (a, b):
        c.assert_clean()


@test("seqnum: a FETCH of only a message another session expunged names no other message")
def t_fetch_only_expunged(ctx):
    a, b, box, uids = setup(ctx, 4)
    expunge_by_a(a, [2])
    tagged, lines, _ = b.command("F1", "FETCH 2 (UID)")
    no_expunge(lines, "FETCH")
    got = fetched(lines)
    check(got in ({}, {2: uids[1]}), "FETCH 2 is about B's message 2 or nothing: %r", lines)
    check(tagged.startswith(b"F1 OK") or tagged.startswith(b"F1 NO"), "F1: %r", tagged)
    check(heard(b) == [2], "NOOP tells B")
    for c in (a, b):
        c.assert_clean()


VANISHED = re.compile(rb"^\* VANISHED (?!\(EARLIER\))(\S+)")


def uid_set(text):
    out = set()
    for part in text.decode().split(","):
        lo, _, hi = part.partition(":")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@test("seqnum/qresync: a QRESYNC client hears another session's expunges as VANISHED, never "
      "EXPUNGE, and not during its FETCH")
def t_qresync_vanished(ctx):
    a, b, box, uids = setup(ctx)
    _, lines, _ = b.expect_ok("E1", "ENABLE QRESYNC")
    check(any(l.startswith(b"* ENABLED") and b"QRESYNC" in l for l in lines), "enabled: %r",
          lines)
    expunge_by_a(a, [1, 3])
    tagged, lines, _ = b.command("F1", "FETCH 2,4 (UID)")
    check(not any(EXPUNGE.match(l) or VANISHED.match(l) for l in lines),
          "no EXPUNGE/VANISHED during FETCH: %r", lines)
    got = fetched(lines)
    check(got.get(2) == uids[1] and got.get(4) == uids[3] and
          all(u == uids[n - 1] for n, u in got.items()),
          "FETCH 2,4 answered in B's numbers (flag updates too): %r", lines)
    _, lines, _ = b.expect_ok("N1", "NOOP")
    check(not any(EXPUNGE.match(l) for l in lines), "never EXPUNGE to a QRESYNC client: %r",
          lines)
    gone = set()
    for l in lines:
        m = VANISHED.match(l)
        if m:
            gone |= uid_set(m.group(1))
    check(gone == {uids[0], uids[2]}, "VANISHED names the two: %r", lines)
    _, lines, _ = b.expect_ok("F2", "FETCH 1:* (UID)")
    want = [u for i, u in enumerate(uids) if i not in (0, 2)]
    check(fetched(lines) == {i + 1: u for i, u in enumerate(want)}, "B's view after: %r", lines)
