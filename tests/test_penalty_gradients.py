"""Every penalty's gradient through every normalisation layer and attention, against finite differences of an
independent dense float64 value; the forward-mode estimators (power, Lanczos) on the same layers.

The reference never differentiates twice: a per-sample function, its dense reverse-mode Jacobian, F = J^T M J
and its eigenvalues in float64, then central differences of that value along a random parameter direction.
BatchNorm with batch statistics (the penalties' default `mode="train"`) is written out by hand: each sample
normalised by the mean and biased variance of the clean batch at the same parameters.
"""
import copy

import pytest
import torch
from torch import nn

import fim_lightning as fl
from fim_lightning.sampling import rademacher, random_unit
from tests.conftest import AttentionClassifier

SEED = 3


def _dense(model_fn, x):
    """(B, d, d) Fisher and (B, C) log-probabilities of the per-sample function `model_fn` at each row of x."""
    fishers, log_probs = [], []
    for xi in x:
        logits = model_fn(xi[None])[0]
        p = logits.softmax(-1)
        jac = torch.autograd.functional.jacobian(lambda v: model_fn(v[None])[0], xi).reshape(len(p), -1)
        fishers.append(jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac)
        log_probs.append(logits.log_softmax(-1))
    return torch.stack(fishers), torch.stack(log_probs)


def _mlp(norm, d=6, hidden=8, classes=4):
    return nn.Sequential(nn.Linear(d, hidden), norm, nn.Tanh(), nn.Linear(hidden, classes))


