"""Functional options, inputs and models that used to fail deep inside torch: each now names the mistake."""
import pytest
import torch
from torch import nn

import fim_lightning as fl
from fim_lightning.flavours import MisconfigurationException
from tests.lightning_helpers import loaders, trainer


@pytest.mark.parametrize("method, options, error, match", [
    ("hutchinson", {"num_probes": 2.5}, TypeError, "num_probes must be an integer"),
    ("power", {"tol": -1}, ValueError, "tol must be >= 0"),
    ("power", {"max_iter": 0}, ValueError, "max_iter must be >= 1"),
    ("lanczos", {"generator": 123}, TypeError, "generator must be a torch.Generator"),
    ("exact", {"top_k": 0}, ValueError, "top_k must be >= 1"),
    ("exact", {"chunk_size": "4"}, TypeError, "chunk_size must be an integer"),
    ("exact", {"dtype": torch.int64}, ValueError, "dtype must be torch.float32 or torch.float64"),
])
def test_functional_options_are_validated_by_name(method, options, error, match):
    with pytest.raises(error, match=match):
        fl.fisher_spectral_norm(nn.Linear(4, 3), torch.randn(2, 4), method, **options)


def test_trace_dtype_is_validated():
    with pytest.raises(ValueError, match="dtype must be"):
        fl.fisher_trace(nn.Linear(4, 3), torch.randn(2, 4), dtype=torch.int64)


def test_meta_inputs_are_named():
    with pytest.raises(ValueError, match="meta device"):
        fl.fisher_spectral_norm(nn.Linear(4, 3), torch.randn(2, 4, device="meta"))


def test_parameters_created_under_inference_mode_are_scored_and_left_as_they_were():
    with torch.inference_mode():
        net = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    reference = nn.Linear(4, 3)
    reference.load_state_dict({k: v.clone() for k, v in net.state_dict().items()})
    torch.testing.assert_close(fl.fisher_spectral_norm(net, x), fl.fisher_spectral_norm(reference, x))
    assert all(p.is_inference() and p.requires_grad for p in net.parameters())


class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_a_layer_without_forward_mode_points_to_the_exact_method():
    torch.manual_seed(0)
    model, x = _LSTMClassifier().eval(), torch.randn(2, 3, 4)
    with pytest.raises(NotImplementedError, match="use method='exact'"):
        fl.fisher_spectral_norm(model, x, "power")
    assert torch.isfinite(fl.fisher_spectral_norm(model, x, "exact")).all()



def test_a_module_whose_forward_takes_a_dict_points_to_model_attribute(tmp_path):
    from tests.lightning_helpers import TinyClassifier

    class DictForward(TinyClassifier):
        def forward(self, batch):
            return self.net(batch["x"])

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self({"x": batch[0]}), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

    train, val = loaders()
    with pytest.raises(MisconfigurationException, match="pass model_attribute="):
        trainer(tmp_path, [fl.FisherRobustnessCallback(num_samples=4)], max_epochs=1).fit(DictForward(), train, val)


def test_a_model_that_mixes_the_batch_gets_nan_and_a_warning():
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x - x.mean(0))

    x = torch.randn(5, 4)
    for method in ("exact", "power"):
        with pytest.warns(RuntimeWarning, match="mixes the samples of a batch"):
            values = fl.fisher_spectral_norm(Centred(), x, method)
        assert torch.isnan(values).all()
    assert torch.isfinite(fl.fisher_spectral_norm(Centred(), x[:1])).all()  # one sample: nothing to mix


def test_every_option_of_every_method_is_validated():
    """The registry reads each algorithm's options from its signature; each one has a check that names it."""
    from fim_lightning.functional import METHODS, OPTION_CHECKS, TRACE_METHODS

    options = set().union(*(method.options for method in (*METHODS.values(), *TRACE_METHODS.values())))
    assert options == set(OPTION_CHECKS)
    assert METHODS["auto"].options == {"max_iter", "tol", "generator", "chunk_size"}
    assert [name for name, method in METHODS.items() if not method.random] == ["exact"]


def test_the_gram_sketch_keeps_its_former_name():
    model, x = nn.Linear(6, 4), torch.randn(3, 6)
    new = fl.fisher_spectral_norm(model, x, "gram_sketch", generator=torch.Generator().manual_seed(0))
    old = fl.fisher_spectral_norm(model, x, "hutchinson", generator=torch.Generator().manual_seed(0))
    assert torch.equal(new, old)
