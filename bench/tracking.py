"""Does the callback's robustness curve follow the strongest attack over real training runs?

One job trains the recipes' SmallCNN in one regime with one seed and evaluates, after every epoch, the same
held-out probes (the first `--probes` test images):
- the estimate the callback logs (`fim_lightning.functional.robust_distances`, the function behind
  `{prefix}/robust_accuracy/{norm}/{eps}`, with `input_bounds=(0, 1)`), its raw Fisher statistics
  (lambda_max median, radius median) and the cheap baselines: the gradient norm |grad (z1 - z2)| (median) and the
  linear step margin / |grad (z1 - z2)|_dual as a robust-accuracy estimate;
- PGD-20 (ART, one random start, step eps / 4) at every radius of `RADII` (three per norm);
- AutoAttack's APGD-CE + APGD-T (the reference `pyautoattack` package, standard settings: 100 iterations, 9
  target classes) at the two `AA_RADII` per norm, on the first `--aa-probes` probes;
- the cost of each, in the same process.
Each epoch's row is appended to `bench/results/tracking/<data>.jsonl` and the network's weights are kept under
`bench/results/tracking/weights/` (not committed), so a job stopped anywhere resumes from its last epoch
(`python bench/tracking.py --data cifar10 --regime plain --seed 0` again) and the report can run the standard
AutoAttack at the checkpoints each signal selects (`--standard`).

    python bench/tracking.py --sweep                                     # every job in order (each resumes)
    python bench/tracking.py --data cifar10 --regime fgsm --seed 0       # one job (resumes)
    python bench/tracking.py --data cifar10 --report                     # the report from the rows so far
    python bench/tracking.py --data cifar10 --regime fgsm --cost 8       # the estimate's cost against PGD-20
                                                                         # (on that job's weights of epoch 8)

Regimes (fixed before the estimate's errors were looked at, `--calibrate`): `plain`; `pgd_at` (PGD L-inf 10
steps of eps / 4 from a random start); `trades` (beta 6); `fgsm` (FGSM without random start, one step of size
eps: catastrophic overfitting, at eps 16/255 on CIFAR and 0.1 on Fashion-MNIST, `FGSM_EPS`); `fisher_worst`
(FisherWorstDirectionPenalty, weight 1). Training eps otherwise: 8/255 on CIFAR, 0.1 on Fashion-MNIST. Adam 3e-3
with a cosine decay per epoch (the frontier's protocol), `--train` images.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import autoattack_robust, machine, quiet_lightning  # noqa: E402
from bench.regularization_frontier import OPTIMIZER, cosine, data_module  # noqa: E402
from fim_lightning.module import FisherRegularizedClassifier  # noqa: E402
from fim_lightning.functional import robust_distances  # noqa: E402
from recipes import attacks  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tracking"
RADII = {"cifar10": {"l2": (0.125, 0.25, 0.5), "linf": (1 / 255, 2 / 255, 8 / 255)},
         "fashion_mnist": {"l2": (0.25, 0.5, 1.0), "linf": (0.02, 0.05, 0.1)}}
AA_RADII = {"cifar10": {"l2": (0.25, 0.5), "linf": (2 / 255, 8 / 255)},
            "fashion_mnist": {"l2": (0.5, 1.0), "linf": (0.05, 0.1)}}
TRAIN_EPS = {"cifar10": 8 / 255, "fashion_mnist": 0.1}
# The FGSM regime's radius, fixed by `--calibrate` (calibration.jsonl) before the estimate's errors in it were
# read, so that catastrophic overfitting occurs: on CIFAR-10 8/255 did not collapse in 15 epochs of the tracked
# run (its rows stay, as a control), 16/255 collapsed at epoch 8; on Fashion-MNIST 0.1 collapsed at epoch 4.
FGSM_EPS = {"cifar10": 16 / 255, "fashion_mnist": 0.1}


def default_train_eps(data: str, name: str) -> float:
    return FGSM_EPS[data] if name == "fgsm" else TRAIN_EPS[data]


def regime(name: str, data: str, train_eps: float | None = None) -> dict:
    """The module options of a regime on a data set (training radius `train_eps`, default `default_train_eps`)."""
    eps = default_train_eps(data, name) if train_eps is None else train_eps
    return {
        "plain": {},
        "pgd_at": {"adversarial": attacks.PGD(eps=eps, step_size=eps / 4, steps=10)},
        "trades": {"penalty": attacks.TradesPenalty(beta=6.0)},
        "fgsm": {"adversarial": attacks.PGD(eps=eps, step_size=eps, steps=1, random_start=False)},
        "fisher_worst": {"penalty": fl.FisherWorstDirectionPenalty(weight=1.0)},
    }[name]


REGIMES = ("plain", "pgd_at", "trades", "fgsm", "fisher_worst")
# seed by seed, Fashion-MNIST (cheaper) first, the collapsing regime first: each seed's runs complete a comparison
SWEEP = [(data, name, seed) for seed in range(3) for data in ("fashion_mnist", "cifar10")
         for name in ("fgsm", "plain", "pgd_at", "trades", "fisher_worst")]


def margin_gradients(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-2 margin z1 - z2, |grad (z1 - z2)|_2 and _1 per sample (the linear-step baseline)."""
    x = x.clone().requires_grad_(True)
    logits = net(x)
    top = logits.topk(2, dim=1)
    margin = top.values[:, 0] - top.values[:, 1]
    (gradient,) = torch.autograd.grad(margin.sum(), x)
    flat = gradient.flatten(1)
    return margin.detach().double(), flat.norm(p=2, dim=1).double(), flat.norm(p=1, dim=1).double()


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data: str, aa_probes: int) -> dict:
    """Every signal and attack of one epoch on the probes (module docstring), with their costs."""
    net.eval()
    row: dict = {}
    start = time.perf_counter()
    distances = robust_distances(net, x, ("l2", "linf"), mode="eval", bounds=(0.0, 1.0))
    row["estimate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = fl.fisher_scores(net, x, mode="eval")
    row["fisher_s"] = time.perf_counter() - start
    correct = (scores.prediction == y).numpy()
    margin, grad_l2, grad_l1 = margin_gradients(net, x)
    linear = {"l2": (margin / grad_l2).numpy(), "linf": (margin / grad_l1).numpy()}
    row.update(clean=float(correct.mean()), lambda_max_median=float(scores.spectral_norm.median()),
               radius_median=float(scores.radius.median()), grad_norm_median=float(grad_l2.median()))
    aa_count = min(aa_probes, len(x))
    for norm, radii in RADII[data].items():
        d = distances[norm].numpy()
        for eps in radii:
            key = f"{norm}/{eps:.4g}"
            row[f"estimate/{key}"] = float((correct & (d > eps)).mean())
            row[f"estimate_aa_probes/{key}"] = float((correct[:aa_count] & (d[:aa_count] > eps)).mean())
            row[f"linear/{key}"] = float((correct & (linear[norm] > eps)).mean())
            row[f"linear_aa_probes/{key}"] = float((correct[:aa_count] & (linear[norm][:aa_count] > eps)).mean())
    start = time.perf_counter()
    for norm, radii in RADII[data].items():
        for eps in radii:
            row[f"pgd20/{norm}/{eps:.4g}"] = attacks.robust_accuracy(net, x, y, norm=norm, eps=eps, steps=20,
                                                                     step_size=eps / 4)
    row["pgd20_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for norm, radii in AA_RADII[data].items():
        for eps in radii:
            robust = autoattack_robust(net, x[:aa_count], y[:aa_count], norm, eps)
            row[f"apgd/{norm}/{eps:.4g}"] = float(robust.mean())
    row["apgd_s"] = time.perf_counter() - start
    return row


class EpochEvaluation(pl.Callback):
    """After every training epoch: `evaluate`, one row appended to the results, the weights kept; the
    Trainer's own checkpoint (last.ckpt) lets a stopped job resume."""

    def __init__(self, job: dict, x: torch.Tensor, y: torch.Tensor, aa_probes: int, rows: Path, weights: Path):
        self.job, self.x, self.y, self.aa_probes, self.rows, self.weights = job, x, y, aa_probes, rows, weights

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        training = net.training
        row = {**self.job, "epoch": trainer.current_epoch, "train_loss": float(trainer.callback_metrics.get(
            "train/ce", torch.tensor(float("nan")))), **evaluate(net, self.x, self.y, self.job["data"],
                                                                 self.aa_probes)}
        net.train(training)
        torch.save(net.state_dict(), self.weights / f"epoch{trainer.current_epoch}.pt")
        with open(self.rows, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k.startswith(("epoch", "clean", "estimate/", "apgd/", "pgd20/l2/0.5", "estimate_s",
                                           "pgd20_s", "apgd_s"))}), flush=True)


