"""CurveZMQ keys and the authenticator: who may talk to the service.

When keys are configured, every endpoint of the service (frames PULL,
command ROUTER, PUB) is a CURVE server with the service's key pair, and a
:class:`zmq.auth.thread.ThreadAuthenticator` admits only clients whose
public key is in the allow-list folder. A client without an allowed key
cannot complete the handshake, so it can neither send frames or commands nor
receive anything published.

Key files are ZeroMQ's own certificate format (``zmq.auth.create_certificates``):
``NAME.key`` (public) and ``NAME.key_secret`` (public + secret). Key pairs
for the simulators and tests are made by :func:`create_keys`
(``spineguide keys``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .config import SecurityConfig
from .errors import SecurityError

__all__ = ["SecurityError", "KeyPair", "create_keys", "load_key_pair", "Authenticator",
           "make_server_socket_secure", "make_client_socket_secure"]

log = logging.getLogger(__name__)


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


def create_keys(folder: str | os.PathLike, clients: tuple[str, ...] = ("console", "imager", "delivery")) -> dict[str, Path]:
    """Make the service key pair and one key pair per client; fill the allow-list folder.

    Layout: ``folder/server.key(_secret)``, ``folder/clients/NAME.key(_secret)``
    and ``folder/allowed/NAME.key`` (public keys only: the allow-list the
    service reads). Existing files are not overwritten.

    Returns
    -------
    dict
        ``{"server": secret file, NAME: secret file..., "allowed": folder}``.

    Raises
    ------
    SecurityError
        CURVE is not available in this libzmq, or a key file already exists.
    """
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CURVE support")
    root = Path(folder)
    client_dir = root / "clients"
    allowed = root / "allowed"
    for d in (root, client_dir, allowed):
        d.mkdir(parents=True, exist_ok=True)
    names = ("server", *clients)
    for name in names:
        where = root if name == "server" else client_dir
        if (where / f"{name}.key_secret").exists():
            raise SecurityError(f"{where / (name + '.key_secret')}: exists; refusing to overwrite a key")
    out: dict[str, Path] = {}
    _, secret = zmq.auth.create_certificates(str(root), "server")
    out["server"] = Path(secret)
    for name in clients:
        public, secret = zmq.auth.create_certificates(str(client_dir), name)
        shutil.copy(public, allowed / Path(public).name)
        out[name] = Path(secret)
    out["allowed"] = allowed
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
        if not allowed.is_dir():
            raise SecurityError(f"{allowed}: allow-list folder does not exist")
        keys = sorted(allowed.glob("*.key"))
        if not keys:
            raise SecurityError(f"{allowed}: allow-list holds no client .key files; nobody could connect")
        # Read every key now (fail naming the file rather than reject clients later).
        self.allowed_keys = frozenset(load_key_pair(k).public for k in keys)
        self.allowed = allowed
        self._on_denied = on_denied
        self.denied = 0
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("tracking.security.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        log.info("CURVE on: %d allowed client key(s) in %s", len(keys), allowed)

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

    def stop(self) -> None:
        self._auth.stop()


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
