"""The ``ltq`` command line: a LightningCLI subclass plus a few ltq-specific sub-commands.

    ltq fit|validate|test|predict --config FILE [--key value ...]
    ltq export --ckpt_path CKPT --out FILE [--format int8|packed]
    ltq report RUN_DIR ... [--out DIR]

Model and data are chosen in the config by class path (``ltq.methods.TTQ``) or short class
name (``TTQ``, ``CIFAR10DataModule``); backbones by registry name (``--model.backbone resnet20``).
``num_classes`` and ``in_channels`` are linked from the DataModule to the model.

Defaults that make runs reproducible and resumable:

* ``trainer.default_root_dir`` defaults to ``runs/<method>/<backbone>_<dataset>``;
* a ModelCheckpoint on ``val/acc1`` (max) writes ``<root>/checkpoints/best.ckpt`` and ``last.ckpt``,
  so ``--ckpt_path last`` resumes and ``--ckpt_path <root>/checkpoints/best.ckpt`` tests
  (``--checkpoint.every_n_train_steps N`` adds mid-epoch saves; a resume is exact, see
  ``docs/RELIABILITY.md``);
* a :class:`~ltq.callbacks.guards.NumericalGuard` (``--guard.*``) stops the run at a NaN/Inf loss or
  a collapsed quantizer scale before the bad state is checkpointed;
* the logger defaults to a CSVLogger under ``<root>/logs`` (TensorBoard/W&B via the config).

Mistakes are printed as one line ``ltq: error: ...`` without a traceback or usage text, with exit
status 2: ltq's :class:`~ltq.errors.ConfigError`, jsonargparse's parse errors (condensed by
:func:`summarize_argument_error` to the key and the cause) and Lightning's
``MisconfigurationException``. A diverged run (:class:`~ltq.callbacks.guards.NumericalError`) is one
line with exit status 1.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from ltq.errors import ConfigError

log = logging.getLogger("ltq")


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at emit time (not the stream of the
    moment it was created), so redirected or captured stderr keeps working across runs."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _quiet() -> None:
    # torch.ao.quantization is deprecated in torch 2.14 but still the int8 CPU backend we use.
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*_pytree.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    logger = logging.getLogger("ltq")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ltq: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)


def _epilog() -> str:
    from ltq.data import DATAMODULES
    from ltq.methods import METHODS
    from ltq.models import available_backbones

    return (
        "methods (--model): " + ", ".join(f"{c.__name__}" for c in METHODS.values()) + "\n"
        "data modules (--data): " + ", ".join(c.__name__ for c in DATAMODULES.values()) + "\n"
        "backbones (--model.backbone): " + ", ".join(available_backbones()) + "\n"
        "ltq sub-commands beside Lightning's: export (int8 / packed model files), report (compare runs)"
    )


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _build_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from ltq.data.base import ClassificationDataModule
    from ltq.methods.base import Classifier

    class LTQCLI(LightningCLI):
        _only_subcommand: str | None = None

        def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
            subs = LightningCLI.subcommands()
            only = self._only_subcommand
            return {only: subs[only]} if only in subs else subs

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            from ltq.callbacks.guards import NumericalGuard
            from ltq.callbacks.stats import QuantStats

            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(NumericalGuard, "guard")
            parser.add_lightning_class_args(QuantStats, "quant_stats")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/acc1",
                    "checkpoint.mode": "max",
                    "checkpoint.filename": "best",
                    "checkpoint.save_last": True,
                    "checkpoint.auto_insert_metric_name": False,
                }
            )
            parser.add_argument(
                "--test_after_fit", type=bool, default=True,
                help="after `fit`, evaluate the best checkpoint (selected on val/acc1) on the test split",
            )
            parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
            parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
            parser.epilog = _epilog()

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg["trainer"]
            model_cls = str(cfg["model"]["class_path"]).rsplit(".", 1)[-1].lower()
            backbone = cfg["model"]["init_args"].get("backbone", "model")
            data_cls = str(cfg["data"]["class_path"]).rsplit(".", 1)[-1].replace("DataModule", "").lower()
            if not trainer.get("default_root_dir"):
                trainer["default_root_dir"] = os.path.join("runs", model_cls, f"{backbone}_{data_cls}")
            root = trainer["default_root_dir"]
            if cfg.get("checkpoint") is not None and not cfg["checkpoint"].get("dirpath"):
                cfg["checkpoint"]["dirpath"] = os.path.join(root, "checkpoints")
            ck = cfg.get("checkpoint")
            if (ck is not None and (ck.get("every_n_train_steps") or ck.get("train_time_interval"))
                    and ck.get("save_on_train_epoch_end") is None):
                # Mid-epoch checkpoints (for an exact resume after a kill): Lightning 2.6 would
                # otherwise score best.ckpt at the end of an epoch with the *previous* validation
                # result and drop the save it deferred in epoch 0; save after validation instead.
                ck["save_on_train_epoch_end"] = False
            if trainer.get("logger") in (None, True):
                trainer["logger"] = {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": root, "name": "logs"},
                }
            _configure_wandb(trainer, cfg, self.subcommand, model_cls, backbone, data_cls)
            ckpt = cfg.get("ckpt_path")
            if ckpt not in (None, "last", "best", "hpc") and not Path(ckpt).is_file():
                raise ConfigError(f"ckpt_path={ckpt!r} does not exist")
            if ckpt == "last" and not Path(cfg["checkpoint"]["dirpath"], "last.ckpt").is_file():
                # Lightning would silently start from scratch; say so instead.
                log.warning("ckpt_path=last: no %s yet, starting a fresh run", Path(cfg["checkpoint"]["dirpath"], "last.ckpt"))
            elif ckpt == "last":  # a corrupt last.ckpt (e.g. the disk filled up) is one line, not a traceback
                from ltq.methods.base import read_checkpoint

                last = Path(cfg["checkpoint"]["dirpath"], "last.ckpt")
                read_checkpoint(last, label=f"ckpt_path=last ({last})")

        def _parse_ckpt_path(self) -> None:
            """Lightning rebuilds the model from the hyper-parameters recorded in ``--ckpt_path``.

            ltq first reads the file safely (``weights_only=True``, one-line error if it is
            missing, truncated or not a checkpoint). For ``fit`` (resuming a run) a checkpoint of
            another method, backbone or bit-width than the config's is refused with the list of
            differences; for ``validate``/``test``/``predict`` the checkpoint's model is used (so
            ``ltq test --ckpt_path`` rebuilds the model that was trained) and the differences are
            logged.
            """
            sub = self.config.get("subcommand")
            if not sub:
                return
            ckpt_path = self.config[sub].get("ckpt_path")
            if not ckpt_path or ckpt_path in ("last", "best", "hpc") or not Path(ckpt_path).is_file():
                return  # checked in before_instantiate_classes
            from ltq.methods.base import _class_name, checkpoint_differences, checkpoint_method, read_checkpoint

            ckpt = read_checkpoint(ckpt_path, "ckpt_path")
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
                raise ConfigError(f"ckpt_path={ckpt_path!r} is not a Lightning checkpoint (no state_dict); "
                                  "a plain state_dict of a backbone goes to --model.fp_checkpoint")
            hparams = dict(ckpt.get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            model_cfg = self.config[sub].get("model")
            cls = _import_class(model_cfg.get("class_path")) if model_cfg is not None else None
            if cls is not None:
                init_args = model_cfg.get("init_args")
                init_args = dict(init_args.as_dict() if hasattr(init_args, "as_dict") else (init_args or {}))
                linked = ("num_classes", "in_channels")  # set from the data module at instantiation
                init_args = {k: v for k, v in init_args.items() if k not in linked}
                hparams_cmp = {k: v for k, v in hparams.items() if k not in linked}
                diffs = checkpoint_differences({**ckpt, "hyper_parameters": hparams_cmp}, cls, init_args)
                if diffs and sub == "fit":
                    hint = ""
                    if _class_name(checkpoint_method(ckpt)) == "Classifier" and cls.__name__ != "Classifier":
                        hint = f"; to start {cls.__name__} from full-precision weights use --model.fp_checkpoint instead"
                    raise ConfigError(f"ckpt_path={ckpt_path!r} is a checkpoint of another run ({'; '.join(diffs)}); "
                                      f"resume with that run's config{hint}")
                if diffs:
                    log.warning("ckpt_path=%s: using the checkpoint's model, which differs from the config's (%s)",
                                ckpt_path, "; ".join(diffs))
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
            except argparse.ArgumentError as exc:
                raise ConfigError(f"ckpt_path={ckpt_path!r}: the model recorded in the checkpoint cannot be rebuilt: "
                                  f"{summarize_argument_error(str(exc))}") from None

        def _log_resolved_config(self) -> None:
            """Give every logger the resolved config (W&B shows it as the run config)."""
            import yaml

            cfg = self.config[self.subcommand]
            try:
                resolved = yaml.safe_load(self._subcommand_parsers[self.subcommand].dump(cfg, skip_none=False, skip_check=True))
            except Exception:  # a config that cannot be dumped is still a valid run
                return
            for lg in self.trainer.loggers:
                if type(lg).__name__ == "WandbLogger":
                    lg.experiment.config.update({"ltq_config": resolved}, allow_val_change=True)

        def before_fit(self) -> None:
            self._log_resolved_config()

        def before_test(self) -> None:
            self._log_resolved_config()

        def after_fit(self) -> None:
            cfg = self.config[self.subcommand]
            if not cfg.get("test_after_fit") or self.trainer.fast_dev_run or self.trainer.interrupted:
                return
            ckpt = self.trainer.checkpoint_callback
            best = getattr(ckpt, "best_model_path", "") if ckpt else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)

    def make(args=None):
        argv = sys.argv[1:] if args is None else args
        # Building a sub-command's parser costs ~0.2 s (Trainer, model, data, callbacks
        # signatures): build only the one asked for; all of them for `ltq --help` or a typo.
        only = argv[0] if isinstance(argv, (list, tuple)) and argv and argv[0] in SUBCOMMANDS else None
        LTQCLI._only_subcommand = only
        return LTQCLI(
            Classifier,
            ClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # exit_on_error=False: jsonargparse raises ArgumentError instead of printing the whole
            # usage text; main() prints it as one line (--help still prints and exits 0)
            parser_kwargs={
                "description": "ltq: quantized network training (LightningCLI)", "formatter_class": _formatter(),
                "exit_on_error": False,
                **{sub: {"exit_on_error": False} for sub in ([only] if only else SUBCOMMANDS)},
            },
            args=args,
            auto_configure_optimizers=False,
        )

    return make


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _configure_wandb(trainer, cfg, subcommand, method: str, backbone: str, dataset: str) -> None:
    """Fill W&B grouping defaults (group = method, tags = backbone/dataset/bits, job type = sub-command).

    Without an API key and without WANDB_MODE, wandb would try to log in and fail after several
    seconds: default to offline mode and say so (sync later with ``wandb sync <dir>``).
    """
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for lg in loggers:
        if not hasattr(lg, "get") or not str(lg.get("class_path", "")).endswith("WandbLogger"):
            continue
        args = lg.get("init_args")
        if args is None:
            lg["init_args"] = args = {}
        margs = cfg["model"]["init_args"]
        bits = margs.get("w_bits", margs.get("bits"))
        defaults = {
            "project": "ltq",
            "group": method,
            "job_type": subcommand,
            "tags": [t for t in (backbone, dataset, f"w{bits}" if bits is not None else "fp32") if t],
            "save_dir": trainer["default_root_dir"],
            "name": f"{method}-{backbone}-{dataset}" + (f"-w{bits}" if bits is not None else ""),
        }
        for key, value in defaults.items():
            if args.get(key) in (None, [], "", "."):
                args[key] = value
        if not os.environ.get("WANDB_MODE") and not args.get("offline") and not _wandb_has_key():
            os.environ["WANDB_MODE"] = "offline"
            log.warning("W&B: no API key configured, logging offline to %s (sync later: wandb sync <run dir>)", args["save_dir"])


def _formatter():
    from jsonargparse import DefaultHelpFormatter
    import argparse

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    return Formatter


def run_cli(args: list[str] | None = None):
    """Run the LightningCLI part (``fit``/``validate``/``test``/``predict``); returns the CLI object."""
    _quiet()
    import ltq.methods  # noqa: F401  (registers method classes for short names)
    import ltq.data  # noqa: F401

    return _build_cli_class()(args)


def _finish_wandb() -> None:
    """Flush and close a W&B run (offline runs are complete on disk only after this)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _import_class(class_path) -> type | None:
    """The class named by a config's ``class_path`` (None if it cannot be imported)."""
    import importlib

    if not class_path or "." not in str(class_path):
        return None
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|Given value:|"
    r"Expected a <class 'NoneType'>|tip: )"
)


