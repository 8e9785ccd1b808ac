"""Gold-seed and marker detection in raw kV frames (panel pixels, ``(col, row)``).

Method (see ``docs/FIDUCIALS.md``):

1. **Log conversion**: ``L = -ln(I / i0)`` with ``I`` clipped below at
   ``intensity_floor`` (an opaque gold core can record zero photons). ``i0``
   is given or estimated as a high percentile of the frame; since every later
   step works on differences of ``L``, ``i0`` only shifts ``L`` by a constant
   and a rough estimate costs no accuracy.
2. **Isolated defects** (dead, hot, stuck pixels): a pixel more than
   ``defect_ratio`` times darker than the darkest, or brighter than the
   brightest, of its 8 neighbours is replaced by their median. A seed covers
   more than one pixel, so it never trips this test. A calibrated defect map
   (lines, clusters) can be given and is inpainted.
3. **Background suppression**: a morphological top-hat of ``L``: opening
   with a disc just wider than the projected seed diameter, then a partial
   reconstruction by dilation under ``L``. An opening preserves steps and
   ramps exactly, so bone edges, the skin line and saturated regions give no
   response, while anything narrower than the disc (a seed at any in-plane
   orientation, a sphere) is kept whole; the reconstruction fills back bone
   corners the disc cannot reach.
4. **Matched smoothing and thresholds**: a Gaussian of the seed's width, then
   components peaking above ``min_snr`` times the robust (MAD) noise of the
   window (scaled for quantum noise behind bone in the binned search);
   size and shape limits derived from the seed size in pixels (diameter and
   length times the imager magnification over the pixel pitch) reject ridges,
   defect lines and noise.
5. **Sub-pixel centre**: centroid of the component weighted by the
   transmission deficit ``1 - exp(-T)`` of the background-subtracted line
   integral ``T`` (linear in the covered area for an opaque seed, hence free
   of pixel-phase bias).

Whole-frame search runs steps 3-4 on a binned copy of the frame (bins of
``search_binning`` pixels, chosen so a seed stays >= 2 binned pixels wide)
and refines each candidate at full resolution in a small window; tracking mode
runs the full-resolution analysis only in windows around predicted positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from spineguide.calibration.foundation import checked_number
from spineguide.calibration.geometry import ImagerGeometry

from ..errors import FrameError
from ._kernels import (
    analyse_windows,
    gather_windows,
    isolated_outliers,
    reconstruct_under,
    snr_peaks,
)

__all__ = [
    "Detection",
    "DetectionConfig",
    "SeedSizePx",
    "detect_seeds",
    "detect_seeds_in_frames",
    "estimate_i0",
    "line_integrals",
    "seed_size_px",
]

_MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution per median absolute deviation
_HYSTERESIS_SNR = 2.5  # support of a detection: matched-filter SNR above this, around a peak above min_snr
_RELATIVE_CUT = 0.35  # support pixels below this fraction of the highest SNR within a seed length are not the marker


@dataclass(frozen=True, slots=True)
class DetectionConfig:
    """Seed-detection parameters (sizes in mm at the isocentre plane, contrasts in ln units).

    Attributes
    ----------
    marker_diameter_mm : float
        Diameter of a cylindrical seed or of a spherical marker, mm.
    marker_length_mm : float
        Longest marker extent, mm (seed length; equal to the diameter for spheres).
    min_snr : float
        Peak of the matched-filtered top-hat over the robust noise of its
        window needed for a detection.
    min_contrast : float
        Peak background-subtracted line integral (ln units, full resolution)
        needed for a detection; gold seeds give far more, bone ridges less.
    defect_ratio : float
        Factor by which an isolated pixel must fall outside its 8 neighbours'
        range to count as a defect (e: one unit of line integral).
    intensity_floor : float
        Lowest detector value used in the log (counts), so zero-count pixels stay finite.
    search_binning : int or None
        Bin size for whole-frame search; None derives it from the seed size.
    tracking_window_mm : float
        Half-size (mm at the isocentre) of the search window around each
        predicted position in tracking mode; the largest seed movement between
        prediction and frame that is still found.
    max_detections : int
        Most detections returned per frame (the most confident).
    min_relative_contrast : float
        Fraction of the frame's strongest contrast (among candidates in the
        coarse search, among accepted detections at full resolution) that a
        candidate or detection needs. Gold seeds of one patient share their
        contrast (it is set by their diameter and gold's attenuation, not by
        the anatomy behind them); thin cortical ridges seen edge-on (vertebral
        endplates, rib borders) and photon-starved noise reach a third of it
        at most. A ratio, not a floor, so it scales with scatter, which
        compresses every contrast alike.
    """

    marker_diameter_mm: float = 1.0
    marker_length_mm: float = 5.0
    min_snr: float = 8.0
    min_contrast: float = 0.15
    defect_ratio: float = math.e
    intensity_floor: float = 0.5
    search_binning: int | None = None
    tracking_window_mm: float = 5.0
    max_detections: int = 12
    min_relative_contrast: float = 0.4

    def __post_init__(self) -> None:
        for name in ("marker_diameter_mm", "marker_length_mm", "min_snr", "min_contrast", "intensity_floor",
                     "tracking_window_mm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise FrameError(f"detection config: {name} must be a positive finite number, got {value!r}")
        if self.marker_length_mm < self.marker_diameter_mm:
            raise FrameError(
                f"detection config: marker_length_mm ({self.marker_length_mm}) is shorter than "
                f"marker_diameter_mm ({self.marker_diameter_mm})"
            )
        if not (isinstance(self.defect_ratio, (int, float)) and self.defect_ratio > 1):
            raise FrameError(f"detection config: defect_ratio must be > 1, got {self.defect_ratio!r}")
        b = self.search_binning
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise FrameError(f"detection config: search_binning must be a positive integer or None, got {b!r}")
        r = self.min_relative_contrast
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise FrameError(f"detection config: min_relative_contrast must be in [0, 1), got {r!r}")
        m = self.max_detections
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise FrameError(f"detection config: max_detections must be a positive integer, got {m!r}")


@dataclass(frozen=True, slots=True)
class SeedSizePx:
    """Projected marker size on one imager's panel, pixels (at the isocentre magnification)."""

    diameter_px: float
    length_px: float
    element_px: int  # side of the top-hat structuring element (odd)
    sigma_px: float  # matched smoothing Gaussian
    window_half_px: int  # half-size of a refinement window around a candidate


