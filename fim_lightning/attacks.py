"""Training-time attacks: PGD (L-inf / L2) inside the loss, for the TRADES and PGD adversarial-training peers.

Evaluation uses a maintained library (IBM's adversarial-robustness-toolbox, see `robust_accuracy`); these
in-loop attacks exist because training needs them on the model's device, step after step, as tensors.
Inputs are pixels in [0, 1]; the attack runs in eval mode inside the state guard (BatchNorm buffers,
modes, `.grad` and the global RNG untouched) with its own generator for the random start.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn

from fim_lightning.guard import preserved_state

Norm = Literal["linf", "l2"]


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


class PGD(nn.Module):
    """Projected gradient ascent of a loss within an `eps`-ball around x, clipped to [0, 1] (Madry et al.).

    The loss is cross-entropy against `labels`, or KL(p_target || p(x')) against `target_log_probs`
    (TRADES' inner maximisation)."""

    def __init__(self, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10, norm: Norm = "linf",
                 random_start: bool = True, seed: int = 0) -> None:
        super().__init__()
        if norm not in ("linf", "l2") or eps <= 0 or steps < 1:
            raise ValueError(f"norm must be 'linf' or 'l2', eps > 0 and steps >= 1; got {norm!r}, {eps}, {steps}")
        self.eps, self.step_size, self.steps, self.norm = eps, step_size, steps, norm
        self.random_start, self.seed = random_start, seed
        self._generator: Optional[torch.Generator] = None

    def _random_start(self, x: Tensor) -> Tensor:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(x.shape, generator=self._generator).to(x.device, x.dtype) * 2 - 1
        if self.norm == "l2":
            noise = noise / _per_sample(noise.flatten(1).norm(dim=1), x) * torch.rand(
                len(x), generator=self._generator).to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return noise * self.eps

    def _project(self, delta: Tensor) -> Tensor:
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta * _per_sample((self.eps / norms).clamp(max=1.0), delta)

    def forward(self, model: Callable, x: Tensor, labels: Optional[Tensor] = None,
                target_log_probs: Optional[Tensor] = None) -> Tensor:
        if (labels is None) == (target_log_probs is None):
            raise ValueError("PGD needs exactly one of labels (cross-entropy) or target_log_probs (KL)")
        x = x.detach()
        with preserved_state(model, x, mode="eval"):
            delta = self._random_start(x) if self.random_start else torch.zeros_like(x)
            delta = (x + delta).clamp(0, 1) - x
            for _ in range(self.steps):
                delta.requires_grad_(True)
                log_q = model(x + delta).log_softmax(-1)
                if labels is not None:
                    loss = nn.functional.nll_loss(log_q, labels, reduction="sum")
                else:
                    loss = (target_log_probs.exp() * (target_log_probs - log_q)).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                if self.norm == "linf":
                    step = self.step_size * grad.sign()
                else:
                    step = self.step_size * grad / _per_sample(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
                delta = self._project(delta.detach() + step)
                delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()


class TradesPenalty(nn.Module):
    """TRADES (Zhang et al. 2019): beta * KL(p(x) || p(x_adv)), x_adv from PGD on that KL. Same call as the
    Fisher penalties: `penalty(model, inputs, step=..., logits=...)`."""

    def __init__(self, beta: float = 6.0, attack: Optional[PGD] = None) -> None:
        super().__init__()
        self.beta = beta
        self.attack = attack if attack is not None else PGD(eps=8 / 255, step_size=2 / 255, steps=10)

    def forward(self, model: Callable, inputs: Tensor, step: Optional[int] = None,
                logits: Optional[Tensor] = None) -> Tensor:
        logits = model(inputs) if logits is None else logits
        log_p = logits.float().log_softmax(-1)
        adversarial = self.attack(model, inputs, target_log_probs=log_p.detach())
        log_q = model(adversarial).float().log_softmax(-1)
        return self.beta * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def robust_accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, norm: Norm, eps: float, steps: int = 20,
                    step_size: Optional[float] = None, batch_size: int = 128, seed: int = 0) -> float:
    """Accuracy under PGD with one random start, from the adversarial-robustness-toolbox (pixels in [0, 1])."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    with preserved_state(model, images, mode="eval"):
        classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                       nb_classes=int(model(images[:1]).shape[1]), clip_values=(0.0, 1.0),
                                       device_type="gpu" if images.is_cuda else "cpu")
        attack = ProjectedGradientDescent(classifier, norm=np.inf if norm == "linf" else 2, eps=eps,
                                          eps_step=step_size or eps / 4, max_iter=steps, num_random_init=1,
                                          batch_size=batch_size, verbose=False)
        numpy_state = np.random.get_state()  # ART draws its random start from NumPy's global RNG
        np.random.seed(seed)
        try:
            adversarial = attack.generate(x=images.cpu().numpy(), y=labels.cpu().numpy())
        finally:
            np.random.set_state(numpy_state)
        predictions = classifier.predict(adversarial, batch_size=batch_size).argmax(1)
    return float((predictions == labels.cpu().numpy()).mean())
