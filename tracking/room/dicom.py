"""The virtual room's phantoms as synthetic DICOM planning data (CT series, RTSTRUCT, RTPLAN).

:func:`write_dicom_plan` writes what a treatment planning system would send:

- the planning CT as one file per slice, ``int16`` stored values with
  (0028,1053) Rescale Slope :data:`CT_RESCALE_SLOPE` and (0028,1052) Rescale
  Intercept :data:`CT_RESCALE_INTERCEPT` (HU rounded to 1/8 HU: the clipped
  phantom range -1024..3071 HU fits int16 exactly);
- an RT Structure Set with one ``CLOSED_PLANAR`` ROI per vertebra (the target
  vertebra typed ``CTV``, the others ``ORGAN``), one ``POINT`` ROI per
  implanted seed (typed ``MARKER``) at its centre and one ``POINT`` ROI
  ``ISO`` typed ``ISOCENTER`` at the isocentre (as TPSs write it; it is not a seed);
- an RT Plan with one setup beam whose isocentre is the phantom's isocentre,
  a patient setup with the CT's patient position and one (300A,0010) Dose
  Reference of type ``TARGET`` naming the target vertebra's ROI.

Contours come from the label mask slice by slice: the slice is upsampled 2x
(each voxel a 2x2 block) and ``cv2.findContours`` traces the block
boundaries, so every contour runs a quarter voxel inside the voxel edges of
the boundary voxels and (for holes) a quarter voxel into the bone around the
hole. Filled back with the pixel-centre rule (``spineguide.registration.dicom_rt``),
these contours give the label mask back voxel for voxel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from spineguide.registration.dicom_export import SeriesInfo, format_ds, new_instance, save
from spineguide.registration.plan import PatientStudy

from ..errors import TrackingError
from .phantoms import Phantom

__all__ = ["DicomPlanFiles", "write_dicom_plan", "label_contours_lps_mm", "CT_RESCALE_SLOPE", "CT_RESCALE_INTERCEPT"]

#: Stored value -> HU slope of the synthetic CT (1/8 HU steps, exact in binary).
CT_RESCALE_SLOPE = 0.125
#: Stored value -> HU intercept of the synthetic CT.
CT_RESCALE_INTERCEPT = -1024.0

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"


@dataclass(frozen=True, slots=True)
class DicomPlanFiles:
    """What :func:`write_dicom_plan` wrote.

    Attributes
    ----------
    out_dir : Path
    ct_files : tuple of Path
    rtstruct : Path
    rtplan : Path
    frame_of_reference_uid, study_uid, ct_series_uid : str
    patient : PatientStudy
    """

    out_dir: Path
    ct_files: tuple[Path, ...]
    rtstruct: Path
    rtplan: Path
    frame_of_reference_uid: str
    study_uid: str
    ct_series_uid: str
    patient: PatientStudy


def label_contours_lps_mm(mask_2d: np.ndarray) -> list[np.ndarray]:
    """Boundary contours of a 2D mask ``[j, i]`` as ``(N, 2)`` ``(i, j)`` voxel coordinates.

    Outer boundaries and hole boundaries alike (the even-odd rule tells them
    apart); each runs a quarter voxel inside the region it bounds.
    """
    up = np.repeat(np.repeat(mask_2d.astype(np.uint8), 2, axis=0), 2, axis=1)
    found, _ = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    # Fine pixel centre f sits at (f - 0.5) / 2 in voxel units (fine pixels 2i and 2i+1 cover voxel i).
    return [(c.reshape(-1, 2).astype(np.float64) - 0.5) / 2.0 for c in found]


def _ct_slices(phantom: Phantom, patient: PatientStudy, series: SeriesInfo, frame_uid: str, now: float, out: Path):
    ct = phantom.planning_ct
    stored = np.round((ct.hu.astype(np.float64) - CT_RESCALE_INTERCEPT) / CT_RESCALE_SLOPE)
    if stored.min() < -32768 or stored.max() > 32767:
        raise TrackingError(
            f"phantom {phantom.name!r}: HU range {float(ct.hu.min()):.0f}..{float(ct.hu.max()):.0f} does not fit "
            f"int16 at slope {CT_RESCALE_SLOPE} and intercept {CT_RESCALE_INTERCEPT}"
        )
    stored = stored.astype(np.int16)
    r, c, n = ct.direction[:, 0], ct.direction[:, 1], ct.direction[:, 2]
    files, uids = [], []
    nk, nj, ni = ct.hu.shape
    for k in range(nk):
        ds = new_instance(CT_SOP_CLASS, "CT", patient, series, instance_number=k + 1, frame_of_reference_uid=frame_uid,
                          created_unix_s=now)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = ct.patient_position.value
        ds.ImageOrientationPatient = [format_ds(x) for x in np.concatenate([r, c])]
        pos = ct.origin_lps_mm + k * ct.spacing_mm[2] * n
        ds.ImagePositionPatient = [format_ds(x) for x in pos]
        ds.SliceLocation = format_ds(pos @ n)
        ds.SliceThickness = format_ds(ct.spacing_mm[2])
        ds.PixelSpacing = [format_ds(ct.spacing_mm[1]), format_ds(ct.spacing_mm[0])]  # [row, col] spacing
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = format_ds(CT_RESCALE_SLOPE)
        ds.RescaleIntercept = format_ds(CT_RESCALE_INTERCEPT)
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        path = out / f"CT_{k:04d}.dcm"
        save(ds, path)
        files.append(path)
        uids.append(ds.SOPInstanceUID)
    return files, uids


def _rtstruct(phantom: Phantom, patient: PatientStudy, frame_uid: str, ct_series_uid: str, ct_uids: list[str],
              now: float) -> Dataset:
    ct = phantom.planning_ct
    ds = new_instance(RTSTRUCT_SOP_CLASS, "RTSTRUCT", patient, SeriesInfo.new(2, "spineguide structures"),
                      frame_of_reference_uid=frame_uid, created_unix_s=now)
    ds.OperatorsName = ""
    ds.StructureSetLabel = f"{phantom.name} spine"[:16]
    date, time_ = ds.ContentDate, ds.ContentTime
    ds.StructureSetDate, ds.StructureSetTime = date, time_
    del ds.ContentDate, ds.ContentTime
    contour_images = DicomSequence()
    for uid in ct_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CT_SOP_CLASS
        ref.ReferencedSOPInstanceUID = uid
        contour_images.append(ref)
    se = Dataset()
    se.SeriesInstanceUID = ct_series_uid
    se.ContourImageSequence = contour_images
    st = Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as PS3.3 asks
    st.ReferencedSOPInstanceUID = patient.study_instance_uid
    st.RTReferencedSeriesSequence = DicomSequence([se])
    fr = Dataset()
    fr.FrameOfReferenceUID = frame_uid
    fr.RTReferencedStudySequence = DicomSequence([st])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([fr])
    roi_seq, contour_seq, obs_seq = DicomSequence(), DicomSequence(), DicomSequence()
    labels = phantom.labels
    rng_colours = [[255, 200, 0], [0, 160, 255], [255, 80, 80], [120, 255, 120]]

    def declare(number: int, name: str, kind: str, contours: list[Dataset]) -> None:
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_seq.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = rng_colours[number % len(rng_colours)]
        rc.ContourSequence = DicomSequence(contours)
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = kind
        obs.ROIInterpreter = ""
        obs_seq.append(obs)

    number = 0
    target_number = None
    for label, name in sorted(phantom.label_names.items()):
        ks = np.nonzero((labels == label).any(axis=(1, 2)))[0]
        contours = []
        for k in ks:
            for ij in label_contours_lps_mm(labels[k] == label):
                ijk = np.column_stack([ij, np.full(len(ij), float(k))])
                c = Dataset()
                img = Dataset()
                img.ReferencedSOPClassUID = CT_SOP_CLASS
                img.ReferencedSOPInstanceUID = ct_uids[k]
                c.ContourImageSequence = DicomSequence([img])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(ij)
                c.ContourData = [format_ds(x) for x in ct.index_to_lps(ijk).ravel()]
                contours.append(c)
        if not contours:
            continue
        number += 1
        if label == phantom.target_label:
            target_number = number
        declare(number, name, "CTV" if label == phantom.target_label else "ORGAN", contours)
    for seed in phantom.seeds:
        number += 1
        c = Dataset()
        c.ContourGeometricType = "POINT"
        c.NumberOfContourPoints = 1
        c.ContourData = [format_ds(x) for x in seed.centre_lps_mm]
        declare(number, seed.name, "MARKER", [c])
    number += 1
    c = Dataset()
    c.ContourGeometricType = "POINT"
    c.NumberOfContourPoints = 1
    c.ContourData = [format_ds(x) for x in phantom.isocentre_lps_mm]
    declare(number, "ISO", "ISOCENTER", [c])
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    ds.ApprovalStatus = "UNAPPROVED"
    return ds, target_number


def _rtplan(phantom: Phantom, patient: PatientStudy, frame_uid: str, rtstruct_uid: str, now: float,
            target_roi_number: int | None) -> Dataset:
    ds = new_instance(RTPLAN_SOP_CLASS, "RTPLAN", patient, SeriesInfo.new(3, "spineguide plan"),
                      frame_of_reference_uid=frame_uid, created_unix_s=now)
    ds.OperatorsName = ""
    ds.RTPlanLabel = f"{phantom.name} SRS"[:16]
    ds.RTPlanName = f"{phantom.name} {phantom.target_name} SRS"
    ds.RTPlanDate, ds.RTPlanTime = ds.ContentDate, ds.ContentTime
    del ds.ContentDate, ds.ContentTime
    ds.RTPlanGeometry = "PATIENT"
    ref = Dataset()
    ref.ReferencedSOPClassUID = RTSTRUCT_SOP_CLASS
    ref.ReferencedSOPInstanceUID = rtstruct_uid
    ds.ReferencedStructureSetSequence = DicomSequence([ref])
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = phantom.planning_ct.patient_position.value
    ds.PatientSetupSequence = DicomSequence([setup])
    if target_roi_number is not None:
        dref = Dataset()
        dref.DoseReferenceNumber = 1
        dref.DoseReferenceUID = generate_uid()
        dref.DoseReferenceStructureType = "VOLUME"
        dref.DoseReferenceDescription = phantom.target_name
        dref.DoseReferenceType = "TARGET"
        dref.ReferencedROINumber = target_roi_number
        ds.DoseReferenceSequence = DicomSequence([dref])
    cp = Dataset()
    cp.ControlPointIndex = 0
    cp.CumulativeMetersetWeight = "0"
    cp.NominalBeamEnergy = "6"
    cp.GantryAngle = "0"
    cp.GantryRotationDirection = "NONE"
    cp.BeamLimitingDeviceAngle = "0"
    cp.BeamLimitingDeviceRotationDirection = "NONE"
    cp.PatientSupportAngle = "0"
    cp.PatientSupportRotationDirection = "NONE"
    cp.TableTopEccentricAngle = "0"
    cp.TableTopEccentricRotationDirection = "NONE"
    cp.IsocenterPosition = [format_ds(x) for x in phantom.isocentre_lps_mm]
    cp1 = Dataset()
    cp1.ControlPointIndex = 1
    cp1.CumulativeMetersetWeight = "1"
    beam = Dataset()
    beam.BeamNumber = 1
    beam.BeamName = "SETUP"
    beam.BeamType = "STATIC"
    beam.RadiationType = "PHOTON"
    beam.TreatmentMachineName = "spineguide linac"
    beam.PrimaryDosimeterUnit = "MU"
    beam.SourceAxisDistance = "1000"
    beam.TreatmentDeliveryType = "SETUP"
    beam.NumberOfWedges = 0
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    beam.FinalCumulativeMetersetWeight = "1"
    beam.ReferencedPatientSetupNumber = 1
    bld = Dataset()
    bld.RTBeamLimitingDeviceType = "ASYMX"
    bld.NumberOfLeafJawPairs = 1
    beam.BeamLimitingDeviceSequence = DicomSequence([bld])
    beam.NumberOfControlPoints = 2
    beam.ControlPointSequence = DicomSequence([cp, cp1])
    ds.BeamSequence = DicomSequence([beam])
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def write_dicom_plan(
    phantom: Phantom,
    out_dir: str | os.PathLike,
    *,
    patient_name: str = "SPINEGUIDE^PHANTOM",
    patient_id: str | None = None,
    created_unix_s: float | None = None,
) -> DicomPlanFiles:
    """Write a phantom's planning data as DICOM: CT series, RT Structure Set, RT Plan (one folder).

    Parameters
    ----------
    phantom : Phantom
        Planning CT (LPS mm), labels, seeds and isocentre (LPS mm) to write.
    out_dir : path
        Created if missing; files ``CT_NNNN.dcm``, ``RS.dcm``, ``RP.dcm``.
    patient_name, patient_id : str
        DICOM identity (default ID: ``SG-<phantom name>``).
    created_unix_s : float, optional
        Creation time written into the objects (default now).

    Returns
    -------
    DicomPlanFiles

    Raises
    ------
    TrackingError
        The CT's HU range does not fit int16 at the fixed rescale.
    """
    now = time.time() if created_unix_s is None else float(created_unix_s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patient = PatientStudy(
        patient_name=patient_name, patient_id=patient_id or f"SG-{phantom.name}", study_instance_uid=generate_uid(),
        study_id="1", study_date=time.strftime("%Y%m%d", time.gmtime(now)),
        study_time=time.strftime("%H%M%S", time.gmtime(now)),
    )
    frame_uid = generate_uid()
    ct_series = SeriesInfo.new(1, f"{phantom.name} planning CT")
    ct_files, ct_uids = _ct_slices(phantom, patient, ct_series, frame_uid, now, out)
    rs, target_number = _rtstruct(phantom, patient, frame_uid, ct_series.series_uid, ct_uids, now)
    save(rs, out / "RS.dcm")
    rp = _rtplan(phantom, patient, frame_uid, rs.SOPInstanceUID, now, target_number)
    save(rp, out / "RP.dcm")
    return DicomPlanFiles(out, tuple(ct_files), out / "RS.dcm", out / "RP.dcm", frame_uid, patient.study_instance_uid,
                          ct_series.series_uid, patient)
