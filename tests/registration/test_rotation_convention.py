"""The one rotation convention (docs/CONVENTIONS.md): R = Rz(yaw) Ry(roll) Rx(pitch), scipy's extrinsic "xyz"."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.spatial.transform import Rotation

from spineguide.registration.pose import Pose, rotation_matrix

#: float64 round-off of three 3x3 products.
ROTATION_TOL = 1e-14


def test_pitch_90_takes_room_y_to_room_z():
    # pitch is about room X (right-handed): +Y turns towards +Z
    assert_allclose(rotation_matrix([90.0, 0.0, 0.0]) @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], atol=ROTATION_TOL)
    assert_allclose(rotation_matrix([0.0, 90.0, 0.0]) @ [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], atol=ROTATION_TOL)
    assert_allclose(rotation_matrix([0.0, 0.0, 90.0]) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=ROTATION_TOL)


@pytest.mark.parametrize("seed", range(10))
def test_rotation_matrix_is_scipys_extrinsic_xyz_and_poses_use_it(seed):
    angles = np.random.default_rng(seed).uniform(-179, 179, 3)
    expected = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    assert_allclose(rotation_matrix(angles), expected, rtol=0, atol=ROTATION_TOL)
    assert_allclose(Pose.from_six((0.0, 0.0, 0.0), angles).rotation, expected, rtol=0, atol=ROTATION_TOL)
