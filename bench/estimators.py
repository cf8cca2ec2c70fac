"""Time and accuracy of each white-box estimator of lambda_max(F(x)) against a dense float64 reference.

One run, one batch of real CIFAR-10 test images, per model: exact (C x C dual), power (50 iterations),
lanczos, hutchinson (several probe counts) and a PyHessian-style power iteration (Hessian-vector products of
the KL divergence by double backward, 50 iterations) as the baseline. Relative error is the median over the
batch of |estimate - reference| / reference. Peak memory of "exact" for several chunk sizes is measured in a
fresh subprocess each (max RSS growth on CPU, max allocated on CUDA).

    python bench/estimators.py [--batch 32] [--models cnn resnet18 vit]
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fim_lightning as fl  # noqa: E402
from bench.common import cifar_cnn, cifar_images, machine, resnet18_32, small_vit, timed  # noqa: E402

MODELS = {"cnn": cifar_cnn, "resnet18": resnet18_32, "vit": small_vit}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # settle BatchNorm statistics on real images, then score in eval mode
        model.train()(cifar_images("train", 256)[0])
    return model.eval()


def dense_reference(model, x) -> torch.Tensor:
    """lambda_max(F) per sample from dense float64 logit Jacobians: the top eigenvalue of S J J^T S, with
    S = M^(1/2) from an eigen-decomposition of M = diag(p) - p p^T (assembled without cancellation)."""
    reference = copy.deepcopy(model).double()
    values = []
    for xi in x.double():
        jac = torch.autograd.functional.jacobian(lambda v: reference(v[None])[0], xi).flatten(1)
        p = reference(xi[None])[0].softmax(-1).detach()
        off = 1 - torch.eye(len(p), dtype=p.dtype)
        metric = torch.diag(p * (p[None] * off).sum(1)) - torch.outer(p, p) * off
        evals, evecs = torch.linalg.eigh(metric)
        root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
        values.append(torch.linalg.eigvalsh(root @ jac @ jac.T @ root)[-1])
    return torch.stack(values)


def pyhessian_power(model, x, iterations=50, seed=0) -> torch.Tensor:
    """Baseline: power iteration with F v = Hessian of KL(p(x) || p(x + d)) at d = 0 times v (double backward)."""
    with fl.preserved_state(model, x):
        x = x.detach()
        log_p = model(x).log_softmax(-1).detach()
        d = torch.zeros_like(x, requires_grad=True)
        kl = (log_p.exp() * (log_p - model(x + d).log_softmax(-1))).sum()
        (grad,) = torch.autograd.grad(kl, d, create_graph=True)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        for _ in range(iterations):
            (hv,) = torch.autograd.grad(grad, d, grad_outputs=v, retain_graph=True)
            value = (v * hv).flatten(1).sum(1)
            v = hv / hv.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
        return value.double().detach()


def peak_memory_mib(name: str, batch: int, chunk: int) -> float:
    """Peak memory of one exact call in a fresh process: peak-RSS growth on CPU, max allocated on CUDA."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", name, str(batch), str(chunk)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["mib"]


def _memory_probe(name: str, batch: int, chunk: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = build(name).to(device), cifar_images("test", batch)[0].to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
    fl.fisher_spectral_norm(model, x, chunk_size=chunk)
    if device == "cuda":
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        mib = (_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"mib": mib}))


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "BATCH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        _memory_probe(*args.memory_probe[:1], int(args.memory_probe[1]), int(args.memory_probe[2]))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}\nbatch: {args.batch} CIFAR-10 test images, 10 classes, device {device}; exact uses "
          "chunk_size=None (CPU: one VJP at a time)\n")
    print("| model | method | time (s) | x faster than power-50 | median rel. error | max rel. error |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        model = build(name)
        x = cifar_images("test", args.batch)[0]
        reference = dense_reference(model, x)
        model, xd = model.to(device), x.to(device)
        gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
        runs = {
            "exact": lambda: fl.fisher_spectral_norm(model, xd),
            "exact, model in float64": lambda: fl.fisher_spectral_norm(model, xd, model_dtype=torch.float64),
            "power (50 it)": lambda: fl.fisher_spectral_norm(model, xd, "power", max_iter=50, tol=0.0, generator=gen()),
            "lanczos": lambda: fl.fisher_spectral_norm(model, xd, "lanczos", generator=gen()),
            **{f"hutchinson ({k} probes)": (lambda k=k: fl.fisher_spectral_norm(
                model, xd, "hutchinson", num_probes=k, generator=gen(), chunk_size=64)) for k in (16, 64, 256)},
            "PyHessian-style power (50 it)": lambda: pyhessian_power(model, xd),
        }
        results = {label: timed(run, repeats=1 if "50" in label else 3) for label, run in runs.items()}
        power_time = results["power (50 it)"][1]
        for label, (value, seconds) in results.items():
            error = (value.cpu() - reference).abs() / reference
            print(f"| {name} | {label} | {seconds:.3f} | {power_time / seconds:.1f} | {error.median():.1e} | "
                  f"{error.max():.1e} |")
    print("\n| model | exact, chunk_size (VJPs vmapped at once) | peak memory (MiB) |")
    print("|---|---|---:|")
    for name in args.models:
        for chunk in (9, 4, 1):
            print(f"| {name} | {chunk} | {peak_memory_mib(name, args.batch, chunk):.0f} |")


if __name__ == "__main__":
    main()
