"""Small TFLite-style CNNs (the FashionMNIST / CIFAR-10 nets of the TFLite-quantization demo).

The layout is chosen by ``input_size`` (default 28 when ``in_channels == 1``, else 32):

* 28×28 (``cnn`` with 1 channel: 24,850 params for 10 classes)::

    conv 3×3 (in -> 40) -> [BN] -> ReLU -> maxpool 2    28 -> 26 -> 13
    conv 3×3 (40 -> 40) -> [BN] -> ReLU -> maxpool 2    13 -> 11 -> 5
    flatten (40·5·5 = 1000) -> Linear(1000, num_classes)

* 32×32::

    conv 5×5 (in -> 16) -> [BN] -> ReLU -> maxpool 2    32 -> 28 -> 14
    conv 5×5 (16 -> 32) -> [BN] -> ReLU -> maxpool 2    14 -> 10 -> 5
    flatten (32·5·5 = 800) -> Linear(800, 120) -> ReLU -> Linear(120, 84) -> ReLU
    -> Linear(84, num_classes)

``cnn_bn`` inserts BatchNorm after each conv (before the ReLU). Convs have bias (as the
original), valid padding, PyTorch default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ltq.models.registry import check_option, register_backbone

__all__ = ["SmallCNN", "cnn", "cnn_bn"]

INPUT_SIZES = (28, 32)


class SmallCNN(nn.Module):
    """Two conv stages + MLP head; see the module docstring for the two layouts."""

    def __init__(self, num_classes: int, in_channels: int = 3, input_size: int | None = None, bn: bool = False):
        super().__init__()
        if input_size is None:
            input_size = 28 if in_channels == 1 else 32
        check_option("cnn_bn" if bn else "cnn", "input_size", input_size, INPUT_SIZES)
        self.input_size = input_size
        if input_size == 28:
            c1, c2, k, hidden = 40, 40, 3, ()
        else:
            c1, c2, k, hidden = 16, 32, 5, (120, 84)
        side = ((input_size - k + 1) // 2 - k + 1) // 2
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c1, k)]
        if bn:
            layers.append(nn.BatchNorm2d(c1))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Conv2d(c1, c2, k)]
        if bn:
            layers.append(nn.BatchNorm2d(c2))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        head: list[nn.Module] = []
        width = c2 * side * side
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_backbone("cnn")
def cnn(num_classes: int, in_channels: int = 3, input_size: int | None = None) -> nn.Module:
    """TFLite-style small CNN; ``input_size`` 28 (2×conv3×3-40, FC 1000) or 32 (LeNet-like 5×5 convs)."""
    return SmallCNN(num_classes, in_channels, input_size=input_size, bn=False)


@register_backbone("cnn_bn")
def cnn_bn(num_classes: int, in_channels: int = 3, input_size: int | None = None) -> nn.Module:
    """:func:`cnn` with BatchNorm after each conv (before the ReLU)."""
    return SmallCNN(num_classes, in_channels, input_size=input_size, bn=True)
