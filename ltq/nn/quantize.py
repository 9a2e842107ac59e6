"""``quantize_model``: trace-free module swap driven by a :class:`QuantPolicy`.

Every ``nn.Conv2d`` / ``nn.Linear`` (``policy.types``) found by ``named_modules`` gets a
per-layer config, resolved in this order:

1. the policy defaults ``w_bits``, ``a_bits``;
2. the **first** Conv2d and the **last** Linear in module (registration) order — if there is no
   Conv2d/Linear, the first/last quantizable layer — are kept in floating point
   (``skip_first`` / ``skip_last``), or, when ``first_last_w_bits`` is set, get weight-only
   quantization at that width (as APoT does with 8 bits), built by ``first_last_weight`` if given,
   else by ``weight``;
3. ``overrides``: ``{fnmatch pattern on the module name: {"w_bits", "a_bits", "skip"}}``, applied
   in dict order (later patterns win). A pattern that matches no layer is an error.

Layers that end up with ``skip`` (or with neither weight nor activation bits) stay untouched;
the others are replaced, via ``setattr`` on their parent, by
:class:`~ltq.nn.layers.QuantConv2d` / :class:`~ltq.nn.layers.QuantLinear` built with
``from_float`` (the same Parameter objects). BatchNorm is never quantized. ``fold_bn``:

* ``"none"`` — BN stays a separate float layer;
* ``"fold"`` — every conv→BN pair is folded exactly first (:func:`ltq.quant.fold.fold_bn`, BN
  becomes Identity; the folded layers get new weight tensors). For PTQ / inference: the model has
  no BN any more if trained further;
* ``"simulate"`` — for QAT: each Conv2d→BatchNorm2d pair whose conv is quantized becomes a
  :class:`~ltq.nn.convbn.QuantConvBn2d` (the BN module moves inside it, state_dict keys
  ``<conv>.bn.*``) and the original BN slot becomes Identity. Linear→BN pairs stay unfused.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from ltq.errors import ConfigError, check_choice
from ltq.nn.convbn import QuantConvBn2d
from ltq.nn.layers import QuantConv2d, QuantLinear, iter_quant_layers
from ltq.quant.fold import find_conv_bn_pairs, fold_bn, get_submodule, set_submodule
from ltq.quant.observers import OBSERVERS
from ltq.quant.uniform import UniformQuantizer, check_bits

__all__ = [
    "QuantPolicy",
    "quantize_model",
    "describe_quantization",
    "UniformQuantizerFactory",
    "uniform_policy",
    "OVERRIDE_KEYS",
    "FOLD_MODES",
]

QuantizerFactory = Callable[[str, nn.Module, int], nn.Module]
OVERRIDE_KEYS = ("w_bits", "a_bits", "skip")
FOLD_MODES = ("none", "fold", "simulate")


@dataclass
class QuantPolicy:
    """Which layers get which quantizers (see module docstring).

    ``weight`` / ``act`` are factories ``(layer_name, layer, bits) -> quantizer module``;
    ``act`` quantizes the layer *input*. ``a_bits=None`` keeps activations in float.
    ``first_last_weight`` optionally builds the weight quantizer of the first/last layers when
    ``first_last_w_bits`` is set (default: ``weight``).
    """

    weight: QuantizerFactory | None = None
    act: QuantizerFactory | None = None
    w_bits: int | None = 8
    a_bits: int | None = 8
    skip_first: bool = True
    skip_last: bool = True
    first_last_w_bits: int | None = None
    first_last_weight: QuantizerFactory | None = None
    overrides: dict[str, dict] = field(default_factory=dict)
    types: tuple = (nn.Conv2d, nn.Linear)
    fold_bn: str = "none"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an inconsistent policy."""
        if self.weight is None and self.act is None:
            raise ConfigError("QuantPolicy needs a weight and/or an act quantizer factory; both are None")
        check_choice("fold_bn", self.fold_bn, FOLD_MODES)
        for opt in ("w_bits", "a_bits", "first_last_w_bits"):
            v = getattr(self, opt)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{opt}={v!r} is not supported; allowed: a positive integer or None")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides must be a dict {{pattern: {{w_bits, a_bits, skip}}}}; got {type(self.overrides).__name__}")
        for pattern, ov in self.overrides.items():
            if not isinstance(ov, dict):
                raise ConfigError(f"overrides[{pattern!r}] must be a dict with keys {', '.join(OVERRIDE_KEYS)}; got {ov!r}")
            for key in ov:
                if key not in OVERRIDE_KEYS:
                    raise ConfigError(f"overrides[{pattern!r}] has unknown key {key!r}; allowed: {', '.join(OVERRIDE_KEYS)}")
        types = tuple(self.types)
        for t in types:
            if not (isinstance(t, type) and issubclass(t, (nn.Conv2d, nn.Linear))):
                raise ConfigError(f"types contains {t!r}; allowed: nn.Conv2d, nn.Linear and their subclasses")

    def to_dict(self) -> dict:
        """Plain-data description (for hparams / logging)."""
        return {
            "weight": _describe_factory(self.weight),
            "act": _describe_factory(self.act),
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "skip_first": self.skip_first,
            "skip_last": self.skip_last,
            "first_last_w_bits": self.first_last_w_bits,
            "first_last_weight": _describe_factory(self.first_last_weight),
            "overrides": copy.deepcopy(dict(self.overrides)),
            "types": [t.__name__ for t in self.types],
            "fold_bn": self.fold_bn,
        }


