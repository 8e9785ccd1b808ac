"""ZeroMQ wire formats (docs/CONVENTIONS.md, docs/PROTOCOL.md): encoding and total, strict validation.

Every message is multipart: frame 0 names the message, frame 1 is a UTF-8
JSON object whose ``schema`` field carries name and version (``"kvframe/1"``).
Receivers ignore fields they do not know and reject a schema major version
they do not know. No pickle, ever: JSON headers and raw little-endian pixels.

These are codecs only: no sockets here. Every decoder is total: whatever
bytes (or objects) it is given, it returns a decoded value or raises
:class:`~spineguide.tracking.errors.WireSchemaError` (or
:class:`~spineguide.tracking.errors.FrameError` for pixel problems) naming what is
wrong; never another exception. JSON goes through the project's one hardened
parser, :func:`spineguide.calibration.jsonfile.parse_json_bytes` (size first, strict
UTF-8, nesting depth, 64-bit integers, no NaN/Infinity, no duplicate keys).

Sessions (protocol 1.1, docs/PROTOCOL.md): every message the service sends
carries its ``session`` id (``gating/1.1``, ``correction/1.1``,
``heartbeat/1.1``, ``reply/1.1``); a ``kvframe/1.1`` or ``command/1.1``
carries the sender's. In ``kvframe/1`` and ``command/1`` it is optional.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from spineguide.calibration.jsonfile import parse_json_bytes
from spineguide.registration.pose import Correction

from ..errors import FrameError, NonFinitePixelsError, PayloadSizeError, WireSchemaError
from ..frames import KvFrame
from .gating import GatingDecision

__all__ = [
    "KNOWN_MAJOR",
    "OUTBOUND_MINOR",
    "WireLimits",
    "SeqCounter",
    "parse_schema",
    "schema_version",
    "encode_json_message",
    "decode_json_message",
    "encode_kvframe",
    "decode_kvframe",
    "WireFrame",
    "encode_correction",
    "encode_gating",
    "encode_heartbeat",
    "PayloadSizeError",
    "NonFinitePixelsError",
    "gating_body",
    "correction_body",
    "encode_message",
    "CommandRequest",
    "encode_command",
    "decode_command",
    "encode_reply",
    "decode_reply",
    "encode_couch",
    "decode_couch",
]

#: Schema name -> the one major version this build understands.
KNOWN_MAJOR = {
    "kvframe": 1,
    "correction": 1,
    "gating": 1,
    "heartbeat": 1,
    "command": 1,
    "reply": 1,
    "couch": 1,
}

#: Minor version of the messages the service sends (1: they carry ``session``).
OUTBOUND_MINOR = 1
#: Messages that must carry ``session`` from this minor version on.
_SESSION_SINCE_MINOR = 1
_SESSION_REQUIRED = frozenset({"correction", "gating", "heartbeat", "reply"})

_DTYPES = {"uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}
#: ``<major>[.<minor>]``, ASCII digits only (``str.isdigit`` would take ``"²"``), at most 6 digits each.
_VERSION_RE = re.compile(r"([0-9]{1,6})(?:\.([0-9]{1,6}))?", re.ASCII)
#: A session id: ASCII letters, digits, ``-`` and ``_`` (the service sends ``uuid4().hex``).
_SESSION_RE = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Explicit size limits on inbound messages (bytes, pixels, characters, nesting levels)."""

    max_header_bytes: int = 16 * 1024
    max_rows: int = 4096
    max_cols: int = 4096
    max_name_chars: int = 64
    max_command_params: int = 16
    max_json_depth: int = 16

    @property
    def max_payload_bytes(self) -> int:
        """Largest legal pixel payload: ``max_rows * max_cols`` float32 pixels, bytes."""
        return self.max_rows * self.max_cols * 4


