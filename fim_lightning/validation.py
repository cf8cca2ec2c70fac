"""Checks of constructor options: each names the option, what it must be and what it got.

Every public constructor of the package validates every option with these, so a typo (`mode="Train"`), a
NaN weight or a string where a number belongs fails at construction with a message that says so.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Literal, Optional, overload


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` must be one of `choices` (compared exactly: "Train" is not "train")."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


@overload
def check_int(name: str, value: Any, minimum: Optional[int] = None, allow_none: Literal[False] = False) -> int: ...


@overload
def check_int(name: str, value: Any, minimum: Optional[int] = None, *, allow_none: bool) -> Optional[int]: ...


def check_int(name: str, value: Any, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """An integer (not a bool) >= `minimum`, or None where `allow_none`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an integer or None" if allow_none else "an integer"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: Any, minimum: Optional[float] = None, *, strict: bool = False,
               maximum: Optional[float] = None) -> float:
    """A finite real number (not a bool) >= `minimum` (> with `strict`) and <= `maximum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


@overload
def check_str(name: str, value: Any, allow_none: Literal[False] = False) -> str: ...


@overload
def check_str(name: str, value: Any, allow_none: bool) -> Optional[str]: ...


def check_str(name: str, value: Any, allow_none: bool = False) -> Optional[str]:
    """A non-empty string (or None where `allow_none`)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {type(value).__name__} {value!r}")
    return value
