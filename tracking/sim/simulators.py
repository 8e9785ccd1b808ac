"""Simulated peers of the service: the imaging system, the delivery system, and small clients.

- :class:`FrameSender` (PUSH ``kvframe/1``), :class:`CommandClient` (DEALER
  ``command/1`` -> ``reply/1``) and :class:`Subscriber` (SUB to the service's
  PUB) are the clients the simulators, tests and benchmarks use. Each owns
  one socket and must be used by one thread only.
- :func:`run_imager_sim` (``spineguide imager-sim``) streams stereo pairs
  along a :class:`MotionTrace`; the patient pose is the couch state (from the
  delivery-sim's ``couch/1``) composed with the motion:
  ``P_true(t) = C_couch o M(t) o P_setup``.
- :func:`run_delivery_sim` (``spineguide delivery-sim``) obeys gating with
  permission expiry (the beam is on only while it holds an unexpired
  ENABLE), applies ``correction/1`` messages marked ``apply`` to a simulated
  couch with latency and residual error, sends ``couch_moved`` and publishes
  ``couch/1``.

Frames are test-pattern frames (:func:`pattern_frame`): a flat detector
signal with seeded noise and the true pose stamped into row 0 for the
:class:`~spineguide.tracking.service.processing.PatternProcessor`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from spineguide.registration.pose import Correction, Pose

from ..errors import TrackingError, WireSchemaError
from ..room.motion import Drift, MotionSum, Oscillation, SuddenShift
from ..service.processing import stamp_pose_pattern
from ..service.security import ClientKeys, make_client_socket_secure
from ..service.wire import (
    SeqCounter,
    decode_couch,
    decode_json_message,
    decode_reply,
    encode_command,
    encode_couch,
    encode_kvframe,
)

__all__ = [
    "FrameSender",
    "CommandClient",
    "Subscriber",
    "pattern_frame",
    "MotionTrace",
    "CouchModel",
    "run_imager_sim",
    "ViewBlock",
    "run_delivery_sim",
    "DeliveryReport",
    "LocalPeers",
    "RoomFrames",
    "room_plan_phantom",
    "write_room_plan",
]

log = logging.getLogger(__name__)


def _socket(ctx: zmq.Context, kind: int, address: str, keys: ClientKeys | None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        make_client_socket_secure(sock, keys.client_secret, keys.server_public)
    sock.connect(address)
    return sock


class FrameSender:
    """PUSH of ``kvframe/1.1`` messages to the service (owned by one thread).

    ``session`` (a new ``uuid4().hex`` per sender) tells the service when the
    imaging system restarted: a new session starts a new pair numbering.
    """

    def __init__(self, ctx: zmq.Context, address: str, keys: ClientKeys | None = None) -> None:
        self.sock = _socket(ctx, zmq.PUSH, address, keys)
        self.sock.setsockopt(zmq.SNDHWM, 4)
        self.seq = SeqCounter()
        self.session = uuid.uuid4().hex

    def send_frame(self, imager: str, pair_id: int, acquired_unix_s: float, pixels: np.ndarray,
                   i0: float | None = None) -> None:
        self.send_parts(encode_kvframe(self.seq.next(), imager, pair_id, acquired_unix_s, pixels, i0,
                                       self.session))

    def send_parts(self, parts: list[bytes], timeout_s: float = 1.0) -> None:
        """Send raw parts (fault injection); raises TrackingError if the service does not take them."""
        if not self.sock.poll(int(timeout_s * 1e3), zmq.POLLOUT):
            raise TrackingError(f"frame sender: the service did not accept a frame within {timeout_s} s")
        self.sock.send_multipart(parts, copy=False)

    def close(self) -> None:
        self.sock.close(0)


class CommandClient:
    """DEALER for ``command/1`` requests; :meth:`request` waits for the ``reply/1`` (owned by one thread)."""

    def __init__(self, ctx: zmq.Context, address: str, keys: ClientKeys | None = None,
                 send_timeout_s: float = 2.0) -> None:
        self.sock = _socket(ctx, zmq.DEALER, address, keys)
        # A DEALER with no completed connection (service down, CURVE refused) blocks on send: bound it.
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1e3))
        self.seq = SeqCounter()
        self.session = uuid.uuid4().hex  # sent in every command/1.1

    def send(self, command: str, params: dict[str, Any] | None = None) -> int:
        """Send one request; returns its ``seq``. TrackingError when it cannot be handed to the service."""
        seq = self.seq.next()
        try:
            self.sock.send_multipart(encode_command(seq, command, params, self.session))
        except zmq.Again:
            raise TrackingError(f"command '{command}' could not be sent: no connection to the service") from None
        return seq

    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next reply; raises TrackingError after ``timeout_s``."""
        if not self.sock.poll(int(timeout_s * 1e3)):
            raise TrackingError(f"no reply from the service within {timeout_s} s")
        return decode_reply(self.sock.recv_multipart())

    def request(self, command: str, params: dict[str, Any] | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        """Send one command and wait for its reply (stale replies to earlier requests are skipped)."""
        seq = self.send(command, params)
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.receive(max(0.0, deadline - time.monotonic()))
            if reply.get("request_seq") in (seq, None):
                return reply

    def close(self) -> None:
        self.sock.close(0)


class Subscriber:
    """SUB to the service's PUB; keeps every message received, with its receive time (owned by one thread)."""

    def __init__(self, ctx: zmq.Context, address: str, keys: ClientKeys | None = None,
                 topics: tuple[str, ...] = ("",)) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        for t in topics:
            self.sock.setsockopt_string(zmq.SUBSCRIBE, t)
        if keys is not None:
            make_client_socket_secure(self.sock, keys.client_secret, keys.server_public)
        self.sock.connect(address)
        self.messages: list[tuple[float, dict[str, Any]]] = []  # (receive monotonic s, message)
        self._cursor = 0

    def poll(self, timeout_s: float) -> list[dict[str, Any]]:
        """Receive whatever arrives within ``timeout_s`` (returns the new messages)."""
        new = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1e3))
            if not self.sock.poll(remaining_ms if not new else 0):
                break
            parts = self.sock.recv_multipart()
            topic = bytes(parts[0]).decode("ascii", "replace")
            try:
                msg = decode_json_message(parts, topic)
            except (WireSchemaError, KeyError) as err:
                log.warning("subscriber: dropping a malformed %r message: %s", topic, err)
                continue
            msg["_topic"] = topic
            self.messages.append((time.monotonic(), msg))
            new.append(msg)
            if time.monotonic() >= deadline:
                break
        return new

    def collect(self, duration_s: float) -> list[dict[str, Any]]:
        """Receive everything for ``duration_s`` seconds (returns the new messages)."""
        new = []
        deadline = time.monotonic() + duration_s
        while (remaining := deadline - time.monotonic()) > 0:
            new += self.poll(remaining)
        return new

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        """The first message after the previous match for which ``predicate`` holds; TrackingError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            while self._cursor < len(self.messages):
                msg = self.messages[self._cursor][1]
                self._cursor += 1
                if predicate(msg):
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TrackingError(f"no matching message within {timeout_s} s")
            self.poll(min(remaining, 0.05))

    def received_at(self, msg: dict[str, Any]) -> float:
        """Monotonic receive time of a message returned by :meth:`wait_for`."""
        for t, m in self.messages:
            if m is msg:
                return t
        raise TrackingError("message not received by this subscriber")

    def handshake(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Wait for the first heartbeat: the subscription is live (no sleeping for subscribers)."""
        return self.wait_for(lambda m: m["_topic"] == "heartbeat", timeout_s)

    def close(self) -> None:
        self.sock.close(0)


