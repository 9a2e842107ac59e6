"""Evaluate the *deployed* int8 model next to the fake-quant one during ``trainer.test``.

At ``on_test_epoch_start`` (after the method's ``on_test_start``, where PTQ calibrates) the
callback converts the LightningModule's network with an int8 backend (:mod:`ltq.export`,
default ``ao_x86``: real int8 kernels on the CPU), then runs every test batch through the
converted model on the CPU as well, and at the end of the epoch logs

* ``test/deployed_acc1`` — top-1 accuracy of the int8 model,
* ``test/deployed_acc1_delta`` — ``deployed_acc1 − test/acc1`` (the fake-quant accuracy the
  method logs), i.e. what deployment costs (or gains).

Counts are summed over DDP ranks before dividing. A model that cannot run in int8 (e.g. 4-bit
weights) is skipped with one log line (``on_unsupported="skip"``, the default) or raises
:class:`~ltq.errors.ConfigError` (``"error"``). With ``save_to`` the converted model is also
written there as TorchScript (load it with ``torch.jit.load``; see :mod:`ltq.export`).

The int8 model needs calibration data only for the few quantization points ltq does not
simulate (conv outputs feeding a residual add, ...): it reads ``calib_batches`` batches of the
DataModule's ``calibration_dataloader`` (training images, eval transform).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ltq.errors import ConfigError, check_choice

log = logging.getLogger("ltq")

__all__ = ["DeployedEvaluation"]


class DeployedEvaluation(Callback):
    """Log the accuracy of the real int8 model during ``test`` (see module docstring).

    Args:
        backend: int8 backend name (:data:`ltq.export.BACKENDS`).
        calib_batches: calibration batches for the points ltq does not simulate.
        calib_batch_size: their batch size (None: the DataModule's).
        on_unsupported: ``"skip"`` or ``"error"`` when the model is not an 8-bit model.
        save_to: optional path of the TorchScript file to write after conversion.
        reduce_range: passed to the backend (``"auto"``, true, false).
    """

    def __init__(
        self,
        backend: str = "ao_x86",
        calib_batches: int = 8,
        calib_batch_size: int | None = None,
        on_unsupported: str = "skip",
        save_to: str | None = None,
        reduce_range: bool | str = "auto",
    ):
        from ltq.export import BACKENDS

        check_choice("DeployedEvaluation.backend", backend, BACKENDS)
        check_choice("DeployedEvaluation.on_unsupported", on_unsupported, ("skip", "error"))
        if not isinstance(calib_batches, int) or calib_batches < 1:
            raise ConfigError(f"DeployedEvaluation.calib_batches={calib_batches!r} must be a positive integer")
        self.backend = backend
        self.calib_batches = calib_batches
        self.calib_batch_size = calib_batch_size
        self.on_unsupported = on_unsupported
        self.save_to = save_to
        self.reduce_range = reduce_range
        self.deployed: torch.nn.Module | None = None
        self._correct = 0
        self._total = 0

    @property
    def state_key(self) -> str:
        return f"DeployedEvaluation{{backend={self.backend}}}"

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # not on_test_start: callbacks' on_test_start runs before the LightningModule's, where PTQ calibrates
        from ltq.export import check_int8, get_backend

        self.deployed = None
        self._correct = self._total = 0
        net = getattr(pl_module, "model", pl_module)
        try:
            check_int8(net)
        except ConfigError as exc:
            if self.on_unsupported == "error":
                raise
            rank_zero_info(f"ltq: deployed int8 evaluation skipped: {exc}")
            return
        dm = getattr(trainer, "datamodule", None)
        calib = None
        if dm is not None and hasattr(dm, "calibration_dataloader"):
            calib = dm.calibration_dataloader(self.calib_batches, self.calib_batch_size)
        if calib is None:
            raise ConfigError("DeployedEvaluation needs a DataModule with calibration_dataloader() (ltq.data.*)")
        backend = get_backend(self.backend, reduce_range=self.reduce_range, calib_batches=self.calib_batches)
        self.deployed = backend.convert(net, calib=calib)
        rep = self.deployed.ltq_int8_report
        rank_zero_info(
            f"ltq: deployed int8 model ({rep['backend']}, engine {rep['engine']}): {len(rep['int8_layers'])} int8 layers, "
            f"{rep['transferred_points']} activation ranges from ltq, {rep['calibrated_points']} calibrated"
        )
        if self.save_to and trainer.is_global_zero:
            x = next(iter(calib))
            x = x[0] if isinstance(x, (list, tuple)) else x
            path = backend.save(self.deployed, self.save_to, x[:1])
            rank_zero_info(f"ltq: wrote the int8 TorchScript model to {Path(path)}")

    @torch.no_grad()
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.deployed is None:
            return
        from ltq.export import quiet_ao

        x, y = batch[0], batch[1]
        with quiet_ao():
            pred = self.deployed(x.detach().float().cpu()).argmax(dim=1)
        self._correct += int((pred == y.detach().cpu()).sum())
        self._total += int(y.numel())

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.deployed is None:
            return
        counts = torch.tensor([float(self._correct), float(self._total)], device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[1] <= 0:
            return
        acc = counts[0] / counts[1]
        pl_module.log("test/deployed_acc1", acc, sync_dist=False)
        metric = getattr(pl_module, "test_acc1", None)
        if metric is not None and getattr(metric, "update_count", 1) > 0:
            fake = metric.compute().to(acc.device)
            pl_module.log("test/deployed_acc1_delta", acc - fake, sync_dist=False)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.deployed = None  # free the converted copy
