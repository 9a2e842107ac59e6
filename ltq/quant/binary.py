"""Low-bit weight quantizers used by MetaQuant: DoReFa k-bit weights and BWN binary weights.

Both quantizers split the weight quantization ``W -> Ŵ`` into two stages, because MetaQuant's
meta-network looks at the intermediate ("pre-quantized") weight ``W̃``:

    W̃ = pre_quantize(W)        smooth, differentiable
    Ŵ = quantize_pre(W̃)        piecewise constant, straight-through gradient
    forward(W) = quantize_pre(pre_quantize(W))

and expose ``calibration(W)``: the factor ``c`` by which a gradient with respect to ``Ŵ`` is
turned into a gradient with respect to ``W`` along the smooth part of the chain (MetaQuant
multiplies its meta-gradient by ``c`` before updating ``W``).

DoReFa (Zhou et al. 2016), k bits, weights only
-----------------------------------------------
    W̃ = tanh(W) / max|tanh(W)| · 0.5 + 0.5                 ∈ [0, 1]   (the max is detached)
    round_k(x) = round(x · (2^k − 1)) / (2^k − 1)           identity STE
    Ŵ = 2 · round_k(W̃) − 1                                 ∈ {−1, …, +1}, 2^k levels, no scale

For k = 1, Ŵ ∈ {−1, +1}. The gradient of the smooth part is

    dŴ/dW = 2 · 0.5 · (1 − tanh²W) / max|tanh W| = (1 − tanh²W) / max|tanh W| =: c

(the ``0.5`` of the normalisation and the ``×2`` of the affine map cancel).

BWN (Rastegari et al. 2016, binary-weight networks)
---------------------------------------------------
    α = mean|W|                      per layer, or per output filter with ``per_channel=True``
    Ŵ = α · sign(W)                  sign(0) = 0, α detached (a constant in the backward pass)
    dL/dW = α · dL/dŴ · 1[|W| ≤ 1]    the hard-tanh straight-through estimator

The pre-quantized weight is the weight itself (``W̃ = W``) and MetaQuant's calibration factor
is 1, as in the original MetaQuant code (the α factor and the hard-tanh mask are left out of the
meta-gradient path; a constant α only rescales the learning rate, which the meta-network can
absorb). BWN is binary by definition: ``bits`` must be 1 (use DoReFa for k > 1 bits).

Both quantizers follow the ltq quantizer contract: ``forward(x) -> x_hat`` of the same shape,
no in-place modification of ``x``, ``stats()`` returns 0-dim tensors, ``.bits`` is an int.
They have no learnable state; the last forward's statistics are kept in non-persistent buffers
(they are logging values, not state, so they are not written to checkpoints).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError
from ltq.quant.ste import round_ste

__all__ = ["DoReFaWeightQuantizer", "BWNWeightQuantizer", "dorefa_round_k"]


def dorefa_round_k(x: Tensor, bits: int) -> Tensor:
    """``round(x · (2^k − 1)) / (2^k − 1)`` with the identity straight-through gradient.

    For x ∈ [0, 1] this maps onto the 2^k uniform levels {0, 1/(2^k−1), …, 1}. (The original
    MetaQuant STE masks the gradient to |x| ≤ 1, which is the identity on [0, 1].)
    """
    n = float(2**bits - 1)
    return round_ste(x * n) / n


class _SignHardTanhSTE(torch.autograd.Function):
    """``sign(x)`` (with sign(0) = 0) forward; hard-tanh STE backward ``g·1[|x| ≤ 1]``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def _check_bits(bits, name: str, allowed_max: int | None = None) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ConfigError(f"model.bits={bits!r} is not supported by {name}; allowed: an integer >= 1")
    if allowed_max is not None and bits > allowed_max:
        raise ConfigError(
            f"model.bits={bits!r} is not supported by {name}; allowed: 1 "
            f"(BWN is binary; use forward='dorefa' for k-bit weights)"
        )
    return bits


