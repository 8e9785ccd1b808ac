"""The console's HTTP server (aiohttp): the page, its WebSocket feed, login, commands, review and QA.

Everything runs on one asyncio event loop (one thread): the ZeroMQ SUB to
the service's PUB and the DEALER for commands are ``zmq.asyncio`` sockets
owned by that loop; frame decoding and encoding run in the default thread
pool so the loop never waits on them.

Feed to the page (``GET /ws``): JSON messages ``{"type": "state", ...}``
(:meth:`LiveState.snapshot`) and ``{"type": "frame", "imager", "pair_id",
"mime", "data" (base64)}``. Each client has a sender task that, when woken,
sends the newest state and the newest frame of each imager: a slow client
skips intermediate states and frames and never builds a backlog.

Commands (``POST /api/command``) need a session from ``POST /api/login``
(a name + the login token configured at start-up), sent as
``Authorization: Bearer <session>``. The service takes the operator from
the console's CURVE key (its name and role in the service's allow-list),
never from the page; the name typed at login travels as the command's
``console_user`` parameter, which the service records with the request as
what it is: who the console says was logged in. Only the commands in
:data:`PAGE_COMMANDS` can be sent from the page; ``approve_correction``
must name the proposal's ``pair_id``.

Frames: the service does not publish frames, so the console shows the raw
frames the service records (``[record] raw_frames = true``, folder
``<record>.frames``, written by the service's record writer); the console
must run on the service's host (or see that folder).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import functools
import hmac
import html
import json
import logging
import math
import uuid
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq
import zmq.asyncio
from aiohttp import WSMsgType, web

from spineguide.calibration.foundation import json_default

from ..errors import TrackingError, WireSchemaError
from ..service.security import make_client_socket_secure
from ..service.wire import decode_json_message, decode_reply, encode_command
from .config import ConsoleConfig
from .display import DisplayFrame, drr_edges, render_frame, seed_overlays
from .fraction import MAX_FRACTION, plans_from_service
from .live import LiveState
from .reasons import reasons_json
from .users import ROLE_COMMANDS, LoginGuard
from .review import (
    ReviewError,
    list_sessions,
    read_signoff,
    resolve_session,
    review_session,
    sign_off,
    write_report_pdf,
    write_review_html,
)

__all__ = ["PAGE_COMMANDS", "ConsoleServer", "ConsoleThread", "build_app"]

log = logging.getLogger(__name__)

#: Commands the page may send (each needs a logged-in operator), with the params it may pass.
#: ``approve_correction`` must name the pair it approves (the service refuses it otherwise).
PAGE_COMMANDS: dict[str, tuple[str, ...]] = {
    "load_plan": ("patient_id", "plan_id", "fraction"),
    "stop": (),
    "approve_correction": ("pair_id", "level"),
    "start_monitoring": (),
    "start_setup": (),
    "pause": (),
    "resume": (),
}
#: A login session lasts this long, s.
SESSION_LIFETIME_S = 12 * 3600.0
#: Login sessions kept at most (the oldest is ended first): bounded memory whatever the page sends.
MAX_SESSIONS = 256
#: Cookie that carries the login session (HttpOnly, SameSite=Strict): a reload keeps the login.
SESSION_COOKIE = "sg_session"
#: Header a cookie-authenticated POST must carry with the session's CSRF token.
CSRF_HEADER = "X-SG-CSRF"
#: Commands of any client shown on the page (newest kept), read from the service's record.
JOURNAL_ENTRIES = 200
#: How often the console reads new lines of the service's record, s.
RECORD_POLL_S = 0.5
#: The page gets a state at least this often, even when the service is silent (rates decay, banners show), s.
TICK_S = 0.5
#: Standard security headers on every response (docs/CONSOLE.md, "Security").
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
                                "object-src 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
#: The review report embeds its figures and styles: its own policy (no script at all).
REVIEW_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; "
              "base-uri 'none'; form-action 'self'")
#: Longest operator name, characters.
MAX_OPERATOR_CHARS = 64
#: How long the console waits for the service's reply to a command, s.
COMMAND_TIMEOUT_S = 3.0
#: Tries and pause when a raw frame file is not (completely) written yet.
FRAME_TRIES = 4
FRAME_RETRY_S = 0.02

_TOPICS = ("heartbeat", "gating", "correction")
#: Password checks (argon2) run here, one at a time, never on the event loop or the frame renderers' pool.
_PASSWORD_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-password")
#: Shortest interval between two ``status`` requests the console makes on its own, s.
STATUS_RETRY_S = 2.0
#: A proposal's frames: tries and pause between them (about 5 s in all) before the console gives up.
PROPOSAL_FRAME_TRIES = 50
PROPOSAL_FRAME_RETRY_S = 0.1
#: Frames of one pair expected when the plan does not name the imagers.
STEREO_IMAGERS = 2


@dataclass
class LoginSession:
    """One logged-in user: name, role (therapist/physicist/admin), expiry (monotonic s), CSRF token."""

    operator: str
    role: str
    expiry_mono_s: float
    csrf: str

    def may(self, action: str) -> bool:
        return action in ROLE_COMMANDS.get(self.role, ())


@dataclass(eq=False)
class _Client:
    """One page connection: wake-up event and what it has already been sent."""

    ws: web.WebSocketResponse
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    timeline_from: int = 0
    frames_sent: dict[str, int] = field(default_factory=dict)
    proposal_sent: dict[str, int] = field(default_factory=dict)
    journal_sent: int = -1
    plans_sent: int = -1
    #: The login session the page connected with (None: anonymous: no frames, no patient data).
    token: str | None = None


class ConsoleServer:
    """The console: create, ``await start()``, ``await stop()`` (all on one event loop).

    Parameters
    ----------
    config : ConsoleConfig
    """

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.live = LiveState(config.timeline_s, config.tolerance_3d_mm)
        self.frames: dict[str, DisplayFrame] = {}
        self.frame_version: dict[str, int] = {}
        self.clients: set[_Client] = set()
        self.sessions: dict[str, LoginSession] = {}  # session token -> who
        self.guard = LoginGuard()
        self.journal: collections.deque[dict[str, Any]] = collections.deque(maxlen=JOURNAL_ENTRIES)
        self.journal_version = 0
        self.frame_times: dict[str, float | None] = {}
        self.proposal_frames: dict[str, DisplayFrame] = {}
        self.proposal_version: dict[str, int] = {}
        self.first_approval: dict[str, Any] | None = None  # a large correction's first sign-off
        self._record_file: Path | None = None
        self._record_offset = 0
        self._record_tail = b""
        self._ctx: zmq.asyncio.Context | None = None
        self._cmd_sock = None
        self._cmd_lock: asyncio.Lock | None = None
        self._cmd_seq = 0
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._frame_wanted: int | None = None
        self._frame_t: float | None = None
        self._frame_wake: asyncio.Event | None = None
        self._corrections: dict[int, dict] = {}
        self._status_mono: float | None = None
        #: The plans the page offers: the service's catalogue (``list_plans``), checked (fraction.plans_from_service).
        self.plans: tuple = ()
        self.plans_problems: list[str] = []
        self.plans_version = 0
        self._plans_session: str | None = None  # the service session whose catalogue ``plans`` is
        self._plans_asked: str | None = None
        #: The catalogue plan the service says is loaded (reply ``plan``); picks a catalogue plan's overlays.
        self.loaded_plan_id: str | None = None
        #: This console's own session id, sent with every command (``command/1.1``) and recorded with it.
        self.session_id = uuid.uuid4().hex
        #: The request seq of this console's last reply that named the loaded plan, until the record shows that
        #: command: the record is written behind the replies, and its older lines must not undo the reply.
        self._plan_awaited: int | None = None
        self.url: str | None = None
        self.app = build_app(self)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> str:
        """Connect to the service, bind HTTP; returns the page's URL."""
        await self.connect()
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.config.host}:{port}/"
        log.info("console on %s (service publish %s, command %s; commands %s)", self.url,
                 self.config.publish_address, self.config.command_address,
                 "need a login" if self.config.login_token else "disabled (read-only: no login token)")
        return self.url

    async def connect(self) -> None:
        """Subscribe to the service's PUB and start the feed and frame tasks (no HTTP; :meth:`start` does both)."""
        self._ctx = zmq.asyncio.Context()
        self._cmd_lock = asyncio.Lock()
        self._frame_wake = asyncio.Event()
        keys = self.config.client_keys
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1000)
        for topic in _TOPICS:
            sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        if keys is not None:
            make_client_socket_secure(sub, keys.client_secret, keys.server_public)
        sub.connect(self.config.publish_address)
        self._tasks.append(asyncio.create_task(self._feed(sub), name="console-feed"))
        self._tasks.append(asyncio.create_task(self._frame_loop(), name="console-frames"))
        self._tasks.append(asyncio.create_task(self._tick(), name="console-tick"))
        if self.config.record_path is not None:
            self._tasks.append(asyncio.create_task(self._record_loop(), name="console-record"))

    async def stop(self) -> None:
        """Cancel the feed and frame tasks, close page connections, HTTP and the ZeroMQ sockets."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                continue
            except Exception as err:  # noqa: BLE001 - shutting down: report, go on closing
                log.warning("console: task %s ended with %s: %s", t.get_name(), type(err).__name__, err)
        for c in list(self.clients):
            await c.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)

    # --------------------------------------------------------------- service feed
    async def _feed(self, sub) -> None:
        """Owns the SUB socket: decode, fold into the live state, wake the clients."""
        try:
            while True:
                parts = await sub.recv_multipart()
                topic = bytes(parts[0]).decode("ascii", "replace")
                try:
                    body = decode_json_message(parts, topic)
                except WireSchemaError as err:
                    log.warning("console: dropping a malformed %r message: %s", topic, err)
                    continue
                self.on_message(topic, body, time.time(), time.monotonic())
        finally:
            sub.close(0)

    def on_message(self, topic: str, body: dict[str, Any], received_unix_s: float, received_mono_s: float) -> None:
        """Fold one service message in and wake the page clients (event-loop thread)."""
        self.live.on_message(topic, body, received_unix_s, received_mono_s)
        if topic == "correction" and isinstance(body.get("pair_id"), int):
            self._corrections[body["pair_id"]] = body
            while len(self._corrections) > 8:
                self._corrections.pop(min(self._corrections))
        if topic == "gating" and isinstance(body.get("pair_id"), int) and self.config.frames_folder is not None:
            self._frame_wanted = body["pair_id"]  # only the newest pair is ever rendered
            self._frame_t = body.get("t_unix_s")
            self._frame_wake.set()
        if (topic == "correction" and body.get("purpose") == "proposal" and isinstance(body.get("pair_id"), int)
                and self.config.frames_folder is not None):
            # The approval screen shows the proposal's own pair, large, whatever newer pairs arrive.
            self.proposal_frames = {}
            self._tasks.append(asyncio.create_task(self._render_proposal(body)))
        if topic == "correction" and body.get("purpose") in ("setup", "verified"):
            self.first_approval = None
        if topic == "heartbeat" and self._cmd_lock is not None and (
                self._status_mono is None or (self.live.needs_status()
                                              and received_mono_s - self._status_mono > STATUS_RETRY_S)):
            # Tolerances and the pending correction: once at start, again if a proposal was missed.
            self._status_mono = received_mono_s
            self._tasks.append(asyncio.create_task(self._initial_status()))
        if topic == "heartbeat" and self._cmd_lock is not None and self.config.commands_enabled:
            session = body.get("session")
            if isinstance(session, str) and session != self._plans_session and session != self._plans_asked:
                # A new service session (or the first one heard): its catalogue, once.
                self._plans_asked = session
                self._tasks.append(asyncio.create_task(self._list_plans(session)))
        self._wake_all()

    async def _list_plans(self, session: str) -> None:
        """Ask the service for its plan catalogue; offer what checks out (nothing until it answers)."""
        try:
            reply = await self.command("list_plans", {})
        except TrackingError as err:
            log.warning("console: list_plans failed: %s", err)
            self._plans_asked = None  # asked again at the next heartbeat
            return
        if not reply.get("ok"):
            plans, problems = (), [f"the service refused list_plans: {str(reply.get('reason'))[:200]}"]
        else:
            plans, problems = plans_from_service(reply.get("plans"), self.config.plans)
        for problem in problems:
            log.warning("console: %s", problem)
        self.plans, self.plans_problems = plans, problems
        self._plans_session = reply.get("session") if isinstance(reply.get("session"), str) else session
        self.plans_version += 1
        self.on_reply(reply)
        self._wake_all()

    def on_reply(self, reply: dict[str, Any]) -> None:
        """Fold this console's own service reply in: the live state, and which catalogue plan is loaded."""
        self.live.on_reply(reply)
        if isinstance(reply, dict) and "plan" in reply:
            self._plan_from_reply(reply)
            if self.config.record_path is not None and isinstance(reply.get("request_seq"), int):
                self._plan_awaited = reply["request_seq"]

    def _plan_from_record(self, rec: dict[str, Any]) -> None:
        """A recorded command's reply names the loaded plan (any client's): followed once the record has caught
        up with this console's own last reply (its line: this console's session and that request seq)."""
        reply = rec.get("reply")
        if not isinstance(reply, dict) or "plan" not in reply:
            return
        if self._plan_awaited is not None:
            if rec.get("client_session") == self.session_id and reply.get("request_seq") == self._plan_awaited:
                self._plan_awaited = None
            return  # an older line than the reply already followed
        self._plan_from_reply(reply)

    def _plan_from_reply(self, reply: dict[str, Any]) -> None:
        plan = reply["plan"]
        self.loaded_plan_id = plan["plan_id"] if isinstance(plan, dict) and isinstance(plan.get("plan_id"), str) \
            else None

    def overlays(self) -> tuple:
        """``(planned, anatomy)`` for the frames now: the loaded catalogue plan's, or the console's one plan's."""
        if self.config.plan_overlays is not None:
            return self.config.plan_overlays.get(self.loaded_plan_id, (None, None))
        return self.config.planned, self.config.anatomy

    async def _initial_status(self) -> None:
        try:
            self.on_reply(await self.command("status", {}))
            self._adopted_proposal()
            self._wake_all()
        except TrackingError as err:
            log.warning("console: status request failed: %s", err)

    def _adopted_proposal(self) -> None:
        """A proposal learnt from a ``status`` reply (its message came before this console): render its frames."""
        p = self.live.proposal
        if (p is not None and isinstance(p.get("pair_id"), int) and self.config.frames_folder is not None
                and all(f.pair_id != p["pair_id"] for f in self.proposal_frames.values())):
            self.proposal_frames = {}
            self._tasks.append(asyncio.create_task(self._render_proposal(dict(p))))

    async def _tick(self) -> None:
        """Push the state now and then even when the service is silent (the page's rates and banners move)."""
        while True:
            await asyncio.sleep(TICK_S)
            self._wake_all()

    async def _render_proposal(self, correction: dict[str, Any]) -> None:
        pair_id = correction["pair_id"]
        # The approval waits for these frames: unlike a live pair (the next one replaces it), a proposal's
        # frames are worth waiting for while the record writer catches up on a loaded machine.
        for _ in range(PROPOSAL_FRAME_TRIES):
            try:
                rendered = await asyncio.get_running_loop().run_in_executor(
                    None, self._render_pair, pair_id, correction, self.config.approval_pixels)
            except Exception as err:  # noqa: BLE001 - a display failure must not stop the console
                log.warning("console: frames of proposal pair %d not displayed: %s", pair_id, err)
                return
            proposal = self.live.proposal
            if proposal is None or proposal.get("pair_id") != pair_id:
                return  # replaced or applied meanwhile
            if rendered:
                break
            await asyncio.sleep(PROPOSAL_FRAME_RETRY_S)
        else:
            log.warning("console: frames of proposal pair %d not found in %s", pair_id, self.config.frames_folder)
            return
        for frame in rendered:
            self.proposal_frames[frame.imager] = frame
            self.proposal_version[frame.imager] = self.proposal_version.get(frame.imager, 0) + 1
        self._wake_all()

    # ---------------------------------------------------------------- record: every client's commands
    async def _record_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                changed = await loop.run_in_executor(None, self.read_record_commands)
            except Exception as err:  # noqa: BLE001 - the journal is information; never stop the console
                log.warning("console: cannot read the service record %s: %s", self.config.record_path, err)
                changed = False
            if changed:
                self._wake_all()
            await asyncio.sleep(RECORD_POLL_S)

    def read_record_commands(self) -> bool:
        """Read the record's new complete lines; keep its ``command``/``command_rejected`` events. True if any."""
        path = self.config.record_path
        try:
            target = path.resolve(strict=True)
        except OSError:
            return False
        if target != self._record_file:  # a new service session: a new record (the link moved)
            self._record_file, self._record_offset, self._record_tail = target, 0, b""
            self.loaded_plan_id, self._plan_awaited = None, None  # a new session starts IDLE: no plan
            self.journal.clear()
            self.journal_version += 1
        with open(target, "rb") as f:
            f.seek(self._record_offset)
            data = f.read(4 * 1024 * 1024)
        if not data:
            return False
        self._record_offset += len(data)
        data = self._record_tail + data
        lines = data.split(b"\n")
        self._record_tail = lines.pop()
        found = False
        for line in lines:
            if b'"event":"command' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("event") not in ("command", "command_rejected"):
                continue
            self.journal.append(_journal_entry(rec))
            # Every reply names the loaded plan: also a plan another client loaded (the overlays follow it).
            self._plan_from_record(rec)
            found = True
        if found:
            self.journal_version += 1
        return found

    def _wake_all(self) -> None:
        for c in self.clients:
            c.wake.set()

    # ---------------------------------------------------------------- frames
    async def _frame_loop(self) -> None:
        loop = asyncio.get_running_loop()
        done = -1
        while True:
            await self._frame_wake.wait()
            self._frame_wake.clear()
            pair_id = self._frame_wanted
            # Only "the same pair again" is skipped: after an imager restart or a pair-id jump (a new epoch)
            # the numbering may go back, and those pairs are shown too.
            if pair_id is None or pair_id == done:
                continue
            done = pair_id
            t_pair = self._frame_t
            correction = self._corrections.get(pair_id)
            try:
                rendered = await loop.run_in_executor(None, self._render_pair, pair_id, correction)
            except Exception as err:  # noqa: BLE001 - a display failure must not stop the console
                log.warning("console: frames of pair %d not displayed: %s", pair_id, err)
                continue
            for frame in rendered:
                self.frames[frame.imager] = frame
                self.frame_times[frame.imager] = t_pair if isinstance(t_pair, (int, float)) else None
                self.frame_version[frame.imager] = self.frame_version.get(frame.imager, 0) + 1
            if rendered:
                self._wake_all()

    def _render_pair(self, pair_id: int, correction: dict | None, pixels: int | None = None,
                     window: tuple[float, float] | None = None) -> list[DisplayFrame]:
        """Read the pair's raw frames from the record folder and render them (thread pool)."""
        folder = self.config.frames_folder
        planned, anatomy = self.overlays()
        names = planned.geometry.names if planned is not None else None
        out = []
        for attempt in range(FRAME_TRIES):
            files = _pair_frame_files(folder, pair_id)
            if names is not None:
                files = {n: f for n, f in files.items() if n in names}
            try:
                arrays = {n: np.load(f, allow_pickle=False) for n, f in files.items()}
            except (OSError, ValueError, EOFError):
                arrays = None
            if arrays and len(arrays) >= (len(names) if names else STEREO_IMAGERS):
                break
            time.sleep(FRAME_RETRY_S)  # the service's record writer may still be writing this pair
        else:
            return out
        pose = _pose_of(correction) if anatomy is not None else None
        for name, frame_pixels in sorted(arrays.items()):
            overlays = ()
            if planned is not None:
                overlays = seed_overlays(planned.geometry[name], planned.points_room_mm, planned.names, correction)
            edges = None
            if pose is not None and name in anatomy.geometry.names:
                edges = functools.partial(drr_edges, anatomy, name, pose)
            out.append(render_frame(frame_pixels, name, pair_id, overlays, pixels or self.config.display_pixels,
                                    edges=edges, window_percentiles=window))
        return out

    # ---------------------------------------------------------------- commands
    async def command(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one ``command/1`` and return the service's ``reply/1`` (TrackingError on no reply)."""
        async with self._cmd_lock:
            if self._cmd_sock is None:
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                keys = self.config.client_keys
                if keys is not None:
                    make_client_socket_secure(sock, keys.client_secret, keys.server_public)
                sock.connect(self.config.command_address)
                self._cmd_sock = sock
            seq = self._cmd_seq
            self._cmd_seq += 1
            try:
                await asyncio.wait_for(self._cmd_sock.send_multipart(encode_command(seq, name, params,
                                                                                    session=self.session_id)),
                                       COMMAND_TIMEOUT_S)
                deadline = time.monotonic() + COMMAND_TIMEOUT_S
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    reply = decode_reply(await asyncio.wait_for(self._cmd_sock.recv_multipart(), remaining))
                    if reply.get("request_seq") in (seq, None):
                        return reply
            except TimeoutError:
                # A DEALER may deliver the late reply to the next request: start afresh.
                self._cmd_sock.close(0)
                self._cmd_sock = None
                raise TrackingError(f"command '{name}': no reply from the service at "
                                    f"{self.config.command_address} within {COMMAND_TIMEOUT_S} s") from None
            except WireSchemaError as err:
                raise TrackingError(f"command '{name}': malformed reply: {err}") from err

    # ------------------------------------------------------------------ auth
    async def login_async(self, operator: Any, secret: Any) -> tuple[int, dict[str, Any]]:
        """:meth:`login` with the password check (argon2, ~50 ms of CPU) on its own one-thread pool.

        The event loop keeps serving the feed while a password is checked, and a flood of logins queues on
        that one thread instead of taking the threads that render the frames.
        """
        users = self.config.users
        if users is None or not isinstance(operator, str) or self.guard.locked_for_s(operator.strip(),
                                                                                    time.monotonic()) > 0:
            return self.login(operator, secret, time.monotonic())
        verified = await asyncio.get_running_loop().run_in_executor(_PASSWORD_POOL, users.verify, operator.strip(),
                                                                    secret)
        return self.login(operator, secret, time.monotonic(), verified=verified)

    def login(self, operator: Any, secret: Any, now_mono_s: float, verified: Any = False) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, body)`` of a login attempt (``secret``: the user's password, or the console token).

        With per-user accounts (``users``) the name and password are checked by argon2 and the role is the
        account's; with only a console token, anyone who knows it logs in under the name they type, as a
        therapist. Failures lock the name tried (only that name) for a while (:class:`users.LoginGuard`).
        """
        if not self.config.commands_enabled:
            return 403, {"error": "this console is read-only: it was started without users (--users) or a "
                                  "login token (--token-file)"}
        if not isinstance(operator, str) or not operator.strip() or len(operator.strip()) > MAX_OPERATOR_CHARS \
                or not operator.strip().isprintable():
            return 400, {"error": f"operator name must be 1..{MAX_OPERATOR_CHARS} printable characters, "
                                  f"got {operator!r:.80}"}
        name = operator.strip()
        locked = self.guard.locked_for_s(name, now_mono_s)
        if locked > 0:
            return 429, {"error": f"too many failed logins for {name!r}: locked for another {locked:.0f} s "
                                  "(other users can log in)"}
        users = self.config.users
        if users is not None:
            user = users.verify(name, secret) if verified is False else verified
            role = user.role if user is not None else None
            wrong = "wrong user name or password"
        else:
            ok = isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.config.login_token.encode())
            role = "therapist" if ok else None
            wrong = "wrong login token"
        if role is None:
            self.guard.failed(name, now_mono_s)
            log.warning("console: failed login as %r", name)
            return 401, {"error": wrong}
        self.guard.succeeded(name)
        session = secrets.token_urlsafe(32)
        self.sessions[session] = LoginSession(name, role, now_mono_s + SESSION_LIFETIME_S, secrets.token_urlsafe(24))
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        log.info("console: %r logged in (%s)", name, role)
        return 200, {"session": session, "operator": name, "role": role, "csrf": self.sessions[session].csrf}

    def session_of(self, request: web.Request, now_mono_s: float) -> LoginSession | None:
        """The login of a request (``Authorization: Bearer`` or the session cookie with its CSRF header), or None.

        A request authenticated by the cookie alone must carry :data:`CSRF_HEADER` when it changes anything
        (any method but GET/HEAD): another page cannot set that header without a CORS preflight, refused.
        """
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer "):].strip()
            by_cookie = False
        else:
            token = request.cookies.get(SESSION_COOKIE, "")
            by_cookie = True
        entry = self.sessions.get(token)
        if entry is None:
            return None
        if entry.expiry_mono_s < now_mono_s:
            self.sessions.pop(token, None)
            return None
        if by_cookie and request.method not in ("GET", "HEAD") and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), entry.csrf.encode()):
            return None
        return entry

    def token_valid(self, token: str | None, now_mono_s: float) -> bool:
        """Whether a page connection's login session still holds (a logout or the expiry ends it at once)."""
        entry = self.sessions.get(token) if token is not None else None
        return entry is not None and entry.expiry_mono_s >= now_mono_s

    def operator_of(self, request: web.Request, now_mono_s: float) -> str | None:
        """The logged-in operator's name of a request, or None."""
        entry = self.session_of(request, now_mono_s)
        return entry.operator if entry is not None else None

    def token_of(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        return auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else request.cookies.get(SESSION_COOKIE, "")


# ====================================================================== HTTP
def _static(name: str) -> bytes:
    return resources.files("spineguide.tracking.console").joinpath("static", name).read_bytes()


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def build_app(console: ConsoleServer) -> web.Application:
    """The aiohttp application of ``console`` (routes in docs/CONSOLE.md)."""

    @web.middleware
    async def same_origin_only(request: web.Request, handler):
        # DNS rebinding: a hostile name resolving to 127.0.0.1 arrives with its own Host header.
        host = request.host.rsplit(":", 1)[0].strip("[]") if request.host else ""
        if not console.config.allow_remote and host not in _LOOPBACK_NAMES + (console.config.host,):
            raise web.HTTPForbidden(text=f"Host {request.host!r} refused: the console answers to loopback names only")
        # Another site's page in the operator's browser may not read the feed or post commands.
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text=f"cross-origin request from {origin!r} refused")
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024, middlewares=[same_origin_only])

    async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
        # Every response, errors and the WebSocket upgrade included (on_response_prepare sees them all).
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")

    app.on_response_prepare.append(security_headers)

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ("console.js", "console.css"):
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return web.Response(body=_static(name), content_type=_CONTENT_TYPES[Path(name).suffix])

    async def config(request: web.Request) -> web.Response:
        c = console.config
        return web.json_response({
            "correction_limit_mm": c.correction_limit_mm, "correction_limit_deg": c.correction_limit_deg,
            "approval": c.approval, "commands_enabled": c.commands_enabled,
            "accounts": "users" if c.users is not None else ("token" if c.login_token is not None else None),
            "plans": [p.to_json() for p in console.plans]
            if console.session_of(request, time.monotonic()) is not None else [],  # patient names: logged in only
            "approval_max_age_s": c.approval_max_age_s,
            "second_signoff_mm": c.second_signoff_mm, "second_signoff_deg": c.second_signoff_deg,
            "reasons": reasons_json(), "max_fraction": MAX_FRACTION,
            "page_commands": sorted(PAGE_COMMANDS), "frames": c.frames_folder is not None,
            "overlays": c.planned is not None or c.anatomy is not None
            or any(o != (None, None) for o in (c.plan_overlays or {}).values()), "reviews": c.records_folder is not None,
            "qa": c.qa_history is not None or c.calibration_report is not None})

    async def ws_feed(request: web.Request) -> web.WebSocketResponse:
        # No per-message compression: the frames are JPEG already, and deflating 20 states a second costs CPU.
        ws = web.WebSocketResponse(heartbeat=10.0, compress=False)
        await ws.prepare(request)
        client = _Client(ws)
        if console.session_of(request, time.monotonic()) is not None:
            # Frames and patient data go only to a logged-in page (the cookie, or a bearer token); the page
            # reconnects after logging in. Anonymous pages get the service state only.
            client.token = console.token_of(request)
        console.clients.add(client)
        client.wake.set()
        sender = asyncio.create_task(_send_loop(console, client))
        try:
            async for msg in ws:  # the page sends nothing; read to notice the close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            sender.cancel()
            console.clients.discard(client)
        return ws

    async def login(request: web.Request) -> web.Response:
        body = await _json_body(request)
        secret = body.get("password") if console.config.users is not None else body.get("token")
        status, out = await console.login_async(body.get("operator"), secret)
        response = web.json_response(out, status=status)
        if status == 200:
            response.set_cookie(SESSION_COOKIE, out["session"], httponly=True, samesite="Strict", path="/",
                                max_age=int(SESSION_LIFETIME_S))
        return response

    async def whoami(request: web.Request) -> web.Response:
        entry = console.session_of(request, time.monotonic())
        if entry is None:
            return web.json_response({"operator": None})
        return web.json_response({"operator": entry.operator, "role": entry.role, "csrf": entry.csrf})

    async def logout(request: web.Request) -> web.Response:
        if console.session_of(request, time.monotonic()) is not None:
            console.sessions.pop(console.token_of(request), None)
        response = web.json_response({"ok": True})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    def refuse(status: int, error: str) -> web.Response:
        return web.json_response({"error": error}, status=status)

    async def command(request: web.Request) -> web.Response:
        now_mono = time.monotonic()
        if not console.config.commands_enabled:
            return refuse(403, "this console is read-only (started without users or a login token)")
        who = console.session_of(request, now_mono)
        if who is None:
            return refuse(401, "log in first: commands need an operator session")
        body = await _json_body(request)
        name = body.get("command")
        params = body.get("params") or {}
        if not isinstance(name, str) or name not in PAGE_COMMANDS:
            return refuse(400, f"command {name!r:.80} cannot be sent from the console "
                               f"(allowed: {sorted(PAGE_COMMANDS)})")
        if not isinstance(params, dict) or set(params) - set(PAGE_COMMANDS[name]):
            return refuse(400, f"command {name!r} takes params {list(PAGE_COMMANDS[name])}, got {params!r:.200}")
        if not who.may(name):
            return refuse(403, f"{who.operator} ({who.role}) may not send {name!r}")
        pid = params.get("pair_id")
        if name == "approve_correction" and pid is None:
            return refuse(400, "approve_correction must name the proposal's pair_id")
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid < 0):
            return refuse(400, f"pair_id must be an integer >= 0, got {pid!r:.80}")
        level = params.get("level")
        if level is not None and (not isinstance(level, str) or not 1 <= len(level) <= 64 or not level.isprintable()):
            return refuse(400, f"level must be a vertebral level's name (1-64 printable characters), got {level!r:.80}")
        extra: dict[str, Any] = {}
        if name == "load_plan":
            error = _check_load_plan(console.plans, params)
            if error is not None:
                return refuse(400, error)
        if name == "approve_correction":
            status, error, extra = _check_approval(console, who, pid, time.time(), level)
            if status == 202:
                console._wake_all()
                return web.json_response({"ok": False, "awaiting_second_signoff": True, "reason": error,
                                          "first_signoff": console.first_approval}, status=202)
            if error is not None:
                return refuse(status, error)
        try:
            # The service's operator is this console's key; the login name and role are recorded beside it.
            reply = await console.command(name, {**params, "console_user": who.operator,
                                                 "console_role": who.role, **extra})
        except TrackingError as err:
            return refuse(502, str(err))
        if name == "approve_correction":
            console.first_approval = None
        console.on_reply(reply)
        console._adopted_proposal()
        console._wake_all()
        log.info("console: %s sent %s: %s", who.operator, name, "ok" if reply.get("ok") else reply.get("reason"))
        return web.json_response(reply)

    async def sessions(request: web.Request) -> web.Response:
        folder = console.config.records_folder
        if folder is None:
            return web.json_response({"error": "no records folder configured"}, status=404)
        return web.json_response({"folder": str(folder), "sessions": list_sessions(folder)})

    async def review(request: web.Request) -> web.Response:
        folder = console.config.records_folder
        if folder is None:
            raise web.HTTPNotFound(text="no records folder configured (--records DIR)")
        name = request.match_info["name"]
        try:
            path = resolve_session(folder, name)
            rev = await asyncio.get_running_loop().run_in_executor(None, review_session, path)
        except ReviewError as err:
            raise web.HTTPNotFound(text=str(err)) from None
        except TrackingError as err:
            raise web.HTTPUnprocessableEntity(text=str(err)) from None
        signoff = read_signoff(path)
        if request.path.startswith("/api/"):
            return web.json_response({**rev.to_json(), "signoff": signoff})
        doc = await asyncio.get_running_loop().run_in_executor(None, write_review_html, rev, None, signoff)
        headers = {"Content-Security-Policy": REVIEW_CSP}
        if request.query.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{Path(name).stem}-review.html"'
        return web.Response(text=doc, content_type="text/html", headers=headers)

    async def proposal_frame(request: web.Request) -> web.Response:
        """The proposal's frame of one imager re-rendered with the window the page asks for (window/level)."""
        if console.session_of(request, time.monotonic()) is None:
            return refuse(401, "log in first: frames are shown to logged-in users only")
        imager = request.match_info["imager"]
        proposal = console.live.proposal
        try:
            pair_id = int(request.query.get("pair_id", ""))
            lo, hi = float(request.query.get("lo", "")), float(request.query.get("hi", ""))
        except ValueError:
            raise web.HTTPBadRequest(text="need pair_id (integer), lo and hi (window percentiles)") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 100.0):
            raise web.HTTPBadRequest(text=f"window percentiles must satisfy 0 <= lo < hi <= 100, got {lo}, {hi}")
        if proposal is None or proposal.get("pair_id") != pair_id or console.config.frames_folder is None:
            raise web.HTTPNotFound(text=f"pair {pair_id} is not the proposal on this console")
        rendered = await asyncio.get_running_loop().run_in_executor(
            None, console._render_pair, pair_id, proposal, console.config.approval_pixels, (lo, hi))
        frame = next((f for f in rendered if f.imager == imager), None)
        if frame is None:
            raise web.HTTPNotFound(text=f"no frame of imager {imager!r:.40} in pair {pair_id}")
        return web.Response(body=frame.data, content_type=frame.mime, headers={"Cache-Control": "no-store"})

    async def report_pdf(request: web.Request) -> web.Response:
        folder = console.config.records_folder
        if folder is None:
            raise web.HTTPNotFound(text="no records folder configured (--records DIR)")
        name = request.match_info["name"]
        if not name.endswith(".pdf"):
            raise web.HTTPNotFound(text="reports are PDF: /report/<session>.pdf")
        name = name[:-len(".pdf")]
        try:
            path = resolve_session(folder, name)
            loop = asyncio.get_running_loop()
            rev = await loop.run_in_executor(None, review_session, path)
            pdf = await loop.run_in_executor(None, write_report_pdf, rev, read_signoff(path))
        except ReviewError as err:
            raise web.HTTPNotFound(text=str(err)) from None
        except TrackingError as err:
            raise web.HTTPUnprocessableEntity(text=str(err)) from None
        return web.Response(body=pdf, content_type="application/pdf", headers={
            "Content-Disposition": f'attachment; filename="{Path(name).stem}-report.pdf"'})

    async def signoff(request: web.Request) -> web.Response:
        folder = console.config.records_folder
        if folder is None:
            return refuse(404, "no records folder configured (--records DIR)")
        who = console.session_of(request, time.monotonic())
        if who is None:
            return refuse(401, "log in first: a sign-off needs a physicist's session")
        if not who.may("report_signoff"):
            return refuse(403, f"{who.operator} ({who.role}) may not sign a report off (a physicist may)")
        body = await _json_body(request)
        if set(body) - {"comment"}:
            return refuse(400, f"a sign-off takes only a comment, got {sorted(body)!r:.200}")
        try:
            path = resolve_session(folder, request.match_info["name"])
            doc = await asyncio.get_running_loop().run_in_executor(
                None, sign_off, path, who.operator, who.role, body.get("comment", ""), time.time())
        except ReviewError as err:
            return refuse(409 if "already signed" in str(err) else 400, str(err))
        log.info("console: %s signed off %s", who.operator, path.name)
        return web.json_response(doc)

    async def qa(request: web.Request) -> web.Response:
        doc = await asyncio.get_running_loop().run_in_executor(None, _qa_page, console.config)
        return web.Response(text=doc, content_type="text/html")

    async def calibration_file(request: web.Request) -> web.FileResponse:
        folder = console.config.calibration_report
        name = request.match_info["name"]
        if folder is None:
            raise web.HTTPNotFound(text="no calibration report configured (--calibration-report DIR)")
        path = (folder / name).resolve()
        if path.parent != folder.resolve() or not path.is_file() or path.suffix not in (".html", ".png"):
            raise web.HTTPNotFound(text=f"no file {name!r} in the calibration report")
        return web.FileResponse(path)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/favicon.ico", _no_content)
    app.router.add_get("/api/config", config)
    app.router.add_get("/ws", ws_feed)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/api/session", whoami)
    app.router.add_post("/api/command", command)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_get("/api/review/{name}", review)
    app.router.add_get("/review/{name}", review)
    app.router.add_get("/report/{name}", report_pdf)
    app.router.add_get("/api/proposal/{imager}", proposal_frame)
    app.router.add_post("/api/review/{name}/signoff", signoff)
    app.router.add_get("/qa", qa)
    app.router.add_get("/calibration/{name}", calibration_file)
    return app


