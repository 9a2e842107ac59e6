"""Exact BatchNorm folding for inference.

In eval mode a BatchNorm after a convolution (or linear layer) is an affine map per output
channel ``c``::

    BN(y)_c = γ_c · (y_c − μ_c) / σ_c + β_c,        σ_c = sqrt(running_var_c + eps)

so with ``y = W * x + b`` it can be merged into the layer::

    W'_c = W_c · γ_c / σ_c          b'_c = (b_c − μ_c) · γ_c / σ_c + β_c

(σ is the standard deviation; the TFLite-style original divided by the variance.) The result is
exact up to float rounding. It only holds for BN in *inference* mode (running statistics): a
folded model trained further has no BatchNorm any more. For quantization-aware training use
:class:`ltq.nn.QuantConvBn2d`, which simulates the fold while BN keeps learning.

Finding the pairs
-----------------
A BN can be folded into a conv only if it directly consumes that conv's output and nothing else
uses the conv output. :func:`find_conv_bn_pairs` answers this from the data flow graph built by
``torch.fx.symbolic_trace`` (used only for *finding* pairs; the model itself is modified by module
swap). Pre-activation patterns (BN → ReLU → conv, as in DenseNet/SqueezeNet-style blocks) are
therefore not paired. If the model cannot be traced (data-dependent control flow), it falls back
to registration order: a conv immediately followed by a BN with matching channel count inside the
same parent module. That heuristic is right for ``Sequential(conv, bn, ...)`` and the usual
``self.conv1 / self.bn1`` layout but **wrong for pre-activation blocks that register ``bn`` after
the conv it does not follow**; a warning is emitted when the fallback is used.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ltq.errors import ConfigError

__all__ = ["fold_conv_bn", "find_conv_bn_pairs", "fold_bn", "get_submodule", "set_submodule"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module`` (setattr on its parent)."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(get_submodule(model, parent_name), leaf, module)


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ/σ, β − μ·γ/σ)`` of a BatchNorm in inference mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(
            f"cannot fold {type(bn).__name__} with track_running_stats=False (it normalises with batch statistics "
            "at inference); allowed: BatchNorm layers with running statistics"
        )
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    return factor, beta - bn.running_mean * factor


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: _BatchNorm) -> nn.Module:
    """Return a copy of ``conv`` (Conv1d/2d/3d or Linear) with ``bn`` folded in (see module doc).

    The copy always has a bias. Works for grouped/depthwise convs (the output-channel axis of the
    weight is axis 0 for convs and linear layers). ``conv`` and ``bn`` are not modified.
    """
    if not isinstance(conv, _FOLDABLE) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise ConfigError(f"fold_conv_bn: {type(conv).__name__} cannot be folded; allowed: Conv1d, Conv2d, Conv3d, Linear")
    out_ch = conv.weight.shape[0]
    if bn.num_features != out_ch:
        raise ConfigError(f"fold_conv_bn: BN has {bn.num_features} features but the layer has {out_ch} outputs")
    factor, shift = _bn_affine(bn)
    w = conv.weight
    factor = factor.to(w.dtype)
    shift = shift.to(w.dtype)
    new_w = w * factor.reshape([-1] + [1] * (w.dim() - 1))
    b = conv.bias if conv.bias is not None else torch.zeros(out_ch, dtype=w.dtype, device=w.device)
    new_b = b * factor + shift
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(new_w.detach().clone(), requires_grad=w.requires_grad)
    folded.bias = nn.Parameter(new_b.detach().clone(), requires_grad=w.requires_grad)
    return folded


class _PairTracer(torch.fx.Tracer):
    """FX tracer that keeps every conv/linear/BN (including subclasses) as a leaf call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*_FOLDABLE, _BatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = _PairTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(get_submodule(model, node.target), _FOLDABLE):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        user = users[0]
        bn = get_submodule(model, user.target)
        conv = get_submodule(model, node.target)
        if (
            isinstance(bn, _BatchNorm)
            and len(user.args) >= 1
            and user.args[0] is node
            and calls[node.target] == 1
            and calls[user.target] == 1
            and bn.num_features == conv.weight.shape[0]
        ):
            pairs.append((node.target, user.target))
    return pairs


def _pairs_registration_order(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (n1, m1), (n2, m2) in zip(children, children[1:]):
            if isinstance(m1, _FOLDABLE) and isinstance(m2, _BatchNorm) and m2.num_features == m1.weight.shape[0]:
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(conv_name, bn_name)]`` where the BN is the only consumer of the conv's output.

    Uses ``torch.fx`` symbolic tracing to read the data flow; falls back (with a warning) to
    registration-order adjacency when the model cannot be traced (see module docstring).
    """
    try:
        return _pairs_fx(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure triggers the documented fallback
        warnings.warn(
            f"find_conv_bn_pairs: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "falling back to registration order (conv registered right before a BN in the same parent). "
            "Check the pairs for pre-activation blocks.",
            stacklevel=2,
        )
        return _pairs_registration_order(model)


def fold_bn(
    model: nn.Module, inplace: bool = False, pairs: list[tuple[str, str]] | None = None
) -> nn.Module:
    """Fold every (conv/linear → BN) pair of ``model``: the layer gets the folded weights, the BN
    becomes ``nn.Identity``. BNs that do not directly follow a layer stay as they are.

    The result equals ``model`` in eval mode. ``pairs`` overrides the automatic pair search.
    Returns the folded model (a deep copy unless ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    if pairs is None:
        pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv = get_submodule(model, conv_name)
        bn = get_submodule(model, bn_name)
        set_submodule(model, conv_name, fold_conv_bn(conv, bn))
        set_submodule(model, bn_name, nn.Identity())
    return model
