"""Gaussian prior on the patient pose between stereo measurements: what one view is estimated against.

When one imager is blocked, the pose is estimated from the other view alone (fiducials:
:mod:`spineguide.tracking.localisation.one_view`; anatomy:
:mod:`spineguide.registration.anatomy.one_view`). One view measures the two in-plane directions well
and the out-of-plane direction (along the view's central ray) hardly at all, so the estimate leans
on a prior: the last stereo pose, widened by how far the patient may have moved since.

The prior is a Gaussian over the six pose parameters ``x = [tx, ty, tz, pitch, roll, yaw]`` (room
frame, IEC 61217, mm and degrees; :meth:`Pose.from_six`): mean the reference (last stereo) pose,
covariance

    ``C(dt) = C_ref + diag(diffusion) * dt + diag(floor)``

with ``dt`` the seconds since the reference pair was acquired: ``C_ref`` is the stereo measurement's
own covariance, ``diffusion`` a random-walk growth (mm^2/s, deg^2/s) and ``floor`` a constant term for
the small moves a random walk under-weights at short ``dt``. Parameters are additive in the six-vector
(``Pose.from_six(x[:3], x[3:])``), which is exact for the translations and accurate to second order for
rotations of the size this prior is used with (a degree or two).

:func:`target_covariance_mm2` turns a 6x6 pose covariance into the 3x3 covariance of a target
point's deviation (room mm), the quantity the beam gate bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import MotionPriorError
from .pose import Pose

__all__ = [
    "MotionPriorError",
    "MotionPrior",
    "pose_six",
    "pose_from_six",
    "prior_from_stereo_history",
    "in_plane_motion_inflation",
    "target_covariance_mm2",
    "check_covariance",
]

#: Default random-walk growth of the pose variance between stereo pairs, per second:
#: (0.05 mm)^2/s per translation axis and (0.02 deg)^2/s per rotation -- a settled patient in a
#: vacuum bag or mask drifts ~0.1 mm / 0.05 deg per minute on average (Hoogeman et al. IJROBP 2008;
#: Agazaryan et al. 2008); the random-walk form widens slowly with time.
DEFAULT_DIFFUSION = (0.05**2, 0.05**2, 0.05**2, 0.02**2, 0.02**2, 0.02**2)
#: Default constant variance: (0.3 mm)^2 and (0.2 deg)^2 -- a conservative default for a prior built without
#: any knowledge of the patient. With it the 95 % bound alone is 0.84 mm: one view would (safely) almost never
#: enable at 1 mm. The service builds its prior from ``[one_view]`` instead: a small floor (0.05 mm / 0.05 deg)
#: plus the scatter of the recent stereo poses (:func:`prior_from_stereo_history`), with a sudden move caught by
#: widening along the ray as much as the move seen across it (:func:`in_plane_motion_inflation`);
#: docs/ONE_VIEW.md measures the coverage that gives.
DEFAULT_FLOOR = (0.3**2, 0.3**2, 0.3**2, 0.2**2, 0.2**2, 0.2**2)
#: Sudden-move widening (:func:`in_plane_motion_inflation`): variance along the ray per (mm of in-plane move)^2,
#: and rotation sigma per mm of in-plane move (a turn about a pivot ~190 mm from the target).
OUT_OF_PLANE_RATIO = 1.0
ROTATION_PER_MM_DEG = 0.3


def check_covariance(cov, n: int, what: str) -> np.ndarray:
    """A read-only float64 copy of ``cov`` after checking it is an n x n symmetric positive semi-definite matrix.

    Raises :class:`MotionPriorError` naming ``what`` otherwise.
    """
    c = np.array(cov, dtype=np.float64)
    if c.shape != (n, n):
        raise MotionPriorError(f"{what}: covariance must be {n}x{n}, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise MotionPriorError(f"{what}: covariance has non-finite entries")
    scale = max(float(np.max(np.abs(c))), 1e-300)
    if not np.allclose(c, c.T, atol=1e-9 * scale, rtol=0):
        raise MotionPriorError(f"{what}: covariance is not symmetric")
    c = 0.5 * (c + c.T)
    w = np.linalg.eigvalsh(c)
    if w.min() < -1e-9 * scale:
        raise MotionPriorError(f"{what}: covariance is not positive semi-definite (eigenvalue {w.min():.3g})")
    c.setflags(write=False)
    return c


def _vector(values, n: int, what: str, positive: bool = False) -> np.ndarray:
    v = np.array(values, dtype=np.float64)
    if v.shape != (n,) or not np.all(np.isfinite(v)) or np.any(v < 0) or (positive and np.any(v <= 0)):
        kind = "positive" if positive else "non-negative"
        raise MotionPriorError(f"{what} must be {n} finite {kind} numbers, got {np.asarray(values).tolist()}")
    v.setflags(write=False)
    return v


def pose_six(pose: Pose) -> np.ndarray:
    """``[tx, ty, tz, pitch, roll, yaw]`` of a pose (room frame, mm and degrees)."""
    t, r = pose.six()
    return np.concatenate([t, r])


def pose_from_six(x: Sequence[float]) -> Pose:
    """The pose of a six-vector ``[tx, ty, tz, pitch, roll, yaw]`` (mm, degrees)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (6,) or not np.all(np.isfinite(x)):
        raise MotionPriorError(f"a pose six-vector must be 6 finite numbers, got {np.asarray(x).tolist()}")
    return Pose.from_six(x[:3], x[3:])


