"""Wall-time overhead of FisherRobustnessCallback (its defaults) on CIFAR-10 training, as ratios.

Trains the recipes' SmallCNN on the offline CIFAR-10 subset (5,000 train / 1,000 val images) for a few
epochs, without and with the callback, alternating the configurations `--repeats` times from the same seed.
Two ratios: (1) best wall time with / best without (timeit's convention; on a shared machine the spread
between identical runs can exceed the effect), and (2) within each run with the callback, the fit's wall
time over the same wall time less the time spent inside the callback's hooks (insensitive to that noise).

    python bench/callback_overhead.py [--epochs 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import data_dir, machine, quiet_lightning  # noqa: E402
from fim_lightning import FisherRobustnessCallback  # noqa: E402
from recipes.data import NpzDataModule  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402
from fim_lightning.module import ImageClassifier  # noqa: E402


CONFIGS = {
    "without callback": None,
    "with callback (defaults)": {},
    "with callback, log_figures=False": {"log_figures": False},
}


class TimedCallback(FisherRobustnessCallback):
    """The callback, with the wall time spent in its hooks added up in `seconds`."""

    seconds = 0.0

    def _timed(self, method, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def setup(self, *args, **kwargs):
        return self._timed(super().setup, *args, **kwargs)

    def score(self, *args, **kwargs):
        return self._timed(super().score, *args, **kwargs)

    def on_fit_end(self, *args, **kwargs):
        return self._timed(super().on_fit_end, *args, **kwargs)


def run(epochs: int, callback_options: dict | None) -> tuple[float, float, torch.Tensor]:
    pl.seed_everything(0, workers=True)
    data = NpzDataModule(str(data_dir() / "cifar10_subset.npz"), num_classes=10, in_channels=3, batch_size=128)
    module = ImageClassifier(SmallCNN(3, 10), num_classes=10)
    callbacks = [] if callback_options is None else [TimedCallback(model_attribute="net", **callback_options)]
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                             logger=pl.loggers.CSVLogger(root),
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=root, deterministic=True)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
    inside = callbacks[0].seconds if callbacks else 0.0
    return seconds, inside, torch.cat([p.detach().flatten() for p in module.parameters()])


def main() -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {label: [] for label in CONFIGS}
    in_run = {label: [] for label in CONFIGS}
    weights = {}
    for _ in range(args.repeats):
        for label, options in CONFIGS.items():
            seconds, inside, weights[label] = run(args.epochs, options)
            times[label].append(seconds)
            in_run[label].append(seconds / (seconds - inside))
    print(f"machine: {machine()}")
    print(f"SmallCNN on CIFAR-10 subset (5,000 train / 1,000 val), {args.epochs} epochs, batch 128, "
          f"{args.repeats} repeats")
    print("callback defaults: 32 probes, exact method, every epoch, figures on\n")
    print("| run | best wall time (s) | median (s) | (1) best / best without | (2) in-run ratio, median "
          "| all runs (s) |")
    print("|---|---:|---:|---:|---:|---|")
    base = min(times["without callback"])
    for label, runs in times.items():
        print(f"| {label} | {min(runs):.2f} | {statistics.median(runs):.2f} | {min(runs) / base:.3f} | "
              f"{statistics.median(in_run[label]):.3f} | {', '.join(f'{t:.2f}' for t in runs)} |")
    same = all(torch.equal(weights["without callback"], w) for w in weights.values())
    print(f"\nidentical final weights with and without the callback: {same}")


if __name__ == "__main__":
    main()
