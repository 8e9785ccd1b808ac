"""Spatial Registration and RT Image export: geometry against known poses and imagers, dciodvfy, round trips."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from scipy.spatial.transform import Rotation

from spineguide.calibration.geometry import ImagerGeometry
from spineguide.registration.dicom_export import (
    DicomExportError,
    SeriesInfo,
    format_ds,
    imager_from_rt_image,
    pose_from_registration_matrix,
    read_registration_matrix,
    rt_image,
    save,
    session_matrix,
    spatial_registration,
)
from spineguide.registration.plan import Plan, load_dicom_plan
from spineguide.registration.pose import Pose
from tests.synthetic import small_frames, small_geometry, small_thoracolumbar
from spineguide.tracking.room.dicom import write_dicom_plan

# DS strings carry 15 significant digits: 1e-12 relative of ~4000 mm room distances.
GEOMETRY_TOL_MM = 1e-6
MATRIX_TOL = 1e-9
PROJECTION_TOL_PX = 1e-6
ROOM_UID = "1.2.826.0.1.3680043.8.498.1"
T0_UNIX_S = 1764070000.125


def dciodvfy_errors(path) -> list[str]:
    """Error lines of dicom3tools' validator (skip only when the tool is missing outside CI)."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (apt-get install dicom3tools) is required in CI")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def dciodvfy_findings(path) -> list[str]:
    """Error and Warning lines of dciodvfy (the issue asks for 0 errors and 0 warnings)."""
    dciodvfy_errors(path)  # skips when the tool is missing
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def dcentvfy_findings(paths) -> list[str]:
    """dcentvfy's complaints about entity consistency (patient, study, series, frame of reference) across files."""
    if shutil.which("dcentvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dcentvfy (apt-get install dicom3tools) is required in CI")
        pytest.skip("dcentvfy not installed (apt-get install dicom3tools)")
    out = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    write_dicom_plan(small_thoracolumbar(), d)
    return d


@pytest.fixture(scope="module")
def plan(plan_dir) -> Plan:
    return load_dicom_plan(plan_dir)


# ----------------------------------------------------------------- spatial registration
def test_sro_matrix_takes_planned_fiducials_to_where_the_patient_was(plan, tmp_path):
    pose = Pose.from_six([3.0, -2.0, 1.5], [1.5, -0.5, 2.0])
    ds = spatial_registration(plan, pose, room_frame_of_reference_uid=ROOM_UID, approved_unix_s=T0_UNIX_S)
    save(ds, tmp_path / "reg.dcm")
    back = pydicom.dcmread(tmp_path / "reg.dcm")
    assert back.FrameOfReferenceUID == ROOM_UID and back.Modality == "REG"
    m = read_registration_matrix(back, plan.frame_of_reference_uid)
    lps = plan.fiducials.positions_lps_mm
    session = np.c_[lps, np.ones(len(lps))] @ m.T  # treatment-day LPS: the room frame by A^T
    assert_allclose(session[:, :3], pose.apply(plan.fiducials_room_mm()) @ session_matrix(plan.patient_position).T,
                    rtol=0, atol=GEOMETRY_TOL_MM)
    back_pose = pose_from_registration_matrix(m, plan.isocentre_lps_mm, plan.patient_position)
    assert_allclose(back_pose.matrix, pose.matrix, rtol=0, atol=MATRIX_TOL)
    # The correction sent to the couch undoes the pose: composed, the patient is back at the plan.
    assert_allclose(pose.to_correction().matrix @ back_pose.matrix, np.eye(4), rtol=0, atol=MATRIX_TOL)
    assert dciodvfy_findings(tmp_path / "reg.dcm") == []


