"""Pose and correction algebra against docs/CONVENTIONS.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from spineguide.registration import Correction, Pose, PoseError, RotationAxis, reduce_to_couch

VECTOR_TOL = 1e-9  # tolerance stated in conventions-vectors.json (mm / deg)
ALGEBRA_TOL = 1e-9  # compositions of a few 3x3 products: pure round-off

translations = st.lists(st.floats(-50, 50, allow_nan=False), min_size=3, max_size=3)
# Roll kept away from +-90 deg, where [pitch, roll, yaw] is not unique (gimbal lock).
angles = st.tuples(st.floats(-170, 170), st.floats(-80, 80), st.floats(-170, 170))


def test_worked_pose_to_correction_vectors(conventions_vectors):
    for case in conventions_vectors["pose_to_correction"]:
        pose = Pose.from_six(case["pose"]["translation_mm"], case["pose"]["rotation_deg"])
        assert_allclose(pose.rotation, case["rotation_matrix"], rtol=0, atol=VECTOR_TOL)
        corr = pose.to_correction()
        assert_allclose(corr.translation_mm, case["correction"]["translation_mm"], rtol=0, atol=VECTOR_TOL)
        assert_allclose(corr.rotation_deg, case["correction"]["rotation_deg"], rtol=0, atol=VECTOR_TOL)
        assert_allclose(pose.apply(case["planned_point_mm"]), case["actual_point_mm"], rtol=0, atol=VECTOR_TOL)
        # The correction brings the actual point back to its plan.
        assert_allclose(corr.apply(case["actual_point_mm"]), case["planned_point_mm"], rtol=0, atol=VECTOR_TOL)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_patient_shifted_along_axis_gives_opposite_correction(axis, sign):
    # e.g. patient found 1 mm towards -X -> couch correction +1 mm in X.
    t = np.zeros(3)
    t[axis] = sign * 1.0
    corr = Pose.from_six(t, [0, 0, 0]).to_correction()
    assert_allclose(corr.translation_mm, -t, rtol=0, atol=ALGEBRA_TOL)
    assert_allclose(corr.rotation_deg, 0, rtol=0, atol=ALGEBRA_TOL)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_positive_rotation_follows_right_hand_rule(axis):
    # +90 deg about +X takes +Y to +Z; about +Y takes +Z to +X; about +Z takes +X to +Y.
    rot = np.zeros(3)
    rot[axis] = 90.0
    start = np.eye(3)[(axis + 1) % 3]
    end = np.eye(3)[(axis + 2) % 3]
    assert_allclose(Pose.from_six([0, 0, 0], rot).apply(start), end, rtol=0, atol=ALGEBRA_TOL)
    corr = Pose.from_six([0, 0, 0], rot / 45).to_correction()
    assert_allclose(corr.rotation_deg, -rot / 45, rtol=0, atol=ALGEBRA_TOL)


def test_euler_order_is_yaw_after_roll_after_pitch():
    p = Pose.from_six([0, 0, 0], [10.0, 20.0, 30.0])
    rx = Pose.from_six([0, 0, 0], [10.0, 0, 0])
    ry = Pose.from_six([0, 0, 0], [0, 20.0, 0])
    rz = Pose.from_six([0, 0, 0], [0, 0, 30.0])
    assert_allclose(p.rotation, rz.compose(ry).compose(rx).rotation, rtol=0, atol=ALGEBRA_TOL)


@settings(max_examples=200, deadline=None)
@given(translations, angles)
def test_six_numbers_round_trip(t, r):
    pose = Pose.from_six(t, r)
    t2, r2 = pose.six()
    assert_allclose(t2, t, rtol=0, atol=ALGEBRA_TOL)
    assert_allclose(r2, r, rtol=0, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(translations, angles)
def test_pose_compose_inverse_is_identity(t, r):
    pose = Pose.from_six(t, r)
    for ident in (pose.compose(pose.inverse()), pose.inverse().compose(pose)):
        assert_allclose(ident.matrix, np.eye(4), rtol=0, atol=1e-9)
    corr = pose.to_correction()
    assert_allclose(corr.to_pose().matrix, pose.matrix, rtol=0, atol=ALGEBRA_TOL)
    assert_allclose(Correction.compose(corr, Correction(pose.rotation, pose.translation_mm)).matrix, np.eye(4), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(translations, angles, translations, angles, st.lists(st.floats(-100, 100), min_size=3, max_size=3))
def test_composition_applies_right_operand_first(t1, r1, t2, r2, p):
    a, b = Pose.from_six(t1, r1), Pose.from_six(t2, r2)
    assert_allclose(a.compose(b).apply(p), a.apply(b.apply(p)), rtol=0, atol=1e-9)
    assert_allclose(a.compose(b).matrix, a.matrix @ b.matrix, rtol=0, atol=1e-9)


def test_pose_and_correction_do_not_mix():
    with pytest.raises(PoseError, match="Pose composes with a Pose"):
        Pose.identity().compose(Correction.identity())
    with pytest.raises(PoseError, match="Correction composes with a Correction"):
        Correction.identity().compose(Pose.identity())


@pytest.mark.parametrize(
    "rotation, message",
    [
        (np.diag([1.0, 1.0, -1.0]), "not a proper rotation"),
        (np.eye(3) * 1.01, "not a proper rotation"),
        (np.full((3, 3), np.nan), "non-finite"),
        (np.eye(2), "3x3"),
    ],
)
def test_invalid_rotation_is_refused(rotation, message):
    with pytest.raises(PoseError, match=message):
        Pose(rotation, np.zeros(3))


def test_invalid_translation_and_matrix_are_refused():
    with pytest.raises(PoseError, match="translation_mm is not finite"):
        Pose(np.eye(3), [0, np.inf, 0])
    with pytest.raises(PoseError, match="last row"):
        Pose.from_matrix(np.ones((4, 4)))
    with pytest.raises(PoseError, match="rotation_deg"):
        Pose.from_six([0, 0, 0], [1, 2])


def test_values_are_immutable():
    pose = Pose.from_six([1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError):
        pose.translation_mm[0] = 5.0
    with pytest.raises(AttributeError):
        pose.translation_mm = np.zeros(3)


# --------------------------------------------------------------- 4-DoF couch
@settings(max_examples=100, deadline=None)
@given(translations, st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.floats(-5, 5)),
       st.lists(st.floats(-60, 60), min_size=3, max_size=3))
def test_four_dof_couch_puts_target_on_plan_and_reports_residual(t, r, target):
    pose = Pose.from_six(t, r)
    result = reduce_to_couch(pose.to_correction(), [RotationAxis.YAW], target)
    assert_allclose(result.correction.rotation_deg[:2], 0, rtol=0, atol=1e-9)
    # The target lands exactly on its planned place.
    assert_allclose(result.correction.apply(pose.apply(target)), target, rtol=0, atol=1e-9)
    assert_allclose(result.residual.apply(target), target, rtol=0, atol=1e-9)
    # What is left is the rotation the couch cannot remove: pitch and roll of the patient.
    assert_allclose(result.residual_rotation_deg, result.residual.rotation_deg, rtol=0, atol=1e-12)
    assert result.residual.angle_deg() == pytest.approx(
        Pose.from_six([0, 0, 0], [r[0], r[1], 0]).angle_deg(), abs=0.05 * max(1e-3, abs(r[2])) + 1e-6
    )


def test_four_dof_residual_of_pure_pitch_is_that_pitch():
    pose = Pose.from_six([0, 0, 0], [2.0, 0, 0])
    result = reduce_to_couch(pose.to_correction(), [RotationAxis.YAW], [0, 50.0, 0])
    assert_allclose(result.residual_rotation_deg, [2.0, 0, 0], rtol=0, atol=1e-9)
    # Pitching a point 50 mm superior (room +Y) by +2 deg lifts it by 50 sin(2 deg); the couch compensates.
    assert_allclose(result.correction.translation_mm, [0, -50 * (np.cos(np.radians(2)) - 1), -50 * np.sin(np.radians(2))],
                    rtol=0, atol=1e-9)


def test_six_dof_couch_reduction_is_the_full_correction():
    pose = Pose.from_six([1, -2, 3], [1.5, -2.5, 0.7])
    result = reduce_to_couch(pose.to_correction(), list(RotationAxis), [10, 20, 30])
    assert_allclose(result.correction.matrix, pose.to_correction().matrix, rtol=0, atol=1e-9)
    assert_allclose(result.residual_rotation_deg, 0, rtol=0, atol=1e-9)
