"""Markdown table of `benchmarks/results.sh` rows: mean ± std over seeds, drop from FP, wall time, command.

    python benchmarks/results_table.py runs/results/results.jsonl [--commands]

Rows are named ``method/backbone[/variant][/sSEED]``; rows differing only in the seed suffix are
one table row (mean ± sample std over the seeds that finished). "Δ FP" is the difference of the
mean test top-1 to the mean of the ``fp/<backbone>`` row (same seeds pooled). When a row was run
more than once for the same seed, the last run counts.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def load(path: str) -> dict[str, dict[str, dict]]:
    """{row name without seed: {seed suffix: last successful record}} in first-seen order."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in open(path):
        if not line.strip():
            continue
        rec = json.loads(line)
        m = re.match(r"(.*?)(?:/(s\d+))?$", rec["row"])
        name, seed = m.group(1), m.group(2) or ""
        if rec["rc"] == 0 and rec.get("summary"):
            groups[name][seed] = rec
        else:
            groups[name].setdefault(seed, rec)
    return groups


def main(path: str, commands: bool = False) -> None:
    groups = load(path)
    fp_top1: dict[str, float] = {}
    for name, seeds in groups.items():
        parts = name.split("/")
        ok = [r["summary"]["top1"] for r in seeds.values() if r["rc"] == 0 and r.get("summary")]
        if parts[0] == "fp" and ok:
            fp_top1[parts[1]] = statistics.mean(ok)
    print("| row | seeds | test top-1 (%) | Δ FP | deployed int8 top-1 (%) | fp32 size ÷ size | zeros | wall (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seeds in groups.items():
        ok = [r for r in seeds.values() if r["rc"] == 0 and r.get("summary")]
        if not ok:
            last = list(seeds.values())[-1]
            print(f"| {name} | 0 | failed (rc {last['rc']}) | | | | | {last['wall_s'] / 60:.0f} |")
            continue
        s = [r["summary"] for r in ok]
        top1 = [x["top1"] for x in s]
        backbone = name.split("/")[1] if "/" in name else ""
        delta = "–"
        if not name.startswith("fp/") and backbone in fp_top1:
            delta = f"{100 * (statistics.mean(top1) - fp_top1[backbone]):+.2f}"
        deployed = [x["deployed_top1"] for x in s if x.get("deployed_top1") is not None]
        ratio, sp = s[-1].get("size_ratio"), s[-1].get("sparsity")
        wall = statistics.median([r["wall_s"] for r in ok]) / 60
        print(f"| {name} | {len(ok)} | {mean_std(top1)} | {delta} | {mean_std(deployed)} | "
              f"{f'{ratio:.1f}×' if ratio else '–'} | {f'{100 * sp:.0f}%' if sp is not None else '–'} | "
              f"{wall:.1f} |")
    if commands:
        print()
        for name, seeds in groups.items():
            print(f"# {name}\n{list(seeds.values())[-1]['cmd']}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0] if args else "runs/results/results.jsonl", commands="--commands" in sys.argv)
