"""Numba kernels of seed detection (stereo triangulation: ``_stereo_kernels``). Pure functions: arrays in, arrays out.

Images are ``[row, col]`` float32 (raw counts or line integrals in ln
units) of a kV frame or of a stack of detection windows; pixel coordinates
are ``(col, row)``, room points mm. Callers (``detection.py``,
``fiducials.py``) validate input and convert units. Neighbourhoods outside
an image replicate the border pixel (OpenCV's ``BORDER_REPLICATE``), so a
kernel here gives what the OpenCV composition it replaces gives: exactly for
morphology, medians and components, to float32 rounding for the Gaussian
(``tests/tracking/test_detection_kernels.py`` checks both).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = [
    "analyse_windows",
    "fit_seed_lm",
    "fit_seeds_lm",
    "flat_correct",
    "gather_windows",
    "isolated_outliers",
    "reconstruct_under",
    "snr_peaks",
]


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


# ---------------------------------------------------------------------------- window analysis
# The full-resolution analysis of detection windows (``detection.py``,
# ``_measure_windows``) in two kernels around OpenCV's vectorised log:
# ``gather_windows`` copies each window of a frame into a tile of a stack,
# with ``pad`` pixels of replicated border on every side, and repairs its
# isolated defects; ``analyse_windows`` runs the top-hat, the matched filter,
# the noise estimate, the support's components and their weighted moments,
# tile by tile, each tile an image of its own.
#
# Every filter runs over a tile's image rows as one flat run (row stride
# ``W``, the padded width), as element-wise loops over slices shifted by
# constant offsets: zero-based loops over slices carry no negative-index
# test, so LLVM vectorises them (``x[i - a]`` in a loop would not be). Values
# computed in the padding columns are never used; a filter's input has its
# border replicated again before the filter reads it.


@njit(cache=True, nogil=True)
def _copy(out, x):
    for j in range(out.shape[0]):
        out[j] = x[j]


@njit(cache=True, nogil=True)
def _min_into(out, x):
    for j in range(out.shape[0]):
        out[j] = min(out[j], x[j])


@njit(cache=True, nogil=True)
def _max_into(out, x):
    for j in range(out.shape[0]):
        out[j] = max(out[j], x[j])


@njit(cache=True, nogil=True)
def _min_into3(out, x, y, z):
    for j in range(out.shape[0]):
        out[j] = min(min(min(out[j], x[j]), y[j]), z[j])


@njit(cache=True, nogil=True)
def _max_into3(out, x, y, z):
    for j in range(out.shape[0]):
        out[j] = max(max(max(out[j], x[j]), y[j]), z[j])


@njit(cache=True, nogil=True)
def _min3(out, x, y, z):
    for j in range(out.shape[0]):
        out[j] = min(x[j], min(y[j], z[j]))


@njit(cache=True, nogil=True)
def _max3(out, x, y, z):
    for j in range(out.shape[0]):
        out[j] = max(x[j], max(y[j], z[j]))


@njit(cache=True, nogil=True)
def _max2(out, x, y):
    for j in range(out.shape[0]):
        out[j] = max(x[j], y[j])


@njit(cache=True, nogil=True)
def _geodesic_cross(out, up, mid, down, left, right, lim):
    for j in range(out.shape[0]):
        out[j] = min(max(max(up[j], mid[j]), max(down[j], max(left[j], right[j]))), lim[j])


@njit(cache=True, nogil=True)
def _sub(out, x, y):
    for j in range(out.shape[0]):
        out[j] = x[j] - y[j]


@njit(cache=True, nogil=True)
def _subtract_from(out, c, x):
    for j in range(out.shape[0]):
        out[j] = c - x[j]


@njit(cache=True, nogil=True)
def _abs_deviation(out, c):
    for j in range(out.shape[0]):
        out[j] = abs(out[j] - c)


@njit(cache=True, nogil=True)
def _clear(labels, pixels):
    for j in range(pixels.shape[0]):
        labels[pixels[j]] = 0


@njit(cache=True, nogil=True)
def _scale(out, g, x):
    for j in range(out.shape[0]):
        out[j] = g * x[j]


@njit(cache=True, nogil=True)
def _add_symmetric(out, g, x, y):
    for j in range(out.shape[0]):
        out[j] += g * (x[j] + y[j])


@njit(cache=True, nogil=True)
def _add_symmetric2(out, g, x, y, g2, x2, y2):
    for j in range(out.shape[0]):
        out[j] = (out[j] + g * (x[j] + y[j])) + g2 * (x2[j] + y2[j])


@njit(cache=True, nogil=True)
def _standardise(out, med, sigma):
    for j in range(out.shape[0]):
        out[j] = (out[j] - med) / sigma


@njit(cache=True, nogil=True)
def _neighbour_range(lo, hi, flat, a, b, stride):
    """Lowest and highest of the 8 neighbours of each pixel ``a .. b`` of a flat image (row ``stride``)."""
    n = b - a
    _copy(lo[:n], flat[a - stride - 1:b - stride - 1])
    _copy(hi[:n], flat[a - stride - 1:b - stride - 1])
    for off in (-stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1):
        _min_into(lo[:n], flat[a + off:b + off])
        _max_into(hi[:n], flat[a + off:b + off])


@njit(cache=True, nogil=True)
def _outliers(flat, lo, hi, a, pad, h, w, stride, ratio, keep, t, fix_at, fix_to):
    """Isolated outliers of a padded tile's interior (see :func:`gather_windows`) and their neighbours' medians.

    ``lo``/``hi`` hold the neighbour range of pixels ``a ..``; ``keep[t]``
    (when ``keep`` is not empty) exempts pixels. Writes flat indices to
    ``fix_at`` and medians to ``fix_to``; returns the count.
    """
    use_keep = keep.shape[0] > 0
    neigh = np.empty(8, np.float32)
    n_fix = 0
    for r in range(1, h - 1):
        base = (pad + r) * stride + pad
        x_row = flat[base + 1:base + w - 1]
        lo_row = lo[base + 1 - a:base + w - 1 - a]
        hi_row = hi[base + 1 - a:base + w - 1 - a]
        for j in range(x_row.shape[0]):
            x = x_row[j]
            if not (x * ratio < lo_row[j] or x > hi_row[j] * ratio):
                continue
            if use_keep and keep[t, r, j + 1]:
                continue
            i = base + 1 + j
            for n, off in enumerate((-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)):
                neigh[n] = flat[i + off]
            neigh.sort()
            fix_at[n_fix] = i
            fix_to[n_fix] = (neigh[3] + neigh[4]) / np.float32(2.0)
            n_fix += 1
    return n_fix


@njit(cache=True, nogil=True)
def gather_windows(frame, r0, c0, heights, widths, tiles, pad, out, ratio, keep):
    """Copy windows of a frame into padded tiles of a stack and repair their isolated outliers.

    Window ``k`` is ``frame[r0[k]:r0[k] + heights[k], c0[k]:c0[k] + widths[k]]``;
    it goes to ``out[tiles[k], pad:pad + heights[k], pad:pad + widths[k]]``
    (float32) and the rest of the tile replicates its border pixels. An
    interior pixel more than ``ratio`` times darker than the darkest, or
    brighter than the brightest, of its 8 neighbours is replaced by their
    median (as :func:`isolated_outliers`, whose border pixels are never
    outliers), unless ``keep[tiles[k], r, c]`` (window pixels; an empty
    ``keep`` marks none) says it is a calibrated defect, left to the caller.
    Returns the number of pixels replaced.
    """
    count = 0
    _, rows, cols = out.shape
    lo = np.empty(rows * cols, np.float32)
    hi = np.empty(rows * cols, np.float32)
    fix_at = np.empty(rows * cols, np.int64)
    fix_to = np.empty(rows * cols, np.float32)
    for k in range(r0.shape[0]):
        h = heights[k]
        w = widths[k]
        t = tiles[k]
        dst = out[t]
        for r in range(rows):
            src = frame[r0[k] + min(max(r - pad, 0), h - 1), c0[k]:c0[k] + w]
            row = dst[r]
            first = np.float32(src[0])
            last = np.float32(src[w - 1])
            for c in range(pad):
                row[c] = first
            for c in range(w):
                row[pad + c] = np.float32(src[c])
            for c in range(pad + w, cols):
                row[c] = last
        if h < 3 or w < 3:
            continue
        # Test every interior pixel against its raw neighbours first, then repair.
        flat = dst.reshape(rows * cols)
        a = (pad + 1) * cols
        _neighbour_range(lo, hi, flat, a, (pad + h - 1) * cols, cols)
        n_fix = _outliers(flat, lo, hi, a, pad, h, w, cols, ratio, keep, t, fix_at, fix_to)
        for q in range(n_fix):
            flat[fix_at[q]] = fix_to[q]
        count += n_fix
    return count


@njit(cache=True, nogil=True)
def _replicate(x, stride, pad, h, w, pad_rows, pad_cols):
    """Replicate the image ``x[pad:pad + h, pad:pad + w]`` (flat, row ``stride``) into its border.

    ``pad_cols`` columns either side of each image row, then ``pad_rows``
    whole padded rows above and below (corners included).
    """
    for r in range(pad, pad + h):
        base = r * stride + pad
        left = x[base]
        right = x[base + w - 1]
        for c in range(1, pad_cols + 1):
            x[base - c] = left
            x[base + w - 1 + c] = right
    lo = pad - pad_cols
    hi = pad + w + pad_cols
    first = pad * stride
    last = (pad + h - 1) * stride
    for r in range(pad - pad_rows, pad):
        _copy(x[r * stride + lo:r * stride + hi], x[first + lo:first + hi])
    for r in range(pad + h, pad + h + pad_rows):
        _copy(x[r * stride + lo:r * stride + hi], x[last + lo:last + hi])


@njit(cache=True, nogil=True)
def _disc(src, lo, hi, stride, half_widths, is_max, levels, out):
    """Erosion (``is_max`` False) or dilation by a disc of the flat image ``src``, for indices ``lo .. hi``.

    The disc's row at offset ``dy`` has half-width ``half_widths[R + dy]``
    (``R = len // 2``); ``src`` must hold valid (replicated) pixels ``R`` rows
    and columns beyond the range. The running extremum of each row over
    ``c - a .. c + a`` is built for every ``a <= R`` (two comparisons per
    step), then combined over the disc's rows.
    """
    rad = half_widths.shape[0] // 2
    a0 = lo - rad * stride
    b0 = hi + rad * stride
    _copy(levels[0, a0:b0], src[a0:b0])
    for a in range(1, rad + 1):
        if is_max:
            _max3(levels[a, a0:b0], levels[a - 1, a0:b0], src[a0 - a:b0 - a], src[a0 + a:b0 + a])
        else:
            _min3(levels[a, a0:b0], levels[a - 1, a0:b0], src[a0 - a:b0 - a], src[a0 + a:b0 + a])
    off = -rad * stride
    _copy(out[lo:hi], levels[half_widths[0], lo + off:hi + off])
    # The other rows of the disc, three per pass where they come in threes.
    dy = 1
    while dy + 2 <= 2 * rad:
        o1 = (dy - rad) * stride
        o2 = o1 + stride
        o3 = o2 + stride
        x = levels[half_widths[dy], lo + o1:hi + o1]
        y = levels[half_widths[dy + 1], lo + o2:hi + o2]
        z = levels[half_widths[dy + 2], lo + o3:hi + o3]
        if is_max:
            _max_into3(out[lo:hi], x, y, z)
        else:
            _min_into3(out[lo:hi], x, y, z)
        dy += 3
    while dy <= 2 * rad:
        off = (dy - rad) * stride
        if is_max:
            _max_into(out[lo:hi], levels[half_widths[dy], lo + off:hi + off])
        else:
            _min_into(out[lo:hi], levels[half_widths[dy], lo + off:hi + off])
        dy += 1


@njit(cache=True, nogil=True)
def _symmetric_filter(x, lo, hi, step, taps, out):
    """``out = taps[K] x + sum_k taps[K + k] (x[i - k step] + x[i + k step])`` for ``i`` in ``lo .. hi``.

    ``K = len(taps) // 2``; float32, accumulated in that order, two taps per
    pass. ``x`` must be valid ``K`` steps beyond the range.
    """
    gk = taps.shape[0] // 2
    _scale(out[lo:hi], taps[gk], x[lo:hi])
    k = 1
    while k + 1 <= gk:
        o1 = k * step
        o2 = o1 + step
        _add_symmetric2(out[lo:hi], taps[gk + k], x[lo - o1:hi - o1], x[lo + o1:hi + o1], taps[gk + k + 1],
                        x[lo - o2:hi - o2], x[lo + o2:hi + o2])
        k += 2
    if k <= gk:
        o1 = k * step
        _add_symmetric(out[lo:hi], taps[gk + k], x[lo - o1:hi - o1], x[lo + o1:hi + o1])


@njit(cache=True, nogil=True)
def _window_max(x, lo, hi, step, reach, t1, t2, out):
    """``out[i] = max(x[i + k step] for |k| <= reach)`` for ``i`` in ``lo .. hi``.

    Doubling: windows of 2, 4, ... pixels, then the largest power of two
    within the window twice, overlapping. ``x`` must be valid ``reach`` steps
    beyond the range; ``t1``, ``t2`` are scratch like ``x``.
    """
    if reach == 0:
        _copy(out[lo:hi], x[lo:hi])
        return
    size = 1
    cur = x
    nxt = t1
    spare = t2
    while 2 * size <= 2 * reach + 1:
        # cur[j] is the maximum of x[j .. j + (size - 1) step]; build the window of 2 size.
        a = lo - reach * step
        b = hi + (reach - 2 * size + 1) * step
        _max2(nxt[a:b], cur[a:b], cur[a + size * step:b + size * step])
        size *= 2
        cur, nxt, spare = nxt, spare, nxt
    back = (reach - size + 1) * step
    _max2(out[lo:hi], cur[lo - reach * step:hi - reach * step], cur[lo + back:hi + back])


@njit(cache=True, nogil=True)
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True, nogil=True)
def _select(values, n, k):
    """The ``k``-th smallest of ``values[:n]`` (reordered in place), quickselect."""
    lo = 0
    hi = n - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                tmp = values[i]
                values[i] = values[j]
                values[j] = tmp
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return values[k]


@njit(cache=True, nogil=True)
def _median(values, n):
    """Median of ``values[:n]`` (float32, reordered in place); an even count averages the middle two, as numpy."""
    k = n // 2
    upper = _select(values, n, k)
    if n % 2 == 1:
        return upper
    lower = values[0]
    for i in range(1, k):
        lower = max(lower, values[i])
    return (lower + upper) / np.float32(2.0)


@njit(cache=True, nogil=True)
def _support(snr, near, pad, h, w, stride, support_snr, relative_cut, pixels):
    """Flat indices (raster order) of the image pixels above ``support_snr`` and ``relative_cut`` of ``near``."""
    n = 0
    for r in range(pad, pad + h):
        base = r * stride + pad
        s_row = snr[base:base + w]
        n_row = near[base:base + w]
        for j in range(w):
            if s_row[j] > support_snr and s_row[j] > relative_cut * n_row[j]:
                pixels[n] = base + j
                n += 1
    return n


@njit(cache=True, nogil=True)
def _components(pixels, n_pix, stride, labels, parent):
    """8-connected components of the support pixels (raster order; every other label 0), numbered 1.. in
    raster order of their first pixel into ``labels``; returns their number."""
    m = 0
    for p in range(n_pix):
        i = pixels[p]
        best = 0
        for j in (i - stride - 1, i - stride, i - stride + 1, i - 1):
            q = labels[j]
            if q == 0:
                continue
            q = _find(parent, q)
            if best == 0:
                best = q
            elif q != best:
                if q < best:
                    parent[best] = q
                    best = q
                else:
                    parent[q] = best
        if best == 0:
            m += 1
            parent[m] = m
            best = m
        labels[i] = best
    final = np.zeros(m + 1, np.int32)
    n_comp = 0
    for p in range(n_pix):
        i = pixels[p]
        root = _find(parent, labels[i])
        if final[root] == 0:
            n_comp += 1
            final[root] = n_comp
        labels[i] = final[root]
    return n_comp


@njit(cache=True, nogil=True)
def _extents(pixels, n_pix, labels, snr, stride, pad, h, w, n_comp):
    """Per component: peak SNR, whether it touches the image border, bounding box (rows, cols; flat layout)."""
    peak = np.full(n_comp + 1, -np.inf)
    edge = np.zeros(n_comp + 1, np.bool_)
    box = np.empty((n_comp + 1, 4), np.int64)
    for q in range(n_comp + 1):
        box[q, 0] = 1 << 30
        box[q, 1] = -1
        box[q, 2] = 1 << 30
        box[q, 3] = -1
    for p in range(n_pix):
        i = pixels[p]
        q = labels[i]
        r = i // stride
        c = i - r * stride
        peak[q] = max(peak[q], np.float64(snr[i]))
        if r == pad or c == pad or r == pad + h - 1 or c == pad + w - 1:
            edge[q] = True
        box[q, 0] = min(box[q, 0], r)
        box[q, 1] = max(box[q, 1], r)
        box[q, 2] = min(box[q, 2], c)
        box[q, 3] = max(box[q, 3], c)
    return peak, edge, box


@njit(cache=True, nogil=True)
def _moments(lint, opened, labels, q, r0, r1, c0, c1, stride, pad, top_med):
    """Transmission-deficit weighted moments of component ``q`` grown by one pixel (box rows r0..r1, cols c0..c1).

    A pixel outside every component joins its highest-numbered neighbour.
    Returns sum w, sum w x, sum w y, sum w x^2, sum w y^2, sum w x y, pixels
    and the peak of ``T - top_med``; x, y are image column and row.
    """
    sw = 0.0
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    syy = 0.0
    sxy = 0.0
    count = 0
    peak_top = -np.inf
    for r in range(r0 - 1, r1 + 2):
        for c in range(c0 - 1, c1 + 2):
            i = r * stride + c
            own = labels[i]
            if own == 0:
                for j in (i - stride - 1, i - stride, i - stride + 1, i - 1, i + 1, i + stride - 1, i + stride,
                          i + stride + 1):
                    own = max(own, labels[j])
            if own != q:
                continue
            t_rel = (lint[i] - opened[i]) - top_med
            wt = -math.expm1(-max(np.float64(t_rel), 0.0))
            x = np.float64(c - pad)
            y = np.float64(r - pad)
            sw += wt
            sx += wt * x
            sy += wt * y
            sxx += wt * x * x
            syy += wt * y * y
            sxy += wt * x * y
            count += 1
            peak_top = max(peak_top, np.float64(t_rel))
    return sw, sx, sy, sxx, syy, sxy, count, peak_top


@njit(cache=True, nogil=True)
def _strided_sample(x, pad, h, w, stride, step, out):
    """``x``'s image pixels every ``step`` rows and columns into ``out``; returns the count."""
    n = 0
    for r in range(pad, pad + h, step):
        base = r * stride
        for c in range(pad, pad + w, step):
            out[n] = x[base + c]
            n += 1
    return n


@njit(cache=True, nogil=True)
def _strided_top_hat(lint, opened, pad, h, w, stride, step, out):
    """``lint - opened`` at the image pixels every ``step`` rows and columns into ``out``; returns the count."""
    n = 0
    for r in range(pad, pad + h, step):
        base = r * stride
        for c in range(pad, pad + w, step):
            out[n] = lint[base + c] - opened[base + c]
            n += 1
    return n


@njit(cache=True, nogil=True)
def analyse_windows(tiles, pad, log_i0, heights, widths, half_widths, steps, gauss, reach, support_snr, relative_cut,
                    min_snr):
    """Top-hat, matched filter, noise, support and weighted moments of every tile of a window stack.

    ``tiles[t]`` holds ``ln(I)`` of window ``t`` (repaired, clipped at the
    intensity floor) at ``[pad:pad + heights[t], pad:pad + widths[t]]``, its
    border replicated to the tile's edge (:func:`gather_windows`);
    ``log_i0[t]`` is its ``ln(i0)``, so the line integrals are ``L = log_i0 -
    tiles`` (float32, ln units). Each tile is an image of its own, its border
    replicated for every filter:

    - background: opening of ``L`` by the disc ``half_widths`` (see
      :func:`_disc`), grown back under ``L`` by ``steps`` geodesic cross
      dilations; top-hat ``T = L - opening``;
    - matched filter: ``L - background`` convolved with the separable
      symmetric kernel ``gauss`` (odd length, float32), rows then columns;
    - SNR: (filtered - median) / (1.4826 MAD), both over the tile sampled
      every ``step`` pixels (1, or 2 above 4096 pixels, 4 above 65536);
    - support: SNR above ``support_snr`` and above ``relative_cut`` times the
      highest SNR within ``reach`` pixels (a square); 8-connected components,
      numbered in raster order of their first pixel;
    - per component whose peak SNR exceeds ``min_snr`` and that does not touch
      the tile's border: the transmission-deficit weights
      ``w = 1 - exp(-max(T - median(T), 0))`` (median over every other pixel
      of every other row) over the component grown by one pixel (a fringe
      pixel goes to its highest-numbered neighbour), and their moments in
      window pixels (x = column, y = row).

    Returns an ``(M, 10)`` float64 array, one row per component, in tile
    order and component order: tile, peak SNR, sum w, sum w x, sum w y,
    sum w x^2, sum w y^2, sum w x y, pixels, peak ``T - median(T)`` (ln
    units), the sums over the grown support.
    """
    n_tiles, rows, stride = tiles.shape
    rad = half_widths.shape[0] // 2
    gk = gauss.shape[0] // 2
    if pad <= max(rad, gk, reach, 1) or rows < 2 * pad + 1 or stride < 2 * pad + 1:
        raise ValueError("analyse_windows: tile padding narrower than the filters")
    size_flat = rows * stride
    levels = np.empty((rad + 1, size_flat), np.float32)
    lint = np.empty(size_flat, np.float32)
    opened = np.empty(size_flat, np.float32)
    fa = np.empty(size_flat, np.float32)
    fb = np.empty(size_flat, np.float32)
    fc = np.empty(size_flat, np.float32)
    snr = np.empty(size_flat, np.float32)
    labels = np.zeros(size_flat, np.int32)
    pixels = np.empty(size_flat, np.int64)
    parent = np.empty(size_flat + 1, np.int32)
    sample = np.empty(size_flat, np.float32)
    out = np.empty((16, 10))
    n_out = 0
    for t in range(n_tiles):
        h = heights[t]
        w = widths[t]
        lo = pad * stride
        hi = (pad + h) * stride
        src = tiles[t].reshape(size_flat)
        l0 = log_i0[t]
        _subtract_from(lint, l0, src)
        # Opening by a disc, not a square: it follows corners of bone at any
        # angle (a square leaves the tip of a rotated corner behind as a false
        # blob). Then a partial reconstruction by dilation: the opening grown
        # back under L for ``steps`` steps, so corners of bone the disc could
        # not reach, connected to the bone, fill back in; a seed stands above
        # its surroundings everywhere and stays out. (lint's border is
        # replicated already.)
        _disc(lint, lo, hi, stride, half_widths, False, levels, fa)
        _replicate(fa, stride, pad, h, w, rad, rad)
        _disc(fa, lo, hi, stride, half_widths, True, levels, opened)
        _copy(fa[lo:hi], opened[lo:hi])
        grow = fa
        spare = fb
        for _ in range(steps):
            _replicate(grow, stride, pad, h, w, 1, 1)
            _geodesic_cross(spare[lo:hi], grow[lo - stride:hi - stride], grow[lo:hi], grow[lo + stride:hi + stride],
                            grow[lo - 1:hi - 1], grow[lo + 1:hi + 1], lint[lo:hi])
            grow, spare = spare, grow
        # Matched filter of L - background: rows, then columns.
        _sub(spare[lo:hi], lint[lo:hi], grow[lo:hi])
        _replicate(spare, stride, pad, h, w, 0, gk)
        _symmetric_filter(spare, lo, hi, 1, gauss, fc)
        _replicate(fc, stride, pad, h, w, gk, 0)
        _symmetric_filter(fc, lo, hi, stride, gauss, snr)
        # Robust noise of the tile, then SNR in place.
        area = h * w
        step = 4 if area > 65536 else 2 if area > 4096 else 1
        n = _strided_sample(snr, pad, h, w, stride, step, sample)
        med = _median(sample, n)
        _abs_deviation(sample[:n], med)
        sigma = max(np.float32(1.4826) * _median(sample, n), np.float32(1e-6))
        _standardise(snr[lo:hi], med, sigma)
        # Highest SNR within reach (a square): rows, then columns.
        _replicate(snr, stride, pad, h, w, 0, reach)
        _window_max(snr, lo, hi, 1, reach, fa, fb, fc)
        _replicate(fc, stride, pad, h, w, reach, 0)
        near = levels[0]
        _window_max(fc, lo, hi, stride, reach, fa, fb, near)
        n_pix = _support(snr, near, pad, h, w, stride, support_snr, relative_cut, pixels)
        if n_pix == 0:
            continue
        # 8-connected components (the padding is never support: its labels stay 0).
        n_comp = _components(pixels, n_pix, stride, labels, parent)
        peak, edge, box = _extents(pixels, n_pix, labels, snr, stride, pad, h, w, n_comp)
        # The plain top-hat T = L - opening weighs the centroid, not L -
        # background: the reconstruction can bridge from bone through a seed
        # into soft tissue and would lower one side of a seed lying across a
        # bone edge.
        top_med = np.float32(0.0)
        for q in range(1, n_comp + 1):
            if peak[q] > min_snr and not edge[q]:
                # T's median over every other pixel of every other row.
                n = _strided_top_hat(lint, opened, pad, h, w, stride, 2, sample)
                top_med = _median(sample, n)
                break
        for q in range(1, n_comp + 1):
            if not (peak[q] > min_snr) or edge[q]:
                continue
            # The component does not touch the border, so its grown box stays inside the window.
            sw, sx, sy, sxx, syy, sxy, count, peak_top = _moments(
                lint, opened, labels, q, box[q, 0], box[q, 1], box[q, 2], box[q, 3], stride, pad, top_med)
            if n_out == out.shape[0]:
                out = np.concatenate((out, np.empty_like(out)))
            o = out[n_out]
            o[0] = t
            o[1] = peak[q]
            o[2] = sw
            o[3] = sx
            o[4] = sy
            o[5] = sxx
            o[6] = syy
            o[7] = sxy
            o[8] = count
            o[9] = peak_top
            n_out += 1
        _clear(labels, pixels[:n_pix])
    return out[:n_out]


# ---------------------------------------------------------------------------- seed fit (seed_search.refine_seeds)
_SQRT_PI = math.sqrt(math.pi)


# Pixels this far past an edge of the box (in units of the blur's 1 / k) see none of it, and their model is the
# plane alone: erfc(4.5) = 2e-10 and exp(-4.5^2) = 1.6e-9, below the error of _erf_from_exp.
_SATURATED = 4.5


@njit(cache=True, nogil=True, inline="always")
def _erf_from_exp(x, e):
    """``erf(x)`` given ``e = exp(-x^2)`` (computed anyway for the Jacobian): Abramowitz & Stegun 7.1.26,
    absolute error <= 1.5e-7 (the seed model's shape, 0..1: far below any pixel's noise)."""
    z = abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    y = 1.0 - t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) * e
    return y if x >= 0.0 else -y


