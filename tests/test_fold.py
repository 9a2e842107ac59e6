"""Exact BN folding, conv/BN pair finding, simulated folding (QuantConvBn2d), BN freezing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltq.errors import ConfigError
from ltq.nn import (
    FrozenBatchNorm2d,
    QuantConv2d,
    QuantConvBn2d,
    freeze_bn_stats,
    is_bn_frozen,
    set_fake_quant_enabled,
    set_observers_enabled,
    unfreeze_bn_stats,
)
from ltq.quant import UniformQuantizer, find_conv_bn_pairs, fold_bn, fold_conv_bn


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            bn.weight[0] *= -1  # a negative γ
            bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
    return bn


class TinyBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActDense(nn.Module):
    """DenseNet-style bottleneck: BN → ReLU → conv1 → BN → ReLU → conv2, concatenated to the input.

    ``bn1`` normalises the (concatenated) input, not a conv output: it must stay. ``bn2`` directly
    consumes ``conv1``'s output, so (conv1, bn2) is a legitimate fold pair.
    """

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class PreActConv(nn.Module):
    """Registers ``conv`` before ``bn`` but applies BN → ReLU → conv: a trap for adjacency rules."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class MiniResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = TinyBlock(8, 8, 1)
        self.layer2 = TinyBlock(8, 16, 2)
        self.dense = PreActDense(16, 4)
        self.preact = PreActConv(20)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.preact(self.dense(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomized_resnet():
    torch.manual_seed(0)
    m = MiniResNet()
    for i, mod in enumerate(m.modules()):
        if isinstance(mod, nn.BatchNorm2d):
            randomize_bn(mod, seed=i)
    return m.eval()


# ------------------------------------------------------------------------------- exact fold


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1, bias=True),
        nn.Conv2d(4, 6, 3, stride=2, bias=False),
        nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True),  # depthwise
    ],
)
def test_fold_conv_bn_exact(conv):
    torch.manual_seed(0)
    bn = randomize_bn(nn.BatchNorm2d(conv.out_channels)).eval()
    x = torch.randn(2, 4, 7, 7)
    ref = bn(conv(x))
    folded = fold_conv_bn(conv, bn)
    assert folded.bias is not None and folded.weight is not conv.weight
    torch.testing.assert_close(folded(x), ref, atol=1e-5, rtol=1e-5)
    # σ is the standard deviation, not the variance
    f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.weight, conv.weight * f.reshape(-1, 1, 1, 1))


def test_fold_linear_bn1d_and_non_affine():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    bn = randomize_bn(nn.BatchNorm1d(3)).eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(fold_conv_bn(lin, bn)(x), bn(lin(x)), atol=1e-5, rtol=1e-5)
    conv = nn.Conv2d(2, 3, 1)
    bn = randomize_bn(nn.BatchNorm2d(3, affine=False)).eval()
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_fold_errors():
    with pytest.raises(ConfigError, match="track_running_stats"):
        fold_conv_bn(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ConfigError, match="features"):
        fold_conv_bn(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(4))


def test_find_pairs_resnet_and_preactivation():
    m = randomized_resnet()
    pairs = find_conv_bn_pairs(m)
    assert pairs == [
        ("conv1", "bn1"),
        ("layer1.conv1", "layer1.bn1"),
        ("layer1.conv2", "layer1.bn2"),
        ("layer2.conv1", "layer2.bn1"),
        ("layer2.conv2", "layer2.bn2"),
        ("layer2.shortcut.0", "layer2.shortcut.1"),
        ("dense.conv1", "dense.bn2"),
    ]  # dense.bn1 and preact.bn normalise non-conv inputs; preact.conv is registered before preact.bn


