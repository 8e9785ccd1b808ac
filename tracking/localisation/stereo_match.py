"""Stereo correspondence of seed detections: epipolar candidate pairs, triangulation (both imager labellings
in one call) and the assignment of 3D candidates to the planned seeds by the constellation's rigid consistency.

Part of :mod:`spineguide.tracking.localisation.fiducials` (see its docstring for the method).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.pose import Pose

from ..errors import FiducialNotFoundError
from ._stereo_kernels import triangulate_two_views
from .fiducial_config import FiducialConfig
from .fiducial_result import Correspondence

__all__ = ["match_stereo"]


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
