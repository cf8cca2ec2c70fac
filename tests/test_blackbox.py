"""Query-only estimators against white-box exact values, with exact query accounting and clear errors."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.neural_network import MLPClassifier
from torch import nn

import fim_lightning as fl
from fim_lightning.blackbox import blackbox_fisher, blackbox_fisher_spectral_norm, numpy_predictor
from tests.conftest import make_mlp


class _Counting:
    def __init__(self, model):
        self.model, self.points, self.calls, self.grad_enabled = model, 0, 0, []

    def __call__(self, x):
        self.calls += 1
        self.points += len(x)
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.model(x).softmax(-1)


@pytest.mark.parametrize("difference, queries, rtol", [("central", 15, 1e-7), ("forward", 8, 1e-5)])
def test_agrees_with_white_box_exact_and_counts_queries(difference, queries, rtol):
    model = make_mlp().double()
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    predict = _Counting(model)
    rng = torch.get_rng_state()
    estimate = blackbox_fisher(predict, x, num_queries=20001, max_batch=100000, difference=difference)
    assert torch.equal(torch.get_rng_state(), rng)
    exact = fl.fisher_spectral_norm(model, x)
    # 7 probes in 7 dimensions are a complete orthonormal basis: exact up to the finite-difference error.
    torch.testing.assert_close(estimate.spectral_norm, exact, rtol=rtol, atol=0)
    trace = fl.fisher_trace(model, x)
    torch.testing.assert_close(estimate.trace, trace, rtol=rtol, atol=0)
    assert ((estimate.trace - trace).abs() <= 4 * estimate.trace_stderr + rtol * trace).all()
    assert (estimate.lower <= estimate.upper).all()
    assert estimate.queries.tolist() == [queries] * 3 and predict.points == 3 * queries
    assert estimate.calls == predict.calls == 2 and not any(predict.grad_enabled)


@pytest.mark.parametrize("difference, per_probe", [("central", 2), ("forward", 1)])
@pytest.mark.parametrize("budget", [3, 6, 128, 1000])
def test_never_exceeds_the_budget(budget, difference, per_probe):
    model = make_mlp()
    predict = _Counting(model)
    estimate = blackbox_fisher(predict, torch.randn(4, 7), num_queries=budget, max_batch=100, difference=difference)
    per_sample = 1 + per_probe * min((budget - 1) // per_probe, 7)
    assert (estimate.queries == per_sample).all() and per_sample <= budget
    assert predict.points == 4 * per_sample
    assert estimate.calls == predict.calls == 1 + -(-4 * (per_sample - 1) // 100)


def test_error_shrinks_with_the_budget():
    model = make_mlp(d=300).double()
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = fl.fisher_spectral_norm(model, x)
    predict = lambda inputs: model(inputs).softmax(-1)  # noqa: E731
    errors = [((blackbox_fisher_spectral_norm(predict, x, q, generator=torch.Generator().manual_seed(s)) - exact).abs()
               / exact).mean().item() for q in (33, 501) for s in range(3)]
    assert np.mean(errors[3:]) < np.mean(errors[:3]) / 3


def test_orthonormal_frames_reduce_the_variance_as_stated():
    """With K < d probes per frame the trace estimate's spread over seeds matches the reported standard error,
    which is sqrt((d - K) / (d - 1)) times that of independent probes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(1, 40, dtype=torch.float64)
    predict = lambda inputs: model(inputs).softmax(-1)  # noqa: E731
    runs = [blackbox_fisher(predict, x, 2 * 30 + 1, difference="central", generator=torch.Generator().manual_seed(s))
            for s in range(400)]
    traces = torch.stack([r.trace[0] for r in runs])
    reported = torch.stack([r.trace_stderr[0] for r in runs]).mean()
    assert abs(traces.mean() - fl.fisher_trace(model, x)[0]) < 3 * traces.std() / 20
    assert 0.8 < traces.std() / reported < 1.25
    independent = reported / np.sqrt((40 - 30) / 39)
    assert traces.std() < 0.6 * independent


