"""Multi-process (gloo, CPU) training: every rank ends with the same quantization state, and a
2-process run on a split global batch equals a 1-process run on the whole batch.

Under pytest Lightning's plain ``ddp`` re-launches the whole session, so these use ``ddp_spawn``
(the spawned ranks send rank 0's final state_dict back to this process).
"""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ltq.methods import METHODS

pytestmark = pytest.mark.slow

# Per method: constructor kwargs for a tiny cnn on 1x28x28 inputs, no BN (per-rank BN batch
# statistics differ by design unless SyncBatchNorm is used) so that 1- and 2-process runs must
# agree to float precision.
TINY = {
    "fp": dict(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, scheduler="none"),
    "metaquant": dict(forward="bwn", meta="fcgrad", optimizer="sgd", lr=0.05, scheduler="none"),
    "qat": dict(w_bits=8, a_bits=8, optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, scheduler="none"),
    "ttq": dict(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, scheduler="none"),
    "apot": dict(bits=4, optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, scheduler="none"),
}


class InterleavedData(LightningDataModule):
    """32 fixed samples in a fixed order; with 2 ranks, rank r reads samples r, r+2, ... so that
    each global step sees the same 8 samples as a 1-process step with batch 8 (Lightning's own
    distributed sampler would shuffle)."""

    def __init__(self, global_batch: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.rand(32, 1, 28, 28, generator=g), torch.arange(32) % 10)
        self.global_batch = global_batch

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.global_batch // world, sampler=sampler)


def train(name: str, devices: int, sync_bn: bool = False) -> dict[str, torch.Tensor]:
    seed_everything(0)
    model = METHODS[name](backbone="cnn", num_classes=10, in_channels=1, **TINY[name])
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn_find_unused_parameters_true" if devices > 1 else "auto",
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, sync_batchnorm=sync_bn, deterministic=True,
        callbacks=[RanksAgree()] if devices > 1 else [], use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=InterleavedData())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class RanksAgree(Callback):
    """Runs inside each rank: all ranks hold identical parameters and buffers after training."""

    def on_train_end(self, trainer, pl_module):
        for key, value in pl_module.state_dict().items():
            if not torch.is_floating_point(value):
                continue
            gathered = trainer.strategy.all_gather(value.detach().float())
            if not torch.allclose(gathered[0], gathered[1], atol=1e-6):
                raise AssertionError(f"ranks disagree on {key}")


@pytest.mark.parametrize("name", sorted(TINY))
def test_two_process_training_equals_one_process(name):
    if name not in METHODS:
        pytest.skip(f"method {name} not registered")
    one = train(name, devices=1)
    two = train(name, devices=2)
    assert one.keys() == two.keys()
    for key in one:
        if torch.is_floating_point(one[key]):
            # Summation order differs between the all-reduce and a single batch: float noise of
            # ~1e-7 can move a value across a quantization boundary (APoT levels, activation
            # rounding), which a few SGD steps amplify to ~1e-4 of the tensor's scale.
            scale = max(one[key].abs().max().item(), 1e-3)
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-3 * scale, msg=lambda m: f"{name}: {key}: {m}")
        else:
            assert torch.equal(two[key], one[key]), key


def calibrate(devices: int, tmp_path) -> dict[str, torch.Tensor]:
    """PTQ `validate` (calibration + evaluation) of a tiny FP cnn on the embedded Fashion-MNIST sample."""
    from ltq.data import FashionMNISTDataModule

    seed_everything(0)
    fp = tmp_path / "fp.pt"
    if not fp.exists():
        torch.save(METHODS["fp"](backbone="cnn", num_classes=10, in_channels=1).model.state_dict(), fp)
    model = METHODS["ptq"](backbone="cnn", num_classes=10, in_channels=1, fp_checkpoint=str(fp), w_bits=8, a_bits=8,
                           calib_batches=4, deployed_eval=False, save_calibrated=False)
    dm = FashionMNISTDataModule(root=str(tmp_path / "absent"), batch_size=32, num_workers=0, limit_train_samples=512)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                      limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[RanksAgreeAfterValidation(tmp_path / "rank0.pt")] if devices > 1 else [])
    trainer.validate(model, datamodule=dm)
    if devices > 1:  # ddp_spawn sends weights back only after fit: read rank 0's state from disk
        return torch.load(tmp_path / "rank0.pt", weights_only=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class RanksAgreeAfterValidation(RanksAgree):
    def __init__(self, path):
        self.path = str(path)

    def on_validation_end(self, trainer, pl_module):
        self.on_train_end(trainer, pl_module)
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.path)


def test_ptq_calibration_two_processes_equals_one(tmp_path):
    one = calibrate(1, tmp_path)
    two = calibrate(2, tmp_path)
    observers = [k for k in one if "observer" in k]
    assert observers, "PTQ model has no observer state"
    for key in one:
        if torch.is_floating_point(one[key]):
            torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(two[key], one[key]), key
