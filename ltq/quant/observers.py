"""Range observers: estimate ``[min_val, max_val]`` of a tensor stream for uniform quantization.

Contract (like ``torch.ao.quantization.observer``): an observer is an ``nn.Module`` whose
``forward(x)`` records statistics of ``x`` (without gradient) and returns ``x`` unchanged; its state
lives in buffers so that it is saved in checkpoints:

* ``min_val``, ``max_val`` — the current range estimate; 0-dim per tensor, ``(C,)`` per channel
  (per-channel buffers start empty and take their size from the first tensor, and are resized
  when a checkpoint is loaded);
* ``initialized`` — uint8 flag, 0 until the first batch (no ``±inf`` sentinels, which would poison
  a moving average);
* ``num_batches`` — number of batches observed.

Every observer computes a *batch statistic* ``(lo, hi)`` and merges it into the running state:

=============================  =================================  ===============================
observer                       batch statistic                    merge across batches
=============================  =================================  ===============================
:class:`MinMaxObserver`        min / max                          running min / max (or replace:
                                                                  ``running=False``, "current")
:class:`MovingAverageMinMax…`  min / max                          EMA ``r ← r + c·(batch − r)``
:class:`PercentileObserver`    p-th percentile (of x or of |x|)   EMA
:class:`MSEObserver`           clip range minimising ‖x̂ − x‖²     EMA
=============================  =================================  ===============================

The first batch initialises the state. With ``averaging_constant=None`` the EMA becomes the plain
running mean, ``c = 1/n`` for the n-th batch.

Distributed data parallel: when ``torch.distributed`` is initialised with more than one rank,
each batch statistic is all-reduced where it is computed (:func:`_sync`): MIN for minima, MAX for
maxima (so min/max-based observers hold exactly the statistic of the global batch), AVG for
percentile and MSE ranges (which do not decompose; their mean over ranks is used). Every rank
therefore holds the same observer state. The merge code is written with ``torch.where`` so the
update never reads a value back to the host.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ltq.errors import ConfigError, check_choice

__all__ = [
    "ObserverBase",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
]


def _sync(t: Tensor, op: str) -> Tensor:
    """All-reduce a batch statistic across DDP ranks; identity when not distributed.

    ``op`` is ``"min"``, ``"max"`` or ``"avg"`` (sum / world size; works on gloo and NCCL).
    Returns a new tensor (the input is not modified).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size()
    if world == 1:
        return t
    t = t.detach().clone().contiguous()
    if op == "min":
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    elif op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    elif op == "avg":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / world
    else:
        raise ValueError(f"_sync op={op!r}; allowed: min, max, avg")
    return t


