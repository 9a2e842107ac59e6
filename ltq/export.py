"""Deployment of ltq models: real int8 inference, packed low-bit checkpoints, size accounting.

Three things live here:

1. :func:`deployable` — the inference form of a fake-quantized model: a copy in eval mode on the
   CPU in which every :class:`~ltq.nn.QuantConvBn2d` is replaced by its folded
   :class:`~ltq.nn.QuantConv2d` (``W' = W·γ/σ``, ``b' = β − μ·γ/σ``, running statistics) and all
   observers are switched off. Its output equals the fake-quant model's in eval mode.

2. **Real int8 inference** behind a small interface, :class:`Int8Backend`
   (``convert(model, calib, example_input) -> nn.Module`` and ``save(module, path, example_input)``),
   selected by name with :func:`get_backend`. The one backend today, ``"ao_x86"``
   (:class:`AoX86Backend`), lowers the model with ``torch.ao.quantization``'s FX graph mode
   (``prepare_fx``/``convert_fx``) onto the ``x86`` quantized engine (fbgemm/oneDNN kernels).
   torch.ao is deprecated from torch 2.10 on but still works in 2.14; its warnings are silenced
   inside ltq. A torchao pt2e backend (``X86InductorQuantizer``) can be added under another name.

3. **Packed low-bit checkpoints**: :func:`save_packed` / :func:`load_packed` store each quantized
   weight as packed integer codes (8/4/2/1 bits per code, see :mod:`ltq.quant.pack`) plus its
   scales, everything else in fp32; :func:`load_packed` rebuilds the state_dict with the
   dequantized weights.

How the int8 model is made to match the fake-quant model
--------------------------------------------------------
ltq simulates ``y = conv(Q_a(x), Q_w(W)) + b`` with per-channel symmetric weights
(``s_c = max|W_c| / 127``, codes in ``[-127, 127]``) and affine unsigned 8-bit inputs
(``s = (hi − lo)/255``, ``z = −round(lo/s)``). The FX int8 model uses exactly these numbers,
transferred rather than re-estimated:

* **weights**: the FX weight observer of each int8 layer is a preset one that returns ltq's
  per-channel scales (zero point 0); the float weight handed to FX is ltq's *dequantized* weight
  ``Ŵ = s·q``, so FX recovers the same integer codes ``q`` (rounding ``Ŵ/s`` cannot flip);
* **activations**: every FX activation observer is traced forward through qparam-preserving ops
  (ReLU, max-pool, flatten, reshape, dropout, identity) to the int8 layers that consume the tensor;
  it gets the scale/zero point of their ltq input quantizer (``Q_a`` above). Quantizing *before*
  a ReLU/max-pool with the range measured *after* it is exact: with ``lo = 0`` negative values
  map to code 0, which is what the ReLU does, and max-pool keeps the maximum.
* **what ltq does not simulate**: an int8 conv always writes a quantized output, and an int8
  residual ``add`` needs quantized operands. Where such a tensor is not the input of an ltq-quantized
  layer (a conv output that feeds an ``add``, the output of the last int8 layer when the
  classifier stays float, an average-pool output), ltq has no range for it; those FX observers
  are calibrated with min/max on the calibration batches (the same batches PTQ uses). This is the
  only source of mismatch besides rounding ties and the int32 bias of the kernels; the number of
  such points is reported (``module.ltq_int8_report``).

``reduce_range``: fbgemm's AVX2 kernels accumulate pairs of ``u8·s8`` products in int16 and
can saturate with full-range activations; torch's default x86 qconfig therefore uses 7-bit
activations. CPUs with AVX512-VNNI/AVX-VNNI/AMX accumulate in int32 and need no reduction.
``reduce_range="auto"`` (the default) uses full 8-bit activations (bit-exact with ltq's fake quant)
when ``/proc/cpuinfo`` reports VNNI or AMX, and otherwise halves the activation range to
``[0, 127]`` on the same real interval (then the int8 model has 7-bit activations and differs
slightly from the fake-quant model).

Loading an exported int8 model needs no ltq code::

    import torch
    torch.backends.quantized.engine = "x86"
    model = torch.jit.load("model_int8.pt")     # float32 NCHW in, float32 logits out
    logits = model(images)                      # images preprocessed like the DataModule's eval transform

The file also carries ``ltq.json`` (``torch.jit.load(path, _extra_files={"ltq.json": ""})``)
with the backbone, input shape and the quantization report.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import functools
import importlib
import io
import json
import logging
import math
import os
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError, check_choice
from ltq.nn.convbn import QuantConvBn2d
from ltq.nn.layers import (
    QuantLinear,
    iter_quant_layers,
    set_observers_enabled,
    unfreeze_bn_stats,
)
from ltq.quant.fold import find_conv_bn_pairs, fold_bn, set_submodule
from ltq.quant.pack import PACK_BITS, pack_bits, size_report, unpack_bits
from ltq.quant.uniform import UniformQuantizer

log = logging.getLogger("ltq")

__all__ = [
    "deployable",
    "Int8Backend",
    "AoX86Backend",
    "BACKENDS",
    "get_backend",
    "check_int8",
    "int8_plan",
    "quiet_ao",
    "cpu_has_vnni",
    "save_packed",
    "load_packed",
    "load_packed_model",
    "weight_codes",
    "format_size_report",
    "main",
]


# =============================================================================================
# warnings


@contextlib.contextmanager
def quiet_ao():
    """Silence torch.ao's deprecation warnings (torch ≥ 2.10) and the quantized-tensor ones.

    Also lifts ``torch.use_deterministic_algorithms`` for the duration (``trainer.deterministic:
    true`` sets it): quantized CPU kernels such as ``quantized_resize_cpu_`` have no
    deterministic flag although they are deterministic on the CPU.
    """
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", message=r".*TorchScript.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.use_deterministic_algorithms(False)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)


# =============================================================================================
# deployable model


def deployable(model: nn.Module) -> nn.Module:
    """Inference copy of a (fake-)quantized model: CPU, eval, observers off, simulated BN folded.

    Every :class:`QuantConvBn2d` becomes the equivalent :class:`QuantConv2d` with weight
    ``W·γ/σ`` and bias ``β − μ·γ/σ (+ b·γ/σ)`` (its quantizers are moved along); frozen plain
    BatchNorms get their ordinary class back (identical in eval mode). ``model`` is not modified.
    """
    net = copy.deepcopy(model).cpu().eval()
    for name, m in list(net.named_modules()):
        if isinstance(m, QuantConvBn2d):
            set_submodule(net, name, m.to_folded())
    unfreeze_bn_stats(net)
    set_observers_enabled(net, False)
    return net.eval()


# =============================================================================================
# int8: which layers, which qparams


def _ch_qparams(q: UniformQuantizer, channels: int) -> tuple[Tensor, Tensor]:
    scale, zp = q.calculate_qparams()
    scale = scale.detach().float().cpu().reshape(-1)
    zp = zp.detach().cpu().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(channels).clone()
        zp = zp.expand(channels).clone()
    return scale, zp


def int8_plan(model: nn.Module) -> dict[str, dict]:
    """For every Conv2d/Linear of a :func:`deployable` model: how it is deployed in int8.

    Returns ``{layer_name: plan}`` with ``plan["kind"]``:

    * ``"int8"`` — a quantized layer with an 8-bit uniform symmetric weight quantizer and an
      8-bit uniform per-tensor input quantizer; ``plan`` holds ``w_scale`` (C,), ``w_qmin``,
      ``w_qmax``, ``a_scale``, ``a_zero_point`` (as quint8, 0..255), ``a_range`` (lo, hi);
    * ``"float"`` — a float layer, or a weight-only quantized layer (no input quantizer: it runs in
      float with its dequantized weight, whatever its weight quantizer).

    Raises :class:`ConfigError` naming the first layer that is quantized but cannot run in int8
    (bits other than 8, a non-uniform quantizer, asymmetric weights, per-channel activations,
    an activation quantizer without weight quantizer, or an uncalibrated quantizer).
    """
    plan: dict[str, dict] = {}
    quant = dict(iter_quant_layers(model))
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or not name:
            continue
        wq = getattr(m, "weight_quantizer", None)
        aq = getattr(m, "act_quantizer", None)
        if name not in quant or aq is None:
            plan[name] = {"kind": "float"}
            continue
        w_bits = getattr(wq, "bits", None) if wq is not None else None
        a_bits = getattr(aq, "bits", None)
        if w_bits != 8 or a_bits != 8:
            raise ConfigError(
                f"int8 export: layer {name!r} is quantized with w_bits={w_bits}, a_bits={a_bits}; allowed: w_bits=8 and "
                "a_bits=8 for every layer with quantized inputs (use `--format packed` for low-bit models)"
            )
        for role, q in (("weight", wq), ("activation", aq)):
            if not isinstance(q, UniformQuantizer):
                raise ConfigError(
                    f"int8 export: layer {name!r} has a {type(q).__name__} {role} quantizer; allowed: UniformQuantizer "
                    "(PTQ/QAT models); use `--format packed` for other methods"
                )
            if not bool(q.observer.initialized):
                raise ConfigError(f"int8 export: the {role} quantizer of layer {name!r} was never calibrated (run PTQ calibration or QAT first)")
        if not wq.symmetric or not wq.signed:
            raise ConfigError(f"int8 export: layer {name!r} has asymmetric weights; allowed: symmetric signed weights (x86 int8 kernels)")
        if aq.per_channel:
            raise ConfigError(f"int8 export: layer {name!r} quantizes its input per channel; allowed: per-tensor activations")
        channels = m.weight.shape[0]
        w_scale, _ = _ch_qparams(wq, channels)
        a_scale, a_zp = aq.calculate_qparams()
        a_zp_u8 = int(a_zp.item()) - aq.qmin
        if aq.qmax - aq.qmin > 255 or not 0 <= a_zp_u8 <= 255:
            raise ConfigError(f"int8 export: the input quantizer of layer {name!r} does not fit quint8; allowed: 8-bit activations")
        plan[name] = {
            "kind": "int8",
            "w_scale": w_scale,
            "w_qmin": wq.qmin,
            "w_qmax": wq.qmax,
            "a_scale": float(a_scale.item()),
            "a_zero_point": a_zp_u8,
            "a_range": (float(aq.observer.min_val.min().item()), float(aq.observer.max_val.max().item())),
        }
    if not any(p["kind"] == "int8" for p in plan.values()):
        raise ConfigError(
            "int8 export: the model has no layer with 8-bit weights and 8-bit inputs; allowed: a PTQ/QAT model with "
            "w_bits=8 and a_bits=8"
        )
    return plan


def check_int8(model: nn.Module) -> dict[str, dict]:
    """:func:`int8_plan` of :func:`deployable` ``(model)``: raises :class:`ConfigError` if ``model`` cannot run in int8."""
    return int8_plan(deployable(model))


def _float_twin(net: nn.Module, plan: dict[str, dict]) -> nn.Module:
    """Plain float copy of a deployable model: quant layers → nn.Conv2d/nn.Linear with the
    dequantized weight; remaining conv→BN pairs folded (exact in eval mode)."""
    net = copy.deepcopy(net)
    for name, layer in list(iter_quant_layers(net)):
        with torch.no_grad():
            w = layer.quantized_weight().detach().clone()
        if isinstance(layer, QuantLinear):
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        else:
            new = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
            )  # fmt: skip
        new.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        set_submodule(net, name, new.eval())
    pairs = find_conv_bn_pairs(net)
    for conv_name, bn_name in pairs:
        if plan.get(conv_name, {}).get("kind") == "int8":
            log.warning(
                "int8 export: BatchNorm %s after int8 layer %s is folded into its int8 weights, so they differ from the "
                "fake-quant ones; quantize with fold_bn=true to avoid this", bn_name, conv_name,
            )  # fmt: skip
    fold_bn(net, inplace=True, pairs=pairs)
    return net.eval()


# =============================================================================================
# int8 backends


class Int8Backend(abc.ABC):
    """Converts a calibrated 8-bit ltq model into a module running real int8 kernels.

    ``convert(model, calib=None, example_input=None)``: ``model`` is a fake-quantized ltq model
    (PTQ or QAT, 8-bit weights and activations; QuantConvBn2d are folded first); ``calib`` is an
    iterable of batches (tensors or ``(x, y)`` tuples) for the quantization points ltq does not
    simulate; ``example_input`` a float tensor (defaults to the first calibration batch).
    Returns a CPU module taking float inputs and returning float logits.
    ``save(module, path, example_input, meta)`` writes a file that loads without ltq.
    """

    name: str = "?"

    @abc.abstractmethod
    def convert(self, model: nn.Module, calib: Iterable | None = None, example_input: Tensor | None = None) -> nn.Module:
        ...

    @abc.abstractmethod
    def save(self, module: nn.Module, path: str | os.PathLike, example_input: Tensor, meta: dict | None = None) -> Path:
        ...

    @staticmethod
    def load(path: str | os.PathLike) -> nn.Module:
        """Load a saved int8 model (TorchScript)."""
        torch.backends.quantized.engine = _engine()
        with quiet_ao():
            return torch.jit.load(str(path), map_location="cpu").eval()


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else engines[-1])


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """True if the CPU accumulates u8·s8 products in int32 (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _first_tensor(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, Tensor):
                return v
    raise ConfigError(f"calibration batches must be tensors or (x, y) tuples; got {type(batch).__name__}")


def _observer_classes():
    """Preset-able torch.ao observers (defined lazily so that importing ltq.export does not import torch.ao)."""
    global _PRESET
    if _PRESET is not None:
        return _PRESET
    with quiet_ao():
        from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    class PresetActObserver(MinMaxObserver):
        """MinMaxObserver whose qparams can be fixed (``preset(scale, zero_point)``); it then stops observing."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.register_buffer("preset_scale", torch.ones(()))
            self.register_buffer("preset_zero_point", torch.zeros((), dtype=torch.int64))
            self.register_buffer("is_preset", torch.zeros((), dtype=torch.uint8))

        def preset(self, scale: float, zero_point: int) -> None:
            self.preset_scale.fill_(scale)
            self.preset_zero_point.fill_(int(zero_point))
            self.is_preset.fill_(1)

        def forward(self, x):
            if bool(self.is_preset):
                return x
            return super().forward(x)

        def calculate_qparams(self):
            if bool(self.is_preset):
                return self.preset_scale.reshape(1), self.preset_zero_point.reshape(1)
            return super().calculate_qparams()

    class PresetWeightObserver(PerChannelMinMaxObserver):
        """Per-channel weight observer returning given scales (zero point 0)."""

        def __init__(self, scale: tuple[float, ...] = (), **kwargs):
            super().__init__(**kwargs)
            self._preset_scale = tuple(float(s) for s in scale)

        def calculate_qparams(self):
            if self._preset_scale:
                scale = torch.tensor(self._preset_scale, dtype=torch.float32)
                return scale, torch.zeros(scale.shape, dtype=torch.int64)
            return super().calculate_qparams()

    _PRESET = (PresetActObserver, PresetWeightObserver)
    return _PRESET


_PRESET = None

# ops that keep the quantization parameters of their input (FX "share qparams" ops whose output
# range is inside the input's range and keeps the maximum)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout2d,
)  # fmt: skip
_PASS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}


def _pass_functions() -> set:
    import torch.nn.functional as F

    return {
        F.relu, torch.relu, torch.relu_, F.relu6, torch.flatten, F.max_pool2d, torch.max_pool2d, F.max_pool1d,
        F.dropout, torch.reshape, torch.squeeze, torch.unsqueeze,
    }  # fmt: skip


class AoX86Backend(Int8Backend):
    """torch.ao FX graph-mode int8 on the ``x86`` engine (see the module docstring).

    Args:
        reduce_range: ``"auto"`` (full 8-bit activations on VNNI/AMX CPUs, 7-bit otherwise),
            ``True`` or ``False``.
        calib_batches: at most this many batches of ``calib`` are used for the FX observers that
            ltq has no range for.
    """

    name = "ao_x86"

    def __init__(self, reduce_range: bool | str = "auto", calib_batches: int = 8):
        if reduce_range not in ("auto", True, False):
            raise ConfigError(f"reduce_range={reduce_range!r} is not supported; allowed: auto, true, false")
        self.reduce_range = reduce_range
        self.calib_batches = int(calib_batches)

    def _reduce(self) -> bool:
        return (not cpu_has_vnni()) if self.reduce_range == "auto" else bool(self.reduce_range)

    def convert(self, model: nn.Module, calib: Iterable | None = None, example_input: Tensor | None = None) -> nn.Module:
        with quiet_ao():
            return self._convert(model, calib, example_input)

    def _convert(self, model, calib, example_input):
        from torch.ao.quantization import QConfig, QConfigMapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        PresetAct, PresetWeight = _observer_classes()
        torch.backends.quantized.engine = _engine()
        reduce = self._reduce()
        net = deployable(model)
        plan = int8_plan(net)
        fnet = _float_twin(net, plan)

        calib_x: list[Tensor] = []
        if calib is not None:
            for i, batch in enumerate(calib):
                if i >= self.calib_batches:
                    break
                calib_x.append(_first_tensor(batch).detach().float().cpu())
        if example_input is None:
            if not calib_x:
                raise ConfigError("int8 conversion needs an example input or calibration batches")
            example_input = calib_x[0]
        example_input = example_input.detach().float().cpu()

        act = PresetAct.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=127 if reduce else 255)
        default_w = PresetWeight.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127)
        qmap = QConfigMapping().set_global(QConfig(activation=act, weight=default_w))
        for name, p in plan.items():
            if p["kind"] != "int8":
                qmap.set_module_name(name, None)
            else:
                w = PresetWeight.with_args(
                    scale=tuple(p["w_scale"].tolist()), dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                    quant_min=p["w_qmin"], quant_max=p["w_qmax"],
                )  # fmt: skip
                qmap.set_module_name(name, QConfig(activation=act, weight=w))
        prepared = prepare_fx(fnet, qmap, example_inputs=(example_input,))
        report = self._assign(prepared, plan, reduce)
        if report["calibrated_points"]:
            data = calib_x or [example_input]
            if not calib_x:
                log.warning(
                    "int8 conversion: %d quantization points have no ltq range and no calibration batches were given; "
                    "calibrating them on the example input only", report["calibrated_points"],
                )  # fmt: skip
            with torch.no_grad():
                for x in data:
                    prepared(x)
            report["calibration_batches"] = len(data)
        quantized = convert_fx(prepared)
        quantized.eval()
        report.update(
            backend=self.name,
            engine=torch.backends.quantized.engine,
            reduce_range=reduce,
            int8_layers=[n for n, p in plan.items() if p["kind"] == "int8"],
            float_layers=[n for n, p in plan.items() if p["kind"] != "int8"],
            input_shape=list(example_input.shape[1:]),
        )
        quantized.ltq_int8_report = report
        return quantized

    @staticmethod
    def _assign(prepared: nn.Module, plan: dict[str, dict], reduce: bool) -> dict:
        """Give every FX activation observer the qparams of the ltq input quantizers it feeds."""
        modules = dict(prepared.named_modules(remove_duplicate=False))
        PresetAct, _ = _observer_classes()
        funcs = _pass_functions()
        groups: dict[int, dict] = {}
        for node in prepared.graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), PresetAct):
                continue
            obs = modules[node.target]
            group = groups.setdefault(id(obs), {"observer": obs, "consumers": set(), "names": []})
            group["names"].append(node.target)
            stack, seen = list(node.users), set()
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                if u.op == "call_module":
                    mod = modules.get(u.target)
                    if isinstance(mod, PresetAct):
                        stack.extend(u.users)
                    elif plan.get(u.target, {}).get("kind") == "int8" and u.args and u.args[0] is not None:
                        group["consumers"].add(u.target)
                    elif isinstance(mod, _PASS_MODULES):
                        stack.extend(u.users)
                elif (u.op == "call_function" and u.target in funcs) or (u.op == "call_method" and u.target in _PASS_METHODS):
                    stack.extend(u.users)
        matched, unmatched, merged = [], [], 0
        for group in groups.values():
            cons = sorted(group["consumers"])
            if not cons:
                unmatched.append(group["names"][0])
                continue
            qps = {(plan[c]["a_scale"], plan[c]["a_zero_point"]) for c in cons}
            if len(qps) == 1:
                scale, zp = next(iter(qps))
            else:  # consumers with different ranges: quantize with the union (no clipping)
                merged += 1
                lo = min(plan[c]["a_range"][0] for c in cons)
                hi = max(plan[c]["a_range"][1] for c in cons)
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                scale = max((hi - lo) / 255.0, torch.finfo(torch.float32).eps)
                zp = int(min(max(-round(lo / scale), 0), 255))
            if reduce:  # same real interval on 128 levels
                lo = (0 - zp) * scale
                hi = (255 - zp) * scale
                scale = (hi - lo) / 127.0
                zp = int(min(max(-round(lo / scale), 0), 127))
            group["observer"].preset(scale, zp)
            matched.append(group["names"][0])
        return {
            "transferred_points": len(matched),
            "calibrated_points": len(unmatched),
            "calibrated_point_names": unmatched,
            "merged_points": merged,
        }

    def save(self, module: nn.Module, path: str | os.PathLike, example_input: Tensor, meta: dict | None = None) -> Path:
        """``torch.jit.trace`` + ``torch.jit.save``; ``meta`` (+ the conversion report) goes to ``ltq.json``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"format": "ltq-int8-torchscript", "backend": self.name, "engine": torch.backends.quantized.engine}
        report = getattr(module, "ltq_int8_report", None)
        if report:
            info["report"] = report
        info.update(meta or {})
        with quiet_ao(), torch.no_grad():
            traced = torch.jit.trace(module, example_input.detach().float().cpu(), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"ltq.json": json.dumps(info, default=str)})
        return path


