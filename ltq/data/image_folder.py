"""Any RGB classification dataset stored as class folders.

Layout::

    root/train/<class>/**/<image>     required
    root/val/<class>/**/<image>       optional: used as the validation set when present
    root/test/<class>/**/<image>      optional: the test set (falls back to val/ when absent)

Classes are the sorted sub-folder names of ``train/``; ``val/`` and ``test/`` must have the same
folders. Without ``val/`` the validation split is carved out of ``train/`` (``val_fraction``).
With neither ``val/`` nor ``test/`` there is no test set and :meth:`test_dataloader` raises.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ltq.data.base import ClassificationDataModule, ImageFileDataset, list_class_images
from ltq.data.transforms import IMAGENET_MEAN, IMAGENET_STD, image_folder_transforms
from ltq.errors import ConfigError

TRAIN_CROPS = ("resized", "pad")


class ImageFolderDataModule(ClassificationDataModule):
    """Class-folder images, converted to RGB and standardised with ``mean``/``std``.

    Args (besides the common ones of :class:`~ltq.data.base.ClassificationDataModule`):
        image_size: side of the square model input.
        mean, std: per-channel standardisation (ImageNet statistics by default).
        train_crop: ``"resized"`` (RandomResizedCrop, for photos) or ``"pad"`` (padded RandomCrop,
            for small images); see :func:`ltq.data.transforms.image_folder_transforms`.

    ``num_classes`` and ``classes`` are read from ``root/train`` at construction, so ``root``
    must exist then.
    """

    NAME = "image_folder"
    IN_CHANNELS = 3

    def __init__(
        self,
        root: str = "data/images",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        download: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        pin_memory: bool | None = None,
        limit_train_samples: int | None = None,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_crop: str = "resized",
    ):
        super().__init__(root=root, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         download=download, val_fraction=val_fraction, split_seed=split_seed, augment=augment,
                         pin_memory=pin_memory, limit_train_samples=limit_train_samples)
        if download:
            raise ConfigError("data.download=true is not supported by image_folder; point --data.root at the images")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ConfigError(f"data.image_size={image_size!r} must be a positive integer")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"data.mean={list(mean)} / data.std={list(std)} must be 3 values each, std > 0")
        if train_crop not in TRAIN_CROPS:
            raise ConfigError(f"data.train_crop={train_crop!r} is not supported; allowed: {', '.join(TRAIN_CROPS)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._image_size = image_size
        self.train_crop = train_crop
        root_p = Path(root)
        if not root_p.exists():
            raise ConfigError(f"data.root={root} does not exist; point --data.root at a folder with train/<class>/ images")
        if not (root_p / "train").is_dir():
            raise ConfigError(f"data.root={root} has no train/ folder (expected {root}/train/<class>/<image>)")
        self._classes = sorted(e.name for e in os.scandir(root_p / "train") if e.is_dir() and not e.name.startswith("."))
        if not self._classes:
            raise ConfigError(f"data.root: {root_p / 'train'} has no class sub-folders (expected train/<class>/<image>)")

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def _split(self, name: str) -> ImageFileDataset | None:
        directory = Path(self.root) / name
        if not directory.is_dir():
            return None
        found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if found != self._classes:
            extra = sorted(set(found) ^ set(self._classes))
            raise ConfigError(f"data.root: {directory} class folders differ from train/ ({', '.join(extra[:5])})")
        return ImageFileDataset(list_class_images(directory, self._classes, "data.root"), self._classes)

    def _make_sources(self):
        train = ImageFileDataset(list_class_images(Path(self.root) / "train", self._classes, "data.root"), self._classes)
        val, test = self._split("val"), self._split("test")
        if test is None:
            test = val
        return train, test, val

    def test_dataloader(self):
        self.setup("test")
        if self.test_dataset is None:
            raise ConfigError(f"data.root={self.root} has no test/ (or val/) folder, so there is no test set")
        return super().test_dataloader()

    def _make_transforms(self):
        return image_folder_transforms(self._image_size, self.mean, self.std, augment=True, train_crop=self.train_crop)
