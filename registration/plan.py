"""The treatment plan as spineguide uses it: CT, isocentre, planned fiducials, ROI masks.

A :class:`Plan` comes from either

- files: a CT volume (``.mha``/``.nrrd``/``.nii`` with the patient position in
  its metadata, or a DICOM CT folder), the isocentre (planning-CT LPS mm), a
  ``fiducials/1`` JSON file and a mask volume on the CT grid
  (:func:`load_plan_files`); or
- a folder of DICOM: one CT series, at most one RT Structure Set and at most
  one RT Plan, all tied by (0020,0052) Frame of Reference UID
  (:func:`load_dicom_plan`). The RT Plan's isocentre is the default
  isocentre; an isocentre given explicitly replaces it (and is recorded so in
  the provenance).

Either way the result is the same value, so everything downstream (DRRs,
point and anatomy registration) cannot tell where the plan came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import SimpleITK as sitk

from spineguide.calibration.foundation import readonly_array as _ro

from .ctfile import read_ct
from .dicom_rt import (
    TARGET_TYPES,
    ContourType,
    DicomInventory,
    RTPlanInfo,
    StructureSet,
    rasterise_contours,
    read_rtplan,
    read_rtstruct,
    scan_dicom_folder,
)
from .errors import DicomRTError, PlanError
from .imagefile import MAX_IMAGE_BYTES, read_sitk_image
from .io import FiducialSet, read_fiducials
from .volume import CTVolume, PatientPosition

__all__ = [
    "PlanError",
    "PatientStudy",
    "Plan",
    "load_plan_files",
    "read_mask_volume",
    "load_dicom_plan",
    "MASK_GRID_TOL_MM",
]

#: Largest difference between a mask volume's grid and the CT's (origin, spacing, voxel axes x 1 mm), mm.
MASK_GRID_TOL_MM = 1e-3


@dataclass(frozen=True, slots=True)
class PatientStudy:
    """DICOM identity of the patient and planning study, copied into every exported object.

    Attributes
    ----------
    patient_name, patient_id : str
        (0010,0010), (0010,0020).
    study_instance_uid : str
        (0020,000D) of the planning study.
    patient_birth_date, patient_sex, study_id, study_date, study_time, accession_number,
    referring_physician_name : str
        Type 2 attributes, copied as found (may be empty).
    """

    patient_name: str
    patient_id: str
    study_instance_uid: str
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""

    def __post_init__(self) -> None:
        if not str(self.patient_id).strip():
            raise PlanError("patient identity: Patient ID (0010,0020) must not be empty")
        if not str(self.study_instance_uid).strip():
            raise PlanError("patient identity: Study Instance UID (0020,000D) must not be empty")

    @classmethod
    def from_dataset(cls, ds) -> "PatientStudy":
        """Copy the identity from any DICOM object of the study (pydicom Dataset)."""
        return cls(
            patient_name=str(ds.get("PatientName", "")),
            patient_id=str(ds.get("PatientID", "")),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            patient_birth_date=str(ds.get("PatientBirthDate", "")),
            patient_sex=str(ds.get("PatientSex", "")),
            study_id=str(ds.get("StudyID", "")),
            study_date=str(ds.get("StudyDate", "")),
            study_time=str(ds.get("StudyTime", "")),
            accession_number=str(ds.get("AccessionNumber", "")),
            referring_physician_name=str(ds.get("ReferringPhysicianName", "")),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything spineguide needs from a treatment plan.

    Attributes
    ----------
    ct : CTVolume
        Planning CT (HU, LPS mm, patient position).
    isocentre_lps_mm : (3,) array
        Treatment isocentre, planning-CT LPS mm.
    fiducials : FiducialSet or None
        Planned fiducial (seed) centres, planning-CT LPS mm.
    rois : mapping str -> (nk, nj, ni) bool array
        ROI masks on the CT grid, ``mask[k, j, i]`` (read-only).
    target_roi : str or None
        Name of the target ROI (a key of ``rois``).
    patient_position : PatientPosition
        Must equal ``ct.patient_position``.
    frame_of_reference_uid : str or None
        (0020,0052) of the planning CT where known (DICOM plans).
    patient : PatientStudy or None
        DICOM identity where known (needed to export objects into the patient's record).
    plan_isocentres_lps_mm : (M, 3) array
        Every isocentre the RT Plan holds (empty for plans from files).
    provenance : mapping str -> str
        Where each part came from (paths, SOP Instance UIDs, "given").
    rtplan_sop_instance_uid : str or None
        The RT Plan's SOP Instance UID (DICOM plans with an RTPLAN), referenced by exported RT Images.
    setup_beam_numbers : tuple of int
        The RT Plan's SETUP beams (Beam Numbers).
    """

    ct: CTVolume
    isocentre_lps_mm: np.ndarray
    fiducials: FiducialSet | None = None
    rois: Mapping[str, np.ndarray] = field(default_factory=dict)
    target_roi: str | None = None
    patient_position: PatientPosition | None = None
    frame_of_reference_uid: str | None = None
    patient: PatientStudy | None = None
    plan_isocentres_lps_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    provenance: Mapping[str, str] = field(default_factory=dict)
    rtplan_sop_instance_uid: str | None = None
    setup_beam_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = self.ct.source
        iso = np.array(self.isocentre_lps_mm, dtype=np.float64)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise PlanError(f"{where}: isocentre must be three finite LPS numbers (mm), got {np.ravel(iso).tolist()}")
        position = self.ct.patient_position if self.patient_position is None else PatientPosition.parse(self.patient_position)
        if position is not self.ct.patient_position:
            raise PlanError(
                f"{where}: plan patient position {position.value} differs from the CT's {self.ct.patient_position.value}"
            )
        rois = {}
        for name, mask in dict(self.rois).items():
            m = np.array(mask, dtype=bool)
            if m.shape != self.ct.hu.shape:
                raise PlanError(f"{where}: ROI {name!r} mask has shape {m.shape}, the CT grid is {self.ct.hu.shape}")
            m.setflags(write=False)
            rois[str(name)] = m
        if self.target_roi is not None and self.target_roi not in rois:
            raise PlanError(f"{where}: target ROI {self.target_roi!r} is not among the ROIs {sorted(rois)}")
        isos = np.array(self.plan_isocentres_lps_mm, dtype=np.float64).reshape(-1, 3)
        set_ = object.__setattr__
        set_(self, "isocentre_lps_mm", _ro(iso))
        set_(self, "patient_position", position)
        set_(self, "rois", MappingProxyType(rois))
        set_(self, "plan_isocentres_lps_mm", _ro(isos))
        set_(self, "provenance", MappingProxyType({str(k): str(v) for k, v in dict(self.provenance).items()}))

    def target_mask(self) -> np.ndarray:
        """The target ROI's mask ``[k, j, i]``; :class:`PlanError` if the plan names no target."""
        if self.target_roi is None:
            raise PlanError(f"{self.ct.source}: the plan names no target ROI (ROIs: {sorted(self.rois)})")
        return self.rois[self.target_roi]

    def fiducials_room_mm(self) -> np.ndarray:
        """Planned fiducials in the room at perfect setup, (N, 3) mm; (0, 3) without fiducials."""
        if self.fiducials is None:
            return np.zeros((0, 3))
        return self.fiducials.to_room(self.isocentre_lps_mm, self.patient_position)


