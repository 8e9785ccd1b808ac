"""A stateful property test of the engine (sans-I/O): whatever arrives, in whatever order, the safety rules hold.

Hypothesis drives the :class:`~spineguide.tracking.service.states.Engine` with random commands
(known ones and garbage, with hostile parameters), pairs good and bad, fresh
and stale, of this pair-numbering epoch and of an earlier one, with any
``pair_id`` (backwards, repeated, 10^15), frame faults, new epochs, timer
ticks and clock jumps. After every step:

- the engine never raised;
- an ENABLE only ever comes from a judged pair, in MONITORING, of the current
  epoch, whose result was OK and whose target deviation and rotation are within
  the tolerances then in force;
- no ENABLE is valid past ``judged + enable_validity_s`` or past
  ``acquired + max_frame_age_s``;
- an ENABLE for a one-view pair (docs/ONE_VIEW.md) has the whole joint 95 %
  ellipsoid of its deviation and rotation within the tolerances, and names its view;
- never stuck: in MONITORING, good fresh pairs bring the beam back.

Not a parser fuzz test (no ``fuzz`` marker): one example is 30 engine steps,
about 0.1 s, so its budget is fixed here (150 examples, ~15 s) rather than
taken from the ``deep`` profile, where 10^5 examples would take hours.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spineguide.registration.motion_prior import target_covariance_mm2
from spineguide.registration.pose import Pose
from spineguide.tracking.service.config import SafetyConfig, SecurityConfig, ServiceConfig, SetupConfig
from spineguide.tracking.service.gating import CHI2_3DOF_95, HoldReason
from spineguide.tracking.service.processing import PairResult, PatternProcessor
from spineguide.tracking.service.record import SessionRecord
from spineguide.tracking.service.states import Command, Engine, ServiceState

T0 = 1_764_070_000.0
#: Float slack of the expiry bound (sums of clock values), s.
EXPIRY_SLACK_S = 1e-9
#: The tolerance checks are on floats computed the same way by the engine: no slack beyond rounding.
TOLERANCE_SLACK = 1e-9

HOSTILE_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=5)), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
COMMAND_NAMES = st.one_of(st.sampled_from([c.value for c in Command]), st.text(max_size=20))
PARAM_KEYS = st.one_of(st.sampled_from(["pair_id", "operator", "role", "tolerance_3d_mm", "tolerance_rotation_deg",
                                        "translation_mm"]), st.text(max_size=12))
FAILURES = st.sampled_from([r for r in HoldReason if r is not HoldReason.OK])
# Half near the tolerance (1 mm, 1 deg by default), half well beyond it.
SMALL_MM = st.one_of(st.floats(-0.7, 0.7, allow_nan=False), st.floats(-3.0, 3.0, allow_nan=False))
SMALL_DEG = st.one_of(st.floats(-1.2, 1.2, allow_nan=False), st.floats(-2.0, 2.0, allow_nan=False))


class EngineMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.config = ServiceConfig(safety=SafetyConfig(), setup=SetupConfig("automatic"),
                                    security=SecurityConfig(enabled=False))
        self.sent: list[dict] = []
        self.engine = Engine(self.config, lambda plan: PatternProcessor(plan.imagers, 0.0), SessionRecord(None),
                             self.sent.append, session="stateful")
        self.now = T0   # wall clock fed to the engine (may jump back a little: NTP)
        self.mono = 0.0  # monotonic clock (never goes back)
        self.next_pid = 0
        self.max_pid_in_epoch = -1
        self.recoveries = 0
        self.enables = 0
        self.latest_acquired = -math.inf
        self.engine.start_session(self.now, self.mono)

    # ------------------------------------------------------------------ helpers
    def _no_enable(self, outputs, where):
        for o in outputs:
            assert not (o.get("schema", "").startswith("gating/") and o["beam"] == "ENABLE"), \
                f"ENABLE from {where}: {o}"

    def _feed_pair(self, pid, acquired, result_of, processing_s, epoch):
        state_before = self.engine.state
        job, processor = self.engine.begin_pair(pid, acquired, self.mono, self.now, epoch)
        if job.skip is not None:
            result = PairResult(job.skip, quality={"ok": False}, detail="not registered")
        elif processor is None:
            result = PairResult(HoldReason.INTERNAL_ERROR, quality={"ok": False}, detail="no plan loaded")
        else:
            result = result_of
        self.now += processing_s
        self.mono += processing_s
        tolerance = self.engine.gating_config
        epoch_at_finish = self.engine.epoch
        self.latest_acquired = max(self.latest_acquired, acquired)
        outputs = self.engine.finish_pair(job, result, self.now, self.mono)
        if job.epoch == self.engine.epoch:
            self.max_pid_in_epoch = max(self.max_pid_in_epoch, pid)
        for o in outputs:
            if not (o["schema"].startswith("gating/") and o["beam"] == "ENABLE"):
                continue
            self.enables += 1
            assert state_before is ServiceState.MONITORING and self.engine.state is ServiceState.MONITORING
            assert job.epoch == epoch_at_finish and job.skip is None and result.ok and o["pair_id"] == pid
            dev = result.pose.target_deviation_mm(self.engine.target_room_mm)
            assert np.linalg.norm(dev) <= tolerance.tolerance_3d_mm + TOLERANCE_SLACK
            assert np.all(np.abs(dev) <= np.asarray(tolerance.tolerance_axis_mm) + TOLERANCE_SLACK)
            assert np.max(np.abs(result.pose.rotation_deg)) <= tolerance.tolerance_rotation_deg + TOLERANCE_SLACK
            assert o["one_view"] == result.one_view
            if result.one_view is not None:
                cov = target_covariance_mm2(result.pose, result.pose_cov, self.engine.target_room_mm)
                margin = math.sqrt(CHI2_3DOF_95 * max(float(np.linalg.eigvalsh(cov).max()), 0.0))
                assert np.linalg.norm(dev) + margin <= tolerance.tolerance_3d_mm + TOLERANCE_SLACK
                assert np.all(np.abs(dev) + np.sqrt(CHI2_3DOF_95 * np.diag(cov))
                              <= np.asarray(tolerance.tolerance_axis_mm) + TOLERANCE_SLACK)
                rot_margin = np.sqrt(CHI2_3DOF_95 * np.diag(result.pose_cov)[3:])
                assert np.max(np.abs(result.pose.rotation_deg) + rot_margin) <= \
                    tolerance.tolerance_rotation_deg + TOLERANCE_SLACK
            limit = min(self.now + tolerance.enable_validity_s, acquired + tolerance.max_frame_age_s)
            assert o["valid_until_unix_s"] <= limit + EXPIRY_SLACK_S
        return outputs

    # ------------------------------------------------------------------ rules
    @rule(dt_s=st.floats(-0.05, 2.0, allow_nan=False))
    def advance_clock(self, dt_s):
        self.now += dt_s
        self.mono += max(dt_s, 0.0)

    @rule()
    def tick(self):
        self._no_enable(self.engine.tick(self.now, self.mono), "tick")

    @rule(name=COMMAND_NAMES, params=st.dictionaries(PARAM_KEYS, HOSTILE_VALUE, max_size=4))
    def command(self, name, params):
        reply, outputs = self.engine.handle_command(name, params, self.now, self.mono, 7)
        assert isinstance(reply["ok"], bool) and reply["session"] == "stateful"
        assert reply["ok"] or reply["reason"]
        self._no_enable(outputs, f"command {name!r}")

    @rule()
    def drive_to_monitoring(self):
        """The legal way in: load, set up, one verified pair, start monitoring (refusals are fine)."""
        e = self.engine
        if e.state is ServiceState.IDLE:
            e.handle_command("load_plan", {}, self.now, self.mono)
        if e.state in (ServiceState.PLAN_LOADED, ServiceState.PAUSED, ServiceState.MONITORING):
            e.handle_command("start_setup", {}, self.now, self.mono)
        if e.state is ServiceState.SETUP:
            self.now += 0.1
            self.mono += 0.1
            pid = self._fresh_pid()
            self._feed_pair(pid, self.now - 0.01, PairResult(HoldReason.OK, Pose.identity()), 0.001, None)
            e.handle_command("start_monitoring", {}, self.now, self.mono)
        if e.state is ServiceState.MONITORING:
            self._recover()

    @rule(dev=st.tuples(SMALL_MM, SMALL_MM, SMALL_MM), rot=st.tuples(SMALL_DEG, SMALL_DEG, SMALL_DEG),
          exact=st.booleans(), failure=st.one_of(st.none(), st.none(), FAILURES),
          age_s=st.one_of(st.floats(0.0, 0.15, allow_nan=False), st.floats(-0.2, 0.5, allow_nan=False)),
          pid_mode=st.sampled_from(["next", "next", "next", "same", "back", "huge", "random"]),
          pid_random=st.integers(0, 2**63 - 1), old_epoch=st.booleans(),
          processing_s=st.one_of(st.floats(0.0, 0.03, allow_nan=False), st.floats(0.0, 0.3, allow_nan=False)),
          # Half the time long enough after the last pair that no velocity is known (max_frame_age_s 0.2 s).
          period_s=st.one_of(st.floats(0.0, 0.3, allow_nan=False), st.floats(0.21, 0.5, allow_nan=False)))
    def pair(self, dev, rot, exact, failure, age_s, pid_mode, pid_random, old_epoch, processing_s, period_s):
        self.now += period_s
        self.mono += period_s
        if pid_mode == "next":
            pid = self._fresh_pid()
        elif pid_mode == "same":
            pid = max(self.next_pid - 1, 0)
        elif pid_mode == "back":
            pid = max(self.next_pid - 5, 0)
        elif pid_mode == "huge":
            pid = 10**15 + self.next_pid
        else:
            pid = pid_random
        pose = Pose.identity() if exact else Pose.from_six(dev, rot)
        result = PairResult(HoldReason.OK, pose) if failure is None else PairResult(failure, quality={"ok": False})
        epoch = self.engine.epoch - 1 if old_epoch and self.engine.epoch > 0 else None
        self._feed_pair(pid, self.now - age_s, result, processing_s, epoch)

    @precondition(lambda self: self.engine.state is ServiceState.MONITORING)
    @rule(dev=st.tuples(*[st.floats(-1.1, 1.1, allow_nan=False)] * 3),
          rot=st.tuples(*[st.floats(-1.1, 1.1, allow_nan=False)] * 3),
          age_s=st.floats(-0.06, 0.25, allow_nan=False), period_s=st.floats(0.0, 0.5, allow_nan=False))
    def monitored_pair_near_the_tolerance(self, dev, rot, age_s, period_s):
        """Fresh pairs in MONITORING around the tolerance boundary: the gate's decisions at its edge."""
        self.now += period_s
        self.mono += period_s
        pid = max(self._fresh_pid(), self.max_pid_in_epoch + 1)
        self.next_pid = pid + 1
        self._feed_pair(pid, self.now - age_s, PairResult(HoldReason.OK, Pose.from_six(dev, rot)), 0.005, None)

    @precondition(lambda self: self.engine.state is ServiceState.MONITORING)
    @rule(dev=st.tuples(*[st.floats(-0.9, 0.9, allow_nan=False)] * 3),
          rot=st.tuples(*[st.floats(-0.8, 0.8, allow_nan=False)] * 3),
          sigma_mm=st.floats(0.0, 0.5, allow_nan=False), sigma_deg=st.floats(0.0, 0.3, allow_nan=False),
          corr=st.floats(-0.9, 0.9, allow_nan=False), view=st.sampled_from(["A", "B"]),
          period_s=st.floats(0.0, 0.5, allow_nan=False))
    def one_view_pair(self, dev, rot, sigma_mm, sigma_deg, corr, view, period_s):
        """A pair judged on one view: a pose with its covariance (correlated translation / rotation)."""
        self.now += period_s
        self.mono += period_s
        pid = max(self._fresh_pid(), self.max_pid_in_epoch + 1)
        self.next_pid = pid + 1
        sd = np.array([sigma_mm] * 3 + [sigma_deg] * 3)
        c = np.eye(6)
        c[0, 3] = c[3, 0] = corr  # translation X and pitch correlated (as a view's ray couples them)
        cov = np.outer(sd, sd) * c
        result = PairResult(HoldReason.OK, Pose.from_six(dev, rot), one_view=view, pose_cov=cov)
        self._feed_pair(pid, self.now - 0.02, result, 0.005, None)

    @rule(reason=FAILURES, pair_id=st.one_of(st.none(), st.integers(0, 2**63 - 1)), alive=st.booleans())
    def frame_fault(self, reason, pair_id, alive):
        self._no_enable(self.engine.frame_fault(reason, "fuzz", self.now, self.mono, pair_id, alive), "fault")

    @rule(imager=st.sampled_from(["A", "B"]), pair_id=st.integers(0, 2**63 - 1))
    def frame_arrived(self, imager, pair_id):
        self.engine.frame_arrived(imager, pair_id, 0, self.now, self.now, self.mono)

    @rule(reason=st.sampled_from([HoldReason.IMAGER_RESTARTED, HoldReason.PAIR_ID_JUMP]),
          pair_id=st.integers(0, 2**63 - 1))
    def new_epoch(self, reason, pair_id):
        before = len(self.sent)
        self.engine.new_epoch(reason, "fuzz", self.now, self.mono, pair_id)
        self._no_enable(self.sent[before:], "new_epoch")
        self.max_pid_in_epoch = -1
        self.next_pid = 0  # the imager's numbering restarts

    @rule()
    def internal_error(self):
        before = len(self.sent)
        self.engine.internal_error("fuzz", self.now, self.mono)
        self._no_enable(self.sent[before:], "internal_error")

    @precondition(lambda self: self.engine.state is ServiceState.MONITORING)
    @rule()
    def good_pairs_bring_the_beam_back(self):
        self._recover()

    def _recover(self):
        """Never stuck: after the velocity history has aged out, good fresh pairs ENABLE again."""
        self.recoveries += 1
        g = self.engine.gating_config
        # The velocity history is bounded in acquisition time: wait until the newest acquisition fed
        # (it may be stamped in the future, or the wall clock may have gone back) is older than that.
        wait_s = max(g.max_frame_age_s, self.latest_acquired + g.max_frame_age_s - self.now) + 0.01
        self.now += wait_s
        self.mono += wait_s
        self._no_enable(self.engine.tick(self.now, self.mono), "tick")
        outputs = []
        for _ in range(g.consecutive_to_enable):
            self.now += g.frame_period_s
            self.mono += g.frame_period_s
            pid = max(self._fresh_pid(), self.max_pid_in_epoch + 1)
            self.next_pid = pid + 1
            outputs = self._feed_pair(pid, self.now - 0.01, PairResult(HoldReason.OK, Pose.identity()), 0.001, None)
        beams = [o["beam"] for o in outputs if o["schema"].startswith("gating/")]
        assert beams[-1:] == ["ENABLE"], (beams, outputs)

    def _fresh_pid(self):
        pid = self.next_pid
        self.next_pid += 1
        return pid

    # -------------------------------------------------------------- invariants
    @invariant()
    def every_message_carries_the_session_and_finite_times(self):
        for o in self.sent[-20:]:
            assert o["session"] == "stateful"
            assert math.isfinite(o["t_unix_s"])


TestEngineStateful = EngineMachine.TestCase
TestEngineStateful.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
