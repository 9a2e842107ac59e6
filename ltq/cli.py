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
  so ``--ckpt_path last`` resumes and ``--ckpt_path <root>/checkpoints/best.ckpt`` tests;
* the logger defaults to a CSVLogger under ``<root>/logs`` (TensorBoard/W&B via the config).

Configuration mistakes (:class:`ltq.errors.ConfigError`) are printed as one line, without a
traceback, with exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from ltq.errors import ConfigError

log = logging.getLogger("ltq")


def _quiet() -> None:
    # torch.ao.quantization is deprecated in torch 2.14 but still the int8 CPU backend we use.
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*_pytree.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    logger = logging.getLogger("ltq")
    if not logger.handlers:
        handler = logging.StreamHandler()
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


def _build_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from ltq.data.base import ClassificationDataModule
    from ltq.methods.base import Classifier

    class LTQCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            from ltq.callbacks.stats import QuantStats

            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        return LTQCLI(
            Classifier,
            ClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "ltq: quantized network training (LightningCLI)", "formatter_class": _formatter()},
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
        print(f"ltq: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # jsonargparse wraps errors raised while instantiating classes; unwrap ours.
        inner = _find_config_error(exc)
        if inner is None:
            raise
        print(f"ltq: error: {inner}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ltq: interrupted; resume with --ckpt_path last", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