# ------------------------------------------------------------------ frames
def pattern_frame(pose: Pose, rows: int = 64, cols: int = 64, i0: float = 20000.0, seed: int = 0) -> np.ndarray:
    """A uint16 test-pattern frame: flat signal ~0.6 * i0 with Poisson-like noise and ``pose`` stamped in row 0."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.6 * i0, math.sqrt(0.6 * i0), (rows, cols))
    return stamp_pose_pattern(np.clip(base, 0, 65534).astype(np.uint16), pose)


class RoomFrames:
    """Raw frames of the virtual room's small thoracolumbar phantom, fast enough to stream at 10 Hz.

    The anatomy (bone, soft tissue) is projected once, at perfect setup; the
    gold seeds are projected analytically at the true pose of every pair
    (``spineguide.tracking.room.kv.seed_transmission``), and each frame gets Poisson
    noise. The seeds -- what the fiducial method measures -- are exact; the
    anatomy does not move with the patient (a simulation shortcut: a full
    re-render costs ~0.4 s per pair at 512 pixels).

    Parameters
    ----------
    panel_pixels, pixel_spacing_mm : int, float
        Panel of the default stereo room (512 x 0.8 mm: the 41 cm panel binned 2x).
    i0 : float
        Unattenuated detector signal.
    geometry : StereoGeometry, optional
        The room as it truly is (e.g. perturbed from the nominal one, which
        only calibration measures); default the nominal room.
    """

    def __init__(self, panel_pixels: int = 512, pixel_spacing_mm: float = 0.8, i0: float = 20000.0,
                 geometry=None) -> None:
        from spineguide.registration.drr import compute_drr
        from spineguide.tracking.room.kv import KVSimulator

        self.phantom, self.geometry = room_plan_phantom(panel_pixels, pixel_spacing_mm)
        if geometry is not None:
            self.geometry = geometry
        self.i0 = float(i0)
        self._sim = KVSimulator(self.phantom, self.geometry)
        self._background = {im.name: self.i0 * np.exp(-compute_drr(self._sim.volume, im).astype(np.float64))
                            for im in self.geometry.imagers}

    def render(self, pose: Pose, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``{imager: uint16 frame}`` of the phantom's seeds at ``pose`` (room frame)."""
        from spineguide.tracking.room.kv import seed_transmission

        markers = self._sim.markers(pose)
        out = {}
        for im in self.geometry.imagers:
            primary = self._background[im.name] * seed_transmission(im, markers, self._sim.detector.seed_supersampling)
            out[im.name] = np.minimum(rng.poisson(primary), 65535).astype(np.uint16)
        return out


