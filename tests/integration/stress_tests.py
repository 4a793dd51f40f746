"""Model-checked multi-connection stress (issue 13, part 3): stress.py's
connections of one user ("stress", its own account) send random and
pipelined commands and check every response against an RFC model of their
selected mailbox (see stress.py's docstring for what is checked).

  1. directly against Dovecot: proves the checker (0 errors); runs in
     --direct mode too;
  2. through imapfresh with memory state;
  3. through two imapfresh instances sharing a Redis (state = redis://),
     the connections spread over both;
  4. through imapfresh in front of the stale fixture (stale_imapd.py): only
     protocol-level meaning is checked there (numbers and UIDs consistent,
     EXPUNGE placement, no wrong message flagged or expunged), not freshness.

Each runs IMAPFRESH_STRESS_SECONDS (default 10) with a fixed seed
(IMAPFRESH_STRESS_SEED, default 13); a failure prints the seed, the errors
by kind and every connection's last exchanges. Longer runs: see
tests/README.md (stress.py --seconds 600 --clients 8 --seed N).
"""

import os

import servers
import stale_imapd
import stress
import tap
from servers import HOST, DEFAULT_USERS as USERS
from tap import test

SECONDS = float(os.environ.get("IMAPFRESH_STRESS_SECONDS", "10"))
SEED = int(os.environ.get("IMAPFRESH_STRESS_SEED", "13"))
CLIENTS = int(os.environ.get("IMAPFRESH_STRESS_CLIENTS", "5"))
USER = "stress"
DEADLINE = int(SECONDS) + 120       # setup, the run, LOGOUTs, socket deadlines


def _run(ctx, port, second, tls=False, ports=None, fresh=True):
    res = stress.run(HOST, port, USER, USERS[USER], seconds=SECONDS, clients=CLIENTS, seed=SEED,
                     tls=tls, cafile=ctx.env.ca if tls else None, mailbox="INBOX", second=second,
                     ports=ports, fresh=fresh)
    if res.errors:
        raise AssertionError(res.report())
    tap.diag(res.summary())
    return res


@test("stress: direct against Dovecot", timeout=DEADLINE)
def t_stress_direct(ctx):
    _run(ctx, ctx.env.dovecot.port, "Stress")


@test("stress: through imapfresh, memory state", proxy_only=True, timeout=DEADLINE)
def t_stress_memory(ctx):
    p = ctx.proxy("stress-memory")
    _run(ctx, p.tls_port, "Stress-memory", tls=True)


@test("stress: through imapfresh, Redis state", proxy_only=True, timeout=DEADLINE)
def t_stress_redis(ctx):
    redis = servers.Redis(os.path.join(ctx.env.tmp, "redis-stress-%d" % id(ctx)))
    redis.start()
    ctx.closers.append(lambda: redis.proc and redis.stop())
    common = [("state", redis.url), ("redis_prefix", "stress:")]
    a = ctx.proxy("stress-redis-a", options=common + [("instance_id", "stress-a")])
    b = ctx.proxy("stress-redis-b", options=common + [("instance_id", "stress-b")])
    _run(ctx, a.tls_port, "Stress-redis", tls=True, ports=[a.tls_port, b.tls_port])


@test("stress: stale fixture through imapfresh", proxy_only=True, timeout=DEADLINE)
def t_stress_stale(ctx):
    server = stale_imapd.StaleServer(users=dict(USERS))
    port = server.start()
    ctx.closers.append(server.stop)
    p = ctx.proxy("stress-stale", upstream="%s:%d" % (HOST, port))
    _run(ctx, p.tls_port, "Stress", tls=True, fresh=False)
