"""Closed-form Fisher spectral bounds: never below the exact value, exact for linear softmax, exact conv norms."""
import math

import pytest
import torch
from torch import nn

import fim_lightning as fl
from recipes import models
from fim_lightning.bounds import fisher_spectral_bound, linear_operator_norm, lipschitz_layers
from recipes.models import Normalize, SmallCNN


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (2, 1)])
def test_conv_operator_norm_matches_the_dense_matrix(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding)
    shape = (2, 6, 6)
    basis = torch.eye(72, dtype=torch.float64).view(72, *shape)
    dense = nn.functional.conv2d(basis, conv.weight.double(), None, stride, padding).flatten(1).T
    expected = torch.linalg.matrix_norm(dense, 2).item()
    reshaped_kernel = torch.linalg.matrix_norm(conv.weight.detach().flatten(1).double(), 2).item()
    assert linear_operator_norm(conv, shape) == pytest.approx(expected, rel=1e-5)
    assert linear_operator_norm(conv, shape) >= expected
    assert abs(reshaped_kernel - expected) > 1e-3  # the reshaped kernel matrix is a different number


def test_linear_softmax_bound_is_its_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    bound = fisher_spectral_bound(model, x)
    p = model(x).softmax(-1).detach()
    metric = torch.minimum((2 * p * (1 - p)).max(1).values, p.max(1).values).clamp(max=0.5)
    sigma = torch.linalg.matrix_norm(model[0].weight.detach(), 2)
    torch.testing.assert_close(bound.value, metric * sigma**2, rtol=1e-5, atol=0)
    assert (bound.value >= fl.fisher_spectral_norm(model, x)).all()
    assert fisher_spectral_bound(model, input_shape=(6,)).value.item() == pytest.approx(0.5 * sigma.item() ** 2,
                                                                                        rel=1e-5)
    assert bound.lipschitz == pytest.approx(sigma.item(), rel=1e-5)


def _train_briefly(model, images, steps):
    labels = torch.arange(len(images)) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model.train()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    return nn.Sequential(Normalize([0.5] * 3, [0.25] * 3),
                         VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=4,
                                           global_pool="avg", init_values=0.5))


FAMILIES = {
    "small_cnn": lambda: SmallCNN(3, 4, widths=(4, 8)),
    "vgg": lambda: models.cifar_vgg(4, config=(8, "M", 16, "M")),
    "resnet_basic": lambda: models.cifar_resnet(4, layers=(1, 1, 1, 1)),
    "resnet_bottleneck": lambda: models.cifar_resnet(4, layers=(1, 1, 1, 1), block="bottleneck"),
    "densenet": lambda: models.cifar_densenet(4, growth_rate=4, block_config=(2, 2), num_init_features=8),
    "torchvision_vit": lambda: models.cifar_vit(4, image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32),
    "timm_vit": _timm_vit,
}


@pytest.mark.parametrize("steps", [0, 5])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bound_is_never_below_the_exact_value(family, steps):
    torch.manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = _train_briefly(FAMILIES[family]().eval(), images, steps)
    bound = fisher_spectral_bound(model, images)
    exact = fl.fisher_spectral_norm(model, images)
    assert (bound.value >= exact).all() and (exact > 1e-6).all()
    product = math.prod(factor for _, factor in bound.layers)
    torch.testing.assert_close(bound.lipschitz, product, rtol=1e-12, atol=0)
    assert len(bound.figure().axes[0].patches) == len(bound.layers)


def _jacobian_norms(module, x):
    """Per-sample spectral norm of the dense float64 Jacobian of `module` at x (B, ...)."""
    norms = []
    for sample in x.double():
        jac = torch.autograd.functional.jacobian(lambda v: module(v.unsqueeze(0)).squeeze(0), sample)
        norms.append(torch.linalg.matrix_norm(jac.reshape(-1, sample.numel()), 2))
    return torch.stack(norms)


