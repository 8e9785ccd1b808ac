"""Patient poses and couch corrections in the room frame (docs/CONVENTIONS.md).

The **patient pose** ``P = (R, t)`` maps where a point of the patient should be
(room frame, perfect setup) to where it is: ``p_actual = R p_planned + t``,
rotations about the isocentre. The **couch correction** is ``C = P^-1``: it
brings every point back to its planned place. Six numbers describe either:
``translation_mm = [x_lat, y_long, z_vert]`` and ``rotation_deg = [pitch,
roll, yaw]`` about +X, +Y, +Z (right-hand rule), composed as
``R = Rz(yaw) @ Ry(roll) @ Rx(pitch)`` (scipy's extrinsic ``"xyz"``).

Example: a patient found 1 mm towards -X has pose translation ``[-1, 0, 0]``
and needs the couch correction ``[+1, 0, 0]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.spatial.transform import Rotation

from .errors import PoseError

__all__ = ["Pose", "Correction", "RotationAxis", "CouchCorrection", "reduce_to_couch"]

_ROTATION_TOL = 1e-6  # max |R^T R - I| entry and |det R - 1| accepted as a rotation


def _as_rotation(value, what: str) -> np.ndarray:
    r = np.array(value, dtype=np.float64)
    if r.shape != (3, 3):
        raise PoseError(f"{what}: rotation must be 3x3, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise PoseError(f"{what}: rotation holds non-finite values")
    ortho = float(np.max(np.abs(r.T @ r - np.eye(3))))
    det = float(np.linalg.det(r))
    if ortho > _ROTATION_TOL or abs(det - 1.0) > _ROTATION_TOL:
        raise PoseError(f"{what}: not a proper rotation (max |R^T R - I| = {ortho:.2g}, det = {det:.9f})")
    r.setflags(write=False)
    return r


def _as_vec3(value, what: str) -> np.ndarray:
    v = np.array(value, dtype=np.float64)
    if v.shape != (3,):
        raise PoseError(f"{what} must be 3 numbers, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise PoseError(f"{what} is not finite: {v.tolist()}")
    v.setflags(write=False)
    return v


def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """``Rz(yaw) Ry(roll) Rx(pitch)`` from ``[pitch, roll, yaw]`` degrees: the one rotation convention (CONVENTIONS).

    Room frame; the inverse is :func:`_deg_from_rotation` (scipy's extrinsic ``"xyz"``). Explicit NumPy
    (no validation) because the anatomy optimiser calls it in its inner loop.
    """
    a, b, c = np.radians(rotation_deg)
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _rotation_from_deg(rotation_deg: Sequence[float]) -> np.ndarray:
    return rotation_matrix(_as_vec3(rotation_deg, "rotation_deg"))


def _deg_from_rotation(r: np.ndarray) -> np.ndarray:
    return Rotation.from_matrix(r).as_euler("xyz", degrees=True)


@dataclass(frozen=True, slots=True)
class _Rigid:
    rotation: np.ndarray
    translation_mm: np.ndarray

    def __post_init__(self) -> None:
        kind = type(self).__name__
        object.__setattr__(self, "rotation", _as_rotation(self.rotation, kind))
        object.__setattr__(self, "translation_mm", _as_vec3(self.translation_mm, f"{kind} translation_mm"))

    @classmethod
    def identity(cls):
        """The transform that changes nothing."""
        return cls(np.eye(3), np.zeros(3))

    @classmethod
    def from_six(cls, translation_mm: Sequence[float], rotation_deg: Sequence[float]):
        """From ``[x_lat, y_long, z_vert]`` mm and ``[pitch, roll, yaw]`` degrees (IEC 61217 room axes)."""
        return cls(_rotation_from_deg(rotation_deg), translation_mm)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray):
        """From a 4x4 homogeneous matrix (room frame, mm)."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (4, 4):
            raise PoseError(f"{cls.__name__}: matrix must be 4x4, got shape {m.shape}")
        if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-12, rtol=0):
            raise PoseError(f"{cls.__name__}: last row of a rigid matrix must be [0, 0, 0, 1], got {m[3].tolist()}")
        return cls(m[:3, :3], m[:3, 3])

    @property
    def rotation_deg(self) -> np.ndarray:
        """``[pitch, roll, yaw]`` in degrees (extrinsic x, y, z)."""
        return _deg_from_rotation(self.rotation)

    @property
    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix acting on room points (mm)."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation_mm
        return m

    def six(self) -> tuple[np.ndarray, np.ndarray]:
        """``(translation_mm, rotation_deg)``."""
        return self.translation_mm.copy(), self.rotation_deg

    def apply(self, points_mm: np.ndarray) -> np.ndarray:
        """Transform room points (mm): ``R p + t``. Accepts (3,) or (N, 3)."""
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.rotation.T + self.translation_mm

    def _compose(self, other: "_Rigid"):
        return type(self)(self.rotation @ other.rotation, self.rotation @ other.translation_mm + self.translation_mm)

    def _inverse_parts(self) -> tuple[np.ndarray, np.ndarray]:
        rt = self.rotation.T
        return rt, -rt @ self.translation_mm

    def angle_deg(self) -> float:
        """Total rotation angle (axis-angle magnitude), degrees."""
        return float(np.degrees(Rotation.from_matrix(self.rotation).magnitude()))

    def to_json(self) -> dict:
        return {"translation_mm": self.translation_mm.tolist(), "rotation_deg": self.rotation_deg.tolist()}


