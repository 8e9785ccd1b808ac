"""One-view monitoring in the engine and the running service (docs/ONE_VIEW.md).

The engine with the pattern stand-in (a Bayesian one-view update of the motion prior, exact truth in each
frame): which pairs are judged on one view, what they lean on, and that every decision on them names the view.
The service over ZeroMQ: a silent imager makes the next pairs one-view without waiting, and stereo returns with
its next frame; a dark or saturated view is measured around.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from spineguide.registration.pose import Pose
from spineguide.tracking.frames import KvFrame
from spineguide.tracking.service.config import (
    OneViewConfig,
    SafetyConfig,
    ServiceConfig,
    SetupConfig,
)
from spineguide.tracking.service.gating import HoldReason
from spineguide.tracking.service.pairing import CompletePair, FramePairer, PairFault, ViewReturned
from spineguide.tracking.service.processing import PatternProcessor, check_view_quality, stamp_pose_pattern
from spineguide.tracking.service.record import SessionRecord
from spineguide.tracking.service.states import Engine, run_processor
from spineguide.tracking.sim.simulators import pattern_frame

T0 = 1_764_070_000.0
I0 = 20000.0


class OneViewHarness:
    """An engine fed explicit frames and clock values; views can be dropped or darkened."""

    def __init__(self, one_view=OneViewConfig(), tolerance_mm=2.0):
        self.config = ServiceConfig(safety=SafetyConfig(tolerance_3d_mm=tolerance_mm,
                                                        tolerance_axis_mm=(tolerance_mm,) * 3),
                                    setup=SetupConfig("automatic"), one_view=one_view)
        self.sent: list[dict] = []
        self.engine = Engine(self.config, lambda plan: PatternProcessor(plan.imagers, 0.02), SessionRecord(None),
                             self.sent.append)
        self.now = T0
        self.pair_id = 0
        self.base = pattern_frame(Pose.identity(), 32, 32)

    def cmd(self, name, **params):
        self.now += 0.01
        reply, _ = self.engine.handle_command(name, params, self.now, self.now - T0)
        return reply

    def pair(self, pose: Pose, views=("A", "B"), dark=(), dt_s=0.1):
        self.now += dt_s
        pid = self.pair_id
        self.pair_id += 1
        frames = {}
        for n in views:
            px = stamp_pose_pattern(self.base, pose)
            if n in dark:
                px = (px // 100).astype(px.dtype)  # the gantry in the way: ~1 % of the signal
            frames[n] = KvFrame(n, px, i0=I0, acquired_unix_s=self.now - 0.02, pair_id=pid)
        job, proc = self.engine.begin_pair(pid, self.now - 0.02, self.now - T0, self.now)
        result = run_processor(proc, frames, job, self.config)
        out = self.engine.finish_pair(job, result, self.now + 0.001, self.now - T0)
        return result, [o for o in out if o["schema"].startswith("gating/")][-1]

    def monitoring(self, pose=Pose.identity()):
        assert self.cmd("load_plan")["ok"] and self.cmd("start_setup")["ok"]
        self.pair(pose)
        assert self.cmd("start_monitoring")["ok"]
        _, g = self.pair(pose)
        assert g["beam"] == "ENABLE" and g["one_view"] is None
        return self


def test_a_missing_view_is_judged_on_the_other_and_named():
    h = OneViewHarness().monitoring()
    result, g = h.pair(Pose.identity(), views=("A",))
    assert result.one_view == "A" and result.quality["blocked"] == {"B": "unpaired_frame"}
    assert g["one_view"] == "A" and g["beam"] == "ENABLE"  # 2 mm tolerance: the bound (~0.9 mm) fits
    assert g["deviation_bound_mm"] > g["deviation_mm"]
    assert h.engine.status()["views"]["mode"] == "one_view"
    _, g = h.pair(Pose.identity())
    assert g["one_view"] is None and h.engine.status()["views"]["mode"] == "stereo"


def test_a_dark_view_is_measured_around():
    h = OneViewHarness().monitoring()
    result, g = h.pair(Pose.identity(), dark=("B",))
    assert result.one_view == "A" and result.quality["blocked"] == {"B": "dark_frame"}
    assert g["one_view"] == "A"


def test_one_view_bound_holds_where_the_estimate_alone_would_enable():
    # 1 mm tolerance, 0.5 mm shift across view A's ray: the estimate is within, but with a prior floor of
    # 0.3 mm (configured here; the default is 0.05 mm plus the stereo scatter) the out-of-plane sigma puts
    # the 95 % bound beyond 1 mm.
    h = OneViewHarness(one_view=OneViewConfig(floor_mm=0.3, floor_deg=0.2), tolerance_mm=1.0).monitoring()
    shift = Pose.from_six([0.0, 0.5, 0.0], [0, 0, 0])
    _, g = h.pair(shift, dt_s=0.5)  # (after the velocity history aged out: a still patient, shifted)
    _, g = h.pair(shift, dt_s=0.5)
    assert g["beam"] == "ENABLE"  # stereo: 0.5 mm is within 1 mm
    _, g = h.pair(shift, views=("A",), dt_s=0.5)
    assert g["beam"] == "HOLD" and g["reason"] == "one_view_uncertain" and g["one_view"] == "A"
    assert g["deviation_mm"] < 1.0 < g["deviation_bound_mm"]


def test_one_view_estimate_follows_in_plane_motion_but_not_out_of_plane():
    h = OneViewHarness().monitoring()
    ray = h.engine.processor.ray_directions["A"]
    across = np.cross(ray, [0.0, 1.0, 0.0])
    across /= np.linalg.norm(across)
    moved = Pose.from_six(1.0 * across, [0, 0, 0])
    result, _ = h.pair(moved, views=("A",))
    t = result.pose.translation_mm
    assert abs(float(t @ across) - 1.0) < 0.1  # measured
    along = Pose.from_six(1.0 * ray, [0, 0, 0])
    result, g = h.pair(along, views=("A",))
    assert abs(float(result.pose.translation_mm @ ray)) < 0.1  # not seen: stays at the stereo reference
    # The limit of one view, stated: a sudden move purely along the ray is invisible, and the bound (the prior's
    # width there, 0.05 mm floor + 0.1 mm reference + drift) does not cover a 1 mm one. Only the move seen across
    # the ray widens it (docs/ONE_VIEW.md, "Limits").
    assert g["deviation_bound_mm"] < 1.0


def test_no_stereo_reference_holds_one_view_no_reference():
    h = OneViewHarness()
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    result, g = h.pair(Pose.identity(), views=("A",))  # setup never leans on one view
    assert g["reason"] == "one_view_no_reference" and g["one_view"] == "A"


def test_the_reference_ages_out():
    h = OneViewHarness(one_view=OneViewConfig(max_reference_age_s=1.0)).monitoring()
    _, g = h.pair(Pose.identity(), views=("A",), dt_s=0.5)
    assert g["one_view"] == "A" and g["reason"] != "one_view_no_reference"
    _, g = h.pair(Pose.identity(), views=("A",), dt_s=0.8)  # 1.3 s after the last stereo pair
    assert g["reason"] == "one_view_no_reference"


def test_a_couch_move_forgets_the_reference():
    h = OneViewHarness()  # automatic approval: the first setup pair's correction goes to the couch
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    h.pair(Pose.from_six([3.0, 0, 0], [0, 0, 0]))
    assert h.engine.phase.value == "awaiting_couch" and h.engine.stereo_reference is not None
    assert h.cmd("couch_moved")["ok"]
    assert h.engine.stereo_reference is None  # the patient moved with the couch: that pose no longer holds
    h.pair(Pose.identity())  # the verification pair is the new reference
    assert h.engine.stereo_reference is not None
    assert h.cmd("start_monitoring")["ok"]
    _, g = h.pair(Pose.identity(), views=("A",))
    assert g["one_view"] == "A" and g["beam"] == "ENABLE"


def test_disabled_one_view_keeps_the_stereo_hold():
    h = OneViewHarness(one_view=OneViewConfig(enabled=False)).monitoring()
    _, g = h.pair(Pose.identity(), views=("A",))
    assert g["reason"] == "unpaired_frame" and g["one_view"] is None
    _, g = h.pair(Pose.identity(), dark=("B",))
    assert g["reason"] == "dark_frame"


def test_both_views_unusable_is_a_plain_hold():
    h = OneViewHarness().monitoring()
    _, g = h.pair(Pose.identity(), dark=("A", "B"))
    assert g["beam"] == "HOLD" and g["reason"] == "dark_frame" and g["one_view"] is None


def test_nan_is_never_worked_around():
    h = OneViewHarness().monitoring()
    frames = {n: KvFrame(n, np.full((32, 32), np.nan, np.float32) if n == "B" else
                         stamp_pose_pattern(h.base, Pose.identity()), i0=I0, acquired_unix_s=h.now, pair_id=99)
              for n in ("A", "B")}
    job, proc = h.engine.begin_pair(99, h.now, 0.0, h.now + 0.01)
    assert run_processor(proc, frames, job, h.config).reason is HoldReason.NAN_FRAME


def test_dark_check_needs_an_i0_and_compares_the_99th_percentile():
    px = np.full((64, 64), 300, np.uint16)
    safety = SafetyConfig()
    assert check_view_quality(KvFrame("A", px, i0=10000.0), safety, 0.05)[0] is HoldReason.DARK_FRAME
    assert check_view_quality(KvFrame("A", px, i0=5000.0), safety, 0.05) is None  # 300 >= 250
    assert check_view_quality(KvFrame("A", px), safety, 0.05) is None  # no i0: no level to compare with


# ------------------------------------------------------------------ pairing
def test_pairer_completes_without_the_absent_imager_and_returns_to_stereo():
    p = FramePairer(("A", "B"), 0.05, allow_partial=True)
    f = lambda n, k: KvFrame(n, np.zeros((4, 4), np.uint16), acquired_unix_s=T0, pair_id=k)  # noqa: E731
    assert not [e for e in p.offer(f("A", 1), 1, None, 0.0) if isinstance(e, CompletePair)]
    (done,) = p.expire(0.06)
    assert isinstance(done, CompletePair) and done.missing == ("B",) and p.absent == {"B"}
    # B absent: pair 2 completes on A's frame at once.
    events = p.offer(f("A", 2), 2, None, 0.1)
    done = [e for e in events if isinstance(e, CompletePair)]
    assert done and done[0].missing == ("B",)
    # B's late frame of pair 2: back, logged, no HOLD; pair 3 waits for both again.
    events = p.offer(f("B", 2), 1, None, 0.11)
    assert [type(e) for e in events] == [ViewReturned] and not p.absent
    assert not [e for e in p.offer(f("A", 3), 3, None, 0.2) if isinstance(e, CompletePair)]
    done = [e for e in p.offer(f("B", 3), 2, None, 0.21) if isinstance(e, CompletePair)]
    assert done and done[0].missing == ()


def test_pairer_without_partial_keeps_unpaired_faults():
    p = FramePairer(("A", "B"), 0.05)
    p.offer(KvFrame("A", np.zeros((4, 4), np.uint16), acquired_unix_s=T0, pair_id=1), 1, None, 0.0)
    (fault,) = p.expire(0.06)
    assert isinstance(fault, PairFault) and fault.reason is HoldReason.UNPAIRED_FRAME


# ------------------------------------------------------------------ the running service
@pytest.mark.slow
def test_service_monitors_through_a_blocked_view(tmp_path):
    from tests.tracking.test_faults import SHIFT, Running

    r = Running(tmp_path, one_view=OneViewConfig(), tolerance_mm=2.0)
    try:
        for _ in range(3):  # B silent for three pairs: the first waits pair_timeout_s, the next do not
            pid = r.next_id()
            t0 = r.peers.send_pair(pid, SHIFT, only=("A",))
            msg = r.gating_for(pid)
            assert msg["one_view"] == "A", msg
        late_s = r.peers.sub.received_at(msg) - t0
        assert late_s < r.config.safety.pair_timeout_s, late_s  # absent: judged without waiting
        # B sends again: its frame of the first pair back may come after A's (then that pair was already
        # judged on A, and B's frame is only logged); from the next pair on, stereo.
        r.good_pair()
        msg = r.good_pair()
        assert msg["one_view"] is None and msg["beam"] == "ENABLE"
        r.svc.record.flush()
        one = [x for x in r.records("pair") if (x.get("result") or {}).get("one_view") == "A"]
        assert len(one) in (3, 4) and all(x["reference"] is not None for x in one)  # (4: the first pair back)
    finally:
        r.close()


# ------------------------------------------------------------------ pairing, property-based
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.sampled_from(["A", "B"]), st.integers(0, 12)),
    st.tuples(st.just("expire"), st.floats(0.0, 0.2, allow_nan=False), st.just(0)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_OPS, st.booleans())
def test_pairer_never_completes_an_empty_or_repeated_pair(ops, allow_partial):
    """Whatever frames arrive in whatever order: a completed pair has at least one frame, all of its own
    pair id and no imager twice; pair ids complete in increasing order; never every imager absent; a pair
    completes without an imager only when partial pairs are allowed."""
    p = FramePairer(("A", "B"), 0.05, allow_partial=allow_partial)
    now, seq, done = 0.0, {"A": 0, "B": 0}, []
    for op, a, b in ops:
        if op == "offer":
            seq[a] += 1
            events = p.offer(KvFrame(a, np.zeros((2, 2), np.uint16), acquired_unix_s=T0, pair_id=b), seq[a], "s", now)
        else:
            now += a
            events = p.expire(now)
        for e in events:
            if isinstance(e, CompletePair):
                assert e.frames and all(f.pair_id == e.pair_id for f in e.frames.values())
                assert set(e.frames) | set(e.missing) == {"A", "B"} and not set(e.frames) & set(e.missing)
                assert allow_partial or not e.missing
                assert not done or e.pair_id > done[-1]
                done.append(e.pair_id)
        assert p.absent != {"A", "B"}


# ------------------------------------------------------------------ the real anatomy method, one view
@pytest.mark.slow
def test_anatomy_processor_monitors_through_a_blocked_view():
    """Cervical phantom, stereo reference, then view B missing: the anatomy processor's one-view result is
    trusted, carries its covariance, and its target error is within its own 95 % bound."""
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.registration.anatomy import AnatomyRegistration, RegionOfInterest
    from spineguide.registration.motion_prior import MotionPrior
    from spineguide.tracking.room.kv import KVSimulator
    from spineguide.tracking.room.phantoms import cervical_phantom
    from spineguide.tracking.service.gating import CHI2_3DOF_95
    from spineguide.tracking.service.processing import AnatomyProcessor

    phantom = cervical_phantom(target="C4")
    geometry = default_stereo_geometry(512, 0.8)
    roi = RegionOfInterest.from_labels(phantom.planning_ct, phantom.labels, phantom.target_label)
    proc = AnatomyProcessor(AnatomyRegistration(phantom.planning_ct, phantom.isocentre_lps_mm, geometry, roi))
    sim = KVSimulator(phantom, geometry)
    reference = Pose.from_six([0.4, -0.3, 0.2], [0.1, 0.0, -0.1])
    moved = Pose.from_six([0.6, -0.1, 0.3], [0.1, 0.05, -0.1])  # 0.3 mm since the stereo pair
    st = sim.render(moved, seed=5)
    frame = KvFrame("A", st.frames["A"], i0=st.truth.i0, pair_id=1)
    result = proc.process_one_view(frame, MotionPrior(reference), 2.0, reference)
    assert result.ok, result.detail
    assert result.one_view == "A" and result.pose_cov.shape == (6, 6)
    err = result.pose.translation_mm - moved.translation_mm  # target = isocentre: the translation
    cov = result.pose_cov[:3, :3]
    assert float(err @ np.linalg.solve(cov, err)) <= CHI2_3DOF_95  # the truth inside its 95 % ellipsoid
