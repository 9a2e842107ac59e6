"""SqueezeNet with BatchNorm and identity skips for Tiny ImageNet (TTQ experiments, 827,784 params
at 200 classes).

Layout (SqueezeNet 1.1 channel plan, Iandola et al. 2016, with "simple bypass" skips):

* stem: conv0 3×3 stride 1 ``in_channels -> 64`` (no bias), BN, ReLU, max-pool 3×3/2 (ceil mode);
* Fire modules ``Fire(c_in, s, e1, e3)``: a squeeze 1×1 conv ``c_in -> s`` followed by two expand
  convs (1×1 ``s -> e1`` and 3×3 ``s -> e3``) whose outputs are concatenated to ``e1 + e3``
  channels. Every conv is pre-activated: BN-ReLU-conv, with its own BN in front of the
  squeeze, the expand1x1 and the expand3x3 (so the two expands use separate BN statistics of the
  same squeeze output). All Fire convs are bias-free;
* ``Fire(64,16,64,64)  Fire(128,16,64,64)+skip  MaxPool
  Fire(128,32,128,128) Fire(256,32,128,128)+skip  MaxPool
  Fire(256,48,192,192) Fire(384,48,192,192)+skip
  Fire(384,64,256,256) Fire(512,64,256,256)+skip`` — the 2nd, 4th, 6th and 8th Fire add their
  input (``out + x``, shapes match because ``c_in = e1 + e3`` there);
* classifier: Dropout(0.6), conv 1×1 ``512 -> num_classes`` (with bias, weights N(0, 0.01²)),
  ReLU, global average pool, flatten.

Spatial sizes: 64 -> 32 -> 16 -> 8 for 64×64 inputs (56 -> 28 -> 14 -> 7 for 56×56 crops).
Other convs use He-uniform init (``kaiming_uniform_``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ltq.models.registry import register_backbone

__all__ = ["Fire", "SqueezeNetBN", "squeezenet"]


class Fire(nn.Module):
    """Pre-activation Fire module, optionally with an identity skip: ``cat(e1(s), e3(s)) [+ x]``."""

    def __init__(self, in_planes: int, squeeze: int, expand1x1: int, expand3x3: int, residual: bool = False):
        super().__init__()
        if residual and in_planes != expand1x1 + expand3x3:
            raise ValueError("a residual Fire needs in_planes == expand1x1 + expand3x3")
        self.residual = residual
        self.squeeze_bn = nn.BatchNorm2d(in_planes)
        self.squeeze_relu = nn.ReLU(inplace=True)
        self.squeeze = nn.Conv2d(in_planes, squeeze, 1, bias=False)
        self.expand1x1_bn = nn.BatchNorm2d(squeeze)
        self.expand1x1_relu = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1, bias=False)
        self.expand3x3_bn = nn.BatchNorm2d(squeeze)
        self.expand3x3_relu = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(self.squeeze_relu(self.squeeze_bn(x)))
        out = torch.cat(
            [
                self.expand1x1(self.expand1x1_relu(self.expand1x1_bn(s))),
                self.expand3x3(self.expand3x3_relu(self.expand3x3_bn(s))),
            ],
            1,
        )
        if self.residual:
            out = out + x
        return out

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class SqueezeNetBN(nn.Module):
    """SqueezeNet 1.1 plan with BN, pre-activation Fire modules and skips (see module docstring)."""

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.6):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64, residual=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128, residual=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192, residual=True),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256, residual=True),
        )
        final_conv = nn.Conv2d(512, num_classes, 1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            final_conv,
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_backbone("squeezenet")
def squeezenet(num_classes: int, in_channels: int = 3, dropout: float = 0.6) -> nn.Module:
    """SqueezeNet-1.1-style net with BN, pre-activation Fires and skips; classifier is a 1×1 conv."""
    return SqueezeNetBN(num_classes, in_channels, dropout=dropout)
