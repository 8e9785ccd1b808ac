"""kV frames for display: downsampled, contrast-windowed, with the fiducial overlays, encoded by OpenCV.

The displayed frame is the raw detector signal (bone dark, CONVENTIONS),
windowed between its 1st and 99th percentiles and shrunk with area
averaging to at most ``display_pixels`` on its longer side. Overlays are
drawn in display pixels; every coordinate given is a full-resolution
``(col, row)`` pixel of the imager (pixel centres at integers).

Overlay marks:

- planned projection of each seed at perfect setup: green cross;
- detected seed (``correction/1`` quality ``seeds[].pixels_px``): yellow circle;
- residual: red line from the seed's projection at the estimated pose to
  the detection, magnified by ``residual_gain`` (a 0.3 px residual is
  invisible at display scale otherwise; the gain is drawn in the corner).
- anatomy method: the edges of the target's DRR at the estimated pose, in
  cyan (:func:`drr_edges`): where they sit on the vertebra's own edges, the
  registration found it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import FrameError

__all__ = ["DisplayFrame", "SeedOverlay", "AnatomyOverlay", "render_frame", "seed_overlays", "window_levels",
           "drr_edges"]

#: Residual vectors are drawn this many times their length.
RESIDUAL_GAIN = 10.0
#: Percentiles of the display window (robust to the dark seeds and bright air).
WINDOW_PERCENTILES = (1.0, 99.0)

_GREEN = (0, 200, 0)
_YELLOW = (0, 220, 255)
_RED = (40, 40, 255)
_CYAN = (255, 220, 0)


@dataclass(frozen=True, slots=True)
class AnatomyOverlay:
    """The anatomy method's plan for display: the target's attenuation (room frame) and the imagers.

    ``volume`` is a :class:`spineguide.registration.drr.AttenuationVolume` cropped to the
    registration ROI; ``geometry`` the stereo geometry (room frame, mm).
    """

    volume: object
    geometry: object


def drr_edges(overlay: AnatomyOverlay, imager_name: str, pose, shape_px: tuple[int, int]) -> np.ndarray:
    """Edges of the target's DRR at a patient pose, as a ``shape_px`` (rows, cols) bool mask of display pixels.

    The DRR is computed with the panel binned to about the display size (a
    few milliseconds for a vertebra ROI), normalised and passed through
    OpenCV's Canny detector, then resized to the display frame.
    """
    from spineguide.registration.drr import compute_drr

    imager = overlay.geometry[imager_name]
    rows, cols = shape_px
    binning = max(1, int(round(imager.cols / max(cols, 1))))
    drr = compute_drr(overlay.volume, imager, pose, binning=binning)
    peak = float(drr.max())
    if not peak > 0:
        return np.zeros(shape_px, bool)
    img = np.clip(drr * (255.0 / peak), 0, 255).astype(np.uint8)
    edges = cv2.Canny(cv2.GaussianBlur(img, (3, 3), 0), 30, 90)
    return cv2.resize(edges, (cols, rows), interpolation=cv2.INTER_NEAREST) > 0


@dataclass(frozen=True, slots=True)
class SeedOverlay:
    """One seed's marks on one imager, full-resolution ``(col, row)`` pixels; any may be None."""

    name: str
    planned_px: tuple[float, float] | None
    detected_px: tuple[float, float] | None
    predicted_px: tuple[float, float] | None


@dataclass(frozen=True, slots=True)
class DisplayFrame:
    """An encoded display frame: ``scale`` = display pixels per full-resolution pixel."""

    imager: str
    pair_id: int
    data: bytes
    mime: str
    rows: int
    cols: int
    scale: float
    #: Seed marks drawn: (planned crosses, detected circles) inside the frame (the page shows and tests them).
    marks: tuple[int, int] = (0, 0)


