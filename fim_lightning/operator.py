"""The input-space Fisher information of a classifier as a per-sample linear operator (white-box, torch.func).

For logits z(x), p = softmax(z), J = dz/dx and M = diag(p) - p p^T: F(x) = J^T M J. Any z with
softmax(z) = p serves (logits, log-probabilities, log of probabilities). The product with M is taken
relative to the top class t, M u = p * ((u - u_t) - p . (u - u_t)), so nothing cancels when p_t -> 1; the
probabilities come from a float64 log-softmax. Factorisations of M live in `algorithms.dual_weights`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

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


def check_output_values(scores: Tensor, output: OutputKind) -> None:
    """Value checks on a detached model output (outside any transform, as they read data)."""
    if not torch.isfinite(scores).all() and output != "log_probs":
        raise ValueError("the model output contains NaN or inf")
    if output == "probs":
        total = scores.sum(-1)
        if (scores < 0).any() or not torch.allclose(total, torch.ones_like(total), atol=_NORMALISATION_TOL):
            raise ValueError(
                f"output='probs' but the rows are not probability vectors (row sums from {total.min().item():.4g} "
                f"to {total.max().item():.4g}); pass output='logits' if the model returns logits"
            )
    if output == "log_probs":
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise ValueError("the model output contains NaN or +inf")
        total = scores.logsumexp(-1)
        if not torch.allclose(total, torch.zeros_like(total), atol=_NORMALISATION_TOL):
            raise ValueError(
                "output='log_probs' but logsumexp of the rows is not 0; pass output='logits' if the model returns logits"
            )


def logits_from_output(scores: Tensor, output: OutputKind) -> Tensor:
    """Scores z with softmax(z) = p: logits and log-probabilities as they are, log p for probabilities."""
    if output == "probs":
        return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
    return scores


def log_probs_from_output(scores: Tensor, output: OutputKind) -> Tensor:
    """log p in float64 from what the model returned."""
    return logits_from_output(scores, output).to(torch.float64).log_softmax(-1)


def metric_product(log_probs: Tensor, u: Tensor) -> Tensor:
    """M u = (diag(p) - p p^T) u per row, relative to the top class so that p_t ~ 1 loses nothing."""
    u = u.to(log_probs.dtype)
    d = u - u.gather(1, log_probs.argmax(1, keepdim=True))
    p = log_probs.exp()
    return p * (d - (p * d).sum(1, keepdim=True))


def functional_forward(model: Callable, dtype: torch.dtype, differentiable: bool) -> Callable[[Tensor], object]:
    """x -> model(x) with parameters detached (unless `differentiable`) and cast to `dtype`, without touching the model."""
    if not isinstance(model, nn.Module):
        return model
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if differentiable and all(t.dtype == dtype or not t.is_floating_point() for t in state.values()):
        return model
    state = {
        name: (t if differentiable else t.detach()).to(dtype) if t.is_floating_point() else t
        for name, t in state.items()
    }
    return lambda x: torch.func.functional_call(model, state, (x,))


class FisherOperator:
    """F(x_i) = J_i^T M_i J_i for each sample x_i of a batch, through torch.func.

    Samples are independent (eval-mode layers), so one batched JVP gives J v per sample and one batched
    VJP gives J^T u per sample. The reverse pass is recorded once, on first use, and reused.

    Args:
        model: an `nn.Module` or callable mapping a batch (B, ...) to (B, C) class scores.
        inputs: the batch (B, ...).
        output: what the model returns: "logits", "probs" or "log_probs".
        model_dtype: evaluate the model in this dtype (parameters are cast on the fly, never in place);
            default: the inputs' dtype, raised to float32 for half precision.
        differentiable: keep the graph to the parameters (for penalties); otherwise parameters are detached.
    """

    def __init__(
        self,
        model: Callable,
        inputs: Tensor,
        *,
        output: OutputKind = "logits",
        model_dtype: Optional[torch.dtype] = None,
        differentiable: bool = False,
    ) -> None:
        check_output_kind(output)
        check_inputs(inputs)
        if model_dtype is None:
            model_dtype = torch.promote_types(inputs.dtype, torch.float32)
        self.inputs = inputs.detach().to(model_dtype).contiguous()
        if self.inputs.is_inference():
            self.inputs = self.inputs.clone()
        self.output = output
        self.differentiable = differentiable
        self._forward = functional_forward(model, model_dtype, differentiable)
        self._logits: Optional[Tensor] = None
        self._vjp_fn: Optional[Callable] = None

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    def _logits_and_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores = as_class_scores(self._forward(x), x.shape[0])
        return logits_from_output(scores, self.output), scores.detach()

    def _record(self, logits: Tensor, scores: Tensor) -> None:
        check_output_values(scores, self.output)
        self._logits = logits if self.differentiable else logits.detach()

    @property
    def logits(self) -> Tensor:
        """z(x_i), (B, C), in the model dtype."""
        if self._logits is None:
            self._record(*self._logits_and_scores(self.inputs))
        return self._logits

    @property
    def log_probs(self) -> Tensor:
        """log p(y | x_i), (B, C), float64."""
        return log_probs_from_output(self.logits, "logits")

    def _reverse(self) -> Callable:
        if self._vjp_fn is None:
            logits, self._vjp_fn, scores = torch.func.vjp(self._logits_and_scores, self.inputs, has_aux=True)
            if self._logits is None:
                self._record(logits, scores)
        return self._vjp_fn

    def jvp(self, tangents: Tensor) -> Tensor:
        """J v per sample: (B, ...) -> (B, C), forward mode; the first call also records z(x)."""
        logits, tangent, scores = torch.func.jvp(
            self._logits_and_scores, (self.inputs,), (tangents.to(self.inputs.dtype),), has_aux=True
        )
        if self._logits is None:
            self._record(logits, scores)
        return tangent

    def vjp(self, cotangents: Tensor) -> Tensor:
        """J^T u per sample: (B, C) -> (B, ...), reverse mode."""
        vjp_fn = self._reverse()
        return vjp_fn(cotangents.to(self.inputs.dtype))[0]

    def matvec(self, vectors: Tensor) -> Tensor:
        """F v = J^T (M J v) per sample: one JVP and one VJP."""
        return self.vjp(metric_product(self.log_probs, self.jvp(vectors)))

    def factor(self, weights: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """Rows J^T w_k for cotangents (K, B, C): returns (B, K, *input_shape).

        `chunk_size` cotangents go through one vmapped VJP at a time (memory grows with it). None picks all
        K at once on CUDA and 1 on CPU, where a loop of VJPs on the recorded graph is about 3x faster than vmap.
        """
        self._reverse()
        if chunk_size is None:
            chunk_size = weights.shape[0] if self.inputs.is_cuda else 1
        if chunk_size == 1:
            rows = torch.stack([self.vjp(w) for w in weights])
        else:
            rows = torch.func.vmap(self.vjp, chunk_size=chunk_size)(weights)
        return rows.movedim(0, 1)