async def _no_content(request: web.Request) -> web.Response:
    return web.Response(status=204)


def _check_load_plan(plans, params: dict[str, Any]) -> str | None:
    """Why a ``load_plan`` from the page is refused (None: it names one of the console's plans and a fraction)."""
    if not plans:
        return "no plan is offered (the service has not listed its plans to this console yet, or none checked out)"
    pid, plan_id, fraction = params.get("patient_id"), params.get("plan_id"), params.get("fraction")
    if not isinstance(pid, str) or not isinstance(plan_id, str):
        return "load_plan needs patient_id and plan_id (strings) of one of the console's plans"
    if not any(p.patient_id == pid and p.plan_id == plan_id for p in plans):
        return f"no plan {plan_id!r:.80} for patient {pid!r:.80} on this console"
    if not isinstance(fraction, int) or isinstance(fraction, bool) or not 1 <= fraction <= MAX_FRACTION:
        return f"fraction must be an integer from 1 to {MAX_FRACTION}, got {fraction!r:.40}"
    return None


def needs_second_signoff(config: ConsoleConfig, correction: dict[str, Any]) -> bool:
    """Whether a proposal is larger than the configured second-sign-off thresholds (never without thresholds)."""
    if config.second_signoff_mm is None and config.second_signoff_deg is None:
        return False
    try:
        t = [float(v) for v in correction["translation_mm"]]
        r = [float(v) for v in correction["rotation_deg"]]
    except (KeyError, TypeError, ValueError):
        return True  # doubt: ask for the second sign-off
    return ((config.second_signoff_mm is not None and math.hypot(*t) > config.second_signoff_mm)
            or (config.second_signoff_deg is not None and max(abs(v) for v in r) > config.second_signoff_deg))


