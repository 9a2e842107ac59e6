"""Tests of ltq.data: DataModules over generated files in the real formats, and over the real copies."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import (CIFAR10_CLASS_NAMES, TINY_WNIDS, cifar_marker, class_colour, make_class_folders,
                      make_fashion_mnist, md5sum, write_idx)
from ltq.data import (DATAMODULES, CIFAR10DataModule, CIFAR10Pickled, ClassificationDataModule,
                      FashionMNISTDataModule, ImageFolderDataModule, TinyImageNetDataModule)
from ltq.data import fashion_mnist as fm_module
from ltq.data.base import load_image, split_indices
from ltq.data.transforms import (CIFAR10_MEAN, CIFAR10_STD, RandomEnhance, RandomGaussianRotation,
                                 tiny_imagenet_transforms)
from ltq.errors import ConfigError

W0 = dict(num_workers=0)


def first_batch(loader):
    return next(iter(loader))


def all_batches(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- registry / static
def test_registry_and_static_properties(image_folder_root):
    assert set(DATAMODULES) == {"cifar10", "fashion_mnist", "tiny_imagenet", "image_folder"}
    expect = {"cifar10": (10, 3, 32), "fashion_mnist": (10, 1, 28), "tiny_imagenet": (200, 3, 56)}
    for name, (nc, ch, size) in expect.items():
        dm = DATAMODULES[name](root="/nonexistent/ltq-data", batch_size=8)  # no file access needed
        assert isinstance(dm, ClassificationDataModule)
        assert (dm.name, dm.num_classes, dm.in_channels, dm.image_size) == (name, nc, ch, size)
        assert dm.input_shape == (ch, size, size)
        assert dm.hparams["root"] == "/nonexistent/ltq-data" and dm.hparams["batch_size"] == 8
    dm = ImageFolderDataModule(str(image_folder_root), batch_size=4, image_size=24)
    assert (dm.name, dm.num_classes, dm.in_channels, dm.image_size) == ("image_folder", 3, 3, 24)
    assert dm.classes == ["bird", "cat", "dog"]
    assert TinyImageNetDataModule("x", crop_size=64).image_size == 64


def test_defaults_roots_and_loader_flags(cifar10_pickled_root):
    assert CIFAR10DataModule().root == "data/cifar10"
    assert TinyImageNetDataModule().root == "data/tiny-imagenet-200"
    dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=16, num_workers=2, pin_memory=False)
    assert dm.eval_batch_size == 16
    loader = dm.train_dataloader()  # workers only start when iterated
    assert loader.persistent_workers and loader.num_workers == 2 and not loader.pin_memory
    assert CIFAR10DataModule("x").pin_memory == torch.cuda.is_available()
    dm0 = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=16, eval_batch_size=7, **W0)
    assert not dm0.train_dataloader().persistent_workers
    assert dm0.val_dataloader().batch_size == 7 and dm0.test_dataloader().batch_size == 7


@pytest.mark.parametrize("kwargs, option", [
    (dict(val_fraction=1.0), "data.val_fraction"), (dict(val_fraction=-0.1), "data.val_fraction"),
    (dict(batch_size=0), "data.batch_size"), (dict(batch_size=-3), "data.batch_size"),
    (dict(eval_batch_size=0), "data.eval_batch_size"), (dict(num_workers=-1), "data.num_workers"),
    (dict(limit_train_samples=0), "data.limit_train_samples"),
])
def test_argument_errors(kwargs, option):
    with pytest.raises(ConfigError, match=option) as e:
        CIFAR10DataModule("x", **{"batch_size": 4, **kwargs})
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_pickled_reader_matches_torchvision(cifar10_pickled_root, monkeypatch):
    base = cifar10_pickled_root / "cifar-10-batches-py"
    cls = torchvision.datasets.CIFAR10  # point its MD5 table at the generated files
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5sum(base / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5sum(base / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5sum(base / "batches.meta")})
    for train in (True, False):
        ours, ref = CIFAR10Pickled(cifar10_pickled_root, train=train), cls(str(cifar10_pickled_root), train=train)
        assert len(ours) == len(ref) == (100 if train else 20)
        assert np.array_equal(ours.data, ref.data) and list(ours.targets) == list(ref.targets)
        assert ours.classes == ref.classes == list(CIFAR10_CLASS_NAMES)
        img, y = ours[7]
        assert img.mode == "RGB" and img.size == (32, 32) and img.getpixel((0, 0)) == cifar_marker(y)


def test_cifar10_pickled_datamodule(cifar10_pickled_root):
    torch.manual_seed(0)
    dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=16, **W0)
    dm.setup("fit")
    assert dm.layout == "pickled"
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (90, 10, 20)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    # eval images: ToTensor + standardisation, pixel (0, 0) decodes back to the label marker
    x, y = all_batches(dm.test_dataloader())
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    pix = (x[:, :, 0, 0] * std + mean) * 255
    expect = torch.tensor([cifar_marker(int(v)) for v in y], dtype=torch.float32)
    assert torch.allclose(pix, expect, atol=1e-3)


def test_cifar10_batches_dir_as_root(cifar10_pickled_root):
    dm = CIFAR10DataModule(str(cifar10_pickled_root / "cifar-10-batches-py"), batch_size=4, **W0)
    dm.setup()
    assert dm.layout == "pickled" and len(dm.test_dataset) == 20


def test_cifar10_folder_layout(cifar10_folder_root):
    dm = CIFAR10DataModule(str(cifar10_folder_root), batch_size=8, val_fraction=0.25, augment=False, **W0)
    dm.setup()
    assert dm.layout == "folders"
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 20)
    x, y = all_batches(dm.test_dataloader())
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    pix = ((x[:, :, 5, 5] * std + mean) * 255).round()
    assert torch.equal(pix, torch.tensor([class_colour(int(v)) for v in y], dtype=torch.float32))
    assert sorted(torch.bincount(y).tolist()) == [2] * 10


def test_cifar10_missing_root_and_unknown_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        CIFAR10DataModule(str(missing), batch_size=4, **W0).setup()
    assert str(e.value) == (f"data.root={missing} does not exist; pass --data.download true "
                            f"or point --data.root at a copy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither cifar-10-batches-py"):
        CIFAR10DataModule(str(tmp_path / "empty"), batch_size=4, **W0).setup()


def test_cifar10_corrupt_batch_and_image(cifar10_pickled_root, cifar10_folder_root, tmp_path):
    bad = Path(shutil.copytree(cifar10_pickled_root, tmp_path / "bad_pickle"))
    (bad / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="data_batch_3"):
        CIFAR10DataModule(str(bad), batch_size=4, **W0).setup()
    bad = Path(shutil.copytree(cifar10_folder_root, tmp_path / "bad_img"))
    broken = bad / "test" / "cat" / "0000.png"
    broken.write_bytes(b"\x89PNG garbage")
    dm = CIFAR10DataModule(str(bad), batch_size=4, **W0)
    dm.setup()
    with pytest.raises(ConfigError, match="cannot read image file .*0000.png"):
        all_batches(dm.test_dataloader())
    (bad / "train" / "dog").joinpath("x.txt").write_text("")
    for f in (bad / "train" / "dog").glob("*.png"):
        f.unlink()
    with pytest.raises(ConfigError, match="train/dog is empty"):
        CIFAR10DataModule(str(bad), batch_size=4, **W0).setup()


def test_image_error_stays_one_line_through_workers(tmp_path):
    from torch._utils import ExceptionWrapper  # what a DataLoader worker uses to re-raise

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    try:
        load_image(bad)
    except ConfigError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ConfigError) as e:
        wrapped.reraise()
    assert str(e.value) == f"cannot read image file {bad}: cannot identify image file"


def test_cifar10_download_failure_is_config_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ConfigError, match="data.download"):
        CIFAR10DataModule(str(tmp_path / "dl"), batch_size=4, download=True, **W0).prepare_data()


# --------------------------------------------------------------------------- splits and loaders
def test_split_disjoint_deterministic_and_limited(cifar10_pickled_root):
    def make(**kw):
        dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=8, **W0, **kw)
        dm.setup("fit")
        return dm

    a, b = make(), make()
    tr, va = list(a.train_dataset.indices), list(a.val_dataset.indices)
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(100)) and len(va) == 10
    assert tr == list(b.train_dataset.indices) and va == list(b.val_dataset.indices)
    assert va != list(make(split_seed=1).val_dataset.indices)
    lim = make(limit_train_samples=25)
    assert list(lim.train_dataset.indices) == tr[:25] and list(lim.val_dataset.indices) == va
    # validation never comes from the test set: it indexes the training source
    assert a.val_dataset.dataset.source is a.train_dataset.dataset.source is not a.test_dataset.source
    assert make(val_fraction=0.0).val_dataloader() == []
    assert split_indices(7, 0.01, 0)[1] != [] and len(split_indices(7, 0.0, 0)[1]) == 0


def test_eval_deterministic_train_random(cifar10_pickled_root):
    dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=100, **W0)
    dm.setup()
    torch.manual_seed(0)
    v1, t1 = all_batches(dm.val_dataloader()), all_batches(dm.test_dataloader())
    torch.manual_seed(1)
    v2, t2 = all_batches(dm.val_dataloader()), all_batches(dm.test_dataloader())
    assert torch.equal(v1[0], v2[0]) and torch.equal(v1[1], v2[1]) and torch.equal(t1[0], t2[0])
    train_ds = dm.train_dataset
    torch.manual_seed(0)
    a = torch.stack([train_ds[i][0] for i in range(20)])
    torch.manual_seed(1)
    b = torch.stack([train_ds[i][0] for i in range(20)])
    assert not torch.equal(a, b)  # random crop / flip
    torch.manual_seed(0)
    assert torch.equal(a, torch.stack([train_ds[i][0] for i in range(20)]))  # seeded => reproducible
    y1 = first_batch(dm.train_dataloader())[1]
    y2 = first_batch(dm.train_dataloader())[1]
    assert not torch.equal(y1, y2)  # shuffled


def test_augment_false_uses_eval_transform(cifar10_pickled_root):
    dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=8, augment=False, **W0)
    dm.setup()
    torch.manual_seed(0)
    a = dm.train_dataset[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, dm.train_dataset[0][0])


def test_calibration_dataloader(cifar10_pickled_root):
    dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=8, **W0)
    loader = dm.calibration_dataloader(num_batches=3, batch_size=5)  # sets up on demand
    torch.manual_seed(0)
    x1, y1 = all_batches(loader)
    torch.manual_seed(1)
    x2, y2 = all_batches(dm.calibration_dataloader(num_batches=3, batch_size=5))
    assert x1.shape == (15, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(loader) == 3 and not loader.persistent_workers
    assert list(loader.dataset.indices) == list(dm.train_dataset.indices[:15])
    assert not set(loader.dataset.indices) & set(dm.val_dataset.indices)
    assert len(dm.calibration_dataloader(num_batches=100)) == 90 // 8 + 1  # capped by the split
    with pytest.raises(ConfigError, match="num_batches"):
        dm.calibration_dataloader(num_batches=0)


def test_trainer_fast_dev_run(cifar10_pickled_root):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 10)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, _):
            self.log("val_loss", self.training_step(batch, _))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = CIFAR10DataModule(str(cifar10_pickled_root), batch_size=16, **W0)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    assert "val_loss" in trainer.callback_metrics


# ---------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_raw(fashion_mnist_raw_root):
    dm = FashionMNISTDataModule(str(fashion_mnist_raw_root), batch_size=10, **W0)
    dm.setup()
    assert not dm.using_sample
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (54, 6, 20)
    x, y = all_batches(dm.test_dataloader())
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, torch.arange(20) % 10)
    assert torch.allclose(x[:, 0, 0, 0] * 255, (y * 25).float(), atol=1e-4)  # ToTensor only
    torch.manual_seed(0)
    a = dm.train_dataset[0][0]
    torch.manual_seed(1)
    assert torch.equal(a, dm.train_dataset[0][0])  # no augmentation by default
    dmn = FashionMNISTDataModule(str(fashion_mnist_raw_root), batch_size=10, normalize=True, **W0)
    dmn.setup()
    assert torch.allclose(dmn.test_dataset[0][0], (x[0] - 0.2860) / 0.3530, atol=1e-5)


def test_fashion_mnist_gz_is_gunzipped_once(fashion_mnist_gz_root):
    dm = FashionMNISTDataModule(str(fashion_mnist_gz_root), batch_size=10, **W0)
    dm.setup()
    raw = fashion_mnist_gz_root / "FashionMNIST" / "raw"
    out = raw / "train-images-idx3-ubyte"
    assert out.is_file() and len(dm.test_dataset) == 20 and not dm.using_sample
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name[:-3] for p in fashion_mnist_gz_root.glob("*.gz"))
    mtime = out.stat().st_mtime_ns
    FashionMNISTDataModule(str(fashion_mnist_gz_root), batch_size=10, **W0).setup()
    assert out.stat().st_mtime_ns == mtime


def test_fashion_mnist_gz_in_raw_and_read_only(tmp_path, monkeypatch):
    root = make_fashion_mnist(tmp_path / "r", gz=True)  # gz inside FashionMNIST/raw
    dm = FashionMNISTDataModule(str(root), batch_size=10, **W0)
    dm.setup()
    assert (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    root2 = make_fashion_mnist(tmp_path / "ro", gz=True, flat=True)
    monkeypatch.setattr(fm_module, "_gunzip", lambda src, dst: False)  # as on a read-only root
    dm = FashionMNISTDataModule(str(root2), batch_size=10, **W0)
    dm.setup()
    assert len(dm.train_dataset) == 54 and not (root2 / "FashionMNIST").exists()


def test_fashion_mnist_bad_files(tmp_path):
    root = make_fashion_mnist(tmp_path / "bad")
    raw = root / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros((20, 2), np.uint8))  # magic 2050
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte has magic number 2050, expected 2049"):
        FashionMNISTDataModule(str(root), batch_size=4, **W0).setup()
    (raw / "t10k-labels-idx1-ubyte").write_bytes((raw / "train-labels-idx1-ubyte").read_bytes()[:30])
    with pytest.raises(ConfigError, match="header says"):
        FashionMNISTDataModule(str(root), batch_size=4, **W0).setup()
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte .*is missing"):
        FashionMNISTDataModule(str(root), batch_size=4, **W0).setup()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNISTDataModule(str(root), batch_size=4, **W0).setup()


def test_fashion_mnist_sample_fallback(tmp_path, caplog):
    missing = tmp_path / "absent"
    dm = FashionMNISTDataModule(str(missing), batch_size=50, **W0)
    with caplog.at_level(logging.WARNING, logger="ltq"):
        dm.setup("fit")
        dm.setup("test")
        dm.test_dataloader()
    records = [r for r in caplog.records if r.name == "ltq"]
    assert len(records) == 1 and "embedded sample" in records[0].getMessage() and "\n" not in records[0].getMessage()
    assert dm.using_sample
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3600, 400, 1000)
    x, y = first_batch(dm.test_dataloader())
    assert x.shape == (50, 1, 28, 28) and y.dtype == torch.int64
    assert torch.bincount(all_batches(dm.test_dataloader())[1]).tolist() == [100] * 10
    assert not missing.exists()
    with pytest.raises(ConfigError, match=f"data.root={missing} does not exist; pass --data.download true"):
        FashionMNISTDataModule(str(missing), batch_size=4, fallback_to_sample=False, **W0).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no Fashion-MNIST IDX files"):
        FashionMNISTDataModule(str(tmp_path / "empty"), batch_size=4, fallback_to_sample=False, **W0).setup()


def test_fashion_mnist_download_failure(tmp_path, monkeypatch, caplog):
    def offline(*a, **k):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    dm = FashionMNISTDataModule(str(tmp_path / "dl"), batch_size=4, download=True, **W0)
    with caplog.at_level(logging.WARNING, logger="ltq"):
        dm.prepare_data()
        dm.setup()
    assert dm.using_sample and "downloading failed" in caplog.text
    with pytest.raises(ConfigError, match="data.download: downloading Fashion-MNIST"):
        FashionMNISTDataModule(str(tmp_path / "dl"), batch_size=4, download=True, fallback_to_sample=False).prepare_data()


# ---------------------------------------------------------------------------------- Tiny ImageNet
def test_tiny_imagenet(tiny_imagenet_root):
    dm = TinyImageNetDataModule(str(tiny_imagenet_root), batch_size=6, val_fraction=1 / 3, **W0)
    assert dm.num_classes == 3 and dm.classes == sorted(TINY_WNIDS)  # known before setup
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 6, 6)
    torch.manual_seed(0)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (6, 3, 56, 56) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the official val set is the test set, labelled through val_annotations.txt
    test_src = dm.test_dataset.source
    for i in range(len(test_src)):
        img, label = test_src[i]
        assert img.mode == "RGB" and img.size == (64, 64)
        assert abs(np.asarray(img).mean() - (40 + 60 * label)) < 3
    # grayscale JPEGs come out as 3 equal channels
    gray = [i for i, (p, _) in enumerate(dm._train_source.samples) if Image.open(p).mode == "L"]
    assert len(gray) == 1
    arr = np.asarray(dm._train_source[gray[0]][0])
    assert arr.shape == (64, 64, 3) and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    xt, _ = all_batches(dm.test_dataloader())
    assert xt.shape == (6, 3, 56, 56)
    assert torch.equal(xt, all_batches(dm.test_dataloader())[0])


def test_tiny_imagenet_parent_root_and_no_crop(tiny_imagenet_root):
    dm = TinyImageNetDataModule(str(tiny_imagenet_root.parent), batch_size=4, crop_size=64, **W0)
    assert dm.num_classes == 3 and dm.image_size == 64
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 64, 64)


def test_tiny_imagenet_errors(tiny_imagenet_copy, tmp_path):
    base = tiny_imagenet_copy
    with pytest.raises(ConfigError, match="crop_size"):
        TinyImageNetDataModule(str(base), crop_size=65)
    with pytest.raises(ConfigError, match="does not exist; pass --data.download true"):
        TinyImageNetDataModule(str(tmp_path / "none"), **W0).setup()
    bad_img = base / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_1.JPEG"
    bad_img.write_bytes(b"\xff\xd8\xff truncated")
    dm = TinyImageNetDataModule(str(base), batch_size=4, val_fraction=0.0, **W0)
    dm.setup()
    with pytest.raises(ConfigError, match=f"cannot read image file {bad_img}"):
        all_batches(dm.calibration_dataloader(num_batches=5, batch_size=4))
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="n99999999, which is not in wnids.txt"):
        TinyImageNetDataModule(str(base), **W0).setup()
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(ConfigError, match="val_annotations.txt is missing"):
        TinyImageNetDataModule(str(base), **W0).setup()
    shutil.rmtree(base / "train" / TINY_WNIDS[2] / "images")
    (base / "train" / TINY_WNIDS[2] / "images").mkdir()
    (base / "val" / "val_annotations.txt").write_text("")
    with pytest.raises(ConfigError, match=f"{TINY_WNIDS[2]} is empty"):
        TinyImageNetDataModule(str(base), **W0).setup()
    (base / "wnids.txt").unlink()
    dm = TinyImageNetDataModule(str(base), **W0)
    assert dm.num_classes == 200
    with pytest.raises(ConfigError, match="wnids.txt is missing"):
        dm.setup()


def test_tiny_imagenet_transforms():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    train, ev = tiny_imagenet_transforms(augment=True, crop_size=56)
    torch.manual_seed(3)
    a = train(img)
    torch.manual_seed(3)
    assert a.shape == (3, 56, 56) and torch.equal(a, train(img))
    assert torch.equal(ev(img), ev(img))
    assert torch.equal(ev(img), tiny_imagenet_transforms(augment=True, crop_size=56)[1](img))
    # zero spread = identity
    assert np.array_equal(np.asarray(RandomGaussianRotation(std=0.0)(img)), np.asarray(img))
    same = RandomEnhance([(n, 0.0, 0.4, 1.6) for n in ("Color", "Contrast", "Brightness", "Sharpness")])(img)
    assert np.array_equal(np.asarray(same), np.asarray(img))
    # factors are clipped: a huge spread still yields valid images
    out = RandomEnhance([("Brightness", 100.0, 0.7, 1.3)])(img)
    assert out.size == img.size and out.mode == "RGB"


# ----------------------------------------------------------------------------------- image folder
def test_image_folder(image_folder_root):
    dm = ImageFolderDataModule(str(image_folder_root), batch_size=5, image_size=32, val_fraction=0.2,
                               train_crop="pad", **W0)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (24, 6, 9)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (5, 3, 32, 32) and y.dtype == torch.int64
    xt, yt = all_batches(dm.test_dataloader())
    mean, std = torch.tensor(dm.mean), torch.tensor(dm.std)
    classes = ("cat", "dog", "bird")  # generation order; labels follow the sorted names
    pix = ((xt[:, :, 16, 16] * std + mean) * 255).round()
    assert torch.equal(pix, torch.tensor([class_colour(classes.index(dm.classes[int(v)])) for v in yt],
                                         dtype=torch.float32))
    x2, _ = first_batch(ImageFolderDataModule(str(image_folder_root), batch_size=2, image_size=24,
                                              **W0).train_dataloader())
    assert x2.shape == (2, 3, 24, 24)


def test_image_folder_val_dir_and_errors(image_folder_root, tmp_path):
    root = Path(shutil.copytree(image_folder_root, tmp_path / "imgs"))
    shutil.rmtree(root / "test")
    make_class_folders(root / "val", ("bird", "cat", "dog"), 2, size=40)
    dm = ImageFolderDataModule(str(root), batch_size=4, image_size=32, **W0)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 6, 6)  # test falls back to val
    make_class_folders(root / "test", ("bird", "cat", "fish"), 1, size=40)
    with pytest.raises(ConfigError, match="differ from train"):
        ImageFolderDataModule(str(root), batch_size=4, **W0).setup()
    shutil.rmtree(root / "test")
    shutil.rmtree(root / "val")
    dm = ImageFolderDataModule(str(root), batch_size=4, **W0)
    with pytest.raises(ConfigError, match="no test"):
        dm.test_dataloader()
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match="train/dog is empty"):
        ImageFolderDataModule(str(root), batch_size=4, **W0).setup()
    with pytest.raises(ConfigError, match="data.root=.* does not exist"):
        ImageFolderDataModule(str(tmp_path / "none"), batch_size=4)
    with pytest.raises(ConfigError, match="data.train_crop='random'"):
        ImageFolderDataModule(str(root), batch_size=4, train_crop="random")
    with pytest.raises(ConfigError, match="data.download"):
        ImageFolderDataModule(str(root), batch_size=4, download=True)


# ------------------------------------------------------------------------------- real data copies
def test_real_cifar10_jpeg(real_cifar10_root):
    dm = CIFAR10DataModule(str(real_cifar10_root), batch_size=32, limit_train_samples=64, **W0)
    dm.setup()
    assert dm.layout == "folders" and dm.classes == list(CIFAR10_CLASS_NAMES)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (64, 5000, 10000)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (32, 3, 32, 32) and -3 < float(x.mean()) < 3
    assert torch.bincount(torch.tensor(dm.test_dataset.source.targets)).tolist() == [1000] * 10
    assert first_batch(dm.test_dataloader())[0].shape == (32, 3, 32, 32)


def test_real_tiny_imagenet(real_tiny_imagenet_root):
    dm = TinyImageNetDataModule(str(real_tiny_imagenet_root), batch_size=16, **W0)
    assert dm.num_classes == 200
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (18000, 2000, 10000)
    assert torch.bincount(torch.tensor(dm.test_dataset.source.targets)).tolist() == [50] * 200
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (16, 3, 56, 56) and int(y.max()) < 200
    assert first_batch(dm.test_dataloader())[0].shape == (16, 3, 56, 56)


@pytest.mark.slow
def test_real_fashion_mnist_gz(real_fashion_mnist_gz_dir, tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    for f in real_fashion_mnist_gz_dir.glob("*.gz"):
        shutil.copy(f, root / f.name)
    dm = FashionMNISTDataModule(str(root), batch_size=256, **W0)
    dm.setup()
    assert not dm.using_sample
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (54000, 6000, 10000)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (256, 1, 28, 28) and 0.2 < float(x.mean()) < 0.4
    # the embedded sample is an exact subset of the real files
    s = fm_module.load_sample()
    full = fm_module.read_idx(root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", 2051)
    assert np.array_equal(full[s["train_index"][:50]], s["x_train"][:50])
    with gzip.open(real_fashion_mnist_gz_dir / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert np.array_equal(labels[s["test_index"]], s["y_test"])