# ------------------------------------------------------------------------------ files
def read_mask_volume(path: str | os.PathLike, ct: CTVolume, *,
                     max_bytes: int = MAX_IMAGE_BYTES) -> tuple[np.ndarray, str | None]:
    """A mask or label volume on the planning CT's grid.

    Returns
    -------
    values : (nk, nj, ni) array
        The voxel values as stored, ``[k, j, i]`` (0 outside; labels kept).
    label : str or None
        The ``spineguide_label`` metadata (the ROI's name), if the file has it.

    Raises
    ------
    PlanError
        Unreadable, declaring more than ``max_bytes`` of voxels (checked
        before reading them), not 3D, not scalar, NaN voxels, or on another
        grid than the CT (size, or origin, spacing or direction beyond
        :data:`MASK_GRID_TOL_MM`).
    """
    path = Path(path)
    image = read_sitk_image(path, PlanError, "mask volume", max_bytes=max_bytes)
    if image.GetDimension() != 3:
        raise PlanError(f"{path}: mask must be a 3D volume, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PlanError(f"{path}: mask must be scalar, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise PlanError(f"{path}: mask holds {int(np.count_nonzero(~np.isfinite(arr)))} NaN or infinite voxels")
    if arr.shape != ct.hu.shape:
        raise PlanError(f"{path}: mask grid {arr.shape} (k, j, i) differs from the CT's {ct.hu.shape}")
    checks = (
        ("origin", np.array(image.GetOrigin()), ct.origin_lps_mm),
        ("spacing", np.array(image.GetSpacing()), ct.spacing_mm),
        ("direction", np.array(image.GetDirection()), ct.direction.ravel()),
    )
    for what, got, want in checks:
        if np.max(np.abs(got - want)) > MASK_GRID_TOL_MM:
            raise PlanError(
                f"{path}: mask {what} {np.round(got, 4).tolist()} differs from the CT's {np.round(want, 4).tolist()} "
                f"(limit {MASK_GRID_TOL_MM} mm)"
            )
    label = image.GetMetaData("spineguide_label").strip() if image.HasMetaDataKey("spineguide_label") else None
    return arr, label


def load_plan_files(
    ct_path: str | os.PathLike,
    isocentre_lps_mm: Sequence[float],
    fiducials_path: str | os.PathLike | None = None,
    roi_path: str | os.PathLike | None = None,
    roi_label: str | None = None,
    patient_position: PatientPosition | str | None = None,
) -> Plan:
    """Assemble a plan from a CT file, an isocentre, a ``fiducials/1`` file and a mask volume.

    Parameters
    ----------
    ct_path : path
        Planning CT (``.mha``/``.nrrd``/``.nii`` or a DICOM CT folder).
    isocentre_lps_mm : (3,) floats
        Treatment isocentre, planning-CT LPS mm.
    fiducials_path : path, optional
        ``fiducials/1`` JSON (planning-CT LPS mm).
    roi_path : path, optional
        Mask volume on the CT grid (non-zero = inside); it becomes the target ROI.
    roi_label : str, optional
        Name of that ROI; defaults to the mask's ``spineguide_label`` metadata
        (written by the virtual room). Both present and different is an error.
    patient_position : PatientPosition or str, optional
        For CT files that do not record it.

    Raises
    ------
    PlanError
        Mask on another grid, unnamed mask, bad isocentre.
    VolumeFileError, PatientPositionError, FiducialFileError
        From the CT and fiducial readers.
    """
    ct = read_ct(ct_path, patient_position=patient_position)
    provenance = {"ct": str(ct_path), "isocentre": "given"}
    fiducials = None
    if fiducials_path is not None:
        fiducials = read_fiducials(fiducials_path)
        provenance["fiducials"] = str(fiducials_path)
    rois: dict[str, np.ndarray] = {}
    target = None
    if roi_path is not None:
        values, stored = read_mask_volume(roi_path, ct)
        mask = values != 0
        if roi_label is not None and stored is not None and roi_label != stored:
            raise PlanError(f"{roi_path}: mask is labelled {stored!r}, but roi_label {roi_label!r} was given")
        target = roi_label if roi_label is not None else stored
        if target is None:
            raise PlanError(f"{roi_path}: the mask carries no label; give roi_label")
        rois[target] = mask
        provenance[f"roi:{target}"] = str(roi_path)
    elif roi_label is not None:
        raise PlanError(f"roi_label {roi_label!r} given without roi_path")
    return Plan(ct, isocentre_lps_mm, fiducials, rois, target, ct.patient_position, provenance=provenance)


# ------------------------------------------------------------------------------ DICOM
def _pick_one(paths: Sequence[Path], kind: str, folder: Path) -> Path | None:
    if len(paths) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in paths)
        raise PlanError(f"{folder}: {len(paths)} {kind} objects found ({names}); expected at most one")
    return paths[0] if paths else None


