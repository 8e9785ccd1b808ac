"""A simulated treatment room for the console: service, imager and delivery simulators in one process.

:class:`SimulatedRoom` starts the real :class:`~spineguide.tracking.service.loop.Service`
(pattern method: test-pattern frames carrying the true pose), a delivery
simulator (:func:`~spineguide.tracking.sim.simulators.run_delivery_sim`: obeys gating, moves the
couch on an approved correction) and an imager that streams stereo pairs
at a fixed rate with the true pose ``C_couch o shift o setup_error``, where
``shift`` can be changed at any time (:meth:`SimulatedRoom.inject_shift`).
The service records the session with raw frames, so a console can show
them. With ``secure`` (the default) the room makes a temporary CURVE key set
and every client uses it: the imager (role imager), the delivery simulator
(delivery), the room's own command client (``room``, therapist) and a
``console`` key (therapist) for the console (:attr:`SimulatedRoom.console_keys`).
Used by the console's browser tests, its benchmark and
``spineguide console --simulate``. Simulation only.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from spineguide.registration.pose import Correction, Pose

from ..errors import TrackingError, WireSchemaError
from ..service.config import config_from_dict
from ..service.loop import Service
from ..service.processing import stamp_pose_pattern
from ..service.security import Role, create_keys
from ..service.wire import decode_couch
from .fraction import free_tcp_port
from .simulators import (
    ClientKeys,
    CommandClient,
    CouchModel,
    FrameSender,
    RoomFrames,
    pattern_frame,
    run_delivery_sim,
    write_room_plan,
)

__all__ = ["SimulatedRoom"]

log = logging.getLogger(__name__)


class SimulatedRoom:
    """Service + imager + delivery simulators (threads of this process); a context manager.

    Parameters
    ----------
    folder : path or None
        Where the record goes (``session.jsonl`` + ``session.jsonl.frames/``); default a temporary folder.
    setup_error : Pose
        The patient's pose when the stream starts (room frame).
    frame_period_s : float
        Stereo pair period, s.
    panel_pixels : int
        Rows = cols of the simulated frames.
    approval : ``"manual"`` or ``"automatic"``
        The service's ``[setup] approval``.
    couch_latency_s : float
        Delay of a couch move.
    secure : bool
        CURVE on every socket with a temporary key set (default);
        False runs the service with ``[security] enabled = false`` (insecure, stated).
    autostart : bool
        ``start()`` loads the plan and starts the setup as the room's own client (default); False leaves
        the service IDLE so a console drives the whole fraction (``spineguide demo --console``).
    seeds : bool
        Add a third patient whose plan is the fiducial method on the virtual room's thoracolumbar phantom
        (:data:`SEEDS_PATIENT`; plan files written under ``folder/plan``): while that plan is loaded the imager
        sends the phantom's frames with its gold seeds (:class:`~spineguide.tracking.sim.simulators.RoomFrames`,
        panel ``max(512, panel_pixels)`` over the 41 cm detector), so a console shows planned and detected seeds.

    Attributes
    ----------
    console_keys : ClientKeys or None
        The ``console`` client's keys (role therapist) for a console to connect with; None when not secure.
    """

    def __init__(self, folder: str | Path | None = None, setup_error: Pose | None = None,
                 frame_period_s: float = 0.1, panel_pixels: int = 128, approval: str = "manual",
                 couch_latency_s: float = 0.2, seed: int = 0, secure: bool = True, autostart: bool = True,
                 seeds: bool = False) -> None:
        self.autostart = bool(autostart)
        self.seeds = bool(seeds)
        self._tmp = tempfile.TemporaryDirectory(prefix="spineguide-room-") if folder is None else None
        self.folder = Path(self._tmp.name if folder is None else folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.setup_error = setup_error or Pose.from_six((2.0, -1.5, 1.0), (0.0, 0.0, 0.0))
        self.frame_period_s = float(frame_period_s)
        self.panel_pixels = int(panel_pixels)
        self.couch_latency_s = float(couch_latency_s)
        self.seed = int(seed)
        self._keys: dict[str, ClientKeys] = {}
        self._keys_tmp = None
        security: dict = {"enabled": False}
        if secure:
            # A fresh key set each time (a reused record folder keeps no keys): removed on stop().
            self._keys_tmp = tempfile.TemporaryDirectory(prefix="spineguide-room-keys-")
            made = create_keys(self._keys_tmp.name, {"console": Role.THERAPIST, "room": Role.THERAPIST,
                                                      "imager": Role.IMAGER, "delivery": Role.DELIVERY})
            server_public = made["server"].with_name("server.key")
            self._keys = {name: ClientKeys(made[name], server_public) for name in ("console", "room", "imager",
                                                                                   "delivery")}
            security = {"server_secret_key": str(made["server"]), "allowed_clients": str(made["allowed"])}
        self.console_keys: ClientKeys | None = self._keys.get("console")
        self.config = config_from_dict({
            "safety": {"frame_period_s": self.frame_period_s},
            "endpoints": {"frames": "tcp://127.0.0.1:0", "publish": "tcp://127.0.0.1:0",
                          "command": "tcp://127.0.0.1:0"},
            # A catalogue of two simulated patients (test-pattern frames): a console chooses between them.
            "plans": self._catalogue(),
            "setup": {"approval": approval},
            "record": {"path": str(self.folder / "session.jsonl"), "raw_frames": True},
            "security": security,
        }, "simulated room")
        self.service: Service | None = None
        self.endpoints: dict[str, str] = {}
        self._shift = Pose.identity()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._imager_paused = threading.Event()
        self._threads: list[threading.Thread] = []
        self.pairs_sent = 0
        self.errors: list[str] = []

    # ------------------------------------------------------------------ control
    #: The simulated patient and plan (the pattern method has no plan files): shown by a console as its plan.
    PATIENT = {"patient_id": "SIM-0001", "patient_name": "PHANTOM^SIMULATED", "plan_id": "SIM-T12",
               "method": "pattern", "source": "(no plan files: simulation)", "patient_position": "HFS"}
    #: The room's plan catalogue (``[plans]``): two simulated patients; :attr:`PATIENT` is the first.
    PATIENTS = (PATIENT, {"patient_id": "SIM-0002", "patient_name": "PHANTOM^SECOND", "plan_id": "SIM-L2",
                          "method": "pattern", "source": "(no plan files: simulation)", "patient_position": "FFS"})

    #: With ``seeds=True``: the fiducial plan on the room phantom (3 gold seeds).
    SEEDS_PATIENT = {"patient_id": "SIM-0003", "patient_name": "PHANTOM^SEEDS", "plan_id": "SIM-T12-SEEDS",
                     "method": "fiducial", "patient_position": "HFS"}

    def _catalogue(self) -> dict:
        plans = {p["plan_id"]: {"patient_id": p["patient_id"], "patient_name": p["patient_name"],
                                "patient_position": p["patient_position"], "method": "pattern",
                                "pattern_noise_mm": 0.05} for p in self.PATIENTS}
        if self.seeds:
            self.seed_panel_pixels = max(512, self.panel_pixels)
            self.seed_spacing_mm = 0.8 * 512 / self.seed_panel_pixels
            folder = self.folder / "plan"
            folder.mkdir(parents=True, exist_ok=True)
            files = write_room_plan(folder, self.seed_panel_pixels, self.seed_spacing_mm)
            p = self.SEEDS_PATIENT
            plans[p["plan_id"]] = {
                "patient_id": p["patient_id"], "patient_name": p["patient_name"],
                "patient_position": p["patient_position"], "method": "fiducial",
                "geometry": str(folder / files["geometry"]), "ct": str(folder / files["ct"]),
                "fiducials": str(folder / files["fiducials"]), "isocentre_lps_mm": files["isocentre_lps_mm"]}
        return plans

    def inject_shift(self, translation_mm) -> None:
        """From the next pair on, the patient is shifted by ``translation_mm`` (room frame, on top of the rest)."""
        with self._lock:
            self._shift = Pose.from_six(translation_mm, (0.0, 0.0, 0.0))

    def pause_imager(self, paused: bool = True) -> None:
        """Stop (True) or restart (False) the imager's stream: a silent imager, as the service and console see it."""
        if paused:
            self._imager_paused.set()
        else:
            self._imager_paused.clear()

    def command(self, name: str, params: dict | None = None, timeout_s: float = 10.0) -> dict:
        """Send one command as the room's own client (not the console); raises if refused."""
        ctx = zmq.Context()
        cmd = CommandClient(ctx, self.endpoints["command"], self._keys.get("room"))
        try:
            reply = cmd.request(name, params, timeout_s=timeout_s)
        finally:
            cmd.close()
            ctx.term()
        if not reply.get("ok"):
            raise TrackingError(f"simulated room: {name} refused: {reply.get('reason')}")
        return reply

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SimulatedRoom:
        """Start the service and the simulators; the service has its plan loaded and the setup started."""
        self.service = Service(self.config, seed=self.seed).start()
        self.endpoints = dict(self.service.endpoints)
        self.endpoints["couch"] = f"tcp://127.0.0.1:{free_tcp_port()}"
        for name, target in (("delivery", self._delivery), ("imager", self._imager)):
            t = threading.Thread(target=self._guard(target), name=f"room-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        if self.autostart:
            self.command("load_plan", {"plan_id": self.PATIENT["plan_id"]})
            self.command("start_setup")
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10.0)
        if self.service is not None:
            self.service.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
        if self._keys_tmp is not None:
            self._keys_tmp.cleanup()

    def __enter__(self) -> SimulatedRoom:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except Exception as err:  # noqa: BLE001 - reported through .errors, the test checks it
                if not self._stop.is_set():
                    self.errors.append(f"{threading.current_thread().name}: {type(err).__name__}: {err}")
                    log.error("%s", self.errors[-1])
        return run

    # ------------------------------------------------------------------ threads
    def _delivery(self) -> None:
        run_delivery_sim(self.endpoints["publish"], self.endpoints["command"], self.endpoints["couch"], 3600.0,
                         CouchModel(self.couch_latency_s, 0.05, self.seed), self._keys.get("delivery"),
                         stop=self._stop.is_set)

    def _imager(self) -> None:
        ctx = zmq.Context()
        sender = FrameSender(ctx, self.endpoints["frames"], self._keys.get("imager"))
        couch_sub = ctx.socket(zmq.SUB)
        couch_sub.setsockopt(zmq.LINGER, 0)
        couch_sub.setsockopt_string(zmq.SUBSCRIBE, "couch")
        couch_sub.connect(self.endpoints["couch"])
        n = self.panel_pixels
        bases = {name: pattern_frame(Pose.identity(), n, n, seed=self.seed + i) for i, name in enumerate(("A", "B"))}
        # A dark disc in the middle so the display has structure to window.
        yy, xx = np.mgrid[0:n, 0:n]
        disc = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 5) ** 2
        for b in bases.values():
            b[disc] = (b[disc] * 0.4).astype(np.uint16)
        room_frames = RoomFrames(self.seed_panel_pixels, self.seed_spacing_mm) if self.seeds else None
        rng = np.random.default_rng(self.seed)
        couch = Correction.identity()
        pair_id = 0
        next_t = time.monotonic()
        try:
            while not self._stop.is_set():
                now_unix = time.time()
                while couch_sub.poll(0):
                    try:
                        msg = decode_couch(couch_sub.recv_multipart())
                        couch = Correction.from_six(msg["translation_mm"], msg["rotation_deg"])
                    except WireSchemaError as err:
                        log.warning("room imager: bad couch/1: %s", err)
                with self._lock:
                    shift = self._shift
                true_pose = Pose.from_matrix(couch.matrix @ shift.matrix @ self.setup_error.matrix)
                loaded = self.service.engine.plan if self.service is not None else None
                if room_frames is not None and loaded is not None and loaded.plan.method == "fiducial":
                    frames = room_frames.render(true_pose, rng)  # the phantom with its seeds at the true pose
                    i0 = room_frames.i0
                else:
                    frames = {name: stamp_pose_pattern(base, true_pose) for name, base in bases.items()}
                    i0 = 20000.0
                for name, pixels in frames.items():
                    if self._imager_paused.is_set():
                        break
                    sender.send_frame(name, pair_id, now_unix, pixels, i0)
                pair_id += 1
                self.pairs_sent = pair_id
                next_t += self.frame_period_s
                self._stop.wait(max(0.0, next_t - time.monotonic()))
        finally:
            sender.close()
            couch_sub.close(0)
            ctx.term()
