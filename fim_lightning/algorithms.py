"""Spectral algorithms on a `FisherOperator`: they only use its probabilities, JVPs and VJPs.

- `exact_dual`: lambda_max(F) = lambda_max(G) for F = A^T A, G = A A^T ((C-1) x (C-1)), A = W J, from C - 1
  VJPs and a float64 eigen-solve (`operator.dual_weights` gives W). With `top_k`, the classes outside the top k are
  merged into one: the Fisher of that coarse-grained distribution is a lower bound (data processing), and
  the merged probability mass is reported; a sample that merged more than `max_neglected_mass` gets NaN.
- `power_iteration` and `lanczos`: matrix-free on F v = J^T (M J v), one JVP + one VJP per step.
- `auto` (the default): `exact_dual` for C <= `AUTO_EXACT_CLASSES`, else `lanczos` with `exact_dual` on the
  samples it leaves unconverged.
- `gram_sketch`: the Hutchinson-type estimate E_z[(J z)(J z)^T] = J J^T from Rademacher probes (forward mode
  only), pushed through W and eigen-solved.
- `exact_trace` / `hutchinson_trace`: tr F = |A|_F^2 and tr F = E_z |W J z|^2.

Every product goes through `op.screen`: a sample with a non-finite Jacobian is warned about and gets NaN,
the others stay exact (a NaN never reaches an eigen-solve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, cast

import torch
from torch import Tensor

from fim_lightning.linear_operator import PerSampleOperator
from fim_lightning.operator import FisherOperator, dual_weights
from fim_lightning.outputs import warn_samples
from fim_lightning.sampling import default_generator, rademacher, random_unit, unit


@dataclass(frozen=True)
class TopEigenpair:
    """lambda_max(F(x_i)) per sample and its eigenvector (the most sensitive input direction).

    Attributes:
        eigenvalue: (B,) estimate of lambda_max, in the dense-algebra dtype.
        eigenvector: (B, *input_shape) unit vectors (for `gram_sketch` a noisy probe-space sketch).
        residual: (B,) ||F v - lambda v|| / lambda for the iterative methods, else None.
        steps: matrix-vector products (power, lanczos), VJPs (exact) or probes (gram sketch) used.
        neglected_mass: (B,) probability merged into one class by `top_k`, else None.
        trace: (B,) tr F, which `exact_dual` gets for free (|A|_F^2; of the merged F with `top_k`), else None.
    """

    eigenvalue: Tensor
    eigenvector: Tensor
    residual: Optional[Tensor]
    steps: int
    neglected_mass: Optional[Tensor] = None
    trace: Optional[Tensor] = None


@dataclass(frozen=True)
class TraceEstimate:
    """tr F(x_i) per sample with its standard error (zero for the exact method)."""

    value: Tensor
    stderr: Tensor


def _flat_norm(v: Tensor) -> Tensor:
    return v.flatten(1).to(torch.float64).norm(dim=1)


def _per_sample(scalars: Tensor, like: Tensor) -> Tensor:
    return scalars.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


NONFINITE_JACOBIAN = "the Jacobian is not finite (NaN or inf)"


def _start(op: PerSampleOperator, max_iter: int, generator: Optional[torch.Generator]) -> Tensor:
    """The shared opening of the iterative methods: a valid step budget and a Gaussian unit start per sample."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    return random_unit(op.inputs, generator)


