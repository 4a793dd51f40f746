#!/usr/bin/env python3
"""contrib/ checked, as TAP: the Prometheus alert rules (promtool check rules,
their unit tests with promtool test rules, a firing and a quiet test for every
alert), the Grafana dashboard's JSON model, every PromQL expression of both
(parsed by promtool), and every metric and label they name against the
/metrics of a live imapfresh started here; then a real Prometheus scrapes
that imapfresh every second, runs every dashboard query (each must return
series: a join on the wrong labels returns none) and evaluates the rules
(none may fail, e.g. on a many-to-one match). Last, the checks are shown to
fail on broken copies (a bad expression, an unknown metric or label value,
an overlapping panel).

    contrib_check.py --binary build/proxy/imapfresh
        [--dashboard F] [--rules F] [--rules-test F]

Needs promtool and prometheus (Debian package prometheus) and PyYAML
(python3-yaml). About 10 s, most of it waiting for three scrapes.
"""

import argparse
import ast
import copy
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "integration"))

import servers  # noqa: E402

TOP = os.path.dirname(HERE)
GRID_COLUMNS = 24
DS_UID = "${DS_PROMETHEUS}"
# Labels Prometheus adds to every series it scrapes; imapfresh does not export them.
TARGET_LABELS = {"instance", "job"}
# Series Prometheus makes itself for each target.
PROMETHEUS_SERIES = {"up"}
# Grafana's own variables, with a value of the right kind for promtool.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
                    "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000"}

# ------------------------------------------------------------------ TAP

_n = [0]
_failed = [0]


def out(line=""):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def point(ok, name, errors=()):
    _n[0] += 1
    out("%s %d - %s" % ("ok" if ok else "not ok", _n[0], name.replace("#", "no.")))
    if not ok:
        _failed[0] += 1
    for e in errors:
        for l in str(e).splitlines():
            out("# " + l)


def check(name, errors):
    """A point that passes when the list of errors is empty."""
    point(not errors, name, errors)


# ------------------------------------------------------------------ PromQL

IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)[a-zA-Z0-9]*")
MATCHER = re.compile(r"""\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*(,|\})""")
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def _skip_string(e, i):
    q = e[i]
    i += 1
    while i < len(e) and e[i] != q:
        i += 2 if e[i] == "\\" and q != "`" else 1
    return i + 1


def _skip_group(e, i, open_c, close_c):
    depth = 0
    while i < len(e):
        c = e[i]
        if c in "\"'`":
            i = _skip_string(e, i)
            continue
        if c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _string_value(s):
    if s[0] == "`":
        return s[1:-1]
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s[1:-1]


def _matchers(e, i):
    """The matchers of the {...} at e[i]: ([(label, op, value)], index past '}')."""
    found = []
    i += 1
    if e[i:].lstrip().startswith("}"):
        return found, e.index("}", i) + 1
    while i < len(e):
        m = MATCHER.match(e, i)
        if not m:   # not a selector this reader understands; promtool judges it
            return found, _skip_group(e, i - 1, "{", "}")
        found.append((m.group(1), m.group(2), _string_value(m.group(3))))
        i = m.end()
        if m.group(4) == "}":
            break
    return found, i


def selectors(expr):
    """Every vector selector of a PromQL expression: [(metric name or None,
    [(label, op, value)])]. Function, aggregation and keyword names, label
    lists (by/on/...), strings, numbers and ranges are skipped."""
    e, i, found = expr, 0, []
    while i < len(e):
        c = e[i]
        if c in "\"'`":
            i = _skip_string(e, i)
        elif c == "[":
            i = _skip_group(e, i, "[", "]")
        elif c.isdigit() or (c == "." and i + 1 < len(e) and e[i + 1].isdigit()):
            i = NUMBER.match(e, i).end()
        elif c == "{":
            ms, i = _matchers(e, i)
            name = next((v for l, op, v in ms if l == "__name__" and op == "="), None)
            found.append((name, [m for m in ms if m[0] != "__name__"]))
        elif IDENT.match(e, i):
            name = IDENT.match(e, i).group()
            j = i + len(name)
            k = j
            while k < len(e) and e[k].isspace():
                k += 1
            low = name.lower()
            if low in LABEL_LIST_KEYWORDS:
                i = _skip_group(e, k, "(", ")") if k < len(e) and e[k] == "(" else j
            elif low in OPERATOR_KEYWORDS or low in AGGREGATIONS or (k < len(e) and e[k] == "("):
                i = j
            elif k < len(e) and e[k] == "{":
                ms, i = _matchers(e, k)
                found.append((name, [m for m in ms if m[0] != "__name__"]))
            else:
                found.append((name, []))
                i = j
        else:
            i += 1
    return found