def window_levels(pixels: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> tuple[float, float]:
    """Display window ``(low, high)`` of a frame in its own units: its 1st and 99th percentiles (or ``percentiles``).

    Estimated on a regular subsample of at most about 128 x 128 pixels (every pixel of a smaller frame).
    """
    sample = pixels[:: max(1, pixels.shape[0] // 128), :: max(1, pixels.shape[1] // 128)]
    low, high = np.percentile(sample, percentiles)
    if not high > low:
        high = low + 1.0
    return float(low), float(high)


def _pt(px: tuple[float, float], scale: float) -> tuple[int, int]:
    # Pixel centres at integers: the display pixel holding full-res (c, r) has centre (c + 0.5) * s - 0.5.
    return int(round((px[0] + 0.5) * scale - 0.5)), int(round((px[1] + 0.5) * scale - 0.5))


def render_frame(pixels: np.ndarray, imager: str, pair_id: int, overlays: tuple[SeedOverlay, ...] = (),
                 display_pixels: int = 256, fmt: str = "jpeg", residual_gain: float = RESIDUAL_GAIN,
                 edges=None, window_percentiles: tuple[float, float] | None = None) -> DisplayFrame:
    """Window, shrink, draw overlays and encode one frame.

    Parameters
    ----------
    pixels : (rows, cols) array
        Raw detector signal, ``image[row, col]``.
    imager, pair_id : str, int
        Labels drawn in the corner.
    overlays : tuple of SeedOverlay
        Seeds to draw (full-resolution ``(col, row)`` pixels).
    display_pixels : int
        Longest side of the result, pixels (never enlarged).
    fmt : ``"jpeg"`` or ``"png"``
    edges : callable((rows, cols)) -> bool array, optional
        Anatomy overlay: given the display size, the display pixels to mark
        (e.g. :func:`drr_edges` at the estimated pose).
    window_percentiles : (low, high), optional
        The display window as percentiles of the frame (0 <= low < high <= 100); default 1st to 99th.
        Marks and lines grow with the display size (a large approval view keeps them visible).

    Raises
    ------
    FrameError
        Not a 2-D finite array, or an unknown format.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.size == 0:
        raise FrameError(f"imager '{imager}' pair {pair_id}: display needs a 2-D frame, got shape {arr.shape}")
    if fmt not in ("jpeg", "png"):
        raise FrameError(f"display format must be 'jpeg' or 'png', got {fmt!r}")
    img = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(img)):
        raise FrameError(f"imager '{imager}' pair {pair_id}: frame has NaN or infinite pixels")
    rows, cols = img.shape
    scale = min(1.0, display_pixels / max(rows, cols))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(cols * scale)), max(1, round(rows * scale))), interpolation=cv2.INTER_AREA)
        scale = img.shape[1] / cols
    if window_percentiles is not None:
        lo_p, hi_p = (float(v) for v in window_percentiles)
        if not (0.0 <= lo_p < hi_p <= 100.0):
            raise FrameError(f"display window must be percentiles 0 <= low < high <= 100, got {window_percentiles!r}")
    low, high = window_levels(img, WINDOW_PERCENTILES if window_percentiles is None else (lo_p, hi_p))
    grey = np.clip((img - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    if edges is not None:
        out[edges(out.shape[:2])] = _CYAN
    k = max(1, round(max(out.shape[:2]) / 384))  # 1 at 256 px, 2 at 768 px: marks stay visible when large
    h, w = out.shape[:2]
    inside = lambda p: 0 <= p[0] < w and 0 <= p[1] < h  # noqa: E731
    planned = detected = 0
    for s in overlays:
        if s.planned_px is not None:
            cv2.drawMarker(out, _pt(s.planned_px, scale), _GREEN, cv2.MARKER_CROSS, 9 * k, k)
            planned += inside(_pt(s.planned_px, scale))
        if s.detected_px is not None:
            centre = _pt(s.detected_px, scale)
            detected += inside(centre)
            cv2.circle(out, centre, 5 * k, _YELLOW, k)
            if s.predicted_px is not None:
                tip = (s.predicted_px[0] + residual_gain * (s.detected_px[0] - s.predicted_px[0]),
                       s.predicted_px[1] + residual_gain * (s.detected_px[1] - s.predicted_px[1]))
                cv2.line(out, _pt(s.predicted_px, scale), _pt(tip, scale), _RED, k)
    label = f"{imager}  pair {pair_id}" + (f"  residual x{residual_gain:g}" if overlays else "")
    cv2.putText(out, label, (4, 12 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * k, (255, 255, 255), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", out,
                           [cv2.IMWRITE_JPEG_QUALITY, 85] if fmt == "jpeg" else [])
    if not ok:
        raise FrameError(f"imager '{imager}' pair {pair_id}: OpenCV could not encode the display frame")
    return DisplayFrame(imager, int(pair_id), buf.tobytes(), f"image/{fmt}", out.shape[0], out.shape[1], scale,
                        (planned, detected))


def seed_overlays(imager, planned_room_mm: np.ndarray, names: tuple[str, ...], correction: dict | None
                  ) -> tuple[SeedOverlay, ...]:
    """Overlay marks for one imager from the planned seeds and a ``correction/1`` body.

    Parameters
    ----------
    imager : ImagerGeometry
    planned_room_mm : (N, 3) array
        Planned seed centres, room frame at perfect setup, mm.
    names : tuple of str
        Seed names, in the order of ``planned_room_mm`` (matched to ``quality.seeds[].name``).
    correction : dict or None
        A ``correction/1`` body (couch correction ``C``); the estimated patient pose is ``C^-1``.

    Returns
    -------
    tuple of SeedOverlay
        Planned projections always; detections and predictions where the correction has them.
    """
    from spineguide.registration.pose import Correction

    planned_px = imager.project(planned_room_mm) if len(planned_room_mm) else np.zeros((0, 2))
    detected: dict[str, tuple[float, float]] = {}
    predicted_px = None
    if correction is not None:
        for seed in (correction.get("quality") or {}).get("seeds") or ():
            px = (seed.get("pixels_px") or {}).get(imager.name)
            if seed.get("found") and px is not None and len(px) == 2:
                detected[seed.get("name")] = (float(px[0]), float(px[1]))
        pose = Correction.from_six(correction["translation_mm"], correction["rotation_deg"]).to_pose()
        if len(planned_room_mm):
            predicted_px = imager.project(pose.apply(planned_room_mm))
    out = []
    for i, name in enumerate(names):
        out.append(SeedOverlay(
            name, (float(planned_px[i, 0]), float(planned_px[i, 1])), detected.get(name),
            None if predicted_px is None else (float(predicted_px[i, 0]), float(predicted_px[i, 1]))))
    return tuple(out)
