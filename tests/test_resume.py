"""Exact resume: a run stopped mid-epoch and resumed from ``last.ckpt`` ends exactly where the
uninterrupted run ends (weights, quantization state, optimizer state, metrics), for every method
registered in :data:`ltq.methods.METHODS`; plus the resumable training loader it relies on and
``seed_everything`` determinism.

A "kill" is an exception raised at the start of training step ``k`` after a
``ModelCheckpoint(every_n_train_steps=1, save_last=True)`` wrote ``last.ckpt`` at the end of step
``k - 1``: the process state is lost exactly as with ``kill -9``, only the checkpoint survives.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import ModelCheckpoint

from ltq.callbacks.guards import NumericalGuard
from ltq.data import CIFAR10DataModule
from ltq.data.base import ResumableDataLoader, ResumableSampler
from ltq.errors import ConfigError
from ltq.methods import METHODS, Classifier


# Tiny per-method configs (CIFAR-10 shapes, 10 classes). Methods registered later without an
# entry here are tried with DEFAULT_TINY; PTQ does not train.
DEFAULT_TINY = dict(backbone="cnn", scheduler="none")
TINY = {
    "fp": dict(backbone="cnn", optimizer="adam", lr=0.01, scheduler="none"),
    "metaquant": dict(backbone="cnn", bits=2, meta_hidden=4, optimizer="adam", lr=0.01, scheduler="none"),
    "qat": dict(backbone="cnn_bn", w_bits=4, a_bits=4, lr=0.01, scheduler="none", deployed_eval=False,
                freeze_observers_step=5, freeze_bn_step=7),  # the schedule fires after the resume point
    "ttq": dict(backbone="cnn_bn", optimizer="adam", lr=0.003, lr_scales=1e-4, scheduler="none", log_per_layer=False),
    "apot": dict(backbone="cnn", bits=4, lr=0.002, act_alpha_lr=0.002, weight_alpha_lr=0.002, scheduler="none"),
}
NO_TRAINING = {"ptq"}
EXPECTED = {"fp", "metaquant", "qat", "ttq", "apot", "ptq"}
ALL_METHODS = sorted(set(METHODS) | EXPECTED)

STEPS_PER_EPOCH = 4  # 64 training images / batch 16
EPOCHS = 2


class DropoutClassifier(Classifier):
    """The FP classifier with dropout on the logits: its training steps draw from the global RNG,
    so a resume is only exact if the RNG state is restored too."""

    def forward(self, x):
        return F.dropout(self.model(x), 0.3, self.training)


def method_config(name: str) -> tuple[type, dict]:
    if name == "fp-dropout":
        return DropoutClassifier, {**TINY["fp"], "num_classes": 10, "in_channels": 3}
    if name not in METHODS:
        pytest.skip(f"method {name!r} is not registered in ltq.methods.METHODS yet")
    if name in NO_TRAINING:
        pytest.skip(f"{name} does not train: there is no run to resume")
    return METHODS[name], {**TINY.get(name, DEFAULT_TINY), "num_classes": 10, "in_channels": 3}


class _Killed(Exception):
    pass


class KillAt(L.Callback):
    """Raise at the start of global step ``step`` (after last.ckpt of step ``step - 1`` was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Killed(f"killed at step {self.step}")


def datamodule(root: Path, **kw) -> CIFAR10DataModule:
    args = dict(batch_size=16, num_workers=0, val_fraction=0.2, augment=True, limit_train_samples=64, pin_memory=False)
    args.update(kw)
    return CIFAR10DataModule(str(root), **args)


def fit(root: Path, cls: type, kw: dict, ckpt_dir: Path, kill: int | None = None, ckpt_path=None, seed: int = 0,
        every: int = 1):
    """Fit ``EPOCHS`` epochs; ``last.ckpt`` every ``every`` steps (0: at the end of every epoch)."""
    L.seed_everything(seed, verbose=False)
    model = cls(**kw)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, monitor=None, save_top_k=0 if every else 1, save_last=True,
                           every_n_train_steps=every or None)
    callbacks = [ckpt, NumericalGuard()]
    if kill is not None:
        callbacks.append(KillAt(kill))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, callbacks=callbacks)
    try:
        trainer.fit(model, datamodule=datamodule(root), ckpt_path=ckpt_path)
    except _Killed:
        assert kill is not None
    return model, trainer


