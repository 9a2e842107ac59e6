"""PTQ and QAT methods: calibration, freezing schedules, observers in evaluation, the CLI path."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ltq.callbacks.schedule import FreezeBatchNorm, FreezeObservers
from ltq.errors import ConfigError
from ltq.methods.base import Classifier
from ltq.methods.ptq import PTQ
from ltq.methods.qat import QAT
from ltq.nn import QuantConvBn2d, iter_quant_layers, iter_quantizers, set_fake_quant_enabled

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers
def fp_checkpoint(tmp_path: Path, backbone: str = "cnn_bn", seed: int = 0) -> tuple[Path, nn.Module]:
    """A plain state_dict of a random FP backbone (1×28×28 inputs) with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = Classifier(backbone=backbone, num_classes=10, in_channels=1).model
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / f"fp_{backbone}.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def batches(n: int = 3, bs: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(bs, 1, 28, 28, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def loader(n: int = 8, bs: int = 4, seed: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.rand(n * bs, 1, 28, 28, generator=g), torch.randint(0, 10, (n * bs,), generator=g))
    return DataLoader(ds, batch_size=bs, shuffle=False)


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    args.update(kw)
    return L.Trainer(**args)


def ptq(fp: Path, **kw) -> PTQ:
    args = dict(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp), deployed_eval=False)
    args.update(kw)
    return PTQ(**args)


def qat(fp: Path, **kw) -> QAT:
    args = dict(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp), deployed_eval=False,
                skip_first=False, skip_last=False)  # fmt: skip
    args.update(kw)
    return QAT(**args)


