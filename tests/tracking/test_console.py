"""The live console's server, state model, display and review (fast; no browser).

HTTP is exercised with aiohttp's test client on a plain asyncio loop; the
approval path runs against the real service (pattern method) in this process.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import cv2
import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.registration.pose import Pose
from tests.tracking.console_harness import run_console

from spineguide.tracking.console.config import (
    ConsoleConfig,
    ConsoleConfigError,
    connect_address,
    console_config_from_service,
)
from spineguide.tracking.console.display import (
    SeedOverlay,
    render_frame,
    seed_overlays,
    window_levels,
)
from spineguide.tracking.console.live import LiveState
from spineguide.tracking.console.review import (
    ReviewError,
    resolve_session,
    review_session,
    write_review_html,
)
from spineguide.tracking.console.server import _pair_frame_files
from spineguide.tracking.console.users import LOCKOUT_FAILURES
from spineguide.tracking.errors import FrameError
from spineguide.tracking.service.record import RecordError, SessionRecord, read_record
from spineguide.tracking.sim.rig import SimulatedRoom

pytestmark = pytest.mark.timeout(60)

TOKEN = "unit-test-token-0123456789"
#: Pixel coordinates survive the display scaling to within half a display pixel (rounding to the grid).
DISPLAY_TOL_PX = 0.5
#: Projection of a known point by a known geometry: exact up to float rounding.
PROJECTION_TOL_PX = 1e-9
#: Percentiles computed on the same numbers by numpy: exact up to float rounding.
STATS_TOL = 1e-9
#: Nothing listens here (port 9, discard): an offline console.
NOWHERE = "tcp://127.0.0.1:9"


def _config(**kw) -> ConsoleConfig:
    base = dict(publish_address=NOWHERE, command_address=NOWHERE, port=0, login_token=TOKEN)
    base.update(kw)
    return ConsoleConfig(**base)


def _run(coro_fn, config: ConsoleConfig):
    """Run ``coro_fn(console, client)`` with a connected console behind aiohttp's test client."""
    return run_console(coro_fn, config)


def _gating(seq, t, beam, reason, deviation=None, pair_id=None):
    return {"schema": "gating/1", "seq": seq, "t_unix_s": t, "beam": beam, "reason": reason,
            "valid_until_unix_s": t + 0.2, "pair_id": pair_id, "deviation_mm": deviation}


# ----------------------------------------------------------------- live state
def test_live_state_counts_lost_messages_from_seq_gaps():
    live = LiveState()
    for seq in (0, 1, 2, 5, 6, 10):
        live.on_message("heartbeat", {"seq": seq, "t_unix_s": 100.0 + seq, "state": "IDLE", "phase": None},
                        100.0 + seq, float(seq))
    assert live.lost_messages == 2 + 3


def test_live_state_hold_runs_keep_every_reason():
    live = LiveState()
    seq = iter(range(100))
    for t, beam, reason in [(1, "HOLD", "settling"), (2, "HOLD", "settling"), (3, "ENABLE", "ok"),
                            (4, "HOLD", "out_of_tolerance"), (5, "HOLD", "stale_frame"), (6, "HOLD", "stale_frame")]:
        live.on_message("gating", _gating(next(seq), float(t), beam, reason, 0.5), float(t), float(t))
    runs = [(h.reason, h.count) for h in live.holds]
    assert runs == [("settling", 2), ("out_of_tolerance", 1), ("stale_frame", 2)]


def test_live_state_timeline_is_sent_once_and_trimmed():
    live = LiveState(timeline_s=10.0)
    for i in range(20):
        live.on_message("gating", _gating(i, float(i), "ENABLE", "ok", 0.1 * i, i), float(i), float(i))
    state, cursor = live.snapshot(20.0, 0)
    assert [p[0] for p in state["timeline"]] == [float(i) for i in range(9, 20)]  # within 10 s of the newest
    assert_allclose([p[1] for p in state["timeline"]], [0.1 * i for i in range(9, 20)], rtol=0, atol=STATS_TOL)
    live.on_message("gating", _gating(20, 20.0, "HOLD", "out_of_tolerance", 3.0, 20), 20.0, 20.0)
    state, _ = live.snapshot(20.0, cursor)
    assert state["timeline"] == [[20.0, 3.0, "HOLD", "out_of_tolerance"]]
    assert state["timeline_reset"] is False


