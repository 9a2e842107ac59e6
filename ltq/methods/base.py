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
import re
import zipfile
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


def describe_load_error(path: str | Path, exc: BaseException) -> str:
    """A short, one-line reason why ``torch.load(path, weights_only=True)`` failed."""
    path = Path(path)
    text = str(exc)
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path) and "Weights only load failed" in text:
        return "the file is not a PyTorch checkpoint (not a torch.save zip archive; corrupt or another format)"
    if "Weights only load failed" in text:
        detail = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln or "Unsupported operand" in ln), "")
        detail = detail.split(". ", 1)[0] if detail else ""
        return ("it holds Python objects that torch.load(weights_only=True) refuses to unpickle"
                + (f" ({detail})" if detail else "") + "; ltq only loads tensors and plain containers")
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "the file is truncated or corrupt (its zip archive cannot be read)"
    if not zipfile.is_zipfile(path):
        return "the file is not a PyTorch checkpoint (not a torch.save zip archive; corrupt or another format)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}" + (f": {first}" if first else "")


def read_checkpoint(path: str | Path, option: str = "ckpt_path", label: str | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line :class:`ConfigError` messages.

    The messages start with ``label`` (default ``<option>='<path>'``). Zip-format files
    (everything ``torch.save`` writes since torch 1.6) are memory-mapped, so reading only the
    metadata of a large checkpoint is cheap.
    """
    path = Path(path)
    label = label or f"{option}={str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{label} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # corrupt file, truncated file, pickle with custom classes...
        raise ConfigError(f"{label} cannot be read: {describe_load_error(path, exc)}") from None


def load_state_dict_file(path: str | Path, option: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a model state_dict from a Lightning checkpoint or a plain ``torch.save``d state_dict.

    Lightning checkpoints store the module's keys under ``state_dict`` with a ``model.`` prefix
    (``Classifier.model``); that prefix is removed so the result loads into a bare backbone.
    ``weights_only=True`` is used: ltq checkpoints only hold tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist (option model.fp_checkpoint / model.init_checkpoint)")
    obj = read_checkpoint(path, option)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    if obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5]))
        raise ConfigError(f"checkpoint {str(path)!r} is not a state_dict: its top-level keys ({keys}) hold no tensors")
    if any(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items() if k.startswith("model.")}
    return obj


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` a Lightning checkpoint recorded (empty for a plain state_dict)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception:
        return {}
    return dict(obj.get("hyper_parameters") or {}) if isinstance(obj, dict) else {}


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
    #: hyper-parameters that change what the network computes (its structure or quantization);
    #: a checkpoint whose values differ cannot be resumed/tested with this model. Every
    #: hyper-parameter whose name contains ``bits`` and ``skip_first``/``skip_last``/``overrides``
    #: are added automatically; subclasses extend the tuple with their own (e.g. a level set).
    structural_hparams: tuple[str, ...] = ("backbone", "backbone_kwargs", "num_classes", "in_channels")

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
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ConfigError(f"model.weight_decay={weight_decay!r} must be a number >= 0")
        if not (isinstance(momentum, (int, float)) and math.isfinite(momentum) and momentum >= 0):
            raise ConfigError(f"model.momentum={momentum!r} must be a number >= 0")
        if num_classes is None or num_classes < 1:
            raise ConfigError(f"model.num_classes={num_classes!r} must be a positive integer")
        for i, group in enumerate(param_groups or []):
            if not isinstance(group, dict) or "pattern" not in group:
                raise ConfigError(f"model.param_groups[{i}] must be a mapping with a 'pattern' key, got {group!r}")
            unknown = set(group) - {"pattern", "lr", "weight_decay", "momentum", "betas"}
            if unknown:
                raise ConfigError(f"model.param_groups[{i}] has unknown keys {sorted(unknown)}; allowed: pattern, lr, weight_decay, momentum, betas")
            if not isinstance(group["pattern"], str) or not group["pattern"]:
                raise ConfigError(f"model.param_groups[{i}].pattern={group['pattern']!r} must be a non-empty fnmatch pattern string")
            for key, lo, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("momentum", 0.0, False)):
                v = group.get(key)
                if v is None:
                    continue
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if strict else v >= lo)
                if not ok:
                    raise ConfigError(f"model.param_groups[{i}].{key}={v!r} must be a {'positive' if strict else 'non-negative'} number")

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
        state = load_state_dict_file(path, "model.fp_checkpoint")
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

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the method class and the running training-metric state (for an exact mid-epoch resume).

        ``checkpoint["ltq"]`` holds plain types and tensors only (``torch.load(weights_only=True)``).
        """
        epoch = int(self.trainer.current_epoch) if self._trainer is not None else -1
        metric = {k: v.detach().cpu().clone() for k, v in self.train_acc1.metric_state.items() if isinstance(v, torch.Tensor)}
        checkpoint["ltq"] = {
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "train_metric_epoch": epoch,
            "train_metric_state": metric,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another method, backbone or bit-width with one message listing the
        differences (Lightning calls this before loading the state), and keep the training-metric
        state for :meth:`on_train_start`. State that still does not fit is reported by
        :meth:`load_state_dict`."""
        problems = checkpoint_differences(checkpoint, type(self), dict(self.hparams))
        if problems:
            hint = ""
            if _class_name(checkpoint_method(checkpoint)) == "Classifier" and type(self).__name__ != "Classifier":
                hint = f"; to start {type(self).__name__} from full-precision weights use --model.fp_checkpoint instead"
            raise ConfigError(f"the checkpoint does not fit this model: it differs in {'; '.join(problems)}{hint}")
        meta = checkpoint.get("ltq") or {}
        self._pending_train_metric = meta.get("train_metric_epoch"), meta.get("train_metric_state")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` whose strict-mode error is one line (what is missing,
        unexpected or of another shape, with an example each) instead of the full key lists."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            if "Error(s) in loading state_dict" not in str(exc):
                raise
            raise ConfigError(f"the checkpoint does not fit this model ({type(self).__name__}, backbone "
                              f"{self.hparams.get('backbone')!r}): {summarize_state_dict_error(str(exc))}") from None

    def on_train_start(self) -> None:
        """After a mid-epoch resume, continue the epoch's running training accuracy from the checkpoint
        (Lightning restores the loops after :meth:`on_load_checkpoint`, so the epoch is compared here)."""
        epoch, state = getattr(self, "_pending_train_metric", (None, None))
        self._pending_train_metric = (None, None)
        if state and epoch == self.trainer.current_epoch:
            for name, value in state.items():
                cur = getattr(self.train_acc1, name, None)
                if isinstance(cur, torch.Tensor) and cur.shape == value.shape:
                    cur.copy_(value)

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


# ---------------------------------------------------------------------------- checkpoint checks
def _class_name(path: str | None) -> str | None:
    return str(path).rsplit(".", 1)[-1] if path else None


def checkpoint_method(checkpoint: dict[str, Any]) -> str | None:
    """Class path of the method that wrote a Lightning checkpoint, when recorded."""
    meta = checkpoint.get("ltq")
    if isinstance(meta, dict) and meta.get("method"):
        return str(meta["method"])
    hp = checkpoint.get("hyper_parameters")
    if isinstance(hp, dict) and hp.get("_class_path"):
        return str(hp["_class_path"])
    return None


def structural_keys(cls: type, *hparams: dict[str, Any]) -> list[str]:
    """The hyper-parameters of ``cls`` (and of the given dicts) that define the computed network."""
    keys = list(getattr(cls, "structural_hparams", Classifier.structural_hparams))
    for hp in hparams:
        for k in hp:
            if k not in keys and not k.startswith("_") and ("bits" in k or k in ("skip_first", "skip_last", "overrides")):
                keys.append(k)
    return keys


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()} or None
    return v


def checkpoint_differences(checkpoint: dict[str, Any], cls: type, hparams: dict[str, Any]) -> list[str]:
    """``["<what>: checkpoint <a>, model <b>", ...]`` for the method class and the structural
    hyper-parameters (:func:`structural_keys`) in which a checkpoint differs from ``cls(**hparams)``
    (one that only one side records counts as ``None`` on the other; empty containers equal ``None``)."""
    out = []
    ckpt_cls = _class_name(checkpoint_method(checkpoint))
    if ckpt_cls and ckpt_cls != cls.__name__:
        out.append(f"method: checkpoint {ckpt_cls}, model {cls.__name__}")
    ckpt_hp = checkpoint.get("hyper_parameters")
    if not isinstance(ckpt_hp, dict):
        return out
    for key in structural_keys(cls, ckpt_hp, hparams):
        if key not in ckpt_hp and key not in hparams:
            continue
        a, b = _norm(ckpt_hp.get(key)), _norm(hparams.get(key))
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, model {b!r}")
    return out


def summarize_state_dict_error(message: str) -> str:
    """One line out of torch's strict ``load_state_dict`` error (counts and one example each)."""
    parts = []
    for label, pattern in (("missing from the checkpoint", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected in the checkpoint", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, message)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} keys {label} (e.g. {', '.join(keys[:3])})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                       r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", message)
    if sizes:
        name, a, b = sizes[0]
        more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
        parts.append(f"shape of {name}: checkpoint ({a}), model ({b}){more}")
    return "; ".join(parts) or " ".join(message.split())[:300]

