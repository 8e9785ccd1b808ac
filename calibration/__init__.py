"""spineguide.calibration: stereo kV imaging geometry, phantom calibration and daily QA.

Lowest layer of spineguide: it imports nothing from ``registration`` or
``tracking``. Everything here is in the IEC 61217 room frame, millimetres.
"""

from __future__ import annotations

from ._lazy import lazy_exports

#: Public name -> the submodule that defines it. Imported on first use (PEP 562), so that importing one
#: submodule (e.g. the CLI's errors) does not pull in numba, OpenCV, SciPy and SimpleITK.
_LAZY = {
    "CalibrationError": "errors",
    "GeometryError": "errors",
    "GeometryFileError": "errors",
    "SchemaError": "errors",
    "MATRIX_AGREEMENT_LIMIT_PX": "geometry",
    "ImagerGeometry": "geometry",
    "StereoGeometry": "geometry",
    "Triangulation": "geometry",
    "default_stereo_geometry": "geometry",
    "GEOMETRY_SCHEMA": "io",
    "geometry_from_json": "io",
    "read_geometry": "io",
    "write_geometry": "io",
    "BBPhantom": "phantom",
    "Marker": "phantom",
    "PhantomError": "phantom",
    "PhantomFileError": "phantom",
    "default_phantom": "phantom",
    "phantom_from_json": "phantom",
    "read_phantom": "phantom",
    "write_phantom": "phantom",
    "DetectionError": "bb_detection",
    "ImagesSwappedError": "bb_detection",
    "MarkerCountError": "bb_detection",
    "detect_bbs": "bb_detection",
    "match_markers": "bb_detection",
    "CalibrationFrame": "solve",
    "CalibrationResult": "solve",
    "CalibrationSolveError": "solve",
    "PhantomView": "solve",
    "calibrate": "solve",
    "solve_geometry": "solve",
    "QAHistoryError": "qa",
    "QAResult": "qa",
    "QAStatus": "qa",
    "QATolerances": "qa",
    "append_history": "qa",
    "read_history": "qa",
    "run_qa": "qa",
    "trend": "qa",
    "append_failure": "qa",
    "IsocentreReference": "isocentre",
    "read_winston_lutz": "isocentre",
    "laser_pose": "isocentre",
    "acceptance_gate": "gate",
    "CouchExposure": "protocol",
    "depth_protocol": "protocol",
    "CouchErrorEstimate": "solve",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
