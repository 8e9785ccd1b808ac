"""`spineguide calibrate` with the acceptance gate: exit 3, report written, no geometry unless --force."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.io import write_geometry
from spineguide.calibration.phantom import default_phantom, write_phantom
from spineguide.tracking.cli.main import main


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
