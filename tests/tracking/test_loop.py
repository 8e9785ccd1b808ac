"""The service on loopback: configuration, heartbeats, sequence numbers, no backlog, commands during a registration, CLI."""

from __future__ import annotations

import argparse
import itertools
import logging
import threading
import time

import pytest

from spineguide.registration.pose import Pose
from spineguide.tracking.cli.service import add_commands
from spineguide.tracking.service.config import (
    ConfigError,
    EndpointsConfig,
    RecordConfig,
    SafetyConfig,
    SecurityConfig,
    ServiceConfig,
    SetupConfig,
    log_config,
)
from spineguide.tracking.service.config_file import load_config
from spineguide.tracking.service.loop import Mailbox, Service
from spineguide.tracking.service.processing import PatternProcessor
from spineguide.tracking.sim.simulators import LocalPeers

pytestmark = pytest.mark.timeout(60)

LOOPBACK = EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
#: These services run on loopback with CURVE explicitly off (test_security.py runs it on).
INSECURE = SecurityConfig(enabled=False)
#: CONVENTIONS: heartbeats at >= 10 Hz, so no gap between two may exceed 0.1 s (sender clock).
MAX_HEARTBEAT_GAP_S = 0.1

EXAMPLE_TOML = """
[safety]
frame_period_s = 0.1
tolerance_3d_mm = 0.8
correction_limit_mm = 20.0

[endpoints]
frames = "tcp://127.0.0.1:6555"
publish = "tcp://127.0.0.1:6556"
command = "tcp://127.0.0.1:6557"

[plan]
method = "pattern"

[couch]
dof = 4

[security]
enabled = false

[record]
path = "records/session.jsonl"
raw_frames = true
"""


# ------------------------------------------------------------------ config
def test_toml_config_is_read_with_defaults_and_relative_paths(tmp_path, caplog):
    path = tmp_path / "service.toml"
    path.write_text(EXAMPLE_TOML)
    config = load_config(path)
    assert config.safety.tolerance_3d_mm == 0.8 and config.safety.max_frame_age_s == pytest.approx(0.2)
    assert config.safety.enable_validity_s == pytest.approx(0.2) and config.safety.pair_timeout_s == pytest.approx(0.05)
    assert config.couch.dof == 4 and config.record.path == tmp_path / "records" / "session.jsonl"
    with caplog.at_level(logging.INFO, logger="spineguide.tracking.service.config"):
        log_config(config)
    assert caplog.records[0].getMessage().startswith("safety:")  # safety values first


@pytest.mark.parametrize("text, message", [
    ("[safety]\ntolerance_3d_mn = 1.0\n", r"unknown key\(s\) \['tolerance_3d_mn'\] in \[safety\]"),
    ("[gating]\n", r"unknown section\(s\) \['gating'\]"),
    ("[safety]\nfrme_period_s = 0.1\n", "unknown key"),
    ("[safety]\ntolerance_3d_mm = -1\n", r"\[safety\] tolerance_3d_mm must be a finite number in \(0, 5\] mm .*got -1"),
    ("[safety]\nheartbeat_period_s = 0.5\n", "at least 10 Hz"),
    ("[safety]\npair_timeout_s = 0.5\n", "must be shorter than max_frame_age_s"),
    ("[couch]\ndof = 5\n", r"\[couch\] dof must be 4 or 6, got 5"),
    ("[plan]\nmethod = \"magic\"\n", "method must be one of"),
    ("[plan]\nmethod = \"fiducial\"\n", "method 'fiducial' needs"),
    ("[setup]\napproval = \"yes\"\n", "approval must be"),
    ("[endpoints]\nframes = \"localhost:5\"\n", "must be a tcp://"),
    ("safety = 3\n", r"\[safety\] must be a table"),
    ("[safety\n", "not valid TOML"),
])
def test_bad_config_is_refused_naming_file_section_and_value(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "bad.toml" in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.toml: cannot read"):
        load_config(tmp_path / "nothere.toml")


# ------------------------------------------------------------------ mailbox
def test_mailbox_keeps_only_the_newest_item_and_counts_drops():
    box = Mailbox()
    assert box.put(1) is None
    assert box.put(2) == 1 and box.put(3) == 2
    assert box.get(0.01) == 3 and box.get(0.01) is None
    assert box.dropped == 2


# ------------------------------------------------------------------ service
class SlowProcessor(PatternProcessor):
    """The pattern stand-in that takes ``delay_s`` per pair (a registration's time; the GIL is released)."""

    def __init__(self, delay_s):
        super().__init__(("A", "B"), 0.0)
        self.delay_s = delay_s
        self.seen: list[int] = []
        self.inside = threading.Event()

    def process(self, frames, prior):
        self.seen.append(frames["A"].pair_id)
        self.inside.set()
        time.sleep(self.delay_s)
        self.inside.clear()
        return super().process(frames, prior)


def _monitoring(peers):
    peers.sub.handshake()
    assert peers.cmd.request("load_plan")["ok"] and peers.cmd.request("start_setup")["ok"]
    peers.send_pair(0, Pose.identity())
    peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 0, 5.0)
    assert peers.cmd.request("start_monitoring")["ok"]


