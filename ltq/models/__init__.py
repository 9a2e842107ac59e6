"""Backbone zoo: plain ``nn.Module`` classifiers (no quantization) and their registry.

Use :func:`build_backbone` (``name, num_classes, in_channels=3, **kwargs``) and
:func:`available_backbones`. Importing this package registers every built-in backbone:

* CIFAR ResNets (16-32-64 channels): ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110`` — option ``shortcut="conv" | "pad"``;
* torchvision ResNets: ``resnet18``, ``resnet34``, ``resnet50`` — option ``small_input``;
* ``densenet121`` (Tiny-ImageNet stem, option ``dropout``), ``densenet_small``, ``squeezenet``;
* ``mobilenet_v2`` — options ``small_input``, ``width_mult``;
* TFLite-style ``cnn`` / ``cnn_bn`` — option ``input_size`` (28 or 32).
"""

from ltq.models.registry import (
    available_backbones,
    backbone_options,
    build_backbone,
    num_parameters,
    register_backbone,
)
from ltq.models import cifar_resnet, densenet_small, imagenet_style, small_cnn, squeezenet  # noqa: E402,F401

__all__ = [
    "available_backbones",
    "backbone_options",
    "build_backbone",
    "num_parameters",
    "register_backbone",
]