@pytest.mark.parametrize("stage", ["timm_attention", "layer_norm", "encoder_block", "basic_block", "dense_block"])
def test_each_stage_factor_bounds_its_dense_jacobian(stage):
    torch.manual_seed(0)
    if stage == "timm_attention":
        from timm.models.vision_transformer import Attention
        module, x = Attention(8, num_heads=2, qkv_bias=True), 2 * torch.randn(4, 5, 8)
    elif stage == "layer_norm":
        module, x = nn.LayerNorm(8), torch.randn(4, 5, 8)
        nn.init.normal_(module.weight)
    elif stage == "encoder_block":
        from torchvision.models.vision_transformer import EncoderBlock
        module, x = EncoderBlock(2, 8, 16, 0.0, 0.0), torch.randn(4, 5, 8)
    elif stage == "basic_block":
        from torchvision.models.resnet import BasicBlock
        x = torch.randn(4, 3, 6, 6)
        module = BasicBlock(3, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(3, 4, 1, 2), nn.BatchNorm2d(4)))
        module = _with_running_stats(module, x)
    else:
        from torchvision.models.densenet import _DenseBlock
        x = torch.randn(4, 3, 4, 4)
        module = _with_running_stats(_DenseBlock(2, 3, 2, 2, 0.0), x)
    module = module.double().eval()
    _, factors = lipschitz_layers(module, x.double(), local=True)
    bound = math.prod(factor for _, factor in factors)
    dense = _jacobian_norms(module, x)
    assert (bound >= dense * (1 - 1e-9)).all()
    assert (bound <= 50 * dense).all()  # a bound, but not a vacuous one on a single stage


def _with_running_stats(module, x):
    """BatchNorm running statistics away from their initial 0 / 1, from a few train-mode passes."""
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(3 * x + 1)
    return module.eval()


def test_global_bound_rejects_attention_and_unknown_modules_raise():
    with pytest.raises(ValueError, match="not globally Lipschitz"):
        fisher_spectral_bound(FAMILIES["torchvision_vit"](), input_shape=(3, 16, 16))

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x) * x

    with pytest.raises(TypeError, match="Gate"):
        fisher_spectral_bound(nn.Sequential(Gate(), nn.Linear(4, 2)), input_shape=(4,))
    with pytest.raises(TypeError, match="Bilinear"):
        fisher_spectral_bound(nn.Sequential(nn.Flatten(), nn.Bilinear(4, 4, 2)), torch.randn(2, 4))

    class Doubled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="does not reproduce"):
        fisher_spectral_bound(Doubled(nn.Linear(4, 2)), torch.randn(3, 4))


def test_registry_keys_are_classes_or_qualified_names_and_an_overwrite_warns():
    """A user's own class named like torchvision's `BasicBlock` (here: no shortcut) is not walked as one: the
    string keys are qualified names. A bare name is refused, a second registration warns."""
    from fim_lightning import bounds

    class BasicBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()
            self.conv2, self.bn2, self.downsample = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), None

        def forward(self, x):
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    model = nn.Sequential(BasicBlock(), nn.Flatten(), nn.Linear(32, 3)).eval()
    with pytest.raises(TypeError, match="no bound is known for BasicBlock"):
        fisher_spectral_bound(model, torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="qualified class name"):
        bounds.register_layer_bound("Normalize", lambda layer, shape: 1.0)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        bounds.register_block_bound(int, lambda walk, name, module, x: None)
    key = f"{__name__}.Unused"
    bounds.register_layer_bound(key, lambda layer, shape: 1.0)
    try:
        with pytest.warns(UserWarning, match=f"layer bound for {key} is registered already: overwriting it"):
            bounds.register_layer_bound(key, lambda layer, shape: 2.0)
    finally:
        del bounds.LAYER_BOUNDS[key]
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=3).eval()
    assert bounds.BLOCK_BOUNDS.lookup(resnet.layer1[0]) is bounds.BLOCK_BOUNDS["torchvision.models.resnet.BasicBlock"]
