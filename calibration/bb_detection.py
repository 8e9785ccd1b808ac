"""Finding the BBs of a calibration phantom in raw kV frames, and naming them.

Two steps, both free of manual picking:

1. :func:`detect_bbs` finds compact radio-opaque blobs with sub-pixel centres.
   The raw signal is converted to line integrals ``-ln(I / i0)``, a
   morphological opening (a disk wider than a BB) estimates the smooth
   background (table, phantom body) that is subtracted, blobs are thresholded
   at many times the robust noise level and filtered by size, and each
   centre is the centroid of the *absorbed fraction* ``1 - I / I_bg`` (with
   ``I_bg`` the median of a ring around the blob) in a circular window that is
   re-centred until it stops moving. The absorbed fraction is linear in the
   photons removed, so averaging over a pixel's area does not bias it (a log
   would), it is bounded for opaque tungsten, and its noise has zero mean.
   Blur on a sloped background, scatter and the window still bias it by up
   to a few 0.01 px; ``debias=True`` subtracts that bias with a shadow model
   fitted to each BB (:mod:`.bb_shadow`, :func:`_debiased`) -- off by
   default, as it did not help the calibration through the clinic chain.
2. :func:`match_markers` assigns detections to the phantom's markers by
   comparing them with the markers projected through the nominal geometry:
   an exhaustive search over translations (every detection-prediction pair is
   a hypothesis, scored by how many predictions then have a detection within
   a coarse gate -- RANSAC with all one-point samples), then a few rounds of
   affine fit + mutual-nearest-neighbour assignment with a shrinking gate. A
   missing BB simply has no detection in its gate, an extra object finds no
   prediction, and a phantom rotated a few degrees (or a geometry off by
   centimetres) is absorbed by the affine model.

Pixel coordinates are ``(col, row)``, pixel centres at integers, as in
``docs/CONVENTIONS.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .bb_shadow import fit_shadow, render_shadow
from .errors import DetectionError, ImagesSwappedError, MarkerCountError
from .foundation import readonly_array as _readonly

__all__ = [
    "DetectionError",
    "MarkerCountError",
    "ImagesSwappedError",
    "DetectedBBs",
    "MarkerMatch",
    "line_integrals",
    "estimate_i0",
    "detect_bbs",
    "match_markers",
    "local_noise",
    "refine_centres",
]

#: A blob is kept when its smoothed line integral exceeds this many robust
#: standard deviations of the background noise (a false blob from Gaussian
#: noise at 8 sigma has probability ~1e-15 per pixel).
DETECTION_SIGMA = 8.0
#: A detection's equivalent diameter (from its absorbed area) must lie within
#: these fractions of the expected BB diameter on the panel: a partly
#: attenuating steel BB still absorbs more than 40 % of its disk, and anything
#: 1.8 times wider is a clip, a wire or two touching objects, not a BB.
DIAMETER_RANGE = (0.4, 1.8)
#: Margin around the BB's disk in the centroid window, px: 2.5 sigmas of a
#: 0.6 px detector blur. Every pixel in the window adds its noise times its
#: distance from the centre (the centroid's variance grows as the window
#: radius to the 4th power), so a wider margin costs precision: 2.5 px gave
#: 30 % more noise on 2 mm BBs (issue 13). A wider real penumbra is cut
#: symmetrically at the converged centre, which costs signal, not bias.
_WINDOW_MARGIN_PX = 1.5
_MAX_RECENTRE = 20
#: A pixel reading this much (the top of the uint16 range) is saturated or hot.
HOT_VALUE = 65535.0
#: Most candidate maxima refined per frame (the strongest first).
MAX_CANDIDATES = 400
#: Largest ratio of a detection's principal widths (absorption-weighted second
#: moments): a sphere's shadow is round (its perspective ellipse differs from a
#: circle by < 1 %); two overlapping BBs, a wire or an edge artefact is not.
MAX_ELONGATION = 1.3
_RECENTRE_TOL_PX = 1e-4
#: Standard deviation of ``G_s * n - G_3s * n`` over that of ``G_s * n`` for white noise ``n``:
#: ``sqrt(1 + 1/9 - 2 * 2 / 10) = 0.843`` (variances ``1 / (4 pi s^2)``, covariance ``1 / (2 pi (s^2 + 9 s^2))``).
_DOG_NOISE_FRACTION = math.sqrt(1.0 + 1.0 / 9.0 - 0.4)


@dataclass(frozen=True, slots=True)
class DetectedBBs:
    """BB-like blobs found in one frame.

    Attributes
    ----------
    centres_px : (M, 2) array
        Sub-pixel ``(col, row)`` centres.
    diameters_px : (M,) array
        Equivalent diameter from the absorbed area ``2 sqrt(sum(1 - I/I_bg) / pi)``, px.
    peak_absorption : (M,) array
        Largest absorbed fraction in the blob (1 = fully opaque).
    i0 : float
        Unattenuated signal used for the log conversion (given or estimated).
    rejected_px : (K, 2) array
        Centres of blobs rejected for their size or shape (reported, never used).
    sigma_px : (M,) array
        Expected 1-sigma error of each centre (per axis), px, from the local
        noise of the background around it.
    """

    centres_px: np.ndarray
    diameters_px: np.ndarray
    peak_absorption: np.ndarray
    i0: float
    rejected_px: np.ndarray
    sigma_px: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def count(self) -> int:
        return int(self.centres_px.shape[0])


@dataclass(frozen=True, slots=True)
class MarkerMatch:
    """Detections assigned to a phantom's markers in one frame.

    Attributes
    ----------
    marker_px : (N, 2) array
        Measured ``(col, row)`` of each marker, NaN where it was not found.
    detection_index : (N,) int array
        Index into the detections, -1 where the marker was not found.
    found : (N,) bool array
    unmatched_detections : (K,) int array
        Detections no marker claimed (extra objects).
    affine : (2, 3) array
        Map from predicted to measured pixels, ``measured ~ A @ (col, row, 1)``.
    residual_px : float
        RMS distance between matched detections and the final model's
        predictions (affine, or the fitted projection when 3D points were given), px.
    """

    marker_px: np.ndarray
    detection_index: np.ndarray
    found: np.ndarray
    unmatched_detections: np.ndarray
    affine: np.ndarray
    residual_px: float

    @property
    def n_found(self) -> int:
        return int(np.count_nonzero(self.found))


def _checked_frame(frame, imager: str) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise DetectionError(f"imager '{imager}': a frame must be a 2D array of at least 8x8 pixels, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DetectionError(f"imager '{imager}': frame dtype must be integer or float, got {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DetectionError(f"imager '{imager}': frame holds non-finite pixels")
    if np.any(arr < 0):
        raise DetectionError(f"imager '{imager}': frame holds negative pixels (min {arr.min():g}); expected raw detector signal")
    return arr


def estimate_i0(frame, imager: str = "?") -> float:
    """Estimate the unattenuated signal of a BB-phantom frame.

    The BBs cover well under 1 % of the panel, so the median pixel is open
    field (or the phantom body, whose smooth attenuation the background
    subtraction removes anyway).

    Raises
    ------
    DetectionError
        If the median is not positive (a dark or empty frame).
    """
    arr = _checked_frame(frame, imager)
    i0 = float(np.median(arr))
    if not i0 > 0:
        raise DetectionError(f"imager '{imager}': cannot estimate i0: the median pixel is {i0:g} (dark frame?)")
    return i0


def line_integrals(frame, i0: float | None = None, imager: str = "?") -> tuple[np.ndarray, float]:
    """Convert a raw frame to line integrals ``-ln(I / i0)`` (dimensionless).

    Parameters
    ----------
    frame : (rows, cols) array
        Raw detector signal, more photons = larger value.
    i0 : float, optional
        Unattenuated signal; estimated with :func:`estimate_i0` when omitted.

    Returns
    -------
    line_integral : (rows, cols) float64 array
        Zero-count pixels are clamped to half a count.
    i0 : float
        The value used.
    """
    arr = _checked_frame(frame, imager)
    if i0 is None:
        i0 = estimate_i0(arr, imager)
    elif isinstance(i0, bool) or not isinstance(i0, (int, float, np.integer, np.floating)) or not math.isfinite(i0) or i0 <= 0:
        raise DetectionError(f"imager '{imager}': i0 must be a positive number, got {i0!r}")
    return -np.log(np.maximum(arr, 0.5) / float(i0)), float(i0)


def _disk(radius_px: float) -> np.ndarray:
    size = 2 * int(math.ceil(radius_px)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def repair_defects(raw: np.ndarray) -> np.ndarray:
    """Dead (0) and saturated (>= 65535) panel lines and isolated pixels, in-painted from their neighbours.

    A dead column through a BB would otherwise read as full absorption and pull
    its centroid. Defects are rows or columns of which more than half read 0
    (or saturate), and single such pixels with at most one such neighbour; a
    cluster of zeros (the shadow of an opaque BB in a scatter-free frame) is
    signal and left alone. In-painting: OpenCV Telea, radius 2 px. Frame units
    (counts), ``image[row, col]``.
    """
    out = raw
    for stuck in (raw <= 0.0, raw >= HOT_VALUE):
        if not np.any(stuck):
            continue
        bad = np.zeros_like(stuck)
        bad[np.mean(stuck, axis=1) > 0.5, :] = True
        bad[:, np.mean(stuck, axis=0) > 0.5] = True
        neighbours = cv2.filter2D(stuck.astype(np.float32), -1, np.ones((3, 3), np.float32),
                                  borderType=cv2.BORDER_CONSTANT) - stuck
        bad |= stuck & (neighbours <= 1.5)
        if np.any(bad) and not np.all(bad):
            out = cv2.inpaint(out.astype(np.float32), bad.astype(np.uint8), 2, cv2.INPAINT_TELEA).astype(np.float64)
    return out


def noise_correlation_factor(p: np.ndarray, bin_px: int = 3) -> float:
    """How much more a centroid moves than white noise of the same per-pixel level would make it: ``kappa >= 1``.

    Detector blur correlates neighbouring pixels' noise: the per-pixel spread
    shrinks while the noise of a sum over an area (a centroid) does not. With
    ``h`` the high-pass of the line integrals, ``kappa^2 = b^2 var(b x b means
    of h) / var(h)`` (robust MAD variances, ``b`` = ``bin_px``): 1 for white
    noise, ``~ sqrt(4 pi) sigma_blur`` for Gaussian blur. Dimensionless.
    """
    h = p - cv2.GaussianBlur(p.astype(np.float32), (0, 0), 4.0).astype(np.float64)
    rows, cols = h.shape
    b = int(bin_px)
    hb = h[: rows // b * b, : cols // b * b].reshape(rows // b, b, cols // b, b).mean(axis=(1, 3))

    def mad(a):
        return 1.4826 * float(np.median(np.abs(a - np.median(a))))

    v_pix, v_bin = mad(h), mad(hb)
    if not v_pix > 0:
        return 1.0
    return max(1.0, b * v_bin / v_pix)


def local_noise(q: np.ndarray, tile_px: int = 64) -> np.ndarray:
    """Robust local noise level of a zero-mean residual image, same units, ``(rows, cols)`` float32.

    The MAD (x 1.4826) of ``q`` in tiles of ``tile_px`` pixels, interpolated
    bilinearly between tile centres. Local, not whole-frame: behind a thick
    phantom body the quantum noise is several times the open field's.
    """
    rows, cols = q.shape
    t = max(8, int(tile_px))
    nr, nc = max(1, rows // t), max(1, cols // t)
    # Tiles cover the frame (the last row/column of tiles takes the remainder).
    r_edges = np.linspace(0, rows, nr + 1).astype(int)
    c_edges = np.linspace(0, cols, nc + 1).astype(int)
    grid = np.empty((nr, nc), np.float32)
    for i in range(nr):
        band = q[r_edges[i] : r_edges[i + 1]]
        for j in range(nc):
            tile = band[:, c_edges[j] : c_edges[j + 1]]
            grid[i, j] = 1.4826 * np.median(np.abs(tile - np.median(tile)))
    grid = np.maximum(grid, np.float32(max(float(np.median(grid)) * 0.05, 1e-6)))
    return cv2.resize(grid, (cols, rows), interpolation=cv2.INTER_LINEAR)


def detect_bbs(frame, *, diameter_px: float, i0: float | None = None, imager: str = "?",
               debias: bool = False, size_range_px: tuple[float, float] | None = None) -> DetectedBBs:
    """Find BBs in a raw kV frame with sub-pixel centres.

    Steps (``docs/CALIBRATION.md``): line integrals; matched-filter smoothing
    minus a morphological opening (removes the body's smooth projection);
    candidates are the local maxima of that residual above
    :data:`DETECTION_SIGMA` times the *local* noise (:func:`local_noise`) --
    maxima, not connected regions, so that a BB on a noisy ridge is never
    swallowed by a large region; then each candidate's centre is refined
    (:func:`_refine_centre`: absorbed-fraction centroid over a plane fitted
    to the background in an annulus) and checked for size and roundness.

    Parameters
    ----------
    frame : (rows, cols) array
        Raw detector signal (``uint16`` or float), ``image[row, col]``.
    diameter_px : float
        Expected diameter of a BB's shadow on the panel, px (BB diameter x
        magnification / pixel pitch).
    i0 : float, optional
        Unattenuated signal; estimated when omitted.
    imager : str
        Imager name, for messages.
    size_range_px : (float, float), optional
        Smallest and largest expected shadow diameter, px, when the BBs differ in size or depth (a phantom with
        1.5-3 mm BBs, or moved 300 mm along the imager's axis: +-14 % magnification). A detection is kept when its
        equivalent diameter lies within ``DIAMETER_RANGE`` of that span (default: of ``diameter_px`` alone).
    debias : bool
        Subtract each centre's modelled bias (:func:`_debiased`, ``bb_shadow``). Off by default: through the
        clinic chain it made the source position worse, not better (docs/BENCHMARKS.md, session 8).

    Returns
    -------
    DetectedBBs
        Centres in ``(col, row)`` pixels, sorted by row then column, with
        each centre's expected 1-sigma error (``sigma_px``) from the local noise.

    Raises
    ------
    DetectionError
        Bad frame, bad ``diameter_px`` or ``i0``.
    """
    if isinstance(diameter_px, bool) or not isinstance(diameter_px, (int, float, np.integer, np.floating)) or not (
        math.isfinite(diameter_px) and diameter_px > 0.5
    ):
        raise DetectionError(f"imager '{imager}': diameter_px must be a number above 0.5 px, got {diameter_px!r}")
    lo_px, hi_px = _size_range(diameter_px, size_range_px, imager)
    raw = repair_defects(_checked_frame(frame, imager))
    p, i0 = line_integrals(raw, i0, imager)
    radius = diameter_px / 2.0
    sigma = max(0.5, radius / 2.0)
    smooth = cv2.GaussianBlur(p.astype(np.float32), (0, 0), sigma)
    background = cv2.morphologyEx(smooth, cv2.MORPH_OPEN, _disk(2.0 * radius + 3.0))
    q = smooth - background
    # Noise of the matched-filtered image, from a *symmetric* high-pass of it (smooth minus a 3x wider Gaussian,
    # rescaled to the smoothed image's own level): q = smooth - opening is one-sided (>= 0, the opening rides
    # the noise's troughs) and its MAD reads several times too low, which let thousands of noise maxima pass
    # the threshold and pushed real BBs behind thick material out of the candidate list (issue 13).
    noise = local_noise(smooth - cv2.GaussianBlur(smooth, (0, 0), 3.0 * sigma)) / _DOG_NOISE_FRACTION
    kappa = noise_correlation_factor(p)
    ratio = q / noise
    peak = (q >= cv2.dilate(q, _disk(max(radius, 1.5)))) & (ratio > DETECTION_SIGMA) & (q > 1e-3)
    pr, pc = np.nonzero(peak)
    order = np.argsort(-ratio[pr, pc])[:MAX_CANDIDATES]
    rows, cols = raw.shape
    r_win = radius + _WINDOW_MARGIN_PX
    half = int(math.ceil(r_win + 4.0))
    centres, diams, peaks, sigmas, rejected = [], [], [], [], []
    for k in order:
        c = np.array([pc[k], pr[k]], dtype=np.float64)
        if centres and np.min(np.linalg.norm(np.asarray(centres) - c, axis=1)) < max(radius, 1.5) + 1.0:
            continue  # another maximum of a BB already measured
        if c[0] - half < 0 or c[1] - half < 0 or c[0] + half >= cols or c[1] + half >= rows:
            rejected.append(c)  # cut by the panel edge: its centroid would be biased
            continue
        result = _refine_centre(raw, c, r_win, half)
        if result is None:
            rejected.append(c)
            continue
        c, area, pk, sig, elong = result
        d_eq = 2.0 * math.sqrt(max(area, 0.0) / math.pi)
        if not (DIAMETER_RANGE[0] * lo_px <= d_eq <= DIAMETER_RANGE[1] * hi_px) or elong > MAX_ELONGATION:
            rejected.append(c)
            continue
        if centres and np.min(np.linalg.norm(np.asarray(centres) - c, axis=1)) < max(radius, 1.5):
            continue
        if debias:
            c = _debiased(raw, c, radius, r_win, half)
        centres.append(c)
        diams.append(d_eq)
        peaks.append(pk)
        sigmas.append(sig * kappa)
    order = np.lexsort((np.array([c[0] for c in centres]), np.array([c[1] for c in centres]))) if centres else []
    centres_arr = np.array(centres, dtype=np.float64).reshape(-1, 2)[order]
    return DetectedBBs(
        _readonly(centres_arr),
        _readonly(np.array(diams)[order] if centres else np.zeros(0)),
        _readonly(np.array(peaks)[order] if centres else np.zeros(0)),
        float(i0),
        _readonly(np.array(rejected, dtype=np.float64).reshape(-1, 2)),
        _readonly(np.array(sigmas)[order] if centres else np.zeros(0)),
    )


def _size_range(diameter_px: float, size_range_px, imager: str) -> tuple[float, float]:
    """Checked ``(smallest, largest)`` expected shadow diameter, px; ``(diameter_px, diameter_px)`` when not given."""
    if size_range_px is None:
        return float(diameter_px), float(diameter_px)
    try:
        lo, hi = (float(v) for v in size_range_px)
    except (TypeError, ValueError):
        raise DetectionError(f"imager '{imager}': size_range_px must be two numbers (px), got {size_range_px!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.5 < lo <= hi):
        raise DetectionError(f"imager '{imager}': size_range_px must be finite, above 0.5 px and ordered, "
                             f"got {size_range_px!r}")
    return lo, hi


def refine_centres(frame, centres_px, diameters_px, *, i0: float | None = None, imager: str = "?",
                   debias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Re-measure BB centres with each BB's own expected shadow diameter.

    :func:`detect_bbs` sizes its centroid window for one diameter; a phantom
    with BBs of several sizes needs each window sized to its BB, or a 3 mm
    BB's penumbra spills into the background annulus of a window made for
    2 mm and tilts the fitted plane (0.03-0.07 px, issue 13).

    Parameters
    ----------
    frame : (rows, cols) array
        Raw detector signal, ``image[row, col]``.
    centres_px : (K, 2) array
        Starting ``(col, row)`` centres, px.
    diameters_px : (K,) array
        Each BB's expected shadow diameter on the panel, px.
    i0 : float, optional
        Only validated (the centroid uses the absorbed fraction, independent of i0).
    debias : bool
        As in :func:`detect_bbs`.

    Returns
    -------
    centres_px : (K, 2) array
        Refined ``(col, row)``; NaN where the window ran off the panel or the
        centre drifted away (the caller keeps its first estimate or drops the BB).
    sigma_px : (K,) array
        Expected 1-sigma per axis, px (times the frame's noise-correlation factor); NaN where not refined.
    """
    raw = repair_defects(_checked_frame(frame, imager))
    if i0 is not None:
        line_integrals(raw[:8, :8], i0, imager)  # validates i0 only
    kappa = noise_correlation_factor(-np.log(np.maximum(raw, 0.5)))
    seeds = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    diams = np.asarray(diameters_px, dtype=np.float64).reshape(-1)
    out = np.full_like(seeds, np.nan)
    sig = np.full(len(seeds), np.nan)
    for k, (c, d) in enumerate(zip(seeds, diams)):
        if not (np.all(np.isfinite(c)) and math.isfinite(d) and d > 0.5):
            continue
        r_win = d / 2.0 + _WINDOW_MARGIN_PX
        half = int(math.ceil(r_win + 4.0))
        res = _refine_centre(raw, c, r_win, half)
        if res is not None:
            out[k], sig[k] = (_debiased(raw, res[0], d / 2.0, r_win, half) if debias else res[0]), res[3] * kappa
    return out, sig


def _plane_background(patch: np.ndarray, xx: np.ndarray, yy: np.ndarray, ring: np.ndarray):
    """Least-squares plane ``a + b x + c y`` through the ring's pixels, two rounds of 3-sigma clipping.

    Returns the plane evaluated on the patch and the robust RMS of the ring's residuals (counts)."""
    x, y, v = xx[ring], yy[ring], patch[ring]
    x0, y0 = float(x.mean()), float(y.mean())
    a = np.stack([np.ones_like(x), x - x0, y - y0], axis=1)
    keep = np.ones(len(v), bool)
    coef = np.zeros(3)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep], v[keep], rcond=None)
        res = v - a @ coef
        s = 1.4826 * float(np.median(np.abs(res[keep])))
        new_keep = np.abs(res) <= 3.0 * max(s, 1e-12)
        if np.count_nonzero(new_keep) < 10 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    rms = float(np.std(res[keep]))
    return coef[0] + coef[1] * (xx - x0) + coef[2] * (yy - y0), rms


