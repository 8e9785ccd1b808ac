"""The planned seed constellation found jointly in both views (issue 19): low dose, scatter, any room.

A stand-alone detector thresholds each seed in each view on its own; under a
clinic's imaging chain a thin seed behind the spine can stay below any
threshold that keeps bone edges out. Here the seeds are never thresholded
one by one first. The plan gives their 3D positions relative to each other
and the setup error is bounded, so the *constellation* is searched:

1. **Evidence maps** per view (:func:`spineguide.tracking.localisation.seed_search.response_map`):
   the matched-filter response (oriented, end-stopped segments of the seed's
   projected length on the top-hat of the line integrals) over the local
   quantum-noise model, capped at ``snr_cap`` so that no single structure (a
   cortical rim, a rib border) outweighs a seed.
2. **Translation search**: every translation of a grid (``translation_step_mm``
   over +-``translation_range_mm``) is scored by the sum, over every seed and
   both views, of the capped map max-pooled over ``pool_mm`` (rotations of a
   few degrees move a seed by less). Evidence from the 2N seed views adds
   up, so a seed too faint to stand out alone is found where the others say
   it must be.
3. **6-DoF refinement** of the best few translations: each seed's best point
   (both views' smoothed evidence summed) in a cube around where the
   translation puts it, then a robust rigid fit (every subset leaving out
   one seed; most seeds within 1 mm), repeated once with a 1 mm cube.

What this returns is a pose hypothesis and each seed's predicted pixels;
whether each seed is really there (a sub-pixel fit with its own SNR at the
predicted place, or a strong fit elsewhere: a migration) is decided by
:func:`spineguide.tracking.localisation.fiducials.localise_fiducials`, which registers the
verified seeds with the rigid-body check.

Frames: room frame (mm, CONVENTIONS), panel pixels ``(col, row)`` with pixel
centres at integers; angles in degrees at the interface.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import maximum_filter

from spineguide.registration.pose import Pose

from .seed_search import ResponseMap

__all__ = ["ConstellationHypothesis", "EvidenceMaps", "evidence_maps", "rigid_fit", "search_constellation"]


@dataclass(frozen=True, slots=True)
class EvidenceMaps:
    """One view's capped response and the two derived maps the search samples.

    Attributes
    ----------
    response : ResponseMap
    capped : (rb, cb) float32 array
        ``clip(snr / s, 0, cap)``, ``s`` the region's 99.5th percentile of ``snr`` (at least 1).
    pooled : (rb, cb) float32 array
        ``capped`` max-pooled over a disc (translation search).
    smooth : (rb, cb) float32 array
        ``capped`` smoothed by a Gaussian (6-DoF refinement).
    peak : (rb, cb) float32 array
        The positive response, uncapped, lightly smoothed (the last refinement:
        a seed's centre, where the capped maps are flat).
    projection : (3, 4) array
        The imager's projection matrix (room mm -> homogeneous ``(col, row, 1)``).
    """

    response: ResponseMap
    capped: np.ndarray
    pooled: np.ndarray
    smooth: np.ndarray
    peak: np.ndarray
    projection: np.ndarray


@dataclass(frozen=True, slots=True)
class ConstellationHypothesis:
    """A pose of the planned constellation supported by both views.

    Attributes
    ----------
    pose : Pose
        Patient pose (room frame): planned seeds at ``pose.apply(planned)``.
    score : float
        Sum over seeds and views of the smoothed capped evidence at the
        predicted pixels (dimensionless).
    per_seed : (N,) array
        Each seed's share of ``score`` (both views).
    """

    pose: Pose
    score: float
    per_seed: np.ndarray


def evidence_maps(response: ResponseMap, projection: np.ndarray, cap: float, pool_px: float,
                  smooth_px: float) -> EvidenceMaps:
    """Capped, pooled and smoothed maps of one view (binned pixels; ``pool_px`` and ``smooth_px`` binned px)."""
    # In units of the region's 99.5th percentile: the clutter of bone edges grows with the dose (it is
    # structure, not noise), the seeds' lead over it does not.
    scale = max(float(np.percentile(response.snr, _CLUTTER_PERCENTILE)), 1.0)
    norm = (response.snr / np.float32(scale)).astype(np.float32)
    capped = np.clip(norm, 0.0, cap).astype(np.float32)
    r = max(1, int(round(pool_px)))
    pooled = cv2.dilate(capped, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    smooth = cv2.GaussianBlur(capped, (0, 0), max(0.5, smooth_px), borderType=cv2.BORDER_CONSTANT)
    peak = cv2.GaussianBlur(np.maximum(norm, 0.0), (0, 0), _PEAK_SMOOTH_PX,
                            borderType=cv2.BORDER_CONSTANT)
    return EvidenceMaps(response, capped, pooled, smooth, peak, np.asarray(projection, dtype=np.float64))


_PEAK_SMOOTH_PX = 0.7  # binned px
_CLUTTER_PERCENTILE = 99.5  # the evidence unit: this percentile of the region's standardised response


def _project(projection: np.ndarray, points_room_mm: np.ndarray) -> np.ndarray:
    """``(..., 3)`` room mm -> ``(..., 2)`` ``(col, row)`` px."""
    h = points_room_mm @ projection[:, :3].T + projection[:, 3]
    return h[..., :2] / h[..., 2:3]


def sample_bilinear(image: np.ndarray, map_px: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image[row, col]`` at ``(..., 2)`` ``(col, row)`` map pixels; 0 outside."""
    rows, cols = image.shape
    x, y = map_px[..., 0], map_px[..., 1]
    inside = (x >= 0) & (y >= 0) & (x <= cols - 1) & (y <= rows - 1)
    x = np.clip(x, 0, cols - 1.000001)
    y = np.clip(y, 0, rows - 1.000001)
    x0, y0 = np.floor(x).astype(np.intp), np.floor(y).astype(np.intp)
    fx, fy = x - x0, y - y0
    v = (image[y0, x0] * (1 - fx) * (1 - fy) + image[y0, x0 + 1] * fx * (1 - fy)
         + image[y0 + 1, x0] * (1 - fx) * fy + image[y0 + 1, x0 + 1] * fx * fy)
    return np.where(inside, v, 0.0)


def _sample_nearest(image: np.ndarray, map_px: np.ndarray) -> np.ndarray:
    rows, cols = image.shape
    c = np.rint(map_px[..., 0]).astype(np.intp)
    r = np.rint(map_px[..., 1]).astype(np.intp)
    inside = (c >= 0) & (r >= 0) & (c < cols) & (r < rows)
    return np.where(inside, image[np.clip(r, 0, rows - 1), np.clip(c, 0, cols - 1)], 0.0)


def _score(maps: Sequence[EvidenceMaps], points_room_mm: np.ndarray, which: str) -> np.ndarray:
    """Per-point evidence summed over views: ``(..., N)`` -> ``(..., N)``."""
    total = np.zeros(points_room_mm.shape[:-1])
    for m in maps:
        px = m.response.to_map(_project(m.projection, points_room_mm))
        total += sample_bilinear(m.smooth, px) if which == "smooth" else _sample_nearest(m.pooled, px)
    return total


def _kabsch(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares rotation and translation with ``dst ~ R src + t`` (proper rotation)."""
    w = w / w.sum()
    cs, cd = w @ src, w @ dst
    h = ((src - cs) * w[:, None]).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, cd - rot @ cs


def _local_best(views: Sequence[EvidenceMaps], centres_room_mm: np.ndarray, reach_mm: float,
                step_mm: float, which: str = "smooth") -> tuple[np.ndarray, np.ndarray]:
    """Per centre, the point of a cube (+-``reach_mm``) with the most evidence summed over both views.

    A point scores only where every view has evidence (the epipolar
    constraint in 3D). Returns ``(points (N, 3) room mm, scores (N,))``.
    """
    n_step = int(math.ceil(reach_mm / step_mm))
    axis = step_mm * np.arange(-n_step, n_step + 1)
    cube = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    pts = centres_room_mm[:, None, :] + cube[None]  # (N, M, 3)
    total = np.zeros(pts.shape[:2])
    both = np.ones(pts.shape[:2], bool)
    for m in views:
        s = sample_bilinear(m.smooth if which == "smooth" else m.peak, m.response.to_map(_project(m.projection, pts)))
        total += s
        both &= s > 0
    total[~both] = 0.0
    best = np.argmax(total, axis=1)
    rows = np.arange(len(pts))
    return pts[rows, best], total[rows, best]


_INLIER_MM = 1.0  # a seed's best point this close to the rigid fit of the others supports that fit


def rigid_fit(planned_room_mm: np.ndarray, points_room_mm: np.ndarray, weights: np.ndarray) -> Pose:
    """Weighted rigid fit ``points ~ R planned + t`` (room mm): Kabsch for 3+ points, the smallest rotation for 2."""
    planned, points = np.asarray(planned_room_mm, float), np.asarray(points_room_mm, float)
    if len(planned) >= 3:
        rot, t = _kabsch(planned, points, np.asarray(weights, float))
    else:
        rot, t = _two_point(planned, points)
    return Pose(rot, t)


def _rigid_from_points(planned: np.ndarray, points: np.ndarray, scores: np.ndarray, min_score: float):
    """Robust rigid fit ``points ~ R planned + t``: every subset leaving out at most one seed, most inliers.

    Returns ``(R, t, inliers)`` or None (fewer than two seeds with evidence).
    """
    good = np.flatnonzero(scores > min_score)
    if len(good) < 2:
        return None
    subsets = [good] + ([np.delete(good, i) for i in range(len(good))] if len(good) >= 4 else [])
    if len(good) == 3:
        subsets += [good[[0, 1]], good[[0, 2]], good[[1, 2]]]
    best = None
    for sub in subsets:
        if len(sub) == 2:
            rot, t = _two_point(planned[sub], points[sub])
        else:
            rot, t = _kabsch(planned[sub], points[sub], scores[sub])
        res = np.linalg.norm(planned @ rot.T + t - points, axis=1)
        inl = np.flatnonzero((res <= _INLIER_MM) & (scores > min_score))
        key = (len(inl), float(scores[inl].sum()))
        if best is None or key > best[0]:
            best = (key, rot, t, inl)
    _, rot, t, inl = best
    if len(inl) >= 3:
        rot, t = _kabsch(planned[inl], points[inl], scores[inl])
    elif len(inl) == 2:
        rot, t = _two_point(planned[inl], points[inl])
    return rot, t, inl


def _two_point(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest rotation turning ``src[1] - src[0]`` onto ``dst[1] - dst[0]``, and the translation of the centres.

    Two points leave the spin about their line free; the smallest rotation
    takes none of it (the setup rotation is small).
    """
    a, b = src[1] - src[0], dst[1] - dst[0]
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -0.99:  # opposite: not a small rotation, no fit
        return np.eye(3), dst.mean(axis=0) - src.mean(axis=0)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    rot = np.eye(3) + vx + vx @ vx / (1.0 + c)
    u, _, vt = np.linalg.svd(rot)  # re-orthonormalise
    rot = u @ vt
    return rot, dst.mean(axis=0) - rot @ src.mean(axis=0)


def search_constellation(
    maps: Mapping[str, EvidenceMaps],
    planned_room_mm: np.ndarray,
    start: Pose,
    translation_range_mm: float,
    translation_step_mm: float,
    local_reach_mm: float,
    hypotheses: int = 3,
) -> list[ConstellationHypothesis]:
    """Pose hypotheses of the planned constellation, best first (module docstring, steps 2-3).

    Parameters
    ----------
    maps : mapping imager name -> EvidenceMaps
        Both views.
    planned_room_mm : (N, 3) array
        Planned seed positions, room frame at perfect setup, mm.
    start : Pose
        Centre of the search (identity for a setup, the prior pose when tracking).
    translation_range_mm, translation_step_mm : float
        The translation grid around ``start`` (mm, room frame).
    local_reach_mm : float
        Half-size of the cube searched around each seed of a translation
        hypothesis (rotation and the grid's step), mm.
    hypotheses : int
        Separate translation maxima refined.

    Returns
    -------
    list of ConstellationHypothesis
    """
    views = list(maps.values())
    planned = np.asarray(planned_room_mm, dtype=np.float64)
    base = start.apply(planned)
    n_step = int(math.floor(translation_range_mm / translation_step_mm))
    axis = translation_step_mm * np.arange(-n_step, n_step + 1)
    tx, ty, tz = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = np.stack([tx, ty, tz], axis=-1).reshape(-1, 3)
    # (M, N, 3): every seed at every translation.
    score = _score(views, grid[:, None, :] + base[None], "pooled").sum(axis=1).reshape(tx.shape)
    # Separate maxima (3D non-maximum suppression over +-2 steps), best first.
    peaks = np.argwhere((score >= maximum_filter(score, size=5, mode="constant", cval=-np.inf)) & (score > 0))
    values = score[tuple(peaks.T)]
    order = np.argsort(-values, kind="stable")[:_COARSE_PER_HYPOTHESIS * hypotheses]

    def refine(pose: Pose, passes) -> Pose:
        # Each seed's best point near where the pose puts it, then a robust rigid fit.
        for reach, step, which in passes:
            points, scores = _local_best(views, pose.apply(planned), reach, step, which)
            fit = _rigid_from_points(planned, points, scores, _MIN_SEED_EVIDENCE)
            if fit is None:
                break
            pose = Pose(fit[0], fit[1])
        return pose

    coarse = []
    for q in order:
        pose = refine(Pose(start.rotation, start.translation_mm + axis[peaks[q]]), [(local_reach_mm, 0.7, "smooth")])
        coarse.append((float(_score(views, pose.apply(planned), "smooth").sum()), pose))
    coarse.sort(key=lambda c: -c[0])
    out = []
    for _, pose in coarse[:hypotheses]:
        pose = refine(pose, [(1.5, 0.35, "smooth"), (0.8, 0.2, "peak")])
        per_seed = _score(views, pose.apply(planned), "smooth")
        out.append(ConstellationHypothesis(pose, float(per_seed.sum()), per_seed))
    out.sort(key=lambda h: -h.score)
    return out


_COARSE_PER_HYPOTHESIS = 4  # translation maxima tried per hypothesis kept
_LOCAL_STEP_MM = 0.35  # about one full-resolution pixel at the isocentre
_MIN_SEED_EVIDENCE = 0.2  # summed smoothed evidence (both views) of a seed's best point that counts in the rigid fit
