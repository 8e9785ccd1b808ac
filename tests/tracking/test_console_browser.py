"""The console in a real headless browser (Debian chromium driven by Playwright) against the simulated room.

The service, its imager and delivery simulators run in this process
(:class:`~spineguide.tracking.sim.rig.SimulatedRoom`); the console serves the page
on a free loopback port. Screenshots of each step are saved under
``tmp_path`` (pytest keeps the last runs' folders) as test artefacts.
Skipped only when chromium or Playwright is missing and ``CI`` is unset.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from spineguide.registration.pose import Pose
from spineguide.tracking.console.config import ConsoleConfig
from spineguide.tracking.sim.rig import SimulatedRoom
from spineguide.tracking.console.server import ConsoleThread
from spineguide.tracking.service.record import read_record

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "console-test-token-0123456789"

#: The issue's limits: both frames within 2 s of loading; a HOLD shown within 1 s of the shift.
FRAMES_WITHIN_S = 2.0
HOLD_WITHIN_S = 1.0
#: Approval -> couch move (0.2 s latency) -> couch_moved -> next pair: a few frame periods.
VERIFYING_WITHIN_S = 5.0

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None

_missing = sync_playwright is None or not Path(CHROMIUM).exists()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(_missing and not os.environ.get("CI"),
                       reason="chromium (apt-get install chromium) or playwright (pip) missing; CI must have both"),
]


@pytest.fixture
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _console_config(room: SimulatedRoom, **kw) -> ConsoleConfig:
    return ConsoleConfig(room.endpoints["publish"], room.endpoints["command"], port=0, login_token=TOKEN,
                         client_keys=room.console_keys,
                         frames_folder=room.folder / "session.jsonl.frames", records_folder=room.folder,
                         approval="manual", correction_limit_mm=25.0, correction_limit_deg=5.0,
                         tolerance_3d_mm=1.0, **kw)


def _wait(page, js: str, timeout_s: float) -> float:
    """Wait until the JS expression is true; returns the seconds it took."""
    t0 = time.monotonic()
    page.wait_for_function(js, timeout=timeout_s * 1e3, polling=20)
    return time.monotonic() - t0


def test_live_console_frames_approval_and_hold(browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with SimulatedRoom(tmp_path / "room", setup_error=Pose.from_six((2.0, -1.5, 1.0), (0, 0, 0))) as room, \
            ConsoleThread(_console_config(room)) as console:
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.goto(console.url)
        t_frames = _wait(page, "document.getElementById('frame-A').naturalWidth > 0 && "
                               "document.getElementById('frame-B').naturalWidth > 0", FRAMES_WITHIN_S)
        page.screenshot(path=str(shots / "1-frames.png"))
        assert t_frames <= FRAMES_WITHIN_S

        # Setup: the proposal waits for approval; nothing moves until an operator approves.
        _wait(page, "document.getElementById('service-phase').textContent === 'awaiting_approval'", 5.0)
        assert page.locator("#approve-button").is_disabled()  # not logged in: no command possible
        page.fill("#login-operator", "Jane Doe")
        page.fill("#login-token", TOKEN)
        page.click("#login-button")
        _wait(page, "!document.getElementById('approve-button').disabled", 2.0)
        page.screenshot(path=str(shots / "2-proposal.png"))
        page.click("#approve-button")
        _wait(page, "['awaiting_couch', 'verifying', 'verified'].includes("
                    "document.getElementById('service-phase').textContent)", 2.0)
        _wait(page, "['verifying', 'verified'].includes(document.getElementById('service-phase').textContent)",
              VERIFYING_WITHIN_S)
        page.screenshot(path=str(shots / "3-approved.png"))

        # Monitoring, then the injected 3 mm shift: HOLD with its reason within 1 s.
        _wait(page, "document.getElementById('service-phase').textContent === 'verified'", VERIFYING_WITHIN_S)
        _wait(page, "!document.querySelector('[data-command=start_monitoring]').disabled", 2.0)
        page.click("[data-command=start_monitoring]")
        _wait(page, "document.getElementById('beam').textContent === 'ENABLE'", 3.0)
        page.screenshot(path=str(shots / "4-enable.png"))
        room.inject_shift((0.0, -3.0, 0.0))
        t_hold = _wait(page, "document.getElementById('beam').textContent === 'HOLD' && "
                             "document.getElementById('beam-reason').textContent === 'out_of_tolerance'", HOLD_WITHIN_S)
        page.screenshot(path=str(shots / "5-hold.png"))
        assert t_hold <= HOLD_WITHIN_S
        assert "out_of_tolerance" in page.locator("#holds").inner_text()
        assert room.errors == []
    # The approval reached the service and is in its record with the operator and the time.
    approvals = [r for r in read_record(tmp_path / "room" / "session.jsonl")
                 if r["event"] == "command" and r["command"] == "approve_correction"]
    assert len(approvals) == 1
    # The operator is the console's CURVE key; the name typed at login is recorded beside it.
    assert approvals[0]["params"]["operator"] == "console" and approvals[0]["params"]["console_user"] == "Jane Doe"
    assert approvals[0]["reply"]["ok"] is True
    assert approvals[0]["t_unix_s"] > 0
    for name in ("1-frames", "2-proposal", "3-approved", "4-enable", "5-hold"):
        assert (shots / f"{name}.png").stat().st_size > 0


def test_recorded_session_renders_offline(browser, tmp_path):
    """With no service running, the page lists the recorded session and its review renders."""
    with SimulatedRoom(tmp_path / "room", approval="automatic") as room:
        deadline = time.monotonic() + 10.0
        while room.pairs_sent < 20:  # record ~2 s of setup and gating
            assert time.monotonic() < deadline, "the room's imager stalled"
            time.sleep(0.05)
    record_dir = tmp_path / "room"
    assert (record_dir / "session.jsonl").exists()
    # Nothing listens at these addresses: the console is offline.
    config = ConsoleConfig("tcp://127.0.0.1:9", "tcp://127.0.0.1:9", port=0, records_folder=record_dir)
    with ConsoleThread(config) as console:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(console.url)
        page.wait_for_selector("a.session-link", timeout=5000)
        page.click("a.session-link")
        page.wait_for_selector("#review-timeline", timeout=10000)
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        assert page.locator("#review-summary").inner_text().count("stereo pairs judged") == 1
        assert page.evaluate("document.getElementById('review-timeline').naturalWidth") > 0
        assert "approve_correction" not in page.locator("#review-commands").inner_text()
        assert "start_setup" in page.locator("#review-commands").inner_text()
