"""`Walk`: runs a model stage by stage, returning its output and the bound's factor of each stage; containers
are handled by the `BLOCK_BOUNDS` registry (`fim_lightning.bounds.architectures`), leaf layers by `LAYER_BOUNDS`."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fim_lightning.bounds.layers import attention_factor, layer_lipschitz
from fim_lightning.bounds.registry import Key, Registry
from fim_lightning.guard import preserved_state

Factors = list[tuple[str, Tensor]]


class Walk:
    """The walk of one model: `local` (at the data, per sample) or global (every factor a Lipschitz constant).
    A block handler calls `chain`, `product` and `residual` on its parts."""

    def __init__(self, local: bool) -> None:
        self.local = local

    def chain(self, stages: list[tuple[str, nn.Module]], x: Tensor, prefix: str = "") -> tuple[Tensor, Factors]:
        """The stages in order: their output and every factor."""
        factors = []
        for name, module in stages:
            x, inner = self.stage(f"{prefix}{name}", module, x)
            factors += [(label, factor.cpu()) for label, factor in inner]
        return x, factors

    def product(self, stages: list[tuple[str, nn.Module]], x: Tensor, prefix: str = "") -> tuple[Tensor, Tensor]:
        """The stages in order: their output and the product of their factors (B,)."""
        x, factors = self.chain(stages, x, prefix)
        return x, math.prod((f for _, f in factors), start=torch.ones(len(x), dtype=torch.float64))

    def residual(self, name: str, branch: list, x: Tensor, shortcut: Optional[nn.Module] = None):
        """y = f(x) + s(x) and L_f + L_s (s the identity when `shortcut` is None)."""
        out, lf = self.product(branch, x, f"{name}.")
        short, ls = self.product([("downsample", shortcut)], x, f"{name}.") if shortcut is not None else (x, 1.0)
        return out + short, lf + ls

    def stage(self, name: str, module: nn.Module, x: Tensor) -> tuple[Tensor, Factors]:
        """One module: its block handler, else (a leaf) its layer bound; an unknown container raises."""
        handler = BLOCK_BOUNDS.lookup(module)
        if handler is not None:
            return handler(self, name, module, x)
        if list(module.children()):
            raise TypeError(f"no bound is known for {type(module).__name__} ({name or 'the model'}); supported "
                            "containers: nn.Sequential, torchvision VGG/ResNet/DenseNet/VisionTransformer, timm "
                            "VisionTransformer, and what `register_block_bound` adds")
        factor = layer_lipschitz(module, tuple(x.shape[1:]))
        return module(x), [(name, torch.full((len(x),), factor, dtype=torch.float64))]

    def attention(self, name: str, x: Tensor, weights, biases, out_proj: nn.Linear, heads: int, scale: float,
                  batch_first: bool) -> tuple[Tensor, Factors]:
        """Dot-product self-attention at the data (not globally Lipschitz: the global walk raises)."""
        if not self.local:
            raise ValueError(f"{name}: dot-product attention is not globally Lipschitz; pass inputs for a "
                             "bound at the data")
        if not batch_first:
            raise TypeError(f"{name}: only batch_first attention is supported")
        y, factor = attention_factor(x, tuple(w.detach() for w in weights),
                                     tuple(b.detach() if b is not None else None for b in biases),
                                     out_proj.weight.detach(), out_proj.bias, heads, scale)
        return y, [(name, factor)]


BlockBound = Callable[[Walk, str, nn.Module, Tensor], tuple[Tensor, Factors]]
BLOCK_BOUNDS = Registry("block")


def register_block_bound(key: Key, handler: BlockBound) -> None:
    """Bound containers of class `key` (a class, or the qualified name "package.module.Class" of one) with
    handler(walk, name, module, x) -> (output, [(name, factor), ...]); a key registered already warns and is
    replaced."""
    BLOCK_BOUNDS.register(key, handler)


def lipschitz_layers(model: nn.Module, inputs: Tensor, local: bool) -> tuple[Tensor, Factors]:
    """Walk `model` on `inputs`; (the walk's output, (name, factor (B,)) per stage). Checks the output
    against the model's forward so an architecture read wrongly can never pass as a bound."""
    with preserved_state(model, inputs, mode="eval"), torch.no_grad():
        output, factors = Walk(local).stage("", model, inputs)
        expected = model(inputs)
    if isinstance(expected, Tensor) and output.shape == expected.shape:
        scale = expected.abs().max().clamp_min(1e-12)
        if ((output - expected).abs().max() / scale).item() < 1e-4:
            return output, factors
    raise TypeError(f"the bound's walk of {type(model).__name__} does not reproduce its forward; a layer "
                    "computes something the bound does not know")