def proposal_age_s(proposal: dict[str, Any] | None, now_unix_s: float) -> float | None:
    t = (proposal or {}).get("t_unix_s")
    return now_unix_s - t if isinstance(t, (int, float)) and math.isfinite(t) else None


def _check_approval(console: ConsoleServer, who: LoginSession, pid: int,
                    now_unix_s: float, level: str | None = None) -> tuple[int, str | None, dict[str, Any]]:
    """(status, error, extra params) of an approval from the page; status 202 = first of two sign-offs taken.

    With two sign-offs, the second approves the same level (per-level plans) as the first."""
    proposal = console.live.proposal
    if proposal is None:
        return 409, "no proposal is shown on this console", {}
    if proposal.get("pair_id") != pid:
        return 409, f"the proposal on this console is pair {proposal.get('pair_id')}, not {pid}", {}
    age = proposal_age_s(proposal, now_unix_s)
    limit = console.config.approval_max_age_s
    if age is not None and limit is not None and age > limit:
        return 409, f"the proposal is {age:.0f} s old: expired (limit {limit:g} s); wait for a new one", {}
    if not needs_second_signoff(console.config, proposal):
        return 200, None, {}
    first = console.first_approval
    if first is None or first.get("pair_id") != pid:
        console.first_approval = {"pair_id": pid, "operator": who.operator, "role": who.role, "t_unix_s": now_unix_s,
                                  "level": level}
        return 202, "a correction this large needs a second sign-off by a physicist (another user)", {}
    if first.get("level") != level:
        return 409, (f"the first sign-off approved level {first.get('level') or 'the target'}, this one "
                     f"{level or 'the target'}: both sign-offs must approve the same level"), {}
    if first["operator"] == who.operator:
        return 409, "the second sign-off must come from another user", {}
    if not who.may("second_signoff"):
        return 403, f"{who.operator} ({who.role}) may not give the second sign-off (a physicist may)", {}
    return 200, None, {"first_signoff": first["operator"]}


