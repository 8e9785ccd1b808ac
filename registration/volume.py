"""Planning CT volumes: the voxel grid, its LPS geometry, the patient position and the room mapping.

A :class:`CTVolume` holds Hounsfield units as a numpy array indexed
``[k, j, i]`` (slice, row, column; SimpleITK's numpy view), with the voxel
``(i, j, k)`` centred at ``origin + direction @ (spacing * (i, j, k))`` in
DICOM patient coordinates (LPS, mm). Conversion between SimpleITK's ``(x, y,
z)`` ordering and numpy's ``[z, y, x]`` happens here, once.

CT to room at perfect setup (docs/CONVENTIONS.md), with ``d = p_lps - iso_lps``:

====  ======  ======  ======
pos   X       Y       Z
====  ======  ======  ======
HFS   d_x     d_z     -d_y
FFS   -d_x    -d_z    -d_y
HFP   -d_x    d_z     d_y
FFP   d_x     -d_z    d_y
====  ======  ======  ======
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from spineguide.calibration.foundation import enum_member
from spineguide.calibration.foundation import readonly_array as _readonly

from .errors import PatientPositionError, VolumeError

__all__ = [
    "PatientPosition",
    "CTVolume",
    "room_from_lps_matrix",
    "PATIENT_POSITION_KEY",
]

if TYPE_CHECKING:
    import SimpleITK as sitk

_INT16 = np.iinfo(np.int16)

#: Metadata key under which spineguide stores the patient position in .mha/.nrrd/.nii files.
PATIENT_POSITION_KEY = "spineguide_patient_position"

_ROOM_FROM_LPS = {
    "HFS": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 0, -1), (0, -1, 0)),
    "HFP": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
}


class PatientPosition(Enum):
    """DICOM (0018,5100) Patient Position values spineguide supports."""

    HFS = "HFS"
    FFS = "FFS"
    HFP = "HFP"
    FFP = "FFP"

    @classmethod
    def parse(cls, value: object, where: str = "") -> "PatientPosition":
        """Parse a patient position; decubitus and unknown values are an error, never HFS."""
        if isinstance(value, PatientPosition):
            return value
        text = str(value).strip().upper() if value is not None else ""
        prefix = f"{where}: " if where else ""
        return enum_member(cls, text, PatientPositionError,
                           f"{prefix}patient position {value!r} is not supported (supported: HFS, FFS, HFP, FFP)")


def room_from_lps_matrix(position: PatientPosition) -> np.ndarray:
    """3x3 rotation taking an LPS displacement (mm) to the room frame at perfect setup."""
    return np.array(_ROOM_FROM_LPS[PatientPosition.parse(position).value], dtype=np.float64)


def _whole_hu_as_int16(hu: np.ndarray) -> np.ndarray | None:
    """An int16 copy of ``hu`` ([k, j, i]) if every voxel is a whole number within int16's range, else None.

    Exact: each int16 value converts back to the very number stored (float or integer). Checked
    slice by slice, so no volume-sized temporary is made besides the copy.
    """
    if hu.ndim != 3 or hu.size == 0 or hu.dtype.kind not in "iuf":
        return None
    if hu.dtype == np.int16:
        return hu.copy()
    out = np.empty(hu.shape, dtype=np.int16)
    for k in range(hu.shape[0]):
        plane = hu[k]
        if hu.dtype.kind == "f" and not np.array_equal(plane, np.rint(plane)):
            return None  # fractional, NaN or infinite values: not whole HU
        if plane.min() < _INT16.min or plane.max() > _INT16.max:
            return None
        out[k] = plane
    return out



@dataclass(frozen=True, slots=True)
class CTVolume:
    """A planning CT in Hounsfield units on a regular grid in LPS.

    Attributes
    ----------
    hu : (nk, nj, ni) float32 array, or int16
        Hounsfield units, ``hu[k, j, i]``; finite everywhere. int16 only when
        given as int16 (e.g. ``read_ct(..., keep_integer_hu=True)`` of a file
        storing whole HU): half the memory; every other dtype becomes float32.
    spacing_mm : (3,) array
        Voxel size along i, j, k (x, y, z in SimpleITK terms), mm.
    origin_lps_mm : (3,) array
        Centre of voxel (0, 0, 0), LPS mm.
    direction : (3, 3) array
        Columns are the LPS unit directions of increasing i, j, k.
    patient_position : PatientPosition
    source : str
        Where the volume came from (file path), for messages.
    """

    hu: np.ndarray
    spacing_mm: np.ndarray
    origin_lps_mm: np.ndarray
    direction: np.ndarray
    patient_position: PatientPosition
    source: str = "<memory>"
    _lps_from_index: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = self.source
        hu = np.asarray(self.hu)
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise VolumeError(f"{where}: CT must be a 3D array, got shape {hu.shape}")
        hu = np.ascontiguousarray(hu, dtype=np.int16 if hu.dtype == np.int16 else np.float32)
        if hu.dtype == np.float32 and not np.all(np.isfinite(hu)):
            raise VolumeError(f"{where}: CT holds {int(np.count_nonzero(~np.isfinite(hu)))} non-finite voxels")
        # Keep a private copy unless the caller's array is already read-only and owns its memory
        # (a fresh array handed over, as from_sitk does): a writeable one could change under us.
        if hu is self.hu and (hu.flags.writeable or not hu.flags.owndata):
            hu = hu.copy()
        hu.setflags(write=False)
        spacing = np.asarray(self.spacing_mm, dtype=np.float64)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise VolumeError(f"{where}: voxel spacing must be three positive numbers, got {spacing.tolist()}")
        origin = np.asarray(self.origin_lps_mm, dtype=np.float64)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise VolumeError(f"{where}: origin must be three finite numbers, got {origin.tolist()}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-4:
            raise VolumeError(
                f"{where}: voxel axes are not orthonormal (sheared grid, e.g. gantry tilt); resample first"
            )
        set_ = object.__setattr__
        set_(self, "hu", hu)
        set_(self, "spacing_mm", _readonly(spacing))
        set_(self, "origin_lps_mm", _readonly(origin))
        set_(self, "direction", _readonly(direction))
        set_(self, "patient_position", PatientPosition.parse(self.patient_position, where))
        m = np.eye(4)
        m[:3, :3] = direction * spacing[None, :]
        m[:3, 3] = origin
        set_(self, "_lps_from_index", _readonly(m))

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        nk, nj, ni = self.hu.shape
        return ni, nj, nk

    @property
    def lps_from_index(self) -> np.ndarray:
        """4x4 affine: voxel index ``(i, j, k, 1)`` -> LPS mm."""
        return self._lps_from_index

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices ``(N, 3)`` ``(i, j, k)`` (may be fractional) -> LPS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self._lps_from_index[:3, :3].T + self._lps_from_index[:3, 3]

    def lps_to_index(self, lps_mm: np.ndarray) -> np.ndarray:
        """LPS mm ``(N, 3)`` -> fractional voxel indices ``(i, j, k)``."""
        lps = np.asarray(lps_mm, dtype=np.float64)
        return np.linalg.solve(self._lps_from_index[:3, :3], (lps - self._lps_from_index[:3, 3]).T).T

    def contains_lps_mm(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """Which planning-CT LPS points (mm, ``(N, 3)`` or ``(3,)``) lie inside the volume.

        Inside means within the grid's extent: voxel centres plus half a voxel
        on every side. Returns an ``(N,)`` bool array (non-finite points are outside).
        """
        pts = np.atleast_2d(np.asarray(points_lps_mm, dtype=np.float64))
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise VolumeError(f"{self.source}: points must be (N, 3) LPS mm, got shape {pts.shape}")
        finite = np.all(np.isfinite(pts), axis=1)
        idx = self.lps_to_index(np.where(finite[:, None], pts, 0.0))
        upper = np.array(self.shape_ijk, dtype=np.float64) - 0.5
        return finite & np.all((idx >= -0.5) & (idx <= upper), axis=1)

    def room_from_index(self, isocentre_lps_mm: Sequence[float]) -> np.ndarray:
        """4x4 affine: voxel index ``(i, j, k, 1)`` -> room mm at perfect setup.

        ``isocentre_lps_mm`` is the plan isocentre in this CT's LPS frame (mm).
        """
        iso = np.asarray(isocentre_lps_mm, dtype=np.float64)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise VolumeError(f"{self.source}: isocentre must be three finite LPS numbers (mm), got {iso.tolist()}")
        r = room_from_lps_matrix(self.patient_position)
        m = np.eye(4)
        m[:3, :3] = r @ self._lps_from_index[:3, :3]
        m[:3, 3] = r @ (self._lps_from_index[:3, 3] - iso)
        return m

    def lps_to_room(self, lps_mm: np.ndarray, isocentre_lps_mm: Sequence[float]) -> np.ndarray:
        """Planning-CT LPS points (mm) -> room points (mm) at perfect setup."""
        r = room_from_lps_matrix(self.patient_position)
        return (np.asarray(lps_mm, dtype=np.float64) - np.asarray(isocentre_lps_mm, dtype=np.float64)) @ r.T

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (HU, float32 or int16 as held), patient position in its metadata."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.hu))
        img.SetSpacing(tuple(float(s) for s in self.spacing_mm))
        img.SetOrigin(tuple(float(o) for o in self.origin_lps_mm))
        img.SetDirection(tuple(float(d) for d in self.direction.ravel()))
        img.SetMetaData(PATIENT_POSITION_KEY, self.patient_position.value)
        # NIfTI has no free metadata: its 80-character `descrip` field (ITK_FileNotes) carries it.
        img.SetMetaData("ITK_FileNotes", f"{PATIENT_POSITION_KEY}={self.patient_position.value}")
        return img

    @classmethod
    def from_sitk(cls, image: sitk.Image, patient_position: PatientPosition | str, source: str = "<memory>", *,
                  keep_integer_hu: bool = False) -> "CTVolume":
        """From a SimpleITK image in HU (its ``(x, y, z)`` metadata converted to ``[k, j, i]``).

        ``keep_integer_hu``: an image of whole numbers that all fit int16 (any pixel type; e.g. a
        CT stored as int16, or float32 converted from DICOM) gives int16 ``hu`` instead of
        float32: half the memory, the same numbers.
        """
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise VolumeError(f"{source}: CT must be 3D, got a {image.GetDimension()}D image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError(f"{source}: CT must be scalar, got {image.GetNumberOfComponentsPerPixel()} components")
        view = sitk.GetArrayViewFromImage(image)  # valid while `image` lives: copied once below
        hu = _whole_hu_as_int16(view) if keep_integer_hu else None
        if hu is None:
            hu = view.astype(np.float32)
        hu.setflags(write=False)  # a fresh array nobody else holds: CTVolume keeps it without a second copy
        return cls(
            hu=hu,
            spacing_mm=image.GetSpacing(),
            origin_lps_mm=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            patient_position=patient_position,
            source=source,
        )

    def downsampled(self, factor: int | Sequence[int]) -> "CTVolume":
        """One level of a resolution pyramid: average of ``factor`` voxels per axis.

        ``factor`` is one integer or ``(fi, fj, fk)``. Voxels that do not fill
        a whole block at the far edge are dropped; the physical position of
        every kept block is exact (SimpleITK ``BinShrink``).
        """
        f = (int(factor),) * 3 if np.isscalar(factor) else tuple(int(x) for x in factor)
        if len(f) != 3 or min(f) < 1:
            raise VolumeError(f"{self.source}: pyramid factor must be positive integers, got {factor!r}")
        if f == (1, 1, 1):
            return self
        import SimpleITK as sitk

        image = self.to_sitk()
        if self.hu.dtype != np.float32:  # average whole-HU voxels in float, not rounded to integers
            image = sitk.Cast(image, sitk.sitkFloat32)
        shrunk = sitk.BinShrink(image, f)
        return CTVolume.from_sitk(shrunk, self.patient_position, f"{self.source} (binned {f[0]}x{f[1]}x{f[2]})")

    def pyramid(self, levels: int, factor: int = 2) -> list["CTVolume"]:
        """``[full, /factor, /factor^2, ...]``, ``levels`` entries, finest first."""
        out = [self]
        for _ in range(levels - 1):
            out.append(out[-1].downsampled(factor))
        return out

