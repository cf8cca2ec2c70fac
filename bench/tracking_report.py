"""The report of `bench/tracking.py`: the estimate against AutoAttack's APGD-CE + APGD-T over the epochs of each run.

Targets (issue 23), over every (run, epoch, radius) with AutoAttack accuracy in [5%, 95%] (AutoAttack: the strongest
version run at that point, the lower of APGD-CE + APGD-T and the standard AutoAttack where that ran): median
|estimate - AutoAttack| <= 3 points and 90th percentile <= 6; within each run the Spearman of the estimate with
AutoAttack over epochs >= 0.9; the epoch the estimate selects (its most robust) within 1 point of the best by
AutoAttack; the collapse alarm (the callback's `collapsed`) in the epoch of the collapse or earlier, and in no other
regime; the estimate's cost <= 1/10 of PGD-20 (all radii) and <= 1/100 of APGD. The same statistics for the
linear-step baseline, and for the raw Fisher scores where a direction makes sense (a larger lambda_max or gradient
norm should mean less robust: their negatives are ranked).
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from fim_lightning.figures import new_figure
from fim_lightning.robustness import COLLAPSE_DROP, COLLAPSE_FLOOR, collapsed

IN_RANGE = (0.05, 0.95)
ESTIMATOR = "min(d_l, s_u)"  # the estimate the callback logs, which the sweep's rows record
COLLAPSE = 0.5  # the collapse of an attack's curve: below half its best (a best of at least 5%)
# The runs the estimator (ESTIMATOR against min(d1, s_u)) and the alarm's rule (`collapsed`) were chosen on; every
# other run is held out from those choices, and the targets are also read on the held-out runs alone.
CHOSEN_ON = {("fashion_mnist", "fgsm", 0), ("fashion_mnist", "plain", 0)}
JOB = ("data", "regime", "seed", "epochs", "train", "probes", "aa_probes", "train_eps", "recorded", "widths")


def job_key(row: dict) -> tuple:
    """The job a row, a per-probe record or a standard AutoAttack row belongs to: its `JOB` fields (lists, such as
    `widths`, as tuples, so that the key hashes)."""
    return tuple(tuple(value) if isinstance(value, list) else value for value in (row.get(k) for k in JOB))


def _runs(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (regime with its training radius and widths, seed, epochs, train, probes, recorded), each run's
    epochs once (the last row of a repeated epoch); a run recorded without the per-probe parts (the line search
    alone) is marked [s_u]."""
    runs: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        regime = row["regime"]
        if regime in ("pgd_at", "fgsm"):
            regime += f" {row['train_eps']:.4g}"
        if row.get("widths"):
            regime += f" w{'-'.join(map(str, row['widths']))}"
        if row["recorded"] != "parts":
            regime += " [s_u]"
        key = (regime, row["seed"], row["epochs"], row["train"], row["probes"], row["recorded"])
        runs.setdefault(key, {})[row["epoch"]] = row
    return {key: [epochs[e] for e in sorted(epochs)] for key, epochs in runs.items()}


def rescored(rows: list[dict], probes: dict) -> list[dict]:
    """The rows whose per-probe parts were kept, with the estimate's keys (`estimate/{key}` on every probe,
    `estimate_aa_probes/{key}` on the AutoAttack probes) recomputed from them with the current `ESTIMATOR`:
    the same estimate over a run whatever its rows were recorded with."""
    out = []
    for row in rows:
        parts = probes.get(job_key(row), {}).get(row["epoch"])
        if parts is None:
            out.append(row)
            continue
        row = dict(row)
        correct = np.asarray(parts["correct"], dtype=bool)
        for key in [key.removeprefix("estimate/") for key in row if key.startswith("estimate/")]:
            norm, eps = key.split("/")
            robust = correct & (CANDIDATES[ESTIMATOR](parts, norm) > float(eps))
            row[f"estimate/{key}"] = float(robust.mean())
            row[f"estimate_aa_probes/{key}"] = float(robust[:row["aa_probes"]].mean())
        out.append(row)
    return out


