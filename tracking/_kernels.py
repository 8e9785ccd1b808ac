"""Numba kernels of seed detection. Pure functions: arrays in, arrays out.

Images are ``[row, col]`` float32 line integrals (ln units) of a kV frame or
of a mosaic of detection windows; callers (``detection.py``) validate input
and convert units. Neighbourhoods outside the image replicate the border
pixel (OpenCV's ``BORDER_REPLICATE``), so a kernel here gives exactly what the
OpenCV composition it replaces gives.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["isolated_outliers", "reconstruct_under", "reconstruct_under_tiles", "snr_peaks"]


@njit(cache=True, nogil=True)
def reconstruct_under(seed, mask, steps):
    """``steps`` geodesic dilations of ``seed`` under ``mask`` with the 3x3 cross (float32).

    Each step is ``min(dilate_cross(x), mask)``, the border replicated: the
    same as ``np.minimum(cv2.dilate(x, cross, borderType=BORDER_REPLICATE), mask)``.
    """
    rows, cols = seed.shape
    a = seed.copy()
    out = np.empty_like(a)
    for _ in range(steps):
        for r in range(rows):
            _cross_row(a[max(r - 1, 0)], a[r], a[min(r + 1, rows - 1)], mask[r], out[r], cols)
        a, out = out, a
    return a


@njit(cache=True, nogil=True, inline="always")
def _cross_row(up, mid, down, lim, out, cols):
    """One row of a geodesic cross dilation: ``out = min(max(up, mid, down, left, right), lim)``."""
    if cols == 1:
        out[0] = min(max(max(up[0], mid[0]), down[0]), lim[0])
        return
    out[0] = min(max(max(up[0], mid[0]), max(down[0], mid[1])), lim[0])
    for c in range(1, cols - 1):
        out[c] = min(max(max(up[c], mid[c]), max(down[c], max(mid[c - 1], mid[c + 1]))), lim[c])
    last = cols - 1
    out[last] = min(max(max(up[last], mid[last]), max(down[last], mid[last - 1])), lim[last])


@njit(cache=True, nogil=True)
def snr_peaks(snr, lint, opened, min_snr, min_contrast):
    """Significant local maxima of a matched-filtered top-hat's SNR image.

    A pixel is a candidate when its ``snr`` exceeds ``min_snr``, no pixel of
    its 3x3 neighbourhood exceeds it, and the top-hat ``lint - opened``
    reaches ``min_contrast`` somewhere in that neighbourhood. Returns
    ``(rows, cols, contrast)``: the candidates in raster order and the 3x3
    maximum of the top-hat around each (ln units).
    """
    rows, cols = snr.shape
    out_r = np.empty(64, np.int64)
    out_c = np.empty(64, np.int64)
    out_t = np.empty(64, np.float32)
    n = 0
    for r in range(rows):
        for c in range(cols):
            v = snr[r, c]
            if not v > min_snr:
                continue
            is_max = True
            top = -np.inf
            for i in range(max(r - 1, 0), min(r + 2, rows)):
                for j in range(max(c - 1, 0), min(c + 2, cols)):
                    if snr[i, j] > v:
                        is_max = False
                    t = lint[i, j] - opened[i, j]
                    top = max(top, t)
            if is_max and top >= min_contrast:
                if n == out_r.shape[0]:
                    out_r = np.concatenate((out_r, np.empty(n, np.int64)))
                    out_c = np.concatenate((out_c, np.empty(n, np.int64)))
                    out_t = np.concatenate((out_t, np.empty(n, np.float32)))
                out_r[n] = r
                out_c[n] = c
                out_t[n] = top
                n += 1
    return out_r[:n], out_c[:n], out_t[:n]


@njit(cache=True, nogil=True)
def reconstruct_under_tiles(seed, mask, steps, tile_rows, pad, heights, widths):
    """:func:`reconstruct_under` separately in each tile of a mosaic, each with its own replicated border.

    The mosaic stacks tiles of ``tile_rows`` rows vertically; tile ``t``'s
    image occupies rows ``pad .. pad + heights[t]`` and columns ``pad .. pad +
    widths[t]`` of it. Pixels outside the tiles' images keep ``seed``.
    """
    out = seed.copy()
    for t in range(heights.shape[0]):
        h = heights[t]
        w = widths[t]
        r0 = t * tile_rows + pad
        a = seed[r0:r0 + h, pad:pad + w].copy()
        m = mask[r0:r0 + h, pad:pad + w]
        b = np.empty_like(a)
        for _ in range(steps):
            for r in range(h):
                _cross_row(a[max(r - 1, 0)], a[r], a[min(r + 1, h - 1)], m[r], b[r], w)
            a, b = b, a
        out[r0:r0 + h, pad:pad + w] = a
    return out


@njit(cache=True, nogil=True)
def isolated_outliers(raw, ratio):
    """Pixels more than ``ratio`` times darker than the darkest, or brighter than the brightest, of their 8 neighbours.

    ``ratio > 1`` and ``raw >= 0``. With the border reflected (OpenCV's
    ``BORDER_REFLECT``), a pixel on the image border has itself among its
    neighbours, so it is never an outlier: border pixels are skipped. Returns
    a bool mask and the number of outliers.
    """
    rows, cols = raw.shape
    bad = np.zeros((rows, cols), np.bool_)
    count = 0
    for r in range(1, rows - 1):
        for c in range(1, cols - 1):
            lo = np.inf
            hi = -np.inf
            for i in range(r - 1, r + 2):
                for j in range(c - 1, c + 2):
                    if i != r or j != c:
                        v = raw[i, j]
                        lo = min(lo, v)
                        hi = max(hi, v)
            x = raw[r, c]
            if x * ratio < lo or x > hi * ratio:
                bad[r, c] = True
                count += 1
    return bad, count
