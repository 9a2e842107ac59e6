"""Quantization-aware training (QAT) with simulated BatchNorm folding.

Starting from a full-precision checkpoint, every quantized conv/linear computes with
fake-quantized weights and inputs (uniform, :mod:`ltq.quant.uniform`) and the gradient passes
through the rounding with the clipped straight-through estimator. Conv→BN pairs become
:class:`ltq.nn.QuantConvBn2d` (``fold_bn=True``): the weights that get quantized are the folded
``W·γ/σ`` the deployed model will use, while BN keeps normalising with batch statistics until it
is frozen (Jacob et al. 2018; the TFLite-style original folded with the variance instead of σ and
updated the running statistics with an inverted momentum).

Observers (all state in buffers, DDP-synchronised):

* weights: ``"current"`` per output channel — the range of the current weights, so it follows
  them instead of only growing;
* activations: ``"ema"`` — ``r ← r + c·(batch − r)`` with ``c = averaging_constant``.

Observers only learn from *training* batches: they are switched off for validation, test and
predict and restored afterwards (a checkpoint written during validation records the training
state). The schedule — freeze the observers at epoch/step k, the BN statistics at epoch/step m —
is set with ``freeze_observers_epoch/step`` and ``freeze_bn_epoch/step`` (the method adds
:class:`ltq.callbacks.FreezeObservers` / :class:`ltq.callbacks.FreezeBatchNorm`, which re-apply
the freeze when a run is resumed past that point); the callbacks can also be listed in
``trainer.callbacks`` directly.

Default recipe (the TFLite-style original, ``seeds/ANALYSIS.md`` §4.3): SGD lr 0.03, momentum 0.5,
no weight decay, constant lr, 3 epochs at batch 64 from the FP checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ltq.errors import ConfigError, check_choice
from ltq.methods.base import Classifier
from ltq.methods.ptq import UniformQuantHooks, validate_uniform_args
from ltq.nn import iter_quantizers, quantize_model

log = logging.getLogger("ltq")

__all__ = ["QAT"]


class QAT(UniformQuantHooks, Classifier):
    """Quantization-aware training of an FP checkpoint (see module docstring).

    Args:
        w_bits, a_bits, per_channel, skip_first, skip_last, first_last_w_bits, overrides: as
            :class:`ltq.methods.PTQ`.
        weight_observer: weight range estimator (default ``current``).
        act_observer: activation range estimator (default ``ema``).
        averaging_constant: EMA constant of the ``ema``/``percentile``/``mse`` observers.
        fold_bn: simulate the conv→BN fold (:class:`ltq.nn.QuantConvBn2d`); false keeps BN as a
            separate float layer after the quantized conv.
        freeze_observers_epoch, freeze_observers_step: freeze every observer from this 0-based
            epoch / global step on (null: never).
        freeze_bn_epoch, freeze_bn_step: freeze the BatchNorm statistics from this epoch / step on.
        deployed_eval: at test time also evaluate the real int8 model (8-bit models only).
        int8_backend: int8 backend name (``ao_x86``).
        optimizer, lr, momentum, weight_decay, scheduler: as :class:`Classifier`, with the
            original's QAT defaults (SGD 0.03, momentum 0.5, no decay, constant lr).
        **kwargs: everything else :class:`Classifier` takes (``backbone``, ``fp_checkpoint``, ...).
    """

    method_name = "qat"

    def __init__(
        self,
        w_bits: int = 8,
        a_bits: int | None = 8,
        per_channel: bool = True,
        weight_observer: str = "current",
        act_observer: str = "ema",
        averaging_constant: float = 0.01,
        fold_bn: bool = True,
        skip_first: bool = True,
        skip_last: bool = True,
        first_last_w_bits: int | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        freeze_observers_epoch: int | None = None,
        freeze_observers_step: int | None = None,
        freeze_bn_epoch: int | None = None,
        freeze_bn_step: int | None = None,
        deployed_eval: bool = True,
        int8_backend: str = "ao_x86",
        optimizer: str = "sgd",
        lr: float = 0.03,
        momentum: float = 0.5,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        **kwargs: Any,
    ) -> None:
        validate_uniform_args(w_bits, a_bits, per_channel, weight_observer, act_observer, first_last_w_bits, overrides)
        if not isinstance(averaging_constant, (int, float)) or not 0 < averaging_constant <= 1:
            raise ConfigError(f"model.averaging_constant={averaging_constant!r} is not supported; allowed: 0 < c <= 1")
        for opt, v in (
            ("model.freeze_observers_epoch", freeze_observers_epoch),
            ("model.freeze_observers_step", freeze_observers_step),
            ("model.freeze_bn_epoch", freeze_bn_epoch),
            ("model.freeze_bn_step", freeze_bn_step),
        ):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{opt}={v!r} is not supported; allowed: an integer >= 0 or null")
        from ltq.export import BACKENDS

        check_choice("model.int8_backend", int8_backend, BACKENDS)
        super().__init__(
            optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, scheduler=scheduler, **kwargs
        )
        if not self.hparams.fp_checkpoint:
            log.warning(
                "QAT: model.fp_checkpoint is not set, so QAT starts from a random initialisation (the original needed "
                "~5x more epochs for that); pass --model.fp_checkpoint runs/fp/<backbone>_<dataset>/checkpoints/best.ckpt"
            )
        self._suspended: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ model surgery
    def quantize(self, model: nn.Module) -> nn.Module:
        return quantize_model(model, self.uniform_policy_from_hparams("simulate" if self.hparams.fold_bn else "none"))

    # ------------------------------------------------------------------ observers only learn from training batches
    def _observer_flags(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.model.named_buffers() if name.endswith("observer_enabled")}

    def suspend_observers(self) -> None:
        """Switch every observer off (remembering its state) so that evaluation changes nothing.

        The weight quantizers then use the range observed at the last training step (for the
        ``current`` observer: of the weights before the last optimizer update, a negligible lag).
        """
        if self._suspended is not None:
            return
        flags = self._observer_flags()
        self._suspended = {name: buf.detach().clone() for name, buf in flags.items()}
        for buf in flags.values():
            buf.fill_(0)

    def resume_observers(self) -> None:
        """Undo :meth:`suspend_observers`."""
        if self._suspended is None:
            return
        flags = self._observer_flags()
        for name, saved in self._suspended.items():
            if name in flags:
                flags[name].copy_(saved)
        self._suspended = None

    def on_validation_start(self) -> None:
        self.suspend_observers()

    def on_validation_end(self) -> None:
        self.resume_observers()

    def on_test_start(self) -> None:
        self.suspend_observers()

    def on_test_end(self) -> None:
        self.resume_observers()

    def on_predict_start(self) -> None:
        self.suspend_observers()

    def on_predict_end(self) -> None:
        self.resume_observers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # ModelCheckpoint saves in on_validation_end, before this module's hook resumes the
        # observers: record the training-time toggles, not the suspended ones.
        super().on_save_checkpoint(checkpoint)
        if self._suspended:
            state = checkpoint.get("state_dict", {})
            for name, saved in self._suspended.items():
                key = f"model.{name}"
                if key in state:
                    state[key] = saved.clone()

    # ------------------------------------------------------------------ schedule
    def configure_callbacks(self):
        from ltq.callbacks.schedule import FreezeBatchNorm, FreezeObservers

        hp = self.hparams
        callbacks = []
        if hp.freeze_observers_epoch is not None or hp.freeze_observers_step is not None:
            callbacks.append(FreezeObservers(epoch=hp.freeze_observers_epoch, step=hp.freeze_observers_step))
        if hp.freeze_bn_epoch is not None or hp.freeze_bn_step is not None:
            callbacks.append(FreezeBatchNorm(epoch=hp.freeze_bn_epoch, step=hp.freeze_bn_step))
        return callbacks + self.deployed_callbacks()

    def quantizer_count(self) -> int:
        return sum(1 for _ in iter_quantizers(self.model))