def _subsample(rows: Tensor, max_samples: int, min_per_row: int = 1) -> Tensor:
    """Deterministic strided subsample of a ``[R, N]`` tensor along dim 1.

    Keeps every k-th column with k chosen so that about ``max_samples`` elements remain in total
    (but at least ``min_per_row`` per row, when available).
    """
    r, n = rows.shape
    budget = max(max_samples // max(r, 1), min(n, min_per_row), 1)
    if n <= budget:
        return rows
    step = math.ceil(n / budget)
    return rows[:, ::step]


class ObserverBase(nn.Module):
    """Shared machinery: buffers, reshaping into channel rows, merging, checkpoint resize."""

    def __init__(self, per_channel: bool = False, ch_axis: int = 0, sync: bool = True):
        super().__init__()
        self.per_channel = bool(per_channel)
        self.ch_axis = int(ch_axis)
        self.sync = bool(sync)
        shape = (0,) if self.per_channel else ()
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    # -- helpers -----------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        """View ``x`` as float ``[R, N]``: one row per channel, or a single row per tensor."""
        if not self.per_channel:
            return x.reshape(1, -1).float()
        if x.dim() < 2:
            raise ConfigError(
                f"per_channel=True needs a tensor with at least 2 dims (got shape {tuple(x.shape)}); "
                "allowed: per_channel=False for 0-d/1-d tensors"
            )
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ConfigError(f"ch_axis={self.ch_axis} is out of range for a {x.dim()}-d tensor; allowed: 0..{x.dim() - 1}")
        return x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1).float()

    def _out(self, t: Tensor) -> Tensor:
        """``[R]`` row statistic → buffer shape (0-dim per tensor)."""
        return t if self.per_channel else t.reshape(())

    def _sync(self, t: Tensor, op: str) -> Tensor:
        return _sync(t, op) if self.sync else t

    def _prepare(self, lo: Tensor) -> Tensor:
        """Resize the buffers on the first per-channel batch; return the 'initialized' mask."""
        if self.min_val.shape != lo.shape:
            self.min_val.resize_(lo.shape)
            self.max_val.resize_(lo.shape)
            self.initialized.zero_()
            self.num_batches.zero_()
        return self.initialized.bool()

    def _ema(self, lo: Tensor, hi: Tensor, averaging_constant: float | None) -> None:
        """EMA merge ``r ← r + c·(batch − r)``; first batch initialises; c=None → running mean."""
        init = self._prepare(lo)
        if averaging_constant is None:
            c = 1.0 / (self.num_batches.to(lo.dtype) + 1.0)
        else:
            c = averaging_constant
        new_lo = torch.where(init, self.min_val + c * (lo - self.min_val), lo)
        new_hi = torch.where(init, self.max_val + c * (hi - self.max_val), hi)
        self._store(new_lo, new_hi)

    def _store(self, lo: Tensor, hi: Tensor) -> None:
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.initialized.fill_(1)
        self.num_batches.add_(1)

    # -- contract ----------------------------------------------------------------------------
    def batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (already DDP-synchronised) statistic ``(lo, hi)`` of one batch; ``[R]`` each."""
        raise NotImplementedError

    def merge(self, lo: Tensor, hi: Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        lo, hi = self.batch_range(x.detach())
        self.merge(self._out(lo), self._out(hi))
        return x

    def calculate_range(self) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def reset(self) -> None:
        """Forget everything observed so far."""
        self.initialized.zero_()
        self.num_batches.zero_()
        self.min_val.zero_()
        self.max_val.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel buffers are created empty: take the checkpoint's size (in place, so DDP's
        # references to the buffer objects stay valid)
        for name in ("min_val", "max_val"):
            key = prefix + name
            buf = getattr(self, name)
            if key in state_dict and buf.shape != state_dict[key].shape:
                buf.resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        gran = f"per_channel(axis={self.ch_axis})" if self.per_channel else "per_tensor"
        return f"{gran}, sync={self.sync}"


class MinMaxObserver(ObserverBase):
    """Running minimum and maximum over every batch seen (``running=True``), or the min/max of
    the latest batch only (``running=False``, the ``"current"`` observer, suited to weights that
    move during training)."""

    def __init__(self, per_channel: bool = False, ch_axis: int = 0, sync: bool = True, running: bool = True):
        super().__init__(per_channel, ch_axis, sync)
        self.running = bool(running)

    def batch_range(self, x):
        lo, hi = torch.aminmax(self._rows(x), dim=1)
        return self._sync(lo, "min"), self._sync(hi, "max")

    def merge(self, lo, hi):
        init = self._prepare(lo)
        if self.running:
            lo = torch.where(init, torch.minimum(self.min_val, lo), lo)
            hi = torch.where(init, torch.maximum(self.max_val, hi), hi)
        self._store(lo, hi)


class MovingAverageMinMaxObserver(ObserverBase):
    """Exponential moving average of the batch min/max: ``r ← r + c·(batch − r)``.

    The first batch initialises ``r``. The batch min/max are reduced with MIN/MAX across DDP
    ranks, so the state equals that of one process seeing the global batch.
    """

    def __init__(
        self, per_channel: bool = False, ch_axis: int = 0, sync: bool = True, averaging_constant: float | None = 0.01
    ):
        super().__init__(per_channel, ch_axis, sync)
        _check_constant(averaging_constant)
        self.averaging_constant = averaging_constant

    def batch_range(self, x):
        lo, hi = torch.aminmax(self._rows(x), dim=1)
        return self._sync(lo, "min"), self._sync(hi, "max")

    def merge(self, lo, hi):
        self._ema(lo, hi, self.averaging_constant)

    def extra_repr(self):
        return super().extra_repr() + f", averaging_constant={self.averaging_constant}"


class PercentileObserver(ObserverBase):
    """Per-batch percentile range, merged by EMA.

    ``mode="two_sided"``: ``lo = Q(x, 1 − p)``, ``hi = Q(x, p)``.
    ``mode="abs"`` (symmetric quantizers): ``a = Q(|x|, p)``, ``lo = max(min x, −a)``,
    ``hi = min(max x, a)``. ``Q`` is ``torch.quantile`` (linear interpolation) on a deterministic
    strided subsample of at most ``max_samples`` elements. The range never exceeds the batch
    min/max.
    """

    def __init__(
        self,
        per_channel: bool = False,
        ch_axis: int = 0,
        sync: bool = True,
        percentile: float = 99.99,
        mode: str = "two_sided",
        averaging_constant: float | None = 0.01,
        max_samples: int = 2**20,
    ):
        super().__init__(per_channel, ch_axis, sync)
        if not 0.0 < float(percentile) <= 100.0:
            raise ConfigError(f"percentile={percentile!r} is not supported; allowed: 0 < percentile <= 100")
        check_choice("mode", mode, ("two_sided", "abs"))
        _check_constant(averaging_constant)
        self.percentile = float(percentile)
        self.mode = mode
        self.averaging_constant = averaging_constant
        self.max_samples = int(max_samples)

    def batch_range(self, x):
        rows = _subsample(self._rows(x), self.max_samples)
        p = self.percentile / 100.0
        if self.mode == "abs":
            a = torch.quantile(rows.abs(), p, dim=1)
            mn, mx = torch.aminmax(rows, dim=1)
            lo, hi = torch.maximum(mn, -a), torch.minimum(mx, a)
        else:
            q = torch.quantile(rows, torch.tensor([1.0 - p, p], device=rows.device, dtype=rows.dtype), dim=1)
            lo, hi = q[0], q[1]
        return self._sync(lo, "avg"), self._sync(hi, "avg")

    def merge(self, lo, hi):
        self._ema(lo, hi, self.averaging_constant)

    def extra_repr(self):
        return super().extra_repr() + f", percentile={self.percentile}, mode={self.mode}"


class MSEObserver(ObserverBase):
    """Clipping range that minimises the L2 error of the b-bit fake quantization, merged by EMA.

    Per batch (and per channel): with ``[m, M]`` the batch min/max, try the ranges
    ``[α·m, α·M]`` for ``α ∈ {1, 1 − 1/K, …, 1/K}`` (``K = grid``), quantize the (subsampled)
    data with each and keep the α of smallest ``Σ (x̂ − x)²``. α = 1 (plain min/max) is tried
    first and wins ties, so on the data it saw the error is never larger than min/max's.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        signed: bool | None = None,
        narrow_range: bool = True,
        per_channel: bool = False,
        ch_axis: int = 0,
        sync: bool = True,
        grid: int = 100,
        averaging_constant: float | None = 0.01,
        max_samples: int = 2**16,
    ):
        super().__init__(per_channel, ch_axis, sync)
        from ltq.quant.uniform import check_bits

        check_bits(bits)
        if not isinstance(grid, int) or grid < 1:
            raise ConfigError(f"grid={grid!r} is not supported; allowed: integers >= 1")
        _check_constant(averaging_constant)
        self.bits = bits
        self.symmetric = bool(symmetric)
        self.signed = self.symmetric if signed is None else bool(signed)
        self.narrow_range = bool(narrow_range)
        self.grid = grid
        self.averaging_constant = averaging_constant
        self.max_samples = int(max_samples)

    def batch_range(self, x):
        from ltq.quant.uniform import qparams, quantize_dequantize

        rows = _subsample(self._rows(x), self.max_samples, min_per_row=1024)
        mn, mx = torch.aminmax(rows, dim=1)  # [R]
        alphas = torch.arange(self.grid, 0, -1, device=rows.device, dtype=rows.dtype) / self.grid  # 1 .. 1/K
        chunk = max(1, 2**22 // rows.numel())
        errs = []
        for i in range(0, self.grid, chunk):
            a = alphas[i : i + chunk, None]  # [k, 1]
            scale, zp, qmin, qmax = qparams(a * mn, a * mx, self.bits, self.symmetric, self.narrow_range, self.signed)
            xq = quantize_dequantize(rows, scale[..., None], zp[..., None], qmin, qmax)  # [k, R, N]
            errs.append((xq - rows).pow(2).sum(-1))  # [k, R]
        best = torch.cat(errs).argmin(0)  # first minimum → the largest α among ties
        alpha = alphas[best]
        return self._sync(alpha * mn, "avg"), self._sync(alpha * mx, "avg")

    def merge(self, lo, hi):
        self._ema(lo, hi, self.averaging_constant)

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}, grid={self.grid}"


