"""The robustness / cost frontier of the Fisher penalties against TRADES and PGD adversarial training.

Every method gets the same 3-point search of its strength (the Fisher penalties' weight, TRADES' beta,
PGD-AT's training eps with 10 steps and with 2 steps) and every setting trains `--seeds` seeds of the recipes'
SmallCNN for `--epochs` epochs on an offline data set (`--train` images), Adam 3e-3 with a cosine decay
stepped per epoch (the last epoch at 4% of the rate; at a constant rate BatchNorm's running statistics trail
the weights: the eval-mode Fashion-MNIST model swung between 51% and 76% from one epoch to the next,
`bench/batchnorm_schedule.py`).
Per run: clean test accuracy, PGD L-inf 8/255 and L2 0.5 robust accuracy (ART, 20 steps, one random start)
and the median minimal L2 perturbation (DeepFool + PGD bisection) on the first `--eval` test images, and the
training wall time. Runs append to
`bench/results/frontier_<data>.jsonl` (`frontier_<data>_gpu.jsonl` with `--accelerator gpu`, where training
and attacks run on the GPU; `--results` moves the folder); a finished run (same method, setting, seed, `--train`
and `--epochs`, attacked by AutoAttack too) is skipped when the command is started again (a run from before
AutoAttack was added runs again and its new row replaces it), and the report covers the runs of the given
`--train` and `--epochs`.

    python bench/regularization_frontier.py --data cifar10              # train what is missing, then report
    python bench/regularization_frontier.py --data fashion_mnist
    python bench/regularization_frontier.py --data cifar10 --report     # the table and the Pareto figure only
    python bench/frontier_jobs.py --processes 12 --accelerator gpu     # every run as parallel jobs

The report, printed and written to `frontier_<data>.md`: per setting, means over seeds with 95% t-intervals
(none with one seed); the matched comparison (each method's most robust setting whose clean accuracy is at most
2 points below that of TRADES' most robust setting, if any) with issue 14's target (PGD L2 accuracy at least
TRADES' in at most 40% of its training time); and `frontier_<data>.png`, clean accuracy against PGD L2 and
L-inf accuracy, marker area = training time. Rows trained while `--sharing` processes shared the device (the
GPU jobs) give no time ratio: their wall times measure the others' load; the verdict is then on PGD L2 alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import autoattack_robust, data_dir, machine, quiet_lightning  # noqa: E402
from fim_lightning.figures import new_figure, save  # noqa: E402
from fim_lightning.module import FisherRegularizedClassifier  # noqa: E402
from recipes import attacks  # noqa: E402
from recipes.data import NpzDataModule, TorchvisionDataModule  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 8 / 255


def data_module(name: str, train: int) -> pl.LightningDataModule:
    """The offline data set `name` with its first `train` training images."""
    if name == "cifar10":
        return NpzDataModule(str(data_dir() / "cifar10_subset.npz"), num_classes=10, in_channels=3, batch_size=128,
                             limit_train=train)
    return TorchvisionDataModule("FashionMNIST", num_classes=10, in_channels=1, batch_size=128,
                                 idx_dir="/usr/share/datasets/fashion-mnist", download=False, limit_train=train)


SETTINGS = {
    "plain": {"-": {}},
    "FisherWorstDirectionPenalty": {f"w={w}": {"penalty": partial(fl.FisherWorstDirectionPenalty, weight=w)}
                                    for w in (0.1, 0.3, 1.0)},
    "FisherKLPenalty": {f"w={w}": {"penalty": partial(fl.FisherKLPenalty, weight=w)} for w in (0.1, 0.3, 1.0)},
    "TRADES": {f"beta={b}": {"penalty": partial(attacks.TradesPenalty, beta=b)} for b in (1.0, 3.0, 6.0)},
    # the closest published Fisher peer (Picot et al. 2022): TRADES with the squared Fisher-Rao distance
    "FIRE": {f"beta={b}": {"penalty": partial(attacks.FirePenalty, beta=b)} for b in (1.0, 3.0, 6.0)},
    "PGD-AT": {f"eps={e}/255": {"adversarial": partial(attacks.PGD, eps=e / 255, step_size=e / 255 / 4)}
               for e in (2, 4, 8)},
    # the cheap adversarial-training baseline (fast AT, cf. Wong et al. 2020): 2 steps of eps / 2 from a
    # random start, about 3x a plain step (conf/regularizer/pgd_at_fast.yaml at eps 8/255)
    "PGD-AT, 2 steps": {
        f"eps={e}/255": {"adversarial": partial(attacks.PGD, eps=e / 255, step_size=e / 255 / 2, steps=2)}
        for e in (2, 4, 8)},
}


OPTIMIZER = partial(torch.optim.Adam, lr=3e-3)


def cosine(epochs: int) -> partial:
    """The frontier's learning-rate schedule: a cosine over `epochs`, stepped per epoch."""
    return partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)


