"""One-view gating: the 95 % bound of the deviation, not its estimate, must lie within tolerance (docs/ONE_VIEW.md).

Exhaustive cases and property-based tests of :func:`judge_measurement` with covariances: whenever it grants
ENABLE, every point of the joint 95 % ellipsoid (so the truth, whenever the covariance is honest and the truth
lies in it) is within every tolerance; every HOLD of a one-view pair names its imager.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spineguide.tracking.errors import TrackingError
from spineguide.tracking.service.gating import (
    CHI2_3DOF_95,
    Beam,
    GatingConfig,
    GatingState,
    HoldReason,
    Measurement,
    judge_measurement,
)

NOW = 1_764_070_000.0
CFG = GatingConfig()
SMALL = np.diag([0.01, 0.01, 0.01])  # 0.1 mm sigma per axis
ROT_SMALL = np.diag([0.0025] * 3)  # 0.05 deg


def one_view(dev=(0.1, 0.0, 0.0), cov=SMALL, rot=(0.0, 0.0, 0.0), rot_cov=ROT_SMALL, pair_id=1, age_s=0.05,
             velocity=None, view="B"):
    return Measurement(pair_id, NOW - age_s, HoldReason.OK, np.array(dev), np.array(rot), velocity, view,
                       None if cov is None else np.array(cov), None if rot_cov is None else np.array(rot_cov))


def test_confident_one_view_pair_within_tolerance_enables_and_names_its_view():
    decision, state = judge_measurement(GatingState(), one_view(), NOW, CFG)
    assert decision.beam is Beam.ENABLE and decision.reason is HoldReason.OK
    assert decision.one_view == "B"
    # 95 % bound: |d| + sqrt(chi2 * lambda_max) = 0.1 + sqrt(7.81 * 0.01).
    assert decision.deviation_bound_mm == pytest.approx(0.1 + math.sqrt(CHI2_3DOF_95 * 0.01))


def test_estimate_within_but_bound_beyond_tolerance_holds_uncertain():
    # Out-of-plane (Y) sigma 0.4 mm: the bound 0.1 + 2.8 * 0.4 = 1.22 mm exceeds 1 mm.
    cov = np.diag([0.01, 0.16, 0.01])
    decision, state = judge_measurement(GatingState(), one_view(cov=cov), NOW, CFG)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.ONE_VIEW_UNCERTAIN
    assert decision.one_view == "B" and state.rearm_needed


def test_estimate_beyond_tolerance_holds_one_view_out_of_tolerance():
    decision, _ = judge_measurement(GatingState(), one_view(dev=(1.2, 0, 0)), NOW, CFG)
    assert decision.reason is HoldReason.ONE_VIEW_OUT_OF_TOLERANCE and decision.one_view == "B"


def test_per_axis_bound_applies():
    cfg = GatingConfig(tolerance_3d_mm=2.0, tolerance_axis_mm=(0.5, 2.0, 2.0))
    # X estimate 0.3 mm, X sigma 0.1 mm: bound 0.3 + 0.28 = 0.58 > 0.5.
    decision, _ = judge_measurement(GatingState(), one_view(dev=(0.3, 0, 0)), NOW, cfg)
    assert decision.reason is HoldReason.ONE_VIEW_UNCERTAIN
    decision, _ = judge_measurement(GatingState(), one_view(dev=(0.2, 0, 0)), NOW, cfg)
    assert decision.beam is Beam.ENABLE


def test_rotation_bound_applies():
    # Rotation estimate 0.5 deg, sigma 0.25 deg: bound 0.5 + 0.70 > 1 deg.
    decision, _ = judge_measurement(GatingState(), one_view(rot=(0.5, 0, 0), rot_cov=np.diag([0.0625, 0, 0])),
                                    NOW, CFG)
    assert decision.reason is HoldReason.ONE_VIEW_UNCERTAIN
    decision, _ = judge_measurement(GatingState(), one_view(rot=(1.1, 0, 0)), NOW, CFG)
    assert decision.reason is HoldReason.ONE_VIEW_OUT_OF_TOLERANCE


def test_velocity_bound_applies_to_where_the_target_will_be():
    # Now 0.3 mm, moving 1.5 mm/s along X: at the expiry (acquired + 0.2 s) 0.6 mm, + bound 0.28 mm = 0.88: enable.
    d, _ = judge_measurement(GatingState(), one_view(dev=(0.3, 0, 0), velocity=np.array([1.5, 0, 0])), NOW, CFG)
    assert d.beam is Beam.ENABLE
    # Moving 2.5 mm/s: 0.8 mm ahead, + 0.28 = 1.08: uncertain.
    d, _ = judge_measurement(GatingState(), one_view(dev=(0.3, 0, 0), velocity=np.array([2.5, 0, 0])), NOW, CFG)
    assert d.reason is HoldReason.ONE_VIEW_UNCERTAIN
    # Moving 4 mm/s: the estimate itself leaves tolerance by expiry (1.1 mm).
    d, _ = judge_measurement(GatingState(), one_view(dev=(0.3, 0, 0), velocity=np.array([4.0, 0, 0])), NOW, CFG)
    assert d.reason is HoldReason.ONE_VIEW_OUT_OF_TOLERANCE


@pytest.mark.parametrize("cov", [
    np.full((3, 3), np.nan),
    np.array([[1.0, 0.5, 0], [0.0, 1.0, 0], [0, 0, 1.0]]),  # not symmetric
    -np.eye(3),  # not positive semi-definite
])
def test_bad_covariance_holds_internal_error(cov):
    decision, _ = judge_measurement(GatingState(), one_view(cov=cov), NOW, CFG)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.INTERNAL_ERROR
    assert decision.one_view == "B"


def test_one_view_measurement_without_covariance_is_refused():
    with pytest.raises(TrackingError, match="covariance|cov"):
        one_view(cov=None)
    with pytest.raises(TrackingError, match="3x3"):
        one_view(cov=np.eye(2))


@pytest.mark.parametrize("reason", [HoldReason.ONE_VIEW_REFUSED, HoldReason.ONE_VIEW_NO_REFERENCE])
def test_refusals_keep_their_one_view_reason_and_imager(reason):
    m = Measurement(3, NOW - 0.05, reason, one_view="A")
    decision, _ = judge_measurement(GatingState(), m, NOW, CFG)
    assert decision.reason is reason and decision.one_view == "A"


def test_stale_one_view_pair_names_its_imager():
    decision, _ = judge_measurement(GatingState(), one_view(age_s=0.5), NOW, CFG)
    assert decision.reason is HoldReason.STALE_FRAME and decision.one_view == "B"


def test_stereo_behaviour_is_unchanged_without_covariance():
    m = Measurement(1, NOW - 0.05, HoldReason.OK, np.array([0.9, 0, 0]), np.zeros(3))
    decision, _ = judge_measurement(GatingState(), m, NOW, CFG)
    assert decision.beam is Beam.ENABLE and decision.one_view is None and decision.deviation_bound_mm is None


finite = st.floats(-1.5, 1.5, allow_nan=False)


@st.composite
def covariances(draw, scale_max):
    a = np.array(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))).reshape(3, 3)
    s = draw(st.floats(0.0, scale_max))
    return s * s * (a @ a.T)


@settings(max_examples=400, deadline=None)
@given(st.lists(finite, min_size=3, max_size=3), covariances(0.6), st.lists(st.floats(-1.2, 1.2), min_size=3, max_size=3),
       covariances(0.4), st.integers(0, 4))
def test_enable_means_the_whole_95_percent_ellipsoid_is_within_tolerance(dev, cov, rot, rot_cov, seed):
    cfg = GatingConfig(tolerance_3d_mm=1.0, tolerance_axis_mm=(0.8, 1.0, 0.9), tolerance_rotation_deg=1.0)
    m = one_view(dev=dev, cov=cov, rot=rot, rot_cov=rot_cov)
    decision, _ = judge_measurement(GatingState(), m, NOW, cfg)
    assert decision.one_view == "B"
    if decision.beam is not Beam.ENABLE:
        assert decision.reason in (HoldReason.ONE_VIEW_UNCERTAIN, HoldReason.ONE_VIEW_OUT_OF_TOLERANCE)
        return
    # Points on the ellipsoid's surface (and its axis extremes): every one must be within every tolerance.
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(200, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w, v = np.linalg.eigh(cov)
    half = v @ np.diag(np.sqrt(CHI2_3DOF_95 * np.maximum(w, 0))) @ v.T
    axes = np.vstack([u, v.T, -v.T])
    pts = np.asarray(dev) + axes @ half.T
    assert np.all(np.linalg.norm(pts, axis=1) <= cfg.tolerance_3d_mm + 1e-9)
    assert np.all(np.abs(pts) <= np.asarray(cfg.tolerance_axis_mm) + 1e-9)
    wr, vr = np.linalg.eigh(rot_cov)
    half_r = vr @ np.diag(np.sqrt(CHI2_3DOF_95 * np.maximum(wr, 0))) @ vr.T
    rpts = np.asarray(rot) + np.vstack([u, vr.T, -vr.T]) @ half_r.T
    assert np.all(np.abs(rpts) <= cfg.tolerance_rotation_deg + 1e-9)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=3, max_size=3), covariances(0.6))
def test_more_uncertainty_never_turns_a_hold_into_an_enable(dev, cov):
    m_small = one_view(dev=dev, cov=cov)
    m_big = one_view(dev=dev, cov=cov * 2.0 + np.eye(3) * 0.01)
    small, _ = judge_measurement(GatingState(), m_small, NOW, CFG)
    big, _ = judge_measurement(GatingState(), m_big, NOW, CFG)
    if small.beam is Beam.HOLD:
        assert big.beam is Beam.HOLD
