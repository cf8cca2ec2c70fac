"""Closed-form upper bounds on lambda_max(F(x)) from the network's weights, walked layer by layer.

lambda_max(F) = lambda_max(J^T M J) <= lambda_max(M) |J(x)|^2, and lambda_max(M) <= min(max_i 2 p_i (1 - p_i),
p_max) <= 1/2 (Gershgorin; M <= diag(p)). |J(x)| <= the product of the factors below, each a bound on the
Jacobian norm of one stage at the activation it sees. Without inputs every factor is a global Lipschitz
constant L and the bound is L^2 / 2.

Factors (L2 operator norms):
- Linear, Conv, AvgPool, AdaptiveAvgPool: linear maps; the largest singular value on the given input shape
  (padding and stride included), by power iteration on A^T A run to convergence, inflated by its tolerance.
- eval BatchNorm: max |gamma| / sqrt(var + eps). ReLU, Tanh, Identity, Flatten, eval Dropout: 1; Sigmoid 1/4;
  GELU 1.13; SiLU 1.1; LeakyReLU max(1, |slope|); MaxPool: sqrt of the most windows an input is in; the
  package's Normalize: 1 / min std; timm LayerScale: max |gamma|.
- Residual y = f(x) + s(x): L_f + L_s (ResNet BasicBlock / Bottleneck, transformer blocks).
- Dense concatenation y = (x, f(x)): sqrt(1 + L_f^2) (DenseNet blocks).
- LayerNorm: per token the Jacobian is gamma / sigma_t times a projection, so max |gamma| / min_t sqrt(var_t +
  eps) at the data; globally max |gamma| / sqrt(eps) (valid, loose).
- Dot-product attention is not globally Lipschitz: bounded only at given inputs. Per head, with P the
  attention matrix, M_i = diag(P_i) - P_i P_i^T, Q, K, V the projections and s the scale:
  |W_O^h| (|P| |W_V^h| + max_i |M_i V|_F s (|W_Q^h| |K| + |Q| |W_K^h|)), summed over heads (first order at x).
- Class token and position embedding (constants added or inserted), token selection: 1; token mean: 1 / sqrt(n).

Known containers: nn.Sequential and torchvision's MLP, torchvision VGG, ResNet (BasicBlock, Bottleneck),
DenseNet, VisionTransformer, timm's VisionTransformer (Block, Attention, Mlp). Any other module raises a
TypeError that names it, and the walk's output is checked against the model's own forward.

Extension: both tables are `Registry`s keyed by a module class (subclasses match) or, for libraries that are
not imported here (torchvision, timm), a qualified class name ("torchvision.models.resnet.BasicBlock": a bare
"BasicBlock" would match every class of that name); registering a key twice warns.
`register_layer_bound(MyLayer, fn)` with fn(layer, input_shape) -> L for a leaf layer;
`register_block_bound(MyBlock, handler)` with handler(walk, name, module, x) -> (output, [(name, factor (B,)),
...]) for a container, which can call `walk.chain`, `walk.product` and `walk.residual` on its parts.

Modules: `registry` (the tables' type), `layers` (leaf layers, LayerNorm and attention factors), `walk` (the
stage-by-stage walk and its output check), `architectures` (the known containers' handlers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from fim_lightning.bounds import architectures  # noqa: F401  (registers the known containers)
from fim_lightning.bounds.layers import LAYER_BOUNDS, GramOperator, layer_lipschitz, linear_operator_norm
from fim_lightning.bounds.layers import register_layer_bound
from fim_lightning.bounds.registry import Registry
from fim_lightning.bounds.walk import BLOCK_BOUNDS, Walk, lipschitz_layers, register_block_bound

__all__ = ["BLOCK_BOUNDS", "LAYER_BOUNDS", "GramOperator", "Registry", "SpectralBound", "Walk",
           "fisher_spectral_bound", "layer_lipschitz", "linear_operator_norm", "lipschitz_layers",
           "register_block_bound", "register_layer_bound"]


@dataclass(frozen=True)
class SpectralBound:
    """An upper bound on lambda_max(F) and where it comes from.

    Attributes:
        value: (B,) with inputs (uses p(x) and the activations), else a 0-dim tensor (L^2 / 2).
        lipschitz: the bound on |J(x)| (B,), or the global Lipschitz constant L (0-dim).
        layers: (name, factor) per stage in order, factors shaped like `lipschitz`; their product is `lipschitz`.
    """

    value: Tensor
    lipschitz: Tensor
    layers: list[tuple[str, Tensor]]

    def figure(self) -> Figure:
        """Bar chart of log10 of each stage's factor (median over samples): which stages dominate."""
        from fim_lightning.figures import new_figure

        names = [name for name, _ in self.layers]
        logs = [factor.double().median().log10().item() for _, factor in self.layers]
        figure = new_figure(width=max(5.0, 0.25 * len(names)), height=3.5)
        ax = figure.add_subplot()
        ax.bar(range(len(names)), logs)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize="x-small")
        ax.set_ylabel("log10 factor")
        ax.set_title(f"bound on |J|: 10^{sum(logs):.2f}")
        return figure


def fisher_spectral_bound(model: nn.Module, inputs: Optional[Tensor] = None,
                          input_shape: Optional[tuple[int, ...]] = None) -> SpectralBound:
    """An upper bound on lambda_max(F(x)): per sample with `inputs` (lambda_max(M(p)) prod_l |J_l(x)|^2),
    else the global L^2 / 2 (every factor a Lipschitz constant; attention then raises)."""
    if inputs is None:
        if input_shape is None:
            raise ValueError("give inputs (a per-sample bound) or input_shape (a global bound)")
        parameter = next(model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        _, layers = lipschitz_layers(model, torch.zeros((1, *input_shape), dtype=dtype), local=False)
        layers = [(name, factor[0]) for name, factor in layers]
        lipschitz = math.prod((f for _, f in layers), start=torch.tensor(1.0, dtype=torch.float64))
        return SpectralBound(0.5 * lipschitz**2, lipschitz, layers)
    logits, layers = lipschitz_layers(model, inputs, local=True)
    lipschitz = math.prod((f for _, f in layers), start=torch.ones(len(inputs), dtype=torch.float64))
    log_p = logits.double().log_softmax(-1)
    classes = log_p.shape[1]
    excluded = torch.eye(classes, dtype=torch.bool, device=log_p.device)
    others = log_p[:, None, :].masked_fill(excluded, -math.inf).logsumexp(-1).exp()  # 1 - p_i, no cancellation
    p = log_p.exp()
    metric = torch.minimum((2 * p * others).max(1).values, p.max(1).values).clamp(max=0.5)
    return SpectralBound(metric.cpu() * lipschitz.square(), lipschitz, layers)
