"""`FisherRobustnessCallback`: track the input-space Fisher spectral norm of a model during training."""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Sequence, Union, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from fim_lightning import writers
from fim_lightning.flavours import CALLBACK_BASES, MISCONFIGURATION_ERRORS, MisconfigurationException
from fim_lightning.functional import (METHODS, SpectralMethod, check_estimator_options, fisher_operator,
                                      fisher_scores, robust_distances)
from fim_lightning.algorithms import AUTO_EXACT_CLASSES
from fim_lightning.guard import forked_rng, is_sharded, preserved_state
from fim_lightning.outputs import OUTPUT_KINDS, OutputKind, as_class_scores
from fim_lightning.reductions import SUMMARY, summarize
from fim_lightning.robustness import (
    COLLAPSE_DROP, COLLAPSE_FLOOR, NORMS, Norm, check_bounds, check_eps, collapsed, robust_accuracy,
)
from fim_lightning.validation import check_bool, check_choice, check_int, check_real, check_str

_SCORES = ("spectral_norm", "trace", "radius")
_CORRECT = len(_SCORES)  # with labels: the column of "correctly classified", then one distance column per norm
INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values", "img", "data")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")
DEFAULT_EPS: dict[str, tuple[float, ...]] = {"l2": (0.25, 0.5), "linf": (2 / 255, 8 / 255)}


def eps_key(prefix: str, norm: str, radius: float) -> str:
    """`{prefix}/robust_accuracy/{norm}/{radius}`, the radius with 4 significant digits (8/255: 0.03137)."""
    return f"{prefix}/robust_accuracy/{norm}/{radius:.4g}"


def _check_attacks(attacks: Any, eps: dict[str, tuple[float, ...]]) -> dict[tuple[str, float], Any]:
    """`{"l2/0.5": attack}` as {("l2", 0.5): attack}; each key names a norm and one of its radii in `eps`."""
    if not isinstance(attacks, Mapping):
        raise TypeError(f"attacks must be a mapping from '{{norm}}/{{eps}}' to callables, got {attacks!r}")
    parsed = {}
    for key, attack in attacks.items():
        norm, _, text = str(key).partition("/")
        try:
            radius = float(text)
        except ValueError:
            radius = math.nan
        match = [r for r in eps.get(norm, ()) if math.isclose(r, radius, rel_tol=1e-3)]
        if not match:
            raise ValueError(f"attacks key {key!r} must be '{{norm}}/{{eps}}' with a radius of eps={eps}")
        if not callable(attack):
            raise TypeError(f"attacks[{key!r}] must be a callable (model, x, y) -> x_adv, got {attack!r}")
        parsed[norm, match[0]] = attack
    return parsed


def _check_eps(eps: Any) -> dict[str, tuple[float, ...]]:
    if not isinstance(eps, Mapping):
        raise TypeError(f"eps must be a mapping from norm ({NORMS}) to radii, e.g. {DEFAULT_EPS}, got {eps!r}")
    unknown = set(eps) - set(NORMS)
    if unknown:
        raise ValueError(f"eps keys must be norms in {NORMS}, got {sorted(unknown)}")
    return {norm: tuple(check_eps(eps[norm])) for norm in NORMS if norm in eps}


def _first_loader(loaders: Any) -> Any:
    """The first of several dataloaders (a list, tuple or dict of them), or the one given."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _run_name(trainer: pl.Trainer) -> str:
    """The first logger's name and version (what W&B, TensorBoard and CSV show), else the root folder."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is not None and logger.name:
        return f"{logger.name} {logger.version}" if logger.version is not None else str(logger.name)
    return str(trainer.default_root_dir)


class _Scored(NamedTuple):
    """One evaluation: the statistics, the gathered per-probe values (probe-set order), this rank's first
    eigenvectors with their predicted classes, and this rank's share of the probe inputs."""

    stats: dict[str, float]
    values: Tensor
    vectors: Tensor
    predictions: Tensor
    share: Tensor


