"""The service's state machine, command handling and per-pair decisions (the deterministic core).

:class:`Engine` holds everything that decides: the service state
(IDLE -> PLAN_LOADED -> SETUP -> MONITORING -> PAUSED / STOPPED), the setup
phase, the gating state and tolerances, the last trusted pose. Its inputs are
commands, frame arrivals and faults, processed pairs and timer ticks, each
given with the clock values to decide with; its outputs are message bodies
(``gating/1``, ``correction/1``) handed to ``emit`` and records written to
the session record. It reads no clock and owns no socket, so
``spineguide replay`` can feed it a recorded session and compare every
output. All public methods are thread-safe (one lock); the slow part of a
pair, the registration, runs outside the lock (:func:`run_processor`).

Beam rule: only MONITORING can ENABLE; every other state HOLDs with a reason.
"""

from __future__ import annotations

import logging
import math
import threading
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np

from spineguide.registration.motion_prior import (
    MotionPrior,
    pose_six,
    prior_from_stereo_history,
    target_covariance_mm2,
)
from spineguide.registration.pose import Correction, Pose, RotationAxis, reduce_to_couch

from ..errors import CommandRefused, TrackingError
from ..frames import KvFrame
from .config import CataloguePlan, PlanConfig, ServiceConfig
from .gating import (
    Beam,
    GatingDecision,
    GatingState,
    HoldReason,
    Measurement,
    judge_fault,
    judge_measurement,
    judge_silence,
    with_tolerance,
)
from .processing import PairProcessor, PairResult, check_view_quality
from .record import SessionRecord
from .wire import correction_body, gating_body

__all__ = [
    "ServiceState",
    "SetupPhase",
    "Command",
    "ALLOWED_STATES",
    "CommandRefused",
    "PairJob",
    "Engine",
    "run_processor",
]

log = logging.getLogger(__name__)


class ServiceState(Enum):
    """Top-level state of the service (sent in ``heartbeat/1`` and ``reply/1``)."""

    IDLE = "IDLE"
    PLAN_LOADED = "PLAN_LOADED"
    SETUP = "SETUP"
    MONITORING = "MONITORING"
    PAUSED = "PAUSED"
    STOPPED = "STOPPED"


class SetupPhase(Enum):
    """Progress of a patient setup inside SETUP."""

    MEASURING = "measuring"                  # waiting for a pair to register
    AWAITING_APPROVAL = "awaiting_approval"  # correction proposed, waiting for approve_correction
    AWAITING_COUCH = "awaiting_couch"        # correction sent (apply=true), waiting for couch_moved
    VERIFYING = "verifying"                  # couch moved: the next pair acquired after it decides
    VERIFIED = "verified"                    # within tolerance: start_monitoring allowed


class Command(Enum):
    """Commands of ``command/1``."""

    STATUS = "status"
    LIST_PLANS = "list_plans"
    LOAD_PLAN = "load_plan"
    START_SETUP = "start_setup"
    APPROVE_CORRECTION = "approve_correction"
    COUCH_MOVED = "couch_moved"
    START_MONITORING = "start_monitoring"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    SET_TOLERANCE = "set_tolerance"


S = ServiceState
#: The states in which each command is valid (anything else is refused with the reason).
ALLOWED_STATES: Mapping[Command, frozenset[ServiceState]] = {
    Command.STATUS: frozenset(S),
    Command.LIST_PLANS: frozenset(S),
    Command.LOAD_PLAN: frozenset({S.IDLE, S.PLAN_LOADED}),
    Command.START_SETUP: frozenset({S.PLAN_LOADED, S.MONITORING, S.PAUSED}),
    Command.APPROVE_CORRECTION: frozenset({S.SETUP}),
    Command.COUCH_MOVED: frozenset({S.SETUP}),
    Command.START_MONITORING: frozenset({S.SETUP}),
    Command.PAUSE: frozenset({S.MONITORING}),
    Command.RESUME: frozenset({S.PAUSED}),
    Command.STOP: frozenset(set(S) - {S.STOPPED}),
    Command.SET_TOLERANCE: frozenset(set(S) - {S.STOPPED}),
}

#: Largest tolerance ``set_tolerance`` accepts (a typo must not open the gate wide).
MAX_SETTABLE_TOLERANCE_MM = 5.0
MAX_SETTABLE_TOLERANCE_DEG = 5.0
#: A repeated identical HOLD from the timer is re-sent at this period (PUB may drop messages), s.
HOLD_REPEAT_S = 1.0


@dataclass(frozen=True, slots=True)
class PairJob:
    """A complete stereo pair taken by the worker, with the context it will be judged in.

    Attributes
    ----------
    pair_id : int
    acquired_unix_s : float
        Acquisition time of the older frame (wall clock, s).
    complete_mono_s : float
        When the I/O thread completed the pair (monotonic, s): start of the latency.
    begin_unix_s : float
        When processing started (wall clock, s): the staleness check before registering.
    prior : Pose or None
        Last trusted pose.
    skip : HoldReason or None
        Set when the pair is not registered at all (stale before processing).
    epoch : int
        The pair-numbering epoch the pair belongs to (:meth:`Engine.new_epoch`).
    reference : Pose or None
        The last stereo pose of this monitoring run, when one view may lean on it
        (MONITORING, one-view enabled, reference young enough); else None.
    reference_acquired_unix_s : float or None
        Acquisition time of that stereo pair (wall clock, s).
    reference_history : tuple of (6,) tuples
        The stereo poses ``[tx, ty, tz, pitch, roll, yaw]`` of the last ``[one_view] history_s`` before
        the reference (reference included): their scatter joins the motion prior's floor.
    per_level : bool
        Register every vertebral level on its own (setup with a per-level plan, docs/PER_LEVEL.md).
    level : str or None
        The level that drives the correction (chosen at approval); None: the plan's target level.
    """

    pair_id: int
    acquired_unix_s: float
    complete_mono_s: float
    begin_unix_s: float
    prior: Pose | None
    skip: HoldReason | None
    epoch: int = 0
    reference: Pose | None = None
    reference_acquired_unix_s: float | None = None
    reference_history: tuple = ()
    per_level: bool = False
    level: str | None = None


