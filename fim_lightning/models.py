"""Small architectures for the recipes. Every model takes pixels in [0, 1] and normalises inside."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


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
        layers: list[nn.Module] = [Normalize(list(mean) * (in_channels // len(mean)), list(std) * (in_channels // len(std)))]
        channels = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
        super().__init__(*layers)
