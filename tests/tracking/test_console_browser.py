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
    kw.setdefault("login_token", TOKEN)
    return ConsoleConfig(room.endpoints["publish"], room.endpoints["command"], port=0,
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
        page = browser.new_page(bypass_csp=True, viewport={"width": 1500, "height": 900})
        page.goto(console.url)
        # Setup: the proposal waits for approval; nothing moves until an operator approves.
        _wait(page, "document.getElementById('service-phase').textContent === 'awaiting_approval'", 5.0)
        assert page.locator("#approve-button").is_disabled()  # not logged in: no command possible
        # Not logged in: the state, but no frame (live or the proposal's) reaches the page.
        assert page.evaluate("document.getElementById('frame-A').naturalWidth") == 0
        assert page.evaluate("document.getElementById('proposal-A').naturalWidth") == 0
        page.fill("#login-operator", "Jane Doe")
        page.fill("#login-token", TOKEN)
        page.click("#login-button")
        t_frames = _wait(page, "document.getElementById('frame-A').naturalWidth > 0 && "
                               "document.getElementById('frame-B').naturalWidth > 0", FRAMES_WITHIN_S)
        page.screenshot(path=str(shots / "1-frames.png"))
        assert t_frames <= FRAMES_WITHIN_S
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
        page = browser.new_page(bypass_csp=True, viewport={"width": 1200, "height": 900})
        page.goto(console.url)
        page.wait_for_selector("a.session-link", timeout=5000)
        page.click("a.session-link")
        page.wait_for_selector("#review-timeline", timeout=10000)
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        assert page.locator("#review-summary").inner_text().count("stereo pairs judged") == 1
        assert page.evaluate("document.getElementById('review-timeline').naturalWidth") > 0
        assert "approve_correction" not in page.locator("#review-commands").inner_text()
        assert "start_setup" in page.locator("#review-commands").inner_text()


# ----------------------------------------------------------------- the whole fraction, as a therapist would
PASSWORDS = {"tina": "therapist-pass-0123", "phil": "physicist-pass-0123"}
#: The room's setup error is ~2.7 mm: above this, the approval needs a physicist's second sign-off.
SECOND_SIGNOFF_MM = 2.0
#: Service killed -> the page's full-width SERVICE LOST banner (3 heartbeat periods + the 50 ms render tick).
SERVICE_LOST_WITHIN_S = 1.0


def _users_file(tmp_path):
    from spineguide.tracking.console.users import UserStore, add_user

    path = tmp_path / "console-users.json"
    add_user(path, "tina", "therapist", PASSWORDS["tina"])
    add_user(path, "phil", "physicist", PASSWORDS["phil"])
    return UserStore.read(path)


def _login(page, name):
    page.fill("#login-operator", name)
    page.fill("#login-token", PASSWORDS[name])
    page.click("#login-button")
    _wait(page, f"document.getElementById('login-status').textContent.includes('{name}')", 3.0)


def test_whole_fraction_from_the_page(browser, tmp_path):
    """Choose patient -> load -> setup -> approval (two sign-offs) -> monitoring -> HOLD -> end -> signed PDF."""
    shots = Path(os.environ.get("SPINEGUIDE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    room = SimulatedRoom(tmp_path / "room", setup_error=Pose.from_six((2.0, -1.5, 1.0), (0, 0, 0)), autostart=False)
    with room, ConsoleThread(ConsoleConfig(
            room.endpoints["publish"], room.endpoints["command"], port=0, users=_users_file(tmp_path),
            client_keys=room.console_keys, frames_folder=room.folder / "session.jsonl.frames",
            records_folder=room.folder, record_path=room.folder / "session.jsonl", approval="manual",
            correction_limit_mm=25.0, correction_limit_deg=5.0, tolerance_3d_mm=1.0, approval_max_age_s=30.0,
            second_signoff_mm=SECOND_SIGNOFF_MM)) as console:  # the plans: the service's catalogue
        ctx = browser.new_context(bypass_csp=True, viewport={"width": 1600, "height": 1000})
        page = ctx.new_page()
        page.goto(console.url)
        _wait(page, "document.getElementById('service-state').textContent === 'IDLE'", 5.0)
        page.screenshot(path=str(shots / "1-choose-patient.png"))
        _login(page, "tina")
        page.reload()  # the login survives a reload (HttpOnly session cookie)
        _wait(page, "document.getElementById('login-status').textContent.includes('tina (therapist)')", 3.0)

        # 1. Patient, plan and fraction (the second of the service's two patients); load.
        _wait(page, "document.getElementById('plan-select').options.length === 2", 3.0)
        options = page.locator("#plan-select").inner_text()
        assert "SIM-0001" in options and "SIM-0002 · PHANTOM^SECOND · plan SIM-L2" in options
        page.select_option("#plan-select", label="SIM-0002 · PHANTOM^SECOND · plan SIM-L2")
        assert "patient position FFS" in page.locator("#plan-details").inner_text()
        page.fill("#fraction-number", "0")
        page.click("#load-plan-button")
        _wait(page, "document.getElementById('command-result').textContent.includes('from 1 to 99')", 2.0)
        page.fill("#fraction-number", "3")
        page.click("#load-plan-button")
        _wait(page, "document.getElementById('service-state').textContent === 'PLAN_LOADED'", 5.0)
        _wait(page, "document.getElementById('journal').textContent.includes('tina via console: load_plan "
                    "(fraction 3)')", 3.0)
        _wait(page, "document.getElementById('fraction-loaded').textContent.startsWith("
                    "'SIM-0002 · plan SIM-L2 · fraction 3 (loaded by tina')", 2.0)
        assert room.service.engine.plan.plan_id == "SIM-L2"
        page.screenshot(path=str(shots / "2-plan-loaded.png"))

        # 2-3. Setup and approval: the proposal's own pair, its age and expiry, direction words per axis.
        page.click("[data-command=start_setup]")
        _wait(page, "!document.getElementById('proposal').hidden && "
                    "!document.getElementById('approve-button').disabled", 8.0)
        pid = page.locator("#proposal-pair").inner_text()
        assert page.locator("#proposal-A").get_attribute("data-pair-id") == pid
        assert "expires in" in page.locator("#proposal-age").inner_text()
        # Setup error (2, -1.5, 1) mm in the room -> correction about (-2, +1.5, -1): for the chosen plan's
        # feet-first supine patient left, inferior, posterior (head-first it would be right, superior, posterior).
        words = [page.locator(f"#p-d-{i}").inner_text() for i in range(3)]
        assert "left" in words[0] and "inferior" in words[1] and "posterior" in words[2], words
        assert "over" in page.locator("#p-row-0").get_attribute("class")  # 2 mm beyond the 1 mm tolerance
        assert "two sign-offs" in page.locator("#signoff-status").inner_text()
        assert "approve it" in page.locator("#beam-action").inner_text()  # the next action follows the phase
        page.locator("#window").fill("40")  # window/level: the server re-renders the raw frames
        _wait(page, "document.getElementById('proposal-A').src.includes('/api/proposal/A?pair_id=' + "
                    f"'{pid}&lo=30.0&hi=70.0') && document.getElementById('proposal-A').naturalWidth > 0", 3.0)
        page.locator("#zoom").fill("2")
        page.focus("#proposal-A >> xpath=..")
        page.keyboard.press("ArrowLeft")  # pan by keyboard: both images together
        assert "scale(2) translate(5%, 0%)" in page.get_attribute("#proposal-B", "style")
        page.screenshot(path=str(shots / "3-approval.png"), full_page=True)
        page.click("#approve-button")  # first sign-off (therapist)
        _wait(page, "document.getElementById('signoff-status').textContent.includes('First sign-off: tina')", 3.0)
        assert page.locator("#approve-button").is_disabled()  # not twice by the same user
        phys_ctx = browser.new_context(bypass_csp=True, viewport={"width": 1600, "height": 1000})
        phys = phys_ctx.new_page()
        phys.goto(console.url)
        _login(phys, "phil")
        _wait(phys, "!document.getElementById('approve-button').disabled", 5.0)
        phys.click("#approve-button")  # second sign-off: the approval goes to the service
        _wait(page, "document.getElementById('service-phase').textContent === 'verified'", VERIFYING_WITHIN_S + 5)

        # 4. Monitoring; a 3 mm shift: a safety HOLD in plain words with the next action.
        _wait(page, "!document.querySelector('[data-command=start_monitoring]').disabled", 2.0)
        page.click("[data-command=start_monitoring]")
        _wait(page, "document.getElementById('beam').textContent === 'ENABLE'", 5.0)
        page.screenshot(path=str(shots / "4-monitoring.png"))
        room.inject_shift((0.0, -3.0, 0.0))
        _wait(page, "document.getElementById('beam-reason').textContent === 'out_of_tolerance'", HOLD_WITHIN_S)
        _wait(page, "document.getElementById('holds').textContent.includes('The target moved beyond the tolerance')",
              1.0)
        assert "Next:" in page.locator("#beam-action").inner_text()
        assert "moved beyond" in page.locator("#beam-live").inner_text()  # the ARIA live region says it
        page.screenshot(path=str(shots / "5-hold.png"))

        # The imager falls silent: frames marked stale, a full-width banner; then it comes back.
        room.pause_imager(True)
        _wait(page, "['IMAGER SILENT', 'FRAMES STALE'].some(w => "
                    "document.getElementById('alert-banner').textContent.startsWith(w))", 3.0)
        _wait(page, "document.getElementById('frame-A-age').textContent.startsWith('STALE')", 1.0)
        page.screenshot(path=str(shots / "5b-imager-silent.png"))
        room.pause_imager(False)
        _wait(page, "document.getElementById('alert-banner').hidden", 3.0)

        # 5. End of fraction (two clicks).
        page.click("#end-button")
        page.click("#end-confirm")
        _wait(page, "document.getElementById('service-state').textContent === 'STOPPED'", 3.0)
        _wait(page, "document.getElementById('beam-action').textContent.includes('open its report')", 1.0)
        page.screenshot(path=str(shots / "6-ended.png"))

        # 6. Report: the physicist signs it off; the PDF carries the sign-off.
        phys.reload()
        phys.wait_for_selector(".signoff-button", timeout=5000)
        assert page.locator(".signoff-button").count() == 0  # a therapist cannot sign off
        phys.click(".signoff-button")
        phys.wait_for_selector("text=signed off by phil", timeout=5000)
        name = phys.locator("a.session-link").first.inner_text().split(" ")[0]
        pdf = phys.request.get(f"{console.url}report/{name}.pdf")
        assert pdf.status == 200 and pdf.body()[:5] == b"%PDF-" and len(pdf.body()) > 10_000
        phys.goto(f"{console.url}review/{name}")
        assert "phil (physicist)" in phys.locator("#review-signoff").inner_text()
        assert "CHANGED" not in phys.locator("#review-signoff").inner_text()
        assert "beam-on time" in phys.locator("#review-summary").inner_text()
        phys.screenshot(path=str(shots / "7-report.png"), full_page=True)
        (shots / "7-report.pdf").write_bytes(pdf.body())

        # The service dies: the page does not stay green.
        page.click("#nav-review")
        errors_before_stop = list(room.errors)  # after the stop the room's imager cannot send: expected errors
        room.service.stop()
        t_lost = _wait(page, "document.getElementById('alert-banner').textContent.startsWith('SERVICE LOST')",
                       SERVICE_LOST_WITHIN_S)
        assert page.locator("#heartbeat-rate").inner_text() == "0 Hz"
        assert page.locator("#beam").inner_text() == "HOLD"
        page.screenshot(path=str(shots / "8-service-lost.png"))
        assert t_lost <= SERVICE_LOST_WITHIN_S and errors_before_stop == []
        phys_ctx.close()
        ctx.close()
    recs = read_record(sorted((tmp_path / "room").glob("session-*.jsonl"))[0])
    cmds = {r["command"]: r for r in recs if r["event"] == "command" and r["reply"]["ok"]}
    assert cmds["load_plan"]["params"]["fraction"] == 3 and cmds["load_plan"]["params"]["console_user"] == "tina"
    assert (cmds["load_plan"]["params"]["patient_id"], cmds["load_plan"]["params"]["plan_id"]) == ("SIM-0002", "SIM-L2")
    approve = cmds["approve_correction"]["params"]
    assert approve["console_user"] == "phil" and approve["first_signoff"] == "tina"
    assert cmds["stop"]["params"]["console_user"] == "tina" and cmds["stop"]["t_unix_s"] > 0


def test_page_works_under_its_own_content_security_policy(browser, tmp_path):
    """No CSP bypass here: the page's script, styles, frames (data: URLs) and WebSocket all run under its policy."""
    with SimulatedRoom(tmp_path / "room") as room, ConsoleThread(_console_config(room)) as console:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        messages = []
        page.on("console", lambda m: messages.append(m.text))
        page.goto(console.url)
        page.fill("#login-operator", "Jane Doe")  # frames reach a logged-in page only
        page.fill("#login-token", TOKEN)
        page.click("#login-button")
        deadline = time.monotonic() + 5.0
        while not (page.locator("#service-state").inner_text() == "SETUP"
                   and page.evaluate("document.getElementById('frame-A').naturalWidth") > 0):
            assert time.monotonic() < deadline, "the page did not render under its CSP"
            time.sleep(0.05)
        headers = page.request.get(console.url).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert not [m for m in messages if "Content Security Policy" in m or "Failed to load" in m], messages
        # The console itself goes away: the page says so instead of showing the last state as live.
        console.stop()
        deadline = time.monotonic() + 3.0
        while not page.locator("#alert-banner").inner_text().startswith("CONSOLE DISCONNECTED"):
            assert time.monotonic() < deadline, "no CONSOLE DISCONNECTED banner"
            time.sleep(0.05)
        assert page.locator("#beam").inner_text() == "HOLD"


# ----------------------------------------------------------------- layout, keyboard and axe-core
AXE = Path(__file__).resolve().parent / "a11y" / "node_modules" / "axe-core" / "axe.min.js"
#: The issue's range of screen widths, px.
WIDTHS = (1280, 2560)


@pytest.mark.skipif(not AXE.exists() and not os.environ.get("CI"),
                    reason="axe-core missing: npm ci --prefix tests/tracking/a11y (CI must have it)")
def test_layout_keyboard_and_axe_without_serious_violations(browser, tmp_path):
    from spineguide.tracking.console.fraction import PlanEntry

    room = SimulatedRoom(tmp_path / "room")
    with room, ConsoleThread(_console_config(room, users=_users_file(tmp_path), login_token=None,
                                             plans=(PlanEntry(**room.PATIENT),),
                                             record_path=room.folder / "session.jsonl")) as console:
        ctx = browser.new_context(bypass_csp=True, viewport={"width": WIDTHS[0], "height": 900})
        page = ctx.new_page()
        page.goto(console.url)
        # Keyboard only: the skip link first, then the login fields; Enter submits.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        for _ in range(10):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "login-operator":
                break
        page.keyboard.type("tina")
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORDS["tina"])
        page.keyboard.press("Enter")
        _wait(page, "document.getElementById('login-status').textContent.includes('tina')", 3.0)
        _wait(page, "!document.getElementById('approve-button').disabled", 8.0)
        for _ in range(80):  # the approve button is reachable by Tab
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "approve-button":
                break
        assert page.evaluate("document.activeElement.id") == "approve-button"
        assert page.locator("#clock").inner_text().endswith("UTC")
        assert page.get_attribute("#beam-live", "aria-live") == "assertive"
        page.add_script_tag(path=str(AXE))
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 1000})
            page.wait_for_timeout(200)
            page.screenshot(path=str(tmp_path / f"layout-{width}.png"))
            layout = page.evaluate("""() => ({sw: document.documentElement.scrollWidth, w: window.innerWidth,
                main: document.getElementById('main').getBoundingClientRect().width,
                proposal: document.getElementById('proposal').getBoundingClientRect().width})""")
            assert layout["sw"] <= layout["w"], (width, layout)  # nothing cut off to the right
            assert layout["main"] >= 0.9 * layout["w"] and layout["proposal"] >= 0.9 * layout["w"], (width, layout)
            result = page.evaluate("async () => (await axe.run(document)).violations"
                                   ".map(v => ({id: v.id, impact: v.impact, n: v.nodes.length, "
                                   "html: v.nodes.slice(0, 2).map(n => n.html)}))")
            serious = [v for v in result if v["impact"] in ("serious", "critical")]
            assert serious == [], (width, serious)
        ctx.close()


