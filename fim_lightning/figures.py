"""Matplotlib figures of Fisher scores: histogram, curves over training, top eigenvectors as images.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, so the user's pyplot backend and
global figure state are never touched.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from torch import Tensor


def new_figure(width: float = 5.0, height: float = 3.5) -> Figure:
    """An empty figure on its own Agg canvas (no pyplot, no global state)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def histogram_figure(values: Tensor, label: str, title: str = "") -> Figure:
    """Histogram of the finite per-sample values; log-spaced bins and axis when they span over a decade."""
    figure = new_figure()
    ax = figure.add_subplot()
    data = values.detach().cpu().double().numpy()
    data = data[np.isfinite(data)]
    positive = data[data > 0]
    if len(positive) == len(data) and len(data) and positive.max() > 10 * positive.min():
        ax.hist(data, bins=list(np.geomspace(positive.min(), positive.max(), 31)))
        ax.set_xscale("log")
    else:
        ax.hist(data, bins=30)
    ax.set_xlabel(label)
    ax.set_ylabel("samples")
    ax.set_title(title or f"{label}: {len(data)} samples", fontsize="small")
    return figure


def curves_figure(history: Sequence[dict], keys: Sequence[str], label: str, title: str = "",
                  log: bool = True) -> Figure:
    """One line per key of the (training) history records, against their global step; `title` names the run;
    `log=False` for a share in [0, 1] (robust accuracy) on a linear axis."""
    figure = new_figure()
    ax = figure.add_subplot()
    records = [record for record in history if all(key in record for key in keys)]
    steps = [record["step"] for record in records]
    for key in keys:
        ax.plot(steps, [record[key] for record in records], marker="o", label=key)
    _style_curves(ax, label, title)
    if not log:
        ax.set_yscale("linear")
        ax.set_ylim(-0.02, 1.02)
    return figure


def _style_curves(ax, label: str, title: str) -> None:
    """Global step against a log-scale value, titled, with a legend."""
    ax.set_xlabel("global step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small")


def overlay_curves(runs: Mapping[str, Union[str, Path, Sequence[dict]]], key: str = "fim/spectral_norm/median",
                   title: str = "") -> Figure:
    """The FIM curve `key` of several runs in one figure. Each run is a CSVLogger `metrics.csv`, a fim-train
    `fim_history.json`, or rows with `key` and a step (`trainer/global_step`, `step` or `_step`), e.g. a W&B
    run's `wandb.Api().run(path).history(pandas=False)`. A `key` without the prefix (`spectral_norm/median`)
    matches whatever prefix each run logged under."""
    figure = new_figure(width=6.0, height=4.0)
    ax = figure.add_subplot()
    for label, run in runs.items():
        rows = _rows(run)
        found = next((name for row in rows for name in row if name == key or name.endswith(f"/{key}")), key)
        points = [(_step(row), float(row[found])) for row in rows if row.get(found) not in (None, "")]
        if not points:
            raise ValueError(f"run {label!r} has no values of {key!r}")
        ax.plot(*zip(*points), marker="o", ms=3, label=label)
    _style_curves(ax, key, title)
    return figure


def _rows(run: Union[str, Path, Sequence[dict]]) -> list[dict]:
    if not isinstance(run, (str, Path)):
        return list(run)
    path = Path(run)
    if path.suffix == ".json":
        return [row for row in json.loads(path.read_text()) if row.get("stage", "fit") == "fit"]
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _step(row: dict) -> float:
    for name in ("trainer/global_step", "step", "_step"):
        if row.get(name) not in (None, ""):
            return float(row[name])
    raise ValueError(f"a row without a step: {sorted(row)}")


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


def signed_colormap() -> LinearSegmentedColormap:
    """The colours of `signed_rgb` on [-1, 1]: blue, grey at 0, red."""
    return LinearSegmentedColormap.from_list("fim_signed", [BLUE / 255, GREY / 255, RED / 255])


def eigenvector_figure(vectors: Tensor, values: Tensor, inputs: Optional[Tensor] = None,
                       radii: Optional[Tensor] = None, predictions: Optional[Tensor] = None) -> Figure:
    """The most sensitive input direction v of each probe x. Image inputs: one row per probe with x, v
    (`signed_rgb`, with its colour bar) and x + r v moved by the radius r (shown rescaled to [0, 1]); other
    inputs: v as a profile. Titles give lambda_max, the predicted class and r."""
    count = len(vectors)
    if inputs is None or not is_image_batch(vectors) or len(inputs) < count:
        figure = new_figure(2.2 * count, 2.4)
        for i, (vector, value) in enumerate(zip(vectors, values)):
            ax = figure.add_subplot(1, count, i + 1)
            if is_image_batch(vectors):
                ax.imshow(signed_rgb(vector[None])[0], interpolation="nearest")
                ax.set_axis_off()
            else:
                ax.plot(vector.detach().cpu().flatten().double().numpy())
                ax.set_xlabel("input coordinate")
            ax.set_title(f"lambda_max {value:.3g}", fontsize="small")
        return figure
    figure = new_figure(7.5, 2.3 * count)
    axes = figure.subplots(count, 3, squeeze=False)
    for i in range(count):
        x, v = inputs[i].detach().cpu().double(), vectors[i].detach().cpu().double()
        radius = float(radii[i]) if radii is not None else float("nan")
        moved = x + (radius if np.isfinite(radius) else 0.0) * v
        shown = [_display(x), signed_rgb(v[None])[0], _display(moved)]
        prediction = f", class {int(predictions[i])}" if predictions is not None else ""
        titles = [f"input{prediction}", f"direction, lambda_max {float(values[i]):.3g}", f"x + r v, r = {radius:.3g}"]
        for ax, image, title in zip(axes[i], shown, titles):
            ax.imshow(image, interpolation="nearest", cmap="gray" if image.ndim == 2 else None)
            ax.set_title(title, fontsize="small")
            ax.set_axis_off()
    mappable = ScalarMappable(norm=Normalize(-1, 1), cmap=signed_colormap())
    figure.colorbar(mappable, ax=axes[:, 1].tolist(), label="direction / max |direction|", shrink=0.8)
    return figure


def _display(image: Tensor) -> np.ndarray:
    """An (C, H, W) input as an HxW(x3) array in [0, 1] (rescaled when it leaves [0, 1])."""
    low, high = image.min(), image.max()
    if low < 0 or high > 1:
        image = (image - low) / (high - low).clamp_min(1e-12)
    array = image.numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path