def test_fold_bn_whole_model_preserves_output():
    m = randomized_resnet()
    x = torch.randn(2, 3, 16, 16)
    ref = m(x)
    folded = fold_bn(m)
    assert folded is not m and isinstance(m.bn1, nn.BatchNorm2d)  # not in place
    remaining = [n for n, mod in folded.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert remaining == ["dense.bn1", "preact.bn"]  # the pre-activation BNs
    assert isinstance(folded.layer2.shortcut[1], nn.Identity)
    torch.testing.assert_close(folded(x), ref, atol=1e-5, rtol=1e-5)
    same = fold_bn(m, inplace=True)
    assert same is m


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_registration_order_fallback():
    m = Untraceable().eval()
    randomize_bn(m.bn)
    with pytest.warns(UserWarning, match="registration order"):
        pairs = find_conv_bn_pairs(m)
    assert pairs == [("conv", "bn")]
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning):
        folded = fold_bn(m)
    torch.testing.assert_close(folded(x), m(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ simulated fold (QAT)


def make_convbn(bias=False, wq=True):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
    bn = randomize_bn(nn.BatchNorm2d(6))
    ref = (copy.deepcopy(conv), copy.deepcopy(bn))
    q = UniformQuantizer(4, per_channel=True, observer="current") if wq else None
    return QuantConvBn2d.from_float(conv, bn, q, None), ref


@pytest.mark.parametrize("bias", [False, True])
def test_convbn_eval_no_fake_quant_equals_conv_bn(bias):
    qcb, (conv, bn) = make_convbn(bias)
    qcb.eval(), bn.eval()
    set_fake_quant_enabled(qcb, False)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(qcb(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_convbn_train_no_fake_quant_equals_conv_bn_train(bias):
    qcb, (conv, bn) = make_convbn(bias)
    qcb.train(), bn.train()
    set_fake_quant_enabled(qcb, False)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(qcb(x), bn(conv(x)), atol=1e-5, rtol=1e-4)
    # running statistics follow PyTorch's momentum convention, identical to the reference BN
    torch.testing.assert_close(qcb.bn.running_mean, bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(qcb.bn.running_var, bn.running_var, atol=1e-6, rtol=1e-5)
    assert qcb.bn.num_batches_tracked.item() == 2


def test_convbn_freeze_stops_running_stats_and_uses_them():
    qcb, _ = make_convbn()
    qcb.train()
    qcb(torch.randn(4, 3, 8, 8))
    qcb.freeze_bn_stats()
    mean, var = qcb.bn.running_mean.clone(), qcb.bn.running_var.clone()
    x = torch.randn(4, 3, 8, 8)
    y_train = qcb(x)
    assert torch.equal(qcb.bn.running_mean, mean) and torch.equal(qcb.bn.running_var, var)
    set_observers_enabled(qcb, False)
    torch.testing.assert_close(y_train, qcb.eval()(x))
    assert is_bn_frozen(qcb) and qcb.state_dict()["bn_frozen"].item() == 1


def test_convbn_gradients_and_to_folded():
    qcb, _ = make_convbn(bias=True)
    qcb.train()
    x = torch.randn(4, 3, 8, 8)
    qcb(x).square().mean().backward()
    for p in (qcb.weight, qcb.bn.weight, qcb.bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    qcb.eval()
    set_observers_enabled(qcb, False)
    folded = qcb.to_folded()
    assert isinstance(folded, QuantConv2d) and folded.weight_quantizer is qcb.weight_quantizer
    torch.testing.assert_close(folded(x), qcb(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.quantized_weight(), qcb.quantized_weight())


def test_convbn_keeps_parameters_and_state_keys():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    qcb = QuantConvBn2d.from_float(conv, bn, UniformQuantizer(8, per_channel=True), None)
    assert qcb.weight is conv.weight and qcb.bias is conv.bias and qcb.bn is bn
    keys = set(qcb.state_dict())
    assert {"weight", "bias", "bn.weight", "bn.running_var", "bn_frozen", "weight_quantizer.observer.min_val"} <= keys
    with pytest.raises(ConfigError):
        QuantConvBn2d.from_float(conv, nn.BatchNorm2d(5))


# ---------------------------------------------------------------------- plain BN freezing


def test_freeze_plain_bn_survives_train_and_keeps_state():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)), nn.ReLU())
    keys = list(m.state_dict())
    params = list(m.parameters())
    assert freeze_bn_stats(m) == 1
    m.train()  # what Lightning does every epoch
    bn = m[1]
    assert isinstance(bn, FrozenBatchNorm2d) and bn.training
    mean = bn.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    y = m(x)
    assert torch.equal(bn.running_mean, mean)  # no running update
    ref = F.batch_norm(m[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps).relu()
    torch.testing.assert_close(y, ref)  # normalised with running statistics
    y.sum().backward()
    assert bn.weight.grad is not None  # γ, β still train
    assert list(m.state_dict()) == keys and list(m.parameters()) == params
    copy.deepcopy(m)
    assert unfreeze_bn_stats(m) == 1 and type(m[1]) is nn.BatchNorm2d
    m(x)
    assert not torch.equal(bn.running_mean, mean)


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output has a second user: not foldable


def test_conv_output_with_two_users_is_not_paired():
    assert find_conv_bn_pairs(SharedOutput()) == []
