"""DICOM out: Spatial Registration objects for approved setups, RT Images for kV frames.

Spatial Registration (PS3.3 A.39, C.20.2)
-----------------------------------------
Both frames are DICOM *patient* frames (LPS mm), so any reader (TPS, PACS
fusion, record-and-verify) interprets the matrix as it interprets a CBCT to
CT registration:

- the object's own (0020,0052) Frame of Reference UID (the *registered*
  frame) is this treatment session's **treatment-day patient frame**: DICOM
  patient coordinates (LPS, mm) of a patient lying in the plan's nominal
  patient position on the couch, origin at the machine isocentre. It is the
  room frame (CONVENTIONS "Room frame") with its axes renamed by the plan's
  patient position: ``s = A^T X_room``, ``A`` the CT-to-room rotation of the
  CONVENTIONS table (HFS: ``s = (X, -Z, Y)``). The session's RT Images carry
  the same Frame of Reference UID;
- its first (0070,0308) Registration Sequence item names the planning CT's
  Frame of Reference and holds, in (3006,00C6) Frame of Reference
  Transformation Matrix (type ``RIGID``, 16 values row-major), the 4x4
  matrix ``M`` that maps a point of the planning CT (LPS mm, ``(x, y, z,
  1)``) to where that point of the patient *was* when the setup was
  approved, in the treatment-day frame (PS3.3 C.20.2: "transforms
  coordinates in the referenced frame into the registered frame")::

      M = [[A^T R A, A^T (t - R A iso)], [0, 0, 0, 1]]

  with ``iso`` the plan isocentre (LPS mm) and ``P = (R, t)`` the measured
  patient pose (CONVENTIONS: ``p_actual = R p_planned + t``, room frame). At
  perfect setup ``M`` is a pure translation taking the isocentre to the
  origin; its rotation part is the patient's rotation expressed in LPS axes
  (same angle as ``R``);
- a second item names the object's own frame with the identity matrix (as
  TPS registration objects do).

The couch correction that was applied is ``C = P^-1``;
:func:`pose_from_registration_matrix` recovers ``P`` (and so ``C``) exactly
from the matrix. The six IEC 61217 numbers of the correction are also in
(0070,0081) Content Description, readable and complete, in the fixed
grammar :data:`CONTENT_DESCRIPTION_RE` (``couch corr mm X-1.00 Y+2.50
Z+0.30 deg P+0.10 R-0.20 Yw+1.50``: translation mm, pitch/roll/yaw deg,
0.01 resolution; an LO holds 64 characters, so precision drops to 0.1 or 1
before anything would be cut, and nothing is ever cut). No private
attributes (validators warn on them). The approver is (0070,0084) Content
Creator's Name.

RT Image (PS3.3 A.17, C.8.8.2)
------------------------------
A room-mounted kV imager is described as a beam from its source through the
isocentre. With ``s = S / |S|`` the unit vector from the isocentre to the
source ``S`` (room mm):

- (300A,011E) Gantry Angle ``theta = atan2(s_x, s_z)`` in [0, 360) (IEC 61217:
  0 = source above, 90 = source at +X) and (300A,014A) Gantry Pitch Angle
  ``phi = asin(s_y)`` (spineguide's definition: positive = source tilted
  towards +Y), so ``s = (cos phi sin theta, sin phi, cos phi cos theta)``.
  Gantry axes: ``Z_g = s``, ``X_g = unit(Y_f x s)``, ``Y_g = Z_g x X_g``.
- (3002,0022) Radiation Machine SAD ``= |S|``; (3002,0026) RT Image SID = the
  distance from the source to the panel plane along the central axis.
- (3002,000C) RT Image Plane ``NORMAL`` when the panel is perpendicular to the
  central axis (within :data:`NORMAL_TOL_DEG`) and not mirrored: then the
  image axes are the IEC X-ray image receptor axes rotated by (3002,000E)
  X-Ray Image Receptor Angle ``psi``: column direction ``cos psi X_g + sin
  psi Y_g``, row direction ``sin psi X_g - cos psi Y_g`` (at ``psi = 0`` the
  beam's-eye view: x right, y up, rows running down). Otherwise
  ``NON_NORMAL`` with (3002,0010) RT Image Orientation = the column and row
  directions in gantry axes.
- (3002,0012) RT Image Position = the first pixel's centre ``O`` relative to
  the central axis' intersection with the panel ``C``: ``((O - C).u,
  -(O - C).v)`` mm; (3002,0011) Image Plane Pixel Spacing = ``(row, col)``
  spacing on the panel, mm.

:func:`imager_from_rt_image` rebuilds the :class:`ImagerGeometry` from these
attributes (the round trip is tested to 1e-6 mm).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from spineguide.calibration.foundation import checked_number
from spineguide.calibration.geometry import ImagerGeometry

from .errors import DicomExportError
from .plan import PatientStudy, Plan
from .pose import Pose
from .volume import PatientPosition, room_from_lps_matrix

__all__ = [
    "DicomExportError",
    "SPATIAL_REGISTRATION_SOP_CLASS",
    "RT_IMAGE_SOP_CLASS",
    "NORMAL_TOL_DEG",
    "format_ds",
    "new_instance",
    "registration_matrix",
    "pose_from_registration_matrix",
    "spatial_registration",
    "read_registration_matrix",
    "rt_image",
    "imager_from_rt_image",
    "SeriesInfo",
    "save",
    "CONTENT_DESCRIPTION_RE",
    "session_matrix",
    "series_number_for",
]

SPATIAL_REGISTRATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"
RT_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"
#: VOI LUT data of RT Images: 65536 descending 16-bit entries, ``65535 - v`` (bone bright).
_INVERTING_LUT = (65535 - np.arange(65536, dtype=np.uint32)).astype("<u2").tobytes()
RT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.1"
#: Panel normal within this angle of the central axis -> RT Image Plane NORMAL, degrees.
NORMAL_TOL_DEG = 1e-3
#: Grammar of an SRO's (0070,0081) Content Description: the couch correction's six IEC 61217 numbers.
CONTENT_DESCRIPTION_RE = (
    r"^couch corr mm X(?P<x>[-+]\d+(?:\.\d+)?) Y(?P<y>[-+]\d+(?:\.\d+)?) Z(?P<z>[-+]\d+(?:\.\d+)?) "
    r"deg P(?P<pitch>[-+]\d+(?:\.\d+)?) R(?P<roll>[-+]\d+(?:\.\d+)?) Yw(?P<yaw>[-+]\d+(?:\.\d+)?)$"
)
_MANUFACTURER = "spineguide"
_MODEL = "spineguide stereo kV guidance"
_SOFTWARE = "spineguide 0.1.0"


def format_ds(value: float) -> str:
    """A number as a DICOM Decimal String (at most 16 characters, as many digits as fit)."""
    v = float(value)
    if not math.isfinite(v):
        raise DicomExportError(f"cannot write a non-finite number ({v}) as a DICOM DS")
    if v == 0.0:
        return "0"
    for digits in range(15, 4, -1):
        # Fixed notation wastes characters on leading zeros of small numbers: try the exponent form too.
        for text in (f"{v:.{digits}g}", f"{v:.{digits - 1}e}"):
            if len(text) <= 16:
                return text
    raise DicomExportError(f"cannot fit {v!r} into a 16-character DICOM DS")  # pragma: no cover


def _ds_list(values) -> list[str]:
    return [format_ds(v) for v in np.ravel(values)]


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """Series an exported object belongs to: UID, number, description."""

    series_uid: str
    series_number: int = 1
    description: str = ""

    @classmethod
    def new(cls, series_number: int = 1, description: str = "") -> "SeriesInfo":
        return cls(generate_uid(), series_number, description)


def _local(unix_s: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(float(unix_s), tz=_dt.timezone.utc).astimezone()


def _date_time(unix_s: float) -> tuple[str, str]:
    """DA and TM of ``unix_s`` in the host's local time (the offset goes in (0008,0201))."""
    t = _local(unix_s)
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S.%f")


