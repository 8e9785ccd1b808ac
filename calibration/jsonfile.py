"""Small JSON document files (geometry, phantoms, plans): read with errors that name the file, write atomically.

Shared by every package's ``io`` so that each file format reads and fails the
same way; the format's own validation stays with the format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json_document", "write_json_document"]


def read_json_document(path: str | os.PathLike, error: type[Exception], what: str) -> Any:
    """Parse a JSON file.

    Parameters
    ----------
    path : path
    error : exception class
        Raised (with the file named) when the file cannot be read or is not JSON.
    what : str
        What the file is, for messages (``"geometry file"``).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"{p}: cannot read {what}: {err.strerror or err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{p}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err


def write_json_document(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (a temporary file renamed into place); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p