@njit(cache=True, nogil=True)
def _seed_model(x, y, data, p, half_wid, k, resid, box, active):
    """Residuals (model - data) of a plane plus a blurred oriented box at pixels ``(x, y)``, and the box's
    Jacobian columns where the box reaches; returns ``(cost, m)``: the sum of squared residuals and the count of
    such pixels.

    Parameters ``p = (dcol, drow, theta, half_length, amplitude, b0, b1, b2)``
    (px, px, rad, px, ln units, ln units, ln units per px twice); the box is
    ``half_wid`` px across, blurred by a Gaussian with ``k = 1 / (sqrt(2) sigma)``.
    Pixels farther than ``_SATURATED / k`` outside the box (across or along)
    see the plane only (the box's terms there are below 2e-9; their Jacobian
    row is the plane's ``(0, 0, 0, 0, 0, 1, x, y)``); ``erf`` comes from the
    ``exp`` the Jacobian needs (:func:`_erf_from_exp`, 1.5e-7). The other
    pixels' indices go to ``active[:m]``, their derivatives by
    ``p[0..4]`` to ``box[0..4, :m]`` (:func:`_seed_normal` sums them).
    """
    cos, sin = math.cos(p[2]), math.sin(p[2])
    hl, amp = p[3], p[4]
    cost = 0.0
    m = 0
    for i in range(x.shape[0]):
        u, v = x[i] - p[0], y[i] - p[1]
        along = u * cos + v * sin
        across = -u * sin + v * cos
        a1, b1 = (along + hl) * k, (along - hl) * k
        a2, b2 = (across + half_wid) * k, (across - half_wid) * k
        plane = p[5] + p[6] * x[i] + p[7] * y[i]
        if b2 > _SATURATED or a2 < -_SATURATED or b1 > _SATURATED or a1 < -_SATURATED:
            r = plane - data[i]
            resid[i] = r
            cost += r * r
            continue
        ea1, eb1 = math.exp(-a1 * a1), math.exp(-b1 * b1)
        pa = 0.5 * (_erf_from_exp(a1, ea1) - _erf_from_exp(b1, eb1))
        pa_t = (k / _SQRT_PI) * (ea1 - eb1)
        pa_h = (k / _SQRT_PI) * (ea1 + eb1)
        ea2, eb2 = math.exp(-a2 * a2), math.exp(-b2 * b2)
        qa = 0.5 * (_erf_from_exp(a2, ea2) - _erf_from_exp(b2, eb2))
        qa_t = (k / _SQRT_PI) * (ea2 - eb2)
        shape = pa * qa
        r = plane + amp * shape - data[i]
        resid[i] = r
        cost += r * r
        d_along, d_across = amp * pa_t * qa, amp * pa * qa_t
        active[m] = i
        box[0, m] = -cos * d_along + sin * d_across
        box[1, m] = -sin * d_along - cos * d_across
        box[2, m] = across * d_along - along * d_across
        box[3, m] = amp * pa_h * qa
        box[4, m] = shape
        m += 1
    return cost, m


