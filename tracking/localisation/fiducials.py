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

One module a job: :mod:`.fiducial_config` (settings), :mod:`.fiducial_result` (what is returned),
:mod:`.stereo_match` (epipolar correspondence, triangulation, assignment), :mod:`.fiducial_solution`
(registering and ranking assignments, overlapping seeds), :mod:`.joint_search` (the plan-guided search for
faint and migrated seeds), and this module, the entry point :func:`localise_fiducials`. The public names of
the first two are importable from here too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np

from spineguide.calibration.errors import GeometryError
from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.points import PointFlag, PointRegistrationError, SeedMigrationError
from spineguide.registration.pose import Pose

from ..errors import FiducialConfigError, FiducialNotFoundError, FrameError, ImagerLabelError
from .detection import _check_frame, detect_seeds_in_frames
from .seed_search import refine_seeds
from .fiducial_config import FaintSearchConfig, FiducialConfig
from .fiducial_result import _FROM_POINT_FLAG, Correspondence, FiducialFlag, FiducialResult, SeedLocalisation
from .fiducial_solution import _SWAP_VERDICT, _better, _labelled_solution, _Solution
from .flatfield import FlatField
from .joint_search import _joint_solution, _unexplained_seed
from .stereo_match import match_stereo

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


def _check_planned(planned_room_mm, names) -> tuple[np.ndarray, tuple[str, ...]]:
    """Planned seeds as a finite (N >= 1, 3) float array (room mm) and their names, one per seed."""
    planned = np.asarray(planned_room_mm, dtype=np.float64)
    if planned.ndim != 2 or planned.shape[1] != 3 or len(planned) < 1 or not np.all(np.isfinite(planned)):
        raise FiducialNotFoundError(f"planned seeds must be a finite (N >= 1, 3) array of room mm, got {planned.shape}")
    seed_names = tuple(str(n) for n in names)
    if len(seed_names) != len(planned):
        raise FiducialNotFoundError(f"{len(seed_names)} seed names for {len(planned)} planned seeds")
    return planned, seed_names


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
    planned, seed_names = _check_planned(planned_room_mm, names)
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
    if predicted is not None:
        dets = _refit_faint(frames, geometry, labels, dets, i0s, masks, config)
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
    # Seeds left out because their shadows merge in one view are explained already (SEEDS_OVERLAP); any other
    # seed not found is the faint search's.
    unexplained = found is None or any(not f and seed_names[k] not in found[1]
                                       for k, f in enumerate(found[0].corr.found))
    faint_runs = config.faint.enabled and (config.faint.joint_search or prior_pose is not None)
    if faint_runs and not refused and unexplained:
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
            try:
                _unexplained_seed(geometry, (a, b), dets, second[0], planned, seed_names, prior_pose, config)
                found, dets, faint, excluded = second[:2], second[2], True, second[3]
            except FiducialNotFoundError as err:
                # Ambiguous: refused. Not the clean-frame answer either: the joint search ran because that one
                # left a seed unexplained, and the best answer is in doubt.
                found, error = None, err
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


def _refit_faint(frames, geometry, labels, dets, i0s, masks, config: FiducialConfig):
    """Tracking windows' detections below ``refit_below_snr``, re-centred by the seed-shadow box fit.

    The box fit (:func:`spineguide.tracking.localisation.seed_search.refine_seeds`, one start at the
    detection's orientation, on the window's line-opening top-hat) replaces a faint detection's weighted
    centroid when it lands within ``refit_max_shift_px`` of it; the detection keeps its matched-filter SNR
    (what the matching uses). The top-hat, hence the fit, does not depend on i0 (a constant in the line
    integrals): the frame's maximum stands in when i0 is not given.
    """
    out = {}
    for n in labels:
        weak = [i for i, d in enumerate(dets[n]) if d.snr < config.refit_below_snr]
        if not weak:
            out[n] = dets[n]
            continue
        signal = frames[n]  # refine_seeds reads float32 windows of it
        level = i0s[n] if i0s[n] is not None else max(float(signal.max()), 1.0)
        fits = refine_seeds(signal, geometry[n], level, np.array([dets[n][i].centre_px for i in weak]),
                            np.array([dets[n][i].orientation_deg for i in weak]), config.detection, 0.0,
                            masks.get(n), starts=1)
        new = list(dets[n])
        for i, fit in zip(weak, fits):
            if fit is not None and np.hypot(*(fit.centre_px - new[i].centre_px)) <= config.refit_max_shift_px:
                new[i] = dataclasses.replace(new[i], centre_px=fit.centre_px)
        out[n] = tuple(new)
    return out


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
        seen = [dets[names[v]][int(corr.detection_index[k, v])] for v in range(2)]
        pixels = {names[v]: seen[v].centre_px for v in range(2)}
        point = corr.points_room_mm[k].copy()
        point.setflags(write=False)
        migrated = k in excluded or not bool(reg.used[used_names[name]])
        seeds.append(SeedLocalisation(
            name, True, pixels, point, float(corr.ray_distance_mm[k]), float(corr.reprojection_px[k]),
            float(np.linalg.norm(residuals[k])), migrated, {names[v]: float(seen[v].snr) for v in range(2)},
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
    ok = (reg.rotation_reliable and reg.fre_mm <= config.max_fre_mm
          and PointFlag.TARGET_UNRELIABLE not in reg.flags)
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
