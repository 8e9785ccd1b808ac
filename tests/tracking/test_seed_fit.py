"""The seed-shadow fit (numba Levenberg-Marquardt, ``_kernels.fit_seed_lm``) against an independent solver.

Ground truth: the least-squares optimum of the same model (plane plus a
Gaussian-blurred oriented box) found by ``scipy.optimize.least_squares``,
and, noise-free, the parameters the data were made with.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy.optimize import least_squares
from scipy.special import erf

from spineguide.tracking.localisation._kernels import _SATURATED, _erf_from_exp, fit_seed_lm, fit_seeds_lm
from spineguide.tracking.localisation.seed_search import _start_levels

BLUR = 0.8  # px
HALF_WID = 2.0  # px
TRUE = np.array([0.3, -0.2, 0.5, 8.0, 0.5, 2.0, 0.01, -0.004])  # dcol, drow, theta, half-length, amp, plane


def _model(p, x, y):
    k = 1.0 / (math.sqrt(2.0) * BLUR)
    u, v = x - p[0], y - p[1]
    along = u * math.cos(p[2]) + v * math.sin(p[2])
    across = -u * math.sin(p[2]) + v * math.cos(p[2])

    def box(t, h):
        return 0.5 * (erf((t + h) * k) - erf((t - h) * k))

    return p[5] + p[6] * x + p[7] * y + p[4] * box(along, p[3]) * box(across, HALF_WID)


def _grid():
    yy, xx = np.mgrid[-17:18, -17:18].astype(np.float64)
    return xx.ravel(), yy.ravel()


START = np.array([0.0, 0.0, 0.3, 7.0, 0.4, 2.0, 0.0, 0.0])


def test_noise_free_shadow_gives_back_its_parameters():
    x, y = _grid()
    ok, p, se, sigma = fit_seed_lm(x, y, _model(TRUE, x, y), START, HALF_WID, BLUR, 2.1, 14.0, 6.0, 60)
    assert ok
    # Centre to 1e-4 px (noise-free: the optimum is the truth), the rest to 1e-4 relative.
    assert_allclose(p[:2], TRUE[:2], atol=1e-4)
    assert_allclose(p[2:5], TRUE[2:5], rtol=1e-4)
    assert sigma < 1e-5


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noisy_shadow_fit_is_the_least_squares_optimum(seed):
    x, y = _grid()
    rng = np.random.default_rng(seed)
    data = _model(TRUE, x, y) + rng.normal(0.0, 0.08, x.size)
    ok, p, se, sigma = fit_seed_lm(x, y, data, START, HALF_WID, BLUR, 2.1, 14.0, 6.0, 60)
    assert ok
    ref = least_squares(lambda q: _model(q, x, y) - data, START, method="lm", xtol=1e-12, ftol=1e-12)
    # Same optimum: centre within 1e-3 px, cost within 1e-6 relative.
    assert_allclose(p[:2], ref.x[:2], atol=1e-3)
    assert float(np.sum((_model(p, x, y) - data) ** 2)) == pytest.approx(2 * ref.cost, rel=1e-6)
    # The standard error of the centre covers the error from the truth (a 4-sigma bound).
    assert np.all(np.abs(p[:2] - TRUE[:2]) <= 4 * se[:2])
    assert sigma == pytest.approx(0.08, rel=0.1)


def test_erf_from_exp_is_within_its_stated_error_and_saturation_is_below_it():
    """The model's ``erf`` (Abramowitz & Stegun 7.1.26 from the Jacobian's ``exp``) within 1.5e-7 of the exact
    one, odd (but at 0), and the box's terms past ``_SATURATED`` blur units (left out) smaller than that error."""
    z = np.linspace(-8.0, 8.0, 20001)
    got = np.array([_erf_from_exp(v, math.exp(-v * v)) for v in z])
    assert np.max(np.abs(got - erf(z))) <= 1.5e-7
    # Odd (but at 0, where it gives 1e-9: the coefficients sum to 1 - 1e-9).
    pos = z[z > 0.0]
    np.testing.assert_array_equal([_erf_from_exp(-v, math.exp(-v * v)) for v in pos],
                                  [-_erf_from_exp(v, math.exp(-v * v)) for v in pos])
    assert 1.0 - math.erf(_SATURATED) < 1.5e-7 and math.exp(-_SATURATED ** 2) < 1.5e-7


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 1500), seed=st.integers(0, 2**31), decimals=st.sampled_from([None, 1, 2]))
def test_start_levels_are_numpys_median_and_99th_percentile(n, seed, decimals):
    """One partial sort gives bit for bit ``np.median`` and ``np.percentile(., 99)`` (ties included)."""
    data = np.random.default_rng(seed).normal(0.0, 0.3, n)
    if decimals is not None:
        data = np.round(data, decimals)  # many ties
    assert _start_levels(data) == (float(np.median(data)), float(np.percentile(data, 99)))


