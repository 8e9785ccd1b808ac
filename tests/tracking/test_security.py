"""CurveZMQ and operator identity: allowed keys with roles, the operator taken from the key, spoofing refused."""

from __future__ import annotations

import time

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from spineguide.registration.pose import Pose
from spineguide.tracking.service.config import (
    ConfigError,
    EndpointsConfig,
    SecurityConfig,
    ServiceConfig,
    SetupConfig,
)
from spineguide.tracking.errors import CommandRefused, TrackingError
from spineguide.tracking.service.states import Command
from spineguide.tracking.service.loop import Service
from spineguide.tracking.service.record import SessionRecord
from spineguide.tracking.service.security import (
    COMMAND_ROLES,
    ROLES_FILE,
    UNAUTHENTICATED,
    ClientIdentity,
    Role,
    SecurityError,
    authorize_command,
    create_keys,
    load_allow_list,
    load_key_pair,
    roles_markdown,
    user_id_of,
)
from spineguide.tracking.service.security import ClientKeys
from spineguide.tracking.sim.simulators import CommandClient, LocalPeers, Subscriber

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")]

#: How long a refused client is given to (fail to) get anything: 20 heartbeat periods.
REFUSAL_WINDOW_S = 1.0


@pytest.fixture
def keys(tmp_path):
    return create_keys(tmp_path / "keys")


def _curve_service(keys, approval: str) -> Service:
    config = ServiceConfig(
        endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        setup=SetupConfig(approval),
        security=SecurityConfig(keys["server"], keys["allowed"]),
    )
    return Service(config, record=SessionRecord(None)).start()


@pytest.fixture
def secure_service(keys):
    svc = _curve_service(keys, "automatic")
    yield svc
    svc.stop()


def _client(keys, name):
    return ClientKeys(keys[name], keys["server"].with_name("server.key"))


def test_allowed_client_commands_receives_and_streams(secure_service, keys):
    peers = LocalPeers(secure_service.endpoints, _client(keys, "console"), frame_keys=_client(keys, "imager"))
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


def test_frames_from_an_allowed_key_without_the_imager_role_are_refused(secure_service, keys):
    # The console's key passes CURVE but may not send frames: each such frame is a HOLD, recorded, never paired.
    console = LocalPeers(secure_service.endpoints, _client(keys, "console"))
    imager = LocalPeers(secure_service.endpoints, _client(keys, "console"), frame_keys=_client(keys, "imager"))
    try:
        console.sub.handshake()
        console.send_pair(0, Pose.identity())
        hold = console.sub.wait_for(lambda m: m["_topic"] == "gating" and m["reason"] == "frame_sender_not_imager", 2.0)
        assert hold["beam"] == "HOLD"
        assert secure_service.stats.pairs_completed == 0
        imager.send_pair(1, Pose.identity())  # the imager's own key: paired and judged
        console.sub.wait_for(lambda m: m["_topic"] == "gating" and m.get("pair_id") == 1, 2.0)
        assert secure_service.stats.pairs_completed == 1
        secure_service.record.flush()
        faults = [r for r in secure_service.record.records if r.get("reason") == "frame_sender_not_imager"]
        assert len(faults) == 2 and "client 'console' (role therapist)" in faults[0]["detail"]
    finally:
        imager.close()
        console.close()


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


# ------------------------------------------------------------------ allow-list with roles
def test_allow_list_maps_each_key_to_its_name_and_role(tmp_path):
    made = create_keys(tmp_path / "k", {"physics": Role.PHYSICIST, "room2": Role.THERAPIST, "cbct": Role.IMAGER})
    ids = load_allow_list(made["allowed"])
    by_name = {i.name: i for i in ids.values()}
    assert {n: i.role for n, i in by_name.items()} == {"physics": Role.PHYSICIST, "room2": Role.THERAPIST,
                                                      "cbct": Role.IMAGER}
    for public, ident in ids.items():
        assert load_key_pair(made["allowed"] / f"{ident.name}.key").public.decode() == public == ident.public_key


def _spoil_roles(text):
    return lambda allowed: (allowed / ROLES_FILE).write_text(text)