def test_live_state_heartbeat_rate_and_message_age():
    live = LiveState()
    for i in range(40):  # 20 Hz for 2 s
        live.on_message("heartbeat", {"seq": i, "t_unix_s": 50.0 + i * 0.05, "state": "SETUP", "phase": "measuring"},
                        50.0 + i * 0.05, i * 0.05)
    assert_allclose(live.heartbeat_rate_hz(1.95), 20.0, rtol=0, atol=STATS_TOL)
    ages = [3.0, 5.0, 9.0]
    for i, a in enumerate(ages):
        live.on_message("gating", _gating(40 + i, 60.0 + i, "HOLD", "not_monitoring"), 60.0 + i + a / 1e3, 3.0 + i)
    age = live.snapshot(5.0)[0]["message_age_ms"]
    assert_allclose([age["last"], age["p50"], age["p95"]], [9.0, 5.0, np.percentile(ages, 95)], rtol=0, atol=1e-6)


def test_live_state_proposal_until_applied_and_approval_mode():
    live = LiveState()
    prop = {"seq": 0, "t_unix_s": 1.0, "pair_id": 3, "translation_mm": [1, 2, 3], "rotation_deg": [0, 0, 0],
            "method": "fiducial", "quality": {"ok": True, "seeds": [{"name": "S1", "found": True, "migrated": False}]},
            "purpose": "proposal", "apply": False}
    live.on_message("heartbeat", {"seq": 0, "t_unix_s": 0.5, "state": "SETUP", "phase": "measuring"}, 0.5, 0.5)
    live.on_message("correction", prop, 1.0, 1.0)
    live.on_message("heartbeat", {"seq": 1, "t_unix_s": 1.1, "state": "SETUP", "phase": "awaiting_approval"}, 1.1, 1.1)
    state = live.snapshot(1.2)[0]
    assert state["proposal"]["pair_id"] == 3 and state["approval_seen"] == "manual"
    assert state["proposal"]["quality"]["seeds_found"] == 1  # per-seed detail is for the frames, not the table
    live.on_message("correction", dict(prop, purpose="setup", apply=True), 1.3, 1.3)
    assert live.snapshot(1.4)[0]["proposal"] is None
    late = LiveState()  # subscribed after the proposal went out: the status reply carries it
    late.on_message("heartbeat", {"seq": 5, "t_unix_s": 2.0, "state": "SETUP", "phase": "awaiting_approval"}, 2, 2)
    assert late.needs_status()
    late.on_reply({"ok": True, "phase": "awaiting_approval", "tolerance_3d_mm": 1.5,
                   "pending_correction": {"pair_id": 4, "translation_mm": [1, 0, 0], "rotation_deg": [0, 0, 0]}})
    assert late.proposal["pair_id"] == 4 and late.tolerance_3d_mm == 1.5 and not late.needs_status()
    auto = LiveState()
    for i, phase in enumerate(("measuring", "awaiting_couch")):
        auto.on_message("heartbeat", {"seq": i, "t_unix_s": i, "state": "SETUP", "phase": phase}, i, i)
    assert auto.approval_seen == "automatic"


# ----------------------------------------------------------------- display
def test_window_maps_the_1st_to_99th_percentile_to_black_white():
    ramp = np.tile(np.arange(128, dtype=np.float32) * 2.0, (128, 1))  # 128 px: the window sees every pixel
    low, high = window_levels(ramp)
    assert_allclose([low, high], np.percentile(ramp, [1, 99]), rtol=0, atol=STATS_TOL)
    shown = cv2.imdecode(np.frombuffer(render_frame(ramp, "A", 0, fmt="png").data, np.uint8), cv2.IMREAD_GRAYSCALE)
    col = 64  # value 128
    expected = (128.0 - low) * 255.0 / (high - low)
    assert abs(int(shown[100, col]) - expected) <= 1  # PNG is lossless; 1 level of rounding
    assert shown[100, 0] == 0 and shown[100, 127] == 255


def test_overlay_marks_land_at_the_scaled_pixel():
    frame = np.full((512, 512), 1000, np.uint16)
    planned = (100.0, 200.0)  # (col, row), full resolution
    out = render_frame(frame, "A", 7, (SeedOverlay("S1", planned, None, None),), display_pixels=256, fmt="png")
    assert out.scale == 0.5 and (out.rows, out.cols) == (256, 256)
    img = cv2.imdecode(np.frombuffer(out.data, np.uint8), cv2.IMREAD_COLOR)
    green = np.argwhere((img[:, :, 1] > 150) & (img[:, :, 2] < 80) & (img[:, :, 0] < 80))
    centre_row_col = green.mean(axis=0)
    expected_col = (planned[0] + 0.5) * out.scale - 0.5
    expected_row = (planned[1] + 0.5) * out.scale - 0.5
    assert_allclose(centre_row_col, [expected_row, expected_col], rtol=0, atol=DISPLAY_TOL_PX)


