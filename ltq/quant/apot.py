"""Additive Powers-of-Two (APoT) quantization, with PoT and uniform level sets.

Li, Dong & Wang, "Additive Powers-of-Two Quantization: An Efficient Non-uniform Discretization
for Neural Networks", ICLR 2020.

Level sets
----------
A level set for ``B`` bits is a sorted set of ``2^B`` numbers in ``[0, 1]`` whose largest
element is 1 (the clipping threshold ``α`` later scales it). Three families:

* **APoT** (``mode="apot"``): every level is a sum ``a + b + c`` with one term taken from each of
  up to three small sets of powers of two (every set also contains 0); the sums are
  de-duplicated and divided by their maximum. The term sets (exponents ``k`` of ``2^-k``) are

  ====  =========================================================
   B    term sets
  ====  =========================================================
   2    {1, 2, 3}                      (one term: plain PoT)
   3    {1, 2, 4}, {3}
   4    {1, 3, 5}, {2, 4, 6}
   5    {1, 3, 6}, {2, 4, 7}, {5}
   6    {1, 4, 7}, {2, 5, 8}, {3, 6, 9}
  ====  =========================================================

  which gives e.g. ``B=3 -> {0, .1, .2, .3, .4, .6, .8, 1}`` (the maximum 0.625 = 2^-1 + 2^-3 is
  divided out). The paper writes the B=4 terms as {2^0, 2^-2, 2^-4} + {2^-1, 2^-3, 2^-5}: those
  are the sets above times 2, identical after the max-normalisation.
* **PoT** (``mode="pot"``): ``{0} ∪ {2^-1, ..., 2^-(2^B - 1)}``, normalised (so ``{0} ∪ {2^0,
  ..., 2^-(2^B-2)}``).
* **uniform** (``mode="uniform"``): ``{k / (2^B - 1)}``, ``k = 0 .. 2^B - 1``.

``B = 1`` is ``{0, 1}`` in every mode. **For B ≥ 7 the APoT and PoT constructions are not
defined** (the original code returns ``{0}`` and divides by zero, giving NaN: its issue #8; PoT
would also need levels below the float32 range): :func:`build_levels` then **falls back to the
uniform set** with ``2^B`` levels (see :func:`levels_fallback`).

Bits and signs
--------------
Weights are signed: with ``bits`` bits the magnitude uses ``B = bits - 1`` and the sign is applied
separately, giving ``2·2^B - 1 = 2^bits - 1`` distinct values ``{±level·α}``. Activations (inputs
of a conv, post-ReLU) are unsigned with ``B = bits``. 2-bit weights are the uniform ternary set
``{-1, 0, 1}·α`` in every mode (``B = 1``).

Forward
-------
For the clipping threshold ``α > 0`` and a tensor ``x`` (a weight after the optional weight
normalisation ``z = (w - mean(w)) / std(w)``, or an activation)::

    u = x / α
    c = clamp(u, -1, 1)   (weights)      c = clamp(u, 0, 1)   (activations)
    q = sign(c) · P(|c|)  (weights)      q = P(c)             (activations)
    x_hat = q · α

where ``P`` is the projection onto the nearest level. **Tie rule:** a magnitude exactly on the
float32 midpoint of two neighbouring levels goes to the *larger* level (round half up; for
weights, half away from zero). The midpoints are ``float32((l_i + l_{i+1}) / 2)`` computed in
float64.

The CIFAR variant of the original clamps activations from above only (its inputs are post-ReLU);
a negative input is then "inside" and projected to the level 0 with a pass-through gradient.

Gradients (straight-through, as in the original)
------------------------------------------------
With ``m = 1[x is inside the clamp range]`` and the upstream gradient ``g``::

    dL/dα = Σ g · (q - m·u)       (inside: g·(q - u); outside: g·sign(u) for weights,
                                   g above / 0 below the range for activations)
    dL/dx = g · m                 (clipped straight-through estimator)

The α-gradient is multiplied by ``grad_scale`` when given. The *calibrated gradient* of the
original CIFAR code (and of the original's 2-bit ImageNet weights) does not clip the weight
gradient: ``dL/dx = g``. The weight normalisation is differentiated through (``variant=
"imagenet"``) or its mean and std are constants (``variant="cifar"``, as the original CIFAR code
``w.data.mean()``, ``w.data.std()``). The unbiased std is used, as ``torch.std``.

Fast projection
---------------
The original builds a ``levels × numel`` distance matrix (O(L·N) memory). Here the projection
of ``a ∈ [0, 1]`` (float32) is exact and costs two table look-ups:

1. The bit pattern of a non-negative float32 is monotone in its value, so its top bits
   (``c = bits(a) >> s``: exponent plus the leading mantissa bits) index a *log-spaced* grid of
   cells. ``s`` is chosen (largest first) so that every cell contains at most one level midpoint.
2. Per cell the tables store the bit pattern ``M`` of the midpoint inside the cell (or a
   sentinel above the cell) and the two candidate levels: ``lo`` (the nearest level for the part
   of the cell below ``M``) and ``hi`` (from ``M`` on). The answer is ``hi`` iff
   ``bits(a) >= M``, computed with integer arithmetic as the sign of ``bits(a) - M``; comparing
   bit patterns of non-negative floats is comparing their values, so the result equals
   ``levels[searchsorted(midpoints, a, right=True)]`` exactly. Both tables are interleaved per
   cell so that one index ``2c + 1`` (``(bits(a) >> (s-1)) | 1``) addresses ``M`` and
   ``2c + 1 - 1[a < M]`` addresses the level: two gathers and six integer passes in all.
3. Signs cost nothing extra: negative floats have negative int32 bit patterns, which the tables
   cover too (their second half, with negated levels and sign-flipped ``M``; within a cell the
   int32 order of negative patterns is the order of the magnitudes), so the table applied to
   ``c`` directly gives ``sign(c)·P(|c|)``. Magnitudes above 1 map to the top level; NaN to NaN.

Tables are shared between quantizers with the same level set and device (a small cache), so
they are not stored in checkpoints. :func:`project_bucketize` is the O(N log L) reference
implementation with the same tie rule.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError

__all__ = [
    "APOT_TERMS",
    "MODES",
    "VARIANTS",
    "build_levels",
    "levels_fallback",
    "level_midpoints",
    "LevelTable",
    "level_table",
    "project",
    "project_bucketize",
    "apot_quantize",
    "weight_norm_stats",
    "APoTQuantizer",
]

Mode = Literal["apot", "pot", "uniform"]
Variant = Literal["cifar", "imagenet"]
MODES = ("apot", "pot", "uniform")
VARIANTS = ("cifar", "imagenet")

#: B -> the additive term sets, as exponents k of 2^-k (0 is implicitly in every set).
APOT_TERMS: dict[int, tuple[tuple[int, ...], ...]] = {
    2: ((1, 2, 3),),
    3: ((1, 2, 4), (3,)),
    4: ((1, 3, 5), (2, 4, 6)),
    5: ((1, 3, 6), (2, 4, 7), (5,)),
    6: ((1, 4, 7), (2, 5, 8), (3, 6, 9)),
}

#: largest B for which PoT levels (down to 2^-(2^B - 2)) stay well inside float32's normal range
_POT_MAX_B = 6


def levels_fallback(B: int, mode: str) -> bool:
    """True when :func:`build_levels` replaces the requested set by the uniform one (B >= 7)."""
    if mode == "apot":
        return B > max(APOT_TERMS)
    if mode == "pot":
        return B > _POT_MAX_B
    return False


def build_levels(B: int, mode: Mode = "apot", dtype: torch.dtype = torch.float32) -> Tensor:
    """The sorted, de-duplicated, max-normalised level set for ``B`` bits (a 1-D tensor in [0, 1]).

    ``len(levels) == 2**B`` in every mode and every B >= 1; ``levels[0] == 0`` and
    ``levels[-1] == 1``. APoT/PoT with ``B >= 7`` fall back to the uniform set (documented above);
    the result never contains NaN. Computed in float64 and rounded once to ``dtype``.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not supported; allowed: {', '.join(MODES)}")
    if not isinstance(B, int) or isinstance(B, bool) or B < 1:
        raise ConfigError(f"level-set bits B={B!r} is not supported; allowed: an integer >= 1")
    if B == 1:
        values = [0.0, 1.0]
    elif mode == "uniform" or levels_fallback(B, mode):
        n = 2**B - 1
        values = [k / n for k in range(n + 1)]
    elif mode == "pot":
        values = [0.0] + [2.0 ** (-k) for k in range(1, 2**B)]
    else:  # additive powers of two: all sums with one term (or 0) from each set
        sums = {0.0}
        for term_set in APOT_TERMS[B]:
            choices = [0.0] + [2.0 ** (-k) for k in term_set]
            sums = {s + t for s in sums for t in choices}
        values = sorted(sums)
    top = max(values)
    levels = torch.tensor(sorted(set(v / top for v in values)), dtype=torch.float64)
    return levels.to(dtype)


