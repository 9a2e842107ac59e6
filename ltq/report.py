"""``ltq report RUN_DIR ... [--out DIR]``: compare finished runs without W&B.

Each run directory is read for its summary row: ``summary.json`` (written after ``ltq test`` /
``ltq fit`` by :class:`ltq.callbacks.QuantStats`), else the last values in the CSV logs
(``logs/version_*/metrics.csv``) together with the run's ``config.yaml``. The report is a table
(``report.md`` and ``report.csv``) and two plots: top-1 vs bits per method, and top-1 vs model
size (``acc_vs_bits.png``, ``acc_vs_size.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

from ltq.errors import ConfigError

log = logging.getLogger("ltq")

COLUMNS = ("run", "method", "backbone", "dataset", "w_bits", "a_bits", "top1", "top5", "deployed_top1",
           "size_bytes", "size_ratio", "sparsity")


def _from_csv(run: Path) -> dict[str, Any]:
    """Summary row from the CSV logs and config.yaml of a run that has no summary.json."""
    import yaml

    row: dict[str, Any] = {}
    cfgs = sorted(run.rglob("config.yaml"))
    if cfgs:
        cfg = yaml.safe_load(cfgs[-1].read_text()) or {}
        model = cfg.get("model", {}) or {}
        args = model.get("init_args", {}) or {}
        row["method"] = str(model.get("class_path", "")).rsplit(".", 1)[-1].lower() or None
        row["backbone"] = args.get("backbone")
        row["w_bits"] = args.get("w_bits", args.get("bits"))
        row["a_bits"] = args.get("a_bits")
        row["dataset"] = str((cfg.get("data", {}) or {}).get("class_path", "")).rsplit(".", 1)[-1].replace("DataModule", "").lower() or None
    for metrics in sorted(run.rglob("metrics.csv")):
        with metrics.open() as f:
            for rec in csv.DictReader(f):
                for key, name in (("test/acc1", "top1"), ("test/acc5", "top5"), ("test/deployed_acc1", "deployed_top1"), ("val/acc1", "val_top1")):
                    if rec.get(key):
                        row[name] = float(rec[key])
    return row


def read_run(run: str | Path) -> dict[str, Any]:
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"ltq report: run directory {str(run)!r} does not exist")
    summary = run / "summary.json"
    row = json.loads(summary.read_text()) if summary.is_file() else _from_csv(run)
    if not row or all(row.get(k) is None for k in ("top1", "val_top1")):
        raise ConfigError(f"ltq report: {str(run)!r} has no summary.json and no test/val metrics in logs/*/metrics.csv")
    row["run"] = run.name if run.name not in ("", ".") else str(run)
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def write_report(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (str(r.get("dataset")), str(r.get("backbone")), str(r.get("method")), -(r.get("w_bits") or 32)))
    with (out / "report.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            if c == "size_bytes" and v is not None:
                cells.append(f"{v / 1024:.1f} KiB")
            elif c == "size_ratio" and v is not None:
                cells.append(f"{v:.1f}x")
            else:
                cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / "report.md").write_text("Accuracies in %, size ratio = fp32 bytes / stored bytes.\n\n" + "\n".join(lines) + "\n")
    written = [out / "report.md", out / "report.csv"]
    written += _plots(rows, out)
    return written


def _plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional: the table is the report
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    methods = sorted({str(r.get("method")) for r in rows})
    for xkey, fname, xlabel in (("w_bits", "acc_vs_bits.png", "weight bits"), ("size_bytes", "acc_vs_size.png", "model size (KiB)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in methods:
            pts = sorted((r[xkey] / (1024 if xkey == "size_bytes" else 1), 100 * r["top1"]) for r in rows
                         if str(r.get("method")) == m and r.get(xkey) is not None and r.get("top1") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%)")
        if xkey == "size_bytes":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ltq report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (trainer.default_root_dir of finished runs)")
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    args = parser.parse_args(argv)
    rows = [read_run(r) for r in args.runs]
    for path in write_report(rows, Path(args.out)):
        print(path)
    print((Path(args.out) / "report.md").read_text())
    return 0
