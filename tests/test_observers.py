"""Observers: hand-computed min/max/EMA, percentile/MSE ranges, DDP synchronisation (gloo)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltq.errors import ConfigError
from ltq.quant import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    qparams,
    quantize_dequantize,
)
from ltq.quant.observers import _subsample


def test_minmax_across_batches():
    obs = MinMaxObserver()
    assert obs.initialized.item() == 0
    obs(torch.tensor([1.0, 2.0, -3.0]))
    obs(torch.tensor([5.0, 0.0]))
    obs(torch.tensor([0.5]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-3.0, 5.0)
    assert obs.num_batches.item() == 3
    cur = MinMaxObserver(running=False)
    cur(torch.tensor([1.0, 2.0, -3.0]))
    cur(torch.tensor([5.0, 0.0]))
    assert (cur.min_val.item(), cur.max_val.item()) == (0.0, 5.0)


def test_minmax_per_channel_axis1():
    obs = MinMaxObserver(per_channel=True, ch_axis=1)
    x = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    obs(x)
    assert obs.min_val.tolist() == [1.0, -2.0, -6.0]
    assert obs.max_val.tolist() == [4.0, 5.0, 3.0]


def test_ema_after_three_batches():
    c = 0.5
    obs = MovingAverageMinMaxObserver(averaging_constant=c)
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 4.0]), torch.tensor([0.0, 10.0])]
    for b in batches:
        obs(b)
    lo = -1.0
    hi = 2.0
    for b in batches[1:]:
        lo = lo + c * (b.min().item() - lo)
        hi = hi + c * (b.max().item() - hi)
    assert obs.min_val.item() == pytest.approx(lo)  # -1 → -2 → -1
    assert obs.max_val.item() == pytest.approx(hi)  # 2 → 3 → 6.5
    assert (lo, hi) == (-1.0, 6.5)


def test_ema_running_mean_and_per_channel():
    obs = MovingAverageMinMaxObserver(per_channel=True, averaging_constant=None)
    obs(torch.tensor([[0.0, 1.0], [0.0, 3.0]]))
    obs(torch.tensor([[0.0, 3.0], [0.0, 5.0]]))
    obs(torch.tensor([[0.0, 5.0], [-3.0, 7.0]]))
    assert obs.max_val.tolist() == pytest.approx([3.0, 5.0])  # mean of the batch maxima
    assert obs.min_val.tolist() == pytest.approx([0.0, -1.0])


def test_percentile_range_within_minmax():
    torch.manual_seed(0)
    x = torch.randn(20000)
    mm = MinMaxObserver()
    mm(x)
    for mode in ("two_sided", "abs"):
        p = PercentileObserver(percentile=99.0, mode=mode)
        p(x)
        assert mm.min_val <= p.min_val < 0 < p.max_val <= mm.max_val
        assert p.max_val < 0.75 * mm.max_val
    p = PercentileObserver(percentile=99.0)
    p(x)
    assert p.max_val.item() == pytest.approx(torch.quantile(x, 0.99).item())
    full = PercentileObserver(percentile=100.0)
    full(x)
    assert (full.min_val, full.max_val) == (mm.min_val, mm.max_val)


def test_percentile_per_channel_and_subsample():
    torch.manual_seed(0)
    w = torch.randn(4, 1000) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    p = PercentileObserver(per_channel=True, percentile=99.9, mode="abs", max_samples=400)
    p(w)
    assert p.max_val.shape == (4,)
    sub = _subsample(w, 400)
    assert sub.shape == (4, 100) and torch.equal(sub, _subsample(w, 400))  # deterministic, strided
    assert torch.equal(sub[:, 1], w[:, 10])
    a = torch.quantile(sub.abs(), 0.999, dim=1)
    torch.testing.assert_close(p.max_val, torch.minimum(a, sub.amax(1)))
    torch.testing.assert_close(p.min_val, torch.maximum(-a, sub.amin(1)))
    assert (p.max_val <= w.amax(1)).all()


def _mse(x, lo, hi, bits, symmetric):
    s, z, qmin, qmax = qparams(lo, hi, bits, symmetric=symmetric)
    return (quantize_dequantize(x, s, z, qmin, qmax) - x).pow(2).mean().item()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_on_heavy_tails(symmetric):
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((8000,))
    mm = MinMaxObserver()
    mm(x)
    mse = MSEObserver(bits=4, symmetric=symmetric)
    mse(x)
    assert mm.min_val <= mse.min_val and mse.max_val <= mm.max_val
    e_mse = _mse(x, mse.min_val, mse.max_val, 4, symmetric)
    e_mm = _mse(x, mm.min_val, mm.max_val, 4, symmetric)
    assert e_mse <= e_mm
    assert e_mse < 0.9 * e_mm  # heavy tails: clipping helps
    assert mse.max_val - mse.min_val < mm.max_val - mm.min_val


def test_mse_per_channel():
    torch.manual_seed(0)
    w = torch.randn(3, 200)
    w[0, 0] = 40.0  # one outlier in channel 0
    obs = MSEObserver(bits=4, per_channel=True)
    obs(w)
    assert obs.max_val[0] < 40.0
    for c in range(3):
        assert _mse(w[c], obs.min_val[c], obs.max_val[c], 4, True) <= _mse(w[c], w[c].min(), w[c].max(), 4, True)


def test_observer_validation_and_reset():
    with pytest.raises(ConfigError, match="mode"):
        PercentileObserver(mode="both")
    with pytest.raises(ConfigError, match="grid"):
        MSEObserver(grid=0)
    obs = MinMaxObserver()
    obs(torch.tensor([1.0]))
    obs.reset()
    assert obs.initialized.item() == 0
    obs(torch.tensor([-2.0]))
    assert obs.max_val.item() == -2.0


# ---------------------------------------------------------------------------------- DDP (gloo)


def _ddp_worker(rank, world, init_file, out_dir, data):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = data.shape[0] // world
        shard = data[rank * half : (rank + 1) * half]
        observers = {
            "minmax": MinMaxObserver(per_channel=True, ch_axis=1),
            "ema": MovingAverageMinMaxObserver(averaging_constant=0.5),
            "pct": PercentileObserver(percentile=99.0),
            "mse": MSEObserver(bits=4),
        }
        for step in range(2):
            for obs in observers.values():
                obs(shard + step)
        torch.save({k: (o.min_val, o.max_val) for k, o in observers.items()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_two_processes():
    torch.manual_seed(0)
    data = torch.randn(64, 3) * 3
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(2, init_file, tmp, data), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "r0.pt"))
        r1 = torch.load(os.path.join(tmp, "r1.pt"))
    # every rank holds identical state
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)
    # min/max based observers equal one process observing the global batch
    mm = MinMaxObserver(per_channel=True, ch_axis=1)
    ema = MovingAverageMinMaxObserver(averaging_constant=0.5)
    for step in range(2):
        mm(data + step)
        ema(data + step)
    torch.testing.assert_close(r0["minmax"], (mm.min_val, mm.max_val))
    torch.testing.assert_close(r0["ema"], (ema.min_val, ema.max_val))
