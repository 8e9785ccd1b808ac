"""Sub-pixel BB centres on sloped backgrounds and overlapping BBs (issue 13 item 2), against analytic truth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.bb_detection import detect_bbs, refine_centres
from spineguide.calibration.bb_shadow import fit_shadow
from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.tracking.room.kv import _Marker, seed_transmission

GEOMETRY = default_stereo_geometry(256, 1.6)
IM = GEOMETRY["A"]
#: The issue's bound on the centre's bias on a sloped background, px.
BIAS_TOL_PX = 0.02


def _bb(points_mm, d_mm=4.0, mu=2.0):
    markers = [_Marker(np.asarray(p, float), np.array([0.0, 0.0, 1.0]), d_mm, d_mm / 2, True, mu) for p in points_mm]
    return seed_transmission(IM, markers, 8), IM.project(np.asarray(points_mm, float))


@pytest.mark.parametrize("kind", ["linear", "exponential"])
@pytest.mark.parametrize("offset", [(0.0, 0.0, 0.0), (0.31, -0.17, 0.2), (-0.45, 0.38, -0.1)])
def test_centre_is_unbiased_on_a_steep_known_ramp(kind, offset):
    # Noise-free: I = ramp(col, row) * T_bb. The ramp changes by 3 % per pixel (a 45-degree PMMA
    # wedge edge behind the BB) -- a constant ring median would pull the centre ~0.1-0.3 px.
    t, truth = _bb([offset], mu=0.5)  # partly transparent: the ramp shows through the BB too
    rr, cc = np.mgrid[0 : IM.rows, 0 : IM.cols].astype(float)
    x, y = cc - truth[0, 0], rr - truth[0, 1]
    ramp = 10000.0 * (1.0 + 0.03 * x + 0.012 * y) if kind == "linear" else 10000.0 * np.exp(-(0.03 * x - 0.012 * y))
    ramp = np.clip(ramp, 100.0, None)
    det = detect_bbs(ramp * t, diameter_px=4.0 * IM.magnification / 1.6)
    j = int(np.argmin(np.linalg.norm(det.centres_px - truth[0], axis=1)))
    err = det.centres_px[j] - truth[0]
    # The supersampled disk itself resolves the centre to ~0.005 px (8x8 sub-rays on a 4-px disk).
    assert np.all(np.abs(err) < BIAS_TOL_PX), f"bias {err} px"


def test_centre_sigma_is_honest_under_poisson_noise():
    t, truth = _bb([(0.3, 0.2, 0.1)], d_mm=6.0)
    rng = np.random.default_rng(0)
    errs, sig = [], []
    for _ in range(60):
        det = detect_bbs(rng.poisson(5000.0 * t).astype(float), diameter_px=6.0 * IM.magnification / 1.6, i0=5000.0)
        j = int(np.argmin(np.linalg.norm(det.centres_px - truth[0], axis=1)))
        errs.append(det.centres_px[j] - truth[0])
        sig.append(det.sigma_px[j])
    ratio = float(np.std(np.asarray(errs)) / np.mean(sig))
    # 120 samples of a Gaussian: the spread's estimate is within +-20 % at ~3 sigma
    assert 0.75 < ratio < 1.3, ratio


def test_two_overlapping_bbs_are_not_taken_for_one():
    # 4 mm BBs whose shadows overlap by a third: one elongated blob, refused (not a centre between them)
    t, truth = _bb([(0.0, -1.4, 0.0), (0.0, 1.4, 0.0)])
    det = detect_bbs(10000.0 * t, diameter_px=4.0 * IM.magnification / 1.6)
    mid = truth.mean(axis=0)
    assert det.count == 0 or np.min(np.linalg.norm(det.centres_px - mid, axis=1)) > 1.0
    assert len(det.rejected_px) >= 1


# --- Blur, scatter and truncation (issue 13: the deterministic centroid bias) -------------------------------
#: What the debiased centroid must reach on the analytic frames below, px: a tenth of the 0.02 px the issue
#: states, twice the ~0.0025 px left by the model's own approximations (plane evaluated per sub-pixel only in
#: the shadow's edge band, 16 x 16 sub-pixels against the truth's 40 x 40).
DEBIASED_TOL_PX = 0.005
#: The same bound on the mean over sub-pixel positions (the bias proper). 0.003 px was the aim; a 2.8 px
#: shadow under 1.2 px of blur (twice the clinic's) leaves -0.0032 px, its radius and mu no longer separable.
DEBIASED_MEAN_TOL_PX = 0.004
PANEL_SIZE = 64


def _panel_bb(centre_px, radius_px, mu_per_px, primary_slope, blur_px, scatter=0.0, scatter_slope=(0.0, 0.0),
              exponential=False, i0=10000.0, sub=40):
    """Noise-free panel signal of one sphere, ``blur(P T + S)``, with the primary ``P`` and the transmission ``T``
    multiplied on ``sub x sub`` sub-pixels before the pixel's area average (as the photons are), the scatter
    ``S`` a plane (``scatter`` x i0 at the centre), and OpenCV's Gaussian blur on the pixel grid. ``(col, row)``."""
    o = (np.arange(sub) + 0.5) / sub - 0.5
    xs = (np.arange(PANEL_SIZE)[:, None] + o).reshape(-1) - centre_px[0]
    ys = (np.arange(PANEL_SIZE)[:, None] + o).reshape(-1) - centre_px[1]
    chord = 2.0 * np.sqrt(np.maximum(radius_px**2 - xs[None, :] ** 2 - ys[:, None] ** 2, 0.0))
    g = primary_slope[0] * xs[None, :] + primary_slope[1] * ys[:, None]
    p = i0 * (np.exp(g) if exponential else 1.0 + g)
    prim = (p * np.exp(-mu_per_px * chord)).reshape(PANEL_SIZE, sub, PANEL_SIZE, sub).mean(axis=(1, 3))
    rr, cc = np.mgrid[0:PANEL_SIZE, 0:PANEL_SIZE].astype(float)
    s = scatter * i0 * (1.0 + scatter_slope[0] * (cc - centre_px[0]) + scatter_slope[1] * (rr - centre_px[1]))
    return cv2.GaussianBlur(prim + s, (0, 0), blur_px, borderType=cv2.BORDER_REPLICATE) if blur_px else prim + s


