"""Simulators and their pieces: the test pattern, motion, the couch, the delivery system's beam rule, the imager stream."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq
from numpy.testing import assert_allclose

from spineguide.registration.pose import Correction, Pose
from spineguide.tracking.errors import TrackingError
from spineguide.tracking.sim.fraction import free_tcp_port
from spineguide.tracking.service.gating import Beam, GatingDecision, HoldReason
from spineguide.tracking.service.processing import read_pose_pattern, stamp_pose_pattern
from spineguide.tracking.sim.simulators import (
    HEARTBEAT_LOSS_S,
    CouchModel,
    MotionTrace,
    pattern_frame,
    run_delivery_sim,
    run_imager_sim,
)
from spineguide.tracking.service.wire import decode_kvframe, encode_gating, encode_heartbeat

# End-to-end (the simulator processes against a service): outside the development loop (-m "not slow"), run by CI.
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

PATTERN_TOL_MM = 0.5e-3  # stamped as integer micrometres (and micro-degrees): half a micrometre of rounding
#: The delivery-sim checks its permission every poll (5 ms); one loop of slack on each side.
DELIVERY_POLL_SLACK_S = 0.02


def test_pattern_round_trip_and_damage_is_detected():
    pose = Pose.from_six([12.345678, -0.5, 3.25], [1.5, -0.25, 0.75])
    px = stamp_pose_pattern(np.full((8, 20), 1000, np.uint16), pose)
    back = read_pose_pattern(px)
    assert_allclose(back.translation_mm, pose.translation_mm, rtol=0, atol=PATTERN_TOL_MM)
    assert_allclose(back.rotation_deg, pose.rotation_deg, rtol=0, atol=PATTERN_TOL_MM)
    px = px.copy()
    px[0, 5] ^= 1  # one bit flipped
    assert read_pose_pattern(px) is None
    assert read_pose_pattern(np.zeros((8, 20), np.float32)) is None
    with pytest.raises(TrackingError, match="at least|>= 15 columns"):
        stamp_pose_pattern(np.zeros((4, 4), np.uint16), pose)


def test_motion_trace_shift_happens_at_its_time_and_stays():
    trace = MotionTrace(drift_mm_per_min=(0.6, 0.0, 0.0), shifts=((10.0, (0.0, -3.0, 0.0)),))
    assert_allclose(trace.pose(5.0).translation_mm, [0.05, 0.0, 0.0], rtol=0, atol=1e-12)
    assert_allclose(trace.pose(20.0).translation_mm, [0.2, -3.0, 0.0], rtol=0, atol=1e-12)
    assert MotionTrace.from_json(trace.to_json()) == trace


def test_couch_applying_the_correction_of_a_pose_restores_the_plan_up_to_its_residual():
    pose = Pose.from_six([3.0, -2.0, 1.0], [1.0, 0.5, -1.5])
    couch = CouchModel(latency_s=0.0, residual_mm=0.0)
    state = couch.applied(pose.to_correction())
    after = Pose.from_matrix(state.matrix @ pose.matrix)  # every patient point p -> C p
    assert_allclose(after.matrix, np.eye(4), rtol=0, atol=1e-12)
    noisy = CouchModel(latency_s=0.0, residual_mm=0.15, seed=3)
    again = CouchModel(latency_s=0.0, residual_mm=0.15, seed=3)
    assert_allclose(noisy.applied(Correction.identity()).matrix, again.applied(Correction.identity()).matrix,
                    rtol=0, atol=0)


class FakeService:
    """A PUB + ROUTER pair standing in for the service, driven from the test thread."""

    def __init__(self, session="fake-service-1"):
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.publish = f"tcp://127.0.0.1:{port}"
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.command = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.couch = f"tcp://127.0.0.1:{free_tcp_port()}"  # bound by the simulator
        self.seq = 0
        self.session = session

    def send(self, parts):
        self.pub.send_multipart(parts)
        self.seq += 1

    def beat(self):
        self.send(encode_heartbeat(self.seq, time.time(), "MONITORING", session=self.session))

    def beat_for(self, duration_s, period_s=0.05):
        """Heartbeats every ``period_s`` for ``duration_s`` (the service is alive meanwhile)."""
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            self.beat()
            time.sleep(period_s)

    def gating(self, beam, reason, valid_until, pair_id, dev):
        now = time.time()
        self.send(encode_gating(self.seq, now, GatingDecision(beam, reason, valid_until, pair_id, dev, now),
                                session=self.session))

    def close(self):
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


def _run_delivery(fake, duration_s, ready: threading.Event, out: dict):
    def run():
        out["report"] = run_delivery_sim(fake.publish, fake.command, fake.couch, duration_s,
                                         CouchModel(latency_s=0.05, residual_mm=0.0))
    t = threading.Thread(target=run)
    t.start()
    # Heartbeats until the simulator has heard one (it then publishes couch/1).
    sub = fake.ctx.socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "couch")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(fake.couch)
    deadline = time.monotonic() + 10
    while not sub.poll(50) and time.monotonic() < deadline:
        fake.beat()
    sub.close(0)
    ready.set()
    return t


def test_delivery_sim_beam_is_on_only_until_the_enable_expires():
    fake = FakeService()
    out: dict = {}
    try:
        t = _run_delivery(fake, 1.2, threading.Event(), out)
        validity_s = 0.3
        fake.beat()
        fake.gating(Beam.ENABLE, HoldReason.OK, time.time() + validity_s, 1, 0.1)
        fake.beat_for(0.6)  # heartbeats go on: only the expiry ends the beam
        t.join(10)
    finally:
        fake.close()
    report = out["report"]
    assert report.enables == 1 and report.heartbeat_losses == 0
    assert report.beam_on_s <= validity_s + DELIVERY_POLL_SLACK_S  # never on past the expiry
    assert report.beam_on_s >= validity_s - 2 * DELIVERY_POLL_SLACK_S  # and on until then


def test_delivery_sim_holds_on_heartbeat_loss_though_the_enable_is_unexpired():
    fake = FakeService()
    out: dict = {}
    try:
        t = _run_delivery(fake, 1.0, threading.Event(), out)
        fake.beat()
        fake.gating(Beam.ENABLE, HoldReason.OK, time.time() + 10.0, 1, 0.1)
        t0 = time.monotonic()
        # The service dies (kill -9): no HOLD, no heartbeat, ever again.
        t.join(10)
    finally:
        fake.close()
    report = out["report"]
    assert report.enables == 1 and report.heartbeat_losses == 1
    # On at most from the last heartbeat to the loss limit (the ENABLE said 10 s).
    assert report.beam_on_s <= HEARTBEAT_LOSS_S + DELIVERY_POLL_SLACK_S, (report.beam_on_s, time.monotonic() - t0)


def test_delivery_sim_hold_revokes_an_unexpired_enable_and_setup_correction_moves_the_couch():
    fake = FakeService()
    out: dict = {}
    try:
        t = _run_delivery(fake, 1.5, threading.Event(), out)
        now = time.time()
        fake.gating(Beam.ENABLE, HoldReason.OK, now + 10.0, 1, 0.1)
        fake.gating(Beam.HOLD, HoldReason.OUT_OF_TOLERANCE, now, 2, 3.0)
        from spineguide.tracking.service.wire import correction_body, encode_message

        corr = Pose.from_six([1.0, 0, 0], [0, 0, 0]).to_correction()
        body = correction_body(2, now, corr, "fiducial", {"ok": True}, session=fake.session, apply=True,
                               purpose="setup")
        fake.send(encode_message(fake.seq, body))
        fake.send(encode_message(fake.seq, body))  # repeated: applied once
        assert fake.router.poll(5000)
        msg = fake.router.recv_multipart()
        assert b"couch_moved" in msg[-1]
        t.join(10)
    finally:
        fake.close()
    report = out["report"]
    assert report.holds == {"out_of_tolerance": 1}
    assert report.beam_on_s <= DELIVERY_POLL_SLACK_S
    assert report.corrections_applied == 1


def test_delivery_sim_applies_the_same_pair_id_again_from_a_restarted_service():
    fake = FakeService()
    out: dict = {}
    try:
        t = _run_delivery(fake, 1.5, threading.Event(), out)
        from spineguide.tracking.service.wire import correction_body, encode_message

        corr = Pose.from_six([1.0, 0, 0], [0, 0, 0]).to_correction()
        for session in ("service-before-restart", "service-after-restart"):
            fake.session = session
            fake.beat()
            body = correction_body(0, time.time(), corr, "fiducial", {"ok": True}, session=session, apply=True,
                                   purpose="setup")
            fake.send(encode_message(fake.seq, body))
            assert fake.router.poll(5000)  # couch_moved: the move was made
            assert b"couch_moved" in fake.router.recv_multipart()[-1]
            fake.send(encode_message(fake.seq, body))  # a repeat within one session is not applied again
        t.join(10)
    finally:
        fake.close()
    report = out["report"]
    assert report.corrections_applied == 2 and report.service_sessions == 2


def test_imager_sim_streams_pairs_with_the_true_pose(tmp_path):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    setup = Pose.from_six([2.0, -1.0, 0.5], [0.5, 0.0, 0.0])
    try:
        n = run_imager_sim(address, 0.25, setup, MotionTrace(), frame_period_s=0.1, rows=24, cols=24,
                           truth_path=tmp_path / "truth.jsonl", ctx=ctx)
        frames = []
        while pull.poll(200):
            frames.append(decode_kvframe(pull.recv_multipart()).frame)
    finally:
        pull.close(0)
        ctx.term()
    assert n >= 2 and len(frames) == 2 * n
    assert {f.imager for f in frames} == {"A", "B"}
    for f in frames:
        assert_allclose(read_pose_pattern(f.pixels).translation_mm, setup.translation_mm, rtol=0, atol=PATTERN_TOL_MM)
    assert len((tmp_path / "truth.jsonl").read_text().splitlines()) == n


def test_pattern_frame_is_deterministic():
    a = pattern_frame(Pose.identity(), 16, 16, seed=4)
    b = pattern_frame(Pose.identity(), 16, 16, seed=4)
    assert np.array_equal(a, b) and a.dtype == np.uint16
