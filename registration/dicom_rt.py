"""RT Structure Sets and RT Plans (pydicom adapter): ROI masks, planned fiducials, isocentres.

RTSTRUCT (PS3.3 A.19): every (3006,0039) ROI Contour item holds contours in
planning-CT LPS mm, tied to the CT by (3006,0024) Referenced Frame of
Reference UID. ``CLOSED_PLANAR`` contours become 3D masks on the CT grid
(:func:`rasterise_contours`); ``POINT`` contours (markers, implanted seeds)
become planned fiducials.

Rasterisation convention: a voxel belongs to the ROI when its *centre* lies
inside the contour on its slice (the pixel-centre convention of DICOM
(0020,0032) Image Position). Several contours on one slice combine by the
even-odd rule (XOR), so a contour inside another is a hole and an island in
that hole is part of the ROI again. Each contour is filled with
``cv2.fillPoly`` on a grid ``SUPERSAMPLE`` times finer than the CT pixels
(sub-pixel vertices kept with ``cv2.fillPoly``'s fixed-point ``shift``) and
sampled at the original pixel centres: a centre is classified exactly unless
it lies within ``1 / (2 * SUPERSAMPLE)`` pixel of the contour line.

Point ROIs by their DICOM meaning, (3006,00A4) RT ROI Interpreted Type
(PS3.3 C.8.8.8): ``MARKER`` points are implanted seeds (planned fiducials);
``ISOCENTER`` points are isocentres, never seeds; any other typed point
(``REGISTRATION``, ``CONTROL``, ...) is neither. Fallback: the attribute is
type 2 (may be empty), so when *no* point of the set is typed ``MARKER``, the
untyped points are taken as seeds (a TPS that writes no types); a typed
``MARKER`` anywhere switches the fallback off.

RTPLAN (PS3.3 A.20): (300A,012C) Isocenter Position of each beam's first
control point (LPS mm, the plan's Frame of Reference), (300A,0180) Patient
Setup Sequence's (0018,5100) Patient Position, and the (300A,0010) Dose
Reference Sequence items of (300A,0020) Dose Reference Type ``TARGET`` that
name an ROI by (3006,0084) Referenced ROI Number (the planned target volume).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from spineguide.calibration.foundation import readonly_array as _ro

from .errors import DicomRTError, PatientPositionError
from .io import FiducialSet
from .volume import CTVolume, PatientPosition

__all__ = [
    "DicomRTError",
    "ContourType",
    "RoiContours",
    "StructureSet",
    "RTPlanInfo",
    "CTSeriesInfo",
    "DicomInventory",
    "read_rtstruct",
    "read_rtplan",
    "rasterise_contours",
    "scan_dicom_folder",
    "SUPERSAMPLE",
    "SLICE_PLANE_TOL_MM",
    "ISOCENTRE_MERGE_TOL_MM",
    "TARGET_TYPES",
    "MARKER_TYPE",
    "ISOCENTER_TYPE",
]

#: Each contour is filled on a grid this many times finer than the CT pixels.
SUPERSAMPLE = 8
#: Fractional bits of ``cv2.fillPoly``'s fixed-point vertices on the fine grid.
_SHIFT = 4
#: Largest distance of a contour point from its CT slice plane, mm (TPSs write 0.01 mm or better).
SLICE_PLANE_TOL_MM = 0.05
#: Plan isocentres closer than this are one isocentre (beams of one plan share it exactly), mm.
ISOCENTRE_MERGE_TOL_MM = 0.01
#: (3006,00A4) RT ROI Interpreted Types that mark a treatment target.
TARGET_TYPES = ("PTV", "CTV", "GTV")
#: (3006,00A4) of a point ROI that is an implanted seed (planned fiducial).
MARKER_TYPE = "MARKER"
#: (3006,00A4) of a point ROI that is an isocentre (never a seed).
ISOCENTER_TYPE = "ISOCENTER"

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"


class ContourType(Enum):
    """What an ROI's contours are: (3006,0042) Contour Geometric Type, or EMPTY for an ROI without contours."""

    CLOSED_PLANAR = "CLOSED_PLANAR"
    POINT = "POINT"
    EMPTY = "EMPTY"


