"""One vocabulary for reducing per-sample values, shared by the metric, its functional twin and the callback.

"mean", "median" (the 0.5 quantile: the mean of the two middle values on even counts, as `np.median`), "max",
"none" (every value) or a quantile q in [0, 1]. Reductions are taken over the finite values: a sample whose
value is NaN was already named in a warning when it was scored, and one such sample must not turn a whole
epoch's statistic into NaN. The callback logs the `SUMMARY` reductions under `{name}/{key}`; "p90" is the
0.9 quantile.
"""
import math
from typing import Union

import torch
from torch import Tensor

from fim_lightning.validation import check_real

Reduction = Union[str, float]
REDUCTIONS = ("mean", "median", "max", "none")
SUMMARY: dict[str, Reduction] = {"mean": "mean", "median": "median", "p90": 0.9, "max": "max"}


def check_reduction(reduction: Reduction) -> None:
    if isinstance(reduction, str):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS} or a quantile in [0, 1], got {reduction!r}")
    else:
        check_real("a quantile reduction", reduction, 0.0, maximum=1.0)


def reduce_values(values: Tensor, reduction: Reduction) -> Tensor:
    """`values` (N,) reduced by `reduction` over the finite ones; NaN when none is finite (except "none")."""
    if reduction == "none":
        return values
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return values.new_tensor(math.nan)
    if reduction == "mean":
        return values.mean()
    if reduction == "max":
        return values.max()
    quantile = 0.5 if reduction == "median" else float(reduction)
    return values.quantile(quantile) if values.is_floating_point() else values.double().quantile(quantile)


def summarize(values: Tensor, name: str) -> dict[str, float]:
    """The `SUMMARY` reductions, keyed `{name}/{key}` (NaN when no value is finite)."""
    return {f"{name}/{key}": reduce_values(values, reduction).item() for key, reduction in SUMMARY.items()}
