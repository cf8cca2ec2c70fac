"""Both Lightning packages, natively: `pytorch_lightning` and the unified `lightning.pytorch`.

The two ship the same classes twice, and each Trainer and LightningCLI checks `isinstance` against its own
copy. A `Callback` is a pure hook interface, so the plugin's callback subclasses the `Callback` of every
installed package and one class serves both Trainers and both CLIs (`CALLBACK_BASES`). A LightningModule
carries its package's internals, so the plugin's modules are written once as mixins and built once per
package, as Lightning's own packages are: `fim_lightning.module` for `pytorch_lightning`,
`fim_lightning.unified` for `lightning.pytorch`.
"""
from __future__ import annotations

import importlib
import importlib.util

PACKAGES = tuple(name for name in ("pytorch_lightning", "lightning.pytorch")
                 if importlib.util.find_spec(name.split(".")[0]) is not None)


def _import(name: str):
    return importlib.import_module(name)


CALLBACK_BASES = tuple(_import(name).Callback for name in PACKAGES)
MISCONFIGURATION_ERRORS = tuple(_import(name + ".utilities.exceptions").MisconfigurationException for name in PACKAGES)


class MisconfigurationException(*MISCONFIGURATION_ERRORS):  # type: ignore[misc]  # bases found at import
    """The plugin's configuration error: an instance of each installed package's `MisconfigurationException`."""
