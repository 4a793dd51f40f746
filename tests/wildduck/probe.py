#!/usr/bin/env python3
"""Observe a WildDuck bed (bed.py) by hand: the Redis messages WildDuck
publishes for APPEND/COPY/MOVE/STORE over IMAP and for API uploads/moves, and
the stale-mailbox scenario of zone-eu/wildduck#708 (a message moved into a
mailbox that another connection has selected is invisible to that connection
until it sends NOOP/IDLE).

  python3 tests/wildduck/probe.py [events] [stale] [--delays 0,50,100,200,500]

Starts its own bed (and stops it), prints transcripts with milliseconds.
Standard library only; everything on 127.0.0.1.
"""

import argparse
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bed as bedmod  # noqa: E402

HOST = "127.0.0.1"


class Clock:
    def __init__(self):
        self.t0 = time.monotonic()

    def reset(self):
        self.t0 = time.monotonic()

    def ms(self):
        return (time.monotonic() - self.t0) * 1000.0


CLOCK = Clock()


# ------------------------------------------------------------------ Redis

class RedisSub(threading.Thread):
    """PSUBSCRIBE '*' on a raw socket; collects (ms, channel, payload)."""

    def __init__(self, port, pattern="*"):
        super().__init__(daemon=True)
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.sock.settimeout(None)
        self.f = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self.msgs = []
        pat = pattern.encode()
        self.sock.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pat), pat))
        self.confirmed = threading.Event()
        self.start()

    def _read(self):
        line = self.f.readline()
        if not line:
            raise EOFError
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode("utf-8", "replace")
        if kind == b":":
            return int(rest)
        return rest.decode()

    def run(self):
        try:
            while True:
                m = self._read()
                if isinstance(m, list) and m and m[0] == "psubscribe":
                    self.confirmed.set()
                elif isinstance(m, list) and m and m[0] == "pmessage":
                    with self.lock:
                        self.msgs.append((CLOCK.ms(), m[2], m[3]))
        except (EOFError, OSError, ValueError):
            pass

    def take(self, settle=0.4):
        time.sleep(settle)
        with self.lock:
            out, self.msgs = self.msgs, []
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------- IMAP

class Imap:
    def __init__(self, port, name, log):
        self.name = name
        self.log = log
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.f = self.sock.makefile("rb")
        self.n = 0
        self._line()                       # greeting

    def _line(self):
        line = self.f.readline()
        if not line:
            raise EOFError("%s: connection closed" % self.name)
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        self.log.append("%8.1f %s S: %s" % (CLOCK.ms(), self.name, text))
        return text

    def send(self, text, literal=None):
        """Send one command; returns its tag (read the answer with wait())."""
        self.n += 1
        tag = "%s%d" % (self.name, self.n)
        if literal is None:
            self.log.append("%8.1f %s C: %s %s" % (CLOCK.ms(), self.name, tag, text))
            self.sock.sendall(("%s %s\r\n" % (tag, text)).encode())
            return tag
        head = "%s %s {%d}" % (tag, text, len(literal))
        self.log.append("%8.1f %s C: %s" % (CLOCK.ms(), self.name, head))
        self.sock.sendall(head.encode() + b"\r\n")
        while True:
            if self._line().startswith("+"):
                break
        self.log.append("%8.1f %s C: <%d octets>" % (CLOCK.ms(), self.name, len(literal)))
        self.sock.sendall(literal + b"\r\n")
        return tag

    def wait(self, tag):
        lines = []
        while True:
            l = self._line()
            lines.append(l)
            if l.startswith(tag + " "):
                return lines

    def cmd(self, text, literal=None):
        return self.wait(self.send(text, literal))

    def close(self):
        try:
            self.cmd("LOGOUT")
        except (OSError, EOFError):
            pass
        self.sock.close()


def message(subject):
    return ("From: probe@example.com\r\nTo: probe@example.com\r\n"
            "Subject: %s\r\nMessage-ID: <%s.%f@probe>\r\n\r\nbody of %s\r\n"
            % (subject, subject, time.time(), subject)).encode()


def appenduid(lines):
    for l in lines:
        if "[APPENDUID " in l:
            return int(l.split("[APPENDUID ")[1].split("]")[0].split()[1])
    raise AssertionError("no APPENDUID in %r" % lines)


