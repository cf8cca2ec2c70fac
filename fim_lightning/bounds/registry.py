"""`Registry`: the bound tables keyed by a module class or by a qualified class name, as timm keys its models."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

from torch import nn

Key = Union[type, str]


def qualified_name(cls: type) -> str:
    """`package.module.Class`, the name a string key must give (torchvision's `BasicBlock` is
    "torchvision.models.resnet.BasicBlock")."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Registry(dict):
    """Bounds by module class (subclasses match, the closest class first) or by the qualified name of a class
    in a library this package does not import (torchvision, timm): a bare name such as "Block" would match
    every user class of that name, so it is refused. Registering a key that is there already warns, as
    timm's `register_model` does, and replaces it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, key: Key, value: Callable) -> None:
        if isinstance(key, str):
            if "." not in key.strip("."):
                raise ValueError(f"a {self.kind} bound's key must be a class or a qualified class name "
                                 f"'package.module.Class' (a bare {key!r} would match any class of that name)")
        elif not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(f"a {self.kind} bound's key must be an nn.Module subclass or a qualified class name, "
                            f"got {key!r}")
        if not callable(value):
            raise TypeError(f"the {self.kind} bound for {key!r} must be callable, got {value!r}")
        if key in self:
            warnings.warn(f"the {self.kind} bound for {key if isinstance(key, str) else qualified_name(key)} is "
                          "registered already: overwriting it", UserWarning, stacklevel=3)
        self[key] = value

    def lookup(self, module: nn.Module) -> Optional[Callable]:
        """The entry of the closest class of `module` along its MRO (by class, then by qualified name), else
        None."""
        for cls in type(module).__mro__:
            if cls in self:
                return self[cls]
            name = qualified_name(cls)
            if name in self:
                return self[name]
        return None
