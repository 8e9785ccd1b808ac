"""Pair processors: one stereo pair of raw kV frames in, one patient pose (or a refusal) out.

The real-time loop knows processors only through :class:`PairProcessor`:
``process(frames, prior) -> PairResult``. A processor never raises for a
pair it cannot trust: it returns a :class:`PairResult` whose ``reason`` says
why (``fiducial_missing``, ``fiducial_migrated``, ``registration_refused``...).
Anything it does raise is a bug, which the loop turns into HOLD
``internal_error``.

Processors here:

- :class:`PatternProcessor` -- reads the pose the simulators stamp into a
  test-pattern row of each frame (:func:`stamp_pose_pattern`) and adds seeded
  measurement noise. For simulation, tests and the service benchmark's
  gating path; it stands in for a registration, it is not one.
- :class:`FiducialProcessor` and :class:`AnatomyProcessor` -- adapters over
  :func:`spineguide.tracking.localisation.fiducials.localise_fiducials` and
  :func:`spineguide.registration.anatomy.register_anatomy` (imported lazily so this
  module works before those exist).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from spineguide.calibration.foundation import to_json_value
from spineguide.registration.pose import Pose

from ..errors import TrackingError
from ..frames import KvFrame
from .config import PlanConfig, SafetyConfig
from .gating import HoldReason
from .plan import anatomy_roi, level_rois, load_treatment_plan, plan_flat_fields

__all__ = [
    "PairResult",
    "PairProcessor",
    "check_view_quality",
    "stamp_pose_pattern",
    "read_pose_pattern",
    "PatternProcessor",
    "FiducialProcessor",
    "AnatomyProcessor",
    "build_processor",
    "warm_up_kernels",
]


@dataclass(frozen=True, slots=True)
class PairResult:
    """What a processor learned from one stereo pair.

    Attributes
    ----------
    reason : HoldReason
        ``HoldReason.OK`` when ``pose`` is trusted; otherwise why not.
    pose : Pose or None
        Patient pose (room frame, mm / deg, CONVENTIONS), present when OK.
    method : str
        ``fiducial``, ``anatomy`` (or ``fiducial`` for the pattern stand-in).
    quality : dict
        JSON-able error figures of the method (``fre_mm``, ``ncc``...).
    detail : str
        Human-readable explanation of a refusal (logged and recorded).
    one_view : str or None
        None for a stereo pair; the imager's name when the pair was measured
        from that one view (the other blocked, dark, saturated or missing).
    pose_cov : (6, 6) array or None
        Covariance of the pose's ``[tx, ty, tz, pitch, roll, yaw]`` (mm, deg),
        required for an OK one-view result (docs/ONE_VIEW.md).
    """

    reason: HoldReason
    pose: Pose | None = None
    method: str = "fiducial"
    quality: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    one_view: str | None = None
    pose_cov: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, HoldReason):
            raise TrackingError(f"PairResult.reason must be a HoldReason, got {self.reason!r}")
        if self.reason is HoldReason.OK and self.pose is None:
            raise TrackingError("a PairResult marked OK must carry a pose")
        if self.method not in ("fiducial", "anatomy"):
            raise TrackingError(f"PairResult.method must be 'fiducial' or 'anatomy', got {self.method!r}")
        if self.one_view is not None and not (isinstance(self.one_view, str) and self.one_view):
            raise TrackingError(f"PairResult.one_view must be an imager name or None, got {self.one_view!r}")
        if self.pose_cov is not None:
            from spineguide.registration.errors import RegistrationError
            from spineguide.registration.motion_prior import check_covariance
            try:
                object.__setattr__(self, "pose_cov", check_covariance(self.pose_cov, 6, "PairResult pose"))
            except RegistrationError as err:
                raise TrackingError(str(err)) from err
        if self.reason is HoldReason.OK and self.one_view is not None and self.pose_cov is None:
            raise TrackingError("a one-view PairResult marked OK must carry pose_cov")

    @property
    def ok(self) -> bool:
        return self.reason is HoldReason.OK

    def to_json(self) -> dict[str, Any]:
        """JSON-able form for the session record."""
        return {
            "reason": self.reason.value,
            "pose": None if self.pose is None else self.pose.to_json(),
            "method": self.method,
            "quality": self.quality,
            "detail": self.detail,
            "one_view": self.one_view,
            "pose_cov": None if self.pose_cov is None else self.pose_cov.tolist(),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PairResult:
        pose = obj.get("pose")
        cov = obj.get("pose_cov")
        return cls(
            HoldReason(obj["reason"]),
            None if pose is None else Pose.from_six(pose["translation_mm"], pose["rotation_deg"]),
            obj.get("method", "fiducial"),
            dict(obj.get("quality", {})),
            obj.get("detail", ""),
            obj.get("one_view"),
            None if cov is None else np.array(cov, dtype=np.float64),
        )


class PairProcessor(Protocol):
    """Turns one stereo pair into a patient pose.

    ``frames`` maps imager name -> :class:`KvFrame` (both imagers of the plan);
    ``prior`` is the last trusted pose (a seed for tracking), or None.
    Implementations must be deterministic for the same frames and prior
    (``spineguide replay`` relies on it).

    A processor that can monitor from one view also has
    ``process_one_view(frame, prior: MotionPrior, elapsed_s, last_pose) -> PairResult``:
    one imager's frame, the motion prior around the last stereo pose, the
    seconds since that stereo pair, and the last trusted pose (stereo or one
    view); its OK results carry ``one_view`` and ``pose_cov``.
    """

    method: str

    def process(self, frames: dict[str, KvFrame], prior: Pose | None) -> PairResult: ...


def check_view_quality(frame: KvFrame, safety: SafetyConfig, dark_fraction: float | None = None
                       ) -> tuple[HoldReason, str] | None:
    """Cheap checks of one view before a registration: non-finite, saturated or dark.

    Returns ``None`` when the frame is usable, else ``(reason, detail)``.
    Dark (``dark_frame``: the view blocked by the gantry or robot, or no exposure): the
    99th-percentile pixel is below ``dark_fraction`` x the frame's ``i0``; checked only when
    both are given (a frame without ``i0`` has no level to compare with).
    """
    name = frame.imager
    px = frame.pixels
    if px.dtype.kind == "f" and not np.all(np.isfinite(px)):
        return HoldReason.NAN_FRAME, f"imager '{name}' pair {frame.pair_id}: non-finite pixels"
    n_sat = int(np.count_nonzero(px >= safety.saturation_level))
    frac = n_sat / px.size
    if frac > safety.max_saturated_fraction:
        detail = (f"imager '{name}' pair {frame.pair_id}: {100 * frac:.2f}% of pixels at or above "
                  f"{safety.saturation_level:g} (limit {100 * safety.max_saturated_fraction:.2f}%)")
        return HoldReason.SATURATED_FRAME, detail
    if dark_fraction is not None and dark_fraction > 0 and frame.i0 is not None:
        # Every 4th pixel of every 4th row: the percentile of a 1024^2 frame in well under a millisecond.
        level = float(np.percentile(px[::4, ::4], 99.0))
        if level < dark_fraction * frame.i0:
            return HoldReason.DARK_FRAME, (f"imager '{name}' pair {frame.pair_id}: dark (99th percentile {level:.0f} "
                                           f"< {dark_fraction:g} x i0 {frame.i0:.0f}): view blocked?")
    return None


def _one_view_refusal(imager: str, method: str, detail: str) -> PairResult:
    """HOLD ``one_view_refused``: the method found no trustworthy pose in ``imager``'s view."""
    return PairResult(HoldReason.ONE_VIEW_REFUSED, None, method, {"ok": False}, f"one view {imager!r}: {detail}",
                      one_view=imager)


