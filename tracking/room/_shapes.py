"""Analytic solids for the virtual-room phantoms and their partial-volume voxelisation.

Every solid answers ``inside(x, y, z)`` for broadcastable coordinate arrays
(model frame, mm: the patient's LPS axes with the origin at the target
vertebra) and gives a conservative axis-aligned bounding box. A phantom is an
ordered list of :class:`Layer` objects painted one over the other
(:func:`voxelise`): each layer's fractional occupancy of every voxel is found
by supersampling the voxels its surface crosses, and the voxel value is
blended ``hu = (1 - f) hu + f hu_layer`` -- the partial-volume effect of a real
CT, so bone edges are sharp but never aliased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Ellipsoid", "EllipticCylinder", "Capsule", "Cylinder", "Box", "Layer", "voxelise"]


def _rot(rotation) -> np.ndarray:
    return np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)


def _local(x, y, z, centre, rotation):
    """Coordinates in the solid's own frame: ``R^T (p - c)``."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    r = rotation
    if np.array_equal(r, np.eye(3)):
        # Axis-aligned: keep the broadcast shapes of the inputs (a grid's 1-D axes stay 1-D).
        return dx, dy, dz
    return (
        r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
        r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
        r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
    )


def _box_of_local_box(centre, rotation, half) -> tuple[np.ndarray, np.ndarray]:
    ext = np.abs(rotation) @ np.asarray(half, dtype=np.float64)
    return centre - ext, centre + ext


@dataclass(frozen=True)
class Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray | None = None
    clip_below_y: float | None = None  # keep only model y < clip (anterior part), if given

    def inside(self, x, y, z):
        c, r = np.asarray(self.centre, float), np.asarray(self.radii, float)
        u, v, w = _local(x, y, z, c, _rot(self.rotation))
        out = (u / r[0]) ** 2 + (v / r[1]) ** 2 + (w / r[2]) ** 2 <= 1.0
        if self.clip_below_y is not None:
            out = out & (y < self.clip_below_y)
        return out

    def bbox(self):
        return _box_of_local_box(np.asarray(self.centre, float), _rot(self.rotation), self.radii)


@dataclass(frozen=True)
class EllipticCylinder:
    """Elliptic cylinder along its local w axis: ``(u/a)^2 + (v/b)^2 <= 1``, ``|w| <= half_length``."""

    centre: np.ndarray
    radius_u: float
    radius_v: float
    half_length: float
    rotation: np.ndarray | None = None
    clip_below_y: float | None = None

    def inside(self, x, y, z):
        u, v, w = _local(x, y, z, np.asarray(self.centre, float), _rot(self.rotation))
        out = ((u / self.radius_u) ** 2 + (v / self.radius_v) ** 2 <= 1.0) & (np.abs(w) <= self.half_length)
        if self.clip_below_y is not None:
            out = out & (y < self.clip_below_y)
        return out

    def bbox(self):
        half = (self.radius_u, self.radius_v, self.half_length)
        return _box_of_local_box(np.asarray(self.centre, float), _rot(self.rotation), half)


@dataclass(frozen=True)
class Capsule:
    """Points within a radius of a segment; the radius may taper linearly from ``p0`` to ``p1``."""

    p0: np.ndarray
    p1: np.ndarray
    radius0: float
    radius1: float | None = None

    def inside(self, x, y, z):
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        d = b - a
        dd = float(d @ d)
        px, py, pz = x - a[0], y - a[1], z - a[2]
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
        qx, qy, qz = px - t * d[0], py - t * d[1], pz - t * d[2]
        r1 = self.radius0 if self.radius1 is None else self.radius1
        rad = self.radius0 + t * (r1 - self.radius0)
        return qx * qx + qy * qy + qz * qz <= rad * rad

    def bbox(self):
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        r = max(self.radius0, self.radius0 if self.radius1 is None else self.radius1)
        return np.minimum(a, b) - r, np.maximum(a, b) + r


