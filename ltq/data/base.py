"""Common base of ltq's image-classification DataModules, and small dataset helpers.

Splits
------
The validation split is carved out of the *training* set, never the test set. With ``n``
training images and ``val_fraction = f`` the first ``round(f * n)`` indices of the permutation
``torch.randperm(n, generator=Generator().manual_seed(split_seed))`` form the validation set and
the rest the training set; the two are disjoint and the split depends only on ``n`` and
``split_seed``. ``limit_train_samples = k`` keeps the first ``k`` training indices of that same
permutation, i.e. a deterministic, uniformly random subset. The training subset is read with the
augmenting transform, validation/test/calibration with the deterministic eval transform.

A subclass supplies the raw sources (datasets yielding ``(PIL image, int label)``) and the two
transforms; this class wraps them with :class:`torch.utils.data.Subset` and builds the loaders.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ltq.errors import ConfigError

log = logging.getLogger("ltq")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def missing_root_error(root: str | os.PathLike) -> ConfigError:
    """The error for an absent dataset directory when downloading is off."""
    return ConfigError(f"data.root={root} does not exist; pass --data.download true or point --data.root at a copy")


class DataFileError(ConfigError):
    """An unreadable data file (a :class:`ConfigError`), kept to one line across DataLoader workers.

    A worker process re-raises an exception as ``type(exc)("Caught ... Original Traceback ...")``;
    this class recovers the original one-line message from that text so the CLI still prints
    one line naming the file.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


# --------------------------------------------------------------------------------------- datasets
class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array ``N x H x W`` (grey) or ``N x H x W x 3`` (RGB).

    ``__getitem__`` returns ``(PIL.Image, int)`` like the torchvision datasets with
    ``transform=None``, so the usual PIL-based transforms apply unchanged.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray, classes: Sequence[str] | None = None):
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"expected uint8 N x H x W (x 3) images, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.data, self.targets = images, labels
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        img = self.data[index]
        return Image.fromarray(img), int(self.targets[index])


