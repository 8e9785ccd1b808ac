"""spineguide.calibration: stereo kV imaging geometry, phantom calibration and daily QA.

Lowest layer of spineguide: it imports nothing from ``registration`` or
``tracking``. Everything here is in the IEC 61217 room frame, millimetres.
"""

from .errors import CalibrationError, GeometryError, GeometryFileError, SchemaError
from .geometry import (
    MATRIX_AGREEMENT_LIMIT_PX,
    ImagerGeometry,
    StereoGeometry,
    Triangulation,
    default_stereo_geometry,
)
from .io import GEOMETRY_SCHEMA, geometry_from_json, read_geometry, write_geometry

__all__ = [
    "CalibrationError",
    "GeometryError",
    "GeometryFileError",
    "SchemaError",
    "MATRIX_AGREEMENT_LIMIT_PX",
    "ImagerGeometry",
    "StereoGeometry",
    "Triangulation",
    "default_stereo_geometry",
    "GEOMETRY_SCHEMA",
    "geometry_from_json",
    "read_geometry",
    "write_geometry",
]
