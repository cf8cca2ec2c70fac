"""What a model returns, adapted and checked: the (B, C) class scores, their kind (logits, probabilities,
log-probabilities), per-sample validity and the warnings that name invalid samples.

Never a silent wrong number: a row that is not finite is marked invalid and warned about by its sample index;
rows that are not what `output` says raise (probs, log_probs) or warn (logits that are all probability
vectors, a model ending in softmax).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from fim_lightning.guard import user_stacklevel

OutputKind = Literal["logits", "probs", "log_probs"]
OUTPUT_KINDS = ("logits", "probs", "log_probs")
_NORMALISATION_TOL = 1e-3


def check_inputs(inputs: object) -> Tensor:
    """A finite floating-point batch (B, ...) with B >= 1, or a clear error naming what is wrong."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor batch (B, ...), got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be floating point, got {inputs.dtype} (convert images with `.float() / 255`)"
        )
    if inputs.is_meta:
        raise ValueError("inputs are on the meta device (shapes without data): move them to a real device first")
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (B, ...) with B >= 1, got shape {tuple(inputs.shape)}")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN or inf")
    return inputs


def check_output_kind(output: str) -> None:
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")


def as_class_scores(out: object, batch_size: int) -> Tensor:
    """The (B, C) tensor a model returned: a tensor, or a `.logits` attribute / `"logits"` key (Hugging Face)."""
    scores = out
    if not isinstance(scores, Tensor):
        scores = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}, not a (B, C) tensor of class scores; wrap it, "
            "e.g. `lambda x: model(x)[0]`"
        )
    if scores.ndim != 2 or scores.shape[0] != batch_size:
        raise ValueError(
            f"the model output must be (B, C) = ({batch_size}, C) class scores, got shape {tuple(scores.shape)}"
        )
    if scores.shape[1] < 2:
        raise ValueError(f"the Fisher information needs C >= 2 classes, the model returned C = {scores.shape[1]}")
    if not scores.is_floating_point():
        raise TypeError(f"the model output must be floating point, got {scores.dtype}")
    return scores


def warn_samples(mask: Tensor, cause: str) -> None:
    """Warn that the samples in `mask` (B,) get NaN, naming their indices in the batch and the cause."""
    indices = mask.nonzero().flatten().tolist()
    if indices:
        shown = ", ".join(map(str, indices[:20])) + (", ..." if len(indices) > 20 else "")
        warnings.warn(f"sample{'s' if len(indices) > 1 else ''} {shown} of the batch: {cause}; "
                      "their Fisher values are NaN", RuntimeWarning, stacklevel=user_stacklevel())


def looks_like_probabilities(scores: Tensor) -> bool:
    """Every row non-negative and summing to 1: what a model ending in softmax returns."""
    total = scores.sum(-1)
    return bool((scores >= 0).all()) and torch.allclose(total, torch.ones_like(total), atol=_NORMALISATION_TOL)


def check_output_values(scores: Tensor, output: OutputKind, warn: bool = True) -> Tensor:
    """Value checks on a detached model output (outside any transform, as they read data).

    Returns the (B,) mask of rows that are not finite (NaN / inf; -inf is allowed in log-probabilities),
    warned about by sample index when `warn`. Finite rows that are not what `output` says raise (probs,
    log_probs) or warn (logits that are all probability vectors)."""
    invalid = (torch.isnan(scores) | torch.isposinf(scores)).any(-1)
    if output != "log_probs":
        invalid |= torch.isneginf(scores).any(-1)
    if warn:
        warn_samples(invalid, "the model output is not finite (NaN or inf)")
    valid = scores[~invalid]
    if not len(valid):
        return invalid
    if output == "probs" and not looks_like_probabilities(valid):
        total = valid.sum(-1)
        raise ValueError(
            f"output='probs' but the rows are not probability vectors (row sums from {total.min().item():.4g} "
            f"to {total.max().item():.4g}); pass output='logits' if the model returns logits"
        )
    if output == "log_probs":
        total = valid.logsumexp(-1)
        if not torch.allclose(total, torch.zeros_like(total), atol=_NORMALISATION_TOL):
            raise ValueError(
                "output='log_probs' but logsumexp of the rows is not 0; pass output='logits' if the model returns "
                "logits"
            )
    if output == "logits" and looks_like_probabilities(valid):
        warnings.warn(
            f"output='logits' but all {len(valid)} rows are non-negative and sum to 1: the model seems to end in "
            "softmax. Treated as logits, its Fisher information is far too small; pass output='probs'",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )
    return invalid


def logits_from_output(scores: Tensor, output: OutputKind) -> Tensor:
    """Scores z with softmax(z) = p: logits and log-probabilities as they are, log p for probabilities."""
    if output == "probs":
        return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
    return scores


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities (N, C)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def uniform_where(invalid: Tensor, log_probs: Tensor) -> Tensor:
    """`log_probs` (B, C) with the rows of `invalid` samples replaced by the uniform distribution, so they stay
    finite through the algorithms (their results are set to NaN at the end)."""
    return torch.where(invalid[:, None], -math.log(log_probs.shape[1]), log_probs)


def log_probs_from_output(scores: Tensor, output: OutputKind) -> Tensor:
    """log p in float64 from what the model returned."""
    return logits_from_output(scores, output).to(torch.float64).log_softmax(-1)