def room_plan_phantom(panel_pixels: int = 512, pixel_spacing_mm: float = 0.8):
    """The phantom and stereo geometry the simulated fraction uses (deterministic: same in every process)."""
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.tracking.room.phantoms import thoracolumbar_phantom

    phantom = thoracolumbar_phantom(truth_spacing_mm=3.0, planning_spacing_mm=(3.0, 3.0, 4.0), seed=0)
    return phantom, default_stereo_geometry(panel_pixels=panel_pixels, pixel_spacing_mm=pixel_spacing_mm)


def write_room_plan(folder: Path, panel_pixels: int = 512, pixel_spacing_mm: float = 0.8) -> dict[str, Any]:
    """Write the fraction phantom's plan: ``geometry.json``, ``ct.mha``, ``fiducials.json``; returns names + isocentre."""
    from spineguide.calibration.io import write_geometry
    from spineguide.registration.ctfile import write_ct
    from spineguide.registration.io import FiducialSet, write_fiducials

    phantom, geometry = room_plan_phantom(panel_pixels, pixel_spacing_mm)
    folder = Path(folder)
    write_geometry(geometry, folder / "geometry.json")
    write_ct(phantom.planning_ct, folder / "ct.mha")
    seeds = FiducialSet(tuple(s.name for s in phantom.seeds), np.stack([s.centre_lps_mm for s in phantom.seeds]))
    write_fiducials(seeds, folder / "fiducials.json")
    return {"geometry": "geometry.json", "ct": "ct.mha", "fiducials": "fiducials.json",
            "isocentre_lps_mm": [float(v) for v in phantom.isocentre_lps_mm]}


