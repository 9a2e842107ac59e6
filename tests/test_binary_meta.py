"""DoReFa / BWN weight quantizers and MetaQuant's meta-networks (ltq.quant.binary, ltq.quant.meta)."""

import math

import pytest
import torch
from torch import nn

from ltq.errors import ConfigError
from ltq.quant.binary import BWNWeightQuantizer, DoReFaWeightQuantizer
from ltq.quant.meta import FCGrad, LSTMFC, LSTMHiddenState, MultiFC, build_meta_net

W = torch.tensor([-2.0, -0.5, 0.1, 0.3, 1.0])


def _dorefa_pre_by_hand():
    t = [math.tanh(v) for v in W.tolist()]
    m = max(abs(v) for v in t)
    return [v / m * 0.5 + 0.5 for v in t]


def test_dorefa_pre_quantized_values():
    q = DoReFaWeightQuantizer(bits=1)
    torch.testing.assert_close(q.pre_quantize(W), torch.tensor(_dorefa_pre_by_hand()))
    # W̃ ≈ [0, .2604, .5518, .6510, .8950]


def test_dorefa_1bit_values():
    q = DoReFaWeightQuantizer(bits=1)
    x = W.clone()
    out = q(x)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(x, W)  # input not modified
    assert q.bits == 1
    s = q.stats()
    assert all(v.dim() == 0 for v in s.values())
    torch.testing.assert_close(s["pos_frac"], torch.tensor(0.6))


def test_dorefa_2bit_values():
    # W̃·3 ≈ [0, .781, 1.655, 1.953, 2.685] -> round [0, 1, 2, 2, 3] -> 2·(·/3) − 1
    q = DoReFaWeightQuantizer(bits=2)
    torch.testing.assert_close(q(W), torch.tensor([-1.0, -1 / 3, 1 / 3, 1 / 3, 1.0]))
    levels = q(torch.randn(1000) * 3).unique()
    assert levels.numel() <= 4


def test_dorefa_calibration_equals_autograd_of_smooth_part():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    g = torch.randn_like(w)
    q = DoReFaWeightQuantizer(bits=1)
    smooth = 2.0 * q.pre_quantize(w) - 1.0  # Ŵ without the rounding
    (auto,) = torch.autograd.grad(smooth, w, g)
    torch.testing.assert_close(q.calibration(w) * g, auto)
    # identity STE on the rounding: the full forward has the same gradient
    (full,) = torch.autograd.grad(q(w), w, g)
    torch.testing.assert_close(full, auto)


def test_bwn_values_and_ste():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0], requires_grad=True)
    q = BWNWeightQuantizer()
    out = q(w)
    alpha = 3.8 / 5
    torch.testing.assert_close(out, torch.tensor([-alpha, -alpha, 0.0, alpha, alpha]))
    out.backward(torch.ones(5))
    # hard-tanh STE: α·1[|W| <= 1] (boundary included); α is a constant
    torch.testing.assert_close(w.grad, torch.tensor([0.0, alpha, alpha, alpha, alpha]))
    torch.testing.assert_close(q.calibration(w), torch.tensor(1.0))
    assert q.pre_quantize(w) is w
    torch.testing.assert_close(q.stats()["alpha"], torch.tensor(alpha))


