"""Digitally reconstructed radiographs: line integrals through a CT at a patient pose.

A DRR pixel is ``int mu ds`` (dimensionless) along the ray from the imager's
source to the pixel centre, through the voxel-constant attenuation volume
placed in the room at the given patient pose. It is the quantity a raw kV
frame gives as ``-ln(I / i0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from calibration.geometry import ImagerGeometry

from . import _kernels
from .attenuation import DEFAULT_CT_ENERGY_KEV, DEFAULT_IMAGING_ENERGY_KEV, hu_to_mu_per_mm
from .errors import DRRError
from .pose import Pose
from .volume import CTVolume

__all__ = ["AttenuationVolume", "PanelRegion", "compute_drr"]


@dataclass(frozen=True, slots=True)
class PanelRegion:
    """A rectangle of panel pixels: rows ``row0 .. row0+rows-1``, cols ``col0 .. col0+cols-1``."""

    row0: int
    col0: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("row0", "col0", "rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise DRRError(f"PanelRegion.{name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.rows < 1 or self.cols < 1 or self.row0 < 0 or self.col0 < 0:
            raise DRRError(f"PanelRegion must have non-negative start and positive size, got {self}")

    @classmethod
    def whole(cls, imager: ImagerGeometry) -> "PanelRegion":
        return cls(0, 0, imager.rows, imager.cols)

    @classmethod
    def centred(cls, imager: ImagerGeometry, centre_col_row: Sequence[float], rows: int, cols: int) -> "PanelRegion":
        """A ``rows x cols`` region centred on a pixel position, clipped to the panel."""
        r0 = int(round(centre_col_row[1] - (rows - 1) / 2.0))
        c0 = int(round(centre_col_row[0] - (cols - 1) / 2.0))
        r0 = min(max(r0, 0), max(imager.rows - rows, 0))
        c0 = min(max(c0, 0), max(imager.cols - cols, 0))
        return cls(r0, c0, min(rows, imager.rows), min(cols, imager.cols))

    def check_inside(self, imager: ImagerGeometry) -> None:
        if self.row0 + self.rows > imager.rows or self.col0 + self.cols > imager.cols:
            raise DRRError(
                f"imager '{imager.name}': region rows {self.row0}..{self.row0 + self.rows - 1}, cols "
                f"{self.col0}..{self.col0 + self.cols - 1} exceeds the {imager.rows}x{imager.cols} panel"
            )

    def pixel_centres(self, binning: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Full-panel ``cols``, ``rows`` coordinates of the output pixel centres at ``binning``."""
        half = (binning - 1) / 2.0
        cols = self.col0 + half + binning * np.arange(self.cols // binning)
        rows = self.row0 + half + binning * np.arange(self.rows // binning)
        return cols, rows


@dataclass(frozen=True, slots=True)
class AttenuationVolume:
    """Linear attenuation on a voxel grid, placed in the room at perfect setup.

    Attributes
    ----------
    mu_per_mm : (nk, nj, ni) float32, C-contiguous, read-only
        Attenuation in 1/mm.
    room_from_index : (4, 4) array
        Voxel index ``(i, j, k, 1)`` -> room mm at perfect setup (patient pose identity).
    """

    mu_per_mm: np.ndarray
    room_from_index: np.ndarray
    _index_from_room: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mu = np.ascontiguousarray(self.mu_per_mm, dtype=np.float32)
        if mu.ndim != 3:
            raise DRRError(f"attenuation volume must be 3D, got shape {mu.shape}")
        if not np.all(np.isfinite(mu)) or np.any(mu < 0):
            raise DRRError("attenuation volume must be finite and non-negative")
        if mu is self.mu_per_mm and mu.flags.writeable:
            mu = mu.copy()
        mu.setflags(write=False)
        m = np.array(self.room_from_index, dtype=np.float64)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise DRRError("room_from_index must be a finite 4x4 matrix")
        object.__setattr__(self, "mu_per_mm", mu)
        m.setflags(write=False)
        object.__setattr__(self, "room_from_index", m)
        inv = np.linalg.inv(m)
        inv.setflags(write=False)
        object.__setattr__(self, "_index_from_room", inv)

    @classmethod
    def from_ct(
        cls,
        ct: CTVolume,
        isocentre_lps_mm: Sequence[float],
        energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
        ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV,
    ) -> "AttenuationVolume":
        """Attenuation of a planning CT at an effective kV energy, isocentre in CT LPS mm."""
        return cls(hu_to_mu_per_mm(ct.hu, energy_kev, ct_energy_kev), ct.room_from_index(isocentre_lps_mm))

    def masked(self, mask: np.ndarray, margin_voxels: int = 1) -> "AttenuationVolume":
        """Only the voxels inside a 3D mask (same ``[k, j, i]`` grid), cropped to the mask's bounding box.

        Voxels outside the mask count as empty (``mu = 0``): a DRR of a single
        vertebra. ``margin_voxels`` of zeros are kept around the box.
        """
        m = np.asarray(mask)
        if m.shape != self.mu_per_mm.shape:
            raise DRRError(f"mask shape {m.shape} does not match the volume {self.mu_per_mm.shape}")
        inside = m != 0
        if not np.any(inside):
            raise DRRError("mask selects no voxel")
        lo = [max(int(np.min(ix)) - margin_voxels, 0) for ix in np.nonzero(inside)]
        hi = [int(np.max(ix)) + 1 + margin_voxels for ix in np.nonzero(inside)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        mu = np.where(inside[sl], self.mu_per_mm[sl], np.float32(0.0))
        shift = np.eye(4)
        shift[:3, 3] = [lo[2], lo[1], lo[0]]  # (i, j, k) offset of the crop
        return AttenuationVolume(mu, self.room_from_index @ shift)

    def downsampled(self, factor: int) -> "AttenuationVolume":
        """Average of ``factor^3`` voxel blocks (a pyramid level); far-edge remainder dropped."""
        f = int(factor)
        if f < 1:
            raise DRRError(f"pyramid factor must be >= 1, got {factor}")
        if f == 1:
            return self
        nk, nj, ni = (s // f for s in self.mu_per_mm.shape)
        if min(nk, nj, ni) < 1:
            raise DRRError(f"volume {self.mu_per_mm.shape} too small for factor {f}")
        mu = self.mu_per_mm[: nk * f, : nj * f, : ni * f].reshape(nk, f, nj, f, ni, f).mean(axis=(1, 3, 5))
        # New voxel (0,0,0) centre sits at old index (f-1)/2; new index step is f.
        scale = np.diag([f, f, f, 1.0])
        scale[:3, 3] = (f - 1) / 2.0
        return AttenuationVolume(mu.astype(np.float32), self.room_from_index @ scale)

    @property
    def index_from_room(self) -> np.ndarray:
        return self._index_from_room


def compute_drr(
    volume: AttenuationVolume,
    imager: ImagerGeometry,
    pose: Pose | None = None,
    region: PanelRegion | None = None,
    binning: int = 1,
) -> np.ndarray:
    """DRR of ``volume`` at patient ``pose`` for one imager.

    Parameters
    ----------
    volume : AttenuationVolume
        Attenuation (1/mm) placed in the room at perfect setup.
    imager : ImagerGeometry
        Source and panel, room frame.
    pose : Pose, optional
        Patient pose (CONVENTIONS): the volume is moved by ``p -> R p + t``
        before projection. Identity if omitted.
    region : PanelRegion, optional
        Panel pixels to compute (whole panel if omitted), in full-resolution
        pixel indices.
    binning : int
        Output pixel = ``binning x binning`` panel pixels (one ray through the
        centre of the bin); trailing pixels that do not fill a bin are dropped.

    Returns
    -------
    (rows, cols) float32
        Line integrals ``int mu ds``; output pixel ``[r, c]`` is centred at
        full-panel ``(col0 + c b + (b-1)/2, row0 + r b + (b-1)/2)``.
    """
    if isinstance(binning, bool) or not isinstance(binning, (int, np.integer)) or binning < 1:
        raise DRRError(f"binning must be a positive integer, got {binning!r}")
    region = PanelRegion.whole(imager) if region is None else region
    region.check_inside(imager)
    out_rows, out_cols = region.rows // binning, region.cols // binning
    if out_rows < 1 or out_cols < 1:
        raise DRRError(f"region {region.rows}x{region.cols} is smaller than one {binning}x{binning} bin")
    pose = Pose.identity() if pose is None else pose
    # Moving the patient by P is the same as moving the imager by P^-1.
    index_from_actual_room = volume.index_from_room @ pose.inverse().matrix
    cols, rows = region.pixel_centres(binning)
    p0_mm = imager.pixel_to_room(np.array([cols[0], rows[0]]))
    row_sp, col_sp = imager.pixel_spacing_mm
    du_mm = imager.col_direction * col_sp * binning
    dv_mm = imager.row_direction * row_sp * binning
    lin = index_from_actual_room[:3, :3]
    off = index_from_actual_room[:3, 3]
    src_mm = np.ascontiguousarray(imager.source_mm, dtype=np.float64)
    return _kernels.siddon_drr(
        volume.mu_per_mm,
        lin @ src_mm + off,
        lin @ p0_mm + off,
        lin @ du_mm,
        lin @ dv_mm,
        src_mm,
        np.ascontiguousarray(p0_mm),
        np.ascontiguousarray(du_mm),
        np.ascontiguousarray(dv_mm),
        out_rows,
        out_cols,
    )
