"""Quantizer forward+backward time relative to a clone+multiply of the same tensor.

Each of ltq's weight quantizers is applied to a 512x512x3x3 weight tensor (the largest ResNet-18
conv), forward and backward, and compared to `(w.clone() * 1.0001)` forward+backward on the same
tensor, measured alternately in one run. Reports medians and ratios.

    python benchmarks/bench_quantizers.py [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def quantizers():
    from ltq.quant import UniformQuantizer

    out = [
        ("uniform 8-bit per-channel", lambda: UniformQuantizer(8, per_channel=True, observer="current") if _has_current() else UniformQuantizer(8, per_channel=True)),
        ("uniform 4-bit per-tensor", lambda: UniformQuantizer(4)),
    ]
    try:
        from ltq.quant.ttq import TTQQuantizer

        out.append(("ttq", lambda: TTQQuantizer()))
    except ImportError:
        pass
    try:
        from ltq.quant.apot import APoTQuantizer

        for b in (2, 3, 4, 5):
            out.append((f"apot {b}-bit", lambda b=b: APoTQuantizer(b, signed=True)))
    except ImportError:
        pass
    from ltq.quant.binary import BWNWeightQuantizer, DoReFaWeightQuantizer

    out += [("bwn", lambda: BWNWeightQuantizer()), ("dorefa 1-bit", lambda: DoReFaWeightQuantizer(1))]
    return out


def _has_current() -> bool:
    from ltq.quant.observers import OBSERVERS

    return "current" in OBSERVERS


def timed(fn, w) -> float:
    t = time.perf_counter()
    out = fn(w)
    out.sum().backward()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = (torch.randn(512, 512, 3, 3) * 0.05).requires_grad_(True)
    baseline = lambda t: t.clone() * 1.0001  # noqa: E731
    print(f"512x512x3x3 weight, forward+backward, {args.threads} threads, median of {args.repeats}")
    print(f"{'quantizer':28s} {'ms':>8s} {'clone*mul ms':>13s} {'ratio':>6s}")
    for name, make in quantizers():
        q = make()
        q.train()
        for _ in range(3):
            timed(q, w), timed(baseline, w)
        qt, bt = [], []
        for _ in range(args.repeats):
            qt.append(timed(q, w))
            bt.append(timed(baseline, w))
        mq, mb = statistics.median(qt), statistics.median(bt)
        print(f"{name:28s} {1000 * mq:8.2f} {1000 * mb:13.2f} {mq / mb:6.1f}")


if __name__ == "__main__":
    main()