@pytest.mark.parametrize("pixels, fmt, match", [
    (np.zeros((4, 4, 3)), "jpeg", "2-D frame"),
    (np.full((8, 8), np.nan, np.float32), "jpeg", "NaN"),
    (np.zeros((8, 8)), "gif", "format"),
])
def test_render_frame_refuses_bad_input(pixels, fmt, match):
    with pytest.raises(FrameError, match=match):
        render_frame(pixels, "A", 1, fmt=fmt)


def test_seed_overlays_project_planned_and_estimated_positions():
    geometry = default_stereo_geometry(panel_pixels=256, pixel_spacing_mm=1.6)
    planned = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 8.0]])
    corr_t = np.array([1.0, -2.0, 0.5])  # couch correction: the patient sits at -corr_t (no rotation)
    detected = [12.5, 130.25]
    correction = {"translation_mm": corr_t.tolist(), "rotation_deg": [0.0, 0.0, 0.0], "quality": {"seeds": [
        {"name": "S1", "found": True, "pixels_px": {"A": detected, "B": [1.0, 2.0]}},
        {"name": "S2", "found": False, "pixels_px": None}]}}
    imager = geometry["A"]
    marks = seed_overlays(imager, planned, ("S1", "S2"), correction)
    assert_allclose([m.planned_px for m in marks], imager.project(planned), rtol=0, atol=PROJECTION_TOL_PX)
    assert_allclose([m.predicted_px for m in marks], imager.project(planned - corr_t), rtol=0, atol=1e-6)
    assert marks[0].detected_px == tuple(detected) and marks[1].detected_px is None
    assert all(m.detected_px is None and m.predicted_px is None
               for m in seed_overlays(imager, planned, ("S1", "S2"), None))


# ----------------------------------------------------------------- config
@pytest.mark.parametrize("kw, match", [
    ({"host": "0.0.0.0"}, "not a loopback address"),
    ({"login_token": "short"}, "at least 16"),
    ({"publish_address": "http://x"}, "publish_address"),
    ({"port": 70000}, "port"),
    ({"approval": "sometimes"}, "approval"),
    ({"display_pixels": 8}, "display_pixels"),
    ({"correction_limit_mm": -1.0}, "correction_limit_mm"),
])
def test_console_config_refuses(kw, match):
    with pytest.raises(ConsoleConfigError, match=match):
        _config(**kw)


def test_remote_host_needs_explicit_permission():
    assert _config(host="0.0.0.0", allow_remote=True).host == "0.0.0.0"


def test_connect_address():
    assert connect_address("tcp://*:5556") == "tcp://127.0.0.1:5556"
    assert connect_address("tcp://127.0.0.1:5556") == "tcp://127.0.0.1:5556"
    with pytest.raises(ConsoleConfigError, match="random port"):
        connect_address("tcp://127.0.0.1:0")


def test_config_from_service_takes_limits_record_and_approval(tmp_path):
    from spineguide.tracking.service.config import config_from_dict

    svc = config_from_dict({"endpoints": {"publish": "tcp://*:6001", "command": "tcp://127.0.0.1:6002",
                                          "frames": "tcp://127.0.0.1:6003"},
                            "safety": {"correction_limit_mm": 20.0, "tolerance_3d_mm": 1.5},
                            "record": {"path": str(tmp_path / "s.jsonl"), "raw_frames": True},
                            "security": {"enabled": False}})
    c = console_config_from_service(svc, port=0)
    assert (c.publish_address, c.command_address) == ("tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002")
    assert c.frames_folder == tmp_path / "s.jsonl.frames" and c.records_folder == tmp_path
    assert (c.correction_limit_mm, c.tolerance_3d_mm, c.approval) == (20.0, 1.5, "manual")
    assert c.planned is None  # pattern plan: no seeds
    assert c.plans == () and c.record_path == tmp_path / "s.jsonl"  # pattern plan: nothing to offer
    assert c.approval_max_age_s == 30.0


# ----------------------------------------------------------------- HTTP + auth
def test_page_and_static_files_are_served():
    async def check(console, client):
        page = await client.get("/")
        js = await client.get("/static/console.js")
        missing = await client.get("/static/../config.py")
        cfg = await (await client.get("/api/config")).json()
        return page.status, await page.text(), js.status, missing.status, cfg

    status, text, js_status, missing, cfg = _run(check, _config(approval="automatic"))
    assert status == 200 and 'id="beam"' in text and js_status == 200 and missing == 404
    assert cfg["approval"] == "automatic" and cfg["commands_enabled"] is True


