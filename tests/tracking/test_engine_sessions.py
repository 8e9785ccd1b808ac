"""The engine's sessions and epochs (no sockets): session ids, pair-numbering epochs, the couch timeout."""

from __future__ import annotations

import pytest

from spineguide.registration.pose import Pose
from spineguide.tracking.service.config import SafetyConfig, SecurityConfig, ServiceConfig, SetupConfig
from spineguide.tracking.errors import TrackingError
from spineguide.tracking.service.gating import HoldReason
from spineguide.tracking.service.processing import PairResult, PatternProcessor
from spineguide.tracking.service.record import SessionRecord
from spineguide.tracking.service.states import HOLD_REPEAT_S, Engine, ServiceState, SetupPhase

T0 = 1_764_070_000.0


class Clocked:
    """An engine fed pairs with chosen results and explicit clock values."""

    def __init__(self, session="s-1"):
        self.config = ServiceConfig(safety=SafetyConfig(), setup=SetupConfig("automatic"),
                                    security=SecurityConfig(enabled=False))
        self.sent: list[dict] = []
        self.record = SessionRecord(None)
        self.engine = Engine(self.config, lambda plan: PatternProcessor(plan.imagers, 0.0), self.record,
                             self.sent.append, session=session)
        self.now = T0

    def cmd(self, name, **params):
        self.now += 0.01
        return self.engine.handle_command(name, params, self.now, self.now - T0)[0]

    def pair(self, pid, pose=Pose.identity(), epoch=None):
        self.now += 0.1
        job, _ = self.engine.begin_pair(pid, self.now - 0.01, self.now - T0, self.now, epoch)
        result = PairResult(job.skip, quality={"ok": False}) if job.skip else PairResult(HoldReason.OK, pose)
        return self.engine.finish_pair(job, result, self.now, self.now - T0)

    def monitoring(self):
        assert self.cmd("load_plan")["ok"] and self.cmd("start_setup")["ok"]
        self.pair(0)
        assert self.cmd("start_monitoring")["ok"]


def beams(outputs):
    return [(o["beam"], o["reason"]) for o in outputs if o["schema"].startswith("gating/")]


def test_every_output_and_reply_carries_the_session():
    c = Clocked("service-abc")
    c.monitoring()
    out = c.pair(1)
    assert {o["session"] for o in c.sent} == {"service-abc"} and beams(out) == [("ENABLE", "ok")]
    assert c.cmd("status")["session"] == "service-abc"
    assert all(o["schema"].endswith("/1.2" if o["schema"].startswith("gating") else "/1.1") for o in c.sent)
    assert len(Engine(c.config, None, SessionRecord(None), print).session) == 32  # default: uuid4 hex
    with pytest.raises(TrackingError, match="session id"):
        Engine(c.config, None, SessionRecord(None), print, session="")


def test_a_fault_naming_a_huge_pair_id_never_makes_later_pairs_stale():
    c = Clocked()
    c.monitoring()
    c.engine.frame_fault(HoldReason.CORRUPT_FRAME, "bad header", c.now, 0.0, 10**15)
    assert beams(c.pair(1)) == [("ENABLE", "ok")]


def test_a_new_epoch_holds_and_restarts_the_numbering():
    c = Clocked()
    c.monitoring()
    assert beams(c.pair(500)) == [("ENABLE", "ok")]
    assert beams(c.pair(3)) == [("HOLD", "stale_frame")]  # same epoch: an older pair is stale
    before = len(c.sent)
    assert c.engine.new_epoch(HoldReason.IMAGER_RESTARTED, "restart", c.now, 0.0, 0) == 1
    assert beams(c.sent[before:]) == [("HOLD", "imager_restarted")]
    assert beams(c.pair(0)) == [("ENABLE", "ok")]  # the new numbering is judged normally
    assert c.engine.status()["epoch"] == 1
    assert [r["event"] for r in c.record.records].count("epoch") == 1
    with pytest.raises(TrackingError, match="needs reason"):
        c.engine.new_epoch(HoldReason.CORRUPT_FRAME, "x", c.now, 0.0)


def test_a_pair_of_an_earlier_epoch_is_never_judged_and_never_locks_the_new_one():
    c = Clocked()
    c.monitoring()
    c.now += 0.1
    old_job, _ = c.engine.begin_pair(5000, c.now - 0.01, 0.0, c.now)  # processing when the imager restarts
    c.engine.new_epoch(HoldReason.IMAGER_RESTARTED, "restart", c.now, 0.0, 0)
    out = c.engine.finish_pair(old_job, PairResult(HoldReason.OK, Pose.identity()), c.now + 0.01, 0.0)
    assert beams(out) == [("HOLD", "stale_frame")]
    assert beams(c.pair(0)) == [("ENABLE", "ok")]
    assert beams(c.pair(1, epoch=0)) == [("HOLD", "stale_frame")]  # completed in the old epoch, begun in the new


def test_awaiting_couch_times_out_and_setup_can_be_redone():
    c = Clocked()
    assert c.cmd("load_plan")["ok"] and c.cmd("start_setup")["ok"]
    c.pair(0, Pose.from_six([3.0, 0.0, 0.0], [0, 0, 0]))
    assert c.engine.phase is SetupPhase.AWAITING_COUCH
    sent_at = c.now
    timeout_s = c.engine.config.safety.couch_timeout_s  # [safety] couch_timeout_s, default 30 s
    repeats = c.engine.tick(sent_at + HOLD_REPEAT_S, 0.0)
    assert [o["purpose"] for o in repeats] == ["setup"]  # repeated while waiting
    c.engine.tick(sent_at + timeout_s - 0.01, 0.0)
    assert c.engine.phase is SetupPhase.AWAITING_COUCH  # still waiting just before the timeout
    out = c.engine.tick(sent_at + timeout_s, 0.0)
    assert beams(out) == [("HOLD", "couch_timeout")]
    assert c.engine.phase is SetupPhase.MEASURING and c.engine.state is ServiceState.SETUP
    assert c.cmd("couch_moved")["ok"] is False  # nothing is awaited any more
    c.now = sent_at + timeout_s
    out = c.pair(1, Pose.from_six([3.0, 0.0, 0.0], [0, 0, 0]))  # measured again: a new correction
    assert [o["pair_id"] for o in out if o["schema"].startswith("correction/")] == [1]
    assert c.engine.phase is SetupPhase.AWAITING_COUCH
