"""Imaging geometry of a stereo kV system: imagers, projection, rays, triangulation.

All positions and directions are in the IEC 61217 room frame (origin at the
isocentre, +X right facing the gantry from the foot of the couch, +Y towards
the gantry, +Z up), in millimetres. Pixel coordinates are ``(col, row)`` with
pixel centres at integers and ``(0, 0)`` the first pixel stored
(``image[row, col]``), as fixed in ``docs/CONVENTIONS.md``.

The physical description of an imager (source point, panel origin, panel axes,
pixel pitch) and its 3x4 projection matrix are two views of one thing;
:class:`ImagerGeometry` holds the physical description and derives the matrix,
and :meth:`ImagerGeometry.from_projection_matrix` goes the other way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from .errors import GeometryError

__all__ = [
    "ImagerGeometry",
    "StereoGeometry",
    "Triangulation",
    "MATRIX_AGREEMENT_LIMIT_PX",
    "default_stereo_geometry",
]

#: Largest disagreement allowed between a file's physical description and its
#: projection matrix, in pixels over the panel (docs/CONVENTIONS.md).
MATRIX_AGREEMENT_LIMIT_PX = 0.05

_UNIT_TOL = 1e-6  # |v| must be 1 within this to count as a unit vector
_ORTHO_TOL = 1e-6  # |u . v| above this: panel axes are not perpendicular


def _vec3(value, what: str, imager: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != (3,):
        raise GeometryError(f"imager '{imager}': {what} must be 3 numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise GeometryError(f"imager '{imager}': {what} is not finite: {arr.tolist()}")
    arr.setflags(write=False)
    return arr


def _unit(value, what: str, imager: str) -> np.ndarray:
    arr = _vec3(value, what, imager)
    norm = float(np.linalg.norm(arr))
    if abs(norm - 1.0) > _UNIT_TOL:
        raise GeometryError(f"imager '{imager}': {what} must be a unit vector, its length is {norm:.9f}")
    return arr


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, dtype=np.float64)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, slots=True)
class ImagerGeometry:
    """One kV imager: an X-ray source point and a flat panel, room frame, mm.

    Parameters
    ----------
    name : str
        Imager label as used in files and messages (``"A"``, ``"left"``...).
    source_mm : (3,) array
        Focal spot, room frame, mm.
    origin_mm : (3,) array
        Centre of the pixel at row 0, column 0, room frame, mm (as DICOM
        (0020,0032) Image Position).
    col_direction, row_direction : (3,) unit vectors
        Directions of increasing column and row index, room frame. They must
        be perpendicular.
    pixel_spacing_mm : (2,) array
        ``(row_spacing, col_spacing)`` in mm, as DICOM (0028,0030).
    rows, cols : int
        Panel size in pixels.
    """

    name: str
    source_mm: np.ndarray
    origin_mm: np.ndarray
    col_direction: np.ndarray
    row_direction: np.ndarray
    pixel_spacing_mm: np.ndarray
    rows: int
    cols: int
    _normal: np.ndarray = field(init=False, repr=False, compare=False)
    _matrix: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name:
            raise GeometryError(f"imager name must be a non-empty string, got {name!r}")
        set_ = object.__setattr__
        set_(self, "source_mm", _vec3(self.source_mm, "source_mm", name))
        set_(self, "origin_mm", _vec3(self.origin_mm, "detector origin_mm", name))
        u = _unit(self.col_direction, "col_direction", name)
        v = _unit(self.row_direction, "row_direction", name)
        set_(self, "col_direction", u)
        set_(self, "row_direction", v)
        dot = float(u @ v)
        if abs(dot) > _ORTHO_TOL:
            raise GeometryError(
                f"imager '{name}': col_direction and row_direction are not perpendicular "
                f"(dot product {dot:.3g}, limit {_ORTHO_TOL:g})"
            )
        spacing = np.array(self.pixel_spacing_mm, dtype=np.float64)
        if spacing.shape != (2,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise GeometryError(
                f"imager '{name}': pixel_spacing_mm must be two positive numbers "
                f"[row_spacing, col_spacing], got {np.asarray(self.pixel_spacing_mm).tolist()}"
            )
        set_(self, "pixel_spacing_mm", _readonly(spacing))
        for what in ("rows", "cols"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise GeometryError(f"imager '{name}': {what} must be a positive integer, got {value!r}")
            set_(self, what, int(value))
        n = np.cross(u, v)
        depth_mm = float((self.origin_mm - self.source_mm) @ n)
        if abs(depth_mm) < 1.0:
            raise GeometryError(
                f"imager '{name}': the source lies in the panel plane "
                f"(distance {depth_mm:.3f} mm); the geometry is degenerate"
            )
        if depth_mm < 0:
            n = -n
        set_(self, "_normal", _readonly(n))
        set_(self, "_matrix", _readonly(self._compute_matrix()))

    # ------------------------------------------------------------------ derived
    @property
    def normal(self) -> np.ndarray:
        """Unit panel normal pointing away from the source, room frame."""
        return self._normal

    @property
    def source_to_detector_mm(self) -> float:
        """Perpendicular distance from the source to the panel plane, mm."""
        return float((self.origin_mm - self.source_mm) @ self._normal)

    @property
    def source_to_isocentre_mm(self) -> float:
        """Distance from the source to the room isocentre (origin), mm."""
        return float(np.linalg.norm(self.source_mm))

    @property
    def magnification(self) -> float:
        """Magnification at the isocentre: panel-plane distance / isocentre depth."""
        return self.source_to_detector_mm / float(-self.source_mm @ self._normal)

    @property
    def projection_matrix(self) -> np.ndarray:
        """(3, 4) matrix mapping room ``(X, Y, Z, 1)`` to ``(col, row, 1)`` up to scale.

        Scaled so that the third homogeneous coordinate is the depth of the
        point along the panel normal from the source, in mm.
        """
        return self._matrix

    @property
    def principal_point_px(self) -> np.ndarray:
        """``(col, row)`` of the foot of the perpendicular from the source onto the panel."""
        rel = self.source_mm - self.origin_mm
        return np.array(
            [rel @ self.col_direction / self.pixel_spacing_mm[1], rel @ self.row_direction / self.pixel_spacing_mm[0]]
        )

    def _compute_matrix(self) -> np.ndarray:
        # A room point X, seen from the source S, hits the panel plane at
        # Y = S + (D / w) (X - S) with w = n.(X - S) and D the source-panel
        # distance; (col, row) = ((Y - O).u / s_col, (Y - O).v / s_row).
        # Multiplying through by w gives a linear map of (X - S).
        s, o, u, v, n = self.source_mm, self.origin_mm, self.col_direction, self.row_direction, self._normal
        d_mm = float((o - s) @ n)
        row_sp, col_sp = self.pixel_spacing_mm
        a0 = (((s - o) @ u) * n + d_mm * u) / col_sp
        a1 = (((s - o) @ v) * n + d_mm * v) / row_sp
        a = np.vstack([a0, a1, n])
        return np.hstack([a, (-a @ s)[:, None]])

    # -------------------------------------------------------------- operations
    def project(self, points_room_mm: np.ndarray) -> np.ndarray:
        """Project room points onto the panel.

        Parameters
        ----------
        points_room_mm : (N, 3) or (3,) array
            Points in the room frame, mm. They must lie in front of the source.

        Returns
        -------
        (N, 2) or (2,) array
            ``(col, row)`` pixel coordinates (pixel centres at integers).

        Raises
        ------
        GeometryError
            If a point lies at or behind the source plane.
        """
        pts = np.asarray(points_room_mm, dtype=np.float64)
        single = pts.ndim == 1
        pts = np.atleast_2d(pts)
        if pts.shape[-1] != 3:
            raise GeometryError(f"imager '{self.name}': points must have 3 coordinates, got shape {pts.shape}")
        m = self._matrix
        h = pts @ m[:, :3].T + m[:, 3]
        if np.any(h[:, 2] <= 1e-9):
            raise GeometryError(f"imager '{self.name}': cannot project a point at or behind the source")
        px = h[:, :2] / h[:, 2:3]
        return px[0] if single else px

    def pixel_to_room(self, pixels_col_row: np.ndarray) -> np.ndarray:
        """Room position (mm) of pixel coordinates ``(col, row)`` on the panel surface."""
        px = np.asarray(pixels_col_row, dtype=np.float64)
        single = px.ndim == 1
        px = np.atleast_2d(px)
        row_sp, col_sp = self.pixel_spacing_mm
        pts = (
            self.origin_mm
            + (px[:, 0:1] * col_sp) * self.col_direction
            + (px[:, 1:2] * row_sp) * self.row_direction
        )
        return pts[0] if single else pts

    def backproject(self, pixels_col_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rays from the source through pixel coordinates.

        Parameters
        ----------
        pixels_col_row : (N, 2) or (2,) array
            ``(col, row)`` pixel coordinates.

        Returns
        -------
        origin_mm : (3,) array
            The source position (every ray starts there), room frame, mm.
        directions : (N, 3) or (3,) array
            Unit direction of each ray, room frame.
        """
        pts = self.pixel_to_room(pixels_col_row)
        d = pts - self.source_mm
        d = d / np.linalg.norm(d, axis=-1, keepdims=True)
        return self.source_mm.copy(), d

    def contains(self, pixels_col_row: np.ndarray, margin_px: float = 0.0) -> np.ndarray:
        """True where ``(col, row)`` lies on the panel, at least ``margin_px`` from its edge."""
        px = np.atleast_2d(np.asarray(pixels_col_row, dtype=np.float64))
        return (
            (px[:, 0] >= -0.5 + margin_px)
            & (px[:, 0] <= self.cols - 0.5 - margin_px)
            & (px[:, 1] >= -0.5 + margin_px)
            & (px[:, 1] <= self.rows - 0.5 - margin_px)
        )

    def binned(self, factor: int) -> ImagerGeometry:
        """The same imager read out with ``factor x factor`` pixel binning.

        The new pixel (0, 0) covers old pixels 0..factor-1 in both directions;
        trailing pixels that do not fill a whole bin are dropped.
        """
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise GeometryError(f"imager '{self.name}': binning factor must be a positive integer, got {factor!r}")
        if factor == 1:
            return self
        row_sp, col_sp = self.pixel_spacing_mm
        half = (factor - 1) / 2.0
        origin = self.origin_mm + half * col_sp * self.col_direction + half * row_sp * self.row_direction
        return ImagerGeometry(
            name=self.name,
            source_mm=self.source_mm,
            origin_mm=origin,
            col_direction=self.col_direction,
            row_direction=self.row_direction,
            pixel_spacing_mm=self.pixel_spacing_mm * factor,
            rows=self.rows // factor,
            cols=self.cols // factor,
        )

    def with_name(self, name: str) -> ImagerGeometry:
        """The same imager under another label."""
        return ImagerGeometry(
            name, self.source_mm, self.origin_mm, self.col_direction, self.row_direction,
            self.pixel_spacing_mm, self.rows, self.cols,
        )

    def check_points_mm(self) -> np.ndarray:
        """Room points spread through the imaged volume, used to compare two descriptions.

        Rays through a 9 x 9 grid of pixels spanning the panel, sampled at 30%
        to 90% of the way from the source to the panel: the region any patient
        point can occupy.
        """
        cols = np.linspace(0, self.cols - 1, 9)
        rows = np.linspace(0, self.rows - 1, 9)
        grid = np.stack(np.meshgrid(cols, rows, indexing="xy"), axis=-1).reshape(-1, 2)
        panel = self.pixel_to_room(grid)
        fractions = np.linspace(0.3, 0.9, 5)
        return (self.source_mm + fractions[:, None, None] * (panel - self.source_mm)[None]).reshape(-1, 3)

    def max_disagreement_px(self, projection_matrix: np.ndarray) -> float:
        """Largest pixel distance between this geometry and another 3x4 matrix.

        Compared on :meth:`check_points_mm`, i.e. over the whole panel and the
        depth range a patient can occupy.
        """
        other = _checked_matrix(projection_matrix, self.name)
        pts = self.check_points_mm()
        h = pts @ other[:, :3].T + other[:, 3]
        if np.any(np.abs(h[:, 2]) < 1e-12) or np.any(np.sign(h[:, 2]) != np.sign(h[0, 2])):
            return math.inf
        mine = self.project(pts)
        theirs = h[:, :2] / h[:, 2:3]
        return float(np.max(np.linalg.norm(mine - theirs, axis=1)))

    @classmethod
    def from_projection_matrix(
        cls,
        projection_matrix: np.ndarray,
        *,
        name: str,
        rows: int,
        cols: int,
        pixel_spacing_mm: Sequence[float] | None = None,
        source_to_detector_mm: float | None = None,
    ) -> ImagerGeometry:
        """Decompose a 3x4 projection matrix into the physical description.

        A matrix fixes the source position, the panel orientation and the focal
        lengths in pixels (source-panel distance / pixel pitch), but not the
        source-panel distance and the pixel pitch separately (a panel twice as
        far with pixels twice as large gives the same image). Give exactly one
        of ``pixel_spacing_mm`` (``(row, col)``, mm) or ``source_to_detector_mm``.

        A slight skew between the panel axes (as a free DLT fit leaves) is
        removed by the nearest perpendicular pair; the result must still
        reproduce the matrix within :data:`MATRIX_AGREEMENT_LIMIT_PX`.

        Raises
        ------
        GeometryError
            If the matrix is singular, the scale is not fixed exactly once,
            the given pixel spacing contradicts the matrix's aspect ratio, or
            the perpendicular description cannot reproduce the matrix.
        """
        if (pixel_spacing_mm is None) == (source_to_detector_mm is None):
            raise GeometryError(
                f"imager '{name}': give exactly one of pixel_spacing_mm or source_to_detector_mm "
                "to fix the scale of a projection matrix"
            )
        p = _checked_matrix(projection_matrix, name)
        m = p[:, :3]
        if abs(np.linalg.det(m)) < 1e-12 * np.linalg.norm(m) ** 3:
            raise GeometryError(f"imager '{name}': projection matrix has a singular 3x3 part")
        source = -np.linalg.solve(m, p[:, 3])
        scale = 1.0 / np.linalg.norm(m[2])
        # The isocentre (room origin) must lie in front of the source.
        if p[2, 3] * scale < 0:
            scale = -scale
        p = p * scale
        m = p[:, :3]
        k, r = scipy.linalg.rq(m)
        signs = np.sign(np.diag(k))
        signs[signs == 0] = 1.0
        k = k * signs[None, :]
        r = r * signs[:, None]
        n = r[2]
        fx, fy = k[0, 0], k[1, 1]
        cx, cy = k[0, 2], k[1, 2]
        # Remove skew: nearest orthonormal pair in the plane perpendicular to n.
        u_raw = (m[0] - cx * n) / np.linalg.norm(m[0] - cx * n)
        v_raw = r[1]
        basis = np.vstack([u_raw, v_raw]).T  # 3x2
        uu, _, vt = np.linalg.svd(basis, full_matrices=False)
        ortho = uu @ vt
        u, v = ortho[:, 0], ortho[:, 1]
        if pixel_spacing_mm is not None:
            spacing = np.asarray(pixel_spacing_mm, dtype=np.float64)
            if spacing.shape != (2,) or np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
                raise GeometryError(f"imager '{name}': pixel_spacing_mm must be two positive numbers")
            row_sp, col_sp = spacing
            d_mm = fx * col_sp
            implied_row_sp = d_mm / fy
            if abs(implied_row_sp - row_sp) > 1e-4 * row_sp:
                raise GeometryError(
                    f"imager '{name}': projection matrix implies row spacing {implied_row_sp:.6f} mm "
                    f"for col spacing {col_sp:.6f} mm, but {row_sp:.6f} mm was given"
                )
        else:
            d_mm = float(source_to_detector_mm)
            if not math.isfinite(d_mm) or d_mm <= 0:
                raise GeometryError(f"imager '{name}': source_to_detector_mm must be positive, got {d_mm}")
            col_sp, row_sp = d_mm / fx, d_mm / fy
        foot = source + d_mm * n
        origin = foot - cx * col_sp * u - cy * row_sp * v
        geom = cls(name, source, origin, u, v, (row_sp, col_sp), rows, cols)
        err = geom.max_disagreement_px(p)
        if err > MATRIX_AGREEMENT_LIMIT_PX:
            raise GeometryError(
                f"imager '{name}': no perpendicular-panel geometry reproduces the projection matrix: "
                f"disagreement {err:.3f} px (limit {MATRIX_AGREEMENT_LIMIT_PX} px)"
            )
        return geom

    # -------------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        """The ``kv-geometry/1`` imager entry, with both descriptions."""
        return {
            "name": self.name,
            "source_mm": self.source_mm.tolist(),
            "detector": {
                "origin_mm": self.origin_mm.tolist(),
                "col_direction": self.col_direction.tolist(),
                "row_direction": self.row_direction.tolist(),
                "pixel_spacing_mm": self.pixel_spacing_mm.tolist(),
                "rows": self.rows,
                "cols": self.cols,
            },
            "projection_matrix": self.projection_matrix.tolist(),
        }


