"""Fashion-MNIST (10 classes, 28x28 grey, 60k train / 10k test), with an embedded fallback sample.

Files are the four IDX files of the official release. An IDX file starts with a big-endian
32-bit magic number ``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned byte) followed by
``ndim`` big-endian 32-bit sizes and the row-major data: images have magic ``2051`` (``0x0803``,
sizes ``N, 28, 28``) and labels magic ``2049`` (``0x0801``, size ``N``).

Where they are looked for, in this order:

1. ``root/FashionMNIST/raw/<name>`` (torchvision's layout, unzipped);
2. ``root/<name>`` (unzipped, flat);
3. ``root/<name>.gz`` or ``root/FashionMNIST/raw/<name>.gz``: gunzipped once into
   ``root/FashionMNIST/raw/`` (read straight from the ``.gz`` when ``root`` is read-only).

When none is found and ``download=False`` (or the download fails, e.g. offline) and
``fallback_to_sample=True``, the 4000-train / 1000-test sample shipped in
``ltq/assets/fashion_mnist_sample.npz`` is used and one warning is logged on the ``ltq`` logger.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torchvision
from lightning.pytorch.utilities import rank_zero_only

from ltq.data.base import ArrayImageDataset, ClassificationDataModule, log, missing_root_error
from ltq.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_transforms
from ltq.errors import ConfigError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
SAMPLE_FILE = "fashion_mnist_sample.npz"


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read a uint8 IDX file (plain or ``.gz``) and check its magic number and size."""
    path = str(path)
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"data.root: cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 8:
        raise ConfigError(f"data.root: IDX file {path} is truncated ({len(raw)} bytes)")
    found = struct.unpack(">i", raw[:4])[0]
    if found != magic:
        raise ConfigError(f"data.root: IDX file {path} has magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise ConfigError(f"data.root: IDX file {path} holds {len(raw) - header} data bytes, header says {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _gunzip(src: Path, dst: Path) -> bool:
    """Decompress ``src`` to ``dst`` atomically; False when ``dst``'s folder is not writable."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name, suffix=".part")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.replace(tmp, dst)
        return True
    except (OSError, EOFError, zlib.error) as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise ConfigError(f"data.root: cannot gunzip {src}: {exc}") from exc
        return False


def find_fashion_mnist_files(root: str | os.PathLike, gunzip: bool = True) -> dict[str, Path] | None:
    """Paths of the four IDX files under ``root`` (see module doc), or None if none is present.

    A partial set raises :class:`ConfigError` naming the first missing file.
    """
    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    found: dict[str, Path] = {}
    for key, name in FILES.items():
        for cand in (raw / name, root / name):
            if cand.is_file():
                found[key] = cand
                break
        else:
            for gz in (root / f"{name}.gz", raw / f"{name}.gz"):
                if gz.is_file():
                    found[key] = raw / name if gunzip and _gunzip(gz, raw / name) else gz
                    break
    if not found:
        return None
    missing = [FILES[k] for k in FILES if k not in found]
    if missing:
        raise ConfigError(f"data.root={root}: Fashion-MNIST file {raw / missing[0]} (or .gz) is missing")
    return found


def load_sample() -> dict[str, np.ndarray]:
    """The embedded Fashion-MNIST sample: ``x_train, y_train, x_test, y_test`` (uint8) and ``train_index, test_index``."""
    ref = resources.files("ltq").joinpath("assets", SAMPLE_FILE)
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST: 1 x 28 x 28 inputs in [0, 1] (``ToTensor`` only, as in the original recipes).

    Args (besides the common ones of :class:`~ltq.data.base.ClassificationDataModule`):
        augment: ``RandomCrop(28, padding=2)`` on training images (off by default).
        normalize: standardise with the training-set mean 0.2860 and std 0.3530 (off by default).
        fallback_to_sample: use the embedded 4000/1000-image sample when the dataset is absent
            and cannot be downloaded (one warning is logged).
    """

    NAME = "fashion_mnist"
    NUM_CLASSES = 10
    IN_CHANNELS = 1
    IMAGE_SIZE = 28
    CLASSES = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str = "data/fashion_mnist",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = False,
        pin_memory: bool | None = None,
        limit_train_samples: int | None = None,
        normalize: bool = False,
        fallback_to_sample: bool = True,
    ):
        super().__init__(root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         download=download, val_fraction=val_fraction, split_seed=split_seed, augment=augment,
                         pin_memory=pin_memory, limit_train_samples=limit_train_samples)
        self.normalize = bool(normalize)
        self.fallback_to_sample = bool(fallback_to_sample)
        self.mean, self.std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if normalize else (None, None)
        self.using_sample = False
        self._download_error: str | None = None

    def prepare_data(self) -> None:
        if not self.download or find_fashion_mnist_files(self.root, gunzip=True) is not None:
            return
        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(self.root, train=train, download=True)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            if not self.fallback_to_sample:
                raise ConfigError(f"data.download: downloading Fashion-MNIST into data.root={self.root} failed "
                                  f"({msg}); point --data.root at a local copy") from exc
            self._download_error = msg

    def _make_sources(self):
        files = find_fashion_mnist_files(self.root, gunzip=True) if Path(self.root).exists() else None
        if files is None:
            if not self.fallback_to_sample:
                if not Path(self.root).exists():
                    raise missing_root_error(self.root)
                raise ConfigError(f"data.root={self.root} has no Fashion-MNIST IDX files (expected "
                                  f"FashionMNIST/raw/train-images-idx3-ubyte or the *.gz files); pass "
                                  f"--data.download true or point --data.root at a copy")
            return self._sample_sources()
        train = ArrayImageDataset(read_idx(files["train_images"], IMAGES_MAGIC),
                                  read_idx(files["train_labels"], LABELS_MAGIC), FASHION_MNIST_CLASSES)
        test = ArrayImageDataset(read_idx(files["test_images"], IMAGES_MAGIC),
                                 read_idx(files["test_labels"], LABELS_MAGIC), FASHION_MNIST_CLASSES)
        return train, test, None

    def _sample_sources(self):
        s = load_sample()
        self.using_sample = True
        why = (f"downloading failed ({self._download_error})" if self._download_error
               else "download is off" if not self.download else "the download left no files")
        if rank_zero_only.rank == 0:
            log.warning(f"Fashion-MNIST not found under data.root={self.root} and {why}: using the embedded sample "
                        f"({len(s['y_train'])} train / {len(s['y_test'])} test images, ltq/assets/{SAMPLE_FILE}); "
                        f"pass --data.download true or --data.root for the full dataset")
        return (ArrayImageDataset(s["x_train"], s["y_train"], FASHION_MNIST_CLASSES),
                ArrayImageDataset(s["x_test"], s["y_test"], FASHION_MNIST_CLASSES), None)

    def _make_transforms(self):
        return fashion_mnist_transforms(augment=True, normalize=self.normalize)
