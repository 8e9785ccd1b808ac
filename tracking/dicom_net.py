"""DICOM networking (pynetdicom): a Storage SCP that receives planning data, a C-STORE SCU to an archive.

:class:`StorageListener` accepts C-STORE of the SOP classes it is given
(default: CT Image, RT Structure Set, RT Plan) and writes each instance,
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

from .errors import DicomNetworkError

__all__ = [
    "DicomNetworkError",
    "PLANNING_SOP_CLASSES",
    "EXPORT_SOP_CLASSES",
    "ListenerConfig",
    "StorageListener",
    "ArchiveConfig",
    "StoreResult",
    "send_to_archive",
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

_STATUS_SUCCESS = 0x0000
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
    """

    out_dir: Path
    ae_title: str = "SPINEGUIDE"
    port: int = 11112
    host: str = "127.0.0.1"
    sop_classes: tuple[str, ...] = PLANNING_SOP_CLASSES
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
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
        ae = AE(ae_title=config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for 0.5 MB CT slices
        for uid in config.sop_classes:
            ae.add_supported_context(uid)
        self._ae = ae

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "StorageListener":
        """Bind and serve in background threads; raises :class:`DicomNetworkError` if the port is taken."""
        if self._server is not None:
            raise DicomNetworkError(f"listener {self.config.ae_title} is already running on port {self.port}")
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._server = self._ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as err:
            raise DicomNetworkError(
                f"listener {self.config.ae_title}: cannot listen on {self.config.host}:{self.config.port}: {err}"
            ) from err
        log.info("DICOM listener %s on %s:%d -> %s", self.config.ae_title, self.config.host, self.port, self.config.out_dir)
        return self

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

    def _on_store(self, event) -> int:
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
        modality = "".join(ch for ch in str(ds.get("Modality", "OT")) if ch.isalnum()) or "OT"
        folder = self.config.out_dir / uids["StudyInstanceUID"] / uids["SeriesInstanceUID"]
        path = folder / f"{modality}_{uids['SOPInstanceUID']}.dcm"
        tmp = path.with_suffix(".part")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(event.encoded_dataset())
            os.replace(tmp, path)
        except OSError as err:
            return self._refuse(f"cannot write {path}: {err}", _STATUS_OUT_OF_RESOURCES)
        with self._lock:
            self._received.append(path)
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
    if len(classes) > 128:
        raise DicomNetworkError(f"{len(classes)} SOP classes in one transfer; at most 128 per association")
    try:  # a plain TCP check first: names the peer and the OS error, and pynetdicom leaks no socket
        socket.create_connection((archive.host, archive.port), timeout=archive.timeout_s).close()
    except OSError as err:
        raise DicomNetworkError(f"cannot connect to {archive.describe()}: {err}") from err
    ae = AE(ae_title=archive.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = archive.timeout_s
    for uid in classes:
        ae.add_requested_context(uid)
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

