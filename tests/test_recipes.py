"""The quickstart recipe end to end, as a user runs it (Hydra app in a subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fim_train_quickstart_prints_the_curve_and_writes_the_plot(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "recipes.train", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}",
         "+trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| fit |")]
    assert len(table) == 2
    means = [float(line.split("|")[4]) for line in table]
    assert all(m > 0 for m in means)
    assert (tmp_path / "fim_curve.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "fim/spectral_norm/mean" in metrics and "fim/radius/median" in metrics


def test_fim_train_with_a_fisher_penalty_logs_both_terms(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "recipes.train", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}",
         "+trainer.enable_progress_bar=false", "regularizer=fisher_kl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/fisher_penalty" in metrics and "train/ce" in metrics


def test_a_finished_job_is_skipped_when_started_again_with_skip_done(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "recipes.train", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}",
               "+trainer.enable_progress_bar=false", "logger=csv", "skip_done=true"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    done = (tmp_path / "done.json").read_text()
    assert "test/acc" in done
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"skipping {tmp_path}: finished before" in again.stdout
    assert not list((tmp_path / "csv").glob("version_1"))  # nothing trained a second time


def test_fim_train_under_ddp_spawn_writes_the_same_curve_as_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    curves = {}
    for name, extra in (("one", []), ("spawn", ["+trainer.strategy=ddp_spawn", "trainer.devices=2"])):
        out = subprocess.run(
            [sys.executable, "-m", "recipes.train", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / name}",
             "+trainer.enable_progress_bar=false", "logger=csv", "callbacks.fisher.num_samples=16", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        curves[name] = json.loads((tmp_path / name / "fim_history.json").read_text())
    assert [r["stage"] for r in curves["spawn"]] == ["fit", "fit", "test"]
    # two processes split each batch: the weights differ from one process, so compare what is comparable
    first = curves["spawn"][0]
    assert first["fim/spectral_norm/mean"] > 0 and curves["spawn"][-1]["fim/spectral_norm/mean"] > 0
    assert set(curves["spawn"][-1]) == set(curves["one"][-1])


def test_fim_train_resumes_from_ckpt_path_and_names_a_missing_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    base = [sys.executable, "-m", "recipes.train", "+trainer.enable_progress_bar=false", "logger=csv"]
    first = subprocess.run([*base, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run([*base, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'b'}",
                              f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "b" / "fim_history.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in history] == [("fit", 0), ("fit", 1), ("test", 2)]
    before = json.loads((tmp_path / "a" / "fim_history.json").read_text())
    assert history[0] == before[0]  # the resumed run continues the saved curve
    missing = subprocess.run([*base, f"hydra.run.dir={tmp_path / 'c'}", f"ckpt_path={tmp_path / 'nope.ckpt'}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "nope.ckpt: no such checkpoint file" in missing.stderr
