"""The built-in bodied phantoms (issue 13) through the clinic imaging chain: every BB found, centres honest against
the rendered truth, and a daily QA that takes a setup error for setup. 512 px panels of 0.8 mm keep it quick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.phantom import read_phantom
from spineguide.calibration.qa import QAStatus, run_qa
from spineguide.calibration.solve import CalibrationFrame, _marker_sigmas, measure_frame
from spineguide.tracking.room.bb_phantoms import SetupError, render_bb_phantom
from spineguide.tracking.room.chain import ChainConfig, DetectorMaps

DATA = Path(__file__).resolve().parents[2] / "calibration" / "data"
GEOMETRY = default_stereo_geometry(512, 0.8)
CHAIN = ChainConfig.clinic(i0=20000.0)
MAPS = [DetectorMaps.make(im.rows, im.cols, CHAIN, k) for k, im in enumerate(GEOMETRY.imagers)]
#: Honest centre sigmas: RMS of error/sigma per axis over 2 imagers x 16 BBs x 2 axes (64 values) within
#: 0.6-1.6 (the chi distribution's 99 % range for 64 values is 0.78-1.22; the rest is the 0.02-0.03 px bias
#: that the sigmas do not include, ~0.3-0.5 sigma here).
HONEST_RANGE = (0.6, 1.6)


def _flat_fielded(bf):
    out = {}
    for k, im in enumerate(GEOMETRY.imagers):
        m = MAPS[k]
        out[im.name] = np.where(m.dead, 0.0, (bf.frames[im.name] - m.offset_counts) / m.gain).clip(0.0)
    return out


@pytest.mark.parametrize("body", ["pmma-cube-inserts", "pmma-cylinder-mixed"])
def test_every_bb_is_found_behind_the_body_and_the_centre_sigmas_are_honest(body):
    ph = read_phantom(DATA / f"{body}.json")
    bf = render_bb_phantom(GEOMETRY, ph, CHAIN, setup=SetupError((0.8, -0.5, 0.6), (0.3, -0.4, 0.2)), seed=4)
    frames = _flat_fielded(bf)
    z = []
    for im in GEOMETRY.imagers:
        m = measure_frame(ph, im, frames[im.name], max_missing=0)  # every BB, C and those behind the rod included
        err = m.match.marker_px - bf.centres_px[im.name]
        z.append(err / _marker_sigmas(m)[:, None])
    rms = float(np.sqrt(np.mean(np.square(z))))
    assert HONEST_RANGE[0] <= rms <= HONEST_RANGE[1], rms


def test_daily_qa_of_a_bodied_phantom_with_a_setup_error_passes_and_finds_the_setup():
    ph = read_phantom(DATA / "pmma-cube-150.json")
    setup = SetupError((1.5, -1.0, 0.8), (0.6, 0.5, -0.4))
    bf = render_bb_phantom(GEOMETRY, ph, CHAIN, setup=setup, seed=5)
    frames = _flat_fielded(bf)
    r = run_qa(GEOMETRY, ph, [CalibrationFrame(n, frames[n]) for n in GEOMETRY.names])
    assert r.status is QAStatus.PASS, r.reasons
    s = r.causes.setup
    assert np.all(np.abs(s.translation_mm - setup.translation_mm) <= 4 * s.translation_sigma_mm + 0.02)
    assert np.all(np.abs(s.rotation_deg - setup.rotation_deg) <= 4 * s.rotation_sigma_deg + 0.02)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_bb_of_several_sizes_is_found_300_mm_along_the_imagers_axis(sign):
    """+-300 mm along an imager's central axis (the depth protocol) changes the magnification by +-14 %: each BB's
    size window follows its own shadow at its depth. Regression: the window was set by the median BB at the
    isocentre's magnification, and the 1.5 mm BBs of the mixed cylinder at -300 mm fell below it (rejected as too
    small: 'BB B01 not found in imager B')."""
    ph = read_phantom(DATA / "pmma-cylinder-mixed.json")
    for k, im in enumerate(GEOMETRY.imagers):
        shift = tuple(float(v) for v in sign * 300.0 * im.normal)
        bf = render_bb_phantom(GEOMETRY, ph, CHAIN, couch_shift_mm=shift, seed=11 + k)
        m = measure_frame(ph, im, _flat_fielded(bf)[im.name], couch_shift_mm=shift, max_missing=0)
        assert m.match.n_found == ph.n_markers
        err = np.linalg.norm(m.match.marker_px - bf.centres_px[im.name], axis=1)
        assert np.max(err) < 0.3, err  # each named BB is the right one (shadows 2.5-7 px, centres ~0.05 px)
