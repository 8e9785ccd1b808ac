"""The plan-guided joint search for seeds the clean-frame detector misses (both views at once, around where
the plan and the seeds already found put each seed; :class:`FaintSearchConfig`), its verification, and the
search for a migrated seed.

Part of :mod:`spineguide.tracking.localisation.fiducials` (see its docstring for the method).
"""

from __future__ import annotations

import math

import numpy as np

from spineguide.registration.points import (
    PointFlag,
    PointRegistrationError,
    SeedMigrationError,
    register_points,
)
from spineguide.registration.pose import Pose

from ..errors import FiducialNotFoundError, ImagerLabelError
from ._stereo_kernels import triangulate_two_views
from .constellation import evidence_maps, rigid_fit, sample_bilinear, search_constellation
from .detection import Detection, _check_frame, _check_i0, estimate_i0
from .seed_search import refine_seeds, response_map
from .fiducial_result import Correspondence
from .stereo_match import _REFINE_STEPS, _STEREO
from .fiducial_solution import (_SWAP_MIN_SEEDS, _Solution, _angle_deg, _better, _px_per_mm, _search_box,
                                _separate_overlaps)


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
        # Tracking: verify the constellation where the prior puts it, before any evidence map is drawn.
        quick = _verify_at_prior(prior_pose, signals, levels, masks, geometry, names, planned, seed_names, config)
        if quick is not None:
            return quick
        if not fc.joint_search:
            raise FiducialNotFoundError(
                "fiducials not found: fewer than three planned seeds (or not every seed of a smaller plan) verified "
                "where the prior pose puts them, and the joint search is off (real-time setting)")
    start, reach, centre, radius = _searched_region(planned, prior_pose, fc)
    maps = _maps_around(signals, levels, masks, geometry, names, centre, radius, config)
    if isinstance(maps, str):
        raise FiducialNotFoundError(f"fiducials not found: imager '{maps}' does not see where the seeds are planned")
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
                found = _verify(hyp.pose, signals, levels, masks, lmaps, geometry, names, labels, planned, seed_names,
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
            if best[0].corr.n_found < _SWAP_MIN_SEEDS:
                # Two seeds fit some translation under any labelling: no verdict on the labels from them.
                error = error or FiducialNotFoundError(
                    "fiducials not found: no plausible seed constellation in both views")
                continue
            raise ImagerLabelError(
                f"the frames fit the geometry with imager labels swapped (frame '{names[0]}' is imager "
                f"'{names[1]}' and frame '{names[1]}' is imager '{names[0]}'): the planned seeds were found only "
                f"so (FRE {best[0].reg.fre_mm:.2f} mm); refused")
        return _with_overlaps(best, geometry, names, planned, seed_names, config)
    raise error or FiducialNotFoundError("fiducials not found: no plausible seed constellation in both views")


def _searched_region(planned, prior_pose, fc):
    """``(start, reach_mm, centre_room_mm, radius_mm)`` of the joint search: the pose it starts from (the prior,
    or perfect set-up), the translation it reaches from there (``tracking_range_mm`` or
    ``translation_range_mm``), and the sphere it analyses (the seeds' extent at ``start`` + the reach +
    ``search_margin_mm``). Room frame, mm."""
    if prior_pose is not None:
        start, reach = prior_pose, fc.tracking_range_mm
    else:
        start, reach = Pose.identity(), fc.translation_range_mm
    where = start.apply(planned)
    centre = where.mean(axis=0)
    return start, reach, centre, float(np.linalg.norm(where - centre, axis=1).max()) + reach + fc.search_margin_mm


def _maps_around(signals, levels, masks, geometry, names, centre_room_mm, radius_mm, config):
    """Evidence maps (``EvidenceMaps`` per frame) over a sphere of ``radius_mm`` around a room point, or the
    name (str) of an imager that does not see it."""
    fc = config.faint
    maps = {}
    for n in names:
        im = geometry[n]
        box = _search_box(geometry, n, np.asarray(centre_room_mm, float)[None], radius_mm)
        rmap = None if box is None else response_map(signals[n], im, levels[n], config.detection, masks.get(n), box)
        if rmap is None:
            return n
        scale = _px_per_mm(im) / rmap.binning
        maps[n] = evidence_maps(rmap, im.projection_matrix, fc.snr_cap, fc.pool_mm * scale, fc.smooth_mm * scale)
    return maps


_MOVED_MARGIN_MM = 8.0  # a migration search's own maps: this much beyond its cube (the response map's context)


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
        if maps is None:
            orient = np.zeros(len(ks))  # no response map: the fit's four start orientations, 0 deg first
        else:
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


def _verify(pose: Pose, signals, levels, masks, maps, geometry, names, labels, planned, seed_names, config,
            first_near_mm=None):
    """``(solution, detections, excluded, shared)`` of one pose hypothesis ``pose`` (room frame; a constellation
    search's, or the tracking prior; ``_joint_solution`` steps 2-3).

    ``labels[v]`` is the imager geometry of frame ``names[v]``. Round one
    fits every seed where ``pose`` puts it (within ``near_mm``); the
    seeds seen in both views give a robust rigid pose; round two fits every
    seed again where that pose puts it (within ``_TIGHT_MM``), and searches
    those still unseen within ``migration_search_mm`` (strong fits only).
    With four seeds or more, each seed is checked against the rigid fit of
    the others: one that lies farther than the migration limit is excluded
    and named (``excluded``); more than one is a refusal. Two seeds whose fits
    coincide in a view (within ``_SAME_FIT_PX``: their shadows merge there,
    the fit lies between them) are both left out and named (``shared``,
    reported as ``SEEDS_OVERLAP``).

    ``first_near_mm`` (default ``near_mm``) is round one's radius. ``maps``
    None (no evidence maps drawn yet): the fits start from four orientations,
    and a seed's migration search draws the maps around its predicted place.
    """
    fc = config.faint
    n_seeds = len(planned)
    ims = [geometry[labels[v]] for v in range(2)]
    every = list(range(n_seeds))
    predicted = pose.apply(planned)
    fits = _fit_at(predicted, every, signals, levels, masks, maps, ims, names, config,
                   fc.near_mm if first_near_mm is None else first_near_mm)
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
                local = maps if maps is not None else _maps_around(
                    signals, levels, masks, geometry, names, predicted[k],
                    fc.migration_search_mm + _MOVED_MARGIN_MM, config)
                moved = None if isinstance(local, str) else _moved_seed(predicted[k], signals, levels, masks, local, ims,
                                                               names, config)
                if moved is not None and all(moved[v].contrast >= floor[v] for v in range(2)):
                    fits[0][k], fits[1][k] = moved
                    claims.add(k)
    shared = _sharing_a_fit(fits, every)
    for k in shared:
        # Two seeds on one fit in a view: their shadows merge there, and the fit lies between them.
        fits[0][k] = fits[1][k] = None
    seen_idx = np.array([k for k in every if fits[0][k] is not None and fits[1][k] is not None], dtype=np.int64)
    if len(seen_idx) < min(2, n_seeds):
        raise FiducialNotFoundError(
            ("fiducials not found: no seed was seen consistently in both views (" if not len(seen_idx) else
             "fiducials not found: (")
            + f"the joint search verified {len(seen_idx)} of {n_seeds} planned seeds "
            f"with fitted SNR >= {fc.seed_min_snr:g} in both views where the constellation puts them)")
    # Early exit: what the final check below (on the seeds finally used, a subset) would refuse anyway.
    _stand_out([(fits[0][k].snr, fits[1][k].snr) for k in seen_idx], fc)
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
    # Seeds dropped since (rays that do not meet, a migration excluded or left out): the answer stands on the rest.
    try:
        _stand_out([(fits[0][k].snr, fits[1][k].snr) for k in np.flatnonzero(use)], fc)
    except FiducialNotFoundError as err:
        if excluded:
            # The moved seed is named even though what is left cannot carry an answer.
            raise SeedMigrationError(
                "rigid-body check failed: seed " + ", ".join(seed_names[k] for k in sorted(excluded))
                + f" lies more than {config.registration.migration_limit_mm:g} mm from where the others put it, "
                "and the others do not stand out on their own; registration refused") from err
        raise
    corr = Correspondence(names, idx, points, rd, rp, found, 0.0)
    reasons = []
    if reg.fre_mm > config.max_fre_mm and PointFlag.TRANSLATION_ONLY not in reg.flags:
        reasons.append(f"fiducial registration error {reg.fre_mm:.2f} mm (limit {config.max_fre_mm:g} mm)")
    angle = _angle_deg(reg.pose.rotation)
    if angle > config.max_rotation_deg:
        reasons.append(f"rotation {angle:.1f} deg (limit {config.max_rotation_deg:g} deg)")
    if reasons:
        raise FiducialNotFoundError("no plausible seed constellation: " + "; ".join(reasons))
    return (_Solution(corr, reg, True, ""), {n: tuple(d) for n, d in dets.items()}, frozenset(excluded),
            frozenset(seed_names[k] for k in shared))


_SAME_FIT_PX = 2.0  # two seeds' fits this close in one view are one blob (distinct seeds' shadows are wider apart)


def _sharing_a_fit(fits, every) -> set[int]:
    """Seeds whose fit in some view lies within ``_SAME_FIT_PX`` of another seed's fit there."""
    out: set[int] = set()
    for v in range(2):
        ks = [k for k in every if fits[v][k] is not None]
        for i, a in enumerate(ks):
            for b in ks[i + 1:]:
                if np.hypot(*(np.asarray(fits[v][a].centre_px) - fits[v][b].centre_px)) < _SAME_FIT_PX:
                    out.update((a, b))
    return out


def _verify_at_prior(prior_pose, signals, levels, masks, geometry, names, planned, seed_names, config):
    """Tracking's first try: every seed verified where the prior pose puts it, or None.

    The seeds are fitted at the prior's projections (round one's radius
    ``tracking_range_mm``: the motion since the prior), then where the seeds
    so seen put them (``_TIGHT_MM``), and a seed not seen there is searched
    for migration: exactly a hypothesis of the joint search (``_verify``,
    every check of it), with evidence maps drawn only around a seed that
    needs the migration search. An answer needs three seeds (every seed of
    a smaller plan) verified; anything less, or a refusal, returns None and
    the full joint search decides.
    """
    fc = config.faint
    try:
        found = _verify(prior_pose, signals, levels, masks, None, geometry, names, names, planned,
                        seed_names, config, first_near_mm=fc.tracking_range_mm)
    except (FiducialNotFoundError, PointRegistrationError):
        return None
    if found[0].corr.n_found < min(3, len(planned)):
        return None  # fewer than three seeds (or than all of a smaller plan): the full search may see more
    try:
        return _with_overlaps(found, geometry, names, planned, seed_names, config)
    except FiducialNotFoundError:
        return None  # what the overlaps leave does not stand out: the full search decides


def _with_overlaps(found, geometry, names, planned, seed_names, config):
    """``(solution, overlapping, detections, excluded)`` of a verified hypothesis (``_verify``'s result): seeds
    left out beside another's fit (``_separate_overlaps``; not after a migration exclusion) or sharing one are
    named overlapping."""
    sol, dets, excluded, shared = found
    overlapping = frozenset()
    if not excluded:
        sol, overlapping = _separate_overlaps(sol, geometry, names, dets, planned, seed_names, config)
        if overlapping:
            used = dict(zip(sol.reg.names, sol.reg.used))
            _stand_out([tuple(dets[names[v]][int(sol.corr.detection_index[k, v])].snr for v in range(2))
                        for k in np.flatnonzero(sol.corr.found) if used.get(seed_names[k], False)], config.faint)
    return sol, overlapping | shared, dets, excluded


_EXPLAINED_PX = 5.0  # a clean-frame detection this close to a planned seed's projection (answer's pose) is that seed's


def _unexplained_seed(geometry, labels, clean_dets, solution, planned, seed_names, prior_pose: Pose | None,
                      config) -> None:
    """Refuse a two-seed answer of a larger plan beside a seed-like object the answer cannot explain.

    Two planned seeds agree on one distance only: two *other* seeds (or a seed and clutter) the same distance
    apart fit them as well, under a pose the search range allows when the set-up error is beyond it (null test,
    ``benchmarks/bench_fiducials_null.py --shifts wide``: floor room pair 9, two real seeds 38.7 mm apart taken
    for two planned seeds 38.9 mm apart). Then the frames hold strong seeds the answer leaves unexplained. So,
    when the answer uses two seeds of a plan of three or more: every pair of the clean-frame detector's
    detections (``clean_dets[name]``, section 1 of docs/FIDUCIALS.md; none near a planned seed's projection
    under the answer's pose) whose rays meet (``max_ray_distance_mm``) at a point in the searched region
    (:func:`_searched_region`, from ``prior_pose`` or perfect set-up) and farther than the migration limit from
    every planned seed under that pose is such an object, and the answer is refused (``FiducialNotFoundError``).
    Room frame, mm; pixels ``(col, row)``.
    """
    reg = solution.reg
    if len(planned) < 3 or int(np.count_nonzero(reg.used)) != 2:
        return
    a, b = labels
    if not clean_dets.get(a) or not clean_dets.get(b):
        return
    predicted = reg.pose.apply(planned)
    keep = []
    for n in labels:
        proj = geometry[n].project(predicted)
        keep.append([d for d in clean_dets[n]
                     if np.min(np.hypot(*(np.asarray(d.centre_px) - proj).T)) > _EXPLAINED_PX])
    if not keep[0] or not keep[1]:
        return
    _, proj, panel, source = _STEREO.get(geometry, a, b)
    pa = np.array([d.centre_px for d in keep[0] for _ in keep[1]], dtype=np.float64)
    pb = np.array([d.centre_px for _ in keep[0] for d in keep[1]], dtype=np.float64)
    pts, ray, _ = triangulate_two_views(proj, panel, source, pa, pb, _REFINE_STEPS)
    _, _, centre, radius = _searched_region(planned, prior_pose, config.faint)
    limit = config.registration.migration_limit_mm
    for q in np.flatnonzero(ray <= config.max_ray_distance_mm):
        if (np.linalg.norm(pts[q] - centre) <= radius
                and np.min(np.linalg.norm(predicted - pts[q], axis=1)) > limit):
            da, db = keep[0][q // len(keep[1])], keep[1][q % len(keep[1])]
            raise FiducialNotFoundError(
                f"fiducials not found: the answer would use 2 of {len(planned)} planned seeds ("
                + ", ".join(seed_names[k] for k in np.flatnonzero(solution.corr.found))
                + f"), and a seed-like object seen in both views (SNR {da.snr:.0f} / {db.snr:.0f}) lies "
                f"{np.min(np.linalg.norm(predicted - pts[q], axis=1)):.1f} mm from every planned seed: two seeds "
                "fit another pair as well; refused")


def _stand_out(snrs, fc) -> None:
    """Refuse an answer resting on seeds that do not stand out on their own.

    ``snrs``: per seed the answer uses, its fitted SNR in the two views. Two of them must reach
    ``anchor_min_snr`` in both views (otherwise the pose could be noise fitted into place), and when the
    answer uses two seeds only, both must reach ``two_seed_min_snr`` (two seeds agree on a single distance:
    weak evidence; ``benchmarks/bench_fiducials_null.py``). Applied to the seeds finally used, after any seed
    was dropped (rays that do not meet, a migration, an overlap).
    """
    weakest = np.array([min(a, b) for a, b in snrs], dtype=np.float64)
    need = fc.two_seed_min_snr if len(weakest) == 2 else fc.anchor_min_snr
    if int(np.count_nonzero(weakest >= need)) < 2:
        raise FiducialNotFoundError(
            f"fiducials not found: the answer would use {len(weakest)} seeds, but fewer than two stand out on "
            f"their own (fitted SNR >= {need:g} in both views)")
    if len(weakest) == 2:
        ratio = max(max(a, b) / min(a, b) for a, b in snrs)
        if ratio > fc.two_seed_max_view_ratio:
            # One gold seed seen in two views: its two shadows' SNRs differ by at most ~3x (noise behind it,
            # orientation); a strong shadow in one view paired with a weak one in the other is a seed matched to
            # clutter on its epipolar line.
            raise FiducialNotFoundError(
                f"fiducials not found: the answer would use 2 seeds, and one of them is {ratio:.1f} times stronger "
                f"in one view than in the other (limit {fc.two_seed_max_view_ratio:g}): not one seed seen twice")


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
