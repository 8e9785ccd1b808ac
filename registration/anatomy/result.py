"""The result of an anatomy registration: its pose, correction, similarity and quality (with the reason codes).

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

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