# ------------------------------------------------------------------ test pattern
_MAGIC = (0x5347, 0x0001)  # "SG", pattern version 1
_N_WORDS = 2 + 12 + 1
_OFFSET = 2**31


def stamp_pose_pattern(pixels: np.ndarray, pose: Pose) -> np.ndarray:
    """Write ``pose`` into the first 15 pixels of row 0 of a uint16 frame (simulation only).

    Layout: two magic words, then translation (um) and rotation (micro-degrees)
    as offset int32 split into high/low uint16 words, then a checksum word.
    Returns a new array; ``pixels`` is not changed.
    """
    out = np.array(pixels, dtype=np.uint16)
    if out.ndim != 2 or out.shape[1] < _N_WORDS:
        raise TrackingError(f"pattern: frame must be 2D with >= {_N_WORDS} columns, got shape {out.shape}")
    t, r = pose.six()
    micro = np.round(np.concatenate([t, r]) * 1e6 / np.array([1e3] * 3 + [1.0] * 3)).astype(np.int64)
    if np.any(np.abs(micro) >= _OFFSET):
        raise TrackingError(f"pattern: pose out of range {pose.to_json()}")
    words = [*_MAGIC]
    for v in micro + _OFFSET:
        words += [int(v) >> 16, int(v) & 0xFFFF]
    words.append(sum(words) & 0xFFFF)
    out[0, :_N_WORDS] = words
    return out


