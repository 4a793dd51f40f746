#!/usr/bin/env python3
"""bench/compressmem.py: resident memory per idle session (LOGIN, SELECT) with and without
COMPRESS=DEFLATE, 200 sessions each, through one imapfresh in front of a fixture Dovecot.
Ad hoc, for issue 16; IMAPFRESH_BIN names the binary (default build/proxy/imapfresh)."""
import os
import sys, zlib, socket, time, shutil
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
import servers
import tempfile
TMP = tempfile.mkdtemp(prefix="compressmem-")
d = servers.Dovecot(os.path.join(TMP, "dc")).setup().start()
def rss(pid):
    for l in open("/proc/%d/status" % pid):
        if l.startswith("VmRSS"): return int(l.split()[1])
def run(compress, n=200):
    p = servers.Imapfresh(os.environ.get("IMAPFRESH_BIN", "build/proxy/imapfresh"), os.path.join(TMP, "px%d" % compress), "127.0.0.1:%d" % d.port, None, None, options=[("require_tls","no"),("log_level","notice")], listen_tls=False, name="px")
    p.start(); time.sleep(0.3)
    base = rss(p.proc.pid); socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", p.port)); s.recv(1000)
        s.sendall(b"L LOGIN bob bob-pw\r\n"); b = b""
        while b"L OK" not in b: b += s.recv(4000)
        if compress:
            s.sendall(b"Z COMPRESS DEFLATE\r\n"); b = b""
            while b"Z OK" not in b: b += s.recv(4000)
            co = zlib.compressobj(6, zlib.DEFLATED, -15)
            s.sendall(co.compress(b"S SELECT INBOX\r\n") + co.flush(zlib.Z_SYNC_FLUSH))
        else:
            s.sendall(b"S SELECT INBOX\r\n")
        time.sleep(0.005)
        socks.append(s)
    time.sleep(1.0)
    used = rss(p.proc.pid) - base
    for s in socks: s.close()
    p.stop()
    return used
a = run(0); b = run(1)
print("per session KiB: plain %.1f, compressed %.1f, difference %.1f" % (a/200, b/200, (b-a)/200))
d.stop()
