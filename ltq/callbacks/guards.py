"""Numerical guards: stop a run at the first NaN/Inf loss or collapsed quantizer scale.

A diverging run wastes GPU hours and, worse, overwrites ``last.ckpt`` with NaN weights, so that
``--ckpt_path last`` can no longer resume from the last good state. :class:`NumericalGuard`
checks, after every ``check_every_n_steps`` training steps:

* the training loss of every backward pass since the last check is finite;
* every quantizer *scale* is finite and strictly positive. Scales are found by name on the
  quantizer modules (modules whose class name contains ``Quantizer``, e.g. the
  ``weight_quantizer``/``act_quantizer`` of a quantized layer): any floating parameter or buffer
  whose own name is one of ``scale_names`` (default ``scale``, ``alpha``, ``w_p``, ``w_n``: APoT's
  clipping level α, TTQ's positive/negative scales, an LSQ-style step size). A scale that reaches
  ``≤ 0`` flips or zeroes the quantization levels (``α·P``, ``{−w_n, 0, w_p}``, ``s·q``): the
  layer's output is garbage even though no NaN appears yet.

The check is one fused reduction: the loss flags are accumulated on the device with
``isfinite(loss) & previous`` (no host sync per backward) and, at a check, stacked with
``isfinite(s).all() & (s > 0).all()`` of every scale into one boolean tensor that is read once
(``bool(...)``: one device→host synchronisation per check). With ``check_every_n_steps = n > 1``
the guard costs one sync every ``n`` steps and reports the window of steps in which the problem
appeared.

When a check fails the guard raises :class:`NumericalError` naming the loss or the layer and the
global step, *in* ``on_train_batch_end``, i.e. before the step's checkpoint is written (Lightning
runs :class:`~lightning.pytorch.callbacks.ModelCheckpoint` callbacks after all others), so the
checkpoint files on disk keep the last good state. Two more protections:

* every checkpoint that is about to be written (``on_save_checkpoint``: the regular ones, a
  ``save_on_exception`` one, ``trainer.save_checkpoint``) is checked too — pending loss flags,
  scales, and all floating parameters and BatchNorm running statistics — and refused with
  :class:`NumericalError` if anything is non-finite;
* after a :class:`NumericalError`, ``ModelCheckpoint(save_on_exception=True)`` callbacks are told
  not to save (Lightning calls their ``on_exception`` after this one's).

The ``ltq`` CLI adds the guard by default (``--guard.check_every_n_steps``, ``--guard.enabled``)
and prints a :class:`NumericalError` as one line ``ltq: error: ...`` with exit status 1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ltq.errors import ConfigError

__all__ = ["NumericalError", "NumericalGuard", "find_scales"]


DEFAULT_SCALE_NAMES = ("scale", "alpha", "w_p", "w_n")


class NumericalError(RuntimeError):
    """Training diverged (NaN/Inf loss or a collapsed quantizer scale); the message is one line."""


def _is_quantizer(module: nn.Module) -> bool:
    return "quantizer" in type(module).__name__.lower()


def find_scales(model: nn.Module, names: Sequence[str] = DEFAULT_SCALE_NAMES) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, owner module, attribute)`` of every quantizer scale of ``model``.

    A scale is a floating parameter or buffer whose own name is in ``names``, owned by a module
    inside a quantizer module (see the module docstring). Each tensor is listed once, under its
    first name in ``named_modules`` order. The owner and attribute are returned (not the tensor)
    so that a scale re-assigned later (lazy initialisation) is still found.
    """
    names = set(names)
    out: list[tuple[str, nn.Module, str]] = []
    seen: set[int] = set()
    for qname, quantizer in model.named_modules():
        if not _is_quantizer(quantizer):
            continue
        for mname, module in quantizer.named_modules(prefix=qname):
            tensors = list(module._parameters.items()) + list(module._buffers.items())
            for attr, t in tensors:
                if attr not in names or t is None or not torch.is_floating_point(t) or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append((f"{mname}.{attr}" if mname else attr, module, attr))
    return out


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value == math.inf else ("-inf" if value == -math.inf else f"{value:.4g}"))


