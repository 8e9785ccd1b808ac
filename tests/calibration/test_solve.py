"""Geometry solve from BB-phantom measurements: recovers a known perturbed geometry."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.spatial.transform import Rotation

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry, default_stereo_geometry
from spineguide.calibration.io import read_geometry, write_geometry
from spineguide.calibration.phantom import default_phantom
from spineguide.calibration.solve import (
    CalibrationFrame,
    CalibrationSolveError,
    PhantomView,
    calibrate,
    solve_geometry,
)
from spineguide.tracking.room import DetectorModel, perturbed_geometry, render_bb_frames

NOMINAL = default_stereo_geometry(256, 1.6)
PHANTOM = default_phantom()
SHIFTS_MM = [(0.0, 0.0, 0.0)] + [tuple(s * e) for e in 50.0 * np.eye(3) for s in (1.0, -1.0)]
NOISE_PX = 0.05  # centroid noise of 2-px BBs at i0 = 20000 (see test_bb_detection)

#: Exact data: the fit must reach the true parameters to solver precision.
EXACT_SOURCE_TOL_MM = 1e-3
EXACT_REPROJECTION_TOL_PX = 1e-4
#: Honest uncertainties: every error within 4 reported sigma (3 sigma holds
#: for 99.7 % of single values; over 4 seeds x 2 imagers x 3 axes = 24 values
#: the largest is within 4 sigma with probability > 99.8 %).
HONEST_SIGMAS = 4.0
#: Held-out points, noisy data: the error of a fitted projection at a point is
#: sigma_px * sqrt(k / m) for k = 9 parameters and m = 224 residuals, i.e.
#: 0.05 * 0.2 = 0.01 px RMS over the region the markers span and a few times
#: that at the corners of a 200 mm cube; 0.05 px bounds it.
HELD_OUT_TOL_PX = 0.05
#: Single-position solve: the source distance is poorly fixed; multi-position
#: must shrink its uncertainty at least 2-fold (the depth range seen grows
#: from 120 mm to 220 mm and the points seven-fold).
MULTI_POSITION_GAIN = 2.0


def true_geometry(seed) -> StereoGeometry:
    rng = np.random.default_rng(seed)
    return perturbed_geometry(NOMINAL, rng)


def views_of(true: StereoGeometry, shifts=SHIFTS_MM, noise_px=0.0, seed=0, rotation=None):
    rng = np.random.default_rng(seed)
    out = []
    for im in true.imagers:
        for s in shifts:
            px = im.project(PHANTOM.placed_mm(s, rotation))
            out.append(PhantomView(im.name, s, px + rng.normal(0.0, noise_px, px.shape) if noise_px else px))
    return out


def cube_points(half_mm=100.0, n=5):
    g = np.linspace(-half_mm, half_mm, n)
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)


def test_exact_measurements_recover_a_perturbed_geometry():
    true = true_geometry(1)
    result = solve_geometry(PHANTOM, views_of(true), NOMINAL, calibrated_unix_s=1.0)
    for sol in result.imagers:
        t = true[sol.geometry.name]
        assert_allclose(sol.geometry.source_mm, t.source_mm, rtol=0, atol=EXACT_SOURCE_TOL_MM)
        assert_allclose(sol.geometry.origin_mm, t.origin_mm, rtol=0, atol=EXACT_SOURCE_TOL_MM)
        pts = cube_points()
        assert_allclose(sol.geometry.project(pts), t.project(pts), rtol=0, atol=EXACT_REPROJECTION_TOL_PX)
        assert sol.rms_px < EXACT_REPROJECTION_TOL_PX


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_noisy_measurements_give_honest_uncertainties_and_accurate_held_out_projections(seed):
    true = true_geometry(seed)
    result = solve_geometry(PHANTOM, views_of(true, noise_px=NOISE_PX, seed=seed), NOMINAL)
    pts = cube_points()
    for sol in result.imagers:
        t = true[sol.geometry.name]
        err = sol.geometry.source_mm - t.source_mm
        assert np.all(np.abs(err) <= HONEST_SIGMAS * sol.source_sigma_mm()), (err, sol.source_sigma_mm())
        d = sol.geometry.pixel_to_room(np.array([127.5, 127.5])) - t.pixel_to_room(np.array([127.5, 127.5]))
        sig_c = np.array([sol.parameter(f"panel_centre_{a}_mm").sigma for a in "xyz"])
        assert np.all(np.abs(d) <= HONEST_SIGMAS * sig_c)
        assert_allclose(sol.sigma_px, NOISE_PX, rtol=0.25)  # s estimates the centroid noise
        held = np.linalg.norm(sol.geometry.project(pts) - t.project(pts), axis=1)
        assert np.sqrt(np.mean(held**2)) <= HELD_OUT_TOL_PX
    assert not result.isocentre.flagged


def test_several_couch_positions_pin_down_the_source_distance():
    true = true_geometry(6)
    single = solve_geometry(PHANTOM, views_of(true, shifts=[(0.0, 0.0, 0.0)], noise_px=NOISE_PX, seed=6), NOMINAL)
    multi = solve_geometry(PHANTOM, views_of(true, noise_px=NOISE_PX, seed=6), NOMINAL)
    for name in NOMINAL.names:
        axis = -true[name].normal  # along the beam: the badly determined direction
        cov_s = np.diag(single.imager(name).source_sigma_mm() ** 2)
        cov_m = np.diag(multi.imager(name).source_sigma_mm() ** 2)
        assert np.sqrt(axis @ cov_s @ axis) >= MULTI_POSITION_GAIN * np.sqrt(axis @ cov_m @ axis)


def test_free_phantom_rotation_is_recovered():
    true = true_geometry(7)
    rot_deg = np.array([0.6, -0.4, 0.8])
    rot = Rotation.from_rotvec(np.radians(rot_deg)).as_matrix()
    result = solve_geometry(PHANTOM, views_of(true, rotation=rot), NOMINAL, free_phantom_rotation=True)
    got = np.array([p.value for p in result.phantom_rotation])
    assert_allclose(got, rot_deg, rtol=0, atol=1e-5)  # exact data: solver precision
    for sol in result.imagers:
        assert_allclose(sol.geometry.source_mm, true[sol.geometry.name].source_mm, rtol=0, atol=EXACT_SOURCE_TOL_MM)


def test_free_phantom_rotation_without_couch_shifts_is_a_gauge_freedom_error():
    views = views_of(true_geometry(8), shifts=[(0.0, 0.0, 0.0), (0.0, 0.0, 50.0)])
    with pytest.raises(CalibrationSolveError, match="couch shifts in at least two independent directions"):
        solve_geometry(PHANTOM, views, NOMINAL, free_phantom_rotation=True)


def test_pixel_aspect_can_be_fitted():
    true = true_geometry(9)
    a = true["A"]
    stretched = ImagerGeometry("A", a.source_mm, a.origin_mm, a.col_direction, a.row_direction, (1.604, 1.6), 256, 256)
    true = StereoGeometry((stretched, true["B"]))
    result = solve_geometry(PHANTOM, views_of(true), NOMINAL, fit_pixel_aspect=True)
    assert_allclose(result.imager("A").parameter("row_spacing_mm").value, 1.604, rtol=0, atol=1e-6)
    assert_allclose(result.imager("B").parameter("row_spacing_mm").value, 1.6, rtol=0, atol=1e-6)


def test_geometry_file_written_has_both_descriptions_timestamp_and_provenance(tmp_path):
    true = true_geometry(10)
    result = solve_geometry(PHANTOM, views_of(true), NOMINAL, calibrated_unix_s=1764070000.0,
                            provenance="phantom file ph.json; images A=a.mha, B=b.mha")
    back = read_geometry(write_geometry(result.geometry, tmp_path / "g.json"))
    assert back.calibrated_unix_s == 1764070000.0
    assert "ph.json" in back.notes and "A=a.mha" in back.notes and "2025-11-25T11:26:40Z" in back.notes
    for im in back.imagers:
        assert_allclose(im.projection_matrix, result.geometry[im.name].projection_matrix, rtol=1e-12, atol=1e-9)


def test_too_few_markers_is_an_error():
    views = [PhantomView(v.imager, v.couch_shift_mm, np.where(np.arange(16)[:, None] < 5, v.marker_px, np.nan))
             for v in views_of(true_geometry(11), shifts=[(0.0, 0.0, 0.0)])]
    with pytest.raises(CalibrationSolveError, match="imager 'A': 5 measured markers over 1 views, at least 6"):
        solve_geometry(PHANTOM, views, NOMINAL)


def test_unknown_imager_and_wrong_marker_count_are_errors():
    v = views_of(true_geometry(12), shifts=[(0.0, 0.0, 0.0)])
    with pytest.raises(CalibrationSolveError, match="view of unknown imager 'C'"):
        solve_geometry(PHANTOM, v + [PhantomView("C", (0, 0, 0), v[0].marker_px)], NOMINAL)
    with pytest.raises(CalibrationSolveError, match="imager 'A': view has 15 marker positions, phantom .* has 16"):
        solve_geometry(PHANTOM, [PhantomView("A", (0, 0, 0), v[0].marker_px[:15])] + v[1:], NOMINAL)


def test_isocentre_check_flags_a_centre_bb_off_the_isocentre():
    # A phantom whose centre BB sits 0.8 mm from the MV isocentre (as measured):
    # the new geometry triangulates it there and the check flags it.
    from spineguide.calibration.phantom import BBPhantom

    off = BBPhantom(PHANTOM.markers, "off", np.array([0.8, 0.0, 0.0]))
    true = true_geometry(13)
    views = [PhantomView(im.name, (0, 0, 0), im.project(off.placed_mm())) for im in true.imagers]
    result = solve_geometry(off, views, NOMINAL)
    assert_allclose(result.isocentre.centre_bb_room_mm, [0.8, 0.0, 0.0], rtol=0, atol=1e-4)
    assert result.isocentre.flagged and result.isocentre.discrepancy_mm < 1e-4


def test_calibrate_from_rendered_frames_recovers_the_true_geometry():
    true = true_geometry(14)
    frames = []
    for i, s in enumerate(SHIFTS_MM):
        bf = render_bb_frames(true, PHANTOM.placed_mm(s), PHANTOM.diameters_mm, "tungsten", 20000.0,
                              detector=DetectorModel(seed_supersampling=8), seed=i)
        frames += [CalibrationFrame(n, bf.frames[n], s, i0=20000.0, source=f"{n}{i}.mha") for n in NOMINAL.names]
    result = calibrate(PHANTOM, frames, NOMINAL, phantom_source="ph.json")
    pts = cube_points()
    for sol in result.imagers:
        t = true[sol.geometry.name]
        err = sol.geometry.source_mm - t.source_mm
        assert np.all(np.abs(err) <= HONEST_SIGMAS * sol.source_sigma_mm())
        held = np.linalg.norm(sol.geometry.project(pts) - t.project(pts), axis=1)
        assert np.sqrt(np.mean(held**2)) <= HELD_OUT_TOL_PX
    assert "ph.json" in result.geometry.notes and "A=A0.mha" in result.geometry.notes
    assert len(result.measured) == len(frames)


def test_detection_sigmas_weight_the_fit_and_bad_sigmas_are_refused():
    """A BB measured 20x noisier, with its sigma saying so, must not pull the weighted fit (exact data elsewhere)."""
    true = true_geometry(12)
    views = views_of(true)
    noisy = []
    rng = np.random.default_rng(3)
    for v in views:
        px = np.array(v.marker_px)
        px[4] += rng.normal(0.0, 1.0, 2)  # BB 4: 1 px noise
        sig = np.full(len(px), 1e-3)
        sig[4] = 1.0
        noisy.append((PhantomView(v.imager, v.couch_shift_mm, px), PhantomView(v.imager, v.couch_shift_mm, px, "", sig)))
    flat = solve_geometry(PHANTOM, [a for a, _ in noisy], NOMINAL)
    weighted = solve_geometry(PHANTOM, [b for _, b in noisy], NOMINAL)
    for name in NOMINAL.names:
        e_flat = np.linalg.norm(flat.imager(name).geometry.source_mm - true[name].source_mm)
        e_w = np.linalg.norm(weighted.imager(name).geometry.source_mm - true[name].source_mm)
        assert e_w < 0.5 * e_flat
    assert_allclose(views[0].weights(), 1.0)
    with pytest.raises(CalibrationSolveError, match="marker_sigma_px must be 16 non-negative numbers"):
        PhantomView("A", (0, 0, 0), views[0].marker_px, "", np.ones(3))


def _views_with_couch_errors(true, couch_errors_mm, noise_px, seed, sigma=True):
    """Each imager at the centre and at +-300 mm along its own axis; at each shifted position the phantom really sits
    at shift + error (the view reports the shift alone)."""
    rng = np.random.default_rng(seed)
    out, k = [], 0
    for im in true.imagers:
        for shift in [np.zeros(3)] + [sign * 300.0 * im.normal for sign in (1.0, -1.0)]:
            err = couch_errors_mm[k] if np.linalg.norm(shift) > 0 else np.zeros(3)
            k += np.linalg.norm(shift) > 0
            px = im.project(PHANTOM.placed_mm(shift + err)) + rng.normal(0.0, noise_px, (PHANTOM.n_markers, 2))
            out.append(PhantomView(im.name, shift, px, marker_sigma_px=np.full(PHANTOM.n_markers, noise_px)
                                   if sigma else None))
    return out


def test_couch_errors_are_fitted_with_their_prior_and_the_sigmas_stay_honest():
    """A couch that puts the phantom 0.2 mm (1-sigma per axis) off the reported shift: taken as exact, the fit is
    inconsistent (residuals beyond the noise, source errors up to 7 stated sigmas); with ``couch_sigma_mm`` its errors
    are fitted and every source coordinate lies within 4 stated sigmas (the prior costs the lever along the axis)."""
    z, z_exact, ratio_exact, ratio_fitted = [], [], [], []
    for seed in range(4):
        true = true_geometry(200 + seed)
        errs = np.random.default_rng(300 + seed).normal(0.0, 0.2, (4, 3))
        views = _views_with_couch_errors(true, errs, NOISE_PX, seed)
        exact = solve_geometry(PHANTOM, views, NOMINAL)
        fitted = solve_geometry(PHANTOM, views, NOMINAL, couch_sigma_mm=0.2)
        ratio_exact.append(max(s.sigma_px for s in exact.imagers))
        ratio_fitted.append(max(s.sigma_px for s in fitted.imagers))
        assert len(fitted.couch_errors) == 4 and exact.couch_errors == ()
        for res, out in ((fitted, z), (exact, z_exact)):
            for sol in res.imagers:
                out.extend(((sol.geometry.source_mm - true[sol.geometry.name].source_mm) / sol.source_sigma_mm()).tolist())
        # The fitted couch errors follow the real ones across the axis, where the images see them directly.
        for e, real in zip(fitted.couch_errors, errs):
            assert np.linalg.norm(e.error_mm - real) < 4 * np.linalg.norm(e.sigma_mm) + 0.02
    # Shifts taken as exact (256 px panels of 1.6 mm: 0.2 mm is ~0.2 px here): residuals beyond the detection noise
    # and stated sigmas that do not hold.
    assert min(ratio_exact) > 1.25, ratio_exact
    assert np.max(np.abs(z_exact)) > HONEST_SIGMAS, z_exact
    assert max(ratio_fitted) < 1.15, ratio_fitted
    assert np.max(np.abs(z)) < HONEST_SIGMAS, z


def test_the_report_lists_the_fitted_couch_errors(tmp_path):
    from spineguide.calibration.report import write_calibration_report

    true = true_geometry(9)
    errs = np.random.default_rng(9).normal(0.0, 0.2, (4, 3))
    result = solve_geometry(PHANTOM, _views_with_couch_errors(true, errs, NOISE_PX, 9), NOMINAL, couch_sigma_mm=0.2)
    text = write_calibration_report(result, tmp_path / "report").read_text()
    assert "Couch errors (fitted" in text and text.count("<tr><td>[") >= 4
    assert "couch errors fitted at 4 position(s), prior 0.2 mm per axis" in result.geometry.notes


def test_bad_couch_sigma_is_an_error():
    true = true_geometry(7)
    views = _views_with_couch_errors(true, np.zeros((4, 3)), NOISE_PX, 0)
    for bad in (-0.1, float("nan"), 11.0, True, "0.1"):
        with pytest.raises(CalibrationSolveError, match="couch_sigma_mm must be a number from 0 to 10 mm"):
            solve_geometry(PHANTOM, views, NOMINAL, couch_sigma_mm=bad)
    with pytest.raises(CalibrationSolveError, match="needs views with detection sigmas"):
        solve_geometry(PHANTOM, _views_with_couch_errors(true, np.zeros((4, 3)), NOISE_PX, 0, sigma=False), NOMINAL,
                       couch_sigma_mm=0.1)