def _checked_matrix(value, name: str) -> np.ndarray:
    p = np.array(value, dtype=np.float64)
    if p.shape != (3, 4):
        raise GeometryError(f"imager '{name}': projection_matrix must be 3x4, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise GeometryError(f"imager '{name}': projection_matrix holds non-finite values")
    return p


@dataclass(frozen=True, slots=True)
class Triangulation:
    """3D points reconstructed from matched pixels in two or more imagers.

    Attributes
    ----------
    points_mm : (N, 3) array
        Room frame, mm.
    ray_distance_mm : (N,) array
        Skew distance between the back-projected rays (for more than two
        imagers, the largest pairwise distance), mm: 0 for perfect data.
    reprojection_px : (N, K) array
        Distance between each imager's measured pixel and the projection of
        the reconstructed point, pixels, in the order of ``imagers``.
    imagers : tuple of str
    """

    points_mm: np.ndarray
    ray_distance_mm: np.ndarray
    reprojection_px: np.ndarray
    imagers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StereoGeometry:
    """Two or more imagers of one room, as stored in a ``kv-geometry/1`` file."""

    imagers: tuple[ImagerGeometry, ...]
    calibrated_unix_s: float = 0.0
    notes: str = ""

    def __post_init__(self) -> None:
        imagers = tuple(self.imagers)
        if len(imagers) < 2:
            raise GeometryError(f"a stereo geometry needs at least two imagers, got {len(imagers)}")
        names = [im.name for im in imagers]
        if len(set(names)) != len(names):
            raise GeometryError(f"imager names must be unique, got {names}")
        for im in imagers:
            if not isinstance(im, ImagerGeometry):
                raise GeometryError(f"expected ImagerGeometry, got {type(im).__name__}")
        if not math.isfinite(float(self.calibrated_unix_s)):
            raise GeometryError("calibrated_unix_s must be finite")
        object.__setattr__(self, "imagers", imagers)
        object.__setattr__(self, "calibrated_unix_s", float(self.calibrated_unix_s))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(im.name for im in self.imagers)

    def __getitem__(self, name: str) -> ImagerGeometry:
        for im in self.imagers:
            if im.name == name:
                return im
        raise KeyError(f"no imager named '{name}' (imagers: {', '.join(self.names)})")

    def binned(self, factor: int) -> StereoGeometry:
        """Every imager read out with ``factor x factor`` binning."""
        return StereoGeometry(tuple(im.binned(factor) for im in self.imagers), self.calibrated_unix_s, self.notes)

    def fundamental_matrix(self, from_imager: str, to_imager: str) -> np.ndarray:
        """3x3 F with ``x_to^T F x_from = 0`` for homogeneous ``(col, row, 1)`` pixels."""
        a, b = self[from_imager], self[to_imager]
        pa, pb = a.projection_matrix, b.projection_matrix
        e_b = pb @ np.append(a.source_mm, 1.0)
        ex = np.array([[0, -e_b[2], e_b[1]], [e_b[2], 0, -e_b[0]], [-e_b[1], e_b[0], 0]])
        return ex @ pb @ np.linalg.pinv(pa)

    def epipolar_lines(self, from_imager: str, to_imager: str, pixels_col_row: np.ndarray) -> np.ndarray:
        """Epipolar lines in ``to_imager`` of pixels measured in ``from_imager``.

        Returns
        -------
        (N, 3) array
            ``(a, b, c)`` with ``a col + b row + c = 0`` and ``a^2 + b^2 = 1``,
            so that ``a col + b row + c`` is a signed distance in pixels.
        """
        px = np.atleast_2d(np.asarray(pixels_col_row, dtype=np.float64))
        f = self.fundamental_matrix(from_imager, to_imager)
        lines = np.hstack([px, np.ones((len(px), 1))]) @ f.T
        return lines / np.linalg.norm(lines[:, :2], axis=1, keepdims=True)

    def epipolar_distance_px(
        self, from_imager: str, to_imager: str, pixels_from: np.ndarray, pixels_to: np.ndarray
    ) -> np.ndarray:
        """Distance (pixels) of every ``pixels_to`` from every epipolar line of ``pixels_from``.

        Returns an ``(N_from, N_to)`` array, for correspondence search.
        """
        lines = self.epipolar_lines(from_imager, to_imager, pixels_from)
        q = np.atleast_2d(np.asarray(pixels_to, dtype=np.float64))
        return np.abs(lines[:, :2] @ q.T + lines[:, 2:3])

    def triangulate(self, pixels: Mapping[str, np.ndarray], refine: bool = True) -> Triangulation:
        """Reconstruct room points from the same points seen by two or more imagers.

        Parameters
        ----------
        pixels : mapping of imager name -> (N, 2) array
            Matched ``(col, row)`` pixel coordinates; row i of every array is
            the same physical point.
        refine : bool
            After the closest point to the rays, take Gauss-Newton steps that
            minimise the squared reprojection error in pixels (the maximum
            likelihood estimate for equal pixel noise).

        Returns
        -------
        Triangulation
        """
        names = tuple(pixels)
        if len(names) < 2:
            raise GeometryError(f"triangulation needs at least two imagers, got {list(names)}")
        px = [np.atleast_2d(np.asarray(pixels[n], dtype=np.float64)) for n in names]
        n_pts = px[0].shape[0]
        for name, p in zip(names, px):
            if p.shape != (n_pts, 2):
                raise GeometryError(f"imager '{name}': expected ({n_pts}, 2) pixel coordinates, got {p.shape}")
            if not np.all(np.isfinite(p)):
                raise GeometryError(f"imager '{name}': pixel coordinates are not finite")
        ims = [self[n] for n in names]
        sources = np.stack([im.source_mm for im in ims])  # (K, 3)
        dirs = np.stack([im.backproject(p)[1] for im, p in zip(ims, px)], axis=1)  # (N, K, 3)
        # Closest point to K lines: sum_k (I - d d^T) X = sum_k (I - d d^T) S_k.
        eye = np.eye(3)
        proj = eye[None, None] - dirs[..., :, None] * dirs[..., None, :]  # (N, K, 3, 3)
        a = proj.sum(axis=1)
        b = np.einsum("nkij,kj->ni", proj, sources)
        points = np.linalg.solve(a, b[..., None])[..., 0]
        ray_distance = np.zeros(n_pts)
        for i in range(len(ims)):
            for j in range(i + 1, len(ims)):
                ray_distance = np.maximum(ray_distance, _skew_distance(sources[i], dirs[:, i], sources[j], dirs[:, j]))
        if refine:
            points = _refine_reprojection(points, ims, px)
        reproj = np.stack([np.linalg.norm(im.project(points) - p, axis=1) for im, p in zip(ims, px)], axis=1)
        return Triangulation(_readonly(points), _readonly(ray_distance), _readonly(reproj), names)

    # -------------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        """The whole ``kv-geometry/1`` document."""
        return {
            "schema": "kv-geometry/1",
            "imagers": [im.to_json() for im in self.imagers],
            "calibrated_unix_s": self.calibrated_unix_s,
            "notes": self.notes,
        }


def _skew_distance(s1, d1, s2, d2) -> np.ndarray:
    c = np.cross(d1, d2)
    cn = np.linalg.norm(c, axis=-1)
    w = s2 - s1
    par = cn < 1e-12
    dist = np.abs(np.einsum("ij,ij->i", np.broadcast_to(w, c.shape), c)) / np.where(par, 1.0, cn)
    if np.any(par):
        perp = np.linalg.norm(np.cross(np.broadcast_to(w, d1.shape), d1), axis=-1)
        dist = np.where(par, perp, dist)
    return dist


def _refine_reprojection(points: np.ndarray, ims: list[ImagerGeometry], px: list[np.ndarray]) -> np.ndarray:
    x = points.copy()
    for _ in range(3):
        jtj = np.zeros((len(x), 3, 3))
        jtr = np.zeros((len(x), 3))
        for im, p in zip(ims, px):
            m = im.projection_matrix
            h = x @ m[:, :3].T + m[:, 3]
            w = h[:, 2:3]
            uv = h[:, :2] / w
            r = uv - p
            # d(h_i / w)/dX = (m_i - uv_i m_2) / w
            jac = (m[None, :2, :3] - uv[:, :, None] * m[None, 2:3, :3]) / w[:, :, None]  # (N, 2, 3)
            jtj += np.einsum("nki,nkj->nij", jac, jac)
            jtr += np.einsum("nki,nk->ni", jac, r)
        x = x - np.linalg.solve(jtj, jtr[..., None])[..., 0]
    return x


# --------------------------------------------------------------------------
# Built-in default geometry
# --------------------------------------------------------------------------
#: Source to isocentre distance of the default room, mm.
DEFAULT_SOURCE_TO_ISOCENTRE_MM = 2200.0
#: Source to panel-plane distance of the default room, mm.
DEFAULT_SOURCE_TO_DETECTOR_MM = 3600.0
#: Angle of each central ray from the vertical, degrees.
DEFAULT_ANGLE_FROM_VERTICAL_DEG = 45.0
#: Panel: 1024 x 1024 pixels of 0.4 mm (a 41 cm amorphous-silicon panel).
DEFAULT_PANEL_PIXELS = 1024
DEFAULT_PIXEL_SPACING_MM = 0.4


def default_stereo_geometry(
    panel_pixels: int = DEFAULT_PANEL_PIXELS, pixel_spacing_mm: float = DEFAULT_PIXEL_SPACING_MM
) -> StereoGeometry:
    """The built-in stereo room: two ceiling sources, two floor panels, 90 degrees apart.

    Modelled on the room-mounted stereo kV systems used for spine
    radiosurgery (the layout of CyberKnife's imaging system as described by
    Kilby et al., Technol. Cancer Res. Treat. 9(5) 2010: ceiling-mounted
    sources, floor panels, beams crossing at the imaging centre at 45 degrees
    from vertical and 90 degrees apart). The distances are representative
    figures, not a vendor's specification: source-isocentre 2200 mm and
    source-panel 3600 mm (magnification 1.64, 0.24 mm per pixel at the
    isocentre), 1024 x 1024 panels of 0.4 mm (41 cm amorphous-silicon
    panels). See ``docs/GEOMETRY.md``. A real room is calibrated, never
    assumed.

    Imager ``A`` has its source above the couch on the room -X side
    (source at -X, +Z), imager ``B`` the mirror image at +X. Both beams lie in
    the room X-Z plane; rows run along +Y (towards the gantry) and
    ``col x row`` points from the source to the panel.

    Parameters
    ----------
    panel_pixels : int
        Rows and columns of each panel (a smaller panel for fast tests keeps
        the same physical pixel pitch unless ``pixel_spacing_mm`` is given).
    pixel_spacing_mm : float
        Pixel pitch on the panel, mm.
    """
    sad = DEFAULT_SOURCE_TO_ISOCENTRE_MM
    sid = DEFAULT_SOURCE_TO_DETECTOR_MM
    ang = math.radians(DEFAULT_ANGLE_FROM_VERTICAL_DEG)
    imagers = []
    for name, side in (("A", -1.0), ("B", 1.0)):
        # Source above the couch, displaced towards `side`; beam travels down and across.
        source = np.array([side * sad * math.sin(ang), 0.0, sad * math.cos(ang)])
        n = -source / np.linalg.norm(source)
        v = np.array([0.0, 1.0, 0.0])
        u = np.cross(v, n)  # so that u x v = n
        centre = source + sid * n
        half = (panel_pixels - 1) / 2.0
        origin = centre - half * pixel_spacing_mm * u - half * pixel_spacing_mm * v
        imagers.append(
            ImagerGeometry(name, source, origin, u, v, (pixel_spacing_mm, pixel_spacing_mm), panel_pixels, panel_pixels)
        )
    return StereoGeometry(
        tuple(imagers),
        0.0,
        "spineguide default room: ceiling sources at 45 deg from vertical in the X-Z plane, 90 deg apart; "
        f"source-isocentre {sad:g} mm, source-panel {sid:g} mm; {panel_pixels}x{panel_pixels} pixels of "
        f"{pixel_spacing_mm:g} mm (nominal, not calibrated)",
    )