class FisherRobustnessCallback(*CALLBACK_BASES):  # type: ignore[misc]  # each installed package's Callback
    r"""Score a fixed probe set of held-out samples for robustness and log it.

    The curve to watch: the estimated robust accuracy ``{prefix}/robust_accuracy/{norm}/{eps}`` (the share of
    probes classified correctly and keeping their class within the eps-ball, `fim_lightning.robustness`) beside
    the probes' clean ``{prefix}/accuracy``, with the collapse alarm ``{prefix}/alarm/robust_collapse`` and,
    with `attacks=`, a real attack's value beside the estimate. Then, for each probe x: lambda_max(F(x)),
    tr F(x) and the robustness radius
    (log p_1 - log p_2) / sqrt(lambda_max), where F(x) = J^T (diag p - p p^T) J. Their summaries (mean,
    median, 90th percentile, max) go to every logger as ``{prefix}/spectral_norm/mean`` and so on, against the
    global step (``{prefix}/test/spectral_norm/mean`` for a standalone ``test``, likewise ``validate``), and into
    ``trainer.callback_metrics`` (so ModelCheckpoint / EarlyStopping can monitor them).
    Figures go through each logger's writer (`fim_lightning.writers`): W&B media and TensorBoard image
    summaries (histogram, eigenvector images: grey 0, red +, blue -) at every evaluation; for other loggers
    (or none) PNG files under ``{log_dir}/{prefix}/`` at the end of ``fit`` (and of standalone
    ``validate``/``test``, or of a run stopped by an exception or signal). Only global rank 0 writes them.

    The probe set is drawn once (``seed``) from ``data`` or the trainer's validation (test) dataloader, and
    every point of the curve scores the same samples. Scoring runs in eval mode inside the package's state
    guard: module modes, BatchNorm buffers, ``.grad``, the optimizer and the global RNG are left as they were,
    under ``fit`` validation (no_grad), standalone ``validate``/``test`` (inference mode) and mixed precision
    (scores are computed in float32 or better). Under DDP each rank scores its share and the values are
    gathered, so the logged statistics equal a single-process run on the same probes. Under FSDP2, whose every
    forward is an all-gather, the shares are padded to one length and only "exact" / "auto" (C <= 64) run.

    Args:
        num_samples: size of the probe set.
        every_n_epochs: score at the end of every n-th training epoch (inside validation when it runs); None
            to disable.
        every_n_train_steps: score after every n-th optimizer step; None to disable.
        method: "auto" (the default: "exact", C - 1 VJPs per sample, for C <= 64 classes; above, Lanczos
            converged to ``tol`` with "exact" where it is not; measured at 1000 classes in docs/benchmarks.md),
            "exact", "power", "lanczos" or "gram_sketch" (formerly "hutchinson").
        estimator_options: options of the method. With ``{"top_k": k}`` ("exact") the merged mass is logged as
            ``{prefix}/neglected_mass/...`` and a probe that merged more than ``max_neglected_mass`` (0.01) gets
            NaN with a warning: its value would be a lower bound.
        data: held-out data (a DataLoader or Dataset); default: the validation dataloader (test for ``test``).
        input_key: where the input sits in a sample: an index into a tuple or a key into a dict; default: the
            first element of a tuple, or for a dict the first of ``INPUT_KEYS`` it has (else its only tensor).
        model_attribute: score ``getattr(pl_module, model_attribute)`` instead of ``pl_module``.
        output: what the scored model returns: "logits", "probs" or "log_probs".
        batch_size: probes scored at once (bounds memory).
        seed: seed of the probe-set draw and of the estimator's random draws.
        log_figures: log the histogram, curves and eigenvector images.
        num_eigenvectors: how many top eigenvectors to show.
        prefix: namespace of the logged keys.
        eps: radii per norm for the estimated robust accuracy (`fim_lightning.estimated_robust_accuracy`), e.g.
            ``{"l2": [0.25, 0.5], "linf": [2/255, 8/255]}`` (the default, `None`), in the units the model takes;
            logged as ``{prefix}/accuracy`` and ``{prefix}/robust_accuracy/{norm}/{eps}`` (eps with 4 significant
            digits). ``{}`` turns it off. Needs the probes' labels.
        label_key: where the label sits in a sample: default the second element of a tuple, or for a dict the
            first of ``LABEL_KEYS`` it has. Without labels the default `eps` is skipped with a warning; an
            explicit `eps` raises.
        input_bounds: the box the inputs live in (e.g. ``(0.0, 1.0)`` for pixels), kept by the robustness
            estimate's line search as attacks keep it; default none.
        line_steps: bisection steps of the robustness estimate's line search (0: the linear step alone).
        attacks: real attacks that calibrate the estimate, keyed ``"{norm}/{eps}"`` (a radius of `eps`): each a
            callable ``(model, x, y) -> x_adv`` (a torchattacks or ART attack wrapped, or `recipes.attacks`). Every
            `attack_every_n` evaluations the first `attack_samples` probes are attacked; logged:
            ``{prefix}/attack/robust_accuracy/{norm}/{eps}``, the estimate on the same probes
            ``{prefix}/attack/estimate/{norm}/{eps}``, their ``{prefix}/attack/gap/{norm}/{eps}`` (estimate minus
            attack) and ``{prefix}/attack/seconds``; a gap above `attack_gap` warns (gradient masking, or an
            estimate out of its range). An attack that leaves the eps-ball raises.
        attack_every_n: attack at every n-th evaluation (the first included).
        attack_samples: how many probes are attacked.
        attack_gap: the |gap| that warns.
        collapse_drop: the robust-collapse alarm: ``{prefix}/alarm/robust_collapse`` is 1 at an evaluation where,
            at some radius, the estimated robust share of the correctly classified probes (robust accuracy over
            ``{prefix}/accuracy``) fell below (1 - collapse_drop) times its value at the evaluation before
            (`fim_lightning.robustness.collapsed`), else 0, with a warning when it fires (catastrophic
            overfitting: robust accuracy collapses within an epoch; evaluate once an epoch, the default). The
            defaults were chosen on seed 0 of `bench/tracking.py` (FGSM-AT and plain training, Fashion-MNIST):
            there it fired in the epoch of the collapse and never in plain training (seeds 1 and 2 test them).
            Stop on it with ``EarlyStopping(monitor="fim/alarm/robust_collapse", mode="min",
            divergence_threshold=0.5)``. Beside it, ``{prefix}/robust_drop/{norm}/{eps}`` is the best estimated
            robust accuracy so far minus the current one (robust overfitting, a slow fall: it grows after the
            peak); keep the most robust checkpoint with
            ``ModelCheckpoint(monitor="fim/robust_accuracy/{norm}/{eps}", mode="max")``.
        collapse_floor: the robust share a radius must have had at the evaluation before to collapse.
    """

    def __init__(
        self,
        num_samples: int = 32,
        every_n_epochs: Optional[int] = 1,
        every_n_train_steps: Optional[int] = None,
        method: SpectralMethod = "auto",
        estimator_options: Optional[dict[str, Any]] = None,
        data: Optional[Union[DataLoader, Dataset]] = None,
        input_key: Optional[Union[int, str]] = None,
        model_attribute: Optional[str] = None,
        output: OutputKind = "logits",
        batch_size: int = 64,
        seed: int = 0,
        log_figures: bool = True,
        num_eigenvectors: int = 4,
        prefix: str = "fim",
        eps: Optional[Mapping[str, Sequence[float]]] = None,
        label_key: Optional[Union[int, str]] = None,
        input_bounds: Optional[tuple[float, float]] = None,
        line_steps: int = 8,
        attacks: Optional[Mapping[str, Any]] = None,
        attack_every_n: int = 1,
        attack_samples: int = 64,
        attack_gap: float = 0.1,
        collapse_drop: float = COLLAPSE_DROP,
        collapse_floor: float = COLLAPSE_FLOOR,
    ) -> None:
        options = dict(estimator_options or {})
        try:
            check_int("num_samples", num_samples, 1)
            check_int("every_n_epochs", every_n_epochs, 1, allow_none=True)
            check_int("every_n_train_steps", every_n_train_steps, 1, allow_none=True)
            check_estimator_options(method, options)
            if data is not None and not isinstance(data, (DataLoader, Dataset)):
                raise TypeError(f"data must be a DataLoader or Dataset, got {type(data).__name__}")
            if input_key is not None and (isinstance(input_key, bool) or not isinstance(input_key, (int, str))):
                raise TypeError(f"input_key must be an int, a str or None, got {input_key!r}")
            check_str("model_attribute", model_attribute, allow_none=True)
            check_choice("output", output, OUTPUT_KINDS)
            check_int("batch_size", batch_size, 1)
            check_int("seed", seed)
            check_bool("log_figures", log_figures)
            check_int("num_eigenvectors", num_eigenvectors, 0)
            check_str("prefix", prefix)
            radii = _check_eps(DEFAULT_EPS if eps is None else eps)
            if label_key is not None and (isinstance(label_key, bool) or not isinstance(label_key, (int, str))):
                raise TypeError(f"label_key must be an int, a str or None, got {label_key!r}")
            bounds = check_bounds(input_bounds)
            check_int("line_steps", line_steps, 0)
            parsed_attacks = _check_attacks(attacks or {}, radii)
            check_int("attack_every_n", attack_every_n, 1)
            check_int("attack_samples", attack_samples, 1)
            check_real("attack_gap", attack_gap, 0.0)
            check_real("collapse_drop", collapse_drop, 0.0, strict=True, maximum=1.0)
            check_real("collapse_floor", collapse_floor, 0.0, maximum=1.0)
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"FisherRobustnessCallback: {error}") from error
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.method = method
        self.estimator_options = options
        self.data = data
        self.input_key = input_key
        self.model_attribute = model_attribute
        self.output = output
        self.batch_size = batch_size
        self.seed = seed
        self.log_figures = log_figures
        self.num_eigenvectors = num_eigenvectors
        self.prefix = prefix
        self.eps = radii
        self.label_key = label_key
        self.input_bounds = bounds
        self.line_steps = line_steps
        self.attacks = parsed_attacks
        self.attack_every_n = attack_every_n
        self.attack_samples = attack_samples
        self.attack_gap = attack_gap
        self.collapse_drop = collapse_drop
        self.collapse_floor = collapse_floor
        self._evaluations = 0
        self._labels_required = eps is not None and bool(radii)
        self.history: list[dict[str, Any]] = []  # the statistics, with the step, epoch and stage
        self._probe_inputs: Optional[Tensor] = None
        self._probe_indices: Optional[Tensor] = None
        self._probe_labels: Optional[Tensor] = None
        self._generator_state: Tensor = torch.Generator().manual_seed(seed).get_state()
        self._last_step = -1
        self._unverified_probes = False
        self._labels_checked = False
        self._latest: Optional[writers.Snapshot] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # -- set-up -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the scored model now; with `data=`, draw the probe set now too, otherwise at the first
        evaluation, from the trainer's validation (test) dataloaders."""
        if stage == TrainerFn.PREDICTING:
            return
        self._scored_model(pl_module)
        if self._probe_inputs is None and self.data is not None:
            self._ensure_probe_set(trainer, pl_module)

    def _ensure_probe_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Optional[Tensor]]:
        """The probe inputs and labels (None where the samples hold none), drawn at the first call."""
        if self._probe_inputs is not None and self._probe_indices is not None and self._unverified_probes:
            self._check_saved_probes(trainer, pl_module, self._probe_indices)
        if self._probe_inputs is None or self._probe_indices is None:
            data = self._held_out_data(trainer, pl_module)
            self._probe_inputs, self._probe_labels, self._probe_indices = self._draw_probe_set(data)
            self._check_model_output(pl_module, self._probe_inputs)
        elif self.eps and self._probe_labels is None and not self._labels_checked:
            self._probe_labels = self._labels_at_indices(self._held_out_data(trainer, pl_module), self._probe_indices)
        if self.eps and self._probe_labels is None and not self._labels_checked:
            if self._labels_required:
                raise MisconfigurationException(
                    "FisherRobustnessCallback: eps= asks for robust accuracy, but the held-out samples carry no label "
                    f"(label_key={self.label_key!r}); pass label_key=, or eps={{}}")
            rank_zero_warn("FisherRobustnessCallback: the held-out samples carry no labels, so the robust accuracy "
                           "is not logged; pass label_key= (or eps={} to silence this)")
        self._labels_checked = True
        return self._probe_inputs, self._probe_labels

    def _check_model_output(self, pl_module: pl.LightningModule, probes: Tensor) -> None:
        """One forward of two probes: the output must be (B, C) class scores with C >= 2."""
        try:
            with fisher_operator(self._scored_model(pl_module), probes[:2].to(pl_module.device),
                                 output=self.output, mode="eval") as op:
                op.check_output()
        except Exception as error:  # the output check, or the model's own forward on a tensor batch
            shape = tuple(probes[:2].shape)
            raise MisconfigurationException(
                f"FisherRobustnessCallback cannot score this model on a tensor batch of probe inputs {shape} "
                f"({type(error).__name__}: {error}). If its forward takes another structure (a dict, several "
                "inputs) or returns more than class scores, pass model_attribute= naming the network that maps "
                "the input tensor to (B, C) scores (and input_key= for where the input sits in a sample)") from error

    def _check_saved_probes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, saved: Tensor) -> None:
        """A checkpoint of the older format (no `num_samples` / `seed`): its probe indices must be the ones this
        callback's `num_samples` and `seed` draw from the held-out data, else a new curve starts."""
        self._unverified_probes = False
        data = self._held_out_data(trainer, pl_module)
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            return
        expected = self._draw_indices(len(dataset))
        if not torch.equal(expected, saved.cpu()):
            rank_zero_warn(
                "FisherRobustnessCallback: the checkpoint (an older format, without num_samples / seed) holds "
                f"{len(saved)} probes that num_samples={self.num_samples}, seed={self.seed} do not "
                "draw: starting a new FIM curve (new probe set, empty history)"
            )
            self._probe_inputs, self._probe_indices, self.history = None, None, []

    def _held_out_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Union[DataLoader, Dataset]:
        """`data`, else the trainer's validation (test) dataloader, else the datamodule's or the module's own
        (the trainer loads none with `limit_val_batches=0`)."""
        if self.data is not None:
            return self.data
        testing = trainer.state.fn == TrainerFn.TESTING
        kind = "test" if testing else "val"
        loader = _first_loader(trainer.test_dataloaders if testing else trainer.val_dataloaders)
        for source in (getattr(trainer, "datamodule", None), pl_module):  # a property torch's stubs lack
            if loader is None and source is not None:
                with contextlib.suppress(NotImplementedError, AttributeError, *MISCONFIGURATION_ERRORS):
                    loader = _first_loader(getattr(source, f"{kind}_dataloader")())
        if loader is None:
            raise MisconfigurationException(
                "FisherRobustnessCallback needs held-out data: neither the trainer, the datamodule nor the module "
                f"has a {'test' if testing else 'validation'} dataloader (with limit_val_batches=0 the trainer loads "
                "none); pass `data=` (a DataLoader or Dataset)"
            )
        return loader

    def _draw_indices(self, size: int) -> Tensor:
        draw = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
        return draw[: self.num_samples].sort().values

    def _draw_probe_set(self, data: Union[DataLoader, Dataset]) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """`num_samples` inputs (and labels, where the samples hold them) drawn once with `seed`; the global RNG is
        forked (transforms, iterators draw from it)."""
        dataset = data.dataset if isinstance(data, DataLoader) else data
        with forked_rng():
            if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
                size = len(dataset)
                if size == 0:
                    raise MisconfigurationException("FisherRobustnessCallback: the held-out dataset is empty")
                indices = self._draw_indices(size)
                items = [dataset[i] for i in indices.tolist()]
                inputs = torch.stack([self._input_of(item) for item in items])
                found = [self._label_of(item) for item in items]
                present = [label for label in found if label is not None]
                labels = torch.stack(present) if len(present) == len(found) else None
            else:
                loader = data if isinstance(data, DataLoader) else DataLoader(dataset, batch_size=self.batch_size)
                batches: list[Tensor] = []
                label_batches: list[Optional[Tensor]] = []
                count = 0
                for batch in loader:
                    batches.append(self._input_of(batch))
                    label_batches.append(self._label_of(batch))
                    count += len(batches[-1])
                    if count >= self.num_samples:
                        break
                inputs = torch.cat(batches)[: self.num_samples]
                present = [label for label in label_batches if label is not None]
                labels = torch.cat(present)[: self.num_samples] if len(present) == len(label_batches) else None
                indices = torch.arange(len(inputs))
        return inputs.float().contiguous(), labels, indices

    def _labels_at_indices(self, data: Union[DataLoader, Dataset], indices: Tensor) -> Optional[Tensor]:
        """The labels of the saved probes (a checkpoint from before labels were kept), from a map-style dataset."""
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            return None
        with forked_rng():
            found = [self._label_of(dataset[i]) for i in indices.tolist()]
        labels = [label for label in found if label is not None]
        return torch.stack(labels) if len(labels) == len(found) else None

    def _label_of(self, item: Any) -> Optional[Tensor]:
        """The integer label(s) of a sample or batch, or None where it holds none."""
        value = None
        if isinstance(item, Mapping):
            key = self.label_key if self.label_key is not None else next((k for k in LABEL_KEYS if k in item), None)
            if self.label_key is not None and self.label_key not in item:
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: label_key={self.label_key!r} is not a key of the held-out samples; "
                    f"their keys are {list(item)}")
            value = item[key] if key is not None else None
        elif isinstance(item, (tuple, list)):
            index = 1 if self.label_key is None else self.label_key
            value = item[index] if isinstance(index, int) and -len(item) <= index < len(item) else None
        if value is None:
            return None
        value = torch.as_tensor(value)
        if value.is_floating_point() or value.is_complex():
            if self.label_key is not None:
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: the labels at label_key={self.label_key!r} must be integer class "
                    f"indices, got {value.dtype}")
            return None
        return value.long()

    def _input_of(self, item: Any) -> Tensor:
        value = self._find_input(item)
        if not isinstance(value, Tensor):
            raise MisconfigurationException(
                f"FisherRobustnessCallback: the held-out samples must hold tensors at input_key={self.input_key!r}, "
                f"got {type(value).__name__}"
            )
        return value

    def _find_input(self, item: Any) -> Any:
        if isinstance(item, Mapping):
            if self.input_key is not None:
                if self.input_key not in item:
                    raise MisconfigurationException(
                        f"FisherRobustnessCallback: input_key={self.input_key!r} is not a key of the held-out "
                        f"samples; their keys are {list(item)}")
                return item[self.input_key]
            key = next((k for k in INPUT_KEYS if k in item), None)
            tensors = [k for k, v in item.items() if isinstance(v, Tensor) and v.is_floating_point()]
            if key is None and len(tensors) == 1:
                key = tensors[0]
            if key is None:
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: cannot tell which entry of the held-out samples is the input: keys "
                    f"{list(item)}, none of {INPUT_KEYS}; pass input_key=")
            return item[key]
        if isinstance(item, (tuple, list)):
            index = 0 if self.input_key is None else self.input_key
            if not isinstance(index, int):
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: input_key={index!r} is a key, but the held-out samples are "
                    f"{type(item).__name__}s: pass the input's index")
            return item[index]
        return item

    def _scored_model(self, pl_module: pl.LightningModule) -> Any:
        """`pl_module`, or its `model_attribute`; a module without `forward` (its steps call a submodule)
        is refused with the pointer to `model_attribute=`."""
        if self.model_attribute:
            if not hasattr(pl_module, self.model_attribute):
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: model_attribute={self.model_attribute!r} is not an attribute of "
                    f"{type(pl_module).__name__}")
            return getattr(pl_module, self.model_attribute)
        if getattr(type(pl_module).forward, "__qualname__", "") in ("LightningModule.forward",
                                                                     "_forward_unimplemented"):
            children = [name for name, _ in pl_module.named_children()]
            raise MisconfigurationException(
                f"FisherRobustnessCallback scores the LightningModule's forward, and {type(pl_module).__name__} "
                f"defines none: pass model_attribute= naming the network it calls (its submodules: {children})")
        return pl_module

    # -- triggers -----------------------------------------------------------------------------------
    @staticmethod
    def _score_in_validation(trainer: pl.Trainer) -> bool:
        """Whether the end-of-epoch point is scored in `on_validation_epoch_end` (so that ModelCheckpoint and
        EarlyStopping, which run in `on_validation_end`, see it) rather than in `on_train_epoch_end`: only
        where exactly one validation runs per epoch, at its end (as ModelCheckpoint decides where it saves)."""
        found: Any = trainer.num_val_batches  # a list per dataloader, or one count
        batches = sum(found) if isinstance(found, list) else found
        return (trainer.check_val_every_n_epoch == 1 and isinstance(trainer.val_check_interval, float)
                and trainer.val_check_interval == 1.0 and batches > 0)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_step:
            self._score_fit_point(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            self.score(trainer, pl_module)
        elif self._score_in_validation(trainer):
            self._score_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._score_in_validation(trainer):
            self._score_epoch(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.score(trainer, pl_module)

    def _score_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._score_fit_point(trainer, pl_module)

    def _score_fit_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A point of the training curve, at most one per global step (an epoch's end may fall on a step the
        step trigger has scored already)."""
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.score(trainer, pl_module)

    # -- scoring: compute, log, draw ------------------------------------------------------------------
    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score the probe set now, log the summaries and return them."""
        scored = self._compute(trainer, pl_module)
        self._log(trainer, scored.stats)
        self._latest = self._snapshot(trainer, scored)
        self._write_figures(trainer, "on_score")
        if trainer.state.fn != TrainerFn.FITTING:
            self._write_figures(trainer, "on_end")
        return scored.stats

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _Scored:
        """This rank's share of the probes scored, every rank's values gathered, and the statistics: the
        summaries, the robust accuracy, the alarm while fitting and, every `attack_every_n` evaluations, the
        attacks."""
        probes, probe_labels = self._ensure_probe_set(trainer, pl_module)
        world, rank = trainer.world_size, trainer.global_rank
        share = probes[rank::world]
        share_labels = probe_labels[rank::world] if probe_labels is not None else None
        if is_sharded(self._scored_model(pl_module)):  # FSDP2: the same forward passes on every rank
            local, vectors, predictions = self._score_sharded(probes, probe_labels, share, share_labels, world,
                                                              pl_module)
        else:
            local, vectors, predictions = self._score_share(share, pl_module, share_labels)
        values = self._gather(local, len(probes), world)
        stats = {}
        for column, name in enumerate(_SCORES):
            stats.update(summarize(values[:, column], f"{self.prefix}/{name}"))
        if self._merges_classes:
            stats.update(summarize(values[:, -1], f"{self.prefix}/neglected_mass"))
            values = values[:, :-1]
        stats.update(self._robustness_statistics(values))
        if trainer.state.fn == TrainerFn.FITTING:
            stats.update(self._collapse_alarm(trainer, stats))
        if self.attacks and share_labels is not None and self._evaluations % self.attack_every_n == 0:
            stats.update(self._calibrate(trainer, pl_module, share, share_labels, values, len(probes)))
        self._evaluations += 1
        return _Scored(stats, values, vectors, predictions, share)

    def _log(self, trainer: pl.Trainer, stats: dict[str, float]) -> None:
        """The statistics into the history, every logger (against the global step) and `callback_metrics`."""
        stage = cast(TrainerFn, trainer.state.fn).value  # set in every hook that scores
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "stage": stage, **stats})
        logged = {self.logged_key(key, stage): value for key, value in stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in logged.items()})

    def _snapshot(self, trainer: pl.Trainer, scored: _Scored) -> writers.Snapshot:
        """What the figure writers draw of this evaluation."""
        stats, vectors = scored.stats, scored.vectors
        shown = scored.values[::trainer.world_size][: len(vectors)]  # this rank's first probes, in probe-set order
        return writers.Snapshot(
            prefix=self.prefix, step=trainer.global_step, spectral_norm=scored.values[:, 0], eigenvectors=vectors,
            eigenvalues=shown[:, 0], history=list(self.history), curve_keys=self._curve_keys(),
            inputs=scored.share[: len(vectors)].cpu(), radii=shown[:, 2], predictions=scored.predictions,
            run=_run_name(trainer),
            robust_accuracy={norm: [(radius, stats[eps_key(self.prefix, norm, radius)]) for radius in radii]
                             for norm, radii in self.eps.items() if eps_key(self.prefix, norm, radii[0]) in stats},
            robust_keys=[key for key in stats if key.startswith(f"{self.prefix}/robust_accuracy/")],
        )

    def _collapse_alarm(self, trainer: pl.Trainer, stats: dict[str, float]) -> dict[str, float]:
        """`{prefix}/alarm/robust_collapse` from each robust-accuracy key's curve over the fit so far
        (`collapsed`), and per key `{prefix}/robust_drop/{norm}/{eps}`: the best so far minus now (0 at a new
        best; it grows as robust accuracy peaks and falls, robust overfitting)."""
        keys = [key for key in stats if key.startswith(f"{self.prefix}/robust_accuracy/")]
        if not keys:
            return {}
        accuracy = f"{self.prefix}/accuracy"
        fitted = [record for record in self.history if record.get("stage") == "fit"]
        fired, drops = [], {}
        for key in keys:
            before = [record for record in fitted if key in record]
            best = max((record[key] for record in before), default=math.nan)
            name = key.removeprefix(self.prefix + "/robust_accuracy/")
            drops[f"{self.prefix}/robust_drop/{name}"] = best - stats[key] if best > stats[key] else 0.0  # NaN best: 0
            curve = [*before, stats]
            if collapsed([record[key] for record in curve], [record[accuracy] for record in curve],
                         self.collapse_drop, self.collapse_floor):
                previous = next(r for r in reversed(before) if not math.isnan(r[key] + r[accuracy]))
                fired.append(f"{name}: {stats[key]:.3f} at accuracy {stats[accuracy]:.3f}, after "
                             f"{previous[key]:.3f} at {previous[accuracy]:.3f}")
        if fired:
            rank_zero_warn(f"FisherRobustnessCallback: robust accuracy collapsed at step {trainer.global_step} "
                           f"({'; '.join(fired)}): catastrophic overfitting? Check with an attack (attacks=)")
        return {f"{self.prefix}/alarm/robust_collapse": float(bool(fired)), **drops}

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, share: Tensor, labels: Tensor,
                   values: Tensor, total: int) -> dict[str, float]:
        """The attacks on the first `attack_samples` of the `total` probes (each rank its share of them), against
        the estimate on the same probes."""
        world, rank = trainer.world_size, trainer.global_rank
        count = min(self.attack_samples, total)
        mine = len(range(rank, count, world))
        model = self._scored_model(pl_module)
        x, y = share[:mine].to(pl_module.device), labels[:mine].to(pl_module.device)
        outcomes = torch.full((len(share), len(self.attacks)), math.nan, dtype=torch.float64, device=pl_module.device)
        start = time.perf_counter()
        for column, ((norm, radius), attack) in enumerate(self.attacks.items()):
            if mine:
                outcomes[:mine, column] = self._attack_outcome(model, attack, x, y, norm, radius).to(torch.float64)
        seconds = time.perf_counter() - start
        measured = self._gather(outcomes, total, world)[:count]
        correct = values[:count, _CORRECT] > 0.5
        stats = {f"{self.prefix}/attack/seconds": seconds}
        for column, (norm, radius) in enumerate(self.attacks):
            estimate = robust_accuracy(values[:count, self._distance_column(norm)], correct, [radius]).item()
            attacked = measured[:, column].mean().item()
            suffix = f"{norm}/{radius:.4g}"
            stats.update({f"{self.prefix}/attack/robust_accuracy/{suffix}": attacked,
                          f"{self.prefix}/attack/estimate/{suffix}": estimate,
                          f"{self.prefix}/attack/gap/{suffix}": estimate - attacked})
            if abs(estimate - attacked) > self.attack_gap:
                rank_zero_warn(
                    f"FisherRobustnessCallback: at step {trainer.global_step} the estimated robust accuracy at "
                    f"{suffix} is {estimate:.3f} and the attack measures {attacked:.3f} on the same {count} probes "
                    f"(gap {estimate - attacked:+.3f} > {self.attack_gap}): the estimate is out of its range here "
                    "(a model whose gradients mislead, e.g. catastrophic overfitting), or the attack is weak")
        return stats

    @staticmethod
    def _attack_outcome(model: Any, attack: Any, x: Tensor, y: Tensor, norm: str, radius: float) -> Tensor:
        """(n,) True where the sample is classified correctly at x and at the attack's point, run in eval mode
        with the model's state guarded; an attack that leaves the eps-ball raises."""
        with preserved_state(model, x, mode="eval"):
            adversarial = attack(model, x.clone(), y.clone())
            if not isinstance(adversarial, Tensor) or adversarial.shape != x.shape:
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: the attack for {norm}/{radius:.4g} must return x_adv shaped like x "
                    f"{tuple(x.shape)}, got {getattr(adversarial, 'shape', type(adversarial).__name__)}")
            adversarial = adversarial.detach().to(x.dtype)
            shift = (adversarial - x).flatten(1).norm(p=2 if norm == "l2" else math.inf, dim=1)
            if (shift > radius * (1 + 1e-3) + 1e-6).any():
                raise MisconfigurationException(
                    f"FisherRobustnessCallback: the attack for {norm}/{radius:.4g} moved a sample by "
                    f"{shift.max().item():.4g}, outside its eps-ball: its accuracy would not be robust accuracy")
            with torch.no_grad():
                clean = as_class_scores(model(x), len(x)).argmax(1)
                attacked = as_class_scores(model(adversarial), len(x)).argmax(1)
        return (clean == y) & (attacked == y)

    def _robustness_statistics(self, values: Tensor) -> dict[str, float]:
        """`{prefix}/accuracy` and `{prefix}/robust_accuracy/{norm}/{eps}` from the gathered columns (a probe is
        robust at eps if correct and its estimated distance exceeds eps; NaN distances are not robust)."""
        if values.shape[1] == len(_SCORES):
            return {}
        correct = values[:, _CORRECT] > 0.5
        stats = {f"{self.prefix}/accuracy": correct.double().mean().item()}
        for norm, radii in self.eps.items():
            shares = robust_accuracy(values[:, self._distance_column(norm)], correct, radii)
            stats.update({eps_key(self.prefix, norm, radius): share for radius, share in zip(radii, shares.tolist())})
        return stats

    @property
    def _merges_classes(self) -> bool:
        """`top_k` is set: a last column holds each probe's merged probability (`{prefix}/neglected_mass`)."""
        return "top_k" in self.estimator_options

    def _distance_column(self, norm: str) -> int:
        """The column of `norm`'s estimated distance in the scored values (after the scores and `_CORRECT`)."""
        return _CORRECT + 1 + list(self.eps).index(norm)

    def logged_key(self, key: str, stage: str) -> str:
        """The key a statistic is logged under: `{prefix}/...` while fitting, `{prefix}/{stage}/...` in a
        standalone validate or test, so those points can be told apart from the training curve."""
        if stage == TrainerFn.FITTING.value:
            return key
        return f"{self.prefix}/{stage}/{key.removeprefix(self.prefix + '/')}"

    def _write_figures(self, trainer: pl.Trainer, event: str) -> None:
        """Figures of the latest evaluation through each logger's writer (`writers`), on global rank 0 only."""
        if self.log_figures and trainer.is_global_zero and self._latest is not None:
            writers.write(trainer, self._latest, event)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_figures(trainer, "on_end")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An interrupted run (SIGTERM, Ctrl+C, an error) still leaves the figures of its last evaluation."""
        try:
            self._write_figures(trainer, "on_end")
        except Exception as error:  # never hide the exception that stopped the run
            warnings.warn(f"FisherRobustnessCallback could not write its figures after {exception!r}: {error!r}",
                          stacklevel=2)

    def _score_sharded(self, probes: Tensor, labels: Optional[Tensor], share: Tensor, share_labels: Optional[Tensor],
                       world: int, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor, Tensor]:
        """`_score_share` for a sharded model (FSDP2), whose every forward pass is an all-gather: only the
        methods with a fixed number of passes ("exact", and "auto" up to `AUTO_EXACT_CLASSES`), and every rank's
        share padded (with probe 0, dropped after) to the same length, so every rank runs the same batches."""
        classes = len(self._scores_of(pl_module, probes[:1]))
        if self.method not in ("exact", "auto") or (self.method == "auto" and classes > AUTO_EXACT_CLASSES):
            raise MisconfigurationException(
                f"FisherRobustnessCallback: method={self.method!r} at {classes} classes runs a number of forward "
                "passes that depends on the samples (it stops when they converge), and under FSDP2 every pass is "
                "an all-gather that all ranks must join: the ranks would hang. Use method='exact' (a fixed C - 1 "
                "VJPs; with estimator_options={'top_k': k} for many classes)")
        missing = -(-len(probes) // world) - len(share)
        padded = torch.cat([share, probes[:1].expand(missing, *probes.shape[1:])])
        padded_labels = None if share_labels is None or labels is None else torch.cat(
            [share_labels, labels[:1].expand(missing)])
        local, vectors, predictions = self._score_share(padded, pl_module, padded_labels)
        kept = min(len(vectors), len(share))
        return local[: len(share)], vectors[:kept], predictions[:kept]

    def _scores_of(self, pl_module: pl.LightningModule, x: Tensor) -> Tensor:
        """The class scores of one probe (a forward pass on every rank alike)."""
        model = self._scored_model(pl_module)
        with preserved_state(model, x, mode="eval"), torch.no_grad():
            return as_class_scores(model(x.to(pl_module.device)), len(x))[0]

    def _score_share(self, share: Tensor, pl_module: pl.LightningModule,
                     share_labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(n, 3) spectral norm, trace, radius of this rank's probes (with labels and `eps`: then whether each is
        correct and its estimated distance per norm), and its first top eigenvectors with their predicted
        classes."""
        options = dict(self.estimator_options)
        generator = None
        if METHODS[self.method].random:
            generator = torch.Generator()
            generator.set_state(self._generator_state)
            options["generator"] = generator
        columns: list[Tensor] = []
        vectors: list[Tensor] = []
        predictions: list[Tensor] = []
        labels = share_labels if self.eps else None
        for start in range(0, len(share), self.batch_size):
            chunk = share[start: start + self.batch_size].to(pl_module.device)
            model = self._scored_model(pl_module)
            scores = fisher_scores(model, chunk, self.method, output=self.output, mode="eval", **options)
            column = [scores.spectral_norm, scores.trace, scores.radius]
            if labels is not None:  # its own operator: on the scores' one, FSDP2 training failed after (issue 25)
                distances = robust_distances(model, chunk, cast(tuple[Norm, ...], tuple(self.eps)),
                                             output=self.output, mode="eval", line_steps=self.line_steps,
                                             bounds=self.input_bounds)
                correct = scores.prediction == labels[start: start + self.batch_size].to(scores.prediction.device)
                column += [correct.to(torch.float64), *(distances[norm] for norm in self.eps)]
            if self._merges_classes:
                merged = scores.neglected_mass  # None where top_k keeps every class
                column.append(torch.zeros_like(scores.spectral_norm) if merged is None else merged)
            columns.append(torch.stack([c.to(torch.float64) for c in column], dim=1))
            wanted = self.num_eigenvectors - sum(len(v) for v in vectors)
            vectors.append(scores.eigenvector[:wanted].cpu())
            predictions.append(scores.prediction[:wanted].cpu())
        if generator is not None:
            self._generator_state = generator.get_state()
        width = len(_SCORES) + (1 + len(self.eps) if labels is not None else 0) + int(self._merges_classes)
        local = torch.cat(columns) if columns else torch.zeros(0, width, dtype=torch.float64)
        if not vectors:
            return local.to(pl_module.device), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return local.to(pl_module.device), torch.cat(vectors), torch.cat(predictions)

    @staticmethod
    def _gather(local: Tensor, total: int, world: int) -> Tensor:
        """Every rank's rows back in probe-set order (probe i was scored by rank i % world, at row i // world),
        through torchmetrics' `gather_all_tensors`, which takes shares of unequal length."""
        if world == 1:
            return local.cpu()
        values = local.new_full((total, local.shape[1]), math.nan)
        for rank, rows in enumerate(gather_all_tensors(local)):
            values[rank::world] = rows[: len(range(rank, total, world))]
        return values.cpu()

    def _curve_keys(self) -> list[str]:
        return [f"{self.prefix}/spectral_norm/{key}" for key in SUMMARY]

    # -- checkpointing ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "probe_inputs": self._probe_inputs,
            "probe_indices": self._probe_indices,
            "probe_labels": self._probe_labels,
            "history": list(self.history),
            "generator_state": self._generator_state,
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved curve; a checkpoint whose probe set was drawn with another `num_samples` or
        `seed` starts a new curve (with a warning) instead of silently keeping the old probes. An older
        checkpoint without those two keys is checked at the first evaluation, against the probe indices that
        this callback draws from the held-out data."""
        required = ("probe_inputs", "probe_indices", "history", "generator_state", "last_step")
        missing = [key for key in required if key not in state_dict] if isinstance(state_dict, Mapping) else required
        if missing:
            raise MisconfigurationException(
                f"FisherRobustnessCallback.load_state_dict: not a state of this callback (missing {missing}); "
                "pass what `state_dict()` returned, or the checkpoint's `callbacks[callback.state_key]`")
        saved = {name: state_dict[name] for name in ("num_samples", "seed") if name in state_dict}
        if saved and saved != {"num_samples": self.num_samples, "seed": self.seed}:
            rank_zero_warn(
                f"FisherRobustnessCallback: the checkpoint's probe set was drawn with {saved}, this callback has "
                f"num_samples={self.num_samples}, seed={self.seed}: starting a new FIM curve (new probe set, empty "
                "history)"
            )
            return
        probes = state_dict["probe_inputs"]
        if not saved and probes is not None and len(probes) != self.num_samples:
            rank_zero_warn(
                f"FisherRobustnessCallback: the checkpoint holds {len(probes)} probes, this callback has "
                f"num_samples={self.num_samples}: starting a new FIM curve (new probe set, empty history)")
            return
        self._probe_inputs = probes
        self._probe_indices = state_dict["probe_indices"]
        self._probe_labels = state_dict.get("probe_labels")  # absent before labels were kept: read at first use
        self.history = list(state_dict["history"])
        self._generator_state = state_dict["generator_state"]
        self._last_step = state_dict["last_step"]
        self._unverified_probes = not saved and probes is not None
