"""Seeds in clinic-like frames: flat-field correction, the matched-filter search and its joint choice.

Small realistic-chain cases (low dose, scatter-to-primary 1.5, heel, gain
and offset maps, dead lines, lag-free single frames) in both built-in rooms,
on 512-pixel panels of each room's own pitch around the isocentre.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from spineguide.registration.errors import SeedMigrationError
from spineguide.registration.pose import Pose
from tests.synthetic import small_thoracolumbar
from spineguide.tracking.errors import FiducialNotFoundError, FrameError, ImagerLabelError
from spineguide.tracking.localisation.fiducials import FaintSearchConfig, FiducialConfig, FiducialFlag, localise_fiducials
from spineguide.tracking.localisation.flatfield import (
    FlatField,
    flat_fields_from_geometry_file,
    flat_fields_from_geometry_json,
    read_flat_field,
)
from spineguide.tracking.room.chain import ChainConfig, DetectorMaps, RealisticSimulator
from spineguide.tracking.room.kv import OutputDtype
from spineguide.tracking.room.rooms import room_geometry

PANEL = 512
#: 3D seed error at i0 6000 under scatter 1.5: the fitted centre's noise is about 0.3 px per view
#: (0.07 mm at the isocentre) at the seeds' SNR of 12-25; 0.5 mm leaves room for a seed over bone.
SEED_TOL_MM = 0.5
FLAT_RTOL = 1e-5  # float32 arithmetic of (raw - offset) / gain
POSE = Pose.from_six([2.0, -3.0, 1.5], [1.0, -1.5, 2.0])


@functools.lru_cache(maxsize=4)
def _sim(room: str, with_seeds: bool = True) -> RealisticSimulator:
    phantom = small_thoracolumbar()
    if not with_seeds:
        phantom = dataclasses.replace(phantom, seeds=())
    return RealisticSimulator(phantom, room_geometry(room, PANEL), ChainConfig.clinic(i0=6000.0,
                                                                                      scatter_to_primary=1.5))


def _planned():
    phantom = small_thoracolumbar()
    return phantom.seeds_room_mm(), tuple(s.name for s in phantom.seeds)


def _flat(sim: RealisticSimulator) -> dict[str, FlatField]:
    out = {}
    for n in sim.geometry.names:
        m = sim.maps(n)
        out[n] = FlatField(n, m.gain, m.offset_counts, m.dead)
    return out


# ---------------------------------------------------------------------------- flat field
def test_flat_field_undoes_the_panel_maps_exactly():
    chain = ChainConfig(gain_rms=0.08, offset_counts=250.0, offset_rms_counts=9.0, dead_cols=2, quantum_noise=False,
                        blur_sigma_px=0.0, dtype=OutputDtype.FLOAT32)
    maps = DetectorMaps.make(32, 40, chain)
    signal = np.random.default_rng(1).uniform(50.0, 5000.0, (32, 40))
    raw = (signal * maps.gain + maps.offset_counts).astype(np.float32)
    ff = FlatField("A", maps.gain, maps.offset_counts, maps.dead)
    assert_allclose(ff.apply(raw), signal, rtol=FLAT_RTOL)
    assert ff.defects.sum() == 2 * 32


@given(gain=st.floats(0.2, 3.0), offset=st.floats(0.0, 1000.0), signal=st.floats(0.0, 60000.0))
def test_flat_field_inverts_any_positive_gain(gain, offset, signal):
    ff = FlatField("A", np.full((2, 2), gain), np.full((2, 2), offset))
    raw = np.full((2, 2), np.float32(gain * signal + offset), np.float32)
    assert_allclose(ff.apply(raw), signal, rtol=FLAT_RTOL, atol=FLAT_RTOL * (offset + 1.0) / gain)


def test_flat_field_errors_name_the_imager(tmp_path):
    with pytest.raises(FrameError, match="imager 'B': gain map holds negative"):
        FlatField("B", -np.ones((2, 2)))
    with pytest.raises(FrameError, match="imager 'B': gain .* and offset .* differ"):
        FlatField("B", np.ones((2, 2)), np.zeros((3, 2)))
    with pytest.raises(FrameError, match="imager 'B': frame .* does not match"):
        FlatField("B", np.ones((2, 2))).apply(np.ones((3, 3), np.uint16))
    with pytest.raises(FrameError, match="imager 'A': cannot read gain map"):
        read_flat_field("A", tmp_path / "missing.npy")


def test_zero_gain_is_a_defect_and_maps_load_from_the_geometry_extension(tmp_path):
    gain = np.ones((4, 4), np.float32)
    gain[1, 2] = 0.0
    np.save(tmp_path / "gainA.npy", gain)
    np.save(tmp_path / "darkA.npy", np.full((4, 4), 100.0, np.float32))
    doc = {"schema": "kv-geometry/1", "flat_field": {"A": {"gain": "gainA.npy", "offset": "darkA.npy"}}}
    ff = flat_fields_from_geometry_json(doc, tmp_path)["A"]
    assert ff.defects[1, 2] and ff.defects.sum() == 1
    assert_allclose(ff.apply(np.full((4, 4), 300, np.uint16))[0, 0], 200.0)
    with pytest.raises(FrameError, match="flat_field\\['A'\\]"):
        flat_fields_from_geometry_json({"flat_field": {"A": {"dark": "x"}}}, tmp_path)
    # The same from the geometry file itself: map paths relative to its folder, none named -> {}.
    import json

    from spineguide.calibration.errors import GeometryFileError

    (tmp_path / "room.json").write_text(json.dumps(doc))
    from_file = flat_fields_from_geometry_file(tmp_path / "room.json")["A"]
    assert_allclose(from_file.gain, ff.gain) and assert_allclose(from_file.offset_counts, ff.offset_counts)
    (tmp_path / "plain.json").write_text(json.dumps({"schema": "kv-geometry/1"}))
    assert flat_fields_from_geometry_file(tmp_path / "plain.json") == {}
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(GeometryFileError):
        flat_fields_from_geometry_file(tmp_path / "broken.json")


# ---------------------------------------------------------------------------- realistic chain, end to end
@pytest.mark.slow
@pytest.mark.parametrize("room", ["default", "floor"])
def test_low_dose_scatter_and_gain_seeds_are_found_in_both_rooms(room):
    sim = _sim(room)
    planned, names = _planned()
    frames, _ = sim.render(POSE, seed=3)
    result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=_flat(sim))
    assert all(s.found and not s.migrated for s in result.seeds)
    err = [np.linalg.norm(s.point_room_mm - t) for s, t in zip(result.seeds, frames.truth.seeds_room_mm)]
    assert max(err) <= SEED_TOL_MM, err
    assert result.ok
    for s in result.seeds:
        for v, d in s.pixels_px.items():
            assert np.hypot(*(d - frames.truth.seeds_px[v][names.index(s.name)])) <= 2.0


@pytest.mark.slow
def test_clean_frame_detector_alone_misses_what_the_faint_search_finds():
    sim = _sim("floor")
    planned, names = _planned()
    frames, _ = sim.render(POSE, seed=4)
    flat = _flat(sim)
    found = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=flat)
    assert all(s.found for s in found.seeds) and FiducialFlag.FAINT_SEARCH in found.flags
    off = FiducialConfig(faint=FaintSearchConfig(enabled=False))
    try:
        plain = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, config=off, flat_fields=flat)
    except (FiducialNotFoundError, ImagerLabelError):
        return  # nothing usable without the faint search
    assert sum(s.found for s in plain.seeds) < len(names)


@pytest.mark.slow
def test_seedless_clinic_frames_give_no_seed():
    sim = _sim("default", with_seeds=False)
    planned, names = _planned()
    frames, _ = sim.render(POSE, seed=5)
    with pytest.raises(FiducialNotFoundError):
        localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=_flat(sim))


@pytest.mark.slow
def test_migrated_seed_in_clinic_frames_is_never_used_silently():
    sim = _sim("floor")
    planned, names = _planned()
    moved = POSE.apply(planned).copy()
    moved[0] += np.array([2.5, 0.0, -1.0])  # 2.7 mm from its planned place
    frames, _ = sim.render(POSE, seed=6, seeds_room_mm=moved)
    try:
        result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=_flat(sim))
    except SeedMigrationError as err:
        assert names[0] in str(err)
        return
    # Three seeds cannot say which one moved unless the check names it; a result must not use it.
    seed = result.seeds[0]
    assert seed.migrated or not seed.found


# ---------------------------------------------------------------------------- CLI
def test_register_takes_gain_and_offset_maps(simulated_case, tmp_path, capsys):
    import json

    from spineguide.tracking.cli.main import main

    folder, truth = simulated_case
    iso = ",".join(repr(float(v)) for v in truth["isocentre_lps_mm"])
    base = ["register", "--method", "fiducial", "--ct", str(folder / "ct.mha"), "--isocenter", iso,
            "--geometry", str(folder / "geometry.json"), "--image", f"A={folder / 'frames' / 'pose_000_A.mha'}",
            "--image", f"B={folder / 'frames' / 'pose_000_B.mha'}", "--fiducials", str(folder / "fiducials.json"),
            "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    # A unit gain and a zero dark map change nothing: the same correction to the last digit.
    np.save(tmp_path / "gain.npy", np.ones((512, 512), np.float32))
    np.save(tmp_path / "dark.npy", np.zeros((512, 512), np.float32))
    assert main(base + ["--gain", f"A={tmp_path / 'gain.npy'}", "--offset", f"B={tmp_path / 'dark.npy'}"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["correction"] == plain["correction"]
    assert main(base + ["--gain", "A"]) == 2
    assert "--gain must be NAME=FILE" in capsys.readouterr().err
    np.save(tmp_path / "small.npy", np.ones((4, 4), np.float32))
    assert main(base + ["--gain", f"A={tmp_path / 'small.npy'}"]) == 2
    assert "imager 'A'" in capsys.readouterr().err


@pytest.mark.slow
def test_fiducial_processor_applies_the_flat_fields():
    from spineguide.tracking.frames import KvFrame
    from spineguide.tracking.service.gating import HoldReason
    from spineguide.tracking.service.processing import FiducialProcessor

    sim = _sim("floor")
    planned, names = _planned()
    frames, _ = sim.render(POSE, seed=7)
    pair = {n: KvFrame(n, np.asarray(frames.frames[n])) for n in sim.geometry.names}
    proc = FiducialProcessor(sim.geometry, planned, list(names), use_prior=False, flat_fields=_flat(sim))
    result = proc.process(pair, None)
    assert result.reason is HoldReason.OK
    assert_allclose(result.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)


@pytest.mark.slow
def test_seed_hidden_in_one_clinic_view_is_reported_missing_and_no_other_is_invented():
    sim = _sim("floor")
    planned, names = _planned()
    seeds = small_thoracolumbar().seeds
    both, _ = sim.render(POSE, seed=8)
    # The same noise draws without the third seed: its shadow is absent from view B only.
    without, _ = sim.render(POSE, seed=8, seeds=seeds[:2])
    pair = {"A": np.asarray(both.frames["A"]), "B": np.asarray(without.frames["B"])}
    result = localise_fiducials(pair, sim.geometry, planned, names, flat_fields=_flat(sim))
    found = {s.name: s for s in result.seeds}
    assert not found[names[2]].found
    assert found[names[0]].found and found[names[1]].found
    assert FiducialFlag.SEED_MISSING in result.flags
    for k in (0, 1):
        err = np.linalg.norm(found[names[k]].point_room_mm - both.truth.seeds_room_mm[k])
        assert err <= SEED_TOL_MM


def test_correct_inpaints_dead_lines_from_their_neighbours_and_the_extension_names_defects(tmp_path):
    """``FlatField.correct``: dark/gain undone, a dead row and column filled to within 1% on a smooth signal
    (measured 0.93% worst with Navier-Stokes inpainting, 6.4% with Telea's)."""
    rows, cols = 60, 80
    r, c = np.mgrid[0:rows, 0:cols]
    signal = 1000.0 + 300.0 * np.sin(r / 9.0) + 200.0 * np.cos(c / 13.0)
    gain = np.random.default_rng(3).uniform(0.9, 1.1, (rows, cols)).astype(np.float32)
    offset = np.full((rows, cols), 150.0, np.float32)
    dead = np.zeros((rows, cols), bool)
    dead[23, :] = True
    dead[:, 41] = True
    raw = (signal * gain + offset).astype(np.float32)
    raw[dead] = 0.0
    for k, arr in (("gain", gain), ("offset", offset), ("defects", dead.astype(np.uint8))):
        np.save(tmp_path / f"{k}A.npy", arr)
    doc = {"flat_field": {"A": {"gain": "gainA.npy", "offset": "offsetA.npy", "defects": "defectsA.npy"}}}
    ff = flat_fields_from_geometry_json(doc, tmp_path)["A"]
    assert np.array_equal(ff.defects, dead)
    applied, corrected = ff.apply(raw), ff.correct(raw)
    assert applied[dead].max() == 0.0  # apply() leaves the lines to the caller
    assert_allclose(corrected[~dead], signal[~dead], rtol=FLAT_RTOL)
    assert_allclose(corrected[dead], signal[dead], rtol=0.01)
    with pytest.raises(FrameError, match="flat_field\\['A'\\] must hold 'gain' and/or 'offset'"):
        flat_fields_from_geometry_json({"flat_field": {"A": {"defects": "defectsA.npy"}}}, tmp_path)
    with pytest.raises(FrameError, match="defect map needs a gain or an offset"):
        read_flat_field("A", None, None, tmp_path / "defectsA.npy")
    with pytest.raises(FrameError, match="flat_field\\['A'\\]"):
        flat_fields_from_geometry_json({"flat_field": {"A": {"gain": 5}}}, tmp_path)
    with pytest.raises(FrameError, match="every pixel is marked defective"):
        FlatField("A", gain, offset, np.ones((rows, cols), bool)).correct(raw)


# ---------------------------------------------------------------------------- the joint search, five seeds
def _five_seeds():
    """Five gold cylinders (0.8-1.2 mm x 4 mm) around the small phantom's isocentre, planning-CT LPS."""
    from spineguide.tracking.room.phantoms import Seed

    iso = np.asarray(small_thoracolumbar().isocentre_lps_mm)
    offsets = [(-18, -8, -22), (14, -10, -6), (-6, 12, 10), (16, 6, 24), (2, -14, 30)]
    axes = [(1, 0.2, 0.3), (0.1, 1, 0.4), (0.3, 0.2, 1), (1, 1, 0), (0, 1, 1)]
    diameters = [0.9, 1.0, 1.1, 0.8, 1.2]
    return tuple(Seed(f"G{k + 1}", iso + np.array(o, float), np.array(a, float) / np.linalg.norm(a), 4.0, d)
                 for k, (o, a, d) in enumerate(zip(offsets, axes, diameters)))


@functools.lru_cache(maxsize=4)
def _sim_at(room: str, i0: float) -> RealisticSimulator:
    return RealisticSimulator(small_thoracolumbar(), room_geometry(room, PANEL),
                              ChainConfig.clinic(i0=i0, scatter_to_primary=1.5))


#: Seeds found per case, measured when these cases were written (joint search, commit of issue 19):
#: i0 6000: 4-5 of 5 (default), 3 of 5 (floor: G4 and G5 overlap in one view); i0 2000: refused (default:
#: fewer than two seeds stand out on their own), 3 of 5 (floor). A regression that loses a seed fails here.
FIVE_SEED_MIN_FOUND = {("default", 6000.0): 4, ("floor", 6000.0): 3, ("default", 2000.0): 0, ("floor", 2000.0): 3}


@pytest.mark.slow
@pytest.mark.parametrize("room,i0", sorted(FIVE_SEED_MIN_FOUND))
def test_five_seeds_in_clinic_frames_are_found_to_half_a_millimetre_or_refused(room, i0):
    sim = _sim_at(room, i0)
    seeds = _five_seeds()
    planned = sim.planned_room_mm(seeds)
    names = tuple(s.name for s in seeds)
    frames, _ = sim.render(POSE, seed=11, seeds=seeds)
    need = FIVE_SEED_MIN_FOUND[(room, i0)]
    try:
        result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=_flat(sim))
    except FiducialNotFoundError:
        assert need == 0, f"{room} i0 {i0:g}: refused, {need} seeds expected"
        return
    found = [k for k, s in enumerate(result.seeds) if s.found]
    assert len(found) >= max(need, 2)
    for k in found:
        s = result.seeds[k]
        assert not s.migrated
        assert np.linalg.norm(s.point_room_mm - frames.truth.seeds_room_mm[k]) <= SEED_TOL_MM
        for v, d in s.pixels_px.items():  # no false seed: every detection on its own seed
            assert np.hypot(*(d - frames.truth.seeds_px[v][k])) <= 2.0
    assert_allclose(result.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)


