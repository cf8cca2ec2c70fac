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
Each epoch's row is appended to `bench/results/tracking/<data>.jsonl` and the job's Lightning checkpoint (each
epoch draws its batches from its own seed) replaces `bench/results/tracking/resume/<job>/last.ckpt`; beside it
are the weights of the epochs that some signal selects so far, for the standard AutoAttack at the job's end. Both
are committed: a job stopped anywhere resumes on the next machine from its checkpoint (the same command again).
Replaying the training from the seed does not: on another machine (another CPU, another Lightning) the first
epoch's loss already differs (1.5417 against 1.5257 on record), and FGSM's sign() makes that a new run. The
weights of every epoch (`--cost`) go to `bench/results/tracking/weights/`, not committed.

    python bench/tracking.py --sweep                                     # every job in order (each resumes)
    python bench/tracking.py --sweep --shard 1/2                         # every other job, beside --shard 0/2
    python bench/tracking.py --data cifar10 --regime fgsm --seed 0       # one job (resumes)
    python bench/tracking.py --data cifar10 --report                     # the report from the rows so far
    python bench/tracking.py --plan                                      # what the sweep has left, core-hours
    python bench/tracking.py --data cifar10 --regime fgsm --standard     # standard AutoAttack, selected epochs
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
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from fim_lightning.figures import save  # noqa: E402
from bench.common import autoattack_robust, machine, quiet_lightning  # noqa: E402
from bench.regularization_frontier import OPTIMIZER, cosine, data_module  # noqa: E402
from bench.tracking_report import ESTIMATOR, curves_figure, job_key, report, rescored  # noqa: E402
from fim_lightning.module import FisherRegularizedClassifier  # noqa: E402
from fim_lightning.functional import robust_distances  # noqa: E402
from fim_lightning.robustness import (  # noqa: E402
    first_order_steps,
    margin_gradients as margin_gradients_of,
    minimal_perturbation,
)
from recipes import attacks  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tracking"
CALIBRATION = RESULTS / "calibration.jsonl"
EPOCH_SEEDS = 1_000_003  # epoch e of seed s starts from torch.manual_seed(EPOCH_SEEDS * s + e)
RESUME = RESULTS / "resume"  # committed: each job's last checkpoint and the weights its signals select
# The estimate the rows record: "min(d_l, s_u)" (the linear step, shortened where the line search finds the class
# change sooner: `fim_lightning.robustness`); "min(d1, s_u)" before it, rows without the key the line search alone,
# s_u. Every row since "min(d1, s_u)" also keeps the estimate's parts per probe (`resume/<job>/probes.jsonl`), so
# the report rescores those from them and a job continues across a change of estimator (`recorded`). `ESTIMATOR` is
# the report's (`bench.tracking_report`), where the candidates are scored.
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
# The order of the sweep: Fashion-MNIST (about 6 minutes an epoch on a 2-core CPU) before CIFAR-10 (about 40); seed
# 0's FGSM-AT and plain runs first (the estimator and the alarm were chosen on them), then the two jobs begun on it
# (PGD-AT, TRADES), then FGSM-AT and plain on seeds 1 and 2, which test those choices on held-out seeds, then the
# rest seed by seed.
_FIRST = [("fashion_mnist", name, seed) for name, seed in
          (("fgsm", 0), ("plain", 0), ("pgd_at", 0), ("trades", 0), ("fgsm", 1), ("plain", 1), ("fgsm", 2),
           ("plain", 2))]
SWEEP = _FIRST + [(data, name, seed) for data in ("fashion_mnist", "cifar10") for seed in range(3)
                  for name in ("fgsm", "plain", "pgd_at", "trades", "fisher_worst") if (data, name, seed) not in _FIRST]
# A sweep job's settings other than the command line's, fixed by `--calibrate` before the estimate was read: long
# PGD-AT shows robust overfitting on CIFAR-10 with the wide SmallCNN on 1,000 images (PGD-10 at 8/255 rose to 0.240
# at epoch 16 and fell to 0.131 at epoch 99 while clean accuracy rose to 0.48; calibration.jsonl), not with the
# default one on 5,000 images in 30 epochs or 1,000 in 60 (sags of 1-3 points).
SWEEP_SETTINGS = {("cifar10", "pgd_at"): {"train": 1000, "epochs": 100, "widths": (64, 128, 256)}}


