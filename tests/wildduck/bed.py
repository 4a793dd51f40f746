#!/usr/bin/env python3
"""A throwaway WildDuck 1.46.1 on loopback for imapfresh's integration tests.

Standard library only. Three processes, each on a free 127.0.0.1 port, in a
directory the caller owns (or a temporary one):

  congodb    a pure-JS MongoDB wire-protocol server (dist_ts/congodb of the
             npm package @push.rocks/smartmongo 2.2.0), in memory, started by
             congodb-server.mjs; WildDuck 1.46.1 runs on it unpatched
  Redis      redis-server without persistence (servers.Redis)
  WildDuck   node_modules/wildduck/server.js with a generated config: plain
             IMAP (ignoreSTARTTLS), the HTTP API without access control, no
             POP3/LMTP/ACME/webhooks, its Redis and MongoDB the two above

The npm tree is pinned by package.json + package-lock.json beside this file
and installed on demand into ./node_modules (git-ignored):

  npm ci --ignore-scripts --prefer-offline --no-audit --no-fund
  npm pack @push.rocks/smartmongo@2.2.0   (checked against the sha512 in
                                           package.json's "congodb" field)
  unpack package.json, license and dist_ts/congodb/ of that tarball into
  node_modules/@push.rocks/smartmongo/

A plain `npm install @push.rocks/smartmongo@2.2.0` fails (ETARGET: its
dependency tree wants @push.rocks/lik@^6.4.1, which is not published), so the
tarball is unpacked instead and congodb's runtime dependencies (bson, mingo,
@push.rocks/smartfs, smartpath, smartpromise, smartrx) are pinned in
package.json. A stamp file makes a second install a no-op.

Environment:
  IMAPFRESH_NPM_CACHE      npm cache directory (default: npm's own, ~/.npm);
                           keep it between CI runs to skip the downloads
  IMAPFRESH_WILDDUCK_LOG   WildDuck's log level (default "info"; "silly"
                           logs every IMAP command)
  IMAPFRESH_KEEP_BED_DIR   set: keep the temporary directory (logs, config)
                           that a Bed without d= removes at stop()
  IMAPFRESH_TEST_PIDFILE   as for servers.py: every pid started is appended

Python use:

  sys.path.insert(0, "tests/wildduck"); import bed
  b = bed.Bed().start()          # installs if needed, creates DEFAULT_USERS
  b.imap_port, b.api_port, b.redis_port, b.mongo_port, b.user_ids["alice"]
  uid = b.create_user("dave", "dave-pw")  ->  WildDuck user id (24 hex)
  b.resolve("dave")              ->  the same id (None if unknown)
  b.api("PUT", "/users/%s/mailboxes/%s/messages/%s" % ..., {"moveTo": ...})
  b.stop()

CLI:

  bed.py install                 install the npm tree (no-op when present)
  bed.py [--keep] [--dir D] [--user NAME:PASS]... [--imap-port P]
         [--api-port P] [--redis-port P] [--mongo-port P] [--set KEY=VALUE]...
      start the bed, print KEY=VALUE lines ending with READY=1; with --keep
      stay in the foreground until SIGTERM/SIGINT/SIGHUP, else stop at once.
"""

import argparse
import atexit
import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))

import servers  # noqa: E402  (tests/integration/servers.py)
from servers import (FixtureError, HOST, free_port, log_tail,  # noqa: E402
                     spawn, stop_process, wait_ports)

NODE_MODULES = os.path.join(HERE, "node_modules")
WILDDUCK_DIR = os.path.join(NODE_MODULES, "wildduck")
CONGODB_DIR = os.path.join(NODE_MODULES, "@push.rocks", "smartmongo")
CONGODB_SERVER = os.path.join(HERE, "congodb-server.mjs")
STAMP = os.path.join(NODE_MODULES, ".imapfresh-bed-stamp")
LOCK = os.path.join(HERE, ".install.lock")
MIN_NODE = (20, 0)

# The same accounts as the Dovecot fixture, so tests can run on either.
DEFAULT_USERS = dict(servers.DEFAULT_USERS)


# ---------------------------------------------------------------- install

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def congodb_pin():
    """(package, version, integrity) of the tarball congodb comes from."""
    c = _read_json(os.path.join(HERE, "package.json"))["congodb"]
    return c["package"], c["version"], c["integrity"]


def _stamp_value():
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def installed():
    try:
        with open(STAMP) as f:
            ok = f.read().strip() == _stamp_value()
    except OSError:
        return False
    return ok and all(os.path.exists(p) for p in (
        os.path.join(WILDDUCK_DIR, "server.js"),
        os.path.join(CONGODB_DIR, "dist_ts", "congodb", "index.js")))