@pytest.mark.parametrize("headers, match", [
    ({"Origin": "http://evil.example"}, "cross-origin"),
    ({"Host": "rebound.example:8080"}, "loopback names only"),
])
def test_foreign_origin_and_host_are_refused(headers, match):
    async def check(console, client):
        feed = await client.get("/ws", headers=headers)
        login = await client.post("/api/login", json={"operator": "Jane", "token": TOKEN}, headers=headers)
        return feed.status, login.status, await login.text()

    feed, login, text = _run(check, _config())
    assert feed == 403 and login == 403 and match in text


@pytest.mark.parametrize("body, status, match", [
    ({"operator": "Jane", "token": "wrong-token-0123456789"}, 401, "wrong login token"),
    ({"operator": "", "token": TOKEN}, 400, "operator name"),
    ({"operator": "x" * 65, "token": TOKEN}, 400, "operator name"),
    ({"operator": "Jane", "token": None}, 401, "wrong login token"),
])
def test_login_refusals(body, status, match):
    async def check(console, client):
        r = await client.post("/api/login", json=body)
        return r.status, await r.json()

    got, out = _run(check, _config())
    assert got == status and match in out["error"]


def test_login_lockout_is_per_user():
    # Repeated failures lock the name tried, and only that name: an attacker cannot lock everyone out.
    async def check(console, client):
        for _ in range(LOCKOUT_FAILURES):
            await client.post("/api/login", json={"operator": "Jane", "token": "guess-guess-guess-1"})
        locked = await client.post("/api/login", json={"operator": "Jane", "token": TOKEN})
        other = await client.post("/api/login", json={"operator": "Sam", "token": TOKEN})
        return locked.status, await locked.json(), other.status

    status, out, other = _run(check, _config())
    assert status == 429 and "failed logins for 'Jane'" in out["error"]
    assert other == 200


def test_read_only_console_refuses_login_and_commands():
    async def check(console, client):
        login = await client.post("/api/login", json={"operator": "Jane", "token": TOKEN})
        cmd = await client.post("/api/command", json={"command": "pause"}, headers={"Authorization": "Bearer x"})
        return login.status, (await login.json())["error"], cmd.status

    login, error, cmd = _run(check, _config(login_token=None))
    assert login == 403 and "read-only" in error and cmd == 403


@pytest.mark.parametrize("body, headers, status, match", [
    ({"command": "pause"}, {}, 401, "log in first"),
    ({"command": "pause"}, {"Authorization": "Bearer not-a-session"}, 401, "log in first"),
    ({"command": "set_tolerance"}, None, 400, "cannot be sent from the console"),
    ({"command": "couch_moved"}, None, 400, "cannot be sent from the console"),
    ({"command": "load_plan"}, None, 400, "no plan is offered"),
    ({"command": "pause", "params": {"x": 1}}, None, 400, "takes params"),
    ({"command": "approve_correction", "params": {"pair_id": -3}}, None, 400, "pair_id"),
    ({"command": "approve_correction", "params": {"operator": "Mallory"}}, None, 400, "takes params"),
    ({"command": "approve_correction", "params": {}}, None, 400, "must name the proposal's pair_id"),
])
def test_command_refusals(body, headers, status, match):
    async def check(console, client):
        login = await (await client.post("/api/login", json={"operator": "Jane", "token": TOKEN})).json()
        h = headers if headers is not None else {"Authorization": f"Bearer {login['session']}"}
        r = await client.post("/api/command", json=body, headers=h)
        return r.status, await r.json()

    got, out = _run(check, _config())
    assert got == status and match in out["error"]


@pytest.mark.slow  # waits out the command socket's timeout
def test_command_to_an_absent_service_is_a_502():
    async def check(console, client):
        login = await (await client.post("/api/login", json={"operator": "Jane", "token": TOKEN})).json()
        r = await client.post("/api/command", json={"command": "pause"},
                              headers={"Authorization": f"Bearer {login['session']}"})
        return r.status, await r.json()

    status, out = _run(check, _config())
    assert status == 502 and "no reply from the service" in out["error"]


def test_malformed_request_body_is_a_400():
    async def check(console, client):
        r = await client.post("/api/login", data=b"not json", headers={"Content-Type": "application/json"})
        return r.status, await r.text()

    status, text = _run(check, _config())
    assert status == 400 and "JSON object" in text


