"""Scheduled freezing for quantization-aware training: observers and BatchNorm statistics.

The usual QAT recipe (Jacob et al. 2018; Krishnamoorthi 2018; torchvision's quantization
reference) trains a few epochs with live observers and live BatchNorm, then

* **freezes the observers**: the quantization ranges (scales, zero points) stop moving, so the
  last epochs fine-tune the weights against a fixed grid;
* **freezes the BatchNorm statistics**: BN normalises with its running mean/variance (the ones
  that get folded into the deployed conv) instead of the batch statistics, closing the
  train/inference gap of simulated folding; γ and β keep training.

Both callbacks take an ``epoch`` (freeze from the start of that 0-based epoch, i.e. after
``epoch`` full epochs) and/or a ``step`` (freeze before the optimizer step with that 0-based
``trainer.global_step``: steps ``0 .. step-1`` still update). The earliest of the two wins.

Resume: the condition is evaluated from ``trainer.current_epoch`` / ``trainer.global_step`` in
``on_train_start`` too, so a run resumed after the freeze point freezes again before its first
step. This matters for plain BatchNorm, whose frozen state is a class switch that a checkpoint
does not record (QuantConvBn2d's ``bn_frozen`` and the observers' ``observer_enabled`` are
buffers and are restored anyway). Use them from YAML::

    trainer:
      callbacks:
        - class_path: ltq.callbacks.FreezeObservers
          init_args: {epoch: 2}
        - class_path: ltq.callbacks.FreezeBatchNorm
          init_args: {step: 1500}

or through the QAT method's ``freeze_observers_epoch/step`` and ``freeze_bn_epoch/step`` options.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ltq.errors import ConfigError
from ltq.nn.layers import freeze_bn_stats, set_observers_enabled

log = logging.getLogger("ltq")

__all__ = ["FreezeObservers", "FreezeBatchNorm"]


def _check(value, option: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{option}={value!r} is not supported; allowed: an integer >= 0 or null")
    return value


class _ScheduledFreeze(Callback):
    """Apply :meth:`_freeze` once ``current_epoch >= epoch`` or ``global_step >= step``."""

    what = "?"

    def __init__(self, epoch: int | None = None, step: int | None = None):
        self.epoch = _check(epoch, f"{type(self).__name__}.epoch")
        self.step = _check(step, f"{type(self).__name__}.step")
        if self.epoch is None and self.step is None:
            raise ConfigError(f"{type(self).__name__} needs epoch or step (0-based); both are null")
        self._applied = False

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}{{epoch={self.epoch}, step={self.step}}}"

    def due(self, trainer: Trainer) -> bool:
        """True when the freeze point has been reached."""
        if self.epoch is not None and trainer.current_epoch >= self.epoch:
            return True
        return self.step is not None and trainer.global_step >= self.step

    @staticmethod
    def _net(pl_module: LightningModule) -> nn.Module:
        net = getattr(pl_module, "model", None)
        return net if isinstance(net, nn.Module) else pl_module

    def _freeze(self, net: nn.Module) -> int:
        raise NotImplementedError

    def _maybe_apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._applied or not self.due(trainer):
            return
        n = self._freeze(self._net(pl_module))
        self._applied = True
        rank_zero_info(f"ltq: froze {n} {self.what} at epoch {trainer.current_epoch}, step {trainer.global_step}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._applied = False  # a new fit (or a resume): re-apply if already past the freeze point
        self._maybe_apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.step is not None:
            self._maybe_apply(trainer, pl_module)


class FreezeObservers(_ScheduledFreeze):
    """Stop every observer (``observer_enabled = 0``) at ``epoch`` and/or ``step``.

    The quantizers keep fake-quantizing with the last range they observed.
    """

    what = "observers"

    def _freeze(self, net: nn.Module) -> int:
        return set_observers_enabled(net, False)


class FreezeBatchNorm(_ScheduledFreeze):
    """Freeze the BatchNorm statistics at ``epoch`` and/or ``step`` (:func:`ltq.nn.freeze_bn_stats`).

    QuantConvBn2d switches to the folded form with running statistics; plain BatchNorm layers
    normalise with their running statistics and stop updating them. γ, β keep training.
    """

    what = "BatchNorm layers"

    def _freeze(self, net: nn.Module) -> int:
        return freeze_bn_stats(net)
