"""The plugin for the unified package, `lightning.pytorch` (`pip install lightning`): the same classes as the
top level and `fim_lightning.module`, built on `lightning.pytorch`'s LightningModule.

    import lightning.pytorch as L
    from fim_lightning.unified import FisherRegularizedClassifier, FisherRobustnessCallback

    L.Trainer(callbacks=[FisherRobustnessCallback()]).fit(FisherRegularizedClassifier(net, 10), datamodule=dm)

`FisherRobustnessCallback` is the top-level class itself: it subclasses the `Callback` of both packages.
"""
from __future__ import annotations

import lightning.pytorch as L

from fim_lightning.callback import FisherRobustnessCallback
from fim_lightning.module import FisherRegularizedSteps, ImageClassifierSteps

__all__ = ["FisherRegularizedClassifier", "FisherRobustnessCallback", "ImageClassifier"]


# The mixins are type-checked against pytorch_lightning's LightningModule; lightning.pytorch's is its twin, whose
# members the checker cannot tell are the same.
class ImageClassifier(ImageClassifierSteps, L.LightningModule):  # type: ignore[misc]
    __doc__ = ImageClassifierSteps.__doc__


class FisherRegularizedClassifier(FisherRegularizedSteps, ImageClassifier):  # type: ignore[misc]
    __doc__ = FisherRegularizedSteps.__doc__
