"""Per-sample robustness evaluation: Fisher scores, the black-box estimate, the architecture bound, baselines
and attack outcomes for the same held-out samples, as columns of one table (the evaluate recipe's CSV).

Inputs are pixels in [0, 1] (normalisation inside the model); every score and attack is taken there.
Columns (one value per sample):
- `label`, `prediction`, `correct`, `margin` = log p_top1 - log p_top2.
- `lambda_max`, `trace`, `radius`: the white-box Fisher scores (`fisher_scores`); radius = margin /
  sqrt(lambda_max), the predicted L2 distance to the decision boundary. With `top_k`, `neglected_mass` is the
  probability of the classes merged into one (lambda_max is then a lower bound).
- `lambda_max_blackbox`: `blackbox_fisher` from `blackbox_queries` queries per sample.
- `bound`: `fisher_spectral_bound` at the sample (an upper bound on lambda_max).
- `grad_norm`: the "Lipschitz" baseline |grad_x (z_top1 - z_top2)|, the local slope of the logit margin
  (margin / grad_norm is DeepFool's first linear step).
- `clever`: ART's CLEVER score (first `clever_samples` samples; NaN after).
- `pgd_linf_robust`, `pgd_l2_robust`, `cw_robust`: still correct under ART's PGD (`pgd_linf_eps`,
  `pgd_l2_eps`, `pgd_steps` steps, one random start) and Carlini-Wagner L2 (`cw_const`, `cw_steps`);
  `cw_l2`: the CW perturbation's norm where it changed the prediction (inf otherwise).
- `min_perturbation`: the smallest L2 perturbation found that changes the prediction (DeepFool, then a
  bisection of the PGD radius; `attacks.minimal_perturbation`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fim_lightning import attacks
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
        clever_samples: CLEVER on the first samples only (it costs ~9 x batches x batch_size gradients each).
        pgd_linf_eps, pgd_l2_eps, pgd_steps: the PGD attacks (None eps: skip).
        cw_const, cw_steps: the Carlini-Wagner L2 attack (cw_steps 0: skip).
        minimal_search_steps, minimal_deepfool: the minimal-perturbation search (0 steps and no DeepFool: skip).
        seed: of every random draw (black-box probes, PGD starts, CLEVER samples).
        progress: show progress bars.
    """

    def __init__(self, batch_size: int = 100, top_k: Optional[int] = None, model_dtype: Optional[str] = None,
                 blackbox_queries: Optional[int] = 129, blackbox_difference: str = "forward", bound: bool = True,
                 clever_samples: int = 20, clever_radius: float = 2.0, pgd_linf_eps: Optional[float] = 8 / 255,
                 pgd_l2_eps: Optional[float] = 0.5, pgd_steps: int = 20, cw_const: float = 1.0, cw_steps: int = 20,
                 minimal_search_steps: int = 10, minimal_deepfool: bool = True, seed: int = 0,
                 progress: bool = True) -> None:
        self.batch_size, self.top_k, self.seed, self.progress = batch_size, top_k, seed, progress
        self.model_dtype = getattr(torch, model_dtype) if model_dtype else None
        self.blackbox_queries, self.blackbox_difference, self.bound = blackbox_queries, blackbox_difference, bound
        self.clever_samples, self.clever_radius = clever_samples, clever_radius
        self.pgd_linf_eps, self.pgd_l2_eps, self.pgd_steps = pgd_linf_eps, pgd_l2_eps, pgd_steps
        self.cw_const, self.cw_steps = cw_const, cw_steps
        self.minimal_search_steps, self.minimal_deepfool = minimal_search_steps, minimal_deepfool

    def _batches(self, images: Tensor, what: str):
        starts = range(0, len(images), self.batch_size)
        return tqdm(starts, desc=what, disable=not self.progress, leave=False)

    def fisher_columns(self, model: nn.Module, images: Tensor) -> dict[str, np.ndarray]:
        """Prediction, margin, Fisher scores, black-box estimate, bound and gradient-norm baseline."""
        columns: dict[str, list[Tensor]] = {}
        generator = torch.Generator().manual_seed(self.seed)
        options = {"top_k": self.top_k} if self.top_k is not None else {}
        for start in self._batches(images, "Fisher scores"):
            x = images[start : start + self.batch_size]
            scores = fisher_scores(model, x, model_dtype=self.model_dtype, **options)
            parts = {"lambda_max": scores.spectral_norm, "trace": scores.trace, "radius": scores.radius,
                     **_margin_and_slope(model, x)}
            if self.top_k is not None:
                parts["neglected_mass"] = scores.neglected_mass
            if self.blackbox_queries is not None:
                with preserved_state(model, x, mode="eval"):
                    parts["lambda_max_blackbox"] = blackbox_fisher(
                        model, x, self.blackbox_queries, output="logits", difference=self.blackbox_difference,
                        generator=generator).spectral_norm
            if self.bound:
                parts["bound"] = fisher_spectral_bound(model, x).value
            for name, value in parts.items():
                columns.setdefault(name, []).append(value.detach().double().cpu())
        table = {name: torch.cat(values).numpy() for name, values in columns.items()}
        table["prediction"] = table["prediction"].astype(np.int64)
        return table

    def attack_columns(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, np.ndarray]:
        """Attack outcomes and the baselines that need ART."""
        columns: dict[str, np.ndarray] = {}
        common = {"batch_size": self.batch_size, "seed": self.seed}
        stages = tqdm(total=5, desc="attacks", disable=not self.progress, leave=False)
        for norm, eps in (("linf", self.pgd_linf_eps), ("l2", self.pgd_l2_eps)):
            if eps is not None:
                columns[f"pgd_{norm}_robust"] = attacks.pgd_robust(model, images, labels, norm=norm, eps=eps,
                                                                   steps=self.pgd_steps, **common)
            stages.update()
        if self.cw_steps > 0:
            columns["cw_robust"], columns["cw_l2"] = attacks.carlini_wagner_l2(
                model, images, labels, const=self.cw_const, steps=self.cw_steps, batch_size=self.batch_size)
        stages.update()
        if self.minimal_search_steps > 0 or self.minimal_deepfool:
            columns["min_perturbation"] = attacks.minimal_perturbation(
                model, images, norm="l2", search_steps=self.minimal_search_steps, steps=self.pgd_steps,
                deepfool=self.minimal_deepfool, **common)
        stages.update()
        if self.clever_samples > 0:
            count = min(self.clever_samples, len(images))
            clever = np.full(len(images), np.nan)
            clever[:count] = attacks.clever_scores(model, images[:count], radius=self.clever_radius, seed=self.seed)
            columns["clever"] = clever
        stages.update()
        stages.close()
        return columns

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, np.ndarray]:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        columns = {"index": np.arange(len(images)), "label": labels.cpu().numpy()}
        columns.update(self.fisher_columns(model, images))
        columns["correct"] = columns["prediction"] == columns["label"]
        columns.update(self.attack_columns(model, images, labels))
        return columns


def _margin_and_slope(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """prediction, margin log p1 - log p2 (= z1 - z2) and |grad_x (z1 - z2)| per sample."""
    with preserved_state(model, x, mode="eval"), torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        top2 = model(inputs).topk(2, dim=1)
        margin = top2.values[:, 0] - top2.values[:, 1]
        (gradient,) = torch.autograd.grad(margin.sum(), inputs)
    return {"prediction": top2.indices[:, 0], "margin": margin.detach(), "grad_norm": gradient.flatten(1).norm(dim=1)}


def first_samples(dataset, count: Optional[int]) -> tuple[Tensor, Tensor]:
    """The first `count` (all when None) (image, label) pairs of a map-style dataset, stacked."""
    count = len(dataset) if count is None else min(count, len(dataset))
    pairs = [dataset[i] for i in range(count)]
    return torch.stack([image for image, _ in pairs]), torch.as_tensor([int(label) for _, label in pairs])
