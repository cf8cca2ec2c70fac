"""FisherSpectralNorm as a torchmetrics Metric: accumulation, reductions, grad-disabled update, Lightning use."""
import pytest
import torch

import fim_lightning as fl
from tests.conftest import make_cnn
from tests.lightning_helpers import TinyClassifier, loaders, trainer


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, 8, 8, generator=gen) for n in (3, 5, 4)]


def test_accumulates_per_sample_values_across_batches():
    model, batches = make_cnn(), _batches()
    reference = fl.fisher_spectral_norm(model, torch.cat(batches)).float()
    metrics = {r: fl.FisherSpectralNorm(reduction=r) for r in ("mean", "median", "max", "none", 0.9)}
    with torch.no_grad():  # torchmetrics runs update with grad disabled; so may the user
        for x in batches:
            for metric in metrics.values():
                metric.update(model, x)
    torch.testing.assert_close(metrics["none"].compute(), reference)
    torch.testing.assert_close(metrics["mean"].compute(), reference.mean())
    torch.testing.assert_close(metrics["median"].compute(), reference.quantile(0.5))
    torch.testing.assert_close(metrics["max"].compute(), reference.max())
    torch.testing.assert_close(metrics[0.9].compute(), reference.quantile(0.9))


def test_forward_returns_the_batch_value_and_keeps_accumulating():
    model, batches = make_cnn(), _batches()
    metric = fl.FisherSpectralNorm(method="lanczos")
    batch_value = metric(model, batches[0])
    torch.testing.assert_close(batch_value, fl.fisher_spectral_norm(model, batches[0]).float().mean(), rtol=1e-4,
                               atol=0)
    metric(model, batches[1])
    reference = fl.fisher_spectral_norm(model, torch.cat(batches[:2])).float().mean()
    torch.testing.assert_close(metric.compute(), reference, rtol=1e-4, atol=0)
    metric.reset()
    assert metric.values == []


def test_declared_properties_and_plot():
    metric = fl.FisherSpectralNorm()
    assert metric.higher_is_better is False and metric.is_differentiable is False and metric.full_state_update is False
    metric.update(make_cnn(), _batches()[0])
    figure, ax = metric.plot()
    assert ax.get_title() or figure is not None
    with pytest.raises(ValueError, match="reduction"):
        fl.FisherSpectralNorm(reduction="mode")
    with pytest.raises(ValueError, match="quantile"):
        fl.FisherSpectralNorm(reduction=1.5)
    with pytest.raises(ValueError, match="method"):
        fl.FisherSpectralNorm(method="svd")


def test_in_a_lightning_module_without_registering_the_model_twice(tmp_path):
    model = TinyClassifier(with_metric=True)
    keys = set(model.state_dict())
    assert keys == {k for k in keys if k.startswith("net.")}
    train, val = loaders()
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, train, val)
    reference = fl.fisher_spectral_norm(model.net, val.dataset.tensors[0], mode="eval").float().mean()
    torch.testing.assert_close(run.callback_metrics["val_fim"], reference, rtol=1e-5, atol=0)
    results = run.validate(model, val)
    assert results[0]["val_fim"] == pytest.approx(reference.item(), rel=1e-5)


# torchmetrics' own conventions (the checks of its MetricTester: class against functional, precision,
# pickling, scriptability; DDP is tests/test_ddp.py and tests/test_matrix.py)
@pytest.mark.parametrize("reduction", ["mean", "median", "max", 0.9, "none"])
def test_the_metric_equals_its_functional_twin(reduction):
    model, batches = make_cnn(), _batches()
    metric = fl.FisherSpectralNorm(reduction=reduction)
    for x in batches:
        metric.update(model, x)
    twin = fl.fisher_spectral_norm(model, torch.cat(batches), reduction=reduction)
    torch.testing.assert_close(metric.compute(), twin.float(), rtol=1e-5, atol=0)


def test_median_is_numpy_median_on_even_counts():
    import numpy as np

    model, batches = make_cnn(), _batches()[:2]  # 8 samples
    metric = fl.FisherSpectralNorm(reduction="median")
    for x in batches:
        metric.update(model, x)
    values = fl.fisher_spectral_norm(model, torch.cat(batches)).float().numpy()
    assert metric.compute().item() == pytest.approx(float(np.median(values)), rel=1e-6)


def test_pickles_scripts_and_takes_any_input_precision():
    import pickle

    model, batches = make_cnn(), _batches()
    metric = fl.FisherSpectralNorm()
    metric.update(model, batches[0])
    restored = pickle.loads(pickle.dumps(metric))
    restored.update(model, batches[1])
    metric.update(model, batches[1])
    torch.testing.assert_close(restored.compute(), metric.compute())
    torch.jit.script(fl.FisherSpectralNorm())  # no string annotations TorchScript cannot resolve
    reference = fl.fisher_spectral_norm(model, batches[0]).float().mean()
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        value = fl.FisherSpectralNorm()(model, batches[0].to(dtype))
        rtol = 1e-5 if dtype == torch.float64 else 5e-2  # half inputs are rounded, then scored in float32
        torch.testing.assert_close(value, reference, rtol=rtol, atol=0)


def test_a_non_finite_sample_is_named_and_left_out_of_the_reduction():
    """A blank image through per-image standardisation has no Fisher information: NaN and a warning for it,
    and the epoch's value is the reduction of the others (as the callback's summaries), in metric and twin."""
    base = make_cnn()
    standardise = lambda x: base((x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True))  # noqa: E731
    x = _batches()[1]
    x[3] = 0.5
    metric = fl.FisherSpectralNorm(reduction="median")
    with pytest.warns(RuntimeWarning, match="sample 3 of the batch"):
        metric.update(standardise, x)
    finite = fl.fisher_spectral_norm(standardise, x[[0, 1, 2, 4]]).float()
    torch.testing.assert_close(metric.compute(), finite.quantile(0.5))
    with pytest.warns(RuntimeWarning, match="sample 3 of the batch"):
        torch.testing.assert_close(fl.fisher_spectral_norm(standardise, x, reduction="median").float(),
                                   finite.quantile(0.5))
