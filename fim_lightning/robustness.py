"""Attack-free estimates of the minimal perturbation and of robust accuracy on a `FisherOperator`, from the same
VJPs as the Fisher (the public functions, `estimated_minimal_perturbation`, `estimated_robust_accuracy` and
`robust_distances`, are projections in `functional`).

For the predicted class t and every other class k, with the margin m_k = z_t - z_k and g_k = grad_x m_k, the
first-order distance to the boundary between t and k in the norm |.|_p is m_k / |g_k|_q, with q the dual
norm (q = 2 for L2, q = 1 for L-inf): exact for a linear model, whose decision regions are polyhedra. Two
first-order steps come out of the C - 1 VJPs that the exact Fisher already takes, on the recorded graph: the
linear step d_l = m_2 / |g_2|_q to the runner-up class (the cheap baseline), and d_1, the minimum over k
(DeepFool's first step, in both norms; d_1 <= d_l). For many classes (C > 64) the minimum runs over the
`candidates` (default 32) most probable other classes, DeepFool's own practice for ImageNet (its `num_classes`
candidates, 10 by default): 31 VJPs instead of 999, and gradients (B, 32, d) instead of (B, 999, d), which at
224 px would not fit. A class outside them with a nearer boundary is missed (the line search follows another
direction); `bench/large_classes.py` measures the difference on 1000-class models.

`line_steps > 0` (the default) then follows the arg-min class's steepest direction u (u = -g / |g|_2 for L2,
-sign(g) for L-inf, unit in the norm) to where the prediction actually changes: x + d_1 u is tested (just
past d_1), the bracket is widened by doubling (at most `_EXPANSIONS` times) until the class changes, and
bisected `line_steps` times, giving the smallest tested s_u whose point x + s_u u is classified otherwise: an
adversarial example, so s_u bounds the minimal perturbation d* from above. The estimate is min(d_l, s_u): the
linear step, shortened where the class changes sooner along u (a nearer boundary with a third class; the
margin bending down, as in adversarially trained models, whose margins are flat at x; gradient masking).
Since d* <= s_u, per sample |min(d_l, s_u) - d*| <= |d_l - d*|: never further from the minimal perturbation
than the linear step. For a linear model s_u is d_1 (1 + 1e-4), the closed form to the search's tolerance.
Where the class does not change along u below d_l, d_l is kept; `line_steps=0` gives d_l alone.
Cost: one forward pass per tested point, and a sample is tested only while a point nearer than d_l can still be
found (a point beyond cannot shorten min(d_l, s_u); inside a box the displacement made is what counts, a
non-decreasing function of the step): the first test for every sample, the widening up to d_l, then the
bisection where the class changed (at most 1 + 3 + 8 passes). On a Fashion-MNIST CNN of `bench/tracking.py` the
whole estimate took 8.0 s for 512 probes against 13.7 s with the search followed to the class change everywhere
(`python bench/tracking.py --data fashion_mnist --regime fgsm --cost 4`).

Why d_l and not d_1 (chosen on seed 0 of `bench/tracking.py`, the report's candidate table): on Fashion-MNIST
CNNs over FGSM-AT and plain training, the minimum over classes of first-order steps errs short (a minimum of
noisy estimates): over both runs' 30 epochs min(d_1, s_u) was off AutoAttack's robust accuracy by 3.1 points at
the median and 9.0 at the 90th percentile, min(d_l, s_u) by 2.3 and 6.6 (`docs/maths.md`). Known bias,
measured against AutoAttack (`bench/estimate_parts.py`, `bench/tracking.py`): where the margin bends up along
u (s_u > d_l), the minimal perturbation lies anywhere below s_u and the estimate is d_l. On small CNNs trained
plainly on Fashion-MNIST AutoAttack finds adversarial examples well inside s_u (s_u overstated robust accuracy
by 15 points at the median) and a little beyond the first-order steps; on a digits MLP s_u matches the
minimum-norm attack FAB and the first-order steps are shorter (`tests/test_robustness.py`). The estimate errs
towards less robust where the geometry is not linear. Inputs are not clipped to a data range unless `bounds` is
given: attacks that clip (to pixels in [0, 1]) search a smaller set.

A misclassified sample counts as not robust. A sample with a non-finite output or gradient gets NaN (warned
about by index, as every estimator of the package) and counts as not robust.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from fim_lightning.algorithms import AUTO_EXACT_CLASSES, NONFINITE_JACOBIAN
from fim_lightning.operator import FisherOperator
from fim_lightning.validation import check_real

Norm = Literal["l2", "linf"]
NORMS = ("l2", "linf")
_DUAL = {"l2": 2.0, "linf": 1.0}
_NORM_P = {"l2": 2.0, "linf": math.inf}


def _direction(gradient: Tensor, norm: Norm) -> Tensor:
    """The unit step (in `norm`) that decreases the margin fastest: -g / |g|_2, or -sign(g) for L-inf."""
    if norm == "l2":
        flat = gradient.flatten(1)
        return -(flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)).view_as(gradient)
    return -gradient.sign()


_EXPANSIONS = 3
_BEYOND = 1e-4  # the first point tested, relative to d_1: beyond float32 rounding of the margin


@dataclass(frozen=True)
class Perturbation:
    """Per sample: the estimated minimal perturbation `distance` (float64, NaN where invalid; min(d_l, s_u)), the
    direction u followed (unit in the norm), the point reached (`crossed`: it was found to be classified
    otherwise, at distance s_u from x; else x + d_l u)."""

    distance: Tensor
    direction: Tensor
    point: Tensor
    crossed: Tensor


@dataclass(frozen=True)
class MarginGradients:
    """The predicted class t, the other classes considered (B, K) by probability (K = C - 1, or the
    `candidates`), their margins z_t - z_k (float64) and gradients grad_x (z_t - z_k) (B, K, ...): K VJPs on the
    operator's recorded graph."""

    top: Tensor
    others: Tensor
    margins: Tensor
    gradients: Tensor