def seed_size_px(imager: ImagerGeometry, config: DetectionConfig, binning: int = 1) -> SeedSizePx:
    """Marker size in (binned) panel pixels: mm x magnification / pixel pitch.

    The detector blur of a real panel (about one pixel) is added to the diameter.
    """
    pitch_mm = float(np.min(imager.pixel_spacing_mm)) * binning
    mag = imager.magnification
    diameter = config.marker_diameter_mm * mag / pitch_mm + 1.0 / binning
    length = config.marker_length_mm * mag / pitch_mm + 1.0 / binning
    element = 2 * math.ceil((diameter + 2.0) / 2.0) + 1
    sigma = max(0.5, 0.35 * diameter)
    half = math.ceil(0.6 * length + element + 3)
    return SeedSizePx(diameter, length, element, sigma, half)


@dataclass(frozen=True, slots=True)
class Detection:
    """One marker found in one frame.

    Attributes
    ----------
    imager : str
    centre_px : (2,) array
        Sub-pixel centre ``(col, row)``, pixel centres at integers.
    contrast : float
        Peak background-subtracted line integral, ln units (``-ln`` of the
        transmission through the marker relative to its surroundings).
    snr : float
        Peak of the matched-filtered top-hat over the window's robust noise.
    length_px, width_px : float
        Extent along and across the marker's major axis, pixels (4 sigma of the
        intensity-weighted second moments).
    orientation_deg : float
        Angle of the major axis from +col towards +row, degrees in [0, 180).
    area_px : int
        Pixels in the marker's support.
    confidence : float
        0..1: ``(1 - min_snr / snr)`` times how well the size matches a
        marker (1 inside the expected size, falling towards the limits).
    """

    imager: str
    centre_px: np.ndarray
    contrast: float
    snr: float
    length_px: float
    width_px: float
    orientation_deg: float
    area_px: int
    confidence: float

    def __post_init__(self) -> None:
        c = np.array(self.centre_px, dtype=np.float64)
        if c.shape != (2,) or not np.all(np.isfinite(c)):
            raise FrameError(f"imager '{self.imager}': detection centre must be 2 finite numbers, got {c.tolist()}")
        c.setflags(write=False)
        object.__setattr__(self, "centre_px", c)


