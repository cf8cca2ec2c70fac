"""1000 classes: each spectral method against the exact value, and the robustness estimate's candidate classes.

For torchvision ResNet-18 and ResNet-50 with 1000 classes (untrained: no weights can be downloaded), on
uniform-noise images, in two regimes of the output: "untrained" (near-uniform p, as an untrained head gives)
and "confident" (the head's weights scaled so that the top class holds most of the mass, as a trained model's
do). Per (model, regime): lambda_max by "exact" (all 999 classes, the reference), "exact" with top_k=20 (its
merged lower bound, `max_neglected_mass=1`, and the neglected mass), "lanczos", "power" and "auto" (the
default): the largest relative error against exact, the seconds and the peak memory (the process's peak
resident memory above its state before the call, one subprocess per measurement). Then the robustness estimate
(`robust_distances`, the distances the callback gets from `fisher_scores(norms=...)`: L2 and L-inf from one set
of VJPs, inside [0, 1]) with every class as candidate against the default 32 candidates: the largest relative
difference and the share of samples whose distance is the same.

The crossover that sets `algorithms.AUTO_EXACT_CLASSES`: exact against Lanczos seconds on ResNet-18 at 32 px
(4 images) as the number of classes grows (`CROSSOVER`).

Rows are appended to `bench/results/large_classes.jsonl` as they finish, and a rerun skips those done;
`--report` writes `bench/results/large_classes.md`.

    python bench/large_classes.py                    # CPU sizes: ResNet-18 at 224 px, ResNet-50 at 128 px
    python bench/large_classes.py --report
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fim_lightning as fl  # noqa: E402
from fim_lightning.functional import robust_distances  # noqa: E402
from recipes.common import machine  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROWS = RESULTS / "large_classes.jsonl"
MODELS = {"resnet18": 224, "resnet50": 128}
REGIMES = {"untrained": 1.0, "confident": 40.0}
METHODS = {"exact": ("exact", {}), "top_k=20": ("exact", {"top_k": 20, "max_neglected_mass": 1.0}),
           "lanczos": ("lanczos", {}), "power": ("power", {}), "auto": ("auto", {})}
DISTANCES = {"distance, all classes": 999, "distance, 32 candidates": None}
PROBES = 2
CROSSOVER = (16, 32, 64, 128, 256)


def _model_and_inputs(arch: str, regime: str):
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=1000).eval()
    with torch.no_grad():
        net.fc.weight.mul_(REGIMES[regime])
    size = MODELS[arch]
    return net, torch.rand(PROBES, 3, size, size, generator=torch.Generator().manual_seed(1))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(arch: str, regime: str, name: str) -> dict:
    """One measurement, in this process (run as a subprocess by `main`)."""
    net, x = _model_and_inputs(arch, regime)
    before = _peak_mib()
    start = time.perf_counter()
    if name in METHODS:
        method, options = METHODS[name]
        pair = fl.fisher_top_eigenpair(net, x, method, **options)
        values = {"lambda_max": pair.eigenvalue.tolist(), "steps": pair.steps,
                  "neglected_mass": None if pair.neglected_mass is None else pair.neglected_mass.tolist()}
    else:
        distances = robust_distances(net, x, ("l2", "linf"), bounds=(0.0, 1.0), candidates=DISTANCES[name])
        values = {norm: value.tolist() for norm, value in distances.items()}
    seconds = time.perf_counter() - start
    with torch.no_grad():
        top = net(x).softmax(-1).max(1).values.tolist()
    return {"model": arch, "pixels": MODELS[arch], "regime": regime, "name": name, "probes": PROBES,
            "seconds": seconds, "peak_mib_above": _peak_mib() - before, "p_top": top, **values,
            "machine": machine()}


def crossover(classes: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=classes).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seconds = {}
    for method in ("exact", "lanczos"):
        fl.fisher_spectral_norm(net, x[:1], method)  # warm-up
        start = time.perf_counter()
        fl.fisher_spectral_norm(net, x, method)
        seconds[method] = time.perf_counter() - start
    return {"model": "resnet18", "regime": "crossover", "name": f"C={classes}", "classes": classes, **seconds,
            "machine": machine()}


def report(rows: list[dict]) -> str:
    lines = ["# 1000 classes: methods against exact, and the robustness estimate's candidates\n",
             f"Machine(s): {'; '.join(sorted({row['machine'] for row in rows}))}. Untrained torchvision weights "
             f"(none can be downloaded), uniform-noise images, {PROBES} per row; `confident` scales the head by "
             f"{REGIMES['confident']:g}. Command: `python bench/large_classes.py`.\n",
             "| model | px | regime | p_top (mean) | method | max rel. error vs exact | neglected mass | products | "
             "seconds | x faster than exact | peak MiB |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    table = {(row["model"], row["regime"], row["name"]): row for row in rows}
    for (arch, regime, name), row in table.items():
        if name not in METHODS or regime == "crossover":
            continue
        exact = table.get((arch, regime, "exact"))
        if exact is None:
            continue
        errors = [abs(a - b) / b for a, b in zip(row["lambda_max"], exact["lambda_max"])]
        mass = "-" if row["neglected_mass"] is None else f"{max(row['neglected_mass']):.3f}"
        lines.append(f"| {arch} | {row['pixels']} | {regime} | {sum(row['p_top']) / len(row['p_top']):.3f} | {name} | "
                     f"{max(errors):.1e} | {mass} | {row['steps']} | {row['seconds']:.1f} | "
                     f"{exact['seconds'] / row['seconds']:.1f} | {row['peak_mib_above']:.0f} |")
    lines += ["", "## The robustness estimate: every class against the default 32 candidates\n",
              "| model | regime | norm | max rel. difference | same distance | seconds (all / 32) |",
              "|---|---|---|---:|---:|---|"]
    for (arch, regime, name), row in table.items():
        if name != "distance, 32 candidates" or (arch, regime, "distance, all classes") not in table:
            continue
        full = table[arch, regime, "distance, all classes"]
        for norm in ("l2", "linf"):
            pairs = list(zip(row[norm], full[norm]))
            difference = max(abs(a - b) / b for a, b in pairs)
            same = sum(abs(a - b) <= 1e-9 * b for a, b in pairs) / len(pairs)
            lines.append(f"| {arch} | {regime} | {norm} | {difference:.1e} | {same:.2f} | "
                         f"{full['seconds']:.1f} / {row['seconds']:.1f} |")
    crossing = [row for row in rows if row["regime"] == "crossover"]
    if crossing:
        lines += ["", "## Where exact stops being cheaper (ResNet-18, 32 px, 4 images): `AUTO_EXACT_CLASSES`\n",
                  "| classes | exact (s) | Lanczos (s) | exact / Lanczos |", "|---:|---:|---:|---:|"]
        lines += [f"| {row['classes']} | {row['exact']:.2f} | {row['lanczos']:.2f} | "
                  f"{row['exact'] / row['lanczos']:.2f} |"
                  for row in sorted(crossing, key=lambda row: row["classes"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "REGIME", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        arch, regime, name = args.one
        print(json.dumps(crossover(int(name)) if regime == "crossover" else measure(arch, regime, name)))
        return
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else []
    if not args.report:
        done = {(row["model"], row["regime"], row["name"]) for row in rows}
        jobs = [(arch, regime, name) for arch in MODELS for regime in REGIMES for name in (*METHODS, *DISTANCES)]
        jobs += [("resnet18", "crossover", str(classes)) for classes in CROSSOVER]
        for arch, regime, name in jobs:
            key = (arch, regime, f"C={name}" if regime == "crossover" else name)
            if key in done:
                continue
            output = subprocess.run([sys.executable, __file__, "--one", arch, regime, name], check=True,
                                    capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            rows.append(row)
            RESULTS.mkdir(exist_ok=True)
            with open(ROWS, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(arch, regime, name, flush=True)
    text = report(rows)
    (RESULTS / "large_classes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
