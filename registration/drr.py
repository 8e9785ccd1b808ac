"""Digitally reconstructed radiographs: line integrals through a CT at a patient pose.

A DRR pixel is ``int mu ds`` (dimensionless) along the ray from the imager's
source to the pixel centre, through the voxel-constant attenuation volume
placed in the room at the given patient pose. It is the quantity a raw kV
frame gives as ``-ln(I / i0)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry

from . import _joseph_kernels, _kernels
from .attenuation import DEFAULT_CT_ENERGY_KEV, DEFAULT_IMAGING_ENERGY_KEV, hu_to_mu_per_mm, int16_hu_mu_table
from .errors import DRRError
from .pose import Pose
from .volume import CTVolume

__all__ = [
    "AttenuationVolume", "PanelRegion", "compute_drr", "compute_drr_batch", "compute_drr_pose_derivatives",
    "PROJECTORS", "write_drr_images", "DRR_METADATA_PREFIX",
]

#: Rays per batched DRR call below which one thread computes it: a parallel region costs
#: a thread wake-up and a barrier, which on a busy 2-core machine outweighs the work.
SERIAL_RAYS = 40_000

#: Prefix of the metadata keys :func:`write_drr_images` stores in each ``.mha``.
DRR_METADATA_PREFIX = "spineguide_drr_"


#: Line-integral models: the voxel-constant exact integral, and Joseph's slice-interpolating one.
PROJECTORS = ("siddon", "joseph")


def _check_projector(projector: str) -> None:
    if projector not in PROJECTORS:
        raise DRRError(f"projector must be one of {PROJECTORS}, got {projector!r}")


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


def _affine_and_inverse(room_from_index) -> tuple[np.ndarray, np.ndarray]:
    """``room_from_index`` (voxel index -> room mm) checked, and its inverse; both read-only float64 4x4."""
    m = np.array(room_from_index, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise DRRError("room_from_index must be a finite 4x4 matrix")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12 or np.any(m[3] != (0.0, 0.0, 0.0, 1.0)):
        raise DRRError("room_from_index must be an invertible affine 4x4 matrix")
    inv = np.linalg.inv(m)
    m.setflags(write=False)
    inv.setflags(write=False)
    return m, inv


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
    _support_box: np.ndarray = field(init=False, repr=False, compare=False)
    _padded: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mu = np.ascontiguousarray(self.mu_per_mm, dtype=np.float32)
        if mu.ndim != 3:
            raise DRRError(f"attenuation volume must be 3D, got shape {mu.shape}")
        if not np.all(np.isfinite(mu)) or np.any(mu < 0):
            raise DRRError("attenuation volume must be finite and non-negative")
        # Keep a private, read-only copy unless the caller's array is already read-only and
        # owns its memory: a writeable array could change under us, and a view (e.g.
        # SimpleITK's GetArrayViewFromImage) could be freed with the object behind it.
        if mu is self.mu_per_mm and (mu.flags.writeable or not mu.flags.owndata):
            mu = mu.copy()
        mu.setflags(write=False)
        m, inv = _affine_and_inverse(self.room_from_index)
        object.__setattr__(self, "mu_per_mm", mu)
        object.__setattr__(self, "room_from_index", m)
        object.__setattr__(self, "_index_from_room", inv)
        # Rays are clipped to the box of non-zero voxels: air (mu = 0) adds nothing, so
        # skipping it is exact and saves the traversal of the air around the body.
        box = _kernels.support_box(mu, None)
        box.setflags(write=False)
        object.__setattr__(self, "_support_box", box)
        object.__setattr__(self, "_padded", [])  # filled by padded_support() on first use

    def padded_support(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The support box with one layer of zero voxels around it, the index ``(i, j, k)`` of its
        voxel 0, and its planes' non-zero extents (``_joseph_kernels.plane_extents``).

        What the Joseph projector samples (no bounds tests: every sample's neighbours
        exist; samples outside a plane's extent are skipped). Made on first use and kept.
        """
        if not self._padded:  # two threads may both make it the first time: same result, either is kept
            lo_i, lo_j, lo_k, hi_i, hi_j, hi_k = (int(v) for v in self._support_box)
            if hi_i < lo_i:  # empty volume: a single zero voxel
                core = np.zeros((1, 1, 1), dtype=np.float32)
                lo_i = lo_j = lo_k = 0
            else:
                core = self.mu_per_mm[lo_k : hi_k + 1, lo_j : hi_j + 1, lo_i : hi_i + 1]
            mu = np.pad(core, 1)
            mu.setflags(write=False)
            corner = np.array([lo_i - 1, lo_j - 1, lo_k - 1], dtype=np.float64)
            self._padded.append((mu, corner, _joseph_kernels.plane_extents(mu)))
        return self._padded[0]

    @classmethod
    def from_ct(
        cls,
        ct: CTVolume,
        isocentre_lps_mm: Sequence[float],
        energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
        ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV,
    ) -> "AttenuationVolume":
        """Attenuation of a planning CT at an effective kV energy, isocentre in CT LPS mm."""
        mu = hu_to_mu_per_mm(ct.hu, energy_kev, ct_energy_kev)
        mu.setflags(write=False)  # a fresh array nobody else holds: no need to copy it again
        return cls(mu, ct.room_from_index(isocentre_lps_mm))

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

    def downsampled(self, factor: int | tuple[int, int, int]) -> "AttenuationVolume":
        """Average of voxel blocks (a pyramid level); far-edge remainder dropped.

        ``factor``: one integer for every axis, or ``(f_i, f_j, f_k)`` per index axis.
        """
        fs = (factor,) * 3 if isinstance(factor, (int, np.integer)) else tuple(factor)
        if len(fs) != 3 or any(isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1 for f in fs):
            raise DRRError(f"pyramid factor must be an integer >= 1 or three of them, got {factor!r}")
        fi, fj, fk = (int(f) for f in fs)
        if fi == fj == fk == 1:
            return self
        nk, nj, ni = self.mu_per_mm.shape[0] // fk, self.mu_per_mm.shape[1] // fj, self.mu_per_mm.shape[2] // fi
        if min(nk, nj, ni) < 1:
            raise DRRError(f"volume {self.mu_per_mm.shape} too small for factor {factor}")
        mu = self.mu_per_mm[: nk * fk, : nj * fj, : ni * fi].reshape(nk, fk, nj, fj, ni, fi).mean(axis=(1, 3, 5))
        # New voxel (0,0,0) centre sits at old index (f-1)/2 along each axis; the new index step is f.
        scale = np.diag([fi, fj, fk, 1.0])
        scale[:3, 3] = [(fi - 1) / 2.0, (fj - 1) / 2.0, (fk - 1) / 2.0]
        return AttenuationVolume(mu.astype(np.float32), self.room_from_index @ scale)

    @property
    def index_from_room(self) -> np.ndarray:
        return self._index_from_room


