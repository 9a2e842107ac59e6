"""Conv2d + BatchNorm2d with *simulated* BN folding for quantization-aware training.

At deployment a BN after a conv is folded into it (``W' = W·γ/σ``, see :mod:`ltq.quant.fold`),
so the weights that get quantized are the *folded* ones. Training must therefore quantize
``W·γ/σ`` too, while BatchNorm keeps normalising with batch statistics and learning γ, β.
Following Jacob et al. (2018) and Krishnamoorthi (2018) (the scheme of ``torch.ao``'s ConvBn2d),
with ``f = γ / sqrt(running_var + eps)`` per output channel:

* **BN live** (``training`` and not frozen)::

      y = conv(x, Q(W·f)) / f  (+ b)          # ≈ conv(x, W) + b, but with the folded weights quantized
      out = BatchNorm_train(y)                # batch statistics; running stats updated with
                                              # PyTorch's momentum convention r ← (1−m)·r + m·batch

  Dividing by ``f`` undoes the scaling so BN sees the un-folded activations; the batch
  normalisation then replaces the running statistics by the batch ones.

* **BN frozen** (after :meth:`QuantConvBn2d.freeze_bn_stats`) **or eval**::

      out = conv(x, Q(W·f)) + β − μ·f (+ b·f)    # exactly the deployed folded layer

  using the running statistics; they no longer change.

With fake quantization disabled both branches equal ``BN(conv(x))`` in the matching mode.
:meth:`QuantConvBn2d.to_folded` returns the equivalent :class:`~ltq.nn.layers.QuantConv2d` with
the folded weight and bias, for export.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError
from ltq.nn.layers import QuantConv2d, _apply_without_observer, _QuantMixin

__all__ = ["QuantConvBn2d"]


class QuantConvBn2d(_QuantMixin, nn.Conv2d):
    """Quantized conv with a BatchNorm2d folded in by simulation (see module docstring).

    Parameters: the conv ``weight`` (and optional ``bias``), ``bn.*`` (γ, β and the running
    statistics), the quantizers. Buffer ``bn_frozen`` (uint8) records the BN freeze.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        weight_quantizer: nn.Module | None = None,
        act_quantizer: nn.Module | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self._init_quantizers(weight_quantizer, act_quantizer)
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.uint8, device=None if device == "meta" else device))

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        weight_quantizer: nn.Module | None = None,
        act_quantizer: nn.Module | None = None,
    ) -> "QuantConvBn2d":
        """Combine ``conv`` and ``bn`` keeping their Parameter/buffer objects (the same ``bn``)."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise ConfigError(
                f"QuantConvBn2d.from_float expects (nn.Conv2d, nn.BatchNorm2d); got ({type(conv).__name__}, {type(bn).__name__})"
            )
        if bn.num_features != conv.out_channels:
            raise ConfigError(f"QuantConvBn2d: BN has {bn.num_features} features but the conv has {conv.out_channels} outputs")
        if bn.running_mean is None:
            raise ConfigError("QuantConvBn2d needs a BatchNorm2d with track_running_stats=True")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            weight_quantizer=weight_quantizer,
            act_quantizer=act_quantizer,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.bn = bn
        new.bn_frozen = torch.zeros((), dtype=torch.uint8, device=conv.weight.device)
        new.train(conv.training)
        return new

    # -- BN freeze -------------------------------------------------------------------------
    def freeze_bn_stats(self) -> "QuantConvBn2d":
        """Use the running statistics from now on and stop updating them."""
        self.bn_frozen.fill_(1)
        return self

    def unfreeze_bn_stats(self) -> "QuantConvBn2d":
        self.bn_frozen.fill_(0)
        return self

    # -- maths -----------------------------------------------------------------------------
    def _factor(self) -> Tensor:
        """``f = γ / sqrt(running_var + eps)``, with |f| floored at float eps (γ = 0 is legal)."""
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        f = bn.weight / std if bn.weight is not None else 1.0 / std
        tiny = torch.finfo(f.dtype).eps
        return torch.where(f.abs() < tiny, torch.where(f < 0, -tiny, tiny).to(f.dtype), f)

    def _shift(self, f: Tensor) -> Tensor:
        """Folded bias ``β − μ·f + b·f``."""
        bn = self.bn
        shift = -bn.running_mean * f
        if bn.bias is not None:
            shift = shift + bn.bias
        if self.bias is not None:
            shift = shift + self.bias * f
        return shift

    def _bn_live(self) -> bool:
        return self.training and not bool(self.bn_frozen)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        f = self._factor()
        w = self.weight * f.reshape(-1, 1, 1, 1)
        if self.weight_quantizer is not None:
            w = self.weight_quantizer(w)
        y = self._conv_forward(x, w, None)
        if self._bn_live():
            y = y / f.reshape(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, 1, 1)
            return self.bn(y)
        return y + self._shift(f).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def quantized_weight(self) -> Tensor:
        """The quantized folded weight ``Q(W·f)`` (observers not updated by this call)."""
        return _apply_without_observer(self.weight_quantizer, self.weight * self._factor().reshape(-1, 1, 1, 1))

    @torch.no_grad()
    def to_folded(self) -> QuantConv2d:
        """Equivalent QuantConv2d with weight ``W·f`` and bias ``β − μ·f + b·f`` (running stats).

        The returned layer shares this layer's quantizer modules (it is meant to replace it).
        """
        f = self._factor()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            padding_mode=self.padding_mode,
            device="meta",
        )
        conv.weight = nn.Parameter((self.weight * f.reshape(-1, 1, 1, 1)).detach().clone())
        conv.bias = nn.Parameter(self._shift(f).to(self.weight.dtype).detach().clone())
        out = QuantConv2d.from_float(conv, self.weight_quantizer, self.act_quantizer)
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", simulated_bn_fold=True"
