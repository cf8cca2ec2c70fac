"""Scoring a data set through `Trainer.predict`: the same rows on 1 and 2 processes (fim-evaluate under
Lightning's `ddp` on gloo), nothing lost or duplicated on an uneven split, a killed run resumed to the
uninterrupted table, corrupt shards redone."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from recipes.evaluation import (BlackBoxColumn, CleverColumn, MinimalPerturbationColumn, PGDColumn,
                                RobustnessEvaluation)
from recipes.statistics import read_table, write_table
from recipes.report import score_files
from recipes.scoring import (ScoringDataModule, ScoringModule, ShardWriter, merge_shards, score_split,
                             shard_is_valid, valid_shards)
from tests.matrix_cell import build_net, images

ROOT = Path(__file__).resolve().parents[1]
N = 21  # not divisible by 2 processes or by the batch size
META = {"model": "cnn", "data": "blobs", "regularizer": "none", "seed": 0}


class BlobImages(pl.LightningDataModule):
    """1x6x6 images in a `splits` dict, as the package's data modules keep them."""

    def setup(self, stage=None):
        self.splits = {"test": images(N, 5)}


def evaluation():
    """Every column whose value could depend on the batch: black-box probes, PGD random starts, CLEVER."""
    columns = {"blackbox": BlackBoxColumn(queries=9), "pgd_linf": PGDColumn("linf", 0.1, steps=3),
               "pgd_l2": PGDColumn("l2", 0.5, steps=3),
               "minimal_perturbation": MinimalPerturbationColumn(search_steps=2, steps=3),
               "clever": CleverColumn(samples=3, radius=0.5)}
    return RobustnessEvaluation(columns=columns, batch_size=4, progress=False)


def score(folder, callbacks=(), **kwargs):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), **kwargs)
    net = build_net().eval()
    return score_split(trainer, net, evaluation(), BlobImages(), "test", None, META, folder, "trained")


def assert_same_rows(a, b, rtol):
    assert list(a) == list(b)
    for name in (n for n in a if n != "run"):  # the folder each table was read from
        if a[name].dtype.kind in "fc":
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_process")
    score(folder)
    return read_table([folder / "scores.csv"]), folder


def test_one_process_scores_every_sample_once(uninterrupted):
    table, folder = uninterrupted
    assert table["index"].tolist() == list(range(N))
    assert np.isfinite(table["lambda_max"]).all() and np.isfinite(table["lambda_max_blackbox"]).all()
    assert np.isfinite(table["clever"][:3]).all() and np.isnan(table["clever"][3:]).all()
    reference = evaluation()
    direct = reference(build_net().eval(), *[torch.stack(t) for t in zip(*[images(N, 5)[i] for i in range(N)])])
    for name in ("lambda_max", "trace", "radius", "lambda_max_blackbox", "min_perturbation", "clever"):
        np.testing.assert_allclose(table[name], direct[name], rtol=1e-5, err_msg=name)  # in-memory evaluation
    for name in ("pgd_linf_robust", "pgd_l2_robust", "correct"):
        np.testing.assert_array_equal(table[name], direct[name].astype(float), err_msg=name)


