"""Black-box Fisher estimation: probabilities (or logits, log-probabilities) from queries alone, no autograd.

With s = log p and unit probes u_k, finite differences give J u_k: forward (s(x + h u_k) - s(x)) / h in one
query per probe (the default), or central (s(x + h u_k) - s(x - h u_k)) / 2h in two. y_k = sqrt(d) J u_k has
E[y y^T] = J J^T (E[u u^T] = I / d). The probes come in orthonormal frames of at most d vectors (Haar, QR of a
Gaussian matrix): a frame of K < d probes cuts the variance of each quadratic form by the factor
(d - K) / (d - 1) against independent probes, and K = d probes form a complete basis, which makes the sketch
exact up to the finite-difference error (so no more than d probes are spent). The Gram sketch
G = W (1/K sum_k y_k y_k^T) W^T, with the cancellation-free factor W of M = diag(p) - p p^T
(`operator.dual_weights`), estimates the dual whose top eigenvalue is lambda_max(F), and tr F = E|W y|^2.

Step: the displacement |h u| = eps^(1/3) * max(1, rms(x)), with eps the coarser of the inputs' precision and
the precision the predictor really answers in: the coarsest float type (bfloat16, float16, float32) that
holds every returned value exactly (a float32 endpoint fed float64 inputs answers in float32, a float16 model
in float16, whatever dtype its values are handed back in); a per-coordinate step of that size is far larger
and biases lambda_max (docs/benchmarks.md, `bench/blackbox.py`). Differences near the
rounding level are refused per sample: where the rounding noise of the outputs (eps / 2 per log-probability
and logit unit) carries more than 5% of the differenced energy, the sample's estimates are NaN with a
warning that names it (a hard-label or quantised predictor, or a `step` too small for its precision). So are
samples whose answer is a hard label (probability exactly 1), where the predictor is piecewise constant (some
probes leave its answer bit-identical while others jump: a tree ensemble), and, for forward differences, where
the O(h) truncation error exceeds 5% of the quadratic form, at a step above float32's default (a predictor
answering in half precision, or a user's `step`): one extra query per sample, x - h u_1, gives the central
difference along the first probe to compare with. Probes are not clipped: a predictor that clips its inputs to
a valid range would see a different direction than the one differenced, so the estimate assumes the model is
defined slightly outside the data range (every neural network is); pass inputs away from hard bounds or accept
the bias.

Limit: below K ~ d the error is that of a chi-square with K degrees of freedom, median |error| about
0.67 sqrt(2 (d - K) / (K d)) of lambda_max, unless the input gradients concentrate in a subspace known in advance.
Forward differences double K for a budget; their O(h) truncation error (about 1e-3 relative here) is far
below that floor, so they are the default. On a CIFAR CNN the gradients do not concentrate (`bench/blackbox.py`
measures the energy of the top eigenvector in low spatial frequencies and in directions shared across
images), so an adaptive second stage gains nothing there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch import Tensor

from fim_lightning.algorithms import sketch
from fim_lightning.operator import dual_weights
from fim_lightning.outputs import OutputKind, as_class_scores, check_inputs, check_output_kind, check_output_values, \
    log_probs_from_output, uniform_where, warn_samples
from fim_lightning.sampling import default_generator, orthonormal_probes
from fim_lightning.validation import check_int, check_real


Difference = Literal["central", "forward"]


@dataclass(frozen=True)
class BlackBoxEstimate:
    """Per-sample black-box estimates and their query accounting.

    Attributes:
        spectral_norm: (B,) lambda_max(F) from the Gram sketch.
        trace: (B,) tr F and `trace_stderr`, its standard error over probes (0 once the probes are a complete
            basis: only the finite-difference error is left).
        lower, upper: (B,) the bracket tr F / (C - 1) <= lambda_max <= tr F from the trace estimate.
        queries: (B,) model evaluations spent on each sample (never above the budget, at most 1 + 2 d).
        calls: number of calls of `predict`.
    """

    spectral_norm: Tensor
    trace: Tensor
    trace_stderr: Tensor
    lower: Tensor
    upper: Tensor
    queries: Tensor
    calls: int


_ROUNDING_SHARE = 0.05
_PRECISIONS = (torch.bfloat16, torch.float16, torch.float32)


def effective_eps(values: Tensor) -> float:
    """eps of the coarsest float type that represents every finite value of `values` exactly."""
    finite = values[torch.isfinite(values)]
    for dtype in _PRECISIONS:
        if torch.finfo(dtype).eps > torch.finfo(values.dtype).eps and torch.equal(finite.to(dtype).to(values.dtype),
                                                                                  finite):
            return torch.finfo(dtype).eps
    return torch.finfo(values.dtype).eps


class _CountingPredictor:
    """Calls `predict` under no_grad in batches of at most `max_batch` points; counts calls, tracks the coarsest
    precision of the answers and the largest score magnitude (for the rounding level)."""

    def __init__(self, predict: Callable[[Tensor], object], output: OutputKind, max_batch: int) -> None:
        self.predict, self.output, self.max_batch, self.calls = predict, output, max_batch, 0
        self.eps = 0.0
        self.magnitude = 1.0  # the largest |logit| (or |log p|) answered; rounding is relative to it

    def _hard_label(self, scores: Tensor, warn: bool) -> Tensor:
        """(N,) answers that put probability exactly 1 on one class (a hard-label predictor, or a softmax
        saturated beyond its precision): they hold nothing about the Fisher information."""
        if self.output == "logits":
            return torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
        one, zero = (0.0, -math.inf) if self.output == "log_probs" else (1.0, 0.0)
        hard = ((scores == one) | (scores == zero)).all(-1) & (scores == one).any(-1)
        if warn:
            warn_samples(hard, "the predictor puts probability exactly 1 on one class (a hard label, or a softmax "
                               "saturated beyond its precision), which says nothing about the Fisher information")
        return hard

    def log_probs(self, points: Tensor, warn: bool = True) -> tuple[Tensor, Tensor]:
        """log p of the points (float64) and the (N,) mask of non-finite answers."""
        parts, invalid = [], []
        with torch.no_grad():
            for chunk in points.split(self.max_batch):
                scores = as_class_scores(self.predict(chunk), len(chunk))
                invalid.append(check_output_values(scores, self.output, warn=warn) | self._hard_label(scores, warn))
                self.eps = max(self.eps, effective_eps(scores))
                finite = scores[torch.isfinite(scores)]
                if self.output != "probs" and finite.numel():
                    self.magnitude = max(self.magnitude, finite.abs().max().item())
                parts.append(log_probs_from_output(scores, self.output))
                self.calls += 1
        return torch.cat(parts), torch.cat(invalid)


def blackbox_fisher(
    predict: Callable[[Tensor], object],
    inputs: Tensor,
    num_queries: int = 128,
    *,
    output: OutputKind = "probs",
    step: Optional[float] = None,
    difference: Difference = "forward",
    generator: Optional[torch.Generator] = None,
    max_batch: int = 8192,
) -> BlackBoxEstimate:
    """lambda_max(F), tr F and the bracket from at most `num_queries` evaluations per sample.

    Args:
        predict: maps a float batch (N, ...) to (N, C) probabilities / logits / log-probabilities (`output`);
            called under `torch.no_grad()` only.
        inputs: the batch (B, ...).
        num_queries: budget per sample: one query at x and two per probe, so min((num_queries - 1) // 2, d)
            probes; with `difference="forward"` one per probe, min(num_queries - 1, d) probes, or one fewer where
            the truncation check runs (a step above float32's default).
        step: the length |h u| of the finite-difference displacement; default eps^(1/3) * max(1, rms(x)) with
            eps the coarser of the inputs' and the answers' precision (module docstring).
        difference: "central" (s(x + hu) - s(x - hu)) / 2h, error O(h^2), or "forward" (s(x + hu) - s(x)) / h,
            error O(h) but twice the probes for the same budget.
        generator: for the probes (default: a fresh one seeded with 0; the global RNG is never used).
        max_batch: the most points per call of `predict` (all probes of all samples go in as few calls as that allows).
    """
    check_output_kind(output)
    check_inputs(inputs)
    check_int("num_queries", num_queries)
    check_int("max_batch", max_batch, 1)
    if step is not None:
        check_real("step", step, 0.0, strict=True)
    x = inputs.detach()
    batch, dim = x.shape[0], x[0].numel()
    if difference not in ("central", "forward"):
        raise ValueError(f"difference must be 'central' or 'forward', got {difference!r}")
    per_probe = 2 if difference == "central" else 1
    if num_queries < 1 + per_probe:
        raise ValueError(f"num_queries must be >= {1 + per_probe} (one query at x, {per_probe} per probe with "
                         f"{difference} differences), got {num_queries}")
    counter = _CountingPredictor(predict, output, max_batch)
    log_p, invalid = counter.log_probs(x)
    log_p = uniform_where(invalid, log_p)
    rms = x.flatten(1).pow(2).mean(1).sqrt().clamp_min(1.0)
    eps = max(torch.finfo(x.dtype).eps, counter.eps)
    h = step * torch.ones_like(rms) if step is not None else eps ** (1 / 3) * rms
    # forward differences at a step above float32's default (a coarse predictor, or a user's step) are checked
    # for their truncation error with one backward query per sample
    check = int(difference == "forward" and bool((h > _FLOAT32_STEP * rms * (1 + 1e-6)).any()))
    if num_queries < 1 + per_probe + check:
        raise ValueError(f"num_queries must be >= 3 here: one query at x, one per probe and one for the truncation "
                         f"check of forward differences at step {h.max().item():.3g}, got {num_queries}")
    probes = min((num_queries - 1 - check) // per_probe, dim)
    generator = default_generator(torch.device("cpu"), generator)
    u = orthonormal_probes(probes, batch, dim, generator).to(x.device, x.dtype).view(probes, *x.shape)
    shift = h.view(1, batch, *([1] * (x.ndim - 1))) * u
    if difference == "central":
        values, failed = counter.log_probs(torch.cat([(x + shift).flatten(0, 1), (x - shift).flatten(0, 1)]), False)
        values = values.view(2, probes, batch, -1)
        directional = (values[0] - values[1]) / (2 * h.view(1, batch, 1).to(values.dtype))
        failed = failed.view(-1, batch).any(0)
    else:
        answers, failed = counter.log_probs(torch.cat([(x + shift).flatten(0, 1), *([x - shift[0]] * check)]), False)
        values, backward = answers[: probes * batch], answers[probes * batch:]
        directional = (values.view(probes, batch, -1) - log_p) / h.view(1, batch, 1).to(values.dtype)
        if check:
            central = (values.view(probes, batch, -1)[0] - backward) / (2 * h.view(batch, 1).to(values.dtype))
        failed = failed[: probes * batch].view(probes, batch).any(0) | (failed[probes * batch:] if check else False)
    broken = failed & ~invalid
    warn_samples(broken, "the predictor's answer at a perturbed point is not finite (or a hard label)")
    invalid |= broken
    invalid |= _piecewise_constant(values.view(-1, probes, batch, values.shape[-1]), log_p, invalid)
    directional = directional.masked_fill(invalid[None, :, None], 0.0)
    weights = dual_weights(log_p)[0]
    invalid |= _at_rounding_level(directional, weights, counter, h, difference, invalid)
    if check:
        invalid |= _truncated(directional[0], central.masked_fill(invalid[:, None], 0.0), weights, counter, h,
                              invalid)
    images = torch.einsum("kbc,nbc->nbk", weights, math.sqrt(dim) * directional)
    estimate = sketch(images, variance_factor=(dim - probes) / (dim - 1) if dim > 1 else 0.0)
    classes = log_p.shape[1]
    spectral, trace, stderr = (value.masked_fill(invalid, math.nan)
                               for value in (estimate.eigenvalue, estimate.trace, estimate.stderr))
    return BlackBoxEstimate(
        spectral_norm=spectral,
        trace=trace,
        trace_stderr=stderr,
        lower=trace / (classes - 1),
        upper=trace,
        queries=torch.full((batch,), 1 + per_probe * probes + check, dtype=torch.long),
        calls=counter.calls,
    )


_TRUNCATION_SHARE = 0.05
_FLOAT32_STEP = torch.finfo(torch.float32).eps ** (1 / 3)  # the default relative step for float32 answers


def _truncated(forward: Tensor, central: Tensor, weights: Tensor, counter: _CountingPredictor, h: Tensor,
               invalid: Tensor) -> Tensor:
    """(B,) samples whose forward differences carry an O(h) truncation error above `_TRUNCATION_SHARE` of the
    quadratic form |W J u|^2: the first probe's |W d|^2 from forward against central differences (O(h^2)). The
    comparison has rounding noise of its own (s(x + hu) - 2 s(x) + s(x - hu) over 2h, each answer off by eps / 2):
    a difference within three times that noise is not a finding. Warned about."""
    image = torch.einsum("kbc,bc->bk", weights, central)
    energy_central = image.square().sum(1).clamp_min(torch.finfo(image.dtype).tiny)
    energy_forward = torch.einsum("kbc,bc->bk", weights, forward).square().sum(1)
    share = (energy_forward - energy_central).abs() / energy_central
    noise = math.sqrt(6) * counter.eps / 2 * counter.magnitude / (2 * h.to(image.dtype))
    noise_share = 2 * noise * weights.square().sum((0, 2)).sqrt() / energy_central.sqrt()
    truncated = (share > torch.clamp(3 * noise_share, min=_TRUNCATION_SHARE)) & ~invalid
    if truncated.any():
        warn_samples(truncated, f"the forward differences' truncation error is {share[truncated].max().item():.0%} "
                                f"of the signal at step {h.max().item():.3g} (forward and central differences "
                                "disagree along a probe); pass a smaller `step` or difference='central'")
    return truncated


def _piecewise_constant(values: Tensor, log_p: Tensor, invalid: Tensor) -> Tensor:
    """(B,) samples where some probes left every answer bit-for-bit unchanged while others moved it: the
    predictor is piecewise constant there (a tree ensemble, a quantised model), so a difference is a jump over
    the step, not a derivative, warned about."""
    unchanged = (values == log_p).all(-1).all(0)  # (probes, B)
    piecewise = unchanged.any(0) & ~unchanged.all(0) & ~invalid
    warn_samples(piecewise, "the predictor is piecewise constant here (some probes left its answer exactly "
                            "unchanged, others jumped): a finite difference measures a jump, not a derivative")
    return piecewise


def _at_rounding_level(directional: Tensor, weights: Tensor, counter: _CountingPredictor, h: Tensor,
                       difference: Difference, invalid: Tensor) -> Tensor:
    """(B,) samples whose weighted differences are dominated by output rounding, warned about.

    Rounding noise of each log-probability is at most eps / 2 (the relative error of a probability; for
    logits eps / 2 times the largest |logit|), so a difference carries noise of at most sqrt(2) eps / 2 / h
    (forward) or half that (central) per class, weighted like the signal."""
    noise = math.sqrt(2) * counter.eps / 2 * counter.magnitude / (h.to(directional.dtype) *
                                                                  (2 if difference == "central" else 1))
    noise_energy = noise.square() * weights.square().sum((0, 2))
    signal_energy = torch.einsum("kbc,nbc->nbk", weights, directional).square().sum(-1).mean(0)
    rounding = (noise_energy > _ROUNDING_SHARE * signal_energy) & ~invalid
    warn_samples(rounding, f"the finite differences are at the rounding level of the predictor's answers (they "
                           f"hold {-math.log2(counter.eps):.0f}-bit values, step {h.max().item():.3g}); pass a "
                           "larger `step` or query a more precise predictor")
    return rounding


def blackbox_fisher_spectral_norm(predict: Callable, inputs: Tensor, num_queries: int = 128, **options) -> Tensor:
    """lambda_max(F(x_i)) per sample from queries alone (see `blackbox_fisher` for the options)."""
    return blackbox_fisher(predict, inputs, num_queries, **options).spectral_norm


def blackbox_fisher_trace(predict: Callable, inputs: Tensor, num_queries: int = 128, **options) -> Tensor:
    """tr F(x_i) per sample from queries alone; its standard error is `blackbox_fisher(...).trace_stderr`."""
    return blackbox_fisher(predict, inputs, num_queries, **options).trace


def numpy_predictor(function: Callable[[np.ndarray], np.ndarray], input_shape: Optional[tuple[int, ...]] = None,
                    dtype: DTypeLike = np.float64) -> Callable[[Tensor], Tensor]:
    """Wrap a NumPy function (scikit-learn's `predict_proba`, an onnxruntime session's run) as a predictor:
    tensors in (reshaped to `(N, *input_shape)` and cast to `dtype`), tensors out in the function's own
    floating dtype (others as float64)."""

    def predict(batch: Tensor) -> Tensor:
        array = batch.detach().cpu().numpy().astype(dtype)
        if input_shape is not None:
            array = array.reshape(len(array), *input_shape)
        answer = np.asarray(function(array))  # its own precision kept: the difference step depends on it
        return torch.from_numpy(answer if np.issubdtype(answer.dtype, np.floating) else answer.astype(np.float64))

    return predict
