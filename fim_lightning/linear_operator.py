"""The base of the per-sample operators that the spectral algorithms run on, as curvlinops' `_torch_base`.

`FisherOperator` (the Fisher of a classifier) and `bounds.GramOperator` (A^T A of a linear layer map) subclass
it; `algorithms.power_iteration` and `algorithms.lanczos` take any subclass.
"""
from __future__ import annotations

from torch import Tensor


class PerSampleOperator:
    """A symmetric positive semi-definite operator per sample of a batch.

    Attributes:
        inputs: (B, ...): the shape, dtype and device of the vectors the operator acts on.

    `matvec` is the product, one vector per sample. `screen` and `nan_invalid` are where an operator marks
    samples it cannot trust (a non-finite Jacobian): here every sample is kept.
    """

    inputs: Tensor

    def matvec(self, vectors: Tensor) -> Tensor:
        raise NotImplementedError

    def screen(self, values: Tensor, cause: str) -> Tensor:
        """`values` (B, ...) with the samples that are or become invalid set to 0 (none here)."""
        return values

    def nan_invalid(self, values: Tensor) -> Tensor:
        """`values` (B, ...) with NaN for the invalid samples (none here)."""
        return values
