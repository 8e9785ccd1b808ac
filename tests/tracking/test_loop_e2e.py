"""End to end (slow): the service with the real fiducial pipeline, and a whole three-process fraction."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.registration.pose import Pose
from tests.synthetic import small_thoracolumbar
from spineguide.tracking.room.kv import KVSimulator
from spineguide.tracking.service.loop import Service
from spineguide.tracking.service.wire import encode_kvframe
from spineguide.tracking.sim.simulators import LocalPeers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: 512-pixel panels of 0.8 mm (the 41 cm field binned 2x): seeds are resolved.
GEOMETRY = default_stereo_geometry(panel_pixels=512, pixel_spacing_mm=0.8)
# At 0.8 mm pitch a seed centre is good to ~0.2 px (0.1 mm at the isocentre); with the phantom's seeds
# ~15 mm apart the pose is good to ~0.3 mm and ~0.7 deg at 3 sigma (the fiducial tests' bound).
TRANSLATION_TOL_MM = 0.3
ROTATION_TOL_DEG = 0.7


@functools.lru_cache(maxsize=1)
def _room():
    phantom = small_thoracolumbar()
    return phantom, KVSimulator(phantom, GEOMETRY)


def _send_rendered(peers: LocalPeers, pair_id: int, pose: Pose, seed: int) -> None:
    import time

    _, sim = _room()
    frames = sim.render(pose, seed=seed)
    now = time.time()
    for name, px in frames.frames.items():
        peers.frames.send_parts(encode_kvframe(peers.frames.seq.next(), name, pair_id, now, px,
                                               frames.truth.i0))


def _plan_files(tmp_path):
    """The phantom's plan as files (geometry, CT, fiducials/1) and a TOML config naming them."""
    from spineguide.calibration.io import write_geometry
    from spineguide.registration.ctfile import write_ct
    from spineguide.registration.io import FiducialSet, write_fiducials

    phantom, _ = _room()
    write_geometry(GEOMETRY, tmp_path / "geometry.json")
    write_ct(phantom.planning_ct, tmp_path / "ct.mha")
    seeds = FiducialSet(tuple(s.name for s in phantom.seeds), np.stack([s.centre_lps_mm for s in phantom.seeds]))
    write_fiducials(seeds, tmp_path / "fiducials.json")
    iso = ", ".join(repr(float(v)) for v in phantom.isocentre_lps_mm)
    (tmp_path / "service.toml").write_text(f"""
[safety]
frame_period_s = 0.1
max_frame_age_s = 2.0
pair_timeout_s = 0.5
enable_validity_s = 0.2

[endpoints]
frames = "tcp://127.0.0.1:0"
publish = "tcp://127.0.0.1:0"
command = "tcp://127.0.0.1:0"

[plan]
method = "fiducial"
geometry = "geometry.json"
ct = "ct.mha"
fiducials = "fiducials.json"
isocentre_lps_mm = [{iso}]

[setup]
approval = "automatic"

[security]
enabled = false

[record]
path = "session.jsonl"
raw_frames = true
""")
    return tmp_path / "service.toml"


def test_service_with_the_real_fiducial_pipeline_corrects_then_gates(tmp_path):
    from spineguide.tracking.service.config_file import load_config
    from spineguide.tracking.service.loop import replay_session

    config = load_config(_plan_files(tmp_path))
    with Service(config) as svc:
        peers = LocalPeers(svc.endpoints)
        try:
            peers.sub.handshake()
            assert peers.cmd.request("load_plan")["ok"] and peers.cmd.request("start_setup")["ok"]
            setup_error = Pose.from_six([2.5, -1.5, 1.0], [0.8, -0.5, 1.2])
            _send_rendered(peers, 0, setup_error, seed=1)
            corr = peers.sub.wait_for(lambda m: m["_topic"] == "correction", 30.0)
            expected = setup_error.to_correction()
            assert corr["apply"] is True and corr["method"] == "fiducial" and corr["quality"]["ok"]
            assert_allclose(corr["translation_mm"], expected.translation_mm, rtol=0, atol=TRANSLATION_TOL_MM)
            assert_allclose(corr["rotation_deg"], expected.rotation_deg, rtol=0, atol=ROTATION_TOL_DEG)
            assert peers.cmd.request("couch_moved")["ok"]
            _send_rendered(peers, 1, Pose.from_six([0.1, 0.0, -0.1], [0.0, 0.0, 0.0]), seed=2)
            peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 1, 30.0)
            assert peers.cmd.request("status")["phase"] == "verified"
            assert peers.cmd.request("start_monitoring")["ok"]
            _send_rendered(peers, 2, Pose.from_six([0.3, 0.0, 0.2], [0.0, 0.0, 0.0]), seed=3)
            assert peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 2, 30.0)["beam"] == "ENABLE"
            _send_rendered(peers, 3, Pose.from_six([0.0, -3.0, 0.0], [0.0, 0.0, 0.0]), seed=4)
            g = peers.sub.wait_for(lambda m: m["_topic"] == "gating" and m["pair_id"] == 3, 30.0)
            assert g["beam"] == "HOLD" and g["reason"] == "out_of_tolerance"
            assert_allclose(g["deviation_mm"], 3.0, rtol=0, atol=TRANSLATION_TOL_MM)
        finally:
            peers.close()
    # The recorded session replays identically, re-registering the raw frames with the same plan.
    report = replay_session(tmp_path / "session.jsonl")
    assert report.differences == [] and report.recomputed_pairs == 4


def test_three_process_fraction_sets_up_holds_on_the_shift_and_resumes(tmp_path):
    from spineguide.tracking.sim.fraction import run_fraction

    summary = run_fraction(tmp_path, seed=7)  # the real fiducial pipeline on the virtual room
    tolerance_mm = 1.0
    assert summary.setups == 2 and summary.corrections_applied >= 2
    assert all(r <= tolerance_mm for r in summary.setup_residual_mm) and len(summary.setup_residual_mm) >= 2
    assert summary.holds.get("out_of_tolerance", 0) >= 1
    # The safety property: no ENABLE sent for a pair whose true deviation exceeds tolerance + 0.2 mm.
    assert summary.max_true_deviation_enabled_mm <= tolerance_mm + 0.2
    # The gantry blocked a view twice (fraction.BLOCKS): those pairs were judged on the other view, and no
    # one-view ENABLE was sent for a pair beyond tolerance.
    assert summary.one_view_pairs >= 20
    assert summary.max_true_deviation_one_view_enabled_mm <= tolerance_mm
    assert summary.beam_on_s > 0
    assert np.isfinite(summary.latency_ms["p50"])
    assert len(summary.service_session) == 32  # uuid4 hex, in the record and every message