def _torch_mlp_from_sklearn(classifier):
    """The fitted scikit-learn MLP as a float64 torch module returning logits (the analytic reference)."""
    layers = []
    for i, (w, b) in enumerate(zip(classifier.coefs_, classifier.intercepts_)):
        linear = nn.Linear(*w.shape).double()
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if i < len(classifier.coefs_) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def test_scikit_learn_mlp_through_the_numpy_adapter():
    data = load_iris()
    classifier = MLPClassifier(hidden_layer_sizes=(16,), activation="tanh", max_iter=2000, random_state=0)
    classifier.fit(data.data, data.target)
    reference = _torch_mlp_from_sklearn(classifier)
    x = torch.from_numpy(data.data[::30]).double()
    torch.testing.assert_close(reference(x).softmax(-1), torch.from_numpy(classifier.predict_proba(x.numpy())))
    exact = fl.fisher_spectral_norm(reference, x)
    central = blackbox_fisher(numpy_predictor(classifier.predict_proba), x, num_queries=9, difference="central")
    assert central.queries.tolist() == [9] * len(x)  # a complete basis of the 4 features
    torch.testing.assert_close(central.spectral_norm, exact, rtol=1e-6, atol=0)
    forward = blackbox_fisher(numpy_predictor(classifier.predict_proba), x, num_queries=5)
    assert forward.queries.tolist() == [5] * len(x)
    torch.testing.assert_close(forward.spectral_norm, exact, rtol=1e-4, atol=0)  # O(h) truncation


@pytest.mark.parametrize(
    "predict, match",
    [
        (lambda x: x.sum(1), r"\(B, C\)"),
        (lambda x: torch.full((len(x), 3), 0.5), "not probability vectors"),
    ],
)
def test_bad_predictors(predict, match):
    with pytest.raises(ValueError, match=match):
        blackbox_fisher(predict, torch.randn(2, 7))


def test_bad_budget():
    with pytest.raises(ValueError, match="num_queries must be >= 3"):
        blackbox_fisher(lambda x: x[:, :3].softmax(-1), torch.randn(2, 7), num_queries=2, difference="central")
    with pytest.raises(ValueError, match="num_queries must be >= 2"):
        blackbox_fisher(lambda x: x[:, :3].softmax(-1), torch.randn(2, 7), num_queries=1)
    with pytest.raises(ValueError, match="num_queries must be >= 3 here: .* the truncation check"):
        blackbox_fisher(lambda x: x[:, :3].softmax(-1), torch.randn(2, 7), num_queries=2, step=0.1)
    with pytest.raises(ValueError, match="difference must be"):
        blackbox_fisher(lambda x: x[:, :3].softmax(-1), torch.randn(2, 7), difference="backward")


def test_a_hard_label_predictor_is_refused_per_sample():
    model = make_mlp().double()
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def hard(points):
        return nn.functional.one_hot(model(points).argmax(1), 5).double()

    with pytest.warns(RuntimeWarning, match="probability exactly 1 on one class"):
        estimate = blackbox_fisher(hard, x)
    assert torch.isnan(estimate.spectral_norm).all()


def test_a_piecewise_constant_random_forest_is_refused_per_sample():
    from sklearn.ensemble import RandomForestClassifier

    data = load_iris()
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(data.data, data.target)
    x = torch.from_numpy(data.data[::15]).double()
    with pytest.warns(RuntimeWarning, match="piecewise constant|probability exactly 1|rounding level"):
        estimate = blackbox_fisher(numpy_predictor(forest.predict_proba), x, num_queries=9)
    assert torch.isnan(estimate.spectral_norm).all(), estimate.spectral_norm


def test_a_float16_predictor_gets_a_close_value_or_nan_never_a_silently_wrong_one():
    """The issue's case: float16 answers, a user's step of 3e-2 (12% off, silently, before the checks)."""
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    model = make_mlp()
    exact = fl.fisher_spectral_norm(model, x)
    half = lambda points: model(points.float()).softmax(-1).half()  # noqa: E731  float16 answers
    for step in (1e-2, 3e-2):
        with pytest.warns(RuntimeWarning, match="truncation error|rounding level"):
            estimate = blackbox_fisher(half, x, num_queries=20, step=step).spectral_norm
        kept = torch.isfinite(estimate)
        assert not kept.all()
        assert ((estimate[kept] - exact[kept]).abs() <= 0.05 * exact[kept]).all(), (step, estimate, exact)
    checked = blackbox_fisher(half, x, num_queries=20, step=3e-2)
    assert checked.queries.tolist() == [9] * 6  # 1 at x, 7 probes (a complete basis), 1 for the truncation check
    default = blackbox_fisher(half, x, num_queries=20).spectral_norm  # the default step for float16 answers
    torch.testing.assert_close(default, exact, rtol=0.05, atol=0)