def _panel_rays(imager: ImagerGeometry, region: PanelRegion | None, binning: int):
    """Checked binning and region; output pixel centres (full-panel col, row) and the imager's
    source, pixel-(0, 0) centre and column / row steps in room mm, float64."""
    if isinstance(binning, bool) or not isinstance(binning, (int, np.integer)) or binning < 1:
        raise DRRError(f"binning must be a positive integer, got {binning!r}")
    region = PanelRegion.whole(imager) if region is None else region
    region.check_inside(imager)
    if region.rows // binning < 1 or region.cols // binning < 1:
        raise DRRError(f"region {region.rows}x{region.cols} is smaller than one {binning}x{binning} bin")
    cols_px, rows_px = region.pixel_centres(binning)
    row_sp, col_sp = imager.pixel_spacing_mm
    return (
        np.ascontiguousarray(cols_px, dtype=np.float64),
        np.ascontiguousarray(rows_px, dtype=np.float64),
        np.ascontiguousarray(imager.source_mm, dtype=np.float64),
        np.ascontiguousarray(imager.origin_mm, dtype=np.float64),
        np.ascontiguousarray(imager.col_direction * col_sp, dtype=np.float64),
        np.ascontiguousarray(imager.row_direction * row_sp, dtype=np.float64),
    )


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
    return _siddon_drr(volume.mu_per_mm, None, volume._support_box, volume.index_from_room, imager, pose, region,
                       binning)


