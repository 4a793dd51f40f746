#!/usr/bin/env python3
r"""stress: a model-checked multi-connection IMAP stress test (issue 13).

N connections (default 5) of ONE user each select one of two mailboxes
(INBOX and "Stress" by default), send random commands, some of them
pipelined, and check every response against a model of what the server may
legally answer. Aimed at Dovecot directly (proves the checker: 0 errors), or
at imapfresh in front of Dovecot or of the stale upstream fixture.

    stress.py --host 127.0.0.1 --port P --user U --password W [--seconds 30]
              [--clients 5] [--seed N] [--tls [--cafile CA]] [--mailbox INBOX]
              [--second Stress] [--stale] [--port Q ...]

prints one summary line (commands sent, responses checked, errors=N) and
exits 0 with errors=0, or prints the errors by kind, the seed and every
connection's last 20 commands and exits 1. A repeated --port spreads the
connections over several servers (imapfresh instances sharing a Redis).
Importable: run(host, port, user, password, seconds, clients, seed, ...) ->
Result with .errors (list of str), .stats (dict), .summary(), .report().
Standard library only; traffic to the loopback only; every socket read has a
10 s deadline (a hang is an error, not a hang); the run stops by itself after
`seconds` (every connection then LOGOUTs). The seed fixes each connection's
choices given the answers it gets; timing between connections still varies,
so a seed reproduces a failure statistically (run it a few times).

USE A TEST ACCOUNT: the run appends, flags, copies, moves and expunges in
both mailboxes (it creates them when missing and trims them above 150
messages; it touches no other mailbox).

The model
---------
Each connection feeds every byte it sends and receives, one whole response
at a time, to imapcheck.Checker, which keeps the connection's view of its
selected mailbox (count, seq -> UID where known) and flags stream-level
violations: EXISTS shrinking, EXPUNGE/FETCH numbers out of range, a UID
changing at a sequence number without EXPUNGE, UIDs out of order, EXPUNGE
while a FETCH/STORE/SEARCH is in progress (pipelined or not) or when no
command is, stray tagged or SEARCH responses, unparsable lines. On top of it
this file keeps the meaning of each command and a record all connections
share (World):

  * intents: for each tracked flag (\Deleted, \Flagged, and a keyword of
    each connection's own, $StressN) the (mailbox, UID)s some connection
    meant to set it on, each with the time it was recorded: BEFORE the
    command is sent. A seq STORE of a tracked flag only names positions
    whose UID the model knows; a UID STORE an explicit lo:hi whose members
    the model knows (a message added later has a higher UID, so none can
    fall inside), else the whole range; against the stale fixture always
    the whole range. MOVE records the UIDs it means to move the same way.
    COPYUID gives each destination UID the intents of its source (with the
    source's time: the flag was meant before the copy).
  * every message seen with a tracked flag (FETCH FLAGS, SEARCH DELETED /
    FLAGGED / KEYWORD, UID SEARCH ...) must have that intent: a STORE
    applied to the wrong message shows up here;
  * every `* n EXPUNGE`, seen by any connection, removes the UID its model
    held at n: that UID must have been flagged \Deleted or moved by someone
    (no message deleted that nobody meant to delete);
  * missing data is legal only for a message someone removed (see below);
  * an observation that fails is judged again at the end, against intents
    recorded before it: a message may be the copy of a copy whose COPYUID
    another connection had not read yet (A copies x to y, B moves y to z
    before A learnt y), so intents are closed over every COPYUID first;
  * a message never changes: the Subject, RFC822.SIZE and INTERNALDATE of a
    (mailbox, UID) stay the same (Subject and size carry over to copies);
    UIDVALIDITY never changes; UIDNEXT told to a connection is above every
    UID that connection has seen in that mailbox.

Commands (weighted at random, on the mailbox the connection has selected):
FETCH / UID FETCH (always with UID among the items), STORE / UID STORE
(+FLAGS -FLAGS FLAGS, .SILENT sometimes, \Seen \Flagged \Deleted and the
connection's keyword), SEARCH / UID SEARCH (ALL, UNSEEN, DELETED, FLAGGED,
KEYWORD, a sequence set, UID x:y), COPY / UID COPY / MOVE / UID MOVE to the
other mailbox, APPEND to either (LITERAL+ or a synchronizing literal), EXPUNGE
/ UID EXPUNGE, NOOP, CHECK, IDLE then DONE after a short random wait, SELECT /
EXAMINE (read-only: no STORE, EXPUNGE or MOVE), STATUS of the other mailbox.
After every SELECT/EXAMINE the connection fetches 1:* (UID FLAGS), and after
an EXISTS it often fetches the new messages, so its model knows most UIDs.
Copies stay small and big mailboxes get more \Deleted + EXPUNGE, so the
mailboxes stay around 20 to 100 messages.

What is checked per command:
  * FETCH: every requested message gets a FETCH carrying its UID (the one
    the model holds), unless someone flagged it \Deleted or moved it.
  * UID FETCH: every requested UID the model holds is answered, same excuse.
  * SEARCH: a `* SEARCH` comes; every number is within the count; SEARCH ALL
    and a sequence-set key return exactly the model's messages (minus
    removed ones), UID x:y only messages whose UID is in the range, the flag
    keys only messages that carry the flag by intent.
  * UID SEARCH: ALL and UID x:y return every UID of the model in range
    (minus removed ones) and nothing outside x:y; a UID SEARCH alone in
    flight, with a fully known model and no EXISTS or EXPUNGE of an unknown
    message meanwhile, returns no UID outside the view (a message the server
    never announced) -- not against the stale fixture, which answers UID
    SEARCH from its store (the bug it models).
  * COPY/MOVE: COPYUID's source set holds only UIDs it named and all of
    them (minus removed ones), as many destination UIDs, the destination's
    UIDVALIDITY; MOVE EXPUNGEs every source message the model knows.
  * APPEND: OK, APPENDUID with the mailbox's UIDVALIDITY.
  * no BAD ever (every command is valid in the model); NO only where legal
    (below); no `* BYE` before LOGOUT; no VANISHED (QRESYNC is not enabled).

'*' is the highest number when the server evaluates it: an EXISTS sent first
in the same command (imapfresh's injected NOOP does that) makes a lone '*'
the new last message. Legal, and accepted for FETCH and COPY.

Pipelining (RFC 3501 5.5): sometimes 2 or 3 commands are sent back to back
before any response is read. A command with sequence numbers (FETCH, STORE,
SEARCH, COPY, MOVE) is only sent behind commands that are all FETCH, STORE or
SEARCH (non-UID): those may not be answered with EXPUNGE, so the numbers
cannot shift under it. UID commands, NOOP, CHECK, EXPUNGE go anywhere in a
group. At most one SEARCH or UID SEARCH per group: `* SEARCH` carries no tag,
and Dovecot runs two UID SEARCHes in parallel, so their answers may come in
either order. Never pipelined: SELECT/EXAMINE, APPEND, IDLE, STATUS. (RFC
examples: FETCH + STORE + SEARCH + CHECK and STORE + COPY + EXPUNGE are
valid; FETCH + NOOP + STORE, STORE + COPY + FETCH, COPY + COPY and CHECK +
FETCH are not.)

What Dovecot (2.3.19) really does, learnt by running it; all accepted
---------------------------------------------------------------------
Session A and session B on one mailbox; B flags messages \Deleted and
EXPUNGEs them; A has not been told yet (its view still has them):
  * A: FETCH n (UID FLAGS) of such a message: the data (from the index),
    OK. RFC822.SIZE / INTERNALDATE: the cached value, or when not cached the
    placeholders 0 and "01-Jan-1970 00:00:00 +0000". BODY[...]: NIL, and the
    tagged answer is `OK [EXPUNGEISSUED] Some messages were already
    expunged`. A also gets unsolicited `* n FETCH (FLAGS (\Deleted))` for the
    messages B flagged, during its FETCH.
  * A: STORE on it: OK with a FETCH of the new flags (no error).
  * A: SEARCH ALL / SEARCH 2:4 still list it; SEARCH DELETED does not,
    although its FLAGS say \Deleted (flag searches are only checked one
    way: every hit carries the flag by intent).
  * A: COPY / MOVE / UID COPY / UID MOVE of a set holding it: the EXPUNGEs
    first, then `NO [EXPUNGEISSUED] Some of the requested messages no longer
    exist`, and nothing of the set is copied. UID COPY/MOVE of UIDs already
    gone from A's view: `OK No messages found`, no COPYUID.
  * A: UID FETCH / UID STORE / UID SEARCH / NOOP / EXPUNGE: the data (for
    messages still in the view), then the EXPUNGEs, then OK.
  * STORE only answers FETCH for messages whose flags changed (a second
    +FLAGS of the same flag gets no FETCH), so STOREs are not checked for
    coverage. Flag lists may hold \Recent.
  * MOVE: `* OK [COPYUID v src dst]` untagged, then the EXPUNGEs, then OK.
    Two pipelined MOVEs may run in parallel, so the untagged COPYUID of the
    second can come first: it goes to the MOVE that named its source UIDs.
  * Pipelined commands that Dovecot finds unambiguous run in parallel: a UID
    SEARCH behind an EXPUNGE may answer `* SEARCH` (already without the
    messages being expunged, or with messages the EXPUNGE's sync brought in
    and announces later) before the EXPUNGE's own responses.
So NO is accepted only with [EXPUNGEISSUED], for COPY/MOVE (and FETCH/STORE,
should a server do that), when one of the messages named was flagged
\Deleted or moved by someone (or its UID is unknown to the model); the same
for `OK [EXPUNGEISSUED]` on FETCH. The stale fixture (stale_imapd.py) instead
answers nothing for such messages and COPYs the rest: also legal, and covered
by the same excuses. Through imapfresh in front of the stale fixture a
`* BYE [UNAVAILABLE]` is legal too (a repair with no legal sequence of
responses, e.g. a message the fixture never announced below known ones): in
stale mode the connection reconnects and goes on; against Dovecot a BYE is
an error.
"""

