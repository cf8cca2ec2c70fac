"""Every random draw of the package, each from a `torch.Generator` the caller owns (the global RNG is never
used): Rademacher probes, Gaussian unit vectors, Haar-random orthonormal frames."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def default_generator(device: torch.device, generator: Optional[torch.Generator]) -> torch.Generator:
    """The caller's generator, or a fresh one seeded with 0: random draws never touch the global RNG."""
    return generator if generator is not None else torch.Generator(device=device).manual_seed(0)


def unit(v: Tensor) -> Tensor:
    """Each sample of `v` (B, ...) scaled to unit norm (a zero sample stays zero)."""
    norm = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norm.view(-1, *([1] * (v.ndim - 1)))


def rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """Rademacher entries of `shape`, drawn on the generator's device and moved to `like`'s device and dtype."""
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (2 * bits - 1).to(like.device, like.dtype)


def random_unit(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """A Gaussian start vector per sample, drawn on the generator's device and moved to the inputs'."""
    generator = default_generator(like.device, generator)
    return unit(torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device))


def orthonormal_probes(count: int, batch: int, dim: int, generator: torch.Generator) -> Tensor:
    """(count, batch, dim) unit probes, count <= dim: per sample a Haar-random orthonormal frame
    (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    gaussian = torch.randn((batch, dim, count), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)).permute(2, 0, 1)
