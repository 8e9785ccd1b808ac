"""The result of an anatomy registration: its pose, correction, similarity and quality (with the reason codes).

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import numpy as np

from ..motion_prior import check_covariance
from ..pose import Correction, Pose


class QualityReason(Enum):
    """Why a registration result cannot be trusted (wire value = short code)."""

    OK = "ok"
    ROI_OFF_PANEL = "roi_off_panel"
    SATURATED = "saturated"
    WRONG_LEVEL = "wrong_level"
    AT_BOUNDS = "at_bounds"
    NOT_CONVERGED = "not_converged"
    LOW_SIMILARITY = "low_similarity"
    VIEWS_DISAGREE = "views_disagree"
    ILL_DEFINED = "ill_defined"
    #: One view only: the result lies far outside the motion prior it was estimated against (the patient moved
    #: more than the prior allows, or the view matched the wrong thing); its out-of-plane part is then unfounded.
    PRIOR_CONFLICT = "prior_conflict"


# --------------------------------------------------------------------------- result
def _frozen_map(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class AnatomyQuality:
    """How far an anatomy registration can be trusted.

    Attributes
    ----------
    ok : bool
        False when any check failed; ``reason`` says which first.
    reason : QualityReason
    reasons : tuple of QualityReason
        Every failed check (empty when ok).
    similarity : mapping imager -> float
        Final value of the optimised measure per view.
    measures : mapping imager -> mapping measure name -> float
        All :class:`Similarity` measures per view at the final pose.
    view_shift_mm : mapping imager -> float
        Residual 2D shift that would best improve each view alone, mm at the isocentre.
    std_mm, std_deg : (3,) tuple
        Curvature-based standard deviations of the translation (mm) and
        rotation (degrees) about the ROI centre (independent-residual model).
    roi_on_panel : mapping imager -> float
        Fraction of the projected ROI box on the panel.
    saturated_fraction : mapping imager -> float
    level_margin : float or None
        Gradient correlation of the ROI's neighbourhood at the result minus the
        best one a vertebral level up or down the spine (worse of the two views);
        negative means another level matches better. None in tracking mode.
    converged, at_bounds : bool
    """

    ok: bool
    reason: QualityReason
    reasons: tuple[QualityReason, ...]
    similarity: Mapping[str, float]
    measures: Mapping[str, Mapping[str, float]]
    view_shift_mm: Mapping[str, float]
    std_mm: tuple[float, float, float]
    std_deg: tuple[float, float, float]
    roi_on_panel: Mapping[str, float]
    saturated_fraction: Mapping[str, float]
    level_margin: float | None
    converged: bool
    at_bounds: bool

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "reason": self.reason.value,
            "reasons": [r.value for r in self.reasons],
            "similarity": dict(self.similarity),
            "measures": {k: dict(v) for k, v in self.measures.items()},
            "view_shift_mm": dict(self.view_shift_mm),
            "std_mm": list(self.std_mm),
            "std_deg": list(self.std_deg),
            "roi_on_panel": dict(self.roi_on_panel),
            "saturated_fraction": dict(self.saturated_fraction),
            "level_margin": self.level_margin,
            "converged": self.converged,
            "at_bounds": self.at_bounds,
        }


@dataclass(frozen=True, slots=True)
class AnatomyResult:
    """Outcome of one stereo anatomy registration.

    Attributes
    ----------
    pose : Pose
        Patient pose found (room frame, mm; ``p_actual = R p_planned + t``).
    correction : Correction
        The couch correction ``pose^-1``: what is sent to the delivery system.
    similarity : mapping imager -> float
        Final optimised similarity per view.
    quality : AnatomyQuality
    iterations : int
        Levenberg-Marquardt iterations over all levels.
    drr_evaluations : int
        DRRs computed (one per view per pose evaluated; one pass of DRR plus pose
        derivatives counts as one).
    elapsed_ms : float
        Wall time of the registration (monotonic clock), ms.
    tracking : bool
        True when started from a previous result without the global stage.
    """

    pose: Pose
    correction: Correction
    similarity: Mapping[str, float]
    quality: AnatomyQuality
    iterations: int
    drr_evaluations: int
    elapsed_ms: float
    tracking: bool = False

    def to_json(self) -> dict:
        """The ``spineguide register`` JSON: correction, method, quality, elapsed_s (plus pose)."""
        return {
            "method": "anatomy",
            "correction": self.correction.to_json(),
            "pose": self.pose.to_json(),
            "quality": self.quality.to_json(),
            "elapsed_s": self.elapsed_ms / 1000.0,
            "iterations": self.iterations,
            "drr_evaluations": self.drr_evaluations,
            "tracking": self.tracking,
        }


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass(frozen=True, slots=True)
class OneViewAnatomyResult:
    """Outcome of a one-view anatomy registration (:meth:`AnatomyRegistration.register_one_view`).

    One view pins the pose in its panel's plane (two translations and the rotation about its central ray);
    the translation along the central ray and the two rotations about in-plane axes come mostly from the
    motion prior: ``pose_cov`` says so, and the beam gate is meant to use it (``target_covariance_mm2``).

    Attributes
    ----------
    imager : str
        The imager whose frame was registered.
    pose : Pose
        Patient pose found (room frame, docs/CONVENTIONS.md); the prior's mean when refused.
    pose_cov : (6, 6) array, read-only
        Covariance of ``[tx, ty, tz, pitch, roll, yaw]`` of ``pose`` (mm^2, mm*deg, deg^2; the six-vector of
        :func:`spineguide.registration.motion_prior.pose_six`, rotations about the isocentre), the prior
        included; the prior's own covariance when refused.
    ok : bool
        False when any check failed.
    reason : str
        First failed check's code (``QualityReason`` value), ``''`` when ok.
    total_ms : float
        Wall time of the call (monotonic clock), ms.
    reasons : tuple of str
        Every failed check's code.
    similarity : float
        Final optimised similarity of the view (NaN when refused before registering).
    view_shift_mm : float
        2D shift of the view's DRR that would best improve the image term alone at the result, mm at the
        isocentre: the image and the prior disagreeing in the panel's plane.
    roi_on_panel, saturated_fraction : float
    converged, at_bounds : bool
    prior_chi2 : float
        ``(x - x_prior)^T C_prior^-1 (x - x_prior)`` at the result (chi-square, 6 degrees of freedom under the prior).
    image_sigma : float
        Noise scale of the image residual used for the covariance (effective, correlation included).
    correlation_factor : float
        How many residual elements act as one independent sample (the spatial correlation's inflation of the
        independent-residual variance).
    target_std_in_plane_mm, target_std_out_of_plane_mm : float
        Standard deviations of the ROI centre's deviation: largest across the central ray, and along it.
    iterations, drr_evaluations : int
    """

    imager: str
    pose: Pose
    pose_cov: np.ndarray
    ok: bool
    reason: str
    total_ms: float
    reasons: tuple[str, ...] = ()
    similarity: float = math.nan
    view_shift_mm: float = math.nan
    roi_on_panel: float = math.nan
    saturated_fraction: float = math.nan
    converged: bool = False
    at_bounds: bool = False
    prior_chi2: float = math.nan
    image_sigma: float = math.nan
    correlation_factor: float = math.nan
    target_std_in_plane_mm: float = math.nan
    target_std_out_of_plane_mm: float = math.nan
    iterations: int = 0
    drr_evaluations: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pose_cov", check_covariance(self.pose_cov, 6, f"one-view result '{self.imager}'"))
        object.__setattr__(self, "reasons", tuple(str(r) for r in self.reasons))

    @property
    def correction(self) -> Correction:
        """The couch correction ``pose^-1``."""
        return self.pose.to_correction()

    def quality_json(self) -> dict:
        """The quality figures as a JSON object (numbers finite; a figure not measured is null)."""
        std = np.sqrt(np.maximum(np.diag(self.pose_cov), 0.0))
        return {
            "ok": bool(self.ok),
            "reason": self.reason,
            "reasons": list(self.reasons),
            "imager": self.imager,
            "views": 1,
            "similarity": _finite_or_none(self.similarity),
            "view_shift_mm": _finite_or_none(self.view_shift_mm),
            "roi_on_panel": _finite_or_none(self.roi_on_panel),
            "saturated_fraction": _finite_or_none(self.saturated_fraction),
            "converged": bool(self.converged),
            "at_bounds": bool(self.at_bounds),
            "prior_chi2": _finite_or_none(self.prior_chi2),
            "image_sigma": _finite_or_none(self.image_sigma),
            "correlation_factor": _finite_or_none(self.correlation_factor),
            "std_mm": [float(v) for v in std[:3]],
            "std_deg": [float(v) for v in std[3:]],
            "target_std_in_plane_mm": _finite_or_none(self.target_std_in_plane_mm),
            "target_std_out_of_plane_mm": _finite_or_none(self.target_std_out_of_plane_mm),
            "iterations": int(self.iterations),
            "drr_evaluations": int(self.drr_evaluations),
            "total_ms": float(self.total_ms),
        }
