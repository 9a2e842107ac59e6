"""Tests for the backbone zoo (ltq.models): registry, parameter counts, shapes, layer order."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ltq.errors import ConfigError
from ltq.models import available_backbones, backbone_options, build_backbone, num_parameters

ALL = [
    "cnn", "cnn_bn", "densenet121", "densenet_small", "mobilenet_v2",
    "resnet110", "resnet18", "resnet20", "resnet32", "resnet34", "resnet44",
    "resnet50", "resnet56", "squeezenet",
]  # fmt: skip

# name -> (build kwargs, input shape (N, C, H, W)); num_classes is always 7 in the forward test
FORWARD_CASES = {
    "resnet20": ({}, (2, 3, 32, 32)),
    "resnet32": ({"shortcut": "pad"}, (2, 3, 32, 32)),
    "resnet44": ({}, (1, 3, 32, 32)),
    "resnet56": ({}, (1, 3, 32, 32)),
    "resnet110": ({}, (1, 3, 32, 32)),
    "resnet18": ({"small_input": True}, (2, 3, 32, 32)),
    "resnet34": ({}, (1, 3, 64, 64)),
    "resnet50": ({}, (1, 3, 64, 64)),
    "densenet121": ({}, (1, 3, 64, 64)),
    "densenet_small": ({}, (2, 3, 64, 64)),
    "squeezenet": ({}, (2, 3, 64, 64)),
    "mobilenet_v2": ({"small_input": True}, (2, 3, 32, 32)),
    "cnn": ({"in_channels": 1}, (2, 1, 28, 28)),
    "cnn_bn": ({}, (2, 3, 32, 32)),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_names():
    assert available_backbones() == sorted(ALL)
    assert set(FORWARD_CASES) == set(ALL)


@pytest.mark.parametrize(
    "name, num_classes, kwargs, expected",
    [
        # 16·3·9 stem + 3 stages of BasicBlocks + BN + FC(64->10) + two 1×1 conv/BN projections
        ("resnet20", 10, {}, 272_474),
        ("resnet20", 10, {"shortcut": "pad"}, 269_722),
        ("densenet121", 200, {}, 7_151_176),
        ("densenet_small", 200, {}, 440_264),
        ("squeezenet", 200, {}, 827_784),
        ("cnn", 10, {"in_channels": 1}, 24_850),  # 400 + 14,440 + 10,010
        ("cnn_bn", 10, {"in_channels": 1}, 25_010),  # + 2 BN × 80
        ("cnn", 10, {}, 121_182),  # 1,216 + 12,832 + 96,120 + 10,164 + 850
    ],
)
def test_parameter_counts(name, num_classes, kwargs, expected):
    model = build_backbone(name, num_classes, **kwargs)
    assert num_parameters(model) == expected


def test_resnet20_is_027m_and_pad_is_smaller():
    conv = num_parameters(build_backbone("resnet20", 10))
    pad = num_parameters(build_backbone("resnet20", 10, shortcut="pad"))
    assert 0.265e6 < conv < 0.275e6
    assert pad < conv
    assert conv - pad == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # depth ordering of the family
    counts = [num_parameters(build_backbone(f"resnet{d}", 10, shortcut="pad")) for d in (20, 32, 44, 56, 110)]
    assert counts == sorted(counts)
    assert abs(counts[3] - 0.85e6) < 0.01e6  # ResNet-56 ~0.85M (He et al.)


def _conv_linear_call_order(model: nn.Module, x: torch.Tensor) -> tuple[list[nn.Module], torch.Tensor]:
    called: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: called.append(mod))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return called, out


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_first_last_module_order(name):
    kwargs, shape = FORWARD_CASES[name]
    in_ch = shape[1]
    if "in_channels" not in kwargs:
        kwargs = {**kwargs, "in_channels": in_ch}
    model = build_backbone(name, 7, **kwargs).eval()
    x = torch.randn(*shape)
    x_copy = x.clone()
    with torch.no_grad():
        called, out = _conv_linear_call_order(model, x)
    assert out.shape == (shape[0], 7)
    assert torch.isfinite(out).all()
    assert torch.equal(x, x_copy), "forward must not modify its input"

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    # the first Conv2d in module order is the stem: the first layer applied to the image
    assert called[0] is first_conv
    assert first_conv.in_channels == in_ch
    # the last Conv2d/Linear in module order is the classifier: the last layer applied
    assert called[-1] is layers[-1]
    last = layers[-1]
    if name == "squeezenet":
        assert isinstance(last, nn.Conv2d) and last.out_channels == 7
    else:
        assert isinstance(last, nn.Linear) and last.out_features == 7


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("resnet20", {"in_channels": 1}, (2, 1, 32, 32)),
        ("resnet18", {"in_channels": 1}, (2, 1, 64, 64)),
        ("mobilenet_v2", {"in_channels": 4}, (2, 4, 64, 64)),
        ("squeezenet", {"in_channels": 1}, (2, 1, 56, 56)),
        ("densenet_small", {}, (2, 3, 56, 56)),
        ("cnn_bn", {"in_channels": 1}, (2, 1, 28, 28)),
        ("cnn", {"in_channels": 1, "input_size": 32}, (2, 1, 32, 32)),
        ("cnn", {"in_channels": 3, "input_size": 28}, (2, 3, 28, 28)),
    ],
)
def test_in_channels_and_sizes(name, kwargs, shape):
    model = build_backbone(name, 5, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(*shape)).shape == (shape[0], 5)


@pytest.mark.parametrize("name", ["resnet20", "squeezenet", "densenet_small", "cnn_bn"])
def test_backward_train_mode(name):
    # catches in-place ops that break autograd (inplace ReLU after a residual add / concat)
    size = 32 if name in ("resnet20", "cnn_bn") else 64
    model = build_backbone(name, 4).train()
    x = torch.randn(2, 3, size, size, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_small_input_changes_stem():
    big = build_backbone("resnet18", 10)
    small = build_backbone("resnet18", 10, small_input=True)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    mb = build_backbone("mobilenet_v2", 10, small_input=True)
    assert mb.features[0][0].stride == (1, 1)
    assert build_backbone("mobilenet_v2", 10).features[0][0].stride == (2, 2)


def test_classifier_init_tinyimagenet():
    d = build_backbone("densenet121", 200)
    assert d.classifier.in_features == 1024
    assert abs(d.classifier.weight.std().item() - 0.01) < 0.001
    assert d.features.conv0.kernel_size == (3, 3) and "pool0" not in dict(d.features.named_children())
    s = build_backbone("squeezenet", 200)
    final = [m for m in s.modules() if isinstance(m, nn.Conv2d)][-1]
    assert abs(final.weight.std().item() - 0.01) < 0.002
    fires = [m for m in s.modules() if type(m).__name__ == "Fire"]
    assert [f.residual for f in fires] == [False, True] * 4


def test_unknown_backbone_error():
    with pytest.raises(ConfigError) as e:
        build_backbone("resnet21", 10)
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.backbone" in msg and "'resnet21'" in msg
    for name in ALL:
        assert name in msg


def test_unknown_kwarg_error():
    with pytest.raises(ConfigError) as e:
        build_backbone("resnet20", 10, shortcutt="pad")
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.backbone" in msg and "shortcutt" in msg and "accepted: shortcut" in msg
    with pytest.raises(ConfigError, match="small_input"):
        build_backbone("resnet18", 10, shortcut="pad")


def test_bad_option_values():
    with pytest.raises(ConfigError, match="shortcut='proj'.*allowed: conv, pad"):
        build_backbone("resnet20", 10, shortcut="proj")
    with pytest.raises(ConfigError, match="input_size=30.*allowed: 28, 32"):
        build_backbone("cnn", 10, input_size=30)
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_backbone("cnn", 0)
    with pytest.raises(ConfigError, match="model.in_channels"):
        build_backbone("cnn", 10, in_channels=0)


def test_backbone_options():
    assert backbone_options("resnet56") == {"shortcut": "conv"}
    assert backbone_options("cnn") == {"input_size": None}
    assert set(backbone_options("resnet50")) == {"small_input"}
    assert set(backbone_options("mobilenet_v2")) == {"small_input", "width_mult"}
