"""Planning CT from a DICOM series folder (pydicom adapter).

The folder must hold exactly one CT series (one (0020,000E) Series Instance
UID and one (0020,0052) Frame of Reference UID); other objects in the folder
(RT Structure Sets, plans, DICOMDIR...) whose (0008,0060) Modality is not
``CT`` are not part of the volume and are skipped. Every slice is checked
before any pixel is decoded (headers are read with ``stop_before_pixels``):

- (0020,0037) Image Orientation (Patient), (0028,0010) Rows, (0028,0011)
  Columns and (0028,0030) Pixel Spacing must be the same on every slice;
- (0018,1120) Gantry/Detector Tilt must be zero, and every (0020,0032) Image
  Position (Patient) must lie on one line along the slice normal
  ``n = row_direction x col_direction`` (a sheared stack is a tilted gantry
  even when the tilt tag is missing);
- slices are sorted along ``n`` (file order and (0020,0013) Instance Number
  are ignored) and must be evenly spaced: a gap of about a multiple of the
  spacing is reported as missing slices, any other step as non-uniform
  spacing, naming the two files on either side;
- (0018,5100) Patient Position must be HFS, FFS, HFP or FFP on every slice.

Pixels become HU with each slice's own (0028,1053) Rescale Slope and
(0028,1052) Rescale Intercept. The volume's voxel ``(i, j, k)`` is centred at
``IPP_0 + i * col_spacing * r + j * row_spacing * c + k * dz * n`` (LPS mm),
where ``r`` and ``c`` are the first and second triplets of (0020,0037),
(0028,0030) is ``[row_spacing, col_spacing]`` and ``IPP_0`` is the position
of the first slice along ``n``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .errors import PatientPositionError, VolumeFileError
from .imagefile import MAX_IMAGE_BYTES, dicom_pixel_array
from .volume import CTVolume, PatientPosition

__all__ = [
    "read_dicom_ct",
    "read_dicom_ct_files",
    "ORIENTATION_TOL",
    "SPACING_TOL_MM",
    "POSITION_TOL_MM",
    "TILT_TOL_DEG",
]

#: Largest difference between direction cosines that counts as the same orientation.
ORIENTATION_TOL = 1e-4
#: Largest deviation of a slice step (or pixel spacing) from the series' spacing, mm.
#: Scanners write positions with ~1e-3 mm rounding; 0.01 mm is far below any real gap.
SPACING_TOL_MM = 0.01
#: Largest in-plane offset of a slice from the stack's line along the normal, mm.
POSITION_TOL_MM = 0.01
#: Largest (0018,1120) Gantry/Detector Tilt that counts as no tilt, degrees.
TILT_TOL_DEG = 1e-3


@dataclass(frozen=True, slots=True)
class _SliceHeader:
    path: Path
    series_uid: str
    frame_uid: str
    orientation: np.ndarray  # (6,)
    position_lps_mm: np.ndarray  # (3,)
    rows: int
    cols: int
    pixel_spacing_mm: np.ndarray  # (2,) [row_spacing, col_spacing]
    tilt_deg: float
    patient_position: str | None
    frames: int
    #: The file's dataset with its large values (Pixel Data) deferred: read from the file on first use,
    #: so the pixel pass does not parse the header a second time.
    ds: object = field(default=None, compare=False, repr=False)


#: Values larger than this are read from the file only when used (pydicom ``defer_size``): Pixel Data.
_DEFER_BYTES = 4096


def _floats(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise VolumeFileError(f"{path}: missing {keyword}")
    try:
        arr = np.array([float(x) for x in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise VolumeFileError(f"{path}: {keyword} is not numeric: {value!r}") from err
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise VolumeFileError(f"{path}: {keyword} must be {count} finite numbers, got {list(value)!r}")
    return arr


def _read_header(path: Path, ds=None) -> _SliceHeader | None:
    """Header of one file, or None if it is a DICOM object that is not a CT image."""
    try:
        return _header_of(path, ds)
    except VolumeFileError:
        raise
    except (InvalidDicomError, OSError) as err:
        raise VolumeFileError(f"{path}: unreadable or corrupt DICOM file: {err}") from err
    except Exception as err:  # noqa: BLE001 - pydicom decodes values lazily and raises many types on a broken file
        raise VolumeFileError(f"{path}: unreadable or corrupt DICOM file: {type(err).__name__}: {err}") from err


def _header_of(path: Path, ds=None) -> _SliceHeader | None:
    if ds is None:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    if str(ds.get("Modality", "")).upper() != "CT":
        return None
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        if ds.get(keyword) in (None, ""):
            raise VolumeFileError(f"{path}: missing {keyword}")
    position = ds.get("PatientPosition")
    tilt = ds.get("GantryDetectorTilt")
    return _SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        frame_uid=str(ds.FrameOfReferenceUID),
        orientation=_floats(ds, "ImageOrientationPatient", 6, path),
        position_lps_mm=_floats(ds, "ImagePositionPatient", 3, path),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        pixel_spacing_mm=_floats(ds, "PixelSpacing", 2, path),
        # (0018,1120) is type 3: absent means the scanner did not tilt.
        tilt_deg=float(_floats(ds, "GantryDetectorTilt", 1, path)[0]) if tilt not in (None, "") else 0.0,
        patient_position=str(position).strip() if position not in (None, "") else None,
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        ds=ds,
    )


def _check_consistent(headers: list[_SliceHeader], folder: Path) -> None:
    ref = headers[0]
    for h in headers[1:]:
        if np.max(np.abs(h.orientation - ref.orientation)) > ORIENTATION_TOL:
            raise VolumeFileError(
                f"{folder}: inconsistent Image Orientation (Patient): {h.path.name} has "
                f"{h.orientation.tolist()}, {ref.path.name} has {ref.orientation.tolist()}"
            )
        if (h.rows, h.cols) != (ref.rows, ref.cols):
            raise VolumeFileError(
                f"{folder}: inconsistent slice size: {h.path.name} is {h.rows}x{h.cols} (rows x cols), "
                f"{ref.path.name} is {ref.rows}x{ref.cols}"
            )
        if np.max(np.abs(h.pixel_spacing_mm - ref.pixel_spacing_mm)) > SPACING_TOL_MM:
            raise VolumeFileError(
                f"{folder}: inconsistent Pixel Spacing: {h.path.name} has {h.pixel_spacing_mm.tolist()} mm, "
                f"{ref.path.name} has {ref.pixel_spacing_mm.tolist()} mm"
            )
    for h in headers:
        if abs(h.tilt_deg) > TILT_TOL_DEG:
            raise VolumeFileError(
                f"{h.path}: gantry tilt {h.tilt_deg:g} deg (0018,1120); tilted series are not supported, "
                "resample to an untilted grid first"
            )
        if h.frames != 1:
            raise VolumeFileError(f"{h.path}: multi-frame CT ({h.frames} frames) is not supported")


def _patient_position(headers: list[_SliceHeader], folder: Path) -> PatientPosition:
    values = {h.patient_position for h in headers}
    if None in values:
        missing = next(h for h in headers if h.patient_position is None)
        raise PatientPositionError(f"{missing.path}: missing Patient Position (0018,5100)")
    if len(values) > 1:
        raise PatientPositionError(f"{folder}: slices disagree on Patient Position (0018,5100): {sorted(values)}")
    return PatientPosition.parse(values.pop(), str(headers[0].path))


def _sort_and_check_spacing(
    headers: list[_SliceHeader], folder: Path, normal: np.ndarray
) -> tuple[list[_SliceHeader], float]:
    dist = np.array([h.position_lps_mm @ normal for h in headers])
    order = np.argsort(dist, kind="stable")
    headers = [headers[i] for i in order]
    dist = dist[order]
    # Slices not on one line along the normal: the stack is sheared (gantry tilt).
    inplane = np.stack([h.position_lps_mm - d * normal for h, d in zip(headers, dist)])
    offset = np.linalg.norm(inplane - inplane[0], axis=1)
    worst = int(np.argmax(offset))
    if offset[worst] > POSITION_TOL_MM:
        raise VolumeFileError(
            f"{folder}: slice positions are not along the slice normal (gantry tilt or sheared stack): "
            f"{headers[worst].path.name} is offset {offset[worst]:.3f} mm in-plane from {headers[0].path.name}"
        )
    steps = np.diff(dist)
    dup = np.nonzero(steps < SPACING_TOL_MM)[0]
    if dup.size:
        i = int(dup[0])
        raise VolumeFileError(
            f"{folder}: duplicate slice position {dist[i]:.3f} mm along the normal: "
            f"{headers[i].path.name} and {headers[i + 1].path.name}"
        )
    spacing = float(np.median(steps))
    bad = np.nonzero(np.abs(steps - spacing) > SPACING_TOL_MM)[0]
    if bad.size:
        i = int(bad[0])
        gap = float(steps[i])
        ratio = gap / spacing
        where = (
            f"between {headers[i].path.name} ({dist[i]:.3f} mm along the normal) and "
            f"{headers[i + 1].path.name} ({dist[i + 1]:.3f} mm)"
        )
        if round(ratio) >= 2 and abs(gap - round(ratio) * spacing) <= SPACING_TOL_MM * round(ratio):
            raise VolumeFileError(
                f"{folder}: missing slices: gap {where} is {gap:.3f} mm, expected spacing {spacing:.3f} mm "
                f"({int(round(ratio)) - 1} slice(s) missing)"
            )
        raise VolumeFileError(
            f"{folder}: non-uniform slice spacing: step {where} is {gap:.3f} mm, expected {spacing:.3f} mm"
        )
    return headers, spacing


def _read_pixels_hu(header: _SliceHeader) -> np.ndarray:
    path = header.path
    ds = header.ds
    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for a broken file
            raise VolumeFileError(f"{path}: unreadable or corrupt DICOM file: {type(err).__name__}: {err}") from err
    raw = dicom_pixel_array(ds, path, VolumeFileError, "CT slice")
    if raw.shape != (header.rows, header.cols):
        raise VolumeFileError(
            f"{path}: pixel data is {raw.shape}, expected {header.rows}x{header.cols} (rows x cols)"
        )
    try:
        missing = ds.get("RescaleSlope") is None or ds.get("RescaleIntercept") is None
    except Exception as err:  # noqa: BLE001 - as below
        raise VolumeFileError(f"{path}: malformed Rescale Slope/Intercept (0028,1053)/(0028,1052): {err}") from err
    if missing:
        raise VolumeFileError(f"{path}: missing Rescale Slope (0028,1053) or Rescale Intercept (0028,1052)")
    try:
        slope = float(ds.RescaleSlope)
        intercept = float(ds.RescaleIntercept)
    except Exception as err:  # noqa: BLE001 - pydicom parses values lazily and raises many types on bad ones
        raise VolumeFileError(f"{path}: Rescale Slope/Intercept (0028,1053)/(0028,1052) not numeric: {err}") from err
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
        raise VolumeFileError(f"{path}: invalid rescale slope {slope!r} / intercept {intercept!r}")
    return (raw.astype(np.float64) * slope + intercept).astype(np.float32)


def read_dicom_ct(folder: str | os.PathLike, *, max_bytes: int = MAX_IMAGE_BYTES) -> CTVolume:
    """Read one CT series from a folder into a :class:`CTVolume` (HU, LPS mm).

    Parameters
    ----------
    folder : path
        Folder holding the series' files (not searched recursively). Files
        that are DICOM but not CT images (Modality other than ``CT``) are
        skipped; any file that is not readable DICOM is an error.
    max_bytes : int
        Largest volume accepted (bytes of float32 HU, rows x cols x slices x 4),
        checked from the headers before any pixel is decoded.

    Returns
    -------
    CTVolume
        ``hu[k, j, i]`` with ``k`` increasing along the slice normal
        ``row_direction x col_direction``; ``spacing_mm = (col_spacing,
        row_spacing, slice_step)``; ``origin_lps_mm`` the centre of the first
        pixel of the first slice; ``direction`` columns ``(r, c, n)``.

    Raises
    ------
    VolumeFileError
        Folder missing or without a CT series; several series or frames of
        reference mixed; unreadable/corrupt file; inconsistent orientation,
        size or pixel spacing; gantry tilt; missing slices or non-uniform
        spacing (the message gives where the gap is and its size); pixel data
        that cannot be decoded; a volume larger than ``max_bytes``.
    PatientPositionError
        (0018,5100) missing, inconsistent, or not HFS/FFS/HFP/FFP.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeFileError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")
    return read_dicom_ct_files(files, folder, max_bytes=max_bytes)