def uids_in(lines):
    out = []
    for l in lines:
        if l.startswith("* ") and " FETCH (" in l and "UID " in l:
            out.append(int(l.split("UID ")[1].split()[0].rstrip(")")))
    return out


def dump(log, title):
    print("\n--- %s" % title)
    for l in log:
        print(l)
    del log[:]


def show_events(sub, what):
    msgs = sub.take()
    print("  redis after %s: %d message(s)" % (what, len(msgs)))
    for ms, ch, payload in msgs:
        print("    %8.1f ms  %s  %s" % (ms, ch, payload))
    return msgs


# ------------------------------------------------------------- scenarios

def events(b):
    print("\n=============== Redis messages (PSUBSCRIBE *) ===============")
    uid = b.create_user("probe", "probe-pw")
    print("POST /users probe -> id %s" % uid)
    print("GET /users/resolve/probe ->", b.api("GET", "/users/resolve/probe"))
    print("GET /users/resolve/nobody ->", b.api("GET", "/users/resolve/nobody"))
    sub = RedisSub(b.redis_port)
    sub.confirmed.wait(5)
    log = []
    CLOCK.reset()
    a = Imap(b.imap_port, "A", log)
    a.cmd("LOGIN probe probe-pw")
    show_events(sub, "LOGIN")
    a.cmd('CREATE "Archive"')
    show_events(sub, "CREATE Archive")
    a.cmd("SELECT INBOX")
    show_events(sub, "SELECT INBOX")
    dump(log, "A: LOGIN/CREATE/SELECT")
    boxes = b.mailboxes(uid)
    print("mailboxes:", boxes)

    CLOCK.reset()
    u1 = appenduid(a.cmd("APPEND INBOX", message("m1")))
    dump(log, "A: APPEND INBOX")
    show_events(sub, "IMAP APPEND (INBOX selected on this connection)")

    CLOCK.reset()
    a.cmd("UID STORE %d +FLAGS (\\Flagged)" % u1)
    dump(log, "A: UID STORE")
    show_events(sub, "IMAP UID STORE +FLAGS")

    CLOCK.reset()
    a.cmd("UID COPY %d Archive" % u1)
    dump(log, "A: UID COPY")
    show_events(sub, "IMAP UID COPY INBOX -> Archive")

    CLOCK.reset()
    a.cmd("UID MOVE %d Archive" % u1)
    dump(log, "A: UID MOVE")
    show_events(sub, "IMAP UID MOVE INBOX -> Archive")

    CLOCK.reset()
    st, res = b.api("POST", "/users/%s/mailboxes/%s/messages" % (uid, boxes["INBOX"]),
                    raw=message("api1"))
    print("\nPOST /users/:id/mailboxes/INBOX/messages (message/rfc822) ->", st, res)
    show_events(sub, "API upload to INBOX")
    dump(log, "A (INBOX selected) during API upload")

    msg = res["message"]["id"]
    CLOCK.reset()
    st, res = b.api("PUT", "/users/%s/mailboxes/%s/messages/%s" % (uid, boxes["INBOX"], msg),
                    {"moveTo": boxes["Archive"]})
    print("\nPUT /users/:id/mailboxes/INBOX/messages/%s {moveTo: Archive} -> %s %s"
          % (msg, st, res))
    show_events(sub, "API move INBOX -> Archive")
    dump(log, "A (INBOX selected) during API move")

    CLOCK.reset()
    a.cmd("NOOP")
    dump(log, "A: NOOP")

    CLOCK.reset()
    a.cmd('CREATE "Scratch"')
    show_events(sub, "IMAP CREATE Scratch")
    a.cmd('DELETE "Scratch"')
    show_events(sub, "IMAP DELETE Scratch")
    dump(log, "A: CREATE/DELETE Scratch")

    CLOCK.reset()
    st, res = b.api("PUT", "/users/%s/logout" % uid, {"reason": "probe logout"})
    print("\nPUT /users/:id/logout -> %s %s" % (st, res))
    show_events(sub, "API logout")
    try:
        a.cmd("NOOP")
    except (OSError, EOFError) as e:
        log.append("A: %s" % e)
    dump(log, "A after API logout")
    a.sock.close()
    sub.close()


