"""Image model and similarity measures for matching DRRs to kV radiographs.

Image model (docs/CONVENTIONS.md, "kV images"): a raw frame ``I`` is the
detector signal, larger where more photons arrive; its line integral is
``p = -ln(I / i0)``. An unknown ``i0`` or detector gain ``g`` only adds the
constant ``-ln g`` to every pixel of ``p``; a different effective energy or
scatter scales the bone contrast and adds a slowly varying background. The
measures here are therefore built to ignore an additive constant and a scale
(NCC), or to look only at edges (gradient correlation, gradient difference,
pattern intensity), where a smooth background and a constant vanish.

All measures take two images of the same shape (``[row, col]``, any units
as long as each image is self-consistent, usually line integrals) and an
optional boolean mask of the pixels that count. Higher is more similar for
every measure. References: Penney et al., "A comparison of similarity
measures for use in 2D-3D medical image registration", IEEE TMI 17(4) 1998.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import cv2
import numpy as np
from spineguide.calibration.foundation import checked_number

from .errors import RegistrationError, RegistrationFrameError

__all__ = [
    "RegistrationFrameError",
    "Similarity",
    "estimate_i0",
    "line_integrals",
    "transmission",
    "image_gradients",
    "ncc",
    "gradient_correlation",
    "gradient_difference",
    "pattern_intensity",
    "similarity",
]

#: Counts below this are treated as this many counts before the logarithm, so
#: a fully attenuated (zero) pixel gives a large finite line integral, not inf.
MIN_COUNTS = 0.5
#: Percentile of the raw frame taken as the unattenuated level when i0 is not
#: given: the open field beside the patient is the brightest part of a frame.
I0_PERCENTILE = 99.9


class Similarity(Enum):
    """Similarity measures between a DRR and a radiograph."""

    GRADIENT_CORRELATION = "gradient_correlation"
    NCC = "ncc"
    GRADIENT_DIFFERENCE = "gradient_difference"
    PATTERN_INTENSITY = "pattern_intensity"


def _checked_raw(raw: np.ndarray, name: str) -> np.ndarray:
    """The frame as float32 (no copy when it is float32 already), checked: 2D, finite, non-negative.

    float32 holds detector counts to 1 part in 1.7e7, far below any frame's noise; a float64 value beyond
    float32's range becomes infinite here and is refused as non-finite.
    """
    a = np.asarray(raw)
    if a.ndim != 2 or min(a.shape) < 1:
        raise RegistrationFrameError(f"frame '{name}': must be a 2D image, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise RegistrationFrameError(f"frame '{name}': pixel type {a.dtype} is not a number")
    with np.errstate(over="ignore"):
        a = a.astype(np.float32, copy=False)
    lo, hi = float(a.min()), float(a.max())  # NaN or infinite pixels make one of them non-finite
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RegistrationFrameError(f"frame '{name}': holds {int(np.count_nonzero(~np.isfinite(a)))} non-finite pixels")
    if lo < 0:
        raise RegistrationFrameError(f"frame '{name}': holds negative pixel values (min {lo:g}); raw signal expected")
    return a


def estimate_i0(raw: np.ndarray, name: str = "frame") -> float:
    """Estimate the unattenuated level of a raw frame (detector units).

    The :data:`I0_PERCENTILE` percentile of the frame: the open field beside
    the patient. A wrong estimate only shifts the line integrals by a
    constant, which the similarity measures ignore.

    Raises
    ------
    RegistrationFrameError
        If the frame is not a finite, non-negative 2D image or has no signal.
    """
    a = _checked_raw(raw, name)
    i0 = float(np.percentile(a, I0_PERCENTILE))
    if i0 <= MIN_COUNTS:
        raise RegistrationFrameError(f"frame '{name}': no signal (brightest pixels {i0:g}, need > {MIN_COUNTS:g})")
    return i0


def _checked_frame_and_i0(raw: np.ndarray, i0: float | None, name: str) -> tuple[np.ndarray, float]:
    """The checked float32 frame and its i0 (given and checked, or estimated from the frame)."""
    a = _checked_raw(raw, name)
    if i0 is None:
        i0 = estimate_i0(a, name)
    i0 = checked_number(i0, RegistrationFrameError, f"frame '{name}': i0 must be a positive finite number, got {i0!r}",
                        minimum=0.0, exclusive_minimum=True)
    return a, float(i0)


def transmission(raw: np.ndarray, i0: float | None = None, name: str = "frame") -> tuple[np.ndarray, float]:
    """Transmitted fraction ``I / i0`` (dimensionless, float32, full panel) of a raw kV frame, and its floor.

    The anatomy registration bins this fraction (detector counts add up in a
    bin) and takes the logarithm of each bin's mean; the logarithm of single
    low-dose pixels, a few counts each, is biased and clipped at
    :data:`MIN_COUNTS` where the counts' mean is not.

    Parameters
    ----------
    raw : (rows, cols) array
        Raw detector signal, ``image[row, col]``, non-negative.
    i0 : float, optional
        Unattenuated level in the same units; estimated with
        :func:`estimate_i0` if omitted.
    name : str
        Imager name, for messages.

    Returns
    -------
    (rows, cols) float32 array, float
        ``I / i0`` and ``MIN_COUNTS / i0``: the value below which a (binned) fraction is taken as that floor
        before the logarithm.

    Raises
    ------
    RegistrationFrameError
        Bad frame, or ``i0`` not a positive finite number.
    """
    a, i0 = _checked_frame_and_i0(raw, i0, name)
    return np.multiply(a, np.float32(1.0 / i0), dtype=np.float32), MIN_COUNTS / i0


def line_integrals(raw: np.ndarray, i0: float | None = None, name: str = "frame") -> np.ndarray:
    """Line integrals ``-ln(I / i0)`` (dimensionless, float32) of a raw kV frame, pixel by pixel.

    ``raw`` (``image[row, col]``, non-negative), ``i0`` and ``name`` as for :func:`transmission`, and the same
    :class:`RegistrationFrameError` for a bad frame or i0. Counts below :data:`MIN_COUNTS` are taken as that.
    """
    a, i0 = _checked_frame_and_i0(raw, i0, name)
    out = np.maximum(a, np.float32(MIN_COUNTS))  # a new float32 array; then in place: fewer passes, no float64
    np.log(out, out=out)
    np.subtract(np.float32(math.log(i0)), out, out=out)
    return out


def image_gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal (along columns) and vertical (along rows) Sobel derivatives, float32, per pixel."""
    a = np.ascontiguousarray(image, dtype=np.float32)
    gx = cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) / np.float32(8.0)
    gy = cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE) / np.float32(8.0)
    return gx, gy


