#!/usr/bin/env python3
"""Prints a Markdown table (AA, forgetting, BWT, ACR, OO, AWOM, GSR, wall
time, peak RSS) from nlora run directories that have results.json and metrics.json
(`nlora metrics RUN_DIR` writes the latter). Standard library only.
Usage: python3 scripts/results_table.py runs/mini-seqlora runs/mini-nlora ..."""
import json
import os
import sys


def load(path, name):
    p = os.path.join(path, name)
    return json.load(open(p)) if os.path.exists(p) else None


def fmt(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


rows = []
threshold = None
for d in sys.argv[1:]:
    r, m, t = load(d, "results.json"), load(d, "metrics.json"), load(d, "timings.json")
    if r is None:
        continue
    peak = t and t.get("peak_rss_bytes")
    rss = f"{peak / 2**30:.2f} GiB" if peak else "-"
    wall = sum(t["train_seconds"]) + sum(t["eval_seconds"]) if t else None
    gsr = None
    if m and m["gsr"]:
        vals = [g for g in m["gsr"] if g is not None]
        gsr = sum(vals) / len(vals) if vals else None
    threshold = threshold or (m and m["threshold"])
    rows.append(
        f"| {r['method']} | {fmt(r['average_accuracy'])} | {fmt(r['forgetting'])} | {fmt(r['bwt'])} "
        f"| {fmt(m and m['acr'])} | {fmt(m and m['orthogonal_overlap'])} | {fmt(m and m['awom'])} "
        f"| {fmt(gsr)} | {'-' if wall is None else f'{wall/60:.1f} min'} "
        f"| {rss} |"
    )
print("| method | AA | forgetting | BWT | ACR | OO | AWOM | GSR (mean over tasks) | wall | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
if threshold:
    print(f"\nCollision threshold (ACR): {threshold}.")
