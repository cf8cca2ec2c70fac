"""The paper's two statements checked on a trained model, per image:

1. F(x) = E_{y~p}[g_y g_y^T], g_y = grad_x log p(y|x): the second moment of N labels drawn from p against the
   exact F, as the relative Frobenius error (in the C x C Gram space of the g_y). An unbiased Monte-Carlo
   estimate has error ~ c / sqrt(N) once N is well above 1 / p of the classes that carry F (a confident
   model needs many draws to see its rare labels): `covariance_errors` for N = 10 ... 10^6.
2. KL(p(x) || p(x + t v)) = t^2/2 v^T F v + O(t^3): the ratio of the two along the top eigenvector of F and
   along random unit directions for t (the L2 size of the perturbation, pixels in [0, 1]) from 1e-3 to 3,
   and the first t where the ratio leaves [0.9, 1.1] (`first_departure`). The expansion needs the network
   to be differentiable at x: at a max-pool tie (flat image backgrounds make many) or a ReLU at exactly 0,
   autograd's J is one one-sided choice, and the ratio stays away from 1 however small t is.
Everything in float64 on a copy of the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import fim_lightning as fl
from fim_lightning.figures import new_figure
from fim_lightning.sampling import unit

LABEL_DRAWS = (10, 10**2, 10**3, 10**4, 10**5, 10**6)
STEPS = np.geomspace(1e-3, 3.0, 18)


@dataclass(frozen=True)
class TheoryChecks:
    """Per image: `covariance` (images, len(LABEL_DRAWS), repeats) relative errors; `kl_top` (images,
    len(STEPS)) and `kl_random` (images x directions, len(STEPS)) ratios KL / (t^2/2 v^T F v)."""

    covariance: np.ndarray
    kl_top: np.ndarray
    kl_random: np.ndarray


def score_gradients(net64: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(C, d) gradients g_y = grad_x log p(y|x) of one image, in float64, and p."""
    x = x[None].double().requires_grad_(True)
    log_p = net64(x).log_softmax(-1)[0]
    grads = torch.stack([torch.autograd.grad(log_p[y], x, retain_graph=True)[0].flatten() for y in range(len(log_p))])
    return grads, log_p.exp().detach()


def covariance_errors(grads: Tensor, p: Tensor, draws: tuple[int, ...], repeats: int, seed: int) -> np.ndarray:
    """Relative Frobenius error of the N-sample second moment of g_y (y ~ p) against F = sum_y p_y g_y g_y^T,
    (len(draws), repeats). With K = G G^T: |G^T W G|_F^2 = tr(W K W K) for diagonal W."""
    gram = grads @ grads.T
    norm = lambda w: torch.sqrt(torch.trace(torch.diag(w) @ gram @ torch.diag(w) @ gram)).item()  # noqa: E731
    exact = norm(p)
    rng = np.random.default_rng(seed)
    probabilities = (p / p.sum()).numpy()
    errors = np.zeros((len(draws), repeats))
    for i, count in enumerate(draws):
        for r in range(repeats):  # the label counts of `count` draws from p (multinomial, exact at any count)
            frequencies = torch.from_numpy(rng.multinomial(count, probabilities) / count)
            errors[i, r] = norm(frequencies - p) / exact
    return errors


def kl_ratios(net64: nn.Module, x: Tensor, directions: Tensor, steps: np.ndarray) -> np.ndarray:
    """KL(p(x) || p(x + t v)) / (t^2 / 2 v^T F v) for each direction v (rows) and step t, in float64."""
    x = x[None].double()
    directions = directions.double()
    with torch.no_grad():
        log_p = net64(x).log_softmax(-1)
        curvature = (directions * fl.fisher_vector_product(net64, x.expand_as(directions),
                                                           directions)).flatten(1).sum(1)
        ratios = np.zeros((len(directions), len(steps)))
        for j, t in enumerate(steps):
            log_q = net64(x + t * directions).log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            ratios[:, j] = (kl / (0.5 * t**2 * curvature)).numpy()
    return ratios


def first_departure(ratios: np.ndarray, steps: np.ndarray = STEPS, tolerance: float = 0.1) -> float:
    """The first step where `ratios` leaves [1 - tolerance, 1 + tolerance] (inf if never)."""
    outside = np.abs(ratios - 1) > tolerance
    return float(steps[np.argmax(outside)]) if outside.any() else float("inf")


def theory_checks(net: nn.Module, images: Tensor, repeats: int = 5, random_directions: int = 3,
                  seed: int = 0) -> TheoryChecks:
    """Both checks on `images` (pixels, (N, ...)) with a float64 copy of `net` in eval mode."""
    net64 = copy.deepcopy(net).double().eval()
    covariance = np.stack([covariance_errors(*score_gradients(net64, x), LABEL_DRAWS, repeats, seed=seed + i)
                           for i, x in enumerate(images)])
    generator = torch.Generator().manual_seed(seed)
    top, random = [], []
    for x in images:
        pair = fl.fisher_top_eigenpair(net64, x[None].double())
        noise = torch.randn((random_directions, *x.shape), generator=generator, dtype=torch.float64)
        ratios = kl_ratios(net64, x, torch.cat([pair.eigenvector, unit(noise)]), STEPS)
        top.append(ratios[0])
        random.extend(ratios[1:])
    return TheoryChecks(covariance, np.array(top), np.array(random))


def covariance_rows(checks: TheoryChecks) -> list[dict]:
    """Per N: median error over images (of the mean over repeats), median spread, median error x sqrt(N)."""
    rows = []
    for i, count in enumerate(LABEL_DRAWS):
        median = float(np.median(checks.covariance[:, i].mean(1)))
        rows.append({"labels drawn N": count, "median error": median,
                     "spread over draws": float(np.median(checks.covariance[:, i].std(1))),
                     "median error x sqrt(N)": median * np.sqrt(count)})
    return rows


def kl_rows(checks: TheoryChecks, every: int = 2) -> list[dict]:
    """Per step t: the median ratio along the top eigenvector and along random directions."""
    return [{"t": float(STEPS[j]), "top eigenvector": float(np.median(checks.kl_top[:, j])),
             "random direction": float(np.median(checks.kl_random[:, j]))} for j in range(0, len(STEPS), every)]


def kl_figure(checks: dict[str, TheoryChecks]) -> Figure:
    """Median KL ratio against t per model (top eigenvector solid, random dashed), the [0.9, 1.1] band grey."""
    figure = new_figure(7.0, 4.5)
    ax = figure.add_subplot()
    for index, (name, check) in enumerate(checks.items()):
        colour = f"C{index}"
        ax.plot(STEPS, np.median(check.kl_top, 0), color=colour, marker="o", markersize=3,
                label=f"{name}: top eigenvector")
        ax.plot(STEPS, np.median(check.kl_random, 0), color=colour, linestyle="--", label=f"{name}: random")
    ax.axhspan(0.9, 1.1, color="grey", alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t = |perturbation| (L2, pixels in [0, 1])")
    ax.set_ylabel("KL(p(x) || p(x + t v)) / (t^2/2 v^T F v), median")
    ax.set_title("where the quadratic model of the KL holds (grey: within 10%)", fontsize="small")
    ax.legend(fontsize="xx-small", ncol=2)
    return figure