def run_processor(processor: PairProcessor | None, frames: dict[str, KvFrame], job: PairJob,
                  config: ServiceConfig) -> PairResult:
    """Run the frame checks and the registration for one pair; any exception becomes ``internal_error``.

    Both views usable: the stereo registration. Exactly one usable (the other missing, dark or
    saturated; docs/ONE_VIEW.md): with ``[one_view] enabled`` and a stereo reference in ``job``,
    the processor's ``process_one_view`` against the motion prior; otherwise a HOLD naming why.
    A non-finite frame is never worked around (``nan_frame``).
    Called outside the engine lock (worker thread, or replay). Never raises.
    """
    if job.skip is not None:
        return PairResult(job.skip, quality={"ok": False}, detail="not registered")
    if processor is None:
        return PairResult(HoldReason.INTERNAL_ERROR, quality={"ok": False}, detail="no plan loaded")
    try:
        ov = config.one_view
        bad: dict[str, tuple[HoldReason, str]] = {}
        for name in config.imagers:
            frame = frames.get(name)
            if frame is None:
                bad[name] = (HoldReason.UNPAIRED_FRAME, f"imager '{name}' pair {job.pair_id}: no frame")
                continue
            problem = check_view_quality(frame, config.safety, ov.dark_fraction)
            if problem is not None:
                if problem[0] is HoldReason.NAN_FRAME:
                    return PairResult(problem[0], method=processor.method, quality={"ok": False}, detail=problem[1])
                bad[name] = problem
        if not bad:
            if job.per_level and getattr(processor, "has_levels", False):
                result = processor.process_levels(frames, job.prior, job.level)
            elif job.level is not None and getattr(processor, "has_levels", False):
                result = processor.process(frames, job.prior, level=job.level)
            else:
                result = processor.process(frames, job.prior)
        else:
            usable = [n for n in config.imagers if n not in bad]
            why = "; ".join(d for _, d in bad.values())
            if len(usable) != 1 or not ov.enabled:
                return PairResult(next(iter(bad.values()))[0], method=processor.method, quality={"ok": False},
                                  detail=why)
            imager = usable[0]
            blocked = {n: r.value for n, (r, _) in bad.items()}
            if job.reference is None or job.reference_acquired_unix_s is None:
                return PairResult(HoldReason.ONE_VIEW_NO_REFERENCE, method=processor.method,
                                  quality={"ok": False, "blocked": blocked},
                                  detail=f"one view {imager!r}: no recent stereo pose of this monitoring run to "
                                         f"lean on ({why})", one_view=imager)
            if not hasattr(processor, "process_one_view"):
                return PairResult(HoldReason.ONE_VIEW_NO_REFERENCE, method=processor.method,
                                  quality={"ok": False, "blocked": blocked},
                                  detail=f"one view {imager!r}: the {processor.method} method cannot measure from "
                                         f"one view ({why})", one_view=imager)
            prior = MotionPrior(job.reference, ov.reference_cov(), ov.prior_diffusion(), ov.prior_floor())
            if len(job.reference_history) >= 2:
                prior = prior_from_stereo_history(job.reference, ov.reference_cov(),
                                                  np.array(job.reference_history), prior)
            elapsed_s = max(job.acquired_unix_s - job.reference_acquired_unix_s, 0.0)
            extra = {"level": job.level} if job.level is not None and getattr(processor, "has_levels", False) else {}
            result = processor.process_one_view(frames[imager], prior, elapsed_s, job.prior, **extra)
        if not isinstance(result, PairResult):
            raise TrackingError(f"processor returned {type(result).__name__}, not a PairResult")
        if bad:  # measured on one view
            if result.one_view != imager:
                raise TrackingError(f"one-view result names imager {result.one_view!r}, the view was {imager!r}")
            result = replace(result, quality={**result.quality, "blocked": blocked, "reference_age_s": elapsed_s})
        return result
    except Exception as err:  # noqa: BLE001 - the loop's one place that turns any failure into a HOLD
        log.error("pair %d: processing raised %s: %s\n%s", job.pair_id, type(err).__name__, err,
                  traceback.format_exc())
        return PairResult(HoldReason.INTERNAL_ERROR, quality={"ok": False},
                          detail=f"{type(err).__name__}: {err}")


def _level_poses(table: Mapping[str, Any]) -> dict[str, Pose]:
    """Level name -> pose of every level registered ok in a per-level table (``LevelsResult.to_json()``)."""
    out: dict[str, Pose] = {}
    for lv in table.get("levels", ()):
        pose = lv.get("pose") if isinstance(lv, Mapping) else None
        if lv.get("ok") and isinstance(pose, Mapping):
            out[str(lv["name"])] = Pose.from_six(pose["translation_mm"], pose["rotation_deg"])
    return out