import argparse
import collections
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import imapcheck  # noqa: E402
import imapraw  # noqa: E402
from imapcheck import Lit, tokenize, ParseError  # noqa: E402

TIMEOUT = 10.0                   # every socket read: a protocol deadline
HISTORY = 300                    # lines kept per connection
REPORT_COMMANDS = 20             # a report shows each connection's last 20 commands
DELETED, FLAGGED, SEEN = "\\Deleted", "\\Flagged", "\\Seen"
MOVED = "<moved>"                # pseudo flag: UIDs someone MOVEs away
KEYWORD_RE = re.compile(r"^\$stress\d+$", re.I)
LITERAL_END = re.compile(rb"~?\{(\d+)\}\r?\n$")
CODE_RE = re.compile(rb"\[([A-Z0-9.-]+)(?: ([^\]]*))?\]", re.I)
FSS = {"FETCH", "STORE", "SEARCH"}
# What Dovecot answers for a message expunged by another session when the
# value is not in its cache (the session has not been told yet).
PLACEHOLDER = {"RFC822.SIZE": b"0", "INTERNALDATE": b"01-Jan-1970 00:00:00 +0000", "Subject": b""}          # may not be answered with EXPUNGE
SEQ_COMMANDS = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE"}


class Fatal(Exception):
    """Ends one connection (timeout, EOF, BYE): reported as an error."""


# ===================================================================== sets

class Intents:
    """UIDs of one mailbox someone meant to give one flag, each with the
    earliest time it was meant (World.now()): an observation is only
    excused by an intent recorded before it."""

    def __init__(self):
        self.at = {}                # uid -> time
        self.ranges = []            # (lo, hi, time) of wide UID ranges

    def add(self, uid, t):
        old = self.at.get(uid)
        if old is None or t < old:
            self.at[uid] = t
            return True
        return False

    def add_range(self, lo, hi, t):
        lo, hi = min(lo, hi), max(lo, hi)
        if hi - lo <= 256:
            for u in range(lo, hi + 1):
                self.add(u, t)
        else:
            self.ranges.append((lo, hi, t))

    def time_of(self, uid):
        t = self.at.get(uid)
        for lo, hi, rt in self.ranges:
            if lo <= uid <= hi and (t is None or rt < t):
                t = rt
        return t


def parse_set(text):
    """'1:3,7,9:*' -> [(1, 3), (7, 7), (9, None)] (None is '*')."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        a = None if a == "*" else int(a)
        b = a if not _ else (None if b == "*" else int(b))
        out.append((a, b))
    return out


def in_uid_set(uid, ranges, top):
    """Is uid in a UID set? '*' is the mailbox's highest UID: top, or, when
    the model does not know it (None), 'n:*' is taken as n..infinity."""
    for a, b in ranges:
        if a is None and b is None:
            if top is None or uid == top:
                return True
        elif a is None or b is None:
            n = b if a is None else a
            if uid >= n or uid == top:
                return True
        elif min(a, b) <= uid <= max(a, b):
            return True
    return False


def expand_copyuid(text):
    out = []
    for a, b in parse_set(text):
        if a is None or b is None:
            raise ValueError("'*' in COPYUID")
        step = 1 if b >= a else -1
        out.extend(range(a, b + step, step))
    return out


def compress(nums):
    """[1,2,3,7] -> '1:3,7'."""
    nums = sorted(set(nums))
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else "%d:%d" % (nums[i], nums[j]))
        i = j + 1
    return ",".join(out)


def norm_flag(f):
    f = f.decode("latin-1") if isinstance(f, bytes) else f
    return f.lower()


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ===================================================================== shared record

class World:
    """What all connections share: intents, UIDVALIDITY, subjects, errors."""

    def __init__(self, seed, max_errors, fresh):
        self.lock = threading.RLock()
        self.seed = seed
        self.fresh = fresh
        self.max_errors = max_errors
        self.t0 = time.monotonic()
        self.errors = []
        self.first_error_snapshot = None
        self.stop = threading.Event()
        self.intents = collections.defaultdict(lambda: collections.defaultdict(Intents))
        self.deferred = []          # failed observations, judged at the end (see defer())
        self.copies = []            # (src mailbox, src uid, dst mailbox, dst uid) of every COPYUID
        self.lost_copies = set()    # mailboxes a COPY/MOVE went to whose COPYUID was lost (BYE)
        self.origin = {}            # (mailbox, uid) -> how it was made (APPENDUID/COPYUID), for reports
        self.facts = {}             # (mailbox, uid, "Subject"/"RFC822.SIZE"/...) -> value
        self.uidvalidity = {}
        self.counts = {}            # mailbox -> last count a connection saw (weights only)
        self.stats = collections.Counter()
        self.clients = []
        self.recording = False      # setup: tracked flags seen are recorded, not checked

    def now(self):
        return time.monotonic() - self.t0

    def error(self, client, msg):
        with self.lock:
            label = client.label if client else "run"
            stamp = self.now()
            self.errors.append("[%s +%.3fs] %s" % (label, stamp, msg))
            if client is not None and client.first_error is None:
                client.first_error = (stamp, client.history.copy())
            if self.first_error_snapshot is None:
                self.first_error_snapshot = (stamp, label, [(c.label, c.history.copy()) for c in self.clients])
            if len(self.errors) >= self.max_errors:
                self.stop.set()

    # -- intents
    def intend(self, flag, mailbox, uids=(), lo=None, hi=None):
        with self.lock:
            r = self.intents[flag.lower()][mailbox]
            t = self.now()
            for u in uids:
                r.add(u, t)
            if lo is not None:
                r.add_range(lo, hi, t)

    def intended(self, flag, mailbox, uid, at=None):
        """Did someone mean uid to carry flag (before time `at`)?"""
        with self.lock:
            t = self.intents[flag.lower()][mailbox].time_of(uid)
            return t is not None and (at is None or t <= at)

    def removable(self, mailbox, uid, at=None):
        return self.intended(DELETED, mailbox, uid, at) or self.intended(MOVED, mailbox, uid, at)

    def observe_flag(self, client, mailbox, uid, flag, context):
        """uid in mailbox carries tracked flag: somebody must have meant it."""
        if self.recording:
            self.intend(flag, mailbox, [uid])
            return
        with self.lock:
            self.stats["flag observations checked"] += 1
            if not self.intended(flag, mailbox, uid):
                self.defer(("flag", mailbox, uid, flag), client, context)

    def observe_removal(self, client, mailbox, uid, context):
        if self.recording:
            return
        with self.lock:
            self.stats["EXPUNGEs checked against intents"] += 1
            if not self.removable(mailbox, uid):
                self.defer(("expunge", mailbox, uid, DELETED), client, context)

    def check_removed(self, client, mailbox, uids, mode, msg):
        """Missing data, NO [EXPUNGEISSUED] and the like are legal for a
        message someone flagged \\Deleted or moved: mode "all" needs that of
        every UID (None: unknown, excused), "any" of at least one. Judged now
        and, when it fails, again at the end (copy chains, see defer())."""
        with self.lock:
            if self._removed_ok(mailbox, uids, mode):
                return
            self.defer(("removed-" + mode, mailbox, tuple(uids), None), client, msg)

    def _removed_ok(self, mailbox, uids, mode, at=None):
        ok = [u is None or self.removable(mailbox, u, at) for u in uids]
        return all(ok) if mode == "all" else any(ok)

    def defer(self, what, client, context):
        """A failed observation is only judged at the end: the message may
        be the copy of a copy whose COPYUID another connection has not read
        yet (A copies x to y, B moves y to z before A learnt y). The
        connection's history is kept for the report."""
        self.stats["observations re-checked at the end"] += 1
        if len(self.deferred) < 10000:
            self.deferred.append((what, client, context, self.now(), client.history.copy()))

    def copy_done(self, mailbox, src_mailbox, pairs, how=""):
        """COPYUID (src, dst) pairs: dst inherits src's intents and subject."""
        with self.lock:
            for src, dst in pairs:
                self.copies.append((src_mailbox, src, mailbox, dst))
                self.origin[(mailbox, dst)] = "%s (from %s UID %d)" % (how, src_mailbox, src)
                for flag, boxes in list(self.intents.items()):
                    t = boxes[src_mailbox].time_of(src) if flag != MOVED.lower() else None
                    if t is not None:
                        boxes[mailbox].add(dst, t)      # the flag was meant before the copy
                for what in ("Subject", "RFC822.SIZE"):     # the same bytes (not INTERNALDATE: SHOULD only)
                    v = self.facts.get((src_mailbox, src, what))
                    if v is not None:
                        self.note_fact(None, mailbox, dst, what, v, "COPYUID")

    def finish(self):
        """End of the run: propagate intents along every copy (chains
        included) until nothing changes, then judge the deferred
        observations."""
        changed = True
        while changed:
            changed = False
            for src_mb, src, dst_mb, dst in self.copies:
                for flag, boxes in list(self.intents.items()):
                    t = boxes[src_mb].time_of(src) if flag != MOVED.lower() else None
                    if t is not None and boxes[dst_mb].add(dst, t):
                        changed = True
        for (kind, mailbox, uid, flag), client, context, stamp, hist in self.deferred:
            if kind == "flag" and not self.intended(flag, mailbox, uid, stamp):
                msg = "%s: message UID %d in %s carries %s, which no connection set on it" % (
                    context, uid, mailbox, flag)
            elif kind == "expunge" and not self.removable(mailbox, uid, stamp):
                msg = "%s: UID %d in %s was expunged, but no connection flagged it \\Deleted or " \
                      "moved it" % (context, uid, mailbox)
            elif kind.startswith("removed-") and not self._removed_ok(mailbox, uid, kind[8:], stamp):
                msg = context
                uid = [u for u in uid if u is not None and not self.removable(mailbox, u, stamp)][0]
            else:
                continue
            if mailbox in self.lost_copies:
                self.stats["observations unverifiable (a COPYUID lost to a BYE)"] += 1
                continue
            msg += "; UID %d came from %s" % (uid, self.origin.get((mailbox, uid), "no APPENDUID or COPYUID seen"))
            self.errors.append("[%s +%.3fs] %s" % (client.label, stamp, msg))
            if client.first_error is None or client.first_error[0] > stamp:
                client.first_error = (stamp, hist)

    # -- facts that never change
    def note_fact(self, client, mailbox, uid, what, value, context):
        """A message never changes: its Subject, size and INTERNALDATE seen
        under one (mailbox, UID) are the same every time. Dovecot answers a
        placeholder (PLACEHOLDER) for a message another session expunged
        when the value is not in its cache: legal for a removed message."""
        with self.lock:
            key = (mailbox, uid, what)
            old = self.facts.get(key)
            if old == value:
                self.stats["message facts checked (Subject, size, date)"] += 1
                return
            if PLACEHOLDER.get(what) == value:
                self.check_removed(client, mailbox, [uid], "all", "%s: UID %d in %s has %s %r (an "
                                   "expunged message's placeholder), but nobody flagged it \\Deleted or "
                                   "moved it" % (context, uid, mailbox, what, value))
                return
            if old is None:
                self.facts[key] = value
                return
        self.error(client, "%s: UID %d in %s has %s %r, earlier %r"
                   % (context, uid, mailbox, what, value, old))

    def note_uidvalidity(self, client, mailbox, v, context):
        with self.lock:
            old = self.uidvalidity.setdefault(mailbox, v)
        if old != v:
            self.error(client, "%s: UIDVALIDITY of %s is %d, earlier %d" % (context, mailbox, v, old))


