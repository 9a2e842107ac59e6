"""APoT / PoT / uniform level sets, the table projection and the quantizer's gradients."""

from fractions import Fraction as F

import pytest
import torch

from ltq.errors import ConfigError
from ltq.quant.apot import (
    APoTQuantizer,
    apot_quantize,
    build_levels,
    level_midpoints,
    level_table,
    levels_fallback,
    project,
    project_bucketize,
)

# ANALYSIS.md §2.1
EXPECTED = {
    2: [0, 0.25, 0.5, 1],
    3: [0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1],
    4: [F(0), F(1, 48), F(1, 24), F(1, 16), F(1, 12), F(1, 8), F(1, 6), F(3, 16), F(1, 4), F(1, 3), F(3, 8),
        F(1, 2), F(2, 3), F(11, 16), F(3, 4), F(1)],
    5: [0, .01, .02, .03, .04, .05, .06, .07, .08, .10, .12, .14, .16, .17, .20, .21, .24, .28, .32, .34, .36,
        .38, .48, .52, .64, .65, .68, .69, .72, .76, .96, 1],
}


@pytest.mark.parametrize("B", [2, 3, 4, 5])
def test_apot_levels_match_the_original_table(B):
    levels = build_levels(B, "apot", dtype=torch.float64)
    expected = torch.tensor([float(v) for v in EXPECTED[B]], dtype=torch.float64)
    assert levels.numel() == 2**B
    torch.testing.assert_close(levels, expected, rtol=0, atol=1e-12)


def test_level_set_shapes_all_modes():
    for B in range(1, 9):
        for mode in ("apot", "pot", "uniform"):
            lv = build_levels(B, mode)
            assert lv.numel() == 2**B, (B, mode)
            assert lv[0] == 0 and lv[-1] == 1 and torch.all(lv[1:] > lv[:-1])
            assert not torch.isnan(lv).any()
    torch.testing.assert_close(build_levels(3, "pot"), torch.tensor([0, 2.0**-6, 2.0**-5, 2.0**-4, 2.0**-3, 0.25, 0.5, 1]))
    torch.testing.assert_close(build_levels(2, "uniform"), torch.tensor([0, 1 / 3, 2 / 3, 1]))
    assert levels_fallback(7, "apot") and levels_fallback(7, "pot") and not levels_fallback(6, "apot")
    torch.testing.assert_close(build_levels(7, "apot"), build_levels(7, "uniform"))
    with pytest.raises(ConfigError):
        build_levels(3, "log")


@pytest.mark.parametrize("B,mode", [(b, m) for b in (1, 2, 3, 4, 5, 6, 7, 8) for m in ("apot", "pot", "uniform")])
def test_table_projection_is_exact(B, mode):
    torch.manual_seed(B)
    levels = build_levels(B, mode)
    mids = level_midpoints(levels)
    # random values, values near 0 (PoT), the midpoints themselves and their float neighbours
    x = torch.cat([
        torch.rand(20000),
        torch.rand(2000) ** 8,
        mids,
        torch.nextafter(mids, torch.zeros_like(mids)),
        torch.nextafter(mids, torch.ones_like(mids)),
        levels,
        torch.tensor([0.0, 1.0]),
    ])
    got = project(x, B, mode)
    # identical to bucketize on the midpoints (same tie rule: a midpoint goes up)
    assert torch.equal(got, project_bucketize(x, levels))
    assert torch.equal(project(mids, B, mode), levels[1:])
    # negative inputs: the sign is applied to the magnitude's level (ties away from zero)
    assert torch.equal(project(-x, B, mode), -got)
    assert torch.equal(project(-mids, B, mode), -levels[1:])
    # and a nearest level by brute force in float64 (ties aside)
    d = (x.double()[:, None] - levels.double()[None, :]).abs()
    best = d.min(dim=1).values
    mine = (x.double() - got.double()).abs()
    assert torch.all(mine <= best + 1e-7)


def test_projection_nan_and_above_one():
    x = torch.tensor([float("nan"), 1.5, float("inf"), 0.0, -0.0, -float("inf"), -3.0, -float("nan")])
    out = project(x, 3, "apot")
    assert torch.isnan(out[0]) and torch.isnan(out[7])
    assert out[1:7].tolist() == [1.0, 1.0, 0.0, 0.0, -1.0, -1.0]


