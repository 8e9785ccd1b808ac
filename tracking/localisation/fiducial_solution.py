"""Candidate solutions of fiducial localisation: registering assignments to the plan, ranking them, and
keeping seeds whose shadows overlap out of the fit.

Part of :mod:`spineguide.tracking.localisation.fiducials` (see its docstring for the method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spineguide.calibration.errors import GeometryError
from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.points import PointRegistrationError, PointRegistrationResult, register_points

from ..errors import FiducialNotFoundError, FrameError, ImagerLabelError
from .detection import Detection
from .fiducial_config import FiducialConfig
from .fiducial_result import Correspondence
from .stereo_match import _match, _pair_candidates_labellings


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


_SWAP_MIN_SEEDS = 3  # seeds the swapped labelling must use to judge the labels (fewer fit any labelling)
_SWAP_VERDICT = "imager labels swapped"  # in an ImagerLabelError that judged the labels (not an ambiguity)


def _choose(given, swapped, a: str, b: str, config: FiducialConfig, planned: np.ndarray) -> _Solution:
    g_ok = isinstance(given, _Solution) and given.plausible
    # A swap verdict rests on the swapped labelling's own constellation: one or two seeds fit anything (a lone
    # seed's FRE is zero by construction), so fewer than three (every seed of a smaller plan) judge nothing.
    s_ok = (isinstance(swapped, _Solution) and swapped.plausible
            and swapped.reg.n_used >= min(_SWAP_MIN_SEEDS, len(planned)))
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
