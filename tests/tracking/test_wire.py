"""Wire codecs: round trips and strict rejection of malformed messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registration import Pose
from tracking.errors import FrameError, WireSchemaError
from tracking.gating import Beam, GatingDecision, HoldReason
from tracking.wire import (
    SeqCounter,
    WireLimits,
    decode_json_message,
    decode_kvframe,
    encode_correction,
    encode_gating,
    encode_heartbeat,
    encode_kvframe,
    parse_schema,
)

T = 1_764_070_000.125


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
    header.update(schema="kvframe/1.3", exposure_mas=1.6)
    wf = decode_kvframe([parts[0], json.dumps(header).encode(), parts[2]])
    assert wf.frame.pair_id == 17


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
        ([b"kvframe", b"\xff\xfe", b""], "not valid UTF-8 JSON"),
        ([b"kvframe", b"[1, 2]", b""], "must be a JSON object"),
        ([b"kvframe", b'{"schema": NaN}', b""], "NaN"),
        ([b"kvframe", b"{" + b" " * 20000 + b"}", b""], "header is 20002 bytes"),
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
    topic, body = encode_correction(0, 17, T, corr, "fiducial", {"ok": True, "fre_mm": 0.1})
    msg = json.loads(body)
    assert topic == b"correction" and msg["schema"] == "correction/1"
    assert msg["translation_mm"] == [1.0, 0.0, 0.0] and msg["method"] == "fiducial"
    decision = GatingDecision(Beam.ENABLE, HoldReason.OK, T + 0.2, 17, 0.3, T)
    topic, body = encode_gating(1, T, decision)
    msg = json.loads(body)
    assert topic == b"gating" and msg == {"schema": "gating/1", "seq": 1, "t_unix_s": T, "beam": "ENABLE",
                                          "reason": "ok", "valid_until_unix_s": T + 0.2, "pair_id": 17,
                                          "deviation_mm": 0.3}
    parts = encode_heartbeat(2, T, "MONITORING", {"latency_ms": 12.0})
    assert decode_json_message(parts, "heartbeat")["state"] == "MONITORING"


def test_outbound_refuses_nonfinite_and_bad_fields():
    corr = Pose.identity().to_correction()
    with pytest.raises(WireSchemaError, match="non-finite"):
        encode_correction(0, 1, T, corr, "anatomy", {"ok": False, "ncc": float("nan")})
    with pytest.raises(WireSchemaError, match="method"):
        encode_correction(0, 1, T, corr, "magic", {"ok": True})
    with pytest.raises(WireSchemaError, match="boolean 'ok'"):
        encode_correction(0, 1, T, corr, "anatomy", {})
    with pytest.raises(WireSchemaError, match="overwrite"):
        encode_heartbeat(0, T, "IDLE", {"seq": 5})


def test_schema_parser_and_sequence_numbers():
    assert parse_schema("gating/1", "gating") == 1
    with pytest.raises(WireSchemaError, match="malformed schema version"):
        parse_schema("gating/x", "gating")
    seq = SeqCounter()
    assert [seq.next() for _ in range(3)] == [0, 1, 2]