def promql_errors(exprs, tmpdir):
    """exprs: {where: PromQL}. Each becomes a recording rule of a throwaway
    rules file that promtool check rules parses; its complaints, by where."""
    if not exprs:
        return []
    names = {}
    rules = []
    for n, (where, expr) in enumerate(sorted(exprs.items()), 1):
        rec = "contrib_check_expr_%d" % n
        names[rec] = where
        rules.append({"record": rec, "expr": expr})
    path = os.path.join(tmpdir, "exprs.rules.yml")
    with open(path, "w") as f:
        json.dump({"groups": [{"name": "contrib_check", "rules": rules}]}, f, indent=1)
    rc, text = promtool("check", "rules", path)
    if rc == 0:
        return []
    errors = []
    for line in text.splitlines():
        m = re.search(r'"(contrib_check_expr_\d+)": (.*)', line)
        if m:
            errors.append("%s: %s\n  expr: %s" % (names[m.group(1)], m.group(2),
                                                 exprs[names[m.group(1)]]))
    return errors or ["promtool check rules failed:\n" + text]


def promtool(*args):
    try:
        p = subprocess.run(["promtool"] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120)
    except OSError as e:
        return 127, "promtool: %s" % e
    return p.returncode, p.stdout.decode("utf-8", "replace")


# ------------------------------------------------------------------ the scrape

PROM_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_metrics(text):
    """{series name: [labels dict, ...]} from text format 0.0.4."""
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = PROM_SAMPLE.match(line)
        if not m:
            raise ValueError("not a sample: %r" % line)
        labels = dict((k, v) for k, v, _ in PROM_LABEL.findall(m.group(3) or ""))
        series.setdefault(m.group(1), []).append(labels)
    return series


def start_imapfresh(binary, tmpdir):
    """An imapfresh whose /metrics the checks read. Its upstream and Redis
    are ports nobody listens on: no session is made, and the Redis gauges
    (configured, not connected) are there to be read like the others."""
    d = os.path.join(tmpdir, "imapfresh")
    os.makedirs(d)
    px = servers.Imapfresh(binary, d, "%s:%d" % (servers.HOST, servers.free_port()), None, None,
                           listen_tls=False, name="contrib",
                           options=[("require_tls", "no"), ("instance_id", "contrib-check"),
                                    ("state", "redis://%s:%d/" % (servers.HOST, servers.free_port()))])
    return px.start()


