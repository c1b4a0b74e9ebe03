#!/usr/bin/env python3
"""Markdown tables for the README from a `bitsvf run` handoff: test accuracy per domain and
wall time / peak memory per stage. Usage: scripts/run_tables.py OUT_DIR"""
import json
import sys

out = sys.argv[1]
m = json.load(open(f"{out}/manifest.json"))
t = m["metrics"]["test"]
cols = t["columns"]
print(f"| domain | expert | {' | '.join(cols)} |")
print("|---|---|" + "---|" * len(cols))
covered = {d: e["name"] for e in m["experts"] for d in e["domains"]}
for d, row in t["accuracy"].items():
    cells = [f"{100 * row[c]:.1f}" if c in row else "—" for c in cols]
    print(f"| {d} | {covered.get(d, '—')} | {' | '.join(cells)} |")
for label, keep in [("mean, covered domains", lambda d: d in covered),
                    ("mean, all domains", lambda d: True)]:
    cells = []
    for c in cols:
        v = [r[c] for d, r in t["accuracy"].items() if keep(d) and c in r]
        cells.append(f"**{100 * sum(v) / len(v):.1f}**" if v else "—")
    print(f"| {label} | | {' | '.join(cells)} |")
print()
for k, v in t["routing"].items():
    print(f"- routing accuracy of `{k}` dispatch: {100 * v:.1f}%")
print(f"- best single expert per domain (chosen on validation): {t['best_expert']}")
print()
print("| stage | wall time | peak RSS |")
print("|---|---|---|")
total = 0
for s in m["metrics"]["stages"]:
    total += s["seconds"]
    print(f"| {s['name']} | {s['seconds']:.0f} s | {s['peak_rss_mb']:.0f} MB |")
print(f"| **total** | **{total / 60:.1f} min** | |")
b = m["metrics"]["bytes"]
print()
print(json.dumps(b))
search = m["metrics"]["search"] or {}
print("search:", {k: v for k, v in search.items() if k in ("evaluations", "seconds", "stopped_early")})
pick = search.get("search_pick")
if pick:
    print("search pick:", [round(a, 2) for a in pick["alpha"]], "rank", pick["rank"],
          f"val {100 * pick['accuracy']:.1f} (base {100 * search['base']['accuracy']:.1f})")
sel = search.get("selection")
if sel:
    print(f"\nselection split: {sel['n']} items, base {100 * sel['base_accuracy']:.1f}%\n")
    print("| α | rank | search val | selection | gain ± se |")
    print("|---|---|---|---|---|")
    for c in sel["candidates"]:
        p = c["point"]
        print(f"| [{', '.join(f'{a:.2f}' for a in p['alpha'])}] | {p['rank']} | {100 * p['accuracy']:.1f} "
              f"| {100 * c['accuracy']:.1f} | {100 * c['gain']:+.1f} ± {100 * c['se']:.1f} |")
    print("\nrule:", sel["rule"])
mix = m["mixture"]
if mix:
    print("mixture handed off:", mix["experts"], [round(a, 2) for a in mix["alpha"]], "rank", mix["rank"])
else:
    print("no mixture handed off")
print("cem:", {k: ("base" if f["keeps_base"] else [round(a, 2) for a in f["alpha"]],
                   f"{100 * f['accuracy']:.0f} vs {100 * f['base_accuracy']:.0f}")
               for k, f in m["metrics"].get("cem", {}).items()})
print("thresholds:", m["metrics"].get("thresholds"))
for e in m["experts"] + [m["classifier"]]:
    tr = e["training"]
    print(f"{e['name']}: val {100*e['base_val_accuracy']:.1f} -> {100*e['val_accuracy']:.1f} at step {tr['best_step']} of {tr['steps']}, {tr['seconds']:.0f} s")
