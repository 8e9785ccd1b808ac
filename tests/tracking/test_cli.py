"""The spineguide command line: parsing, exit codes, one-line errors, and the drr command's output."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from spineguide.calibration import default_stereo_geometry, write_geometry
from spineguide.registration import CTVolume, write_ct
from spineguide.registration.attenuation import linear_attenuation_per_mm
from spineguide.tracking.cli.main import CliError, main, parse_six, parse_triplet_mm

WATER_TOL_REL = 0.005  # voxel-aligned cube, exact Siddon path: only ray divergence (<0.1%) and float32 remain


@pytest.fixture()
def small_plan(tmp_path):
    # A 40 mm water cube in air, 2 mm voxels, centred on LPS (10, -20, 30); the isocentre sits at its centre.
    n = 40
    hu = np.full((n, n, n), -1000.0, np.float32)
    hu[10:30, 10:30, 10:30] = 0.0
    spacing = 2.0
    origin = np.array([10.0, -20.0, 30.0]) - spacing * (n - 1) / 2
    ct = CTVolume(hu, (spacing,) * 3, origin, np.eye(3), "HFS", "cube")
    ct_path = write_ct(ct, tmp_path / "ct.mha")
    geom_path = write_geometry(default_stereo_geometry(panel_pixels=64, pixel_spacing_mm=6.4), tmp_path / "g.json")
    return ct_path, geom_path


def test_drr_command_writes_line_integrals_per_imager(small_plan, tmp_path, capsys):
    ct_path, geom_path = small_plan
    out = tmp_path / "drr"
    code = main(["drr", "--ct", str(ct_path), "--geometry", str(geom_path), "--isocenter", "10,-20,30", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "drr_A.mha" in printed and "drr_B.mha" in printed
    for name in ("A", "B"):
        image = sitk.ReadImage(str(out / f"drr_{name}.mha"))
        arr = sitk.GetArrayFromImage(image)
        assert arr.shape == (64, 64) and arr.dtype == np.float32
        # Rays at 45 degrees cross the cube's X-Z section (a 40 mm square) along its diagonal; a ray
        # offset by s from the diagonal (perpendicular, in the beam plane) has chord 40 sqrt(2) - 2|s|.
        # Pixels 31 and 32 sit half a pixel from the centre: s = 0.5 * 6.4 mm / magnification (3600/2200).
        centre = arr[31:33, 31:33].mean()
        offset_mm = 0.5 * 6.4 * 2200 / 3600
        expected = (40 * np.sqrt(2) - 2 * offset_mm) * linear_attenuation_per_mm("water", 60.0)
        assert centre == pytest.approx(expected, rel=WATER_TOL_REL)


def test_drr_pose_moves_the_image(small_plan, tmp_path):
    ct_path, geom_path = small_plan
    base = ["drr", "--ct", str(ct_path), "--geometry", str(geom_path), "--isocenter", "10,-20,30", "--imager", "A"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--pose", "0,19.2,0,0,0,0", "--out", str(tmp_path / "b")]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "drr_A.mha")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "drr_A.mha")))
    assert not (tmp_path / "a" / "drr_B.mha").exists()
    # Patient +19.2 mm along room Y (towards the gantry) = +rows; at magnification 3600/2200 and 6.4 mm
    # pixels that is 19.2 * 1.636 / 6.4 = 4.9 px.
    rows = np.arange(64)
    centroid = lambda img: (img.sum(axis=1) * rows).sum() / img.sum()
    assert centroid(b) - centroid(a) == pytest.approx(19.2 * 3600 / 2200 / 6.4, abs=0.1)


@pytest.mark.parametrize("stored", ["int16", "float32-whole", "float32-fractional"])
def test_drr_command_writes_what_the_library_computes_from_float_hu(tmp_path, stored):
    # The command keeps whole HU as int16 and projects them through a table (half the memory);
    # its images must be exactly what the library gives from the same CT in float32 HU, through
    # a converted attenuation volume (what the command did before).
    from spineguide.registration.drr import AttenuationVolume, compute_drr
    from spineguide.registration.pose import Pose
    from spineguide.registration.ctfile import read_ct

    rng = np.random.default_rng(5)
    hu = rng.normal(40.0, 300.0, size=(26, 30, 34)).clip(-1024, 3071)
    hu[:, :, :4] = -1024  # padding outside the field of view
    hu = np.rint(hu) if stored != "float32-fractional" else hu
    image = sitk.GetImageFromArray(hu.astype(np.int16 if stored == "int16" else np.float32))
    image.SetSpacing((1.1, 1.3, 2.0))
    image.SetOrigin((-18.0, -19.0, -25.0))
    ct_path = tmp_path / "ct.mha"
    sitk.WriteImage(image, str(ct_path))
    geom = default_stereo_geometry(panel_pixels=40, pixel_spacing_mm=4.0)
    geom_path = write_geometry(geom, tmp_path / "g.json")
    code = main(["drr", "--ct", str(ct_path), "--geometry", str(geom_path), "--isocenter", "1,-2,0.5",
                 "--patient-position", "FFS", "--pose", "1.5,-2,3,2,-1.5,3", "--out", str(tmp_path / "out")])
    assert code == 0
    volume = AttenuationVolume.from_ct(read_ct(ct_path, patient_position="FFS"), [1.0, -2.0, 0.5])
    assert volume.mu_per_mm.dtype == np.float32
    pose = Pose.from_six([1.5, -2.0, 3.0], [2.0, -1.5, 3.0])
    for name in ("A", "B"):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"drr_{name}.mha")))
        expected = compute_drr(volume, geom[name], pose)
        assert expected.max() > 1.0 and np.array_equal(written, expected)


def test_drr_command_hands_whole_hu_over_as_int16(small_plan, tmp_path, monkeypatch):
    # The memory figure of docs/BENCHMARKS.md (whole process) rests on this: a CT of whole HU reaches
    # the DRR writer as int16 (projected through the attenuation table), not as float32.
    import spineguide.registration.drr as drr

    seen = {}

    def spy(ct, *args, **kwargs):
        seen["dtype"] = ct.hu.dtype
        return {}

    monkeypatch.setattr(drr, "write_drr_images", spy)
    ct_path, geom_path = small_plan  # float32 file of whole HU (write_ct)
    assert main(["drr", "--ct", str(ct_path), "--geometry", str(geom_path), "--isocenter", "10,-20,30",
                 "--out", str(tmp_path / "o")]) == 0
    assert seen["dtype"] == np.int16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--isocenter", "1,2"], "--isocenter must be three comma-separated numbers"),
        (["--isocenter", "0,0,0", "--pose", "1,2,3"], "--pose must be six"),
        (["--isocenter", "0,0,0", "--imager", "C"], "no imager named 'C'"),
    ],
)
def test_drr_bad_arguments_exit_non_zero_with_reason(small_plan, tmp_path, capsys, args, message):
    ct_path, geom_path = small_plan
    code = main(["drr", "--ct", str(ct_path), "--geometry", str(geom_path), "--out", str(tmp_path / "o")] + args)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("spineguide: error:") and message in err and err.count("\n") == 1


def test_drr_missing_files_name_them(tmp_path, capsys):
    code = main(["drr", "--ct", str(tmp_path / "nope.mha"), "--geometry", str(tmp_path / "g.json"),
                 "--isocenter", "0,0,0", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "g.json: cannot read geometry file" in capsys.readouterr().err


def test_ct_without_patient_position_needs_the_flag(tmp_path, capsys, small_plan):
    _, geom_path = small_plan
    img = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32))
    sitk.WriteImage(img, str(tmp_path / "bare.mha"))
    args = ["drr", "--ct", str(tmp_path / "bare.mha"), "--geometry", str(geom_path), "--isocenter", "0,0,0",
            "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "does not record the patient position" in capsys.readouterr().err
    assert main(args + ["--patient-position", "HFDL"]) == 2
    assert "'HFDL' is not supported" in capsys.readouterr().err
    assert main(args + ["--patient-position", "FFS"]) == 0


def test_value_parsers():
    assert parse_triplet_mm("1, -2.5,3e1") == (1.0, -2.5, 30.0)
    assert parse_six("1,2,3,4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    with pytest.raises(CliError, match="finite"):
        parse_triplet_mm("1,inf,2")
    with pytest.raises(CliError, match="six"):
        parse_six("a,b,c,d,e,f")


def _table_value(out: str, label: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith(label)]
    assert len(rows) == 1, f"no single '{label}' row in:\n{out}"
    return rows[0][len(label):].strip()


@pytest.mark.slow
def test_quick_demo_calibrates_then_runs_a_fraction_that_holds_on_the_shift(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    # Calibration found the perturbed room: every calibrated error well under a pixel.
    calib = [line.split() for line in out.splitlines() if line.startswith(("A ", "B ")) and len(line.split()) == 5]
    assert len(calib) == 2 and all(float(row[4]) < 0.2 < float(row[3]) for row in calib)
    # The 3 mm shift held the beam, and a re-setup followed.
    assert "out_of_tolerance" in _table_value(out, "holds while monitoring")
    assert int(_table_value(out, "setups (incl. re-setup)")) >= 2
    # No ENABLE was ever sent for a pair more than the 1 mm tolerance off.
    assert float(_table_value(out, "max true deviation with ENABLE sent").split()[0]) <= 1.0


@pytest.fixture(scope="module")
def bb_frames(tmp_path_factory):
    from spineguide.calibration.phantom import default_phantom
    from spineguide.tracking.room import DetectorModel, render_bb_frames, write_frame

    folder = tmp_path_factory.mktemp("bb")
    geom = default_stereo_geometry(panel_pixels=384, pixel_spacing_mm=0.4 * 1024 / 384)
    write_geometry(geom, folder / "nominal.json")
    phantom = default_phantom()
    files = {}
    for shift in ((0, 0, 0), (50, 0, 0), (0, 50, 0)):
        frames = render_bb_frames(geom, phantom.positions_mm + np.array(shift), phantom.diameters_mm, seed=7,
                                  detector=DetectorModel(seed_supersampling=8))
        for name in geom.names:
            path = write_frame(frames.frames[name], folder / f"bb_{shift[0]}_{shift[1]}_{name}.mha", name, 20000,
                               geom[name].pixel_spacing_mm)
            files[(shift, name)] = f"{name}={path}" + ("" if shift == (0, 0, 0) else "@" + ",".join(map(str, shift)))
    return folder, files


def test_calibrate_then_qa_pass_and_trend(bb_frames, tmp_path, capsys):
    folder, files = bb_frames
    out = tmp_path / "g.json"
    args = ["calibrate", "--phantom", "default", "--nominal", str(folder / "nominal.json"), "--out", str(out),
            "--report", str(tmp_path / "report")]
    for value in files.values():
        args += ["--image", value]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "isocentre check" in printed and ": ok" in printed and out.exists()
    assert (tmp_path / "report" / "index.html").exists()
    history = tmp_path / "h.jsonl"
    qa = ["qa", "--geometry", str(out), "--phantom", "default", "--history", str(history),
          "--image", files[((0, 0, 0), "A")], "--image", files[((0, 0, 0), "B")]]
    assert main(qa) == 0
    assert "QA pass" in capsys.readouterr().out
    assert main(["qa", "--trend", "--history", str(history)]) == 0
    assert "pass" in capsys.readouterr().out and history.with_suffix(".png").exists()


def test_qa_with_images_swapped_between_imagers_fails_loudly(bb_frames, tmp_path, capsys):
    folder, files = bb_frames
    swapped = ["--image", files[((0, 0, 0), "B")].replace("B=", "A="), "--image", files[((0, 0, 0), "A")].replace("A=", "B=")]
    code = main(["qa", "--geometry", str(folder / "nominal.json"), "--phantom", "default",
                 "--history", str(tmp_path / "h.jsonl")] + swapped)
    assert code == 2
    assert "spineguide: error:" in capsys.readouterr().err


def test_calibration_image_argument_errors(capsys):
    assert main(["calibrate", "--phantom", "default", "--image", "A", "--out", "x.json"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert main(["qa", "--phantom", "default"]) == 2
    assert "qa needs --geometry" in capsys.readouterr().err


def _register_args(folder, truth, method):
    iso = ",".join(repr(float(v)) for v in truth["isocentre_lps_mm"])
    return ["register", "--method", method, "--ct", str(folder / "ct.mha"), "--isocenter", iso,
            "--geometry", str(folder / "geometry.json"), "--image", f"A={folder / 'frames' / 'pose_000_A.mha'}",
            "--image", f"B={folder / 'frames' / 'pose_000_B.mha'}", "--json"]


# 0.8 mm pixels (0.49 mm at the isocentre) with three seeds: the benchmark's full-size figures are
# far tighter; this checks sign and frame end to end through files and the CLI.
CLI_FIDUCIAL_TOL_MM = 0.3
CLI_FIDUCIAL_TOL_DEG = 0.5


def test_register_fiducial_json_matches_truth(simulated_case, capsys):
    import json

    folder, truth = simulated_case
    code = main(_register_args(folder, truth, "fiducial") + ["--fiducials", str(folder / "fiducials.json")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["method"] == "fiducial" and report["quality"]["ok"] is True
    expected = truth["poses"][0]["correction"]
    np.testing.assert_allclose(report["correction"]["translation_mm"], expected["translation_mm"], rtol=0,
                               atol=CLI_FIDUCIAL_TOL_MM)
    np.testing.assert_allclose(report["correction"]["rotation_deg"], expected["rotation_deg"], rtol=0,
                               atol=CLI_FIDUCIAL_TOL_DEG)
    assert report["quality"]["fre_mm"] < 0.3 and report["elapsed_s"] > 0
    assert {s["name"] for s in report["quality"]["seeds"]} == {"F1", "F2", "F3"}


def test_register_without_fiducials_lists_ct_candidates_and_asks_for_confirmation(simulated_case, capsys):
    folder, truth = simulated_case
    code = main([a for a in _register_args(folder, truth, "fiducial") if a != "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "seed candidate(s) found in the CT" in err and "--use-ct-seeds" in err


def test_register_anatomy_needs_one_roi(simulated_case, capsys):
    folder, truth = simulated_case
    assert main(_register_args(folder, truth, "anatomy")) == 2
    assert "needs an ROI" in capsys.readouterr().err
    assert main(_register_args(folder, truth, "anatomy") + ["--roi-box", "20,20,20", "--roi", "x.mha"]) == 2
    assert "takes one of --roi" in capsys.readouterr().err


def test_register_with_a_missing_image_names_it(simulated_case, capsys):
    folder, truth = simulated_case
    args = _register_args(folder, truth, "fiducial")
    args[args.index(f"B={folder / 'frames' / 'pose_000_B.mha'}")] = f"B={folder / 'nope.mha'}"
    assert main(args + ["--fiducials", str(folder / "fiducials.json")]) == 2
    assert "nope.mha: no such image file" in capsys.readouterr().err


def test_register_with_confirmed_ct_seeds(simulated_case, capsys):
    import json

    folder, truth = simulated_case
    code = main(_register_args(folder, truth, "fiducial") + ["--use-ct-seeds"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and len(report["quality"]["seeds"]) == 3
    # The seeds' planned positions now come from CT centroids (voxels of 1.5 x 1.5 x 2 mm clipped at
    # 3071 HU), which carry their own error of a few tenths of a mm.
    expected = truth["poses"][0]["correction"]
    np.testing.assert_allclose(report["correction"]["translation_mm"], expected["translation_mm"], rtol=0, atol=0.5)


def test_register_gives_the_same_answer_from_the_dicom_plan(simulated_case, capsys):
    import json

    folder, truth = simulated_case
    assert main(_register_args(folder, truth, "fiducial") + ["--fiducials", str(folder / "fiducials.json")]) == 0
    from_files = json.loads(capsys.readouterr().out)
    args = ["register", "--method", "fiducial", "--plan", str(folder / "dicom"), "--geometry",
            str(folder / "geometry.json"), "--image", f"A={folder / 'frames' / 'pose_000_A.mha'}",
            "--image", f"B={folder / 'frames' / 'pose_000_B.mha'}", "--json"]
    assert main(args) == 0
    from_dicom = json.loads(capsys.readouterr().out)
    # Seeds come from RTSTRUCT POINT ROIs and the isocentre from the RTPLAN (DS strings keep 1e-9 mm or better).
    np.testing.assert_allclose(from_dicom["plan"]["isocentre_lps_mm"], truth["isocentre_lps_mm"], rtol=0, atol=1e-6)
    for key in ("translation_mm", "rotation_deg"):
        np.testing.assert_allclose(from_dicom["correction"][key], from_files["correction"][key], rtol=0, atol=1e-6)


def test_dicom_export_writes_rt_images_and_sends_them_to_an_archive(simulated_case, tmp_path, capsys):
    import pydicom

    from spineguide.tracking.service.dicom_net import EXPORT_SOP_CLASSES, ListenerConfig, StorageListener

    folder, _ = simulated_case
    frames = ["--image", f"A={folder / 'frames' / 'pose_000_A.mha'}", "--image", f"B={folder / 'frames' / 'pose_000_B.mha'}"]
    config = ListenerConfig(tmp_path / "archive", port=0, sop_classes=EXPORT_SOP_CLASSES, timeout_s=20.0)
    with StorageListener(config) as archive:
        code = main(["dicom-export", "--plan", str(folder / "dicom"), "--geometry", str(folder / "geometry.json"),
                     *frames, "--i0", "20000", "--pair-id", "4", "--out", str(tmp_path / "ri"),
                     "--send", f"SPINEGUIDE@127.0.0.1:{archive.port}"])
        received = archive.received
    assert code == 0 and "sent 2 object(s)" in capsys.readouterr().out
    assert len(received) == 2
    for path in received:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "RTIMAGE" and ds.PatientID == pydicom.dcmread(folder / "dicom" / "RP.dcm").PatientID
    assert main(["dicom-export", "--plan", str(folder / "dicom"), "--geometry", str(folder / "geometry.json"),
                 *frames, "--out", str(tmp_path / "x")]) == 2
    assert "--i0 is required" in capsys.readouterr().err
    assert main(["dicom-send", "--archive", "nohost", str(tmp_path / "ri")]) == 2
    assert "AE@HOST:PORT" in capsys.readouterr().err


def test_register_anatomy_reads_the_roi_mask_and_checks_its_grid(simulated_case, tmp_path, capsys):
    import json

    folder, truth = simulated_case
    args = _register_args(folder, truth, "anatomy")
    # A mask on another grid is refused before any registration runs.
    mask = sitk.ReadImage(str(folder / "target_mask.mha"))
    moved = sitk.Image(mask)
    moved.SetOrigin(tuple(o + 5.0 for o in mask.GetOrigin()))
    sitk.WriteImage(moved, str(tmp_path / "moved.mha"))
    assert main(args + ["--roi", str(tmp_path / "moved.mha")]) == 2
    err = capsys.readouterr().err
    assert "moved.mha: mask origin" in err and "differs from the CT's" in err and "(limit 0.001 mm)" in err
    # The room's target mask: the registration runs and reports the anatomy JSON.
    code = main(args + ["--roi", str(folder / "target_mask.mha")])
    report = json.loads(capsys.readouterr().out)
    assert code in (0, 3) and report["method"] == "anatomy"
    assert set(report["correction"]) == {"translation_mm", "rotation_deg"} and "ok" in report["quality"]


def test_register_help_names_the_service_correction_limits_without_importing_the_service(capsys):
    """The --max-correction-* defaults are the service's [safety] limits, resolved when the command runs; --help
    states them without importing the service's config (NumPy)."""
    import subprocess
    import sys

    from spineguide.tracking.service.config import SafetyConfig

    code = ("import sys; from spineguide.tracking.cli.main import build_parser; build_parser(); "
            "print('spineguide.tracking.service.config' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    try:
        code = main(["register", "--help"])
    except SystemExit as exit_:  # argparse's own exit, where main lets it through
        code = exit_.code
    assert code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    safety = SafetyConfig()
    assert f"correction_limit_mm, {safety.correction_limit_mm:g})" in text
    assert f"correction_limit_deg, {safety.correction_limit_deg:g})" in text


def test_register_levels_refuses_bad_level_options_by_name(simulated_case, capsys):
    """``--levels`` (per-level anatomy registration): options checked before anything is registered."""
    folder, truth = simulated_case
    args = _register_args(folder, truth, "anatomy")
    assert main(args + ["--levels", "L1,L2"]) == 2
    assert "--levels takes the vertebra label map as --roi LABELS" in capsys.readouterr().err
    assert main(args + ["--roi", str(folder / "target_mask.mha"), "--levels", "L1,X9"]) == 2
    assert "--levels: unknown vertebra X9" in capsys.readouterr().err
    assert main(args + ["--roi", str(folder / "target_mask.mha"), "--target-level", "L1"]) == 2
    assert "--target-level and --drive-level go with --levels" in capsys.readouterr().err
