"""fim-report: correlations of the Fisher scores and baselines with adversarial vulnerability, from the
`scores.csv` files of fim-train / fim-evaluate runs (a multirun folder collects a whole sweep).

    fim-report runs=[multirun/train/2026-11-25_10-00-00]

Writes `report.md` (printed too) and plots: `scatter_<score>.png` (per sample, score against the minimal
perturbation), `ranking.png` (architectures by median lambda_max with their robust accuracy),
`fim_curves.png` (FIM curves over training of every run), `theory_kl.png` (the KL against its quadratic
model on one trained run per model, `theory_images` > 0) and the per-run summaries as `models.csv`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recipes import statistics, theory
from fim_lightning.figures import overlay_curves, save
from recipes.common import CONFIG_DIR, machine
from recipes.evaluate import from_run_dir, load_net
from recipes.scoring import valid_shards
from recipes.train import DONE

log = logging.getLogger(__name__)

GROUP = ("model", "regularizer", "stage")


def run_label(run: Path) -> str:
    """A run's command-line overrides (`model=cifar_vgg seed=1`), else its folder name."""
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.exists():
        return " ".join(OmegaConf.load(overrides)) or run.name
    return run.name


def run_folders(runs: object) -> list[Path]:
    """`runs` as a list of existing folders: one path (`runs=multirun/x`) or a list (`runs=[a,b]`)."""
    folders = [runs] if isinstance(runs, (str, Path)) else list(runs)
    missing = [str(folder) for folder in folders if not Path(folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"fim-report: no such run folder(s): {missing}")
    return [Path(folder) for folder in folders]


def score_files(folders: list[Path]) -> list[Path]:
    """Every `scores.csv` under the folders, each once (overlapping or repeated folders count once), and the
    valid shards of runs that have no `scores.csv` yet (an evaluation still running or stopped)."""
    files = {path.resolve() for folder in folders for path in folder.rglob("scores.csv")}
    merged = {path.parent for path in files}
    for shards in {path.resolve() for folder in folders for path in folder.rglob("shards") if path.is_dir()}:
        if shards.parent not in merged:
            files.update(valid_shards(shards))
    files = sorted(files)
    if not files:
        raise FileNotFoundError(
            f"fim-report: no scores.csv under {[str(f) for f in folders]}. Per-sample scores come from "
            "`fim-train ... evaluation=default` or `fim-evaluate run_dir=...`; a plain fim-train run has none")
    return files


def unsupported(table: statistics.Table, columns: dict[str, str]) -> list[str]:
    """Lines naming the runs (and stages) with no value of a column at all, and what the report cannot say
    for them (a stage scored without attacks, e.g. `evaluate.at_init_attacks=false`)."""
    lines = []
    stages = list(zip(table["run"], table["stage"]))
    for column, what in columns.items():
        present = table[column] if column in table else np.full(len(stages), np.nan)
        finite = {key for key, value in zip(stages, present) if np.isfinite(float(value))}
        lacking = sorted(set(stages) - finite)
        if lacking:
            names = [f"{run_label(Path(run))} [{stage}]" for run, stage in lacking[:5]]
            lines.append(f"- no `{column}` in {len(lacking)} run(s) ({', '.join(names)}"
                         f"{', ...' if len(lacking) > 5 else ''}): {what} leave them out")
    return lines


def unfinished(folder: Path) -> bool:
    """A fim-train run (it has `run.yaml`) that never finished: no `done.json` (stopped by SIGTERM, or running)."""
    return (folder / "run.yaml").exists() and not (folder / DONE).exists()


def theory_runs(table: statistics.Table) -> dict[str, Path]:
    """One finished trained run per (model, regularizer), the lowest seed with a checkpoint and its config."""
    chosen: dict[tuple[str, str], tuple[str, Path]] = {}
    keys = set(zip(table["seed"].astype(float), table["model"], table["regularizer"], table["run"]))
    for seed, model, regularizer, run in sorted(keys):
        folder = Path(run)
        if unfinished(folder):
            continue
        if (folder / "checkpoints" / "last.ckpt").exists() and (folder / ".hydra" / "config.yaml").exists():
            chosen.setdefault((model, regularizer), (f"{model} / {regularizer} / seed {int(seed)}", folder))
    return dict(chosen.values())


def theory_checks(folder: Path, images: int) -> theory.TheoryChecks:
    """`recipes.theory` on the first `images` samples of the evaluated split of the fim-train run in `folder`."""
    run = from_run_dir(OmegaConf.create({"run_dir": str(folder), "ckpt_path": None}))  # as fim-evaluate loads it
    datamodule = instantiate(run.data)
    datamodule.setup("test")
    dataset = datamodule.splits[OmegaConf.load(folder / ".hydra" / "config.yaml").evaluate.split]
    return theory.theory_checks(load_net(run), torch.stack([dataset[i][0] for i in range(images)]))


def theory_section(table: statistics.Table, images: int, out: Path) -> list[str]:
    """The two statements of `recipes.theory` on one trained run per model, as a table and `theory_kl.png`."""
    checks = {label: theory_checks(folder, images) for label, folder in theory_runs(table).items()}
    if not checks:
        return []
    rows = []
    for label, check in checks.items():
        row = {"run": label, "images": len(check.kl_top)}
        entries = theory.covariance_rows(check)
        for entry in entries:
            row[f"error x sqrt(N), N=1e{round(np.log10(entry['labels drawn N']))}"] = entry["median error x sqrt(N)"]
        row["error at the largest N"] = entries[-1]["median error"]
        row["t leaving [0.9, 1.1]: top eigenvector"] = theory.first_departure(np.median(check.kl_top, 0))
        row["random direction"] = theory.first_departure(np.median(check.kl_random, 0))
        rows.append(row)
    save(theory.kl_figure(checks), out / "theory_kl.png")
    return ["## The theory on the trained models\n",
            f"Per run, on its first {images} evaluated images, in float64 (`recipes/theory.py`). (1) F(x) is the "
            "covariance of the input scores grad_x log p(y|x), y ~ p: the relative Frobenius error of the "
            "Monte-Carlo estimate from N drawn labels, median over images, times sqrt(N) (constant for an unbiased "
            "estimate once N is well above 1 / p of the rare classes that carry F), and the error itself at the "
            "largest N. (2) KL(p(x) || p(x + t v)) = t^2/2 v^T F v to second order: the first L2 step t (pixels in "
            "[0, 1]) where the median ratio leaves [0.9, 1.1], along the top eigenvector and along random unit "
            "directions (3 per image); the curves are in `theory_kl.png`. The expansion needs a differentiable "
            "network at x: at max-pool ties (flat image backgrounds make many) autograd's J is a one-sided "
            "choice and the ratio stays away from 1 at every t.\n",
            statistics.markdown(rows, list(rows[0])), ""]


SUMMARY_RANKS = ("radius", "fisher_step", "linear_step", "lambda_max", "grad_norm", "clever")
SUMMARY_DISTANCES = ("linear_step", "fisher_step")


def summary_section(summaries: list[dict], samples: list[dict], agreement: list[dict], target: str) -> list[str]:
    """The headline tables of the trained models: accuracy, per-sample Spearman of each score with `target`, and
    whether the distance estimates' values mean a distance (from the sections below)."""
    keys = list(dict.fromkeys((r["model"], r["regularizer"]) for r in summaries if r["stage"] == "trained"))
    if not keys or not samples:
        return []
    def by_score(found: list[dict]) -> dict[tuple, dict]:
        return {(r["model"], r["regularizer"], r["stage"], r["score"]): r for r in found}

    ranks, values = by_score(samples), by_score(agreement)
    rows = []
    for model, regularizer in keys:
        runs = [r for r in summaries if (r["model"], r["regularizer"], r["stage"]) == (model, regularizer, "trained")]
        row = {"model": model, "regularizer": regularizer, "seeds": len(runs)}
        for name in ("clean accuracy", "PGD L2 accuracy"):
            row[name] = float(np.mean([r.get(name, np.nan) for r in runs]))
        for score in SUMMARY_RANKS:
            found = ranks.get((model, regularizer, "trained", score))
            row[f"rho {score}"] = found["spearman"][0] if found else np.nan
        for score in SUMMARY_DISTANCES:
            found = values.get((model, regularizer, "trained", score))
            if found:
                row[f"{score}: median ratio"] = found["median measured / predicted"][0]
                row[f"{score}: within 1.5x"] = found["share within 1.5x"][0]
        rows.append(row)
    return ["## Summary: the trained models\n",
            f"Seed means of: clean and PGD L2 accuracy; rho = per-sample Spearman of each score with `{target}` "
            "(correct samples; intervals in the sections below); for the two distance estimates, the median of "
            "measured / predicted and the share of samples within a factor 1.5 (a distance that means what it "
            "says: median in [0.8, 1.25], at least 80% within 1.5x).\n",
            statistics.markdown(rows, list(dict.fromkeys(name for row in rows for name in row))), ""]


def build_report(cfg: DictConfig) -> str:
    files = score_files(run_folders(cfg.runs))
    table = statistics.read_table(files)
    out = Path(cfg.output_dir)
    seeds = sorted(set(table["seed"].astype(int).tolist()))
    runs = sorted(set(table["run"]))
    lines = ["# Fisher robustness report\n",
             f"{len(runs)} runs, {len(table['index'])} evaluated samples, seeds {seeds}; data: "
             f"{', '.join(sorted(set(table['data'])))}. Inputs are pixels in [0, 1] with normalisation inside the "
             f"model: every score and attack is taken in that space. Machine: {machine()}.\n"]
    gaps = unsupported(table, {cfg.target: "per-sample correlations with it",
                               "pgd_linf_robust": "PGD L-inf accuracy rankings",
                               "pgd_l2_robust": "PGD L2 accuracy rankings"})
    stopped = [run for run in runs if unfinished(Path(run))]
    if stopped:
        gaps.append(f"- {len(stopped)} run(s) never finished (no `{DONE}`: stopped or still running): "
                    f"{', '.join(run_label(Path(run)) for run in stopped[:5])}{', ...' if len(stopped) > 5 else ''}; "
                    "their rows count, but the theory checks and the curve figure leave them out")
    if gaps:
        lines += ["## What these runs cannot support\n", *gaps, ""]

    samples, agreement = [], []
    if cfg.target in table:
        samples = statistics.sample_correlations(table, cfg.scores, cfg.target, GROUP, cfg.draws)
        lines += [f"## Per sample: correlation with `{cfg.target}`\n",
                  f"Correctly classified samples with finite values; mean over seeds of the per-seed correlation, "
                  f"95% bootstrap interval over seeds and samples ({cfg.draws} draws). Larger radius / CLEVER / "
                  f"margin and smaller lambda_max / trace / bound / grad_norm predict a larger minimal perturbation.\n",
                  statistics.markdown(samples,
                                      [*GROUP, "score", "samples", "seeds", "spearman", "kendall", "pearson"]), ""]
        agreement = statistics.distance_agreement(table, target=cfg.target, by=GROUP, draws=cfg.draws)
        if agreement:
            lines += [f"## Does a score's value mean a distance? (`{cfg.target}` / predicted)\n",
                      "A distance that means what it says has a median ratio within [0.8, 1.25] and at least 80% of "
                      "samples within a factor 1.5. `linear_step` = margin / |grad (z1 - z2)| (DeepFool's first "
                      "step); the radius is a score (in the two-class limit at least twice the linear step).\n",
                      statistics.markdown(agreement, [*GROUP, "score", "samples", *statistics.AGREEMENT]), ""]

    summaries = statistics.model_summaries(table, GROUP)
    lines[2:2] = summary_section(summaries, samples, agreement, cfg.target)
    summary_names = list(dict.fromkeys(name for row in summaries for name in row))
    statistics.write_table({name: np.array([row.get(name, np.nan) for row in summaries]) for name in summary_names},
                       out / "models.csv")
    summary_columns = [*GROUP, "seed", *[name for name in statistics.MODEL_SUMMARIES if name in summary_names]]
    lines += ["## Per run\n", statistics.markdown(summaries, summary_columns), ""]

    present = {name for row in summaries for name in row}
    outcomes = [name for name in ("PGD L-inf accuracy", "PGD L2 accuracy", "median min perturbation")
                if name in present]
    scores = [name for name in ("median lambda_max", "mean lambda_max", "median radius", "median fisher_step",
                                "median bound", "median grad_norm", "median linear_step", "median clever")
              if name in present]
    stages = list(dict.fromkeys(row["stage"] for row in summaries))
    across = [{"stage": stage, **row} for stage in stages for row in statistics.model_correlations(
        [r for r in summaries if r["stage"] == stage], scores, outcomes, GROUP, cfg.draws)]
    if across:
        lines += ["## Across models: ranking by score against ranking by attack\n",
                  "Per stage; seed-averaged per-model values; 95% bootstrap interval over seeds within each model.\n",
                  statistics.markdown(across, ["stage", "score", "outcome", "models", "spearman", "kendall"]), ""]
    trained = [row for row in summaries if row["stage"] == "trained"]
    per_run = statistics.run_correlations(trained, scores, outcomes, cfg.draws)
    if per_run:
        lines += ["## Across trained runs: every model and seed a point\n",
                  f"{len({tuple(r[k] for k in (*GROUP, 'seed')) for r in trained})} trained runs; 95% bootstrap "
                  "interval over runs.\n",
                  statistics.markdown(per_run, ["score", "outcome", "runs", "spearman", "kendall"]), ""]
    if "median bound" in present:
        lines += ["## Theoretical ranking: the architecture bound against lambda_max and attacks\n"]
        for stage in stages:
            chosen = [r for r in summaries if r["stage"] == stage]
            ranking = statistics.bound_ranking(chosen, GROUP, outcomes[0] if outcomes else None)
            agreement = statistics.model_correlations(chosen, ["median bound"], ["median lambda_max", *outcomes], GROUP,
                                                  cfg.draws)
            lines += [f"Stage `{stage}`:\n", statistics.markdown(ranking, list(ranking[0])), ""]
            if agreement:
                lines += [statistics.markdown(agreement, ["score", "outcome", "models", "spearman", "kendall"]), ""]

    if cfg.get("theory_images"):
        lines += theory_section(table, cfg.theory_images, out)

    for score in ("radius", "lambda_max"):
        if score in table and cfg.target in table:
            save(statistics.scatter_figure(table, score, cfg.target), out / f"scatter_{score}.png")
    if outcomes and "median lambda_max" in present:
        save(statistics.ranking_figure(summaries, "median lambda_max", outcomes[0], GROUP), out / "ranking.png")
    histories = {run_label(path.parent): path for path in sorted({p.resolve() for folder in run_folders(cfg.runs)
                                                                  for p in folder.rglob("fim_history.json")})
                 if not unfinished(path.parent)}
    if histories:
        save(overlay_curves(histories, "spectral_norm/median", "FIM curves of every run"), out / "fim_curves.png")
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    log.info(build_report(cfg))


if __name__ == "__main__":
    main()
