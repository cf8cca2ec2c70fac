"""The callback's estimated robust accuracy: logged keys against the closed form of a linear model, labels from
tuples and dicts, refusals, the 'keep the most robust checkpoint' recipe with the stock ModelCheckpoint, and
older checkpoints without labels."""
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fim_lightning as fl
from fim_lightning.callback import eps_key
from fim_lightning.flavours import MisconfigurationException
from fim_lightning.module import ImageClassifier
from tests.lightning_helpers import blobs, trainer

EPS = {"l2": [0.1, 0.5, 1.5], "linf": [0.05, 0.3]}


def _closed_form_robust_accuracy(weight, bias, x, y, norm, radius):
    z = x.double() @ weight.double().T + bias.double()
    t = z.argmax(1)
    dual = 2 if norm == "l2" else 1
    distance = torch.stack([min((z[i, t[i]] - z[i, k]) / (weight[t[i]] - weight[k]).double().norm(p=dual)
                                for k in range(len(weight)) if k != t[i]) for i in range(len(x))])
    return ((t == y) & (distance > radius)).double().mean().item()


def _linear_module(lr=0.0):
    torch.manual_seed(0)
    return ImageClassifier(nn.Linear(12, 4), 4, optimizer=partial(torch.optim.SGD, lr=lr))


@pytest.mark.parametrize("line_steps", [0, 8])
def test_logged_robust_accuracy_is_the_linear_closed_form(tmp_path, line_steps):
    callback = fl.FisherRobustnessCallback(num_samples=40, eps=EPS, model_attribute="net", log_figures=False,
                                           line_steps=line_steps)
    module = _linear_module()
    val = blobs(n=48, seed=1)
    trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(blobs(), batch_size=16),
                                                    DataLoader(val, batch_size=16))
    state = callback.state_dict()
    x, y = state["probe_inputs"], state["probe_labels"]
    torch.testing.assert_close(y, torch.stack([val[i][1] for i in state["probe_indices"].tolist()]))
    record = callback.history[-1]
    weight, bias = module.net.weight.detach(), module.net.bias.detach()
    assert record["fim/accuracy"] == pytest.approx((module.net(x).argmax(1) == y).double().mean().item())
    for norm, radii in EPS.items():
        for radius in radii:
            expected = _closed_form_robust_accuracy(weight, bias, x, y, norm, radius)
            assert record[eps_key("fim", norm, radius)] == pytest.approx(expected, abs=1e-12), (norm, radius)
    assert 0 < record[eps_key("fim", "l2", 0.5)] < record["fim/accuracy"]  # the radii are informative


class _Dicts(Dataset):
    def __init__(self, key="label"):
        self.data, self.key = blobs(n=48, seed=1), key

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, self.key: y}


def test_labels_come_from_dict_samples_and_label_key(tmp_path):
    for key, label_key in (("label", None), ("cls", "cls")):
        callback = fl.FisherRobustnessCallback(num_samples=8, data=_Dicts(key), label_key=label_key,
                                               model_attribute="net", log_figures=False)
        trainer(tmp_path, [callback], max_epochs=1).fit(_linear_module(), DataLoader(blobs(), batch_size=16))
        assert "fim/accuracy" in callback.history[-1] and eps_key("fim", "linf", 8 / 255) in callback.history[-1]


