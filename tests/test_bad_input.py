"""Catalogue of user mistakes: each one, made through the real entry point (``ltq.cli.main``, the
``ltq`` console script, in-process; or the Python API where that is how the user gets there),
must end with exit status 2 and exactly one ``ltq: error: ...`` line that names the problem —
no usage dump, no traceback from deep inside torch/Lightning/jsonargparse.

Every case is a row ``(id, make, expected)``: ``make(tmp_path, assets)`` returns the argv (it may
write broken files first) and ``expected`` is a list of substrings of the error line.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_cifar10_pickled, make_fashion_mnist, make_tiny_imagenet, write_idx
from ltq.cli import main
from ltq.errors import ConfigError
from ltq.methods import METHODS, Classifier


QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def quick(tmp_path: Path, *extra: str, sub: str = "fit") -> list[str]:
    """The quickstart recipe (cnn on the embedded Fashion-MNIST sample), one fast_dev_run batch."""
    return [sub, "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false", "--trainer.fast_dev_run", "true",
            "--data.root", str(tmp_path / "no_dataset_here"), "--data.limit_train_samples", "64", *extra]


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("ltq: error:")], err


def check(argv, expected, capsys, code=2):
    rc, lines, err = run(argv, capsys)
    assert rc == code, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and "usage:" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------ assets
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Checkpoints made once: a real ``ltq fit`` checkpoint of the quickstart (FP cnn, 10 classes,
    1 channel), one of another backbone (cnn_bn) and plain state_dicts."""
    d = tmp_path_factory.mktemp("bad_input_assets")
    assert main(quick(d, "--trainer.fast_dev_run", "false", "--trainer.max_epochs", "1",
                      "--data.val_fraction", "0.02", "--test_after_fit", "false")) == 0
    out = {"fp_ckpt": d / "run" / "checkpoints" / "last.ckpt"}
    assert out["fp_ckpt"].is_file()
    torch.manual_seed(0)
    other = Classifier(backbone="cnn_bn", in_channels=1, optimizer="adam", lr=1e-3, scheduler="none")
    ds = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    t = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    t.fit(other, train_dataloaders=DataLoader(ds, batch_size=8))
    t.save_checkpoint(d / "cnn_bn.ckpt")
    out["cnn_bn_ckpt"] = d / "cnn_bn.ckpt"
    torch.save(Classifier(backbone="cnn", in_channels=1, num_classes=5).model.state_dict(), d / "cnn_5cls.pt")
    out["cnn_5cls_sd"] = d / "cnn_5cls.pt"
    torch.save(Classifier(backbone="cnn", in_channels=1).model.state_dict(), d / "cnn.pt")
    out["cnn_sd"] = d / "cnn.pt"
    return out


def corrupt_copy(src: Path, dst: Path, how: str) -> str:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes({"random": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b""}[how])
    return str(dst)