def test_batched_parallel_fits_are_each_the_single_fit():
    """``fit_seeds_lm`` (many windows and starts, numba prange) gives bit for bit what ``fit_seed_lm`` gives per fit."""
    x, y = _grid()
    rng = np.random.default_rng(7)
    windows = [_model(TRUE, x, y) + rng.normal(0.0, s, x.size) for s in (0.02, 0.08, 0.3)]
    # Window 1 smaller (its first 900 pixels): windows of different sizes share the concatenated arrays.
    sizes = [x.size, 900, x.size]
    bounds = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    xs = np.concatenate([x[:n] for n in sizes])
    ys = np.concatenate([y[:n] for n in sizes])
    data = np.concatenate([d[:n] for d, n in zip(windows, sizes)])
    starts = np.array([START + [0, 0, a, 0, 0, 0, 0, 0] for a in (0.0, 0.8, 1.6)] * 3)
    window = np.repeat(np.arange(3), 3).astype(np.int64)
    ok, p, se, sigma = fit_seeds_lm(xs, ys, data, bounds, window, starts, HALF_WID, BLUR, 2.1, 14.0, 6.0, 30)
    for j in range(len(starts)):
        w = window[j]
        a, b = bounds[w], bounds[w + 1]
        one = fit_seed_lm(xs[a:b], ys[a:b], data[a:b], starts[j], HALF_WID, BLUR, 2.1, 14.0, 6.0, 30)
        assert ok[j] == one[0]
        np.testing.assert_array_equal(p[j], one[1])
        np.testing.assert_array_equal(se[j], one[2])
        assert sigma[j] == one[3]


# ---------------------------------------------------------------------------- refine_seeds on structured anatomy
@pytest.mark.parametrize("ridge_deg,offset_px", [
    (0.0, 2.5), (0.0, -3.0), (110.0, 0.0),
    # The stated limit (docs/FIDUCIALS.md): a ridge within ~25 deg of the seed's own axis, between two of the
    # background's 8 line orientations, is lowered by the openings and still pulls the fit (1.8 px here).
    pytest.param(60.0, 2.0, marks=pytest.mark.xfail(strict=True, reason="ridge 25 deg from the seed's axis")),
])
def test_a_seed_lying_on_a_cortical_ridge_is_fitted_at_its_own_centre(ridge_deg, offset_px):
    """A thin bright ridge (an endplate or rib border seen edge-on) under part of the seed must not pull the fit.

    Noise-free frame: a sloped background, a ridge 1.5 px sigma across and
    0.8 ln units high running at ``ridge_deg`` through a point ``offset_px``
    below the seed's centre, and the seed's blurred box (the fit's own model)
    at a known sub-pixel centre. The fit must find the seed's centre to
    0.15 px (a plane or a disc opening under the box let such a ridge pull
    it by 1-2 px in the clinic-chain benchmark).
    """
    from spineguide.tracking.localisation.detection import DetectionConfig, seed_size_px
    from spineguide.tracking.localisation.seed_search import refine_seeds
    from spineguide.tracking.room.rooms import room_geometry

    im = room_geometry("default")["A"]
    size = seed_size_px(im, DetectionConfig())
    half_wid = 0.5 * (size.diameter_px - 1.0)
    rows, cols = im.rows, im.cols
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    centre = np.array([cols / 2 + 0.37, rows / 2 - 0.21])
    k = 1.0 / (math.sqrt(2.0) * BLUR)
    theta = math.radians(35.0)
    hl = 0.35 * (size.length_px - 1.0)

    def box(t, h):
        return 0.5 * (erf((t + h) * k) - erf((t - h) * k))

    u, v = xx - centre[0], yy - centre[1]
    seed = 0.6 * box(u * math.cos(theta) + v * math.sin(theta), hl) * box(-u * math.sin(theta) + v * math.cos(theta),
                                                                          half_wid)
    a = math.radians(ridge_deg)
    # Signed distance from the ridge line through (centre + offset along the ridge's normal).
    normal = np.array([-math.sin(a), math.cos(a)])
    dist = (xx - centre[0]) * normal[0] + (yy - centre[1]) * normal[1] - offset_px
    ridge = 0.8 * np.exp(-0.5 * (dist / 1.5) ** 2)
    lint = 2.0 + 0.002 * (xx - cols / 2) - 0.001 * (yy - rows / 2) + ridge + seed
    i0 = 20000.0
    signal = (i0 * np.exp(-lint)).astype(np.float32)
    got = refine_seeds(signal, im, i0, (centre + [1.2, -0.8])[None], np.array([0.0]), DetectionConfig(), 3.0)[0]
    assert got is not None
    err = np.hypot(*(np.asarray(got.centre_px) - centre))
    assert err <= 0.15, f"{err:.3f} px"
