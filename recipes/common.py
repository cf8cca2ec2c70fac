"""Pieces the recipes share: the config folder, the machine line, the Hydra resolvers, the SIGTERM exit, the
process group's end."""
from __future__ import annotations

import logging
import os
import platform
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
logging.getLogger("art").setLevel(logging.WARNING)  # ART logs every attack at INFO through Hydra's root handler
OmegaConf.register_new_resolver(
    "fim_output_dir", lambda run_dir, default: f"{run_dir}/evaluate" if run_dir else default, replace=True,
)
OmegaConf.register_new_resolver(
    "wandb_offline", lambda: "WANDB_API_KEY" not in os.environ and os.environ.get("WANDB_MODE") != "online",
    replace=True,
)


def quote_path_overrides(keys: tuple[str, ...], argv: list[str] = sys.argv) -> None:
    """Quote `key=value` command-line overrides whose value is a path that Hydra's grammar would split (sweep job
    folders are named `regularizer=none,seed=0`), so that `fim-evaluate run_dir=<sweep job>` works as typed."""
    for i, argument in enumerate(argv[1:], start=1):
        key, sep, value = argument.partition("=")
        if sep and key.lstrip("+") in keys and value[:1] not in ("'", '"') and any(c in value for c in "=,[]{}()"):
            argv[i] = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'


def end_process_group() -> None:
    """Destroy the default process group before the interpreter exits, as PyTorch asks of every script that made
    one. Lightning does it itself only for NCCL; on gloo a worker thread left holding a tensor after a run that
    succeeded can abort the process during interpreter shutdown ("terminate called without an active exception",
    SIGABRT; seen in 2 of the 2-process runs of one CI run). Call it after the work, not in a `finally`: on an
    error the other ranks may still be in a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


@contextmanager
def exit_on_sigterm(on_stop: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Turn Lightning's SIGTERMException (a scheduler's stop, raised by fit and by the scoring writer) into
    exit status 143 after `on_stop()`: Lightning alone would exit 0, and in a Hydra multirun the sweep would go
    on to its next job."""
    try:
        yield
    except SIGTERMException:
        on_stop()
        logging.getLogger("recipes").error("stopped by SIGTERM")
        sys.exit(128 + signal.SIGTERM)
