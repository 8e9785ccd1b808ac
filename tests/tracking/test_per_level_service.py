"""Per-level setup in the engine (docs/PER_LEVEL.md): the proposal carries every level's pose, the approval
chooses which level drives the correction, a discordant table needs that choice made explicitly, and the
chosen level drives verification and monitoring.

A stand-in processor reads the true pose stamped in the frames and gives each level its own known offset
(as a per-level registration of a deformed spine would), so every number here is exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from spineguide.registration.pose import Pose
from spineguide.tracking.frames import KvFrame
from spineguide.tracking.service.config import ConfigError, PlanConfig, SafetyConfig, ServiceConfig, SetupConfig
from spineguide.tracking.service.gating import HoldReason
from spineguide.tracking.service.processing import PairResult, read_pose_pattern, stamp_pose_pattern
from spineguide.tracking.service.record import SessionRecord
from spineguide.tracking.service.states import Engine, run_processor
from spineguide.tracking.sim.simulators import pattern_frame

T0 = 1_764_070_000.0
LEVELS = ("L1", "L2", "L3")


class LevelStandIn:
    """Per-level stand-in: level pose = offset(level) o stamped pose. Records what it was asked."""

    method = "anatomy"
    has_levels = True

    def __init__(self, offsets_mm: dict[str, tuple[float, float, float]], threshold_mm: float = 1.0):
        self.offsets = {k: Pose.from_six(v, (0.0, 0.0, 0.0)) for k, v in offsets_mm.items()}
        self.threshold_mm = threshold_mm
        self.calls: list[tuple[str, str | None]] = []

    def _pose(self, frames, level):
        pose = read_pose_pattern(frames["A"].pixels)
        return self.offsets[level or "L2"].compose(pose)

    def process_levels(self, frames, prior, level):
        self.calls.append(("levels", level))
        poses = {n: self._pose(frames, n) for n in LEVELS}
        t = poses["L2"].translation_mm
        worst = max(float(np.linalg.norm(poses[n].translation_mm - t)) for n in ("L1", "L3"))
        table = {"target": "L2", "levels": [{"name": n, "ok": True, "reason": "", "pose": poses[n].to_json()}
                                             for n in LEVELS],
                 "inter_level": [], "discordant": worst > self.threshold_mm,
                 "discordance_detail": f"target differs from a neighbour by {worst:.2f} mm"}
        driving = level or "L2"
        return PairResult(HoldReason.OK, poses[driving], "anatomy",
                          {"ok": True, "levels": table, "driving_level": driving})

    def process(self, frames, prior, level=None):
        self.calls.append(("track", level))
        return PairResult(HoldReason.OK, self._pose(frames, level), "anatomy", {"ok": True})


class Harness:
    def __init__(self, processor, approval="manual"):
        self.config = ServiceConfig(safety=SafetyConfig(), setup=SetupConfig(approval))
        self.sent: list[dict] = []
        self.proc = processor
        self.engine = Engine(self.config, lambda plan: processor, SessionRecord(None), self.sent.append)
        self.now = T0
        self.pid = 0
        self.base = pattern_frame(Pose.identity(), 32, 32)

    def cmd(self, name, **params):
        self.now += 0.01
        reply, _ = self.engine.handle_command(name, params, self.now, self.now - T0)
        return reply

    def pair(self, pose):
        self.now += 0.5
        pid, self.pid = self.pid, self.pid + 1
        frames = {n: KvFrame(n, stamp_pose_pattern(self.base, pose), acquired_unix_s=self.now - 0.02, pair_id=pid)
                  for n in ("A", "B")}
        job, proc = self.engine.begin_pair(pid, self.now - 0.02, self.now - T0, self.now)
        return job, self.engine.finish_pair(job, run_processor(proc, frames, job, self.config), self.now + 0.001,
                                            self.now - T0)


SETUP = Pose.from_six([3.0, 0.0, 0.0], [0, 0, 0])


def proposed(h):
    job, out = h.pair(SETUP)
    assert job.per_level and h.engine.phase.value == "awaiting_approval"
    return job.pair_id, [o for o in out if o.get("purpose") == "proposal"][0]


def test_proposal_carries_the_table_and_the_target_drives_by_default():
    h = Harness(LevelStandIn({"L1": (0.3, 0, 0), "L2": (0, 0, 0), "L3": (-0.3, 0, 0)}))
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    pid, msg = proposed(h)
    assert msg["quality"]["driving_level"] == "L2" and len(msg["quality"]["levels"]["levels"]) == 3
    status = h.cmd("status")
    assert status["pending_correction"]["levels"]["target"] == "L2"
    reply = h.cmd("approve_correction", pair_id=pid)
    assert reply["ok"] and reply["level"] == "L2"
    sent = [o for o in h.sent if o.get("purpose") == "setup"][-1]
    np.testing.assert_allclose(sent["translation_mm"], [-3.0, 0, 0], atol=1e-3)  # C = P^-1 of the target's pose


def test_choosing_a_neighbour_rebuilds_the_correction_from_its_pose_and_it_drives_after():
    h = Harness(LevelStandIn({"L1": (0.6, 0, 0), "L2": (0, 0, 0), "L3": (-0.2, 0, 0)}))
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    pid, _ = proposed(h)
    reply = h.cmd("approve_correction", pair_id=pid, level="L1")
    assert reply["ok"] and reply["level"] == "L1"
    sent = [o for o in h.sent if o.get("purpose") == "setup"][-1]
    np.testing.assert_allclose(sent["translation_mm"], [-3.6, 0, 0], atol=1e-3)  # L1's pose: 3 + 0.6 mm
    assert sent["quality"]["driving_level"] == "L1"
    assert h.cmd("couch_moved")["ok"]
    # Verification: L1 drives. The patient now sits where the L1 correction put it.
    job, _ = h.pair(Pose.from_six([-0.6, 0, 0], [0, 0, 0]))
    assert job.level == "L1" and h.proc.calls[-1] == ("levels", "L1")
    assert h.engine.phase.value == "verified"
    assert h.cmd("start_monitoring")["ok"]
    job, out = h.pair(Pose.from_six([-0.6, 0, 0], [0, 0, 0]))
    assert h.proc.calls[-1] == ("track", "L1")
    assert [o for o in out if o["schema"].startswith("gating/")][-1]["beam"] == "ENABLE"


def test_a_discordant_table_needs_the_level_named():
    h = Harness(LevelStandIn({"L1": (2.0, 0, 0), "L2": (0, 0, 0), "L3": (0, 0, 0)}))
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    pid, msg = proposed(h)
    assert msg["quality"]["levels"]["discordant"]
    reply = h.cmd("approve_correction", pair_id=pid)
    assert not reply["ok"] and "must name the level" in reply["reason"]
    assert h.engine.phase.value == "awaiting_approval"  # nothing sent
    assert h.cmd("approve_correction", pair_id=pid, level="L2")["ok"]


@pytest.mark.parametrize("level", ["T1", 3, ""])
def test_an_unknown_level_is_refused(level):
    h = Harness(LevelStandIn({"L1": (0, 0, 0), "L2": (0, 0, 0), "L3": (0, 0, 0)}))
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    pid, _ = proposed(h)
    reply = h.cmd("approve_correction", pair_id=pid, level=level)
    assert not reply["ok"] and "level" in reply["reason"]


def test_a_level_on_a_plan_without_levels_is_refused():
    from spineguide.tracking.service.processing import PatternProcessor

    h = Harness(PatternProcessor(("A", "B"), 0.0))
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    job, _ = h.pair(SETUP)
    assert not job.per_level
    reply = h.cmd("approve_correction", pair_id=job.pair_id, level="L1")
    assert not reply["ok"] and "registers no levels" in reply["reason"]


def test_a_new_setup_forgets_the_chosen_level():
    h = Harness(LevelStandIn({"L1": (0.6, 0, 0), "L2": (0, 0, 0), "L3": (0, 0, 0)}))
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    pid, _ = proposed(h)
    assert h.cmd("approve_correction", pair_id=pid, level="L1")["ok"]
    assert h.engine.driving_level == "L1"
    assert h.cmd("couch_moved")["ok"]
    h.pair(Pose.from_six([-0.6, 0, 0], [0, 0, 0]))
    assert h.cmd("start_monitoring")["ok"]
    assert h.cmd("start_setup")["ok"]  # a re-setup mid-fraction: the plan's target drives until chosen again
    assert h.engine.driving_level is None


@pytest.mark.parametrize("levels, match", [
    (["L1"], "2-5"), (["L1", "L1"], "2-5"), (["L1", ""], "2-5"), (["a", "b", "c", "d", "e", "f"], "2-5"),
])
def test_level_rois_config_is_checked(levels, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        PlanConfig(method="anatomy", geometry=tmp_path / "g.json", dicom=tmp_path, level_rois=levels)


def test_level_rois_needs_anatomy_and_dicom(tmp_path):
    with pytest.raises(ConfigError, match="needs method 'anatomy' and dicom"):
        PlanConfig(method="anatomy", geometry=tmp_path / "g.json", ct=tmp_path / "ct.mha",
                   isocentre_lps_mm=(0, 0, 0), level_rois=["L1", "L2"])
