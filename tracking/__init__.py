"""spineguide.tracking: frame sources, detection, the real-time loop, gating, ZeroMQ and the CLI.

Top layer: may import :mod:`registration` and :mod:`calibration`.
"""

from .detection import Detection, DetectionConfig, detect_seeds
from .errors import FiducialNotFoundError, FrameError, StaleFrameError, TrackingError, WireSchemaError
from .fiducials import FiducialConfig, FiducialResult, ImagerLabelError, localise_fiducials
from .frames import KvFrame, read_frame, read_stereo_frames

__all__ = [
    "Detection",
    "DetectionConfig",
    "detect_seeds",
    "FiducialNotFoundError",
    "FrameError",
    "StaleFrameError",
    "TrackingError",
    "WireSchemaError",
    "FiducialConfig",
    "FiducialResult",
    "ImagerLabelError",
    "localise_fiducials",
    "KvFrame",
    "read_frame",
    "read_stereo_frames",
]
