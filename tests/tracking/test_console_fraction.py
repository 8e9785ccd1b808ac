"""The console's fraction lifecycle, users and security, approval checks, journal, reasons and report (fast).

HTTP through aiohttp's test client (no service: commands that pass the console's own checks then fail to
reach the absent service, which proves they were let through); the fuzz cases post hypothesis-made JSON
to a console in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spineguide.registration.volume import PatientPosition, room_from_lps_matrix
from tests.tracking.console_harness import run_console

from spineguide.tracking.console.config import ConsoleConfig, ConsoleConfigError
from spineguide.tracking.console.fraction import PATIENT_DIRECTIONS, PlanEntry, direction_words
from spineguide.tracking.console.reasons import REASONS, describe_reason
from spineguide.tracking.console.review import (
    ReviewError,
    read_signoff,
    review_session,
    sign_off,
    write_report_pdf,
    write_review_html,
)
from spineguide.tracking.console.server import (
    CSRF_HEADER,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    ConsoleServer,
    ConsoleThread,
    LoginSession,
    _check_approval,
)
from spineguide.tracking.console.users import LoginGuard, UserStore, add_user
from spineguide.tracking.service.record import SessionRecord

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
NOWHERE = "tcp://127.0.0.1:9"
PASSWORDS = {"tina": "therapist-pass-0123", "phil": "physicist-pass-0123", "ada": "admin-pass-012345"}
PLAN = PlanEntry("PAT-1", "DOE^JANE", "T12-SBRT", "fiducial", "/plans/T12", "HFS")


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "console-users.json"
    for name, role in (("tina", "therapist"), ("phil", "physicist"), ("ada", "admin")):
        add_user(path, name, role, PASSWORDS[name])
    return UserStore.read(path)


def _config(users=None, **kw) -> ConsoleConfig:
    base = dict(publish_address=NOWHERE, command_address=NOWHERE, port=0, users=users, plans=(PLAN,))
    base.update(kw)
    return ConsoleConfig(**base)


def _run(coro_fn, config: ConsoleConfig):
    return run_console(coro_fn, config, offer_plans=True)


async def _login(client, name):
    r = await client.post("/api/login", json={"operator": name, "password": PASSWORDS[name]})
    body = await r.json()
    assert r.status == 200, body
    return {"Authorization": f"Bearer {body['session']}"}


# ----------------------------------------------------------------- reasons
def _protocol_reason_codes() -> set[str]:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    section = text.split("## Reason codes", 1)[1].split("\n## ", 1)[0]
    codes: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            codes |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return codes


def test_every_protocol_reason_has_plain_words_and_no_other():
    codes = _protocol_reason_codes()
    assert len(codes) > 20
    assert set(REASONS) == codes
    for r in REASONS.values():
        assert r.text.endswith(".") and r.action.endswith(".") and r.category in ("ok", "routine", "safety")


def test_unknown_reason_is_a_safety_hold_never_routine():
    r = describe_reason("new_reason_from_a_newer_service")
    assert r.category == "safety" and "new_reason_from_a_newer_service" in r.text


# ----------------------------------------------------------------- direction words
_LPS_WORDS = {(0, 1): "left", (0, -1): "right", (1, 1): "posterior", (1, -1): "anterior",
              (2, 1): "superior", (2, -1): "inferior"}


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_direction_words_follow_the_ct_to_room_rotation(position):
    # Room +X/+Y/+Z expressed in LPS by the registration's own rotation: the words must name that direction.
    m = room_from_lps_matrix(PatientPosition(position))
    for axis in range(3):
        lps = m.T[:, axis]  # the room axis in LPS (m is a rotation)
        k = int(np.argmax(np.abs(lps)))
        assert PATIENT_DIRECTIONS[position][axis][0] == _LPS_WORDS[(k, int(np.sign(lps[k])))]
        assert PATIENT_DIRECTIONS[position][axis][1] == _LPS_WORDS[(k, -int(np.sign(lps[k])))]


def test_direction_words_of_a_correction():
    assert direction_words([-2.06, 1.48, -0.94], "HFS") == ["2.1 mm right", "1.5 mm superior", "0.9 mm posterior"]
    assert direction_words([0.01, 0, 1], None) == ["0.0 mm", "0.0 mm", "1.0 mm up"]


def test_plan_entry_refusals():
    with pytest.raises(ConsoleConfigError, match="patient position"):
        PlanEntry("P", "N", "PL", "fiducial", "src", "LFP")
    with pytest.raises(ConsoleConfigError, match="patient_id"):
        PlanEntry("", "N", "PL", "fiducial", "src", "HFS")
    with pytest.raises(ConsoleConfigError, match="share"):
        _config(plans=(PLAN, PLAN))


# ----------------------------------------------------------------- users
def test_users_file_holds_argon2_hashes_and_checks_passwords(users, tmp_path):
    assert users.verify("tina", PASSWORDS["tina"]).role == "therapist"
    assert users.verify("tina", PASSWORDS["phil"]) is None
    assert users.verify("nobody", PASSWORDS["tina"]) is None
    assert users.verify("tina", None) is None
    text = json.dumps({n: u.password_hash for n, u in users.users.items()})
    assert "$argon2id$" in text and not any(p in text for p in PASSWORDS.values())
    path = tmp_path / "u.json"
    add_user(path, "x", "therapist", "0123456789")
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(ConsoleConfigError, match="role"):
        add_user(path, "y", "root", "0123456789")
    with pytest.raises(ConsoleConfigError, match="password"):
        add_user(path, "y", "therapist", "short")


@pytest.mark.parametrize("doc, match", [
    ({"schema": "console-users/2", "users": []}, "not a console-users/1"),
    ({"schema": "console-users/1", "users": []}, "no users"),
    ({"schema": "console-users/1", "users": [{"name": "a b", "role": "therapist", "password_hash": "$argon2id$"}]},
     "user name"),
    ({"schema": "console-users/1", "users": [{"name": "a", "role": "god", "password_hash": "$argon2id$"}]}, "role"),
    ({"schema": "console-users/1", "users": [{"name": "a", "role": "admin", "password_hash": "plain"}]},
     "not an argon2 hash"),
])
def test_users_file_refusals(tmp_path, doc, match):
    path = tmp_path / "u.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConsoleConfigError, match=match):
        UserStore.read(path)


def test_lockout_is_per_name_and_ends():
    g = LoginGuard(failures=3, window_s=60.0, lockout_s=10.0)
    for t in (0.0, 1.0, 2.0):
        g.failed("eve", t)
    assert g.locked_for_s("eve", 3.0) == pytest.approx(9.0)
    assert g.locked_for_s("tina", 3.0) == 0.0
    assert g.locked_for_s("eve", 12.5) == 0.0
    g.failed("sam", 0.0)
    g.failed("sam", 100.0)  # outside the window: the first one is forgotten
    g.failed("sam", 101.0)
    assert g.locked_for_s("sam", 101.0) == 0.0


# ----------------------------------------------------------------- HTTP: headers, cookie login, roles
def test_security_headers_on_every_response(users):
    async def check(console, client):
        out = {}
        for path in ("/", "/api/config", "/static/console.js", "/static/nope.js", "/api/session"):
            r = await client.get(path)
            out[path] = (r.status, dict(r.headers))
        return out

    for path, (status, headers) in _run(check, _config(users)).items():
        for k, v in SECURITY_HEADERS.items():
            assert headers.get(k) == v, (path, k)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert _run(check, _config(users))["/api/config"][1]["Cache-Control"] == "no-store"


def test_cookie_login_survives_reload_needs_csrf_and_logs_out(users):
    async def check(console, client):
        r = await client.post("/api/login", json={"operator": "tina", "password": PASSWORDS["tina"]})
        body = await r.json()
        cookie = r.headers["Set-Cookie"]
        who = await (await client.get("/api/session")).json()  # a "reload": only the cookie
        no_csrf = await client.post("/api/command", json={"command": "pause"})
        bad_csrf = await client.post("/api/command", json={"command": "pause"}, headers={CSRF_HEADER: "x"})
        with_csrf = await client.post("/api/command", json={"command": "load_plan", "params": {}},
                                      headers={CSRF_HEADER: body["csrf"]})
        out = await client.post("/api/logout", headers={CSRF_HEADER: body["csrf"]})
        after = await (await client.get("/api/session")).json()
        return (cookie, who, no_csrf.status, bad_csrf.status, with_csrf.status, await with_csrf.json(),
                out.status, after, len(console.sessions))

    cookie, who, no_csrf, bad_csrf, with_csrf, err, out, after, n = _run(check, _config(users))
    assert SESSION_COOKIE in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert who["operator"] == "tina" and who["role"] == "therapist"
    assert no_csrf == 401 and bad_csrf == 401
    assert with_csrf == 400 and "patient_id" in err["error"]  # authenticated: on to the command's own checks
    assert out == 200 and after["operator"] is None and n == 0


@pytest.mark.parametrize("user, body, status, match", [
    ("ada", {"command": "pause"}, 403, "ada (admin) may not send 'pause'"),
    ("tina", {"command": "set_tolerance"}, 400, "cannot be sent"),
    ("tina", {"command": "load_plan", "params": {"patient_id": "PAT-2", "plan_id": "T12-SBRT", "fraction": 1}},
     400, "no plan"),
    ("tina", {"command": "load_plan", "params": {"patient_id": "PAT-1", "plan_id": "T12-SBRT", "fraction": 0}},
     400, "fraction"),
    ("tina", {"command": "load_plan", "params": {"patient_id": "PAT-1", "plan_id": "T12-SBRT", "fraction": True}},
     400, "fraction"),
    ("tina", {"command": "load_plan", "params": {"patient_id": "PAT-1", "plan_id": "T12-SBRT", "fraction": "3"}},
     400, "fraction"),
    ("tina", {"command": "load_plan", "params": {"patient_id": "PAT-1", "plan_id": "T12-SBRT", "fraction": 100}},
     400, "fraction"),
    ("tina", {"command": "load_plan", "params": {"patient_id": "PAT-1", "plan_id": "T12-SBRT", "fraction": 2,
                                                 "x": 1}}, 400, "takes params"),
    ("tina", {"command": "approve_correction", "params": {"pair_id": 4}}, 409, "no proposal"),
    ("tina", {"command": "approve_correction", "params": {"pair_id": 4, "level": 3}}, 400, "level must be"),
    ("tina", {"command": "approve_correction", "params": {"pair_id": 4, "level": "L1\n"}}, 400, "level must be"),
    ("tina", {"command": "approve_correction", "params": {"pair_id": 4, "level": "L1"}}, 409, "no proposal"),
    pytest.param("tina", {"command": "load_plan", "params": {"patient_id": "PAT-1", "plan_id": "T12-SBRT",
                                                             "fraction": 2}},
                 502, "no reply from the service",  # every console check passed: it went to the (absent) service
                 marks=pytest.mark.slow),  # waits out the command timeout
])
def test_page_command_checks(users, user, body, status, match):
    async def check(console, client):
        r = await client.post("/api/command", json=body, headers=await _login(client, user))
        return r.status, await r.json()

    got, out = _run(check, _config(users))
    assert got == status and match in out["error"]


def _fake_console(config, proposal):
    class Live:
        pass

    c = type("C", (), {})()
    c.config, c.live, c.first_approval = config, Live(), None
    c.live.proposal = proposal
    return c


def test_approval_refused_when_expired_or_for_another_pair():
    config = _config(approval_max_age_s=30.0)
    tina = LoginSession("tina", "therapist", 1e9, "c")
    c = _fake_console(config, {"pair_id": 7, "t_unix_s": 1000.0, "translation_mm": [1, 0, 0], "rotation_deg": [0, 0, 0]})
    assert _check_approval(c, tina, 7, 1029.0) == (200, None, {})
    status, error, _ = _check_approval(c, tina, 7, 1031.0)
    assert status == 409 and "expired" in error
    status, error, _ = _check_approval(c, tina, 6, 1001.0)
    assert status == 409 and "pair 7, not 6" in error


def test_large_correction_needs_a_second_user_who_is_a_physicist():
    config = _config(second_signoff_mm=2.0, second_signoff_deg=1.0)
    tina = LoginSession("tina", "therapist", 1e9, "c")
    tom = LoginSession("tom", "therapist", 1e9, "c")
    phil = LoginSession("phil", "physicist", 1e9, "c")
    small = {"pair_id": 3, "t_unix_s": 1000.0, "translation_mm": [1.9, 0, 0], "rotation_deg": [0, 0, 0.9]}
    assert _check_approval(_fake_console(config, small), tina, 3, 1001.0) == (200, None, {})
    for big in ({"translation_mm": [1.5, 1.5, 0], "rotation_deg": [0, 0, 0]},
                {"translation_mm": [0, 0, 0], "rotation_deg": [0, -1.2, 0]}):
        c = _fake_console(config, {"pair_id": 3, "t_unix_s": 1000.0, **big})
        assert _check_approval(c, tina, 3, 1001.0)[0] == 202 and c.first_approval["operator"] == "tina"
        assert _check_approval(c, tina, 3, 1002.0)[0] == 409  # not twice by one user
        assert _check_approval(c, tom, 3, 1002.0)[0] == 403  # a second therapist may not
        assert _check_approval(c, phil, 3, 1002.0) == (200, None, {"first_signoff": "tina"})


def test_both_sign_offs_approve_the_same_level():
    config = _config(second_signoff_mm=2.0, second_signoff_deg=1.0)
    tina = LoginSession("tina", "therapist", 1e9, "c")
    phil = LoginSession("phil", "physicist", 1e9, "c")
    c = _fake_console(config, {"pair_id": 3, "t_unix_s": 1000.0, "translation_mm": [3, 0, 0], "rotation_deg": [0, 0, 0]})
    assert _check_approval(c, tina, 3, 1001.0, "L1")[0] == 202
    status, error, _ = _check_approval(c, phil, 3, 1002.0, "L2")
    assert status == 409 and "same level" in error
    assert _check_approval(c, phil, 3, 1002.0, "L1") == (200, None, {"first_signoff": "tina"})


def test_a_proposal_learnt_from_a_status_reply_keeps_its_time():
    from spineguide.tracking.console.live import LiveState

    live = LiveState()
    live.on_reply({"phase": "awaiting_approval", "pending_correction": {
        "pair_id": 4, "translation_mm": [1, 0, 0], "rotation_deg": [0, 0, 0], "proposed_unix_s": 1234.5}})
    assert live.proposal["t_unix_s"] == 1234.5 and live.proposal["pair_id"] == 4


def test_proposal_frames_rerendered_with_the_asked_window(users, tmp_path):
    rng = np.random.default_rng(0)
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("A", "B"):
        np.save(frames / f"00000005_{name}.npy", rng.integers(0, 60000, (200, 200)).astype(np.uint16))

    async def check(console, client):
        console.live.proposal = {"pair_id": 5, "translation_mm": [1, 0, 0], "rotation_deg": [0, 0, 0]}
        out = {"anonymous": (await client.get("/api/proposal/A?pair_id=5&lo=1&hi=99")).status}  # before any cookie
        headers = await _login(client, "tina")
        for key, query in (("default", "pair_id=5&lo=1&hi=99"), ("narrow", "pair_id=5&lo=40&hi=60"),
                           ("reversed", "pair_id=5&lo=60&hi=40"), ("nan", "pair_id=5&lo=nan&hi=60"),
                           ("other", "pair_id=6&lo=1&hi=99"), ("junk", "pair_id=x&lo=1&hi=99")):
            r = await client.get(f"/api/proposal/A?{query}", headers=headers)
            out[key] = (r.status, await r.read())
        return out

    out = _run(check, _config(users, frames_folder=frames, approval_pixels=128))
    assert out["anonymous"] == 401
    assert out["default"][0] == 200 and out["default"][1][:2] == b"\xff\xd8"  # JPEG
    assert out["narrow"][0] == 200 and out["narrow"][1] != out["default"][1]
    assert [out[k][0] for k in ("reversed", "nan", "other", "junk")] == [400, 400, 404, 400]


def test_proposal_frames_written_late_are_still_shown(tmp_path):
    # On a loaded machine the record writer may save the proposal's frames after its correction/1 arrives.
    frames = tmp_path / "frames"
    frames.mkdir()
    proposal = {"schema": "correction/1.1", "seq": 1, "t_unix_s": time.time(), "pair_id": 9, "purpose": "proposal",
                "translation_mm": [1.0, 0.0, 0.0], "rotation_deg": [0.0, 0.0, 0.0], "method": "pattern",
                "quality": {"ok": True}}

    async def check(console, client):
        console.on_message("correction", proposal, time.time(), time.monotonic())
        await asyncio.sleep(0.5)
        for name in ("A", "B"):
            np.save(frames / f"00000009_{name}.npy", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
        deadline = time.monotonic() + 3.0
        while len(console.proposal_frames) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return sorted((f.imager, f.pair_id) for f in console.proposal_frames.values())

    assert _run(check, _config(frames_folder=frames, approval_pixels=128)) == [("A", 9), ("B", 9)]


# ----------------------------------------------------------------- journal of every client's commands
def test_journal_reads_commands_of_any_client_from_the_record(tmp_path):
    record = tmp_path / "session-1.jsonl"
    link = tmp_path / "session.jsonl"
    link.symlink_to(record.name)
    lines = [
        {"event": "session", "t_unix_s": 1.0},
        {"event": "command", "t_unix_s": 2.0, "command": "load_plan",
         "params": {"operator": "console", "console_user": "tina", "fraction": 3}, "reply": {"ok": True}},
        {"event": "command", "t_unix_s": 3.0, "command": "pause", "params": {"operator": "delivery"},
         "reply": {"ok": False, "reason": "not valid"}},
    ]
    record.write_bytes(b"".join(json.dumps(x, separators=(",", ":")).encode() + b"\n" for x in lines)
                       + b'{"event":"command","t_unix_s":4.0,"comm')  # a line still being written
    console = ConsoleServer(_config(record_path=link))
    assert console.read_record_commands() is True
    j = list(console.journal)
    assert [(e["command"], e["operator"], e["console_user"], e["ok"]) for e in j] == [
        ("load_plan", "console", "tina", True), ("pause", "delivery", None, False)]
    assert j[0]["fraction"] == 3 and j[1]["reason"] == "not valid"
    with open(record, "ab") as f:
        f.write(b'and":"resume","params":{"operator":"room"},"reply":{"ok":true}}\n')
    assert console.read_record_commands() is True and console.journal[-1]["command"] == "resume"
    assert console.read_record_commands() is False
    # A new service session: the link moves; the journal starts again.
    new = tmp_path / "session-2.jsonl"
    new.write_text(json.dumps({"event": "command", "t_unix_s": 9.0, "command": "status", "params": {},
                               "reply": {"ok": True}}, separators=(",", ":")) + "\n")
    link.unlink()
    link.symlink_to(new.name)
    assert console.read_record_commands() is True and [e["command"] for e in console.journal] == ["status"]


# ----------------------------------------------------------------- review and report
def _session(path, gating=(), commands=()):
    rec = SessionRecord(path)
    rec.write("session", t_unix_s=1000.0, t_mono_s=0.0, config={"safety": {"tolerance_3d_mm": 1.0}})
    for i, (t, beam, reason, dev, until) in enumerate(gating):
        rec.write("sent", t_unix_s=t, t_mono_s=t - 1000.0, topic="gating", latency_ms=5.0, body={
            "schema": "gating/1.1", "seq": i, "t_unix_s": t, "beam": beam, "reason": reason,
            "valid_until_unix_s": until, "pair_id": i, "deviation_mm": dev})
    for t, name in commands:
        rec.write("command", t_unix_s=t, t_mono_s=t - 1000.0, command=name, params={"operator": "console"},
                  reply={"ok": True})
    rec.close()
    return path


def test_review_of_an_empty_session_renders_html_and_pdf(tmp_path):
    rev = review_session(_session(tmp_path / "empty.jsonl"))
    assert rev.pairs == 0 and rev.beam_on_s == 0.0 and rev.max_deviation_beam_on_mm is None
    assert "the beam was never on" in write_review_html(rev)
    assert write_report_pdf(rev)[:5] == b"%PDF-"
    json.dumps(rev.to_json(), allow_nan=False)

    async def check(console, client):  # over HTTP too: the issue saw a 500 here
        return [(await client.get(u)).status for u in ("/review/empty.jsonl", "/api/review/empty.jsonl",
                                                        "/report/empty.jsonl.pdf")]

    assert _run(check, _config(records_folder=tmp_path)) == [200, 200, 200]


def test_report_numbers_from_known_decisions(tmp_path):
    gating = [(1001.0, "HOLD", "not_monitoring", None, 1001.0), (1002.0, "ENABLE", "ok", 0.4, 1002.2),
              (1002.1, "ENABLE", "ok", 0.7, 1002.3),  # cut short by the next decision
              (1002.2, "HOLD", "out_of_tolerance", 3.1, 1002.2), (1002.3, "HOLD", "out_of_tolerance", 3.3, 1002.3),
              (1003.0, "ENABLE", "ok", 0.5, 1003.2)]
    rev = review_session(_session(tmp_path / "s.jsonl", gating, [(1001.5, "start_monitoring")]))
    assert rev.beam_on_s == pytest.approx(0.1 + 0.1 + 0.2)
    assert rev.max_deviation_beam_on_mm == pytest.approx(0.7)
    per = rev.holds_per_reason()
    assert per[0] == {"reason": "out_of_tolerance", "category": "safety", "runs": 1, "decisions": 2}
    assert per[1] == {"reason": "not_monitoring", "category": "routine", "runs": 1, "decisions": 1}
    assert "id=\"review-axes\"" in write_review_html(rev)


def test_signoff_once_pinned_to_the_record(tmp_path):
    path = _session(tmp_path / "s.jsonl", [(1001.0, "HOLD", "not_monitoring", None, 1001.0)])
    doc = sign_off(path, "phil", "physicist", "fine", 2000.0)
    assert doc["matches"] and read_signoff(path)["operator"] == "phil"
    with pytest.raises(ReviewError, match="already signed off by phil"):
        sign_off(path, "tom", "physicist", "", 2001.0)
    with open(path, "ab") as f:  # the running service appends: the signed part is unchanged, the rest is not covered
        f.write(b'{"event":"late","t_unix_s":3000.0}\n')
    assert read_signoff(path)["matches"] is True and read_signoff(path)["appended_bytes"] > 0
    assert "not covered" in write_review_html(review_session(path), signoff=read_signoff(path))
    data = path.read_bytes()
    path.write_bytes(data.replace(b"not_monitoring", b"ok_monitoring!"))  # the signed part altered
    assert read_signoff(path)["matches"] is False
    assert "CHANGED AFTER THE SIGN-OFF" in write_review_html(review_session(path), signoff=read_signoff(path))
    link = tmp_path / "session.jsonl"
    link.symlink_to(path.name)
    with pytest.raises(ReviewError, match="link"):
        sign_off(link, "phil", "physicist", "", 2000.0)


def test_signoff_and_pdf_over_http(users, tmp_path):
    _session(tmp_path / "s.jsonl", [(1001.0, "ENABLE", "ok", 0.2, 1001.2)])

    async def check(console, client):
        tina = await client.post("/api/review/s.jsonl/signoff", json={}, headers=await _login(client, "tina"))
        phil_h = await _login(client, "phil")
        bad = await client.post("/api/review/s.jsonl/signoff", json={"comment": "x", "extra": 1}, headers=phil_h)
        ok = await client.post("/api/review/s.jsonl/signoff", json={"comment": "reviewed"}, headers=phil_h)
        again = await client.post("/api/review/s.jsonl/signoff", json={}, headers=phil_h)
        pdf = await client.get("/report/s.jsonl.pdf")
        page = await client.get("/review/s.jsonl")
        listing = await (await client.get("/api/sessions")).json()
        return (tina.status, bad.status, ok.status, again.status, pdf.status, await pdf.read(),
                page.headers["Content-Security-Policy"], await page.text(), listing)

    tina, bad, ok, again, pdf_status, pdf, csp, page, listing = _run(check, _config(users, records_folder=tmp_path))
    assert (tina, bad, ok, again, pdf_status) == (403, 400, 200, 409, 200)
    assert pdf[:5] == b"%PDF-" and "script-src" not in csp and "frame-ancestors 'none'" in csp
    assert "phil (physicist)" in page and listing["sessions"][0]["signoff"]["operator"] == "phil"


# ----------------------------------------------------------------- fuzz: hostile JSON into the new endpoints
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                 max_size=4), max_leaves=12)
_command_body = st.fixed_dictionaries({"command": st.sampled_from(
    ["load_plan", "approve_correction", "stop", "pause", "set_tolerance", "x"]) | _json}, optional={
    "params": st.dictionaries(st.sampled_from(["patient_id", "plan_id", "fraction", "pair_id", "x"]), _json,
                              max_size=4) | _json})


@pytest.fixture(scope="module")
def live_console(users, tmp_path_factory):
    from spineguide.tracking.console import server

    folder = tmp_path_factory.mktemp("records")
    _session(folder / "s.jsonl")
    timeout, server.COMMAND_TIMEOUT_S = server.COMMAND_TIMEOUT_S, 0.05  # nothing answers: do not wait 3 s each
    with ConsoleThread(_config(users, records_folder=folder)) as console:
        req = urllib.request.Request(console.url + "api/login", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({"operator": "phil",
                                                                  "password": PASSWORDS["phil"]}).encode())
        session = json.loads(urllib.request.urlopen(req, timeout=5).read())["session"]
        yield console.url, session
    server.COMMAND_TIMEOUT_S = timeout


def _post(url, body, session=None):
    headers = {"Content-Type": "application/json"}
    if session:
        headers["Authorization"] = f"Bearer {session}"
    req = urllib.request.Request(url, method="POST", headers=headers, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.fuzz
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=_command_body)
def test_fuzz_command_endpoint_never_fails_inside(live_console, body):
    url, session = live_console
    # 400/403/409: refused with a reason; 502: the console's checks passed and the absent service did not answer.
    assert _post(url + "api/command", body, session) in (400, 403, 409, 502)


@pytest.mark.fuzz
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=st.dictionaries(st.sampled_from(["operator", "password", "token", "x"]), _json, max_size=3),
       signoff=st.dictionaries(st.sampled_from(["comment", "x"]), _json, max_size=2))
def test_fuzz_login_and_signoff_endpoints_never_fail_inside(live_console, body, signoff):
    url, session = live_console
    assert _post(url + "api/login", body) in (400, 401, 429)
    assert _post(url + "api/review/s.jsonl/signoff", signoff, session) in (200, 400, 409)


# ----------------------------------------------------------------- spineguide demo --console
@pytest.mark.slow  # starts the simulated room and the console for ~2 s
def test_demo_console_starts_an_idle_room_with_two_accounts(tmp_path, capsys):
    from spineguide.tracking.cli.main import main

    assert main(["demo", "--console", "--port", "0", "--duration", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spineguide console: http://127.0.0.1:" in out and "simulated room (IDLE)" in out
    store = UserStore.read(tmp_path / "console-users.json")
    assert {u.role for u in store.users.values()} == {"therapist", "physicist"}
    for name in ("therapist", "physicist"):
        password = re.search(rf"user '{name}' password '([^']+)'", out).group(1)
        assert store.verify(name, password).name == name
    record = sorted((tmp_path / "records").glob("session-*.jsonl"))[0]
    states = [json.loads(line) for line in record.read_text().splitlines() if '"event":"state"' in line]
    assert all(s.get("new") != "PLAN_LOADED" for s in states)  # nothing loaded it: the page does


def test_console_user_cli_adds_a_hashed_account(tmp_path, monkeypatch, capsys):
    import io

    from spineguide.tracking.cli.main import main

    path = tmp_path / "users.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password-1\n"))
    assert main(["console-user", "add", "--users", str(path), "--name", "kim", "--role", "physicist",
                 "--password-stdin"]) == 0
    assert "kim (physicist)" in capsys.readouterr().out
    store = UserStore.read(path)
    assert store.verify("kim", "a-long-password-1").role == "physicist"
    assert "a-long-password-1" not in path.read_text()


def test_render_frame_window_and_marks_that_grow_with_the_display():
    from spineguide.tracking.console.display import SeedOverlay, render_frame
    from spineguide.tracking.errors import FrameError

    img = np.tile(np.linspace(0, 1000, 512, dtype=np.float32), (512, 1))
    with pytest.raises(FrameError, match="percentiles"):
        render_frame(img, "A", 1, window_percentiles=(60.0, 40.0))
    seed = (SeedOverlay("F1", (512.0, 512.0), None, None),)
    import cv2

    def green_pixels(size):
        f = render_frame(np.full((1024, 1024), 500, np.float32), "A", 1, seed, size, fmt="png")
        bgr = cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_COLOR)
        return int(((bgr[:, :, 1] > 150) & (bgr[:, :, 0] < 100) & (bgr[:, :, 2] < 100)).sum())

    assert green_pixels(768) > 2 * green_pixels(256)  # thicker and larger cross on a larger display


def test_console_cli_takes_users_and_second_signoff(tmp_path):
    import argparse

    from spineguide.tracking.cli import console as cli_console
    from spineguide.tracking.service.config import config_from_dict

    add_user(tmp_path / "u.json", "tina", "therapist", PASSWORDS["tina"])

    class Room:
        config = config_from_dict({"plan": {"method": "pattern"}, "security": {"enabled": False},
                                   "record": {"path": str(tmp_path / "session.jsonl"), "raw_frames": True}})
        endpoints = {"publish": "tcp://127.0.0.1:6001", "command": "tcp://127.0.0.1:6002"}
        console_keys = None
        PATIENT = {"patient_id": "SIM-0001", "patient_name": "P", "plan_id": "SIM", "method": "pattern",
                   "source": "sim", "patient_position": "HFS"}

    parser = argparse.ArgumentParser()
    cli_console.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["console", "--port", "0", "--simulate", "--users", str(tmp_path / "u.json"),
                              "--second-signoff-mm", "4", "--second-signoff-deg", "1.5"])
    config = cli_console.build_console_config(args, Room())
    assert config.commands_enabled and config.users.verify("tina", PASSWORDS["tina"]).role == "therapist"
    assert (config.second_signoff_mm, config.second_signoff_deg) == (4.0, 1.5)
    # The room's patients come from its service's catalogue (list_plans), not from the CLI.
    assert config.plans == () and config.record_path == tmp_path / "session.jsonl"
    bad = parser.parse_args(["console", "--simulate", "--users", str(tmp_path / "missing.json")])
    with pytest.raises(ConsoleConfigError, match="cannot read the console users"):
        cli_console.build_console_config(bad, Room())


# ----------------------------------------------------------------- frames need a login
def test_frames_and_patient_data_only_reach_a_logged_in_page(users, tmp_path):
    from spineguide.tracking.console.display import DisplayFrame

    async def frames_within(ws, seconds):
        got, kinds = [], set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if msg.type != 1:  # WSMsgType.TEXT
                break
            body = json.loads(msg.data)
            kinds.add(body.get("type"))
            if body.get("type") in ("frame", "proposal_frame"):
                got.append(body)
            if body.get("type") == "state" and "plans" in body:
                kinds.add("plans")
        return got, kinds

    async def check(console, client):
        console.frames = {"A": DisplayFrame("A", 7, b"\xff\xd8jpeg", "image/jpeg", 2, 2, 1.0)}
        console.frame_version = {"A": 1}
        console.proposal_frames = {"A": DisplayFrame("A", 7, b"\xff\xd8jpeg", "image/jpeg", 2, 2, 1.0)}
        console.proposal_version = {"A": 1}
        console.plans_version = 1
        anon = await client.ws_connect("/ws")
        frames, kinds = await frames_within(anon, 0.7)
        assert frames == [] and "state" in kinds and "plans" not in kinds  # the state only: no frames, no patient
        r = await client.get("/api/proposal/A?pair_id=7&lo=1&hi=99")
        assert r.status == 401 and "log in" in (await r.json())["error"]
        assert (await (await client.get("/api/config")).json())["plans"] == []
        await anon.close()

        headers = await _login(client, "tina")
        authed = await client.ws_connect("/ws", headers=headers)
        frames, kinds = await frames_within(authed, 0.7)
        assert {f["type"] for f in frames} == {"frame", "proposal_frame"} and "plans" in kinds
        r = await client.get("/api/proposal/A?pair_id=7&lo=1&hi=99", headers=headers)
        assert r.status == 404  # past the login check: pair 7 is not a proposal on this console
        assert (await (await client.get("/api/config", headers=headers)).json())["plans"][0]["plan_id"] == "T12-SBRT"
        # Logging out ends the frames on the connection that logged in.
        await client.post("/api/logout", headers=headers)
        console.frame_version = {"A": 2}
        console._wake_all()
        frames, kinds = await frames_within(authed, 0.7)
        assert frames == [] and "state" in kinds
        await authed.close()

    _run(check, _config(users=users, frames_folder=tmp_path))