def _siddon_drr(values, mu_table, support_box, index_from_room, imager, pose, region, binning) -> np.ndarray:
    """:func:`compute_drr` of ``values`` (float32 mu, or int16 codes read through ``mu_table``; see
    ``_kernels.siddon_drr``) placed in the room by ``index_from_room`` (room mm -> voxel index)."""
    cols_px, rows_px, src_mm, origin_mm, du_mm, dv_mm = _panel_rays(imager, region, binning)
    pose = Pose.identity() if pose is None else pose
    # Moving the patient by P is the same as moving the imager by P^-1.
    index_from_actual_room = index_from_room @ pose.inverse().matrix
    lin = index_from_actual_room[:3, :3]
    off = index_from_actual_room[:3, 3]
    return _kernels.siddon_drr(
        values, mu_table, support_box, lin @ src_mm + off, lin @ origin_mm + off, lin @ du_mm, lin @ dv_mm,
        src_mm, origin_mm, du_mm, dv_mm, cols_px, rows_px,
    )


def _ray_mask(rays, rows: int, cols: int) -> np.ndarray:
    """``rays`` checked against the output grid, as the kernels' uint8 mask (``(0, 0)``: every pixel)."""
    if rays is None:
        return np.zeros((0, 0), dtype=np.uint8)
    m = np.asarray(rays)
    if m.shape != (rows, cols) or m.dtype != np.bool_:
        raise DRRError(f"rays must be a bool array of the output's shape {(rows, cols)}, got {m.dtype} {m.shape}")
    return np.ascontiguousarray(m, dtype=np.uint8)


def compute_drr_batch(
    volume: AttenuationVolume,
    imager: ImagerGeometry,
    poses: Sequence[Pose],
    region: PanelRegion | None = None,
    binning: int = 1,
    parallel: bool | None = None,
    projector: str = "siddon",
    rays: np.ndarray | None = None,
) -> np.ndarray:
    """DRRs of ``volume`` at several patient poses for one imager, in one kernel call.

    The same as ``np.stack([compute_drr(volume, imager, p, region, binning) for p in poses])``
    (bit for bit), but the rays of all poses share one parallel loop: a Jacobian's 12
    displaced poses cost one thread start and one barrier instead of twelve.

    Parameters
    ----------
    volume, imager, region, binning
        As for :func:`compute_drr` (room frame, full-panel pixel indices).
    poses : sequence of Pose
        Patient poses (room frame, CONVENTIONS), at least one.
    parallel : bool, optional
        Force the parallel (True) or the single-thread (False) kernel; by default
        parallel when the batch has at least :data:`SERIAL_RAYS` rays.
    projector : {"siddon", "joseph"}
        ``"siddon"``: the exact line integral of the voxel-constant volume;
        ``"joseph"``: the slice-interpolating projector (:data:`PROJECTORS`),
        always on the calling thread.
    rays : (rows, cols) bool array, optional
        Joseph only: trace only these output pixels (the others are 0), e.g. the
        pixels a masked comparison reads; all by default.

    Returns
    -------
    (n_poses, rows, cols) float32
        Line integrals, item ``k`` at ``poses[k]``.
    """
    _check_projector(projector)
    poses = list(poses)
    if not poses or not all(isinstance(p, Pose) for p in poses):
        raise DRRError(f"poses must be a non-empty sequence of Pose, got {len(poses)} items")
    cols_px, rows_px, src_mm, origin_mm, du_mm, dv_mm = _panel_rays(imager, region, binning)
    out_rows, out_cols = rows_px.size, cols_px.size
    n = len(poses)
    src_idx, origin_idx, du_idx, dv_idx = (np.empty((n, 3)) for _ in range(4))
    for k, pose in enumerate(poses):
        # Moving the patient by P is the same as moving the imager by P^-1.
        m = volume.index_from_room @ pose.inverse().matrix
        lin, off = m[:3, :3], m[:3, 3]
        src_idx[k] = lin @ src_mm + off
        origin_idx[k] = lin @ origin_mm + off
        du_idx[k] = lin @ du_mm
        dv_idx[k] = lin @ dv_mm
    ray_mask = _ray_mask(rays, rows_px.size, cols_px.size)
    if projector == "joseph":
        mu, corner, planes = volume.padded_support()
        return _joseph_kernels.joseph_drr_batch(
            mu, planes, src_idx - corner, origin_idx - corner, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm,
            cols_px, rows_px, ray_mask,
        )
    if rays is not None:
        raise DRRError("rays (a subset of pixels) is available with the Joseph projector only")
    if parallel is None:
        parallel = n * out_rows * out_cols >= SERIAL_RAYS
    kernel = _kernels.siddon_drr_batch if parallel else _kernels.siddon_drr_batch_serial
    return kernel(
        volume.mu_per_mm, volume._support_box, src_idx, origin_idx, du_idx, dv_idx, src_mm, origin_mm, du_mm, dv_mm,
        cols_px, rows_px,
    )


