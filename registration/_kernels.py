"""Numba kernels of the registration package. Pure functions: arrays in, arrays out.

Units inside kernels: voxel-index space for traversal, mm for path lengths.
Callers (``drr.py``) validate inputs and convert frames.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .attenuation import MU_TABLE_OFFSET

__all__ = ["siddon_drr", "siddon_drr_batch", "siddon_drr_batch_serial", "support_box"]

# A parametric distance no ray reaches (rays run over t in [0, 1]); finite so that
# comparisons stay ordinary float compares.
_FAR = 1e30


@njit(cache=True, nogil=True, inline="always")
def _voxel_mu(values, mu_table, idx):
    """Attenuation (1/mm, float32) of flat voxel ``idx``.

    ``mu_table`` None: ``values`` is the float32 attenuation itself. Otherwise
    ``values`` holds int16 codes (e.g. whole Hounsfield units) and the voxel's
    attenuation is ``mu_table[code + MU_TABLE_OFFSET]``
    (:func:`spineguide.registration.attenuation.int16_hu_mu_table`): the same
    float32 number a converted volume would hold, in half the memory. (Numba
    compiles each argument type separately and prunes the branch not taken.)
    """
    if mu_table is None:
        return values[idx]
    return mu_table[np.int64(values[idx]) + MU_TABLE_OFFSET]


@njit(cache=True, nogil=True)
def support_box(mu, mu_table=None):
    """Index bounds ``(lo_i, lo_j, lo_k, hi_i, hi_j, hi_k)`` (inclusive) of the voxels with ``mu > 0``.

    ``mu`` is float32 attenuation, or int16 codes read through ``mu_table``
    (:func:`_voxel_mu`). Returns ``hi < lo`` on every axis when the volume is empty.
    """
    nk, nj, ni = mu.shape
    mu_flat = mu.reshape(nk * nj * ni)
    lo_i, lo_j, lo_k = ni, nj, nk
    hi_i, hi_j, hi_k = -1, -1, -1
    for k in range(nk):
        for j in range(nj):
            first = -1
            last = -1
            row = (k * nj + j) * ni
            for i in range(ni):
                if _voxel_mu(mu_flat, mu_table, row + i) > 0.0:
                    if first < 0:
                        first = i
                    last = i
            if first >= 0:
                lo_i = min(lo_i, first)
                hi_i = max(hi_i, last)
                lo_j = min(lo_j, j)
                hi_j = max(hi_j, j)
                lo_k = min(lo_k, k)
                hi_k = max(hi_k, k)
    return np.array([lo_i, lo_j, lo_k, hi_i, hi_j, hi_k], dtype=np.int64)


@njit(cache=True, nogil=True, inline="always")
def _axis_setup(a, d, voxel, exit_voxel):
    """Per-axis Siddon state: step sign, first crossing t, t per voxel, number of crossings."""
    if d > 0.0:
        return 1, (voxel + 0.5 - a) / d, 1.0 / d, exit_voxel - voxel
    if d < 0.0:
        return -1, (voxel - 0.5 - a) / d, -1.0 / d, voxel - exit_voxel
    return 0, _FAR, _FAR, 0


@njit(cache=True, nogil=True, inline="always")
def _ray_integral(mu_flat, mu_table, ni, nj, box, ax, ay, az, bx, by, bz, length_mm):
    """Exact radiological path from index-space point a to b through a voxel-constant volume.

    Voxel ``(i, j, k)`` covers ``[i - 0.5, i + 0.5] x ...`` in index space;
    ``mu_flat`` is the C-ordered ``[k, j, i]`` volume in 1/mm (or int16 codes
    read through ``mu_table``, :func:`_voxel_mu`); ``box`` holds
    inclusive index bounds (lo_i, lo_j, lo_k, hi_i, hi_j, hi_k) outside which
    every voxel is zero, so the ray is clipped to it; ``length_mm`` is
    ``|b - a|`` in mm. Incremental Siddon traversal (Jacobs et al. 1998;
    Amanatides & Woo 1987): each crossing of a voxel plane is one step, and the
    number of crossings per axis is fixed up front, so the index never leaves
    the box whatever the rounding.
    """
    dx = bx - ax
    dy = by - ay
    dz = bz - az
    tmin = 0.0
    tmax = 1.0
    # Clip the segment [0, 1] to the box, axis by axis.
    for axis in range(3):
        if axis == 0:
            a, d = ax, dx
        elif axis == 1:
            a, d = ay, dy
        else:
            a, d = az, dz
        lo = box[axis] - 0.5
        hi = box[axis + 3] + 0.5
        if d == 0.0:
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
    # Entry and exit voxels: those holding the points just inside the clipped segment.
    eps = 1e-9 * (tmax - tmin)
    te = tmin + eps
    tx_ = tmax - eps
    i = min(max(int(math.floor(ax + te * dx + 0.5)), box[0]), box[3])
    j = min(max(int(math.floor(ay + te * dy + 0.5)), box[1]), box[4])
    k = min(max(int(math.floor(az + te * dz + 0.5)), box[2]), box[5])
    ie = min(max(int(math.floor(ax + tx_ * dx + 0.5)), box[0]), box[3])
    je = min(max(int(math.floor(ay + tx_ * dy + 0.5)), box[1]), box[4])
    ke = min(max(int(math.floor(az + tx_ * dz + 0.5)), box[2]), box[5])
    si, tx, dtx, ci = _axis_setup(ax, dx, i, ie)
    sj, ty, dty, cj = _axis_setup(ay, dy, j, je)
    sk, tz, dtz, ck = _axis_setup(az, dz, k, ke)
    # Rounding can put the exit voxel one behind the entry along an axis the ray barely moves in.
    if ci <= 0:
        ci = 0
        tx = _FAR
    if cj <= 0:
        cj = 0
        ty = _FAR
    if ck <= 0:
        ck = 0
        tz = _FAR
    stride_j = ni
    stride_k = ni * nj
    idx = k * stride_k + j * stride_j + i
    step_i = si
    step_j = sj * stride_j
    step_k = sk * stride_k
    t = tmin
    acc = 0.0
    for _ in range(ci + cj + ck):
        if tx <= ty and tx <= tz:
            acc += _voxel_mu(mu_flat, mu_table, idx) * (tx - t)
            t = tx
            idx += step_i
            ci -= 1
            tx = tx + dtx if ci > 0 else _FAR
        elif ty <= tz:
            acc += _voxel_mu(mu_flat, mu_table, idx) * (ty - t)
            t = ty
            idx += step_j
            cj -= 1
            ty = ty + dty if cj > 0 else _FAR
        else:
            acc += _voxel_mu(mu_flat, mu_table, idx) * (tz - t)
            t = tz
            idx += step_k
            ck -= 1
            tz = tz + dtz if ck > 0 else _FAR
    if tmax > t:
        acc += _voxel_mu(mu_flat, mu_table, idx) * (tmax - t)
    return acc * length_mm


@njit(cache=True, parallel=True, nogil=True)
def siddon_drr(mu, mu_table, box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm, cols_px,
               rows_px):
    """Line integrals of ``mu`` (1/mm) from a source to panel points.

    Parameters
    ----------
    mu : (nk, nj, ni) float32 or int16, C-contiguous
        Attenuation in 1/mm, voxel-constant; or int16 codes when ``mu_table`` is given.
    mu_table : (65536,) float32 or None
        Attenuation (1/mm) of each int16 code, at ``code + MU_TABLE_OFFSET``
        (:func:`_voxel_mu`); None when ``mu`` is the attenuation itself.
    box : (6,) int64
        Inclusive index bounds ``(lo_i, lo_j, lo_k, hi_i, hi_j, hi_k)`` of the
        non-zero voxels (:func:`support_box`).
    src_idx, origin_idx, du_idx, dv_idx : (3,) float64
        Source, centre of panel pixel (0, 0), and the steps of one panel
        column / row, in voxel-index space ``(i, j, k)``.
    src_mm, origin_mm, du_mm, dv_mm : (3,) float64
        The same in a metric frame (room mm), for path lengths.
    cols_px, rows_px : 1D float64
        Panel coordinates (col, row) of the output pixel centres; output
        ``[r, c]`` is the ray through panel point ``(cols_px[c], rows_px[r])``.
        Every output pixel's ray is computed from these full-panel
        coordinates alone, so a region is bit-identical to the same crop of
        the whole panel.

    Returns
    -------
    (rows, cols) float32
        Dimensionless line integrals ``int mu ds``.
    """
    rows = rows_px.shape[0]
    cols = cols_px.shape[0]
    nk, nj, ni = mu.shape
    mu_flat = mu.reshape(nk * nj * ni)
    out = np.zeros((rows, cols), dtype=np.float32)
    if box[3] < box[0]:
        return out
    for r in prange(rows):
        v = rows_px[r]
        for c in range(cols):
            u = cols_px[c]
            bx = origin_idx[0] + u * du_idx[0] + v * dv_idx[0]
            by = origin_idx[1] + u * du_idx[1] + v * dv_idx[1]
            bz = origin_idx[2] + u * du_idx[2] + v * dv_idx[2]
            ex = origin_mm[0] + u * du_mm[0] + v * dv_mm[0] - src_mm[0]
            ey = origin_mm[1] + u * du_mm[1] + v * dv_mm[1] - src_mm[1]
            ez = origin_mm[2] + u * du_mm[2] + v * dv_mm[2] - src_mm[2]
            length = math.sqrt(ex * ex + ey * ey + ez * ez)
            out[r, c] = _ray_integral(
                mu_flat, mu_table, ni, nj, box, src_idx[0], src_idx[1], src_idx[2], bx, by, bz, length
            )
    return out


@njit(cache=True, nogil=True, inline="always")
def _batch_row(mu_flat, ni, nj, box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm,
               cols_px, rows_px, out, item):
    """Row ``item % rows`` of pose ``item // rows`` of :func:`siddon_drr_batch`."""
    rows = rows_px.shape[0]
    n = item // rows
    r = item - n * rows
    v = rows_px[r]
    for c in range(cols_px.shape[0]):
        u = cols_px[c]
        bx = origin_idx[n, 0] + u * du_idx[n, 0] + v * dv_idx[n, 0]
        by = origin_idx[n, 1] + u * du_idx[n, 1] + v * dv_idx[n, 1]
        bz = origin_idx[n, 2] + u * du_idx[n, 2] + v * dv_idx[n, 2]
        ex = origin_mm[0] + u * du_mm[0] + v * dv_mm[0] - src_mm[0]
        ey = origin_mm[1] + u * du_mm[1] + v * dv_mm[1] - src_mm[1]
        ez = origin_mm[2] + u * du_mm[2] + v * dv_mm[2] - src_mm[2]
        length = math.sqrt(ex * ex + ey * ey + ez * ez)
        out[n, r, c] = _ray_integral(
            mu_flat, None, ni, nj, box, src_idx[n, 0], src_idx[n, 1], src_idx[n, 2], bx, by, bz, length
        )


