"""The session record: an append-only, crash-safe JSON-lines log of everything the service did.

One JSON object per line, written, flushed and ``fsync``-ed one at a time
by a dedicated writer thread (so a slow disk never delays gating), in the
order the service produced them. Every record carries ``event``,
``t_unix_s`` (wall clock) and ``t_mono_s`` (monotonic clock of the service
process). Raw frames, when asked for, are written as ``.npy`` files into the
folder ``<record>.frames/`` beside it and named in the record.

A record is never appended to and nothing in it is ever overwritten: the
file and its frames folder are created exclusively (an existing one is an
error). The service gives every session its own record,
``<stem>-<UTC start>-<session><suffix>`` beside the configured path
(:meth:`SessionRecord.for_session`), and points the configured path (and
``<path>.frames``) at the newest one with a symbolic link, so a restarted
service starts a new record and leaves the earlier one as it was.

A killed process loses at most the records still queued for the writer
(normally none, at worst the frame in flight); :func:`read_record` accepts a
torn last line (the write that was interrupted) and refuses corruption
anywhere else.

Events (see docs/SERVICE.md): ``session`` (first line: session id, config,
versions), ``command``, ``state``, ``frame``, ``frame_fault``, ``epoch``,
``pair``, ``tick``, ``sent``, ``error``, ``closed``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from spineguide.calibration.foundation import json_default
from spineguide.calibration.jsonfile import parse_json_bytes

from ..errors import RecordError

__all__ = ["RecordError", "SessionRecord", "read_record", "frames_folder"]

log = logging.getLogger(__name__)

_STOP = object()


def frames_folder(path: Path) -> Path:
    """Folder holding a record's raw frames: ``session.jsonl`` -> ``session.jsonl.frames``."""
    return path.with_name(path.name + ".frames")


