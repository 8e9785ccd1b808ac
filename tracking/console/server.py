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
import functools
import hmac
import html
import json
import logging
import math
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
from .live import LiveState
from .review import (
    ReviewError,
    list_sessions,
    resolve_session,
    review_session,
    write_review_html,
)

__all__ = ["PAGE_COMMANDS", "ConsoleServer", "ConsoleThread", "build_app"]

log = logging.getLogger(__name__)

#: Commands the page may send (each needs a logged-in operator), with the params it may pass.
#: ``approve_correction`` must name the pair it approves (the service refuses it otherwise).
PAGE_COMMANDS: dict[str, tuple[str, ...]] = {
    "approve_correction": ("pair_id",),
    "start_monitoring": (),
    "start_setup": (),
    "pause": (),
    "resume": (),
}
#: A login session lasts this long, s.
SESSION_LIFETIME_S = 12 * 3600.0
#: Failed logins allowed per minute before logins are refused for the rest of that minute.
MAX_FAILED_LOGINS_PER_MIN = 10
#: Longest operator name, characters.
MAX_OPERATOR_CHARS = 64
#: How long the console waits for the service's reply to a command, s.
COMMAND_TIMEOUT_S = 3.0
#: Tries and pause when a raw frame file is not (completely) written yet.
FRAME_TRIES = 4
FRAME_RETRY_S = 0.02

_TOPICS = ("heartbeat", "gating", "correction")
#: Shortest interval between two ``status`` requests the console makes on its own, s.
STATUS_RETRY_S = 2.0
#: Frames of one pair expected when the plan does not name the imagers.
STEREO_IMAGERS = 2


