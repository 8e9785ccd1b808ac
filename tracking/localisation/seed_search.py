"""Faint gold seeds: matched-filter candidates under local background and noise models, and their sub-pixel centres.

The clean-frame detector (:mod:`spineguide.tracking.localisation.detection`) thresholds each frame
on its own, which fails where scatter, a low dose and a panel's gain pattern
leave a seed a quarter of its clean contrast. Here a frame only proposes
*candidates*; which of them are seeds is decided jointly over both views by
the planned constellation and the epipolar geometry
(:func:`spineguide.tracking.localisation.fiducials.localise_fiducials`). Method, on the flat-field
corrected signal (:mod:`spineguide.tracking.localisation.flatfield`):

1. **Log and bin**: line integrals ``L = -ln(I / i0)`` of a copy binned so a
   seed stays >= 1.5 binned pixels wide.
2. **Local background**: a Gaussian of the seed's half-width, then a
   morphological opening with a disc wider than the seed (bone edges, ramps
   of heel and scatter, the skin line pass; a seed does not), reconstructed
   under the image. The top-hat is the seed's contrast over its background.
3. **Matched filter for shape and orientation**: the top-hat averaged along
   line segments of the seed's projected length at ``N`` orientations; the
   largest response and its orientation per pixel.
4. **Local noise model**: the response's median and robust sigma (MAD) in
   blocks of about 15 mm, bilinearly interpolated: quantum noise behind bone,
   scatter, heel and dose set the significance where the seed is.
5. **Candidates**: local maxima of the standardised response above
   ``min_snr`` (lower than a stand-alone detector could afford), strongest
   first.
6. **Sub-pixel centre** (full resolution, :func:`refine_seeds`): the
   window's top-hat (line integrals minus the largest of their openings by
   line segments longer than the seed) fitted by a
   plane plus a blurred oriented box, from four start orientations; the
   per-seed SNR is the fitted amplitude over its standard error.

All positions ``(col, row)`` panel pixels, pixel centres at integers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from spineguide.calibration.geometry import ImagerGeometry

from ..errors import FrameError
from ._kernels import fit_seeds_lm
from .detection import Detection, DetectionConfig, line_integrals, seed_size_px

__all__ = ["ResponseMap", "SeedCandidates", "faint_candidates", "refine_seeds", "response_map"]

_MAD_TO_SIGMA = 1.4826
_ORIENTATIONS = 12  # 15 degree steps: a 10-pixel segment turns by one pixel at its end
_BLOCK_MM = 15.0  # noise blocks, mm at the isocentre
_FILTER_LENGTH_FRACTION = 0.6  # of the longest seed: foreshortened and shorter seeds still fill the segment
_FIT_BLUR_PX = 0.8  # panel blur (~0.5-0.7 px) with the pixel's own width (0.29 px rms) and the seed's round edge


@dataclass(frozen=True, slots=True)
class SeedCandidates:
    """Whole-frame candidates of one frame, strongest first.

    Attributes
    ----------
    centres_px : (K, 2) array
        ``(col, row)`` full-resolution pixels (to about one binned pixel).
    snr : (K,) array
        Standardised matched-filter response.
    orientation_deg : (K,) array
        Orientation of the best segment, from +col towards +row, [0, 180).
    contrast : (K,) array
        Top-hat line integral at the candidate (ln units).
    """

    centres_px: np.ndarray
    snr: np.ndarray
    orientation_deg: np.ndarray
    contrast: np.ndarray


@functools.lru_cache(maxsize=32)
def _segment_kernels(length_px: float, n: int) -> tuple[np.ndarray, ...]:
    """Normalised line-segment kernels (sum 1) at ``n`` orientations, anti-aliased by supersampling."""
    half = int(math.ceil(length_px / 2.0)) + 1
    size = 2 * half + 1
    out = []
    for k in range(n):
        ang = math.pi * k / n
        ker = np.zeros((size, size), np.float32)
        samples = np.linspace(-length_px / 2.0, length_px / 2.0, max(8, int(4 * length_px)))
        for s in samples:
            x, y = half + s * math.cos(ang), half + s * math.sin(ang)
            x0, y0 = int(math.floor(x)), int(math.floor(y))
            fx, fy = x - x0, y - y0
            ker[y0, x0] += (1 - fx) * (1 - fy)
            ker[y0, x0 + 1] += fx * (1 - fy)
            ker[y0 + 1, x0] += (1 - fx) * fy
            ker[y0 + 1, x0 + 1] += fx * fy
        ker /= ker.sum()
        ker.setflags(write=False)
        out.append(ker)
    return tuple(out)


def _block_stats(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median and robust sigma of ``x`` from blocks of ``block`` pixels (at most the image), interpolated."""
    rows, cols = x.shape
    br, bc = min(block, rows), min(block, cols)
    nb_r, nb_c = rows // br, cols // bc
    crop = x[: nb_r * br, : nb_c * bc].reshape(nb_r, br, nb_c, bc).transpose(0, 2, 1, 3)
    flat = crop.reshape(nb_r, nb_c, -1)
    med = np.median(flat, axis=2)
    mad = np.median(np.abs(flat - med[..., None]), axis=2)
    sigma = np.maximum(_MAD_TO_SIGMA * mad, 1e-6).astype(np.float32)
    med = med.astype(np.float32)
    # Block centres at (block - 1) / 2 + i * block; cv2.resize with INTER_LINEAR maps pixel centres alike.
    med_full = cv2.resize(med, (nb_c * bc, nb_r * br), interpolation=cv2.INTER_LINEAR)
    sig_full = cv2.resize(sigma, (nb_c * bc, nb_r * br), interpolation=cv2.INTER_LINEAR)
    if (nb_r * br, nb_c * bc) != (rows, cols):
        pad = ((0, rows - nb_r * br), (0, cols - nb_c * bc))
        med_full = np.pad(med_full, pad, mode="edge")
        sig_full = np.pad(sig_full, pad, mode="edge")
    return med_full, sig_full


