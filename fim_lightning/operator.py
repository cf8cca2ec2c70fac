"""The input-space Fisher information of a classifier as a per-sample linear operator (white-box, torch.func).

For logits z(x), p = softmax(z), J = dz/dx and M = diag(p) - p p^T: F(x) = J^T M J. Any z with
softmax(z) = p serves (logits, log-probabilities, log of probabilities). The product with M is taken
relative to the top class t, M u = p * ((u - u_t) - p . (u - u_t)), so nothing cancels when p_t -> 1; the
probabilities come from a float64 log-softmax. `dual_weights` factorises M the same way.

Never a silent wrong number: a sample whose output or Jacobian is not finite is marked invalid, warned about
by its index and cause, and every algorithm returns NaN for it while the other samples stay exact. What the
model returns is adapted and checked by `outputs`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, cast

import torch
from torch import Tensor, nn

from fim_lightning.guard import EVAL_PASSES, ForwardPasses, is_sharded
from fim_lightning.linear_operator import PerSampleOperator
from fim_lightning.outputs import OutputKind, as_class_scores, check_inputs, check_output_kind, check_output_values, \
    log_probs_from_output, logits_from_output, uniform_where, warn_samples

def metric_product(log_probs: Tensor, u: Tensor) -> Tensor:
    """M u = (diag(p) - p p^T) u per row, relative to the top class so that p_t ~ 1 loses nothing."""
    u = u.to(log_probs.dtype)
    d = u - u.gather(1, log_probs.argmax(1, keepdim=True))
    p = log_probs.exp()
    return p * (d - (p * d).sum(1, keepdim=True))


def dual_weights(log_probs: Tensor, top_k: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Cotangents (K, B, C) on the logits whose VJPs are the rows of A, F = A^T A, without cancellation.

    Relative to the top class t, with r_y = z_y - z_t for the other classes and q their probabilities,
    M = E^T (diag(q) - q q^T) E (E maps z to r), and diag(q) - q q^T = S^T S for
    S = (I - c u u^T) diag(u), u = sqrt(q), c = 1 / (1 + sqrt(p_t)). The rows of A are then J^T (S E)_k.
    With `top_k`, the classes outside the top k are merged into one class R with logit logsumexp_R z
    (E row: p_y / p_R on R, -1 on t). Returns the cotangents and p_R (None without merging).
    """
    batch, num_classes = log_probs.shape
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    merged = top_k is not None and top_k < num_classes - 1
    kept = top_k if merged else num_classes
    order = log_probs.argsort(dim=1, descending=True)
    eye = torch.eye(num_classes, dtype=log_probs.dtype, device=log_probs.device)
    top_row = eye[order[:, 0]]
    rows = eye[order[:, 1:kept]] - top_row[:, None]
    log_q = log_probs.gather(1, order[:, 1:kept])
    neglected = None
    if merged:
        rest = log_probs.scatter(1, order[:, :kept], -math.inf)
        log_rest = rest.logsumexp(dim=1, keepdim=True)
        rows = torch.cat([rows, ((rest - log_rest).exp() - top_row)[:, None]], dim=1)
        log_q = torch.cat([log_q, log_rest], dim=1)
        neglected = log_rest.squeeze(1).exp()
    u = (0.5 * log_q).exp()
    c = 1.0 / (1.0 + (0.5 * log_probs.gather(1, order[:, :1])).exp())
    factor = torch.diag_embed(u) - c[:, :, None] * u[:, :, None] * (u * u)[:, None, :]
    return (factor @ rows).movedim(1, 0), neglected


def functional_forward(model: Callable, dtype: torch.dtype, differentiable: bool) -> Callable[[Tensor], object]:
    """x -> model(x) with parameters detached (unless `differentiable`) and cast to `dtype`, without touching the
    model."""
    if not isinstance(model, nn.Module):
        return model
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    same_dtype = all(t.dtype == dtype or not t.is_floating_point() for t in state.values())
    if differentiable and same_dtype:
        return model
    if any(type(t).__name__ == "DTensor" for t in state.values()):
        # a sharded model (FSDP2) gathers its parameters in its own forward hooks: run it as it is (the
        # products are taken with respect to the inputs only)
        if not same_dtype:
            raise ValueError(f"model_dtype={dtype} cannot cast a sharded (FSDP2 / DTensor) model; score it in its "
                             "own parameter dtype (model_dtype=None)")
        return model
    state = {
        name: (t if differentiable else t.detach()).to(dtype) if t.is_floating_point() else t
        for name, t in state.items()
    }
    return lambda x: torch.func.functional_call(model, state, (x,))


