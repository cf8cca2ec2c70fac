"""Training-time PGD and TRADES, and ART-based robust accuracy against a closed form on a linear model."""
import numpy as np
import pytest
import torch
from torch import nn

from fim_lightning.attacks import PGD, TradesPenalty, robust_accuracy
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
