"""Quantized layers and model surgery (no Lightning imports)."""

from ltq.nn.convbn import QuantConvBn2d
from ltq.nn.layers import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenSyncBatchNorm,
    QuantConv2d,
    QuantLinear,
    freeze_bn_stats,
    is_bn_frozen,
    iter_quant_layers,
    iter_quantizers,
    quant_layer_types,
    set_fake_quant_enabled,
    set_observers_enabled,
    unfreeze_bn_stats,
)
from ltq.nn.quantize import (
    FOLD_MODES,
    OVERRIDE_KEYS,
    QuantPolicy,
    UniformQuantizerFactory,
    describe_quantization,
    quantize_model,
    uniform_policy,
)

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "QuantConvBn2d",
    "quant_layer_types",
    "iter_quant_layers",
    "iter_quantizers",
    "set_observers_enabled",
    "set_fake_quant_enabled",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "is_bn_frozen",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenSyncBatchNorm",
    "QuantPolicy",
    "quantize_model",
    "describe_quantization",
    "UniformQuantizerFactory",
    "uniform_policy",
    "OVERRIDE_KEYS",
    "FOLD_MODES",
]