def _flat(obj, prefix=""):
    """Tensors and numbers of nested containers, keyed by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, torch.tensor(float(obj))


def snapshot(model: L.LightningModule, trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """Everything a run ends with: all state_dict entries (weights, BN statistics, quantizer
    scales/observers/toggles, meta-network, ...), the optimizer states and the logged metrics."""
    out = {f"state{k}": v for k, v in _flat(dict(model.state_dict()))}
    for i, opt in enumerate(trainer.optimizers):
        out.update({f"opt{i}{k}": v for k, v in _flat(opt.state_dict()["state"])})
        out.update({f"opt{i}.lr{k}": v for k, v in _flat([g["lr"] for g in opt.param_groups])})
    out.update({f"metric.{k}": v for k, v in trainer.callback_metrics.items()})
    out["global_step"] = torch.tensor(trainer.global_step)
    out["epoch"] = torch.tensor(trainer.current_epoch)
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


_REFERENCE: dict[str, dict] = {}


def reference(name: str, root: Path, tmp: Path) -> dict:
    """Snapshot of the uninterrupted run of method ``name`` (computed once per session)."""
    if name not in _REFERENCE:
        cls, kw = method_config(name)
        model, trainer = fit(root, cls, kw, tmp / f"ref_{name}")
        assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
        _REFERENCE[name] = snapshot(model, trainer)
    return _REFERENCE[name]


@pytest.mark.parametrize("name", ["fp-dropout", *ALL_METHODS])
def test_killed_run_resumes_exactly(name, cifar10_pickled_root, tmp_path):
    """Killed in the middle of epoch 0, resumed, killed again in the middle of epoch 1 (after a
    completed epoch: validation, scheduler, epoch-level metrics), resumed to the end."""
    cls, kw = method_config(name)
    ref = reference(name, cifar10_pickled_root, tmp_path)
    ckpt_dir = tmp_path / "ckpt"
    last = str(ckpt_dir / "last.ckpt")
    _, t1 = fit(cifar10_pickled_root, cls, kw, ckpt_dir, kill=2)
    ckpt = torch.load(last, weights_only=True)
    assert t1.global_step == 2 and ckpt["global_step"] == 2
    assert "ltq" in ckpt, (f"{cls.__name__}.on_save_checkpoint must call super().on_save_checkpoint(checkpoint) "
                           "(Classifier records the method and the running training metric there)")
    _, t2 = fit(cifar10_pickled_root, cls, kw, ckpt_dir, kill=6, ckpt_path=last)
    assert t2.global_step == 6 and torch.load(last, weights_only=True)["global_step"] == 6
    model, t3 = fit(cifar10_pickled_root, cls, kw, ckpt_dir, ckpt_path=last)
    assert_same(ref, snapshot(model, t3))


def test_resume_from_an_epoch_end_checkpoint(cifar10_pickled_root, tmp_path):
    """A checkpoint written at the end of an epoch (the CLI's default): Lightning does not restore
    the loader's own state then; the DataModule's state carries the seed and the RNG states."""
    cls, kw = method_config("fp-dropout")
    ref = reference("fp-dropout", cifar10_pickled_root, tmp_path)
    ckpt_dir = tmp_path / "ckpt"
    fit(cifar10_pickled_root, cls, kw, ckpt_dir, kill=STEPS_PER_EPOCH + 1, every=0)
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == STEPS_PER_EPOCH
    model, trainer = fit(cifar10_pickled_root, cls, kw, ckpt_dir, ckpt_path=str(ckpt_dir / "last.ckpt"), every=0)
    assert_same(ref, snapshot(model, trainer))


def test_seed_everything_makes_cpu_runs_repeatable(cifar10_pickled_root, tmp_path):
    cls, kw = method_config("fp")
    ref = reference("fp", cifar10_pickled_root, tmp_path)
    model, trainer = fit(cifar10_pickled_root, cls, kw, tmp_path / "again")
    assert_same(ref, snapshot(model, trainer))
    other, t3 = fit(cifar10_pickled_root, cls, kw, tmp_path / "seed1", seed=1)
    assert not torch.equal(other.state_dict()["model.classifier.0.weight"], model.state_dict()["model.classifier.0.weight"])


def test_checkpoint_of_other_bit_width_is_refused(cifar10_pickled_root, tmp_path):
    cls, kw = method_config("metaquant")
    fit(cifar10_pickled_root, cls, kw, tmp_path / "ckpt", kill=1)
    L.seed_everything(0, verbose=False)
    model = cls(**{**kw, "bits": 3})
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"bits: checkpoint 2, model 3"):
        trainer.fit(model, datamodule=datamodule(cifar10_pickled_root), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


# --------------------------------------------------------------------------- the resumable loader
def batches(loader, n=None):
    """The first ``n`` (default all) batches; never fetches batch ``n + 1``, as Lightning."""
    it = iter(loader) if n is None else (b for _, b in zip(range(n), loader))
    return [(x.clone(), y.clone()) for x, y in it]


def test_loader_is_resumable_for_lightning(cifar10_pickled_root):
    dm = datamodule(cifar10_pickled_root)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, ResumableSampler)
    assert isinstance(loader, _Stateful)  # what Lightning checks to save/restore it
    torch.manual_seed(0)
    a, b = dm.train_dataloader(), dm.train_dataloader()
    assert a.sampler.seed != b.sampler.seed  # a fresh shuffle per loader, fixed by the global seed


def test_loader_state_skips_consumed_batches_and_restores_rng(cifar10_pickled_root):
    dm = datamodule(cifar10_pickled_root)
    torch.manual_seed(0)
    full = dm.train_dataloader()
    full.sampler.set_epoch(1)
    expected = batches(full)
    torch.manual_seed(0)
    first = dm.train_dataloader()
    first.sampler.set_epoch(1)
    got = batches(first, 3)
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 3)
    after = torch.rand(3)  # what the training step would draw next
    torch.manual_seed(123)  # a "new process"
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    torch.testing.assert_close(torch.rand(3), after)  # global RNG restored
    got += batches(resumed)
    assert len(got) == len(expected) == STEPS_PER_EPOCH
    for (x1, y1), (x2, y2) in zip(got, expected):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)  # same samples, same random crops/flips
    assert resumed.state_dict()["batches"] == STEPS_PER_EPOCH


def test_state_of_a_complete_epoch_starts_the_next(cifar10_pickled_root):
    dm = datamodule(cifar10_pickled_root)
    loader = dm.train_dataloader()
    batches(loader)
    state = loader.state_dict()
    ref = dm.train_dataloader()
    ref.load_state_dict({k: v for k, v in state.items() if k != "rng"} | {"batches": 0})
    ref.sampler.set_epoch(1)
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 1
    assert [y.tolist() for _, y in batches(resumed)] == [y.tolist() for _, y in batches(ref)]


def test_augmentation_does_not_depend_on_workers(cifar10_pickled_root):
    dm0 = datamodule(cifar10_pickled_root)
    dm2 = datamodule(cifar10_pickled_root, num_workers=2)
    torch.manual_seed(0)
    a = batches(dm0.train_dataloader())
    torch.manual_seed(0)
    b = batches(dm2.train_dataloader())
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_ranks_partition_each_epoch(cifar10_pickled_root):
    dm = datamodule(cifar10_pickled_root)
    dm.setup("fit")
    samplers = [ResumableSampler(dm.train_dataset, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(3)
    idx = [[i for i, _ in s] for s in samplers]
    assert not set(idx[0]) & set(idx[1]) and sorted(idx[0] + idx[1]) == list(range(len(dm.train_dataset)))


# ------------------------------------------------------------------------------ through the CLI
def test_cli_resume_with_ckpt_path_last_is_exact(tmp_path):
    """``ltq fit`` stopped in the middle of epoch 1 and resumed with ``--ckpt_path last`` (the
    quickstart recipe with augmentation, the CLI's default checkpoint/guard/statistics callbacks)."""
    from ltq.cli import run_cli

    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")

    def args(root: Path, *extra: str) -> list[str]:
        return ["fit", "--config", quickstart, "--trainer.default_root_dir", str(root),
                "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2",
                "--data.root", str(tmp_path / "no_dataset_here"), "--data.limit_train_samples", "192",
                "--data.val_fraction", "0.02", "--data.augment", "true", "--test_after_fit", "false",
                "--checkpoint.every_n_train_steps", "1", *extra]

    a = run_cli(args(tmp_path / "a"))
    b1 = run_cli(args(tmp_path / "b", "--trainer.max_steps", "4"))  # 3 steps per epoch: stops in epoch 1
    assert b1.trainer.global_step == 4
    b2 = run_cli(args(tmp_path / "b", "--ckpt_path", "last"))
    assert a.trainer.global_step == b2.trainer.global_step == 6
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for k in ("val/acc1", "val/loss", "train/acc1_epoch"):
        torch.testing.assert_close(b2.trainer.callback_metrics[k], a.trainer.callback_metrics[k])


def test_plain_loop_reshuffles_every_pass(cifar10_pickled_root):
    """Without Lightning's set_epoch, iterating the loader again starts the next epoch."""
    loader = datamodule(cifar10_pickled_root, augment=False).train_dataloader()
    first, second = batches(loader), batches(loader)
    assert loader.state_dict()["epoch"] == 1
    assert [y.tolist() for _, y in first] != [y.tolist() for _, y in second]


@pytest.mark.parametrize("name", sorted(set(ALL_METHODS) - {"fp"}))
def test_fp_checkpoint_starts_every_quantized_method(name, tmp_path):
    """An FP checkpoint (Lightning layout) of a backbone loads into every method with that backbone."""
    if name not in METHODS:
        pytest.skip(f"method {name!r} is not registered in ltq.methods.METHODS yet")
    kw = {**TINY.get(name, DEFAULT_TINY), "num_classes": 10, "in_channels": 3, "backbone": "cnn"}
    torch.manual_seed(1)
    fp = METHODS["fp"](backbone="cnn", num_classes=10, in_channels=3)
    path = tmp_path / "fp.ckpt"
    torch.save({"state_dict": fp.state_dict(), "hyper_parameters": dict(fp.hparams)}, path)
    torch.manual_seed(2)
    model = METHODS[name](**kw, fp_checkpoint=str(path))
    own = model.model.state_dict()
    for key, value in fp.model.state_dict().items():
        assert key in own and torch.equal(own[key], value), key


def test_state_saved_at_the_end_of_a_limited_epoch_does_not_skip_into_the_next(cifar10_pickled_root):
    """``trainer.limit_train_batches``: the epoch ends before the loader is exhausted; Lightning then
    starts the next epoch (set_epoch), which must not skip anything nor miscount."""
    dm = datamodule(cifar10_pickled_root)
    loader = dm.train_dataloader()
    batches(loader, 2)  # an epoch limited to 2 batches
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does for the next epoch
    assert len(batches(resumed)) == STEPS_PER_EPOCH
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batches"]) == (1, STEPS_PER_EPOCH)
