"""JSON documents (geometry, phantoms, plans, wire headers): one hardened parser, errors that name the source.

Every JSON file or message the project reads goes through :func:`parse_json_bytes` (bytes in memory, e.g. a
ZeroMQ frame) or :func:`read_json_document` (a file), so that each format reads and fails the same way; the
format's own validation stays with the format. The parser refuses, with the caller's error class, rather than
crashes or guesses:

- more than ``max_bytes`` bytes (checked before anything is decoded; for files, before the file is read);
- bytes that are not strict UTF-8, and strings holding lone UTF-16 surrogates (``"\\ud800"``);
- containers nested deeper than ``max_depth`` (counted by a bracket scan outside strings, before ``json.loads``,
  so no input can reach Python's recursion limit);
- integers with more than 19 digits or of magnitude above 2**63 (Python refuses int strings of more than
  4300 digits with a bare ``ValueError``; no field of ours needs more than 64 bits);
- ``NaN``, ``Infinity``, ``-Infinity`` and floats that overflow to infinity (``1e999``);
- an object with the same key twice (``json`` would keep the last one silently).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "MAX_INT_DIGITS",
    "parse_json_bytes",
    "read_json_document",
    "write_json_document",
]

#: Largest JSON document read by default (16 MiB): geometry, plan and phantom files are kilobytes.
DEFAULT_MAX_BYTES = 16 * 2**20
#: Deepest nesting of arrays/objects accepted by default (our formats need 4).
DEFAULT_MAX_DEPTH = 64
#: Most decimal digits of an integer literal (2**63 has 19).
MAX_INT_DIGITS = 19
_MAX_INT_MAGNITUDE = 2**63

# A JSON string literal (unrolled loop: linear time, no backtracking blow-up).
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class _Refused(Exception):
    """Internal: a hook refused a value; turned into the caller's error class by :func:`parse_json_bytes`."""


def _nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting of ``raw`` outside string literals (no recursion, numpy cumulative sum)."""
    if not any(b in raw for b in (b"[", b"{")):
        return 0
    stripped = _STRING_RE.sub(b'""', raw)
    steps = _OPEN[np.frombuffer(stripped, dtype=np.uint8)]
    if steps.size == 0:
        return 0
    return int(np.cumsum(steps, dtype=np.int64).max())


def _parse_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise _Refused(f"integer with {len(digits)} digits (at most {MAX_INT_DIGITS})")
    value = int(text)
    if abs(value) > _MAX_INT_MAGNITUDE:
        raise _Refused(f"integer {text} out of range (|x| <= 2**63)")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise _Refused(f"number {shown} overflows a 64-bit float")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not a JSON number (NaN and infinities are refused)")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise _Refused(f"duplicate key {shown!r} in an object")
        out[key] = value
    return out


def _check_strings(obj: Any) -> None:
    """Refuse strings (values and keys) holding lone surrogates: they cannot be printed or re-encoded as UTF-8."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise _Refused(f"string holds a lone UTF-16 surrogate ({err.reason})") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json_bytes(raw: bytes, what: str, error: type[Exception], *,
                     max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse one JSON document from bytes, refusing anything odd with ``error(f"{what}: ...")``.

    Parameters
    ----------
    raw : bytes
        The document, UTF-8 encoded (``bytearray`` and ``memoryview`` accepted).
    what : str
        Names the source in messages (a file path, ``"kvframe header"``).
    error : exception class
        Raised for every refusal, with the message ``f"{what}: <reason>"``; the cause is chained.
    max_bytes : int
        Largest document accepted, in bytes.
    max_depth : int
        Deepest nesting of arrays/objects accepted (``[[1]]`` has depth 2).

    Returns
    -------
    The decoded value (dict, list, str, int, float, bool or None); ints fit in 64 bits, floats are finite,
    objects have unique keys.

    Raises
    ------
    error
        Too large, not strict UTF-8, not JSON, nested too deep, a number out of range, NaN/Infinity, a
        duplicate key or a lone surrogate in a string.
    """
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    if not isinstance(raw, bytes):
        raise error(f"{what}: expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise error(f"{what}: {len(raw)} bytes is larger than the {max_bytes}-byte limit for a JSON document")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise error(f"{what}: not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} "
                    f"({err.reason})") from err
    depth = _nesting_depth(raw)
    if depth > max_depth:
        raise error(f"{what}: JSON nested {depth} levels deep (at most {max_depth})")
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                         parse_constant=_parse_constant, object_pairs_hook=_pairs)
        _check_strings(obj)
    except _Refused as err:
        raise error(f"{what}: not valid JSON: {err}") from err
    except json.JSONDecodeError as err:
        raise error(f"{what}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except RecursionError as err:  # unreachable after the depth scan; kept so no input can escape as a crash
        raise error(f"{what}: JSON nested too deep") from err
    return obj


def read_json_document(path: str | os.PathLike, error: type[Exception], what: str, *,
                       max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse a JSON file with :func:`parse_json_bytes` (size checked before reading).

    Parameters
    ----------
    path : path
    error : exception class
        Raised (with the file named) when the file cannot be read, is too large or is not valid JSON.
    what : str
        What the file is, for messages (``"geometry file"``).
    max_bytes, max_depth : int
        Limits, see :func:`parse_json_bytes`.

    Raises
    ------
    error
        ``"<path>: cannot read <what>: ..."`` (missing, a directory, no permission, too large) or
        ``"<path>: not valid JSON: ..."`` and the other refusals of :func:`parse_json_bytes`.
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise error(f"{p}: cannot read {what}: is a directory")
        with p.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise error(f"{p}: cannot read {what}: {size} bytes is larger than the {max_bytes}-byte limit")
            raw = fh.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{p}: cannot read {what}: {err.strerror or err}") from err
    return parse_json_bytes(raw, str(p), error, max_bytes=max_bytes, max_depth=max_depth)


def write_json_document(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (a temporary file renamed into place); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p
