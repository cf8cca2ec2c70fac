"""Small architectures for the recipes. Every model takes pixels in [0, 1] and normalises inside."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fim_lightning.bounds import register_layer_bound


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the model's first layer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Sequential):
    """Conv-BN-ReLU stages (widths `widths`, 2x2 max-pool after each but the last), global pool, linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> None:
        layers: list[nn.Module] = [Normalize(list(mean) * (in_channels // len(mean)),
                                             list(std) * (in_channels // len(std)))]
        channels = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
        super().__init__(*layers)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalized(net: nn.Module, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """Normalize followed by `net`: the model takes pixels in [0, 1]. One value is repeated per channel;
    per-channel RGB statistics on a grey-scale input are averaged."""
    def per_channel(values: Sequence[float]) -> list[float]:
        values = list(values)
        if len(values) == in_channels:
            return values
        return [sum(values) / len(values)] * in_channels

    return nn.Sequential(Normalize(per_channel(mean), per_channel(std)), net)


def _first_conv(in_channels: int, conv: nn.Conv2d) -> nn.Conv2d:
    """`conv` with `in_channels` input channels (grey-scale or multi-spectral inputs), same geometry."""
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def torchvision_classifier(name: str, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None,
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                           **kwargs) -> nn.Sequential:
    """A torchvision classifier at its native settings (`vgg16`, `resnet18`, `resnet34`, `densenet121`,
    `vit_b_16`, ...) behind Normalize. `weights` names torchvision weights (downloaded by torchvision; the
    classifier head is re-drawn when `num_classes` differs from theirs)."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if weights is None:
        net = builder(weights=None, num_classes=num_classes, **kwargs)
    else:
        net = builder(weights=weights, **kwargs)
        _replace_head(net, num_classes)
    _replace_input_channels(net, in_channels)
    return _normalized(net, in_channels, mean, std)


def _replace_head(net: nn.Module, num_classes: int) -> None:
    for owner, attribute in ((net, "fc"), (getattr(net, "heads", None), "head"), (net, "classifier")):
        head = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(head, nn.Sequential):
            owner, attribute, head = head, str(len(head) - 1), head[-1]
        if isinstance(head, nn.Linear):
            if head.out_features != num_classes:
                setattr(owner, attribute, nn.Linear(head.in_features, num_classes))
            return
    raise TypeError(f"cannot find the classifier head of {type(net).__name__}")


def _replace_input_channels(net: nn.Module, in_channels: int) -> None:
    for owner, attribute in ((net, "conv1"), (net, "conv_proj"), (getattr(net, "features", None), "0"),
                             (getattr(net, "features", None), "conv0")):
        conv = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(conv, nn.Conv2d):
            setattr(owner, attribute, _first_conv(in_channels, conv))
            return
    raise TypeError(f"cannot find the first convolution of {type(net).__name__}")


def cifar_vgg(num_classes: int = 10, in_channels: int = 3,
              config: Sequence = (32, "M", 64, "M", 128, 128, "M", 256, "M"),
              mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> nn.Sequential:
    """torchvision's VGG with BatchNorm at CIFAR size: `config` as in torchvision's `make_layers`, global
    average pooling and one linear classifier."""
    from torchvision.models.vgg import VGG, make_layers

    net = VGG(make_layers(list(config), batch_norm=True), num_classes=num_classes)
    net.features[0] = _first_conv(in_channels, net.features[0])
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(nn.Linear([c for c in config if c != "M"][-1], num_classes))
    return _normalized(net, in_channels, mean, std)


def cifar_resnet(num_classes: int = 10, in_channels: int = 3, layers: Sequence[int] = (2, 2, 2, 2),
                 block: str = "basic", mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> nn.Sequential:
    """torchvision's ResNet (BasicBlock or Bottleneck, `layers` blocks per stage) with its native stem: at 32
    px the stages run at 8, 4, 2 and 1 px, which keeps resnet18 (layers (2, 2, 2, 2)) trainable on a CPU."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    net = ResNet({"basic": BasicBlock, "bottleneck": Bottleneck}[block], list(layers), num_classes=num_classes)
    net.conv1 = _first_conv(in_channels, net.conv1)
    return _normalized(net, in_channels, mean, std)


def small_resnet(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64),
                 blocks: int = 1, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016, section 4.2) from torchvision's BasicBlock: a 3x3 stem, one stage
    per width (`blocks` blocks each, stride 2 from the second stage, 1x1 projection shortcuts), global
    pool, linear. ResNet-8 by default: ~80k weights, trains on a CPU at full resolution."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    channels = widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = None
            if stride != 1 or channels != width:
                shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            layers.append(BasicBlock(channels, width, stride, shortcut))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return _normalized(nn.Sequential(*layers), in_channels, mean, std)


def cifar_densenet(num_classes: int = 10, in_channels: int = 3, growth_rate: int = 12,
                   block_config: Sequence[int] = (4, 4, 4), num_init_features: int = 24, bn_size: int = 4,
                   mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> nn.Sequential:
    """torchvision's DenseNet with small growth rate and blocks (CIFAR size)."""
    import torchvision

    net = torchvision.models.DenseNet(growth_rate, tuple(block_config), num_init_features, bn_size,
                                      num_classes=num_classes)
    net.features.conv0 = _first_conv(in_channels, net.features.conv0)
    return _normalized(net, in_channels, mean, std)


def cifar_vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
              num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 128, mlp_dim: int = 256,
              mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> nn.Sequential:
    """torchvision's VisionTransformer at CIFAR size. Its head is zero-initialised upstream (all logits 0,
    F = 0 at init); here it is drawn like a linear layer so the Fisher curve starts where training does."""
    import torchvision

    net = torchvision.models.VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                                               num_classes=num_classes)
    net.conv_proj = _first_conv(in_channels, net.conv_proj)
    net.heads.head.reset_parameters()
    return _normalized(net, in_channels, mean, std)


register_layer_bound(Normalize, lambda layer, input_shape: 1.0 / layer.std.min().item())
