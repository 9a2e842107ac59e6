"""Requantization: keep the cached quantized weights of a model in step with its latent weights.

Some weight quantizers (TTQ's :class:`~ltq.quant.ttq.TTQQuantizer`) keep the latent
full-precision weight as the trained parameter and can store the quantized kernel derived from it
in a buffer, via ``quantizer.requantize(weight)``. The forward pass during training always
recomputes the quantized kernel from the latent weight; the cache is what evaluation, checkpoints
and export read. :class:`Requantize` refreshes every such cache

* after every optimizer step (``on_train_batch_end``),
* at the start of fit, validation, test and predict,

under ``torch.no_grad`` on whatever device the model lives on. It is generic: any weight quantizer
attached to a quantized layer (``weight_quantizer`` attribute) that has a callable ``requantize``
benefits; others are ignored.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

__all__ = ["Requantize", "requantize_model"]


@torch.no_grad()
def requantize_model(model: nn.Module) -> int:
    """Call ``weight_quantizer.requantize(layer.weight)`` for every layer that supports it.

    Returns the number of layers requantized.
    """
    n = 0
    for layer in model.modules():
        q = getattr(layer, "weight_quantizer", None)
        weight = getattr(layer, "weight", None)
        fn = getattr(q, "requantize", None)
        if q is None or weight is None or not callable(fn):
            continue
        fn(weight)
        n += 1
    return n


class Requantize(Callback):
    """Re-derive the cached quantized weights from the latent weights (see the module docstring).

    Args:
        every_n_steps: requantize after every n-th training batch (1 = after every optimizer
            step). The start-of-stage hooks always requantize.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            from ltq.errors import ConfigError

            raise ConfigError(f"Requantize.every_n_steps={every_n_steps!r} must be a positive integer")
        self.every_n_steps = every_n_steps
        self.count = 0  # number of layers requantized by the last call (for tests / logging)

    def _run(self, pl_module: LightningModule) -> None:
        self.count = requantize_model(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._run(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # with every_n_steps > 1 the end-of-epoch checkpoint still sees the latest weights
        if self.every_n_steps > 1:
            self._run(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(pl_module)
