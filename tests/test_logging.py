"""W&B offline logging (summary row, histograms, config) and the local `ltq report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ltq.cli import main, run_cli

REPO = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.default_root_dir", str(tmp_path / name),
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "1",
        "--data.root", str(tmp_path / "absent"),
        "--data.limit_train_samples", "128",
        *extra,
    ]


@pytest.mark.slow
def test_wandb_offline_run_holds_summary_and_histograms(tmp_path, monkeypatch):
    from ltq.wandb_offline import read_offline_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_cli(["fit", *tiny_run(tmp_path, "mq", "--config", str(REPO / "configs" / "logging" / "wandb.yaml"),
                               "--model", "ltq.methods.MetaQuant", "--model.forward", "bwn", "--model.meta", "ste")])
    import os

    import wandb

    wandb.finish()  # `ltq` does this on exit; in-process we flush by hand
    assert os.environ["WANDB_MODE"] == "offline"  # no key: ltq chose offline instead of blocking
    runs = list((tmp_path / "mq" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = read_offline_run(runs[0])
    summary = data["summary"]
    for key in ("method", "backbone", "dataset", "w_bits", "top1", "top5", "size_bytes", "sparsity"):
        assert key in summary, key
    assert summary["method"] == "metaquant" and summary["backbone"] == "cnn" and summary["w_bits"] == 1
    hist_keys = {k for row in data["history"] for k in row if k.startswith("hist/")}
    assert any(k.endswith("/values") for k in hist_keys)
    assert any(k.startswith("quant/") for row in data["history"] for k in row)
    assert data["config"]["ltq_config"]["model"]["init_args"]["forward"] == "bwn"
    # grouping for the dashboard
    local = json.loads((tmp_path / "mq" / "summary.json").read_text())
    assert local["top1"] == pytest.approx(summary["top1"])


def test_report_compares_runs(tmp_path, capsys):
    run_cli(["fit", *tiny_run(tmp_path, "fp")])
    run_cli(["fit", *tiny_run(tmp_path, "bwn", "--model", "ltq.methods.MetaQuant", "--model.forward", "bwn", "--model.meta", "ste")])
    run_cli(["fit", *tiny_run(tmp_path, "ttq", "--model", "ltq.methods.TTQ", "--model.skip_last", "false")])
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "fp"), str(tmp_path / "bwn"), str(tmp_path / "ttq"), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert {r["method"] for r in rows} == {"fp", "metaquant", "ttq"}
    assert {r["w_bits"] for r in rows} == {"32", "1", ""}  # TTQ has no bit width (ternary)
    ttq_row = next(r for r in rows if r["method"] == "ttq")
    assert 0 < float(ttq_row["sparsity"]) < 1
    fp_row = next(r for r in rows if r["method"] == "fp")
    assert float(fp_row["size_ratio"]) == pytest.approx(1.0)
    assert float(next(r for r in rows if r["method"] == "metaquant")["size_ratio"]) > 10
    md = (out / "report.md").read_text()
    assert "| fp |" in md.replace("| fp  |", "| fp |") or "fp" in md.split("\n", 3)[3]
    assert "metaquant" in md
    for png in ("acc_vs_bits.png", "acc_vs_size.png"):
        assert (out / png).stat().st_size > 1000


def test_report_from_csv_logs_without_summary(tmp_path):
    run_cli(["fit", *tiny_run(tmp_path, "fp")])
    (tmp_path / "fp" / "summary.json").unlink()
    from ltq.report import read_run

    row = read_run(tmp_path / "fp")
    assert row["method"] == "classifier" and row["backbone"] == "cnn" and 0 <= row["top1"] <= 1


def test_report_bad_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
