"""LightningModules the recipes instantiate: `ImageClassifier` (cross-entropy, accuracy, optimizer) and
`FisherRegularizedClassifier` (the same plus a Fisher penalty), for `pytorch_lightning`.

Each is written once as a mixin (`ImageClassifierSteps`, `FisherRegularizedSteps`) and built on a package's
`LightningModule`: here on `pytorch_lightning`'s, in `fim_lightning.unified` on `lightning.pytorch`'s
(`fim_lightning.flavours` says why)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fim_lightning.validation import check_int

# The mixins are completed by a package's LightningModule (below, and in `unified`): type-checked as one.
if TYPE_CHECKING:
    _Module = pl.LightningModule
else:
    _Module = object


class ImageClassifierSteps(_Module):
    """Wraps any classifier `net` (pixels in [0, 1] -> logits) with cross-entropy training.

    Args:
        net: the classifier; it is what the Fisher callback scores (`model_attribute="net"`).
        num_classes: number of classes (for the accuracy metric).
        optimizer: a partial optimizer, e.g. `functools.partial(torch.optim.SGD, lr=0.05)`
            (Hydra: `_partial_: true`); default Adam(lr=1e-3).
        scheduler: a partial learning-rate scheduler called with the optimizer and stepped once per epoch,
            e.g. `functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max_epochs)`; default
            none (constant rate). With BatchNorm a rate that ends high leaves the running statistics behind
            the weights, so the eval-mode model can score far below the train-mode one; a decay to zero
            avoids it.
    """

    def __init__(self, net: nn.Module, num_classes: int, optimizer: Optional[Callable] = None,
                 scheduler: Optional[Callable] = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        check_int("num_classes", num_classes, 2)
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a callable (a partial optimizer) or None, got {optimizer!r}")
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be a callable (a partial LR scheduler) or None, got {scheduler!r}")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_accuracy = MulticlassAccuracy(num_classes)
        self.val_accuracy = MulticlassAccuracy(num_classes)
        self.test_accuracy = MulticlassAccuracy(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        """Cross-entropy and accuracy of one batch, logged under `stage`."""
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        accuracy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train")
        self.log(f"{stage}/acc", accuracy, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_accuracy)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_accuracy)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_accuracy)

    def configure_optimizers(self):
        optimizer = (torch.optim.Adam(self.parameters(), lr=1e-3) if self.optimizer_factory is None
                     else self.optimizer_factory(self.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


class FisherRegularizedSteps(_Module):
    """Cross-entropy plus a penalty on the training batch; logs `train/ce` and `train/fisher_penalty`.

    `penalty` is any module called as `penalty(net, x, step=..., logits=...)`: a `FisherPenalty` or
    `attacks.TradesPenalty`. `adversarial` (an `attacks.PGD`) replaces the training inputs by PGD examples
    before the cross-entropy (Madry-style adversarial training).

    In your own `training_step` the same is two lines:

        loss = F.cross_entropy(logits := self.net(x), y)
        loss = loss + self.penalty(self.net, x, step=self.global_step, logits=logits)
    """

    def __init__(self, net: nn.Module, num_classes: int, penalty: Optional[nn.Module] = None,
                 adversarial: Optional[nn.Module] = None, optimizer: Optional[Callable] = None,
                 scheduler: Optional[Callable] = None) -> None:
        super().__init__(net, num_classes, optimizer, scheduler)
        for name, value in (("penalty", penalty), ("adversarial", adversarial)):
            if value is not None and not isinstance(value, nn.Module):
                raise TypeError(f"{name} must be an nn.Module (a penalty or attack) or None, got "
                                f"{type(value).__name__}")
        self.penalty = penalty
        self.adversarial = adversarial

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.adversarial is not None:
            x = self.adversarial(self.net, x, labels=y)
        logits = self(x)
        ce = nn.functional.cross_entropy(logits, y)
        self.train_accuracy(logits, y)
        self.log("train/acc", self.train_accuracy, prog_bar=True)
        self.log("train/ce", ce)
        if self.penalty is None:
            return ce
        penalty = self.penalty(self.net, x, step=self.global_step, logits=logits)
        self.log("train/fisher_penalty", penalty)
        return ce + penalty


class ImageClassifier(ImageClassifierSteps, pl.LightningModule):
    __doc__ = ImageClassifierSteps.__doc__


class FisherRegularizedClassifier(FisherRegularizedSteps, ImageClassifier):
    __doc__ = FisherRegularizedSteps.__doc__
