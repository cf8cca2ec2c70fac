"""The one state guard: every estimator runs inside it, and the caller gets back everything untouched.

It owns the module training flags, BatchNorm buffers and `track_running_stats`, parameter `.grad` and
`requires_grad`, the global RNG (CPU and CUDA), grad / inference mode, autocast, the attention kernel and
the multi-head-attention fast path. Nothing else in the package touches those things.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

Mode = Literal["eval", "train"]


def _cuda_devices(model: Callable, tensors: tuple[Tensor, ...]) -> list[int]:
    found = {t.device.index for t in tensors if isinstance(t, Tensor) and t.is_cuda}
    if isinstance(model, nn.Module):
        found |= {p.device.index for p in model.parameters() if p.is_cuda}
    return sorted(i if i is not None else torch.cuda.current_device() for i in found)


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside this package and contextlib, so warnings point at user code."""
    internal = (os.path.dirname(__file__), os.path.dirname(contextlib.__file__) + os.sep + "contextlib")
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


_MODE_DEPENDENT = (_BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)


def resolve_mode(model: Callable, mode: Optional[Mode]) -> Mode:
    """`None` means eval; a model in train mode with mode-dependent layers gets a warning."""
    if mode not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if mode is None:
        if isinstance(model, nn.Module) and any(
            m.training and isinstance(m, _MODE_DEPENDENT) for m in model.modules()
        ):
            warnings.warn(
                "the model is in train mode; the Fisher information is estimated in eval mode and the mode is "
                "restored afterwards (pass mode='eval' to silence this, or mode='train' to keep dropout and "
                "batch statistics)",
                stacklevel=_user_stacklevel(),
            )
        return "eval"
    return mode


@contextmanager
def preserved_state(model: Callable, *tensors: Tensor, mode: Mode = "eval") -> Iterator[None]:
    """Run estimation code with grad enabled, in `mode`, and restore all caller-owned state on exit.

    In `mode="train"` BatchNorm layers use batch statistics with `track_running_stats` switched off for the
    duration, so their running buffers are neither read nor written.
    """
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    buffers = list(model.buffers()) if isinstance(model, nn.Module) else []
    training = [m.training for m in modules]
    batchnorms = [m for m in modules if isinstance(m, _BatchNorm)]
    tracking = [m.track_running_stats for m in batchnorms]
    saved_buffers = [b.detach().clone() for b in buffers]
    grads = [p.grad for p in params]
    requires_grad = [p.requires_grad for p in params]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(model, tensors)))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            for m in modules:
                m.training = mode == "train"
            if mode == "train":
                for m in batchnorms:
                    m.track_running_stats = False
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for m, flag in zip(modules, training):
                m.training = flag
            for m, flag in zip(batchnorms, tracking):
                m.track_running_stats = flag
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    if not torch.equal(b, saved):
                        b.copy_(saved)
            for p, grad, flag in zip(params, grads, requires_grad):
                p.grad = grad
                p.requires_grad_(flag)
