"""Plans from DICOM equal plans from .mha + JSON; every mismatch between the parts is refused."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from pydicom.uid import generate_uid

from spineguide.registration.attenuation import hu_to_mu_per_mm
from spineguide.registration.drr import AttenuationVolume, compute_drr
from spineguide.registration.plan import Plan, PlanError, load_dicom_plan, load_plan_files
from spineguide.registration.points import register_points
from spineguide.registration.pose import Pose
from tests.synthetic import small_geometry, small_thoracolumbar
from spineguide.tracking.room.dicom import CT_RESCALE_SLOPE, write_dicom_plan
from spineguide.tracking.room.io import write_simulation

# Stored CT values are int16 steps of CT_RESCALE_SLOPE HU: rounding moves a voxel by at most half a step.
HU_TOL = CT_RESCALE_SLOPE / 2 + 1e-4  # + float32 representation of HU values up to 3071 (2.4e-4 / 2)
# Positions go through DICOM DS strings with 15 significant digits: ~1e-12 relative of a few 100 mm.
LPS_TOL_MM = 1e-9
# Contours run a quarter voxel inside the label boundary, far outside the fill's 1/16 px ambiguity band,
# so the rasterised mask is the label mask voxel for voxel.
DICE_MIN = 1.0
POSE_TOL = 1e-9  # identical inputs to 1e-9 mm give identical point registrations to that order


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    out = tmp_path_factory.mktemp("room")
    phantom = small_thoracolumbar()
    write_simulation(out / "files", phantom, 1, geometry=small_geometry())
    files = write_dicom_plan(phantom, out / "dicom")
    return phantom, out, files


@pytest.fixture(scope="module")
def both_plans(room):
    phantom, out, _ = room
    truth = json.loads((out / "files" / "truth.json").read_text())
    from_files = load_plan_files(
        out / "files" / "ct.mha", truth["isocentre_lps_mm"], out / "files" / "fiducials.json",
        out / "files" / "target_mask.mha",
    )
    return from_files, load_dicom_plan(out / "dicom")


def test_dicom_plan_equals_file_plan(both_plans):
    files, dicom = both_plans
    assert dicom.provenance["isocentre"] == "rtplan"
    assert dicom.patient_position is files.patient_position
    assert dicom.ct.hu.shape == files.ct.hu.shape
    assert_allclose(dicom.ct.hu, files.ct.hu, rtol=0, atol=HU_TOL)
    assert_allclose(dicom.ct.origin_lps_mm, files.ct.origin_lps_mm, rtol=0, atol=LPS_TOL_MM)
    assert_allclose(dicom.ct.spacing_mm, files.ct.spacing_mm, rtol=0, atol=LPS_TOL_MM)
    assert_allclose(dicom.ct.direction, files.ct.direction, rtol=0, atol=LPS_TOL_MM)
    assert_allclose(dicom.isocentre_lps_mm, files.isocentre_lps_mm, rtol=0, atol=LPS_TOL_MM)
    assert dicom.fiducials.names == files.fiducials.names
    assert_allclose(dicom.fiducials.positions_lps_mm, files.fiducials.positions_lps_mm, rtol=0, atol=LPS_TOL_MM)
    assert dicom.target_roi == files.target_roi == "L1"
    a, b = dicom.target_mask(), files.target_mask()
    dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert dice >= DICE_MIN
    centroid = [dicom.ct.index_to_lps(np.argwhere(m)[:, ::-1].mean(axis=0)[None])[0] for m in (a, b)]
    assert_allclose(centroid[0], centroid[1], rtol=0, atol=LPS_TOL_MM)


def test_every_vertebra_roi_is_the_label_mask(room, both_plans):
    phantom, _, _ = room
    _, dicom = both_plans
    assert set(dicom.rois) == set(phantom.label_names.values())
    for label, name in phantom.label_names.items():
        np.testing.assert_array_equal(dicom.rois[name], phantom.labels == label, err_msg=name)


def test_drr_of_both_ct_agree(both_plans):
    files, dicom = both_plans
    imager = small_geometry()["A"]
    drrs = [compute_drr(AttenuationVolume.from_ct(p.ct, p.isocentre_lps_mm), imager) for p in (files, dicom)]
    # A line integral changes by at most max|dmu/dHU| * (HU rounding) * (longest chord through the CT).
    hu = np.linspace(-1024.0, 3071.0, 4096)
    slope = float(np.max(np.abs(np.diff(hu_to_mu_per_mm(hu)) / np.diff(hu))))
    chord_mm = float(np.linalg.norm(np.array(files.ct.shape_ijk) * files.ct.spacing_mm))
    tol = slope * HU_TOL * chord_mm + 1e-5  # + float32 accumulation in the Siddon kernel
    assert_allclose(drrs[1], drrs[0], rtol=0, atol=tol)


def test_point_registration_is_the_same_for_both_plans(both_plans):
    files, dicom = both_plans
    pose = Pose.from_six([2.0, -1.5, 3.0], [1.0, -2.0, 0.5])
    measured = pose.apply(files.fiducials_room_mm())
    results = [register_points(p.fiducials_room_mm(), measured, p.fiducials.names) for p in (files, dicom)]
    assert_allclose(results[1].pose.matrix, results[0].pose.matrix, rtol=0, atol=POSE_TOL)
    assert_allclose(results[1].pose.matrix, pose.matrix, rtol=0, atol=1e-6)


def test_given_isocentre_replaces_the_plan_one(room):
    _, out, _ = room
    plan = load_dicom_plan(out / "dicom", isocentre_lps_mm=[1.0, 2.0, 3.0])
    assert plan.provenance["isocentre"] == "given"
    assert_allclose(plan.isocentre_lps_mm, [1.0, 2.0, 3.0], rtol=0, atol=0)
    assert len(plan.plan_isocentres_lps_mm) == 1


# ------------------------------------------------------------------- refusals (DICOM)
def _copy(room, tmp_path):
    import shutil

    _, out, _ = room
    shutil.copytree(out / "dicom", tmp_path / "d")
    return tmp_path / "d"


def _edit(path, fn):
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


def test_rtstruct_on_another_frame_of_reference(room, tmp_path):
    d = _copy(room, tmp_path)

    def change(ds):
        for item in ds.StructureSetROISequence:
            item.ReferencedFrameOfReferenceUID = "1.2.3.4"

    _edit(d / "RS.dcm", change)
    with pytest.raises(PlanError, match=r"RS\.dcm: RTSTRUCT refers to frame of reference 1\.2\.3\.4, but the CT's"):
        load_dicom_plan(d)


def test_rtstruct_drawn_on_another_ct(room, tmp_path):
    d = _copy(room, tmp_path)

    def change(ds):
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]\
            .SeriesInstanceUID = "1.2.3.5"

    _edit(d / "RS.dcm", change)
    with pytest.raises(PlanError, match=r"RTSTRUCT was drawn on CT series \['1\.2\.3\.5'\]"):
        load_dicom_plan(d)


def test_rtplan_on_another_frame_of_reference(room, tmp_path):
    d = _copy(room, tmp_path)
    _edit(d / "RP.dcm", lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.6"))
    with pytest.raises(PlanError, match=r"RP\.dcm: RTPLAN refers to frame of reference 1\.2\.3\.6"):
        load_dicom_plan(d)


def test_rtplan_for_another_structure_set(room, tmp_path):
    d = _copy(room, tmp_path)
    _edit(d / "RP.dcm", lambda ds: setattr(ds.ReferencedStructureSetSequence[0], "ReferencedSOPInstanceUID", "1.2.7"))
    with pytest.raises(PlanError, match=r"RTPLAN refers to structure set 1\.2\.7"):
        load_dicom_plan(d)


def test_rtplan_for_another_patient_position(room, tmp_path):
    d = _copy(room, tmp_path)
    _edit(d / "RP.dcm", lambda ds: setattr(ds.PatientSetupSequence[0], "PatientPosition", "FFS"))
    with pytest.raises(PlanError, match=r"RTPLAN patient setup says \['FFS'\], but the CT was scanned HFS"):
        load_dicom_plan(d)


def test_plan_with_two_isocentres_needs_one_given(room, tmp_path):
    d = _copy(room, tmp_path)

    def change(ds):
        beam = ds.BeamSequence[0]
        import copy

        other = copy.deepcopy(beam)
        other.BeamNumber = 2
        other.ControlPointSequence[0].IsocenterPosition = ["0", "0", "0"]
        ds.BeamSequence.append(other)

    _edit(d / "RP.dcm", change)
    with pytest.raises(PlanError, match="the plan has 2 isocentres"):
        load_dicom_plan(d)
    assert len(load_dicom_plan(d, isocentre_lps_mm=[0, 0, 0]).plan_isocentres_lps_mm) == 2


def test_no_plan_needs_an_isocentre_and_two_structure_sets_are_refused(room, tmp_path):
    phantom, _, _ = room
    d = _copy(room, tmp_path)
    (d / "RP.dcm").unlink()
    plan = load_dicom_plan(d)  # the structure set's one ISOCENTER point stands in for the plan's isocentre
    assert plan.provenance["isocentre"] == "rtstruct ISOCENTER point 'ISO'"
    assert_allclose(plan.isocentre_lps_mm, phantom.isocentre_lps_mm, rtol=0, atol=LPS_TOL_MM)
    _retype(d / "RS.dcm", "ISO", "CONTROL")
    with pytest.raises(PlanError, match="no RTPLAN to take the isocentre from"):
        load_dicom_plan(d)
    ds = pydicom.dcmread(d / "RS.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(d / "RS2.dcm", enforce_file_format=True)
    with pytest.raises(PlanError, match=r"2 RTSTRUCT objects found \(RS\.dcm, RS2\.dcm\)"):
        load_dicom_plan(d, isocentre_lps_mm=[0, 0, 0])


def test_no_ct_and_two_ct_series(room, tmp_path):
    d = _copy(room, tmp_path)
    for p in d.glob("CT_*.dcm"):
        p.unlink()
    with pytest.raises(PlanError, match="no CT series found"):
        load_dicom_plan(d)
    d2 = _copy(room, tmp_path / "two")
    _edit(d2 / "CT_0000.dcm", lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3.8"))
    with pytest.raises(PlanError, match=r"2 CT series found"):
        load_dicom_plan(d2)


def _roi_number(ds, name):
    return next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == name)


def _retype(path, name, kind):
    def change(ds):
        number = _roi_number(ds, name)
        for obs in ds.RTROIObservationsSequence:
            if obs.ReferencedROINumber == number:
                obs.RTROIInterpretedType = kind

    _edit(path, change)


def test_seeds_are_the_marker_points_and_the_isocentre_point_is_not_a_seed(room, tmp_path):
    phantom, out, _ = room
    plan = load_dicom_plan(out / "dicom")
    assert plan.fiducials.names == tuple(s.name for s in phantom.seeds)  # 'ISO' (ISOCENTER) is not among them
    assert_allclose(plan.fiducials.positions_lps_mm, [s.centre_lps_mm for s in phantom.seeds], rtol=0,
                    atol=LPS_TOL_MM)
    d = _copy(room, tmp_path)
    _retype(d / "RS.dcm", "F2", "REGISTRATION")  # a typed non-marker point is no seed either
    assert load_dicom_plan(d).fiducials.names == ("F1", "F3")
    for name in ("F1", "F2", "F3"):  # no MARKER anywhere: the untyped points are the seeds (fallback)...
        _retype(d / "RS.dcm", name, "")
    assert load_dicom_plan(d).fiducials.names == ("F1", "F2", "F3")
    _retype(d / "RS.dcm", "F3", "MARKER")  # ... but one typed MARKER switches the fallback off
    assert load_dicom_plan(d).fiducials.names == ("F3",)
    for name in ("F1", "F2", "F3"):
        _retype(d / "RS.dcm", name, "AVOIDANCE")
    assert load_dicom_plan(d).fiducials is None


def test_target_from_the_plan_dose_reference_then_roi_types_then_override(room, tmp_path):
    phantom, out, _ = room
    plan = load_dicom_plan(out / "dicom")
    assert plan.target_roi == phantom.target_name == "L1"
    assert plan.provenance["target_roi"].startswith("rtplan TARGET dose reference")
    d = _copy(room, tmp_path)
    rs = pydicom.dcmread(d / "RS.dcm")
    # The dose reference wins over the ROI types: point it at L2 (typed ORGAN) while L1 stays CTV.
    _edit(d / "RP.dcm", lambda ds: setattr(ds.DoseReferenceSequence[0], "ReferencedROINumber", _roi_number(rs, "L2")))
    assert load_dicom_plan(d).target_roi == "L2"
    assert load_dicom_plan(d, target_roi="T12").target_roi == "T12"  # the override wins over both
    _edit(d / "RP.dcm", lambda ds: setattr(ds.DoseReferenceSequence[0], "ReferencedROINumber", 99))
    with pytest.raises(PlanError, match="TARGET dose reference names ROI number 99, which the structure set"):
        load_dicom_plan(d)
    _edit(d / "RP.dcm", lambda ds: setattr(ds.DoseReferenceSequence[0], "DoseReferenceType", "ORGAN_AT_RISK"))
    got = load_dicom_plan(d)  # no TARGET dose reference: the ROI types decide (L1 is the one CTV)
    assert (got.target_roi, got.provenance["target_roi"]) == ("L1", "rtstruct type CTV")
    _retype(d / "RS.dcm", "T12", "PTV")  # a PTV outranks the CTV
    assert load_dicom_plan(d).target_roi == "T12"
    _retype(d / "RS.dcm", "L2", "PTV")
    with pytest.raises(PlanError, match=r"2 ROIs of type PTV \(\['T12', 'L2'\]|2 ROIs of type PTV \(\['L2', 'T12'\]"):
        load_dicom_plan(d)
    assert load_dicom_plan(d, target_roi="L2").provenance["target_roi"] == "given"


def test_rtstruct_or_rtplan_of_another_patient_is_refused(room, tmp_path):
    d = _copy(room, tmp_path)
    _edit(d / "RS.dcm", lambda ds: setattr(ds, "PatientID", "OTHER-1"))
    with pytest.raises(PlanError, match=r"RS\.dcm: RTSTRUCT is for patient ID 'OTHER-1', but the CT is for patient ID"):
        load_dicom_plan(d)
    d2 = _copy(room, tmp_path / "two")
    _edit(d2 / "RP.dcm", lambda ds: setattr(ds, "PatientID", "OTHER-2"))
    with pytest.raises(PlanError, match=r"RP\.dcm: RTPLAN is for patient ID 'OTHER-2'"):
        load_dicom_plan(d2)


def test_unknown_target_roi(room):
    _, out, _ = room
    with pytest.raises(PlanError, match="no contoured ROI named 'C7'"):
        load_dicom_plan(out / "dicom", target_roi="C7")
    assert load_dicom_plan(out / "dicom", target_roi="L2").target_roi == "L2"


# ------------------------------------------------------------------- refusals (files)
def test_file_plan_refusals(room, tmp_path):
    import SimpleITK as sitk

    _, out, _ = room
    f = out / "files"
    iso = [0.0, 0.0, 0.0]
    with pytest.raises(PlanError, match="mask is labelled 'L1', but roi_label 'L2' was given"):
        load_plan_files(f / "ct.mha", iso, roi_path=f / "target_mask.mha", roi_label="L2")
    with pytest.raises(PlanError, match="roi_label 'L1' given without roi_path"):
        load_plan_files(f / "ct.mha", iso, roi_label="L1")
    img = sitk.ReadImage(str(f / "target_mask.mha"))
    img.EraseMetaData("spineguide_label")
    sitk.WriteImage(img, str(tmp_path / "nolabel.mha"))
    with pytest.raises(PlanError, match="the mask carries no label; give roi_label"):
        load_plan_files(f / "ct.mha", iso, roi_path=tmp_path / "nolabel.mha")
    assert load_plan_files(f / "ct.mha", iso, roi_path=tmp_path / "nolabel.mha", roi_label="T").target_roi == "T"
    img.SetOrigin(tuple(np.array(img.GetOrigin()) + [0.5, 0, 0]))
    sitk.WriteImage(img, str(tmp_path / "shifted.mha"))
    with pytest.raises(PlanError, match=r"shifted\.mha: mask origin .* differs from the CT's"):
        load_plan_files(f / "ct.mha", iso, roi_path=tmp_path / "shifted.mha", roi_label="T")
    small = sitk.Image(3, 3, 3, sitk.sitkUInt8)
    sitk.WriteImage(small, str(tmp_path / "small.mha"))
    with pytest.raises(PlanError, match=r"small\.mha: mask grid \(3, 3, 3\)"):
        load_plan_files(f / "ct.mha", iso, roi_path=tmp_path / "small.mha", roi_label="T")


def test_plan_value_checks(both_plans):
    files, _ = both_plans
    with pytest.raises(PlanError, match=r"target ROI 'X' is not among the ROIs \['L1'\]"):
        Plan(files.ct, files.isocentre_lps_mm, rois=files.rois, target_roi="X")
    with pytest.raises(PlanError, match=r"ROI 'm' mask has shape \(2, 2, 2\)"):
        Plan(files.ct, files.isocentre_lps_mm, rois={"m": np.zeros((2, 2, 2), bool)})
    with pytest.raises(PlanError, match="plan patient position FFS differs from the CT's HFS"):
        Plan(files.ct, files.isocentre_lps_mm, patient_position="FFS")
    with pytest.raises(PlanError, match="isocentre must be three finite LPS numbers"):
        Plan(files.ct, [0.0, np.nan, 0.0])
    with pytest.raises(PlanError, match="the plan names no target ROI"):
        Plan(files.ct, files.isocentre_lps_mm).target_mask()
    assert files.rois["L1"].flags.writeable is False
