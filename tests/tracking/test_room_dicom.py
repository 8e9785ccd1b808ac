"""The virtual room's synthetic DICOM planning data: CT values, contours, seeds, plan; validator; import CLI."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.dicom_rt import rasterise_contours, read_rtplan, read_rtstruct
from spineguide.registration.volume import CTVolume
from tests.synthetic import small_thoracolumbar
from spineguide.tracking.cli.dicom import add_commands
from spineguide.tracking.errors import TrackingError
from spineguide.tracking.room.dicom import CT_RESCALE_INTERCEPT, CT_RESCALE_SLOPE, label_contours_lps_mm, write_dicom_plan

HU_TOL = CT_RESCALE_SLOPE / 2 + 1e-4  # half a stored step (+ float32 HU representation)
LPS_TOL_MM = 1e-9  # DS strings with 15 significant digits


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    phantom = small_thoracolumbar()
    return phantom, write_dicom_plan(phantom, tmp_path_factory.mktemp("dicom"), created_unix_s=1764070000.0)


def test_ct_slices_hold_the_planning_ct_as_rescaled_int16(written):
    phantom, files = written
    ct = phantom.planning_ct
    assert len(files.ct_files) == ct.hu.shape[0]
    for k in (0, len(files.ct_files) // 2, len(files.ct_files) - 1):
        ds = pydicom.dcmread(files.ct_files[k])
        assert ds.pixel_array.dtype == np.int16 and ds.PatientPosition == "HFS"
        assert float(ds.RescaleSlope) == CT_RESCALE_SLOPE and float(ds.RescaleIntercept) == CT_RESCALE_INTERCEPT
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert_allclose(hu, ct.hu[k], rtol=0, atol=HU_TOL)
        assert_allclose([float(v) for v in ds.ImagePositionPatient], ct.index_to_lps([[0, 0, k]])[0], rtol=0,
                        atol=LPS_TOL_MM)
        assert ds.FrameOfReferenceUID == files.frame_of_reference_uid


def test_structure_set_contours_give_back_the_labels_and_seeds(written):
    phantom, files = written
    ss = read_rtstruct(files.rtstruct)
    assert ss.frame_of_reference_uid == files.frame_of_reference_uid
    assert ss.referenced_series_uids == (files.ct_series_uid,)
    for label, name in phantom.label_names.items():
        roi = ss.roi(name)
        assert roi.interpreted_type == ("CTV" if label == phantom.target_label else "ORGAN")
        np.testing.assert_array_equal(rasterise_contours(roi.contours_lps_mm, phantom.planning_ct, name),
                                      phantom.labels == label, err_msg=name)
    fid = ss.point_fiducials()
    assert fid.names == tuple(s.name for s in phantom.seeds)  # the ISOCENTER point is not a seed
    (iso_name, iso_pos), = ss.isocentre_points()
    assert iso_name == "ISO"
    assert_allclose(iso_pos, phantom.isocentre_lps_mm, rtol=0, atol=LPS_TOL_MM)
    assert_allclose(fid.positions_lps_mm, [s.centre_lps_mm for s in phantom.seeds], rtol=0, atol=LPS_TOL_MM)


def test_contours_of_a_ring_with_an_island_round_trip():
    ct = CTVolume(np.zeros((1, 20, 20), np.float32), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3), "HFS")
    mask = np.zeros((20, 20), bool)
    mask[2:17, 3:18] = True
    mask[5:14, 6:15] = False
    mask[8:11, 9:12] = True
    mask[1, 1] = True  # a lone voxel touching the ring only at a corner
    contours = [np.column_stack([c, np.zeros(len(c))]) for c in label_contours_lps_mm(mask)]
    np.testing.assert_array_equal(rasterise_contours(contours, ct)[0], mask)


def test_plan_holds_the_isocentre_and_setup(written):
    phantom, files = written
    rp = read_rtplan(files.rtplan)
    assert_allclose(rp.isocentres_lps_mm, [phantom.isocentre_lps_mm], rtol=0, atol=LPS_TOL_MM)
    assert [p.value for p in rp.patient_positions] == ["HFS"]
    assert rp.referenced_structure_set_uid == pydicom.dcmread(files.rtstruct).SOPInstanceUID
    target = read_rtstruct(files.rtstruct).roi(phantom.target_name)
    assert rp.target_roi_numbers == (target.number,)


def test_hu_out_of_int16_range_is_refused(tmp_path):
    phantom = small_thoracolumbar()
    ct = phantom.planning_ct
    hot = CTVolume(np.full(ct.hu.shape, 5000.0, np.float32), ct.spacing_mm, ct.origin_lps_mm, ct.direction, "HFS")
    bad = dataclasses.replace(phantom, planning_ct=hot)
    with pytest.raises(TrackingError, match=r"HU range 5000\.\.5000 does not fit int16"):
        write_dicom_plan(bad, tmp_path)


def test_validator_finds_no_errors(written):
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (apt-get install dicom3tools) is required in CI")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    _, files = written
    for path in (files.ct_files[0], files.rtstruct, files.rtplan):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], path.name


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_import_command_reports_series_structures_and_plan(written):
    phantom, files = written
    args = _cli(["import", str(files.out_dir)])
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    text = out.getvalue()
    assert f"CT series {files.ct_series_uid}: {len(files.ct_files)} slices" in text
    assert "8 contoured ROIs" in text and "3 seed points ['F1', 'F2', 'F3'], isocentre points ['ISO']" in text
    assert "plan OK" in text and "(rtplan)" in text and "ROI L1 (target: rtplan TARGET dose reference (ROI #" in text
    iso = ", ".join(f"{x:.2f}" for x in phantom.isocentre_lps_mm)
    assert f"isocentre(s) ({iso}) LPS mm" in text


def test_import_command_fails_on_a_broken_folder(written, tmp_path):
    from spineguide.registration.plan import PlanError

    phantom, files = written
    shutil.copytree(files.out_dir, tmp_path / "d")
    (tmp_path / "d" / "RP.dcm").unlink()
    # Without an RTPLAN the structure set's ISOCENTER point is the isocentre...
    args = _cli(["import", str(tmp_path / "d")])
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    iso = ", ".join(f"{x:.2f}" for x in phantom.isocentre_lps_mm)
    assert f"isocentre ({iso}) LPS mm (rtstruct ISOCENTER point 'ISO')" in out.getvalue()
    # ... and with that point retyped (a CONTROL point is neither seed nor isocentre) there is none.
    ds = pydicom.dcmread(tmp_path / "d" / "RS.dcm")
    iso_number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == "ISO")
    for obs in ds.RTROIObservationsSequence:
        if obs.ReferencedROINumber == iso_number:
            obs.RTROIInterpretedType = "CONTROL"
    ds.save_as(tmp_path / "d" / "RS.dcm")
    with pytest.raises(PlanError, match="no RTPLAN to take the isocentre from"):
        args.func(args, out=io.StringIO())
    args = _cli(["import", str(tmp_path / "d"), "--isocenter", "1,2,3"])
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    assert "3 seed points ['F1', 'F2', 'F3'], isocentre points [], other points ['ISO']" in out.getvalue()


def test_listen_command_runs_for_its_duration(tmp_path):
    args = _cli(["dicom-listen", "--port", "0", "--out", str(tmp_path / "rx"), "--duration-s", "0.3"])
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    assert "listening as SPINEGUIDE on 127.0.0.1:" in out.getvalue() and "received 0 object(s)" in out.getvalue()
    assert "accepting any calling AE title and host" in out.getvalue()
    args = _cli(["dicom-listen", "--port", "0", "--out", str(tmp_path / "rx"), "--duration-s", "0.3",
                 "--allow-ae", "TPS", "--allow-ae", "PACS", "--allow-host", "10.0.0.5"])
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    assert "accepting calling AE titles ['TPS', 'PACS'], hosts ['10.0.0.5']" in out.getvalue()