BACKENDS: dict[str, type[Int8Backend]] = {"ao_x86": AoX86Backend}


def get_backend(name: str = "ao_x86", **kwargs) -> Int8Backend:
    """The int8 backend registered as ``name`` (``BACKENDS``)."""
    check_choice("int8 backend", name, BACKENDS)
    return BACKENDS[name](**kwargs)


# =============================================================================================
# packed low-bit checkpoints


def _container_bits(bits: int) -> int:
    for b in sorted(PACK_BITS):
        if bits <= b:
            return b
    return 16


def _pack(q: Tensor, bits: int, signed: bool) -> tuple[Tensor, int]:
    """Pack integer codes in the smallest container of 1/2/4/8 bits ≥ ``bits`` (16: int16, unpacked)."""
    width = _container_bits(bits)
    if width == 16:
        return q.reshape(-1).to(torch.int16 if signed else torch.int32).clone(), 16
    return pack_bits(q, width, signed=signed), width


def _unpack(packed: Tensor, width: int, numel: int, signed: bool) -> Tensor:
    if width == 16:
        return packed.to(torch.int64)
    return unpack_bits(packed, width, numel, signed=signed).to(torch.int64)


def _per_channel_codebook(w_hat: Tensor, levels: int) -> tuple[Tensor, Tensor] | None:
    """Codes + per-output-channel codebooks ``[C, K]`` if every channel has ≤ ``levels`` values."""
    rows = w_hat.reshape(w_hat.shape[0], -1)
    uniq = [torch.unique(r) for r in rows]
    k = max(u.numel() for u in uniq)
    if k > levels:
        return None
    book = torch.stack([torch.cat([u, u[-1:].expand(k - u.numel())]) for u in uniq])
    codes = torch.stack([torch.searchsorted(u, r) for u, r in zip(uniq, rows)])
    return codes.reshape(w_hat.shape), book