# ------------------------------------------------------------------ motion
@dataclass(frozen=True, slots=True)
class MotionTrace:
    """Intrafraction patient motion ``M(t)`` (room frame), a pose per time since the start.

    A slow drift (mm/min per axis), a small periodic component along room Z (mm, s) and
    sudden shifts ``(t_s, translation_mm)`` that stay once they happen: the simulators' JSON form of a
    :mod:`spineguide.tracking.room.motion` model (:meth:`motion`), which computes the poses.
    """

    drift_mm_per_min: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wobble_mm: float = 0.0
    wobble_period_s: float = 4.0
    shifts: tuple[tuple[float, tuple[float, float, float]], ...] = ()

    def motion(self) -> MotionSum:
        """The motion model: drift, then the Z wobble, then each shift (translations add)."""
        drift = Drift(np.asarray(self.drift_mm_per_min, dtype=np.float64) / 60.0)
        wobble = Oscillation((0.0, 0.0, self.wobble_mm), self.wobble_period_s)
        shifts = [SuddenShift(at_s, Pose.from_six(shift, (0.0, 0.0, 0.0))) for at_s, shift in self.shifts]
        return MotionSum((drift, wobble, *shifts))

    def pose(self, t_s: float) -> Pose:
        """``M(t)`` at ``t_s`` seconds since the start (mm)."""
        return self.motion().pose_at(t_s)

    def to_json(self) -> dict[str, Any]:
        return {"drift_mm_per_min": list(self.drift_mm_per_min), "wobble_mm": self.wobble_mm,
                "wobble_period_s": self.wobble_period_s, "shifts": [[a, list(s)] for a, s in self.shifts]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MotionTrace:
        return cls(tuple(obj.get("drift_mm_per_min", (0, 0, 0))), float(obj.get("wobble_mm", 0.0)),
                   float(obj.get("wobble_period_s", 4.0)),
                   tuple((float(a), tuple(s)) for a, s in obj.get("shifts", ())))


# ------------------------------------------------------------------ imager-sim
#: Fraction of the signal a blocked view still gets (the gantry head between source and panel: a few
#: centimetres of steel and lead, far more than the 4.6 attenuation lengths this stands for).
BLOCKED_TRANSMISSION = 0.01


@dataclass(frozen=True, slots=True)
class ViewBlock:
    """One imager's view blocked from ``start_s`` to ``end_s`` (imager-sim clock, s).

    ``mode``: ``dark`` -- the frame is still sent, with ``BLOCKED_TRANSMISSION`` of its signal (the gantry
    in the beam); ``missing`` -- no frame is sent (the imaging system skips the exposure).
    """

    start_s: float
    end_s: float
    imager: str
    mode: str = "dark"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s) and 0 <= self.start_s < self.end_s):
            raise TrackingError(f"view block: need 0 <= start < end (s), got {self.start_s!r}, {self.end_s!r}")
        if not isinstance(self.imager, str) or not self.imager:
            raise TrackingError(f"view block: imager must be a name, got {self.imager!r}")
        if self.mode not in ("dark", "missing"):
            raise TrackingError(f"view block: mode must be 'dark' or 'missing', got {self.mode!r}")

    @classmethod
    def parse(cls, text: str) -> "ViewBlock":
        """From ``START,END,IMAGER[,MODE]`` (the ``--block`` option)."""
        parts = str(text).split(",")
        if len(parts) not in (3, 4):
            raise TrackingError(f"--block must be START,END,IMAGER[,dark|missing], got {text!r}")
        try:
            start, end = float(parts[0]), float(parts[1])
        except ValueError as err:
            raise TrackingError(f"--block: START and END must be numbers (s), got {text!r}") from err
        return cls(start, end, parts[2].strip(), parts[3].strip() if len(parts) == 4 else "dark")

    def blocks(self, imager: str, t_s: float) -> bool:
        return imager == self.imager and self.start_s <= t_s < self.end_s


