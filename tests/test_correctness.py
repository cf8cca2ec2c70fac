"""Regression tests for the defects of issue 11 ("never a silent wrong number"), each against an independent
reference: dense float64 Jacobians, closed forms, or the same computation in float32 on one process.
The configuration matrix (DDP, bf16, every logger, figure pixels) is `tests/test_matrix.py`."""
import copy
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fim_lightning as fl
from fim_lightning import figures
from recipes import attacks
from recipes import statistics as report
from fim_lightning.blackbox import blackbox_fisher, numpy_predictor
from fim_lightning.module import FisherRegularizedClassifier
from fim_lightning.sampling import random_unit
from tests.conftest import dense_fisher, make_cnn, make_mlp
from tests.lightning_helpers import TinyClassifier, blobs, loaders, trainer

ROOT = Path(__file__).resolve().parents[1]


def _dense_spectral(model, x):
    return torch.linalg.eigvalsh(dense_fisher(model, x))[:, -1]


# -- 2. eigenvector images: grey 0, red +, blue - -------------------------------------------------------------
def test_eigenvector_images_are_signed_colour_with_grey_zero():
    v = torch.zeros(1, 3, 4, 4)
    v[0, :, 0, 0] = 1.0   # positive, the largest magnitude: saturated red
    v[0, :, 3, 3] = -0.5  # negative, half the magnitude: half-way to blue
    image = figures.signed_rgb(v)[0]
    assert image.dtype == np.uint8 and image.shape == (4, 4, 3)
    np.testing.assert_array_equal(image[0, 0], figures.RED)
    np.testing.assert_array_equal(image[3, 3], np.rint((figures.GREY + figures.BLUE) / 2))
    np.testing.assert_array_equal(image[1, 1], figures.GREY)
    assert len({tuple(p) for p in image.reshape(-1, 3)}) == 3
    sign_flipped = figures.signed_rgb(-v)[0]  # an eigenvector's sign is arbitrary: colours swap, pattern stays
    assert (sign_flipped[0, 0, 2] > sign_flipped[0, 0, 0]) and (sign_flipped[3, 3, 0] > sign_flipped[3, 3, 2])


