"""Report statistics against independent computations: rank correlations from ranks, bootstrap intervals."""
import numpy as np
import pytest

from recipes import statistics as report


def _ranks(values):
    order = np.argsort(values)
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def test_correlations_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = np.exp(x) + rng.normal(scale=0.5, size=200)  # monotone signal plus noise, no ties
    pearson = np.corrcoef(x, y)[0, 1]
    spearman = np.corrcoef(_ranks(x), _ranks(y))[0, 1]
    sign = np.sign(x[:, None] - x[None]) * np.sign(y[:, None] - y[None])
    kendall = sign.sum() / (len(x) * (len(x) - 1))
    assert report.correlation(x, y, "pearson") == pytest.approx(pearson, rel=1e-10)
    assert report.correlation(x, y, "spearman") == pytest.approx(spearman, rel=1e-10)
    assert report.correlation(x, y, "kendall") == pytest.approx(kendall, rel=1e-10)
    with_nan = np.append(x, np.nan), np.append(y, 1.0)
    assert report.correlation(*with_nan) == pytest.approx(spearman, rel=1e-10)  # non-finite pairs dropped
    assert np.isnan(report.correlation(np.ones(5), np.arange(5.0)))


def test_seed_bootstrap_averages_seeds_and_its_interval_shrinks_with_samples():
    rng = np.random.default_rng(1)

    def seed_pairs(n):
        x = rng.normal(size=n)
        return x, x + rng.normal(size=n)

    small = [seed_pairs(30) for _ in range(3)]
    statistic, low, high = report.seed_bootstrap(small, "spearman", draws=300)
    assert statistic == pytest.approx(np.mean([report.correlation(x, y) for x, y in small]), rel=1e-12)
    assert low < statistic < high
    _, big_low, big_high = report.seed_bootstrap([seed_pairs(600) for _ in range(3)], "spearman", draws=300)
    assert big_high - big_low < (high - low) / 2
    np.testing.assert_allclose(report.seed_bootstrap([(np.arange(10.0), np.arange(10.0) ** 2)], draws=50), 1.0,
                               rtol=1e-12)


def _table():
    rng = np.random.default_rng(2)
    rows = []
    for model, slope in (("a", 1.0), ("b", 2.0), ("c", 4.0)):
        for seed in (0, 1):
            x = rng.uniform(0.1, 1.0, size=50)
            rows.append({"model": np.full(50, model), "regularizer": np.full(50, "none"),
                         "stage": np.full(50, "trained"),
                         "seed": np.full(50, seed), "index": np.arange(50.0), "correct": np.ones(50),
                         "radius": x, "lambda_max": slope / x, "min_perturbation": x / slope,
                         "pgd_l2_robust": (x / slope > 0.2).astype(float)})
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


def test_sample_and_model_correlations_on_a_known_table(tmp_path):
    table = report.read_table([report.write_table(_table(), tmp_path / "scores.csv")])
    assert table["model"].dtype.kind == "U" and table["radius"].dtype == float
    np.testing.assert_array_equal(table["radius"], _table()["radius"])  # full precision round trip
    rows = report.sample_correlations(table, ["radius", "lambda_max"], draws=50)
    assert [(r["model"], r["score"]) for r in rows] == [(m, s) for m in "abc" for s in ("radius", "lambda_max")]
    for row in rows:  # radius is monotone increasing in the target, lambda_max decreasing
        expected = 1.0 if row["score"] == "radius" else -1.0
        np.testing.assert_allclose(row["spearman"], expected, rtol=1e-12)
        assert row["kendall"][0] == pytest.approx(expected, rel=1e-12)
        assert row["samples"] == 100 and row["seeds"] == 2
    summaries = report.model_summaries(table)
    assert len(summaries) == 6 and summaries[0]["median radius"] == pytest.approx(np.median(table["radius"][:50]))
    across = report.model_correlations(summaries, ["median lambda_max"], ["median min perturbation"], draws=50)
    assert across[0]["models"] == 3 and across[0]["spearman"][0] == pytest.approx(-1.0, rel=1e-12)
    ranking = report.bound_ranking(summaries, outcome="PGD L2 accuracy")
    assert [r["rank of median lambda_max"] for r in ranking] == [1, 2, 3]
    text = report.markdown(rows[:1], ["model", "score", "spearman"])
    assert text.splitlines()[2] == "| a | radius | 1.000 [1.000, 1.000] |"
    for figure in (report.scatter_figure(table),
                   report.ranking_figure(summaries, "median lambda_max", "PGD L2 accuracy")):
        assert len(figure.axes) == 1


def test_distance_agreement_measures_what_a_predicted_distance_is_worth():
    """A score equal to the target up to noise within 1.5x has median ratio ~1 and everything within 1.5x; one
    twice the target has median 0.5 and nothing within 1.5x; the intervals cover the values."""
    rng = np.random.default_rng(3)
    target = rng.uniform(0.1, 1.0, size=400)
    table = {"model": np.full(400, "m"), "regularizer": np.full(400, "none"), "stage": np.full(400, "trained"),
             "seed": np.repeat([0.0, 1.0], 200), "correct": np.ones(400), "min_perturbation": target,
             "linear_step": target * rng.uniform(1 / 1.4, 1.4, size=400), "radius": 2 * target}
    rows = {row["score"]: row for row in report.distance_agreement(table, ["linear_step", "radius"], draws=200)}
    median, low, high = rows["linear_step"]["median measured / predicted"]
    assert median == pytest.approx(1.0, abs=0.05) and low <= median <= high
    assert rows["linear_step"]["share within 1.5x"][0] == 1.0
    assert rows["radius"]["median measured / predicted"][0] == pytest.approx(0.5, rel=1e-12)
    assert rows["radius"]["share within 1.5x"][0] == 0.0
