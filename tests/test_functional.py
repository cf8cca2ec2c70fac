"""The estimators against closed forms, dense float64 Jacobians, sampling and finite differences."""
import copy
import math

import pytest
import torch
from torch import nn

import fim_lightning as fl
from tests.conftest import dense_fisher, make_cnn, make_mlp


def test_linear_softmax_closed_form():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(6, 4).double()
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    p = linear(x).softmax(-1).detach()
    W = linear.weight.detach()
    F = torch.stack([W.T @ (torch.diag(q) - torch.outer(q, q)) @ W for q in p])
    evals, evecs = torch.linalg.eigh(F)
    for method in ("exact", "power", "lanczos"):
        pair = fl.fisher_top_eigenpair(linear, x, method,
                                       **({} if method == "exact" else {"tol": 1e-12, "max_iter": 2000}))
        torch.testing.assert_close(pair.eigenvalue, evals[:, -1], rtol=1e-9, atol=0)
        alignment = (pair.eigenvector * evecs[:, :, -1]).sum(1).abs()
        torch.testing.assert_close(alignment, torch.ones(5, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(fl.fisher_trace(linear, x), torch.diagonal(F, dim1=1, dim2=2).sum(1), rtol=1e-12, atol=0)
    v = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fl.fisher_vector_product(linear, x, v), (F @ v.unsqueeze(-1)).squeeze(-1), rtol=1e-12,
                               atol=1e-15)


def test_exact_matches_dense_jacobian(model_and_inputs):
    model, x = model_and_inputs
    F = dense_fisher(model, x)
    reference = torch.linalg.eigvalsh(F)[:, -1]
    exact64 = fl.fisher_spectral_norm(model, x, model_dtype=torch.float64)
    torch.testing.assert_close(exact64, reference, rtol=1e-9, atol=0)
    exact32 = fl.fisher_spectral_norm(model, x)
    torch.testing.assert_close(exact32, reference, rtol=1e-4, atol=0)
    torch.testing.assert_close(fl.fisher_trace(model, x, model_dtype=torch.float64),
                               torch.diagonal(F, dim1=1, dim2=2).sum(1), rtol=1e-9, atol=0)


def test_eigenvector_is_an_eigenvector(model_and_inputs):
    model, x = model_and_inputs
    F = dense_fisher(model, x)
    pair = fl.fisher_top_eigenpair(model, x, model_dtype=torch.float64)
    v = pair.eigenvector.flatten(1)
    Fv = (F @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(Fv, pair.eigenvalue[:, None] * v, rtol=0, atol=1e-9 * pair.eigenvalue.max().item())
    torch.testing.assert_close(v.norm(dim=1), torch.ones(len(x), dtype=torch.float64))


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_iterative_methods_agree_with_exact(model_and_inputs, method):
    model, x = model_and_inputs
    exact = fl.fisher_spectral_norm(model, x)
    pair = fl.fisher_top_eigenpair(model, x, method, tol=1e-10, max_iter=1000)
    torch.testing.assert_close(pair.eigenvalue, exact, rtol=1e-4, atol=0)
    assert (pair.residual <= 1e-3).all()


def test_lanczos_stops_within_num_classes_steps():
    model, x = make_cnn(classes=10), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    pair = fl.fisher_top_eigenpair(model, x, "lanczos", max_iter=100)
    assert pair.steps <= 11  # rank F <= C - 1: the Krylov space is exhausted after at most C steps


def test_hutchinson_converges_as_probes_grow():
    model, x = make_cnn(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    exact = fl.fisher_spectral_norm(model, x)
    errors = []
    for probes in (8, 128, 2048):
        runs = [fl.fisher_spectral_norm(model, x, "hutchinson", num_probes=probes,
                                        generator=torch.Generator().manual_seed(s)) for s in range(4)]
        errors.append(torch.stack([(r - exact).abs() / exact for r in runs]).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_hutchinson_trace_within_its_standard_error():
    model, x = make_cnn(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    exact = fl.fisher_trace(model, x)
    with fl.fisher_operator(model, x) as op:
        estimate = fl.algorithms.hutchinson_trace(op, num_probes=512, generator=torch.Generator().manual_seed(0))
    assert ((estimate.value - exact).abs() <= 4 * estimate.stderr).all()
    assert (estimate.stderr < 0.1 * exact).all()


def test_fisher_is_the_covariance_of_score_gradients():
    """F = Cov_{y~p}[grad_x log p(y|x)], checked by sampling labels y from p."""
    model, x = make_mlp(), torch.randn(1, 7, generator=torch.Generator().manual_seed(5))
    x = x.double().requires_grad_()
    reference = model.double()
    log_p = reference(x).log_softmax(-1)[0]
    grads = torch.stack([torch.autograd.grad(log_p[y], x, retain_graph=True)[0][0] for y in range(5)])
    labels = torch.multinomial(log_p.exp().detach(), 200_000, replacement=True,
                               generator=torch.Generator().manual_seed(0))
    samples = grads[labels]
    empirical = samples.T @ samples / len(samples)
    basis = torch.eye(7, dtype=torch.float64)
    F = fl.fisher_vector_product(model, x.detach().expand(7, 7), basis)
    assert samples.mean(0).norm() < 0.02 * grads.norm(dim=1).max()
    assert (empirical - F).norm() / F.norm() < 0.02
    model.float()


def test_second_order_kl_expansion():
    model, x = make_cnn().double(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6),
                                                dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    quadratic = (v * fl.fisher_vector_product(model, x, v)).flatten(1).sum(1)
    errors = []
    with torch.no_grad():
        log_p = model(x).log_softmax(-1)
        for h in (1e-2, 1e-3):
            log_q = model(x + h * v).log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            errors.append(((2 * kl / h**2 - quadratic).abs() / quadratic).max().item())
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 5  # the error is O(h)


def test_invariant_to_an_input_dependent_logit_shift():
    model, x = make_cnn(), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    def shifted(inputs):
        return model(inputs) + 10 * inputs.flatten(1).sum(1, keepdim=True).sin()

    torch.testing.assert_close(fl.fisher_spectral_norm(shifted, x), fl.fisher_spectral_norm(model, x), rtol=1e-4,
                               atol=0)
    torch.testing.assert_close(fl.fisher_trace(shifted, x), fl.fisher_trace(model, x), rtol=1e-4, atol=0)


def test_trace_brackets_the_spectral_norm():
    model, x = make_cnn(classes=10), torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    lam, trace = fl.fisher_spectral_norm(model, x), fl.fisher_trace(model, x)
    assert (trace / 9 <= lam * (1 + 1e-9)).all() and (lam <= trace * (1 + 1e-9)).all()
    assert (lam < trace).all()


@pytest.mark.parametrize("output", ["probs", "log_probs"])
def test_probabilities_and_log_probabilities_as_outputs(output):
    model, x = make_cnn(), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    def wrapped(inputs):
        return model(inputs).softmax(-1) if output == "probs" else model(inputs).log_softmax(-1)
    for method in ("exact", "lanczos"):
        torch.testing.assert_close(fl.fisher_spectral_norm(wrapped, x, method, output=output),
                                   fl.fisher_spectral_norm(model, x, method), rtol=1e-4, atol=0)


def test_saturated_softmax_stays_accurate_and_nonnegative():
    base = make_mlp()
    def model(inputs):  # margins of tens of nats: p of the runner-up < 1e-15
        return 200 * base(inputs)

    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(11)) * 3
    reference = torch.linalg.eigvalsh(dense_fisher(_Scaled(base, 200), x))[:, -1]
    assert reference.min() < 1e-30 and reference.max() < 1e-6
    lam = fl.fisher_spectral_norm(model, x)
    assert (lam >= 0).all()
    torch.testing.assert_close(lam, reference, rtol=1e-3, atol=0)


class _Scaled(nn.Module):
    def __init__(self, base, scale):
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x):
        return self.scale * self.base(x)


def test_top_k_is_a_lower_bound_with_its_neglected_mass():
    model, x = make_mlp(classes=20), torch.randn(6, 7, generator=torch.Generator().manual_seed(12)) * 4
    exact = fl.fisher_spectral_norm(model, x)
    pair = fl.fisher_top_eigenpair(model, x, "exact", top_k=5, max_neglected_mass=1.0)
    assert (pair.eigenvalue <= exact * (1 + 1e-6)).all()
    p = model(x).softmax(-1).detach().double()
    torch.testing.assert_close(pair.neglected_mass, 1 - p.topk(5).values.sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fl.fisher_spectral_norm(model, x, "exact", top_k=19), exact, rtol=1e-10, atol=0)
    assert pair.steps == 5  # k - 1 kept classes besides the top one, and the merged rest
    bounds = torch.stack([fl.fisher_spectral_norm(model, x, "exact", top_k=k, max_neglected_mass=1.0)
                          for k in range(1, 20)])
    assert (bounds.diff(dim=0) >= -1e-6 * exact).all()  # refining the merged classes only adds information


def test_robustness_radius_is_the_fisher_normalised_margin():
    model, x = make_cnn(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    reference = torch.linalg.eigvalsh(dense_fisher(model, x))[:, -1]
    top2 = copy.deepcopy(model).double()(x.double()).log_softmax(-1).topk(2).values.detach()
    torch.testing.assert_close(fl.fisher_robustness_radius(model, x, model_dtype=torch.float64),
                               (top2[:, 0] - top2[:, 1]) / reference.sqrt(), rtol=1e-6, atol=0)


def test_fisher_step_is_the_distance_to_a_linear_two_class_boundary():
    """Two classes, z = W x + b: F = p1 p2 g g^T, so the Fisher step is |g . x + c| / |g|, the exact L2
    distance to the hyperplane where the prediction flips; a bisection along the normal finds it too."""
    gen = torch.Generator().manual_seed(20)
    linear = nn.Linear(6, 2).double()
    x = 3 * torch.randn(8, 6, generator=gen, dtype=torch.float64)
    g = (linear.weight[0] - linear.weight[1]).detach()
    c = (linear.bias[0] - linear.bias[1]).detach()
    distance = (x @ g + c).abs() / g.norm()
    step = fl.fisher_step(linear, x)
    torch.testing.assert_close(step, distance, rtol=1e-9, atol=0)
    crossing = x - ((x @ g + c) / g.norm() ** 2).unsqueeze(1) * g * (1 + 1e-6)
    assert (linear(crossing).argmax(1) != linear(x).argmax(1)).all()


def test_fisher_step_is_at_most_the_linear_step_with_equality_for_two_classes():
    """s = margin sqrt(p1 p2 / ((p1 + p2) lambda_max)) against a dense float64 F: never above margin / |g|
    (law of total variance), equal to it for a two-class network."""
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(21))
    for classes, equal in ((10, False), (2, True)):
        model = make_cnn(classes=classes)
        reference = torch.linalg.eigvalsh(dense_fisher(model, x))[:, -1]
        top2 = copy.deepcopy(model).double()(x.double()).log_softmax(-1).topk(2).values.detach()
        pair = (top2.sum(1) - top2.logsumexp(1)).exp()
        expected = (top2[:, 0] - top2[:, 1]) * (pair / reference).sqrt()
        scores = fl.fisher_scores(model, x, model_dtype=torch.float64, margin_gradient=True)
        torch.testing.assert_close(scores.fisher_step, expected, rtol=1e-8, atol=0)
        torch.testing.assert_close(fl.fisher_step(model, x, model_dtype=torch.float64), expected, rtol=1e-8, atol=0)
        linear_step = scores.margin / scores.margin_gradient_norm
        if equal:
            torch.testing.assert_close(scores.fisher_step, linear_step, rtol=1e-8, atol=0)
        else:
            assert (scores.fisher_step <= linear_step * (1 + 1e-9)).all()
            assert (scores.fisher_step < 0.99 * linear_step).any()  # other classes do move faster somewhere


def test_chunk_size_does_not_change_the_result():
    model, x = make_cnn(), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    torch.testing.assert_close(fl.fisher_spectral_norm(model, x, chunk_size=3), fl.fisher_spectral_norm(model, x),
                               rtol=1e-6, atol=0)


def test_generator_makes_random_methods_reproducible():
    model, x = make_cnn(), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(15))
    a = fl.fisher_spectral_norm(model, x, "hutchinson", num_probes=16, generator=torch.Generator().manual_seed(1))
    b = fl.fisher_spectral_norm(model, x, "hutchinson", num_probes=16, generator=torch.Generator().manual_seed(1))
    c = fl.fisher_spectral_norm(model, x, "hutchinson", num_probes=16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert math.isfinite(a.sum().item())


def test_top_k_gives_nan_where_the_merged_mass_makes_the_value_a_lower_bound():
    """A near-uniform 1000-class output (an untrained ImageNet head): top_k=20 merges ~98% of the mass, its
    merged lambda_max is several times too low, so it is NaN with a warning naming the samples; a confident
    sample below `max_neglected_mass` keeps its value, equal to the exact one to within the merged mass."""
    torch.manual_seed(0)
    net = nn.Linear(16, 1000)
    x = torch.randn(3, 16) * 0.01
    x[2] = net.weight[7].detach() * 500  # confident: class 7 holds nearly all the mass
    exact = fl.fisher_spectral_norm(net, x, "exact")
    with pytest.warns(RuntimeWarning, match=r"samples 0, 1 of the batch: top_k=20 merged up to 0\.9"):
        pair = fl.fisher_top_eigenpair(net, x, "exact", top_k=20)
    assert torch.isnan(pair.eigenvalue[:2]).all() and pair.neglected_mass[2] < 0.01
    assert (pair.neglected_mass[:2] > 0.9).all()  # the mass is still reported
    torch.testing.assert_close(pair.eigenvalue[2], exact[2], rtol=0.05, atol=0)
    bound = fl.fisher_spectral_norm(net, x, "exact", top_k=20, max_neglected_mass=1.0)
    assert (bound[:2] < exact[:2] / 2).all()  # what the NaN keeps from being read as the value


@pytest.mark.parametrize("classes", [1000, 200])
def test_auto_is_lanczos_for_many_classes_and_exact_for_few_with_the_dense_value(classes):
    """The default method on a 1000- and a 200-class model: equal to the dense float64 eigenvalue (1e-6); with a
    starved Lanczos (max_iter=2) the unconverged samples fall back to the exact route: still the dense value."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, classes))
    x = torch.randn(3, 12)
    reference = torch.linalg.eigvalsh(dense_fisher(net, x))[:, -1]
    pair = fl.fisher_top_eigenpair(net, x, model_dtype=torch.float64)
    torch.testing.assert_close(pair.eigenvalue, reference, rtol=1e-6, atol=0)
    assert pair.steps < classes - 1  # Lanczos, not the C - 1 VJPs of the exact route
    starved = fl.fisher_top_eigenpair(net, x, max_iter=2, model_dtype=torch.float64)
    torch.testing.assert_close(starved.eigenvalue, reference, rtol=1e-10, atol=0)
    assert starved.steps == 2 + classes - 1
    few = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 10))
    assert fl.fisher_top_eigenpair(few, x).steps == 9  # the exact route's C - 1 VJPs


def test_scores_for_many_classes_carry_a_sampled_trace_with_its_error():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 300))
    x = torch.randn(4, 12)
    reference = dense_fisher(net, x).diagonal(dim1=1, dim2=2).sum(1)
    scores = fl.fisher_scores(net, x, model_dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert scores.trace_stderr is not None and (scores.trace_stderr > 0).all()
    assert ((scores.trace - reference).abs() <= 4 * scores.trace_stderr).all()
    assert fl.fisher_scores(net, x, "exact").trace_stderr is None


def test_the_fallback_of_auto_keeps_the_held_batch_statistics_in_train_mode():
    """mode='train' with BatchNorm: the exact route on the unconverged subset normalises by the whole recorded
    batch's statistics, as every other pass does, so it equals the exact route on the whole batch."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 200))
    x = torch.randn(6, 12)
    exact = fl.fisher_spectral_norm(net, x, "exact", mode="train", model_dtype=torch.float64)
    starved = fl.fisher_top_eigenpair(net, x, max_iter=2, mode="train", model_dtype=torch.float64)
    torch.testing.assert_close(starved.eigenvalue, exact, rtol=1e-10, atol=0)
    assert starved.steps == 2 + 199
