"""Point-based rigid registration: exact recovery, signs, flags, rigid-body check, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from spineguide.registration.pose import Pose
from spineguide.registration.points import (
    PointFlag,
    PointRegistrationConfig,
    PointRegistrationError,
    SeedMigrationError,
    kabsch,
    line_spread_mm,
    predicted_tre_mm,
    register_points,
)

EXACT_MM = 1e-9  # noise-free points: only float64 round-off remains (coordinates ~ 100 mm)
EXACT_DEG = 1e-7  # same, in angle (atan of ~1e-11 relative errors, with Euler conversion)

#: Four seeds around a vertebra, room frame mm (spread ~10-20 mm, not coplanar).
SEEDS_MM = np.array([[8.0, -6.0, 4.0], [-9.0, -4.0, 2.0], [1.0, 12.0, -5.0], [3.0, 2.0, 14.0]])


def _measure(pose: Pose, planned: np.ndarray = SEEDS_MM) -> np.ndarray:
    return pose.apply(planned)


# ------------------------------------------------------------------ exact recovery
@settings(max_examples=60, deadline=None)
@given(
    t=st.lists(st.floats(-20, 20), min_size=3, max_size=3),
    r=st.lists(st.floats(-10, 10), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_pose_recovered_exactly_from_noise_free_points(t, r, seed):
    rng = np.random.default_rng(seed)
    planned = np.vstack([SEEDS_MM[:3] + rng.normal(0, 1.0, (3, 3)), rng.uniform(-25, 25, (rng.integers(0, 4), 3))])
    truth = Pose.from_six(t, r)
    res = register_points(planned, truth.apply(planned))
    assert_allclose(res.pose.matrix, truth.matrix, rtol=0, atol=EXACT_MM)
    assert_allclose(res.correction.matrix, truth.inverse().matrix, rtol=0, atol=EXACT_MM)
    assert res.flags == (frozenset() if line_spread_mm(planned) >= 3.0 else {PointFlag.ROTATION_UNRELIABLE})
    assert res.fre_mm < EXACT_MM


@settings(max_examples=30, deadline=None)
@given(r=st.lists(st.floats(-179, 179), min_size=3, max_size=3))
def test_kabsch_never_returns_a_reflection(r):
    pose = kabsch(SEEDS_MM, Pose.from_six([0, 0, 0], r).apply(SEEDS_MM))
    assert_allclose(np.linalg.det(pose.rotation), 1.0, rtol=0, atol=EXACT_MM)


def test_mirrored_constellation_gives_proper_rotation_and_large_fre():
    mirrored = SEEDS_MM * [1.0, 1.0, -1.0]
    res = register_points(SEEDS_MM, mirrored)
    assert_allclose(np.linalg.det(res.pose.rotation), 1.0, rtol=0, atol=EXACT_MM)
    assert res.fre_mm > 1.0  # a reflection of a non-planar set is no rigid motion


# ------------------------------------------------------------------ signs, one parameter at a time
SIGN_CASES = [
    ("x", [-1.0, 0, 0], [0, 0, 0], [1.0, 0, 0], [0, 0, 0]),
    ("y", [0, -1.0, 0], [0, 0, 0], [0, 1.0, 0], [0, 0, 0]),
    ("z", [0, 0, -1.0], [0, 0, 0], [0, 0, 1.0], [0, 0, 0]),
]


def test_patient_minus_x_1mm_gives_correction_plus_x_1mm():
    res = register_points(SEEDS_MM, SEEDS_MM + [-1.0, 0, 0])
    assert_allclose(res.correction.translation_mm, [1.0, 0, 0], rtol=0, atol=EXACT_MM)
    assert_allclose(res.correction.rotation_deg, [0, 0, 0], rtol=0, atol=EXACT_DEG)


def test_patient_plus_y_2mm_gives_correction_minus_y_2mm():
    res = register_points(SEEDS_MM, SEEDS_MM + [0, 2.0, 0])
    assert_allclose(res.correction.translation_mm, [0, -2.0, 0], rtol=0, atol=EXACT_MM)
    assert_allclose(res.correction.rotation_deg, [0, 0, 0], rtol=0, atol=EXACT_DEG)


def test_patient_minus_z_1mm_gives_correction_plus_z_1mm():
    res = register_points(SEEDS_MM, SEEDS_MM + [0, 0, -1.0])
    assert_allclose(res.correction.translation_mm, [0, 0, 1.0], rtol=0, atol=EXACT_MM)
    assert_allclose(res.correction.rotation_deg, [0, 0, 0], rtol=0, atol=EXACT_DEG)


@pytest.mark.parametrize("axis, name", [(0, "pitch"), (1, "roll"), (2, "yaw")])
def test_patient_rotated_plus_2deg_gives_correction_minus_2deg(axis, name):
    # Seeds turned +2 deg about the room axis through the isocentre (right-hand
    # rule): the couch must turn -2 deg about the same axis, and no translation.
    rot = np.zeros(3)
    rot[axis] = 2.0
    res = register_points(SEEDS_MM, Pose.from_six([0, 0, 0], rot).apply(SEEDS_MM))
    expected = np.zeros(3)
    expected[axis] = -2.0
    assert_allclose(res.correction.rotation_deg, expected, rtol=0, atol=EXACT_DEG, err_msg=name)
    assert_allclose(res.correction.translation_mm, [0, 0, 0], rtol=0, atol=EXACT_MM)


def test_plus_yaw_moves_plus_x_seed_towards_plus_y():
    # Right-hand rule about +Z: +X turns towards +Y; the correction undoes it.
    res = register_points(SEEDS_MM, Pose.from_six([0, 0, 0], [0, 0, 5.0]).apply(SEEDS_MM))
    moved = res.pose.apply([10.0, 0, 0])
    assert moved[1] > 0
    assert_allclose(res.correction.apply(moved), [10.0, 0, 0], rtol=0, atol=EXACT_MM)


# ------------------------------------------------------------------ few / collinear seeds
def test_one_seed_gives_translation_only_flagged():
    res = register_points(SEEDS_MM[:1], SEEDS_MM[:1] + [0.5, -0.25, 1.0])
    assert PointFlag.TRANSLATION_ONLY in res.flags
    assert not res.rotation_estimated
    assert_allclose(res.correction.translation_mm, [-0.5, 0.25, -1.0], rtol=0, atol=EXACT_MM)
    assert_allclose(res.correction.rotation, np.eye(3), rtol=0, atol=0)


def test_two_seeds_give_mean_translation_flagged():
    shift = np.array([1.0, 2.0, -3.0])
    res = register_points(SEEDS_MM[:2], SEEDS_MM[:2] + shift)
    assert PointFlag.TRANSLATION_ONLY in res.flags
    assert_allclose(res.pose.translation_mm, shift, rtol=0, atol=EXACT_MM)


def test_nearly_collinear_seeds_flag_rotation_unreliable():
    # Three seeds along +Y within 0.3 mm of one line: the roll about that line is undetermined.
    planned = np.array([[0.0, -10.0, 0.0], [0.3, 0.0, -0.2], [0.0, 10.0, 0.1]])
    res = register_points(planned, planned + [1.0, 0, 0])
    assert res.line_spread_mm < 0.3
    assert PointFlag.ROTATION_UNRELIABLE in res.flags
    assert not res.rotation_reliable
    assert_allclose(res.correction.translation_mm, [-1.0, 0, 0], rtol=0, atol=EXACT_MM)


def test_spread_seeds_are_not_flagged():
    res = register_points(SEEDS_MM[:3], SEEDS_MM[:3])
    assert res.line_spread_mm > 3.0
    assert res.rotation_reliable


# ------------------------------------------------------------------ rigid-body check
def test_migrated_seed_is_excluded_and_pose_from_the_rest():
    truth = Pose.from_six([1.0, -2.0, 0.5], [1.0, -0.5, 2.0])
    measured = truth.apply(SEEDS_MM)
    measured[2] += [0.0, 2.5, 0.0]  # seed S2 moved 2.5 mm inside the patient
    res = register_points(SEEDS_MM, measured, names=["F1", "F2", "F3", "F4"])
    assert res.migrated == ("F3",)
    assert PointFlag.SEED_EXCLUDED in res.flags
    assert res.used.tolist() == [True, True, False, True]
    assert_allclose(res.pose.matrix, truth.matrix, rtol=0, atol=EXACT_MM)
    assert_allclose(res.residuals_mm[2], 2.5, rtol=0, atol=EXACT_MM)
    assert res.distance_change_mm[2] > 1.5


def test_small_distance_change_within_limit_keeps_every_seed():
    measured = SEEDS_MM.copy()
    measured[0] += [0.0, 0.0, 0.5]  # below the 1.5 mm default limit
    res = register_points(SEEDS_MM, measured)
    assert res.used.all() and res.migrated == ()
    assert res.fre_mm > 0


def test_migration_limit_is_configurable():
    measured = SEEDS_MM.copy()
    measured[0] += [1.2, -1.2, 0.0]  # changes S0's three distances by 1.19-1.43 mm
    assert register_points(SEEDS_MM, measured).migrated == ()
    res = register_points(SEEDS_MM, measured, config=PointRegistrationConfig(migration_limit_mm=1.0))
    assert res.migrated == ("S0",)


def test_ambiguous_culprit_is_refused():
    measured = SEEDS_MM.copy()
    measured[0] += [0.0, 0.0, 1.0]  # only the S0-S3 distance changes by more than 0.5 mm
    with pytest.raises(SeedMigrationError, match="ambiguous: removing any of S0, S3"):
        register_points(SEEDS_MM, measured, config=PointRegistrationConfig(migration_limit_mm=0.5))


def test_migrated_seed_of_three_is_refused_by_default():
    measured = SEEDS_MM[:3].copy()
    measured[0] += [3.0, -3.0, 0.0]  # both S0 distances change by ~3.5 mm, S1-S2 unchanged
    with pytest.raises(SeedMigrationError, match=r"seed S0 has migrated.*leaves 2 seeds"):
        register_points(SEEDS_MM[:3], measured)


def test_migrated_seed_of_three_gives_translation_only_when_two_may_remain():
    measured = SEEDS_MM[:3].copy() + [1.0, 0, 0]
    measured[0] += [3.0, -3.0, 0.0]
    cfg = PointRegistrationConfig(min_seeds_after_exclusion=2)
    res = register_points(SEEDS_MM[:3], measured, config=cfg)
    assert res.migrated == ("S0",)
    assert {PointFlag.SEED_EXCLUDED, PointFlag.TRANSLATION_ONLY} <= res.flags
    assert_allclose(res.pose.translation_mm, [1.0, 0, 0], rtol=0, atol=EXACT_MM)


def test_two_migrated_seeds_are_refused():
    measured = SEEDS_MM.copy()
    # S0 and S1 each moved 4 mm away from the centroid: every distance of
    # either changes by 2.9-6.5 mm, so no single exclusion restores rigidity.
    centroid = SEEDS_MM.mean(axis=0)
    for k in (0, 1):
        away = SEEDS_MM[k] - centroid
        measured[k] += 4.0 * away / np.linalg.norm(away)
    with pytest.raises(SeedMigrationError, match="no single seed explains it"):
        register_points(SEEDS_MM, measured)


def test_two_seeds_with_changed_distance_are_refused():
    measured = SEEDS_MM[:2].copy()
    measured[0] += [3.0, 0.0, 0.0]
    with pytest.raises(SeedMigrationError, match="distance S0-S1 changed"):
        register_points(SEEDS_MM[:2], measured)


# ------------------------------------------------------------------ error paths
def test_no_seeds_is_an_error():
    with pytest.raises(PointRegistrationError, match="at least 1 seed"):
        register_points(np.zeros((0, 3)), np.zeros((0, 3)))


def test_count_mismatch_is_an_error():
    with pytest.raises(PointRegistrationError, match="holds 3 points, expected 4"):
        register_points(SEEDS_MM, SEEDS_MM[:3])


def test_non_finite_point_is_an_error():
    bad = SEEDS_MM.copy()
    bad[1, 2] = np.nan
    with pytest.raises(PointRegistrationError, match=r"points \[1\] are not finite"):
        register_points(SEEDS_MM, bad)


def test_wrong_shape_is_an_error():
    with pytest.raises(PointRegistrationError, match=r"\(N, 3\)"):
        register_points(SEEDS_MM[:, :2], SEEDS_MM[:, :2])


def test_duplicate_names_are_an_error():
    with pytest.raises(PointRegistrationError, match="unique"):
        register_points(SEEDS_MM[:2], SEEDS_MM[:2], names=["F1", "F1"])


def test_kabsch_needs_three_points():
    with pytest.raises(PointRegistrationError, match="at least 3 seeds, got 2"):
        kabsch(SEEDS_MM[:2], SEEDS_MM[:2])


@pytest.mark.parametrize("kwargs, match", [
    ({"migration_limit_mm": 0.0}, "migration_limit_mm"),
    ({"min_line_spread_mm": float("nan")}, "min_line_spread_mm"),
    ({"min_seeds_after_exclusion": 0}, "min_seeds_after_exclusion"),
    ({"fle_floor_mm": -0.1}, "fle_floor_mm"),
    ({"max_predicted_tre_mm": float("inf")}, "max_predicted_tre_mm"),
])
def test_bad_config_is_an_error(kwargs, match):
    with pytest.raises(PointRegistrationError, match=match):
        PointRegistrationConfig(**kwargs)


# ---------------------------------------------------------------------------- predicted target error (TRE)
#: Monte Carlo over 4000 noise draws: the RMS of 4000 squared errors (about 3 degrees of freedom each) scatters
#: by ~0.7 % (1 sigma) about its expectation; the formula is first order in FLE / seed spread (0.3 / 10 here).
#: Measured: 0.4-1.4 % apart on these three layouts; 5 % is beyond 7 sigma of the sampling.
TRE_RTOL = 0.05


@pytest.mark.parametrize("layout, target", [
    (SEEDS_MM, (0.0, 0.0, 0.0)),
    (SEEDS_MM, (0.0, 30.0, -20.0)),
    (np.array([[20.0, 0.0, 0.0], [24.0, 6.0, 0.0], [22.0, 0.0, 7.0]]), (0.0, 0.0, 0.0)),  # compact, 22 mm off
])
def test_predicted_tre_matches_the_scatter_of_kabsch_fits_over_localisation_noise(layout, target):
    fle = 0.3  # 3D RMS: sigma 0.3 / sqrt(3) per axis
    rng = np.random.default_rng(4)
    target = np.asarray(target)
    pose = Pose.from_six([1.0, -2.0, 0.5], [1.0, 0.5, -1.5])
    err2 = []
    for _ in range(4000):
        measured = pose.apply(layout) + rng.normal(scale=fle / np.sqrt(3.0), size=layout.shape)
        fit = kabsch(layout, measured)
        err2.append(np.sum((fit.apply(target[None])[0] - pose.apply(target[None])[0]) ** 2))
    assert predicted_tre_mm(layout, fle, target) == pytest.approx(np.sqrt(np.mean(err2)), rel=TRE_RTOL)


def test_collinear_seeds_predict_an_infinite_target_error():
    line = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [12.0, 0.0, 0.0]])
    assert predicted_tre_mm(line, 0.1) == np.inf
    with pytest.raises(PointRegistrationError, match="N >= 3"):
        predicted_tre_mm(line[:2], 0.1)


def test_a_compact_constellation_far_from_the_target_is_flagged_target_unreliable():
    # Three seeds 6-7 mm apart, 25 mm from the isocentre: a localisation error of ~0.3 mm (FRE 0.17 mm) tilts
    # the fit enough to move the isocentre by about a millimetre.
    compact = np.array([[25.0, 0.0, 0.0], [30.0, 4.0, 0.0], [27.0, 0.0, 6.0]])
    noise = np.array([[0.2, -0.15, 0.1], [-0.2, 0.1, -0.15], [0.1, 0.1, 0.2]])
    res = register_points(compact, compact + noise)
    assert res.predicted_tre_mm > 0.5
    assert PointFlag.TARGET_UNRELIABLE in res.flags
    # The same noise on the spread seeds around the isocentre: a well-fixed target.
    res = register_points(SEEDS_MM, SEEDS_MM + np.r_[noise, [[0.0, 0.1, -0.1]]])
    assert res.predicted_tre_mm < 0.3
    assert PointFlag.TARGET_UNRELIABLE not in res.flags
    # Noise-free: the floor FLE (0.1 mm) alone; still flagged only when the layout amplifies it past the limit.
    res = register_points(compact, compact)
    assert res.predicted_tre_mm == pytest.approx(predicted_tre_mm(compact, 0.1))
    assert (PointFlag.TARGET_UNRELIABLE in res.flags) == (res.predicted_tre_mm > 0.5)


def test_translation_only_has_no_predicted_target_error():
    res = register_points(SEEDS_MM[:2], SEEDS_MM[:2])
    assert np.isnan(res.predicted_tre_mm)


def _tre_by_principal_axes(planned, fle, target):
    """Fitzpatrick's eq. 44 term by term: principal axes of the layout, each axis's d_k and f_k."""
    centred = planned - planned.mean(axis=0)
    t = np.asarray(target) - planned.mean(axis=0)
    _, axes = np.linalg.eigh(centred.T @ centred)
    total = 0.0
    for k in range(3):
        ax = axes[:, k]
        total += (t @ t - (t @ ax) ** 2) / np.mean(np.sum(centred ** 2, axis=1) - (centred @ ax) ** 2)
    return fle * np.sqrt((1.0 + total / 3.0) / len(planned))


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 8), st.integers(0, 2 ** 31 - 1))
def test_predicted_tre_closed_form_equals_the_principal_axes_sum(n, seed):
    rng = np.random.default_rng(seed)
    planned = rng.normal(scale=15.0, size=(n, 3)) + rng.normal(scale=20.0, size=3)
    target = rng.normal(scale=10.0, size=3)
    assert predicted_tre_mm(planned, 0.2, target) == pytest.approx(_tre_by_principal_axes(planned, 0.2, target),
                                                                   rel=1e-9)