def margin_gradients(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-2 margin z1 - z2, |grad (z1 - z2)|_2 and _1 per sample (the linear-step baseline)."""
    x = x.clone().requires_grad_(True)
    logits = net(x)
    top = logits.topk(2, dim=1)
    margin = top.values[:, 0] - top.values[:, 1]
    (gradient,) = torch.autograd.grad(margin.sum(), x)
    flat = gradient.flatten(1)
    return margin.detach().double(), flat.norm(p=2, dim=1).double(), flat.norm(p=1, dim=1).double()


def components(net: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per norm, the estimate's parts, from the operator the public functions open: the linear step d_l (to the
    runner-up class), the first-order step d1 (the minimum over classes, whose direction the line search follows)
    and the line search's distance s_u to the adversarial point it found, followed to the class change (inf
    where it found none)."""
    with fl.preserved_state(net, x):
        op = fl.FisherOperator(net, x)
        found = margin_gradients_of(op)
        parts: dict[str, dict[str, torch.Tensor]] = {"linear_step": {}, "first_order": {}, "line_search": {}}
        for norm in ("l2", "linf"):
            steps = first_order_steps(found, norm)
            parts["linear_step"][norm], parts["first_order"][norm] = steps[:, 0], steps.min(dim=1).values
            searched = minimal_perturbation(op, norm, bounds=(0.0, 1.0), margins=found, cutoff=math.inf)
            shift = (searched.point - x).flatten(1).to(torch.float64).norm(p=2 if norm == "l2" else math.inf, dim=1)
            parts["line_search"][norm] = torch.where(searched.crossed, shift, math.inf)
    return parts


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data: str, aa_probes: int) -> tuple[dict, dict]:
    """Every signal and attack of one epoch on the probes (module docstring), with their costs; and the per-probe
    values behind them (distances, APGD's robust flags; to `resume/<job>/probes.jsonl`), so that another
    combination of the estimate's parts can be scored later without training again."""
    net.eval()
    row: dict = {}
    start = time.perf_counter()
    distances = robust_distances(net, x, ("l2", "linf"), mode="eval", bounds=(0.0, 1.0))
    row["estimate_s"] = time.perf_counter() - start
    parts = components(net, x)
    for norm in ("l2", "linf"):  # the public estimate is min(d_l, s_u) of the same parts
        torch.testing.assert_close(distances[norm], torch.minimum(parts["linear_step"][norm],
                                                                  parts["line_search"][norm]), rtol=1e-6, atol=0)
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
            for part, values in parts.items():
                v = values[norm].numpy()
                row[f"{part}_aa_probes/{key}"] = float((correct[:aa_count] & (v[:aa_count] > eps)).mean())
    start = time.perf_counter()
    for norm, radii in RADII[data].items():
        for eps in radii:
            row[f"pgd20/{norm}/{eps:.4g}"] = attacks.robust_accuracy(net, x, y, norm=norm, eps=eps, steps=20,
                                                                     step_size=eps / 4)
    row["pgd20_s"] = time.perf_counter() - start
    probes: dict = {"correct": correct.astype(int).tolist()}
    for norm in ("l2", "linf"):
        for name, values in (("estimate", distances[norm]), ("linear", linear[norm]),
                             *((part, parts[part][norm]) for part in parts)):
            probes[f"{name}/{norm}"] = [float(f"{v:.4g}") for v in torch.as_tensor(values).tolist()]
    start = time.perf_counter()
    for norm, radii in AA_RADII[data].items():
        for eps in radii:
            robust = autoattack_robust(net, x[:aa_count], y[:aa_count], norm, eps)
            row[f"apgd/{norm}/{eps:.4g}"] = float(robust.mean())
            probes[f"apgd/{norm}/{eps:.4g}"] = robust.astype(int).tolist()
    row["apgd_s"] = time.perf_counter() - start
    return row, probes