@pytest.mark.parametrize("spoil, match", [
    (lambda a: (a / ROLES_FILE).unlink(), "roles.toml: no roles file"),
    (_spoil_roles('[roles]\nconsole = "therapist"\nimager = "imager"\n'), "delivery.key: no role for 'delivery'"),
    (_spoil_roles('[roles]\nconsole = "therapist"\nimager = "imager"\ndelivery = "delivery"\nghost = "viewer"\n'),
     r"roles for \['ghost'\] but no such .key file"),
    (_spoil_roles('[roles]\nconsole = "admin"\nimager = "imager"\ndelivery = "delivery"\n'),
     "client 'console' has role 'admin'"),
    (_spoil_roles('console = "therapist"\n'), r"must hold exactly one table \[roles\]"),
    (_spoil_roles("[roles\n"), "not a readable TOML roles file"),
    (lambda a: ((a / "copy.key").write_bytes((a / "console.key").read_bytes()),
                (a / ROLES_FILE).write_text((a / ROLES_FILE).read_text() + '"copy" = "viewer"\n')),
     "the same public key as"),
])
def test_a_bad_allow_list_is_refused_naming_the_file(keys, spoil, match):
    spoil(keys["allowed"])
    with pytest.raises(SecurityError, match=match):
        load_allow_list(keys["allowed"])


@pytest.mark.parametrize("clients, match", [
    ({"server": Role.VIEWER}, "not 'server'"),
    ({"bad name": Role.VIEWER}, "client name must be"),
    ({"x": "therapist"}, "role must be one of"),
])
def test_create_keys_refuses_bad_names_and_roles(tmp_path, clients, match):
    with pytest.raises(SecurityError, match=match):
        create_keys(tmp_path / "k", clients)


def test_cli_keys_writes_the_roles_asked_for(tmp_path, capsys):
    import argparse

    from spineguide.tracking.cli.service import add_commands

    parser = argparse.ArgumentParser(prog="spineguide")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", "--out", str(tmp_path / "k"), "--client", "alice:physicist", "--client",
                              "console"])
    assert args.func(args) == 0
    roles = {i.name: i.role for i in load_allow_list(tmp_path / "k" / "allowed").values()}
    assert roles == {"alice": Role.PHYSICIST, "console": Role.THERAPIST}
    args = parser.parse_args(["keys", "--out", str(tmp_path / "k2"), "--client", "bob:god"])
    with pytest.raises(SecurityError, match="unknown role 'god'"):
        args.func(args)


# ------------------------------------------------------------------ the role table
def test_the_role_table_covers_every_command():
    assert set(COMMAND_ROLES) == set(Command)


def test_only_people_at_a_console_can_lead_to_an_enable_or_a_couch_move():
    staff = {Role.THERAPIST, Role.PHYSICIST}
    for cmd in (Command.LOAD_PLAN, Command.START_SETUP, Command.APPROVE_CORRECTION, Command.START_MONITORING,
                Command.RESUME, Command.STOP):
        assert COMMAND_ROLES[cmd] == staff, cmd
    assert COMMAND_ROLES[Command.SET_TOLERANCE] == {Role.PHYSICIST}
    assert COMMAND_ROLES[Command.COUCH_MOVED] == {Role.DELIVERY}
    assert COMMAND_ROLES[Command.PAUSE] == staff | {Role.DELIVERY}  # pausing only ever holds the beam
    assert COMMAND_ROLES[Command.STATUS] == set(Role)


def test_the_role_table_in_the_security_docs_is_the_code_table():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md").read_text()
    m = re.search(r"<!-- roles: generated by spineguide.tracking.service.security.roles_markdown\(\) -->\n(.*?)\n<!-- /roles -->",
                  text, re.S)
    assert m is not None and m.group(1) == roles_markdown()


_ROLES = st.sampled_from(list(Role))
_COMMANDS = st.one_of(st.sampled_from([c.value for c in Command]), st.text(max_size=12))
_PARAMS = st.dictionaries(st.sampled_from(["pair_id", "operator", "role", "tolerance_3d_mm", "x"]),
                          st.one_of(st.none(), st.integers(), st.text(max_size=8), st.sampled_from(["alice"])),
                          max_size=4)


@given(_ROLES, _COMMANDS, _PARAMS)
def test_authorisation_follows_the_table_and_the_operator_is_always_the_key(role, command, params):
    who = ClientIdentity("alice", role, "x" * 40)
    try:
        out = authorize_command(who, False, command, params)
    except CommandRefused as err:
        spoofed = params.get("operator") not in (None, "alice")
        known = command in {c.value for c in Command}
        denied = known and role not in COMMAND_ROLES[Command(command)]
        assert "role" in params or spoofed or denied, str(err)
        return
    assert out["operator"] == "alice" and out["role"] == role.value
    assert "role" not in params and params.get("operator") in (None, "alice")
    if command in {c.value for c in Command}:
        assert role in COMMAND_ROLES[Command(command)]
    assert {k: v for k, v in out.items() if k not in ("operator", "role")} == \
        {k: v for k, v in params.items() if k != "operator"}


