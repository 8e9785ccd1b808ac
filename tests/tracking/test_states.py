"""State machine and command handling of the engine (no sockets): every command in every state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from spineguide.registration.pose import Pose
from spineguide.tracking.service.config import CouchConfig, SafetyConfig, ServiceConfig, SetupConfig
from spineguide.tracking.frames import KvFrame
from spineguide.tracking.service.gating import HoldReason
from spineguide.tracking.service.processing import PairResult, PatternProcessor, stamp_pose_pattern
from spineguide.tracking.service.record import SessionRecord
from spineguide.tracking.sim.simulators import pattern_frame
from spineguide.tracking.service.states import (
    ALLOWED_STATES,
    Command,
    Engine,
    ServiceState,
    SetupPhase,
    run_processor,
)

T0 = 1_764_070_000.0
POSE_TOL_MM = 0.5e-3  # the pattern stamps whole micrometres: half a micrometre of rounding, nothing more


class Harness:
    """An engine with a noise-free pattern processor; pairs are fed with explicit clock values."""

    def __init__(self, approval="automatic", dof=6, noise_mm=0.0):
        self.config = ServiceConfig(safety=SafetyConfig(), setup=SetupConfig(approval), couch=CouchConfig(dof))
        self.sent: list[dict] = []
        self.record = SessionRecord(None)
        self.engine = Engine(self.config, lambda plan: PatternProcessor(plan.imagers, noise_mm), self.record,
                             self.sent.append)
        self.now = T0
        self.pair_id = 0
        self.base = pattern_frame(Pose.identity(), 32, 32)

    def cmd(self, name, **params):
        self.now += 0.01
        reply, _ = self.engine.handle_command(name, params, self.now, self.now - T0)
        return reply

    def pair(self, pose: Pose, age_s=0.02, pixels=None):
        self.now += 0.1
        pid = self.pair_id
        self.pair_id += 1
        frames = {n: KvFrame(n, stamp_pose_pattern(self.base, pose) if pixels is None else pixels,
                             acquired_unix_s=self.now - age_s, pair_id=pid) for n in ("A", "B")}
        job, proc = self.engine.begin_pair(pid, self.now - age_s, self.now - T0, self.now)
        result = run_processor(proc, frames, job, self.config)
        return self.engine.finish_pair(job, result, self.now + 0.001, self.now - T0)

    def to_state(self, state: ServiceState):
        """Drive the engine into ``state`` through legal commands."""
        if state is ServiceState.IDLE:
            return
        assert self.cmd("load_plan")["ok"]
        if state is ServiceState.PLAN_LOADED:
            return
        assert self.cmd("start_setup")["ok"]
        if state is ServiceState.SETUP:
            return
        self.pair(Pose.identity())
        assert self.cmd("start_monitoring")["ok"]
        if state is ServiceState.MONITORING:
            return
        if state is ServiceState.PAUSED:
            assert self.cmd("pause")["ok"]
            return
        assert self.cmd("stop")["ok"]


def gating(outputs):
    return [o for o in outputs if o["schema"].startswith("gating/")]


def corrections(outputs):
    return [o for o in outputs if o["schema"].startswith("correction/")]


@pytest.mark.parametrize("state", list(ServiceState))
@pytest.mark.parametrize("command", list(Command))
def test_every_command_in_every_state_is_accepted_or_refused_with_reason(state, command):
    h = Harness()
    h.to_state(state)
    params = {"tolerance_3d_mm": 0.8} if command is Command.SET_TOLERANCE else {}
    reply = h.cmd(command.value, **params)
    allowed = state in ALLOWED_STATES[command]
    if not allowed:
        assert reply["ok"] is False
        assert f"not valid in state {state.value}" in reply["reason"]
        assert reply["state"] == state.value  # a refused command changes nothing
        return
    # Allowed by state; a few also need the setup phase to be right.
    phase_bound = {Command.APPROVE_CORRECTION: "no correction awaits approval",
                   Command.COUCH_MOVED: "no correction was sent"}
    if command in phase_bound:
        assert reply["ok"] is False and phase_bound[command] in reply["reason"]
    elif command is Command.START_MONITORING:
        # SETUP in the harness has not measured yet: not verified.
        assert reply["ok"] is False and "setup is not verified" in reply["reason"]
    else:
        assert reply["ok"] is True, reply["reason"]
        expected = {
            Command.STATUS: state, Command.LIST_PLANS: state, Command.SET_TOLERANCE: state, Command.LOAD_PLAN: ServiceState.PLAN_LOADED,
            Command.START_SETUP: ServiceState.SETUP, Command.PAUSE: ServiceState.PAUSED,
            Command.RESUME: ServiceState.MONITORING, Command.STOP: ServiceState.STOPPED,
        }[command]
        assert reply["state"] == expected.value


def test_unknown_command_is_refused_with_the_known_list():
    h = Harness()
    reply = h.cmd("fire_beam")
    assert reply["ok"] is False and "unknown command 'fire_beam'" in reply["reason"]


@pytest.mark.parametrize("params, message", [
    ({}, "needs tolerance_3d_mm"),
    ({"tolerance_3d_mm": -1.0}, "must be a number in"),
    ({"tolerance_3d_mm": 50.0}, "must be a number in"),
    ({"tolerance_rotation_deg": "wide"}, "must be a number in"),
])
def test_set_tolerance_refuses_bad_values(params, message):
    h = Harness()
    reply = h.cmd("set_tolerance", **params)
    assert reply["ok"] is False and message in reply["reason"]
    assert reply["tolerance_3d_mm"] == 1.0


def test_setup_sends_the_inverse_pose_then_verifies_after_couch_moved():
    h = Harness(approval="automatic")
    h.to_state(ServiceState.SETUP)
    pose = Pose.from_six([-1.0, 2.0, 0.5], [0.0, 0.0, 1.5])
    out = h.pair(pose)
    corr = corrections(out)[0]
    assert corr["apply"] is True and corr["purpose"] == "setup"
    expected = pose.to_correction()
    assert_allclose(corr["translation_mm"], expected.translation_mm, rtol=0, atol=POSE_TOL_MM)
    assert_allclose(corr["rotation_deg"], expected.rotation_deg, rtol=0, atol=POSE_TOL_MM)
    assert all(g["beam"] == "HOLD" for g in gating(out))
    assert h.engine.phase is SetupPhase.AWAITING_COUCH
    assert h.cmd("start_monitoring")["ok"] is False
    assert h.cmd("couch_moved")["ok"]
    h.pair(Pose.identity())
    assert h.engine.phase is SetupPhase.VERIFIED
    assert h.cmd("start_monitoring")["state"] == "MONITORING"


def test_pair_acquired_before_couch_moved_does_not_verify():
    h = Harness()
    h.to_state(ServiceState.SETUP)
    h.pair(Pose.from_six([3.0, 0, 0], [0, 0, 0]))
    h.cmd("couch_moved")
    h.pair(Pose.identity(), age_s=0.15)  # acquired before the couch_moved command
    assert h.engine.phase is SetupPhase.VERIFYING


def test_manual_approval_proposes_then_sends_only_after_approve():
    h = Harness(approval="manual")
    h.to_state(ServiceState.SETUP)
    out = h.pair(Pose.from_six([2.0, 0, 0], [0, 0, 0]))
    assert [c["apply"] for c in corrections(out)] == [False]
    assert h.engine.phase is SetupPhase.AWAITING_APPROVAL
    assert h.cmd("couch_moved")["ok"] is False
    assert "proposal is from pair 0" in h.cmd("approve_correction", pair_id=7)["reason"]
    h.sent.clear()
    assert h.cmd("approve_correction", pair_id=0)["ok"]
    assert [c["apply"] for c in corrections(h.sent)] == [True]


def test_setup_correction_beyond_limit_is_not_sent():
    h = Harness()
    h.to_state(ServiceState.SETUP)
    out = h.pair(Pose.from_six([30.0, 0, 0], [0, 0, 0]))  # beyond the 25 mm default
    assert corrections(out) == []
    assert gating(out)[-1]["reason"] == HoldReason.CORRECTION_LIMIT.value
    out = h.pair(Pose.from_six([0.0, 0, 0], [0, 6.0, 0]))  # beyond 5 degrees
    assert corrections(out) == [] and gating(out)[-1]["reason"] == "correction_limit"


def test_monitoring_enables_within_tolerance_and_holds_outside():
    h = Harness()
    h.to_state(ServiceState.MONITORING)
    assert gating(h.pair(Pose.from_six([0.5, 0, 0], [0, 0, 0])))[-1]["beam"] == "ENABLE"
    g = gating(h.pair(Pose.from_six([0, 0, 1.2], [0, 0, 0])))[-1]
    assert g["beam"] == "HOLD" and g["reason"] == "out_of_tolerance"
    assert_allclose(g["deviation_mm"], 1.2, rtol=0, atol=POSE_TOL_MM)


def test_monitoring_correction_beyond_limit_holds_correction_limit():
    h = Harness()
    h.to_state(ServiceState.MONITORING)
    out = h.pair(Pose.from_six([0, 26.0, 0], [0, 0, 0]))
    assert corrections(out) == [] and gating(out)[-1]["reason"] == "correction_limit"


def test_four_dof_couch_sends_no_pitch_roll_and_reports_residual():
    h = Harness(dof=4)
    h.to_state(ServiceState.SETUP)
    pose = Pose.from_six([1.0, 0, 0], [2.0, 0, 3.0])
    corr = corrections(h.pair(pose))[0]
    assert_allclose(corr["rotation_deg"][:2], [0.0, 0.0], rtol=0, atol=1e-9)
    assert_allclose(corr["rotation_deg"][2], pose.to_correction().rotation_deg[2], rtol=0, atol=POSE_TOL_MM)
    assert corr["quality"]["couch_dof"] == 4
    assert_allclose(np.abs(corr["quality"]["residual_rotation_deg"][0]), 2.0, rtol=0, atol=0.1)


def test_pause_and_stop_hold_at_once():
    h = Harness()
    h.to_state(ServiceState.MONITORING)
    h.sent.clear()
    h.cmd("pause")
    assert gating(h.sent)[-1] == {**gating(h.sent)[-1], "beam": "HOLD", "reason": "paused"}
    assert gating(h.pair(Pose.identity()))[-1]["reason"] == "paused"
    h.cmd("stop")
    assert gating(h.pair(Pose.identity()))[-1]["reason"] == "not_monitoring"


def test_processor_exception_becomes_internal_error_hold_and_engine_keeps_going():
    h = Harness()
    h.to_state(ServiceState.MONITORING)

    class Broken:
        method = "fiducial"

        def process(self, frames, prior):
            raise RuntimeError("kaboom")

    good = h.engine.processor
    h.engine.processor = Broken()
    out = h.pair(Pose.identity())
    assert gating(out)[-1]["reason"] == "internal_error"
    h.engine.processor = good
    assert gating(h.pair(Pose.identity()))[-1]["beam"] == "ENABLE"


def test_pair_result_refuses_ok_without_pose():
    from spineguide.tracking.errors import TrackingError

    with pytest.raises(TrackingError, match="must carry a pose"):
        PairResult(HoldReason.OK)
    with pytest.raises(TrackingError, match="must be a HoldReason"):
        PairResult("ok")
    with pytest.raises(TrackingError, match="method must be"):
        PairResult(HoldReason.NAN_FRAME, method="magic")


def test_silence_in_monitoring_holds_and_repeats_slowly():
    h = Harness()
    h.to_state(ServiceState.MONITORING)
    h.engine.frame_arrived("A", 99, 0, h.now, h.now, 0.0)
    assert h.engine.tick(h.now + 0.1, 0.0) == []
    out = h.engine.tick(h.now + 0.25, 0.0)
    assert out[-1]["reason"] == "frame_source_silent"
    assert h.engine.tick(h.now + 0.30, 0.0) == []  # not repeated at every tick
    assert h.engine.tick(h.now + 1.30, 0.0)[-1]["reason"] == "frame_source_silent"


def test_a_plan_that_cannot_load_is_refused_with_the_reason_and_nothing_changes():
    h = Harness()

    def broken(plan):
        raise OSError("plan/ct.mha: no such file")

    h.engine._factory = broken
    reply = h.cmd("load_plan")
    assert reply["ok"] is False and "plan cannot be loaded" in reply["reason"] and "ct.mha" in reply["reason"]
    assert reply["state"] == "IDLE" and h.engine.processor is None


def test_monitoring_holds_a_target_moving_out_before_the_enable_would_expire():
    h = Harness()
    h.to_state(ServiceState.MONITORING)
    beams = []
    for k in range(1, 5):  # 0.3 mm per 0.1 s along X: 3 mm/s
        out = h.pair(Pose.from_six([0.3 * k, 0.0, 0.0], [0, 0, 0]))
        beams.extend((g["beam"], g["reason"]) for g in gating(out))
    # 0.3 mm: no velocity yet (first pair of the run) -> ENABLE; 0.6 mm at 3 mm/s would reach
    # 0.6 + 3 x 0.18 = 1.14 mm before the ENABLE expires -> HOLD, though still inside 1 mm now.
    assert beams[0] == ("ENABLE", "ok")
    assert beams[1] == ("HOLD", "moving_out_of_tolerance")


def test_a_still_target_near_the_boundary_keeps_the_beam():
    h = Harness()
    h.to_state(ServiceState.MONITORING)
    out = [g for _ in range(4) for g in gating(h.pair(Pose.from_six([0.9, 0.0, 0.0], [0, 0, 0])))]
    assert all(g["beam"] == "ENABLE" for g in out)


# ------------------------------------------------------------------ approvals name the pair and expire
#: The configured life of a setup proposal (SafetyConfig default), s.
APPROVAL_MAX_AGE_S = SafetyConfig().approval_max_age_s


def _proposed(h: Harness, offset_mm=2.0):
    """Drive a manual-approval engine to a proposal; returns the proposal's pair id."""
    h.to_state(ServiceState.SETUP)
    out = h.pair(Pose.from_six([offset_mm, 0, 0], [0, 0, 0]))
    (proposal,) = corrections(out)
    assert proposal["purpose"] == "proposal" and proposal["apply"] is False
    assert h.engine.phase is SetupPhase.AWAITING_APPROVAL
    h.sent.clear()
    return proposal["pair_id"]