def _binning(imager: ImagerGeometry, config: DetectionConfig) -> int:
    diameter = seed_size_px(imager, config).diameter_px - 1.0
    return int(max(1, min(4, math.floor(diameter / 1.5))))


@dataclass(frozen=True, slots=True)
class ResponseMap:
    """Standardised matched-filter response of one frame region, on a binned grid.

    Attributes
    ----------
    snr : (rb, cb) float32 array
        Response over the local noise model (dimensionless), binned pixels ``[row, col]``.
    orientation_deg : (rb, cb) float32 array
        Orientation of the best segment, degrees from +col towards +row, [0, 180).
    contrast : (rb, cb) float32 array
        Top-hat line integral (ln units).
    binning : int
        Full-resolution pixels per binned pixel.
    row0, col0 : int
        Full-resolution pixel of the region's first row and column.
    """

    snr: np.ndarray
    orientation_deg: np.ndarray
    contrast: np.ndarray
    binning: int
    row0: int
    col0: int

    def to_map(self, px: np.ndarray) -> np.ndarray:
        """Full-resolution ``(col, row)`` pixels -> binned map ``(col, row)`` (pixel centres at integers)."""
        px = np.asarray(px, dtype=np.float64)
        b = self.binning
        half = (b - 1) / 2.0
        return np.stack([(px[..., 0] - self.col0 - half) / b, (px[..., 1] - self.row0 - half) / b], axis=-1)

    def to_full(self, map_px: np.ndarray) -> np.ndarray:
        """Binned map ``(col, row)`` -> full-resolution ``(col, row)`` pixels."""
        map_px = np.asarray(map_px, dtype=np.float64)
        b = self.binning
        half = (b - 1) / 2.0
        return np.stack([self.col0 + map_px[..., 0] * b + half, self.row0 + map_px[..., 1] * b + half], axis=-1)


