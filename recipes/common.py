"""Pieces the recipes share: the config folder, the machine line, the Hydra resolver."""
from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch
from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
logging.getLogger("art").setLevel(logging.WARNING)  # ART logs every attack at INFO through Hydra's root handler
OmegaConf.register_new_resolver(
    "fim_output_dir", lambda run_dir, default: f"{run_dir}/evaluate" if run_dir else default, replace=True,
)
OmegaConf.register_new_resolver(
    "wandb_offline", lambda: "WANDB_API_KEY" not in os.environ and os.environ.get("WANDB_MODE") != "online",
    replace=True,
)


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
