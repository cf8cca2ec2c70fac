"""A tiny Lightning classifier and data, importable by spawned DDP workers."""
import os
import signal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fim_lightning import FisherSpectralNorm


def blobs(n=96, dim=12, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(classes, dim, generator=gen)
    labels = torch.arange(n) % classes
    return TensorDataset(centers[labels] + torch.randn(n, dim, generator=gen), labels)


class TinyClassifier(pl.LightningModule):
    """MLP with BatchNorm and dropout; optionally tracks the FisherSpectralNorm metric in validation."""

    def __init__(self, dim=12, classes=4, with_metric=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(32, classes))
        self.val_fim = FisherSpectralNorm() if with_metric else None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))
        if self.val_fim is not None:
            self.val_fim.update(self.net, x)
            self.log("val_fim", self.val_fim, on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loaders(batch_size=16, seed=0):
    train = DataLoader(blobs(seed=seed), batch_size=batch_size, shuffle=True)
    val = DataLoader(blobs(n=48, seed=seed + 1), batch_size=batch_size)
    return train, val


def trainer(tmp_path, callbacks=(), **kwargs):
    options = dict(max_epochs=2, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), log_every_n_steps=1, deterministic=True)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


class SigtermAtStep(pl.Callback):
    """Sends SIGTERM to its own process after optimizer step `step`, as a scheduler stopping the job would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtPrediction(pl.Callback):
    """Sends SIGTERM to its own process as prediction batch `batch` starts (scoring, not training)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class ExitAfterBatches(pl.Callback):
    """Ends its process at once, with no clean-up (as SIGKILL would), after `batches` prediction batches."""

    def __init__(self, batches: int):
        self.batches = batches

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.batches:
            os._exit(9)
