"""CurveZMQ keys, the allow-list with roles, and who may send which command.

When keys are configured (the default: a configuration must say
``[security] enabled = false`` to run without them), every endpoint of the
service (frames PULL, command ROUTER, PUB) is a CURVE server with the
service's key pair, and a :class:`zmq.auth.thread.ThreadAuthenticator`
admits only clients whose public key is in the allow-list folder. A client
without an allowed key cannot complete the handshake, so it can neither send
frames or commands nor receive anything published.

Each allowed key has a name (its file ``NAME.key``) and a role
(``roles.toml`` beside the keys): the service takes the operator of every
command from the key that authenticated the connection (ZAP User-Id), never
from what the client writes into the command, and :data:`COMMAND_ROLES` says
which roles may send which command (:func:`authorize_command`).

Key files are ZeroMQ's own certificate format (``zmq.auth.create_certificates``):
``NAME.key`` (public) and ``NAME.key_secret`` (public + secret). Key pairs
for the simulators and tests are made by :func:`create_keys`
(``spineguide keys``). See docs/SECURITY.md.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from spineguide.calibration.foundation import enum_member, enum_values

from ..errors import CommandRefused, SecurityError
from .config import SecurityConfig
from .states import Command

__all__ = ["SecurityError", "KeyPair", "Role", "ClientIdentity", "COMMAND_ROLES", "DEFAULT_CLIENT_ROLES",
           "ROLES_FILE", "UNAUTHENTICATED", "authorize_command", "roles_markdown", "load_allow_list", "create_keys",
           "load_key_pair", "Authenticator", "user_id_of", "make_server_socket_secure", "make_client_socket_secure",
           "ClientKeys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """A CURVE client's own ``.key_secret`` file and the server's public ``.key`` file."""

    client_secret: Path
    server_public: Path


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A Curve25519 key pair (Z85-encoded bytes); ``secret`` is None for a public-only certificate."""

    public: bytes
    secret: bytes | None


