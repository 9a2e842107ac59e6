"""Numerical guards (ltq.callbacks.guards): a NaN/Inf loss or a collapsed quantizer scale stops
the run with one message naming the step (and the layer), and the last good checkpoint is kept."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ltq.callbacks.guards import NumericalError, NumericalGuard, find_scales
from ltq.errors import ConfigError
from ltq.methods import METHODS, Classifier
from ltq.nn import QuantPolicy, quantize_model


QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch)


class ToyScaleQuantizer(nn.Module):
    """``alpha * round(w / alpha)`` with a learnable step ``alpha`` (an LSQ-like scale)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.05))
        self.register_buffer("_alpha_mean", torch.zeros(()))  # private stats: not a scale

    def forward(self, w):
        q = w / self.alpha
        return self.alpha * (q + (torch.round(q) - q).detach())


class ToyScaled(Classifier):
    def quantize(self, model):
        return quantize_model(model, QuantPolicy(weight=lambda name, m, bits: ToyScaleQuantizer(), act=None, a_bits=None))


class Inject(L.Callback):
    """At the start of global step ``step``: ``what(trainer, pl_module, batch)``."""

    def __init__(self, step, what):
        self.step, self.what = step, what

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.what(trainer, pl_module, batch)


class InjectAfter(L.Callback):
    """At the end of global step ``step`` (after the optimizer step, before the guard's check):
    ``what(pl_module)``. Must come before the guard in the callback list."""

    def __init__(self, step, what):
        self.step, self.what = step, what

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            with torch.no_grad():
                self.what(pl_module)


def nan_input(trainer, pl_module, batch):
    batch[0].fill_(float("nan"))


def trainer(tmp_path, *callbacks, before=(), guard=None, save_on_exception=False, epochs=1, every=1):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=None, save_top_k=0, save_last=True,
                           every_n_train_steps=every, save_on_exception=save_on_exception)
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[*before, guard or NumericalGuard(), ckpt, *callbacks])


def model(cls=Classifier, **kw):
    torch.manual_seed(0)
    return cls(backbone="cnn", in_channels=1, optimizer="adam", lr=0.01, scheduler="none", **kw)


def finite_checkpoint(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if torch.is_floating_point(v))
    return ckpt


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_last_ckpt(tmp_path):
    t = trainer(tmp_path, Inject(3, nan_input))
    with pytest.raises(NumericalError, match=r"training loss is NaN/Inf at global step 3 \(epoch 0\)") as exc:
        t.fit(model(), train_dataloaders=loader())
    assert "\n" not in str(exc.value) and "last.ckpt" in str(exc.value)
    ckpt = finite_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 3  # written after step 2; step 3's NaN update never reached the disk


def test_collapsed_scale_names_the_layer(tmp_path):
    m = model(ToyScaled)
    names = [n for n, _, _ in find_scales(m)]
    assert names == ["model.features.3.weight_quantizer.alpha"]  # the first conv / last FC stay FP
    collapse = InjectAfter(2, lambda pl: pl.model.features[3].weight_quantizer.alpha.fill_(-0.5))
    with pytest.raises(NumericalError, match=r"^quantizer scale model\.features\.3\.weight_quantizer\.alpha = -0\.5 "
                                             r"\(must be finite and > 0\) at global step 2 \(epoch 0\)"):
        trainer(tmp_path, before=[collapse]).fit(m, train_dataloaders=loader())
    ckpt = finite_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 2 and ckpt["state_dict"]["model.features.3.weight_quantizer.alpha"] > 0


def test_nan_scale_is_reported_as_nan(tmp_path):
    def poison(trainer, pl_module, batch):
        with torch.no_grad():
            pl_module.model.features[3].weight_quantizer.alpha.fill_(float("nan"))

    with pytest.raises(NumericalError, match=r"alpha = nan"):
        trainer(tmp_path, Inject(1, poison)).fit(model(ToyScaled), train_dataloaders=loader())


SCALED_METHODS = {"ttq": ("w_p", "w_n"), "apot": ("alpha",)}


