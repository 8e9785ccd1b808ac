"""DICOM networking: dcmtk's storescu into our listener, our SCU into our listener and dcmtk's storescp."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.dicom_export import SeriesInfo, rt_image, spatial_registration
from spineguide.registration.plan import load_dicom_plan
from spineguide.registration.pose import Pose
from tests.synthetic import small_geometry, small_thoracolumbar
from spineguide.tracking.service.dicom_net import (
    EXPORT_SOP_CLASSES,
    PLANNING_SOP_CLASSES,
    ArchiveConfig,
    DicomNetworkError,
    ListenerConfig,
    StorageListener,
    send_to_archive,
)
from spineguide.tracking.room.dicom import write_dicom_plan

# End-to-end (DICOM over the network): outside the development loop (-m "not slow"), run by CI.
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
TIMEOUT_S = 20.0
ROOM_UID = "1.2.826.0.1.3680043.8.498.1"


def _dcmtk(binary: str) -> str | None:
    # pynetdicom installs Python apps of the same names; only dcmtk's are an independent implementation.
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(binary, path=folder)
        if path is None:
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def need(binary: str) -> str:
    """Path of a dcmtk tool; skipped only when missing outside CI (CI must install dcmtk)."""
    path = _dcmtk(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} (apt-get install dcmtk) is required in CI")
        pytest.skip(f"{binary} not installed (apt-get install dcmtk)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def planning(tmp_path_factory):
    return write_dicom_plan(small_thoracolumbar(), tmp_path_factory.mktemp("plan"))


def test_storescu_sends_a_plan_that_loads_like_the_original(planning, tmp_path):
    storescu = need("storescu")
    files = [*planning.ct_files, planning.rtstruct, planning.rtplan]
    with StorageListener(ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S)) as listener:
        out = subprocess.run(
            [storescu, "-aec", "SGTEST", "-to", "20", "127.0.0.1", str(listener.port), *map(str, files)],
            capture_output=True, text=True, timeout=100,
        )
        assert out.returncode == 0, out.stderr
        received = listener.received
    assert len(received) == len(files) and listener.refused == ()
    # One folder per study/series: CT, RTSTRUCT and RTPLAN series under the one study.
    series_dirs = {p.parent for p in received}
    assert len(series_dirs) == 3 and {d.parent.name for d in series_dirs} == {planning.study_uid}
    original, got = load_dicom_plan(planning.out_dir), load_dicom_plan(tmp_path / "rx")
    np.testing.assert_array_equal(got.ct.hu, original.ct.hu)
    assert_allclose(got.isocentre_lps_mm, original.isocentre_lps_mm, rtol=0, atol=0)
    for name in original.rois:
        np.testing.assert_array_equal(got.rois[name], original.rois[name])
    assert got.fiducials.names == original.fiducials.names


def test_our_scu_sends_exports_to_our_listener_and_to_dcmtk(planning, tmp_path):
    plan = load_dicom_plan(planning.out_dir)
    g = small_geometry()["A"]
    frame = np.random.default_rng(5).integers(0, 50000, size=(g.rows, g.cols), dtype=np.uint16)
    objects = [
        spatial_registration(plan, Pose.from_six([1, 2, 3], [0, 1, 0]), room_frame_of_reference_uid=ROOM_UID,
                             approved_unix_s=1764070000.0),
        rt_image(frame, g, plan.patient, acquired_unix_s=1764070000.0, i0=20000.0, series=SeriesInfo.new(9)),
    ]
    config = ListenerConfig(tmp_path / "archive", port=0, sop_classes=EXPORT_SOP_CLASSES, timeout_s=TIMEOUT_S)
    with StorageListener(config) as archive:
        results = send_to_archive(objects, ArchiveConfig("127.0.0.1", archive.port, "SPINEGUIDE", timeout_s=TIMEOUT_S))
        received = archive.received
    assert [r.status for r in results] == [0, 0]
    back = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in received}
    for ds in objects:
        got = back[ds.SOPInstanceUID]
        assert got.SOPClassUID == ds.SOPClassUID
    np.testing.assert_array_equal(back[objects[1].SOPInstanceUID].pixel_array, frame)

    storescp = need("storescp")
    port = free_port()
    (tmp_path / "dcmtk").mkdir()
    proc = subprocess.Popen([storescp, "-od", str(tmp_path / "dcmtk"), "-aet", "ARCHIVE", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # wait for storescp to listen (no sleeping on a guess)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("storescp did not start listening")
                time.sleep(0.05)
        send_to_archive(objects, ArchiveConfig("127.0.0.1", port, "ARCHIVE", timeout_s=TIMEOUT_S))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    stored = sorted((tmp_path / "dcmtk").iterdir())
    assert len(stored) == 2
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == {ds.SOPInstanceUID for ds in objects}


def test_listener_refuses_sop_classes_it_does_not_accept(planning, tmp_path):
    ds = pydicom.dcmread(planning.ct_files[0])
    config = ListenerConfig(tmp_path / "rx", port=0, sop_classes=EXPORT_SOP_CLASSES, timeout_s=TIMEOUT_S)
    with StorageListener(config) as listener:
        with pytest.raises(DicomNetworkError, match="127.0.0.1"):
            send_to_archive([ds], ArchiveConfig("127.0.0.1", listener.port, "SPINEGUIDE", timeout_s=TIMEOUT_S))
    assert not (tmp_path / "rx").exists() or not any((tmp_path / "rx").rglob("*.dcm"))


def test_listener_refuses_uids_that_are_not_uids(planning, tmp_path):
    ds = pydicom.dcmread(planning.ct_files[0])
    ds.SeriesInstanceUID = "1.2.3"  # valid
    elem = ds["StudyInstanceUID"]
    elem._value = "../../escape"  # bypass pydicom's validation: a hostile or broken sender
    with StorageListener(ListenerConfig(tmp_path / "rx", port=0, timeout_s=TIMEOUT_S)) as listener:
        with pytest.raises(DicomNetworkError, match=r"1 of 1 objects not stored .*status 0xC000"):
            send_to_archive([ds], ArchiveConfig("127.0.0.1", listener.port, "SPINEGUIDE", timeout_s=TIMEOUT_S))
        assert listener.received == () and len(listener.refused) == 1  # (decode warning or UID check)
    assert not (tmp_path / "escape").exists() and not any(tmp_path.rglob("*.dcm"))


def test_association_to_a_closed_port_fails_with_the_peer_named(planning):
    with pytest.raises(DicomNetworkError, match=r"cannot connect to NOBODY@127\.0\.0\.1:\d+: .*[Cc]onnection refused"):
        send_to_archive([planning.rtplan], ArchiveConfig("127.0.0.1", free_port(), "NOBODY", timeout_s=2.0))


def test_configuration_refusals(tmp_path):
    with pytest.raises(DicomNetworkError, match="not a valid AE title"):
        ListenerConfig(tmp_path, ae_title="A" * 17)
    with pytest.raises(DicomNetworkError, match="listener port must be an integer port"):
        ListenerConfig(tmp_path, port=70000)
    with pytest.raises(DicomNetworkError, match="listener timeout_s must be a positive number"):
        ListenerConfig(tmp_path, timeout_s=0)
    with pytest.raises(DicomNetworkError, match="SOP classes must be valid UIDs"):
        ListenerConfig(tmp_path, sop_classes=("x.y",))
    with pytest.raises(DicomNetworkError, match="archive host must not be empty"):
        ArchiveConfig("", 104, "PACS")
    with pytest.raises(DicomNetworkError, match="nothing to send"):
        send_to_archive([], ArchiveConfig("127.0.0.1", 104, "PACS"))
    with pytest.raises(DicomNetworkError, match="cannot read DICOM file to send"):
        send_to_archive([tmp_path / "missing.dcm"], ArchiveConfig("127.0.0.1", 104, "PACS"))
    assert PLANNING_SOP_CLASSES[0] == "1.2.840.10008.5.1.4.1.1.2"


def test_port_in_use_is_reported(tmp_path):
    with StorageListener(ListenerConfig(tmp_path, port=0, timeout_s=TIMEOUT_S)) as first:
        with pytest.raises(DicomNetworkError, match=rf"cannot listen on 127\.0\.0\.1:{first.port}"):
            StorageListener(ListenerConfig(tmp_path, port=first.port, timeout_s=TIMEOUT_S)).start()
