"""Pure-PyTorch quantization core of ltq (no Lightning imports).

Quantizer contract: an ``nn.Module`` with ``forward(x) -> x_hat`` (same shape/dtype/device, never
in place), ``stats() -> dict[str, Tensor]`` (0-dim tensors) and an int attribute ``bits`` (storage
width of one code; optional ``num_scales`` for size accounting). All state lives in parameters
or buffers.
"""

from ltq.quant.fold import find_conv_bn_pairs, fold_bn, fold_conv_bn
from ltq.quant.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    ObserverBase,
    PercentileObserver,
    make_observer,
)
from ltq.quant.pack import pack_bits, size_report, unpack_bits
from ltq.quant.ste import ceil_ste, floor_ste, grad_scale, round_ste, sign_ste, ste
from ltq.quant.apot import APoTQuantizer, apot_quantize, build_levels
from ltq.quant.binary import BWNWeightQuantizer, DoReFaWeightQuantizer
from ltq.quant.ttq import TTQQuantizer, ttq_quantize
from ltq.quant.uniform import UniformQuantizer, check_bits, fake_quantize, qparams, quant_range, quantize_dequantize

__all__ = [
    "APoTQuantizer",
    "apot_quantize",
    "build_levels",
    "BWNWeightQuantizer",
    "DoReFaWeightQuantizer",
    "TTQQuantizer",
    "ttq_quantize",
    "ste",
    "round_ste",
    "floor_ste",
    "ceil_ste",
    "sign_ste",
    "grad_scale",
    "check_bits",
    "quant_range",
    "qparams",
    "quantize_dequantize",
    "fake_quantize",
    "UniformQuantizer",
    "ObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
    "fold_conv_bn",
    "find_conv_bn_pairs",
    "fold_bn",
    "pack_bits",
    "unpack_bits",
    "size_report",
]
