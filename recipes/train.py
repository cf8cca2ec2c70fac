"""fim-train: train with the FisherRobustnessCallback, print the FIM curve and save its plot; with an
`evaluation` config, also score and attack held-out samples into `scores.csv` (see `fim-evaluate`).

    fim-train                                   # sklearn digits, small CNN, CPU, under 2 minutes
    fim-train data=cifar10_npz trainer.max_epochs=3 logger=wandb
    fim-train -m experiment=architectures_cifar10    # a sweep; then `fim-report runs=[multirun]`
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from fim_lightning import FisherRobustnessCallback
from fim_lightning.figures import curves_figure, save
from fim_lightning.validation import check_int
from recipes.common import CONFIG_DIR, end_process_group, exit_on_sigterm, quote_path_overrides
from recipes.scoring import score_split

log = logging.getLogger(__name__)


def curve_table(history: list[dict], prefix: str = "fim") -> str:
    """The FIM curve (the callback's history, keys under `prefix`) as a markdown table: the accuracy and the
    estimated robust accuracy first (where the probes have labels), then the Fisher statistics."""
    robust = [key.removeprefix(prefix + "/") for key in (history[0] if history else {})
              if key == f"{prefix}/accuracy" or key.startswith(f"{prefix}/robust_accuracy/")]
    statistics = [*robust, "spectral_norm/mean", "spectral_norm/median", "spectral_norm/p90", "trace/mean",
                  "radius/median"]
    columns = [f"{prefix}/{statistic}" for statistic in statistics]
    lines = ["| stage | epoch | step | " + " | ".join(statistics) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for r in history:
        cells = " | ".join(f"{r[c]:.4g}" for c in columns)
        lines.append(f"| {r['stage']} | {r['epoch']} | {r['step']} | {cells} |")
    return "\n".join(lines)


def write_fim_outputs(fisher: Optional[FisherRobustnessCallback], output_dir: Path) -> None:
    """The FIM curve as a table (printed), its plot and `fim_history.json`."""
    if fisher is None:
        return
    keys = [f"{fisher.prefix}/spectral_norm/{s}" for s in ("mean", "median", "p90")]
    plot = save(curves_figure(fisher.history, keys, "lambda_max(F(x))", f"fim-train {output_dir.name}"),
                output_dir / "fim_curve.png")
    robust = [key for key in (fisher.history[0] if fisher.history else {})
              if key.startswith(f"{fisher.prefix}/robust_accuracy/")]
    if robust:
        save(curves_figure(fisher.history, robust, "estimated robust accuracy", f"fim-train {output_dir.name}",
                           log=False), output_dir / "robust_curve.png")
    (output_dir / "fim_history.json").write_text(json.dumps(fisher.history, indent=1))
    log.info(f"\nFisher spectral norm over training (probe set of {fisher.num_samples} held-out samples):")
    log.info(curve_table(fisher.history, fisher.prefix))
    log.info(f"plot: {plot}")


DONE = "done.json"


def recover_spawned_curve(trainer: pl.Trainer, fisher: FisherRobustnessCallback, stage: str) -> None:
    """Under a spawning strategy (`ddp_spawn`) the callback ran in the spawned processes and this process's copy
    holds nothing. After `fit` its state comes back from the checkpoint the run wrote (Lightning returns the
    path), so `test` scores the same probes; after `test` the test point comes back from the metrics Lightning
    returns (`trainer.callback_metrics`)."""
    if stage == "fit":
        path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not path:
            raise RuntimeError("the FIM curve stayed in the spawned training processes and no checkpoint holds it: "
                               "keep the model_checkpoint callback on with a spawning strategy")
        fisher.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["callbacks"][fisher.state_key])
        return
    logged = {key: value.item() for key, value in trainer.callback_metrics.items()
              if key.startswith(f"{fisher.prefix}/test/")}
    row = {fisher.prefix + "/" + key.removeprefix(f"{fisher.prefix}/test/"): value for key, value in logged.items()}
    fisher.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "stage": "test", **row})


TRAINER_INTEGERS = {"max_epochs": -1, "min_epochs": 0, "max_steps": -1, "log_every_n_steps": 1,
                    "check_val_every_n_epoch": 1, "num_sanity_val_steps": -1, "accumulate_grad_batches": 1}


def check_config(cfg: DictConfig) -> None:
    """The integer options of the trainer and the seed, named when they are not integers (Lightning would fail
    deep inside fit, or not at all)."""
    for key, minimum in TRAINER_INTEGERS.items():
        check_int(f"trainer.{key}", cfg.trainer.get(key), minimum, allow_none=True)
    check_int("seed", cfg.seed)


def train(cfg: DictConfig) -> dict:
    check_config(cfg)
    output_dir = Path(cfg.trainer.default_root_dir)
    if cfg.get("skip_done") and (output_dir / DONE).exists():
        log.info(f"skipping {output_dir}: finished before ({DONE}); remove it to run the job again")
        return json.loads((output_dir / DONE).read_text())
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, net=instantiate(cfg.model))
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    evaluation = instantiate(cfg.evaluation) if cfg.get("evaluation") else None
    first_process = rank_zero_only.rank == 0  # from the launch environment: valid before fit sets up DDP
    if first_process:
        run = {"tags": OmegaConf.to_container(cfg.tags, resolve=True), "seed": cfg.seed}
        (output_dir / "run.yaml").write_text(OmegaConf.to_yaml(run))
    meta = {**dict(cfg.tags), "seed": cfg.seed}
    fisher = next((c for c in callbacks if isinstance(c, FisherRobustnessCallback)), None)

    def keep_curve() -> None:
        if trainer.is_global_zero and fisher is not None and fisher.history:
            write_fim_outputs(fisher, output_dir)

    with exit_on_sigterm(keep_curve):  # keep the curve so far and tell the scheduler
        if evaluation is not None and cfg.evaluate.at_init:
            at_init = evaluation if cfg.evaluate.get("at_init_attacks", True) else evaluation.scores_only()
            score_split(trainer, module.net, at_init, datamodule, cfg.evaluate.split, cfg.evaluate.num_samples,
                        meta, output_dir, "init")
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file (resume from e.g. "
                                    "outputs/train/<time>/checkpoints/last.ckpt)")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        spawned = fisher is not None and not fisher.history
        if spawned:
            recover_spawned_curve(trainer, fisher, "fit")
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        if spawned:
            recover_spawned_curve(trainer, fisher, "test")
        if trainer.is_global_zero:
            write_fim_outputs(fisher, output_dir)
            log.info(f"\ntest accuracy {results[0].get('test/acc', float('nan')):.4f}")
        if evaluation is not None:
            path = score_split(trainer, module.net, evaluation, datamodule, cfg.evaluate.split,
                               cfg.evaluate.num_samples, meta, output_dir, "trained")
            if trainer.is_global_zero:
                log.info(f"per-sample scores: {path}")
    if trainer.is_global_zero:
        (output_dir / DONE).write_text(json.dumps(results[0]))
    return results[0]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    quote_path_overrides(("ckpt_path",))
    _main()
    end_process_group()


if __name__ == "__main__":
    main()