def test_heartbeats_at_10_hz_or_more_and_seq_counts_every_message(tmp_path):
    config = ServiceConfig(endpoints=LOOPBACK, setup=SetupConfig("automatic"), security=INSECURE)
    with Service(config) as svc:
        peers = LocalPeers(svc.endpoints)
        try:
            _monitoring(peers)
            for k in range(1, 6):
                peers.send_pair(k, Pose.identity())
                peers.sub.wait_for(lambda m, k=k: m["_topic"] == "gating" and m["pair_id"] == k, 2.0)
            peers.sub.collect(0.5)
        finally:
            peers.close()
    msgs = [m for _, m in peers.sub.messages]
    beats = [m["t_unix_s"] for m in msgs if m["_topic"] == "heartbeat"]
    assert len(beats) >= 5
    assert max(b - a for a, b in itertools.pairwise(beats)) <= MAX_HEARTBEAT_GAP_S
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one counter on the PUB socket, no gaps


def test_slow_registration_never_builds_a_backlog_and_commands_are_answered_meanwhile():
    slow = SlowProcessor(0.3)
    config = ServiceConfig(endpoints=LOOPBACK, setup=SetupConfig("automatic"), security=INSECURE,
                           safety=SafetyConfig(frame_period_s=0.1, max_frame_age_s=1.0, enable_validity_s=0.2))
    with Service(config, processor_factory=lambda plan: slow) as svc:
        peers = LocalPeers(svc.endpoints)
        try:
            _monitoring(peers)
            for k in range(1, 11):  # 10 pairs in ~no time while each takes 0.3 s
                peers.send_pair(k, Pose.identity())
            assert slow.inside.wait(5.0)
            n_before = len(slow.seen)
            reply = peers.cmd.request("status", timeout_s=5.0)
            # Answered while that same registration was still running: not queued behind it.
            assert reply["ok"] and slow.inside.is_set() and len(slow.seen) == n_before
            peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 10, 5.0)
            assert slow.seen[-1] == 10  # the newest pair was processed
            assert len(slow.seen) < 11  # older ones were dropped, not queued
            assert svc.mailbox.dropped >= 1 and svc.stats.pairs_dropped >= 1
        finally:
            peers.close()


def test_commands_from_two_clients_and_reply_routing():
    config = ServiceConfig(endpoints=LOOPBACK, security=INSECURE)
    with Service(config) as svc:
        a, b = LocalPeers(svc.endpoints), LocalPeers(svc.endpoints)
        try:
            ra = a.cmd.request("status")
            rb = b.cmd.request("load_plan")
            assert ra["state"] == "IDLE" and rb["state"] == "PLAN_LOADED"
            assert a.cmd.request("pause")["ok"] is False
        finally:
            a.close()
            b.close()


# ------------------------------------------------------------------ CLI
def _parser():
    parser = argparse.ArgumentParser(prog="spineguide")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_keys_replay_and_serve_handlers(tmp_path, capsys):
    args = _parser().parse_args(["keys", "--out", str(tmp_path / "keys")])
    assert args.func(args) == 0
    assert (tmp_path / "keys" / "allowed" / "console.key").is_file()
    # A short recorded session, then replay it through the CLI handler.
    config = ServiceConfig(endpoints=LOOPBACK, setup=SetupConfig("automatic"), security=INSECURE,
                           record=RecordConfig(tmp_path / "s.jsonl", raw_frames=True))
    with Service(config) as svc:
        peers = LocalPeers(svc.endpoints)
        try:
            _monitoring(peers)
            peers.send_pair(1, Pose.from_six([0, 0, 2.0], [0, 0, 0]))
            peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 1, 2.0)
        finally:
            peers.close()
    args = _parser().parse_args(["replay", str(tmp_path / "s.jsonl")])
    assert args.func(args) == 0
    assert "identical" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[couch]\ndof = 3\n")
    args = _parser().parse_args(["serve", "--config", str(bad)])
    with pytest.raises(ConfigError, match="dof must be 4 or 6"):
        args.func(args)


def test_cli_main_turns_errors_into_one_line_and_exit_2(tmp_path, capsys):
    from spineguide.tracking.cli.main import main

    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spineguide: error: ") and "missing.jsonl" in err and err.count("\n") == 1


def test_an_endpoint_that_cannot_be_bound_fails_start_with_its_name():
    from spineguide.tracking.errors import TrackingError
    from spineguide.tracking.sim.fraction import free_tcp_port

    port = free_tcp_port()
    taken = EndpointsConfig(f"tcp://127.0.0.1:{port}", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    with Service(ServiceConfig(endpoints=taken, security=INSECURE)):
        second = ServiceConfig(endpoints=EndpointsConfig(f"tcp://127.0.0.1:{port}", "tcp://127.0.0.1:0",
                                                         "tcp://127.0.0.1:0"), security=INSECURE)
        with pytest.raises(TrackingError, match=f"endpoint frames: cannot bind tcp://127.0.0.1:{port}"):
            Service(second).start()
