"""spineguide.tracking: frame sources, detection, the real-time loop, gating, ZeroMQ and the CLI.

Top layer: may import :mod:`registration` and :mod:`calibration`.
"""

from .errors import FiducialNotFoundError, FrameError, StaleFrameError, TrackingError, WireSchemaError

__all__ = ["FiducialNotFoundError", "FrameError", "StaleFrameError", "TrackingError", "WireSchemaError"]
