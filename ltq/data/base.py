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

Training order and exact resume
-------------------------------
The training loader is a :class:`ResumableDataLoader` over a :class:`ResumableSampler`, so a run
stopped in the middle of an epoch and resumed from a checkpoint (``--ckpt_path last``) sees exactly
the batches, augmentations and random numbers the uninterrupted run would have seen:

* **order**: each loader draws one seed ``s`` from torch's global generator when it is created
  (so ``seed_everything`` fixes it); epoch ``e`` visits the training indices in the order
  ``torch.randperm(n, generator=Generator().manual_seed(s + e))`` (the
  :class:`~torch.utils.data.DistributedSampler` rule, one slice per DDP rank);
* **augmentation**: sample ``i`` of epoch ``e`` is augmented with torch's default CPU generator
  temporarily seeded with ``hash(s, e, i)`` (:func:`sample_seed`) and restored afterwards, so the
  random crop/flip of a sample is a function of ``(s, e, i)`` only: the same with 0 or 8 workers,
  and the same after a resume;
* **position**: the loader counts the batches it has handed out in the current epoch;
  Lightning saves :meth:`ResumableDataLoader.state_dict` (seed, epoch, batches, and the global
  RNG states that dropout etc. draw from) in every checkpoint and calls
  :meth:`~ResumableDataLoader.load_state_dict` before it iterates again, which skips the
  batches already trained on and restores the RNG states.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

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
    """``(transform(image), label)`` over a source of ``(image, label)``; the source is shared, not copied.

    The index may be an ``int`` (the transform draws from torch's global generator, as usual) or
    a pair ``(int, seed)`` as yielded by :class:`ResumableSampler`: the transform then runs with
    torch's default CPU generator seeded with ``seed``, whose previous state is restored
    afterwards (about 4 µs per sample), so the augmentation depends on ``seed`` only.
    """

    def __init__(self, source: Dataset, transform: Callable | None):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index) -> tuple[Any, int]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        img, label = self.source[index]
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                gen = torch.default_generator
                state = gen.get_state()
                gen.manual_seed(seed)
                try:
                    img = self.transform(img)
                finally:
                    gen.set_state(state)
        return img, int(label)


class SeededSubset(Subset):
    """:class:`~torch.utils.data.Subset` that also accepts the ``(position, seed)`` indices of
    :class:`ResumableSampler` and forwards ``(indices[position], seed)`` to its dataset."""

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            i, seed = idx
            return self.dataset[(self.indices[i], seed)]
        return super().__getitem__(idx)

    def __getitems__(self, indices: list) -> list:  # the DataLoader's batched fetch
        return [self[idx] for idx in indices]


# ------------------------------------------------------------------------------- exact resume
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample ``index`` in ``epoch`` of a loader seeded with ``seed``.

    A 64-bit mix (splitmix64 finaliser) of the three numbers, so neighbouring samples/epochs get
    unrelated streams.
    """
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(DistributedSampler):
    """Shuffling sampler keyed on ``(seed, epoch)`` that can start in the middle of an epoch.

    The order is :class:`~torch.utils.data.DistributedSampler`'s (``randperm`` seeded with
    ``seed + epoch``, padded to a multiple of ``num_replicas``, rank ``r`` takes positions
    ``r, r + num_replicas, ...``); being a ``DistributedSampler``, Lightning keeps it under DDP
    instead of wrapping it. Each item is ``(index, sample_seed(seed, epoch, index))``.
    :meth:`resume_from` makes the next iteration over ``epoch`` skip its first ``skip`` items.
    Lightning calls :meth:`set_epoch` at the start of every epoch; iterating again without it
    (a plain PyTorch loop) moves on to the next epoch, so every pass is shuffled anew.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=int(seed), drop_last=False)
        self._resume: tuple[int, int] | None = None
        self._iterated = False  # this epoch was iterated (and set_epoch not called since)
        self.skipped = 0  # items skipped at the start of the current iteration

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._iterated = False

    def resume_from(self, epoch: int, skip: int) -> None:
        """Make the next iteration skip its first ``skip`` items if it iterates over ``epoch``."""
        self.set_epoch(int(epoch))
        self._resume = (int(epoch), int(skip))

    def __iter__(self):
        if self._iterated:
            self.epoch += 1
        self._iterated = True
        skip = 0
        if self._resume is not None:
            epoch, n = self._resume
            self._resume = None
            skip = n if epoch == self.epoch else 0
        self.skipped = skip
        indices = list(super().__iter__())
        seed, epoch = self.seed, self.epoch
        return iter([(i, sample_seed(seed, epoch, i)) for i in indices[skip:]])


