"""Stereo 6-DoF 2D/3D registration of vertebral and skull anatomy to the planning CT.

A pair of raw kV frames is matched to DRRs of a region of interest (ROI) of the
planning CT, jointly over both views, to find the patient pose
``p_actual = R p_planned + t`` (room frame, mm, rotations about the
isocentre; docs/CONVENTIONS.md) and its couch correction ``C = P^-1``.

Method (``docs/ANATOMY_REGISTRATION.md``):

1. ROI volume: attenuation at the imaging energy in excess of water,
   ``max(mu - mu_water, 0)``, kept only inside the (slightly dilated) ROI mask
   and cropped to it (:meth:`AttenuationVolume.masked`). The excess over
   water is what makes a bone edge visible in a radiograph, and a box ROI then
   has no artificial box outline in its DRR. A background volume (everything
   else) is carried as a DRR linear in the pose.
2. Global stage (skipped in tracking mode): per view, a DRR of the ROI's
   neighbourhood (a 120 mm cube of anatomy around it, tapered at its faces) at
   the start pose is matched over a window of the radiograph by gradient
   correlation as a function of 2D shift (``cv2.matchTemplate`` on Sobel
   derivatives); the two shifts are triangulated into a 3D translation. A
   single vertebra matches its neighbours almost as well as itself; its
   neighbourhood does not.
3. Refinement, coarse to fine: a first level on the neighbourhood (long lever
   arm for the rotations), then the ROI; Levenberg-Marquardt on the
   least-squares form of the similarity (normalised gradient images for
   gradient correlation, normalised intensities for NCC), central-difference
   pose derivatives from batched DRRs (all 12 displaced poses of a view in one
   kernel call, the two views on two threads), rotations about the ROI centre.
4. Quality: per-view similarity, each view's residual 2D shift at the joint
   optimum, curvature (Gauss-Newton covariance), ROI on the panel, saturated
   pixels, bounds, convergence, and a wrong-level check at the result (the
   neighbourhood's match there against one vertebral level up or down the
   spine, at twice the global stage's resolution); ``quality.ok`` is False
   with a reason code when the match cannot be trusted.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import cv2
import numpy as np
import scipy.ndimage

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry

from ._anatomy_kernels import linear_model, normal_equations
from .attenuation import DEFAULT_CT_ENERGY_KEV, DEFAULT_IMAGING_ENERGY_KEV, hu_to_mu_per_mm, linear_attenuation_per_mm
from .drr import PROJECTORS, AttenuationVolume, PanelRegion, compute_drr_batch, compute_drr_pose_derivatives
from .errors import AnatomyConfigError, RegistrationError, RoiError
from .pose import Correction, Pose
from .pose import rotation_matrix as _rotation_matrix
from .similarity import RegistrationFrameError, Similarity, image_gradients, line_integrals, similarity
from .volume import CTVolume

__all__ = [
    "AnatomyConfig",
    "AnatomyQuality",
    "AnatomyRegistration",
    "AnatomyResult",
    "PyramidLevel",
    "QualityReason",
    "RegionOfInterest",
    "RoiError",
    "AnatomyConfigError",
    "register_anatomy",
]

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------ ROI
@dataclass(frozen=True, slots=True)
class RegionOfInterest:
    """A 3D region of the planning CT on its voxel grid.

    Attributes
    ----------
    mask : (nk, nj, ni) bool, read-only
        True inside the ROI, on the CT's ``[k, j, i]`` grid.
    description : str
        What the ROI is, for messages (``"label 3 +-1"``, ``"box 40x40x30 mm"``).
    level_spacing_mm : float or None
        Distance between neighbouring vertebrae near the target (mm), if the
        ROI knows it (label ROIs); used by the wrong-level check.
    """

    mask: np.ndarray
    description: str = "mask"
    level_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        m = np.array(self.mask, dtype=bool)
        if m.ndim != 3:
            raise RoiError(f"ROI '{self.description}': mask must be 3D [k, j, i], got shape {m.shape}")
        if not np.any(m):
            raise RoiError(f"ROI '{self.description}': mask selects no voxel")
        m.setflags(write=False)
        object.__setattr__(self, "mask", m)
        if self.level_spacing_mm is not None:
            s = float(self.level_spacing_mm)
            if not math.isfinite(s) or s <= 0:
                raise RoiError(f"ROI '{self.description}': level spacing must be positive mm, got {s!r}")
            object.__setattr__(self, "level_spacing_mm", s)

    @classmethod
    def from_mask(cls, mask: np.ndarray, description: str = "mask") -> "RegionOfInterest":
        """Any non-zero voxel of a ``[k, j, i]`` array is inside."""
        return cls(np.asarray(mask) != 0, description)

    @classmethod
    def from_labels(
        cls, ct: CTVolume, labels: np.ndarray, target_label: int, neighbours: int = 0
    ) -> "RegionOfInterest":
        """The voxels labelled ``target_label`` (plus ``neighbours`` levels either side).

        Parameters
        ----------
        ct : CTVolume
            Planning CT; ``labels`` must share its grid.
        labels : (nk, nj, ni) int array
            Vertebra labels, consecutive integers along the spine.
        target_label : int
        neighbours : int
            0 for the target vertebra alone, 1 for target +-1 level.

        Raises
        ------
        RoiError
            Grid mismatch, negative ``neighbours`` or a target label absent.
        """
        lab = np.asarray(labels)
        if lab.shape != ct.hu.shape:
            raise RoiError(f"ROI labels: shape {lab.shape} does not match the CT {ct.hu.shape} ({ct.source})")
        if isinstance(neighbours, bool) or int(neighbours) != neighbours or neighbours < 0:
            raise RoiError(f"ROI labels: neighbours must be a non-negative integer, got {neighbours!r}")
        target = int(target_label)
        if not np.any(lab == target):
            present = sorted(int(v) for v in np.unique(lab) if v != 0)
            raise RoiError(f"ROI labels: label {target} not present (labels present: {present})")
        n = int(neighbours)
        mask = (lab >= target - n) & (lab <= target + n) & (lab != 0)

        def centre_lps(value: int) -> np.ndarray | None:
            idx = np.argwhere(lab == value)
            return None if idx.size == 0 else ct.index_to_lps(idx[:, ::-1].mean(axis=0))

        c0 = centre_lps(target)
        gaps = [float(np.linalg.norm(c - c0)) for c in (centre_lps(target - 1), centre_lps(target + 1)) if c is not None]
        desc = f"label {target}" + (f" +-{n}" if n else "")
        return cls(mask, desc, min(gaps) if gaps else None)

    @classmethod
    def from_box(
        cls, ct: CTVolume, centre_lps_mm: Sequence[float], half_size_mm: Sequence[float]
    ) -> "RegionOfInterest":
        """Voxels whose centres lie in an LPS-axis-aligned box (CT LPS mm, half sizes in mm)."""
        c = np.asarray(centre_lps_mm, dtype=np.float64)
        h = np.asarray(half_size_mm, dtype=np.float64)
        if c.shape != (3,) or h.shape != (3,) or not np.all(np.isfinite(c)) or not np.all(np.isfinite(h)):
            raise RoiError(f"ROI box: centre and half size must be three finite numbers each, got {c} and {h}")
        if np.any(h <= 0):
            raise RoiError(f"ROI box: half sizes must be positive mm, got {h.tolist()}")
        nk, nj, ni = ct.hu.shape
        kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        lps = ct.index_to_lps(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
        inside = np.all(np.abs(lps - c) <= h, axis=1).reshape(nk, nj, ni)
        desc = "box {:g}x{:g}x{:g} mm at LPS ({:g}, {:g}, {:g})".format(*(2 * h), *c)
        if not np.any(inside):
            raise RoiError(f"ROI {desc}: the box holds no voxel centre of the CT ({ct.source})")
        return cls(inside, desc)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class PyramidLevel:
    """One resolution level of the refinement.

    Attributes
    ----------
    volume_factor : int
        ROI volume downsampled by this factor per axis (block mean).
    binning : int
        DRR and radiograph pixels are ``binning x binning`` panel pixels.
    smoothing_sigma_px : float
        Gaussian smoothing of both images before comparison, binned pixels.
    max_iterations : int
        Levenberg-Marquardt iterations at this level.
    supersampling : int
        Rays per binned pixel and axis of the ROI DRR (averaged, like the
        detector averages a bin): removes the aliasing of thin cortical
        shells that makes the similarity rough under sub-voxel motion.
    prefilter_mm : float
        Gaussian band limit (sigma, mm) applied to the ROI and background
        volumes in 3D and, scaled to the panel, to the radiograph before
        binning: with both band-limited, one ray per binned pixel no longer
        aliases thin cortical shells (which makes the similarity rough and
        biased under sub-voxel motion).
    context : bool
        Match the anatomy around the ROI (``AnatomyConfig.context_half_size_mm``)
        instead of the ROI: a long lever arm that captures start rotations
        of several degrees which a single vertebra's DRR barely shows (roll
        about the spine); meant for a coarse first level.
    """

    volume_factor: int
    binning: int
    smoothing_sigma_px: float
    max_iterations: int
    supersampling: int = 1
    prefilter_mm: float = 0.0
    context: bool = False

    def __post_init__(self) -> None:
        for name in ("volume_factor", "binning", "max_iterations", "supersampling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise AnatomyConfigError(f"PyramidLevel.{name} must be a positive integer, got {v!r}")
        for name in ("smoothing_sigma_px", "prefilter_mm"):
            s = float(getattr(self, name))
            if not math.isfinite(s) or s < 0:
                raise AnatomyConfigError(f"PyramidLevel.{name} must be >= 0, got {s!r}")
        if self.binning % self.supersampling:
            raise AnatomyConfigError(
                f"PyramidLevel.supersampling {self.supersampling} must divide the binning {self.binning}"
            )


_OPTIMISABLE = (Similarity.GRADIENT_CORRELATION, Similarity.NCC)
#: Damping increases tried per Levenberg-Marquardt iteration before the Jacobian is renewed.
_MAX_DAMPING_TRIES = 8
#: A result is final only when the background model was drawn within this fraction of its
#: redraw distance from it.
_FINAL_REDRAW_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class AnatomyConfig:
    """Settings of the anatomy registration (defaults: ``docs/ANATOMY_REGISTRATION.md``).

    Distances in mm at the isocentre, angles in degrees, pixels in panel
    pixels unless a name says binned.
    """

    #: Similarity optimised (least-squares form): gradient correlation or NCC.
    metric: Similarity = Similarity.GRADIENT_CORRELATION
    #: Coarse-to-fine levels of the full (wide capture range) registration.
    #: The full-resolution ROI at binning 8 does most of the fine work (a quarter of the rays of
    #: binning 4: the exactly rendered background is the costliest part); binning 4 finishes, with room for
    #: the slow roll crawl of low-dose frames (real CT at i0 2000: 83% -> 96% accepted with 20 iterations, not 10).
    levels: tuple[PyramidLevel, ...] = (
        PyramidLevel(2, 8, 1.0, 10, context=True), PyramidLevel(1, 8, 1.0, 10), PyramidLevel(1, 4, 1.0, 20),
    )
    #: Levels of tracking mode (start within ~2 mm / 1 deg of the answer).
    tracking_levels: tuple[PyramidLevel, ...] = (PyramidLevel(1, 8, 1.0, 12),)
    #: Effective energy of the kV beam used for the DRRs, keV.
    imaging_energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV
    #: Effective energy of the planning CT, keV.
    ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV
    #: ROI mask grown by this many voxels (keeps partial-volume bone edges).
    roi_dilation_voxels: int = 1
    #: Add the DRR of everything outside the ROI (re-rendered once per level at the
    #: level's start pose) so overlapping anatomy in the radiograph is matched too.
    background: bool = True
    #: The background volume is downsampled by at least this factor (block mean): it is a
    #: long ray through the whole CT, the costliest DRR, and it only has to carry the
    #: overlapping anatomy's edges, not the ROI's.
    background_volume_factor: int = 1
    #: Coarsen the background per level to about the level's binned pixel at the isocentre
    #: (per axis, never below ``background_volume_factor``; see ``_background_key``).
    background_match_pixel: bool = True
    #: With ``background_match_pixel``: the block size aimed at, in binned pixels at the isocentre
    #: (1.5: thoracolumbar phantom 520 -> 384 ms, the same mTRE; 2: no faster; the 3 mm real CT unchanged).
    background_block_px: float = 1.5
    #: How the background's pose derivatives are made in the full registration and in tracking
    #: mode: "flow" (no more DRRs; the derivative is the image gradient times the panel motion
    #: of a point on each ray at the ROI centre's depth, exact to first order for translations,
    #: approximate for rotations, which move anatomy off that depth along the ray; a redraw
    #: costs one DRR per view, so it is redrawn at a tighter distance, ``background_lever_mm``)
    #: or "difference" (six more DRRs per view, forward differences), or "exact": no linear
    #: model at all, the background is rendered (Joseph) at every pose the optimiser evaluates and
    #: differentiated exactly with the ROI (a patient's background reaches 150-200 mm from the ROI,
    #: where a linear model in the rotation fails within a fraction of a degree).
    background_derivatives: str = "exact"
    tracking_background_derivatives: str = "exact"
    #: Redraw the background when the pose has moved this far (binned pixels at the
    #: isocentre, at the ROI centre; rotations counted at the ROI's RMS radius, or, with
    #: flow derivatives, at ``background_lever_mm``).
    background_redraw_px: float = 1.0
    background_lever_mm: float = 60.0
    #: Margin around the projected ROI box in each panel region, mm at the isocentre.
    region_margin_mm: float = 4.0
    #: Half width of the global 2D search window, mm at the isocentre.
    search_range_mm: float = 14.0
    #: Global stage: correlation peaks kept per view (local maxima, best first) for the joint stereo choice.
    global_candidates: int = 6
    #: Global stage: largest skew distance between the two views' back-projected ROI centres for a pair of
    #: peaks to be one 3D position, mm (the start's rotation, up to 4 deg, moves a peak ~1 mm).
    global_max_ray_distance_mm: float = 4.0
    #: Binning and volume factor of the global stage.
    global_binning: int = 8
    global_volume_factor: int = 2
    global_smoothing_sigma_px: float = 1.0
    #: The global stage (and the wrong-level check) matches a DRR of the anatomy in a cube of
    #: this half size (mm) around the ROI centre: a single vertebra matches its neighbours
    #: almost as well as itself, the neighbourhood (skull base, ribs, changing vertebra
    #: sizes) does not repeat one level away. Larger blurs more under the start rotation.
    context_half_size_mm: float = 60.0
    #: The context volume fades to zero over this distance at its box faces (cosine taper,
    #: mm), so the crop leaves no box outline in its DRR.
    context_taper_mm: float = 10.0
    #: Results whose ROI centre moved along the spine by more than this fraction of the
    #: level spacing from the start are refused as a possible wrong level.
    max_level_fraction: float = 0.6
    #: Vertebral level spacing for the wrong-level check when the ROI does not know it, mm.
    level_spacing_mm: float = 25.0
    #: Finite-difference step of the pose derivatives, binned pixels at the isocentre.
    fd_step_px: float = 0.5
    #: Line-integral model of the ROI DRRs (``spineguide.registration.drr.PROJECTORS``): "joseph"
    #: (slice-interpolating, smooth in the pose, the model the analytic Jacobian differentiates)
    #: or "siddon" (the voxel-constant volume's exact integral, drawn in slice steps where rays
    #: run nearly parallel to thick slices).
    projector: str = "joseph"
    #: Pose derivatives of the ROI DRRs: "central" (central differences, 12 DRRs per view) or
    #: "analytic" (one pass of the Joseph projector's exact derivatives per view; smooth in the
    #: pose, they describe the DRR over the optimiser's steps, as the differences do).
    jacobian: str = "analytic"
    #: Convergence: last step below both, mm and degrees (about the ROI centre).
    tolerance_mm: float = 0.05
    tolerance_deg: float = 0.05
    #: The optimiser may move at most this far from the start pose, per axis.
    translation_bound_mm: float = 20.0
    rotation_bound_deg: float = 8.0
    # ---- refusal thresholds (quality.ok)
    #: Lowest acceptable final similarity in every view.
    min_similarity: float = 0.3
    #: Largest acceptable residual 2D shift of a single view at the joint optimum, mm at the isocentre.
    max_view_shift_mm: float = 0.5
    #: Largest acceptable curvature-based standard deviation, mm / degrees (about the ROI centre).
    max_std_mm: float = 0.3
    max_std_deg: float = 0.3
    #: Smallest fraction of the projected ROI box that must fall on each panel.
    min_roi_on_panel: float = 0.9
    #: Largest fraction of saturated (or zero-signal) pixels in the ROI's panel region.
    max_saturated_fraction: float = 0.5
    #: Raw level at or above which a pixel counts as saturated; None: the dtype's maximum
    #: for integer frames, the frame's own maximum (when repeated) for float frames.
    saturation_level: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in _OPTIMISABLE:
            raise AnatomyConfigError(
                f"metric must be one of {[m.value for m in _OPTIMISABLE]} (the least-squares forms), got {self.metric!r}"
            )
        if self.projector not in PROJECTORS:
            raise AnatomyConfigError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.jacobian not in ("central", "analytic"):
            raise AnatomyConfigError(f"jacobian must be 'central' or 'analytic', got {self.jacobian!r}")
        for name in ("background_derivatives", "tracking_background_derivatives"):
            if getattr(self, name) not in ("flow", "difference", "exact"):
                raise AnatomyConfigError(
                    f"{name} must be 'flow', 'difference' or 'exact', got {getattr(self, name)!r}"
                )
        for name in ("levels", "tracking_levels"):
            levels = tuple(getattr(self, name))
            if not levels or not all(isinstance(lv, PyramidLevel) for lv in levels):
                raise AnatomyConfigError(f"{name} must be a non-empty tuple of PyramidLevel, got {levels!r}")
            object.__setattr__(self, name, levels)
        positive = (
            "imaging_energy_kev", "ct_energy_kev", "search_range_mm", "level_spacing_mm", "fd_step_px",
            "background_redraw_px", "background_lever_mm", "background_block_px", "global_max_ray_distance_mm",
            "tolerance_mm", "tolerance_deg", "translation_bound_mm", "rotation_bound_deg", "max_view_shift_mm",
            "max_std_mm", "max_std_deg", "context_taper_mm", "context_half_size_mm", "max_level_fraction",
        )
        for name in positive:
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise AnatomyConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("region_margin_mm", "global_smoothing_sigma_px"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise AnatomyConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("roi_dilation_voxels",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise AnatomyConfigError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("global_binning", "global_volume_factor", "background_volume_factor", "global_candidates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise AnatomyConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("min_similarity", "min_roi_on_panel", "max_saturated_fraction"):
            v = float(getattr(self, name))
            if not (0.0 <= v <= 1.0):
                raise AnatomyConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.saturation_level is not None and not (float(self.saturation_level) > 0):
            raise AnatomyConfigError(f"saturation_level must be positive or None, got {self.saturation_level!r}")


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


# ------------------------------------------------------------------------ internals
def _parabola_offset(lo: float, mid: float, hi: float) -> float:
    den = lo - 2.0 * mid + hi
    return float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5)) if den < 0 else 0.0


def _block_mean(image: np.ndarray, region: PanelRegion, binning: int) -> np.ndarray:
    """Mean of ``binning x binning`` blocks of a full-panel image over a region (matches DRR binning)."""
    rows, cols = region.rows // binning, region.cols // binning
    sub = image[region.row0 : region.row0 + rows * binning, region.col0 : region.col0 + cols * binning]
    if binning == 1:
        return np.ascontiguousarray(sub, dtype=np.float32)
    return sub.reshape(rows, binning, cols, binning).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _context_volume(ct: CTVolume, room_from_index: np.ndarray, mask: np.ndarray, cfg: "AnatomyConfig") -> AttenuationVolume:
    """Attenuation in excess of water in a cube of ``context_half_size_mm`` around the ROI centre, tapered at the faces."""
    spacing_kji = np.asarray(ct.spacing_mm, dtype=np.float64)[::-1]
    centre = np.argwhere(mask).mean(axis=0)
    half = cfg.context_half_size_mm / spacing_kji
    lo = [max(int(np.floor(c - h)), 0) for c, h in zip(centre, half)]
    hi = [min(int(np.ceil(c + h)) + 1, n) for c, h, n in zip(centre, half, ct.hu.shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    mu = hu_to_mu_per_mm(ct.hu[sl], cfg.imaging_energy_kev, cfg.ct_energy_kev)
    mu_water = np.float32(linear_attenuation_per_mm("water", cfg.imaging_energy_kev))
    mu = np.maximum(mu - mu_water, np.float32(0.0))
    # Raised-cosine taper at every face: a hard crop would draw the box outline into the DRR.
    for axis, (n, sp) in enumerate(zip(mu.shape, spacing_kji)):
        ramp = max(cfg.context_taper_mm / sp, 1.0)
        d = np.minimum(np.arange(n) + 0.5, n - 0.5 - np.arange(n))
        w = np.where(d < ramp, 0.5 - 0.5 * np.cos(np.pi * np.clip(d / ramp, 0.0, 1.0)), 1.0).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = n
        mu *= w.reshape(shape)
    shift = np.eye(4)
    shift[:3, 3] = [lo[2], lo[1], lo[0]]
    return AttenuationVolume(mu, room_from_index @ shift)


def _pyramid_volume(volume: AttenuationVolume, factor: int, prefilter_mm: float) -> AttenuationVolume:
    """Block-mean downsampled volume, then band-limited by a 3D Gaussian of ``prefilter_mm`` sigma."""
    out = volume.downsampled(factor)
    if prefilter_mm <= 0:
        return out
    spacing_mm = np.linalg.norm(out.room_from_index[:3, :3], axis=0)  # along i, j, k
    sigma_vox = [prefilter_mm / spacing_mm[2], prefilter_mm / spacing_mm[1], prefilter_mm / spacing_mm[0]]
    # Pad with zeros so the blur spreads beyond the (tightly cropped) ROI box instead of being cut by it.
    pad = [int(math.ceil(3.0 * s)) for s in sigma_vox]
    mu = np.pad(out.mu_per_mm, [(p, p) for p in pad])
    mu = scipy.ndimage.gaussian_filter(mu, sigma_vox, mode="constant", cval=0.0, truncate=3.0)
    shift = np.eye(4)
    shift[:3, 3] = [-pad[2], -pad[1], -pad[0]]
    return AttenuationVolume(np.maximum(mu, 0.0).astype(np.float32), out.room_from_index @ shift)


def _binned_mean(fine: np.ndarray, region: PanelRegion, binning: int, supersampling: int) -> np.ndarray:
    """``(n, rows, cols)`` means of ``supersampling^2`` blocks of ``(n, fine rows, fine cols)`` images."""
    if supersampling == 1:
        return fine
    rows, cols = region.rows // binning, region.cols // binning
    s = supersampling
    n = fine.shape[0]
    return fine[:, : rows * s, : cols * s].reshape(n, rows, s, cols, s).mean(axis=(2, 4), dtype=np.float32)


def _drr_batch_binned(volume, imager, poses, region: PanelRegion, binning: int, supersampling: int,
                      projector: str) -> np.ndarray:
    """``(n, rows, cols)`` DRRs of ``binning x binning`` pixels from ``supersampling^2`` rays each (their mean).

    One thread computes the batch (the views run on threads of their own): a numba parallel
    region per small DRR costs more in wake-ups and barriers than it saves on 2 busy cores.
    """
    fine = compute_drr_batch(volume, imager, poses, region, binning // supersampling, parallel=False, projector=projector)
    return _binned_mean(fine, region, binning, supersampling)


def _prefiltered(image: np.ndarray, region: PanelRegion, sigma_px: float) -> np.ndarray:
    """Full-panel-sized image Gaussian-smoothed (``sigma_px`` panel pixels) inside ``region`` only."""
    pad = int(math.ceil(3 * sigma_px)) + 1
    r0, c0 = max(region.row0 - pad, 0), max(region.col0 - pad, 0)
    r1 = min(region.row0 + region.rows + pad, image.shape[0])
    c1 = min(region.col0 + region.cols + pad, image.shape[1])
    out = np.zeros_like(image, dtype=np.float32)
    out[r0:r1, c0:c1] = _smooth(image[r0:r1, c0:c1], sigma_px)
    return out


def _flow_derivatives(image: np.ndarray, imager: ImagerGeometry, region: PanelRegion, binning: int,
                      pivot_room_mm: np.ndarray) -> np.ndarray:
    """Pose derivatives of a DRR from its image gradient and the panel motion of its rays.

    Each binned pixel's content is taken to sit on its ray at the depth of
    ``pivot_room_mm`` (room mm); a small pose change ``dx`` (translation mm,
    rotation deg about the pivot, room axes) moves that point, its projection
    moves by ``f`` binned pixels, and the image changes by ``-grad(image) . f``.
    Exact for translations parallel to the panel at the pivot's depth; for
    other motions an approximation good enough for the background, which only
    has to follow the pose between redraws.

    Returns
    -------
    (6, rows, cols) float32
        d image / d x_p per unit of translation (mm) and rotation (deg).
    """
    cols_px, rows_px = region.pixel_centres(binning)
    cc, rr = np.meshgrid(cols_px, rows_px)
    px = np.stack([cc.ravel(), rr.ravel()], axis=1)
    m = imager.projection_matrix  # third row: depth along the panel normal from the source, mm
    src, dirs = imager.backproject(px)
    normal = m[2, :3]
    depth = float(normal @ (pivot_room_mm - src))
    pts = src + dirs * (depth / (dirs @ normal))[:, None]
    # d(col,row)/dX at a point projecting to px with depth w: (M[:2,:3] - px (x) M[2,:3]) / w, in binned pixels.
    duv = (m[None, :2, :3] - px[:, :, None] * m[None, 2:3, :3]) / (depth * binning)  # (N, 2, 3)
    gy, gx = np.gradient(image.astype(np.float64))
    # The image gradient pulled back to the room: d image / d(point position), (N, 3).
    g3 = gx.reshape(-1, 1) * duv[:, 0, :] + gy.reshape(-1, 1) * duv[:, 1, :]
    out = np.empty((6, g3.shape[0]))
    out[:3] = -g3.T  # translation: the point moves by e_p
    # rotation about the pivot by omega = e_p (pi/180): velocity e_p x arm, and (e_p x arm).g = e_p.(arm x g)
    out[3:] = -(math.pi / 180.0) * np.cross(pts - pivot_room_mm, g3).T
    return out.reshape(6, *image.shape).astype(np.float32)


def _smooth(image: np.ndarray, sigma_px: float) -> np.ndarray:
    a = np.ascontiguousarray(image, dtype=np.float32)
    if sigma_px <= 0:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_REPLICATE)


def _sumsq(v: np.ndarray) -> float:
    """Sum of squares without a BLAS call (whose threads fight the DRR threads for the cores)."""
    return float(np.einsum("i,i->", v, v))


def _znorm(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64) - float(np.mean(v))
    n = math.sqrt(_sumsq(v))
    return v / n if n > 0 else np.zeros_like(v)


def _znorm_jacobian(v: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """``d _znorm(v)`` for ``(n, m)`` derivatives ``dv`` of ``v``: ``(n, m)``."""
    vc = v.astype(np.float64) - float(np.mean(v))
    norm = math.sqrt(_sumsq(vc))
    if norm <= 0:
        return np.zeros(dv.shape)
    z = vc / norm
    dvc = dv.astype(np.float64) - dv.mean(axis=1, dtype=np.float64)[:, None]
    return (dvc - np.outer(dvc @ z, z)) / norm


def _feature_jacobian(image: np.ndarray, dimages: np.ndarray, mask: np.ndarray, metric: Similarity) -> np.ndarray:
    """``(m, n)`` derivatives of :func:`_features` of ``image`` given its ``(n, rows, cols)`` derivatives."""
    if metric is Similarity.GRADIENT_CORRELATION:
        gx, gy = image_gradients(image)
        d = [image_gradients(di) for di in dimages]
        dgx = np.stack([g[0][mask] for g in d])
        dgy = np.stack([g[1][mask] for g in d])
        return np.concatenate([_znorm_jacobian(gx[mask], dgx), _znorm_jacobian(gy[mask], dgy)], axis=1).T / math.sqrt(2.0)
    return _znorm_jacobian(image[mask], dimages[:, mask]).T


def _features(image: np.ndarray, mask: np.ndarray, metric: Similarity) -> np.ndarray:
    """Unit-norm feature vector whose squared distance between two images is ``2 (1 - S)``."""
    if metric is Similarity.GRADIENT_CORRELATION:
        gx, gy = image_gradients(image)
        return np.concatenate([_znorm(gx[mask]), _znorm(gy[mask])]) / math.sqrt(2.0)
    return _znorm(image[mask])


@dataclass(slots=True)
class _View:
    """Per-view working data at one level (private, mutable)."""

    imager: ImagerGeometry
    region: PanelRegion
    frame: np.ndarray  # smoothed binned line integrals
    mask: np.ndarray  # bool, binned region grid
    frame_features: np.ndarray
    pixel_at_iso_mm: float
    # Linear model of the DRR of the CT outside the ROI: bg0 + bg_jac . (x - x_bg).
    bg0: np.ndarray | None = None
    bg_jac: np.ndarray | None = None
    x_bg: np.ndarray | None = None
    # Or the background volume itself, rendered exactly at every pose ("exact" derivatives), on the
    # binned pixels the masked comparison reads (``bg_rays``: the mask grown by the smoothing's,
    # the gradient's and the view-shift test's reach).
    bg_volume: AttenuationVolume | None = None
    bg_rays: np.ndarray | None = None


class AnatomyRegistration:
    """Prepared stereo anatomy registration of one planning CT and ROI.

    Building it converts the CT to ROI, neighbourhood and background
    attenuation volumes for every level (done once); :meth:`register` then
    registers any number of frame pairs. It owns a small thread pool (one
    worker per imager) on which each view's DRR batches run; :meth:`register`
    keeps no state between calls, so any thread may call it, also
    concurrently.

    Parameters
    ----------
    ct : CTVolume
        Planning CT (HU, LPS).
    isocentre_lps_mm : (3,) sequence
        Plan isocentre, planning-CT LPS mm.
    geometry : StereoGeometry
        Imagers, room frame.
    roi : RegionOfInterest
        On the CT grid.
    config : AnatomyConfig

    Raises
    ------
    RoiError
        ROI grid does not match the CT.
    """

    def __init__(
        self,
        ct: CTVolume,
        isocentre_lps_mm: Sequence[float],
        geometry: StereoGeometry,
        roi: RegionOfInterest,
        config: AnatomyConfig | None = None,
    ) -> None:
        self.config = AnatomyConfig() if config is None else config
        if not isinstance(roi, RegionOfInterest):
            raise RoiError(f"roi must be a RegionOfInterest, got {type(roi).__name__}")
        if roi.mask.shape != ct.hu.shape:
            raise RoiError(f"ROI '{roi.description}': mask shape {roi.mask.shape} does not match the CT {ct.hu.shape}")
        self.geometry = geometry
        self.roi = roi
        # One worker per view: the views' DRR batches run side by side (numba kernels release
        # the GIL). Shared by concurrent register() calls, which the executor allows.
        self._pool = ThreadPoolExecutor(max_workers=max(len(geometry.names), 1), thread_name_prefix="anatomy-view")
        cfg = self.config
        room_from_index = ct.room_from_index(isocentre_lps_mm)
        mask = roi.mask
        if cfg.roi_dilation_voxels:
            mask = scipy.ndimage.binary_dilation(mask, iterations=cfg.roi_dilation_voxels)
        # Crop first, then convert: only the ROI's box is converted to attenuation.
        idx = np.nonzero(mask)
        lo = [max(int(ix.min()) - 1, 0) for ix in idx]
        hi = [int(ix.max()) + 2 for ix in idx]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        mu = hu_to_mu_per_mm(ct.hu[sl], cfg.imaging_energy_kev, cfg.ct_energy_kev)
        mu_water = np.float32(linear_attenuation_per_mm("water", cfg.imaging_energy_kev))
        excess = np.maximum(mu - mu_water, np.float32(0.0))
        shift = np.eye(4)
        shift[:3, 3] = [lo[2], lo[1], lo[0]]
        base = AttenuationVolume(excess, room_from_index @ shift).masked(mask[sl])
        keys = {(lv.volume_factor, float(lv.prefilter_mm)) for lv in cfg.levels + cfg.tracking_levels}
        self._volumes = {key: _pyramid_volume(base, *key) for key in sorted(keys)}
        context = _context_volume(ct, room_from_index, mask, cfg)
        self._context = context.downsampled(cfg.global_volume_factor)
        self._context_fine = context.downsampled(max(cfg.global_volume_factor // 2, 1))
        self._context_levels = {
            lv.volume_factor: context.downsampled(lv.volume_factor) for lv in cfg.levels + cfg.tracking_levels if lv.context
        }
        self._backgrounds: dict[tuple[tuple[int, int, int], float], AttenuationVolume] = {}
        self._ct_spacing_ijk_mm = np.linalg.norm(room_from_index[:3, :3], axis=0)
        if cfg.background:
            # Everything the ROI volume leaves out: full attenuation outside the mask,
            # the water baseline inside it; ROI DRR + background DRR = DRR of the whole CT.
            full = hu_to_mu_per_mm(ct.hu, cfg.imaging_energy_kev, cfg.ct_energy_kev)
            inside = np.zeros(ct.hu.shape, dtype=bool)
            inside[sl] = mask[sl]
            np.minimum(full, mu_water, out=full, where=inside)
            bg = AttenuationVolume(full, room_from_index)
            del full, inside
            bg_keys = {self._background_key(lv) for lv in cfg.levels + cfg.tracking_levels if not lv.context}
            self._backgrounds = {key: _pyramid_volume(bg, *key) for key in sorted(bg_keys)}
        # ROI points (room, perfect setup) for the rotation centre and the panel regions.
        kji = np.argwhere(roi.mask)
        pts = kji[:, ::-1].astype(np.float64) @ room_from_index[:3, :3].T + room_from_index[:3, 3]
        self.roi_centre_room_mm = pts.mean(axis=0)
        self._roi_radius_mm = max(float(np.sqrt(np.mean(np.sum((pts - self.roi_centre_room_mm) ** 2, axis=1)))), 5.0)
        ni, nj, nk = base.mu_per_mm.shape[::-1]
        corners = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
        self._roi_corners_room_mm = corners @ base.room_from_index[:3, :3].T + base.room_from_index[:3, 3]
        ctx = self._context
        ni, nj, nk = ctx.mu_per_mm.shape[::-1]
        corners = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
        self._context_corners_room_mm = corners @ ctx.room_from_index[:3, :3].T + ctx.room_from_index[:3, 3]
        self._level_spacing_mm = roi.level_spacing_mm or cfg.level_spacing_mm
        # The CT's box (index frame) and its superior axis: rays that leave the box through its
        # superior or inferior face cross patient anatomy the CT does not hold (a patient does not
        # end where the CT does), so those panel pixels are left out of the similarity.
        self._index_from_room = np.linalg.inv(room_from_index)
        self._ct_shape_ijk = np.array(ct.hu.shape[::-1], dtype=np.float64)
        self._ct_axial_axis = int(np.argmax(np.abs(np.linalg.solve(ct.lps_from_index[:3, :3], [0.0, 0.0, 1.0]))))
        # Direction of the spine in the room (CT superior axis at perfect setup).
        sup = room_from_index[:3, :3] @ np.linalg.solve(ct.lps_from_index[:3, :3], [0.0, 0.0, 1.0])
        self._spine_dir_room = sup / np.linalg.norm(sup)

    # ----------------------------------------------------------------- helpers
    def _pose(self, x: np.ndarray, start: Pose, centre: np.ndarray) -> Pose:
        """Start pose followed by ``x`` = (translation mm, rotation deg about ``centre``)."""
        r = _rotation_matrix(x[3:])
        delta = Pose(r, centre + x[:3] - r @ centre)
        return delta.compose(start)

    def _region(self, imager: ImagerGeometry, pose: Pose, binning: int, extra_px: float = 0.0) -> tuple[PanelRegion | None, float, np.ndarray]:
        """Panel region around the projected ROI box; fraction of that box on the panel; unclipped box."""
        px = imager.project(pose.apply(self._roi_corners_room_mm))
        margin = self.config.region_margin_mm * imager.magnification / float(np.min(imager.pixel_spacing_mm))
        lo = np.floor(px.min(axis=0) - margin - extra_px)
        hi = np.ceil(px.max(axis=0) + margin + extra_px)
        box = np.array([lo[0], lo[1], hi[0], hi[1]])
        c0, r0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        c1, r1 = min(int(hi[0]), imager.cols), min(int(hi[1]), imager.rows)
        area = float((hi[0] - lo[0]) * (hi[1] - lo[1]))
        on = max(c1 - c0, 0) * max(r1 - r0, 0) / area if area > 0 else 0.0
        rows = (r1 - r0) // binning * binning
        cols = (c1 - c0) // binning * binning
        if rows < 8 * binning or cols < 8 * binning:
            return None, on, box
        return PanelRegion(r0, c0, rows, cols), on, box

    def _context_region(self, imager: ImagerGeometry, pose: Pose, binning: int, keep_clear_px=(0.0, 0.0)) -> PanelRegion:
        """Panel region of the projected context box, ``keep_clear_px`` (cols, rows) inside the panel, on the ``binning`` grid."""
        px = imager.project(pose.apply(self._context_corners_room_mm))
        ec, er = int(math.ceil(keep_clear_px[0])), int(math.ceil(keep_clear_px[1]))
        c0, r0 = max(int(np.floor(px[:, 0].min())), ec), max(int(np.floor(px[:, 1].min())), er)
        c1 = min(int(np.ceil(px[:, 0].max())), imager.cols - ec)
        r1 = min(int(np.ceil(px[:, 1].max())), imager.rows - er)
        rows, cols = (r1 - r0) // binning * binning, (c1 - c0) // binning * binning
        if rows < 8 * binning or cols < 8 * binning:
            raise RegistrationError(f"imager '{imager.name}': the ROI's neighbourhood is off the panel")
        return PanelRegion(r0, c0, rows, cols)

    def _beyond_ct_ends(self, imager: ImagerGeometry, pose: Pose, region: PanelRegion, binning: int) -> np.ndarray:
        """Binned pixels of ``region`` whose ray leaves the planning CT's box through its superior or
        inferior face (bool, ``[row, col]`` on the binned grid), the patient at ``pose`` (room frame).

        Such a ray crosses, in the patient, anatomy past the CT's end that no DRR of the CT holds.
        """
        rows, cols = region.rows // binning, region.cols // binning
        cc = region.col0 + np.arange(cols) * binning + (binning - 1) / 2.0
        rr = region.row0 + np.arange(rows) * binning + (binning - 1) / 2.0
        grid = np.stack(np.meshgrid(cc, rr), axis=-1).reshape(-1, 2)
        to_index = self._index_from_room @ pose.inverse().matrix
        src = to_index[:3, :3] @ imager.source_mm + to_index[:3, 3]
        ends = imager.pixel_to_room(grid) @ to_index[:3, :3].T + to_index[:3, 3]
        d = ends - src
        lo, hi = -0.5, self._ct_shape_ijk - 0.5
        t_in, t_out = np.zeros(len(d)), np.ones(len(d))
        with np.errstate(divide="ignore", invalid="ignore"):
            for ax in range(3):
                if ax == self._ct_axial_axis:
                    continue
                a = (lo - src[ax]) / d[:, ax]
                b = (hi[ax] - src[ax]) / d[:, ax]
                parallel = d[:, ax] == 0
                inside = (src[ax] >= lo) & (src[ax] <= hi[ax])
                a = np.where(parallel, -np.inf if inside else np.inf, a)
                b = np.where(parallel, np.inf if inside else -np.inf, b)
                t_in = np.maximum(t_in, np.minimum(a, b))
                t_out = np.minimum(t_out, np.maximum(a, b))
        ax = self._ct_axial_axis
        k_in, k_out = src[ax] + t_in * d[:, ax], src[ax] + t_out * d[:, ax]
        crosses = t_in < t_out
        beyond = crosses & ((np.minimum(k_in, k_out) < lo) | (np.maximum(k_in, k_out) > hi[ax]))
        return beyond.reshape(rows, cols)

    def _pixel_at_iso_mm(self, imager: ImagerGeometry, binning: int) -> float:
        return binning * float(np.mean(imager.pixel_spacing_mm)) / imager.magnification

    # ---------------------------------------------------------------- register
    def register(
        self,
        frames: Mapping[str, np.ndarray],
        i0: float | Mapping[str, float] | None = None,
        initial_pose: Pose | None = None,
        tracking: bool = False,
    ) -> AnatomyResult:
        """Register one stereo pair of raw kV frames.

        Parameters
        ----------
        frames : mapping imager name -> (rows, cols) array
            Raw detector signal (bone dark), one frame per imager of the geometry.
        i0 : float or mapping imager -> float, optional
            Unattenuated level(s); estimated per frame if omitted.
        initial_pose : Pose, optional
            Start pose (room frame); identity (perfect setup) if omitted.
        tracking : bool
            Start from ``initial_pose`` (a previous result, motion since then
            within ~2 mm / 1 degree), skip the global stage and use
            ``config.tracking_levels``.

        Returns
        -------
        AnatomyResult

        Raises
        ------
        RegistrationFrameError
            Missing or extra imager, wrong frame size, bad pixel values or i0.
        """
        t_start = time.monotonic()
        cfg = self.config
        names = self.geometry.names
        if set(frames) != set(names):
            raise RegistrationFrameError(f"frames for imagers {sorted(frames)} given; the geometry has {sorted(names)}")
        logs: dict[str, np.ndarray] = {}
        raw_frames: dict[str, np.ndarray] = {}
        for name in names:
            im = self.geometry[name]
            raw = np.asarray(frames[name])
            if raw.shape != (im.rows, im.cols):
                raise RegistrationFrameError(f"frame '{name}': shape {raw.shape}, imager '{name}' has {im.rows}x{im.cols} pixels")
            view_i0 = i0.get(name) if isinstance(i0, Mapping) else i0
            if isinstance(i0, Mapping) and name not in i0:
                raise RegistrationFrameError(f"frame '{name}': no i0 given for this imager (i0 given for {sorted(i0)})")
            logs[name] = line_integrals(raw, view_i0, name)
            raw_frames[name] = raw
        start = Pose.identity() if initial_pose is None else initial_pose
        if not isinstance(start, Pose):
            raise RegistrationError(f"initial_pose must be a Pose, got {type(start).__name__}")
        centre = start.apply(self.roi_centre_room_mm)
        counter = [0]
        reasons: list[QualityReason] = []

        # ROI on the panel and saturation, at the start pose.
        roi_on, sat = {}, {}
        for name in names:
            im = self.geometry[name]
            region, on, _ = self._region(im, start, 1)
            roi_on[name] = on
            sat[name] = self._saturated_fraction(raw_frames[name], region) if region is not None else 1.0
        if min(roi_on.values()) < cfg.min_roi_on_panel:
            reasons.append(QualityReason.ROI_OFF_PANEL)
        if max(sat.values()) > cfg.max_saturated_fraction:
            reasons.append(QualityReason.SATURATED)
        if reasons:
            return self._refused(start, reasons, roi_on, sat, t_start, tracking)

        x = np.zeros(6)
        level_margin = None
        if not tracking:
            x[:3], _ = self._global_stage(logs, start, centre, counter)
        levels = cfg.tracking_levels if tracking else cfg.levels
        iterations = 0
        converged = False
        final = None
        for level in levels:
            views = self._prepare_level(logs, self._pose(x, start, centre), level)
            if views is None:
                return self._refused(start, [QualityReason.ROI_OFF_PANEL], roi_on, sat, t_start, tracking)
            mode = cfg.tracking_background_derivatives if tracking else cfg.background_derivatives
            x, its, converged, final = self._refine(views, level, x, start, centre, counter, mode)
            iterations += its
        pose = self._pose(x, start, centre)
        if not tracking:
            # Wrong level: a neighbouring level fits the radiographs better at the result, or the
            # result is most of a level along the spine from the start (the capture range holds
            # set-up errors, not level errors: a neighbour may have taken the target's place).
            level_margin = self._final_level_margin(logs, pose, centre, counter)
            along_mm = abs(float(x[:3] @ (start.rotation @ self._spine_dir_room)))
            if level_margin < 0 or along_mm > cfg.max_level_fraction * self._level_spacing_mm:
                reasons.append(QualityReason.WRONG_LEVEL)
        quality = self._quality(final, x, converged, reasons, roi_on, sat, level_margin)
        elapsed_ms = (time.monotonic() - t_start) * 1000.0
        log.debug("anatomy registration: %s in %.1f ms, %d DRRs", quality.reason.value, elapsed_ms, counter[0])
        return AnatomyResult(
            pose, pose.to_correction(), quality.similarity, quality, iterations, counter[0], elapsed_ms, bool(tracking)
        )

    def _refused(self, start, reasons, roi_on, sat, t_start, tracking) -> AnatomyResult:
        names = self.geometry.names
        nan3 = (math.nan, math.nan, math.nan)
        q = AnatomyQuality(
            False, reasons[0], tuple(reasons), _frozen_map({n: math.nan for n in names}),
            _frozen_map({}), _frozen_map({n: math.nan for n in names}), nan3, nan3,
            _frozen_map(roi_on), _frozen_map(sat), None, False, False,
        )
        return AnatomyResult(
            start, start.to_correction(), q.similarity, q, 0, 0, (time.monotonic() - t_start) * 1000.0, bool(tracking)
        )

    def _saturated_fraction(self, raw: np.ndarray, region: PanelRegion) -> float:
        sub = raw[region.row0 : region.row0 + region.rows, region.col0 : region.col0 + region.cols]
        level = self.config.saturation_level
        if level is None:
            if np.issubdtype(raw.dtype, np.integer):
                level = float(np.iinfo(raw.dtype).max)
            else:
                level = float(raw.max())
                if np.count_nonzero(raw >= level) < 0.001 * raw.size:
                    level = math.inf  # an unclipped float frame: its maximum is just its brightest pixel
        bad = (sub >= level) | (sub <= 0)
        return float(np.count_nonzero(bad)) / sub.size

    # -------------------------------------------------------------- global stage
    def _context_scores(self, log_image, im: ImagerGeometry, pose: Pose, centre: np.ndarray, b: int, volume,
                        search_mm: float, level_reach: float, counter) -> dict:
        """Gradient correlation of the context DRR at ``pose`` with the radiograph, as a function of 2D shift.

        The map covers shifts up to ``search_mm`` (mm at the isocentre) plus ``level_reach``
        vertebral levels along the spine. Returned shifts are in binned pixels relative to zero shift; ``along`` /
        ``across`` are the shift components along and across the projected spine, binned pixels.
        """
        cfg = self.config
        px_per_mm = im.magnification / float(np.mean(im.pixel_spacing_mm))
        c_px = im.project(centre)
        spine_px = im.project(centre + self._spine_dir_room) - c_px
        spine_px /= max(np.linalg.norm(spine_px), 1e-9)
        search_px = search_mm * px_per_mm
        level_px = self._level_spacing_mm * px_per_mm
        extra_c = search_px + abs(spine_px[0]) * level_reach * level_px
        extra_r = search_px + abs(spine_px[1]) * level_reach * level_px
        # The template keeps clear of the panel edges by the search extent, so that every
        # shift of the capture window (and one level either way) is scored.
        t = self._context_region(im, pose, b, (extra_c + b, extra_r + b))
        # Search window: the template box grown on every side, on the same bin grid.
        c0 = t.col0 - int(math.ceil(extra_c / b)) * b
        r0 = t.row0 - int(math.ceil(extra_r / b)) * b
        while c0 < 0:
            c0 += b
        while r0 < 0:
            r0 += b
        c1 = min(t.col0 + t.cols + int(math.ceil(extra_c / b)) * b, im.cols)
        r1 = min(t.row0 + t.rows + int(math.ceil(extra_r / b)) * b, im.rows)
        search = PanelRegion(r0, c0, (r1 - r0) // b * b, (c1 - c0) // b * b)
        drr = compute_drr_batch(volume, im, [pose], t, b, parallel=False)[0]
        counter[0] += 1
        sig = cfg.global_smoothing_sigma_px
        tx, ty = image_gradients(_smooth(drr, sig))
        fx, fy = image_gradients(_smooth(_block_mean(log_image, search, b), sig))
        if fx.shape[0] < tx.shape[0] or fx.shape[1] < tx.shape[1]:
            raise RegistrationError(f"imager '{im.name}': search window smaller than the ROI neighbourhood template")
        score = 0.5 * (cv2.matchTemplate(fx, tx, cv2.TM_CCOEFF_NORMED) + cv2.matchTemplate(fy, ty, cv2.TM_CCOEFF_NORMED))
        score = np.nan_to_num(score, nan=-1.0)
        zero = np.array([(t.col0 - c0) / b, (t.row0 - r0) / b])  # (col, row) of zero shift in `score`
        rr, cc = np.mgrid[0 : score.shape[0], 0 : score.shape[1]]
        dcol, drow = cc - zero[0], rr - zero[1]
        return {
            "score": score, "zero": zero, "dcol": dcol, "drow": drow, "c_px": c_px,
            "along": dcol * spine_px[0] + drow * spine_px[1], "across": dcol * spine_px[1] - drow * spine_px[0],
            "search": search_px / b, "level": level_px / b,
        }

    @staticmethod
    def _level_margin(m: dict, peak: tuple[int, int]) -> float:
        """Score at ``peak`` minus the best score one vertebral level up or down the spine from it."""
        pr, pc = peak
        along = m["along"] - m["along"][pr, pc]
        across = m["across"] - m["across"][pr, pc]
        level = m["level"]
        band = (np.abs(np.abs(along) - level) <= 0.4 * level) & (np.abs(across) <= max(m["search"], 2.0))
        best_out = float(m["score"][band].max()) if np.any(band) else -1.0
        return float(m["score"][pr, pc]) - best_out

    def _global_stage(self, logs, start: Pose, centre: np.ndarray, counter) -> tuple[np.ndarray, float]:
        """3D translation from per-view 2D correlation search of the ROI's neighbourhood; level margin (min over views).

        Each view keeps its best local maxima (``global_candidates``); of every pair of them, one per
        view, the pairs whose back-projected rays meet within ``global_max_ray_distance_mm`` are one 3D
        position, and the one with the highest summed score wins. A view whose best peak is a false
        match (a rib crossing, a neighbour's pedicle) then loses to a slightly lower peak the other
        view agrees with. With no consistent pair, each view's best peak is used (the refinement and
        the quality checks judge the result).
        """
        cfg = self.config
        b = cfg.global_binning
        names = self.geometry.names
        maps, peaks, pixels_start = {}, {}, {}
        for name in names:
            im = self.geometry[name]
            m = self._context_scores(logs[name], im, start, centre, b, self._context, cfg.search_range_mm, 1.0, counter)
            score = m["score"]
            inside = (np.abs(m["dcol"]) <= m["search"]) & (np.abs(m["drow"]) <= m["search"])
            masked = np.where(inside, score, -np.inf).astype(np.float32)
            local = (masked == cv2.dilate(masked, np.ones((5, 5), np.uint8))) & inside
            order = np.argsort(-masked[local])[: cfg.global_candidates]
            rr, cc = np.nonzero(local)
            found = []
            h, w = score.shape
            for pr, pc in zip(rr[order], cc[order]):
                sub = np.array([pc, pr], dtype=np.float64)
                # Sub-pixel peak: a parabola through the peak and its two neighbours, per axis.
                if 0 < pc < w - 1:
                    sub[0] += _parabola_offset(score[pr, pc - 1], score[pr, pc], score[pr, pc + 1])
                if 0 < pr < h - 1:
                    sub[1] += _parabola_offset(score[pr - 1, pc], score[pr, pc], score[pr + 1, pc])
                found.append(((int(pr), int(pc)), float(score[pr, pc]), m["c_px"] + (sub - m["zero"]) * b))
            if not found:
                raise RegistrationError(f"imager '{name}': no correlation peak in the global search window")
            maps[name], peaks[name], pixels_start[name] = m, found, m["c_px"]
        tri_from = self.geometry.triangulate({n: pixels_start[n][None] for n in names})
        combos = list(itertools.product(*(range(len(peaks[n])) for n in names)))
        tri = self.geometry.triangulate({n: np.array([peaks[n][c[k]][2] for c in combos]) for k, n in enumerate(names)})
        total = np.array([sum(peaks[n][c[k]][1] for k, n in enumerate(names)) for c in combos])
        consistent = tri.ray_distance_mm <= cfg.global_max_ray_distance_mm
        best = int(np.argmax(np.where(consistent, total, -np.inf))) if consistent.any() else combos.index((0,) * len(names))
        chosen = combos[best]
        margins = [self._level_margin(maps[n], peaks[n][chosen[k]][0]) for k, n in enumerate(names)]
        translation = tri.points_mm[best] - tri_from.points_mm[0]
        bound = cfg.translation_bound_mm
        return np.clip(translation, -bound, bound), float(np.min(margins))

    def _final_level_margin(self, logs, pose: Pose, centre: np.ndarray, counter) -> float:
        """Wrong-level check at the result: the neighbourhood's match at ``pose`` against one level away (min over views).

        At twice the global stage's resolution, the context DRR at the found pose is matched to
        each radiograph; the best score within a few pixels of zero shift is compared with the best
        one a vertebral level up or down the spine. Positive: no neighbouring level fits better.
        """
        cfg = self.config
        b = max(cfg.global_binning // 2, 1)
        volume = self._context_fine
        margins = []
        for name in self.geometry.names:
            m = self._context_scores(logs[name], self.geometry[name], pose, centre, b, volume, 1.0, 1.4, counter)
            near = np.hypot(m["dcol"], m["drow"]) <= max(m["search"], 1.5)
            pr, pc = np.unravel_index(int(np.argmax(np.where(near, m["score"], -np.inf))), m["score"].shape)
            margins.append(self._level_margin(m, (pr, pc)))
        return float(np.min(margins))

    # ------------------------------------------------------------------ refinement
    def _background_key(self, level: PyramidLevel) -> tuple[tuple[int, int, int], float]:
        """Block-mean factors (i, j, k) and band limit of a level's background volume.

        At least ``max(level.volume_factor, config.background_volume_factor)`` per axis, and, with
        ``config.background_match_pixel``, as many voxels per block along an axis as fit in
        ``config.background_block_px`` of the level's binned pixels at the isocentre (rounded): finer
        background detail is averaged away by the detector bin and the smoothing anyway, and the
        background's rays are the costliest.
        """
        base = max(level.volume_factor, self.config.background_volume_factor)
        factors = [base] * 3
        if self.config.background_match_pixel:
            pixel_mm = min(self._pixel_at_iso_mm(self.geometry[n], level.binning) for n in self.geometry.names)
            block_mm = self.config.background_block_px * pixel_mm
            factors = [max(base, int(round(block_mm / s))) for s in self._ct_spacing_ijk_mm]
        return tuple(factors), float(level.prefilter_mm)

    def _level_volume(self, level: PyramidLevel) -> AttenuationVolume:
        if level.context:
            return self._context_levels[level.volume_factor]
        return self._volumes[(level.volume_factor, float(level.prefilter_mm))]

    def _prepare_level(self, logs, pose: Pose, level: PyramidLevel) -> list[_View] | None:
        b = level.binning
        volume = self._level_volume(level)
        views = []
        for name in self.geometry.names:
            im = self.geometry[name]
            if level.context:
                try:
                    region = self._context_region(im, pose, b)
                except RegistrationError:
                    return None
            else:
                region, _, _ = self._region(im, pose, b)
            if region is None:
                return None
            full = logs[name]
            if level.prefilter_mm > 0:
                full = _prefiltered(full, region, level.prefilter_mm * im.magnification / float(np.mean(im.pixel_spacing_mm)))
            frame = _smooth(_block_mean(full, region, b), level.smoothing_sigma_px)
            drr = compute_drr_batch(volume, im, [pose], region, b, parallel=False, projector=self.config.projector)[0]
            support = drr > 1e-6
            grown = cv2.dilate(support.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            grown[:2, :] = grown[-2:, :] = False
            grown[:, :2] = grown[:, -2:] = False
            beyond = self._beyond_ct_ends(im, pose, region, b)
            if beyond.any():
                # grown by the smoothing's reach: a feature there mixes in the pixels left out
                reach = 2 * int(math.ceil(2.0 * level.smoothing_sigma_px)) + 3
                beyond = cv2.dilate(beyond.astype(np.uint8), np.ones((reach, reach), np.uint8)).astype(bool)
                grown &= ~beyond
            if np.count_nonzero(grown) < 16:
                return None
            views.append(
                _View(im, region, frame, grown, _features(frame, grown, self.config.metric), self._pixel_at_iso_mm(im, b))
            )
        return views

    def _per_view(self, fn, views):
        """``[fn(v) for v in views]``, the views on threads of their own (the DRR kernels release the GIL)."""
        if self._pool is None or len(views) < 2:
            return [fn(v) for v in views]
        return list(self._pool.map(fn, views))

    def _linearise_background(self, views, level, x, steps, start, centre, counter, flow: bool) -> None:
        """Background DRR and its pose derivatives at ``x`` (a linear model in ``x``): forward
        differences (six more DRRs per view) or, with ``flow``, :func:`_flow_derivatives`."""
        volume = self._backgrounds[self._background_key(level)]
        if flow:
            pose = self._pose(x, start, centre)
            pivot = centre + x[:3]  # the rotation centre after the translation x[:3]

            def draw(v):
                img = compute_drr_batch(volume, v.imager, [pose], v.region, level.binning, parallel=False)[0]
                return img, _flow_derivatives(img, v.imager, v.region, level.binning, pivot)

            for v, (img, jac) in zip(views, self._per_view(draw, views)):
                counter[0] += 1
                v.bg0, v.bg_jac, v.x_bg = img, jac, x.copy()
            return
        poses = [self._pose(x, start, centre)]
        for p in range(6):
            xp = x.copy()
            xp[p] += steps[p]
            poses.append(self._pose(xp, start, centre))
        images = self._per_view(
            lambda v: compute_drr_batch(volume, v.imager, poses, v.region, level.binning, parallel=False), views
        )
        for v, img in zip(views, images):
            counter[0] += len(poses)
            v.bg0 = img[0]
            v.bg_jac = (img[1:] - img[0]) / steps.astype(np.float32)[:, None, None]
            v.x_bg = x.copy()

    def _residuals(self, views, level, volume, xs, start, centre, counter) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Residual vector and smoothed model DRRs (per view) at each of the parameter vectors ``xs``."""
        poses = [self._pose(x, start, centre) for x in xs]
        drrs = self._per_view(
            lambda v: _drr_batch_binned(volume, v.imager, poses, v.region, level.binning, level.supersampling,
                                        self.config.projector),
            views,
        )
        counter[0] += len(poses) * len(views)
        if views[0].bg_volume is not None:
            bgs = self._per_view(
                lambda v: compute_drr_batch(v.bg_volume, v.imager, poses, v.region, level.binning, parallel=False,
                                            projector="joseph", rays=v.bg_rays),
                views,
            )
            drrs = [d + b for d, b in zip(drrs, bgs)]
            counter[0] += len(poses) * len(views)

        out = []
        for k, x in enumerate(xs):
            parts, images = [], []
            for v, batch in zip(views, drrs):
                drr = batch[k]
                if v.bg0 is not None:
                    drr = drr + linear_model(v.bg0, v.bg_jac, x - v.x_bg)
                drr = _smooth(drr, level.smoothing_sigma_px)
                images.append(drr)
                parts.append(_features(drr, v.mask, self.config.metric) - v.frame_features)
            out.append((np.concatenate(parts), images))
        return out

    def _residual(self, views, level, volume, x, start, centre, counter) -> tuple[np.ndarray, list[np.ndarray]]:
        return self._residuals(views, level, volume, [x], start, centre, counter)[0]

    def _jacobian(self, views, level, volume, x, steps, start, centre, counter) -> np.ndarray:
        """Jacobian of the residual at ``x``: analytic (``config.jacobian``) or central differences
        (the 12 displaced poses in one batch per view)."""
        if self.config.jacobian == "analytic":
            return self._analytic_jacobian(views, level, volume, x, start, centre, counter)
        xs = []
        for p in range(6):
            for sign in (1.0, -1.0):
                xd = x.copy()
                xd[p] += sign * steps[p]
                xs.append(xd)
        res = self._residuals(views, level, volume, xs, start, centre, counter)
        jac = np.empty((res[0][0].size, 6))
        for p in range(6):
            jac[:, p] = (res[2 * p][0] - res[2 * p + 1][0]) / (2.0 * steps[p])
        return jac

    def _analytic_jacobian(self, views, level, volume, x, start, centre, counter) -> np.ndarray:
        """Jacobian of the residual at ``x`` from the Joseph projector's exact pose derivatives.

        One derivative pass per view gives ``d DRR / d x``; the background model adds its
        own slopes; smoothing and the gradient are linear, and the z-normalisation of the
        features is differentiated exactly (:func:`_feature_jacobian`).
        """
        pose = self._pose(x, start, centre)
        eps = 1e-6  # the pose matrix is smooth in x: central differences of it are exact to ~1e-9
        dpose = np.stack([
            (self._pose(x + eps * e, start, centre).matrix - self._pose(x - eps * e, start, centre).matrix) / (2 * eps)
            for e in np.eye(6)
        ])
        b, s = level.binning, level.supersampling

        def one(v):
            both = compute_drr_pose_derivatives(volume, v.imager, pose, dpose, v.region, b // s)
            both = _binned_mean(both, v.region, b, s)
            image, dimages = both[0], both[1:]
            if v.bg_volume is not None:
                bg = compute_drr_pose_derivatives(v.bg_volume, v.imager, pose, dpose, v.region, b, rays=v.bg_rays)
                image, dimages = image + bg[0], dimages + bg[1:]
            if v.bg0 is not None:
                image = image + linear_model(v.bg0, v.bg_jac, x - v.x_bg)
                dimages = dimages + v.bg_jac
            image = _smooth(image, level.smoothing_sigma_px)
            dimages = np.stack([_smooth(d, level.smoothing_sigma_px) for d in dimages])
            return _feature_jacobian(image, dimages, v.mask, self.config.metric)

        parts = self._per_view(one, views)
        counter[0] += len(views)
        return np.concatenate(parts, axis=0)

    def _refine(self, views, level: PyramidLevel, x, start, centre, counter, mode: str = "flow"):
        """Levenberg-Marquardt over ``x`` (translation mm, rotation deg about ``centre``) at one level.

        ``mode``: how the background (the CT outside the ROI) enters the model, see
        ``AnatomyConfig.background_derivatives``."""
        cfg = self.config
        flow = mode == "flow"
        volume = self._level_volume(level)
        pix_mm = min(v.pixel_at_iso_mm for v in views)
        h_mm = cfg.fd_step_px * pix_mm
        h_deg = math.degrees(h_mm / self._roi_radius_mm)
        steps = np.array([h_mm] * 3 + [h_deg] * 3)
        # The background model is linear in the pose: redraw it when the pose has moved more than
        # background_redraw_px binned pixels from where it was drawn (rotations at the lever arm).
        redraw_mm = cfg.background_redraw_px * pix_mm
        lever_mm = cfg.background_lever_mm if flow else self._roi_radius_mm
        relinearise = np.array([redraw_mm] * 3 + [math.degrees(redraw_mm / lever_mm)] * 3)
        use_bg = bool(self._backgrounds) and not level.context
        if use_bg and mode == "exact":
            # A feature at a mask pixel reads the smoothed image within 1 px (gradient) and 1 px more
            # (the view-shift test's half-pixel warp); the smoothing reads 4 sigma around that.
            reach = int(math.ceil(4.0 * level.smoothing_sigma_px)) + 2
            kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * reach + 1, 2 * reach + 1))
            for v in views:
                v.bg_volume = self._backgrounds[self._background_key(level)]
                v.bg_rays = cv2.dilate(v.mask.astype(np.uint8), kernel).astype(bool)
            use_bg = False  # no linear model to redraw: the background is exact at every pose
        if use_bg:
            self._linearise_background(views, level, x, steps, start, centre, counter, flow)
        lower = np.array([-cfg.translation_bound_mm] * 3 + [-cfg.rotation_bound_deg] * 3)
        upper = -lower
        r, drrs = self._residual(views, level, volume, x, start, centre, counter)
        cost = _sumsq(r)
        lam = 1e-3
        converged = False
        jac = None
        fresh = False
        its = 0

        def redraw_background() -> None:
            """Draw the background model at ``x``, and the residual with it."""
            nonlocal r, drrs, cost
            self._linearise_background(views, level, x, steps, start, centre, counter, flow)
            r, drrs = self._residual(views, level, volume, x, start, centre, counter)
            cost = _sumsq(r)

        def background_settled() -> bool:
            """True when the background model was drawn close enough to ``x`` to call ``x`` final;
            otherwise redraw it there."""
            if not use_bg or np.all(np.abs(x - views[0].x_bg) <= _FINAL_REDRAW_FRACTION * relinearise):
                return True
            redraw_background()
            return False

        for its in range(1, level.max_iterations + 1):
            improved = False
            step = np.zeros(6)
            settle = False
            while True:  # a failed chord (stale) Jacobian is renewed within the same iteration
                if jac is None:
                    # Central differences: forward ones are biased by the curvature near the optimum.
                    jac = self._jacobian(views, level, volume, x, steps, start, centre, counter)
                    fresh = True
                a, g = normal_equations(jac, r)
                if fresh:
                    gn = np.linalg.solve(a + 1e-9 * np.diag(np.diag(a) + 1e-12), -g)
                    if np.all(np.abs(gn[:3]) < 0.5 * cfg.tolerance_mm) and np.all(np.abs(gn[3:]) < 0.5 * cfg.tolerance_deg):
                        settle = True  # the Gauss-Newton step from a Jacobian taken here is negligible
                        break
                # A chord Jacobian that fails twice is renewed rather than damped further.
                for _ in range(_MAX_DAMPING_TRIES if fresh else 2):
                    delta = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
                    x_new = np.clip(x + delta, lower, upper)
                    r_new, drrs_new = self._residual(views, level, volume, x_new, start, centre, counter)
                    cost_new = _sumsq(r_new)
                    if cost_new < cost:
                        step = x_new - x
                        x, r, cost, drrs = x_new, r_new, cost_new, drrs_new
                        lam = max(lam / 3.0, 1e-6)
                        improved = True
                        break
                    lam *= 4.0
                if improved or fresh:
                    break
                jac, lam = None, 1e-3
            if settle:
                if background_settled():
                    converged = True
                    break
                lam = 1e-3  # the Jacobian was taken at this very pose: look again with the redrawn background
                continue
            log.debug(
                "level f%d b%d it %d: cost %.6f lambda %.2g x %s improved %s fresh %s",
                level.volume_factor, level.binning, its, cost, lam, np.round(x, 3), improved, fresh,
            )
            small = np.all(np.abs(step[:3]) < cfg.tolerance_mm) and np.all(np.abs(step[3:]) < cfg.tolerance_deg)
            if use_bg and np.any(np.abs(x - views[0].x_bg) > relinearise):
                redraw_background()
                # The Jacobian stays as a chord: convergence is still only declared on a fresh one.
                fresh = False
                continue
            if small or not improved:
                # Converged only on a fresh Jacobian (a stale, chord one takes ever smaller steps far
                # from the optimum as well) and a background drawn at this pose.
                if fresh:
                    if background_settled():
                        converged = True
                        break
                    # Redrawn here; the Jacobian is from this pose or one negligible step away.
                    lam = 1e-3
                    continue
                jac, lam = None, 1e-3
                continue
            fresh = False
        if jac is None:  # the loop ended right after a background update: curvature at the final pose
            jac = self._jacobian(views, level, volume, x, steps, start, centre, counter)
        final = {"views": views, "level": level, "drrs": drrs, "r": r, "jac": jac, "cost": cost}
        return x, its, converged, final

    # ---------------------------------------------------------------------- quality
    def _quality(self, final, x, converged, reasons, roi_on, sat, level_margin) -> AnatomyQuality:
        cfg = self.config
        views, drrs, r, jac = final["views"], final["drrs"], final["r"], final["jac"]
        sims, measures, shifts = {}, {}, {}
        offset = 0
        for v, drr in zip(views, drrs):
            n = v.frame_features.size
            rv = r[offset : offset + n]
            offset += n
            name = v.imager.name
            sims[name] = 1.0 - 0.5 * _sumsq(rv)
            measures[name] = _frozen_map({m.value: similarity(m, v.frame, drr, v.mask) for m in Similarity})
            shifts[name] = self._view_shift_mm(v, drr, rv)
        std_mm = std_deg = (math.inf,) * 3
        if jac is not None:
            dof = max(r.size - 6, 1)
            sigma2 = _sumsq(r) / dof
            try:
                cov = sigma2 * np.linalg.inv(normal_equations(jac, r)[0])
                std = np.sqrt(np.maximum(np.diag(cov), 0.0))
                std_mm, std_deg = tuple(float(s) for s in std[:3]), tuple(float(s) for s in std[3:])
            except np.linalg.LinAlgError:
                pass
        at_bounds = bool(
            np.any(np.abs(x[:3]) >= cfg.translation_bound_mm * 0.999)
            or np.any(np.abs(x[3:]) >= cfg.rotation_bound_deg * 0.999)
        )
        reasons = list(reasons)
        if at_bounds:
            reasons.append(QualityReason.AT_BOUNDS)
        if not converged:
            reasons.append(QualityReason.NOT_CONVERGED)
        if min(sims.values()) < cfg.min_similarity:
            reasons.append(QualityReason.LOW_SIMILARITY)
        if max(shifts.values()) > cfg.max_view_shift_mm:
            reasons.append(QualityReason.VIEWS_DISAGREE)
        if max(std_mm) > cfg.max_std_mm or max(std_deg) > cfg.max_std_deg:
            reasons.append(QualityReason.ILL_DEFINED)
        ok = not reasons
        return AnatomyQuality(
            ok, QualityReason.OK if ok else reasons[0], tuple(reasons), _frozen_map(sims), _frozen_map(measures),
            _frozen_map(shifts), std_mm, std_deg, _frozen_map(roi_on), _frozen_map(sat), level_margin,
            bool(converged), at_bounds,
        )

    def _view_shift_mm(self, view: _View, drr: np.ndarray, rv: np.ndarray) -> float:
        """2D shift of this view's DRR that would best reduce this view's residual alone, mm at the isocentre."""
        h = 0.5
        jac = np.empty((rv.size, 2))
        for k, (dx, dy) in enumerate(((h, 0.0), (0.0, h))):
            cols = []
            for s in (1.0, -1.0):
                m = np.float32([[1, 0, s * dx], [0, 1, s * dy]])
                moved = cv2.warpAffine(drr, m, (drr.shape[1], drr.shape[0]), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REPLICATE)
                cols.append(_features(moved, view.mask, self.config.metric))
            jac[:, k] = (cols[0] - cols[1]) / (2 * h)
        a, g = normal_equations(jac, rv)
        try:
            shift = np.linalg.solve(a, -g)
        except np.linalg.LinAlgError:
            return math.inf
        return float(np.linalg.norm(shift)) * view.pixel_at_iso_mm


