"""Trained Ternary Quantization (TTQ).

Zhu, Han, Mao & Dally, "Trained Ternary Quantization", ICLR 2017.

Every quantized layer keeps its latent full-precision weight ``W`` (the layer's own
``weight`` Parameter) and two learned positive scales ``w_p`` and ``w_n`` (Parameters of the
quantizer). With the per-layer threshold ``Δ = t · max|W|`` the ternary kernel is

    W_t = w_p · 1[W > Δ]  -  w_n · 1[W < -Δ]          (values {-w_n, 0, +w_p})

(``W`` is not normalised: the paper divides by max|W| before thresholding at ``t``, which gives
the same masks.) ``Δ`` is treated as a constant. With ``g = ∂L/∂W_t`` and the index sets
``I_p = {W > Δ}``, ``I_n = {W < -Δ}``, ``I_0`` = the rest, the gradients are (paper, eq. 7-8)::

    ∂L/∂w_p = Σ_{I_p} g
    ∂L/∂w_n = -Σ_{I_n} g              (W_t = -w_n there)
    ∂L/∂W   = w_p·g on I_p,  1·g on I_0,  w_n·g on I_n      (scaled straight-through estimator)

``mode="original"`` reproduces the original TropComplique/trained-ternary-quantization code, whose
w_n gradient is ``+Σ_{I_n} g`` (its GitHub issue #6: the sign is wrong because the quantized
value is ``-w_n``). Everything else is identical between the modes.

Scale initialisation (``scale_init``):

* ``"ones"`` — ``w_p = w_n = 1``, as the original. The ternary kernel then has entries ±1
  while the pretrained weights are ~0.01-0.1, which blows up the activations at the start of
  training ("scale shock": the original's SqueezeNet run has a first-epoch training loss of 17.4).
* ``"mean"`` (default) — at the first forward, ``w_p = mean_{I_p} |W|`` and ``w_n = mean_{I_n} |W|``
  (falling back to ``mean |W|`` for an empty set), so the ternary layer starts close to the
  full-precision one in scale. This happens once, lazily, and is recorded in the ``initialized``
  buffer (so it is saved in checkpoints and a resumed run does not re-initialise).

Requantization cache: :meth:`TTQQuantizer.requantize` stores the current ternary kernel in the
``weight_q`` buffer and marks ``cache_valid``. A training-mode forward always recomputes (and
clears ``cache_valid``, because the optimizer step that follows makes the cache stale); an
eval-mode forward returns ``weight_q`` only when the cache is valid *and* the latent weight has
not been modified since (same storage and the same in-place version counter), otherwise it
recomputes. So eval never sees a stale cache, and checkpoints written after a requantization
(see ``ltq.callbacks.Requantize``) contain the ternary kernel next to the latent weight.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError

__all__ = ["TTQQuantizer", "ttq_quantize", "ttq_masks", "ttq_threshold"]

TTQMode = Literal["paper", "original"]
ScaleInit = Literal["mean", "ones"]


def ttq_threshold(w: Tensor, t: float) -> Tensor:
    """Δ = t · max|W| (0-dim tensor, no gradient)."""
    return w.detach().abs().amax() * t


def ttq_masks(w: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks (I_p, I_n) = (W > Δ, W < -Δ)."""
    w = w.detach()
    return w > delta, w < -delta


