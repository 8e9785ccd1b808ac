"""The Storage SCP as an archive administrator sees it, tested with dcmtk's echoscu/storescu as the peers.

Called-AE check, allowed calling AE titles and hosts, C-ECHO, compressed transfer syntaxes (JPEG Lossless,
JPEG-LS, JPEG 2000, RLE: decoded on import to the very same HU), the duplicate-UID policy and the patient
identity check. What each refusal looks like is in docs/DICOM_CONFORMANCE.md.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from spineguide.registration.plan import PlanError, load_dicom_plan
from spineguide.tracking.service.dicom_net import ListenerConfig, StorageListener
from spineguide.tracking.room.dicom import write_dicom_plan
from tests.synthetic import small_thoracolumbar
from tests.tracking.test_dicom_net import need

# End-to-end (DICOM over the network with dcmtk peers): outside the development loop (-m "not slow"), run by CI.
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def planning(tmp_path_factory):
    return write_dicom_plan(small_thoracolumbar(), tmp_path_factory.mktemp("plan"))


def _run(args, timeout=120):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def _store(listener, files, *extra, aec="SGTEST", aet="TPS"):
    return _run([need("storescu"), "-aet", aet, "-aec", aec, "-to", "20", *extra, "127.0.0.1", listener.port,
                 *files])


def test_echo_answers_only_to_our_called_ae_title(tmp_path):
    echoscu = need("echoscu")
    with StorageListener(ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S)) as rx:
        ok = _run([echoscu, "-aet", "TPS", "-aec", "SGTEST", "-to", "20", "127.0.0.1", rx.port])
        assert ok.returncode == 0, ok.stderr
        wrong = _run([echoscu, "-aet", "TPS", "-aec", "NOTUS", "-to", "20", "127.0.0.1", rx.port])
    assert wrong.returncode != 0
    assert "called ae title not recognized" in (wrong.stdout + wrong.stderr).lower()


def test_storescu_with_a_wrong_called_or_calling_ae_title_is_rejected(planning, tmp_path):
    config = ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S,
                            allowed_calling_aes=("TPS", "PACS"))
    with StorageListener(config) as rx:
        wrong_called = _store(rx, [planning.rtplan], aec="OTHER")
        wrong_calling = _store(rx, [planning.rtplan], aet="INTRUDER")
        assert rx.received == ()
        right = _store(rx, [planning.rtplan], aet="PACS")
        received = rx.received
    assert wrong_called.returncode != 0 and "called ae title not recognized" in wrong_called.stderr.lower()
    assert wrong_calling.returncode != 0 and "calling ae title not recognized" in wrong_calling.stderr.lower()
    assert right.returncode == 0, right.stderr
    assert len(received) == 1 and pydicom.dcmread(received[0]).Modality == "RTPLAN"


def test_a_host_not_allowed_cannot_even_echo(tmp_path):
    echoscu = need("echoscu")
    config = ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S,
                            allowed_hosts=("192.0.2.10",))
    with StorageListener(config) as rx:
        out = _run([echoscu, "-aec", "SGTEST", "-to", "10", "127.0.0.1", rx.port])
        refused = rx.refused
    assert out.returncode != 0
    assert any("127.0.0.1" in r and "allowed_hosts" in r for r in refused)


def _compress(paths, out_dir, how):
    """Each file compressed by an independent encoder: dcmtk (JPEG Lossless SV1, JPEG-LS, RLE), GDCM (JPEG 2000)."""
    out_dir.mkdir()
    made = []
    for p in paths:
        dst = out_dir / p.name
        if how == "j2k":
            import gdcm

            reader = gdcm.ImageReader()
            reader.SetFileName(str(p))
            assert reader.Read()
            change = gdcm.ImageChangeTransferSyntax()
            change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000Lossless))
            change.SetInput(reader.GetImage())
            assert change.Change()
            writer = gdcm.ImageWriter()
            writer.SetFileName(str(dst))
            writer.SetFile(reader.GetFile())
            writer.SetImage(change.GetOutput())
            assert writer.Write()
        else:
            tool = {"jpeg": "dcmcjpeg", "jls": "dcmcjpls", "rle": "dcmcrle"}[how]
            done = _run([need(tool), p, dst])
            assert done.returncode == 0, done.stderr
        made.append(dst)
    return made


COMPRESSED = {  # encoder -> (storescu proposal, transfer syntax UID it must arrive in)
    "jpeg": ("-xs", "1.2.840.10008.1.2.4.70"),
    "jls": ("-xt", "1.2.840.10008.1.2.4.80"),
    "j2k": ("-xv", "1.2.840.10008.1.2.4.90"),
    "rle": ("-xr", "1.2.840.10008.1.2.5"),
}


def test_compressed_ct_arrives_compressed_and_imports_to_the_same_hu(planning, tmp_path):
    pytest.importorskip("gdcm", reason="python-gdcm (a dependency) decodes compressed CT")
    ct = list(planning.ct_files)
    parts = np.array_split(np.arange(len(ct)), len(COMPRESSED))
    with StorageListener(ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S)) as rx:
        for (how, (flag, _)), idx in zip(COMPRESSED.items(), parts):
            files = _compress([ct[i] for i in idx], tmp_path / how, how)
            out = _store(rx, files, flag)
            assert out.returncode == 0, (how, out.stderr)
        out = _store(rx, [planning.rtstruct, planning.rtplan])
        assert out.returncode == 0, out.stderr
        received, refused = rx.received, rx.refused
    assert refused == () and len(received) == len(ct) + 2
    syntaxes = {}
    for p in received:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        syntaxes.setdefault(str(ds.file_meta.TransferSyntaxUID), []).append(p)
    for how, (_, uid) in COMPRESSED.items():
        assert len(syntaxes.get(uid, [])) > 0, f"{how}: nothing arrived as {uid} (stored as {sorted(syntaxes)})"
    original, got = load_dicom_plan(planning.out_dir), load_dicom_plan(tmp_path / "rx")
    np.testing.assert_array_equal(got.ct.hu, original.ct.hu)  # lossless: the same stored values, the same HU


def test_duplicate_uid_identical_resend_is_accepted_a_different_one_refused(planning, tmp_path):
    changed = tmp_path / "RP_changed.dcm"
    ds = pydicom.dcmread(planning.rtplan)
    ds.RTPlanLabel = "CHANGED"
    ds.save_as(changed, enforce_file_format=True)
    with StorageListener(ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S)) as rx:
        assert _store(rx, [planning.rtplan]).returncode == 0
        (stored,) = rx.received
        before = stored.read_bytes()
        assert _store(rx, [planning.rtplan]).returncode == 0  # resent unchanged: fine, nothing rewritten
        _store(rx, [changed])
        refused = rx.refused
    assert stored.read_bytes() == before and pydicom.dcmread(stored).RTPlanLabel != "CHANGED"
    assert len(refused) == 1 and "a different instance under this UID is already stored" in refused[0]
    # A new listener on the same folder knows what is stored (from the file names).
    with StorageListener(ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S)) as rx:
        _store(rx, [changed])
        assert len(rx.refused) == 1 and rx.received == ()


def test_an_instance_of_another_patient_in_the_study_is_refused(planning, tmp_path):
    other = tmp_path / "RP_other.dcm"
    ds = pydicom.dcmread(planning.rtplan)
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(other, enforce_file_format=True)
    with StorageListener(ListenerConfig(tmp_path / "rx", ae_title="SGTEST", port=0, timeout_s=TIMEOUT_S)) as rx:
        assert _store(rx, [*planning.ct_files[:3], planning.rtstruct]).returncode == 0
        _store(rx, [other])
        refused, received = rx.refused, rx.received
    assert len(received) == 4 and len(refused) == 1
    assert "Patient ID 'SOMEONE-ELSE' differs from" in refused[0]
    # And where such a file reaches a plan folder by other means, the plan loader refuses it.
    d = tmp_path / "folder"
    shutil.copytree(planning.out_dir, d)
    shutil.copy(other, d / "RP.dcm")
    with pytest.raises(PlanError, match="RTPLAN is for patient ID 'SOMEONE-ELSE', but the CT is for patient ID"):
        load_dicom_plan(d)


def test_our_scu_sends_compressed_files_as_they_are_to_dcmtk(planning, tmp_path):
    """dicom-send of compressed CT: proposed in its own syntax, stored unchanged by dcmtk's storescp (+xa)."""
    import socket
    import time

    from spineguide.tracking.service.dicom_net import ArchiveConfig, send_to_archive
    from tests.tracking.test_dicom_net import free_port

    files = _compress(list(planning.ct_files[:2]), tmp_path / "jls", "jls") + \
        _compress(list(planning.ct_files[2:4]), tmp_path / "rle", "rle") + [planning.ct_files[4]]
    storescp = need("storescp")
    port = free_port()
    (tmp_path / "dcmtk").mkdir()
    proc = subprocess.Popen([storescp, "+xa", "-od", str(tmp_path / "dcmtk"), "-aet", "ARCHIVE", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("storescp did not start listening")
                time.sleep(0.05)
        results = send_to_archive(files, ArchiveConfig("127.0.0.1", port, "ARCHIVE", timeout_s=TIMEOUT_S))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [r.status for r in results] == [0] * 5
    stored = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in (tmp_path / "dcmtk").iterdir()}
    for f in files:
        sent = pydicom.dcmread(f)
        got = stored[sent.SOPInstanceUID]
        if f != planning.ct_files[4]:  # the uncompressed one may travel in any uncompressed syntax storescp prefers
            assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        np.testing.assert_array_equal(got.pixel_array, sent.pixel_array)