def test_sro_names_the_approver_and_holds_the_six_numbers_readably(plan, plan_dir, tmp_path):
    import re

    from spineguide.registration.dicom_export import CONTENT_DESCRIPTION_RE

    for six in (([3.0, -2.0, 1.5], [1.5, -0.5, 2.0]), ([-24.987, 24.5, -23.25], [-4.99, 4.95, -4.6]),
                ([-250.0, 999.0, -120.5], [-45.0, 30.0, -60.0])):
        pose = Pose.from_six(*six)
        ds = spatial_registration(plan, pose, room_frame_of_reference_uid=ROOM_UID, approved_unix_s=T0_UNIX_S,
                                  operator="Physicist^Rita")
        save(ds, tmp_path / "reg.dcm")
        back = pydicom.dcmread(tmp_path / "reg.dcm")
        assert str(back.ContentCreatorName) == "Physicist^Rita"
        found = re.match(CONTENT_DESCRIPTION_RE, back.ContentDescription)
        assert found is not None, back.ContentDescription
        numbers = [float(found[k]) for k in ("x", "y", "z", "pitch", "roll", "yaw")]
        corr = pose.to_correction()
        want = [*corr.translation_mm, *corr.rotation_deg]
        # 0.01 resolution, or coarser only when 64 characters cannot hold it (the third case: 0.1).
        step = 10.0 ** -min(len(t.split(".")[1]) if "." in t else 0 for t in found.groups())
        assert_allclose(numbers, want, rtol=0, atol=step / 2 + 1e-9)
        assert dciodvfy_findings(tmp_path / "reg.dcm") == []
    assert step == 0.1  # the large case really dropped precision rather than cutting
    assert dcentvfy_findings([*sorted(plan_dir.glob("*.dcm")), tmp_path / "reg.dcm"]) == []


def test_sro_refusals(plan):
    bare = Plan(plan.ct, plan.isocentre_lps_mm)
    with pytest.raises(DicomExportError, match="a Spatial Registration can only be exported for a DICOM plan"):
        spatial_registration(bare, Pose.identity(), room_frame_of_reference_uid=ROOM_UID, approved_unix_s=T0_UNIX_S)
    ds = spatial_registration(plan, Pose.identity(), room_frame_of_reference_uid=ROOM_UID, approved_unix_s=T0_UNIX_S)
    with pytest.raises(DicomExportError, match="no registration of frame of reference 1.2.3"):
        read_registration_matrix(ds, "1.2.3")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(DicomExportError, match="not a Spatial Registration object"):
        read_registration_matrix(ds, plan.frame_of_reference_uid)


# ------------------------------------------------------------------------- RT Image
def _rotated(imager: ImagerGeometry, rot: Rotation, mirror: bool = False) -> ImagerGeometry:
    """The panel turned by ``rot`` about its centre (optionally with its columns reversed)."""
    centre = imager.origin_mm + (imager.cols - 1) / 2 * imager.pixel_spacing_mm[1] * imager.col_direction \
        + (imager.rows - 1) / 2 * imager.pixel_spacing_mm[0] * imager.row_direction
    u, v = rot.apply(np.array(imager.col_direction)), rot.apply(np.array(imager.row_direction))
    if mirror:
        u = -u
    origin = centre - (imager.cols - 1) / 2 * imager.pixel_spacing_mm[1] * u \
        - (imager.rows - 1) / 2 * imager.pixel_spacing_mm[0] * v
    return ImagerGeometry(imager.name, imager.source_mm, origin, u, v, imager.pixel_spacing_mm, imager.rows, imager.cols)


def _cases():
    g = small_geometry()
    a, b = g["A"], g["B"]
    in_plane = Rotation.from_rotvec(np.deg2rad(17.0) * a.normal)
    tilt = Rotation.from_rotvec(np.deg2rad(4.0) * a.row_direction)
    shifted = ImagerGeometry("S", b.source_mm + [0.0, 35.0, 0.0], b.origin_mm + [2.0, -3.0, 1.0], b.col_direction,
                             b.row_direction, b.pixel_spacing_mm, b.rows, b.cols)
    return [(a, "NORMAL"), (b, "NORMAL"), (_rotated(a, in_plane), "NORMAL"), (_rotated(a, tilt), "NON_NORMAL"),
            (_rotated(b, Rotation.identity(), mirror=True), "NON_NORMAL"), (shifted, "NON_NORMAL")]


