"""The prepared device check (issue 24): what a lent GPU runs as it is, through `bench/device_check.sh`.

Sections, each timed and written to `<out>/device_check.json` with the machine line (`<out>/device_check.md`
is the table):
- `correctness`: exact and Lanczos lambda_max of a torchvision ResNet-18 (10 classes) in float32 against the
  float64 exact value on the same device, with the caller's TF32 on (the new per-operator API, as Lightning's
  `set_float32_matmul_precision("high")` leaves matmuls, and cuDNN convolutions as by default) and off; the
  same with the guard's IEEE flags switched off shows what TF32 would have cost (target: 1e-4 with the guard);
- `cells`: matrix cells (`tests/matrix_cell.py`) on the device, `32-true`, `bf16-mixed` and (CUDA) `16-mixed`,
  through the callback, the metric and a penalty, each against the same cell on the CPU in 32-true (their
  weights never move, so every logged Fisher number must agree);
- `throughput`: images/s of ResNet-50 at 224 px with 1000 classes for the default method, `top_k=20` and
  Lanczos, each beside its floor measured in the same run: one forward and the method's VJPs (for Lanczos its
  JVP + VJP pairs) batched, nothing else; and the callback's wall-time overhead (defaults) on training steps
  of that model;
- `evaluate`: `fim-evaluate experiment=imagenet_scale trainer=gpu` on the ImageNet sample
  (`$FIM_DATA_DIR/imagenet_sample`; skipped with a message where it is not there).

`--cpu` runs every section on the CPU at small sizes (ResNet-18 at 32 px, a few images, 32-true and bf16-mixed
cells, `trainer=cpu`), so that CI keeps the script from rotting. Targets are stated in the table; the script
fails only where something errs, as its figures are what a session reports.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fim_lightning as fl  # noqa: E402
from fim_lightning import guard  # noqa: E402
from bench.common import timed  # noqa: E402
from recipes.common import machine  # noqa: E402


@contextlib.contextmanager
def user_tf32(on: bool):
    """The caller's flags: TF32 for matmuls and convolutions (on) or IEEE (off), restored after."""
    owners = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    saved = [owner.fp32_precision for owner in owners]
    for owner in owners:
        owner.fp32_precision = "tf32" if on else "ieee"
    try:
        yield
    finally:
        for owner, value in zip(owners, saved):
            owner.fp32_precision = value


@contextlib.contextmanager
def without_guard_precision():
    """The guard as it was before it owned the float32 precision (to measure what TF32 costs)."""
    original = guard.ieee_float32
    guard.ieee_float32 = contextlib.nullcontext
    try:
        yield
    finally:
        guard.ieee_float32 = original


def correctness(device: torch.device, cpu: bool) -> dict:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).to(device).eval()
    x = torch.rand(4 if cpu else 16, 3, 32, 32, device=device)
    reference = fl.fisher_spectral_norm(net, x, "exact", model_dtype=torch.float64)
    rows = {}
    for tf32 in (True, False):
        for guarded in (True, False):
            with user_tf32(tf32), (contextlib.nullcontext() if guarded else without_guard_precision()):
                for method in ("exact", "lanczos"):
                    value = fl.fisher_spectral_norm(net, x, method)
                    error = ((value - reference).abs() / reference).max().item()
                    rows[f"{method}, TF32 {'on' if tf32 else 'off'}, {'guard' if guarded else 'no guard'}"] = error
    return {"max relative error vs float64": rows, "target": 1e-4,
            "met": all(error <= 1e-4 for key, error in rows.items() if "no guard" not in key)}


def cells(device: torch.device, cpu: bool, out: Path) -> dict:
    precisions = ["32-true", "bf16-mixed"] + ([] if cpu else ["16-mixed"])
    accelerator = "cpu" if cpu else "cuda"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def run(precision: str, where: str) -> dict:
        folder = out / f"cell_{where}_{precision}"
        command = [sys.executable, str(ROOT / "tests" / "matrix_cell.py"), str(folder), "--precision", precision,
                   "--loggers", "csv", "--penalty", "spectral", "--accelerator", where]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"cell {where} {precision} failed:\n{done.stderr[-3000:]}")
        return json.loads((folder / "result.json").read_text())

    reference = run("32-true", "cpu")["history"][-1]
    results = {}
    for precision in precisions:
        last = run(precision, accelerator)["history"][-1]
        keys = [key for key in reference if key.startswith("fim/") and isinstance(reference[key], float)]
        errors = {key: abs(last[key] - reference[key]) / max(abs(reference[key]), 1e-12) for key in keys}
        worst = max(errors, key=errors.get)
        results[precision] = {"keys": len(keys), "max relative difference": errors[worst], "at": worst}
    return {"against the CPU 32-true cell": results, "target": 1e-4,
            "met": all(row["max relative difference"] <= 1e-4 for row in results.values())}


def _floor(net, x: torch.Tensor, vjps: int, jvps: int, device: torch.device) -> float:
    """One forward and `vjps` batched VJPs (and `jvps` batched JVPs): the least any method with those products
    can cost."""
    def run():
        logits, pullback = torch.func.vjp(net, x)
        cotangents = torch.randn(vjps, *logits.shape, device=device)
        torch.func.vmap(pullback, chunk_size=min(vjps, 32))(cotangents)
        if jvps:
            tangents = torch.randn(jvps, *x.shape, device=device)
            torch.func.vmap(lambda t: torch.func.jvp(net, (x,), (t,))[1], chunk_size=min(jvps, 32))(tangents)
    return timed(run, repeats=1, device=device)[1]


