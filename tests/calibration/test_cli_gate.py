"""`spineguide calibrate` with the acceptance gate: exit 3, report written, no geometry unless --force."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.io import write_geometry
from spineguide.calibration.phantom import default_phantom, write_phantom
from spineguide.tracking.cli.main import main

# End-to-end (calibrate as a command on rendered frames): outside the development loop (-m "not slow"), run by CI.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from spineguide.tracking.room import DetectorModel, render_bb_frames, write_frame

    folder = tmp_path_factory.mktemp("gate")
    geom = default_stereo_geometry(panel_pixels=384, pixel_spacing_mm=0.4 * 1024 / 384)
    write_geometry(geom, folder / "nominal.json")
    phantom = default_phantom()
    images = []
    for shift in ((0, 0, 0), (50, 0, 0), (0, 50, 0)):
        frames = render_bb_frames(geom, phantom.positions_mm + np.array(shift), phantom.diameters_mm, seed=3,
                                  detector=DetectorModel(seed_supersampling=4))
        for name in geom.names:
            path = write_frame(frames.frames[name], folder / f"bb_{shift[0]}_{shift[1]}_{name}.mha", name, 20000,
                               geom[name].pixel_spacing_mm)
            images += ["--image", f"{name}={path}" + ("" if shift == (0, 0, 0) else "@" + ",".join(map(str, shift)))]
    doc = phantom.to_json()
    doc["markers"][7]["position_mm"][1] += 1.0  # the file is wrong by 1 mm for one BB
    (folder / "wrong.json").write_text(json.dumps(doc))
    write_phantom(phantom, folder / "right.json")
    return folder, images, phantom.names[7]


def _args(folder, phantom, out, report, images):
    return ["calibrate", "--phantom", str(folder / phantom), "--nominal", str(folder / "nominal.json"),
            "--out", str(out), "--report", str(report)] + images


def test_failed_gate_exits_3_names_the_bb_writes_the_report_and_no_geometry(case, tmp_path, capsys):
    folder, images, bad = case
    out = tmp_path / "g.json"
    assert main(_args(folder, "wrong.json", out, tmp_path / "r", images)) == 3
    printed = capsys.readouterr().out
    assert "acceptance gate FAILED" in printed and f"BB {bad} in imager" in printed
    assert not out.exists() and (tmp_path / "r" / "index.html").exists()
    assert main(_args(folder, "wrong.json", out, tmp_path / "r2", images) + ["--force"]) == 3
    assert out.exists() and "--force" in capsys.readouterr().out


def test_right_phantom_passes_the_gate(case, tmp_path, capsys):
    folder, images, _ = case
    out = tmp_path / "g.json"
    assert main(_args(folder, "right.json", out, tmp_path / "r", images)) == 0
    assert "acceptance gate: passed" in capsys.readouterr().out and out.exists()


def test_report_a_physicist_signs_with_a_winston_lutz_reference_and_the_previous_calibration(case, tmp_path, capsys):
    folder, images, _ = case
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps({"schema": "winston-lutz/1", "centre_bb_from_mv_isocentre_mm": [0.0, 0.0, 0.0],
                              "sigma_mm": 0.1, "machine": "Linac 2", "date": "2026-12-06"}))
    out, rep = tmp_path / "g.json", tmp_path / "r"
    args = _args(folder, "right.json", out, rep, images) + [
        "--winston-lutz", str(wl), "--laser-pose", "0.2,0,0", "--machine", "Linac 2", "--operator", "J. Doe",
        "--previous", str(folder / "nominal.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kV isocentre vs MV isocentre" in printed and "within tolerance" in printed
    assert "lasers vs MV isocentre" in printed
    text = (rep / "index.html").read_text()
    assert "Imaging-geometry calibration: ACCEPTABLE" in text and "Linac 2" in text and "J. Doe" in text
    assert "spineguide" in text and "(SAD)" in text and "(SID)" in text and "magnification" in text
    assert "Compared with the previous calibration" in text and "TG-142" in text
    assert (rep / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert (rep / "bbs_A.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_calibration_still_writes_a_report(case, tmp_path, capsys):
    folder, images, _ = case
    only_centre = [v for pair in zip(images[::2], images[1::2]) for v in pair if "@" not in pair[1]]
    one_imager = only_centre[:2]  # imager A only: B has no views
    rep = tmp_path / "r"
    assert main(_args(folder, "right.json", tmp_path / "g.json", rep, one_imager)) == 2
    text = (rep / "index.html").read_text()
    assert "FAILED (no geometry)" in text and "What went wrong" in text
    assert (rep / "report.pdf").read_bytes()[:5] == b"%PDF-"
