"""A whole simulated fraction: the service, the imager simulator and the delivery simulator as three processes.

:func:`run_fraction` (``spineguide demo`` / ``spineguide fraction``) starts
``serve``, ``imager-sim`` and ``delivery-sim`` as subprocesses talking over
loopback TCP on free ports, and plays the console itself (command client +
subscriber): load the plan, set the patient up (correction, couch move,
verification), monitor, see the beam held when the patient shifts 3 mm
mid-fraction, set up again and resume. It then reads the session record, the
imager's ground truth and the delivery simulator's report and returns a
:class:`FractionSummary`.

CURVE is on end to end: a temporary key set (:func:`spineguide.tracking.service.security.create_keys`)
gives the service its key pair and an allow-list with roles, and each process
its own client key (console: therapist, imager: imager, delivery: delivery).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from spineguide.calibration.jsonfile import parse_json_bytes, read_json_document

from ..errors import TrackingError
from ..service.record import read_record
from ..service.security import create_keys
from ..service.security import ClientKeys
from .simulators import CommandClient, Subscriber, write_room_plan

__all__ = ["FractionSummary", "run_fraction", "free_tcp_port"]

log = logging.getLogger(__name__)

#: The sudden patient shift mid-fraction (room frame, mm) and when it happens (imager-sim clock, s).
SHIFT_MM = (0.0, -3.0, 0.0)
#: Consecutive out-of-tolerance HOLDs after which the console starts a new setup.
RESETUP_AFTER_HOLDS = 3
#: The gantry's passes between a source and its panel (imager-sim clock, s): imager B dark for 3 s while
#: monitoring before the shift, imager A sending nothing for 2 s after the re-setup (docs/ONE_VIEW.md).
BLOCKS = ("6.0,9.0,B,dark", "21.0,23.0,A,missing")
#: The same for the short (quick) fraction.
QUICK_BLOCKS = ("2.5,4.0,B,dark",)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FractionSummary:
    """Outcome of a simulated fraction.

    Attributes
    ----------
    setup_residual_mm : list of float
        True 3D target deviation at each verified setup (mm), from the imager's ground truth.
    beam_on_s : float
        Beam-on time as the delivery simulator saw it (unexpired ENABLE), s.
    monitoring_s : float
        Time spent in MONITORING, s.
    holds : dict
        HOLD reasons sent while MONITORING, with counts.
    latency_ms : dict
        Pair complete -> gating published, p50/p95/p99/max, ms.
    max_true_deviation_enabled_mm : float
        Largest true target deviation of any pair whose ENABLE was sent, mm.
    pairs : int
    setups : int
    corrections_applied : int
    heartbeat_late_max_ms : float
    one_view_pairs, one_view_enables : int
        Pairs judged on one view (a view blocked), and the ENABLEs among them.
    max_true_deviation_one_view_enabled_mm : float
        Largest true target deviation of a one-view pair whose ENABLE was sent, mm.
    service_session : str
        The service session id (the record's ``session``; every message it sent carried it).
    out_dir : Path
    """

    setup_residual_mm: list[float] = field(default_factory=list)
    beam_on_s: float = 0.0
    monitoring_s: float = 0.0
    holds: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    max_true_deviation_enabled_mm: float = 0.0
    pairs: int = 0
    setups: int = 0
    corrections_applied: int = 0
    heartbeat_late_max_ms: float = 0.0
    one_view_pairs: int = 0
    one_view_enables: int = 0
    max_true_deviation_one_view_enabled_mm: float = 0.0
    wall_s: float = 0.0
    service_session: str = ""
    out_dir: Path | None = None

    def rows(self) -> list[tuple[str, str]]:
        """``(quantity, value)`` rows for a printed table."""
        lat = self.latency_ms
        return [
            ("stereo pairs judged", str(self.pairs)),
            ("setups (incl. re-setup)", str(self.setups)),
            ("couch corrections applied", str(self.corrections_applied)),
            ("residual setup error (true, 3D)", ", ".join(f"{v:.2f} mm" for v in self.setup_residual_mm) or "-"),
            ("time in MONITORING", f"{self.monitoring_s:.1f} s"),
            ("beam-on time", f"{self.beam_on_s:.1f} s"),
            ("holds while monitoring", ", ".join(f"{k} x{v}" for k, v in sorted(self.holds.items())) or "none"),
            ("latency pair -> gating p50/p95/p99",
             " / ".join(f"{lat.get(q, float('nan')):.1f}" for q in ("p50", "p95", "p99")) + " ms"),
            ("max true deviation with ENABLE sent", f"{self.max_true_deviation_enabled_mm:.2f} mm"),
            ("pairs judged on one view (view blocked)", f"{self.one_view_pairs} ({self.one_view_enables} ENABLE, "
             f"max true deviation {self.max_true_deviation_one_view_enabled_mm:.2f} mm)"),
            ("latest heartbeat", f"{self.heartbeat_late_max_ms:.1f} ms late"),
            ("wall time", f"{self.wall_s:.1f} s"),
            ("service session", self.service_session or "-"),
        ]


def _service_toml(out: Path, ports: dict[str, int], frame_period_s: float, method: str,
                  keys: dict[str, Path], service_geometry: str | os.PathLike | None = None) -> Path:
    if method == "fiducial":
        plan = write_room_plan(out)
        if service_geometry is not None:
            plan["geometry"] = str(Path(service_geometry).resolve())
        plan_text = (f'method = "fiducial"\ngeometry = "{plan["geometry"]}"\nct = "{plan["ct"]}"\n'
                     f'fiducials = "{plan["fiducials"]}"\nisocentre_lps_mm = {plan["isocentre_lps_mm"]}\n')
    else:
        plan_text = 'method = "pattern"\npattern_noise_mm = 0.05\n'

    text = f"""# Written by tracking.fraction for a simulated fraction.
[safety]
frame_period_s = {frame_period_s}
tolerance_3d_mm = 1.0
tolerance_rotation_deg = 1.0

[endpoints]
frames = "tcp://127.0.0.1:{ports['frames']}"
publish = "tcp://127.0.0.1:{ports['publish']}"
command = "tcp://127.0.0.1:{ports['command']}"

[plan]
{plan_text}
[setup]
approval = "automatic"

[security]
server_secret_key = "{keys['server'].resolve()}"
allowed_clients = "{keys['allowed'].resolve()}"

[record]
path = "session.jsonl"
"""
    path = out / "service.toml"
    path.write_text(text)
    return path


def _spawn(args: list[str], out: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spineguide.tracking.cli.main", *args]
    log.info("starting %s: %s", name, " ".join(cmd))
    fh = open(out / f"{name}.log", "w")
    try:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=out,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        fh.close()


def run_fraction(out_dir: str | os.PathLike | None = None, seed: int = 2026, duration_s: float = 28.0,
                 shift_at_s: float = 13.0, frame_period_s: float = 0.1, method: str = "fiducial",
                 progress=None, service_geometry: str | os.PathLike | None = None,
                 true_geometry: str | os.PathLike | None = None,
                 blocks: tuple[str, ...] = BLOCKS) -> FractionSummary:
    """Run a simulated fraction with three processes; see the module docstring.

    Parameters
    ----------
    out_dir : path, optional
        Keep the config, session record, logs and truth here (default: a temporary folder).
    seed : int
        Seed of the setup error, the couch's residual error and the measurement noise.
    duration_s : float
        Length of the imaging stream, s (the whole run takes a few seconds more).
    shift_at_s : float
        When the patient shifts 3 mm (seconds into the imaging stream).
    method : str
        ``fiducial``: the virtual room's phantom (512-pixel frames, seeds at the true pose) and the real
        fiducial pipeline; ``pattern``: test-pattern frames and the pattern stand-in (fast, no phantom).
    service_geometry : path, optional
        kv-geometry/1 file the service uses (e.g. today's calibration); default the nominal room.
    true_geometry : path, optional
        kv-geometry/1 file of the room as it truly is, which the imager simulator renders with
        (``fiducial`` method); default the nominal room.
    blocks : tuple of str
        Views blocked by the gantry, ``START,END,IMAGER,dark|missing`` (imager-sim ``--block``); the
        service monitors through them on the other view (docs/ONE_VIEW.md).

    Raises
    ------
    TrackingError
        A process failed to start or the service stopped answering.
    """
    t_start = time.monotonic()
    say = progress or (lambda message: None)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="spineguide-fraction-")
        out = Path(tmp.name)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
    ports = {name: free_tcp_port() for name in ("frames", "publish", "command", "couch")}
    if method not in ("fiducial", "pattern"):
        raise TrackingError(f"fraction: method must be 'fiducial' or 'pattern', got {method!r}")
    if method == "fiducial":
        # Compile the numba kernels once here (or load them from the on-disk cache), so that the three
        # processes load them from the cache instead of compiling at once on 2 cores mid-fraction.
        from ..service.processing import warm_up_kernels

        say(f"numba kernels ready ({warm_up_kernels():.1f} s)")
    say(f"writing the plan, a temporary CURVE key set and the service configuration ({method} method)")
    keys_tmp = tempfile.TemporaryDirectory(prefix="spineguide-fraction-keys-")
    keys = create_keys(keys_tmp.name)
    server_public = keys["server"].with_name("server.key")
    client = {name: ClientKeys(keys[name], server_public) for name in ("console", "imager", "delivery")}

    def key_args(name: str) -> list[str]:
        return ["--client-key", str(client[name].client_secret), "--server-key", str(server_public)]

    config_path = _service_toml(out, ports, frame_period_s, method, keys, service_geometry)
    rng = np.random.default_rng(seed)
    setup_t = rng.uniform(-5.0, 5.0, 3)
    setup_r = rng.uniform(-1.5, 1.5, 3)
    for f in ("truth.jsonl", "beam.jsonl", "delivery.json"):
        (out / f).unlink(missing_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    ctx = zmq.Context()
    sub = Subscriber(ctx, f"tcp://127.0.0.1:{ports['publish']}", client["console"])
    cmd = CommandClient(ctx, f"tcp://127.0.0.1:{ports['command']}", client["console"])
    try:
        say("starting the service")
        procs["service"] = _spawn(["serve", "--config", str(config_path), "--seed", str(seed)], out, "service")
        try:
            sub.handshake(30.0)
        except TrackingError as err:
            raise TrackingError(f"the service did not start (see {out / 'service.log'})") from err
        say("starting the delivery simulator")
        procs["delivery"] = _spawn([
            "delivery-sim", "--publish", f"tcp://127.0.0.1:{ports['publish']}",
            "--command", f"tcp://127.0.0.1:{ports['command']}", "--couch", f"tcp://127.0.0.1:{ports['couch']}",
            "--duration", str(duration_s + 30.0), "--seed", str(seed), "--report", "delivery.json",
            "--beam-log", "beam.jsonl", *key_args("delivery")], out, "delivery")
        couch = ctx.socket(zmq.SUB)
        couch.setsockopt(zmq.LINGER, 0)
        couch.setsockopt_string(zmq.SUBSCRIBE, "couch")
        couch.connect(f"tcp://127.0.0.1:{ports['couch']}")
        try:
            if not couch.poll(30_000):  # the delivery-sim publishes couch/1 only once it hears the service
                raise TrackingError(f"the delivery simulator did not start (see {out / 'delivery.log'})")
        finally:
            couch.close(0)
        _expect(cmd.request("load_plan", timeout_s=10.0), "load_plan")
        _expect(cmd.request("start_setup"), "start_setup")
        say("starting the imager simulator (setup error "
            f"{np.round(setup_t, 1).tolist()} mm, {np.round(setup_r, 1).tolist()} deg)")
        shift = ",".join(str(v) for v in SHIFT_MM)
        procs["imager"] = _spawn([
            "imager-sim", "--frames", f"tcp://127.0.0.1:{ports['frames']}",
            "--couch", f"tcp://127.0.0.1:{ports['couch']}", "--duration", str(duration_s),
            "--setup-error=" + ",".join(str(float(v)) for v in (*setup_t, *setup_r)),
            f"--shift={shift_at_s},{shift}", "--period", str(frame_period_s), "--seed", str(seed),
            "--truth", "truth.jsonl", *(["--room"] if method == "fiducial" else []), *key_args("imager"),
            *[f"--block={b}" for b in blocks],
            *(["--geometry", str(Path(true_geometry).resolve())] if true_geometry is not None else [])], out, "imager")
        _console(cmd, sub, procs["imager"], say)
        if procs["imager"].returncode != 0:
            raise TrackingError(f"the imager simulator failed (exit {procs['imager'].returncode}; "
                                f"see {out / 'imager.log'})")
        cmd.request("stop")
    finally:
        for name in ("imager", "delivery", "service"):
            p = procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()  # SIGTERM: the service closes its record, the delivery-sim writes its report
            try:
                p.wait(timeout=15.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        sub.close()
        cmd.close()
        ctx.term()
        keys_tmp.cleanup()
    summary = _summarise(out)
    summary.wall_s = time.monotonic() - t_start
    summary.out_dir = None if tmp is not None else out
    if tmp is not None:
        tmp.cleanup()
    return summary


def _expect(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if not reply.get("ok"):
        raise TrackingError(f"console: {what} refused: {reply.get('reason')}")
    return reply


def _console(cmd: CommandClient, sub: Subscriber, imager: subprocess.Popen, say) -> None:
    """Play the console until the imager simulator ends: start monitoring when verified, re-setup on a shift."""
    out_of_tol = 0
    setups = 1
    state = "SETUP"
    while imager.poll() is None:
        for msg in sub.poll(0.05):
            topic = msg["_topic"]
            if topic == "heartbeat" and state == "SETUP" and msg.get("phase") == "verified":
                reply = cmd.request("start_monitoring")
                if reply["ok"]:
                    state = "MONITORING"
                    say("setup verified: monitoring" if setups == 1 else "re-setup verified: monitoring resumed")
            elif topic == "gating" and state == "MONITORING":
                if msg["beam"] == "HOLD" and msg["reason"] in ("out_of_tolerance", "rotation_out_of_tolerance") \
                        and msg["pair_id"] is not None:
                    out_of_tol += 1
                    if out_of_tol >= RESETUP_AFTER_HOLDS:
                        say(f"beam held: target {msg['deviation_mm']:.1f} mm off; re-setup")
                        _expect(cmd.request("start_setup"), "start_setup")
                        state = "SETUP"
                        setups += 1
                        out_of_tol = 0
                elif msg["beam"] == "ENABLE":
                    out_of_tol = 0


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def _summarise(out: Path) -> FractionSummary:
    records = read_record(out / "session.jsonl")
    truth = {}
    if (out / "truth.jsonl").exists():
        for i, line in enumerate((out / "truth.jsonl").read_bytes().splitlines(), start=1):
            if line.strip():
                t = parse_json_bytes(line, f"{out / 'truth.jsonl'}, line {i}", TrackingError)
                truth[t["pair_id"]] = float(np.linalg.norm(t["translation_mm"]))  # target at the isocentre
    s = FractionSummary()
    s.service_session = str(records[0].get("session", "")) if records else ""
    state = "IDLE"
    mon_since = None
    latencies = []
    for r in records:
        ev = r["event"]
        if ev == "state":
            if r["new"] == "MONITORING":
                mon_since = r["t_mono_s"]
            elif state == "MONITORING" and mon_since is not None:
                s.monitoring_s += r["t_mono_s"] - mon_since
                mon_since = None
            if r["new"] == "SETUP":
                s.setups += 1
            state = r["new"]
        elif ev == "phase" and r["new"] == "verified":
            pass
        elif ev == "pair":
            s.pairs += 1
            for o in r["outputs"]:
                if str(o.get("schema", "")).startswith("correction/") and o.get("purpose") == "verified" and r["pair_id"] in truth:
                    s.setup_residual_mm.append(truth[r["pair_id"]])
        elif ev == "sent" and r.get("topic") == "gating":
            body = r["body"]
            if "latency_ms" in r:
                latencies.append(r["latency_ms"])
            if state == "MONITORING" and body["beam"] == "HOLD":
                s.holds[body["reason"]] = s.holds.get(body["reason"], 0) + 1
            if body["beam"] == "ENABLE" and body["pair_id"] in truth:
                s.max_true_deviation_enabled_mm = max(s.max_true_deviation_enabled_mm, truth[body["pair_id"]])
            if body.get("one_view") and body["pair_id"] is not None:
                s.one_view_pairs += 1
                if body["beam"] == "ENABLE":
                    s.one_view_enables += 1
                    if body["pair_id"] in truth:
                        s.max_true_deviation_one_view_enabled_mm = max(s.max_true_deviation_one_view_enabled_mm,
                                                                       truth[body["pair_id"]])
    if mon_since is not None:
        s.monitoring_s += records[-1]["t_mono_s"] - mon_since
    s.latency_ms = _percentiles(latencies)
    report = out / "delivery.json"
    if report.exists():
        d = read_json_document(report, TrackingError, "delivery report")
        s.beam_on_s = float(d.get("beam_on_s", 0.0))
        s.corrections_applied = int(d.get("corrections_applied", 0))
    hb = [r.get("late_ms", 0.0) for r in records if r["event"] == "sent" and r.get("topic") == "heartbeat"]
    s.heartbeat_late_max_ms = max(hb) if hb else 0.0
    return s