class ImageFileDataset(Dataset):
    """Images read from files, given as a list of ``(path, label)``.

    Each image is converted to ``mode`` (``"RGB"`` turns grayscale JPEGs into three equal
    channels). A file PIL cannot read raises :class:`ConfigError` naming the file.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str] | None = None, mode: str = "RGB"):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.classes = list(classes) if classes is not None else None
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path, self.mode), label


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image file fully and convert it to ``mode``; unreadable files raise ConfigError."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        msg = " ".join(str(exc).replace(repr(str(path)), "").replace(str(path), "").split()) or type(exc).__name__
        raise DataFileError(f"cannot read image file {path}: {msg}") from exc


def scan_class_folders(directory: str | os.PathLike, option: str = "data.root",
                       extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``directory/<class>/**/<image>`` as ``(classes, samples)``.

    Classes are the sub-directory names in sorted order (label ``i`` = ``classes[i]``), files are
    sorted too, so the result does not depend on the file system. A missing directory, one
    without class folders, or a class folder without images raises :class:`ConfigError`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{option}: class folder directory {directory} does not exist")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"{option}: {directory} has no class sub-folders (expected {directory}/<class>/<image>)")
    return classes, list_class_images(directory, classes, option, extensions)


def list_class_images(directory: str | os.PathLike, classes: Sequence[str], option: str = "data.root",
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[tuple[str, int]]:
    """Samples ``(path, label)`` of ``directory/<classes[label]>/**/<image>`` (sorted, recursive)."""
    directory = Path(directory)
    exts = tuple(e.lower() for e in extensions)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = directory / name
        files = sorted(os.path.join(dirpath, f) for dirpath, _, fnames in os.walk(class_dir)
                       for f in fnames if f.lower().endswith(exts))
        if not files:
            raise ConfigError(f"{option}: class folder {class_dir} is empty or missing (no {'/'.join(exts)} images)")
        samples.extend((f, label) for f in files)
    return samples


class TransformedDataset(Dataset):
    """``(transform(image), label)`` over a source of ``(image, label)``; the source is shared, not copied."""

    def __init__(self, source: Dataset, transform: Callable | None):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.source[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic disjoint ``(train, val)`` index lists covering ``range(n)`` (see module doc)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    return perm[n_val:], perm[:n_val]


# ------------------------------------------------------------------------------------ datamodule
class ClassificationDataModule(L.LightningDataModule):
    """Base LightningDataModule for image classification.

    Args:
        root: dataset directory.
        batch_size: training batch size (> 0).
        eval_batch_size: batch size of validation/test loaders; ``None`` = ``batch_size``.
        num_workers: DataLoader worker processes (``persistent_workers`` is on when > 0).
        download: fetch the dataset into ``root`` in :meth:`prepare_data` when absent.
        val_fraction: share of the training set held out for validation, in ``[0, 1)``; ``0``
            means no validation loader (an empty list is returned).
        split_seed: seed of the train/val permutation.
        augment: use the training augmentation (``False`` = eval transform for training too).
        pin_memory: ``None`` = pin when CUDA is available.
        limit_train_samples: keep only this many training images (deterministic subset).

    Subclasses set ``NAME``, ``NUM_CLASSES``, ``IN_CHANNELS``, ``IMAGE_SIZE`` (or override the
    properties) and implement :meth:`_make_sources` and :meth:`_make_transforms`.
    """

    NAME = "classification"
    NUM_CLASSES = 0
    IN_CHANNELS = 3
    IMAGE_SIZE = 0
    CLASSES: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None  # per-channel standardisation of the inputs (None = none)
    std: tuple[float, ...] | None = None

    def __init__(
        self,
        root: str = "data",
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
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"data.batch_size={batch_size!r} must be a positive integer")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size <= 0):
            raise ConfigError(f"data.eval_batch_size={eval_batch_size!r} must be a positive integer or null")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be an integer >= 0")
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction!r} must be in [0, 1)")
        if limit_train_samples is not None and (not isinstance(limit_train_samples, int) or limit_train_samples <= 0):
            raise ConfigError(f"data.limit_train_samples={limit_train_samples!r} must be a positive integer or null")
        self.root = str(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.download = bool(download)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.augment = bool(augment)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.limit_train_samples = limit_train_samples
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._train_source: Dataset | None = None
        self._train_indices: list[int] | None = None
        self._sources_built = False

    # ----------------------------------------------------------------- static description
    @property
    def name(self) -> str:
        """Short registry name of the dataset (``"cifar10"``, ...)."""
        return self.NAME

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    @property
    def in_channels(self) -> int:
        return self.IN_CHANNELS

    @property
    def image_size(self) -> int:
        """Side of the (square) images fed to the model, after cropping."""
        return self.IMAGE_SIZE

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def classes(self) -> list[str] | None:
        """Class names in label order, when known."""
        return list(self.CLASSES) if self.CLASSES is not None else None

    # ----------------------------------------------------------------- subclass hooks
    def _make_sources(self) -> tuple[Dataset, Dataset, Dataset | None]:
        """Return ``(train, test_or_None, val_or_None)`` raw sources yielding ``(PIL image, label)``.

        A non-``None`` third element is an explicit validation set; otherwise the validation
        split is carved out of ``train``.
        """
        raise NotImplementedError

    def _make_transforms(self) -> tuple[Callable, Callable]:
        """Return ``(train_transform, eval_transform)``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self._sources_built:
            return
        train_src, test_src, val_src = self._make_sources()
        train_tf, eval_tf = self._make_transforms()
        if not self.augment:
            train_tf = eval_tf
        self._eval_transform = eval_tf
        if val_src is None:
            train_idx, val_idx = split_indices(len(train_src), self.val_fraction, self.split_seed)
        else:
            train_idx, val_idx = list(range(len(train_src))), []
        if self.limit_train_samples is not None:
            train_idx = train_idx[: self.limit_train_samples]
        self._train_source, self._train_indices = train_src, train_idx
        self.train_dataset = Subset(TransformedDataset(train_src, train_tf), train_idx)
        if val_src is not None:
            self.val_dataset = TransformedDataset(val_src, eval_tf)
        elif val_idx:
            self.val_dataset = Subset(TransformedDataset(train_src, eval_tf), val_idx)
        else:
            self.val_dataset = None
        self.test_dataset = TransformedDataset(test_src, eval_tf) if test_src is not None else None
        self._sources_built = True

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int | None = None,
                persistent: bool = True) -> DataLoader:
        workers = self.num_workers if num_workers is None else num_workers
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          pin_memory=self.pin_memory, persistent_workers=persistent and workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def calibration_dataloader(self, num_batches: int = 10, batch_size: int | None = None,
                               num_workers: int | None = None) -> DataLoader:
        """Deterministic loader over ``num_batches * batch_size`` training-split images for PTQ calibration.

        Uses the eval transform (no augmentation) and a fixed order: the first images of the
        seeded training permutation (so never validation or test images). Two calls return the
        same batches. ``batch_size=None`` uses ``batch_size``; ``num_workers=None`` uses
        ``num_workers`` (workers are not persistent: the loader is meant to be read once).
        """
        if not isinstance(num_batches, int) or num_batches <= 0:
            raise ConfigError(f"calibration num_batches={num_batches!r} must be a positive integer")
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or bs <= 0:
            raise ConfigError(f"calibration batch_size={batch_size!r} must be a positive integer")
        self.setup("fit")
        idx = self._train_indices[: num_batches * bs]
        dataset = Subset(TransformedDataset(self._train_source, self._eval_transform), idx)
        return self._loader(dataset, bs, shuffle=False, num_workers=num_workers, persistent=False)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, batch_size={self.batch_size}, "
                f"num_classes={self.num_classes}, input_shape={self.input_shape})")
