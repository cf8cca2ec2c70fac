"""Correlation reports over evaluation tables: how well each score predicts adversarial vulnerability.

A table is a dict of equal-length columns (NumPy arrays): the per-sample columns of `RobustnessEvaluation`
plus the run's `model`, `data`, `regularizer`, `seed` and `stage`. Two levels:
- per sample, within each model: Spearman / Kendall / Pearson between a score and a target (by default the
  minimal adversarial perturbation), on correctly classified samples with finite values. The statistic is
  the mean over seeds of the per-seed correlation; its 95% interval is a percentile bootstrap that
  resamples seeds, and samples within each seed.
- per model: each run reduced to one number per score (median over samples) and per outcome (PGD robust
  accuracy, median minimal perturbation); the correlation across models of the seed-averaged values, with a
  bootstrap over seeds within each model (no interval with one seed per model).
"""
from __future__ import annotations

import csv
import hashlib
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from fim_lightning.figures import new_figure

Table = dict[str, np.ndarray]
METHODS: dict[str, Callable] = {"spearman": stats.spearmanr, "kendall": stats.kendalltau, "pearson": stats.pearsonr}
META = ("model", "data", "regularizer", "seed", "stage")
SCORES = ("radius", "fisher_step", "linear_step", "lambda_max", "lambda_max_blackbox", "trace", "bound",
          "grad_norm", "clever", "margin")


TEXT_COLUMNS = ("model", "data", "regularizer", "stage", "split", "run")


def read_table(paths: Iterable[Path]) -> Table:
    """Concatenate evaluation CSV files into one table; numeric columns become floats.

    Each file is read once: paths are resolved (overlapping folders cannot count a run twice) and a file whose
    bytes equal one already read (a `scores.csv` copied under another run folder) is skipped with a warning.
    One run and stage keep one evaluation: where fim-evaluate scored a fim-train run again (`<run>/evaluate/`),
    the newest evaluation replaces the older rows, with a warning. Within it, rows are deduplicated by run and
    sample identity (`META`, split, index): the shards of one run (files under `<run>/shards/`) may repeat a
    sample, as distributed samplers pad. Files may have different columns (a run without attacks has no attack
    columns): missing cells are empty (NaN). A file that is not a well-formed CSV, or a text cell in a numeric
    column, raises a `ValueError` that names the file (and the column). Every row carries its run folder as
    `run`. pandas concatenates, picks the newest evaluation and deduplicates; the csv module reads each file,
    as it refuses short rows, which pandas pads."""
    frames: list[pd.DataFrame] = []
    contents: dict[str, Path] = {}
    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in contents:
            warnings.warn(f"{path} is a copy of {contents[digest]}: counted once", stacklevel=2)
            continue
        contents[digest] = path
        frame = _read_csv(path)
        _check_numbers(path, frame)
        source = path.parent if path.parent.parent.name == "shards" else path
        frames.append(frame.assign(run=str(run_folder(path)), _source=str(source), _mtime=path.stat().st_mtime))
    rows = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()
    if rows.empty:
        raise FileNotFoundError("no rows: the evaluation CSV files are missing or empty")
    names = [name for name in rows.columns if name not in ("run", "_source", "_mtime")] + ["run"]
    rows[names] = rows[names].fillna("")
    rows["_stage"] = rows["stage"] if "stage" in rows else ""
    sources = rows.groupby(["run", "_stage", "_source"], sort=False)["_mtime"].max()
    newest = {}
    for (run, stage), found in sources.groupby(level=[0, 1], sort=False):
        newest[run, stage] = found.idxmax()[2]
        if len(found) > 1:
            warnings.warn(f"{run} [{stage}] was evaluated {len(found)} times "
                          f"({', '.join(found.index.get_level_values(2))}): the newest, {newest[run, stage]}, is used",
                          stacklevel=2)
    rows = rows[[newest[key] == source for key, source in zip(zip(rows["run"], rows["_stage"]), rows["_source"])]]
    if "index" in rows:  # a row without a sample index is never a duplicate
        identity = [name for name in ("run", *META, "split", "index") if name in rows]
        rows = rows[~(rows.duplicated(identity) & (rows["index"] != ""))]
    table: Table = {}
    for name in names:
        values = rows[name].to_numpy(dtype=str)
        if name in TEXT_COLUMNS or not all(v == "" or _is_number(v) for v in values):
            table[name] = values
            continue
        table[name] = np.array([float(v) if v != "" else np.nan for v in values])
    return table


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_numbers(path: Path, frame: pd.DataFrame) -> None:
    """A column (outside `TEXT_COLUMNS`) that holds numbers holds only numbers or empty cells, else a
    `ValueError` naming the file, the line and the column."""
    for name in frame.columns:
        if name in TEXT_COLUMNS:
            continue
        cells = frame[name][frame[name] != ""]
        numeric = cells.map(_is_number).astype(bool)
        if numeric.any() and not numeric.all():
            position = numeric.to_numpy().argmin()
            raise ValueError(f"{path}: line {cells.index[position] + 2}, column {name!r} holds the text "
                             f"{cells.iloc[position]!r} where a number belongs (a damaged or hand-edited file)")


