"""Additive Powers-of-Two quantization (Li, Dong & Wang, ICLR 2020) as a LightningModule.

What the network computes
-------------------------
Every Conv2d/Linear except the first conv and the last FC gets two
:class:`~ltq.quant.apot.APoTQuantizer`: one on its weight (signed, ``bits - 1`` magnitude bits,
weight normalisation, learned clipping α) and one on its *input* activation (unsigned, ``bits``
bits, learned α), as the original's ``QuantConv2d``. The level set is APoT (default), PoT or
uniform (``mode``). The first conv and the last FC get weight-only uniform ``first_last_bits``
quantization (the original: 8 bits) with their inputs in floating point; ``first_last_bits:
null`` keeps them in floating point. BatchNorm stays in floating point.

``variant`` picks the original's CIFAR-10 or ImageNet semantics (see
:class:`~ltq.quant.apot.APoTQuantizer`): constant vs. differentiated weight-normalisation
statistics, unclipped ("calibrated") vs. clipped weight gradient, activation α 8 vs. 6.

Bits: 2..8. 2-bit weights are uniform ternary ``{-1, 0, 1}·α`` (calibrated gradient). APoT/PoT are
defined up to B = 6 level bits; above that (weights at 8 bits, activations at 7-8 bits) the
level set falls back to uniform (a warning says so once).

First/last layers: ltq uses its uniform symmetric quantizer (``max|w|`` range); the original
scales by the signed maximum ``w.max()`` without clamping (a quirk that is not reproduced).

How it is trained
-----------------
Plain backprop with the straight-through gradients of :mod:`ltq.quant.apot`. The α parameters
have their own parameter groups (the original CIFAR-10 script: activation α lr 0.1, weight α
lr 0.02, both weight decay 1e-4; the lr schedule scales every group). ``*_alpha_lr: null`` puts
them in the default group (the original ImageNet script).

Progressive initialisation (the original's 32 → 4 → 3 → 2 bits): ``init_checkpoint`` loads a
Lightning checkpoint or state_dict of the same backbone — an FP model or an APoT model at another
bit-width — into the quantized model with ``strict=False``, after quantization. Missing and
unexpected keys are reported in a warning; the α of an FP checkpoint are missing by nature and
keep their initial values (said in one line). A shape mismatch is an error.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from ltq.errors import ConfigError, check_choice
from ltq.methods.base import Classifier, checkpoint_hparams, load_state_dict_file
from ltq.nn import QuantPolicy, UniformQuantizerFactory, iter_quant_layers, quantize_model
from ltq.quant.apot import MODES, VARIANTS, APoTQuantizer, levels_fallback

log = logging.getLogger("ltq")

__all__ = ["APoT", "APoTQuantizerFactory"]


class APoTQuantizerFactory:
    """Picklable ``(name, layer, bits) -> APoTQuantizer`` for weights or input activations."""

    def __init__(self, signed: bool, mode: str = "apot", variant: str = "cifar",
                 alpha_init: float | None = None, grad_scale: float | None = None):
        self.signed, self.mode, self.variant = signed, mode, variant
        self.alpha_init, self.grad_scale = alpha_init, grad_scale

    def __call__(self, name: str, module: nn.Module, bits: int) -> APoTQuantizer:
        return APoTQuantizer(bits, signed=self.signed, mode=self.mode, variant=self.variant,
                             alpha_init=self.alpha_init, grad_scale=self.grad_scale)

    def to_dict(self) -> dict:
        return {"type": "apot", "signed": self.signed, "mode": self.mode, "variant": self.variant,
                "alpha_init": self.alpha_init, "grad_scale": self.grad_scale}


def _is_quantizer_key(key: str) -> bool:
    return "weight_quantizer." in key or "act_quantizer." in key


class APoT(Classifier):
    """APoT / PoT / uniform quantization of weights and activations with learned clipping.

    Args:
        bits: bit-width of weights and activations, 2..8 (the original: 2..5).
        mode: ``apot`` | ``pot`` | ``uniform`` level set.
        variant: ``cifar`` | ``imagenet`` semantics of the original's two implementations.
        weight_alpha_init, act_alpha_init: initial α (None: 3.0; 8.0 cifar / 6.0 imagenet).
        grad_scale: optional factor on every α-gradient.
        act_alpha_lr, act_alpha_wd, weight_alpha_lr, weight_alpha_wd: the α parameter groups
            (lr ``null``: α stay in the default group).
        first_last_bits: weight-only uniform bits of the first conv and last FC (None: float).
        quantize_activations: false quantizes weights only.
        init_checkpoint: progressive initialisation from a higher-bit APoT or FP checkpoint
            (non-strict, reported; see the module docstring).
        skip_first, skip_last, overrides: quantization policy, as :class:`~ltq.nn.QuantPolicy`.
        log_alphas: log every layer's α (``apot/<layer>/{weight_alpha,act_alpha}``) at
            validation epoch end.
        Others: as :class:`~ltq.methods.base.Classifier` (defaults: the original CIFAR-10
            quantized recipe, SGD lr 0.04 momentum 0.9 wd 1e-4, ×0.1 at epochs 150 and 225).
    """

    method_name = "apot"

    def __init__(
        self,
        bits: int = 4,
        mode: str = "apot",
        variant: str = "cifar",
        weight_alpha_init: float | None = None,
        act_alpha_init: float | None = None,
        grad_scale: float | None = None,
        act_alpha_lr: float | None = 0.1,
        act_alpha_wd: float = 1e-4,
        weight_alpha_lr: float | None = 0.02,
        weight_alpha_wd: float = 1e-4,
        first_last_bits: int | None = 8,
        quantize_activations: bool = True,
        init_checkpoint: str | None = None,
        skip_first: bool = True,
        skip_last: bool = True,
        overrides: dict[str, dict] | None = None,
        log_alphas: bool = True,
        backbone: str = "resnet20",
        num_classes: int = 10,
        in_channels: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.04,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        scheduler: str = "multistep",
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
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(
                f"model.bits={bits!r} is not supported by APoT; allowed: 2, 3, 4, 5, 6, 7, 8 "
                "(2-5 as the original; where APoT/PoT is undefined at 6-8 the levels fall back to uniform)"
            )
        check_choice("model.mode", mode, MODES)
        check_choice("model.variant", variant, VARIANTS)
        if first_last_bits is not None and (isinstance(first_last_bits, bool) or not isinstance(first_last_bits, int)
                                            or not 2 <= first_last_bits <= 16):
            raise ConfigError(f"model.first_last_bits={first_last_bits!r} is not supported; allowed: 2..16 or null (float)")
        for opt, v in (("weight_alpha_init", weight_alpha_init), ("act_alpha_init", act_alpha_init)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"model.{opt}={v!r} must be a positive number or null (the original's default)")
        for opt, v in (("act_alpha_lr", act_alpha_lr), ("weight_alpha_lr", weight_alpha_lr)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"model.{opt}={v!r} must be a positive number or null (= the default group)")
        for opt, v in (("act_alpha_wd", act_alpha_wd), ("weight_alpha_wd", weight_alpha_wd)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"model.{opt}={v!r} must be a number >= 0")
        fallback = [kind for kind, B in (("weights", bits - 1), ("activations", bits)) if levels_fallback(B, mode)]
        if fallback:
            warnings.warn(
                f"APoT: mode={mode!r} at {bits} bits is undefined for {' and '.join(fallback)}; "
                f"uniform levels are used there instead", stacklevel=2,
            )
        super().__init__(
            backbone=backbone, num_classes=num_classes, in_channels=in_channels, backbone_kwargs=backbone_kwargs,
            optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas,
            scheduler=scheduler, milestones=milestones, gamma=gamma, step_size=step_size, t_max=t_max,
            plateau_patience=plateau_patience, plateau_threshold=plateau_threshold, warmup_epochs=warmup_epochs,
            param_groups=param_groups, fp_checkpoint=fp_checkpoint, freeze=freeze,
        )
        self.init_report: dict[str, list[str]] = {}
        if init_checkpoint:
            self.init_report = self.load_init_checkpoint(init_checkpoint)

    # ------------------------------------------------------------------ model surgery
    def quantize(self, model: nn.Module) -> nn.Module:
        hp = self.hparams
        wf = APoTQuantizerFactory(True, hp.mode, hp.variant, hp.weight_alpha_init, hp.grad_scale)
        af = APoTQuantizerFactory(False, hp.mode, hp.variant, hp.act_alpha_init, hp.grad_scale)
        first_last = None
        if hp.first_last_bits is not None:
            first_last = UniformQuantizerFactory(symmetric=True, per_channel=False, observer="current", sync=False)
        policy = QuantPolicy(
            weight=wf,
            act=af if hp.quantize_activations else None,
            w_bits=hp.bits,
            a_bits=hp.bits if hp.quantize_activations else None,
            skip_first=hp.skip_first,
            skip_last=hp.skip_last,
            first_last_w_bits=hp.first_last_bits,
            first_last_weight=first_last,
            overrides=dict(hp.overrides or {}),
        )
        return quantize_model(model, policy)

    def apot_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of the layers with an APoT weight or activation quantizer."""
        return [
            (name, layer)
            for name, layer in iter_quant_layers(self.model)
            if isinstance(layer.weight_quantizer, APoTQuantizer) or isinstance(layer.act_quantizer, APoTQuantizer)
        ]

    # ------------------------------------------------------------------ progressive initialisation
    def load_init_checkpoint(self, path: str) -> dict[str, list[str]]:
        """Load ``path`` into the quantized model (non-strict) and report what did not match.

        Returns ``{"missing": [...], "unexpected": [...], "missing_quantizer": [...]}``. Raises
        :class:`ConfigError` for another backbone or a shape mismatch.
        """
        hp = checkpoint_hparams(path)
        if hp.get("backbone") not in (None, self.hparams.backbone):
            raise ConfigError(
                f"model.init_checkpoint {path!r} was trained with backbone {hp['backbone']!r}, but model.backbone is {self.hparams.backbone!r}"
            )
        state = load_state_dict_file(path)
        own = self.model.state_dict()
        shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape and own[k].numel() > 0)
        if shape:
            k = shape[0]
            raise ConfigError(
                f"model.init_checkpoint {path!r} does not fit backbone {self.hparams.backbone!r}: shape mismatch in "
                f"{len(shape)} keys, e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            )
        result = self.model.load_state_dict(state, strict=False)
        missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
        missing_q = [k for k in missing if _is_quantizer_key(k)]
        missing_other = [k for k in missing if not _is_quantizer_key(k)]
        source_has_quant = any(_is_quantizer_key(k) for k in state)
        log.info("APoT: initialised from %s (%d tensors)", path, len(state) - len(unexpected))
        if missing_q:
            if not source_has_quant:
                log.warning(
                    "APoT: init_checkpoint %s is a full-precision checkpoint: its %d quantizer keys (clipping α, "
                    "first/last observers) are missing as expected and keep their initial values",
                    path, len(missing_q),
                )
            else:
                log.warning("APoT: init_checkpoint %s lacks %d quantizer keys (they keep their initial values): %s",
                            path, len(missing_q), ", ".join(missing_q))
        if missing_other:
            log.warning("APoT: init_checkpoint %s lacks %d model keys (they keep their initial values): %s",
                        path, len(missing_other), ", ".join(missing_other))
        if unexpected:
            log.warning("APoT: init_checkpoint %s has %d keys this model does not use (ignored): %s",
                        path, len(unexpected), ", ".join(unexpected))
        return {"missing": missing, "unexpected": unexpected, "missing_quantizer": missing_q}

    # ------------------------------------------------------------------ optimizers
    def param_group_overrides(self) -> list[dict[str, Any]]:
        hp = self.hparams
        groups = []
        if hp.act_alpha_lr is not None:
            groups.append({"pattern": "*act_quantizer.alpha", "lr": hp.act_alpha_lr, "weight_decay": hp.act_alpha_wd})
        if hp.weight_alpha_lr is not None:
            groups.append({"pattern": "*weight_quantizer.alpha", "lr": hp.weight_alpha_lr, "weight_decay": hp.weight_alpha_wd})
        return groups

    # ------------------------------------------------------------------ α inspection
    @torch.no_grad()
    def alphas(self) -> dict[str, dict[str, float | None]]:
        """``{layer: {"weight_alpha": float | None, "act_alpha": float | None}}`` (host values)."""
        out = {}
        for name, layer in self.apot_layers():
            wq, aq = layer.weight_quantizer, layer.act_quantizer
            out[name] = {
                "weight_alpha": float(wq.alpha) if isinstance(wq, APoTQuantizer) else None,
                "act_alpha": float(aq.alpha) if isinstance(aq, APoTQuantizer) else None,
            }
        return out

    def show_params(self) -> str:
        """Print (and log) every layer's weight and activation clipping α, one line per layer."""
        def fmt(v):
            return "   -  " if v is None else f"{v:6.3f}"

        lines = [f"{'layer':40s} {'weight α':>8s} {'act α':>8s}"]
        for name, a in self.alphas().items():
            lines.append(f"{name:40s} {fmt(a['weight_alpha']):>8s} {fmt(a['act_alpha']):>8s}")
        text = "\n".join(lines)
        print(text)
        log.info("APoT clipping thresholds:\n%s", text)
        return text

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.hparams.log_alphas or (self.trainer is not None and self.trainer.sanity_checking):
            return
        for name, layer in self.apot_layers():
            for attr, key in (("weight_quantizer", "weight_alpha"), ("act_quantizer", "act_alpha")):
                q = getattr(layer, attr)
                if isinstance(q, APoTQuantizer):
                    self.log(f"apot/{name}/{key}", q.alpha.detach())