class DoReFaWeightQuantizer(nn.Module):
    """DoReFa k-bit weight quantizer ``Ŵ = 2·round_k(tanh(W)/max|tanh W|·0.5 + 0.5) − 1``.

    Args:
        bits: number of bits k ≥ 1 (2^k levels in [−1, 1]; k = 1 gives {−1, +1}).
    """

    def __init__(self, bits: int = 1):
        super().__init__()
        self.bits = _check_bits(bits, "DoReFa")
        self.num_scales = 0  # the levels are fixed in [-1, 1]: no scale is stored with the codes
        self.register_buffer("_tanh_max", torch.zeros(()), persistent=False)
        self.register_buffer("_pos_frac", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def pre_quantize(self, w: Tensor) -> Tensor:
        """``W̃ = tanh(W) / max|tanh W| · 0.5 + 0.5`` (the max is a constant for autograd)."""
        t = torch.tanh(w)
        m = t.detach().abs().amax().clamp_min(torch.finfo(t.dtype).tiny)
        with torch.no_grad():
            self._tanh_max.copy_(m)
        return t / m * 0.5 + 0.5

    def quantize_pre(self, w_pre: Tensor) -> Tensor:
        """``Ŵ = 2·round_k(W̃) − 1`` with the identity STE (so dŴ/dW̃ = 2)."""
        w_hat = 2.0 * dorefa_round_k(w_pre, self.bits) - 1.0
        with torch.no_grad():
            self._pos_frac.copy_((w_hat.detach() > 0).float().mean())
        return w_hat

    def forward(self, w: Tensor) -> Tensor:
        return self.quantize_pre(self.pre_quantize(w))

    @torch.no_grad()
    def calibration(self, w: Tensor) -> Tensor:
        """``c = (1 − tanh²W) / max|tanh W|``: dŴ/dW along the smooth (non-rounding) path."""
        t = torch.tanh(w.detach())
        m = t.abs().amax().clamp_min(torch.finfo(t.dtype).tiny)
        return (1.0 - t * t) / m

    def stats(self) -> dict[str, Tensor]:
        return {"tanh_max": self._tanh_max.clone(), "pos_frac": self._pos_frac.clone()}


class BWNWeightQuantizer(nn.Module):
    """BWN binary weight quantizer ``Ŵ = α·sign(W)``, ``α = mean|W|`` (detached).

    Args:
        bits: must be 1 (BWN is binary).
        per_channel: one α per output filter (dim 0) instead of one per layer ("BWN-F").
        out_channels: number of output filters, only used for size accounting (``num_scales``)
            when ``per_channel`` is set.
    """

    def __init__(self, bits: int = 1, per_channel: bool = False, out_channels: int | None = None):
        super().__init__()
        self.bits = _check_bits(bits, "BWN", allowed_max=1)
        self.per_channel = bool(per_channel)
        self.num_scales = int(out_channels) if (self.per_channel and out_channels) else 1
        self.register_buffer("_alpha_mean", torch.zeros(()), persistent=False)
        self.register_buffer("_sparsity", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"

    def alpha(self, w: Tensor) -> Tensor:
        """``mean|W|`` over the layer (0-dim) or over each output filter (shape (C_out, 1, …))."""
        a = w.detach().abs()
        if self.per_channel and w.dim() > 1:
            return a.flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
        return a.mean()

    def pre_quantize(self, w: Tensor) -> Tensor:
        """BWN quantizes W directly: ``W̃ = W``."""
        return w

    def quantize_pre(self, w_pre: Tensor) -> Tensor:
        """``Ŵ = α·sign(W̃)`` with the hard-tanh STE ``dŴ/dW̃ = α·1[|W̃| ≤ 1]``."""
        alpha = self.alpha(w_pre)
        w_hat = alpha * _SignHardTanhSTE.apply(w_pre)
        with torch.no_grad():
            self._alpha_mean.copy_(alpha.mean())
            self._sparsity.copy_((w_pre.detach() == 0).float().mean())
        return w_hat

    def forward(self, w: Tensor) -> Tensor:
        return self.quantize_pre(self.pre_quantize(w))

    @torch.no_grad()
    def calibration(self, w: Tensor) -> Tensor:
        """MetaQuant's calibration factor for BWN: 1 (see the module docstring)."""
        return torch.ones((), dtype=w.dtype, device=w.device)

    def stats(self) -> dict[str, Tensor]:
        return {"alpha": self._alpha_mean.clone(), "sparsity": self._sparsity.clone()}