def _utc_offset(unix_s: float) -> str:
    """(0008,0201) Timezone Offset From UTC of the local time at ``unix_s``, ``+HHMM``/``-HHMM``."""
    return _local(unix_s).strftime("%z")


def new_instance(
    sop_class_uid: str,
    modality: str,
    patient: PatientStudy,
    series: SeriesInfo,
    *,
    instance_number: int = 1,
    frame_of_reference_uid: str | None = None,
    created_unix_s: float,
) -> Dataset:
    """A new DICOM instance with file meta, SOP Common, Patient, General Study, Series and Equipment modules.

    ``created_unix_s`` (wall clock, seconds since the epoch) gives the
    creation and content date/time, written in the host's local time with
    its (0008,0201) Timezone Offset From UTC.
    """
    if not isinstance(patient, PatientStudy):
        raise DicomExportError(f"expected the patient's PatientStudy identity, got {type(patient).__name__}")
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    date, time_ = _date_time(created_unix_s)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.TimezoneOffsetFromUTC = _utc_offset(created_unix_s)
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.patient_birth_date
    ds.PatientSex = patient.patient_sex
    ds.StudyInstanceUID = patient.study_instance_uid
    ds.StudyDate = patient.study_date
    ds.StudyTime = patient.study_time
    ds.ReferringPhysicianName = patient.referring_physician_name
    ds.StudyID = patient.study_id
    ds.AccessionNumber = patient.accession_number
    ds.Modality = modality
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = int(series.series_number)
    if modality in ("CT", "REG"):
        # (0018,0015): the spine is unpaired, so (0020,0060) Laterality (type 2C) is left out.
        ds.BodyPartExamined = "SPINE"
    if series.description:
        ds.SeriesDescription = series.description
    if frame_of_reference_uid is not None:
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = _MODEL
    ds.SoftwareVersions = _SOFTWARE
    ds.InstanceNumber = int(instance_number)
    ds.ContentDate, ds.ContentTime = date, time_
    return ds


