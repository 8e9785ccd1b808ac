"""Seed detection in raw kV frames, against analytically rendered seeds with known centres.

The helper below renders frames with known truth: a soft-tissue ramp, a
vertebra-like dense block with a cortical rim (blurred edges), gold seeds as
capsules (cylinder + hemispherical caps; a sphere when length = diameter)
whose line integrals are exact chords ``2 sqrt(r^2 - d^2)`` times the gold
attenuation, integrated over each pixel's area (5 x 5 sub-samples, averaged
in transmission as a detector does), then Poisson noise and panel defects.
A capsule is symmetric about its centre, so the true centre of its image is
the centre it was drawn at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from numpy.testing import assert_allclose

from calibration.geometry import default_stereo_geometry
from tracking.detection import (
    Detection,
    DetectionConfig,
    detect_seeds,
    estimate_i0,
    line_integrals,
    seed_size_px,
)
from tracking.errors import FrameError

GOLD_MU_PER_MM = 8.7  # registration.attenuation gold at 60 keV effective
I0 = 20000.0  # the benchmark flat-field level (counts)


@dataclass(frozen=True)
class Seed2D:
    """A seed drawn on the panel: centre (col, row) px, axis angle from +col, sizes in panel px."""

    centre_px: tuple[float, float]
    angle_deg: float
    length_px: float
    diameter_px: float


def seed_on_panel(imager, centre_px, angle_deg, length_mm=3.5, diameter_mm=1.0) -> Seed2D:
    """A seed of physical size (mm at the isocentre) drawn through the imager's magnification."""
    scale = imager.magnification / float(imager.pixel_spacing_mm[0])
    return Seed2D(tuple(centre_px), angle_deg, length_mm * scale, diameter_mm * scale)


def background_line_integrals(rows, cols, bone_box=None, rim=0.25, bone=1.5, base=2.5):
    """Soft-tissue ramp plus a rotated dense block with a cortical rim; blurred edges (ln units)."""
    import cv2

    rr, cc = np.indices((rows, cols), dtype=np.float64)
    lint = base + 0.6 * cc / cols + 0.3 * rr / rows
    if bone_box is not None:
        (bc, br), (bw, bh), ang = bone_box
        a = math.radians(ang)
        u = (cc - bc) * math.cos(a) + (rr - br) * math.sin(a)
        v = -(cc - bc) * math.sin(a) + (rr - br) * math.cos(a)
        inside = (np.abs(u) <= bw / 2) & (np.abs(v) <= bh / 2)
        core = (np.abs(u) <= bw / 2 - 2) & (np.abs(v) <= bh / 2 - 2)
        lint = lint + bone * inside + rim * (inside & ~core)
    lint = cv2.GaussianBlur(lint.astype(np.float32), (0, 0), 0.8)
    return lint.astype(np.float64)


def seed_transmission(rows, cols, seeds, mm_per_panel_px, mu_per_mm=GOLD_MU_PER_MM, sub=5):
    """Pixel-averaged transmission exp(-mu * chord) of capsule seeds (1 outside seeds)."""
    trans = np.ones((rows, cols))
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    for s in seeds:
        c0, r0 = s.centre_px
        half = int(math.ceil(s.length_px / 2 + s.diameter_px + 2))
        r_lo, r_hi = max(0, int(r0) - half), min(rows, int(r0) + half + 2)
        c_lo, c_hi = max(0, int(c0) - half), min(cols, int(c0) + half + 2)
        rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi]
        ys = rr[..., None, None] + offs[:, None]
        xs = cc[..., None, None] + offs[None, :]
        a = math.radians(s.angle_deg)
        u = (xs - c0) * math.cos(a) + (ys - r0) * math.sin(a)
        v = -(xs - c0) * math.sin(a) + (ys - r0) * math.cos(a)
        seg = max(0.0, (s.length_px - s.diameter_px) / 2)
        du = np.maximum(np.abs(u) - seg, 0.0)
        d2 = du**2 + v**2
        rad = s.diameter_px / 2
        chord_px = 2 * np.sqrt(np.maximum(rad**2 - d2, 0.0))
        t = np.exp(-mu_per_mm * chord_px * mm_per_panel_px).mean(axis=(-1, -2))
        trans[r_lo:r_hi, c_lo:c_hi] *= t
    return trans


def render_kv_frame(
    imager,
    seeds,
    rng,
    i0=I0,
    bone_box=None,
    dead=(),
    hot=(),
    dead_column=None,
    saturated_box=None,
    dtype=np.uint16,
):
    """Raw frame (more photons = larger value) with Poisson noise; ``None`` rng for noise-free."""
    rows, cols = imager.rows, imager.cols
    lint = background_line_integrals(rows, cols, bone_box)
    mm_per_px = float(imager.pixel_spacing_mm[0]) / imager.magnification
    expected = i0 * np.exp(-lint) * seed_transmission(rows, cols, seeds, mm_per_px)
    counts = expected if rng is None else rng.poisson(expected).astype(np.float64)
    if saturated_box is not None:
        r0, r1, c0, c1 = saturated_box
        counts[r0:r1, c0:c1] = 65535
    for r, c in dead:
        counts[r, c] = 0
    for r, c in hot:
        counts[r, c] = 65535
    if dead_column is not None:
        counts[:, dead_column] = 0
    return np.clip(counts, 0, 65535).astype(dtype)


def match(dets, truth_px, radius_px):
    """For each true centre, the nearest detection within radius (or None)."""
    out = []
    for t in truth_px:
        best = min(dets, key=lambda d: np.hypot(*(d.centre_px - t)), default=None)
        out.append(best if best is not None and np.hypot(*(best.centre_px - t)) <= radius_px else None)
    return out


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


def test_bad_defect_mask_is_refused():
    with pytest.raises(FrameError, match="defect mask must be a bool array"):
        detect_seeds(np.ones((192, 192), np.uint16), FINE, i0=I0, defect_mask=np.zeros((192, 192)))


@pytest.mark.parametrize("kwargs, match_", [
    ({"marker_diameter_mm": 0.0}, "marker_diameter_mm"),
    ({"marker_length_mm": 0.5, "marker_diameter_mm": 1.0}, "shorter than"),
    ({"search_binning": 0}, "search_binning"),
    ({"defect_ratio": 1.0}, "defect_ratio"),
    ({"max_detections": 0}, "max_detections"),
])
def test_bad_config_is_refused(kwargs, match_):
    with pytest.raises(FrameError, match=match_):
        DetectionConfig(**kwargs)


def test_detection_centre_must_be_finite():
    with pytest.raises(FrameError, match="detection centre"):
        Detection("A", (np.nan, 1.0), 1.0, 10.0, 3.0, 1.0, 0.0, 5, 0.5)
