"""Bad input gets an error that names the problem."""
import pytest
import torch

import fim_lightning as fl
from tests.conftest import make_cnn, make_mlp


@pytest.fixture
def model():
    return make_mlp()


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.full((2, 7), float("nan")), ValueError, "NaN or inf"),
        (torch.full((2, 7), float("inf")), ValueError, "NaN or inf"),
        (torch.ones(2, 7, dtype=torch.int64), TypeError, "floating point"),
        (torch.ones(0, 7), ValueError, "non-empty batch"),
        (torch.ones(7), ValueError, "batch"),
        ([[0.0] * 7], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(model, inputs, error, match):
    with pytest.raises(error, match=match):
        fl.fisher_spectral_norm(model, inputs)


@pytest.mark.parametrize(
    "forward, output, error, match",
    [
        (lambda x: x.sum(1), "logits", ValueError, r"\(B, C\)"),
        (lambda x: x[:, :1], "logits", ValueError, "C >= 2"),
        (lambda x: (x[:, :3], x), "logits", TypeError, "tuple"),
        (lambda x: x[:, :3].abs(), "probs", ValueError, "not probability vectors"),
        (lambda x: x[:, :3], "log_probs", ValueError, "logsumexp"),
        (lambda x: x[:, :3], "scores", ValueError, "output must be one of"),
    ],
)
def test_bad_model_outputs(forward, output, error, match):
    with pytest.raises(error, match=match):
        fl.fisher_spectral_norm(forward, torch.randn(2, 7), output=output)


def test_hugging_face_style_outputs_are_read_from_logits():
    base = make_mlp()
    x = torch.randn(3, 7)
    def wrapped(inputs):
        return {"logits": base(inputs)}

    torch.testing.assert_close(fl.fisher_spectral_norm(wrapped, x), fl.fisher_spectral_norm(base, x))


def test_mismatched_vectors(model):
    x = torch.randn(2, 7)
    with pytest.raises(ValueError, match=r"inputs' shape \(2, 7\)"):
        fl.fisher_vector_product(model, x, torch.randn(2, 6))
    with pytest.raises(ValueError, match="finite"):
        fl.fisher_vector_product(model, x, torch.full((2, 7), float("nan")))


def test_unknown_method_and_option(model):
    x = torch.randn(2, 7)
    with pytest.raises(ValueError, match="method must be one of"):
        fl.fisher_spectral_norm(model, x, "svd")
    with pytest.raises(TypeError, match=r"\['top_k'\] do not apply to method='power'"):
        fl.fisher_spectral_norm(model, x, "power", top_k=3)
    with pytest.raises(ValueError, match="mode must be"):
        fl.fisher_spectral_norm(model, x, mode="inference")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        fl.fisher_spectral_norm(model, x, "exact", top_k=0)
    with pytest.raises(TypeError, match=r"\['top_k'\] do not apply to method='auto'"):
        fl.fisher_spectral_norm(model, x, top_k=3)  # the default picks its own route
    with pytest.raises(ValueError, match="max_neglected_mass must be <= 1"):
        fl.fisher_spectral_norm(model, x, "exact", top_k=3, max_neglected_mass=2.0)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        fl.fisher_spectral_norm(model, x, "hutchinson", num_probes=0)


def test_error_leaves_the_model_as_it_was():
    model = make_cnn().train()
    with pytest.raises(ValueError):
        fl.fisher_spectral_norm(lambda x: model(x)[:, :1], torch.randn(2, 3, 8, 8), mode="eval")
    assert model.training
