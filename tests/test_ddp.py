"""DDP with 2 CPU processes (gloo): the callback and the metric log what a single process logs."""
import pytest
import torch

import fim_lightning as fl
from tests.lightning_helpers import TinyClassifier, loaders, trainer

KEYS = ["fim/spectral_norm/mean", "fim/spectral_norm/median", "fim/spectral_norm/p90", "fim/spectral_norm/max",
        "fim/trace/mean", "fim/radius/median"]


def _validate(tmp_path, **kwargs):
    """Score one fixed model on a fixed probe set, in validation."""
    torch.manual_seed(0)
    model = TinyClassifier(with_metric=True)
    callback = fl.FisherRobustnessCallback(num_samples=21, batch_size=4, log_figures=False)
    _, val = loaders(batch_size=8)
    run = trainer(tmp_path, [callback], logger=False, **kwargs)
    run.validate(model, val)
    return {key: run.callback_metrics[key].item() for key in KEYS + ["val_fim"]}


def test_two_process_ddp_matches_a_single_process(tmp_path):
    single = _validate(tmp_path / "single")
    ddp = _validate(tmp_path / "ddp", devices=2, strategy="ddp_spawn")
    for key in KEYS + ["val_fim"]:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
