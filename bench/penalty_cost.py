"""Time per training step with each Fisher penalty (and the adversarial peers) relative to plain
cross-entropy, in one run on the same model and batch; with `--epoch`, the time of one epoch of
`FisherRegularizedClassifier` through the penalty frontier's Trainer (5,000 CIFAR-10 images, batch 128), as
users train.

    python bench/penalty_cost.py [--batch 128] [--steps 10] [--device cuda] [--epoch]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import cifar_images, machine, quiet_lightning  # noqa: E402
from bench.regularization_frontier import OPTIMIZER, data_module, plain_trainer  # noqa: E402
from fim_lightning.module import FisherRegularizedClassifier  # noqa: E402
from recipes.attacks import PGD, TradesPenalty  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

VARIANTS = {
    "plain cross-entropy": {},
    "FisherKLPenalty (default)": {"penalty": fl.FisherKLPenalty()},
    "FisherWorstDirectionPenalty (1 power step)": {"penalty": fl.FisherWorstDirectionPenalty()},
    "FisherTracePenalty (1 probe)": {"penalty": fl.FisherTracePenalty()},
    "FisherSpectralPenalty (power, 3 steps)": {"penalty": fl.FisherSpectralPenalty()},
    "FisherSpectralPenalty (exact)": {"penalty": fl.FisherSpectralPenalty(eigenvector="exact")},
    "TRADES (10 steps)": {"penalty": TradesPenalty()},
    "PGD adversarial training (10 steps)": {"adversarial": PGD()},
    "PGD adversarial training (2 steps of eps / 2)": {"adversarial": PGD(step_size=4 / 255, steps=2)},
}


def step_time(net: nn.Module, x, y, penalty=None, adversarial=None, steps: int = 10) -> float:
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        inputs = adversarial(net, x, labels=y) if adversarial is not None else x
        logits = net(inputs)
        loss = nn.functional.cross_entropy(logits, y)
        if penalty is not None:
            loss = loss + penalty(net, x, logits=logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def epoch_time(data, accelerator: str, penalty=None, adversarial=None) -> float:
    """Seconds of one `trainer.fit` epoch of the SmallCNN with the variant, on the frontier's Trainer."""
    torch.manual_seed(0)
    module = FisherRegularizedClassifier(SmallCNN(3, 10), 10, penalty=penalty, adversarial=adversarial,
                                         optimizer=OPTIMIZER)
    trainer = plain_trainer(1, accelerator=accelerator)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    if accelerator == "gpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: model and batch live there")
    parser.add_argument("--epoch", action="store_true", help="time one Trainer epoch per variant instead")
    args = parser.parse_args()
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"machine: {machine()}")
    if args.epoch:
        quiet_lightning()
        print("SmallCNN (widths 32-64-128, BatchNorm) in FisherRegularizedClassifier, one epoch of 5,000 CIFAR-10 "
              "training images, batch 128, the penalty frontier's Trainer (Adam), after one untimed epoch\n")
        data = data_module("cifar10", 5000)
        data.setup()
        epoch_time(data, accelerator)  # warm-up, untimed
    else:
        x, y = (t.to(args.device) for t in cifar_images("train", args.batch))
        print(f"SmallCNN (widths 32-64-128, BatchNorm, train mode), batch {args.batch} CIFAR-10 images; "
              f"median of {args.steps} steps\n")
    print(f"| training {'epoch' if args.epoch else 'step'} | seconds | x plain |\n|---|---:|---:|")
    base = None
    for label, options in VARIANTS.items():
        if args.epoch:
            seconds = epoch_time(data, accelerator, **options)
        else:
            torch.manual_seed(0)
            net = SmallCNN(3, 10).to(args.device).train()
            seconds = step_time(net, x, y, steps=args.steps, **options)
        base = base or seconds
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
