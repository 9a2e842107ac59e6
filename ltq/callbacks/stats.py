"""Quantization statistics and the per-run summary row.

:class:`QuantStats` logs, every ``every_n_epochs`` validation epochs, each quantizer's ``stats()``
(scales, α, w_p/w_n, sparsity, ...) as ``quant/<layer>/<key>`` and, with a logger that supports
them (W&B, TensorBoard), weight histograms of the quantized layers. After ``test`` it writes one
summary row per run — method, backbone, dataset, bits, top-1, top-5, deployed top-1, model size
and sparsity — to ``<default_root_dir>/summary.json`` (read by ``ltq report``) and to the W&B run
summary, so a W&B dashboard can group and compare methods.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ltq.nn import iter_quant_layers

log = logging.getLogger("ltq")


def quantized_sparsity(model: torch.nn.Module) -> tuple[float, float] | None:
    """(unweighted mean over layers, parameter-weighted) fraction of zero quantized weights."""
    fracs, zeros, total = [], 0, 0
    with torch.no_grad():
        for _, layer in iter_quant_layers(model):
            qw = getattr(layer, "quantized_weight", None)
            if qw is None or getattr(layer, "weight_quantizer", None) is None:
                continue
            w = qw()
            z = int((w == 0).sum())
            fracs.append(z / w.numel())
            zeros, total = zeros + z, total + w.numel()
    if not fracs:
        return None
    return sum(fracs) / len(fracs), zeros / total


def run_summary(pl_module: L.LightningModule, trainer: L.Trainer) -> dict[str, Any]:
    """The summary row of a run, from the module's hyper-parameters and the logged metrics."""
    from ltq.quant import size_report

    hp = dict(pl_module.hparams)
    is_fp = getattr(pl_module, "method_name", "") == "fp"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    _, total = size_report(pl_module.model)
    dm = trainer.datamodule
    row: dict[str, Any] = {
        "method": getattr(pl_module, "method_name", type(pl_module).__name__.lower()),
        "backbone": hp.get("backbone"),
        "dataset": getattr(dm, "name", type(dm).__name__ if dm is not None else None),
        "w_bits": hp.get("w_bits", hp.get("bits", 32 if is_fp else None)),
        "a_bits": hp.get("a_bits", 32 if is_fp else None),
        "top1": metrics.get("test/acc1"),
        "top5": metrics.get("test/acc5"),
        "deployed_top1": metrics.get("test/deployed_acc1"),
        "val_top1": _best_val(trainer, metrics),
        "size_bytes": total.get("bytes"),
        "size_ratio": total.get("ratio"),
        "params": total.get("params"),
        "root": str(trainer.default_root_dir),
    }
    sp = quantized_sparsity(pl_module.model)
    if sp is not None:
        row["sparsity"], row["sparsity_weighted"] = sp
    return row


class QuantStats(L.Callback):
    """Log quantizer statistics and weight histograms; write the run's summary row after testing.

    Args:
        every_n_epochs: log statistics/histograms every this many validation epochs (0 = never).
        histograms: also log weight histograms (W&B and TensorBoard loggers only).
        summary: write ``summary.json`` (and the W&B summary) after ``test``.
    """

    def __init__(self, every_n_epochs: int = 1, histograms: bool = True, summary: bool = True) -> None:
        if every_n_epochs < 0:
            from ltq.errors import ConfigError

            raise ConfigError(f"QuantStats.every_n_epochs={every_n_epochs} must be >= 0")
        self.every_n_epochs = every_n_epochs
        self.histograms = histograms
        self.summary = summary

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_epochs or trainer.current_epoch % self.every_n_epochs:
            return
        stats = getattr(pl_module, "quant_stats", lambda: {})()
        if stats:
            pl_module.log_dict({f"quant/{k}": v.float().mean() for k, v in stats.items()}, on_epoch=True, sync_dist=False)
        if self.histograms and trainer.is_global_zero:
            self._histograms(trainer, pl_module)

    def _histograms(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = [(n, m) for n, m in iter_quant_layers(pl_module.model) if getattr(m, "weight_quantizer", None) is not None]
        if not layers:
            return
        for logger in trainer.loggers:
            kind = type(logger).__name__
            with torch.no_grad():
                if kind == "WandbLogger":
                    import wandb

                    data = {f"hist/{n}": wandb.Histogram(m.quantized_weight().detach().float().cpu().numpy()) for n, m in layers}
                    data.update({f"hist_latent/{n}": wandb.Histogram(m.weight.detach().float().cpu().numpy()) for n, m in layers})
                    logger.experiment.log({**data, "trainer/global_step": trainer.global_step})
                elif kind == "TensorBoardLogger":
                    for n, m in layers:
                        logger.experiment.add_histogram(f"hist/{n}", m.quantized_weight().detach().float().cpu(), trainer.global_step)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.summary or not trainer.is_global_zero or trainer.fast_dev_run:
            return
        row = run_summary(pl_module, trainer)
        path = Path(trainer.default_root_dir) / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2, default=_json_default))
        log.info("summary row written to %s", path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.summary.update({k: v for k, v in row.items() if v is not None})


def _best_val(trainer: L.Trainer, metrics: dict[str, float]) -> float | None:
    ckpt = trainer.checkpoint_callback
    score = getattr(ckpt, "best_model_score", None) if ckpt is not None else None
    if score is not None and getattr(ckpt, "monitor", None) == "val/acc1":
        return float(score)
    return metrics.get("val/acc1")


def _json_default(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