# ------------------------------------------------------------------------------------ PTQ
def test_ptq_calibration_is_deterministic_and_values_follow_the_grid(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    a, b = ptq(fp, skip_first=False, skip_last=False), ptq(fp, skip_first=False, skip_last=False)
    assert a.calibrate(batches()) == 3 and b.calibrate(batches()) == 3
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert int(a.calibrated) == 1
    # a second calibration of the same model gives the same ranges (observers are reset first)
    a.calibrate(batches())
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k

    for name, layer in iter_quant_layers(a.model):
        wq = layer.weight_quantizer
        q, s, z = wq.quantize_codes(layer.weight)
        assert q.abs().max() <= 127 and q.abs().max() == 127  # the largest |w| lands on the top level
        assert torch.equal((q.float() - z.reshape(-1, *[1] * (q.dim() - 1))) * s.reshape(-1, *[1] * (q.dim() - 1)),
                           layer.quantized_weight())  # fmt: skip
        # activations: x_hat / s + z is an integer in [0, 255]
        aq = layer.act_quantizer
        seen = {}
        h = aq.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
        a.model(batches(1)[0][0])
        h.remove()
        scale, zp = aq.calculate_qparams()
        codes = seen["y"] / scale + zp
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert codes.min() >= -1e-3 and codes.max() <= 255 + 1e-3


def test_ptq_folds_bn_exactly_and_8bit_logits_match_fp(tmp_path):
    fp, fp_model = fp_checkpoint(tmp_path)
    m = ptq(fp, skip_first=False, skip_last=False)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.model.modules())  # folded
    m.calibrate(batches())
    x = torch.cat([b[0] for b in batches(4, seed=7)])
    m.eval()
    with torch.no_grad():
        ref = fp_model(x)
        set_fake_quant_enabled(m.model, False)
        assert torch.allclose(m(x), ref, atol=1e-5)  # fold is exact
        set_fake_quant_enabled(m.model, True)
        out8 = m(x)
        m4 = ptq(fp, w_bits=4, a_bits=4, skip_first=False, skip_last=False)
        m4.calibrate(batches())
        out4 = m4.eval()(x)
    err8 = (out8 - ref).norm() / ref.norm()
    err4 = (out4 - ref).norm() / ref.norm()
    assert err8 < 0.03, err8
    assert err4 > 2 * err8
    assert (out8.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_ptq_bad_options_and_zero_calibration_batches(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    for kw, option in (({"w_bits": 1}, "w_bits"), ({"a_bits": 17}, "a_bits"), ({"act_observer": "histogram"}, "act_observer"),
                       ({"calib_batches": 0}, "calib_batches"), ({"int8_backend": "tensorrt"}, "int8_backend")):  # fmt: skip
        with pytest.raises(ConfigError, match=option):
            ptq(fp, **kw)
    m = ptq(fp)
    with pytest.raises(ConfigError, match="zero batches"):
        m.calibrate([])
    with pytest.raises(ConfigError, match="num_batches"):
        m.calibrate(batches(), num_batches=0)
    assert int(m.calibrated) == 0


def test_ptq_does_not_train(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="does not train"):
        trainer(max_steps=1).fit(ptq(fp), train_dataloaders=loader())


def test_ptq_trainer_test_calibrates_once_and_logs_deployed_accuracy(tmp_path, fashion_mnist_raw_root):
    from ltq.data import FashionMNISTDataModule

    fp, _ = fp_checkpoint(tmp_path)
    dm = FashionMNISTDataModule(root=str(fashion_mnist_raw_root), batch_size=16, num_workers=0)
    # without an FP checkpoint PTQ refuses to calibrate a random network
    with pytest.raises(ConfigError, match="fp_checkpoint"):
        trainer(limit_test_batches=1).test(PTQ(backbone="cnn_bn", num_classes=10, in_channels=1), datamodule=dm)

    m = ptq(fp, calib_batches=2, deployed_eval=True, skip_first=False, skip_last=False)
    res = trainer(limit_test_batches=1).test(m, datamodule=dm, verbose=False)[0]
    assert int(m.calibrated) == 1
    assert 0.0 <= res["test/deployed_acc1"] <= 1.0
    assert abs(res["test/deployed_acc1_delta"] - (res["test/deployed_acc1"] - res["test/acc1"])) < 1e-6
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.calibrate = lambda *a, **k: pytest.fail("recalibrated although calibrated=1")  # type: ignore[method-assign]
    trainer(limit_val_batches=1).validate(m, datamodule=dm, verbose=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_ptq_4bit_skips_deployed_eval(tmp_path, fashion_mnist_raw_root):
    from ltq.data import FashionMNISTDataModule

    fp, _ = fp_checkpoint(tmp_path)
    dm = FashionMNISTDataModule(root=str(fashion_mnist_raw_root), batch_size=16, num_workers=0)
    m = ptq(fp, w_bits=4, a_bits=4, calib_batches=1, deployed_eval=True)
    assert m.configure_callbacks() == []
    res = trainer(limit_test_batches=1).test(m, datamodule=dm, verbose=False)[0]
    assert "test/deployed_acc1" not in res


# ------------------------------------------------------------------------------------ QAT
class Recorder(L.Callback):
    """After every training batch: (global_step, epoch, BN running mean of the first BN, act observer max)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bn = [m for m in pl_module.model.modules() if isinstance(m, nn.BatchNorm2d)][0]
        aq = [q for n, q in iter_quantizers(pl_module.model) if n.endswith("act_quantizer")][-1]
        self.rows.append((trainer.global_step, trainer.current_epoch, bn.running_mean.clone(), aq.observer.max_val.clone()))


def _changed(rows, i):
    """Did the BN statistics / the observer change during the batch recorded at rows[i]?"""
    prev = rows[i - 1]
    return (not torch.equal(rows[i][2], prev[2]), not torch.equal(rows[i][3], prev[3]))


def test_qat_freezes_bn_and_observers_at_the_configured_step(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    torch.manual_seed(0)
    m = qat(fp, freeze_bn_step=3, freeze_observers_step=2)
    assert any(isinstance(x, QuantConvBn2d) for x in m.model.modules())
    rec = Recorder()
    trainer(max_steps=6, limit_val_batches=0, callbacks=[rec]).fit(m, train_dataloaders=loader())
    steps = [r[0] for r in rec.rows]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows[i] is recorded after the batch with global_step i
    # batch i (0-based) updates BN iff i < 3, the observers iff i < 2
    for i in range(1, 6):
        bn_changed, obs_changed = _changed(rec.rows, i)
        assert bn_changed == (i < 3), (i, bn_changed)
        assert obs_changed == (i < 2), (i, obs_changed)
    assert all(int(mod.bn_frozen) == 1 for mod in m.model.modules() if isinstance(mod, QuantConvBn2d))


def test_freeze_callbacks_at_epoch_from_trainer_callbacks(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    torch.manual_seed(0)
    m = qat(fp)
    rec = Recorder()
    cbs = [FreezeBatchNorm(epoch=1), FreezeObservers(epoch=2), rec]
    trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=cbs).fit(m, train_dataloaders=loader())
    assert [r[1] for r in rec.rows] == [0, 0, 1, 1, 2, 2]
    for i in range(1, 6):
        bn_changed, obs_changed = _changed(rec.rows, i)
        assert bn_changed == (rec.rows[i][1] < 1), i
        assert obs_changed == (rec.rows[i][1] < 2), i
    with pytest.raises(ConfigError, match="epoch or step"):
        FreezeBatchNorm()
    with pytest.raises(ConfigError, match="step"):
        FreezeObservers(step=-1)


def test_bn_freeze_survives_resume(tmp_path):
    """The plain BN after the (float) first conv is frozen by a class switch that checkpoints do not
    record; the callback re-applies it on resume."""
    fp, _ = fp_checkpoint(tmp_path)
    torch.manual_seed(0)
    m = qat(fp, skip_first=True, freeze_bn_step=2)
    t = trainer(max_steps=3, limit_val_batches=0)
    t.fit(m, train_dataloaders=loader())
    ckpt = tmp_path / "qat.ckpt"
    t.save_checkpoint(ckpt)
    plain_bn = m.model.features[1]
    assert type(plain_bn).__name__ == "FrozenBatchNorm2d"

    m2 = qat(fp, skip_first=True, freeze_bn_step=2)
    assert type(m2.model.features[1]) is nn.BatchNorm2d
    rec = Recorder()
    trainer(max_steps=6, limit_val_batches=0, callbacks=[rec]).fit(m2, train_dataloaders=loader(), ckpt_path=str(ckpt))
    assert [r[0] for r in rec.rows] == [4, 5, 6]
    assert type(m2.model.features[1]).__name__ == "FrozenBatchNorm2d"
    assert torch.equal(m2.model.features[1].running_mean, plain_bn.running_mean)
    assert all(int(x.bn_frozen) == 1 for x in m2.model.modules() if isinstance(x, QuantConvBn2d))


def test_qat_observers_do_not_learn_from_validation(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    torch.manual_seed(0)
    m = qat(fp)
    trainer(max_steps=2, limit_val_batches=0).fit(m, train_dataloaders=loader())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer(limit_val_batches=3).validate(m, dataloaders=loader(seed=5), verbose=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    flags = [v for k, v in m.state_dict().items() if k.endswith("observer_enabled")]
    assert flags and all(int(f) == 1 for f in flags)
    # a checkpoint written while evaluation has the observers suspended records the training state
    m.suspend_observers()
    assert all(int(v) == 0 for k, v in m.state_dict().items() if k.endswith("observer_enabled"))
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert all(int(v) == 1 for k, v in ckpt["state_dict"].items() if k.endswith("observer_enabled"))
    m.resume_observers()
    assert all(int(v) == 1 for k, v in m.state_dict().items() if k.endswith("observer_enabled"))


def test_qat_defaults_follow_the_original_recipe(tmp_path):
    fp, _ = fp_checkpoint(tmp_path)
    m = QAT(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp))
    hp = m.hparams
    assert (hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.scheduler) == ("sgd", 0.03, 0.5, 0.0, "none")
    assert (hp.weight_observer, hp.act_observer) == ("current", "ema")
    names = [type(c).__name__ for c in QAT(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp),
                                          freeze_bn_epoch=1, freeze_observers_step=5).configure_callbacks()]  # fmt: skip
    assert names == ["FreezeObservers", "FreezeBatchNorm", "DeployedEvaluation"]
    with pytest.raises(ConfigError, match="freeze_bn_step"):
        qat(fp, freeze_bn_step=-2)


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_ltq_test_ptq_end_to_end(tmp_path, fashion_mnist_raw_root):
    from ltq.cli import main

    _, model = fp_checkpoint(tmp_path, backbone="cnn")
    fp = tmp_path / "fp_cnn.pt"
    root = tmp_path / "run"
    common = ["--data.root", str(fashion_mnist_raw_root), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.limit_test_batches", "1"]  # fmt: skip
    cfg = str(REPO / "configs" / "ptq" / "cnn_fashionmnist.yaml")
    assert main(["test", "--config", cfg, "--model.fp_checkpoint", str(fp), "--model.calib_batches", "1", *common]) == 0
    calibrated = root / "checkpoints" / "calibrated.ckpt"
    assert calibrated.is_file()
    ck = torch.load(calibrated, map_location="cpu", weights_only=True)
    assert ck["hyper_parameters"]["_class_path"].endswith("PTQ")
    assert int(ck["state_dict"]["calibrated"]) == 1
    # testing the calibrated checkpoint does not need the FP checkpoint nor recalibration
    assert main(["test", "--config", cfg, "--model.fp_checkpoint", "null", "--ckpt_path", str(calibrated), *common]) == 0
    # user mistakes are one-line errors (exit 2)
    assert main(["test", "--config", cfg, "--model.fp_checkpoint", "null", *common]) == 2
    assert main(["test", "--config", cfg, "--model.w_bits", "1", "--model.fp_checkpoint", str(fp), *common]) == 2


@pytest.mark.slow
def test_ltq_fit_qat_end_to_end_with_resume(tmp_path, fashion_mnist_raw_root):
    from ltq.cli import main

    fp, _ = fp_checkpoint(tmp_path, backbone="cnn_bn")
    root = tmp_path / "run"
    cfg = str(REPO / "configs" / "qat" / "cnn_bn_fashionmnist.yaml")
    common = ["--config", cfg, "--model.fp_checkpoint", str(fp), "--model.w_bits", "4", "--model.a_bits", "4",
              "--model.freeze_bn_epoch", "1", "--model.freeze_observers_epoch", "1", "--data.batch_size", "16",
              "--data.root", str(fashion_mnist_raw_root), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]  # fmt: skip
    assert main(["fit", *common, "--trainer.max_epochs", "1"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file() and (root / "checkpoints" / "best.ckpt").is_file()
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(int(v) == 1 for k, v in state.items() if k.endswith("observer_enabled"))  # saved during validation
    assert main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(last)]) == 0
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert all(int(v) == 0 for k, v in state.items() if k.endswith("observer_enabled"))  # frozen from epoch 1
    assert all(int(v) == 1 for k, v in state.items() if k.endswith("bn_frozen"))