def _evaluate(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    """fim-evaluate on the first 21 digits (not divisible by 2 processes or the batch size 4) with every column
    whose value could depend on the batch: black-box probes, PGD random starts, CLEVER, DeepFool."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "recipes.evaluate", "data=digits", "model=small_cnn", "evaluate.num_samples=21",
               "evaluation.batch_size=4", "evaluation.columns.blackbox.queries=9", "evaluation.columns.bound=null",
               "evaluation.columns.clever.samples=3", "evaluation.columns.clever.radius=0.5",
               "evaluation.columns.pgd_linf.steps=3", "evaluation.columns.pgd_l2.steps=3", "evaluation.columns.cw=null",
               "evaluation.columns.minimal_perturbation.search_steps=2",
               "evaluation.columns.minimal_perturbation.steps=3", f"hydra.run.dir={folder}",
               "+trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(command, cwd=folder.parent, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_same_rows_on_an_uneven_split(tmp_path):
    """fim-evaluate on 1 process and on 2 (`trainer=ddp`, Lightning's launcher; its prediction sampler splits
    21 samples 11 / 10): the same rows, per-sample values to 1e-5 (the same float32 operations on batches of
    another composition), none lost or repeated."""
    one = _evaluate(tmp_path / "one")
    two = _evaluate(tmp_path / "two", "trainer=ddp")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-4000:]
    shards = valid_shards(tmp_path / "two" / "shards")
    assert {p.name.split("-")[0] for p in shards} == {"rank0", "rank1"}
    assert sorted(i for p in shards for i in read_table([p])["index"]) == list(range(N))  # none lost, none twice
    table = read_table([tmp_path / "one" / "scores.csv"])
    assert np.isfinite(table["lambda_max_blackbox"]).all() and np.isfinite(table["clever"][:3]).all()
    assert_same_rows(read_table([tmp_path / "two" / "scores.csv"]), table, rtol=1e-5)


class Crash(pl.Callback):
    def __init__(self, after):
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.after:
            raise RuntimeError("killed")


def test_a_crashed_run_resumes_to_the_uninterrupted_table(uninterrupted, tmp_path):
    table, _ = uninterrupted
    with pytest.raises(RuntimeError, match="killed"):
        score(tmp_path, callbacks=[Crash(after=2)])
    finished = len(valid_shards(tmp_path / "shards"))
    assert 0 < finished < 6 and not (tmp_path / "scores.csv").exists()
    score(tmp_path)
    assert len(valid_shards(tmp_path / "shards")) == 6  # ceil(21 / 4) batches, each scored once
    assert_same_rows(read_table([tmp_path / "scores.csv"]), table, rtol=0)


def test_corrupt_and_partial_shards_are_detected_and_redone(uninterrupted, tmp_path):
    table, folder = uninterrupted
    shards = tmp_path / "shards" / "trained"
    shards.mkdir(parents=True)
    for path in valid_shards(folder / "shards"):
        (shards / path.name).write_bytes(path.read_bytes())
    first, second = sorted(shards.iterdir())[:2]
    first.write_bytes(first.read_bytes()[:-30])  # truncated
    second.write_bytes(second.read_bytes().replace(b",", b";", 1))  # altered, same length
    (shards / ".rank0-000000020.tmp").write_text("index,lambda_max\n20,1")  # a write that never finished
    assert not shard_is_valid(first) and not shard_is_valid(second)
    with pytest.warns(UserWarning, match=f"{first.name}: corrupt or partial shard"):
        score(tmp_path)
    assert_same_rows(read_table([tmp_path / "scores.csv"]), table, rtol=0)


def test_a_hard_killed_fim_evaluate_resumes(tmp_path):
    """fim-evaluate killed with os._exit (no clean-up at all) in its third batch, then started again."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FIM_DATA_DIR": str(ROOT.parent / "shared" / "data")}
    common = [sys.executable, "-m", "recipes.evaluate", "data=digits", "model=small_cnn", "evaluate.num_samples=40",
              "evaluation=fisher_only", "evaluation.batch_size=8", f"hydra.run.dir={tmp_path}",
              "+trainer.enable_progress_bar=false"]
    killed = subprocess.run([*common, "+trainer.callbacks=[{_target_: tests.lightning_helpers.ExitAfterBatches, "
                                      "batches: 3}]"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert len(valid_shards(tmp_path / "shards")) == 2 and not (tmp_path / "scores.csv").exists()
    resumed = subprocess.run(common, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "16 samples finished before, 24 to score" in resumed.stdout + resumed.stderr
    assert read_table([tmp_path / "scores.csv"])["index"].tolist() == list(range(40))


def test_progress_reports_samples_per_second_and_time_left(tmp_path, caplog):
    writer = ShardWriter(tmp_path, "trained", META, report_every_s=0.0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer],
                         enable_model_summary=False)
    data = ScoringDataModule(BlobImages(), "test", 8, writer.shard_folder, batch_size=4)
    with caplog.at_level(logging.INFO):
        trainer.predict(ScoringModule(build_net().eval(), evaluation()), datamodule=data, return_predictions=False)
    lines = [r.getMessage() for r in caplog.records if "samples/s" in r.getMessage()]
    assert lines and "4/8 samples" in lines[0] and "min left" in lines[0]


def test_fim_report_reads_the_shards_of_an_unfinished_run(uninterrupted, tmp_path):
    _, folder = uninterrupted
    run = tmp_path / "run"
    (run / "shards" / "trained").mkdir(parents=True)
    for path in valid_shards(folder / "shards")[:3]:
        (run / "shards" / "trained" / path.name).write_bytes(path.read_bytes())
    files = score_files([tmp_path])
    assert len(files) == 3 and all(shard_is_valid(p) for p in files)
    assert read_table(files)["index"].tolist() == list(range(12))
    write_table(merge_shards(run / "shards"), run / "scores.csv")  # once merged, the CSV stands for the run
    assert score_files([tmp_path]) == [(run / "scores.csv").resolve()]