class Resumable(pl.Callback):
    """After every training epoch not on record (`done`, epoch -> row): one row `measured` and appended to
    `rows`; then the job's Lightning checkpoint replaces `checkpoint` (written whole before it replaces the old
    one). The global RNG draws the batches and PGD's starts, and Lightning does not keep it in a checkpoint, so
    every epoch after the first is seeded from the job's seed and the epoch right before its dataloader iterator
    is made: in `on_train_epoch_start`, except in a run resumed at epoch `start`, whose first iterator Lightning
    makes before any epoch or fit hook (in `FitLoop.setup_data`), so there in `setup`. Kept in the checkpoint at
    the epoch's end, the RNG still differed from the next epoch's start, and so did the loss; so did it with
    the RNG right but the training attacks' (PGD's) own generators not reseeded at the epoch's start."""

    def __init__(self, job: dict, done: dict[int, dict], rows: Path, checkpoint: Path, start: int) -> None:
        self.job, self.done, self.rows, self.checkpoint, self.start = job, done, rows, checkpoint, start

    def seed(self, epoch: int) -> int:
        seed = EPOCH_SEEDS * self.job["seed"] + epoch
        torch.manual_seed(seed)
        return seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.start > 0:
            self.seed(self.start)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed the epoch (but the resumed run's first, seeded in `setup`), and the training attacks' own
        generators, which a checkpoint does not keep either."""
        epoch = trainer.current_epoch
        seed = self.seed(epoch) if epoch != self.start else EPOCH_SEEDS * self.job["seed"] + epoch
        for module in pl_module.modules():
            if isinstance(module, attacks.PGD):
                module.reseed(seed)
        self.started = time.perf_counter()  # the epoch's training time, `train_s` in its row

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.done:  # an epoch on record is met again only where its checkpoint was not written
            net = pl_module.net
            training = net.training
            loss = float(trainer.callback_metrics.get("train/ce", torch.tensor(float("nan"))))
            trained = time.perf_counter() - self.started
            row = {**self.job, "epoch": epoch, "train_loss": loss, "train_s": trained, **self.measured(net)}
            net.train(training)
            with open(self.rows, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.done[epoch] = row
            self.recorded(row, net)
        partial = self.checkpoint.with_suffix(".partial")
        trainer.save_checkpoint(partial)
        partial.replace(self.checkpoint)

    def measured(self, net: torch.nn.Module) -> dict:
        raise NotImplementedError

    def recorded(self, row: dict, net: torch.nn.Module) -> None:
        """After `row` is on record (its network `net`)."""


def rescored_job(done: dict[int, dict], folder: Path) -> dict[int, dict]:
    """A job's rows (epoch -> row) with the estimate rescored by the current `ESTIMATOR` from the per-probe parts
    kept beside its checkpoint (`bench.tracking_report.rescored`)."""
    return {row["epoch"]: row for row in rescored(list(done.values()), load_probes([folder / "probes.jsonl"]))}


def load_probes(paths: list[Path]) -> dict:
    """The per-probe values of `probes.jsonl` files: job fields (`bench.tracking_report.JOB`) -> epoch -> values."""
    probes: dict = {}
    for path in paths:
        for line in path.read_text().splitlines() if path.exists() else []:
            kept = recorded(json.loads(line))
            probes.setdefault(job_key(kept), {})[kept["epoch"]] = kept
    return probes


def selected_epochs(rows: dict[int, dict], data: str) -> set[int]:
    """The epochs that some signal selects as the most robust so far (the report's argmax, first of equals):
    the estimate, the linear step and APGD at each AutoAttack radius, -lambda_max and -grad norm."""
    keys = [f"{signal}/{norm}/{eps:.4g}" for norm, radii in AA_RADII[data].items() for eps in radii
            for signal in ("estimate_aa_probes", "linear_aa_probes", "apgd")]
    epochs = sorted(rows)
    picks = {max(epochs, key=lambda e: (rows[e][key], -e)) for key in keys}
    return picks | {max(epochs, key=lambda e: (-rows[e][key], -e)) for key in ("lambda_max_median",
                                                                               "grad_norm_median")}


class EpochEvaluation(Resumable):
    """`evaluate` after every epoch; the weights of every epoch to `weights` (not committed, for `--cost`) and of
    the `selected_epochs` beside the checkpoint (committed with it, for the standard AutoAttack at the job's end)."""

    def __init__(self, job: dict, done: dict[int, dict], x: torch.Tensor, y: torch.Tensor, aa_probes: int,
                 rows: Path, checkpoint: Path, weights: Path, start: int):
        super().__init__(job, done, rows, checkpoint, start)
        self.x, self.y, self.aa_probes, self.weights = x, y, aa_probes, weights
        self.probes: dict = {}

    def measured(self, net: torch.nn.Module) -> dict:
        row, self.probes = evaluate(net, self.x, self.y, self.job["data"], self.aa_probes)
        return row

    def recorded(self, row: dict, net: torch.nn.Module) -> None:
        epoch, folder = row["epoch"], self.checkpoint.parent
        with open(folder / "probes.jsonl", "a") as handle:  # per job: jobs run side by side
            handle.write(json.dumps({**self.job, "epoch": epoch, **self.probes}) + "\n")
        torch.save(net.state_dict(), self.weights / f"epoch{epoch}.pt")
        keep = selected_epochs(rescored_job(self.done, folder), self.job["data"])
        if epoch in keep:
            torch.save(net.state_dict(), folder / f"epoch{epoch}.pt")
        for old in folder.glob("epoch*.pt"):
            if int(old.stem.removeprefix("epoch")) not in keep:
                old.unlink()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k.startswith(("epoch", "clean", "estimate/", "apgd/", "pgd20/l2/0.5", "estimate_s",
                                           "pgd20_s", "apgd_s"))}), flush=True)


