"""The full-precision classifier every quantization method builds on.

``Classifier`` owns what all methods share: the backbone (from the registry), loading an FP
checkpoint into it, top-1/top-5 metrics, optimizer/scheduler construction from YAML options with
parameter groups by name pattern, and logging. A method subclasses it and overrides
:meth:`Classifier.quantize` (the "what": model surgery) and, if needed, the training step (the
"how").
"""

from __future__ import annotations

import fnmatch
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import MulticlassAccuracy

from ltq.errors import ConfigError, check_choice
from ltq.models import build_backbone

log = logging.getLogger("ltq")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "multistep", "cosine", "plateau")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a model state_dict from a Lightning checkpoint or a plain ``torch.save``d state_dict.

    Lightning checkpoints store the module's keys under ``state_dict`` with a ``model.`` prefix
    (``Classifier.model``); that prefix is removed so the result loads into a bare backbone.
    ``weights_only=True`` is used: ltq checkpoints only hold tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist (option model.fp_checkpoint / model.init_checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with custom classes...
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    if any(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items() if k.startswith("model.")}
    return obj


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` a Lightning checkpoint recorded (empty for a plain state_dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}
    return dict(obj.get("hyper_parameters", {})) if isinstance(obj, dict) else {}


class Classifier(L.LightningModule):
    """Full-precision image classifier over a backbone of the zoo.

    Args:
        backbone: registry name (``ltq --help`` lists them), e.g. ``resnet20``.
        num_classes: output classes; linked from the DataModule by the CLI.
        in_channels: input channels; linked from the DataModule by the CLI.
        backbone_kwargs: extra constructor options of the backbone (e.g. ``{"shortcut": "pad"}``).
        optimizer: ``sgd`` | ``adam`` | ``adamw``.
        lr, momentum, nesterov, weight_decay, betas: optimizer settings.
        scheduler: ``none`` | ``step`` | ``multistep`` | ``cosine`` | ``plateau``.
        milestones, gamma: multistep; step_size, gamma: step; t_max: cosine (default max_epochs);
            plateau_patience, plateau_threshold: ReduceLROnPlateau on ``val/acc1`` (absolute threshold).
        warmup_epochs: linear warm-up of the lr over this many epochs (per step).
        param_groups: list of ``{"pattern": fnmatch on parameter name, "lr": ..., "weight_decay": ...}``;
            the first matching pattern wins, unmatched parameters use the defaults above.
        fp_checkpoint: a full-precision checkpoint (Lightning ``.ckpt`` or plain state_dict) of the
            same backbone, loaded strictly before quantization.
        freeze: fnmatch patterns of parameters that are not trained (``requires_grad=False``).
    """

    method_name = "fp"

    def __init__(
        self,
        backbone: str = "resnet20",
        num_classes: int = 10,
        in_channels: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        betas: Sequence[float] = (0.9, 0.999),
        scheduler: str = "multistep",
        milestones: Sequence[int] = (150, 225),
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
        super().__init__()
        self.save_hyperparameters()
        check_choice("model.optimizer", optimizer, OPTIMIZERS)
        check_choice("model.scheduler", scheduler, SCHEDULERS)
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"model.lr={lr!r} must be a positive number")
        if weight_decay < 0:
            raise ConfigError(f"model.weight_decay={weight_decay!r} must be >= 0")
        if num_classes is None or num_classes < 1:
            raise ConfigError(f"model.num_classes={num_classes!r} must be a positive integer")
        for i, group in enumerate(param_groups or []):
            if not isinstance(group, dict) or "pattern" not in group:
                raise ConfigError(f"model.param_groups[{i}] must be a mapping with a 'pattern' key, got {group!r}")
            unknown = set(group) - {"pattern", "lr", "weight_decay", "momentum", "betas"}
            if unknown:
                raise ConfigError(f"model.param_groups[{i}] has unknown keys {sorted(unknown)}; allowed: pattern, lr, weight_decay, momentum, betas")

        self.model = build_backbone(backbone, num_classes=num_classes, in_channels=in_channels, **(backbone_kwargs or {}))
        if fp_checkpoint:
            self.load_fp_checkpoint(fp_checkpoint)
        self.model = self.quantize(self.model)
        for pattern in freeze or []:
            matched = [n for n, p in self.model.named_parameters() if fnmatch.fnmatch(n, pattern)]
            if not matched:
                raise ConfigError(f"model.freeze pattern {pattern!r} matches no parameter of {backbone}")
            for n, p in self.model.named_parameters():
                if n in matched:
                    p.requires_grad_(False)

        def metrics(k: int) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")

        self.train_acc1 = metrics(1)
        self.val_acc1, self.val_acc5 = metrics(1), metrics(5)
        self.test_acc1, self.test_acc5 = metrics(1), metrics(5)
        self.test_prf = torchmetrics.MetricCollection(
            {
                "precision": torchmetrics.Precision(task="multiclass", num_classes=num_classes, average="macro"),
                "recall": torchmetrics.Recall(task="multiclass", num_classes=num_classes, average="macro"),
                "f1": torchmetrics.F1Score(task="multiclass", num_classes=num_classes, average="macro"),
            },
            prefix="test/",
        )

    # ------------------------------------------------------------------ model surgery
    def quantize(self, model: nn.Module) -> nn.Module:
        """Return the quantized model. The FP classifier quantizes nothing."""
        return model

    def load_fp_checkpoint(self, path: str) -> None:
        """Load a full-precision state_dict of the same backbone (strict), with a clear message on mismatch."""
        hp = checkpoint_hparams(path)
        if hp.get("backbone") not in (None, self.hparams.backbone):
            raise ConfigError(
                f"model.fp_checkpoint {path!r} was trained with backbone {hp['backbone']!r}, but model.backbone is {self.hparams.backbone!r}"
            )
        state = load_state_dict_file(path)
        own = self.model.state_dict()
        # A quantized checkpoint holds quantizer state; an FP load takes only the backbone's own keys.
        state = {k: v for k, v in state.items() if k in own or not _is_quantizer_key(k)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shape:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
            if shape:
                parts.append(f"shape mismatch in {shape[:3]} (e.g. {tuple(state[shape[0]].shape)} vs {tuple(own[shape[0]].shape)})")
            raise ConfigError(
                f"model.fp_checkpoint {path!r} does not fit backbone {self.hparams.backbone!r} "
                f"with num_classes={self.hparams.num_classes}: " + "; ".join(parts)
            )
        self.model.load_state_dict(state)
        log.info("loaded full-precision weights from %s", path)

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        bs = x.shape[0]
        if stage == "train":
            self.train_acc1(logits, y)
            self.log("train/loss", loss, prog_bar=True, batch_size=bs)
            self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        elif stage == "val":
            self.val_acc1(logits, y)
            self.val_acc5(logits, y)
            self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
            self.log("val/acc1", self.val_acc1, prog_bar=True, batch_size=bs)
            self.log("val/acc5", self.val_acc5, batch_size=bs)
        else:
            self.test_acc1(logits, y)
            self.test_acc5(logits, y)
            self.test_prf(logits, y)
            self.log("test/loss", loss, sync_dist=True, batch_size=bs)
            self.log("test/acc1", self.test_acc1, batch_size=bs)
            self.log("test/acc5", self.test_acc5, batch_size=bs)
            self.log_dict(self.test_prf, batch_size=bs)
        return loss

    def training_step(self, batch, batch_idx):
        return self.shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self.shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    # ------------------------------------------------------------------ quantization statistics
    def quant_stats(self) -> dict[str, torch.Tensor]:
        """``{"<layer>/<key>": tensor}`` from every quantizer's ``stats()`` (tensors, no host sync)."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.model.named_modules():
            stats = getattr(module, "stats", None)
            if callable(stats) and name and not isinstance(module, Classifier):
                for key, value in stats().items():
                    out[f"{name}/{key}"] = value
        return out

    # ------------------------------------------------------------------ optimizers
    def param_group_overrides(self) -> list[dict[str, Any]]:
        """Method-specific default groups, appended after the user's ``param_groups``."""
        return []

    def build_param_groups(self) -> list[dict[str, Any]]:
        specs = list(self.hparams.param_groups or []) + self.param_group_overrides()
        buckets: list[list[nn.Parameter]] = [[] for _ in specs]
        default: list[nn.Parameter] = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            for i, spec in enumerate(specs):
                if fnmatch.fnmatch(name, spec["pattern"]):
                    buckets[i].append(p)
                    break
            else:
                default.append(p)
        groups = [{"params": default, "name": "default"}] if default else []
        for spec, params in zip(specs, buckets):
            if params:
                groups.append({"params": params, "name": spec["pattern"], **{k: v for k, v in spec.items() if k != "pattern"}})
        return groups

    def make_optimizer(self, groups, name: str | None = None, lr: float | None = None) -> torch.optim.Optimizer:
        hp = self.hparams
        name = name or hp.optimizer
        lr = lr if lr is not None else hp.lr
        if name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0, weight_decay=hp.weight_decay)
        if name == "adam":
            return torch.optim.Adam(groups, lr=lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        hp = self.hparams
        sched: Any
        if hp.scheduler == "none":
            sched = None
        elif hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
        elif hp.scheduler == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        elif hp.scheduler == "cosine":
            t_max = hp.t_max or (self.trainer.max_epochs if self._trainer and self.trainer.max_epochs and self.trainer.max_epochs > 0 else 100)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
        else:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=hp.gamma, patience=hp.plateau_patience, threshold=hp.plateau_threshold, threshold_mode="abs"
            )
            return {"scheduler": sched, "monitor": "val/acc1", "interval": "epoch"}
        if sched is None:
            return None
        return {"scheduler": sched, "interval": "epoch"}

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.build_param_groups())
        sched = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": sched} if sched else optimizer

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Linear lr warm-up over ``warmup_epochs`` (per step), then the configured schedule."""
        warm = self.hparams.warmup_epochs
        if warm and self.trainer.num_training_batches and self.trainer.num_training_batches != float("inf"):
            total = warm * self.trainer.num_training_batches
            step = self.trainer.global_step
            if step < total:
                scale = (step + 1) / total
                for group in optimizer.param_groups:
                    group.setdefault("base_lr", group["lr"])
                    group["lr"] = group["base_lr"] * scale
            elif step == total:
                for group in optimizer.param_groups:
                    if "base_lr" in group:
                        group["lr"] = group.pop("base_lr")
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def _is_quantizer_key(key: str) -> bool:
    return "quantizer." in key or key.startswith("meta")
