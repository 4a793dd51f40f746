#!/usr/bin/env python3
"""Fixtures for imapfresh's integration tests and scripts/demo.

Standard library only. Everything listens on 127.0.0.1 and lives in a
directory the caller owns; stop() (or the CLI on SIGTERM/SIGINT) ends every
process this module started.

  Dovecot    throwaway Dovecot (tests/dovecot/dovecot.conf.in), a test CA and
             a server certificate for localhost / 127.0.0.1, passwd-file users
  Redis      redis-server without persistence
  RedisSentinels  a master, a replica and three Redis Sentinels watching them
  Imapfresh  the proxy under test, started with -f and a generated config

CLI (used by scripts/demo, so the demo and the tests share one config):

  servers.py certs   --dir D                       print CA/cert/key paths
  servers.py dovecot --dir D [--port P] [--tls-port Q] [--user NAME:PASS]...
  servers.py redis   --dir D [--port P]
  servers.py free-port

`dovecot` and `redis` start the server, print KEY=VALUE lines ending with
READY=1, and stay in the foreground until SIGTERM/SIGINT, then stop it.
"""

import argparse
import os
import pwd
import re
import grp
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.path.dirname(os.path.dirname(HERE))
DOVECOT_TEMPLATE = os.path.join(SRCDIR, "tests", "dovecot", "dovecot.conf.in")

HOST = "127.0.0.1"

# dovecot and doveadm live in /usr/sbin, which a non-root PATH may lack.
for _d in ("/usr/sbin", "/sbin"):
    if _d not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = os.environ.get("PATH", "") + ":" + _d
GREETING = "imapfresh-test Dovecot ready."

# name -> password. carol's password needs quoting or a literal. stress is
# stress_tests.py's own account (it appends, moves and expunges at random).
DEFAULT_USERS = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "carol": 'se cr"et',
    "stress": "stress-pw",
}


class FixtureError(Exception):
    pass


# ---------------------------------------------------------------- helpers

_ports_given = set()


def free_port():
    """A port that was free a moment ago (bind port 0 on loopback), and not
    given out before in this run: the kernel may hand the same port to two
    binds in a row once the first socket is closed, and two listeners of one
    fixture then collide ("Address already in use")."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError("free_port: no port not given out before")


def free_port_pair():
    """A free port whose next one is free too (a workers = 2 admin endpoint
    serves worker N on the port + N)."""
    while True:
        port = free_port()
        with socket.socket() as s1:
            try:
                s1.bind((HOST, port + 1))
            except OSError:
                continue
        _ports_given.add(port + 1)
        return port


def port_open(port, host=HOST, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_ports(ports, proc=None, deadline=15.0, what="server", log=None):
    """Poll-connect until every port accepts; fail early if proc exits."""
    end = time.monotonic() + deadline
    pending = list(ports)
    while pending:
        if proc is not None and proc.poll() is not None:
            raise FixtureError("%s exited with status %s before listening%s"
                               % (what, proc.returncode, log_tail(log)))
        if port_open(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > end:
            raise FixtureError("%s: port %s not accepting after %.0fs%s"
                               % (what, pending[0], deadline, log_tail(log)))
        time.sleep(0.05)


def log_tail(path, lines=30):
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        data = f.read()[-20000:]
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n--- %s (tail) ---\n%s" % (path, "\n".join(text))


def register_pid(pid):
    """Append to $IMAPFRESH_TEST_PIDFILE so scripts/test can reap leftovers."""
    path = os.environ.get("IMAPFRESH_TEST_PIDFILE")
    if path:
        try:
            with open(path, "a") as f:
                f.write("%d\n" % pid)
        except OSError:
            pass


def spawn(argv, log_path, env=None, cwd=None):
    logf = open(log_path, "ab")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
    finally:
        logf.close()
    register_pid(proc.pid)
    return proc


def stop_process(proc, sig=signal.SIGTERM, timeout=10.0):
    """Signal proc, wait, then SIGKILL its whole process group. Returns rc."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children (Dovecot's) share the new session's process group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(5)
    return proc.returncode


