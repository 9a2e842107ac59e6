"""Quantized layers and model-walking helpers.

:class:`QuantConv2d` / :class:`QuantLinear` are drop-in subclasses of ``nn.Conv2d`` / ``nn.Linear``
that apply an optional *input activation quantizer* and an optional *weight quantizer* before
the usual ``F.conv2d`` / ``F.linear``::

    y = conv(act_quantizer(x), weight_quantizer(W), b)

``from_float`` reuses the *same* ``Parameter`` objects as the float layer, so an optimizer (or
any state) built before quantization keeps updating the weights, and the state_dict keys of the
layer stay ``weight`` / ``bias``; the quantizers add keys under ``weight_quantizer.*`` and
``act_quantizer.*``. The bias is never quantized here (at deployment it becomes int32 with scale
``s_w·s_x``).

BatchNorm freezing
------------------
:func:`freeze_bn_stats` makes BatchNorm layers normalise with their *running* statistics and stop
updating them, while γ and β keep training:

* :class:`~ltq.nn.convbn.QuantConvBn2d` has a ``bn_frozen`` buffer (saved in checkpoints);
* a plain ``BatchNorm1d/2d/3d`` or ``SyncBatchNorm`` gets its ``__class__`` switched in place to a
  frozen subclass (:class:`FrozenBatchNorm2d`, …) whose ``forward`` always uses the running
  statistics. The module object, its parameters, buffers, hooks and state_dict keys are unchanged
  (so optimizers, DDP and checkpoints are unaffected), and — unlike ``bn.eval()`` — a later
  ``model.train()`` (which Lightning calls every epoch) does not undo it. (``momentum = 0`` would
  not do: it stops the running update but still normalises with batch statistics.)
  :func:`unfreeze_bn_stats` switches the class back. A checkpoint does not record the freeze of a
  plain BN: re-apply it after loading (the freezing callback does so on resume).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ltq.errors import ConfigError

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "quant_layer_types",
    "iter_quant_layers",
    "iter_quantizers",
    "set_observers_enabled",
    "set_fake_quant_enabled",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "is_bn_frozen",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenSyncBatchNorm",
]


class _QuantMixin:
    """Shared parts of the quantized layers: quantizer slots and the inspection helpers."""

    def _init_quantizers(self, weight_quantizer, act_quantizer) -> None:
        self.register_module("weight_quantizer", weight_quantizer)
        self.register_module("act_quantizer", act_quantizer)

    @property
    def w_bits(self) -> int | None:
        return getattr(self.weight_quantizer, "bits", None) if self.weight_quantizer is not None else None

    @property
    def a_bits(self) -> int | None:
        return getattr(self.act_quantizer, "bits", None) if self.act_quantizer is not None else None

    @torch.no_grad()
    def quantized_weight(self) -> Tensor:
        """The weight as used in the forward pass (observers are not updated by this call)."""
        return _apply_without_observer(self.weight_quantizer, self.weight)


def _apply_without_observer(q: nn.Module | None, w: Tensor) -> Tensor:
    if q is None:
        return w
    flag = getattr(q, "observer_enabled", None)
    if isinstance(flag, Tensor):
        saved = flag.clone()
        flag.fill_(0)
        try:
            return q(w)
        finally:
            flag.copy_(saved)
    return q(w)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with an optional weight quantizer and input activation quantizer."""

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, act_quantizer: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, act_quantizer)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_quantizer: nn.Module | None = None, act_quantizer: nn.Module | None = None
    ) -> "QuantConv2d":
        """Wrap ``module`` keeping its Parameter objects and hyper-parameters."""
        if not isinstance(module, nn.Conv2d):
            raise ConfigError(f"QuantConv2d.from_float expects nn.Conv2d; got {type(module).__name__}")
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
            weight_quantizer=weight_quantizer,
            act_quantizer=act_quantizer,
        )
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return self._conv_forward(x, w, self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with an optional weight quantizer and input activation quantizer."""

    def __init__(self, *args, weight_quantizer: nn.Module | None = None, act_quantizer: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, act_quantizer)

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_quantizer: nn.Module | None = None, act_quantizer: nn.Module | None = None
    ) -> "QuantLinear":
        """Wrap ``module`` keeping its Parameter objects."""
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"QuantLinear.from_float expects nn.Linear; got {type(module).__name__}")
        new = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            weight_quantizer=weight_quantizer,
            act_quantizer=act_quantizer,
        )
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return F.linear(x, w, self.bias)


# ------------------------------------------------------------------------------------------------
# walking helpers


def quant_layer_types() -> tuple[type, ...]:
    """``(QuantConv2d, QuantLinear, QuantConvBn2d)``."""
    from ltq.nn.convbn import QuantConvBn2d

    return (QuantConv2d, QuantLinear, QuantConvBn2d)


def iter_quant_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every QuantConv2d / QuantLinear / QuantConvBn2d in module order."""
    types = quant_layer_types()
    for name, m in model.named_modules():
        if isinstance(m, types):
            yield name, m


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, quantizer)`` of every weight/activation quantizer attached to a quant layer."""
    for name, layer in iter_quant_layers(model):
        for attr in ("weight_quantizer", "act_quantizer"):
            q = getattr(layer, attr)
            if q is not None:
                yield f"{name}.{attr}" if name else attr, q


def _set_flag(model: nn.Module, buffer: str, enabled: bool) -> int:
    n = 0
    for m in model.modules():
        flag = getattr(m, buffer, None)
        if isinstance(flag, Tensor) and buffer in m._buffers:
            flag.fill_(int(bool(enabled)))
            n += 1
    return n


def set_observers_enabled(model: nn.Module, enabled: bool) -> int:
    """Set the ``observer_enabled`` buffer of every module that has one; returns how many."""
    return _set_flag(model, "observer_enabled", enabled)


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> int:
    """Set the ``fake_quant_enabled`` buffer of every module that has one; returns how many."""
    return _set_flag(model, "fake_quant_enabled", enabled)


# ------------------------------------------------------------------------------------------------
# BatchNorm freezing


class _FrozenBNMixin:
    """Forward with running statistics only (no update), whatever ``self.training`` says."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FrozenBatchNorm1d(_FrozenBNMixin, nn.BatchNorm1d):
    """BatchNorm1d normalising with its running statistics, which no longer change."""