def _show(value: object, n: int = 40) -> str:
    """A short ``repr`` for messages (a hostile value may be 16 KiB long)."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def schema_version(value: object, expected_name: str) -> tuple[int, int]:
    """Check a ``schema`` string ``"<name>/<major>[.<minor>]"``; return ``(major, minor)`` (minor 0 if absent).

    Raises
    ------
    WireSchemaError
        Not a string, another name, a version that is not ASCII digits, or a
        major version this build does not know.
    """
    known = KNOWN_MAJOR.get(expected_name) if isinstance(expected_name, str) else None
    if known is None:
        raise WireSchemaError(f"unknown message name {_show(expected_name)}")
    if not isinstance(value, str):
        raise WireSchemaError(f"{expected_name}: 'schema' must be a string, got {type(value).__name__}")
    name, sep, version = value.partition("/")
    if not sep or name != expected_name:
        raise WireSchemaError(f"expected a '{expected_name}/N' schema, got {_show(value)}")
    m = _VERSION_RE.fullmatch(version)
    if m is None:
        raise WireSchemaError(f"{expected_name}: malformed schema version in {_show(value)} "
                              "(expected ASCII digits <major>[.<minor>])")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    if major != known:
        raise WireSchemaError(
            f"{expected_name}: unknown schema major version {major} in {_show(value)} (this build knows {known})"
        )
    return major, minor


def parse_schema(value: object, expected_name: str) -> int:
    """Check a ``schema`` string ``"<name>/<major>[.<minor>]"``; return the major version (see :func:`schema_version`)."""
    return schema_version(value, expected_name)[0]


class SeqCounter:
    """Message numbers of one sending socket: 0, 1, 2, ... (owned by the thread that owns the socket)."""

    def __init__(self) -> None:
        self._next = 0

    def next(self) -> int:
        value = self._next
        self._next += 1
        return value


def _dumps(obj: dict) -> bytes:
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except ValueError as err:
        raise WireSchemaError(f"{obj.get('schema', '?')}: refusing to send a non-finite number: {err}") from err


def encode_json_message(topic: str, obj: dict) -> list[bytes]:
    """``[topic, json]`` for a message whose frame 1 is the whole content."""
    return [topic.encode("ascii"), _dumps(obj)]


def _parts(parts: object, n: int, what: str) -> list[bytes]:
    """The message frames as bytes; refuses anything but a list/tuple of ``n`` byte strings."""
    if not isinstance(parts, (list, tuple)):
        raise WireSchemaError(f"{what}: expected a list of message frames, got {type(parts).__name__}")
    if len(parts) != n:
        raise WireSchemaError(f"{what}: expected {n} message frames, got {len(parts)}")
    out = []
    for i, part in enumerate(parts):
        if isinstance(part, bytes):
            out.append(part)
        elif isinstance(part, (bytearray, memoryview)):
            out.append(bytes(part))
        elif isinstance(getattr(part, "bytes", None), bytes):  # zmq.Frame
            out.append(part.bytes)
        else:
            raise WireSchemaError(f"{what}: message frame {i} is {type(part).__name__}, not bytes")
    return out


def decode_json_message(parts: list[bytes], expected_topic: str, limits: WireLimits = WireLimits()) -> dict:
    """Validate ``[topic, json]`` and return the JSON object (unknown fields kept, ignored by callers).

    Raises
    ------
    WireSchemaError
        Anything but two byte frames, another topic, a header refused by the
        JSON parser or not an object, an unknown schema major version, or a
        ``session`` that is missing (service messages from minor 1) or malformed.
    """
    if not isinstance(expected_topic, str) or expected_topic not in KNOWN_MAJOR:
        raise WireSchemaError(f"unknown message name {_show(expected_topic)}")
    raw = _parts(parts, 2, expected_topic)
    if raw[0] != expected_topic.encode("ascii"):
        raise WireSchemaError(f"expected a '{expected_topic}' message, got frame 0 = {raw[0][:32]!r}")
    obj = _loads_header(raw[1], expected_topic, limits)
    _, minor = schema_version(obj.get("schema"), expected_topic)
    _session_field(obj, expected_topic, expected_topic in _SESSION_REQUIRED and minor >= _SESSION_SINCE_MINOR)
    return obj


def _loads_header(raw: bytes, what: str, limits: WireLimits) -> dict:
    obj = parse_json_bytes(raw, f"{what} header", WireSchemaError, max_bytes=limits.max_header_bytes,
                           max_depth=limits.max_json_depth)
    if not isinstance(obj, dict):
        raise WireSchemaError(f"{what}: header must be a JSON object, got {type(obj).__name__}")
    return obj


def _session_field(obj: dict, what: str, required: bool) -> str | None:
    value = obj.get("session")
    if value is None and not required:
        return None
    if not isinstance(value, str) or _SESSION_RE.fullmatch(value) is None:
        raise WireSchemaError(f"{what}: 'session' must be 1-64 ASCII letters, digits, '-' or '_'"
                              f"{' (required from minor version 1)' if required else ''}, got {_show(value)}")
    return value


def _int_field(obj: dict, key: str, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireSchemaError(f"{what}: '{key}' must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise WireSchemaError(f"{what}: '{key}' = {value} outside [{lo}, {hi}]")
    return value


def _float_field(obj: dict, key: str, what: str, positive: bool = False, optional: bool = False) -> float | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WireSchemaError(f"{what}: '{key}' must be a finite number, got {_show(value)}")
    if positive and value <= 0:
        raise WireSchemaError(f"{what}: '{key}' must be positive, got {_show(value)}")
    return float(value)


# ---------------------------------------------------------------------- kvframe
@dataclass(frozen=True, slots=True)
class WireFrame:
    """A decoded ``kvframe/1`` message: the frame, its sender's sequence number and session (None in ``kvframe/1``)."""

    seq: int
    frame: KvFrame
    session: str | None = None