def response_map(signal: np.ndarray, imager: ImagerGeometry, i0: float, config: DetectionConfig,
                 defects: np.ndarray | None = None,
                 region: tuple[int, int, int, int] | None = None) -> ResponseMap | None:
    """Matched-filter response of a (flat-field corrected) frame over its local noise (steps 1-4 above).

    Parameters as :func:`faint_candidates`. Returns None when the region is
    smaller than four binned pixels either way.
    """
    b = _binning(imager, config)
    r_off = c_off = 0
    img = np.asarray(signal, dtype=np.float32)
    if region is not None:
        r_off, r1, c_off, c1 = (int(v) for v in region)
        img = img[r_off:r1, c_off:c1]
        defects = None if defects is None else defects[r_off:r1, c_off:c1]
    rows, cols = img.shape
    if rows < 4 * b or cols < 4 * b:
        return None
    if defects is not None and defects.any():
        img = _fill_defects(img, defects)
    rb, cb = rows // b, cols // b
    binned = img[: rb * b, : cb * b]
    if b > 1:
        binned = cv2.resize(binned, (cb, rb), interpolation=cv2.INTER_AREA)
    lint = line_integrals(binned, i0, config.intensity_floor)
    size = seed_size_px(imager, config, b)
    smooth = cv2.GaussianBlur(lint, (0, 0), max(0.5, 0.5 * size.diameter_px), borderType=cv2.BORDER_REPLICATE)
    element = 2 * int(math.ceil((size.diameter_px + 2.0) / 2.0)) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (element, element))
    # A plain opening (no reconstruction under the image): on a noisy frame a
    # reconstruction gives the noise back too, and the noise model needs it.
    background = cv2.morphologyEx(smooth, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_REPLICATE)
    top = smooth - background
    seg_len = max(2.0, _FILTER_LENGTH_FRACTION * (size.length_px - 1.0 / b))
    best = np.full(top.shape, -np.inf, np.float32)
    best_k = np.zeros(top.shape, np.int8)
    for k, ker in enumerate(_segment_kernels(round(seg_len, 1), _ORIENTATIONS)):
        resp = cv2.filter2D(top, -1, ker, borderType=cv2.BORDER_REPLICATE)
        # End-stopped: a seed ends, a ridge (cortical rim seen edge-on, rib border) goes on. The
        # response one seed length further along the segment, either way, is taken off.
        ang = math.pi * k / _ORIENTATIONS
        step = 0.5 * (size.length_px + seg_len)
        dc, dr = int(round(step * math.cos(ang))), int(round(step * math.sin(ang)))
        flank = np.maximum(_shifted(resp, dr, dc), _shifted(resp, -dr, -dc))
        resp = resp - np.maximum(flank, np.float32(0.0))
        better = resp > best
        best[better] = resp[better]
        best_k[better] = k
    mm_per_px = float(np.min(imager.pixel_spacing_mm)) * b / imager.magnification
    block = max(8, int(round(_BLOCK_MM / mm_per_px)))
    # Noise model: quantum noise of a line integral is 1/sqrt(photons), so the
    # response's sigma is c / sqrt(I) with one constant c per frame, taken as
    # the median over blocks of the blocks' robust sigma times sqrt(mean I).
    local_i = np.maximum(cv2.GaussianBlur(binned, (0, 0), 2.0 * size.length_px, borderType=cv2.BORDER_REPLICATE),
                         np.float32(config.intensity_floor))
    med, sigma = _block_stats(best, block)
    hb, wb = best.shape
    scale = np.median((sigma * np.sqrt(local_i))[min(block, hb) // 2::block, min(block, wb) // 2::block])
    snr = ((best - med) / (np.float32(scale) / np.sqrt(local_i))).astype(np.float32)
    orient = ((180.0 / _ORIENTATIONS) * best_k).astype(np.float32)
    return ResponseMap(snr, orient, top.astype(np.float32), b, r_off, c_off)


def faint_candidates(signal: np.ndarray, imager: ImagerGeometry, i0: float, config: DetectionConfig,
                     min_snr: float, max_candidates: int, defects: np.ndarray | None = None,
                     region: tuple[int, int, int, int] | None = None) -> SeedCandidates:
    """Seed candidates of a whole (flat-field corrected) frame: matched filter over local noise.

    Parameters
    ----------
    signal : (rows, cols) float32 array
        Corrected detector signal of ``imager`` (more photons = larger), ``[row, col]``.
    imager : ImagerGeometry
        Sets the seed size in pixels (magnification, pitch).
    i0 : float
        Unattenuated level, counts (only shifts ``L``).
    config : DetectionConfig
        Marker size (mm).
    min_snr : float
        Standardised response needed.
    max_candidates : int
        Most candidates returned.
    defects : (rows, cols) bool array, optional
        Known defective pixels (dead lines), filled before analysis.
    region : (r0, r1, c0, c1), optional
        Only this part of the frame (rows ``r0:r1``, columns ``c0:c1``) is searched.

    Returns
    -------
    SeedCandidates
        Centres in whole-frame pixels.
    """
    rmap = response_map(signal, imager, i0, config, defects, region)
    if rmap is None:
        empty = np.zeros(0)
        return SeedCandidates(np.zeros((0, 2)), empty, empty, empty)
    b = rmap.binning
    size = seed_size_px(imager, config, b)
    seg_len = max(2.0, _FILTER_LENGTH_FRACTION * (size.length_px - 1.0 / b))
    snr = rmap.snr
    # Local maxima within half a seed length, above the threshold.
    reach = max(1, int(round(0.5 * seg_len)))
    dil = cv2.dilate(snr, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1)))
    peak = (snr >= dil) & (snr >= min_snr)
    pr, pc = np.nonzero(peak)
    values = snr[pr, pc]
    order = np.argsort(-values, kind="stable")[: max_candidates]
    pr, pc = pr[order], pc[order]
    centres = rmap.to_full(np.stack([pc, pr], axis=1).astype(np.float64)).reshape(-1, 2)
    orient = rmap.orientation_deg[pr, pc].astype(np.float64)
    return SeedCandidates(centres, snr[pr, pc].astype(np.float64), orient, rmap.contrast[pr, pc].astype(np.float64))


