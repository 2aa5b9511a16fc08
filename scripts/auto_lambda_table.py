#!/usr/bin/env python3
"""Prints a Markdown table comparing N-LoRA runs with automatic and fixed
lambda: order, lambda (auto target or fixed value), AA, forgetting, ACR and
the mean per-task density from metrics.json, and from monitor.json each
task's last live density and the lambda it ended with. Standard library only.
Usage: python3 scripts/auto_lambda_table.py runs/auto-o1 runs/fixed-o1 ..."""
import json
import os
import re
import sys


def load(path, name):
    p = os.path.join(path, name)
    return json.load(open(p)) if os.path.exists(p) else None


def fmt(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def config_value(path, key):
    """A top-level `key = value` of config.toml's [data] or [method] (no TOML
    parser in the standard library before 3.11)."""
    p = os.path.join(path, "config.toml")
    if not os.path.exists(p):
        return None
    m = re.search(rf"^{key}\s*=\s*(.+)$", open(p).read(), re.M)
    return m.group(1).strip().strip('"') if m else None


print("| order | lambda | AA | forgetting | ACR | density per task (metrics) "
      "| last live density per task | lambda at each task's end |")
print("|---|---|---|---|---|---|---|---|")
for d in sys.argv[1:]:
    r, m, mon = load(d, "results.json"), load(d, "metrics.json"), load(d, "monitor.json")
    if r is None:
        continue
    target = mon and mon.get("target_density")
    lam = f"auto, target {target}" if target else f"fixed {config_value(d, 'lambda') or '1e-4 (default)'}"
    dens = "-"
    if m:
        sites = m["sites"]
        per = [sum(s["density"][t] for s in sites) / len(sites) for t in range(len(r["tasks"]))]
        dens = " / ".join(f"{x:.2f}" for x in per)
    live = lams = "-"
    if mon:
        last = [st["readings"][-1] for st in mon["stages"] if st["readings"]]
        live = " / ".join(f"{x['density']:.2f}" for x in last)
        if target:
            lams = " / ".join(f"{x['lambda']:.1e}" for x in last)
    print(f"| {config_value(d, 'order')} | {lam} | {fmt(r['average_accuracy'])} "
          f"| {fmt(r['forgetting'])} | {fmt(m and m['acr'])} | {dens} | {live} | {lams} |")