def _refine_centre(raw: np.ndarray, seed: np.ndarray, r_win: float, half: int):
    """Iterated absorbed-fraction centroid over a plane-fitted local background; None if it drifts off.

    Returns ``(centre (col, row), absorbed area px^2, peak absorbed fraction,
    centre 1-sigma px, elongation)``. The background ``I_bg`` is a plane fitted
    (least squares, clipped) to an annulus around the window, so a sloped
    background (a PMMA wedge, heel effect, scatter) leaves the absorbed
    fraction ``1 - I / I_bg`` symmetric about the BB: no bias towards the
    thicker side, unlike a constant ring median. The centre's sigma follows
    from the ring's residual RMS ``s``: per pixel ``s_w = s / I_bg``, and
    ``var(c_x) = s_w^2 sum (x - c_x)^2 / W^2`` over the window (``W`` the
    absorbed area). The elongation is the square root of the ratio of the
    absorption-weighted second moments' eigenvalues (1 for a round BB).
    """
    c = seed.copy()
    for _ in range(_MAX_RECENTRE):
        ci, ri = int(round(c[0])), int(round(c[1]))
        if ci - half < 0 or ri - half < 0 or ci + half >= raw.shape[1] or ri + half >= raw.shape[0]:
            return None
        patch = raw[ri - half : ri + half + 1, ci - half : ci + half + 1]
        yy, xx = np.mgrid[ri - half : ri + half + 1, ci - half : ci + half + 1].astype(np.float64)
        r2 = (xx - c[0]) ** 2 + (yy - c[1]) ** 2
        ring = (r2 > (r_win + 1.0) ** 2) & (r2 <= (r_win + 4.0) ** 2)
        i_bg, ring_rms = _plane_background(patch, xx, yy, ring)
        inside = r2 <= r_win**2
        bg_in = i_bg[inside]
        if not np.all(bg_in > 0):
            return None
        w = 1.0 - patch[inside] / bg_in
        total = float(w.sum())
        if not total > 0:
            return None
        new = np.array([float(w @ xx[inside]), float(w @ yy[inside])]) / total
        moved = float(np.linalg.norm(new - c))
        c = new
        if moved < _RECENTRE_TOL_PX:
            break
        if np.linalg.norm(c - seed) > r_win:
            return None
    dx, dy = xx[inside] - c[0], yy[inside] - c[1]
    s_w = ring_rms / float(np.mean(bg_in))
    sigma = s_w * math.sqrt(float(np.mean([dx @ dx, dy @ dy]))) / total
    wp = np.clip(w, 0.0, None)
    m = np.array([[wp @ (dx * dx), wp @ (dx * dy)], [wp @ (dx * dy), wp @ (dy * dy)]]) / max(float(wp.sum()), 1e-12)
    ev = np.linalg.eigvalsh(m)
    elong = math.sqrt(ev[1] / ev[0]) if ev[0] > 0 else math.inf
    return c, total, float(w.max()), sigma, elong