class Engine:
    """The deterministic core of the service; see the module docstring.

    Parameters
    ----------
    config : ServiceConfig
    processor_factory : callable(PlanConfig) -> PairProcessor
        Called by ``load_plan``.
    record : SessionRecord
    emit : callable(dict) -> None
        Receives each outgoing message body (no ``seq``) in decision order;
        the service's publisher numbers and sends them. Called under the
        engine lock, so it must only enqueue.
    on_setup_applied : callable(pair_id, pose, t_unix_s, operator) -> None, optional
        Told of every setup correction sent to the couch (approved, or
        automatic in simulation), e.g. to export it as DICOM. Called under the
        engine lock, so it must only start work elsewhere.
    session : str, optional
        The service session id carried as ``session`` in every output and
        reply (docs/PROTOCOL.md); default a new ``uuid4().hex``. Replay passes
        the recorded one.
    """

    def __init__(self, config: ServiceConfig, processor_factory: Callable[[PlanConfig], PairProcessor],
                 record: SessionRecord, emit: Callable[[dict], None],
                 on_setup_applied: Callable[[int, Pose, float, str], None] | None = None,
                 session: str | None = None) -> None:
        if session is None:
            session = uuid.uuid4().hex
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise TrackingError(f"engine session id must be a string of 1-64 characters, got {session!r}")
        self.session = session
        self.epoch = 0
        self.config = config
        self.gating_config = config.safety.gating()
        self._factory = processor_factory
        self.record = record
        self._emit_fn = emit
        self._on_setup_applied = on_setup_applied
        self._lock = threading.RLock()
        self.state = ServiceState.IDLE
        self.phase: SetupPhase | None = None
        self.processor: PairProcessor | None = None
        self.gating_state = GatingState()
        self.last_frame_unix_s: float | None = None
        self.last_pose: Pose | None = None
        #: (acquired_unix_s, pose, six-vector) of the stereo pairs trusted since the patient last moved by the
        #: couch, those of the last ``[one_view] history_s`` before the newest: the newest is what a one-view pair
        #: leans on (:attr:`stereo_reference`), the scatter of all widens its prior (docs/ONE_VIEW.md).
        #: Forgotten at load_plan, start_setup, couch_moved and stop.
        self.stereo_history: list[tuple[float, Pose, tuple[float, ...]]] = []
        #: The vertebral level whose pose drives the corrections (per-level plans; chosen at approval), None: the
        #: plan's target level. Forgotten at load_plan and start_setup.
        self.driving_level: str | None = None
        #: How the last judged pair was measured: {"mode": "stereo" | "one_view" | "none", "imager", "blocked"}.
        self.view_state: dict[str, Any] = {"mode": "none", "imager": None, "blocked": {}}
        self._last_failure: tuple[str, str] | None = None  # (reason, detail) of the last pair not ok: repeats log at DEBUG
        self.pending: dict[str, Any] | None = None      # correction proposed / sent in setup
        self.couch_moved_unix_s: float | None = None
        self._last_measured: list[tuple[float, np.ndarray]] | None = None  # recent (acquired_unix_s, deviation_mm)
        self._last_gating: tuple[Beam, HoldReason, float] | None = None
        self._outputs: list[dict] | None = None
        self.counters: dict[str, int] = {}
        self._built = None
        #: The catalogue plan loaded by the last ``load_plan`` (None until then).
        self.plan: CataloguePlan | None = None
        # Set from the chosen plan by load_plan (nothing is judged before a plan is loaded).
        self.target_room_mm = np.zeros(3)

    @property
    def stereo_reference(self) -> tuple[float, Pose] | None:
        """(acquired_unix_s, pose) of the newest stereo pair trusted since the patient last moved by the couch."""
        if not self.stereo_history:
            return None
        t, pose, _ = self.stereo_history[-1]
        return t, pose

    # ----------------------------------------------------------------- helpers
    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _emit(self, body: dict) -> None:
        if self._outputs is not None:
            self._outputs.append(body)
        self._emit_fn(body)

    def _send_gating(self, decision: GatingDecision, now_unix_s: float) -> None:
        self._last_gating = (decision.beam, decision.reason, now_unix_s)
        self._count(f"{decision.beam.value}:{decision.reason.value}")
        self._emit(gating_body(now_unix_s, decision, session=self.session))

    def _fault(self, reason: HoldReason, now_unix_s: float, pair_id: int | None, judged: bool = False,
               one_view: str | None = None) -> None:
        """HOLD ``reason``. Only a pair judged in this epoch (``judged``) moves the pair-order mark:
        a fault naming some pair id (a corrupt frame's header, a dropped pair) must never make
        later pairs stale."""
        keep = self.gating_state.last_pair_id
        decision, new_state = judge_fault(self.gating_state, reason, now_unix_s, pair_id, one_view)
        self.gating_state = new_state if judged else replace(new_state, last_pair_id=keep)
        self._send_gating(decision, now_unix_s)

    def _set_state(self, new: ServiceState, now_unix_s: float, now_mono_s: float, why: str) -> None:
        if new is self.state:
            return
        old = self.state
        self.state = new
        self._last_measured = None  # a velocity never spans a state change (e.g. a couch move)
        self.record.write("state", t_unix_s=now_unix_s, t_mono_s=now_mono_s, old=old.value, new=new.value, why=why)
        log.info("state %s -> %s (%s)", old.value, new.value, why)
        if old is ServiceState.MONITORING or new is not ServiceState.MONITORING:
            reason = HoldReason.PAUSED if new is ServiceState.PAUSED else HoldReason.NOT_MONITORING
            self._fault(reason, now_unix_s, None)

    def _set_phase(self, phase: SetupPhase | None, now_unix_s: float, now_mono_s: float) -> None:
        if phase is not self.phase:
            self.record.write("phase", t_unix_s=now_unix_s, t_mono_s=now_mono_s,
                              old=None if self.phase is None else self.phase.value,
                              new=None if phase is None else phase.value)
            self.phase = phase

    def status(self) -> dict[str, Any]:
        """State, phase, tolerances and counters (the ``status`` reply)."""
        g = self.gating_config
        return {
            "state": self.state.value,
            "phase": None if self.phase is None else self.phase.value,
            "tolerance_3d_mm": g.tolerance_3d_mm,
            "tolerance_rotation_deg": g.tolerance_rotation_deg,
            "pending_correction": None if self.pending is None else
            {k: v for k, v in self.pending.items()
             if k not in ("message", "sent_unix_s", "first_sent_unix_s", "pose", "level_poses", "result")},
            "driving_level": self.driving_level,
            "epoch": self.epoch,
            "views": dict(self.view_state),
            "plan": None if self.plan is None else {"plan_id": self.plan.plan_id,
                                                    "patient_id": self.plan.patient_id},
            "counters": dict(self.counters),
        }

    # ---------------------------------------------------------------- commands
    def handle_command(self, command: str, params: dict[str, Any], now_unix_s: float, now_mono_s: float,
                       request_seq: int | None = None,
                       client_session: str | None = None) -> tuple[dict[str, Any], list[dict]]:
        """Apply one command; returns ``(reply body, outputs)``. Never raises for a bad command.

        ``client_session``: the sender's ``session`` (``command/1.1``), recorded with the command.
        """
        built = None
        if command == Command.LOAD_PLAN.value:
            # Building a processor can take seconds (CT -> attenuation volumes): never under the
            # lock, so heartbeats, the gating timer and pair judgements go on meanwhile.
            with self._lock:
                allowed = self.state in ALLOWED_STATES[Command.LOAD_PLAN]
            chosen = self._chosen_plan(params) if allowed else None
            if isinstance(chosen, CataloguePlan):
                try:
                    built = (chosen, self._factory(chosen.plan))
                except Exception as err:  # noqa: BLE001 - reported in the reply below
                    built = err
            elif chosen is not None:
                built = CommandRefused(chosen)
        with self._lock:
            self._outputs = []
            before = self.state.value
            self._built = built
            try:
                result = self._apply(command, params, now_unix_s, now_mono_s)
                reply = {"ok": True, "reason": None, "command": command, **self.status(), **(result or {})}
            except CommandRefused as err:
                reply = {"ok": False, "reason": str(err), "command": command, **self.status()}
            except TrackingError as err:  # e.g. a plan that does not load
                reply = {"ok": False, "reason": f"{type(err).__name__}: {err}", "command": command, **self.status()}
            except Exception as err:  # noqa: BLE001 - a command must never kill the service
                log.error("command %r raised %s: %s\n%s", command, type(err).__name__, err, traceback.format_exc())
                reply = {"ok": False, "reason": f"internal error: {type(err).__name__}: {err}",
                         "command": command, **self.status()}
            reply["session"] = self.session
            if request_seq is not None:
                reply["request_seq"] = request_seq
            outputs, self._outputs = self._outputs, None
            self.record.write("command", t_unix_s=now_unix_s, t_mono_s=now_mono_s, command=command,
                              params=params, state_before=before, reply=reply, outputs=outputs,
                              client_session=client_session)
            return reply, outputs

    def _apply(self, name: str, params: dict[str, Any], now: float, mono: float) -> dict | None:
        try:
            cmd = Command(name)
        except ValueError:
            raise CommandRefused(f"unknown command {name!r}; known: {[c.value for c in Command]}") from None
        if self.state not in ALLOWED_STATES[cmd]:
            valid = sorted(s.value for s in ALLOWED_STATES[cmd])
            raise CommandRefused(f"command '{cmd.value}' is not valid in state {self.state.value} (valid in {valid})")
        return getattr(self, f"_cmd_{cmd.value}")(params, now, mono)

    def _cmd_status(self, params, now, mono):
        return None

    def _chosen_plan(self, params: dict[str, Any]) -> CataloguePlan | str:
        """The catalogue plan ``load_plan``'s params name, or why none is (a refusal's reason; never a default).

        ``plan_id`` is required with a ``[plans]`` catalogue; with the single ``[plan]`` it may be left out
        (older clients) or must name that plan. A ``patient_id``, when given, must be the plan's patient."""
        plan_id = params.get("plan_id")
        catalogue = self.config.catalogue
        known = [p.plan_id for p in catalogue]
        if plan_id is None:
            if self.config.plans:
                return f"load_plan needs plan_id: one of the service's plans {known[:16]} (see list_plans)"
            chosen = catalogue[0]
        elif not isinstance(plan_id, str):
            return f"load_plan: plan_id must be a string, got {type(plan_id).__name__}"
        else:
            chosen = self.config.find_plan(plan_id)
            if chosen is None:
                return f"load_plan: no plan {plan_id[:64]!r} in the service's catalogue {known[:16]}"
        patient_id = params.get("patient_id")
        if patient_id is not None:
            if not isinstance(patient_id, str):
                return f"load_plan: patient_id must be a string, got {type(patient_id).__name__}"
            if chosen.patient_id is not None and patient_id != chosen.patient_id:
                return (f"load_plan: plan {chosen.plan_id!r} is for patient {chosen.patient_id!r}, "
                        f"not {patient_id[:64]!r}")
        return chosen

    def _cmd_load_plan(self, params, now, mono):
        built, self._built = self._built, None
        if isinstance(built, (TrackingError, CommandRefused)):
            raise built
        if isinstance(built, Exception):
            raise TrackingError(f"plan cannot be loaded: {type(built).__name__}: {built}") from built
        if built is None:  # the state changed between the check and now
            raise CommandRefused(f"command 'load_plan' is not valid in state {self.state.value}")
        chosen, self.processor = built
        self.plan = chosen
        self.target_room_mm = np.asarray(chosen.plan.target_room_mm, dtype=np.float64)
        self.last_pose = None
        self.stereo_history = []
        self.driving_level = None
        self._set_state(ServiceState.PLAN_LOADED, now, mono, f"plan {chosen.plan_id} loaded")
        return {"method": chosen.plan.method}

    def _cmd_list_plans(self, params, now, mono):
        return {"plans": [p.to_json() for p in self.config.catalogue]}

    def _cmd_start_setup(self, params, now, mono):
        self.pending = None
        self.couch_moved_unix_s = None
        self.stereo_history = []
        self.driving_level = None
        self._set_phase(SetupPhase.MEASURING, now, mono)
        self._set_state(ServiceState.SETUP, now, mono, "setup started")

    def _cmd_approve_correction(self, params, now, mono):
        if self.phase is not SetupPhase.AWAITING_APPROVAL or self.pending is None:
            raise CommandRefused(f"no correction awaits approval (setup phase {self.phase.value})")
        # An approval names what it approves and is fresh: a click meant for one proposal never
        # applies another, and a proposal left standing does not move the couch minutes later.
        pid = self.pending["pair_id"]
        want = params.get("pair_id")
        if want is None:
            raise CommandRefused(f"approve_correction must name the proposal it approves (pair_id); "
                                 f"pair {pid} is proposed")
        if isinstance(want, bool) or not isinstance(want, int) or want != pid:
            raise CommandRefused(f"approve_correction names pair {want!r} but the proposal is from pair {pid}")
        age_s = mono - self.pending["proposed_mono_s"]
        limit_s = self.config.safety.approval_max_age_s
        if age_s > limit_s:
            self._drop_expired_proposal(now, mono)
            raise CommandRefused(f"the proposal from pair {pid} is {age_s:.1f} s old (limit {limit_s:g} s): "
                                 "expired and dropped; the next pair proposes afresh")
        level = self._approved_level(params.get("level"))
        operator = params.get("operator")
        operator = operator if isinstance(operator, str) else ""
        self.pending["approved_by"] = operator
        self._send_setup_correction(now, operator)
        self._set_phase(SetupPhase.AWAITING_COUCH, now, mono)
        reply = {"approved_pair_id": pid, "approved_by": operator}
        if level is not None:
            reply["level"] = level
        return reply

    def _approved_level(self, want) -> str | None:
        """Per-level proposals: the level the approval chooses to drive the correction (docs/PER_LEVEL.md).

        Without a per-level table, ``level`` must be absent. With one, ``level`` (default: the level
        that drives now) must be a level registered ok; a discordant table (the target's pose differs from
        its neighbours' beyond the thresholds) needs ``level`` named explicitly. Choosing another level
        rebuilds the proposed correction from that level's pose before it is sent.
        """
        table = self.pending.get("levels")
        if table is None:
            if want is not None:
                raise CommandRefused("approve_correction names a level, but this plan registers no levels")
            return None
        poses: dict[str, Pose] = self.pending["level_poses"]
        if want is None:
            if table.get("discordant"):
                raise CommandRefused("the levels disagree (" + str(table.get("discordance_detail", "")) + "): "
                                     "approve_correction must name the level that drives the correction (level)")
            return self.pending.get("level")
        if not isinstance(want, str) or want not in poses:
            raise CommandRefused(f"approve_correction names level {want!r}; the levels registered ok are "
                                 f"{sorted(poses)}")
        if want != self.pending.get("level"):
            result: PairResult = self.pending["result"]
            chosen = replace(result, pose=poses[want], quality={**result.quality, "driving_level": want})
            corr, extra = self._couch_correction(chosen.pose)
            ok, why = self._within_limits(corr)
            if not ok:
                raise CommandRefused(f"level {want}: {why}")
            self.pending.update({
                "translation_mm": [float(x) for x in corr.translation_mm],
                "rotation_deg": [float(x) for x in corr.rotation_deg],
                "message": self._correction_message(self.pending["pair_id"], self.pending["proposed_unix_s"], chosen,
                                                    corr, extra, True, "setup"),
                "pose": chosen.pose, "level": want})
        self.driving_level = want
        return want

    def _drop_expired_proposal(self, now, mono) -> None:
        """A setup proposal older than ``approval_max_age_s``: forget it (still HOLD); the next pair proposes."""
        log.warning("pair %s: setup proposal expired (older than %g s) and dropped", self.pending["pair_id"],
                    self.config.safety.approval_max_age_s)
        self._count("proposal_expired")
        self.pending = None
        self._set_phase(SetupPhase.MEASURING, now, mono)

    def _cmd_couch_moved(self, params, now, mono):
        if self.phase is not SetupPhase.AWAITING_COUCH:
            raise CommandRefused(f"no correction was sent to the couch (setup phase {self.phase.value})")
        self.couch_moved_unix_s = now
        self.stereo_history = []  # the couch moved the patient: the stereo poses no longer hold
        self._set_phase(SetupPhase.VERIFYING, now, mono)

    def _cmd_start_monitoring(self, params, now, mono):
        if self.phase is not SetupPhase.VERIFIED:
            raise CommandRefused(f"setup is not verified (setup phase {self.phase.value}); "
                                 "monitoring starts only after a verification pair within tolerance")
        self._begin_monitoring(now, mono, "monitoring started")

    def _cmd_resume(self, params, now, mono):
        self._begin_monitoring(now, mono, "resumed")

    def _begin_monitoring(self, now, mono, why):
        # A fresh gate: earlier good pairs do not count towards the new ENABLE.
        self.gating_state = GatingState(last_pair_id=self.gating_state.last_pair_id)
        self._set_phase(None, now, mono)
        self.pending = None
        self._set_state(ServiceState.MONITORING, now, mono, why)

    def _cmd_pause(self, params, now, mono):
        self._set_state(ServiceState.PAUSED, now, mono, "paused")

    def _cmd_stop(self, params, now, mono):
        self.stereo_history = []
        self._set_phase(None, now, mono)
        self._set_state(ServiceState.STOPPED, now, mono, "stopped")

    def _cmd_set_tolerance(self, params, now, mono):
        t3 = params.get("tolerance_3d_mm")
        tr = params.get("tolerance_rotation_deg")
        if t3 is None and tr is None:
            raise CommandRefused("set_tolerance needs tolerance_3d_mm and/or tolerance_rotation_deg")
        for key, value, hi in (("tolerance_3d_mm", t3, MAX_SETTABLE_TOLERANCE_MM),
                               ("tolerance_rotation_deg", tr, MAX_SETTABLE_TOLERANCE_DEG)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= hi:
                raise CommandRefused(f"set_tolerance: {key} must be a number in (0, {hi}], got {value!r}")
        try:
            new = with_tolerance(self.gating_config, t3, tr)
        except TrackingError as err:
            raise CommandRefused(f"set_tolerance: {err}") from err
        if new.rearm_margin_mm >= new.tolerance_3d_mm:
            raise CommandRefused(f"set_tolerance: tolerance_3d_mm {t3} must exceed the rearm margin "
                                 f"{new.rearm_margin_mm} mm")
        self.gating_config = new
        log.warning("tolerances set to %.3f mm, %.3f deg", new.tolerance_3d_mm, new.tolerance_rotation_deg)
        if self.state is ServiceState.MONITORING:
            # The next ENABLE must rest on a pair judged with the new tolerances.
            self._fault(HoldReason.SETTLING, now, None)

    # ------------------------------------------------------------------ frames
    def frame_arrived(self, imager: str, pair_id: int, seq: int, acquired_unix_s: float, now_unix_s: float,
                      now_mono_s: float, raw_file: str | None = None, i0: float | None = None,
                      sender_session: str | None = None) -> None:
        """A valid ``kvframe`` arrived: the frame source is alive (``i0`` recorded for replay, and the
        sender's ``session`` of a ``kvframe/1.1``)."""
        with self._lock:
            self.last_frame_unix_s = now_unix_s
            self.record.write("frame", t_unix_s=now_unix_s, t_mono_s=now_mono_s, imager=imager, pair_id=pair_id,
                              seq=seq, acquired_unix_s=acquired_unix_s, raw_file=raw_file, i0=i0,
                              session=sender_session)

    def frame_fault(self, reason: HoldReason, detail: str, now_unix_s: float, now_mono_s: float,
                    pair_id: int | None = None, alive: bool = True) -> list[dict]:
        """A frame-level fault (corrupt, NaN, unpaired, unknown imager...): HOLD at once.

        ``alive``: the message came from the frame source (it counts as a sign of life).
        """
        with self._lock:
            self._outputs = []
            if alive:
                self.last_frame_unix_s = now_unix_s
            self._count(f"fault:{reason.value}")
            log.warning("pair %s: HOLD %s: %s", pair_id, reason.value, detail)
            self._fault(reason, now_unix_s, pair_id)
            outputs, self._outputs = self._outputs, None
            self.record.write("frame_fault", t_unix_s=now_unix_s, t_mono_s=now_mono_s, reason=reason.value,
                              detail=detail, pair_id=pair_id, alive=alive, outputs=outputs)
            return outputs

    def new_epoch(self, reason: HoldReason, detail: str, now_unix_s: float, now_mono_s: float,
                  pair_id: int | None = None) -> int:
        """The frame source's pair numbering starts afresh (imager restart, ``pair_id`` jump).

        HOLD ``reason`` at once and restart the gate: the good-pair count, the
        pair-order mark and the velocity history are forgotten, so the next
        good pairs are judged normally whatever their ``pair_id``. Pairs of
        earlier epochs still in flight are refused (``stale_frame``).
        Returns the new epoch number.
        """
        if reason not in (HoldReason.IMAGER_RESTARTED, HoldReason.PAIR_ID_JUMP):
            raise TrackingError(f"a new epoch needs reason imager_restarted or pair_id_jump, got {reason!r}")
        with self._lock:
            self._outputs = []
            self.epoch += 1
            self.last_frame_unix_s = now_unix_s
            # The hysteresis after a tolerance HOLD survives: only the numbering restarts.
            self.gating_state = GatingState(rearm_needed=self.gating_state.rearm_needed)
            self._last_measured = None
            self._count(f"epoch:{reason.value}")
            log.warning("pair %s: new epoch %d, HOLD %s: %s", pair_id, self.epoch, reason.value, detail)
            self._fault(reason, now_unix_s, pair_id)
            outputs, self._outputs = self._outputs, None
            self.record.write("epoch", t_unix_s=now_unix_s, t_mono_s=now_mono_s, epoch=self.epoch,
                              reason=reason.value, detail=detail, pair_id=pair_id, outputs=outputs)
            return self.epoch

    def tick(self, now_unix_s: float, now_mono_s: float) -> list[dict]:
        """Timer: silence and ENABLE-expiry checks (recorded only when it sent something)."""
        with self._lock:
            self._outputs = []
            if self.state is ServiceState.MONITORING:
                decision, new_state = judge_silence(self.gating_state, now_unix_s, self.last_frame_unix_s,
                                                    self.gating_config)
                if decision is not None:
                    self.gating_state = new_state
                    last = self._last_gating
                    if last is None or (last[0], last[1]) != (decision.beam, decision.reason) or \
                            now_unix_s - last[2] >= HOLD_REPEAT_S:
                        self._send_gating(decision, now_unix_s)
            elif self.phase is SetupPhase.AWAITING_COUCH and self.pending is not None and \
                    now_unix_s - self.pending.get("first_sent_unix_s", now_unix_s) >= self.config.safety.couch_timeout_s:
                # No couch_moved: never wait for ever. Measure again wherever the couch is now.
                log.warning("pair %s: no couch_moved within %.0f s of the correction: HOLD couch_timeout",
                            self.pending["pair_id"], self.config.safety.couch_timeout_s)
                self.pending = None
                self._set_phase(SetupPhase.MEASURING, now_unix_s, now_mono_s)
                self._fault(HoldReason.COUCH_TIMEOUT, now_unix_s, None)
            elif self.phase is SetupPhase.AWAITING_COUCH and self.pending is not None and \
                    now_unix_s - self.pending.get("sent_unix_s", 0.0) >= HOLD_REPEAT_S:
                # PUB may lose the one message that moves the couch: repeat it until couch_moved
                # (receivers apply a correction once per (session, pair_id)).
                self._send_setup_correction(now_unix_s, repeat=True)
            elif self._last_gating is not None and now_unix_s - self._last_gating[2] >= HOLD_REPEAT_S:
                # Outside MONITORING: repeat the HOLD now and then (PUB may lose messages).
                self._fault(self._last_gating[1] if self._last_gating[0] is Beam.HOLD else HoldReason.NOT_MONITORING,
                            now_unix_s, None)
            outputs, self._outputs = self._outputs, None
            if outputs:
                self.record.write("tick", t_unix_s=now_unix_s, t_mono_s=now_mono_s, outputs=outputs)
            return outputs

    def next_deadline_unix_s(self) -> float | None:
        """When the timer must next run for a prompt HOLD: expiry of the ENABLE or the silence limit."""
        with self._lock:
            if self.state is not ServiceState.MONITORING:
                return None
            times = []
            if self.gating_state.enabled_until_unix_s:
                times.append(self.gating_state.enabled_until_unix_s)
            if self.last_frame_unix_s is not None:
                times.append(self.last_frame_unix_s + self.gating_config.max_frame_age_s + 1e-4)
            return min(times) if times else None

    # ------------------------------------------------------------------- pairs
    def begin_pair(self, pair_id: int, acquired_unix_s: float, complete_mono_s: float,
                   now_unix_s: float, epoch: int | None = None) -> tuple[PairJob, PairProcessor | None]:
        """Snapshot what a pair is processed with (the worker then calls :func:`run_processor`).

        ``epoch``: the pair-numbering epoch the I/O thread completed the pair in
        (None: the current one). A pair from an earlier epoch is not registered
        (``stale_frame``): its ``pair_id`` belongs to a numbering that ended.
        """
        with self._lock:
            skip = None
            epoch = self.epoch if epoch is None else epoch
            age_s = now_unix_s - acquired_unix_s
            if age_s > self.gating_config.max_frame_age_s or epoch != self.epoch:
                skip = HoldReason.STALE_FRAME
            elif self.state in (ServiceState.IDLE, ServiceState.STOPPED) or self.processor is None:
                skip = HoldReason.NOT_MONITORING
            ref_pose = ref_t = None
            history: tuple = ()
            ov = self.config.one_view
            reference = self.stereo_reference
            if (self.state is ServiceState.MONITORING and ov.enabled and reference is not None
                    and acquired_unix_s - reference[0] <= ov.max_reference_age_s):
                ref_t, ref_pose = reference
                history = tuple(six for _, _, six in self.stereo_history)
            per_level = (self.state is ServiceState.SETUP and getattr(self.processor, "has_levels", False)
                         and self.phase in (SetupPhase.MEASURING, SetupPhase.VERIFYING))
            job = PairJob(pair_id, acquired_unix_s, complete_mono_s, now_unix_s, self.last_pose, skip, epoch,
                          ref_pose, ref_t, history, per_level, self.driving_level)
            return job, self.processor

    def finish_pair(self, job: PairJob, result: PairResult, now_unix_s: float, now_mono_s: float,
                    raw_files: dict[str, str] | None = None) -> list[dict]:
        """Judge a processed pair: corrections, setup progress, gating. Returns the outputs."""
        with self._lock:
            self._outputs = []
            try:
                if job.epoch != self.epoch:
                    # A new epoch began while it was processed: its pair_id means nothing now.
                    self._count("pairs_of_an_earlier_epoch")
                    self._fault(HoldReason.STALE_FRAME, now_unix_s, job.pair_id)
                else:
                    self._judge_pair(job, result, now_unix_s, now_mono_s)
            except Exception as err:  # noqa: BLE001 - never stop the service: HOLD and log
                log.error("pair %d: judging raised %s: %s\n%s", job.pair_id, type(err).__name__, err,
                          traceback.format_exc())
                self._fault(HoldReason.INTERNAL_ERROR, now_unix_s, job.pair_id, judged=True)
            outputs, self._outputs = self._outputs, None
            self.record.write(
                "pair", t_unix_s=now_unix_s, t_mono_s=now_mono_s, pair_id=job.pair_id,
                acquired_unix_s=job.acquired_unix_s, complete_mono_s=job.complete_mono_s,
                begin_unix_s=job.begin_unix_s, prior=None if job.prior is None else job.prior.to_json(),
                skip=None if job.skip is None else job.skip.value, state=self.state.value, epoch=job.epoch,
                reference=None if job.reference is None else {"pose": job.reference.to_json(),
                                                              "acquired_unix_s": job.reference_acquired_unix_s,
                                                              "history_poses": len(job.reference_history)},
                result=result.to_json(), raw_files=raw_files, outputs=outputs,
            )
            return outputs

    def _judge_pair(self, job: PairJob, result: PairResult, now: float, mono: float) -> None:
        self._count("pairs")
        blocked = result.quality.get("blocked") if isinstance(result.quality, dict) else None
        self.view_state = {"mode": "stereo" if result.one_view is None else "one_view", "imager": result.one_view,
                           "blocked": dict(blocked) if isinstance(blocked, dict) else {}, "pair_id": job.pair_id}
        if result.one_view is not None:
            self._count("one_view_pairs")
        if result.ok:
            self.last_pose = result.pose
            if result.one_view is None and self.state in (ServiceState.MONITORING, ServiceState.SETUP):
                window = self.config.one_view.history_s
                self.stereo_history = [h for h in self.stereo_history if job.acquired_unix_s - h[0] <= window]
                self.stereo_history.append((job.acquired_unix_s, result.pose,
                                            tuple(float(v) for v in pose_six(result.pose))))
            self._last_failure = None
        else:
            # The first pair of a run of one reason at WARNING, the repeats at DEBUG (an idle room sends
            # not_monitoring ten times a second); every pair is in the record either way.
            failure = (result.reason.value, result.detail)
            level = logging.DEBUG if failure == self._last_failure else logging.WARNING
            self._last_failure = failure
            log.log(level, "pair %d: %s (%s)", job.pair_id, result.reason.value, result.detail)
        state = self.state
        if state is ServiceState.MONITORING:
            self._monitor(job, result, now)
        elif state is ServiceState.SETUP:
            self._setup(job, result, now, mono)
        else:
            reason = HoldReason.PAUSED if state is ServiceState.PAUSED else HoldReason.NOT_MONITORING
            self._fault(reason, now, job.pair_id, judged=True, one_view=result.one_view)

    def _couch_correction(self, pose: Pose) -> tuple[Correction, dict[str, Any]]:
        """The correction to send for ``pose`` (reduced to a 4-DoF couch if so configured) and its quality extras."""
        full = pose.to_correction()
        if self.config.couch.dof == 6:
            return full, {}
        reduced = reduce_to_couch(full, {RotationAxis.YAW}, self.target_room_mm)
        return reduced.correction, {"residual_rotation_deg": [float(x) for x in reduced.residual_rotation_deg],
                                    "couch_dof": 4}

    def _within_limits(self, corr: Correction) -> tuple[bool, str]:
        s = self.config.safety
        t_mm = float(np.linalg.norm(corr.translation_mm))
        r_deg = float(np.max(np.abs(corr.rotation_deg)))
        if t_mm > s.correction_limit_mm or r_deg > s.correction_limit_deg:
            return False, (f"correction {t_mm:.2f} mm / {r_deg:.2f} deg exceeds the limit "
                           f"{s.correction_limit_mm} mm / {s.correction_limit_deg} deg")
        return True, ""

    def _correction_message(self, job_pair_id: int, now: float, result: PairResult, corr: Correction,
                            extra_quality: dict, apply: bool, purpose: str) -> dict:
        quality = {**result.quality, **extra_quality}
        quality["ok"] = bool(result.ok)
        return correction_body(job_pair_id, now, corr, result.method, quality, session=self.session, apply=apply,
                               purpose=purpose)

    def _measurement(self, job: PairJob, pose: Pose, result: PairResult | None = None) -> Measurement:
        dev = pose.target_deviation_mm(self.target_room_mm)
        # Target velocity from the previous trusted pair of this monitoring run, if it is recent
        # (no older than the staleness limit): the gate then also judges where the target will be
        # when the ENABLE expires.
        # The baseline is at least half a frame period, so that pairs arriving much faster than
        # nominal do not turn measurement noise into a large velocity.
        velocity = None
        g = self.gating_config
        history = [h for h in (self._last_measured or []) if job.acquired_unix_s - h[0] <= g.max_frame_age_s]
        usable = [h for h in history if job.acquired_unix_s - h[0] >= 0.5 * g.frame_period_s]
        if usable:
            t_prev, dev_prev = usable[-1]
            velocity = (dev - dev_prev) / (job.acquired_unix_s - t_prev)
        self._last_measured = history + [(job.acquired_unix_s, dev)]
        if result is not None and result.one_view is not None:
            # One view: the gate bounds the deviation by its covariance (docs/ONE_VIEW.md).
            dev_cov = target_covariance_mm2(pose, result.pose_cov, self.target_room_mm)
            rot_cov = np.array(result.pose_cov)[3:, 3:]
            return Measurement(job.pair_id, job.acquired_unix_s, HoldReason.OK, dev, pose.rotation_deg, velocity,
                               result.one_view, dev_cov, rot_cov)
        return Measurement(job.pair_id, job.acquired_unix_s, HoldReason.OK, dev, pose.rotation_deg, velocity)

    def _monitor(self, job: PairJob, result: PairResult, now: float) -> None:
        if not result.ok:
            m = Measurement(job.pair_id, job.acquired_unix_s, result.reason, one_view=result.one_view)
            decision, self.gating_state = judge_measurement(self.gating_state, m, now, self.gating_config)
            self._send_gating(decision, now)
            return
        corr, extra = self._couch_correction(result.pose)
        ok, why = self._within_limits(corr)
        if not ok:
            log.warning("pair %d: HOLD correction_limit: %s", job.pair_id, why)
            m = Measurement(job.pair_id, job.acquired_unix_s, HoldReason.CORRECTION_LIMIT, one_view=result.one_view)
            decision, self.gating_state = judge_measurement(self.gating_state, m, now, self.gating_config)
            self._send_gating(decision, now)
            return
        self._emit(self._correction_message(job.pair_id, now, result, corr, extra, False, "monitoring"))
        decision, self.gating_state = judge_measurement(self.gating_state,
                                                        self._measurement(job, result.pose, result),
                                                        now, self.gating_config)
        self._send_gating(decision, now)

    def _setup(self, job: PairJob, result: PairResult, now: float, mono: float) -> None:
        phase = self.phase
        if not result.ok:
            self._fault(result.reason, now, job.pair_id, judged=True, one_view=result.one_view)
            return
        if phase is SetupPhase.VERIFYING and self.couch_moved_unix_s is not None and \
                job.acquired_unix_s < self.couch_moved_unix_s:
            # Taken before the couch stopped: says nothing about the new position.
            self._fault(HoldReason.NOT_MONITORING, now, job.pair_id, judged=True)
            return
        if phase is SetupPhase.AWAITING_APPROVAL and self.pending is not None and \
                mono - self.pending["proposed_mono_s"] > self.config.safety.approval_max_age_s:
            self._drop_expired_proposal(now, mono)  # too old to approve: this pair proposes afresh
            phase = self.phase
        if phase in (SetupPhase.AWAITING_APPROVAL, SetupPhase.AWAITING_COUCH):
            self._fault(HoldReason.NOT_MONITORING, now, job.pair_id, judged=True)
            return
        corr, extra = self._couch_correction(result.pose)
        within = self._setup_within_tolerance(result.pose)
        if within:
            self._emit(self._correction_message(job.pair_id, now, result, corr, extra, False, "verified"))
            self._set_phase(SetupPhase.VERIFIED, now, mono)
            self._fault(HoldReason.NOT_MONITORING, now, job.pair_id, judged=True)
            return
        ok, why = self._within_limits(corr)
        if not ok:
            log.warning("pair %d: setup correction not sent: %s", job.pair_id, why)
            self._set_phase(SetupPhase.MEASURING, now, mono)
            self._fault(HoldReason.CORRECTION_LIMIT, now, job.pair_id, judged=True)
            return
        self.pending = {"pair_id": job.pair_id, "translation_mm": [float(x) for x in corr.translation_mm],
                        "rotation_deg": [float(x) for x in corr.rotation_deg],
                        "proposed_unix_s": float(now), "proposed_mono_s": float(mono),
                        "message": self._correction_message(job.pair_id, now, result, corr, extra, True, "setup"),
                        "pose": result.pose}
        table = result.quality.get("levels") if isinstance(result.quality, dict) else None
        if isinstance(table, dict):
            # Per-level registration: every level's pose, so the approval can choose which drives.
            self.pending.update({"levels": table, "level_poses": _level_poses(table), "result": result,
                                 "level": result.quality.get("driving_level")})
        if self.config.setup.approval == "automatic":
            self._send_setup_correction(now)
            self._set_phase(SetupPhase.AWAITING_COUCH, now, mono)
        else:
            self._emit(self._correction_message(job.pair_id, now, result, corr, extra, False, "proposal"))
            self._set_phase(SetupPhase.AWAITING_APPROVAL, now, mono)
        self._fault(HoldReason.NOT_MONITORING, now, job.pair_id, judged=True)

    def _send_setup_correction(self, now: float, operator: str = "", repeat: bool = False) -> None:
        msg = dict(self.pending["message"])
        msg["t_unix_s"] = float(now)
        self.pending["sent_unix_s"] = float(now)
        self.pending.setdefault("first_sent_unix_s", float(now))
        self._emit(msg)
        if self._on_setup_applied is not None and not repeat:
            self._on_setup_applied(self.pending["pair_id"], self.pending["pose"], float(now), operator)

    def _setup_within_tolerance(self, pose: Pose) -> bool:
        """Setup verification: target within the gating tolerances; rotations the couch can correct within tolerance."""
        g = self.gating_config
        dev = pose.target_deviation_mm(self.target_room_mm)
        if np.linalg.norm(dev) > g.tolerance_3d_mm or np.any(np.abs(dev) > np.asarray(g.tolerance_axis_mm)):
            return False
        rot = np.abs(pose.rotation_deg)
        if self.config.couch.dof == 4:
            rot = rot[2:]  # pitch and roll cannot be corrected: reported as residual, not iterated on
        return bool(np.all(rot <= g.tolerance_rotation_deg))

    # --------------------------------------------------------------- internal
    def internal_error(self, detail: str, now_unix_s: float, now_mono_s: float,
                       lock_timeout_s: float | None = None) -> bool:
        """Any thread's unexpected failure: HOLD ``internal_error`` and record it.

        ``lock_timeout_s``: give up after this long if the engine lock is held
        (a thread stuck inside the engine); returns False then, True when done.
        """
        if not self._lock.acquire(timeout=-1 if lock_timeout_s is None else lock_timeout_s):
            return False
        try:
            self._outputs = []
            log.error("internal error: %s", detail)
            self._fault(HoldReason.INTERNAL_ERROR, now_unix_s, None)
            outputs, self._outputs = self._outputs, None
            self.record.write("error", t_unix_s=now_unix_s, t_mono_s=now_mono_s, detail=detail, outputs=outputs)
            return True
        finally:
            self._lock.release()

    def start_session(self, now_unix_s: float, now_mono_s: float) -> None:
        """First words of a session: HOLD ``not_monitoring`` (no permission exists yet)."""
        with self._lock:
            self._outputs = []
            self._fault(HoldReason.NOT_MONITORING, now_unix_s, None)
            outputs, self._outputs = self._outputs, None
            self.record.write("start", t_unix_s=now_unix_s, t_mono_s=now_mono_s, session=self.session,
                              outputs=outputs)
