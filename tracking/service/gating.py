"""Beam gating: the small, explicit rules that turn measurements into ENABLE or HOLD.

Safety model (docs/CONVENTIONS.md, ``gating/1``): ``ENABLE`` is a permission
that expires at ``valid_until_unix_s``; a receiver without an unexpired
``ENABLE`` holds the beam, and a ``HOLD`` revokes every earlier ``ENABLE``.
So the rules here only ever *grant* a permission when the latest stereo pair
is good, fresh and within tolerance, and never grant one that outlives the
freshness of the measurement it rests on.

Everything is a pure function of (state, input, clock, config): no sockets,
no clocks read here. The loop calls :func:`judge_measurement` for every
judged pair and :func:`judge_silence` on its timer; both return the decision
and the next state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from ..errors import TrackingError

__all__ = [
    "Beam",
    "HoldReason",
    "GatingConfig",
    "Measurement",
    "GatingState",
    "GatingDecision",
    "judge_measurement",
    "judge_silence",
    "judge_fault",
    "with_tolerance",
    "CHI2_3DOF_95",
]


class Beam(Enum):
    """Beam permission as sent in ``gating/1``."""

    ENABLE = "ENABLE"
    HOLD = "HOLD"


class HoldReason(Enum):
    """Short reason codes carried in ``gating/1`` ``reason`` (and ``ok`` for ENABLE)."""

    OK = "ok"
    NOT_MONITORING = "not_monitoring"
    NO_MEASUREMENT = "no_measurement"
    STALE_FRAME = "stale_frame"
    FUTURE_FRAME = "future_frame"
    MISSING_FRAME = "missing_frame"
    UNPAIRED_FRAME = "unpaired_frame"
    CORRUPT_FRAME = "corrupt_frame"
    NAN_FRAME = "nan_frame"
    SATURATED_FRAME = "saturated_frame"
    REGISTRATION_FAILED = "registration_failed"
    REGISTRATION_REFUSED = "registration_refused"
    FIDUCIAL_MISSING = "fiducial_missing"
    FIDUCIAL_MIGRATED = "fiducial_migrated"
    OUT_OF_TOLERANCE = "out_of_tolerance"
    MOVING_OUT_OF_TOLERANCE = "moving_out_of_tolerance"
    ROTATION_OUT_OF_TOLERANCE = "rotation_out_of_tolerance"
    SETTLING = "settling"
    CORRECTION_LIMIT = "correction_limit"
    FRAME_SOURCE_SILENT = "frame_source_silent"
    PAUSED = "paused"
    INTERNAL_ERROR = "internal_error"
    # Faults of the link and of the frame stream (docs/PROTOCOL.md, "Sessions and epochs").
    PAIR_DROPPED = "pair_dropped"
    OVERSIZE_MESSAGE = "oversize_message"
    PEER_DISCONNECTED = "peer_disconnected"
    IMAGER_RESTARTED = "imager_restarted"
    PAIR_ID_JUMP = "pair_id_jump"
    COUCH_TIMEOUT = "couch_timeout"
    FRAME_SENDER_NOT_IMAGER = "frame_sender_not_imager"
    # One-view monitoring (docs/ONE_VIEW.md): one imager blocked, dark, saturated or missing.
    ONE_VIEW_UNCERTAIN = "one_view_uncertain"
    ONE_VIEW_OUT_OF_TOLERANCE = "one_view_out_of_tolerance"
    ONE_VIEW_REFUSED = "one_view_refused"
    ONE_VIEW_NO_REFERENCE = "one_view_no_reference"


#: Chi-square quantile (3 degrees of freedom) of the joint 95 % region of a 3-vector:
#: ``scipy.stats.chi2.ppf(0.95, 3)``. The one-view bounds are the extremes of this ellipsoid.
CHI2_3DOF_95 = 7.814727903251178


@dataclass(frozen=True, slots=True)
class GatingConfig:
    """Gating tolerances and timing. All safety values live here and are logged at start-up.

    Attributes
    ----------
    tolerance_3d_mm : float
        Largest 3D target deviation that allows the beam, mm.
    tolerance_axis_mm : (3,) tuple
        Largest |deviation| per room axis (X, Y, Z), mm.
    tolerance_rotation_deg : float
        Largest |pitch|, |roll| or |yaw| of the patient pose, degrees.
    frame_period_s : float
        Nominal time between stereo pairs, s.
    max_frame_age_s : float
        A pair older than this (acquisition to judgement) is stale, s.
        Default two frame periods.
    enable_validity_s : float
        Longest life of one ENABLE after it is issued, s. Default two frame
        periods. An ENABLE also never outlives ``acquired + max_frame_age_s``.
    consecutive_to_enable : int
        Good pairs in a row needed to (re-)enable after any HOLD.
    rearm_margin_mm : float
        Hysteresis: after an out-of-tolerance HOLD, the 3D deviation must fall
        below ``tolerance_3d_mm - rearm_margin_mm`` before counting as good.
    max_clock_skew_s : float
        A pair stamped this far in the future is refused (clock trouble).
    """

    tolerance_3d_mm: float = 1.0
    tolerance_axis_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tolerance_rotation_deg: float = 1.0
    frame_period_s: float = 0.1
    max_frame_age_s: float = 0.2
    enable_validity_s: float = 0.2
    consecutive_to_enable: int = 1
    rearm_margin_mm: float = 0.0
    max_clock_skew_s: float = 0.05

    def __post_init__(self) -> None:
        axis = tuple(float(x) for x in self.tolerance_axis_mm)
        object.__setattr__(self, "tolerance_axis_mm", axis)
        positive = {
            "tolerance_3d_mm": self.tolerance_3d_mm,
            "tolerance_rotation_deg": self.tolerance_rotation_deg,
            "frame_period_s": self.frame_period_s,
            "max_frame_age_s": self.max_frame_age_s,
            "enable_validity_s": self.enable_validity_s,
        }
        for i, v in enumerate(axis):
            positive[f"tolerance_axis_mm[{i}]"] = v
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TrackingError(f"gating config: {name} must be a positive finite number, got {value!r}")
        if len(axis) != 3:
            raise TrackingError(f"gating config: tolerance_axis_mm needs 3 values, got {len(axis)}")
        if not (isinstance(self.consecutive_to_enable, int) and self.consecutive_to_enable >= 1):
            raise TrackingError(
                f"gating config: consecutive_to_enable must be an integer >= 1, got {self.consecutive_to_enable!r}"
            )
        if not (0.0 <= self.rearm_margin_mm < self.tolerance_3d_mm):
            raise TrackingError(
                f"gating config: rearm_margin_mm must be in [0, tolerance_3d_mm), got {self.rearm_margin_mm!r}"
            )
        if not (math.isfinite(self.max_clock_skew_s) and self.max_clock_skew_s >= 0):
            raise TrackingError(f"gating config: max_clock_skew_s must be >= 0, got {self.max_clock_skew_s!r}")

    @classmethod
    def for_frame_period(cls, frame_period_s: float, **overrides) -> "GatingConfig":
        """Defaults scaled to a frame period: staleness and ENABLE life of two periods."""
        base = dict(frame_period_s=frame_period_s, max_frame_age_s=2 * frame_period_s, enable_validity_s=2 * frame_period_s)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True, slots=True)
class Measurement:
    """What the loop learned from one stereo pair, in the room frame.

    Attributes
    ----------
    pair_id : int
    acquired_unix_s : float
        Acquisition time of the older frame of the pair (wall clock, s).
    reason : HoldReason
        ``HoldReason.OK`` when the pair was measured and trusted; otherwise
        why not (``fiducial_missing``, ``registration_refused``...).
    deviation_mm : (3,) array or None
        Target displacement (actual - planned), room X, Y, Z, mm.
    rotation_deg : (3,) array or None
        Patient pose ``[pitch, roll, yaw]``, degrees.
    velocity_mm_per_s : (3,) array or None
        Target velocity (room X, Y, Z, mm/s) from this and the previous
        pair, when known. With it the gate judges the deviation the target
        will have reached when the ENABLE expires, not only the one measured.
    one_view : str or None
        None for a stereo measurement; the imager's name when the pair was
        measured from that one view only (the other blocked, dark, saturated
        or missing). A one-view measurement must carry both covariances.
    deviation_cov_mm2 : (3, 3) array or None
        Covariance of ``deviation_mm`` (room frame, mm^2). When given, the
        gate bounds the deviation by the joint 95 % ellipsoid
        (:data:`CHI2_3DOF_95`) instead of trusting the point estimate.
    rotation_cov_deg2 : (3, 3) array or None
        Covariance of ``rotation_deg`` (deg^2), used the same way.
    """

    pair_id: int
    acquired_unix_s: float
    reason: HoldReason
    deviation_mm: np.ndarray | None = None
    rotation_deg: np.ndarray | None = None
    velocity_mm_per_s: np.ndarray | None = None
    one_view: str | None = None
    deviation_cov_mm2: np.ndarray | None = None
    rotation_cov_deg2: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, HoldReason):
            raise TrackingError(f"measurement reason must be a HoldReason, got {self.reason!r}")
        for name in ("deviation_mm", "rotation_deg", "velocity_mm_per_s"):
            value = getattr(self, name)
            if value is not None:
                arr = np.array(value, dtype=np.float64)
                if arr.shape != (3,):
                    raise TrackingError(f"measurement {name} must have 3 values, got shape {arr.shape}")
                arr.setflags(write=False)
                object.__setattr__(self, name, arr)
        for name in ("deviation_cov_mm2", "rotation_cov_deg2"):
            value = getattr(self, name)
            if value is not None:
                arr = np.array(value, dtype=np.float64)
                if arr.shape != (3, 3):
                    raise TrackingError(f"measurement {name} must be 3x3, got shape {arr.shape}")
                arr.setflags(write=False)
                object.__setattr__(self, name, arr)
        if self.one_view is not None and not (isinstance(self.one_view, str) and self.one_view):
            raise TrackingError(f"measurement one_view must be an imager name or None, got {self.one_view!r}")
        if self.reason is HoldReason.OK and (self.deviation_mm is None or self.rotation_deg is None):
            raise TrackingError("a measurement marked OK must carry deviation_mm and rotation_deg")
        if (self.reason is HoldReason.OK and self.one_view is not None
                and (self.deviation_cov_mm2 is None or self.rotation_cov_deg2 is None)):
            raise TrackingError("a one-view measurement marked OK must carry deviation_cov_mm2 and rotation_cov_deg2")


@dataclass(frozen=True, slots=True)
class GatingState:
    """Memory of the gate between decisions.

    Attributes
    ----------
    consecutive_good : int
        Good, in-tolerance pairs in a row.
    rearm_needed : bool
        The last HOLD was for tolerance: the rearm margin applies.
    last_pair_id : int or None
        Newest pair judged (older pairs arriving late are stale by definition).
    enabled_until_unix_s : float
        Expiry of the newest ENABLE sent (0 if none).
    """

    consecutive_good: int = 0
    rearm_needed: bool = False
    last_pair_id: int | None = None
    enabled_until_unix_s: float = 0.0


@dataclass(frozen=True, slots=True)
class GatingDecision:
    """One ``gating/1`` message's content (without ``seq`` and ``t_unix_s``, added by the sender).

    ``valid_until_unix_s`` is the ENABLE's expiry; for HOLD it equals the
    decision time (a HOLD is valid until revoked by a later ENABLE).
    ``one_view`` names the imager a one-view pair was measured with (None:
    stereo, or no pair); ``deviation_bound_mm`` is the 95 % upper bound of
    the 3D deviation the gate judged (None when it had no covariance).
    """

    beam: Beam
    reason: HoldReason
    valid_until_unix_s: float
    pair_id: int | None
    deviation_mm: float | None
    decided_unix_s: float = field(default=0.0)
    one_view: str | None = None
    deviation_bound_mm: float | None = None


def _hold(reason: HoldReason, now: float, pair_id: int | None, dev: float | None, state: GatingState,
          rearm: bool | None = None, one_view: str | None = None,
          bound: float | None = None) -> tuple[GatingDecision, GatingState]:
    new_state = GatingState(
        consecutive_good=0,
        rearm_needed=state.rearm_needed if rearm is None else rearm,
        last_pair_id=state.last_pair_id if pair_id is None else max(pair_id, state.last_pair_id or pair_id),
        enabled_until_unix_s=0.0,
    )
    return GatingDecision(Beam.HOLD, reason, now, pair_id, dev, now, one_view, bound), new_state


def _margins(cov: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Half-widths of the joint 95 % ellipsoid of a 3-vector: (along its longest axis, along each room axis).

    ``|x| <= |x_hat| + sqrt(chi2 * lambda_max)`` and ``|x_i| <= |x_hat_i| + sqrt(chi2 * C_ii)`` for every
    ``x`` in the ellipsoid ``(x - x_hat)^T C^-1 (x - x_hat) <= chi2``. No covariance: zero margins.
    A covariance that is not finite, not symmetric or not positive semi-definite gives NaN margins
    (the caller holds).
    """
    if cov is None:
        return 0.0, np.zeros(3)
    c = np.asarray(cov, dtype=np.float64)
    if not np.all(np.isfinite(c)) or not np.allclose(c, c.T, rtol=1e-9, atol=1e-12):
        return math.nan, np.full(3, math.nan)
    w = np.linalg.eigvalsh(0.5 * (c + c.T))
    d = np.diag(c)
    if w.min() < -1e-9 * max(float(w.max()), 1e-300) or np.any(d < 0):
        return math.nan, np.full(3, math.nan)
    return math.sqrt(CHI2_3DOF_95 * max(float(w.max()), 0.0)), np.sqrt(CHI2_3DOF_95 * np.maximum(d, 0.0))


