"""Fisher penalties: values and gradients against references, BatchNorm/dropout safety, schedules, errors."""
import copy
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import fim_lightning as fl
from fim_lightning.module import FisherRegularizedClassifier
from tests.conftest import dense_fisher, make_cnn, make_mlp
from tests.lightning_helpers import blobs, trainer


def _mlp64():
    return make_mlp().double()


def _x64(n=4):
    return torch.randn(n, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _param_grad(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters()])


def test_trace_penalty_is_unbiased_and_its_gradient_matches_the_dense_trace():
    model, x = _mlp64(), _x64()
    exact = torch.diagonal(dense_fisher(model, x), dim1=1, dim2=2).sum(1).mean()
    penalty = fl.FisherTracePenalty(weight=1.0, num_probes=1000, mode="eval")
    torch.testing.assert_close(penalty(model, x).double(), exact, rtol=0.05, atol=0)
    reference = fl.FisherTracePenalty(weight=1.0, mode="eval")
    # gradient of the exact trace (closed form through exact_trace on a differentiable operator)
    with fl.preserved_state(model, x, mode="eval"):
        op = fl.FisherOperator(model, x, differentiable=True)
        trace = fl.algorithms.exact_trace(op).value.mean()
    exact_grad = _param_grad(model, trace)
    estimate = [torch.zeros_like(g) for g in exact_grad]
    for _ in range(8):  # 8 x 100 probes, one per row of the repeated batch
        for acc, g in zip(estimate, _param_grad(model, reference(model, x.repeat(100, 1)))):
            acc += g / 8
    for a, b in zip(estimate, exact_grad):
        assert (a - b).norm() <= 0.15 * b.norm()


@pytest.mark.parametrize("eigenvector", ["exact", "power"])
def test_spectral_penalty_value_and_gradient_match_finite_differences(eigenvector):
    model, x = _mlp64(), _x64(2)
    penalty = fl.FisherSpectralPenalty(weight=1.0, eigenvector=eigenvector, steps=200, mode="eval")
    value = penalty(model, x)
    reference = torch.linalg.eigvalsh(dense_fisher(model, x))[:, -1].mean()
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=0)
    grads = _param_grad(model, penalty(model, x))
    weight = model[0].weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    values = []
    for sign in (1, -1):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted[0].weight += sign * h * direction
        values.append(torch.linalg.eigvalsh(dense_fisher(shifted, x))[:, -1].mean())
    numeric = (values[0] - values[1]) / (2 * h)
    assert (grads[0] * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-4)