def _init_params(class_path: str | None) -> list[str]:
    import inspect

    cls = _import_class(class_path)
    if cls is None:
        return []
    names: list[str] = []
    for klass in cls.__mro__:  # **kwargs of a subclass are forwarded to its parents
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                names.append(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return names


def summarize_argument_error(message: str) -> str:
    """One line naming the key out of jsonargparse's nested, multi-line parse error.

    E.g. ``Parser key "model": ... Problem with given class_path 'ltq.methods.Classifier':
    Option 'lrr' is not accepted ...`` becomes ``model.lrr: Classifier has no option 'lrr'
    (did you mean 'lr'?)``.
    """
    keys: list[str] = []
    class_path = None
    details: list[str] = []
    for raw in message.splitlines():
        line = raw.strip()
        while line.startswith("- "):
            line = line[2:].strip()
        if not line:
            continue
        m = re.match(r'Parser key "([^"]+)":\s*(.*)$', line)
        if m:
            keys.append(m.group(1))
            line = m.group(2).strip()
            if not line:
                continue
        m = re.match(r"Problem with given class_path '([^']+)':", line)
        if m:
            class_path = m.group(1)
            continue
        if _NOISE.match(line):
            continue
        details.append(line)
    key = ".".join(keys)
    detail = details[0] if details else " ".join(message.split())
    m = re.match(r"Option '([^']+)' is not accepted", detail)
    if m:
        opt = m.group(1)
        cls_name = str(class_path).rsplit(".", 1)[-1] if class_path else key
        close = difflib.get_close_matches(opt, _init_params(class_path), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{key + '.' if key else ''}{opt}: {cls_name} has no option '{opt}'{hint}"
    m = re.match(r"Expected a dot import path string: (.+)$", detail) or (
        re.match(r"Expected a path but (.+) either not accessible or invalid", detail))
    if m or any("Expected a dot import path string" in d for d in details):
        name = m.group(1) if m else detail
        allowed = ""
        if key in ("model", "data"):
            from ltq.data import DATAMODULES
            from ltq.methods import METHODS

            table = METHODS if key == "model" else DATAMODULES
            allowed = "; allowed: " + ", ".join(c.__name__ for c in table.values()) + " (or a full class path)"
        return f"{key}={name!r} is not a known class{allowed}"
    m = re.match(r"Subcommand '(\w+)' does not accept option '([^']+)'", detail)
    if m:
        return f"{m.group(2)}: unknown option of `{m.group(1)}` (check the spelling of this key in the config / command line)"
    m = re.match(r"Expected a (.+?)\. Got value: (.*)$", detail)
    if m:
        what = re.sub(r"<class '([\w.]+)'>", r"\1", m.group(1))
        return f"{key}: expected a {what}, got {m.group(2)!r}"
    if detail.startswith("Problems parsing config"):  # YAML syntax error
        text = " ".join(details)
        what = re.findall(r"(did not find expected [^\n]+?|expected [^\n]+?|found [^\n]+?|mapping values are not allowed here)"
                          r"\s+in \"<unicode string>\"", text)
        where = re.findall(r"line (\d+), column (\d+)", text)
        if what:
            loc = f" (line {where[-1][0]}, column {where[-1][1]})" if where else ""
            return f"config: invalid YAML: {what[-1]}{loc}"
        return "config: invalid YAML: " + " ".join(text.replace("Problems parsing config:", "").split())
    detail = re.sub(r"<class '([\w.]+)'>", r"\1", " ".join(detail.split()))
    detail = detail[0].lower() + detail[1:] if detail[:1].isupper() and detail[1:2].islower() else detail
    return f"{key}: {detail}" if key and not detail.startswith(key) else detail


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _find_config_error(exc: BaseException) -> ConfigError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "export":
            from ltq.export import main as export_main

            _quiet()
            return export_main(argv[1:])
        if argv and argv[0] == "report":
            from ltq.report import main as report_main

            _quiet()
            return report_main(argv[1:])
        run_cli(argv)
        _finish_wandb()
        return 0
    except ConfigError as exc:
        print(f"ltq: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as exc:  # a config/command-line mistake found by jsonargparse
        print(f"ltq: error: {summarize_argument_error(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from ltq.callbacks.guards import NumericalError

        if isinstance(exc, NumericalError):  # the run diverged: not a config mistake, exit status 1
            print(f"ltq: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        # jsonargparse wraps errors raised while instantiating classes; unwrap ours.
        inner = _find_config_error(exc)
        if inner is not None:
            print(f"ltq: error: {_one_line(inner)}", file=sys.stderr)
            return 2
        if isinstance(exc, MisconfigurationException):  # Lightning's own option checks (trainer.*)
            print(f"ltq: error: trainer: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("ltq: interrupted; resume with --ckpt_path last", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