@pytest.mark.slow
@pytest.mark.parametrize("room", ["default", "floor"])
def test_a_seed_moved_2_mm_among_five_is_named_and_left_out(room):
    sim = _sim_at(room, 6000.0)
    seeds = _five_seeds()
    planned = sim.planned_room_mm(seeds)
    names = tuple(s.name for s in seeds)
    moved = POSE.apply(planned).copy()
    moved[2] += [1.2, -1.0, 1.3]  # 2.04 mm
    frames, _ = sim.render(POSE, seed=12, seeds=seeds, seeds_room_mm=moved)
    result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=_flat(sim))
    assert result.seeds[2].found and result.seeds[2].migrated
    assert FiducialFlag.SEED_EXCLUDED in result.flags
    assert not any(s.migrated for k, s in enumerate(result.seeds) if k != 2)
    # The pose from the others is right: the moved seed did not pull it.
    assert_allclose(result.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)


#: The null test's plan offsets (room mm): beyond the 12 mm translation range plus the seeds' spread, so no
#: planned seed can be matched to its own shadow (benchmarks/bench_fiducials_null.py, the same shifts).
NULL_SHIFTS_MM = [40.0 * np.array(v, float) for v in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1),
                                                      (0, 0, -1))]


@pytest.mark.slow
@pytest.mark.parametrize("room,i0", [("default", 40000.0), ("floor", 40000.0), ("default", 6000.0)])
def test_a_two_seed_plan_where_its_seeds_are_not_is_never_answered(room, i0):
    # Two seeds agree on one distance only: weak evidence, so a two-seed answer needs both seeds to stand out
    # (two_seed_min_snr). Plans moved 40 mm from five real seeds, over bone clutter whose response grows with
    # the dose (i0 40,000 the strongest): whatever the search pairs there is false, and must be refused.
    sim = _sim_at(room, i0)
    seeds = _five_seeds()
    planned = sim.planned_room_mm(seeds)
    frames, _ = sim.render(POSE, seed=13, seeds=seeds)
    for pair in ((0, 1), (2, 4)):
        for shift in NULL_SHIFTS_MM:
            plan = POSE.apply(planned[list(pair)]) + shift  # its own pose: the seeds 40 mm from where it says
            with pytest.raises(FiducialNotFoundError):
                localise_fiducials(dict(frames.frames), sim.geometry, plan, ("P", "Q"), flat_fields=_flat(sim))


