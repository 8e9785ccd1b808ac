"""Plan-side files: planned fiducials (``fiducials/1``, planning-CT LPS mm; docs/CONVENTIONS.md).

```json
{"schema": "fiducials/1", "fiducials": [{"name": "F1", "position_mm": [x, y, z]}]}
```

Positions are DICOM patient coordinates (LPS: +x patient left, +y posterior,
+z superior) of the planning CT, in mm. :meth:`FiducialSet.to_room` maps them
to the room frame at perfect setup for a given plan isocentre and patient
position. Readers ignore fields they do not know and reject an unknown schema
name or major version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spineguide.calibration.jsonfile import read_json_document, write_json_document

from .errors import FiducialFileError, FiducialSchemaError
from .volume import PatientPosition, room_from_lps_matrix

__all__ = [
    "FIDUCIALS_SCHEMA",
    "FiducialFileError",
    "FiducialSchemaError",
    "FiducialSet",
    "fiducials_from_json",
    "read_fiducials",
    "write_fiducials",
]

#: Schema string written into every planned-fiducials file.
FIDUCIALS_SCHEMA = "fiducials/1"


@dataclass(frozen=True, slots=True)
class FiducialSet:
    """Planned fiducial positions in the planning CT.

    Attributes
    ----------
    names : tuple of str
        Unique, non-empty seed names, in file order.
    positions_lps_mm : (N, 3) array
        Seed centres in planning-CT LPS coordinates, mm; N >= 1, finite.
    source : str
        Where the set came from (file path), for messages.
    """

    names: tuple[str, ...]
    positions_lps_mm: np.ndarray
    source: str = "<memory>"

    def __post_init__(self) -> None:
        where = self.source
        names = tuple(self.names)
        pos = np.array(self.positions_lps_mm, dtype=np.float64)
        if len(names) < 1:
            raise FiducialFileError(f"{where}: at least 1 fiducial is needed, got 0")
        if pos.shape != (len(names), 3):
            raise FiducialFileError(
                f"{where}: positions must be ({len(names)}, 3) LPS mm for {len(names)} names, got shape {pos.shape}"
            )
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise FiducialFileError(f"{where}: fiducial #{i} has no name (got {name!r})")
            if not np.all(np.isfinite(pos[i])):
                raise FiducialFileError(f"{where}: fiducial '{name}' position is not finite: {pos[i].tolist()}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FiducialFileError(f"{where}: duplicate fiducial names {dupes}; names must be unique")
        pos.setflags(write=False)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "positions_lps_mm", pos)

    def __len__(self) -> int:
        return len(self.names)

    def to_room(self, isocentre_lps_mm: Sequence[float], patient_position: PatientPosition | str) -> np.ndarray:
        """Planned positions in the room frame at perfect setup, ``(N, 3)`` mm.

        ``isocentre_lps_mm`` is the plan isocentre in the planning CT's LPS
        frame (mm); the mapping per patient position is the table of
        docs/CONVENTIONS.md.
        """
        iso = np.asarray(isocentre_lps_mm, dtype=np.float64)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise FiducialFileError(f"{self.source}: isocentre must be three finite LPS numbers (mm), got {iso.tolist()}")
        return (self.positions_lps_mm - iso) @ room_from_lps_matrix(patient_position).T

    def to_json(self) -> dict:
        """The whole ``fiducials/1`` document."""
        return {
            "schema": FIDUCIALS_SCHEMA,
            "fiducials": [
                {"name": n, "position_mm": [float(v) for v in p]} for n, p in zip(self.names, self.positions_lps_mm)
            ],
        }


def _check_schema(schema: object, where: str) -> None:
    name, _, version = str(schema).partition("/")
    major = version.split(".")[0]
    if not isinstance(schema, str) or name != "fiducials" or major != "1":
        raise FiducialSchemaError(f"{where}: unknown schema {schema!r} (expected '{FIDUCIALS_SCHEMA}')")


def fiducials_from_json(obj: object, source: str = "<memory>") -> FiducialSet:
    """Build a :class:`FiducialSet` from a parsed ``fiducials/1`` document.

    Raises
    ------
    FiducialSchemaError
        Missing or unknown ``schema``.
    FiducialFileError
        Anything else wrong: no list, an entry without name or 3 finite
        numbers, duplicate names, no fiducials.
    """
    if not isinstance(obj, dict):
        raise FiducialFileError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    if "schema" not in obj:
        raise FiducialSchemaError(f"{source}: no 'schema' field (expected '{FIDUCIALS_SCHEMA}')")
    _check_schema(obj["schema"], source)
    entries = obj.get("fiducials")
    if not isinstance(entries, list):
        raise FiducialFileError(f"{source}: 'fiducials' must be a list, got {type(entries).__name__}")
    names, positions = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FiducialFileError(f"{source}: fiducial #{i} must be an object, got {type(entry).__name__}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FiducialFileError(f"{source}: fiducial #{i} has no name (got {name!r})")
        pos = entry.get("position_mm")
        if (
            not isinstance(pos, list)
            or len(pos) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pos)
        ):
            raise FiducialFileError(f"{source}: fiducial '{name}' position_mm must be 3 numbers (LPS mm), got {pos!r}")
        names.append(name)
        positions.append([float(v) for v in pos])
    return FiducialSet(tuple(names), np.array(positions, dtype=np.float64).reshape(-1, 3), source)


def read_fiducials(path: str | os.PathLike) -> FiducialSet:
    """Read a ``fiducials/1`` JSON file (planning-CT LPS mm).

    Raises
    ------
    FiducialFileError
        Missing or unreadable file, invalid JSON, invalid content; the
        message names the file.
    FiducialSchemaError
        Unknown schema.
    """
    p = Path(path)
    return fiducials_from_json(read_json_document(p, FiducialFileError, "fiducials file"), str(p))


def write_fiducials(fiducials: FiducialSet, path: str | os.PathLike) -> Path:
    """Write a :class:`FiducialSet` as a ``fiducials/1`` JSON file; returns the path."""
    if not isinstance(fiducials, FiducialSet):
        raise FiducialFileError(f"expected a FiducialSet, got {type(fiducials).__name__}")
    return write_json_document(fiducials.to_json(), path)
