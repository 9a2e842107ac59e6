"""The one uniform b-bit fake quantizer of ltq (2..16 bits).

Maths
-----
A uniform quantizer with step ``s > 0`` (the *scale*), integer offset ``z`` (the *zero point*)
and integer range ``[qmin, qmax]`` maps a real ``x`` to

    q     = clamp(round(x / s + z), qmin, qmax)          (an integer)
    x_hat = (q - z) · s                                  (its real value, "fake quantized")

``round`` is round-half-to-even (``torch.round``). The representable reals are
``s·(qmin - z) .. s·(qmax - z)`` in steps of ``s``; anything outside is clipped to the end level.

Gradient (clipped straight-through estimator, as ``torch.fake_quantize_per_tensor_affine``)::

    dL/dx = dL/dx_hat · 1[qmin <= round(x/s + z) <= qmax]

i.e. the identity where ``x`` was not clipped and zero where it saturated. The indicator is
taken after rounding (like torch), so a value within half a step outside the last level still
passes its gradient: exactly the elements whose output was *not* changed by the clamp. ``s`` and
``z`` are treated as constants (no gradient); learnable-step quantizers (LSQ-like) are separate
modules.

Choosing s, z, qmin, qmax from an observed range [min, max] (:func:`qparams`)
-------------------------------------------------------------------------------
* symmetric, signed (weights; default ``narrow_range=True``)::

      qmax = 2^(b-1) - 1,  qmin = -qmax  (narrow)  or  -2^(b-1)  (full),
      s = max(|min|, |max|) / (2^(b-1) - 1),  z = 0

  so ``+max|x|`` maps *exactly* to the top level ``qmax``. (The ptq_resnet20 original divided by
  ``2^(b-1)`` and then clipped at ``2^(b-1)-1``, so its largest positive weight became
  ``0.5·max`` at 2 bits.) At 2 bits, narrow range gives the ternary grid ``{-s, 0, +s}``.
* symmetric, unsigned (non-negative data): ``q ∈ [0, 2^b - 1]``, ``s = max / (2^b - 1)``, z = 0.
* affine (asymmetric), unsigned (activations; default when ``symmetric=False``)::

      q ∈ [0, 2^b - 1],  [lo, hi] = [min(min, 0), max(max, 0)]   (the range always contains 0,
      s = (hi - lo) / (qmax - qmin),                                so 0 is exactly representable)
      z = clamp(qmin - round(lo / s), qmin, qmax)

* affine, signed: the same with ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` (narrow: ``-2^(b-1) + 1``).

``s`` is floored at ``torch.finfo(torch.float32).eps`` so that a constant (e.g. all-zero) tensor
never produces a division by zero or a NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError, check_choice

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "check_bits",
    "quant_range",
    "qparams",
    "quantize_dequantize",
    "fake_quantize",
    "UniformQuantizer",
]

MIN_BITS = 2
MAX_BITS = 16
_EPS = torch.finfo(torch.float32).eps


def check_bits(bits, option: str = "bits", lo: int = MIN_BITS, hi: int = MAX_BITS) -> int:
    """Validate an integer bit-width in ``[lo, hi]``; raise :class:`ConfigError` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"{option}={bits!r} is not supported by the uniform quantizer; allowed: integers {lo}..{hi}")
    return bits


def quant_range(bits: int, signed: bool, narrow_range: bool = True) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a b-bit code.

    signed: ``[-2^(b-1), 2^(b-1)-1]``, or ``[-(2^(b-1)-1), 2^(b-1)-1]`` with ``narrow_range``
    (symmetric around 0). unsigned: ``[0, 2^b - 1]`` (``narrow_range`` is ignored).
    """
    if signed:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if narrow_range else -(2 ** (bits - 1))
    else:
        qmin, qmax = 0, 2**bits - 1
    return qmin, qmax


def qparams(
    min_val: Tensor | float,
    max_val: Tensor | float,
    bits: int,
    symmetric: bool = True,
    narrow_range: bool = True,
    signed: bool | None = None,
) -> tuple[Tensor, Tensor, int, int]:
    """Scale, zero point and integer range for an observed range ``[min_val, max_val]``.

    ``min_val``/``max_val`` may be scalars or tensors of any (equal) shape, e.g. ``(C,)`` for
    per-channel ranges. ``signed`` defaults to ``symmetric`` (symmetric → signed codes, affine →
    unsigned codes). Returns ``(scale, zero_point, qmin, qmax)``; ``scale`` and ``zero_point``
    are float32 tensors (the zero point holds integer values), ``qmin``/``qmax`` Python ints.
    See the module docstring for the formulas.
    """
    check_bits(bits)
    if signed is None:
        signed = symmetric
    qmin, qmax = quant_range(bits, signed, narrow_range)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32, device=min_val.device)
    lo = min_val.clamp(max=0.0)
    hi = max_val.clamp(min=0.0)
    if symmetric:
        if signed:
            scale = torch.maximum(-lo, hi) / qmax
        else:
            scale = hi / qmax
        scale = scale.clamp(min=_EPS)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / float(qmax - qmin)).clamp(min=_EPS)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point, qmin, qmax


def _broadcast(t: Tensor | float, x: Tensor, ch_axis: int | None) -> Tensor | float:
    """Reshape a ``(C,)`` per-channel tensor so that it broadcasts along ``ch_axis`` of ``x``."""
    if ch_axis is None or not isinstance(t, Tensor) or t.dim() != 1:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def quantize_dequantize(x: Tensor, scale, zero_point, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x/s + z), qmin, qmax) - z)·s`` without any autograd bookkeeping."""
    q = torch.round(x / scale + zero_point).clamp(qmin, qmax)
    return (q - zero_point) * scale