def _applied(outputs):
    return [c for c in corrections(outputs) if c["apply"]]


def test_an_approval_without_pair_id_is_refused_and_the_proposal_stays():
    h = Harness(approval="manual")
    pid = _proposed(h)
    reply = h.cmd("approve_correction")
    assert reply["ok"] is False and f"must name the proposal it approves (pair_id); pair {pid}" in reply["reason"]
    assert h.engine.phase is SetupPhase.AWAITING_APPROVAL and h.engine.pending["pair_id"] == pid
    assert _applied(h.sent) == []


@pytest.mark.parametrize("wrong", [7, -1, True, "0", 0.0])
def test_an_approval_naming_another_pair_is_refused(wrong):
    h = Harness(approval="manual")
    pid = _proposed(h)
    assert pid == 0
    reply = h.cmd("approve_correction", pair_id=wrong)
    assert reply["ok"] is False and f"names pair {wrong!r} but the proposal is from pair 0" in reply["reason"]
    assert _applied(h.sent) == [] and h.engine.phase is SetupPhase.AWAITING_APPROVAL


def test_an_expired_proposal_is_refused_dropped_and_the_next_pair_proposes_afresh():
    h = Harness(approval="manual")
    pid = _proposed(h)
    h.now += APPROVAL_MAX_AGE_S + 1.0
    reply = h.cmd("approve_correction", pair_id=pid, operator="console")
    assert reply["ok"] is False and f"the proposal from pair {pid} is" in reply["reason"]
    assert "expired and dropped" in reply["reason"]
    assert h.engine.pending is None and h.engine.phase is SetupPhase.MEASURING
    assert _applied(h.sent) == [] and all(g["beam"] == "HOLD" for g in gating(h.sent))
    assert h.engine.counters["proposal_expired"] == 1
    out = h.pair(Pose.from_six([2.0, 0, 0], [0, 0, 0]))  # a new pair: a new proposal
    (fresh,) = corrections(out)
    assert fresh["purpose"] == "proposal" and fresh["pair_id"] == pid + 1
    assert h.cmd("approve_correction", pair_id=pid)["ok"] is False  # the old one is gone for good
    reply = h.cmd("approve_correction", pair_id=pid + 1, operator="console")
    assert reply["ok"] and reply["approved_by"] == "console" and reply["approved_pair_id"] == pid + 1
    assert len(_applied(h.sent)) == 1