DEFAULT_CANDIDATES = 32  # the other classes considered above AUTO_EXACT_CLASSES, where C - 1 VJPs are too many


def margin_gradients(op: FisherOperator, chunk_size: Optional[int] = None,
                     candidates: Optional[int] = None) -> MarginGradients:
    """The margins and their gradients for every other class, or for the `candidates` most probable ones
    (default: every class for C <= 64, else 32)."""
    log_probs = op.log_probs
    classes = log_probs.shape[1]
    if candidates is None:
        candidates = classes - 1 if classes <= AUTO_EXACT_CLASSES else DEFAULT_CANDIDATES
    ranked = log_probs.argsort(dim=1, descending=True)
    top, others = ranked[:, 0], ranked[:, 1:1 + candidates]
    margins = log_probs.gather(1, top[:, None]) - log_probs.gather(1, others)  # z_t - z_k, exact in float64
    eye = torch.eye(log_probs.shape[1], dtype=log_probs.dtype, device=log_probs.device)
    cotangents = (eye[top][:, None] - eye[others]).movedim(1, 0)  # (C - 1, B, C)
    gradients = op.screen(op.factor(cotangents, chunk_size), NONFINITE_JACOBIAN)
    return MarginGradients(top, others, margins, gradients)


def first_order_steps(margins: MarginGradients, norm: Norm) -> Tensor:
    """(B, K) float64 first-order distances m_k / |g_k|_q to each considered class's boundary: column 0 is the
    linear step d_l (the runner-up), the row minimum d_1."""
    dual = margins.gradients.flatten(2).to(torch.float64).norm(p=_DUAL[norm], dim=2)
    return margins.margins / dual.clamp_min(torch.finfo(torch.float64).tiny)


def minimal_perturbation(op: FisherOperator, norm: Norm, line_steps: int = 8, chunk_size: Optional[int] = None,
                         bounds: Optional[tuple[float, float]] = None,
                         margins: Optional[MarginGradients] = None, candidates: Optional[int] = None,
                         cutoff: Optional[Tensor | float] = None) -> Perturbation:
    """The estimate of the module docstring on an operator; with `bounds` the line search moves inside the box.
    `margins` (from `margin_gradients`) are reused where given, so several norms share the VJPs. The search stops
    on a sample once every point still to test lies at least `cutoff` (default d_l) away, where it cannot shorten
    min(d_l, s_u): the distance is the same, with fewer forward passes; `cutoff=inf` follows u to the class
    change (s_u alone)."""
    found = margins if margins is not None else margin_gradients(op, chunk_size, candidates)
    top, gradients = found.top[:, None], found.gradients
    steps = first_order_steps(found, norm)
    first, nearest = steps.min(dim=1)  # d_1, and the class u heads for
    linear = steps[:, 0]  # d_l: to the runner-up, the most probable other class
    rows = torch.arange(op.batch_size, device=first.device)
    direction = _direction(gradients[rows, nearest], norm)
    crossed = torch.zeros_like(op.invalid)
    shape = (-1, *([1] * (op.inputs.ndim - 1)))
    if line_steps == 0:
        reached = op.inputs + linear.to(op.inputs.dtype).view(shape) * direction
        return Perturbation(op.nan_invalid(linear), direction.detach(), reached.detach(), crossed)
    cutoff = linear if cutoff is None else cutoff

    def point(step: Tensor) -> Tensor:
        moved = op.inputs + step.to(op.inputs.dtype).view(shape) * direction
        return moved if bounds is None else moved.clamp(*bounds)

    def reach(step: Tensor) -> Tensor:
        """The distance a step counts for: the step itself, or inside the box the displacement actually made
        (a non-decreasing function of the step: the points beyond are no nearer)."""
        if bounds is None:
            return step
        return (point(step) - op.inputs).flatten(1).to(torch.float64).norm(p=_NORM_P[norm], dim=1)

    def changed(step: Tensor, rows: Tensor) -> Tensor:
        """Whether x + step u is classified otherwise, evaluated on `rows` only (False elsewhere); on every
        sample for a sharded model (`op.collective`), so each rank runs the same forward passes."""
        evaluated = torch.ones_like(rows) if op.collective else rows
        result = torch.zeros_like(rows)
        if evaluated.any():
            with torch.no_grad():
                moved = op.log_probs_at(point(step)[evaluated])
            result[evaluated] = moved.argmax(1) != top.squeeze(1)[evaluated]
        return result & rows

    everyone = torch.ones_like(op.invalid)
    low, high = torch.zeros_like(first), first * (1 + _BEYOND)  # just past the first-order crossing
    crossed = changed(high, everyone)
    for _ in range(_EXPANSIONS):  # only where the class has not changed yet, and a nearer point can still be
        wider = torch.where(crossed, high, 2 * high)
        now = changed(wider, ~crossed & (reach(high) < cutoff))
        low = torch.where(crossed | ~now, torch.where(crossed, low, wider), high)
        high, crossed = torch.where(crossed, high, wider), crossed | now
    for _ in range(line_steps):  # only where a crossing is bracketed nearer than the cutoff
        middle = (low + high) / 2
        now = changed(middle, crossed & (reach(low) < cutoff))
        high, low = torch.where(now, middle, high), torch.where(now | ~crossed, low, middle)
    reached = point(torch.where(crossed, high, linear)).detach()
    distance = torch.where(crossed, torch.minimum(reach(high), linear), linear)
    return Perturbation(op.nan_invalid(distance), direction.detach(), reached, crossed & ~op.invalid)


