"""Small models and the dense float64 reference F = J_z^T (diag(p) - p p^T) J_z from autograd Jacobians."""
import copy

import pytest
import torch
from torch import nn


class AttentionClassifier(nn.Module):
    """Tokens (B, T, E) -> self-attention -> mean pool -> C logits."""

    def __init__(self, embed: int = 8, heads: int = 2, classes: int = 4):
        super().__init__()
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, classes)

    def forward(self, x):
        h = self.norm(x + self.attention(x, x, x, need_weights=False)[0])
        return self.head(h.mean(1))


def make_mlp(d=7, classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes)).eval()


def make_cnn(classes=10, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, classes),
    )
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(16, 3, 8, 8))
    return model.eval()


def make_attention(seed=0):
    torch.manual_seed(seed)
    return AttentionClassifier().eval()


MODELS = {
    "mlp": (make_mlp, (7,)),
    "cnn_bn": (make_cnn, (3, 8, 8)),
    "attention": (make_attention, (5, 8)),
}


@pytest.fixture(params=sorted(MODELS))
def model_and_inputs(request):
    make, shape = MODELS[request.param]
    model = make()
    inputs = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    return model, inputs


def dense_fisher(model, inputs):
    """(B, d, d) float64 Fisher J^T M J from dense logit Jacobians, independent of the package.

    M = diag(p) - p p^T is assembled as M_ii = p_i sum_{k != i} p_k, M_ij = -p_i p_j, so that a saturated
    softmax (p_t -> 1) loses nothing to cancellation."""
    reference = copy.deepcopy(model).double().eval()
    out = []
    for x in inputs.double():
        logits = reference(x[None])[0].detach()
        p = logits.softmax(-1)
        jac = torch.autograd.functional.jacobian(lambda xi: reference(xi[None])[0], x).reshape(len(p), -1)
        others = (p[None, :] * (1 - torch.eye(len(p), dtype=p.dtype))).sum(1)  # 1 - p_i without cancellation
        metric = torch.diag(p * others) - torch.outer(p, p) * (1 - torch.eye(len(p), dtype=p.dtype))
        out.append(jac.T @ metric @ jac)
    return torch.stack(out)