def run_imager_sim(frames_address: str, duration_s: float, setup_error: Pose, trace: MotionTrace,
                   couch_address: str | None = None, frame_period_s: float = 0.1, rows: int = 64, cols: int = 64,
                   imagers: tuple[str, str] = ("A", "B"), keys: ClientKeys | None = None, seed: int = 0,
                   truth_path: Path | None = None, ctx: zmq.Context | None = None, first_pair_id: int = 0,
                   room: RoomFrames | None = None, blocks: tuple[ViewBlock, ...] = ()) -> int:
    """Stream stereo pairs at ``frame_period_s`` for ``duration_s``; returns the number of pairs sent.

    The true pose of pair k is ``C_couch o M(t_k) o setup_error`` with the
    latest ``couch/1`` state from ``couch_address`` (identity if none). With
    ``truth_path`` each pair's true pose is written as a JSON line (for the
    fraction summary, with the views blocked). With ``room`` the frames are the virtual room's
    (:class:`RoomFrames`, for the fiducial method); else test-pattern frames. ``blocks``: views
    blocked by the gantry (:class:`ViewBlock`): a dark frame, or none.
    """
    for b in blocks:
        if b.imager not in (room.geometry.names if room is not None else imagers):
            raise TrackingError(f"view block names imager {b.imager!r}; the room has {list(imagers)}")
    own = ctx is None
    ctx = ctx or zmq.Context()
    sender = FrameSender(ctx, frames_address, keys)
    couch_sub = None
    if couch_address:
        couch_sub = ctx.socket(zmq.SUB)
        couch_sub.setsockopt(zmq.LINGER, 0)
        couch_sub.setsockopt_string(zmq.SUBSCRIBE, "couch")
        couch_sub.connect(couch_address)
    couch = Correction.identity()
    truth = open(truth_path, "a") if truth_path else None
    bases = {name: pattern_frame(Pose.identity(), rows, cols, seed=seed + i) for i, name in enumerate(imagers)}
    start = time.monotonic()
    pair_id = first_pair_id
    try:
        next_t = start
        while time.monotonic() - start < duration_s:
            # Stamp first, then read the couch: a pair stamped after the service heard
            # couch_moved then always shows the moved couch (couch/1 is sent before couch_moved).
            now_unix = time.time()
            while couch_sub is not None and couch_sub.poll(0):
                try:
                    msg = decode_couch(couch_sub.recv_multipart())
                    couch = Correction.from_six(msg["translation_mm"], msg["rotation_deg"])
                except WireSchemaError as err:
                    log.warning("imager-sim: bad couch/1: %s", err)
            t_s = time.monotonic() - start
            # Applying the couch correction C moves every patient point p -> C p: P_true = C o M(t) o P_setup.
            true_pose = Pose.from_matrix(couch.matrix @ trace.pose(t_s).matrix @ setup_error.matrix)
            if room is not None:
                views = room.render(true_pose, np.random.default_rng([seed, pair_id]))
                i0 = room.i0
            else:
                views = {name: stamp_pose_pattern(bases[name], true_pose) for name in imagers}
                i0 = 20000.0
            blocked = {}
            for name, px in views.items():
                block = next((b for b in blocks if b.blocks(name, t_s)), None)
                if block is not None:
                    blocked[name] = block.mode
                    if block.mode == "missing":
                        continue
                    px = np.round(px.astype(np.float64) * BLOCKED_TRANSMISSION).astype(px.dtype)
                sender.send_frame(name, pair_id, now_unix, px, i0)
            if truth is not None:
                truth.write(json.dumps({"pair_id": pair_id, "t_unix_s": now_unix, **true_pose.to_json(),
                                        "blocked": blocked}) + "\n")
                truth.flush()
            pair_id += 1
            next_t += frame_period_s
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        if truth is not None:
            truth.close()
        sender.close()
        if couch_sub is not None:
            couch_sub.close(0)
        if own:
            ctx.term()
    return pair_id - first_pair_id


# ---------------------------------------------------------------- delivery-sim
#: A receiver that hears no ``heartbeat/1`` for this long holds the beam whatever ENABLE it holds
#: (docs/PROTOCOL.md: three heartbeat periods of the default 0.05 s), s.
HEARTBEAT_LOSS_S = 0.15