def encode_kvframe(
    seq: int,
    imager: str,
    pair_id: int,
    acquired_unix_s: float,
    pixels: np.ndarray,
    i0: float | None,
    session: str | None = None,
) -> list[bytes]:
    """``[b"kvframe", header, pixels]`` with raw little-endian row-major pixels.

    With the sender's ``session`` the header is ``kvframe/1.1``; without it
    ``kvframe/1`` (a sender that cannot be told apart from its own restart
    except by ``seq`` going back; docs/PROTOCOL.md).
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.dtype.name not in _DTYPES:
        raise FrameError(f"kvframe: pixels must be a 2D uint16 or float32 array, got {arr.dtype} {arr.shape}")
    if session is not None and (not isinstance(session, str) or _SESSION_RE.fullmatch(session) is None):
        raise WireSchemaError(f"kvframe: session must be 1-64 ASCII letters, digits, '-' or '_', got {session!r}")
    header = {
        "schema": "kvframe/1" if session is None else "kvframe/1.1",
        "seq": int(seq),
        "imager": imager,
        "pair_id": int(pair_id),
        "acquired_unix_s": float(acquired_unix_s),
        "rows": int(arr.shape[0]),
        "cols": int(arr.shape[1]),
        "dtype": arr.dtype.name,
        "i0": None if i0 is None else float(i0),
    }
    if session is not None:
        header["session"] = session
    data = np.ascontiguousarray(arr, dtype=_DTYPES[arr.dtype.name]).tobytes()
    return [b"kvframe", _dumps(header), data]


def decode_kvframe(parts: list[bytes], limits: WireLimits = WireLimits()) -> WireFrame:
    """Validate and decode a ``kvframe/1`` message.

    Raises
    ------
    WireSchemaError
        Wrong frame count or name, oversized or malformed header, unknown
        schema major, a field of the wrong type or out of range.
    FrameError
        Pixel payload of the wrong size, or NaN/negative pixels.
    """
    what = "kvframe"
    raw = _parts(parts, 3, what)
    if raw[0] != b"kvframe":
        raise WireSchemaError(f"expected a 'kvframe' message, got frame 0 = {raw[0][:32]!r}")
    h = _loads_header(raw[1], what, limits)
    _, minor = schema_version(h.get("schema"), "kvframe")
    session = _session_field(h, what, minor >= _SESSION_SINCE_MINOR)
    seq = _int_field(h, "seq", what)
    imager = h.get("imager")
    if not isinstance(imager, str) or not 0 < len(imager) <= limits.max_name_chars:
        raise WireSchemaError(f"{what}: 'imager' must be a name of 1-{limits.max_name_chars} characters, "
                              f"got {_show(imager)}")
    pair_id = _int_field(h, "pair_id", what)
    acquired = _float_field(h, "acquired_unix_s", what, positive=True)
    rows = _int_field(h, "rows", what, 1, limits.max_rows)
    cols = _int_field(h, "cols", what, 1, limits.max_cols)
    dtype_name = h.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise WireSchemaError(f"{what}: 'dtype' must be one of {sorted(_DTYPES)}, got {_show(dtype_name)}")
    i0 = _float_field(h, "i0", what, positive=True, optional=True)
    dtype = _DTYPES[dtype_name]
    payload = raw[2]
    expected = rows * cols * dtype.itemsize
    if len(payload) != expected:
        raise PayloadSizeError(
            f"{what} seq {seq} imager '{imager}' pair {pair_id}: pixel payload is {len(payload)} bytes, "
            f"expected {expected} for {rows}x{cols} {dtype_name}"
        )
    pixels = np.frombuffer(payload, dtype=dtype).reshape(rows, cols).astype(dtype.newbyteorder("="), copy=True)
    if dtype_name == "float32":
        bad = ~np.isfinite(pixels)
        if np.any(bad):
            raise NonFinitePixelsError(
                f"{what} seq {seq} imager '{imager}' pair {pair_id}: {int(bad.sum())} pixels are NaN or infinite")
        if np.any(pixels < 0):
            raise FrameError(f"{what} seq {seq} imager '{imager}' pair {pair_id}: negative pixels")
    pixels.setflags(write=False)
    try:
        frame = KvFrame(imager, pixels, i0=i0, acquired_unix_s=acquired, pair_id=pair_id,
                        source=f"kvframe seq {seq}")
    except FrameError:
        raise
    except (TypeError, ValueError) as err:  # KvFrame's own checks: name them as a frame problem
        raise FrameError(f"{what} seq {seq} imager {_show(imager)} pair {pair_id}: {err}") from err
    return WireFrame(seq, frame, session)


# ------------------------------------------------------------------- outbound
def _outbound_session(session: object, what: str) -> str:
    if not isinstance(session, str) or _SESSION_RE.fullmatch(session) is None:
        raise WireSchemaError(f"{what}: the service session id must be 1-64 ASCII letters, digits, '-' or '_', "
                              f"got {_show(session)}")
    return session


def correction_body(
    pair_id: int | None,
    t_unix_s: float,
    correction: Correction,
    method: str,
    quality: dict[str, Any],
    *,
    session: str,
    **extra: Any,
) -> dict[str, Any]:
    """Content of a ``correction/1.1`` message without ``seq`` (the publisher stamps it at send time).

    ``session`` is the service session id; ``extra`` adds fields beyond
    CONVENTIONS (``apply``, ``purpose``; see docs/PROTOCOL.md).
    """
    if method not in ("fiducial", "anatomy"):
        raise WireSchemaError(f"correction: method must be 'fiducial' or 'anatomy', got {method!r}")
    if "ok" not in quality or not isinstance(quality["ok"], bool):
        raise WireSchemaError("correction: quality must contain a boolean 'ok'")
    body = {
        "schema": f"correction/1.{OUTBOUND_MINOR}",
        "session": _outbound_session(session, "correction"),
        "pair_id": pair_id,
        "t_unix_s": float(t_unix_s),
        "translation_mm": [float(x) for x in correction.translation_mm],
        "rotation_deg": [float(x) for x in correction.rotation_deg],
        "method": method,
        "quality": quality,
    }
    _add_extra(body, extra, "correction")
    return body


#: ``gating`` minor version: 2 adds ``one_view`` and ``deviation_bound_mm`` (one-view monitoring, docs/ONE_VIEW.md).
GATING_MINOR = 2


def gating_body(t_unix_s: float, decision: GatingDecision, *, session: str) -> dict[str, Any]:
    """Content of a ``gating/1.2`` message without ``seq`` (``session``: the service session id).

    ``one_view``: the imager a one-view pair was measured with, null for stereo (or no pair);
    ``deviation_bound_mm``: the 95 % upper bound of the 3D deviation the gate judged, null without one.
    """
    return {
        "schema": f"gating/1.{GATING_MINOR}",
        "session": _outbound_session(session, "gating"),
        "t_unix_s": float(t_unix_s),
        "beam": decision.beam.value,
        "reason": decision.reason.value,
        "valid_until_unix_s": float(decision.valid_until_unix_s),
        "pair_id": decision.pair_id,
        "deviation_mm": None if decision.deviation_mm is None else float(decision.deviation_mm),
        "one_view": decision.one_view,
        "deviation_bound_mm": None if decision.deviation_bound_mm is None else float(decision.deviation_bound_mm),
    }


def _add_extra(body: dict, extra: dict | None, what: str) -> None:
    for key in extra or {}:
        if key in body or key == "seq":
            raise WireSchemaError(f"{what}: extra field {key!r} would overwrite a required field")
    body.update(extra or {})


def encode_message(seq: int, body: dict[str, Any]) -> list[bytes]:
    """``[topic, json]`` for an outgoing body: the topic is the schema's name, ``seq`` is added here.

    Raises
    ------
    WireSchemaError
        No known ``schema`` in the body, a ``seq`` already present, or a non-finite number.
    """
    schema = body.get("schema")
    if not isinstance(schema, str) or "/" not in schema:
        raise WireSchemaError(f"outgoing message without a schema: {sorted(body)}")
    topic = schema.partition("/")[0]
    if topic not in KNOWN_MAJOR:
        raise WireSchemaError(f"outgoing message with unknown schema name {topic!r}")
    _, minor = schema_version(schema, topic)
    if topic in _SESSION_REQUIRED and minor >= _SESSION_SINCE_MINOR:
        _outbound_session(body.get("session"), topic)
    if "seq" in body:
        raise WireSchemaError(f"{topic}: 'seq' is stamped by the sender, not the body")
    return encode_json_message(topic, {"schema": schema, "seq": int(seq), **{k: v for k, v in body.items() if k != "schema"}})


def encode_correction(
    seq: int,
    pair_id: int | None,
    t_unix_s: float,
    correction: Correction,
    method: str,
    quality: dict[str, Any],
    *,
    session: str,
) -> list[bytes]:
    """``correction/1.1``: the couch correction (never a pose), method and quality."""
    return encode_message(seq, correction_body(pair_id, t_unix_s, correction, method, quality, session=session))


def encode_gating(seq: int, t_unix_s: float, decision: GatingDecision, *, session: str) -> list[bytes]:
    """``gating/1.2`` from a gating decision."""
    return encode_message(seq, gating_body(t_unix_s, decision, session=session))


def encode_heartbeat(seq: int, t_unix_s: float, state: str, extra: dict[str, Any] | None = None, *,
                     session: str) -> list[bytes]:
    """``heartbeat/1.1``: the service (session ``session``) is alive and in ``state``."""
    body = {"schema": f"heartbeat/1.{OUTBOUND_MINOR}", "session": _outbound_session(session, "heartbeat"),
            "seq": int(seq), "t_unix_s": float(t_unix_s), "state": state}
    _add_extra(body, extra, "heartbeat")
    return encode_json_message("heartbeat", body)


# ------------------------------------------------------------ commands, replies
#: Longest command name accepted, characters.
_MAX_COMMAND_CHARS = 32


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A decoded ``command/1`` request.

    Attributes
    ----------
    seq : int
        The client's message number (echoed in the reply as ``request_seq``).
    command : str
        Command name (``status``, ``start_setup``...); checked against the
        known set by the state machine, not here.
    params : dict
        Command parameters (JSON scalars or short lists only).
    session : str or None
        The client's session id (``command/1.1``; None from a ``command/1`` client).
    """

    seq: int
    command: str
    params: dict[str, Any]
    session: str | None = None