def _centre_errors(radius_px=3.75, n=6, seed=3, debias=True, **kw):
    rng = np.random.default_rng(seed)
    errs = []
    for _ in range(n):
        truth = np.array([PANEL_SIZE / 2, PANEL_SIZE / 2]) + rng.uniform(-0.5, 0.5, 2)
        det = detect_bbs(_panel_bb(truth, radius_px, **kw), diameter_px=2.0 * radius_px, i0=10000.0, debias=debias)
        assert det.count == 1, det.count
        errs.append(det.centres_px[0] - truth)
    return np.asarray(errs)


@pytest.mark.parametrize(
    "case",
    [
        # blur 0.6 px (the clinic chain's) on a 3 %/px ramp: the plain centroid was off -0.009 px towards the thick side
        dict(mu_per_px=3.0, primary_slope=(0.03, 0.0), blur_px=0.6),
        # a wider blur, along a diagonal (an exponential ramp: a PMMA wedge): the plain centroid was off
        # ~-0.04 px (s^2 grad ln B)
        dict(mu_per_px=3.0, primary_slope=(0.021, -0.021), blur_px=1.2, exponential=True),
        # scatter as much as primary, flat, under a sloped primary: P / (P + S) varies across the BB (was +0.05 px)
        dict(mu_per_px=3.0, primary_slope=(0.03, 0.0), blur_px=0.6, scatter=1.0),
        # scatter sloped 2 %/px under a flat primary (plain centroid -0.04 px): the model's scatter is one
        # constant per BB (a scatter slope fitted from the shadow's floor doubled the centre's noise), so this
        # one is not removed -- it gets worse (-0.07 px). The chain's scatter kernel is 40 mm (100 px) wide:
        # its slope over a BB is a few 0.1 %/px, not 2 %/px.
        pytest.param(dict(mu_per_px=3.0, primary_slope=(0.0, 0.0), blur_px=0.6, scatter=1.0, scatter_slope=(0.0, 0.02)),
                     marks=pytest.mark.xfail(strict=True, reason="scatter is constant under the BB in the model")),
        # a partly transparent (steel-like) BB, exponential ramp
        dict(mu_per_px=0.3, primary_slope=(0.03, 0.012), blur_px=0.6, exponential=True),
    ],
    ids=["blur0.6-slope3", "blur1.2-diagonal", "flat-scatter", "sloped-scatter", "transparent-exp"],
)
def test_debiased_centre_on_blurred_sloped_backgrounds_with_scatter(case):
    err = _centre_errors(**case)
    assert_allclose(err.mean(axis=0), 0.0, rtol=0, atol=DEBIASED_MEAN_TOL_PX)
    assert_allclose(err, 0.0, rtol=0, atol=DEBIASED_TOL_PX)


