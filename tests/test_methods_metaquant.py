"""MetaQuant LightningModule (ltq.methods.metaquant): a few CPU training steps on a tiny CNN."""

import copy
import itertools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ltq.errors import ConfigError
from ltq.methods.metaquant import MetaQuant
from ltq.nn import QuantConv2d, QuantLinear
from ltq.quant.meta import MetaWeightQuantizer


def _loader(n=12, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=False)


def _model(**kw):
    torch.manual_seed(0)
    kw.setdefault("backbone", "cnn_bn")
    kw.setdefault("meta_hidden", 4)
    return MetaQuant(**kw)


def _trainer(batches=3, epochs=1, callbacks=None, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, limit_train_batches=batches,
                     max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks or [], **kw)


def _qweights(m):
    return {n: l.weight.detach().clone() for n, l in m.model.named_modules() if isinstance(l, (QuantConv2d, QuantLinear))}


class _Snap(L.Callback):
    """Snapshots at the start and end of training batch ``idx``."""

    def __init__(self, idx):
        self.idx, self.before, self.after = idx, None, None

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if batch_idx == self.idx:
            self.before = {
                "w": _qweights(m),
                "meta": copy.deepcopy(m.meta_net),
                "prev": {n: (q.grad_prev.clone(), q.pre_weight_prev.clone()) for n, _, q in m.meta_layers()},
            }

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        if batch_idx == self.idx:
            self.after = {"w": _qweights(m)}


COMBOS = list(itertools.product(("dorefa", "bwn"), ("ste", "multifc", "fcgrad", "lstmfc"), ("sgd", "adam")))


@pytest.mark.parametrize("forward,meta,optimizer", COMBOS)
def test_all_combinations_train(forward, meta, optimizer):
    m = _model(forward=forward, meta=meta, optimizer=optimizer)
    w0 = _qweights(m)
    meta0 = copy.deepcopy(m.meta_net.state_dict()) if m.meta_net is not None else None
    trainer = _trainer(3)
    trainer.fit(m, _loader())
    assert trainer.global_step == 3  # one per batch, whatever the number of optimizers
    # every conv and the FC, first and last included, are quantized
    assert {n for n in w0} == {"features.0", "features.4", "classifier.0", "classifier.2", "classifier.4"}
    w3 = _qweights(m)
    assert all(not torch.equal(w0[n], w3[n]) for n in w0)
    assert all(torch.isfinite(w).all() for w in w3.values())
    if meta == "ste":
        assert m.meta_net is None
        return
    # the meta-network received gradient: its weights changed
    for k, v in m.meta_net.state_dict().items():
        if "hidden_state" not in k:
            assert not torch.equal(v, meta0[k]), k
    q = m.model.features[0].weight_quantizer
    assert isinstance(q, MetaWeightQuantizer) and bool(q.has_prev)
    if meta == "lstmfc":
        assert len(m.meta_net.hidden_state.names()) == 5


def test_ste_variant_equals_plain_ste_sgd_step():
    m = _model(forward="dorefa", meta="ste", optimizer="sgd", lr=0.05)
    ref = copy.deepcopy(m.model)
    loader = _loader(n=4)
    _trainer(1).fit(m, loader)
    x, y = next(iter(loader))
    ref.train()
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.05 * p.grad
    for (n, p), (_, r) in zip(m.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, r, msg=n)


@pytest.mark.parametrize("forward", ["dorefa", "bwn"])
def test_paper_update_rule_sgd(forward):
    """Step 1 is plain STE; step 2 applies W ← W − lr·c(W)⊙M_φ(g_prev, W̃_prev)."""
    lr = 0.01
    snap = _Snap(1)
    m = _model(forward=forward, meta="multifc", optimizer="sgd", lr=lr)
    ste = _model(forward=forward, meta="ste", optimizer="sgd", lr=lr)
    ste_snap = _Snap(1)
    _trainer(2, callbacks=[snap]).fit(m, _loader())
    _trainer(2, callbacks=[ste_snap]).fit(ste, _loader())
    # first step identical to STE, second step differs
    for n in snap.before["w"]:
        torch.testing.assert_close(snap.before["w"][n], ste_snap.before["w"][n])
        assert not torch.allclose(snap.after["w"][n], ste_snap.after["w"][n])
    for n, layer, q in m.meta_layers():
        w1 = snap.before["w"][n]
        g, wt = snap.before["prev"][n]
        with torch.no_grad():
            expected = w1 - lr * q.calibration(w1) * snap.before["meta"](g, wt, n)
        torch.testing.assert_close(snap.after["w"][n], expected)


