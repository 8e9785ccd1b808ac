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
from .phantom import BBPhantom, Marker, PhantomError, PhantomFileError, default_phantom, phantom_from_json, read_phantom, write_phantom
from .bb_detection import DetectionError, ImagesSwappedError, MarkerCountError, detect_bbs, match_markers
from .solve import CalibrationFrame, CalibrationResult, CalibrationSolveError, PhantomView, calibrate, solve_geometry
from .qa import QAHistoryError, QAResult, QAStatus, QATolerances, append_history, read_history, run_qa, trend

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
    "BBPhantom",
    "Marker",
    "PhantomError",
    "PhantomFileError",
    "default_phantom",
    "phantom_from_json",
    "read_phantom",
    "write_phantom",
    "DetectionError",
    "ImagesSwappedError",
    "MarkerCountError",
    "detect_bbs",
    "match_markers",
    "CalibrationFrame",
    "CalibrationResult",
    "CalibrationSolveError",
    "PhantomView",
    "calibrate",
    "solve_geometry",
    "QAHistoryError",
    "QAResult",
    "QAStatus",
    "QATolerances",
    "append_history",
    "read_history",
    "run_qa",
    "trend",
]
