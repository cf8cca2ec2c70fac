"""Per-sample robustness evaluation: Fisher scores, the black-box estimate, the architecture bound, baselines
and attack outcomes for the same held-out samples, as columns of one table (the evaluate recipe's CSV).

`RobustnessEvaluation` composes small column producers (`Columns`): `FisherColumns` (always), then any of
`BlackBoxColumn`, `BoundColumn`, `PGDColumn` (per norm and eps), `CarliniWagnerColumns`,
`MinimalPerturbationColumn` and `CleverColumn`, named in a mapping that Hydra composes
(`conf/evaluation/default.yaml`; `evaluation.columns.clever=null` drops one, `evaluation.columns.cw.steps=5`
sets an option). A producer marked `attack` is left out by `scores_only()`.

Inputs are pixels in [0, 1] (normalisation inside the model); every score and attack is taken there.
Columns (one value per sample):
- `label`, `prediction`, `correct`, `margin` = log p_top1 - log p_top2.
- `lambda_max`, `trace`, `radius`: the white-box Fisher scores (`fisher_scores`); radius = margin /
  sqrt(lambda_max), a robustness score, not a distance (in the two-class limit it is the linear step divided
  by sqrt(p1 p2), so it overstates the distance to the boundary). `fisher_step` = margin sqrt(p1 p2 / ((p1 +
  p2) lambda_max)): the Fisher's estimate of that distance (`fim_lightning.fisher_step`, <= linear_step).
  With `top_k`, `neglected_mass` is the probability of the classes merged into one (lambda_max is then a
  lower bound).
- `lambda_max_blackbox`: `blackbox_fisher` from `queries` queries per sample.
- `bound`: `fisher_spectral_bound` at the sample (an upper bound on lambda_max).
- `grad_norm`: the "Lipschitz" baseline |grad_x (z_top1 - z_top2)|, the local slope of the logit margin;
  `linear_step` = margin / grad_norm, DeepFool's first (linear) step: the distance to the decision boundary
  of the linearised margin, the strongest cheap baseline (one gradient per sample).
- `clever`: ART's CLEVER score (first `samples` samples; NaN after).
- `pgd_linf_robust`, `pgd_l2_robust`, `cw_robust`: still correct under ART's PGD (`eps`, `steps` steps, one
  random start) and Carlini-Wagner L2 (`const`, `steps`);
  `cw_l2`: the CW perturbation's norm where it changed the prediction (inf otherwise).
- `min_perturbation`: the smallest L2 perturbation found that changes the prediction (DeepFool, then a
  bisection of the PGD radius; `attacks.minimal_perturbation`).

Every random draw of a sample (black-box probes, PGD's random start, CLEVER's points) is seeded by (`seed`,
the sample's dataset index), so a sample's row does not depend on the batch, the process or the order it is
scored in: `batch_columns` of any split of the data gives the same rows as one call on all of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fim_lightning.blackbox import blackbox_fisher
from fim_lightning.bounds import fisher_spectral_bound
from fim_lightning.functional import fisher_scores
from fim_lightning.guard import preserved_state
from recipes import attacks


@dataclass(frozen=True)
class Batch:
    """What a column producer sees: one batch, its dataset indices and per-sample seeds, and the evaluation's
    attack batch size and seed."""

    model: nn.Module
    images: Tensor
    labels: Tensor
    indices: np.ndarray
    seeds: list[int]
    batch_size: int
    seed: int


class Columns:
    """A column producer: `(batch) -> {column: (N,) array}`; `attack` ones are left out by `scores_only()`."""

    attack = False

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().double().cpu().numpy()


class FisherColumns(Columns):
    """Prediction, margin, the Fisher scores and the gradient-norm baseline (`top_k`: the exact route on the
    top-k classes, e.g. for ImageNet; `model_dtype`: e.g. "float64")."""

    def __init__(self, top_k: Optional[int] = None, model_dtype: Optional[str] = None) -> None:
        self.top_k = top_k
        self.model_dtype = getattr(torch, model_dtype) if model_dtype else None

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        options = {"method": "exact", "top_k": self.top_k} if self.top_k is not None else {}
        scores = fisher_scores(batch.model, batch.images, model_dtype=self.model_dtype, margin_gradient=True,
                               **options)
        parts = {"lambda_max": scores.spectral_norm, "trace": scores.trace, "radius": scores.radius,
                 "fisher_step": scores.fisher_step, "prediction": scores.prediction, "margin": scores.margin,
                 "grad_norm": scores.margin_gradient_norm, "linear_step": scores.margin / scores.margin_gradient_norm}
        if self.top_k is not None:
            parts["neglected_mass"] = scores.neglected_mass
        table = {name: _numpy(value) for name, value in parts.items()}
        table["prediction"] = table["prediction"].astype(np.int64)
        return table


class BlackBoxColumn(Columns):
    """`lambda_max_blackbox`: `blackbox_fisher` from `queries` queries per sample (`difference`: "forward" or
    "central"), each sample's probes drawn from its own seed."""

    def __init__(self, queries: int = 129, difference: str = "forward") -> None:
        self.queries, self.difference = queries, difference

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        with preserved_state(batch.model, batch.images, mode="eval"):
            values = torch.cat([blackbox_fisher(
                batch.model, batch.images[i: i + 1], self.queries, output="logits", difference=self.difference,
                generator=torch.Generator().manual_seed(seed)).spectral_norm for i, seed in enumerate(batch.seeds)])
        return {"lambda_max_blackbox": _numpy(values)}


class BoundColumn(Columns):
    """`bound`: `fisher_spectral_bound` at the sample (raises for architectures the bound does not know)."""

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        return {"bound": _numpy(fisher_spectral_bound(batch.model, batch.images).value)}


