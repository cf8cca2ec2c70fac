"""Training-time PGD, CW and TRADES; the ART-based evaluation attacks and CLEVER against closed forms on linear
models."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from recipes.attacks import (
    PGD,
    CarliniWagnerL2,
    TradesPenalty,
    carlini_wagner_l2,
    clever_scores,
    minimal_perturbation,
    pgd_robust,
    robust_accuracy,
)
from tests.conftest import make_cnn


class _Linear2(nn.Module):
    """Two-class logits [0, w.x + b]: the minimal L-inf (L2) flip distance is |w.x + b| / |w|_1 (/ |w|_2)."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, generator=gen)
    x = 0.5 + 0.02 * torch.randn(200, 20, generator=gen)
    model = _Linear2(w, -float(0.5 * w.sum()))
    labels = (model(x).argmax(1)).long()
    return model, x, labels


@pytest.mark.parametrize("norm, dual", [("linf", 1), ("l2", 2)])
def test_robust_accuracy_matches_the_linear_closed_form(norm, dual):
    model, x, labels = _linear_problem()
    margin = (x @ model.w + model.b).abs().detach()
    distance = margin / model.w.detach().norm(p=dual)
    eps = distance.quantile(0.4).item()
    expected = (distance > eps).float().mean().item()
    assert 0.1 < expected < 0.9
    numpy_state = np.random.get_state()[1].copy()
    measured = robust_accuracy(model, x, labels, norm=norm, eps=eps, steps=40, step_size=eps / 8)
    assert measured == pytest.approx(expected, abs=0.01)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_raises_the_loss_and_leaves_the_model_alone(norm, eps):
    model = make_cnn().train()
    x = torch.rand(6, 3, 8, 8)
    y = torch.arange(6) % 10
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    adversarial = PGD(eps=eps, step_size=eps / 4, steps=10, norm=norm)(model, x, labels=y)
    delta = (adversarial - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all() and adversarial.min() >= 0 and adversarial.max() <= 1
    model.eval()
    loss = lambda inputs: nn.functional.cross_entropy(model(inputs), y).item()  # noqa: E731
    assert loss(adversarial) > loss(x)
    model.train()
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


def test_trades_penalty_is_a_nonnegative_differentiable_scalar():
    model = make_cnn().eval()
    x = torch.rand(4, 3, 8, 8)
    value = TradesPenalty(beta=6.0, attack=PGD(steps=3))(model, x)
    assert value.ndim == 0 and value >= 0 and value.requires_grad
    with pytest.raises(ValueError, match="exactly one"):
        PGD()(model, x)


def _multiclass_linear(samples=40, classes=4, dim=12):
    """Logits W x: the L2 distance to the boundary between the top class c and class j is
    (z_c - z_j) / |w_c - w_j|, and the minimal flip distance is the smallest of those."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Linear(dim, classes, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(classes, dim, generator=gen))
    x = 0.5 + 0.01 * torch.randn(samples, dim, generator=gen)  # far from the [0, 1] box: clipping never binds
    with torch.no_grad():
        z = model(x)
        top = z.argmax(1)
        w = model.weight
        gaps = (z.gather(1, top[:, None]) - z) / (w[top][:, None, :] - w[None]).norm(dim=2).clamp_min(1e-30)
        distance = gaps.masked_fill(nn.functional.one_hot(top, classes).bool(), torch.inf).min(1).values
    return model, x, top, distance.double().numpy()


def test_minimal_perturbation_is_the_linear_distance_to_the_boundary():
    model, x, _, distance = _multiclass_linear()
    rng, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    found = minimal_perturbation(model, x, search_steps=12)
    assert (found >= distance * (1 - 1e-4)).all()  # no perturbation smaller than the true minimum flips
    assert np.median(found / distance) < 1.03 and (found / distance).max() < 1.1
    bisection_only = minimal_perturbation(model, x, search_steps=14, deepfool=False)
    assert (bisection_only >= distance * (1 - 1e-4)).all() and np.median(bisection_only / distance) < 1.05
    wide = minimal_perturbation(model, x, search_steps=8, deepfool=False, max_eps=100.0)  # four decades, 8 halvings
    assert (wide >= distance * (1 - 1e-4)).all() and np.median(wide / distance) < 1.05
    assert torch.equal(torch.get_rng_state(), rng) and np.array_equal(np.random.get_state()[1], numpy_state)
    assert all(p.grad is None for p in model.parameters())


def test_clever_of_a_linear_model_is_its_closed_form():
    """A linear model's gradients are constant, so CLEVER's extreme-value estimate is exact:
    min_j (z_c - z_j) / |w_c - w_j|, the distance to the boundary."""
    model, x, _, distance = _multiclass_linear(samples=3)
    np.testing.assert_allclose(clever_scores(model, x, radius=2.0, batches=5, batch_size=5), distance, rtol=1e-4)
    # CLEVER caps its estimate at the sampling radius
    np.testing.assert_allclose(clever_scores(model, x, radius=0.1, batches=5, batch_size=5), 0.1, rtol=1e-6)


def test_per_sample_pgd_and_carlini_wagner_against_the_linear_distance():
    model, x, top, distance = _multiclass_linear()
    eps = float(np.quantile(distance, 0.5))
    robust = pgd_robust(model, x, top, norm="l2", eps=eps, steps=40, step_size=eps / 8)
    assert robust[distance > eps].all()  # no attack crosses a boundary farther than eps
    assert (~robust[distance < 0.99 * eps]).mean() > 0.9
    still_correct, norms = carlini_wagner_l2(model, x, top, const=10.0, steps=100, learning_rate=0.01)
    flipped = ~still_correct
    assert flipped.mean() > 0.5 and (norms[flipped] >= distance[flipped] * (1 - 1e-4)).all()
    assert np.isinf(norms[still_correct]).all()


def test_training_carlini_wagner_flips_linear_predictions_at_their_distance():
    model, x, top, distance = _multiclass_linear()
    rng = torch.get_rng_state()
    adversarial = CarliniWagnerL2(const=20.0, steps=200, learning_rate=0.01)(model, x, labels=top)
    flipped = (model(adversarial).argmax(1) != top).numpy()
    norms = (adversarial - x).flatten(1).norm(dim=1).detach().double().numpy()
    assert flipped.mean() > 0.8
    assert (norms[flipped] >= distance[flipped] * (1 - 1e-4)).all()
    assert np.median(norms[flipped] / distance[flipped]) < 1.5
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="labels only"):
        CarliniWagnerL2()(model, x)


def test_fisher_rao_distance_has_its_closed_form_and_tends_to_the_kl():
    from recipes.attacks import fisher_rao_distance

    p, q = torch.tensor([[0.3, 0.7]], dtype=torch.float64), torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    expected = 2 * math.acos(math.sqrt(0.3 * 0.6) + math.sqrt(0.7 * 0.4))
    assert fisher_rao_distance(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-12)
    base = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    shifted = (base.log() + 1e-3 * torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)).log_softmax(-1)
    kl = (base * (base.log() - shifted)).sum()
    assert fisher_rao_distance(base.log(), shifted).square().item() == pytest.approx(2 * kl.item(), rel=1e-3)


def test_fire_penalty_is_a_differentiable_scalar_and_its_attack_maximises_the_distance():
    from recipes.attacks import FirePenalty, fisher_rao_distance

    model = make_cnn()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    value = FirePenalty(beta=6.0, attack=PGD(steps=3, divergence="fisher_rao"))(model, x)
    assert value.ndim == 0 and value.item() > 0
    value.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    log_p = model(x).log_softmax(-1).detach()
    start = PGD(steps=1, step_size=1e-12, divergence="fisher_rao")(model, x, target_log_probs=log_p)  # the start
    far = PGD(steps=10, divergence="fisher_rao")(model, x, target_log_probs=log_p)  # the same seeded start
    with torch.no_grad():
        moved = fisher_rao_distance(log_p, model(far).log_softmax(-1))
        assert (moved > 2 * fisher_rao_distance(log_p, model(start).log_softmax(-1))).all()
    with pytest.raises(TypeError, match="divergence='fisher_rao'"):
        FirePenalty(attack=PGD())


def test_pgd_reseed_repeats_the_random_starts_and_leaves_the_global_rng_alone():
    """Reseeded, PGD draws its random starts again from the seed (a resumed training run relies on it), without
    touching the global RNG; without a reseed the next call draws new starts."""
    model, x = _Linear2(torch.tensor([1.0, -2.0, 0.5]), 0.1), torch.full((4, 3), 0.5)
    attack = PGD(eps=0.1, step_size=0.01, steps=1)
    attack.reseed(7)
    first = attack(model, x, labels=torch.zeros(4, dtype=torch.long))
    again = attack(model, x, labels=torch.zeros(4, dtype=torch.long))
    state = torch.get_rng_state()
    attack.reseed(7)
    repeated = attack(model, x, labels=torch.zeros(4, dtype=torch.long))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, repeated) and not torch.equal(first, again)
    with pytest.raises(TypeError, match="seed"):
        attack.reseed(1.5)
