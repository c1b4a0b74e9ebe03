#!/usr/bin/env python3
"""Summarise expert runs made by scripts/sweep.sh into the README's markdown table.

usage: expert_table.py BASE_EVAL.json RUN_DIR...   (run dir names: <config>_<domain>[_s<seed>])
Per (config, domain): base test accuracy, the experts' own-domain test accuracy as
mean [min, max] over seeds, the gain, the mean change on the other domains, the training
KL(π_ref‖π) at the kept checkpoint, and wall time."""
import json, sys, os, statistics
from collections import defaultdict

base = {k: v["accuracy"] for k, v in json.load(open(sys.argv[1]))["domains"].items()}
groups = defaultdict(list)
for d in sys.argv[2:]:
    d = d.rstrip("/")
    try:
        tr = json.load(open(f"{d}/train.json"))
        ev = {k: v["accuracy"] for k, v in json.load(open(f"{d}/eval.json"))["domains"].items()}
    except (OSError, ValueError):
        print(f"skipping {d}: unfinished", file=sys.stderr)
        continue
    dom = tr["expert"]
    name = os.path.basename(d)
    config = name.split("_" + dom)[0]
    kl = None
    for line in open(f"{d}/expert.metrics.jsonl"):
        r = json.loads(line)
        if r["step"] == tr["best_step"]:
            kl = r.get(f"stage2/expert_{dom}/kl")
    others = [ev[k] - base[k] for k in base if k != dom]
    groups[(config, dom)].append(dict(acc=ev[dom], other=statistics.mean(others),
        worst=min(others), kl=kl, sec=tr["seconds"], val=tr["best_val_accuracy"]))

print("| config | domain | seeds | base | expert mean [min, max] | gain | other domains Δ (mean / worst) | KL at kept step | time |")
print("|---|---|---|---|---|---|---|---|---|")
for (config, dom), runs in sorted(groups.items()):
    accs = [r["acc"] for r in runs]
    m = statistics.mean(accs)
    kls = [r["kl"] for r in runs if r["kl"] is not None]
    print(f"| {config} | {dom} | {len(runs)} | {100*base[dom]:.1f} | {100*m:.1f} [{100*min(accs):.1f}, {100*max(accs):.1f}] "
          f"| {100*(m-base[dom]):+.1f} | {100*statistics.mean(r['other'] for r in runs):+.1f} / "
          f"{100*min(r['worst'] for r in runs):+.1f} | {statistics.mean(kls) if kls else float('nan'):.3f} "
          f"| {statistics.mean(r['sec'] for r in runs)/60:.1f} min |")