def plain_trainer(epochs: int, callbacks: tuple[pl.Callback, ...] = (), accelerator: str = "cpu") -> pl.Trainer:
    """The frontier's Trainer: one device, `epochs` epochs, no logger, checkpoints or validation, deterministic
    algorithms (on a GPU only a warning where an op has none: adaptive pooling's backward)."""
    return pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, deterministic=True if accelerator == "cpu" else "warn",
                      callbacks=list(callbacks))


def run(data: pl.LightningDataModule, method: str, setting: str, seed: int, epochs: int, evaluated: int,
        accelerator: str = "cpu") -> dict:
    """Train one setting with one seed on `accelerator`; its clean / robust accuracies, median minimal
    perturbation (attacked on the same device), training time."""
    pl.seed_everything(seed, workers=True)
    channels = data.in_channels
    options = {name: make() for name, make in SETTINGS[method][setting].items()}
    module = FisherRegularizedClassifier(SmallCNN(channels, 10), 10, optimizer=OPTIMIZER, scheduler=cosine(epochs),
                                         **options)
    trainer = plain_trainer(epochs, accelerator=accelerator)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    net = module.net.to(device).eval()
    images, labels = (t.to(device) for t in data.splits["test"].tensors)
    with torch.no_grad():
        clean = (torch.cat([net(b).argmax(1) for b in images.split(256)]) == labels).float().mean().item()
    x, y = images[:evaluated], labels[:evaluated]
    return {"clean": clean, "train_s": seconds,
            "pgd_linf": attacks.robust_accuracy(net, x, y, norm="linf", eps=EPS, step_size=EPS / 4),
            "pgd_l2": attacks.robust_accuracy(net, x, y, norm="l2", eps=0.5, step_size=0.125),
            # AutoAttack's APGD-CE + APGD-T (standard settings) at the same radii: gradient masking shows as PGD
            # accuracy far above it
            "aa_linf": float(autoattack_robust(net, x, y, "linf", EPS).mean()),
            "aa_l2": float(autoattack_robust(net, x, y, "l2", 0.5).mean()),
            "median_min_perturbation": float(np.median(attacks.minimal_perturbation(net, x, search_steps=5)))}


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (method, setting, seed): a run from before AutoAttack was added (no `aa_linf`) counts
    as not finished, and its rerun replaces it."""
    return list({(r["method"], r["setting"], r["seed"]): r for r in rows}.values())


def first(rows: list[dict]) -> list[dict]:
    """The first row of each (method, setting, seed): the runs as first trained, before their AutoAttack reruns
    (which shared the cores, so only the first rows of the CPU frontier give time ratios)."""
    runs: dict[tuple, dict] = {}
    for r in rows:
        runs.setdefault((r["method"], r["setting"], r["seed"]), r)
    return list(runs.values())


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


# the methods the target is for
FISHER = ("FisherWorstDirectionPenalty", "FisherKLPenalty")
METRICS = ("clean", "pgd_l2", "pgd_linf", "median_min_perturbation", "train_s")
TARGET_TIME = 0.40  # issue 14: PGD L2 accuracy >= TRADES' in at most 40% of its training time


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (method, setting): each metric's mean and 95% t-interval half-width over seeds, and the seed count."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["method"], row["setting"]), []).append(row)
    order = [(method, setting) for method, settings in SETTINGS.items() for setting in settings]
    return {key: {m: interval([r[m] for r in grouped[key]]) for m in METRICS} | {"seeds": len(grouped[key])}
            for key in sorted(grouped, key=order.index)}


def method_times(rows: list[dict]) -> dict[str, tuple[float, float, int]]:
    """Per method, the mean training time over all its runs and its 95% t-interval. The work per step does not
    depend on the strength (weight, beta, eps), so every setting's runs measure the same cost; pooling them
    averages out the machine's noise (identical TRADES runs differed by 25% here)."""
    times: dict[str, list[float]] = {}
    for row in rows:
        times.setdefault(row["method"], []).append(row["train_s"])
    return {method: (*interval(values), len(values)) for method, values in times.items()}