@njit(cache=True, nogil=True)
def _plane_block(x, y, jtj):
    """The plane's block of ``J^T J`` (rows / columns 5..7: ``sum [1, x, y]^T [1, x, y]``): the same for every
    parameter vector."""
    s1, sx, sy, sxx, sxy, syy = float(x.shape[0]), 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(x.shape[0]):
        sx += x[i]
        sy += y[i]
        sxx += x[i] * x[i]
        sxy += x[i] * y[i]
        syy += y[i] * y[i]
    jtj[5, 5], jtj[5, 6], jtj[5, 7] = s1, sx, sy
    jtj[6, 5], jtj[6, 6], jtj[6, 7] = sx, sxx, sxy
    jtj[7, 5], jtj[7, 6], jtj[7, 7] = sy, sxy, syy


@njit(cache=True, nogil=True, fastmath=True)
def _seed_normal(x, y, resid, box, active, m, gathered, jtj, grad):
    """Normal equations ``jtj = J^T J``, ``grad = J^T r`` of :func:`_seed_model`'s output (the plane block of
    ``jtj``, :func:`_plane_block`, left as it is), as dot products over pixels (``fastmath``: summed in any
    order, vectorised; ``gathered`` (3, n) scratch). No BLAS: its threads inside the parallel fits of
    :func:`fit_seeds_lm` would fight over the cores."""
    g5 = 0.0
    g6 = 0.0
    g7 = 0.0
    for i in range(x.shape[0]):
        r = resid[i]
        g5 += r
        g6 += x[i] * r
        g7 += y[i] * r
    grad[5], grad[6], grad[7] = g5, g6, g7
    for j in range(m):
        i = active[j]
        gathered[0, j] = resid[i]
        gathered[1, j] = x[i]
        gathered[2, j] = y[i]
    for a in range(5):
        ba = box[a]
        t_r = 0.0
        t_1 = 0.0
        t_x = 0.0
        t_y = 0.0
        for j in range(m):
            t_r += ba[j] * gathered[0, j]
            t_1 += ba[j]
            t_x += ba[j] * gathered[1, j]
            t_y += ba[j] * gathered[2, j]
        grad[a] = t_r
        jtj[a, 5] = jtj[5, a] = t_1
        jtj[a, 6] = jtj[6, a] = t_x
        jtj[a, 7] = jtj[7, a] = t_y
        for b in range(a, 5):
            bb = box[b]
            t = 0.0
            for j in range(m):
                t += ba[j] * bb[j]
            jtj[a, b] = jtj[b, a] = t