# ---------------------------------------------------------------------------- tracking: verified at the prior first
#: Motion since the prior in the tracking cases: 0.8 mm and 0.4 deg, within what a 10 Hz monitor sees between frames.
TRACK_MOTION = Pose.from_six([0.5, -0.4, 0.5], [0.3, -0.2, 0.2])


def _tracking_case(room: str, seed: int, moved=None):
    sim = _sim_at(room, 6000.0)
    seeds = _five_seeds()
    planned = sim.planned_room_mm(seeds)
    names = tuple(s.name for s in seeds)
    frames, _ = sim.render(POSE, seed=seed, seeds=seeds, seeds_room_mm=moved)
    return sim, planned, names, frames


@pytest.mark.slow
def test_tracking_verifies_the_seeds_where_the_prior_puts_them_without_the_joint_search(monkeypatch):
    import spineguide.tracking.localisation.joint_search as js

    # Default room: the clean-frame detector's windows miss a seed here, so the faint path runs (floor: they see
    # every seed that is not overlapping).
    sim, planned, names, frames = _tracking_case("default", 11)
    prior = TRACK_MOTION.compose(POSE)
    whole = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, flat_fields=_flat(sim))

    def forbidden(*args, **kwargs):
        raise AssertionError("the constellation search ran although the seeds are verified at the prior")

    monkeypatch.setattr(js, "search_constellation", forbidden)
    result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, prior_pose=prior,
                                flat_fields=_flat(sim))
    assert FiducialFlag.FAINT_SEARCH in result.flags  # the clean-frame detector alone did not see every seed
    assert [s.found for s in result.seeds] == [s.found for s in whole.seeds]
    for k, s in enumerate(result.seeds):
        if not s.found:
            continue
        assert not s.migrated
        assert np.linalg.norm(s.point_room_mm - frames.truth.seeds_room_mm[k]) <= SEED_TOL_MM
        for v, d in s.pixels_px.items():
            assert np.hypot(*(d - frames.truth.seeds_px[v][k])) <= 2.0
    assert_allclose(result.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)