@dataclass(frozen=True, slots=True)
class RoiContours:
    """One ROI of a structure set.

    Attributes
    ----------
    number : int
        (3006,0022) ROI Number.
    name : str
        (3006,0026) ROI Name.
    interpreted_type : str
        (3006,00A4) RT ROI Interpreted Type (``""`` where absent).
    geometric_type : ContourType
        ``CLOSED_PLANAR``, ``POINT`` or ``EMPTY`` (no contours); mixed types are refused.
    contours_lps_mm : tuple of (N, 3) arrays
        Contour points, planning-CT LPS mm.
    """

    number: int
    name: str
    interpreted_type: str
    geometric_type: ContourType
    contours_lps_mm: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "geometric_type", ContourType(self.geometric_type))
        object.__setattr__(self, "contours_lps_mm", tuple(_ro(c).reshape(-1, 3) for c in self.contours_lps_mm))


@dataclass(frozen=True, slots=True)
class StructureSet:
    """An RT Structure Set, read (not yet rasterised).

    Attributes
    ----------
    path : Path
    sop_instance_uid : str
    frame_of_reference_uid : str
        The one Referenced Frame of Reference every ROI uses.
    referenced_series_uids : tuple of str
        CT series named in (3006,0010)/(3006,0012)/(3006,0014) (may be empty).
    rois : tuple of RoiContours
    label : str
        (3006,0002) Structure Set Label.
    patient_id, study_instance_uid : str
        (0010,0020), (0020,000D) as found (cross-checked with the CT).
    """

    path: Path
    sop_instance_uid: str
    frame_of_reference_uid: str
    referenced_series_uids: tuple[str, ...]
    rois: tuple[RoiContours, ...]
    label: str = ""
    patient_id: str = ""
    study_instance_uid: str = ""

    def roi(self, name: str) -> RoiContours:
        """The ROI called ``name`` (exact match)."""
        for r in self.rois:
            if r.name == name:
                return r
        raise DicomRTError(f"{self.path}: no ROI named {name!r} (ROIs: {[r.name for r in self.rois]})")

    def _single_point(self, r: RoiContours) -> np.ndarray:
        if len(r.contours_lps_mm) != 1 or r.contours_lps_mm[0].shape != (1, 3):
            raise DicomRTError(
                f"{self.path}: point ROI {r.name!r} must hold exactly one point, "
                f"got {sum(len(c) for c in r.contours_lps_mm)}"
            )
        return r.contours_lps_mm[0][0]

    def seed_rois(self) -> tuple[RoiContours, ...]:
        """The point ROIs that are implanted seeds: typed ``MARKER``; untyped ones only if none is typed (module docstring)."""
        points = [r for r in self.rois if r.geometric_type is ContourType.POINT]
        markers = [r for r in points if r.interpreted_type == MARKER_TYPE]
        if markers:
            return tuple(markers)
        return tuple(r for r in points if r.interpreted_type == "")

    def point_fiducials(self) -> FiducialSet | None:
        """Seed point ROIs (:meth:`seed_rois`) as planned fiducials (ROI name, planning-CT LPS mm), or None if none.

        ``ISOCENTER`` and other typed points are never seeds.
        """
        seeds = self.seed_rois()
        if not seeds:
            return None
        pos = [self._single_point(r) for r in seeds]
        return FiducialSet(tuple(r.name for r in seeds), np.array(pos), f"{self.path} (MARKER point ROIs)")

    def isocentre_points(self) -> tuple[tuple[str, np.ndarray], ...]:
        """Point ROIs typed ``ISOCENTER``: ``(name, (3,) planning-CT LPS mm)`` each."""
        return tuple((r.name, self._single_point(r)) for r in self.rois
                     if r.geometric_type is ContourType.POINT and r.interpreted_type == ISOCENTER_TYPE)


