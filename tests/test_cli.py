"""End-to-end tests of the ``ltq`` command line (in-process, tiny runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ltq.cli import main, run_cli

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def quick_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", QUICKSTART,
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
        "--data.root", str(tmp_path / "no_dataset_here"),  # forces the embedded sample
        "--data.limit_train_samples", "256",
        *extra,
    ]


def test_help_lists_zoo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("resnet20", "densenet_small", "squeezenet", "cnn_bn", "FashionMNISTDataModule", "Classifier"):
        assert name in out


def test_quickstart_fit_then_test_reproduces(tmp_path, caplog):
    cli = run_cli(["fit", *quick_args(tmp_path, "--trainer.max_epochs", "1")])
    fit_test_acc = cli.trainer.callback_metrics["test/acc1"].item()
    assert cli.trainer.checkpoint_callback.best_model_score.item() > 0.15  # val/acc1 above chance (0.1) after 4 steps
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert best.is_file() and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "logs").is_dir()
    cli2 = run_cli(["test", *quick_args(tmp_path), "--ckpt_path", str(best)])
    assert cli2.trainer.callback_metrics["test/acc1"].item() == pytest.approx(fit_test_acc, abs=1e-6)
    # checkpoints record what rebuilds the model
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "cnn"


def test_resume_from_last(tmp_path):
    run_cli(["fit", *quick_args(tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false")])
    cli = run_cli(["fit", *quick_args(tmp_path, "--trainer.max_epochs", "2", "--test_after_fit", "false", "--ckpt_path", "last")])
    assert cli.trainer.current_epoch == 2
    assert cli.trainer.global_step == 2 * 4  # 256 samples / batch 64 per epoch, not restarted from 0


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.backbone", "resnet21"], "model.backbone='resnet21' is not supported"),
        (["--model.optimizer", "sgdd"], "model.optimizer='sgdd' is not supported; allowed: sgd, adam, adamw"),
        (["--model.lr", "-0.1"], "model.lr=-0.1 must be a positive number"),
        (["--model.fp_checkpoint", "/nonexistent.ckpt"], "does not exist"),
        (["--model.freeze", "[nope*]"], "model.freeze pattern 'nope*' matches no parameter"),
        (["--model.scheduler", "cosin"], "model.scheduler='cosin' is not supported"),
    ],
)
def test_config_mistakes_give_one_line(tmp_path, capsys, extra, expected):
    rc = main(["fit", *quick_args(tmp_path, "--trainer.fast_dev_run", "true"), *extra])
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ltq: error:")]
    assert rc == 2
    assert len(ours) == 1 and expected in ours[0]


def test_cli_error_is_one_line_in_a_real_process(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ltq.cli", "fit", *quick_args(tmp_path), "--model.backbone", "resnet21"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ltq: error: model.backbone='resnet21'")


def test_missing_dataset_without_fallback(tmp_path, capsys):
    rc = main(["fit", *quick_args(tmp_path, "--trainer.fast_dev_run", "true"), "--data.fallback_to_sample", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.root=" in err and "does not exist" in err


def test_fp_checkpoint_of_other_backbone(tmp_path, capsys):
    run_cli(["fit", *quick_args(tmp_path, "--trainer.fast_dev_run", "true")])
    # fast_dev_run writes no checkpoint: save one by hand from a cnn_bn model
    from ltq.methods import Classifier

    ckpt = tmp_path / "other.pt"
    torch.save(Classifier(backbone="cnn_bn", in_channels=1).model.state_dict(), ckpt)
    rc = main(["fit", *quick_args(tmp_path, "--trainer.fast_dev_run", "true"), "--model.fp_checkpoint", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit backbone 'cnn'" in err and "unexpected" in err
