"""Daily QA against a stored calibration, history file, trend and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from numpy.testing import assert_allclose

from spineguide.calibration.bb_detection import ImagesSwappedError
from spineguide.calibration.errors import CalibrationError
from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry, default_stereo_geometry
from spineguide.calibration.phantom import default_phantom
from spineguide.calibration.qa import QAHistoryError, QAStatus, QATolerances, append_history, read_history, run_qa, trend
from spineguide.calibration.report import ReportError, write_calibration_report, write_trend_plot
from spineguide.calibration.solve import CalibrationFrame, CalibrationSolveError, PhantomView, solve_geometry
from spineguide.tracking.room import DetectorModel, render_bb_frames

I0 = 20000.0
GEOMETRY = default_stereo_geometry(256, 1.6)
PHANTOM = default_phantom()
#: Triangulated centre BB of an unperturbed room: centroid noise 0.05 px
#: (1.6 mm / 1.64 = 0.98 mm/px at isocentre: 0.05 mm per imager) -> 0.15 mm is 3 sigma.
UNPERTURBED_OFFSET_TOL_MM = 0.15


def _frames(true: StereoGeometry, seed: int):
    bf = render_bb_frames(true, PHANTOM.placed_mm(), PHANTOM.diameters_mm, "tungsten", I0,
                          detector=DetectorModel(seed_supersampling=8), seed=seed)
    return [CalibrationFrame(n, bf.frames[n], i0=I0, source=f"{n}.mha") for n in true.names]


def _panel_shifted(shift_mm: float, along: str = "col") -> StereoGeometry:
    a = GEOMETRY["A"]
    d = a.col_direction if along == "col" else a.row_direction
    moved = ImagerGeometry("A", a.source_mm, a.origin_mm + shift_mm * d, a.col_direction, a.row_direction,
                           a.pixel_spacing_mm, a.rows, a.cols)
    return StereoGeometry((moved, GEOMETRY["B"]))


def test_unperturbed_room_passes():
    result = run_qa(GEOMETRY, PHANTOM, _frames(GEOMETRY, 1), performed_unix_s=10.0)
    assert result.status is QAStatus.PASS and result.passed and result.reasons == ()
    assert_allclose(result.centre_offset_mm, [0.0, 0.0, 0.0], rtol=0, atol=UNPERTURBED_OFFSET_TOL_MM)


def test_half_mm_panel_shift_across_the_epipolar_lines_is_found_and_named():
    # Imager A's epipolar lines run along its columns (B's source projects onto A's centre row), so a row shift
    # cannot be a setup error: the panel-shift test names it, with its size (0.5 mm along the row direction).
    result = run_qa(GEOMETRY, PHANTOM, _frames(_panel_shifted(0.5, "row"), 2))
    a = {q.imager: q for q in result.imagers}["A"]
    assert result.status is QAStatus.ACTION
    assert "panel shift" in a.change and "imager A" in a.change
    best = result.causes.best_cause("A")
    assert best.cause == "panel shift"
    assert_allclose(best.value, [0.0, 0.5], rtol=0, atol=4 * max(best.sigma.max(), 0.01))
    # A lateral source shift of ~0.8 mm does the same up to the markers' parallax; 0.5 mm is a quarter of the
    # stated size at which a panel shift excludes a source shift (power ~3 % here), so both are named.
    assert {t.cause for t in result.causes.verdicts["A"].candidates} == {"panel shift", "source shift"}
    sep = {(d.imager, d.cause, d.rival): d for d in result.causes.separation}
    assert sep[("A", "panel shift", "source shift")].best > 4 * 0.5
    # ... and, equally well, as the opposite row shift of B plus a setup translation along Y (both rows move
    # with Y): one stereo pair cannot say which panel moved, so both are named with their sizes.
    other = result.causes.best_cause("B")
    assert other.cause == "panel shift"
    assert_allclose(other.value, [0.0, -0.5], rtol=0, atol=4 * max(other.sigma.max(), 0.01))


def test_a_panel_shift_along_the_epipolar_lines_reads_as_setup_and_the_limit_says_so():
    # Physics, not a defect: a shift along A's epipolar lines equals a phantom translation along B's rays
    # (B sees a magnification change of ~1e-4). QA reports it as setup; the stated detection limit along that
    # direction is millimetres (only the markers' parallax, +-3 % over the phantom's depth, tells them apart).
    result = run_qa(GEOMETRY, PHANTOM, _frames(_panel_shifted(0.5, "col"), 2))
    assert result.status is QAStatus.PASS
    assert_allclose(np.linalg.norm(result.causes.setup.translation_mm), 0.5 / GEOMETRY["A"].magnification, rtol=0.2)
    lim = {(d.imager, d.cause): d for d in result.causes.limits}
    assert lim[("A", "panel shift")].worst > 2.0 and lim[("A", "panel shift")].best < 0.5


def _source_shifted(shift_mm: np.ndarray) -> StereoGeometry:
    a = GEOMETRY["A"]
    moved = ImagerGeometry("A", a.source_mm + shift_mm, a.origin_mm, a.col_direction, a.row_direction,
                           a.pixel_spacing_mm, a.rows, a.cols)
    return StereoGeometry((moved, GEOMETRY["B"]))


@pytest.mark.parametrize("direction", ["row", "axis"])
def test_a_source_shift_beyond_the_separation_limits_is_named_a_source_shift(direction):
    # Across A's central ray (its row direction, room Y) a 6 mm source shift moves the shadows like a ~3.8 mm panel
    # shift that varies +-5 % with the markers' depth (parallax); along the ray (15 mm) it changes A's magnification
    # by 0.7 %. Both lie beyond the stated limits at which a source shift excludes a panel shift or rotation
    # (<= 5.3 mm in this 1.6 mm-pixel room): QA names "source shift" alone, with its size.
    a = GEOMETRY["A"]
    truth = 6.0 * a.row_direction if direction == "row" else 15.0 * a.normal
    result = run_qa(GEOMETRY, PHANTOM, _frames(_source_shifted(truth), 7))
    assert result.status is not QAStatus.PASS
    sep = {(d.imager, d.cause, d.rival): d for d in result.causes.separation}
    assert max(sep[("A", "source shift", r)].worst for r in ("panel shift", "panel rotation")) < 6.0
    verdict = result.causes.verdicts["A"]
    assert verdict.named is not None and verdict.named.cause == "source shift", verdict.describe()
    err = np.abs(verdict.named.value - truth)
    assert np.all(err <= 4 * verdict.named.sigma + 0.05), (verdict.named.value, verdict.named.sigma)
    a_qa = {q.imager: q for q in result.imagers}["A"]
    assert a_qa.change.startswith("imager A: source shift (")


def test_a_small_lateral_source_shift_is_named_with_the_panel_shift_it_mimics():
    # 0.8 mm across the ray: the shadows move ~0.5 mm, like a panel shift, and differ from one by ~0.03 mm of
    # parallax -- far below the noise of one pair. QA flags imager A and names both, never one arbitrarily.
    result = run_qa(GEOMETRY, PHANTOM, _frames(_source_shifted(0.8 * GEOMETRY["A"].row_direction), 8))
    assert result.status is QAStatus.ACTION
    verdict = result.causes.verdicts["A"]
    assert {t.cause for t in verdict.candidates} == {"source shift", "panel shift"} and verdict.named is None
    change = {q.imager: q for q in result.imagers}["A"].change
    assert "source shift or panel shift" in change or "panel shift or source shift" in change
    sep = {(d.imager, d.cause, d.rival): d for d in result.causes.separation}
    assert sep[("A", "source shift", "panel shift")].best > 2 * 0.8


def test_large_panel_shift_fails():
    result = run_qa(GEOMETRY, PHANTOM, _frames(_panel_shifted(2.0, "row"), 3))
    assert result.status is QAStatus.FAIL


def test_setup_error_of_2_mm_and_1_deg_is_setup_not_a_geometry_change():
    t, w = np.array([1.2, -1.0, 1.1]), np.array([0.5, -0.6, 0.6])  # |t| 1.9 mm, |w| 0.98 deg
    r = Rotation.from_rotvec(np.radians(w)).as_matrix()
    bf = render_bb_frames(GEOMETRY, PHANTOM.positions_mm @ r.T + t, PHANTOM.diameters_mm, "tungsten", I0,
                          detector=DetectorModel(seed_supersampling=8), seed=11)
    result = run_qa(GEOMETRY, PHANTOM, [CalibrationFrame(n, bf.frames[n], i0=I0) for n in GEOMETRY.names])
    assert result.status is QAStatus.PASS, result.reasons
    setup = result.causes.setup
    assert_allclose(setup.translation_mm, t, rtol=0, atol=4 * setup.translation_sigma_mm.max() + 0.01)
    assert_allclose(setup.rotation_deg, w, rtol=0, atol=4 * setup.rotation_sigma_deg.max() + 0.01)


def test_a_verified_setup_grades_the_centre_offset():
    t = np.array([0.9, 0.0, 0.0])
    bf = render_bb_frames(GEOMETRY, PHANTOM.positions_mm + t, PHANTOM.diameters_mm, "tungsten", I0,
                          detector=DetectorModel(seed_supersampling=8), seed=12)
    frames = [CalibrationFrame(n, bf.frames[n], i0=I0) for n in GEOMETRY.names]
    assert run_qa(GEOMETRY, PHANTOM, frames).status is QAStatus.PASS
    verified = run_qa(GEOMETRY, PHANTOM, frames, setup_verified=True)
    assert verified.status is QAStatus.ACTION and any("verified place" in r for r in verified.reasons)


def test_swapped_images_are_an_error():
    frames = _frames(GEOMETRY, 4)
    swapped = [CalibrationFrame("A", frames[1].frame, i0=I0), CalibrationFrame("B", frames[0].frame, i0=I0)]
    with pytest.raises(ImagesSwappedError, match="swapped"):
        run_qa(GEOMETRY, PHANTOM, swapped)


def test_missing_frame_is_an_error():
    with pytest.raises(CalibrationSolveError, match=r"exactly one frame per imager \['A', 'B'\], got frames for \['A'\]"):
        run_qa(GEOMETRY, PHANTOM, _frames(GEOMETRY, 5)[:1])


def test_tolerances_are_validated():
    with pytest.raises(CalibrationError, match=r"offset_action_mm \(2.0 mm\) must not exceed offset_tolerance_mm"):
        QATolerances(offset_action_mm=2.0)
    with pytest.raises(CalibrationError, match="reprojection_action_mm must be a positive number"):
        QATolerances(reprojection_action_mm=-1.0)


def test_history_round_trip_and_trend(tmp_path):
    path = tmp_path / "qa" / "history.jsonl"
    frames = _frames(GEOMETRY, 6)
    for day in range(3):
        append_history(path, run_qa(GEOMETRY, PHANTOM, frames, performed_unix_s=1.7e9 + 86400.0 * (2 - day)))
    records = read_history(path)
    assert [r["performed_unix_s"] for r in records] == [1.7e9, 1.7e9 + 86400.0, 1.7e9 + 2 * 86400.0]
    tr = trend(records)
    assert len(tr.table.splitlines()) == 2 + 3 and "RMS A mm" in tr.table
    assert np.isnan(tr.offset_drift_mm_per_30_days) and "not estimated" in tr.drift_line  # 3 QAs over 2 days
    png = write_trend_plot(records, tmp_path / "trend.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trend_slope_of_a_linear_drift():
    recs = [{"performed_unix_s": 86400.0 * d, "status": "pass", "centre_offset_distance_mm": 0.1 + 0.01 * d,
             "imagers": {"A": {"rms_mm": 0.01}}} for d in range(10)]
    assert_allclose(trend(recs).offset_drift_mm_per_30_days, 0.3, rtol=0, atol=1e-9)


def test_bad_history_line_names_file_and_line(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"schema": "qa-record/1", "performed_unix_s": 1.0, "status": "pass",
                                "centre_offset_distance_mm": 0.1, "imagers": {}}) + "\n{oops\n")
    with pytest.raises(QAHistoryError, match=r"h.jsonl, line 2: not valid JSON"):
        read_history(path)
    path.write_text(json.dumps({"schema": "qa-record/7"}) + "\n")
    with pytest.raises(QAHistoryError, match="line 1: unknown record schema 'qa-record/7'"):
        read_history(path)
    with pytest.raises(QAHistoryError, match="cannot read QA history"):
        read_history(tmp_path / "missing.jsonl")


def test_empty_history_cannot_be_plotted(tmp_path):
    with pytest.raises(ReportError, match="QA history is empty"):
        write_trend_plot([], tmp_path / "t.png")


def test_calibration_report_has_figures_and_parameter_table(tmp_path):
    views = [PhantomView(im.name, (0, 0, 0), im.project(PHANTOM.placed_mm())) for im in GEOMETRY.imagers]
    result = solve_geometry(PHANTOM, views, GEOMETRY, calibrated_unix_s=0.0)
    index = write_calibration_report(result, tmp_path / "report", _frames(GEOMETRY, 7))
    text = index.read_text()
    assert "source_x_mm" in text and "panel_rotation_z_deg" in text and "Fit consistency (circular: ok)" in text
    assert "NOT VERIFIED" in text and (tmp_path / "report" / "report.pdf").read_bytes()[:5] == b"%PDF-"
    for name in GEOMETRY.names:
        assert (tmp_path / "report" / f"residuals_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_qa_that_could_not_be_done_is_recorded_as_fail_and_listed(tmp_path):
    from spineguide.calibration.qa import append_failure

    path = tmp_path / "h.jsonl"
    append_history(path, run_qa(GEOMETRY, PHANTOM, _frames(GEOMETRY, 6), performed_unix_s=1.7e9))
    append_failure(path, "BB B04 not found in imager A", {"A": "a.mha"}, performed_unix_s=1.7e9 + 86400.0)
    records = read_history(path)
    assert [r["status"] for r in records] == ["pass", "fail"]
    tr = trend(records)
    assert tr.n_failed == 1 and "not done: BB B04 not found in imager A" in tr.table
    assert write_trend_plot(records, tmp_path / "t.png").exists()


def test_trend_needs_a_minimum_span_and_gives_a_confidence_interval():
    def recs(days, slope_per_day, noise=0.0, seed=0):
        rng = np.random.default_rng(seed)
        return [{"performed_unix_s": 86400.0 * d, "status": "pass",
                 "centre_offset_distance_mm": 0.1 + slope_per_day * d + rng.normal(0.0, noise),
                 "imagers": {"A": {"rms_mm": 0.01}}} for d in days]
    # minutes of history: no drift claimed (the "1119 mm per 30 days")
    short = trend(recs(np.linspace(0.0, 0.01, 5), 1.0))
    assert np.isnan(short.offset_drift_mm_per_30_days) and "not estimated" in short.drift_line
    # 30 days of noisy daily QAs with a true 0.3 mm / 30 days drift: the 95 % interval covers it in ~95 % of
    # histories; over 40 seeded histories at least 34 (binomial 95 % -> P(<34) < 1 %)
    covered = 0
    for seed in range(40):
        tr = trend(recs(np.arange(30.0), 0.01, noise=0.05, seed=seed))
        lo, hi = tr.drift_ci_mm_per_30_days
        covered += lo <= 0.3 <= hi
    assert covered >= 34