@dataclass(frozen=True, slots=True)
class RTPlanInfo:
    """What spineguide uses from an RT Plan.

    Attributes
    ----------
    path : Path
    sop_instance_uid : str
    frame_of_reference_uid : str
    label : str
        (300A,0002) RT Plan Label.
    isocentres_lps_mm : (M, 3) array
        Distinct beam isocentres in order of first use, planning-CT LPS mm.
    beams_per_isocentre : tuple of tuple of str
        Beam names (or numbers) using each isocentre.
    patient_positions : tuple of PatientPosition
        Distinct (0018,5100) values of the Patient Setup Sequence.
    referenced_structure_set_uid : str or None
        (300C,0060) Referenced Structure Set's SOP Instance UID.
    target_roi_numbers : tuple of int
        (3006,0084) Referenced ROI Numbers of the (300A,0010) Dose Reference
        items typed ``TARGET``, distinct, in order (ROIs of the referenced
        structure set).
    patient_id, study_instance_uid : str
        (0010,0020), (0020,000D) as found (cross-checked with the CT).
    setup_beam_numbers : tuple of int
        (300A,00C0) Beam Numbers of the beams whose (300A,00CE) Treatment
        Delivery Type is ``SETUP`` (what kV images are referenced to).
    """

    path: Path
    sop_instance_uid: str
    frame_of_reference_uid: str
    label: str
    isocentres_lps_mm: np.ndarray
    beams_per_isocentre: tuple[tuple[str, ...], ...]
    patient_positions: tuple[PatientPosition, ...]
    referenced_structure_set_uid: str | None
    target_roi_numbers: tuple[int, ...] = ()
    patient_id: str = ""
    study_instance_uid: str = ""
    setup_beam_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "isocentres_lps_mm", _ro(self.isocentres_lps_mm).reshape(-1, 3))


# ---------------------------------------------------------------------------- reading
def _dcmread(path: Path, **kwargs):
    try:
        return pydicom.dcmread(path, **kwargs)
    except (InvalidDicomError, OSError) as err:
        raise DicomRTError(f"{path}: unreadable or corrupt DICOM file: {err}") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types (struct.error, IndexError...) on broken files
        raise DicomRTError(f"{path}: unreadable or corrupt DICOM file: {type(err).__name__}: {err}") from err


def _named_errors(p: Path, what: str, read):
    """Run ``read(p)``; any error that is not already ours becomes :class:`DicomRTError` naming the file.

    pydicom converts element values lazily, so a malformed value (a DS that is not a number, a sequence
    where a string belongs, a truncated item) raises at first use, with many exception types.
    """
    try:
        return read(p)
    except (DicomRTError, PatientPositionError):
        raise
    except Exception as err:  # noqa: BLE001 - see the docstring
        raise DicomRTError(f"{p}: malformed {what}: {type(err).__name__}: {err}") from err


def _require(ds, keyword: str, path: Path, what: str = ""):
    value = ds.get(keyword)
    if value in (None, ""):
        where = f" in {what}" if what else ""
        raise DicomRTError(f"{path}: missing {keyword}{where}")
    return value


def _contour_points(item, path: Path, roi_name: str) -> np.ndarray:
    """(3006,0050) Contour Data as (N, 3) LPS mm, parsed straight from the raw bytes where possible."""
    try:
        elem = item.get_item(0x30060050)
    except KeyError:
        elem = None
    if elem is None:
        raise DicomRTError(f"{path}: ROI {roi_name!r}: a contour has no Contour Data (3006,0050)")
    raw = elem.value
    try:
        if isinstance(raw, bytes):
            values = np.array(raw.strip(b" \x00").split(b"\\"), dtype=np.float64)
        else:
            values = np.array([float(v) for v in (raw if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw])])
    except (TypeError, ValueError) as err:
        raise DicomRTError(f"{path}: ROI {roi_name!r}: Contour Data is not numeric: {err}") from err
    if values.size == 0 or values.size % 3 or not np.all(np.isfinite(values)):
        raise DicomRTError(
            f"{path}: ROI {roi_name!r}: Contour Data must be finite x,y,z triplets (LPS mm), got {values.size} values"
        )
    pts = values.reshape(-1, 3)
    n_declared = item.get("NumberOfContourPoints")
    if n_declared not in (None, "") and int(n_declared) != len(pts):
        raise DicomRTError(
            f"{path}: ROI {roi_name!r}: Number of Contour Points says {int(n_declared)}, Contour Data holds {len(pts)}"
        )
    return pts


def read_rtstruct(path: str | os.PathLike) -> StructureSet:
    """Read an RT Structure Set: ROI names, types and contours (planning-CT LPS mm).

    Raises
    ------
    DicomRTError
        Not an RTSTRUCT; missing UIDs; ROIs on several frames of reference;
        a contour referring to an ROI number not declared; malformed contour
        data; mixed geometric types within one ROI.
    """
    return _named_errors(Path(path), "RT Structure Set", _read_rtstruct)


