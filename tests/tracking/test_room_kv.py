"""Stereo kV simulator: analytic seed contrast, seed truth, Poisson statistics, detector model, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.registration.attenuation import linear_attenuation_per_mm
from spineguide.registration.drr import compute_drr
from spineguide.registration.pose import Pose
from tests.synthetic import small_geometry, small_simulator, small_thoracolumbar
from spineguide.tracking.room.kv import (
    HOT_PIXEL_VALUE,
    DetectorModel,
    KVSimulator,
    OutputDtype,
    SimulationError,
    cylinder_chord_mm,
    render_bb_frames,
    sphere_chord_mm,
)
from spineguide.tracking.room.phantoms import Seed, SeedShape

CHORD_TOL_MM = 1e-9  # closed-form chords, float64
LOG_TOL = 1e-6  # float64 log of a float64 transmission; the DRR part cancels exactly
PX_TOL = 1e-9  # the same projection evaluated two ways, float64
NOISE_FREE = DetectorModel(blur_sigma_px=0.0, noise=False, dtype=OutputDtype.FLOAT32)


def test_sphere_chords_match_closed_form():
    src = np.zeros(3)
    dirs = np.array([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])
    centre = np.array([0.3, 0.0, 100.0])
    d_perp = np.linalg.norm(np.cross(dirs, centre), axis=1)
    expected = 2.0 * np.sqrt(np.maximum(1.5**2 - d_perp**2, 0.0))
    assert_allclose(sphere_chord_mm(src, dirs, centre, 1.5), expected, rtol=0, atol=CHORD_TOL_MM)
    assert expected[1] == 0.0 and expected[0] > 0.0


def test_cylinder_chords_across_along_and_oblique():
    src = np.zeros(3)
    centre = np.array([0.0, 0.0, 100.0])
    down = np.array([[0.0, 0.0, 1.0]])
    # Across the axis through it: the diameter; along the axis: the length.
    assert_allclose(cylinder_chord_mm(src, down, centre, (1, 0, 0), 4.0, 0.5), [1.0], rtol=0, atol=CHORD_TOL_MM)
    assert_allclose(cylinder_chord_mm(src, down, centre, (0, 0, 1), 4.0, 0.5), [4.0], rtol=0, atol=CHORD_TOL_MM)
    # A ray at 45 deg to the axis, through the centre of a long thin cylinder: diameter / sin(45).
    d45 = np.array([[np.sqrt(0.5), 0.0, np.sqrt(0.5)]])
    c45 = 100.0 * d45[0]
    assert_allclose(cylinder_chord_mm(src, d45, c45, (1, 0, 0), 40.0, 0.5), [1.0 / np.sqrt(0.5)], rtol=0, atol=CHORD_TOL_MM)
    # Parallel to the axis but outside the radius: no chord.
    assert_allclose(cylinder_chord_mm(src, down, centre + [0.6, 0, 0], (0, 0, 1), 4.0, 0.5), [0.0], rtol=0, atol=CHORD_TOL_MM)


def _one_sphere_simulator(radius_mm: float, energy_kev: float = 60.0) -> tuple[KVSimulator, Seed]:
    ph = small_thoracolumbar()
    seed = Seed("S", ph.isocentre_lps_mm + [2.0, -3.0, 1.0], (0, 0, 1), 2 * radius_mm, 2 * radius_mm, SeedShape.SPHERE)
    ph1 = dataclasses.replace(ph, seeds=(seed,))
    geom = default_stereo_geometry(panel_pixels=64, pixel_spacing_mm=0.4)  # fine pixels, small field
    return KVSimulator(ph1, geom, energy_kev=energy_kev, detector=dataclasses.replace(NOISE_FREE, seed_supersampling=1)), seed


def test_gold_sphere_contrast_is_mu_times_exact_chord_in_the_log_image():
    sim, seed = _one_sphere_simulator(1.0)
    pose = Pose.from_six([0.4, -0.7, 0.2], [1.0, -0.5, 0.8])
    mu_gold = linear_attenuation_per_mm("gold", 60.0)
    logs = sim.line_integrals(pose)
    centre_room = pose.apply(sim.phantom.seeds_room_mm()[0])
    for im in sim.geometry.imagers:
        contrast = logs[im.name] - compute_drr(sim.volume, im, pose).astype(np.float64)
        col, row = np.rint(im.project(centre_room)).astype(int)
        # The ray through that pixel centre passes the sphere centre at distance d: chord 2 sqrt(r^2 - d^2).
        ray = im.pixel_to_room(np.array([col, row], float)) - im.source_mm
        d = np.linalg.norm(np.cross(ray / np.linalg.norm(ray), centre_room - im.source_mm))
        assert_allclose(contrast[row, col], mu_gold * 2.0 * np.sqrt(1.0 - d**2), rtol=0, atol=LOG_TOL)
        assert_allclose(contrast[0, 0], 0.0, rtol=0, atol=LOG_TOL)  # far from the seed: anatomy only


def test_seed_contrast_follows_the_imaging_energy():
    # Gold attenuates more at 50 keV than at 60 keV (photoelectric ~E^-3): a DRR-vs-frame contrast mismatch.
    lo, _ = _one_sphere_simulator(1.0, energy_kev=50.0)
    hi, _ = _one_sphere_simulator(1.0, energy_kev=60.0)
    im = lo.geometry.imagers[0]
    c_lo = lo.line_integrals()[im.name] - compute_drr(lo.volume, im).astype(np.float64)
    c_hi = hi.line_integrals()[im.name] - compute_drr(hi.volume, im).astype(np.float64)
    ratio = linear_attenuation_per_mm("gold", 50.0) / linear_attenuation_per_mm("gold", 60.0)
    assert_allclose(c_lo.max(), ratio * c_hi.max(), rtol=1e-9, atol=0)


def test_seed_pixel_truth_is_the_projection_of_the_hfs_mapped_seed_at_the_pose():
    sim = small_simulator()
    pose = Pose.from_six([3.0, -2.0, 5.0], [2.0, -1.0, 1.5])
    pair = sim.render(pose, seed=1)
    ph = sim.phantom
    d = np.stack([s.centre_lps_mm for s in ph.seeds]) - ph.isocentre_lps_mm
    planned_room = np.stack([d[:, 0], d[:, 2], -d[:, 1]], axis=1)  # HFS: X = d_x, Y = d_z, Z = -d_y
    actual = planned_room @ pose.rotation.T + pose.translation_mm
    assert_allclose(pair.truth.seeds_room_mm, actual, rtol=0, atol=PX_TOL)
    for im in sim.geometry.imagers:
        m = im.projection_matrix
        h = np.hstack([actual, np.ones((len(actual), 1))]) @ m.T
        assert_allclose(pair.truth.seeds_px[im.name], h[:, :2] / h[:, 2:], rtol=0, atol=PX_TOL)
    assert pair.truth.seed_names == ("F1", "F2", "F3")


def test_flat_field_frames_are_poisson_with_mean_i0():
    i0 = 1000.0
    geom = small_geometry()
    det = DetectorModel(blur_sigma_px=0.0, dtype=OutputDtype.FLOAT32)
    bb = render_bb_frames(geom, np.array([[0.0, 0.0, 0.0]]), 2.0, "tungsten", i0, background_line_integral=0.0, detector=det, seed=5)
    values = []
    for name, frame in bb.frames.items():
        col, row = np.rint(bb.centres_px[name]).astype(int)[0]
        keep = np.ones(frame.shape, bool)
        keep[row - 4 : row + 5, col - 4 : col + 5] = False
        values.append(frame[keep])
    v = np.concatenate(values)
    n = v.size
    # Mean and variance of N Poisson(i0) samples: 4 standard errors each.
    assert_allclose(v.mean(), i0, rtol=0, atol=4.0 * np.sqrt(i0 / n))
    assert_allclose(v.var(), i0, rtol=0, atol=4.0 * i0 * np.sqrt(2.0 / n))
    assert np.all(v == np.rint(v))


def test_frames_are_deterministic_for_a_seed():
    sim = small_simulator()
    a = sim.render(Pose.from_six([1, 2, 3], [0, 0, 1]), seed=7).frames["A"]
    b = sim.render(Pose.from_six([1, 2, 3], [0, 0, 1]), seed=7).frames["A"]
    c = sim.render(Pose.from_six([1, 2, 3], [0, 0, 1]), seed=8).frames["A"]
    assert a.dtype == np.uint16 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_noise_free_frame_is_i0_exp_minus_line_integral():
    sim = small_simulator()
    pose = Pose.from_six([-2, 1, 0], [0, 1, 0])
    pair = sim.render(pose, detector=NOISE_FREE)
    logs = sim.line_integrals(pose)
    for name, frame in pair.frames.items():
        expected = (NOISE_FREE.i0 * np.exp(-logs[name])).astype(np.float32)
        assert_allclose(frame, expected, rtol=1e-6, atol=0)  # float32 storage


def test_heel_scatter_and_defects():
    geom = small_geometry()
    flat = dict(background_line_integral=0.0, seed=2)
    far = np.array([[0.0, 300.0, 0.0]])  # 300 mm towards the gantry: off both panels
    heel = render_bb_frames(geom, far, 1.0, i0=1000.0, detector=dataclasses.replace(NOISE_FREE, heel_gradient=0.2), **flat)
    f = heel.frames["A"]
    assert_allclose([f[5, 0], f[5, -1]], [900.0, 1100.0], rtol=0, atol=1e-3)  # 1 -+ 0.2 / 2
    scat = render_bb_frames(geom, far, 1.0, i0=1000.0, detector=dataclasses.replace(NOISE_FREE, scatter_fraction=0.25), **flat)
    assert_allclose(scat.frames["B"], 1250.0, rtol=0, atol=1e-2)  # flat primary + 25% smooth scatter
    sim = small_simulator()
    det = DetectorModel(dead_pixels=3, hot_pixels=2)
    pair = sim.render(Pose.identity(), seed=4, detector=det)
    for name, frame in pair.frames.items():
        dead, hot = pair.truth.dead_px[name], pair.truth.hot_px[name]
        assert dead.shape == (3, 2) and hot.shape == (2, 2)
        assert np.all(frame[dead[:, 1], dead[:, 0]] == 0)
        assert np.all(frame[hot[:, 1], hot[:, 0]] == HOT_PIXEL_VALUE)


def test_bad_detector_and_energy_are_errors():
    with pytest.raises(SimulationError, match="i0 = 0 is outside"):
        DetectorModel(i0=0)
    with pytest.raises(SimulationError, match="dead_pixels must be a non-negative integer"):
        DetectorModel(dead_pixels=-1)
    with pytest.raises(SimulationError, match="cannot attenuate with 'gold' at 70.0 keV"):
        KVSimulator(small_thoracolumbar(), small_geometry(), energy_kev=70.0)


def test_bad_render_arguments_are_errors():
    sim = small_simulator()
    with pytest.raises(SimulationError, match="render needs a Pose"):
        sim.render((0, 0, 0))
    with pytest.raises(SimulationError, match="seed must be an integer"):
        sim.render(Pose.identity(), seed=1.5)
    with pytest.raises(SimulationError, match=r"bb_positions_room_mm must be a finite \(N, 3\) array"):
        render_bb_frames(small_geometry(), np.zeros((2, 2)), 2.0)
    with pytest.raises(SimulationError, match="BB diameters must be positive"):
        render_bb_frames(small_geometry(), np.zeros((1, 3)), -1.0)
    with pytest.raises(SimulationError, match="cannot attenuate with 'lead' at 60.0 keV: unknown material"):
        render_bb_frames(small_geometry(), np.zeros((1, 3)), 2.0, material="lead")
