"""Wire codecs: round trips and strict rejection of malformed messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spineguide.registration import Pose
from spineguide.tracking.errors import FrameError, WireSchemaError
from spineguide.tracking.service.gating import Beam, GatingDecision, HoldReason
from spineguide.tracking.service.wire import (
    SeqCounter,
    WireLimits,
    decode_json_message,
    decode_kvframe,
    encode_correction,
    encode_gating,
    encode_heartbeat,
    encode_kvframe,
    parse_schema,
    schema_version,
)

T = 1_764_070_000.125
SESSION = "0123456789abcdef0123456789abcdef"  # a service session id (uuid4 hex)


def _frame_parts(dtype="uint16", rows=8, cols=6):
    pixels = (np.arange(rows * cols).reshape(rows, cols) * 100).astype(dtype)
    return pixels, encode_kvframe(3, "A", 17, T, pixels, 60000)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_kvframe_round_trip(dtype):
    pixels, parts = _frame_parts(dtype)
    header = json.loads(parts[1])
    assert header == {"schema": "kvframe/1", "seq": 3, "imager": "A", "pair_id": 17, "acquired_unix_s": T,
                      "rows": 8, "cols": 6, "dtype": dtype, "i0": 60000.0}
    # Little-endian, row-major payload.
    assert parts[2] == pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    wf = decode_kvframe(parts)
    np.testing.assert_array_equal(wf.frame.pixels, pixels)
    assert (wf.seq, wf.frame.imager, wf.frame.pair_id, wf.frame.i0, wf.frame.acquired_unix_s) == (3, "A", 17, 60000.0, T)


def test_unknown_fields_are_ignored_and_minor_versions_accepted():
    _, parts = _frame_parts()
    header = json.loads(parts[1])
    header.update(schema="kvframe/1.3", exposure_mas=1.6, session="imager-7")
    wf = decode_kvframe([parts[0], json.dumps(header).encode(), parts[2]])
    assert wf.frame.pair_id == 17 and wf.session == "imager-7"


def test_kvframe_session_is_optional_in_1_and_required_from_1_1():
    pixels, parts = _frame_parts()
    assert decode_kvframe(parts).session is None  # kvframe/1: a legacy sender
    parts = encode_kvframe(3, "A", 17, T, pixels, 60000, session="s1")
    assert json.loads(parts[1])["schema"] == "kvframe/1.1" and decode_kvframe(parts).session == "s1"
    header = json.loads(parts[1])
    del header["session"]
    with pytest.raises(WireSchemaError, match="'session' must be .*required from minor version 1"):
        decode_kvframe([parts[0], json.dumps(header).encode(), parts[2]])
    header["session"] = "a b"
    with pytest.raises(WireSchemaError, match="'session' must be"):
        decode_kvframe([parts[0], json.dumps(header).encode(), parts[2]])


def _mutated(**changes):
    _, parts = _frame_parts()
    header = json.loads(parts[1])
    for key, value in changes.items():
        if value is KeyError:
            del header[key]
        else:
            header[key] = value
    return [parts[0], json.dumps(header).encode(), parts[2]]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema": "kvframe/2"}, "unknown schema major version 2"),
        ({"schema": "correction/1"}, "expected a 'kvframe/N' schema"),
        ({"schema": KeyError}, "'schema' must be a string"),
        ({"seq": -1}, "'seq' = -1 outside"),
        ({"seq": "3"}, "'seq' must be an integer"),
        ({"pair_id": True}, "'pair_id' must be an integer"),
        ({"imager": ""}, "'imager' must be a name"),
        ({"imager": "x" * 65}, "'imager' must be a name"),
        ({"rows": 100000}, "'rows' = 100000 outside"),
        ({"dtype": "float64"}, "'dtype' must be one of"),
        ({"acquired_unix_s": "now"}, "'acquired_unix_s' must be a finite number"),
        ({"i0": -5}, "'i0' must be positive"),
    ],
)
def test_malformed_kvframe_headers_are_rejected(changes, message):
    with pytest.raises(WireSchemaError, match=message):
        decode_kvframe(_mutated(**changes))


def test_wrong_payload_size_and_bad_pixels_are_frame_errors():
    _, parts = _frame_parts()
    with pytest.raises(FrameError, match="payload is 95 bytes, expected 96 for 8x6 uint16"):
        decode_kvframe([parts[0], parts[1], parts[2][:-1]])
    pixels = np.ones((8, 6), np.float32)
    pixels[2, 2] = np.nan
    with pytest.raises(FrameError, match="1 pixels are NaN"):
        decode_kvframe(encode_kvframe(0, "B", 1, T, pixels, None))


@pytest.mark.parametrize(
    "parts, message",
    [
        ([b"kvframe", b"{}"], "expected 3 message frames"),
        ([b"frame", b"{}", b""], "expected a 'kvframe' message"),
        ([b"kvframe", b"\xff\xfe", b""], "not UTF-8"),
        ([b"kvframe", b"[1, 2]", b""], "must be a JSON object"),
        ([b"kvframe", b'{"schema": NaN}', b""], "NaN"),
        ([b"kvframe", b"{" + b" " * 20000 + b"}", b""], "20002 bytes is larger than the 16384-byte limit"),
        ([b"kvframe", b"[" * 17 + b"]" * 17, b""], "nested 17 levels deep"),
        ([b"kvframe", b'{"seq": ' + b"9" * 5000 + b"}", b""], "integer with 5000 digits"),
        ([b"kvframe", b'{"a": 1, "a": 2}', b""], "duplicate key"),
        ([b"kvframe", "{}", b""], "message frame 1 is str, not bytes"),
        ((b"kvframe" for _ in range(3)), "expected a list of message frames"),
    ],
)
def test_garbage_is_rejected(parts, message):
    with pytest.raises(WireSchemaError, match=message):
        decode_kvframe(parts, WireLimits())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_bytes_never_crash_the_decoder(parts):
    try:
        decode_kvframe(parts)
    except (WireSchemaError, FrameError):
        pass


def test_outbound_messages_follow_conventions():
    corr = Pose.from_six([-1.0, 0, 0], [0, 0, 0]).to_correction()
    topic, body = encode_correction(0, 17, T, corr, "fiducial", {"ok": True, "fre_mm": 0.1}, session=SESSION)
    msg = json.loads(body)
    assert topic == b"correction" and msg["schema"] == "correction/1.1" and msg["session"] == SESSION
    assert msg["translation_mm"] == [1.0, 0.0, 0.0] and msg["method"] == "fiducial"
    decision = GatingDecision(Beam.ENABLE, HoldReason.OK, T + 0.2, 17, 0.3, T)
    topic, body = encode_gating(1, T, decision, session=SESSION)
    msg = json.loads(body)
    assert topic == b"gating" and msg == {"schema": "gating/1.2", "session": SESSION, "seq": 1, "t_unix_s": T,
                                          "beam": "ENABLE", "reason": "ok", "valid_until_unix_s": T + 0.2,
                                          "pair_id": 17, "deviation_mm": 0.3, "one_view": None,
                                          "deviation_bound_mm": None}
    one = GatingDecision(Beam.HOLD, HoldReason.ONE_VIEW_UNCERTAIN, T, 18, 0.4, T, "B", 1.3)
    msg = json.loads(encode_gating(2, T, one, session=SESSION)[1])
    assert msg["schema"] == "gating/1.2" and msg["reason"] == "one_view_uncertain"
    assert msg["one_view"] == "B" and msg["deviation_bound_mm"] == 1.3
    parts = encode_heartbeat(2, T, "MONITORING", {"latency_ms": 12.0}, session=SESSION)
    assert decode_json_message(parts, "heartbeat")["state"] == "MONITORING"


def test_service_messages_of_minor_1_must_carry_the_session():
    parts = encode_heartbeat(2, T, "IDLE", session=SESSION)
    body = json.loads(parts[1])
    del body["session"]
    with pytest.raises(WireSchemaError, match="'session' must be .*required"):
        decode_json_message([parts[0], json.dumps(body).encode()], "heartbeat")
    body["schema"] = "heartbeat/1"  # a /1 sender had no session: still understood
    assert decode_json_message([parts[0], json.dumps(body).encode()], "heartbeat")["state"] == "IDLE"
    with pytest.raises(WireSchemaError, match="session id must be"):
        encode_heartbeat(0, T, "IDLE", session="")


def test_outbound_refuses_nonfinite_and_bad_fields():
    corr = Pose.identity().to_correction()
    with pytest.raises(WireSchemaError, match="non-finite"):
        encode_correction(0, 1, T, corr, "anatomy", {"ok": False, "ncc": float("nan")}, session=SESSION)
    with pytest.raises(WireSchemaError, match="method"):
        encode_correction(0, 1, T, corr, "magic", {"ok": True}, session=SESSION)
    with pytest.raises(WireSchemaError, match="boolean 'ok'"):
        encode_correction(0, 1, T, corr, "anatomy", {}, session=SESSION)
    with pytest.raises(WireSchemaError, match="overwrite"):
        encode_heartbeat(0, T, "IDLE", {"seq": 5}, session=SESSION)


def test_schema_parser_and_sequence_numbers():
    assert parse_schema("gating/1", "gating") == 1
    assert schema_version("gating/1.12", "gating") == (1, 12)
    for bad in ("gating/x", "gating/\u00b2", "gating/\u0661", "gating/1.", "gating/1.x", "gating/ 1", "gating/1\n",
                "gating/" + "1" * 7):
        with pytest.raises(WireSchemaError, match="malformed schema version"):
            parse_schema(bad, "gating")
    with pytest.raises(WireSchemaError, match="unknown message name"):
        parse_schema("beam/1", "beam")
    seq = SeqCounter()
    assert [seq.next() for _ in range(3)] == [0, 1, 2]


# ------------------------------------------------------------ command, reply, couch, outgoing bodies
from spineguide.tracking.service.wire import (  # noqa: E402
    NonFinitePixelsError,
    PayloadSizeError,
    correction_body,
    decode_command,
    decode_couch,
    decode_reply,
    encode_command,
    encode_couch,
    encode_message,
    encode_reply,
    gating_body,
)


def test_command_round_trip_and_params_are_kept():
    req = decode_command(encode_command(4, "set_tolerance", {"tolerance_3d_mm": 0.8, "note": "x", "v": [1, 2]}))
    assert (req.seq, req.command, req.params["tolerance_3d_mm"], req.params["v"]) == (4, "set_tolerance", 0.8, [1, 2])
    assert req.session is None  # command/1
    req = decode_command(encode_command(5, "status", None, "console-1"))
    assert req.session == "console-1"


@pytest.mark.parametrize("obj, message", [
    ({"schema": "command/2", "seq": 0, "command": "stop"}, "unknown schema major version 2"),
    ({"schema": "command/1", "seq": 0}, "'command' must be a name"),
    ({"schema": "command/1", "seq": 0, "command": "x" * 33}, "'command' must be a name"),
    ({"schema": "command/1", "seq": "0", "command": "stop"}, "'seq' must be an integer"),
    ({"schema": "command/1", "seq": 0, "command": "stop", "params": [1]}, "'params' must be an object"),
    ({"schema": "command/1", "seq": 0, "command": "stop", "params": {"a": {"b": 1}}}, "param 'a' must be"),
    ({"schema": "command/1", "seq": 0, "command": "stop", "params": {str(i): i for i in range(17)}}, "17 params"),
    ({"schema": "command/1", "seq": 0, "command": "stop", "params": {"a": "x" * 300}}, "param 'a' must be"),
])
def test_malformed_commands_are_refused(obj, message):
    with pytest.raises(WireSchemaError, match=message):
        decode_command([b"command", json.dumps(obj).encode()])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=0, max_size=3))
def test_random_bytes_never_crash_the_command_decoder(parts):
    try:
        decode_command(parts)
    except WireSchemaError:
        pass


def test_reply_and_couch_round_trip_and_checks():
    reply = decode_reply(encode_reply(3, {"ok": False, "reason": "no", "state": "IDLE"}, session=SESSION))
    assert reply["seq"] == 3 and reply["ok"] is False and reply["schema"] == "reply/1.1"
    assert reply["session"] == SESSION
    with pytest.raises(WireSchemaError, match="boolean 'ok'"):
        encode_reply(0, {"reason": "x"}, session=SESSION)
    couch = decode_couch(encode_couch(1, T, [1.0, 2.0, 3.0], [0.0, 0.0, 0.5], False))
    assert couch["translation_mm"] == [1.0, 2.0, 3.0] and couch["moving"] is False
    bad = json.loads(encode_couch(1, T, [1.0, 2.0, 3.0], [0.0, 0.0, 0.5], False)[1])
    bad["rotation_deg"] = [0.0, 0.0]
    with pytest.raises(WireSchemaError, match="'rotation_deg' must be 3 finite numbers"):
        decode_couch([b"couch", json.dumps(bad).encode()])


def test_outgoing_bodies_get_seq_at_send_time_and_extras_cannot_overwrite():
    decision = GatingDecision(Beam.HOLD, HoldReason.STALE_FRAME, T, None, None, T)
    parts = encode_message(9, gating_body(T, decision, session=SESSION))
    assert parts[0] == b"gating" and json.loads(parts[1])["seq"] == 9
    corr = Pose.from_six([0.0, -2.0, 0.0], [0, 0, 0]).to_correction()
    body = correction_body(3, T, corr, "fiducial", {"ok": True}, session=SESSION, apply=True, purpose="setup")
    msg = json.loads(encode_message(0, body)[1])
    assert msg["translation_mm"] == [0.0, 2.0, 0.0] and msg["apply"] is True
    with pytest.raises(WireSchemaError, match="would overwrite"):
        correction_body(3, T, corr, "fiducial", {"ok": True}, session=SESSION, translation_mm=[0, 0, 0])
    with pytest.raises(WireSchemaError, match="stamped by the sender"):
        encode_message(0, {**body, "seq": 4})
    with pytest.raises(WireSchemaError, match="unknown schema name"):
        encode_message(0, {"schema": "beam/1"})


def test_payload_and_nan_errors_have_their_own_types():
    _, parts = _frame_parts()
    with pytest.raises(PayloadSizeError):
        decode_kvframe([parts[0], parts[1], parts[2][:-1]])
    pixels = np.ones((8, 6), np.float32)
    pixels[0, 0] = np.inf
    with pytest.raises(NonFinitePixelsError):
        decode_kvframe(encode_kvframe(0, "B", 1, T, pixels, None))