def read_dicom_ct_files(files: Sequence[str | os.PathLike], where: str | os.PathLike, *,
                        max_bytes: int = MAX_IMAGE_BYTES, datasets: Sequence | None = None) -> CTVolume:
    """Read one CT series from an explicit list of files (e.g. one series of a received study).

    Same checks and result as :func:`read_dicom_ct`; ``where`` names the
    collection (a folder) in messages and becomes the volume's ``source``.

    Raises
    ------
    VolumeFileError, PatientPositionError
        As :func:`read_dicom_ct`.
    """
    folder = Path(where)
    files = [Path(p) for p in files]
    given = list(datasets) if datasets is not None and len(datasets) == len(files) else [None] * len(files)
    headers = [h for h in (_read_header(p, d) for p, d in zip(files, given)) if h is not None]
    if not headers:
        raise VolumeFileError(f"{folder}: no CT series found ({len(files)} files, none a CT image)")
    series = sorted({h.series_uid for h in headers})
    if len(series) > 1:
        raise VolumeFileError(f"{folder}: {len(series)} CT series mixed (Series Instance UIDs {series}); expected one")
    frames = sorted({h.frame_uid for h in headers})
    if len(frames) > 1:
        raise VolumeFileError(
            f"{folder}: {len(frames)} Frames of Reference mixed (Frame of Reference UIDs {frames}); expected one"
        )
    if len(headers) < 2:
        raise VolumeFileError(f"{folder}: the CT series has only one slice; a volume needs at least two")
    _check_consistent(headers, folder)
    position = _patient_position(headers, folder)
    row_dir = headers[0].orientation[:3]
    col_dir = headers[0].orientation[3:]
    for what, v in (("row", row_dir), ("column", col_dir)):
        if abs(np.linalg.norm(v) - 1.0) > ORIENTATION_TOL:
            raise VolumeFileError(
                f"{folder}: Image Orientation (Patient) {what} direction {v.tolist()} is not a unit vector"
            )
    if abs(float(row_dir @ col_dir)) > ORIENTATION_TOL:
        raise VolumeFileError(
            f"{folder}: Image Orientation (Patient) row and column directions are not perpendicular "
            f"(dot product {float(row_dir @ col_dir):.3g})"
        )
    normal = np.cross(row_dir, col_dir)
    headers, slice_step_mm = _sort_and_check_spacing(headers, folder, normal)
    volume_bytes = headers[0].rows * headers[0].cols * len(headers) * np.dtype(np.float32).itemsize
    if volume_bytes > max_bytes:
        raise VolumeFileError(f"{folder}: the CT series is {headers[0].rows}x{headers[0].cols}x{len(headers)} voxels "
                              f"({volume_bytes} bytes as float32), more than the {max_bytes}-byte limit")
    hu = np.stack([_read_pixels_hu(h) for h in headers])
    row_sp, col_sp = headers[0].pixel_spacing_mm
    return CTVolume(
        hu=hu,
        spacing_mm=(col_sp, row_sp, slice_step_mm),
        origin_lps_mm=headers[0].position_lps_mm,
        direction=np.column_stack([row_dir, col_dir, normal]),
        patient_position=position,
        source=str(folder),
    )
