"""The planning CT's files: a DICOM series folder or one SimpleITK volume (``.mha``, ``.nrrd``, ``.nii``) in or out.

Apart from :mod:`spineguide.registration.volume` (the :class:`~spineguide.registration.volume.CTVolume` value and
its geometry) so that the DICOM series reader (:mod:`spineguide.registration.dicom_ct`), which builds a
``CTVolume``, and :func:`read_ct`, which dispatches to it (lazily: pydicom only for a folder), import in one
direction.
"""

from __future__ import annotations

import os
from pathlib import Path

import SimpleITK as sitk

from .errors import PatientPositionError, VolumeError, VolumeFileError
from .imagefile import MAX_IMAGE_BYTES, read_sitk_image
from .volume import PATIENT_POSITION_KEY, CTVolume, PatientPosition

__all__ = ["read_ct", "write_ct"]


# ---------------------------------------------------------------------------- files
# ---------------------------------------------------------------------------- files
_SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")


def read_ct(path: str | os.PathLike, patient_position: PatientPosition | str | None = None, *,
            max_bytes: int = MAX_IMAGE_BYTES, keep_integer_hu: bool = False) -> CTVolume:
    """Read a planning CT from a DICOM series folder or an ``.mha``/``.nrrd``/``.nii`` file.

    Parameters
    ----------
    path : path
        A folder holding one CT series, or a single volume file.
    patient_position : PatientPosition or str, optional
        Required for volume files that do not carry it (spineguide writes it as
        metadata); must agree with the file where both exist. DICOM series
        carry (0018,5100) and may not be overridden differently.
    max_bytes : int
        Largest pixel data (bytes, as declared by the file's header) read;
        checked before any pixel is read (:mod:`spineguide.registration.imagefile`).
    keep_integer_hu : bool
        A volume file whose voxels are all whole HU within int16's range (any
        pixel type) gives int16 ``hu``: half the memory of float32, the same
        numbers (what the DRR writer wants); otherwise, and for DICOM series,
        float32 as always.

    Raises
    ------
    VolumeFileError
        Unreadable file, no or several series, missing or non-uniform slices,
        gantry tilt, a declared size above ``max_bytes`` or larger than the
        file can hold; the message names the file.
    PatientPositionError
        Position missing, unknown, or contradicting the file.
    """
    p = Path(path)
    if p.is_dir():
        from .dicom_ct import read_dicom_ct  # local import: pydicom work only when needed

        vol = read_dicom_ct(p, max_bytes=max_bytes)
        if patient_position is not None and PatientPosition.parse(patient_position) is not vol.patient_position:
            raise PatientPositionError(
                f"{p}: series says patient position {vol.patient_position.value}, "
                f"but {PatientPosition.parse(patient_position).value} was given"
            )
        return vol
    if not p.exists():
        raise VolumeFileError(f"{p}: no such file or folder")
    if not p.name.lower().endswith(_SITK_SUFFIXES):
        raise VolumeFileError(f"{p}: unsupported CT format (expected a DICOM folder or one of {', '.join(_SITK_SUFFIXES)})")
    image = read_sitk_image(p, VolumeFileError, "volume", max_bytes=max_bytes)
    stored = _stored_position(image)
    if stored is None and patient_position is None:
        raise PatientPositionError(
            f"{p}: the file does not record the patient position; give it explicitly (HFS, FFS, HFP or FFP)"
        )
    if stored is not None and patient_position is not None:
        if PatientPosition.parse(stored, str(p)) is not PatientPosition.parse(patient_position):
            raise PatientPositionError(
                f"{p}: file says patient position {stored}, but {PatientPosition.parse(patient_position).value} was given"
            )
    position = PatientPosition.parse(stored if stored is not None else patient_position, str(p))
    if image.GetDimension() != 3:
        raise VolumeFileError(f"{p}: CT must be a 3D image, got {image.GetDimension()}D")
    try:
        return CTVolume.from_sitk(image, position, str(p), keep_integer_hu=keep_integer_hu)
    except VolumeError as err:
        raise VolumeFileError(str(err)) from err


def _stored_position(image: sitk.Image) -> str | None:
    """The patient position a file records: its own key (mha/nrrd) or NIfTI's ``descrip`` note."""
    if image.HasMetaDataKey(PATIENT_POSITION_KEY):
        return image.GetMetaData(PATIENT_POSITION_KEY).strip()
    prefix = f"{PATIENT_POSITION_KEY}="
    for key in ("descrip", "ITK_FileNotes"):
        if image.HasMetaDataKey(key):
            note = image.GetMetaData(key).strip()
            if note.startswith(prefix):
                return note[len(prefix):].strip()
    return None


def write_ct(volume: CTVolume, path: str | os.PathLike) -> Path:
    """Write a CT (HU, float32) as ``.mha``/``.nrrd``/``.nii`` with the patient position as metadata."""
    p = Path(path)
    if not p.name.lower().endswith(_SITK_SUFFIXES):
        raise VolumeFileError(f"{p}: unsupported CT format for writing (use one of {', '.join(_SITK_SUFFIXES)})")
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(), str(p), useCompression=True)
    return p
