"""Leaf layers' Lipschitz constants (L2 operator norms) and the two factors measured at the data: LayerNorm
and dot-product attention (formulas in `fim_lightning.bounds`)."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from fim_lightning.algorithms import power_iteration
from fim_lightning.bounds.registry import Key, Registry
from fim_lightning.linear_operator import PerSampleOperator

_ACTIVATION_CONSTANTS = {nn.ReLU: 1.0, nn.Tanh: 1.0, nn.Identity: 1.0, nn.Flatten: 1.0, nn.Sigmoid: 0.25,
                         nn.GELU: 1.13, nn.SiLU: 1.1, nn.Dropout: 1.0}
_LINEAR_MAPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_POWER_TOL = 1e-7


class GramOperator(PerSampleOperator):
    """A^T A for a linear map `apply` on inputs shaped like `like`, the adjoint by autograd (every sample
    trusted: the base's `screen` and `nan_invalid`)."""

    def __init__(self, apply: Callable[[Tensor], Tensor], like: Tensor) -> None:
        self.apply, self.inputs = apply, like

    def matvec(self, v: Tensor) -> Tensor:
        v = v.detach().requires_grad_(True)
        out = self.apply(v)
        (gram_v,) = torch.autograd.grad(out, v, out)
        return gram_v.detach()


def linear_operator_norm(layer: nn.Module, input_shape: tuple[int, ...], max_iter: int = 2000) -> float:
    """Largest singular value of a linear layer (bias dropped) as a map on inputs of `input_shape`,
    by power iteration on A^T A; the result is inflated by the stopping tolerance."""
    dtype = torch.float64
    x = torch.zeros((1, *input_shape), dtype=dtype)

    def apply(v: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(v, layer.weight.detach().to(dtype))
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return layer._conv_forward(v, layer.weight.detach().to(dtype), None)
        return layer(v)

    with torch.enable_grad():
        value = power_iteration(GramOperator(apply, x), max_iter=max_iter, tol=_POWER_TOL,
                                generator=torch.Generator().manual_seed(0)).eigenvalue.item()
    return math.sqrt(max(value, 0.0)) * (1 + 10 * _POWER_TOL)


def _batchnorm(layer: nn.modules.batchnorm._BatchNorm, input_shape: tuple[int, ...]) -> float:
    if layer.running_var is None:
        raise ValueError(f"{layer} has no running statistics: a bound needs eval-mode BatchNorm")
    scale = (layer.running_var + layer.eps).rsqrt()
    if layer.weight is not None:
        scale = scale * layer.weight.detach()
    return scale.abs().max().item()


def _max_pool(layer: Any, input_shape: tuple[int, ...]) -> float:
    kernel, stride = layer.kernel_size, layer.stride
    kernel = kernel if isinstance(kernel, int) else max(kernel)
    stride = stride if isinstance(stride, int) else min(stride)
    overlap = math.ceil(kernel / stride)
    return math.sqrt(overlap ** (2 if isinstance(layer, nn.MaxPool2d) else 1))


LayerBound = Callable[[Any, tuple[int, ...]], float]  # each registered for its own layer class


def constant_bound(value: float) -> LayerBound:
    """A layer bound that does not depend on the layer (activations: ReLU 1, Sigmoid 1/4, ...)."""
    return lambda layer, input_shape: value


def _layer_scale(layer: Any, input_shape: tuple[int, ...]) -> float:
    return layer.gamma.detach().abs().max().item()


LAYER_BOUNDS = Registry("layer")
_KNOWN: dict[Key, LayerBound] = {
    **{kind: linear_operator_norm for kind in _LINEAR_MAPS},
    nn.modules.batchnorm._BatchNorm: _batchnorm,
    nn.LeakyReLU: lambda layer, shape: max(1.0, abs(float(layer.negative_slope))),
    nn.MaxPool1d: _max_pool,
    nn.MaxPool2d: _max_pool,
    "timm.layers.layer_scale.LayerScale": _layer_scale,
    "timm.models.vision_transformer.LayerScale": _layer_scale,  # older timm
    "timm.layers.drop.DropPath": constant_bound(1.0),  # the identity in eval mode
    **{kind: constant_bound(constant) for kind, constant in _ACTIVATION_CONSTANTS.items()},
}
for _key, _bound in _KNOWN.items():
    LAYER_BOUNDS.register(_key, _bound)


def register_layer_bound(key: Key, bound: LayerBound) -> None:
    """Bound leaf layers of class `key` (a class, or the qualified name "package.module.Class" of one) by
    bound(layer, input_shape) -> L; a key registered already warns and is replaced."""
    LAYER_BOUNDS.register(key, bound)


def layer_lipschitz(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """The L2 Lipschitz constant of one leaf layer on inputs of `input_shape` (`fim_lightning.bounds`)."""
    bound = LAYER_BOUNDS.lookup(layer)
    if bound is None:
        raise TypeError(f"no Lipschitz bound is known for {type(layer).__name__}; supported: Linear, Conv, "
                        "BatchNorm (eval), LayerNorm, pooling, the common activations, the containers listed in "
                        "fim_lightning.bounds, and what `register_layer_bound` adds")
    return bound(layer, input_shape)


def layer_norm_factor(layer: nn.LayerNorm, x: Tensor, local: bool) -> Tensor:
    """max |gamma| / min over tokens sqrt(var + eps) at the data (local), or max |gamma| / sqrt(eps)."""
    gamma = layer.weight.detach().abs().max().item() if layer.weight is not None else 1.0
    if not local:
        return torch.full((len(x),), gamma / math.sqrt(layer.eps), dtype=torch.float64)
    dims = tuple(range(-len(layer.normalized_shape), 0))
    variance = x.double().var(dim=dims, unbiased=False)
    return gamma * (variance + layer.eps).rsqrt().reshape(len(x), -1).max(1).values


def attention_factor(x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Optional[Tensor], ...],
                     out_weight: Tensor, out_bias: Optional[Tensor], heads: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Multi-head self-attention of x (B, n, D) and the bound on its Jacobian norm at x (`fim_lightning.bounds`)."""
    batch, tokens, width = x.shape
    head_dim = width // heads
    xd = x.double()

    def project(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        out = xd @ weight.double().T + (bias.double() if bias is not None else 0.0)
        return out.view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, h, n, dh)

    q, k, v = (project(w, b) for w, b in zip(weights, biases))
    p = (scale * q @ k.transpose(-1, -2)).softmax(-1)  # (B, h, n, n)
    mean_v = p @ v  # (B, h, n, dh): row i is sum_j P_ij v_j
    centred = v.unsqueeze(2) - mean_v.unsqueeze(3)  # (B, h, n_i, n_j, dh)
    mv = (p.square().unsqueeze(-1) * centred.square()).sum((-1, -2)).sqrt().max(-1).values  # max_i |M_i V|_F
    per_head = lambda w: torch.linalg.matrix_norm(w.double().view(heads, head_dim, width), 2)  # noqa: E731
    wq, wk, wv = (per_head(w) for w in weights)
    wo = torch.linalg.matrix_norm(out_weight.double().view(width, heads, head_dim).transpose(0, 1), 2)
    norm2 = lambda a: torch.linalg.matrix_norm(a, 2)  # noqa: E731
    factor = wo * (norm2(p) * wv + mv * scale * (wq * norm2(k) + norm2(q) * wk))
    out = mean_v.transpose(1, 2).reshape(batch, tokens, width) @ out_weight.double().T
    if out_bias is not None:
        out = out + out_bias.double()
    return out.to(x.dtype), factor.sum(1)