def _check_constant(c) -> None:
    if c is not None and not 0.0 < float(c) <= 1.0:
        raise ConfigError(f"averaging_constant={c!r} is not supported; allowed: 0 < c <= 1, or None (running mean)")


OBSERVERS = ("minmax", "current", "ema", "percentile", "mse")


def make_observer(
    kind: str,
    *,
    per_channel: bool = False,
    ch_axis: int = 0,
    bits: int = 8,
    symmetric: bool = True,
    signed: bool | None = None,
    narrow_range: bool = True,
    averaging_constant: float | None = 0.01,
    percentile: float = 99.99,
    sync: bool = True,
) -> ObserverBase:
    """Build the observer named ``kind`` (one of :data:`OBSERVERS`) for a quantizer config."""
    check_choice("observer", kind, OBSERVERS)
    common = dict(per_channel=per_channel, ch_axis=ch_axis, sync=sync)
    if kind in ("minmax", "current"):
        return MinMaxObserver(running=kind == "minmax", **common)
    if kind == "ema":
        return MovingAverageMinMaxObserver(averaging_constant=averaging_constant, **common)
    if kind == "percentile":
        return PercentileObserver(
            percentile=percentile,
            mode="abs" if symmetric else "two_sided",
            averaging_constant=averaging_constant,
            **common,
        )
    return MSEObserver(
        bits=bits,
        symmetric=symmetric,
        signed=signed,
        narrow_range=narrow_range,
        averaging_constant=averaging_constant,
        **common,
    )
