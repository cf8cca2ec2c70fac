"""Black-box lambda_max error against queries, beside the white-box exact value and the SRP statistic.

Trains the recipes' SmallCNN on the offline CIFAR-10 subset for a few epochs, then on `--images` test images
compares `blackbox_fisher` (probabilities only) at several budgets with the white-box exact lambda_max, and
reports the statistic of the paper's public code (franz-chang/SRP): the maximum over 200 random unit
directions of the one-sided finite-difference form 2 KL(p(x) || p(x + h u)) / h^2 (201 queries).
Both finite-difference schemes (central: two queries per probe; forward, the default: one). Beside the
errors: the chi-square floor of any estimator from K random probes, 0.674 sqrt(2 (d - K) / (K (d - 1))),
and how much of the top eigenvector's energy lies in subspaces an adaptive scheme could aim at (low spatial
frequencies, colour-shared directions, the top eigenvectors of other images).

    python bench/blackbox.py [--images 100] [--epochs 3]
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import data_dir, machine, quiet_lightning  # noqa: E402
from recipes.data import NpzDataModule  # noqa: E402
from fim_lightning.figures import new_figure, save  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402
from fim_lightning.module import ImageClassifier  # noqa: E402

BUDGETS = (33, 65, 129, 257, 513, 1025)


def srp_statistic(predict, x: torch.Tensor, directions: int = 200, h: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """max_u 2 KL(p(x) || p(x + h u)) / h^2 over random unit u: 1 + `directions` queries per sample."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn((directions, *x.shape), generator=gen)
    u = u / u.flatten(2).norm(dim=2).view(directions, len(x), 1, 1, 1)
    with torch.no_grad():
        log_p = predict(x).log()
        log_q = predict((x + h * u).flatten(0, 1)).log().view(directions, len(x), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (2 * kl / h**2).max(0).values.double()


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n, n)."""
    k = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis


def energy_fractions(vectors: torch.Tensor) -> dict[str, float]:
    """Median share of |v|^2 of unit eigenvectors (N, C, H, W) in subspaces known before any query."""
    v = vectors.double()
    total = v.pow(2).sum((1, 2, 3))
    height, width = v.shape[-2:]
    coefficients = torch.einsum("ki,ncij,lj->nckl", dct_matrix(height), v, dct_matrix(width))
    low = coefficients[..., : height // 2, : width // 2].pow(2).sum((1, 2, 3))
    shared = v.mean(1, keepdim=True).pow(2).sum((1, 2, 3)) * v.shape[1]
    half = len(v) // 2
    basis = torch.linalg.svd(v[:half].flatten(1), full_matrices=False).Vh[:half]
    others = (v[half:].flatten(1) @ basis.T).pow(2).sum(1)
    d = v[0].numel()
    return {
        f"lowest quarter of spatial frequencies ({d // 4} dims)": (low / total).median().item(),
        f"colour-shared directions ({d // v.shape[1]} dims)": (shared / total).median().item(),
        f"top eigenvectors of {half} other images ({half} dims)": (others / total[half:]).median().item(),
    }


def main() -> None:
    quiet_lightning()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    pl.seed_everything(0, workers=True)
    data = NpzDataModule(str(data_dir() / "cifar10_subset.npz"), num_classes=10, in_channels=3, batch_size=128)
    module = ImageClassifier(SmallCNN(3, 10), 10, optimizer=partial(torch.optim.Adam, lr=3e-3))
    pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=data)
    net = module.net.eval()
    x = data.splits["test"].tensors[0][: args.images]
    pair = fl.fisher_top_eigenpair(net, x)
    exact = pair.eigenvalue
    trace = fl.fisher_trace(net, x)
    predict = lambda inputs: net(inputs).softmax(-1)  # noqa: E731
    print(f"machine: {machine()}")
    print(f"SmallCNN trained {args.epochs} epochs on the CIFAR-10 subset; {len(x)} test images; "
          f"median exact lambda_max {exact.median():.4g}, median tr F {trace.median():.4g}\n")
    print("| estimator | queries / sample | probes K | median rel. error of lambda_max | 90th pct rel. error | "
          "chi-square floor |")
    print("|---|---:|---:|---:|---:|---:|")
    medians, floors, d = {}, {}, x[0].numel()
    for difference, per_probe in (("central", 2), ("forward", 1)):
        for budget in BUDGETS:
            estimate = fl.blackbox_fisher(predict, x, budget, difference=difference, max_batch=4096)
            error = (estimate.spectral_norm - exact).abs() / exact
            probes = (int(estimate.queries.max()) - 1) // per_probe
            floor = 0.674 * math.sqrt(2 * (d - probes) / (probes * (d - 1)))
            medians.setdefault(difference, []).append(error.median().item())
            floors.setdefault(difference, []).append(floor)
            print(f"| Gram sketch, {difference} differences (this package) | {int(estimate.queries.max())} | "
                  f"{probes} | {error.median():.3f} | {error.quantile(0.9):.3f} | {floor:.3f} |")
    srp = srp_statistic(predict, x)
    ratio = srp / exact
    print(f"| SRP statistic (max over 200 directions) | 201 | 200 | {(ratio - 1).abs().median():.3f} | "
          f"{(ratio - 1).abs().quantile(0.9):.3f} | |")
    print(f"\nSRP statistic / lambda_max: median {ratio.median():.4f}; SRP / (tr F / d): median "
          f"{(srp / (trace / x[0].numel())).median():.2f}")
    print("\nShare of the top eigenvector's energy in subspaces fixed before querying (median over images; "
          "a random subspace of k dims holds k / d):")
    for name, share in energy_fractions(pair.eigenvector).items():
        print(f"- {name}: {share:.3f}")
    figure = new_figure()
    ax = figure.add_subplot()
    for difference in medians:
        line, = ax.loglog(BUDGETS, medians[difference], marker="o", label=f"Gram sketch, {difference} differences")
        ax.loglog(BUDGETS, floors[difference], linestyle="--", color=line.get_color(),
                  label=f"chi-square floor, K of {difference}")
    ax.set_xlabel("queries per sample")
    ax.set_ylabel("median relative error of lambda_max")
    ax.legend()
    print("plot:", save(figure, Path(__file__).parent / "results" / "blackbox_error.png"))


if __name__ == "__main__":
    main()