# ---------------------------------------------------------------------------- frames
def _check_frame(frame: np.ndarray, imager: ImagerGeometry) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"imager '{imager.name}': frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype not in (np.uint16, np.float32):
        raise FrameError(f"imager '{imager.name}': frame dtype must be uint16 or float32, got {frame.dtype}")
    if frame.shape != (imager.rows, imager.cols):
        raise FrameError(
            f"imager '{imager.name}': frame is {frame.shape[0] if frame.ndim else 0}x"
            f"{frame.shape[1] if frame.ndim > 1 else 0} (shape {frame.shape}), "
            f"the imager has {imager.rows}x{imager.cols} (rows x cols)"
        )
    if frame.dtype == np.float32:
        finite = np.isfinite(frame)
        if not finite.all():
            bad = np.argwhere(~finite)
            r, c = bad[0]
            raise FrameError(
                f"imager '{imager.name}': frame holds {len(bad)} non-finite pixels "
                f"(first at row {r}, col {c}: {frame[r, c]})"
            )
    return frame


def _check_i0(i0: float, name: str) -> float:
    return checked_number(i0, FrameError, f"imager '{name}': i0 must be a positive finite number, got {i0!r}",
                          minimum=0.0, exclusive_minimum=True)


def estimate_i0(frame: np.ndarray, name: str = "?") -> float:
    """Estimate the unattenuated level of a frame: 99.5th percentile of a 1-in-16 pixel sample.

    The bright tail of a kV frame is the unattenuated (or least attenuated)
    region; a percentile ignores the few hot pixels. Where no pixel is
    unattenuated the estimate is too low, which only shifts every line
    integral by the same constant (seed detection uses differences).

    Raises
    ------
    FrameError
        If the estimate is not positive (an all-dark frame).
    """
    sample = np.asarray(frame)[::4, ::4]
    value = float(np.percentile(sample, 99.5))
    if not math.isfinite(value) or value <= 0:
        raise FrameError(f"imager '{name}': cannot estimate i0: frame has no positive signal (99.5% level {value})")
    return value


def line_integrals(frame: np.ndarray, i0: float, intensity_floor: float = 0.5) -> np.ndarray:
    """Line integrals ``-ln(I / i0)`` of a raw frame (float32, same shape, ln units).

    ``I`` is clipped below at ``intensity_floor`` (counts) so that zero-count
    pixels (opaque gold, dead pixels) stay finite.
    """
    i0 = _check_i0(i0, "?")
    img = np.maximum(np.asarray(frame, dtype=np.float32), np.float32(intensity_floor))
    out = cv2.log(img)
    np.subtract(np.float32(math.log(i0)), out, out=out)
    return out


# ---------------------------------------------------------------------------- analysis
def _repair_defects(raw: np.ndarray, ratio: float) -> np.ndarray:
    """Replace isolated outlier pixels by the median of their 8 neighbours (float32 image, same units)."""
    bad, count = isolated_outliers(raw, np.float32(ratio))
    if count == 0:
        return raw
    out = raw.copy()
    rows, cols = np.nonzero(bad)
    pad = np.pad(raw, 1, mode="reflect")
    offs = [(dr, dc) for dr in (0, 1, 2) for dc in (0, 1, 2) if (dr, dc) != (1, 1)]
    neigh = np.stack([pad[rows + dr, cols + dc] for dr, dc in offs], axis=1)
    out[rows, cols] = np.median(neigh, axis=1)
    return out


def _noise(smooth: np.ndarray) -> tuple[float, float]:
    """Median and robust sigma (MAD) of a matched-filtered top-hat.

    Large images are sampled on a regular grid (1 in 4 above 4096 pixels, 1
    in 16 above 65536): thousands of samples fix a median to well under 1%.
    """
    step = 4 if smooth.size > 65536 else 2 if smooth.size > 4096 else 1
    sample = smooth[::step, ::step]
    med = float(np.median(sample))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(sample - med)))
    return med, max(sigma, 1e-6)


@dataclass(frozen=True, slots=True)
class _Window:
    """A full-resolution analysis window: frame index and pixel bounds ``[r0, r1) x [c0, c1)``."""

    frame: int
    r0: int
    r1: int
    c0: int
    c1: int