class _Unlabelled(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return blobs(n=20, seed=1)[i][0]


def test_without_labels_the_default_is_skipped_with_a_warning_and_an_explicit_eps_raises(tmp_path):
    callback = fl.FisherRobustnessCallback(num_samples=8, data=_Unlabelled(), model_attribute="net", log_figures=False)
    with pytest.warns(UserWarning, match="carry no labels"):
        trainer(tmp_path, [callback], max_epochs=1).fit(_linear_module(), DataLoader(blobs(), batch_size=16))
    assert not [key for key in callback.history[-1] if "accuracy" in key]
    explicit = fl.FisherRobustnessCallback(num_samples=8, data=_Unlabelled(), model_attribute="net", eps=EPS)
    with pytest.raises(MisconfigurationException, match="carry no label"):
        trainer(tmp_path, [explicit], max_epochs=1).fit(_linear_module(), DataLoader(blobs(), batch_size=16))
    off = fl.FisherRobustnessCallback(num_samples=8, data=_Unlabelled(), model_attribute="net", eps={},
                                      log_figures=False)
    trainer(tmp_path, [off], max_epochs=1).fit(_linear_module(), DataLoader(blobs(), batch_size=16))
    assert "fim/spectral_norm/mean" in off.history[-1]


@pytest.mark.parametrize("eps, match", [({"l1": [0.1]}, "eps keys must be norms"), ({"l2": [-1.0]}, "eps must be >= 0"),
                                        ([0.1], "eps must be a mapping"), ({"l2": []}, "non-empty sequence")])
def test_bad_eps_is_named(eps, match):
    with pytest.raises(MisconfigurationException, match=match):
        fl.FisherRobustnessCallback(eps=eps)


def test_model_checkpoint_keeps_the_most_robust_epoch(tmp_path):
    key = eps_key("fim", "l2", 0.5)
    callback = fl.FisherRobustnessCallback(num_samples=32, model_attribute="net", log_figures=False, eps=EPS)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="max", filename="{epoch}")
    pl.seed_everything(0)
    trainer(tmp_path, [callback, best], max_epochs=4).fit(
        _linear_module(lr=0.05), DataLoader(blobs(), batch_size=16, shuffle=True), DataLoader(blobs(n=48, seed=1),
                                                                                            batch_size=16))
    values = [record[key] for record in callback.history]
    assert best.best_model_score.item() == pytest.approx(max(values))
    assert best.best_model_path.endswith(f"epoch={values.index(max(values))}.ckpt")