class CalibrationEvaluation(pl.Callback):
    """`--calibrate`: after every training epoch only the clean accuracy and PGD-10 at the training radius
    (L-inf, step eps / 4, one random start) on the probes, the signature of each regime's effect (a collapse of
    FGSM-AT, a peak then a fall of PGD-AT); one row appended to `calibration.jsonl`."""

    def __init__(self, job: dict, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
        self.job, self.x, self.y, self.eps = job, x, y, eps

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        training = net.training
        net.eval()
        with torch.no_grad():
            clean = float((net(self.x).argmax(1) == self.y).float().mean())
        robust = attacks.robust_accuracy(net, self.x, self.y, norm="linf", eps=self.eps, steps=10,
                                         step_size=self.eps / 4)
        net.train(training)
        row = {**self.job, "epoch": trainer.current_epoch, "train_loss": float(trainer.callback_metrics.get(
            "train/ce", torch.tensor(float("nan")))), "clean": clean, "pgd10": robust}
        with open(RESULTS / "calibration.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def prepared(data: str, train: int) -> pl.LightningDataModule:
    """The data module, prepared (Fashion-MNIST's IDX files unpacked) and set up, so the probes can be read."""
    datamodule = data_module(data, train)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def load_rows(data: str) -> list[dict]:
    """The rows of `data`; a row written before `train_eps` was recorded ran at the data set's `TRAIN_EPS`."""
    path = RESULTS / f"{data}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{"train_eps": TRAIN_EPS[row["data"]], **row} for row in rows]


def weights_folder(data: str, name: str, seed: int, epochs: int, train: int, train_eps: float) -> Path:
    """Where a job keeps its weights per epoch and its last.ckpt (a radius other than `TRAIN_EPS` is named, to
    the 4 digits it is printed with)."""
    suffix = "" if math.isclose(train_eps, TRAIN_EPS[data], rel_tol=1e-3) else f"_r{train_eps:.4g}"
    return RESULTS / "weights" / f"{data}_{name}_s{seed}_e{epochs}_t{train}{suffix}"


def _fit(data: str, name: str, seed: int, epochs: int, train: int, probes: int, train_eps: float,
         callbacks: Callable[[torch.Tensor, torch.Tensor], list], ckpt_path: str | None = None,
         widths: tuple[int, ...] | None = None) -> None:
    """Train the SmallCNN (its default `widths`, or these) in regime `name` from `seed`, with the callbacks made
    for the first `probes` test images; Lightning's own checkpointing only where a callback asks for it."""
    pl.seed_everything(seed, workers=True)
    datamodule = prepared(data, train)
    x, y = (t[:probes] for t in datamodule.splits["test"].tensors)
    net = SmallCNN(datamodule.in_channels, 10, **({"widths": widths} if widths else {}))
    module = FisherRegularizedClassifier(net, 10, optimizer=OPTIMIZER,
                                         scheduler=cosine(epochs), **regime(name, data, train_eps))
    RESULTS.mkdir(parents=True, exist_ok=True)
    made = callbacks(x, y)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
                         enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in made),
                         callbacks=made)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


