"""Real-CT cases through the clinic-like imaging chain: water/bone decomposition, couch top, lag, settings.

Small synthetic labelled CTs and small panels only (no download). Analytic
expectations: the decomposition's hand values, the couch slab's path length
(its thickness on a perpendicular ray, thickness / cos(angle) on an oblique
one, zero on a ray that misses it), Beer-Lambert on the material paths of a
mono-energetic chain, and the lag of the set-up frame in the tracking frame.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry, default_stereo_geometry
from spineguide.registration.attenuation import DEFAULT_CT_ENERGY_KEV, bone_hu
from spineguide.registration.drr import AttenuationVolume, compute_drr
from spineguide.registration.pose import Pose
from spineguide.registration.volume import CTVolume
from spineguide.tracking.errors import SimulationError
from spineguide.tracking.room.chain import ChainConfig, DetectorMaps, Spectrum, material_mu_per_mm, water_bone_fractions
from spineguide.tracking.room.kv import OutputDtype
from spineguide.tracking.room.realct import (
    CaseRenderer,
    CouchTop,
    LabelledCT,
    build_set,
    pixel_centres_room_mm,
    plan_cases,
    plastimatch_available,
    slab_path_mm,
    write_case,
)

#: float64 geometry of a few segments: rounding only.
PATH_ATOL_MM = 1e-9
#: Noise-free chain vs Beer-Lambert on DRRs of fractions typed here in float64 (the module's are float32):
#: float32 DRRs of float32-rounded fractions, paths to ~1e-7 relative, times mu L <= 3 (measured 8e-8).
PRIMARY_RTOL = 1e-6
#: A float32 raw frame of the noise-free signal.
FLOAT32_RTOL = 1e-6
#: Own vs plastimatch water paths (tests/tracking/test_room_realct.py measures the same on attenuation):
#: most pixels to float32 rounding (median relative difference < 1e-4); plastimatch 1.9.4's exact
#: tracer loses part of a voxel on some rays, never adds any (excess < 1e-5 of the largest path);
#: losses above 1 % of the largest path on fewer than 20 % of the pixels with tissue.
PM_MEDIAN_REL_TOL = 1e-4
PM_EXCESS_REL_TOL = 1e-5
PM_LOSS_REL = 0.01
PM_LOSS_FRACTION = 0.20
#: The CT's skin height is found on a quarter-voxel grid along the vertical.
SKIN_TOL_MM = 0.5


def _need_plastimatch() -> None:
    if not plastimatch_available():
        if os.environ.get("CI"):
            pytest.fail("plastimatch (apt-get install plastimatch) is required in CI")
        pytest.skip("plastimatch not installed (apt-get install plastimatch)")


def _body() -> LabelledCT:
    """Soft-tissue elliptic body (semi-axes 36 x 30 mm) with a bony column, 2 mm voxels, HFS; L1/L2 in the column.

    Voxel centres y = -35..35 mm (LPS), so the body's posterior skin is the face at y = +30 mm.
    """
    kk, jj, ii = np.meshgrid(np.arange(30), np.arange(36), np.arange(40), indexing="ij")
    x, y, z = (ii - 19.5) * 2.0, (jj - 17.5) * 2.0, (kk - 14.5) * 2.0
    hu = np.where((x / 36) ** 2 + (y / 30) ** 2 < 1.0, 40.0, -1000.0)
    column = x**2 + (y - 8) ** 2 < 100.0
    hu = np.where(column, 700.0 + 10.0 * z, hu).astype(np.float32)
    labels = np.where(column, np.where(z < 0, 21, 20), 0).astype(np.int16)
    ct = CTVolume(hu, (2.0, 2.0, 2.0), (-39.0, -35.0, -29.0), np.eye(3), "HFS", "body")
    return LabelledCT(ct, labels, "body labels")


def _ideal_chain(**kw) -> ChainConfig:
    """Mono-energetic, no scatter, heel, maps, lag, blur or noise; float32 output."""
    values = dict(i0=10000.0, spectrum=Spectrum.mono(60.0), blur_sigma_px=0.0, quantum_noise=False,
                  dtype=OutputDtype.FLOAT32)
    values.update(kw)
    return ChainConfig(**values)


def _vertical_imager(n: int = 65, pitch_mm: float = 1.0, sad_mm: float = 1000.0, sid_mm: float = 1500.0) -> ImagerGeometry:
    """Floor source straight below the isocentre, ceiling panel; the central pixel (n odd) is on room X = Y = 0."""
    source = np.array([0.0, 0.0, -sad_mm])
    origin = np.array([-(n - 1) / 2 * pitch_mm, -(n - 1) / 2 * pitch_mm, sid_mm - sad_mm])
    return ImagerGeometry("V", source, origin, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]),
                          (pitch_mm, pitch_mm), n, n)


# ------------------------------------------------------------------ decomposition
def test_water_bone_fractions_hand_values():
    hb = bone_hu(DEFAULT_CT_ENERGY_KEV)
    hu = np.array([-1000.0, -1200.0, -500.0, 0.0, 500.0, hb, 2 * hb])
    water, bone = water_bone_fractions(hu)
    assert water.dtype == np.float32 and bone.dtype == np.float32 and water.shape == hu.shape
    assert_allclose(water, [0.0, 0.0, 0.5, 1.0, 1.0 - 500.0 / hb, 0.0, 0.0], rtol=0, atol=1e-7)
    assert_allclose(bone, [0.0, 0.0, 0.0, 0.0, 500.0 / hb, 1.0, 2.0], rtol=1e-6, atol=0)
    with pytest.raises(SimulationError, match="must be finite"):
        water_bone_fractions(np.array([0.0, np.nan]))


# ------------------------------------------------------------------ couch
def test_slab_path_is_the_thickness_on_a_perpendicular_ray_and_thickness_over_cos_on_an_oblique_one():
    src = np.array([0.0, 0.0, -200.0])
    z_low, z_high, half = -80.0, -27.0, 250.0
    up = src + np.array([0.0, 0.0, 2000.0])
    assert_allclose(slab_path_mm(src, up, z_low, z_high, half), 53.0, rtol=0, atol=PATH_ATOL_MM)
    for angle_deg, azimuth_deg in ((20.0, 0.0), (35.0, 30.0), (45.0, 90.0)):
        a, b = np.radians(angle_deg), np.radians(azimuth_deg)
        direction = np.array([np.sin(a) * np.cos(b), np.sin(a) * np.sin(b), np.cos(a)])
        end = src + 2500.0 * direction
        assert_allclose(slab_path_mm(src, end, z_low, z_high, half), 53.0 / np.cos(a), rtol=0, atol=PATH_ATOL_MM)
    # Misses: crosses the slab's height beyond its width, stops below it, parallel beside it.
    wide = src + 2000.0 * np.array([0.9, 0.0, 0.3])  # X = 360..519 mm at the slab's height
    assert slab_path_mm(src, wide, z_low, z_high, half) == 0.0
    assert slab_path_mm(src, np.array([0.0, 0.0, -100.0]), z_low, z_high, half) == 0.0
    assert slab_path_mm(np.array([0.0, -500.0, 0.0]), np.array([0.0, 500.0, 0.0]), z_low, z_high, half) == 0.0
    # Ends inside the slab; parallel inside it (along the couch, unbounded in Y); leaves through its side.
    assert_allclose(slab_path_mm(src, np.array([0.0, 0.0, -50.0]), z_low, z_high, half), 30.0, atol=PATH_ATOL_MM)
    along = slab_path_mm(np.array([10.0, -300.0, -50.0]), np.array([10.0, 400.0, -50.0]), z_low, z_high, half)
    assert_allclose(along, 700.0, atol=PATH_ATOL_MM)
    side = slab_path_mm(np.array([200.0, 0.0, -50.0]), np.array([400.0, 0.0, -50.0]), z_low, z_high, half)
    assert_allclose(side, 50.0, atol=PATH_ATOL_MM)
    # Vectorised over a (2, 2, 3) block of ends.
    ends = np.stack([np.stack([up, wide]), np.stack([up, up])])
    assert_allclose(slab_path_mm(src, ends, z_low, z_high, half), [[53.0, 0.0], [53.0, 53.0]], atol=PATH_ATOL_MM)
    with pytest.raises(SimulationError, match="bad slab"):
        slab_path_mm(src, up, 0.0, -1.0, half)


def test_couch_water_equivalent_path_on_a_vertical_panel():
    couch = CouchTop()  # 1.5 mm skins of 1.4 g/cm3 around 50 mm foam of 0.05 g/cm3, 500 mm wide
    assert couch.thickness_mm == 53.0 and couch.water_equivalent_mm == pytest.approx(6.7, abs=1e-12)
    im = _vertical_imager()
    centres = pixel_centres_room_mm(im)
    assert_allclose(centres[32, 32], [0.0, 0.0, 500.0], atol=1e-9)
    assert_allclose(centres[5, 60], im.pixel_to_room(np.array([60.0, 5.0])), atol=1e-9)
    path = couch.water_equivalent_path_mm(im, top_z_mm=-100.0)
    assert_allclose(path[32, 32], 6.7, rtol=0, atol=1e-9)
    ray = centres - im.source_mm
    cos = ray[..., 2] / np.linalg.norm(ray, axis=-1)
    assert_allclose(path, 6.7 / cos, rtol=1e-12)  # the whole panel sees the couch through its width
    narrow = CouchTop(width_mm=20.0).water_equivalent_path_mm(im, top_z_mm=-100.0)
    # At the couch's height (900 mm from the source) a pixel at panel X maps to X * 900 / 1500.
    hit = np.abs(centres[..., 0] * 900.0 / 1500.0) < 10.0 - 0.1
    miss = np.abs(centres[..., 0] * 847.0 / 1500.0) > 10.0 + 0.1
    assert np.all(narrow[hit] > 6.0) and np.all(narrow[miss] == 0.0)
    with pytest.raises(SimulationError, match="couch top: foam_mm"):
        CouchTop(foam_mm=-1.0)
    with pytest.raises(SimulationError, match="couch top: width"):
        CouchTop(width_mm=0.0)


def test_couch_sits_under_the_posterior_skin_fixed_in_the_room():
    lct = _body()
    room = {"v": StereoGeometry((_vertical_imager(), _vertical_imager().with_name("W")), 0.0, "vertical")}
    renderer = CaseRenderer(lct, room, chain=_ideal_chain())
    assert renderer.couch is not None  # on by default with a chain
    iso = renderer.isocentre_lps_mm("L1")
    # HFS: room Z = -LPS y; the skin face at LPS y = +30 mm is 30 - y_iso below the isocentre.
    assert_allclose(renderer.posterior_skin_z_mm("L1"), -(30.0 - iso[1]), atol=SKIN_TOL_MM)
    assert renderer.couch_top_z_mm("L1") == pytest.approx(renderer.posterior_skin_z_mm("L1") - 3.0)
    fixed = CaseRenderer(lct, room, chain=_ideal_chain(), couch=CouchTop(top_z_mm=-40.0))
    assert fixed.couch_top_z_mm("L1") == -40.0
    assert CaseRenderer(lct, room).couch is None  # off by default without a chain
    assert CaseRenderer(lct, room, chain=_ideal_chain(), couch=False).couch_top_z_mm("L1") is None
    # The couch does not move with the patient.
    a = renderer.material_paths("L1", "v", Pose.identity(), "own")["V"]
    b = renderer.material_paths("L1", "v", Pose.from_six([0.0, 0.0, 5.0], [0.0, 0.0, 0.0]), "own")["V"]
    couch = renderer.couch_water_mm("L1", "v")["V"]
    assert_allclose(a.water_mm - renderer.anatomy_paths("L1", "v", Pose.identity(), "own")["V"].water_mm, couch)
    assert_allclose(b.water_mm - renderer.anatomy_paths("L1", "v", Pose.from_six([0.0, 0.0, 5.0], [0.0, 0.0, 0.0]),
                                                        "own")["V"].water_mm, couch)


# ------------------------------------------------------------------ frames
def test_noise_free_mono_chain_is_beer_lambert_on_the_water_and_bone_paths():
    lct = _body()
    geometry = default_stereo_geometry(panel_pixels=96, pixel_spacing_mm=1.2)
    pose = Pose.from_six([2.0, -3.0, 1.5], [2.0, -1.0, 3.0])
    chain = _ideal_chain()
    bare = CaseRenderer(lct, {"room": geometry}, chain=chain, couch=False)
    with_couch = CaseRenderer(lct, {"room": geometry}, chain=chain)
    frames = bare.chain_frames("L1", "room", pose, "own", seed=0)
    framed_couch = with_couch.chain_frames("L1", "room", pose, "own", seed=0)
    # Independent material paths: the bilinear model typed here, projected by compute_drr.
    hu = lct.ct.hu.astype(np.float64)
    hb = bone_hu(DEFAULT_CT_ENERGY_KEV)
    bone = np.clip(hu / hb, 0.0, None)
    water = np.where(hu <= 0, np.clip(1.0 + hu / 1000.0, 0.0, None), np.clip(1.0 - bone, 0.0, None))
    room_from_index = lct.ct.room_from_index(lct.centroid_lps_mm("L1"))
    mu_w, mu_b = material_mu_per_mm("water", 60.0)[0], material_mu_per_mm("cortical_bone", 60.0)[0]
    for name, im in zip(geometry.names, geometry.imagers):
        w = compute_drr(AttenuationVolume(water.astype(np.float32), room_from_index), im, pose).astype(np.float64)
        b = compute_drr(AttenuationVolume(bone.astype(np.float32), room_from_index), im, pose).astype(np.float64)
        assert w.max() > 50.0 and b.max() > 5.0  # the body and the column are on the panel
        expected = 10000.0 * np.exp(-(mu_w * w + mu_b * b))
        assert_allclose(frames[name].primary, expected, rtol=PRIMARY_RTOL)
        assert_allclose(frames[name].raw, expected, rtol=FLOAT32_RTOL)
        assert np.all(frames[name].scatter == 0.0)
        couch = with_couch.couch_water_mm("L1", "room")[name]
        assert couch.min() > 6.7  # oblique 45-degree beams through the whole couch: 6.7 mm / cos > 6.7 mm
        assert_allclose(framed_couch[name].primary, expected * np.exp(-mu_w * couch), rtol=PRIMARY_RTOL)


def test_own_and_plastimatch_water_and_bone_paths_agree():
    _need_plastimatch()
    lct = _body()
    geometry = default_stereo_geometry(panel_pixels=96, pixel_spacing_mm=1.2)
    pose = Pose.from_six([2.0, -3.0, 1.5], [2.0, -1.0, 3.0])
    renderer = CaseRenderer(lct, {"room": geometry}, chain=_ideal_chain(), beyond_ends_mm=6.0)
    try:
        ours = renderer.material_paths("L1", "room", pose, "own")
        theirs = renderer.material_paths("L1", "room", pose, "plastimatch")
        files = dict(renderer._files)
        assert set(files) == {"water", "bone"} and all(p.exists() for p in files.values())
    finally:
        renderer.close()
    assert not any(p.exists() for p in files.values())  # close() removes the temporary volumes
    for name in ours:
        for what in ("water_mm", "bone_mm"):
            a, b = getattr(ours[name], what), getattr(theirs[name], what)
            assert a.max() > 5.0
            inside = a > 0.1 * a.max()
            assert np.median(np.abs(a - b)[inside] / a[inside]) < PM_MEDIAN_REL_TOL, f"{name} {what}"
            assert np.max(b - a) < PM_EXCESS_REL_TOL * a.max(), f"{name} {what}: plastimatch above ours"
            losses = (a - b) > PM_LOSS_REL * a.max()
            assert np.count_nonzero(losses) < PM_LOSS_FRACTION * np.count_nonzero(inside), f"{name} {what}"


def test_detector_maps_are_made_once_per_room_and_imager():
    lct = _body()
    geometry = default_stereo_geometry(panel_pixels=48)
    chain = ChainConfig.clinic()
    renderer = CaseRenderer(lct, {"r1": geometry, "r2": geometry}, chain=chain)
    a = renderer.detector_maps("r1", "A")
    assert renderer.detector_maps("r1", "A") is a
    expected = DetectorMaps.make(48, 48, chain, geometry.names.index("B"))
    assert np.array_equal(renderer.detector_maps("r2", "B").gain, expected.gain)
    assert not np.array_equal(a.gain, expected.gain)
    with pytest.raises(SimulationError, match="has no imager 'C'"):
        renderer.detector_maps("r1", "C")
    with pytest.raises(SimulationError, match="need a CaseRenderer made with chain"):
        CaseRenderer(lct, {"r1": geometry}).detector_maps("r1", "A")


def test_bad_chain_and_couch_arguments_are_refused():
    lct = _body()
    room = {"r": default_stereo_geometry(panel_pixels=32)}
    with pytest.raises(SimulationError, match="chain must be a ChainConfig"):
        CaseRenderer(lct, room, chain="clinic")
    with pytest.raises(SimulationError, match="either chain .* or chain_hook"):
        CaseRenderer(lct, room, chain=_ideal_chain(), chain_hook=lambda *a: None)
    with pytest.raises(SimulationError, match="couch must be a CouchTop"):
        CaseRenderer(lct, room, chain=_ideal_chain(), couch="on")
    with pytest.raises(SimulationError, match="chain_frames needs"):
        CaseRenderer(lct, room).chain_frames("L1", "r", Pose.identity(), "own", 0)


def test_tracking_frame_carries_the_lag_of_the_set_up_frame_and_the_truth_says_how_it_was_made(tmp_path):
    lct = _body()
    geometry = default_stereo_geometry(panel_pixels=64, pixel_spacing_mm=1.6)
    chain = _ideal_chain(lag_fraction=0.1, i0=5000.0)
    renderer = CaseRenderer(lct, {"room": geometry}, chain=chain)
    case = plan_cases(["L1"], ["room"], ["own"], 1, seed=4)[0]
    folder = write_case(tmp_path / "c0", case, renderer, "../ct.mha", "../labels.mha")
    setup = renderer.chain_frames("L1", "room", case.pose, "own", case.seed)
    alone = renderer.chain_frames("L1", "room", case.tracking_pose, "own", case.seed + 1)
    truth = json.loads((folder / "truth.json").read_text())
    for name in geometry.names:
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / truth["tracking_frames"][name])))
        assert_allclose(written, alone[name].signal + 0.1 * setup[name].signal, rtol=FLOAT32_RTOL)
        first = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / truth["frames"][name])))
        assert_allclose(first, setup[name].signal, rtol=FLOAT32_RTOL)  # nothing before the set-up pair
    assert truth["i0"] == 5000.0
    imaging = truth["imaging"]
    assert imaging["chain"] == "clinic-like" and imaging["settings"]["lag_fraction"] == 0.1
    assert imaging["settings"]["spectrum"]["label"] == "60 keV" and imaging["couch"]["water_equivalent_mm"] == pytest.approx(6.7)
    assert truth["couch_top_z_mm"] == pytest.approx(renderer.couch_top_z_mm("L1"))


def test_built_clinic_set_records_the_chain_in_its_manifest(tmp_path):
    lct = _body()
    chain = ChainConfig.clinic(i0=4000.0, scatter_to_primary=0.7)
    built = build_set(tmp_path / "set", lct, {"room": default_stereo_geometry(panel_pixels=48)}, ["L1"], ["own"], 1,
                      seed=2, chain=chain)
    assert built["i0"] == 4000.0 and built["imaging"]["chain"] == "clinic-like"
    settings = built["imaging"]["settings"]
    assert settings["scatter_to_primary"] == 0.7 and settings["spectrum"]["kvp"] == 120.0
    assert settings["spectrum"]["filtration_mm_al"] == 2.5 and built["imaging"]["couch"]["skin_mm"] == 1.5
    assert built["couch_top_z_mm"]["L1"] < 0.0
    frame = sitk.ReadImage(str(tmp_path / "set" / "cases" / "0000" / "frame_A.mha"))
    assert frame.GetMetaData("spineguide_i0") == repr(4000.0)
    simple = build_set(tmp_path / "simple", lct, {"room": default_stereo_geometry(panel_pixels=48)}, ["L1"], ["own"],
                       1, seed=2)
    assert simple["imaging"]["chain"] == "simple" and simple["imaging"]["couch"] is None
    assert simple["couch_top_z_mm"] == {"L1": None}


def test_cli_simulate_ct_takes_the_clinic_chain(tmp_path, capsys):
    from spineguide.calibration.io import write_geometry
    from spineguide.tracking.cli.main import main

    lct = _body()
    ct_img = lct.ct.to_sitk()
    sitk.WriteImage(ct_img, str(tmp_path / "ct.mha"))
    lab = sitk.GetImageFromArray(lct.labels)
    lab.CopyInformation(ct_img)
    sitk.WriteImage(lab, str(tmp_path / "labels.mha"))
    room = write_geometry(default_stereo_geometry(panel_pixels=48), tmp_path / "room.json")
    base = ["simulate-ct", "--ct", str(tmp_path / "ct.mha"), "--labels", str(tmp_path / "labels.mha"),
            "--levels", "L1", "--rooms", str(room), "--projectors", "own", "--cases", "1", "--quiet"]
    assert main(base + ["--chain", "clinic", "--spr", "0.5", "--i0", "3000", "--out", str(tmp_path / "set")]) == 0
    manifest = json.loads((tmp_path / "set" / "set.json").read_text())
    assert manifest["i0"] == 3000.0 and manifest["imaging"]["settings"]["scatter_to_primary"] == 0.5
    assert manifest["imaging"]["couch"] is not None
    assert main(base + ["--chain", "clinic", "--couch", "off", "--out", str(tmp_path / "nocouch")]) == 0
    manifest = json.loads((tmp_path / "nocouch" / "set.json").read_text())
    assert manifest["i0"] == 6000.0 and manifest["imaging"]["couch"] is None
    capsys.readouterr()
    assert main(base + ["--spr", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--spr needs --chain clinic" in capsys.readouterr().err


def test_case_geometry_names_the_panel_maps_that_undo_the_chain(tmp_path):
    """The clinic-like case carries its panels' dark, gain and dead-line maps (a clinic's panel calibration)
    in geometry.json's flat_field extension; corrected with them, the raw frame is the chain's signal again."""
    from spineguide.calibration.jsonfile import read_json_document
    from spineguide.calibration.errors import GeometryFileError
    from spineguide.tracking.localisation.flatfield import flat_fields_from_geometry_json

    lct = _body()
    geometry = default_stereo_geometry(panel_pixels=64, pixel_spacing_mm=1.6)
    chain = _ideal_chain(i0=5000.0, gain_rms=0.05, offset_counts=200.0, offset_rms_counts=8.0, dead_rows=1)
    renderer = CaseRenderer(lct, {"room": geometry}, chain=chain)
    case = plan_cases(["L1"], ["room"], ["own"], 1, seed=4)[0]
    folder = write_case(tmp_path / "c0", case, renderer, "../ct.mha", "../labels.mha", tmp_path / "panels")
    doc = read_json_document(folder / "geometry.json", GeometryFileError, "geometry file")
    assert doc["flat_field"]["A"]["gain"] == "../panels/room/gain_A.npy"
    flats = flat_fields_from_geometry_json(doc, folder)
    truth = json.loads((folder / "truth.json").read_text())
    setup = renderer.chain_frames("L1", "room", case.pose, "own", case.seed)
    for name in geometry.names:
        maps = renderer.detector_maps("room", name)
        assert np.array_equal(flats[name].defects, maps.dead) and maps.dead.sum() == 64
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / truth["frames"][name])))
        live = ~maps.dead
        assert_allclose(flats[name].apply(raw)[live], setup[name].signal[live], rtol=1e-4)
