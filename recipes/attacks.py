"""Attacks: training-time PGD (L-inf / L2) inside the loss, for the TRADES and PGD adversarial-training
peers, and evaluation through a maintained library, IBM's adversarial-robustness-toolbox (ART):
`pgd_robust` / `robust_accuracy`, `carlini_wagner_l2`, `minimal_perturbation` (DeepFool and a PGD radius
bisection) and `clever_scores`, all through `art_classifier`. The in-loop attacks exist because training
needs them on the model's device, step after step, as tensors. Inputs are pixels in [0, 1]; every attack
runs in eval mode inside the state guard (BatchNorm buffers, modes, `.grad` and the global RNG untouched);
the in-loop random start has its own generator.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fim_lightning.guard import preserved_state
from fim_lightning.outputs import kl_divergence
from fim_lightning.validation import check_bool, check_choice, check_int, check_real

Norm = Literal["linf", "l2"]


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


class PGD(nn.Module):
    """Projected gradient ascent of a loss within an `eps`-ball around x, clipped to [0, 1] (Madry et al.).

    The loss is cross-entropy against `labels`, or a divergence from `target_log_probs`: KL(p_target || p(x'))
    (TRADES' inner maximisation) or the squared Fisher-Rao distance (FIRE's), `divergence="fisher_rao"`."""

    def __init__(self, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10, norm: Norm = "linf",
                 random_start: bool = True, seed: int = 0, divergence: str = "kl") -> None:
        super().__init__()
        self.eps = check_real("eps", eps, 0.0, strict=True)
        self.step_size = check_real("step_size", step_size, 0.0, strict=True)
        self.steps = check_int("steps", steps, 1)
        self.norm = check_choice("norm", norm, ("linf", "l2"))
        self.random_start = check_bool("random_start", random_start)
        self.seed = check_int("seed", seed)
        self.divergence = check_choice("divergence", divergence, tuple(DIVERGENCES))
        self._generator: Optional[torch.Generator] = None

    def reseed(self, seed: int) -> None:
        """Draw the random starts from `seed` from here on. The generator is not part of the module's state, so a
        resumed training run that must draw what the uninterrupted one drew reseeds it (`bench/tracking.py`)."""
        self._generator = torch.Generator().manual_seed(check_int("seed", seed))

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
                    loss = DIVERGENCES[self.divergence](target_log_probs, log_q).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                if self.norm == "linf":
                    step = self.step_size * grad.sign()
                else:
                    step = self.step_size * grad / _per_sample(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
                delta = self._project(delta.detach() + step)
                delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()


class CarliniWagnerL2(nn.Module):
    """Carlini-Wagner L2 (2017) with one constant, for adversarial training: minimise over delta
    |delta|^2 + const * max(z_y - max_{j != y} z_j, -confidence) by Adam (`learning_rate`, `steps` steps),
    x + delta clipped to [0, 1]; returns x + delta. Same call as `PGD` (labels only)."""

    def __init__(self, const: float = 1.0, steps: int = 20, learning_rate: float = 0.01,
                 confidence: float = 0.0) -> None:
        super().__init__()
        self.const = check_real("const", const, 0.0, strict=True)
        self.steps = check_int("steps", steps, 1)
        self.learning_rate = check_real("learning_rate", learning_rate, 0.0, strict=True)
        self.confidence = check_real("confidence", confidence, 0.0)

    def forward(self, model: Callable, x: Tensor, labels: Optional[Tensor] = None,
                target_log_probs: Optional[Tensor] = None) -> Tensor:
        if labels is None or target_log_probs is not None:
            raise ValueError("CarliniWagnerL2 takes labels only")
        x = x.detach()
        with preserved_state(model, x, mode="eval"), torch.enable_grad():
            delta = torch.zeros_like(x, requires_grad=True)
            optimizer = torch.optim.Adam([delta], lr=self.learning_rate)
            for _ in range(self.steps):
                logits = model((x + delta).clamp(0, 1))
                true = logits.gather(1, labels[:, None])[:, 0]
                other = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), -torch.inf).amax(1)
                loss = delta.flatten(1).square().sum(1) + self.const * (true - other).clamp_min(-self.confidence)
                (delta.grad,) = torch.autograd.grad(loss.sum(), delta)
                optimizer.step()
        return (x + delta.detach()).clamp(0, 1)


def fisher_rao_distance(log_p: Tensor, log_q: Tensor) -> Tensor:
    """2 arccos(sum_y sqrt(p_y q_y)) per row: the Fisher-Rao (geodesic) distance between two categorical
    distributions; its square is 2 KL(p || q) to second order. Computed as 4 arcsin(H / 2) with the Hellinger
    length H = |sqrt p - sqrt q|_2 (the same number): no cancellation and a finite slope near p = q, where
    arccos of a coefficient close to 1 has neither."""
    hellinger = ((0.5 * log_p).exp() - (0.5 * log_q).exp()).norm(dim=-1)
    return 4 * torch.asin((hellinger / 2).clamp(max=1.0))


DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl": kl_divergence,
    "fisher_rao": lambda log_p, log_q: fisher_rao_distance(log_p, log_q).square(),
}


class TradesPenalty(nn.Module):
    """TRADES (Zhang et al. 2019): beta * KL(p(x) || p(x_adv)), x_adv from PGD on that KL (the attack's
    divergence, as FIRE swaps it). Same call as the Fisher penalties: `penalty(model, inputs, step=..., logits=...)`."""

    def __init__(self, beta: float = 6.0, attack: Optional[PGD] = None) -> None:
        super().__init__()
        self.beta = check_real("beta", beta, 0.0)
        if attack is not None and not isinstance(attack, PGD):
            raise TypeError(f"attack must be a PGD, got {type(attack).__name__}")
        self.attack = attack if attack is not None else PGD(eps=8 / 255, step_size=2 / 255, steps=10)

    def forward(self, model: Callable, inputs: Tensor, step: Optional[int] = None,
                logits: Optional[Tensor] = None) -> Tensor:
        logits = model(inputs) if logits is None else logits
        log_p = logits.float().log_softmax(-1)
        adversarial = self.attack(model, inputs, target_log_probs=log_p.detach())
        log_q = model(adversarial).float().log_softmax(-1)
        return self.beta * DIVERGENCES[self.attack.divergence](log_p, log_q).mean()


class FirePenalty(TradesPenalty):
    """FIRE (Picot et al. 2022, Fisher-Rao regularisation): TRADES with the KL replaced by the squared Fisher-Rao
    distance between the two categorical distributions, beta * d_FR(p(x), p(x_adv))^2, x_adv from PGD on that
    distance. The closest published Fisher peer of the plugin's penalties; same call as them."""

    def __init__(self, beta: float = 6.0, attack: Optional[PGD] = None) -> None:
        if attack is not None and (not isinstance(attack, PGD) or attack.divergence != "fisher_rao"):
            raise TypeError("attack must be a PGD with divergence='fisher_rao'")
        super().__init__(beta, attack if attack is not None else PGD(eps=8 / 255, step_size=2 / 255, steps=10,
                                                                      divergence="fisher_rao"))


@contextmanager
def art_classifier(model: nn.Module, images: Tensor, seed: int = 0) -> Iterator:
    """An adversarial-robustness-toolbox `PyTorchClassifier` of `model` on pixels in [0, 1], valid inside the
    block: the model in eval mode inside the state guard, NumPy's global RNG (which ART's random starts and
    CLEVER draw from) seeded with `seed` and restored after."""
    from art.estimators.classification import PyTorchClassifier

    with preserved_state(model, images, mode="eval"):
        classes = int(model(images[:1]).shape[1])
        classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                       nb_classes=classes, clip_values=(0.0, 1.0),
                                       device_type="gpu" if images.is_cuda else "cpu")
        numpy_state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield classifier
        finally:
            np.random.set_state(numpy_state)


def _norms(perturbation: np.ndarray, norm: Norm) -> np.ndarray:
    flat = perturbation.reshape(len(perturbation), -1)
    return np.abs(flat).max(1) if norm == "linf" else np.linalg.norm(flat, axis=1)


def _pgd(classifier, norm: Norm, eps, steps: int, step_size, batch_size: int, random_start: bool = True):
    from art.attacks.evasion import ProjectedGradientDescent

    return ProjectedGradientDescent(classifier, norm=np.inf if norm == "linf" else 2, eps=eps, eps_step=step_size,
                                    max_iter=steps, num_random_init=int(random_start), batch_size=batch_size,
                                    verbose=False)


def pgd_robust(model: nn.Module, images: Tensor, labels: Tensor, *, norm: Norm, eps: float, steps: int = 20,
               step_size: Optional[float] = None, batch_size: int = 128, seed: int = 0,
               seeds: Optional[Sequence[int]] = None) -> np.ndarray:
    """Per sample: still correctly classified after PGD with one random start (ART), (N,) bool. With `seeds`
    (one per sample) each sample's random start is drawn from its own seed, so its outcome does not depend
    on the batch it is attacked in (one ART call per sample)."""
    x, y = images.detach().cpu().numpy(), labels.cpu().numpy()
    with art_classifier(model, images, seed) as classifier:
        attack = _pgd(classifier, norm, eps, steps, step_size or eps / 4, batch_size)
        if seeds is None:
            adversarial = attack.generate(x=x, y=y)
        else:
            adversarial = np.concatenate([_seeded(s, attack.generate, x=x[i : i + 1], y=y[i : i + 1])
                                          for i, s in enumerate(seeds)])
        return classifier.predict(adversarial, batch_size=batch_size).argmax(1) == y


def _seeded(seed: int, function: Callable, *args, **kwargs):
    """function(...) with NumPy's global RNG (ART's source) seeded with `seed` (restored by `art_classifier`)."""
    np.random.seed(seed)
    return function(*args, **kwargs)


def robust_accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, norm: Norm, eps: float, steps: int = 20,
                    step_size: Optional[float] = None, batch_size: int = 128, seed: int = 0) -> float:
    """Accuracy under PGD with one random start, from the adversarial-robustness-toolbox (pixels in [0, 1])."""
    return float(pgd_robust(model, images, labels, norm=norm, eps=eps, steps=steps, step_size=step_size,
                            batch_size=batch_size, seed=seed).mean())


