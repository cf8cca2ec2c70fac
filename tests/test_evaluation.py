"""RobustnessEvaluation columns against closed forms on a linear softmax model and against the functional API."""
import numpy as np
import pytest
import torch
from torch import nn

import fim_lightning as fl
from recipes.evaluation import (BlackBoxColumn, BoundColumn, CleverColumn, FisherColumns, MinimalPerturbationColumn,
                                PGDColumn, RobustnessEvaluation)
from tests.conftest import make_cnn
from tests.test_attacks import _multiclass_linear


def test_columns_of_a_linear_model_match_their_closed_forms():
    model, x, top, distance = _multiclass_linear(samples=20, dim=6)
    labels = top.clone()
    labels[:5] = (labels[:5] + 1) % 4  # five misclassified samples
    rng = torch.get_rng_state()
    columns = {"blackbox": BlackBoxColumn(queries=13), "bound": BoundColumn(),
               "pgd_linf": PGDColumn("linf", 8 / 255, steps=40), "pgd_l2": PGDColumn("l2", 0.5, steps=40),
               "minimal_perturbation": MinimalPerturbationColumn(search_steps=12, steps=40),
               "clever": CleverColumn(samples=2, radius=2.0)}
    table = RobustnessEvaluation(columns=columns, batch_size=8, progress=False)(model, x, labels)
    assert torch.equal(torch.get_rng_state(), rng)
    w, xd = model.weight.detach().double(), x.double()
    p = (xd @ w.T).softmax(-1)
    metric = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    exact = torch.linalg.eigvalsh(w.T @ metric @ w)[:, -1]  # F = W^T M W
    np.testing.assert_allclose(table["lambda_max"], exact.numpy(), rtol=1e-5)
    np.testing.assert_allclose(table["trace"], torch.einsum("ij,bjk,ik->b", w.T, metric, w.T).numpy(), rtol=1e-5)
    z = xd @ w.T
    second = z.topk(2, dim=1).indices[:, 1]
    np.testing.assert_array_equal(table["prediction"], top.numpy())
    np.testing.assert_allclose(table["margin"], (z.gather(1, top[:, None]) - z.gather(1, second[:, None]))[:, 0],
                               rtol=1e-5)
    np.testing.assert_allclose(table["radius"], table["margin"] / np.sqrt(table["lambda_max"]), rtol=1e-6)
    np.testing.assert_allclose(table["grad_norm"], (w[top] - w[second]).norm(dim=1).numpy(), rtol=1e-5)
    # linear model: the linear step margin / |w_top - w_second| is the exact distance to that decision boundary
    np.testing.assert_allclose(table["linear_step"], table["margin"] / (w[top] - w[second]).norm(dim=1).numpy(),
                               rtol=1e-5)
    # the Fisher step: margin sqrt(p1 p2 / ((p1 + p2) lambda_max)) with the closed-form F, <= the linear step
    top2 = p.topk(2, dim=1).values
    np.testing.assert_allclose(table["fisher_step"], table["margin"] * np.sqrt(
        (top2.prod(1) / top2.sum(1)).numpy() / exact.numpy()), rtol=1e-5)
    assert (table["fisher_step"] <= table["linear_step"] * (1 + 1e-6)).all()
    # d = 6 and 13 queries: the orthonormal frame spans the input space, exact up to finite differences
    np.testing.assert_allclose(table["lambda_max_blackbox"], table["lambda_max"], rtol=1e-3)
    assert (table["bound"] >= table["lambda_max"]).all()
    np.testing.assert_array_equal(table["correct"], np.arange(20) >= 5)
    assert (table["min_perturbation"] >= distance * (1 - 1e-4)).all()
    assert np.median(table["min_perturbation"] / distance) < 1.03
    np.testing.assert_allclose(table["clever"][:2], distance[:2], rtol=1e-4)
    assert np.isnan(table["clever"][2:]).all()
    assert not table["pgd_l2_robust"][:5].any()  # misclassified samples are never robust
    assert len({len(column) for column in table.values()}) == 1 and "cw_robust" not in table


def test_top_k_reports_the_merged_mass_and_stays_a_lower_bound():
    model = make_cnn(classes=10)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    evaluation = RobustnessEvaluation(FisherColumns(top_k=3), progress=False)
    with pytest.warns(RuntimeWarning, match=r"top_k=3 merged .* lower bound"):
        table = evaluation(model, x, torch.zeros(4, dtype=torch.long))
    full = fl.fisher_spectral_norm(model, x).numpy()
    p = model(x).softmax(-1).detach().sort(dim=1, descending=True).values
    np.testing.assert_allclose(table["neglected_mass"], p[:, 3:].sum(1).numpy(), rtol=1e-5)
    coarse = table["neglected_mass"] > 0.01  # those values would be lower bounds: NaN, named in the warning
    assert coarse.any() and np.isnan(table["lambda_max"][coarse]).all()
    kept = table["lambda_max"][~coarse]
    assert (kept <= full[~coarse] * (1 + 1e-6)).all() and (kept > 0).all()
    assert set(table) == {"index", "label", "lambda_max", "trace", "radius", "fisher_step", "prediction", "margin",
                          "grad_norm",
                          "linear_step", "neglected_mass", "correct"}


def test_label_count_errors():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        RobustnessEvaluation(progress=False)(nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