@torch.no_grad()
def weight_codes(layer: nn.Module) -> dict:
    """Integer codes and fp32 side information of a quantized layer's weight (see :func:`save_packed`).

    * quantizers with ``quantize_codes(w) -> (q, scale, zero_point)`` (:class:`UniformQuantizer`):
      ``{"kind": "uniform", "codes", "scale", "zero_point", "ch_axis"}`` — lossless;
    * any other quantizer exposing ``bits``: the dequantized weight ``Ŵ`` is stored as indices
      into a codebook of its distinct values when there are at most ``2^bits`` of them per layer
      (``"codebook"``) or per output channel (``"codebook_per_channel"``) — lossless too
      (ternary TTQ: 3 values in 2 bits; binary: 2 values in 1 bit);
    * otherwise ``Ŵ`` in fp32 (``"fp32"``, with a warning).
    """
    wq = layer.weight_quantizer
    bits = int(getattr(wq, "bits", 32))
    w = layer.weight.detach()
    if callable(getattr(wq, "quantize_codes", None)):
        q, scale, zp = wq.quantize_codes(w)
        signed = bool(getattr(wq, "signed", int(q.min()) < 0))
        per_channel = scale.dim() > 0 and scale.numel() > 1
        return {
            "kind": "uniform",
            "bits": bits,
            "codes": q,
            "signed": signed,
            "scale": scale.detach().float().cpu(),
            "zero_point": zp.detach().float().cpu(),
            "ch_axis": int(getattr(wq, "ch_axis", 0)) % w.dim() if per_channel else None,
        }
    w_hat = layer.quantized_weight().detach().float().cpu()
    levels = 2**bits
    uniq = torch.unique(w_hat)
    if uniq.numel() <= levels:
        return {"kind": "codebook", "bits": bits, "codes": torch.searchsorted(uniq, w_hat), "signed": False, "codebook": uniq}
    if w_hat.dim() >= 2:
        found = _per_channel_codebook(w_hat, levels)
        if found is not None:
            codes, book = found
            return {"kind": "codebook_per_channel", "bits": bits, "codes": codes, "signed": False, "codebook": book}
    log.warning(
        "save_packed: %s weight has %d distinct values, more than 2^%d; stored in fp32", type(wq).__name__, uniq.numel(), bits
    )
    return {"kind": "fp32", "bits": 32, "weight": w_hat}


