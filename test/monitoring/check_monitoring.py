#!/usr/bin/env python3
"""Checks the Grafana dashboard and the alerting rules against Prometheus and the daemons.

  - every PromQL expression of the dashboard (panel targets and the label_values() of its
    variables), with Grafana's variables replaced by what Grafana would put there, parses:
    they are written into a rules file as recording rules and `promtool check rules` must
    accept it;
  - with --scrape (the /metrics text of the daemons, taken live by the caller), every nbdcsi_
    metric name the dashboard and the rules query is one a daemon exports (a histogram's
    _bucket/_sum/_count included).

Usage: check_monitoring.py --dashboard JSON --rules YAML [--scrape FILE]... [--self-test]
Exit 0: good; 1: problems (listed).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

GRAFANA_VARS = [
    (re.compile(r"\$__rate_interval|\$\{__rate_interval\}"), "5m"),
    (re.compile(r"\$__interval|\$\{__interval\}"), "1m"),
    (re.compile(r"\$\{?(instance|volume|job|node)\}?"), ".*"),
]
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*\w+\)$")
NAME = re.compile(r"\bnbdcsi_[a-zA-Z0-9_]+")


def dashboard_exprs(dash):
    """(where, expr) for every PromQL expression in the dashboard."""
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = LABEL_VALUES.match(q or "")
        if m:
            out.append((f"variable {v['name']}", m.group(1)))
        elif q:
            out.append((f"variable {v['name']}", q))
    return out


def grafana_to_promql(expr):
    for pat, repl in GRAFANA_VARS:
        expr = pat.sub(repl, expr)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable left in {expr!r}")
    return expr


def check_exprs(promtool, exprs):
    """Problems promtool finds in `exprs` (list of (where, expr))."""
    problems = []
    rules = []
    for i, (where, e) in enumerate(exprs):
        try:
            rules.append({"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)})
        except ValueError as err:
            problems.append(f"{where}: {err}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)  # JSON is YAML
        path = f.name
    try:
        r = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append("promtool check rules rejects a dashboard expression:\n" +
                            r.stdout + r.stderr)
    finally:
        os.unlink(path)
    return problems


def exported_names(scrapes):
    names = set()
    for path in scrapes:
        with open(path) as f:
            for line in f:
                m = re.match(r"# TYPE (\S+) (\S+)", line)
                if m:
                    n, t = m.groups()
                    names.add(n)
                    if t == "histogram":
                        names.update({n + "_bucket", n + "_sum", n + "_count"})
                    elif t == "summary":
                        names.update({n + "_sum", n + "_count"})
                elif line and not line.startswith("#"):
                    names.add(re.split(r"[{ ]", line, 1)[0])
    return names


def check_names(sources, names):
    problems = []
    for where, text in sources:
        for n in sorted(set(NAME.findall(text))):
            if n not in names:
                problems.append(f"{where}: {n} is not exported by any daemon")
    return problems


def rule_texts(rules_path):
    # The rules' expressions and templates, without parsing YAML (no PyYAML needed): every
    # line counts, comments excluded.
    with open(rules_path) as f:
        return [(f"{rules_path}:{i}", line) for i, line in enumerate(f, 1)
                if not line.lstrip().startswith("#")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--rules", required=True)
    ap.add_argument("--scrape", action="append", default=[])
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--self-test", action="store_true",
                    help="also check that a broken expression and an unknown name are caught")
    a = ap.parse_args()
    with open(a.dashboard) as f:
        dash = json.load(f)
    exprs = dashboard_exprs(dash)
    if len(exprs) < 10:
        print(f"FAIL: only {len(exprs)} expressions found in {a.dashboard}", file=sys.stderr)
        return 1
    problems = check_exprs(a.promtool, exprs)
    names = exported_names(a.scrape) if a.scrape else None
    if names is not None:
        problems += check_names(exprs + rule_texts(a.rules), names)
    if a.self_test:
        if not check_exprs(a.promtool, [("self-test", "sum by (volume (rate(x[5m]))")]):
            problems.append("self-test: a malformed expression was not caught")
        if names is not None and not check_names([("self-test", "nbdcsi_no_such_metric")], names):
            problems.append("self-test: an unknown metric name was not caught")
    for p in problems:
        print("FAIL: " + p, file=sys.stderr)
    if not problems:
        print(f"ok: {len(exprs)} dashboard expressions parse"
              + (f"; every nbdcsi_ name is among the {len(names)} exported" if names else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