def http_get(port, path, deadline=10.0):
    """(status, body) of GET path; retried while the port does not answer."""
    end = time.monotonic() + deadline
    while True:
        c = http.client.HTTPConnection(servers.HOST, port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
        finally:
            c.close()


def scrape(px):
    st, body = http_get(px.admin_port, "/metrics")
    if st != 200:
        raise RuntimeError("GET /metrics: %d %s" % (st, body[:200]))
    return parse_metrics(body)


def prometheus_errors(px, exprs, rules_path, tmpdir, deadline=60.0):
    """A real Prometheus scrapes px every second and evaluates the alert rules
    every second: every expression must return at least one series, and every
    rule must evaluate without error (e.g. no many-to-many match)."""
    d = os.path.join(tmpdir, "prometheus")
    os.makedirs(d)
    port = servers.free_port()
    conf = os.path.join(d, "prometheus.yml")
    with open(conf, "w") as f:
        json.dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                   "rule_files": [os.path.abspath(rules_path)],
                   "scrape_configs": [{"job_name": "imapfresh", "static_configs": [
                       {"targets": ["%s:%d" % (servers.HOST, px.admin_port)]}]}]}, f)
    proc = servers.spawn(["prometheus", "--config.file=" + conf, "--storage.tsdb.path=" + d + "/data",
                          "--web.listen-address=%s:%d" % (servers.HOST, port), "--log.level=warn"],
                         os.path.join(d, "prometheus.log"))
    errors = []

    def query(q):
        st, body = http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
        r = json.loads(body)
        if st != 200 or r.get("status") != "success":
            raise RuntimeError("%d %s" % (st, body[:300]))
        return r["data"]["result"]

    try:
        end = time.monotonic() + deadline
        while True:     # three scrapes in: enough for rate() over any window
            try:
                res = query('count_over_time(imapfresh_build_info{job="imapfresh"}[1m])')
                if res and float(res[0]["value"][1]) >= 3:
                    break
            except (OSError, RuntimeError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > end:
                return ["Prometheus has not scraped imapfresh three times in %.0f s%s"
                        % (deadline, servers.log_tail(os.path.join(d, "prometheus.log")))]
            time.sleep(0.3)
        for where, expr in sorted(exprs.items()):
            try:
                if not query(expr):
                    errors.append("%s: no series\n  expr: %s" % (where, expr))
            except RuntimeError as e:
                errors.append("%s: %s\n  expr: %s" % (where, e, expr))
        while True:     # every rule evaluated at least once since the scrapes began
            st, body = http_get(port, "/api/v1/rules")
            rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules):
                break
            if time.monotonic() > end:
                return errors + ["the rules were not all evaluated in %.0f s" % deadline]
            time.sleep(0.3)
        for r in rules:
            if r.get("health") != "ok":
                errors.append("rule %s: %s: %s" % (r["name"], r.get("health"), r.get("lastError")))
    finally:
        servers.stop_process(proc)
    return errors


def metric_errors(exprs, exported):
    """Every metric an expression selects must be exported (or be Prometheus'
    own, like up); every label it matches on must be on that metric, an
    equality's value among the label's values, a regex must match one."""
    errors = []
    for where, expr in sorted(exprs.items()):
        for name, matchers in selectors(expr):
            if name is None:
                errors.append("%s: a selector without a metric name: %s" % (where, expr))
                continue
            if name in PROMETHEUS_SERIES:
                continue
            if name not in exported:
                errors.append("%s: imapfresh exports no metric %s" % (where, name))
                continue
            for label, op, value in matchers:
                if label in TARGET_LABELS:
                    continue
                values = {s[label] for s in exported[name] if label in s}
                if not values:
                    errors.append("%s: %s has no label %s" % (where, name, label))
                elif op == "=" and value not in values:
                    errors.append("%s: %s{%s} is never %r (it is one of %s)"
                                  % (where, name, label, value, ", ".join(sorted(values))))
                elif op == "=~" and not any(re.fullmatch(value, v) for v in values):
                    errors.append("%s: %s{%s=~%r} matches none of %s"
                                  % (where, name, label, value, ", ".join(sorted(values))))
    return errors


# ------------------------------------------------------------------ the dashboard

VAR_REF = re.compile(r"\$\{([a-zA-Z0-9_]+)(?::[a-z]+)?\}|\$([a-zA-Z0-9_]+)|\[\[([a-zA-Z0-9_]+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s*,\s*)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")


def dashboard_panels(d):
    """Every panel, those inside collapsed rows too."""
    for p in d.get("panels") or []:
        yield p
        for q in p.get("panels") or []:
            yield q


def dashboard_variables(d):
    return {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}


def dashboard_exprs(d):
    """{where: expr} of every panel target, template variables left in."""
    exprs = {}
    for p in dashboard_panels(d):
        for t in p.get("targets") or []:
            if "expr" in t:
                exprs["panel %s %r target %s" % (p.get("id"), p.get("title"), t.get("refId"))] = t["expr"]
    return exprs


def variable_query(v):
    q = v.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