class SessionRecord:
    """Append-only JSON-lines session record.

    The file handle is owned by the writer thread; :meth:`write` may be
    called from any thread (it only enqueues). With ``path=None`` records are
    kept in memory only (``records``), for tests and benchmarks.

    Parameters
    ----------
    path : Path or None
        JSON-lines file, created here; it must not exist (a record is never
        appended to), nor its frames folder when ``raw_frames`` is set.
    raw_frames : bool
        Keep raw frame pixels as ``.npy`` beside the record.
    keep_in_memory : bool
        Also keep every record in :attr:`records` (default: only without a path).
    """

    def __init__(self, path: str | os.PathLike | None, raw_frames: bool = False,
                 keep_in_memory: bool | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.raw_frames = bool(raw_frames) and self.path is not None
        self.keep_in_memory = self.path is None if keep_in_memory is None else keep_in_memory
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fh = None
        self._failed: str | None = None
        self._frame_names: set[str] = set()
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self.raw_frames:
                    frames_folder(self.path).mkdir()
                self._fh = open(self.path, "xb")
            except FileExistsError as err:
                raise RecordError(f"{err.filename}: exists; a session record is never appended to or "
                                  "overwritten (start a new record)") from err
            except OSError as err:
                raise RecordError(f"{self.path}: cannot open the session record: {err.strerror}") from err
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ writing
    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Queue one record; returns it (with its clock stamps).

        ``t_unix_s``/``t_mono_s`` are taken now unless given (the service
        passes the clock values it decided with, so replay can reuse them).
        """
        rec = {"event": event}
        rec.setdefault("t_unix_s", fields.pop("t_unix_s", None) or time.time())
        rec.setdefault("t_mono_s", fields.pop("t_mono_s", None) or time.monotonic())
        rec.update(fields)
        if self.keep_in_memory:
            with self._lock:
                self.records.append(rec)
        if self._fh is not None:
            self._queue.put(rec)
        return rec

    @classmethod
    def for_session(cls, path: str | os.PathLike, session: str, start_unix_s: float, raw_frames: bool = False,
                    keep_in_memory: bool | None = None) -> SessionRecord:
        """A new record of one service session beside ``path``; ``path`` then points at it.

        The record is ``<stem>-<YYYYmmddTHHMMSSZ>-<session><suffix>`` (UTC
        start) in ``path``'s folder, with its own ``.frames`` folder. ``path``
        and ``<path>.frames`` become symbolic links to the newest session's
        record and frames (replaced atomically), so tools that read the
        configured path see the live session; earlier records are untouched.

        Raises
        ------
        RecordError
            ``path`` exists and is not a link (a record of an older version:
            move it away), the session id is not a plain name, or the files
            cannot be created.
        """
        link = Path(path)
        if not isinstance(session, str) or re.fullmatch(r"[0-9A-Za-z_-]{1,64}", session) is None:
            raise RecordError(f"{link}: session id must be 1-64 letters, digits, '-' or '_', got {session!r}")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start_unix_s))
        target = link.with_name(f"{link.stem}-{stamp}-{session}{link.suffix}")
        for p in (link, frames_folder(link)):
            if os.path.lexists(p) and not p.is_symlink():
                raise RecordError(f"{p}: exists and is not a link to the newest session; a record is never "
                                  "appended to or overwritten (move it away)")
        record = cls(target, raw_frames, keep_in_memory)
        try:
            _point(link, target)
            if record.raw_frames:
                _point(frames_folder(link), frames_folder(target))
            else:
                frames_folder(link).unlink(missing_ok=True)  # no frames in this session: none of another's
        except OSError as err:
            record.close()
            raise RecordError(f"{link}: cannot point it at the session record {target.name}: {err}") from err
        return record

    def save_frame(self, pair_id: int, imager: str, pixels: np.ndarray, epoch: int = 0) -> str | None:
        """Queue a raw frame's pixels for ``<record>.frames/``; returns its file name (or None if not kept).

        ``<pair_id:08d>_<imager>.npy`` in epoch 0, ``e<epoch>_<pair_id:08d>_<imager>.npy`` after a new
        pair numbering began; a name already used in this record gets ``.<k>`` added (never overwritten).
        """
        if not self.raw_frames:
            return None
        stem = f"{int(pair_id):08d}_{imager}" if epoch == 0 else f"e{int(epoch)}_{int(pair_id):08d}_{imager}"
        name, k = f"{stem}.npy", 1
        while name in self._frame_names:
            name, k = f"{stem}.{k}.npy", k + 1
        self._frame_names.add(name)
        self._queue.put(("npy", name, pixels))
        return name

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, tuple) and item[0] == "flush":
                item[1].set()
                continue
            if self._fh is None or self._failed:
                continue
            try:
                if isinstance(item, tuple):
                    _, name, pixels = item
                    with open(frames_folder(self.path) / name, "xb") as fh:
                        np.save(fh, pixels, allow_pickle=False)
                    continue
                line = json.dumps(item, allow_nan=False, separators=(",", ":"), default=json_default).encode() + b"\n"
                self._fh.write(line)
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except (OSError, ValueError, TypeError) as err:
                self._failed = f"{self.path}: writing the session record failed: {err}"
                log.error(self._failed)

    @property
    def failed(self) -> str | None:
        """Why writing stopped, or None while healthy (the service reports it in ``status``)."""
        return self._failed

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued record is on disk (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(("flush", done))
        if not done.wait(timeout_s):
            raise RecordError(f"{self.path}: the record writer did not catch up within {timeout_s} s")

    def close(self) -> None:
        """Write ``closed``, drain the queue and close the file."""
        self.write("closed")
        self._queue.put(_STOP)
        self._thread.join(timeout=10.0)
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _point(link: Path, target: Path) -> None:
    """Make ``link`` a symbolic link to ``target`` (relative, same folder), replacing an older link atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def read_record(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a session record; a torn final line (a write interrupted by a crash) is dropped.

    Raises
    ------
    RecordError
        Missing file, or a corrupt line that is not the last one.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise RecordError(f"{p}: cannot read the session record: {err.strerror}") from err
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = parse_json_bytes(line, f"line {i + 1}", RecordError)
        except RecordError as err:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes)", p, len(line))
                break
            raise RecordError(f"{p}: line {i + 1} is not valid JSON: {err}") from err
        if not isinstance(rec, dict) or "event" not in rec:
            raise RecordError(f"{p}: line {i + 1} is not a record (no 'event')")
        out.append(rec)
    return out