@dataclass(eq=False)
class _Client:
    """One page connection: wake-up event and what it has already been sent."""

    ws: web.WebSocketResponse
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    timeline_from: int = 0
    frames_sent: dict[str, int] = field(default_factory=dict)


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
        self.sessions: dict[str, tuple[str, float]] = {}  # session token -> (operator, expiry monotonic s)
        self._failed_logins: list[float] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._cmd_sock = None
        self._cmd_lock: asyncio.Lock | None = None
        self._cmd_seq = 0
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._frame_wanted: int | None = None
        self._frame_wake: asyncio.Event | None = None
        self._corrections: dict[int, dict] = {}
        self._status_mono: float | None = None
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
            self._frame_wake.set()
        if topic == "heartbeat" and self._cmd_lock is not None and (
                self._status_mono is None or (self.live.needs_status()
                                              and received_mono_s - self._status_mono > STATUS_RETRY_S)):
            # Tolerances and the pending correction: once at start, again if a proposal was missed.
            self._status_mono = received_mono_s
            self._tasks.append(asyncio.create_task(self._initial_status()))
        self._wake_all()

    async def _initial_status(self) -> None:
        try:
            self.live.on_reply(await self.command("status", {}))
            self._wake_all()
        except TrackingError as err:
            log.warning("console: status request failed: %s", err)

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
            correction = self._corrections.get(pair_id)
            try:
                rendered = await loop.run_in_executor(None, self._render_pair, pair_id, correction)
            except Exception as err:  # noqa: BLE001 - a display failure must not stop the console
                log.warning("console: frames of pair %d not displayed: %s", pair_id, err)
                continue
            for frame in rendered:
                self.frames[frame.imager] = frame
                self.frame_version[frame.imager] = self.frame_version.get(frame.imager, 0) + 1
            if rendered:
                self._wake_all()

    def _render_pair(self, pair_id: int, correction: dict | None) -> list[DisplayFrame]:
        """Read the pair's raw frames from the record folder and render them (thread pool)."""
        folder = self.config.frames_folder
        planned = self.config.planned
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
        anatomy = self.config.anatomy
        pose = _pose_of(correction) if anatomy is not None else None
        for name, pixels in sorted(arrays.items()):
            overlays = ()
            if planned is not None:
                overlays = seed_overlays(planned.geometry[name], planned.points_room_mm, planned.names, correction)
            edges = None
            if pose is not None and name in anatomy.geometry.names:
                edges = functools.partial(drr_edges, anatomy, name, pose)
            out.append(render_frame(pixels, name, pair_id, overlays, self.config.display_pixels, edges=edges))
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
                await asyncio.wait_for(self._cmd_sock.send_multipart(encode_command(seq, name, params)),
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
    def login(self, operator: Any, token: Any, now_mono_s: float) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, body)`` of a login attempt; a session token on success."""
        if self.config.login_token is None:
            return 403, {"error": "this console is read-only: it was started without a login token (--token-file)"}
        self._failed_logins = [t for t in self._failed_logins if t > now_mono_s - 60.0]
        if len(self._failed_logins) >= MAX_FAILED_LOGINS_PER_MIN:
            return 429, {"error": f"more than {MAX_FAILED_LOGINS_PER_MIN} failed logins in a minute; wait"}
        if not isinstance(operator, str) or not operator.strip() or len(operator.strip()) > MAX_OPERATOR_CHARS \
                or not operator.strip().isprintable():
            return 400, {"error": f"operator name must be 1..{MAX_OPERATOR_CHARS} printable characters, "
                                  f"got {operator!r}"}
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.config.login_token.encode()):
            self._failed_logins.append(now_mono_s)
            log.warning("console: failed login as %r", operator)
            return 401, {"error": "wrong login token"}
        session = secrets.token_urlsafe(32)
        self.sessions[session] = (operator.strip(), now_mono_s + SESSION_LIFETIME_S)
        log.info("console: %r logged in", operator.strip())
        return 200, {"session": session, "operator": operator.strip()}

    def operator_of(self, request: web.Request, now_mono_s: float) -> str | None:
        """The logged-in operator of a request's ``Authorization: Bearer`` session, or None."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        entry = self.sessions.get(auth[len("Bearer "):].strip())
        if entry is None or entry[1] < now_mono_s:
            return None
        return entry[0]


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
            "approval": c.approval, "commands_enabled": c.login_token is not None,
            "page_commands": sorted(PAGE_COMMANDS), "frames": c.frames_folder is not None,
            "overlays": c.planned is not None, "reviews": c.records_folder is not None,
            "qa": c.qa_history is not None or c.calibration_report is not None})

    async def ws_feed(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=10.0)
        await ws.prepare(request)
        client = _Client(ws)
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
        status, out = console.login(body.get("operator"), body.get("token"), time.monotonic())
        return web.json_response(out, status=status)

    async def logout(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        console.sessions.pop(auth[len("Bearer "):].strip(), None)
        return web.json_response({"ok": True})

    async def command(request: web.Request) -> web.Response:
        operator = console.operator_of(request, time.monotonic())
        if console.config.login_token is None:
            return web.json_response({"error": "this console is read-only (started without a login token)"},
                                     status=403)
        if operator is None:
            return web.json_response({"error": "log in first: commands need an operator session"}, status=401)
        body = await _json_body(request)
        name = body.get("command")
        params = body.get("params") or {}
        if name not in PAGE_COMMANDS:
            return web.json_response({"error": f"command {name!r} cannot be sent from the console "
                                               f"(allowed: {sorted(PAGE_COMMANDS)})"}, status=400)
        if not isinstance(params, dict) or set(params) - set(PAGE_COMMANDS[name]):
            return web.json_response({"error": f"command {name!r} takes params {list(PAGE_COMMANDS[name])}, "
                                               f"got {params!r}"}, status=400)
        pid = params.get("pair_id")
        if name == "approve_correction" and pid is None:
            return web.json_response({"error": "approve_correction must name the proposal's pair_id"}, status=400)
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid < 0):
            return web.json_response({"error": f"pair_id must be an integer >= 0, got {pid!r}"}, status=400)
        try:
            # The service's operator is this console's key; the login name is recorded beside it.
            reply = await console.command(name, {**params, "console_user": operator})
        except TrackingError as err:
            return web.json_response({"error": str(err)}, status=502)
        console.live.on_reply(reply)
        console._wake_all()
        log.info("console: %s sent %s: %s", operator, name, "ok" if reply.get("ok") else reply.get("reason"))
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
        if request.path.startswith("/api/"):
            return web.json_response(rev.to_json())
        doc = await asyncio.get_running_loop().run_in_executor(None, write_review_html, rev)
        headers = {}
        if request.query.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{Path(name).stem}-review.html"'
        return web.Response(text=doc, content_type="text/html", headers=headers)

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
    app.router.add_get("/api/config", config)
    app.router.add_get("/ws", ws_feed)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_post("/api/command", command)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_get("/api/review/{name}", review)
    app.router.add_get("/review/{name}", review)
    app.router.add_get("/qa", qa)
    app.router.add_get("/calibration/{name}", calibration_file)
    return app


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
            state["server_unix_s"] = time.time()
            await client.ws.send_str(json.dumps(state, allow_nan=False, default=json_default))
            for name, version in list(console.frame_version.items()):
                if client.frames_sent.get(name) == version:
                    continue
                frame = console.frames[name]
                client.frames_sent[name] = version
                await client.ws.send_str(json.dumps({
                    "type": "frame", "imager": frame.imager, "pair_id": frame.pair_id, "mime": frame.mime,
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