@pytest.mark.parametrize("bits,count", [(2, 3), (3, 7), (4, 15), (5, 31)])
def test_weight_value_counts(bits, count):
    torch.manual_seed(0)
    w = torch.randn(64, 64, 3, 3)
    q = APoTQuantizer(bits, signed=True, alpha_init=2.0)
    out = q(w)
    assert out.unique().numel() == count
    assert torch.all(out.abs() <= 2.0 + 1e-6)


@pytest.mark.parametrize("bits", [6, 7, 8])
@pytest.mark.parametrize("mode", ["apot", "pot", "uniform"])
def test_high_bits_no_nan(bits, mode):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    x = torch.relu(torch.randn(4, 8, 5, 5)).requires_grad_(True)
    qw = APoTQuantizer(bits, signed=True, mode=mode)
    qa = APoTQuantizer(bits, signed=False, mode=mode)
    out = qw(w).sum() + qa(x).sum()
    out.backward()
    for t in (qw(w), qa(x), w.grad, x.grad, qw.alpha.grad, qa.alpha.grad):
        assert torch.isfinite(t).all()
    assert qw(w).unique().numel() <= 2**bits - 1


def test_alpha_gradient_hand_made_weight():
    # signed 3-bit APoT: B = 2, levels {0, .25, .5, 1}; no weight normalisation; α = 2
    x = torch.tensor([-3.0, -0.3, 0.02, 0.24, 0.26, 1.9, 2.5], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    out = apot_quantize(x, alpha, B=2, signed=True)
    # u = x/2 = [-1.5, -.15, .01, .12, .13, .95, 1.25]
    q = torch.tensor([-1.0, -0.25, 0.0, 0.0, 0.25, 1.0, 1.0])
    m = torch.tensor([0.0, 1, 1, 1, 1, 1, 0])
    u = x.detach() / 2
    assert torch.equal(out.detach(), q * 2)
    out.backward(g)
    # Σ g·(q - u) inside + Σ g·sign(u) outside
    expected = (g * (q - u) * m).sum() + (g * torch.sign(u) * (1 - m)).sum()
    torch.testing.assert_close(alpha.grad, expected)
    torch.testing.assert_close(alpha.grad, torch.tensor(-1.0 + 2 * (-0.1) + 3 * (-0.01) + 4 * (-0.12) + 5 * 0.12 + 6 * 0.05 + 7.0))
    assert torch.equal(x.grad, g * m)  # clipped straight-through estimator


def test_alpha_gradient_hand_made_activation_and_grad_scale():
    # unsigned 2-bit: B = 2, levels {0, .25, .5, 1}; α = 4
    x = torch.tensor([-1.0, 0.0, 0.6, 1.4, 3.1, 5.0], requires_grad=True)
    g = torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    u = x.detach() / 4  # [-.25, 0, .15, .35, .775, 1.25]
    q = torch.tensor([0.0, 0.0, 0.25, 0.25, 1.0, 1.0])
    # imagenet: clamp to [0, 1]; the negative input is outside (gradient 0, α-derivative 0)
    a1 = torch.tensor(4.0, requires_grad=True)
    out = apot_quantize(x, a1, B=2, signed=False, lower_clip=True, grad_scale=0.5)
    assert torch.equal(out.detach(), q * 4)
    out.backward(g)
    m = torch.tensor([0.0, 1, 1, 1, 1, 0])
    expected = (g * (q - u) * m).sum() + g[-1]
    torch.testing.assert_close(a1.grad, 0.5 * expected)
    assert torch.equal(x.grad, g * m)
    # cifar: clamp from above only: the negative input is inside (projected to 0, pass-through)
    x.grad = None
    a2 = torch.tensor(4.0, requires_grad=True)
    apot_quantize(x, a2, B=2, signed=False, lower_clip=False).backward(g)
    m2 = torch.tensor([1.0, 1, 1, 1, 1, 0])
    torch.testing.assert_close(a2.grad, (g * (q - u) * m2).sum() + g[-1])
    assert torch.equal(x.grad, g * m2)


def _reference(w, alpha, levels, variant, calibrated):
    """Autograd reference for normalised weights (straight-through with the detach trick)."""
    if variant == "cifar":
        mean, std = w.detach().mean(), w.detach().std()
    else:
        mean, std = w.mean(), w.std()
    z = (w - mean) / std
    u = z / alpha
    c = u.clamp(-1, 1)
    q = project_bucketize(c.detach().abs(), levels).copysign(c.detach())
    if calibrated:  # unclipped gradient to z, α-gradient from the clipped expression
        c_d = (z.detach() / alpha).clamp(-1, 1)
        return (z - z.detach()) + alpha * (c_d + (q - c_d).detach())
    return alpha * (c + (q - c).detach())


@pytest.mark.parametrize("variant", ["cifar", "imagenet"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_weight_gradients_match_autograd_reference(variant, bits):
    torch.manual_seed(bits)
    w0 = torch.randn(32, 16, 3, 3) * 0.1 + 0.01
    g = torch.randn_like(w0)
    q = APoTQuantizer(bits, signed=True, variant=variant, alpha_init=1.5)
    w1 = w0.clone().requires_grad_(True)
    out = q(w1)
    out.backward(g)
    w2 = w0.clone().requires_grad_(True)
    a2 = torch.tensor(1.5, requires_grad=True)
    ref = _reference(w2, a2, q.levels, variant, calibrated=q.calibrated_grad)
    ref.backward(g)
    torch.testing.assert_close(out.detach(), ref.detach())
    torch.testing.assert_close(q.alpha.grad, a2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)
    assert q.calibrated_grad == (variant == "cifar" or bits == 2)


def test_cifar_vs_imagenet_normalisation_gradient():
    torch.manual_seed(0)
    w0 = torch.randn(16, 8, 3, 3) * 0.2 + 0.05
    g = torch.randn_like(w0)
    grads = {}
    for variant in ("cifar", "imagenet"):
        q = APoTQuantizer(4, signed=True, variant=variant, alpha_init=100.0)  # nothing clipped
        w = w0.clone().requires_grad_(True)
        q(w).backward(g)
        grads[variant] = w.grad
    inv_std = 1 / w0.std()
    # cifar: constant statistics → the gradient is just g / std
    torch.testing.assert_close(grads["cifar"], g * inv_std)
    # imagenet: through mean and std → the projection of g orthogonal to 1 and to z
    z = (w0 - w0.mean()) * inv_std
    n = w0.numel()
    expected = inv_std * (g - g.mean() - z * (g * z).sum() / (n - 1))
    torch.testing.assert_close(grads["imagenet"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grads["cifar"], grads["imagenet"])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("variant", ["cifar", "imagenet"])
def test_input_not_modified(signed, variant):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3) * 4
    if not signed:
        x = x.relu()
    x.requires_grad_(True)
    before = x.detach().clone()
    version = x._version
    q = APoTQuantizer(3, signed=signed, variant=variant)
    out = q(x)
    out.sum().backward()
    assert torch.equal(x.detach(), before) and x._version == version
    assert out.shape == x.shape and out.dtype == x.dtype


def test_low_precision_dtypes_and_contract():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 3, 3).to(torch.bfloat16).requires_grad_(True)
    q = APoTQuantizer(4, signed=True)
    out = q(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    s = q.stats()
    assert set(s) == {"alpha", "clip_ratio"} and all(v.dim() == 0 for v in s.values())
    assert q.bits == 4
    assert set(q.state_dict()) == {"alpha"}  # level sets are derived, not state
    assert q.values().numel() == 15


def test_clip_ratio():
    x = torch.tensor([0.5, 1.0, 2.0, 5.0, 9.0])
    q = APoTQuantizer(3, signed=False, variant="imagenet", alpha_init=4.0)
    q(x)
    assert q.stats()["clip_ratio"].item() == pytest.approx(2 / 5)


def test_config_errors():
    for bits in (1, 9, 2.5, True):
        with pytest.raises(ConfigError):
            APoTQuantizer(bits)
    with pytest.raises(ConfigError):
        APoTQuantizer(4, mode="log")
    with pytest.raises(ConfigError):
        APoTQuantizer(4, variant="mnist")
    with pytest.raises(ConfigError):
        APoTQuantizer(4, alpha_init=0.0)


def test_tables_are_shared_and_small():
    assert level_table(3, "apot") is level_table(3, "apot")
    for B in range(1, 9):
        for mode in ("apot", "pot", "uniform"):
            tab = level_table(B, mode)
            assert tab.table is not None and tab.table.numel() <= 2 * 2**18


def test_quantizer_deepcopy_and_pickle():
    import copy
    import pickle

    q = APoTQuantizer(4, signed=True)
    x = torch.randn(8, 4, 3, 3)
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert torch.equal(clone(x), q(x))
    tab = level_table(4, "apot")
    assert copy.deepcopy(tab) is tab
    again = pickle.loads(pickle.dumps(tab))
    assert torch.equal(again.table, tab.table)
    assert torch.equal(again.level_pairs.view(torch.int32), tab.level_pairs.view(torch.int32))  # NaN entries too