def read_pose_pattern(pixels: np.ndarray) -> Pose | None:
    """The pose stamped by :func:`stamp_pose_pattern`, or None when no valid pattern is there."""
    if pixels.ndim != 2 or pixels.dtype != np.uint16 or pixels.shape[1] < _N_WORDS:
        return None
    words = [int(w) for w in pixels[0, :_N_WORDS]]
    if tuple(words[:2]) != _MAGIC or (sum(words[:-1]) & 0xFFFF) != words[-1]:
        return None
    values = np.array([(words[2 + 2 * i] << 16 | words[3 + 2 * i]) - _OFFSET for i in range(6)], dtype=np.float64)
    return Pose.from_six(values[:3] * 1e-3, values[3:] * 1e-6)


class PatternProcessor:
    """Stand-in registration for simulation: the stamped true pose plus seeded noise.

    Deterministic: the noise of pair ``k`` comes from ``default_rng([seed, k])``.
    A frame without a valid pattern is ``fiducial_missing`` (the simulators'
    way of saying "seed lost"); imagers that disagree are ``registration_refused``.

    Parameters
    ----------
    imagers : (2,) tuple of str
    noise_mm : float
        1-sigma measurement noise per translation axis, mm (rotation: the same
        number in degrees / 10).
    seed : int
    """

    method = "fiducial"

    def __init__(self, imagers: tuple[str, str], noise_mm: float = 0.05, seed: int = 0,
                 ray_directions: Mapping[str, np.ndarray] | None = None) -> None:
        self.imagers = tuple(imagers)
        self.noise_mm = float(noise_mm)
        self.seed = int(seed)
        if ray_directions is None:
            from spineguide.calibration.geometry import default_stereo_geometry
            room = default_stereo_geometry(64)
            ray_directions = {n: -room[n].source_mm for n in room.names} if set(self.imagers) <= set(room.names) else {}
        #: imager -> unit vector from its source towards the isocentre (room frame): the out-of-plane direction.
        self.ray_directions = {n: np.asarray(d, float) / np.linalg.norm(d) for n, d in ray_directions.items()}

    def process_one_view(self, frame: KvFrame, prior, elapsed_s: float, last_pose: Pose | None) -> PairResult:
        """One view, simulated honestly as a Bayesian update of ``prior`` (a :class:`MotionPrior`).

        The view measures the two translations across its ray (noise ``noise_mm``) and the rotation about
        its ray (``noise_mm / 10`` deg); the posterior mean and covariance combine that with the prior, so
        what the view cannot see (out-of-plane translation, the two out-of-plane rotations) stays at the
        prior -- wrong by whatever the patient really moved there, as a real one-view estimate would be.
        """
        from spineguide.registration.motion_prior import pose_from_six, pose_six

        name = frame.imager
        truth = read_pose_pattern(frame.pixels)
        if truth is None:
            return _one_view_refusal(name, self.method, "no seed pattern found")
        ray = self.ray_directions.get(name)
        if ray is None:
            return _one_view_refusal(name, self.method, "no ray direction known for this imager")
        # Orthonormal basis across the ray.
        u = np.cross(ray, [0.0, 1.0, 0.0] if abs(ray[1]) < 0.9 else [1.0, 0.0, 0.0])
        u /= np.linalg.norm(u)
        v = np.cross(ray, u)
        h = np.zeros((3, 6))
        h[0, :3], h[1, :3], h[2, 3:] = u, v, ray
        sig = np.array([self.noise_mm, self.noise_mm, max(self.noise_mm / 10.0, 1e-6)])
        pair_id = frame.pair_id or 0
        rng = np.random.default_rng([self.seed, pair_id, 1])
        z = h @ pose_six(truth) + rng.normal(0.0, 1.0, 3) * sig
        c_prior = prior.covariance(elapsed_s)
        info = np.linalg.pinv(c_prior) + h.T @ np.diag(1.0 / sig**2) @ h
        cov = np.linalg.inv(info)
        mean = cov @ (np.linalg.pinv(c_prior) @ prior.mean + h.T @ (z / sig**2))
        cov = 0.5 * (cov + cov.T)
        return PairResult(HoldReason.OK, pose_from_six(mean), self.method,
                          {"ok": True, "stand_in": "pattern", "one_view": name}, one_view=name, pose_cov=cov)

    def process(self, frames: dict[str, KvFrame], prior: Pose | None) -> PairResult:
        t0 = time.perf_counter()
        poses = []
        for name in self.imagers:
            pose = read_pose_pattern(frames[name].pixels)
            if pose is None:
                return PairResult(HoldReason.FIDUCIAL_MISSING, method=self.method,
                                  quality={"ok": False}, detail=f"imager '{name}': no seed pattern found")
            poses.append(pose)
        if not np.allclose(poses[0].matrix, poses[1].matrix, rtol=0, atol=1e-6):
            return PairResult(HoldReason.REGISTRATION_REFUSED, method=self.method, quality={"ok": False},
                              detail="imagers disagree on the pose")
        pair_id = frames[self.imagers[0]].pair_id or 0
        rng = np.random.default_rng([self.seed, pair_id])
        noise = rng.normal(0.0, self.noise_mm, 6) * np.array([1, 1, 1, 0.1, 0.1, 0.1])
        t, r = poses[0].six()
        pose = Pose.from_six(t + noise[:3], r + noise[3:])
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        return PairResult(HoldReason.OK, pose, self.method,
                          {"ok": True, "stand_in": "pattern", "fre_mm": float(np.linalg.norm(noise[:3])),
                           "elapsed_ms": elapsed_ms})


