"""Exceptions of the calibration package (imaging geometry, calibration, QA)."""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "GeometryError",
    "GeometryFileError",
    "SchemaError",
    "ReportError",
    "CalibrationSolveError",
    "DetectionError",
    "MarkerCountError",
    "ImagesSwappedError",
    "IsocentreReferenceError",
    "PhantomError",
    "PhantomFileError",
    "QAHistoryError",
]


class CalibrationError(Exception):
    """Root of every error raised by :mod:`calibration`."""


class GeometryError(CalibrationError, ValueError):
    """An imaging geometry is not physically valid (bad vector, degenerate matrix, ...)."""


class GeometryFileError(GeometryError):
    """A ``kv-geometry/1`` file cannot be read or is inconsistent."""


class SchemaError(GeometryFileError):
    """A file or message carries a ``schema`` we do not know."""


class ReportError(CalibrationError):
    """A report cannot be written."""


class CalibrationSolveError(CalibrationError, ValueError):
    """The geometry cannot be solved from the measurements given."""


class DetectionError(CalibrationError, ValueError):
    """A frame cannot be analysed (bad shape, dtype, i0...)."""


class ImagesSwappedError(DetectionError):
    """The frames given for two imagers match the other imager's view better than their own."""


class MarkerCountError(DetectionError):
    """Too few of the phantom's markers were found in a frame."""


class IsocentreReferenceError(CalibrationError):
    """A Winston-Lutz file or laser pose that cannot be used (names file and field)."""


class PhantomError(CalibrationError, ValueError):
    """A phantom description is not valid (too few markers, coplanar, overlapping...)."""


class PhantomFileError(PhantomError):
    """A ``bb-phantom/1`` file cannot be read or is malformed."""


class QAHistoryError(CalibrationError, ValueError):
    """A QA history file cannot be read or holds a malformed record."""
