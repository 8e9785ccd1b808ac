"""Exceptions of the tracking package (frame sources, detection, the loop, gating, wire, CLI)."""

from __future__ import annotations

__all__ = [
    "TrackingError",
    "FrameError",
    "FiducialNotFoundError",
    "StaleFrameError",
    "WireSchemaError",
    "SimulationError",
    "MotionError",
    "CommandRefused",
    "DicomNetworkError",
    "ConfigError",
    "RecordError",
    "FiducialConfigError",
    "ImagerLabelError",
    "SecurityError",
    "PayloadSizeError",
    "NonFinitePixelsError",
    "ConsoleConfigError",
    "ReviewError",
    "VirtualPhantomError",
    "CliError",
]


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


class SimulationError(TrackingError, ValueError):
    """The simulator was given an unusable argument."""


class MotionError(TrackingError, ValueError):
    """A motion trace was given unusable parameters."""


class CommandRefused(TrackingError):
    """A command that is unknown, malformed or not valid in the current state."""


class DicomNetworkError(TrackingError):
    """A DICOM association or transfer failed; the message names the peer and what failed."""


class ConfigError(TrackingError, ValueError):
    """The service configuration is missing, malformed, or holds an invalid value."""


class RecordError(TrackingError):
    """The session record cannot be written or read."""


class ImagerLabelError(TrackingError, ValueError):
    """The frames fit the imagers better under swapped labels, or the labelling cannot be told."""


class FiducialConfigError(TrackingError, ValueError):
    """A fiducial-localisation setting is out of range."""


class SecurityError(TrackingError):
    """Keys missing, unreadable or malformed; CURVE not available."""


class NonFinitePixelsError(FrameError):
    """A float ``kvframe/1`` carries NaN or infinite pixels (HOLD ``nan_frame``)."""


class PayloadSizeError(FrameError):
    """A ``kvframe/1`` pixel payload does not match its header's rows x cols x dtype (HOLD ``corrupt_frame``)."""


class ConsoleConfigError(TrackingError, ValueError):
    """The console cannot be configured as asked (bad host, token, path or value)."""


class ReviewError(RecordError):
    """A session cannot be reviewed (not a session record, or a name outside the records folder)."""


class VirtualPhantomError(TrackingError, ValueError):
    """A virtual-room phantom cannot be built with the given arguments (:mod:`spineguide.tracking.room.phantoms`)."""


class CliError(TrackingError):
    """A user error on the command line (bad value, missing file)."""
