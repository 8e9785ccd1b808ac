"""Numba kernels of the registration package. Pure functions: arrays in, arrays out.

Units inside kernels: voxel-index space for traversal, mm for path lengths.
Callers (``drr.py``) validate inputs and convert frames.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["siddon_drr"]


@njit(cache=True, nogil=True, inline="always")
def _ray_integral(mu, ax, ay, az, bx, by, bz, length_mm):
    """Exact radiological path from index-space point a to b through a voxel-constant volume.

    Voxel (i, j, k) covers [i - 0.5, i + 0.5] x ... in index space; ``mu`` is
    indexed ``[k, j, i]`` in 1/mm; ``length_mm`` is |b - a| in mm. Incremental
    Siddon traversal (Jacobs et al. 1998 / Amanatides & Woo 1987).
    """
    nk, nj, ni = mu.shape
    dx = bx - ax
    dy = by - ay
    dz = bz - az
    tmin = 0.0
    tmax = 1.0
    # Clip the segment [0, 1] to the volume box, axis by axis.
    lo = -0.5
    for axis in range(3):
        if axis == 0:
            a, d, hi = ax, dx, ni - 0.5
        elif axis == 1:
            a, d, hi = ay, dy, nj - 0.5
        else:
            a, d, hi = az, dz, nk - 0.5
        if abs(d) < 1e-12:
            if a <= lo or a >= hi:
                return 0.0
        else:
            t0 = (lo - a) / d
            t1 = (hi - a) / d
            if t0 > t1:
                t0, t1 = t1, t0
            if t0 > tmin:
                tmin = t0
            if t1 < tmax:
                tmax = t1
    if tmin >= tmax:
        return 0.0
    # Start voxel: the one containing the point just after entry.
    te = tmin + 1e-9 * (tmax - tmin)
    i = int(math.floor(ax + te * dx + 0.5))
    j = int(math.floor(ay + te * dy + 0.5))
    k = int(math.floor(az + te * dz + 0.5))
    i = min(max(i, 0), ni - 1)
    j = min(max(j, 0), nj - 1)
    k = min(max(k, 0), nk - 1)
    inf = 1e30
    if dx > 0:
        si = 1
        tx = (i + 0.5 - ax) / dx
        dtx = 1.0 / dx
    elif dx < 0:
        si = -1
        tx = (i - 0.5 - ax) / dx
        dtx = -1.0 / dx
    else:
        si = 0
        tx = inf
        dtx = inf
    if dy > 0:
        sj = 1
        ty = (j + 0.5 - ay) / dy
        dty = 1.0 / dy
    elif dy < 0:
        sj = -1
        ty = (j - 0.5 - ay) / dy
        dty = -1.0 / dy
    else:
        sj = 0
        ty = inf
        dty = inf
    if dz > 0:
        sk = 1
        tz = (k + 0.5 - az) / dz
        dtz = 1.0 / dz
    elif dz < 0:
        sk = -1
        tz = (k - 0.5 - az) / dz
        dtz = -1.0 / dz
    else:
        sk = 0
        tz = inf
        dtz = inf
    t = tmin
    acc = 0.0
    while t < tmax:
        if tx <= ty and tx <= tz:
            tn = tx
            step = 0
        elif ty <= tz:
            tn = ty
            step = 1
        else:
            tn = tz
            step = 2
        if tn > tmax:
            tn = tmax
        acc += mu[k, j, i] * (tn - t)
        t = tn
        if step == 0:
            i += si
            tx += dtx
            if i < 0 or i >= ni:
                break
        elif step == 1:
            j += sj
            ty += dty
            if j < 0 or j >= nj:
                break
        else:
            k += sk
            tz += dtz
            if k < 0 or k >= nk:
                break
    return acc * length_mm


@njit(cache=True, parallel=True, nogil=True)
def siddon_drr(mu, src_idx, p0_idx, du_idx, dv_idx, src_mm, p0_mm, du_mm, dv_mm, rows, cols):
    """Line integrals of ``mu`` (1/mm) from a source to a grid of panel points.

    Parameters
    ----------
    mu : (nk, nj, ni) float32, C-contiguous
        Attenuation in 1/mm, voxel-constant.
    src_idx, p0_idx, du_idx, dv_idx : (3,) float64
        Source, panel point of output pixel (0, 0), and the steps between
        output columns / rows, in voxel-index space ``(i, j, k)``.
    src_mm, p0_mm, du_mm, dv_mm : (3,) float64
        The same in a metric frame (room mm), for path lengths.
    rows, cols : int
        Output size.

    Returns
    -------
    (rows, cols) float32
        Dimensionless line integrals ``int mu ds``.
    """
    out = np.empty((rows, cols), dtype=np.float32)
    for r in prange(rows):
        for c in range(cols):
            bx = p0_idx[0] + c * du_idx[0] + r * dv_idx[0]
            by = p0_idx[1] + c * du_idx[1] + r * dv_idx[1]
            bz = p0_idx[2] + c * du_idx[2] + r * dv_idx[2]
            ex = p0_mm[0] + c * du_mm[0] + r * dv_mm[0] - src_mm[0]
            ey = p0_mm[1] + c * du_mm[1] + r * dv_mm[1] - src_mm[1]
            ez = p0_mm[2] + c * du_mm[2] + r * dv_mm[2] - src_mm[2]
            length = math.sqrt(ex * ex + ey * ey + ez * ez)
            out[r, c] = _ray_integral(mu, src_idx[0], src_idx[1], src_idx[2], bx, by, bz, length)
    return out
