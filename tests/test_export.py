"""Deployment: int8 conversion (torch.ao x86) ≈ fake quant, packed low-bit checkpoints, `ltq export`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ltq.errors import ConfigError
from ltq.export import (
    Int8Backend,
    check_int8,
    deployable,
    get_backend,
    load_packed,
    load_packed_model,
    save_packed,
    weight_codes,
)
from ltq.methods.base import Classifier
from ltq.methods.ptq import PTQ
from ltq.methods.qat import QAT
from ltq.nn import QuantConvBn2d, iter_quant_layers, quantize_model, uniform_policy

REPO = Path(__file__).resolve().parents[1]


def fp_checkpoint(tmp_path: Path, backbone: str, in_channels: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Classifier(backbone=backbone, num_classes=10, in_channels=in_channels).model
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"fp_{backbone}_{in_channels}.pt"
    torch.save(model.state_dict(), path)
    return path


def images(n: int, shape, seed: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def calibrated_ptq(tmp_path, backbone="cnn_bn", shape=(1, 28, 28), **kw) -> PTQ:
    fp = fp_checkpoint(tmp_path, backbone, shape[0])
    args = dict(backbone=backbone, num_classes=10, in_channels=shape[0], fp_checkpoint=str(fp), deployed_eval=False,
                skip_first=False, skip_last=False)  # fmt: skip
    args.update(kw)
    m = PTQ(**args)
    m.calibrate([images(16, shape, seed=s) for s in range(3)])
    return m.eval()


# ------------------------------------------------------------------------------------ int8
@pytest.mark.parametrize(
    "backbone,shape,skip",
    [("cnn_bn", (1, 28, 28), False), ("cnn", (3, 32, 32), False), ("cnn_bn", (3, 32, 32), True)],
)
def test_int8_model_matches_fake_quant(tmp_path, backbone, shape, skip):
    m = calibrated_ptq(tmp_path, backbone, shape, skip_first=skip, skip_last=skip)
    calib = [images(16, shape, seed=s) for s in range(3)]
    q = get_backend("ao_x86", reduce_range=False).convert(m.model, calib=calib)
    rep = q.ltq_int8_report
    assert rep["engine"] in ("x86", "fbgemm") and rep["reduce_range"] is False
    assert rep["transferred_points"] >= len(rep["int8_layers"]) - 1
    x = images(32, shape, seed=11)
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 0.05, rel
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_int8_uses_ltq_weight_codes_and_scales(tmp_path):
    m = calibrated_ptq(tmp_path)
    q = get_backend().convert(m.model, calib=[images(8, (1, 28, 28), 0)])
    for name, layer in iter_quant_layers(deployable(m.model)):
        codes, scale, _ = layer.weight_quantizer.quantize_codes(layer.weight)
        w = q.get_submodule(name).weight()
        assert torch.equal(w.int_repr().to(torch.int32), codes), name
        assert torch.allclose(w.q_per_channel_scales().float(), scale, rtol=0, atol=0), name


def test_int8_conversion_of_qat_model_folds_simulated_bn(tmp_path):
    fp = fp_checkpoint(tmp_path, "cnn_bn", 1)
    m = QAT(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp), deployed_eval=False)
    assert any(isinstance(x, QuantConvBn2d) for x in m.model.modules())
    m.train()
    with torch.no_grad():
        for s in range(3):  # a few "training" forwards initialise the EMA observers
            m(images(16, (1, 28, 28), s))
    m.eval()
    q = get_backend().convert(m.model, calib=[images(16, (1, 28, 28), 0)])
    x = images(32, (1, 28, 28), 9)
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
    assert not any(isinstance(x, QuantConvBn2d) for x in deployable(m.model).modules())


def test_int8_rejects_non_int8_models(tmp_path):
    m4 = calibrated_ptq(tmp_path, w_bits=4, a_bits=4)
    with pytest.raises(ConfigError, match="w_bits=4"):
        check_int8(m4.model)
    with pytest.raises(ConfigError, match="w_bits=4"):
        get_backend().convert(m4.model, calib=[images(4, (1, 28, 28), 0)])
    w8_float_act = calibrated_ptq(tmp_path, a_bits=None)
    with pytest.raises(ConfigError, match="no layer with 8-bit weights and 8-bit inputs"):
        check_int8(w8_float_act.model)
    fp = fp_checkpoint(tmp_path, "cnn_bn", 1)
    uncalibrated = PTQ(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp))
    with pytest.raises(ConfigError, match="never calibrated"):
        check_int8(uncalibrated.model)
    with pytest.raises(ConfigError, match="int8 backend"):
        get_backend("tensorrt")


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_int8_save_and_load_without_ltq(tmp_path):
    m = calibrated_ptq(tmp_path)
    backend = get_backend()
    x = images(8, (1, 28, 28), 3)
    q = backend.convert(m.model, calib=[x])
    path = backend.save(q, tmp_path / "model_int8.pt", x[:1], meta={"backbone": "cnn_bn"})
    loaded = Int8Backend.load(path)
    extra = {"ltq.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert b'"backbone": "cnn_bn"' in extra["ltq.json"] if isinstance(extra["ltq.json"], bytes) else '"backbone"' in extra["ltq.json"]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


# ------------------------------------------------------------------------------------ packed
@pytest.mark.parametrize("bits", [8, 4, 2, 3, 16])
def test_packed_roundtrip_and_size(tmp_path, bits):
    m = calibrated_ptq(tmp_path, w_bits=bits, a_bits=8)
    rep = save_packed(m, tmp_path / "m.ltqp")
    state = load_packed(tmp_path / "m.ltqp")
    net = deployable(m.model)
    net_state = net.state_dict()
    assert state.keys() == net_state.keys()
    for name, layer in iter_quant_layers(net):
        assert torch.equal(state[f"{name}.weight"], layer.quantized_weight()), name
    for k, v in net_state.items():
        if not any(k == f"{n}.weight" for n, _ in iter_quant_layers(net)):
            assert torch.equal(state[k], v), k
    # the largest layer (features.4: 40x40x3x3) approaches 32/bits (its 40 scales + 40 biases stay fp32)
    row = {r["layer"]: r for r in rep["layers"]}["features.4"]
    assert 0.9 * 32 / bits < row["ratio"] <= 32 / bits
    assert row["bytes"] == 14400 * bits // 8 + 4 * (40 + 40)
    # the file really holds packed codes: container of 1/2/4/8 bits (3 → 4), 16-bit codes as int16
    container = {8: 8, 4: 4, 2: 2, 3: 4, 16: 16}[bits]
    raw = torch.load(tmp_path / "m.ltqp", weights_only=True)
    entry = raw["layers"]["features.4"]
    assert entry["kind"] == "uniform" and entry["container_bits"] == container
    assert entry["packed"].numel() * entry["packed"].element_size() == 14400 * container // 8
    # a rebuilt model computes the same as the fake-quant one
    rebuilt = load_packed_model(tmp_path / "m.ltqp")
    x = images(8, (1, 28, 28), 5)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), m(x), atol=1e-6)


def test_packed_qat_model_with_simulated_bn(tmp_path):
    fp = fp_checkpoint(tmp_path, "cnn_bn", 1)
    m = QAT(backbone="cnn_bn", num_classes=10, in_channels=1, fp_checkpoint=str(fp), w_bits=4, a_bits=4,
            skip_first=False, skip_last=False, deployed_eval=False)  # fmt: skip
    with torch.no_grad():
        m.train()(images(16, (1, 28, 28), 0))
    m.eval()
    m.suspend_observers()  # as during validation/test: a bare forward would update the EMA ranges
    save_packed(m, tmp_path / "q.ltqp")
    state = load_packed(tmp_path / "q.ltqp")
    for name, layer in iter_quant_layers(m.model):
        assert torch.equal(state[f"{name}.weight"], layer.quantized_weight()), name
    x = images(8, (1, 28, 28), 6)
    with torch.no_grad():
        assert torch.allclose(load_packed_model(tmp_path / "q.ltqp")(x), m(x), atol=1e-5)


class Ternary(nn.Module):
    """A non-uniform test quantizer: per-channel ternary {-a_c, 0, +a_c} (2 bits, no quantize_codes)."""

    bits = 2

    def forward(self, w):
        a = w.abs().reshape(w.shape[0], -1).mean(1).reshape(-1, *[1] * (w.dim() - 1))
        return torch.where(w.abs() > 0.5 * a, torch.sign(w) * a, torch.zeros_like(w))

    def stats(self):
        return {}


class Binary(nn.Module):
    bits = 1

    def forward(self, w):
        return torch.where(w >= 0, 0.1, -0.1).to(w.dtype)

    def stats(self):
        return {}


def test_packed_codebook_fallback_is_lossless(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    policy = uniform_policy(8, None, skip_first=False, skip_last=False)
    policy.weight = lambda name, module, bits: Ternary() if isinstance(module, nn.Conv2d) else Binary()
    quantize_model(net, policy)
    conv, fc = net[0], net[3]
    assert weight_codes(conv)["kind"] == "codebook_per_channel"
    assert weight_codes(fc)["kind"] == "codebook"
    rep = save_packed(net, tmp_path / "t.ltqp")
    state = load_packed(tmp_path / "t.ltqp")
    assert torch.equal(state["0.weight"], conv.quantized_weight())
    assert torch.equal(state["3.weight"], fc.quantized_weight())
    raw = torch.load(tmp_path / "t.ltqp", weights_only=True)
    assert raw["layers"]["0"]["container_bits"] == 2 and raw["layers"]["3"]["container_bits"] == 1
    assert {r["layer"]: r for r in rep["layers"]}["3"]["ratio"] > 20
    with pytest.raises(ConfigError, match="class_path"):
        load_packed_model(tmp_path / "t.ltqp")


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_ltq_export_cli(tmp_path, fashion_mnist_raw_root, capsys):
    from ltq.cli import main

    fp = fp_checkpoint(tmp_path, "cnn", 1)
    root = tmp_path / "run"
    cfg = str(REPO / "configs" / "ptq" / "cnn_fashionmnist.yaml")
    args = ["test", "--config", cfg, "--model.fp_checkpoint", str(fp), "--model.calib_batches", "1",
            "--model.deployed_eval", "false", "--data.root", str(fashion_mnist_raw_root), "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_test_batches", "1"]  # fmt: skip
    assert main(args) == 0
    ckpt = root / "checkpoints" / "calibrated.ckpt"
    capsys.readouterr()
    assert main(["export", "--ckpt_path", str(ckpt), "--format", "int8", "--out", str(tmp_path / "m.pt"), "--calib_batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "argmax agreement" in out and (tmp_path / "m.pt").is_file()
    loaded = Int8Backend.load(tmp_path / "m.pt")
    with torch.no_grad():
        assert loaded(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert main(["export", "--ckpt_path", str(ckpt), "--format", "packed", "--out", str(tmp_path / "m.ltqp")]) == 0
    assert "total" in capsys.readouterr().out
    assert load_packed_model(tmp_path / "m.ltqp")(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 2
