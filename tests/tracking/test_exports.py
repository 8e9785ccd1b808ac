"""Approved setups exported as DICOM Spatial Registration; the service's plan from a DICOM folder."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.dicom_export import pose_from_registration_matrix, read_registration_matrix
from spineguide.registration.pose import Pose
from tests.synthetic import small_geometry, small_thoracolumbar
from spineguide.tracking.service.config import ConfigError, PlanConfig, SafetyConfig, ServiceConfig, SetupConfig
from spineguide.tracking.service.exports import SetupExporter
from spineguide.tracking.service.plan import load_treatment_plan
from spineguide.tracking.service.processing import PatternProcessor, build_processor
from spineguide.tracking.service.record import SessionRecord, read_record
from spineguide.tracking.room.io import write_simulation
from spineguide.tracking.service.states import Engine

T0 = 1_764_070_000.0


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plans")
    phantom = small_thoracolumbar()
    write_simulation(folder, phantom, 1, seed=1, geometry=small_geometry())  # ct.mha, fiducials.json, dicom/
    iso = tuple(float(v) for v in phantom.isocentre_lps_mm)
    return folder, phantom, iso


def test_dicom_plan_config_builds_the_same_fiducial_processor_as_files(plans):
    folder, phantom, iso = plans
    from_files = PlanConfig(method="fiducial", geometry=folder / "geometry.json", ct=folder / "ct.mha",
                            fiducials=folder / "fiducials.json", isocentre_lps_mm=iso)
    from_dicom = PlanConfig(method="fiducial", geometry=folder / "geometry.json", dicom=folder / "dicom")
    a, b = load_treatment_plan(from_files), load_treatment_plan(from_dicom)
    # The RTPLAN isocentre and RTSTRUCT points are written as DS strings: 1e-6 mm is ample.
    assert_allclose(b.isocentre_lps_mm, iso, rtol=0, atol=1e-6)
    assert_allclose(b.fiducials_room_mm(), a.fiducials_room_mm(), rtol=0, atol=1e-6)
    processor = build_processor(from_dicom)
    # The live loop never runs the joint constellation search (0.1-0.5 s per pair); of the faint-seed search
    # it keeps only the verification where the last trusted pose puts the seeds.
    assert processor.config.faint.enabled is True
    assert processor.config.faint.joint_search is False


def test_the_live_processor_takes_the_geometry_files_flat_fields(plans, tmp_path):
    # The kv-geometry/1 extension {"flat_field": {imager: {"gain", "offset"}}} reaches the service's processor.
    folder, _, _ = plans
    doc = json.loads((folder / "geometry.json").read_text())
    rows, cols = doc["imagers"][0]["detector"]["rows"], doc["imagers"][0]["detector"]["cols"]
    np.save(tmp_path / "gainA.npy", np.full((rows, cols), 0.9, np.float32))
    np.save(tmp_path / "darkA.npy", np.full((rows, cols), 100.0, np.float32))
    doc["flat_field"] = {"A": {"gain": "gainA.npy", "offset": "darkA.npy"}}
    (tmp_path / "geometry.json").write_text(json.dumps(doc))
    plan = PlanConfig(method="fiducial", geometry=tmp_path / "geometry.json", dicom=folder / "dicom")
    processor = build_processor(plan)
    assert set(processor.flat_fields) == {"A"}
    assert_allclose(processor.flat_fields["A"].offset_counts, 100.0)
    no_maps = build_processor(PlanConfig(method="fiducial", geometry=folder / "geometry.json", dicom=folder / "dicom"))
    assert no_maps.flat_fields is None


def test_plan_config_refuses_dicom_together_with_files(plans):
    folder, _, iso = plans
    with pytest.raises(ConfigError, match="either dicom"):
        PlanConfig(method="fiducial", geometry=folder / "geometry.json", dicom=folder / "dicom",
                   ct=folder / "ct.mha", fiducials=folder / "fiducials.json", isocentre_lps_mm=iso)


def test_exported_registration_holds_the_approved_pose(plans, tmp_path):
    folder, _, iso = plans
    record = SessionRecord(tmp_path / "session.jsonl")
    plan = PlanConfig(method="fiducial", geometry=folder / "geometry.json", dicom=folder / "dicom")
    exporter = SetupExporter(plan, tmp_path / "exports", record)
    pose = Pose.from_six([1.5, -2.0, 0.7], [0.8, -0.4, 1.1])
    exporter.export(7, pose, T0, "Physicist^R")
    exporter.export(7, pose, T0 + 1.0, "Physicist^R")  # the same approval reported again: no second object
    exporter.export(9, pose, T0 + 60.0, "Physicist^R")  # a second approved setup of the session
    exporter.join()
    record.close()
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["SRO_pair000007.dcm", "SRO_pair000009.dcm"]
    ds = pydicom.dcmread(tmp_path / "exports" / "SRO_pair000007.dcm")
    second = pydicom.dcmread(tmp_path / "exports" / "SRO_pair000009.dcm")
    assert ds.Modality == "REG" and str(ds.ContentCreatorName) == "Physicist^R"
    assert ds.SeriesInstanceUID == second.SeriesInstanceUID and ds.SeriesNumber == second.SeriesNumber
    assert ds.FrameOfReferenceUID == second.FrameOfReferenceUID == exporter.room_frame_of_reference_uid
    assert {ds.InstanceNumber, second.InstanceNumber} == {1, 2} and ds.SOPInstanceUID != second.SOPInstanceUID
    treatment = load_treatment_plan(plan)
    matrix = read_registration_matrix(ds, treatment.frame_of_reference_uid)
    back = pose_from_registration_matrix(matrix, treatment.isocentre_lps_mm, treatment.patient_position)
    assert_allclose(back.matrix, pose.matrix, rtol=0, atol=1e-6)
    events = read_record(tmp_path / "session.jsonl")
    exports = sorted((r for r in events if r["event"] == "export"), key=lambda r: r["pair_id"])
    assert [r["pair_id"] for r in exports] == [7, 9] and exports[0]["kind"] == "spatial_registration"
    assert exports[0]["sop_instance_uid"] == str(ds.SOPInstanceUID) and exports[0]["operator"] == "Physicist^R"
    assert [r["pair_id"] for r in events if r["event"] == "export_skipped"] == [7]


def test_export_failure_is_recorded_not_raised(tmp_path):
    record = SessionRecord(tmp_path / "session.jsonl")
    plan = PlanConfig(method="fiducial", geometry=tmp_path / "g.json", dicom=tmp_path / "no-such-folder")
    exporter = SetupExporter(plan, tmp_path / "exports", record)
    exporter.export(1, Pose.identity(), T0)
    exporter.join()
    record.close()
    failed = [r for r in read_record(tmp_path / "session.jsonl") if r["event"] == "export_failed"]
    assert len(failed) == 1 and failed[0]["pair_id"] == 1 and "no-such-folder" in failed[0]["error"]


def test_engine_reports_every_setup_sent_to_the_couch_with_the_operator():
    seen = []
    config = ServiceConfig(safety=SafetyConfig(), setup=SetupConfig("manual"))
    engine = Engine(config, lambda plan: PatternProcessor(plan.imagers, 0.0), SessionRecord(None), lambda body: None,
                    on_setup_applied=lambda pid, pose, t, who: seen.append((pid, pose, who)))
    from tests.tracking.test_states import Harness

    h = Harness(approval="manual")
    h.engine = engine
    assert h.cmd("load_plan")["ok"] and h.cmd("start_setup")["ok"]
    offset = Pose.from_six([2.0, 0.0, 0.0], [0, 0, 0])
    h.pair(offset)
    assert seen == []  # proposed, not approved
    reply = h.cmd("approve_correction", pair_id=0, operator="R. Physicist")
    assert reply["ok"], reply
    assert len(seen) == 1 and seen[0][2] == "R. Physicist"
    assert_allclose(seen[0][1].translation_mm, [2.0, 0.0, 0.0], rtol=0, atol=1e-3)


def test_exported_registration_is_sent_to_the_archive(plans, tmp_path):
    from spineguide.tracking.service.dicom_net import EXPORT_SOP_CLASSES, ListenerConfig, StorageListener

    folder, _, _ = plans
    record = SessionRecord(tmp_path / "session.jsonl")
    plan = PlanConfig(method="fiducial", geometry=folder / "geometry.json", dicom=folder / "dicom")
    config = ListenerConfig(tmp_path / "archive", port=0, sop_classes=EXPORT_SOP_CLASSES, timeout_s=20.0)
    with StorageListener(config) as archive:
        exporter = SetupExporter(plan, tmp_path / "exports", record, f"SPINEGUIDE@127.0.0.1:{archive.port}")
        exporter.export(3, Pose.from_six([1, 0, 0], [0, 0, 0]), T0, "op")
        exporter.join()
        received = archive.received
    record.close()
    assert len(received) == 1 and pydicom.dcmread(received[0]).Modality == "REG"
    events = [r["event"] for r in read_record(tmp_path / "session.jsonl")]
    assert events.index("export") < events.index("export_sent")


def test_archive_without_exports_folder_is_refused():
    from spineguide.tracking.service.config import RecordConfig

    with pytest.raises(ConfigError, match="dicom_archive needs dicom_exports"):
        RecordConfig(dicom_archive="RV@host:104")
    with pytest.raises(ConfigError, match="AE@HOST:PORT"):
        RecordConfig(dicom_exports="x", dicom_archive="host:104")


def test_plan_config_target_roi_overrides_the_plans_target(plans):
    folder, _, _ = plans
    plain = PlanConfig(method="anatomy", geometry=folder / "geometry.json", dicom=folder / "dicom")
    assert load_treatment_plan(plain).target_roi == "L1"  # the RTPLAN's TARGET dose reference
    chosen = PlanConfig(method="anatomy", geometry=folder / "geometry.json", dicom=folder / "dicom", target_roi="L2")
    treatment = load_treatment_plan(chosen)
    assert treatment.target_roi == "L2"
    l1, l2 = load_treatment_plan(plain).target_mask(), treatment.target_mask()
    assert l2.any() and not (l1 & l2).any()  # another vertebra's voxels
    from spineguide.registration.errors import RegistrationError

    with pytest.raises(RegistrationError, match="'L9'"):
        load_treatment_plan(PlanConfig(method="anatomy", geometry=folder / "geometry.json", dicom=folder / "dicom",
                                       target_roi="L9"))
    with pytest.raises(ConfigError, match="target_roi .* needs dicom"):
        PlanConfig(method="anatomy", geometry=folder / "geometry.json", ct=folder / "ct.mha",
                   isocentre_lps_mm=(0.0, 0.0, 0.0), target_roi="L2")
    for bad in ("", " L2", "x" * 65, "L\n2", 5):
        with pytest.raises(ConfigError, match="target_roi must be"):
            PlanConfig(method="anatomy", geometry=folder / "geometry.json", dicom=folder / "dicom", target_roi=bad)


def test_anatomy_processor_corrects_frames_with_the_geometry_files_flat_fields(plans, tmp_path):
    """The service's anatomy method gets dark/gain-corrected frames with the dead lines filled, as `register` does;
    a frame that does not fit its maps is a corrupt frame (HOLD), not a registration."""
    from spineguide.tracking.frames import KvFrame
    from spineguide.tracking.service.processing import AnatomyProcessor
    from spineguide.tracking.service.states import HoldReason

    folder, _, _ = plans
    doc = json.loads((folder / "geometry.json").read_text())
    rows, cols = doc["imagers"][0]["detector"]["rows"], doc["imagers"][0]["detector"]["cols"]
    np.save(tmp_path / "gainA.npy", np.full((rows, cols), 2.0, np.float32))
    np.save(tmp_path / "darkA.npy", np.full((rows, cols), 100.0, np.float32))
    dead = np.zeros((rows, cols), np.uint8)
    dead[5, :] = 1
    np.save(tmp_path / "deadA.npy", dead)
    doc["flat_field"] = {"A": {"gain": "gainA.npy", "offset": "darkA.npy", "defects": "deadA.npy"}}
    (tmp_path / "geometry.json").write_text(json.dumps(doc))
    processor = build_processor(PlanConfig(method="anatomy", geometry=tmp_path / "geometry.json",
                                           dicom=folder / "dicom"))
    assert set(processor.flat_fields) == {"A"} and processor.flat_fields["A"].defects.sum() == cols

    class Seen:
        def register(self, pixels, **kw):
            self.pixels = pixels
            raise RegistrationError("stop here")

    from spineguide.registration.errors import RegistrationError

    seen = Seen()
    raw = np.full((rows, cols), 2100, np.uint16)
    raw[5, :] = 0  # the dead row
    frames = {n: KvFrame(n, raw, 20000.0) for n in ("A", "B")}
    out = AnatomyProcessor(seen, processor.flat_fields).process(frames, None)
    assert out.reason is HoldReason.REGISTRATION_REFUSED
    assert_allclose(seen.pixels["A"], 1000.0, rtol=1e-5)  # (2100 - 100) / 2, the row filled
    assert np.array_equal(seen.pixels["B"], raw)  # no maps for B: as read
    small = {n: KvFrame(n, raw[:-1], 20000.0) for n in ("A", "B")}
    out = AnatomyProcessor(seen, processor.flat_fields).process(small, None)
    assert out.reason is HoldReason.CORRUPT_FRAME and "does not match its flat-field maps" in out.detail


def test_a_frame_the_anatomy_registration_cannot_read_is_a_corrupt_frame_not_a_refusal():
    """Issue 17 item 6: registration's own RegistrationFrameError (NaN pixels) was reported as registration_refused."""
    from spineguide.registration.errors import RegistrationFrameError
    from spineguide.registration.errors import RegistrationError
    from spineguide.tracking.frames import KvFrame
    from spineguide.tracking.service.processing import AnatomyProcessor
    from spineguide.tracking.service.states import HoldReason

    class Raises:
        def __init__(self, err):
            self.err = err

        def register(self, pixels, **kw):
            raise self.err

    frames = {n: KvFrame(n, np.ones((4, 4), np.uint16), 20000.0) for n in ("A", "B")}
    bad = AnatomyProcessor(Raises(RegistrationFrameError("frame 'A': holds 3 non-finite pixels"))).process(frames, None)
    assert bad.reason is HoldReason.CORRUPT_FRAME and "non-finite" in bad.detail
    refused = AnatomyProcessor(Raises(RegistrationError("no overlap"))).process(frames, None)
    assert refused.reason is HoldReason.REGISTRATION_REFUSED