def _read_rtstruct(p: Path) -> StructureSet:
    ds = _dcmread(p)
    if str(ds.get("Modality", "")).upper() != "RTSTRUCT":
        raise DicomRTError(f"{p}: not an RT Structure Set (Modality {ds.get('Modality', '')!r})")
    sop_uid = str(_require(ds, "SOPInstanceUID", p))
    declared: dict[int, tuple[str, str]] = {}
    frames: set[str] = set()
    for item in ds.get("StructureSetROISequence", []):
        number = int(_require(item, "ROINumber", p, "Structure Set ROI Sequence"))
        frames.add(str(_require(item, "ReferencedFrameOfReferenceUID", p, f"ROI #{number}")))
        declared[number] = (str(item.get("ROIName", "")).strip() or f"ROI{number}", "")
    if not declared:
        raise DicomRTError(f"{p}: the structure set declares no ROIs (Structure Set ROI Sequence empty)")
    if len(frames) > 1:
        raise DicomRTError(f"{p}: ROIs on {len(frames)} frames of reference {sorted(frames)}; expected one")
    for item in ds.get("RTROIObservationsSequence", []):
        number = int(item.get("ReferencedROINumber", -1))
        if number in declared:
            declared[number] = (declared[number][0], str(item.get("RTROIInterpretedType", "")).strip().upper())
    series: list[str] = []
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        for st in fr.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                uid = str(se.get("SeriesInstanceUID", ""))
                if uid and uid not in series:
                    series.append(uid)
    contours: dict[int, list[np.ndarray]] = {n: [] for n in declared}
    gtypes: dict[int, set[str]] = {n: set() for n in declared}
    for roi_item in ds.get("ROIContourSequence", []):
        number = int(_require(roi_item, "ReferencedROINumber", p, "ROI Contour Sequence"))
        if number not in declared:
            raise DicomRTError(f"{p}: ROI Contour Sequence refers to ROI number {number}, which is not declared")
        name = declared[number][0]
        for c in roi_item.get("ContourSequence", []):
            gtype = str(c.get("ContourGeometricType", "")).strip().upper()
            if gtype not in ("CLOSED_PLANAR", "POINT"):
                raise DicomRTError(
                    f"{p}: ROI {name!r}: contour type {gtype!r} is not supported (CLOSED_PLANAR or POINT)"
                )
            gtypes[number].add(gtype)
            contours[number].append(_contour_points(c, p, name))
    rois = []
    for number, (name, itype) in declared.items():
        if len(gtypes[number]) > 1:
            raise DicomRTError(f"{p}: ROI {name!r} mixes contour types {sorted(gtypes[number])}")
        gtype = gtypes[number].pop() if gtypes[number] else "EMPTY"
        rois.append(RoiContours(number, name, itype, gtype, tuple(contours[number])))
    names = [r.name for r in rois]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DicomRTError(f"{p}: duplicate ROI names {dupes}")
    return StructureSet(p, sop_uid, frames.pop(), tuple(series), tuple(rois), str(ds.get("StructureSetLabel", "")),
                        str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", "")))


def read_rtplan(path: str | os.PathLike) -> RTPlanInfo:
    """Read an RT Plan's isocentres (LPS mm) and patient setup.

    Raises
    ------
    DicomRTError
        Not an RTPLAN; no Frame of Reference UID; no beam with an isocentre;
        a beam without (300A,012C) Isocenter Position in its first control
        point; unsupported or missing patient position in the setup.
    """
    return _named_errors(Path(path), "RT Plan", _read_rtplan)


def _read_rtplan(p: Path) -> RTPlanInfo:
    ds = _dcmread(p)
    if str(ds.get("Modality", "")).upper() != "RTPLAN":
        raise DicomRTError(f"{p}: not an RT Plan (Modality {ds.get('Modality', '')!r})")
    frame = str(_require(ds, "FrameOfReferenceUID", p))
    setups: dict[int, PatientPosition] = {}
    for item in ds.get("PatientSetupSequence", []):
        number = int(item.get("PatientSetupNumber", len(setups) + 1))
        value = item.get("PatientPosition")
        if value in (None, ""):
            raise DicomRTError(f"{p}: patient setup #{number} has no Patient Position (0018,5100)")
        setups[number] = PatientPosition.parse(str(value), f"{p}: patient setup #{number}")
    if not setups:
        raise DicomRTError(f"{p}: no Patient Setup Sequence (300A,0180); the patient position is unknown")
    beams = list(ds.get("BeamSequence", [])) + list(ds.get("IonBeamSequence", []))
    isos: list[np.ndarray] = []
    users: list[list[str]] = []
    setup_beams: list[int] = []
    for beam in beams:
        name = str(beam.get("BeamName", "") or beam.get("BeamNumber", "?"))
        if str(beam.get("TreatmentDeliveryType", "")).strip().upper() == "SETUP" and \
                beam.get("BeamNumber") not in (None, ""):
            setup_beams.append(int(beam.BeamNumber))
        cps = beam.get("ControlPointSequence", [])
        iso = cps[0].get("IsocenterPosition") if len(cps) else None
        if iso in (None, ""):
            raise DicomRTError(f"{p}: beam {name!r} has no Isocenter Position (300A,012C) in its first control point")
        iso = np.array([float(v) for v in iso], dtype=np.float64)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise DicomRTError(f"{p}: beam {name!r}: Isocenter Position must be 3 finite numbers (LPS mm)")
        for idx, known in enumerate(isos):
            if np.max(np.abs(known - iso)) <= ISOCENTRE_MERGE_TOL_MM:
                users[idx].append(name)
                break
        else:
            isos.append(iso)
            users.append([name])
    if not isos:
        raise DicomRTError(f"{p}: the plan has no beam with an isocentre (Beam Sequence empty)")
    ref_ss = None
    for item in ds.get("ReferencedStructureSetSequence", []):
        ref_ss = str(item.get("ReferencedSOPInstanceUID", "")) or None
    targets: list[int] = []
    for n, item in enumerate(ds.get("DoseReferenceSequence", [])):
        if str(item.get("DoseReferenceType", "")).strip().upper() != "TARGET":
            continue
        number = item.get("ReferencedROINumber")
        if number in (None, ""):
            continue  # a target dose reference by point or coordinates names no ROI
        if int(number) not in targets:
            targets.append(int(number))
    return RTPlanInfo(
        path=p,
        sop_instance_uid=str(_require(ds, "SOPInstanceUID", p)),
        frame_of_reference_uid=frame,
        label=str(ds.get("RTPlanLabel", "")),
        isocentres_lps_mm=np.array(isos),
        beams_per_isocentre=tuple(tuple(u) for u in users),
        patient_positions=tuple(dict.fromkeys(setups.values())),
        referenced_structure_set_uid=ref_ss,
        target_roi_numbers=tuple(targets),
        patient_id=str(ds.get("PatientID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        setup_beam_numbers=tuple(setup_beams),
    )


# ------------------------------------------------------------------------- rasterising
def _fill_centres(ij: np.ndarray, shape_ji: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Pixels (within the contour's bounding box) whose centres lie inside the polygon ``ij`` (pixel units)."""
    nj, ni = shape_ji
    lo = np.floor(ij.min(axis=0)).astype(int)
    hi = np.ceil(ij.max(axis=0)).astype(int)
    i0, j0 = max(lo[0], 0), max(lo[1], 0)
    i1, j1 = min(hi[0], ni - 1), min(hi[1], nj - 1)
    if i0 > i1 or j0 > j1:
        return None
    fine = np.zeros(((j1 - j0) * SUPERSAMPLE + 1, (i1 - i0) * SUPERSAMPLE + 1), dtype=np.uint8)
    # On the fine grid the centre of CT pixel (i, j) is the fine pixel ((i - i0) F, (j - j0) F);
    # cv2 fills every fine pixel whose centre is inside (or within half a fine pixel of) the polygon.
    pts = np.round((ij - (i0, j0)) * SUPERSAMPLE * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(fine, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return (slice(j0, j1 + 1), slice(i0, i1 + 1)), fine[::SUPERSAMPLE, ::SUPERSAMPLE].astype(bool)


def rasterise_contours(contours_lps_mm: Sequence[np.ndarray], ct: CTVolume, name: str = "ROI") -> np.ndarray:
    """Closed planar contours -> a mask on the CT grid (pixel-centre convention, even-odd rule).

    Parameters
    ----------
    contours_lps_mm : sequence of (N, 3) arrays
        Each contour's vertices in planning-CT LPS mm; each must lie in one CT
        slice plane (within :data:`SLICE_PLANE_TOL_MM`).
    ct : CTVolume
        The grid of the mask.
    name : str
        ROI name for messages.

    Returns
    -------
    (nk, nj, ni) bool array
        ``mask[k, j, i]`` is True where voxel ``(i, j, k)``'s centre is inside
        an odd number of the contours on slice ``k``.

    Raises
    ------
    DicomRTError
        A contour not in a slice plane, or outside the CT's slice range.
    """
    nk, nj, ni = ct.hu.shape
    mask = np.zeros((nk, nj, ni), dtype=bool)
    dz = float(ct.spacing_mm[2])
    for n, c in enumerate(contours_lps_mm):
        idx = ct.lps_to_index(np.asarray(c, dtype=np.float64).reshape(-1, 3))
        k_mean = float(np.mean(idx[:, 2]))
        k = int(round(k_mean))
        off_mm = float(np.max(np.abs(idx[:, 2] - k))) * dz
        if off_mm > SLICE_PLANE_TOL_MM:
            raise DicomRTError(
                f"{ct.source}: ROI {name!r} contour #{n} is not in a CT slice plane: points lie up to "
                f"{off_mm:.3f} mm from slice {k} (limit {SLICE_PLANE_TOL_MM} mm)"
            )
        if not 0 <= k < nk:
            raise DicomRTError(
                f"{ct.source}: ROI {name!r} contour #{n} lies on slice {k}, outside the CT's {nk} slices"
            )
        filled = _fill_centres(idx[:, :2], (nj, ni))
        if filled is not None:
            (sj, si), inside = filled
            mask[k, sj, si] ^= inside
    return mask


# --------------------------------------------------------------------------- inventory
@dataclass(frozen=True, slots=True)
class CTSeriesInfo:
    """One CT series found in a folder (headers only)."""

    series_uid: str
    frame_of_reference_uid: str
    study_uid: str
    patient_id: str
    patient_name: str
    paths: tuple[Path, ...]
    #: The headers read by the scan (Pixel Data deferred), one per path, for the CT reader to reuse.
    datasets: tuple = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DicomInventory:
    """What a folder of DICOM files holds, grouped by kind.

    Attributes
    ----------
    folder : Path
    ct_series : tuple of CTSeriesInfo
    structure_sets, plans : tuple of Path
        RTSTRUCT and RTPLAN files.
    others : tuple of (Path, str)
        Other DICOM objects and their Modality.
    not_dicom : tuple of Path
        Files that are not DICOM.
    """

    folder: Path
    ct_series: tuple[CTSeriesInfo, ...]
    structure_sets: tuple[Path, ...]
    plans: tuple[Path, ...]
    others: tuple[tuple[Path, str], ...] = field(default=())
    not_dicom: tuple[Path, ...] = field(default=())


_INVENTORY_TAGS = [
    "Modality", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID", "PatientID", "PatientName", "SOPClassUID",
]


def scan_dicom_folder(folder: str | os.PathLike, recursive: bool = True) -> DicomInventory:
    """Group the DICOM files under ``folder`` into CT series, structure sets, plans and others.

    Only headers are read. Files that are not DICOM are listed, not errors
    (a received folder may hold logs or a DICOMDIR).

    Raises
    ------
    DicomRTError
        ``folder`` is not a folder, or holds no file at all.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DicomRTError(f"{root}: not a folder")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file())
    if not files:
        raise DicomRTError(f"{root}: the folder holds no files")
    ct: dict[str, list] = {}
    ss, plans, others, not_dicom = [], [], [], []
    for p in files:
        if p.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(p, defer_size=4096)  # whole header, large values (Pixel Data) left in the file
            modality = str(ds.get("Modality", "")).upper()
            header = [str(ds.get(k, "")) for k in ("SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID",
                                                    "PatientID", "PatientName")]
        except Exception:  # noqa: BLE001 - anything pydicom cannot read is listed as "not DICOM", never a crash
            not_dicom.append(p)
            continue
        if modality == "CT":
            entry = ct.setdefault(header[0], [*header[1:], [], []])
            entry[4].append(p)
            entry[5].append(ds)
        elif modality == "RTSTRUCT":
            ss.append(p)
        elif modality == "RTPLAN":
            plans.append(p)
        else:
            others.append((p, modality))
    series = tuple(CTSeriesInfo(uid, e[0], e[1], e[2], e[3], tuple(e[4]), tuple(e[5])) for uid, e in ct.items())
    return DicomInventory(root, series, tuple(ss), tuple(plans), tuple(others), tuple(not_dicom))
