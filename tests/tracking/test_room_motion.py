"""Patient motion traces give the poses they state."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.pose import Pose
from spineguide.tracking.room.motion import (
    Breathing,
    Drift,
    MotionError,
    MotionSum,
    StaticPose,
    SuddenShift,
    random_setup_pose,
)

POSE_TOL = 1e-9  # closed-form poses, float64


def test_static_pose_is_constant():
    p = Pose.from_six([1, -2, 3], [0.5, -1, 2])
    trace = StaticPose(p)
    for t in (0.0, 1.0, 100.0):
        assert_allclose(trace.pose_at(t).matrix, p.matrix, rtol=0, atol=POSE_TOL)


def test_drift_moves_linearly_from_its_start():
    trace = Drift((0.1, 0.0, -0.05), (0.0, 0.0, 0.02), start_s=10.0)
    assert_allclose(trace.pose_at(5.0).matrix, np.eye(4), rtol=0, atol=POSE_TOL)
    t, r = trace.pose_at(30.0).six()
    assert_allclose(t, [2.0, 0.0, -1.0], rtol=0, atol=POSE_TOL)
    assert_allclose(r, [0.0, 0.0, 0.4], rtol=0, atol=POSE_TOL)


def test_sudden_shift_steps_at_its_time():
    p = Pose.from_six([0, 3, 0], [0, 0, 0])
    trace = SuddenShift(12.5, p)
    assert_allclose(trace.pose_at(12.4).translation_mm, [0, 0, 0], rtol=0, atol=POSE_TOL)
    assert_allclose(trace.pose_at(12.5).translation_mm, [0, 3, 0], rtol=0, atol=POSE_TOL)


def test_breathing_is_zero_at_exhale_full_at_inhale_and_periodic():
    trace = Breathing(amplitude_mm=(0.0, 1.0, 1.5), period_s=4.0)
    assert_allclose(trace.pose_at(0.0).translation_mm, [0, 0, 0], rtol=0, atol=POSE_TOL)
    assert_allclose(trace.pose_at(2.0).translation_mm, [0, 1.0, 1.5], rtol=0, atol=POSE_TOL)
    for t in (0.3, 1.1, 2.7):
        assert_allclose(trace.pose_at(t + 4.0).translation_mm, trace.pose_at(t).translation_mm, rtol=0, atol=POSE_TOL)
    # cos^4 at a quarter period: 1 - cos^4(pi/4) = 3/4 of the amplitude.
    assert_allclose(trace.pose_at(1.0).translation_mm, [0, 0.75, 1.125], rtol=0, atol=POSE_TOL)
    assert_allclose(trace.pose_at(1.0).rotation_deg, [0, 0, 0], rtol=0, atol=POSE_TOL)


def test_sum_applies_components_in_order():
    setup = Pose.from_six([2, 0, -1], [0, 0, 90])
    trace = MotionSum((StaticPose(setup), Breathing(amplitude_mm=(0.0, 0.0, 2.0), period_s=4.0)))
    pose = trace.pose_at(2.0)
    # Breathing after setup: p -> R_s p + t_s + b, so the translation is t_s + b and the rotation R_s.
    assert_allclose(pose.translation_mm, [2, 0, 1], rtol=0, atol=POSE_TOL)
    assert_allclose(pose.rotation, setup.rotation, rtol=0, atol=POSE_TOL)
    assert len(trace.poses_at([0.0, 1.0, 2.0])) == 3


def test_random_setup_pose_is_seeded_and_within_bounds():
    a = random_setup_pose(np.random.default_rng(11), 10.0, 3.0)
    b = random_setup_pose(np.random.default_rng(11), 10.0, 3.0)
    assert_allclose(a.matrix, b.matrix, rtol=0, atol=0)
    t, r = a.six()
    assert np.all(np.abs(t) <= 10.0) and np.all(np.abs(r) <= 3.0 + POSE_TOL)


def test_bad_motion_parameters_are_errors():
    with pytest.raises(MotionError, match="breathing period_s must be positive"):
        Breathing(period_s=0.0)
    with pytest.raises(MotionError, match="velocity_mm_per_s must be 3 finite numbers"):
        Drift((1.0, 2.0))
    with pytest.raises(MotionError, match="a motion sum needs at least one component"):
        MotionSum(())
    with pytest.raises(MotionError, match="has no pose_at"):
        MotionSum((Pose.identity(),))
    with pytest.raises(MotionError, match="time must be finite"):
        StaticPose(Pose.identity()).pose_at(float("nan"))
    with pytest.raises(MotionError, match="rng must be a numpy Generator"):
        random_setup_pose(3)
    with pytest.raises(MotionError, match="max_rotation_deg must be >= 0"):
        random_setup_pose(np.random.default_rng(0), 1.0, -1.0)


def test_the_simulators_motion_trace_is_the_room_motion_model():
    """MotionTrace (the simulators' JSON form) computes its poses with room.motion: drift + Z wobble + shifts."""
    import math

    from spineguide.tracking.sim.simulators import MotionTrace

    trace = MotionTrace(drift_mm_per_min=(0.6, -1.2, 0.3), wobble_mm=0.5, wobble_period_s=4.0,
                        shifts=((10.0, (3.0, 0.0, -1.0)), (20.0, (0.0, 2.0, 0.0))))
    for t_s in (0.0, 1.0, 9.999, 10.0, 15.0, 20.0, 33.3):
        wobble = 0.5 * math.sin(2 * math.pi * t_s / 4.0)
        expected = np.array([0.6, -1.2, 0.3]) * t_s / 60.0 + np.array([0.0, 0.0, wobble])
        expected += np.array([3.0, 0.0, -1.0]) * (t_s >= 10.0) + np.array([0.0, 2.0, 0.0]) * (t_s >= 20.0)
        pose = trace.pose(t_s)
        assert_allclose(pose.translation_mm, expected, rtol=0, atol=1e-12)
        assert_allclose(pose.rotation_deg, 0.0, atol=1e-12)
    assert MotionTrace.from_json(trace.to_json()) == trace
