"""Reading and writing ``kv-geometry/1`` imaging-geometry files (docs/CONVENTIONS.md)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import GeometryError, GeometryFileError, SchemaError
from .foundation import checked_number
from .geometry import MATRIX_AGREEMENT_LIMIT_PX, ImagerGeometry, StereoGeometry
from .jsonfile import read_json_document, write_json_document

__all__ = ["GEOMETRY_SCHEMA", "geometry_from_json", "read_geometry", "write_geometry"]

GEOMETRY_SCHEMA = "kv-geometry/1"

#: Largest magnitude of a position (mm) in a geometry file: 100 m, far beyond any treatment room; a larger
#: value is a typo or garbage and would overflow the projection arithmetic.
MAX_POSITION_MM = 1e5
#: Largest magnitude of a projection-matrix entry (pixels per mm scale times room mm is far smaller).
MAX_MATRIX_ENTRY = 1e9
#: Pixel pitch accepted, mm (panels are 0.1-1 mm; binned test panels a few mm).
PIXEL_SPACING_RANGE_MM = (1e-3, 100.0)


def _numbers(name: str, key: str, value, count: int | None, limit: float) -> None:
    """``value`` must be a flat list (``count`` long) or, for matrices, a list of lists of finite numbers
    with magnitude <= ``limit``; GeometryFileError naming the imager and the field otherwise."""
    flat = value if count is not None else (value if isinstance(value, list) else None)
    if count is None and isinstance(flat, list):
        if not all(isinstance(row, list) for row in flat):
            raise GeometryFileError(f"imager '{name}': {key} must be a list of rows of numbers")
        flat = [v for row in flat for v in row]
    if not isinstance(flat, list) or (count is not None and len(flat) != count):
        raise GeometryFileError(f"imager '{name}': {key} must be {count or 'rows of'} numbers, got {value!r}"[:300])
    for v in flat:
        checked_number(v, GeometryFileError, f"imager '{name}': {key} must hold finite numbers of magnitude <= "
                       f"{limit:g}, got {v!r}"[:300], minimum=-limit, maximum=limit)


def _imager_from_json(entry, index: int) -> ImagerGeometry:
    """One imager of a ``kv-geometry/1`` document; arithmetic that overflows is refused, never passed on."""
    try:
        with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
            return _imager_from_json_checked(entry, index)
    except FloatingPointError as err:
        name = entry.get("name", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        raise GeometryFileError(f"imager '{name}': numbers out of range for the projection ({err})") from err


def _imager_from_json_checked(entry, index: int) -> ImagerGeometry:
    if not isinstance(entry, dict):
        raise GeometryFileError(f"imagers[{index}] must be an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise GeometryFileError(f"imagers[{index}]: 'name' must be a non-empty string, got {name!r}")
    det = entry.get("detector")
    if not isinstance(det, dict):
        raise GeometryFileError(f"imager '{name}': 'detector' object with at least rows, cols and pixel_spacing_mm is required")
    for key in ("rows", "cols", "pixel_spacing_mm"):
        if key not in det:
            raise GeometryFileError(f"imager '{name}': detector.{key} is missing")
    rows, cols = det["rows"], det["cols"]
    _numbers(name, "detector.pixel_spacing_mm", det["pixel_spacing_mm"], 2, PIXEL_SPACING_RANGE_MM[1])
    if min(det["pixel_spacing_mm"]) < PIXEL_SPACING_RANGE_MM[0]:
        raise GeometryFileError(f"imager '{name}': detector.pixel_spacing_mm must be >= {PIXEL_SPACING_RANGE_MM[0]} "
                                f"mm, got {det['pixel_spacing_mm']!r}")
    for key, value in (("source_mm", entry.get("source_mm")), ("detector.origin_mm", det.get("origin_mm")),
                       ("detector.col_direction", det.get("col_direction")),
                       ("detector.row_direction", det.get("row_direction"))):
        if value is not None:
            _numbers(name, key, value, 3, MAX_POSITION_MM)
    if entry.get("projection_matrix") is not None:
        _numbers(name, "projection_matrix", entry["projection_matrix"], None, MAX_MATRIX_ENTRY)
    has_physical = "source_mm" in entry or any(k in det for k in ("origin_mm", "col_direction", "row_direction"))
    has_matrix = "projection_matrix" in entry
    if not has_physical and not has_matrix:
        raise GeometryFileError(f"imager '{name}': neither a physical description nor a projection_matrix is given")
    try:
        if has_physical:
            missing = [k for k in ("origin_mm", "col_direction", "row_direction") if k not in det]
            if "source_mm" not in entry:
                missing.insert(0, "source_mm")
            if missing:
                raise GeometryFileError(f"imager '{name}': physical description incomplete, missing {', '.join(missing)}")
            geom = ImagerGeometry(
                name=name,
                source_mm=entry["source_mm"],
                origin_mm=det["origin_mm"],
                col_direction=det["col_direction"],
                row_direction=det["row_direction"],
                pixel_spacing_mm=det["pixel_spacing_mm"],
                rows=rows,
                cols=cols,
            )
            if has_matrix:
                err = geom.max_disagreement_px(entry["projection_matrix"])
                if not err <= MATRIX_AGREEMENT_LIMIT_PX:
                    raise GeometryFileError(
                        f"imager '{name}': projection_matrix and physical description disagree by "
                        f"{err:.3f} px (limit {MATRIX_AGREEMENT_LIMIT_PX} px)"
                    )
            return geom
        return ImagerGeometry.from_projection_matrix(
            entry["projection_matrix"], name=name, rows=rows, cols=cols, pixel_spacing_mm=det["pixel_spacing_mm"]
        )
    except GeometryFileError:
        raise
    except (GeometryError, TypeError, ValueError) as err:
        raise GeometryFileError(str(err)) from err


def geometry_from_json(obj) -> StereoGeometry:
    """Build a :class:`StereoGeometry` from a parsed ``kv-geometry/1`` document.

    Raises
    ------
    SchemaError
        If ``schema`` is missing or not ``kv-geometry/1``.
    GeometryFileError
        For anything else that is missing, malformed or inconsistent; the
        message names the imager.
    """
    if not isinstance(obj, dict):
        raise GeometryFileError(f"a kv-geometry document must be a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != GEOMETRY_SCHEMA:
        raise SchemaError(f"unknown geometry schema {schema!r}, expected '{GEOMETRY_SCHEMA}'")
    entries = obj.get("imagers")
    if not isinstance(entries, list) or len(entries) < 2:
        raise GeometryFileError("'imagers' must be a list of at least two imagers")
    imagers = tuple(_imager_from_json(e, i) for i, e in enumerate(entries))
    calibrated = obj.get("calibrated_unix_s", 0.0)
    calibrated = checked_number(calibrated, GeometryFileError, f"calibrated_unix_s must be a finite number, got {calibrated!r}")
    notes = obj.get("notes", "")
    if not isinstance(notes, str):
        raise GeometryFileError("notes must be a string")
    try:
        return StereoGeometry(imagers, float(calibrated), notes)
    except GeometryError as err:
        raise GeometryFileError(str(err)) from err


def read_geometry(path: str | os.PathLike) -> StereoGeometry:
    """Read a ``kv-geometry/1`` JSON file. Errors name the file and the imager."""
    path = Path(path)
    obj = read_json_document(path, GeometryFileError, "geometry file")
    try:
        return geometry_from_json(obj)
    except SchemaError as err:
        raise SchemaError(f"{path}: {err}") from err
    except GeometryFileError as err:
        raise GeometryFileError(f"{path}: {err}") from err


def write_geometry(geometry: StereoGeometry, path: str | os.PathLike) -> Path:
    """Write a geometry as ``kv-geometry/1`` with both descriptions; returns the path."""
    return write_json_document(geometry.to_json(), path)