def run_folder(path: Path) -> Path:
    """The run a table file belongs to: `<run>/scores.csv` or `<run>/shards/<stage>/<shard>.csv`; fim-evaluate's
    output beside a fim-train run (`<run>/evaluate/...`) belongs to that run."""
    folder = path.parents[2] if path.parent.parent.name == "shards" else path.parent
    if folder.name == "evaluate" and (folder.parent / "run.yaml").exists():
        return folder.parent
    return folder


def _read_csv(path: Path) -> pd.DataFrame:
    """The rows of one CSV file as text cells, or a `ValueError` naming the file and what is wrong with it."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from error
    if not header:
        raise ValueError(f"{path}: empty file, no header")
    for number, row in enumerate(rows, start=2):
        if None in row or any(value is None for value in row.values()):
            raise ValueError(f"{path}: line {number} does not have the header's {len(header)} fields (truncated "
                             "or ragged file)")
    return pd.DataFrame(rows, columns=header, dtype=object)


def write_table(table: Table, path: Path) -> Path:
    """Write a table as CSV (floats with full precision; booleans as 0 / 1)."""
    names = list(table)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for i in range(len(table[names[0]])):
            writer.writerow([_cell(table[name][i]) for name in names])
    return path


def _cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def select(table: Table, mask: np.ndarray) -> Table:
    return {name: column[mask] for name, column in table.items()}


def groups(table: Table, by: Sequence[str]) -> dict[tuple, Table]:
    """Sub-tables keyed by the values of the `by` columns, in order of first appearance (pandas' groupby)."""
    keyed = pd.DataFrame({name: table[name] for name in by}).groupby(list(by), sort=False, dropna=False).indices
    return {key if isinstance(key, tuple) else (key,): select(table, rows) for key, rows in keyed.items()}


def correlation(x: np.ndarray, y: np.ndarray, method: str = "spearman") -> float:
    """The correlation of the finite pairs; NaN with fewer than 3 pairs or a constant column."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(METHODS[method](x, y)[0])


def seed_bootstrap(pairs: Sequence[tuple[np.ndarray, np.ndarray]], method: Union[str, Callable] = "spearman",
                   draws: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): the mean over seeds of a statistic of each seed's (x, y) (a correlation named by
    `method`, or any function of (x, y)), and its 95% percentile bootstrap interval (seeds resampled, then
    samples within each drawn seed)."""
    function = method if callable(method) else (lambda x, y: correlation(x, y, method))
    statistic = float(np.nanmean([function(x, y) for x, y in pairs]))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        drawn = [pairs[i] for i in rng.integers(len(pairs), size=len(pairs))]
        inner = []
        for x, y in drawn:
            index = rng.integers(len(x), size=len(x))
            inner.append(function(x[index], y[index]))
        values.append(np.nanmean(inner) if np.isfinite(inner).any() else np.nan)
    low, high = np.nanpercentile(values, [2.5, 97.5]) if np.isfinite(values).any() else (np.nan, np.nan)
    return statistic, float(low), float(high)


MIN_SAMPLES = 3


def sample_correlations(table: Table, scores: Sequence[str] = SCORES, target: str = "min_perturbation",
                        by: Sequence[str] = ("model", "regularizer", "stage"), draws: int = 1000) -> list[dict]:
    """Per-sample correlations of each score with `target` within each group (module docstring). A seed counts
    for a score only with at least `MIN_SAMPLES` samples where both are finite (a run without the column, or
    with too few usable samples, is neither a seed of that row nor a narrower interval)."""
    rows = []
    usable = table["correct"].astype(bool) & np.isfinite(table[target])
    for key, group in groups(select(table, usable), by).items():
        for score in (s for s in scores if s in group and np.isfinite(group[s]).any()):
            finite = select(group, np.isfinite(group[score]))
            per_seed = {seed: g for seed, g in groups(finite, ["seed"]).items() if len(g[score]) >= MIN_SAMPLES}
            if not per_seed:
                continue
            row = {**dict(zip(by, key)), "score": score,
                   "samples": sum(len(g[score]) for g in per_seed.values()), "seeds": len(per_seed)}
            pairs = [(g[score], g[target]) for g in per_seed.values()]
            for method in METHODS:
                row[method] = seed_bootstrap(pairs, method, draws)
            rows.append(row)
    return rows


def _ratios(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """measured / predicted where both are finite and the prediction is positive."""
    keep = np.isfinite(predicted) & np.isfinite(measured) & (predicted > 0)
    return measured[keep] / predicted[keep]


def _median_ratio(predicted: np.ndarray, measured: np.ndarray) -> float:
    ratios = _ratios(predicted, measured)
    return float(np.median(ratios)) if len(ratios) else float("nan")


def _within(factor: float) -> Callable[[np.ndarray, np.ndarray], float]:
    def share(predicted: np.ndarray, measured: np.ndarray) -> float:
        ratios = _ratios(predicted, measured)
        ratios = ratios[ratios > 0]
        return float(np.mean(np.abs(np.log(ratios)) <= np.log(factor))) if len(ratios) else float("nan")
    return share


DISTANCES = ("linear_step", "fisher_step", "radius", "clever")
AGREEMENT = {"median measured / predicted": _median_ratio, "share within 1.5x": _within(1.5)}


def distance_agreement(table: Table, scores: Sequence[str] = DISTANCES, target: str = "min_perturbation",
                       by: Sequence[str] = ("model", "regularizer", "stage"), draws: int = 1000) -> list[dict]:
    """Does a score's value mean a distance? Per group, for each distance-like score: the median of measured
    `target` / predicted and the share of samples within a factor 1.5 (correctly classified samples; mean over
    seeds, 95% bootstrap interval over seeds and samples). A distance that means what it says has a median
    ratio near 1 and most samples within 1.5x."""
    rows = []
    usable = table["correct"].astype(bool) & np.isfinite(table[target])
    for key, group in groups(select(table, usable), by).items():
        per_seed = groups(group, ["seed"])
        for score in (s for s in scores if s in group and np.isfinite(group[s]).any()):
            row = {**dict(zip(by, key)), "score": score, "samples": int(np.isfinite(group[score]).sum())}
            pairs = [(g[score], g[target]) for g in per_seed.values()]
            for name, statistic in AGREEMENT.items():
                row[name] = seed_bootstrap(pairs, statistic, draws)
            rows.append(row)
    return rows


def _runs_by_model(summaries: list[dict], by: Sequence[str]) -> dict[tuple, list[dict]]:
    """The per-seed summary rows of each model (the values of the `by` columns), in order of appearance."""
    keyed: dict[tuple, list[dict]] = {}
    for row in summaries:
        keyed.setdefault(tuple(row[name] for name in by), []).append(row)
    return keyed


MODEL_SUMMARIES = {
    "clean accuracy": ("correct", np.mean),
    "PGD L-inf accuracy": ("pgd_linf_robust", np.mean),
    "PGD L2 accuracy": ("pgd_l2_robust", np.mean),
    "CW accuracy": ("cw_robust", np.mean),
    "median min perturbation": ("min_perturbation", np.nanmedian),
    "median radius": ("radius", np.nanmedian),
    "median lambda_max": ("lambda_max", np.nanmedian),
    "mean lambda_max": ("lambda_max", np.nanmean),
    "median bound": ("bound", np.nanmedian),
    "median grad_norm": ("grad_norm", np.nanmedian),
    "median linear_step": ("linear_step", np.nanmedian),
    "median fisher_step": ("fisher_step", np.nanmedian),
    "median clever": ("clever", np.nanmedian),
}


def model_summaries(table: Table, by: Sequence[str] = ("model", "regularizer", "stage")) -> list[dict]:
    """One row per group and seed: each `MODEL_SUMMARIES` entry whose column is present."""
    rows = []
    for key, group in groups(table, [*by, "seed"]).items():
        row = dict(zip([*by, "seed"], key))
        row["samples"] = len(group["index"])
        for name, (column, reduce) in MODEL_SUMMARIES.items():
            if column in group and np.isfinite(group[column].astype(float)).any():
                row[name] = float(reduce(group[column].astype(float)))
        rows.append(row)
    return rows


def _percentile_interval(draws: Sequence[float]) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws, leaving out the degenerate ones (NaN: a resample of a few
    runs with one value repeated has no rank correlation). scipy.stats.bootstrap's percentile interval would be
    NaN as soon as one draw is, which with 4 runs is about 1 draw in 64."""
    finite = np.asarray(draws, dtype=float)
    if not np.isfinite(finite).any():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(finite, [2.5, 97.5])
    return float(low), float(high)


def model_correlations(summaries: list[dict], scores: Sequence[str], outcomes: Sequence[str],
                       by: Sequence[str] = ("model", "regularizer", "stage"), draws: int = 1000,
                       seed: int = 0) -> list[dict]:
    """Spearman / Kendall across models of the seed-averaged score and outcome, with a bootstrap over seeds
    within each model for the 95% interval."""
    keyed = _runs_by_model(summaries, by)
    rng = np.random.default_rng(seed)
    results = []
    for score in scores:
        for outcome in outcomes:
            runs = [rows for rows in keyed.values() if all(score in r and outcome in r for r in rows)]
            if len(runs) < 3:
                continue
            means = lambda chosen: (np.array([np.mean([r[score] for r in rs]) for rs in chosen]),  # noqa: E731
                                    np.array([np.mean([r[outcome] for r in rs]) for rs in chosen]))
            row = {"score": score, "outcome": outcome, "models": len(runs)}
            single = all(len(rs) < 2 for rs in runs)  # one seed per model: nothing to resample
            for method in ("spearman", "kendall"):
                boot = [correlation(*means([[rs[i] for i in rng.integers(len(rs), size=len(rs))] for rs in runs]),
                                    method) for _ in range(draws)]
                low, high = (np.nan, np.nan) if single else _percentile_interval(boot)
                row[method] = (correlation(*means(runs), method), low, high)
            results.append(row)
    return results


def run_correlations(summaries: list[dict], scores: Sequence[str], outcomes: Sequence[str], draws: int = 1000,
                     seed: int = 0) -> list[dict]:
    """Spearman / Kendall across runs (every trained model, seeds apart), 95% interval from a bootstrap over
    runs."""
    rng = np.random.default_rng(seed)
    results = []
    for score in scores:
        for outcome in outcomes:
            runs = [(r[score], r[outcome]) for r in summaries if score in r and outcome in r]
            if len(runs) < 4:
                continue
            values = np.array(runs)
            row = {"score": score, "outcome": outcome, "runs": len(runs)}
            for method in ("spearman", "kendall"):
                boot = [correlation(*values[rng.integers(len(values), size=len(values))].T, method)
                        for _ in range(draws)]
                row[method] = (correlation(*values.T, method), *_percentile_interval(boot))
            results.append(row)
    return results


def _interval(value: tuple[float, float, float]) -> str:
    statistic, low, high = value
    if np.isnan(low):
        return f"{statistic:.3f} [no interval]"
    return f"{statistic:.3f} [{low:.3f}, {high:.3f}]"


def markdown(rows: list[dict], columns: Sequence[str]) -> str:
    """A markdown table of `rows`; (statistic, low, high) cells print as 'statistic [low, high]'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for name in columns:
            value = row.get(name, "")
            if isinstance(value, tuple):
                cells.append(_interval(value))
            elif isinstance(value, float):
                cells.append(f"{value:.4g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scatter_figure(table: Table, score: str = "radius", target: str = "min_perturbation",
                   by: str = "model") -> Figure:
    """Score against target per sample (log-log, correctly classified samples), one colour per `by` value."""
    figure = new_figure(width=5.5, height=4.5)
    ax = figure.add_subplot()
    usable = table["correct"].astype(bool) & np.isfinite(table[score]) & np.isfinite(table[target])
    for key, group in groups(select(table, usable), [by]).items():
        ax.scatter(group[score], group[target], s=6, alpha=0.6, label=str(key[0]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(score)
    ax.set_ylabel(f"{target} (L2, pixels in [0, 1])")
    ax.legend(fontsize="x-small", markerscale=2)
    return figure


def ranking_figure(summaries: list[dict], score: str, outcome: str,
                   by: Sequence[str] = ("model", "regularizer", "stage")) -> Figure:
    """Bars of the seed-mean score per model (sorted), with the seed-mean outcome printed above each bar."""
    keyed = {" / ".join(map(str, key)): runs
             for key, runs in _runs_by_model([r for r in summaries if score in r and outcome in r], by).items()}
    names = sorted(keyed, key=lambda k: np.mean([r[score] for r in keyed[k]]))
    values = [np.mean([r[score] for r in keyed[k]]) for k in names]
    errors = [np.std([r[score] for r in keyed[k]]) for k in names]
    figure = new_figure(width=max(5.0, 0.9 * len(names)), height=4.0)
    ax = figure.add_subplot()
    bars = ax.bar(range(len(names)), values, yerr=errors, capsize=3)
    for bar, name in zip(bars, names):
        ax.annotate(f"{np.mean([r[outcome] for r in keyed[name]]):.2f}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="x-small")
    ax.set_yscale("log")
    ax.set_ylabel(f"{score} (seed mean +- std)")
    ax.set_title(f"architectures by {score}; numbers: {outcome}", fontsize="small")
    return figure


def bound_ranking(summaries: list[dict], by: Sequence[str] = ("model", "regularizer", "stage"),
                  outcome: Optional[str] = "PGD L2 accuracy") -> list[dict]:
    """Per model (seed means): the bound, the exact lambda_max and the outcome, with each one's rank."""
    rows = []
    for key, runs in _runs_by_model(summaries, by).items():
        row = dict(zip(by, key))
        for name in ("median bound", "median lambda_max", "mean lambda_max", outcome):
            if name and all(name in r for r in runs):
                row[name] = float(np.mean([r[name] for r in runs]))
        rows.append(row)
    for name in ("median bound", "median lambda_max", outcome):
        present = [r for r in rows if name in r]
        for rank, r in enumerate(sorted(present, key=lambda r: r[name]), start=1):
            r[f"rank of {name}"] = rank
    return rows