def register_anatomy(
    ct: CTVolume,
    isocentre_lps_mm: Sequence[float],
    geometry: StereoGeometry,
    frames: Mapping[str, np.ndarray],
    roi: RegionOfInterest,
    i0: float | Mapping[str, float] | None = None,
    initial_pose: Pose | None = None,
    config: AnatomyConfig | None = None,
) -> AnatomyResult:
    """One-shot stereo anatomy registration (the ``spineguide register --method anatomy`` entry point).

    Parameters
    ----------
    ct : CTVolume
        Planning CT.
    isocentre_lps_mm : (3,) sequence
        Plan isocentre, planning-CT LPS mm.
    geometry : StereoGeometry
        Imagers, room frame.
    frames : mapping imager name -> (rows, cols) array
        Raw kV frames.
    roi : RegionOfInterest
        Build with :meth:`RegionOfInterest.from_labels`, ``from_mask`` or ``from_box``.
    i0 : float or mapping, optional
        Unattenuated level(s); estimated if omitted.
    initial_pose : Pose, optional
        Start pose; identity if omitted.
    config : AnatomyConfig, optional

    Returns
    -------
    AnatomyResult
        ``elapsed_ms`` includes the volume preparation.
    """
    t0 = time.monotonic()
    reg = AnatomyRegistration(ct, isocentre_lps_mm, geometry, roi, config)
    res = reg.register(frames, i0=i0, initial_pose=initial_pose)
    total_ms = (time.monotonic() - t0) * 1000.0
    return AnatomyResult(
        res.pose, res.correction, res.similarity, res.quality, res.iterations, res.drr_evaluations, total_ms, False
    )