# ------------------------------------------------------------------ spatial registration
def session_matrix(patient_position: PatientPosition | str) -> np.ndarray:
    """3x3 rotation taking room-frame vectors (IEC 61217, mm) to the treatment-day patient frame (LPS, mm): ``A^T``."""
    return room_from_lps_matrix(patient_position).T


def registration_matrix(pose: Pose, isocentre_lps_mm: Sequence[float], patient_position: PatientPosition | str) -> np.ndarray:
    """4x4 planning-CT LPS (mm) -> treatment-day patient frame LPS (mm, origin machine isocentre) for a patient at ``pose``.

    See the module docstring: ``M = [[A^T R A, A^T (t - R A iso)], [0, 0, 0, 1]]``.
    """
    a = room_from_lps_matrix(patient_position)
    iso = np.asarray(isocentre_lps_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a.T @ pose.rotation @ a
    m[:3, 3] = a.T @ (pose.translation_mm - pose.rotation @ a @ iso)
    return m


def pose_from_registration_matrix(
    matrix: np.ndarray, isocentre_lps_mm: Sequence[float], patient_position: PatientPosition | str
) -> Pose:
    """Inverse of :func:`registration_matrix`: the patient pose (room frame, CONVENTIONS) an SRO's matrix records."""
    m = np.asarray(matrix, dtype=np.float64).reshape(4, 4)
    a = room_from_lps_matrix(patient_position)
    r = a @ m[:3, :3] @ a.T
    t = a @ m[:3, 3] + r @ a @ np.asarray(isocentre_lps_mm, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r, t
    return Pose.from_matrix(out)


def series_number_for(created_unix_s: float, kind: int) -> int:
    """A (0020,0011) Series Number unique per second of creation and ``kind`` (0-9).

    ``(int(created_unix_s) mod 10^8) * 10 + kind`` (at most 999 999 999, an
    IS); exported series never clash with each other when their sessions or
    exports start in different seconds, and stay clear of the small numbers
    scanners and TPSs give planning series.
    """
    if not 0 <= int(kind) <= 9:
        raise DicomExportError(f"series kind must be 0-9, got {kind!r}")
    return (int(created_unix_s) % 100_000_000) * 10 + int(kind)


def _six_text(corr: Pose) -> str:
    """The correction's six numbers in at most 64 characters (LO), precision dropped before anything is cut."""
    for digits in (2, 1, 0):
        t = " ".join(f"{k}{v:+.{digits}f}" for k, v in zip("XYZ", corr.translation_mm))
        r = " ".join(f"{k}{v:+.{digits}f}" for k, v in zip(("P", "R", "Yw"), corr.rotation_deg))
        text = f"couch corr mm {t} deg {r}"
        if len(text) <= 64:
            return text
    raise DicomExportError(f"the couch correction {corr} does not fit 64 characters even in whole units")


def spatial_registration(
    plan: Plan,
    pose: Pose,
    *,
    room_frame_of_reference_uid: str,
    approved_unix_s: float,
    operator: str = "",
    series: SeriesInfo | None = None,
    instance_number: int = 1,
    label: str = "SETUP",
) -> Dataset:
    """Spatial Registration object for one approved setup (planning CT frame -> treatment room).

    Parameters
    ----------
    plan : Plan
        Must carry its DICOM identity (``patient``) and the planning CT's
        ``frame_of_reference_uid`` (plans from :func:`load_dicom_plan` do).
    pose : Pose
        The measured patient pose at approval (room frame, CONVENTIONS); the
        correction sent to the couch is ``pose.to_correction()``.
    room_frame_of_reference_uid : str
        Frame of Reference UID of this treatment session's treatment-day
        patient frame (module docstring; the session's RT Images share it).
    approved_unix_s : float
        Wall-clock time of the approval (content date/time, local time with
        (0008,0201) Timezone Offset From UTC).
    operator : str
        Who approved (Content Creator's Name).
    series : SeriesInfo, optional
        Default: a new series numbered :func:`series_number_for` (kind 0).

    Returns
    -------
    pydicom Dataset
        Ready for ``save_as(path, enforce_file_format=True)`` or C-STORE.

    Raises
    ------
    DicomExportError
        The plan lacks a DICOM identity or frame of reference.
    """
    if plan.patient is None or plan.frame_of_reference_uid is None:
        raise DicomExportError(
            f"{plan.ct.source}: the plan has no DICOM patient identity / planning frame of reference; "
            "a Spatial Registration can only be exported for a DICOM plan"
        )
    if not isinstance(pose, Pose):
        raise DicomExportError(f"expected the measured patient Pose, got {type(pose).__name__}")
    if series is None:
        series = SeriesInfo.new(series_number_for(approved_unix_s, 0), "spineguide setup registrations")
    ds = new_instance(
        SPATIAL_REGISTRATION_SOP_CLASS, "REG", plan.patient, series, instance_number=instance_number,
        frame_of_reference_uid=room_frame_of_reference_uid, created_unix_s=approved_unix_s,
    )
    ds.DeviceSerialNumber = "0"
    ds.ContentLabel = label
    corr = pose.to_correction()
    ds.ContentDescription = _six_text(corr)
    ds.ContentCreatorName = operator
    m = registration_matrix(pose, plan.isocentre_lps_mm, plan.patient_position)

    def item(frame_uid: str, matrix: np.ndarray, comment: str) -> Dataset:
        matrix_item = Dataset()
        matrix_item.FrameOfReferenceTransformationMatrixType = "RIGID"
        matrix_item.FrameOfReferenceTransformationMatrix = _ds_list(matrix)
        reg_item = Dataset()
        reg_item.FrameOfReferenceTransformationComment = comment
        reg_item.RegistrationTypeCodeSequence = DicomSequence([])
        reg_item.MatrixSequence = DicomSequence([matrix_item])
        out = Dataset()
        out.FrameOfReferenceUID = frame_uid
        out.MatrixRegistrationSequence = DicomSequence([reg_item])
        return out

    ds.RegistrationSequence = DicomSequence([
        item(plan.frame_of_reference_uid, m, "planning CT LPS -> treatment-day LPS at isocentre, as found"),
        item(room_frame_of_reference_uid, np.eye(4), "treatment-day patient frame (identity)"),
    ])
    return ds


def read_registration_matrix(ds: Dataset, source_frame_of_reference_uid: str) -> np.ndarray:
    """The 4x4 matrix an SRO holds for ``source_frame_of_reference_uid`` (into the SRO's own frame).

    Raises
    ------
    DicomExportError
        Not a Spatial Registration, or no rigid matrix for that frame.
    """
    if str(ds.get("SOPClassUID", "")) != SPATIAL_REGISTRATION_SOP_CLASS:
        raise DicomExportError(f"not a Spatial Registration object (SOP Class {ds.get('SOPClassUID', '')})")
    for item in ds.get("RegistrationSequence", []):
        if str(item.get("FrameOfReferenceUID", "")) != source_frame_of_reference_uid:
            continue
        m = np.eye(4)
        for reg in item.get("MatrixRegistrationSequence", []):
            for mat in reg.get("MatrixSequence", []):
                if str(mat.get("FrameOfReferenceTransformationMatrixType", "")) != "RIGID":
                    raise DicomExportError(
                        f"registration of {source_frame_of_reference_uid} is "
                        f"{mat.get('FrameOfReferenceTransformationMatrixType')!r}, expected RIGID"
                    )
                # Several matrices in one item apply in order: the later one left-multiplies.
                m = np.array([float(v) for v in mat.FrameOfReferenceTransformationMatrix]).reshape(4, 4) @ m
        return m
    raise DicomExportError(f"no registration of frame of reference {source_frame_of_reference_uid} in the object")


# ------------------------------------------------------------------------------ RT Image
@dataclass(frozen=True, slots=True)
class _BeamAxes:
    gantry_deg: float
    pitch_deg: float
    x_g: np.ndarray
    y_g: np.ndarray
    z_g: np.ndarray


def _beam_axes(source_mm: np.ndarray, where: str) -> _BeamAxes:
    sad = float(np.linalg.norm(source_mm))
    if sad < 1.0:
        raise DicomExportError(f"{where}: the source is at the isocentre; no beam axis")
    s = source_mm / sad
    x_g = np.cross([0.0, 1.0, 0.0], s)
    if np.linalg.norm(x_g) < 1e-6:
        raise DicomExportError(f"{where}: the source lies on the room Y axis; the gantry angle is undefined")
    x_g /= np.linalg.norm(x_g)
    y_g = np.cross(s, x_g)
    gantry = math.degrees(math.atan2(s[0], s[2])) % 360.0
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, float(s[1])))))
    return _BeamAxes(gantry, pitch, x_g, y_g, s)