# -- 3. the KL penalty under bf16 autocast ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_kl_penalty_with_bf16_logits_equals_the_float32_penalty(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).train(mode == "train")
    x = blobs(n=64).tensors[0]
    reference = fl.FisherKLPenalty(weight=1.0, mode=mode)(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    assert logits.dtype == torch.bfloat16
    reused = fl.FisherKLPenalty(weight=1.0, mode=mode)(net, x, logits=logits)
    # both are the float32 penalty on the same direction: equal up to float32 rounding of the same ops
    torch.testing.assert_close(reused, reference, rtol=1e-5, atol=0)
    # float32 logits are reused: then one forward at x + h u, normalised by its own batch statistics in train
    # mode, exactly the formula d * 2 KL(p(x) || p(x + h u)) / h^2 evaluated here by hand
    logits32 = net(x)
    direction = random_unit(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_p, log_q = logits32.double().log_softmax(-1), net(x + 1e-2 * direction).double().log_softmax(-1)
    by_hand = (x.shape[1] * 2 * (log_p.exp() * (log_p - log_q)).sum(-1) / 1e-4).mean().float()
    torch.testing.assert_close(fl.FisherKLPenalty(weight=1.0, mode=mode)(net, x, logits=logits32), by_hand,
                               rtol=1e-4, atol=0)
    # what reusing the bf16 logits would give: the KL of bf16 against float32 rounding, several times too large
    with torch.no_grad():
        log_p = logits.float().log_softmax(-1)
        log_q = fl.FisherOperator(net.eval(), x).log_probs.float() if mode == "eval" else log_p
    if mode == "eval":
        rounding = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * x[0].numel() * 2 / 1e-2**2
        assert rounding > 2 * reference


# -- 4. a softmax model scored as logits -----------------------------------------------------------------------
def test_a_model_ending_in_softmax_scored_as_logits_warns_white_and_black_box():
    model = nn.Sequential(make_mlp(), nn.Softmax(-1))
    x = torch.randn(4, 7)
    with pytest.warns(RuntimeWarning, match="model seems to end in softmax"):
        fl.fisher_spectral_norm(model, x)
    with pytest.warns(RuntimeWarning, match="model seems to end in softmax"):
        blackbox_fisher(model, x, output="logits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right = fl.fisher_spectral_norm(model, x, output="probs")
    torch.testing.assert_close(right, fl.fisher_spectral_norm(make_mlp(), x), rtol=1e-4, atol=0)


# -- 5. train mode means one per-sample function -----------------------------------------------------------------
def _held_statistics_reference(model, x):
    """The model in eval mode with its BatchNorm running statistics set to the batch's (biased variance)."""
    reference = copy.deepcopy(model).double()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    reference.train()(x.double())
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = x.shape[0] * x.shape[2] * x.shape[3] / (4 ** (m.num_features == 8))  # 8x8 before, 4x4 after pool
            m.running_var *= (n - 1) / n
    return reference.eval()


@pytest.mark.parametrize("method", ["exact", "power", "lanczos"])
def test_train_mode_is_the_fisher_with_the_batch_statistics_held(method):
    model = make_cnn()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = _dense_spectral(_held_statistics_reference(model, x), x)
    options = {"max_iter": 400, "tol": 1e-10} if method != "exact" else {}
    value = fl.fisher_spectral_norm(model, x, method, mode="train", model_dtype=torch.float64, **options)
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=0)
    assert not torch.allclose(value, fl.fisher_spectral_norm(model, x, mode="eval", model_dtype=torch.float64))


def test_train_mode_with_dropout_is_refused_by_the_estimators():
    model = nn.Sequential(make_mlp(), nn.Dropout(0.3))
    with pytest.raises(ValueError, match=r"active dropout \(1\) has no per-sample Fisher"):
        fl.fisher_spectral_norm(model, torch.randn(3, 7), mode="train")


def test_penalty_passes_share_one_dropout_mask():
    """With dropout in train mode, KL(p(x) || p(x + h u)) -> 0 as h -> 0 only if both passes use one mask."""
    net = nn.Sequential(nn.Linear(7, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 4))
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(0))
    small = fl.FisherKLPenalty(weight=1.0, step_size=1e-3, mode="train")(net, x).item()
    smaller = fl.FisherKLPenalty(weight=1.0, step_size=1e-4, mode="train")(net, x).item()
    assert smaller == pytest.approx(small, rel=0.05)  # d 2 KL / h^2 converges; two masks would blow up as 1/h^2


# -- 6. a non-finite Jacobian in one sample ----------------------------------------------------------------------
class _SqrtFeatures(nn.Module):
    """sqrt(|x|) then an MLP: finite outputs everywhere, an infinite derivative where a coordinate is 0."""

    def __init__(self):
        super().__init__()
        self.mlp = make_mlp()

    def forward(self, x):
        return self.mlp(x.abs().sqrt())


@pytest.mark.parametrize("method, options", [("exact", {}), ("power", {"max_iter": 300, "tol": 1e-12}),
                                             ("lanczos", {}), ("hutchinson", {"num_probes": 8})])
def test_a_sample_with_a_non_finite_jacobian_is_nan_and_named_the_others_exact(method, options):
    model = _SqrtFeatures()
    x = torch.rand(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    x[2, 3] = 0.0
    with pytest.warns(RuntimeWarning, match=r"sample 2 of the batch: the Jacobian is not finite"):
        value = fl.fisher_spectral_norm(model, x, method, model_dtype=torch.float64, **options)
    assert torch.isnan(value[2]) and torch.isfinite(value[[0, 1, 3]]).all()
    if method != "hutchinson":
        keep = [0, 1, 3]
        torch.testing.assert_close(value[keep], _dense_spectral(model, x[keep]), rtol=1e-6, atol=0)
    with pytest.warns(RuntimeWarning, match="sample 2"):
        trace = fl.fisher_trace(model, x, model_dtype=torch.float64)
    assert torch.isnan(trace[2]) and torch.isfinite(trace[[0, 1, 3]]).all()


def test_the_callback_survives_a_non_finite_sample_and_summarises_the_rest(tmp_path):
    probes = torch.rand(8, 7, generator=torch.Generator().manual_seed(0)) + 0.5
    probes[5, 0] = 0.0
    data = torch.utils.data.TensorDataset(probes, torch.zeros(8, dtype=torch.long))
    callback = fl.FisherRobustnessCallback(num_samples=8, data=data, model_attribute="features")

    class Module(TinyClassifier):
        def __init__(self):
            super().__init__(dim=7)
            self.features = _SqrtFeatures()

    train = DataLoader(torch.utils.data.TensorDataset(torch.rand(32, 7), torch.arange(32) % 4), batch_size=8)
    module = Module()
    with pytest.warns(RuntimeWarning, match="sample 5 of the batch: the Jacobian is not finite"):
        trainer(tmp_path, [callback], max_epochs=1, logger=False).fit(module, train)
    finite = fl.fisher_spectral_norm(module.features, probes[[0, 1, 2, 3, 4, 6, 7]])
    assert callback.history[-1]["fim/spectral_norm/mean"] == pytest.approx(finite.mean().item(), rel=1e-5)


# -- 7. black-box with a low-precision predictor ---------------------------------------------------------------
def _mlp_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double().eval()
    x = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, fl.fisher_spectral_norm(model, x)


def test_blackbox_step_follows_the_precision_of_the_answers():
    model, x, exact = _mlp_and_exact()
    model32 = copy.deepcopy(model).float()
    # a float32 endpoint fed float64 inputs, its answers handed back as float64 (as a NumPy service would)
    endpoint = numpy_predictor(lambda a: model32(torch.from_numpy(a).float()).softmax(-1).double().numpy())
    estimate = blackbox_fisher(endpoint, x, num_queries=21)  # 20 probes: a complete basis of the 20 inputs
    torch.testing.assert_close(estimate.spectral_norm, exact, rtol=2e-3, atol=0)
    half = lambda z: model32(z.float()).softmax(-1).half()  # noqa: E731  float16 answers
    estimate = blackbox_fisher(half, x.float(), num_queries=22)  # 20 probes + the truncation check's query
    assert estimate.queries.tolist() == [22] * len(x)
    torch.testing.assert_close(estimate.spectral_norm, exact, rtol=0.05, atol=0)


def test_blackbox_refuses_differences_at_the_rounding_level():
    model, x, _ = _mlp_and_exact()
    half = lambda z: model.float()(z.float()).softmax(-1).half()  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"samples 0, 1, 2, 3, 4, 5 of the batch: the finite differences are at "
                                            r"the rounding level"):
        estimate = blackbox_fisher(half, x.float(), num_queries=21, step=1e-4)
    assert torch.isnan(estimate.spectral_norm).all() and torch.isnan(estimate.trace).all()


# -- 8. every option of every public constructor ---------------------------------------------------------------
@pytest.mark.parametrize("make, error, match", [
    (lambda: fl.FisherKLPenalty(mode="Train"), ValueError, r"mode must be one of \('train', 'eval'\), got 'Train'"),
    (lambda: fl.FisherTracePenalty(weight=float("nan")), ValueError, "weight must be finite"),
    (lambda: fl.FisherSpectralPenalty(weight=float("inf")), ValueError, "weight must be finite"),
    (lambda: fl.FisherKLPenalty(weight="0.1"), TypeError, "weight must be a real number, got str"),
    (lambda: fl.FisherKLPenalty(weight=-1.0), ValueError, "weight must be >= 0"),
    (lambda: fl.FisherKLPenalty(step_size=0.0), ValueError, "step_size must be > 0"),
    (lambda: fl.FisherKLPenalty(every_n_steps=1.5), TypeError, "every_n_steps must be an integer"),
    (lambda: fl.FisherKLPenalty(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (lambda: fl.FisherKLPenalty(output="logit"), ValueError, "output must be one of"),
    (lambda: fl.FisherKLPenalty(seed=None), TypeError, "seed must be an integer"),
    (lambda: fl.FisherTracePenalty(num_probes=True), TypeError, "num_probes must be an integer"),
    (lambda: fl.FisherSpectralPenalty(eigenvector="lanczos"), ValueError, "eigenvector must be one of"),
    (lambda: fl.FisherSpectralPenalty(steps=0), ValueError, "steps must be >= 1"),
    (lambda: fl.FisherWorstDirectionPenalty(power_steps=-1), ValueError, "power_steps must be >= 0"),
    (lambda: fl.FisherWorstDirectionPenalty(step_size="1e-2"), TypeError, "step_size must be a real number"),
    (lambda: attacks.PGD(norm="L2"), ValueError, "norm must be one of"),
    (lambda: attacks.PGD(step_size=float("nan")), ValueError, "step_size must be finite"),
    (lambda: attacks.PGD(random_start="yes"), TypeError, "random_start must be True or False"),
    (lambda: attacks.CarliniWagnerL2(learning_rate=0), ValueError, "learning_rate must be > 0"),
    (lambda: attacks.TradesPenalty(beta=float("nan")), ValueError, "beta must be finite"),
    (lambda: attacks.TradesPenalty(attack="pgd"), TypeError, "attack must be a PGD"),
    (lambda: fl.FisherSpectralNorm(reduction=1.5), ValueError, "must be <= 1.0"),
    (lambda: fl.FisherSpectralNorm(output="prob"), ValueError, "output must be one of"),
    (lambda: FisherRegularizedClassifier(make_mlp(), 1), ValueError, "num_classes must be >= 2"),
    (lambda: FisherRegularizedClassifier(make_mlp(), 5, penalty="kl"), TypeError, "penalty must be an nn.Module"),
    (lambda: FisherRegularizedClassifier(make_mlp(), 5, scheduler="cosine"), TypeError, "scheduler must be a callable"),
    (lambda: fl.FisherRobustnessCallback(log_figures="no"), MisconfigurationException, "log_figures must be True"),
    (lambda: fl.FisherRobustnessCallback(num_eigenvectors=-1), MisconfigurationException, "num_eigenvectors must be"),
    (lambda: fl.FisherRobustnessCallback(prefix=""), MisconfigurationException, "prefix must be a non-empty string"),
    (lambda: fl.FisherRobustnessCallback(every_n_epochs=0.5), MisconfigurationException, "every_n_epochs must be"),
    (lambda: fl.FisherRobustnessCallback(data=[1, 2]), MisconfigurationException, "data must be a DataLoader"),
    (lambda: fl.FisherRobustnessCallback(input_key=1.0), MisconfigurationException, "input_key must be"),
    (lambda: blackbox_fisher(make_mlp(), torch.randn(2, 7), max_batch=0), ValueError, "max_batch must be >= 1"),
    (lambda: blackbox_fisher(make_mlp(), torch.randn(2, 7), step=-1.0), ValueError, "step must be > 0"),
    (lambda: fl.fisher_spectral_norm(make_mlp(), torch.randn(2, 7), model_dtype=torch.bfloat16), ValueError,
     "model_dtype must be torch.float32 or torch.float64"),
])
def test_every_constructor_option_is_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


# -- 9. resume with another probe set; SIGTERM -----------------------------------------------------------------
def test_resuming_with_another_probe_set_starts_a_new_curve(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = fl.FisherRobustnessCallback(num_samples=12)
    pl.seed_everything(0)
    trainer(tmp_path, [first, checkpoint], max_epochs=2).fit(TinyClassifier(), *loaders())
    for changed in ({"num_samples": 20}, {"seed": 5}):
        resumed = fl.FisherRobustnessCallback(**{"num_samples": 12, **changed})
        with pytest.warns(UserWarning, match="starting a new FIM curve"):
            trainer(tmp_path / str(changed), [resumed], max_epochs=3).fit(
                TinyClassifier(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
        assert [r["step"] for r in resumed.history] == [18]  # only the epoch run after the resume
        assert len(resumed.state_dict()["probe_inputs"]) == resumed.num_samples
        assert resumed.state_dict()["num_samples"] == resumed.num_samples


def test_a_checkpoint_of_the_earlier_format_still_loads():
    callback = fl.FisherRobustnessCallback(num_samples=3)
    older = {"probe_inputs": torch.ones(3, 2), "probe_indices": torch.arange(3), "history": [{"step": 1}],
             "generator_state": torch.Generator().manual_seed(0).get_state(), "last_epoch": 0, "last_step": -1}
    callback.load_state_dict(older)
    assert callback.history == [{"step": 1}] and torch.equal(callback.state_dict()["probe_inputs"], torch.ones(3, 2))


def test_fim_train_stopped_by_sigterm_exits_non_zero_with_its_fim_outputs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "recipes.train", "trainer.max_epochs=4", f"hydra.run.dir={tmp_path}",
         "+trainer.enable_progress_bar=false", "+callbacks.stop._target_=tests.lightning_helpers.SigtermAtStep",
         "+callbacks.stop.step=30"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    history = (tmp_path / "fim_history.json").read_text()
    assert '"fim/spectral_norm/mean"' in history and (tmp_path / "fim_curve.png").stat().st_size > 1000
    assert "stopped by SIGTERM" in out.stdout + out.stderr


def test_sigterm_while_scoring_stops_the_sweep_with_143_and_the_shards_so_far(tmp_path):
    """Lightning's predict loop ignores SIGTERM; the scoring writer stops after the batch on disk, and the
    multirun does not go on to its next job."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "recipes.train", "-m", "seed=0,1", "trainer.max_epochs=1", "logger=csv",
         f"hydra.sweep.dir={tmp_path}", "+trainer.enable_progress_bar=false", "evaluation=fisher_only",
         "evaluation.batch_size=8", "evaluate.num_samples=40", "evaluation.progress=false",
         "+callbacks.stop._target_=tests.lightning_helpers.SigtermAtPrediction", "+callbacks.stop.batch=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert "stopped by SIGTERM" in out.stdout + out.stderr
    assert not (tmp_path / "1").exists() and not (tmp_path / "0" / "done.json").exists()
    assert len(list((tmp_path / "0" / "shards" / "trained").glob("*.csv"))) == 2  # batches 0 and 1, not 5


# -- 10. fim-report inputs -------------------------------------------------------------------------------------
def _scores_table(model, seed, with_attacks=True):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0, size=30)
    table = {"model": np.full(30, model), "data": np.full(30, "blobs"), "regularizer": np.full(30, "none"),
             "seed": np.full(30, seed), "stage": np.full(30, "trained"), "split": np.full(30, "test"),
             "index": np.arange(30.0), "correct": np.ones(30), "radius": x, "lambda_max": 1 / x}
    if with_attacks:
        table.update({"min_perturbation": x / 2, "pgd_linf_robust": (x > 0.5).astype(float),
                      "pgd_l2_robust": (x > 0.3).astype(float)})
    return table


def _report(tmp_path, runs):
    from recipes.report import build_report

    cfg = OmegaConf.create({"runs": runs, "target": "min_perturbation", "scores": ["radius", "lambda_max"],
                            "draws": 20, "output_dir": str(tmp_path / "report")})
    (tmp_path / "report").mkdir(exist_ok=True)
    return build_report(cfg)


def test_report_reads_a_single_path_each_file_once_and_names_bad_files(tmp_path):
    sweep = tmp_path / "sweep"
    for number, model in enumerate("abc"):
        (sweep / str(number)).mkdir(parents=True)
        report.write_table(_scores_table(model, 0), sweep / str(number) / "scores.csv")
    once = _report(tmp_path, str(sweep))  # a plain path, no brackets
    assert "3 runs, 90 evaluated samples" in once
    overlapping = _report(tmp_path, [str(sweep), str(sweep / "0"), str(sweep)])
    assert "3 runs, 90 evaluated samples" in overlapping
    rows = report.read_table([sweep / "0" / "scores.csv"] * 2)
    assert len(rows["index"]) == 30
    (sweep / "2" / "scores.csv").write_text((sweep / "2" / "scores.csv").read_text()[:-40])  # truncated row
    with pytest.raises(ValueError, match=r"sweep/2/scores.csv: line 31 does not have the header's 13 fields"):
        _report(tmp_path, str(sweep))
    (sweep / "2" / "scores.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"sweep/2/scores.csv: not a readable CSV file"):
        _report(tmp_path, str(sweep))
    with pytest.raises(FileNotFoundError, match=r"no such run folder"):
        _report(tmp_path, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"no scores.csv under .*fim-evaluate run_dir"):
        _report(tmp_path, str(tmp_path / "report"))


def test_report_says_what_runs_without_attacks_cannot_support(tmp_path):
    for number, (model, attacked) in enumerate([("a", True), ("b", True), ("c", True), ("d", False)]):
        (tmp_path / "runs" / str(number)).mkdir(parents=True)
        report.write_table(_scores_table(model, 0, attacked), tmp_path / "runs" / str(number) / "scores.csv")
    text = _report(tmp_path, str(tmp_path / "runs"))
    assert "## What these runs cannot support" in text
    assert "- no `min_perturbation` in 1 run(s)" in text and "- no `pgd_l2_robust` in 1 run(s)" in text
    only_unattacked = _report(tmp_path, str(tmp_path / "runs" / "3"))
    assert "Per sample: correlation" not in only_unattacked


# -- 11. dict batches ------------------------------------------------------------------------------------------
class _DictData(Dataset):
    def __init__(self, keys=("image", "label")):
        self.inputs, self.keys = blobs(n=48, seed=1).tensors[0], keys

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return {self.keys[0]: self.inputs[i], self.keys[1]: torch.tensor(i % 4)}


class _TwoFloatTensors(_DictData):
    def __getitem__(self, i):
        return {"features": self.inputs[i], "weights": torch.ones(3)}


def test_dict_samples_find_their_input_or_list_their_keys(tmp_path):
    callback = fl.FisherRobustnessCallback(num_samples=10, data=_DictData())
    model = TinyClassifier()
    trainer(tmp_path, [callback], max_epochs=1, logger=False).fit(model, loaders()[0])
    probes = _DictData().inputs[callback.state_dict()["probe_indices"]]
    reference = fl.fisher_spectral_norm(model, probes)
    assert callback.history[-1]["fim/spectral_norm/mean"] == pytest.approx(reference.mean().item(), rel=1e-5)
    odd = fl.FisherRobustnessCallback(num_samples=4, data=_TwoFloatTensors())
    with pytest.raises(MisconfigurationException, match=r"keys \['features', 'weights'\], none of .*input_key="):
        trainer(tmp_path / "odd", [odd], max_epochs=1, logger=False).fit(TinyClassifier(), loaders()[0])