def judge_measurement(
    state: GatingState, m: Measurement | None, now_unix_s: float, config: GatingConfig
) -> tuple[GatingDecision, GatingState]:
    """Decide ENABLE or HOLD for the newest judged pair (stereo, or one view).

    ENABLE only if: a measurement exists, it is OK, it is not older than a
    pair already judged, its age is within ``[-max_clock_skew_s,
    max_frame_age_s]``, its deviation and rotation are finite and within every
    tolerance (with the rearm margin after a tolerance HOLD), the deviation
    extrapolated with the measured velocity (when given) to the ENABLE's
    expiry is within tolerance too, and at least
    ``consecutive_to_enable`` such pairs came in a row. Anything else: HOLD
    with the first failing reason. The ENABLE expires at
    ``min(now + enable_validity_s, acquired + max_frame_age_s)``.

    With covariances (one-view measurements always have them) every
    tolerance applies to the whole joint 95 % ellipsoid, not to the point
    estimate: ``|d| + sqrt(chi2 lambda_max) <= tolerance_3d``,
    ``|d_i| + sqrt(chi2 C_ii) <= tolerance_axis_i`` (also for the
    extrapolated deviation) and ``|r_i| + sqrt(chi2 C_rot_ii) <=
    tolerance_rotation``. A one-view pair whose point estimate fails a
    tolerance is held as ``one_view_out_of_tolerance``; one whose estimate
    passes but whose bound does not, as ``one_view_uncertain``. Every
    decision on a one-view pair names its imager (``one_view``).
    """
    if not math.isfinite(now_unix_s):
        return _hold(HoldReason.INTERNAL_ERROR, 0.0, None, None, state)
    if m is None:
        return _hold(HoldReason.NO_MEASUREMENT, now_unix_s, None, None, state)
    pid = m.pair_id
    view = m.one_view
    dev_norm = None
    if m.deviation_mm is not None and np.all(np.isfinite(m.deviation_mm)):
        dev_norm = float(np.linalg.norm(m.deviation_mm))

    def hold(reason: HoldReason, rearm: bool | None = None, bound: float | None = None):
        return _hold(reason, now_unix_s, pid, dev_norm, state, rearm, view, bound)

    if state.last_pair_id is not None and pid <= state.last_pair_id:
        return hold(HoldReason.STALE_FRAME)
    if m.reason is not HoldReason.OK:
        return hold(m.reason)
    if not math.isfinite(m.acquired_unix_s):
        return hold(HoldReason.INTERNAL_ERROR)
    age_s = now_unix_s - m.acquired_unix_s
    if age_s > config.max_frame_age_s:
        return hold(HoldReason.STALE_FRAME)
    if age_s < -config.max_clock_skew_s:
        return hold(HoldReason.FUTURE_FRAME)
    dev = m.deviation_mm
    rot = m.rotation_deg
    if dev_norm is None or not np.all(np.isfinite(rot)):
        return hold(HoldReason.INTERNAL_ERROR)
    margin_3d, margin_axis = _margins(m.deviation_cov_mm2)
    _, margin_rot = _margins(m.rotation_cov_deg2)
    if not (math.isfinite(margin_3d) and np.all(np.isfinite(margin_axis)) and np.all(np.isfinite(margin_rot))):
        return hold(HoldReason.INTERNAL_ERROR)
    bound = dev_norm + margin_3d if m.deviation_cov_mm2 is not None else None
    limit_3d = config.tolerance_3d_mm - (config.rearm_margin_mm if state.rearm_needed else 0.0)
    axis_limits = np.asarray(config.tolerance_axis_mm)
    if state.rearm_needed and config.rearm_margin_mm > 0:
        axis_limits = np.maximum(axis_limits - config.rearm_margin_mm, 0.0)
    out_reason = HoldReason.ONE_VIEW_OUT_OF_TOLERANCE if view is not None else HoldReason.OUT_OF_TOLERANCE
    unsure_reason = HoldReason.ONE_VIEW_UNCERTAIN if view is not None else HoldReason.OUT_OF_TOLERANCE
    if dev_norm > limit_3d or np.any(np.abs(dev) > axis_limits):
        return hold(out_reason, rearm=True, bound=bound)
    if dev_norm + margin_3d > limit_3d or np.any(np.abs(dev) + margin_axis > axis_limits):
        return hold(unsure_reason, rearm=True, bound=bound)
    valid_until = min(now_unix_s + config.enable_validity_s, m.acquired_unix_s + config.max_frame_age_s)
    if m.velocity_mm_per_s is not None:
        vel = m.velocity_mm_per_s
        if not np.all(np.isfinite(vel)):
            return hold(HoldReason.INTERNAL_ERROR)
        # Where the target will be when this permission expires, if it keeps moving as it moved.
        ahead = dev + vel * max(valid_until - m.acquired_unix_s, 0.0)
        ahead_norm = float(np.linalg.norm(ahead))
        if ahead_norm > limit_3d or np.any(np.abs(ahead) > axis_limits):
            moving = HoldReason.ONE_VIEW_OUT_OF_TOLERANCE if view is not None else HoldReason.MOVING_OUT_OF_TOLERANCE
            return hold(moving, rearm=True, bound=bound)
        if ahead_norm + margin_3d > limit_3d or np.any(np.abs(ahead) + margin_axis > axis_limits):
            return hold(unsure_reason, rearm=True, bound=bound)
    if np.max(np.abs(rot)) > config.tolerance_rotation_deg:
        rot_reason = HoldReason.ONE_VIEW_OUT_OF_TOLERANCE if view is not None else HoldReason.ROTATION_OUT_OF_TOLERANCE
        return hold(rot_reason, rearm=True, bound=bound)
    if np.max(np.abs(rot) + margin_rot) > config.tolerance_rotation_deg:
        rot_unsure = HoldReason.ONE_VIEW_UNCERTAIN if view is not None else HoldReason.ROTATION_OUT_OF_TOLERANCE
        return hold(rot_unsure, rearm=True, bound=bound)
    good = state.consecutive_good + 1
    if good < config.consecutive_to_enable:
        new_state = GatingState(good, state.rearm_needed, pid, 0.0)
        return GatingDecision(Beam.HOLD, HoldReason.SETTLING, now_unix_s, pid, dev_norm, now_unix_s, view,
                              bound), new_state
    new_state = GatingState(good, False, pid, valid_until)
    return GatingDecision(Beam.ENABLE, HoldReason.OK, valid_until, pid, dev_norm, now_unix_s, view, bound), new_state


