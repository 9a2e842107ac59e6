"""Training-step time of each method relative to full precision (ResNet-20, batch 128, CPU).

A step is what the Trainer does per batch: forward, backward, optimizer step and the method's
per-step callbacks (e.g. TTQ requantization), measured with a callback around each batch.
Methods are measured in interleaved rounds (FP, A, B, ..., FP, A, B, ...) so that machine noise
hits all of them alike; the table reports the median step time over rounds and the median over
rounds of the per-round ratio to FP (each ratio compares two measurements taken seconds apart).

    python benchmarks/bench_train_step.py [--rounds 3] [--steps 6] [--threads 2] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from lightning import Trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")

# (label, method key in ltq.methods.METHODS, kwargs)
CASES = [
    ("fp", "fp", {}),
    ("qat w8a8", "qat", {"w_bits": 8, "a_bits": 8}),
    ("qat w4a4", "qat", {"w_bits": 4, "a_bits": 4}),
    ("ttq", "ttq", {}),
    ("apot 4-bit", "apot", {"bits": 4}),
    ("apot 2-bit", "apot", {"bits": 2}),
    ("metaquant bwn+ste", "metaquant", {"forward": "bwn", "meta": "ste"}),
    ("metaquant bwn+lstmfc", "metaquant", {"forward": "bwn", "meta": "lstmfc"}),
    ("metaquant dorefa+fcgrad", "metaquant", {"forward": "dorefa", "meta": "fcgrad"}),
]


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


def measure(method: str, kwargs: dict, steps: int, batch: int) -> float:
    from ltq.methods import METHODS

    model = METHODS[method](backbone="resnet20", num_classes=10, in_channels=3, optimizer="sgd", lr=0.01, scheduler="none", **kwargs)
    data = TensorDataset(torch.randn(batch * (steps + 2), 3, 32, 32), torch.randint(0, 10, (batch * (steps + 2),)))
    timer = StepTimer()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps + 2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(data, batch_size=batch))
    return statistics.median(timer.times[2:])  # first two steps warm up (observer init, allocator)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from ltq.methods import METHODS

    cases = [c for c in CASES if c[1] in METHODS]
    results: dict[str, list[float]] = {c[0]: [] for c in cases}
    for _ in range(args.rounds):
        for label, method, kwargs in cases:
            results[label].append(measure(method, kwargs, args.steps, args.batch))
    fp = results["fp"]
    print(f"ResNet-20, batch {args.batch}, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'method':28s} {'step (ms)':>10s} {'x FP':>6s} {'(min-max over rounds)':>22s}")
    for label, _, _ in cases:
        ratios = [t / f for t, f in zip(results[label], fp)]
        t = statistics.median(results[label])
        print(f"{label:28s} {1000 * t:10.1f} {statistics.median(ratios):6.2f} {min(ratios):>14.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
