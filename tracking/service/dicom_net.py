"""DICOM networking (pynetdicom): a Storage SCP that receives planning data, a C-STORE SCU to an archive.

:class:`StorageListener` accepts C-STORE of the SOP classes it is given
(default: CT Image, RT Structure Set, RT Plan), in any of
:data:`TRANSFER_SYNTAXES` (uncompressed, deflated, RLE, JPEG Lossless,
JPEG-LS, JPEG 2000 lossless and lossy; decoded on import by pydicom with
python-gdcm), and answers C-ECHO (Verification). Who may talk to it:

- the called AE title must be ours (else A-ASSOCIATE-RJ, "called AE title
  not recognised");
- ``allowed_calling_aes`` (if not empty): only those calling AE titles (else
  A-ASSOCIATE-RJ, "calling AE title not recognised");
- ``allowed_hosts`` (if not empty): only connections from those IP
  addresses; any other is closed before the association is read.

Each instance is checked before it is written:

- duplicate SOP Instance UID (already stored in ``out_dir`` by this or an
  earlier run): a byte-identical resend is answered success and nothing is
  rewritten; different content under a known UID is refused with status
  ``0x0111`` (Duplicate SOP Instance) and the stored file is kept;
- patient identity: an instance whose Study Instance UID is known (stored
  before) under another (0010,0020) Patient ID is refused (``0xC000``);
  the plan loader also refuses an RTSTRUCT/RTPLAN of another patient than
  the CT;

and writes each instance,
byte for byte as received, to ``out_dir/<Study Instance UID>/<Series Instance
UID>/<Modality>_<SOP Instance UID>.dcm`` (written to a temporary name, then
renamed, so a reader never sees half a file). UIDs are checked before they
become path components: an instance whose UIDs are not valid DICOM UIDs, or
whose SOP class differs from the one negotiated, is refused with a failure
status and nothing is written.

:func:`send_to_archive` opens one association to the configured archive,
sends every object, releases, and raises if any object was not stored.

Threads: pynetdicom serves each association in its own thread; the
listener's handler only writes files and appends to a lock-protected list.
:meth:`StorageListener.stop` may be called from any thread.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from ..errors import DicomNetworkError

__all__ = [
    "DicomNetworkError",
    "PLANNING_SOP_CLASSES",
    "EXPORT_SOP_CLASSES",
    "ListenerConfig",
    "StorageListener",
    "ArchiveConfig",
    "StoreResult",
    "send_to_archive",
    "parse_archive",
    "TRANSFER_SYNTAXES",
    "VERIFICATION_SOP_CLASS",
]

log = logging.getLogger(__name__)

#: CT Image, RT Structure Set, RT Plan Storage.
PLANNING_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.5",
)
#: Spatial Registration and RT Image Storage (what spineguide exports).
EXPORT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.1", "1.2.840.10008.5.1.4.1.1.481.1")

#: Verification SOP Class (C-ECHO).
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: Transfer syntaxes the listener accepts for storage, in order of preference.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired, still sent by old systems)
    "1.2.840.10008.1.2.5",     # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (process 14, SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)

_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")

_STATUS_SUCCESS = 0x0000
_STATUS_DUPLICATE = 0x0111  # a different instance under a SOP Instance UID already stored
_STATUS_CANNOT_UNDERSTAND = 0xC000  # refused: bad UIDs
_STATUS_SOP_MISMATCH = 0xA900  # dataset does not match the SOP class
_STATUS_OUT_OF_RESOURCES = 0xA700  # cannot write the file


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _is_uid(text: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters (safe as a file name)."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def _ae_title(value: str, what: str) -> str:
    text = str(value)
    if not 1 <= len(text.strip()) <= 16 or not text.isascii() or "\\" in text or any(ord(ch) < 32 for ch in text):
        raise DicomNetworkError(f"{what} {value!r} is not a valid AE title (1-16 ASCII characters, no backslash)")
    return text.strip()


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise DicomNetworkError(f"{what} must be an integer port 0..65535, got {value!r}")
    return value


def _timeout(value: float, what: str) -> float:
    if not (isinstance(value, (int, float)) and 0 < float(value) < float("inf")):
        raise DicomNetworkError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """Storage SCP settings.

    Attributes
    ----------
    out_dir : Path
        Received instances go under ``out_dir/<study>/<series>/``.
    ae_title : str
        Our AE title (1-16 characters).
    port : int
        TCP port; 0 picks a free one (see :attr:`StorageListener.port`).
    host : str
        Address to bind; default loopback only.
    sop_classes : tuple of str
        SOP Class UIDs accepted.
    timeout_s : float
        ACSE, DIMSE and network timeouts, seconds.
    allowed_calling_aes : tuple of str
        Calling AE titles allowed to associate; empty: any.
    allowed_hosts : tuple of str
        IP addresses allowed to connect; empty: any.
    """

    out_dir: Path
    ae_title: str = "SPINEGUIDE"
    port: int = 11112
    host: str = "127.0.0.1"
    sop_classes: tuple[str, ...] = PLANNING_SOP_CLASSES
    timeout_s: float = 30.0
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        import ipaddress

        if isinstance(self.allowed_calling_aes, str) or isinstance(self.allowed_hosts, str):
            raise DicomNetworkError("allowed_calling_aes and allowed_hosts must be lists, not one string")
        object.__setattr__(self, "allowed_calling_aes",
                           tuple(_ae_title(a, "allowed calling AE title") for a in self.allowed_calling_aes))
        hosts = []
        for h in self.allowed_hosts:
            try:
                hosts.append(str(ipaddress.ip_address(str(h).strip())))
            except ValueError:
                raise DicomNetworkError(f"allowed host {h!r} is not an IP address") from None
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "ae_title", _ae_title(self.ae_title, "listener AE title"))
        _port(self.port, "listener port")
        _timeout(self.timeout_s, "listener timeout_s")
        classes = tuple(str(u) for u in self.sop_classes)
        bad = [u for u in classes if not _is_uid(u)]
        if not classes or bad:
            raise DicomNetworkError(f"listener SOP classes must be valid UIDs, got {list(self.sop_classes)!r}")
        object.__setattr__(self, "sop_classes", classes)


class StorageListener:
    """A DICOM Storage SCP writing what it receives into a folder (see module docstring).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._received: list[Path] = []
        self._refused: list[str] = []
        self._server = None
        self._known: dict[str, Path] = {}       # SOP Instance UID -> stored file
        self._patients: dict[str, str] = {}     # Study Instance UID -> Patient ID
        ae = AE(ae_title=config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for 0.5 MB CT slices
        ae.require_called_aet = True
        ae.require_calling_aet = list(config.allowed_calling_aes)
        for uid in config.sop_classes:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        self._ae = ae

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "StorageListener":
        """Bind and serve in background threads; raises :class:`DicomNetworkError` if the port is taken."""
        if self._server is not None:
            raise DicomNetworkError(f"listener {self.config.ae_title} is already running on port {self.port}")
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        self._index_stored()
        try:
            self._server = self._ae.start_server(
                (self.config.host, self.config.port), block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)],
            )
        except OSError as err:
            raise DicomNetworkError(
                f"listener {self.config.ae_title}: cannot listen on {self.config.host}:{self.config.port}: {err}"
            ) from err
        if self.config.allowed_hosts:
            allowed = set(self.config.allowed_hosts)

            def verify_request(request, client_address, _allowed=allowed) -> bool:
                ok = str(client_address[0]) in _allowed
                if not ok:
                    self._refuse(f"connection from {client_address[0]} refused (not in allowed_hosts)", 0)
                return ok

            self._server.verify_request = verify_request  # socketserver's hook: False closes the connection
        log.info("DICOM listener %s on %s:%d -> %s", self.config.ae_title, self.config.host, self.port, self.config.out_dir)
        return self

    def _index_stored(self) -> None:
        """SOP Instance UIDs already stored under ``out_dir`` (from the ``<Modality>_<UID>.dcm`` names)."""
        for path in self.config.out_dir.glob("*/*/*.dcm"):
            _, _, uid = path.stem.partition("_")
            if _is_uid(uid):
                self._known.setdefault(uid, path)

    def stop(self) -> None:
        """Stop serving and close the port (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "StorageListener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when the configuration asked for 0)."""
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    @property
    def received(self) -> tuple[Path, ...]:
        """Files written so far, in arrival order."""
        with self._lock:
            return tuple(self._received)

    @property
    def refused(self) -> tuple[str, ...]:
        """One line per refused instance (why)."""
        with self._lock:
            return tuple(self._refused)

    # -------------------------------------------------------------------- handler
    def _refuse(self, reason: str, status: int) -> int:
        log.warning("DICOM listener refused an instance: %s", reason)
        with self._lock:
            self._refused.append(reason)
        return status

    def _host_allowed(self, event) -> bool:
        return not self.config.allowed_hosts or str(event.assoc.requestor.address) in self.config.allowed_hosts

    def _on_echo(self, event) -> int:
        if not self._host_allowed(event):
            return self._refuse(f"C-ECHO from {event.assoc.requestor.address} refused (not in allowed_hosts)",
                                _STATUS_CANNOT_UNDERSTAND)
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return _STATUS_SUCCESS

    def _patient_of_study(self, study_uid: str) -> str | None:
        """The Patient ID stored for a study (this run, or a file of an earlier run), or None if unknown."""
        with self._lock:
            if study_uid in self._patients:
                return self._patients[study_uid]
        for path in (self.config.out_dir / study_uid).glob("*/*.dcm"):
            try:
                pid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", ""))
            except Exception:  # noqa: BLE001 - an unreadable stored file says nothing about identity
                continue
            with self._lock:
                self._patients.setdefault(study_uid, pid)
                return self._patients[study_uid]
        return None

    def _on_store(self, event) -> int:
        if not self._host_allowed(event):
            return self._refuse(f"C-STORE from {event.assoc.requestor.address} refused (not in allowed_hosts)",
                                _STATUS_CANNOT_UNDERSTAND)
        try:
            ds = event.dataset
            sop_class = str(ds.get("SOPClassUID", ""))
            uids = {k: str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        except Exception as err:  # a malformed dataset must not take the association down
            return self._refuse(f"cannot decode dataset: {type(err).__name__}: {err}", _STATUS_CANNOT_UNDERSTAND)
        bad = {k: v for k, v in uids.items() if not _is_uid(v)}
        if bad:
            return self._refuse(f"invalid UIDs {bad}", _STATUS_CANNOT_UNDERSTAND)
        negotiated = str(event.context.abstract_syntax)
        if sop_class != negotiated:
            return self._refuse(
                f"SOP instance {uids['SOPInstanceUID']}: SOP Class {sop_class} does not match the negotiated {negotiated}",
                _STATUS_SOP_MISMATCH,
            )
        try:
            patient_id = str(ds.get("PatientID", ""))
        except Exception as err:  # noqa: BLE001 - as above
            return self._refuse(f"cannot decode Patient ID: {type(err).__name__}: {err}", _STATUS_CANNOT_UNDERSTAND)
        sop_uid = uids["SOPInstanceUID"]
        known_patient = self._patient_of_study(uids["StudyInstanceUID"])
        if known_patient is not None and known_patient != patient_id:
            return self._refuse(
                f"SOP instance {sop_uid}: Patient ID {patient_id!r} differs from {known_patient!r} stored for study "
                f"{uids['StudyInstanceUID']}", _STATUS_CANNOT_UNDERSTAND,
            )
        modality = "".join(ch for ch in str(ds.get("Modality", "OT")) if ch.isalnum()) or "OT"
        folder = self.config.out_dir / uids["StudyInstanceUID"] / uids["SeriesInstanceUID"]
        path = folder / f"{modality}_{sop_uid}.dcm"
        data = event.encoded_dataset()
        with self._lock:
            stored = self._known.get(sop_uid)
            if stored is None:
                self._known[sop_uid] = path  # claimed: a concurrent resend of the same UID sees it as stored
        if stored is not None:
            try:
                same = stored.read_bytes() == data
            except OSError:
                same = False
            if same:
                log.info("SOP instance %s resent unchanged; kept %s", sop_uid, stored)
                return _STATUS_SUCCESS
            return self._refuse(
                f"SOP instance {sop_uid}: a different instance under this UID is already stored ({stored}); "
                "kept the stored one", _STATUS_DUPLICATE,
            )
        tmp = path.with_suffix(".part")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:
            with self._lock:
                self._known.pop(sop_uid, None)
            return self._refuse(f"cannot write {path}: {err}", _STATUS_OUT_OF_RESOURCES)
        with self._lock:
            self._received.append(path)
            self._patients.setdefault(uids["StudyInstanceUID"], patient_id)
        log.info("received %s from %s", path.name, event.assoc.requestor.ae_title)
        return _STATUS_SUCCESS


# ------------------------------------------------------------------------------- SCU
@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Where exported objects go (C-STORE SCP of the record-and-verify system or PACS).

    Attributes
    ----------
    host : str
    port : int
    ae_title : str
        The archive's (called) AE title.
    calling_ae_title : str
        Ours.
    timeout_s : float
        ACSE, DIMSE and network timeouts, seconds.
    """

    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "SPINEGUIDE"
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not str(self.host).strip():
            raise DicomNetworkError("archive host must not be empty")
        _port(self.port, "archive port")
        object.__setattr__(self, "ae_title", _ae_title(self.ae_title, "archive AE title"))
        object.__setattr__(self, "calling_ae_title", _ae_title(self.calling_ae_title, "calling AE title"))
        _timeout(self.timeout_s, "archive timeout_s")

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StoreResult:
    """Outcome of one C-STORE: the instance, the DIMSE status (0 = success)."""

    sop_instance_uid: str
    sop_class_uid: str
    status: int


def _load(item: Dataset | str | os.PathLike) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return pydicom.dcmread(item)
    except Exception as err:  # pydicom raises many types for a bad file
        raise DicomNetworkError(f"{item}: cannot read DICOM file to send: {type(err).__name__}: {err}") from err


def send_to_archive(objects: Iterable[Dataset | str | os.PathLike], archive: ArchiveConfig) -> tuple[StoreResult, ...]:
    """C-STORE every object (datasets or files) to the archive over one association.

    Returns
    -------
    tuple of StoreResult
        One per object, all with status 0.

    Raises
    ------
    DicomNetworkError
        Association rejected, aborted or timed out; or any object not stored
        (the message lists each failure and its status).
    """
    datasets = [_load(o) for o in objects]
    if not datasets:
        raise DicomNetworkError(f"nothing to send to {archive.describe()}")
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    # One context per SOP class with the uncompressed syntaxes, plus one per (class, compressed syntax) of the
    # files being sent, so a compressed instance travels as it is stored (never silently transcoded).
    encoded = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets
                      if "TransferSyntaxUID" in getattr(ds, "file_meta", {})
                      and str(ds.file_meta.TransferSyntaxUID) not in _UNCOMPRESSED})
    if len(classes) + len(encoded) > 128:
        raise DicomNetworkError(f"{len(classes) + len(encoded)} presentation contexts (SOP classes and compressed "
                                "transfer syntaxes) in one transfer; at most 128 per association")
    try:  # a plain TCP check first: names the peer and the OS error, and pynetdicom leaks no socket
        socket.create_connection((archive.host, archive.port), timeout=archive.timeout_s).close()
    except OSError as err:
        raise DicomNetworkError(f"cannot connect to {archive.describe()}: {err}") from err
    ae = AE(ae_title=archive.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = archive.timeout_s
    for uid in classes:
        ae.add_requested_context(uid)
    for uid, syntax in encoded:
        ae.add_requested_context(uid, [syntax])
    assoc = ae.associate(archive.host, archive.port, ae_title=archive.ae_title)
    if not assoc.is_established:
        raise DicomNetworkError(f"association with {archive.describe()} was rejected or failed")
    results: list[StoreResult] = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as err:  # no accepted presentation context for this SOP class
                raise DicomNetworkError(
                    f"{archive.describe()}: cannot send {ds.SOPInstanceUID} (SOP Class {ds.SOPClassUID}): {err}"
                ) from err
            code = int(status.Status) if status is not None and "Status" in status else -1
            results.append(StoreResult(str(ds.SOPInstanceUID), str(ds.SOPClassUID), code))
            if code == -1:
                break  # no response: the association is gone
    finally:
        if assoc.is_established:
            assoc.release()
    failures = [r for r in results if r.status != _STATUS_SUCCESS]
    if failures or len(results) != len(datasets):
        lines = "; ".join(f"{r.sop_instance_uid}: status 0x{r.status & 0xFFFF:04X}" if r.status >= 0
                          else f"{r.sop_instance_uid}: no response" for r in failures)
        raise DicomNetworkError(
            f"{archive.describe()}: {len(datasets) - len(results) + len(failures)} of {len(datasets)} objects not stored"
            f" ({lines})"
        )
    log.info("stored %d objects at %s", len(results), archive.describe())
    return tuple(results)


def parse_archive(text: str):
    """``AE@HOST:PORT`` -> :class:`ArchiveConfig`."""
    ae, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    if (not at or not colon or not ae or not host or not (port.isascii() and port.isdigit())
            or len(port) > 5 or int(port) > 65535):
        raise DicomNetworkError(f"archive must be AE@HOST:PORT (port 0..65535), got {text!r}")
    return ArchiveConfig(host=host, port=int(port), ae_title=ae)
