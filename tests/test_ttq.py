"""TTQ quantizer: forward values, the paper's gradients, both modes, init, cache, state."""

import pytest
import torch

from ltq.errors import ConfigError
from ltq.quant.ttq import TTQQuantizer, ttq_quantize

# max|W| = 1.0, so Δ = t
W = torch.tensor([[0.90, -0.50, 0.04, -0.02], [0.30, -1.00, 0.10, 0.00], [-0.06, 0.70, -0.20, 0.08]])


def reference(w, w_p, w_n, t):
    """Differentiable TTQ formula: W_t = w_p·a - w_n·b, latent gradient by the scaled STE."""
    delta = t * w.detach().abs().max()
    a = (w.detach() > delta).float()
    b = (w.detach() < -delta).float()
    c = 1 - a - b
    scale = (w_p.detach() * a + w_n.detach() * b + c)
    # value: the ternary kernel; gradient wrt w: scale·g (the "+ scale·w - (scale·w).detach()" trick)
    ste = scale * w - (scale * w).detach()
    return w_p * a - w_n * b + ste


@pytest.mark.parametrize("mode", ["paper", "original"])
def test_gradients_match_reference(mode):
    torch.manual_seed(0)
    g = torch.randn(W.shape)
    t = 0.25
    w1 = W.clone().requires_grad_(True)
    wp1 = torch.tensor(0.7, requires_grad=True)
    wn1 = torch.tensor(1.3, requires_grad=True)
    out = ttq_quantize(w1, wp1, wn1, t=t, mode=mode)
    out.backward(g)

    w2 = W.clone().requires_grad_(True)
    wp2 = torch.tensor(0.7, requires_grad=True)
    wn2 = torch.tensor(1.3, requires_grad=True)
    ref = reference(w2, wp2, wn2, t)
    ref.backward(g)

    assert torch.equal(out.detach(), ref.detach())
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(wp1.grad, wp2.grad)
    sign = -1.0 if mode == "original" else 1.0  # the original's +Σ sign for w_n (its issue #6)
    torch.testing.assert_close(wn1.grad, sign * wn2.grad)


def test_known_values_and_gradients():
    t = 0.25  # I_p: 0.9, 0.3, 0.7 ; I_n: -0.5, -1.0 ; rest zero
    w = W.clone().requires_grad_(True)
    wp = torch.tensor(2.0, requires_grad=True)
    wn = torch.tensor(3.0, requires_grad=True)
    out = ttq_quantize(w, wp, wn, t=t)
    expected = torch.tensor([[2.0, -3.0, 0, 0], [2.0, -3.0, 0, 0], [0, 2.0, 0, 0]])
    assert torch.equal(out.detach(), expected)
    g = torch.arange(12.0).view(3, 4)
    out.backward(g)
    # Σ_{I_p} g = 0 + 4 + 9 ; -Σ_{I_n} g = -(1 + 5)
    assert wp.grad.item() == 13.0 and wn.grad.item() == -6.0
    expected_gw = g * torch.tensor([[2.0, 3.0, 1, 1], [2.0, 3.0, 1, 1], [1, 2.0, 1, 1]])
    assert torch.equal(w.grad, expected_gw)


def test_exactly_three_values_and_sparsity_grows_with_t():
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    prev = -1.0
    for t in (0.0, 0.05, 0.15, 0.3, 0.6):
        q = TTQQuantizer(t=t, scale_init="ones")
        out = q(w)
        if t > 0:
            assert out.unique().numel() == 3
        expected = (w.abs() <= t * w.abs().max()).float().mean()
        torch.testing.assert_close(q.stats()["sparsity"], expected)
        assert q.stats()["sparsity"].item() > prev
        prev = q.stats()["sparsity"].item()
    # on the hand-made tensor: |W| <= 0.25 for 7 of 12 entries
    q = TTQQuantizer(t=0.25, scale_init="ones")
    q(W)
    assert q.stats()["sparsity"].item() == pytest.approx(7 / 12)
    assert q.stats()["threshold"].item() == pytest.approx(0.25)


