"""fim-evaluate: per-sample robustness scores and attack outcomes of a model on held-out data, as CSV.

    fim-evaluate run_dir=outputs/train/<time>                 # a fim-train run: its config and last checkpoint
    fim-evaluate model=cifar_resnet18 data=cifar10_npz ckpt_path=path/to/last.ckpt
    fim-evaluate experiment=imagenet_scale                    # torchvision resnet18 at 224 px, top-k exact route

Scores through `Trainer.predict` (`recipes.scoring`): `trainer=ddp trainer.devices=N` (and
`trainer.num_nodes`) shards the data with Lightning's distributed sampler. Rows stream to shards under
`shards/<stage>/` as they are produced and are merged into `scores.csv` (columns: see
`recipes.evaluation`, with the model, data, regularizer, seed, stage and split on every row); run again
with the same output folder (`hydra.run.dir=...`) to resume a stopped evaluation. Prints a per-model summary.
Feed the folders to `fim-report`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from recipes.statistics import markdown, model_summaries, read_table
from recipes.common import CONFIG_DIR, end_process_group, exit_on_sigterm, quote_path_overrides
from recipes.scoring import score_split

log = logging.getLogger(__name__)


def load_net(cfg: DictConfig) -> torch.nn.Module:
    """The model of `cfg.model`, with the `net.` weights of `cfg.ckpt_path` (a fim-train checkpoint) if given."""
    net = instantiate(cfg.model)
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
        try:
            checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ValueError(f"ckpt_path={cfg.ckpt_path}: not a PyTorch checkpoint ({type(error).__name__}: "
                             f"{error})") from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"ckpt_path={cfg.ckpt_path}: not a Lightning checkpoint (no `state_dict`)")
        state = checkpoint["state_dict"]
        weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
        if not weights:
            raise ValueError(f"{cfg.ckpt_path} holds no `net.` weights: is it a fim-train checkpoint?")
        net.load_state_dict(weights)
    return net.eval()


def _overridden(prefix: str) -> bool:
    """Whether the command line set `prefix` or a key under it (`evaluation=...`, `evaluate.num_samples=...`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    keys = [override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task]
    return any(key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "/") for key in keys)


def from_run_dir(cfg: DictConfig) -> DictConfig:
    """`cfg` with the data and model (its `.hydra/config.yaml`), tags and seed (its `run.yaml`) of the fim-train
    run in `cfg.run_dir`, and its last checkpoint. The run's own `evaluation` and `evaluate` settings (the
    attacks, split and sample count it was evaluated with) are taken too, unless the command line sets them."""
    run = Path(cfg.run_dir)
    for name in (".hydra/config.yaml", "run.yaml"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"run_dir={run}: no {name}; is it a fim-train run folder?")
    trained, facts = OmegaConf.load(run / ".hydra" / "config.yaml"), OmegaConf.load(run / "run.yaml")
    with open_dict(cfg):
        cfg.data, cfg.model = trained.data, trained.model
        cfg.tags, cfg.seed = facts.tags, facts.seed
        cfg.ckpt_path = cfg.ckpt_path or str(run / "checkpoints" / "last.ckpt")
        for key in ("evaluation", "evaluate"):
            if trained.get(key) is not None and not _overridden(key):
                cfg[key] = trained[key]
    return cfg


def evaluate(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        cfg = from_run_dir(cfg)
    pl.seed_everything(cfg.seed)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    meta = {**dict(cfg.tags), "seed": cfg.seed}
    with exit_on_sigterm():  # the shards so far stay; run again with the same folder to resume
        path = score_split(trainer, load_net(cfg), instantiate(cfg.evaluation), instantiate(cfg.data),
                           cfg.evaluate.split, cfg.evaluate.num_samples, meta, Path(cfg.output_dir), cfg.stage)
    if trainer.is_global_zero:
        summary = model_summaries(read_table([path]))
        log.info(markdown(summary, [c for c in summary[0] if c not in ("stage",)]))
        log.info(f"per-sample scores: {path}")
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def _main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    quote_path_overrides(("run_dir", "ckpt_path"))
    _main()
    end_process_group()


if __name__ == "__main__":
    main()