# ===================================================================== wire

class Wire:
    """A socket and a buffer; read() returns one whole response at a time:
    (raw bytes, segments) with segments alternating text and Lit, as
    imapcheck.tokenize() wants them."""

    def __init__(self, host, port, tls, sslctx):
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        if tls:
            self.sock = sslctx.wrap_socket(self.sock, server_hostname=host)
        self.sock.settimeout(TIMEOUT)
        self.buf = bytearray()
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def _parse(self):
        pos, segs = 0, []
        while True:
            i = self.buf.find(b"\n", pos)
            if i < 0:
                return None
            line = bytes(self.buf[pos:i + 1])
            m = LITERAL_END.search(line)
            if m:
                n = int(m.group(1))
                if len(self.buf) < i + 1 + n:
                    return None
                segs.append(line[:m.start()])
                segs.append(Lit(bytes(self.buf[i + 1:i + 1 + n])))
                pos = i + 1 + n
                continue
            segs.append(line.rstrip(b"\r\n"))
            raw = bytes(self.buf[:i + 1])
            del self.buf[:i + 1]
            return raw, segs

    def read(self, wait=None):
        """One response. wait: seconds to wait at most, then None (IDLE);
        without it the protocol deadline applies (Fatal)."""
        end = time.monotonic() + (TIMEOUT if wait is None else wait)
        while True:
            r = self._parse()
            if r is not None:
                return r
            if self.eof:
                raise Fatal("connection closed by the server%s"
                            % (" inside a response: %r" % bytes(self.buf[:200]) if self.buf else ""))
            left = end - time.monotonic()
            if left <= 0:
                if wait is not None:
                    return None
                raise Fatal("no complete response within %.0fs (a hang); buffered: %r"
                            % (TIMEOUT, bytes(self.buf[:200])))
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ssl.SSLError as e:
                if "EOF" in str(e):
                    chunk = b""
                else:
                    raise Fatal("TLS error: %s" % e)
            except OSError as e:
                raise Fatal("socket error: %s" % e)
            if not chunk:
                self.eof = True
            self.buf += chunk

    def close(self):
        imapraw.close_socket(self.sock)


# ===================================================================== commands

class Cmd:
    """One command in flight, what it means, and what came back for it."""

    def __init__(self, name, args, **kw):
        self.name = name            # "FETCH", "UID FETCH", ...
        self.args = args            # text after the name
        self.tag = None
        self.mailbox = None
        self.literal = None         # APPEND payload
        self.sync = False           # APPEND with a synchronizing literal
        self.status = None
        self.text = b""
        self.fetched = []           # (seq, uid or None, items dict)
        self.search = None          # list of numbers
        self.copyuid = None
        self.expunged = []          # (seq, uid or None) during this command
        self.exists_grew = False
        self.count_at_send = None
        self.model_at_send = None   # {seq: uid} known positions
        self.__dict__.update(kw)

    @property
    def uid(self):
        return self.name.startswith("UID ")

    @property
    def base(self):
        return self.name[4:] if self.uid else self.name

    def line(self):
        return "%s %s%s" % (self.tag, self.name, " " + self.args if self.args else "")


# ===================================================================== client

