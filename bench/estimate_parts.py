"""The robustness estimate's parts against AutoAttack on kept weights: the estimate min(d_l, s_u) and the others.

For each network, on the first 256 probes, the robust accuracy at the tracking sweep's AutoAttack radii
(`bench.tracking.AA_RADII`) from: the line search's adversarial point alone (s_u, the first estimate), the
first-order step alone (d1), min(d1, s_u) (the second), the linear-step baseline d_l (top-2 margin / grad norm)
and the estimate min(d_l, s_u), against APGD-CE + APGD-T (`pyautoattack`, the sweep's settings):
- Fashion-MNIST, the plain SmallCNN at the five epochs kept from the sweep's first plain run (estimated with s_u
  alone; `bench/results/tracking/kept/`), APGD from that run's rows (same weights, same probes; the recorded
  estimate is recomputed here, to within one probe, as a check that they are);
- CIFAR-10, the wide SmallCNN adversarially trained (PGD-AT 8/255) by the calibration run, its last checkpoint,
  APGD run here.
Table and error summary (points, over every (network, radius) with APGD in [5%, 95%]) printed and written to
`bench/results/tracking/estimate_parts.md`.

    python bench/estimate_parts.py
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import autoattack_robust, machine, quiet_lightning  # noqa: E402
from bench.tracking import (AA_RADII, RESULTS, RESUME, components, load_rows, margin_gradients,  # noqa: E402
                            network, prepared)

PROBES = 256
KEPT = RESULTS / "kept" / "fashion_mnist_plain_s0_e30_t5000_s_u"
CALIBRATED = RESUME / "calibration" / "cifar10_pgd_at_s0_e100_t1000_w64-128-256" / "last.ckpt"
SIGNALS = ("s_u", "d1", "min(d1, s_u)", "linear", "min(d_l, s_u)")


def distances(net: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
    """signal -> norm -> (N,) distance."""
    parts = components(net, x)
    margin, grad_l2, grad_l1 = margin_gradients(net, x)
    out: dict[str, dict[str, np.ndarray]] = {signal: {} for signal in SIGNALS}
    for norm in ("l2", "linf"):
        searched, first = parts["line_search"][norm], parts["first_order"][norm]
        out["s_u"][norm] = torch.where(torch.isinf(searched), first, searched).numpy()  # d1 where none found
        out["d1"][norm] = first.numpy()
        out["min(d1, s_u)"][norm] = torch.minimum(first, searched).numpy()
        out["linear"][norm] = (margin / (grad_l2 if norm == "l2" else grad_l1)).numpy()
        out["min(d_l, s_u)"][norm] = torch.minimum(parts["linear_step"][norm], searched).numpy()  # the estimate
    return out


def score(name: str, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data: str, apgd: dict | None,
          recorded: dict | None = None) -> list[dict]:
    """One line per radius: APGD (given, or run here) and each signal's robust accuracy."""
    net.eval()
    with torch.no_grad():
        correct = (net(x).argmax(1) == y).numpy()
    found = distances(net, x)
    lines = []
    for norm, radii in AA_RADII[data].items():
        for eps in radii:
            key = f"{norm}/{eps:.4g}"
            line = {"network": name, "radius": key,
                    "apgd": apgd[key] if apgd else float(autoattack_robust(net, x, y, norm, eps).mean()),
                    **{s: float((correct & (found[s][norm] > eps)).mean()) for s in SIGNALS}}
            # one probe's worth of slack: a probe that sits on its boundary may be classified either way by
            # another batch composition's rounding (seen once, at epoch 16, L-inf 0.1)
            if recorded is not None and not math.isclose(line["s_u"], recorded[key], abs_tol=1.5 / len(x)):
                raise SystemExit(f"{name} {key}: s_u gives {line['s_u']}, the row on record {recorded[key]}: "
                                 "not the recorded weights or probes")
            lines.append(line)
            print(line, flush=True)
    return lines


def main() -> None:
    quiet_lightning()
    torch.manual_seed(0)
    lines = []
    x, y = (t[:PROBES] for t in prepared("fashion_mnist", 5000).splits["test"].tensors)
    rows = {row["epoch"]: row for row in load_rows("fashion_mnist")
            if (row["regime"], row["seed"], row["estimator"]) == ("plain", 0, "s_u")}
    for path in sorted(KEPT.glob("epoch*.pt"), key=lambda p: int(p.stem.removeprefix("epoch"))):
        epoch = int(path.stem.removeprefix("epoch"))
        net = network(1)
        net.load_state_dict(torch.load(path))
        row = rows[epoch]
        keys = [k.removeprefix("apgd/") for k in row if k.startswith("apgd/")]
        lines += score(f"Fashion-MNIST plain, epoch {epoch}", net, x, y, "fashion_mnist",
                       {k: row[f"apgd/{k}"] for k in keys}, {k: row[f"estimate_aa_probes/{k}"] for k in keys})
    checkpoint = torch.load(CALIBRATED, weights_only=False)
    net = network(3, (64, 128, 256))
    net.load_state_dict({key.removeprefix("net."): value for key, value in checkpoint["state_dict"].items()
                         if key.startswith("net.")})
    x, y = (t[:PROBES] for t in prepared("cifar10", 1000).splits["test"].tensors)
    lines += score(f"CIFAR-10 PGD-AT wide, epoch {checkpoint['epoch']}", net, x, y, "cifar10", None)
    text = ["# The estimate's parts against APGD (`python bench/estimate_parts.py`)\n", f"Machine: {machine()}. "
            f"{PROBES} probes; APGD-CE + APGD-T (`pyautoattack`, 100 iterations, 9 target classes).\n",
            "| network | radius | APGD | " + " | ".join(SIGNALS) + " |", "|---|---|---:|" + "---:|" * len(SIGNALS)]
    text += [f"| {line['network']} | {line['radius']} | {line['apgd']:.3f} | " +
             " | ".join(f"{line[s]:.3f}" for s in SIGNALS) + " |" for line in lines]
    text += ["", "Signal minus APGD, points, over every (network, radius) with APGD in [5%, 95%]:\n",
             "| signal | points | median abs | p90 abs | mean signed |", "|---|---:|---:|---:|---:|"]
    for signal in SIGNALS:
        errors = np.array([100 * (line[signal] - line["apgd"]) for line in lines if 0.05 <= line["apgd"] <= 0.95])
        text.append(f"| {signal} | {len(errors)} | {np.median(np.abs(errors)):.2f} | "
                    f"{np.quantile(np.abs(errors), 0.9):.2f} | {errors.mean():+.2f} |")
    report = "\n".join(text) + "\n"
    (RESULTS / "estimate_parts.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
