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
Prints the tables with the machine line and writes `bench/results/theory_kl.png`. The checks live in
`recipes/theory.py`; `fim-report` runs them on trained recipe runs (`theory_images`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import data_dir, machine, quiet_lightning  # noqa: E402
from fim_lightning.figures import save  # noqa: E402
from fim_lightning.module import ImageClassifier  # noqa: E402
from recipes import statistics, theory  # noqa: E402
from recipes.data import NpzDataModule  # noqa: E402
from recipes.models import SmallCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ImageClassifier(net, 10), data)
    net.eval()
    images, labels = data.splits["test"].tensors
    accuracy = (net(images).argmax(1) == labels).float().mean().item()
    print(f"machine: {machine()}")
    print(f"SmallCNN, {args.epochs} epochs on the CIFAR-10 subset (5,000 images), test accuracy {accuracy:.3f} on "
          f"2,000; {args.images} test images\n")
    checks = theory.theory_checks(net, images[: args.images])
    print("1. Monte-Carlo covariance of the input scores against the exact F (relative Frobenius error)\n")
    print(markdown(theory.covariance_rows(checks)))
    print("\n2. KL(p(x) || p(x + t v)) / (t^2/2 v^T F v), median over images (t: L2 norm of the perturbation, pixels "
          "in [0, 1])\n")
    print(markdown(theory.kl_rows(checks)))
    print(f"\nfirst t where the median ratio leaves [0.9, 1.1]: top eigenvector "
          f"{theory.first_departure(np.median(checks.kl_top, 0)):.3g}, random direction "
          f"{theory.first_departure(np.median(checks.kl_random, 0)):.3g}")
    print(f"plot: {save(theory.kl_figure({'SmallCNN': checks}), RESULTS / 'theory_kl.png')}")


def markdown(rows: list[dict]) -> str:
    return statistics.markdown(rows, list(rows[0]))


if __name__ == "__main__":
    main()