class Client:
    def __init__(self, world, i, host, port, user, password, tls, sslctx, mailboxes, rng, end,
                 allowed):
        self.world = world
        self.i = i
        self.label = "c%d" % (i + 1)
        self.keyword = "$Stress%d" % (i + 1)
        self.host, self.port = host, port
        self.user, self.password = user, password
        self.tls, self.sslctx = tls, sslctx
        self.mailboxes = mailboxes
        self.rng = rng
        self.end = end
        self.allowed = allowed      # command kinds this run may send (None: all)
        self.wire = None
        self.checker = imapcheck.Checker()
        self.history = collections.deque(maxlen=HISTORY)
        self.first_error = None
        self.ntag = 0
        self.inflight = collections.OrderedDict()   # tag -> Cmd
        self.mailbox = None
        self.readonly = False
        self.caps = set()
        self.max_uid = collections.defaultdict(int)  # mailbox -> highest UID this connection saw
        self.logging_out = False
        self.byed = False
        self.appended = 0
        self.thread = None

    # ------------------------------------------------------------ reporting
    def err(self, msg):
        self.world.error(self, msg)

    def stat(self, key, n=1):
        with self.world.lock:
            self.world.stats[key] += n

    def note(self, direction, data):
        text = data[:240].decode("latin-1").rstrip("\r\n").replace("\r", "\\r").replace("\n", "\\n")
        if len(data) > 240:
            text += " ...(%d bytes)" % len(data)
        self.history.append("%+8.3f %s %s" % (self.world.now(), direction, text))

    # ------------------------------------------------------------ model
    @property
    def count(self):
        return self.checker.count or 0

    def uid_at(self, n):
        return self.checker.uids.get(n)

    def known(self):
        """{seq: uid} of the positions the model knows."""
        return dict(self.checker.uids)

    def fully_known(self):
        return all(s in self.checker.uids for s in range(1, self.count + 1))

    def other(self):
        a, b = self.mailboxes
        return b if self.mailbox == a else a

    # ------------------------------------------------------------ I/O
    def send(self, data):
        self.checker.sent(data)
        try:
            self.wire.send(data)
        except OSError as e:
            # The server may have said why (* BYE) before it closed.
            self.drain()
            raise Fatal("send failed: %s" % e)

    def drain(self):
        try:
            while True:
                got = self.wire.read(wait=2)
                if got is None:
                    return
                self.handle(*got)
        except Fatal:
            return

    def submit(self, cmds):
        """Send cmds back to back (a pipeline when more than one)."""
        alone = len(cmds) == 1 and not self.inflight
        for c in cmds:
            c.alone = alone
            self.ntag += 1
            c.tag = "%s.%d" % (self.label, self.ntag)
            c.mailbox = self.mailbox
            c.count_at_send = self.count
            c.model_at_send = self.known()
            self.prepare(c)
            self.inflight[c.tag] = c
            line = c.line().encode()
            self.note("C:", line + (b" {%d}" % len(c.literal) if c.literal is not None else b""))
            if c.literal is not None:
                if c.sync:
                    self.send(line + b" {%d}\r\n" % len(c.literal))
                    self.wait_continuation(c)
                    if c.status is not None:
                        continue        # refused before '+'
                    self.send(c.literal + b"\r\n")
                else:
                    self.send(line + b" {%d+}\r\n" % len(c.literal) + c.literal + b"\r\n")
            else:
                self.send(line + b"\r\n")
            self.stat("commands sent")
            self.stat("command " + c.name)
        if len(cmds) > 1:
            self.stat("pipelined groups")
            self.stat("pipelined commands", len(cmds))
        self.wait_all()

    def wait_all(self):
        while self.inflight:
            self.handle(*self.wire.read())

    def wait_continuation(self, cmd):
        while True:
            raw, segs = self.wire.read()
            if raw.startswith(b"+"):
                self.note("S:", raw)
                self.feed(raw)
                return
            self.handle(raw, segs)
            if cmd.status is not None:
                return

    def feed(self, raw):
        n = len(self.checker.errors)
        self.checker.received(raw)
        for e in self.checker.errors[n:]:
            self.err("checker: " + e)
        self.stat("responses checked")

    # ------------------------------------------------------------ responses
    def handle(self, raw, segs):
        self.note("S:", raw)
        first = segs[0]
        if raw.startswith(b"+"):
            self.feed(raw)
            self.err("unexpected continuation request: %r" % first[:100])
            return
        if first.startswith(b"* "):
            self.untagged(raw, segs, first[2:])
            return
        tag, _, rest = first.partition(b" ")
        status, _, text = rest.partition(b" ")
        self.feed(raw)
        cmd = self.inflight.pop(tag.decode("latin-1"), None)
        if cmd is None:
            return                  # the checker reported it
        cmd.status = status.upper().decode("latin-1")
        cmd.text = text
        self.complete(cmd)

    def untagged(self, raw, segs, body):
        word, _, rest = body.partition(b" ")
        up = word.upper()
        if word.isdigit():
            n = int(word)
            kind, _, args = rest.partition(b" ")
            kind = kind.upper()
            if kind == b"EXPUNGE":
                uid = self.uid_at(n)
                mailbox = self.mailbox
                selecting = self.selecting()
                self.feed(raw)
                if selecting:
                    return
                for c in self.inflight.values():
                    c.expunged.append((n, uid))
                if uid is None:
                    self.stat("EXPUNGEs of unknown UIDs")
                else:
                    self.world.observe_removal(self, mailbox, uid, "* %d EXPUNGE" % n)
                return
            before = self.count
            self.feed(raw)
            if kind == b"EXISTS":
                if self.count > before:
                    for c in self.inflight.values():
                        c.exists_grew = True
                if self.mailbox is not None:
                    with self.world.lock:
                        self.world.counts[self.mailbox] = self.count
                        st = self.world.stats
                        st["largest view"] = max(st["largest view"], self.count)
            elif kind == b"FETCH":
                self.fetch_response(n, args, segs)
            return
        self.feed(raw)
        if up in (b"OK", b"NO", b"BAD", b"BYE"):
            self.status_response(up, rest)
        elif up == b"SEARCH":
            nums = [int(x) for x in rest.split()] if rest.strip() else []
            for c in self.inflight.values():
                if c.base == "SEARCH" and c.search is None:
                    c.search = nums
                    if not c.uid:
                        bad = [x for x in nums if not 1 <= x <= self.count]
                        if bad:
                            self.err("%s: SEARCH returned %s, beyond the %d messages of the view"
                                     % (c.line(), bad[:10], self.count))
                    break
        elif up == b"VANISHED":
            self.err("VANISHED although QRESYNC was never enabled: %r" % body[:100])
        elif up == b"STATUS":
            self.status_data(segs, rest)

    def selecting(self):
        for c in self.inflight.values():
            return c.base in ("SELECT", "EXAMINE")
        return False

    def status_response(self, up, rest):
        if up == b"BYE":
            if self.logging_out:
                return
            if self.world.fresh:
                self.err("* BYE before LOGOUT: %r" % rest[:200])
            else:
                self.byed = True
                self.stat("* BYE from the server (stale mode: reconnected)")
            return
        if up == b"BAD":
            self.err("untagged BAD: %r" % rest[:200])
            return
        if up == b"NO":
            self.stat("untagged NO")
        m = CODE_RE.match(rest)
        if not m:
            return
        code = m.group(1).upper()
        arg = m.group(2) or b""
        if code == b"UIDVALIDITY" and self.selecting():
            self.world.note_uidvalidity(self, self.mailbox, int(arg), "SELECT %s" % self.mailbox)
        elif code == b"UIDNEXT" and self.selecting():
            self.check_uidnext(self.mailbox, int(arg), "SELECT")
        elif code == b"COPYUID":
            # Dovecot runs pipelined MOVEs in parallel: the COPYUID belongs
            # to the MOVE that named its source UIDs, not to the oldest one.
            moves = [c for c in self.inflight.values() if c.base == "MOVE" and c.copyuid is None]
            owner = next((c for c in moves if self._names_copyuid_source(c, arg)), None)
            if owner is None and moves:
                owner = moves[0]
            if owner is not None:
                owner.copyuid = arg

    def _names_copyuid_source(self, c, arg):
        try:
            src = expand_copyuid(arg.split()[1].decode())
        except (ValueError, IndexError):
            return False
        if c.uid:
            return all(in_uid_set(u, c.uidset, c.top) for u in src)
        meant = self.meant_uids(c)
        return meant is not None and set(src) <= set(meant)

    def status_data(self, segs, rest):
        try:
            toks = tokenize([rest] + segs[1:])
        except ParseError:
            return
        if len(toks) != 2 or not isinstance(toks[1], list):
            return
        name = toks[0][1] if isinstance(toks[0], tuple) else toks[0]
        name = name.decode("utf-8", "replace")
        name = "INBOX" if name.upper() == "INBOX" else name
        items = toks[1]
        vals = {k.upper(): v for k, v in zip(items[0::2], items[1::2]) if isinstance(k, bytes)}
        if b"UIDVALIDITY" in vals:
            self.world.note_uidvalidity(self, name, int(vals[b"UIDVALIDITY"]), "STATUS")
        if b"UIDNEXT" in vals:
            self.check_uidnext(name, int(vals[b"UIDNEXT"]), "STATUS")

    def check_uidnext(self, mailbox, uidnext, context):
        top = self.max_uid[mailbox]
        if uidnext <= top:
            self.err("%s %s: UIDNEXT %d, but this connection already saw UID %d there"
                     % (context, mailbox, uidnext, top))

    def saw_uid(self, mailbox, uid):
        if uid > self.max_uid[mailbox]:
            self.max_uid[mailbox] = uid

    def fetch_response(self, n, args, segs):
        try:
            toks = tokenize([args] + segs[1:])
        except ParseError:
            return                  # the checker reported it
        if len(toks) != 1 or not isinstance(toks[0], list) or len(toks[0]) % 2:
            return
        items = {}
        for k, v in zip(toks[0][0::2], toks[0][1::2]):
            if isinstance(k, bytes):
                items[k.upper()] = v
        uid = None
        if b"UID" in items and isinstance(items[b"UID"], bytes) and items[b"UID"].isdigit():
            uid = int(items[b"UID"])
        known = uid if uid is not None else self.uid_at(n)
        mailbox = self.mailbox
        if known is not None and mailbox is not None:
            self.saw_uid(mailbox, known)
            flags = items.get(b"FLAGS")
            if isinstance(flags, list):
                ctx = "* %d FETCH (UID %d FLAGS ...)" % (n, known)
                for f in flags:
                    if not isinstance(f, bytes):
                        continue
                    nf = norm_flag(f)
                    if nf in (DELETED.lower(), FLAGGED.lower()) or KEYWORD_RE.match(nf):
                        self.world.observe_flag(self, mailbox, known, nf, ctx)
            ctx = "* %d FETCH (UID %d ...)" % (n, known)
            for k, v in items.items():
                if isinstance(v, tuple):
                    v = Lit(v[1])
                if k.startswith(b"BODY[HEADER.FIELDS") and isinstance(v, Lit):
                    m = re.search(rb"^Subject: ?(.*?)\r?$", bytes(v), re.M | re.I)
                    self.world.note_fact(self, mailbox, known, "Subject", m.group(1) if m else b"", ctx)
                elif k in (b"RFC822.SIZE", b"INTERNALDATE") and isinstance(v, bytes):
                    self.world.note_fact(self, mailbox, known, k.decode(), bytes(v), ctx)
        for c in self.inflight.values():
            if c.base in ("FETCH", "STORE"):
                c.fetched.append((n, uid, items))

    # ------------------------------------------------------------ command meaning
    def prepare(self, c):
        """Record intents before the command can take effect."""
        w = self.world
        flags = list(c.tracked) if c.base == "STORE" else [MOVED] if c.base == "MOVE" else []
        if not flags:
            return
        if c.uid:
            exact = self.uid_range_members(c)
            for flag in flags:
                if exact is None:
                    w.intend(flag, self.mailbox, lo=c.uid_lo, hi=c.uid_hi)
                else:
                    w.intend(flag, self.mailbox, exact)
        else:
            for flag in flags:
                w.intend(flag, self.mailbox, [c.model_at_send[s] for s in c.seqs])

    def uid_range_members(self, c):
        """The messages UID lo:hi can touch, when the model knows them all:
        both ends are in the view and every position between them is known.
        A message added later has a higher UID than any before it, so it
        cannot fall inside. None (take the whole range) otherwise, and
        always against a stale server, whose own view may miss a message
        inside the range that a resync then brings back."""
        if not self.world.fresh:
            return None
        seq = {u: s for s, u in c.model_at_send.items()}
        if c.uid_lo not in seq or c.uid_hi not in seq:
            return None
        a, b = seq[c.uid_lo], seq[c.uid_hi]
        members = [c.model_at_send.get(s) for s in range(a, b + 1)]
        return None if None in members else members

    def require_removed(self, mailbox, uids, msg, mode="all"):
        self.world.check_removed(self, mailbox, list(uids), mode, msg)

    def complete(self, c):
        if c.base == "LOGIN":
            return      # connect() reports a failure, without the password
        mb = c.mailbox
        if c.status == "BAD":
            self.err("%s: BAD for a command valid in the model: %r" % (c.line(), c.text[:200]))
            return
        expungeissued = b"EXPUNGEISSUED" in c.text.upper()
        if c.status == "NO" and getattr(c, "accept_no", False):
            return
        if c.status == "NO":
            if c.base in ("COPY", "MOVE", "FETCH", "STORE") and expungeissued:
                # A lone '*' after an EXISTS in the same command names the
                # new last message, whose UID the model does not know.
                uids = None if self.star_moved(c) else self.meant_uids(c)
                self.stat("NO [EXPUNGEISSUED] accepted")
                if uids is not None:
                    self.require_removed(mb, uids, "%s: NO [EXPUNGEISSUED], but none of %s was flagged "
                                         "\\Deleted or moved by anyone" % (c.line(), sorted(uids)[:10]), "any")
                return
            self.err("%s: NO for a command valid in the model: %r" % (c.line(), c.text[:200]))
            return
        if c.status != "OK":
            self.err("%s: tagged %s" % (c.line(), c.status))
            return
        if expungeissued and c.base in ("FETCH", "UID FETCH", "STORE"):
            uids = None if self.star_moved(c) else self.meant_uids(c)
            if uids is not None:
                self.require_removed(mb, uids, "%s: OK [EXPUNGEISSUED], but none of %s was flagged "
                                     "\\Deleted or moved by anyone" % (c.line(), sorted(uids)[:10]), "any")
        getattr(self, "done_" + c.base.lower(), lambda c: None)(c)

    def star_moved(self, c):
        """'*' is the highest number when the server evaluates it: an EXISTS
        sent first in the same command (imapfresh's injected NOOP does that)
        makes it the new last message. Legal; only a lone '*' is affected
        (n:* still covers the old last message)."""
        return c.exists_grew and "*" in c.args.split(" ")[0].split(",")

    def meant_uids(self, c):
        """UIDs of the view a command names, from the model at send; None
        when the model did not know them all."""
        if c.uid:
            if len(c.model_at_send) != c.count_at_send or not hasattr(c, "uidset"):
                return None
            return [u for u in c.model_at_send.values() if in_uid_set(u, c.uidset, c.top)]
        seqs = getattr(c, "seqs", None)
        if seqs is None:
            return None
        uids = [c.model_at_send.get(s) for s in seqs]
        return None if None in uids else uids

    def done_fetch(self, c):
        mb = c.mailbox
        if c.uid:
            got = {u for _, u, _ in c.fetched if u is not None}
            for u, s in ((u, s) for s, u in c.model_at_send.items() if in_uid_set(u, c.uidset, c.top)):
                self.stat("UID FETCH messages checked")
                if u not in got:
                    self.require_removed(mb, [u], "%s: no FETCH for UID %d (message %d of the view), "
                                         "which nobody flagged \\Deleted or moved" % (c.line(), u, s))
            return
        got = {s for s, u, _ in c.fetched if u is not None}
        for s in sorted(c.seqs):
            self.stat("FETCH messages checked")
            if s not in got:
                u = c.model_at_send.get(s)
                if s == c.count_at_send and self.star_moved(c):
                    self.stat("'*' after an EXISTS in the same command")
                    continue
                self.require_removed(mb, [u], "%s: no FETCH with UID for message %d (UID %s), which "
                                     "nobody flagged \\Deleted or moved" % (c.line(), s, u))

    def done_search(self, c):
        mb = c.mailbox
        if c.search is None:
            self.err("%s: OK without a * SEARCH response" % c.line())
            return
        res = set(c.search)
        self.stat("SEARCH results checked")
        model = c.model_at_send
        if c.uid:
            known = set(model.values())
            if c.key == "ALL" or c.key == "UID":
                want = {u for u in known if c.key == "ALL" or c.uid_lo <= u <= c.uid_hi}
                for u in sorted(want - res):
                    self.require_removed(mb, [u], "%s: UID %d (in the view) missing from the result"
                                         % (c.line(), u))
                if c.key == "UID":
                    out = [u for u in res if not c.uid_lo <= u <= c.uid_hi]
                    if out:
                        self.err("%s: UIDs %s outside %d:%d" % (c.line(), out[:10], c.uid_lo, c.uid_hi))
            if c.flag:
                for u in res:
                    self.world.observe_flag(self, mb, u, c.flag, c.line())
            # Dovecot runs a UID SEARCH in parallel with a pipelined
            # EXPUNGE/NOOP..., whose sync may show it messages not announced
            # yet: only a UID SEARCH alone in flight is checked for that.
            if self.world.fresh and c.alone and len(model) == c.count_at_send and not c.exists_grew \
                    and not any(u is None for _, u in c.expunged):
                extra = sorted(res - known)
                if extra:
                    self.err("%s: UIDs %s are not in the view (%d messages, all UIDs known) and no "
                             "EXISTS announced them" % (c.line(), extra[:10], c.count_at_send))
            return
        n0 = c.count_at_send
        if c.key in ("ALL", "SEQ", "UID"):
            if c.key == "ALL":
                want = set(range(1, n0 + 1))
            elif c.key == "SEQ":
                want = {s for s in c.seqs if s <= n0}
                out = sorted(res - c.seqs)
                if out:
                    self.err("%s: numbers %s outside the set" % (c.line(), out[:10]))
            else:
                want = {s for s, u in model.items() if c.uid_lo <= u <= c.uid_hi}
                out = sorted(s for s in res if model.get(s) is not None
                             and not c.uid_lo <= model[s] <= c.uid_hi)
                if out:
                    self.err("%s: messages %s have UIDs outside %d:%d (%s)"
                             % (c.line(), out[:10], c.uid_lo, c.uid_hi, [model[s] for s in out[:10]]))
            for s in sorted(want - res):
                self.require_removed(mb, [model.get(s)], "%s: message %d (UID %s) missing from the result"
                                     % (c.line(), s, model.get(s)))
            if c.key == "ALL":
                extra = sorted(s for s in res if s > n0)
                if extra and not c.exists_grew:
                    self.err("%s: numbers %s beyond the %d messages and no EXISTS" % (c.line(), extra[:10], n0))
        if c.flag:
            for s in res:
                u = model.get(s)
                if u is not None:
                    self.world.observe_flag(self, mb, u, c.flag, c.line())

    def done_copy(self, c):
        self._copyuid(c, c.text)

    def done_move(self, c):
        self._copyuid(c, None)

    def _copyuid(self, c, tagged_text):
        mb = c.mailbox
        arg = c.copyuid
        if arg is None and tagged_text is not None:
            m = CODE_RE.search(tagged_text)
            if m and m.group(1).upper() == b"COPYUID":
                arg = m.group(2)
        meant = self.meant_uids(c)
        if c.uid:
            meant = [u for u in c.model_at_send.values() if in_uid_set(u, c.uidset, c.top)]
        must = list(meant or [])
        if not c.uid and self.star_moved(c):
            last = c.model_at_send.get(c.count_at_send)
            must = [u for u in must if u != last]
        if arg is None:
            if must and "CAPS_UIDPLUS" in self.caps:
                self.require_removed(mb, must, "%s: OK without COPYUID, though %s were still there"
                                     % (c.line(), must[:10]))
            return
        try:
            v, src, dst = arg.split()
            v, src, dst = int(v), expand_copyuid(src.decode()), expand_copyuid(dst.decode())
        except ValueError:
            self.err("%s: unparsable COPYUID %r" % (c.line(), arg))
            return
        self.stat("COPYUIDs checked")
        if len(src) != len(dst):
            self.err("%s: COPYUID with %d source and %d destination UIDs" % (c.line(), len(src), len(dst)))
            return
        self.world.note_uidvalidity(self, c.target, v, "COPYUID")
        for u in dst:
            self.saw_uid(c.target, u)
        known = set(c.model_at_send.values())
        if c.uid:
            wrong = [u for u in src if not in_uid_set(u, c.uidset, c.top)]
        elif meant is not None:
            wrong = [u for u in src if u not in meant]
        else:
            wrong = [u for u in src if u in known and u not in {c.model_at_send.get(s) for s in c.seqs}]
        if c.exists_grew and "*" in c.args.split(" ")[0]:
            wrong = [u for u in wrong if u in known]     # '*' may name a message announced meanwhile
        if wrong:
            self.err("%s: copied UIDs %s, which it did not name (meant %s)"
                     % (c.line(), wrong[:10], sorted(meant or [])[:10]))
        missing = [u for u in must if u not in src]
        if missing:
            self.require_removed(mb, missing, "%s: did not copy UIDs %s, which nobody removed"
                                 % (c.line(), missing[:10]))
        self.world.copy_done(c.target, mb, list(zip(src, dst)),
                             "%s %s at %+.3fs" % (self.label, c.line(), self.world.now()))
        if c.base == "MOVE":
            gone = {u for _, u in c.expunged}
            seen = set(c.model_at_send.values())
            lost = [u for u in src if u in seen and u not in gone]
            if lost:
                self.err("%s: moved UIDs %s without EXPUNGE for them" % (c.line(), lost[:10]))

    def done_append(self, c):
        m = CODE_RE.search(c.text)
        if m and m.group(1).upper() == b"APPENDUID":
            try:
                v, u = (int(x) for x in m.group(2).split())
            except ValueError:
                self.err("%s: unparsable APPENDUID %r" % (c.line(), m.group(2)))
                return
            self.world.note_uidvalidity(self, c.target, v, "APPENDUID")
            self.world.note_fact(self, c.target, u, "Subject", c.subject, "APPENDUID")
            with self.world.lock:
                self.world.origin[(c.target, u)] = "%s %s at %+.3fs" % (self.label, c.line(), self.world.now())
            self.saw_uid(c.target, u)
            self.stat("APPENDUIDs checked")

    def done_select(self, c):
        if self.checker.count is None:
            self.err("%s: OK, but the model has no count" % c.line())

    done_examine = done_select

    # ------------------------------------------------------------ generators
    def seqset(self, n):
        """A sequence set within 1..n: (text, set of numbers)."""
        r = self.rng
        k = r.random()
        if k < 0.3:
            a = r.randint(1, n)
            return str(a), {a}
        if k < 0.55:
            a, b = sorted((r.randint(1, n), r.randint(1, n)))
            return "%d:%d" % (a, b), set(range(a, b + 1))
        if k < 0.75:
            picks = sorted(set(r.randint(1, n) for _ in range(r.randint(2, 4))))
            return ",".join(map(str, picks)), set(picks)
        if k < 0.85:
            a = r.randint(1, n)
            return "%d:*" % a, set(range(a, n + 1))
        if k < 0.9:
            return "*", {n}
        return "1:*", set(range(1, n + 1))

    def known_seqs(self, most=4):
        known = sorted(self.checker.uids)
        if not known:
            return None
        r = self.rng
        if r.random() < 0.5:
            i = r.randrange(len(known))
            j = i
            while j + 1 < len(known) and known[j + 1] == known[j] + 1 and j - i + 1 < most \
                    and r.random() < 0.7:
                j += 1
            seqs = set(range(known[i], known[j] + 1))
        else:
            seqs = set(r.sample(known, min(len(known), r.randint(1, most))))
        return compress(seqs), seqs

    def uidset(self, for_store=False, span=60):
        """(text, ranges, lo, hi): lo/hi set when it is one explicit range."""
        uids = sorted(self.checker.uids.values())
        r = self.rng
        if not uids:
            top = self.max_uid[self.mailbox] or 1
            a = r.randint(1, top)
            return "%d:%d" % (a, top), [(a, top)], a, top
        k = r.random()
        if k < 0.4:
            u = r.choice(uids)
            return str(u), [(u, u)], u, u
        if k < 0.75 or for_store:
            a, b = sorted((r.choice(uids), r.choice(uids)))
            if b - a > span:
                b = a + span
            return "%d:%d" % (a, b), [(a, b)], a, b
        if k < 0.9 and span >= 60:
            a = r.choice(uids)
            return "%d:*" % a, [(a, None)], None, None
        gone = r.randint(1, uids[-1] + 5)
        return "%d" % gone, [(gone, gone)], gone, gone

    def fetch_items(self):
        extra = self.rng.choice([[], ["FLAGS"], ["FLAGS"], ["RFC822.SIZE"], ["INTERNALDATE", "FLAGS"],
                                 ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"],
                                 ["FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]])
        items = ["UID"] + extra
        self.rng.shuffle(items)
        return "(%s)" % " ".join(items)

    def flag_choice(self):
        r = self.rng
        pool = [SEEN, FLAGGED, DELETED, self.keyword]
        weights = [4, 3, 2 + (4 if self.count > 30 else 0), 3]
        flags = set()
        for _ in range(r.choice((1, 1, 1, 2))):
            flags.add(r.choices(pool, weights)[0])
        return sorted(flags)

    def gen_fetch(self):
        if not self.count:
            return None
        if not self.fully_known() and self.rng.random() < 0.5:
            # What a client does after an EXISTS: fetch the new messages.
            first = min(s for s in range(1, self.count + 1) if s not in self.checker.uids)
            return Cmd("FETCH", "%d:* (UID FLAGS)" % first, seqs=set(range(first, self.count + 1)))
        text, seqs = self.seqset(self.count)
        return Cmd("FETCH", "%s %s" % (text, self.fetch_items()), seqs=seqs)

    def gen_uid_fetch(self):
        text, ranges, lo, hi = self.uidset()
        return Cmd("UID FETCH", "%s %s" % (text, self.fetch_items()), uidset=ranges, uid_lo=lo,
                   uid_hi=hi, top=self.top_uid())

    def top_uid(self):
        """Highest UID of the view, if the model knows the last position."""
        return self.checker.uids.get(self.count) if self.count else None

    def store_args(self, flags):
        r = self.rng
        op = r.choices(["+FLAGS", "-FLAGS", "FLAGS"], [6, 3, 1])[0]
        if r.random() < 0.3:
            op += ".SILENT"
        tracked = [] if op.startswith("-") else [f for f in flags if f != SEEN]
        return "%s (%s)" % (op, " ".join(flags)), tracked

    def gen_store(self):
        if not self.count or self.readonly:
            return None
        if self.count > 40 and self.rng.random() < 0.4:
            ks = self.known_seqs(10)    # trim a big mailbox
            if ks is not None:
                return Cmd("STORE", "%s +FLAGS.SILENT (\\Deleted)" % ks[0], seqs=ks[1], tracked=[DELETED])
        flags = self.flag_choice()
        args, tracked = self.store_args(flags)
        if tracked:
            ks = self.known_seqs()
            if ks is None:
                return None
            text, seqs = ks
        else:
            text, seqs = self.seqset(self.count)
        return Cmd("STORE", "%s %s" % (text, args), seqs=seqs, tracked=tracked)

    def gen_uid_store(self):
        if self.readonly:
            return None
        flags = self.flag_choice()
        args, tracked = self.store_args(flags)
        text, ranges, lo, hi = self.uidset(for_store=bool(tracked))
        if tracked and lo is None:
            return None
        return Cmd("UID STORE", "%s %s" % (text, args), tracked=tracked, uidset=ranges, uid_lo=lo,
                   uid_hi=hi, top=self.top_uid())

    def search_key(self, uid):
        r = self.rng
        choices = ["ALL", "UNSEEN", "DELETED", "FLAGGED", "KEYWORD", "UID"] + ([] if uid else ["SEQ"])
        key = r.choices(choices, [4, 2, 2, 1, 1, 3] + ([] if uid else [3]))[0]
        kw = dict(key=key, flag=None)
        if key == "DELETED":
            kw["flag"] = DELETED.lower()
        elif key == "FLAGGED":
            kw["flag"] = FLAGGED.lower()
        elif key == "KEYWORD":
            kw["flag"] = self.rng.choice([self.keyword, "$Stress%d" % r.randint(1, 9)]).lower()
            return "KEYWORD %s" % kw["flag"], kw
        if key == "SEQ":
            if not self.count:
                return None, None
            text, seqs = self.seqset(self.count)
            if "*" in text:
                text, seqs = "1:%d" % self.count, set(range(1, self.count + 1))
            kw["seqs"] = seqs
            return text, kw
        if key == "UID":
            text, ranges, lo, hi = self.uidset(for_store=True)
            kw.update(uid_lo=lo, uid_hi=hi)
            return "UID %s" % text, kw
        return key, kw

    def gen_search(self):
        text, kw = self.search_key(False)
        if text is None:
            return None
        return Cmd("SEARCH", text, **kw)

    def gen_uid_search(self):
        text, kw = self.search_key(True)
        return Cmd("UID SEARCH", text, **kw)

    def gen_copy(self, name="COPY"):
        if not self.count or (name == "MOVE" and self.readonly):
            return None
        if name == "MOVE":
            ks = self.known_seqs(3)
            if ks is None:
                return None
            text, seqs = ks
        else:
            text, seqs = self.seqset(self.count)
            if len(seqs) > 6:       # copies stay small: the mailboxes must not grow without bound
                a = self.rng.randint(1, self.count)
                b = min(self.count, a + self.rng.randint(0, 4))
                text, seqs = "%d:%d" % (a, b), set(range(a, b + 1))
        target = self.other()
        return Cmd(name, "%s %s" % (text, quote(target)), seqs=seqs, target=target)

    def gen_uid_copy(self, name="UID COPY"):
        if name == "UID MOVE" and self.readonly:
            return None
        text, ranges, lo, hi = self.uidset(for_store=(name == "UID MOVE"), span=8)
        if name == "UID MOVE" and lo is None:
            return None
        target = self.other()
        return Cmd(name, "%s %s" % (text, quote(target)), uidset=ranges, uid_lo=lo, uid_hi=hi,
                   target=target, top=self.top_uid())

    def gen_move(self):
        return self.gen_copy("MOVE") if "MOVE" in self.caps else None

    def gen_uid_move(self):
        return self.gen_uid_copy("UID MOVE") if "MOVE" in self.caps else None

    def gen_expunge(self):
        return None if self.readonly else Cmd("EXPUNGE", "")

    def gen_uid_expunge(self):
        if self.readonly or "UIDPLUS" not in self.caps:
            return None
        text, _, _, _ = self.uidset()
        return Cmd("UID EXPUNGE", text)

    def gen_noop(self):
        return Cmd("NOOP", "")

    def gen_check(self):
        return Cmd("CHECK", "")

    def gen_append(self):
        r = self.rng
        self.appended += 1
        target = r.choice(self.mailboxes)
        subject = "stress s%d %s m%d %08x" % (self.world.seed, self.label, self.appended, r.getrandbits(32))
        body = ("line %d of a small stress message\r\n" % r.randint(0, 99)) * r.randint(1, 12)
        msg = ("From: stress@example.org\r\nTo: stress@example.org\r\nSubject: %s\r\n"
               "Message-ID: <%08x.%s@stress.imapfresh.test>\r\n\r\n%s"
               % (subject, r.getrandbits(32), self.label, body)).encode()
        flags = r.choice(["", "", "(\\Seen) ", "() "])
        c = Cmd("APPEND", "%s %s" % (quote(target), flags.strip()) if flags.strip() else quote(target),
                target=target, subject=subject.encode())
        c.literal = msg
        c.sync = "LITERAL+" not in self.caps or r.random() < 0.3
        return c

    def gen_status(self):
        return Cmd("STATUS", "%s (MESSAGES UIDNEXT UIDVALIDITY)" % quote(self.other()))

    GENERATORS = {
        "FETCH": (gen_fetch, 16), "UID FETCH": (gen_uid_fetch, 10),
        "STORE": (gen_store, 12), "UID STORE": (gen_uid_store, 8),
        "SEARCH": (gen_search, 7), "UID SEARCH": (gen_uid_search, 6),
        "COPY": (gen_copy, 2), "UID COPY": (gen_uid_copy, 2),
        "MOVE": (gen_move, 2), "UID MOVE": (gen_uid_move, 2),
        "EXPUNGE": (gen_expunge, 3), "UID EXPUNGE": (gen_uid_expunge, 2),
        "NOOP": (gen_noop, 4), "CHECK": (gen_check, 2),
    }
    PIPELINABLE = tuple(GENERATORS)
    SOLO = {"APPEND": 5, "IDLE": 2, "SELECT": 2, "EXAMINE": 1, "STATUS": 1, "PIPELINE": 14}

    def may(self, kind):
        return self.allowed is None or kind in self.allowed

    def weight(self, kind):
        w = self.GENERATORS[kind][1] if kind in self.GENERATORS else self.SOLO[kind]
        n = self.count
        if kind in ("EXPUNGE", "UID EXPUNGE", "MOVE", "UID MOVE") and n > 40:
            w *= 3
        if kind == "APPEND":
            w = w * 3 if n < 5 else (w // 3 if n > 40 else w)
        if kind in ("COPY", "UID COPY") and self.world.counts.get(self.other(), 0) > 60:
            w = 0
        return w if self.may(kind) else 0

    def make(self, kind):
        return self.GENERATORS[kind][0](self)

    def step(self):
        r = self.rng
        kinds = list(self.GENERATORS) + list(self.SOLO)
        kind = r.choices(kinds, [self.weight(k) for k in kinds])[0]
        if kind == "PIPELINE":
            self.pipeline()
        elif kind == "APPEND":
            self.submit([self.gen_append()])
        elif kind == "IDLE":
            self.idle()
        elif kind in ("SELECT", "EXAMINE"):
            self.select(r.choice(self.mailboxes), kind == "EXAMINE")
        elif kind == "STATUS":
            self.submit([self.gen_status()])
        else:
            c = self.make(kind)
            if c is not None:
                self.submit([c])

    def pipeline(self):
        """2 or 3 commands back to back; a sequence-number command only
        behind FETCH/STORE/SEARCH (RFC 3501 5.5)."""
        r = self.rng
        group = []
        for _ in range(r.choice((2, 2, 3))):
            seq_ok = all(c.name in FSS for c in group)
            # One search per group: untagged * SEARCH responses carry no
            # tag, and Dovecot runs two UID SEARCHes in parallel.
            searching = any(c.base == "SEARCH" for c in group)
            kinds = [k for k in self.PIPELINABLE if (seq_ok or k not in SEQ_COMMANDS)
                     and not (searching and k.endswith("SEARCH"))]
            weights = [self.weight(k) for k in kinds]
            if not any(weights):
                break
            c = None
            for _ in range(5):
                c = self.make(r.choices(kinds, weights)[0])
                if c is not None:
                    break
            if c is not None:
                group.append(c)
        if group:
            self.submit(group)

    def idle(self):
        if "IDLE" not in self.caps:
            return
        c = Cmd("IDLE", "")
        self.ntag += 1
        c.tag = "%s.%d" % (self.label, self.ntag)
        c.mailbox = self.mailbox
        c.count_at_send = self.count
        c.model_at_send = self.known()
        self.inflight[c.tag] = c
        self.note("C:", c.line().encode())
        self.send(c.line().encode() + b"\r\n")
        self.stat("commands sent")
        self.stat("command IDLE")
        while True:
            raw, segs = self.wire.read()
            if raw.startswith(b"+"):
                self.note("S:", raw)
                self.feed(raw)
                break
            self.handle(raw, segs)
            if c.status is not None:
                self.err("IDLE answered %s before '+'" % c.status)
                return
        end = time.monotonic() + self.rng.uniform(0.02, 0.4)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            got = self.wire.read(wait=left)
            if got is None:
                break
            self.handle(*got)
        self.note("C:", b"DONE")
        self.send(b"DONE\r\n")
        self.wait_all()

    def select(self, mailbox, examine=False):
        self.mailbox = mailbox
        self.readonly = examine
        c = Cmd("EXAMINE" if examine else "SELECT", quote(mailbox))
        self.submit([c])
        if c.status != "OK":
            raise Fatal("%s %s failed: %s %r" % (c.name, mailbox, c.status, c.text))
        if self.count:
            self.submit([Cmd("FETCH", "1:* (UID FLAGS)", seqs=set(range(1, self.count + 1)))])

    # ------------------------------------------------------------ session
    def connect(self):
        self.wire = Wire(self.host, self.port, self.tls, self.sslctx)
        raw, segs = self.wire.read()
        self.note("S:", raw)
        self.feed(raw)
        if not raw.startswith(b"* OK"):
            raise Fatal("greeting: %r" % raw[:200])
        c = Cmd("LOGIN", "%s %s" % (quote(self.user), quote(self.password)))
        self.ntag += 1
        c.tag = "%s.%d" % (self.label, self.ntag)
        self.inflight[c.tag] = c
        self.note("C:", ("%s LOGIN %s <password>" % (c.tag, quote(self.user))).encode())
        self.send(c.line().encode() + b"\r\n")
        self.wait_all()
        if c.status != "OK":
            raise Fatal("LOGIN failed: %s %r" % (c.status, c.text))
        caps = re.search(rb"\[CAPABILITY ([^\]]*)\]", c.text)
        if not caps:
            cap = Cmd("CAPABILITY", "")
            self.submit([cap])
            caps = [l for l in self.checker.untagged if l[0] == "CAPABILITY"]
            words = [w for w in caps[-1][1] if isinstance(w, bytes)] if caps else []
        else:
            words = caps.group(1).split()
        self.caps = {w.decode("latin-1").upper() for w in words}
        if "UIDPLUS" in self.caps:
            self.caps.add("CAPS_UIDPLUS")

    def logout(self):
        self.logging_out = True
        c = Cmd("LOGOUT", "")
        self.submit([c])

    def main(self):
        try:
            while True:
                try:
                    self.session()
                    return
                except Fatal as e:
                    if not self.byed:
                        self.err("connection ended: %s" % e)
                        return
                    if time.monotonic() >= self.end or self.world.stop.is_set():
                        return      # a legal * BYE (stale mode) as the run ended
                    self.reconnect()
        except Exception:
            self.err("stress client crashed:\n%s" % traceback.format_exc())
        finally:
            if self.wire is not None:
                self.wire.close()

    def session(self):
        self.connect()
        self.select(self.rng.choice(self.mailboxes), examine=self.rng.random() < 0.1)
        while time.monotonic() < self.end and not self.world.stop.is_set():
            self.step()
        self.logout()
        n = len(self.checker.errors)
        self.checker.finish()
        for e in self.checker.errors[n:]:
            self.err("checker: " + e)

    def reconnect(self):
        """After a legal * BYE (stale mode): a new connection, a new stream
        to check. A COPY/MOVE that was in progress may have happened: its
        destination UIDs are never learnt (see World.finish)."""
        self.wire.close()
        for c in self.inflight.values():
            if c.base in ("COPY", "MOVE"):
                with self.world.lock:
                    self.world.lost_copies.add(c.target)
        self.inflight.clear()
        self.checker = imapcheck.Checker()
        self.mailbox = None
        self.byed = False
        self.note("--", b"reconnecting after * BYE")


# ===================================================================== setup

def setup(world, host, port, user, password, tls, sslctx, mailboxes):
    """Before the clients start, on one connection: create the mailboxes,
    top them up to a few messages, trim them when huge, and learn what is in
    them: tracked flags already set (earlier runs, other tools) count as
    intended, Subjects and UIDVALIDITY are recorded."""
    c = Client(world, -1, host, port, user, password, tls, sslctx, mailboxes,
               random.Random(world.seed), time.monotonic() + 60, None)
    c.label = "setup"
    world.recording = True
    try:
        c.connect()
        for mb in mailboxes:
            if mb.upper() != "INBOX":
                c.submit([Cmd("CREATE", quote(mb), accept_no=True)])    # NO: it exists
            c.select(mb)
            for _ in range(20):
                if c.count >= 6:
                    break
                c.submit([append_cmd(c, mb)])
                c.submit([Cmd("NOOP", "")])
            if c.count > 150:
                surplus = range(1, c.count - 100 + 1)
                world.intend(DELETED, mb, [c.uid_at(s) for s in surplus if c.uid_at(s)])
                c.submit([Cmd("STORE", "1:%d +FLAGS.SILENT (\\Deleted)" % (c.count - 100),
                              seqs=set(surplus), tracked=[])])
                c.submit([Cmd("EXPUNGE", "")])
            if c.count:
                c.submit([Cmd("FETCH", "1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
                              seqs=set(range(1, c.count + 1)))])
            with world.lock:
                world.counts[mb] = c.count
        c.logout()
    finally:
        world.recording = False
        if c.wire is not None:
            c.wire.close()


def append_cmd(c, mb):
    save = c.mailboxes
    c.mailboxes = [mb]
    try:
        return c.gen_append()
    finally:
        c.mailboxes = save


# ===================================================================== run

class Result:
    def __init__(self, world, seconds, clients, argv_hint):
        self.world = world
        stamp = lambda e: float(re.match(r"\[\S+ \+([\d.]+)s\]", e).group(1)) if e.startswith("[") else 0.0
        self.errors = sorted(world.errors, key=stamp)
        self.stats = dict(world.stats)
        self.seed = world.seed
        self.seconds = seconds
        self.clients = clients
        self.argv_hint = argv_hint

    @property
    def ok(self):
        return not self.errors

    def summary(self):
        s = self.stats
        return ("stress: %d clients, %.1fs, seed %d: %d commands sent (%d in %d pipelined groups), "
                "%d responses checked, %d EXPUNGEs and %d flags checked against intents, "
                "%d FETCH/UID FETCH messages checked, errors=%d"
                % (self.clients, self.seconds, self.seed, s.get("commands sent", 0),
                   s.get("pipelined commands", 0), s.get("pipelined groups", 0),
                   s.get("responses checked", 0), s.get("EXPUNGEs checked against intents", 0),
                   s.get("flag observations checked", 0),
                   s.get("FETCH messages checked", 0) + s.get("UID FETCH messages checked", 0),
                   len(self.errors))
                + ("" if not s.get("* BYE from the server (stale mode: reconnected)") else
                   " (%d * BYE, reconnected)" % s["* BYE from the server (stale mode: reconnected)"]))

    def report(self, max_errors=40):
        out = [self.summary()]
        if not self.errors:
            return "\n".join(out)
        out.append("seed %d reproduces the command choices: %s --seed %d"
                   % (self.seed, self.argv_hint, self.seed))
        kinds = collections.Counter(error_kind(e) for e in self.errors)
        out.append("error kinds: " + "; ".join("%d x %s" % (n, k) for k, n in kinds.most_common()))
        out.append("errors (first %d of %d):" % (min(max_errors, len(self.errors)), len(self.errors)))
        out += ["  " + e for e in self.errors[:max_errors]]
        snap = self.world.first_error_snapshot
        if snap:
            stamp, label, hist = snap
            out.append("=== every connection's last %d commands at the first error (%s, +%.3fs) ==="
                       % (REPORT_COMMANDS, label, stamp))
            for lab, h in hist:
                out.append("--- %s ---" % lab)
                out += ["  " + l for l in last_commands(h)]
        for c in self.world.clients:
            if c.first_error and (not snap or snap[1] != c.label or snap[0] != c.first_error[0]):
                out.append("--- %s: its last %d commands at its own first error (+%.3fs) ---"
                           % (c.label, REPORT_COMMANDS, c.first_error[0]))
                out += ["  " + l for l in last_commands(c.first_error[1])]
        return "\n".join(out)


def last_commands(hist, n=REPORT_COMMANDS):
    """The history lines from the n-th last command on, with runs of 4 or
    more * EXPUNGE / * FETCH lines in a row shortened to first, count, last."""
    lines = list(hist)
    start, seen = 0, 0
    for i in range(len(lines) - 1, -1, -1):
        if " C: " in lines[i]:
            seen += 1
            if seen == n:
                start = i
                break
    lines = lines[start:]
    out, i = [], 0
    kind = lambda l: re.search(r" S: \* \d+ (EXPUNGE|FETCH)", l) and re.search(r" S: \* \d+ (EXPUNGE|FETCH)", l).group(1)
    while i < len(lines):
        k = kind(lines[i])
        j = i
        while k and j + 1 < len(lines) and kind(lines[j + 1]) == k:
            j += 1
        if j - i >= 3:
            out += [lines[i], "         ... %d more * n %s lines ..." % (j - i - 1, k), lines[j]]
        else:
            out += lines[i:j + 1]
        i = j + 1
    return out


def error_kind(e):
    """A short class of an error message, for the summary."""
    e = re.sub(r"^\[[^\]]*\] ", "", e)
    rules = [
        ("checker: EXPUNGE while", "EXPUNGE during FETCH/STORE/SEARCH"),
        ("checker: EXPUNGE with no command", "EXPUNGE with no command in progress"),
        ("changed UID", "UID at a sequence number changed without EXPUNGE"),
        ("UIDs out of order", "UIDs out of order"),
        ("EXISTS shrank", "EXISTS shrank"),
        ("out of range", "EXPUNGE number out of range"),
        ("checker: FETCH for message", "FETCH number out of range"),
        ("BAD for a command", "BAD for a valid command"),
        ("NO for a command", "NO for a valid command"),
        ("carries", "tracked flag on a message nobody set it on"),
        ("was expunged, but", "expunged a message nobody deleted or moved"),
        ("no FETCH", "FETCH data missing for a message nobody removed"),
        ("missing from the result", "SEARCH result missing a message"),
        ("not in the view", "UID SEARCH returned UIDs not in the view"),
        ("have UIDs outside", "SEARCH UID x:y returned messages outside the range"),
        ("SEARCH returned", "SEARCH number beyond the view"),
        ("copied UIDs", "COPY/MOVE copied other messages"),
        ("did not copy", "COPY/MOVE missed messages"),
        ("without EXPUNGE for them", "MOVE without EXPUNGE for a moved message"),
        ("has Subject", "a message's Subject changed"),
        ("has RFC822.SIZE", "a message's size changed"),
        ("has INTERNALDATE", "a message's INTERNALDATE changed"),
        ("UIDVALIDITY", "UIDVALIDITY changed"),
        ("UIDNEXT", "UIDNEXT below a seen UID"),
        ("connection ended", "connection ended (timeout/EOF/BYE)"),
        ("checker:", "other stream violation"),
    ]
    for needle, kind in rules:
        if needle in e:
            return kind
    return e[:60]


def run(host, port, user, password, seconds=30, clients=5, seed=None, tls=False, cafile=None,
        mailbox="INBOX", second="Stress", ports=None, fresh=True, commands=None, max_errors=200,
        verify=True):
    """Run the stress test; returns a Result. ports: a list of ports to
    spread the connections over (several imapfresh instances); commands: the
    command kinds allowed (None: all; see Client.GENERATORS and SOLO)."""
    if seed is None:
        seed = random.randrange(1, 1 << 31)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("stress traffic goes to the loopback only (host %r)" % host)
    sslctx = None
    if tls:
        sslctx = ssl.create_default_context(cafile=cafile)
        if not verify or not cafile:
            sslctx.check_hostname = False
            sslctx.verify_mode = ssl.CERT_NONE
    ports = list(ports or [port])
    mailboxes = [mailbox, second]
    world = World(seed, max_errors, fresh)
    hint = "stress.py --host %s %s --user %s --password ... --seconds %s --clients %d%s --mailbox %s " \
        "--second %s%s" % (host, " ".join("--port %d" % p for p in ports), user, seconds, clients,
                           " --tls" if tls else "", mailbox, second, "" if fresh else " --stale")
    try:
        setup(world, host, ports[0], user, password, tls, sslctx, mailboxes)
    except Fatal as e:
        world.error(None, "setup: %s" % e)
        return Result(world, seconds, clients, hint)
    if world.errors:
        return Result(world, seconds, clients, hint)
    world.stats.clear()
    end = time.monotonic() + seconds
    allowed = set(commands) if commands is not None else None
    for i in range(clients):
        c = Client(world, i, host, ports[i % len(ports)], user, password, tls, sslctx, mailboxes,
                   random.Random(seed * 1000 + i), end, allowed)
        world.clients.append(c)
    for c in world.clients:
        c.thread = threading.Thread(target=c.main, name="stress-" + c.label, daemon=True)
        c.thread.start()
    for c in world.clients:
        c.thread.join(max(0, end - time.monotonic()) + 4 * TIMEOUT)
        if c.thread.is_alive():
            world.error(c, "did not stop within %.0fs of the end" % (4 * TIMEOUT))
            if c.wire is not None:
                c.wire.close()
            c.thread.join(TIMEOUT)
    world.finish()
    return Result(world, seconds, clients, hint)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, action="append",
                    help="repeat to spread the connections over several servers/proxies")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--tls", action="store_true", help="implicit TLS")
    ap.add_argument("--cafile", help="verify the server certificate against this CA")
    ap.add_argument("--mailbox", default="INBOX")
    ap.add_argument("--second", default="Stress")
    ap.add_argument("--stale", action="store_true",
                    help="the server may be stale (stale_imapd.py): no freshness checks")
    ap.add_argument("--max-errors", type=int, default=200)
    ap.add_argument("--show-errors", type=int, default=40, help="errors listed in the report")
    ap.add_argument("--quiet", action="store_true", help="no stats line")
    a = ap.parse_args(argv)
    res = run(a.host, a.port[0], a.user, a.password, seconds=a.seconds, clients=a.clients,
              seed=a.seed, tls=a.tls, cafile=a.cafile, mailbox=a.mailbox, second=a.second,
              ports=a.port, fresh=not a.stale, max_errors=a.max_errors)
    print(res.report(a.show_errors))
    if not a.quiet:
        s = res.stats
        print("stats: " + ", ".join("%s %d" % (k, v) for k, v in sorted(s.items())))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
