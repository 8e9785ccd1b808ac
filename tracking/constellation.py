"""The planned seed constellation found jointly in both views (issue 19): low dose, scatter, any room.

A stand-alone detector thresholds each seed in each view on its own; under a
clinic's imaging chain a thin seed behind the spine can stay below any
threshold that keeps bone edges out. Here the seeds are never thresholded
one by one first. The plan gives their 3D positions relative to each other
and the setup error is bounded, so the *constellation* is searched:

1. **Evidence maps** per view (:func:`spineguide.tracking.seed_search.response_map`):
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
3. **6-DoF refinement** of the best few translations: the same sum on the
   Gaussian-smoothed maps, maximised over translation and rotation
   (``scipy.optimize.minimize``, Powell, within +-``max_rotation_deg``).

What this returns is a pose hypothesis and each seed's predicted pixels;
whether each seed is really there (a sub-pixel fit with its own SNR at the
predicted place, or a strong fit elsewhere: a migration) is decided by
:func:`spineguide.tracking.fiducials.localise_fiducials`, which registers the
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
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.pose import Pose

from .seed_search import ResponseMap

__all__ = ["ConstellationHypothesis", "EvidenceMaps", "evidence_maps", "search_constellation"]


@dataclass(frozen=True, slots=True)
class EvidenceMaps:
    """One view's capped response and the two derived maps the search samples.

    Attributes
    ----------
    response : ResponseMap
    capped : (rb, cb) float32 array
        ``clip(snr, 0, cap)``.
    pooled : (rb, cb) float32 array
        ``capped`` max-pooled over a disc (translation search).
    smooth : (rb, cb) float32 array
        ``capped`` smoothed by a Gaussian (6-DoF refinement).
    projection : (3, 4) array
        The imager's projection matrix (room mm -> homogeneous ``(col, row, 1)``).
    """

    response: ResponseMap
    capped: np.ndarray
    pooled: np.ndarray
    smooth: np.ndarray
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
    capped = np.clip(response.snr, 0.0, cap).astype(np.float32)
    r = max(1, int(round(pool_px)))
    pooled = cv2.dilate(capped, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    smooth = cv2.GaussianBlur(capped, (0, 0), max(0.5, smooth_px), borderType=cv2.BORDER_CONSTANT)
    return EvidenceMaps(response, capped, pooled, smooth, np.asarray(projection, dtype=np.float64))


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


def _pose_points(params: np.ndarray, base_room_mm: np.ndarray, centre_room_mm: np.ndarray) -> np.ndarray:
    """Points moved by ``(t_mm(3), rotvec_deg(3))`` rotating about ``centre_room_mm``."""
    rot = Rotation.from_rotvec(np.radians(params[3:])).as_matrix()
    return (base_room_mm - centre_room_mm) @ rot.T + centre_room_mm + params[:3]


def _score(maps: Sequence[EvidenceMaps], points_room_mm: np.ndarray, which: str) -> np.ndarray:
    """Per-point evidence summed over views: ``(..., N)`` -> ``(..., N)``."""
    total = np.zeros(points_room_mm.shape[:-1])
    for m in maps:
        px = m.response.to_map(_project(m.projection, points_room_mm))
        total += sample_bilinear(m.smooth, px) if which == "smooth" else _sample_nearest(m.pooled, px)
    return total


def search_constellation(
    maps: Mapping[str, EvidenceMaps],
    planned_room_mm: np.ndarray,
    start: Pose,
    translation_range_mm: float,
    translation_step_mm: float,
    max_rotation_deg: float,
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
    max_rotation_deg : float
        Bound of each rotation-vector component of the refinement about the
        seeds' centroid (degrees).
    hypotheses : int
        Separate translation maxima refined.

    Returns
    -------
    list of ConstellationHypothesis
    """
    views = list(maps.values())
    base = start.apply(np.asarray(planned_room_mm, dtype=np.float64))
    centre = base.mean(axis=0)
    n_step = int(math.floor(translation_range_mm / translation_step_mm))
    axis = translation_step_mm * np.arange(-n_step, n_step + 1)
    tx, ty, tz = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = np.stack([tx, ty, tz], axis=-1).reshape(-1, 3)
    # (M, N, 3): every seed at every translation.
    score = _score(views, grid[:, None, :] + base[None], "pooled").sum(axis=1).reshape(tx.shape)
    # Separate maxima (3D non-maximum suppression over +-2 steps), best first.
    from scipy.ndimage import maximum_filter

    peaks = np.argwhere((score >= maximum_filter(score, size=5, mode="constant", cval=-np.inf)) & (score > 0))
    values = score[tuple(peaks.T)]
    order = np.argsort(-values, kind="stable")[:hypotheses]
    bound_t = translation_range_mm + translation_step_mm
    out = []
    for q in order:
        t0 = axis[peaks[q]]
        x0 = np.concatenate([t0, np.zeros(3)])

        def cost(p: np.ndarray) -> float:
            return -float(_score(views, _pose_points(p, base, centre), "smooth").sum())

        bounds = [(-bound_t, bound_t)] * 3 + [(-max_rotation_deg, max_rotation_deg)] * 3
        res = minimize(cost, x0, method="Powell", bounds=bounds, options={"xtol": 0.02, "ftol": 1e-4, "maxfev": 600})
        p = res.x if res.fun <= cost(x0) else x0
        per_seed = _score(views, _pose_points(p, base, centre), "smooth")
        rot = Rotation.from_rotvec(np.radians(p[3:])).as_matrix()
        # X = R (B - c) + c + t with B = R0 P + t0:  pose (R R0, R t0 + c - R c + t).
        pose = Pose(rot @ start.rotation, rot @ start.translation_mm + centre - rot @ centre + p[:3])
        out.append(ConstellationHypothesis(pose, float(per_seed.sum()), per_seed))
    out.sort(key=lambda h: -h.score)
    return out