class CalibrationEvaluation(Resumable):
    """`--calibrate`: after every training epoch only the clean accuracy and PGD-10 at the training radius
    (L-inf, step eps / 4, one random start) on the probes, the signature of each regime's effect (a collapse of
    FGSM-AT, a peak then a fall of PGD-AT), to `calibration.jsonl`."""

    def __init__(self, job: dict, done: dict[int, dict], x: torch.Tensor, y: torch.Tensor, eps: float,
                 checkpoint: Path, start: int) -> None:
        super().__init__(job, done, CALIBRATION, checkpoint, start)
        self.x, self.y, self.eps = x, y, eps

    def measured(self, net: torch.nn.Module) -> dict:
        net.eval()
        with torch.no_grad():
            clean = float((net(self.x).argmax(1) == self.y).float().mean())
        return {"clean": clean, "pgd10": attacks.robust_accuracy(net, self.x, self.y, norm="linf", eps=self.eps,
                                                                 steps=10, step_size=self.eps / 4)}

    def recorded(self, row: dict, net: torch.nn.Module) -> None:
        print(json.dumps(row), flush=True)


def prepared(data: str, train: int) -> pl.LightningDataModule:
    """The data module, prepared (Fashion-MNIST's IDX files unpacked) and set up, so the probes can be read."""
    datamodule = data_module(data, train)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def load_rows(data: str) -> list[dict]:
    """The rows of `data`; a row written before `train_eps` was recorded ran at the data set's `TRAIN_EPS`, one
    written before `estimator` was recorded estimated with the line search alone."""
    path = RESULTS / f"{data}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [recorded({"train_eps": TRAIN_EPS[row["data"]], "estimator": "s_u", **row}) for row in rows]


def recorded(row: dict) -> dict:
    """The row with `recorded`: "parts" where the estimate's parts were kept per probe (every estimator since
    "min(d1, s_u)"), else "s_u"; the job key in place of the estimator."""
    return {**row, "recorded": "s_u" if row["estimator"] == "s_u" else "parts"}


def load_calibration() -> list[dict]:
    return [json.loads(line) for line in CALIBRATION.read_text().splitlines()] if CALIBRATION.exists() else []


def on_record(rows: list[dict], job: dict) -> dict[int, dict]:
    """epoch -> row of the rows that belong to `job` (the same `job_key`)."""
    key = job_key(job)
    return {row["epoch"]: row for row in rows if job_key(row) == key}


def job_name(data: str, name: str, seed: int, epochs: int, train: int, train_eps: float,
             widths: tuple[int, ...] | None = None) -> str:
    """A job's folder name (a radius other than `TRAIN_EPS` is named, to the 4 digits it is printed with)."""
    suffix = "" if math.isclose(train_eps, TRAIN_EPS[data], rel_tol=1e-3) else f"_r{train_eps:.4g}"
    return f"{data}_{name}_s{seed}_e{epochs}_t{train}{suffix}" + (f"_w{'-'.join(map(str, widths))}" if widths else "")