def _with_standard(rows: list[dict], standard: list[dict]) -> list[dict]:
    """Each row with `aa/{key}`: the strongest AutoAttack run at its epoch, the lower of APGD and the standard
    AutoAttack (`<data>_standard.jsonl`, at the epochs the signals selected) where that ran."""
    runs = {(job_key(row), row["epoch"]): row for row in standard}
    out = []
    for row in rows:
        full = runs.get((job_key(row), row["epoch"]), {})
        out.append({**row, **{f"aa/{key}": min(row[f"apgd/{key}"], full.get(f"aa/{key}", np.inf))
                              for key in _aa_keys([row])},
                    "standard": {key: full[f"aa/{key}"] for key in _aa_keys([row]) if f"aa/{key}" in full},
                    "standard_row": full})
    return out


def _aa_keys(rows: list[dict]) -> list[str]:
    return sorted({key.removeprefix("apgd/") for row in rows for key in row if key.startswith("apgd/")})


def _errors(runs: dict, signal: str, keys: list[str]) -> np.ndarray:
    """signal - AutoAttack in points over every (run, epoch, radius) with AutoAttack in range."""
    errors = [100 * (row[f"{signal}/{key}"] - row[f"aa/{key}"]) for epochs in runs.values() for row in epochs
              for key in keys if IN_RANGE[0] <= row[f"aa/{key}"] <= IN_RANGE[1]]
    return np.array(errors)


def _held_out(epochs: list[dict]) -> bool:
    """Whether a run took no part in choosing the estimator and the alarm (`CHOSEN_ON`)."""
    return (epochs[0]["data"], epochs[0]["regime"], epochs[0]["seed"]) not in CHOSEN_ON


def _spearman(values: list[float], reference: list[float]) -> float:
    if len(values) < 3 or np.ptp(values) == 0 or np.ptp(reference) == 0:
        return float("nan")
    return float(stats.spearmanr(values, reference)[0])


CUT_SINCE = {("fashion_mnist", "plain", 0): 3}  # the first epoch with the cut line search, before `search` was kept


# Epochs whose process was stopped (SIGSTOP) while it was timed, to free the cores for a CI run: their times are
# not measurements (PGD-AT seed 0 epoch 29: PGD-20 963.8 s against about 50 s at the epochs before).
PAUSED = {("fashion_mnist", "pgd_at", 0, 29)}


def _timed(row: dict) -> bool:
    return (row["data"], row["regime"], row["seed"], row["epoch"]) not in PAUSED


def _cut(row: dict) -> bool:
    """Whether the row's estimate ran the line search that stops where no nearer point is left."""
    since = CUT_SINCE.get((row["data"], row["regime"], row["seed"]))
    return row.get("search") == "cut" or (since is not None and row["recorded"] == "parts" and row["epoch"] >= since)


def _gap_interval(probes: dict, best: int, picked: int, key: str, resamples: int = 10_000) -> tuple[float, float]:
    """The paired 95% interval (percentile bootstrap over the AutoAttack probes, seed 0) of APGD's robust accuracy
    at epoch `best` minus that at epoch `picked`, in points, from the per-probe flags; NaN where they were not
    kept."""
    if best not in probes or picked not in probes:
        return float("nan"), float("nan")
    difference = (np.asarray(probes[best][f"apgd/{key}"], dtype=float)
                  - np.asarray(probes[picked][f"apgd/{key}"], dtype=float))
    draws = np.random.default_rng(0).integers(0, len(difference), (resamples, len(difference)))
    low, high = np.quantile(difference[draws].mean(axis=1), (0.025, 0.975))
    return 100 * float(low), 100 * float(high)


def _first_alarm(epochs: list[dict], keys: list[str]) -> tuple[int | None, str]:
    """The first epoch at which the callback's alarm (`collapsed`, its defaults) fires on the estimate at some
    radius of `keys`, and that radius."""
    for end in range(2, len(epochs) + 1):
        clean = [row["clean"] for row in epochs[:end]]
        for key in keys:
            if collapsed([row[f"estimate/{key}"] for row in epochs[:end]], clean):
                return end - 1, key
    return None, ""


def _first_collapse(series: list[float]) -> int | None:
    """The first epoch whose value is below (1 - COLLAPSE) x the best before it (a best of at least 5%)."""
    best = -np.inf
    for epoch, value in enumerate(series):
        if best >= 0.05 and value < (1 - COLLAPSE) * best:
            return epoch
        best = max(best, value)
    return None