# ---------------------------------------------------------------- real methods
class FiducialProcessor:
    """Adapter over :func:`spineguide.tracking.localisation.fiducials.localise_fiducials` (seeds -> pose).

    Parameters
    ----------
    geometry : StereoGeometry
    planned_room_mm : (N, 3) array
        Planned seed positions, room frame at perfect setup, mm.
    names : list of str
    config : FiducialConfig, optional
    use_prior : bool
        Pass the last trusted pose as ``prior_pose`` (windowed tracking search).
    flat_fields : mapping imager name -> tracking.localisation.flatfield.FlatField, optional
        Panel gain and dark maps, applied to every frame before detection.
    """

    method = "fiducial"

    def __init__(self, geometry, planned_room_mm: np.ndarray, names: list[str], config=None,
                 use_prior: bool = True, flat_fields=None) -> None:
        from ..localisation import fiducials  # lazily: a module with heavier imports

        self._fiducials = fiducials
        self.geometry = geometry
        self.planned_room_mm = np.asarray(planned_room_mm, dtype=np.float64)
        self.names = list(names)
        self.config = config
        self.use_prior = use_prior
        self.flat_fields = dict(flat_fields) if flat_fields else None

    def process(self, frames: dict[str, KvFrame], prior: Pose | None) -> PairResult:
        from spineguide.registration.errors import RegistrationError
        from spineguide.registration.points import SeedMigrationError

        from ..errors import FiducialNotFoundError, FrameError

        kwargs: dict[str, Any] = {"prior_pose": prior if self.use_prior else None}
        if self.config is not None:
            kwargs["config"] = self.config
        if self.flat_fields is not None:
            kwargs["flat_fields"] = self.flat_fields
        if all(f.i0 is not None for f in frames.values()):
            kwargs["i0"] = {name: f.i0 for name, f in frames.items()}
        pixels = {name: f.pixels for name, f in frames.items()}
        try:
            res = self._fiducials.localise_fiducials(pixels, self.geometry, self.planned_room_mm, self.names, **kwargs)
        except FiducialNotFoundError as err:
            return PairResult(HoldReason.FIDUCIAL_MISSING, method=self.method, quality={"ok": False}, detail=str(err))
        except FrameError as err:
            return PairResult(HoldReason.CORRUPT_FRAME, method=self.method, quality={"ok": False}, detail=str(err))
        except SeedMigrationError as err:
            return PairResult(HoldReason.FIDUCIAL_MIGRATED, method=self.method, quality={"ok": False}, detail=str(err))
        except (RegistrationError, TrackingError) as err:  # ImagerLabelError, PointRegistrationError...
            return PairResult(HoldReason.REGISTRATION_REFUSED, method=self.method, quality={"ok": False},
                              detail=f"{type(err).__name__}: {err}")
        quality = to_json_value(res.quality_json())
        quality["elapsed_ms"] = float(res.total_ms)
        if not res.ok:
            quality["ok"] = False
            return PairResult(HoldReason.REGISTRATION_REFUSED, res.pose, self.method, quality,
                              f"fiducial result flagged: {sorted(f.value for f in res.flags)}, FRE {res.fre_mm:.2f} mm")
        return PairResult(HoldReason.OK, res.pose, self.method, quality)

    def process_one_view(self, frame: KvFrame, prior, elapsed_s: float, last_pose: Pose | None) -> PairResult:
        """One view: :func:`spineguide.tracking.localisation.one_view.localise_one_view` against ``prior``."""
        from spineguide.registration.errors import RegistrationError
        from spineguide.registration.points import SeedMigrationError

        from ..errors import FiducialNotFoundError, FrameError
        from ..localisation import one_view

        name = frame.imager
        kwargs: dict[str, Any] = {}
        if self.config is not None:
            kwargs["config"] = self.config
        if self.flat_fields is not None and name in self.flat_fields:
            kwargs["flat_field"] = self.flat_fields[name]
        if frame.i0 is not None:
            kwargs["i0"] = frame.i0
        try:
            res = one_view.localise_one_view(frame.pixels, name, self.geometry, self.planned_room_mm, self.names,
                                             prior, elapsed_s, **kwargs)
        except FiducialNotFoundError as err:
            return _one_view_refusal(name, self.method, f"fiducial missing: {err}")
        except FrameError as err:
            return PairResult(HoldReason.CORRUPT_FRAME, method=self.method, quality={"ok": False}, detail=str(err),
                              one_view=name)
        except SeedMigrationError as err:
            return _one_view_refusal(name, self.method, f"fiducial migrated: {err}")
        except (RegistrationError, TrackingError) as err:
            return _one_view_refusal(name, self.method, f"{type(err).__name__}: {err}")
        quality = to_json_value(res.quality_json())
        quality["elapsed_ms"] = float(res.total_ms)
        quality["one_view"] = name
        if not res.ok:
            quality["ok"] = False
            return PairResult(HoldReason.ONE_VIEW_REFUSED, res.pose, self.method, quality,
                              f"one view {name!r}: fiducial result not trusted: {res.reason}", one_view=name)
        return PairResult(HoldReason.OK, res.pose, self.method, quality, one_view=name, pose_cov=res.pose_cov)


