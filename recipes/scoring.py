"""Scoring a data set as a Lightning prediction loop: streamed, distributed by Lightning, resumable.

- `ScoringDataModule` serves `(index, image, label)` for the first `num_samples` of a split, leaving out the
  samples that finished shards already hold (read on every rank before any rank writes).
- `ScoringModule.predict_step` returns the per-sample columns of a batch (`RobustnessEvaluation.batch_columns`;
  every random draw is seeded by the sample's index, so a row does not depend on its batch or process).
- `ShardWriter` (a Lightning `BasePredictionWriter`) writes each batch's rows to its own shard file per rank as
  soon as they exist, with the dataset index on every row, and at the end merges every valid shard into
  `scores.csv` (rows sorted by stage and index; a sample found twice, as a padding sampler would repeat it,
  counts once: Lightning's own prediction sampler splits unevenly without padding).

Run with any strategy: `Trainer.predict(ScoringModule(...), datamodule=ScoringDataModule(...),
return_predictions=False)` with a `ShardWriter` in the callbacks. Only a batch and its rows are in memory.

Shards are `shards/<stage>/rank<r>-<first index>-n<rows>-<crc32>.csv`, written to a temporary name and
renamed, so a killed run leaves no half-written shard under a final name; a shard whose row count or CRC does
not match its name (truncated, overwritten) is reported and its samples are scored again.
"""
from __future__ import annotations

import csv
import re
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset

from recipes.evaluation import RobustnessEvaluation
from recipes.statistics import Table, read_table, write_table

SHARD = re.compile(r"rank(\d+)-(\d{9})-n(\d+)-([0-9a-f]{8})\.csv")
STAGE_ORDER = ("init", "trained")


def shard_is_valid(path: Path) -> bool:
    """The file's name matches its content: row count and CRC-32."""
    match = SHARD.fullmatch(path.name)
    if match is None:
        return False
    content = path.read_bytes()
    return int(match.group(3)) == content.count(b"\n") - 1 and f"{zlib.crc32(content):08x}" == match.group(4)


def valid_shards(folder: Path) -> list[Path]:
    """The valid shards under `folder`; invalid ones are reported (their samples will be scored again)."""
    shards = []
    for path in sorted(folder.rglob("rank*-*.csv")):
        if shard_is_valid(path):
            shards.append(path)
        else:
            warnings.warn(f"{path}: corrupt or partial shard (its name does not match its rows / CRC); its samples "
                          "are scored again", stacklevel=2)
    return shards


def finished_indices(folder: Path) -> set[int]:
    """Dataset indices that valid shards under `folder` hold."""
    done: set[int] = set()
    for path in valid_shards(folder):
        with open(path, newline="") as handle:
            done.update(int(float(row["index"])) for row in csv.DictReader(handle))
    return done


def write_shard(folder: Path, rank: int, table: Table) -> Path:
    """`table` as one shard of `folder` (atomically: a temporary file renamed to its checked name)."""
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".rank{rank}-{int(table['index'][0]):09d}.tmp"
    write_table(table, temporary)
    content = temporary.read_bytes()
    path = folder / f"rank{rank}-{int(table['index'][0]):09d}-n{len(table['index'])}-{zlib.crc32(content):08x}.csv"
    temporary.replace(path)
    return path


def merge_shards(folder: Path) -> Table:
    """Every valid shard under `folder` in one table: one row per (stage, index), sorted by stage and index."""
    table = read_table(valid_shards(folder))  # rows are deduplicated by sample: sampler padding drops out
    stage = np.array([STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER) for s in table["stage"]])
    order = np.lexsort((table["index"], stage))
    return {name: column[order] for name, column in table.items() if name != "run"}