@pytest.mark.parametrize("radius_px", [2.8, 5.6])
def test_debiased_centre_for_small_and_large_shadows(radius_px):
    # 1.5 mm and 3 mm BBs at 1.5x magnification on 0.4 mm pixels; 1.2 px blur makes the penumbra reach the
    # window's edge (BB radius + 1.5 px), where the window cuts it
    err = _centre_errors(radius_px=radius_px, mu_per_px=3.0, primary_slope=(0.03, 0.01), blur_px=1.2, exponential=True)
    assert_allclose(err.mean(axis=0), 0.0, rtol=0, atol=DEBIASED_MEAN_TOL_PX)
    assert_allclose(err, 0.0, rtol=0, atol=DEBIASED_TOL_PX)


def test_refine_centres_is_debiased_too():
    truth = np.array([31.8, 32.3])
    frame = _panel_bb(truth, 3.75, 3.0, (0.0, 0.03), 1.2, scatter=0.5)
    centres, sigma = refine_centres(frame, truth[None] + 0.3, [7.5], debias=True)
    assert_allclose(centres[0], truth, rtol=0, atol=DEBIASED_TOL_PX)
    assert np.isfinite(sigma[0])


def test_the_plain_centroid_keeps_its_blur_times_slope_bias_unless_asked():
    # debias is off by default; the plain centroid moves by about -s^2 grad(ln B) = -1.44 x 0.03 = -0.043 px
    plain = _centre_errors(mu_per_px=3.0, primary_slope=(0.03, 0.0), blur_px=1.2, exponential=True, debias=False)
    assert plain[:, 0].mean() < -0.02
    fixed = _centre_errors(mu_per_px=3.0, primary_slope=(0.03, 0.0), blur_px=1.2, exponential=True)
    assert_allclose(fixed.mean(axis=0), 0.0, rtol=0, atol=DEBIASED_MEAN_TOL_PX)


def test_shadow_fit_recovers_blur_slope_and_scatter():
    # The model's own parameters, against the analytic frame's (fitting them is what debiases the centroid)
    truth = np.array([32.2, 31.7])
    frame = _panel_bb(truth, 3.75, 3.0, (0.02, 0.0), 0.8, scatter=0.4)
    fit = fit_shadow(frame, truth + 0.1, 3.75, 9.25)
    assert fit is not None
    assert_allclose(fit.centre_px, truth, rtol=0, atol=DEBIASED_TOL_PX)
    # blur and scatter, not the radius: an opaque sphere's radius trades with mu (how sharp its edge is under
    # 0.8 px of blur), 0.025 px here, and neither moves the centre
    assert_allclose(fit.blur_px, 0.8, rtol=0, atol=0.02)
    assert_allclose(fit.scatter[0], 4000.0, rtol=0.01)
    assert fit.scatter.shape == (1,)
    # the primary's log-slope at the BB: that of exp(g . x) plus that of the quadratic
    assert_allclose(fit.log_slope_per_px[0] + fit.primary[1] / fit.primary[0], 0.02, rtol=0, atol=1e-3)


def test_shadow_fit_refuses_a_block_off_the_panel():
    frame = _panel_bb(np.array([32.0, 32.0]), 3.75, 3.0, (0.0, 0.0), 0.6)
    assert fit_shadow(frame, np.array([3.0, 32.0]), 3.75, 9.25) is None
