"""Small DenseNet-BC for Tiny ImageNet (the TTQ "small DenseNet", 440,264 params at 200 classes).

Architecture (Huang et al., 2017, DenseNet-BC design pattern as in torchvision):

* stem: conv0 3×3 stride 1 ``in_channels -> 48``, BN, ReLU, max-pool 3×3 stride 2 (padding 1);
* three dense blocks with (8, 12, 10) layers and growth rate k = 12. A dense layer maps its
  ``c`` input channels through ``BN-ReLU-conv1×1 (c -> 4k) -> BN-ReLU-conv3×3 (4k -> k)``
  (bottleneck size 4), applies Dropout(0.25) and concatenates: ``x <- cat(x, H(x))``, so a block
  with ``L`` layers adds ``L·k`` channels;
* between blocks a transition ``BN-ReLU-conv1×1 (c -> c/2)-AvgPool 2×2`` (compression 0.5);
* channel plan: 48 -> 144 -> 72 -> 216 -> 108 -> 228, then a final BN, ReLU, global average pool,
  Dropout(0.25) and ``Linear(228, num_classes)``.

All convs are bias-free and use He-uniform init (``kaiming_uniform_``, gain sqrt(2), fan-in).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from ltq.models.registry import register_backbone

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNetSmall", "densenet_small"]


class DenseLayer(nn.Module):
    """Bottleneck dense layer: ``cat(x, Dropout(conv3×3(relu(bn(conv1×1(relu(bn(x))))))))``."""

    def __init__(self, in_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        inter = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, inter, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu1 is in-place but norm1 returns a fresh tensor, so x itself is never modified.
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        return torch.cat([x, self.dropout(out)], 1)


class DenseBlock(nn.Sequential):
    """``num_layers`` dense layers; the l-th one sees ``in_features + l·growth_rate`` channels."""

    def __init__(self, num_layers: int, in_features: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}", DenseLayer(in_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            )


class Transition(nn.Sequential):
    """``BN-ReLU-conv1×1 (c_in -> c_out) - AvgPool 2×2``: halves resolution and compresses channels."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_features),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv2d(in_features, out_features, 1, bias=False),
                pool=nn.AvgPool2d(2, stride=2),
            )
        )


class DenseNetSmall(nn.Module):
    """DenseNet-BC with a small-image stem (see module docstring for the layout)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        growth_rate: int = 12,
        block_config: Sequence[int] = (8, 12, 10),
        num_init_features: int = 48,
        bn_size: int = 4,
        drop_rate: float = 0.25,
        final_drop_rate: float = 0.25,
        compression: float = 0.5,
    ):
        super().__init__()
        feats = OrderedDict(
            conv0=nn.Conv2d(in_channels, num_init_features, 3, stride=1, padding=1, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        c = num_init_features
        for i, n_layers in enumerate(block_config):
            feats[f"denseblock{i + 1}"] = DenseBlock(n_layers, c, growth_rate, bn_size, drop_rate)
            c += n_layers * growth_rate
            if i != len(block_config) - 1:
                c_out = int(c * compression)
                feats[f"transition{i + 1}"] = Transition(c, c_out)
                c = c_out
        feats[f"norm{len(block_config) + 1}"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(feats)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(final_drop_rate)
        self.classifier = nn.Linear(c, num_classes)
        self.num_features = c

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        x = self.dropout(self.flatten(self.avgpool(x)))
        return self.classifier(x)


@register_backbone("densenet_small")
def densenet_small(
    num_classes: int,
    in_channels: int = 3,
    growth_rate: int = 12,
    block_config: Sequence[int] = (8, 12, 10),
    num_init_features: int = 48,
    bn_size: int = 4,
    drop_rate: float = 0.25,
    final_drop_rate: float = 0.25,
) -> nn.Module:
    """Small DenseNet-BC (growth 12, blocks 8-12-10, 48 stem features, bottleneck 4, dropout 0.25)."""
    return DenseNetSmall(
        num_classes,
        in_channels,
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=num_init_features,
        bn_size=bn_size,
        drop_rate=drop_rate,
        final_drop_rate=final_drop_rate,
    )