@pytest.mark.slow
def test_tracking_from_a_prior_the_seeds_have_left_falls_back_to_the_joint_search(monkeypatch):
    import spineguide.tracking.localisation.joint_search as js

    sim, planned, names, frames = _tracking_case("default", 11)
    calls = []
    real = js.search_constellation

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(js, "search_constellation", spy)
    # 2.5 mm away: beyond the seed fit's reach from the prior's projections, within the tracking range.
    prior = Pose.from_six([2.0, 0.0, -1.5], [0.0, 0.0, 0.0]).compose(POSE)
    result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, prior_pose=prior,
                                flat_fields=_flat(sim))
    assert calls, "the joint search did not run"
    assert result.ok
    assert_allclose(result.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)


@pytest.mark.slow
@pytest.mark.parametrize("room", ["default", "floor"])
def test_tracking_never_uses_a_seed_moved_2_mm_silently(room):
    sim = _sim_at(room, 6000.0)
    planned = sim.planned_room_mm(_five_seeds())
    moved = POSE.apply(planned).copy()
    moved[2] += [1.2, -1.0, 1.3]  # 2.04 mm
    sim, planned, names, frames = _tracking_case(room, 12, moved)
    prior = TRACK_MOTION.compose(POSE)
    try:
        result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, prior_pose=prior,
                                    flat_fields=_flat(sim))
    except SeedMigrationError as err:
        assert "G3" in str(err)
        return
    assert not result.seeds[2].found or result.seeds[2].migrated
    assert not any(s.migrated for k, s in enumerate(result.seeds) if k != 2)
    assert_allclose(result.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)


