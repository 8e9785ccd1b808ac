"""FlatField.correct inpaints dead lines and other defects region by region (a strip per dead line, a box per
group of other defects) with the same result as inpainting the whole frame at once, at a fraction of the cost."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spineguide.tracking.localisation.flatfield import (
    INPAINT_RADIUS_PX,
    FlatField,
    _defect_tiles,
)


def _layout(name: str, rows: int = 256, cols: int = 240) -> np.ndarray:
    d = np.zeros((rows, cols), bool)
    rng = np.random.default_rng(7)
    if name in ("cross", "mixed"):
        d[97, :] = True
        d[:, 150] = True
    if name == "mixed":
        d[0, :] = True  # lines on the frame's edges
        d[:, cols - 1] = True
        d[180:183, :] = True  # a band of three rows
        d[:, 152] = True  # a second column close to the first
        d[30:32, 20:200] = True  # a partial double row (not a dead line: less than half the width)
        d[rng.integers(0, rows, 40), rng.integers(0, cols, 40)] = True
    if name == "clusters":
        d[rng.integers(0, rows, 60), rng.integers(0, cols, 60)] = True
        d[120:131, 60:66] = True
    return d


@pytest.mark.parametrize("layout", ["cross", "mixed", "clusters"])
def test_region_inpainting_matches_whole_frame_inpainting(layout):
    defects = _layout(layout)
    rows, cols = defects.shape
    r, c = np.mgrid[0:rows, 0:cols]
    signal = (3000.0 + 1000.0 * np.sin(c / 17.0) * np.cos(r / 23.0)).astype(np.float32)
    rng = np.random.default_rng(1)
    gain = rng.uniform(0.8, 1.2, (rows, cols)).astype(np.float32)
    offset = rng.uniform(90.0, 110.0, (rows, cols)).astype(np.float32)
    ff = FlatField("A", gain, offset, defects)
    raw = signal * gain + offset
    corrected = ff.correct(raw)
    applied = ff.apply(raw)
    whole = cv2.inpaint(applied, defects.astype(np.uint8), INPAINT_RADIUS_PX, cv2.INPAINT_NS)
    assert np.array_equal(corrected[~defects], applied[~defects])  # only defect pixels change
    # The same fill as one inpainting of the whole frame where regions do not meet (clusters); where dead
    # lines' fills meet (crossings, a band near an edge column) within 1 % of the signal, and pixel by pixel
    # as close to the truth as the whole-frame fill to within 0.1 % of the signal (measured: 1.7 counts of
    # 3000 worst, mean error 13.58 vs 13.60 counts).
    assert np.max(np.abs(corrected - whole)) <= (0.05 if layout == "clusters" else 0.01 * 3000.0)
    excess = np.abs(corrected - signal) - np.abs(whole - signal)
    assert np.max(excess[defects]) <= 3.0
    assert np.mean(np.abs(corrected - signal)[defects]) <= np.mean(np.abs(whole - signal)[defects]) + 0.1


def test_dead_lines_cost_their_strips_not_the_frame():
    defects = np.zeros((1024, 1024), bool)
    defects[300, :] = True
    defects[:, 700] = True
    tiles = _defect_tiles(defects)
    assert len(tiles) == 2
    area = sum((r1 - r0) * (c1 - c0) for (r0, r1, c0, c1), _, _ in tiles)
    assert area < 0.05 * defects.size


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(8, 48), cols=st.integers(8, 48), seed=st.integers(0, 2**31 - 1),
    n_rows=st.integers(0, 3), n_cols=st.integers(0, 3), n_px=st.integers(0, 30),
)
def test_every_defect_is_in_exactly_one_region(rows, cols, seed, n_rows, n_cols, n_px):
    rng = np.random.default_rng(seed)
    d = np.zeros((rows, cols), bool)
    d[rng.integers(0, rows, n_rows), :] = True
    d[:, rng.integers(0, cols, n_cols)] = True
    d[rng.integers(0, rows, n_px), rng.integers(0, cols, n_px)] = True
    count = np.zeros((rows, cols), int)
    done = np.zeros((rows, cols), bool)
    for (r0, r1, c0, c1), inpaint, keep in _defect_tiles(d):
        assert 0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols and inpaint.shape == keep.shape == (r1 - r0, c1 - c0)
        inpaint, keep = inpaint.astype(bool), keep.astype(bool)
        # a region fills every defect not kept yet (no earlier fill is read as a defect, no defect as signal)
        assert np.array_equal(inpaint, d[r0:r1, c0:c1] & ~done[r0:r1, c0:c1])
        assert not np.any(keep & ~inpaint)
        count[r0:r1, c0:c1] += keep
        done[r0:r1, c0:c1] |= keep
    assert np.array_equal(count, d.astype(int))


def test_overlapping_boxes_of_separate_defect_groups_keep_each_defect_once():
    # The falsifying example CI's hypothesis run found (session 11): one dead row and 17 scattered pixels on a
    # 38 x 40 panel, two residual groups whose bounding boxes overlap; a pixel was kept from both.
    rng = np.random.default_rng(36921)
    rows, cols = 38, 40
    d = np.zeros((rows, cols), bool)
    d[rng.integers(0, rows, 1), :] = True
    d[:, rng.integers(0, cols, 0)] = True
    d[rng.integers(0, rows, 17), rng.integers(0, cols, 17)] = True
    count = np.zeros((rows, cols), int)
    done = np.zeros((rows, cols), bool)
    for (r0, r1, c0, c1), inpaint, keep in _defect_tiles(d):
        inpaint, keep = inpaint.astype(bool), keep.astype(bool)
        assert np.array_equal(inpaint, d[r0:r1, c0:c1] & ~done[r0:r1, c0:c1])
        count[r0:r1, c0:c1] += keep
        done[r0:r1, c0:c1] |= keep
    assert np.array_equal(count, d.astype(int))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("maps", ["both", "gain", "offset", "none"])
def test_apply_is_the_numpy_composition_bit_for_bit(dtype, maps):
    """``apply`` (one fused numba pass) gives exactly ``max((raw - offset) * (1 / gain), 0)`` in float32, the
    frame cast first; below-offset pixels clip to 0, a NaN stays NaN, a non-C-contiguous frame is read right."""
    rng = np.random.default_rng(3)
    shape = (37, 53)
    gain = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    offset = rng.uniform(50, 300, shape).astype(np.float32)
    ff = FlatField("A", gain if maps in ("both", "gain") else None, offset if maps in ("both", "offset") else None)
    raw = rng.integers(0, 4000, shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        raw[3, 4] = np.nan
        raw = raw + rng.uniform(0, 1, shape).astype(dtype)
    # Each layout is a numba compilation of its own: the other layouts on one dtype only.
    for frame in (raw, np.asfortranarray(raw), raw[:, ::-1]) if dtype is np.uint16 else (raw,):
        ref = frame.astype(np.float32)
        if ff.offset_counts is not None:
            ref = np.subtract(frame, ff.offset_counts, dtype=np.float32)
        if ff.gain is not None:
            ref = ref * (np.float32(1.0) / ff.gain).astype(np.float32)
        ref = np.maximum(ref, np.float32(0.0))
        out = ff.apply(frame)
        assert out.dtype == np.float32 and out.shape == shape
        np.testing.assert_array_equal(out, ref)
        assert (maps in ("both", "offset")) <= bool((out == 0).any())  # some pixels lie below their offset
