"""CurveZMQ: an allowed client can command and receive; any other key can do neither."""

from __future__ import annotations

import time

import pytest
import zmq

from registration.pose import Pose
from tracking.config import (
    ConfigError,
    EndpointsConfig,
    SecurityConfig,
    ServiceConfig,
    SetupConfig,
)
from tracking.errors import TrackingError
from tracking.loop import Service
from tracking.record import SessionRecord
from tracking.security import SecurityError, create_keys, load_key_pair
from tracking.sims import ClientKeys, CommandClient, LocalPeers, Subscriber

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")]

#: How long a refused client is given to (fail to) get anything: 20 heartbeat periods.
REFUSAL_WINDOW_S = 1.0


@pytest.fixture
def keys(tmp_path):
    return create_keys(tmp_path / "keys")


@pytest.fixture
def secure_service(keys, tmp_path):
    config = ServiceConfig(
        endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        setup=SetupConfig("automatic"),
        security=SecurityConfig(keys["server"], keys["allowed"]),
    )
    svc = Service(config, record=SessionRecord(None)).start()
    yield svc
    svc.stop()


def _client(keys, name):
    return ClientKeys(keys[name], keys["server"].with_name("server.key"))


def test_allowed_client_commands_receives_and_streams(secure_service, keys):
    peers = LocalPeers(secure_service.endpoints, _client(keys, "console"))
    try:
        peers.sub.handshake()
        assert peers.cmd.request("load_plan")["ok"]
        assert peers.cmd.request("start_setup")["ok"]
        peers.send_pair(0, Pose.from_six([2.0, 0, 0], [0, 0, 0]))
        assert peers.sub.wait_for(lambda m: m["_topic"] == "correction", 2.0)["apply"] is True
    finally:
        peers.close()


def test_wrong_curve_key_can_neither_command_nor_receive(secure_service, tmp_path, keys):
    stranger = create_keys(tmp_path / "other")  # a valid key pair that is not on the allow-list
    bad = ClientKeys(stranger["console"], keys["server"].with_name("server.key"))
    ctx = zmq.Context()
    cmd = CommandClient(ctx, secure_service.endpoints["command"], bad, send_timeout_s=REFUSAL_WINDOW_S)
    sub = Subscriber(ctx, secure_service.endpoints["publish"], bad)
    plain = Subscriber(ctx, secure_service.endpoints["publish"])  # no CURVE at all
    try:
        with pytest.raises(TrackingError, match="no reply|could not be sent"):
            cmd.send("stop")  # refused either way: never handed over, or never answered
            cmd.receive(REFUSAL_WINDOW_S)
        with pytest.raises(TrackingError, match="no matching message"):
            sub.handshake(REFUSAL_WINDOW_S)
        with pytest.raises(TrackingError, match="no matching message"):
            plain.handshake(0.2)
        assert secure_service.engine.state.value == "IDLE"  # the stop never arrived
        assert secure_service.stats.commands == 0
        secure_service.record.flush()
        public = load_key_pair(stranger["console"]).public.decode()
        assert any(r["event"] == "auth_denied" and r["public_key"] == public for r in secure_service.record.records)
    finally:
        for c in (cmd, sub, plain):
            c.close()
        ctx.term()


def test_frames_from_a_stranger_never_reach_the_loop(secure_service, tmp_path, keys):
    stranger = create_keys(tmp_path / "other")
    peers = LocalPeers(secure_service.endpoints, ClientKeys(stranger["imager"], keys["server"].with_name("server.key")))
    try:
        peers.frames.sock.setsockopt(zmq.SNDTIMEO, 100)
        try:
            peers.send_pair(0, Pose.identity())
        except (TrackingError, zmq.Again):
            pass  # the handshake never completed: nothing could be queued
        time.sleep(REFUSAL_WINDOW_S / 4)  # give a (wrongly) accepted frame time to arrive
        assert secure_service.stats.pairs_completed == 0 and secure_service.engine.last_frame_unix_s is None
    finally:
        peers.close()


def test_keys_are_never_overwritten_and_bad_files_are_named(tmp_path, keys):
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        create_keys(tmp_path / "keys")
    with pytest.raises(SecurityError, match="no such key file"):
        load_key_pair(tmp_path / "nope.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a certificate\n")
    with pytest.raises(SecurityError, match="junk.key"):
        load_key_pair(junk)


def test_security_config_needs_both_files():
    with pytest.raises(ConfigError, match="must be given together"):
        SecurityConfig(server_secret_key="server.key_secret")


def test_empty_allow_list_is_refused_at_start(tmp_path, keys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = ServiceConfig(endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
                           security=SecurityConfig(keys["server"], empty))
    with pytest.raises(SecurityError, match="holds no client .key files"):
        Service(config).start()