def standard_section(runs: dict, keys: list[str]) -> list[str]:
    """The standard AutoAttack against APGD-CE + APGD-T and the estimate at the epochs where it ran."""
    lines = ["## The standard AutoAttack at the selected epochs (robust accuracy on the AutoAttack probes)\n",
             "| regime | seed | epoch | " + " | ".join(f"{key}: APGD / standard / estimate" for key in keys) + " |",
             "|---|---:|---:|" + "---|" * len(keys)]
    count = 0
    for (regime, seed, *_), epochs in runs.items():
        for row in epochs:
            if row["standard"]:
                count += 1
                lines.append(f"| {regime} | {seed} | {row['epoch']} | " + " | ".join(
                    f"{row[f'apgd/{key}']:.3f} / {row['standard'][key]:.3f} / {row[f'estimate_aa_probes/{key}']:.3f}"
                    for key in keys) + " |")
    return lines + [""] if count else []


CANDIDATES = {  # an estimator from the per-probe parts (`resume/<job>/probes.jsonl`), per norm
    "d1": lambda parts, norm: _part(parts, "first_order", norm),
    "d_l (the linear step)": lambda parts, norm: _part(parts, "linear", norm),
    "s_u": lambda parts, norm: _part(parts, "line_search", norm),
    "min(d1, s_u)": lambda parts, norm: np.minimum(_part(parts, "first_order", norm),
                                                   _part(parts, "line_search", norm)),
    ESTIMATOR: lambda parts, norm: np.minimum(_part(parts, "linear", norm), _part(parts, "line_search", norm)),
}


def _part(parts: dict, name: str, norm: str) -> np.ndarray:
    return np.asarray(parts[f"{name}/{norm}"], dtype=float)