class FrozenBatchNorm2d(_FrozenBNMixin, nn.BatchNorm2d):
    """BatchNorm2d normalising with its running statistics, which no longer change."""


class FrozenBatchNorm3d(_FrozenBNMixin, nn.BatchNorm3d):
    """BatchNorm3d normalising with its running statistics, which no longer change."""


class FrozenSyncBatchNorm(_FrozenBNMixin, nn.SyncBatchNorm):
    """SyncBatchNorm normalising with its running statistics (no cross-rank reduction needed)."""


_FROZEN = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    nn.SyncBatchNorm: FrozenSyncBatchNorm,
}
_UNFROZEN = {v: k for k, v in _FROZEN.items()}


def is_bn_frozen(module: nn.Module) -> bool:
    from ltq.nn.convbn import QuantConvBn2d

    if isinstance(module, QuantConvBn2d):
        return bool(module.bn_frozen)
    return isinstance(module, _FrozenBNMixin)


def freeze_bn_stats(model: nn.Module) -> int:
    """Freeze every BatchNorm of ``model`` (see module docstring); returns how many were frozen.

    QuantConvBn2d layers set their ``bn_frozen`` buffer; plain BN layers switch to the frozen
    class. Works on any device.
    """
    from ltq.nn.convbn import QuantConvBn2d

    n = 0
    inner = set()
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.freeze_bn_stats()
            inner.add(id(m.bn))
            n += 1
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or id(m) in inner or isinstance(m, _FrozenBNMixin):
            continue
        frozen = _FROZEN.get(type(m))
        if frozen is None:
            raise ConfigError(
                f"freeze_bn_stats: cannot freeze {name!r} of type {type(m).__name__}; "
                f"allowed: {', '.join(t.__name__ for t in _FROZEN)}"
            )
        if m.running_mean is None:
            raise ConfigError(f"freeze_bn_stats: {name!r} has track_running_stats=False, so it has no statistics to freeze")
        m.__class__ = frozen
        n += 1
    return n


def unfreeze_bn_stats(model: nn.Module) -> int:
    """Undo :func:`freeze_bn_stats`; returns how many layers were unfrozen."""
    from ltq.nn.convbn import QuantConvBn2d

    n = 0
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.unfreeze_bn_stats()
            n += 1
        elif isinstance(m, _FrozenBNMixin):
            m.__class__ = _UNFROZEN[type(m)]
            n += 1
    return n