def test_websocket_sends_the_newest_state_and_never_a_backlog():
    async def check(console, client):
        ws = await client.ws_connect("/ws")
        first = json.loads((await ws.receive()).data)
        n = 1000
        for i in range(n):  # the loop cannot send while this runs: the client must get the newest, not all
            console.on_message("gating", _gating(i, 100.0 + i, "HOLD", "out_of_tolerance", 3.0, i), 100.0 + i, i)
        states = []
        while True:
            msg = json.loads((await asyncio.wait_for(ws.receive(), 5.0)).data)
            states.append(msg)
            if msg["gating"] and msg["gating"]["seq"] == n - 1:
                break
        await ws.close()
        return first, states

    first, states = _run(check, _config(timeline_s=2000.0))
    assert first["type"] == "state" and first["gating"] is None
    assert len(states) <= 3  # coalesced, not 1000 messages
    assert states[-1]["gating"]["reason"] == "out_of_tolerance"
    assert sum(len(s["timeline"]) for s in states) == 1000  # every timeline point still arrives, once


# ----------------------------------------------------------------- approval through the real service
def test_approval_reaches_the_service_and_is_recorded_with_the_operator(tmp_path):
    # CURVE end to end: the service's operator is the console's key ("console", therapist); the name
    # typed at login is recorded beside it as the console's own statement.
    room = SimulatedRoom(tmp_path, setup_error=Pose.from_six((2.0, 1.0, -1.0), (0, 0, 0)), approval="manual")
    room.start()
    try:
        config = _config(publish_address=room.endpoints["publish"], command_address=room.endpoints["command"],
                         client_keys=room.console_keys)

        async def check(console, client):
            deadline = time.monotonic() + 10.0
            while not (console.live.heartbeat and console.live.heartbeat.get("phase") == "awaiting_approval"
                       and console.live.proposal):
                assert time.monotonic() < deadline, "no proposal within 10 s"
                await asyncio.sleep(0.05)
            login = await (await client.post("/api/login", json={"operator": "Jane Doe", "token": TOKEN})).json()
            pid = console.live.proposal["pair_id"]
            r = await client.post("/api/command", json={"command": "approve_correction", "params": {"pair_id": pid}},
                                  headers={"Authorization": f"Bearer {login['session']}"})
            return pid, await r.json()

        pid, reply = _run(check, config)
        assert reply["ok"] is True and reply["phase"] == "awaiting_couch" and reply["approved_pair_id"] == pid
        assert reply["approved_by"] == "console"
    finally:
        room.stop()
    approvals = [r for r in read_record(tmp_path / "session.jsonl")
                 if r["event"] == "command" and r["command"] == "approve_correction"]
    assert len(approvals) == 1
    assert approvals[0]["params"] == {"pair_id": pid, "console_user": "Jane Doe", "console_role": "therapist",
                                      "operator": "console", "role": "therapist"}
    assert approvals[0]["t_unix_s"] > 0 and approvals[0]["reply"]["ok"] is True


# ----------------------------------------------------------------- review + QA
def _write_session(path):
    rec = SessionRecord(path)
    rec.write("session", t_unix_s=1000.0, t_mono_s=0.0, config={"safety": {"tolerance_3d_mm": 1.0}})
    gating = [(1001.0, "HOLD", "not_monitoring", None, None), (1002.0, "ENABLE", "ok", 0.3, 10.0),
              (1003.0, "HOLD", "out_of_tolerance", 3.1, 20.0), (1004.0, "HOLD", "out_of_tolerance", 3.0, 30.0),
              (1005.0, "ENABLE", "ok", 0.2, 40.0)]
    for i, (t, beam, reason, dev, lat) in enumerate(gating):
        extra = {} if lat is None else {"latency_ms": lat}
        rec.write("sent", t_unix_s=t, t_mono_s=t - 1000.0, seq=i, topic="gating", **extra,
                  body=_gating(i, t, beam, reason, dev, i))
    rec.write("sent", t_unix_s=1001.5, t_mono_s=1.5, seq=9, topic="correction",
              body={"seq": 9, "t_unix_s": 1001.5, "pair_id": 1, "translation_mm": [0.3, -0.4, 0.0],
                    "rotation_deg": [0.1, 0.0, -0.2], "purpose": "verified", "method": "fiducial",
                    "quality": {"ok": True}})
    rec.write("command", t_unix_s=1001.2, t_mono_s=1.2, command="approve_correction",
              params={"pair_id": 0, "operator": "Jane Doe"}, reply={"ok": True, "reason": None})
    rec.write("pair", t_unix_s=1002.0, t_mono_s=2.0, pair_id=1)
    rec.close()


