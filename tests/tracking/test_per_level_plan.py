"""Per-level setup end to end through the service's own plan loading (docs/PER_LEVEL.md): a DICOM plan written
from the cervical phantom (one structure set ROI per vertebra), ``[plan] level_rois``, the anatomy processor's
per-level registration on rendered frames, and monitoring of a chosen level. The phantom's spine is rigid, so
every level's true pose is the rendered pose (exact truth)."""

from __future__ import annotations

import numpy as np
import pytest

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.io import write_geometry
from spineguide.registration.pose import Pose
from spineguide.tracking.frames import KvFrame
from spineguide.tracking.room.dicom import write_dicom_plan
from spineguide.tracking.room.kv import KVSimulator
from spineguide.tracking.room.phantoms import cervical_phantom
from spineguide.tracking.service.config import PlanConfig
from spineguide.tracking.service.processing import build_processor

#: Per-level registration of a rigid spine at i0 20,000 on 512-pixel panels: each level within these of the truth.
#: Single vertebrae register to ~0.1-0.3 mm but 0.3-0.6 deg (the neighbours' residue in the cleaned frames;
#: docs/PER_LEVEL.md, where the issue's 0.3 deg inter-level number is reported as not met): this test checks the
#: service's plumbing with a bound the method meets, not the method's accuracy.
LEVEL_TOL_MM = 0.5
LEVEL_TOL_DEG = 1.0


@pytest.mark.slow
def test_per_level_plan_registers_every_level_and_monitors_the_chosen_one(tmp_path):
    phantom = cervical_phantom(target="C4")
    write_dicom_plan(phantom, tmp_path / "plan")
    geometry = default_stereo_geometry(512, 0.8)
    write_geometry(geometry, tmp_path / "geometry.json")
    plan = PlanConfig(method="anatomy", geometry=tmp_path / "geometry.json", dicom=tmp_path / "plan",
                      target_roi="C4", level_rois=("C3", "C4", "C5"))
    proc = build_processor(plan)
    assert proc.has_levels
    truth = Pose.from_six([1.0, -0.6, 0.4], [0.3, 0.0, -0.2])
    st = KVSimulator(phantom, geometry).render(truth, seed=3)
    frames = {n: KvFrame(n, px, i0=st.truth.i0) for n, px in st.frames.items()}

    res = proc.process_levels(frames, None, None)
    assert res.ok, res.detail
    table = res.quality["levels"]
    assert [lv["name"] for lv in table["levels"]] == ["C3", "C4", "C5"] and table["target"] == "C4"
    assert res.quality["driving_level"] == "C4" and not table["discordant"]
    for lv in table["levels"]:
        assert lv["ok"], lv
        pose = Pose.from_six(lv["pose"]["translation_mm"], lv["pose"]["rotation_deg"])
        err = pose.compose(truth.inverse())
        assert np.linalg.norm(err.translation_mm) < LEVEL_TOL_MM and err.angle_deg() < LEVEL_TOL_DEG, (lv["name"], err)
    assert len(table["inter_level"]) == 2

    chosen = proc.process_levels(frames, None, "C3")
    assert chosen.ok and chosen.quality["driving_level"] == "C3"
    tracked = proc.process(frames, truth, level="C3")  # monitoring the chosen level: its own registration
    assert tracked.ok and tracked.quality["driving_level"] == "C3"
    err = tracked.pose.compose(truth.inverse())
    assert np.linalg.norm(err.translation_mm) < LEVEL_TOL_MM


@pytest.mark.slow
def test_the_demo_registers_every_level_of_a_deformed_spine():
    """``spineguide demo``'s last step (tracking/cli/demo_levels.py): three levels, truth and measurement
    side by side; each level within 0.5 mm at its ROI centre and 1.5 deg (docs/PER_LEVEL.md: the rotation
    is the weak part, the issue's 0.3 deg inter-level number is not met)."""
    from spineguide.tracking.cli.demo_levels import DEFORMED_LEVELS, deformed_spine_levels

    levels, inter, flag = deformed_spine_levels(default_stereo_geometry(512, 0.8), 2026)
    assert [r[0].split()[0] for r in levels] == list(DEFORMED_LEVELS) and len(inter) == 2
    for row in levels:
        assert row[5] == "ok" and float(row[3]) < 0.5 and float(row[4]) < 1.5, row
    assert flag.startswith("discordant: ")