def _check_structure_set(ss: StructureSet, frame_uid: str, series_uid: str) -> None:
    if ss.frame_of_reference_uid != frame_uid:
        raise PlanError(
            f"{ss.path}: RTSTRUCT refers to frame of reference {ss.frame_of_reference_uid}, "
            f"but the CT's frame of reference is {frame_uid}"
        )
    if ss.referenced_series_uids and series_uid not in ss.referenced_series_uids:
        raise PlanError(
            f"{ss.path}: RTSTRUCT was drawn on CT series {list(ss.referenced_series_uids)}, "
            f"not on the CT series found ({series_uid})"
        )


def _check_rtplan(rp: RTPlanInfo, frame_uid: str, ct: CTVolume, ss: StructureSet | None) -> None:
    if rp.frame_of_reference_uid != frame_uid:
        raise PlanError(
            f"{rp.path}: RTPLAN refers to frame of reference {rp.frame_of_reference_uid}, "
            f"but the CT's frame of reference is {frame_uid}"
        )
    if ss is not None and rp.referenced_structure_set_uid not in (None, ss.sop_instance_uid):
        raise PlanError(
            f"{rp.path}: RTPLAN refers to structure set {rp.referenced_structure_set_uid}, "
            f"but the structure set found is {ss.sop_instance_uid} ({ss.path.name})"
        )
    others = [p.value for p in rp.patient_positions if p is not ct.patient_position]
    if others:
        raise PlanError(
            f"{rp.path}: RTPLAN patient setup says {others}, but the CT was scanned {ct.patient_position.value}"
        )


