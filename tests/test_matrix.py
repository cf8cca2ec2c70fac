"""The configuration matrix: every used-by path with a user's defaults, in the configurations users train in.

Paths, in every cell: `FisherRobustnessCallback()` with its defaults (figures on) in `fit`, the
`FisherSpectralNorm` metric in `validation_step`, and a Fisher penalty in `FisherRegularizedClassifier`'s
`training_step`. Axes: precision (32-true, bf16-mixed), processes (1, or 2 under Lightning's `ddp` on gloo,
launched by Lightning from the script `tests/matrix_cell.py` with `ddp`, `ddp_spawn` or FSDP2 through
`ModelParallelStrategy`), package (`pytorch_lightning`, the unified `lightning.pytorch`), loggers (CSV,
TensorBoard, W&B offline, several, none). Cells A-F cover every pair of values of the first four axes except
W&B in one process, which `tests/test_callback.py` covers; G-J add the other strategies and the unified package:

| cell | precision | processes | loggers | penalty |
|---|---|---|---|---|
| A (reference) | 32-true | 1 | CSV | FisherKLPenalty |
| B | bf16-mixed | 1 | TensorBoard | FisherKLPenalty |
| C | 32-true | 2 | TensorBoard + W&B | FisherSpectralPenalty (exact) |
| D | bf16-mixed | 2 | CSV + TensorBoard + W&B | FisherKLPenalty |
| E | bf16-mixed | 1 | none | FisherSpectralPenalty (exact) |
| F | 32-true | 2 | CSV | FisherSpectralPenalty (exact) |
| G | 32-true | 2 (`ddp_spawn`) | CSV | FisherSpectralPenalty (exact) |
| H | bf16-mixed | 2 (FSDP2: `ModelParallelStrategy`) | TensorBoard | FisherKLPenalty |
| I | bf16-mixed | 2, `lightning.pytorch` | CSV + W&B | FisherSpectralPenalty (exact) |
| J | 32-true | 1, `lightning.pytorch` | TensorBoard | FisherKLPenalty |

The weights never change (SGD with lr 0, BatchNorm momentum 0), so each cell must log the same numbers:
- every logged FIM statistic (and the callback's default estimated robust accuracy) equals an independent float32
  computation on one process (`fl.fisher_scores` on the probe set) and cell A's, to rel 1e-5: scoring runs in
  float32 with autocast off in every cell and the gather is exact, so only the float32 rounding of a different
  batch split can differ (about 1e-7);
- the metric equals `fl.fisher_spectral_norm` over all validation samples (rel 1e-5, same reason);
- each penalty that rank 0 computed equals the same penalty recomputed on one process in float32 on that
  rank's batch: rel 1e-4 for the spectral penalty, 1e-3 for the KL penalty (a KL at h = 1e-2 is a difference
  of float32 log-probabilities about 1e-3 apart, rounded at 1e-7: 1e-4 relative);
- figures are written by rank 0 only, and every image shows a signed direction: red and blue pixels, the
  largest magnitude saturated, many levels (a black or constant image fails).
Each cell runs in a subprocess with a 300 s timeout, so a hang fails instead of blocking CI.
"""
import json
import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fim_lightning as fl
from fim_lightning import figures
from fim_lightning.callback import _SCORES, DEFAULT_EPS, eps_key
from fim_lightning.reductions import summarize
from fim_lightning.robustness import collapsed
from tests.matrix_cell import PENALTIES, build_net, images

ROOT = Path(__file__).resolve().parents[1]
CELLS = {
    "A": {"precision": "32-true", "devices": 1, "loggers": "csv", "penalty": "kl"},
    "B": {"precision": "bf16-mixed", "devices": 1, "loggers": "tensorboard", "penalty": "kl"},
    "C": {"precision": "32-true", "devices": 2, "loggers": "tensorboard,wandb", "penalty": "spectral"},
    "D": {"precision": "bf16-mixed", "devices": 2, "loggers": "csv,tensorboard,wandb", "penalty": "kl"},
    "E": {"precision": "bf16-mixed", "devices": 1, "loggers": "none", "penalty": "spectral"},
    "F": {"precision": "32-true", "devices": 2, "loggers": "csv", "penalty": "spectral"},
    "G": {"precision": "32-true", "devices": 2, "loggers": "csv", "penalty": "spectral", "strategy": "ddp_spawn"},
    "H": {"precision": "bf16-mixed", "devices": 2, "loggers": "tensorboard", "penalty": "kl", "strategy": "fsdp2"},
    "I": {"precision": "bf16-mixed", "devices": 2, "loggers": "csv,wandb", "penalty": "spectral",
          "package": "lightning.pytorch"},
    "J": {"precision": "32-true", "devices": 1, "loggers": "tensorboard", "penalty": "kl",
          "package": "lightning.pytorch"},
}
PENALTY_RTOL = {"kl": 1e-3, "spectral": 1e-4}


