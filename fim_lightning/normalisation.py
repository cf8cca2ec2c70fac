"""Normalisation layers as elementary tensor operations, so that derivatives of every order are right.

A Fisher penalty differentiates a forward-mode product, |W J v|^2, with respect to the parameters
(reverse over forward). In torch 2.14 the fused kernels get that wrong for `layer_norm` (PyTorch's tracker:
"layer_norm returns an incorrect second-order JVP") and for batch / instance normalisation with batch
statistics: on a Linear-LayerNorm-Linear model the spectral penalty's directional derivative was -0.31
where finite differences of the dense lambda_max give -0.45. Inside `elementary_normalisation()` the
functional normalisations (`F.layer_norm`, `F.group_norm`, `F.batch_norm`, `F.instance_norm`,
`F.rms_norm`, which every `nn` normalisation layer calls) are computed from means, biased variances and
`rsqrt`: the same values to rounding, with derivatives that autograd composes exactly in every mode.
Running statistics, where a call updates them, are updated as the fused kernels do (unbiased variance).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalise(x: Tensor, dims: list[int], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mean) / sqrt(var + eps) over `dims` (biased variance), with the mean and variance."""
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps), mean, var


def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
                    momentum: float) -> None:
    with torch.no_grad():
        unbiased = var * count / max(count - 1, 1)
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    dims = list(range(input.ndim - len(tuple(normalized_shape)), input.ndim))
    shape = tuple(input.shape[d] for d in dims)
    return _affine(_normalise(input, dims, eps)[0], weight, bias, shape)


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    dims = list(range(input.ndim - len(tuple(normalized_shape)), input.ndim))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = input * torch.rsqrt(input.square().mean(dims, keepdim=True) + eps)
    return _affine(y, weight, None, tuple(input.shape[d] for d in dims))


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    grouped = input.reshape(input.shape[0], num_groups, -1)
    y = _normalise(grouped, [2], eps)[0].reshape(input.shape)
    return _affine(y, weight, bias, (1, -1, *([1] * (input.ndim - 2))))


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    shape = (1, -1, *([1] * (input.ndim - 2)))
    if training or running_mean is None or running_var is None:
        dims = [0, *range(2, input.ndim)]
        y, mean, var = _normalise(input, dims, eps)
        if training and running_mean is not None and running_var is not None:
            _update_running(running_mean, running_var, mean.flatten(), var.flatten(), input.numel() // input.shape[1],
                            momentum)
    else:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape)


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    shape = (1, -1, *([1] * (input.ndim - 2)))
    if use_input_stats or running_mean is None or running_var is None:
        y, mean, var = _normalise(input, list(range(2, input.ndim)), eps)
        if running_mean is not None and running_var is not None:
            _update_running(running_mean, running_var, mean.flatten(1).mean(0), var.flatten(1).mean(0),
                            input[0, 0].numel(), momentum)
    else:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape)


ELEMENTARY: dict[Callable, Callable] = {
    F.layer_norm: layer_norm,
    F.rms_norm: rms_norm,
    F.group_norm: group_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
}


class elementary_normalisation(TorchFunctionMode):
    """Inside this mode the functional normalisations run as elementary operations (see the module)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return ELEMENTARY.get(func, func)(*args, **(kwargs or {}))
