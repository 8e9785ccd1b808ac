"""spineguide.tracking: the real-time service, fiducial localisation, the virtual room and simulators, console, CLI.

Top layer: may import :mod:`registration` and :mod:`calibration`. One room a job (docs/ARCHITECTURE.md):
``service/``, ``localisation/``, ``room/``, ``sim/``, ``console/``, ``cli/``; the value types they share,
:mod:`.frames` and :mod:`.errors`, live here.
"""

from __future__ import annotations

from spineguide.calibration._lazy import lazy_exports

#: Public name -> the submodule that defines it. Imported on first use (PEP 562), so that importing one
#: submodule (e.g. the CLI's errors) does not pull in numba, OpenCV, SciPy and SimpleITK.
_LAZY = {
    "Detection": "localisation.detection",
    "DetectionConfig": "localisation.detection",
    "detect_seeds": "localisation.detection",
    "FiducialNotFoundError": "errors",
    "FrameError": "errors",
    "StaleFrameError": "errors",
    "TrackingError": "errors",
    "WireSchemaError": "errors",
    "FiducialConfig": "localisation.fiducials",
    "FiducialResult": "localisation.fiducials",
    "ImagerLabelError": "localisation.fiducials",
    "localise_fiducials": "localisation.fiducials",
    "KvFrame": "frames",
    "read_frame": "frames",
    "read_stereo_frames": "frames",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
