"""`FisherSpectralNorm`: a torchmetrics Metric that accumulates per-sample lambda_max(F(x)) over batches."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fim_lightning.functional import SpectralMethod, check_estimator_options, fisher_spectral_norm
from fim_lightning.operator import OUTPUT_KINDS, OutputKind
from fim_lightning.validation import check_choice, check_real

Reduction = Union[str, float]
_REDUCTIONS = ("mean", "median", "max", "none")


def reduce_values(values: Tensor, reduction: Reduction) -> Tensor:
    """"mean", "median", "max", "none" (all values) or a quantile q in [0, 1]."""
    if reduction == "none":
        return values
    if values.numel() == 0:
        return values.new_tensor(float("nan"))
    if reduction == "mean":
        return values.mean()
    if reduction == "median":
        return values.median()
    if reduction == "max":
        return values.max()
    return values.quantile(float(reduction))


def check_reduction(reduction: Reduction) -> None:
    if isinstance(reduction, str):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS} or a quantile in [0, 1], got {reduction!r}")
    else:
        check_real("a quantile reduction", reduction, 0.0, maximum=1.0)


class FisherSpectralNorm(Metric):
    """Per-sample spectral norm of the input-space Fisher information, lambda_max(J^T (diag p - p p^T) J).

    The model is an `update` argument (as in torchmetrics' PerceptualPathLength), so the metric never owns
    it and its parameters are not registered twice. `update` re-enables the gradients torchmetrics
    disables, scores in eval mode and restores the model's state. States are synced across processes by
    concatenation, so `compute()` over DDP equals the single-process value on the same samples.

    Args:
        method: "exact", "power", "lanczos" or "hutchinson".
        reduction: "mean", "median", "max", "none" (every per-sample value) or a quantile in [0, 1].
        output: what the model returns: "logits", "probs" or "log_probs".
        estimator_options: options of the method (e.g. `{"top_k": 20}` or `{"num_probes": 32}`).

    Example:
        >>> metric = FisherSpectralNorm()
        >>> metric.update(model, images)  # doctest: +SKIP
        >>> metric.compute()  # doctest: +SKIP
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    values: list[Tensor]

    def __init__(
        self,
        method: SpectralMethod = "exact",
        reduction: Reduction = "mean",
        output: OutputKind = "logits",
        estimator_options: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_estimator_options(method, estimator_options or {})
        check_choice("output", output, OUTPUT_KINDS)
        check_reduction(reduction)
        self.method = method
        self.reduction = reduction
        self.output = output
        self.estimator_options = dict(estimator_options or {})
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, model: torch.nn.Module, inputs: Tensor) -> None:
        """Score `inputs` under `model` and keep the per-sample values."""
        values = fisher_spectral_norm(
            model, inputs, self.method, output=self.output, mode="eval", **self.estimator_options
        )
        self.values.append(values.to(torch.float32))

    def compute(self) -> Tensor:
        values = self.values  # a list before a sync, the concatenated tensor after
        if isinstance(values, list):
            values = dim_zero_cat(values) if values else torch.zeros(0)
        return reduce_values(values, self.reduction)

    def plot(self, val: Optional[Union[Tensor, list[Tensor]]] = None, ax: Any = None) -> Any:
        """Plot the computed value (or a list of values, as a curve), with matplotlib."""
        return self._plot(val, ax)
