"""Scoring a data set through the Lightning prediction loop (`recipes.scoring`): memory, throughput, cost law.

    python bench/scoring.py [--parts memory,processes,scaling]

- memory: peak resident memory of one process scoring the first 1,000 and 8,000 of the 8,000 CIFAR-10 images
  of the offline subset (all three splits, held as uint8 in both runs) with the Fisher columns, streamed, and
  the same with the in-memory evaluation the recipes used before (all inputs stacked as float32).
- processes: samples/s of the Fisher columns on 2,000 images, one process (1 and 2 threads) against two
  processes of one thread each (Lightning's `ddp` strategy on gloo).
- scaling: seconds per sample of exact lambda_max (top_k route) on an untrained torchvision ResNet-18 with
  1,000 classes as the input grows (32, 64, 128, 224 px at top_k=20) and as top_k grows (10, 20, 50, 100 at
  64 px), the fitted law t = c (k + 1)^a (pixels)^b, and ResNet-50 at 224 px with top_k=20 measured once.
Each measurement runs in a fresh subprocess (peak memory is per process). Results are appended to
`bench/results/scoring.jsonl` and a finished measurement is skipped when the script is started again.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "scoring.jsonl"


def cifar_module():
    """The 8,000 images of the offline CIFAR-10 subset as one `test` split (uint8 in memory)."""
    import pytorch_lightning as pl
    import torch

    from bench.common import data_dir
    from recipes.data import ImageTensors

    class AllCifar(pl.LightningDataModule):
        def setup(self, stage=None):
            archive = np.load(data_dir() / "cifar10_subset.npz")
            images = np.concatenate([archive[f"{s}_images"] for s in ("train", "val", "test")])
            labels = np.concatenate([archive[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
            self.splits = {"test": ImageTensors(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                                                torch.from_numpy(labels))}

    return AllCifar()


def fisher_only(batch_size: int = 100, top_k=None):
    from recipes.evaluation import FisherColumns, RobustnessEvaluation

    return RobustnessEvaluation(FisherColumns(top_k=top_k), batch_size=batch_size, progress=False)


def run_memory(samples: int, way: str, out: Path) -> dict:
    import pytorch_lightning as pl
    import torch

    from recipes.models import SmallCNN
    from recipes.scoring import score_split

    torch.manual_seed(0)
    net = SmallCNN(3, 10).eval()
    data = cifar_module()
    data.setup()
    start = time.perf_counter()
    if way == "streamed":
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        score_split(trainer, net, fisher_only(), data, "test", samples, {"seed": 0}, out, "trained")
    else:  # the recipes' former path: every input stacked as float32, then evaluated in memory
        pairs = [data.splits["test"][i] for i in range(samples)]
        images, labels = torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])
        fisher_only()(net, images, labels)
    return {"seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_processes(samples: int, devices: int, out: Path) -> dict:
    import pytorch_lightning as pl
    import torch

    from recipes.common import end_process_group
    from recipes.models import SmallCNN
    from recipes.scoring import score_split

    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    score_split(trainer, SmallCNN(3, 10).eval(), fisher_only(), cifar_module(), "test", samples, {"seed": 0}, out,
                "trained")
    seconds = time.perf_counter() - start
    end_process_group()
    return {"seconds": seconds, "rank": trainer.global_rank}


def run_scaling(model: str, size: int, top_k: int, samples: int) -> dict:
    import torch

    import fim_lightning as fl
    from recipes.models import torchvision_classifier

    torch.manual_seed(0)
    net = torchvision_classifier(model, num_classes=1000).eval()
    x = torch.rand(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    fl.fisher_spectral_norm(net, x[:1], top_k=top_k)  # warm-up
    start = time.perf_counter()
    fl.fisher_spectral_norm(net, x, top_k=top_k)
    return {"seconds_per_sample": (time.perf_counter() - start) / samples}


MEASUREMENTS = {
    **{f"memory/{way}/{n}": ("memory", {"samples": n, "way": way}) for way in ("streamed", "in-memory")
       for n in (1000, 8000)},
    "processes/1x1thread": ("processes", {"samples": 2000, "devices": 1, "threads": 1}),
    "processes/1x2threads": ("processes", {"samples": 2000, "devices": 1, "threads": 2}),
    "processes/2x1thread": ("processes", {"samples": 2000, "devices": 2, "threads": 1}),
    **{f"scaling/resnet18/{size}px/k20": ("scaling", {"model": "resnet18", "size": size, "top_k": 20,
                                                      "samples": 4 if size < 128 else 2})
       for size in (32, 64, 128, 224)},
    **{f"scaling/resnet18/64px/k{k}": ("scaling", {"model": "resnet18", "size": 64, "top_k": k, "samples": 4})
       for k in (10, 50, 100)},
    "scaling/resnet50/224px/k20": ("scaling", {"model": "resnet50", "size": 224, "top_k": 20, "samples": 1}),
}


def measure(name: str) -> None:
    """Run one measurement in this process (called in a subprocess by `main`) and append its result."""
    part, options = MEASUREMENTS[name]
    out = Path(os.environ["FIM_BENCH_OUT"])
    if part == "memory":
        result = run_memory(options["samples"], options["way"], out)
    elif part == "processes":
        result = run_processes(options["samples"], options["devices"], out)
        if result.pop("rank") != 0:
            return
        result["samples_per_s"] = options["samples"] / result["seconds"]
    else:
        result = run_scaling(options["model"], options["size"], options["top_k"], options["samples"])
    from bench.common import machine

    with open(RESULTS, "a") as handle:
        handle.write(json.dumps({"name": name, **options, **result, "machine": machine()}) + "\n")


def done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {row["name"]: row for row in map(json.loads, RESULTS.read_text().splitlines())}


def fit_law(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares of log t = log c + a log(k + 1) + b log(pixels)."""
    design = np.array([[1.0, np.log(r["top_k"] + 1), np.log(r["size"] ** 2)] for r in rows])
    target = np.log([r["seconds_per_sample"] for r in rows])
    (log_c, a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(np.exp(log_c)), float(a), float(b)


def report(results: dict[str, dict]) -> None:
    first = next(iter(results.values()))
    print(f"machine: {first['machine']}\n")
    memory = [results[k] for k in MEASUREMENTS if k.startswith("memory/") and k in results]
    if memory:
        print("| scoring | samples | peak RSS (MiB) | seconds |\n|---|---:|---:|---:|")
        for row in memory:
            print(f"| {row['way']} | {row['samples']} | {row['peak_rss_mib']:.0f} | {row['seconds']:.1f} |")
        for way in ("streamed", "in-memory"):
            pair = [results.get(f"memory/{way}/{n}") for n in (1000, 8000)]
            if all(pair):
                ratio = pair[1]['peak_rss_mib'] / pair[0]['peak_rss_mib']
                print(f"\n{way}: peak RSS 8,000 / 1,000 samples = {ratio:.3f}")
    processes = [results[k] for k in MEASUREMENTS if k.startswith("processes/") and k in results]
    if processes:
        print("\n| processes x threads | samples | seconds | samples/s |\n|---|---:|---:|---:|")
        for row in processes:
            print(f"| {row['devices']} x {row['threads']} | {row['samples']} | {row['seconds']:.1f} | "
                  f"{row['samples_per_s']:.1f} |")
    scaling = [results[k] for k in MEASUREMENTS if k.startswith("scaling/resnet18") and k in results]
    if scaling:
        print("\n| model | pixels | top_k | seconds / sample |\n|---|---:|---:|---:|")
        for row in [results[k] for k in MEASUREMENTS if k.startswith("scaling/") and k in results]:
            print(f"| {row['model']} | {row['size']}x{row['size']} | {row['top_k']} | "
                  f"{row['seconds_per_sample']:.3f} |")
        if len(scaling) >= 4:
            c, a, b = fit_law(scaling)
            print(f"\nfitted on ResNet-18: t = {c:.3g} s x (top_k + 1)^{a:.2f} x (pixels)^{b:.2f}")
            predicted = c * 21 ** a * (224 * 224) ** b
            print(f"ResNet-18, 224 px, top_k=20 predicted by the law: {predicted:.2f} s/sample")
            if "scaling/resnet50/224px/k20" in results:
                measured = results["scaling/resnet50/224px/k20"]["seconds_per_sample"]
                print(f"ResNet-50, 224 px, top_k=20 measured: {measured:.2f} s/sample "
                      f"({measured / predicted:.2f}x the ResNet-18 law)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="memory,processes,scaling")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    for name, (part, options) in MEASUREMENTS.items():
        if part not in parts or name in done():
            continue
        threads = options.get("threads", 1 if part == "processes" else os.cpu_count())
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fim_bench_{name.replace('/', '_')}_{os.getpid()}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FIM_BENCH_OUT": str(out),
               "PYTHONPATH": str(ROOT)}
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--measure", name], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report(done())


if __name__ == "__main__":
    main()
