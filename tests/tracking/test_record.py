"""Session record: append-only JSON lines, crash tolerance, and deterministic replay."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from spineguide.registration.pose import Pose
from spineguide.tracking.service.config import (
    EndpointsConfig,
    RecordConfig,
    SafetyConfig,
    SecurityConfig,
    ServiceConfig,
    SetupConfig,
)
from spineguide.tracking.errors import ConfigError
from spineguide.tracking.service.loop import Service, replay_session
from spineguide.tracking.service.record import RecordError, SessionRecord, frames_folder, read_record
from spineguide.tracking.sim.simulators import LocalPeers

pytestmark = pytest.mark.timeout(60)


def test_records_are_lines_on_disk_in_order_with_both_clocks(tmp_path):
    path = tmp_path / "s.jsonl"
    rec = SessionRecord(path)
    for i in range(5):
        rec.write("tick", n=i)
    rec.flush()
    lines = read_record(path)
    assert [r["n"] for r in lines] == list(range(5))
    assert all("t_unix_s" in r and "t_mono_s" in r for r in lines)
    rec.close()
    assert read_record(path)[-1]["event"] == "closed"


def test_an_existing_record_is_never_appended_to_nor_overwritten(tmp_path):
    path = tmp_path / "s.jsonl"
    rec = SessionRecord(path)
    rec.write("mark", k=0)
    rec.close()
    before = path.read_bytes()
    with pytest.raises(RecordError, match="s.jsonl: exists; a session record is never appended to"):
        SessionRecord(path)
    (tmp_path / "t.jsonl.frames").mkdir()
    with pytest.raises(RecordError, match="t.jsonl.frames: exists"):
        SessionRecord(tmp_path / "t.jsonl", raw_frames=True)
    assert path.read_bytes() == before


def test_each_session_gets_its_own_record_and_the_configured_path_points_at_the_newest(tmp_path):
    link = tmp_path / "session.jsonl"
    first = SessionRecord.for_session(link, "a" * 32, 1_764_070_000.0, raw_frames=True)
    first.write("session", k=1)
    name = first.save_frame(3, "A", np.zeros((2, 2), np.uint16))
    assert first.save_frame(3, "A", np.ones((2, 2), np.uint16)) == "00000003_A.1.npy"  # never overwritten
    assert first.save_frame(3, "A", np.ones((2, 2), np.uint16), epoch=2) == "e2_00000003_A.npy"
    first.close()
    assert first.path.name == "session-20251125T112640Z-" + "a" * 32 + ".jsonl"
    assert read_record(link)[0]["k"] == 1 and (tmp_path / "session.jsonl.frames" / name).is_file()
    old_bytes = first.path.read_bytes()
    second = SessionRecord.for_session(link, "b" * 32, 1_764_070_100.0, raw_frames=False)
    second.write("session", k=2)
    second.close()
    assert read_record(link)[0]["k"] == 2  # the link names the newest session
    assert first.path.read_bytes() == old_bytes and read_record(first.path)[0]["k"] == 1
    assert not (tmp_path / "session.jsonl.frames").exists()  # the new session keeps no frames
    assert (frames_folder(first.path) / name).is_file()  # the first session's frames are intact
    with pytest.raises(RecordError, match="session id must be"):
        SessionRecord.for_session(link, "../x", 1.0)
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text('{"event":"session"}\n')
    with pytest.raises(RecordError, match="legacy.jsonl: exists and is not a link"):
        SessionRecord.for_session(legacy, "c" * 32, 1.0)


def test_torn_last_line_is_dropped_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"event":"a","t_unix_s":1,"t_mono_s":1}\n{"event":"b","t_un')
    assert [r["event"] for r in read_record(path)] == ["a"]
    path.write_bytes(b'{"event":"a"}\n{garbage\n{"event":"c"}\n')
    with pytest.raises(RecordError, match="line 2 is not valid JSON"):
        read_record(path)
    with pytest.raises(RecordError, match="cannot read"):
        read_record(tmp_path / "missing.jsonl")


def test_a_killed_writer_process_keeps_every_flushed_record(tmp_path):
    path = tmp_path / "killed.jsonl"
    code = (
        "import sys, time\n"
        "from spineguide.tracking.service.record import SessionRecord\n"
        f"rec = SessionRecord({str(path)!r})\n"
        "for i in range(20):\n"
        "    rec.write('pair', pair_id=i)\n"
        "rec.flush()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready"
        finally:
            proc.kill()  # SIGKILL: no clean-up runs
            proc.wait(10)
    assert [r["pair_id"] for r in read_record(path)] == list(range(20))


def _small_config(tmp_path, raw=True):
    return ServiceConfig(
        safety=SafetyConfig(frame_period_s=0.1, max_frame_age_s=0.15, enable_validity_s=0.15),
        endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        setup=SetupConfig("automatic"),
        record=RecordConfig(tmp_path / "session.jsonl", raw_frames=raw),
        security=SecurityConfig(enabled=False),  # loopback test: CURVE explicitly off
    )


def _run_short_session(tmp_path, raw=True):
    config = _small_config(tmp_path, raw)
    svc = Service(config).start()
    peers = LocalPeers(svc.endpoints)
    try:
        peers.sub.handshake()
        assert peers.cmd.request("load_plan")["ok"]
        assert peers.cmd.request("start_setup")["ok"]
        peers.send_pair(0, Pose.from_six([2.0, -1.0, 0.5], [0.0, 0.5, 0.0]))
        peers.sub.wait_for(lambda m: m["_topic"] == "correction", 2.0)
        assert peers.cmd.request("couch_moved")["ok"]
        peers.send_pair(1, Pose.identity())
        peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 1, 2.0)
        assert peers.cmd.request("start_monitoring")["ok"]
        for k in range(2, 8):
            shift = 1.5 if k == 5 else 0.2
            peers.send_pair(k, Pose.from_six([0, 0, shift], [0, 0, 0]))
            peers.sub.wait_for(lambda m, k=k: m["_topic"] == "gating" and m["pair_id"] == k, 2.0)
        peers.send_pair(8, Pose.identity(), only=("A",))  # B silent: judged on view A alone (one-view monitoring)
        peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 8 and m["one_view"] == "A", 2.0)
        peers.cmd.request("bogus")
    finally:
        peers.close()
        svc.stop()
    return config.record.path


def test_replay_of_a_recorded_session_reproduces_every_decision(tmp_path):
    path = _run_short_session(tmp_path)
    records = read_record(path)
    events = {r["event"] for r in records}
    assert {"session", "command", "state", "frame", "pair", "sent", "closed"} <= events
    assert len(list((tmp_path / "session.jsonl.frames").glob("*.npy"))) == 2 * 8 + 1
    report = replay_session(path)
    assert report.differences == []
    assert report.pairs == 9 and report.recomputed_pairs == 9  # the one-view pair 8 too
    one = [r for r in records if r["event"] == "pair" and r["pair_id"] == 8][0]
    assert one["result"]["one_view"] == "A" and one["result"]["quality"]["blocked"] == {"B": "unpaired_frame"}
    assert one["reference"]["pose"] is not None


def test_replay_reports_a_changed_decision(tmp_path):
    path = _run_short_session(tmp_path, raw=False)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec["event"] == "pair" and rec["pair_id"] == 5:
            rec["result"]["pose"]["translation_mm"] = [0.0, 0.0, 0.1]  # as if the registration had said so
            lines[i] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    report = replay_session(path)
    assert any("line" in d and "beam" in d for d in report.differences), report.differences


def test_a_record_from_before_curve_was_the_default_still_replays(tmp_path):
    # Session headers written before [security] needed an explicit choice have no "enabled" key: such a
    # session ran plain TCP. Replay (which opens no socket) reads them as that; keys in the header stay keys.
    path = tmp_path / "old.jsonl"
    path.write_text('{"event": "session", "t_unix_s": 1.0, "t_mono_s": 1.0, "config": {"safety": {}}}\n')
    assert replay_session(path).differences == []
    path.write_text('{"event": "session", "t_unix_s": 1.0, "t_mono_s": 1.0, "config": '
                    '{"security": {"server_secret_key": "/nonexistent/server.key_secret"}}}\n')
    with pytest.raises(ConfigError, match="security"):
        replay_session(path)


def test_replay_refuses_a_file_that_is_not_a_session(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"event":"tick","t_unix_s":1,"t_mono_s":1}\n')
    with pytest.raises(RecordError, match="not a session record"):
        replay_session(path)


def test_a_restarted_service_starts_a_new_record_and_leaves_the_old_one_intact(tmp_path):
    link = _run_short_session(tmp_path)
    first = link.resolve()
    first_bytes = first.read_bytes()
    first_frames = sorted(p.name for p in frames_folder(first).iterdir())
    second_link = _run_short_session(tmp_path)  # the same config: the same record path
    second = second_link.resolve()
    assert second_link == link and second != first and link.resolve() == second
    assert first.read_bytes() == first_bytes  # nothing appended
    assert sorted(p.name for p in frames_folder(first).iterdir()) == first_frames  # no frame overwritten
    sessions = [read_record(p)[0]["session"] for p in (first, second)]
    assert sessions[0] != sessions[1] and all(len(s) == 32 for s in sessions)
    assert sum(r["event"] == "session" for r in read_record(second)) == 1
    for p in (first, second):
        assert replay_session(p).differences == []


def test_replay_reproduces_a_session_with_new_epochs(tmp_path):
    config = _small_config(tmp_path, raw=True)
    svc = Service(config).start()
    peers = LocalPeers(svc.endpoints)
    try:
        peers.sub.handshake()
        assert peers.cmd.request("load_plan")["ok"] and peers.cmd.request("start_setup")["ok"]
        for pid in (0, 10**15, 1):  # a bogus jump forward, then back to the usual numbering
            peers.send_pair(pid, Pose.identity())
            peers.sub.wait_for(lambda m, pid=pid: m["_topic"] == "gating" and m["pair_id"] == pid
                               and m["reason"] != "pair_id_jump", 2.0)
    finally:
        peers.close()
        svc.stop()
    records = read_record(config.record.path)
    assert [r["reason"] for r in records if r["event"] == "epoch"] == ["pair_id_jump", "pair_id_jump"]
    assert [r["epoch"] for r in records if r["event"] == "pair"] == [0, 1, 2]
    report = replay_session(config.record.path)
    assert report.differences == [] and report.pairs == 3 and report.recomputed_pairs == 3
