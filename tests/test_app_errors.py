"""The apps name the user's mistake: config types, data files, class counts, checkpoints, sweep-job paths; and
fim-evaluate on a run takes the run's own evaluation settings."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recipes.common import quote_path_overrides
from recipes.data import NpzDataModule
from recipes.evaluate import load_net

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _app(tmp_path, module, *overrides):
    return subprocess.run([sys.executable, "-m", module, "+trainer.enable_progress_bar=false", *overrides],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_non_integer_trainer_option_is_named(tmp_path):
    out = _app(tmp_path, "recipes.train", "trainer.max_epochs=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode != 0 and "trainer.max_epochs must be an integer or None, got str 'abc'" in out.stderr


def _npz(path, labels=10, **arrays):
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    content = {f"{split}_{kind}": (images if kind == "images" else np.arange(4) % labels)
               for split in ("train", "val", "test") for kind in ("images", "labels")}
    content.update(arrays)
    np.savez(path, **content)
    return path


def test_a_data_file_that_is_not_an_npz_archive_is_named(tmp_path):
    (tmp_path / "data.npz").write_text("not numpy")
    with pytest.raises(ValueError, match=r"data.npz: not a NumPy .npz archive"):
        NpzDataModule(str(tmp_path / "data.npz"), num_classes=10, in_channels=3).setup()
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a single array, not a .npz archive"):
        NpzDataModule(str(tmp_path / "single.npy"), num_classes=10, in_channels=3).setup()
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"missing arrays \['train_images'"):
        NpzDataModule(str(tmp_path / "other.npz"), num_classes=10, in_channels=3).setup()


def test_labels_beyond_num_classes_are_named(tmp_path):
    path = _npz(tmp_path / "data.npz", labels=4)
    with pytest.raises(ValueError, match="labels run from 0 to 3, but the data config says num_classes=3"):
        NpzDataModule(str(path), num_classes=3, in_channels=3).setup()
    NpzDataModule(str(path), num_classes=4, in_channels=3).setup()


def test_a_garbage_checkpoint_is_named(tmp_path):
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00\x01 not a checkpoint")
    cfg = OmegaConf.create({"model": {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3},
                            "ckpt_path": str(tmp_path / "garbage.ckpt")})
    with pytest.raises(ValueError, match=r"garbage.ckpt: not a PyTorch checkpoint"):
        load_net(cfg)
    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other.ckpt: not a Lightning checkpoint"):
        load_net(OmegaConf.merge(cfg, {"ckpt_path": str(tmp_path / "other.ckpt")}))
    with pytest.raises(FileNotFoundError, match="missing.ckpt: no such checkpoint file"):
        load_net(OmegaConf.merge(cfg, {"ckpt_path": str(tmp_path / "missing.ckpt")}))


def test_paths_that_hydra_would_split_are_quoted():
    argv = ["fim-evaluate", "run_dir=multirun/x/regularizer=none,seed=0", "ckpt_path='a=b'", "seed=1", "+x=a,b"]
    quote_path_overrides(("run_dir", "ckpt_path"), argv)
    assert argv == ["fim-evaluate", "run_dir='multirun/x/regularizer=none,seed=0'", "ckpt_path='a=b'", "seed=1",
                    "+x=a,b"]


def test_fim_evaluate_on_a_sweep_job_folder_takes_the_runs_evaluation_settings(tmp_path):
    job = tmp_path / "multirun" / "regularizer=none,seed=0"
    trained = _app(tmp_path, "recipes.train", "trainer.max_epochs=1", f"hydra.run.dir='{job}'", "logger=csv",
                   "evaluation=fisher_only", "evaluate.num_samples=12")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = _app(tmp_path, "recipes.evaluate", f"run_dir={job}")  # typed as a user types it, unquoted
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    with open(job / "evaluate" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(job / "scores.csv") as handle:
        training_time = list(csv.DictReader(handle))
    assert len(rows) == len(training_time) == 12
    assert set(rows[0]) == set(training_time[0])  # the same columns: fisher_only, no attacks
    assert [r["lambda_max"] for r in rows] == [r["lambda_max"] for r in training_time]
