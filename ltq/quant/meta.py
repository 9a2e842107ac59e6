"""MetaQuant's meta-networks: learned maps from the quantized weight's gradient to the weight update.

MetaQuant (Chen, Wang & Pan, NeurIPS 2019) replaces the straight-through estimator's
``dL/dW ≈ dL/dŴ · dŴ/dW̃ · dW̃/dW`` by a *meta-gradient* produced by a small network ``M_φ``.
One network is shared by all quantized layers and applied **coordinate-wise**: a layer's tensors
are flattened to ``(numel, 1)`` and every weight coordinate is one sample of the meta-network's
batch. With ``g = dL/dŴ`` (the gradient with respect to the quantized weight) and ``W̃`` the
pre-quantized weight of the same forward pass:

=========  ===============================  ===================================================
name       meta-gradient                    network M_φ
=========  ===============================  ===================================================
MultiFC    ``g ⊙ M_φ(W̃)``                   ``num_layers`` bias-free Linear layers 1→h→…→h→1,
                                            optional nonlinearity between them
FCGrad     ``M_φ(g)``                       bias-free Linear(1→h) → [σ] → Linear(h→1)
LSTMFC     ``g ⊙ M_φ(W̃; h_t, c_t)``         LSTM(1→h, one layer, sequence length 1, batch numel)
                                            then Linear(h→1) with bias; the hidden state
                                            ``(h_t, c_t)`` (each ``(numel, h)``) is kept per
                                            layer across steps and detached every step
=========  ===============================  ===================================================

Every meta-network here has the call signature ``meta_net(grad, pre_weight, name) -> meta_grad``
(``meta_grad`` has ``grad``'s shape). ``grad`` and ``pre_weight`` are treated as data (they are
detached); the gradient flows to φ only.

Choice of the default nonlinearity (``nonlinear=None``)
-------------------------------------------------------
Without a nonlinearity, a bias-free chain of Linear layers is a product of matrices applied to a
scalar input, i.e. one learned scalar ``s``: MultiFC computes ``s·g⊙W̃`` and FCGrad ``s·g``.
Every result the original code reports (and the paper's tables) was produced that way — in the
original FC-Grad the nonlinearity was never applied at all, because its string comparison used
``is``. We default to ``None`` so that ltq reproduces the reported numbers, and offer
``"tanh"``/``"relu"`` as explicit options. Note that a bias-free ReLU network is positively
homogeneous (``M(x) = a·x`` for x > 0 and ``b·x`` for x < 0), so on DoReFa's ``W̃ ∈ [0, 1]``
MultiFC with ``"relu"`` is still a scalar; ``"tanh"`` is the option that gives MultiFC a
genuinely nonlinear shape. LSTMFC is nonlinear in any case.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError, check_choice

__all__ = [
    "MetaNet",
    "MultiFC",
    "FCGrad",
    "LSTMFC",
    "LSTMHiddenState",
    "MetaWeightQuantizer",
    "build_meta_net",
    "META_NETS",
    "NONLINEARITIES",
]

META_NETS = ("ste", "multifc", "fcgrad", "lstmfc")
NONLINEARITIES = (None, "relu", "tanh")


def _check_nonlinear(nonlinear):
    if isinstance(nonlinear, str) and nonlinear.lower() in ("none", "null", ""):
        nonlinear = None
    if isinstance(nonlinear, str):
        nonlinear = nonlinear.lower()
    if nonlinear not in NONLINEARITIES:
        raise ConfigError(f"model.nonlinear={nonlinear!r} is not supported; allowed: None, relu, tanh")
    return nonlinear


def _activation(nonlinear) -> nn.Module | None:
    return {None: None, "relu": nn.ReLU(), "tanh": nn.Tanh()}[nonlinear]


def _check_positive_int(option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}={value!r} is not supported; allowed: an integer >= 1")
    return value


class MetaNet(nn.Module):
    """Base class: ``forward(grad, pre_weight, name) -> meta_grad`` with ``grad``'s shape.

    ``name`` identifies the layer (only stateful meta-networks such as LSTMFC use it).
    """

    def forward(self, grad: Tensor, pre_weight: Tensor, name: str) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def reset_state(self) -> None:
        """Forget any per-layer state (no-op for stateless meta-networks)."""


class MultiFC(MetaNet):
    """``meta_grad = g ⊙ M_φ(W̃)`` with ``M_φ`` a bias-free MLP 1→h→…→h→1 (``num_layers`` Linears).

    Args:
        hidden: width h of the hidden layers.
        num_layers: number of Linear layers (≥ 1; the original default is 3).
        nonlinear: ``None`` (original; the MLP collapses to a scalar), ``"relu"`` or ``"tanh"``,
            applied between the Linear layers.
    """

    def __init__(self, hidden: int = 100, num_layers: int = 3, nonlinear: str | None = None):
        super().__init__()
        self.hidden = _check_positive_int("model.meta_hidden", hidden)
        self.num_layers = _check_positive_int("model.meta_num_layers", num_layers)
        self.nonlinear = _check_nonlinear(nonlinear)
        layers: list[nn.Module] = []
        for i in range(num_layers):
            fan_in = 1 if i == 0 else hidden
            fan_out = 1 if i == num_layers - 1 else hidden
            layers.append(nn.Linear(fan_in, fan_out, bias=False))
            act = _activation(self.nonlinear)
            if i < num_layers - 1 and act is not None:
                layers.append(act)
        self.net = nn.Sequential(*layers)

    def forward(self, grad: Tensor, pre_weight: Tensor, name: str = "") -> Tensor:
        x = pre_weight.detach().reshape(-1, 1)
        return grad.detach() * self.net(x).view_as(grad)


class FCGrad(MetaNet):
    """``meta_grad = M_φ(g)`` with ``M_φ`` = bias-free Linear(1→h) → [σ] → Linear(h→1).

    Args:
        hidden: width h.
        nonlinear: ``None`` (original; a scalar multiple of g), ``"relu"`` or ``"tanh"``.
    """

    def __init__(self, hidden: int = 100, nonlinear: str | None = None):
        super().__init__()
        self.hidden = _check_positive_int("model.meta_hidden", hidden)
        self.nonlinear = _check_nonlinear(nonlinear)
        layers: list[nn.Module] = [nn.Linear(1, hidden, bias=False)]
        act = _activation(self.nonlinear)
        if act is not None:
            layers.append(act)
        layers.append(nn.Linear(hidden, 1, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, grad: Tensor, pre_weight: Tensor | None = None, name: str = "") -> Tensor:
        return self.net(grad.detach().reshape(-1, 1)).view_as(grad)


class LSTMHiddenState(nn.Module):
    """Per-layer LSTM hidden states ``(h, c)`` kept as buffers, so they live in ``state_dict``.

    For the layer called ``name`` the buffers are ``h__<key>`` and ``c__<key>`` with
    ``key = name.replace(".", "__")`` (buffer names cannot contain dots), each of shape
    ``(numel, hidden)``. Buffers are created lazily at the first :meth:`set`; loading a
    ``state_dict`` into a fresh (empty) instance creates the buffers it finds, with the saved
    shapes, on this module's device — so checkpoints round-trip and resume restores the state.
    """

    def __init__(self):
        super().__init__()
        # device/dtype anchor for buffers created while loading a state_dict (not saved)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def names(self) -> list[str]:
        """Buffer keys of the layers that have a stored state."""
        return [k[3:] for k in self._buffers if k.startswith("h__")]

    def get(self, name: str) -> tuple[Tensor, Tensor] | None:
        k = self._key(name)
        h, c = self._buffers.get("h__" + k), self._buffers.get("c__" + k)
        if h is None or c is None:
            return None
        return h, c

    def set(self, name: str, h: Tensor, c: Tensor) -> None:
        """Store detached copies-by-reference of ``(h, c)`` for layer ``name``."""
        k = self._key(name)
        for prefix, t in (("h__", h), ("c__", c)):
            t = t.detach()
            if prefix + k in self._buffers:
                self._buffers[prefix + k] = t
            else:
                self.register_buffer(prefix + k, t)

    def reset(self) -> None:
        """Drop all stored states (the next step starts from zeros)."""
        for k in [k for k in self._buffers if k.startswith(("h__", "c__"))]:
            del self._buffers[k]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            if "." in local or not local.startswith(("h__", "c__")):
                continue
            cur = self._buffers.get(local)
            if cur is None or cur.shape != value.shape:
                self._buffers[local] = torch.empty(value.shape, dtype=value.dtype, device=self._anchor.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class LSTMFC(MetaNet):
    """``meta_grad = g ⊙ M_φ(W̃; h, c)``: an LSTM(1→h) over each coordinate, then Linear(h→1).

    The LSTM runs one time step per training step with the layer's coordinates as its batch;
    the new ``(h, c)`` of each layer is stored (detached) in :attr:`hidden_state`, an
    :class:`LSTMHiddenState`, and fed back at the layer's next step.

    Args:
        hidden: LSTM hidden size h.
    """

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.hidden = _check_positive_int("model.meta_hidden", hidden)
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=1)
        self.fc = nn.Linear(hidden, 1, bias=True)
        self.hidden_state = LSTMHiddenState()

    def forward(self, grad: Tensor, pre_weight: Tensor, name: str) -> Tensor:
        x = pre_weight.detach().reshape(1, -1, 1)  # (seq=1, batch=numel, input=1)
        prev = self.hidden_state.get(name)
        if prev is not None and prev[0].shape == (x.shape[1], self.hidden):
            out, (h, c) = self.lstm(x, (prev[0].unsqueeze(0), prev[1].unsqueeze(0)))
        else:
            out, (h, c) = self.lstm(x)
        self.hidden_state.set(name, h.squeeze(0), c.squeeze(0))
        m = self.fc(out.reshape(-1, self.hidden))
        return grad.detach() * m.view_as(grad)

    def reset_state(self) -> None:
        self.hidden_state.reset()


def build_meta_net(name: str, hidden: int = 100, num_layers: int = 3, nonlinear: str | None = None,
                   **kwargs) -> MetaNet | None:
    """Build a meta-network by name: ``"ste"`` (None: plain straight-through estimator),
    ``"multifc"``, ``"fcgrad"`` or ``"lstmfc"``.

    ``hidden`` is the width/LSTM size, ``num_layers`` the MultiFC depth, ``nonlinear`` the
    MultiFC/FCGrad activation (ignored by LSTMFC). Unknown extra keyword arguments raise.
    """
    if isinstance(name, str):
        name = name.lower().replace("-", "").replace("_", "")
    check_choice("model.meta", name, META_NETS)
    if kwargs:
        raise ConfigError(f"build_meta_net got unknown options {sorted(kwargs)}; allowed: hidden, num_layers, nonlinear")
    nonlinear = _check_nonlinear(nonlinear)
    if name == "ste":
        return None
    if name == "multifc":
        return MultiFC(hidden=hidden, num_layers=num_layers, nonlinear=nonlinear)
    if name == "fcgrad":
        return FCGrad(hidden=hidden, nonlinear=nonlinear)
    return LSTMFC(hidden=hidden)


class MetaWeightQuantizer(nn.Module):
    """A layer's weight quantizer during MetaQuant training: wraps DoReFa/BWN and adds the
    look-ahead offset and the bookkeeping the meta-gradient needs.

    ``forward(W)``:

    1. ``W' = W + offset`` if an ``offset`` tensor was set for this step (the MetaQuant
       look-ahead ``−lr·π(c⊙meta_grad)``, which carries φ's gradient path), else ``W' = W``;
    2. ``W̃ = quantizer.pre_quantize(W')``, ``Ŵ = quantizer.quantize_pre(W̃)``;
    3. in training mode with autograd on, ``W̃`` is stored in the buffer ``pre_weight_prev`` and a
       tensor hook stores ``dL/dŴ`` in ``grad_prev`` during the backward pass (and sets
       ``has_prev``): they are the meta-network's inputs at the *next* step.

    Buffers (all in ``state_dict``, so resume continues exactly): ``grad_prev``,
    ``pre_weight_prev``, ``update_prev`` (the last refined update, used by the original code's
    look-ahead value) with the weight's shape, and the bool ``has_prev``. ``offset`` is a
    transient attribute, never saved; the training step sets and clears it.
    """

    def __init__(self, quantizer: nn.Module, weight_shape):
        super().__init__()
        for attr in ("pre_quantize", "quantize_pre", "calibration"):
            if not hasattr(quantizer, attr):
                raise ConfigError(f"MetaWeightQuantizer needs a quantizer with {attr}(); got {type(quantizer).__name__}")
        self.quantizer = quantizer
        self.bits = quantizer.bits
        self.num_scales = getattr(quantizer, "num_scales", 1)
        shape = tuple(weight_shape)
        self.register_buffer("grad_prev", torch.zeros(shape))
        self.register_buffer("pre_weight_prev", torch.zeros(shape))
        self.register_buffer("update_prev", torch.zeros(shape))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.offset: Tensor | None = None

    def pre_quantize(self, w: Tensor) -> Tensor:
        return self.quantizer.pre_quantize(w)

    def quantize_pre(self, w_pre: Tensor) -> Tensor:
        return self.quantizer.quantize_pre(w_pre)

    def calibration(self, w: Tensor) -> Tensor:
        return self.quantizer.calibration(w)

    def _save_grad(self, grad: Tensor) -> None:
        with torch.no_grad():
            self.grad_prev.copy_(grad)
            self.has_prev.fill_(True)

    def forward(self, w: Tensor) -> Tensor:
        if self.offset is not None:
            w = w + self.offset
        w_pre = self.quantizer.pre_quantize(w)
        w_hat = self.quantizer.quantize_pre(w_pre)
        if self.training and torch.is_grad_enabled() and w_hat.requires_grad:
            with torch.no_grad():
                self.pre_weight_prev.copy_(w_pre)
            w_hat.register_hook(self._save_grad)
        return w_hat

    def stats(self) -> dict[str, Tensor]:
        return self.quantizer.stats()