def substitute(expr, variables):
    """Template variables replaced by a concrete value of their kind: Grafana's
    intervals by durations, the dashboard's own by their All value (a regex)
    or a word. An unknown one is left, and promtool then fails on it."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in variables:
            return variables[name].get("allValue") or "x"
        return m.group(0)
    return VAR_REF.sub(repl, expr)


def model_errors(d):
    """The classic dashboard JSON model Grafana 9+ imports."""
    errors = []
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                      ("templating", dict), ("time", dict)):
        if not isinstance(d.get(key), kind):
            errors.append("dashboard: %s missing or not a %s" % (key, kind.__name__))
    if isinstance(d.get("uid"), str) and not re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"]):
        errors.append("dashboard: uid %r is not 1-40 of [a-zA-Z0-9_-]" % d["uid"])
    if isinstance(d.get("schemaVersion"), int) and not 36 <= d["schemaVersion"] <= 41:
        errors.append("dashboard: schemaVersion %d is not Grafana 9+ (36..)" % d["schemaVersion"])
    if d.get("id") is not None:
        errors.append("dashboard: id must be null (Grafana gives one at import)")
    return errors


def panel_errors(d):
    errors, ids = [], {}
    for p in dashboard_panels(d):
        where = "panel %s %r" % (p.get("id"), p.get("title"))
        if not isinstance(p.get("id"), int):
            errors.append("%s: no integer id" % where)
        elif p["id"] in ids:
            errors.append("%s: id %d also used by %r" % (where, p["id"], ids[p["id"]]))
        else:
            ids[p["id"]] = p.get("title")
        if not isinstance(p.get("type"), str) or not p["type"]:
            errors.append("%s: no type" % where)
        if not p.get("title"):
            errors.append("%s: no title" % where)
        g = p.get("gridPos")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in "hwxy"):
            errors.append("%s: gridPos needs integer h, w, x, y" % where)
        if p.get("type") == "row":
            if p.get("targets"):
                errors.append("%s: a row has no targets" % where)
            continue
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            errors.append("%s: no targets" % where)
            continue
        refs = set()
        for t in targets:
            tw = "%s target %s" % (where, t.get("refId"))
            if not t.get("refId") or t["refId"] in refs:
                errors.append("%s: refId missing or repeated" % tw)
            refs.add(t.get("refId"))
            if not isinstance(t.get("expr"), str) or not t["expr"].strip():
                errors.append("%s: no expr" % tw)
            ds = t.get("datasource")
            if not isinstance(ds, dict) or ds.get("type") != "prometheus" or ds.get("uid") != DS_UID:
                errors.append("%s: datasource must be {type: prometheus, uid: %s}, is %r"
                              % (tw, DS_UID, ds))
        ds = p.get("datasource")
        if ds is not None and (not isinstance(ds, dict) or ds.get("uid") != DS_UID):
            errors.append("%s: panel datasource must be %s, is %r" % (where, DS_UID, ds))
    return errors


def layout_errors(d):
    """Inside the 24 columns, and no two panels on the same cell (panels of a
    collapsed row are laid out when it opens: compared among themselves)."""
    errors = []

    def overlap(a, b):
        ga, gb = a["gridPos"], b["gridPos"]
        return (ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"] and
                ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"])

    groups = [[p for p in d.get("panels") or []]]
    groups += [p.get("panels") for p in d.get("panels") or [] if p.get("panels")]
    for group in groups:
        placed = []
        for p in group:
            g = p.get("gridPos") or {}
            if not all(isinstance(g.get(k), int) for k in "hwxy"):
                continue
            if g["x"] < 0 or g["y"] < 0 or g["w"] < 1 or g["h"] < 1 or g["x"] + g["w"] > GRID_COLUMNS:
                errors.append("panel %s %r: gridPos %r outside the %d columns"
                              % (p.get("id"), p.get("title"), g, GRID_COLUMNS))
            for q in placed:
                if overlap(p, q):
                    errors.append("panel %s %r overlaps panel %s %r"
                                  % (p.get("id"), p.get("title"), q.get("id"), q.get("title")))
            placed.append(p)
    return errors


def variable_errors(d):
    """A datasource variable DS_PROMETHEUS, an instance variable from
    imapfresh's metrics, every selector filtered by it, every $var known."""
    errors = []
    v = dashboard_variables(d)
    ds = v.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append("templating: no datasource variable DS_PROMETHEUS (query prometheus)")
    inst = v.get("instance")
    if not inst or inst.get("type") != "query":
        errors.append("templating: no query variable instance")
    else:
        if (inst.get("datasource") or {}).get("uid") != DS_UID:
            errors.append("templating: instance's datasource is not %s" % DS_UID)
        if not LABEL_VALUES.match(variable_query(inst)):
            errors.append("templating: instance's query is not label_values(...): %r"
                          % variable_query(inst))
    for where, expr in sorted(dashboard_exprs(d).items()):
        for m in VAR_REF.finditer(expr):
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in GRAFANA_BUILTINS and name not in v:
                errors.append("%s: $%s is no variable of the dashboard" % (where, name))
        for name, matchers in selectors(expr):
            if ("instance", "=~", "$instance") not in matchers:
                errors.append('%s: %s is not filtered by instance=~"$instance"' % (where, name))
    return errors


