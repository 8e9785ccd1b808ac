"""Fault injection against a running service on loopback (issue 5's list).

Each fault must end in HOLD within one frame period + 100 ms of the fault
(or be refused), the service must keep running (a good pair enables the beam
again, commands are answered), and the session record must have it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from spineguide.registration.pose import Pose
from spineguide.tracking.service.config import (
    EndpointsConfig,
    OneViewConfig,
    PlanConfig,
    RecordConfig,
    SafetyConfig,
    SecurityConfig,
    ServiceConfig,
    SetupConfig,
)
from spineguide.tracking.service.loop import Service
from spineguide.tracking.service.record import read_record
from spineguide.tracking.sim.simulators import LocalPeers
from spineguide.tracking.service.wire import WireLimits, encode_command, encode_kvframe

# End-to-end (service processes killed, stuck or starved): outside the development loop (-m "not slow"), run by CI.
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

FRAME_PERIOD_S = 0.1
#: The issue's bound: a fault becomes HOLD within one frame period + 100 ms.
HOLD_BOUND_S = FRAME_PERIOD_S + 0.1
#: The pattern processor's measurement noise (1 sigma per axis) and a 5-sigma bound on one reading.
NOISE_MM = 0.05
DEVIATION_TOL_MM = 5 * NOISE_MM
SHIFT = Pose.from_six([0.2, -0.1, 0.1], [0.1, 0.0, 0.0])  # well within the 1 mm / 1 deg tolerance


class Running:
    """A service driven into MONITORING with the beam enabled, plus connected peers."""

    def __init__(self, tmp_path, limits: WireLimits = WireLimits(), one_view: OneViewConfig | None = None,
                 tolerance_mm: float = 1.0):
        self.config = ServiceConfig(
            # ENABLE life and staleness 1.5 frame periods: an ENABLE always expires before the bound.
            safety=SafetyConfig(frame_period_s=FRAME_PERIOD_S, max_frame_age_s=0.15, enable_validity_s=0.15,
                                pair_timeout_s=0.05, tolerance_3d_mm=tolerance_mm,
                                tolerance_axis_mm=(tolerance_mm,) * 3),
            # The stereo fault cases run without one-view monitoring (a silent or saturated view is then a
            # HOLD); tests/tracking/test_one_view_service.py runs them with it.
            one_view=one_view if one_view is not None else OneViewConfig(enabled=False),
            endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
            setup=SetupConfig("automatic"),
            plan=PlanConfig(pattern_noise_mm=NOISE_MM),
            record=RecordConfig(tmp_path / "session.jsonl"),
            security=SecurityConfig(enabled=False),  # loopback test: CURVE explicitly off
        )
        self.svc = Service(self.config, limits=limits).start()
        self.peers = LocalPeers(self.svc.endpoints)
        self.pair_id = 0
        p = self.peers
        p.sub.handshake()
        assert p.cmd.request("load_plan")["ok"]
        assert p.cmd.request("start_setup")["ok"]
        self.good_pair()
        assert p.cmd.request("start_monitoring")["ok"]
        assert self.good_pair()["beam"] == "ENABLE"

    def next_id(self) -> int:
        self.pair_id += 1
        return self.pair_id

    def gating_for(self, pair_id: int, timeout_s: float = 2.0) -> dict:
        return self.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == pair_id, timeout_s)

    def good_pair(self) -> dict:
        pid = self.next_id()
        self.peers.send_pair(pid, SHIFT)
        return self.gating_for(pid)

    def expect_hold(self, t0_mono: float, reason: str) -> dict:
        """The first HOLD with ``reason`` after ``t0_mono``; asserts the time bound."""
        msg = self.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["beam"] == "HOLD"
                                      and m["reason"] == reason, 2.0)
        received = self.peers.sub.received_at(msg)
        assert received - t0_mono <= HOLD_BOUND_S, f"HOLD {reason} after {received - t0_mono:.3f} s"
        return msg

    def good_pair_within_a_frame_period(self) -> dict:
        """After the velocity history aged out, a good pair is judged (ENABLE) within one frame period."""
        time.sleep(self.config.safety.max_frame_age_s + 0.05)
        pid = self.next_id()
        t0 = self.peers.send_pair(pid, SHIFT)
        msg = self.gating_for(pid)
        late_s = self.peers.sub.received_at(msg) - t0
        assert msg["beam"] == "ENABLE" and late_s <= FRAME_PERIOD_S, (msg, late_s)
        return msg

    def records(self, event: str) -> list[dict]:
        self.svc.record.flush()
        return [r for r in read_record(self.config.record.path) if r["event"] == event]

    def assert_alive_and_recorded(self, event: str, reason: str | None = None) -> None:
        # Let the last pair age out of the velocity look-ahead's history first: a good pair
        # within max_frame_age_s of an out-of-tolerance one is a real fast jump back (e.g.
        # 2 mm -> 0.2 mm in 0.1 s = 18 mm/s) and the gate rightly holds it as moving.
        time.sleep(self.config.safety.max_frame_age_s + 0.05)
        assert self.good_pair()["beam"] == "ENABLE"  # the service kept running
        assert self.peers.cmd.request("status")["state"] == "MONITORING"
        self.svc.record.flush()
        records = read_record(self.config.record.path)
        hits = [r for r in records if r["event"] == event and (reason is None or r.get("reason") == reason
                or (r.get("result") or {}).get("reason") == reason)]
        assert hits, f"no '{event}' record with reason {reason}"

    def close(self):
        self.peers.close()
        self.svc.stop()


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path)
    yield r
    r.close()


def test_stale_pair_holds(running):
    pid = running.next_id()
    t0 = running.peers.send_pair(pid, SHIFT, acquired_unix_s=time.time() - 0.5)
    running.expect_hold(t0, "stale_frame")
    running.assert_alive_and_recorded("pair", "stale_frame")


def test_one_imager_silent_holds_unpaired(running):
    pid = running.next_id()
    t0 = running.peers.send_pair(pid, SHIFT, only=("A",))
    running.expect_hold(t0, "unpaired_frame")
    running.assert_alive_and_recorded("frame_fault", "unpaired_frame")


def test_corrupt_frame_of_wrong_size_holds(running):
    pid = running.next_id()
    parts = running.peers.pair_parts(pid, SHIFT)
    running.peers.frames.send_parts(parts["A"])
    t0 = time.monotonic()
    running.peers.frames.send_parts(parts["B"][:2] + [parts["B"][2][:-2]])
    running.expect_hold(t0, "corrupt_frame")
    running.assert_alive_and_recorded("frame_fault", "corrupt_frame")


def test_nan_frame_holds(running):
    pid = running.next_id()
    pixels = np.full((32, 32), 1000.0, np.float32)
    pixels[3, 4] = np.nan
    t0 = time.monotonic()
    running.peers.frames.send_parts(encode_kvframe(99, "A", pid, time.time(), pixels, 20000.0))
    running.expect_hold(t0, "nan_frame")
    running.assert_alive_and_recorded("frame_fault", "nan_frame")


def test_saturated_frame_holds(running):
    pid = running.next_id()
    parts = running.peers.pair_parts(pid, SHIFT)
    header = json.loads(parts["B"][1])
    px = np.frombuffer(parts["B"][2], "<u2").reshape(32, 32).copy()
    px[10:20, :] = 65535  # 31% of the panel saturated
    t0 = time.monotonic()
    running.peers.frames.send_parts(parts["A"])
    running.peers.frames.send_parts(encode_kvframe(header["seq"], "B", pid, header["acquired_unix_s"], px, 20000.0))
    running.expect_hold(t0, "saturated_frame")
    running.assert_alive_and_recorded("pair", "saturated_frame")


def test_seed_lost_holds(running):
    pid = running.next_id()
    parts = running.peers.pair_parts(pid, SHIFT)
    header = json.loads(parts["A"][1])
    px = np.frombuffer(parts["A"][2], "<u2").reshape(32, 32).copy()
    px[0, :] = 12000  # the seeds' pattern gone from imager A
    t0 = time.monotonic()
    running.peers.frames.send_parts(encode_kvframe(header["seq"], "A", pid, header["acquired_unix_s"], px, 20000.0))
    running.peers.frames.send_parts(parts["B"])
    running.expect_hold(t0, "fiducial_missing")
    running.assert_alive_and_recorded("pair", "fiducial_missing")


def test_out_of_tolerance_step_holds(running):
    pid = running.next_id()
    t0 = running.peers.send_pair(pid, Pose.from_six([0.0, 0.0, 3.0], [0, 0, 0]))
    msg = running.expect_hold(t0, "out_of_tolerance")
    assert msg["pair_id"] == pid and abs(msg["deviation_mm"] - 3.0) <= DEVIATION_TOL_MM
    running.assert_alive_and_recorded("pair")


def test_unknown_kvframe_major_version_holds(running):
    pid = running.next_id()
    parts = running.peers.pair_parts(pid, SHIFT)
    header = json.loads(parts["A"][1])
    header["schema"] = "kvframe/2"
    t0 = time.monotonic()
    running.peers.frames.send_parts([parts["A"][0], json.dumps(header).encode(), parts["A"][2]])
    running.expect_hold(t0, "corrupt_frame")
    running.assert_alive_and_recorded("frame_fault", "corrupt_frame")


def test_imager_simulator_killed_holds(running):
    # A real imager-sim process streaming at 10 Hz, then SIGKILL.
    code = (
        "import sys\n"
        "from spineguide.registration.pose import Pose\n"
        "from spineguide.tracking.sim.simulators import MotionTrace, run_imager_sim\n"
        f"run_imager_sim({running.svc.endpoints['frames']!r}, 30.0, Pose.identity(), MotionTrace(),"
        " rows=32, cols=32, frame_period_s=0.1, first_pair_id=1000)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code]) as proc:
        try:
            running.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["beam"] == "ENABLE"
                                       and m["pair_id"] is not None and m["pair_id"] >= 1003, 10.0)
        finally:
            proc.kill()
            t0 = time.monotonic()
            proc.wait(10)
    msg = running.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["beam"] == "HOLD", 2.0)
    late_s = running.peers.sub.received_at(msg) - t0
    assert late_s <= HOLD_BOUND_S, f"HOLD {msg['reason']} {late_s:.3f} s after the kill"
    # The socket monitor sees the connection go (peer_disconnected), or the ENABLE expires first.
    assert msg["reason"] in ("peer_disconnected", "stale_frame", "frame_source_silent")
    if msg["reason"] != "frame_source_silent":  # then the silence rule
        running.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["reason"] == "frame_source_silent", 2.0)
    assert running.peers.cmd.request("status")["state"] == "MONITORING"
    running.svc.record.flush()
    assert any(r["event"] == "tick" and r["outputs"][-1]["reason"] == "frame_source_silent"
               for r in read_record(running.config.record.path))


def test_slow_subscriber_does_not_delay_anyone(running):
    slow_ctx = zmq.Context()
    slow = slow_ctx.socket(zmq.SUB)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt_string(zmq.SUBSCRIBE, "")
    slow.connect(running.svc.endpoints["publish"])  # never reads
    try:
        for _ in range(30):
            assert running.good_pair()["beam"] == "ENABLE"
        pid = running.next_id()
        t0 = running.peers.send_pair(pid, Pose.from_six([2.0, 0, 0], [0, 0, 0]))
        running.expect_hold(t0, "out_of_tolerance")
        running.assert_alive_and_recorded("sent")
    finally:
        slow.close(0)
        slow_ctx.term()


def test_command_flood_is_rate_limited_and_gating_goes_on(running):
    sock = running.peers.cmd.sock
    for i in range(500):
        sock.send_multipart(encode_command(10_000 + i, "status"))
    pid = running.next_id()
    t0 = running.peers.send_pair(pid, Pose.from_six([0, 2.0, 0], [0, 0, 0]))
    running.expect_hold(t0, "out_of_tolerance")
    replies = []
    deadline = time.monotonic() + 10
    while len(replies) < 500 and time.monotonic() < deadline:
        replies.append(running.peers.cmd.receive(5.0))
    assert len(replies) == 500  # every request answered
    assert any(r["ok"] is False and "rate limited" in r["reason"] for r in replies)
    running.assert_alive_and_recorded("command_rejected")


def test_malformed_json_command_is_refused(running):
    sock = running.peers.cmd.sock
    sock.send_multipart([b"command", b"{not json"])
    reply = running.peers.cmd.receive(2.0)
    assert reply["ok"] is False and "malformed command" in reply["reason"] and "not valid JSON" in reply["reason"]
    running.assert_alive_and_recorded("command_rejected")


def test_unknown_command_major_version_is_refused(running):
    sock = running.peers.cmd.sock
    sock.send_multipart([b"command", json.dumps({"schema": "command/2", "seq": 0, "command": "stop"}).encode()])
    reply = running.peers.cmd.receive(2.0)
    assert reply["ok"] is False and "unknown schema major version 2" in reply["reason"]
    assert reply["state"] == "MONITORING"  # the stop was not obeyed
    running.assert_alive_and_recorded("command_rejected")


def test_exception_in_processing_holds_internal_error(running):
    class Broken:
        method = "fiducial"

        def process(self, frames, prior):
            raise ZeroDivisionError("division by zero in a registration")

    good = running.svc.engine.processor
    running.svc.engine.processor = Broken()
    pid = running.next_id()
    t0 = running.peers.send_pair(pid, SHIFT)
    running.expect_hold(t0, "internal_error")
    running.svc.engine.processor = good
    running.assert_alive_and_recorded("pair", "internal_error")


# ------------------------------------------------------------------ issue 14: nothing on the sockets makes it deaf
def _kvframe_header(running, pid):
    parts = running.peers.pair_parts(pid, SHIFT)
    return parts, parts["A"][1]


def _with_raw(header: bytes, key: str, literal: bytes) -> bytes:
    obj = json.loads(header)
    obj[key] = "@@RAW@@"
    return json.dumps(obj).encode().replace(b'"@@RAW@@"', literal)


DEAF_MAKERS = {
    "unhashable dtype": lambda h: _with_raw(h, "dtype", b'["uint16"]'),
    "integer of 5000 digits": lambda h: _with_raw(h, "pair_id", b"9" * 5000),
    "nesting 3000 deep": lambda h: _with_raw(h, "extra", b"[" * 3000 + b"]" * 3000),
    "superscript schema version": lambda h: _with_raw(h, "schema", b'"kvframe/\\u00b2"'),  # JSON escape
    "raw superscript schema version": lambda h: _with_raw(h, "schema", '"kvframe/²"'.encode()),
    "NaN": lambda h: _with_raw(h, "acquired_unix_s", b"NaN"),
    "duplicate key": lambda h: h[:-1] + b', "pair_id": 3}',
    "not UTF-8": lambda h: h[:-1] + b', "x": "\xff"}',
}


@pytest.mark.parametrize("name", sorted(DEAF_MAKERS))
def test_a_hostile_kvframe_header_is_refused_and_the_next_pair_is_judged_in_one_frame_period(running, name):
    pid = running.next_id()
    parts, header = _kvframe_header(running, pid)
    t0 = time.monotonic()
    running.peers.frames.send_parts([b"kvframe", DEAF_MAKERS[name](header), parts["A"][2]])
    running.expect_hold(t0, "corrupt_frame")
    running.good_pair_within_a_frame_period()
    assert running.peers.cmd.request("status")["state"] == "MONITORING"
    assert any(r["reason"] == "corrupt_frame" for r in running.records("frame_fault"))
    assert running.svc.failure is None


@pytest.mark.parametrize("parts", [[b"kvframe"], [b"kvframe", b"{}", b"", b"", b""], [b"", b"", b""]])
def test_a_message_with_the_wrong_frames_is_refused_and_the_service_goes_on(running, parts):
    t0 = time.monotonic()
    running.peers.frames.send_parts(parts)
    running.expect_hold(t0, "corrupt_frame")
    running.good_pair_within_a_frame_period()


@pytest.mark.parametrize("raw", [
    b'{"schema": "command/\\u00b2", "seq": 0, "command": "stop"}',
    b'{"schema": "command/1", "seq": ' + b"9" * 5000 + b', "command": "stop"}',
    b'{"schema": "command/1", "seq": 0, "command": "stop", "params": {"a": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
    b'{"schema": "command/1", "seq": 0, "command": ["stop"]}',
    b'{"schema": "command/1", "seq": 0, "command": "stop", "command": "pause"}',
    b'{"schema": "command/1.1", "seq": 0, "command": "stop"}',  # 1.1 without the client's session
])
def test_a_hostile_command_is_refused_and_commands_and_frames_go_on(running, raw):
    running.peers.cmd.sock.send_multipart([b"command", raw])
    reply = running.peers.cmd.receive(2.0)
    assert reply["ok"] is False and "malformed command" in reply["reason"]
    assert reply["state"] == "MONITORING" and reply["session"] == running.svc.session
    assert running.peers.cmd.request("status")["ok"]
    running.good_pair_within_a_frame_period()


def test_an_oversize_part_is_received_refused_and_recorded(tmp_path):
    # Small limits (64 x 64 pixels): the hard cap is the largest legal part plus MAXMSGSIZE_SLACK_BYTES.
    r = Running(tmp_path, WireLimits(max_rows=64, max_cols=64))
    try:
        pid = r.next_id()
        parts, header = _kvframe_header(r, pid)
        t0 = time.monotonic()
        r.peers.frames.send_parts([b"kvframe", header, b"\0" * (64 * 64 * 4 + 1)])
        msg = r.expect_hold(t0, "oversize_message")
        assert msg["pair_id"] is None
        r.good_pair_within_a_frame_period()
        t0 = time.monotonic()
        r.peers.frames.send_parts([b"kvframe", b" " * (20 * 1024), b""])  # header over 16 KiB
        r.expect_hold(t0, "oversize_message")
        assert [x["detail"] for x in r.records("frame_fault") if x["reason"] == "oversize_message"][-1] \
            == "kvframe: header part is 20480 bytes (limit 16384)"
        r.good_pair_within_a_frame_period()
    finally:
        r.close()


def test_a_part_over_the_hard_cap_drops_the_connection_which_is_held_and_recorded(tmp_path):
    from spineguide.tracking.service.loop import MAXMSGSIZE_SLACK_BYTES

    r = Running(tmp_path, WireLimits(max_rows=64, max_cols=64))
    try:
        pid = r.next_id()
        parts, header = _kvframe_header(r, pid)
        t0 = time.monotonic()
        r.peers.frames.send_parts([b"kvframe", header, b"\0" * (64 * 64 * 4 + MAXMSGSIZE_SLACK_BYTES + 1)])
        r.expect_hold(t0, "peer_disconnected")
        # ZeroMQ reconnects the sender by itself: frames are judged again.
        deadline = time.monotonic() + 5.0
        while True:
            time.sleep(r.config.safety.max_frame_age_s + 0.05)
            pid = r.next_id()
            r.peers.send_pair(pid, SHIFT)
            msg = r.gating_for(pid)
            if msg["beam"] == "ENABLE" or time.monotonic() > deadline:
                break
        assert msg["beam"] == "ENABLE"
        assert any("disconnected" in x["detail"] for x in r.records("frame_fault") if x["reason"] == "peer_disconnected")
    finally:
        r.close()


def test_pair_id_ten_to_the_fifteen_then_normal_ids_recover(running):
    huge = 10**15
    t0 = running.peers.send_pair(huge, SHIFT)
    running.expect_hold(t0, "pair_id_jump")
    assert running.gating_for(huge)["beam"] == "ENABLE"  # a new numbering, judged normally
    time.sleep(running.config.safety.max_frame_age_s + 0.05)
    pid = running.next_id()  # the usual numbering again: another epoch, not a stale lock
    t0 = running.peers.send_pair(pid, SHIFT)
    running.expect_hold(t0, "pair_id_jump")
    assert running.gating_for(pid)["beam"] == "ENABLE"
    running.good_pair_within_a_frame_period()
    epochs = running.records("epoch")
    assert [e["reason"] for e in epochs] == ["pair_id_jump", "pair_id_jump"] and epochs[-1]["epoch"] == 2


def test_an_imager_restart_recovers_without_a_lock_out(running):
    from spineguide.tracking.sim.simulators import FrameSender

    for _ in range(3):
        running.good_pair()
    restarted = FrameSender(running.peers.ctx, running.svc.endpoints["frames"])  # new session, counter from 0
    try:
        time.sleep(running.config.safety.max_frame_age_s + 0.05)
        t0 = time.monotonic()
        for name, parts in running.peers.pair_parts(0, SHIFT).items():
            header = json.loads(parts[1])
            restarted.send_parts(encode_kvframe(restarted.seq.next(), name, 0, header["acquired_unix_s"],
                                                np.frombuffer(parts[2], "<u2").reshape(32, 32), 20000.0,
                                                restarted.session))
        msg = running.expect_hold(t0, "imager_restarted")
        assert msg["pair_id"] == 0
        assert running.gating_for(0)["beam"] == "ENABLE"
        assert running.records("epoch")[-1]["reason"] == "imager_restarted"
    finally:
        restarted.close()


def test_a_dropped_pair_gets_its_own_hold(running):
    import threading

    good = running.svc.engine.processor
    busy = threading.Event()

    class Slow:
        method = "fiducial"

        def process(self, frames, prior):
            busy.set()
            time.sleep(0.5)
            return good.process(frames, prior)

    running.svc.engine.processor = Slow()
    try:
        ids = [running.next_id() for _ in range(3)]
        running.peers.send_pair(ids[0], SHIFT)
        # Only once the worker is inside the first pair: the second then completes while it is busy and the
        # third replaces it (sent all at once, a loaded machine may let the third replace the first as well).
        assert busy.wait(3.0)
        for pid in ids[1:]:
            running.peers.send_pair(pid, SHIFT)
        msg = running.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["reason"] == "pair_dropped", 3.0)
        assert msg["beam"] == "HOLD" and msg["pair_id"] == ids[1]
        running.gating_for(ids[2], 3.0)
        assert running.svc.stats.pairs_dropped >= 1
        assert any(r["pair_id"] == ids[1] for r in running.records("frame_fault") if r["reason"] == "pair_dropped")
    finally:
        running.svc.engine.processor = good


def test_an_unexpected_exception_on_a_message_holds_and_the_io_thread_goes_on(running, monkeypatch):
    def broken(parts, pairer):
        raise KeyError("a bug in frame handling")

    monkeypatch.setattr(running.svc, "_handle_frame", broken)
    t0 = running.peers.send_pair(running.next_id(), SHIFT)
    msg = running.expect_hold(t0, "internal_error")
    assert msg["pair_id"] is None
    monkeypatch.undo()
    running.good_pair_within_a_frame_period()
    assert running.svc.failure is None
    assert any("KeyError" in r["detail"] for r in running.records("frame_fault") if r["reason"] == "internal_error")


def test_a_stuck_worker_fails_the_service_with_a_hold(running, monkeypatch):
    import threading

    import spineguide.tracking.service.loop

    monkeypatch.setattr(spineguide.tracking.service.loop, "PAIR_STALL_S", 0.3)
    release = threading.Event()
    good = running.svc.engine.processor

    class Stuck:
        method = "fiducial"

        def process(self, frames, prior):
            release.wait(10.0)
            return good.process(frames, prior)

    running.svc.engine.processor = Stuck()
    try:
        t0 = running.peers.send_pair(running.next_id(), SHIFT)
        msg = running.peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["reason"] == "internal_error", 3.0)
        assert msg["beam"] == "HOLD" and running.peers.sub.received_at(msg) - t0 < 1.0
        assert "worker made no progress" in running.svc.failure
        beats = len([m for _, m in running.peers.sub.messages if m["_topic"] == "heartbeat"])
        running.peers.sub.collect(0.3)
        assert len([m for _, m in running.peers.sub.messages if m["_topic"] == "heartbeat"]) == beats  # no more
        assert any("worker made no progress" in r["detail"] for r in running.records("error"))
    finally:
        release.set()


def test_a_dead_io_thread_holds_and_serve_exits_non_zero(tmp_path):
    """The io thread dies outside any message (here: its poll raises): HOLD internal_error, exit 3, recorded."""
    from spineguide.tracking.sim.fraction import free_tcp_port
    from spineguide.tracking.sim.simulators import Subscriber

    ports = {name: free_tcp_port() for name in ("frames", "publish", "command")}
    config = tmp_path / "service.toml"
    config.write_text(
        "[safety]\nframe_period_s = 0.1\n[plan]\nmethod = \"pattern\"\n[security]\nenabled = false\n"
        "[record]\npath = \"session.jsonl\"\n[endpoints]\n"
        + "".join(f'{name} = "tcp://127.0.0.1:{port}"\n' for name, port in ports.items()))
    code = (
        "import sys\n"
        "import zmq\n"
        "import spineguide.tracking.service.loop as loop\n"
        "real = loop.Service._poll_io\n"
        "def poll(self, poller, wait_ms):\n"
        "    events = real(self, poller, wait_ms)\n"
        "    if any(s.socket_type == zmq.PULL for s, _ in events):\n"
        "        raise OSError('injected: the io thread dies')\n"
        "    return events\n"
        "loop.Service._poll_io = poll\n"
        "from spineguide.tracking.cli.main import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}]))\n"
    )
    ctx = zmq.Context()
    sub = Subscriber(ctx, f"tcp://127.0.0.1:{ports['publish']}")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://127.0.0.1:{ports['frames']}")
    with subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stderr=subprocess.PIPE, text=True) as proc:
        try:
            sub.handshake(30.0)
            push.send_multipart([b"kvframe", b"{}", b""])
            msg = sub.wait_for(lambda m: m["_topic"] == "gating" and m["reason"] == "internal_error", 5.0)
            assert msg["beam"] == "HOLD"
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
            sub.close()
            push.close(0)
            ctx.term()
    assert proc.returncode == 3, stderr
    assert "service failed: service-io died: OSError: injected" in stderr
    records = read_record(tmp_path / "session.jsonl")
    assert any("service-io died" in r.get("detail", "") for r in records if r["event"] == "error")
    assert records[-1]["event"] == "closed"


def test_a_command_over_the_hard_cap_is_recorded_and_other_clients_are_answered(running):
    from spineguide.tracking.service.loop import MAXMSGSIZE_SLACK_BYTES

    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(running.svc.endpoints["command"])
    try:
        rogue.send_multipart([b"command", b" " * (16 * 1024 + MAXMSGSIZE_SLACK_BYTES + 1)])
        deadline = time.monotonic() + 5.0
        while not running.records("command_peer_disconnected") and time.monotonic() < deadline:
            time.sleep(0.05)
        [dropped] = running.records("command_peer_disconnected")
        assert "hard cap" in dropped["detail"]
        assert running.peers.cmd.request("status")["ok"]
        running.good_pair_within_a_frame_period()
    finally:
        rogue.close(0)
        ctx.term()


def test_a_thread_stuck_inside_the_engine_fails_the_service_and_silences_it(running):
    import threading

    from spineguide.tracking.service.loop import THREAD_STALL_S

    held, release = threading.Event(), threading.Event()

    def stuck_inside_the_engine():
        with running.svc.engine._lock:  # e.g. a judgement that never returns
            held.set()
            release.wait(10.0)

    t = threading.Thread(target=stuck_inside_the_engine)
    t.start()
    try:
        assert held.wait(2.0)
        t0 = time.monotonic()
        # The publisher waits for the engine too: the main thread's watchdog finds it stuck.
        failure = running.svc.run_until(threading.Event(), 5.0)
        assert failure is not None and "publisher made no progress" in failure
        assert time.monotonic() - t0 < THREAD_STALL_S + 2.0  # the allowance, the lock timeout, slack
        running.peers.sub.collect(0.2)  # what was sent before the stall
        n_beats = sum(m["_topic"] == "heartbeat" for _, m in running.peers.sub.messages)
        running.peers.sub.collect(0.3)
        assert sum(m["_topic"] == "heartbeat" for _, m in running.peers.sub.messages) == n_beats  # silent
        assert any("engine lock held" in r["detail"] for r in running.records("error"))
    finally:
        release.set()
        t.join(10.0)