def test_an_older_checkpoint_without_labels_reads_them_from_the_held_out_data(tmp_path):
    first = fl.FisherRobustnessCallback(num_samples=8, model_attribute="net", log_figures=False)
    val = DataLoader(blobs(n=48, seed=1), batch_size=16)
    trainer(tmp_path, [first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=1).fit(
        _linear_module(), DataLoader(blobs(), batch_size=16), val)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    del checkpoint["callbacks"][first.state_key]["probe_labels"]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    resumed = fl.FisherRobustnessCallback(num_samples=8, model_attribute="net", log_figures=False)
    trainer(tmp_path / "r", [resumed], max_epochs=2).fit(_linear_module(), DataLoader(blobs(), batch_size=16), val,
                                                         ckpt_path=str(tmp_path / "older.ckpt"))
    torch.testing.assert_close(resumed.state_dict()["probe_labels"], first.state_dict()["probe_labels"])
    assert [("fim/accuracy" in r) for r in resumed.history] == [True, True]


def _exact_linear_attack(norm, radius):
    """The optimal attack on a linear model: the closed-form nearest boundary point, pushed just past it,
    scaled back into the eps-ball."""
    def attack(model, x, y):
        w = model.weight.detach()
        z = model(x)
        out = x.clone()
        for i in range(len(x)):
            best = None
            for k in range(len(w)):
                if k == y[i]:
                    continue
                g = w[y[i]] - w[k]
                m = z[i, y[i]] - z[i, k]
                step = m / g.norm(p=2 if norm == "l2" else 1)
                direction = -g / g.norm() if norm == "l2" else -g.sign()
                if best is None or step < best[0]:
                    best = (step, direction)
            step, direction = best
            out[i] = x[i] + min(max(step.item(), 0.0) * 1.001, radius) * direction  # misclassified: x
        return out.detach()
    return attack


def test_attack_calibration_logs_the_attack_beside_the_estimate_on_the_same_probes(tmp_path):
    attacks = {"l2/0.5": _exact_linear_attack("l2", 0.5), "linf/0.3": _exact_linear_attack("linf", 0.3)}
    callback = fl.FisherRobustnessCallback(num_samples=40, eps=EPS, model_attribute="net", log_figures=False,
                                           attacks=attacks, attack_samples=24, attack_every_n=2)
    module = _linear_module()
    trainer(tmp_path, [callback], max_epochs=3).fit(module, DataLoader(blobs(), batch_size=16),
                                                    DataLoader(blobs(n=48, seed=1), batch_size=16))
    attacked = [("fim/attack/robust_accuracy/l2/0.5" in r) for r in callback.history]
    assert attacked == [True, False, True]
    state = callback.state_dict()
    x, y = state["probe_inputs"][:24], state["probe_labels"][:24]
    weight, bias = module.net.weight.detach(), module.net.bias.detach()
    for norm, radius in (("l2", 0.5), ("linf", 0.3)):
        record = callback.history[0]
        expected = _closed_form_robust_accuracy(weight, bias, x, y, norm, radius)
        assert record[f"fim/attack/robust_accuracy/{norm}/{radius:.4g}"] == pytest.approx(expected, abs=1e-12)
        assert record[f"fim/attack/estimate/{norm}/{radius:.4g}"] == pytest.approx(expected, abs=1e-12)
        assert record[f"fim/attack/gap/{norm}/{radius:.4g}"] == pytest.approx(0.0, abs=1e-12)
    assert record["fim/attack/seconds"] > 0


def test_a_large_gap_warns_and_an_attack_outside_the_ball_raises(tmp_path):
    def identity(model, x, y):  # no attack at all: measured robust accuracy = clean accuracy
        return x

    callback = fl.FisherRobustnessCallback(num_samples=40, eps={"l2": [1.5]}, model_attribute="net",
                                           log_figures=False, attacks={"l2/1.5": identity}, attack_gap=0.05)
    with pytest.warns(UserWarning, match=r"the attack measures .* \(gap -"):
        trainer(tmp_path, [callback], max_epochs=1).fit(_linear_module(), DataLoader(blobs(), batch_size=16),
                                                        DataLoader(blobs(n=48, seed=1), batch_size=16))

    def too_far(model, x, y):
        return x + 1.0

    callback = fl.FisherRobustnessCallback(num_samples=8, eps={"linf": [0.3]}, model_attribute="net",
                                           attacks={"linf/0.3": too_far})
    with pytest.raises(MisconfigurationException, match="outside its eps-ball"):
        trainer(tmp_path, [callback], max_epochs=1).fit(_linear_module(), DataLoader(blobs(), batch_size=16),
                                                        DataLoader(blobs(n=48, seed=1), batch_size=16))


def test_attack_keys_must_name_a_radius_of_eps():
    with pytest.raises(MisconfigurationException, match="must be '{norm}/{eps}' with a radius of eps"):
        fl.FisherRobustnessCallback(eps={"l2": [0.5]}, attacks={"l2/0.25": lambda m, x, y: x})
    with pytest.raises(MisconfigurationException, match="must be a callable"):
        fl.FisherRobustnessCallback(eps={"l2": [0.5]}, attacks={"l2/0.5": 3})


class _Sharpening(ImageClassifier):
    """A trained linear classifier that, from epoch `at` on, adds a fast oscillation to two logits: decision
    boundaries everywhere within pi / 100 of every sample (a robustness collapse)."""

    def __init__(self, at: int):
        torch.manual_seed(0)
        net = nn.Linear(12, 4)
        x, y = blobs().tensors
        optimizer = torch.optim.Adam(net.parameters(), 0.05)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        super().__init__(net, 4, optimizer=partial(torch.optim.SGD, lr=0.0))
        self.at = at

    def forward(self, x):
        logits = self.net(x)
        if self.current_epoch >= self.at:
            wave = 50.0 * torch.sin(100.0 * x[:, :1])
            logits = logits + torch.cat([wave, -wave, torch.zeros_like(logits[:, 2:])], dim=1)
        return logits


def test_collapse_is_a_fall_of_the_robust_share_of_correct_samples_within_an_evaluation():
    """`collapsed` on the estimates of `bench/tracking.py`'s seed 0 (Fashion-MNIST): FGSM-AT's L-inf 0.1 curve at
    epochs 6, 7, 8 (clean 0.564, 0.432, 0.480) collapses at epoch 8: 0.012 / 0.480 = 0.025 after 0.154 / 0.432 =
    0.356; plain training's L2 0.5 curve at epochs 16, 17, 18 falls from 0.281 to 0.137 while clean accuracy rises
    (0.812 -> 0.857): shares 0.346, 0.240, 0.160, each above half the one before, no collapse (against the best
    share, 0.160 < 0.346 / 2, it would be)."""
    from fim_lightning.robustness import collapsed

    fgsm, fgsm_clean = [0.172, 0.154, 0.012], [0.564, 0.432, 0.480]
    assert [collapsed(fgsm[: i + 1], fgsm_clean[: i + 1]) for i in range(3)] == [False, False, True]
    plain, plain_clean = [0.281, 0.207, 0.137], [0.812, 0.863, 0.857]
    assert not any(collapsed(plain[: i + 1], plain_clean[: i + 1]) for i in range(3))
    assert collapsed([0.4, 0.15], [0.8, 0.8]) and not collapsed([0.4, 0.15], [0.8, 0.4])  # clean fell with it
    assert not collapsed([0.15, 0.001], [0.8, 0.8])  # a share of 0.19 < the floor 0.2
    assert collapsed([0.15, 0.001], [0.8, 0.8], floor=0.1)
    assert collapsed([0.4, 0.25], [0.8, 0.8], drop=0.3) and not collapsed([0.4, 0.25], [0.8, 0.8])
    assert not collapsed([0.4, float("nan")], [0.8, 0.8]) and collapsed([0.4, float("nan"), 0.01], [0.8, 0.8, 0.8])
    with pytest.raises(ValueError, match="drop must be <= 1"):
        collapsed([0.4, 0.1], [0.8, 0.8], drop=2.0)
    with pytest.raises(ValueError, match="floor must be >= 0"):
        collapsed([0.4, 0.1], [0.8, 0.8], floor=-1.0)
    with pytest.raises(ValueError, match="one length, got 2 and 1"):
        collapsed([0.4, 0.1], [0.8])


def test_the_collapse_alarm_fires_in_the_epoch_of_the_collapse_and_stops_training_through_early_stopping(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping

    callback = fl.FisherRobustnessCallback(num_samples=40, eps=EPS, log_figures=False)
    stop = EarlyStopping(monitor="fim/alarm/robust_collapse", mode="min", divergence_threshold=0.5, patience=100)
    module = _Sharpening(at=2)
    with pytest.warns(UserWarning, match="robust accuracy collapsed at step 18"):
        trainer(tmp_path, [callback, stop], max_epochs=6).fit(
            module, DataLoader(blobs(), batch_size=16), DataLoader(blobs(n=48, seed=1), batch_size=16))
    alarms = [record["fim/alarm/robust_collapse"] for record in callback.history]
    assert alarms == [0.0, 0.0, 1.0]  # stopped by EarlyStopping in the epoch of the collapse
    quiet = fl.FisherRobustnessCallback(num_samples=40, eps=EPS, log_figures=False)
    trainer(tmp_path / "q", [quiet], max_epochs=3).fit(_linear_module(lr=0.05), DataLoader(blobs(), batch_size=16),
                                                       DataLoader(blobs(n=48, seed=1), batch_size=16))
    assert [record["fim/alarm/robust_collapse"] for record in quiet.history] == [0.0, 0.0, 0.0]
    from fim_lightning.robustness import collapsed

    for history in (callback.history, quiet.history):  # the alarm and the drop, from the logged values
        keys = [key for key in history[0] if key.startswith("fim/robust_accuracy/")]
        clean = [record["fim/accuracy"] for record in history]
        assert [record["fim/alarm/robust_collapse"] for record in history] == [
            float(any(collapsed([record[key] for record in history[: i + 1]], clean[: i + 1]) for key in keys))
            for i in range(len(history))]
        for key in keys:
            values = [record[key] for record in history]
            drops = [record[key.replace("robust_accuracy", "robust_drop")] for record in history]
            assert drops == pytest.approx([max(values[: i + 1]) - value for i, value in enumerate(values)], abs=1e-12)
    last = callback.history[-1]
    assert max(last[key] for key in last if key.startswith("fim/robust_drop/")) > 0.3  # the collapse shows
