"""A small TAP runner: each test is a function; an exception fails just that
test; a per-test deadline turns a hang into one failure; the plan is printed
at the end.

    @test("name", timeout=60, proxy_only=True)
    def t_something(ctx): ...

ctx is whatever make_ctx() returns for each test; it must have a cleanup()
method (closing sockets, stopping per-test processes) that the runner calls
after the test, and also when the test overran its deadline, so the test's
thread unblocks.
"""

import sys
import threading
import time
import traceback

TESTS = []
REPEAT_LINES = 60     # of a failure's message, repeated after its logs


class Skip(Exception):
    """raise Skip("reason") inside a test to skip it."""


def test(name, timeout=60, proxy_only=False, direct_only=False):
    def deco(fn):
        TESTS.append({"name": name, "fn": fn, "timeout": timeout,
                      "proxy_only": proxy_only, "direct_only": direct_only})
        return fn
    return deco


def out(line=""):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def diag(text):
    for l in str(text).splitlines() or [""]:
        out("# " + l)


def _name(s):
    # '#' would start a TAP directive inside a description.
    return s.replace("#", "no.")


def run(make_ctx, mode_direct=False, select=None, on_failure=None):
    """Run every registered test (those whose name contains select, if
    given). Returns (passed, failed, skipped)."""
    n = passed = failed = skipped = 0
    for t in TESTS:
        if select and not any(s in t["name"] for s in select):
            continue
        n += 1
        name = _name(t["name"])
        if mode_direct and t["proxy_only"]:
            out("ok %d - %s # SKIP needs imapfresh (direct mode)" % (n, name))
            skipped += 1
            continue
        if not mode_direct and t["direct_only"]:
            out("ok %d - %s # SKIP direct mode only" % (n, name))
            skipped += 1
            continue
        result = {}
        ctx = None
        started = time.monotonic()
        try:
            ctx = make_ctx(t)
        except Exception as e:  # fixture trouble fails this test only
            result["error"] = "fixture: %s" % e
            result["tb"] = traceback.format_exc()

        def body():
            try:
                t["fn"](ctx)
                result["ok"] = True
            except Skip as e:
                result["skip"] = str(e)
            except BaseException as e:
                result["error"] = "%s: %s" % (type(e).__name__, e)
                result["tb"] = traceback.format_exc()

        if ctx is not None:
            th = threading.Thread(target=body, name=t["name"], daemon=True)
            th.start()
            th.join(t["timeout"])
            if th.is_alive():
                try:
                    ctx.cleanup()   # closes its sockets: unblocks the thread
                except Exception:
                    pass
                th.join(10)
                late = result.get("error")
                result.clear()
                result["error"] = "timed out after %ds (per-test deadline)%s" % (
                    t["timeout"], "; then: " + late if late else "")
            else:
                try:
                    ctx.cleanup()
                except Exception as e:
                    if "ok" in result:
                        result.pop("ok")
                        result["error"] = "cleanup: %s" % e
        elapsed = time.monotonic() - started
        if "skip" in result:
            out("ok %d - %s # SKIP %s" % (n, name, result["skip"]))
            skipped += 1
        elif result.get("ok"):
            out("ok %d - %s" % (n, name))
            diag("%.2fs" % elapsed) if elapsed > 5 else None
            passed += 1
        else:
            out("not ok %d - %s" % (n, name))
            diag(result.get("error", "unknown failure"))
            tb = result.get("tb", "")
            if tb:
                diag("\n".join(tb.rstrip().splitlines()[-12:]))
            if on_failure and ctx is not None:
                try:
                    diag(on_failure(ctx))
                except Exception as e:
                    diag("(collecting logs failed: %s)" % e)
                # The logs are long and a CI excerpt shows a failure's tail:
                # say what failed once more, after them.
                head = result.get("error", "unknown failure").splitlines()[:REPEAT_LINES]
                diag("not ok %d, once more after the logs:\n%s" % (n, "\n".join(head)))
            diag("%.2fs" % elapsed)
            failed += 1
    out("1..%d" % n)
    return passed, failed, skipped
