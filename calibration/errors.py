"""Exceptions of the calibration package (imaging geometry, calibration, QA)."""

from __future__ import annotations

__all__ = ["CalibrationError", "GeometryError", "GeometryFileError", "SchemaError"]


class CalibrationError(Exception):
    """Root of every error raised by :mod:`calibration`."""


class GeometryError(CalibrationError, ValueError):
    """An imaging geometry is not physically valid (bad vector, degenerate matrix, ...)."""


class GeometryFileError(GeometryError):
    """A ``kv-geometry/1`` file cannot be read or is inconsistent."""


class SchemaError(GeometryFileError):
    """A file or message carries a ``schema`` we do not know."""