def run_job(data: str, name: str, seed: int, epochs: int, train: int, probes: int, aa_probes: int,
            train_eps: float | None = None, calibrate: bool = False, widths: tuple[int, ...] | None = None) -> None:
    train_eps = default_train_eps(data, name) if train_eps is None else train_eps
    job = {"data": data, "regime": name, "seed": seed, "epochs": epochs, "train": train, "probes": probes,
           "aa_probes": aa_probes, "train_eps": train_eps, "machine": machine()}
    if calibrate:
        if widths:
            job["widths"] = list(widths)
        _fit(data, name, seed, epochs, train, probes, train_eps,
             lambda x, y: [CalibrationEvaluation(job, x, y, train_eps)], widths=widths)
        return
    if widths:
        raise SystemExit("--widths is for --calibrate only: the tracked regimes train the default SmallCNN")
    key = {k: job[k] for k in ("data", "regime", "seed", "epochs", "train", "probes", "aa_probes", "train_eps")}
    done = {row["epoch"] for row in load_rows(data) if {k: row.get(k) for k in key} == key}
    if len(done) >= epochs:
        print(f"{name} seed {seed}: all {epochs} epochs evaluated")
        return
    folder = weights_folder(data, name, seed, epochs, train, train_eps)
    folder.mkdir(parents=True, exist_ok=True)
    last = folder / "last.ckpt"
    # save_top_k=1: Lightning writes last.ckpt only in a step that saved a top-k checkpoint (save_top_k=0 never
    # wrote one, so the first jobs restarted from epoch 0). The resumed run's batch order is not the uninterrupted
    # one: Lightning does not keep the sampler's RNG in a checkpoint.
    _fit(data, name, seed, epochs, train, probes, train_eps,
         lambda x, y: [EpochEvaluation(job, x, y, aa_probes, RESULTS / f"{data}.jsonl", folder),
                       pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=1)],
         ckpt_path=str(last) if last.exists() and done else None)


