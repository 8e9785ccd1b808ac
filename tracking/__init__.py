"""spineguide.tracking: frame sources, detection, the real-time loop, gating, ZeroMQ and the CLI.

Top layer: may import :mod:`registration` and :mod:`calibration`.
"""

from __future__ import annotations

from spineguide.calibration._lazy import lazy_exports

#: Public name -> the submodule that defines it. Imported on first use (PEP 562), so that importing one
#: submodule (e.g. the CLI's errors) does not pull in numba, OpenCV, SciPy and SimpleITK.
_LAZY = {
    "Detection": "detection",
    "DetectionConfig": "detection",
    "detect_seeds": "detection",
    "FiducialNotFoundError": "errors",
    "FrameError": "errors",
    "StaleFrameError": "errors",
    "TrackingError": "errors",
    "WireSchemaError": "errors",
    "FiducialConfig": "fiducials",
    "FiducialResult": "fiducials",
    "ImagerLabelError": "fiducials",
    "localise_fiducials": "fiducials",
    "KvFrame": "frames",
    "read_frame": "frames",
    "read_stereo_frames": "frames",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