@pytest.mark.slow
def test_the_live_processor_tracks_faint_seeds_from_the_last_pose_and_holds_without_one(monkeypatch):
    import spineguide.tracking.localisation.joint_search as js
    from spineguide.tracking.frames import KvFrame
    from spineguide.tracking.service.gating import HoldReason
    from spineguide.tracking.service.processing import FiducialProcessor

    sim, planned, names, frames = _tracking_case("default", 11)
    pair = {n: KvFrame(n, np.asarray(frames.frames[n])) for n in sim.geometry.names}

    def forbidden(*args, **kwargs):
        raise AssertionError("the live service ran the joint constellation search")

    monkeypatch.setattr(js, "search_constellation", forbidden)
    live = FaintSearchConfig(joint_search=False)  # the live service's setting (processing._build_fiducial)
    proc = FiducialProcessor(sim.geometry, planned, list(names), config=FiducialConfig(faint=live),
                             flat_fields=_flat(sim))
    tracked = proc.process(pair, TRACK_MOTION.compose(POSE))
    assert tracked.reason is HoldReason.OK
    assert_allclose(tracked.pose.translation_mm, POSE.translation_mm, rtol=0, atol=SEED_TOL_MM)
    # No trusted pose yet: the clean-frame detector alone, which does not see every seed here: HOLD.
    first = proc.process(pair, None)
    assert first.reason is HoldReason.FIDUCIAL_MISSING
    # A prior the seeds have left (2.5 mm): not verified there, and no joint search: HOLD, never a guess.
    far = proc.process(pair, Pose.from_six([2.0, 0.0, -1.5], [0.0, 0.0, 0.0]).compose(POSE))
    assert far.reason is HoldReason.FIDUCIAL_MISSING


