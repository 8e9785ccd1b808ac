"""Console user accounts: names, roles and argon2id password hashes (``console-users/1`` JSON).

Passwords are hashed and checked by argon2-cffi (``argon2.PasswordHasher``,
argon2id with its default parameters); nothing here hashes by hand. The file::

    {"schema": "console-users/1",
     "users": [{"name": "jdoe", "role": "therapist", "password_hash": "$argon2id$v=19$..."}]}

Roles and what each may do on the page (:data:`ROLE_COMMANDS`):

- ``therapist``: the fraction (load the plan, setup, approve, monitor, pause, resume, end);
- ``physicist``: all of that, the second sign-off of a large correction, and the
  sign-off of a session report;
- ``admin``: looks only (user accounts are managed with ``spineguide console-user``).

Per-user lockout: :data:`LOCKOUT_FAILURES` failed logins for one name within
:data:`LOCKOUT_WINDOW_S` lock that name (only) for :data:`LOCKOUT_S`; others
can still log in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from spineguide.calibration.jsonfile import parse_json_bytes

from ..errors import ConsoleConfigError

__all__ = ["LOCKOUT_FAILURES", "LOCKOUT_S", "LOCKOUT_WINDOW_S", "ROLES", "ROLE_COMMANDS", "ConsoleUser",
           "LoginGuard", "UserStore", "add_user"]

SCHEMA = "console-users/1"
ROLES = ("therapist", "physicist", "admin")
#: Page commands per role (``report_signoff`` and ``second_signoff`` are console actions, not service commands).
ROLE_COMMANDS: dict[str, frozenset[str]] = {
    "therapist": frozenset({"load_plan", "start_setup", "approve_correction", "start_monitoring", "pause",
                            "resume", "stop"}),
    "physicist": frozenset({"load_plan", "start_setup", "approve_correction", "start_monitoring", "pause",
                            "resume", "stop", "second_signoff", "report_signoff"}),
    "admin": frozenset(),
}
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 256
LOCKOUT_FAILURES = 5
LOCKOUT_WINDOW_S = 300.0
LOCKOUT_S = 300.0
#: Names whose failures are remembered at most (older entries are forgotten first): bounded memory.
MAX_TRACKED_NAMES = 10_000

_hasher = PasswordHasher()


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    name: str
    role: str
    password_hash: str


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConsoleConfigError(f"user name must be 1-64 letters, digits, '.', '_' or '-', got {name!r:.80}")
    return name


def check_password(password: Any) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ConsoleConfigError(f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    return password


class UserStore:
    """The accounts of one ``console-users/1`` file (read once at start-up)."""

    def __init__(self, users: dict[str, ConsoleUser], source: str = "users") -> None:
        self.users = dict(users)
        self.source = source
        # A hash of a random password: unknown names are checked against it (same time as a known name).
        self._dummy = _hasher.hash(os.urandom(16).hex())

    @classmethod
    def read(cls, path: str | os.PathLike) -> UserStore:
        p = Path(path)
        try:
            doc = parse_json_bytes(p.read_bytes(), str(p), ConsoleConfigError)
        except OSError as err:
            raise ConsoleConfigError(f"{p}: cannot read the console users: {err.strerror}") from err
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("users"), list):
            raise ConsoleConfigError(f"{p}: not a {SCHEMA} file (need schema and a users list)")
        users: dict[str, ConsoleUser] = {}
        for i, u in enumerate(doc["users"]):
            if not isinstance(u, dict):
                raise ConsoleConfigError(f"{p}: users[{i}] is not an object")
            try:
                name = check_name(u.get("name"))
            except ConsoleConfigError as err:
                raise ConsoleConfigError(f"{p}: users[{i}]: {err}") from None
            role, h = u.get("role"), u.get("password_hash")
            if role not in ROLES:
                raise ConsoleConfigError(f"{p}: user {name!r}: role must be one of {list(ROLES)}, got {role!r}")
            if not isinstance(h, str) or not h.startswith("$argon2"):
                raise ConsoleConfigError(f"{p}: user {name!r}: password_hash is not an argon2 hash")
            if name in users:
                raise ConsoleConfigError(f"{p}: user {name!r} appears twice")
            users[name] = ConsoleUser(name, role, h)
        if not users:
            raise ConsoleConfigError(f"{p}: no users")
        return cls(users, str(p))

    def verify(self, name: Any, password: Any) -> ConsoleUser | None:
        """The user when ``password`` is theirs, else None (unknown names take as long as known ones)."""
        user = self.users.get(name) if isinstance(name, str) else None
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return None
        try:
            _hasher.verify(user.password_hash if user else self._dummy, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user


def add_user(path: str | os.PathLike, name: str, role: str, password: str) -> Path:
    """Add (or replace the password and role of) ``name`` in the users file, creating it (mode 0600)."""
    check_name(name)
    check_password(password)
    if role not in ROLES:
        raise ConsoleConfigError(f"role must be one of {list(ROLES)}, got {role!r}")
    p = Path(path)
    users = []
    if p.exists():
        users = [{"name": u.name, "role": u.role, "password_hash": u.password_hash}
                 for u in UserStore.read(p).users.values() if u.name != name]
    users.append({"name": name, "role": role, "password_hash": _hasher.hash(password)})
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"schema": SCHEMA, "users": users}, f, indent=1)
    os.replace(tmp, p)
    return p


class LoginGuard:
    """Per-name lockout: too many failures for one name lock that name only, for a while."""

    def __init__(self, failures: int = LOCKOUT_FAILURES, window_s: float = LOCKOUT_WINDOW_S,
                 lockout_s: float = LOCKOUT_S) -> None:
        self.failures, self.window_s, self.lockout_s = failures, window_s, lockout_s
        self._fails: dict[str, list[float]] = {}
        self._locked_until: dict[str, float] = {}

    def locked_for_s(self, name: str, now_mono_s: float) -> float:
        until = self._locked_until.get(name)
        if until is None or until <= now_mono_s:
            self._locked_until.pop(name, None)
            return 0.0
        return until - now_mono_s

    def failed(self, name: str, now_mono_s: float) -> None:
        fails = [t for t in self._fails.pop(name, []) if t > now_mono_s - self.window_s] + [now_mono_s]
        self._fails[name] = fails  # re-inserted: newest last, oldest forgotten first
        if len(fails) >= self.failures:
            self._locked_until[name] = now_mono_s + self.lockout_s
            self._fails.pop(name, None)
        while len(self._fails) > MAX_TRACKED_NAMES:
            self._fails.pop(next(iter(self._fails)))

    def succeeded(self, name: str) -> None:
        self._fails.pop(name, None)
