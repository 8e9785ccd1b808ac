"""Exceptions of the registration package (CT volumes, DRRs, 2D/3D and point registration, poses)."""

from __future__ import annotations

__all__ = [
    "RoiError",
    "AnatomyConfigError",
    "RegistrationFrameError",
    "RegistrationError",
    "PoseError",
    "VolumeError",
    "VolumeFileError",
    "PatientPositionError",
    "DRRError",
    "NotConvergedError",
    "DicomExportError",
    "PlanError",
    "DicomRTError",
    "FiducialFileError",
    "FiducialSchemaError",
    "CTSeedError",
    "PointRegistrationError",
    "SeedMigrationError",
    "MotionPriorError",
    "LevelError",
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


class DicomExportError(RegistrationError, ValueError):
    """An object cannot be exported: identity missing, frame unusable, geometry degenerate."""


class PlanError(RegistrationError, ValueError):
    """A plan cannot be assembled: parts missing, or parts that do not belong together."""


class DicomRTError(RegistrationError, ValueError):
    """An RT Structure Set or RT Plan is unusable; the message names the file and the item."""


class FiducialFileError(RegistrationError, ValueError):
    """A planned-fiducials file or set is unusable; the message names the file and the entry."""


class FiducialSchemaError(FiducialFileError):
    """A planned-fiducials document carries a ``schema`` we do not know."""


class CTSeedError(RegistrationError, ValueError):
    """Seed search in a CT was asked something impossible (bad limits, wrong input)."""


class PointRegistrationError(RegistrationError, ValueError):
    """Point registration cannot give a trustworthy pose (too few seeds, bad input)."""


class SeedMigrationError(PointRegistrationError):
    """Inter-seed distances changed beyond the limit and no single seed explains it."""


class RoiError(RegistrationError, ValueError):
    """A region of interest is unusable (empty, wrong grid, unknown label)."""


class AnatomyConfigError(RegistrationError, ValueError):
    """An anatomy-registration setting is out of its valid range."""


class RegistrationFrameError(RegistrationError, ValueError):
    """A kV frame cannot be used for registration (wrong shape, non-finite, negative, no signal)."""


class MotionPriorError(RegistrationError, ValueError):
    """A motion prior or a covariance is not valid (shape, finiteness, symmetry, definiteness)."""


class LevelError(RegistrationError, ValueError):
    """Bad per-level registration input: unknown target, levels not ordered cranial to caudal, overlapping ROIs."""