def _debiased(raw: np.ndarray, centre_px: np.ndarray, radius_px: float, r_win: float, half: int) -> np.ndarray:
    """The windowed centroid ``centre_px`` less its own bias on the BB's fitted shadow model (``bb_shadow``).

    The model (sphere x plane, Gaussian blur, constant scatter) is fitted to the pixels out to the background
    annulus' outer radius; the same centroid (:func:`_refine_centre`, same window) is run on the noise-free
    model, and its offset from the model's centre is subtracted. Blur on a sloped background, scatter
    dilution and the window's truncation of the penumbra so cancel. Where the fit fails (patch off the panel,
    no convergence) or its centre strays further than the BB's radius, the centroid is returned unchanged.
    """
    fit = fit_shadow(raw, centre_px, radius_px, r_win + 4.0)
    if fit is None or np.linalg.norm(fit.centre_px - centre_px) > max(radius_px, 1.0):
        return centre_px
    margin = half + 3
    ci, ri = int(round(centre_px[0])), int(round(centre_px[1]))
    size = 2 * margin + 1
    model = render_shadow(fit, ci - margin, ri - margin, size, size)
    offset = np.array([ci - margin, ri - margin], dtype=np.float64)
    res = _refine_centre(model, centre_px - offset, r_win, half)
    if res is None:
        return centre_px
    bias = res[0] + offset - fit.centre_px
    return centre_px - bias