def level_midpoints(levels: Tensor) -> Tensor:
    """float32 midpoints ``(l_i + l_{i+1}) / 2`` of a sorted level set (computed in float64)."""
    lv = levels.to(torch.float64)
    return ((lv[1:] + lv[:-1]) / 2).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Projection onto a level set
# --------------------------------------------------------------------------------------------

_F32_NAN_START = 0x7F800001  # first NaN bit pattern (just above +inf)
_EMPTY = 0x7FFFFFFF  # sentinel "midpoint" above every non-NaN value in a cell


class LevelTable:
    """Look-up table for the exact nearest-level projection of float32 values, with sign.

    ``project(x)`` returns ``sign(x) · levels[searchsorted(midpoints, |x|, right=True)]`` (magnitudes
    above 1 give ±1, NaN gives NaN) for any float32 ``x``.

    Attributes: ``levels`` (L,) float32 plus a trailing NaN level, ``midpoints`` (L-1,),
    ``shift`` (the number of low bits dropped to form a cell index ``c``), ``table`` (int32: the
    midpoint bit pattern ``M`` of each cell, twice) and ``level_pairs`` (float32: the cell's
    level below ``M`` and from ``M`` on), both of length ``2^(33-shift)``: non-negative floats in
    the first half, negative ones (their bit patterns are negative int32) in the second. For a
    negative cell ``M`` and the levels are those of the magnitude cell with the sign bit set /
    negated; comparing negative int32 bit patterns within a cell compares magnitudes in the same
    direction, so one formula serves both signs. ``table is None`` when no shift ≥ ``min_shift``
    separates the midpoints (then :meth:`project` uses bucketize; this does not happen for the
    built-in sets).
    """

    def __init__(self, levels: Tensor, max_shift: int = 20, min_shift: int = 13):
        levels = levels.detach().to("cpu", torch.float32)
        self.num_levels = int(levels.numel())
        self.levels = torch.cat([levels, torch.tensor([float("nan")])])
        self.midpoints = level_midpoints(levels)
        mids = self.midpoints.view(torch.int32).to(torch.int64)
        # the NaN range behaves as one more "midpoint" whose upper level is NaN
        bounds = torch.cat([mids, torch.tensor([_F32_NAN_START], dtype=torch.int64)])
        self.shift: int | None = None
        self.table: Tensor | None = None
        self.level_pairs: Tensor | None = None
        for shift in range(max_shift, min_shift - 1, -1):
            cells = torch.arange(2 ** (31 - shift), dtype=torch.int64)
            lo = cells << shift
            hi = ((cells + 1) << shift) - 1
            below = torch.searchsorted(bounds, lo, right=False)  # bounds with bits < lo
            upto = torch.searchsorted(bounds, hi, right=True)  # bounds with bits <= hi
            if int((upto - below).max()) > 1:
                continue
            inside = upto > below
            # M: the midpoint in the cell (or a sentinel above the cell); lo/hi: the levels below/from it
            m = torch.where(inside, bounds[below.clamp(max=bounds.numel() - 1)], torch.full_like(lo, _EMPTY))
            lo_level = self.levels[below]
            hi_level = torch.where(inside, self.levels[(below + 1).clamp(max=self.levels.numel() - 1)], lo_level)
            m_neg = m - 2**31  # the same bit pattern with the sign bit set, as int32
            # interleave: cell c -> entries 2c, 2c+1 (M twice; lower level, upper level)
            m_pos2 = torch.stack([m, m], 1).reshape(-1)
            m_neg2 = torch.stack([m_neg, m_neg], 1).reshape(-1)
            lv_pos2 = torch.stack([lo_level, hi_level], 1).reshape(-1)
            self.shift = shift
            self.table = torch.cat([m_pos2, m_neg2]).to(torch.int32)
            self.level_pairs = torch.cat([lv_pos2, -lv_pos2]).contiguous()
            break
        self._per_device: dict[torch.device, tuple] = {}

    def __deepcopy__(self, memo):  # immutable: copies of a model share it
        return self

    def __reduce__(self):  # pickles as its level set; rebuilt (deterministically) on load
        return (LevelTable, (self.levels[:-1].clone(),))

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """(levels_with_nan, table, level_pairs, midpoints) on ``device`` (copied once, then cached)."""
        out = self._per_device.get(device)
        if out is None:  # a race only builds the same tensors twice
            out = (
                self.levels.to(device),
                None if self.table is None else self.table.to(device),
                None if self.level_pairs is None else self.level_pairs.to(device),
                self.midpoints.to(device),
            )
            self._per_device[device] = out
        return out

    def project(self, x: Tensor) -> Tensor:
        """``sign(x)·P(|x|)`` for float32 ``x`` (exact; see the class docstring).

        With ``j = ((bits(x) >> (shift-1)) | 1) mod 2^(33-shift)`` (the entry ``2c + 1`` of x's cell,
        negative cells wrapped into the second half), ``M = table[j]`` and the result is
        ``level_pairs[j - 1[bits(x) < M]]``: two gathers and six integer passes.
        """
        levels, table, pairs, mids = self.tensors(x.device)
        if table is None:
            k = torch.bucketize(x.abs(), mids, right=True)
            return levels[k].copysign(x)
        x = x.contiguous()
        bits = x.view(torch.int32).view(-1)
        j = (bits >> (self.shift - 1)).bitwise_or_(1).bitwise_and_(table.numel() - 1)
        t = torch.index_select(table, 0, j)
        torch.sub(bits, t, out=t).bitwise_right_shift_(31)  # -1 where bits(x) < M, else 0
        j.add_(t)
        return torch.index_select(pairs, 0, j).view(x.shape)