def _axes_from_angles(gantry_deg: float, pitch_deg: float) -> _BeamAxes:
    th, ph = math.radians(gantry_deg), math.radians(pitch_deg)
    s = np.array([math.cos(ph) * math.sin(th), math.sin(ph), math.cos(ph) * math.cos(th)])
    return _beam_axes(s, "RT Image")


def _pixels(frame: np.ndarray, imager: ImagerGeometry) -> tuple[np.ndarray, float, float]:
    """uint16 stored pixels, slope and intercept for a raw frame (uint16 as is, float32 quantised)."""
    a = np.asarray(frame)
    if a.shape != (imager.rows, imager.cols):
        raise DicomExportError(
            f"imager '{imager.name}': frame is {a.shape}, the panel is {imager.rows}x{imager.cols} (rows x cols)"
        )
    if a.dtype == np.uint16:
        return np.ascontiguousarray(a), 1.0, 0.0
    if a.dtype not in (np.float32, np.float64):
        raise DicomExportError(f"imager '{imager.name}': frame dtype {a.dtype} is not uint16 or float32")
    if not np.all(np.isfinite(a)) or a.min() < 0:
        raise DicomExportError(f"imager '{imager.name}': frame has non-finite or negative values")
    top = float(a.max())
    slope = top / 65535.0 if top > 0 else 1.0
    return np.round(a.astype(np.float64) / slope).astype(np.uint16), slope, 0.0