_SINGULAR_LOG_DET = math.log(1e-300)  # a normal matrix with a smaller determinant is singular


@njit(cache=True, nogil=True)
def _cholesky(a, low):
    """Cholesky factor ``low`` (lower triangle) of a symmetric positive definite 8 x 8 ``a``; False when ``a`` is
    not positive definite or its determinant is below 1e-300 (singular)."""
    n = a.shape[0]
    log_det = 0.0
    for j in range(n):
        d = a[j, j]
        for m in range(j):
            d -= low[j, m] * low[j, m]
        if not d > 0.0:
            return False
        log_det += math.log(d)
        ljj = math.sqrt(d)
        low[j, j] = ljj
        for i in range(j + 1, n):
            t = a[i, j]
            for m in range(j):
                t -= low[i, m] * low[j, m]
            low[i, j] = t / ljj
    return log_det >= _SINGULAR_LOG_DET


@njit(cache=True, nogil=True)
def _cholesky_back(low, rhs, out):
    """``out = (low low^T)^-1 rhs``, ``low`` a Cholesky factor (:func:`_cholesky`)."""
    n = low.shape[0]
    for i in range(n):  # L z = rhs
        t = rhs[i]
        for m in range(i):
            t -= low[i, m] * out[m]
        out[i] = t / low[i, i]
    for i in range(n - 1, -1, -1):  # L^T out = z
        t = out[i]
        for m in range(i + 1, n):
            t -= low[m, i] * out[m]
        out[i] = t / low[i, i]