def test_original_update_skips_first_step():
    m = _model(forward="dorefa", meta="fcgrad", optimizer="sgd", original_update=True)
    p0 = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    _trainer(1).fit(m, _loader())
    for n, p in m.model.named_parameters():
        torch.testing.assert_close(p, p0[n], msg=n)
    q = m.model.features[0].weight_quantizer
    assert bool(q.has_prev) and q.update_prev.abs().sum() > 0  # the STE gradient, used at step 2
    # step 2: the update is -lr·π(c⊙M(g_prev)) ...
    snap = _Snap(1)
    m2 = _model(forward="dorefa", meta="fcgrad", optimizer="sgd", original_update=True)
    _trainer(2, callbacks=[snap]).fit(m2, _loader())
    for n, layer, q in m2.meta_layers():
        w1 = snap.before["w"][n]
        g, wt = snap.before["prev"][n]
        with torch.no_grad():
            expected = w1 - 1e-3 * q.calibration(w1) * snap.before["meta"](g, wt, n)
        torch.testing.assert_close(snap.after["w"][n], expected)


@pytest.mark.parametrize("opt,kw", [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.0)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=5e-4)),
])
def test_refine_matches_torch_optimizer(opt, kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    q = torch.nn.Parameter(p.detach().clone())
    o_ref, o = opt([p], **kw), opt([q], **kw)
    for _ in range(3):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        o_ref.step()
        with torch.no_grad():
            q -= kw["lr"] * MetaQuant.refine(o, o.param_groups[0], q, g)
        torch.testing.assert_close(q, p)
    assert set(o.state[q]) == set(o_ref.state[p])


def test_gradient_clipping_limits_ordinary_updates():
    m = _model(forward="bwn", per_channel=True, meta="fcgrad", optimizer="sgd", lr=0.1, gradient_clip_val=1e-6)
    bn0 = m.model.features[1].weight.detach().clone()
    _trainer(2).fit(m, _loader())
    assert (m.model.features[1].weight - bn0).norm() <= 2 * 0.1 * 1e-6 * 1.01
    with pytest.raises(ConfigError, match="gradient_clip_val"):
        _model(gradient_clip_val=-1.0)


def test_meta_lr_follows_schedule():
    m = _model(meta="multifc", scheduler="step", step_size=1, gamma=0.1, meta_lr=1e-3)
    _trainer(1, epochs=2).fit(m, _loader())
    base, meta = [o.optimizer for o in m.optimizers()]
    assert base.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01)  # stepped after each epoch
    assert meta.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)  # set at the start of epoch 2's step
    m2 = _model(meta="multifc", scheduler="step", step_size=1, meta_lr_follows_schedule=False)
    _trainer(1, epochs=2).fit(m2, _loader())
    assert m2.optimizers()[1].optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_checkpoint_restores_lstm_hidden_state_and_buffers(tmp_path):
    m = _model(forward="dorefa", meta="lstmfc", optimizer="adam")
    trainer = _trainer(2)
    trainer.fit(m, _loader())
    ckpt = tmp_path / "mq.ckpt"
    trainer.save_checkpoint(ckpt)
    hidden = {k: v.clone() for k, v in m.meta_net.state_dict().items() if "hidden_state" in k}
    assert len(hidden) == 10  # (h, c) for 5 layers
    sd = torch.load(ckpt, weights_only=True)
    assert "model.features.0.weight_quantizer.grad_prev" in sd["state_dict"]
    assert len(sd["optimizer_states"]) == 2

    # load_from_checkpoint into a fresh module (lazy hidden-state buffers are recreated)
    loaded = MetaQuant.load_from_checkpoint(ckpt)
    for k, v in hidden.items():
        torch.testing.assert_close(loaded.meta_net.state_dict()[k], v)

    # resume: the hidden states the third step starts from are the saved ones
    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not hasattr(self, "h"):
                self.h = {k: v.clone() for k, v in module.meta_net.state_dict().items() if "hidden_state" in k}
                self.ready = module._is_ready(module.meta_layers())

    grab = Grab()
    fresh = _model(forward="dorefa", meta="lstmfc", optimizer="adam")
    _trainer(2, epochs=2, callbacks=[grab]).fit(fresh, _loader(), ckpt_path=ckpt)
    assert grab.ready  # the meta step continues without a new STE warm-up step
    for k, v in hidden.items():
        torch.testing.assert_close(grab.h[k], v)


def test_config_errors():
    with pytest.raises(ConfigError, match="model.bits"):
        _model(forward="bwn", bits=2)
    with pytest.raises(ConfigError, match="model.optimizer"):
        _model(optimizer="adamw")
    with pytest.raises(ConfigError, match="model.meta"):
        _model(meta="lstm")
    with pytest.raises(ConfigError, match="model.forward"):
        _model(forward="ternary")
    with pytest.raises(ConfigError, match="nonlinear"):
        _model(meta="multifc", nonlinear="gelu")
    # weight decay resolved from the original recipe and recorded in the hyper-parameters
    assert _model(optimizer="adam", meta="fcgrad").hparams.weight_decay == 5e-4
    assert _model(optimizer="adam", meta="ste").hparams.weight_decay == 0.0
    # policy overridable: keep the first conv in float
    m = _model(skip_first=True, forward="dorefa", bits=2)
    assert not isinstance(m.model.features[0], QuantConv2d)
    assert m.model.features[4].weight_quantizer.bits == 2
