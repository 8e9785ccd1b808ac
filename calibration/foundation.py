"""The small helpers every package shares: read-only arrays, numeric checks, enum parsing, JSON conversion.

In :mod:`spineguide.calibration`, the lowest layer, so that :mod:`~spineguide.registration` and
:mod:`~spineguide.tracking` use these instead of writing them again (issue 17). Each helper raises the
caller's own error type with the caller's own message, so that a package's errors and messages stay its own.
NumPy and the standard library only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["readonly_array", "checked_number", "checked_integer", "enum_member", "enum_values", "to_json_value", "json_default"]

E = TypeVar("E", bound=Enum)


def readonly_array(values: Any, dtype: Any = np.float64) -> np.ndarray:
    """A read-only copy of ``values`` as an array of ``dtype`` (float64 unless told): the storage of frozen values.

    Always a copy, so that neither the caller's array nor the stored one can change the other.
    """
    out = np.array(values, dtype=dtype)
    out.setflags(write=False)
    return out


def checked_number(value: Any, error: type[Exception], message: str, *, minimum: float = -math.inf,
                   maximum: float = math.inf, exclusive_minimum: bool = False) -> float:
    """``value`` as a finite float within ``[minimum, maximum]`` (``(minimum, maximum]`` if ``exclusive_minimum``).

    Units are the caller's. Raises ``error(message)`` for anything else: a bool, a value that is not a real
    number (a string, None, an array), NaN, an infinity, or a number out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(message)
    v = float(value)
    too_low = v <= minimum if exclusive_minimum else v < minimum
    if not math.isfinite(v) or too_low or v > maximum:
        raise error(message)
    return v


def checked_integer(value: Any, error: type[Exception], message: str, *, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (a Python or NumPy integer; not a bool, float or string), else
    ``error(message)``. Units are the caller's."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise error(message)
    return int(value)


def enum_member(cls: type[E], value: Any, error: type[Exception], message: str) -> E:
    """The member of the enum ``cls`` whose value is ``value`` (a member is returned as it is); else ``error(message)``.

    Strings exist only at the file and wire boundary; this is where they become members. ``message`` is the
    caller's, whole (name the value and the known values: :func:`enum_values`).
    """
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise error(message) from None


def enum_values(cls: type[Enum]) -> list[Any]:
    """The values of an enum's members, in definition order (for messages and documentation)."""
    return [m.value for m in cls]


def to_json_value(obj: Any) -> Any:
    """A copy of ``obj`` made of plain JSON types: strict JSON (never a ``NaN`` token) once ``json.dumps``-ed.

    Mappings become dicts with string keys, lists/tuples/arrays become lists, NumPy scalars Python numbers,
    paths strings, enum members their values; a float that is NaN or infinite becomes ``None``. Anything
    else is returned as it is (``json.dumps`` then decides).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_value(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return to_json_value(obj.value)
    return obj


def json_default(obj: Any) -> Any:
    """``json.dumps(..., default=json_default)``: arrays as lists, NumPy scalars as numbers, paths as strings.

    Raises TypeError (as ``json`` expects) for any other type.
    """
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")