def missing():
    """Why the bed cannot run here (a string), or None: for skipping tests."""
    for exe, pkg in (("node", "nodejs"), ("npm", "npm"), ("redis-server", "redis-server")):
        if not shutil.which(exe):
            return "%s not installed (Debian: apt-get install %s)" % (exe, pkg)
    try:
        node_version()
    except FixtureError as e:
        return str(e)
    return None


def node_version():
    exe = shutil.which("node")
    if not exe:
        raise FixtureError("node not installed (Debian: apt-get install nodejs npm)")
    out = subprocess.run([exe, "--version"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT).stdout.decode().strip()
    try:
        v = tuple(int(x) for x in out.lstrip("v").split(".")[:2])
    except ValueError:
        raise FixtureError("node --version: unexpected %r" % out)
    if v < MIN_NODE:
        raise FixtureError("node %s is too old (need >= %d.%d)" % ((out,) + MIN_NODE))
    return out


def _npm(args, cwd, log):
    exe = shutil.which("npm")
    if not exe:
        raise FixtureError("npm not installed (Debian: apt-get install npm)")
    argv = [exe] + args + ["--no-audit", "--no-fund", "--prefer-offline"]
    cache = os.environ.get("IMAPFRESH_NPM_CACHE")
    if cache:
        argv += ["--cache", cache]
    env = dict(os.environ)
    env.pop("NODE_ENV", None)          # install the tree the lock file names
    env["npm_config_update_notifier"] = "false"
    r = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = r.stdout.decode("utf-8", "replace")
    if log:
        log.write("$ %s\n%s\n" % (" ".join(argv), out))
        log.flush()
    if r.returncode != 0:
        raise FixtureError("%s failed (%d):\n%s" % (" ".join(argv), r.returncode,
                                                    "\n".join(out.splitlines()[-30:])))
    return out


def _sri_sha512(path):
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _unpack_congodb(tgz, dest):
    """package.json, license and dist_ts/congodb/** of the smartmongo tarball."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf.getmembers():
            name = m.name
            if not name.startswith("package/"):
                continue
            rel = name[len("package/"):]
            if not (rel in ("package.json", "license")
                    or rel.startswith("dist_ts/congodb/")):
                continue
            parts = rel.split("/")
            if ".." in parts or rel.startswith("/") or not m.isfile():
                continue
            out = os.path.join(tmp, *parts)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with tf.extractfile(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not os.path.exists(os.path.join(tmp, "dist_ts", "congodb", "index.js")):
        raise FixtureError("%s: no dist_ts/congodb/index.js" % tgz)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def install(force=False, log=None, quiet=False):
    """Install the pinned npm tree into tests/wildduck/node_modules unless the
    stamp says it is there. Safe to call from several processes at once."""
    if not force and installed():
        return False
    node_version()
    with open(LOCK, "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if not force and installed():
            return False
        t0 = time.monotonic()
        if not quiet:
            print("bed: installing WildDuck npm tree into %s" % NODE_MODULES,
                  file=sys.stderr, flush=True)
        try:
            os.unlink(STAMP)
        except OSError:
            pass
        _npm(["ci", "--ignore-scripts"], HERE, log)
        pkg, ver, integrity = congodb_pin()
        with tempfile.TemporaryDirectory(prefix="congodb-") as td:
            out = _npm(["pack", "%s@%s" % (pkg, ver), "--pack-destination", td,
                        "--json"], td, log)
            tgzs = [f for f in os.listdir(td) if f.endswith(".tgz")]
            if len(tgzs) != 1:
                raise FixtureError("npm pack %s@%s: no tarball\n%s" % (pkg, ver, out))
            tgz = os.path.join(td, tgzs[0])
            got = _sri_sha512(tgz)
            if got != integrity:
                raise FixtureError("npm pack %s@%s: integrity %s, expected %s"
                                   % (pkg, ver, got, integrity))
            _unpack_congodb(tgz, CONGODB_DIR)
        with open(STAMP, "w") as f:
            f.write(_stamp_value() + "\n")
        if not quiet:
            print("bed: installed in %.1fs" % (time.monotonic() - t0),
                  file=sys.stderr, flush=True)
    return True


# -------------------------------------------------------------------- bed

def _toml_str(s):
    return json.dumps(str(s))        # a JSON string is a valid TOML basic string


class Bed:
    """congodb + Redis + WildDuck on loopback; see the module doc."""

    def __init__(self, d=None, users=None, imap_port=None, api_port=None,
                 redis_port=None, mongo_port=None, log_level=None, options=None):
        self._own_dir = d is None
        self.dir = os.path.abspath(d) if d else tempfile.mkdtemp(prefix="wildduck-bed-")
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.imap_port = imap_port or free_port()
        self.api_port = api_port or free_port()
        self.redis_port = redis_port or free_port()
        self.mongo_port = mongo_port or free_port()
        self.log_level = log_level or os.environ.get("IMAPFRESH_WILDDUCK_LOG", "info")
        self.conf = os.path.join(self.dir, "wildduck.toml")
        self.log = os.path.join(self.dir, "wildduck.log")
        self.mongo_log = os.path.join(self.dir, "congodb.log")
        # Extra WildDuck settings as dotted keys, e.g. {"imap.maxConnections": 100},
        # passed as --key=value (wild-config deep-merges them over the file).
        self.options = dict(options or {})
        self.redis = servers.Redis(os.path.join(self.dir, "redis"), self.redis_port)
        self.mongo_proc = None
        self.proc = None
        self.user_ids = {}
        self._atexit = False

    # --- config
    def config_text(self):
        lines = [
            "# generated by tests/wildduck/bed.py",
            "processes = 1",
            "[dbs]",
            "mongo = %s" % _toml_str("mongodb://%s:%d/wildduck" % (HOST, self.mongo_port)),
            "redis = %s" % _toml_str("redis://%s:%d/3" % (HOST, self.redis_port)),
            "[log]",
            "level = %s" % _toml_str(self.log_level),
            "[imap]",
            "enabled = true",
            "host = %s" % _toml_str(HOST),
            "port = %d" % self.imap_port,
            "secure = false",
            "ignoreSTARTTLS = true",
            "[pop3]",
            "enabled = false",
            "[lmtp]",
            "enabled = false",
            "[api]",
            "enabled = true",
            "host = %s" % _toml_str(HOST),
            "port = %d" % self.api_port,
            "secure = false",
            "[api.accessControl]",
            "enabled = false",
            "[acme.agent]",
            "enabled = false",
            "[webhooks]",
            "enabled = false",
        ]
        return "\n".join(lines) + "\n"

    # --- lifecycle
    def start(self, deadline=60.0):
        install()
        os.makedirs(self.dir, exist_ok=True)
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline):
        end = time.monotonic() + deadline
        self.mongo_proc = spawn(["node", CONGODB_SERVER, "--host", HOST,
                                 "--port", str(self.mongo_port)], self.mongo_log,
                                cwd=HERE)
        self.redis.start()
        wait_ports([self.mongo_port], self.mongo_proc, max(1.0, end - time.monotonic()),
                   "congodb", self.mongo_log)
        with open(self.conf, "w") as f:
            f.write(self.config_text())
        env = dict(os.environ)
        # wild-config reads config/default.toml (+ config/$NODE_ENV.*) below
        # the cwd, then --config, then appconf_* variables: drop those.
        env["NODE_ENV"] = "development"
        for k in list(env):
            if k.lower().startswith("appconf_") or k in ("NODE_CONFIG_DIR", "NODE_CONFIG_PATH"):
                del env[k]
        argv = ["node", "server.js", "--config=" + self.conf]
        argv += ["--%s=%s" % (k, v) for k, v in self.options.items()]
        self.proc = spawn(argv, self.log, env=env, cwd=WILDDUCK_DIR)
        wait_ports([self.imap_port, self.api_port], self.proc,
                   max(1.0, end - time.monotonic()), "wildduck", self.log)
        self._wait_ready(end)
        for name, pw in self.users.items():
            self.user_ids[name] = self.create_user(name, pw)

    def _wait_ready(self, end):
        last = None
        while True:
            if self.proc.poll() is not None:
                raise FixtureError("wildduck exited with status %s%s"
                                   % (self.proc.returncode, log_tail(self.log)))
            try:
                greeting = self.imap_greeting()
                if greeting.startswith("* OK"):
                    status, body = self.api("GET", "/users?limit=1")
                    if status == 200 and body.get("success"):
                        return
                    last = "API: %s %s" % (status, body)
                else:
                    last = "IMAP greeting %r" % greeting
            except (OSError, ValueError) as e:
                last = repr(e)
            if time.monotonic() > end:
                raise FixtureError("wildduck not ready: %s%s" % (last, log_tail(self.log)))
            time.sleep(0.1)

    def imap_greeting(self, timeout=5.0):
        with socket.create_connection((HOST, self.imap_port), timeout=timeout) as s:
            return s.makefile("rb").readline().decode("utf-8", "replace").rstrip("\r\n")

    def alive(self):
        return all(p is not None and p.poll() is None
                   for p in (self.proc, self.mongo_proc, self.redis.proc))

    def stop(self):
        rc = stop_process(self.proc)
        self.proc = None
        self.redis.stop()
        stop_process(self.mongo_proc)
        self.mongo_proc = None
        if self._own_dir and os.path.isdir(self.dir) and not os.environ.get("IMAPFRESH_KEEP_BED_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)
        return rc

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- API
    @property
    def api_url(self):
        return "http://%s:%d" % (HOST, self.api_port)

    def api(self, method, path, body=None, timeout=10.0, raw=None,
            content_type="message/rfc822"):
        """(HTTP status, decoded JSON) of one API call: body is sent as JSON,
        raw (bytes) as is with content_type (e.g. a message upload)."""
        data = None
        headers = {"Accept": "application/json"}
        if raw is not None:
            data = raw
            headers["Content-Type"] = content_type
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw or b"{}")
            except ValueError:
                return e.code, {"error": raw.decode("utf-8", "replace")}

    def create_user(self, name, password, **extra):
        """POST /users; returns the new user's id."""
        body = dict(extra, username=name, password=password)
        status, res = self.api("POST", "/users", body)
        if status != 200 or not res.get("success"):
            raise FixtureError("POST /users %s: %s %s" % (name, status, res))
        self.users[name] = password
        self.user_ids[name] = res["id"]
        return res["id"]

    def resolve(self, name):
        """GET /users/resolve/<name>: the user id, or None if there is none."""
        status, res = self.api("GET", "/users/resolve/%s" % urllib.parse.quote(name, safe=""))
        if status == 200 and res.get("success"):
            return res["id"]
        if status == 404:
            return None
        raise FixtureError("GET /users/resolve/%s: %s %s" % (name, status, res))

    def mailboxes(self, user_id):
        """{path: mailbox id} of a user (GET /users/:id/mailboxes)."""
        status, res = self.api("GET", "/users/%s/mailboxes" % user_id)
        if status != 200 or not res.get("success"):
            raise FixtureError("GET mailboxes: %s %s" % (status, res))
        return {m["path"]: m["id"] for m in res["results"]}

    def info(self):
        d = {"WILDDUCK_PID": self.proc.pid if self.proc else "",
             "IMAP_PORT": self.imap_port, "API_PORT": self.api_port,
             "API_URL": self.api_url, "REDIS_PORT": self.redis_port,
             "MONGO_PORT": self.mongo_port, "DIR": self.dir,
             "WILDDUCK_LOG": self.log}
        for name, uid in self.user_ids.items():
            d["USER_%s" % name] = uid
        return d


# --------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", choices=["start", "install"], default="start")
    ap.add_argument("--keep", action="store_true",
                    help="stay up until SIGTERM/SIGINT/SIGHUP")
    ap.add_argument("--force", action="store_true", help="install: reinstall")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed at exit)")
    ap.add_argument("--user", action="append", default=[], metavar="NAME:PASS",
                    help="account to create (repeatable; default %s)" % ", ".join(DEFAULT_USERS))
    for k in ("imap", "api", "redis", "mongo"):
        ap.add_argument("--%s-port" % k, type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra WildDuck setting, e.g. imap.maxConnections=100")
    a = ap.parse_args(argv)

    if a.cmd == "install":
        try:
            t0 = time.monotonic()
            did = install(force=a.force)
            print("INSTALLED=%d SECONDS=%.1f NODE=%s" % (did, time.monotonic() - t0,
                                                        node_version()))
        except FixtureError as e:
            print("ERROR=%s" % e, flush=True)
            return 1
        return 0

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        if not started:
            raise KeyboardInterrupt

    started = False
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    users = dict(u.split(":", 1) for u in a.user) if a.user else None
    bed = Bed(a.dir, users, a.imap_port or None, a.api_port or None,
              a.redis_port or None, a.mongo_port or None,
              options=dict(o.split("=", 1) for o in a.set))
    t0 = time.monotonic()
    try:
        bed.start()
    except (FixtureError, KeyboardInterrupt) as e:
        bed.stop()
        print("ERROR=%s" % str(e).replace("\n", "\nERROR: "), flush=True)
        return 1
    started = True
    for k, v in bed.info().items():
        print("%s=%s" % (k, v))
    print("START_SECONDS=%.1f" % (time.monotonic() - t0))
    print("READY=1", flush=True)
    rc = 0
    while a.keep and not stopping:
        if not bed.alive():
            print("EXITED=1", flush=True)
            rc = 1
            break
        time.sleep(0.2)
    bed.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