def test_kl_penalty_tends_to_the_trace():
    model, x = _mlp64(), _x64()
    exact = torch.diagonal(dense_fisher(model, x), dim1=1, dim2=2).sum(1).mean()
    penalty = fl.FisherKLPenalty(weight=1.0, step_size=1e-4, mode="eval")
    repeated = x.repeat(500, 1)  # each row gets its own random direction
    estimates = torch.stack([penalty(model, repeated).double() for _ in range(6)])
    assert estimates.mean().item() == pytest.approx(exact.item(), rel=0.04)
    with torch.no_grad():
        logits = model(x)
    torch.manual_seed(0)
    a = fl.FisherKLPenalty(weight=1.0, step_size=1e-4, mode="eval", seed=3)(model, x, logits=logits)
    b = fl.FisherKLPenalty(weight=1.0, step_size=1e-4, mode="eval", seed=3)(model, x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("penalty_class", [fl.FisherTracePenalty, fl.FisherSpectralPenalty, fl.FisherKLPenalty])
def test_batchnorm_buffers_rng_and_grads_untouched_in_train_mode(penalty_class):
    model = nn.Sequential(make_cnn(), nn.Dropout(0.3)).train()
    x = torch.randn(6, 3, 8, 8)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    value = penalty_class(weight=1.0)(model, x)
    assert value.requires_grad and torch.isfinite(value)
    for key, buffer in model.state_dict().items():
        assert torch.equal(buffer, buffers[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model[1].training
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_schedule_and_every_n_steps():
    model, x = make_mlp(), torch.randn(4, 7)
    penalty = fl.FisherSpectralPenalty(weight=2.0, warmup_steps=4, every_n_steps=2, mode="eval", eigenvector="exact")
    full = fl.FisherSpectralPenalty(weight=2.0, mode="eval", eigenvector="exact")(model, x)
    assert penalty(model, x, step=1).item() == 0.0
    torch.testing.assert_close(penalty(model, x, step=0), full / 4)
    torch.testing.assert_close(penalty(model, x, step=2), full * 3 / 4)
    torch.testing.assert_close(penalty(model, x, step=10), full)


def test_saturated_and_zero_probability_classes_give_finite_values():
    base = make_mlp()
    saturated = lambda x: 500 * base(x)  # noqa: E731  runner-up probabilities underflow to exactly 0
    x = torch.randn(4, 7) * 3
    for penalty in (fl.FisherTracePenalty(mode="eval"), fl.FisherSpectralPenalty(mode="eval"),
                    fl.FisherKLPenalty(mode="eval")):
        value = penalty(saturated, x)
        assert torch.isfinite(value) and value >= 0
    probs = lambda x: torch.nn.functional.one_hot(base(x).argmax(1), 5).float()  # noqa: E731
    assert fl.FisherTracePenalty(mode="eval", output="probs")(probs, x).item() == 0.0


def test_bad_arguments_and_nan_inputs():
    with pytest.raises(ValueError, match="num_probes"):
        fl.FisherTracePenalty(num_probes=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        fl.FisherKLPenalty(every_n_steps=0)
    with pytest.raises(ValueError, match="NaN"):
        fl.FisherTracePenalty()(make_mlp(), torch.full((2, 7), float("nan")))
    nan_model = lambda x: make_mlp()(x) * float("nan")  # noqa: E731
    with pytest.warns(RuntimeWarning, match="samples 0, 1 of the batch: the model output is not finite"), \
            pytest.raises(FloatingPointError, match="FisherKLPenalty is nan"):
        fl.FisherKLPenalty(mode="eval")(nan_model, torch.randn(2, 7))


def _fit_regularized(tmp_path, penalty, **kwargs):
    pl.seed_everything(0, workers=True)
    net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    module = FisherRegularizedClassifier(net, num_classes=4, penalty=penalty)
    data = torch.utils.data.DataLoader(blobs(), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(blobs(n=48, seed=1), batch_size=16)
    run = trainer(tmp_path, [fl.FisherRobustnessCallback(num_samples=24, model_attribute="net", log_figures=False)],
                  max_epochs=4, **kwargs)
    run.fit(module, data, val)
    return module, run


def test_regularized_classifier_lowers_the_fisher_spectral_norm(tmp_path):
    _, plain = _fit_regularized(tmp_path / "plain", None)
    _, regularized = _fit_regularized(tmp_path / "reg", fl.FisherSpectralPenalty(weight=20.0))
    assert "train/fisher_penalty" in regularized.callback_metrics
    key = "fim/spectral_norm/mean"
    assert regularized.callback_metrics[key] < 0.7 * plain.callback_metrics[key]


def test_scheduler_is_stepped_once_per_epoch(tmp_path):
    """A partial scheduler gets the module's optimizer and is stepped per epoch: cosine over 4 epochs ends at
    lr * (1 + cos(pi * 3 / 4)) / 2 in the last epoch and leaves lr * (1 + cos(pi)) / 2 = 0 after it."""
    seen = []

    class Rates(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    pl.seed_everything(0, workers=True)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    module = FisherRegularizedClassifier(net, num_classes=4, optimizer=partial(torch.optim.SGD, lr=0.1),
                                         scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4))
    run = trainer(tmp_path, [Rates()], max_epochs=4)
    run.fit(module, torch.utils.data.DataLoader(blobs(), batch_size=16))
    assert seen == pytest.approx([0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)])
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_scheduled_training_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, precision):
    """As users train: a cosine schedule, the default logger (TensorBoard) with `LearningRateMonitor`, a checkpoint
    after 2 of 4 epochs, `fit(ckpt_path=...)`. Lightning saves and restores the scheduler, so the resumed run
    ends with the uninterrupted run's parameters, and both log lr (1 + cos(pi e / 4)) / 2 * 0.1 for epochs e."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def fit(folder, epochs, checkpoint=None):
        pl.seed_everything(0, workers=True)
        net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        module = FisherRegularizedClassifier(net, num_classes=4, optimizer=partial(torch.optim.SGD, lr=0.1),
                                             scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4))
        saver = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
        run = trainer(folder, [LearningRateMonitor("epoch"), saver], max_epochs=epochs, precision=precision)
        run.fit(module, torch.utils.data.DataLoader(blobs(), batch_size=16), ckpt_path=checkpoint)
        return module, run

    uninterrupted, whole = fit(tmp_path / "whole", 4)
    fit(tmp_path / "first", 2)
    resumed, second = fit(tmp_path / "second", 4, checkpoint=str(tmp_path / "first" / "checkpoints" / "last.ckpt"))
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rates = [0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)]
    for run, epochs in ((whole, range(4)), (second, range(2, 4))):
        events = EventAccumulator(run.logger.log_dir)
        events.Reload()
        assert [s.value for s in events.Scalars("lr-SGD")] == pytest.approx([rates[e] for e in epochs], rel=1e-6)


@pytest.mark.parametrize("kwargs", [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}])
def test_regularized_training_with_mixed_precision_and_accumulation(tmp_path, kwargs):
    module, run = _fit_regularized(tmp_path, fl.FisherKLPenalty(weight=0.1), **kwargs)
    assert torch.isfinite(run.callback_metrics["train/fisher_penalty"])
    assert all(torch.isfinite(p).all() for p in module.parameters())


# -- the worst-direction penalty (power steps through the KL's input gradient) ---------------------------------
def _top_eigen(model, x):
    evals, evecs = torch.linalg.eigh(dense_fisher(model, x))
    return evals[:, -1], evecs[:, :, -1]


def test_worst_direction_penalty_finds_the_top_eigenvector_and_lambda_max():
    model, x = _mlp64(), _x64()
    lam, top = _top_eigen(model, x)
    cosines = {}
    for steps in (0, 1, 50):
        penalty = fl.FisherWorstDirectionPenalty(weight=1.0, step_size=1e-4, power_steps=steps, mode="eval")
        with fl.preserved_state(model, x, mode="eval") as passes:
            op = fl.FisherOperator(model, x, differentiable=True, passes=passes)
            v = penalty.direction(op, op.log_probs.detach())
        cosines[steps] = (v * top).sum(1).abs()
    assert (cosines[50] > 1 - 1e-6).all()
    assert cosines[1].mean() > cosines[0].mean() + 0.3  # one power step already turns a random start
    converged = fl.FisherWorstDirectionPenalty(weight=1.0, step_size=1e-4, power_steps=50, mode="eval")(model, x)
    torch.testing.assert_close(converged.double(), lam.mean(), rtol=1e-4, atol=0)


def test_worst_direction_penalty_gradient_matches_finite_differences():
    """With v held (no power step: v is the seeded random start), the gradient is that of 2 KL / h^2 (central
    differences of step 1e-3: a KL of h^2 ~ 1e-6 computed from log-probability differences of ~1e-3 carries
    float64 noise of ~1e-7 relative, which a smaller step would amplify); converged (50 steps), it is the
    gradient of lambda_max (Hellmann-Feynman), checked on the dense Fisher."""
    model, x = _mlp64(), _x64(2)
    weight = model[0].weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def shifted(sign, h):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other[0].weight += sign * h * direction
        return other

    fixed = lambda m: fl.FisherWorstDirectionPenalty(weight=1.0, step_size=1e-3, power_steps=0, mode="eval")(m, x)  # noqa: E731
    (grad,) = torch.autograd.grad(fixed(model), [weight])
    numeric = (fixed(shifted(1, 1e-3)) - fixed(shifted(-1, 1e-3))) / 2e-3
    assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-3)
    h = 1e-5
    converged = fl.FisherWorstDirectionPenalty(weight=1.0, step_size=1e-4, power_steps=50, mode="eval")
    (grad,) = torch.autograd.grad(converged(model, x), [weight])
    numeric = (_top_eigen(shifted(1, h), x)[0].mean() - _top_eigen(shifted(-1, h), x)[0].mean()) / (2 * h)
    assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-3)


def test_kl_penalty_refuses_logits_of_other_inputs():
    model, x = _mlp64(), _x64()
    penalty = fl.FisherKLPenalty(weight=1.0, mode="eval")
    with torch.no_grad():
        own, other = model(x), model(x.flip(0))
    again = fl.FisherKLPenalty(weight=1.0, mode="eval")  # the same seed: the same direction
    assert penalty(model, x, logits=own).item() == pytest.approx(again(model, x).item(), rel=1e-6)
    with pytest.raises(ValueError, match="are not the model's logits of `inputs`"):
        penalty(model, x, logits=other)