class IndexedSamples(Dataset):
    """`(index, image, label)` for the chosen indices of a map-style `(image, label)` dataset."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        index = self.indices[position]
        image, label = self.dataset[index]
        return index, image, torch.as_tensor(label)


class ScoringDataModule(pl.LightningDataModule):
    """The first `num_samples` (all if None) of `split` of `datamodule`, less what `folder` holds already.

    Args:
        datamodule: a data module of the package (its `splits` hold map-style datasets).
        split: "train", "val" or "test".
        num_samples: how many samples from the start of the split.
        folder: the shard folder of this stage.
        batch_size, num_workers: of the prediction dataloader.
    """

    def __init__(self, datamodule: pl.LightningDataModule, split: str, num_samples: Optional[int], folder: Path,
                 batch_size: int = 100, num_workers: int = 0) -> None:
        super().__init__()
        self.source, self.split, self.num_samples, self.folder = datamodule, split, num_samples, Path(folder)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.remaining: list[int] = []

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str) -> None:
        if self.split not in getattr(self.source, "splits", {}):
            self.source.setup("test")
        dataset = self.source.splits[self.split]
        count = len(dataset) if self.num_samples is None else min(self.num_samples, len(dataset))
        done = finished_indices(self.folder)
        self.remaining = [i for i in range(count) if i not in done]
        if done:
            rank_zero_info(f"{self.folder}: {len(done)} samples finished before, {len(self.remaining)} to score")
        self.trainer.strategy.barrier("scoring_setup")  # every rank has read the shards before any rank writes

    def predict_dataloader(self) -> DataLoader:
        dataset = IndexedSamples(self.source.splits[self.split], self.remaining)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


class ScoringModule(pl.LightningModule):
    """`predict_step` = the per-sample columns of a batch of `net` under `evaluation`."""

    def __init__(self, net: nn.Module, evaluation: RobustnessEvaluation) -> None:
        super().__init__()
        self.net, self.evaluation = net, evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Table:
        indices, images, labels = batch
        with torch.inference_mode(False):  # Lightning predicts under inference mode; the scores need autograd
            images, labels = images.clone(), labels.clone()
            return self.evaluation.batch_columns(self.net, images, labels, indices.cpu().numpy())


class ShardWriter(BasePredictionWriter):
    """Writes each predicted batch as a shard of `folder/shards/<stage>/` with `meta` on every row, reports
    samples/s and the time left, and merges the shards of every stage into `folder/scores.csv` at the end.

    Args:
        folder: the run's output folder.
        stage: "init" or "trained" (a column, and the shard sub-folder).
        meta: constant columns of every row (model, data, regularizer, seed, split).
        report_every_s: seconds between progress lines (rank 0).
    """

    def __init__(self, folder: Path, stage: str, meta: dict[str, Any], report_every_s: float = 30.0) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.stage, self.meta, self.report_every_s = Path(folder), stage, dict(meta), report_every_s
        self._started = self._reported = 0.0
        self._written = 0

    @property
    def shard_folder(self) -> Path:
        return self.folder / "shards" / self.stage

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._reported = time.monotonic()
        self._written = 0

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Table,
                           batch_indices: Optional[list[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        rows = len(prediction["index"])
        meta = {name: np.full(rows, str(value)) for name, value in {**self.meta, "stage": self.stage}.items()}
        write_shard(self.shard_folder, trainer.global_rank, {**meta, **prediction})
        self._written += rows
        now = time.monotonic()
        if trainer.is_global_zero and now - self._reported >= self.report_every_s:
            self._reported = now
            total = len(getattr(trainer.datamodule, "remaining", [])) or float("nan")
            rate = self._written * trainer.world_size / (now - self._started)
            left = (total - self._written * trainer.world_size) / rate
            rank_zero_info(f"scoring {self.stage}: {self._written * trainer.world_size}/{total} samples, "
                           f"{rate:.2f} samples/s, {left / 60:.1f} min left")
        if trainer.received_sigterm:  # Lightning's predict loop runs on after SIGTERM; this batch is on disk
            raise SIGTERMException

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("scoring_merge")  # every rank's last shard is on disk
        if trainer.is_global_zero:
            elapsed = time.monotonic() - self._started
            rank_zero_info(f"scored {self._written * trainer.world_size} samples ({self.stage}) in {elapsed:.1f} s")
            write_table(merge_shards(self.folder / "shards"), self.folder / "scores.csv")
        trainer.strategy.barrier("scoring_merged")


def score_split(trainer: pl.Trainer, net: nn.Module, evaluation: RobustnessEvaluation,
                datamodule: pl.LightningDataModule, split: str, num_samples: Optional[int], meta: dict[str, Any],
                folder: Path, stage: str) -> Path:
    """Score a split through `trainer.predict` (any strategy) into `folder/scores.csv`; resumes from the
    shards in `folder`."""
    writer = ShardWriter(folder, stage, {**meta, "split": split})
    data = ScoringDataModule(datamodule, split, num_samples, writer.shard_folder, batch_size=evaluation.batch_size)
    trainer.callbacks.append(writer)
    try:
        trainer.predict(ScoringModule(net, evaluation), datamodule=data, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
    return folder / "scores.csv"