def test_faint_search_switches_must_be_bools():
    from spineguide.tracking.errors import FiducialConfigError

    for bad in (1, "no", None):
        with pytest.raises(FiducialConfigError, match="joint_search must be a bool"):
            FaintSearchConfig(joint_search=bad)


def test_two_seed_view_ratio_is_a_ratio_of_at_least_one():
    from spineguide.tracking.errors import FiducialConfigError

    for bad in (0.5, 0.0, -2.0, float("nan"), "4"):
        with pytest.raises(FiducialConfigError, match="two_seed_max_view_ratio"):
            FaintSearchConfig(two_seed_max_view_ratio=bad)


def test_an_answer_stands_on_seeds_that_stand_out_on_their_own():
    from spineguide.tracking.localisation.joint_search import _stand_out

    fc = FaintSearchConfig()  # anchor 6, two seeds 8, view ratio 4
    _stand_out([(9.0, 12.0), (8.0, 30.0)], fc)  # two seeds, both >= 8 in both views, ratios 1.3 and 3.75
    _stand_out([(6.0, 7.0), (6.5, 9.0), (5.0, 5.5)], fc)  # three seeds: two anchors >= 6 suffice
    with pytest.raises(FiducialNotFoundError, match="fewer than two stand out"):
        _stand_out([(7.9, 20.0), (15.0, 16.0)], fc)  # the weaker seed's weaker view below 8
    with pytest.raises(FiducialNotFoundError, match="fewer than two stand out"):
        _stand_out([(5.9, 20.0), (15.0, 16.0), (5.0, 40.0)], fc)  # one anchor only
    with pytest.raises(FiducialNotFoundError, match="fewer than two stand out"):
        _stand_out([(50.0, 60.0)], fc)  # a lone seed is never an answer
    with pytest.raises(FiducialNotFoundError, match="times stronger in one view"):
        _stand_out([(53.8, 10.3), (77.0, 10.9)], fc)  # real seeds in one view, clutter in the other (null test)
    _stand_out([(53.8, 10.3), (77.0, 10.9), (40.0, 45.0)], fc)  # with three seeds the geometry decides