def test_review_of_a_recorded_session(tmp_path):
    _write_session(tmp_path / "s1.jsonl")
    rev = review_session(tmp_path / "s1.jsonl")
    assert [(h["reason"], h["count"]) for h in rev.holds] == [("not_monitoring", 1), ("out_of_tolerance", 2)]
    assert_allclose(rev.latency_ms, [10.0, 20.0, 30.0, 40.0], rtol=0, atol=STATS_TOL)
    assert rev.beam == ("HOLD", "ENABLE", "HOLD", "HOLD", "ENABLE")
    assert math.isnan(rev.deviation_mm[0])
    assert_allclose(rev.setup_residuals[0]["norm_mm"], 0.5, rtol=0, atol=STATS_TOL)  # |(0.3, -0.4, 0)|
    assert rev.commands[0]["operator"] == "Jane Doe" and rev.pairs == 1 and rev.tolerance_3d_mm == 1.0
    summary = rev.to_json()
    assert_allclose(summary["latency_ms"]["p95"], np.percentile([10, 20, 30, 40], 95), rtol=0, atol=STATS_TOL)
    doc = write_review_html(rev, tmp_path / "review.html")
    assert (tmp_path / "review.html").read_text() == doc
    assert 'id="review-timeline"' in doc and 'id="review-latency"' in doc and "Jane Doe" in doc


def test_review_refuses_a_file_that_is_not_a_session(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"event": "frame"}\n')
    with pytest.raises(ReviewError, match="not a session record"):
        review_session(tmp_path / "x.jsonl")
    with pytest.raises(RecordError, match="cannot read"):
        review_session(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name", ["../etc.jsonl", "missing.jsonl", "notes.txt"])
def test_review_names_stay_inside_the_records_folder(tmp_path, name):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ReviewError, match="no recorded session"):
        resolve_session(tmp_path, name)


def test_review_and_sessions_over_http(tmp_path):
    _write_session(tmp_path / "s1.jsonl")
    (tmp_path / "other.jsonl").write_text('{"event": "frame"}\n')

    async def check(console, client):
        sessions = await (await client.get("/api/sessions")).json()
        page = await client.get("/review/s1.jsonl?download=1")
        data = await (await client.get("/api/review/s1.jsonl")).json()
        missing = await client.get("/review/nope.jsonl")
        return sessions, page.status, page.headers.get("Content-Disposition"), await page.text(), data, missing.status

    sessions, status, disposition, text, data, missing = _run(check, _config(records_folder=tmp_path))
    assert [s["name"] for s in sessions["sessions"]] == ["s1.jsonl"]
    assert status == 200 and "s1-review.html" in disposition and "out_of_tolerance" in text
    assert data["pairs"] == 1 and missing == 404


def test_qa_view_shows_the_trend_and_the_calibration_report(tmp_path):
    hist = tmp_path / "qa.jsonl"
    with open(hist, "w") as fh:
        fh.writelines(json.dumps({"schema": "qa-record/1", "performed_unix_s": 1.7e9 + day * 86400.0, "status": "pass",
                                 "centre_offset_distance_mm": offset, "imagers": {"A": {"rms_mm": 0.1}},
                                 "tolerances": {"offset_action_mm": 0.5}}) + "\n"
                      for day, offset in enumerate(0.10 + 0.05 * np.arange(8)))  # 8 days: a trend needs >= 7
    report = tmp_path / "cal"
    report.mkdir()
    (report / "index.html").write_text("<html>calibration</html>")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")

    async def check(console, client):
        page = await (await client.get("/qa")).text()
        cal = await client.get("/calibration/index.html")
        escape = await client.get("/calibration/..%2Fqa.jsonl")
        return page, cal.status, await cal.text(), escape.status

    page, cal_status, cal_text, escape = _run(check, _config(qa_history=hist, calibration_report=report))
    # offsets rise 0.05 mm a day: 1.5 mm per 30 days
    assert "1.500 mm per 30 days" in page and "id='qa-trend'" in page and "data:image/png;base64," in page
    assert cal_status == 200 and cal_text == "<html>calibration</html>" and escape == 404
    page, *_ = _run(check, _config(qa_history=bad))
    assert "not valid JSON" in page


def test_console_cli_needs_a_service_config_and_a_readable_token(tmp_path):
    import argparse

    from spineguide.tracking.cli import console as _cli_console

    parser = argparse.ArgumentParser()
    _cli_console.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["console", "--port", "0"])
    with pytest.raises(ConsoleConfigError, match="--service-config"):
        _cli_console.build_console_config(args)
    args = parser.parse_args(["console", "--token-file", str(tmp_path / "none.txt")])
    with pytest.raises(ConsoleConfigError, match="cannot read the login token"):
        _cli_console.build_console_config(args)


