"""One cell of the configuration matrix (`tests/test_matrix.py`), run as users run it: a script launched with
`python tests/matrix_cell.py OUT --precision ... --devices ... --loggers ... --penalty ... --strategy ...
--package ...`, Lightning's own strategy starting the other processes (`ddp`, `ddp_spawn`, or FSDP2 through
`ModelParallelStrategy`), with `pytorch_lightning` or the unified `lightning.pytorch`. What the test reads is
written from inside the training processes (`Results.on_fit_end`), so that a spawned run reports too.
The model's weights never change (SGD with lr 0, BatchNorm with momentum 0), so every cell must log the same
Fisher numbers; the script writes what the test compares:
`result.json` (rank 0: the callback's history, the metric per validation epoch, the logger folders),
`penalties.pt` (rank 0: each training batch and its penalty) and `writer_calls_rank{r}.json` (every rank).
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import importlib

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fim_lightning as fl
from fim_lightning import writers
from fim_lightning import module
from fim_lightning.flavours import PACKAGES
from recipes.common import end_process_group
from tests.lightning_helpers import blobs

PENALTIES = {"kl": lambda: fl.FisherKLPenalty(), "spectral": lambda: fl.FisherSpectralPenalty(eigenvector="exact")}


def build_net() -> nn.Module:
    """A small CNN on 1x6x6 images with non-trivial BatchNorm statistics that training never moves."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.0), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 36, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def images(n: int, seed: int) -> TensorDataset:
    data = blobs(n=n, dim=36, seed=seed)
    return TensorDataset(data.tensors[0].view(-1, 1, 6, 6), data.tensors[1])


class RecordingPenalty(nn.Module):
    """The penalty, with each batch and value kept (the test recomputes them on one process in float32)."""

    def __init__(self, penalty: nn.Module) -> None:
        super().__init__()
        self.penalty = penalty
        self.records: list[tuple[torch.Tensor, float]] = []

    def forward(self, model, inputs, step=None, logits=None):
        value = self.penalty(model, inputs, step=step, logits=logits)
        self.records.append((inputs.detach().cpu().clone(), value.item()))
        return value


class MatrixSteps:
    """`FisherRegularizedClassifier` with the `FisherSpectralNorm` metric in its `validation_step`; under FSDP2
    its network is sharded in `configure_model`, as Lightning's ModelParallelStrategy asks."""

    def __init__(self, penalty: str, shard: bool) -> None:
        super().__init__(build_net(), 4, RecordingPenalty(PENALTIES[penalty]()),
                         optimizer=partial(torch.optim.SGD, lr=0.0))
        self.val_fim = fl.FisherSpectralNorm()
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.val_fim.update(self.net, batch[0])
        self.log("val_fim", self.val_fim, on_epoch=True)


class ResultsHooks:
    """Writes what the test compares at the end of fit, in every training process (rank 0: the results)."""

    def __init__(self, out: Path, fisher, loggers) -> None:
        self.out, self.fisher, self.loggers = out, fisher, loggers
        self.values: list[float] = []
        self.calls: list[str] = []

    def setup(self, trainer, pl_module, stage):
        """Count the figure writer's calls in this process (a spawned process imports `writers` anew)."""
        write = writers.write

        def counted(trainer, snapshot, event):
            self.calls.append(event)
            write(trainer, snapshot, event)

        writers.write = counted

    def on_validation_end(self, trainer, pl_module):
        self.values.append(trainer.callback_metrics["val_fim"].item())

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"writer_calls_rank{rank}.json").write_text(json.dumps(self.calls))
        if rank == 0:
            torch.save(pl_module.penalty.records, self.out / "penalties.pt")
            torch.save(self.fisher.state_dict()["probe_inputs"], self.out / "probes.pt")
            torch.save(self.fisher.state_dict()["probe_labels"], self.out / "labels.pt")
            result = {"history": self.fisher.history, "val_fim": self.values,
                      "loggers": logger_folders(self.loggers), "world_size": trainer.world_size}
            (self.out / "result.json").write_text(json.dumps(result, indent=1))


class MatrixModule(MatrixSteps, module.FisherRegularizedClassifier):
    pass


class Results(ResultsHooks, pl.Callback):
    pass


FLAVOURS = {"pytorch_lightning": (MatrixModule, Results)}
if "lightning.pytorch" in PACKAGES:
    import lightning.pytorch as L

    from fim_lightning import unified

    class UnifiedMatrixModule(MatrixSteps, unified.FisherRegularizedClassifier):
        pass

    class UnifiedResults(ResultsHooks, L.Callback):
        pass

    FLAVOURS["lightning.pytorch"] = (UnifiedMatrixModule, UnifiedResults)


def make_loggers(names: list[str], out: Path, package: str) -> list:
    loggers = importlib.import_module(f"{package}.loggers")
    CSVLogger, TensorBoardLogger, WandbLogger = loggers.CSVLogger, loggers.TensorBoardLogger, loggers.WandbLogger

    makers = {"csv": lambda: CSVLogger(str(out), name="csv"),
              "tensorboard": lambda: TensorBoardLogger(str(out), name="tb"),
              "wandb": lambda: WandbLogger(save_dir=str(out), offline=True, project="fim-matrix")}
    return [makers[name]() for name in names if name != "none"]


def logger_folders(loggers: list) -> dict[str, str]:
    folders = {}
    for logger in loggers:
        name = type(logger).__name__
        folders[name] = str(Path(logger.experiment.dir).parent) if name == "WandbLogger" else logger.log_dir
    return folders


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--loggers", default="csv")
    parser.add_argument("--penalty", default="kl", choices=sorted(PENALTIES))
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn", "fsdp2"])
    parser.add_argument("--package", default="pytorch_lightning", choices=["pytorch_lightning", "lightning.pytorch"])
    parser.add_argument("--method", default="auto", help="the callback's method (the default a user gets)")
    parser.add_argument("--num-samples", type=int, default=32, help="the callback's probes (its default)")
    parser.add_argument("--batch-size", type=int, default=64, help="the callback's batch (its default)")
    parser.add_argument("--accelerator", default="cpu", help="cpu (the matrix), or cuda / gpu (bench/device_check.sh)")
    args = parser.parse_args()
    lightning = importlib.import_module(args.package)

    loggers = make_loggers(args.loggers.split(","), args.out, args.package)
    callback = fl.FisherRobustnessCallback(model_attribute="net", method=args.method, num_samples=args.num_samples,
                                           batch_size=args.batch_size)  # the defaults a user gets, figures on
    strategy = "auto"
    if args.devices > 1:
        strategy = args.strategy
        if args.strategy == "fsdp2":
            strategy = lightning.strategies.ModelParallelStrategy(data_parallel_size=args.devices,
                                                                  tensor_parallel_size=1)
    trainer = lightning.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy,
        precision=args.precision, max_epochs=2, logger=loggers or False,
        callbacks=[callback, FLAVOURS[args.package][1](args.out, callback, loggers)],
        default_root_dir=str(args.out), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    classifier = FLAVOURS[args.package][0](args.penalty, shard=args.strategy == "fsdp2" and args.devices > 1)
    trainer.fit(classifier, DataLoader(images(64, 0), batch_size=16), DataLoader(images(48, 1), batch_size=16))
    end_process_group()


if __name__ == "__main__":
    main()
