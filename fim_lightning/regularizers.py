"""Differentiable Fisher penalties: add `penalty(model, inputs)` to the training loss.

Each variant estimates a per-sample Fisher quantity R(x_i) with the graph to the parameters kept, and
returns weight(step) * mean_i R(x_i):

- `FisherTracePenalty`: tr F = E_z |W J z|^2 over Rademacher z (F = (W J)^T (W J), `algorithms.dual_weights`),
  one forward-mode JVP per probe.
- `FisherSpectralPenalty`: lambda_max(F) through the Rayleigh quotient v^T F v = |W J v|^2 at an eigenvector
  v found without a graph (exact dual, or a few power steps); at the exact eigenvector its gradient is the
  gradient of lambda_max (Hellmann-Feynman).
- `FisherKLPenalty`: d * 2 KL(p(x) || p(x + h u)) / h^2 for a random unit u, which tends to tr F as h -> 0
  (E[u u^T] = I / d); one extra forward pass, the cheapest.

BatchNorm: in the default `mode="train"` the penalty's forward passes use batch statistics with
`track_running_stats` switched off, so running statistics are updated only by the caller's own forward, as
in plain training. Dropout masks are drawn from a forked RNG. The penalty runs in float32 (autocast off).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fim_lightning import algorithms
from fim_lightning.guard import Mode, preserved_state
from fim_lightning.operator import FisherOperator, OutputKind, check_inputs, log_probs_from_output


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
        if weight < 0 or every_n_steps < 1 or warmup_steps < 0:
            raise ValueError("weight and warmup_steps must be >= 0 and every_n_steps >= 1, got "
                             f"weight={weight}, every_n_steps={every_n_steps}, warmup_steps={warmup_steps}")
        self.weight, self.every_n_steps, self.warmup_steps = weight, every_n_steps, warmup_steps
        self.mode, self.output, self.seed = mode, output, seed
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
        with preserved_state(model, inputs, mode=self.mode):
            values = self.per_sample(model, inputs.detach(), logits)
        value = values.mean()
        if not torch.isfinite(value):
            raise FloatingPointError(f"{type(self).__name__} is {value.item()} (non-finite Fisher estimate)")
        return (self.weight_at(step) * value).float()

    def per_sample(self, model: Callable, inputs: Tensor, logits: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def _operator(self, model: Callable, inputs: Tensor) -> FisherOperator:
        return FisherOperator(model, inputs, output=self.output, differentiable=True)


def _quadratic_form(op: FisherOperator, tangent: Tensor) -> Tensor:
    """v^T F v = |W J v|^2 per sample, differentiable."""
    image = op.jvp(tangent)
    weights = algorithms.dual_weights(op.log_probs)[0]
    return torch.einsum("kbc,bc->bk", weights, image.to(weights.dtype)).square().sum(-1)


class FisherTracePenalty(FisherPenalty):
    """weight * mean_i tr F(x_i), Hutchinson with `num_probes` Rademacher probes (forward mode)."""

    def __init__(self, num_probes: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        self.num_probes = num_probes

    def per_sample(self, model, inputs, logits):
        op = self._operator(model, inputs)
        return sum(_quadratic_form(op, algorithms.rademacher(inputs.shape, inputs, self.generator)) for _ in range(self.num_probes)) / self.num_probes


class FisherSpectralPenalty(FisherPenalty):
    """weight * mean_i lambda_max(F(x_i)), through the Rayleigh quotient at an eigenvector found by
    `eigenvector="exact"` (C - 1 VJPs) or `"power"` (`steps` power iterations), both without a graph."""

    def __init__(self, eigenvector: str = "power", steps: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        if eigenvector not in ("exact", "power") or steps < 1:
            raise ValueError(f"eigenvector must be 'exact' or 'power' and steps >= 1, got {eigenvector!r}, {steps}")
        self.eigenvector, self.steps = eigenvector, steps

    def per_sample(self, model, inputs, logits):
        rng = torch.get_rng_state()  # the same dropout masks for the search and the differentiable pass
        with torch.no_grad():
            search = FisherOperator(model, inputs, output=self.output)
            if self.eigenvector == "exact":
                v = algorithms.exact_dual(search).eigenvector
            else:
                v = algorithms.power_iteration(search, max_iter=self.steps, tol=0.0, generator=self.generator).eigenvector
        torch.set_rng_state(rng)
        return _quadratic_form(self._operator(model, inputs), v)


class FisherKLPenalty(FisherPenalty):
    """weight * mean_i d * 2 KL(p(x_i) || p(x_i + h u_i)) / h^2, u_i random unit vectors; `step_size` = h in
    input units. Reuses the caller's logits of x when given: one extra forward pass."""

    def __init__(self, step_size: float = 1e-2, **kwargs) -> None:
        super().__init__(**kwargs)
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.step_size = step_size

    def per_sample(self, model, inputs, logits):
        direction = algorithms.random_unit(inputs, self.generator)
        if logits is None:
            log_p = self._operator(model, inputs).log_probs
        else:
            log_p = log_probs_from_output(logits, self.output)
        log_q = self._operator(model, inputs + self.step_size * direction).log_probs
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return inputs[0].numel() * 2 * kl / self.step_size**2
