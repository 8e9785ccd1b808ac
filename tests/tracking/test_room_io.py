"""The simulation writer: everything it writes reads back and is consistent with the truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose

from spineguide.calibration.io import read_geometry
from spineguide.registration.ctfile import read_ct
from spineguide.registration.pose import Pose
from spineguide.registration.volume import PatientPosition
from tests.synthetic import small_geometry, small_simulator, small_thoracolumbar
from spineguide.tracking.errors import TrackingError
from spineguide.tracking.room.io import TRUTH_SCHEMA, write_simulation

MM_TOL = 1e-9  # values round-tripped through JSON (repr floats) and float64 arithmetic
PX_TOL = 1e-6  # projections through a geometry read back from JSON


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = write_simulation(out, small_thoracolumbar(), 2, seed=9, geometry=small_geometry())
    return out, summary


def test_planning_ct_geometry_and_mask_read_back(written):
    out, summary = written
    ph = small_thoracolumbar()
    ct = read_ct(out / "ct.mha")
    assert ct.patient_position is PatientPosition.HFS
    assert_allclose(ct.hu, ph.planning_ct.hu, rtol=0, atol=0)
    assert_allclose(ct.origin_lps_mm, ph.planning_ct.origin_lps_mm, rtol=0, atol=MM_TOL)
    geom = read_geometry(out / "geometry.json")
    for a, b in zip(geom.imagers, small_geometry().imagers):
        assert_allclose(a.projection_matrix, b.projection_matrix, rtol=0, atol=1e-9)
    mask = sitk.ReadImage(str(out / "target_mask.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(mask), ph.target_mask())
    assert_allclose(mask.GetOrigin(), ph.planning_ct.origin_lps_mm, rtol=0, atol=MM_TOL)
    # ct, mask, geometry, fiducials, the DICOM folder, 2 poses x 2 frames, truth.
    assert summary.n_poses == 2 and len(summary.files) == 5 + 4 + 1
    assert (out / "dicom" / "RS.dcm").exists() and (out / "dicom" / "RP.dcm").exists()


def test_truth_is_consistent_with_fiducials_geometry_and_frames(written):
    out, _ = written
    truth = json.loads((out / "truth.json").read_text())
    fid = json.loads((out / "fiducials.json").read_text())
    assert truth["schema"] == TRUTH_SCHEMA and fid["schema"] == "fiducials/1"
    iso = np.array(truth["isocentre_lps_mm"])
    lps = np.array([f["position_mm"] for f in fid["fiducials"]])
    d = lps - iso
    planned_room = np.stack([d[:, 0], d[:, 2], -d[:, 1]], axis=1)  # HFS mapping (CONVENTIONS)
    geom = read_geometry(out / "geometry.json")
    sim = small_simulator()
    for i, entry in enumerate(truth["poses"]):
        pose = Pose.from_six(entry["pose"]["translation_mm"], entry["pose"]["rotation_deg"])
        corr = Pose.from_six(entry["correction"]["translation_mm"], entry["correction"]["rotation_deg"])
        assert_allclose(corr.compose(pose).matrix, np.eye(4), rtol=0, atol=1e-9)  # C = P^-1
        seeds_room = np.array(entry["seeds_room_mm"])
        assert_allclose(seeds_room, pose.apply(planned_room), rtol=0, atol=1e-6)
        for im in geom.imagers:
            assert_allclose(np.array(entry["seeds_px"][im.name]), im.project(seeds_room), rtol=0, atol=PX_TOL)
            img = sitk.ReadImage(str(out / entry["frames"][im.name]))
            assert img.GetMetaData("spineguide_imager") == im.name
            assert float(img.GetMetaData("spineguide_i0")) == entry["i0"]
            frame = sitk.GetArrayFromImage(img)
            assert frame.shape == (im.rows, im.cols) and frame.dtype == np.uint16
            # The writer's noise seed for pose i is seed + 1 + i: the frame is reproducible.
            again = sim.render(pose, seed=9 + 1 + i).frames[im.name]
            assert np.array_equal(frame, again)


def test_bad_simulate_arguments_are_errors(tmp_path):
    with pytest.raises(TrackingError, match="unknown phantom 'lumbar'"):
        write_simulation(tmp_path, "lumbar", 1)
    with pytest.raises(TrackingError, match="number of poses must be a positive integer, got 0"):
        write_simulation(tmp_path, "thoracolumbar", 0)