def cost(data: str, name: str, seed: int, epochs: int, train: int, probes: int, epoch: int,
         train_eps: float | None = None) -> str:
    """The estimate's cost against PGD-20 at every radius, in one process, on a saved epoch's weights."""
    train_eps = default_train_eps(data, name) if train_eps is None else train_eps
    datamodule = prepared(data, train)
    x, y = (t[:probes] for t in datamodule.splits["test"].tensors)
    net = SmallCNN(datamodule.in_channels, 10)
    folder = weights_folder(data, name, seed, epochs, train, train_eps)
    net.load_state_dict(torch.load(folder / f"epoch{epoch}.pt"))
    net.eval()
    start = time.perf_counter()
    robust_distances(net, x, ("l2", "linf"), mode="eval", bounds=(0.0, 1.0))
    estimate = time.perf_counter() - start
    start = time.perf_counter()
    for norm, radii in RADII[data].items():
        for eps in radii:
            attacks.robust_accuracy(net, x, y, norm=norm, eps=eps, steps=20, step_size=eps / 4)
    pgd = time.perf_counter() - start
    return (f"machine: {machine()}\n{data} {name} seed {seed} epoch {epoch}, {len(x)} probes: "
            f"estimate {estimate:.1f} s, "
            f"PGD-20 at {sum(map(len, RADII[data].values()))} radii {pgd:.1f} s, ratio {estimate / pgd:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=tuple(RADII), default="cifar10")
    parser.add_argument("--regime", choices=REGIMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train", type=int, default=5000, help="training images")
    parser.add_argument("--probes", type=int, default=512)
    parser.add_argument("--aa-probes", type=int, default=256)
    parser.add_argument("--train-eps", type=float,
                        help="the training radius of the adversarial regimes (default: `default_train_eps`: FGSM "
                             "16/255 on CIFAR-10, else 8/255; 0.1 on Fashion-MNIST)")
    parser.add_argument("--calibrate", action="store_true", help="train only, with clean and PGD-10 accuracy at "
                                                                 "the training radius per epoch (calibration.jsonl)")
    parser.add_argument("--widths", type=lambda text: tuple(int(w) for w in text.split(",")),
                        help="--calibrate: the SmallCNN's widths, e.g. 64,128,256 (default 32,64,128)")
    parser.add_argument("--sweep", action="store_true", help="every job of `SWEEP` in order, each resumed or skipped")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--cost", type=int, metavar="EPOCH", help="time the estimate against PGD-20 on that epoch's "
                                                                  "saved weights of the job")
    args = parser.parse_args()
    quiet_lightning()
    if args.report:
        from bench.tracking_report import report

        path = RESULTS / "calibration.jsonl"
        calibration = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        text = report(args.data, load_rows(args.data), calibration)
        (RESULTS / f"{args.data}.md").write_text(text)
        print(text)
        return
    if args.cost is not None:
        print(cost(args.data, args.regime, args.seed, args.epochs, args.train, args.probes, args.cost,
                   args.train_eps))
        return
    if args.sweep:
        for data, name, seed in SWEEP:
            run_job(data, name, seed, args.epochs, args.train, args.probes, args.aa_probes)
        return
    run_job(args.data, args.regime, args.seed, args.epochs, args.train, args.probes, args.aa_probes, args.train_eps,
            args.calibrate, args.widths)


if __name__ == "__main__":
    main()