@pytest.mark.parametrize(("imager", "plane"), _cases())
def test_rt_image_geometry_rebuilds_the_imager(plan, tmp_path, imager, plane):
    frame = np.random.default_rng(3).integers(0, 60000, size=(imager.rows, imager.cols), dtype=np.uint16)
    ds = rt_image(frame, imager, plan.patient, acquired_unix_s=T0_UNIX_S, i0=20000.0, series=SeriesInfo.new(4),
                  room_frame_of_reference_uid=ROOM_UID, pair_id=7)
    save(ds, tmp_path / "rti.dcm")
    back = pydicom.dcmread(tmp_path / "rti.dcm")
    assert back.RTImagePlane == plane
    rebuilt = imager_from_rt_image(back)
    for field in ("source_mm", "origin_mm", "col_direction", "row_direction", "pixel_spacing_mm"):
        assert_allclose(getattr(rebuilt, field), getattr(imager, field), rtol=0, atol=GEOMETRY_TOL_MM, err_msg=field)
    pts = np.random.default_rng(0).uniform(-100, 100, size=(20, 3))
    assert_allclose(rebuilt.project(pts), imager.project(pts), rtol=0, atol=PROJECTION_TOL_PX)
    np.testing.assert_array_equal(back.pixel_array, frame)
    assert "pair_id=7" in back.ImageComments and "i0=20000" in back.ImageComments
    assert dciodvfy_findings(tmp_path / "rti.dcm") == []


def test_default_room_angles_and_distances(plan):
    g = small_geometry()
    frames = small_frames()
    for name, gantry in (("A", 315.0), ("B", 45.0)):
        ds = rt_image(frames.frames[name], g[name], plan.patient, acquired_unix_s=T0_UNIX_S, i0=frames.truth.i0,
                      series=SeriesInfo.new(4))
        assert_allclose(float(ds.GantryAngle), gantry, rtol=0, atol=1e-9)
        assert_allclose(float(ds.RadiationMachineSAD), 2200.0, rtol=0, atol=GEOMETRY_TOL_MM)
        assert_allclose(float(ds.RTImageSID), 3600.0, rtol=0, atol=GEOMETRY_TOL_MM)
        # Panel centred on the axis: the first pixel sits half a panel left and up in the BEV frame.
        half = (g[name].cols - 1) / 2 * g[name].pixel_spacing_mm[1]
        assert_allclose(np.abs([float(x) for x in ds.RTImagePosition]), [half, half], rtol=0, atol=GEOMETRY_TOL_MM)


def test_float_frames_are_quantised_within_half_a_step(plan):
    g = small_geometry()["A"]
    frame = np.random.default_rng(1).uniform(0, 30000, size=(g.rows, g.cols)).astype(np.float32)
    ds = rt_image(frame, g, plan.patient, acquired_unix_s=T0_UNIX_S, i0=30000.0, series=SeriesInfo.new(4))
    slope = float(ds.RescaleSlope)
    assert_allclose(ds.pixel_array * slope, frame, rtol=0, atol=slope / 2 + 1e-3)


def test_rt_image_refusals(plan):
    g = small_geometry()["A"]
    good = np.zeros((g.rows, g.cols), np.uint16)
    kw = dict(acquired_unix_s=T0_UNIX_S, series=SeriesInfo.new(4))
    with pytest.raises(DicomExportError, match=r"imager 'A': frame is \(3, 3\), the panel is 128x128"):
        rt_image(np.zeros((3, 3), np.uint16), g, plan.patient, i0=1.0, **kw)
    with pytest.raises(DicomExportError, match="i0 must be a positive number"):
        rt_image(good, g, plan.patient, i0=0.0, **kw)
    with pytest.raises(DicomExportError, match="frame dtype int32 is not uint16 or float32"):
        rt_image(good.astype(np.int32), g, plan.patient, i0=1.0, **kw)
    with pytest.raises(DicomExportError, match="non-finite or negative"):
        rt_image(good.astype(np.float32) - 1, g, plan.patient, i0=1.0, **kw)
    with pytest.raises(DicomExportError, match="RT Image lacks a geometry attribute"):
        imager_from_rt_image(pydicom.Dataset())


def test_format_ds_fits_sixteen_characters():
    for v in (-1555.63491861040, 1e-20, 123456789.123456789, -0.000123456789123, 3600.0):
        text = format_ds(v)
        assert len(text) <= 16
        # 16 characters hold at least 10 significant digits even for small negative numbers.
        assert_allclose(float(text), v, rtol=1e-9, atol=0)
    with pytest.raises(DicomExportError, match="non-finite"):
        format_ds(float("nan"))