def _pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise RegistrationError(f"similarity needs two 2D images of one shape, got {a.shape} and {b.shape}")
    m = np.ones(a.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != a.shape:
        raise RegistrationError(f"mask shape {m.shape} does not match the images {a.shape}")
    if np.count_nonzero(m) < 4:
        raise RegistrationError(f"mask selects {int(np.count_nonzero(m))} pixels; at least 4 are needed")
    return a, b, m


def _ncc_values(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a @ a) * (b @ b)))
    return 0.0 if den <= 0.0 else float(a @ b) / den


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two images inside a mask, in [-1, 1].

    Invariant to an additive constant and a positive scale of either image
    (unknown i0 or gain, a global contrast change).
    """
    a, b, m = _pair(a, b, mask)
    return _ncc_values(a[m], b[m])


def gradient_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Gradient correlation (Penney 1998): mean NCC of the row and column derivatives, in [-1, 1].

    Blind to an additive constant, a scale and a smooth background (scatter,
    soft tissue): only edges count.
    """
    a, b, m = _pair(a, b, mask)
    ax, ay = image_gradients(a)
    bx, by = image_gradients(b)
    return 0.5 * (_ncc_values(ax[m].astype(np.float64), bx[m]) + _ncc_values(ay[m].astype(np.float64), by[m]))


