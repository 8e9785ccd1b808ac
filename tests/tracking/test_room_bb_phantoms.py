"""BB phantoms with bodies in the virtual room (issue 13 item 1): body chords, placement, chain frames."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.phantom import read_phantom
from spineguide.tracking.errors import SimulationError
from spineguide.tracking.room.bb_phantoms import SetupError, body_paths_mm, render_bb_phantom, water_equivalent_pmma
from spineguide.tracking.room.chain import ChainConfig

GEOMETRY = default_stereo_geometry(128, 3.2)  # coarse panels: the tests are about geometry, not resolution
DATA = "calibration/data/"


def _numeric_paths(phantom, imager, r, t, pixels, step_mm=0.02):
    """Independent reference: march each ray in ``step_mm`` steps and ask ``BodyPart.contains`` what material is there."""
    src, dirs = imager.backproject(pixels)
    out = {}
    s_iso = float(np.linalg.norm(src))
    ts = np.arange(s_iso - 200.0, s_iso + 200.0, step_mm) + step_mm / 2
    for k, d in enumerate(dirs):
        pts_room = src + ts[:, None] * d
        pts = (pts_room - t) @ r  # into the phantom frame
        mat = np.where(phantom.body.outer.contains(pts), phantom.body.outer.material, "")
        for f in phantom.body.features:
            mat = np.where(f.contains(pts) & (mat != ""), f.material, mat)
        for m in set(mat.tolist()) - {"", "air"}:
            out.setdefault(m, np.zeros(len(dirs)))[k] = step_mm * np.count_nonzero(mat == m)
    return out


@pytest.mark.parametrize("name", ["pmma-cube-150", "pmma-cylinder-mixed", "pmma-cube-inserts"])
def test_body_chords_match_a_marched_ray_reference(name):
    ph = read_phantom(DATA + name + ".json")
    setup = SetupError([1.5, -0.8, 0.6], [0.7, -0.4, 0.5])
    t = setup.translation_mm
    rng = np.random.default_rng(1)
    pixels = rng.uniform(10, 118, size=(40, 2))
    for im in GEOMETRY.imagers:
        paths = body_paths_mm(ph, im, setup.rotation, t)
        # body_paths_mm uses pixel centres: evaluate it at integer pixels
        ipix = np.rint(pixels)
        ref = _numeric_paths(ph, im, setup.rotation, t, ipix)
        for m in set(paths) | set(ref):
            got = paths[m][ipix[:, 1].astype(int), ipix[:, 0].astype(int)]
            # marching with 0.02 mm steps: each boundary crossing is off by at most one step
            assert_allclose(got, ref.get(m, np.zeros(len(ipix))), rtol=0, atol=4 * 0.02 + 1e-9, err_msg=f"{name} {im.name} {m}")


def test_setup_error_moves_the_bbs_rigidly_about_the_centre_marker():
    ph = read_phantom(DATA + "pmma-cube-150.json")
    setup = SetupError([2.0, 0.0, -1.0], [0.0, 1.0, 0.0])
    chain = ChainConfig(i0=1000.0, quantum_noise=False, seed_supersampling=1)
    bf = render_bb_phantom(GEOMETRY, ph, chain, setup=setup, couch_shift_mm=(0.0, 10.0, 0.0))
    expect = ph.positions_mm @ setup.rotation.T + [2.0, 10.0, -1.0]
    assert_allclose(bf.bb_positions_room_mm, expect, rtol=0, atol=1e-12)
    assert_allclose(bf.bb_positions_room_mm[ph.centre_index], [2.0, 10.0, -1.0], rtol=0, atol=1e-12)
    for im in GEOMETRY.imagers:
        assert_allclose(bf.centres_px[im.name], im.project(expect), rtol=0, atol=1e-9)


def test_the_body_attenuates_as_its_water_equivalent_path_says():
    # Mono 60 keV, no scatter, no noise: the open field reads i0, behind the cube i0 exp(-mu_w w_eq L).
    from spineguide.tracking.room.chain import Spectrum, material_mu_per_mm

    ph = read_phantom(DATA + "pmma-cube-150.json")
    chain = ChainConfig(i0=1000.0, quantum_noise=False, blur_sigma_px=0.0, dtype="float32", seed_supersampling=1)
    bf = render_bb_phantom(GEOMETRY, ph, chain)
    im = GEOMETRY["A"]
    paths = body_paths_mm(ph, im, np.eye(3), np.zeros(3))["pmma"]
    frame = np.asarray(bf.frames["A"], np.float64)
    mu = float(material_mu_per_mm("water", 60.0)[0]) * water_equivalent_pmma(60.0)
    # away from the BBs' windows
    far = np.ones(frame.shape, bool)
    for c, r in np.rint(bf.centres_px["A"]).astype(int):
        far[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4] = False
    assert_allclose(frame[far], 1000.0 * np.exp(-mu * paths[far]), rtol=2e-6)
    assert paths.max() > 150.0 and np.count_nonzero(paths == 0) > 100  # the cube's thick diagonal and open field
    assert Spectrum.mono(60.0).mean_energy_kev == 60.0


def test_pmma_is_denser_than_water_at_kv_energies():
    # NIST: PMMA 1.19 g/cm3; per mm it attenuates 4-14 % more than water at 40-100 keV
    for e in (40.0, 60.0, 100.0):
        assert 1.03 < water_equivalent_pmma(e) < 1.15


def test_bad_inputs_are_refused_with_a_clear_message():
    ph = read_phantom(DATA + "pmma-cube-150.json")
    with pytest.raises(SimulationError, match="couch_shift_mm"):
        render_bb_phantom(GEOMETRY, ph, couch_shift_mm=(0.0, np.nan, 0.0))
    with pytest.raises(SimulationError, match="translation_mm"):
        SetupError([1.0, 2.0], [0.0, 0.0, 0.0])
    with pytest.raises(SimulationError, match="BBPhantom"):
        render_bb_phantom(GEOMETRY, "cube")
