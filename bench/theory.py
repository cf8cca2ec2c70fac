"""The paper's two statements on a trained model: F is the covariance of the input scores, and the KL is
quadratic in the input perturbation with curvature F, up to a size this measures.

    python bench/theory.py [--epochs 4] [--images 20]

Trains the recipes' SmallCNN on the offline CIFAR-10 subset (pixels in [0, 1]), then on the first `--images`
test images:
1. F(x) = E_{y~p}[g_y g_y^T], g_y = grad_x log p(y|x): the Monte-Carlo estimate from N labels drawn from p
   against the exact F, as the relative Frobenius error (computed in the C x C Gram space of the g_y), median
   over images and its spread over 5 draws, for N = 10 ... 10^4: it falls like 1/sqrt(N), as an unbiased
   estimate must.
2. KL(p(x) || p(x + t v)) against t^2/2 v^T F v for the top eigenvector v and random unit directions, t from
   1e-3 to 3 in pixel units (L2 norm of the perturbation): the ratio, and the first t where it leaves [0.9, 1.1].
Prints the tables with the machine line and writes `bench/results/theory_kl.png`.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import data_dir, machine, quiet_lightning  # noqa: E402
from fim_lightning.figures import new_figure, save  # noqa: E402
from fim_lightning.sampling import unit  # noqa: E402
from fim_lightning.module import ImageClassifier  # noqa: E402
from recipes.data import NpzDataModule  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def score_gradients(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, d) gradients g_y = grad_x log p(y|x) of one image, in float64, and p."""
    x = x[None].double().requires_grad_(True)
    log_p = net(x).log_softmax(-1)[0]
    grads = torch.stack([torch.autograd.grad(log_p[y], x, retain_graph=True)[0].flatten() for y in range(len(log_p))])
    return grads, log_p.exp().detach()


def covariance_errors(grads: torch.Tensor, p: torch.Tensor, draws: list[int], repeats: int, seed: int) -> np.ndarray:
    """Relative Frobenius error of the N-sample second moment of g_y (y ~ p) against F = sum_y p_y g_y g_y^T,
    (len(draws), repeats). With K = G G^T: |G^T W G|_F^2 = tr(W K W K) for diagonal W."""
    gram = grads @ grads.T
    norm = lambda w: torch.sqrt(torch.trace(torch.diag(w) @ gram @ torch.diag(w) @ gram)).item()  # noqa: E731
    exact = norm(p)
    generator = torch.Generator().manual_seed(seed)
    errors = np.zeros((len(draws), repeats))
    for i, count in enumerate(draws):
        for r in range(repeats):
            labels = torch.multinomial(p, count, replacement=True, generator=generator)
            frequencies = torch.bincount(labels, minlength=len(p)).double() / count
            errors[i, r] = norm(frequencies - p) / exact
    return errors


def kl_ratios(net64: torch.nn.Module, x: torch.Tensor, directions: torch.Tensor, steps: np.ndarray) -> np.ndarray:
    """KL(p(x) || p(x + t v)) / (t^2 / 2 v^T F v) for each direction v (rows) and step t, in float64."""
    with torch.no_grad():
        log_p = net64(x[None].double()).log_softmax(-1)
        curvature = (directions.double() * fl.fisher_vector_product(
            net64, x[None].double().expand(len(directions), *x.shape), directions.double())).flatten(1).sum(1)
        ratios = np.zeros((len(directions), len(steps)))
        for j, t in enumerate(steps):
            log_q = net64(x[None].double() + t * directions.double()).log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            ratios[:, j] = (kl / (0.5 * t**2 * curvature)).numpy()
    return ratios


def first_departure(ratios: np.ndarray, steps: np.ndarray, tolerance: float = 0.1) -> float:
    outside = np.abs(ratios - 1) > tolerance
    return float(steps[np.argmax(outside)]) if outside.any() else float("inf")


def main() -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    pl.seed_everything(0)
    data = NpzDataModule(str(data_dir() / "cifar10_subset.npz"), num_classes=10, in_channels=3, batch_size=128)
    data.setup()
    net = SmallCNN(3, 10)
    module = ImageClassifier(net, 10)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    net.eval()
    images, labels = data.splits["test"].tensors
    images = images[: args.images]
    net64 = copy.deepcopy(net).double().eval()
    accuracy = (net(data.splits["test"].tensors[0]).argmax(1) == labels).float().mean().item()
    print(f"machine: {machine()}")
    print(f"SmallCNN, {args.epochs} epochs on the CIFAR-10 subset (5,000 images), test accuracy {accuracy:.3f} on "
          f"2,000; {args.images} test images\n")

    draws, repeats = [10, 100, 1000, 10000], 5
    errors = np.stack([covariance_errors(*score_gradients(net64, x), draws, repeats, seed=i)
                       for i, x in enumerate(images)])  # (images, draws, repeats)
    print("1. Monte-Carlo covariance of the input scores against the exact F (relative Frobenius error)\n")
    print("| labels drawn N | median error | spread over 5 draws (median std) | median error x sqrt(N) |")
    print("|---:|---:|---:|---:|")
    for i, count in enumerate(draws):
        median = np.median(errors[:, i].mean(1))
        print(f"| {count} | {median:.4f} | {np.median(errors[:, i].std(1)):.4f} | {median * np.sqrt(count):.3f} |")

    steps = np.geomspace(1e-3, 3.0, 18)
    generator = torch.Generator().manual_seed(0)
    top, random = [], []
    for x in images:
        pair = fl.fisher_top_eigenpair(net64, x[None].double())
        vectors = torch.cat([pair.eigenvector, unit(torch.randn((3, *x.shape), generator=generator,
                                                                            dtype=torch.float64))])
        ratios = kl_ratios(net64, x, vectors, steps)
        top.append(ratios[0])
        random.extend(ratios[1:])
    top, random = np.array(top), np.array(random)
    print("\n2. KL(p(x) || p(x + t v)) / (t^2/2 v^T F v), median over images (t: L2 norm of the perturbation, pixels "
          "in [0, 1])\n")
    print("| t | top eigenvector | random direction |\n|---:|---:|---:|")
    for j in range(0, len(steps), 2):
        print(f"| {steps[j]:.3g} | {np.median(top[:, j]):.3f} | {np.median(random[:, j]):.3f} |")
    print(f"\nfirst t where the median ratio leaves [0.9, 1.1]: top eigenvector "
          f"{first_departure(np.median(top, 0), steps):.3g}, random direction "
          f"{first_departure(np.median(random, 0), steps):.3g}")
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    for name, values in (("top eigenvector", top), ("random direction", random)):
        ax.plot(steps, np.median(values, 0), marker="o", label=f"{name} (median)")
        ax.fill_between(steps, *np.quantile(values, [0.1, 0.9], axis=0), alpha=0.2, label=f"{name} (10-90%)")
    ax.axhspan(0.9, 1.1, color="grey", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("t = |perturbation| (L2, pixels in [0, 1])")
    ax.set_ylabel("KL / (t^2/2 v^T F v)")
    ax.set_title("where the quadratic model of the KL holds", fontsize="small")
    ax.legend(fontsize="x-small")
    print(f"plot: {save(figure, RESULTS / 'theory_kl.png')}")


if __name__ == "__main__":
    main()
