"""The image model of an anatomy registration: binning, smoothing, normalised features and their derivatives.

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from spineguide.calibration.geometry import ImagerGeometry

from ..drr import AttenuationVolume, PanelRegion, compute_drr_batch
from ..similarity import Similarity, image_gradients
from .optimiser import sum_of_squares as _sumsq


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


@dataclass(frozen=True, slots=True)
class _Frame:
    """One radiograph as the registration reads it: the transmitted fraction ``I / i0`` over the full panel
    (float32) and the floor a binned fraction is raised to before the logarithm (``MIN_COUNTS / i0``)."""

    transmission: np.ndarray
    floor: float

    def binned_log(self, region: PanelRegion, binning: int, prefilter_sigma_px: float = 0.0) -> np.ndarray:
        """Line integrals ``-ln(mean I / i0)`` of ``binning x binning`` blocks over ``region`` (float32).

        The counts are averaged before the logarithm, as a binning detector adds them: at a few counts per
        pixel (low dose behind the spine) the mean of per-pixel logarithms is biased and clipped where the
        logarithm of the mean is not. ``prefilter_sigma_px`` (panel pixels) Gaussian-smooths the fraction first.
        """
        t = self.transmission
        if prefilter_sigma_px > 0:
            t = _prefiltered(t, region, prefilter_sigma_px)
        m = np.maximum(_block_mean(t, region, binning), np.float32(self.floor))
        np.log(m, out=m)
        np.negative(m, out=m)
        return m


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
    # Exact background and its 6 pose derivatives from the last derivative pass, and where (x): a first-order model
    # used for residuals within ``background_taylor_mm`` of it (config; 0 = always render).
    bg_taylor: tuple | None = None