def throughput(device: torch.device, cpu: bool) -> dict:
    import torchvision

    torch.manual_seed(0)
    arch, size, batch = ("resnet18", 32, 2) if cpu else ("resnet50", 224, 32)
    net = getattr(torchvision.models, arch)(num_classes=1000).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    rows = {}
    for name, method, options in (("auto (default)", "auto", {}),
                                  ("exact top_k=20", "exact", {"top_k": 20, "max_neglected_mass": 1.0}),
                                  ("lanczos", "lanczos", {})):
        pair, seconds = timed(lambda: fl.fisher_top_eigenpair(net, x, method, **options), repeats=1, device=device)
        if method == "exact":
            floor = _floor(net, x, pair.steps, 0, device)
        else:  # Lanczos: one JVP and one VJP per step
            floor = _floor(net, x, pair.steps, pair.steps, device)
        rows[name] = {"images/s": batch / seconds, "floor images/s": batch / floor, "of floor": floor / seconds,
                      "products": pair.steps}
    overhead = _callback_overhead(device, cpu, arch)
    images = 50_000
    return {"model": f"{arch}, {size} px, 1000 classes, batch {batch}", "methods": rows,
            "50k images, default method (s)": images / rows["auto (default)"]["images/s"],
            "targets": "50k images < 180 s and >= 0.8 of the floor (H100-class GPU); callback overhead <= 2%",
            "callback overhead": overhead}


def _callback_overhead(device: torch.device, cpu: bool, arch: str) -> dict:
    """Training steps of the model with and without the callback (its defaults), the same data, best of two."""
    import pytorch_lightning as pl
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    from fim_lightning.module import FisherRegularizedClassifier

    size, count, batch = (32, 64, 16) if cpu else (224, 2048, 64)
    data = TensorDataset(torch.rand(count, 3, size, size), torch.randint(0, 1000, (count,)))
    held_out = TensorDataset(torch.rand(64, 3, size, size), torch.randint(0, 1000, (64,)))

    def fit(with_callback: bool) -> float:
        pl.seed_everything(0)
        module = FisherRegularizedClassifier(getattr(torchvision.models, arch)(num_classes=1000), 1000)
        callbacks = [fl.FisherRobustnessCallback(log_figures=False)] if with_callback else []
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu" if cpu else "cuda", devices=1,
                             precision="32-true" if cpu else "bf16-mixed", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(module, DataLoader(data, batch_size=batch), DataLoader(held_out, batch_size=batch))
        return time.perf_counter() - start

    without = min(fit(False) for _ in range(2))
    with_callback = min(fit(True) for _ in range(2))
    per_image = without / count
    return {"epoch of": f"{count} images, batch {batch}", "without (s)": without, "with (s)": with_callback,
            "overhead on this epoch": with_callback / without - 1,
            "overhead on an ImageNet epoch (1.28M images, one evaluation)": (with_callback - without)
            / (per_image * 1_281_167)}


def evaluate(cpu: bool, out: Path) -> dict:
    from bench.common import data_dir

    sample = data_dir() / "imagenet_sample"
    if not sample.is_dir():
        return {"skipped": f"no ImageNet sample at {sample} (set FIM_DATA_DIR to a folder holding imagenet_sample/)"}
    command = ["fim-evaluate", "experiment=imagenet_scale", f"trainer={'cpu' if cpu else 'gpu'}",
               f"hydra.run.dir={out / 'evaluate'}", "evaluation.columns.pgd_linf.steps=2",
               "evaluation.columns.pgd_l2.steps=2", "evaluation.columns.minimal_perturbation.search_steps=2",
               "evaluation.columns.minimal_perturbation.steps=2"]
    if cpu:
        command += ["evaluate.num_samples=4", "data.image_size=64"]
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], capture_output=True,
                          text=True, timeout=420, env={**os.environ, "FIM_DATA_DIR": str(data_dir())})
    if done.returncode != 0:
        raise RuntimeError(f"fim-evaluate failed:\n{done.stderr[-3000:]}")
    scores = next((out / "evaluate").rglob("scores.csv"), None)
    rows = len(scores.read_text().splitlines()) - 1 if scores else 0
    return {"command": " ".join(command), "seconds": time.perf_counter() - start, "scored rows": rows}


SECTIONS = {"correctness": correctness, "cells": cells, "throughput": throughput, "evaluate": evaluate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path(os.environ.get("OUT", ROOT / "bench" / "results"
                                                                                         / "device_check")))
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU (CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "mode": "cpu" if args.cpu else "cuda"}
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    for name in args.sections.split(","):
        start = time.perf_counter()
        section = SECTIONS[name]
        arguments = {"correctness": (device, args.cpu), "cells": (device, args.cpu, work),
                     "throughput": (device, args.cpu), "evaluate": (args.cpu, work)}[name]
        report[name] = section(*arguments)
        report[name]["section seconds"] = time.perf_counter() - start
        print(json.dumps({name: report[name]}, default=float), flush=True)
        (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=float))
    (args.out / "device_check.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# Device check ({report['mode']})\n", f"Machine: {report['machine']}\n"]
    for name in SECTIONS:
        if name in report:
            lines += [f"## {name}\n", "```", json.dumps(report[name], indent=2, default=float), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