_TABLES: dict[tuple[int, str], LevelTable] = {}


def level_table(B: int, mode: Mode = "apot") -> LevelTable:
    """The shared :class:`LevelTable` of ``build_levels(B, mode)``."""
    key = (B, mode)
    tab = _TABLES.get(key)
    if tab is None:
        tab = _TABLES.setdefault(key, LevelTable(build_levels(B, mode)))
    return tab


def project(x: Tensor, B: int, mode: Mode = "apot") -> Tensor:
    """``sign(x)·P(|x|)``: nearest level of ``build_levels(B, mode)`` by magnitude (table method, exact).

    Magnitudes above 1 give the top level; ties (a magnitude exactly on a float32 midpoint) go to
    the larger magnitude. Computed in float32, returned in ``x.dtype``.
    """
    out = level_table(B, mode).project(x.to(torch.float32))
    return out.to(x.dtype)


def project_bucketize(x: Tensor, levels: Tensor) -> Tensor:
    """Reference: ``sign(x)·levels[searchsorted(midpoints, |x|, right=True)]`` (same tie rule).

    Magnitudes above the largest midpoint give the top level.
    """
    levels = levels.to(device=x.device, dtype=torch.float32)
    mids = level_midpoints(levels).to(x.device)
    xf = x.to(torch.float32)
    return levels[torch.bucketize(xf.abs(), mids, right=True)].copysign(xf).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The quantization function