def load_key_pair(path: str | os.PathLike) -> KeyPair:
    """Read a ZeroMQ certificate file (``.key`` or ``.key_secret``).

    Raises
    ------
    SecurityError
        Missing or malformed file (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"{p}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as err:
        raise SecurityError(f"{p}: not a ZeroMQ certificate: {err}") from err
    if public is None or len(public) != 40:
        raise SecurityError(f"{p}: no valid public key (expected 40 Z85 characters)")
    return KeyPair(public, secret)


class Role(Enum):
    """What an authenticated client is (``roles.toml``); :data:`COMMAND_ROLES` says what each may command."""

    THERAPIST = "therapist"  # runs the treatment at a console: plan, setup, approval, monitoring
    PHYSICIST = "physicist"  # everything a therapist may, and set_tolerance
    DELIVERY = "delivery"    # the delivery system: reports couch_moved, may pause (a HOLD)
    IMAGER = "imager"        # the imaging system: sends frames; may only ask for status
    VIEWER = "viewer"        # a display: may only ask for status


_R = Role
_STAFF = frozenset({_R.THERAPIST, _R.PHYSICIST})
#: Which roles may send which command. Status is open to every allowed key; whatever can lead to
#: an ENABLE or move the couch (load_plan, approve_correction, start_monitoring, resume) needs a
#: person at a console; only a physicist changes tolerances; the couch's own report comes from
#: the delivery system, which may also pause (pausing only ever HOLDs the beam).
COMMAND_ROLES: Mapping[Command, frozenset[Role]] = {
    Command.STATUS: frozenset(Role),
    Command.LIST_PLANS: _STAFF,  # patient names: for the people who run the fraction only
    Command.LOAD_PLAN: _STAFF,
    Command.START_SETUP: _STAFF,
    Command.APPROVE_CORRECTION: _STAFF,
    Command.COUCH_MOVED: frozenset({_R.DELIVERY}),
    Command.START_MONITORING: _STAFF,
    Command.PAUSE: _STAFF | {_R.DELIVERY},
    Command.RESUME: _STAFF,
    Command.STOP: _STAFF,
    Command.SET_TOLERANCE: frozenset({_R.PHYSICIST}),
}

#: Roles of the clients :func:`create_keys` makes by default (the simulators and a console).
DEFAULT_CLIENT_ROLES: Mapping[str, Role] = {"console": Role.THERAPIST, "imager": Role.IMAGER,
                                            "delivery": Role.DELIVERY}
#: The file in the allow-list folder that gives each key its role.
ROLES_FILE = "roles.toml"
#: The operator recorded for commands to a service that explicitly runs without CURVE.
UNAUTHENTICATED = "unauthenticated"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """An allowed client: the name of its key file, its role, and its public key (Z85 text)."""

    name: str
    role: Role
    public_key: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SecurityError(f"client name must be 1..64 letters, digits, '.', '_' or '-', got {self.name!r}")
        if not isinstance(self.role, Role):
            raise SecurityError(f"client '{self.name}': role must be a Role, got {self.role!r}")


def roles_markdown() -> str:
    """:data:`COMMAND_ROLES` as a Markdown table, command by role (docs/SECURITY.md)."""
    roles = list(Role)
    lines = ["| command | " + " | ".join(r.value for r in roles) + " |", "|---" * (len(roles) + 1) + "|"]
    for cmd in Command:
        cells = ["yes" if r in COMMAND_ROLES.get(cmd, ()) else "-" for r in roles]
        lines.append(f"| `{cmd.value}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_roles(path: Path) -> dict[str, Role]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SecurityError(f"{path}: no roles file; it gives each allowed key its role, e.g. "
                            f"[roles] console = \"therapist\" (roles: {[r.value for r in Role]})") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SecurityError(f"{path}: not a readable TOML roles file: {err}") from err
    table = data.get("roles")
    if set(data) != {"roles"} or not isinstance(table, dict):
        raise SecurityError(f"{path}: must hold exactly one table [roles] (NAME = \"ROLE\"), got {sorted(data)}")
    out = {}
    for name, role in table.items():
        out[name] = enum_member(Role, role, SecurityError,
                                f"{path}: client '{name}' has role {role!r}; roles are {enum_values(Role)}")
    return out


def load_allow_list(folder: str | os.PathLike) -> dict[str, ClientIdentity]:
    """Read the allow-list: every ``NAME.key`` in ``folder`` with its role from ``folder/roles.toml``.

    Returns
    -------
    dict
        Z85 public key (text, as the ZAP User-Id) -> :class:`ClientIdentity`.

    Raises
    ------
    SecurityError
        No such folder, no key in it, an unreadable key, two files with the
        same key, a key without a role, a role for a key that is not there,
        or an unknown role; the message names the file.
    """
    allowed = Path(folder)
    if not allowed.is_dir():
        raise SecurityError(f"{allowed}: allow-list folder does not exist")
    keys = sorted(allowed.glob("*.key"))
    if not keys:
        raise SecurityError(f"{allowed}: allow-list holds no client .key files; nobody could connect")
    roles = _read_roles(allowed / ROLES_FILE)
    out: dict[str, ClientIdentity] = {}
    for k in keys:
        name = k.stem
        if not _NAME.match(name):
            raise SecurityError(f"{k}: a client name must be 1..64 letters, digits, '.', '_' or '-'")
        if name not in roles:
            raise SecurityError(f"{k}: no role for '{name}' in {allowed / ROLES_FILE}")
        public = load_key_pair(k).public.decode("ascii")
        if public in out:
            raise SecurityError(f"{k}: the same public key as '{out[public].name}.key'; one key, one client")
        out[public] = ClientIdentity(name, roles[name], public)
    extra = sorted(set(roles) - {i.name for i in out.values()})
    if extra:
        raise SecurityError(f"{allowed / ROLES_FILE}: roles for {extra} but no such .key file in {allowed}")
    return out


def authorize_command(identity: ClientIdentity | None, insecure: bool, command: str,
                      params: Mapping[str, Any]) -> dict[str, Any]:
    """The params the engine is given for a command from ``identity``, or the reason it is refused.

    The operator and role come from the authenticated key: the result holds
    the client's own params plus ``operator`` (the key's name) and ``role``.
    A client may repeat its own name as ``operator`` but never declare
    another, nor a ``role``. With CURVE explicitly off (``insecure``) nobody is
    authenticated: every command is let through under the operator
    ``unauthenticated`` (role None). An unknown command name passes through
    (the engine refuses it with the list of commands).

    Raises
    ------
    CommandRefused
        No authenticated identity on a secure service, a declared operator
        that is not the key's name, a declared role, or a role that may not
        send this command (:data:`COMMAND_ROLES`).
    """
    if identity is None and not insecure:
        raise CommandRefused(f"command '{command}': no authenticated client key on this connection")
    name = UNAUTHENTICATED if identity is None else identity.name
    if "role" in params:
        raise CommandRefused(f"command '{command}': 'role' comes from the client key, not from the command")
    declared = params.get("operator")
    if declared is not None and declared != name:
        raise CommandRefused(f"command '{command}': declared operator {declared!r} is not the authenticated "
                             f"client '{name}'; the operator is taken from the client key")
    if identity is not None:
        try:
            cmd = Command(command)
        except ValueError:
            cmd = None
        permitted = COMMAND_ROLES.get(cmd, frozenset()) if cmd is not None else frozenset(Role)
        if identity.role not in permitted:  # a command missing from the table: nobody (fail closed)
            allowed = sorted(r.value for r in permitted)
            raise CommandRefused(f"command '{command}': client '{identity.name}' has role "
                                 f"'{identity.role.value}'; it needs one of {allowed}")
    return {**params, "operator": name, "role": None if identity is None else identity.role.value}


def create_keys(folder: str | os.PathLike, clients: Mapping[str, Role] | None = None) -> dict[str, Path]:
    """Make the service key pair and one key pair per client; fill the allow-list folder and its roles.

    Layout: ``folder/server.key(_secret)``, ``folder/clients/NAME.key(_secret)``
    and ``folder/allowed/NAME.key`` (public keys only: the allow-list the
    service reads) with ``folder/allowed/roles.toml``. Existing files are not
    overwritten.

    Parameters
    ----------
    folder : path
    clients : mapping of name -> Role, optional
        Default :data:`DEFAULT_CLIENT_ROLES` (console, imager, delivery).

    Returns
    -------
    dict
        ``{"server": secret file, NAME: secret file..., "allowed": folder, "roles": roles file}``.

    Raises
    ------
    SecurityError
        CURVE is not available in this libzmq, a name or role is invalid, or
        a key or roles file already exists.
    """
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support")
    clients = dict(DEFAULT_CLIENT_ROLES if clients is None else clients)
    for name, role in clients.items():
        if name == "server" or not isinstance(name, str) or not _NAME.match(name):
            raise SecurityError(f"client name must be 1..64 letters, digits, '.', '_' or '-' (not 'server'), "
                                f"got {name!r}")
        if not isinstance(role, Role):
            raise SecurityError(f"client '{name}': role must be one of {[r.value for r in Role]}, got {role!r}")
    root = Path(folder)
    client_dir = root / "clients"
    allowed = root / "allowed"
    for d in (root, client_dir, allowed):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("server", *clients):
        where = root if name == "server" else client_dir
        if (where / f"{name}.key_secret").exists():
            raise SecurityError(f"{where / (name + '.key_secret')}: exists; refusing to overwrite a key")
    if (allowed / ROLES_FILE).exists():
        raise SecurityError(f"{allowed / ROLES_FILE}: exists; refusing to overwrite the roles")
    out: dict[str, Path] = {}
    _, secret = zmq.auth.create_certificates(str(root), "server")
    out["server"] = Path(secret)
    for name in clients:
        public, secret = zmq.auth.create_certificates(str(client_dir), name)
        shutil.copy(public, allowed / Path(public).name)
        out[name] = Path(secret)
    lines = ["# Role of each allowed client key (NAME.key in this folder).",
             f"# Roles: {', '.join(r.value for r in Role)} (docs/SECURITY.md).", "[roles]"]
    lines += [f'"{name}" = "{role.value}"' for name, role in clients.items()]
    (allowed / ROLES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    out["allowed"] = allowed
    out["roles"] = allowed / ROLES_FILE
    return out


class Authenticator:
    """The CURVE allow-list of one service (wraps ``ThreadAuthenticator``; one per zmq.Context).

    Parameters
    ----------
    context : zmq.Context
    config : SecurityConfig
        ``enabled`` must be true.
    """

    def __init__(self, context: zmq.Context, config: SecurityConfig,
                 on_denied: Callable[[str], None] | None = None) -> None:
        if not config.enabled:
            raise SecurityError("no keys configured")
        self.server = load_key_pair(config.server_secret_key)
        if self.server.secret is None:
            raise SecurityError(f"{config.server_secret_key}: holds no secret key (use the .key_secret file)")
        allowed = Path(config.allowed_clients)
        # Read every key and role now (fail naming the file rather than reject clients later).
        self.identities: dict[str, ClientIdentity] = load_allow_list(allowed)
        self.allowed_keys = frozenset(k.encode("ascii") for k in self.identities)
        self.allowed = allowed
        self._on_denied = on_denied
        self.denied = 0
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("spineguide.tracking.service.security.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        log.info("CURVE on: %d allowed client key(s) in %s: %s", len(self.identities), allowed,
                 ", ".join(f"{i.name} ({i.role.value})" for i in self.identities.values()))

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP check of one client's public key (Z85); runs on the authenticator's thread."""
        if key in self.allowed_keys:
            return True
        self.denied += 1
        log.warning("CURVE: refused a client with public key %s (not in %s)", key.decode("ascii", "replace"),
                    self.allowed)
        if self._on_denied is not None:
            self._on_denied(key.decode("ascii", "replace"))
        return False

    def identity_of(self, user_id: str | None) -> ClientIdentity | None:
        """The allowed client behind a ZAP User-Id (the Z85 public key of an authenticated connection)."""
        return None if user_id is None else self.identities.get(user_id)

    def stop(self) -> None:
        self._auth.stop()


