"""Uniform fake quantizer: known values, STE gradients, per-channel scales, toggles, errors."""

import pytest
import torch

from ltq.errors import ConfigError
from ltq.quant import (
    UniformQuantizer,
    fake_quantize,
    qparams,
    quant_range,
    round_ste,
    sign_ste,
    ste,
)


def fq_known(x, bits, symmetric=True, **kw):
    t = torch.tensor(x)
    s, z, qmin, qmax = qparams(t.min(), t.max(), bits, symmetric=symmetric, **kw)
    return fake_quantize(t, s, z, qmin, qmax), s, z, qmin, qmax


def test_quant_range():
    assert quant_range(2, signed=True) == (-1, 1)  # ternary
    assert quant_range(4, signed=True) == (-7, 7)
    assert quant_range(8, signed=True, narrow_range=False) == (-128, 127)
    assert quant_range(8, signed=False) == (0, 255)
    assert quant_range(16, signed=False) == (0, 65535)


def test_symmetric_2bit_is_ternary_and_keeps_positive_extreme():
    out, s, z, qmin, qmax = fq_known([-1.0, -0.3, 0.2, 0.7, 1.0], 2)
    assert (qmin, qmax) == (-1, 1)
    assert s.item() == pytest.approx(1.0) and z.item() == 0
    assert out.tolist() == [-1.0, 0.0, 0.0, 1.0, 1.0]
    # the positive extreme is representable (ptq_resnet20's scale max/2^(b-1) would give 0.5·max)
    w = torch.tensor([-0.2, 0.1, 0.8])
    s, z, qmin, qmax = qparams(w.min(), w.max(), 2)
    assert fake_quantize(w, s, z, qmin, qmax).max().item() == pytest.approx(0.8)


def test_symmetric_4bit_known_values():
    out, s, *_ = fq_known([-0.7, -0.26, 0.04, 0.33, 0.7], 4)
    assert s.item() == pytest.approx(0.1)
    torch.testing.assert_close(out, torch.tensor([-0.7, -0.3, 0.0, 0.3, 0.7]))


def test_symmetric_8bit_known_values_and_full_range():
    out, s, *_ = fq_known([-1.27, 0.5, 0.123, 1.27], 8)
    assert s.item() == pytest.approx(0.01)
    torch.testing.assert_close(out, torch.tensor([-1.27, 0.5, 0.12, 1.27]))
    s, z, qmin, qmax = qparams(-1.27, 1.0, 8, narrow_range=False)
    assert (qmin, qmax) == (-128, 127) and s.item() == pytest.approx(0.01)


def test_affine_8bit_qparams_and_values():
    s, z, qmin, qmax = qparams(-1.0, 3.0, 8, symmetric=False)
    assert (qmin, qmax) == (0, 255)
    assert s.item() == pytest.approx(4.0 / 255)
    assert z.item() == 64  # round(1 / (4/255)) = round(63.75)
    x = torch.tensor([-1.0, 0.0, 3.0, 5.0])
    out = fake_quantize(x, s, z, qmin, qmax)
    expected = (torch.tensor([0.0, 64.0, 255.0, 255.0]) - 64) * (4.0 / 255)  # -1 → q=round(0.25)=0
    torch.testing.assert_close(out, expected)
    assert out[1].item() == 0.0  # zero is exact


def test_affine_2bit_known_values_range_includes_zero():
    out, s, z, *_ = fq_known([0.6, 1.6, 2.4, 3.0], 2, symmetric=False)
    assert s.item() == pytest.approx(1.0) and z.item() == 0  # range forced to [0, 3]
    assert out.tolist() == [1.0, 2.0, 2.0, 3.0]
    # all-negative data: range [min, 0], zero point at the top
    s, z, qmin, qmax = qparams(-3.0, -1.0, 2, symmetric=False)
    assert z.item() == 3 and s.item() == pytest.approx(1.0)


def test_constant_tensors_no_nan():
    for sym in (True, False):
        s, z, qmin, qmax = qparams(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric=sym)
        assert s.item() > 0
        out = fake_quantize(torch.zeros(5), s, z, qmin, qmax)
        assert torch.equal(out, torch.zeros(5))
    q = UniformQuantizer(8, symmetric=False)
    y = q(torch.full((4,), 5.0))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.full((4,), 5.0))


def test_ste_gradient_is_clipped():
    x = torch.tensor([-3.0, -2.6, -1.0, 0.0, 1.2, 2.4, 2.6, 3.0], requires_grad=True)
    y = fake_quantize(x, 1.0, 0.0, -2, 2)
    y.sum().backward()
    # 2.4 rounds to 2 (inside), 2.6 rounds to 3 (clipped)
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert y.detach().tolist() == [-2.0, -2.0, -1.0, 0.0, 1.0, 2.0, 2.0, 2.0]