def test_a_pair_arriving_after_the_proposal_expired_replaces_it():
    h = Harness(approval="manual")
    pid = _proposed(h)
    h.now += APPROVAL_MAX_AGE_S + 1.0
    out = h.pair(Pose.from_six([1.5, 0, 0], [0, 0, 0]))
    (fresh,) = corrections(out)
    assert fresh["purpose"] == "proposal" and fresh["pair_id"] == pid + 1 and fresh["apply"] is False
    assert h.engine.pending["pair_id"] == pid + 1 and h.engine.phase is SetupPhase.AWAITING_APPROVAL
    assert all(g["beam"] == "HOLD" for g in gating(out))


def test_a_fresh_proposal_waits_for_its_approval_while_new_pairs_arrive():
    h = Harness(approval="manual")
    pid = _proposed(h)
    out = h.pair(Pose.from_six([1.5, 0, 0], [0, 0, 0]))  # 0.1 s later: the proposal stands
    assert corrections(out) == [] and h.engine.pending["pair_id"] == pid


def test_the_approval_is_recorded_with_its_operator():
    h = Harness(approval="manual")
    pid = _proposed(h)
    reply = h.cmd("approve_correction", pair_id=pid, operator="console", role="therapist")
    assert reply["ok"] and reply["approved_by"] == "console"
    (rec,) = [r for r in h.record.records if r["event"] == "command" and r["command"] == "approve_correction"]
    assert rec["params"]["operator"] == "console" and rec["reply"]["approved_by"] == "console"