def _dequantize_entry(e: dict) -> Tensor:
    shape = tuple(e["shape"])
    if e["kind"] == "fp32":
        return e["weight"].reshape(shape).float()
    numel = math.prod(shape)
    q = _unpack(e["packed"], e["container_bits"], numel, e["signed"]).reshape(shape)
    if e["kind"] == "uniform":
        scale, zp = e["scale"], e["zero_point"]
        if e["ch_axis"] is not None:
            view = [1] * len(shape)
            view[e["ch_axis"]] = -1
            scale, zp = scale.reshape(view), zp.reshape(view)
        return ((q.float() - zp) * scale).float()
    if e["kind"] == "codebook":
        return e["codebook"][q]
    book = e["codebook"]  # [C, K]
    rows = q.reshape(shape[0], -1)
    return torch.gather(book, 1, rows).reshape(shape)


def _split_module(obj) -> tuple[nn.Module, dict]:
    """``(network, meta)`` of an ltq LightningModule (``.model`` + hparams) or a bare network."""
    net = getattr(obj, "model", None)
    if isinstance(net, nn.Module) and hasattr(obj, "hparams"):
        hp = {k: v for k, v in dict(obj.hparams).items() if not k.startswith("_")}
        cls = type(obj)
        return net, {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": hp}
    return obj, {}


def save_packed(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> dict:
    """Save the :func:`deployable` form of ``model`` with low-bit weights packed; returns a report.

    ``model`` is a quantized network or an ltq LightningModule (then its class path and
    hyper-parameters are stored too, so :func:`load_packed_model` can rebuild it). For every
    quantized layer the weight is replaced by packed codes (:func:`weight_codes`; codes of
    ``b`` bits use the smallest container of 1, 2, 4 or 8 bits ≥ b, 16-bit codes int16) and its
    scales; all other tensors (biases, float layers, BN, quantizer state such as activation
    ranges) are kept as they are (fp32). The file is a ``torch.save`` dict readable with
    ``weights_only=True``.

    Returns ``{"path", "file_bytes", "fp32_file_bytes", "layers": size rows, "total": size total}``
    where rows/total come from :func:`ltq.quant.pack.size_report` (bits counted densely).
    """
    net, auto_meta = _split_module(model)
    net = deployable(net)
    state = OrderedDict((k, v.detach().cpu().clone()) for k, v in net.state_dict().items())
    layers: dict[str, dict] = {}
    for name, layer in iter_quant_layers(net):
        if layer.weight_quantizer is None:
            continue
        e = weight_codes(layer)
        e["shape"] = list(layer.weight.shape)
        if e["kind"] != "fp32":
            codes = e.pop("codes")
            e["packed"], e["container_bits"] = _pack(codes, e["bits"], e["signed"])
        layers[name] = e
        state.pop(f"{name}.weight", None)
    # caches derived from the weights (e.g. TTQ's ternary kernel) are rebuilt on load: drop them
    for mod_name, module in net.named_modules():
        for buf in getattr(module, "cache_buffers", ()):
            state.pop(f"{mod_name}.{buf}" if mod_name else buf, None)
    rows, total = size_report(net)
    info = dict(auto_meta)
    info.update(meta or {})
    obj = {"format": "ltq-packed", "version": 1, "layers": layers, "state_dict": state, "meta": _plain(info),
           "size": {"rows": rows, "total": total}}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    buf = io.BytesIO()
    torch.save({k: v for k, v in net.state_dict().items()}, buf)
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "fp32_file_bytes": buf.getbuffer().nbytes,
        "layers": rows,
        "total": total,
    }


def _plain(obj):
    """JSON-like copy (tuples → lists; unknown objects → str) so that weights_only loading works."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _read_packed(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"packed checkpoint {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != "ltq-packed":
        raise ConfigError(f"{str(path)!r} is not an ltq packed checkpoint (written by ltq.export.save_packed / `ltq export --format packed`)")
    return obj


def load_packed(path: str | os.PathLike) -> "OrderedDict[str, Tensor]":
    """The state_dict saved by :func:`save_packed` with every packed weight dequantized.

    It fits the :func:`deployable` form of the same quantized network (QuantConvBn2d folded);
    the dequantized weights equal the fake-quantized weights ``layer.quantized_weight()``, so the
    quantizers map them onto themselves.
    """
    obj = _read_packed(path)
    state = OrderedDict(obj["state_dict"])
    for name, e in obj["layers"].items():
        state[f"{name}.weight"] = _dequantize_entry(e)
    return state


def _import(class_path: str):
    if "." not in class_path:
        from ltq.methods import METHODS

        for cls in METHODS.values():
            if cls.__name__ == class_path:
                return cls
        import ltq.data as D

        if hasattr(D, class_path):
            return getattr(D, class_path)
        raise ConfigError(f"class {class_path!r} is unknown; give the full class path (e.g. ltq.methods.PTQ)")
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"class_path {class_path!r} cannot be imported: {exc}") from None


def _instantiate_method(class_path: str, init_args: dict):
    cls = _import(class_path)
    args = {k: v for k, v in init_args.items() if not k.startswith("_")}
    args["fp_checkpoint"] = None  # the weights come from the checkpoint itself
    level = log.level
    log.setLevel(logging.ERROR)  # e.g. QAT warns about a missing fp_checkpoint: irrelevant here
    try:
        return cls(**args)
    except TypeError as exc:
        raise ConfigError(f"cannot rebuild {class_path} from the checkpoint's hyper-parameters: {exc}") from None
    finally:
        log.setLevel(level)


def load_packed_model(path: str | os.PathLike) -> nn.Module:
    """Rebuild the deployable quantized network from a packed file written from an ltq LightningModule."""
    obj = _read_packed(path)
    meta = obj.get("meta") or {}
    if "class_path" not in meta:
        raise ConfigError(f"{str(path)!r} has no class_path in its meta data; load it with load_packed() into your own model")
    method = _instantiate_method(meta["class_path"], meta.get("init_args", {}))
    net = deployable(method.model)
    net.load_state_dict(load_packed(path))
    set_observers_enabled(net, False)
    return net.eval()


def format_size_report(rows: list[dict], total: dict) -> str:
    """Table of :func:`ltq.quant.pack.size_report` rows."""
    lines = [f"{'layer':40s} {'params':>10s} {'bits':>6s} {'bytes':>10s} {'fp32 bytes':>11s} {'ratio':>6s}"]
    for r in rows + [total]:
        bits = f"{r['bits']:.2f}" if isinstance(r["bits"], float) else str(r["bits"])
        lines.append(f"{r['layer'][:40]:40s} {r['params']:>10d} {bits:>6s} {r['bytes']:>10d} {r['fp32_bytes']:>11d} {r['ratio']:>6.2f}")
    return "\n".join(lines)


# =============================================================================================
# `ltq export`


def _load_checkpoint(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ckpt_path {path!r} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--ckpt_path {path!r} cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _config_section(config: str | None, key: str) -> dict:
    if not config:
        return {}
    import yaml

    p = Path(config)
    if not p.is_file():
        raise ConfigError(f"--config {config!r} does not exist")
    cfg = yaml.safe_load(p.read_text()) or {}
    sec = cfg.get(key) or {}
    if isinstance(sec, str):
        sec = {"class_path": sec}
    return dict(sec)


def main(argv: list[str] | None = None) -> int:
    """``ltq export --ckpt_path CKPT --format int8|packed --out FILE [--config YAML]``."""
    parser = argparse.ArgumentParser(
        prog="ltq export",
        description="Export a trained/calibrated ltq checkpoint: real int8 TorchScript (x86) or a packed low-bit file.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of an ltq method (PTQ/QAT/TTQ/...)")
    parser.add_argument("--format", default="packed", choices=["int8", "packed"], help="int8: TorchScript with int8 kernels; packed: low-bit codes")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--config", default=None, help="YAML of the run (model/data sections); default: what the checkpoint recorded")
    parser.add_argument("--backend", default="ao_x86", help="int8 backend (ao_x86)")
    parser.add_argument("--calib_batches", type=int, default=8, help="calibration batches for int8 points ltq does not simulate")
    parser.add_argument("--data_root", default=None, help="override data.root (int8 calibration data)")
    args = parser.parse_args(argv)

    ckpt = _load_checkpoint(args.ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"--ckpt_path {args.ckpt_path!r} is not a Lightning checkpoint (no state_dict)")
    hp = dict(ckpt.get("hyper_parameters") or {})
    model_sec = _config_section(args.config, "model")
    class_path = model_sec.get("class_path") or hp.get("_class_path")
    if not class_path:
        raise ConfigError("the checkpoint does not record its method class (hyper_parameters._class_path); pass --config with a model section")
    init_args = {**dict(model_sec.get("init_args") or {}), **{k: v for k, v in hp.items() if not k.startswith("_")}}
    method = _instantiate_method(class_path, init_args)
    try:
        method.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {args.ckpt_path!r} does not fit {class_path}: {str(exc).splitlines()[0]}") from None
    out = Path(args.out)
    meta = {"class_path": class_path, "init_args": _plain(init_args), "source_checkpoint": str(args.ckpt_path)}

    if args.format == "packed":
        rep = save_packed(method, out, meta=meta)
        print(format_size_report(rep["layers"], rep["total"]))
        print(
            f"wrote {out} ({rep['file_bytes']} bytes on disk; fp32 state_dict {rep['fp32_file_bytes']} bytes, "
            f"x{rep['fp32_file_bytes'] / max(rep['file_bytes'], 1):.2f})"
        )
        return 0

    # int8: calibration data for the points ltq does not simulate, and an example input
    data_sec = _config_section(args.config, "data")
    dm_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    data_path = data_sec.get("class_path") or dm_hp.get("_class_path")
    backend = get_backend(args.backend, calib_batches=args.calib_batches)
    calib = None
    if data_path:
        dm_args = {**{k: v for k, v in dm_hp.items() if not k.startswith("_")}, **dict(data_sec.get("init_args") or {})}
        if args.data_root:
            dm_args["root"] = args.data_root
        dm = _import(data_path)(**dm_args)
        calib = dm.calibration_dataloader(args.calib_batches, None)
    if calib is None:
        raise ConfigError("int8 export needs calibration data: pass --config with a data section (or a checkpoint that recorded its DataModule)")
    batches = []
    for i, b in enumerate(calib):
        if i >= args.calib_batches:
            break
        batches.append(_first_tensor(b))
    if not batches:
        raise ConfigError("int8 export: the calibration loader yielded no batch")
    qmodel = backend.convert(method.model, calib=batches, example_input=batches[0][:1])
    # agreement with the fake-quant model on the first calibration batch
    ref = deployable(method.model)
    with torch.no_grad(), quiet_ao():
        a, b = ref(batches[0]), qmodel(batches[0])
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    backend.save(qmodel, out, batches[0][:1], meta={"class_path": class_path, "backbone": init_args.get("backbone")})
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    rep = qmodel.ltq_int8_report
    print(
        f"int8 ({backend.name}, engine {rep['engine']}, reduce_range={rep['reduce_range']}): "
        f"{len(rep['int8_layers'])} int8 layers, {len(rep['float_layers'])} float layers; "
        f"{rep['transferred_points']} activation ranges transferred from ltq, {rep['calibrated_points']} calibrated"
    )
    print(f"fake-quant vs int8 on {batches[0].shape[0]} images: argmax agreement {agree:.4f}, max |logit diff| {(a - b).abs().max().item():.4g}")
    print(f"wrote {out} ({out.stat().st_size} bytes; fp32 state_dict {buf.getbuffer().nbytes} bytes). Load with torch.jit.load({str(out)!r})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