class FisherOperator(PerSampleOperator):
    """F(x_i) = J_i^T M_i J_i for each sample x_i of a batch, through torch.func.

    Samples are independent (eval-mode layers), so one batched JVP gives J v per sample and one batched
    VJP gives J^T u per sample. The reverse pass is recorded once, on first use, and reused.

    Args:
        model: an `nn.Module` or callable mapping a batch (B, ...) to (B, C) class scores.
        inputs: the batch (B, ...).
        output: what the model returns: "logits", "probs" or "log_probs".
        model_dtype: evaluate the model in this dtype (parameters are cast on the fly, never in place):
            float32 or float64; default: the inputs' dtype, raised to float32 for half precision.
        differentiable: keep the graph to the parameters (for penalties); otherwise parameters are detached.
        passes: what a forward pass means per sample (`guard.preserved_state` yields it); in train mode the
            first operator of a guard records the batch statistics, from one forward pass at `inputs`.

    Attributes:
        invalid: (B,) samples whose output or Jacobian was found non-finite; their results are NaN.
    """

    def __init__(
        self,
        model: Callable,
        inputs: Tensor,
        *,
        output: OutputKind = "logits",
        model_dtype: Optional[torch.dtype] = None,
        differentiable: bool = False,
        passes: ForwardPasses = EVAL_PASSES,
    ) -> None:
        check_output_kind(output)
        check_inputs(inputs)
        if model_dtype is None:
            model_dtype = torch.promote_types(inputs.dtype, torch.float32)
        if model_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"model_dtype must be torch.float32 or torch.float64 (half precision is too coarse for "
                             f"Jacobian products), got {model_dtype}")
        self._model, self._model_dtype = model, model_dtype
        # sharded parameters (FSDP2): every forward is an all-gather, so a caller runs as many on every rank
        self.collective = is_sharded(model)
        self.inputs = inputs.detach().to(model_dtype).contiguous()
        if self.inputs.is_inference():
            self.inputs = self.inputs.clone()
        self.output = output
        self.differentiable = differentiable
        self._forward = functional_forward(model, model_dtype, differentiable)
        self._passes = passes
        self._logits: Optional[Tensor] = None
        self._vjp_fn: Optional[Callable] = None
        self.invalid = torch.zeros(self.batch_size, dtype=torch.bool, device=self.inputs.device)
        if passes.needs_recording:
            self._record(*self._logits_and_scores(self.inputs, record=True))

    def subset(self, index: Tensor) -> "FisherOperator":
        """The operator of the samples `index` alone: the same per-sample function (the same forward passes,
        so in train mode the same held batch statistics), with their invalid flags."""
        sub = FisherOperator(self._model, self.inputs[index], output=self.output, model_dtype=self._model_dtype,
                             differentiable=self.differentiable, passes=self._passes)
        sub.invalid = sub.invalid | self.invalid[index]
        return sub

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    def _logits_and_scores(self, x: Tensor, record: bool = False) -> tuple[Tensor, Tensor]:
        scores = as_class_scores(self._passes.run(self._forward, x, record), x.shape[0])
        return logits_from_output(scores, self.output), scores.detach()

    def _record(self, logits: Tensor, scores: Tensor) -> None:
        self.invalid = self.invalid | check_output_values(scores, self.output)
        self._logits = logits if self.differentiable else logits.detach()
        self._check_per_sample(scores)

    def _check_per_sample(self, scores: Tensor) -> None:
        """F(x_i) is per sample: a model whose output for one sample depends on another (`x - x.mean(0)`)
        has no such Fisher information. Checked once, on two samples: sample 0 moved, sample 1 watched. Both
        passes take the same two-sample batch (not the recorded output), so a replayed dropout mask is the same."""
        if self.batch_size < 2:
            return
        pair = self.inputs[:2].detach().clone()
        pair[0] = pair[0] + 1.0
        with torch.no_grad():
            watched = as_class_scores(self._passes.run(self._forward, pair), 2)[1].detach()
            original = as_class_scores(self._passes.run(self._forward, self.inputs[:2].detach()), 2)[1].detach()
        change = (watched - original).abs().max().item()
        scale = original.abs().max().item() + 1.0
        if not change <= 1e3 * torch.finfo(self.inputs.dtype).eps * scale:
            everyone = torch.ones_like(self.invalid)
            warn_samples(everyone, f"the model mixes the samples of a batch (moving sample 0 changed the output "
                                   f"of sample 1 by {change:.3g}), so there is no per-sample Fisher information; "
                                   "score a model whose samples are independent (eval-mode layers)")
            self.invalid = everyone

    def check_output(self) -> None:
        """One forward pass (if none has run): raises unless the model returns (B, C) class scores, C >= 2."""
        if self._logits is None:
            self._record(*self._logits_and_scores(self.inputs))

    @property
    def logits(self) -> Tensor:
        """z(x_i), (B, C), in the model dtype."""
        self.check_output()
        return cast(Tensor, self._logits)  # recorded by the check

    @property
    def log_probs(self) -> Tensor:
        """log p(y | x_i), (B, C), float64; uniform for invalid samples (their results are NaN)."""
        log_probs = log_probs_from_output(self.logits, "logits")
        return uniform_where(self.invalid, log_probs) if self.invalid.any() else log_probs

    def log_probs_at(self, points: Tensor) -> Tensor:
        """log p(y | points_i), float64, through the same per-sample function (held batch statistics)."""
        return log_probs_from_output(as_class_scores(self._passes.run(self._forward, points), len(points)), self.output)

    def screen(self, values: Tensor, cause: str) -> Tensor:
        """`values` (B, ...) with the samples that are or become invalid (a non-finite entry) set to 0."""
        bad = ~torch.isfinite(values.flatten(1)).all(1)
        warn_samples(bad & ~self.invalid, cause)
        self.invalid = self.invalid | bad
        return values.masked_fill(self.invalid.view(-1, *([1] * (values.ndim - 1))), 0)

    def nan_invalid(self, values: Tensor) -> Tensor:
        """`values` (B, ...) with NaN for the invalid samples."""
        return values.masked_fill(self.invalid.view(-1, *([1] * (values.ndim - 1))), float("nan"))

    def _reverse(self) -> Callable:
        if self._vjp_fn is None:
            # has_aux=True returns (output, vjp_fn, aux): torch's annotations list two
            logits, self._vjp_fn, scores = torch.func.vjp(  # type: ignore[misc]
                self._logits_and_scores, self.inputs, has_aux=True)
            if self._logits is None:
                self._record(logits, scores)
        return self._vjp_fn

    def jvp(self, tangents: Tensor) -> Tensor:
        """J v per sample: (B, ...) -> (B, C), forward mode; the first call also records z(x)."""
        try:
            logits, tangent, scores = torch.func.jvp(  # type: ignore[misc]  # has_aux: three values
                self._logits_and_scores, (self.inputs,), (tangents.to(self.inputs.dtype),), has_aux=True
            )
        except NotImplementedError as error:
            raise NotImplementedError(
                f"a layer of this model has no forward-mode derivative in torch ({str(error).splitlines()[0]}); the "
                "JVP-based methods (power, lanczos, hutchinson, the trace and spectral penalties) cannot run on "
                "it: use method='exact' (reverse mode only)") from error
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
        K at once on CUDA and 1 on CPU, where a loop of VJPs on the recorded graph is faster than vmap.
        """
        self._reverse()
        if chunk_size is None:
            chunk_size = weights.shape[0] if self.inputs.is_cuda else 1
        if chunk_size == 1:
            rows = torch.stack([self.vjp(w) for w in weights])
        else:
            rows = torch.func.vmap(self.vjp, chunk_size=chunk_size)(weights)
        return rows.movedim(0, 1)
