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

Extension: both tables are registries keyed by a module class (subclasses match) or, for libraries that are
not imported here (torchvision, timm), a class name. `register_layer_bound(MyLayer, fn)` with
fn(layer, input_shape) -> L for a leaf layer; `register_block_bound(MyBlock, handler)` with
handler(walk, name, module, x) -> (output, [(name, factor (B,)), ...]) for a container, which can call
`walk.chain`, `walk.product` and `walk.residual` on its parts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from fim_lightning.algorithms import power_iteration
from fim_lightning.guard import preserved_state
from fim_lightning.linear_operator import PerSampleOperator

_ACTIVATION_CONSTANTS = {nn.ReLU: 1.0, nn.Tanh: 1.0, nn.Identity: 1.0, nn.Flatten: 1.0, nn.Sigmoid: 0.25,
                         nn.GELU: 1.13, nn.SiLU: 1.1, nn.Dropout: 1.0}
_LINEAR_MAPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_POWER_TOL = 1e-7


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


def _batchnorm(layer: nn.modules.batchnorm._BatchNorm, input_shape: tuple[int, ...]) -> float:
    if layer.running_var is None:
        raise ValueError(f"{layer} has no running statistics: a bound needs eval-mode BatchNorm")
    scale = (layer.running_var + layer.eps).rsqrt()
    if layer.weight is not None:
        scale = scale * layer.weight.detach()
    return scale.abs().max().item()


