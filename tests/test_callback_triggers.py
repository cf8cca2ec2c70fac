"""When the callback scores (epoch points with several validations per epoch, step points on the same step),
which held-out data it finds, what it refuses at set-up, and what an older checkpoint restores."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import fim_lightning as fl
from fim_lightning.flavours import MisconfigurationException
from tests.lightning_helpers import TinyClassifier, blobs, loaders, trainer

# blobs(): 96 training samples in batches of 16 = 6 steps per epoch


def _fit(tmp_path, callback, **options):
    pl.seed_everything(0, workers=True)
    train, val = loaders()
    trainer(tmp_path, [callback], **options).fit(TinyClassifier(), train, val)
    return callback


@pytest.mark.parametrize("val_check_interval", [0.5, 2])
def test_epoch_points_sit_at_the_end_of_each_epoch_when_validation_runs_several_times(tmp_path, val_check_interval):
    callback = _fit(tmp_path, fl.FisherRobustnessCallback(num_samples=4, log_figures=False), max_epochs=2,
                    val_check_interval=val_check_interval)
    assert [r["step"] for r in callback.history] == [6, 12]


def test_a_step_shared_by_both_triggers_is_scored_and_logged_once(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    callback = _fit(tmp_path, fl.FisherRobustnessCallback(num_samples=4, every_n_train_steps=4, log_figures=False),
                    max_epochs=2, logger=CSVLogger(str(tmp_path)))
    assert [r["step"] for r in callback.history] == [4, 6, 8, 12]
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    column = header.index("fim/spectral_norm/mean")
    steps = [row.split(",")[header.index("step")] for row in logged[1:] if row.split(",")[column]]
    assert steps == ["4", "6", "8", "12"]


def test_limit_val_batches_0_scores_the_datamodules_validation_data(tmp_path):
    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(blobs(), batch_size=16)

        def val_dataloader(self):
            return DataLoader(blobs(n=48, seed=1), batch_size=16)

    callback = fl.FisherRobustnessCallback(num_samples=4, log_figures=False)
    trainer(tmp_path, [callback], max_epochs=2, limit_val_batches=0).fit(TinyClassifier(), datamodule=Data())
    assert [r["step"] for r in callback.history] == [6, 12]
    expected = torch.stack([blobs(n=48, seed=1)[i][0] for i in callback.state_dict()["probe_indices"].tolist()])
    torch.testing.assert_close(callback.state_dict()["probe_inputs"], expected)


class _NoForward(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(12, 4)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_forward_is_refused_at_setup_with_the_pointer_to_model_attribute(tmp_path):
    train, val = loaders()
    with pytest.raises(MisconfigurationException, match=r"model_attribute=.*\['net'\]"):
        trainer(tmp_path, [fl.FisherRobustnessCallback(num_samples=4)], max_epochs=1, limit_train_batches=1) \
            .fit(_NoForward(), train, val)
    with pytest.raises(MisconfigurationException, match="model_attribute='network' is not an attribute"):
        trainer(tmp_path, [fl.FisherRobustnessCallback(model_attribute="network")], max_epochs=1).fit(
            _NoForward(), train, val)
    callback = fl.FisherRobustnessCallback(num_samples=4, model_attribute="net", log_figures=False)
    trainer(tmp_path, [callback], max_epochs=1).fit(_NoForward(), train, val)
    assert len(callback.history) == 1


def test_load_state_dict_names_a_state_that_is_not_the_callbacks():
    with pytest.raises(MisconfigurationException, match=r"missing \['probe_inputs'"):
        fl.FisherRobustnessCallback().load_state_dict({"history": []})


def _older_format(state):
    """A checkpoint state of the callback as saved before `num_samples` / `seed` were part of it."""
    return {key: value for key, value in state.items() if key not in ("num_samples", "seed")} | {"last_epoch": 1}


@pytest.mark.parametrize("seed, num_samples, kept", [(0, 8, True), (5, 8, False), (0, 6, False)])
def test_an_older_checkpoint_keeps_its_probes_only_if_this_callback_draws_them(tmp_path, seed, num_samples, kept):
    first = fl.FisherRobustnessCallback(num_samples=8, log_figures=False)
    pl.seed_everything(0, workers=True)
    train, val = loaders()
    trainer(tmp_path, [first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=1).fit(
        TinyClassifier(), train, val)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    key = first.state_key
    checkpoint["callbacks"][key] = _older_format(checkpoint["callbacks"][key])
    torch.save(checkpoint, tmp_path / "older.ckpt")
    resumed = fl.FisherRobustnessCallback(num_samples=num_samples, seed=seed, log_figures=False)
    with pytest.warns(UserWarning, match="starting a new FIM curve") if not kept else _no_new_curve():
        trainer(tmp_path / "resumed", [resumed], max_epochs=2).fit(TinyClassifier(), train, val,
                                                                   ckpt_path=str(tmp_path / "older.ckpt"))
    assert [r["step"] for r in resumed.history] == ([6, 12] if kept else [12])
    drawn = torch.randperm(48, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    assert torch.equal(resumed.state_dict()["probe_indices"], drawn)


class _no_new_curve:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *args):
        self._catch.__exit__(*args)
        assert not [w for w in self.records if "new FIM curve" in str(w.message)]