class AnatomyProcessor:
    """Adapter over :class:`spineguide.registration.anatomy.AnatomyRegistration` (DRR registration -> pose).

    The registration object is built once (CT -> ROI attenuation volumes);
    each pair is registered from the last trusted pose in tracking mode, or
    with the full (global) search when there is none.
    """

    method = "anatomy"

    def __init__(self, registration, flat_fields=None, levels=None, level_registrations=None) -> None:
        self._reg = registration
        #: imager -> tracking.localisation.flatfield.FlatField: dark / gain correction and dead-line inpainting of each frame.
        self.flat_fields = dict(flat_fields) if flat_fields else None
        #: A :class:`spineguide.registration.anatomy.per_level.LevelRegistration` (per-level plans), or None.
        self._levels = levels
        #: Level name -> an ordinary (stereo, background-modelled) AnatomyRegistration of that level's ROI:
        #: what monitors the level chosen to drive the correction.
        self._level_regs = dict(level_registrations or {})
        if levels is not None and set(self._level_regs) != set(levels.names):
            raise TrackingError(f"per-level plan: registrations for levels {sorted(self._level_regs)}, the plan has "
                                f"{list(levels.names)}")

    @property
    def has_levels(self) -> bool:
        """True for a per-level plan: the engine then sets up with :meth:`process_levels`."""
        return self._levels is not None

    def _level_registration(self, level: str | None):
        """The prepared registration of ``level`` (None or the target: the plan's own ROI)."""
        if level is None:
            return self._reg
        if level not in self._level_regs:
            raise TrackingError(f"level {level!r} is not a level of this plan ({sorted(self._level_regs)})")
        return self._level_regs[level]

    def process_levels(self, frames: dict[str, KvFrame], prior: Pose | None, level: str | None) -> PairResult:
        """Per-level setup registration (docs/PER_LEVEL.md): every level on its own; the result's pose is
        ``level``'s (None: the target's), its quality carries the per-level table (``levels``)."""
        from spineguide.registration.errors import RegistrationError, RegistrationFrameError

        from ..errors import FrameError
        from ..localisation.flatfield import correct_frames

        pixels = {name: f.pixels for name, f in frames.items()}
        i0 = {name: f.i0 for name, f in frames.items()} if all(f.i0 is not None for f in frames.values()) else None
        t0 = time.perf_counter()
        try:
            pixels = correct_frames(self.flat_fields, pixels)
            res = self._levels.register(pixels, i0=i0, initial_pose=prior)
        except (FrameError, RegistrationFrameError) as err:
            return PairResult(HoldReason.CORRUPT_FRAME, method=self.method, quality={"ok": False}, detail=str(err))
        except RegistrationError as err:
            return PairResult(HoldReason.REGISTRATION_REFUSED, method=self.method, quality={"ok": False},
                              detail=f"{type(err).__name__}: {err}")
        driving = level if level is not None else res.target
        table = to_json_value(res.to_json())
        entry = next((lv for lv in res.levels if lv.name == driving), None)
        quality = {"ok": bool(entry is not None and entry.ok), "levels": table, "driving_level": driving,
                   "elapsed_ms": (time.perf_counter() - t0) * 1e3}
        if entry is None or not entry.ok:
            why = "not registered" if entry is None else (entry.reason or "refused")
            return PairResult(HoldReason.REGISTRATION_REFUSED, None if entry is None else entry.pose, self.method,
                              quality, f"per-level registration: level {driving} {why}")
        return PairResult(HoldReason.OK, res.pose_for(driving), self.method, quality)

    def process(self, frames: dict[str, KvFrame], prior: Pose | None, level: str | None = None) -> PairResult:
        from spineguide.registration.errors import RegistrationFrameError
        from spineguide.registration.errors import RegistrationError

        from ..errors import FrameError
        from ..localisation.flatfield import correct_frames

        pixels = {name: f.pixels for name, f in frames.items()}
        i0 = {name: f.i0 for name, f in frames.items()} if all(f.i0 is not None for f in frames.values()) else None
        try:
            pixels = correct_frames(self.flat_fields, pixels)
            res = self._level_registration(level).register(pixels, i0=i0, initial_pose=prior,
                                                           tracking=prior is not None)
        except (FrameError, RegistrationFrameError) as err:
            # A frame the registration cannot use (NaN pixels, wrong shape, not 2D) is a corrupt frame, not a refusal.
            return PairResult(HoldReason.CORRUPT_FRAME, method=self.method, quality={"ok": False}, detail=str(err))
        except RegistrationError as err:
            return PairResult(HoldReason.REGISTRATION_REFUSED, method=self.method, quality={"ok": False},
                              detail=f"{type(err).__name__}: {err}")
        quality = to_json_value(res.quality.to_json())
        quality["ok"] = bool(res.quality.ok)
        quality["elapsed_ms"] = float(res.elapsed_ms)
        if level is not None:
            quality["driving_level"] = level
        if not res.quality.ok:
            return PairResult(HoldReason.REGISTRATION_REFUSED, res.pose, self.method, quality,
                              f"anatomy registration refused: {res.quality.reason.value}")
        return PairResult(HoldReason.OK, res.pose, self.method, quality)

    def process_one_view(self, frame: KvFrame, prior, elapsed_s: float, last_pose: Pose | None,
                         level: str | None = None) -> PairResult:
        """One view: :meth:`AnatomyRegistration.register_one_view` of ``level``'s registration (None: the
        target's) against ``prior``."""
        from spineguide.registration.errors import RegistrationError, RegistrationFrameError

        from ..errors import FrameError
        from ..localisation.flatfield import correct_frames

        name = frame.imager
        try:
            pixels = correct_frames(self.flat_fields, {name: frame.pixels})[name]
            res = self._level_registration(level).register_one_view(pixels, name, prior, elapsed_s, i0=frame.i0)
        except (FrameError, RegistrationFrameError) as err:
            return PairResult(HoldReason.CORRUPT_FRAME, method=self.method, quality={"ok": False}, detail=str(err),
                              one_view=name)
        except RegistrationError as err:
            return _one_view_refusal(name, self.method, f"{type(err).__name__}: {err}")
        quality = to_json_value(res.quality_json())
        quality["ok"] = bool(res.ok)
        quality["elapsed_ms"] = float(res.total_ms)
        quality["one_view"] = name
        if level is not None:
            quality["driving_level"] = level
        if not res.ok:
            return PairResult(HoldReason.ONE_VIEW_REFUSED, res.pose, self.method, quality,
                              f"one view {name!r}: anatomy registration refused: {res.reason}", one_view=name)
        return PairResult(HoldReason.OK, res.pose, self.method, quality, one_view=name, pose_cov=res.pose_cov)