#: Tracking windows in clinic frames at i0 40,000, floor room, five seeds (three seen: two overlap, the clean-frame
#: detector finds the rest at matched-filter SNR 10-20): the box fit puts every seed within 0.11-0.23 px of its
#: true projection (measured, three noise seeds), where the windows' weighted centroids were 0.43-0.48 px off.
REFIT_MAX_PX = 0.35


@pytest.mark.slow
def test_tracking_recentres_faint_detections_by_the_box_fit():
    sim = _sim_at("floor", 40000.0)
    seeds = _five_seeds()
    planned = sim.planned_room_mm(seeds)
    names = tuple(s.name for s in seeds)
    prior = TRACK_MOTION.compose(POSE)
    for noise in (11, 12, 13):
        frames, _ = sim.render(POSE, seed=noise, seeds=seeds)
        errors = {}
        for label, config in (("centroid", FiducialConfig(refit_below_snr=1e-9)), ("refit", FiducialConfig())):
            result = localise_fiducials(dict(frames.frames), sim.geometry, planned, names, prior_pose=prior,
                                        flat_fields=_flat(sim), config=config)
            assert FiducialFlag.FAINT_SEARCH not in result.flags  # the clean-frame windows found them
            errors[label] = np.array([np.hypot(*(px - frames.truth.seeds_px[v][k]))
                                      for k, s in enumerate(result.seeds) if s.found for v, px in s.pixels_px.items()])
        assert len(errors["refit"]) >= 6
        assert errors["refit"].max() <= REFIT_MAX_PX
        assert np.sqrt(np.mean(errors["refit"] ** 2)) < np.sqrt(np.mean(errors["centroid"] ** 2))


def test_refit_settings_are_checked():
    from spineguide.tracking.errors import FiducialConfigError

    for name in ("refit_below_snr", "refit_max_shift_px"):
        for bad in (0.0, -1.0, float("nan"), "5"):
            with pytest.raises(FiducialConfigError, match=name):
                FiducialConfig(**{name: bad})


def test_two_seeds_on_one_fit_in_a_view_are_left_out_and_named():
    # Default room, i0 6,000, benchmark pair 44: seeds F2 and F4 (9 px apart in view A) were both verified on the
    # same fit there, between them; the registration then turned 2.3 mm wrong over the target vertebra (FRE 0.08).
    from spineguide.tracking.localisation.detection import Detection
    from spineguide.tracking.localisation.joint_search import _sharing_a_fit

    def det(col, row):
        return Detection("A", (col, row), 0.4, 9.0, 20.0, 4.0, 30.0, 60, 0.4)

    fits = [[det(100.0, 100.0), det(505.2, 530.7), det(300.0, 200.0), det(505.9, 530.1)],
            [det(110.0, 90.0), det(481.8, 532.3), None, det(563.1, 529.4)]]
    assert _sharing_a_fit(fits, range(4)) == {1, 3}
    fits[0][3] = det(512.1, 529.5)  # seen apart: 7 px from the other
    assert _sharing_a_fit(fits, range(4)) == set()