def _journal_entry(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's ``command``/``command_rejected`` event as the page shows it (any client's)."""
    params = rec.get("params") if isinstance(rec.get("params"), dict) else {}
    reply = rec.get("reply") if isinstance(rec.get("reply"), dict) else {}
    ok = bool(reply.get("ok")) if rec.get("event") == "command" else False
    return {"t_unix_s": rec.get("t_unix_s"), "command": str(rec.get("command"))[:64],
            "operator": str(params.get("operator", rec.get("operator", "?")))[:64],
            "console_user": None if params.get("console_user") is None else str(params["console_user"])[:64],
            "fraction": params.get("fraction") if isinstance(params.get("fraction"), int) else None,
            "patient_id": str(params["patient_id"])[:64] if isinstance(params.get("patient_id"), str) else None,
            "plan_id": str(params["plan_id"])[:64] if isinstance(params.get("plan_id"), str) else None,
            "ok": ok, "reason": None if ok else str(reply.get("reason", rec.get("reason", "")))[:200]}


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="request body must be a JSON object")
    return body


async def _send_loop(console: ConsoleServer, client: _Client) -> None:
    """Send the newest state and frames whenever woken; a slow client skips what it missed in between."""
    try:
        while not client.ws.closed:
            await client.wake.wait()
            client.wake.clear()
            state, client.timeline_from = console.live.snapshot(time.monotonic(), client.timeline_from)
            now = time.time()
            state["server_unix_s"] = now
            if client.journal_sent != console.journal_version:  # only when it changed (20 pushes a second)
                state["journal"] = list(console.journal)[-50:]
                client.journal_sent = console.journal_version
            authed = console.token_valid(client.token, time.monotonic())
            if authed and client.plans_sent != console.plans_version:
                state["plans"] = [p.to_json() for p in console.plans]
                state["plans_problems"] = console.plans_problems
                client.plans_sent = console.plans_version
            state["proposal_age_s"] = proposal_age_s(console.live.proposal, now)
            state["second_signoff_needed"] = (console.live.proposal is not None
                                              and needs_second_signoff(console.config, console.live.proposal))
            state["first_signoff"] = console.first_approval
            await client.ws.send_str(json.dumps(state, allow_nan=False, default=json_default))
            if not authed:
                if client.token is not None:  # logged out or expired: this connection sends state only from now
                    client.token = None
                continue
            for name, version in list(console.frame_version.items()):
                if client.frames_sent.get(name) == version:
                    continue
                frame = console.frames[name]
                client.frames_sent[name] = version
                await client.ws.send_str(json.dumps({
                    "type": "frame", "imager": frame.imager, "pair_id": frame.pair_id, "mime": frame.mime,
                    "marks": list(frame.marks),
                    "t_unix_s": console.frame_times.get(name), "data": base64.b64encode(frame.data).decode("ascii")}))
            for name, version in list(console.proposal_version.items()):
                frame = console.proposal_frames.get(name)
                if frame is None or client.proposal_sent.get(name) == version:
                    continue
                client.proposal_sent[name] = version
                await client.ws.send_str(json.dumps({
                    "type": "proposal_frame", "imager": frame.imager, "pair_id": frame.pair_id, "mime": frame.mime,
                    "marks": list(frame.marks),
                    "data": base64.b64encode(frame.data).decode("ascii")}))
    except (ConnectionResetError, RuntimeError) as err:
        log.info("console: page connection closed: %s", err)


def _qa_page(config: ConsoleConfig) -> str:
    """The QA view: QA trend table and plot, and the latest calibration report (links)."""
    from spineguide.calibration.errors import CalibrationError
    from spineguide.calibration.qa import read_history, trend
    from spineguide.calibration.report import write_trend_plot

    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>QA</title>"
             "<link rel='stylesheet' href='/static/console.css'></head><body class='doc'><h1>QA</h1>"
             "<p><a href='/'>live console</a></p>"]
    if config.calibration_report is not None and (config.calibration_report / "index.html").is_file():
        report = config.calibration_report / "index.html"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.stat().st_mtime))
        parts.append(f"<h2>Latest calibration report</h2><p id='qa-calibration'>"
                     f"<a href='/calibration/index.html'>calibration report</a> (written {when})</p>")
    else:
        parts.append("<h2>Latest calibration report</h2><p id='qa-calibration'>none configured</p>")
    parts.append("<h2>QA trend</h2>")
    if config.qa_history is None:
        parts.append("<p id='qa-trend'>no QA history configured (--qa-history FILE)</p>")
    else:
        try:
            records = read_history(config.qa_history)
            summary = trend(records)
            with tempfile.TemporaryDirectory() as tmp:
                png = write_trend_plot(records, Path(tmp) / "trend.png").read_bytes()
            parts.append(f"<p id='qa-latest'>latest: {html.escape(records[-1]['status'])}; "
                         f"{html.escape(summary.drift_line)}</p>"
                         f"<pre id='qa-trend'>{html.escape(summary.table)}</pre>"
                         f"<img alt='QA trend' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        except CalibrationError as err:
            parts.append(f"<p id='qa-trend' class='error'>{html.escape(str(err))}</p>")
    parts.append("</body></html>")
    return "".join(parts)


class ConsoleThread:
    """A :class:`ConsoleServer` on its own event loop in a background thread (CLI tests, browser tests, benchmark).

    ``start()`` returns the URL once the server listens; ``stop()`` ends it. Only that thread touches the server.
    """

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.server: ConsoleServer | None = None
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TrackingError(f"console did not start within {timeout_s} s")
        if self._error is not None:
            raise TrackingError(f"console did not start: {self._error}") from self._error
        return self.url

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.server = ConsoleServer(self.config)
            self.url = self._loop.run_until_complete(self.server.start())
        except BaseException as err:  # noqa: BLE001 - handed to start()
            self._error = err
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.stop())
        self._loop.close()

    def call(self, fn, timeout_s: float = 5.0):
        """Run ``fn(server)`` on the console's loop (a coroutine function or a plain one) and return its result."""
        async def run():
            out = fn(self.server)
            return await out if asyncio.iscoroutine(out) else out
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)

    def __enter__(self) -> ConsoleThread:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pose_of(correction: dict | None):
    """The patient pose a ``correction/1`` message implies (the inverse of its correction), or None."""
    if not correction:
        return None
    from spineguide.registration.pose import Correction

    try:
        return Correction.from_six(correction["translation_mm"], correction["rotation_deg"]).to_pose()
    except (KeyError, TypeError, ValueError):
        return None


def _pair_frame_files(folder: Path, pair_id: int) -> dict[str, Path]:
    """Imager name -> raw frame file of ``pair_id`` in a record's frames folder, from the newest epoch only.

    The record names frames ``<pair_id:08d>_<imager>.npy`` in the first epoch and
    ``e<epoch>_<pair_id:08d>_<imager>.npy`` after an imager restart or a pair-id jump
    (:meth:`spineguide.tracking.service.record.SessionRecord.save_frame`), so the same pair id can be there more than once;
    frames of two epochs are never shown as one pair.
    """
    pattern = re.compile(rf"(?:e(\d+)_)?{int(pair_id):08d}_([^.]+)\.npy")
    by_epoch: dict[int, dict[str, Path]] = {}
    try:
        entries = list(folder.iterdir())
    except OSError:
        return {}
    for f in entries:
        m = pattern.fullmatch(f.name)
        if m is not None:
            by_epoch.setdefault(int(m.group(1) or 0), {})[m.group(2)] = f
    return by_epoch[max(by_epoch)] if by_epoch else {}
