"""What fiducial localisation returns: :class:`FiducialResult`, its seeds (:class:`SeedLocalisation`), the
stereo :class:`Correspondence` it rests on, and its :class:`FiducialFlag` conditions.

Part of :mod:`spineguide.tracking.localisation.fiducials` (see its docstring for the method).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from spineguide.registration.points import PointFlag, PointRegistrationResult
from spineguide.registration.pose import Correction, Pose


__all__ = ["Correspondence", "FiducialFlag", "FiducialResult", "SeedLocalisation"]


class FiducialFlag(Enum):
    """Conditions reported with a fiducial result."""

    TRANSLATION_ONLY = "translation_only"
    ROTATION_UNRELIABLE = "rotation_unreliable"
    TARGET_UNRELIABLE = "target_unreliable"  # predicted target error at the isocentre above the limit
    SEED_EXCLUDED = "seed_excluded"
    SEED_MISSING = "seed_missing"
    SEEDS_OVERLAP = "seeds_overlap"
    EXTRA_DETECTIONS = "extra_detections"
    FAINT_SEARCH = "faint_search"  # found by the plan-guided search (low dose, scatter)


_FROM_POINT_FLAG = {
    PointFlag.TRANSLATION_ONLY: FiducialFlag.TRANSLATION_ONLY,
    PointFlag.ROTATION_UNRELIABLE: FiducialFlag.ROTATION_UNRELIABLE,
    PointFlag.TARGET_UNRELIABLE: FiducialFlag.TARGET_UNRELIABLE,
    PointFlag.SEED_EXCLUDED: FiducialFlag.SEED_EXCLUDED,
}


@dataclass(frozen=True, slots=True)
class SeedLocalisation:
    """One planned seed: where it was seen and how well.

    Attributes
    ----------
    name : str
    found : bool
        Seen in both views and assigned.
    pixels_px : dict of imager name -> (2,) array, or None
        Detected ``(col, row)`` in each view.
    point_room_mm : (3,) array or None
        Triangulated position, room frame, mm.
    ray_distance_mm : float or None
        Skew distance between the two back-projected rays, mm.
    reprojection_px : float or None
        Largest distance between a detection and the reprojected 3D point, px.
    residual_mm : float or None
        ``|P(planned) - measured|`` after registration, mm.
    migrated : bool
        Excluded by the rigid-body check.
    snr : dict of imager name -> float, or None
        The seed's detection confidence in each view, as its detector measured it: the clean-frame
        detector's matched-filter peak over the window's robust noise, or (faint search, ``FAINT_SEARCH``)
        the seed-shadow fit's amplitude over its standard error. Dimensionless; None when not found.
    """

    name: str
    found: bool
    pixels_px: dict | None
    point_room_mm: np.ndarray | None
    ray_distance_mm: float | None
    reprojection_px: float | None
    residual_mm: float | None
    migrated: bool
    snr: dict | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "found": self.found,
            "pixels_px": None if self.pixels_px is None else {k: v.tolist() for k, v in self.pixels_px.items()},
            "point_room_mm": None if self.point_room_mm is None else self.point_room_mm.tolist(),
            "ray_distance_mm": self.ray_distance_mm,
            "reprojection_px": self.reprojection_px,
            "residual_mm": self.residual_mm,
            "migrated": self.migrated,
            "snr": None if self.snr is None else {k: float(v) for k, v in self.snr.items()},
        }


@dataclass(frozen=True, slots=True)
class Correspondence:
    """Detections assigned to planned seeds and triangulated (one labelling).

    Attributes
    ----------
    imagers : tuple of str
        The two imager names, in the order of ``detection_index``.
    detection_index : (N, 2) int array
        Per planned seed, the index of its detection in each view (-1: not found).
    points_room_mm : (N, 3) array
        Triangulated positions (rows of unfound seeds are zero; see ``found``).
    ray_distance_mm, reprojection_px : (N,) arrays
        Skew distance of the rays (mm) and largest reprojection error (px)
        (zero for unfound seeds).
    found : (N,) bool array
    cost_mm : float
        Sum of the inter-seed distance changes of the assignment, mm.
    """

    imagers: tuple[str, str]
    detection_index: np.ndarray
    points_room_mm: np.ndarray
    ray_distance_mm: np.ndarray
    reprojection_px: np.ndarray
    found: np.ndarray
    cost_mm: float

    @property
    def n_found(self) -> int:
        return int(np.count_nonzero(self.found))


@dataclass(frozen=True, slots=True)
class FiducialResult:
    """Outcome of :func:`localise_fiducials` for one stereo pair.

    Attributes
    ----------
    correction : Correction
        Couch correction ``C = P^-1`` (docs/CONVENTIONS.md), room frame.
    pose : Pose
        Patient pose ``p_actual = R p_planned + t``.
    registration : PointRegistrationResult
    seeds : tuple of SeedLocalisation
        One per planned seed, in plan order.
    fre_mm : float
        Fiducial registration error (RMS over the used seeds), mm.
    ok : bool
        6-DoF result with a reliable rotation and ``fre_mm <= max_fre_mm``.
    flags : frozenset of FiducialFlag
    n_detections : dict of imager name -> int
    detection_ms : float
        Seed detection in both frames, ms (monotonic clock).
    matching_ms : float
        Correspondence, triangulation and registration (both labellings), ms.
    total_ms : float
        Frames in to correction out, ms.
    overlapping : tuple of str
        Seeds left out because their shadows touch another seed's in one
        view (flag ``SEEDS_OVERLAP``).
    """

    correction: Correction
    pose: Pose
    registration: PointRegistrationResult
    seeds: tuple[SeedLocalisation, ...]
    fre_mm: float
    ok: bool
    flags: frozenset
    n_detections: dict
    detection_ms: float
    matching_ms: float
    total_ms: float
    overlapping: tuple[str, ...] = ()

    def quality_json(self) -> dict:
        """The ``quality`` object of a ``correction/1`` message or CLI report."""
        return {
            "ok": self.ok,
            "fre_mm": self.fre_mm,
            # Expected target error at the isocentre (3D RMS, mm; registration.points); null with 1-2 seeds.
            "predicted_tre_mm": (float(self.registration.predicted_tre_mm)
                                 if np.isfinite(self.registration.predicted_tre_mm) else None),
            "flags": sorted(f.value for f in self.flags),
            "seeds": [s.to_json() for s in self.seeds],
            "n_detections": dict(self.n_detections),
            "overlapping": list(self.overlapping),
        }