@dataclass
class CouchModel:
    """A couch that applies corrections after a latency, with a residual error per move.

    ``state`` is the total correction applied so far (room frame).
    """

    latency_s: float = 0.3
    residual_mm: float = 0.1
    seed: int = 0
    state: Correction = field(default_factory=Correction.identity)
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def applied(self, correction: Correction) -> Correction:
        """The new couch state after applying ``correction`` with a seeded residual error."""
        err = Correction.from_six(self._rng.normal(0.0, self.residual_mm, 3), (0.0, 0.0, 0.0))
        self.state = err.compose(correction).compose(self.state)
        return self.state


@dataclass
class DeliveryReport:
    """What the delivery simulator saw and did."""

    beam_on_s: float = 0.0
    enables: int = 0
    holds: dict[str, int] = field(default_factory=dict)
    corrections_applied: int = 0
    heartbeats: int = 0
    heartbeat_losses: int = 0
    service_sessions: int = 0


def run_delivery_sim(publish_address: str, command_address: str, couch_address: str, duration_s: float,
                     couch: CouchModel | None = None, keys: ClientKeys | None = None,
                     beam_log: Path | None = None, ctx: zmq.Context | None = None,
                     stop: Callable[[], bool] | None = None,
                     heartbeat_loss_s: float = HEARTBEAT_LOSS_S) -> DeliveryReport:
    """Obey gating and apply setup corrections for ``duration_s`` seconds (docs/PROTOCOL.md, receivers).

    The beam is on only while the newest ENABLE is unexpired, no later HOLD
    has come (``valid_until_unix_s`` against the local wall clock), and a
    ``heartbeat/1`` of the same service session came within
    ``heartbeat_loss_s`` (monotonic s); a heartbeat loss or a new service
    session revokes the ENABLE. ``correction/1`` messages with ``apply:
    true`` are applied to ``couch`` once per (service ``session``,
    ``pair_id``) after its latency; then ``couch/1`` is published (binding
    ``couch_address``) and ``couch_moved`` is sent to the service.
    ``beam_log``: JSON lines of beam on/off transitions (for the fraction summary).
    """
    own = ctx is None
    ctx = ctx or zmq.Context()
    couch = couch or CouchModel()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        pub.bind(couch_address)
    except zmq.ZMQError as err:
        pub.close(0)
        if own:
            ctx.term()
        raise TrackingError(f"delivery-sim: cannot bind the couch endpoint {couch_address}: {err}") from err
    sub = Subscriber(ctx, publish_address, keys, topics=("gating", "correction", "heartbeat"))
    cmd = CommandClient(ctx, command_address, keys)
    couch_seq = SeqCounter()
    report = DeliveryReport()
    log_fh = open(beam_log, "a") if beam_log else None
    valid_until = 0.0
    beam_on = False
    move_at: float | None = None
    move: Correction | None = None
    last_couch_pub = 0.0
    start = time.monotonic()
    last_mono = start

    def publish_couch(moving: bool) -> None:
        t, r = couch.state.six()
        pub.send_multipart(encode_couch(couch_seq.next(), time.time(), t, r, moving))

    applied: set[tuple[str | None, Any]] = set()  # (service session, pair_id) of every correction applied
    service_session: str | None = None
    last_heartbeat_mono: float | None = None
    try:
        sub.handshake(30.0)  # subscribed before anything can be missed; couch/1 from now on means "ready"
        while time.monotonic() - start < duration_s and not (stop and stop()):
            for msg in sub.poll(0.005):
                topic = msg["_topic"]
                session = msg.get("session")
                if session != service_session:
                    # A restarted service: nothing the old session granted holds any more.
                    valid_until = 0.0
                    service_session = session
                    report.service_sessions += 1
                if topic == "heartbeat":
                    report.heartbeats += 1
                    last_heartbeat_mono = time.monotonic()
                elif topic == "gating":
                    if msg["beam"] == "ENABLE":
                        valid_until = float(msg["valid_until_unix_s"])
                        report.enables += 1
                    else:
                        valid_until = 0.0
                        report.holds[msg["reason"]] = report.holds.get(msg["reason"], 0) + 1
                elif topic == "correction" and msg.get("apply") is True and move is None \
                        and (session, msg.get("pair_id")) not in applied:
                    applied.add((session, msg.get("pair_id")))
                    move = Correction.from_six(msg["translation_mm"], msg["rotation_deg"])
                    move_at = time.monotonic() + couch.latency_s
                    publish_couch(True)
            mono = time.monotonic()
            if move is not None and mono >= move_at:
                couch.applied(move)
                report.corrections_applied += 1
                move, move_at = None, None
                publish_couch(False)
                last_couch_pub = mono
                # The pairs after this instant show the new position.
                cmd.send("couch_moved", {"translation_mm": list(couch.state.translation_mm)})
            while cmd.sock.poll(0):
                cmd.sock.recv_multipart()
            if mono - last_couch_pub > 0.2:
                publish_couch(move is not None)
                last_couch_pub = mono
            if time.time() < valid_until and (last_heartbeat_mono is None
                                              or mono - last_heartbeat_mono > heartbeat_loss_s):
                valid_until = 0.0  # the service went quiet: HOLD, whatever the ENABLE said
                report.heartbeat_losses += 1
            now_on = time.time() < valid_until
            if beam_on:
                report.beam_on_s += mono - last_mono
            if now_on != beam_on and log_fh is not None:
                log_fh.write(json.dumps({"t_unix_s": time.time(), "beam_on": now_on}) + "\n")
                log_fh.flush()
            beam_on = now_on
            last_mono = mono
    finally:
        if log_fh is not None:
            log_fh.close()
        sub.close()
        cmd.close()
        pub.close(0)
        if own:
            ctx.term()
    return report


