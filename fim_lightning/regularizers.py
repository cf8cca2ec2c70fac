"""Differentiable Fisher penalties: add `penalty(model, inputs)` to the training loss.

Each variant estimates a per-sample Fisher quantity R(x_i) with the graph to the parameters kept, and
returns weight(step) * mean_i R(x_i):

- `FisherTracePenalty`: tr F = E_z |W J z|^2 over Rademacher z (F = (W J)^T (W J), `dual_weights`),
  one forward-mode JVP per probe.
- `FisherSpectralPenalty`: lambda_max(F) through the Rayleigh quotient v^T F v = |W J v|^2 at an eigenvector
  v found without a graph (exact dual, or a few power steps); at the exact eigenvector its gradient is the
  gradient of lambda_max (Hellmann-Feynman).
- `FisherKLPenalty`: d * 2 KL(p(x) || p(x + h u)) / h^2 for a random unit u, which tends to tr F as h -> 0
  (E[u u^T] = I / d); one extra forward pass when it reuses the caller's logits, the cheapest.
- `FisherWorstDirectionPenalty`: 2 KL(p(x) || p(x + h v)) / h^2 along v ~ the top eigenvector of F, found by
  power steps through the KL's input gradient (virtual adversarial training's trick): about lambda_max, the
  direction an attack uses, for one extra forward and backward per power step.

BatchNorm: in the default `mode="train"` the penalty's forward passes normalise with the statistics of the
training batch (recorded once, held fixed for the perturbed passes, see `guard.ForwardPasses`; the KL form
reusing the caller's logits normalises its one perturbed pass by that batch's own statistics) with
`track_running_stats` switched off, so running statistics are updated only by the caller's own forward, as
in plain training. Dropout masks are drawn from a forked RNG, the same mask for every pass of one call.
The penalty runs in float32 (autocast off). The caller's logits are reused only where they are what the
penalty would compute itself: float32 or better (a bf16 autocast forward differs from the float32 one by far
more than the KL being measured) and no active dropout in train mode (the caller's mask is not ours).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fim_lightning import algorithms
from fim_lightning.guard import ForwardPasses, Mode, active_dropout, preserved_state
from fim_lightning.operator import FisherOperator, dual_weights
from fim_lightning.outputs import OUTPUT_KINDS, OutputKind, check_inputs, kl_divergence, log_probs_from_output
from fim_lightning.sampling import rademacher, random_unit, unit
from fim_lightning.validation import check_choice, check_int, check_real


class FisherPenalty(nn.Module):
    """Base class: weight(step) * mean_i R(x_i) with a linear warm-up, applied every `every_n_steps` steps.

    Args:
        weight: the weight after warm-up.
        every_n_steps: apply the penalty only on steps divisible by this (0 is returned otherwise).
        warmup_steps: the weight grows linearly from 0 to `weight` over these steps.
        mode: "train" (dropout on, BatchNorm batch statistics, buffers untouched) or "eval".
        output: what the model returns: "logits", "probs" or "log_probs".
        seed: seed of the penalty's own generator (probes, start vectors); the global RNG is not used.
    """

    def __init__(self, weight: float = 0.1, every_n_steps: int = 1, warmup_steps: int = 0, mode: Mode = "train",
                 output: OutputKind = "logits", seed: int = 0) -> None:
        super().__init__()
        self.weight = check_real("weight", weight, 0.0)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.mode = check_choice("mode", mode, ("train", "eval"))
        self.output = check_choice("output", output, OUTPUT_KINDS)
        self.seed = check_int("seed", seed)
        self._generator: Optional[torch.Generator] = None

    @property
    def generator(self) -> torch.Generator:
        """The penalty's own CPU generator, created on first use (so the module pickles for spawned workers)."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def weight_at(self, step: Optional[int]) -> float:
        if step is None or self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, (step + 1) / self.warmup_steps)

    def forward(self, model: Callable, inputs: Tensor, step: Optional[int] = None,
                logits: Optional[Tensor] = None) -> Tensor:
        """The penalty (a differentiable scalar). `logits` of `inputs` from the caller's forward pass are
        reused where the variant can (the KL form)."""
        check_inputs(inputs)
        if step is not None and step % self.every_n_steps:
            return inputs.new_zeros(())
        if logits is not None and not self._reusable(model, inputs, logits):
            logits = None
        with preserved_state(model, inputs, mode=self.mode, second_order=True) as passes:
            if logits is not None:
                self._check_logits(model, inputs, logits)
            values = self.per_sample(model, inputs.detach(), logits, passes)
        value = values.mean()
        if not torch.isfinite(value):
            raise FloatingPointError(f"{type(self).__name__} is {value.item()} (non-finite Fisher estimate)")
        return (self.weight_at(step) * value).to(torch.promote_types(inputs.dtype, torch.float32))

    def _reusable(self, model: Callable, inputs: Tensor, logits: Tensor) -> bool:
        """The caller's logits stand for ours: float32 or better, one row per input, and no dropout mask of the
        caller's in them (train mode)."""
        precise = logits.is_floating_point() and torch.finfo(logits.dtype).eps <= torch.finfo(torch.float32).eps
        shaped = logits.ndim == 2 and logits.shape[0] == inputs.shape[0]
        return precise and shaped and not (self.mode == "train" and active_dropout(model))

    def _check_logits(self, model: Callable, inputs: Tensor, logits: Tensor) -> None:
        """The caller's logits must be those of `inputs`: row 0 recomputed (one sample's forward, inside the
        penalty's guard). Skipped with BatchNorm batch statistics (`mode="train"`), where one row depends on the
        whole batch and checking it would cost the forward the reuse saves."""
        if self.mode == "train" and isinstance(model, nn.Module) and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return
        with torch.no_grad():
            row = log_probs_from_output(model(inputs[:1].detach()), self.output)[0]
        given = log_probs_from_output(logits[:1].detach(), self.output)[0]
        gap = (row - given).abs().max().item()
        if not gap <= 1e-3 * (1.0 + row.abs().max().item()):
            raise ValueError(f"{type(self).__name__}: logits= are not the model's logits of `inputs` (sample 0's "
                             f"log-probabilities differ by {gap:.3g}); pass the logits of this batch's forward pass, "
                             "or none")

    def per_sample(self, model: Callable, inputs: Tensor, logits: Optional[Tensor], passes: ForwardPasses) -> Tensor:
        """The per-sample values inside the guard; `passes` (from `preserved_state`) defines a forward pass."""
        raise NotImplementedError

    def _operator(self, model: Callable, inputs: Tensor, passes: ForwardPasses,
                  differentiable: bool = True) -> FisherOperator:
        return FisherOperator(model, inputs, output=self.output, differentiable=differentiable, passes=passes)