@given(st.floats(0.0, 3 * APPROVAL_MAX_AGE_S))
def test_an_approval_is_accepted_exactly_while_the_proposal_is_young_enough(wait_s):
    h = Harness(approval="manual")
    pid = _proposed(h)
    age_s = wait_s + 0.01  # Harness.cmd advances the clock by 10 ms
    assume(abs(age_s - APPROVAL_MAX_AGE_S) > 1e-6)  # the harness clock is ~1.8e9 s: ~1e-7 s of rounding
    h.now += wait_s
    reply = h.cmd("approve_correction", pair_id=pid)
    assert reply["ok"] is (age_s <= APPROVAL_MAX_AGE_S)
    assert len(_applied(h.sent)) == (1 if reply["ok"] else 0)


def test_a_run_of_one_failure_reason_logs_one_warning_and_the_repeats_at_debug(caplog):
    # An idle room sends pairs at 10 Hz: each is not_monitoring. The log says so once (then at DEBUG) and
    # again when the reason changes or after a good pair; the record keeps every pair either way.
    import logging

    h = Harness()
    logger = "spineguide.tracking.service.states"
    with caplog.at_level(logging.DEBUG, logger=logger):
        for _ in range(5):
            h.pair(Pose.identity())
    failures = [r for r in caplog.records if r.name == logger and ": not_monitoring (" in r.getMessage()]
    assert len(failures) == 5
    assert [r.levelno for r in failures] == [logging.WARNING] + [logging.DEBUG] * 4
    caplog.clear()
    h.to_state(ServiceState.MONITORING)  # load, setup, one good pair, monitoring
    with caplog.at_level(logging.DEBUG, logger=logger):
        h.pair(Pose.identity(), pixels=np.zeros((32, 32), np.uint16))  # no pattern: fiducial_missing
        h.pair(Pose.identity(), pixels=np.zeros((32, 32), np.uint16))
    failures = [r for r in caplog.records if r.name == logger and "fiducial_missing" in r.getMessage()
                and r.getMessage().startswith("pair ")]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG]