def _max_pool(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    kernel, stride = layer.kernel_size, layer.stride
    kernel = kernel if isinstance(kernel, int) else max(kernel)
    stride = stride if isinstance(stride, int) else min(stride)
    overlap = math.ceil(kernel / stride)
    return math.sqrt(overlap ** (2 if isinstance(layer, nn.MaxPool2d) else 1))


LayerBound = Callable[[nn.Module, tuple[int, ...]], float]


def constant_bound(value: float) -> LayerBound:
    """A layer bound that does not depend on the layer (activations: ReLU 1, Sigmoid 1/4, ...)."""
    return lambda layer, input_shape: value


LAYER_BOUNDS: dict[object, LayerBound] = {
    **{kind: linear_operator_norm for kind in _LINEAR_MAPS},
    nn.modules.batchnorm._BatchNorm: _batchnorm,
    nn.LeakyReLU: lambda layer, shape: max(1.0, abs(layer.negative_slope)),
    nn.MaxPool1d: _max_pool,
    nn.MaxPool2d: _max_pool,
    "LayerScale": lambda layer, shape: layer.gamma.detach().abs().max().item(),  # timm
    "DropPath": constant_bound(1.0),  # timm, the identity in eval mode
    **{kind: constant_bound(constant) for kind, constant in _ACTIVATION_CONSTANTS.items()},
}


def register_layer_bound(key: object, bound: LayerBound) -> None:
    """Bound leaf layers of class `key` (a class, or a class name) by bound(layer, input_shape) -> L."""
    LAYER_BOUNDS[key] = bound


def _lookup(table: dict, module: nn.Module) -> Optional[Callable]:
    """The entry for the closest class of `module` (by type, then by class name), else None."""
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return table.get(type(module).__name__)


def layer_lipschitz(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """The L2 Lipschitz constant of one leaf layer on inputs of `input_shape` (see the module docstring)."""
    bound = _lookup(LAYER_BOUNDS, layer)
    if bound is None:
        raise TypeError(f"no Lipschitz bound is known for {type(layer).__name__}; supported: Linear, Conv, "
                        "BatchNorm (eval), LayerNorm, pooling, the common activations, the containers listed in "
                        "fim_lightning.bounds, and what `register_layer_bound` adds")
    return bound(layer, input_shape)


def _layer_norm_factor(layer: nn.LayerNorm, x: Tensor, local: bool) -> Tensor:
    """max |gamma| / min over tokens sqrt(var + eps) at the data (local), or max |gamma| / sqrt(eps)."""
    gamma = layer.weight.detach().abs().max().item() if layer.weight is not None else 1.0
    if not local:
        return torch.full((len(x),), gamma / math.sqrt(layer.eps), dtype=torch.float64)
    dims = tuple(range(-len(layer.normalized_shape), 0))
    variance = x.double().var(dim=dims, unbiased=False)
    return gamma * (variance + layer.eps).rsqrt().reshape(len(x), -1).max(1).values


def _attention(x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Optional[Tensor], ...], out_weight: Tensor,
               out_bias: Optional[Tensor], heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """Multi-head self-attention of x (B, n, D) and the bound on its Jacobian norm at x (module docstring)."""
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


class _Walk:
    """Runs a model stage by stage, returning its output and the per-stage factors (B,) of the bound."""

    def __init__(self, local: bool) -> None:
        self.local = local

    def chain(self, stages: list[tuple[str, nn.Module]], x: Tensor, prefix: str = "") -> tuple[Tensor, list]:
        factors = []
        for name, module in stages:
            x, inner = self.stage(f"{prefix}{name}", module, x)
            factors += [(label, factor.cpu()) for label, factor in inner]
        return x, factors

    def product(self, stages: list[tuple[str, nn.Module]], x: Tensor, prefix: str = "") -> tuple[Tensor, Tensor]:
        x, factors = self.chain(stages, x, prefix)
        return x, math.prod((f for _, f in factors), start=torch.ones(len(x), dtype=torch.float64))

    def residual(self, name: str, branch: list, x: Tensor, shortcut: Optional[nn.Module] = None):
        """y = f(x) + s(x) and L_f + L_s (s the identity when `shortcut` is None)."""
        out, lf = self.product(branch, x, f"{name}.")
        short, ls = self.product([("downsample", shortcut)], x, f"{name}.") if shortcut is not None else (x, 1.0)
        return out + short, lf + ls

    def stage(self, name: str, module: nn.Module, x: Tensor) -> tuple[Tensor, list[tuple[str, Tensor]]]:
        handler = _lookup(BLOCK_BOUNDS, module)
        if handler is not None:
            return handler(self, name, module, x)
        if list(module.children()):
            raise TypeError(f"no bound is known for {type(module).__name__} ({name or 'the model'}); supported "
                            "containers: nn.Sequential, torchvision VGG/ResNet/DenseNet/VisionTransformer, timm "
                            "VisionTransformer, and what `register_block_bound` adds")
        factor = layer_lipschitz(module, tuple(x.shape[1:]))
        return module(x), [(name, torch.full((len(x),), factor, dtype=torch.float64))]

    def attention(self, name, x, weights, biases, out_proj, heads, scale, batch_first):
        if not self.local:
            raise ValueError(f"{name}: dot-product attention is not globally Lipschitz; pass inputs for a "
                             "bound at the data")
        if not batch_first:
            raise TypeError(f"{name}: only batch_first attention is supported")
        y, factor = _attention(x, tuple(w.detach() for w in weights),
                               tuple(b.detach() if b is not None else None for b in biases),
                               out_proj.weight.detach(), out_proj.bias, heads, scale)
        return y, [(name, factor)]

    def torchvision_vit(self, name: str, module: nn.Module, x: Tensor):
        prefix = f"{name}." if name else ""
        y, factors = self.chain([("conv_proj", module.conv_proj)], x, prefix)
        y = y.flatten(2).transpose(1, 2)
        y = torch.cat([module.class_token.expand(len(y), -1, -1), y], 1) + module.encoder.pos_embedding
        y, inner = self.chain([("dropout", module.encoder.dropout), ("layers", module.encoder.layers),
                               ("ln", module.encoder.ln)], y, f"{prefix}encoder.")
        y, head = self.chain([("heads", module.heads)], y[:, 0], prefix)
        return y, factors + inner + head

    def timm_vit(self, name: str, module: nn.Module, x: Tensor):
        prefix = f"{name}." if name else ""
        embed = module.patch_embed
        if not getattr(embed, "flatten", True) or getattr(module, "dynamic_img_size", False):
            raise TypeError(f"no bound is known for this timm VisionTransformer layout ({name or 'the model'})")
        y, factors = self.chain([("patch_embed.proj", embed.proj)], x, prefix)
        y, inner = self.chain([("patch_embed.norm", embed.norm)], y.flatten(2).transpose(1, 2), prefix)
        y = module._pos_embed(y)
        stages = [("patch_drop", module.patch_drop), ("norm_pre", module.norm_pre), ("blocks", module.blocks),
                  ("norm", module.norm)]
        y, body = self.chain(stages, y, prefix)
        if module.global_pool == "token":
            y, pool = y[:, 0], torch.ones(len(y), dtype=torch.float64)
        elif module.global_pool == "avg":
            rest = y[:, module.num_prefix_tokens:]
            y, pool = rest.mean(1), torch.full((len(y),), rest.shape[1] ** -0.5, dtype=torch.float64)
        else:
            raise TypeError(f"no bound is known for timm global_pool={module.global_pool!r}")
        y, head = self.chain([("fc_norm", module.fc_norm), ("head_drop", module.head_drop), ("head", module.head)],
                             y, prefix)
        return y, factors + inner + body + [(f"{prefix}pool", pool)] + head


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _sequential(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    return walk.chain(list(module.named_children()), x, _prefix(name))


def _resnet(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    stages = [(n, getattr(module, n)) for n in order] + [("flatten", nn.Flatten()), ("fc", module.fc)]
    return walk.chain(stages, x, _prefix(name))


def _residual_block(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    depth = 2 if type(module).__name__ == "BasicBlock" else 3
    branch = [(n, getattr(module, n)) for i in range(1, depth + 1) for n in (f"conv{i}", f"bn{i}", "relu")][:-1]
    y, factor = walk.residual(name, branch, x, module.downsample)
    return torch.relu(y), [(name, factor)]


def _vgg(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    stages = [("features", module.features), ("avgpool", module.avgpool), ("flatten", nn.Flatten()),
              ("classifier", module.classifier)]
    return walk.chain(stages, x, _prefix(name))


def _densenet(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    stages = [("features", module.features), ("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
              ("flatten", nn.Flatten()), ("classifier", module.classifier)]
    return walk.chain(stages, x, _prefix(name))


def _dense_block(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    factor = torch.ones(len(x), dtype=torch.float64)
    for _, layer in module.named_children():
        order = ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
        new, lf = walk.product([(n, getattr(layer, n)) for n in order], x, f"{name}.")
        x, factor = torch.cat([x, new], 1), factor * (1 + lf.square()).sqrt()
    return x, [(name, factor)]


def _vision_transformer(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    if hasattr(module, "conv_proj"):
        return walk.torchvision_vit(name, module, x)
    if hasattr(module, "patch_embed"):
        return walk.timm_vit(name, module, x)
    raise TypeError(f"no bound is known for this VisionTransformer ({name or 'the model'})")


def _encoder_block(walk: _Walk, name: str, module: nn.Module, x: Tensor):  # torchvision ViT
    y, f1 = walk.residual(name, [("ln_1", module.ln_1), ("self_attention", module.self_attention)], x)
    z, f2 = walk.residual(name, [("ln_2", module.ln_2), ("mlp", module.mlp)], y)
    return z, [(f"{name}.attention", f1), (f"{name}.mlp", f2)]


def _timm_block(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    if not hasattr(module, "ls1"):
        raise TypeError(f"no bound is known for this timm Block ({name})")
    first = [("norm1", module.norm1), ("attn", module.attn), ("ls1", module.ls1), ("drop", module.drop_path1)]
    y, f1 = walk.residual(name, first, x)
    second = [("norm2", module.norm2), ("mlp", module.mlp), ("ls2", module.ls2), ("drop", module.drop_path2)]
    z, f2 = walk.residual(name, second, y)
    return z, [(f"{name}.attention", f1), (f"{name}.mlp", f2)]


def _multihead_attention(walk: _Walk, name: str, module: nn.MultiheadAttention, x: Tensor):
    biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    return walk.attention(name, x, module.in_proj_weight.chunk(3), biases, module.out_proj, module.num_heads,
                          module.head_dim ** -0.5, module.batch_first)


def _timm_attention(walk: _Walk, name: str, module: nn.Module, x: Tensor):
    if not hasattr(module, "qkv"):
        raise TypeError(f"no bound is known for this Attention ({name})")
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(module, part, nn.Identity()), nn.Identity):
            raise TypeError(f"no bound is known for timm Attention with {part} ({name})")
    if getattr(module, "gate", None) is not None:
        raise TypeError(f"no bound is known for gated timm Attention ({name})")
    biases = module.qkv.bias.chunk(3) if module.qkv.bias is not None else (None,) * 3
    return walk.attention(name, x, module.qkv.weight.chunk(3), biases, module.proj, module.num_heads, module.scale,
                          True)


def _layer_norm(walk: _Walk, name: str, module: nn.LayerNorm, x: Tensor):
    return module(x), [(name, _layer_norm_factor(module, x, walk.local))]


BlockBound = Callable[[_Walk, str, nn.Module, Tensor], tuple[Tensor, list[tuple[str, Tensor]]]]
BLOCK_BOUNDS: dict[object, BlockBound] = {
    nn.Sequential: _sequential, "MLP": _sequential, "Mlp": _sequential, "_Transition": _sequential,
    "ResNet": _resnet, "BasicBlock": _residual_block, "Bottleneck": _residual_block,
    "VGG": _vgg, "DenseNet": _densenet, "_DenseBlock": _dense_block,
    "VisionTransformer": _vision_transformer, "EncoderBlock": _encoder_block, "Block": _timm_block,
    nn.MultiheadAttention: _multihead_attention, "Attention": _timm_attention, nn.LayerNorm: _layer_norm,
}


def register_block_bound(key: object, handler: BlockBound) -> None:
    """Bound containers of class `key` (a class, or a class name) with handler(walk, name, module, x) ->
    (output, [(name, factor), ...]) (module docstring)."""
    BLOCK_BOUNDS[key] = handler


def lipschitz_layers(model: nn.Module, inputs: Tensor, local: bool) -> tuple[Tensor, list[tuple[str, Tensor]]]:
    """Walk `model` on `inputs`; (the walk's output, (name, factor (B,)) per stage). Checks the output
    against the model's forward so an architecture read wrongly can never pass as a bound."""
    with preserved_state(model, inputs, mode="eval"), torch.no_grad():
        output, factors = _Walk(local).stage("", model, inputs)
        expected = model(inputs)
    if isinstance(expected, Tensor) and output.shape == expected.shape:
        scale = expected.abs().max().clamp_min(1e-12)
        if ((output - expected).abs().max() / scale).item() < 1e-4:
            return output, factors
    raise TypeError(f"the bound's walk of {type(model).__name__} does not reproduce its forward; a layer "
                    "computes something the bound does not know")


def fisher_spectral_bound(model: nn.Module, inputs: Optional[Tensor] = None,
                          input_shape: Optional[tuple[int, ...]] = None) -> SpectralBound:
    """An upper bound on lambda_max(F(x)): per sample with `inputs` (lambda_max(M(p)) prod_l |J_l(x)|^2),
    else the global L^2 / 2 (every factor a Lipschitz constant; attention then raises)."""
    if inputs is None and input_shape is None:
        raise ValueError("give inputs (a per-sample bound) or input_shape (a global bound)")
    if inputs is None:
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