def encode_command(seq: int, command: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> list[bytes]:
    """``[b"command", json]`` for a client (console, delivery-sim); ``command/1.1`` with the client's ``session``."""
    body = {"schema": "command/1" if session is None else "command/1.1", "seq": int(seq), "command": command,
            "params": dict(params or {})}
    if session is not None:
        body["session"] = _outbound_session(session, "command")
    return encode_json_message("command", body)


def decode_command(parts: list[bytes], limits: WireLimits = WireLimits()) -> CommandRequest:
    """Validate a ``command/1`` request.

    Raises
    ------
    WireSchemaError
        Wrong frames, oversized or malformed JSON, unknown schema major, a
        missing/ill-typed ``seq``/``command``/``params``, too many params, or
        a param that is not a finite scalar, string or list of up to 16 numbers.
    """
    obj = decode_json_message(parts, "command", limits)
    _, minor = schema_version(obj.get("schema"), "command")
    session = _session_field(obj, "command", minor >= _SESSION_SINCE_MINOR)
    seq = _int_field(obj, "seq", "command")
    name = obj.get("command")
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_COMMAND_CHARS:
        raise WireSchemaError(f"command: 'command' must be a name of 1-{_MAX_COMMAND_CHARS} characters, "
                              f"got {_show(name)}")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise WireSchemaError(f"command '{name}': 'params' must be an object, got {type(params).__name__}")
    if len(params) > limits.max_command_params:
        raise WireSchemaError(f"command '{name}': {len(params)} params (limit {limits.max_command_params})")
    for key, value in params.items():
        if not _scalar_ok(value, limits) and not (
                isinstance(value, list) and len(value) <= 16 and all(_number_ok(v) for v in value)):
            raise WireSchemaError(f"command '{name}': param {_show(key)} must be a finite scalar, short string or "
                                  f"list of up to 16 numbers, got {_show(value)}")
    return CommandRequest(seq, name, dict(params), session)


def _number_ok(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scalar_ok(v: object, limits: WireLimits) -> bool:
    return v is None or isinstance(v, bool) or _number_ok(v) or (isinstance(v, str) and len(v) <= 4 * limits.max_name_chars)


def encode_reply(seq: int, body: dict[str, Any], *, session: str) -> list[bytes]:
    """``[b"reply", json]`` (``reply/1.1``): ``body`` holds ``ok``, ``reason``, ``state``... (docs/PROTOCOL.md)."""
    if not isinstance(body.get("ok"), bool):
        raise WireSchemaError("reply: body must hold a boolean 'ok'")
    return encode_message(seq, {"schema": f"reply/1.{OUTBOUND_MINOR}", **body,
                                "session": _outbound_session(session, "reply")})


def decode_reply(parts: list[bytes], limits: WireLimits = WireLimits()) -> dict[str, Any]:
    """Validate a ``reply/1`` or ``reply/1.1`` (client side; replies may be up to 256 KiB)."""
    bigger = dataclasses.replace(limits, max_header_bytes=max(limits.max_header_bytes, 256 * 1024))
    obj = decode_json_message(parts, "reply", bigger)
    if not isinstance(obj.get("ok"), bool):
        raise WireSchemaError(f"reply: 'ok' must be a boolean, got {_show(obj.get('ok'))}")
    return obj


# ------------------------------------------------------------------------ couch
def encode_couch(seq: int, t_unix_s: float, translation_mm, rotation_deg, moving: bool) -> list[bytes]:
    """``couch/1`` (delivery-sim PUB): the couch's total applied correction and whether it is moving."""
    return encode_message(seq, {
        "schema": "couch/1",
        "t_unix_s": float(t_unix_s),
        "translation_mm": [float(x) for x in translation_mm],
        "rotation_deg": [float(x) for x in rotation_deg],
        "moving": bool(moving),
    })


def decode_couch(parts: list[bytes], limits: WireLimits = WireLimits()) -> dict[str, Any]:
    """Validate a ``couch/1`` message; returns it with ``translation_mm``/``rotation_deg`` as float lists."""
    obj = decode_json_message(parts, "couch", limits)
    for key in ("translation_mm", "rotation_deg"):
        v = obj.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(_number_ok(x) for x in v):
            raise WireSchemaError(f"couch: '{key}' must be 3 finite numbers, got {_show(v)}")
    if not isinstance(obj.get("moving"), bool):
        raise WireSchemaError(f"couch: 'moving' must be a boolean, got {_show(obj.get('moving'))}")
    _int_field(obj, "seq", "couch")
    return obj