def as_metaquant_1bit(src: Path, dst: Path) -> str:
    """The quickstart checkpoint relabelled as a 1-bit MetaQuant run (only its header is read)."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["hyper_parameters"].update(_class_path="ltq.methods.MetaQuant", bits=1)
    ckpt["ltq"]["method"] = "ltq.methods.metaquant.MetaQuant"
    torch.save(ckpt, dst)
    return str(dst)


class _OpenFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for a crafted dataset file running code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_cifar(root: Path, marker: Path) -> Path:
    import pickle

    make_cifar10_pickled(root)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": _OpenFile(marker), "labels": [0]}, f, protocol=2)
    return root


class Opaque:  # a pickled custom object: torch.load(weights_only=True) must refuse it
    pass


def tiny_imagenet(tmp_path: Path) -> Path:
    return make_tiny_imagenet(tmp_path / "tin")


def tin_args(tmp_path: Path, base: Path, *extra: str) -> list[str]:
    return quick(tmp_path, "--data", "TinyImageNetDataModule", "--data.root", str(base), "--data.crop_size", "32",
                 "--data.num_workers", "0", "--data.batch_size", "32", "--data.limit_train_samples", "null", *extra)


def fmnist(tmp_path: Path, **kw) -> Path:
    return make_fashion_mnist(tmp_path / "fm", n_train=40, n_test=10, **kw)


def fm_args(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return quick(tmp_path, "--data.root", str(root), "--data.fallback_to_sample", "false", *extra)


def half_jpeg(base: Path) -> None:
    for img in sorted((base / "train").rglob("*.JPEG")):
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])


def rm(path: Path) -> Path:
    path.unlink()
    return path


# (id, make(tmp_path, assets) -> argv, expected substrings of the one error line)
CASES = [
    # --- YAML / command-line typos and unknown names (jsonargparse's errors, made one line)
    ("yaml-top-level-key-typo", lambda p, a: quick(p, "--config", write(p / "c.yaml", "modle:\n  init_args:\n    lr: 0.1\n")),
     ["modle.init_args.lr", "unknown option"]),
    ("yaml-model-key-typo", lambda p, a: quick(p, "--config", write(p / "c.yaml", "model:\n  init_args:\n    lrr: 0.1\n")),
     ["model.lrr", "Classifier has no option 'lrr'", "did you mean 'lr'"]),
    ("yaml-trainer-key-typo", lambda p, a: quick(p, "--config", write(p / "c.yaml", "trainer:\n  max_epoch: 3\n")),
     ["trainer.max_epoch", "unknown option"]),
    ("cli-model-key-typo", lambda p, a: quick(p, "--model.init_args.lrr", "0.1"), ["model.lrr", "did you mean 'lr'"]),
    ("cli-data-key-typo", lambda p, a: quick(p, "--data.init_args.batchsize", "8"),
     ["data.batchsize", "FashionMNISTDataModule has no option", "did you mean 'batch_size'"]),
    ("invalid-yaml", lambda p, a: quick(p, "--config", write(p / "c.yaml", "model: [unclosed\n")),
     ["config: invalid YAML", "line 2"]),
    ("config-file-missing", lambda p, a: quick(p, "--config", str(p / "nope.yaml")), ["nope.yaml", "does not exist"]),
    ("value-of-wrong-type", lambda p, a: quick(p, "--model.lr", "fast"), ["model.lr", "expected a float", "'fast'"]),
    ("unknown-method", lambda p, a: quick(p, "--model", "NoSuchMethod"),
     ["model='NoSuchMethod' is not a known class", "allowed:", "MetaQuant"]),
    ("unknown-data-module", lambda p, a: quick(p, "--data", "ImageNetDataModule"),
     ["data='ImageNetDataModule' is not a known class", "CIFAR10DataModule"]),
    ("unknown-subcommand", lambda p, a: ["fitt", "--config", QUICKSTART], ["'fitt'", "fit"]),
    ("unknown-flag", lambda p, a: quick(p, "--epochs", "3"), ["unrecognized arguments: --epochs"]),
    # --- model options
    ("unknown-backbone", lambda p, a: quick(p, "--model.backbone", "resnet19"), ["model.backbone='resnet19'", "resnet20"]),
    ("unknown-backbone-kwarg", lambda p, a: quick(p, "--model.backbone_kwargs", "{depthh: 3}"),
     ["has no option 'depthh'", "accepted: input_size"]),
    ("bad-backbone-option", lambda p, a: quick(p, "--model.backbone_kwargs", "{input_size: 30}"),
     ["input_size=30", "allowed: 28, 32"]),
    ("negative-lr", lambda p, a: quick(p, "--model.lr", "-0.01"), ["model.lr=-0.01", "positive"]),
    ("negative-weight-decay", lambda p, a: quick(p, "--model.weight_decay=-1e-4"), ["model.weight_decay=-0.0001", ">= 0"]),
    ("negative-momentum", lambda p, a: quick(p, "--model.momentum", "-0.9"), ["model.momentum=-0.9"]),
    ("bad-optimizer", lambda p, a: quick(p, "--model.optimizer", "adamax"), ["model.optimizer='adamax'", "allowed: sgd, adam, adamw"]),
    ("bad-scheduler", lambda p, a: quick(p, "--model.scheduler", "cosine_annealing"), ["model.scheduler='cosine_annealing'", "cosine"]),
    ("param-group-without-pattern", lambda p, a: quick(p, "--model.param_groups", "[{lr: 0.1}]"),
     ["model.param_groups[0]", "'pattern'"]),
    ("param-group-unknown-key", lambda p, a: quick(p, "--model.param_groups", "[{pattern: '*bias', wd: 0}]"),
     ["model.param_groups[0] has unknown keys ['wd']"]),
    ("param-group-negative-lr", lambda p, a: quick(p, "--model.param_groups", "[{pattern: '*bias', lr: -1}]"),
     ["model.param_groups[0].lr=-1"]),
    ("metaquant-bits-0", lambda p, a: quick(p, "--model", "MetaQuant", "--model.bits", "0"),
     ["model.bits=0", "MetaQuant", "allowed"]),
    ("metaquant-bwn-2-bits", lambda p, a: quick(p, "--model", "MetaQuant", "--model.forward", "bwn", "--model.bits", "2"),
     ["model.bits=2", "bwn"]),
    ("freeze-pattern-matches-nothing", lambda p, a: quick(p, "--model.freeze", "[encoder.*]"), ["'encoder.*' matches no parameter"]),
    # --- data / trainer options
    ("val-fraction-1.5", lambda p, a: quick(p, "--data.val_fraction", "1.5"), ["data.val_fraction=1.5", "[0, 1)"]),
    ("batch-size-0", lambda p, a: quick(p, "--data.batch_size", "0"), ["data.batch_size=0"]),
    ("negative-workers", lambda p, a: quick(p, "--data.num_workers", "-1"), ["data.num_workers=-1"]),
    ("negative-max-epochs", lambda p, a: quick(p, "--trainer.max_epochs", "-5", "--trainer.fast_dev_run", "false"),
     ["max_epochs", "-5"]),
    ("bad-guard-option", lambda p, a: quick(p, "--guard.check_every_n_steps", "-1"), ["guard.check_every_n_steps=-1"]),
    # --- dataset files
    ("fashion-mnist-missing-no-fallback", lambda p, a: quick(p, "--data.fallback_to_sample", "false"),
     ["data.root=", "does not exist", "--data.download true"]),
    ("cifar10-root-missing", lambda p, a: quick(p, "--data", "CIFAR10DataModule", "--data.root", str(p / "cifar"),
                                                "--model.backbone_kwargs", "{input_size: 32}"),
     ["data.root=", "cifar", "does not exist"]),
    ("cifar10-wrong-layout", lambda p, a: quick(p, "--data", "CIFAR10DataModule", "--data.root", str((p / "c10").mkdir() or p / "c10")),
     ["holds neither cifar-10-batches-py/", "train/<class>/"]),
    ("cifar10-batch-file-missing", lambda p, a: quick(p, "--data", "CIFAR10DataModule", "--data.root",
                                                      str(rm(make_cifar10_pickled(p / "c10") / "cifar-10-batches-py" / "data_batch_3").parents[1])),
     ["data_batch_3", "missing"]),
    ("cifar10-batch-that-runs-code", lambda p, a: quick(p, "--data", "CIFAR10DataModule", "--data.root",
                                                        str(malicious_cifar(p / "c10", p / "pwned"))),
     ["data_batch_1", "refusing to unpickle io.open"]),
    ("tiny-imagenet-without-wnids", lambda p, a: tin_args(p, rm(tiny_imagenet(p) / "wnids.txt").parent),
     ["wnids.txt", "is missing"]),
    ("tiny-imagenet-without-val-annotations", lambda p, a: tin_args(p, rm(tiny_imagenet(p) / "val" / "val_annotations.txt").parents[1]),
     ["val_annotations.txt", "is missing"]),
    ("truncated-jpeg", lambda p, a: tin_args(p, (lambda b: half_jpeg(b) or b)(tiny_imagenet(p))),
     ["cannot read image file", ".JPEG", "truncated"]),
    ("idx-wrong-magic", lambda p, a: fm_args(p, (lambda r: write_idx(r / "FashionMNIST" / "raw" / "train-images-idx3-ubyte",
                                                                     torch.zeros(40, dtype=torch.uint8).numpy()) and r)(fmnist(p))),
     ["train-images-idx3-ubyte", "magic number 2049, expected 2051"]),
    ("idx-truncated", lambda p, a: fm_args(p, (lambda r: (lambda f: f.write_bytes(f.read_bytes()[:-100]))(
        r / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte") and r)(fmnist(p))),
     ["t10k-images-idx3-ubyte", "holds", "header says"]),
    ("gz-not-gzip", lambda p, a: fm_args(p, (lambda r: (r / "train-labels-idx1-ubyte.gz").write_bytes(os.urandom(300)) and r)(
        fmnist(p, gz=True, flat=True))), ["train-labels-idx1-ubyte.gz"]),
    ("fashion-mnist-partial", lambda p, a: fm_args(p, rm(fmnist(p) / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").parents[2]),
     ["t10k-labels-idx1-ubyte", "is missing"]),
    # --- checkpoints
    ("fp-checkpoint-missing", lambda p, a: quick(p, "--model.fp_checkpoint", str(p / "fp.ckpt")), ["fp.ckpt", "does not exist"]),
    ("fp-checkpoint-random-bytes", lambda p, a: quick(p, "--model.fp_checkpoint", corrupt_copy(a["fp_ckpt"], p / "x.ckpt", "random")),
     ["model.fp_checkpoint=", "not a PyTorch checkpoint"]),
    ("fp-checkpoint-truncated", lambda p, a: quick(p, "--model.fp_checkpoint", corrupt_copy(a["fp_ckpt"], p / "x.ckpt", "truncated")),
     ["truncated or corrupt"]),
    ("fp-checkpoint-empty", lambda p, a: quick(p, "--model.fp_checkpoint", corrupt_copy(a["fp_ckpt"], p / "x.ckpt", "empty")),
     ["the file is empty"]),
    ("fp-checkpoint-with-python-objects", lambda p, a: quick(p, "--model.fp_checkpoint", (
        torch.save({"state_dict": {}, "extra": Opaque()}, p / "obj.ckpt") or str(p / "obj.ckpt"))),
     ["weights_only=True", "Opaque"]),
    ("fp-checkpoint-not-a-state-dict", lambda p, a: quick(p, "--model.fp_checkpoint", (
        torch.save([1, 2, 3], p / "list.pt") or str(p / "list.pt"))), ["holds a list"]),
    ("fp-checkpoint-other-backbone", lambda p, a: quick(p, "--model.fp_checkpoint", str(a["cnn_bn_ckpt"])),
     ["trained with backbone 'cnn_bn'", "model.backbone is 'cnn'"]),
    ("fp-checkpoint-other-num-classes", lambda p, a: quick(p, "--model.fp_checkpoint", str(a["cnn_5cls_sd"])),
     ["does not fit backbone 'cnn'", "num_classes=10", "shape mismatch", "classifier"]),
    ("ckpt-path-missing", lambda p, a: quick(p, "--ckpt_path", str(p / "last.ckpt")), ["ckpt_path=", "does not exist"]),
    ("ckpt-path-random-bytes", lambda p, a: quick(p, "--ckpt_path", corrupt_copy(a["fp_ckpt"], p / "x.ckpt", "random")),
     ["ckpt_path=", "not a PyTorch checkpoint"]),
    ("ckpt-path-truncated-last", lambda p, a: quick(p, "--ckpt_path", "last", "--trainer.fast_dev_run", "false") if corrupt_copy(
        a["fp_ckpt"], p / "run" / "checkpoints" / "last.ckpt", "truncated") else None, ["ckpt_path=last (", "last.ckpt) cannot be read", "truncated or corrupt"]),
    ("ckpt-path-state-missing-a-key", lambda p, a: quick(p, "--ckpt_path", (lambda c: c["state_dict"].pop("model.classifier.0.bias")
        is not None and torch.save(c, p / "edited.ckpt") or str(p / "edited.ckpt"))(torch.load(a["fp_ckpt"], weights_only=True))),
     ["does not fit this model", "1 keys missing from the checkpoint (e.g. model.classifier.0.bias)"]),
    ("ckpt-path-plain-state-dict", lambda p, a: quick(p, "--ckpt_path", str(a["cnn_sd"])),
     ["not a Lightning checkpoint", "--model.fp_checkpoint"]),
    ("ckpt-path-other-backbone", lambda p, a: quick(p, "--ckpt_path", str(a["cnn_bn_ckpt"])),
     ["checkpoint of another run", "backbone: checkpoint 'cnn_bn', model 'cnn'"]),
    ("ckpt-path-other-method", lambda p, a: quick(p, "--model", "MetaQuant", "--ckpt_path", str(a["fp_ckpt"])),
     ["method: checkpoint Classifier, model MetaQuant", "bits:", "--model.fp_checkpoint"]),
    ("ckpt-path-other-bit-width", lambda p, a: quick(p, "--model", "MetaQuant", "--model.bits", "2", "--ckpt_path",
                                                     as_metaquant_1bit(a["fp_ckpt"], p / "mq1.ckpt")),
     ["checkpoint of another run", "bits: checkpoint 1, model 2"]),
    ("ckpt-path-other-num-classes", lambda p, a: tin_args(p, tiny_imagenet(p), "--ckpt_path", str(a["fp_ckpt"]),
                                                          "--trainer.fast_dev_run", "false", "--trainer.max_epochs", "2"),
     ["does not fit this model", "num_classes: checkpoint 10, model 3", "in_channels: checkpoint 1, model 3"]),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_gives_one_line(make, expected, tmp_path, assets, capsys):
    argv = make(tmp_path, assets)
    check(argv, expected, capsys)
    assert not (tmp_path / "pwned").exists()  # nothing in a dataset/checkpoint file was executed


# ---- bit-widths of every registered method (methods registered later are covered automatically)
BAD_BITS = {
    "metaquant": [("bits", "0")],
    "ptq": [("w_bits", "1"), ("w_bits", "17"), ("a_bits", "0")],
    "qat": [("w_bits", "17"), ("a_bits", "1")],
    "apot": [("bits", "1"), ("bits", "9")],
    "ttq": [],
}
BITS_CASES = [(m, opt, v) for m in sorted(set(METHODS) | set(BAD_BITS)) for opt, v in BAD_BITS.get(m, [("bits", "0")])]


@pytest.mark.parametrize("name, option, value", BITS_CASES, ids=[f"{m}-{o}-{v}" for m, o, v in BITS_CASES])
def test_bad_bit_width(name, option, value, tmp_path, capsys):
    if name not in METHODS:
        pytest.skip(f"method {name!r} is not registered in ltq.methods.METHODS yet")
    cls = METHODS[name]
    import inspect

    if option not in inspect.signature(cls.__init__).parameters:
        pytest.skip(f"{cls.__name__} has no option {option!r}")
    check(quick(tmp_path, "--model", cls.__name__, f"--model.{option}", value), [f"model.{option}={value}"], capsys)


# ---- calibration (PTQ) and the Python API
def test_zero_calibration_batches(tmp_path, capsys):
    if "ptq" not in METHODS:
        pytest.skip("PTQ is not registered in ltq.methods.METHODS yet")
    check(quick(tmp_path, "--model", METHODS["ptq"].__name__, "--model.calib_batches", "0", sub="test"),
          ["model.calib_batches=0"], capsys)


def test_empty_calibration_set():
    """Python API: a calibration loader that yields nothing, and a request for zero batches."""
    if "ptq" not in METHODS:
        pytest.skip("PTQ is not registered in ltq.methods.METHODS yet")
    model = METHODS["ptq"](backbone="cnn", in_channels=1)
    with pytest.raises(ConfigError, match="zero batches"):
        model.calibrate(DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28)), batch_size=4))


def test_calibration_loader_of_zero_batches():
    from ltq.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(root="/nonexistent", num_workers=0)
    with pytest.raises(ConfigError, match=r"calibration num_batches=0"):
        dm.calibration_dataloader(num_batches=0)


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0 and "--guard.check_every_n_steps" in capsys.readouterr().out