def candidates_section(runs: dict, keys: list[str], probes: dict) -> list[str]:
    """Each candidate estimator rescored from the per-probe distances of the runs that kept them, against the
    strongest AutoAttack of the rows: the error over the in-range points, the median within-run Spearman over
    (run, radius) and the largest gap of its pick to the best."""
    scored = {name: {"errors": [], "rho": [], "gap": []} for name in CANDIDATES}
    counted = 0
    shortened = []  # per run: where the line search shortens the linear step, over the correct probes
    for (regime, seed, *_), epochs in runs.items():
        kept = probes.get(job_key(epochs[0]), {})
        epochs = [row for row in epochs if row["epoch"] in kept]
        if not epochs:
            continue
        counted += 1
        cells = []
        for norm in ("l2", "linf"):
            ratios, correct_count = [], 0
            for row in epochs:
                parts = kept[row["epoch"]]
                linear, search = _part(parts, "linear", norm), _part(parts, "line_search", norm)
                correct = np.asarray(parts["correct"], dtype=bool)
                correct_count += int(correct.sum())
                nearer = correct & (search < linear)
                ratios += list(search[nearer] / linear[nearer])
            cells.append(f"{100 * len(ratios) / max(correct_count, 1):.1f}% / "
                         f"{np.median(ratios) if ratios else float('nan'):.2f}")
        shortened.append(f"| {regime} | {seed} | {len(epochs)} | {' | '.join(cells)} |")
        for name, candidate in CANDIDATES.items():
            for radius in keys:
                norm, eps = radius.split("/")
                estimate, reference = [], []
                for row in epochs:
                    parts = kept[row["epoch"]]
                    count = row["aa_probes"]
                    d = candidate(parts, norm)[:count]
                    correct = np.asarray(parts["correct"][:count], dtype=bool)
                    estimate.append(float((correct & (d > float(eps))).mean()))
                    reference.append(row[f"aa/{radius}"])
                scored[name]["errors"] += [100 * (e - r) for e, r in zip(estimate, reference)
                                           if IN_RANGE[0] <= r <= IN_RANGE[1]]
                scored[name]["rho"].append(_spearman(estimate, reference))
                scored[name]["gap"].append(100 * (max(reference) - reference[int(np.argmax(estimate))]))
    if not counted:
        return []
    lines = [f"## Estimator candidates, rescored from the per-probe distances ({counted} runs)\n",
             "The same probes and AutoAttack as above, the distances to 4 significant digits: d1 the first-order "
             "step over every class, d_l the linear step to the runner-up class, s_u the line search's adversarial "
             "point along d1's direction (inf where it found none). min(d_l, s_u), the callback's estimate, is "
             "never further from the minimal perturbation than the linear step, per probe; min(d1, s_u) was the "
             "estimate before, chosen against on seed 0.\n",
             "| candidate | points | median abs | p90 abs | mean signed | median rho (run, radius) | worst pick gap |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, values in scored.items():
        errors = np.abs(values["errors"])
        lines.append(f"| {name} | {len(errors)} | {np.median(errors):.2f} | {np.quantile(errors, 0.9):.2f} | "
                     f"{np.mean(values['errors']):+.2f} | {np.nanmedian(values['rho']):.2f} | "
                     f"{max(values['gap']):.1f} |")
    lines += ["", "Where the line search shortens the linear step (s_u < d_l): the share of the correctly classified "
              "probes over the run's epochs, and the median s_u / d_l there.\n",
              "| regime | seed | epochs | L2: share / median s_u / d_l | L-inf: share / median s_u / d_l |",
              "|---|---:|---:|---|---|", *shortened]
    return lines + [""]


def calibration_section(calibration: list[dict]) -> list[str]:
    """The `--calibrate` runs that fixed the regimes' settings: PGD-10 accuracy at the training radius per epoch."""
    if not calibration:
        return []
    runs: dict[tuple, list[dict]] = {}
    for row in calibration:
        widths = "/".join(map(str, row.get("widths", (32, 64, 128))))
        runs.setdefault((row["regime"], row["train_eps"], row["train"], row["epochs"], widths, row["seed"]),
                        []).append(row)
    lines = ["## Calibration of the regimes (before the estimate was read): PGD-10 at the training radius\n",
             "| regime | train eps | train images | epochs | SmallCNN widths | clean first / last | "
             "PGD-10 first / best (epoch) / last | collapse (below half the best) |",
             "|---|---:|---:|---:|---|---|---|---|"]
    for (regime, eps, train, epochs, widths, _), series in runs.items():
        pgd = [row["pgd10"] for row in series]
        best = int(np.argmax(pgd))
        collapse = _first_collapse(pgd)
        lines.append(f"| {regime} | {eps:.4g} | {train} | {len(series)} / {epochs} | {widths} | "
                     f"{series[0]['clean']:.3f} / "
                     f"{series[-1]['clean']:.3f} | {pgd[0]:.3f} / {pgd[best]:.3f} ({best}) / {pgd[-1]:.3f} | "
                     f"{collapse if collapse is not None else '-'} |")
    return lines + [""]


CURVES = {  # the figure's series per panel: key prefix, label, style
    "aa": ("AutoAttack (strongest run)", {"color": "black", "linewidth": 2.0}),
    "estimate_aa_probes": (f"estimate {ESTIMATOR}", {"color": "tab:blue", "linewidth": 2.0}),
    "linear_aa_probes": ("linear step d_l", {"color": "tab:orange", "linestyle": "--"}),
    "pgd20": ("PGD-20 (all probes)", {"color": "tab:green", "linestyle": ":"}),
}


def curves_figure(data: str, rows: list[dict], standard: list[dict] = (), probes: dict | None = None) -> Figure:
    """Robust accuracy over the epochs of each run (a row of panels) at each AutoAttack radius (a column): the
    strongest AutoAttack (the standard one marked with squares where it ran), the estimate and the linear step on
    the AutoAttack probes, PGD-20 on every probe; the clean accuracy in grey and the epoch of the alarm as a red
    line (`collapsed` on the estimate, as in the report's collapse table); the x axis spans the job's planned
    epochs, so a run under way shows how far it has come."""
    rows = _with_standard(rescored(rows, probes or {}), list(standard))
    runs, keys = _runs(rows), _aa_keys(rows)
    estimated = sorted({key.removeprefix("estimate/") for key in rows[0] if key.startswith("estimate/")})
    figure = new_figure(3.2 * len(keys), 2.4 * len(runs) + 0.6)
    axes = figure.subplots(len(runs), len(keys), squeeze=False, sharey=True)
    for (regime, seed, *_), epochs, panels in zip(runs, runs.values(), axes):
        x = [row["epoch"] for row in epochs]
        alarm, _ = _first_alarm(epochs, estimated)
        dots = {"marker": "o", "markersize": 4} if len(x) == 1 else {}  # a line of one point draws nothing
        for key, ax in zip(keys, panels):
            ax.plot(x, [row["clean"] for row in epochs], color="0.7", linewidth=1.0, label="clean accuracy", **dots)
            for prefix, (label, style) in CURVES.items():
                if f"{prefix}/{key}" in epochs[0]:
                    ax.plot(x, [row[f"{prefix}/{key}"] for row in epochs], label=label, **style, **dots)
            marked = [(row["epoch"], row["standard"][key]) for row in epochs if key in row["standard"]]
            if marked:
                ax.plot(*zip(*marked), "s", color="black", markersize=5, label="standard AutoAttack")
            if alarm is not None:
                ax.axvline(epochs[alarm]["epoch"], color="red", linewidth=1.5, label="alarm (collapsed)")
            ax.set_title(f"{regime} seed {seed}: {key}", fontsize=9)
            ax.set_xlim(-0.5, epochs[0]["epochs"] - 0.5)  # the job's planned epochs: how far it has run
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        panels[0].set_ylabel("robust accuracy")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    handles: dict = {}
    for ax in axes.flat:  # the first panel's handle per label: a run of one epoch draws dots
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside upper center", ncol=len(handles), fontsize=8)
    return figure


def report(data: str, rows: list[dict], calibration: list[dict] = (), standard: list[dict] = (),
           probes: dict | None = None) -> str:
    """The report's markdown; `probes`: job fields (`JOB`) -> epoch -> that epoch's per-probe values."""
    if not rows:
        return f"no rows for {data}: run `python bench/tracking.py --data {data} --regime ...` first"
    rows = _with_standard(rescored(rows, probes or {}), list(standard))
    runs = _runs(rows)
    keys = _aa_keys(rows)
    machines = sorted({row["machine"] for row in rows})
    lines = [f"# Robustness curve against AutoAttack over training: {data}\n",
             f"Machine(s): {'; '.join(machines)}. AutoAttack: `pyautoattack` 0.2.0, APGD-CE + APGD-T (100 "
             "iterations, 9 target classes, one restart each) at every epoch; PGD-20: ART, one random start, step "
             "eps / 4. Estimate: `robust_distances` with `input_bounds=(0, 1)`, 8 line steps: min(d_l, s_u), the "
             "linear step d_l shortened to the line search's adversarial point s_u where that is nearer, rescored "
             "from the per-probe distances for the epochs recorded with the earlier estimate min(d1, s_u) (runs "
             "marked [s_u] kept no per-probe parts: their estimate is s_u alone, the first one).\n",
             "AutoAttack below is the strongest version run at each point: the lower of APGD-CE + APGD-T and the "
             "standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), which runs at the end of each job at the "
             "epochs some signal selected (a robust accuracy per radius, not per probe: the lower of the two "
             "means).\n",
             "Reductions from the issue's protocol: " + "; ".join(sorted({
                 f"{row['train']} training images, {row['epochs']} epochs, {row['probes']} probes "
                 f"({row['aa_probes']} attacked by APGD)" for row in rows})) +
             "; the standard AutoAttack only at the selected epochs of ended jobs.\n"]
    lines += calibration_section([row for row in calibration if row["data"] == data])
    lines += ["## Runs\n", "| regime | seed | epochs done | clean (first / best / last) |", "|---|---:|---:|---|"]
    for (regime, seed, *_), epochs in runs.items():
        clean = [row["clean"] for row in epochs]
        lines.append(f"| {regime} | {seed} | {len(epochs)} / {epochs[0]['epochs']} | "
                     f"{clean[0]:.3f} / {max(clean):.3f} / {clean[-1]:.3f} |")
    lines += ["", f"![Robust accuracy over training]({data}.png)\n",
              f"`{data}.png` (`curves_figure`): per run and AutoAttack radius, the strongest AutoAttack (black; the "
              "standard AutoAttack as squares), the estimate (blue) and the linear step (orange) on the AutoAttack "
              "probes, PGD-20 on all probes (green), clean accuracy (grey), the alarm's epoch (red).\n"]
    lines += standard_section(runs, keys)
    lines += ["", "## Error against AutoAttack (points), over every epoch and radius with AutoAttack accuracy in "
              "[5%, 95%]\n",
              "| signal | points | median abs | p90 abs | mean signed | target |", "|---|---:|---:|---:|---:|---|"]
    targets: dict[str, list] = {"rho": [], "gap": [], "gap_low": [], "alarm": [], "error": [], "cost": [],
                                "held_out": [], "alarm_held_out": [], "error_held_out": []}
    current = {key: epochs for key, epochs in runs.items() if key[-1] == "parts"}
    held_out = _errors({key: epochs for key, epochs in current.items() if _held_out(epochs)}, "estimate_aa_probes",
                       keys)
    if len(held_out):
        targets["error_held_out"] = [np.median(np.abs(held_out)), np.quantile(np.abs(held_out), 0.9), len(held_out)]
    earlier = {key: epochs for key, epochs in runs.items() if key[-1] != "parts"}
    for signal, group, name in (
            ("estimate_aa_probes", current, f"estimate {ESTIMATOR} (the callback's)"),
            ("linear_aa_probes", current, "linear step d_l (top-2 margin / grad norm), the cheap baseline"),
            ("estimate_aa_probes", earlier, "runs marked [s_u]: the line search alone, the estimate then"),
            ("linear_aa_probes", earlier, "runs marked [s_u]: linear step")):
        errors = _errors(group, signal, keys)
        if len(errors):
            median, p90 = np.median(np.abs(errors)), np.quantile(np.abs(errors), 0.9)
            verdict = "met" if median <= 3 and p90 <= 6 else "missed"
            if group is current and signal == "estimate_aa_probes":
                targets["error"] = [median, p90, len(errors)]
            lines.append(f"| {name} | {len(errors)} | {median:.2f} | {p90:.2f} | {errors.mean():+.2f} | "
                         f"{f'<= 3 / <= 6: {verdict}' if group is current and signal == 'estimate_aa_probes' else ''}"
                         " |")
    lines += [""] + candidates_section(runs, keys, probes or {})
    lines += ["## Per run and radius: Spearman over epochs, checkpoint selection, error range\n",
              "| regime | seed | radius | epochs | rho estimate | rho linear | rho -lambda_max | rho -grad norm | "
              "estimate picks (AutoAttack there / best; the 95% interval of APGD's best minus APGD there, points) | "
              "max abs error |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for (regime, seed, *_, kind), epochs in runs.items():
        for key in keys:
            apgd = [row[f"aa/{key}"] for row in epochs]
            estimate = [row[f"estimate_aa_probes/{key}"] for row in epochs]
            picked, best = int(np.argmax(estimate)), int(np.argmax(apgd))
            low, high = _gap_interval((probes or {}).get(job_key(epochs[0]), {}), epochs[best]["epoch"],
                                      epochs[picked]["epoch"], key)
            if kind == "parts" and len(epochs) == epochs[0]["epochs"]:  # ended runs of the current estimate
                targets["rho"].append(_spearman(estimate, apgd))
                targets["gap"].append(100 * (max(apgd) - apgd[picked]))
                targets["gap_low"].append(low)
                targets["held_out"].append(_held_out(epochs))
            lines.append(
                f"| {regime} | {seed} | {key} | {len(epochs)} | {_spearman(estimate, apgd):.2f} | "
                f"{_spearman([row[f'linear_aa_probes/{key}'] for row in epochs], apgd):.2f} | "
                f"{_spearman([-row['lambda_max_median'] for row in epochs], apgd):.2f} | "
                f"{_spearman([-row['grad_norm_median'] for row in epochs], apgd):.2f} | "
                f"epoch {picked}: {apgd[picked]:.3f} / {max(apgd):.3f}"
                f"{f' (APGD gap [{low:.1f}, {high:.1f}])' if np.isfinite(low) else ''} | "
                f"{100 * max(abs(a - b) for a, b in zip(estimate, apgd)):.1f} |")
    lines += ["", "## The checkpoint each signal selects (its most robust epoch, the first of equals): AutoAttack "
              "there\n", "| regime | seed | radius | AutoAttack's best | estimate | linear step | -lambda_max | "
              "-grad norm |", "|---|---:|---|---|---|---|---|---|"]
    for (regime, seed, *_), epochs in runs.items():
        for key in keys:
            apgd = [row[f"aa/{key}"] for row in epochs]
            signals = ([row[f"estimate_aa_probes/{key}"] for row in epochs],
                       [row[f"linear_aa_probes/{key}"] for row in epochs],
                       [-row["lambda_max_median"] for row in epochs], [-row["grad_norm_median"] for row in epochs])
            best = int(np.argmax(apgd))
            picks = [int(np.argmax(values)) for values in signals]
            lines.append(f"| {regime} | {seed} | {key} | epoch {epochs[best]['epoch']}: {apgd[best]:.3f} | " +
                         " | ".join(f"epoch {epochs[p]['epoch']}: {apgd[p]:.3f}" for p in picks) + " |")
    lines += ["", "## Collapse: the alarm against APGD's curve\n",
              f"APGD's collapse: the first epoch at which APGD at some radius falls below {1 - COLLAPSE:g} x its best "
              f"so far (a best of at least 5%). The alarm: the callback's `collapsed` on the estimate at any of the "
              f"{len({k.split('/', 1)[1] for k in rows[0] if k.startswith('estimate/')})} estimated radii (the "
              f"robust share of correct probes below {1 - COLLAPSE_DROP:.3g} x its value at the epoch before, that "
              f"at least {COLLAPSE_FLOOR:g}; defaults chosen on seed 0). Target: in FGSM-AT at or before the collapse, "
              "elsewhere (and in an FGSM-AT run that did not collapse) never.\n",
              "| regime | seed | APGD collapse per radius | alarm (radius) | target |", "|---|---:|---|---|---|"]
    estimated = sorted({key.removeprefix("estimate/") for key in rows[0] if key.startswith("estimate/")})
    for key, epochs in runs.items():
        regime, seed = key[:2]
        falls = {key: _first_collapse([row[f"apgd/{key}"] for row in epochs]) for key in keys}
        alarm, where = _first_alarm(epochs, estimated)
        first = min((e for e in falls.values() if e is not None), default=None)
        if regime.startswith("fgsm") and first is not None:  # catastrophic overfitting: at or before it
            verdict = "met" if alarm is not None and alarm <= first else "missed"
        else:  # no collapse to catch (another regime, or an FGSM run that did not collapse)
            verdict = "met" if alarm is None else "missed"
        if key[-1] == "parts":
            targets["alarm"].append(verdict == "met")
            targets["alarm_held_out"].append(_held_out(epochs))
        shown = ", ".join(f"{key} {e if e is not None else '-'}" for key, e in falls.items())
        lines.append(f"| {regime} | {seed} | {shown} | {f'{alarm} ({where})' if alarm is not None else '-'} | "
                     f"{verdict} |")
    first = rows[0]
    radii = len({key.split("/", 1)[1] for key in first if key.startswith("pgd20/")})
    scale = (first["probes"] / first["aa_probes"]) * (radii / len(keys))  # APGD on the whole curve
    lines += ["", "## Cost per evaluation (median over epochs of each epoch's ratio, same process)\n",
              f"The estimate gives every radius at once from one distance per probe and norm; PGD-20 runs once per "
              f"radius ({radii}) on the {first['probes']} probes; APGD ran at {len(keys)} radii on "
              f"{first['aa_probes']} probes, so its cost on the same curve is {scale:g} times that. The line search "
              "stops where no nearer point is left since the rows marked `search: cut` (and Fashion-MNIST plain "
              "seed 0 from epoch 3, recorded before the mark); the rows before it searched to the class change. "
              f"Left out: {', '.join(f'{d} {r} seed {s} epoch {e}' for d, r, s, e in sorted(PAUSED))}, whose "
              "process was stopped while it was timed.\n",
              "The target holds per run (measured in one run): its verdict is read on the run with the largest "
              "ratio.\n",
              "| run | line search | epochs | estimate s | PGD-20 s | APGD s, same curve | estimate / PGD-20 | "
              "estimate / APGD |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    per_run: dict[str, tuple[float, float]] = {}  # the cut search's median ratios per run
    for name, group in (("cut", True), ("to the class change", False)):
        groups = [(f"{regime} seed {seed}", [row for row in epochs if _cut(row) == group and _timed(row)])
                  for (regime, seed, *_), epochs in runs.items()]
        groups = [(run, timed) for run, timed in groups if timed]
        if len(groups) > 1:
            groups.append(("all", [row for _, timed in groups for row in timed]))
        for run, timed in groups:
            pgd = float(np.median([row["estimate_s"] / row["pgd20_s"] for row in timed]))
            apgd = float(np.median([row["estimate_s"] / (scale * row["apgd_s"]) for row in timed]))
            lines.append(f"| {run} | {name} | {len(timed)} | {np.median([row['estimate_s'] for row in timed]):.1f} | "
                         f"{np.median([row['pgd20_s'] for row in timed]):.1f} | "
                         f"{scale * np.median([row['apgd_s'] for row in timed]):.1f} | "
                         f"{pgd:.3f} ({'met' if pgd <= 0.1 else 'missed'}: <= 0.1) | "
                         f"{apgd:.4f} ({'met' if apgd <= 0.01 else 'missed'}: <= 0.01) |")
            if group and run != "all":
                per_run[run] = (pgd, apgd)
    if per_run:
        slowest = max(per_run, key=lambda run: per_run[run][1])
        targets["cost"] = [max(pgd for pgd, _ in per_run.values()), per_run[slowest][1], slowest, len(per_run)]
    full = [row for epochs in runs.values() for row in epochs
            if "aa_s" in row["standard_row"] and _cut(row) and _timed(row)]
    if full:
        ratio = np.median([row["estimate_s"] / (scale * row["standard_row"]["aa_s"]) for row in full])
        lines += ["", f"The standard AutoAttack, at the {len(full)} selected epochs where it ran (in the job's process "
                  f"after its training, so under another load than the epoch's estimate): "
                  f"{scale * np.median([row['standard_row']['aa_s'] for row in full]):.1f} s on the same curve, the "
                  f"estimate {ratio:.4f} of it (median of the ratios). The target above is read on APGD, measured "
                  "in the epoch's own evaluation."]
    lines.append("")
    at = lines.index("## Error against AutoAttack (points), over every epoch and radius with AutoAttack accuracy in "
                     "[5%, 95%]\n") - 1
    return "\n".join(lines[:at] + targets_section(targets) + lines[at:])


def targets_section(targets: dict[str, list]) -> list[str]:
    """The issue's targets, each with its figure so far (the current estimate's runs; Spearman and picks over
    the ended runs only), and the same figure on the runs held out from choosing the estimator and the alarm
    (`CHOSEN_ON`)."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    lines = ["## Targets so far\n",
             f"Held out: the runs other than {', '.join(f'{r} seed {s}' for _, r, s in sorted(CHOSEN_ON))}, on which "
             "the estimator and the alarm's rule were chosen.\n",
             "| target | figure | verdict |", "|---|---|---|"]
    if targets["error"]:
        median, p90, count = targets["error"]
        held = ""
        if targets["error_held_out"]:
            held_median, held_p90, held_count = targets["error_held_out"]
            held = f"; held out {held_median:.2f} / {held_p90:.2f} over {held_count}"
        lines.append(f"| median / p90 abs error <= 3 / 6 points | {median:.2f} / {p90:.2f} over {count} points{held} | "
                     f"{verdict(median <= 3 and p90 <= 6)} |")
    if targets["rho"]:
        rho, held_out = np.array(targets["rho"]), np.array(targets["held_out"], dtype=bool)
        lines.append(f"| Spearman over epochs >= 0.9 per run and radius | {int((rho >= 0.9).sum())} of {len(rho)}, "
                     f"lowest {np.nanmin(rho):.2f}; held out {int((rho[held_out] >= 0.9).sum())} of "
                     f"{int(held_out.sum())} | {verdict(bool((rho >= 0.9).all()))} |")
        gap = np.array(targets["gap"])
        low = np.array(targets["gap_low"])
        misses = gap > 1
        lines.append(f"| estimate's pick within 1 point of the best | {int((~misses).sum())} of {len(gap)}, worst "
                     f"{gap.max():.1f} points; of the {int(misses.sum())} misses, {int((low[misses] <= 1).sum())} "
                     f"within 1 point at the paired 95% interval's low end; held out "
                     f"{int((~misses[held_out]).sum())} of {int(held_out.sum())} | {verdict(bool((~misses).all()))} |")
    if targets["alarm"]:
        met, held_out = np.array(targets["alarm"], dtype=bool), np.array(targets["alarm_held_out"], dtype=bool)
        lines.append(f"| alarm at the collapse, never elsewhere | {int(met.sum())} of {len(met)} runs; held out "
                     f"{int(met[held_out].sum())} of {int(held_out.sum())} | {verdict(bool(met.all()))} |")
    if targets["cost"]:
        pgd, apgd, run, count = targets["cost"]
        lines.append(f"| cost <= 1/10 PGD-20, <= 1/100 AutoAttack, per run | the largest of {count} runs' medians: "
                     f"{pgd:.3f} / {apgd:.4f} ({run} for APGD) | {verdict(pgd <= 0.1 and apgd <= 0.01)} |")
    return lines + [""] if len(lines) > 3 else []
