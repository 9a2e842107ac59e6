"""CIFAR ResNets (He et al., 2016, "Deep Residual Learning", section 4.2).

Depth ``6n + 2`` with ``n`` BasicBlocks per stage:

* stem: 3×3 conv ``in_channels -> 16`` (stride 1) + BN + ReLU;
* three stages of ``n`` BasicBlocks with 16, 32 and 64 channels; the first block of stages
  2 and 3 halves the resolution (stride 2), so a 32×32 image gives 32, 16 and 8 pixel maps;
* global average pooling and a Linear ``64 -> num_classes``.

A BasicBlock computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3 convs.
Where the shape changes (stride 2, channels doubled) the shortcut is either

* ``"conv"`` (option B, the default, used by the APoT and MetaQuant code): a 1×1 stride-2 conv
  + BN, adding ``c_in·c_out + 2·c_out`` parameters per projection; or
* ``"pad"`` (option A of the paper): take every second pixel and zero-pad the channels from
  ``c_in`` to ``c_out`` (half the new channels on each side); no parameters.

Parameter count of ResNet-20 for 10 classes: 269,722 with ``"pad"`` and
269,722 + (16·32 + 64) + (32·64 + 128) = 272,474 with ``"conv"``.

Depths: 20 (n=3), 32 (n=5), 44 (n=7), 56 (n=9), 110 (n=18).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltq.models.registry import check_option, register_backbone

__all__ = ["BasicBlock", "PadShortcut", "CifarResNet"]

SHORTCUTS = ("conv", "pad")


class PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: spatial subsampling and zero channel padding.

    ``y = pad_c(x[:, :, ::s, ::s])`` where ``pad_c`` appends ``(c_out - c_in) // 2`` zero channels
    before and the rest after the input channels.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection: ``relu(F(x) + shortcut(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "conv":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                self.downsample = PadShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 images with 16-32-64 channels (see module docstring)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, shortcut: str = "conv"):
        super().__init__()
        check_option(f"resnet{depth}", "shortcut", shortcut, SHORTCUTS)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut = shortcut
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He (Kaiming) normal init, std = sqrt(2 / fan_out), for every conv; BN gamma=1, beta=0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _make(depth: int):
    def constructor(num_classes: int, in_channels: int = 3, shortcut: str = "conv") -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, shortcut=shortcut)

    constructor.__name__ = f"resnet{depth}"
    constructor.__doc__ = (
        f"CIFAR ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage, 16-32-64 channels). "
        f"shortcut: 'conv' (1×1 conv + BN projection) or 'pad' (parameter-free option A)."
    )
    return register_backbone(f"resnet{depth}")(constructor)


resnet20 = _make(20)
resnet32 = _make(32)
resnet44 = _make(44)
resnet56 = _make(56)
resnet110 = _make(110)