# --------------------------------------------------------------------------------------------


class _APoTFunction(torch.autograd.Function):
    """x_hat = α · Q(clamp(x·ι / α)) with the straight-through gradients of the module docstring.

    Inputs: ``x`` (for normalised weights: the centred weight ``w - mean(w)``), ``alpha`` (0-dim),
    ``inv_std`` (0-dim or None: no scaling; it receives a gradient when it requires grad, the
    ImageNet variant), the :class:`LevelTable`, ``signed``, ``lower_clip`` (activations: clamp
    from below too), ``clip_grad`` (False: the calibrated, unclipped x-gradient) and
    ``grad_scale`` (float or None). Returns (x_hat, number of elements inside the clamp range).

    Saved for backward: ``r = q - m·u`` (dα per element), the float mask ``m`` (only when the
    gradient is clipped) and ``v = m·u`` or ``u`` (only for a differentiable ``inv_std``).
    """

    @staticmethod
    def forward(ctx, x, alpha, inv_std, table, signed, lower_clip, clip_grad, grad_scale):
        xf = x if x.dtype == torch.float32 else x.to(torch.float32)
        a32 = alpha.detach().to(torch.float32)
        scale = 1.0 / a32 if inv_std is None else inv_std.detach().to(torch.float32) / a32
        u = xf * scale
        mask = torch.empty_like(u)  # float 1[inside the clamp range]
        if signed:
            c = u.clamp(-1.0, 1.0)
            torch.eq(c, u, out=mask)
            q = table.project(c)
        else:
            c = u.clamp(0.0, 1.0)
            if lower_clip:
                torch.eq(c, u, out=mask)
            else:  # clamp from above only: negative inputs are "inside" and projected to 0
                torch.le(u, 1.0, out=mask)
            q = table.project(c)
        out = q * a32
        # r = q - m·u: the derivative of x_hat with respect to α, per element
        r = torch.addcmul(q, u, mask, value=-1.0)
        v = None
        if inv_std is not None and ctx.needs_input_grad[2]:
            v = u * mask if clip_grad else u
        ctx.save_for_backward(r, mask if clip_grad else None, v, alpha, inv_std)
        ctx.clip_grad = clip_grad
        ctx.grad_scale = grad_scale
        ctx.x_dtype = x.dtype
        n_inside = mask.sum()
        ctx.mark_non_differentiable(n_inside)
        return out.to(x.dtype), n_inside

    @staticmethod
    def backward(ctx, g, _g_count):
        r, mask, v, alpha, inv_std = ctx.saved_tensors
        g = g.to(torch.float32)
        grad_x = grad_alpha = grad_inv_std = None
        if ctx.needs_input_grad[1]:
            grad_alpha = torch.dot(g.reshape(-1), r.view(-1))
            if ctx.grad_scale is not None:
                grad_alpha = grad_alpha * ctx.grad_scale
            grad_alpha = grad_alpha.to(alpha.dtype)
        if ctx.needs_input_grad[0]:
            # chain rule: dx_hat/dx = α · m · ι/α = m·ι  (m = 1 for the calibrated gradient)
            if ctx.clip_grad:
                grad_x = g * mask if inv_std is None else g * (mask * inv_std.to(torch.float32))
            else:
                grad_x = g if inv_std is None else g * inv_std.to(torch.float32)
            grad_x = grad_x.to(ctx.x_dtype)
        if inv_std is not None and ctx.needs_input_grad[2]:
            # dL/dι = Σ g_z·x and x = u·α/ι  (v = m·u when clipped, u otherwise)
            s = torch.dot(g.reshape(-1), v.view(-1))
            grad_inv_std = (s * alpha / inv_std).to(inv_std.dtype)
        return grad_x, grad_alpha, grad_inv_std, None, None, None, None, None


