"""Why the penalty frontier decays its learning rate: test accuracy of the eval-mode model (BatchNorm running
statistics) and of the same weights with batch statistics, epoch by epoch, at a constant Adam rate and with a
cosine decay stepped per epoch. Plain SmallCNN, the frontier's protocol otherwise (5,000 training images,
8 epochs, Adam 3e-3, batch 128, seed 0).

    python bench/batchnorm_schedule.py --data fashion_mnist      # or cifar10

The gap between the two columns is the running statistics trailing the weights; it is what a robustness
comparison at matched clean accuracy must not measure.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, quiet_lightning  # noqa: E402
from bench.regularization_frontier import OPTIMIZER, cosine, data_module, plain_trainer  # noqa: E402
from fim_lightning.module import ImageClassifier  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

# name -> the module's `scheduler` for a run of `epochs` epochs
SCHEDULES = {"constant": lambda epochs: None, "cosine": cosine}


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_statistics: bool) -> float:
    """Accuracy in eval mode, or (on a copy, so no buffer moves) in train mode with each batch of 128's
    own statistics."""
    net = copy.deepcopy(net).train(batch_statistics)
    with torch.no_grad():
        hits = [(net(x).argmax(1) == y) for x, y in zip(images.split(128), labels.split(128))]
    return torch.cat(hits).float().mean().item()


class EpochAccuracies(pl.Callback):
    """Test accuracy after every training epoch, with running and with batch statistics."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels
        self.rows: list[tuple[float, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.rows.append((accuracy(module.net, self.images, self.labels, False),
                          accuracy(module.net, self.images, self.labels, True)))


def main() -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("cifar10", "fashion_mnist"), default="fashion_mnist")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    data = data_module(args.data, 5000)
    data.prepare_data()
    data.setup()
    images, labels = data.splits["test"].tensors
    columns = {}
    for name, schedule in SCHEDULES.items():
        pl.seed_everything(0, workers=True)
        probe = EpochAccuracies(images, labels)
        module = ImageClassifier(SmallCNN(data.in_channels, 10), 10, optimizer=OPTIMIZER,
                                 scheduler=schedule(args.epochs))
        plain_trainer(args.epochs, (probe,)).fit(module, datamodule=data)
        columns[name] = probe.rows
    print(f"machine: {machine()}")
    print(f"{args.data}: test accuracy ({len(labels)} images) after each epoch, eval mode / batch statistics\n")
    print("| epoch | " + " | ".join(f"{n}: eval mode | {n}: batch statistics" for n in SCHEDULES) + " |")
    print("|---:|" + "---:|---:|" * len(SCHEDULES))
    for epoch in range(args.epochs):
        cells = " | ".join(f"{columns[n][epoch][0]:.3f} | {columns[n][epoch][1]:.3f}" for n in SCHEDULES)
        print(f"| {epoch} | {cells} |")


if __name__ == "__main__":
    main()
