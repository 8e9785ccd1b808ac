"""The fused window-analysis kernels against the OpenCV/numpy composition they replace.

``spineguide.tracking.localisation._kernels.gather_windows`` and ``analyse_windows`` run the
full-resolution detection steps (defect repair, top-hat, matched filter,
noise, support, weighted moments) in one pass per window. Here the same
steps are written out with OpenCV and numpy on each window alone (border
replicated), as ``docs/FIDUCIALS.md`` describes them, on rendered frames with
seeds, bone edges and defects. Morphology, medians and components are exact
operations, so the two must agree exactly; the Gaussian's float32 sums may
round differently from OpenCV's vectorised ones (a few 1e-7 relative).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from spineguide.calibration.geometry import default_stereo_geometry
from tests.synthetic import SEED_I0 as I0
from tests.synthetic import render_kv_frame, seed_on_panel
from spineguide.tracking.localisation._kernels import (
    analyse_windows,
    gather_windows,
    isolated_outliers,
    reconstruct_under,
)
from spineguide.tracking.localisation.detection import DetectionConfig, detect_seeds, seed_size_px

FINE = default_stereo_geometry(panel_pixels=192, pixel_spacing_mm=0.4)["A"]
CFG = DetectionConfig()
SIZE = seed_size_px(FINE, CFG)
DISC = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (SIZE.element_px, SIZE.element_px))
HALF_WIDTHS = np.array([(int(np.flatnonzero(row)[-1]) - int(np.flatnonzero(row)[0])) // 2 for row in DISC], np.int64)
TAPS = cv2.getGaussianKernel(int(np.rint(8.0 * SIZE.sigma_px + 1.0)) | 1, SIZE.sigma_px, cv2.CV_32F).ravel()
REACH = math.ceil(SIZE.length_px / 2.0)
STEPS = SIZE.element_px // 2 + 1
PAD = max(len(HALF_WIDTHS) // 2, len(TAPS) // 2, REACH) + 2
RATIO = np.float32(CFG.defect_ratio)

# The Gaussian is the one float operation whose rounding may differ from
# OpenCV's: ~1e-7 relative in the filtered image, so peak SNRs (8-60) agree
# to 1e-5 relative; everything downstream of the support is exact.
SNR_RTOL = 1e-5
MOMENT_RTOL = 1e-12  # same pixels, same float64 weights, same summation order


def _frame():
    rng = np.random.default_rng(31)
    seeds = [seed_on_panel(FINE, c, a) for c, a in (((48.3, 52.6), 20.0), ((120.4, 35.2), 95.0),
                                                    ((90.7, 140.3), 160.0), ((150.2, 150.6), 60.0))]
    return render_kv_frame(FINE, seeds, rng, bone_box=((100.0, 100.0), (70.0, 110.0), 12.0),
                           dead=[(50, 60), (130, 60)], hot=[(62, 47), (140, 100)])


# Windows of several sizes: full, clipped at the panel's edges, a sliver.
WINDOWS = [(5, 98, 2, 95), (0, 61, 80, 170), (100, 192, 110, 192), (120, 192, 40, 140), (90, 92, 10, 60)]


def _tiles(frame, windows, keep=None):
    rows = max(r1 - r0 for r0, r1, _, _ in windows) + 2 * PAD
    cols = max(c1 - c0 for _, _, c0, c1 in windows) + 2 * PAD
    out = np.full((len(windows), rows, cols), np.nan, np.float32)
    b = np.array(windows, np.int64)
    count = gather_windows(frame, b[:, 0], b[:, 2], b[:, 1] - b[:, 0], b[:, 3] - b[:, 2],
                           np.arange(len(windows), dtype=np.int64), PAD, out, RATIO,
                           np.zeros((0, 0, 0), bool) if keep is None else keep)
    return out, count


def _repaired(window):
    """The isolated-defect repair of a window alone: outliers (border excluded) -> median of 8 neighbours."""
    raw = window.astype(np.float32)
    bad, _ = isolated_outliers(raw, RATIO)
    out = raw.copy()
    pad = np.pad(raw, 1, mode="reflect")
    for r, c in zip(*np.nonzero(bad)):
        out[r, c] = np.median(np.delete(pad[r:r + 3, c:c + 3].ravel(), 4))
    return out


def _outlier_count(frame):
    """Isolated outliers over the windows: the panel defects inside them, and photon-starved seed-core pixels."""
    count = sum(isolated_outliers(frame[r0:r1, c0:c1].astype(np.float32), RATIO)[1] for r0, r1, c0, c1 in WINDOWS)
    assert count >= 4  # the two dead and two hot pixels lie inside windows 0 and 3
    return count


def test_gathered_windows_are_repaired_windows_with_replicated_borders():
    frame = _frame()
    tiles, count = _tiles(frame, WINDOWS)
    assert count == _outlier_count(frame)
    rows, cols = tiles.shape[1:]
    for t, (r0, r1, c0, c1) in enumerate(WINDOWS):
        h, w = r1 - r0, c1 - c0
        expected = cv2.copyMakeBorder(_repaired(frame[r0:r1, c0:c1]), PAD, rows - PAD - h, PAD, cols - PAD - w,
                                      cv2.BORDER_REPLICATE)
        assert_array_equal(tiles[t], expected)


def test_calibrated_defects_are_left_to_the_inpainting():
    frame = _frame()
    keep = np.zeros((len(WINDOWS), 93, 93), bool)
    keep[0, 50 - 5, 60 - 2] = True  # the dead pixel at (50, 60), in window 0's pixels
    tiles, count = _tiles(frame, WINDOWS, keep)
    assert count == _outlier_count(frame) - 1
    assert tiles[0, PAD + 45, PAD + 58] == frame[50, 60]


def _reference(lint, min_snr):
    """Steps 4-6 of the method on one window with OpenCV and numpy; one row per kept component."""
    opened = cv2.morphologyEx(lint, cv2.MORPH_OPEN, DISC, borderType=cv2.BORDER_REPLICATE)
    background = reconstruct_under(opened, lint, STEPS)
    smooth = cv2.GaussianBlur(lint - background, (0, 0), SIZE.sigma_px, borderType=cv2.BORDER_REPLICATE)
    step = 4 if smooth.size > 65536 else 2 if smooth.size > 4096 else 1
    sample = smooth[::step, ::step]
    med = np.median(sample)
    sigma = max(np.float32(1.4826) * np.median(np.abs(sample - med)), np.float32(1e-6))
    snr = (smooth - med) / sigma
    near = cv2.dilate(snr, np.ones((2 * REACH + 1, 2 * REACH + 1), np.uint8), borderType=cv2.BORDER_REPLICATE)
    support = (snr > np.float32(2.5)) & (snr > np.float32(0.35) * near)
    n, labels = cv2.connectedComponents(support.astype(np.uint8), connectivity=8)
    top = lint - opened
    top_med = np.median(top[::2, ::2])
    grown = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int64)
    lab = np.where(labels > 0, labels, grown)
    rr, cc = np.indices(lint.shape)
    t_rel = top - top_med
    weight = -np.expm1(-np.maximum(t_rel.astype(np.float64), 0.0))
    rows = []
    for q in range(1, n):
        own = labels == q
        edge = own[0].any() or own[-1].any() or own[:, 0].any() or own[:, -1].any()
        peak = float(snr[own].max())
        if peak <= min_snr or edge:
            continue
        m = lab == q
        w, x, y = weight[m], cc[m].astype(np.float64), rr[m].astype(np.float64)
        rows.append([peak, w.sum(), (w * x).sum(), (w * y).sum(), (w * x * x).sum(), (w * y * y).sum(),
                     (w * x * y).sum(), m.sum(), float(t_rel[m].max())])
    return np.array(rows).reshape(-1, 9)


@pytest.mark.parametrize("min_snr", [CFG.min_snr, 3.0])
def test_window_analysis_gives_what_the_opencv_composition_gives(min_snr):
    frame = _frame()
    tiles, _ = _tiles(frame, WINDOWS)
    np.maximum(tiles, np.float32(CFG.intensity_floor), out=tiles)
    logs = cv2.log(tiles.reshape(-1, tiles.shape[2])).reshape(tiles.shape)
    log_i0 = np.full(len(WINDOWS), math.log(I0), np.float32)
    b = np.array(WINDOWS, np.int64)
    got = analyse_windows(logs, PAD, log_i0, b[:, 1] - b[:, 0], b[:, 3] - b[:, 2], HALF_WIDTHS, STEPS, TAPS, REACH,
                          np.float32(2.5), np.float32(0.35), float(min_snr))
    n_found = 0
    for t, (r0, r1, c0, c1) in enumerate(WINDOWS):
        lint = log_i0[t] - logs[t, PAD:PAD + r1 - r0, PAD:PAD + c1 - c0]
        expected = _reference(lint, min_snr)
        mine = got[got[:, 0] == t, 1:]
        assert len(mine) == len(expected), f"window {t}"
        # Components in raster order of their first pixel: sort both by centroid to pair them.
        mine = mine[np.lexsort((mine[:, 2] / mine[:, 1], mine[:, 3] / mine[:, 1]))]
        expected = expected[np.lexsort((expected[:, 2] / expected[:, 1], expected[:, 3] / expected[:, 1]))]
        assert_allclose(mine[:, 0], expected[:, 0], rtol=SNR_RTOL, atol=0)
        assert_array_equal(mine[:, 7], expected[:, 7])  # pixels in the grown support
        assert_allclose(mine[:, 1:7], expected[:, 1:7], rtol=MOMENT_RTOL, atol=0)
        assert_allclose(mine[:, 8], expected[:, 8], rtol=0, atol=0)
        n_found += len(mine)
    assert n_found >= 4  # every seed lies whole inside some window; lower min_snr also keeps noise


def test_a_sliver_of_a_window_at_the_panel_edge_finds_nothing_and_does_not_fail():
    frame = _frame()
    # A prediction just beyond the panel's left edge: its window is one column wide.
    half = math.ceil(CFG.tracking_window_mm * FINE.magnification / 0.4 + SIZE.window_half_px)
    assert detect_seeds(frame, FINE, i0=I0, predicted_px=[[-half + 0.4, 96.0]]) == ()
