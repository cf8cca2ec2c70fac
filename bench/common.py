"""Shared pieces of the benchmarks: machine description, data location, CIFAR-size models, timing."""
from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from recipes.common import machine  # noqa: F401  (re-exported for the bench scripts)


def data_dir() -> Path:
    """The offline data sets: $FIM_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("FIM_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def autoattack_robust(net: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float,
                      version: str = "custom", seed: int = 0) -> np.ndarray:
    """(N,) robust under AutoAttack (the reference `pyautoattack`): APGD-CE + APGD-T with the standard version's
    settings (100 iterations, one restart, 9 target classes), or `version="standard"` (with FAB-T and Square).
    AutoAttack reseeds the global torch RNG (`torch.manual_seed(seed)` in each attack): run inside a fork, so a
    training run that is evaluated with it draws the same batches as one that is not."""
    from pyautoattack import AutoAttack

    with torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []):
        return _autoattack(AutoAttack, net, x, y, norm, eps, version, seed)


def _autoattack(AutoAttack, net: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, version: str,
                seed: int) -> np.ndarray:

    options = {"attacks": ["apgd-ce", "apgd-t"]} if version == "custom" else {}
    attack = AutoAttack(net, norm={"l2": "L2", "linf": "Linf"}[norm], eps=eps, version=version, seed=seed,
                        device=x.device, **options)
    attack.verbose = False
    if version == "custom":
        attack.apgd.n_restarts, attack.apgd_targeted.n_target_classes, attack.apgd_targeted.n_restarts = 1, 9, 1
    adversarial, _ = attack.run_standard_evaluation(x.contiguous(), y, batch_size=256)
    with torch.no_grad():
        return ((net(x).argmax(1) == y) & (net(adversarial).argmax(1) == y)).cpu().numpy()


def cifar_images(split: str = "test", count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Real CIFAR-10 images in [0, 1], (N, 3, 32, 32), and labels, from the offline npz subset."""
    archive = np.load(data_dir() / "cifar10_subset.npz")
    images = torch.from_numpy(archive[f"{split}_images"][:count]).permute(0, 3, 1, 2).float() / 255
    return images, torch.from_numpy(archive[f"{split}_labels"][:count, 0]).long()


def cifar_cnn(classes: int = 10) -> nn.Module:
    """A small CIFAR CNN with BatchNorm (about 0.3M parameters)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, classes))


def small_vit(classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer at CIFAR size; its zero-initialised head is re-drawn (zero logits have F = 0)."""
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                 hidden_dim=128, mlp_dim=256, num_classes=classes)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def resnet18_32(classes: int = 10) -> nn.Module:
    return torchvision.models.resnet18(num_classes=classes)


def timed(fn, repeats: int = 3, device: torch.device | None = None):
    """(result of the last call, median seconds over `repeats` calls after one warm-up call); on a CUDA
    `device` each call is timed between synchronisations, so its queued kernels count."""
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    result = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def quiet_lightning() -> None:
    """Keep Lightning's info lines out of the printed tables."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