def check_bounds(bounds: object) -> Optional[tuple[float, float]]:
    if bounds is None:
        return None
    if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
        raise TypeError(f"bounds must be (low, high) or None, got {bounds!r}")
    low, high = (check_real("bounds", value) for value in bounds)
    if not low < high:
        raise ValueError(f"bounds must have low < high, got {bounds!r}")
    return low, high


def robust_accuracy(distance: Tensor, correct: Tensor, eps: Sequence[float]) -> Tensor:
    """(len(eps),) share of samples that are correct and farther than each eps from their class boundary
    (float64; NaN distances count as not robust)."""
    eps_tensor = torch.as_tensor(list(eps), dtype=torch.float64, device=distance.device)
    robust = correct[None, :] & (distance[None, :].to(torch.float64) > eps_tensor[:, None])
    return robust.to(torch.float64).mean(dim=1)


# Chosen on seed 0 of `bench/tracking.py` (Fashion-MNIST: two FGSM-AT and two plain runs), before seeds 1-2. Against
# the best share so far (drop 2/3, floor 0.2, then 0.3) the rule fired in the second plain run, at epoch 4 and then
# at epoch 18 (plain training loses robust share slowly as it gains accuracy); against the previous evaluation it
# fires in FGSM-AT at the collapse and never in plain training, for drops of 1/2 and floors of 0.2 or 0.3.
COLLAPSE_DROP = 0.5
COLLAPSE_FLOOR = 0.2


def collapsed(robust: Sequence[float], accuracy: Sequence[float], drop: float = COLLAPSE_DROP,
              floor: float = COLLAPSE_FLOOR) -> bool:
    r"""Whether the last point of a robust-accuracy curve is a collapse (catastrophic overfitting: robust accuracy
    falls within an epoch): its robust share of the correctly classified samples, r_t / a_t (clean accuracy a),
    fell below (1 - drop) r_s / a_s at the evaluation s before it, a share of at least `floor`. Dividing by a_t
    ignores the swings of plain training, where clean and robust accuracy move together; comparing with the
    previous evaluation, not the best, ignores the slow loss of robust share as plain training gains accuracy;
    a share below `floor` (a radius the model was not made robust at) cannot collapse. NaN points are skipped.
    Evaluated once an epoch (the callback's default), "the evaluation before" is the epoch before."""
    check_real("drop", drop, 0.0, strict=True, maximum=1.0)
    check_real("floor", floor, 0.0, maximum=1.0)
    if len(robust) != len(accuracy):
        raise ValueError(f"robust and accuracy must be curves of one length, got {len(robust)} and {len(accuracy)}")
    shares = [r / a if a > 0 else 0.0 for r, a in zip(robust, accuracy) if not (math.isnan(r) or math.isnan(a))]
    if len(shares) < 2 or not (math.isfinite(robust[-1]) and math.isfinite(accuracy[-1])):
        return False
    return shares[-2] >= floor and shares[-1] < (1 - drop) * shares[-2]


def check_eps(eps: object) -> list[float]:
    """A non-empty sequence of finite radii >= 0."""
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps = [eps]
    if not isinstance(eps, Sequence) or isinstance(eps, str) or not eps:
        raise TypeError(f"eps must be a radius or a non-empty sequence of radii, got {eps!r}")
    return [check_real("eps", value, 0.0) for value in eps]