def _shifted(x: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``out[r, c] = x[r + dr, c + dc]``, borders replicated."""
    rows, cols = x.shape
    ri = np.clip(np.arange(rows) + dr, 0, rows - 1)
    ci = np.clip(np.arange(cols) + dc, 0, cols - 1)
    return x[ri[:, None], ci[None, :]]


def _fill_defects(img: np.ndarray, defects: np.ndarray) -> np.ndarray:
    """Defective pixels replaced by the mean of their nearest good neighbours along rows and columns."""
    if defects.shape != img.shape:
        raise FrameError(f"defect mask {defects.shape} does not match the frame {img.shape}")
    good = (~defects).astype(np.float32)
    data = img * good
    k = np.ones((5, 5), np.float32)
    num = cv2.filter2D(data, -1, k, borderType=cv2.BORDER_REFLECT)
    den = cv2.filter2D(good, -1, k, borderType=cv2.BORDER_REFLECT)
    out = img.copy()
    fill = defects & (den > 0)
    out[fill] = num[fill] / den[fill]
    return out


_MAX_HALF_LENGTH = 2.0  # fitted half-length bound, times the start value (0.8 x the longest seed's)
_RIDGE_FRACTION = 0.95  # a fit this close to the bound is longer than any seed
_LM_ITERATIONS = 30


def _fit_windows(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]], half_len: float,
                 half_wid: float, blur_px: float, starts: int) -> list[tuple[np.ndarray, np.ndarray, float] | None]:
    """Levenberg-Marquardt fits of a plane plus a blurred oriented box to the line integrals of each window.

    ``windows[i] = (x, y, data, angle)``: pixel offsets from the start
    position (px), the line integrals there (ln units) and the start
    orientation (degrees from +col towards +row). Parameters ``(dcol, drow,
    theta, half_length, amplitude, b0, b1, b2)`` (px, px, rad, px, ln units,
    plane), analytic Jacobian; each window is fitted from ``starts``
    orientations ``180 / starts`` degrees apart (the given one first) and
    keeps the fit with the smallest residual sigma (the first on a tie). All
    fits run in one parallel numba call
    (:func:`spineguide.tracking.localisation._kernels.fit_seeds_lm`); the
    half-width is the seed's projected radius, the start background and peak
    the window's (:func:`_start_levels`). Returns per window the
    parameters, their standard errors and the residual sigma, or None.
    """
    if not windows:
        return []
    sizes = np.array([len(w[0]) for w in windows])
    bounds = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    x = np.concatenate([w[0] for w in windows]).astype(np.float64)
    y = np.concatenate([w[1] for w in windows]).astype(np.float64)
    data = np.concatenate([w[2] for w in windows]).astype(np.float64)
    p0 = np.empty((len(windows) * starts, 8))
    for i, (_, _, d, angle) in enumerate(windows):
        bg0, top = _start_levels(d)  # the same for every start orientation
        for k in range(starts):
            p0[i * starts + k] = (0.0, 0.0, math.radians(angle + 180.0 * k / starts), half_len,
                                  max(top - bg0, 0.05), bg0, 0.0, 0.0)
    n = len(windows)
    ok, p, se, sigma = fit_seeds_lm(x, y, data, bounds, np.repeat(np.arange(n), starts).astype(np.int64), p0,
                                    float(half_wid), float(blur_px), 0.3 * half_len, _MAX_HALF_LENGTH * half_len,
                                    6.0, _LM_ITERATIONS)
    out: list[tuple[np.ndarray, np.ndarray, float] | None] = []
    for i in range(n):
        best = None
        for j in range(i * starts, (i + 1) * starts):
            if ok[j] and (best is None or sigma[j] < sigma[best]):
                best = j
        out.append(None if best is None else (p[best].copy(), se[best].copy(), float(sigma[best])))
    return out


def _start_levels(data: np.ndarray) -> tuple[float, float]:
    """The box fit's start background (median) and peak (99th percentile) of a window's data.

    Exactly ``np.median`` and ``np.percentile(data, 99)`` (linear interpolation, numpy's own lerp), from one
    partial sort: 9x faster on a fit window (tests/tracking/test_seed_fit.py).
    """
    n = data.size
    virtual = 0.99 * (n - 1)
    lo = int(math.floor(virtual))
    hi = min(lo + 1, n - 1)
    gamma = virtual - lo
    m0, m1 = (n - 1) // 2, n // 2
    part = np.partition(data, sorted({m0, m1, lo, hi}))
    median = part[m0] if m0 == m1 else (part[m0] + part[m1]) / 2
    a, b = part[lo], part[hi]
    diff = b - a
    top = b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma
    return float(median), float(top)


_FIT_STARTS = 4  # start orientations of the box fit, 45 degrees apart (the first the given one)
_BACKGROUND_LINES = 8  # orientations of the background's line openings (22.5 degrees apart)
_LINE_FACTOR = 1.5  # background line length over the longest seed's projected length
_PRE_SMOOTH_PX = 0.7  # Gaussian under the local opening: noise would bias an opening of raw pixels low


@functools.lru_cache(maxsize=16)
def _line_elements(length_px: int, n: int) -> tuple[np.ndarray, ...]:
    """``n`` one-pixel-wide line structuring elements of ``length_px`` (odd) pixels, 180/n degrees apart."""
    half = length_px // 2
    out = []
    for k in range(n):
        a = math.pi * k / n
        dx, dy = half * math.cos(a), half * math.sin(a)
        el = np.zeros((length_px, length_px), np.uint8)
        cv2.line(el, (int(round(half - dx)), int(round(half - dy))), (int(round(half + dx)), int(round(half + dy))), 1)
        out.append(el)
    return tuple(out)


def _window_tophat(signal: np.ndarray, i0: float, box: tuple[int, int, int, int], line_px: int,
                   intensity_floor: float, defects: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Line integrals of ``signal[r0:r1, c0:c1]`` minus their local background, and the usable pixels.

    The background is the largest of the openings of the lightly smoothed
    line integrals by line segments of ``line_px`` pixels (longer than any
    seed's shadow) at ``_BACKGROUND_LINES`` orientations: a segment fits
    inside a bone edge, a ramp, a rib border or a cortical ridge seen edge-on
    along its direction (they stay in the background, also where a seed lies
    on them), never inside a seed. Defective pixels are filled from their
    neighbours before the openings and left out of the fit.
    Returns ``(top_hat, good)``, both ``(r1 - r0, c1 - c0)``, ln units.
    """
    r0, r1, c0, c1 = box
    win = np.asarray(signal[r0:r1, c0:c1], dtype=np.float32)
    good = win > 0
    if defects is not None:
        good &= ~defects[r0:r1, c0:c1]
    lw = line_integrals(win, i0, intensity_floor)
    if not good.all():
        lw = _fill_defects(lw, ~good)
    smooth = cv2.GaussianBlur(lw, (0, 0), _PRE_SMOOTH_PX, borderType=cv2.BORDER_REPLICATE)
    background = None
    for el in _line_elements(line_px, _BACKGROUND_LINES):
        opened = cv2.morphologyEx(smooth, cv2.MORPH_OPEN, el, borderType=cv2.BORDER_REPLICATE)
        background = opened if background is None else np.maximum(background, opened)
    return (lw - background).astype(np.float64), good


def refine_seeds(signal: np.ndarray, imager: ImagerGeometry, i0: float, centres_px: np.ndarray,
                 orientation_deg: np.ndarray, config: DetectionConfig, min_snr: float,
                 defects: np.ndarray | None = None, starts: int = _FIT_STARTS) -> tuple[Detection | None, ...]:
    """Full-resolution sub-pixel centres of seeds near given positions (one per position, None if not a seed).

    In a window around each start position, the seed's contrast over its
    local background (a morphological top-hat: the line integrals minus
    the largest of their openings by line segments longer than the seed,
    so that a bone edge, a rib border or a cortical ridge next to or under
    the seed cannot pull the fit; :func:`_window_tophat`) is fitted (least
    squares) by a plane plus an oriented box of the seed's projected width,
    blurred by the panel's blur, with free centre, orientation, length and
    amplitude: the matched filter's own estimate, whose centre along the
    seed is set by its two ends rather than by the noise of every pixel
    inside it (as a weighted centroid would be). The fit starts from
    ``_FIT_STARTS`` orientations (the given one first, then 45 degree
    steps) and keeps the one with the smallest residual: one start can
    settle in a local optimum on a neighbouring structure. ``starts=1``
    trusts the given orientation (a refit of a seed already fitted).

    Parameters
    ----------
    signal : (rows, cols) float32 array
        Corrected detector signal, ``[row, col]``.
    imager : ImagerGeometry
    i0 : float
    centres_px : (K, 2) array
        Start positions ``(col, row)`` (to a few pixels).
    orientation_deg : (K,) array
        Start orientations, degrees from +col towards +row.
    config : DetectionConfig
    min_snr : float
        Fitted amplitude over its standard error needed for a detection.
    defects : (rows, cols) bool array, optional
        Pixels left out of the fit.
    starts : int
        Start orientations, ``180 / starts`` degrees apart.

    Returns
    -------
    tuple of Detection or None
        ``Detection.contrast`` the fitted amplitude (ln units over the local
        background), ``snr`` the amplitude over its standard error,
        ``confidence`` ``1 - min_snr / snr``.
    """
    size = seed_size_px(imager, config)
    rows, cols = signal.shape
    half_len = 0.5 * (size.length_px - 1.0)
    half_wid = 0.5 * (size.diameter_px - 1.0)
    reach = int(math.ceil(half_len + 6))
    line_px = 2 * int(math.ceil(0.5 * _LINE_FACTOR * size.length_px)) + 1
    pad = line_px // 2 + 1  # the openings need half a line around the fitted window
    # The fit windows first (their top-hats: OpenCV), then every fit of every window in one parallel call.
    windows: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []
    placed: list[tuple[int, float, float, int] | None] = []  # per position: (window, col, row, usable pixels)
    for (c, r), ang in zip(np.asarray(centres_px, float), np.asarray(orientation_deg, float)):
        ic, ir = int(round(c)), int(round(r))
        ra, rb_ = max(0, ir - reach), min(rows, ir + reach + 1)
        ca, cb_ = max(0, ic - reach), min(cols, ic + reach + 1)
        placed.append(None)
        if rb_ - ra >= 8 and cb_ - ca >= 8:
            pa, pb = max(0, ra - pad), min(rows, rb_ + pad)
            qa, qb = max(0, ca - pad), min(cols, cb_ + pad)
            top, good_all = _window_tophat(signal, i0, (pa, pb, qa, qb), line_px, config.intensity_floor,
                                           defects)
            top = top[ra - pa:rb_ - pa, ca - qa:cb_ - qa]
            good = good_all[ra - pa:rb_ - pa, ca - qa:cb_ - qa]
            if good.sum() > 30:
                yy, xx = np.mgrid[ra:rb_, ca:cb_].astype(np.float64)
                placed[-1] = (len(windows), float(c), float(r), int(good.sum()))
                windows.append((xx[good] - c, yy[good] - r, top[good], float(ang)))
    fitted = _fit_windows(windows, 0.8 * half_len, half_wid, _FIT_BLUR_PX, starts)
    out: list[Detection | None] = []
    for where in placed:
        det = None
        fit = None if where is None else fitted[where[0]]
        if fit is not None:
            _, c, r, usable = where
            p, se, _ = fit
            p[0] += c
            p[1] += r
            snr = float(p[4] / se[4]) if se[4] > 0 else 0.0
            inside = 0 <= p[0] <= cols - 1 and 0 <= p[1] <= rows - 1
            # A fit that wants to be longer than the longest seed is a ridge (rib border, cortical rim).
            ridge = p[3] >= _RIDGE_FRACTION * _MAX_HALF_LENGTH * 0.8 * half_len
            if snr >= min_snr and inside and not ridge and math.hypot(p[0] - c, p[1] - r) <= reach:
                theta = float(p[2])
                det = Detection(
                    imager.name, (float(p[0]), float(p[1])), float(p[4]), snr, 2.0 * float(p[3]),
                    2.0 * half_wid, math.degrees(theta) % 180.0, usable,
                    max(0.0, 1.0 - min_snr / snr),
                )
        out.append(det)
    return tuple(out)