def run_cell(name: str, out: Path) -> dict:
    cell = CELLS[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests" / "matrix_cell.py"), str(out), "--precision", cell["precision"],
               "--devices", str(cell["devices"]), "--loggers", cell["loggers"], "--penalty", cell["penalty"],
               "--strategy", cell.get("strategy", "ddp"), "--package", cell.get("package", "pytorch_lightning")]
    done = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cell_A") / "run"
    return run_cell("A", out), out


def expected_statistics(probes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    scores = fl.fisher_scores(build_net(), probes, mode="eval")
    stats = {}
    for name in _SCORES:
        stats.update(summarize(getattr(scores, name).double(), f"fim/{name}"))
    stats["fim/accuracy"] = (scores.prediction == labels).double().mean().item()
    for norm, radii in DEFAULT_EPS.items():  # the callback's default radii
        values = fl.estimated_robust_accuracy(build_net(), probes, labels, radii, norm, mode="eval")
        stats.update({eps_key("fim", norm, radius): value for radius, value in zip(radii, values.tolist())})
    return stats


def assert_shows_a_direction(rgb: np.ndarray, where: str) -> None:
    """Red and blue pixels, the largest magnitude saturated, and many levels."""
    pixels = rgb.reshape(-1, 3).astype(int)
    red, blue = pixels[:, 0] - pixels[:, 2] > 60, pixels[:, 2] - pixels[:, 0] > 60
    assert red.any() and blue.any(), f"{where}: no signed colours"
    saturated = (pixels == figures.RED).all(1) | (pixels == figures.BLUE).all(1)
    assert saturated.any(), f"{where}: the largest magnitude is not drawn saturated"
    assert len(np.unique(pixels, axis=0)) >= 8, f"{where}: fewer than 8 levels"


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def check_png_files(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"curves.png", "histogram_step8.png", "eigenvectors_step8.png"} <= names or \
        {"curves.png", "histogram_step4.png", "eigenvectors_step4.png"} <= names, names
    (eigenvectors,) = folder.glob("eigenvectors_step*.png")
    assert_shows_a_direction(png(eigenvectors), str(eigenvectors))
    assert_draws_curves(png(folder / "robust_accuracy.png"), 4, str(folder / "robust_accuracy.png"))


def assert_draws_curves(rgb: np.ndarray, lines: int, where: str) -> None:
    """Each of the first `lines` colours of matplotlib's default cycle drawn (a line per robust-accuracy key)."""
    pixels = rgb.reshape(-1, 3).astype(int)
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))[:lines]:
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 20, f"{where}: no line in colour {colour}"