def stale(b, delays):
    print("\n=============== stale scenario (zone-eu/wildduck#708) ===============")
    uid = b.create_user("stale", "stale-pw")
    boxes_made = False
    log = []
    results = []
    for via in ("imap", "api"):
        for delay in delays:
            CLOCK.reset()
            a = Imap(b.imap_port, "A", log)
            bb = Imap(b.imap_port, "B", log)
            a.cmd("LOGIN stale stale-pw")
            bb.cmd("LOGIN stale stale-pw")
            if not boxes_made:
                bb.cmd('CREATE "Archive"')
                boxes_made = True
            a.cmd("SELECT INBOX")
            u = appenduid(a.cmd("APPEND INBOX", message("stale-%s-%d" % (via, delay))))
            bb.cmd('SELECT "Archive"')
            before = uids_in(bb.cmd("UID FETCH 1:* (FLAGS)"))
            time.sleep(0.3)
            bb.cmd("NOOP")           # settle: nothing pending on B before the move
            dump(log, "setup (%s move, delay %d ms)" % (via, delay)) if delay == delays[0] else log.clear()

            CLOCK.reset()
            if via == "imap":
                mv = a.cmd("UID MOVE %d Archive" % u)
                newuid = None
                for l in mv:
                    if "[COPYUID " in l:
                        newuid = int(l.split("[COPYUID ")[1].split("]")[0].split()[2])
            else:
                boxes = b.mailboxes(uid)
                st, res = b.api("GET", "/users/%s/mailboxes/%s/messages?limit=250" % (uid, boxes["INBOX"]))
                mid = [m["id"] for m in res["results"] if m.get("uid") == u]
                if not mid:
                    mid = [m["id"] for m in res["results"]]
                t = CLOCK.ms()
                st, res = b.api("PUT", "/users/%s/mailboxes/%s/messages/%s"
                                % (uid, boxes["INBOX"], mid[0]), {"moveTo": boxes["Archive"]})
                log.append("%8.1f API: PUT .../messages/%s {moveTo: Archive} -> %s %s (sent at %.1f)"
                           % (CLOCK.ms(), mid[0], st, res, t))
                newuid = None
                for m in res.get("updated") or []:
                    newuid = m[1] if isinstance(m, list) else None
                if newuid is None and isinstance(res.get("id"), list):
                    newuid = res["id"][0][1]
            if delay:
                time.sleep(delay / 1000.0)
            q = bb.cmd('GETQUOTAROOT "Archive"')
            f = bb.cmd("UID FETCH 1:* (FLAGS)")
            seen_early = newuid in uids_in(f) or any(
                l.startswith("* ") and l.endswith(" EXISTS") for l in q + f)
            bb.cmd("NOOP")
            f2 = bb.cmd("UID FETCH 1:* (FLAGS)")
            seen_after = newuid in uids_in(f2)
            time.sleep(0.3)
            log.append("%8.1f (B sleeps 300 ms)" % CLOCK.ms())
            n3 = bb.cmd("NOOP")
            f3 = bb.cmd("UID FETCH 1:* (FLAGS)")
            seen_late = newuid in uids_in(f3)
            title = ("%s move, B waits %d ms: before=%s newuid=%s | B saw it without NOOP: %s"
                     " | after an immediate NOOP: %s | after a NOOP 300 ms later: %s"
                     % (via, delay, before, newuid, seen_early, seen_after, seen_late))
            dump(log, title)
            results.append((via, delay, newuid, seen_early, seen_after, seen_late))
            a.close()
            bb.close()
            log.clear()
    print("\n--- summary: via, B's delay after the move, moved uid, B saw it in GETQUOTAROOT/UID FETCH"
          " without NOOP, after an immediate NOOP, after a NOOP 300 ms later")
    for r in results:
        print("  %-4s %4d ms  uid=%-3s  without NOOP: %-5s  immediate NOOP: %-5s  late NOOP: %s" % r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["events", "stale"])
    ap.add_argument("--delays", default="0,50,100,200,500")
    a = ap.parse_args()
    delays = [int(x) for x in a.delays.split(",") if x != ""]
    b = bedmod.Bed(users={}).start()
    try:
        print("bed: imap %d api %d redis %d mongo %d"
              % (b.imap_port, b.api_port, b.redis_port, b.mongo_port))
        if "events" in a.what:
            events(b)
        if "stale" in a.what:
            stale(b, delays)
    finally:
        b.stop()


if __name__ == "__main__":
    main()