def test_matches_torch_fake_quantize_per_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 2, 6).reshape(-1, 1, 1, 1)
    q = UniformQuantizer(8, per_channel=True, narrow_range=False)
    w1 = w.clone().requires_grad_()
    out = q(w1)
    s, z = q.calculate_qparams()
    w2 = w.clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(w2, s, z.to(torch.int32), 0, -128, 127)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(w)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_per_channel_scales():
    torch.manual_seed(0)
    w = torch.randn(5, 4, 3, 3)
    for bits in (2, 4, 8):
        q = UniformQuantizer(bits, per_channel=True)
        q(w)
        s, z = q.calculate_qparams()
        expected = w.abs().amax(dim=(1, 2, 3)) / (2 ** (bits - 1) - 1)
        torch.testing.assert_close(s, expected)
        assert torch.equal(z, torch.zeros(5))
    # Linear weights / other axis
    q = UniformQuantizer(4, per_channel=True, ch_axis=1)
    x = torch.randn(3, 7)
    q(x)
    torch.testing.assert_close(q.calculate_qparams()[0], x.abs().amax(0) / 7)


def test_not_in_place_and_dtype():
    x = torch.randn(10)
    x0 = x.clone()
    q = UniformQuantizer(3)
    y = q(x)
    assert torch.equal(x, x0) and y is not x
    xb = torch.randn(10, dtype=torch.bfloat16)
    assert UniformQuantizer(8, symmetric=False)(xb).dtype == torch.bfloat16
    assert UniformQuantizer(8)(torch.randn(4, dtype=torch.float64)).dtype == torch.float64


def test_toggles_and_eval_mode_observation():
    q = UniformQuantizer(4, symmetric=False, observer="minmax").eval()
    q(torch.tensor([0.0, 1.0]))  # eval mode still observes (PTQ calibration)
    assert q.observer.max_val.item() == 1.0
    q.disable_observer()
    q(torch.tensor([0.0, 9.0]))
    assert q.observer.max_val.item() == 1.0  # frozen
    x = torch.tensor([0.3, 5.0])
    assert q(x).tolist() == pytest.approx([4 / 15, 1.0])  # clipped at the calibrated max
    q.disable_fake_quant()
    assert torch.equal(q(x), x)
    # an uncalibrated quantizer with observers off is the identity
    q2 = UniformQuantizer(4).disable_observer()
    assert torch.equal(q2(x), x)
    assert q.observer_enabled.dtype == torch.uint8 and "fake_quant_enabled" in q.state_dict()


def test_stats_and_clip_ratio():
    q = UniformQuantizer(4, per_channel=True, track_clip_ratio=True)
    assert q.stats()["scale"].dim() == 0  # before any data
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    q(w)
    st = q.stats()
    assert set(st) >= {"scale", "zero_point", "min", "max", "clip_ratio"}
    assert all(v.dim() == 0 for v in st.values())
    assert st["max"].item() == 1.0 and st["min"].item() == -2.0
    q.disable_observer()
    q(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    assert q.stats()["clip_ratio"].item() == pytest.approx(0.25)


def test_state_dict_roundtrip_per_channel():
    q = UniformQuantizer(4, per_channel=True, observer="ema")
    q(torch.randn(3, 8))
    q2 = UniformQuantizer(4, per_channel=True, observer="ema")
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2.calculate_qparams()[0], q.calculate_qparams()[0])
    assert q2.observer.initialized.item() == 1


@pytest.mark.parametrize("bits", [1, 17, 0, 3.5, True, "8"])
def test_bits_validation(bits):
    with pytest.raises(ConfigError, match=r"bits=.*allowed: integers 2\.\.16"):
        UniformQuantizer(bits)


def test_other_config_errors():
    with pytest.raises(ConfigError, match="per_channel"):
        UniformQuantizer(8, per_channel=True)(torch.randn(5))
    with pytest.raises(ConfigError, match="observer"):
        UniformQuantizer(8, observer="histogram")
    with pytest.raises(ConfigError, match="percentile"):
        UniformQuantizer(8, observer="percentile", percentile=0)
    with pytest.raises(ConfigError, match="averaging_constant"):
        UniformQuantizer(8, observer="ema", averaging_constant=2.0)
    with pytest.raises(ConfigError, match="ch_axis"):
        UniformQuantizer(8, per_channel=True, ch_axis=3)(torch.randn(2, 2))


def test_all_bit_widths_monotone_error():
    torch.manual_seed(0)
    x = torch.randn(4096)
    errs = []
    for bits in range(2, 17):
        q = UniformQuantizer(bits)
        errs.append((q(x) - x).pow(2).mean().item())
    assert all(a >= b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-8


def test_ste_helpers():
    x = torch.tensor([-1.6, -0.2, 0.5, 1.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 4
    x.grad = None
    s = sign_ste(x)
    assert s.tolist() == [-1.0, -1.0, 1.0, 1.0]
    (s * torch.arange(4.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0]
    v = ste(torch.zeros(4), x)
    assert v.tolist() == [0.0] * 4 and v.requires_grad