def test_without_an_identity_a_secure_service_refuses_and_an_insecure_one_says_unauthenticated():
    with pytest.raises(CommandRefused, match="no authenticated client key"):
        authorize_command(None, False, "status", {})
    assert authorize_command(None, True, "approve_correction", {"pair_id": 3}) == \
        {"pair_id": 3, "operator": UNAUTHENTICATED, "role": None}
    with pytest.raises(CommandRefused, match="declared operator 'Jane' is not the authenticated client"):
        authorize_command(None, True, "approve_correction", {"pair_id": 3, "operator": "Jane"})


def test_a_frame_without_zap_carries_no_user_id():
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://uid")
        b.connect("inproc://uid")
        b.send(b"x")
        assert user_id_of(a.recv(copy=False)) is None
        a.close(0)
        b.close(0)
    finally:
        ctx.term()


# ------------------------------------------------------------------ the service takes the operator from the key
@pytest.fixture
def manual_service(keys):
    svc = _curve_service(keys, "manual")
    yield svc
    svc.stop()


def _events(svc, name):
    svc.record.flush()
    return [r for r in svc.record.records if r["event"] == name]


def test_operator_comes_from_the_key_and_a_spoofed_one_is_refused(manual_service, keys):
    svc = manual_service
    console = LocalPeers(svc.endpoints, _client(keys, "console"), frame_keys=_client(keys, "imager"))
    ctx = zmq.Context()
    imager = CommandClient(ctx, svc.endpoints["command"], _client(keys, "imager"))
    try:
        console.sub.handshake()
        refused = console.cmd.request("load_plan", {"operator": "Mallory"})
        assert refused["ok"] is False and "declared operator 'Mallory'" in refused["reason"]
        assert console.cmd.request("load_plan", {"role": "physicist"})["ok"] is False
        assert svc.engine.state.value == "IDLE"
        assert console.cmd.request("load_plan", {"operator": "console"})["ok"]  # its own name: fine
        for name in ("start_setup", "resume", "stop"):
            reply = imager.request(name)
            assert reply["ok"] is False and "client 'imager' has role 'imager'" in reply["reason"], name
        assert imager.request("status")["ok"]
        assert console.cmd.request("start_setup")["ok"]
        console.send_pair(0, Pose.from_six([2.0, 0, 0], [0, 0, 0]))
        console.sub.wait_for(lambda m: m["_topic"] == "correction" and m.get("purpose") == "proposal", 2.0)
        assert "has role 'imager'" in imager.request("approve_correction", {"pair_id": 0})["reason"]
        reply = console.cmd.request("approve_correction", {"pair_id": 0})
        assert reply["ok"] and reply["approved_by"] == "console"
    finally:
        imager.close()
        ctx.term()
        console.close()
    commands = _events(svc, "command")
    assert [c["command"] for c in commands] == ["load_plan", "status", "start_setup", "approve_correction"]
    assert all(c["params"]["operator"] == ("imager" if c["command"] == "status" else "console") for c in commands)
    assert commands[-1]["params"] == {"pair_id": 0, "operator": "console", "role": "therapist"}
    rejected = _events(svc, "command_rejected")
    assert [(r["command"], r["operator"]) for r in rejected] == \
        [("load_plan", "console"), ("load_plan", "console"), ("start_setup", "imager"), ("resume", "imager"),
         ("stop", "imager"), ("approve_correction", "imager")]


def test_an_insecure_service_warns_loudly_and_records_it(caplog):
    import logging

    config = ServiceConfig(endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
                           security=SecurityConfig(enabled=False))
    with caplog.at_level(logging.ERROR, logger="spineguide.tracking.service.loop"):
        svc = Service(config, record=SessionRecord(None)).start()
    try:
        peers = LocalPeers(svc.endpoints)
        try:
            reply = peers.cmd.request("load_plan")
        finally:
            peers.close()
    finally:
        svc.stop()
    assert any("CURVE is OFF" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    events = [r["event"] for r in svc.record.records]
    assert events[:2] == ["session", "security_warning"]
    assert reply["ok"]
    commands = [r for r in svc.record.records if r["event"] == "command"]  # closed: no flush needed
    assert commands[0]["params"]["operator"] == UNAUTHENTICATED and commands[0]["params"]["role"] is None
