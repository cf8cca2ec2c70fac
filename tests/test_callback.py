"""FisherRobustnessCallback in real Lightning runs: logging, no side effects, resume, errors, precision, W&B."""
import csv
import json
import struct
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import fim_lightning as fl
from torch import nn
from tests.lightning_helpers import TinyClassifier, blobs, loaders, trainer


def _fit(tmp_path, callbacks, seed=0, **kwargs):
    pl.seed_everything(seed, workers=True)
    model = TinyClassifier()
    train, val = loaders(seed=seed)
    run = trainer(tmp_path, callbacks, **kwargs)
    run.fit(model, train, val)
    return model, run


def _independent_scores(callback, model):
    probes = callback.state_dict()["probe_inputs"]
    return fl.fisher_spectral_norm(model, probes, mode="eval"), fl.fisher_trace(model, probes, mode="eval")


def test_training_is_identical_with_and_without_the_callback(tmp_path):
    plain, _ = _fit(tmp_path / "plain", [])
    callbacks = [fl.FisherRobustnessCallback(num_samples=20, every_n_epochs=None, every_n_train_steps=2,
                                             log_figures=False),
                 fl.FisherRobustnessCallback(num_samples=10, method="hutchinson", prefix="fim_h", batch_size=4)]
    tracked, run = _fit(tmp_path / "tracked", callbacks)
    for (name, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(callbacks[0].history) == run.global_step // 2
    assert len(callbacks[1].history) == 2


def test_logged_curves_match_an_independent_computation(tmp_path):
    callback = fl.FisherRobustnessCallback(num_samples=24, every_n_epochs=1)
    model, run = _fit(tmp_path, [callback], logger=CSVLogger(str(tmp_path)), max_epochs=3)
    rows = list(csv.DictReader(open(Path(run.logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("fim/spectral_norm/mean")]
    assert [int(r["step"]) for r in logged] == [record["step"] for record in callback.history]
    assert [record["step"] for record in callback.history] == [6, 12, 18]
    spectral, trace = _independent_scores(callback, model)
    last = callback.history[-1]
    assert last["fim/spectral_norm/mean"] == pytest.approx(spectral.mean().item(), rel=1e-5)
    assert last["fim/spectral_norm/median"] == pytest.approx(spectral.quantile(0.5).item(), rel=1e-5)
    assert last["fim/spectral_norm/p90"] == pytest.approx(spectral.quantile(0.9).item(), rel=1e-5)
    assert last["fim/spectral_norm/max"] == pytest.approx(spectral.max().item(), rel=1e-5)
    assert last["fim/trace/mean"] == pytest.approx(trace.mean().item(), rel=1e-5)
    radius = fl.fisher_robustness_radius(model, callback.state_dict()["probe_inputs"], mode="eval")
    assert last["fim/radius/median"] == pytest.approx(radius.quantile(0.5).item(), rel=1e-5)
    assert run.callback_metrics["fim/spectral_norm/mean"].item() == pytest.approx(last["fim/spectral_norm/mean"])
    folder = Path(run.log_dir) / "fim"
    assert {"curves.png", "histogram_step18.png", "eigenvectors_step18.png"} <= {p.name for p in folder.iterdir()}


def test_probe_set_is_fixed_and_reproducible(tmp_path):
    a, b = fl.FisherRobustnessCallback(num_samples=10, seed=3), fl.FisherRobustnessCallback(num_samples=10, seed=3)
    _fit(tmp_path / "a", [a], max_epochs=1)
    _fit(tmp_path / "b", [b], max_epochs=1, seed=1)
    assert torch.equal(a.state_dict()["probe_indices"], b.state_dict()["probe_indices"])
    val = blobs(n=48, seed=1).tensors[0]
    assert torch.equal(a.state_dict()["probe_inputs"], val[a.state_dict()["probe_indices"]])


def test_standalone_validate_and_test_under_inference_mode(tmp_path):
    callback = fl.FisherRobustnessCallback(num_samples=16)
    model, run = _fit(tmp_path, [callback], max_epochs=1)
    _, val = loaders()
    run.validate(model, val)
    run.test(model, val)
    assert len(callback.history) == 3
    spectral, _ = _independent_scores(callback, model)
    for record in callback.history[1:]:
        assert record["fim/spectral_norm/mean"] == pytest.approx(spectral.mean().item(), rel=1e-5)


def test_resume_continues_the_same_curves(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = fl.FisherRobustnessCallback(num_samples=12, method="power", estimator_options={"max_iter": 5})
    _fit(tmp_path, [first, checkpoint], max_epochs=2)
    full = fl.FisherRobustnessCallback(num_samples=12, method="power", estimator_options={"max_iter": 5})
    _fit(tmp_path / "full", [full], max_epochs=3)
    resumed = fl.FisherRobustnessCallback(num_samples=12, method="power", estimator_options={"max_iter": 5})
    pl.seed_everything(0, workers=True)
    train, val = loaders()
    trainer(tmp_path / "resumed", [resumed], max_epochs=3).fit(TinyClassifier(), train, val,
                                                                 ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["step"] for r in resumed.history] == [6, 12, 18]
    assert resumed.history[:2] == first.history
    assert torch.equal(resumed.state_dict()["probe_inputs"], first.state_dict()["probe_inputs"])
    assert torch.equal(resumed.state_dict()["generator_state"], full.state_dict()["generator_state"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_and_scores_in_float32(tmp_path, precision):
    callback = fl.FisherRobustnessCallback(num_samples=8, log_figures=False)
    model, _ = _fit(tmp_path, [callback], max_epochs=1, precision=precision)
    spectral, _ = _independent_scores(callback, model)
    assert callback.history[-1]["fim/spectral_norm/mean"] == pytest.approx(spectral.mean().item(), rel=1e-5)


class _ScoredTuple(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x


class _BadScoredModel(TinyClassifier):
    """Trains normally; the module the callback scores (`scored`) returns what the callback cannot use."""

    def __init__(self, kind):
        super().__init__()
        self.scored = _ScoredTuple(self.net) if kind == "tuple" else nn.Linear(12, 1)


@pytest.mark.parametrize("kind, match", [("tuple", "tuple"), ("one_class", "C >= 2")])
@pytest.mark.parametrize("explicit_data", [True, False])
def test_a_model_the_callback_cannot_score_fails_with_a_clear_message(tmp_path, kind, match, explicit_data):
    """With `data=` the model is checked at setup; otherwise at the first evaluation (the probe set comes from
    the trainer's public `val_dataloaders`, which Lightning fills when validation first runs)."""
    train, val = loaders()
    data = {"data": blobs(n=30, seed=5)} if explicit_data else {}
    run = trainer(tmp_path, [fl.FisherRobustnessCallback(num_samples=4, model_attribute="scored", **data)],
                  max_epochs=1)
    with pytest.raises(MisconfigurationException, match=match):
        run.fit(_BadScoredModel(kind), train, val)


def test_missing_held_out_data_is_named(tmp_path):
    train, _ = loaders()
    run = trainer(tmp_path, [fl.FisherRobustnessCallback(num_samples=4)], max_epochs=1)
    with pytest.raises(MisconfigurationException, match="needs held-out data"):
        run.fit(TinyClassifier(), train)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(MisconfigurationException, match="num_samples must be >= 1"):
        fl.FisherRobustnessCallback(num_samples=0)
    with pytest.raises(MisconfigurationException, match="method must be one of"):
        fl.FisherRobustnessCallback(method="svd")
    with pytest.raises(MisconfigurationException, match=r"\['top_k'\] do not apply"):
        fl.FisherRobustnessCallback(method="power", estimator_options={"top_k": 3})
    with pytest.raises(MisconfigurationException, match="collapse_drop must be <= 1"):
        fl.FisherRobustnessCallback(collapse_drop=1.5)
    with pytest.raises(MisconfigurationException, match="collapse_floor must be >= 0"):
        fl.FisherRobustnessCallback(collapse_floor=-0.1)


def test_explicit_dataset_and_model_attribute(tmp_path):
    callback = fl.FisherRobustnessCallback(num_samples=8, data=blobs(n=30, seed=5), model_attribute="net")
    model, _ = _fit(tmp_path, [callback], max_epochs=1)
    spectral = fl.fisher_spectral_norm(model.net,
                                       blobs(n=30, seed=5).tensors[0][callback.state_dict()["probe_indices"]])
    assert callback.history[-1]["fim/spectral_norm/max"] == pytest.approx(spectral.max().item(), rel=1e-5)


def _wandb_records(path):
    """Protobuf `Record`s of an offline .wandb file: LevelDB-log framing (7-byte file header, 32 KiB blocks,
    chunks with a 7-byte header crc/length/type)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + length > len(raw):  # a chunk the service is still writing: read again later
            break
        chunks, pos = chunks + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def read_wandb_history(path, timeout=60.0):
    """History rows of a finished offline run. W&B's service writes the file asynchronously, also after
    `finish()` returns, so this waits for the run's final `exit` record before reading the rows."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_records_the_fim_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fim-test")
    callback = fl.FisherRobustnessCallback(num_samples=8)
    _fit(tmp_path, [callback], max_epochs=2, logger=logger)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()  # the logger's own run: flushes its .wandb file
    rows = read_wandb_history(next(run_dir.glob("*.wandb")))
    scalars = [row for row in rows if "fim/spectral_norm/mean" in row]
    assert [row["trainer/global_step"] for row in scalars] == [record["step"] for record in callback.history]
    for row, record in zip(scalars, callback.history):
        for key in ("fim/spectral_norm/mean", "fim/spectral_norm/p90", "fim/trace/mean", "fim/radius/median"):
            assert row[key] == pytest.approx(record[key], rel=1e-12)
    media = [row for row in rows if "fim/spectral_norm/histogram/_type" in row]
    assert len(media) == 2 and media[-1]["fim/curves_table/_type"] == "table-file"
    assert sum(media[-1]["fim/spectral_norm/histogram/values"]) == 8


class _BlobsData(pl.LightningDataModule):
    def train_dataloader(self):
        return loaders()[0]

    def val_dataloader(self):
        return loaders()[1]


def test_configured_from_lightning_cli_yaml(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: fim_lightning.FisherRobustnessCallback
      init_args:
        num_samples: 16
        method: lanczos
        estimator_options: {{max_iter: 20}}
        every_n_epochs: null
        every_n_train_steps: 3
""")
    cli = LightningCLI(TinyClassifier, _BlobsData, run=False, save_config_callback=None, args=["--config", str(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, fl.FisherRobustnessCallback)]
    assert (callback.num_samples, callback.method, callback.estimator_options) == (16, "lanczos", {"max_iter": 20})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [record["step"] for record in callback.history] == [3, 6]


def test_wandb_gets_eigenvector_images_for_image_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from torch.utils.data import DataLoader, TensorDataset

    from recipes.models import SmallCNN
    from fim_lightning.module import ImageClassifier

    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 8, 8, generator=gen), torch.arange(64) % 4
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fim-test")
    callback = fl.FisherRobustnessCallback(num_samples=8, num_eigenvectors=3, model_attribute="net")
    pl.seed_everything(0)
    run = trainer(tmp_path, [callback], max_epochs=1, logger=logger)
    run.fit(ImageClassifier(SmallCNN(1, 4, widths=(4, 8)), 4), DataLoader(TensorDataset(images, labels), batch_size=16),
            DataLoader(TensorDataset(images[:32], labels[:32]), batch_size=16))
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()  # the logger's own run: flushes its .wandb file
    rows = read_wandb_history(next(run_dir.glob("*.wandb")))
    media = [row for row in rows if "fim/eigenvectors/count" in row]
    assert len(media) == 1 and media[0]["fim/eigenvectors/count"] == 3
    assert list((run_dir / "files" / "media" / "images").rglob("eigenvectors_*.png"))  # W&B tiles the 3 into one file


def test_top_k_logs_the_neglected_mass_and_nan_for_probes_beyond_the_threshold(tmp_path):
    """With `estimator_options={"top_k": 2}` on four classes the merged mass of each probe is its probability
    outside the top two: logged as `fim/neglected_mass/...` from an independent softmax, and the spectral
    statistics come only from the probes below `max_neglected_mass` (the others are NaN, warned about)."""
    threshold = 0.05
    callback = fl.FisherRobustnessCallback(num_samples=24, method="exact", log_figures=False, eps={},
                                           estimator_options={"top_k": 2, "max_neglected_mass": threshold})
    with pytest.warns(RuntimeWarning, match="top_k=2 merged"):
        model, _ = _fit(tmp_path, [callback], max_epochs=1)
    probes = callback.state_dict()["probe_inputs"]
    model.eval()
    with torch.no_grad():
        p = model.net(probes).double().softmax(-1).sort(dim=1, descending=True).values
    mass = p[:, 2:].sum(1)
    last = callback.history[-1]
    assert last["fim/neglected_mass/mean"] == pytest.approx(mass.mean().item(), rel=1e-4)
    assert last["fim/neglected_mass/max"] == pytest.approx(mass.max().item(), rel=1e-4)
    kept = mass <= threshold
    assert kept.any() and not kept.all()
    exact = fl.fisher_spectral_norm(model, probes, "exact", mode="eval")
    bound = fl.fisher_spectral_norm(model, probes, "exact", top_k=2, max_neglected_mass=1.0, mode="eval")
    assert last["fim/spectral_norm/mean"] == pytest.approx(bound[kept].mean().item(), rel=1e-5)
    assert (bound[kept] <= exact[kept] * (1 + 1e-6)).all()
