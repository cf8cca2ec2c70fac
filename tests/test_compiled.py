"""`torch.compile`d models and `channels_last` memory: every entry point gives the eager model's values.

The guard runs a compiled model (or a LightningModule with a compiled submodule) through its eager modules
(`torch.compiler.set_stance("force_eager")`): inductor's second derivatives of a penalty were measured wrong
(FisherTracePenalty's parameter gradient 125% off on a small CNN, on the first call), and every transform would
recompile. The references are the same models uncompiled, in contiguous memory.
"""
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import fim_lightning as fl
from fim_lightning.functional import robust_distances
from tests.conftest import make_cnn
from tests.lightning_helpers import TinyClassifier, loaders, trainer

PENALTIES = (fl.FisherTracePenalty, fl.FisherSpectralPenalty, fl.FisherWorstDirectionPenalty, fl.FisherKLPenalty)


@pytest.fixture(scope="module")
def cnn():
    net = make_cnn().eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(net)
    compiled(x)  # compiled once, as in training
    return net, compiled, x


def _gradients(penalty_class, model, x, parameters):
    for p in parameters:
        p.grad = None
    penalty_class()(model, x).backward()
    return [p.grad.clone() for p in parameters]


def test_scores_and_robust_distances_of_a_compiled_model_are_the_eager_ones(cnn):
    net, compiled, x = cnn
    for method in ("auto", "lanczos"):
        torch.testing.assert_close(fl.fisher_spectral_norm(compiled, x, method),
                                   fl.fisher_spectral_norm(net, x, method), rtol=1e-10, atol=0)
    eager, fast = fl.fisher_scores(net, x), fl.fisher_scores(compiled, x)
    torch.testing.assert_close(fast.trace, eager.trace, rtol=1e-10, atol=0)
    torch.testing.assert_close(fast.radius, eager.radius, rtol=1e-10, atol=0)
    distances = robust_distances(compiled, x, ("l2", "linf"), bounds=(0.0, 1.0))
    for norm, value in robust_distances(net, x, ("l2", "linf"), bounds=(0.0, 1.0)).items():
        torch.testing.assert_close(distances[norm], value, rtol=1e-10, atol=0)
    metric = fl.FisherSpectralNorm()
    metric.update(compiled, x)
    torch.testing.assert_close(metric.compute().double(), fl.fisher_spectral_norm(net, x).mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("penalty_class", PENALTIES, ids=lambda c: c.__name__)
def test_penalty_gradients_through_a_compiled_model_are_the_eager_ones(cnn, penalty_class):
    net, compiled, x = cnn
    parameters = list(net.parameters())
    reference = _gradients(penalty_class, net, x, parameters)
    for got, want in zip(_gradients(penalty_class, compiled, x, parameters), reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert torch.compiler.is_compiling() is False


def test_a_compiled_submodule_inside_a_wrapper_gets_the_eager_penalty_gradient(cnn):
    net, _, x = cnn

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.compile(net)

        def forward(self, inputs):
            return self.body(inputs)

    parameters = list(net.parameters())
    reference = _gradients(fl.FisherTracePenalty, net, x, parameters)
    for got, want in zip(_gradients(fl.FisherTracePenalty, Wrapper(), x, parameters), reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_channels_last_model_and_inputs_give_the_contiguous_values(cnn):
    net, _, x = cnn
    last = make_cnn().eval().to(memory_format=torch.channels_last)
    last.load_state_dict(net.state_dict())
    x_last = x.contiguous(memory_format=torch.channels_last)
    pair, reference = fl.fisher_top_eigenpair(last, x_last), fl.fisher_top_eigenpair(net, x)
    torch.testing.assert_close(pair.eigenvalue, reference.eigenvalue, rtol=1e-5, atol=0)
    torch.testing.assert_close(fl.fisher_spectral_norm(last, x_last, "lanczos"),
                               fl.fisher_spectral_norm(net, x, "lanczos"), rtol=1e-5, atol=0)
    cosine = (pair.eigenvector.flatten(1) * reference.eigenvector.flatten(1)).sum(1).abs()
    assert (cosine > 1 - 1e-4).all()
    for penalty_class in (fl.FisherTracePenalty, fl.FisherSpectralPenalty):
        got = _gradients(penalty_class, last, x_last, list(last.parameters()))
        want = _gradients(penalty_class, net, x, list(net.parameters()))
        scale = max(b.abs().max().item() for b in want)  # float32 noise is relative to the largest gradient
        for a, b in zip(got, want):
            torch.testing.assert_close(a.contiguous(), b, rtol=1e-4, atol=1e-5 * scale)


def test_the_callback_on_a_lightning_module_with_a_compiled_submodule_logs_the_eager_values(tmp_path):
    """Trained compiled (its weights differ from an eager run's by the kernels' rounding), then the logged
    values are checked against the same weights in the uncompiled module."""
    pl.seed_everything(0, workers=True)
    module = TinyClassifier()
    eager = module.net
    module.net = torch.compile(eager)
    callback = fl.FisherRobustnessCallback(num_samples=16, log_figures=False)
    train, val = loaders()
    trainer(tmp_path, [callback], max_epochs=1, logger=False).fit(module, train, val)
    probes = callback.state_dict()["probe_inputs"]
    last = callback.history[-1]
    assert last["fim/spectral_norm/mean"] == pytest.approx(
        fl.fisher_spectral_norm(eager, probes, mode="eval").mean().item(), rel=1e-5)
    assert last["fim/trace/mean"] == pytest.approx(fl.fisher_trace(eager, probes, mode="eval").mean().item(), rel=1e-5)
