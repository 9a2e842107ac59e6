"""quantize_model / QuantPolicy: module swap counts, first/last rules, overrides, fold modes, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltq.errors import ConfigError
from ltq.nn import (
    QuantConv2d,
    QuantConvBn2d,
    QuantLinear,
    QuantPolicy,
    describe_quantization,
    freeze_bn_stats,
    iter_quant_layers,
    iter_quantizers,
    quantize_model,
    set_fake_quant_enabled,
    set_observers_enabled,
    uniform_policy,
)
from ltq.quant import UniformQuantizer, size_report


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Dense(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Net(nn.Module):
    """Residual add + dense concat + hidden FC: 5 convs, 2 linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = Block(8, 16, 2)
        self.dense = Dense(16, 8)
        self.hidden = nn.Linear(24, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.dense(self.block(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(F.relu(self.hidden(x)))


def make_net():
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(generator=g)
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))


def kinds(model):
    return {r["name"]: (r["type"], r["w_bits"], r["a_bits"]) for r in describe_quantization(model)}


def test_default_policy_swaps_all_but_first_and_last():
    net = make_net()
    w_block = net.block.conv1.weight
    keys = set(net.state_dict())
    quantize_model(net, uniform_policy(4, 4))
    layers = dict(iter_quant_layers(net))
    assert set(layers) == {"block.conv1", "block.conv2", "block.shortcut.0", "dense.conv", "hidden"}
    assert type(net.stem) is nn.Conv2d and type(net.fc) is nn.Linear
    assert isinstance(net.hidden, QuantLinear) and isinstance(net.dense.conv, QuantConv2d)
    assert net.block.conv1.weight is w_block  # same Parameter objects
    new_keys = set(net.state_dict())
    assert keys <= new_keys  # original keys unchanged
    assert "block.conv1.weight_quantizer.observer.min_val" in new_keys
    assert "block.conv1.act_quantizer.fake_quant_enabled" in new_keys
    assert kinds(net)["block.conv1"] == ("QuantConv2d", 4, 4)
    assert kinds(net)["stem"] == ("Conv2d", None, None)
    wq = net.block.conv1.weight_quantizer
    aq = net.block.conv1.act_quantizer
    assert wq.symmetric and wq.per_channel and not aq.symmetric and not aq.signed
    assert not wq.observer.sync and aq.observer.sync
    assert len(list(iter_quantizers(net))) == 10
    net.train()
    out = net(X)
    out.sum().backward()
    assert w_block.grad is not None and w_block.grad.abs().sum() > 0


def test_outputs_equal_fp_when_fake_quant_disabled():
    for fold in ("none", "fold", "simulate"):
        net = make_net().eval()
        ref = net(X)
        quantize_model(net, uniform_policy(2, 2, fold_bn=fold))
        set_fake_quant_enabled(net, False)
        torch.testing.assert_close(net(X), ref, atol=1e-5, rtol=1e-5, msg=f"fold_bn={fold}")
        set_fake_quant_enabled(net, True)
        assert not torch.allclose(net(X), ref, atol=1e-3)


def test_fold_modes():
    net = quantize_model(make_net(), uniform_policy(8, 8, fold_bn="fold"))
    assert isinstance(net.block.bn1, nn.Identity) and isinstance(net.stem_bn, nn.Identity)
    assert isinstance(net.dense.bn, nn.BatchNorm2d)  # pre-activation BN is not folded
    assert net.block.conv1.bias is not None
    net = make_net()
    bn1 = net.block.bn1
    quantize_model(net, uniform_policy(8, 8, fold_bn="simulate"))
    assert isinstance(net.block.conv1, QuantConvBn2d) and net.block.conv1.bn is bn1
    assert isinstance(net.block.bn1, nn.Identity) and isinstance(net.block.shortcut[0], QuantConvBn2d)
    assert isinstance(net.dense.conv, QuantConv2d) and isinstance(net.dense.bn, nn.BatchNorm2d)
    assert type(net.stem) is nn.Conv2d and isinstance(net.stem_bn, nn.BatchNorm2d)  # skipped → unfused
    assert "block.conv1.bn.running_mean" in net.state_dict()
    # a QAT step, then freezing BN everywhere (simulated and plain)
    net.train()
    net(X).sum().backward()
    assert freeze_bn_stats(net) == 5
    means = [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net.train()
    net(X)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(means, [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]))


def test_first_last_weight_only_and_overrides():
    policy = uniform_policy(
        4,
        4,
        first_last_w_bits=8,
        overrides={"block.shortcut.*": {"skip": True}, "dense.*": {"w_bits": 2, "a_bits": None}, "hidden": {"a_bits": 6}},
    )
    net = quantize_model(make_net(), policy)
    k = kinds(net)
    assert k["stem"] == ("QuantConv2d", 8, None)
    assert k["fc"] == ("QuantLinear", 8, None)
    assert k["block.shortcut.0"] == ("Conv2d", None, None)
    assert k["dense.conv"] == ("QuantConv2d", 2, None)
    assert k["hidden"] == ("QuantLinear", 4, 6)
    assert k["block.conv2"] == ("QuantConv2d", 4, 4)
    # an override can also re-enable the skipped first layer
    net = quantize_model(make_net(), uniform_policy(4, 4, overrides={"stem": {"skip": False}}))
    assert kinds(net)["stem"] == ("QuantConv2d", 4, 4)
    # weight-only / activation-only policies
    net = quantize_model(make_net(), uniform_policy(4, None))
    assert kinds(net)["hidden"] == ("QuantLinear", 4, None)
    net = quantize_model(make_net(), uniform_policy(None, 8))
    assert kinds(net)["hidden"] == ("QuantLinear", None, 8)


def test_custom_factories_and_first_last_factory():
    calls = []

    def weight(name, module, bits):
        calls.append((name, bits))
        return UniformQuantizer(bits)

    def first_last(name, module, bits):
        return UniformQuantizer(bits, per_channel=True)

    policy = QuantPolicy(weight=weight, act=None, w_bits=3, a_bits=None, first_last_w_bits=8, first_last_weight=first_last)
    net = quantize_model(make_net(), policy)
    assert ("stem", 8) not in calls and ("block.conv1", 3) in calls
    assert net.stem.weight_quantizer.per_channel and net.stem.weight_quantizer.bits == 8
    d = policy.to_dict()
    json.dumps(d)
    assert d["w_bits"] == 3 and d["weight"].endswith("weight") and d["types"] == ["Conv2d", "Linear"]
    assert json.loads(json.dumps(uniform_policy(4, 4).to_dict()))["act"]["observer"] == "ema"
    assert net._ltq_policy == d


def test_ptq_calibration_flow():
    net = make_net().eval()
    ref = net(X)
    quantize_model(net, uniform_policy(8, 8, fold_bn="fold", act_observer="minmax"))
    set_fake_quant_enabled(net, False)
    net(X)  # calibrate in eval mode
    set_observers_enabled(net, False)
    set_fake_quant_enabled(net, True)
    out = net(X)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(q.observer.initialized.item() == 1 for _, q in iter_quantizers(net))
    rows, total = size_report(net)
    assert 1.0 < total["ratio"] < 4.0


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'wbits'"):
        quantize_model(make_net(), uniform_policy(4, 4, overrides={"dense.*": {"wbits": 2}}))
    net = make_net()
    with pytest.raises(ConfigError, match="'layer9.*' matches no quantizable layer"):
        quantize_model(net, uniform_policy(4, 4, overrides={"layer9.*": {"skip": True}}))
    assert not list(iter_quant_layers(net))  # untouched after the error
    with pytest.raises(ConfigError, match="bits=1.*2..16"):
        quantize_model(net, uniform_policy(4, 4, overrides={"dense.*": {"w_bits": 1}}))
    assert not list(iter_quant_layers(net))  # bad bits fail before any swap
    quantize_model(net, uniform_policy(4, 4))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(net, uniform_policy(4, 4))
    with pytest.raises(ConfigError, match="fold_bn"):
        quantize_model(make_net(), uniform_policy(4, 4, fold_bn="yes"))
    with pytest.raises(ConfigError, match="w_bits=1"):
        uniform_policy(1, 4)
    with pytest.raises(ConfigError, match="act_observer"):
        uniform_policy(4, 4, act_observer="hist")
    with pytest.raises(ConfigError, match="both are None"):
        quantize_model(make_net(), QuantPolicy())
    with pytest.raises(ConfigError, match="types"):
        quantize_model(make_net(), QuantPolicy(weight=lambda n, m, b: UniformQuantizer(b), types=(nn.Conv1d,)))
    with pytest.raises(ConfigError, match="no layer"):
        quantize_model(nn.Sequential(nn.ReLU()), uniform_policy(4, 4))
