"""Time the APoT quantizer against the memory-bound floor of the same tensor.

For a 512×512×3×3 weight (2.36 M elements) this prints the median time of forward+backward of

* the floors: ``w.clone() * 2`` forward and backward, and forward only (a few passes over memory),
* ``bucketize``: the reference projection (sorted levels + ``torch.bucketize`` on midpoints, an
  autograd straight-through wrapper with the same α-gradient),
* ``table``: :class:`ltq.quant.apot.APoTQuantizer` (the look-up-table projection),

for weights at 2/3/4/5 bits (cifar and imagenet variants) and activations, and the ratio of each
to the floors (median of per-round ratios; floors and candidate run alternately), then the
projection alone (forward) for the table and bucketize. Not part of the test suite. Run::

    python benchmarks/bench_apot_quantizer.py [--device cuda] [--repeats 30] [--shape 512,512,3,3]

On a small shared CPU, glibc returning large blocks to the OS on every free dominates the timings;
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=10000000000`` in the environment avoids it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ltq.quant.apot import APoTQuantizer, project_bucketize


def _once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(fn, floors, repeats: int, device: torch.device) -> tuple[float, list[float], list[float]]:
    """Median ms of ``fn``, median ms of each floor, and the median per-round ratio to each floor.

    ``fn`` and the floors run alternately, so a burst of load on a shared machine hits all alike.
    """
    for _ in range(3):
        fn()
        for f in floors:
            f()
    t_fn, t_floor, ratios = [], [[] for _ in floors], [[] for _ in floors]
    for _ in range(repeats):
        base = [_once(f, device) for f in floors]
        b = _once(fn, device)
        t_fn.append(b)
        for i, a in enumerate(base):
            t_floor[i].append(a)
            ratios[i].append(b / a)
    med = statistics.median
    return med(t_fn) * 1e3, [med(t) * 1e3 for t in t_floor], [med(r) for r in ratios]


def bucketize_quant(w: torch.Tensor, alpha: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Reference: normalised weight, clamp, bucketize projection, STE, with autograd."""
    std, mean = torch.std_mean(w.detach())
    z = (w - mean) / std
    u = (z / alpha).clamp(-1, 1)
    q = project_bucketize(u.detach().abs(), levels).copysign(u.detach())
    return (u + (q - u).detach()) * alpha


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shape", default="512,512,3,3")
    args = p.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.05).requires_grad_(True)
    g = torch.randn(shape, device=device)
    print(f"device={device} shape={shape} numel={w.numel()} threads={torch.get_num_threads()} torch={torch.__version__}")

    def floor_fn():
        y = w.clone() * 2
        y.backward(g)

    rows = []
    for variant in ("cifar", "imagenet"):
        for bits in (2, 3, 4, 5):
            q = APoTQuantizer(bits, signed=True, variant=variant).to(device)

            def fn(q=q):
                q(w).backward(g)

            rows.append((f"weight {bits}b {variant} (table)", fn))
    for bits in (2, 3, 4, 5):
        q = APoTQuantizer(bits, signed=True, variant="cifar").to(device)
        alpha = torch.tensor(3.0, device=device, requires_grad=True)

        def fn(q=q, alpha=alpha):
            bucketize_quant(w, alpha, q.levels).backward(g)

        rows.append((f"weight {bits}b cifar (bucketize)", fn))
    x = torch.relu(torch.randn(shape, device=device)).requires_grad_(True)
    for bits in (2, 3, 4, 5):
        q = APoTQuantizer(bits, signed=False, variant="cifar").to(device)

        def fn(q=q):
            q(x).backward(g)

        rows.append((f"act {bits}b (table)", fn))
    def floor_fwd():
        w.detach().clone() * 2

    print("ratios: median over rounds of (time / floor), the floors measured in the same round:")
    print("  f+b floor = w.clone()*2 forward + backward;  fwd floor = w.clone()*2 forward only")
    print(f"{'forward+backward':34s} {'ms':>8s} {'f+b floor':>9s} {'ratio':>6s} {'fwd floor':>9s} {'ratio':>6s}")
    for name, fn in rows:
        t, (b_fb, b_f), (r_fb, r_f) = compare(fn, [floor_fn, floor_fwd], args.repeats, device)
        print(f"{name:34s} {t:8.3f} {b_fb:9.3f} {r_fb:5.1f}x {b_f:9.3f} {r_f:5.1f}x")

    # forward only: the projection onto the levels, table vs bucketize (4-bit weight levels)
    print("projection only, forward (|x| <= 1, the 4-bit weight levels B=3):")
    from ltq.quant.apot import build_levels, level_table

    a = torch.rand(shape, device=device) * 2 - 1
    levels = build_levels(3, "apot").to(device)
    tab = level_table(3, "apot")
    for name, fn in (("table", lambda: tab.project(a)), ("bucketize", lambda: project_bucketize(a, levels))):
        t, (b_f,), (r_f,) = compare(fn, [floor_fwd], args.repeats, device)
        print(f"  {name:32s} {t:8.3f} ms  fwd floor {b_f:.3f} ms  {r_f:5.1f}x")


if __name__ == "__main__":
    main()