def network(channels: int, widths: tuple[int, ...] | None = None) -> SmallCNN:
    """The job's SmallCNN: its default widths, or `widths`."""
    return SmallCNN(channels, 10, **({"widths": widths} if widths else {}))


def _fit(data: str, name: str, seed: int, epochs: int, train: int, probes: int, train_eps: float,
         callbacks: Callable[[torch.Tensor, torch.Tensor], list], widths: tuple[int, ...] | None = None,
         ckpt_path: Path | None = None) -> None:
    """Train the SmallCNN (its default `widths`, or these) in regime `name` from `seed` (or continue from
    `ckpt_path`), with the callbacks made for the first `probes` test images."""
    pl.seed_everything(seed, workers=True)
    datamodule = prepared(data, train)
    x, y = (t[:probes] for t in datamodule.splits["test"].tensors)
    net = network(datamodule.in_channels, widths)
    module = FisherRegularizedClassifier(net, 10, optimizer=OPTIMIZER,
                                         scheduler=cosine(epochs), **regime(name, data, train_eps))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
                         enable_checkpointing=False, callbacks=callbacks(x, y))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


def supersede(path: Path, rows) -> None:
    """Move `rows` out of the results file `path` into `<path stem>_superseded.jsonl` beside it."""
    lines = [json.dumps(row) for row in rows]
    moved = set(lines)
    kept = [line for line in path.read_text().splitlines() if json.dumps(json.loads(line)) not in moved]
    with open(path.with_name(f"{path.stem}_superseded.jsonl"), "a") as handle:
        handle.write("".join(line + "\n" for line in lines))
    path.write_text("".join(line + "\n" for line in kept))


def job_fields(data: str, name: str, seed: int, epochs: int, train: int, probes: int, aa_probes: int,
               train_eps: float | None = None, widths: tuple[int, ...] | list[int] | None = None) -> dict:
    """A job's fields as its rows carry them (`train_eps` default `default_train_eps`, `widths` a list where
    given)."""
    job = {"data": data, "regime": name, "seed": seed, "epochs": epochs, "train": train, "probes": probes,
           "aa_probes": aa_probes, "train_eps": default_train_eps(data, name) if train_eps is None else train_eps}
    if widths:
        job["widths"] = list(widths)
    return job


