"""MetaQuant (Chen, Wang & Pan, NeurIPS 2019): a meta-network learns the gradient through the quantizer.

What the network computes
-------------------------
Every Conv2d and the final Linear — including the first conv and the 1×1 shortcut convs, as in
the original — get a weight quantizer (``skip_first``/``skip_last``/``overrides`` change that):
DoReFa k-bit (``forward="dorefa"``) or BWN binary (``forward="bwn"``), see
:mod:`ltq.quant.binary`. Activations, BatchNorm and biases stay in floating point.

How it is trained (``meta != "ste"``; Lightning manual optimization)
---------------------------------------------------------------------
The quantizer ``Ŵ = Q(W)`` has no useful gradient. Write ``W̃ = pre_quantize(W)`` (DoReFa's
tanh-normalised weight, BWN's ``W`` itself), ``g = dL/dŴ`` and ``c = calibration(W)`` (DoReFa:
``(1 − tanh²W)/max|tanh W|``, BWN: 1). For each quantized layer the module keeps, in buffers of
its :class:`~ltq.quant.meta.MetaWeightQuantizer`, the previous step's ``g_{t−1}`` and
``W̃_{t−1}``. One shared meta-network ``M_φ`` (:mod:`ltq.quant.meta`) produces the
meta-gradient, and training step ``t`` is (the paper's algorithm, the default):

1. ``meta_grad = M_φ(g_{t−1}, W̃_{t−1})``  (MultiFC/LSTMFC: ``g ⊙ M(W̃)``; FCGrad: ``M(g)``)
2. ``d = c(W_t) ⊙ meta_grad`` and the base optimizer's refinement ``r = π(d)`` (its state is
   advanced): SGD ``π(d) = d + wd·W`` with (Nesterov) momentum as ``torch.optim.SGD``; Adam
   ``π(d) = m̂/(√v̂ + ε)`` of ``d + wd·W`` (L2, as ``torch.optim.Adam``).
3. look-ahead weight ``W' = W_t − lr·[d + sg(r − d)]``: its value is ``W_t − lr·π(d)`` and its
   gradient path to φ is ``−lr·d`` (for SGD without Nesterov this is exact, ``dπ/dd = 1``;
   for Adam it is the paper's stop-gradient approximation that ignores the refinement's
   Jacobian).
4. forward with ``Ŵ = Q(W')``, loss, backward: gives ``dL/dφ`` (through the straight-through
   estimator of Q and the look-ahead), the new ``g_t`` (a tensor hook on Ŵ), ``W̃_t``, and the
   ordinary gradients of BN, biases and any float layers.
5. meta-optimizer step (Adam, ``meta_lr``); ``W_{t+1} ← W'`` (detached); the other parameters'
   gradients are clipped (``gradient_clip_val``) and the base optimizer steps them.

The very first step has no ``g_{t−1}``: it is a plain straight-through (STE) step for all
parameters. ``meta="ste"`` is plain STE training throughout (the baseline).

``original_update=True`` reproduces csyhhu/MetaQuant's code instead (needed for its numbers):
the first step updates nothing; at step t the look-ahead's *value* uses the previous step's
refined update ``W_t − lr·r_{t−1}`` (at step 2 the raw STE gradient) while its gradient path is
``−lr·d_t``; after the backward the weight is updated with ``W_{t+1} = W_t − lr·π(d_t)``, so
every weight update uses a meta-gradient one step stale with respect to the forward. (The
original's look-ahead of the quantized layers' biases is not reproduced.)

The meta-optimizer's lr follows the base schedule when ``meta_lr_follows_schedule`` (the paper:
γ is divided by 10 with the lr); the original code never decays it (set it to false).

Notes
-----
* Lightning forbids ``Trainer(gradient_clip_val=...)`` with manual optimization: use
  ``model.gradient_clip_val`` / ``model.gradient_clip_algorithm`` instead. They clip the
  ordinary gradients (BN, biases, float layers; all parameters with ``meta="ste"``), not the
  meta-gradients.
* LR schedulers are stepped once per epoch by this module; ``warmup_epochs`` is applied here too.
  ``trainer.global_step`` counts training batches (the meta-optimizer steps are not counted).
* Checkpoints hold the meta-network, the LSTM hidden states, ``g_{t−1}``/``W̃_{t−1}`` and both
  optimizers' states; resume continues exactly. LSTMFC's hidden states are ``2·numel·hidden``
  floats (≈ 216 MB for ResNet-20 with hidden 100) and are saved in every checkpoint.
* DDP: ``g_{t−1}`` is averaged over ranks; the meta-network is unused at the first step, so use
  ``strategy: ddp_find_unused_parameters_true``. ``precision: 16-mixed`` (loss scaling would
  scale the hooked gradients) is not supported; use ``bf16-mixed`` or 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ltq.errors import ConfigError, check_choice
from ltq.methods.base import Classifier
from ltq.nn import QuantPolicy, iter_quant_layers, quantize_model
from ltq.quant.binary import BWNWeightQuantizer, DoReFaWeightQuantizer
from ltq.quant.meta import META_NETS, MetaWeightQuantizer, build_meta_net

__all__ = ["MetaQuant", "MetaQuantWeightFactory", "FORWARDS"]

FORWARDS = ("dorefa", "bwn")
META_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class MetaQuantWeightFactory:
    """Picklable ``(name, layer, bits) -> weight quantizer`` for :func:`~ltq.nn.quantize_model`.

    Builds DoReFa/BWN; wrapped in a :class:`~ltq.quant.meta.MetaWeightQuantizer` when a
    meta-network is trained (``meta=True``).
    """

    forward: str = "dorefa"
    per_channel: bool = False
    meta: bool = True

    def __call__(self, name: str, module: nn.Module, bits: int) -> nn.Module:
        if self.forward == "dorefa":
            q: nn.Module = DoReFaWeightQuantizer(bits)
        else:
            q = BWNWeightQuantizer(bits, per_channel=self.per_channel, out_channels=module.weight.shape[0])
        return MetaWeightQuantizer(q, module.weight.shape) if self.meta else q

    def to_dict(self) -> dict:
        return {"type": "metaquant", "forward": self.forward, "per_channel": self.per_channel, "meta": self.meta}


class MetaQuant(Classifier):
    """MetaQuant training of DoReFa/BWN low-bit weights (see the module docstring for the maths).

    Args:
        forward: forward quantizer, ``dorefa`` (k-bit, no scale) | ``bwn`` (α·sign, 1 bit).
        meta: backward, ``ste`` (baseline) | ``multifc`` | ``fcgrad`` | ``lstmfc``.
        bits: weight bits k (DoReFa: any k ≥ 1; BWN: 1).
        per_channel: BWN with one α per output filter ("BWN-F").
        meta_hidden: meta-network width / LSTM hidden size.
        meta_num_layers: number of Linear layers of MultiFC (original: 3).
        nonlinear: MultiFC/FCGrad activation ``None`` (original; they are then scalar
            multipliers) | ``relu`` | ``tanh``.
        meta_lr, meta_weight_decay: the meta-network's Adam optimizer.
        meta_lr_follows_schedule: scale ``meta_lr`` like the base lr (paper); false: constant
            (original code).
        original_update: reproduce the original code's stale look-ahead and skipped first update.
        skip_first, skip_last, overrides: quantization policy (default: every conv and the FC
            are quantized); ``overrides`` as in :class:`~ltq.nn.QuantPolicy`.
        gradient_clip_val, gradient_clip_algorithm (``norm`` | ``value``): clipping of the
            ordinary gradients (Trainer clipping is not available with manual optimization).
        optimizer: base optimizer ``sgd`` | ``adam``; lr, momentum, weight_decay, ... as in
            :class:`~ltq.methods.base.Classifier`. ``weight_decay=None`` picks the original
            recipe: 5e-4 for Adam with a meta-network, 0 otherwise.
    """

    method_name = "metaquant"

    def __init__(
        self,
        forward: str = "dorefa",
        meta: str = "multifc",
        bits: int = 1,
        per_channel: bool = False,
        meta_hidden: int = 100,
        meta_num_layers: int = 3,
        nonlinear: str | None = None,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 0.0,
        meta_lr_follows_schedule: bool = True,
        original_update: bool = False,
        skip_first: bool = False,
        skip_last: bool = False,
        overrides: dict[str, dict] | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        backbone: str = "resnet20",
        num_classes: int = 10,
        in_channels: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        betas: Sequence[float] = (0.9, 0.999),
        scheduler: str = "step",
        milestones: Sequence[int] = (30, 60, 90),
        gamma: float = 0.1,
        step_size: int = 30,
        t_max: int | None = None,
        plateau_patience: int = 4,
        plateau_threshold: float = 0.01,
        warmup_epochs: int = 0,
        param_groups: list[dict[str, Any]] | None = None,
        fp_checkpoint: str | None = None,
        freeze: list[str] | None = None,
    ) -> None:
        # ---- validate the MetaQuant options before the backbone is built
        if isinstance(forward, str):
            forward = forward.lower()
        check_choice("model.forward", forward, FORWARDS)
        if isinstance(meta, str):
            meta = meta.lower().replace("-", "").replace("_", "")
        check_choice("model.meta", meta, META_NETS)
        check_choice("model.optimizer", optimizer, META_OPTIMIZERS)
        check_choice("model.gradient_clip_algorithm", gradient_clip_algorithm, ("norm", "value"))
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ConfigError(f"model.bits={bits!r} is not supported by MetaQuant; allowed: an integer >= 1")
        if forward == "bwn" and bits != 1:
            raise ConfigError(f"model.bits={bits!r} is not supported by forward='bwn'; allowed: 1 (use forward='dorefa' for k-bit weights)")
        if not (isinstance(meta_lr, (int, float)) and meta_lr > 0 and math.isfinite(meta_lr)):
            raise ConfigError(f"model.meta_lr={meta_lr!r} must be a positive number")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ConfigError(f"model.gradient_clip_val={gradient_clip_val!r} must be a positive number or null")
        if weight_decay is None:  # the original recipe
            weight_decay = 5e-4 if (optimizer == "adam" and meta != "ste") else 0.0
        super().__init__(
            backbone=backbone, num_classes=num_classes, in_channels=in_channels, backbone_kwargs=backbone_kwargs,
            optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas,
            scheduler=scheduler, milestones=milestones, gamma=gamma, step_size=step_size, t_max=t_max,
            plateau_patience=plateau_patience, plateau_threshold=plateau_threshold, warmup_epochs=warmup_epochs,
            param_groups=param_groups, fp_checkpoint=fp_checkpoint, freeze=freeze,
        )
        self.automatic_optimization = False
        # the recorded hyper-parameters hold the values actually used (LightningCLI records the
        # config's values, e.g. weight_decay: null, which the optimizer builders cannot use)
        self.hparams.update(forward=forward, meta=meta, weight_decay=weight_decay)
        # (ConfigError for bad meta_hidden / nonlinear comes from build_meta_net)
        self.meta_net = build_meta_net(meta, hidden=meta_hidden, num_layers=meta_num_layers, nonlinear=nonlinear)
        self._ready: bool | None = None  # all layers hold g_{t-1}; None = read the buffers once
        self._base_lr0: float | None = None

    # ------------------------------------------------------------------ model surgery
    def quantize(self, model: nn.Module) -> nn.Module:
        hp = self.hparams
        factory = MetaQuantWeightFactory(forward=hp.forward, per_channel=bool(hp.per_channel), meta=hp.meta != "ste")
        policy = QuantPolicy(
            weight=factory, act=None, w_bits=hp.bits, a_bits=None,
            skip_first=hp.skip_first, skip_last=hp.skip_last, overrides=dict(hp.overrides or {}),
        )
        return quantize_model(model, policy)

    def meta_layers(self) -> list[tuple[str, nn.Module, MetaWeightQuantizer]]:
        """``(name, layer, quantizer)`` of the layers whose weight is trained by the meta-network."""
        return [
            (name, layer, layer.weight_quantizer)
            for name, layer in iter_quant_layers(self.model)
            if isinstance(layer.weight_quantizer, MetaWeightQuantizer) and layer.weight.requires_grad
        ]

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.build_param_groups())
        self._base_lr0 = optimizer.param_groups[0]["lr"]
        optimizers = [optimizer]
        if self.meta_net is not None:
            optimizers.append(torch.optim.Adam(self.meta_net.parameters(), lr=self.hparams.meta_lr,
                                               weight_decay=self.hparams.meta_weight_decay))
        sched = self.make_scheduler(optimizer)
        if sched is None:
            return optimizers
        return optimizers, [sched]

    def _lr_ratio(self, opt: torch.optim.Optimizer) -> float:
        g0 = opt.param_groups[0]
        lr0 = g0.get("initial_lr", self._base_lr0 or g0["lr"])
        return g0["lr"] / lr0 if lr0 else 1.0

    def _apply_warmup(self, opt: torch.optim.Optimizer) -> None:
        # same rule as Classifier.optimizer_step, which manual optimization does not call
        warm = self.hparams.warmup_epochs
        n = self.trainer.num_training_batches
        if not warm or not n or n == float("inf"):
            return
        total, step = warm * n, self.trainer.global_step
        if step < total:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * (step + 1) / total
        elif step == total:
            for group in opt.param_groups:
                if "base_lr" in group:
                    group["lr"] = group.pop("base_lr")

    @staticmethod
    @torch.no_grad()
    def refine(optimizer: torch.optim.Optimizer, group: dict, p: Tensor, d: Tensor) -> Tensor:
        """The base optimizer's update direction π(d) for a gradient ``d`` of parameter ``p``
        (``p ← p − lr·π(d)``), advancing its state exactly as its own ``step()`` would.

        SGD: ``d + wd·p``, then momentum ``b ← μ·b + (1 − dampening)·d`` (first step ``b = d``),
        π = b, or ``d + μ·b`` with Nesterov. Adam: ``d + wd·p``, ``m ← β1·m + (1−β1)·d``,
        ``v ← β2·v + (1−β2)·d²``, π = ``m̂ / (√v̂ + ε)`` with bias corrections. The state uses
        torch's keys, so checkpoints and ``load_state_dict`` treat it as the optimizer's own.
        """
        state = optimizer.state[p]
        wd = group.get("weight_decay", 0.0)
        if group.get("maximize", False):
            d = -d
        if wd:
            d = d.add(p, alpha=wd)
        if isinstance(optimizer, torch.optim.SGD):
            mom = group.get("momentum", 0.0)
            if mom:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mom).add_(d, alpha=1 - group.get("dampening", 0.0))
                d = d.add(buf, alpha=mom) if group.get("nesterov", False) else buf.clone()
            return d
        if isinstance(optimizer, torch.optim.Adam):
            if group.get("amsgrad", False) or group.get("decoupled_weight_decay", False):
                raise ConfigError("MetaQuant supports torch.optim.Adam without amsgrad/decoupled weight decay")
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            state["step"] += 1
            step = float(state["step"])  # a CPU tensor: no device synchronisation
            state["exp_avg"].lerp_(d, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(d, d, value=1 - beta2)
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
            return (state["exp_avg"] / bc1) / denom
        raise ConfigError(f"MetaQuant cannot refine gradients for {type(optimizer).__name__}; allowed optimizers: sgd, adam")

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        if self.meta_net is not None and str(self.trainer.precision).startswith("16"):
            raise ConfigError(f"trainer.precision={self.trainer.precision!r} is not supported by MetaQuant with a meta-network; allowed: 32, bf16-mixed")

    def _clip(self, opt) -> None:
        if self.hparams.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val,
                                gradient_clip_algorithm=self.hparams.gradient_clip_algorithm)

    def _is_ready(self, layers) -> bool:
        if self._ready is None:  # once per fit (one host sync): resume continues the meta step
            self._ready = bool(layers) and all(bool(q.has_prev) for _, _, q in layers)
        return self._ready

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt = opts[0]
        base = opt.optimizer
        self._apply_warmup(base)

        if self.meta_net is None:  # the STE baseline: an ordinary training step
            loss = self.shared_step(batch, "train")
            opt.zero_grad()
            self.manual_backward(loss)
            self._clip(opt)
            opt.step()
            return loss

        meta_opt = opts[1]
        hp = self.hparams
        if hp.meta_lr_follows_schedule:
            for g in meta_opt.optimizer.param_groups:
                g["lr"] = hp.meta_lr * self._lr_ratio(base)
        self.log("train/meta_lr", meta_opt.optimizer.param_groups[0]["lr"], batch_size=_batch_size(batch))
        layers = self.meta_layers()
        group_of = {id(p): g for g in base.param_groups for p in g["params"]}
        layers = [entry for entry in layers if id(entry[1].weight) in group_of]
        ready = self._is_ready(layers)

        pending: list[tuple[nn.Module, MetaWeightQuantizer, Tensor, dict, Tensor]] = []
        opt.zero_grad()
        meta_opt.zero_grad()
        if ready:
            for name, layer, q in layers:
                w = layer.weight
                group = group_of[id(w)]
                lr = group["lr"]
                # clones: this step's forward/backward overwrite the buffers in place while the
                # meta-network's graph still holds its inputs
                meta_grad = self.meta_net(q.grad_prev.clone(), q.pre_weight_prev.clone(), name)
                d = q.calibration(w) * meta_grad
                if hp.original_update:
                    value = q.update_prev  # previous refined update (the STE gradient at step 2)
                else:
                    value = self.refine(base, group, w, d.detach())
                q.offset = -lr * (d + (value - d).detach())
                pending.append((layer, q, d, group, q.offset.detach()))
        try:
            loss = self.shared_step(batch, "train")
            self.manual_backward(loss)
        finally:
            for _, _, q in layers:
                q.offset = None

        self._sync_prev_grads(layers)
        if ready:
            # the raw optimizer: Lightning counts every LightningOptimizer.step() in global_step,
            # which must keep counting training batches (warm-up, max_steps, step-based callbacks)
            meta_opt.optimizer.step()
        with torch.no_grad():
            if not ready and hp.original_update:
                # the original's first iteration updates nothing; it only leaves W.grad behind
                for _, layer, q in layers:
                    if layer.weight.grad is not None:
                        q.update_prev.copy_(layer.weight.grad)
                opt.zero_grad(set_to_none=True)
                opt.step()  # no gradients: changes nothing, but counts the batch in global_step
                self._ready = bool(layers)
                return loss
            for layer, q, d, group, offset in pending:
                w = layer.weight
                if hp.original_update:  # W_{t+1} = W_t - lr·π(d_t), one step behind the forward
                    r = self.refine(base, group, w, d.detach())
                    w.sub_(group["lr"] * r)
                    q.update_prev.copy_(r)
                else:  # W_{t+1} = the look-ahead weight this step's forward used
                    w.add_(offset)
                w.grad = None  # the base optimizer must not apply the STE gradient to W
        self._clip(opt)
        opt.step()
        opt.zero_grad()
        self._ready = bool(layers)
        return loss

    def _sync_prev_grads(self, layers) -> None:
        """Average the hooked ``g = dL/dŴ`` over DDP ranks (parameter gradients are averaged by
        DDP, these are not), so every rank feeds the meta-network the same input."""
        if self.trainer.world_size <= 1:
            return
        for _, _, q in layers:
            q.grad_prev.copy_(self.trainer.strategy.reduce(q.grad_prev.clone(), reduce_op="mean"))

    def on_train_epoch_end(self) -> None:
        """Step the base lr scheduler once per epoch (manual optimization does not)."""
        sched = self.lr_schedulers()
        if sched is None:
            return
        for s in sched if isinstance(sched, list) else [sched]:
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get("val/acc1")
                if metric is not None:
                    s.step(metric)
            else:
                s.step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._ready = None  # re-read the restored has_prev buffers at the next step
        super().on_load_checkpoint(checkpoint)


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0])
