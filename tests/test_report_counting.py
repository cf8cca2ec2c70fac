"""fim-report counts each run, seed and sample once: copies, shards, re-evaluations, missing columns, seeds with
too few samples, runs that never finished, and damaged cells named by file and column."""
import os
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from recipes import statistics
from recipes.report import build_report, theory_runs
from recipes.scoring import write_shard


def _rows(n, seed=0, stage="trained", model="a", start=0, columns=("radius", "lambda_max")):
    rng = np.random.default_rng(seed + start)
    x = rng.uniform(0.1, 1.0, size=n)
    table = {"model": np.full(n, model), "data": np.full(n, "d"), "regularizer": np.full(n, "none"),
             "seed": np.full(n, seed), "stage": np.full(n, stage), "split": np.full(n, "test"),
             "index": np.arange(start, start + n), "correct": np.ones(n), "min_perturbation": x}
    table.update({"radius": x + rng.normal(scale=0.1, size=n), "lambda_max": 1 / x})
    return {k: v for k, v in table.items() if k not in ("radius", "lambda_max") or k in columns}


def _run(folder, table, finished=True):
    folder.mkdir(parents=True, exist_ok=True)
    statistics.write_table(table, folder / "scores.csv")
    (folder / "run.yaml").write_text("seed: 0\n")
    if finished:
        (folder / "done.json").write_text("{}")
    return folder


def _report(tmp_path, *runs):
    cfg = OmegaConf.create({"runs": [str(r) for r in runs], "target": "min_perturbation", "draws": 20,
                            "scores": ["radius", "lambda_max"], "theory_images": 0,
                            "output_dir": str(tmp_path / "report")})
    (tmp_path / "report").mkdir(exist_ok=True)
    return build_report(cfg)


def test_a_copied_scores_file_counts_once(tmp_path):
    first = _run(tmp_path / "a", _rows(20))
    (tmp_path / "b").mkdir()
    shutil.copy(first / "scores.csv", tmp_path / "b" / "scores.csv")
    with pytest.warns(UserWarning, match="is a copy of"):
        table = statistics.read_table([first / "scores.csv", tmp_path / "b" / "scores.csv"])
    assert len(table["index"]) == 20
    with pytest.warns(UserWarning, match="is a copy of"):
        assert "1 runs, 20 evaluated samples" in _report(tmp_path, tmp_path / "a", tmp_path / "b")


def test_the_shards_of_a_stopped_run_are_one_run(tmp_path):
    finished = [_run(tmp_path / name, _rows(10, model=name)) for name in ("a", "b")]
    stopped = tmp_path / "c"
    for start in (0, 4, 8):
        write_shard(stopped / "shards" / "trained", 0, _rows(4, model="c", start=start))
    (stopped / "run.yaml").write_text("seed: 0\n")
    text = _report(tmp_path, *finished, stopped)
    assert "3 runs, 32 evaluated samples" in text
    assert "1 run(s) never finished" in text


def test_a_re_evaluation_replaces_the_runs_older_rows(tmp_path):
    run = _run(tmp_path / "job", _rows(50))
    os.utime(run / "scores.csv", (1, 1))  # older
    (run / "evaluate").mkdir()
    statistics.write_table(_rows(20, start=100), run / "evaluate" / "scores.csv")
    with pytest.warns(UserWarning, match="evaluated 2 times"):
        table = statistics.read_table([run / "scores.csv", run / "evaluate" / "scores.csv"])
    assert len(table["index"]) == 20 and set(table["index"]) == set(range(100, 120))
    assert set(table["run"]) == {str(run.resolve())}


def test_a_re_evaluation_of_the_same_samples_replaces_their_values(tmp_path):
    """fim-evaluate scoring the same test samples again: the newer values are the ones read (the samples'
    identities repeat, so deduplication must not keep the older rows), with the warning."""
    run = _run(tmp_path / "job", _rows(30))
    os.utime(run / "scores.csv", (1, 1))  # older
    newer = _rows(30)
    newer["radius"] = np.full(30, 7.0)
    (run / "evaluate").mkdir()
    statistics.write_table(newer, run / "evaluate" / "scores.csv")
    with pytest.warns(UserWarning, match="evaluated 2 times"):
        table = statistics.read_table([run / "scores.csv", run / "evaluate" / "scores.csv"])
    assert len(table["index"]) == 30 and (table["radius"] == 7.0).all()


def test_a_seed_counts_only_where_it_has_the_column_and_three_usable_samples(tmp_path):
    runs = [_run(tmp_path / "s0", _rows(30, seed=0)),
            _run(tmp_path / "s1", _rows(30, seed=1, columns=("lambda_max",))),  # no radius column
            _run(tmp_path / "s2", _rows(2, seed=2))]  # two samples: no correlation
    table = statistics.read_table([r / "scores.csv" for r in runs])
    rows = {r["score"]: r for r in statistics.sample_correlations(table, ["radius", "lambda_max"], draws=20)}
    assert rows["radius"]["seeds"] == 1 and rows["radius"]["samples"] == 30
    assert rows["lambda_max"]["seeds"] == 2 and rows["lambda_max"]["samples"] == 60
    expected = statistics.correlation(table["radius"][:30], table["min_perturbation"][:30])
    assert rows["radius"]["spearman"][0] == pytest.approx(expected, rel=1e-12)


def test_a_run_that_never_finished_is_left_out_of_the_theory_checks(tmp_path):
    done, stopped = _run(tmp_path / "done", _rows(10, seed=1)), _run(tmp_path / "stopped", _rows(10, seed=0), False)
    for folder in (done, stopped):
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_text("")
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "config.yaml").write_text("{}")
    table = statistics.read_table([done / "scores.csv", stopped / "scores.csv"])
    assert [path.name for path in theory_runs(table).values()] == ["done"]


def test_a_text_cell_in_a_numeric_column_names_the_file_the_line_and_the_column(tmp_path):
    run = _run(tmp_path / "a", _rows(5))
    lines = (run / "scores.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index("radius")] = "oops"
    lines[3] = ",".join(cells)
    (run / "scores.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"scores.csv: line 4, column 'radius' holds the text 'oops'"):
        statistics.read_table([run / "scores.csv"])
