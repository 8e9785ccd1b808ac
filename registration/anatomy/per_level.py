"""Per-level spine registration: each vertebra registered on its own, inter-level motion, discordance.

A spine between planning CT and treatment is not one rigid body: each vertebra
may have moved relative to its neighbours (flexion / extension, lateral bending,
axial rotation). :class:`LevelRegistration` registers the target vertebra and
its neighbours (+-1, +-2 levels) each with its own :class:`AnatomyRegistration`
(used as it is, one per level, each prepared once with that level's ROI), then
reports:

- each level's patient pose (room frame, docs/CONVENTIONS.md) with its own
  quality (``ok`` False with a reason code, never dropped);
- the motion between every adjacent pair (:class:`InterLevelMotion`, patient
  anatomical axes, signs in its docstring);
- whether the target's pose differs from its neighbours' beyond
  :class:`LevelThresholds` (``discordant``), and lets the caller pick which
  level's pose drives the correction (:meth:`LevelsResult.pose_for`).

Method (``docs/PER_LEVEL.md``):

1. **Spine stage.** One full :class:`AnatomyRegistration` (global stage,
   context level, wrong-level check) of all the levels' ROIs together, from
   ``initial_pose``: a single vertebra is a small ROI, and its set-up error can
   reach the next level; the whole spine's neighbourhood cannot be confused.
2. **Level stage.** Each level's own registration from the spine pose, in the
   registration's tracking mode with the full registration's non-context
   pyramid levels (binning 8, then 4): the spine pose is within the capture of
   tracking (the inter-level motion is a few degrees at most), and the global
   stage would be a second chance to jump to a neighbour.
3. **Frames cleaned per level.** An anatomy registration models everything
   outside its ROI as moving with the ROI; for one vertebra of a deformed
   spine that is wrong (its neighbours moved otherwise) and pulls the result
   to the neighbours' pose. So each level is registered without background on
   frames from which the other levels' excess attenuation (at their current
   poses) and the rest of the CT (at the spine pose; ``rest="spine"``) are
   subtracted (our DRRs, in the window of the levels), in ``LEVEL_PASSES``
   passes; or (``rest="level"``) with its exact background built on a CT
   without the other levels, which are subtracted from its frames.
   **Clutter mask**: what was subtracted is only approximately where the
   frames have it (the rest at the spine pose, the other levels at their
   estimates), and its strong edges (bowel gas, ribs, the neighbours' end
   plates) a fraction of a millimetre off leave false edges; the panel pixels
   where the subtracted image's gradient is strong against the level's own are
   left out of that level's comparison (at most ``MASK_MAX_DROP`` of its
   pixels; :func:`_clutter_mask`, ``AnatomyRegistration.register(pixel_mask=)``).
4. **Level check.** A level whose pose ends farther from the spine pose than
   ``LevelThresholds.max_departure_fraction`` of a level spacing (at its ROI
   centre) or ``max_departure_deg`` is refused (``wrong_level``): a vertebra
   that slid onto its neighbour's image must not pass as a 20 mm motion.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import cv2
import numpy as np
import scipy.ndimage
from scipy.spatial.transform import Rotation

from spineguide.calibration.geometry import StereoGeometry

from ..attenuation import hu_to_mu_per_mm, linear_attenuation_per_mm
from ..drr import AttenuationVolume, PanelRegion, compute_drr
from ..similarity import transmission
from ..errors import LevelError
from ..pose import Pose
from ..volume import CTVolume, room_from_lps_matrix
from .config import AnatomyConfig
from .registration import AnatomyRegistration
from .result import AnatomyResult
from .roi import RegionOfInterest

log = logging.getLogger(__name__)

__all__ = [
    "LevelError",
    "LevelThresholds",
    "LevelPose",
    "InterLevelMotion",
    "LevelsResult",
    "LevelRegistration",
    "inter_level_motion",
    "target_deviation",
    "discordance",
]

#: Reason code of a level that ended too far from the spine pose.
WRONG_LEVEL = "wrong_level"
#: Reason code of every level when the spine stage was refused.
START_REFUSED = "start_refused"
#: Passes of the level stage: the first removes the other levels at the spine pose, the next at their own results.
LEVEL_PASSES = 2
#: How each level's registration treats the rest of the CT (everything but the levels): "spine" = removed from
#: the frames at the spine stage's pose, the level registered without background; "level" = left in the frames
#: and modelled as moving with the level (the anatomy registration's exact background, the other levels removed
#: from the CT it is built on). docs/PER_LEVEL.md compares them.
REST_MODELS = ("spine", "level")
#: Largest acceptable std of a single level's registration (mm, deg; ``AnatomyConfig.max_std_mm/_deg`` for the
#: levels, never below the spine registration's own): one vertebra is a small target for rotation, and since the
#: std is honest (a sandwich that counts the smoothing's spatial correlation, session 10: about 3x the former
#: Gauss-Newton std) a cervical vertebra reports 0.35-0.40 deg for results 0.3 deg off; docs/PER_LEVEL.md states
#: the per-level accuracy (0.3-0.6 deg per vertebra) that this bound keeps.
LEVEL_MAX_STD_MM = 0.5
LEVEL_MAX_STD_DEG = 1.0
#: Register each level on its own share of the CT (its ROI dilated by ``AnatomyConfig.roi_dilation_voxels``, less
#: the other levels' ROIs) instead of its ROI dilated as a lone registration would (which takes in fragments of
#: the neighbours where they touch it: end plates, facet joints, moving with the wrong level).
EXCLUSIVE_ROI = True
#: Margin (mm, room) around the levels' box within which the frames get the rest of the CT removed.
REMOVAL_MARGIN_MM = 40.0
#: Mask out of each level's comparison the panel pixels where what was removed from its frames (the rest of the CT
#: at the spine pose and the other levels at their estimates: both only approximately where the frames have them)
#: has an image gradient above this fraction of the level's own strong gradients (their 90th percentile); None: no
#: mask (docs/PER_LEVEL.md, "Clutter mask").
MASK_REMOVED_GRADIENT: float | None = 0.5
#: Largest fraction of the level's own pixels (its DRR's support) that mask may drop: the threshold is raised to
#: keep the rest (the ribs over a thoracic vertebra would take it all). None: no cap.
MASK_MAX_DROP: float | None = 0.5
#: Gaussian sigma (panel pixels) of the images whose gradients that mask compares.
_MASK_SIGMA_PX = 2.0
#: Line integral (excess over water, per mm x mm) above which a panel pixel is one of the level's own.
_OWN_SUPPORT_MIN = 0.05
#: Unattenuated level of the cleaned frames handed to each level's registration (float frames).
_CLEANED_I0 = 10000.0


def _finite(value):
    """JSON-safe copy: non-finite floats become None (the wire carries finite numbers only)."""
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _pose_json(pose: Pose) -> dict:
    return {"translation_mm": [float(v) for v in pose.translation_mm], "rotation_deg": [float(v) for v in pose.rotation_deg]}


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True, slots=True)
class LevelThresholds:
    """When a target's pose is discordant with its neighbours', and when a level is refused.

    Attributes
    ----------
    max_target_mm : float
        Largest distance (mm) between where the target's pose and a neighbour's
        pose put the target's ROI centre (the target error if that neighbour
        drove the correction).
    max_rotation_deg : float
        Largest rotation angle (deg) between the target's and a neighbour's pose.
    neighbours : int
        How many levels either side of the target are compared (1 or 2).
    max_departure_fraction : float
        A level whose ROI centre ends farther than this fraction of the level
        spacing from where the spine pose puts it is refused (``wrong_level``).
    max_departure_deg : float
        A level rotated more than this from the spine pose is refused (``wrong_level``).
    """

    max_target_mm: float = 1.0
    max_rotation_deg: float = 1.0
    neighbours: int = 1
    max_departure_fraction: float = 0.3
    max_departure_deg: float = 6.0

    def __post_init__(self) -> None:
        for name in ("max_target_mm", "max_rotation_deg", "max_departure_fraction", "max_departure_deg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise LevelError(f"LevelThresholds.{name} must be a positive finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if isinstance(self.neighbours, bool) or self.neighbours not in (1, 2):
            raise LevelError(f"LevelThresholds.neighbours must be 1 or 2, got {self.neighbours!r}")


@dataclass(frozen=True, slots=True)
class LevelPose:
    """One vertebra's registration.

    Attributes
    ----------
    name : str
        Level name (``"L1"``).
    pose : Pose
        Patient pose of this vertebra (room frame, ``p_actual = R p_planned + t``
        about the isocentre, CONVENTIONS). When not ``ok``: the pose it ended at
        (or started from), not to be used.
    ok : bool
    reason : str
        ``"ok"`` or the first reason code (the anatomy registration's codes,
        plus ``wrong_level`` from the level check and ``start_refused``).
    quality : mapping
        The anatomy registration's quality (JSON form) plus ``departure_mm`` /
        ``departure_deg`` (distance from the spine pose at this ROI centre) and
        ``elapsed_ms``.
    centre_room_mm : (3,) array
        ROI centre, room frame at perfect setup, mm.
    """

    name: str
    pose: Pose
    ok: bool
    reason: str
    quality: Mapping
    centre_room_mm: np.ndarray

    def __post_init__(self) -> None:
        c = np.array(self.centre_room_mm, dtype=np.float64)
        c.setflags(write=False)
        object.__setattr__(self, "centre_room_mm", c)
        object.__setattr__(self, "quality", MappingProxyType(dict(self.quality)))

    def to_json(self) -> dict:
        return _finite({"name": self.name, "ok": self.ok, "reason": self.reason, "pose": _pose_json(self.pose),
                        "correction": self.pose.to_correction().to_json(), "centre_room_mm": self.centre_room_mm,
                        "quality": dict(self.quality)})


@dataclass(frozen=True, slots=True)
class InterLevelMotion:
    """Motion of a cranial vertebra relative to the caudal one next to it, in the patient's anatomical axes.

    ``Q = P_caudal^-1 o P_cranial`` (room frame) is the cranial vertebra's pose
    with the caudal one held still: identity when both moved together, whatever
    the set-up error. It is expressed in the patient's own axes (planning CT
    LPS: +x patient left, +y posterior, +z superior) with
    ``R_lps = M^T R_Q M``, ``M`` the CONVENTIONS room-from-LPS rotation of the
    patient position, so the same anatomical motion gives the same numbers for
    HFS, FFS, HFP and FFP. Angles are ``R_lps = Rz(axial) Ry(lateral) Rx(flexion)``
    (extrinsic xyz, as CONVENTIONS' pose angles), right-hand rule:

    - ``flexion_extension_deg``: about the patient's left (+x) axis; positive =
      flexion (the cranial vertebra's superior end tilts anterior), negative =
      extension. For HFS this is a positive room pitch; for HFP or FFS a negative one.
    - ``lateral_bending_deg``: about the posterior (+y) axis; positive = the cranial
      vertebra bends toward the patient's left.
    - ``axial_rotation_deg``: about the superior (+z) axis; positive = its anterior
      face turns toward the patient's left.
    - ``translation_mm``: displacement (LPS axes: left, posterior, superior; mm) of
      the cranial vertebra's ROI centre under ``Q``.

    ``ok`` is False when either level's registration is not ok (the numbers are then not to be used).
    """

    cranial: str
    caudal: str
    flexion_extension_deg: float
    lateral_bending_deg: float
    axial_rotation_deg: float
    translation_mm: np.ndarray
    ok: bool

    def __post_init__(self) -> None:
        t = np.array(self.translation_mm, dtype=np.float64)
        if t.shape != (3,):
            raise LevelError(f"InterLevelMotion {self.cranial}/{self.caudal}: translation_mm must be (3,), got {t.shape}")
        t.setflags(write=False)
        object.__setattr__(self, "translation_mm", t)

    @property
    def rotation_deg(self) -> np.ndarray:
        """``[flexion_extension, lateral_bending, axial_rotation]`` (deg)."""
        return np.array([self.flexion_extension_deg, self.lateral_bending_deg, self.axial_rotation_deg])

    def to_json(self) -> dict:
        return _finite({"cranial": self.cranial, "caudal": self.caudal, "ok": self.ok,
                        "flexion_extension_deg": self.flexion_extension_deg,
                        "lateral_bending_deg": self.lateral_bending_deg,
                        "axial_rotation_deg": self.axial_rotation_deg,
                        "translation_mm": self.translation_mm, "axes": "patient LPS (left, posterior, superior)"})


def inter_level_motion(cranial: str, caudal: str, pose_cranial: Pose, pose_caudal: Pose,
                       centre_cranial_room_mm: Sequence[float], patient_position, ok: bool = True) -> InterLevelMotion:
    """:class:`InterLevelMotion` of two level poses (room frame); ``centre_cranial_room_mm`` = the cranial
    level's ROI centre (room frame at perfect setup, mm); ``patient_position`` as CONVENTIONS."""
    m = room_from_lps_matrix(patient_position)
    q = pose_caudal.inverse().compose(pose_cranial)
    r_lps = m.T @ q.rotation @ m
    flex, lat, axial = Rotation.from_matrix(r_lps).as_euler("xyz", degrees=True)
    c = np.asarray(centre_cranial_room_mm, dtype=np.float64)
    t = m.T @ (q.apply(c[None, :])[0] - c)
    return InterLevelMotion(cranial, caudal, float(flex), float(lat), float(axial), t, bool(ok))


def target_deviation(pose_target: Pose, pose_other: Pose, centre_target_room_mm: Sequence[float]) -> tuple[float, float]:
    """``(mm, deg)``: distance between where the two poses put the target's ROI centre, and the rotation angle between them."""
    c = np.asarray(centre_target_room_mm, dtype=np.float64)[None, :]
    mm = float(np.linalg.norm(pose_other.apply(c)[0] - pose_target.apply(c)[0]))
    deg = pose_other.inverse().compose(pose_target).angle_deg()
    return mm, float(deg)


def discordance(levels: Sequence[LevelPose], target: str, thresholds: LevelThresholds) -> tuple[bool, str]:
    """``(discordant, detail)`` of a target among its registered neighbours (:attr:`LevelsResult.discordant`).

    ``levels`` cranial to caudal; the neighbours compared are the ``thresholds.neighbours`` levels either side
    of ``target``. Fail-safe: True when the target or every compared neighbour is not ok.

    Raises
    ------
    LevelError
        ``target`` not among ``levels``.
    """
    names = [lv.name for lv in levels]
    if target not in names:
        raise LevelError(f"unknown target level {target!r} (levels: {', '.join(names)})")
    th = thresholds
    i = names.index(target)
    tgt = levels[i]
    if not tgt.ok:
        return True, f"target {target} not registered ({tgt.reason}): discordance cannot be checked"
    parts, beyond, checked = [], [], 0
    for j in range(max(i - th.neighbours, 0), min(i + th.neighbours + 1, len(levels))):
        if j == i:
            continue
        nb = levels[j]
        if not nb.ok:
            parts.append(f"{nb.name}: not registered ({nb.reason})")
            continue
        mm, deg = target_deviation(tgt.pose, nb.pose, tgt.centre_room_mm)
        checked += 1
        parts.append(f"{nb.name}: {mm:.2f} mm, {deg:.2f} deg")
        if mm > th.max_target_mm or deg > th.max_rotation_deg:
            beyond.append(nb.name)
    limits = f"limits {th.max_target_mm:g} mm at the target, {th.max_rotation_deg:g} deg"
    if checked == 0:
        return True, (f"no neighbour of {target} registered: discordance cannot be checked "
                      f"({'; '.join(parts) or 'no neighbour'})")
    if beyond:
        return True, f"{target} differs from {', '.join(beyond)} beyond {limits} ({'; '.join(parts)})"
    return False, f"{target} agrees with its neighbours within {limits} ({'; '.join(parts)})"


@dataclass(frozen=True, slots=True)
class LevelsResult:
    """Outcome of one per-level registration of a stereo pair.

    Attributes
    ----------
    levels : tuple of LevelPose
        Cranial to caudal, every level asked for (refused ones with ``ok`` False).
    inter_level : tuple of InterLevelMotion
        One per adjacent pair, cranial to caudal.
    target : str
    discordant : bool
        True when an ok neighbour (within ``LevelThresholds.neighbours``) puts the
        target's ROI centre more than ``max_target_mm`` from where the target's own
        pose puts it, or differs in rotation by more than ``max_rotation_deg``; also
        True (fail-safe) when it cannot be checked (target or every neighbour refused).
    discordance_detail : str
        Per neighbour ``"L2: 0.42 mm, 1.31 deg"`` and the verdict, for the operator.
    spine_pose : Pose
        The spine stage's pose (start of every level).
    spine_ok : bool
    spine_reason : str
    elapsed_ms : float
        Wall time of the whole registration (all levels), ms.
    """

    levels: tuple[LevelPose, ...]
    inter_level: tuple[InterLevelMotion, ...]
    target: str
    discordant: bool
    discordance_detail: str
    spine_pose: Pose
    spine_ok: bool
    spine_reason: str
    elapsed_ms: float

    def level(self, name: str) -> LevelPose:
        """The :class:`LevelPose` of ``name``; :class:`LevelError` naming the levels if unknown."""
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise LevelError(f"unknown level {name!r} (levels: {', '.join(lv.name for lv in self.levels)})")

    def pose_for(self, level: str) -> Pose:
        """The pose that drives the correction when the physicist chooses ``level``.

        Raises
        ------
        LevelError
            Unknown level, or a level whose registration is not ok (with its reason).
        """
        lv = self.level(level)
        if not lv.ok:
            raise LevelError(f"level {level} was not registered ({lv.reason}): its pose cannot drive the correction")
        return lv.pose

    def to_json(self) -> dict:
        """JSON object (finite numbers only; a non-finite quality figure becomes null)."""
        return _finite({
            "schema": "levels-result/1",
            "target": self.target,
            "levels": [lv.to_json() for lv in self.levels],
            "inter_level": [m.to_json() for m in self.inter_level],
            "discordant": self.discordant,
            "discordance_detail": self.discordance_detail,
            "spine": {"ok": self.spine_ok, "reason": self.spine_reason, "pose": _pose_json(self.spine_pose)},
            "elapsed_s": self.elapsed_ms / 1000.0,
        })


# ------------------------------------------------------------------- neighbour removal
def _dilated(mask: np.ndarray, voxels: int) -> np.ndarray:
    return scipy.ndimage.binary_dilation(mask, iterations=voxels) if voxels else mask


def _without(ct: CTVolume, mask: np.ndarray) -> CTVolume:
    """The CT with every voxel of ``mask`` above water set to water (0 HU): its excess attenuation removed."""
    hu = np.array(ct.hu, dtype=np.float32)
    hu[mask] = np.minimum(hu[mask], np.float32(0.0))
    return CTVolume(hu, ct.spacing_mm, ct.origin_lps_mm, ct.direction, ct.patient_position, f"{ct.source} (levels removed)")


def _excess_volume(ct: CTVolume, mask: np.ndarray, isocentre_lps_mm, config: AnatomyConfig) -> AttenuationVolume:
    """Attenuation in excess of water inside ``mask`` (cropped), at the imaging energy: what :func:`_without` removes."""
    idx = np.nonzero(mask)
    lo = [max(int(ix.min()) - 1, 0) for ix in idx]
    hi = [int(ix.max()) + 2 for ix in idx]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    mu = hu_to_mu_per_mm(ct.hu[sl], config.imaging_energy_kev, config.ct_energy_kev)
    mu_water = np.float32(linear_attenuation_per_mm("water", config.imaging_energy_kev))
    excess = np.where(mask[sl], np.maximum(mu - mu_water, np.float32(0.0)), np.float32(0.0)).astype(np.float32)
    shift = np.eye(4)
    shift[:3, 3] = [lo[2], lo[1], lo[0]]
    return AttenuationVolume(excess, ct.room_from_index(isocentre_lps_mm) @ shift)


def _clutter_mask(imager, window: PanelRegion, own: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Panel pixels a level's comparison may use: not those where the image removed from its frames has strong edges.

    ``own`` (the level's excess DRR) and ``removed`` (what was subtracted from the frames' line integrals: the rest
    and the other levels) are DRRs of ``window``. A pixel is dropped when ``removed``'s gradient (both smoothed by
    ``_MASK_SIGMA_PX``) exceeds ``MASK_REMOVED_GRADIENT`` x the 90th percentile of ``own``'s over its support, the
    threshold raised so that at most ``MASK_MAX_DROP`` of that support is dropped. Why: the removed image is drawn
    at poses that are only estimates (the rest at the spine pose, where the tissue round a moved vertebra is not),
    and an edge of it a fraction of a millimetre off leaves a strong false edge in the cleaned frame.

    Returns
    -------
    (rows, cols) bool
        Full panel; True outside ``window``.
    """
    out = np.ones((imager.rows, imager.cols), dtype=bool)

    def grad(img):
        sm = cv2.GaussianBlur(np.asarray(img, dtype=np.float32), (0, 0), _MASK_SIGMA_PX, borderType=cv2.BORDER_REPLICATE)
        gy, gx = np.gradient(sm)
        return np.hypot(gx, gy)

    support = np.asarray(own) > _OWN_SUPPORT_MIN
    if np.count_nonzero(support) < 100:
        return out
    g_own = grad(own)
    g_removed = grad(removed)
    thr = MASK_REMOVED_GRADIENT * float(np.percentile(g_own[support], 90))
    if MASK_MAX_DROP is not None:
        thr = max(thr, float(np.percentile(g_removed[support], 100.0 * (1.0 - MASK_MAX_DROP))))
    out[window.row0:window.row0 + window.rows, window.col0:window.col0 + window.cols] = g_removed <= thr
    return out


# ---------------------------------------------------------------------- registration
def _check_levels(ct: CTVolume, levels: Mapping[str, RegionOfInterest], target: str) -> None:
    if not isinstance(levels, Mapping) or len(levels) < 1:
        raise LevelError("levels must be a non-empty mapping of level name -> RegionOfInterest")
    names = list(levels)
    if target not in levels:
        raise LevelError(f"unknown target level {target!r} (levels: {', '.join(names)})")
    masks = {}
    for name, roi in levels.items():
        if not isinstance(name, str) or not name:
            raise LevelError(f"level names must be non-empty strings, got {name!r}")
        if not isinstance(roi, RegionOfInterest):
            raise LevelError(f"level {name}: a RegionOfInterest is needed, got {type(roi).__name__}")
        if roi.mask.shape != ct.hu.shape:
            raise LevelError(f"level {name}: ROI shape {roi.mask.shape} does not match the CT {ct.hu.shape}")
        masks[name] = roi.mask
    for a, b in zip(names, names[1:]):
        both = int(np.count_nonzero(masks[a] & masks[b]))
        if both:
            raise LevelError(f"levels {a} and {b} overlap ({both} voxels in both ROIs): one ROI per vertebra")
    sup = np.asarray(ct.lps_from_index)[:3, :3].T @ np.array([0.0, 0.0, 1.0])  # index-space gradient of LPS z
    heights = {}
    for name, m in masks.items():
        kji = np.argwhere(m)
        heights[name] = float(kji[:, ::-1].mean(axis=0) @ sup)
    for a, b in zip(names, names[1:]):
        if not heights[a] > heights[b]:
            raise LevelError(f"levels must be ordered cranial to caudal: {a} (centre z {heights[a]:.1f}) is not "
                             f"superior to {b} (centre z {heights[b]:.1f}) in the CT")


class LevelRegistration:
    """Prepared per-level registration: one :class:`AnatomyRegistration` per level plus the spine's.

    Parameters
    ----------
    ct : CTVolume
        Planning CT (HU, LPS).
    isocentre_lps_mm : (3,) sequence
        Plan isocentre, planning-CT LPS mm.
    geometry : StereoGeometry
        Imagers, room frame.
    levels : mapping level name -> RegionOfInterest
        One ROI per vertebra (e.g. ``RegionOfInterest.from_labels(ct, labels, v)``),
        ordered cranial to caudal, not overlapping.
    target : str
        The level the plan treats (one of ``levels``).
    config : AnatomyConfig, optional
        Settings of every registration; the levels use its full pyramid's
        non-context levels as their tracking levels.
    thresholds : LevelThresholds, optional
    rest : {"spine", "level"}
        How each level's registration treats the CT outside the levels (module docstring, step 3).

    Thread safety: :meth:`register` keeps no state between calls (the anatomy registrations' own rule).

    Raises
    ------
    LevelError
        Unknown target, unordered or overlapping levels, ROI on another grid, unknown ``rest``.
    RoiError
        An empty ROI (raised by :class:`RegionOfInterest` itself).
    """

    def __init__(self, ct: CTVolume, isocentre_lps_mm, geometry: StereoGeometry,
                 levels: Mapping[str, RegionOfInterest], target: str, config: AnatomyConfig | None = None,
                 thresholds: LevelThresholds | None = None, *, rest: str = "spine") -> None:
        _check_levels(ct, levels, target)
        if rest not in REST_MODELS:
            raise LevelError(f"rest must be one of {', '.join(REST_MODELS)}, got {rest!r}")
        self.rest = rest
        self.config = AnatomyConfig() if config is None else config
        self.thresholds = LevelThresholds() if thresholds is None else thresholds
        if not isinstance(self.thresholds, LevelThresholds):
            raise LevelError(f"thresholds must be LevelThresholds, got {type(self.thresholds).__name__}")
        cfg = self.config
        self.names = tuple(levels)
        self.target = target
        self.geometry = geometry
        self.patient_position = ct.patient_position
        union = np.zeros(ct.hu.shape, dtype=bool)
        for roi in levels.values():
            union |= roi.mask
        spacing = [roi.level_spacing_mm for roi in levels.values() if roi.level_spacing_mm]
        self.level_spacing_mm = float(np.median(spacing)) if spacing else cfg.level_spacing_mm
        spine_roi = RegionOfInterest(union, f"levels {self.names[0]}-{self.names[-1]}", self.level_spacing_mm)
        self._spine = AnatomyRegistration(ct, isocentre_lps_mm, geometry, spine_roi, cfg)
        # Each level: its own ROI, no background model (the frames get theirs removed instead, below),
        # the full pyramid's non-context levels run from the spine pose.
        fine = tuple(lv for lv in cfg.levels if not lv.context) or cfg.levels
        bounds = dict(max_std_mm=max(cfg.max_std_mm, LEVEL_MAX_STD_MM), max_std_deg=max(cfg.max_std_deg, LEVEL_MAX_STD_DEG))
        # The CT split into "rest" (everything but the levels' excess over water) and one excess volume
        # per level (its dilated mask, a voxel two dilations claim given to the first): rest + sum = CT.
        claimed = np.zeros(ct.hu.shape, dtype=bool)
        owns = {}
        for name, roi in levels.items():
            own = _dilated(roi.mask, cfg.roi_dilation_voxels) & ~claimed
            for other, oroi in levels.items():
                if other != name:
                    own &= ~oroi.mask
            claimed |= own
            owns[name] = own
        self._excess = {name: _excess_volume(ct, own, isocentre_lps_mm, cfg) for name, own in owns.items()}
        room_from_index = ct.room_from_index(isocentre_lps_mm)
        if rest == "spine":
            level_config = dataclasses.replace(cfg, tracking_levels=fine, background=False, **bounds)
            if EXCLUSIVE_ROI:
                # Each level's model is its own share of the CT, exactly what is removed from the other levels'
                # frames: its ROI dilated, less the other levels' ROIs (no dilation on top).
                level_config = dataclasses.replace(level_config, roi_dilation_voxels=0)
                self._levels = {name: AnatomyRegistration(ct, isocentre_lps_mm, geometry,
                                                          RegionOfInterest(owns[name], f"{name} (own)",
                                                                           roi.level_spacing_mm), level_config)
                                for name, roi in levels.items()}
            else:
                self._levels = {name: AnatomyRegistration(ct, isocentre_lps_mm, geometry, roi, level_config)
                                for name, roi in levels.items()}
        else:  # "level": the rest moves with the level registered (its exact background), the other levels removed
            level_config = dataclasses.replace(cfg, tracking_levels=fine, **bounds)
            self._levels = {}
            for name, roi in levels.items():
                others = np.zeros(ct.hu.shape, dtype=bool)
                for other, oroi in levels.items():
                    if other != name:
                        others |= oroi.mask
                others = _dilated(others, cfg.roi_dilation_voxels) & ~roi.mask
                self._levels[name] = AnatomyRegistration(_without(ct, others), isocentre_lps_mm, geometry, roi,
                                                         level_config)
        mu = hu_to_mu_per_mm(ct.hu, cfg.imaging_energy_kev, cfg.ct_energy_kev)
        mu_water = np.float32(linear_attenuation_per_mm("water", cfg.imaging_energy_kev))
        np.minimum(mu, mu_water, out=mu, where=claimed)
        self._rest = AttenuationVolume(mu, room_from_index)
        # Panel window of the removal: the levels' box grown by REMOVAL_MARGIN_MM (room, perfect setup).
        pts = np.argwhere(union)[:, ::-1].astype(np.float64) @ room_from_index[:3, :3].T + room_from_index[:3, 3]
        lo, hi = pts.min(axis=0) - REMOVAL_MARGIN_MM, pts.max(axis=0) + REMOVAL_MARGIN_MM
        self._window_corners_room_mm = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                                                 for z in (lo[2], hi[2])])

    def centre_room_mm(self, level: str) -> np.ndarray:
        """ROI centre of ``level``, room frame at perfect setup (mm)."""
        return np.array(self._levels[level].roi_centre_room_mm)

    def register(self, frames: Mapping[str, np.ndarray], i0=None, initial_pose: Pose | None = None) -> LevelsResult:
        """Register every level on one stereo pair of raw kV frames.

        Parameters
        ----------
        frames : mapping imager name -> (rows, cols) array
            Raw frames (bone dark).
        i0 : float or mapping imager -> float, optional
            Unattenuated level(s); estimated if omitted.
        initial_pose : Pose, optional
            Start of the spine stage (room frame); identity if omitted.

        Returns
        -------
        LevelsResult

        Raises
        ------
        RegistrationFrameError
            As :meth:`AnatomyRegistration.register`.
        """
        t0 = time.monotonic()
        spine = self._spine.register(frames, i0=i0, initial_pose=initial_pose)
        spine_ok = spine.quality.ok
        fractions = {name: transmission(np.asarray(frames[name]), i0.get(name) if isinstance(i0, Mapping) else i0, name)[0]
                     for name in self.geometry.names}
        windows = {name: self._window(self.geometry[name], spine.pose) for name in self.geometry.names}
        views = [name for name in self.geometry.names if windows[name] is not None]
        poses = {name: spine.pose for name in self.names}
        results: dict[str, AnatomyResult] = {}
        rest = None
        for _ in range(LEVEL_PASSES):
            # Per view: the rest at the spine pose (once), every level's excess at its current pose.
            if rest is None:
                rest = {name: (compute_drr(self._rest, self.geometry[name], spine.pose, windows[name])
                               if self.rest == "spine" else 0.0) for name in views}
            excess = {lv: {name: compute_drr(self._excess[lv], self.geometry[name], poses[lv], windows[name])
                           for name in views} for lv in self.names}
            for lv in self.names:
                removed = {name: rest[name] + sum(excess[u][name] for u in self.names if u != lv) for name in views}
                cleaned = {}
                for name in self.geometry.names:
                    # The other levels' line integrals removed: the transmitted fraction times exp(+removed).
                    frac = fractions[name].astype(np.float64)
                    w = windows[name]
                    if w is not None:
                        frac[w.row0:w.row0 + w.rows, w.col0:w.col0 + w.cols] *= np.exp(removed[name])
                    cleaned[name] = (_CLEANED_I0 * frac).astype(np.float32)
                # Pixels where the removal's errors would be strong edges are left out of the comparison.
                mask = None
                if MASK_REMOVED_GRADIENT is not None:
                    mask = {name: _clutter_mask(self.geometry[name], windows[name], excess[lv][name], removed[name])
                            for name in views}
                results[lv] = self._levels[lv].register(cleaned, i0=_CLEANED_I0, initial_pose=poses[lv], tracking=True,
                                                        pixel_mask=mask)
            poses = {lv: results[lv].pose for lv in self.names}
        out = [self._level_pose(lv, results[lv], spine, spine_ok) for lv in self.names]
        inter = []
        for a, b in zip(out, out[1:]):
            inter.append(inter_level_motion(a.name, b.name, a.pose, b.pose, a.centre_room_mm, self.patient_position,
                                            a.ok and b.ok))
        discordant, detail = self._discordance(out)
        elapsed_ms = (time.monotonic() - t0) * 1000.0
        log.debug("per-level registration: %s; %s; %.0f ms", ", ".join(f"{lv.name} {lv.reason}" for lv in out),
                  detail, elapsed_ms)
        return LevelsResult(tuple(out), tuple(inter), self.target, discordant, detail, spine.pose, spine_ok,
                            spine.quality.reason.value, elapsed_ms)

    def _window(self, imager, pose: Pose) -> PanelRegion | None:
        """Panel pixels of the levels' box (grown by REMOVAL_MARGIN_MM) at ``pose``, clipped; None if off the panel."""
        px = imager.project(pose.apply(self._window_corners_room_mm))
        c0, r0 = max(int(np.floor(px[:, 0].min())), 0), max(int(np.floor(px[:, 1].min())), 0)
        c1, r1 = min(int(np.ceil(px[:, 0].max())) + 1, imager.cols), min(int(np.ceil(px[:, 1].max())) + 1, imager.rows)
        if c1 - c0 < 1 or r1 - r0 < 1:
            return None
        return PanelRegion(r0, c0, r1 - r0, c1 - c0)

    def _level_pose(self, name: str, res: AnatomyResult, spine: AnatomyResult, spine_ok: bool) -> LevelPose:
        centre = np.asarray(self._levels[name].roi_centre_room_mm)
        dep_mm, dep_deg = target_deviation(res.pose, spine.pose, centre)
        q = dict(res.quality.to_json())
        q.update(departure_mm=dep_mm, departure_deg=dep_deg, iterations=res.iterations,
                 level_elapsed_ms=res.elapsed_ms)
        ok, reason = res.quality.ok, res.quality.reason.value
        th = self.thresholds
        if ok and (dep_mm > th.max_departure_fraction * self.level_spacing_mm or dep_deg > th.max_departure_deg):
            ok, reason = False, WRONG_LEVEL
        if not spine_ok:
            ok, reason = False, START_REFUSED
        q["ok"], q["reason"] = ok, reason
        return LevelPose(name, res.pose, ok, reason, q, centre)

    def _discordance(self, levels: list[LevelPose]) -> tuple[bool, str]:
        return discordance(levels, self.target, self.thresholds)