def load_standard(data: str) -> list[dict]:
    """The standard AutoAttack rows of `data` (`<data>_standard.jsonl`)."""
    path = RESULTS / f"{data}_standard.jsonl"
    return [recorded(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def standard_pending(job: dict, done: dict[int, dict], existing: dict[int, dict]) -> set[int]:
    """The epochs of an ended job (rows `done`) at which the standard AutoAttack is still to run: those some
    signal selects on the rescored rows, less those on record (`existing`)."""
    folder = RESUME / job_name(job["data"], job["regime"], job["seed"], job["epochs"], job["train"],
                               job["train_eps"], job.get("widths"))
    return selected_epochs(rescored_job(done, folder), job["data"]) - set(existing)


def run_job(data: str, name: str, seed: int, epochs: int, train: int, probes: int, aa_probes: int,
            train_eps: float | None = None, calibrate: bool = False, widths: tuple[int, ...] | None = None,
            restart: bool = False) -> bool:
    """One job, continued from its committed checkpoint (`RESUME`), or skipped where every epoch is on record;
    False where its rows cannot be continued (on record, but their checkpoint is lost), unless `restart`: then
    they move to the `supersede`d rows and the job starts again."""
    job = {**job_fields(data, name, seed, epochs, train, probes, aa_probes, train_eps, widths), "machine": machine()}
    train_eps = job["train_eps"]
    if not calibrate:
        job.update(estimator=ESTIMATOR, recorded="parts", search="cut")  # the line search's stop (`robustness`)
    done = on_record(load_calibration() if calibrate else load_rows(data), job)
    label = f"{data} {name} seed {seed}"
    if len(done) >= epochs:
        print(f"{label}: all {epochs} epochs on record")
        return True
    folder = RESUME / ("calibration" if calibrate else "") / job_name(data, name, seed, epochs, train, train_eps,
                                                                     widths)
    checkpoint = folder / "last.ckpt"
    if done and not checkpoint.exists():
        if not restart:
            print(f"{label}: epochs 0-{max(done)} are on record but their checkpoint {checkpoint} is not (lost with "
                  "the machine that ran them): the job cannot be continued (--restart starts it again)")
            return False
        supersede(CALIBRATION if calibrate else RESULTS / f"{data}.jsonl", done.values())
        done = {}
    folder.mkdir(parents=True, exist_ok=True)
    resumed = checkpoint if done else None
    start = torch.load(checkpoint, weights_only=False)["epoch"] + 1 if resumed else 0  # saved at its epoch's end
    if calibrate:
        _fit(data, name, seed, epochs, train, probes, train_eps,
             lambda x, y: [CalibrationEvaluation(job, done, x, y, train_eps, checkpoint, start)], widths, resumed)
        return True
    weights = RESULTS / "weights" / folder.name
    weights.mkdir(parents=True, exist_ok=True)
    _fit(data, name, seed, epochs, train, probes, train_eps,
         lambda x, y: [EpochEvaluation(job, done, x, y, aa_probes, RESULTS / f"{data}.jsonl", checkpoint, weights,
                                       start)], widths, resumed)
    return True


def standard(data: str, name: str, seed: int, epochs: int, train: int, probes: int, aa_probes: int,
             train_eps: float | None = None, widths: tuple[int, ...] | None = None) -> list[dict]:
    """The standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; `pyautoattack`) at each AutoAttack radius on the
    first `aa_probes` probes, at every epoch some signal selects (`selected_epochs`, weights kept beside the job's
    checkpoint), for an ended job; rows appended to `<data>_standard.jsonl`, an epoch already there skipped."""
    job = {**job_fields(data, name, seed, epochs, train, probes, aa_probes, train_eps, widths),
           "estimator": ESTIMATOR, "recorded": "parts"}
    train_eps = job["train_eps"]
    done = on_record(load_rows(data), job)
    if len(done) < epochs:
        raise SystemExit(f"{data} {name} seed {seed}: {len(done)} of {epochs} epochs on record; the standard "
                         "AutoAttack runs at the checkpoints selected over the whole run")
    path = RESULTS / f"{data}_standard.jsonl"
    existing = on_record(load_standard(data), job)
    datamodule = prepared(data, train)
    x, y = (t[:aa_probes] for t in datamodule.splits["test"].tensors)
    folder = RESUME / job_name(data, name, seed, epochs, train, train_eps, widths)
    rows = []
    for epoch in sorted(standard_pending(job, done, existing)):
        if not (folder / f"epoch{epoch}.pt").exists():  # selected by a rescored estimate after the job ended
            print(f"{data} {name} seed {seed}: epoch {epoch} is selected but its weights were not kept; the report "
                  "takes APGD there")
            continue
        net = network(datamodule.in_channels, widths)
        net.load_state_dict(torch.load(folder / f"epoch{epoch}.pt"))
        net.eval()
        row = {**job, "machine": machine(), "epoch": epoch}
        start = time.perf_counter()
        for norm, radii in AA_RADII[data].items():
            for eps in radii:
                row[f"aa/{norm}/{eps:.4g}"] = float(autoattack_robust(net, x, y, norm, eps, "standard").mean())
        row["aa_s"] = time.perf_counter() - start
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def cost(data: str, name: str, seed: int, epochs: int, train: int, probes: int, epoch: int,
         train_eps: float | None = None, widths: tuple[int, ...] | None = None) -> str:
    """The estimate's cost against PGD-20 at every radius, in one process, on a saved epoch's weights (those of
    every epoch under `weights/`, else the kept ones beside the job's checkpoint); beside it, the same estimate
    with the line search followed to the class change everywhere (`cutoff=inf`, the search before its cut)."""
    train_eps = default_train_eps(data, name) if train_eps is None else train_eps
    datamodule = prepared(data, train)
    x, y = (t[:probes] for t in datamodule.splits["test"].tensors)
    net = network(datamodule.in_channels, widths)
    job = job_name(data, name, seed, epochs, train, train_eps, widths)
    saved = RESULTS / "weights" / job / f"epoch{epoch}.pt"
    net.load_state_dict(torch.load(saved if saved.exists() else RESUME / job / f"epoch{epoch}.pt"))
    net.eval()
    start = time.perf_counter()
    distances = robust_distances(net, x, ("l2", "linf"), mode="eval", bounds=(0.0, 1.0))
    estimate = time.perf_counter() - start
    start = time.perf_counter()
    with fl.preserved_state(net, x):
        op = fl.FisherOperator(net, x)
        found = margin_gradients_of(op)
        full = {norm: minimal_perturbation(op, norm, bounds=(0.0, 1.0), margins=found, cutoff=math.inf).distance
                for norm in ("l2", "linf")}
    uncut = time.perf_counter() - start
    same = all(torch.equal(distances[norm], full[norm]) for norm in distances)
    start = time.perf_counter()
    for norm, radii in RADII[data].items():
        for eps in radii:
            attacks.robust_accuracy(net, x, y, norm=norm, eps=eps, steps=20, step_size=eps / 4)
    pgd = time.perf_counter() - start
    return (f"machine: {machine()}\n{data} {name} seed {seed} epoch {epoch}, {len(x)} probes: "
            f"estimate {estimate:.1f} s (the search uncut {uncut:.1f} s, distances {'equal' if same else 'DIFFER'}), "
            f"PGD-20 at {sum(map(len, RADII[data].values()))} radii {pgd:.1f} s, ratio {estimate / pgd:.3f} "
            f"(uncut {uncut / pgd:.3f})")


def sweep_settings(settings: dict, data: str, name: str) -> dict:
    """The command line's `settings` (epochs, train, probes, aa_probes) with a sweep job's `SWEEP_SETTINGS`."""
    return {**settings, **SWEEP_SETTINGS.get((data, name), {})}


def sweep_jobs(settings: dict) -> list[dict]:
    """Every job of `SWEEP` with `sweep_settings`, as the keys its rows carry."""
    return [{**job_fields(data, name, seed, **sweep_settings(settings, data, name)), "recorded": "parts"}
            for data, name, seed in SWEEP]


def evaluation_seconds(row: dict) -> float:
    """One epoch's evaluation in a row: the estimate, the Fisher scores, PGD-20 and APGD."""
    return row["estimate_s"] + row.get("fisher_s", 0.0) + row["pgd20_s"] + row["apgd_s"]


def plan(jobs: list[dict], rows: list[dict], standard: list[dict]) -> str:
    """What the sweep has left, in core-hours at the rates measured in its rows (one process, one thread): per
    job its epochs on record, the median evaluation and training seconds of an epoch of the same data set, regime
    and widths (of the data set's other regimes where this one has none, marked; training where rows recorded
    it), and the standard AutoAttack at the epochs that an ended job's signals select and it has not run yet, or,
    for a job not ended, at the median count it ran at per ended job. A lower bound where training was not
    recorded."""
    def median(values: list[float]) -> float:
        return float(statistics.median(values)) if values else math.nan

    def alike(row: dict, job: dict, same_regime: bool) -> bool:
        return (row["data"] == job["data"] and row.get("widths") == job.get("widths")
                and (row["regime"] == job["regime"] or not same_regime) and "apgd_s" in row)

    ended = [job for job in jobs if len(on_record(rows, job)) >= job["epochs"]]
    standard_per_epoch = median([row["aa_s"] for row in standard if "aa_s" in row])
    selected = median([len(on_record(standard, job)) for job in ended])
    lines = ["| job | epochs on record | evaluation s / epoch | training s / epoch | standard AutoAttack epochs "
             "left | core-hours left |", "|---|---:|---:|---:|---:|---:|"]
    total, unmeasured = 0.0, 0
    for job in jobs:
        done = on_record(rows, job)
        measured = [row for row in rows if alike(row, job, True)]
        marked = "" if measured else " (other regimes)"
        measured = measured or [row for row in rows if alike(row, job, False)]
        evaluation = median([evaluation_seconds(row) for row in measured])
        training = median([row["train_s"] for row in measured if "train_s" in row])
        standard_left = (len(standard_pending(job, done, on_record(standard, job))) if len(done) >= job["epochs"]
                         else selected)
        left = (job["epochs"] - len(done)) * (evaluation + (0.0 if math.isnan(training) else training))
        hours = (left + standard_left * standard_per_epoch) / 3600
        if math.isnan(hours):
            unmeasured += 1
        else:
            total += hours
        name = f"{job['data']} {job['regime']} seed {job['seed']}" + (
            f" w{'-'.join(map(str, job['widths']))}" if job.get("widths") else "")
        lines.append(f"| {name} | {len(done)} / {job['epochs']} | {evaluation:.0f}{marked} | "
                     f"{'-' if math.isnan(training) else f'{training:.0f}'} | {standard_left:g} | {hours:.1f} |")
    lines += ["", f"Left: {total:.0f} core-hours at the measured rates (the standard AutoAttack at "
              f"{standard_per_epoch:.0f} s an epoch, {selected:g} selected epochs per job); training counted only "
              f"where rows recorded it, so a lower bound; {unmeasured} jobs without any measured rate."]
    return "\n".join(lines)


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
                        help="the SmallCNN's widths, e.g. 64,128,256 (default 32,64,128; the sweep's "
                             "`SWEEP_SETTINGS`)")
    parser.add_argument("--restart", action="store_true", help="a job whose rows cannot be continued (their "
                                                               "checkpoint lost) starts again; its rows move to "
                                                               "<file>_superseded.jsonl")
    parser.add_argument("--sweep", action="store_true", help="every job of `SWEEP` in order, each resumed or skipped")
    parser.add_argument("--shard", type=lambda text: tuple(int(part) for part in text.split("/")), default=(0, 1),
                        metavar="I/N", help="with --sweep, the jobs I, I + N, ... of `SWEEP` (N processes side by "
                                            "side, each with OMP_NUM_THREADS=1; default 0/1, every job)")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--plan", action="store_true", help="what the sweep has left, in core-hours at the rates "
                                                            "its rows measured")
    parser.add_argument("--standard", action="store_true", help="the standard AutoAttack at the epochs the signals "
                                                                "select, for an ended job (the sweep runs it after "
                                                                "each job)")
    parser.add_argument("--cost", type=int, metavar="EPOCH", help="time the estimate against PGD-20 on that epoch's "
                                                                  "saved weights of the job")
    args = parser.parse_args()
    if len(args.shard) != 2 or not 0 <= args.shard[0] < args.shard[1]:
        parser.error(f"--shard must be I/N with 0 <= I < N, got {'/'.join(map(str, args.shard))}")
    quiet_lightning()
    settings = {"epochs": args.epochs, "train": args.train, "probes": args.probes, "aa_probes": args.aa_probes}
    if args.plan:
        print(f"machine: {machine()}\n")
        print(plan(sweep_jobs(settings), [row for data in RADII for row in load_rows(data)],
                   [row for data in RADII for row in load_standard(data)]))
        return
    if args.report:
        rows, probes = load_rows(args.data), load_probes(sorted(RESUME.glob(f"{args.data}_*/probes.jsonl")))
        full = load_standard(args.data)
        text = report(args.data, rows, load_calibration(), full, probes)
        (RESULTS / f"{args.data}.md").write_text(text)
        if rows:
            save(curves_figure(args.data, rows, full, probes), RESULTS / f"{args.data}.png")
        print(text)
        return
    if args.cost is not None:
        print(cost(args.data, args.regime, args.seed, args.epochs, args.train, args.probes, args.cost,
                   args.train_eps, args.widths))
        return
    if args.sweep:
        index, count = args.shard
        for data, name, seed in SWEEP[index::count]:  # a job that cannot be continued is skipped, with the reason
            job_settings = sweep_settings(settings, data, name)
            if run_job(data, name, seed, **job_settings):
                standard(data, name, seed, **job_settings)
        return
    if args.standard:
        standard(args.data, args.regime, args.seed, args.epochs, args.train, args.probes, args.aa_probes,
                 args.train_eps, args.widths)
        return
    run_job(args.data, args.regime, args.seed, args.epochs, args.train, args.probes, args.aa_probes, args.train_eps,
            args.calibrate, args.widths, args.restart)


if __name__ == "__main__":
    main()
