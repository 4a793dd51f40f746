#!/usr/bin/env python3
"""The Debian package (debian/, README "Debian package"), end to end, as TAP.

Builds it with dpkg-buildpackage from a clean copy of the source tree (the
checkout and its build directories are left alone), runs lintian (an E: tag
fails), installs the .deb with apt-get, checks what it put where (user,
ownership, conffiles, unit, logrotate), runs the installed /usr/sbin/imapfresh
with the shipped /etc/imapfresh/imapfresh.conf in front of a throwaway Dovecot
(tests/integration/servers.py) for LOGIN, SELECT and LOGOUT over TLS, asks the
installed imapfresh-ctl about the live session, rotates its trace file with
the shipped logrotate file, reinstalls, and purges.

Installing needs root. Without root, or when an imapfresh package is already
installed on this machine (it is never touched then), the .deb is unpacked
with dpkg -x into the scratch directory instead and the binary runs from
there; the checks that need the real installation are skipped.

    debian_package.py [--keep]       (run by tests/debian.test)

IMAPFRESH_TEST_TMP: where the scratch directory goes (scripts/test sets it).
"""

import argparse
import grp
import gzip
import imaplib
import os
import pwd
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "integration"))

import servers  # noqa: E402
from servers import HOST  # noqa: E402

CONF = "/etc/imapfresh/imapfresh.conf"
LOGDIR = "/var/log/imapfresh"
POLICY = "/usr/sbin/policy-rc.d"
APT_LOCK = ["-o", "DPkg::Lock::Timeout=300"]

EXPECTED_FILES = [
    "/usr/sbin/imapfresh",
    "/usr/sbin/imapfresh-ctl",
    "/usr/share/man/man8/imapfresh.8.gz",
    "/usr/share/man/man8/imapfresh-ctl.8.gz",
    "/usr/share/man/man5/imapfresh.conf.5.gz",
    CONF,
    "/usr/share/doc/imapfresh/examples/imapfresh.conf.sample",
    "/usr/share/doc/imapfresh/examples/imapfresh.json",
    "/usr/share/doc/imapfresh/examples/imapfresh-alerts.yml",
    "/usr/share/doc/imapfresh/copyright",
    "/lib/systemd/system/imapfresh.service",
    "/etc/logrotate.d/imapfresh",
    LOGDIR + "/",
]
ABSENT_FILES = ["/usr/bin/imapfresh-bench", "/etc/imapfresh/imapfresh.conf.sample"]
CONFFILES = [CONF, "/etc/logrotate.d/imapfresh"]


# ------------------------------------------------------------------ TAP

class Tap:
    def __init__(self):
        self.n = 0
        self.failed = 0

    def out(self, line):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def diag(self, text):
        for line in str(text).splitlines() or [""]:
            self.out("# " + line)

    def ok(self, cond, name, why=""):
        self.n += 1
        name = name.replace("#", "no.")
        if cond:
            self.out("ok %d - %s" % (self.n, name))
        else:
            self.failed += 1
            self.out("not ok %d - %s" % (self.n, name))
            if why:
                self.diag(why)
        return cond

    def skip(self, name, why):
        self.n += 1
        self.out("ok %d - %s # SKIP %s" % (self.n, name.replace("#", "no."), why))

    def check(self, name, fn):
        """One point: fn() returns None (pass) or a failure message; an
        exception fails the point."""
        try:
            msg = fn()
        except Exception as e:  # noqa: BLE001 - any trouble fails this point
            msg = "%s: %s" % (type(e).__name__, e)
        return self.ok(msg is None, name, msg or "")

    def done(self):
        self.out("1..%d" % self.n)


def run(argv, cwd=None, env=None, log=None, timeout=600):
    """Run argv; returns (status, output). Output also goes to log, if given."""
    r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    text = r.stdout.decode("utf-8", "replace")
    if log:
        with open(log, "a") as f:
            f.write("$ %s\n%s\n" % (" ".join(argv), text))
    return r.returncode, text