def _rng_state() -> dict[str, Any]:
    """Global RNG states in ``torch.load(weights_only=True)``-safe types (tensors, tuples of ints)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": (version, tuple(mt), gauss),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose position in the epoch is saved in checkpoints.

    Lightning treats a loader with ``state_dict``/``load_state_dict`` as resumable: it stores
    :meth:`state_dict` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and,
    when a fit resumes, calls :meth:`load_state_dict` before iterating. The state is
    ``{"seed", "epoch", "batches", "rng"}``: the sampler's seed, the epoch being iterated, the
    number of batches handed out in it (for a sized loader Lightning fetches exactly one batch per
    training step, so this is the number of trained batches at the time of the checkpoint), and the
    global RNG states (torch CPU/CUDA, numpy, python) at that moment. Loading it makes the next
    iteration of that epoch skip ``batches * batch_size`` samples, or start the next epoch when the
    epoch was complete, and restores the RNG states, so dropout and other random draws of the
    training step continue as in the uninterrupted run. Without a :class:`ResumableSampler`
    (e.g. after Lightning replaced the sampler for ``overfit_batches``) the state is empty.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches = 0

    def __iter__(self):
        sampler = self.sampler if isinstance(self.sampler, ResumableSampler) else None
        started = False
        for batch in super().__iter__():
            if not started:  # the sampler has started this epoch's iteration by now
                started = True
                if sampler is not None:
                    self._epoch = sampler.epoch
                    self._batches = sampler.skipped // (self.batch_size or 1)
                else:
                    self._batches = 0
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"seed": int(self.sampler.seed), "epoch": int(self._epoch), "batches": int(self._batches), "rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, ResumableSampler):
            return
        sampler.seed = int(state_dict["seed"])
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # the epoch was complete: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        sampler.resume_from(epoch, batches * (self.batch_size or 1))
        self._epoch, self._batches = epoch, batches
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])


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
        self._train_loader: ResumableDataLoader | None = None
        self._pending_train_state: dict[str, Any] | None = None

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
        self.train_dataset = SeededSubset(TransformedDataset(train_src, train_tf), train_idx)
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
        """Shuffled, augmented training loader that resumes exactly mid-epoch (see the module doc).

        Its shuffle seed is drawn from torch's global generator, so ``seed_everything`` fixes it
        and two loaders of one DataModule are shuffled differently.
        """
        self.setup("fit")
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_dataset, seed=seed, shuffle=True, num_replicas=world, rank=rank)
        loader = ResumableDataLoader(
            self.train_dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            # worker base seeds from this generator, not the global one (the training step's draws
            # must not depend on when the loader was iterated)
            generator=torch.Generator().manual_seed(seed),
        )
        if self._pending_train_state:  # resuming from a checkpoint (see load_state_dict)
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training loader's state (:meth:`ResumableDataLoader.state_dict`).

        Lightning restores a loader's own state only when it resumes *inside* an epoch; a
        checkpoint written at the end of an epoch (the CLI's default) goes through this one, so
        the shuffle seed and the RNG states carry over in both cases.
        """
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the training loader's state for the next :meth:`train_dataloader` (Lightning calls
        this before it builds the loaders)."""
        self._pending_train_state = state_dict.get("train_loader") or None

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