def check_tensorboard(folder: Path, evaluations: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert len(events.Histograms("fim/spectral_norm/histogram")) == evaluations
    summaries = events.Images("fim/eigenvectors")
    assert len(summaries) == evaluations
    for summary in summaries:
        assert_shows_a_direction(np.asarray(Image.open(BytesIO(summary.encoded_image_string)).convert("RGB")),
                                 f"TensorBoard image at step {summary.step}")
    scalars = events.Scalars("fim/spectral_norm/mean")
    assert len(scalars) == evaluations


def check_wandb(run_dir: Path, history: list[dict]) -> None:
    assert len(list(run_dir.parent.glob("*run-*"))) == 1  # one W&B run: rank 0's
    for norm, radii in DEFAULT_EPS.items():  # the robust accuracy against eps, a chart per evaluation
        tables = sorted((run_dir / "files" / "media" / "table" / "fim" / "robust_accuracy_vs_eps").glob(
            f"{norm}_table_*.table.json"), key=lambda path: int(path.name.split("_")[2]))
        assert len(tables) == len(history)
        for path, record in zip(tables, history):
            rows = json.loads(path.read_text())["data"]
            assert [row[0] for row in rows] == pytest.approx(list(radii))
            assert [row[2] for row in rows] == pytest.approx([record[eps_key("fim", norm, r)] for r in radii])
    files = sorted((run_dir / "files" / "media" / "images" / "fim").glob("eigenvectors_*.png"))
    assert len(files) == 8  # 4 eigenvectors at each of 2 evaluations
    for path in files:
        assert_shows_a_direction(png(path), str(path))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_logs_the_reference_numbers_and_shows_the_directions(name, reference, tmp_path):
    cell = CELLS[name]
    result, out = reference if name == "A" else (run_cell(name, tmp_path / "run"), tmp_path / "run")
    reference_result, reference_out = reference
    assert result["world_size"] == cell["devices"]

    probes = torch.load(out / "probes.pt")
    torch.testing.assert_close(probes, torch.load(reference_out / "probes.pt"), rtol=0, atol=0)
    labels = torch.load(out / "labels.pt")
    torch.testing.assert_close(labels, torch.load(reference_out / "labels.pt"), rtol=0, atol=0)
    expected = expected_statistics(probes, labels)
    assert any(0 < expected[eps_key("fim", norm, radii[-1])] < expected["fim/accuracy"]
               for norm, radii in DEFAULT_EPS.items())  # an informative radius
    assert len(result["history"]) == 2  # one evaluation per epoch
    for record, first in zip(result["history"], reference_result["history"]):
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, rel=1e-5), key
            assert record[key] == pytest.approx(first[key], rel=1e-5), key
    for end, record in enumerate(result["history"], 1):  # the alarm keys from the logged curve so far
        curve = result["history"][:end]
        fired = any(collapsed([r[key] for r in curve], [r["fim/accuracy"] for r in curve])
                    for key in record if key.startswith("fim/robust_accuracy/"))
        assert record["fim/alarm/robust_collapse"] == float(fired)
        for norm, radii in DEFAULT_EPS.items():
            key = eps_key("fim", norm, radii[-1])
            drop = max(r[key] for r in curve) - record[key]
            assert record[key.replace("/robust_accuracy/", "/robust_drop/")] == pytest.approx(drop, abs=1e-12)

    validation = torch.cat([x for x, _ in torch.utils.data.DataLoader(images(48, 1), batch_size=48)])
    metric = fl.fisher_spectral_norm(build_net().eval(), validation).mean().item()
    assert result["val_fim"] == pytest.approx([metric, metric], rel=1e-5)

    records = torch.load(out / "penalties.pt")
    assert len(records) == 8 // cell["devices"]
    recompute = PENALTIES[cell["penalty"]]()
    net = build_net()
    for inputs, value in records:
        # float32 logits are reused (train-mode forward, BatchNorm momentum 0); bf16 logits must not be
        logits = net(inputs) if cell["precision"] == "32-true" else None
        assert value == pytest.approx(recompute(net, inputs, logits=logits).item(), rel=PENALTY_RTOL[cell["penalty"]])

    for rank in range(cell["devices"]):
        calls = json.loads((out / f"writer_calls_rank{rank}.json").read_text())
        assert calls == (["on_score", "on_score", "on_end"] if rank == 0 else [])
    folders = result["loggers"]
    loggers = cell["loggers"].split(",")
    if "csv" in loggers:
        check_png_files(Path(folders["CSVLogger"]) / "fim")
    if "tensorboard" in loggers:
        check_tensorboard(Path(folders["TensorBoardLogger"]), evaluations=2)
    if "wandb" in loggers:
        check_wandb(Path(folders["WandbLogger"]), result["history"])
    if loggers == ["none"]:
        check_png_files(out / "fim")


def _fsdp2(out: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests" / "matrix_cell.py"), str(out), "--precision", "32-true",
               "--devices", "2", "--loggers", "csv", "--penalty", "kl", "--strategy", "fsdp2", *options]
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp2_ranks_of_unequal_shares_run_the_same_passes_and_log_the_reference(tmp_path):
    """33 probes over 2 ranks in batches of 16: shares of 17 and 16, so 2 and 1 batches unpadded. Under FSDP2
    every forward is an all-gather: the shorter share is padded, the line search runs on every probe, and the
    logged statistics equal the one-process computation on the same probes."""
    done = _fsdp2(tmp_path / "run", "--num-samples", "33", "--batch-size", "16")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    probes, labels = torch.load(tmp_path / "run" / "probes.pt"), torch.load(tmp_path / "run" / "labels.pt")
    assert len(probes) == 33
    expected = expected_statistics(probes, labels)
    for record in result["history"]:
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, rel=1e-5), key


def test_fsdp2_refuses_a_method_whose_passes_depend_on_the_samples(tmp_path):
    """Lanczos stops when its samples converge: under FSDP2 the ranks would join different all-gathers and hang
    (a run here did, for 15 minutes). The callback refuses it, naming the cause and the fix."""
    done = _fsdp2(tmp_path / "run", "--method", "lanczos")
    assert done.returncode != 0
    assert "method='lanczos' at 4 classes runs a number of forward passes that depends on the samples" in done.stderr
    assert "Use method='exact'" in done.stderr
