"""``spineguide`` subcommands of the real-time service: serve, keys, replay, imager-sim, delivery-sim, fraction.

:func:`add_commands` adds them to the main parser (``tracking/cli/main.py``).
Each handler parses, builds configuration, calls the library, prints, and
returns an exit code; errors raise and the main entry point turns them into
``spineguide: error: <reason>`` and a non-zero exit. The fraction's
subprocesses run them as ``python -m spineguide.tracking.cli.main SUBCOMMAND ...`` (the one entry point).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

__all__ = ["add_commands"]

log = logging.getLogger("spineguide")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    from ..errors import TrackingError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise TrackingError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n or not all(abs(v) < float("inf") for v in values):
        raise TrackingError(f"{what} must be {n} comma-separated finite numbers, got {text!r}")
    return values


def _stop_on_signals(event: threading.Event) -> None:
    def handler(signum, frame):
        event.set()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..service.config_file import load_config
    from ..service.loop import Service

    config = load_config(args.config)
    if config.security.insecure:
        from ..service.config import INSECURE_WARNING

        print(f"spineguide serve: WARNING: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    svc = Service(config, seed=args.seed).start()
    stop = threading.Event()
    _stop_on_signals(stop)
    print(f"spineguide serve: session {svc.session}; frames {svc.endpoints['frames']}, publish "
          f"{svc.endpoints['publish']}, command {svc.endpoints['command']}; record "
          f"{svc.record.path or '(memory only)'}", flush=True)
    try:
        # The main thread is the watchdog of last resort: a dead or stuck service thread ends the process.
        failure = svc.run_until(stop, args.duration if args.duration else None)
    finally:
        svc.stop()
    if failure is not None:
        print(f"spineguide: error: service failed: {failure}", file=sys.stderr, flush=True)
        return 3
    return 0


def _client_roles(specs: list[str] | None):
    """``NAME:ROLE`` (or a default client name alone) -> {name: Role}; None for the default set."""
    from spineguide.calibration.foundation import enum_member, enum_values

    from ..errors import SecurityError
    from ..service.security import DEFAULT_CLIENT_ROLES, Role

    if not specs:
        return None
    out = {}
    for spec in specs:
        name, colon, role = spec.partition(":")
        if not colon:
            if name not in DEFAULT_CLIENT_ROLES:
                raise SecurityError(f"--client {spec!r}: give NAME:ROLE (roles: {[r.value for r in Role]})")
            out[name] = DEFAULT_CLIENT_ROLES[name]
            continue
        out[name] = enum_member(Role, role, SecurityError, f"--client {spec!r}: unknown role {role!r}; roles: {enum_values(Role)}")
    return out


def _cmd_keys(args: argparse.Namespace) -> int:
    from ..service.security import create_keys

    made = create_keys(args.out, _client_roles(args.client))
    print(f"CurveZMQ keys in {args.out}:")
    for name, path in made.items():
        print(f"  {name:10s} {path}")
    print(f"roles of the allowed clients: {made['roles']} (edit it to change who may command what)")
    print("service config: [security] server_secret_key = "
          f"\"{made['server']}\", allowed_clients = \"{made['allowed']}\"")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from ..service.loop import replay_session

    report = replay_session(args.session, recompute=not args.no_recompute, seed=args.seed)
    print(f"replayed {report.events} events ({report.pairs} pairs, {report.recomputed_pairs} re-registered "
          f"from raw frames) of {args.session}")
    if report.identical:
        print("identical: every reply, correction and gating decision matches the record")
        return 0
    print(f"{len(report.differences)} difference(s):")
    for d in report.differences[:50]:
        print(f"  {d}")
    return 1


def _client_keys(args: argparse.Namespace):
    from ..service.security import ClientKeys

    if args.client_key is None and args.server_key is None:
        return None
    from ..errors import TrackingError

    if args.client_key is None or args.server_key is None:
        raise TrackingError("--client-key and --server-key go together")
    return ClientKeys(Path(args.client_key), Path(args.server_key))


def _cmd_imager_sim(args: argparse.Namespace) -> int:
    from spineguide.registration.pose import Pose

    from ..sim.simulators import MotionTrace, ViewBlock, run_imager_sim

    six = _floats(args.setup_error, 6, "--setup-error")
    blocks = tuple(ViewBlock.parse(text) for text in args.block or [])
    shifts = []
    for text in args.shift or []:
        t, x, y, z = _floats(text, 4, "--shift")
        shifts.append((t, (x, y, z)))
    trace = MotionTrace(drift_mm_per_min=_floats(args.drift, 3, "--drift"), wobble_mm=args.wobble,
                        shifts=tuple(shifts))
    room = None
    if args.room:
        from ..sim.simulators import RoomFrames

        true_room = None
        if args.geometry is not None:
            from spineguide.calibration.io import read_geometry

            true_room = read_geometry(args.geometry)
        room = RoomFrames(panel_pixels=args.panel or 512, pixel_spacing_mm=0.8 * 512 / (args.panel or 512),
                          geometry=true_room)
    n = run_imager_sim(args.frames, args.duration, Pose.from_six(six[:3], six[3:]), trace,
                       couch_address=args.couch, frame_period_s=args.period, rows=args.panel or 64,
                       cols=args.panel or 64,
                       keys=_client_keys(args), seed=args.seed, truth_path=args.truth, room=room, blocks=blocks)
    print(f"imager-sim: sent {n} stereo pairs")
    return 0


def _cmd_delivery_sim(args: argparse.Namespace) -> int:
    from ..sim.simulators import CouchModel, run_delivery_sim

    stop = threading.Event()
    _stop_on_signals(stop)
    report = run_delivery_sim(args.publish, args.command, args.couch, args.duration,
                              CouchModel(args.latency, args.residual, args.seed), _client_keys(args),
                              args.beam_log, stop=stop.is_set)
    body = {"beam_on_s": report.beam_on_s, "enables": report.enables, "holds": report.holds,
            "corrections_applied": report.corrections_applied, "heartbeats": report.heartbeats,
            "heartbeat_losses": report.heartbeat_losses}
    if args.report:
        Path(args.report).write_text(json.dumps(body, indent=1))
    print(f"delivery-sim: {json.dumps(body)}")
    return 0


def _cmd_fraction(args: argparse.Namespace) -> int:
    from ..sim.fraction import run_fraction

    summary = run_fraction(args.out, seed=args.seed, method="pattern" if args.pattern else "fiducial",
                           progress=lambda m: print(f"  .. {m}", flush=True))
    _print_rows(summary.rows())
    if summary.out_dir is not None:
        print(f"files in {summary.out_dir}")
    return 0


def _print_rows(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def _add_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-key", default=None, help="this client's CURVE .key_secret file")
    p.add_argument("--server-key", default=None, help="the service's public CURVE .key file")


def add_commands(subparsers) -> None:
    """Add ``serve``, ``keys``, ``replay``, ``imager-sim``, ``delivery-sim`` and ``fraction`` to a subparsers object."""
    p = subparsers.add_parser("serve", help="run the real-time service (ZeroMQ) from a TOML config")
    p.add_argument("--config", required=True, type=Path, help="service configuration (TOML; docs/SERVICE.md)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until killed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pattern processor's noise (simulation)")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser("keys", help="create CurveZMQ key pairs, the client allow-list and its roles")
    p.add_argument("--out", required=True, type=Path, help="folder for the keys")
    p.add_argument("--client", action="append", default=None,
                   help="client NAME:ROLE, role one of therapist, physicist, delivery, imager, viewer (repeatable; "
                        "default console:therapist, imager:imager, delivery:delivery)")
    p.set_defaults(func=_cmd_keys, client=None)

    p = subparsers.add_parser("replay", help="re-run a recorded session deterministically and report differences")
    p.add_argument("session", type=Path, help="session record (JSON lines)")
    p.add_argument("--no-recompute", action="store_true", help="do not re-register raw frames, replay decisions only")
    p.add_argument("--seed", type=int, default=0, help="the seed the service ran with (pattern processor)")
    p.set_defaults(func=_cmd_replay)

    p = subparsers.add_parser("imager-sim", help="stream simulated kvframe/1 stereo pairs along a motion trace")
    p.add_argument("--frames", required=True, help="the service's frames endpoint (tcp://HOST:PORT)")
    p.add_argument("--couch", default=None, help="the delivery-sim's couch/1 endpoint (patient moves with the couch)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to stream (default 30)")
    p.add_argument("--period", type=float, default=0.1, help="frame period, s (default 0.1 = 10 Hz)")
    p.add_argument("--setup-error", default="0,0,0,0,0,0", help="initial patient pose TX,TY,TZ,PITCH,ROLL,YAW (mm, deg)")
    p.add_argument("--drift", default="0,0,0", help="drift X,Y,Z in mm/min")
    p.add_argument("--wobble", type=float, default=0.0, help="periodic vertical motion amplitude, mm")
    p.add_argument("--shift", action="append", default=None, help="sudden shift T,X,Y,Z (s, mm); repeatable")
    p.add_argument("--panel", type=int, default=None, help="frame rows = cols (default 64; 512 with --room)")
    p.add_argument("--room", action="store_true",
                   help="frames of the virtual room's phantom (seeds at the true pose) instead of test patterns")
    p.add_argument("--geometry", type=Path, default=None,
                   help="with --room: the room's true geometry (kv-geometry/1) to render with (default: nominal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", type=Path, default=None, help="write each pair's true pose here (JSON lines)")
    p.add_argument("--block", action="append", default=None,
                   help="a view blocked by the gantry: START,END,IMAGER[,dark|missing] (s; dark: the frame is sent "
                        "with 1 %% of its signal, missing: not sent); repeatable")
    _add_key_args(p)
    p.set_defaults(func=_cmd_imager_sim)

    p = subparsers.add_parser("delivery-sim", help="obey gating with permission expiry and move a simulated couch")
    p.add_argument("--publish", required=True, help="the service's PUB endpoint")
    p.add_argument("--command", required=True, help="the service's command endpoint")
    p.add_argument("--couch", required=True, help="endpoint to bind for couch/1")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--latency", type=float, default=0.5, help="couch move latency, s (default 0.5)")
    p.add_argument("--residual", type=float, default=0.15, help="couch residual error per move, mm 1 sigma (default 0.15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None, help="write the final report here (JSON)")
    p.add_argument("--beam-log", type=Path, default=None, help="beam on/off transitions (JSON lines)")
    _add_key_args(p)
    p.set_defaults(func=_cmd_delivery_sim)

    p = subparsers.add_parser("fraction", help="run a whole simulated fraction with three processes and print a summary")
    p.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--pattern", action="store_true",
                   help="test-pattern frames and the pattern stand-in instead of the fiducial pipeline")
    p.set_defaults(func=_cmd_fraction)
