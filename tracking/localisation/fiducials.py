"""Fiducial localisation: stereo correspondence, triangulation and the couch correction.

From one stereo pair of raw kV frames to the couch correction
(docs/CONVENTIONS.md): detect seeds in each frame
(:mod:`spineguide.tracking.localisation.detection`), pair detections across the two views with the
epipolar geometry, triangulate the candidate pairs (least squares, with the
rays' skew distance as quality figure), assign the 3D candidates to the
planned seeds by the rigid-body consistency of the constellation (inter-seed
distances against the plan, and the prior pose when there is one), and
register the assigned seeds to the plan (:mod:`spineguide.registration.points`).

One missing seed (hidden in one view) or one extra detection changes only
which assignment wins. Frames given under swapped imager labels are caught by
solving both labellings (triangulated together in one call): the wrong one
gives a mirrored constellation (a large fiducial registration error or an
implausible rotation) and the call is refused, never answered with a silently
wrong correction. Seeds whose shadows merge in one view are named and kept
out of the fit (flag ``SEEDS_OVERLAP``) rather than triangulated from the
blob between them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from spineguide.calibration.errors import GeometryError
from spineguide.calibration.foundation import checked_integer, checked_number
from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.points import (
    PointFlag,
    PointRegistrationConfig,
    PointRegistrationError,
    PointRegistrationResult,
    SeedMigrationError,
    register_points,
)
from spineguide.registration.pose import Correction, Pose

from ..errors import FiducialConfigError, FiducialNotFoundError, FrameError, ImagerLabelError
from ._stereo_kernels import triangulate_two_views
from .constellation import evidence_maps, rigid_fit, sample_bilinear, search_constellation
from .detection import Detection, DetectionConfig, _check_frame, _check_i0, detect_seeds_in_frames, estimate_i0
from .flatfield import FlatField
from .seed_search import refine_seeds, response_map

__all__ = [
    "Correspondence",
    "FaintSearchConfig",
    "FiducialConfig",
    "FiducialConfigError",
    "FiducialFlag",
    "FiducialResult",
    "ImagerLabelError",
    "SeedLocalisation",
    "localise_fiducials",
    "match_stereo",
]


class FiducialFlag(Enum):
    """Conditions reported with a fiducial result."""

    TRANSLATION_ONLY = "translation_only"
    ROTATION_UNRELIABLE = "rotation_unreliable"
    SEED_EXCLUDED = "seed_excluded"
    SEED_MISSING = "seed_missing"
    SEEDS_OVERLAP = "seeds_overlap"
    EXTRA_DETECTIONS = "extra_detections"
    FAINT_SEARCH = "faint_search"  # found by the plan-guided search (low dose, scatter)


_FROM_POINT_FLAG = {
    PointFlag.TRANSLATION_ONLY: FiducialFlag.TRANSLATION_ONLY,
    PointFlag.ROTATION_UNRELIABLE: FiducialFlag.ROTATION_UNRELIABLE,
    PointFlag.SEED_EXCLUDED: FiducialFlag.SEED_EXCLUDED,
}


@dataclass(frozen=True, slots=True)
class FaintSearchConfig:
    """The plan-guided joint search for seeds a stand-alone detector misses (``spineguide.tracking.localisation.constellation``).

    Runs when the clean-frame detector leaves a planned seed unfound (or
    finds none): the planned constellation is searched as a whole in both
    views' matched-filter evidence maps, then each seed is verified by a
    sub-pixel fit where the pose puts it, or (a migration) by a strong fit
    within ``migration_search_mm`` of that place.

    Attributes
    ----------
    enabled : bool
    snr_cap : float
        Evidence of one seed view (the standardised response in units of
        the region's 99.5th percentile: bone clutter grows with the dose) is
        capped at this, so that no single bright structure outweighs a seed.
    translation_range_mm, translation_step_mm : float
        Translation grid of the constellation search around the plan (the
        prior pose when tracking), mm.
    tracking_range_mm : float
        Translation range around a prior pose, mm.
    local_reach_mm : float
        Half-size of the cube searched around each seed of a translation
        hypothesis (rotation, the grid's step), mm.
    pool_mm : float
        Max-pooling radius of the translation search (absorbs rotation), mm
        at the isocentre.
    smooth_mm : float
        Gaussian sigma of the maps of the 6-DoF refinement, mm at the isocentre.
    hypotheses : int
        Translation maxima refined and verified.
    seed_min_snr : float
        Fitted SNR (amplitude over its standard error) of a seed at its
        predicted place, in each view.
    near_mm : float
        Largest distance of that fit from the predicted place, mm at the isocentre.
    anchor_min_snr : float
        Two seeds of a constellation must reach this fitted SNR in both views
        (the pose is then not made of noise fitted into place).
    moved_min_snr : float
        Fitted SNR in both views of a seed found away from its predicted place
        (a migration claim needs a seed that stands out on its own).
    migration_search_mm : float
        Half-size of the cube searched around the predicted place of a seed
        not seen there, mm.
    two_seed_min_snr : float
        Fitted SNR each seed of a two-seed solution needs in both views (two
        seeds agree on a single distance, weak evidence).
    search_margin_mm : float
        The region analysed: a sphere around the planned seeds, this much
        larger than their extent and the translation range, mm.
    """

    enabled: bool = True
    snr_cap: float = 2.0
    translation_range_mm: float = 12.0
    translation_step_mm: float = 1.0
    tracking_range_mm: float = 3.0
    local_reach_mm: float = 4.0
    pool_mm: float = 2.0
    smooth_mm: float = 0.4
    hypotheses: int = 3
    seed_min_snr: float = 5.0
    near_mm: float = 1.0
    anchor_min_snr: float = 6.0
    moved_min_snr: float = 8.0
    migration_search_mm: float = 3.5
    two_seed_min_snr: float = 10.0
    search_margin_mm: float = 8.0

    def __post_init__(self) -> None:
        for name in ("snr_cap", "translation_range_mm", "translation_step_mm", "tracking_range_mm",
                     "local_reach_mm", "pool_mm", "smooth_mm", "seed_min_snr", "near_mm", "anchor_min_snr",
                     "moved_min_snr", "migration_search_mm", "two_seed_min_snr", "search_margin_mm"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError,
                           f"faint search config: {name} must be a positive finite number, got {value!r}",
                           minimum=0.0, exclusive_minimum=True)
        checked_integer(self.hypotheses, FiducialConfigError,
                        f"faint search config: hypotheses must be a positive integer, got {self.hypotheses!r}",
                        minimum=1)
        if not isinstance(self.enabled, bool):
            raise FiducialConfigError(f"faint search config: enabled must be a bool, got {self.enabled!r}")


@dataclass(frozen=True, slots=True)
class FiducialConfig:
    """Limits of fiducial localisation (mm in the room, px on the panel, degrees).

    Attributes
    ----------
    detection : DetectionConfig
    registration : PointRegistrationConfig
        Holds the migration limit (default 1.5 mm).
    max_epipolar_px : float
        Largest distance of a detection from the epipolar line of its partner
        (the larger of the two directions), pixels.
    max_ray_distance_mm : float
        Largest skew distance between the two back-projected rays of a pair, mm.
    association_tolerance_mm : float
        Largest change of an inter-seed distance accepted while assigning
        candidates to planned seeds; wider than the migration limit, so that a
        migrated seed is still assigned and then named by the rigid-body check.
    prior_radius_mm : float
        With a prior pose, largest distance of a candidate from its predicted
        room position, mm.
    max_rotation_deg : float
        Largest total rotation of a plausible patient pose, degrees; a
        labelling that needs more is rejected.
    max_fre_mm : float
        Largest fiducial registration error of an acceptable result, mm.
    swap_margin_mm : float
        How much lower the FRE of one labelling must be to prefer it when both
        are plausible and their corrections differ, mm.
    agreement_mm : float
        Two labellings whose poses move every planned seed to within this
        distance of each other give the same answer, mm.
    faint : FaintSearchConfig
        The plan-guided second search (low dose, scatter).
    """

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    registration: PointRegistrationConfig = field(default_factory=PointRegistrationConfig)
    max_epipolar_px: float = 2.0
    max_ray_distance_mm: float = 1.0
    association_tolerance_mm: float = 5.0
    prior_radius_mm: float = 10.0
    max_rotation_deg: float = 10.0
    max_fre_mm: float = 1.0
    swap_margin_mm: float = 0.3
    agreement_mm: float = 0.2
    faint: FaintSearchConfig = field(default_factory=FaintSearchConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.faint, FaintSearchConfig):
            raise FiducialConfigError(f"fiducial config: faint must be a FaintSearchConfig, got {self.faint!r}")
        if not isinstance(self.detection, DetectionConfig):
            raise FiducialConfigError(f"fiducial config: detection must be a DetectionConfig, got {self.detection!r}")
        if not isinstance(self.registration, PointRegistrationConfig):
            raise FiducialConfigError(
                f"fiducial config: registration must be a PointRegistrationConfig, got {self.registration!r}"
            )
        for name in ("max_epipolar_px", "max_ray_distance_mm", "association_tolerance_mm", "prior_radius_mm",
                     "max_rotation_deg", "max_fre_mm", "swap_margin_mm", "agreement_mm"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError,
                           f"fiducial config: {name} must be a positive finite number, got {value!r}",
                           minimum=0.0, exclusive_minimum=True)


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
    """

    name: str
    found: bool
    pixels_px: dict | None
    point_room_mm: np.ndarray | None
    ray_distance_mm: float | None
    reprojection_px: float | None
    residual_mm: float | None
    migrated: bool

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
            "flags": sorted(f.value for f in self.flags),
            "seeds": [s.to_json() for s in self.seeds],
            "n_detections": dict(self.n_detections),
            "overlapping": list(self.overlapping),
        }


# ---------------------------------------------------------------------------- correspondence
_REFINE_STEPS = 3  # Gauss-Newton steps after the rays' closest point, as StereoGeometry.triangulate


def _epipolar_pairs(f_ab: np.ndarray, px_a: np.ndarray, px_b: np.ndarray, limit_px: float):
    """Index pairs ``(i, j)`` whose distance from each other's epipolar line is <= ``limit_px`` both ways.

    ``f_ab`` is the fundamental matrix from view a to view b (``x_b^T F x_a = 0``);
    its transpose maps b to a.
    """
    ha = np.hstack([px_a, np.ones((len(px_a), 1))])
    hb = np.hstack([px_b, np.ones((len(px_b), 1))])
    lines_b = ha @ f_ab.T  # in view b, one per detection of a
    lines_a = hb @ f_ab  # in view a, one per detection of b
    d_ab = np.abs(lines_b @ hb.T) / np.linalg.norm(lines_b[:, :2], axis=1, keepdims=True)
    d_ba = np.abs(ha @ lines_a.T) / np.linalg.norm(lines_a[:, :2], axis=1)[None, :]
    return np.nonzero(np.maximum(d_ab, d_ba) <= limit_px)


class _StereoCache:
    """Per-geometry constants of one imager pair: fundamental matrix and triangulation arrays.

    Geometry values are immutable, so what is derived from one stays valid
    while it lives. Entries are keyed by the geometry's ``id`` and keep the
    geometry itself (so the ``id`` cannot be reused while cached); the oldest
    of ``_SIZE`` is dropped first. Safe to use from several threads.
    """

    _SIZE = 8

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, str], tuple] = {}
        self._lock = threading.Lock()

    def get(self, geometry: StereoGeometry, a: str, b: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(F_ab, proj, panel, source)`` of imagers ``a`` and ``b`` (``_stereo_kernels.triangulate_two_views``).

        ``F_ab`` is :meth:`StereoGeometry.fundamental_matrix` ``(a, b)``;
        ``proj[v]`` the 3x4 projection matrix, ``panel[v]`` the room position
        of pixel (0, 0) and the room steps of one column and one row (mm),
        ``source[v]`` the source position (mm) of imager ``(a, b)[v]``; all
        room frame, read-only.
        """
        key = (id(geometry), a, b)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0] is geometry:
            return entry[1]
        ims = (geometry[a], geometry[b])
        proj = np.stack([im.projection_matrix for im in ims])
        panel = np.stack([np.stack([im.origin_mm, im.pixel_spacing_mm[1] * im.col_direction,
                                    im.pixel_spacing_mm[0] * im.row_direction]) for im in ims])
        source = np.stack([im.source_mm for im in ims])
        value = (geometry.fundamental_matrix(a, b), proj, panel, source)
        for arr in value:
            arr.setflags(write=False)
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self._SIZE:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (geometry, value)
        return value


_STEREO = _StereoCache()


def _pair_candidates_labellings(geometry: StereoGeometry, names: tuple[str, str],
                                labellings: Sequence[tuple[np.ndarray, np.ndarray]], config: FiducialConfig,
                                within: tuple[np.ndarray, float] | None = None) -> list:
    """:func:`_pair_candidates` for several labellings ``(px seen by a, px seen by b)``, one triangulation.

    Triangulation is :meth:`StereoGeometry.triangulate` for two imagers
    (closest point of the rays, refined to the maximum-likelihood
    reprojection) in one numba kernel: a handful of pairs per call, where
    the general method's per-call overhead dominated.

    ``within = (centres_room_mm, radius_mm)`` keeps only points that close
    to one of the centres (the plan-guided search's region).

    Returns, per labelling, ``(i, j, points, ray_mm, reproj_px)``.
    """
    a, b = names
    f_ab, proj, panel, source = _STEREO.get(geometry, a, b)
    pairs = []
    for px_a, px_b in labellings:
        if len(px_a) == 0 or len(px_b) == 0:
            pairs.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
        else:
            pairs.append(_epipolar_pairs(f_ab, px_a, px_b, config.max_epipolar_px))
    sizes = [len(ii) for ii, _ in pairs]
    if sum(sizes):
        pts_all, ray_all, rep_all = triangulate_two_views(
            proj, panel, source,
            np.concatenate([px_a[ii] for (px_a, _), (ii, _) in zip(labellings, pairs)]),
            np.concatenate([px_b[jj] for (_, px_b), (_, jj) in zip(labellings, pairs)]),
            _REFINE_STEPS,
        )
    out, start = [], 0
    for (ii, jj), n in zip(pairs, sizes):
        if n == 0:
            out.append((ii, jj, np.zeros((0, 3)), np.zeros(0), np.zeros(0)))
            continue
        sl = slice(start, start + n)
        start += n
        good = ray_all[sl] <= config.max_ray_distance_mm
        if within is not None:
            dist = np.linalg.norm(pts_all[sl][:, None] - np.atleast_2d(within[0])[None], axis=-1).min(axis=1)
            good &= dist <= within[1]
        out.append((ii[good], jj[good], pts_all[sl][good], ray_all[sl][good], rep_all[sl][good]))
    return out


def _pair_candidates(geometry: StereoGeometry, names: tuple[str, str], px_a: np.ndarray, px_b: np.ndarray,
                     config: FiducialConfig):
    """Epipolar-consistent detection pairs, triangulated; returns (i, j, points, ray_mm, reproj_px)."""
    return _pair_candidates_labellings(geometry, names, [(px_a, px_b)], config)[0]


def _assign(planned: np.ndarray, cand: np.ndarray, ii: np.ndarray, jj: np.ndarray, tol_mm: float,
            allowed: np.ndarray) -> list[tuple[int, ...]]:
    """Every assignment (seed -> candidate or -1) with the most seeds found.

    Candidates are used once, detections once per view; every pair of
    assigned seeds keeps its planned distance within ``tol_mm``; ``allowed``
    ``(N, M)`` masks candidates per seed (prior gate).
    """
    n, m = len(planned), len(cand)
    dp = np.linalg.norm(planned[:, None] - planned[None], axis=-1)
    dc = np.linalg.norm(cand[:, None] - cand[None], axis=-1)
    best: list[tuple[int, ...]] = []
    best_count = 0
    choice = [-1] * n

    def search(k: int, count: int) -> None:
        nonlocal best, best_count
        if count + (n - k) < best_count:
            return
        if k == n:
            if count > best_count:
                best, best_count = [tuple(choice)], count
            elif count == best_count and count > 0:
                best.append(tuple(choice))
            return
        used = [c for c in choice[:k] if c >= 0]
        for c in range(m):
            if not allowed[k, c] or c in used:
                continue
            if any(ii[c] == ii[u] or jj[c] == jj[u] for u in used):
                continue
            if any(choice[q] >= 0 and abs(dc[c, choice[q]] - dp[k, q]) > tol_mm for q in range(k)):
                continue
            choice[k] = c
            search(k + 1, count + 1)
        choice[k] = -1
        search(k + 1, count)

    search(0, 0)
    return best


def match_stereo(
    geometry: StereoGeometry,
    detections: Mapping[str, np.ndarray],
    planned_room_mm: np.ndarray,
    prior_pose: Pose | None = None,
    config: FiducialConfig = FiducialConfig(),
) -> list[Correspondence]:
    """Assign stereo detections to planned seeds; every best assignment (most seeds found).

    Parameters
    ----------
    geometry : StereoGeometry
    detections : mapping imager name -> (K, 2) array
        Detected ``(col, row)`` centres in exactly two imagers.
    planned_room_mm : (N, 3) array
        Planned seed positions, room frame at perfect setup, mm.
    prior_pose : Pose, optional
        Expected patient pose; candidates farther than ``prior_radius_mm``
        from ``prior_pose.apply(planned)`` are not assigned.
    config : FiducialConfig

    Returns
    -------
    list of Correspondence
        Ties in the number of seeds found, cheapest (sum of distance changes) first.
    """
    names = tuple(detections)
    if len(names) != 2:
        raise FiducialNotFoundError(f"stereo matching needs detections from exactly two imagers, got {list(names)}")
    px_a, px_b = (np.asarray(detections[n], dtype=np.float64).reshape(-1, 2) for n in names)
    planned = np.asarray(planned_room_mm, dtype=np.float64)
    return _match(names, _pair_candidates(geometry, names, px_a, px_b, config), planned, prior_pose, config)


def _match(names, candidates, planned: np.ndarray, prior_pose: Pose | None, config: FiducialConfig):
    """:func:`match_stereo` from triangulated candidate pairs."""
    ii, jj, pts, ray, reproj = candidates
    allowed = np.ones((len(planned), len(pts)), dtype=bool)
    if prior_pose is not None and len(pts):
        predicted = prior_pose.apply(planned)
        allowed = np.linalg.norm(predicted[:, None] - pts[None], axis=-1) <= config.prior_radius_mm
    out = []
    dp = np.linalg.norm(planned[:, None] - planned[None], axis=-1)
    for assignment in _assign(planned, pts, ii, jj, config.association_tolerance_mm, allowed):
        a = np.array(assignment)
        found = a >= 0
        idx = np.full((len(planned), 2), -1, dtype=np.int64)
        idx[found, 0], idx[found, 1] = ii[a[found]], jj[a[found]]
        points = np.zeros((len(planned), 3))
        points[found] = pts[a[found]]
        rd, rp = np.zeros(len(planned)), np.zeros(len(planned))
        rd[found], rp[found] = ray[a[found]], reproj[a[found]]
        f = np.flatnonzero(found)
        dc = np.linalg.norm(points[f][:, None] - points[f][None], axis=-1)
        cost = float(np.abs(dc - dp[np.ix_(f, f)]).sum() / 2)
        out.append(Correspondence(names, idx, points, rd, rp, found, cost))
    out.sort(key=lambda c: c.cost_mm)
    return out


# ---------------------------------------------------------------------------- end to end
_MAX_ASSIGNMENTS = 32  # equally complete assignments registered per labelling, cheapest first
@dataclass(frozen=True, slots=True)
class _Solution:
    corr: Correspondence
    reg: PointRegistrationResult
    plausible: bool
    reason: str


def _angle_deg(rotation: np.ndarray) -> float:
    """Total rotation angle of a proper rotation matrix, degrees (from its trace)."""
    return math.degrees(math.acos(min(1.0, max(-1.0, (float(np.trace(rotation)) - 1.0) / 2.0))))


def _solve(names, candidates, planned, seed_names, prior_pose, config, min_found: int = 0) -> _Solution | Exception:
    """Best correspondence + registration for one labelling, or the error that prevents one.

    Assignments that find fewer than ``min_found`` seeds are not registered:
    a registration uses at most the seeds found, so they cannot beat a
    plausible labelling that used ``min_found`` (see :func:`_choose`).
    """
    corrs = _match(names, candidates, planned, prior_pose, config)
    if not corrs:
        return FiducialNotFoundError("fiducials not found: no seed was seen consistently in both views")
    if corrs[0].n_found < min_found:
        return FiducialNotFoundError(
            f"fiducials not found: at most {corrs[0].n_found} seeds seen consistently in both views, "
            f"fewer than the {min_found} of the other labelling"
        )
    solutions: list[_Solution] = []
    first_error: Exception | None = None
    for corr in corrs[:_MAX_ASSIGNMENTS]:
        f = corr.found
        try:
            reg = register_points(planned[f], corr.points_room_mm[f], [seed_names[i] for i in np.flatnonzero(f)],
                                  config.registration)
        except PointRegistrationError as err:
            # The cheapest assignment's refusal is the one to report (e.g. a
            # migrated seed that leaves too few).
            first_error = first_error or err
            continue
        angle = _angle_deg(reg.pose.rotation)
        reasons = []
        if reg.fre_mm > config.max_fre_mm:
            reasons.append(f"fiducial registration error {reg.fre_mm:.2f} mm (limit {config.max_fre_mm:g} mm)")
        if angle > config.max_rotation_deg:
            reasons.append(f"rotation {angle:.1f} deg (limit {config.max_rotation_deg:g} deg)")
        solutions.append(_Solution(corr, reg, not reasons, "; ".join(reasons)))
    if not solutions:
        return first_error
    solutions.sort(key=lambda s: (not s.plausible, -s.reg.n_used, s.reg.fre_mm))
    return solutions[0]


def _check_frames(frames: Mapping[str, np.ndarray], geometry: StereoGeometry) -> tuple[str, str]:
    names = tuple(frames)
    if len(names) != 2:
        raise FrameError(f"fiducial localisation needs one frame from each of two imagers, got {list(names)}")
    for n in names:
        if n not in geometry.names:
            raise FrameError(f"no imager '{n}' in the geometry (imagers: {', '.join(geometry.names)})")
    return names


def _i0_for(i0, name: str):
    if isinstance(i0, Mapping):
        if name not in i0:
            raise FrameError(f"imager '{name}': no i0 given (i0 given for {sorted(i0)})")
        return i0[name]
    return i0


def localise_fiducials(
    frames: Mapping[str, np.ndarray],
    geometry: StereoGeometry,
    planned_room_mm: np.ndarray,
    names: Sequence[str],
    i0: float | Mapping[str, float] | None = None,
    prior_pose: Pose | None = None,
    config: FiducialConfig = FiducialConfig(),
    defect_masks: Mapping[str, np.ndarray] | None = None,
    flat_fields: Mapping[str, FlatField] | None = None,
) -> FiducialResult:
    """Couch correction from one stereo pair of raw kV frames and the planned seeds.

    Parameters
    ----------
    frames : mapping imager name -> (rows, cols) uint16/float32 array
        Raw frames of exactly two imagers of ``geometry`` (more photons = larger value).
    geometry : StereoGeometry
    planned_room_mm : (N, 3) array
        Planned seed positions in the room frame at perfect setup, mm
        (``FiducialSet.to_room(isocentre_lps_mm, patient_position)``).
    names : sequence of str
        Seed names, one per row of ``planned_room_mm``.
    i0 : float or mapping imager name -> float, optional
        Unattenuated level per frame (after the flat-field correction);
        estimated when omitted.
    prior_pose : Pose, optional
        Expected patient pose (tracking): detection searches windows around
        the projected seeds and candidates must lie within ``prior_radius_mm``.
    config : FiducialConfig
    defect_masks : mapping imager name -> bool array, optional
        Calibrated panel defect maps.
    flat_fields : mapping imager name -> FlatField, optional
        Panel gain and dark maps (:mod:`spineguide.tracking.localisation.flatfield`), applied to the
        frames before anything else; their defects join ``defect_masks``.

    Returns
    -------
    FiducialResult

    Raises
    ------
    FrameError
        Frames missing or not matching the geometry (size, dtype, NaN, i0, flat field).
    FiducialNotFoundError
        No seed seen consistently in both views.
    ImagerLabelError
        The frames fit the geometry only with their imager labels swapped, or
        the two labellings fit equally well with different answers.
    registration.points.SeedMigrationError
        The rigid-body check refuses the constellation.
    """
    t0 = time.perf_counter()
    labels = _check_frames(frames, geometry)
    planned = np.asarray(planned_room_mm, dtype=np.float64)
    if planned.ndim != 2 or planned.shape[1] != 3 or len(planned) < 1 or not np.all(np.isfinite(planned)):
        raise FiducialNotFoundError(f"planned seeds must be a finite (N >= 1, 3) array of room mm, got {planned.shape}")
    seed_names = tuple(str(n) for n in names)
    if len(seed_names) != len(planned):
        raise FiducialNotFoundError(f"{len(seed_names)} seed names for {len(planned)} planned seeds")
    masks = dict(defect_masks or {})
    if flat_fields:
        frames = dict(frames)
        for n in labels:
            ff = flat_fields.get(n)
            if ff is None:
                continue
            frames[n] = ff.apply(_check_frame(frames[n], geometry[n]))
            if ff.defects is not None:
                masks[n] = ff.defects if masks.get(n) is None else (np.asarray(masks[n], bool) | ff.defects)

    a, b = labels
    predicted = None
    if prior_pose is not None:
        predicted = {}
        for n in labels:
            try:
                predicted[n] = geometry[n].project(prior_pose.apply(planned))
            except GeometryError as err:
                raise FiducialNotFoundError(f"imager '{n}': cannot predict seed positions: {err}") from err
    # Both frames in one call: their full-resolution windows are analysed together.
    i0s = {n: _i0_for(i0, n) for n in labels}
    dets = detect_seeds_in_frames(frames, {n: geometry[n] for n in labels}, i0s, predicted, config.detection,
                                  {n: masks.get(n) for n in labels})
    t_det = time.perf_counter()
    same_panel = geometry[a].rows == geometry[b].rows and geometry[a].cols == geometry[b].cols
    found: tuple | None = None
    error: Exception | None = None
    try:
        found = _labelled_solution(geometry, (a, b), dets, planned, seed_names, prior_pose, config, same_panel)
    except (FiducialNotFoundError, ImagerLabelError, PointRegistrationError) as err:
        error = err
    faint = False
    excluded: frozenset = frozenset()
    # A constellation seen and refused (migration), or seen well enough to judge the imager labels wrong:
    # the contrast was not the problem, and the joint search does not overrule it.
    refused = isinstance(error, PointRegistrationError) or (
        isinstance(error, ImagerLabelError) and _SWAP_VERDICT in str(error))
    # Seeds left out because their shadows merge in one view are explained already (SEEDS_OVERLAP).
    if config.faint.enabled and not refused and (found is None or (not found[0].corr.found.all() and not found[1])):
        # Seeds the stand-alone detector could not see: the plan-guided search.
        try:
            second = _joint_solution(frames, geometry, (a, b), i0s, masks, planned, seed_names, prior_pose, config,
                                     same_panel)
        except SeedMigrationError:
            # More of the constellation was seen, and refused: never answer with a part of it, unless
            # the clean-frame detector's own constellation (two seeds or more) stands without the faint search.
            if found is None or found[0].corr.n_found < 2:
                raise
            second = None
        except (FiducialNotFoundError, ImagerLabelError, PointRegistrationError) as err:
            second = None
            # The joint search's reason is the more telling one, unless the labels were in question.
            error = error if isinstance(error, ImagerLabelError) else err
        if second is not None and (found is None or _better(second[0], found[0])):
            found, dets, faint, excluded = second[:2], second[2], True, second[3]
    if found is not None and found[0].corr.n_found < min(2, len(planned)):
        # One seed of several is not identified by anything (any detection fits any planned seed under some
        # translation): never an answer.
        error = FiducialNotFoundError(
            f"fiducials not found: only {found[0].corr.n_found} of {len(planned)} planned seeds seen in both views; "
            "a lone seed cannot be told from any other seed-like spot")
        found = None
    if found is None:
        raise error
    chosen, overlapping = found
    t_end = time.perf_counter()
    return _result(chosen, dets, planned, seed_names, (a, b), (t_det - t0, t_end - t_det, t_end - t0), config,
                   overlapping, faint, excluded)


def _labelled_solution(geometry, names, dets, planned, seed_names, prior_pose, config, same_panel, within=None):
    """``(solution, overlapping names)`` of detections in both views, both labellings judged (``_choose``)."""
    a, b = names
    # The other labelling: frame a seen by imager b and vice versa, with the
    # same detections. Whole-frame detection does not depend on the label;
    # in tracking mode the windows were placed for the given labels, which is
    # what matters: if the frames are swapped, what was found in them either
    # fails as given, or fits both labellings and is judged below. Both
    # labellings are triangulated in one call.
    px = {n: _centres(dets[n]) for n in (a, b)}
    labellings = [(px[a], px[b])] + ([(px[b], px[a])] if same_panel else [])
    cands = _pair_candidates_labellings(geometry, (a, b), labellings, config, within)
    given = _solve((a, b), cands[0], planned, seed_names, prior_pose, config)
    # The swapped labelling is always solved, but when the given one is
    # plausible, only its assignments that could outvote it (as many seeds
    # found as the given registration used) are registered.
    beat = given.reg.n_used if isinstance(given, _Solution) and given.plausible else 0
    swapped = FrameError("frames do not fit the other imager") if not same_panel else _solve(
        (a, b), cands[1], planned, seed_names, prior_pose, config, beat)
    chosen = _choose(given, swapped, a, b, config, planned)
    return _separate_overlaps(chosen, geometry, (a, b), dets, planned, seed_names, config)


def _better(new: _Solution, old: _Solution) -> bool:
    """More seeds found (then used), then a lower FRE."""
    return (new.corr.n_found, new.reg.n_used, -new.reg.fre_mm) > (old.corr.n_found, old.reg.n_used, -old.reg.fre_mm)


def _search_box(geometry: StereoGeometry, name: str, centres_room_mm: np.ndarray, radius_mm: float):
    """Pixel box ``(r0, r1, c0, c1)`` of imager ``name`` covering spheres of ``radius_mm`` around room points."""
    im = geometry[name]
    corners = (np.atleast_2d(centres_room_mm)[:, None, :]
               + radius_mm * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T[None]).reshape(-1, 3)
    px = im.project(corners)
    c0, r0 = np.floor(px.min(axis=0)).astype(int)
    c1, r1 = np.ceil(px.max(axis=0)).astype(int) + 1
    r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, im.rows), min(c1, im.cols)
    if r1 <= r0 or c1 <= c0:
        return None
    return int(r0), int(r1), int(c0), int(c1)


def _px_per_mm(imager) -> float:
    """Panel pixels per mm at the isocentre."""
    return imager.magnification / float(np.min(imager.pixel_spacing_mm))


_CUBE_STEP_MM = 0.35  # the migration search's 3D grid (about one full-resolution pixel at the isocentre)


def _joint_solution(frames, geometry, names, i0s, masks, planned, seed_names, prior_pose, config, same_panel):
    """The plan-guided joint search (``FaintSearchConfig``): ``(solution, overlapping, detections)``.

    1. Evidence maps per view over the region where the plan (or the prior)
       can put the seeds; pose hypotheses of the whole constellation
       (:func:`spineguide.tracking.localisation.constellation.search_constellation`).
    2. Per hypothesis, each seed verified in each view by a sub-pixel fit
       started where the pose projects it (fitted SNR >= ``seed_min_snr``,
       within ``near_mm``); a seed not seen there is searched within
       ``migration_search_mm`` in 3D (both views' evidence summed along the
       epipolar constraint) and kept only if it stands out on its own in both
       views (``moved_min_snr``): the rigid-body check then names it.
    3. The verified seeds are triangulated and registered; the hypothesis
       with most seeds (then the lowest FRE) is the answer. Both labellings
       are tried when the given one finds no constellation.
    """
    fc = config.faint
    signals, levels = {}, {}
    for n in names:
        frame = _check_frame(frames[n], geometry[n])
        signals[n] = np.asarray(frame, dtype=np.float32)
        levels[n] = _check_i0(i0s[n], n) if i0s[n] is not None else estimate_i0(signals[n], n)
    if prior_pose is not None:
        start, reach = prior_pose, fc.tracking_range_mm
    else:
        start, reach = Pose.identity(), fc.translation_range_mm
    where = start.apply(planned)
    centre = where.mean(axis=0)
    radius = float(np.linalg.norm(where - centre, axis=1).max()) + reach + fc.search_margin_mm
    maps = {}
    for n in names:
        im = geometry[n]
        box = _search_box(geometry, n, centre[None], radius)
        rmap = None if box is None else response_map(signals[n], im, levels[n], config.detection, masks.get(n), box)
        if rmap is None:
            raise FiducialNotFoundError(f"fiducials not found: imager '{n}' does not see where the seeds are planned")
        scale = _px_per_mm(im) / rmap.binning
        maps[n] = evidence_maps(rmap, im.projection_matrix, fc.snr_cap, fc.pool_mm * scale, fc.smooth_mm * scale)
    error: Exception | None = None
    labellings = [names] + ([(names[1], names[0])] if same_panel else [])
    for li, labels in enumerate(labellings):
        # labels[v] is the imager whose geometry sees frame names[v].
        lmaps = {names[v]: (maps[names[v]] if labels == names else
                            evidence_maps(maps[names[v]].response, geometry[labels[v]].projection_matrix, fc.snr_cap,
                                          fc.pool_mm * _px_per_mm(geometry[labels[v]]) / maps[names[v]].response.binning,
                                          fc.smooth_mm * _px_per_mm(geometry[labels[v]])
                                          / maps[names[v]].response.binning))
                 for v in range(2)}
        hyps = search_constellation(lmaps, planned, start, reach, fc.translation_step_mm, fc.local_reach_mm,
                                    fc.hypotheses)
        best = None
        for hyp in hyps:
            try:
                found = _verify(hyp, signals, levels, masks, lmaps, geometry, names, labels, planned, seed_names,
                                config)
            except SeedMigrationError:
                if li == 0:
                    raise  # a constellation seen and refused stays refused
                continue
            except (FiducialNotFoundError, PointRegistrationError) as err:
                error = error or err
                continue
            if best is None or _better(found[0], best[0]):
                best = found
            if best[0].corr.found.all():
                break
        if best is None:
            continue
        if li == 1:
            raise ImagerLabelError(
                f"the frames fit the geometry with imager labels swapped (frame '{names[0]}' is imager "
                f"'{names[1]}' and frame '{names[1]}' is imager '{names[0]}'): the planned seeds were found only "
                f"so (FRE {best[0].reg.fre_mm:.2f} mm); refused")
        sol, dets, excluded = best
        if not excluded:
            sol, overlapping = _separate_overlaps(sol, geometry, names, dets, planned, seed_names, config)
        else:
            overlapping = frozenset()
        return sol, overlapping, dets, excluded
    raise error or FiducialNotFoundError("fiducials not found: no plausible seed constellation in both views")


def _fit_at(predicted_room_mm, seeds, signals, levels, masks, maps, ims, names, config, near_mm, previous=None):
    """Sub-pixel fits started where ``predicted_room_mm`` projects: ``fits[v][k]`` Detection or None.

    A fit counts with SNR >= ``seed_min_snr`` within ``near_mm`` (at the isocentre) of the prediction.
    ``previous[v][k]``, an earlier fit of the same seed view, gives its orientation as the only start
    (otherwise the response map's, and three more).
    """
    fc = config.faint
    fits: list[list[Detection | None]] = [[None] * len(predicted_room_mm) for _ in range(2)]
    for v in range(2):
        n = names[v]
        ks = [k for k in seeds if ims[v].contains(ims[v].project(predicted_room_mm[k:k + 1]))[0]]
        if not ks:
            continue
        px = ims[v].project(predicted_room_mm[ks])
        rmap = maps[n].response
        orient = sample_bilinear(rmap.orientation_deg, rmap.to_map(px))  # start orientation only
        got: list[Detection | None] = [None] * len(ks)

        def fit(group: np.ndarray, start_deg: np.ndarray, **starts) -> None:
            for q, d in zip(group, refine_seeds(signals[n], ims[v], levels[n], px[group], start_deg, config.detection,
                                                fc.seed_min_snr, masks.get(n), **starts)):
                got[q] = d

        known = np.array([previous is not None and previous[v][k] is not None for k in ks], dtype=bool)
        fresh, refit = np.flatnonzero(~known), np.flatnonzero(known)
        if len(fresh):
            fit(fresh, orient[fresh])
        if len(refit):
            fit(refit, np.array([previous[v][ks[q]].orientation_deg for q in refit], dtype=np.float64), starts=1)
        limit = near_mm * _px_per_mm(ims[v])
        # A refit from an earlier fit's orientation that missed (that fit may have settled on something
        # else): every start orientation again.
        again = np.array([q for q in refit
                          if got[q] is None or np.hypot(*(np.asarray(got[q].centre_px) - px[q])) > limit], dtype=int)
        if len(again):
            fit(again, orient[again])
        for k, p, d in zip(ks, px, got):
            if d is not None and np.hypot(*(np.asarray(d.centre_px) - p)) <= limit:
                fits[v][k] = d
    return fits


def _triangulate_fits(geometry, labels, fits, ks):
    _, proj, panel, source = _STEREO.get(geometry, labels[0], labels[1])
    pa = np.array([fits[0][k].centre_px for k in ks], dtype=np.float64).reshape(-1, 2)
    pb = np.array([fits[1][k].centre_px for k in ks], dtype=np.float64).reshape(-1, 2)
    return triangulate_two_views(proj, panel, source, pa, pb, _REFINE_STEPS)


_TIGHT_MM = 0.5  # second round: a seed's fit within this of where the verified others put it (mm at the isocentre)


def _verify(hyp, signals, levels, masks, maps, geometry, names, labels, planned, seed_names, config):
    """``(solution, detections, excluded)`` of one pose hypothesis (``_joint_solution`` steps 2-3).

    ``labels[v]`` is the imager geometry of frame ``names[v]``. Round one
    fits every seed where the hypothesis puts it (within ``near_mm``); the
    seeds seen in both views give a robust rigid pose; round two fits every
    seed again where that pose puts it (within ``_TIGHT_MM``), and searches
    those still unseen within ``migration_search_mm`` (strong fits only).
    With four seeds or more, each seed is checked against the rigid fit of
    the others: one that lies farther than the migration limit is excluded
    and named (``excluded``); more than one is a refusal.
    """
    fc = config.faint
    n_seeds = len(planned)
    ims = [geometry[labels[v]] for v in range(2)]
    every = list(range(n_seeds))
    predicted = hyp.pose.apply(planned)
    fits = _fit_at(predicted, every, signals, levels, masks, maps, ims, names, config, fc.near_mm)
    seen = [k for k in every if fits[0][k] is not None and fits[1][k] is not None]
    if len(seen) >= 2:
        pts, ray, _ = _triangulate_fits(geometry, labels, fits, seen)
        w = np.array([min(fits[0][k].snr, fits[1][k].snr) for k in seen]) * (ray <= config.max_ray_distance_mm)
        fit = _robust_pose(planned[seen], pts, w)
        if fit is not None:
            predicted = fit.apply(planned)
            first = fits
            fits = _fit_at(predicted, every, signals, levels, masks, maps, ims, names, config, _TIGHT_MM, first)
    on_both = [k for k in every if all(im.contains(im.project(predicted[k:k + 1]))[0] for im in ims)]
    claims: set[int] = set()
    verified = [k for k in every if fits[0][k] is not None and fits[1][k] is not None]
    if verified:
        # Gold's contrast, set by the seeds verified in place: a blob with much less is not a moved seed.
        floor = [_MOVED_CONTRAST_FRACTION * float(np.median([fits[v][k].contrast for k in verified])) for v in range(2)]
        for k in on_both:
            if fits[0][k] is None or fits[1][k] is None:
                # Not seen where the others put it: a strong seed nearby may have moved (it is named, never used).
                moved = _moved_seed(predicted[k], signals, levels, masks, maps, ims, names, config)
                if moved is not None and all(moved[v].contrast >= floor[v] for v in range(2)):
                    fits[0][k], fits[1][k] = moved
                    claims.add(k)
    seen_idx = np.array([k for k in every if fits[0][k] is not None and fits[1][k] is not None], dtype=np.int64)
    if len(seen_idx) < min(2, n_seeds):
        raise FiducialNotFoundError(
            ("fiducials not found: no seed was seen consistently in both views (" if not len(seen_idx) else
             "fiducials not found: (")
            + f"the joint search verified {len(seen_idx)} of {n_seeds} planned seeds "
            f"with fitted SNR >= {fc.seed_min_snr:g} in both views where the constellation puts them)")
    weakest = np.array([min(fits[0][k].snr, fits[1][k].snr) for k in seen_idx])
    need = fc.two_seed_min_snr if len(seen_idx) == 2 else fc.anchor_min_snr
    if int(np.count_nonzero(weakest >= need)) < 2:
        raise FiducialNotFoundError(
            f"fiducials not found: {len(seen_idx)} seeds fit where the constellation puts them, but fewer than two "
            f"stand out on their own (fitted SNR >= {need:g} in both views)")
    pts, ray, rep = _triangulate_fits(geometry, labels, fits, seen_idx)
    keep = ray <= config.max_ray_distance_mm
    found = np.zeros(n_seeds, bool)
    found[seen_idx[keep]] = True
    idx = np.full((n_seeds, 2), -1, dtype=np.int64)
    points = np.zeros((n_seeds, 3))
    rd, rp = np.zeros(n_seeds), np.zeros(n_seeds)
    dets: dict[str, list[Detection]] = {names[0]: [], names[1]: []}
    for q, k in enumerate(seen_idx):
        if keep[q]:
            idx[k] = (len(dets[names[0]]), len(dets[names[1]]))
            dets[names[0]].append(fits[0][k])
            dets[names[1]].append(fits[1][k])
            points[k], rd[k], rp[k] = pts[q], ray[q], rep[q]
    if found.sum() < min(2, n_seeds):
        raise FiducialNotFoundError("fiducials not found: the verified seeds' rays do not meet "
                                    f"(skew distance above {config.max_ray_distance_mm:g} mm)")
    excluded = _moved_by_others(planned, points, found, seed_names, config.registration.migration_limit_mm)
    use = found.copy()
    use[list(excluded)] = False
    reg = register_points(planned[use], points[use], [seed_names[i] for i in np.flatnonzero(use)],
                          config.registration)
    used = dict(zip(reg.names, reg.used))
    silent = [k for k in claims if found[k] and k not in excluded and used.get(seed_names[k], False)]
    if silent:
        # A seed found away from its place that the rigid-body check cannot name (three seeds or fewer, or a
        # move that keeps the distances) is left out: a migration is never used silently.
        found[silent] = False
        use[silent] = False
        idx[silent] = -1
        if use.sum() < 1:
            raise FiducialNotFoundError("fiducials not found: no seed verified where the constellation puts it")
        reg = register_points(planned[use], points[use], [seed_names[i] for i in np.flatnonzero(use)],
                              config.registration)
    corr = Correspondence(names, idx, points, rd, rp, found, 0.0)
    reasons = []
    if reg.fre_mm > config.max_fre_mm and PointFlag.TRANSLATION_ONLY not in reg.flags:
        reasons.append(f"fiducial registration error {reg.fre_mm:.2f} mm (limit {config.max_fre_mm:g} mm)")
    angle = _angle_deg(reg.pose.rotation)
    if angle > config.max_rotation_deg:
        reasons.append(f"rotation {angle:.1f} deg (limit {config.max_rotation_deg:g} deg)")
    if reasons:
        raise FiducialNotFoundError("no plausible seed constellation: " + "; ".join(reasons))
    return _Solution(corr, reg, True, ""), {n: tuple(d) for n, d in dets.items()}, frozenset(excluded)


def _robust_pose(planned: np.ndarray, points: np.ndarray, weights: np.ndarray) -> Pose | None:
    """Rigid pose of seeds seen in round one: all of them, or (4+) the best fit leaving one out (1 mm inliers)."""
    good = np.flatnonzero(weights > 0)
    if len(good) < 2:
        return None
    subsets = [good] + ([np.delete(good, i) for i in range(len(good))] if len(good) >= 4 else [])
    best = None
    for sub in subsets:
        pose = rigid_fit(planned[sub], points[sub], weights[sub])
        res = np.linalg.norm(pose.apply(planned[good]) - points[good], axis=1)
        key = (int(np.count_nonzero(res <= 1.0)), -float(np.median(res)))
        if best is None or key > best[0]:
            best = (key, pose)
    return best[1]


def _moved_by_others(planned: np.ndarray, points: np.ndarray, found: np.ndarray, seed_names, limit_mm: float):
    """Seeds (indices) farther than ``limit_mm`` from where the rigid fit of the other found seeds puts them.

    Needs four found seeds or more (three others fix a 6-DoF pose; two leave
    a spin free, so with three seeds a move that keeps the distances cannot be
    told from a rotation). The seed named is the one whose exclusion leaves
    the others consistent to ``_CONSISTENT_MM`` while it lies beyond the
    limit; if several do, or none while some seed lies beyond the limit, the
    constellation is refused (``SeedMigrationError``).
    """
    idx = np.flatnonzero(found)
    if len(idx) < 4:
        return set()
    far, clean = [], []
    for k in idx:
        others = idx[idx != k]
        pose = rigid_fit(planned[others], points[others], np.ones(len(others)))
        own = float(np.linalg.norm(pose.apply(planned[k]) - points[k]))
        rest = float(np.linalg.norm(pose.apply(planned[others]) - points[others], axis=1).max())
        if own > limit_mm:
            far.append(int(k))
            if rest <= _CONSISTENT_MM:
                clean.append(int(k))
    if not far:
        return set()
    if len(clean) == 1:
        return set(clean)
    raise SeedMigrationError(
        "rigid-body check failed: seeds " + ", ".join(seed_names[k] for k in far)
        + f" lie more than {limit_mm:g} mm from where the others put them; "
        + ("ambiguous which moved" if clean else "no single seed explains it") + "; registration refused")


_CONSISTENT_MM = 0.5  # the other seeds agree with their rigid fit this well (seeds are localised to ~0.1 mm)
_MOVED_CONTRAST_FRACTION = 0.7  # seeds of one patient share their contrast (diameter 0.8-1.2 mm)


def _moved_seed(predicted_room_mm, signals, levels, masks, maps, ims, names, config):
    """A seed within ``migration_search_mm`` of its predicted place standing out in both views, or None.

    The cube around the predicted place is scored by both views' smoothed
    evidence at its projections (the epipolar constraint in 3D); at the best
    point each view is fitted and must reach ``moved_min_snr``.
    """
    fc = config.faint
    n_step = int(math.ceil(fc.migration_search_mm / _CUBE_STEP_MM))
    axis = _CUBE_STEP_MM * np.arange(-n_step, n_step + 1)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3) + predicted_room_mm
    score = np.zeros(len(grid))
    both = np.ones(len(grid), bool)
    for v in range(2):
        m = maps[names[v]]
        s = sample_bilinear(m.smooth, m.response.to_map(ims[v].project(grid)))
        score += s
        both &= s > 0
    score[~both] = -1.0
    best = int(np.argmax(score))
    if score[best] <= 0:
        return None
    out = []
    for v in range(2):
        n = names[v]
        target = ims[v].project(grid[best:best + 1])
        orient = sample_bilinear(maps[n].response.orientation_deg, maps[n].response.to_map(target))
        d = refine_seeds(signals[n], ims[v], levels[n], target, orient, config.detection, fc.moved_min_snr,
                         masks.get(n))[0]
        if d is None or np.hypot(*(np.asarray(d.centre_px) - target[0])) > fc.near_mm * _px_per_mm(ims[v]):
            return None
        out.append(d)
    return tuple(out)


def _dedupe_detections(dets: Sequence[Detection], radius_px: float = 2.0) -> list[Detection]:
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.snr):
        if all(np.hypot(*(d.centre_px - k.centre_px)) > radius_px for k in kept):
            kept.append(d)
    return kept


def _separate_overlaps(sol: _Solution, geometry: StereoGeometry, names: tuple[str, str], dets, planned: np.ndarray,
                       seed_names: tuple[str, ...], config: FiducialConfig) -> tuple[_Solution, frozenset]:
    """Keep detections that may hold two seeds (shadows touching in one view) out of the fit.

    Two seeds whose shadows touch in one view give one blob there, centred
    between them; paired with either seed's detection in the other view it
    gives a biased point. The sign: a seed not found whose position under the
    registered pose projects, in some view, within the extent of a detection
    used by another seed. Both seeds are then left out (flag
    ``SEEDS_OVERLAP``) and the others registered again: a smaller but
    unbiased constellation.
    """
    corr = sol.corr
    if corr.found.all():
        return sol, frozenset()
    predicted = sol.reg.pose.apply(planned)
    overlap: set[int] = set()
    drop: set[int] = set()
    for v, name in enumerate(names):
        try:
            px = geometry[name].project(predicted)
        except GeometryError:
            continue
        user = {int(corr.detection_index[m, v]): int(m) for m in np.flatnonzero(corr.found)}
        for q, det in enumerate(dets[name]):
            reach_px = 0.5 * det.length_px + config.max_epipolar_px  # the blob's half-length, and the pairing slack
            near = np.flatnonzero(np.linalg.norm(px - det.centre_px, axis=1) <= reach_px)
            if len(near) < 2 or corr.found[near].all():
                continue
            # This blob may hold several seeds, one of them not seen apart.
            overlap.update(int(k) for k in near)
            if user.get(q) in near:
                drop.add(user[q])
    if not overlap:
        return sol, frozenset()
    flagged = frozenset(seed_names[k] for k in overlap)
    if not drop:
        return sol, flagged
    keep = corr.found.copy()
    keep[sorted(drop)] = False
    if not keep.any():
        raise FiducialNotFoundError(
            "fiducials not found: seeds " + ", ".join(seed_names[k] for k in sorted(drop))
            + " overlap in one view and no other seed was seen in both views"
        )
    idx = corr.detection_index.copy()
    idx[~keep] = -1
    pts = np.where(keep[:, None], corr.points_room_mm, 0.0)
    new_corr = Correspondence(corr.imagers, idx, pts, np.where(keep, corr.ray_distance_mm, 0.0),
                              np.where(keep, corr.reprojection_px, 0.0), keep, corr.cost_mm)
    reg = register_points(planned[keep], pts[keep], [seed_names[i] for i in np.flatnonzero(keep)],
                          config.registration)
    return _Solution(new_corr, reg, sol.plausible, sol.reason), flagged


def _centres(dets: Sequence[Detection]) -> np.ndarray:
    return np.array([d.centre_px for d in dets], dtype=np.float64).reshape(-1, 2)


_SWAP_VERDICT = "imager labels swapped"  # in an ImagerLabelError that judged the labels (not an ambiguity)


def _choose(given, swapped, a: str, b: str, config: FiducialConfig, planned: np.ndarray) -> _Solution:
    g_ok = isinstance(given, _Solution) and given.plausible
    s_ok = isinstance(swapped, _Solution) and swapped.plausible
    swap_msg = (f"the frames fit the geometry with {_SWAP_VERDICT} (frame '{a}' is imager '{b}' and "
                f"frame '{b}' is imager '{a}')")
    if g_ok and s_ok and swapped.reg.n_used > given.reg.n_used:
        g_ok = False
    if g_ok and s_ok and given.reg.n_used > swapped.reg.n_used:
        s_ok = False
    if g_ok and not s_ok:
        return given
    if s_ok and not g_ok:
        raise ImagerLabelError(
            f"{swap_msg}: swapped FRE {swapped.reg.fre_mm:.2f} mm; as given: "
            f"{given.reason if isinstance(given, _Solution) else given}; refused"
        )
    if g_ok and s_ok:
        moved = np.linalg.norm(given.reg.pose.apply(planned) - swapped.reg.pose.apply(planned), axis=1).max()
        if moved <= config.agreement_mm:
            return given
        if given.reg.fre_mm + config.swap_margin_mm <= swapped.reg.fre_mm:
            return given
        if swapped.reg.fre_mm + config.swap_margin_mm <= given.reg.fre_mm:
            raise ImagerLabelError(
                f"{swap_msg}: FRE {swapped.reg.fre_mm:.2f} mm swapped vs {given.reg.fre_mm:.2f} mm as given; refused"
            )
        raise ImagerLabelError(
            f"cannot tell the imager labels apart: both labellings fit (FRE {given.reg.fre_mm:.2f} mm as given, "
            f"{swapped.reg.fre_mm:.2f} mm swapped) but their corrections differ by up to {moved:.2f} mm at the "
            "seeds; check the frame labels or give a prior pose"
        )
    if isinstance(given, _Solution):
        raise FiducialNotFoundError(f"no plausible seed constellation: {given.reason}")
    raise given


def _result(sol: _Solution, dets, planned, seed_names, names, times_s, config: FiducialConfig,
            overlapping: frozenset = frozenset(), faint: bool = False,
            excluded: frozenset = frozenset()) -> FiducialResult:
    """``excluded``: indices of found seeds kept out of the registration as migrated (joint search)."""
    corr, reg = sol.corr, sol.reg
    found_idx = np.flatnonzero(corr.found)
    used_names = dict(zip(reg.names, range(len(reg.names))))
    residuals = reg.pose.apply(planned) - corr.points_room_mm
    seeds = []
    for k, name in enumerate(seed_names):
        if not corr.found[k]:
            seeds.append(SeedLocalisation(name, False, None, None, None, None, None, False))
            continue
        pixels = {names[v]: dets[names[v]][int(corr.detection_index[k, v])].centre_px for v in range(2)}
        point = corr.points_room_mm[k].copy()
        point.setflags(write=False)
        migrated = k in excluded or not bool(reg.used[used_names[name]])
        seeds.append(SeedLocalisation(
            name, True, pixels, point, float(corr.ray_distance_mm[k]), float(corr.reprojection_px[k]),
            float(np.linalg.norm(residuals[k])), migrated,
        ))
    flags = {_FROM_POINT_FLAG[f] for f in reg.flags}
    if excluded:
        flags.add(FiducialFlag.SEED_EXCLUDED)
    if len(found_idx) < len(planned):
        flags.add(FiducialFlag.SEED_MISSING)
    if overlapping:
        flags.add(FiducialFlag.SEEDS_OVERLAP)
    if faint:
        flags.add(FiducialFlag.FAINT_SEARCH)
    if any(len(dets[n]) > len(found_idx) for n in names):
        flags.add(FiducialFlag.EXTRA_DETECTIONS)
    ok = reg.rotation_reliable and reg.fre_mm <= config.max_fre_mm
    ms = [1e3 * t for t in times_s]
    return FiducialResult(
        correction=reg.correction,
        pose=reg.pose,
        registration=reg,
        seeds=tuple(seeds),
        fre_mm=reg.fre_mm,
        ok=bool(ok),
        flags=frozenset(flags),
        n_detections={n: len(dets[n]) for n in names},
        detection_ms=ms[0],
        matching_ms=ms[1],
        total_ms=ms[2],
        overlapping=tuple(n for n in seed_names if n in overlapping),
    )