@njit(cache=True, nogil=True)
def fit_seed_lm(x, y, data, p0, half_wid, blur_px, lo_half, hi_half, max_shift, iterations):
    """Levenberg-Marquardt fit of a plane plus a blurred oriented box (the seed's shadow) to line integrals.

    ``x``, ``y`` (float64, px) are pixel offsets from the start position,
    ``data`` the line integrals there (ln units); ``p0`` the start of
    ``(dcol, drow, theta [rad], half_length [px], amplitude, b0, b1, b2)``.
    The centre is kept within ``max_shift`` px of the start, the half-length
    in ``[lo_half, hi_half]``, the amplitude >= 0 (projected LM steps, the
    damping ``lam * diag(J^T J)`` adapted x10 / /10). The normal equations
    are summed and solved in place (:func:`_seed_model`, :func:`_seed_normal`,
    :func:`_cholesky`, :func:`_cholesky_back`): no BLAS or LAPACK call.

    Returns ``(ok, p, se, sigma)``: the parameters, their standard errors
    from ``sigma^2 (J^T J)^-1`` and the residual sigma; ``ok`` False when a
    normal matrix is singular.
    """
    n = x.shape[0]
    k = 1.0 / (math.sqrt(2.0) * blur_px)
    p = p0.copy()
    resid = np.empty(n)
    box = np.empty((5, n))
    active = np.empty(n, dtype=np.int64)
    resid_t = np.empty(n)
    box_t = np.empty((5, n))
    active_t = np.empty(n, dtype=np.int64)
    gathered = np.empty((3, n))
    jtj = np.empty((8, 8))
    grad = np.empty(8)
    rhs = np.empty(8)
    a = np.empty((8, 8))
    low = np.zeros((8, 8))
    step = np.empty(8)
    se = np.zeros(8)
    _plane_block(x, y, jtj)
    cost, m = _seed_model(x, y, data, p, half_wid, k, resid, box, active)
    _seed_normal(x, y, resid, box, active, m, gathered, jtj, grad)
    lam = 1e-3
    for _ in range(iterations):
        for i in range(8):
            for j in range(8):
                a[i, j] = jtj[i, j]
            a[i, i] += lam * (jtj[i, i] + 1e-12)
            rhs[i] = -grad[i]
        if not _cholesky(a, low):
            return False, p, se, 0.0
        _cholesky_back(low, rhs, step)
        trial = p + step
        for j in range(2):
            trial[j] = min(max(trial[j], -max_shift), max_shift)
        trial[3] = min(max(trial[3], lo_half), hi_half)
        trial[4] = max(trial[4], 0.0)
        c_new, m_t = _seed_model(x, y, data, trial, half_wid, k, resid_t, box_t, active_t)
        if c_new < cost:
            converged = cost - c_new < 1e-9 * cost and max(abs(step[0]), abs(step[1])) < 1e-3
            p = trial
            resid, resid_t = resid_t, resid
            box, box_t = box_t, box
            active, active_t = active_t, active
            cost = c_new
            # A rejected step leaves the normal equations as they were.
            _seed_normal(x, y, resid, box, active, m_t, gathered, jtj, grad)
            lam = max(lam / 10.0, 1e-9)
            if converged:
                break
        else:
            lam *= 10.0
            if lam > 1e8:
                break
    dof = max(n - 8, 1)
    sigma = math.sqrt(cost / dof)
    # The standard errors: the diagonal of (J^T J)^-1 at the final p (one factorisation, a column at a time).
    if not _cholesky(jtj, low):
        return False, p, se, sigma
    unit = np.zeros(8)
    col = np.empty(8)
    for j in range(8):
        unit[:] = 0.0
        unit[j] = 1.0
        _cholesky_back(low, unit, col)
        se[j] = math.sqrt(max(col[j], 0.0)) * sigma
    return True, p, se, sigma