def carlini_wagner_l2(model: nn.Module, images: Tensor, labels: Tensor, *, const: float = 1.0, steps: int = 20,
                      learning_rate: float = 0.01, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Carlini-Wagner L2 (ART, one constant `const`, `steps` iterations, as in the SRP protocol): per sample
    (still correct, L2 norm of the perturbation; inf where the attack failed)."""
    from art.attacks.evasion import CarliniL2Method

    x, y = images.detach().cpu().numpy(), labels.cpu().numpy()
    with art_classifier(model, images) as classifier:
        attack = CarliniL2Method(classifier, initial_const=const, max_iter=steps, binary_search_steps=1,
                                 learning_rate=learning_rate, batch_size=batch_size, verbose=False)
        adversarial = attack.generate(x=x, y=np.eye(classifier.nb_classes)[y])
        prediction = classifier.predict(adversarial, batch_size=batch_size).argmax(1)
    return prediction == y, np.where(prediction != y, _norms(adversarial - x, "l2"), np.inf)


def minimal_perturbation(model: nn.Module, images: Tensor, *, norm: Norm = "l2", search_steps: int = 10,
                         steps: int = 20, max_eps: Optional[float] = None, deepfool: bool = True,
                         batch_size: int = 128, seed: int = 0) -> np.ndarray:
    """The smallest perturbation found that changes each sample's prediction, (N,) in `norm` (pixels in
    [0, 1]): the minimum over DeepFool (ART, L2 only) and a per-sample bisection of the PGD radius (ART,
    `steps` steps of eps / 4, no random start, `search_steps` halvings): of [0, DeepFool's norm] where it
    succeeded, else geometric halvings of [1e-4 max_eps, max_eps] (default max_eps: sqrt(d) for L2, 1 for
    L-inf). inf where nothing succeeded. The target is the predicted class, so this is the distance to the
    decision boundary."""
    from art.attacks.evasion import DeepFool

    x = images.detach().cpu().numpy()
    dimension = x[0].size
    max_eps = max_eps if max_eps is not None else (1.0 if norm == "linf" else math.sqrt(dimension))
    with art_classifier(model, images, seed) as classifier:
        predicted = classifier.predict(x, batch_size=batch_size).argmax(1)
        best = np.full(len(x), np.inf)
        if deepfool and norm == "l2":
            adversarial = DeepFool(classifier, max_iter=50, epsilon=0.02, batch_size=batch_size,
                                   verbose=False).generate(x)
            moved = classifier.predict(adversarial, batch_size=batch_size).argmax(1) != predicted
            best = np.where(moved, _norms(adversarial - x, norm), best)
        # DeepFool's norm is within a few per cent of the minimum: halve [0, norm]. Without it the bracket
        # [max_eps 1e-4, max_eps] spans four decades: halve it geometrically.
        high = np.minimum(best, max_eps)
        low = np.where(np.isfinite(best), 0.0, max_eps * 1e-4)
        for _ in range(search_steps):
            middle = np.where(low > 0, np.sqrt(low * high), (low + high) / 2)
            eps = middle.reshape(-1, *([1] * (x.ndim - 1))).astype(np.float32)
            adversarial = _pgd(classifier, norm, eps, steps, eps / 4, batch_size, random_start=False).generate(
                x=x, y=predicted)
            moved = classifier.predict(adversarial, batch_size=batch_size).argmax(1) != predicted
            best = np.where(moved, np.minimum(best, _norms(adversarial - x, norm)), best)
            high, low = np.where(moved, eps.reshape(-1), high), np.where(moved, low, eps.reshape(-1))
    return best


def clever_scores(model: nn.Module, images: Tensor, *, norm: Norm = "l2", radius: float = 2.0,
                  batches: int = 10, batch_size: int = 20, seed: int = 0,
                  seeds: Optional[Sequence[int]] = None) -> np.ndarray:
    """CLEVER (Weng et al. 2018, ART's `clever_u`): an estimated lower bound on the minimal perturbation
    from extreme-value statistics of gradient norms sampled in a `radius` ball, (N,). With `seeds` (one per
    sample) each sample draws its points from its own seed."""
    from art.metrics import clever_u

    order = 2 if norm == "l2" else np.inf
    with art_classifier(model, images, seed) as classifier:
        arrays = images.detach().cpu().numpy()
        if seeds is None:
            return np.array([clever_u(classifier, x, batches, batch_size, radius, order, verbose=False)
                             for x in arrays])
        return np.array([_seeded(s, clever_u, classifier, x, batches, batch_size, radius, order, verbose=False)
                         for x, s in zip(arrays, seeds)])
