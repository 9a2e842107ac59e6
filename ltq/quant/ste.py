"""Straight-through estimators (STE).

Quantization functions such as ``round`` have zero gradient almost everywhere. The
straight-through estimator (Bengio et al. 2013) keeps the quantized value in the forward pass
and pretends the function was the identity in the backward pass:

    forward:  y = f(x)             backward:  dL/dx = dL/dy

All helpers here use the "detach trick" ``x + (f(x) - x).detach()``: its value is ``f(x)`` and
its derivative with respect to ``x`` is exactly 1. They never modify ``x`` in place and run on
whatever device ``x`` lives on.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ste", "round_ste", "floor_ste", "ceil_ste", "sign_ste", "grad_scale"]


def ste(value: Tensor, x: Tensor) -> Tensor:
    """Return ``value`` in the forward pass with the identity gradient to ``x``.

    ``value`` and ``x`` must broadcast to the same shape. Useful to attach a straight-through
    gradient to any non-differentiable projection ``value = P(x)``.
    """
    return x + (value - x).detach()


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even, as ``torch.round``) with the identity gradient."""
    return ste(torch.round(x), x)


def floor_ste(x: Tensor) -> Tensor:
    """``floor(x)`` with the identity gradient."""
    return ste(torch.floor(x), x)


def ceil_ste(x: Tensor) -> Tensor:
    """``ceil(x)`` with the identity gradient."""
    return ste(torch.ceil(x), x)


def sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` mapped to {-1, +1} (0 -> +1) with the identity gradient.

    Binary networks want two levels only, so zero is sent to +1 rather than to 0. Clipping of the
    gradient to |x| <= 1 (the "hard-tanh STE") is left to the caller.
    """
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return ste(s, x)


def grad_scale(x: Tensor, scale: float | Tensor) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``.

    ``y = x·s + (x - x·s).detach()`` has value ``x`` and derivative ``s``. Used e.g. by LSQ to
    rescale the gradient of a learnable step size.
    """
    y = x * scale
    return (x - y).detach() + y