def user_id_of(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id a received frame carries (the client's Z85 public key under CURVE), or None.

    Call it on a frame received with ``copy=False`` on a CURVE server socket.
    """
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None  # no ZAP handler on this socket (NULL mechanism): nobody was authenticated
    return user_id or None


def make_server_socket_secure(sock: zmq.Socket, server: KeyPair | None) -> None:
    """Turn ``sock`` into a CURVE server (before bind); no-op when ``server`` is None."""
    if server is None:
        return
    sock.curve_secretkey = server.secret
    sock.curve_publickey = server.public
    sock.curve_server = True


def make_client_socket_secure(sock: zmq.Socket, client_secret_file: str | os.PathLike | None,
                              server_public_file: str | os.PathLike | None) -> None:
    """Make ``sock`` a CURVE client of the server (before connect); no-op when both are None.

    Raises
    ------
    SecurityError
        Only one of the two files given, or a file without the needed key.
    """
    if client_secret_file is None and server_public_file is None:
        return
    if client_secret_file is None or server_public_file is None:
        raise SecurityError("a CURVE client needs both its own .key_secret file and the server's public key")
    me = load_key_pair(client_secret_file)
    if me.secret is None:
        raise SecurityError(f"{client_secret_file}: holds no secret key")
    server = load_key_pair(server_public_file)
    sock.curve_secretkey = me.secret
    sock.curve_publickey = me.public
    sock.curve_serverkey = server.public