def _randomise_affine(model):
    """Non-trivial affine parameters and running statistics, so that no layer is the identity."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.InstanceNorm2d)) and \
                        t is not None:
                    t.copy_(t + 0.3 * torch.randn(t.shape, generator=generator, dtype=t.dtype))
            if isinstance(m, nn.BatchNorm1d):
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator, dtype=torch.float64))
    return model


def _held_batchnorm(model, batch):
    """x -> model(x) with the BatchNorm1d layer normalising by the batch statistics of `batch` (held fixed)."""
    linear, norm, act, head = model
    h = linear(batch)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    return lambda x: head(act((linear(x) - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias))


# name -> (model factory, input shape, penalty mode, per-sample function factory (model, batch) -> callable)
CASES = {
    "batchnorm_eval": (lambda: _mlp(nn.BatchNorm1d(8)), (6,), "eval", lambda m, b: m.eval()),
    "batchnorm_batch_statistics": (lambda: _mlp(nn.BatchNorm1d(8)), (6,), "train", _held_batchnorm),
    "layernorm": (lambda: _mlp(nn.LayerNorm(8)), (6,), "train", lambda m, b: m),
    "groupnorm": (lambda: _mlp(nn.GroupNorm(2, 8)), (6,), "train", lambda m, b: m),
    "rmsnorm": (lambda: _mlp(nn.RMSNorm(8)), (6,), "train", lambda m, b: m),
    "instancenorm": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True),
                                           nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4)),
                     (1, 4, 4), "train", lambda m, b: m),
    "attention_layernorm": (lambda: AttentionClassifier(embed=4, heads=2, classes=3), (3, 4), "train",
                            lambda m, b: m),
}


def _case(name):
    make, shape, mode, per_sample = CASES[name]
    torch.manual_seed(0)
    model = _randomise_affine(make().double())
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x, mode, per_sample


def _kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _reference(kind, step_size=1e-2):
    """The penalty's value (weight 1) from the dense float64 per-sample function, with the penalty's own draws."""

    def spectral(fn, x):
        return torch.linalg.eigvalsh(_dense(fn, x)[0])[:, -1].mean()

    def trace(fn, x):
        generator = torch.Generator().manual_seed(SEED)
        fisher = _dense(fn, x)[0]
        probes = [rademacher(x.shape, x, generator).flatten(1) for _ in range(2)]
        return sum(torch.einsum("bi,bij,bj->b", z, fisher, z) for z in probes).mean() / 2

    def kl(fn, x, scale):
        u = random_unit(x, torch.Generator().manual_seed(SEED))
        log_p, log_q = fn(x).log_softmax(-1), fn(x + step_size * u).log_softmax(-1)
        return (scale * 2 * _kl(log_p, log_q) / step_size**2).mean()

    return {
        "spectral": spectral,
        "trace": trace,
        "kl": lambda fn, x: kl(fn, x, x[0].numel()),
        "worst_direction": lambda fn, x: kl(fn, x, 1),
    }[kind]


PENALTIES = {
    "spectral": lambda mode: fl.FisherSpectralPenalty(eigenvector="exact", weight=1.0, mode=mode, seed=SEED),
    "trace": lambda mode: fl.FisherTracePenalty(num_probes=2, weight=1.0, mode=mode, seed=SEED),
    "kl": lambda mode: fl.FisherKLPenalty(step_size=1e-2, weight=1.0, mode=mode, seed=SEED),
    # power_steps=0: v is the seeded random start, so the reference knows it; the gradient flows through the
    # same last forward as with power steps (v is held fixed)
    "worst_direction": lambda mode: fl.FisherWorstDirectionPenalty(step_size=1e-2, power_steps=0, weight=1.0,
                                                                    mode=mode, seed=SEED),
}


@pytest.mark.parametrize("penalty_name", sorted(PENALTIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_penalty_gradient_matches_finite_differences_of_the_dense_value(case, penalty_name):
    model, x, mode, per_sample = _case(case)
    reference = _reference(penalty_name)
    value = PENALTIES[penalty_name](mode)(model, x)
    torch.testing.assert_close(value, reference(per_sample(copy.deepcopy(model), x), x), rtol=1e-7, atol=0)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(value, params)
    generator = torch.Generator().manual_seed(11)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    h, values = 1e-4, {}  # the KL forms are differences of log-probabilities: a smaller h meets rounding
    for step in (2, 1, -1, -2):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction):
                p.add_(step * h * d)
        values[step] = reference(per_sample(shifted, x), x)
    numeric = (8 * (values[1] - values[-1]) - (values[2] - values[-2])) / (12 * h)  # error O(h^4)
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9 * value.item())


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_mode_estimators_match_the_dense_spectral_norm(case, method):
    model, x, mode, per_sample = _case(case)
    expected = torch.linalg.eigvalsh(_dense(per_sample(copy.deepcopy(model), x), x)[0])[:, -1]
    estimate = fl.fisher_spectral_norm(model, x, method, mode=mode, max_iter=400 if method == "power" else 64,
                                       tol=1e-13, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(fl.fisher_spectral_norm(model, x, mode=mode), expected, rtol=1e-9, atol=0)


def test_elementary_normalisation_keeps_values_and_running_statistics():
    """Inside the mode every normalisation gives the fused kernel's output and running-statistic update."""
    from fim_lightning.normalisation import elementary_normalisation

    x2, x4 = torch.randn(6, 8, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    layers = [(nn.LayerNorm(8), x2), (nn.RMSNorm(8), x2), (nn.RMSNorm(8, eps=1e-3), x2), (nn.GroupNorm(2, 4), x4),
              (nn.BatchNorm1d(8), x2), (nn.BatchNorm2d(4), x4), (nn.InstanceNorm2d(4, affine=True), x4),
              (nn.InstanceNorm2d(4, track_running_stats=True), x4)]
    for layer, x in layers:
        layer = _randomise_affine(layer.double())
        for training in (True, False):
            fused, elementary = copy.deepcopy(layer).train(training), copy.deepcopy(layer).train(training)
            expected = fused(x)
            with elementary_normalisation():
                got = elementary(x)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{layer} training={training}")
            for a, b in zip(elementary.buffers(), fused.buffers()):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=f"{layer} buffers")