def weight_norm_stats(w: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
    """(w - mean(w), 1/std(w)) with the unbiased std, per tensor.

    Two passes (mean, then the centred sum of squares), which is several times faster on CPU
    than ``torch.std_mean``. With ``differentiable=False`` both are constants (the CIFAR variant:
    the gradient reaches w only through the centred tensor's identity part).
    """
    n = w.numel()
    if differentiable:
        d = w - w.mean()
        ss = torch.dot(d.reshape(-1), d.reshape(-1))
        return d, torch.rsqrt((ss / max(n - 1, 1)).clamp_min(1e-24))
    with torch.no_grad():
        mean = w.mean()
    d = w - mean
    with torch.no_grad():
        ss = torch.dot(d.reshape(-1), d.reshape(-1))
        inv_std = torch.rsqrt((ss / max(n - 1, 1)).clamp_min(1e-24))
    return d, inv_std


def apot_quantize(
    x: Tensor,
    alpha: Tensor,
    B: int,
    mode: Mode = "apot",
    signed: bool = True,
    weight_norm: Literal["none", "detached", "differentiable"] = "none",
    lower_clip: bool = True,
    clip_grad: bool = True,
    grad_scale: float | None = None,
) -> Tensor:
    """Functional form: ``α · Q_B(x' / α)`` with the straight-through gradients.

    ``x' = x`` or, with ``weight_norm``, ``(x - mean(x)) / std(x)`` (constant statistics with
    ``"detached"``, differentiated through with ``"differentiable"``). ``signed=True`` quantizes
    ``sign(u)·P(|u|)`` on ``[-1, 1]``; otherwise ``P(u)`` on ``[0, 1]`` (``lower_clip=False``: clamp
    from above only). ``clip_grad=False`` is the calibrated (unclipped) input gradient. Never
    modifies ``x``.
    """
    inv_std = None
    if weight_norm != "none":
        x, inv_std = weight_norm_stats(x, differentiable=weight_norm == "differentiable")
    out, _ = _APoTFunction.apply(x, alpha, inv_std, level_table(B, mode), signed, lower_clip, clip_grad, grad_scale)
    return out


class APoTQuantizer(nn.Module):
    """Learned-clipping APoT / PoT / uniform fake quantizer for weights (signed) or activations.

    Args:
        bits: total bits, 2..8. Weights (``signed=True``) use ``B = bits - 1`` magnitude bits plus
            a sign (``2^bits - 1`` values, 2 bits = ternary {-1, 0, 1}·α); activations use
            ``B = bits``. APoT/PoT with ``B >= 7`` use uniform levels (see :func:`build_levels`).
        signed: True for weights, False for (post-ReLU) activations.
        mode: ``"apot"`` (default), ``"pot"`` or ``"uniform"`` level set.
        variant: ``"cifar"`` — the original CIFAR-10 code: weight-normalisation statistics are
            constants, the weight gradient is not clipped (calibrated gradient), activations are
            clamped from above only, activation α starts at 8. ``"imagenet"`` — the original
            ImageNet code: gradients flow through the normalisation statistics, the weight
            gradient is clipped to ``|u| <= 1`` (except 2-bit APoT/PoT weights, which use the
            calibrated gradient), activations are clamped to [0, 1], activation α starts at 6.
        alpha_init: initial clipping threshold α (default 3.0 for weights, 8.0 / 6.0 for
            activations of the cifar / imagenet variant).
        weight_norm: weights only: quantize ``(w - mean(w)) / std(w)`` (per tensor) instead of w.
        grad_scale: optional factor for α's gradient.
        calibrated_grad: override of the unclipped-gradient choice above (None = automatic).

    ``forward(x)`` returns the fake-quantized tensor (same shape, dtype, device). Note that with
    ``weight_norm`` the quantized weight lives on the normalised scale: ``α·level``, not on the
    scale of the latent weight (as in the original; BN after the conv absorbs the scale).
    """

    def __init__(
        self,
        bits: int = 4,
        signed: bool = True,
        mode: Mode = "apot",
        variant: Variant = "cifar",
        alpha_init: float | None = None,
        weight_norm: bool = True,
        grad_scale: float | None = None,
        calibrated_grad: bool | None = None,
    ):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise ConfigError(f"bits={bits!r} is not supported by APoT; allowed: 2..8 (6-8 fall back to uniform levels where APoT/PoT is undefined)")
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not supported by APoT; allowed: {', '.join(MODES)}")
        if variant not in VARIANTS:
            raise ConfigError(f"variant={variant!r} is not supported by APoT; allowed: {', '.join(VARIANTS)}")
        self.bits = bits
        self.signed = bool(signed)
        self.mode = mode
        self.variant = variant
        self.B = bits - 1 if self.signed else bits
        self.weight_norm = bool(weight_norm) and self.signed
        self.grad_scale = None if grad_scale is None else float(grad_scale)
        if calibrated_grad is None:
            calibrated_grad = self.signed and (variant == "cifar" or (bits == 2 and mode != "uniform"))
        self.calibrated_grad = bool(calibrated_grad)
        self.lower_clip = self.signed or variant == "imagenet"
        if alpha_init is None:
            alpha_init = 3.0 if self.signed else (8.0 if variant == "cifar" else 6.0)
        if not alpha_init > 0:
            raise ConfigError(f"alpha_init={alpha_init!r} is not supported; allowed: a positive number")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.register_buffer("levels", build_levels(self.B, mode), persistent=False)
        self.register_buffer("clip_ratio", torch.zeros(()), persistent=False)

    @property
    def fallback(self) -> bool:
        """True when the requested APoT/PoT set is replaced by uniform levels (B >= 7)."""
        return levels_fallback(self.B, self.mode)

    def values(self) -> Tensor:
        """All representable values divided by α: signed ``±levels`` or the unsigned levels."""
        lv = self.levels
        return torch.cat([-lv.flip(0)[:-1], lv]) if self.signed else lv.clone()

    def forward(self, x: Tensor) -> Tensor:
        inv_std = None
        if self.weight_norm:
            x, inv_std = weight_norm_stats(x, differentiable=self.variant == "imagenet")
        out, n_inside = _APoTFunction.apply(
            x, self.alpha, inv_std, level_table(self.B, self.mode), self.signed, self.lower_clip,
            not self.calibrated_grad, self.grad_scale,
        )
        with torch.no_grad():
            self.clip_ratio.copy_(1.0 - n_inside / max(x.numel(), 1))
        return out

    def stats(self) -> dict[str, Tensor]:
        return {"alpha": self.alpha.detach().clone(), "clip_ratio": self.clip_ratio.clone()}

    def extra_repr(self) -> str:
        kind = "weight" if self.signed else "act"
        s = f"{kind}, bits={self.bits}, mode={self.mode}, variant={self.variant}, levels={self.levels.numel()}"
        if self.fallback:
            s += " (uniform fallback)"
        if self.calibrated_grad:
            s += ", calibrated_grad"
        if self.grad_scale is not None:
            s += f", grad_scale={self.grad_scale}"
        return s