def _describe_factory(f) -> object:
    if f is None:
        return None
    if hasattr(f, "to_dict"):
        return f.to_dict()
    name = getattr(f, "__qualname__", None) or type(f).__qualname__
    return f"{getattr(f, '__module__', '?')}.{name}"


def _candidates(model: nn.Module, types: tuple) -> list[tuple[str, nn.Module]]:
    # MultiheadAttention reads out_proj.weight directly: swapping its Linear would do nothing
    in_mha = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.modules()}
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, types) and id(m) not in in_mha]


def _resolve(policy: QuantPolicy, names: list[str], modules: dict[str, nn.Module]) -> dict[str, dict]:
    convs = [n for n in names if isinstance(modules[n], nn.Conv2d)]
    linears = [n for n in names if isinstance(modules[n], nn.Linear)]
    first = convs[0] if convs else names[0]
    last = linears[-1] if linears else names[-1]
    configs: dict[str, dict] = {}
    matched: set[str] = set()
    for name in names:
        cfg = {"w_bits": policy.w_bits, "a_bits": policy.a_bits, "skip": False, "weight": policy.weight}
        if (name == first and policy.skip_first) or (name == last and policy.skip_last):
            if policy.first_last_w_bits is not None:
                cfg.update(w_bits=policy.first_last_w_bits, a_bits=None, weight=policy.first_last_weight or policy.weight)
            else:
                cfg["skip"] = True
        for pattern, ov in policy.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                matched.add(pattern)
                cfg.update(ov)
        configs[name] = cfg
    unmatched = [p for p in policy.overrides if p not in matched]
    if unmatched:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ConfigError(f"overrides pattern {unmatched[0]!r} matches no quantizable layer; layers are: {shown}")
    return configs


def _build(factory, name, module, bits, role) -> nn.Module | None:
    if factory is None or bits is None:
        return None
    q = factory(name, module, bits)
    if q is None:
        return None
    if not isinstance(q, nn.Module):
        raise ConfigError(f"the {role} quantizer factory returned {type(q).__name__} for {name!r}; it must return an nn.Module")
    return q.to(module.weight.device)


