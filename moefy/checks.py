"""Argument checks shared by moefy's constructors and functions.

Each helper returns the (normalised) value or raises with a message that names the argument, says what is
allowed and shows what was given: ``"capacity_factor must be a finite number > 0, got 0"``. Booleans are
never accepted as numbers. ``what`` replaces the generated description of what is allowed; ``type_error``
is the exception for a value of the wrong type (range errors are always ValueError).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Type

import torch
from torch import nn

__all__ = ["check_int", "check_number", "check_bool", "check_choice", "check_module", "check_tensor", "check_path"]


def _bounds(low: Any, high: Any, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_int(value: Any, name: str, *, min: Optional[int] = None, max: Optional[int] = None,
              optional: bool = False, what: Optional[str] = None,
              type_error: Type[Exception] = ValueError) -> Optional[int]:
    """``value`` as an int in ``[min, max]`` (either bound may be None); None passes when ``optional``."""
    if optional and value is None:
        return None
    if what is None:
        what = "a positive int" if min == 1 and max is None else f"an int{_bounds(min, max)}"
    what += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(f"{name} must be {what}, got {value!r}")
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_number(value: Any, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False, finite: bool = True,
                 what: Optional[str] = None, type_error: Type[Exception] = ValueError) -> Optional[float]:
    """``value`` as a float within the bounds (``*_open``: the bound itself is excluded); never NaN, and
    finite unless ``finite=False``; None passes when ``optional``."""
    if optional and value is None:
        return None
    if what is None:
        bounded = low is not None and high is not None
        what = f"a {'finite ' if finite and not bounded else ''}number{_bounds(low, high, low_open, high_open)}"
    what += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error(f"{name} must be {what}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number) or (finite and math.isinf(number)) or (
            low is not None and (number <= low if low_open else number < low)) or (
            high is not None and (number >= high if high_open else number > high)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0 / 1, not a string); TypeError otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any], *, optional: bool = False) -> Any:
    """``value`` if it is one of ``choices`` (or None when ``optional``); ValueError otherwise."""
    if optional and value is None:
        return None
    # compare same-typed values only: never ask an array or tensor `value == choice` for a truth value
    if not any(isinstance(value, type(c)) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}{' or None' if optional else ''}, got {value!r}")
    return value


def check_module(value: Any, name: str) -> nn.Module:
    """``value`` if it is an ``nn.Module``; TypeError naming its type otherwise."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")
    return value


def check_tensor(value: Any, name: str, *, floating: bool = False) -> torch.Tensor:
    """``value`` if it is a ``torch.Tensor`` (of a floating-point dtype when ``floating``); TypeError naming its
    type (or dtype) otherwise. Shapes are the caller's to check: their messages name the dims."""
    what = "a floating-point torch.Tensor" if floating else "a torch.Tensor"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be {what}, got dtype {value.dtype}")
    return value


def check_path(value: Any, name: str) -> Path:
    """``value`` as a ``Path`` if it is a ``str`` or ``os.PathLike``; TypeError naming its type otherwise."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)
