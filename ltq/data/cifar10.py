"""CIFAR-10 (10 classes, 32x32 RGB, 50k train / 10k test).

Two on-disk layouts are detected automatically under ``root``:

* torchvision's pickled batches: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}`` (``root`` may also be the ``cifar-10-batches-py`` folder itself). Each batch
  is a pickled dict whose ``data`` entry is a uint8 array ``N x 3072`` (1024 red, then 1024
  green, then 1024 blue values of a row-major 32x32 image) and whose ``labels`` entry is a list
  of ints. With ``download=False`` these are read by :class:`CIFAR10Pickled` (no MD5 check,
  so regenerated or re-pickled copies work); with ``download=True`` torchvision's
  :class:`~torchvision.datasets.CIFAR10` downloads, verifies and reads them.
* image folders: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or the same under
  ``root/cifar10-jpeg/``), e.g. the JPEG copy in ``/work/shared/data``. If the ten folder names
  are the CIFAR-10 class names, labels follow the standard CIFAR-10 order.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torchvision
from torch.utils.data import Dataset

from ltq.data.base import (ArrayImageDataset, ClassificationDataModule, ImageFileDataset, list_class_images,
                           missing_root_error)
from ltq.data.transforms import CIFAR10_MEAN, CIFAR10_STD, cifar10_transforms
from ltq.errors import ConfigError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds what a CIFAR batch holds (dicts, lists, strings, numbers and
    numpy arrays): any other global (a class or function a crafted file could call) is refused,
    so reading a dataset from an untrusted source cannot run code. The ``pickle`` analogue of
    ``torch.load(weights_only=True)``."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not part of a CIFAR-10 batch)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Load one CIFAR batch; keys come back as ``str`` whether they were pickled as bytes or str."""
    if not path.is_file():
        raise ConfigError(f"data.root: CIFAR-10 batch file {path} is missing")
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise ConfigError(f"data.root: cannot unpickle CIFAR-10 batch file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(entry, dict):
        raise ConfigError(f"data.root: CIFAR-10 batch file {path} does not hold a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


class CIFAR10Pickled(ArrayImageDataset):
    """The python-pickle CIFAR-10 batches read without torchvision's MD5 check.

    ``root`` is the folder holding ``cifar-10-batches-py/``. Items are ``(PIL RGB image, label)``
    exactly as :class:`torchvision.datasets.CIFAR10` returns them with ``transform=None``.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True):
        base = Path(root) / BATCHES_DIR
        data, labels = [], []
        for name in TRAIN_BATCHES if train else TEST_BATCHES:
            entry = _unpickle(base / name)
            if "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
                raise ConfigError(f"data.root: CIFAR-10 batch file {base / name} lacks the 'data'/'labels' entries")
            arr = np.asarray(entry["data"], dtype=np.uint8)
            lab = list(entry.get("labels", entry.get("fine_labels")))
            if arr.ndim != 2 or arr.shape[1] != 3072 or len(arr) != len(lab):
                raise ConfigError(f"data.root: CIFAR-10 batch file {base / name} has data {arr.shape} and "
                                  f"{len(lab)} labels; expected N x 3072 and N labels")
            data.append(arr)
            labels.extend(lab)
        images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        classes = list(CIFAR10_CLASSES)
        meta = base / "batches.meta"
        if meta.is_file():
            names = _unpickle(meta).get("label_names")
            if names:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        super().__init__(np.ascontiguousarray(images), labels, classes)


def detect_cifar10_layout(root: str | os.PathLike) -> tuple[str, Path] | None:
    """``("pickled", dir_holding_batches_folder)`` or ``("folders", dir_holding_train_test)`` or None."""
    root = Path(root)
    if (root / BATCHES_DIR / TRAIN_BATCHES[0]).is_file():
        return "pickled", root
    if (root / TRAIN_BATCHES[0]).is_file() and root.name == BATCHES_DIR:
        return "pickled", root.parent
    for cand in (root, root / "cifar10-jpeg", root / "cifar10"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return "folders", cand
    return None


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 with the standard augmentation (RandomCrop 32 pad 4 + horizontal flip).

    Inputs are standardised with mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616).
    See :class:`~ltq.data.base.ClassificationDataModule` for the common arguments.
    """

    NAME = "cifar10"
    NUM_CLASSES = 10
    IN_CHANNELS = 3
    IMAGE_SIZE = 32
    CLASSES = CIFAR10_CLASSES
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        root: str = "data/cifar10",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        pin_memory: bool | None = None,
        limit_train_samples: int | None = None,
    ):
        super().__init__(root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         download=download, val_fraction=val_fraction, split_seed=split_seed, augment=augment,
                         pin_memory=pin_memory, limit_train_samples=limit_train_samples)
        self.layout: str | None = None

    def prepare_data(self) -> None:
        if not self.download or detect_cifar10_layout(self.root) is not None:
            return
        try:
            for train in (True, False):
                torchvision.datasets.CIFAR10(self.root, train=train, download=True)
        except Exception as exc:
            msg = " ".join(str(exc).split())
            raise ConfigError(f"data.download: downloading CIFAR-10 into data.root={self.root} failed "
                              f"({type(exc).__name__}: {msg}); point --data.root at a local copy") from exc

    def _make_sources(self) -> tuple[Dataset, Dataset, None]:
        if not Path(self.root).exists():
            raise missing_root_error(self.root)
        found = detect_cifar10_layout(self.root)
        if found is None:
            raise ConfigError(f"data.root={self.root} holds neither {BATCHES_DIR}/ (pickled batches) nor "
                              f"train/<class>/ and test/<class>/ image folders")
        self.layout, base = found
        if self.layout == "pickled":
            if self.download:  # torchvision's reader verifies the MD5 sums of the official files
                try:
                    return (torchvision.datasets.CIFAR10(str(base), train=True, download=False),
                            torchvision.datasets.CIFAR10(str(base), train=False, download=False), None)
                except RuntimeError as exc:
                    raise ConfigError(f"data.root={self.root}: {BATCHES_DIR}/ fails torchvision's MD5 check "
                                      f"({exc}); pass --data.download false to read it without the check") from exc
            return CIFAR10Pickled(base, train=True), CIFAR10Pickled(base, train=False), None
        names = sorted(e.name for e in os.scandir(base / "train") if e.is_dir() and not e.name.startswith("."))
        if len(names) != self.NUM_CLASSES:
            raise ConfigError(f"data.root={self.root}: {base / 'train'} has {len(names)} class folders, CIFAR-10 "
                              f"needs 10; use --data image_folder for other datasets")
        classes = list(CIFAR10_CLASSES) if set(names) == set(CIFAR10_CLASSES) else names
        train = ImageFileDataset(list_class_images(base / "train", classes, "data.root"), classes)
        test = ImageFileDataset(list_class_images(base / "test", classes, "data.root"), classes)
        return train, test, None

    def _make_transforms(self):
        return cifar10_transforms(augment=True)
