"""A forward model of one BB's shadow, fitted per BB to remove the windowed centroid's deterministic bias.

The absorbed-fraction centroid of :func:`~spineguide.calibration.bb_detection.detect_bbs` is unbiased only for
an unblurred BB on a background without scatter. On a real panel three terms of the same form move it
(issue 13):

- **blur on a sloped background**: for a Gaussian blur of variance ``s^2``,
  ``G * (B T) = B (G * T) + s^2 grad(B) . grad(G * T)`` to first order, so ``w = 1 - I / B`` gains
  ``s^2 grad(ln B) . grad(w0)`` and the centroid moves by ``-s^2 grad(ln B)`` (towards the thicker side):
  -0.36 x grad(ln B) px for 0.6 px of blur, 0.01 px at a 3 %/px slope;
- **scatter** under the BB is not absorbed by it: ``w`` is diluted by ``P / (P + S)``, which varies across the
  BB wherever primary and scatter have different slopes;
- **window truncation** and pixel phase: the penumbra reaches the window edge.

The model of the panel signal around a BB at ``c``, in ``(col, row)`` pixels (centres at integers)::

    I(x) = G_s * [ P(x) T(x - c) ] + S,     T(u) = exp(-mu L_r(u)),   L_r(u) = 2 sqrt(r^2 - |u|^2)

``P`` = ``exp(g . x)`` times a quadratic (the primary behind the BB: heel, PMMA slope and curvature; ``g`` the
log-plane of the surroundings, fixed before the fit), ``T`` the sphere's transmission averaged over each pixel
(``n x n`` sub-pixels near its edge), ``G_s`` a Gaussian detector blur of ``s`` px applied on the pixel grid,
``S`` one constant (scatter and offset left under the BB: the chain's scatter kernel is ~100 px wide, and a
scatter slope fitted from the shadow's floor alone doubled the centre's noise). :func:`fit_shadow` fits the 12
parameters -- 5 by :func:`scipy.optimize.least_squares` (bounded trust region), the 7 that enter linearly by
linear least squares for each -- to the pixels within the background annulus'
outer radius. The centroid is then **debiased**, not replaced: the same windowed centroid is run on the
fitted model, and its offset from the model's true centre is subtracted from the measured centroid. What the
model gets right (blur x slope, scatter dilution, truncation, pixel phase) cancels; its noise barely enters
(the correction is a smooth function of parameters the whole patch fixes: 0.0014 px RMS against the
centroid's own 0.009 px, 40 Poisson draws at 5000 counts on a 3 %/px ramp with SPR 0.8), so the centroid's
stated sigma stays valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.optimize import least_squares

__all__ = ["ShadowFit", "SUPERSAMPLING", "fit_shadow", "render_shadow"]

#: Sub-pixels per pixel and axis for the sphere's transmission, only within 1 px of the shadow's edge
#: (elsewhere the pixel centre's value). 8 x 8 left the edge aliased: against a 40 x 40 truth the fit's RMS
#: residual was 10-15 counts in 10,000 and centres 0.008 px off; 16 x 16 gives 2-6 counts and < 0.002 px.
SUPERSAMPLING = 16
#: Largest detector blur the model allows, px (the fit would otherwise trade a wide blur for the plane).
_MAX_BLUR_PX = 2.0
#: Attenuation bounds, per px of chord: a nearly transparent BB to an opaque one (e^-25 at a 5 px chord).
_MU_BOUNDS_PER_PX = (1e-3, 5.0)
#: Starting attenuation, per px: opaque. From an opaque start a partly transparent BB's floor pulls mu down
#: along a steep gradient; from a transparent start an opaque BB's only pull is its edge's sharpness, and the
#: fit stalled with mu half the truth and the radius traded for it (0.01 px off-centre on a 3 %/px slope).
_MU_START_PER_PX = 3.0
#: Terms of the primary's quadratic (1, x, y, x^2, xy, y^2) and of the scatter (1; a plane would be 3).
_PRIMARY_TERMS = 6
_SCATTER_TERMS = 1


@dataclass(frozen=True, slots=True)
class ShadowFit:
    """A BB shadow model fitted to one patch.

    Attributes
    ----------
    centre_px : (2,) array
        Fitted ``(col, row)`` centre of the BB's shadow, px.
    radius_px : float
        Radius of the sphere's shadow, px.
    mu_per_px : float
        Attenuation per px of chord.
    blur_px : float
        Gaussian detector blur, px.
    primary : (6,) array
        Primary behind the BB, ``exp(g . x)`` times a quadratic in ``x = col - col_ref``,
        ``y = row - row_ref``: coefficients of
        1, x, y, x^2, xy, y^2, counts.
    scatter : (1,) array
        Signal not absorbed by the BB (scatter, residual offset), one constant, counts.
    ref_px : (2,) array
        The reference point of both polynomials ``(col_ref, row_ref)``.
    log_slope_per_px : (2,) tuple
        ``g``: the primary is ``exp(g . x)`` times the quadratic, with ``g`` the log-plane of the
        surroundings (fixed before the fit), per px.
    rms : float
        RMS residual of the fit, counts.
    """

    centre_px: np.ndarray
    radius_px: float
    mu_per_px: float
    blur_px: float
    primary: np.ndarray
    scatter: np.ndarray
    ref_px: np.ndarray
    log_slope_per_px: tuple[float, float]
    rms: float


def _sub_offsets(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n - 0.5


def _primary_basis(shape_params, col0: int, row0: int, cols: int, rows: int, ref_px, n: int,
                   log_slope=(0.0, 0.0)) -> np.ndarray:
    """``G_s * [m T]``, monomials ``m`` = 1, x, y, x^2, xy, y^2 (about ``ref_px``), on the block: ``(6, rows, cols)``.

    ``T`` is the sphere's transmission averaged over each pixel's area: at the pixel centre where the pixel
    lies wholly inside or outside the shadow's edge, on ``n x n`` sub-pixels within 1 px of the edge (where
    the disk's boundary makes the average differ from the centre value).
    """
    cx, cy, r, log_mu, s = (float(v) for v in shape_params)
    mu = math.exp(log_mu)
    xc = (col0 + np.arange(cols))[None, :].astype(np.float64)
    yc = (row0 + np.arange(rows))[:, None].astype(np.float64)
    rho = np.sqrt((xc - cx) ** 2 + (yc - cy) ** 2)
    t = np.exp(-mu * 2.0 * np.sqrt(np.maximum(r * r - rho**2, 0.0)))
    tx = np.zeros_like(t)  # sub-pixel first moments of T (they carry the plane's slope across an edge pixel)
    ty = np.zeros_like(t)
    band = np.abs(rho - r) < 1.0
    if np.any(band):
        o = _sub_offsets(n)
        bx = np.broadcast_to(xc, t.shape)[band][:, None, None] + o[None, None, :]
        by = np.broadcast_to(yc, t.shape)[band][:, None, None] + o[None, :, None]
        sub = np.exp(-mu * 2.0 * np.sqrt(np.maximum(r * r - (bx - cx) ** 2 - (by - cy) ** 2, 0.0)))
        t[band] = sub.mean(axis=(1, 2))
        tx[band] = (sub * o[None, None, :]).mean(axis=(1, 2))
        ty[band] = (sub * o[None, :, None]).mean(axis=(1, 2))
    x, y = xc - ref_px[0], yc - ref_px[1]
    # The primary's curvature (an exponential PMMA ramp is 3 % of i0 off its tangent plane 8 px away at
    # 3 %/px) matters as much as its slope; its sub-pixel moments do not. An exponential ramp's higher
    # orders go with the factor e = exp(g . x), g the log-slope of the surroundings.
    e = np.exp(log_slope[0] * x + log_slope[1] * y)
    t, tx, ty = t * e, tx * e, ty * e
    basis = np.stack([t, x * t + tx, y * t + ty, x * x * t, x * y * t, y * y * t][:_PRIMARY_TERMS])
    if s > 1e-3:
        basis = gaussian_filter1d(gaussian_filter1d(basis, s, axis=1, mode="nearest", truncate=4.0), s, axis=2,
                                  mode="nearest", truncate=4.0)
    return basis


def _scatter_basis(col0: int, row0: int, cols: int, rows: int, ref_px) -> np.ndarray:
    xc = np.broadcast_to((col0 + np.arange(cols))[None, :] - ref_px[0], (rows, cols))
    yc = np.broadcast_to((row0 + np.arange(rows))[:, None] - ref_px[1], (rows, cols))
    return np.stack([np.ones((rows, cols)), xc, yc][:_SCATTER_TERMS]).astype(np.float64)


def render_shadow(fit: "ShadowFit", col0: int, row0: int, cols: int, rows: int, n: int = SUPERSAMPLING) -> np.ndarray:
    """The fitted model's signal on the pixel block ``[row0, row0 + rows) x [col0, col0 + cols)``, ``(rows, cols)``.

    The blur is applied with ``mode="nearest"``: only pixels a few blur widths inside the block are exact.
    """
    shape = (*fit.centre_px, fit.radius_px, math.log(fit.mu_per_px), fit.blur_px)
    prim = _primary_basis(shape, col0, row0, cols, rows, fit.ref_px, n, fit.log_slope_per_px)
    sc = _scatter_basis(col0, row0, cols, rows, fit.ref_px)
    return np.tensordot(fit.primary, prim, axes=1) + np.tensordot(fit.scatter, sc, axes=1)


def fit_shadow(raw: np.ndarray, centre_px, radius_px: float, fit_radius_px: float, blur_px: float = 0.6):
    """Fit the shadow model to the pixels of ``raw`` within ``fit_radius_px`` of ``centre_px``.

    Variable projection: :func:`scipy.optimize.least_squares` over the 5 shape parameters (centre, radius,
    ln mu, blur); for each, the 7 linear ones (primary quadratic, scatter constant) by linear least squares.

    Parameters
    ----------
    raw : (rows, cols) array
        Panel signal (counts, more photons = larger), ``image[row, col]``.
    centre_px : (2,) array
        Starting ``(col, row)``, px (the centroid).
    radius_px : float
        Starting shadow radius, px.
    fit_radius_px : float
        Pixels within this distance of the start enter the fit.
    blur_px : float
        Starting blur, px.

    Returns
    -------
    ShadowFit or None
        None where the block runs off the panel or the fit fails.
    """
    c = np.asarray(centre_px, dtype=np.float64)
    pad = int(math.ceil(4.0 * _MAX_BLUR_PX))
    half = int(math.ceil(fit_radius_px)) + pad
    ci, ri = int(round(c[0])), int(round(c[1]))
    if ci - half < 0 or ri - half < 0 or ci + half >= raw.shape[1] or ri + half >= raw.shape[0]:
        return None
    col0, row0, size = ci - half, ri - half, 2 * half + 1
    block = raw[row0 : row0 + size, col0 : col0 + size].astype(np.float64)
    yy, xx = np.mgrid[row0 : row0 + size, col0 : col0 + size]
    use = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= fit_radius_px**2
    ref = c.copy()
    data = block[use]
    scale = float(np.median(data))
    if not scale > 0:
        return None
    data = data / scale
    sc = _scatter_basis(col0, row0, size, size, ref)[:, use].T  # (m, 3)
    ring = use & ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 > (radius_px + 2.0) ** 2) & (block > 0)
    if np.count_nonzero(ring) < 10:
        return None
    g, *_ = np.linalg.lstsq(np.stack([np.ones(np.count_nonzero(ring)), xx[ring] - ref[0], yy[ring] - ref[1]], 1),
                            np.log(block[ring]), rcond=None)
    log_slope = (float(g[1]), float(g[2]))

    def linear(shape):
        a = np.hstack([_primary_basis(shape, col0, row0, size, size, ref, SUPERSAMPLING, log_slope)[:, use].T, sc])
        coef, *_ = np.linalg.lstsq(a, data, rcond=1e-10)
        return coef, a @ coef - data

    x0 = np.array([c[0], c[1], max(radius_px, 0.6), math.log(_MU_START_PER_PX), blur_px])
    lo = np.array([c[0] - 2.0, c[1] - 2.0, 0.5, math.log(_MU_BOUNDS_PER_PX[0]), 0.05])
    hi = np.array([c[0] + 2.0, c[1] + 2.0, 2.0 * radius_px + 2.0, math.log(_MU_BOUNDS_PER_PX[1]), _MAX_BLUR_PX])
    x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
    try:
        sol = least_squares(lambda p: linear(p)[1], x0, bounds=(lo, hi), method="trf",
                            x_scale=np.array([0.1, 0.1, 0.1, 0.3, 0.1]),
                            xtol=1e-6, ftol=1e-8, gtol=1e-8, max_nfev=100)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(sol.x)):
        return None
    coef, res = linear(sol.x)
    return ShadowFit(
        centre_px=np.array(sol.x[:2]),
        radius_px=float(sol.x[2]),
        mu_per_px=float(math.exp(sol.x[3])),
        blur_px=float(sol.x[4]),
        primary=coef[:_PRIMARY_TERMS] * scale,
        scatter=coef[_PRIMARY_TERMS:] * scale,
        ref_px=ref,
        log_slope_per_px=log_slope,
        rms=float(np.sqrt(np.mean(res**2))) * scale,
    )