def compute_drr_pose_derivatives(
    volume: AttenuationVolume,
    imager: ImagerGeometry,
    pose: Pose,
    pose_derivatives: np.ndarray,
    region: PanelRegion | None = None,
    binning: int = 1,
    rays: np.ndarray | None = None,
) -> np.ndarray:
    """A Joseph DRR and its exact derivatives with respect to pose parameters, in one pass.

    The projector is Joseph's slice-interpolating one (``projector="joseph"`` of
    :func:`compute_drr_batch`), which varies smoothly with the pose, so its
    derivatives describe the DRR over sub-voxel motions. (The voxel-constant
    Siddon integral has exact derivatives too, but for rays running nearly
    parallel to thick CT slices they change at every voxel edge a crossing
    point passes: a poor guide beyond hundredths of a millimetre.) On the
    calling thread; the pass costs about 1.3 Joseph DRRs, where central
    differences cost two DRRs per parameter.

    Parameters
    ----------
    volume, imager, region, binning
        As for :func:`compute_drr` (room frame, full-panel pixel indices).
    pose : Pose
        Patient pose (room frame, CONVENTIONS) at which to differentiate.
    pose_derivatives : (n, 4, 4) array
        ``d pose.matrix / d x_p`` for each parameter ``x_p`` (room frame; units
        of the matrix per unit of the parameter, e.g. per mm or per degree).
    rays : (rows, cols) bool array, optional
        Trace only these output pixels (the others are 0 in every item); all by default.

    Returns
    -------
    (1 + n, rows, cols) float32
        Item 0: the Joseph DRR (line integrals, equal to
        ``compute_drr_batch(..., projector="joseph")``); item ``1 + p``: ``d DRR / d x_p`` (per unit of ``x_p``).
    """
    if not isinstance(pose, Pose):
        raise DRRError(f"pose must be a Pose, got {type(pose).__name__}")
    dp = np.asarray(pose_derivatives, dtype=np.float64)
    if dp.ndim != 3 or dp.shape[1:] != (4, 4) or not np.all(np.isfinite(dp)):
        raise DRRError(f"pose_derivatives must be a finite (n, 4, 4) array, got shape {dp.shape}")
    cols_px, rows_px, src_mm, origin_mm, du_mm, dv_mm = _panel_rays(imager, region, binning)
    # Moving the patient by P is moving the imager by P^-1: index <- room is M = I P^-1 and
    # d(P^-1) = -P^-1 dP P^-1.
    inv = pose.inverse().matrix
    m = volume.index_from_room @ inv
    dm = -np.einsum("ij,jk,nkl,lm->nim", volume.index_from_room, inv, dp, inv)

    def moved(mat, vec, affine):
        return mat[..., :3, :3] @ vec + (mat[..., :3, 3] if affine else 0.0)

    mu, corner, planes = volume.padded_support()
    return _joseph_kernels.joseph_drr_pose_derivatives(
        mu, planes,
        moved(m, src_mm, True) - corner, moved(m, origin_mm, True) - corner, moved(m, du_mm, False),
        moved(m, dv_mm, False),
        np.ascontiguousarray(moved(dm, src_mm, True)), np.ascontiguousarray(moved(dm, origin_mm, True)),
        np.ascontiguousarray(moved(dm, du_mm, False)), np.ascontiguousarray(moved(dm, dv_mm, False)),
        src_mm, origin_mm, du_mm, dv_mm,
        cols_px, rows_px, _ray_mask(rays, rows_px.size, cols_px.size),
    )


