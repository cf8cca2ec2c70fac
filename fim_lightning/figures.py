"""Matplotlib figures of Fisher scores: histogram, curves over training, top eigenvectors as images.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, so the user's pyplot backend and
global figure state are never touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
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


GREY = np.array([128, 128, 128], dtype=np.float64)
RED = np.array([220, 20, 20], dtype=np.float64)
BLUE = np.array([20, 60, 220], dtype=np.float64)


def signed_field(vectors: Tensor) -> Tensor:
    """(N, C, H, W) directions -> (N, H, W) in [-1, 1]: per pixel the norm over channels with the sign of
    their sum, divided by the largest magnitude of the image (an eigenvector's sign is arbitrary; its
    pattern is not)."""
    v = vectors.detach().cpu().double()
    field = v.norm(dim=1) * torch.where(v.sum(1) < 0, -1.0, 1.0)
    return field / field.flatten(1).abs().amax(1).clamp_min(1e-300).view(-1, 1, 1)


def signed_rgb(vectors: Tensor) -> np.ndarray:
    """(N, C, H, W) directions -> (N, H, W, 3) uint8 images: grey where the direction is 0, red where it is
    positive, blue where negative, saturated at the largest magnitude."""
    field = signed_field(vectors).numpy()[..., None]
    colour = GREY + np.where(field > 0, field * (RED - GREY), -field * (BLUE - GREY))
    return np.rint(colour).astype(np.uint8)


def is_image_batch(vectors: Tensor) -> bool:
    return vectors.ndim == 4 and vectors.shape[1] in (1, 3)


def eigenvector_figure(vectors: Tensor, values: Tensor) -> Figure:
    """The most sensitive input directions, as images (image inputs: `signed_rgb`) or as profiles (others)."""
    count = len(vectors)
    figure = new_figure(2.2 * count, 2.4)
    for i, (vector, value) in enumerate(zip(vectors, values)):
        ax = figure.add_subplot(1, count, i + 1)
        if is_image_batch(vectors):
            ax.imshow(signed_rgb(vector[None])[0], interpolation="nearest")
            ax.set_axis_off()
        else:
            ax.plot(vector.detach().cpu().flatten().double().numpy())
        ax.set_title(f"lambda_max {value:.3g}", fontsize="small")
    return figure


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path
