"""The plugin with both Lightning packages, `pytorch_lightning` and the unified `lightning.pytorch`: the
callback, the metric and a penalty through each package's Trainer, and each package's LightningCLI taking the
modules and the callback from a config, as users write them."""
import importlib
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fim_lightning as fl
from fim_lightning.callback import _SCORES
from fim_lightning.reductions import summarize
from tests.lightning_helpers import blobs

PACKAGES = {"pytorch_lightning": "fim_lightning.module", "lightning.pytorch": "fim_lightning.unified"}


def _flavour(package):
    return importlib.import_module(package), importlib.import_module(PACKAGES[package])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def _loader(seed, n=48):
    return DataLoader(blobs(n=n, seed=seed), batch_size=16)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_packages_trainer_runs_the_callback_the_metric_and_a_penalty(tmp_path, package):
    lightning, modules = _flavour(package)

    class Module(modules.FisherRegularizedClassifier):
        def __init__(self):
            super().__init__(_net(), 4, fl.FisherSpectralPenalty(eigenvector="exact"),
                             optimizer=partial(torch.optim.SGD, lr=0.0))
            self.val_fim = fl.FisherSpectralNorm()
            self.penalties = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.penalties.append((batch[0], self.trainer.callback_metrics["train/fisher_penalty"].item()))
            return loss

        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.val_fim.update(self.net, batch[0])
            self.log("val_fim", self.val_fim, on_epoch=True)

    callback = fl.FisherRobustnessCallback(num_samples=8, model_attribute="net", log_figures=False)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path),
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                logger=False)
    module = Module()
    trainer.fit(module, _loader(0), _loader(1))
    probes = callback.state_dict()["probe_inputs"]
    scores = fl.fisher_scores(_net(), probes, mode="eval")
    for name in _SCORES:
        for key, value in summarize(getattr(scores, name).double(), f"fim/{name}").items():
            assert callback.history[-1][key] == pytest.approx(value, rel=1e-6), key
    validation = torch.cat([x for x, _ in _loader(1)])
    expected = fl.fisher_spectral_norm(_net(), validation).mean().item()
    assert trainer.callback_metrics["val_fim"].item() == pytest.approx(expected, rel=1e-6)
    assert len(module.penalties) == 3
    for inputs, value in module.penalties:
        again = fl.FisherSpectralPenalty(eigenvector="exact")(_net().train(), inputs).item()
        assert value == pytest.approx(again, rel=1e-5)


def _data_module(lightning):
    class Blobs(lightning.LightningDataModule):
        def train_dataloader(self):
            return _loader(0)

        def val_dataloader(self):
            return _loader(1)

    return Blobs


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_packages_lightning_cli_takes_the_modules_and_the_callback_from_a_config(tmp_path, package):
    lightning, modules = _flavour(package)
    cli_module = importlib.import_module(f"{package}.cli")
    config = {
        "model": {"class_path": f"{PACKAGES[package]}.FisherRegularizedClassifier",
                  "init_args": {"net": {"class_path": "torch.nn.Linear",
                                        "init_args": {"in_features": 12, "out_features": 4}},
                                "num_classes": 4,
                                "penalty": {"class_path": "fim_lightning.FisherKLPenalty"}}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "fim_lightning.FisherRobustnessCallback",
                                   "init_args": {"num_samples": 4, "model_attribute": "net", "log_figures": False}}]},
    }
    cli = cli_module.LightningCLI(datamodule_class=_data_module(lightning), subclass_mode_model=True, run=False,
                                  args=config, save_config_callback=None)
    assert isinstance(cli.model, modules.FisherRegularizedClassifier)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, fl.FisherRobustnessCallback))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    probes = callback.state_dict()["probe_inputs"]
    expected = fl.fisher_spectral_norm(cli.model.net, probes).mean().item()
    assert callback.history[-1]["fim/spectral_norm/mean"] == pytest.approx(expected, rel=1e-6)


def test_the_callback_is_a_callback_of_both_packages_and_its_errors_are_both_packages_errors():
    import lightning.pytorch as L
    import pytorch_lightning as pl

    callback = fl.FisherRobustnessCallback()
    assert isinstance(callback, pl.Callback) and isinstance(callback, L.Callback)
    with pytest.raises(L.utilities.exceptions.MisconfigurationException):
        fl.FisherRobustnessCallback(num_samples=0)
    with pytest.raises(pl.utilities.exceptions.MisconfigurationException):
        fl.FisherRobustnessCallback(num_samples=0)
