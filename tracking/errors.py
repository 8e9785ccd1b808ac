"""Exceptions of the tracking package (frame sources, detection, the loop, gating, wire, CLI)."""

from __future__ import annotations

__all__ = ["TrackingError", "FrameError", "FiducialNotFoundError", "StaleFrameError", "WireSchemaError"]


class TrackingError(Exception):
    """Root of every error raised by :mod:`tracking`."""


class FrameError(TrackingError, ValueError):
    """A kV frame is unusable: wrong size for its imager, NaN, unreadable file, bad i0."""


class FiducialNotFoundError(TrackingError):
    """Too few fiducials were found to compute a result."""


class StaleFrameError(TrackingError):
    """A frame is older than the staleness limit."""


class WireSchemaError(TrackingError, ValueError):
    """A message carries an unknown schema or malformed content."""
