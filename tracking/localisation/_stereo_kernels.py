"""Numba kernel of two-view triangulation for the fiducial matcher. Pure functions: arrays in, arrays out.

Pixel coordinates are ``(col, row)`` panel pixels; room points mm (IEC 61217 room frame).
``tracking/localisation/fiducials.py`` validates input; ``tests/tracking/test_fiducials.py`` checks the kernel
against ``StereoGeometry.triangulate``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["triangulate_two_views"]


# ---------------------------------------------------------------------------- stereo triangulation
@njit(cache=True, nogil=True, inline="always")
def _solve3(a, b):
    """``x`` with ``a x = b`` for a 3x3 ``a`` (Cramer's rule; ``a`` symmetric positive definite here)."""
    c00 = a[1, 1] * a[2, 2] - a[1, 2] * a[2, 1]
    c01 = a[1, 2] * a[2, 0] - a[1, 0] * a[2, 2]
    c02 = a[1, 0] * a[2, 1] - a[1, 1] * a[2, 0]
    det = a[0, 0] * c00 + a[0, 1] * c01 + a[0, 2] * c02
    x0 = (b[0] * c00 + b[1] * (a[0, 2] * a[2, 1] - a[0, 1] * a[2, 2]) + b[2] * (a[0, 1] * a[1, 2] - a[0, 2] * a[1, 1])) / det
    x1 = (b[0] * c01 + b[1] * (a[0, 0] * a[2, 2] - a[0, 2] * a[2, 0]) + b[2] * (a[0, 2] * a[1, 0] - a[0, 0] * a[1, 2])) / det
    x2 = (b[0] * c02 + b[1] * (a[0, 1] * a[2, 0] - a[0, 0] * a[2, 1]) + b[2] * (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0])) / det
    return x0, x1, x2


@njit(cache=True, nogil=True)
def triangulate_two_views(proj, panel, source, px_a, px_b, steps):
    """Room points seen at ``px_a`` by imager 0 and ``px_b`` by imager 1 (``(col, row)`` pixels, room mm).

    ``proj[v]`` is imager v's 3x4 projection matrix (room mm to homogeneous
    ``(col, row, 1)``); ``panel[v]`` holds, in rows, the room position (mm) of
    pixel (0, 0) and the room steps (mm) of one column and of one row;
    ``source[v]`` its source position (mm). As
    ``StereoGeometry.triangulate`` with two imagers: the closest point to
    the two rays, then ``steps`` Gauss-Newton steps on the squared
    reprojection error in pixels. Returns ``(N, 3)`` points (room mm), the
    rays' skew distance (mm) and the larger of the two reprojection errors
    (px); a point at or behind a source gets an infinite skew distance and
    reprojection error (no valid pair).
    """
    n = px_a.shape[0]
    points = np.empty((n, 3))
    ray = np.empty(n)
    reproj = np.empty(n)
    dirs = np.empty((2, 3))
    a = np.empty((3, 3))
    b = np.empty(3)
    x = np.empty(3)
    px = np.empty((2, 2))
    for k in range(n):
        px[0, 0] = px_a[k, 0]
        px[0, 1] = px_a[k, 1]
        px[1, 0] = px_b[k, 0]
        px[1, 1] = px_b[k, 1]
        for v in range(2):
            norm = 0.0
            for i in range(3):
                d = panel[v, 0, i] + px[v, 0] * panel[v, 1, i] + px[v, 1] * panel[v, 2, i] - source[v, i]
                dirs[v, i] = d
                norm += d * d
            norm = math.sqrt(norm)
            for i in range(3):
                dirs[v, i] /= norm
        # Closest point to both rays: sum_v (I - d d^T) X = sum_v (I - d d^T) S_v.
        for i in range(3):
            b[i] = 0.0
            for j in range(3):
                a[i, j] = 0.0
        for v in range(2):
            for i in range(3):
                for j in range(3):
                    m = (1.0 if i == j else 0.0) - dirs[v, i] * dirs[v, j]
                    a[i, j] += m
                    b[i] += m * source[v, j]
        x[0], x[1], x[2] = _solve3(a, b)
        c0 = dirs[0, 1] * dirs[1, 2] - dirs[0, 2] * dirs[1, 1]
        c1 = dirs[0, 2] * dirs[1, 0] - dirs[0, 0] * dirs[1, 2]
        c2 = dirs[0, 0] * dirs[1, 1] - dirs[0, 1] * dirs[1, 0]
        cn = math.sqrt(c0 * c0 + c1 * c1 + c2 * c2)
        w0 = source[1, 0] - source[0, 0]
        w1 = source[1, 1] - source[0, 1]
        w2 = source[1, 2] - source[0, 2]
        if cn < 1e-12:
            p0 = w1 * dirs[0, 2] - w2 * dirs[0, 1]
            p1 = w2 * dirs[0, 0] - w0 * dirs[0, 2]
            p2 = w0 * dirs[0, 1] - w1 * dirs[0, 0]
            ray[k] = math.sqrt(p0 * p0 + p1 * p1 + p2 * p2)
        else:
            ray[k] = abs(w0 * c0 + w1 * c1 + w2 * c2) / cn
        valid = True
        for _ in range(steps):
            for i in range(3):
                b[i] = 0.0
                for j in range(3):
                    a[i, j] = 0.0
            for v in range(2):
                m = proj[v]
                hz = m[2, 0] * x[0] + m[2, 1] * x[1] + m[2, 2] * x[2] + m[2, 3]
                if hz <= 1e-9:
                    valid = False
                    break
                for r in range(2):
                    uv = (m[r, 0] * x[0] + m[r, 1] * x[1] + m[r, 2] * x[2] + m[r, 3]) / hz
                    res = uv - px[v, r]
                    # d(h_r / h_z)/dX = (m_r - uv m_z) / h_z
                    j0 = (m[r, 0] - uv * m[2, 0]) / hz
                    j1 = (m[r, 1] - uv * m[2, 1]) / hz
                    j2 = (m[r, 2] - uv * m[2, 2]) / hz
                    a[0, 0] += j0 * j0
                    a[0, 1] += j0 * j1
                    a[0, 2] += j0 * j2
                    a[1, 1] += j1 * j1
                    a[1, 2] += j1 * j2
                    a[2, 2] += j2 * j2
                    b[0] += j0 * res
                    b[1] += j1 * res
                    b[2] += j2 * res
            if not valid:
                break
            a[1, 0] = a[0, 1]
            a[2, 0] = a[0, 2]
            a[2, 1] = a[1, 2]
            s0, s1, s2 = _solve3(a, b)
            x[0] -= s0
            x[1] -= s1
            x[2] -= s2
        worst = 0.0
        for v in range(2):
            m = proj[v]
            hz = m[2, 0] * x[0] + m[2, 1] * x[1] + m[2, 2] * x[2] + m[2, 3]
            if hz <= 1e-9:
                valid = False
                break
            e0 = (m[0, 0] * x[0] + m[0, 1] * x[1] + m[0, 2] * x[2] + m[0, 3]) / hz - px[v, 0]
            e1 = (m[1, 0] * x[0] + m[1, 1] * x[1] + m[1, 2] * x[2] + m[1, 3]) / hz - px[v, 1]
            worst = max(worst, math.sqrt(e0 * e0 + e1 * e1))
        points[k, 0] = x[0]
        points[k, 1] = x[1]
        points[k, 2] = x[2]
        if valid:
            reproj[k] = worst
        else:
            ray[k] = np.inf
            reproj[k] = np.inf
    return points, ray, reproj
