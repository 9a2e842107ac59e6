"""Tiny ImageNet (200 classes, 64x64 RGB, 100k train / 10k labelled val), as in the TTQ recipes.

The original zip layout is read in place (nothing is moved or rewritten)::

    root/wnids.txt                               one WordNet id per line = the classes
    root/train/<wnid>/images/<wnid>_<i>.JPEG     training images (500 per class)
    root/val/images/val_<i>.JPEG                 one flat folder ...
    root/val/val_annotations.txt                 ... labelled by "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"

``root`` may also be the folder *containing* ``tiny-imagenet-200/``. The official val set has
labels but the test set does not, so ltq uses the official **val set as the test set** and carves
the validation split out of train (``val_fraction``). Labels are indices into the *sorted* list
of WordNet ids (the order torchvision's ImageFolder would give). About 2% of the images are
grayscale; all images are converted to RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.utils import download_and_extract_archive

from ltq.data.base import ClassificationDataModule, ImageFileDataset, list_class_images, missing_root_error
from ltq.data.transforms import IMAGENET_MEAN, IMAGENET_STD, tiny_imagenet_transforms
from ltq.errors import ConfigError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"


def resolve_tiny_imagenet_root(root: str | os.PathLike) -> Path | None:
    """The folder holding ``wnids.txt``: ``root`` itself or ``root/tiny-imagenet-200``; None if neither."""
    root = Path(root)
    for cand in (root, root / FOLDER):
        if (cand / "wnids.txt").is_file():
            return cand
    return None


def read_wnids(path: str | os.PathLike) -> list[str]:
    """Sorted, de-duplicated WordNet ids of ``wnids.txt`` (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return sorted({line.strip() for line in f if line.strip()})


def read_val_annotations(base: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image listed in ``base/val/val_annotations.txt``."""
    ann = base / "val" / "val_annotations.txt"
    images = base / "val" / "images"
    samples = []
    with open(ann, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) < 2:
                raise ConfigError(f"data.root: {ann} line {lineno} is not '<file> <wnid> ...'")
            fname, wnid = fields[0], fields[1]
            if wnid not in class_to_idx:
                raise ConfigError(f"data.root: {ann} line {lineno} names class {wnid}, which is not in wnids.txt")
            path = images / fname
            if not path.is_file():
                raise ConfigError(f"data.root: image file {path} listed in {ann} is missing")
            samples.append((str(path), class_to_idx[wnid]))
    if not samples:
        raise ConfigError(f"data.root: {ann} lists no images")
    return samples


class TinyImageNetDataModule(ClassificationDataModule):
    """Tiny ImageNet with the TTQ augmentation (see :func:`ltq.data.transforms.tiny_imagenet_transforms`).

    Args (besides the common ones of :class:`~ltq.data.base.ClassificationDataModule`):
        crop_size: side of the training random crop and of the eval centre crop, in ``[8, 64]``;
            ``64`` disables cropping. ``image_size`` equals ``crop_size``.

    ``num_classes`` is the number of ids in ``wnids.txt`` when the file is present at
    construction, else 200.
    """

    NAME = "tiny_imagenet"
    IN_CHANNELS = 3
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        root: str = "data/tiny-imagenet-200",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        pin_memory: bool | None = None,
        limit_train_samples: int | None = None,
        crop_size: int = 56,
    ):
        super().__init__(root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         download=download, val_fraction=val_fraction, split_seed=split_seed, augment=augment,
                         pin_memory=pin_memory, limit_train_samples=limit_train_samples)
        if not isinstance(crop_size, int) or not 8 <= crop_size <= 64:
            raise ConfigError(f"data.crop_size={crop_size!r} must be an integer in [8, 64] (64 = no crop)")
        self.crop_size = crop_size
        base = resolve_tiny_imagenet_root(root)
        self._wnids = read_wnids(base / "wnids.txt") if base is not None else None

    @property
    def num_classes(self) -> int:
        return len(self._wnids) if self._wnids else 200

    @property
    def image_size(self) -> int:
        return self.crop_size

    @property
    def classes(self) -> list[str] | None:
        return list(self._wnids) if self._wnids else None

    def prepare_data(self) -> None:
        if not self.download or resolve_tiny_imagenet_root(self.root) is not None:
            return
        try:
            download_and_extract_archive(URL, download_root=self.root, md5=ZIP_MD5)
        except Exception as exc:
            msg = " ".join(str(exc).split())
            raise ConfigError(f"data.download: downloading Tiny ImageNet into data.root={self.root} failed "
                              f"({type(exc).__name__}: {msg}); point --data.root at a local copy") from exc

    def _make_sources(self):
        root = Path(self.root)
        if not root.exists():
            raise missing_root_error(self.root)
        base = resolve_tiny_imagenet_root(root)
        if base is None:
            raise ConfigError(f"data.root={self.root}: Tiny ImageNet file {root / 'wnids.txt'} is missing "
                              f"(expected the original {FOLDER}/ tree)")
        if not (base / "val" / "val_annotations.txt").is_file():
            raise ConfigError(f"data.root={self.root}: Tiny ImageNet file {base / 'val' / 'val_annotations.txt'} "
                              f"is missing (the official val set serves as the test set)")
        wnids = read_wnids(base / "wnids.txt")
        if not wnids:
            raise ConfigError(f"data.root: {base / 'wnids.txt'} lists no classes")
        if self._wnids is not None and wnids != self._wnids:
            raise ConfigError(f"data.root: {base / 'wnids.txt'} changed after the data module was created")
        self._wnids = wnids
        train = ImageFileDataset(list_class_images(base / "train", wnids, "data.root"), wnids, mode="RGB")
        test = ImageFileDataset(read_val_annotations(base, {w: i for i, w in enumerate(wnids)}), wnids, mode="RGB")
        return train, test, None

    def _make_transforms(self):
        return tiny_imagenet_transforms(augment=True, crop_size=self.crop_size)
