"""spineguide.tracking: frame sources, detection, the real-time loop, gating, ZeroMQ and the CLI.

Top layer: may import :mod:`registration` and :mod:`calibration`.
"""

from __future__ import annotations

import importlib

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

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