def test_bwn_per_channel_alpha():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]]).view(2, 1, 1, 2)
    q = BWNWeightQuantizer(per_channel=True)
    expected = torch.tensor([[2.0, -2.0], [0.5, 0.5]]).view(2, 1, 1, 2)
    torch.testing.assert_close(q(w), expected)
    torch.testing.assert_close(q.alpha(w).flatten(), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(BWNWeightQuantizer()(w), w.abs().mean() * w.sign())


def test_bits_validation():
    with pytest.raises(ConfigError, match="BWN"):
        BWNWeightQuantizer(bits=2)
    with pytest.raises(ConfigError):
        DoReFaWeightQuantizer(bits=0)
    assert DoReFaWeightQuantizer(bits=8).bits == 8


def test_meta_net_shapes_and_factory():
    torch.manual_seed(0)
    g, wt = torch.randn(8, 4, 3, 3), torch.rand(8, 4, 3, 3)
    assert build_meta_net("ste") is None
    for name, cls in [("multifc", MultiFC), ("fcgrad", FCGrad), ("lstmfc", LSTMFC)]:
        net = build_meta_net(name, hidden=7, nonlinear="tanh")
        assert isinstance(net, cls)
        out = net(g, wt, "layer1.0.conv1")
        assert out.shape == g.shape
        out.sum().backward()
        assert all(p.grad is not None for p in net.parameters())
    assert build_meta_net("FC-Grad", hidden=3).hidden == 3
    with pytest.raises(ConfigError, match="model.meta"):
        build_meta_net("lstm")
    with pytest.raises(ConfigError, match="nonlinear"):
        build_meta_net("multifc", nonlinear="gelu")


def test_multifc_without_nonlinearity_is_scalar_multiple():
    torch.manual_seed(0)
    net = MultiFC(hidden=5, num_layers=3, nonlinear=None)
    g, wt = torch.randn(10, 3), torch.rand(10, 3)
    lin = [m for m in net.net if isinstance(m, nn.Linear)]
    s = (lin[2].weight @ lin[1].weight @ lin[0].weight).squeeze()
    torch.testing.assert_close(net(g, wt), s * g * wt)
    fc = FCGrad(hidden=5, nonlinear=None)
    s2 = (fc.net[1].weight @ fc.net[0].weight).squeeze()
    torch.testing.assert_close(fc(g, wt), s2 * g)
    # tanh makes it genuinely nonlinear
    nl = MultiFC(hidden=5, nonlinear="tanh")
    ratio = nl(g, wt) / (g * wt)
    assert ratio.std() > 1e-4


def test_lstm_hidden_state_is_kept_and_detached():
    torch.manual_seed(0)
    net = LSTMFC(hidden=4)
    g, wt = torch.randn(6, 2), torch.rand(6, 2)
    a = net(g, wt, "a.b")
    h, c = net.hidden_state.get("a.b")
    assert h.shape == (12, 4) and not h.requires_grad
    b = net(g, wt, "a.b")  # same input, different state -> different output
    assert not torch.allclose(a, b)
    net.reset_state()
    torch.testing.assert_close(net(g, wt, "a.b"), a)


def test_lstm_hidden_state_round_trip_through_state_dict():
    torch.manual_seed(0)

    class Holder(nn.Module):  # nested, as inside a LightningModule
        def __init__(self):
            super().__init__()
            self.meta = LSTMFC(hidden=3)

    src = Holder()
    g1, w1 = torch.randn(5, 2), torch.rand(5, 2)
    g2, w2 = torch.randn(7), torch.rand(7)
    src.meta(g1, w1, "model.layer1.0.conv1")
    src.meta(g2, w2, "model.fc")
    sd = src.state_dict()
    assert "meta.hidden_state.h__model__layer1__0__conv1" in sd
    assert "meta.hidden_state.c__model__fc" in sd
    dst = Holder()
    dst.load_state_dict(sd)  # strict, into a freshly built module without the lazy buffers
    for name in ("model.layer1.0.conv1", "model.fc"):
        for x, y in zip(src.meta.hidden_state.get(name), dst.meta.hidden_state.get(name)):
            torch.testing.assert_close(x, y)
    torch.testing.assert_close(src.meta(g1, w1, "model.layer1.0.conv1"), dst.meta(g1, w1, "model.layer1.0.conv1"))
    # an unrelated key is still reported as unexpected
    bad = dict(sd, **{"meta.hidden_state.bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="bogus"):
        Holder().load_state_dict(bad)
    assert isinstance(dst.meta.hidden_state, LSTMHiddenState)


def test_meta_weight_quantizer_records_grad_and_pre_weight():
    from ltq.quant.meta import MetaWeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    q = MetaWeightQuantizer(DoReFaWeightQuantizer(bits=1), w.shape)
    assert q.bits == 1 and not q.has_prev
    q.eval()
    q(w).sum().backward()
    assert not q.has_prev  # eval forwards are not recorded
    q.train()
    q.offset = torch.full_like(w, 0.5)
    w_hat = q(w)
    up = torch.randn_like(w)
    w_hat.backward(up)
    torch.testing.assert_close(q.grad_prev, up)  # dL/dŴ
    torch.testing.assert_close(q.pre_weight_prev, DoReFaWeightQuantizer().pre_quantize(w.detach() + 0.5))
    assert bool(q.has_prev)
    assert set(q.state_dict()) == {"grad_prev", "pre_weight_prev", "update_prev", "has_prev"}