@njit(cache=True, nogil=True, parallel=True)
def fit_seeds_lm(x, y, data, bounds, window, p0, half_wid, blur_px, lo_half, hi_half, max_shift, iterations):
    """Many :func:`fit_seed_lm` fits at once, in parallel (one per row of ``p0``).

    Fit ``j`` uses the pixels ``bounds[window[j]]:bounds[window[j] + 1]`` of
    the concatenated ``x``, ``y``, ``data`` (px offsets, ln units) and starts
    from ``p0[j]``; the other arguments are those of :func:`fit_seed_lm`,
    the same for every fit. Each fit is exactly the one
    :func:`fit_seed_lm` computes alone (no shared state).

    Returns ``(ok, p, se, sigma)`` with one row (entry) per fit.
    """
    n_fit = p0.shape[0]
    ok = np.zeros(n_fit, dtype=np.bool_)
    p = np.empty((n_fit, 8))
    se = np.empty((n_fit, 8))
    sigma = np.empty(n_fit)
    for j in prange(n_fit):
        w = window[j]
        a, b = bounds[w], bounds[w + 1]
        ok_j, p_j, se_j, s_j = fit_seed_lm(x[a:b], y[a:b], data[a:b], p0[j], half_wid, blur_px, lo_half, hi_half,
                                           max_shift, iterations)
        ok[j] = ok_j
        p[j] = p_j
        se[j] = se_j
        sigma[j] = s_j
    return ok, p, se, sigma


@njit(cache=True, nogil=True, parallel=True)
def flat_correct(raw, offset, inv_gain, use_offset, use_gain):
    """``max((raw - offset) * inv_gain, 0)`` per pixel in float32, one parallel pass (rows).

    ``raw`` is a frame of any real dtype (each pixel cast to float32 first),
    ``offset`` and ``inv_gain`` float32 maps of its shape, used only where
    ``use_offset`` / ``use_gain``: what ``np.subtract(raw, offset,
    dtype=float32)``, ``*= inv_gain`` and ``np.maximum(., 0)`` give, in one
    pass. A NaN stays NaN.
    """
    rows, cols = raw.shape
    out = np.empty((rows, cols), dtype=np.float32)
    zero = np.float32(0.0)
    for r in prange(rows):
        for c in range(cols):
            v = np.float32(raw[r, c])
            if use_offset:
                v = v - offset[r, c]
            if use_gain:
                v = v * inv_gain[r, c]
            out[r, c] = zero if v < zero else v
    return out
