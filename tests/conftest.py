"""Shared pytest fixtures.

Sections are owned by different parts of the test suite; add new fixtures in their own section
with descriptive names.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# =============================================================================================
# Data fixtures (tests/test_data.py): small datasets generated in their real on-disk formats
# =============================================================================================

CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHARED_DATA_DIR = Path(os.environ.get("LTQ_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))  # read-only archives
EXTRACTED_DATA_DIR = Path(os.environ.get("LTQ_DATA_DIR", "/work/data"))  # output of extract.sh


class _Py2Str(bytes):
    """A byte string pickled like a Python 2 ``str`` (opcode SHORT_BINSTRING/BINSTRING).

    The official CIFAR-10 batches were written by Python 2, so their keys unpickle as ``str``
    with ``encoding="latin1"`` (torchvision) and as ``bytes`` (``b'data'``) with
    ``encoding="bytes"``. Pickling ``_Py2Str`` keys reproduces that behaviour exactly.
    """


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us add an opcode writer
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2_pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def cifar_marker(label: int) -> tuple[int, int, int]:
    """RGB value written at pixel (0, 0) of every generated CIFAR image of class ``label``."""
    return (label * 20, 7, 250)


def make_cifar10_pickled(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` in the official format; returns ``root``.

    Each batch dict has the keys ``batch_label``, ``labels`` (list of int), ``data`` (uint8
    ``N x 3072``: the R plane, then G, then B, each 32x32 row-major) and ``filenames``;
    ``batches.meta`` holds ``label_names``, ``num_cases_per_batch`` and ``num_vis``. Labels cycle
    through 0..9 and pixel (0, 0) of each image is :func:`cifar_marker` of its label.
    """
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def batch(n: int, name: str, offset: int) -> dict:
        labels = [(offset + i) % 10 for i in range(n)]
        imgs = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        for i, y in enumerate(labels):
            imgs[i, 0, 0] = cifar_marker(y)
        data = np.ascontiguousarray(imgs.transpose(0, 3, 1, 2).reshape(n, 3072))
        return {_Py2Str(b"batch_label"): _Py2Str(name.encode()), _Py2Str(b"labels"): labels,
                _Py2Str(b"data"): data,
                _Py2Str(b"filenames"): [_Py2Str(f"img_{offset + i}.png".encode()) for i in range(n)]}

    for k in range(1, 6):
        _py2_pickle(batch(per_batch, f"training batch {k} of 5", (k - 1) * per_batch), base / f"data_batch_{k}")
    _py2_pickle(batch(n_test, "testing batch 1 of 1", 3), base / "test_batch")
    _py2_pickle({_Py2Str(b"num_cases_per_batch"): per_batch,
                 _Py2Str(b"label_names"): [_Py2Str(c.encode()) for c in CIFAR10_CLASS_NAMES],
                 _Py2Str(b"num_vis"): 3072}, base / "batches.meta")
    return root


def md5sum(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def class_colour(label: int) -> tuple[int, int, int]:
    """Solid colour of the generated folder images of class ``label`` (lossless PNG)."""
    return (10 + 23 * label, 200 - 17 * label, (90 * label) % 256)


def make_class_folders(root: Path, classes, per_class: int, size: int = 32, ext: str = ".png") -> Path:
    """``root/<class>/<i><ext>`` solid-colour images (colour :func:`class_colour` of the class index)."""
    for y, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), class_colour(y)).save(d / f"{i:04d}{ext}")
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write a uint8 array as an IDX file (magic ``0x0800 | ndim``: 2051 for N x H x W, 2049 for N)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">i", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = False, flat: bool = False,
                       seed: int = 0) -> Path:
    """Fashion-MNIST IDX files under ``root/FashionMNIST/raw/`` (or ``root/`` if ``flat``), optionally ``.gz``.

    Labels cycle through 0..9; pixel (0, 0) of each image is ``25 * label``.
    """
    rng = np.random.default_rng(seed)
    where = root if flat else root / "FashionMNIST" / "raw"
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = labels * 25
        write_idx(where / f"{prefix}-images-idx3-ubyte{suffix}", imgs, gz)
        write_idx(where / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


TINY_WNIDS = ("n01443537", "n02124075", "n09193705")  # deliberately not sorted in wnids.txt below


def make_tiny_imagenet(root: Path, per_class: int = 6, val_per_class: int = 2) -> Path:
    """The original ``tiny-imagenet-200/`` tree with 3 classes of 64x64 JPEGs; returns its path.

    ``wnids.txt`` lists the ids in a non-sorted order. The first training image of the second
    class and the first val image are grayscale JPEGs. ``val/val_annotations.txt`` uses the
    official tab-separated ``file wnid x0 y0 x1 y1`` format.
    """
    base = root / "tiny-imagenet-200"
    wnids_file_order = (TINY_WNIDS[2], TINY_WNIDS[0], TINY_WNIDS[1])
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids_file_order))
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(TINY_WNIDS)))
    rng = np.random.default_rng(0)
    for y, w in enumerate(TINY_WNIDS):
        d = base / "train" / w / "images"
        d.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert("L") if (y == 1 and i == 0) else Image.fromarray(arr)
            img.save(d / f"{w}_{i}.JPEG", format="JPEG")
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines, k = [], 0
    for j in range(val_per_class):
        for w in wnids_file_order:
            arr = np.full((64, 64, 3), 40 + 60 * TINY_WNIDS.index(w), dtype=np.uint8)
            img = Image.fromarray(arr).convert("L") if k == 0 else Image.fromarray(arr)
            img.save(base / "val" / "images" / f"val_{k}.JPEG", format="JPEG", quality=95)
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63\n")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