def cell(value: tuple[float, float], seeds: int, digits: int = 3, sign: str = "") -> str:
    """A mean, with its interval half-width from 2 seeds on; `sign="+"` prints the mean's sign."""
    return f"{value[0]:{sign}.{digits}f}" + (f" ± {value[1]:.{digits}f}" if seeds > 1 else "")


def paired_difference(rows: list[dict], key: tuple[str, str], reference: tuple[str, str], metric: str
                      ) -> tuple[tuple[float, float], int]:
    """`metric` of setting `key` minus that of `reference`, seed by seed (the seeds both have): the mean
    difference with its 95% t-interval half-width, and the number of seeds."""
    by_seed = {(r["method"], r["setting"], r["seed"]): r[metric] for r in rows}
    seeds = sorted(s for (m, k, s) in by_seed if (m, k) == key and (*reference, s) in by_seed)
    differences = [by_seed[(*key, s)] - by_seed[(*reference, s)] for s in seeds]
    return interval(differences), len(differences)


def matched(summary: dict) -> tuple[tuple[str, str], list[tuple[str, tuple[str, str] | None]]]:
    """TRADES' most robust setting (PGD L2) and, per method, its most robust setting whose clean accuracy is at
    most 2 points below that reference (None where none is)."""
    trades = {k: s for k, s in summary.items() if k[0] == "TRADES"}
    reference = max(trades, key=lambda k: trades[k]["pgd_l2"][0])
    floor = summary[reference]["clean"][0] - 0.02
    chosen: list[tuple[str, tuple[str, str] | None]] = []
    for method in dict.fromkeys(k[0] for k in summary):
        close = [k for k, s in summary.items() if k[0] == method and s["clean"][0] >= floor]
        chosen.append((method, max(close, key=lambda k: summary[k]["pgd_l2"][0]) if close else None))
    return reference, chosen


