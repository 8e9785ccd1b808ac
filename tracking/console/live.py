"""The console's live state: what the service published, folded into what the page shows.

:class:`LiveState` takes decoded ``correction/1``, ``gating/1`` and
``heartbeat/1`` bodies and ``reply/1`` bodies (with the console's receive
time) and keeps the latest of each, the deviation timeline, every HOLD
with its reason, heartbeat health and message age. It owns no socket and
no clock: every method is given the times, so tests drive it with known
values. One thread (the console's event loop) uses it.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .reasons import describe_reason

__all__ = ["HoldEntry", "LiveState"]

#: Heartbeat rate is estimated over this window, s.
HEARTBEAT_WINDOW_S = 2.0
#: Message ages kept for the age percentiles shown on the page.
AGE_SAMPLES = 200


@dataclass
class HoldEntry:
    """A run of consecutive ``gating/1`` HOLDs with one reason (the page lists every run)."""

    reason: str
    first_unix_s: float
    last_unix_s: float
    count: int
    pair_id: int | None
    deviation_mm: float | None

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "first_unix_s": self.first_unix_s, "last_unix_s": self.last_unix_s,
                "count": self.count, "pair_id": self.pair_id, "deviation_mm": self.deviation_mm}


class LiveState:
    """Latest service state for the page (one thread only).

    Parameters
    ----------
    timeline_s : float
        Deviation timeline kept, s (older points are dropped).
    tolerance_3d_mm : float or None
        Gating tolerance until a ``reply/1`` reports the service's current one.
    max_holds : int
        HOLD runs kept (newest last).
    """

    def __init__(self, timeline_s: float = 300.0, tolerance_3d_mm: float | None = None, max_holds: int = 500) -> None:
        self.timeline_s = float(timeline_s)
        self.tolerance_3d_mm = tolerance_3d_mm
        self.tolerance_rotation_deg: float | None = None
        self.version = 0
        self.heartbeat: dict[str, Any] | None = None
        self.gating: dict[str, Any] | None = None
        self.correction: dict[str, Any] | None = None
        self.proposal: dict[str, Any] | None = None
        self.status: dict[str, Any] | None = None
        self.approval_seen: str | None = None  # "manual" once awaiting_approval is seen, "automatic" if skipped
        self.holds: collections.deque[HoldEntry] = collections.deque(maxlen=max_holds)
        # Safety holds on their own: routine ones (setup, pause, settling) never push them out of sight.
        self.safety_holds: collections.deque[HoldEntry] = collections.deque(maxlen=max_holds)
        # (index, t_unix_s, deviation_mm or None, beam, reason); index increases by one per point
        self.timeline: collections.deque[tuple[int, float, float | None, str, str]] = collections.deque()
        self._next_index = 0
        self._beats: collections.deque[float] = collections.deque()
        self.ages_ms: collections.deque[float] = collections.deque(maxlen=AGE_SAMPLES)
        self._age_stats: dict[str, float] | None = None  # cached until the next age arrives
        self.last_seq: int | None = None
        self.lost_messages = 0
        self.messages = 0
        self._last_phase: str | None = None

    # ------------------------------------------------------------------ input
    def on_message(self, topic: str, body: dict[str, Any], received_unix_s: float, received_mono_s: float) -> None:
        """Fold one published message in (``topic`` is its PUB topic; unknown topics are ignored)."""
        seq = body.get("seq")
        if isinstance(seq, int):
            if self.last_seq is not None and seq > self.last_seq + 1:
                self.lost_messages += seq - self.last_seq - 1  # the service numbers all PUB messages with one counter
            self.last_seq = seq
        self.messages += 1
        t = body.get("t_unix_s")
        if topic == "heartbeat":
            self.heartbeat = dict(body, received_unix_s=received_unix_s)
            self._beats.append(received_mono_s)
            while self._beats and self._beats[0] < received_mono_s - HEARTBEAT_WINDOW_S:
                self._beats.popleft()
            phase = body.get("phase")
            if phase != self._last_phase:
                if phase == "awaiting_approval":
                    self.approval_seen = "manual"
                elif phase == "awaiting_couch" and self._last_phase == "measuring":
                    self.approval_seen = "automatic"
                if phase in (None, "measuring"):
                    self.proposal = None
                self._last_phase = phase
        elif topic == "gating":
            self.gating = dict(body, received_unix_s=received_unix_s)
            if isinstance(t, (int, float)):
                self.ages_ms.append((received_unix_s - t) * 1e3)
                self._age_stats = None
                self._add_point(float(t), body.get("deviation_mm"), body.get("beam", "?"), body.get("reason", "?"))
                if body.get("beam") == "HOLD":
                    self._add_hold(body, float(t))
        elif topic == "correction":
            self.correction = dict(body, received_unix_s=received_unix_s)
            purpose = body.get("purpose")
            if purpose == "proposal":
                self.proposal = dict(body)
            elif purpose in ("setup", "verified"):
                self.proposal = None
        else:
            return
        self.version += 1

    def on_reply(self, reply: dict[str, Any]) -> None:
        """Fold a ``reply/1`` in: tolerances, pending correction (as the proposal if none was seen), counters."""
        self.status = dict(reply)
        pending = reply.get("pending_correction")
        if reply.get("phase") == "awaiting_approval" and isinstance(pending, dict) and self.proposal is None:
            # The proposal's correction/1 went out before this console subscribed (PUB keeps nothing).
            self.proposal = dict(pending, purpose="proposal")
            t = pending.get("proposed_unix_s")  # the reply's pending correction says when it was proposed
            if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
                self.proposal["t_unix_s"] = float(t)
        for key in ("tolerance_3d_mm", "tolerance_rotation_deg"):
            value = reply.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                setattr(self, key, float(value))
        self.version += 1

    def _add_point(self, t_unix_s: float, deviation_mm, beam: str, reason: str) -> None:
        dev = float(deviation_mm) if isinstance(deviation_mm, (int, float)) and math.isfinite(deviation_mm) else None
        self.timeline.append((self._next_index, t_unix_s, dev, beam, reason))
        self._next_index += 1
        while self.timeline and self.timeline[0][1] < t_unix_s - self.timeline_s:
            self.timeline.popleft()

    def _add_hold(self, body: dict[str, Any], t_unix_s: float) -> None:
        reason = str(body.get("reason", "?"))
        dev = body.get("deviation_mm")
        last = self.holds[-1] if self.holds else None
        previous_beam = None
        if len(self.timeline) >= 2:
            previous_beam = self.timeline[-2][3]
        if last is not None and last.reason == reason and previous_beam == "HOLD":
            last.last_unix_s = t_unix_s
            last.count += 1
            last.pair_id = body.get("pair_id", last.pair_id)
            last.deviation_mm = dev if dev is not None else last.deviation_mm
        else:
            entry = HoldEntry(reason, t_unix_s, t_unix_s, 1, body.get("pair_id"), dev)
            self.holds.append(entry)
            if describe_reason(reason).category != "routine":
                self.safety_holds.append(entry)

    # ------------------------------------------------------------------ output
    def needs_status(self) -> bool:
        """True when the service awaits approval of a proposal this console never received."""
        return bool(self.heartbeat and self.heartbeat.get("phase") == "awaiting_approval" and self.proposal is None)

    def heartbeat_rate_hz(self, now_mono_s: float) -> float:
        """Heartbeats received per second over the last :data:`HEARTBEAT_WINDOW_S` seconds."""
        n = sum(1 for t in self._beats if t >= now_mono_s - HEARTBEAT_WINDOW_S)
        return n / HEARTBEAT_WINDOW_S

    def snapshot(self, now_mono_s: float, timeline_from: int = 0) -> tuple[dict[str, Any], int]:
        """The page's state as JSON-able dict, with timeline points of index >= ``timeline_from``.

        Returns ``(state, next_timeline_from)``; a client passes the second value back next time,
        so each push carries only the new points (a slow client skips none: points are few and small).
        """
        # Only the new points, walked from the newest end (indices increase along the deque): a push costs what
        # it sends, not the whole timeline (3000 points at 10 Hz over 300 s, 20 pushes a second).
        points = []
        for i, t, d, b, r in reversed(self.timeline):
            if i < timeline_from:
                break
            points.append([t, d, b, r])
        points.reverse()
        if self._age_stats is None and self.ages_ms:
            ages = np.asarray(self.ages_ms, dtype=np.float64)
            p50, p95 = np.percentile(ages, [50, 95])
            self._age_stats = {"last": float(ages[-1]), "p50": float(p50), "p95": float(p95)}
        state = {
            "type": "state",
            "version": self.version,
            "heartbeat": self.heartbeat,
            "heartbeat_rate_hz": self.heartbeat_rate_hz(now_mono_s),
            "gating": self.gating,
            "correction": _without_seeds(self.correction),
            "proposal": _without_seeds(self.proposal),
            "status": self.status,
            "tolerance_3d_mm": self.tolerance_3d_mm,
            "tolerance_rotation_deg": self.tolerance_rotation_deg,
            "approval_seen": self.approval_seen,
            "holds": [h.to_json() for h in list(self.holds)[-50:]],
            "safety_holds": [h.to_json() for h in list(self.safety_holds)[-50:]],
            "routine_holds": [h.to_json() for h in list(self.holds)[-50:]
                              if describe_reason(h.reason).category == "routine"][-10:],
            "hold_runs": len(self.holds),
            "timeline": points,
            "timeline_reset": timeline_from == 0,
            "timeline_span_s": self.timeline_s,
            "message_age_ms": None if not self.ages_ms else dict(self._age_stats),
            "lost_messages": self.lost_messages,
            "messages": self.messages,
        }
        return state, self._next_index


def _without_seeds(correction: dict[str, Any] | None) -> dict[str, Any] | None:
    """A correction for the page: the per-seed details are drawn on the frames, the rest is listed."""
    if correction is None:
        return None
    out = dict(correction)
    quality = dict(out.get("quality") or {})
    seeds = quality.pop("seeds", None)
    if seeds is not None:
        quality["seeds_found"] = sum(1 for s in seeds if s.get("found"))
        quality["seeds_planned"] = len(seeds)
        quality["seeds_migrated"] = [s.get("name") for s in seeds if s.get("migrated")]
    quality.pop("n_detections", None)
    out["quality"] = quality
    return out
