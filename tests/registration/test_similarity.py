"""Similarity measures and the kV image model (registration.similarity) against analytic truth."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.errors import RegistrationError
from spineguide.registration.similarity import (
    RegistrationFrameError,
    Similarity,
    estimate_i0,
    gradient_correlation,
    gradient_difference,
    line_integrals,
    ncc,
    pattern_intensity,
    similarity,
    transmission,
)

FLOAT32_TOL = 1e-5  # float32 round-off of -ln(I/i0) for line integrals of order 1-10
EXACT_TOL = 1e-9  # float64 identities (correlation of an image with an affine copy of itself)


def _blobs(seed: int = 0, shape=(64, 80)) -> np.ndarray:
    """Smooth random test image (sum of Gaussians), float64."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.zeros(shape)
    for _ in range(12):
        r0, c0 = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        s = rng.uniform(3, 8)
        img += rng.uniform(0.5, 2.0) * np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * s * s))
    return img


def test_line_integrals_invert_beer_lambert():
    p = np.linspace(0.0, 6.0, 200).reshape(10, 20)
    i0 = 20000.0
    raw = (i0 * np.exp(-p)).astype(np.float32)
    assert_allclose(line_integrals(raw, i0), p, rtol=0, atol=FLOAT32_TOL)


def test_gain_change_is_an_additive_constant_in_log_space():
    p = np.linspace(0.0, 6.0, 200).reshape(10, 20)
    raw = 20000.0 * np.exp(-p)
    nominal = line_integrals(raw, 20000.0)
    brighter = line_integrals(1.2 * raw, 20000.0)
    assert_allclose(nominal - brighter, np.full(p.shape, np.log(1.2)), rtol=0, atol=FLOAT32_TOL)


def test_estimated_i0_is_the_open_field():
    raw = np.full((100, 100), 500.0)
    raw[:, :30] = 20000.0  # open field beside the patient
    assert estimate_i0(raw) == pytest.approx(20000.0, abs=0.0)


def test_zero_counts_give_a_finite_line_integral():
    raw = np.array([[0.0, 100.0], [200.0, 400.0]])
    assert np.all(np.isfinite(line_integrals(raw, 400.0)))


@pytest.mark.parametrize(
    "raw, i0, match",
    [
        (np.full((4, 4), -1.0), 10.0, "negative"),
        (np.full((4, 4), np.nan), 10.0, "non-finite"),
        (np.ones((4, 4, 2)), 10.0, "2D image"),
        (np.ones((4, 4)), 0.0, "i0 must be a positive"),
        (np.zeros((4, 4)), None, "no signal"),
        (np.array([[1.0, np.inf], [2.0, 3.0]]), 10.0, "1 non-finite"),
        (np.array([[1.0, 1e39], [2.0, 3.0]]), 10.0, "1 non-finite"),  # beyond float32: refused, not clipped
        (np.ones((4, 4), dtype=np.complex64), 10.0, "not a number"),
    ],
)
@pytest.mark.parametrize("reader", [line_integrals, transmission])
def test_bad_frames_are_refused_by_name(raw, i0, match, reader):
    with pytest.raises(RegistrationFrameError, match=match):
        reader(raw, i0, name="A")


def test_transmission_is_the_fraction_of_i0_and_its_floor_half_a_count():
    raw = np.array([[0.0, 100.0], [200.0, 400.0]], dtype=np.uint16)
    frac, floor = transmission(raw, 400.0)
    assert frac.dtype == np.float32
    assert_allclose(frac, [[0.0, 0.25], [0.5, 1.0]], rtol=0, atol=1e-7)
    assert floor == pytest.approx(0.5 / 400.0)
    frac, floor = transmission(raw)  # i0 estimated: the open field
    assert floor == pytest.approx(0.5 / estimate_i0(raw))


