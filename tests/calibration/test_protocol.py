"""The calibration's depth protocol (couch positions and exposures): along each imager's own central axis, that
imager only; the CLI prints it and its defaults are the module's."""

from __future__ import annotations

import numpy as np
import pytest

from spineguide.calibration.errors import CalibrationError
from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.protocol import AXIS_EXPOSURES, AXIS_SHIFT_MM, Y_SHIFT_MM, depth_protocol
from spineguide.tracking.cli.main import build_parser, main

GEOMETRY = default_stereo_geometry()


def test_the_axis_positions_keep_the_phantom_on_each_imagers_central_ray():
    plan = depth_protocol(GEOMETRY)
    assert plan[0].couch_shift_mm == (0.0, 0.0, 0.0) and plan[0].imagers == GEOMETRY.names
    assert [e.couch_shift_mm for e in plan[1:3]] == [(0.0, Y_SHIFT_MM, 0.0), (0.0, -Y_SHIFT_MM, 0.0)]
    along = plan[3:]
    assert len(along) == len(GEOMETRY.imagers) * 2 * AXIS_EXPOSURES
    for e in along:
        (name,) = e.imagers
        im = GEOMETRY[name]
        shift = np.asarray(e.couch_shift_mm)
        assert np.linalg.norm(shift) == pytest.approx(AXIS_SHIFT_MM, abs=1e-5)
        # The isocentre moved by the shift still projects where the isocentre did: the phantom stays centred.
        assert np.allclose(im.project(shift[None]), im.project(np.zeros((1, 3))), atol=1e-6)
    frames_per_imager = {n: sum(n in e.imagers for e in plan) for n in GEOMETRY.names}
    assert frames_per_imager == {n: 3 + 2 * AXIS_EXPOSURES for n in GEOMETRY.names}


def test_no_lever_gives_the_centre_alone_and_bad_values_are_errors():
    assert [e.couch_shift_mm for e in depth_protocol(GEOMETRY, axis_shift_mm=0, y_shift_mm=0)] == [(0.0, 0.0, 0.0)]
    for kw, match in (({"axis_shift_mm": float("nan")}, "axis_shift_mm"), ({"axis_shift_mm": -1}, "axis_shift_mm"),
                      ({"y_shift_mm": "x"}, "y_shift_mm"), ({"axis_exposures": 1.5}, "axis_exposures"),
                      ({"axis_exposures": True}, "axis_exposures"), ({"axis_exposures": 11}, "axis_exposures")):
        with pytest.raises(CalibrationError, match=match):
            depth_protocol(GEOMETRY, **kw)


def test_the_cli_prints_the_protocol_with_the_modules_defaults(capsys):
    args = build_parser().parse_args(["calibrate-protocol"])
    assert (args.axis_shift_mm, args.axis_exposures, args.y_shift_mm) == (AXIS_SHIFT_MM, AXIS_EXPOSURES, Y_SHIFT_MM)
    assert main(["calibrate-protocol"]) == 0
    out = capsys.readouterr().out
    assert "11 exposures" in out
    assert "--image A=exp04_A.tif@212.1,0.0,-212.1" in out and "--image B=exp11_B.tif@212.1,0.0,212.1" in out