@dataclass(frozen=True, slots=True)
class MotionPrior:
    """Where the patient can be ``dt`` seconds after a stereo measurement (see the module docstring).

    Attributes
    ----------
    reference : Pose
        The last stereo (two-view) pose, room frame.
    reference_cov : (6, 6) array
        Covariance of ``reference``'s six parameters (mm^2, mm*deg, deg^2); zeros if unknown
        (the floor then carries it).
    diffusion : (6,) array
        Variance growth per second of each parameter (mm^2/s, deg^2/s).
    floor : (6,) array
        Constant variance added to each parameter (mm^2, deg^2).
    """

    reference: Pose
    reference_cov: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    diffusion: np.ndarray = field(default_factory=lambda: np.array(DEFAULT_DIFFUSION))
    floor: np.ndarray = field(default_factory=lambda: np.array(DEFAULT_FLOOR))

    def __post_init__(self) -> None:
        if not isinstance(self.reference, Pose):
            raise MotionPriorError(f"motion prior reference must be a Pose, got {type(self.reference).__name__}")
        object.__setattr__(self, "reference_cov", check_covariance(self.reference_cov, 6, "motion prior reference"))
        object.__setattr__(self, "diffusion", _vector(self.diffusion, 6, "motion prior diffusion"))
        object.__setattr__(self, "floor", _vector(self.floor, 6, "motion prior floor"))

    @property
    def mean(self) -> np.ndarray:
        """The prior mean six-vector (the reference pose), mm and degrees."""
        return pose_six(self.reference)

    def covariance(self, elapsed_s: float) -> np.ndarray:
        """The prior covariance (6x6, mm^2 / deg^2) ``elapsed_s`` seconds after the reference pair."""
        dt = float(elapsed_s)
        if not (math.isfinite(dt) and dt >= 0):
            raise MotionPriorError(f"elapsed time since the stereo reference must be finite and >= 0, got {elapsed_s!r}")
        c = np.array(self.reference_cov) + np.diag(self.diffusion * dt + self.floor)
        c.setflags(write=False)
        return c


