"""Trained Ternary Quantization (Zhu et al., ICLR 2017) as a LightningModule.

What the network computes
-------------------------
Every Conv2d/Linear except the first conv and the last FC (or classifier conv) gets a
:class:`~ltq.quant.ttq.TTQQuantizer` on its weight: the layer keeps its latent full-precision
weight ``W`` (its ``weight`` Parameter) and the forward pass uses the ternary kernel
``{-w_n, 0, +w_p}`` with the threshold ``Δ = t·max|W|`` and learned per-layer scales. Activations,
BatchNorm, the first conv and the classifier stay in floating point (``skip_first``,
``skip_last``, ``overrides`` change the policy). ``freeze_first_conv`` stops training the first
conv's weight, as the original did.

How it is trained
-----------------
Plain backprop with TTQ's gradients (see :mod:`ltq.quant.ttq`): the latent weights get the
gradient scaled by ``w_p`` / 1 / ``w_n`` in the three regions, the scales get ``Σ_{I_p} g`` and
``-Σ_{I_n} g`` (``mode="original"``: ``+Σ``). One optimizer with three parameter groups: the
latent weights of the quantized layers (``lr_latent``, ``weight_decay_latent``), the scales
(``lr_scales``, ``weight_decay_scales``) and everything else (``lr``, ``weight_decay``); the
original used Adam with the same lr for all three and L2 1e-4 on the classifier weight only
(``param_groups`` patterns, which take precedence, express that). A :class:`~ltq.callbacks.
requantize.Requantize` callback is attached automatically (``configure_callbacks``), so the
``weight_q`` buffers in validation, checkpoints and export hold the ternary kernels of the latest
latent weights.

Logged at the end of every validation epoch (``self.log``): ``ttq/sparsity`` (unweighted mean over
the quantized kernels of the fraction of zeros, as the original reports it),
``ttq/sparsity_weighted`` (zeros / parameters over all quantized kernels), and per layer
``ttq/<layer>/{sparsity,w_p,w_n}`` (``log_per_layer``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ltq.errors import ConfigError, check_choice
from ltq.methods.base import Classifier
from ltq.nn import QuantPolicy, iter_quant_layers, quantize_model
from ltq.quant.ttq import TTQQuantizer

__all__ = ["TTQ", "TTQWeightFactory"]


class TTQWeightFactory:
    """Picklable ``(name, layer, bits) -> TTQQuantizer`` for :func:`~ltq.nn.quantize_model`."""

    def __init__(self, t: float = 0.05, mode: str = "paper", scale_init: str = "mean"):
        self.t, self.mode, self.scale_init = t, mode, scale_init

    def __call__(self, name: str, module: nn.Module, bits: int) -> TTQQuantizer:
        return TTQQuantizer(t=self.t, mode=self.mode, scale_init=self.scale_init)

    def to_dict(self) -> dict:
        return {"type": "ttq", "t": self.t, "mode": self.mode, "scale_init": self.scale_init}


class TTQ(Classifier):
    """Trained Ternary Quantization of the weights (see the module docstring).

    Args:
        t: threshold factor, ``Δ = t·max|W|`` per layer (original recipes: 0.05 small DenseNet,
            0.15 DenseNet-121 and SqueezeNet).
        mode: ``paper`` (correct w_n gradient) | ``original`` (the original repo's sign, its issue #6).
        scale_init: ``mean`` (scales from the latent weights at the first forward) | ``ones``
            (the original's 1.0, which causes a loss spike at the start of training).
        freeze_first_conv: do not train the first conv's weight (the original did this).
        lr_latent, weight_decay_latent: optimizer settings of the latent weights of the
            quantized layers (``lr_latent=None``: ``lr``).
        lr_scales, weight_decay_scales: optimizer settings of the scales w_p, w_n
            (``lr_scales=None``: ``lr``).
        skip_first, skip_last, overrides: quantization policy, as :class:`~ltq.nn.QuantPolicy`.
        log_per_layer: log every layer's sparsity, w_p and w_n at validation epoch end.
        Others: as :class:`~ltq.methods.base.Classifier` (start from an FP model with
            ``fp_checkpoint``).
    """

    method_name = "ttq"

    def __init__(
        self,
        t: float = 0.05,
        mode: str = "paper",
        scale_init: str = "mean",
        freeze_first_conv: bool = False,
        lr_latent: float | None = None,
        weight_decay_latent: float = 0.0,
        lr_scales: float | None = None,
        weight_decay_scales: float = 0.0,
        skip_first: bool = True,
        skip_last: bool = True,
        overrides: dict[str, dict] | None = None,
        log_per_layer: bool = True,
        backbone: str = "densenet_small",
        num_classes: int = 200,
        in_channels: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        scheduler: str = "plateau",
        milestones: Sequence[int] = (150, 225),
        gamma: float = 0.1,
        step_size: int = 30,
        t_max: int | None = None,
        plateau_patience: int = 4,
        plateau_threshold: float = 0.01,
        warmup_epochs: int = 0,
        param_groups: list[dict[str, Any]] | None = None,
        fp_checkpoint: str | None = None,
        freeze: list[str] | None = None,
    ) -> None:
        check_choice("model.mode", mode, ("paper", "original"))
        check_choice("model.scale_init", scale_init, ("mean", "ones"))
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise ConfigError(f"model.t={t!r} is not supported by TTQ; allowed: a number in [0, 1)")
        for opt, v in (("lr_latent", lr_latent), ("lr_scales", lr_scales)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"model.{opt}={v!r} must be a positive number or null (= model.lr)")
        for opt, v in (("weight_decay_latent", weight_decay_latent), ("weight_decay_scales", weight_decay_scales)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"model.{opt}={v!r} must be a number >= 0")
        super().__init__(
            backbone=backbone, num_classes=num_classes, in_channels=in_channels, backbone_kwargs=backbone_kwargs,
            optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas,
            scheduler=scheduler, milestones=milestones, gamma=gamma, step_size=step_size, t_max=t_max,
            plateau_patience=plateau_patience, plateau_threshold=plateau_threshold, warmup_epochs=warmup_epochs,
            param_groups=param_groups, fp_checkpoint=fp_checkpoint, freeze=freeze,
        )

    # ------------------------------------------------------------------ model surgery
    def quantize(self, model: nn.Module) -> nn.Module:
        hp = self.hparams
        factory = TTQWeightFactory(t=float(hp.t), mode=hp.mode, scale_init=hp.scale_init)
        policy = QuantPolicy(
            weight=factory, act=None, w_bits=2, a_bits=None,
            skip_first=hp.skip_first, skip_last=hp.skip_last, overrides=dict(hp.overrides or {}),
        )
        model = quantize_model(model, policy)
        if hp.freeze_first_conv:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            if first is None:
                raise ConfigError(f"model.freeze_first_conv=true but backbone {hp.backbone!r} has no Conv2d")
            first.weight.requires_grad_(False)
        return model

    def ttq_layers(self) -> list[tuple[str, nn.Module, TTQQuantizer]]:
        """``(name, layer, quantizer)`` of every TTQ-quantized layer, in module order."""
        return [
            (name, layer, layer.weight_quantizer)
            for name, layer in iter_quant_layers(self.model)
            if isinstance(layer.weight_quantizer, TTQQuantizer)
        ]

    def configure_callbacks(self):
        from ltq.callbacks.requantize import Requantize

        trainer = getattr(self, "_trainer", None)
        if trainer is not None and any(isinstance(c, Requantize) for c in trainer.callbacks):
            return []  # already attached (a user-configured one, or ours from an earlier stage)
        return [Requantize()]

    # ------------------------------------------------------------------ optimizers
    def build_param_groups(self) -> list[dict[str, Any]]:
        """The base groups, with the default group split into latent weights / scales / the rest.

        Parameters matched by a user ``param_groups`` pattern stay in that group.
        """
        hp = self.hparams
        latent_ids, scale_ids = set(), set()
        for _, layer, q in self.ttq_layers():
            latent_ids.add(id(layer.weight))
            scale_ids.update((id(q.w_p), id(q.w_n)))
        groups = super().build_param_groups()
        out: list[dict[str, Any]] = []
        for g in groups:
            if g.get("name") != "default":
                out.append(g)
                continue
            rest = [p for p in g["params"] if id(p) not in latent_ids and id(p) not in scale_ids]
            latent = [p for p in g["params"] if id(p) in latent_ids]
            scales = [p for p in g["params"] if id(p) in scale_ids]
            if rest:
                out.append({**g, "params": rest})
            if latent:
                out.append({"params": latent, "name": "ttq_latent", "lr": hp.lr_latent or hp.lr,
                            "weight_decay": hp.weight_decay_latent})
            if scales:
                out.append({"params": scales, "name": "ttq_scales", "lr": hp.lr_scales or hp.lr,
                            "weight_decay": hp.weight_decay_scales})
        return out

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def sparsity_stats(self) -> dict[str, torch.Tensor]:
        """``{"sparsity", "sparsity_weighted", "<layer>/sparsity", "<layer>/w_p", "<layer>/w_n"}``.

        Read from the quantizers' last forward/requantization (no host synchronisation).
        """
        layers = self.ttq_layers()
        out: dict[str, torch.Tensor] = {}
        if not layers:
            return out
        per_layer, zeros, total = [], [], 0
        for name, layer, q in layers:
            s = q.sparsity.detach()
            per_layer.append(s)
            n = layer.weight.numel()
            zeros.append(s * n)
            total += n
            out[f"{name}/sparsity"] = s.clone()
            out[f"{name}/w_p"] = q.w_p.detach().clone()
            out[f"{name}/w_n"] = q.w_n.detach().clone()
        out["sparsity"] = torch.stack(per_layer).mean()
        out["sparsity_weighted"] = torch.stack(zeros).sum() / total
        return out

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer is not None and self.trainer.sanity_checking:
            return
        stats = self.sparsity_stats()
        if not stats:
            return
        self.log("ttq/sparsity", stats.pop("sparsity"))
        self.log("ttq/sparsity_weighted", stats.pop("sparsity_weighted"))
        if self.hparams.log_per_layer:
            for key, value in stats.items():
                self.log(f"ttq/{key}", value)