def tail(text, lines=40):
    """The last lines of a command's output, without apt's progress lines."""
    text = [l for l in text.splitlines() if not l.startswith("(Reading database")]
    return "\n".join(text[-lines:])


def changelog_version():
    with open(os.path.join(SRCDIR, "debian", "changelog")) as f:
        m = re.match(r"imapfresh \(([^)]+)\)", f.readline())
    return m.group(1) if m else None


def configure_version():
    with open(os.path.join(SRCDIR, "configure.ac")) as f:
        m = re.search(r"AC_INIT\(\[imapfresh\], \[([^]]+)\]", f.read())
    return m.group(1) if m else None


# ------------------------------------------------------------ the source copy

def copy_tree(dest):
    """The source tree without build products: what git tracks plus new files
    it does not ignore (uncommitted work included), or, outside a git
    checkout (a release tarball), everything but build directories."""
    os.makedirs(dest)
    files = None
    if shutil.which("git") and os.path.lexists(os.path.join(SRCDIR, ".git")):
        r = subprocess.run(["git", "-C", SRCDIR, "ls-files", "-co", "--exclude-standard", "-z"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            files = [f for f in r.stdout.decode().split("\0")
                     if f and os.path.lexists(os.path.join(SRCDIR, f))]
    if files is not None:
        for f in files:
            src, dst = os.path.join(SRCDIR, f), os.path.join(dest, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
        return "git ls-files (%d files)" % len(files)
    skip = {".git", "build", "node_modules", "autom4te.cache", "__pycache__"}
    shutil.copytree(SRCDIR, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if n in skip])
    if os.path.exists(os.path.join(dest, "config.status")):
        # Configured in place: undo it, or the VPATH build in debian/build refuses.
        run(["make", "-C", dest, "distclean"])
    return "a copy of the tree (no git checkout)"


# ------------------------------------------------------------ installing

class PolicyRcd:
    """/usr/sbin/policy-rc.d saying no, while apt-get runs maintainer scripts:
    the package must not start a service here (it is installed disabled; this
    makes sure of it). Only a file this added is removed."""

    def __enter__(self):
        self.own = False
        if not os.path.exists(POLICY):
            with open(POLICY, "w") as f:
                f.write("#!/bin/sh\n# added by imapfresh tests/debian_package.py\nexit 101\n")
            os.chmod(POLICY, 0o755)
            self.own = True
        return self

    def __exit__(self, *exc):
        if self.own:
            os.unlink(POLICY)


def apt(args, log):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with PolicyRcd():
        return run(["apt-get", "-y", "-q", "--no-install-recommends"] + APT_LOCK + args,
                   env=env, log=log)


def installed_status():
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "imapfresh"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return r.stdout.decode().strip() if r.returncode == 0 else ""


def processes_of(exe):
    """Pids whose executable is exe (other imapfresh builds may be running)."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink("/proc/%s/exe" % p) == exe:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def proc_uid(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return None


def owner(path):
    st = os.lstat(path)
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


# ------------------------------------------------------------ IMAP

def tls_context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False    # the fixture certificate is for localhost
    return ctx


def imap_session(port, ca, hold=None):
    """LOGIN, SELECT INBOX, LOGOUT over implicit TLS; hold(imap) runs while
    the mailbox is selected. Returns a list of problems (empty: all went well)."""
    problems = []
    m = imaplib.IMAP4_SSL(HOST, port, ssl_context=tls_context(ca), timeout=10)
    try:
        typ, _ = m.login("alice", servers.DEFAULT_USERS["alice"])
        if typ != "OK":
            problems.append("LOGIN: %s" % typ)
        typ, data = m.select("INBOX")
        if typ != "OK":
            problems.append("SELECT INBOX: %s %r" % (typ, data))
        if hold is not None and not problems:
            problems += hold(m)
    finally:
        try:
            typ, _ = m.logout()
            if typ != "BYE":
                problems.append("LOGOUT: %s" % typ)
        except (imaplib.IMAP4.error, OSError) as e:
            problems.append("LOGOUT: %s" % e)
    return problems


def wait_for(pred, deadline=15.0, step=0.1):
    end = time.monotonic() + deadline
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


# ------------------------------------------------------------ the test

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()

    tap = Tap()
    base = os.environ.get("IMAPFRESH_TEST_TMP") or None
    tmp = tempfile.mkdtemp(prefix="imapfresh-deb.", dir=base)
    os.chmod(tmp, 0o755)    # Dovecot's unprivileged processes read its files
    log = os.path.join(tmp, "commands.log")
    started = time.monotonic()
    procs = []
    cleanup_dirs = []
    root = os.geteuid() == 0
    preinstalled = installed_status()
    real_install = root and not preinstalled
    installed = False
    try:
        tap.diag("scratch directory %s" % tmp)
        for tool in ("dpkg-buildpackage", "dh", "lintian"):
            if not shutil.which(tool):
                tap.ok(False, "%s installed" % tool, "scripts/test installs it (PACKAGES)")
                return tap

        # --- build ---
        src = os.path.join(tmp, "src", "imapfresh")
        tap.diag("source: %s" % copy_tree(src))
        env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck parallel=2")
        t0 = time.monotonic()
        rc, out = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env,
                      log=os.path.join(tmp, "build.log"))
        tap.diag("dpkg-buildpackage: %.0f s" % (time.monotonic() - t0))
        if not tap.ok(rc == 0, "dpkg-buildpackage -us -uc -b builds the package",
                      "exit status %d\n%s" % (rc, tail(out))):
            return tap
        version = changelog_version()
        deb = os.path.join(tmp, "src", "imapfresh_%s_%s.deb" % (
            version, run(["dpkg", "--print-architecture"])[1].strip()))
        changes = deb[:-4] + ".changes"
        tap.ok(os.path.exists(deb) and os.path.exists(changes), "the .deb and .changes are there",
               "missing %s or %s" % (deb, changes))
        tap.ok(version == configure_version(), "debian/changelog's version is configure.ac's",
               "debian/changelog %s, AC_INIT %s" % (version, configure_version()))

        # --- lintian ---
        t0 = time.monotonic()
        rc, out = run(["lintian", "--info", "--display-info", deb, changes], log=log)
        tap.diag("lintian: %.0f s" % (time.monotonic() - t0))
        tags = [l for l in out.splitlines() if re.match(r"[EWIP]: ", l)]
        for l in tags:
            tap.diag("lintian " + l)
        errors = [l for l in tags if l.startswith("E: ")]
        tap.ok(not errors, "lintian: no errors on the .deb and the .changes", "\n".join(errors))

        # --- contents ---
        rc, out = run(["dpkg-deb", "-c", deb])
        paths = set()
        for line in out.splitlines():
            p = line.split()[-1] if line.split() else ""
            paths.add(p[1:] if p.startswith("./") else p)
        paths = {("/" + p.lstrip("/")) for p in paths}
        missing = [p for p in EXPECTED_FILES if p not in paths]
        extra = [p for p in ABSENT_FILES if p in paths]
        tap.ok(not missing and not extra, "the .deb holds the binaries, man pages, config, unit, logrotate",
               "missing: %s; should not be there: %s" % (missing, extra))
        rc, out = run(["sh", "-c", "dpkg-deb --ctrl-tarfile '%s' | tar -xOf - ./conffiles" % deb])
        conffiles = out.split()
        tap.ok(sorted(conffiles) == sorted(CONFFILES), "conffiles: the configuration and logrotate",
               "conffiles: %s" % conffiles)

        # --- install ---
        if real_install:
            rc, out = apt(["install", deb], log)
            installed = True
            if not tap.ok(rc == 0 and installed_status() == "install ok installed",
                          "apt-get install ./imapfresh.deb", tail(out)):
                return tap
            prefix = ""
        else:
            why = ("an imapfresh package (%s) is installed here; not touching it" % preinstalled
                   if preinstalled else "not root")
            prefix = os.path.join(tmp, "root")
            rc, out = run(["dpkg", "-x", deb, prefix])
            tap.ok(rc == 0, "dpkg -x into a scratch root (%s)" % why, out)
        binary = prefix + "/usr/sbin/imapfresh"
        ctl = prefix + "/usr/sbin/imapfresh-ctl"
        conf = prefix + CONF

        if real_install:
            def user_check():
                pw = pwd.getpwnam("imapfresh")
                gr = grp.getgrnam("imapfresh")
                if pw.pw_gid != gr.gr_gid:
                    return "primary group %d, not imapfresh's %d" % (pw.pw_gid, gr.gr_gid)
                if pw.pw_uid >= 1000:
                    return "uid %d is not a system uid" % pw.pw_uid
                if pw.pw_shell not in ("/usr/sbin/nologin", "/bin/false", "/sbin/nologin"):
                    return "login shell %s" % pw.pw_shell
                return None
            tap.check("postinst: system user and group imapfresh", user_check)
            tap.check("postinst: %s is imapfresh:adm 2750" % LOGDIR, lambda: None
                      if owner(LOGDIR) == ("imapfresh", "adm", 0o2750) else "%s %s" % (LOGDIR, owner(LOGDIR)))
            tap.check("postinst: %s is root:imapfresh 0640" % CONF, lambda: None
                      if owner(CONF) == ("root", "imapfresh", 0o640) else "%s %s" % (CONF, owner(CONF)))
            tap.check("the service is installed disabled and not started", lambda: (
                "enabled: /etc/systemd/system/multi-user.target.wants/imapfresh.service"
                if os.path.lexists("/etc/systemd/system/multi-user.target.wants/imapfresh.service")
                else "running: pids %s" % processes_of(binary) if processes_of(binary) else None))
            rc, out = run(["systemd-analyze", "verify", "/lib/systemd/system/imapfresh.service"])
            tap.ok(rc == 0 and "imapfresh.service" not in out,
                   "systemd-analyze verify imapfresh.service", out)
        else:
            for name in ("postinst: system user and group imapfresh",
                         "postinst: %s is imapfresh:adm 2750" % LOGDIR,
                         "postinst: %s is root:imapfresh 0640" % CONF,
                         "the service is installed disabled and not started",
                         "systemd-analyze verify imapfresh.service"):
                tap.skip(name, "not installed for real")

        def unit_check():
            with open(prefix + "/lib/systemd/system/imapfresh.service") as f:
                unit = f.read()
            want = "ExecStart=/usr/sbin/imapfresh -f -c %s\n" % CONF
            if want not in unit:
                return "no %r in the unit" % want.strip()
            if re.search(r"^LogsDirectory=", unit, re.M):
                return "LogsDirectory= would chown %s to root at every start" % LOGDIR
            return None
        tap.check("the unit runs /usr/sbin/imapfresh with %s" % CONF, unit_check)

        def man_check():
            bad = []
            for page in ("man8/imapfresh.8.gz", "man5/imapfresh.conf.5.gz", "man8/imapfresh-ctl.8.gz"):
                with gzip.open(prefix + "/usr/share/man/" + page, "rt") as f:
                    text = f.read()
                if CONF not in text or re.search(r"/etc/imapfresh\.conf\b", text):
                    bad.append(page)
            return "not the Debian paths: %s" % bad if bad else None
        tap.check("the man pages name %s" % CONF, man_check)

        rc, out = run([binary, "-h"])
        tap.ok(rc == 0 and CONF in out, "imapfresh's default configuration is %s" % CONF, out)
        rc, out = run([binary, "-v"])
        tap.ok(rc == 0 and out.strip() == "imapfresh %s" % version, "imapfresh -v says %s" % version, out)

        # --- the installed binary in front of a throwaway Dovecot ---
        dovecot = servers.Dovecot(os.path.join(tmp, "dovecot"))
        dovecot.setup().start()
        procs.append(dovecot)
        certs = dict(dovecot.certs)
        if real_install:
            # As an operator would: the key readable by the imapfresh user,
            # so that a reload (which loads it again, unprivileged) works.
            keydir = tempfile.mkdtemp(prefix="imapfresh-deb-tls-")
            cleanup_dirs.append(keydir)
            os.chmod(keydir, 0o755)
            pw = pwd.getpwnam("imapfresh")
            for k in ("cert", "key"):
                dst = os.path.join(keydir, os.path.basename(certs[k]))
                shutil.copyfile(certs[k], dst)
                os.chown(dst, pw.pw_uid, pw.pw_gid)
                os.chmod(dst, 0o600)
                certs[k] = dst
        port, tls_port, admin_port = servers.free_port(), servers.free_port(), servers.free_port()
        trace = (LOGDIR if real_install else tmp) + "/trace.log"
        events = (LOGDIR if real_install else tmp) + "/events.log"
        opts = ["listen=", "listen=%s:%d" % (HOST, port),
                "listen_tls=", "listen_tls=%s:%d" % (HOST, tls_port),
                "tls_cert=" + certs["cert"], "tls_key=" + certs["key"],
                "upstream=%s:%d" % (HOST, dovecot.port), "admin_listen=%s:%d" % (HOST, admin_port),
                "trace=all", "trace_file=" + trace, "event_log=" + events]
        if not real_install:
            opts.append("user=")     # stay who we are: no imapfresh user here
        argv_o = []
        for o in opts:
            argv_o += ["-o", o]

        rc, out = run([binary, "-t", "-c", conf] + argv_o)
        tap.ok(rc == 0 and "configuration ok" in out,
               "imapfresh -t accepts the shipped configuration (with a certificate and upstream)", out)

        plog = os.path.join(tmp, "imapfresh.log")
        proxy = servers.spawn([binary, "-f", "-c", conf] + argv_o, plog)
        procs.append(proxy)
        servers.wait_ports([port, tls_port], proxy, 15.0, "imapfresh", plog)

        def ctl_sessions(m):
            rc, out = run([ctl] + (["-c", conf] if prefix else []) +
                          ["-o", "admin_listen=%s:%d" % (HOST, admin_port), "sessions"], log=log)
            if rc != 0 or "alice" not in out:
                return ["imapfresh-ctl sessions (status %d) does not list alice:\n%s" % (rc, out)]
            return []
        problems = imap_session(tls_port, certs["ca"], hold=ctl_sessions)
        tap.ok(not problems, "LOGIN, SELECT, LOGOUT through the installed imapfresh "
               "(imapfresh-ctl lists the session)", "\n".join(problems) + servers.log_tail(plog))

        if real_install:
            uid = pwd.getpwnam("imapfresh").pw_uid
            tap.ok(proc_uid(proxy.pid) == uid, "the daemon runs as the imapfresh user",
                   "uid %s, imapfresh is %d" % (proc_uid(proxy.pid), uid))
        else:
            tap.skip("the daemon runs as the imapfresh user", "not installed for real")

        # A reload reopens the event log, now as the imapfresh user: the file
        # it created as root before dropping privileges must be its own.
        if real_install:
            os.kill(proxy.pid, signal.SIGHUP)
            reloaded = wait_for(lambda: "reloading configuration" in open(plog).read() and
                                open(plog).read())
            tap.ok(reloaded and "reload failed" not in reloaded and
                   owner(events)[0] == "imapfresh",
                   "a reload reopens %s (owned by imapfresh)" % events,
                   "owner %s%s" % (owner(events) if os.path.exists(events) else "-",
                                   servers.log_tail(plog)))
        else:
            tap.skip("a reload reopens %s" % events, "not installed for real")

        def trace_check():
            text = wait_for(lambda: os.path.exists(trace) and "LOGOUT" in open(trace).read() and
                            open(trace).read())
            if not text:
                return "no LOGOUT in %s" % trace
            if servers.DEFAULT_USERS["alice"] in text:
                return "the password is in the trace"
            return None
        tap.check("the trace of the session is in %s, password redacted" % trace, trace_check)

        # --- logrotate: the shipped file rotates the trace; the daemon, now
        # the imapfresh user, opens the new file logrotate created ---
        if real_install and shutil.which("logrotate"):
            state = os.path.join(tmp, "logrotate.state")
            rc, out = run(["logrotate", "-v", "-f", "-s", state, "/etc/logrotate.d/imapfresh"], log=log)
            bad = [l for l in out.splitlines() if l.startswith("error")]
            tap.ok(rc == 0 and not bad and os.path.exists(trace + ".1"),
                   "logrotate rotates %s with /etc/logrotate.d/imapfresh" % trace, out)

            def reopened():
                def noop(m):
                    m.noop()
                    return []
                if imap_session(tls_port, certs["ca"], hold=noop):
                    return None
                return os.path.exists(trace) and "LOGOUT" in open(trace).read()
            ok = wait_for(reopened, deadline=15.0, step=0.2)
            tap.ok(ok and owner(trace)[0] == "imapfresh",
                   "after the rotation the daemon writes a new %s (owned by imapfresh)" % trace,
                   "exists: %s, owner: %s%s" % (os.path.exists(trace),
                                                 owner(trace) if os.path.exists(trace) else "-",
                                                 servers.log_tail(plog)))
        else:
            tap.skip("logrotate rotates %s with /etc/logrotate.d/imapfresh" % trace,
                     "not installed for real" if not real_install else "logrotate not installed")
            tap.skip("after the rotation the daemon writes a new %s" % trace,
                     "not installed for real" if not real_install else "logrotate not installed")

        rc = servers.stop_process(proxy)
        procs.remove(proxy)
        tap.ok(rc == 0, "the daemon stops on SIGTERM with status 0", "status %s%s" % (rc, servers.log_tail(plog)))

        # --- reinstall (postinst with an existing user), then purge ---
        if real_install:
            rc, out = apt(["install", "--reinstall", deb], log)
            tap.ok(rc == 0 and owner(LOGDIR) == ("imapfresh", "adm", 0o2750),
                   "apt-get install --reinstall (postinst again, user already there)", tail(out))
            rc, out = apt(["purge", "imapfresh"], log)
            installed = False
            left = [p for p in ("/usr/sbin/imapfresh", "/etc/imapfresh", LOGDIR,
                                "/etc/logrotate.d/imapfresh", "/lib/systemd/system/imapfresh.service")
                    if os.path.lexists(p)]
            overrides = run(["dpkg-statoverride", "--list"])[1]
            left += [l for l in overrides.splitlines() if "imapfresh" in l]
            tap.ok(rc == 0 and not installed_status() and not left,
                   "apt-get purge leaves nothing behind (but the imapfresh user)",
                   "status %d, left: %s\n%s" % (rc, left, tail(out)))
        else:
            tap.skip("apt-get install --reinstall", "not installed for real")
            tap.skip("apt-get purge leaves nothing behind", "not installed for real")
    except Exception:  # noqa: BLE001 - fixture trouble: one failure, then clean up
        tap.ok(False, "no unexpected error", traceback.format_exc())
    finally:
        for p in procs:
            if isinstance(p, servers.Dovecot):
                p.stop()
            else:
                servers.stop_process(p)
        if installed:
            rc, out = apt(["purge", "imapfresh"], log)
            if rc != 0:
                tap.diag("cleanup: apt-get purge imapfresh failed:\n" + tail(out))
        tap.diag("done in %.0f s" % (time.monotonic() - started))
        for d in cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if a.keep or tap.failed:
            tap.diag("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return tap


if __name__ == "__main__":
    t = main()
    t.done()
    sys.exit(1 if t.failed else 0)
