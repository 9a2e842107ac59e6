"""torchvision ImageNet architectures adapted to small images (built with ``weights=None``).

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision ResNets. The stem is a 7×7 stride-2
  conv followed by a 3×3 stride-2 max-pool, i.e. a 4× reduction before ``layer1``; with
  ``small_input=True`` it becomes a 3×3 stride-1 conv without max-pool (the usual CIFAR /
  Tiny-ImageNet adaptation, 32×32 -> 4×4 maps before the global pool instead of 1×1).
* ``densenet121``: the Tiny-ImageNet DenseNet-121 of the TTQ experiments. conv0 is 3×3 stride 1
  (instead of 7×7 stride 2), the first max-pool is removed, and the classifier is
  ``Dropout(0.25) -> Linear(1024, num_classes)`` with weights ~ N(0, 0.01²) and zero bias.
  Parameters: 7,978,856 (torchvision, 1000 classes) − 64·3·(49 − 9) (smaller conv0)
  − 1025·(1000 − 200) (smaller FC) = 7,151,176 for 200 classes.
* ``mobilenet_v2``: torchvision MobileNetV2; ``small_input=True`` sets the stride of the first
  conv to 1 for 32×32 inputs (32 -> 2×2 maps before the pool instead of 1×1).

``in_channels`` replaces the stem conv with one taking that many input channels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision import models as tvm

from ltq.models.registry import register_backbone

__all__ = ["resnet18", "resnet34", "resnet50", "densenet121", "mobilenet_v2", "DenseNet121Small"]


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _tv_resnet(arch: str, num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if small_input:
        # Assigning to an existing attribute keeps its position in module order.
        model.conv1 = _kaiming_conv(nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _kaiming_conv(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False))
    return model


@register_backbone("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """torchvision ResNet-18 (11.7M params at 1000 classes); ``small_input``: 3×3 s1 stem, no max-pool."""
    return _tv_resnet("resnet18", num_classes, in_channels, small_input)


@register_backbone("resnet34")
def resnet34(num_classes: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """torchvision ResNet-34; ``small_input``: 3×3 s1 stem, no max-pool."""
    return _tv_resnet("resnet34", num_classes, in_channels, small_input)


@register_backbone("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """torchvision ResNet-50 (Bottleneck blocks); ``small_input``: 3×3 s1 stem, no max-pool."""
    return _tv_resnet("resnet50", num_classes, in_channels, small_input)


class DenseNet121Small(nn.Module):
    """DenseNet-121 for 56-64 px images (see module docstring).

    Forward: ``features -> ReLU -> global average pool -> Dropout -> Linear``. ``features`` is
    torchvision's DenseNet-121 feature extractor (conv0 replaced, pool0 removed, ends with norm5).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.25):
        super().__init__()
        tv = tvm.densenet121(weights=None)
        feats = nn.Sequential()
        for name, module in tv.features.named_children():
            if name == "conv0":
                module = _kaiming_conv(nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False))
            elif name == "pool0":
                continue
            feats.add_module(name, module)
        self.features = feats
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(tv.classifier.in_features, num_classes)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        x = self.dropout(self.flatten(self.avgpool(x)))
        return self.classifier(x)


@register_backbone("densenet121")
def densenet121(num_classes: int, in_channels: int = 3, dropout: float = 0.25) -> nn.Module:
    """DenseNet-121 adapted to Tiny ImageNet (3×3 s1 conv0, no pool0, dropout before the FC)."""
    return DenseNet121Small(num_classes, in_channels, dropout=dropout)


@register_backbone("mobilenet_v2")
def mobilenet_v2(
    num_classes: int, in_channels: int = 3, small_input: bool = False, width_mult: float = 1.0
) -> nn.Module:
    """torchvision MobileNetV2; ``small_input``: first conv stride 1; ``width_mult`` scales channels."""
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    stem = model.features[0][0]
    if small_input or in_channels != 3:
        model.features[0][0] = _kaiming_conv(
            nn.Conv2d(
                in_channels,
                stem.out_channels,
                3,
                stride=1 if small_input else 2,
                padding=1,
                bias=False,
            )
        )
    return model
