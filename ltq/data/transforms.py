"""Image transforms and the train/eval pipelines of each dataset.

All random draws use torch's global generator, so ``lightning.seed_everything`` and the
per-worker seeding of :class:`torch.utils.data.DataLoader` make augmentation reproducible.
Evaluation pipelines are deterministic: they contain no random operation at all.

Pipelines
---------
* CIFAR-10 train: ``RandomCrop(32, padding=4)`` (zero padding to 40x40, then a uniformly placed
  32x32 window), horizontal flip with p=0.5, ``ToTensor`` (uint8 -> float in [0, 1]) and
  per-channel standardisation ``(x - mean) / std``. Eval: ``ToTensor`` + standardisation.
* Fashion-MNIST: ``ToTensor`` only (the original recipes do not normalise); optional
  standardisation with the training-set statistics and optional ``RandomCrop(28, padding=2)``.
* Tiny ImageNet train (the TTQ recipe): rotation by an angle ``theta ~ N(0, 15 deg)`` clipped to
  ``[-40, 40]`` degrees with bicubic resampling, ``RandomCrop(56)`` out of 64x64, horizontal
  flip, then the four PIL ``ImageEnhance`` operations (Color, Contrast, Brightness, Sharpness)
  in a random order, each with a factor ``f ~ N(1, sigma)`` clipped to ``[lo, hi]``:
  ``sigma=0.3, [0.4, 1.6]`` for Color and Sharpness and ``sigma=0.15, [0.7, 1.3]`` for Contrast
  and Brightness. An enhancement with factor ``f`` blends the image with a degenerate version
  ``d`` (grey for Color, mean grey for Contrast, black for Brightness, blurred for Sharpness):
  ``out = d + f * (img - d)``, so ``f = 1`` is the identity. Eval: ``CenterCrop(56)``.
  Both end with ImageNet standardisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageEnhance
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Statistics of the 60k Fashion-MNIST training images after ToTensor (pixel/255).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _clipped_normal(mean: float, std: float, lo: float, hi: float) -> float:
    """One draw of ``clip(N(mean, std^2), lo, hi)`` from torch's global generator."""
    return float(torch.empty(()).normal_(mean, std).clamp_(lo, hi))


class RandomGaussianRotation(torch.nn.Module):
    """Rotate a PIL image by ``theta ~ N(0, std^2)`` degrees, clipped to ``[-max_degrees, max_degrees]``.

    Unlike :class:`torchvision.transforms.RandomRotation` (uniform angle), small angles are the
    most likely, as in the TTQ Tiny ImageNet pipeline. Corners uncovered by the rotation are
    filled with ``fill`` (black by default); the output keeps the input size.
    """

    def __init__(self, std: float = 15.0, max_degrees: float = 40.0,
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC, fill: float = 0.0):
        super().__init__()
        if std < 0 or max_degrees < 0:
            raise ValueError("std and max_degrees must be non-negative")
        self.std, self.max_degrees, self.interpolation, self.fill = std, max_degrees, interpolation, fill

    def forward(self, img):
        angle = _clipped_normal(0.0, self.std, -self.max_degrees, self.max_degrees)
        return TF.rotate(img, angle, interpolation=self.interpolation, fill=self.fill)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std}, max_degrees={self.max_degrees}, interpolation={self.interpolation.value})"


class RandomEnhance(torch.nn.Module):
    """Apply PIL ``ImageEnhance`` operations in a random order with clipped-normal factors.

    ``ops`` is a sequence of ``(name, std, lo, hi)`` where ``name`` is one of ``"Color"``,
    ``"Contrast"``, ``"Brightness"``, ``"Sharpness"``. For each image a random permutation of the
    operations is drawn, and each operation uses a factor ``f = clip(1 + std * z, lo, hi)`` with
    ``z ~ N(0, 1)``. The input must be a PIL image (RGB or L).
    """

    DEFAULT_OPS = (("Color", 0.3, 0.4, 1.6), ("Contrast", 0.15, 0.7, 1.3),
                   ("Brightness", 0.15, 0.7, 1.3), ("Sharpness", 0.3, 0.4, 1.6))

    def __init__(self, ops: Sequence[tuple[str, float, float, float]] = DEFAULT_OPS):
        super().__init__()
        self.ops = tuple((str(n), float(s), float(lo), float(hi)) for n, s, lo, hi in ops)
        for name, *_ in self.ops:
            if not hasattr(ImageEnhance, name):
                raise ValueError(f"unknown ImageEnhance operation {name!r}")

    def forward(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"RandomEnhance expects a PIL image, got {type(img).__name__}")
        for i in torch.randperm(len(self.ops)).tolist():
            name, std, lo, hi = self.ops[i]
            img = getattr(ImageEnhance, name)(img).enhance(_clipped_normal(1.0, std, lo, hi))
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ops={self.ops})"


