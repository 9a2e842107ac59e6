"""Real int8 (torch.ao FX, x86 engine) against fp32 inference on the CPU, side by side.

For ResNet-20 (3×32×32) and the TFLite-style CNN (1×28×28), at batch 1 and 64, this prints the
median latency of

* ``fp32``: the float network with BatchNorm folded into the convs (the fair float baseline),
* ``int8``: the converted model (:class:`ltq.export.AoX86Backend`) of the same network after
  8-bit PTQ with the layer policy of the model's PTQ/QAT configs (``--policy config``): ResNet-20
  keeps its first conv and last Linear float (``configs/ptq/resnet20_cifar10.yaml``), the CNN
  is int8 throughout like its TFLite-style original (``configs/ptq/cnn_fashionmnist.yaml``);
  ``--policy all`` / ``skip`` quantizes / keeps float the first and last layer of both,
* ``ts``: both traced to TorchScript (the int8 one is the file ``ltq export --format int8`` writes),

and the speed-ups ``fp32 / int8`` (eager and TorchScript) as the median of per-round ratios (fp32 and int8 run
alternately in each round, so load bursts on a shared machine hit both). Weights are random
(speed does not depend on them) unless ``--ckpt BACKBONE=PATH`` gives an FP checkpoint; PTQ is
calibrated on random inputs. ``torch.set_num_threads(--threads)`` (default 2).

    python benchmarks/bench_int8.py [--threads 2] [--repeats 30] [--policy config|all|skip]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import torch

from ltq.export import get_backend, quiet_ao
from ltq.models import build_backbone
from ltq.nn import quantize_model, set_fake_quant_enabled, set_observers_enabled, uniform_policy
from ltq.quant.fold import fold_bn

MODELS = {"resnet20": (3, 32, 32), "cnn": (1, 28, 28)}
# The PTQ config whose layer policy --policy config follows, per model.
PTQ_CONFIGS = {"resnet20": "configs/ptq/resnet20_cifar10.yaml", "cnn": "configs/ptq/cnn_fashionmnist.yaml"}


def config_all_layers(name: str) -> bool:
    """Does the model's PTQ config quantize its first conv and last Linear too (skip_first/skip_last false)?"""
    import yaml

    path = Path(__file__).resolve().parents[1] / PTQ_CONFIGS[name]
    init = yaml.safe_load(path.read_text())["model"]["init_args"]
    return not init.get("skip_first", True) and not init.get("skip_last", True)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(base, cand, repeats: int, warmup: int = 5) -> tuple[float, float, float]:
    """Median seconds of ``base`` and ``cand`` and the median of per-round ``base/cand`` ratios."""
    for _ in range(warmup):
        base()
        cand()
    tb, tc, ratios = [], [], []
    for _ in range(repeats):
        a, b = _time(base), _time(cand)
        tb.append(a)
        tc.append(b)
        ratios.append(a / b)
    return statistics.median(tb), statistics.median(tc), statistics.median(ratios)


def build(name: str, ckpt: str | None, all_layers: bool):
    shape = MODELS[name]
    torch.manual_seed(0)
    fp = build_backbone(name, 10, shape[0]).eval()
    if ckpt:
        from ltq.methods.base import load_state_dict_file

        fp.load_state_dict(load_state_dict_file(ckpt))
    fp32 = fold_bn(fp).eval()
    q = quantize_model(
        fold_bn(fp), uniform_policy(8, 8, act_observer="minmax", skip_first=not all_layers, skip_last=not all_layers)
    ).eval()
    calib = [torch.randn(32, *shape) for _ in range(4)]
    set_fake_quant_enabled(q, False)
    with torch.no_grad():
        for x in calib:
            q(x)
    set_observers_enabled(q, False)
    set_fake_quant_enabled(q, True)
    backend = get_backend("ao_x86")
    int8 = backend.convert(q, calib=calib)
    buf = io.BytesIO()
    with quiet_ao(), torch.no_grad():
        traced = torch.jit.trace(int8, calib[0][:1], check_trace=False)
        torch.jit.save(traced, buf)
        fp32_ts = torch.jit.trace(fp32, calib[0][:1], check_trace=False)
    fbuf = io.BytesIO()
    torch.save(fp32.state_dict(), fbuf)
    return fp32, int8, fp32_ts, traced, shape, buf.getbuffer().nbytes, fbuf.getbuffer().nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--models", default="resnet20,cnn")
    p.add_argument("--policy", choices=("config", "all", "skip"), default="config",
                   help="first conv / last Linear: as the model's configs, all int8, or kept float")
    p.add_argument("--ckpt", action="append", default=[], help="BACKBONE=PATH of an FP checkpoint (optional)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpts = dict(c.split("=", 1) for c in args.ckpt)
    print(f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}, threads {torch.get_num_threads()}")
    print(f"{'model':10s} {'batch':>5s} {'fp32 ms':>9s} {'int8 ms':>9s} {'speed-up':>8s}   {'fp32 ts ms':>10s} {'int8 ts ms':>10s} "
          f"{'speed-up':>8s} {'max|fp32-int8|':>14s}")  # fmt: skip
    for name in args.models.split(","):
        all_layers = config_all_layers(name) if args.policy == "config" else args.policy == "all"
        fp32, int8, fp32_ts, traced, shape, ts_bytes, fp_bytes = build(name, ckpts.get(name), all_layers)
        for bs in (int(b) for b in args.batches.split(",")):
            x = torch.randn(bs, *shape)
            with torch.inference_mode(), quiet_ao():
                diff = (fp32(x) - int8(x)).abs().max().item()
                tf, ti, r = compare(lambda: fp32(x), lambda: int8(x), args.repeats)
                tft, tt, rt = compare(lambda: fp32_ts(x), lambda: traced(x), args.repeats)
            print(f"{name:10s} {bs:>5d} {tf * 1e3:>9.3f} {ti * 1e3:>9.3f} {r:>8.2f}x  {tft * 1e3:>10.3f} {tt * 1e3:>10.3f} "
                  f"{rt:>8.2f}x {diff:>14.3g}")  # fmt: skip
        print(f"{'':10s} {'all layers int8' if all_layers else 'first conv + last Linear float'}; "
              f"size: fp32 state_dict {fp_bytes / 1024:.1f} KiB, int8 TorchScript {ts_bytes / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
