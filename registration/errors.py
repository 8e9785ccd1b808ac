"""Exceptions of the registration package (CT volumes, DRRs, 2D/3D and point registration, poses)."""

from __future__ import annotations

__all__ = [
    "RegistrationError",
    "PoseError",
    "VolumeError",
    "VolumeFileError",
    "PatientPositionError",
    "DRRError",
    "NotConvergedError",
]


class RegistrationError(Exception):
    """Root of every error raised by :mod:`registration`."""


class PoseError(RegistrationError, ValueError):
    """A rigid transform is not valid (not a rotation, not finite, wrong shape)."""


class VolumeError(RegistrationError, ValueError):
    """A CT volume is unusable (NaN, wrong shape, non-uniform or tilted grid...)."""


class VolumeFileError(VolumeError):
    """A CT file or DICOM series cannot be read; the message names the file."""


class PatientPositionError(VolumeError):
    """The patient position is missing or not one of HFS, FFS, HFP, FFP."""


class DRRError(RegistrationError, ValueError):
    """A DRR cannot be computed with the given arguments."""


class NotConvergedError(RegistrationError):
    """An optimiser did not reach its tolerance."""