# ----------------------------------------------------------------- anatomy overlay
def _gradient(frame: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    lint = -np.log(np.maximum(frame.astype(np.float32), 1.0))
    small = cv2.resize(lint, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return np.hypot(cv2.Sobel(small, cv2.CV_32F, 1, 0), cv2.Sobel(small, cv2.CV_32F, 0, 1))


def _best_shift(edges: np.ndarray, gradient: np.ndarray, reach: int = 4) -> tuple[int, int]:
    """The (drow, dcol) shift of the edge mask that puts it on the strongest image gradients."""
    scores = {(dr, dc): gradient[np.roll(edges, (dr, dc), axis=(0, 1))].mean()
              for dr in range(-reach, reach + 1) for dc in range(-reach, reach + 1)}
    return max(scores, key=scores.get)


def test_drr_edges_sit_on_the_vertebra_at_the_estimated_pose():
    from spineguide.registration.anatomy import RegionOfInterest
    from spineguide.registration.drr import AttenuationVolume
    from tests.synthetic import small_geometry, small_thoracolumbar
    from spineguide.tracking.console.display import AnatomyOverlay, drr_edges, render_frame
    from spineguide.tracking.room import DetectorModel, KVSimulator

    phantom, geometry = small_thoracolumbar(with_seeds=False), small_geometry(256, 1.6)
    roi = RegionOfInterest.from_labels(phantom.planning_ct, phantom.labels, phantom.target_label)
    overlay = AnatomyOverlay(
        AttenuationVolume.from_ct(phantom.planning_ct, phantom.isocentre_lps_mm).masked(roi.mask), geometry)
    true = Pose.from_six([4.0, -3.0, 2.0], [1.0, 0.0, -1.0])
    frames = KVSimulator(phantom, geometry, detector=DetectorModel(noise=False)).render(true, seed=1).frames
    shape = (128, 128)  # display pixels: 3.2 mm on the panel, ~2 mm at the isocentre
    for name in geometry.names:
        edges = drr_edges(overlay, name, true, shape)
        assert edges.sum() > 50
        gradient = _gradient(frames[name], shape)
        # Drawn at the estimated (here: true) pose, the edges lie on the vertebra's own edges:
        # no shift of the overlay puts them on stronger gradients (within one display pixel).
        dr, dc = _best_shift(edges, gradient)
        assert abs(dr) <= 1 and abs(dc) <= 1, (name, dr, dc)
        # Drawn at a pose 10 mm off along room X (across the spine, along both panels' columns at
        # 45 degrees: 10 * cos 45 * 1.64 / 3.2 = 3.6 display px), the edges need that shift back.
        off = drr_edges(overlay, name, Pose.from_six([14.0, -3.0, 2.0], [1.0, 0.0, -1.0]), shape)
        assert 2 <= abs(_best_shift(off, gradient, reach=6)[1]) <= 5
        shown = render_frame(frames[name].astype(np.float32), name, 1, (), 128, fmt="png",
                             edges=lambda size, e=edges: e)
        assert shown.rows == 128 and shown.mime == "image/png"


def test_anatomy_plan_gives_the_console_its_overlay_and_the_pose_of_a_correction(tmp_path):
    from spineguide.calibration.io import write_geometry
    from spineguide.registration.ctfile import write_ct
    from tests.synthetic import small_geometry, small_thoracolumbar
    from spineguide.tracking.console.config import console_config_from_service
    from spineguide.tracking.console.display import AnatomyOverlay
    from spineguide.tracking.console.server import _pose_of
    from spineguide.tracking.service.config import PlanConfig, ServiceConfig

    phantom = small_thoracolumbar(with_seeds=False)
    plan = PlanConfig(method="anatomy", geometry=write_geometry(small_geometry(), tmp_path / "g.json"),
                      ct=write_ct(phantom.planning_ct, tmp_path / "ct.mha"),
                      isocentre_lps_mm=tuple(float(v) for v in phantom.isocentre_lps_mm))
    config = console_config_from_service(ServiceConfig(plan=plan), publish_address="tcp://127.0.0.1:1",
                                         command_address="tcp://127.0.0.1:2")
    assert isinstance(config.anatomy, AnatomyOverlay) and config.planned is None
    # correction/1 carries the couch correction; the overlay needs the patient pose, its inverse.
    pose = _pose_of({"translation_mm": [-1.0, 0.0, 0.0], "rotation_deg": [0.0, 0.0, 0.0]})
    assert_allclose(pose.translation_mm, [1.0, 0.0, 0.0], rtol=0, atol=1e-12)
    assert _pose_of(None) is None and _pose_of({"translation_mm": "x"}) is None


@pytest.mark.parametrize("kw, match", [
    ({"timeline_s": 1e9}, r"\[console\] timeline_s must be a finite number in \(0, 3600\] s"),
    ({"tolerance_3d_mm": 50.0}, r"\[console\] tolerance_3d_mm must be a finite number in \(0, 5\] mm"),
    ({"correction_limit_deg": 45.0}, r"\[console\] correction_limit_deg must be .*\(0, 10\] deg"),
    ({"port": True}, r"\[console\] port must be a whole number in \[0, 65535\]"),
    ({"command_address": "tcp://127.0.0.1:99999"}, "port 99999 is outside 0..65535"),
])
def test_console_numbers_are_bounded_like_the_service_ones(kw, match):
    with pytest.raises(ConsoleConfigError, match=match):
        _config(**kw)


def test_console_simulate_connects_with_the_rooms_console_key(tmp_path):
    import argparse

    from spineguide.tracking.cli import console as _cli_console
    from spineguide.tracking.service.config import config_from_dict
    from spineguide.tracking.service.security import ClientKeys

    class Room:  # what build_console_config reads of a SimulatedRoom
        config = config_from_dict({"plan": {"method": "pattern"}, "security": {"enabled": False}})
        endpoints = {"publish": "tcp://127.0.0.1:6001", "command": "tcp://127.0.0.1:6002"}
        console_keys = ClientKeys(tmp_path / "console.key_secret", tmp_path / "server.key")

    parser = argparse.ArgumentParser()
    _cli_console.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["console", "--port", "0", "--simulate"])
    config = _cli_console.build_console_config(args, Room())
    assert config.client_keys == Room.console_keys and config.command_address == "tcp://127.0.0.1:6002"
    Room.console_keys = None  # an insecure room: no keys to connect with
    assert _cli_console.build_console_config(args, Room()).client_keys is None


def test_frames_of_a_pair_come_from_its_newest_epoch_only(tmp_path):
    # After an imager restart the record names the same pair id again with an epoch prefix
    # (SessionRecord.save_frame); the console shows the newest epoch's frames, never a mix of two.
    for name in ("00000005_A.npy", "00000005_B.npy", "e2_00000005_A.npy", "e2_00000005_B.npy", "e3_00000005_A.npy",
                 "100000005_A.npy", "00000005_A.1.npy", "e1_00000006_B.npy"):
        (tmp_path / name).write_bytes(b"")
    assert {k: v.name for k, v in _pair_frame_files(tmp_path, 5).items()} == {"A": "e3_00000005_A.npy"}
    (tmp_path / "e3_00000005_B.npy").write_bytes(b"")
    assert {k: v.name for k, v in _pair_frame_files(tmp_path, 5).items()} == \
        {"A": "e3_00000005_A.npy", "B": "e3_00000005_B.npy"}
    assert {k: v.name for k, v in _pair_frame_files(tmp_path, 100000005).items()} == {"A": "100000005_A.npy"}
    assert _pair_frame_files(tmp_path, 7) == {} and _pair_frame_files(tmp_path / "missing", 5) == {}



def test_a_dicom_fiducial_plan_gives_the_console_the_services_seeds(tmp_path):
    """Issue 17 item 6: the console loaded the plan by its own rules (CT + fiducials files) and crashed on a DICOM plan."""
    from spineguide.tracking.console.config import console_config_from_service
    from spineguide.tracking.room.io import write_simulation
    from spineguide.tracking.service.config import PlanConfig, ServiceConfig
    from spineguide.tracking.service.plan import load_treatment_plan
    from tests.synthetic import small_geometry, small_thoracolumbar

    write_simulation(tmp_path, small_thoracolumbar(), 1, seed=1, geometry=small_geometry())
    plan = PlanConfig(method="fiducial", geometry=tmp_path / "geometry.json", dicom=tmp_path / "dicom")
    config = console_config_from_service(ServiceConfig(plan=plan), publish_address="tcp://127.0.0.1:1",
                                         command_address="tcp://127.0.0.1:2")
    service = load_treatment_plan(plan)
    assert list(config.planned.names) == list(service.fiducials.names)
    assert_allclose(config.planned.points_room_mm, service.fiducials_room_mm(), rtol=0, atol=1e-9)
    # The page offers this plan for load_plan, named by the DICOM patient identity the service loads.
    (entry,) = config.plans
    assert entry.patient_id == service.patient.patient_id.strip() and entry.plan_id == "dicom"
    assert entry.patient_position == service.patient_position.value and entry.method == "fiducial"