class NumericalGuard(L.Callback):
    """Stop training at the first non-finite loss or collapsed quantizer scale (see the module doc).

    Args:
        check_every_n_steps: check after every n-th training batch (``1``: every step, one host
            sync each; ``0``: only when a checkpoint is written).
        check_loss: check the training loss (every backward pass is recorded).
        check_scales: check the quantizer scales (``> 0`` and finite).
        scale_names: names of the scale tensors to look for on quantizer modules.
        enabled: ``False`` turns the guard off entirely.
    """

    def __init__(
        self,
        check_every_n_steps: int = 1,
        check_loss: bool = True,
        check_scales: bool = True,
        scale_names: Sequence[str] = DEFAULT_SCALE_NAMES,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 0:
            raise ConfigError(f"guard.check_every_n_steps={check_every_n_steps!r} must be an integer >= 0 (0 = only at checkpoints)")
        self.check_every_n_steps = check_every_n_steps
        self.check_loss = bool(check_loss)
        self.check_scales = bool(check_scales)
        self.scale_names = tuple(scale_names)
        self.enabled = bool(enabled)
        self._scales: list[tuple[str, nn.Module, str]] = []
        self._loss_ok: Tensor | None = None  # device bool: all losses since the last check were finite
        self._first_bad_loss_step: int | None = None
        self._window_start = 0  # first global step not yet checked
        self._step = 0  # global step of the batch being trained
        self._batches = 0

    # ----------------------------------------------------------------- collection
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._scales = find_scales(pl_module, self.scale_names) if self.check_scales else []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # quantizers may be created or replaced after setup (e.g. a callback swapping modules)
        if self.check_scales:
            self._scales = find_scales(pl_module, self.scale_names)
        self._loss_ok = None
        self._window_start = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if not (self.enabled and self.check_loss) or not trainer.training:
            return
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else (self._loss_ok & ok)

    # ----------------------------------------------------------------- checks
    def _scale_tensors(self) -> list[tuple[str, Tensor]]:
        out = []
        for name, module, attr in self._scales:
            t = getattr(module, attr, None)
            if isinstance(t, Tensor) and t.numel() > 0:
                out.append((name, t.detach()))
        return out

    def _all_ok(self, extra: list[Tensor] = ()) -> bool:
        """One fused device reduction of all pending flags; one host read."""
        flags = [] if self._loss_ok is None else [self._loss_ok.reshape(())]
        for _, t in self._scale_tensors():
            flags.append((torch.isfinite(t) & (t > 0)).all())
        flags.extend(extra)
        if not flags:
            return True
        device = flags[0].device
        return bool(torch.stack([f.to(device) for f in flags]).all())

    def _where(self, trainer: L.Trainer) -> str:
        first, last = self._window_start, self._step
        steps = f"global step {last}" if first >= last else f"global steps {first}-{last}"
        return f"at {steps} (epoch {trainer.current_epoch})"

    def _last_good(self, trainer: L.Trainer) -> str:
        paths = []
        for cb in trainer.checkpoint_callbacks:
            for attr in ("last_model_path", "best_model_path"):
                p = getattr(cb, attr, "")
                if p and p not in paths:
                    paths.append(p)
        if not paths:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is kept: {paths[0]}"

    def _diagnose(self, trainer: L.Trainer, weights: list[tuple[str, Tensor]] = ()) -> str:
        """The one-line message for the first problem found (slow path: host reads allowed)."""
        problems: list[str] = []
        if self._loss_ok is not None and not bool(self._loss_ok):
            problems.append("the training loss is NaN/Inf")
        bad_scales = []
        for name, t in self._scale_tensors():
            if not bool((torch.isfinite(t) & (t > 0)).all()):
                bad = t[~(torch.isfinite(t) & (t > 0))].reshape(-1)
                bad_scales.append(f"quantizer scale {name} = {_fmt(float(bad[0]))} (must be finite and > 0)")
        if bad_scales:
            more = f" (and {len(bad_scales) - 1} more scales)" if len(bad_scales) > 1 else ""
            problems.append(bad_scales[0] + more)
        for name, t in weights:
            if not bool(torch.isfinite(t).all()):
                problems.append(f"tensor {name} is not finite")
                break
        what = "; ".join(problems[:2]) or "a non-finite value"
        return f"{what} {self._where(trainer)}; training stopped, {self._last_good(trainer)}"

    def check(self, trainer: L.Trainer) -> None:
        """Run the check now; raise :class:`NumericalError` on a problem."""
        if not self._all_ok():
            raise NumericalError(self._diagnose(trainer))
        self._loss_ok = None
        self._window_start = self._step + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or self.check_every_n_steps == 0:
            return
        self._batches += 1
        if self._batches % self.check_every_n_steps == 0:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.check_every_n_steps:
            self.check(trainer)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint holding non-finite weights or collapsed scales."""
        if not self.enabled:
            return
        weights = [(n, p.detach()) for n, p in pl_module.named_parameters() if torch.is_floating_point(p) and p.numel()]
        weights += [(n, b.detach()) for n, b in pl_module.named_buffers()
                    if n.endswith(("running_mean", "running_var")) and torch.is_floating_point(b)]
        finite = [torch.isfinite(t).all() for _, t in weights]
        if not self._all_ok(finite):
            raise NumericalError("refusing to write a checkpoint: " + self._diagnose(trainer, weights))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NumericalError):
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "save_on_exception", False):
                    cb.save_on_exception = False  # it would save the diverged state