def run_quiet(argv, cwd=None):
    r = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise FixtureError("%s failed (%d): %s" % (" ".join(argv), r.returncode,
                                                   r.stdout.decode(errors="replace")))
    return r


# ------------------------------------------------------------ certificates

def make_certs(d, cn="localhost"):
    """A throwaway CA and a server certificate for localhost and 127.0.0.1,
    made with the openssl CLI. Returns a dict of paths."""
    os.makedirs(d, exist_ok=True)
    p = {k: os.path.join(d, v) for k, v in {
        "ca": "ca.crt", "ca_key": "ca.key", "cert": "server.crt",
        "key": "server.key", "csr": "server.csr", "ext": "server.ext"}.items()}
    if all(os.path.exists(p[k]) for k in ("ca", "cert", "key")):
        return p
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run_quiet(["openssl", "req", "-x509"] + ec + [
        "-keyout", p["ca_key"], "-out", p["ca"], "-days", "3650",
        "-subj", "/CN=imapfresh throwaway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    run_quiet(["openssl", "req"] + ec + [
        "-keyout", p["key"], "-out", p["csr"], "-subj", "/CN=" + cn])
    with open(p["ext"], "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "basicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n")
    run_quiet(["openssl", "x509", "-req", "-in", p["csr"], "-CA", p["ca"],
               "-CAkey", p["ca_key"], "-CAcreateserial", "-out", p["cert"],
               "-days", "3650", "-extfile", p["ext"]])
    for k in ("ca", "cert"):
        os.chmod(p[k], 0o644)
    os.chmod(p["key"], 0o600)
    return p


# ----------------------------------------------------------------- Dovecot

class Dovecot:
    """A Dovecot instance in directory d (created if needed).

    As root, Dovecot refuses to run mail processes as root: login processes
    run as dovenull, internal ones as dovecot, and mail as nobody:nogroup
    (its home directories are chowned to it). Otherwise every process runs as
    the current user."""

    def __init__(self, d, port=None, tls_port=None, users=None,
                 greeting=GREETING):
        self.dir = os.path.abspath(d)
        self.port = port or free_port()
        self.tls_port = tls_port or free_port()
        self.haproxy_port = free_port()     # plaintext, expects a PROXY header
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.greeting = greeting
        self.proc = None
        self.conf = os.path.join(self.dir, "dovecot.conf")
        self.log = os.path.join(self.dir, "dovecot.log")
        self.stdout_log = os.path.join(self.dir, "dovecot.stdout")
        self.certs = None

    def _identities(self):
        if os.geteuid() == 0:
            for name in ("dovenull", "dovecot"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    raise FixtureError("user %r missing (is dovecot-core installed?)" % name)
            nobody = pwd.getpwnam("nobody")
            try:
                gid = grp.getgrnam("nogroup").gr_gid
            except KeyError:
                gid = nobody.pw_gid
            return "dovenull", "dovecot", "dovecot", nobody.pw_uid, gid
        me = pwd.getpwuid(os.getuid()).pw_name
        return me, me, grp.getgrgid(os.getgid()).gr_name, os.getuid(), os.getgid()

    def setup(self):
        if not shutil.which("dovecot"):
            raise FixtureError("dovecot not installed")
        os.makedirs(self.dir, exist_ok=True)
        # Dovecot's unprivileged processes must reach the users file.
        os.chmod(self.dir, 0o755)
        self.certs = make_certs(self.dir)
        login_user, internal_user, internal_group, uid, gid = self._identities()
        home = os.path.join(self.dir, "home")
        os.makedirs(home, exist_ok=True)
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        if os.geteuid() == 0:
            os.chown(home, uid, gid)
        users = os.path.join(self.dir, "users")
        with open(users, "w") as f:
            for name, pw in self.users.items():
                if ":" in name + pw or "\n" in name + pw:
                    raise FixtureError("user/password may not contain ':'")
                f.write("%s:{PLAIN}%s::::::\n" % (name, pw))
        os.chmod(users, 0o644)
        dh = "/usr/share/dovecot/dh.pem"
        values = {
            "DIR": self.dir,
            "PORT": str(self.port),
            "TLS_PORT": str(self.tls_port),
            "HAPROXY_PORT": str(self.haproxy_port),
            "INSTANCE": "imapfresh-test-%d" % self.port,
            "GREETING": self.greeting,
            "LOGIN_USER": login_user,
            "INTERNAL_USER": internal_user,
            "INTERNAL_GROUP": internal_group,
            "MAIL_UID": str(uid),
            "MAIL_GID": str(gid),
            "FIRST_VALID_GID": str(gid if gid > 0 else 1),
            "SSL_DH": ("ssl_dh = <%s" % dh) if os.path.exists(dh) else "",
        }
        with open(DOVECOT_TEMPLATE) as f:
            text = f.read()
        for k, v in values.items():
            text = text.replace("@%s@" % k, v)
        left = [l for l in text.splitlines()
                if not l.lstrip().startswith("#") and re.search(r"@[A-Z_]+@", l)]
        if left:
            raise FixtureError("unfilled placeholder in dovecot.conf: %s" % left[0])
        with open(self.conf, "w") as f:
            f.write(text)
        return self

    def start(self, deadline=20.0):
        if not os.path.exists(self.conf):
            self.setup()
        self.proc = spawn(["dovecot", "-F", "-c", self.conf], self.stdout_log)
        try:
            wait_ports([self.port, self.tls_port], self.proc, deadline, "dovecot",
                       self.log if os.path.exists(self.log) else self.stdout_log)
        except FixtureError as e:
            self.stop()
            raise FixtureError(str(e) + log_tail(self.stdout_log))
        return self

    def stop(self):
        rc = stop_process(self.proc)
        self.proc = None
        return rc

    # --- log helpers
    def log_size(self):
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def log_since(self, offset):
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_log(self, offset, predicate, deadline=5.0):
        """Lines logged after offset; waits until predicate(line) matches one."""
        end = time.monotonic() + deadline
        while True:
            lines = self.log_since(offset).splitlines()
            hits = [l for l in lines if predicate(l)]
            if hits or time.monotonic() > end:
                return hits
            time.sleep(0.05)


# ------------------------------------------------------------------- Redis

def resp_read(f):
    """One RESP reply from a binary file object: bytes, int, None, a list,
    or a RespError."""
    line = f.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest
    if kind == b"-":
        return RespError(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:n]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [resp_read(f) for _ in range(n)]
    raise OSError("not RESP: %r" % line)


class RespError(str):
    pass


def resp_encode(*args):
    req = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        req += b"$%d\r\n%s\r\n" % (len(a), a)
    return req


def resp_command(port, *args, timeout=5, auth=None):
    """One command to a Redis (or Sentinel) on 127.0.0.1:port, its reply
    parsed (resp_read), or None when it cannot be reached. auth: AUTH's
    arguments (["password"] or ["user", "password"]), sent first."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            f = s.makefile("rb")
            if auth:
                s.sendall(resp_encode("AUTH", *auth))
                r = resp_read(f)
                if isinstance(r, RespError):
                    return r
            s.sendall(resp_encode(*args))
            return resp_read(f)
    except OSError:
        return None


class Redis:
    def __init__(self, d, port=None, replicaof=None, args=(), auth=None):
        self.auth = list(auth) if auth else None   # AUTH's arguments for command()
        self.dir = os.path.abspath(d)
        self.port = port or free_port()
        self.replicaof = replicaof      # a master's port: start as its replica
        self.proc = None
        self.log = os.path.join(self.dir, "redis.log")
        self.args = list(args)      # more redis-server options, e.g. ["--rename-command", ...]

    def start(self, deadline=15.0):
        exe = shutil.which("redis-server")
        if not exe:
            raise FixtureError("redis-server not installed")
        os.makedirs(self.dir, exist_ok=True)
        extra = ["--replicaof", HOST, str(self.replicaof)] if self.replicaof else []
        # A replica's first sync: no waiting for more replicas (5 s by default).
        extra += ["--repl-diskless-sync-delay", "0"]
        self.proc = spawn([exe, "--bind", HOST, "--port", str(self.port),
                           "--save", "", "--appendonly", "no",
                           "--dir", self.dir, "--daemonize", "no",
                           "--protected-mode", "yes"] + extra + self.args, self.log)
        wait_ports([self.port], self.proc, deadline, "redis-server", self.log)
        end = time.monotonic() + deadline
        while self.command("PING") != b"+PONG":
            if time.monotonic() > end:
                self.stop()
                raise FixtureError("redis-server does not answer PING" + log_tail(self.log))
            time.sleep(0.05)
        return self

    def command(self, *args):
        """One RESP command (after AUTH with self.auth); returns the first
        reply line (no CRLF) or None."""
        try:
            with socket.create_connection((HOST, self.port), timeout=5) as s:
                f = s.makefile("rb")
                if self.auth:
                    s.sendall(resp_encode("AUTH", *self.auth))
                    f.readline()
                s.sendall(resp_encode(*args))
                return f.readline().rstrip(b"\r\n")
        except OSError:
            return None

    @property
    def url(self):
        return "redis://%s:%d" % (HOST, self.port)

    def stop(self):
        rc = stop_process(self.proc)
        self.proc = None
        return rc

    def kill(self):
        """SIGKILL: gone at once, as in a crash."""
        return stop_process(self.proc, signal.SIGKILL)


class RedisSentinels:
    """A master, one replica of it (replicaof) and three Redis Sentinels
    watching them as `name` (quorum 2), all on 127.0.0.1, for
    state = redis-sentinel://. A master gone for down_after_ms is failed over
    to the replica in a few seconds. start() returns once every sentinel
    knows the replica and the other two sentinels, so a failover can start."""

    def __init__(self, d, name="mymaster", down_after_ms=1000, failover_timeout_ms=2000,
                 master_password=None, sentinel_password=None):
        self.dir = os.path.abspath(d)
        self.name = name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # master_password: requirepass on master and replica (the sentinels
        # and the replica are given it); sentinel_password: the sentinels'.
        self.master_password = master_password
        self.sentinel_password = sentinel_password
        self.sentinel_auth = [sentinel_password] if sentinel_password else None
        args, auth = [], None
        if master_password:
            args = ["--requirepass", master_password, "--masterauth", master_password]
            auth = [master_password]
        self.master = Redis(os.path.join(self.dir, "master"), args=args, auth=auth)
        self.replica = Redis(os.path.join(self.dir, "replica"), replicaof=self.master.port,
                             args=args, auth=auth)
        self.ports = [free_port() for _ in range(3)]
        self.procs = []

    @property
    def url(self):
        return "redis-sentinel://%s/%s" % (
            ",".join("%s:%d" % (HOST, p) for p in self.ports), self.name)

    def sentinel_log(self, i):
        return os.path.join(self.dir, "sentinel-%d.log" % i)

    def _sentinel_argv(self, conf):
        exe = shutil.which("redis-sentinel")
        if exe:
            return [exe, conf]
        exe = shutil.which("redis-server")
        if not exe:
            raise FixtureError("redis-server not installed")
        return [exe, conf, "--sentinel"]

    def start(self, deadline=30.0):
        os.makedirs(self.dir, exist_ok=True)
        self.master.start()
        self.replica.start()
        end = time.monotonic() + deadline
        while b"master_link_status:up" not in (resp_command(self.replica.port, "INFO",
                                                            "replication",
                                                            auth=self.replica.auth) or b""):
            if time.monotonic() > end:
                self.stop()
                raise FixtureError("the replica does not sync" + log_tail(self.replica.log))
            time.sleep(0.05)
        for i, port in enumerate(self.ports):
            d = os.path.join(self.dir, "sentinel-%d" % i)
            os.makedirs(d, exist_ok=True)
            conf = os.path.join(d, "sentinel.conf")     # sentinels rewrite it
            with open(conf, "w") as f:
                f.write("port %d\nbind %s\ndaemonize no\nprotected-mode no\ndir %s\n"
                        "sentinel monitor %s %s %d 2\n"
                        "sentinel down-after-milliseconds %s %d\n"
                        "sentinel failover-timeout %s %d\n"
                        "sentinel parallel-syncs %s 1\n"
                        % (port, HOST, d, self.name, HOST, self.master.port,
                           self.name, self.down_after_ms, self.name,
                           self.failover_timeout_ms, self.name))
                if self.master_password:
                    f.write("sentinel auth-pass %s %s\n" % (self.name, self.master_password))
                if self.sentinel_password:
                    f.write("requirepass %s\n" % self.sentinel_password)
            self.procs.append(spawn(self._sentinel_argv(conf), self.sentinel_log(i)))
        try:
            for i, port in enumerate(self.ports):
                wait_ports([port], self.procs[i], deadline, "redis-sentinel",
                           self.sentinel_log(i))
            while not all(self._ready(p) for p in self.ports):
                if time.monotonic() > end:
                    raise FixtureError("the sentinels do not see each other and the replica"
                                       + log_tail(self.sentinel_log(0)))
                time.sleep(0.1)
        except FixtureError:
            self.stop()
            raise
        return self

    def _ready(self, port):
        replicas = resp_command(port, "SENTINEL", "REPLICAS", self.name, auth=self.sentinel_auth)
        others = resp_command(port, "SENTINEL", "SENTINELS", self.name, auth=self.sentinel_auth)
        if not isinstance(replicas, list) or not isinstance(others, list) or len(others) != 2:
            return False
        for r in replicas:
            h = dict(zip(r[0::2], r[1::2]))
            if h.get(b"port") == str(self.replica.port).encode() and h.get(b"flags") == b"slave" \
                    and h.get(b"master-link-status") == b"ok":
                return True
        return False

    def master_port(self, i=0):
        """The master's port as sentinel i names it (None if it cannot say)."""
        r = resp_command(self.ports[i], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name,
                         auth=self.sentinel_auth)
        return int(r[1]) if isinstance(r, list) and len(r) == 2 else None

    def stop(self):
        for p in self.procs:
            stop_process(p)
        self.procs = []
        for r in (self.replica, self.master):
            if r.proc is not None:
                r.stop()


# --------------------------------------------------------------- imapfresh

# What AddressSanitizer, LeakSanitizer and UBSan print; any of them in an
# imapfresh log fails the test that stops it (scripts/test runs the suite in
# an --enable-asan build too).
SANITIZER_MARKS = (b"ERROR: AddressSanitizer", b"ERROR: LeakSanitizer", b"runtime error:")


class SanitizerError(AssertionError):
    pass


def sanitizer_report(path, lines=40):
    """The first sanitizer report in a log file (up to `lines` lines), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    hits = [data.find(m) for m in SANITIZER_MARKS]
    hits = [i for i in hits if i >= 0]
    if not hits:
        return None
    start = data.rfind(b"\n", 0, min(hits)) + 1
    text = data[start:].decode("utf-8", "replace").splitlines()
    return "\n".join(text[:lines])


class Imapfresh:
    """One proxy instance: -f, a generated config file (-c) holding the
    listeners, certificate and upstream, and extra keys as -o overrides."""

    def __init__(self, binary, d, upstream, cert, key, upstream_tls="none",
                 options=None, listen=True, listen_tls=True, name="imapfresh"):
        self.binary = binary
        self.dir = os.path.abspath(d)
        self.name = name
        self.port = free_port() if listen else None
        self.tls_port = free_port() if listen_tls else None
        # Each instance its own admin endpoint: the default 127.0.0.1:8143
        # would clash between instances (None: leave admin_listen at its default).
        self.admin_port = free_port()
        self.upstream = upstream
        self.upstream_tls = upstream_tls
        self.cert, self.key = cert, key
        self.options = list(options or [])
        self.proc = None
        self.env = None         # the process environment; None = ours
        self.conf = os.path.join(self.dir, name + ".conf")
        self.log = os.path.join(self.dir, name + ".log")
        self.pid_file = os.path.join(self.dir, name + ".pid")

    def config_text(self):
        lines = ["# generated by tests/integration/servers.py"]
        if self.port:
            lines.append("listen = %s:%d" % (HOST, self.port))
        if self.tls_port:
            lines.append("listen_tls = %s:%d" % (HOST, self.tls_port))
        if self.admin_port:
            lines.append("admin_listen = %s:%d" % (HOST, self.admin_port))
        if self.cert:
            lines += ["tls_cert = " + self.cert, "tls_key = " + self.key]
        lines += ["upstream = " + self.upstream,
                  "upstream_tls = " + self.upstream_tls,
                  "log_level = " + os.environ.get("IMAPFRESH_TEST_LOG_LEVEL", "info"),
                  "pid_file = " + self.pid_file]
        return "\n".join(lines) + "\n"

    def argv(self):
        argv = [self.binary, "-f", "-c", self.conf]
        for k, v in self.options:
            argv += ["-o", "%s=%s" % (k, v)]
        return argv

    def start(self, deadline=15.0):
        os.makedirs(self.dir, exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(self.config_text())
        self.proc = spawn(self.argv(), self.log, env=self.env)
        ports = [p for p in (self.port, self.tls_port) if p]
        try:
            wait_ports(ports, self.proc, deadline, self.name, self.log)
        except FixtureError:
            self.stop()
            raise
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        """Exit status, or None if still running after timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """Stop it; raises SanitizerError when its log holds a sanitizer or
        leak report (ASan/UBSan builds report at exit, leaks included)."""
        rc = stop_process(self.proc)
        report = sanitizer_report(self.log)
        if report:
            raise SanitizerError("%s (exit status %s): sanitizer report in its log:\n%s"
                                 % (self.name, rc, report))
        return rc

    def log_tail(self, lines=30):
        return log_tail(self.log, lines)


# --------------------------------------------------------------------- CLI

def _serve_forever(server, info):
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        server.start()
    except FixtureError as e:
        print("ERROR=%s" % str(e).replace("\n", "\nERROR: "), flush=True)
        return 1
    for k, v in info().items():
        print("%s=%s" % (k, v))
    print("READY=1", flush=True)
    while not stopping:
        if server.proc.poll() is not None:
            print("EXITED=%s" % server.proc.returncode, flush=True)
            return 1
        time.sleep(0.2)
    server.stop()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs", help="make a test CA and a localhost certificate")
    c.add_argument("--dir", required=True)
    d = sub.add_parser("dovecot", help="run a throwaway Dovecot until SIGTERM/SIGINT")
    d.add_argument("--dir", required=True)
    d.add_argument("--port", type=int, default=0)
    d.add_argument("--tls-port", type=int, default=0)
    d.add_argument("--user", action="append", default=[], metavar="NAME:PASS",
                   help="account (repeatable; default alice/bob/carol)")
    r = sub.add_parser("redis", help="run a redis-server until SIGTERM/SIGINT")
    r.add_argument("--dir", required=True)
    r.add_argument("--port", type=int, default=0)
    sub.add_parser("free-port", help="print a free loopback port")
    a = ap.parse_args(argv)

    if a.cmd == "free-port":
        print(free_port())
        return 0
    if a.cmd == "certs":
        p = make_certs(a.dir)
        print("CA=%s\nCERT=%s\nKEY=%s" % (p["ca"], p["cert"], p["key"]))
        return 0
    if a.cmd == "dovecot":
        users = None
        if a.user:
            users = dict(u.split(":", 1) for u in a.user)
        dc = Dovecot(a.dir, a.port or None, a.tls_port or None, users)
        try:
            dc.setup()
        except FixtureError as e:
            print("ERROR=%s" % e, flush=True)
            return 1
        return _serve_forever(dc, lambda: {
            "DOVECOT_PID": dc.proc.pid, "DOVECOT_PORT": dc.port,
            "DOVECOT_TLS_PORT": dc.tls_port, "DOVECOT_CONF": dc.conf,
            "DOVECOT_LOG": dc.log, "CA": dc.certs["ca"]})
    if a.cmd == "redis":
        rd = Redis(a.dir, a.port or None)
        return _serve_forever(rd, lambda: {
            "REDIS_PID": rd.proc.pid, "REDIS_PORT": rd.port, "REDIS_URL": rd.url})
    return 2


if __name__ == "__main__":
    sys.exit(main())