def target_covariance_mm2(pose: Pose, pose_cov: np.ndarray, target_room_mm: Sequence[float]) -> np.ndarray:
    """Covariance (3x3, room mm^2) of a target point's deviation ``P(p) - p`` given the pose's 6x6 covariance.

    First-order propagation ``J C J^T`` with the Jacobian of ``P(p)`` with respect to the
    six-vector, by central differences of :func:`pose_from_six` (steps 1e-4 mm / 1e-4 deg).
    """
    cov = check_covariance(pose_cov, 6, "pose")
    p = np.asarray(target_room_mm, dtype=np.float64)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise MotionPriorError(f"target must be 3 finite room coordinates (mm), got {np.asarray(target_room_mm).tolist()}")
    x0 = pose_six(pose)
    h = 1e-4
    jac = np.empty((3, 6))
    for k in range(6):
        d = np.zeros(6)
        d[k] = h
        jac[:, k] = (pose_from_six(x0 + d).apply(p) - pose_from_six(x0 - d).apply(p)) / (2 * h)
    out = jac @ cov @ jac.T
    out = 0.5 * (out + out.T)
    out.setflags(write=False)
    return out


def prior_from_stereo_history(reference: Pose, reference_cov, history_six, base: MotionPrior | None = None
                              ) -> MotionPrior:
    """A motion prior whose floor also holds the scatter of the recent stereo poses (breathing, tremor).

    The random walk and floor of ``base`` cover slow drift; a periodic motion
    (breathing) moves the patient back and forth around the last stereo pose
    by as much as the recent stereo poses scatter. Floor =
    ``base.floor + var(history_six)`` per parameter (population variance).

    Parameters
    ----------
    reference : Pose
        The last stereo pose.
    reference_cov : (6, 6) array
    history_six : (K, 6) array
        Recent stereo poses ``[tx, ty, tz, pitch, roll, yaw]`` (mm, deg), K >= 2; e.g. the last 10-30 s.
    base : MotionPrior, optional
        Diffusion and floor to start from (default: the module defaults).
    """
    h = np.asarray(history_six, dtype=np.float64)
    if h.ndim != 2 or h.shape[1] != 6 or len(h) < 2 or not np.all(np.isfinite(h)):
        raise MotionPriorError(f"stereo history must be a finite (K >= 2, 6) array, got shape {h.shape}")
    base = MotionPrior(reference) if base is None else base
    return MotionPrior(reference, reference_cov, base.diffusion, np.asarray(base.floor) + h.var(axis=0))


def in_plane_motion_inflation(move_room_mm, ray_room, out_of_plane_ratio: float = OUT_OF_PLANE_RATIO,
                              rotation_per_mm_deg: float = ROTATION_PER_MM_DEG) -> np.ndarray:
    """Extra pose covariance (6x6, mm^2 / deg^2) for a patient seen to have moved across one view's ray.

    One view cannot see motion along its ray. A patient whose target moved ``d_in`` across the ray since
    the stereo reference may have moved as much along it, and turned: the translation variance along the
    ray grows by ``out_of_plane_ratio |d_in|^2`` and each rotation's by ``(rotation_per_mm_deg |d_in|)^2``.
    ``move_room_mm``: the target's move since the reference (room mm; its component along the ray is
    ignored); ``ray_room``: the view's ray direction (room frame, any length).
    """
    move = np.asarray(move_room_mm, dtype=np.float64)
    ray = np.asarray(ray_room, dtype=np.float64)
    if move.shape != (3,) or ray.shape != (3,) or not np.all(np.isfinite(move)) or not np.all(np.isfinite(ray)):
        raise MotionPriorError("in-plane motion inflation needs a finite 3-vector move and ray direction")
    norm = float(np.linalg.norm(ray))
    if not norm > 0:
        raise MotionPriorError("in-plane motion inflation: the ray direction is zero")
    ray = ray / norm
    in_plane = move - (move @ ray) * ray
    m2 = float(in_plane @ in_plane)
    w = np.zeros((6, 6))
    w[:3, :3] = out_of_plane_ratio * m2 * np.outer(ray, ray)
    w[3:, 3:] = rotation_per_mm_deg**2 * m2 * np.eye(3)
    return w