class _TTQFunction(torch.autograd.Function):
    """W_t = w_p·1[W>Δ] - w_n·1[W<-Δ] with TTQ's gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx, w, w_p, w_n, delta, original_sign: bool):
        pos, neg = ttq_masks(w, delta)
        wp = w_p.detach().to(w.dtype)
        wn = w_n.detach().to(w.dtype)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        out = torch.where(pos, wp, torch.where(neg, -wn, zero))
        ctx.save_for_backward(pos, neg, w_p, w_n)
        ctx.original_sign = original_sign
        return out

    @staticmethod
    def backward(ctx, g):
        pos, neg, w_p, w_n = ctx.saved_tensors
        grad_w = grad_wp = grad_wn = None
        if ctx.needs_input_grad[0]:
            one = torch.ones((), dtype=g.dtype, device=g.device)
            factor = torch.where(pos, w_p.detach().to(g.dtype), torch.where(neg, w_n.detach().to(g.dtype), one))
            grad_w = g * factor
        if ctx.needs_input_grad[1]:
            grad_wp = torch.where(pos, g, 0.0).sum().to(w_p.dtype).reshape(w_p.shape)
        if ctx.needs_input_grad[2]:
            s = torch.where(neg, g, 0.0).sum()
            grad_wn = (s if ctx.original_sign else -s).to(w_n.dtype).reshape(w_n.shape)
        return grad_w, grad_wp, grad_wn, None, None


def ttq_quantize(w: Tensor, w_p: Tensor, w_n: Tensor, t: float = 0.05, mode: TTQMode = "paper") -> Tensor:
    """Functional TTQ: the ternary kernel of ``w`` with scales ``w_p``, ``w_n`` and threshold ``t·max|w|``."""
    if mode not in ("paper", "original"):
        raise ConfigError(f"mode={mode!r} is not supported by TTQ; allowed: paper, original")
    return _TTQFunction.apply(w, w_p, w_n, ttq_threshold(w, t), mode == "original")


class TTQQuantizer(nn.Module):
    """Ternary weight quantizer with learned positive scales (one pair per layer).

    Args:
        t: threshold factor, Δ = t · max|W| (0 <= t < 1).
        mode: ``"paper"`` (correct w_n gradient, default) or ``"original"`` (the original repo's
            ``+Σ`` w_n gradient, its issue #6).
        scale_init: ``"mean"`` (default; lazily from the latent weights at the first forward) or
            ``"ones"`` (the original's 1.0, 1.0).

    State: Parameters ``w_p``, ``w_n`` (0-dim); buffers ``initialized`` (bool),
    ``cache_valid`` (bool), ``weight_q`` (the cached ternary kernel, empty until
    :meth:`requantize`), and the statistics of the last forward ``threshold``, ``sparsity``
    (non-persistent). ``bits = 2``, ``num_scales = 2``. ``weight_q`` and ``cache_valid`` are a
    cache (``cache_buffers``): ``load_state_dict`` accepts a state without them (strict or not).
    """

    bits = 2
    num_scales = 2  # fp32 values stored next to the 2-bit codes (w_p, w_n), for size accounting
    #: derived buffers (a cache of the ternary kernel): an exporter may drop them, loading tolerates their absence
    cache_buffers = ("weight_q", "cache_valid")

    def __init__(self, t: float = 0.05, mode: TTQMode = "paper", scale_init: ScaleInit = "mean"):
        super().__init__()
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= float(t) < 1.0:
            raise ConfigError(f"t={t!r} is not supported by TTQ; allowed: a number in [0, 1)")
        if mode not in ("paper", "original"):
            raise ConfigError(f"mode={mode!r} is not supported by TTQ; allowed: paper, original")
        if scale_init not in ("mean", "ones"):
            raise ConfigError(f"scale_init={scale_init!r} is not supported by TTQ; allowed: mean, ones")
        self.t = float(t)
        self.mode = mode
        self.scale_init = scale_init
        self.w_p = nn.Parameter(torch.tensor(1.0))
        self.w_n = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(scale_init == "ones"))
        self.register_buffer("cache_valid", torch.tensor(False))
        self.register_buffer("weight_q", torch.empty(0))
        self.register_buffer("threshold", torch.zeros(()), persistent=False)
        self.register_buffer("sparsity", torch.zeros(()), persistent=False)
        self._init_done = scale_init == "ones"  # Python mirror of `initialized` (avoids a sync per step)
        self._cache_key: tuple | None = None  # _key() of the weight/scales behind weight_q

    # ----------------------------------------------------------------------------- state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight_q"
        if key in state_dict and (state_dict[key].shape != self.weight_q.shape or self.weight_q.is_inference()):
            self.weight_q = torch.empty(state_dict[key].shape, device=self.weight_q.device, dtype=self.weight_q.dtype)
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # the cache is optional (an exporter may drop it): absent means "not valid"
        optional = {prefix + name for name in self.cache_buffers}
        if any(k in optional for k in missing_keys[n_missing:]):
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in optional]
            self.cache_valid.fill_(False)
        self._init_done = bool(self.initialized)
        self._cache_key = None  # the latent weight may have been reloaded too: recompute once

    # ----------------------------------------------------------------------------- maths
    @torch.no_grad()
    def init_scales(self, w: Tensor) -> None:
        """Set w_p, w_n to the mean |W| over I_p / I_n of ``w`` (the ``"mean"`` initialisation)."""
        delta = ttq_threshold(w, self.t)
        pos, neg = ttq_masks(w, delta)
        aw = w.detach().abs()
        fallback = aw.mean()
        n_p, n_n = pos.sum(), neg.sum()
        mp = torch.where(n_p > 0, (aw * pos).sum() / n_p.clamp_min(1), fallback)
        mn = torch.where(n_n > 0, (aw * neg).sum() / n_n.clamp_min(1), fallback)
        self.w_p.copy_(mp.clamp_min(1e-8))
        self.w_n.copy_(mn.clamp_min(1e-8))
        self.initialized.fill_(True)
        self._init_done = True

    def forward(self, w: Tensor) -> Tensor:
        if not self._init_done:
            if bool(self.initialized):  # e.g. set by a broadcast or a manual buffer copy
                self._init_done = True
            else:
                self.init_scales(w)
        if self.training:
            # an optimizer step follows this forward: whatever is cached is about to be stale
            self.cache_valid.fill_(False)
            self._cache_key = None
        elif self._cache_key is not None and self._cache_key == self._key(w) and not (
            torch.is_grad_enabled() and (w.requires_grad or self.w_p.requires_grad or self.w_n.requires_grad)
        ):
            return self.weight_q
        delta = ttq_threshold(w, self.t)
        out = _TTQFunction.apply(w, self.w_p, self.w_n, delta, self.mode == "original")
        with torch.no_grad():
            self.threshold.copy_(delta)
            self.sparsity.copy_((out == 0).sum() / max(out.numel(), 1))
        return out

    def _key(self, w: Tensor) -> tuple:
        """Identity of the inputs of the ternary kernel: storage and in-place version counters."""
        return (w.data_ptr(), w._version, w.shape, self.w_p._version, self.w_n._version, self.w_p.data_ptr(), self.w_n.data_ptr())

    @torch.no_grad()
    def requantize(self, weight: Tensor) -> Tensor:
        """Store the ternary kernel of ``weight`` in ``weight_q`` (and mark the cache valid)."""
        if not self._init_done:
            self.init_scales(weight)
        delta = ttq_threshold(weight, self.t)
        pos, neg = ttq_masks(weight, delta)
        wq = torch.where(pos, self.w_p.to(weight.dtype), torch.where(neg, -self.w_n.to(weight.dtype), 0.0))
        stale = self.weight_q
        if (
            stale.shape != wq.shape
            or stale.device != wq.device
            or stale.dtype != wq.dtype
            or (stale.is_inference() and not torch.is_inference_mode_enabled())
        ):
            self.weight_q = wq
        else:
            stale.copy_(wq)
        self.threshold.copy_(delta)
        self.sparsity.copy_(1.0 - (pos.sum() + neg.sum()) / max(weight.numel(), 1))
        self.cache_valid.fill_(True)
        self._cache_key = self._key(weight)
        return self.weight_q

    @torch.no_grad()
    def ternary_codes(self, weight: Tensor) -> Tensor:
        """int8 codes in {-1, 0, +1} of ``weight`` (for packing; value = code>0 ? w_p : -w_n)."""
        pos, neg = ttq_masks(weight, ttq_threshold(weight, self.t))
        return pos.to(torch.int8) - neg.to(torch.int8)

    def stats(self) -> dict[str, Tensor]:
        return {
            "w_p": self.w_p.detach().clone(),
            "w_n": self.w_n.detach().clone(),
            "sparsity": self.sparsity.clone(),
            "threshold": self.threshold.clone(),
        }

    def extra_repr(self) -> str:
        return f"t={self.t}, mode={self.mode}, scale_init={self.scale_init}"