class PGDColumn(Columns):
    """`pgd_{norm}_robust`: still correct under ART's PGD at `eps` (`steps` steps, one random start per
    sample's seed)."""

    attack = True

    def __init__(self, norm: str, eps: float, steps: int = 20) -> None:
        self.norm, self.eps, self.steps = norm, eps, steps

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        return {f"pgd_{self.norm}_robust": attacks.pgd_robust(
            batch.model, batch.images, batch.labels, norm=self.norm, eps=self.eps, steps=self.steps,
            seeds=batch.seeds, batch_size=batch.batch_size, seed=batch.seed)}


class CarliniWagnerColumns(Columns):
    """`cw_robust` and `cw_l2` (the perturbation's norm where it changed the prediction, inf otherwise):
    Carlini-Wagner L2 with constant `const`, `steps` steps."""

    attack = True

    def __init__(self, const: float = 1.0, steps: int = 20) -> None:
        self.const, self.steps = const, steps

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        robust, norms = attacks.carlini_wagner_l2(batch.model, batch.images, batch.labels, const=self.const,
                                                  steps=self.steps, batch_size=batch.batch_size)
        return {"cw_robust": robust, "cw_l2": norms}


class MinimalPerturbationColumn(Columns):
    """`min_perturbation`: the smallest L2 perturbation found that changes the prediction (DeepFool where
    `deepfool`, then `search_steps` bisections of the PGD radius with `steps`-step PGD)."""

    attack = True

    def __init__(self, search_steps: int = 10, deepfool: bool = True, steps: int = 20) -> None:
        self.search_steps, self.deepfool, self.steps = search_steps, deepfool, steps

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        return {"min_perturbation": attacks.minimal_perturbation(
            batch.model, batch.images, norm="l2", search_steps=self.search_steps, steps=self.steps,
            deepfool=self.deepfool, batch_size=batch.batch_size, seed=batch.seed)}


class CleverColumn(Columns):
    """`clever`: ART's CLEVER score on the samples with dataset index below `samples` (NaN after: each costs
    (C - 1) x batches x batch_size gradients); `radius`, `batches`, `batch_size` are ART's `radius`,
    `nb_batches`, `batch_size`."""

    attack = True

    def __init__(self, samples: int = 20, radius: float = 2.0, batches: int = 10, batch_size: int = 20) -> None:
        self.samples, self.radius, self.batches, self.batch_size = samples, radius, batches, batch_size

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        chosen = np.flatnonzero(np.asarray(batch.indices) < self.samples)
        clever = np.full(len(batch.images), np.nan)
        if len(chosen):
            clever[chosen] = attacks.clever_scores(batch.model, batch.images[torch.as_tensor(chosen)],
                                                   radius=self.radius, batches=self.batches,
                                                   batch_size=self.batch_size, seed=batch.seed,
                                                   seeds=[batch.seeds[i] for i in chosen])
        return {"clever": clever}


class RobustnessEvaluation:
    """Callable `(model, images, labels) -> {column: (N,) array}`: `index`, `label`, the `fisher` columns, the
    other score producers, `correct`, then the attack producers (each in the order of `columns`; a None entry
    is left out, so Hydra can drop one).

    Args:
        fisher: the Fisher columns (default `FisherColumns()`).
        columns: the other producers by name (default none).
        batch_size: samples per batch of every producer, and the attacks' batch.
        seed: of every random draw (black-box probes, PGD starts, CLEVER samples).
        progress: show progress bars.
    """

    def __init__(self, fisher: Optional[FisherColumns] = None,
                 columns: Optional[Mapping[str, Optional[Columns]]] = None, batch_size: int = 100, seed: int = 0,
                 progress: bool = True) -> None:
        self.fisher = FisherColumns() if fisher is None else fisher
        self.columns = {name: producer for name, producer in (columns or {}).items() if producer is not None}
        for name, producer in self.columns.items():
            if not isinstance(producer, Columns):
                raise TypeError(f"evaluation column {name!r} must be a Columns producer, got {producer!r}")
        self.batch_size, self.seed, self.progress = batch_size, seed, progress

    def scores_only(self) -> "RobustnessEvaluation":
        """This evaluation without the attack producers (PGD, CW, minimal perturbation, CLEVER): the Fisher
        scores, black-box estimate, bound and baselines only (e.g. for the untrained model)."""
        kept = {name: producer for name, producer in self.columns.items() if not producer.attack}
        return RobustnessEvaluation(self.fisher, kept, self.batch_size, self.seed, self.progress)

    def sample_seeds(self, indices: np.ndarray) -> list[int]:
        """One seed per sample from (`seed`, dataset index)."""
        return [int(np.random.SeedSequence([self.seed, int(i)]).generate_state(1)[0]) for i in indices]

    def batch_columns(self, model: nn.Module, images: Tensor, labels: Tensor,
                      indices: np.ndarray) -> dict[str, np.ndarray]:
        """Every column of one batch whose samples have dataset indices `indices`."""
        if not len(images) == len(labels) == len(indices):
            raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(indices)} indices")
        index = np.asarray(indices, dtype=np.int64)
        batch = Batch(model, images, labels, index, self.sample_seeds(index), self.batch_size, self.seed)
        columns = {"index": index, "label": labels.cpu().numpy(), **self.fisher(batch)}
        for producer in self.columns.values():
            if not producer.attack:
                columns.update(producer(batch))
        columns["correct"] = columns["prediction"] == columns["label"]
        for producer in self.columns.values():
            if producer.attack:
                columns.update(producer(batch))
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
