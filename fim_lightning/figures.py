"""Matplotlib figures of Fisher scores: histogram, curves over training, top eigenvectors as images.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, so the user's pyplot backend and
global figure state are never touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def new_figure(width: float = 5.0, height: float = 3.5) -> Figure:
    """An empty figure on its own Agg canvas (no pyplot, no global state)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def histogram_figure(values: Tensor, title: str) -> Figure:
    figure = new_figure()
    ax = figure.add_subplot()
    ax.hist(values.detach().cpu().double().numpy(), bins=30)
    ax.set_xlabel(title)
    ax.set_ylabel("samples")
    return figure


def curves_figure(history: Sequence[dict], keys: Sequence[str], title: str) -> Figure:
    """One line per key of the history records, against their global step."""
    figure = new_figure()
    ax = figure.add_subplot()
    steps = [record["step"] for record in history]
    for key in keys:
        ax.plot(steps, [record[key] for record in history], marker="o", label=key)
    ax.set_xlabel("global step")
    ax.set_ylabel(title)
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return figure


def as_images(vectors: Tensor) -> list[np.ndarray]:
    """Input-space directions (N, C, H, W) with C in {1, 3} -> HxW(x3) arrays in [0, 1], mid-grey = 0."""
    images = []
    for v in vectors.detach().cpu().double():
        scale = v.abs().max().clamp_min(1e-30)
        image = (0.5 + 0.5 * v / scale).numpy()
        images.append(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    return images


def is_image_batch(vectors: Tensor) -> bool:
    return vectors.ndim == 4 and vectors.shape[1] in (1, 3)


def eigenvector_figure(vectors: Tensor, values: Tensor) -> Figure:
    """The most sensitive input directions, as images (image inputs) or as profiles (other inputs)."""
    count = len(vectors)
    figure = new_figure(2.2 * count, 2.4)
    for i, (vector, value) in enumerate(zip(vectors, values)):
        ax = figure.add_subplot(1, count, i + 1)
        if is_image_batch(vectors):
            ax.imshow(as_images(vector[None])[0], cmap="coolwarm", vmin=0, vmax=1)
            ax.set_axis_off()
        else:
            ax.plot(vector.detach().cpu().flatten().double().numpy())
        ax.set_title(f"lambda_max {value:.3g}", fontsize="small")
    return figure


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path
