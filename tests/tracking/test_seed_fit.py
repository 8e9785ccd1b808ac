"""The seed-shadow fit (numba Levenberg-Marquardt, ``_kernels.fit_seed_lm``) against an independent solver.

Ground truth: the least-squares optimum of the same model (plane plus a
Gaussian-blurred oriented box) found by ``scipy.optimize.least_squares``,
and, noise-free, the parameters the data were made with.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.optimize import least_squares
from scipy.special import erf

from spineguide.tracking.localisation._kernels import fit_seed_lm

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
