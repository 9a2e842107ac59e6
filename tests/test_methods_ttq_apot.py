"""TTQ and APoT LightningModules: a few real training steps on a tiny backbone (CPU, random data)."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from ltq.callbacks.requantize import Requantize, requantize_model
from ltq.errors import ConfigError
from ltq.methods.apot import APoT
from ltq.methods.ttq import TTQ
from ltq.models import build_backbone
from ltq.quant.apot import APoTQuantizer
from ltq.quant.ttq import ttq_quantize

SMALL = dict(backbone="resnet20", num_classes=10)


def loader(n=8, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, side, side, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(callbacks=(), steps=2):
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=steps, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks),
    )


def ternary_of(layer, q):
    return ttq_quantize(layer.weight, q.w_p, q.w_n, t=q.t).detach()


class GradRecorder(Callback):
    """Records, before each optimizer step, which parameters have a non-zero gradient."""

    def __init__(self, names):
        self.names = names
        self.nonzero: dict[str, list[bool]] = {n: [] for n in names}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.model.named_parameters())
        for n in self.names:
            g = params[n].grad
            self.nonzero[n].append(g is not None and bool(g.abs().sum() > 0))


class TernaryChecker(Callback):
    """Before every training batch (i.e. after the previous step and its requantization) checks
    that every cached kernel is the ternary kernel of the current latent weight."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            return
        for _, layer, q in pl_module.ttq_layers():
            assert bool(q.cache_valid)
            assert torch.equal(q.weight_q, ternary_of(layer, q))
        self.checked += 1


def test_ttq_training_steps_keep_three_values():
    torch.manual_seed(0)
    model = TTQ(t=0.1, freeze_first_conv=True, lr=1e-2, lr_scales=5e-3, weight_decay_scales=1e-5, **SMALL)
    layers = model.ttq_layers()
    assert len(layers) == 20  # every conv but the first; fc stays float
    assert model.model.conv1.weight.requires_grad is False
    outputs = []
    hooks = [q.register_forward_hook(lambda m, i, o: outputs.append((m, o.detach()))) for _, _, q in layers]
    w_p_name = next(n for n, _ in model.model.named_parameters() if n.endswith("weight_quantizer.w_p"))
    w_n_name = w_p_name[:-1] + "n"
    latent_name = w_p_name.replace("weight_quantizer.w_p", "weight")
    rec = GradRecorder([w_p_name, w_n_name, latent_name])
    checker = TernaryChecker()
    before = {n: layer.weight.detach().clone() for n, layer, _ in layers}
    tr = trainer([rec, checker], steps=2)
    tr.fit(model, loader(), loader(4))
    for h in hooks:
        h.remove()

    # the Requantize callback was attached by the module and ran after each step
    assert any(isinstance(c, Requantize) for c in tr.callbacks)
    assert checker.checked == 1
    # every forward output (train and val) holds exactly three values {-w_n, 0, w_p}
    assert len(outputs) >= 2 * len(layers)
    for q, out in outputs:
        assert out.unique().numel() == 3
    for name, layer, q in layers:
        vals = set(q.weight_q.unique().tolist())
        assert vals == {-q.w_n.item(), 0.0, q.w_p.item()}, name
        assert torch.equal(q.weight_q, ternary_of(layer, q))
        assert not torch.equal(layer.weight.detach(), before[name])  # latent weights were trained
    # scales and latent weights received gradient
    assert all(rec.nonzero[w_p_name]) and all(rec.nonzero[w_n_name]) and all(rec.nonzero[latent_name])
    # param groups: latent weights / scales / rest with their own settings
    groups = {g["name"]: g for g in tr.optimizers[0].param_groups}
    assert {"default", "ttq_latent", "ttq_scales"} <= set(groups)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert {id(q.w_p) for _, _, q in layers} <= ids(groups["ttq_scales"])
    assert {id(layer.weight) for _, layer, _ in layers} == ids(groups["ttq_latent"])
    assert groups["ttq_scales"]["lr"] == pytest.approx(5e-3) and groups["ttq_scales"]["weight_decay"] == 1e-5
    assert groups["ttq_latent"]["lr"] == pytest.approx(1e-2)
    assert id(model.model.fc.weight) in ids(groups["default"])
    # sparsity statistics
    stats = model.sparsity_stats()
    assert 0 < stats["sparsity"] < 1 and 0 < stats["sparsity_weighted"] < 1
    assert f"{layers[0][0]}/w_p" in stats


def test_ttq_checkpoint_roundtrip_eval_sees_ternary():
    torch.manual_seed(0)
    model = TTQ(t=0.1, **SMALL)
    tr = trainer(steps=1)
    tr.fit(model, loader(), loader(4))
    state = model.state_dict()
    assert any(k.endswith("weight_q") for k in state)
    fresh = TTQ(t=0.1, **SMALL)
    fresh.load_state_dict(state)
    fresh.eval()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    for (_, _, q1), (_, _, q2) in zip(model.ttq_layers(), fresh.ttq_layers()):
        assert torch.equal(q1.weight_q, q2.weight_q) and bool(q2.initialized)


def test_requantize_callback_after_manual_step():
    torch.manual_seed(0)
    model = TTQ(t=0.1, **SMALL)
    n = requantize_model(model)
    assert n == 20
    _, layer, q = model.ttq_layers()[0]
    old = q.weight_q.clone()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    # the eval forward never returns the stale cache
    q.eval()
    with torch.no_grad():
        fresh = q(layer.weight)
    assert not torch.equal(fresh, old)
    cb = Requantize()
    cb.on_train_batch_end(None, model, None, None, 0)
    assert cb.count == 20
    assert torch.equal(q.weight_q, fresh)