def _normaliser(pts: np.ndarray) -> np.ndarray:
    dim = pts.shape[1]
    mean = pts.mean(axis=0)
    scale = math.sqrt(dim) / float(np.mean(np.linalg.norm(pts - mean, axis=1)))
    t = np.eye(dim + 1)
    t[:dim, :dim] *= scale
    t[:dim, dim] = -scale * mean
    return t


def _dlt(points_mm: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Normalised DLT (Hartley & Zisserman alg. 7.1): 3x4 matrix from room points to (col, row)."""
    t3, t2 = _normaliser(points_mm), _normaliser(pixels)
    xh = np.hstack([points_mm, np.ones((len(points_mm), 1))]) @ t3.T
    uh = np.hstack([pixels, np.ones((len(pixels), 1))]) @ t2.T
    rows = []
    for xw, (uu, vv, _) in zip(xh, uh):
        rows.append(np.concatenate([xw, np.zeros(4), -uu * xw]))
        rows.append(np.concatenate([np.zeros(4), xw, -vv * xw]))
    _, _, vt = np.linalg.svd(np.asarray(rows))
    p_norm = vt[-1].reshape(3, 4)
    return np.linalg.inv(t2) @ p_norm @ t3


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return sol.T  # (2, 3)


def _apply_affine(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ aff[:, :2].T + aff[:, 2]


def _mutual_nearest(mapped: np.ndarray, det: np.ndarray, gate_px: float) -> np.ndarray:
    d = np.linalg.norm(mapped[:, None] - det[None], axis=-1)
    best_det = np.argmin(d, axis=1)
    best_pred = np.argmin(d, axis=0)
    idx = np.full(len(mapped), -1, dtype=np.int64)
    for j, i in enumerate(best_det):
        if best_pred[i] == j and d[j, i] <= gate_px:
            idx[j] = i
    return idx


def match_markers(
    detected_px,
    predicted_px,
    *,
    gate_px: float,
    search_px: float,
    points_mm=None,
    imager: str = "?",
    marker_names: tuple[str, ...] | None = None,
    max_missing: int | None = None,
) -> MarkerMatch:
    """Assign detected blobs to the phantom's markers.

    Parameters
    ----------
    detected_px : (M, 2) array
        Detected ``(col, row)`` centres.
    predicted_px : (N, 2) array
        The markers projected through the nominal geometry, ``(col, row)``.
    gate_px : float
        Largest distance between a detection and its affine-mapped prediction
        at the end, px. Keep it below half the smallest distance between two
        predictions so that an assignment cannot be ambiguous.
    search_px : float
        Largest translation between predicted and measured points to try, px
        (how far the true geometry may be from the nominal).
    points_mm : (N, 3) array, optional
        The markers' room positions (mm) as predicted. When given, the last
        rounds replace the affine model by a projection matrix fitted (DLT)
        to the markers matched so far, which follows a phantom rotated out
        of plane exactly where an affine map cannot.
    imager : str
        For messages.
    marker_names : tuple of str, optional
        For messages.
    max_missing : int, optional
        Raise :class:`MarkerCountError` if more markers than this are not found.

    Returns
    -------
    MarkerMatch

    Raises
    ------
    MarkerCountError
        Fewer than three markers matched, or more than ``max_missing`` missing.
    """
    det = np.asarray(detected_px, dtype=np.float64).reshape(-1, 2)
    pred = np.asarray(predicted_px, dtype=np.float64).reshape(-1, 2)
    n = len(pred)
    names = marker_names or tuple(str(i) for i in range(n))
    if len(det) < 3:
        raise MarkerCountError(f"imager '{imager}': found {len(det)} BB-like blobs, the phantom has {n} markers")
    # Coarse stage: every (detection, prediction) pair proposes a translation.
    hyp = (det[:, None, :] - pred[None, :, :]).reshape(-1, 2)
    hyp = hyp[np.linalg.norm(hyp, axis=1) <= search_px]
    if len(hyp) == 0:
        raise MarkerCountError(
            f"imager '{imager}': no detection within {search_px:.1f} px of any predicted marker"
        )
    coarse_gate = 2.0 * gate_px
    moved = pred[None, :, :] + hyp[:, None, :]  # (H, N, 2)
    dist = np.min(np.linalg.norm(moved[:, :, None, :] - det[None, None, :, :], axis=-1), axis=2)  # (H, N)
    score = np.sum(dist <= coarse_gate, axis=1) - np.sum(np.minimum(dist, coarse_gate), axis=1) / (coarse_gate * n + 1.0)
    aff = np.hstack([np.eye(2), hyp[int(np.argmax(score))][:, None]])
    idx = np.full(n, -1, dtype=np.int64)
    for gate in (coarse_gate, 1.5 * gate_px, gate_px, gate_px):
        idx = _mutual_nearest(_apply_affine(aff, pred), det, gate)
        ok = idx >= 0
        if np.count_nonzero(ok) >= 3:
            aff = _fit_affine(pred[ok], det[idx[ok]])
    mapped = _apply_affine(aff, pred)
    if points_mm is not None:
        pts = np.asarray(points_mm, dtype=np.float64).reshape(n, 3)
        for _ in range(2):
            ok = idx >= 0
            if np.count_nonzero(ok) < 6:
                break
            p = _dlt(pts[ok], det[idx[ok]])
            h = pts @ p[:, :3].T + p[:, 3]
            mapped = h[:, :2] / h[:, 2:3]
            idx = _mutual_nearest(mapped, det, gate_px)
    found = idx >= 0
    if np.count_nonzero(found) < 3:
        raise MarkerCountError(
            f"imager '{imager}': only {np.count_nonzero(found)} of {n} markers could be matched to the "
            f"{len(det)} detections (were the images given for the right imager?)"
        )
    marker_px = np.full((n, 2), np.nan)
    marker_px[found] = det[idx[found]]
    resid = np.linalg.norm(mapped[found] - marker_px[found], axis=1)
    missing = [names[j] for j in np.flatnonzero(~found)]
    if max_missing is not None and len(missing) > max_missing:
        raise MarkerCountError(
            f"{'BB ' if len(missing) == 1 else 'BBs '}{', '.join(missing)} not found in imager {imager}: "
            f"imager '{imager}': found {n - len(missing)} of the phantom's {n} markers, at most {max_missing} "
            f"may be missing ({len(det)} blobs detected)"
        )
    unmatched = np.setdiff1d(np.arange(len(det)), idx[found])
    return MarkerMatch(
        _readonly(marker_px),
        _readonly(idx, np.int64),
        _readonly(found, bool),
        _readonly(unmatched, np.int64),
        _readonly(aff),
        float(math.sqrt(np.mean(resid**2))),
    )