def _top_eigenpair_of(gram: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(gram)
    return evals[:, -1].clamp_min(0.0), evecs[:, :, -1]


def exact_dual(
    op: FisherOperator,
    *,
    top_k: Optional[int] = None,
    max_neglected_mass: float = 0.01,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> TopEigenpair:
    """lambda_max from the C x C dual G = A A^T (exact up to rounding). With `top_k` the value is that of the
    merged Fisher, a lower bound; a sample whose merged mass exceeds `max_neglected_mass` gets NaN with a
    warning, so a lower bound is not read as the value (`max_neglected_mass=1` keeps every bound)."""
    weights, neglected = dual_weights(op.log_probs, top_k)
    if neglected is not None:
        coarse = (neglected > max_neglected_mass) & ~op.invalid
        if coarse.any():
            warn_samples(coarse, f"top_k={top_k} merged up to {neglected[coarse].max().item():.3g} of the "
                                 f"probability (> max_neglected_mass={max_neglected_mass}) into one class, so "
                                 "lambda_max would be a lower bound, not the value; use method='auto' (Lanczos "
                                 "for many classes), a larger top_k, or max_neglected_mass=1 to accept the bound")
        neglected = op.nan_invalid(neglected)  # the mass stays reported where it made the value NaN
        op.invalid = op.invalid | coarse
    rows = op.screen(op.factor(weights, chunk_size), NONFINITE_JACOBIAN)
    flat = rows.flatten(2).to(dtype)
    eigenvalue, u = _top_eigenpair_of(flat @ flat.mT)
    direction = (u.unsqueeze(1) @ flat).squeeze(1).to(rows.dtype)
    return TopEigenpair(
        eigenvalue=op.nan_invalid(eigenvalue),
        eigenvector=op.nan_invalid(unit(direction.view(op.inputs.shape))),
        residual=None,
        steps=weights.shape[0],
        neglected_mass=None if neglected is None else neglected.to(dtype),
        trace=op.nan_invalid(flat.square().sum((1, 2))),
    )


def power_iteration(
    op: PerSampleOperator,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float64,
) -> TopEigenpair:
    """v <- F v / |F v| until every sample's Rayleigh quotient changes by <= tol (relative) and its
    residual |F v - lambda v| / lambda <= sqrt(tol), or `max_iter` steps (tol=0 runs exactly max_iter)."""
    v = _start(op, max_iter, generator)
    x = op.inputs
    previous = torch.full((x.shape[0],), math.inf, dtype=dtype, device=x.device)
    for step in range(1, max_iter + 1):
        w = op.screen(op.matvec(v), NONFINITE_JACOBIAN)
        rayleigh = (v.flatten(1).to(dtype) * w.flatten(1).to(dtype)).sum(1).clamp_min(0.0)
        scale = rayleigh.clamp_min(torch.finfo(dtype).tiny)
        residual = _flat_norm(w - _per_sample(rayleigh, w) * v).to(dtype) / scale
        converged = ((rayleigh - previous).abs() <= tol * scale) & (residual <= math.sqrt(tol))
        if converged.all() or step == max_iter:
            break
        previous = rayleigh
        moved = _flat_norm(w) > 0
        v = torch.where(_per_sample(moved, v).bool(), unit(w), v)
    return TopEigenpair(eigenvalue=op.nan_invalid(rayleigh), eigenvector=op.nan_invalid(v),
                        residual=op.nan_invalid(residual), steps=step)


def lanczos(
    op: PerSampleOperator,
    *,
    max_iter: int = 64,
    tol: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float64,
) -> TopEigenpair:
    """Batched Lanczos with full re-orthogonalisation. Stops when every sample's top Ritz value changes by
    <= tol (relative) and its residual beta_m |s_m| / theta <= sqrt(tol), or on an invariant subspace
    (rank F <= C - 1, so at most C steps are ever needed)."""
    q = _start(op, max_iter, generator).flatten(1)
    x = op.inputs
    batch, dim = x.shape[0], x[0].numel()
    steps = min(max_iter, dim)
    basis = torch.zeros(batch, steps, dim, dtype=x.dtype, device=x.device)
    alphas = torch.zeros(batch, steps, dtype=dtype, device=x.device)
    betas = torch.zeros(batch, steps, dtype=dtype, device=x.device)
    q_prev, beta_prev = torch.zeros_like(q), torch.zeros(batch, dtype=dtype, device=x.device)
    scale = torch.zeros(batch, dtype=dtype, device=x.device)
    exhausted = torch.zeros(batch, dtype=torch.bool, device=x.device)
    previous = torch.full((batch,), math.inf, dtype=dtype, device=x.device)
    breakdown = 100 * torch.finfo(x.dtype).eps
    for j in range(steps):
        basis[:, j] = q
        w = op.screen(op.matvec(q.view(x.shape)), NONFINITE_JACOBIAN).flatten(1)
        alpha = (q.to(dtype) * w.to(dtype)).sum(1)
        w = w - _per_sample(alpha, w) * q - _per_sample(beta_prev, w) * q_prev
        for _ in range(2):
            w = w - ((w.unsqueeze(1) @ basis[:, : j + 1].mT) @ basis[:, : j + 1]).squeeze(1)
        beta = _flat_norm(w).to(dtype)
        alphas[:, j] = alpha
        scale = torch.maximum(scale, torch.maximum(alpha.abs(), beta))
        exhausted |= beta <= breakdown * scale
        kept_beta = torch.where(exhausted, torch.zeros_like(beta), beta)
        tridiagonal = torch.diag_embed(alphas[:, : j + 1]) + torch.diag_embed(betas[:, :j], 1) + torch.diag_embed(
            betas[:, :j], -1
        )
        ritz, s = _top_eigenpair_of(tridiagonal)
        floor = ritz.clamp_min(torch.finfo(dtype).tiny)
        residual = beta * s[:, -1].abs() / floor
        converged = exhausted | (((ritz - previous).abs() <= tol * floor) & (residual <= math.sqrt(tol)))
        if converged.all() or j == steps - 1:
            break
        betas[:, j] = kept_beta
        previous = ritz
        q_prev, beta_prev = q, kept_beta
        step = w / _per_sample(beta.clamp_min(torch.finfo(dtype).tiny), w)
        q = torch.where(exhausted[:, None], torch.zeros_like(w), step)
    vector = (s.to(x.dtype).unsqueeze(1) @ basis[:, : j + 1]).squeeze(1)
    return TopEigenpair(eigenvalue=op.nan_invalid(ritz), eigenvector=op.nan_invalid(unit(vector.view(x.shape))),
                        residual=op.nan_invalid(residual), steps=j + 1)


AUTO_EXACT_CLASSES = 64  # exact up to here: C - 1 VJPs cost less than Lanczos' JVP + VJP pairs (bench/large_classes.py)


def auto(
    op: FisherOperator,
    *,
    max_iter: int = 64,
    tol: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> TopEigenpair:
    """The default route: `exact_dual` for C <= `AUTO_EXACT_CLASSES`; above, `lanczos`, whose Ritz value
    theta <= lambda_max is kept where its residual |F v - theta v| <= sqrt(tol) theta (then
    lambda_max - theta <= tol theta^2 / gap, and for any gap an eigenvalue lies within sqrt(tol) theta), and
    `exact_dual` on the samples still above it. Every value is exact or converged; `steps` counts the products."""
    if op.log_probs.shape[1] <= AUTO_EXACT_CLASSES:
        return exact_dual(op, chunk_size=chunk_size, dtype=dtype)
    pair = lanczos(op, max_iter=max_iter, tol=tol, generator=generator, dtype=dtype)
    residual = cast(Tensor, pair.residual)  # lanczos always reports it
    unconverged = ~(residual <= math.sqrt(tol)) & ~op.invalid
    if not unconverged.any():
        return pair
    index = unconverged.nonzero().flatten()
    exact = exact_dual(op.subset(index), chunk_size=chunk_size, dtype=dtype)
    eigenvalue, eigenvector, residual = pair.eigenvalue.clone(), pair.eigenvector.clone(), residual.clone()
    eigenvalue[index], eigenvector[index], residual[index] = exact.eigenvalue, exact.eigenvector, 0.0
    return TopEigenpair(eigenvalue=eigenvalue, eigenvector=eigenvector, residual=residual,
                        steps=pair.steps + exact.steps)


def _probe_images(op: FisherOperator, num_probes: int, generator, chunk_size) -> tuple[Tensor, Tensor]:
    """Rademacher probes Z (N, B, ...) and A z = W J z for each, (N, B, C - 1), by forward mode only."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    x = op.inputs
    weights = dual_weights(op.log_probs)[0]  # before vmap, so z(x) is recorded outside it
    probes = rademacher((num_probes, *x.shape), x, default_generator(x.device, generator))
    images = torch.func.vmap(op.jvp, chunk_size=chunk_size, randomness="same")(probes)
    images = op.screen(images.movedim(1, 0), NONFINITE_JACOBIAN).movedim(0, 1)
    return probes, torch.einsum("kbc,nbc->nbk", weights, images.to(weights.dtype))


@dataclass(frozen=True)
class Sketch:
    """What K directional derivatives y_k = W J z_k (E[z z^T] = I) say about F = (W J)^T (W J) per sample.

    Attributes:
        eigenvalue: (B,) top eigenvalue of the Gram sketch G = 1/K sum_k y_k y_k^T (estimates lambda_max(F)).
        coefficients: (B, K') its top eigenvector in the space of the y's.
        trace: (B,) 1/K sum_k |y_k|^2 (estimates tr F).
        stderr: (B,) the standard error of `trace`.
    """

    eigenvalue: Tensor
    coefficients: Tensor
    trace: Tensor
    stderr: Tensor


def sketch(images: Tensor, variance_factor: float = 1.0) -> Sketch:
    """The one kernel of the white-box Hutchinson estimates and the black-box estimator: from y (K, B, K')
    the Gram sketch's top eigenpair and the trace with its standard error, the variance scaled by
    `variance_factor` ((d - K) / (d - 1) for an orthonormal frame of K probes in d dimensions; 0 once K = d)."""
    count = images.shape[0]
    eigenvalue, coefficients = _top_eigenpair_of(torch.einsum("nbc,nbd->bcd", images, images) / count)
    samples = images.square().sum(-1)
    if count > 1 or variance_factor == 0:
        stderr = samples.std(0) * math.sqrt(variance_factor / count) if count > 1 else torch.zeros_like(samples[0])
    else:
        stderr = torch.full_like(samples[0], math.inf)
    return Sketch(eigenvalue, coefficients, samples.mean(0), stderr)


def gram_sketch(
    op: FisherOperator,
    *,
    num_probes: int = 64,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> TopEigenpair:
    """lambda_max of W (1/N sum_n (J z_n)(J z_n)^T) W^T: consistent as N grows, biased upwards for small N
    (the top eigenvalue of a noisy PSD matrix). N JVPs, no reverse pass."""
    probes, images = _probe_images(op, num_probes, generator, chunk_size)
    images = images.to(dtype)
    estimate = sketch(images)
    weights = torch.einsum("nbc,bc->nb", images, estimate.coefficients).to(probes.dtype)
    direction = torch.einsum("nb,nb...->b...", weights, probes)
    return TopEigenpair(eigenvalue=op.nan_invalid(estimate.eigenvalue), eigenvector=op.nan_invalid(unit(direction)),
                        residual=None, steps=num_probes)


def exact_trace(op: FisherOperator, *, chunk_size: Optional[int] = None,
                dtype: torch.dtype = torch.float64) -> TraceEstimate:
    """tr F = |A|_F^2 = sum_y p_y |grad log p_y|^2 from C - 1 VJPs."""
    rows = op.screen(op.factor(dual_weights(op.log_probs)[0], chunk_size), NONFINITE_JACOBIAN)
    value = op.nan_invalid(rows.flatten(1).to(dtype).square().sum(1))
    return TraceEstimate(value=value, stderr=torch.zeros_like(value))


def sampled_trace(
    op: FisherOperator,
    *,
    num_probes: int = 32,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> TraceEstimate:
    """tr F = tr(A A^T) = E_u |A^T u|^2 over Rademacher u in R^(C-1): `num_probes` VJPs on the recorded reverse
    pass instead of the C - 1 of `exact_trace` (the trace beside a Lanczos lambda_max for many classes),
    unbiased, with the standard error of the mean."""
    weights = dual_weights(op.log_probs)[0]  # (K, B, C): the rows of A are J^T w_k
    count, batch = weights.shape[:2]
    signs = rademacher((num_probes, batch, count), weights, default_generator(op.inputs.device, generator))
    rows = op.screen(op.factor(torch.einsum("kbc,nbk->nbc", weights, signs), chunk_size), NONFINITE_JACOBIAN)
    samples = rows.flatten(2).to(dtype).square().sum(-1)
    stderr = samples.std(1) / math.sqrt(num_probes) if num_probes > 1 else torch.full_like(samples[:, 0], math.inf)
    return TraceEstimate(value=op.nan_invalid(samples.mean(1)), stderr=op.nan_invalid(stderr))


def hutchinson_trace(
    op: FisherOperator,
    *,
    num_probes: int = 64,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> TraceEstimate:
    """tr F = E_z |A z|^2 over Rademacher z, with the standard error of the mean."""
    _, images = _probe_images(op, num_probes, generator, chunk_size)
    estimate = sketch(images.to(dtype))
    return TraceEstimate(value=op.nan_invalid(estimate.trace), stderr=op.nan_invalid(estimate.stderr))
