"""The one-view motion prior and covariance propagation (registration/motion_prior.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spineguide.registration.motion_prior import (
    MotionPrior,
    MotionPriorError,
    check_covariance,
    pose_from_six,
    pose_six,
    target_covariance_mm2,
)
from spineguide.registration.pose import Pose


def test_covariance_grows_linearly_with_elapsed_time():
    prior = MotionPrior(Pose.identity(), diffusion=[1, 2, 3, 4, 5, 6], floor=[0.5] * 6)
    np.testing.assert_allclose(np.diag(prior.covariance(0.0)), [0.5] * 6)
    np.testing.assert_allclose(np.diag(prior.covariance(2.0)), [2.5, 4.5, 6.5, 8.5, 10.5, 12.5])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_elapsed_time_must_be_finite_and_non_negative(bad):
    with pytest.raises(MotionPriorError, match="elapsed"):
        MotionPrior(Pose.identity()).covariance(bad)


@pytest.mark.parametrize("cov, match", [
    (np.eye(5), "6x6"),
    (np.full((6, 6), np.nan), "non-finite"),
    (np.triu(np.ones((6, 6))), "symmetric"),
    (-np.eye(6), "semi-definite"),
])
def test_bad_reference_covariance_is_refused(cov, match):
    with pytest.raises(MotionPriorError, match=match):
        MotionPrior(Pose.identity(), reference_cov=cov)


def test_negative_diffusion_is_refused():
    with pytest.raises(MotionPriorError, match="diffusion"):
        MotionPrior(Pose.identity(), diffusion=[-1, 0, 0, 0, 0, 0])


def test_translation_covariance_passes_through_unchanged():
    cov = np.diag([1.0, 4.0, 9.0, 0.0, 0.0, 0.0])
    out = target_covariance_mm2(Pose.identity(), cov, [10.0, -20.0, 5.0])
    np.testing.assert_allclose(out, np.diag([1.0, 4.0, 9.0]), atol=1e-6)


def test_yaw_variance_moves_a_target_off_the_isocentre_tangentially():
    # Yaw (about room Z) of sigma s deg at a target r mm from the axis along X moves it along Y by r * s * pi/180.
    s_deg, r_mm = 0.5, 40.0
    cov = np.zeros((6, 6))
    cov[5, 5] = s_deg**2
    out = target_covariance_mm2(Pose.identity(), cov, [r_mm, 0.0, 0.0])
    expected = (r_mm * np.radians(s_deg)) ** 2
    assert out[1, 1] == pytest.approx(expected, rel=1e-6)
    assert out[0, 0] == pytest.approx(0.0, abs=1e-9)
    assert out[2, 2] == pytest.approx(0.0, abs=1e-9)


def test_propagated_covariance_matches_monte_carlo():
    rng = np.random.default_rng(3)
    pose = Pose.from_six([1.0, -0.5, 0.3], [0.4, -0.2, 0.6])
    a = rng.normal(size=(6, 6)) * 0.1
    cov = a @ a.T + np.diag([0.04, 0.04, 0.04, 0.01, 0.01, 0.01])
    target = np.array([20.0, -35.0, 15.0])
    analytic = target_covariance_mm2(pose, cov, target)
    draws = rng.multivariate_normal(pose_six(pose), cov, size=40000)
    pts = np.array([pose_from_six(x).apply(target) for x in draws])
    np.testing.assert_allclose(np.cov(pts.T), analytic, rtol=0.05, atol=2e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6))
def test_six_vector_round_trip(x):
    x = np.array(x)
    np.testing.assert_allclose(pose_six(pose_from_six(x)), x, atol=1e-9)


def test_check_covariance_symmetrises_and_freezes():
    c = check_covariance(np.eye(3) * 2, 3, "t")
    assert not c.flags.writeable
