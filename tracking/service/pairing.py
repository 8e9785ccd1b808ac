"""Stereo frame pairing with imager sessions and pair-id epochs: a small pure class (no sockets, no clock).

The I/O thread of the service offers every decoded ``kvframe/1`` to a
:class:`FramePairer` with the monotonic time it arrived and acts on the
events it returns, in order:

- :class:`NewEpoch`: the pair numbering starts afresh (the imaging system
  restarted, or ``pair_id`` jumped by more than ``max_pair_id_jump`` either
  way). Every partial pair is forgotten and the engine opens a new epoch
  (HOLD ``imager_restarted`` / ``pair_id_jump``); the frame that caused it is
  then judged normally, so a restart or a bogus ``pair_id`` never locks the
  service out.
- :class:`FrameAccepted`: the frame takes part in pairing (record it).
- :class:`PairFault`: HOLD with a reason (unknown imager, a late frame of
  a completed pair, an imager twice in one pair, a partner that never came).
- :class:`CompletePair`: both imagers' frames of one ``pair_id`` are here --
  or, with one-view monitoring (``allow_partial``), one imager's frame whose
  partner did not come within ``pair_timeout_s`` (``missing`` names the
  other). The silent imager is then *absent*: later pairs complete as soon
  as the present imager's frame is here, without waiting, until the absent
  imager sends again (stereo returns with its next frame). Its frame of a
  pair already completed without it is :class:`ViewReturned` (logged, no
  HOLD: that pair was judged on one view).

An imager restart is recognised by a new sender ``session`` (``kvframe/1.1``)
or, for ``kvframe/1`` senders that have none, by the sender's ``seq`` going
back. A ``pair_id`` not newer than the last completed pair is refused as
``stale_frame`` unless one of these (or a jump beyond the bound) says that a
new numbering began. See docs/PROTOCOL.md, "Sessions and epochs".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TrackingError
from ..frames import KvFrame
from .gating import HoldReason

__all__ = ["MAX_PAIR_ID_JUMP", "NewEpoch", "FrameAccepted", "PairFault", "CompletePair", "ViewReturned", "FramePairer"]

#: A ``pair_id`` further than this from the last completed pair (either way) starts a new epoch.
#: At 10 Hz, 100 pairs are 10 s: a late frame is never that late, a sender is not that far ahead.
MAX_PAIR_ID_JUMP = 100


@dataclass(frozen=True, slots=True)
class NewEpoch:
    """The pair numbering starts afresh (``reason``: ``imager_restarted`` or ``pair_id_jump``)."""

    reason: HoldReason
    detail: str
    pair_id: int


@dataclass(frozen=True, slots=True)
class FrameAccepted:
    """The frame takes part in pairing (in epoch ``epoch``)."""

    frame: KvFrame
    seq: int
    epoch: int


@dataclass(frozen=True, slots=True)
class PairFault:
    """A frame-level refusal: HOLD ``reason``; ``pair_id`` the pair it concerns (None if unknown)."""

    reason: HoldReason
    detail: str
    pair_id: int | None


@dataclass(frozen=True, slots=True)
class CompletePair:
    """Every imager's frame of ``pair_id`` arrived (the last one at ``complete_mono_s``, monotonic s)."""

    pair_id: int
    frames: dict[str, KvFrame]
    epoch: int
    complete_mono_s: float
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ViewReturned:
    """An absent imager sent again, late for a pair already completed without it: stereo from the next pair."""

    imager: str
    pair_id: int
    detail: str


