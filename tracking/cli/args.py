"""The command line's value parsers and output: argparse types, ``X,Y,Z`` triplets, plain tables, :class:`CliError`.

Shared by :mod:`spineguide.tracking.cli.main` and the command modules beside it (``service``, ``console``,
``dicom``, ``demo``), which import them from here rather than from ``main`` (no import circle). Standard library only.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from ..errors import CliError

__all__ = ["CliError", "parse_triplet_mm", "parse_six", "print_table", "finite_float", "positive_float",
           "non_negative_float", "I0_RANGE", "i0_level", "non_negative_int", "port_number"]


# ----------------------------------------------------------------- value parsers
_MAX_NUMBER_TEXT = 64  # characters of one number: "-1.2345678901234567e+308" is 24


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def _numbers(text: str, n: int, what: str, names: str) -> list[float]:
    """``n`` comma-separated finite floats from ``text``; CliError naming ``what`` otherwise."""
    count = {3: "three", 6: "six"}.get(n, str(n))
    if not isinstance(text, str):
        raise CliError(f"{what} must be {count} comma-separated numbers {names}, got {text!r}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != n:
        raise CliError(f"{what} must be {count} comma-separated numbers {names}, got {_shown(text)}")
    values = []
    for part in parts:
        try:
            if len(part) > _MAX_NUMBER_TEXT or "_" in part:
                raise ValueError(part)
            value = float(part)
        except ValueError:
            raise CliError(f"{what} must be {count} comma-separated numbers {names}, got {_shown(text)}") from None
        if not math.isfinite(value):
            raise CliError(f"{what} must be finite, got {_shown(text)}")
        values.append(value)
    return values


def parse_triplet_mm(text: str, what: str = "value") -> tuple[float, float, float]:
    """``"X,Y,Z"`` -> three finite floats (mm; the frame is the option's: ``--isocenter`` is planning-CT LPS).

    Raises
    ------
    CliError
        Not exactly three numbers, a number that does not parse, NaN or infinite.
    """
    x, y, z = _numbers(text, 3, what, "X,Y,Z")
    return x, y, z


def parse_six(text: str, what: str = "--pose") -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``"TX,TY,TZ,PITCH,ROLL,YAW"`` (room frame; mm, degrees) -> ``(translation_mm, rotation_deg)``.

    Raises
    ------
    CliError
        Not exactly six numbers, a number that does not parse, NaN or infinite.
    """
    v = _numbers(text, 6, what, "TX,TY,TZ,PITCH,ROLL,YAW (mm, deg)")
    return (v[0], v[1], v[2]), (v[3], v[4], v[5])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=None) -> None:
    """Print a plain aligned text table."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), file=out)
    print(line, file=out)
    for row in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=out)


def finite_float(text: str) -> float:
    """argparse type: a finite float (``nan``, ``inf`` and over-long numbers refused)."""
    try:
        if len(text) > _MAX_NUMBER_TEXT or "_" in text:
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {_shown(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {_shown(text)}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {_shown(text)}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {_shown(text)}")
    return value


#: Range of an unattenuated detector level (``--i0``, detector units): a float32 frame normalised to 1 and a
#: 16-bit panel both sit well inside; 1e-300 would underflow float32 to 0 and divide by zero.
I0_RANGE = (1e-6, 1e12)


def i0_level(text: str) -> float:
    """argparse type: an unattenuated detector level within :data:`I0_RANGE`."""
    value = finite_float(text)
    if not I0_RANGE[0] <= value <= I0_RANGE[1]:
        raise argparse.ArgumentTypeError(f"expected an unattenuated level between {I0_RANGE[0]:g} and "
                                         f"{I0_RANGE[1]:g} (detector units), got {_shown(text)}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (at most 19 digits)."""
    try:
        if len(text) > 19 or "_" in text:
            raise ValueError(text)
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {_shown(text)}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {_shown(text)}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0..65535, got {_shown(text)}")
    return value


def _positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {_shown(text)}")
    return value
