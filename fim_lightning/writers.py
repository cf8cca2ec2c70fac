"""Where the callback's figures go: a registry from logger type to figure writer.

- `WandbMedia` (W&B): at every evaluation a histogram of the per-sample lambda_max, a line chart of the
  curves and the top eigenvectors as images; W&B renders them, so this costs no matplotlib time.
- `TensorBoardImages` (TensorBoard): at every evaluation a histogram summary and the eigenvector images.
- `PngFiles` (any other logger, and no logger): matplotlib PNGs under `<log_dir>/<prefix>/`, rendered once at
  the end of `fit` (and of standalone validate / test), so training is never slowed by rendering.

Eigenvector images are `figures.signed_rgb`: grey where the direction is 0, red positive, blue negative.
Writers run on global rank 0 only and reach no collective. Register a writer for your own logger with
`register_figure_writer(MyLogger, MyWriter())`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor
from typing_extensions import override

from fim_lightning import figures
from fim_lightning.flavours import PACKAGES


@dataclass(frozen=True)
class Snapshot:
    """One evaluation of the probe set, as the figures show it.

    Attributes:
        prefix: the callback's key namespace.
        step: the global step.
        spectral_norm: (N,) lambda_max(F(x)) of every probe.
        eigenvectors: (k, *input_shape) top eigenvectors of the first k probes.
        eigenvalues: (k,) their lambda_max.
        history: the curve records so far.
        curve_keys: the history keys plotted as curves.
        inputs: (k, *input_shape) the probes the eigenvectors belong to.
        radii: (k,) their robustness radii.
        predictions: (k,) their predicted classes.
        run: the run's name for figure titles.
        robust_accuracy: per norm, the (eps, estimated robust accuracy) pairs of this evaluation (empty without
            labels or `eps`).
        robust_keys: the history keys of the robust accuracy curves.
    """

    prefix: str
    step: int
    spectral_norm: Tensor
    eigenvectors: Tensor
    eigenvalues: Tensor
    history: list[dict]
    curve_keys: list[str]
    inputs: Tensor
    radii: Tensor
    predictions: Tensor
    run: str = ""
    robust_accuracy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    robust_keys: list[str] = field(default_factory=list)


class FigureWriter:
    """Writes a `Snapshot` for one logger: `on_score` at every evaluation (keep it cheap), `on_end` once a run
    (fit, validate or test) ends or is interrupted."""

    def on_score(self, logger: Any, trainer: pl.Trainer, snapshot: Snapshot) -> None:
        """Called at every evaluation, on global rank 0."""

    def on_end(self, logger: Any, trainer: pl.Trainer, snapshot: Snapshot) -> None:
        """Called when the run ends, on global rank 0."""


class WandbMedia(FigureWriter):
    @override
    def on_score(self, logger: WandbLogger, trainer: pl.Trainer, snapshot: Snapshot) -> None:
        import wandb

        history = snapshot.history
        media = {
            f"{snapshot.prefix}/spectral_norm/histogram": wandb.Histogram(snapshot.spectral_norm.double().tolist()),
            f"{snapshot.prefix}/curves": wandb.plot.line_series(
                xs=[record["step"] for record in history],
                ys=[[record[key] for record in history] for key in snapshot.curve_keys],
                keys=snapshot.curve_keys, title="Fisher spectral norm", xname="global_step",
            ),
            "trainer/global_step": snapshot.step,
        }
        for norm, pairs in snapshot.robust_accuracy.items():
            media[f"{snapshot.prefix}/robust_accuracy_vs_eps/{norm}"] = wandb.plot.line_series(
                xs=[radius for radius, _ in pairs], ys=[[accuracy for _, accuracy in pairs]], keys=[norm],
                title=f"estimated robust accuracy ({norm}), step {snapshot.step}", xname=f"eps ({norm})",
            )
        if snapshot.robust_keys:
            media[f"{snapshot.prefix}/robust_curves"] = wandb.plot.line_series(
                xs=[record["step"] for record in history],
                ys=[[record.get(key, float("nan")) for record in history] for key in snapshot.robust_keys],
                keys=snapshot.robust_keys, title="estimated robust accuracy", xname="global_step",
            )
        if figures.is_image_batch(snapshot.eigenvectors) and len(snapshot.eigenvectors):
            media[f"{snapshot.prefix}/eigenvectors"] = [
                wandb.Image(image, caption=f"class {int(predicted)}, lambda_max {value:.3g}, radius {radius:.3g} "
                                           "(red +, blue -, grey 0)")
                for image, value, radius, predicted in zip(figures.signed_rgb(snapshot.eigenvectors),
                                                           snapshot.eigenvalues.tolist(), snapshot.radii.tolist(),
                                                           snapshot.predictions.tolist())
            ]
        logger.experiment.log(media)


class TensorBoardImages(FigureWriter):
    @override
    def on_score(self, logger: TensorBoardLogger, trainer: pl.Trainer, snapshot: Snapshot) -> None:
        writer = logger.experiment
        writer.add_histogram(f"{snapshot.prefix}/spectral_norm/histogram", snapshot.spectral_norm.double().numpy(),
                             snapshot.step)
        if figures.is_image_batch(snapshot.eigenvectors) and len(snapshot.eigenvectors):
            writer.add_images(f"{snapshot.prefix}/eigenvectors", figures.signed_rgb(snapshot.eigenvectors),
                              snapshot.step, dataformats="NHWC")


class PngFiles(FigureWriter):
    @override
    def on_end(self, logger: Any, trainer: pl.Trainer, snapshot: Snapshot) -> None:
        folder = self.folder(logger, trainer) / snapshot.prefix
        label = "lambda_max(F(x))"
        figures.save(figures.histogram_figure(snapshot.spectral_norm, label,
                                              f"{snapshot.run}: lambda_max of {len(snapshot.spectral_norm)} probes, "
                                              f"step {snapshot.step}"),
                     folder / f"histogram_step{snapshot.step}.png")
        figures.save(figures.curves_figure(snapshot.history, snapshot.curve_keys, label, snapshot.run),
                     folder / "curves.png")
        if snapshot.robust_keys:
            figures.save(figures.curves_figure(snapshot.history, snapshot.robust_keys, "estimated robust accuracy",
                                               snapshot.run, log=False), folder / "robust_accuracy.png")
        if len(snapshot.eigenvectors):
            figures.save(figures.eigenvector_figure(snapshot.eigenvectors, snapshot.eigenvalues, snapshot.inputs,
                                                    snapshot.radii, snapshot.predictions),
                         folder / f"eigenvectors_step{snapshot.step}.png")

    @staticmethod
    def folder(logger: Any, trainer: pl.Trainer) -> Path:
        """The logger's own folder (no collective: `trainer.log_dir` broadcasts), else the trainer's root."""
        if logger is None:
            return Path(trainer.default_root_dir)
        return Path(getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir)


FIGURE_WRITERS: dict[type, FigureWriter] = {
    getattr(importlib.import_module(f"{package}.loggers"), name): writer
    for package in PACKAGES  # each Lightning package has its own logger classes
    for name, writer in (("WandbLogger", WandbMedia()), ("TensorBoardLogger", TensorBoardImages()))
}
DEFAULT_WRITER: FigureWriter = PngFiles()


def register_figure_writer(logger_type: type, writer: FigureWriter) -> None:
    """Send the callback's figures for loggers of `logger_type` (and its subclasses) to `writer`."""
    if not isinstance(logger_type, type) or not isinstance(writer, FigureWriter):
        raise TypeError("register_figure_writer takes a logger class and a FigureWriter instance")
    FIGURE_WRITERS[logger_type] = writer


def figure_writer(logger: Logger) -> FigureWriter:
    """The writer registered for the closest class of `logger`, else `DEFAULT_WRITER` (PNG files)."""
    for cls in type(logger).__mro__:
        if cls in FIGURE_WRITERS:
            return FIGURE_WRITERS[cls]
    return DEFAULT_WRITER


def write(trainer: pl.Trainer, snapshot: Snapshot, event: str) -> None:
    """Call `event` ("on_score" / "on_end") of every logger's writer (PNG files when there is no logger)."""
    loggers: list[Optional[Logger]] = list(trainer.loggers) or [None]
    for logger in loggers:
        writer = DEFAULT_WRITER if logger is None else figure_writer(logger)
        getattr(writer, event)(logger, trainer, snapshot)
