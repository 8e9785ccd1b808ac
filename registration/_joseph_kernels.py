"""Numba kernels of the slice-interpolating (Joseph) projector and its pose derivatives.

Units inside kernels: voxel-index space for positions, mm for path lengths.
Callers (``drr.py``) validate inputs and convert frames.

Joseph's method (Joseph 1982): a ray is sampled where it crosses each voxel-centre
plane of its dominant axis (the index axis it advances fastest along), the volume
bilinearly interpolated in that plane, and each sample weighted by the ray length
between planes. Unlike the voxel-constant (Siddon) integral, the result varies
smoothly with the ray's position, also across thick CT slices that the ray runs
nearly parallel to, so its pose derivatives describe the DRR over a pixel's motion
and not only at one point.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["joseph_drr_batch", "joseph_drr_pose_derivatives", "plane_extents"]


@njit(cache=True, nogil=True)
def plane_extents(mu):
    """Per axis ``q`` and plane ``iq``: the open interval of in-plane sample positions whose
    bilinear interpolation can be non-zero, ``(u_lo, u_hi, w_lo, w_hi)``.

    ``(3, max(shape), 4)`` float64 in index units of the other two axes (``u < w``);
    a plane with no non-zero voxel (or beyond the axis' length) gets an empty interval.
    A sample at ``pu`` reads voxels ``floor(pu)`` and ``floor(pu) + 1``: it can be
    non-zero only for ``lo - 1 < pu < hi + 1`` with ``lo``, ``hi`` the plane's extreme
    non-zero indices.
    """
    nk, nj, ni = mu.shape
    n = max(ni, nj, nk)
    lo = np.full((3, n, 3), 1 << 30, dtype=np.int64)  # per axis q, plane iq: lowest index along i, j, k
    hi = np.full((3, n, 3), -(1 << 30), dtype=np.int64)
    for k in range(nk):
        for j in range(nj):
            for i in range(ni):
                if mu[k, j, i] > 0.0:
                    for q in range(3):
                        iq = i if q == 0 else (j if q == 1 else k)
                        if i < lo[q, iq, 0]:
                            lo[q, iq, 0] = i
                        if i > hi[q, iq, 0]:
                            hi[q, iq, 0] = i
                        if j < lo[q, iq, 1]:
                            lo[q, iq, 1] = j
                        if j > hi[q, iq, 1]:
                            hi[q, iq, 1] = j
                        if k < lo[q, iq, 2]:
                            lo[q, iq, 2] = k
                        if k > hi[q, iq, 2]:
                            hi[q, iq, 2] = k
    out = np.zeros((3, n, 4))  # all zero: an empty interval, every sample rejected
    for q in range(3):
        if q == 0:
            u, w = 1, 2
        elif q == 1:
            u, w = 0, 2
        else:
            u, w = 0, 1
        for iq in range(n):
            if hi[q, iq, u] >= lo[q, iq, u]:
                out[q, iq, 0] = lo[q, iq, u] - 1.0
                out[q, iq, 1] = hi[q, iq, u] + 1.0
                out[q, iq, 2] = lo[q, iq, w] - 1.0
                out[q, iq, 3] = hi[q, iq, w] + 1.0
    return out


@njit(cache=True, nogil=True, inline="always")
def _ray_length_mm(src_mm, origin_mm, du_mm, dv_mm, u, v):
    """Length (mm) of the ray from the source to panel point (col ``u``, row ``v``)."""
    ex = origin_mm[0] + u * du_mm[0] + v * dv_mm[0] - src_mm[0]
    ey = origin_mm[1] + u * du_mm[1] + v * dv_mm[1] - src_mm[1]
    ez = origin_mm[2] + u * du_mm[2] + v * dv_mm[2] - src_mm[2]
    return math.sqrt(ex * ex + ey * ey + ez * ez)


@njit(cache=True, nogil=True, inline="always")
def _joseph_ray(mu_flat, shape, planes, a0, a1, a2, b0, b1, b2, sums, want):
    """Joseph line integral (parametric units: multiply by the ray's mm length) from a to b.

    ``mu_flat`` is a C-ordered ``[k, j, i]`` volume of ``shape = (ni, nj, nk)``
    whose outermost voxel layer is zero (:func:`padded_support`), so no sample
    needs a bounds test; ``planes[q, iq]`` holds the ``(u_lo, u_hi, w_lo, w_hi)``
    sample positions outside which plane ``iq`` of axis ``q`` interpolates to zero
    (:func:`plane_extents`), so the empty part of a masked volume costs a
    comparison per sample, not an interpolation. Returns ``(integral, q, u, w)`` with ``q`` the dominant
    axis and ``u < w`` the other two; with ``want`` it fills
    ``sums = (G_u, G_u t, G_w, G_w t)``: the in-plane gradient of the
    interpolated volume along ``u`` and ``w`` summed over the samples, plain and
    times the sample's ray parameter ``t``.
    """
    d0 = b0 - a0
    d1 = b1 - a1
    d2 = b2 - a2
    ad0, ad1, ad2 = abs(d0), abs(d1), abs(d2)
    s0 = 1
    s1 = shape[0]
    s2 = shape[0] * shape[1]
    if ad0 >= ad1 and ad0 >= ad2:
        q, u, w = 0, 1, 2
        aq, dq, au, du, aw, dw = a0, d0, a1, d1, a2, d2
        sq, su, sw = s0, s1, s2
    elif ad1 >= ad2:
        q, u, w = 1, 0, 2
        aq, dq, au, du, aw, dw = a1, d1, a0, d0, a2, d2
        sq, su, sw = s1, s0, s2
    else:
        q, u, w = 2, 0, 1
        aq, dq, au, du, aw, dw = a2, d2, a0, d0, a1, d1
        sq, su, sw = s2, s0, s1
    nq, nu, nw = shape[q], shape[u], shape[w]
    if want:
        for s in range(4):
            sums[s] = 0.0
    if dq == 0.0:
        return 0.0, q, u, w
    # Parametric range where both in-plane coordinates lie on the grid.
    tmin = 0.0
    tmax = 1.0
    for s in range(2):
        if s == 0:
            a, d, hi = au, du, nu - 1.0
        else:
            a, d, hi = aw, dw, nw - 1.0
        if d == 0.0:
            if a < 0.0 or a > hi:
                return 0.0, q, u, w
        else:
            t0 = -a / d
            t1 = (hi - a) / d
            if t0 > t1:
                t0, t1 = t1, t0
            tmin = max(tmin, t0)
            tmax = min(tmax, t1)
    if tmin >= tmax:
        return 0.0, q, u, w
    qa = aq + tmin * dq
    qb = aq + tmax * dq
    if qa > qb:
        qa, qb = qb, qa
    first = max(int(math.ceil(qa)), 1)  # planes 0 and nq - 1 are zero
    last = min(int(math.floor(qb)), nq - 2)
    total = 0.0
    gu0 = 0.0
    gu1 = 0.0
    gw0 = 0.0
    gw1 = 0.0
    inv_dq = 1.0 / dq
    for iq in range(first, last + 1):
        t = (iq - aq) * inv_dq
        pu = au + t * du
        pw = aw + t * dw
        if pu <= planes[q, iq, 0] or pu >= planes[q, iq, 1] or pw <= planes[q, iq, 2] or pw >= planes[q, iq, 3]:
            continue
        # Lower corner inside [0, n - 2] so that the +1 neighbours exist; rounding at the
        # grid's last line is absorbed by the weight (the neighbours there are zero).
        iu = min(max(int(pu), 0), nu - 2)
        iw = min(max(int(pw), 0), nw - 2)
        fu = min(max(pu - iu, 0.0), 1.0)
        fw = min(max(pw - iw, 0.0), 1.0)
        base = iq * sq + iu * su + iw * sw
        m00 = mu_flat[base]
        m10 = mu_flat[base + su]
        m01 = mu_flat[base + sw]
        m11 = mu_flat[base + su + sw]
        total += (1.0 - fu) * ((1.0 - fw) * m00 + fw * m01) + fu * ((1.0 - fw) * m10 + fw * m11)
        if want:
            gu = (1.0 - fw) * (m10 - m00) + fw * (m11 - m01)
            gw = (1.0 - fu) * (m01 - m00) + fu * (m11 - m10)
            gu0 += gu
            gu1 += gu * t
            gw0 += gw
            gw1 += gw * t
    if want:
        sums[0] = gu0
        sums[1] = gu1
        sums[2] = gw0
        sums[3] = gw1
    return total / abs(dq), q, u, w


@njit(cache=True, nogil=True)
def joseph_drr_batch(mu, planes, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm, cols_px, rows_px,
                     rays):
    """Joseph DRRs for ``n`` poses, one thread; arguments as ``_kernels.siddon_drr_batch`` without
    the box (``mu`` is zero-padded instead, :func:`_joseph_ray`). ``rays``: ``(rows, cols)`` uint8,
    the pixels to trace (others stay 0), or ``(0, 0)`` for all.

    Returns ``(n, rows, cols)`` float32 line integrals (dimensionless).
    """
    rows = rows_px.shape[0]
    cols = cols_px.shape[0]
    n_poses = src_idx.shape[0]
    nk, nj, ni = mu.shape
    mu_flat = mu.reshape(nk * nj * ni)
    shape = (ni, nj, nk)
    out = np.zeros((n_poses, rows, cols), dtype=np.float32)
    sums = np.zeros(4)
    every = rays.shape[0] == 0
    for n in range(n_poses):
        for r in range(rows):
            v = rows_px[r]
            for c in range(cols):
                if not every and rays[r, c] == 0:
                    continue
                u = cols_px[c]
                bx = origin_idx[n, 0] + u * du_idx[n, 0] + v * dv_idx[n, 0]
                by = origin_idx[n, 1] + u * du_idx[n, 1] + v * dv_idx[n, 1]
                bz = origin_idx[n, 2] + u * du_idx[n, 2] + v * dv_idx[n, 2]
                length = _ray_length_mm(src_mm, origin_mm, du_mm, dv_mm, u, v)
                val, _, _, _ = _joseph_ray(mu_flat, shape, planes, src_idx[n, 0], src_idx[n, 1], src_idx[n, 2],
                                           bx, by, bz, sums, False)
                out[n, r, c] = val * length
    return out


@njit(cache=True, nogil=True)
def joseph_drr_pose_derivatives(mu, planes, src_idx, origin_idx, du_idx, dv_idx, d_src, d_origin, d_du, d_dv,
                                src_mm, origin_mm, du_mm, dv_mm, cols_px, rows_px, rays):
    """A Joseph DRR and its exact derivatives with respect to ``n`` pose parameters, one thread.

    ``mu`` is zero-padded (:func:`_joseph_ray`); ``src_idx``, ``origin_idx``,
    ``du_idx``, ``dv_idx`` are the source, the centre of panel pixel (0, 0) and
    one column / row step in ``mu``'s index space, ``(3,)`` float64; ``d_src``,
    ``d_origin``, ``d_du``, ``d_dv`` their derivatives with respect to each
    parameter, ``(n, 3)``; the ``*_mm`` vectors the same in room mm (for the
    ray lengths); ``cols_px``, ``rows_px`` the output pixels' panel coordinates.
    A sample at plane ``q = iq`` sits at ``t = (iq - a_q) / d_q``; moving the
    ray by ``da + t (db - da)`` moves it within the plane by
    ``dp_u - (d_u / d_q) dp_q`` (and likewise along ``w``), and the sample
    weight ``1 / |d_q|`` changes with ``d_q``. Returns ``(1 + n, rows, cols)``
    float32: the DRR, then its derivatives (per parameter unit). ``rays``: ``(rows, cols)`` uint8,
    the pixels to trace (others stay 0), or ``(0, 0)`` for all.
    """
    rows = rows_px.shape[0]
    cols = cols_px.shape[0]
    n = d_src.shape[0]
    nk, nj, ni = mu.shape
    mu_flat = mu.reshape(nk * nj * ni)
    shape = (ni, nj, nk)
    out = np.zeros((1 + n, rows, cols), dtype=np.float32)
    sums = np.zeros(4)
    a = src_idx  # the source, the same for every ray
    b = np.empty(3)
    every = rays.shape[0] == 0
    for r in range(rows):
        v = rows_px[r]
        for c in range(cols):
            if not every and rays[r, c] == 0:
                continue
            u_px = cols_px[c]
            for s in range(3):
                b[s] = origin_idx[s] + u_px * du_idx[s] + v * dv_idx[s]
            length = _ray_length_mm(src_mm, origin_mm, du_mm, dv_mm, u_px, v)
            val, q, u, w = _joseph_ray(mu_flat, shape, planes, a[0], a[1], a[2], b[0], b[1], b[2], sums, True)
            out[0, r, c] = val * length
            if val == 0.0 and sums[0] == 0.0 and sums[2] == 0.0:
                continue
            dq = b[q] - a[q]
            inv = 1.0 / abs(dq)
            ru = (b[u] - a[u]) / dq
            rw = (b[w] - a[w]) / dq
            for p in range(n):
                da_q = d_src[p, q]
                da_u = d_src[p, u]
                da_w = d_src[p, w]
                dd_q = d_origin[p, q] + u_px * d_du[p, q] + v * d_dv[p, q] - da_q
                dd_u = d_origin[p, u] + u_px * d_du[p, u] + v * d_dv[p, u] - da_u
                dd_w = d_origin[p, w] + u_px * d_du[p, w] + v * d_dv[p, w] - da_w
                moved = (sums[0] * (da_u - ru * da_q) + sums[1] * (dd_u - ru * dd_q)
                         + sums[2] * (da_w - rw * da_q) + sums[3] * (dd_w - rw * dd_q)) * inv
                out[1 + p, r, c] = (moved - val * dd_q / dq) * length
    return out