# ------------------------------------------------------------------ peers
class LocalPeers:
    """A frame sender, a command client and a subscriber connected to a running service (tests, benchmarks).

    All three sockets belong to the thread that made this object.
    """

    def __init__(self, endpoints: dict[str, str], keys: ClientKeys | None = None, rows: int = 32, cols: int = 32,
                 imagers: tuple[str, str] = ("A", "B"), frame_keys: ClientKeys | None = None) -> None:
        """``keys`` for the subscriber and the command client (a console's); ``frame_keys`` for the frame sender
        (under CURVE only a key with the imager role may send frames; default ``keys``)."""
        self.ctx = zmq.Context()
        self.sub = Subscriber(self.ctx, endpoints["publish"], keys)
        self.cmd = CommandClient(self.ctx, endpoints["command"], keys)
        self.frames = FrameSender(self.ctx, endpoints["frames"], keys if frame_keys is None else frame_keys)
        self.imagers = imagers
        self.base = {n: pattern_frame(Pose.identity(), rows, cols, seed=i) for i, n in enumerate(imagers)}

    def pair_parts(self, pair_id: int, pose: Pose, acquired_unix_s: float | None = None) -> dict[str, list[bytes]]:
        """Encoded ``kvframe/1`` messages of one pair (for fault injection before sending)."""
        t = time.time() if acquired_unix_s is None else acquired_unix_s
        return {n: encode_kvframe(self.frames.seq.next(), n, pair_id, t, stamp_pose_pattern(self.base[n], pose),
                                  20000.0, self.frames.session) for n in self.imagers}

    def send_pair(self, pair_id: int, pose: Pose, acquired_unix_s: float | None = None,
                  only: tuple[str, ...] | None = None) -> float:
        """Send one pair (or only some imagers' frames); returns the send time (monotonic s)."""
        parts = self.pair_parts(pair_id, pose, acquired_unix_s)
        for name, p in parts.items():
            if only is None or name in only:
                self.frames.send_parts(p)
        return time.monotonic()

    def close(self) -> None:
        self.sub.close()
        self.cmd.close()
        self.frames.close()
        self.ctx.term()