def rt_image(
    frame: np.ndarray,
    imager: ImagerGeometry,
    patient: PatientStudy,
    *,
    acquired_unix_s: float,
    i0: float,
    series: SeriesInfo,
    instance_number: int = 1,
    room_frame_of_reference_uid: str | None = None,
    machine_name: str = "spineguide kV",
    pair_id: int | None = None,
    referenced_rtplan_uid: str | None = None,
    referenced_beam_number: int | None = None,
) -> Dataset:
    """An RT Image object for one raw kV frame with its imager geometry (module docstring).

    Parameters
    ----------
    frame : (rows, cols) uint16 or float32 array
        Raw detector signal ``image[row, col]`` (CONVENTIONS). uint16 is
        stored as is; float32 is quantised to uint16 with (0028,1053)
        Rescale Slope ``max / 65535`` (error <= slope / 2).
    imager : ImagerGeometry
        Geometry of the imager that took the frame (room frame, mm).
    patient : PatientStudy
    acquired_unix_s : float
        Acquisition wall-clock time (local date/time with the UTC offset in the object).
    i0 : float
        Unattenuated signal of the frame (stored in Image Comments).
    series : SeriesInfo
        One series per session and imager is the usual choice.
    room_frame_of_reference_uid : str, optional
        The session's treatment-day patient frame (as in its Spatial Registrations).
    pair_id : int, optional
        Stereo pair number (in Image Comments).
    referenced_rtplan_uid : str, optional
        SOP Instance UID of the RT Plan the image was taken for (Referenced RT Plan Sequence).
    referenced_beam_number : int, optional
        The plan's beam (its setup beam) the image belongs to.

    Raises
    ------
    DicomExportError
        Frame of the wrong size or type, degenerate geometry.
    """
    where = f"imager '{imager.name}'"
    checked_number(i0, DicomExportError, f"{where}: i0 must be a positive number, got {i0!r}", minimum=0.0,
                   exclusive_minimum=True)
    stored, slope, intercept = _pixels(frame, imager)
    axes = _beam_axes(imager.source_mm, where)
    n = imager.normal
    u, v = imager.col_direction, imager.row_direction
    cos_n = float(-n @ axes.z_g)
    if cos_n < 1e-3:
        raise DicomExportError(f"{where}: the panel does not face the source along the central axis")
    sid = float((imager.origin_mm - imager.source_mm) @ n) / cos_n
    c = imager.source_mm - sid * axes.z_g  # central axis meets the panel plane
    ds = new_instance(
        RT_IMAGE_SOP_CLASS, "RTIMAGE", patient, series, instance_number=instance_number,
        frame_of_reference_uid=room_frame_of_reference_uid, created_unix_s=acquired_unix_s,
    )
    ds.OperatorsName = ""
    date, time_ = _date_time(acquired_unix_s)
    ds.AcquisitionDate, ds.AcquisitionTime = date, time_
    ds.AcquisitionDateTime = date + time_ + _utc_offset(acquired_unix_s)
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RADIOGRAPH"]
    ds.RTImageLabel = f"kV {imager.name}"[:16]
    ds.RTImageDescription = f"spineguide raw kV frame, imager {imager.name}"
    ds.ConversionType = "DI"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.Rows, ds.Columns = imager.rows, imager.cols
    ds.RescaleSlope = format_ds(slope)
    ds.RescaleIntercept = format_ds(intercept)
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    voi = Dataset()
    voi.LUTDescriptor = [0, 0, 16]  # 0 entries = 65536, first input 0, 16-bit output
    voi.LUTExplanation = "inverted: low signal (bone) bright"
    voi.LUTData = _INVERTING_LUT
    voi["LUTData"].VR = "OW"
    ds.VOILUTSequence = DicomSequence([voi])
    comments = f"i0={float(i0):g}; imager={imager.name}"
    if pair_id is not None:
        comments += f"; pair_id={int(pair_id)}"
    ds.ImageComments = comments
    if referenced_rtplan_uid is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_PLAN_SOP_CLASS
        ref.ReferencedSOPInstanceUID = referenced_rtplan_uid
        ds.ReferencedRTPlanSequence = DicomSequence([ref])
        if referenced_beam_number is not None:
            ds.ReferencedBeamNumber = int(referenced_beam_number)
    ds.RadiationMachineName = machine_name
    ds.PrimaryDosimeterUnit = "MINUTE"
    ds.RadiationMachineSAD = format_ds(imager.source_to_isocentre_mm)
    ds.RTImageSID = format_ds(sid)
    ds.GantryAngle = format_ds(axes.gantry_deg)
    ds.GantryPitchAngle = float(axes.pitch_deg)
    ds.BeamLimitingDeviceAngle = "0"
    ds.PatientSupportAngle = "0"
    ds.ImagePlanePixelSpacing = _ds_list(imager.pixel_spacing_mm)
    # In-plane frame: psi from the column direction; NORMAL needs the panel square to the axis and unmirrored.
    psi = math.degrees(math.atan2(float(u @ axes.y_g), float(u @ axes.x_g))) % 360.0
    pr = math.radians(psi)
    v_normal = math.sin(pr) * axes.x_g - math.cos(pr) * axes.y_g
    normal = math.degrees(math.acos(min(1.0, cos_n))) <= NORMAL_TOL_DEG and float(v @ v_normal) > 1.0 - 1e-9
    if normal:
        ds.RTImagePlane = "NORMAL"
        ds.XRayImageReceptorAngle = format_ds(psi)
    else:
        ds.RTImagePlane = "NON_NORMAL"
        ds.XRayImageReceptorAngle = "0"
        g = np.vstack([axes.x_g, axes.y_g, axes.z_g])
        ds.RTImageOrientation = _ds_list(np.concatenate([g @ u, g @ v]))
    rel = imager.origin_mm - c
    ds.RTImagePosition = _ds_list([rel @ u, -(rel @ v)])
    ds.XRayImageReceptorTranslation = _ds_list([0.0, 0.0, imager.source_to_isocentre_mm - sid])
    ds.PixelData = stored.tobytes()
    return ds


