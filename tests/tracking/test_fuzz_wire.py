"""Fuzzing every wire decoder: any input -> a decoded value or the module's named error, never anything else.

The example count comes from the hypothesis profile (``ci`` by default,
``HYPOTHESIS_PROFILE=deep`` for >= 10^5 per test); each example is a few
hundred bytes at most, so the deep run takes minutes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spineguide.tracking.errors import FrameError, WireSchemaError
from spineguide.tracking.frames import KvFrame
from spineguide.tracking.service.wire import (
    KNOWN_MAJOR,
    CommandRequest,
    WireFrame,
    decode_command,
    decode_couch,
    decode_json_message,
    decode_kvframe,
    decode_reply,
    encode_command,
    encode_couch,
    encode_heartbeat,
    encode_kvframe,
    encode_reply,
    parse_schema,
    schema_version,
)

pytestmark = pytest.mark.fuzz

T = 1_764_070_000.125
SESSION = "0123456789abcdef0123456789abcdef"
#: A small valid frame of each message kind; the hostile headers are built from these.
PIXELS = np.arange(12, dtype=np.uint16).reshape(3, 4)
VALID = {
    "kvframe": encode_kvframe(5, "A", 17, T, PIXELS, 60000.0, session="imager-1"),
    "command": encode_command(3, "set_tolerance", {"tolerance_3d_mm": 0.8, "v": [1, 2]}, session="console-1"),
    "reply": encode_reply(2, {"ok": True, "reason": None, "state": "IDLE"}, session=SESSION),
    "couch": encode_couch(1, T, [1.0, 2.0, 3.0], [0.0, 0.0, 0.5], False),
    "heartbeat": encode_heartbeat(4, T, "IDLE", session=SESSION),
}


def _decode(topic: str, parts):
    if topic == "kvframe":
        return decode_kvframe(parts)
    if topic == "command":
        return decode_command(parts)
    if topic == "reply":
        return decode_reply(parts)
    if topic == "couch":
        return decode_couch(parts)
    return decode_json_message(parts, topic)


def _total(topic: str, parts) -> None:
    """The decoder returns its value type or raises WireSchemaError/FrameError with a message; nothing else."""
    try:
        out = _decode(topic, parts)
    except (WireSchemaError, FrameError) as err:
        assert str(err), "a refusal must say why"
        return
    expected = {"kvframe": WireFrame, "command": CommandRequest}.get(topic, dict)
    assert isinstance(out, expected)
    if topic == "kvframe":
        assert isinstance(out.frame, KvFrame) and out.frame.pixels.ndim == 2


TOPICS = st.sampled_from(sorted(VALID))

# ---------------------------------------------------------------- raw bytes
ANY_PART = st.one_of(st.binary(max_size=300), st.sampled_from([b"kvframe", b"command", b"reply", b"couch",
                                                                b"heartbeat", b"{}", b"[]"]))
ODD_PART = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.text(max_size=20), st.floats(),
                     st.lists(st.integers(), max_size=3), st.just(memoryview(b"{}")), st.just(bytearray(b"x")))


@given(TOPICS, st.lists(ANY_PART, max_size=5))
def test_any_multipart_bytes_decode_or_are_refused_by_name(topic, parts):
    _total(topic, parts)


@given(TOPICS, st.lists(st.one_of(ANY_PART, ODD_PART), max_size=4))
def test_frames_that_are_not_bytes_are_refused_by_name(topic, parts):
    _total(topic, parts)


@given(TOPICS, st.one_of(st.none(), st.integers(), st.text(max_size=10), st.binary(max_size=10),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_a_message_that_is_not_a_list_is_refused(topic, parts):
    _total(topic, parts)


# ---------------------------------------------------------------- hostile but well-formed JSON headers
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4)), max_leaves=12)


def _literal(value) -> bytes:
    return json.dumps(value, allow_nan=False).encode()


HOSTILE_LITERAL = st.one_of(
    JSON_VALUE.map(_literal),
    st.integers(20, 6000).map(lambda n: b"9" * n),                      # beyond int digits / Python's 4300
    st.integers(20, 400).map(lambda n: b"-1" + b"0" * n),
    st.integers(1, 5000).map(lambda d: b"[" * d + b"]" * d),           # deep nesting
    st.integers(1, 3000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
    st.sampled_from([
        b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"-0", b"0.0", b"1E400", b"5e-324",
        b'"\\ud800"', b'"\\udfff"', b'"kvframe/\xc2\xb2"', b'"kvframe/\xd9\xa1"', b'"kvframe/1.\xc2\xb2"',
        b'"command/\xef\xbc\x91"', b'"kvframe/1 "', b'"kvframe/01"', b'"kvframe/1.1.1"', b'"kvframe/"',
        b'"uint16"', b'"float32"', b'"float64"', b"[1, 2, 3]", b'["uint16"]', b'{"uint16": 1}',
        b"\xff", b"\xc0\x80", b'"\x00"', b"1" * 19, b"9223372036854775808", b"18446744073709551616",
        b'"' + b"x" * 5000 + b'"', b"true", b"false", b"null", b"",
    ]),
)


def _header_with(topic: str, key: str, literal: bytes, duplicate: bool) -> bytes:
    """The valid header of ``topic`` with field ``key`` replaced (or added) by the raw JSON ``literal``."""
    header = json.loads(VALID[topic][1])
    header[key] = "@@HOSTILE@@"
    raw = json.dumps(header).encode().replace(b'"@@HOSTILE@@"', literal)
    if duplicate:
        raw = raw[:-1] + b', "' + key.encode() + b'": 1}'
    return raw


FIELDS = st.sampled_from(["schema", "seq", "session", "imager", "pair_id", "acquired_unix_s", "rows", "cols",
                          "dtype", "i0", "command", "params", "ok", "reason", "state", "translation_mm",
                          "rotation_deg", "moving", "t_unix_s", "unknown_extra"])


@given(TOPICS, FIELDS, HOSTILE_LITERAL, st.booleans())
def test_a_hostile_value_in_any_header_field_decodes_or_is_refused(topic, key, literal, duplicate):
    parts = list(VALID[topic])
    parts[1] = _header_with(topic, key, literal, duplicate)
    _total(topic, parts)


@given(st.lists(st.tuples(FIELDS, HOSTILE_LITERAL), min_size=1, max_size=4), st.binary(max_size=64))
def test_several_hostile_kvframe_fields_and_any_payload(changes, payload):
    header = json.loads(VALID["kvframe"][1])
    for i, (key, _) in enumerate(changes):
        header[key] = f"@@HOSTILE{i}@@"
    raw = json.dumps(header).encode()
    for i, (_, literal) in enumerate(changes):
        raw = raw.replace(f'"@@HOSTILE{i}@@"'.encode(), literal)
    _total("kvframe", [b"kvframe", raw, payload])


@given(st.one_of(JSON_VALUE, st.text(max_size=30),
                 st.from_regex(r"(kvframe|command|gating|x)/[0-9\u00b2\u0661\uff11.]{0,8}", fullmatch=True)),
       st.one_of(st.sampled_from(sorted(KNOWN_MAJOR)), st.text(max_size=10), st.none(), st.integers()))
def test_schema_parser_is_total_and_ascii_only(value, name):
    try:
        major, minor = schema_version(value, name)
    except WireSchemaError as err:
        assert str(err)
        return
    assert parse_schema(value, name) == major == KNOWN_MAJOR[name] and minor >= 0
    assert value.isascii() and value.split("/", 1)[1].replace(".", "").isdigit()


@given(st.integers(0, 64), st.integers(0, 64), st.sampled_from(["uint16", "float32"]), st.binary(max_size=256))
def test_payload_of_any_size_against_any_shape(rows, cols, dtype, payload):
    header = json.loads(VALID["kvframe"][1])
    header.update(rows=rows, cols=cols, dtype=dtype)
    _total("kvframe", [b"kvframe", json.dumps(header).encode(), payload])
