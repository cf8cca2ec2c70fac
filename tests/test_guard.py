"""Nothing the caller owns changes: modes, BatchNorm buffers, .grad, requires_grad, RNG, grad mode, kernels."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fim_lightning as fl
from tests.conftest import make_attention, make_cnn

METHOD_OPTIONS = {
    "exact": {},
    "power": {"max_iter": 5},
    "lanczos": {"max_iter": 5},
    "hutchinson": {"num_probes": 4},
}


def _snapshot(model):
    return {
        "training": [m.training for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before, after):
    assert before["training"] == after["training"]
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    assert all(a is b for a, b in zip(before["grads"], after["grads"]))
    for a, b in zip(before["grad_values"], after["grad_values"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["requires_grad"] == after["requires_grad"]
    assert torch.equal(before["rng"], after["rng"])


def _model_with_user_state():
    model = nn.Sequential(make_cnn(), nn.Dropout(0.5)).train()
    model[0][0].weight.requires_grad_(False)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    return model


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_user_state_is_untouched(method):
    model = _model_with_user_state()
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    before = _snapshot(model)
    fl.fisher_spectral_norm(model, x, method, mode="eval", **METHOD_OPTIONS[method])
    with pytest.raises(ValueError, match=r"active dropout \(1\) has no per-sample Fisher"):
        fl.fisher_spectral_norm(model, x, method, mode="train", **METHOD_OPTIONS[method])
    fl.fisher_spectral_norm(model[0], x, method, mode="train", **METHOD_OPTIONS[method])  # BatchNorm, no dropout
    fl.fisher_trace(model, x, mode="eval")
    fl.fisher_vector_product(model, x, v, mode="eval")
    fl.fisher_robustness_radius(model, x, mode="eval")
    _assert_same(before, _snapshot(model))


def test_train_mode_uses_batch_statistics_without_touching_buffers():
    model = make_cnn()
    x = torch.randn(6, 3, 8, 8)
    before = _snapshot(model)
    eval_value = fl.fisher_spectral_norm(model, x, mode="eval")
    train_value = fl.fisher_spectral_norm(model, x, mode="train")
    assert not torch.allclose(eval_value, train_value)
    _assert_same(before, _snapshot(model))


def test_a_model_in_train_mode_warns_unless_the_mode_is_explicit():
    model = make_cnn().train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="train mode") as record:
        implicit = fl.fisher_spectral_norm(model, x)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = fl.fisher_spectral_norm(model, x, mode="eval")
    torch.testing.assert_close(implicit, explicit)
    assert model.training


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_the_callers_no_grad_and_inference_mode(context):
    model = make_cnn()
    x = torch.randn(3, 3, 8, 8)
    reference = fl.fisher_spectral_norm(model, x)
    with context():
        inner_x = x.clone()  # an inference tensor under inference_mode
        value = fl.fisher_spectral_norm(model, inner_x)
        lanczos = fl.fisher_spectral_norm(model, inner_x, "lanczos")
        assert torch.is_grad_enabled() is False
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(lanczos, reference, rtol=1e-4, atol=0)


def test_autocast_of_the_caller_does_not_lower_precision():
    model = make_cnn()
    x = torch.randn(3, 3, 8, 8)
    reference = fl.fisher_spectral_norm(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fl.fisher_spectral_norm(model, x)
    torch.testing.assert_close(value, reference)


def test_half_precision_inputs_are_scored_in_float32():
    model = make_cnn()
    x = torch.randn(3, 3, 8, 8)
    half_model = make_cnn().to(torch.bfloat16)
    value = fl.fisher_spectral_norm(half_model, x.to(torch.bfloat16))
    reference = fl.fisher_spectral_norm(model, x.to(torch.bfloat16).float())
    assert next(half_model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(value, reference, rtol=0.05, atol=0)


def test_attention_runs_on_cpu_and_kernel_settings_are_restored():
    model = make_attention()
    x = torch.randn(2, 5, 8)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    for method in ("exact", "power", "lanczos", "hutchinson"):
        assert torch.isfinite(fl.fisher_spectral_norm(model, x, method, **METHOD_OPTIONS[method])).all()
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


def test_torchvision_resnet_and_vit_agree_across_methods():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: F would be 0
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model in (resnet, vit):
        before = _snapshot(model)
        exact = fl.fisher_spectral_norm(model, x)
        lanczos = fl.fisher_spectral_norm(model, x, "lanczos")
        assert (exact > 1e-6).all()
        torch.testing.assert_close(lanczos, exact, rtol=1e-4, atol=0)
        _assert_same(before, _snapshot(model))


def test_timm_vit_on_cpu_matches_the_dense_reference():
    import timm  # a dev dependency

    from tests.conftest import dense_fisher

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=5,
                              depth=2, embed_dim=32, num_heads=2).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = _snapshot(model)
    reference = torch.linalg.eigvalsh(dense_fisher(model, x))[:, -1]
    torch.testing.assert_close(fl.fisher_spectral_norm(model, x, model_dtype=torch.float64), reference, rtol=1e-8,
                               atol=0)
    torch.testing.assert_close(fl.fisher_spectral_norm(model, x, "lanczos"), reference, rtol=1e-4, atol=0)
    _assert_same(before, _snapshot(model))


PRECISION_SCRIPT = r"""
import json, sys, torch, fim_lightning as fl
B = torch.backends