def quantize_model(model: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Swap the layers of ``model`` in place according to ``policy``; returns ``model``.

    Raises :class:`ConfigError` (before changing anything) for an invalid policy, an override
    pattern that matches no layer, or a model that is already quantized.
    """
    policy.validate()
    for name, layer in iter_quant_layers(model):
        raise ConfigError(
            f"quantize_model: the model is already quantized ({name or '<root>'!r} is a {type(layer).__name__}); "
            "allowed: a float model (build it again, or load a quantized checkpoint into a freshly quantized model)"
        )
    types = tuple(policy.types)
    candidates = _candidates(model, types)
    if not candidates:
        raise ConfigError(f"quantize_model: the model has no layer of types {', '.join(t.__name__ for t in types)}")
    names = [n for n, _ in candidates]
    configs = _resolve(policy, names, dict(candidates))

    def active(cfg: dict) -> bool:
        if cfg["skip"]:
            return False
        has_w = cfg["w_bits"] is not None and cfg["weight"] is not None
        has_a = cfg["a_bits"] is not None and policy.act is not None
        return has_w or has_a

    # build every quantizer first, so that a bad bit-width fails before the model is touched
    built = {}
    for name in names:
        cfg = configs[name]
        if active(cfg):
            module = get_submodule(model, name)
            built[name] = (
                _build(cfg["weight"], name, module, cfg["w_bits"], "weight"),
                _build(policy.act, name, module, cfg["a_bits"], "act"),
            )

    bn_of: dict[str, str] = {}
    if policy.fold_bn == "fold":
        fold_bn(model, inplace=True)
    elif policy.fold_bn == "simulate":
        for conv_name, bn_name in find_conv_bn_pairs(model):
            conv, bn = get_submodule(model, conv_name), get_submodule(model, bn_name)
            if conv_name in built and isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                bn_of[conv_name] = bn_name

    for name, (wq, aq) in built.items():
        module = get_submodule(model, name)
        if name in bn_of:
            new = QuantConvBn2d.from_float(module, get_submodule(model, bn_of[name]), wq, aq)
            set_submodule(model, bn_of[name], nn.Identity())
        elif isinstance(module, nn.Conv2d):
            new = QuantConv2d.from_float(module, wq, aq)
        else:
            new = QuantLinear.from_float(module, wq, aq)
        set_submodule(model, name, new)
    model._ltq_policy = policy.to_dict()
    return model


def describe_quantization(model: nn.Module) -> list[dict]:
    """One dict per Conv2d/Linear (quantized or not), in module order::

    {"name", "type", "w_bits", "a_bits", "weight_quantizer", "act_quantizer"}

    ``*_bits`` are read from the quantizers' ``bits`` attribute (None = float).
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        wq = getattr(m, "weight_quantizer", None)
        aq = getattr(m, "act_quantizer", None)
        rows.append(
            {
                "name": name,
                "type": type(m).__name__,
                "w_bits": getattr(wq, "bits", None) if wq is not None else None,
                "a_bits": getattr(aq, "bits", None) if aq is not None else None,
                "weight_quantizer": type(wq).__name__ if wq is not None else None,
                "act_quantizer": type(aq).__name__ if aq is not None else None,
            }
        )
    return rows


@dataclass(frozen=True)
class UniformQuantizerFactory:
    """Picklable factory ``(name, layer, bits) -> UniformQuantizer`` (per channel along axis 0)."""

    symmetric: bool = True
    per_channel: bool = False
    observer: str = "minmax"
    narrow_range: bool = True
    averaging_constant: float | None = 0.01
    percentile: float = 99.99
    sync: bool = True

    def __call__(self, name: str, module: nn.Module, bits: int) -> UniformQuantizer:
        return UniformQuantizer(
            bits,
            symmetric=self.symmetric,
            per_channel=self.per_channel,
            ch_axis=0,
            observer=self.observer,
            narrow_range=self.narrow_range,
            averaging_constant=self.averaging_constant,
            percentile=self.percentile,
            sync=self.sync,
        )

    def to_dict(self) -> dict:
        return {"type": "uniform", **asdict(self)}


def uniform_policy(
    w_bits: int | None = 8,
    a_bits: int | None = 8,
    per_channel: bool = True,
    observer: str = "minmax",
    act_observer: str = "ema",
    *,
    narrow_range: bool = True,
    averaging_constant: float | None = 0.01,
    percentile: float = 99.99,
    skip_first: bool = True,
    skip_last: bool = True,
    first_last_w_bits: int | None = None,
    overrides: dict[str, dict] | None = None,
    fold_bn: str = "none",
) -> QuantPolicy:
    """Uniform fake quantization everywhere: symmetric signed weights (per output channel by
    default, observer ``observer``) and affine unsigned input activations (``act_observer``;
    affine handles inputs of either sign, which is not known statically).

    Weight observers are not all-reduced across DDP ranks (weights are identical there);
    activation observers are. For QAT prefer ``observer="current"`` so the weight range follows
    the weights instead of only ever growing (``"minmax"``).
    """
    for opt, bits in (("w_bits", w_bits), ("a_bits", a_bits), ("first_last_w_bits", first_last_w_bits)):
        if bits is not None:
            check_bits(bits, opt)
    check_choice("observer", observer, OBSERVERS)
    check_choice("act_observer", act_observer, OBSERVERS)
    common = dict(narrow_range=narrow_range, averaging_constant=averaging_constant, percentile=percentile)
    wf = UniformQuantizerFactory(symmetric=True, per_channel=per_channel, observer=observer, sync=False, **common)
    af = UniformQuantizerFactory(symmetric=False, per_channel=False, observer=act_observer, sync=True, **common)
    return QuantPolicy(
        weight=wf,
        act=af,
        w_bits=w_bits,
        a_bits=a_bits,
        skip_first=skip_first,
        skip_last=skip_last,
        first_last_w_bits=first_last_w_bits,
        overrides=dict(overrides or {}),
        fold_bn=fold_bn,
    )
