"""Seed detection in raw kV frames, against analytically rendered seeds with known centres.

The frames come from ``tests.synthetic.render_kv_frame``: a soft-tissue ramp,
a vertebra-like dense block with a cortical rim (blurred edges), gold seeds as
capsules whose line integrals are exact chords times gold's attenuation,
integrated over each pixel's area (averaged in transmission as a detector
does), then Poisson noise and panel defects. A capsule is symmetric about its
centre, so the true centre of its image is the centre it was drawn at.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from tests.synthetic import SEED_I0 as I0
from tests.synthetic import match_detections as match
from tests.synthetic import render_kv_frame, seed_on_panel
from spineguide.tracking.localisation.detection import (
    Detection,
    DetectionConfig,
    detect_seeds,
    detect_seeds_in_frames,
    estimate_i0,
    line_integrals,
    seed_size_px,
)
from spineguide.tracking.errors import FrameError

# ---------------------------------------------------------------------------- geometry for tests
FINE = default_stereo_geometry(panel_pixels=192, pixel_spacing_mm=0.4)["A"]  # realistic pitch, cropped panel
COARSE = default_stereo_geometry(panel_pixels=256, pixel_spacing_mm=1.6)["A"]  # 4x binned panel

# Sub-pixel tolerances. The issue asks 0.15 mm RMS 3D; a view's centre error e
# (px) maps to e * pitch / magnification at the isocentre. At 0.4 mm pitch
# (0.24 mm per px at the isocentre) 0.2 px is 0.05 mm: a third of the budget.
FINE_TOL_PX = 0.2
# A seed lying across a bone edge with a cortical rim: the rim (a ridge
# narrower than the seed) is not background to a top-hat and pulls the
# centroid towards it. Budget: 0.15 mm RMS 3D allows ~0.1 mm per view, i.e.
# 0.4 px; such seeds are a minority, so they may use 0.3 px (0.07 mm).
EDGE_TOL_PX = 0.3
# At 1.6 mm pitch a 1 mm seed is one pixel wide; 0.25 px (0.24 mm at the
# isocentre) is the binned panel's share when only used for test speed.
COARSE_TOL_PX = 0.25


def test_line_integrals_are_minus_log_of_transmission():
    frame = np.array([[20000, 10000], [2000, 0]], dtype=np.uint16)
    lint = line_integrals(frame, 20000.0, intensity_floor=0.5)
    expected = [[0.0, math.log(2.0)], [math.log(10.0), math.log(20000.0 / 0.5)]]
    assert_allclose(lint, expected, rtol=0, atol=1e-5)  # float32 log: ~1e-7 relative of values <= 11


def test_estimate_i0_reads_the_unattenuated_level():
    rng = np.random.default_rng(1)
    frame = rng.poisson(np.r_[np.full(4000, 300.0), np.full(60000, I0)]).reshape(256, 250).astype(np.uint16)
    frame[::4, ::4][0, :3] = 65535  # hot pixels do not move a percentile
    # 99.5th percentile of Poisson(20000): mean + 2.58 sigma = 20000 + 365.
    assert_allclose(estimate_i0(frame), I0, rtol=0, atol=3.5 * math.sqrt(I0))


def test_seed_size_follows_magnification_and_pitch():
    cfg = DetectionConfig(marker_diameter_mm=1.0, marker_length_mm=5.0)
    size = seed_size_px(FINE, cfg)
    mag = FINE.magnification
    assert_allclose(size.diameter_px, 1.0 * mag / 0.4 + 1.0, rtol=0, atol=1e-12)
    assert_allclose(size.length_px, 5.0 * mag / 0.4 + 1.0, rtol=0, atol=1e-12)
    assert size.element_px % 2 == 1 and size.element_px > size.diameter_px


# ---------------------------------------------------------------------------- known-truth centres
FINE_SEEDS = [((50.3, 60.7), 0.0, 3.5), ((120.45, 55.2), 37.0, 3.5), ((90.8, 140.15), 90.0, 5.0),
              ((150.2, 130.6), 128.0, 3.0), ((60.55, 135.35), 0.0, 1.0)]  # last: a 1 mm sphere


def _fine_frame(rng, bone=True):
    seeds = [seed_on_panel(FINE, c, a, length_mm=l) for c, a, l in FINE_SEEDS]
    box = ((100.0, 100.0), (70.0, 110.0), 12.0) if bone else None
    return render_kv_frame(FINE, seeds, rng, bone_box=box), np.array([c for c, _, _ in FINE_SEEDS])


def test_seed_centres_found_to_subpixel_at_realistic_pitch():
    frame, truth = _fine_frame(np.random.default_rng(7))
    dets = detect_seeds(frame, FINE, i0=I0)
    found = match(dets, truth, 2.0)
    assert all(d is not None for d in found), [d is not None for d in found]
    assert len(dets) == len(truth)  # and nothing else: bone edges, rim, corners
    centres = np.array([d.centre_px for d in found])
    clear = [0, 2, 3]  # seeds 1 and 4 lie across the vertebra's rim
    assert_allclose(centres[clear], truth[clear], rtol=0, atol=FINE_TOL_PX)
    assert_allclose(centres, truth, rtol=0, atol=EDGE_TOL_PX)
    for d in found:
        assert 0 < d.confidence <= 1 and d.contrast > 1.0 and d.imager == "A"


def test_noise_free_centres_away_from_bone_are_exact_to_a_hundredth_of_a_pixel():
    # Without noise or background structure the only error is the centroid's
    # own bias; weighting by transmission deficit (linear in covered area)
    # leaves none beyond the support cut.
    NOISE_FREE_TOL_PX = 0.02
    frame, truth = _fine_frame(None, bone=False)
    dets = detect_seeds(frame.astype(np.float32), FINE, i0=I0)
    found = match(dets, truth, 2.0)
    assert_allclose(np.array([d.centre_px for d in found]), truth, rtol=0, atol=NOISE_FREE_TOL_PX)


def test_estimated_i0_gives_the_same_centres_as_the_given_one():
    frame, truth = _fine_frame(np.random.default_rng(8))
    given = sorted(tuple(d.centre_px) for d in detect_seeds(frame, FINE, i0=I0))
    est = sorted(tuple(d.centre_px) for d in detect_seeds(frame, FINE))
    # i0 only offsets every line integral; differences (and centres) do not change.
    assert_allclose(np.array(est), np.array(given), rtol=0, atol=1e-6)


def test_orientation_of_a_cylindrical_seed_is_measured():
    frame, truth = _fine_frame(np.random.default_rng(9), bone=False)
    dets = match(detect_seeds(frame, FINE, i0=I0), truth, 2.0)
    ORIENT_TOL_DEG = 5.0  # a 14-px-long seed: 1 px across its length is ~4 degrees
    assert_allclose(dets[1].orientation_deg, 37.0, rtol=0, atol=ORIENT_TOL_DEG)
    assert dets[1].length_px > 2 * dets[1].width_px
    assert dets[4].length_px < 1.5 * dets[4].width_px  # the sphere is round


def test_coarse_panel_seeds_found_to_subpixel():
    rng = np.random.default_rng(11)
    truth = np.array([[60.4, 70.3], [128.7, 120.2], [190.1, 64.6], [100.35, 200.8]])
    seeds = [seed_on_panel(COARSE, c, a) for c, a in zip(truth, (0.0, 45.0, 100.0, 160.0))]
    frame = render_kv_frame(COARSE, seeds, rng, bone_box=((128.0, 128.0), (60.0, 90.0), -8.0))
    dets = detect_seeds(frame, COARSE, i0=I0)
    found = match(dets, truth, 1.5)
    assert all(d is not None for d in found)
    assert len(dets) == len(truth)
    assert_allclose(np.array([d.centre_px for d in found]), truth, rtol=0, atol=COARSE_TOL_PX)


def test_seed_over_dense_bone_and_on_its_edge_is_found():
    rng = np.random.default_rng(12)
    box = ((96.0, 96.0), (80.0, 120.0), 0.0)  # dense block spans cols 56-136, rows 36-156
    truth = np.array([[96.3, 96.6], [56.2, 120.4], [100.7, 37.1]])  # inside; on the left edge; on the top edge
    seeds = [seed_on_panel(FINE, c, a) for c, a in zip(truth, (20.0, 90.0, 0.0))]
    frame = render_kv_frame(FINE, seeds, rng, bone_box=box)
    dets = detect_seeds(frame, FINE, i0=I0)
    found = match(dets, truth, 2.0)
    assert all(d is not None for d in found), [d is not None for d in found]
    assert len(dets) == 3
    centres = np.array([d.centre_px for d in found])
    assert_allclose(centres[0], truth[0], rtol=0, atol=FINE_TOL_PX)
    assert_allclose(centres, truth, rtol=0, atol=EDGE_TOL_PX)


# ---------------------------------------------------------------------------- not seeds
def test_bone_edges_defects_and_saturation_give_no_detections():
    rng = np.random.default_rng(13)
    frame = render_kv_frame(
        FINE, [], rng,
        bone_box=((100.0, 90.0), (70.0, 100.0), 25.0),
        dead=[(20, 30), (150, 170), (100, 100)],
        hot=[(40, 160), (170, 20)],
        dead_column=180,
        saturated_box=(0, 25, 120, 192),
    )
    assert detect_seeds(frame, FINE, i0=I0) == ()
    assert detect_seeds(frame, FINE, i0=I0, predicted_px=[[100.0, 100.0], [30.0, 20.0]]) == ()


def test_dead_and_hot_pixels_next_to_a_seed_do_not_move_it():
    rng = np.random.default_rng(14)
    truth = np.array([[96.4, 96.2]])
    frame = render_kv_frame(FINE, [seed_on_panel(FINE, truth[0], 30.0)], rng, dead=[(92, 104)], hot=[(101, 90)])
    dets = detect_seeds(frame, FINE, i0=I0)
    assert len(dets) == 1
    assert_allclose(dets[0].centre_px, truth[0], rtol=0, atol=FINE_TOL_PX)


def test_calibrated_defect_mask_is_inpainted():
    rng = np.random.default_rng(15)
    truth = np.array([[96.4, 96.2]])
    frame = render_kv_frame(FINE, [seed_on_panel(FINE, truth[0], 90.0)], rng, dead_column=110)
    mask = np.zeros(frame.shape, bool)
    mask[:, 110] = True
    dets = detect_seeds(frame, FINE, i0=I0, defect_mask=mask)
    assert len(dets) == 1
    assert_allclose(dets[0].centre_px, truth[0], rtol=0, atol=FINE_TOL_PX)


# ---------------------------------------------------------------------------- tracking windows
def test_tracking_windows_find_the_predicted_seeds_only():
    frame, truth = _fine_frame(np.random.default_rng(16))
    predicted = truth[:2] + [[1.5, -1.0], [-2.0, 0.5]]  # prior off by a few pixels
    dets = detect_seeds(frame, FINE, i0=I0, predicted_px=predicted)
    found = match(dets, truth[:2], 2.0)
    assert all(d is not None for d in found)
    assert len(dets) == 2  # seeds 3-5 (rows 130-140) lie outside both windows
    centres = np.array([d.centre_px for d in found])
    assert_allclose(centres[0], truth[0], rtol=0, atol=FINE_TOL_PX)
    assert_allclose(centres, truth[:2], rtol=0, atol=EDGE_TOL_PX)


def test_tracking_and_whole_frame_both_find_every_seed():
    frame, truth = _fine_frame(np.random.default_rng(17))
    for predicted in (None, truth):
        found = match(detect_seeds(frame, FINE, i0=I0, predicted_px=predicted), truth, 2.0)
        assert_allclose([d.centre_px for d in found], truth, rtol=0, atol=EDGE_TOL_PX)


def test_frames_detected_together_give_what_each_gives_alone():
    # detect_seeds_in_frames analyses the windows of all frames in one
    # mosaic, each window with its own replicated border: the same numbers as
    # one frame at a time, in whole-frame and tracking mode.
    frame_a, truth = _fine_frame(np.random.default_rng(18))
    frame_b, _ = _fine_frame(np.random.default_rng(19), bone=False)
    frames = {"A": frame_a, "B": frame_b}
    for predicted in (None, {"A": truth[:3], "B": truth[2:]}):
        together = detect_seeds_in_frames(frames, {"A": FINE, "B": FINE}, {"A": I0, "B": I0}, predicted)
        for key, frame in frames.items():
            alone = detect_seeds(frame, FINE, I0, None if predicted is None else predicted[key])
            assert len(together[key]) == len(alone) > 0
            assert_allclose([d.centre_px for d in together[key]], [d.centre_px for d in alone], rtol=0, atol=1e-9)


def test_weak_blobs_far_below_the_seeds_contrast_are_not_seeds():
    # A thin dense ridge seen edge-on (an endplate) or photon-starved noise
    # can be as significant as a seed but never as dense: a one-third-density
    # "seed" next to two gold ones is dropped by the relative contrast test.
    rng = np.random.default_rng(20)
    gold = [seed_on_panel(FINE, c, a) for c, a in (((60.3, 60.6), 10.0), ((130.4, 120.2), 75.0))]
    frame_gold = render_kv_frame(FINE, gold, None, dtype=np.float32).astype(np.float64)
    faint = render_kv_frame(FINE, [seed_on_panel(FINE, (60.2, 140.7), 0.0)], None, dtype=np.float32)
    plain = render_kv_frame(FINE, [], None, dtype=np.float32)
    expected = frame_gold * (faint.astype(np.float64) / plain) ** 0.25  # a quarter of gold's line integral
    frame = np.clip(rng.poisson(expected), 0, 65535).astype(np.uint16)
    dets = detect_seeds(frame, FINE, i0=I0)
    assert len(dets) == 2
    assert_allclose(sorted(d.centre_px[0] for d in dets), [60.3, 130.4], rtol=0, atol=FINE_TOL_PX)
    weak = detect_seeds(frame, FINE, i0=I0, config=DetectionConfig(min_relative_contrast=0.0))
    assert len(weak) == 3  # found, but a quarter of the contrast


# ---------------------------------------------------------------------------- error paths
def test_wrong_dtype_is_refused():
    with pytest.raises(FrameError, match="imager 'A': frame dtype must be uint16 or float32, got float64"):
        detect_seeds(np.zeros((192, 192)), FINE, i0=I0)


def test_wrong_size_is_refused():
    with pytest.raises(FrameError, match=r"imager 'A': frame is 100x192 .* imager has 192x192"):
        detect_seeds(np.zeros((100, 192), np.uint16), FINE, i0=I0)


def test_nan_pixel_is_refused():
    frame = np.full((192, 192), 1000.0, np.float32)
    frame[5, 7] = np.nan
    with pytest.raises(FrameError, match=r"1 non-finite pixels \(first at row 5, col 7"):
        detect_seeds(frame, FINE, i0=I0)


def test_inf_pixel_is_refused():
    frame = np.full((192, 192), 1000.0, np.float32)
    frame[0, 0] = np.inf
    with pytest.raises(FrameError, match="non-finite"):
        detect_seeds(frame, FINE)


@pytest.mark.parametrize("i0", [0.0, -5.0, float("nan"), float("inf"), "abc"])
def test_bad_i0_is_refused(i0):
    with pytest.raises(FrameError, match="i0 must be"):
        detect_seeds(np.ones((192, 192), np.uint16), FINE, i0=i0)


def test_all_dark_frame_cannot_estimate_i0():
    with pytest.raises(FrameError, match="cannot estimate i0"):
        detect_seeds(np.zeros((192, 192), np.uint16), FINE)


def test_bad_prediction_is_refused():
    with pytest.raises(FrameError, match="predicted positions must be finite"):
        detect_seeds(np.ones((192, 192), np.uint16), FINE, i0=I0, predicted_px=[[np.nan, 3.0]])


def test_frame_without_an_imager_is_refused():
    with pytest.raises(FrameError, match="frame 'B': no imager given for it"):
        detect_seeds_in_frames({"B": np.ones((192, 192), np.uint16)}, {"A": FINE}, {"B": I0})


def test_bad_defect_mask_is_refused():
    with pytest.raises(FrameError, match="defect mask must be a bool array"):
        detect_seeds(np.ones((192, 192), np.uint16), FINE, i0=I0, defect_mask=np.zeros((192, 192)))


@pytest.mark.parametrize("kwargs, match_", [
    ({"marker_diameter_mm": 0.0}, "marker_diameter_mm"),
    ({"marker_length_mm": 0.5, "marker_diameter_mm": 1.0}, "shorter than"),
    ({"search_binning": 0}, "search_binning"),
    ({"defect_ratio": 1.0}, "defect_ratio"),
    ({"max_detections": 0}, "max_detections"),
    ({"min_relative_contrast": 1.0}, "min_relative_contrast"),
    ({"min_relative_contrast": -0.1}, "min_relative_contrast"),
])
def test_bad_config_is_refused(kwargs, match_):
    with pytest.raises(FrameError, match=match_):
        DetectionConfig(**kwargs)


def test_detection_centre_must_be_finite():
    with pytest.raises(FrameError, match="detection centre"):
        Detection("A", (np.nan, 1.0), 1.0, 10.0, 3.0, 1.0, 0.0, 5, 0.5)
