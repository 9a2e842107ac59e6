"""Post-training quantization (PTQ): fold BN, calibrate observers, evaluate — no training.

Recipe (the TFLite-style and ptq_resnet20 originals, with their bugs fixed; see
``seeds/ANALYSIS.md`` §3-4):

1. load a full-precision checkpoint (``fp_checkpoint``);
2. fold every conv→BN pair exactly, ``W' = W·γ/σ``, ``b' = β + (b − μ)·γ/σ`` with
   ``σ = sqrt(running_var + eps)`` (the TFLite-style original divided by the variance);
3. swap Conv2d/Linear for quantized layers (:func:`ltq.nn.uniform_policy`): ``w_bits`` symmetric
   weights, per output channel by default, ``s_c = max|W_c| / (2^(b−1) − 1)`` so that the largest
   weight is representable (the ptq_resnet20 original clipped it to half at 2 bits); ``a_bits``
   affine unsigned inputs ``s = (hi − lo)/(2^b − 1)``. By default the first conv and the last
   Linear stay in float (``skip_first``/``skip_last``; the TFLite original quantizes them too:
   set both to false);
4. **calibrate**: run ``calib_batches`` deterministic training batches (eval transform, fixed
   order, :meth:`ClassificationDataModule.calibration_dataloader`) through the network in eval
   mode with fake quantization off and the observers on (min/max, EMA, percentile or MSE), then
   switch the observers off and fake quantization on. Observers all-reduce across DDP ranks, so
   every rank ends with the same ranges;
5. evaluate (``ltq validate`` / ``ltq test``): calibration runs lazily at the start of the first
   validation/test/predict if the ``calibrated`` buffer is 0, so testing a saved calibrated
   checkpoint does not recalibrate. With checkpointing on (the CLI's default) the calibrated model
   is saved as ``<checkpoint dir>/calibrated.ckpt`` for ``ltq export`` and later tests.

At test time, 8-bit models are also converted to real int8 kernels and evaluated
(:class:`ltq.callbacks.DeployedEvaluation`, ``deployed_eval``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch
from torch import nn

from ltq.errors import ConfigError, check_choice
from ltq.methods.base import Classifier
from ltq.nn import iter_quantizers, quantize_model, set_fake_quant_enabled, set_observers_enabled, uniform_policy
from ltq.quant.observers import OBSERVERS
from ltq.quant.uniform import check_bits

log = logging.getLogger("ltq")

__all__ = ["PTQ", "UniformQuantHooks", "validate_uniform_args"]


def validate_uniform_args(
    w_bits, a_bits, per_channel, weight_observer, act_observer, first_last_w_bits=None, overrides=None
) -> None:
    """Raise :class:`ConfigError` for invalid uniform-quantization options (shared by PTQ and QAT)."""
    check_bits(w_bits, "model.w_bits")
    if a_bits is not None:
        check_bits(a_bits, "model.a_bits")
    if first_last_w_bits is not None:
        check_bits(first_last_w_bits, "model.first_last_w_bits")
    if not isinstance(per_channel, bool):
        raise ConfigError(f"model.per_channel={per_channel!r} is not supported; allowed: true, false")
    check_choice("model.weight_observer", weight_observer, OBSERVERS)
    check_choice("model.act_observer", act_observer, OBSERVERS)
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"model.overrides must be a mapping {{layer pattern: {{w_bits, a_bits, skip}}}}; got {overrides!r}")


def _first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ConfigError(f"calibration batches must be tensors or (x, y) tuples; got {type(batch).__name__}")


class UniformQuantHooks:
    """Parts shared by PTQ and QAT (mixed in before :class:`Classifier`)."""

    def uniform_policy_from_hparams(self, fold: str):
        hp = self.hparams
        return uniform_policy(
            hp.w_bits,
            hp.a_bits,
            per_channel=hp.per_channel,
            observer=hp.weight_observer,
            act_observer=hp.act_observer,
            averaging_constant=hp.get("averaging_constant", 0.01),
            percentile=hp.get("percentile", 99.99),
            skip_first=hp.skip_first,
            skip_last=hp.skip_last,
            first_last_w_bits=hp.first_last_w_bits,
            overrides=hp.overrides,
            fold_bn=fold,
        )

    def is_int8(self) -> bool:
        """True when the method quantizes weights and activations with 8 bits (the int8 backend applies)."""
        return self.hparams.w_bits == 8 and self.hparams.a_bits == 8

    def deployed_callbacks(self) -> list:
        if not self.hparams.get("deployed_eval", False) or not self.is_int8():
            return []
        from ltq.callbacks.deployed import DeployedEvaluation

        return [DeployedEvaluation(backend=self.hparams.get("int8_backend", "ao_x86"))]


class PTQ(UniformQuantHooks, Classifier):
    """Post-training uniform quantization of an FP checkpoint (see module docstring).

    Args:
        w_bits: weight bits, 2..16.
        a_bits: activation (layer input) bits, 2..16, or null for float activations.
        per_channel: one weight scale per output channel (else per tensor).
        weight_observer: range estimator of the weights (``minmax`` | ``current`` | ``ema`` |
            ``percentile`` | ``mse``).
        act_observer: range estimator of the activations over the calibration batches:
            ``minmax`` (running min/max, the TFLite original), ``ema``, ``percentile``, ``mse``.
        percentile: percentile of the percentile observer.
        calib_batches: number of calibration batches (> 0).
        calib_batch_size: their batch size (null: the DataModule's ``batch_size``).
        fold_bn: fold conv→BN pairs before quantizing (exact). If false BN stays a float layer.
        skip_first, skip_last: keep the first conv / last Linear in float.
        first_last_w_bits: instead quantize the weights (only) of the first/last layer with these bits.
        overrides: ``{fnmatch pattern: {w_bits, a_bits, skip}}`` per layer.
        deployed_eval: at test time also evaluate the real int8 model (8-bit models only).
        int8_backend: int8 backend name (``ao_x86``).
        save_calibrated: after lazy calibration, save ``<checkpoint dir>/calibrated.ckpt`` when
            the trainer has a ModelCheckpoint.
        **kwargs: everything :class:`Classifier` takes (``backbone``, ``fp_checkpoint``, ...).
    """

    method_name = "ptq"

    def __init__(
        self,
        w_bits: int = 8,
        a_bits: int | None = 8,
        per_channel: bool = True,
        weight_observer: str = "minmax",
        act_observer: str = "minmax",
        percentile: float = 99.99,
        calib_batches: int = 32,
        calib_batch_size: int | None = None,
        fold_bn: bool = True,
        skip_first: bool = True,
        skip_last: bool = True,
        first_last_w_bits: int | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        deployed_eval: bool = True,
        int8_backend: str = "ao_x86",
        save_calibrated: bool = True,
        **kwargs: Any,
    ) -> None:
        validate_uniform_args(w_bits, a_bits, per_channel, weight_observer, act_observer, first_last_w_bits, overrides)
        if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches <= 0:
            raise ConfigError(f"model.calib_batches={calib_batches!r} is not supported; allowed: an integer >= 1")
        if calib_batch_size is not None and (not isinstance(calib_batch_size, int) or calib_batch_size <= 0):
            raise ConfigError(f"model.calib_batch_size={calib_batch_size!r} is not supported; allowed: an integer >= 1 or null")
        from ltq.export import BACKENDS

        check_choice("model.int8_backend", int8_backend, BACKENDS)
        super().__init__(**kwargs)
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.uint8))

    # ------------------------------------------------------------------ model surgery
    def quantize(self, model: nn.Module) -> nn.Module:
        return quantize_model(model, self.uniform_policy_from_hparams("fold" if self.hparams.fold_bn else "none"))

    # ------------------------------------------------------------------ calibration
    def calibration_loader(self) -> Iterable:
        """The DataModule's deterministic calibration loader (``calib_batches`` × ``calib_batch_size``)."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise ConfigError(
                "PTQ calibration needs a DataModule with calibration_dataloader() (ltq.data.*), "
                "or call PTQ.calibrate(loader) yourself"
            )
        return dm.calibration_dataloader(self.hparams.calib_batches, self.hparams.calib_batch_size)

    @torch.no_grad()
    def calibrate(self, loader: Iterable | None = None, num_batches: int | None = None) -> int:
        """Estimate every quantizer's range from ``loader`` (default :meth:`calibration_loader`).

        Runs at most ``num_batches`` (default ``calib_batches``) batches through the network in
        eval mode (BatchNorm and dropout untouched) with fresh observers and fake quantization
        off; afterwards observers are off and fake quantization on. Deterministic for a
        deterministic loader. Returns the number of batches used; zero raises ConfigError.
        """
        limit = self.hparams.calib_batches if num_batches is None else num_batches
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ConfigError(f"calibration num_batches={limit!r} is not supported; allowed: an integer >= 1")
        if loader is None:
            loader = self.calibration_loader()
        was_training = self.model.training
        self.model.eval()
        for _, q in iter_quantizers(self.model):
            obs = getattr(q, "observer", None)
            if obs is not None and hasattr(obs, "reset"):
                obs.reset()
        set_observers_enabled(self.model, True)
        set_fake_quant_enabled(self.model, False)
        n = 0
        try:
            for batch in loader:
                if n >= limit:
                    break
                self.model(_first_tensor(batch).to(self.device))
                n += 1
        finally:
            set_observers_enabled(self.model, False)
            set_fake_quant_enabled(self.model, True)
            self.model.train(was_training)
        if n == 0:
            raise ConfigError(
                "PTQ calibration got zero batches (the calibration loader is empty); allowed: model.calib_batches >= 1 "
                "and a training split with at least one image"
            )
        self.calibrated.fill_(1)
        return n

    def ensure_calibrated(self) -> None:
        """Calibrate now unless the ``calibrated`` buffer says it was done (e.g. loaded from a checkpoint)."""
        if bool(self.calibrated):
            return
        if not self.hparams.fp_checkpoint:
            raise ConfigError(
                "PTQ needs model.fp_checkpoint (a trained full-precision checkpoint of the same backbone): without it "
                "it would calibrate a randomly initialised network; or pass --ckpt_path of a calibrated PTQ checkpoint"
            )
        n = self.calibrate()
        log.info(
            "PTQ: calibrated %d quantizers on %d batches (w_bits=%s, a_bits=%s, act_observer=%s)",
            sum(1 for _ in iter_quantizers(self.model)), n, self.hparams.w_bits, self.hparams.a_bits, self.hparams.act_observer,
        )  # fmt: skip
        self._save_calibrated()

    def _save_calibrated(self) -> None:
        trainer = self._trainer
        if trainer is None or not self.hparams.save_calibrated:
            return
        cb = trainer.checkpoint_callback
        if cb is None:
            return
        dirpath = getattr(cb, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(dirpath, "calibrated.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        log.info("PTQ: saved the calibrated model to %s", path)

    def on_validation_start(self) -> None:
        self.ensure_calibrated()

    def on_test_start(self) -> None:
        self.ensure_calibrated()

    def on_predict_start(self) -> None:
        self.ensure_calibrated()

    # ------------------------------------------------------------------ no training
    def training_step(self, batch, batch_idx):
        raise ConfigError("PTQ does not train; run `ltq test` (or `ltq validate`) with this config, or use QAT")

    def configure_optimizers(self):
        raise ConfigError("PTQ does not train; run `ltq test` (or `ltq validate`) with this config, or use QAT")

    def configure_callbacks(self):
        return self.deployed_callbacks()
