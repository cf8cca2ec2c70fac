"""Per-sample robustness evaluation: Fisher scores, the black-box estimate, the architecture bound, baselines
and attack outcomes for the same held-out samples, as columns of one table (the evaluate recipe's CSV).

Inputs are pixels in [0, 1] (normalisation inside the model); every score and attack is taken there.
Columns (one value per sample):
- `label`, `prediction`, `correct`, `margin` = log p_top1 - log p_top2.
- `lambda_max`, `trace`, `radius`: the white-box Fisher scores (`fisher_scores`); radius = margin /
  sqrt(lambda_max), a robustness score, not a distance (in the two-class limit it is the linear step divided
  by sqrt(p1 p2), so it overstates the distance to the boundary). `fisher_step` = margin sqrt(p1 p2 / ((p1 +
  p2) lambda_max)): the Fisher's estimate of that distance (`fim_lightning.fisher_step`, <= linear_step).
  With `top_k`, `neglected_mass` is the probability of the classes merged into one (lambda_max is then a
  lower bound).
- `lambda_max_blackbox`: `blackbox_fisher` from `blackbox_queries` queries per sample.
- `bound`: `fisher_spectral_bound` at the sample (an upper bound on lambda_max).
- `grad_norm`: the "Lipschitz" baseline |grad_x (z_top1 - z_top2)|, the local slope of the logit margin;
  `linear_step` = margin / grad_norm, DeepFool's first (linear) step: the distance to the decision boundary
  of the linearised margin, the strongest cheap baseline (one gradient per sample).
- `clever`: ART's CLEVER score (first `clever_samples` samples; NaN after).
- `pgd_linf_robust`, `pgd_l2_robust`, `cw_robust`: still correct under ART's PGD (`pgd_linf_eps`,
  `pgd_l2_eps`, `pgd_steps` steps, one random start) and Carlini-Wagner L2 (`cw_const`, `cw_steps`);
  `cw_l2`: the CW perturbation's norm where it changed the prediction (inf otherwise).
- `min_perturbation`: the smallest L2 perturbation found that changes the prediction (DeepFool, then a
  bisection of the PGD radius; `attacks.minimal_perturbation`).

Every random draw of a sample (black-box probes, PGD's random start, CLEVER's points) is seeded by (`seed`,
the sample's dataset index), so a sample's row does not depend on the batch, the process or the order it is
scored in: `batch_columns` of any split of the data gives the same rows as one call on all of it.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from recipes import attacks
from fim_lightning.blackbox import blackbox_fisher
from fim_lightning.bounds import fisher_spectral_bound
from fim_lightning.functional import fisher_scores
from fim_lightning.guard import preserved_state


class RobustnessEvaluation:
    """Callable `(model, images, labels) -> {column: (N,) array}`; each part can be switched off.

    Args:
        batch_size: samples per Fisher / bound batch and per attack batch.
        top_k: the exact route restricted to the top-k classes (for ImageNet's 1,000), or None for all.
        model_dtype: e.g. "float64" to run the model in double precision for the Fisher scores.
        blackbox_queries: query budget per sample of the black-box estimate (None: skip).
        blackbox_difference: its finite differences, "forward" or "central".
        bound: compute the architecture bound (raises for architectures the bound does not know).
        clever_samples: CLEVER on the first samples only (it costs (C - 1) x clever_batches x
            clever_batch_size gradients each).
        clever_radius, clever_batches, clever_batch_size: CLEVER's search radius and its sampling (ART's
            `radius`, `nb_batches`, `batch_size`).
        pgd_linf_eps, pgd_l2_eps, pgd_steps: the PGD attacks (None eps: skip).
        cw_const, cw_steps: the Carlini-Wagner L2 attack (cw_steps 0: skip).
        minimal_search_steps, minimal_deepfool: the minimal-perturbation search (0 steps and no DeepFool: skip).
        seed: of every random draw (black-box probes, PGD starts, CLEVER samples).
        progress: show progress bars.
    """

    def __init__(self, batch_size: int = 100, top_k: Optional[int] = None, model_dtype: Optional[str] = None,
                 blackbox_queries: Optional[int] = 129, blackbox_difference: str = "forward", bound: bool = True,
                 clever_samples: int = 20, clever_radius: float = 2.0, clever_batches: int = 10,
                 clever_batch_size: int = 20, pgd_linf_eps: Optional[float] = 8 / 255,
                 pgd_l2_eps: Optional[float] = 0.5, pgd_steps: int = 20, cw_const: float = 1.0, cw_steps: int = 20,
                 minimal_search_steps: int = 10, minimal_deepfool: bool = True, seed: int = 0,
                 progress: bool = True) -> None:
        self.batch_size, self.top_k, self.seed, self.progress = batch_size, top_k, seed, progress
        self.model_dtype = getattr(torch, model_dtype) if model_dtype else None
        self.blackbox_queries, self.blackbox_difference, self.bound = blackbox_queries, blackbox_difference, bound
        self.clever_samples, self.clever_radius = clever_samples, clever_radius
        self.clever_batches, self.clever_batch_size = clever_batches, clever_batch_size
        self.pgd_linf_eps, self.pgd_l2_eps, self.pgd_steps = pgd_linf_eps, pgd_l2_eps, pgd_steps
        self.cw_const, self.cw_steps = cw_const, cw_steps
        self.minimal_search_steps, self.minimal_deepfool = minimal_search_steps, minimal_deepfool

    def scores_only(self) -> "RobustnessEvaluation":
        """This evaluation without the attacks and CLEVER: the Fisher scores, black-box estimate, bound and
        baselines only (e.g. for the untrained model)."""
        scores = copy.copy(self)
        scores.pgd_linf_eps = scores.pgd_l2_eps = None
        scores.cw_steps = scores.minimal_search_steps = scores.clever_samples = 0
        scores.minimal_deepfool = False
        return scores

    def sample_seeds(self, indices: np.ndarray) -> list[int]:
        """One seed per sample from (`seed`, dataset index)."""
        return [int(np.random.SeedSequence([self.seed, int(i)]).generate_state(1)[0]) for i in indices]

    def fisher_columns(self, model: nn.Module, images: Tensor, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Prediction, margin, Fisher scores, black-box estimate, bound and gradient-norm baseline of one batch."""
        options = {"method": "exact", "top_k": self.top_k} if self.top_k is not None else {}
        scores = fisher_scores(model, images, model_dtype=self.model_dtype, margin_gradient=True, **options)
        parts = {"lambda_max": scores.spectral_norm, "trace": scores.trace, "radius": scores.radius,
                 "fisher_step": scores.fisher_step,
                 "prediction": scores.prediction, "margin": scores.margin, "grad_norm": scores.margin_gradient_norm,
                 "linear_step": scores.margin / scores.margin_gradient_norm}
        if self.top_k is not None:
            parts["neglected_mass"] = scores.neglected_mass
        if self.blackbox_queries is not None:
            with preserved_state(model, images, mode="eval"):
                parts["lambda_max_blackbox"] = torch.cat([blackbox_fisher(
                    model, images[i : i + 1], self.blackbox_queries, output="logits",
                    difference=self.blackbox_difference, generator=torch.Generator().manual_seed(seed)).spectral_norm
                    for i, seed in enumerate(self.sample_seeds(indices))])
        if self.bound:
            parts["bound"] = fisher_spectral_bound(model, images).value
        table = {name: value.detach().double().cpu().numpy() for name, value in parts.items()}
        table["prediction"] = table["prediction"].astype(np.int64)
        return table

    def attack_columns(self, model: nn.Module, images: Tensor, labels: Tensor,
                       indices: np.ndarray) -> dict[str, np.ndarray]:
        """Attack outcomes and the baselines that need ART, for one batch."""
        columns: dict[str, np.ndarray] = {}
        common = {"batch_size": self.batch_size, "seed": self.seed}
        seeds = self.sample_seeds(indices)
        for norm, eps in (("linf", self.pgd_linf_eps), ("l2", self.pgd_l2_eps)):
            if eps is not None:
                columns[f"pgd_{norm}_robust"] = attacks.pgd_robust(model, images, labels, norm=norm, eps=eps,
                                                                   steps=self.pgd_steps, seeds=seeds, **common)
        if self.cw_steps > 0:
            columns["cw_robust"], columns["cw_l2"] = attacks.carlini_wagner_l2(
                model, images, labels, const=self.cw_const, steps=self.cw_steps, batch_size=self.batch_size)
        if self.minimal_search_steps > 0 or self.minimal_deepfool:
            columns["min_perturbation"] = attacks.minimal_perturbation(
                model, images, norm="l2", search_steps=self.minimal_search_steps, steps=self.pgd_steps,
                deepfool=self.minimal_deepfool, **common)
        if self.clever_samples > 0:
            chosen = np.flatnonzero(np.asarray(indices) < self.clever_samples)
            clever = np.full(len(images), np.nan)
            if len(chosen):
                clever[chosen] = attacks.clever_scores(model, images[torch.as_tensor(chosen)],
                                                       radius=self.clever_radius, batches=self.clever_batches,
                                                       batch_size=self.clever_batch_size, seed=self.seed,
                                                       seeds=[seeds[i] for i in chosen])
            columns["clever"] = clever
        return columns

    def batch_columns(self, model: nn.Module, images: Tensor, labels: Tensor,
                      indices: np.ndarray) -> dict[str, np.ndarray]:
        """Every column of one batch whose samples have dataset indices `indices`."""
        if not len(images) == len(labels) == len(indices):
            raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(indices)} indices")
        columns = {"index": np.asarray(indices, dtype=np.int64), "label": labels.cpu().numpy()}
        columns.update(self.fisher_columns(model, images, columns["index"]))
        columns["correct"] = columns["prediction"] == columns["label"]
        columns.update(self.attack_columns(model, images, labels, columns["index"]))
        return columns

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, np.ndarray]:
        """`batch_columns` over batches of `batch_size`, samples indexed 0..N-1."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        parts = [self.batch_columns(model, images[start : start + self.batch_size],
                                    labels[start : start + self.batch_size],
                                    np.arange(start, min(start + self.batch_size, len(images))))
                 for start in tqdm(range(0, len(images), self.batch_size), desc="evaluation",
                                   disable=not self.progress, leave=False)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
