"""The one state guard: every estimator runs inside it, and the caller gets back everything untouched.

It owns the module training flags, BatchNorm buffers and `track_running_stats`, parameter `.grad` and
`requires_grad`, the global RNG (CPU and CUDA), grad / inference mode, autocast, the attention kernel,
the multi-head-attention fast path, the float32 kernel precision (TF32 and its kin, `ieee_float32`), the
compiler (a `torch.compile`d model or submodule runs its eager modules inside: `torch.compiler.set_stance(
"force_eager")`), and for second-order work the normalisation kernels. Nothing else in the package touches
those things.

What a forward pass means per sample is defined here too (`ForwardPasses`). In eval mode samples are
independent. In `mode="train"` BatchNorm would couple the samples of a batch (every JVP or VJP would move
the statistics of the others), so F(x_i) is defined as the Fisher of x_i -> model(x_i) with each BatchNorm
layer normalising by the statistics of the recorded (unperturbed) batch, held fixed: every method then
estimates the same matrix. Every pass also replays the same random draws, so a penalty's forward passes
share one dropout mask.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import Callable, Iterator, Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from fim_lightning.normalisation import elementary_normalisation

Mode = Literal["eval", "train"]


def _cuda_devices(model: Optional[Callable], tensors: tuple[Tensor, ...]) -> list[int]:
    found = {t.device.index for t in tensors if isinstance(t, Tensor) and t.is_cuda}
    if isinstance(model, nn.Module):
        found |= {p.device.index for p in model.parameters() if p.is_cuda}
    return sorted(i if i is not None else torch.cuda.current_device() for i in found)


def user_stacklevel() -> int:
    """The stacklevel of the first frame outside this package and contextlib, so warnings point at user code."""
    internal = (os.path.dirname(__file__), os.path.dirname(contextlib.__file__) + os.sep + "contextlib",
                os.path.dirname(nn.modules.module.__file__))
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
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
                stacklevel=user_stacklevel(),
            )
        return "eval"
    return mode


def is_sharded(model: Callable) -> bool:
    """Whether `model` is, or holds, an FSDP2 module (`fully_shard`): each of its forward passes is then a
    collective (an all-gather), so every rank must run the same number of them. (Its parameters are DTensors
    only while resharded: after a forward without backward they are plain tensors.)"""
    if not isinstance(model, nn.Module) or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def active_dropout(model: Callable) -> list[str]:
    """Names of the dropout layers of `model` with p > 0 (they draw a random mask in train mode)."""
    if not isinstance(model, nn.Module):
        return []
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


class ForwardPasses:
    """Runs the forward passes of one estimate so that they all evaluate the same per-sample function.

    Eval mode: the model as it is. Train mode: `run(..., record=True)` records each BatchNorm layer's batch
    mean and (biased) variance from that pass; later passes normalise with those statistics, held fixed
    (with the graph to the parameters where the recording pass had one). Every pass starts from the same
    RNG state, so dropout draws the same mask in each.
    """

    def __init__(self, batchnorms: list[_BatchNorm], devices: list[int], train: bool) -> None:
        self.train = train
        self._devices = devices
        self._statistics: dict[int, tuple[Tensor, Tensor]] = {}
        self._recording = False
        self._handles = [m.register_forward_hook(self._normalise) for m in batchnorms] if train else []
        self._rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]) if train else None

    def _normalise(self, module: _BatchNorm, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        if self._recording:
            dims = [0, *range(2, x.ndim)]
            self._statistics[id(module)] = (x.mean(dims), x.var(dims, unbiased=False))
            return output
        if id(module) not in self._statistics:
            raise RuntimeError("mode='train': a BatchNorm layer ran before the batch statistics were recorded")
        mean, var = self._statistics[id(module)]
        shape = (1, -1, *([1] * (x.ndim - 2)))
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
        if module.weight is not None:
            y = y * module.weight.view(shape) + module.bias.view(shape)
        return y

    @property
    def needs_recording(self) -> bool:
        """Train mode with BatchNorm layers whose batch statistics are not recorded yet."""
        return bool(self._handles) and not self._statistics

    def run(self, forward: Callable[[Tensor], object], x: Tensor, record: bool = False) -> object:
        """forward(x); in train mode from the recorded RNG state, recording the batch statistics if `record`."""
        if self._rng is None:  # eval mode: nothing recorded, nothing replayed
            return forward(x)
        torch.set_rng_state(self._rng[0])
        for device, state in zip(self._devices, self._rng[1]):
            torch.cuda.set_rng_state(state, device)
        self._recording = record
        try:
            return forward(x)
        finally:
            self._recording = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


EVAL_PASSES = ForwardPasses([], [], train=False)


# torch 2.9 and later set float32 precision per operator (`fp32_precision`); earlier, the legacy `allow_tf32` flags
# and the matmul precision
_PER_OPERATOR_PRECISION = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _precision_settings() -> list:
    """(owner, attribute, IEEE value) of every float32 precision flag of torch's backends."""
    backends = torch.backends
    if _PER_OPERATOR_PRECISION:
        # getattr: the per-operator owners are newer than torch's type annotations
        owners = [getattr(owner, name, None) for owner, name in ((backends.cuda, "matmul"), (backends.cudnn, "conv"),
                  (backends.cudnn, "rnn"), (backends.mkldnn, "matmul"), (backends.mkldnn, "conv"),
                  (backends.mkldnn, "rnn"))]
        return [(owner, "fp32_precision", "ieee") for owner in owners if owner is not None]
    return [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 work in true float32 inside the block: no TF32 (on by default for cuDNN convolutions, and for
    matmuls after Lightning's suggested `torch.set_float32_matmul_precision("high")`), no bf16 splitting; the
    caller's settings are restored exactly after. The new per-operator API is used alone where torch has it:
    setting the legacy flags beside it would leave torch unable to read them back."""
    settings = _precision_settings()
    saved = [getattr(owner, name) for owner, name, _ in settings]
    matmul = None if _PER_OPERATOR_PRECISION else torch.get_float32_matmul_precision()
    try:
        for owner, name, value in settings:
            setattr(owner, name, value)
        if matmul is not None:
            torch.set_float32_matmul_precision("highest")
        yield
    finally:
        for (owner, name, _), value in zip(settings, saved):
            setattr(owner, name, value)
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)


@contextmanager
def forked_rng(*tensors: Tensor) -> Iterator[None]:
    """The global RNG (CPU, and CUDA for the devices of `tensors`) as it was, after the block draws from it."""
    with torch.random.fork_rng(devices=_cuda_devices(None, tensors)):
        yield


@contextmanager
def preserved_state(model: Callable, *tensors: Tensor, mode: Mode = "eval",
                    second_order: bool = False) -> Iterator[ForwardPasses]:
    """Run estimation code with grad enabled, in `mode`, and restore all caller-owned state on exit.

    Yields the `ForwardPasses` that define a per-sample forward pass in `mode`. In `mode="train"` BatchNorm
    layers use the recorded batch's statistics with `track_running_stats` switched off for the duration,
    so their running buffers are neither read nor written. `second_order=True` (the penalties, which
    differentiate input derivatives with respect to the parameters) runs the normalisation layers as
    elementary operations (`normalisation.elementary_normalisation`), whose higher derivatives are right.
    Scoring (`second_order=False`) runs float32 work in true float32 (`ieee_float32`): a reported value does
    not inherit TF32's 10-bit mantissa. The penalties keep the caller's kernels: their value is a training
    signal, and TF32 is what the caller chose for training.
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
    devices = _cuda_devices(model, tensors)
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        # the same function without the compiled graphs: inductor's second derivatives of a penalty were wrong
        # (tests/test_compiled.py), and every transform would recompile
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        torch.backends.mha.set_fastpath_enabled(False)
        if second_order:
            stack.enter_context(elementary_normalisation())
        else:
            stack.enter_context(ieee_float32())
        passes = EVAL_PASSES
        try:
            for m in modules:
                m.training = mode == "train"
            if mode == "train":
                for m in batchnorms:
                    m.track_running_stats = False
                passes = ForwardPasses(batchnorms, devices, train=True)
            yield passes
        finally:
            passes.close()
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
                if p.grad is not grad:
                    p.grad = grad
                if p.requires_grad != flag:  # only where changed: an inference-mode parameter refuses the call
                    p.requires_grad_(flag)