@dataclass(frozen=True)
class Cylinder:
    """Right circular cylinder with flat end caps, axis from ``p0`` to ``p1``."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float

    def inside(self, x, y, z):
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        d = b - a
        dd = float(d @ d)
        px, py, pz = x - a[0], y - a[1], z - a[2]
        t = (px * d[0] + py * d[1] + pz * d[2]) / dd
        qx, qy, qz = px - t * d[0], py - t * d[1], pz - t * d[2]
        return (t >= 0.0) & (t <= 1.0) & (qx * qx + qy * qy + qz * qz <= self.radius**2)

    def bbox(self):
        a, b = np.asarray(self.p0, float), np.asarray(self.p1, float)
        return np.minimum(a, b) - self.radius, np.maximum(a, b) + self.radius


@dataclass(frozen=True)
class Box:
    centre: np.ndarray
    half_mm: np.ndarray
    rotation: np.ndarray | None = None

    def inside(self, x, y, z):
        u, v, w = _local(x, y, z, np.asarray(self.centre, float), _rot(self.rotation))
        h = np.asarray(self.half_mm, float)
        return (np.abs(u) <= h[0]) & (np.abs(v) <= h[1]) & (np.abs(w) <= h[2])

    def bbox(self):
        return _box_of_local_box(np.asarray(self.centre, float), _rot(self.rotation), self.half_mm)


@dataclass(frozen=True)
class Layer:
    """One solid painted with a value; ``label`` (if not None) is written where it fills >= half a voxel."""

    shape: object
    hu: float
    label: int | None = None


def _dilate(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    for ax in range(3):
        src = out.copy()
        sl_lo = [slice(None)] * 3
        sl_hi = [slice(None)] * 3
        sl_lo[ax], sl_hi[ax] = slice(1, None), slice(None, -1)
        out[tuple(sl_lo)] |= src[tuple(sl_hi)]
        out[tuple(sl_hi)] |= src[tuple(sl_lo)]
    return out


def voxelise(
    layers: list[Layer],
    shape_kji: tuple[int, int, int],
    first_centre_mm: np.ndarray,
    spacing_mm: np.ndarray,
    background_hu: float = -1000.0,
    supersampling: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint layers onto an axis-aligned grid (model frame, mm) with partial-volume supersampling.

    Parameters
    ----------
    layers : list of Layer
        Painted in order, later over earlier.
    shape_kji : (nk, nj, ni)
    first_centre_mm : (3,) array
        Model-frame centre of voxel ``(i, j, k) = (0, 0, 0)``, mm.
    spacing_mm : (3,) array
        Voxel size along i, j, k (model x, y, z), mm.
    supersampling : int
        Subsamples per axis in voxels that a surface crosses.

    Returns
    -------
    hu : (nk, nj, ni) float32
    labels : (nk, nj, ni) uint8
    """
    nk, nj, ni = shape_kji
    first = np.asarray(first_centre_mm, float)
    sp = np.asarray(spacing_mm, float)
    hu = np.full(shape_kji, background_hu, dtype=np.float32)
    labels = np.zeros(shape_kji, dtype=np.uint8)
    s = int(supersampling)
    frac = (np.arange(s) + 0.5) / s - 0.5
    off = np.stack(np.meshgrid(frac, frac, frac, indexing="ij"), axis=-1).reshape(-1, 3) * sp  # (s^3, 3) x,y,z
    n_dims = np.array([ni, nj, nk])
    for layer in layers:
        lo_mm, hi_mm = layer.shape.bbox()
        lo = np.maximum(np.floor((lo_mm - first) / sp).astype(int) - 1, 0)
        hi = np.minimum(np.ceil((hi_mm - first) / sp).astype(int) + 2, n_dims)
        if np.any(hi <= lo):
            continue
        xs = first[0] + sp[0] * np.arange(lo[0], hi[0])
        ys = first[1] + sp[1] * np.arange(lo[1], hi[1])
        zs = first[2] + sp[2] * np.arange(lo[2], hi[2])
        inside = np.broadcast_to(
            layer.shape.inside(xs[None, None, :], ys[None, :, None], zs[:, None, None]),
            (len(zs), len(ys), len(xs)),
        )
        dil = _dilate(inside)
        ero = ~_dilate(~inside)
        band = dil & ~ero
        occ = ero.astype(np.float32)
        kk, jj, ii = np.nonzero(band)
        if kk.size:
            px = xs[ii][:, None] + off[None, :, 0]
            py = ys[jj][:, None] + off[None, :, 1]
            pz = zs[kk][:, None] + off[None, :, 2]
            occ[kk, jj, ii] = layer.shape.inside(px, py, pz).mean(axis=1)
        if not np.any(occ > 0):
            continue
        sub = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        region = hu[sub]
        region += occ * (np.float32(layer.hu) - region)
        if layer.label is not None:
            lab = labels[sub]
            lab[occ >= 0.5] = layer.label
    return hu, labels
