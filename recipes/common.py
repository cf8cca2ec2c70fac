"""Pieces the recipes share: run metadata, evaluation of a data split into a CSV, the Hydra resolver."""
from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fim_lightning.evaluation import RobustnessEvaluation, first_samples
from fim_lightning.report import write_table

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
logging.getLogger("art").setLevel(logging.WARNING)  # ART logs every attack at INFO through Hydra's root handler
OmegaConf.register_new_resolver(
    "wandb_offline", lambda: "WANDB_API_KEY" not in os.environ and os.environ.get("WANDB_MODE") != "online",
    replace=True,
)


def evaluate_split(evaluation: RobustnessEvaluation, net: nn.Module, datamodule, split: str,
                   num_samples: Optional[int], tags: DictConfig | dict, stage: str, seed: int) -> dict:
    """Evaluate the first `num_samples` of a split; the table carries the run's tags, seed and stage."""
    if not datamodule.splits:
        datamodule.prepare_data()
        datamodule.setup("test")
    images, labels = first_samples(datamodule.splits[split], num_samples)
    device = next(net.parameters()).device
    table = evaluation(net, images.to(device), labels.to(device))
    size = len(labels)
    meta = {name: np.full(size, str(value)) for name, value in dict(tags).items()}
    return {**meta, "seed": np.full(size, seed), "stage": np.full(size, stage), "split": np.full(size, split),
            **table}


def save_scores(tables: list[dict], folder: Path) -> Path:
    """All tables of a run, concatenated, as `<folder>/scores.csv`."""
    merged = {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}
    return write_table(merged, folder / "scores.csv")


def machine() -> str:
    """CPU model, cores, torch version and GPU, for the line every printed figure carries."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {device}"
