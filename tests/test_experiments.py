"""The recipes' configs compose and build, and a sweep goes train -> scores.csv -> fim-evaluate -> fim-report."""
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recipes.models import Normalize
from recipes.statistics import correlation, read_table

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = Path(os.environ.get("FIM_DATA_DIR", ROOT.parent / "shared" / "data"))


def _compose(name, overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_config_builds_a_pixel_space_classifier(model):
    size = {"vgg16": 224, "resnet18": 224, "resnet34": 224, "densenet121": 224, "vit_b_16": 224,
            "small_vit": 28}.get(model, 32)  # small_vit: 28 px (Fashion-MNIST, MedMNIST) in 7 px patches
    cfg = _compose("train", [f"model={model}", "data=cifar10_npz"])
    torch.manual_seed(0)
    net = instantiate(cfg.model).eval()
    with torch.no_grad():
        logits = net(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert isinstance(net[0], Normalize)  # pixels in [0, 1]: normalisation is the model's first layer


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_its_sweep(experiment):
    app = "evaluate" if experiment == "imagenet_scale" else "train"
    cfg = _compose(app, [f"experiment={experiment}"])
    assert cfg.task_name == experiment and cfg.evaluation._target_.endswith("RobustnessEvaluation")
    assert "model" in cfg.hydra.sweeper.params or "regularizer" in cfg.hydra.sweeper.params
    for choice in str(cfg.hydra.sweeper.params.get("model", "")).split(","):
        assert not choice or (CONF / "model" / f"{choice}.yaml").exists()
    if app == "train":
        assert OmegaConf.to_container(cfg.tags, resolve=True)["data"] == cfg.hydra.runtime.choices.data


def _run(module, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FIM_DATA_DIR": str(SHARED), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


CHEAP = ["evaluation=default", "evaluate.num_samples=24", "evaluation.columns.clever.samples=2",
         "evaluation.columns.cw.steps=5", "evaluation.columns.minimal_perturbation.search_steps=4",
         "evaluation.columns.blackbox.queries=33", "evaluation.progress=false",
         "+trainer.enable_progress_bar=false", "trainer.max_epochs=1", "logger=csv"]


def test_sweep_evaluate_and_report_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    _run("recipes.train", "-m", "regularizer=none,fisher_kl,fisher_trace", "seed=0,1", "evaluate.at_init=true",
         f"hydra.sweep.dir={sweep}", *CHEAP, cwd=tmp_path)
    runs = sorted(p.parent for p in sweep.rglob("scores.csv"))
    assert len(runs) == 6
    table = read_table([runs[0] / "scores.csv"])
    assert sorted(set(table["stage"])) == ["init", "trained"] and len(table["index"]) == 48
    assert set(table["model"]) == {"small_cnn"} and set(table["data"]) == {"digits"}
    assert (table["bound"] >= table["lambda_max"]).all() and np.isfinite(table["min_perturbation"]).all()

    # fim-evaluate on a trained run reloads its checkpoint: the same model, the same exact scores
    again = tmp_path / "again"
    _run("recipes.evaluate", f"run_dir={runs[0]}", f"hydra.run.dir={again}", "evaluate.num_samples=24",
         "evaluation=fisher_only", "evaluation.progress=false", cwd=tmp_path)
    reloaded = read_table([again / "scores.csv"])
    trained = table["stage"] == "trained"
    np.testing.assert_allclose(reloaded["lambda_max"], table["lambda_max"][trained], rtol=1e-6)
    assert set(reloaded["regularizer"]) == set(table["regularizer"]) and set(reloaded["seed"]) == set(table["seed"])

    out = tmp_path / "report"
    printed = _run("recipes.report", f"runs=[{sweep}]", f"hydra.run.dir={out}", "draws=50", cwd=tmp_path)
    assert (out / "report.md").read_text().strip() == printed.strip()
    everything = read_table(sorted(sweep.rglob("scores.csv")))
    correlations = printed.split("## Per sample: correlation")[1].split("\n## ")[0]
    rows = [line for line in correlations.splitlines()
            if line.startswith("| small_cnn | fisher_kl | trained | radius |")]
    assert len(rows) == 1
    spearman = float(rows[0].split("|")[7].split()[0])
    agreement = printed.split("## Does a score's value mean a distance?")[1].split("\n## ")[0]
    ratio = [line for line in agreement.splitlines() if line.startswith("| small_cnn | fisher_kl | trained | radius |")]
    per_seed_ratio = []
    per_seed = []
    for seed in (0, 1):
        pick = ((everything["regularizer"] == "fisher_kl") & (everything["stage"] == "trained")
                & (everything["seed"] == seed) & (everything["correct"] == 1))
        per_seed.append(correlation(everything["radius"][pick], everything["min_perturbation"][pick]))
        finite = pick & np.isfinite(everything["min_perturbation"]) & np.isfinite(everything["radius"])
        per_seed_ratio.append(np.median(everything["min_perturbation"][finite] / everything["radius"][finite]))
    assert spearman == pytest.approx(np.mean(per_seed), abs=5e-4)
    summary = [line.split("|") for line in printed.split("## Summary: the trained models")[1].split("\n## ")[0]
               .splitlines() if line.startswith("| small_cnn | fisher_kl |")]
    assert len(summary) == 1 and float(summary[0][6]) == pytest.approx(spearman, abs=5e-4)  # rho radius
    assert float(ratio[0].split("|")[6].split()[0]) == pytest.approx(np.mean(per_seed_ratio), abs=5e-4)
    for plot in ("scatter_radius.png", "ranking.png", "fim_curves.png"):
        assert (out / plot).stat().st_size > 5000
    assert "## Theoretical ranking" in printed and "## Across models" in printed and "## Across trained runs" in printed

    # the theory section: one trained run per model (3 regularizers), Monte-Carlo error x sqrt(N) of an unbiased
    # estimate (about constant, order 1), the quadratic KL model holding for small steps
    theory_rows = [line.split("|")[1:-1] for line in printed.split("## The theory on the trained models")[1]
                   .split("\n## ")[0].splitlines() if line.startswith("| small_cnn")]
    assert len(theory_rows) == 3
    for row in theory_rows:
        scaled = [float(cell) for cell in row[5:8]]  # N = 1e4, 1e5, 1e6: error ~ c / sqrt(N)
        assert all(0.1 < value < 20 for value in scaled) and max(scaled) / min(scaled) < 1.5
        assert float(row[8]) < 0.02  # the estimate converges to F
        assert float(row[9]) > 1e-3 and float(row[10]) > 1e-3  # the ratio is within 10% at the smallest step
    pixels = plt.imread(out / "theory_kl.png")[..., :3]
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0.3  # saturated line colours, not grey
    assert coloured.mean() > 0.002 and len(np.unique((pixels[coloured] * 4).round(), axis=0)) >= 3
