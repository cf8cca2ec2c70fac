"""The block handlers of the known architectures, registered in `BLOCK_BOUNDS` by class or by qualified name
(torchvision and timm are not imported here, so a handler reads its module's parts by duck typing: `module:
Any`): nn.Sequential and its subclasses (torchvision's MLP and DenseNet transitions among them),
nn.MultiheadAttention, nn.LayerNorm; torchvision VGG, ResNet, DenseNet and VisionTransformer; timm
VisionTransformer, Block, Attention and Mlp."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fim_lightning.bounds.layers import layer_norm_factor
from fim_lightning.bounds.registry import Key
from fim_lightning.bounds.walk import BLOCK_BOUNDS, BlockBound, Walk


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _sequential(walk: Walk, name: str, module: Any, x: Tensor):
    return walk.chain(list(module.named_children()), x, _prefix(name))


def _resnet(walk: Walk, name: str, module: Any, x: Tensor):
    order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    stages = [(n, getattr(module, n)) for n in order] + [("flatten", nn.Flatten()), ("fc", module.fc)]
    return walk.chain(stages, x, _prefix(name))


def _residual_block(depth: int):
    """torchvision's BasicBlock (depth 2) or Bottleneck (3): relu(branch(x) + downsample(x))."""

    def handler(walk: Walk, name: str, module: Any, x: Tensor):
        branch = [(n, getattr(module, n)) for i in range(1, depth + 1) for n in (f"conv{i}", f"bn{i}", "relu")][:-1]
        y, factor = walk.residual(name, branch, x, module.downsample)
        return torch.relu(y), [(name, factor)]

    return handler


def _vgg(walk: Walk, name: str, module: Any, x: Tensor):
    stages = [("features", module.features), ("avgpool", module.avgpool), ("flatten", nn.Flatten()),
              ("classifier", module.classifier)]
    return walk.chain(stages, x, _prefix(name))


def _densenet(walk: Walk, name: str, module: Any, x: Tensor):
    stages = [("features", module.features), ("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
              ("flatten", nn.Flatten()), ("classifier", module.classifier)]
    return walk.chain(stages, x, _prefix(name))


def _dense_block(walk: Walk, name: str, module: Any, x: Tensor):
    factor = torch.ones(len(x), dtype=torch.float64)
    for _, layer in module.named_children():
        order = ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
        new, lf = walk.product([(n, getattr(layer, n)) for n in order], x, f"{name}.")
        x, factor = torch.cat([x, new], 1), factor * (1 + lf.square()).sqrt()
    return x, [(name, factor)]


def _torchvision_vit(walk: Walk, name: str, module: Any, x: Tensor):
    prefix = _prefix(name)
    y, factors = walk.chain([("conv_proj", module.conv_proj)], x, prefix)
    y = y.flatten(2).transpose(1, 2)
    y = torch.cat([module.class_token.expand(len(y), -1, -1), y], 1) + module.encoder.pos_embedding
    y, inner = walk.chain([("dropout", module.encoder.dropout), ("layers", module.encoder.layers),
                           ("ln", module.encoder.ln)], y, f"{prefix}encoder.")
    y, head = walk.chain([("heads", module.heads)], y[:, 0], prefix)
    return y, factors + inner + head


def _timm_vit(walk: Walk, name: str, module: Any, x: Tensor):
    prefix = _prefix(name)
    embed = module.patch_embed
    if not getattr(embed, "flatten", True) or getattr(module, "dynamic_img_size", False):
        raise TypeError(f"no bound is known for this timm VisionTransformer layout ({name or 'the model'})")
    y, factors = walk.chain([("patch_embed.proj", embed.proj)], x, prefix)
    y, inner = walk.chain([("patch_embed.norm", embed.norm)], y.flatten(2).transpose(1, 2), prefix)
    y = module._pos_embed(y)
    stages = [("patch_drop", module.patch_drop), ("norm_pre", module.norm_pre), ("blocks", module.blocks),
              ("norm", module.norm)]
    y, body = walk.chain(stages, y, prefix)
    if module.global_pool == "token":
        y, pool = y[:, 0], torch.ones(len(y), dtype=torch.float64)
    elif module.global_pool == "avg":
        rest = y[:, module.num_prefix_tokens:]
        y, pool = rest.mean(1), torch.full((len(y),), rest.shape[1] ** -0.5, dtype=torch.float64)
    else:
        raise TypeError(f"no bound is known for timm global_pool={module.global_pool!r}")
    y, head = walk.chain([("fc_norm", module.fc_norm), ("head_drop", module.head_drop), ("head", module.head)],
                         y, prefix)
    return y, factors + inner + body + [(f"{prefix}pool", pool)] + head


def _encoder_block(walk: Walk, name: str, module: Any, x: Tensor):  # torchvision ViT
    y, f1 = walk.residual(name, [("ln_1", module.ln_1), ("self_attention", module.self_attention)], x)
    z, f2 = walk.residual(name, [("ln_2", module.ln_2), ("mlp", module.mlp)], y)
    return z, [(f"{name}.attention", f1), (f"{name}.mlp", f2)]


def _timm_block(walk: Walk, name: str, module: Any, x: Tensor):
    if not hasattr(module, "ls1"):
        raise TypeError(f"no bound is known for this timm Block ({name})")
    first = [("norm1", module.norm1), ("attn", module.attn), ("ls1", module.ls1), ("drop", module.drop_path1)]
    y, f1 = walk.residual(name, first, x)
    second = [("norm2", module.norm2), ("mlp", module.mlp), ("ls2", module.ls2), ("drop", module.drop_path2)]
    z, f2 = walk.residual(name, second, y)
    return z, [(f"{name}.attention", f1), (f"{name}.mlp", f2)]


def _multihead_attention(walk: Walk, name: str, module: Any, x: Tensor):
    biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    return walk.attention(name, x, module.in_proj_weight.chunk(3), biases, module.out_proj, module.num_heads,
                          module.head_dim ** -0.5, module.batch_first)


def _timm_attention(walk: Walk, name: str, module: Any, x: Tensor):
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


def _layer_norm(walk: Walk, name: str, module: Any, x: Tensor):
    return module(x), [(name, layer_norm_factor(module, x, walk.local))]


_KNOWN: dict[Key, BlockBound] = {
    nn.Sequential: _sequential,
    nn.MultiheadAttention: _multihead_attention,
    nn.LayerNorm: _layer_norm,
    "torchvision.models.resnet.ResNet": _resnet,
    "torchvision.models.resnet.BasicBlock": _residual_block(2),
    "torchvision.models.resnet.Bottleneck": _residual_block(3),
    "torchvision.models.vgg.VGG": _vgg,
    "torchvision.models.densenet.DenseNet": _densenet,
    "torchvision.models.densenet._DenseBlock": _dense_block,
    "torchvision.models.vision_transformer.VisionTransformer": _torchvision_vit,
    "torchvision.models.vision_transformer.EncoderBlock": _encoder_block,
    "timm.models.vision_transformer.VisionTransformer": _timm_vit,
    "timm.models.vision_transformer.Block": _timm_block,
    "timm.layers.attention.Attention": _timm_attention,
    "timm.models.vision_transformer.Attention": _timm_attention,  # older timm
    "timm.layers.mlp.Mlp": _sequential,
}
for _key, _handler in _KNOWN.items():
    BLOCK_BOUNDS.register(_key, _handler)