@dataclass(frozen=True, slots=True)
class Pose(_Rigid):
    """Patient pose: maps planned room positions to actual ones, ``p_actual = R p_planned + t``.

    Attributes
    ----------
    rotation : (3, 3) array
        Proper rotation about the isocentre, room frame.
    translation_mm : (3,) array
        Room frame, mm.
    """

    def compose(self, other: "Pose") -> "Pose":
        """``self`` after ``other``: ``p -> self(other(p))``."""
        if not isinstance(other, Pose):
            raise PoseError(f"a Pose composes with a Pose, got {type(other).__name__}")
        return self._compose(other)

    def inverse(self) -> "Pose":
        return Pose(*self._inverse_parts())

    def to_correction(self) -> "Correction":
        """The couch correction that undoes this pose: ``C = P^-1``."""
        return Correction(*self._inverse_parts())

    def target_deviation_mm(self, target_room_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
        """Displacement (room, mm) of a planned target point: ``P(p) - p``."""
        p = np.asarray(target_room_mm, dtype=np.float64)
        return self.apply(p) - p


@dataclass(frozen=True, slots=True)
class Correction(_Rigid):
    """Couch correction ``C = P^-1``: applied to the couch it returns every point to its plan.

    This, never a pose, is what is sent to the delivery system.
    """

    def compose(self, other: "Correction") -> "Correction":
        """``self`` after ``other``."""
        if not isinstance(other, Correction):
            raise PoseError(f"a Correction composes with a Correction, got {type(other).__name__}")
        return self._compose(other)

    def inverse(self) -> "Correction":
        return Correction(*self._inverse_parts())

    def to_pose(self) -> Pose:
        """The patient pose this correction undoes."""
        return Pose(*self._inverse_parts())


class RotationAxis(Enum):
    """Couch rotation axes (IEC 61217 room): pitch about X, roll about Y, yaw about Z."""

    PITCH = 0
    ROLL = 1
    YAW = 2


@dataclass(frozen=True, slots=True)
class CouchCorrection:
    """A correction reduced to the rotations a couch has.

    Attributes
    ----------
    correction : Correction
        What the couch is asked to do (unavailable rotations are zero).
    residual : Pose
        The patient pose left after the couch applied ``correction``: zero
        displacement at the target, and the rotation the couch could not remove.
    residual_rotation_deg : (3,) array
        ``[pitch, roll, yaw]`` of ``residual``, degrees; reported, never dropped.
    """

    correction: Correction
    residual: Pose
    residual_rotation_deg: np.ndarray


def reduce_to_couch(
    correction: Correction,
    axes: Iterable[RotationAxis],
    target_room_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> CouchCorrection:
    """Best correction for a couch that rotates only about ``axes``.

    The rotations the couch has keep their values from the full correction's
    ``[pitch, roll, yaw]``; the others are zero. The translation then brings
    the target point exactly to its planned place (a couch without pitch and
    roll still puts the target on the isocentre), and the rotation it cannot
    remove is reported as ``residual_rotation_deg``.

    Parameters
    ----------
    correction : Correction
        The full 6-DoF correction.
    axes : iterable of RotationAxis
        Rotations the couch can make; e.g. ``{RotationAxis.YAW}`` for a 4-DoF couch.
    target_room_mm : (3,) array
        Planned target position in the room frame, mm (default the isocentre).
    """
    keep = {RotationAxis(a) for a in axes}
    angles = correction.rotation_deg
    reduced = np.array([angles[ax.value] if ax in keep else 0.0 for ax in RotationAxis])
    r_c = _rotation_from_deg(reduced)
    target = _as_vec3(target_room_mm, "target_room_mm")
    actual = correction.to_pose().apply(target)
    reduced_corr = Correction(r_c, target - r_c @ actual)
    residual_matrix = reduced_corr.matrix @ correction.to_pose().matrix
    residual = Pose.from_matrix(residual_matrix)
    return CouchCorrection(reduced_corr, residual, residual.rotation_deg)
