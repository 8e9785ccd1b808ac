"""RT Images a PACS or record-and-verify system reads correctly (issue 15 item 4).

Frame of Reference (the session's treatment-day frame), the plan and setup beam referenced, bone bright on display
while the values stay the raw signal, X-Ray Image Receptor Translation, unique series numbers, local times with their
UTC offset; dciodvfy 0 errors 0 warnings and dcentvfy clean together with the plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from spineguide.registration.dicom_export import SeriesInfo, imager_from_rt_image, rt_image, save
from spineguide.registration.plan import load_dicom_plan
from spineguide.tracking.cli.dicom import add_commands
from spineguide.tracking.room.dicom import write_dicom_plan
from tests.registration.test_dicom_export import dcentvfy_findings, dciodvfy_findings
from tests.synthetic import small_geometry, small_thoracolumbar

SESSION_UID = "1.2.826.0.1.3680043.8.498.78"
T0 = 1764070000.25


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    write_dicom_plan(small_thoracolumbar(), d)
    return d


@pytest.fixture(scope="module")
def plan(plan_dir):
    return load_dicom_plan(plan_dir)


def _frame(g):
    """A raw frame: bright open field (40000), a darker 'bone' block (9000) and a near-black 'seed' (800)."""
    f = np.full((g.rows, g.cols), 40000, np.uint16)
    f[40:80, 40:80] = 9000
    f[60, 60] = 800
    return f


def test_rt_image_references_frame_plan_and_beam_and_displays_bone_bright(plan, plan_dir, tmp_path):
    g = small_geometry()["A"]
    frame = _frame(g)
    assert plan.rtplan_sop_instance_uid is not None and plan.setup_beam_numbers == (1,)
    ds = rt_image(frame, g, plan.patient, acquired_unix_s=T0, i0=40000.0, series=SeriesInfo.new(7),
                  room_frame_of_reference_uid=SESSION_UID, referenced_rtplan_uid=plan.rtplan_sop_instance_uid,
                  referenced_beam_number=plan.setup_beam_numbers[0])
    save(ds, tmp_path / "ri.dcm")
    back = pydicom.dcmread(tmp_path / "ri.dcm")
    assert back.FrameOfReferenceUID == SESSION_UID
    (ref,) = back.ReferencedRTPlanSequence
    assert ref.ReferencedSOPInstanceUID == pydicom.dcmread(plan_dir / "RP.dcm").SOPInstanceUID
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.481.5" and back.ReferencedBeamNumber == 1
    # The values a reader gets through the Modality LUT are the raw signal, unchanged...
    values = apply_modality_lut(back.pixel_array, back)
    np.testing.assert_array_equal(values, frame)
    # ... and what a viewer shows through the VOI LUT is brighter where the signal is lower (bone, seed).
    shown = apply_voi_lut(back.pixel_array, back)  # integer input: the LUT is indexed by the stored value
    assert shown[60, 60] > shown[50, 50] > shown[0, 0]
    assert back.PhotometricInterpretation == "MONOCHROME2" and back.PixelIntensityRelationshipSign == 1
    # Receptor origin on the central axis, SID - SAD below the isocentre.
    assert_allclose([float(v) for v in back.XRayImageReceptorTranslation],
                    [0.0, 0.0, float(back.RadiationMachineSAD) - float(back.RTImageSID)], rtol=0, atol=1e-9)
    # Times: local wall clock with its offset; together they give back the acquisition instant.
    offset = back.TimezoneOffsetFromUTC
    assert back.AcquisitionDateTime.endswith(offset)
    stamp = dt.datetime.strptime(back.AcquisitionDateTime, "%Y%m%d%H%M%S.%f%z")
    assert abs(stamp.timestamp() - T0) < 1e-6
    assert dciodvfy_findings(tmp_path / "ri.dcm") == []
    assert dcentvfy_findings([*sorted(plan_dir.glob("*.dcm")), tmp_path / "ri.dcm"]) == []


def test_receptor_translation_is_read_back(plan, tmp_path):
    g = small_geometry()["B"]
    ds = rt_image(_frame(g), g, plan.patient, acquired_unix_s=T0, i0=40000.0, series=SeriesInfo.new(7))
    rebuilt = imager_from_rt_image(ds)
    ds.XRayImageReceptorTranslation = ["12.5", "-4", ds.XRayImageReceptorTranslation[2]]
    shifted = imager_from_rt_image(ds)
    # The receptor moved 12.5 mm along the gantry X axis and -4 mm along Y: the panel moved with it.
    moved = np.asarray(shifted.origin_mm) - np.asarray(rebuilt.origin_mm)
    assert_allclose(np.linalg.norm(moved), np.hypot(12.5, 4.0), rtol=0, atol=1e-9)
    assert_allclose(moved @ np.asarray(rebuilt.normal), 0.0, rtol=0, atol=1e-9)  # in the panel plane


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_dicom_export_series_numbers_are_unique_and_clear_of_the_plan(plan_dir, tmp_path):
    from spineguide.calibration.io import write_geometry

    geometry = small_geometry()
    write_geometry(geometry, tmp_path / "g.json")
    images = []
    for name in geometry.names:
        np.save(tmp_path / f"{name}.npy", _frame(geometry[name]))
        images += ["--image", f"{name}={tmp_path / f'{name}.npy'}"]
    numbers, uids = [], set()
    for run in range(2):
        args = _cli(["dicom-export", "--plan", str(plan_dir), "--geometry", str(tmp_path / "g.json"), *images,
                     "--i0", "40000", "--out", str(tmp_path / f"out{run}"), "--frame-of-reference-uid", SESSION_UID])
        assert args.func(args, out=io.StringIO()) == 0
        for path in sorted((tmp_path / f"out{run}").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            numbers.append(int(ds.SeriesNumber))
            uids.add(ds.SeriesInstanceUID)
            assert ds.FrameOfReferenceUID == SESSION_UID and ds.ReferencedBeamNumber == 1
        if run == 0:
            import time

            time.sleep(1.05)  # series numbers are unique per second of export
    plan_numbers = {int(pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber) for p in plan_dir.glob("*.dcm")}
    assert len(numbers) == 4 and len(set(numbers)) == 4 and len(uids) == 4
    assert not set(numbers) & plan_numbers
    bad = _cli(["dicom-export", "--plan", str(plan_dir), "--geometry", str(tmp_path / "g.json"), *images,
                "--i0", "40000", "--out", str(tmp_path / "bad"), "--frame-of-reference-uid", "1.02.x"])
    from spineguide.tracking.cli.main import CliError

    with pytest.raises(CliError, match="--frame-of-reference-uid '1.02.x' is not a DICOM UID"):
        bad.func(bad, out=io.StringIO())