def imager_from_rt_image(ds: Dataset, name: str | None = None) -> ImagerGeometry:
    """Rebuild an :class:`ImagerGeometry` (room frame, mm) from an RT Image's geometry attributes.

    Raises
    ------
    DicomExportError
        A geometry attribute is missing.
    """
    try:
        gantry = float(ds.GantryAngle)
        pitch = float(ds.get("GantryPitchAngle", 0.0) or 0.0)
        sad = float(ds.RadiationMachineSAD)
        sid = float(ds.RTImageSID)
        row_sp, col_sp = (float(x) for x in ds.ImagePlanePixelSpacing)
        x0, y0 = (float(x) for x in ds.RTImagePosition)
        plane = str(ds.RTImagePlane)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as err:
        raise DicomExportError(f"RT Image lacks a geometry attribute: {err}") from err
    axes = _axes_from_angles(gantry, pitch)
    source = sad * axes.z_g
    if plane == "NORMAL":
        psi = math.radians(float(ds.XRayImageReceptorAngle))
        u = math.cos(psi) * axes.x_g + math.sin(psi) * axes.y_g
        v = math.sin(psi) * axes.x_g - math.cos(psi) * axes.y_g
    else:
        o = np.array([float(x) for x in ds.RTImageOrientation])
        g = np.column_stack([axes.x_g, axes.y_g, axes.z_g])
        u, v = g @ o[:3], g @ o[3:]
    c = source - sid * axes.z_g
    shift = ds.get("XRayImageReceptorTranslation")
    if shift not in (None, ""):
        try:
            tx, ty = float(shift[0]), float(shift[1])
        except (TypeError, ValueError, IndexError) as err:
            raise DicomExportError(f"RT Image: X-Ray Image Receptor Translation is not 3 numbers: {err}") from err
        c = c + tx * axes.x_g + ty * axes.y_g  # the receptor origin moved off the central axis
    origin = c + x0 * u - y0 * v
    label = name if name is not None else str(ds.get("RTImageLabel", "kV")).removeprefix("kV ").strip() or "kV"
    return ImagerGeometry(label, source, origin, u, v, (row_sp, col_sp), rows, cols)


def save(ds: Dataset, path) -> None:
    """Write an exported object as a DICOM Part 10 file."""
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
