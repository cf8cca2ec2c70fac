"""A few SGD steps of cross-entropy + the exact spectral penalty, run as users run it: `python
tests/ddp_penalty_run.py OUT BATCH [DEVICES] [MAX_STEPS]`, Lightning's `ddp` strategy starting the other process.
Rank r trains on samples r, r + W, ... in order, so W ranks at batch b see what one process sees at batch W b.
Rank 0 writes the final parameters to OUT."""
import sys
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import fim_lightning as fl
from fim_lightning.module import FisherRegularizedClassifier
from recipes.common import end_process_group
from tests.lightning_helpers import blobs


class SequentialShards(FisherRegularizedClassifier):
    def __init__(self, *args, batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size

    def train_dataloader(self):
        data = blobs(n=64)
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def main() -> None:
    out, batch_size = sys.argv[1], int(sys.argv[2])
    devices = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    penalty = fl.FisherSpectralPenalty(weight=5.0, eigenvector="exact")
    module = SequentialShards(net, 4, penalty, optimizer=partial(torch.optim.SGD, lr=0.1), batch_size=batch_size)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
                         max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, deterministic=True)
    trainer.fit(module)
    if trainer.global_rank == 0:
        torch.save(torch.cat([p.detach().flatten() for p in module.parameters()]), out)
    end_process_group()


if __name__ == "__main__":
    main()