@functools.lru_cache(maxsize=16)
def _disc_half_widths(element_px: int) -> np.ndarray:
    """Half-width of each row of OpenCV's elliptic structuring element of side ``element_px`` (pixels).

    An ellipse's rows are runs centred on the middle column, so the disc is
    fully described by one half-width per row (read-only int64 array).
    """
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (element_px, element_px))
    mid = element_px // 2
    half = []
    for row in disc:
        cols = np.flatnonzero(row)
        a = mid - int(cols[0])
        if len(cols) != 2 * a + 1 or int(cols[-1]) != mid + a:
            raise FrameError(f"structuring element of {element_px} px has a row that is not a centred run")
        half.append(a)
    out = np.array(half, np.int64)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=16)
def _gaussian_taps(sigma_px: float) -> np.ndarray:
    """The float32 taps OpenCV's ``GaussianBlur(..., (0, 0), sigma_px)`` uses on a float32 image (px)."""
    ksize = int(np.rint(sigma_px * 8.0 + 1.0)) | 1
    taps = cv2.getGaussianKernel(ksize, sigma_px, cv2.CV_32F).ravel().copy()
    taps.setflags(write=False)
    return taps


_NO_KEEP = np.zeros((0, 0, 0), bool)
_NO_KEEP.setflags(write=False)
_INPAINT_RADIUS_PX = 2  # Telea's neighbourhood for calibrated defects (lines, clusters)