def _ls_scale(fixed: np.ndarray, moving: np.ndarray) -> float:
    """Least-squares intensity scale ``s`` of ``moving`` onto ``fixed`` (both zero-mean)."""
    den = float(moving @ moving)
    return 0.0 if den <= 0 else float(fixed @ moving) / den


def gradient_difference(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Gradient difference (Penney 1998), normalised to (0, 1]: 1 when the gradients match.

    ``GD = mean_{x in mask} A_c / (A_c + (da/dc - s db/dc)^2)`` averaged over the
    column and row derivatives, ``A_c`` the variance of ``da/dc`` in the mask and
    ``s`` the least-squares scale of ``b``'s gradients onto ``a``'s (``a`` is the
    radiograph, ``b`` the DRR).
    """
    a, b, m = _pair(a, b, mask)
    out = 0.0
    for ga, gb in zip(image_gradients(a), image_gradients(b)):
        fa = ga[m].astype(np.float64)
        fb = gb[m].astype(np.float64)
        var = float(np.var(fa))
        if var <= 0:
            return 0.0
        s = _ls_scale(fa - fa.mean(), fb - fb.mean())
        d = fa - s * fb
        out += 0.5 * float(np.mean(var / (var + d * d)))
    return out


def pattern_intensity(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, radius_px: int = 3, sigma: float | None = None
) -> float:
    """Pattern intensity (Penney 1998), normalised to (0, 1]: 1 for a structure-free difference image.

    ``d = a - s b`` (``s`` the least-squares scale of DRR ``b`` onto radiograph
    ``a``); ``PI = mean sigma^2 / (sigma^2 + (d(x) - d(y))^2)`` over mask pixels
    ``x`` and neighbours ``y`` with ``0 < |x - y| <= radius_px``. ``sigma``
    defaults to the standard deviation of the radiograph's one-pixel
    differences in the mask (its noise-plus-texture level), so the measure is
    independent of the intensity units.
    """
    a, b, m = _pair(a, b, mask)
    r = int(radius_px)
    if r < 1:
        raise RegistrationError(f"pattern intensity radius must be >= 1 pixel, got {radius_px!r}")
    av, bv = a[m], b[m]
    s = _ls_scale(av - av.mean(), bv - bv.mean())
    d = a - s * b
    if sigma is None:
        gx = np.diff(a, axis=1)[m[:, 1:] & m[:, :-1]]
        sigma = float(np.std(gx)) if gx.size else 0.0
    sig2 = float(sigma) ** 2
    if sig2 <= 0:
        return 0.0
    rows, cols = d.shape
    total = 0.0
    count = 0
    for dr in range(0, r + 1):
        for dc in range(-r, r + 1):
            if (dr == 0 and dc <= 0) or dr * dr + dc * dc > r * r:
                continue  # each unordered neighbour pair once
            r0, r1 = 0, rows - dr
            c0, c1 = max(0, -dc), min(cols, cols - dc)
            if r1 <= r0 or c1 <= c0:
                continue
            both = m[r0:r1, c0:c1] & m[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
            diff = d[r0:r1, c0:c1][both] - d[r0 + dr : r1 + dr, c0 + dc : c1 + dc][both]
            total += float(np.sum(sig2 / (sig2 + diff * diff)))
            count += diff.size
    return 0.0 if count == 0 else total / count


_MEASURES: dict[Similarity, Callable[..., float]] = {
    Similarity.GRADIENT_CORRELATION: gradient_correlation,
    Similarity.NCC: ncc,
    Similarity.GRADIENT_DIFFERENCE: gradient_difference,
    Similarity.PATTERN_INTENSITY: pattern_intensity,
}


def similarity(measure: Similarity, radiograph: np.ndarray, drr: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Evaluate one :class:`Similarity` measure (higher is more similar)."""
    if not isinstance(measure, Similarity):
        raise RegistrationError(f"unknown similarity measure {measure!r}; one of {[m.value for m in Similarity]}")
    return _MEASURES[measure](radiograph, drr, mask)