def _quadratic_form(op: FisherOperator, tangent: Tensor) -> Tensor:
    """v^T F v = |W J v|^2 per sample, differentiable."""
    image = op.jvp(tangent)
    weights = dual_weights(op.log_probs)[0]
    return torch.einsum("kbc,bc->bk", weights, image.to(weights.dtype)).square().sum(-1)


class FisherTracePenalty(FisherPenalty):
    """weight * mean_i tr F(x_i), Hutchinson with `num_probes` Rademacher probes (forward mode)."""

    def __init__(self, num_probes: int = 1, weight: float = 0.1, every_n_steps: int = 1, warmup_steps: int = 0,
                 mode: Mode = "train", output: OutputKind = "logits", seed: int = 0) -> None:
        super().__init__(weight, every_n_steps, warmup_steps, mode, output, seed)
        self.num_probes = check_int("num_probes", num_probes, 1)

    def per_sample(self, model, inputs, logits, passes):
        op = self._operator(model, inputs, passes)
        forms = [_quadratic_form(op, rademacher(inputs.shape, inputs, self.generator)) for _ in range(self.num_probes)]
        return sum(forms) / self.num_probes


class FisherSpectralPenalty(FisherPenalty):
    """weight * mean_i lambda_max(F(x_i)), through the Rayleigh quotient at an eigenvector found by
    `eigenvector="exact"` (C - 1 VJPs) or `"power"` (`steps` power iterations), both without a graph."""

    def __init__(self, eigenvector: str = "power", steps: int = 3, weight: float = 0.1, every_n_steps: int = 1,
                 warmup_steps: int = 0, mode: Mode = "train", output: OutputKind = "logits", seed: int = 0) -> None:
        super().__init__(weight, every_n_steps, warmup_steps, mode, output, seed)
        self.eigenvector = check_choice("eigenvector", eigenvector, ("exact", "power"))
        self.steps = check_int("steps", steps, 1)

    def per_sample(self, model, inputs, logits, passes):
        # the differentiable operator records the batch statistics (with their graph) first; the search reuses
        # them, and every pass replays the same dropout mask
        differentiable = self._operator(model, inputs, passes)
        with torch.no_grad():
            search = FisherOperator(model, inputs, output=self.output, passes=passes)
            if self.eigenvector == "exact":
                v = algorithms.exact_dual(search).eigenvector
            else:
                v = algorithms.power_iteration(search, max_iter=self.steps, tol=0.0,
                                               generator=self.generator).eigenvector
        return _quadratic_form(differentiable, v)