def build_processor(plan: PlanConfig, seed: int = 0) -> PairProcessor:
    """The processor a plan asks for (``load_plan``).

    Raises
    ------
    TrackingError
        The method's module is not available or the plan files are unusable.
    """
    if plan.method == "pattern":
        return PatternProcessor(plan.imagers, plan.pattern_noise_mm, seed)
    if plan.method == "fiducial":
        return _build_fiducial(plan)
    return _build_anatomy(plan)


def _build_fiducial(plan: PlanConfig) -> PairProcessor:
    from spineguide.calibration.io import read_geometry

    geometry = read_geometry(plan.geometry)
    treatment = load_treatment_plan(plan)
    if treatment.fiducials is None:
        raise TrackingError(f"[plan] fiducial method: the plan {treatment.ct.source} has no planned fiducials")
    from ..localisation.fiducials import FaintSearchConfig, FiducialConfig

    # The live service never runs the plan-guided joint search: its evidence maps and constellation search
    # cost 0.1-0.5 s per pair (docs/FIDUCIALS.md section 7), beyond a frame period. What it keeps for seeds
    # the clean-frame detector cannot see is tracking's first step: the seeds verified where the last
    # trusted pose puts them (tens of ms); when that does not find them, or there is no trusted pose yet,
    # a seed it cannot see is reported missing (HOLD). `register` (setup) runs the whole search.
    config = FiducialConfig(faint=FaintSearchConfig(joint_search=False))
    return FiducialProcessor(geometry, treatment.fiducials_room_mm(), list(treatment.fiducials.names), config=config,
                             flat_fields=plan_flat_fields(plan) or None)