def _check_identity(ct_patient: PatientStudy, obj, kind: str) -> None:
    """Refuse an RTSTRUCT/RTPLAN of another patient than the CT's (Patient ID, (0010,0020))."""
    if obj.patient_id.strip() != ct_patient.patient_id.strip():
        raise PlanError(
            f"{obj.path}: {kind} is for patient ID {obj.patient_id!r}, but the CT is for patient ID "
            f"{ct_patient.patient_id!r}; refusing to mix patients"
        )


def _target(ss: StructureSet, requested: str | None, rp: RTPlanInfo | None) -> tuple[str | None, str]:
    """The target ROI's name and where it came from (module docstring of :func:`load_dicom_plan`)."""
    closed = [r for r in ss.rois if r.geometric_type is ContourType.CLOSED_PLANAR]
    closed_names = [r.name for r in closed]
    if requested is not None:
        if requested not in closed_names:
            raise PlanError(f"{ss.path}: no contoured ROI named {requested!r} (ROIs: {closed_names})")
        return requested, "given"
    if rp is not None and rp.target_roi_numbers:
        by_number = {r.number: r for r in ss.rois}
        named = []
        for number in rp.target_roi_numbers:
            roi = by_number.get(number)
            if roi is None:
                raise PlanError(
                    f"{rp.path}: a TARGET dose reference names ROI number {number}, which the structure set "
                    f"{ss.path.name} does not declare"
                )
            if roi.geometric_type is ContourType.CLOSED_PLANAR:
                named.append((number, roi.name))
        if len(named) == 1:
            return named[0][1], f"rtplan TARGET dose reference (ROI #{named[0][0]})"
        if len(named) > 1:
            raise PlanError(
                f"{rp.path}: {len(named)} TARGET dose references name contoured ROIs {[n for _, n in named]}; "
                "name one as the target"
            )
    for kind in TARGET_TYPES:
        typed = [r.name for r in closed if r.interpreted_type == kind]
        if len(typed) == 1:
            return typed[0], f"rtstruct type {kind}"
        if len(typed) > 1:
            raise PlanError(f"{ss.path}: {len(typed)} ROIs of type {kind} ({typed}); name one as the target")
    return None, "none"


