"""Closed-form Fisher spectral bounds: never below the exact value, exact for linear softmax, exact conv norms."""
import math

import pytest
import torch
from torch import nn

import fim_lightning as fl
from fim_lightning.bounds import fisher_spectral_bound, linear_operator_norm
from fim_lightning.models import SmallCNN
from tests.lightning_helpers import blobs


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (2, 1)])
def test_conv_operator_norm_matches_the_dense_matrix(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding)
    shape = (2, 6, 6)
    basis = torch.eye(72, dtype=torch.float64).view(72, *shape)
    dense = nn.functional.conv2d(basis, conv.weight.double(), None, stride, padding).flatten(1).T
    expected = torch.linalg.matrix_norm(dense, 2).item()
    reshaped_kernel = torch.linalg.matrix_norm(conv.weight.detach().flatten(1).double(), 2).item()
    assert linear_operator_norm(conv, shape) == pytest.approx(expected, rel=1e-5)
    assert linear_operator_norm(conv, shape) >= expected
    assert abs(reshaped_kernel - expected) > 1e-3  # the reshaped kernel matrix is a different number


def test_linear_softmax_bound_is_its_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    bound = fisher_spectral_bound(model, x)
    p = model(x).softmax(-1).detach()
    metric = torch.minimum((2 * p * (1 - p)).max(1).values, p.max(1).values).clamp(max=0.5)
    sigma = torch.linalg.matrix_norm(model[0].weight.detach(), 2)
    torch.testing.assert_close(bound.value, metric * sigma**2, rtol=1e-5, atol=0)
    assert (bound.value >= fl.fisher_spectral_norm(model, x)).all()
    assert fisher_spectral_bound(model, input_shape=(6,)).value.item() == pytest.approx(0.5 * sigma.item() ** 2, rel=1e-5)


def _trained_cnn(epochs):
    torch.manual_seed(0)
    model = SmallCNN(1, 4, widths=(4, 8)).eval()
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = blobs(n=64).tensors[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        model.train()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), images


@pytest.mark.parametrize("epochs", [0, 30])
def test_bound_is_never_below_the_exact_value(epochs):
    model, images = _trained_cnn(epochs)
    bound = fisher_spectral_bound(model, images)
    exact = fl.fisher_spectral_norm(model, images)
    assert (bound.value >= exact).all()
    assert [name for name, _ in bound.layers][:3] == ["0", "1", "2"]
    assert bound.lipschitz == pytest.approx(math.prod(v for _, v in bound.layers), rel=1e-12)


def test_unknown_modules_raise():
    with pytest.raises(TypeError, match="LayerNorm"):
        fisher_spectral_bound(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), input_shape=(4,))
    with pytest.raises(TypeError, match="nn.Sequential"):
        fisher_spectral_bound(nn.Linear(4, 2), input_shape=(4,))