def reads():
    out = {}
    for name, read in [("legacy matmul", lambda: B.cuda.matmul.allow_tf32),
                       ("legacy cudnn", lambda: B.cudnn.allow_tf32),
                       ("matmul precision", torch.get_float32_matmul_precision),
                       *[(f"{owner} fp32_precision", lambda o=o: o.fp32_precision) for owner, o in [
                           ("cuda.matmul", B.cuda.matmul), ("cudnn.conv", B.cudnn.conv), ("cudnn.rnn", B.cudnn.rnn),
                           ("mkldnn.matmul", B.mkldnn.matmul), ("mkldnn.conv", B.mkldnn.conv)]]]:
        try:
            out[name] = read()
        except RuntimeError as error:  # torch refuses to read a legacy flag after a mix of the two APIs
            out[name] = "unreadable"
    return out

class Recorder(torch.nn.Linear):
    def forward(self, x):
        seen.append([B.cuda.matmul.fp32_precision, B.cudnn.conv.fp32_precision, B.mkldnn.matmul.fp32_precision])
        return super().forward(x)

setting = sys.argv[1]
if setting == "legacy":
    B.cuda.matmul.allow_tf32 = True
    B.cudnn.allow_tf32 = True
elif setting == "lightning":
    torch.set_float32_matmul_precision("high")
elif setting == "new":
    B.cuda.matmul.fp32_precision = "tf32"
    B.mkldnn.matmul.fp32_precision = "bf16"
before = reads()
seen = []
net = Recorder(4, 3)
fl.fisher_spectral_norm(net, torch.randn(2, 4))
scoring = seen[:]
seen.clear()
fl.FisherTracePenalty()(net, torch.randn(2, 4)).backward()
print(json.dumps({"before": before, "after": reads(), "scoring": scoring, "penalty": seen}))
"""


@pytest.mark.parametrize("setting", ["default", "legacy", "lightning", "new"])
def test_scoring_runs_in_true_float32_and_restores_the_callers_precision_flags(setting):
    """TF32 (cuDNN convolutions by default, matmuls after Lightning's `set_float32_matmul_precision("high")`) and
    bf16 splitting are off while a value is scored, through the API the caller used or not; the caller's flags
    read back the same afterwards; a penalty (a training signal) keeps the caller's kernels."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT, setting], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["after"] == report["before"]
    assert report["scoring"] and all(flags == ["ieee", "ieee", "ieee"] for flags in report["scoring"])
    expected = {"default": "none", "legacy": "tf32", "lightning": "tf32", "new": "tf32"}[setting]
    assert report["penalty"] and all(flags[0] == expected for flags in report["penalty"])