def judge_silence(
    state: GatingState, now_unix_s: float, last_frame_unix_s: float | None, config: GatingConfig
) -> tuple[GatingDecision | None, GatingState]:
    """Timer check: HOLD when frames stopped coming; ``None`` when nothing needs saying.

    Called by the loop between pairs. If no frame has arrived for more than
    ``max_frame_age_s`` (or ever), any permission is revoked with
    ``frame_source_silent``. A still-valid ENABLE is left alone (it expires by
    itself); an expired one is followed by an explicit HOLD.
    """
    silent = last_frame_unix_s is None or (now_unix_s - last_frame_unix_s) > config.max_frame_age_s
    if silent:
        return _hold(HoldReason.FRAME_SOURCE_SILENT, now_unix_s, None, None, state)
    if state.enabled_until_unix_s and now_unix_s >= state.enabled_until_unix_s:
        return _hold(HoldReason.STALE_FRAME, now_unix_s, None, None, state)
    return None, state


def judge_fault(
    state: GatingState, reason: HoldReason, now_unix_s: float, pair_id: int | None = None
) -> tuple[GatingDecision, GatingState]:
    """HOLD at once for a fault found outside a measurement (corrupt or unpaired frame, internal error...).

    A fault can only revoke a permission, never grant one: the result is
    always a HOLD with ``reason`` (``internal_error`` if ``reason`` is ``OK``
    or the clock is not finite), and the good-pair count restarts.
    """
    if not isinstance(reason, HoldReason) or reason is HoldReason.OK:
        reason = HoldReason.INTERNAL_ERROR
    if not math.isfinite(now_unix_s):
        return _hold(HoldReason.INTERNAL_ERROR, 0.0, None, None, state)
    return _hold(reason, now_unix_s, pair_id, None, state)


def with_tolerance(config: GatingConfig, tolerance_3d_mm: float | None = None,
                   tolerance_rotation_deg: float | None = None) -> GatingConfig:
    """A copy of ``config`` with new tolerances (the ``set tolerance`` command)."""
    changes = {}
    if tolerance_3d_mm is not None:
        changes["tolerance_3d_mm"] = tolerance_3d_mm
        changes["tolerance_axis_mm"] = (tolerance_3d_mm,) * 3
    if tolerance_rotation_deg is not None:
        changes["tolerance_rotation_deg"] = tolerance_rotation_deg
    return replace(config, **changes)