@pytest.mark.parametrize("name", sorted(SCALED_METHODS))
def test_real_method_scale_collapse(name, tmp_path):
    """TTQ's w_p/w_n and APoT's α (found by name on the real quantizers) going <= 0."""
    if name not in METHODS:
        pytest.skip(f"method {name!r} is not registered in ltq.methods.METHODS yet")
    torch.manual_seed(0)
    m = METHODS[name](backbone="cnn", in_channels=1, num_classes=10, scheduler="none", lr=1e-4)
    scales = find_scales(m)
    assert scales and {attr for _, _, attr in scales} <= set(SCALED_METHODS[name])
    target, owner, attr = scales[-1]
    collapse = InjectAfter(1, lambda pl: getattr(owner, attr).fill_(-0.25))
    with pytest.raises(NumericalError, match=rf"^quantizer scale {target} = -0\.25 .*at global step 1 "):
        trainer(tmp_path, before=[collapse]).fit(m, train_dataloaders=loader())
    assert finite_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 1


def test_check_every_n_steps_reports_the_window(tmp_path):
    t = trainer(tmp_path, Inject(1, nan_input), guard=NumericalGuard(check_every_n_steps=4), every=0)
    with pytest.raises(NumericalError, match=r"^the training loss is NaN/Inf at global steps 0-3 "):
        t.fit(model(), train_dataloaders=loader())


def test_checkpoint_between_checks_is_refused(tmp_path):
    """Checks every 4 steps, checkpoints every step: the NaN state of step 1 is never written."""
    t = trainer(tmp_path, Inject(1, nan_input), guard=NumericalGuard(check_every_n_steps=4))
    with pytest.raises(NumericalError, match=r"^refusing to write a checkpoint: the training loss is NaN/Inf.* global steps 0-1"):
        t.fit(model(), train_dataloaders=loader())
    assert finite_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 1


def test_one_host_sync_per_check(monkeypatch):
    m = model(ToyScaled)
    guard = NumericalGuard()
    guard._scales = find_scales(m) * 3
    guard._loss_ok = torch.isfinite(torch.tensor(1.0))
    calls = []
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self):
        calls.append("bool")
        return real_bool(self)

    def counting_item(self):
        calls.append("item")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    assert guard._all_ok()
    assert calls == ["bool"]  # loss flag + 3 scales: one device->host read


def test_save_on_exception_does_not_write_the_diverged_state(tmp_path):
    t = trainer(tmp_path, Inject(2, nan_input), save_on_exception=True)
    with pytest.raises(NumericalError):
        t.fit(model(), train_dataloaders=loader())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    assert finite_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2


def test_refuses_to_write_a_checkpoint_with_nan_weights(tmp_path):
    m = model()
    t = trainer(tmp_path, guard=NumericalGuard(check_every_n_steps=0))
    t.fit(m, train_dataloaders=loader(n=16))
    with torch.no_grad():
        m.model.classifier[0].weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match=r"refusing to write a checkpoint: tensor model\.classifier\.0\.weight is not finite"):
        t.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_healthy_run_is_untouched(tmp_path):
    t = trainer(tmp_path, epochs=2)
    t.fit(model(ToyScaled), train_dataloaders=loader(n=32))
    assert t.global_step == 8 and math.isfinite(float(t.callback_metrics["train/loss"]))


def test_bad_option():
    with pytest.raises(ConfigError, match="guard.check_every_n_steps=-1"):
        NumericalGuard(check_every_n_steps=-1)


def test_cli_prints_one_line_and_keeps_last_checkpoint(tmp_path, capsys):
    """The CLI adds the guard by default; an exploding lr stops the run with exit status 1."""
    from ltq.cli import main

    root = tmp_path / "run"
    rc = main(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", "--data.root", str(tmp_path / "none"),
               "--data.limit_train_samples", "64", "--data.val_fraction", "0.02", "--trainer.max_epochs", "3",
               "--model.lr", "1e30", "--checkpoint.every_n_train_steps", "1"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ltq: error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert "training loss is NaN/Inf at global step 1 (epoch 1)" in lines[0] and "last.ckpt" in lines[0]
    assert finite_checkpoint(root / "checkpoints" / "last.ckpt")["global_step"] == 1
