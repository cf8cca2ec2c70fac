"""DDP with 2 CPU processes (gloo): the callback and the metric log what a single process logs."""
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import fim_lightning as fl
from fim_lightning.module import FisherRegularizedClassifier
from tests.lightning_helpers import TinyClassifier, blobs, loaders, trainer

@pytest.fixture(autouse=True)
def fresh_master_port(monkeypatch):
    """Each spawned group on its own free port: reusing the last group's port can abort the next one."""
    from lightning_fabric.plugins.environments.lightning import find_free_network_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))


KEYS = ["fim/spectral_norm/mean", "fim/spectral_norm/median", "fim/spectral_norm/p90", "fim/spectral_norm/max",
        "fim/trace/mean", "fim/radius/median"]


def _validate(tmp_path, **kwargs):
    """Score one fixed model on a fixed probe set, in validation."""
    torch.manual_seed(0)
    model = TinyClassifier(with_metric=True)
    callback = fl.FisherRobustnessCallback(num_samples=21, batch_size=4, log_figures=False)
    _, val = loaders(batch_size=8)
    run = trainer(tmp_path, [callback], logger=False, **kwargs)
    run.validate(model, val)
    logged = [key.replace("fim/", "fim/validate/", 1) for key in KEYS]  # a standalone validate's keys
    return dict(zip(KEYS + ["val_fim"], [run.callback_metrics[key].item() for key in logged + ["val_fim"]]))


def test_two_process_ddp_matches_a_single_process(tmp_path):
    single = _validate(tmp_path / "single")
    ddp = _validate(tmp_path / "ddp", devices=2, strategy="ddp_spawn")
    for key in KEYS + ["val_fim"]:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key


class _SequentialShards(FisherRegularizedClassifier):
    """Rank r trains on samples r, r + W, ... in order, so W ranks at batch b see what one process sees at W b."""

    def __init__(self, *args, batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size

    def train_dataloader(self):
        data = blobs(n=64)
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def _fit_penalized(tmp_path, batch_size, weight=5.0, **kwargs):
    """A few SGD steps of cross-entropy + the exact spectral penalty on a model without BatchNorm or dropout."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    penalty = fl.FisherSpectralPenalty(weight=weight, eigenvector="exact")
    module = _SequentialShards(net, 4, penalty, optimizer=partial(torch.optim.SGD, lr=0.1), batch_size=batch_size)
    run = trainer(tmp_path, logger=False, max_epochs=1, enable_checkpointing=False, use_distributed_sampler=False,
                  **kwargs)
    run.fit(module)
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_fisher_penalty_gradients_are_synchronised_under_ddp(tmp_path):
    single = _fit_penalized(tmp_path / "single", batch_size=16)
    ddp = _fit_penalized(tmp_path / "ddp", batch_size=8, devices=2, strategy="ddp_spawn")
    initial = _fit_penalized(tmp_path / "none", batch_size=16, max_steps=0)
    assert (single - initial).norm() > 1e-2
    torch.testing.assert_close(ddp, single, rtol=1e-4, atol=1e-5)
