"""Effect of the Fisher penalties against TRADES and PGD adversarial training, same epochs, on CPU.

Trains the recipes' SmallCNN with `FisherRegularizedClassifier` on an offline data set for `--epochs`
epochs per method, then reports clean test accuracy, mean / median exact lambda_max(F(x)) and PGD robust
accuracy (adversarial-robustness-toolbox, L-inf 8/255 and L2 0.5, 20 steps, one random start) on the first
`--eval` test images, and the training wall time. Inputs are pixels in [0, 1], normalised inside the model.

    python bench/regularization_effect.py --data cifar10 --epochs 8
    python bench/regularization_effect.py --data pneumoniamnist --epochs 8
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import data_dir, machine, quiet_lightning  # noqa: E402
from recipes.attacks import PGD, TradesPenalty, robust_accuracy  # noqa: E402
from recipes.data import NpzDataModule  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402
from fim_lightning.module import FisherRegularizedClassifier  # noqa: E402

DATA = {"cifar10": ("cifar10_subset.npz", 10, 3), "pneumoniamnist": ("pneumoniamnist.npz", 2, 1)}


def methods(weights: list[float]) -> dict[str, dict]:
    """Plain; the KL and worst-direction penalties at each weight; trace and spectral at the last weight; the
    two peers."""
    return {
        "plain": {},
        **{f"FisherKLPenalty (w={w})": {"penalty": fl.FisherKLPenalty(weight=w)} for w in weights},
        **{f"FisherWorstDirectionPenalty (w={w})": {"penalty": fl.FisherWorstDirectionPenalty(weight=w)}
           for w in weights},
        f"FisherTracePenalty (w={weights[-1]})": {"penalty": fl.FisherTracePenalty(weight=weights[-1])},
        f"FisherSpectralPenalty (w={weights[-1]})": {"penalty": fl.FisherSpectralPenalty(weight=weights[-1])},
        "TRADES (beta=6, 10 steps)": {"penalty": TradesPenalty()},
        "PGD-AT (10 steps)": {"adversarial": PGD()},
    }


def main() -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), default="cifar10")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--only", nargs="*", help="substrings of the methods to run")
    args = parser.parse_args()
    file, classes, channels = DATA[args.data]
    data = NpzDataModule(str(data_dir() / file), num_classes=classes, in_channels=channels, batch_size=128)
    data.setup()
    test_x, test_y = data.splits["test"].tensors
    eval_x, eval_y = test_x[: args.eval], test_y[: args.eval]
    print(f"machine: {machine()}")
    print(f"{args.data}: {len(data.splits['train'])} train images, {args.epochs} epochs, SmallCNN, Adam 3e-3, batch 128; "
          f"metrics on {len(eval_x)} test images (accuracy on all {len(test_x)})\n")
    print("| method | clean acc | mean lambda_max | median lambda_max | PGD L-inf 8/255 acc | PGD L2 0.5 acc | train time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, options in methods(args.weights).items():
        if args.only and not any(s in label for s in args.only):
            continue
        pl.seed_everything(0, workers=True)
        module = FisherRegularizedClassifier(SmallCNN(channels, classes), classes,
                                             optimizer=partial(torch.optim.Adam, lr=3e-3), **options)
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
        net = module.net.eval()
        with torch.no_grad():
            clean = (torch.cat([net(b).argmax(1) for b in test_x.split(256)]) == test_y).float().mean().item()
        lam = torch.cat([fl.fisher_spectral_norm(net, b) for b in eval_x.split(100)])
        linf = robust_accuracy(net, eval_x, eval_y, norm="linf", eps=8 / 255, step_size=2 / 255)
        l2 = robust_accuracy(net, eval_x, eval_y, norm="l2", eps=0.5, step_size=0.125)
        print(f"| {label} | {clean:.3f} | {lam.mean():.4g} | {lam.quantile(0.5):.4g} | {linf:.3f} | {l2:.3f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