def load_dicom_plan(
    folder: str | os.PathLike,
    isocentre_lps_mm: Sequence[float] | None = None,
    target_roi: str | None = None,
    inventory: DicomInventory | None = None,
) -> Plan:
    """Assemble a plan from a folder of DICOM (searched recursively): CT, RTSTRUCT, RTPLAN.

    Parameters
    ----------
    folder : path
        Holds exactly one CT series, at most one RT Structure Set and at most
        one RT Plan (e.g. what ``spineguide dicom-listen`` received for one patient).
    isocentre_lps_mm : (3,) floats, optional
        Overrides the RT Plan's isocentre (planning-CT LPS mm); required when
        there is no RT Plan or the plan has several isocentres.
    target_roi : str, optional
        Name of the target ROI (the override). Default, in this order: the
        one contoured ROI named by the RTPLAN's (300A,0010) Dose Reference
        items of type ``TARGET`` ((3006,0084) Referenced ROI Number); else the
        one contoured ROI of RT ROI Interpreted Type PTV, else CTV, else GTV
        (the first type present decides; several of it is an error asking
        for the override); else no target.
    inventory : DicomInventory, optional
        A scan of ``folder`` already made (saves reading the headers twice).

    Returns
    -------
    Plan
        ROIs: every contoured ROI, rasterised on the CT grid; fiducials: the
        structure set's seed points, ``MARKER`` typed (untyped only when no
        point is typed MARKER; ``ISOCENTER`` points never), LPS mm. The
        isocentre: ``isocentre_lps_mm`` if given, else the RTPLAN's one
        isocentre, else (no RTPLAN) the structure set's one ``ISOCENTER`` point.
        ``provenance`` says which for the isocentre, target and fiducials.

    Raises
    ------
    PlanError
        No or several CT series, several structure sets or plans, an RTSTRUCT
        or RTPLAN on another frame of reference or CT series, or of another
        patient (Patient ID), a plan for another patient position, no
        isocentre, several target candidates without ``target_roi``.
    DicomRTError, VolumeFileError, PatientPositionError
        From the readers.
    """
    from .dicom_ct import read_dicom_ct_files  # pydicom work only when needed

    root = Path(folder)
    inv = scan_dicom_folder(root) if inventory is None else inventory
    if not inv.ct_series:
        raise PlanError(f"{root}: no CT series found")
    if len(inv.ct_series) > 1:
        listing = "; ".join(f"{s.series_uid} ({len(s.paths)} slices)" for s in inv.ct_series)
        raise PlanError(f"{root}: {len(inv.ct_series)} CT series found ({listing}); expected one")
    series = inv.ct_series[0]
    ct = read_dicom_ct_files(series.paths, root, datasets=series.datasets or None)
    frame_uid = series.frame_of_reference_uid
    provenance = {"ct": str(root), "ct_series_uid": series.series_uid, "frame_of_reference_uid": frame_uid}
    import pydicom  # identity of the study, from the first CT slice's header

    try:
        patient = PatientStudy.from_dataset(pydicom.dcmread(series.paths[0], stop_before_pixels=True))
    except (PlanError, DicomRTError):
        raise
    except Exception as err:  # noqa: BLE001 - pydicom parses values lazily and raises many types on bad ones
        raise PlanError(f"{series.paths[0]}: malformed patient/study identity: {type(err).__name__}: {err}") from err
    ss_path = _pick_one(inv.structure_sets, "RTSTRUCT", root)
    rp_path = _pick_one(inv.plans, "RTPLAN", root)
    ss = read_rtstruct(ss_path) if ss_path is not None else None
    rp = read_rtplan(rp_path) if rp_path is not None else None
    rois: dict[str, np.ndarray] = {}
    fiducials = None
    target = None
    if ss is not None:
        _check_identity(patient, ss, "RTSTRUCT")
        _check_structure_set(ss, frame_uid, series.series_uid)
        provenance["rtstruct"] = f"{ss.path} ({ss.sop_instance_uid})"
    if rp is not None:
        _check_identity(patient, rp, "RTPLAN")
        _check_rtplan(rp, frame_uid, ct, ss)
        provenance["rtplan"] = f"{rp.path} ({rp.sop_instance_uid})"
    if ss is not None:
        for roi in ss.rois:
            if roi.geometric_type is ContourType.CLOSED_PLANAR:
                rois[roi.name] = rasterise_contours(roi.contours_lps_mm, ct, roi.name)
        fiducials = ss.point_fiducials()
        if fiducials is not None:
            provenance["fiducials"] = f"rtstruct points {list(fiducials.names)}"
        target, provenance["target_roi"] = _target(ss, target_roi, rp)
    elif target_roi is not None:
        raise PlanError(f"{root}: target_roi {target_roi!r} given, but there is no RTSTRUCT")
    plan_isos = rp.isocentres_lps_mm if rp is not None else np.zeros((0, 3))
    iso_points = ss.isocentre_points() if ss is not None else ()
    if isocentre_lps_mm is not None:
        iso = np.asarray(isocentre_lps_mm, dtype=np.float64)
        provenance["isocentre"] = "given"
    elif len(plan_isos) == 1:
        iso = plan_isos[0]
        provenance["isocentre"] = "rtplan"
    elif len(plan_isos) > 1:
        raise PlanError(
            f"{rp_path}: the plan has {len(plan_isos)} isocentres {np.round(plan_isos, 2).tolist()} (LPS mm); "
            "give the one to treat explicitly"
        )
    elif len(iso_points) == 1:
        iso = iso_points[0][1]
        provenance["isocentre"] = f"rtstruct ISOCENTER point {iso_points[0][0]!r}"
    elif len(iso_points) > 1:
        raise PlanError(
            f"{ss.path}: no RTPLAN, and the structure set has {len(iso_points)} ISOCENTER points "
            f"{[n for n, _ in iso_points]}; give the isocentre explicitly (LPS mm)"
        )
    else:
        raise PlanError(f"{root}: no RTPLAN to take the isocentre from; give the isocentre explicitly (LPS mm)")
    return Plan(
        ct, iso, fiducials, rois, target, ct.patient_position, frame_uid, patient, plan_isos, provenance,
        rtplan_sop_instance_uid=rp.sop_instance_uid if rp is not None else None,
        setup_beam_numbers=tuple(int(n) for n in rp.setup_beam_numbers) if rp is not None else (),
    )