class FramePairer:
    """Pairs frames by ``pair_id`` within an epoch; see the module docstring.

    Parameters
    ----------
    imagers : iterable of str
        The plan's imager names; a pair is complete when each sent one frame.
    pair_timeout_s : float
        How long the first frame of a pair waits for its partners (monotonic s).
    max_pair_id_jump : int
        Largest ``|pair_id - last completed pair_id|`` within one epoch.
    allow_partial : bool
        One-view monitoring: a pair whose partner did not come in time completes
        with the frames it has (see the module docstring) instead of being
        refused as ``unpaired_frame``.

    Not thread-safe: owned by the I/O thread.
    """

    def __init__(self, imagers, pair_timeout_s: float, max_pair_id_jump: int = MAX_PAIR_ID_JUMP,
                 allow_partial: bool = False) -> None:
        self.imagers = frozenset(imagers)
        if not self.imagers:
            raise TrackingError("frame pairing needs at least one imager")
        if not (pair_timeout_s > 0):
            raise TrackingError(f"pair_timeout_s must be positive, got {pair_timeout_s!r}")
        if isinstance(max_pair_id_jump, bool) or not isinstance(max_pair_id_jump, int) or max_pair_id_jump < 1:
            raise TrackingError(f"max_pair_id_jump must be an integer >= 1, got {max_pair_id_jump!r}")
        self.pair_timeout_s = float(pair_timeout_s)
        self.max_pair_id_jump = max_pair_id_jump
        self.allow_partial = bool(allow_partial)
        #: Imagers that missed their last pair (one-view mode): pairs complete without waiting for them.
        self.absent: set[str] = set()
        self.epoch = 0
        self.newest_done: int | None = None
        self._pending: dict[int, tuple[float, dict[str, KvFrame]]] = {}
        self._sessions: dict[str, str] = {}
        self._last_seq: dict[str, int] = {}

    # ------------------------------------------------------------------ inputs
    def offer(self, frame: KvFrame, seq: int, session: str | None, now_mono_s: float) -> list:
        """One decoded frame (sender ``seq`` and ``session``, None for ``kvframe/1``); returns the events."""
        pid = frame.pair_id
        imager = frame.imager
        if imager not in self.imagers:
            return [PairFault(HoldReason.CORRUPT_FRAME, f"kvframe seq {seq}: unknown imager {imager!r} "
                              f"(plan has {sorted(self.imagers)})", pid)]
        events: list = []
        restart = self._restart(imager, seq, session)
        if restart is not None:
            events.append(self._new_epoch(HoldReason.IMAGER_RESTARTED, restart, pid))
        elif self.newest_done is not None and abs(pid - self.newest_done) > self.max_pair_id_jump:
            events.append(self._new_epoch(
                HoldReason.PAIR_ID_JUMP, f"imager {imager!r} pair {pid} after pair {self.newest_done} "
                f"(more than {self.max_pair_id_jump} apart): a new pair numbering", pid))
        if session is not None:
            self._sessions[imager] = session
        self._last_seq[imager] = seq
        returning = imager in self.absent
        self.absent.discard(imager)
        if self.newest_done is not None and pid <= self.newest_done:
            if returning and pid == self.newest_done:
                events.append(ViewReturned(imager, pid, f"imager {imager!r} is back (its pair {pid} was judged on "
                                                        "one view); stereo from the next pair"))
                return events
            events.append(PairFault(HoldReason.STALE_FRAME, f"imager {imager!r} pair {pid} arrived after pair "
                                    f"{self.newest_done} was complete", pid))
            return events
        _, got = self._pending.setdefault(pid, (now_mono_s, {}))
        if imager in got:
            del self._pending[pid]
            events.append(PairFault(HoldReason.CORRUPT_FRAME, f"pair {pid}: imager {imager!r} sent twice", pid))
            return events
        events.append(FrameAccepted(frame, seq, self.epoch))
        got[imager] = frame
        if len(got) < len(self.imagers - self.absent):
            return events
        del self._pending[pid]
        for older in sorted(p for p in self._pending if p < pid):
            _, partial = self._pending.pop(older)
            events.append(PairFault(HoldReason.UNPAIRED_FRAME, f"pair {older}: only imager(s) {sorted(partial)} "
                                    f"before pair {pid} was complete", older))
        self.newest_done = pid
        events.append(CompletePair(pid, got, self.epoch, now_mono_s, tuple(sorted(self.imagers - set(got)))))
        return events

    def expire(self, now_mono_s: float) -> list:
        """Every pair whose partner did not come within ``pair_timeout_s``: ``unpaired_frame``, or with
        ``allow_partial`` a :class:`CompletePair` of the frames it has (the silent imager becomes absent).

        A partial pair older than one already completed is always ``unpaired_frame`` (too late to judge).
        """
        out: list = []
        for pid in sorted(p for p, (t, _) in self._pending.items() if now_mono_s - t > self.pair_timeout_s):
            _, got = self._pending.pop(pid)
            if self.allow_partial and (self.newest_done is None or pid > self.newest_done):
                missing = tuple(sorted(self.imagers - set(got)))
                # The imagers that sent this pair are present (whatever an older pair said); the others absent.
                self.absent = (self.absent - set(got)) | set(missing)
                self.newest_done = pid
                out.append(CompletePair(pid, got, self.epoch, now_mono_s, missing))
                continue
            out.append(PairFault(HoldReason.UNPAIRED_FRAME, f"pair {pid}: only imager(s) {sorted(got)} within "
                                 f"{self.pair_timeout_s * 1e3:.0f} ms", pid))
        return out

    def next_expiry_mono_s(self) -> float | None:
        """When :meth:`expire` next has something to do (monotonic s), or None."""
        if not self._pending:
            return None
        return min(t for t, _ in self._pending.values()) + self.pair_timeout_s

    # ----------------------------------------------------------------- helpers
    def _restart(self, imager: str, seq: int, session: str | None) -> str | None:
        if session is not None:
            known = self._sessions.get(imager)
            if known is not None and known != session:
                return f"imager {imager!r}: sender session changed from {known} to {session}"
            return None
        last = self._last_seq.get(imager)
        if last is not None and seq <= last:
            return f"imager {imager!r}: sender seq went back from {last} to {seq} (sender restarted)"
        return None

    def _new_epoch(self, reason: HoldReason, detail: str, pair_id: int) -> NewEpoch:
        dropped = sorted(self._pending)
        if dropped:
            detail = f"{detail}; partial pair(s) {dropped[:5]}{'...' if len(dropped) > 5 else ''} dropped"
        self.epoch += 1
        self.newest_done = None
        self.absent.clear()
        self._pending.clear()
        self._sessions.clear()
        self._last_seq.clear()
        return NewEpoch(reason, detail, pair_id)