class _FakeQuantize(torch.autograd.Function):
    """Uniform fake quantization with the clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale + zero_point)
        inside = (q >= qmin) & (q <= qmax)
        out = (q.clamp(qmin, qmax) - zero_point) * scale
        ctx.save_for_backward(inside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
) -> Tensor:
    """Fake-quantize ``x`` (see module docstring) with the clipped STE gradient.

    ``scale``/``zero_point`` are scalars or tensors broadcastable to ``x``; a 1-D ``(C,)``
    tensor together with ``ch_axis`` is reshaped to broadcast along that axis (per-channel).
    Returns a new tensor with the dtype of ``x``; ``x`` is never modified.
    """
    if ch_axis is not None and ch_axis < 0:
        ch_axis += x.dim()
    scale = _broadcast(scale, x, ch_axis)
    zero_point = _broadcast(zero_point, x, ch_axis)
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), device=x.device)
    if not isinstance(zero_point, Tensor):
        zero_point = torch.tensor(float(zero_point), device=x.device)
    return _FakeQuantize.apply(x, scale, zero_point, int(qmin), int(qmax))


class UniformQuantizer(nn.Module):
    """Uniform b-bit fake quantizer with an observer (per-tensor or per-channel).

    Args:
        bits: bit-width, 2..16.
        symmetric: symmetric (zero point 0; weights) or affine/asymmetric (activations).
        per_channel: one range per slice along ``ch_axis`` (e.g. output channels of a weight).
        ch_axis: channel axis for ``per_channel``.
        observer: how the range is estimated: ``"minmax"`` (running min/max over all batches),
            ``"current"`` (min/max of the latest tensor only: the right choice for weights that
            change during QAT), ``"ema"`` (moving average of batch min/max), ``"percentile"``,
            ``"mse"`` (see :mod:`ltq.quant.observers`).
        signed: signed integer codes; defaults to ``symmetric``.
        narrow_range: for signed codes drop ``-2^(b-1)`` so the grid is symmetric around 0.
        averaging_constant: EMA constant ``c`` of the ema/percentile/mse observers
            (``r ← r + c·(batch - r)``); ``None`` = plain running mean over batches.
        percentile: percentile (0, 100] of the percentile observer.
        sync: all-reduce the batch statistics across DDP ranks (not needed for weights, which
            are identical on every rank).
        track_clip_ratio: store the fraction of clipped elements of the last forward in the
            ``clip_ratio`` buffer (one extra reduction per forward).

    State (all in ``state_dict``): buffers ``observer_enabled`` and ``fake_quant_enabled``
    (uint8 0-dim toggles), the observer's ``min_val``/``max_val``/``initialized``/``num_batches``.

    Forward: if ``observer_enabled`` the observer is updated with ``x.detach()`` *regardless of
    train/eval mode* (PTQ calibrates in eval mode so BatchNorm statistics are not touched); then,
    if ``fake_quant_enabled`` and the observer has seen data, ``x`` is fake-quantized with the
    current scale/zero point, otherwise returned unchanged (an uncalibrated quantizer is the
    identity). Reading the two toggles is one host read each, as in ``torch.ao`` FakeQuantize.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        per_channel: bool = False,
        ch_axis: int = 0,
        observer: str = "minmax",
        signed: bool | None = None,
        narrow_range: bool = True,
        averaging_constant: float | None = 0.01,
        percentile: float = 99.99,
        sync: bool = True,
        track_clip_ratio: bool = False,
    ):
        super().__init__()
        from ltq.quant.observers import OBSERVERS, make_observer

        check_bits(bits)
        check_choice("observer", observer, OBSERVERS)
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.signed = self.symmetric if signed is None else bool(signed)
        self.narrow_range = bool(narrow_range)
        self.per_channel = bool(per_channel)
        self.ch_axis = int(ch_axis)
        self.observer_name = observer
        self.track_clip_ratio = bool(track_clip_ratio)
        self.qmin, self.qmax = quant_range(bits, self.signed, self.narrow_range)
        self.observer = make_observer(
            observer,
            per_channel=self.per_channel,
            ch_axis=self.ch_axis,
            bits=bits,
            symmetric=self.symmetric,
            signed=self.signed,
            narrow_range=self.narrow_range,
            averaging_constant=averaging_constant,
            percentile=percentile,
            sync=sync,
        )
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.ones((), dtype=torch.uint8))
        if self.track_clip_ratio:
            self.register_buffer("clip_ratio", torch.zeros(()))

    # -- toggles ---------------------------------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> "UniformQuantizer":
        self.observer_enabled.fill_(int(enabled))
        return self

    def disable_observer(self) -> "UniformQuantizer":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "UniformQuantizer":
        self.fake_quant_enabled.fill_(int(enabled))
        return self

    def disable_fake_quant(self) -> "UniformQuantizer":
        return self.enable_fake_quant(False)

    # -- maths -----------------------------------------------------------------------------
    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` from the observer's range: 0-dim, or ``(C,)`` per channel."""
        scale, zp, _, _ = qparams(
            self.observer.min_val, self.observer.max_val, self.bits, self.symmetric, self.narrow_range, self.signed
        )
        return scale, zp

    @property
    def num_scales(self) -> int:
        """Number of fp32 values stored next to the integer weights (scales, + zero points if affine)."""
        n = max(int(self.observer.min_val.numel()), 1)
        return n if self.symmetric else 2 * n

    def forward(self, x: Tensor) -> Tensor:
        if self.per_channel and x.dim() < 2:
            raise ConfigError(
                f"per_channel=True needs a tensor with at least 2 dims (got shape {tuple(x.shape)}); "
                "allowed: per_channel=False for 0-d/1-d tensors"
            )
        observed = bool(self.observer_enabled)
        if observed:
            self.observer(x.detach())
        if not bool(self.fake_quant_enabled):
            return x
        if not observed and not bool(self.observer.initialized):
            return x
        scale, zp = self.calculate_qparams()
        ch_axis = self.ch_axis % x.dim() if self.per_channel else None
        if self.track_clip_ratio:
            with torch.no_grad():
                q = torch.round(x / _broadcast(scale, x, ch_axis) + _broadcast(zp, x, ch_axis))
                self.clip_ratio.copy_(((q < self.qmin) | (q > self.qmax)).float().mean())
        return fake_quantize(x, scale, zp, self.qmin, self.qmax, ch_axis)

    @torch.no_grad()
    def quantize_codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Integer codes of ``x`` under the current qparams; the observer is *not* updated.

        Returns ``(q, scale, zero_point)``: ``q = clamp(round(x/s + z), qmin, qmax)`` as int32 with
        the shape of ``x``; ``scale``/``zero_point`` are 0-dim, or ``(C,)`` along ``ch_axis`` per
        channel. ``(q - z)·s`` (broadcast along ``ch_axis``) equals :meth:`forward`'s output with
        fake quantization enabled, bit for bit. Used by the packed low-bit export
        (:func:`ltq.export.save_packed`) and the int8 backend. Raises :class:`ConfigError` if the
        quantizer has not observed any data yet.
        """
        if not bool(self.observer.initialized):
            raise ConfigError(
                "quantize_codes: this quantizer has not observed any data (calibrate or train it first)"
            )
        scale, zp = self.calculate_qparams()
        ch_axis = self.ch_axis % x.dim() if self.per_channel else None
        q = torch.round(x / _broadcast(scale, x, ch_axis) + _broadcast(zp, x, ch_axis)).clamp(self.qmin, self.qmax)
        return q.to(torch.int32), scale, zp

    def stats(self) -> dict[str, Tensor]:
        """0-dim tensors for logging: mean scale/zero point, observed min/max (+ clip_ratio)."""
        scale, zp = self.calculate_qparams()
        obs = self.observer
        if obs.min_val.numel() == 0:
            zero = torch.zeros((), device=scale.device)
            out = {"scale": zero, "zero_point": zero, "min": zero, "max": zero}
        else:
            out = {
                "scale": scale.mean(),
                "zero_point": zp.mean(),
                "min": obs.min_val.min(),
                "max": obs.max_val.max(),
            }
        if self.track_clip_ratio:
            out["clip_ratio"] = self.clip_ratio.clone()
        return out

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "affine"
        gran = f"per_channel(axis={self.ch_axis})" if self.per_channel else "per_tensor"
        return (
            f"bits={self.bits}, {kind}, {'signed' if self.signed else 'unsigned'}, q=[{self.qmin}, {self.qmax}], "
            f"{gran}, observer={self.observer_name}"
        )
