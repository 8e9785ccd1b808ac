"""One-view fiducial localisation: the MAP pose from one view against known truth, honest covariances, refusals.

Synthetic cases project the planned seeds at a known pose through the default
room (0.4 mm pitch, magnification 1.64) with seeded Gaussian centre noise of
the configured error model; one image-level case renders a clinic-chain frame.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from spineguide.registration.motion_prior import MotionPrior, MotionPriorError, pose_six
from spineguide.registration.pose import Pose
from spineguide.tracking.errors import FiducialConfigError, FiducialNotFoundError, FrameError
from spineguide.tracking.localisation.flatfield import FlatField
from spineguide.tracking.localisation.one_view import (
    CHI2_3_95,
    OneViewConfig,
    fit_one_view,
    localise_one_view,
    out_of_plane_axis,
    prior_from_stereo_history,
)
from spineguide.tracking.room.chain import ChainConfig, RealisticSimulator
from spineguide.tracking.room.rooms import room_geometry
from spineguide.tracking.service import gating
from tests.synthetic import small_thoracolumbar

PANEL = 512
#: Noise-free seeds and a prior centred on the truth: the MAP is the truth (least-squares convergence).
EXACT_TOL_MM = 1e-5
#: Noise-free seeds, prior 2 mm off (7 prior sigmas): the in-plane deviation is measured; what is left is
#: the prior's pull through the rotations and the out-of-plane shift, within 3 reported in-plane sigmas
#: (~0.045 mm each here) and far inside the issue's 0.5 mm.
IN_PLANE_SIGMAS = 3.0
IN_PLANE_TOL_MM = 0.15
#: Coverage of a 95 % region over 400 draws: binomial sd 1.1 %, so 92-98 % is 3 sd.
COVERAGE_RANGE = (0.92, 0.98)
#: Clinic frame at i0 6000: seed centres to ~0.3 px (0.07 mm at the isocentre); 0.3 mm in-plane leaves room
#: for a seed over bone.
IMAGE_IN_PLANE_TOL_MM = 0.3

SEEDS = np.array([[-6.6, 3.9, 6.5], [-31.3, -5.0, -17.9], [3.2, 8.4, -40.2], [15.0, -20.0, 10.0]])
NAMES = ("F1", "F2", "F3", "F4")


@functools.lru_cache(maxsize=1)
def _geometry():
    return room_geometry("default", PANEL)


def _observe(pose: Pose, imager: str, noise_px: float = 0.0, seed: int = 0, seeds=SEEDS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _geometry()[imager].project(pose.apply(seeds)) + rng.normal(0.0, noise_px, (len(seeds), 2))


def _snr(n: int = len(SEEDS), value: float = 15.0) -> np.ndarray:
    return np.full(n, value)


def _in_plane(v: np.ndarray, axis: np.ndarray) -> np.ndarray:
    return v - (v @ axis) * axis


# ---------------------------------------------------------------------------- physics against known truth
def test_noise_free_seeds_and_a_prior_at_the_truth_give_the_truth():
    truth = Pose.from_six([1.2, -0.7, 0.4], [0.5, -0.3, 0.2])
    res = fit_one_view("A", _geometry(), SEEDS, NAMES, _observe(truth, "A"), _snr(), MotionPrior(truth), 1.0)
    assert res.ok, res.reason
    assert_allclose(pose_six(res.pose), pose_six(truth), rtol=0, atol=EXACT_TOL_MM)
    assert_allclose(res.deviation_mm, truth.translation_mm, rtol=0, atol=EXACT_TOL_MM)


@pytest.mark.parametrize("imager", ["A", "B"])
def test_in_plane_deviation_is_measured_when_the_prior_is_2mm_off(imager):
    truth = Pose.from_six([1.5, -1.0, 0.8], [0.3, -0.2, 0.1])
    prior = MotionPrior(Pose.from_six([0.0, 1.0, -1.0], [0.0, 0.0, 0.0]))
    res = fit_one_view(imager, _geometry(), SEEDS, NAMES, _observe(truth, imager), _snr(), prior, 2.0)
    axis = out_of_plane_axis(_geometry(), imager)
    err = res.deviation_mm - truth.translation_mm
    assert np.linalg.norm(_in_plane(err, axis)) <= min(IN_PLANE_TOL_MM, IN_PLANE_SIGMAS * res.in_plane_sigma_mm)
    # Out of plane the estimate leans on the prior; the reported sigma says so.
    assert res.out_of_plane_sigma_mm > 3 * res.in_plane_sigma_mm


def test_out_of_plane_axis_is_the_ray_from_the_source_through_the_isocentre():
    g = _geometry()
    for name in g.names:
        axis = out_of_plane_axis(g, name)
        assert_allclose(np.linalg.norm(axis), 1.0, rtol=0, atol=1e-12)
        # A point moved along the axis projects onto the principal ray's pixel: the isocentre's.
        assert_allclose(g[name].project(3.0 * axis), g[name].project(np.zeros(3)), rtol=0, atol=1e-9)


def test_patient_moved_along_the_ray_only_is_not_seen_but_bounded():
    axis = out_of_plane_axis(_geometry(), "A")
    truth = Pose.from_six(0.5 * axis, [0.0, 0.0, 0.0])
    res = fit_one_view("A", _geometry(), SEEDS, NAMES, _observe(truth, "A"), _snr(), MotionPrior(Pose.identity()), 1.0)
    err_along = float((res.deviation_mm - truth.translation_mm) @ axis)
    assert abs(err_along) <= 1.959963984540054 * res.out_of_plane_sigma_mm


def test_in_plane_motion_widens_the_out_of_plane_prior():
    truth = Pose.from_six([1.5, 1.0, 1.5], [0.0, 0.0, 0.0])  # 2.3 mm, perpendicular to A's ray
    prior = MotionPrior(Pose.identity())
    res = fit_one_view("A", _geometry(), SEEDS, NAMES, _observe(truth, "A"), _snr(), prior, 1.0)
    axis = out_of_plane_axis(_geometry(), "A")
    moved_in_plane = np.linalg.norm(_in_plane(truth.translation_mm, axis))
    # The inflation uses the estimated in-plane move (to the in-plane error, ~0.05 mm here).
    assert_allclose(math.sqrt(res.prior_inflation_mm2), moved_in_plane, rtol=0, atol=0.1)
    # The posterior along the ray: the widened prior, narrowed a little by the magnification cue.
    prior_sigma = math.sqrt(res.prior_inflation_mm2 + prior.covariance(1.0)[0, 0])
    assert 0.5 * moved_in_plane <= res.out_of_plane_sigma_mm <= prior_sigma
    off = fit_one_view("A", _geometry(), SEEDS, NAMES, _observe(truth, "A"), _snr(), prior, 1.0,
                       one_view=OneViewConfig(out_of_plane_ratio=0.0))
    assert off.prior_inflation_mm2 == 0.0
    assert off.out_of_plane_sigma_mm < 0.5 * res.out_of_plane_sigma_mm


def test_covariance_includes_the_prior_and_shrinks_in_plane():
    truth = Pose.identity()
    prior = MotionPrior(truth)
    res = fit_one_view("B", _geometry(), SEEDS, NAMES, _observe(truth, "B"), _snr(), prior, 3.0)
    prior_cov = prior.covariance(3.0)
    # The posterior is never wider than the prior, in any direction.
    assert np.linalg.eigvalsh(prior_cov - res.pose_cov).min() >= -1e-9
    assert res.in_plane_sigma_mm < 0.3 * math.sqrt(prior_cov[0, 0])
    assert_allclose(res.rotation_cov_deg2, res.pose_cov[3:, 3:])


@pytest.mark.parametrize("imager", ["A", "B"])
def test_95_percent_ellipsoid_covers_the_truth_95_percent_of_the_time(imager):
    """Truth drawn from the prior and seed noise from the error model: the model case is honest."""
    ov = OneViewConfig()
    prior = MotionPrior(Pose.from_six([0.3, -0.2, 0.1], [0.1, 0.0, -0.1]), floor=(0.5**2,) * 3 + (0.3**2,) * 3)
    rng = np.random.default_rng(7)
    cov = prior.covariance(2.0)
    sigma_px = ov.sigma_for(15.0)
    inside, inside_oop = 0, 0
    n = 400
    for k in range(n):
        x = rng.multivariate_normal(prior.mean, cov)
        truth = Pose.from_six(x[:3], x[3:])
        obs = _observe(truth, imager, sigma_px, seed=1000 + k)
        res = fit_one_view(imager, _geometry(), SEEDS, NAMES, obs, _snr(), prior, 2.0,
                           one_view=OneViewConfig(out_of_plane_ratio=0.0))
        e = res.deviation_mm - truth.translation_mm
        inside += e @ np.linalg.solve(res.deviation_cov_mm2, e) <= CHI2_3_95
        a = res.out_of_plane_axis_room
        inside_oop += abs(e @ a) <= 1.959963984540054 * res.out_of_plane_sigma_mm
    assert COVERAGE_RANGE[0] <= inside / n <= COVERAGE_RANGE[1]
    assert COVERAGE_RANGE[0] <= inside_oop / n <= COVERAGE_RANGE[1]


# ---------------------------------------------------------------------------- trust
def test_a_seed_off_its_rigid_place_is_not_ok():
    truth = Pose.from_six([0.5, 0.2, -0.3], [0.0, 0.0, 0.0])
    obs = _observe(truth, "A")
    obs[1] += [3.0, -2.0]  # a migrated seed: 3.6 px = 0.9 mm at the isocentre
    res = fit_one_view("A", _geometry(), SEEDS, NAMES, obs, _snr(), MotionPrior(truth), 1.0)
    assert not res.ok
    assert "inconsistent" in res.reason


def test_three_seeds_one_off_its_place_is_not_ok():
    truth = Pose.identity()
    obs = _observe(truth, "B", seeds=SEEDS[:3])
    obs[2] += [0.0, 4.0]
    res = fit_one_view("B", _geometry(), SEEDS[:3], NAMES[:3], obs, _snr(3), MotionPrior(truth), 1.0)
    assert not res.ok
    assert "chi^2" in res.reason


def test_two_of_four_seeds_found_is_ok_by_default_and_not_with_min_seeds_3():
    truth = Pose.identity()
    obs = _observe(truth, "A")
    obs[[1, 3]] = np.nan
    res = fit_one_view("A", _geometry(), SEEDS, NAMES, obs, _snr(), MotionPrior(truth), 1.0)
    assert res.ok and res.n_seeds == 2
    assert [s.found for s in res.seeds] == [True, False, True, False]
    strict = fit_one_view("A", _geometry(), SEEDS, NAMES, obs, _snr(), MotionPrior(truth), 1.0,
                          one_view=OneViewConfig(min_seeds=3))
    assert not strict.ok and "too few seeds" in strict.reason


def test_a_lone_seed_is_refused_as_the_stereo_path_refuses_it():
    obs = _observe(Pose.identity(), "A")
    obs[1:] = np.nan
    with pytest.raises(FiducialNotFoundError, match="lone seed"):
        fit_one_view("A", _geometry(), SEEDS, NAMES, obs, _snr(), MotionPrior(Pose.identity()), 1.0)


def test_quality_json_is_strict_json_with_finite_numbers():
    res = fit_one_view("A", _geometry(), SEEDS, NAMES, _observe(Pose.identity(), "A", 0.2), _snr(),
                       MotionPrior(Pose.identity()), 1.0)
    text = json.dumps(res.quality_json(), allow_nan=False)
    q = json.loads(text)
    assert q["views"] == "one:A" and q["ok"] is True
    assert len(q["seeds"]) == len(SEEDS)


# ---------------------------------------------------------------------------- bad input
def _frame():
    return np.full((PANEL, PANEL), 5000, dtype=np.uint16)


def test_unknown_imager_is_refused_by_name():
    with pytest.raises(FrameError, match="no imager 'C'"):
        localise_one_view(_frame(), "C", _geometry(), SEEDS, NAMES, MotionPrior(Pose.identity()), 0.5)
    with pytest.raises(FrameError, match="no imager 'C'"):
        fit_one_view("C", _geometry(), SEEDS, NAMES, _observe(Pose.identity(), "A"), _snr(),
                     MotionPrior(Pose.identity()), 0.5)


def test_nan_pixels_are_refused():
    frame = _frame().astype(np.float32)
    frame[10, 20] = np.nan
    with pytest.raises(FrameError, match="non-finite"):
        localise_one_view(frame, "A", _geometry(), SEEDS, NAMES, MotionPrior(Pose.identity()), 0.5)


def test_wrong_frame_size_is_refused():
    with pytest.raises(FrameError, match="imager 'B'"):
        localise_one_view(np.zeros((10, 10), np.uint16), "B", _geometry(), SEEDS, NAMES,
                          MotionPrior(Pose.identity()), 0.5)


@pytest.mark.parametrize("elapsed_s", [-0.1, math.nan, math.inf])
def test_negative_or_non_finite_elapsed_time_is_refused(elapsed_s):
    with pytest.raises(MotionPriorError, match="elapsed"):
        localise_one_view(_frame(), "A", _geometry(), SEEDS, NAMES, MotionPrior(Pose.identity()), elapsed_s)


def test_non_finite_prior_is_refused():
    cov = np.eye(6)
    cov[0, 0] = np.nan
    with pytest.raises(MotionPriorError, match="non-finite"):
        MotionPrior(Pose.identity(), cov)
    with pytest.raises(MotionPriorError, match="MotionPrior"):
        localise_one_view(_frame(), "A", _geometry(), SEEDS, NAMES, {"reference": Pose.identity()}, 0.5)


def test_singular_prior_is_refused():
    prior = MotionPrior(Pose.identity(), floor=(0.0,) * 6, diffusion=(0.0,) * 6)
    with pytest.raises(MotionPriorError, match="singular"):
        fit_one_view("A", _geometry(), SEEDS, NAMES, _observe(Pose.identity(), "A"), _snr(), prior, 0.0)


def test_bad_planned_seeds_and_names_are_refused():
    with pytest.raises(FiducialNotFoundError, match="planned seeds"):
        localise_one_view(_frame(), "A", _geometry(), SEEDS[:, :2], NAMES, MotionPrior(Pose.identity()), 0.5)
    with pytest.raises(FiducialNotFoundError, match="seed names"):
        localise_one_view(_frame(), "A", _geometry(), SEEDS, NAMES[:2], MotionPrior(Pose.identity()), 0.5)


def test_flat_field_of_the_other_imager_is_refused():
    ff = FlatField("B", np.ones((PANEL, PANEL), np.float32), None, None)
    with pytest.raises(FrameError, match="flat field"):
        localise_one_view(_frame(), "A", _geometry(), SEEDS, NAMES, MotionPrior(Pose.identity()), 0.5, flat_field=ff)


def test_a_frame_without_seeds_raises_fiducial_not_found():
    with pytest.raises(FiducialNotFoundError):
        localise_one_view(_frame(), "A", _geometry(), SEEDS, NAMES, MotionPrior(Pose.identity()), 0.5)


@pytest.mark.parametrize("field,value", [("sigma_px", 0.0), ("chi2_quantile", 1.0), ("min_seeds", 0),
                                         ("out_of_plane_ratio", -1.0), ("refit_detected", 1),
                                         ("detect_min_snr", 0.0), ("rotation_per_mm_deg", math.nan)])
def test_bad_one_view_config_is_refused(field, value):
    with pytest.raises(FiducialConfigError, match=field):
        OneViewConfig(**{field: value})


def test_stereo_history_prior_adds_the_scatter_of_recent_poses_to_the_floor():
    hist = np.zeros((4, 6))
    hist[:, 2] = [-1.0, 1.0, -1.0, 1.0]  # breathing +-1 mm in Z: variance 1 mm^2
    prior = prior_from_stereo_history(Pose.identity(), np.zeros((6, 6)), hist)
    base = MotionPrior(Pose.identity())
    assert_allclose(prior.floor, np.asarray(base.floor) + [0, 0, 1.0, 0, 0, 0])
    with pytest.raises(MotionPriorError, match="history"):
        prior_from_stereo_history(Pose.identity(), np.zeros((6, 6)), hist[:1])


# ---------------------------------------------------------------------------- image level
@functools.lru_cache(maxsize=1)
def _sim() -> RealisticSimulator:
    return RealisticSimulator(small_thoracolumbar(), _geometry(), ChainConfig.clinic(i0=6000.0))


@pytest.mark.parametrize("imager", ["A", "B"])
def test_clinic_frame_one_view_finds_every_seed_and_the_in_plane_deviation(imager):
    sim = _sim()
    truth = Pose.from_six([0.8, -0.5, 0.6], [0.3, -0.2, 0.4])
    frames, _ = sim.render(truth, seed=3)
    m = sim.maps(imager)
    ff = FlatField(imager, m.gain, m.offset_counts, m.dead)
    planned = sim.planned_room_mm()
    names = [s.name for s in sim.phantom.seeds]
    prior = MotionPrior(Pose.from_six([0.5, -0.2, 0.3], [0.0, 0.0, 0.0]))
    res = localise_one_view(frames.frames[imager], imager, _geometry(), planned, names, prior, 1.5, flat_field=ff)
    assert res.ok, res.reason
    assert res.n_seeds == len(planned)
    err = res.deviation_mm - truth.translation_mm
    assert np.linalg.norm(_in_plane(err, res.out_of_plane_axis_room)) <= IMAGE_IN_PLANE_TOL_MM
    assert err @ np.linalg.solve(res.deviation_cov_mm2, err) <= CHI2_3_95
    assert res.total_ms > 0


# ---------------------------------------------------------------------------- gating
def _judge(res, pair_id: int = 1):
    m = gating.Measurement(pair_id, 100.0, gating.HoldReason.OK, deviation_mm=res.deviation_mm,
                           rotation_deg=res.pose.rotation_deg, one_view=res.imager,
                           deviation_cov_mm2=res.deviation_cov_mm2, rotation_cov_deg2=res.rotation_cov_deg2)
    return gating.judge_measurement(gating.GatingState(), m, 100.02, gating.GatingConfig())[0]


def _outside(truth: Pose, config=gating.GatingConfig()) -> bool:
    d = truth.translation_mm
    return bool(np.linalg.norm(d) > config.tolerance_3d_mm or np.any(np.abs(d) > config.tolerance_axis_mm)
                or np.max(np.abs(truth.rotation_deg)) > config.tolerance_rotation_deg)


_six = st.tuples(*[st.floats(-1.5, 1.5)] * 3, *[st.floats(-0.8, 0.8)] * 3)


@settings(max_examples=60, deadline=None)
@given(truth6=_six, prior6=_six, imager=st.sampled_from(["A", "B"]), noise_seed=st.integers(0, 2**16))
def test_gate_enables_a_truth_outside_tolerance_only_if_it_lies_outside_the_reported_95_percent_region(
        truth6, prior6, imager, noise_seed):
    """What is guaranteed: an ENABLE on a one-view result means its whole 95 % ellipsoid is within tolerance,
    so an unsafe ENABLE needs a truth outside the reported region (probability <= 5 % when the model holds)."""
    truth = Pose.from_six(truth6[:3], truth6[3:])
    # The prior is the last stereo pose: within 0.5 mm / 0.3 deg of the truth scaled down.
    prior = MotionPrior(Pose.from_six(0.3 * np.array(prior6[:3]) + 0.7 * np.array(truth6[:3]),
                                      0.3 * np.array(prior6[3:]) + 0.7 * np.array(truth6[3:])))
    ov = OneViewConfig()
    obs = _observe(truth, imager, ov.sigma_for(15.0), seed=noise_seed)
    res = fit_one_view(imager, _geometry(), SEEDS, NAMES, obs, _snr(), prior, 1.0, one_view=ov)
    decision = _judge(res)
    assert decision.one_view == imager
    if decision.beam is gating.Beam.ENABLE and _outside(truth):
        e = res.deviation_mm - truth.translation_mm
        r = res.pose.rotation_deg - truth.rotation_deg
        inside_dev = e @ np.linalg.solve(res.deviation_cov_mm2, e) <= gating.CHI2_3DOF_95
        inside_rot = r @ np.linalg.solve(res.rotation_cov_deg2, r) <= gating.CHI2_3DOF_95
        assert not (inside_dev and inside_rot)


def test_no_unsafe_enable_in_400_one_view_pairs_drawn_from_the_model():
    """A small (b): truths drawn from the prior around poses near the tolerance, seed noise from the model."""
    rng = np.random.default_rng(11)
    ov = OneViewConfig()
    unsafe = enabled = outside = 0
    for k in range(400):
        ref = rng.uniform(-0.8, 0.8, 6) * [1, 1, 1, 0.6, 0.6, 0.6]
        # A well-settled patient just after a stereo pair: 0.1 mm / 0.1 deg per axis in all (the default
        # floor, 0.3 mm, gives a 95 % half-width of 0.85 mm along the ray: no ENABLE at a 1 mm tolerance).
        prior = MotionPrior(Pose.from_six(ref[:3], ref[3:]), np.diag([0.005] * 6), floor=(0.005,) * 6)
        x = rng.multivariate_normal(prior.mean, prior.covariance(1.0))
        truth = Pose.from_six(x[:3], x[3:])
        imager = "AB"[k % 2]
        res = fit_one_view(imager, _geometry(), SEEDS, NAMES, _observe(truth, imager, ov.sigma_for(15.0), seed=k),
                           _snr(), prior, 1.0, one_view=ov)
        decision = _judge(res, k + 1)
        out = _outside(truth)
        outside += out
        if decision.beam is gating.Beam.ENABLE:
            enabled += 1
            unsafe += out
    assert outside > 50 and enabled > 20  # the case exercises both sides of the tolerance
    assert unsafe == 0
