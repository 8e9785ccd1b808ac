"""Patient motion traces: the patient pose (room frame, docs/CONVENTIONS.md) as a function of time.

A trace answers ``pose_at(t_s)``; time ``t_s`` is seconds from the start of
the trace. Components:

- :class:`StaticPose` -- a constant setup error;
- :class:`Drift` -- slow linear drift in translation and rotation from a start time;
- :class:`SuddenShift` -- a step to a new pose at a given time;
- :class:`Breathing` -- periodic, mm-level motion (Lujan et al., Med. Phys. 26
  (1999): ``-A cos^(2n)(pi t / T - phase)`` about the exhale position), mostly AP/SI;
- :class:`MotionSum` -- the composition of several traces.

All translations are room mm, rotations degrees ``[pitch, roll, yaw]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spineguide.calibration.foundation import checked_number
from spineguide.registration.pose import Pose

from ..errors import MotionError

__all__ = [
    "MotionError",
    "StaticPose",
    "Drift",
    "SuddenShift",
    "Breathing",
    "Oscillation",
    "MotionSum",
    "random_setup_pose",
]


def _vec3(value, what: str) -> np.ndarray:
    v = np.array(value, dtype=np.float64)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise MotionError(f"{what} must be 3 finite numbers, got {np.asarray(value).tolist()}")
    v.setflags(write=False)
    return v


def _time(t_s: float) -> float:
    t = float(t_s)
    if not math.isfinite(t):
        raise MotionError(f"time must be finite, got {t_s!r}")
    return t


@dataclass(frozen=True, slots=True)
class StaticPose:
    """A constant pose (setup error)."""

    pose: Pose

    def pose_at(self, t_s: float) -> Pose:
        _time(t_s)
        return self.pose


@dataclass(frozen=True, slots=True)
class Drift:
    """Linear drift from ``start_s``: pose ``from_six(v (t - start), w (t - start))``, identity before."""

    velocity_mm_per_s: np.ndarray
    angular_velocity_deg_per_s: np.ndarray = (0.0, 0.0, 0.0)
    start_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "velocity_mm_per_s", _vec3(self.velocity_mm_per_s, "velocity_mm_per_s"))
        object.__setattr__(
            self, "angular_velocity_deg_per_s", _vec3(self.angular_velocity_deg_per_s, "angular_velocity_deg_per_s")
        )
        object.__setattr__(self, "start_s", _time(self.start_s))

    def pose_at(self, t_s: float) -> Pose:
        dt = max(_time(t_s) - self.start_s, 0.0)
        return Pose.from_six(self.velocity_mm_per_s * dt, self.angular_velocity_deg_per_s * dt)


@dataclass(frozen=True, slots=True)
class SuddenShift:
    """Identity before ``at_s``, ``pose`` from ``at_s`` on (a patient who moves suddenly)."""

    at_s: float
    pose: Pose

    def __post_init__(self) -> None:
        object.__setattr__(self, "at_s", _time(self.at_s))

    def pose_at(self, t_s: float) -> Pose:
        return self.pose if _time(t_s) >= self.at_s else Pose.identity()


@dataclass(frozen=True, slots=True)
class Breathing:
    """Breathing-correlated translation, ``amplitude_mm * (1 - cos^(2n)(pi t / period - phase))``.

    Zero at exhale, ``amplitude_mm`` (room X, Y, Z, mm) at full inhale; the
    default is 1.5 mm AP (room Z) and 1 mm SI (room Y), a typical spine
    excursion. ``n`` (``shape``) sharpens the exhale plateau.
    """

    amplitude_mm: np.ndarray = (0.0, 1.0, 1.5)
    period_s: float = 4.0
    phase_rad: float = 0.0
    shape: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "amplitude_mm", _vec3(self.amplitude_mm, "amplitude_mm"))
        period = checked_number(self.period_s, MotionError, f"breathing period_s must be positive, got {self.period_s!r}",
                                minimum=0.0, exclusive_minimum=True)
        object.__setattr__(self, "period_s", period)
        object.__setattr__(self, "phase_rad", _time(self.phase_rad))
        if isinstance(self.shape, bool) or not isinstance(self.shape, (int, np.integer)) or self.shape < 1:
            raise MotionError(f"breathing shape must be a positive integer, got {self.shape!r}")

    def pose_at(self, t_s: float) -> Pose:
        c = math.cos(math.pi * _time(t_s) / self.period_s - self.phase_rad) ** (2 * int(self.shape))
        return Pose.from_six(self.amplitude_mm * (1.0 - c), (0.0, 0.0, 0.0))


@dataclass(frozen=True, slots=True)
class Oscillation:
    """A sinusoidal translation, ``amplitude_mm * sin(2 pi t / period_s)`` (room X, Y, Z, mm): a slow wobble."""

    amplitude_mm: np.ndarray
    period_s: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "amplitude_mm", _vec3(self.amplitude_mm, "amplitude_mm"))
        period = checked_number(self.period_s, MotionError, f"oscillation period_s must be positive, got {self.period_s!r}",
                                minimum=0.0, exclusive_minimum=True)
        object.__setattr__(self, "period_s", period)

    def pose_at(self, t_s: float) -> Pose:
        return Pose.from_six(self.amplitude_mm * math.sin(2 * math.pi * _time(t_s) / self.period_s), (0.0, 0.0, 0.0))


@dataclass(frozen=True, slots=True)
class MotionSum:
    """Several traces at once: ``pose_at(t) = c_n(t) o ... o c_1(t)`` (the first applied first)."""

    components: tuple

    def __post_init__(self) -> None:
        comps = tuple(self.components)
        if not comps:
            raise MotionError("a motion sum needs at least one component")
        for c in comps:
            if not callable(getattr(c, "pose_at", None)):
                raise MotionError(f"motion component {c!r} has no pose_at(t_s)")
        object.__setattr__(self, "components", comps)

    def pose_at(self, t_s: float) -> Pose:
        pose = Pose.identity()
        for c in self.components:
            pose = c.pose_at(t_s).compose(pose)
        return pose

    def poses_at(self, times_s: Sequence[float]) -> list[Pose]:
        return [self.pose_at(t) for t in times_s]


def random_setup_pose(
    rng: np.random.Generator, max_translation_mm: float = 10.0, max_rotation_deg: float = 3.0
) -> Pose:
    """A setup error with each of the six numbers uniform in ``[-max, +max]`` (room mm, degrees)."""
    for what, v in (("max_translation_mm", max_translation_mm), ("max_rotation_deg", max_rotation_deg)):
        checked_number(v, MotionError, f"{what} must be >= 0, got {v!r}", minimum=0.0)
    if not isinstance(rng, np.random.Generator):
        raise MotionError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    t = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
    r = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
    return Pose.from_six(t, r)