def _measure_windows(
    frames: list[np.ndarray],
    i0s: list[float],
    names: list[str],
    masks: list[np.ndarray | None],
    windows: list[_Window],
    size: SeedSizePx,
    cfg: DetectionConfig,
) -> list[list[Detection]]:
    """Full-resolution analysis of many windows at once; detections per frame, centres in frame pixels.

    Each window is copied into a tile of one stack (isolated defects
    repaired, calibrated ones inpainted), the stack is log-converted in one
    vectorised call, and one numba kernel (``analyse_windows``) runs steps
    3-5 of the method on every tile as an image of its own (replicated
    borders), returning the weighted moments of each significant component;
    the windows of several frames share the calls. A component touching its
    window's border is cut, and left to another window.
    """
    out: list[list[Detection]] = [[] for _ in frames]
    n = len(windows)
    if n == 0:
        return out
    bounds = np.array([(w.frame, w.r0, w.r1, w.c0, w.c1) for w in windows], np.int64)
    heights = bounds[:, 2] - bounds[:, 1]
    widths = bounds[:, 4] - bounds[:, 3]
    half_widths = _disc_half_widths(size.element_px)
    taps = _gaussian_taps(size.sigma_px)
    reach = math.ceil(size.length_px / 2.0)
    # Wider than every filter's reach, so each filter finds its input's replicated border in place.
    pad = max(len(half_widths) // 2, len(taps) // 2, reach) + 2
    stack = np.empty((n, int(heights.max()) + 2 * pad, int(widths.max()) + 2 * pad), np.float32)
    masked = [k for k, w in enumerate(windows) if masks[w.frame] is not None]
    keep = _NO_KEEP
    if masked:
        keep = np.zeros((n, int(heights.max()), int(widths.max())), bool)
        for k in masked:
            w = windows[k]
            keep[k, : heights[k], : widths[k]] = masks[w.frame][w.r0:w.r1, w.c0:w.c1]
    ratio = np.float32(cfg.defect_ratio)
    for f in sorted({w.frame for w in windows}):
        sel = np.flatnonzero(bounds[:, 0] == f)
        gather_windows(frames[f], bounds[sel, 1], bounds[sel, 3], heights[sel], widths[sel], sel, pad, stack, ratio,
                       keep)
    for k in masked:
        # Calibrated defect lines and clusters: neighbours may be defects too, so inpaint (each window alone).
        h, wd = int(heights[k]), int(widths[k])
        image = stack[k, pad:pad + h, pad:pad + wd]
        mask = cv2.copyMakeBorder(keep[k, :h, :wd].astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        filled = cv2.inpaint(cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE), mask,
                             _INPAINT_RADIUS_PX, cv2.INPAINT_TELEA)[pad:pad + h, pad:pad + wd]
        rows, cols = stack.shape[1:]
        stack[k] = cv2.copyMakeBorder(filled, pad, rows - pad - h, pad, cols - pad - wd, cv2.BORDER_REPLICATE)
    flat = stack.reshape(-1, stack.shape[2])
    np.maximum(flat, np.float32(cfg.intensity_floor), out=flat)
    cv2.log(flat, flat)
    log_i0 = np.array([math.log(i0s[w.frame]) for w in windows], np.float32)
    stats = analyse_windows(
        stack, pad, log_i0, heights, widths, half_widths, size.element_px // 2 + 1, taps, reach,
        np.float32(_HYSTERESIS_SNR), np.float32(_RELATIVE_CUT), float(cfg.min_snr),
    )
    stats = stats[stats[:, 2] > 0]
    if len(stats) == 0:
        return out
    tile_of = stats[:, 0].astype(np.int64)
    pk, sw, sx, sy, sxx, syy, sxy, area, contrast = stats[:, 1:].T
    cx, cy = sx / sw, sy / sw
    cxy = sxy / sw - cx * cy
    cov = np.stack([np.stack([sxx / sw - cx * cx, cxy], -1), np.stack([cxy, syy / sw - cy * cy], -1)], -2)
    evals, evecs = np.linalg.eigh(cov)
    width = 4.0 * np.sqrt(np.maximum(evals[:, 0], 0.0))
    length = 4.0 * np.sqrt(np.maximum(evals[:, 1], 0.0))
    max_len = 1.5 * size.length_px + 3.0
    max_wid = 1.5 * size.diameter_px + 3.0
    ok = (contrast >= cfg.min_contrast) & (length <= max_len) & (width <= max_wid)
    for q in np.flatnonzero(ok):
        win = windows[tile_of[q]]
        snr_q = float(pk[q])
        angle = math.degrees(math.atan2(evecs[q, 1, 1], evecs[q, 0, 1])) % 180.0
        lq = float(length[q])
        size_term = min(1.0, 2.0 - lq / (0.5 * max_len + 0.5 * size.length_px)) if lq > size.length_px else 1.0
        confidence = max(0.0, 1.0 - cfg.min_snr / snr_q) * max(0.0, size_term)
        out[win.frame].append(Detection(
            names[win.frame], (win.c0 + cx[q], win.r0 + cy[q]), float(contrast[q]), snr_q, lq, float(width[q]),
            angle, int(area[q]), confidence,
        ))
    return out


def _coarse_candidates(frame: np.ndarray, i0: float, full: SeedSizePx, imager: ImagerGeometry,
                       config: DetectionConfig) -> np.ndarray:
    """``(col, row)`` full-resolution centres of whole-frame seed candidates, strongest first."""
    b = config.search_binning
    if b is None:
        # The marker's own diameter (without the blur allowance) spans at
        # least two binned pixels, so a small sphere survives binning.
        b = int(max(1, min(4, math.floor((full.diameter_px - 1.0) / 2.0))))
    coarse = seed_size_px(imager, config, b)
    rows, cols = frame.shape
    rb, cb = rows // b, cols // b
    crop = frame[: rb * b, : cb * b]
    # INTER_AREA with an integer factor is the exact bin mean.
    if b == 1:
        # Unbinned, an isolated defect (or the defect test's clipping of a
        # one-pixel-wide seed core) would set the frame's contrast scale
        # differently from the full-resolution analysis: repair as it does.
        binned = _repair_defects(crop.astype(np.float32), config.defect_ratio)
    else:
        binned = cv2.resize(crop, (cb, rb), interpolation=cv2.INTER_AREA).astype(np.float32)
    lint = line_integrals(binned, i0, config.intensity_floor)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (coarse.element_px, coarse.element_px))
    opened = cv2.morphologyEx(lint, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_REPLICATE)
    background = reconstruct_under(opened, lint, coarse.element_px // 2 + 1)
    smooth = cv2.GaussianBlur(lint - background, (0, 0), coarse.sigma_px, borderType=cv2.BORDER_REPLICATE)
    med, sigma = _noise(smooth)
    # Quantum noise in a line integral grows as 1/sqrt(photons): scale the
    # frame's robust noise by the local background transmission, so the
    # darker region behind bone is judged against its own, larger noise.
    # Candidates: local maxima significant against the local noise and
    # reaching the contrast floor (faint ridges such as cortical rims can be
    # significant in a large binned pixel but are far below any seed).
    bg_med = np.float32(np.median(background[::4, ::4]))
    local_sigma = np.exp(np.float32(0.5) * (background - bg_med))
    local_sigma *= np.float32(sigma)
    snr = smooth - np.float32(med)
    snr /= local_sigma
    rows, cols, contrast = snr_peaks(snr, lint, opened, float(config.min_snr), float(config.min_contrast))
    # Rank by contrast, gold's own signature: ridges and starved noise can be
    # as significant as a seed, but never as dense.
    strong = contrast >= config.min_relative_contrast * (contrast.max() if len(contrast) else 0.0)
    rows, cols, contrast = rows[strong], cols[strong], contrast[strong]
    order = np.argsort(-contrast, kind="stable")[: 4 * config.max_detections]
    pos = np.stack([cols[order], rows[order]], axis=1).astype(np.float64).reshape(-1, 2)
    return _suppress(pos * b + (b - 1) / 2.0, 0.5 * full.length_px)


def _dedupe(dets: list[Detection], radius_px: float) -> list[Detection]:
    dets = sorted(dets, key=lambda d: -d.snr)
    kept: list[Detection] = []
    for d in dets:
        if all(np.hypot(*(d.centre_px - k.centre_px)) > radius_px for k in kept):
            kept.append(d)
    return kept


def _suppress(points_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Drop points within ``radius_px`` of an earlier (stronger) one."""
    kept: list[np.ndarray] = []
    for p in points_px:
        if all(np.hypot(*(p - k)) > radius_px for k in kept):
            kept.append(p)
    return np.array(kept).reshape(-1, 2)


def _window(centre_col_row, half: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    c, r = int(round(centre_col_row[0])), int(round(centre_col_row[1]))
    return max(0, r - half), min(rows, r + half + 1), max(0, c - half), min(cols, c + half + 1)


def detect_seeds(
    frame: np.ndarray,
    imager: ImagerGeometry,
    i0: float | None = None,
    predicted_px: np.ndarray | None = None,
    config: DetectionConfig = DetectionConfig(),
    defect_mask: np.ndarray | None = None,
) -> tuple[Detection, ...]:
    """Find gold seeds / markers in one raw kV frame.

    Parameters
    ----------
    frame : (rows, cols) uint16 or float32 array
        Raw detector signal of ``imager`` (more photons = larger value),
        indexed ``frame[row, col]``.
    imager : ImagerGeometry
        Sets the expected frame size and, with its magnification and pixel
        pitch, the marker size in pixels.
    i0 : float, optional
        Unattenuated level (same units as the frame); estimated when omitted
        (:func:`estimate_i0`).
    predicted_px : (K, 2) array, optional
        Predicted ``(col, row)`` of the markers (tracking mode): only windows of
        ``config.tracking_window_mm`` around them are searched. Omitted: the
        whole frame is searched.
    config : DetectionConfig
    defect_mask : (rows, cols) bool array, optional
        Known defective pixels (calibration defect map), inpainted before analysis.

    Returns
    -------
    tuple of Detection
        Most confident first, at most ``config.max_detections``.

    Raises
    ------
    FrameError
        Wrong dtype or size for the imager, non-finite pixels, a bad or
        unestimable ``i0``, bad predictions or defect mask.
    """
    name = imager.name
    found = detect_seeds_in_frames(
        {name: frame}, {name: imager}, {name: i0}, None if predicted_px is None else {name: predicted_px}, config,
        None if defect_mask is None else {name: defect_mask},
    )
    return found[name]


def detect_seeds_in_frames(
    frames: Mapping[str, np.ndarray],
    imagers: Mapping[str, ImagerGeometry],
    i0: Mapping[str, float | None] | None = None,
    predicted_px: Mapping[str, np.ndarray | None] | None = None,
    config: DetectionConfig = DetectionConfig(),
    defect_masks: Mapping[str, np.ndarray | None] | None = None,
) -> dict[str, tuple[Detection, ...]]:
    """:func:`detect_seeds` on several frames at once (e.g. a stereo pair), sharing one full-resolution pass.

    Each frame is searched as :func:`detect_seeds` would search it alone
    (whole frame, or windows around its ``predicted_px``); the
    full-resolution windows of all frames are analysed together, which
    removes per-window overhead.

    Parameters
    ----------
    frames : mapping key -> (rows, cols) uint16 or float32 array
        Raw frames, ``frame[row, col]``.
    imagers : mapping key -> ImagerGeometry
        The imager of each frame (same keys).
    i0 : mapping key -> float or None, optional
        Unattenuated level per frame; missing or None: estimated.
    predicted_px : mapping key -> (K, 2) array or None, optional
        Predicted ``(col, row)`` per frame (tracking); missing or None: whole frame.
    config : DetectionConfig
    defect_masks : mapping key -> (rows, cols) bool array or None, optional

    Returns
    -------
    dict key -> tuple of Detection
        Per frame, most confident first, at most ``config.max_detections``.

    Raises
    ------
    FrameError
        As :func:`detect_seeds`, naming the imager.
    """
    keys = list(frames)
    i0 = i0 or {}
    predicted_px = predicted_px or {}
    defect_masks = defect_masks or {}
    raws, i0s, names, masks, sizes = [], [], [], [], []
    box_lists: list = []
    searches: list = []
    for f, key in enumerate(keys):
        try:
            imager = imagers[key]
        except KeyError as err:
            raise FrameError(f"frame '{key}': no imager given for it ({err})") from err
        name = imager.name
        frame = _check_frame(frames[key], imager)
        value = i0.get(key)
        level = _check_i0(value, name) if value is not None else estimate_i0(frame, name)
        mask = defect_masks.get(key)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != frame.shape or mask.dtype != bool:
                raise FrameError(
                    f"imager '{name}': defect mask must be a bool array of the frame's shape {frame.shape}, "
                    f"got {mask.dtype} {mask.shape}"
                )
            if not mask.any():
                mask = None
        full = seed_size_px(imager, config)
        rows, cols = frame.shape
        pred = predicted_px.get(key)
        if pred is not None:
            pred = np.atleast_2d(np.asarray(pred, dtype=np.float64))
            if pred.ndim != 2 or pred.shape[1] != 2 or not np.all(np.isfinite(pred)):
                raise FrameError(
                    f"imager '{name}': predicted positions must be finite (K, 2) (col, row), got {pred.shape}"
                )
            mag = imager.magnification / float(np.min(imager.pixel_spacing_mm))
            half = math.ceil(config.tracking_window_mm * mag + full.window_half_px)
            centres = np.rint(pred[imager.contains(pred, -half)]).astype(np.int64)  # half to even, as round()
            boxes = [(max(0, r - half), min(rows, r + half + 1), max(0, c - half), min(cols, c + half + 1))
                     for c, r in centres.tolist()]
        else:
            boxes = None  # whole-frame search, below
            searches.append((f, frame, level, full, imager))
        box_lists.append(boxes)
        raws.append(frame)
        i0s.append(level)
        names.append(name)
        masks.append(mask)
        sizes.append(full)
    # The whole-frame searches of several frames run concurrently: OpenCV and
    # the numba kernels release the GIL.
    if len(searches) > 1:
        with ThreadPoolExecutor(max_workers=len(searches)) as pool:
            centres = list(pool.map(lambda job: _coarse_candidates(*job[1:], config), searches))
    else:
        centres = [_coarse_candidates(*job[1:], config) for job in searches]
    for (f, frame, _, full, _), cen in zip(searches, centres):
        box_lists[f] = [_window(c, full.window_half_px, *frame.shape) for c in cen]
    windows: dict[SeedSizePx, list[_Window]] = {}
    for f, boxes in enumerate(box_lists):
        windows.setdefault(sizes[f], []).extend(_Window(f, *box) for box in boxes)
    found: list[list[Detection]] = [[] for _ in keys]
    for size, group in windows.items():
        for f, dets in enumerate(_measure_windows(raws, i0s, names, masks, group, size, config)):
            found[f].extend(dets)
    out = {}
    for f, key in enumerate(keys):
        kept = _dedupe(found[f], max(2.0, sizes[f].diameter_px))
        if kept:
            floor = config.min_relative_contrast * max(d.contrast for d in kept)
            kept = [d for d in kept if d.contrast >= floor]
        kept.sort(key=lambda d: -d.confidence)
        out[key] = tuple(kept[: config.max_detections])
    return out
