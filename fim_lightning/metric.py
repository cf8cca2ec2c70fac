"""`FisherSpectralNorm`: a torchmetrics Metric that accumulates per-sample lambda_max(F(x)) over batches.

Its functional twin is `fim_lightning.fisher_spectral_norm(model, inputs, method, reduction=...)`: the same
arguments (the estimator options as keywords) and, on one batch, the same result.
"""
from typing import Any, List, Optional, Union

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fim_lightning.functional import SpectralMethod, check_estimator_options, fisher_spectral_norm
from fim_lightning.outputs import OUTPUT_KINDS, OutputKind
from fim_lightning.reductions import Reduction, check_reduction, reduce_values
from fim_lightning.validation import check_choice

class FisherSpectralNorm(Metric):
    """Per-sample spectral norm of the input-space Fisher information, lambda_max(J^T (diag p - p p^T) J).

    The model is an `update` argument (as in torchmetrics' PerceptualPathLength), so the metric never owns
    it and its parameters are not registered twice. `update` re-enables the gradients torchmetrics
    disables, scores in eval mode and restores the model's state. States are synced across processes by
    concatenation, so `compute()` over DDP equals the single-process value on the same samples.

    Args:
        method: "auto" (the default: exact for C <= 64 classes, converged Lanczos above), "exact", "power",
            "lanczos" or "gram_sketch" (formerly "hutchinson").
        reduction: "mean", "median", "max", "none" (every per-sample value) or a quantile in [0, 1].
        output: what the model returns: "logits", "probs" or "log_probs".
        estimator_options: options of the method (e.g. `{"top_k": 20}` or `{"num_probes": 32}`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from fim_lightning import FisherSpectralNorm, fisher_spectral_norm
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])   # logits z = W x, 3 classes
        >>> model = nn.Linear(2, 3, bias=False).requires_grad_(False)
        >>> _ = model.weight.copy_(weight)
        >>> x = torch.zeros(4, 2)                                          # p uniform: F = W^T M W
        >>> metric = FisherSpectralNorm(reduction="median")
        >>> metric.update(model, x[:2]); metric.update(model, x[2:])
        >>> m = torch.eye(3) / 3 - torch.full((3, 3), 1 / 9)
        >>> round(metric.compute().item(), 6), round(torch.linalg.eigvalsh(weight.T @ m @ weight)[-1].item(), 6)
        (0.956172, 0.956172)
        >>> round(fisher_spectral_norm(model, x, reduction="median").item(), 6)  # the functional twin
        0.956172
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    values: List[Tensor]

    def __init__(
        self,
        method: SpectralMethod = "auto",
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
        values: Any = self.values  # a list before a sync, the concatenated tensor after
        if isinstance(values, list):
            values = dim_zero_cat(values) if values else torch.zeros(0)
        return reduce_values(values, self.reduction)

    def plot(self, val: Optional[Union[Tensor, list[Tensor]]] = None, ax: Any = None) -> Any:
        """Plot the computed value (or a list of values, as a curve), with matplotlib."""
        return self._plot(val, ax)
