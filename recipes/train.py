"""fim-train: train with the FisherRobustnessCallback, then print the FIM curve and save its plot.

    fim-train                                   # sklearn digits, small CNN, CPU, under 2 minutes
    fim-train data=cifar10_npz trainer.max_epochs=3 logger=wandb
"""
from __future__ import annotations

import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fim_lightning import FisherRobustnessCallback
from fim_lightning.figures import curves_figure, save

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
OmegaConf.register_new_resolver(
    "wandb_offline", lambda: "WANDB_API_KEY" not in os.environ and os.environ.get("WANDB_MODE") != "online",
    replace=True,
)


def curve_table(history: list[dict]) -> str:
    """The FIM curve as a markdown table."""
    columns = ["fim/spectral_norm/mean", "fim/spectral_norm/median", "fim/spectral_norm/p90", "fim/trace/mean",
               "fim/radius/median"]
    lines = ["| stage | epoch | step | " + " | ".join(c.removeprefix("fim/") for c in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for r in history:
        lines.append(f"| {r['stage']} | {r['epoch']} | {r['step']} | " + " | ".join(f"{r[c]:.4g}" for c in columns) + " |")
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, net=instantiate(cfg.model))
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=datamodule)
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    fisher = next((c for c in callbacks if isinstance(c, FisherRobustnessCallback)), None)
    if fisher is not None and trainer.is_global_zero:
        keys = [f"{fisher.prefix}/spectral_norm/{s}" for s in ("mean", "median", "p90")]
        plot = save(curves_figure(fisher.history, keys, "lambda_max(F(x))"), Path(cfg.trainer.default_root_dir) / "fim_curve.png")
        print("\nFisher spectral norm over training (probe set of", fisher.num_samples, "held-out samples):")
        print(curve_table(fisher.history))
        print(f"\ntest accuracy {results[0].get('test/acc', float('nan')):.4f}; plot: {plot}")
    return results[0]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
