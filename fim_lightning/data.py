"""LightningDataModules for the recipes. Images are float tensors in [0, 1], (N, C, H, W); normalisation
belongs to the model, so Fisher scores and attacks live in pixel space."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    array = torch.from_numpy(np.ascontiguousarray(images))
    array = array[:, None] if array.ndim == 3 else array.permute(0, 3, 1, 2)
    return array.float() / 255.0


class ArrayDataModule(pl.LightningDataModule):
    """Train / val / test splits held in memory as tensors; subclasses fill `splits` in `setup`.

    `num_classes` and `in_channels` describe the data for the model configs; `limit_train` / `limit_eval`
    keep the first samples of each split (for quick runs)."""

    def __init__(self, num_classes: int, in_channels: int, batch_size: int = 64, num_workers: int = 0,
                 limit_train: Optional[int] = None, limit_eval: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.splits: dict[str, TensorDataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def _store(self, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        limit = self.limit_train if split == "train" else self.limit_eval
        self.splits[split] = TensorDataset(images[:limit], labels[:limit].long())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8x8 handwritten digits (shipped inside the wheel): the embedded default, no download."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_size: int = 64, **kwargs) -> None:
        super().__init__(num_classes, in_channels, batch_size, **kwargs)

    def setup(self, stage: Optional[str] = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float()[:, None] / 16.0
        labels = torch.from_numpy(digits.target)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        self._store("train", images[:1200], labels[:1200])
        self._store("val", images[1200:1500], labels[1200:1500])
        self._store("test", images[1500:], labels[1500:])


class NpzDataModule(ArrayDataModule):
    """Any MedMNIST-layout `.npz` ({train,val,test}_images uint8, {train,val,test}_labels): PneumoniaMNIST,
    the offline CIFAR-10 subset, or a MedMNIST download. A relative `path` is resolved against
    $FIM_DATA_DIR."""

    def __init__(self, path: str, num_classes: int, in_channels: int, batch_size: int = 64, **kwargs) -> None:
        super().__init__(num_classes, in_channels, batch_size, **kwargs)
        self.path = path

    def resolved_path(self) -> Path:
        path = Path(self.path)
        if not path.is_absolute() and "FIM_DATA_DIR" in os.environ:
            path = Path(os.environ["FIM_DATA_DIR"]) / path
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: set FIM_DATA_DIR to the folder holding it, or pass data.path=/absolute/path.npz"
            )
        return path

    def setup(self, stage: Optional[str] = None) -> None:
        archive = np.load(self.resolved_path())
        for split in ("train", "val", "test"):
            self._store(split, _images_to_tensor(archive[f"{split}_images"]),
                        torch.from_numpy(archive[f"{split}_labels"].reshape(-1)))