@njit(cache=True, parallel=True, nogil=True)
def siddon_drr_batch(mu, box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm, cols_px, rows_px):
    """:func:`siddon_drr` for ``n`` patient poses at once: one parallel loop over every (pose, row).

    ``src_idx``, ``origin_idx``, ``du_idx``, ``dv_idx`` are ``(n, 3)`` float64 (one row per
    pose, voxel-index space); the metric ``*_mm`` vectors are the imager's, shared by
    all poses. Returns ``(n, rows, cols)`` float32 line integrals; item ``k`` equals
    :func:`siddon_drr` with the ``k``-th index-space vectors, bit for bit.
    """
    rows = rows_px.shape[0]
    cols = cols_px.shape[0]
    n_poses = src_idx.shape[0]
    nk, nj, ni = mu.shape
    mu_flat = mu.reshape(nk * nj * ni)
    out = np.zeros((n_poses, rows, cols), dtype=np.float32)
    if box[3] < box[0]:
        return out
    for item in prange(n_poses * rows):
        _batch_row(mu_flat, ni, nj, box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm,
                   cols_px, rows_px, out, item)
    return out


@njit(cache=True, nogil=True)
def siddon_drr_batch_serial(mu, box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm, cols_px, rows_px):
    """:func:`siddon_drr_batch` on the calling thread alone (small jobs: no thread start or barrier)."""
    rows = rows_px.shape[0]
    cols = cols_px.shape[0]
    n_poses = src_idx.shape[0]
    nk, nj, ni = mu.shape
    mu_flat = mu.reshape(nk * nj * ni)
    out = np.zeros((n_poses, rows, cols), dtype=np.float32)
    if box[3] < box[0]:
        return out
    for item in range(n_poses * rows):
        _batch_row(mu_flat, ni, nj, box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm,
                   cols_px, rows_px, out, item)
    return out
