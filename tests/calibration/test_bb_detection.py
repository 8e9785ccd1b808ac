"""BB detection with sub-pixel centres and automatic marker assignment (small 256 px panels)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.spatial.transform import Rotation

from spineguide.calibration.bb_detection import DetectionError, ImagesSwappedError, MarkerCountError, detect_bbs, line_integrals
from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.phantom import default_phantom
from spineguide.calibration.solve import CalibrationFrame, calibrate, measure_frame
from spineguide.tracking.room import DetectorModel, OutputDtype, render_bb_frames

I0 = 20000.0
GEOMETRY = default_stereo_geometry(256, 1.6)  # 41 cm panels at 1.6 mm: a 2 mm BB is 2 px wide
PHANTOM = default_phantom()

#: Noise-free frames: the renderer integrates each pixel with 8x8 sub-rays, so
#: the 2-px disk's edge is resolved to 1/8 px; a centroid of such a disk can be
#: off by up to about 1/(8 d) = 0.06 px.
NOISE_FREE_TOL_PX = 0.07
#: Noisy frames: per-pixel noise of the absorbed fraction 1/sqrt(i0 e^-0.3) =
#: 0.0082, over a 3.5-px window (sum x^2 = 236 px^4) and a 3.3 px^2 BB gives a
#: centroid sigma of 0.0082 * sqrt(236) / 3.3 = 0.038 px; 5 sigma plus the
#: noise-free bound.
NOISY_TOL_PX = 5 * 0.038 + NOISE_FREE_TOL_PX


def _render(points_mm, seed=0, noise=True, geometry=GEOMETRY, diameters=None):
    det = DetectorModel(noise=noise, dtype=OutputDtype.UINT16 if noise else OutputDtype.FLOAT32, seed_supersampling=8)
    d = PHANTOM.diameters_mm if diameters is None else diameters
    return render_bb_frames(geometry, points_mm, d, "tungsten", I0, detector=det, seed=seed)


@pytest.mark.parametrize("noise,tol", [(False, NOISE_FREE_TOL_PX), (True, NOISY_TOL_PX)])
def test_detected_centres_match_projected_bb_centres_to_sub_pixel(noise, tol):
    frames = _render(PHANTOM.placed_mm(), seed=3, noise=noise)
    for im in GEOMETRY.imagers:
        m = measure_frame(PHANTOM, im, frames.frames[im.name], i0=I0)
        assert m.match.n_found == PHANTOM.n_markers
        assert_allclose(m.match.marker_px, frames.centres_px[im.name], rtol=0, atol=tol)


def test_i0_is_estimated_when_not_given():
    frames = _render(PHANTOM.placed_mm(), seed=1)
    raw = frames.frames["A"]
    _, i0 = line_integrals(raw)
    # the phantom body attenuates the open field by e^-0.3 (room default); the
    # median of Poisson counts is within a count of the mean
    assert_allclose(i0, I0 * np.exp(-0.3), rtol=0, atol=2.0)
    m = measure_frame(PHANTOM, GEOMETRY["A"], raw)
    assert_allclose(m.match.marker_px, frames.centres_px["A"], rtol=0, atol=NOISY_TOL_PX)


def test_missing_bb_is_reported_missing_and_the_rest_are_named_right():
    keep = np.ones(PHANTOM.n_markers, bool)
    keep[5] = False
    frames = _render(PHANTOM.placed_mm()[keep], diameters=PHANTOM.diameters_mm[keep], seed=2)
    m = measure_frame(PHANTOM, GEOMETRY["B"], frames.frames["B"], i0=I0)
    assert not m.match.found[5] and m.match.n_found == PHANTOM.n_markers - 1
    assert np.all(np.isnan(m.match.marker_px[5]))
    assert_allclose(m.match.marker_px[keep], frames.centres_px["B"], rtol=0, atol=NOISY_TOL_PX)


def test_extra_bb_and_large_object_in_view_are_not_assigned():
    extra = np.array([[70.0, 75.0, -10.0], [-75.0, -70.0, 20.0]])  # a stray BB and a 10 mm ball
    pts = np.vstack([PHANTOM.placed_mm(), extra])
    diam = np.concatenate([PHANTOM.diameters_mm, [2.0, 10.0]])
    frames = _render(pts, diameters=diam, seed=4)
    for im in GEOMETRY.imagers:
        m = measure_frame(PHANTOM, im, frames.frames[im.name], i0=I0)
        assert m.match.n_found == PHANTOM.n_markers
        assert_allclose(m.match.marker_px, frames.centres_px[im.name][:16], rtol=0, atol=NOISY_TOL_PX)
        assert len(m.match.unmatched_detections) + len(m.detections.rejected_px) >= 2


def test_phantom_rotated_3_degrees_and_shifted_is_still_named_right():
    rot = Rotation.from_euler("xyz", [3.0, -2.0, 3.0], degrees=True).as_matrix()
    pts = PHANTOM.placed_mm([4.0, -3.0, 2.0], rotation=rot)
    frames = _render(pts, seed=5)
    for im in GEOMETRY.imagers:
        m = measure_frame(PHANTOM, im, frames.frames[im.name], i0=I0)
        assert m.match.n_found == PHANTOM.n_markers
        assert_allclose(m.match.marker_px, frames.centres_px[im.name], rtol=0, atol=NOISY_TOL_PX)


def test_too_many_missing_markers_is_an_error_naming_the_count():
    keep = np.arange(PHANTOM.n_markers) >= 4
    frames = _render(PHANTOM.placed_mm()[keep], diameters=PHANTOM.diameters_mm[keep], seed=6)
    with pytest.raises(MarkerCountError, match=r"BBs " + ", ".join(PHANTOM.names[:4]) + r" not found in imager A: imager 'A': found 12 of the phantom's 16 markers, at most 2"):
        measure_frame(PHANTOM, GEOMETRY["A"], frames.frames["A"], i0=I0, max_missing=2)


def test_images_swapped_between_imagers_is_an_error():
    frames = _render(PHANTOM.placed_mm(), seed=7)
    swapped = [CalibrationFrame("A", frames.frames["B"], i0=I0), CalibrationFrame("B", frames.frames["A"], i0=I0)]
    with pytest.raises(ImagesSwappedError, match="imager 'A'.*as imager 'B' sees it.*swapped"):
        calibrate(PHANTOM, swapped, GEOMETRY)


def test_frame_of_wrong_size_for_the_panel_is_an_error():
    with pytest.raises(DetectionError, match="imager 'A'.*frame is 100x256 pixels, the panel has 256x256"):
        measure_frame(PHANTOM, GEOMETRY["A"], np.full((100, 256), I0))


def test_bad_frames_and_parameters_are_errors():
    with pytest.raises(DetectionError, match="2D array"):
        detect_bbs(np.zeros((4, 4, 4)), diameter_px=3.0, imager="A")
    with pytest.raises(DetectionError, match="negative pixels"):
        detect_bbs(np.full((32, 32), -1.0), diameter_px=3.0, imager="A")
    with pytest.raises(DetectionError, match="i0 must be a positive number, got -5"):
        detect_bbs(np.full((32, 32), 100.0), diameter_px=3.0, i0=-5, imager="A")
    with pytest.raises(DetectionError, match="cannot estimate i0: the median pixel is 0"):
        detect_bbs(np.zeros((32, 32)), diameter_px=3.0, imager="A")
    with pytest.raises(DetectionError, match="diameter_px must be a number above 0.5"):
        detect_bbs(np.full((32, 32), 100.0), diameter_px=0.1, imager="A")
    for bad in ((5.0, 3.0), (0.2, 3.0), (float("nan"), 3.0), ("a", 3.0), (3.0,), 7.0):
        with pytest.raises(DetectionError, match="imager 'A': size_range_px must be"):
            detect_bbs(np.full((32, 32), 100.0), diameter_px=3.0, imager="A", size_range_px=bad)


def test_blank_frame_finds_no_markers():
    rng = np.random.default_rng(8)
    blank = rng.poisson(I0, size=(256, 256)).astype(np.uint16)
    assert detect_bbs(blank, diameter_px=2.0, i0=I0).count == 0
    with pytest.raises(MarkerCountError, match="found 0 BB-like blobs"):
        measure_frame(PHANTOM, GEOMETRY["A"], blank, i0=I0)
