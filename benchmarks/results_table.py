"""Markdown table of `benchmarks/results.sh` rows: mean ± std over seeds, wall time, command.

    python benchmarks/results_table.py runs/results/results.jsonl
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict


def fmt(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(path: str) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in open(path):
        rec = json.loads(line)
        groups[re.sub(r"/s\d+$", "", rec["row"])].append(rec)
    print("| row | seeds | test top-1 (%) | top-5 (%) | deployed int8 top-1 (%) | size ratio | sparsity | wall (s) | command (last seed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, recs in groups.items():
        ok = [r for r in recs if r["rc"] == 0 and r["summary"]]
        if not ok:
            print(f"| {name} | 0 | failed (rc {recs[-1]['rc']}) | | | | | {recs[-1]['wall_s']} | `{recs[-1]['cmd']}` |")
            continue
        s = [r["summary"] for r in ok]
        ratio = s[-1].get("size_ratio")
        sp = s[-1].get("sparsity")
        print(f"| {name} | {len(ok)} | {fmt([x.get('top1') for x in s])} | {fmt([x.get('top5') for x in s])} | "
              f"{fmt([x.get('deployed_top1') for x in s if x.get('deployed_top1') is not None])} | "
              f"{f'{ratio:.1f}x' if ratio else '–'} | {f'{100 * sp:.1f}%' if sp is not None else '–'} | "
              f"{int(statistics.median([r['wall_s'] for r in ok]))} | `{ok[-1]['cmd']}` |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/results/results.jsonl")