def test_mean_init_is_lazy_and_persisted():
    q = TTQQuantizer(t=0.25)  # scale_init="mean"
    assert not bool(q.initialized)
    out = q(W)
    assert q.w_p.item() == pytest.approx((0.9 + 0.3 + 0.7) / 3)
    assert q.w_n.item() == pytest.approx((0.5 + 1.0) / 2)
    assert bool(q.initialized)
    torch.testing.assert_close(out.detach().unique(), torch.tensor([-0.75, 0.0, (0.9 + 0.3 + 0.7) / 3]))
    # a second forward does not re-initialise
    with torch.no_grad():
        q.w_p.fill_(5.0)
    q(W)
    assert q.w_p.item() == 5.0
    # a fresh quantizer loading the state does not re-initialise either
    q2 = TTQQuantizer(t=0.25)
    q2.load_state_dict(q.state_dict())
    q2(W)
    assert q2.w_p.item() == 5.0


def test_ones_init_matches_original():
    q = TTQQuantizer(t=0.25, scale_init="ones", mode="original")
    out = q(W)
    assert set(out.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_input_not_modified():
    w = W.clone().requires_grad_(True)
    before = w.detach().clone()
    version = w._version
    q = TTQQuantizer(t=0.1)
    q(w).sum().backward()
    assert torch.equal(w.detach(), before) and w._version == version


def test_requantize_cache_and_codes():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    q = TTQQuantizer(t=0.1)
    wq = q.requantize(w)
    assert bool(q.cache_valid)
    assert torch.equal(wq, q(w).detach())
    codes = q.ternary_codes(w)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(torch.where(codes > 0, q.w_p, torch.where(codes < 0, -q.w_n, 0.0)).detach(), wq)

    # eval without grad returns the cache (the train-mode forward above invalidated it) ...
    assert not bool(q.cache_valid)
    q.eval()
    q.requantize(w)
    with torch.no_grad():
        assert q(w) is q.weight_q
    # ... but never a stale one: an in-place update of the latent weight invalidates it
    with torch.no_grad():
        w.mul_(-1)
        out = q(w)
    assert out is not q.weight_q
    assert torch.equal(out, ttq_quantize(w, q.w_p, q.w_n, t=0.1).detach())
    assert not torch.equal(out, wq)
    # a train-mode forward clears the flag
    q.requantize(w)
    q.train()
    q(w)
    assert not bool(q.cache_valid)


def test_requantize_in_inference_mode_then_train():
    w = torch.nn.Parameter(W.clone())
    q = TTQQuantizer(t=0.25)
    with torch.inference_mode():
        q.requantize(w)
    with torch.no_grad():
        q.requantize(w)  # must not fail on an inference-mode buffer
    q(w).sum().backward()
    assert q.w_p.grad is not None


def test_state_dict_roundtrip_with_weight_q():
    w = torch.nn.Parameter(W.clone())
    q = TTQQuantizer(t=0.25)
    q.requantize(w)
    sd = q.state_dict()
    assert set(sd) == {"w_p", "w_n", "initialized", "cache_valid", "weight_q"}
    q2 = TTQQuantizer(t=0.25)
    q2.load_state_dict(sd)
    assert torch.equal(q2.weight_q, q.weight_q)


def test_contract_bits_and_errors():
    q = TTQQuantizer()
    assert q.bits == 2
    assert all(v.dim() == 0 for v in q.stats().values())
    with pytest.raises(ConfigError):
        TTQQuantizer(t=1.5)
    with pytest.raises(ConfigError):
        TTQQuantizer(mode="bogus")
    with pytest.raises(ConfigError):
        TTQQuantizer(scale_init="zeros")


def test_cache_buffers_are_optional_on_load():
    w = torch.nn.Parameter(W.clone())
    q = TTQQuantizer(t=0.25)
    q.requantize(w)
    sd = {k: v for k, v in q.state_dict().items() if k not in TTQQuantizer.cache_buffers}
    q2 = TTQQuantizer(t=0.25)
    q2.load_state_dict(sd)  # strict: the cache may be absent
    assert not bool(q2.cache_valid) and bool(q2.initialized)
    torch.testing.assert_close(q2(w), q(w))