def report(rows: list[dict], name: str, evaluated: int, stem: Path) -> str:
    """The table, the matched comparison with the target's verdict, and the Pareto figure of the finished runs
    (all of one training size); written to `<stem>.md` and `<stem>.png`, and returned."""
    summary = summarise(rows)
    cost = method_times(rows)
    sharing = max(row.get("sharing", 1) for row in rows)  # processes that shared one device, at most
    # time ratios from the runs timed alone on the device: one trained while `sharing` processes shared it
    # measures their load, not its cost
    alone = method_times([row for row in rows if row.get("sharing", 1) == 1])
    timed = "TRADES" in alone
    machines = sorted({row.get("machine", "not recorded") for row in rows})
    lines = [f"{name}: SmallCNN, {rows[0]['train']} training images, {rows[0]['epochs']} epochs, Adam 3e-3 with "
             "cosine decay per epoch, batch 128; "
             f"attacks on {evaluated} test images, clean accuracy on the whole test split",
             "", "rows trained on: " + "; ".join(machines), "",
             "| method | setting | seeds | clean acc | PGD L2 0.5 acc | PGD L-inf 8/255 acc | "
             "median min perturbation (L2) | train time (s) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (method, setting), s in summary.items():
        cells = " | ".join(f"{s[m][0]:.0f}" if m == "train_s" else cell(s[m], s["seeds"]) for m in METRICS)
        lines.append(f"| {method} | {setting} | {s['seeds']} | {cells} |")
    floor = None
    if any(k[0] == "TRADES" for k in summary):
        reference, chosen = matched(summary)
        r = summary[reference]
        floor = r["clean"][0] - 0.02
        lines += ["", f"Matched to TRADES {reference[1]} (its most robust setting: clean {r['clean'][0]:.3f}, PGD L2 "
                  f"{r['pgd_l2'][0]:.3f}): each method's most robust setting with clean accuracy at most 2 points "
                  "below. Differences: mean over seeds of the seed-by-seed difference to TRADES, ± its 95% "
                  "t-interval. " + (
                      "Time: each method's mean training time over its runs timed alone on the device (the strength "
                      f"does not change the work), against TRADES' {alone['TRADES'][0]:.0f} s"
                      + ("" if sharing == 1 else f"; runs trained while up to {sharing} processes shared the device "
                         "give no time, and a method with none of its own has no time ratio (its verdict on PGD L2 "
                         "alone)") +
                      f". Target: mean PGD L2 - TRADES >= 0 at time / TRADES <= {TARGET_TIME:.2f}." if timed else
                      f"Time: up to {sharing} processes shared the device, so a run's wall time measures the "
                      "others' load, not its cost: no time ratio (the per-step costs are bench/penalty_cost.py's, "
                      "one process); the target's verdict here is on PGD L2 alone (mean PGD L2 - TRADES >= 0)."),
                  "",
                  "| method | setting | clean - TRADES | PGD L2 - TRADES | PGD L-inf - TRADES | "
                  "min perturbation / TRADES | mean train time (s) | time / TRADES | target |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for method, key in chosen:
            if key is None:
                lines.append(f"| {method} | none within 2 points below | | | | | | | |")
                continue
            s = summary[key]
            time_ratio = alone[method][0] / alone["TRADES"][0] if timed and method in alone else None
            clean, l2, linf = (paired_difference(rows, key, reference, m) for m in ("clean", "pgd_l2", "pgd_linf"))
            met = l2[0][0] >= 0 and (time_ratio is None or time_ratio <= TARGET_TIME)
            verdict = "-" if method not in FISHER else ("met" if met else "missed") + (
                "" if time_ratio is not None else " (PGD L2)")
            differences = " | ".join(cell(*difference, sign="+") for difference in (clean, l2, linf))
            lines.append(f"| {method} | {key[1]} | {differences} | "
                         f"{s['median_min_perturbation'][0] / r['median_min_perturbation'][0]:.2f} | "
                         f"{cell(cost[method][:2], cost[method][2], 0)} ({cost[method][2]} runs) | "
                         f"{'-' if time_ratio is None else f'{time_ratio:.2f}'} | {verdict} |")
    lines += masking_section(rows)
    plot = save(pareto_figure(summary, name, floor, sized=sharing == 1), stem.with_suffix(".png"))
    root = RESULTS.parents[1]
    lines += ["", f"plot: {plot.relative_to(root) if plot.is_relative_to(root) else plot}"]
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(text + "\n")
    return text


def masking_section(rows: list[dict]) -> list[str]:
    """AutoAttack (APGD-CE + APGD-T) accuracy and PGD minus it per method and setting (in `SETTINGS` order), where
    the rows have both (rows from before AutoAttack was added have none; the section is then absent)."""
    attacked = [row for row in rows if "aa_linf" in row]
    if not attacked:
        return []
    lines = ["", "AutoAttack accuracy (APGD-CE + APGD-T, `pyautoattack`) and PGD minus it, points, mean over seeds:",
             "",
             "| method | setting | seeds | L-inf 8/255: AA | PGD - AA | L2 0.5: AA | PGD - AA |",
             "|---|---|---:|---:|---:|---:|---:|"]
    order = [(method, setting) for method, settings in SETTINGS.items() for setting in settings]
    for key in sorted(dict.fromkeys((row["method"], row["setting"]) for row in attacked), key=order.index):
        group = [row for row in attacked if (row["method"], row["setting"]) == key]
        cells = [f"{np.mean([row[f'aa_{norm}'] for row in group]):.3f} | "
                 f"{100 * np.mean([row[f'pgd_{norm}'] - row[f'aa_{norm}'] for row in group]):+.1f}"
                 for norm in ("linf", "l2")]
        lines.append(f"| {key[0]} | {key[1]} | {len(group)} | {cells[0]} | {cells[1]} |")
    return lines


def pareto_figure(summary: dict, name: str, floor: float | None, sized: bool = True):
    """Clean accuracy against PGD L2 and L-inf accuracy per setting, error bars = 95% intervals over seeds,
    marker area = training time where `sized` (one size where the times are no cost); the dotted line is the
    matched comparison's clean-accuracy `floor`."""
    figure = new_figure(11.0, 5.0)
    longest = max(s["train_s"][0] for s in summary.values())
    panels = (("pgd_l2", "PGD L2 0.5 accuracy"), ("pgd_linf", "PGD L-inf 8/255 accuracy"))
    for index, (metric, label) in enumerate(panels):
        ax = figure.add_subplot(1, 2, index + 1)
        for colour, method in enumerate(SETTINGS):
            points = [s for k, s in summary.items() if k[0] == method]
            if not points:
                continue
            ax.errorbar([p["clean"][0] for p in points], [p[metric][0] for p in points],
                        xerr=[p["clean"][1] for p in points], yerr=[p[metric][1] for p in points], fmt="none",
                        ecolor=f"C{colour}", alpha=0.6)
            ax.scatter([p["clean"][0] for p in points], [p[metric][0] for p in points],
                       s=[20 + 300 * p["train_s"][0] / longest if sized else 60 for p in points],
                       color=f"C{colour}", alpha=0.8, label=method)
            for (_, setting), p in ((k, s) for k, s in summary.items() if k[0] == method):
                ax.annotate(setting, (p["clean"][0], p[metric][0]), fontsize=6, xytext=(4, 4),
                            textcoords="offset points")
        if floor is not None:
            ax.axvline(floor, color="grey", linestyle=":", linewidth=1, label="TRADES' clean accuracy - 2 points")
        ax.set_xlabel("clean accuracy")
        ax.set_ylabel(label)
        ax.set_title(f"{name}: " + ("marker area = training time" if sized else "bars = 95% intervals over seeds"),
                     fontsize="small")
        if index == 0:
            ax.legend(fontsize="x-small")
    return figure


def main() -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("cifar10", "fashion_mnist"), default="cifar10")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=5000, help="training images")
    parser.add_argument("--eval", type=int, default=500, help="test images attacked")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="methods to run (default: all)")
    parser.add_argument("--only-seed", type=int, help="run this seed alone (default: seeds 0 to --seeds - 1)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                        help="train and attack on this device; GPU rows go to frontier_<data>_gpu.*")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the rows, table and figure")
    parser.add_argument("--sharing", type=int, default=1,
                        help="processes sharing the device (recorded; above 1 the report gives no time ratio)")
    parser.add_argument("--report", action="store_true", help="only print the report of the finished runs")
    parser.add_argument("--first", action="store_true", help="with --report: of each run its first row (the run "
                                                             "as first trained and timed, before an AutoAttack rerun "
                                                             "replaced it), to frontier_<data>_first.md / .png")
    args = parser.parse_args()
    if args.sharing < 1:
        parser.error("--sharing must be at least 1")
    if args.first and not args.report:
        parser.error("--first reports the first rows: it needs --report")
    name = args.data if args.accelerator == "cpu" else f"{args.data}_gpu"
    stem = args.results / f"frontier_{name}"
    path = stem.with_suffix(".jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = (first if args.first else latest)([r for r in rows if (r["train"], r["epochs"]) == (args.train,
                                                                                            args.epochs)])
    if args.first:
        stem = stem.with_name(f"{stem.name}_first")
    print(f"machine: {machine()}")
    if not args.report:
        data = data_module(args.data, args.train)
        data.prepare_data()  # Fashion-MNIST: unpack Debian's IDX files into torchvision's layout
        data.setup()
        finished = {(r["method"], r["setting"], r["seed"]) for r in done if "aa_linf" in r}
        args.results.mkdir(parents=True, exist_ok=True)
        for seed in range(args.seeds) if args.only_seed is None else (args.only_seed,):
            for method, settings in SETTINGS.items():
                if args.only and method not in args.only:
                    continue
                for setting in settings:
                    if (method, setting, seed) in finished:
                        continue
                    row = {"method": method, "setting": setting, "seed": seed, "epochs": args.epochs,
                           "train": args.train, "machine": machine(), "accelerator": args.accelerator,
                           "sharing": args.sharing,
                           **run(data, method, setting, seed, args.epochs, args.eval, args.accelerator)}
                    with path.open("a") as out:
                        out.write(json.dumps(row) + "\n")
                    done = latest([*done, row])
                    print(f"{method} {setting} seed {seed}: clean {row['clean']:.3f}, L2 {row['pgd_l2']:.3f}, "
                          f"L-inf {row['pgd_linf']:.3f}, {row['train_s']:.0f} s", flush=True)
    print(report(done, name, args.eval, stem))


if __name__ == "__main__":
    main()
