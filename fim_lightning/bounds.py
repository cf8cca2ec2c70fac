"""Closed-form upper bounds on lambda_max(F(x)) from layer Lipschitz constants (sequential networks).

lambda_max(F) = lambda_max(J^T M J) <= lambda_max(M) |J|^2 <= lambda_max(M) L^2, with L the product of the
layers' Lipschitz constants (L2 operator norms) and lambda_max(M) <= min(max_i 2 p_i (1 - p_i), p_max) <= 1/2
(Gershgorin; M <= diag(p)). Without inputs the bound is L^2 / 2.

Per layer: Linear, Conv2d, AvgPool and AdaptiveAvgPool are linear maps, whose operator norm on the given
input shape (padding and stride included) comes from power iteration on their Gram operator with autograd,
run to convergence and inflated by its tolerance; eval-mode BatchNorm: max |gamma| / sqrt(var + eps);
ReLU / Tanh / Identity / Flatten / eval-mode Dropout: 1; Sigmoid: 1/4; GELU: 1.13; SiLU: 1.1; LeakyReLU:
max(1, slope); MaxPool: sqrt of the most windows any input is in; the package's `Normalize`: 1 / min std.
Any other module raises: the bound never guesses. Residual, dense and attention blocks are not handled yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from fim_lightning.guard import preserved_state
from fim_lightning.models import Normalize

_ACTIVATION_CONSTANTS = {nn.ReLU: 1.0, nn.Tanh: 1.0, nn.Identity: 1.0, nn.Flatten: 1.0, nn.Sigmoid: 0.25,
                         nn.GELU: 1.13, nn.SiLU: 1.1, nn.Dropout: 1.0}
_LINEAR_MAPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_POWER_TOL = 1e-7


@dataclass(frozen=True)
class SpectralBound:
    """An upper bound on lambda_max(F) and where it comes from.

    Attributes:
        value: (B,) with inputs (uses p(x)), else a 0-dim tensor (L^2 / 2).
        lipschitz: L, the product of the layer constants.
        layers: (name, constant) per layer, in order: which layers dominate the bound.
    """

    value: Tensor
    lipschitz: float
    layers: list[tuple[str, float]]


def linear_operator_norm(layer: nn.Module, input_shape: tuple[int, ...], max_iter: int = 2000) -> float:
    """Largest singular value of a linear layer (bias dropped) as a map on inputs of `input_shape`,
    by power iteration on A^T A; the result is inflated by the stopping tolerance to stay an upper bound."""
    dtype = torch.float64
    x = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0), dtype=dtype)

    def apply(v: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(v, layer.weight.detach().to(dtype))
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return layer._conv_forward(v, layer.weight.detach().to(dtype), None)
        return layer(v)

    with torch.enable_grad():
        value = _power_iteration(apply, x, max_iter)
    return math.sqrt(max(value, 0.0)) * (1 + 10 * _POWER_TOL)


def _power_iteration(apply, x: Tensor, max_iter: int) -> float:
    """Top eigenvalue of A^T A for the linear map `apply`, the adjoint by autograd."""
    value = 0.0
    for _ in range(max_iter):
        x = x / x.norm()
        v = x.detach().requires_grad_(True)
        out = apply(v)
        (gram_x,) = torch.autograd.grad(out, v, out)
        new = (x * gram_x).sum().item()
        converged = abs(new - value) <= _POWER_TOL * max(new, 1e-300)
        value, x = new, gram_x.detach()
        if converged:
            break
    return value


def layer_lipschitz(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """The L2 Lipschitz constant of one layer on inputs of `input_shape` (see the module docstring)."""
    if isinstance(layer, _LINEAR_MAPS):
        return linear_operator_norm(layer, input_shape)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if layer.training or layer.running_var is None:
            raise ValueError(f"{layer} must be in eval mode with running statistics for a bound")
        scale = (layer.running_var + layer.eps).rsqrt()
        if layer.weight is not None:
            scale = scale * layer.weight.detach()
        return scale.abs().max().item()
    if isinstance(layer, nn.LeakyReLU):
        return max(1.0, abs(layer.negative_slope))
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d)):
        kernel, stride = layer.kernel_size, layer.stride
        kernel = kernel if isinstance(kernel, int) else max(kernel)
        stride = stride if isinstance(stride, int) else min(stride)
        overlap = math.ceil(kernel / stride)
        return math.sqrt(overlap ** (2 if isinstance(layer, nn.MaxPool2d) else 1))
    if isinstance(layer, Normalize):
        return 1.0 / layer.std.min().item()
    for kind, constant in _ACTIVATION_CONSTANTS.items():
        if type(layer) is kind:
            return constant
    raise TypeError(f"no Lipschitz bound is known for {type(layer).__name__}; supported: sequential stacks of "
                    "Linear, Conv, BatchNorm (eval), pooling, Normalize and the common activations")


def lipschitz_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, float]]:
    """(name, constant) for each leaf of a sequential `model`, with shapes propagated from `input_shape`."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"fisher_spectral_bound walks nn.Sequential models; got {type(model).__name__}")
    layers, shape = [], tuple(input_shape)
    with preserved_state(model, mode="eval"), torch.no_grad():
        parameter = next(model.parameters(), None)
        probe = torch.zeros((1, *shape), dtype=parameter.dtype if parameter is not None else torch.float32)
        for name, layer in model.named_children():
            if isinstance(layer, nn.Sequential):
                layers += [(f"{name}.{inner}", value) for inner, value in lipschitz_layers(layer, shape)]
            else:
                layers.append((name, layer_lipschitz(layer, shape)))
            probe = layer(probe)
            shape = tuple(probe.shape[1:])
    return layers


def fisher_spectral_bound(model: nn.Module, inputs: Optional[Tensor] = None,
                          input_shape: Optional[tuple[int, ...]] = None) -> SpectralBound:
    """An upper bound on lambda_max(F(x)): per sample with `inputs` (lambda_max(M(p)) L^2), else L^2 / 2."""
    if inputs is None and input_shape is None:
        raise ValueError("give inputs (a per-sample bound) or input_shape (a global bound)")
    shape = tuple(inputs.shape[1:]) if inputs is not None else tuple(input_shape)
    layers = lipschitz_layers(model, shape)
    lipschitz = math.prod(value for _, value in layers)
    if inputs is None:
        return SpectralBound(torch.tensor(0.5 * lipschitz**2, dtype=torch.float64), lipschitz, layers)
    with preserved_state(model, inputs, mode="eval"), torch.no_grad():
        log_p = model(inputs).double().log_softmax(-1)
    classes = log_p.shape[1]
    excluded = torch.eye(classes, dtype=torch.bool, device=log_p.device)
    others = log_p[:, None, :].masked_fill(excluded, -math.inf).logsumexp(-1).exp()  # 1 - p_i, no cancellation
    p = log_p.exp()
    metric = torch.minimum((2 * p * others).max(1).values, p.max(1).values).clamp(max=0.5)
    return SpectralBound(metric * lipschitz**2, lipschitz, layers)