def _build_anatomy(plan: PlanConfig) -> PairProcessor:
    from spineguide.calibration.io import read_geometry
    from spineguide.registration.anatomy import AnatomyRegistration

    geometry = read_geometry(plan.geometry)
    treatment = load_treatment_plan(plan)
    roi = anatomy_roi(plan, treatment)
    levels, level_regs = None, {}
    target = AnatomyRegistration(treatment.ct, treatment.isocentre_lps_mm, geometry, roi)
    if plan.level_rois:
        from spineguide.registration.anatomy.per_level import LevelRegistration

        rois = level_rois(plan, treatment)
        levels = LevelRegistration(treatment.ct, treatment.isocentre_lps_mm, geometry, rois,
                                   target=treatment.target_roi)
        # Monitoring follows the level the approval chose: each level's own stereo registration, built now.
        level_regs = {name: target if name == treatment.target_roi else
                      AnatomyRegistration(treatment.ct, treatment.isocentre_lps_mm, geometry, r)
                      for name, r in rois.items()}
    return AnatomyProcessor(target, flat_fields=plan_flat_fields(plan) or None, levels=levels,
                            level_registrations=level_regs)


def warm_up_kernels() -> float:
    """Compile (or load from numba's cache) the registration kernels; returns the seconds it took.

    Numba holds the GIL while it compiles, which would make the publisher's
    heartbeats late during the first pair. The service calls this before its
    threads start: a tiny DRR, and the fiducial pipeline (whole frame and
    tracking windows, the flat field, the faint search's seed fits, and one
    view) on a small synthetic pair with one dark blob.
    """
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.registration.drr import AttenuationVolume, compute_drr
    from spineguide.registration.errors import RegistrationError

    from ..localisation.fiducials import localise_fiducials

    t0 = time.monotonic()
    geometry = default_stereo_geometry(128, 3.2)
    compute_drr(AttenuationVolume(np.full((4, 4, 4), 0.02, np.float32), np.eye(4)), geometry["A"])
    frames = {}
    for name in geometry.names:
        frame = np.full((128, 128), 20000, np.uint16)
        frame[63:65, 63:65] = 2000  # a seed-like blob at the isocentre's projection
        frames[name] = frame
    for prior in (None, Pose.identity()):
        try:
            localise_fiducials(frames, geometry, np.zeros((1, 3)), ["warm-up"], i0=20000.0, prior_pose=prior)
        except (TrackingError, RegistrationError):
            pass  # only the compilation matters here
    # The panel's flat field (a plan's gain and dark maps), for both frame dtypes the wire carries, writable
    # or read-only (the wire decoder hands over a writable copy, a caller may pass a read-only array: numba
    # compiles each kind on its own).
    from ..localisation.flatfield import FlatField

    field = FlatField(geometry.names[0], np.ones((128, 128), np.float32), np.zeros((128, 128), np.float32))
    for dtype in (np.uint16, np.float32):
        frame = frames[geometry.names[0]].astype(dtype)
        field.apply(frame)
        frame.setflags(write=False)
        field.apply(frame)
    # The seed-shadow fits of the faint verification (the blob above does not need them).
    from ..localisation.detection import DetectionConfig
    from ..localisation.seed_search import refine_seeds

    name = geometry.names[0]
    refine_seeds(frames[name].astype(np.float32), geometry[name], 20000.0, np.array([[64.0, 64.0]]), np.zeros(1),
                 DetectionConfig(), 0.0)
    # The one-view path (a view blocked): its own detection windows and seed fits.
    from spineguide.registration.motion_prior import MotionPrior

    from ..localisation.one_view import localise_one_view

    for name in geometry.names:
        try:
            localise_one_view(frames[name], name, geometry, np.zeros((2, 3)) + [[0, 0, 0], [5, 0, 0]],
                              ["warm-up-1", "warm-up-2"], MotionPrior(Pose.identity()), 0.1, i0=20000.0)
        except (TrackingError, RegistrationError):
            pass
    return time.monotonic() - t0