# ----------------------------------------------------------------- seeds on the approval screen
def test_seed_marks_on_the_approval_screen(browser, tmp_path):
    """A fiducial plan in the simulated room (its phantom's gold seeds in the frames): the approval screen draws
    the planned (green +) and detected (yellow o) seed marks, counted by the page and seen in a screenshot."""
    import cv2
    import numpy as np

    from spineguide.tracking.console.config import console_config_from_service

    room = SimulatedRoom(tmp_path / "room", autostart=False, seeds=True)
    with room:
        config = console_config_from_service(
            room.config, publish_address=room.endpoints["publish"], command_address=room.endpoints["command"],
            client_keys=room.console_keys, port=0, users=_users_file(tmp_path), approval_max_age_s=30.0)
        with ConsoleThread(config) as console:
            page = browser.new_page(bypass_csp=True, viewport={"width": 1600, "height": 1000})
            page.goto(console.url)
            _login(page, "tina")
            _wait(page, "document.getElementById('plan-select').options.length === 3", 3.0)
            page.select_option("#plan-select", label="SIM-0003 · PHANTOM^SEEDS · plan SIM-T12-SEEDS")
            assert "method fiducial" in page.locator("#plan-details").inner_text()
            page.fill("#fraction-number", "1")
            page.click("#load-plan-button")
            _wait(page, "document.getElementById('service-state').textContent === 'PLAN_LOADED'", 5.0)
            page.click("[data-command=start_setup]")
            _wait(page, "!document.getElementById('proposal').hidden && "
                        "document.getElementById('proposal-A').naturalWidth > 0 && "
                        "document.getElementById('proposal-B').naturalWidth > 0", 10.0)
            seeds = len(config.plan_overlays["SIM-T12-SEEDS"][0].names)
            for name in ("A", "B"):
                img = page.locator(f"#proposal-{name}")
                assert (img.get_attribute("data-planned-marks"), img.get_attribute("data-detected-marks")) == \
                       (str(seeds), str(seeds))
            # The marks are really drawn: the green crosses in a screenshot of the approval image.
            png = page.locator("#proposal-A").screenshot()
            (tmp_path / "proposal-A.png").write_bytes(png)
            if os.environ.get("SPINEGUIDE_SCREENSHOTS"):
                (Path(os.environ["SPINEGUIDE_SCREENSHOTS"]) / "3b-approval-seeds.png").write_bytes(png)
            shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            b, g, r = (shot[..., i].astype(int) for i in range(3))
            # Green (not the yellow circles, not grey): each cross, shrunk with the image, joined up again.
            green = ((g > 90) & (g - r > 40) & (g - b > 40)).astype(np.uint8)
            green = cv2.dilate(green, np.ones((5, 5), np.uint8))
            n, _, stats, _ = cv2.connectedComponentsWithStats(green, connectivity=8)
            crosses = [s for s in stats[1:] if s[cv2.CC_STAT_AREA] >= 30]
            assert len(crosses) == seeds, [s.tolist() for s in crosses]
            # The live frames carry the planned marks too (their caption says so).
            _wait(page, "document.getElementById('frame-A-caption').textContent.includes('seeds: 3 planned')", 3.0)
            page.screenshot(path=str(tmp_path / "seeds.png"))
    assert room.errors == []
