"""``spineguide console``: the live console web page next to the service.

:func:`add_commands` adds the subcommand to the main parser (``tracking/cli/main.py``).
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

__all__ = ["add_commands"]

log = logging.getLogger("spineguide")


def _read_token(path: Path | None) -> str | None:
    from ..console.config import ConsoleConfigError

    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConsoleConfigError(f"--token-file {path}: cannot read the login token: {err.strerror}") from err


def build_console_config(args: argparse.Namespace, room=None):
    """The :class:`~spineguide.tracking.console.ConsoleConfig` of the parsed arguments (``room``: a SimulatedRoom)."""
    from ..console.config import ConsoleConfigError, console_config_from_service
    from ..service.config_file import load_config
    from ..service.security import ClientKeys

    overrides = {"host": args.host, "port": args.port, "login_token": _read_token(args.token_file),
                 "allow_remote": args.allow_remote, "second_signoff_mm": args.second_signoff_mm,
                 "second_signoff_deg": args.second_signoff_deg}
    if args.users is not None:
        from ..console.users import UserStore

        overrides["users"] = UserStore.read(args.users)
    for name in ("records", "qa_history", "calibration_report"):
        value = getattr(args, name)
        if value is not None:
            overrides["records_folder" if name == "records" else name] = value
    if (args.client_key is None) != (args.server_key is None):
        raise ConsoleConfigError("--client-key and --server-key go together")
    if args.client_key is not None:
        overrides["client_keys"] = ClientKeys(Path(args.client_key), Path(args.server_key))
    if args.publish is not None:
        overrides["publish_address"] = args.publish
    if args.command_address is not None:
        overrides["command_address"] = args.command_address
    if room is not None:
        service = room.config
        overrides.setdefault("publish_address", room.endpoints["publish"])
        overrides.setdefault("command_address", room.endpoints["command"])
        if room.console_keys is not None:  # the simulated room runs CURVE: connect with its console key
            overrides.setdefault("client_keys", room.console_keys)
        # The room's plan catalogue (two simulated patients) comes from the service (list_plans).
    elif args.service_config is not None:
        service = load_config(args.service_config)
    else:
        raise ConsoleConfigError("console needs --service-config FILE (the service's TOML) or --simulate")
    return console_config_from_service(service, **overrides)


async def _serve(config, duration_s: float | None, banner: str = "") -> None:
    """Run a console until SIGINT/SIGTERM or ``duration_s``."""
    import asyncio

    from ..console.server import ConsoleServer

    server = ConsoleServer(config)
    url = await server.start()
    print(f"spineguide console: {url} (service publish {config.publish_address}, command "
          f"{config.command_address}; commands {'need a login' if config.commands_enabled else 'disabled'})"
          + banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if duration_s:
            await asyncio.wait_for(stop.wait(), duration_s)
        else:
            await stop.wait()
    except TimeoutError:
        pass
    finally:
        await server.stop()


#: Second sign-off threshold of the console demo: a setup correction longer than this needs a physicist too.
DEMO_SECOND_SIGNOFF_MM = 5.0


def run_console_demo(port: int = 8080, out_dir: Path | None = None, duration_s: float | None = None) -> int:
    """``spineguide demo --console``: a simulated room left IDLE and its console, with two demo accounts.

    The accounts (``therapist``, ``physicist``) get random passwords, printed once here and stored argon2-hashed
    in the demo folder's ``console-users.json``. Everything else happens on the page: choose the plan, load it,
    setup, approval, monitoring, end of fraction, report and its sign-off.
    """
    import asyncio
    import secrets
    import tempfile

    from ..console.config import console_config_from_service
    from ..console.users import UserStore, add_user
    from ..sim.rig import SimulatedRoom

    with tempfile.TemporaryDirectory(prefix="spineguide-console-demo-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        passwords = {name: secrets.token_urlsafe(9) for name in ("therapist", "physicist")}
        for name, password in passwords.items():
            add_user(work / "console-users.json", name, name, password)
        room = SimulatedRoom(folder=work / "records", approval="manual", autostart=False, seeds=True).start()
        try:
            config = console_config_from_service(
                room.config, publish_address=room.endpoints["publish"], command_address=room.endpoints["command"],
                client_keys=room.console_keys, port=port, users=UserStore.read(work / "console-users.json"),
                second_signoff_mm=DEMO_SECOND_SIGNOFF_MM,
                record_path=room.folder / "session.jsonl")
            accounts = "".join(f"\n  user {n!r} password {p!r}" for n, p in passwords.items())
            asyncio.run(_serve(config, duration_s, banner=f"\nsimulated room (IDLE); demo accounts:{accounts}"
                                                           f"\nfiles: {work}"))
        finally:
            room.stop()
    return 0


def _cmd_console(args: argparse.Namespace) -> int:
    room = None
    if args.simulate:
        from ..sim.rig import SimulatedRoom

        # The page drives the whole fraction: the room's service starts IDLE (no plan loaded).
        room = SimulatedRoom(folder=args.records, approval="manual", autostart=False, seeds=True).start()
        print(f"simulated room: service endpoints {room.endpoints}; record in {room.folder}", flush=True)
    import asyncio  # here: `spineguide --help` must not pay for it

    try:
        config = build_console_config(args, room)
        asyncio.run(_serve(config, args.duration))
    finally:
        if room is not None:
            room.stop()
    return 0


def add_commands(subparsers) -> None:
    """Add ``console`` to a subparsers object."""
    from .args import port_number, positive_float

    p = subparsers.add_parser("console", help="serve the live console web page (localhost) for the running service")
    p.add_argument("--service-config", type=Path, default=None,
                   help="the service's TOML config: endpoints, record (raw frames shown), limits, plan (overlays)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the login token operators type (>= 16 characters); without it: read-only")
    p.add_argument("--users", type=Path, default=None,
                   help="console-users/1 file (spineguide console-user add): per-user logins with roles")
    p.add_argument("--second-signoff-mm", type=positive_float, default=None,
                   help="a setup correction longer than this (mm) needs a second user's (physicist's) sign-off")
    p.add_argument("--second-signoff-deg", type=positive_float, default=None,
                   help="a setup correction rotating more than this (deg) needs a second sign-off")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8080, help="HTTP port (default 8080; 0 = any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit a non-loopback --host (only behind a TLS proxy on a closed network)")
    p.add_argument("--records", type=Path, default=None, help="folder of recorded sessions (default: the record's)")
    p.add_argument("--qa-history", type=Path, default=None, help="QA history (qa-record/1 JSON lines)")
    p.add_argument("--calibration-report", type=Path, default=None, help="folder of the latest calibration report")
    p.add_argument("--publish", default=None, help="override the service's PUB address")
    p.add_argument("--command", dest="command_address", default=None, help="override the service's command address")
    p.add_argument("--client-key", default=None, help="the console's CURVE .key_secret file")
    p.add_argument("--server-key", default=None, help="the service's public CURVE .key file")
    p.add_argument("--simulate", action="store_true",
                   help="also run a simulated room (service + imager + couch) in this process: demo only")
    p.add_argument("--duration", type=positive_float, default=None, help="stop after this many seconds (default: until killed)")
    p.set_defaults(func=_cmd_console)

    u = subparsers.add_parser("console-user", help="add a console user (name, role, argon2-hashed password)")
    u.add_argument("action", choices=["add"])
    u.add_argument("--users", type=Path, required=True, help="the console-users/1 file (created, mode 0600)")
    u.add_argument("--name", required=True, help="login name: 1-64 letters, digits, '.', '_', '-'")
    u.add_argument("--role", required=True, choices=["therapist", "physicist", "admin"])
    u.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin (default: ask on the terminal)")
    u.set_defaults(func=_cmd_console_user)


def _cmd_console_user(args: argparse.Namespace) -> int:
    import getpass
    import sys

    from ..console.users import add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    path = add_user(args.users, args.name, args.role, password)
    print(f"{args.name} ({args.role}) in {path}")
    return 0