def variable_metric_exprs(d):
    """The metric a label_values() variable reads, as a selector to check."""
    exprs = {}
    for name, v in dashboard_variables(d).items():
        if v.get("type") != "query":
            continue
        m = LABEL_VALUES.match(variable_query(v))
        if m and m.group(1):
            exprs["variable %s" % name] = m.group(1)
    return exprs


# ------------------------------------------------------------------ the rules

def rule_exprs(rules):
    exprs = {}
    for g in rules.get("groups") or []:
        for n, r in enumerate(g.get("rules") or [], 1):
            exprs["rule %s" % (r.get("alert") or r.get("record") or "%s #%d" % (g.get("name"), n))] = r.get("expr", "")
    return exprs


def coverage_errors(rules, tests):
    """Every alert needs a unit test where it fires and one where it does not."""
    fires, quiet = set(), set()
    for t in tests.get("tests") or []:
        for a in t.get("alert_rule_test") or []:
            (fires if a.get("exp_alerts") else quiet).add(a.get("alertname"))
    errors = []
    for g in rules.get("groups") or []:
        for r in g.get("rules") or []:
            name = r.get("alert")
            if not name:
                continue
            if name not in fires:
                errors.append("alert %s: no test where it fires" % name)
            if name not in quiet:
                errors.append("alert %s: no test where it stays quiet" % name)
    return errors


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--dashboard", default=os.path.join(TOP, "contrib/grafana/imapfresh.json"))
    ap.add_argument("--rules", default=os.path.join(TOP, "contrib/prometheus/imapfresh-alerts.yml"))
    ap.add_argument("--rules-test", default=os.path.join(TOP, "contrib/prometheus/imapfresh-alerts.test.yml"))
    ap.add_argument("--exit-zero", action="store_true", help="exit 0 even on failures (TAP driver)")
    args = ap.parse_args()

    import yaml     # python3-yaml; imported here so that a missing one fails as a point
    tmp = tempfile.mkdtemp(prefix="contrib-check.", dir=os.environ.get("IMAPFRESH_TEST_TMP"))
    os.chmod(tmp, 0o755)
    px = None
    try:
        # --- the alert rules
        rc, text = promtool("check", "rules", args.rules)
        point(rc == 0, "promtool check rules %s" % os.path.basename(args.rules), [] if rc == 0 else [text])
        rc, text = promtool("test", "rules", args.rules_test)
        point(rc == 0, "promtool test rules %s" % os.path.basename(args.rules_test),
              [] if rc == 0 else [text])
        with open(args.rules) as f:
            rules = yaml.safe_load(f)
        with open(args.rules_test) as f:
            tests = yaml.safe_load(f)
        check("every alert has a unit test where it fires and one where it stays quiet",
              coverage_errors(rules, tests))

        # --- the dashboard
        with open(args.dashboard) as f:
            dash = json.load(f)
        check("dashboard: uid, title, schemaVersion (Grafana 9+), panels, templating",
              model_errors(dash))
        check("dashboard: each panel has a unique id, type, gridPos, targets with the "
              "datasource and an expr", panel_errors(dash))
        check("dashboard: panels inside the grid and not overlapping", layout_errors(dash))
        check("dashboard: DS_PROMETHEUS and instance variables; every selector filtered "
              "by $instance", variable_errors(dash))
        variables = dashboard_variables(dash)
        dexprs = {w: substitute(e, variables) for w, e in dashboard_exprs(dash).items()}
        check("dashboard: every PromQL expression parses (promtool, %d expressions)" % len(dexprs),
              promql_errors(dexprs, tmp))

        # --- the metrics named, against a live imapfresh
        exported = {}
        try:
            px = start_imapfresh(args.binary, tmp)
            exported = scrape(px)
            point(bool(exported), "live imapfresh /metrics scraped (%d series names)" % len(exported))
        except Exception as e:  # noqa: BLE001 (any failure here is the point's)
            point(False, "live imapfresh /metrics scraped", [e])
        dmetrics = dict(dexprs)
        dmetrics.update(variable_metric_exprs(dash))
        check("dashboard: every metric and label it selects is exported by imapfresh",
              metric_errors(dmetrics, exported) if exported else ["no scrape"])
        rexprs = rule_exprs(rules)
        check("rules: every metric and label they select is exported by imapfresh",
              metric_errors(rexprs, exported) if exported else ["no scrape"])
        # Not a failure: a new metric need not wait for its panel.
        used = {re.sub(r"_(bucket|sum|count)$", "", n)
                for e in list(dmetrics.values()) + list(rexprs.values()) for n, _ in selectors(e)}
        unused = sorted({re.sub(r"_(bucket|sum|count)$", "", n) for n in exported} - used)
        if unused:
            out("# exported but on neither the dashboard nor the rules: %s" % ", ".join(unused))

        if px is not None and exported:
            check("a real Prometheus scraping that imapfresh: every dashboard expression "
                  "returns series, every alert rule evaluates cleanly",
                  prometheus_errors(px, dexprs, args.rules, tmp))
        else:
            point(False, "a real Prometheus scraping imapfresh", ["no imapfresh"])
        if px is not None:
            try:
                px.stop()   # a sanitizer report in its log fails here
            except Exception as e:  # noqa: BLE001
                point(False, "imapfresh stopped cleanly", [e])
            px = None

        # --- the checks themselves fail on broken copies: exactly one new
        # complaint, about what was broken, beyond those of the real files
        def caught(name, before, after, word):
            new = [e for e in after if e not in before]
            point(len(new) == 1 and word in new[0], "self-test: %s is caught" % name,
                  [] if len(new) == 1 and word in new[0] else ["new complaints: %r" % new])

        def exprs_of(d):
            return {w: substitute(e, variables) for w, e in dashboard_exprs(d).items()}

        p = next(p for p in dashboard_panels(dash) if p.get("targets"))
        broken = copy.deepcopy(dash)
        bp = next(q for q in dashboard_panels(broken) if q.get("id") == p["id"])
        bp["targets"][0]["expr"] = p["targets"][0]["expr"].rstrip()[:-1]   # a ')' or ']' short
        caught("a dashboard expression one bracket short", promql_errors(dexprs, tmp),
               promql_errors(exprs_of(broken), tmp), "panel %s " % p["id"])
        before = metric_errors(dexprs, exported)
        bp["targets"][0]["expr"] = 'rate(imapfresh_no_such_metric_total{instance=~"$instance"}[5m])'
        caught("an unknown metric on the dashboard", before, metric_errors(exprs_of(broken), exported),
               "imapfresh_no_such_metric_total")
        bp["targets"][0]["expr"] = 'sum(imapfresh_sessions{instance=~"$instance", state="runing"})'
        caught("an unknown label value on the dashboard", before,
               metric_errors(exprs_of(broken), exported), "'runing'")
        bad_rules = copy.deepcopy(rules)
        bad_rules["groups"][0]["rules"][-1]["expr"] = "imapfresh_sessions_total > 0"
        caught("an unknown metric in the rules", metric_errors(rexprs, exported),
               metric_errors(rule_exprs(bad_rules), exported), "imapfresh_sessions_total")
        broken = copy.deepcopy(dash)
        panels = [q for q in broken["panels"] if q.get("type") != "row"]
        panels[1]["gridPos"] = dict(panels[0]["gridPos"])
        caught("a panel on another panel's cell", layout_errors(dash), layout_errors(broken), "overlaps")
    finally:
        if px is not None:
            servers.stop_process(px.proc)
        shutil.rmtree(tmp, ignore_errors=True)
    out("1..%d" % _n[0])
    return 0 if args.exit_zero or not _failed[0] else 1


if __name__ == "__main__":
    sys.exit(main())