class FisherKLPenalty(FisherPenalty):
    """weight * mean_i d * 2 KL(p(x_i) || p(x_i + h u_i)) / h^2, u_i random unit vectors; `step_size` = h in
    input units. Reuses the caller's logits of x when given: one extra forward pass."""

    def __init__(self, step_size: float = 1e-2, weight: float = 0.1, every_n_steps: int = 1, warmup_steps: int = 0,
                 mode: Mode = "train", output: OutputKind = "logits", seed: int = 0) -> None:
        super().__init__(weight, every_n_steps, warmup_steps, mode, output, seed)
        self.step_size = check_real("step_size", step_size, 0.0, strict=True)

    def per_sample(self, model, inputs, logits, passes):
        direction = random_unit(inputs, self.generator)
        if logits is None:
            op = self._operator(model, inputs, passes)  # in train mode: records the batch statistics of `inputs`
            log_p = op.log_probs
            log_q = op.log_probs_at(op.inputs + self.step_size * direction.to(op.inputs.dtype))
        else:
            # one forward: the perturbed batch is normalised by its own statistics, as the caller's batch was;
            # they differ from the clean batch's by O(h / sqrt(B)), a relative bias of O(1 / B) in the KL
            log_p = log_probs_from_output(logits, self.output)
            log_q = self._operator(model, inputs + self.step_size * direction, passes).log_probs
        kl = kl_divergence(log_p, log_q)
        return inputs[0].numel() * 2 * kl / self.step_size**2


class FisherWorstDirectionPenalty(FisherPenalty):
    """weight * mean_i 2 KL(p(x_i) || p(x_i + h v_i)) / h^2 along v_i ~ the top eigenvector of F(x_i).

    For a small displacement r, KL(p(x) || p(x + r)) = 1/2 r^T F r + O(|r|^3), so its gradient in r is
    F r + O(|r|^2): one backward pass to the input at r = h v gives F v, a power step on F without any JVP
    (the trick of virtual adversarial training, Miyato et al. 2018). From a random unit start, `power_steps`
    such steps turn v towards the top eigenvector (each costs one forward and one backward to the input, no
    parameter gradients); the penalty is then the KL along v, differentiated through the last forward only
    (v held fixed). At the top eigenvector it tends to lambda_max(F) as h -> 0, and since the Rayleigh quotient
    is stationary there, its gradient tends to the gradient of lambda_max (Hellmann-Feynman).

    Args:
        step_size: h, in input units (also the probe length of the power steps).
        power_steps: power steps from the random start (1: VAT's choice).
    """

    def __init__(self, step_size: float = 1e-2, power_steps: int = 1, weight: float = 0.1, every_n_steps: int = 1,
                 warmup_steps: int = 0, mode: Mode = "train", output: OutputKind = "logits", seed: int = 0) -> None:
        super().__init__(weight, every_n_steps, warmup_steps, mode, output, seed)
        self.step_size = check_real("step_size", step_size, 0.0, strict=True)
        self.power_steps = check_int("power_steps", power_steps, 0)

    def direction(self, op: FisherOperator, target: Tensor) -> Tensor:
        """v after `power_steps` power steps on F through the gradient of KL(target || p(x + h v)), (B, ...)."""
        v = random_unit(op.inputs, self.generator)
        for _ in range(self.power_steps):
            shift = (self.step_size * v).requires_grad_(True)
            log_q = op.log_probs_at(op.inputs.detach() + shift)
            (gradient,) = torch.autograd.grad(kl_divergence(target, log_q).sum(), shift)
            moved = gradient.flatten(1).norm(dim=1) > 0
            v = torch.where(moved.view(-1, *([1] * (v.ndim - 1))), unit(gradient), v)
        return v.detach()

    def per_sample(self, model, inputs, logits, passes):
        op = self._operator(model, inputs, passes)  # in train mode: records the batch statistics of `inputs`
        log_p = op.log_probs if logits is None else log_probs_from_output(logits, self.output)
        v = self.direction(op, log_p.detach())
        log_q = op.log_probs_at(op.inputs + self.step_size * v)
        return 2 * kl_divergence(log_p, log_q) / self.step_size**2
