"""LightningDataModules for image classification.

``DATAMODULES`` maps the short names used in configs (``--data cifar10``) to the classes.
"""

from ltq.data.base import ClassificationDataModule
from ltq.data.cifar10 import CIFAR10DataModule, CIFAR10Pickled
from ltq.data.fashion_mnist import FashionMNISTDataModule
from ltq.data.image_folder import ImageFolderDataModule
from ltq.data.tiny_imagenet import TinyImageNetDataModule

DATAMODULES = {
    "cifar10": CIFAR10DataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "tiny_imagenet": TinyImageNetDataModule,
    "image_folder": ImageFolderDataModule,
}

__all__ = [
    "ClassificationDataModule",
    "CIFAR10DataModule",
    "CIFAR10Pickled",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "TinyImageNetDataModule",
    "DATAMODULES",
]