def write_drr_images(
    ct: CTVolume,
    geometry: StereoGeometry,
    isocentre_lps_mm: Sequence[float],
    out_dir: str | os.PathLike,
    pose: Pose | None = None,
    imagers: Sequence[str] | None = None,
    energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
    ct_energy_kev: float = DEFAULT_CT_ENERGY_KEV,
) -> dict[str, Path]:
    """Write each imager's full-panel DRR (line integrals) as a float32 ``.mha``.

    Parameters
    ----------
    ct : CTVolume
        Planning CT (HU, LPS) with its patient position. int16 HU (``read_ct(...,
        keep_integer_hu=True)``) are projected through :func:`int16_hu_mu_table`
        with no attenuation volume made: the same images bit for bit as from the
        float32 HU, at a quarter of the memory of float32 HU plus attenuation.
    geometry : StereoGeometry
        Imagers in the room frame (mm).
    isocentre_lps_mm : (3,) sequence
        Plan isocentre in the CT's LPS frame, mm.
    out_dir : path
        Folder to write into (created if missing); files are ``drr_<imager>.mha``.
    pose : Pose, optional
        Patient pose (CONVENTIONS: ``p_actual = R p_planned + t``, room frame,
        mm); identity if omitted.
    imagers : sequence of str, optional
        Imager names to render; all imagers of ``geometry`` if omitted.
    energy_kev, ct_energy_kev : float
        Effective imaging and CT energies for the HU -> mu model, keV.

    Returns
    -------
    dict
        Imager name -> path written. Each image is ``rows x cols`` float32,
        one pixel per panel pixel, ``image[row, col]`` (SimpleITK x = column,
        y = row), spacing ``(col_spacing, row_spacing)`` mm of the panel,
        origin ``(0, 0)``; metadata keys ``spineguide_drr_imager``,
        ``..._pose_translation_mm``, ``..._pose_rotation_deg``,
        ``..._isocentre_lps_mm``, ``..._energy_kev``, ``..._quantity``.

    Raises
    ------
    DRRError
        An imager name that the geometry does not have (named), or no imager.
    """
    names = list(geometry.names if imagers is None else imagers)
    if not names:
        raise DRRError("no imager selected for the DRR")
    for name in names:
        if name not in geometry.names:
            raise DRRError(f"imager '{name}' is not in the geometry (imagers: {', '.join(geometry.names)})")
    pose = Pose.identity() if pose is None else pose
    if ct.hu.dtype == np.int16:
        # Whole HU kept as int16 (read_ct(..., keep_integer_hu=True)): project the codes through a
        # 65,536-entry attenuation table instead of converting the volume; the same float32 mu per
        # voxel, so the same line integrals bit for bit, in half the memory of a float32 volume.
        mu_table = int16_hu_mu_table(energy_kev, ct_energy_kev)
        values, box = ct.hu, _kernels.support_box(ct.hu, mu_table)
        _, index_from_room = _affine_and_inverse(ct.room_from_index(isocentre_lps_mm))
    else:
        volume = AttenuationVolume.from_ct(ct, isocentre_lps_mm, energy_kev, ct_energy_kev)
        values, mu_table, box, index_from_room = volume.mu_per_mm, None, volume._support_box, volume.index_from_room
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    translation_mm, rotation_deg = pose.six()
    meta = {
        "pose_translation_mm": json.dumps([float(x) for x in translation_mm]),
        "pose_rotation_deg": json.dumps([float(x) for x in rotation_deg]),
        "isocentre_lps_mm": json.dumps([float(x) for x in np.asarray(isocentre_lps_mm, dtype=np.float64)]),
        "energy_kev": repr(float(energy_kev)),
        "ct_energy_kev": repr(float(ct_energy_kev)),
        "quantity": "line integral of mu, dimensionless (-ln(I/i0))",
        "ct": ct.source,
    }
    import SimpleITK as sitk  # here, not at the top: only this writer needs it

    written: dict[str, Path] = {}
    for name in names:
        imager = geometry[name]
        image = sitk.GetImageFromArray(_siddon_drr(values, mu_table, box, index_from_room, imager, pose, None, 1))
        row_sp, col_sp = imager.pixel_spacing_mm
        image.SetSpacing((float(col_sp), float(row_sp)))
        image.SetMetaData(DRR_METADATA_PREFIX + "imager", name)
        for key, value in meta.items():
            image.SetMetaData(DRR_METADATA_PREFIX + key, value)
        path = out / f"drr_{name}.mha"
        sitk.WriteImage(image, str(path))
        written[name] = path
    return written