def test_binned_log_of_a_low_dose_frame_is_unbiased_where_the_mean_of_pixel_logs_is_not():
    """Issue 12, i0 2000 through an abdomen: ~7 counts per pixel behind the spine with 4 counts of read-out noise,
    the frame dark-corrected and clipped at 0. The registration bins the counts and takes the logarithm of each
    bin's mean (``_Frame.binned_log``): its bias is the delta method's ``var / (2 mean^2)`` of a 4 x 4 bin,
    (7 + 16) / 16 / 98 = 0.015, less the clipping at 0 (measured -0.04 to +0.005 over 5-12 counts). The mean of
    per-pixel logarithms (clipped at half a count), what it did before, is biased by 0.14-0.35, by an amount that
    changes with the local counts (it bends the bone edges), and is noisier (std 0.24 against 0.16 at 7 counts:
    about twice the variance)."""
    from spineguide.registration.anatomy.images import _Frame, _block_mean
    from spineguide.registration.drr import PanelRegion

    rng = np.random.default_rng(3)
    i0, shape, b = 2000.0, (256, 256), 4
    region = PanelRegion(0, 0, *shape)
    for counts in (5.0, 7.0, 12.0):
        raw = rng.poisson(counts, shape) + rng.normal(0.0, 4.0, shape)
        raw = np.maximum(raw, 0.0).astype(np.float32)
        truth = -np.log(counts / i0)
        new = _Frame(*transmission(raw, i0)).binned_log(region, b)
        old = _block_mean(line_integrals(raw, i0), region, b)
        assert new.shape == (shape[0] // b, shape[1] // b)
        assert abs(float(np.mean(new)) - truth) < 0.05, counts
        assert abs(float(np.mean(old)) - truth) > 0.12, counts
        assert np.std(new) < 0.75 * np.std(old), counts


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_line_integrals_in_float32_match_the_float64_formula(dtype):
    """Computed in float32 (a float32 frame is not copied first): within 2e-6 of ``ln(i0) - ln(max(I, 0.5))``
    in float64 over the whole detector range, for integer and float frames."""
    raw = np.random.default_rng(5).uniform(0.0, 65535.0, (64, 96)).astype(dtype)
    raw[0, :4] = 0
    out = line_integrals(raw, 40000.0)
    assert out.dtype == np.float32 and out.shape == raw.shape
    ref = np.log(40000.0) - np.log(np.maximum(raw.astype(np.float64), 0.5))
    assert_allclose(out, ref, rtol=0, atol=2e-6)


def test_ncc_ignores_offset_and_scale_and_sees_inversion():
    a = _blobs(1)
    assert_allclose(ncc(a, 3.0 * a + 5.0), 1.0, rtol=0, atol=EXACT_TOL)
    assert_allclose(ncc(a, -a), -1.0, rtol=0, atol=EXACT_TOL)


def test_gradient_correlation_ignores_offset_scale_and_a_linear_background():
    a = _blobs(2)
    rr, cc = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    # A linear ramp adds a constant to each derivative: removed by the NCC's mean.
    b = 0.5 * a + 2.0 + 0.01 * rr - 0.02 * cc
    interior = np.zeros(a.shape, dtype=bool)
    interior[1:-1, 1:-1] = True  # the Sobel border replicates edge pixels, which breaks a ramp
    assert_allclose(gradient_correlation(a, b, interior), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("measure", list(Similarity))
def test_every_measure_is_highest_at_alignment(measure):
    a = _blobs(3)
    mask = np.zeros(a.shape, dtype=bool)
    mask[8:-8, 8:-8] = True
    aligned = similarity(measure, a, 2.0 * a + 1.0, mask)
    shifted = similarity(measure, a, 2.0 * np.roll(a, 3, axis=1) + 1.0, mask)
    assert aligned > shifted


def test_pattern_intensity_and_gradient_difference_are_one_for_a_perfect_match():
    a = _blobs(4)
    assert_allclose(pattern_intensity(a, 1.5 * a), 1.0, rtol=0, atol=EXACT_TOL)
    assert_allclose(gradient_difference(a, 1.5 * a), 1.0, rtol=0, atol=1e-6)


def test_similarity_errors():
    a = _blobs(5)
    with pytest.raises(RegistrationError, match="one shape"):
        ncc(a, a[:-1])
    with pytest.raises(RegistrationError, match="mask shape"):
        ncc(a, a, np.ones((3, 3), dtype=bool))
    with pytest.raises(RegistrationError, match="at least 4"):
        ncc(a, a, np.zeros(a.shape, dtype=bool))
    with pytest.raises(RegistrationError, match="unknown similarity"):
        similarity("ncc", a, a)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="radius"):
        pattern_intensity(a, a, radius_px=0)