@pytest.fixture(scope="session")
def cifar10_pickled_root(tmp_path_factory) -> Path:
    """Folder holding ``cifar-10-batches-py/`` (5 x 20 train, 20 test images). Read-only use."""
    return make_cifar10_pickled(tmp_path_factory.mktemp("cifar10_pickled"))


@pytest.fixture(scope="session")
def cifar10_folder_root(tmp_path_factory) -> Path:
    """``train/<class>/`` (4 PNG per class) and ``test/<class>/`` (2 per class), CIFAR class names. Read-only use."""
    root = tmp_path_factory.mktemp("cifar10_folders")
    make_class_folders(root / "train", CIFAR10_CLASS_NAMES, 4)
    make_class_folders(root / "test", CIFAR10_CLASS_NAMES, 2)
    return root


@pytest.fixture(scope="session")
def fashion_mnist_raw_root(tmp_path_factory) -> Path:
    """Root with unzipped IDX files in ``FashionMNIST/raw/`` (60 train, 20 test). Read-only use."""
    return make_fashion_mnist(tmp_path_factory.mktemp("fmnist_raw"))


@pytest.fixture
def fashion_mnist_gz_root(tmp_path) -> Path:
    """Fresh root with the four gzipped IDX files directly inside it (the module gunzips them)."""
    return make_fashion_mnist(tmp_path / "fmnist_gz", gz=True, flat=True)


@pytest.fixture(scope="session")
def tiny_imagenet_root(tmp_path_factory) -> Path:
    """The ``tiny-imagenet-200`` folder of a 3-class tree (6 train, 2 val per class). Read-only use."""
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_imagenet_copy(tiny_imagenet_root, tmp_path) -> Path:
    """A private, modifiable copy of :func:`tiny_imagenet_root`."""
    return Path(shutil.copytree(tiny_imagenet_root, tmp_path / "tiny-imagenet-200"))


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory) -> Path:
    """``train/{bird,cat,dog}/`` (10 PNG of 40x40 each) and ``test/`` (3 each), no ``val/``. Read-only use."""
    root = tmp_path_factory.mktemp("imgfolder")
    make_class_folders(root / "train", ("cat", "dog", "bird"), 10, size=40)
    make_class_folders(root / "test", ("cat", "dog", "bird"), 3, size=40)
    return root


def _extracted(name: str, tmp_path_factory) -> Path:
    """``EXTRACTED_DATA_DIR/name`` if present, else extract it from the shared archives into a temp dir."""
    if (EXTRACTED_DATA_DIR / name).exists():
        return EXTRACTED_DATA_DIR / name
    archive = {"cifar10-jpeg": "cifar10-jpeg.tar.gz", "tiny-imagenet-200": "tiny-imagenet-200-mini.tar.gz"}[name]
    if not (SHARED_DATA_DIR / archive).is_file():
        pytest.skip(f"real data {name} not available (neither {EXTRACTED_DATA_DIR / name} nor {SHARED_DATA_DIR / archive})")
    dest = tmp_path_factory.mktemp(f"real_{name}")
    subprocess.run(["tar", "-xzf", str(SHARED_DATA_DIR / archive), "-C", str(dest)], check=True)
    return dest / name


@pytest.fixture(scope="session")
def real_cifar10_root(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEG copy (``train/`` and ``test/`` class folders); skips when unavailable."""
    return _extracted("cifar10-jpeg", tmp_path_factory)


@pytest.fixture(scope="session")
def real_tiny_imagenet_root(tmp_path_factory) -> Path:
    """The real reduced Tiny ImageNet tree (100 train/class, full val); skips when unavailable."""
    return _extracted("tiny-imagenet-200", tmp_path_factory)


@pytest.fixture(scope="session")
def real_fashion_mnist_gz_dir() -> Path:
    """Read-only folder with the four real Fashion-MNIST ``*.gz`` files; skips when unavailable."""
    d = SHARED_DATA_DIR / "fashion-mnist"
    if not (d / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not available under {d}")
    return d


# =============================================================================================
# Global torch state, for every test: one thread (tiny models run fastest so, and far faster on
# a shared, busy CPU); and torch.use_deterministic_algorithms, which a run with
# `trainer.deterministic: true` switches on for the whole process, is restored afterwards (the
# int8 path's quantized resize has no deterministic variant).
# =============================================================================================
@pytest.fixture(autouse=True)
def _isolated_torch_state():
    import torch

    n = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    # a module- or session-scoped fixture that ran a deterministic config may have left it on
    torch.use_deterministic_algorithms(False)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