def test_ttq_config_errors():
    with pytest.raises(ConfigError):
        TTQ(t=1.2, **SMALL)
    with pytest.raises(ConfigError):
        TTQ(mode="bogus", **SMALL)
    with pytest.raises(ConfigError):
        TTQ(lr_scales=-1.0, **SMALL)


def test_apot_training_steps_alpha_groups_and_values():
    torch.manual_seed(0)
    model = APoT(bits=3, lr=0.01, **SMALL)
    layers = model.apot_layers()
    assert len(layers) == 20
    first, last = model.model.conv1, model.model.fc
    assert first.act_quantizer is None and first.weight_quantizer.bits == 8
    assert last.act_quantizer is None and last.weight_quantizer.bits == 8
    wa = "layer2.0.conv1.weight_quantizer.alpha"
    aa = "layer2.0.conv1.act_quantizer.alpha"
    rec = GradRecorder([wa, aa, "layer2.0.conv1.weight"])
    outs = []
    h1 = model.model.layer2[0].conv1.weight_quantizer.register_forward_hook(lambda m, i, o: outs.append(("w", o.detach())))
    h2 = model.model.layer2[0].conv1.act_quantizer.register_forward_hook(lambda m, i, o: outs.append(("a", o.detach())))
    tr = trainer([rec], steps=2)
    tr.fit(model, loader(), loader(4))
    h1.remove()
    h2.remove()
    assert all(rec.nonzero[wa]) and all(rec.nonzero[aa]) and all(rec.nonzero["layer2.0.conv1.weight"])
    groups = {g["name"]: g for g in tr.optimizers[0].param_groups}
    act_g, w_g = groups["*act_quantizer.alpha"], groups["*weight_quantizer.alpha"]
    assert act_g["lr"] == pytest.approx(0.1) and act_g["weight_decay"] == 1e-4
    assert w_g["lr"] == pytest.approx(0.02) and w_g["weight_decay"] == 1e-4
    params = dict(model.model.named_parameters())
    assert id(params[aa]) in {id(p) for p in act_g["params"]}
    assert id(params[wa]) in {id(p) for p in w_g["params"]}
    assert len(act_g["params"]) == 20 and len(w_g["params"]) == 20
    for kind, o in outs:
        n = o.unique().numel()
        assert n <= (7 if kind == "w" else 8)
    assert any(k == "w" and o.unique().numel() == 7 for k, o in outs)
    text = model.show_params()
    assert "layer2.0.conv1" in text and len(model.alphas()) == 20


@pytest.mark.parametrize("bits,mode", [(2, "apot"), (5, "pot"), (4, "uniform")])
def test_apot_bits_and_modes_forward(bits, mode):
    torch.manual_seed(0)
    model = APoT(bits=bits, mode=mode, variant="imagenet", first_last_bits=None, **SMALL)
    assert isinstance(model.model.conv1, torch.nn.Conv2d) and not hasattr(model.model.conv1, "weight_quantizer")
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(out).all()
    wq = model.model.layer1[0].conv1.weight_quantizer
    assert isinstance(wq, APoTQuantizer) and wq.bits == bits and wq.mode == mode
    assert wq(model.model.layer1[0].conv1.weight).unique().numel() <= 2**bits - 1


def test_apot_bit_validation():
    for bits in (1, 9, 3.0):
        with pytest.raises(ConfigError, match="model.bits"):
            APoT(bits=bits, **SMALL)
    with pytest.raises(ConfigError):
        APoT(mode="log", **SMALL)
    with pytest.warns(UserWarning, match="uniform"):
        APoT(bits=7, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        APoT(bits=6, **SMALL)  # APoT B=6 levels exist for activations; weights use B=5


def test_apot_progressive_init_reports_keys(tmp_path, caplog):
    torch.manual_seed(0)
    fp = build_backbone("resnet20", num_classes=10)
    fp_path = tmp_path / "fp.pt"
    torch.save(fp.state_dict(), fp_path)
    with caplog.at_level(logging.WARNING, logger="ltq"):
        m4 = APoT(bits=4, init_checkpoint=str(fp_path), **SMALL)
    assert "full-precision" in caplog.text and "missing as expected" in caplog.text
    assert any(k.endswith("act_quantizer.alpha") for k in m4.init_report["missing"])
    assert m4.init_report["unexpected"] == []
    torch.testing.assert_close(m4.model.layer1[0].conv1.weight, fp.layer1[0].conv1.weight)

    # 4-bit -> 3-bit: α carries over, nothing missing; a Lightning-style checkpoint with a prefix
    with torch.no_grad():
        m4.model.layer1[0].conv1.weight_quantizer.alpha.fill_(1.234)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in m4.model.state_dict().items()},
            "hyper_parameters": {"backbone": "resnet20"}}
    ckpt["state_dict"]["model.extra.buffer"] = torch.zeros(1)
    ckpt_path = tmp_path / "apot4.ckpt"
    torch.save(ckpt, ckpt_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ltq"):
        m3 = APoT(bits=3, init_checkpoint=str(ckpt_path), **SMALL)
    assert m3.init_report["missing"] == []
    assert m3.init_report["unexpected"] == ["extra.buffer"]
    assert "extra.buffer" in caplog.text
    assert m3.model.layer1[0].conv1.weight_quantizer.alpha.item() == pytest.approx(1.234)

    # another backbone or another head is an error, not a silent partial load
    with pytest.raises(ConfigError, match="backbone"):
        APoT(bits=3, init_checkpoint=str(ckpt_path), backbone="resnet32", num_classes=10)
    with pytest.raises(ConfigError, match="shape mismatch"):
        APoT(bits=3, init_checkpoint=str(fp_path), backbone="resnet20", num_classes=7)
