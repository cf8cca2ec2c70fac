"""Figures by their content, and the two extension registries (figure writers, bound handlers)."""
import json

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

import fim_lightning as fl
from fim_lightning import bounds, figures, writers
from tests.conftest import dense_fisher
from tests.lightning_helpers import TinyClassifier, loaders, trainer


def test_histogram_switches_to_a_log_axis_when_values_span_decades():
    wide = figures.histogram_figure(torch.logspace(-3, 2, 50), "lambda_max")
    narrow = figures.histogram_figure(torch.linspace(1, 2, 50), "lambda_max")
    assert wide.axes[0].get_xscale() == "log" and narrow.axes[0].get_xscale() == "linear"
    assert sum(patch.get_height() for patch in wide.axes[0].patches) == 50  # every value in a bin


def test_overlay_reads_csv_logs_histories_and_wandb_rows(tmp_path):
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("step,epoch,fim/spectral_norm/median\n5,0,2.0\n6,0,\n10,1,1.5\n")
    history = tmp_path / "fim_history.json"
    history.write_text(json.dumps([{"step": 5, "stage": "fit", "fim/spectral_norm/median": 3.0},
                                   {"step": 10, "stage": "test", "fim/spectral_norm/median": 9.0}]))
    wandb_rows = [{"trainer/global_step": 4, "fim/spectral_norm/median": 0.5}, {"_step": 7}]
    figure = figures.overlay_curves({"csv": csv_file, "json": history, "wandb": wandb_rows})
    lines = {line.get_label(): line.get_xydata().tolist() for line in figure.axes[0].get_lines()}
    assert lines == {"csv": [[5, 2.0], [10, 1.5]], "json": [[5, 3.0]], "wandb": [[4, 0.5]]}
    with pytest.raises(ValueError, match="no values of 'fim/trace/mean'"):
        figures.overlay_curves({"csv": csv_file}, key="fim/trace/mean")


class _Sketches(CSVLogger):
    """A user's logger type."""


class _CountingWriter(writers.FigureWriter):
    def __init__(self):
        self.events = []

    def on_score(self, logger, trainer, snapshot):
        self.events.append(("score", snapshot.step, len(snapshot.spectral_norm)))

    def on_end(self, logger, trainer, snapshot):
        self.events.append(("end", snapshot.step, len(snapshot.spectral_norm)))


def test_a_registered_writer_receives_the_figures_of_its_logger_type(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "FIGURE_WRITERS", dict(writers.FIGURE_WRITERS))
    writer = _CountingWriter()
    fl.register_figure_writer(_Sketches, writer)
    run = trainer(tmp_path, [fl.FisherRobustnessCallback(num_samples=6)], max_epochs=2,
                  logger=_Sketches(str(tmp_path)))
    run.fit(TinyClassifier(), *loaders())
    assert writer.events == [("score", 6, 6), ("score", 12, 6), ("end", 12, 6)]
    assert not list(tmp_path.rglob("*.png"))  # no PNG fallback for a logger with its own writer


class _Scaled(nn.Module):
    """y = 3 x: a user's block the bound does not know."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return 3 * x


def test_users_extend_the_bound_with_their_own_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="no bound is known for _Scaled"):
        fl.fisher_spectral_bound(model, x)
    fl.bounds.register_block_bound(_Scaled, lambda walk, name, module, x: (module(x), [(name, torch.full(
        (len(x),), 3.0, dtype=torch.float64))]))
    try:
        bound = fl.fisher_spectral_bound(model, x)
    finally:
        del bounds.BLOCK_BOUNDS[_Scaled]
    exact = torch.linalg.eigvalsh(dense_fisher(model, x))[:, -1]
    assert (bound.value >= exact).all() and bound.layers[0] == ("0", bound.layers[0][1])
    torch.testing.assert_close(bound.layers[0][1], torch.full((5,), 3.0, dtype=torch.float64))