def _to_tensor(mean: Sequence[float] | None, std: Sequence[float] | None) -> list:
    out = [T.ToTensor()]
    if mean is not None and std is not None:
        out.append(T.Normalize(mean, std))
    return out


def cifar10_transforms(augment: bool = True) -> tuple[T.Compose, T.Compose]:
    """(train, eval) pipelines for 32x32 CIFAR-10 images."""
    norm = _to_tensor(CIFAR10_MEAN, CIFAR10_STD)
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(aug + norm), T.Compose(list(norm))


def fashion_mnist_transforms(augment: bool = False, normalize: bool = False) -> tuple[T.Compose, T.Compose]:
    """(train, eval) pipelines for 28x28 Fashion-MNIST images (ToTensor only by default)."""
    norm = _to_tensor(FASHION_MNIST_MEAN, FASHION_MNIST_STD) if normalize else _to_tensor(None, None)
    aug = [T.RandomCrop(28, padding=2)] if augment else []
    return T.Compose(aug + norm), T.Compose(list(norm))


def tiny_imagenet_transforms(augment: bool = True, crop_size: int = 56) -> tuple[T.Compose, T.Compose]:
    """(train, eval) pipelines of the TTQ Tiny ImageNet recipe for 64x64 images.

    ``crop_size=64`` keeps the full image (no crop in either pipeline).
    """
    norm = _to_tensor(IMAGENET_MEAN, IMAGENET_STD)
    crop_train = [T.RandomCrop(crop_size)] if crop_size < 64 else []
    crop_eval = [T.CenterCrop(crop_size)] if crop_size < 64 else []
    if augment:
        train = [RandomGaussianRotation(15.0, 40.0), *crop_train, T.RandomHorizontalFlip(), RandomEnhance()]
    else:
        train = list(crop_eval)
    return T.Compose(train + norm), T.Compose(crop_eval + norm)


def image_folder_transforms(image_size: int, mean: Sequence[float], std: Sequence[float],
                            augment: bool = True, train_crop: str = "resized") -> tuple[T.Compose, T.Compose]:
    """(train, eval) pipelines for arbitrary RGB images.

    ``train_crop="resized"``: ``RandomResizedCrop(image_size, scale=(0.25, 1))`` + flip (ImageNet
    style); eval resizes the short side to ``image_size / 0.875`` and centre-crops ``image_size``.
    ``train_crop="pad"``: resize the short side to ``image_size``, then ``RandomCrop`` with
    ``image_size // 8`` zero padding + flip (CIFAR style, for small images); eval resizes the
    short side to ``image_size`` and centre-crops.
    """
    norm = _to_tensor(mean, std)
    if train_crop == "resized":
        eval_tf = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
        aug = [T.RandomResizedCrop(image_size, scale=(0.25, 1.0)), T.RandomHorizontalFlip()]
    elif train_crop == "pad":
        eval_tf = [T.Resize(image_size), T.CenterCrop(image_size)]
        aug = [T.Resize(image_size), T.CenterCrop(image_size),
               T.RandomCrop(image_size, padding=max(1, image_size // 8)), T.RandomHorizontalFlip()]
    else:  # validated by the caller
        raise ValueError(f"train_crop={train_crop!r}")
    train = aug if augment else list(eval_tf)
    return T.Compose(train + norm), T.Compose(eval_tf + norm)
