"""Frame pairing (pure): pairs, late and lonely frames, imager restarts and pair-id epochs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spineguide.tracking.errors import TrackingError
from spineguide.tracking.frames import KvFrame
from spineguide.tracking.service.gating import HoldReason
from spineguide.tracking.service.pairing import MAX_PAIR_ID_JUMP, CompletePair, FrameAccepted, FramePairer, NewEpoch, PairFault

PIXELS = np.full((4, 4), 1000, np.uint16)
TIMEOUT_S = 0.05


def frame(imager, pair_id):
    return KvFrame(imager, PIXELS, acquired_unix_s=1.0, pair_id=pair_id)


def kinds(events):
    return [type(e).__name__ for e in events]


class Stream:
    """One imaging system: both imagers' frames of each pair, numbered like a sender's socket."""

    def __init__(self, pairer, session="imaging-1"):
        self.pairer, self.session, self.seq, self.mono = pairer, session, 0, 0.0

    def send(self, imager, pair_id, session="same"):
        self.seq += 1
        self.mono += 0.001
        return self.pairer.offer(frame(imager, pair_id), self.seq, self.session if session == "same" else session,
                                 self.mono)

    def pair(self, pair_id):
        return self.send("A", pair_id) + self.send("B", pair_id)


def test_a_pair_completes_when_both_imagers_sent_and_a_lonely_frame_times_out():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p)
    events = s.pair(7)
    assert kinds(events) == ["FrameAccepted", "FrameAccepted", "CompletePair"]
    assert events[-1].pair_id == 7 and set(events[-1].frames) == {"A", "B"} and events[-1].epoch == 0
    assert kinds(s.send("A", 8)) == ["FrameAccepted"]
    assert p.expire(s.mono + TIMEOUT_S / 2) == []
    [fault] = p.expire(s.mono + 2 * TIMEOUT_S)
    assert fault.reason is HoldReason.UNPAIRED_FRAME and fault.pair_id == 8 and p.next_expiry_mono_s() is None


def test_late_duplicate_and_unknown_frames_are_refused_with_their_reason():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p)
    s.pair(10)
    [late] = s.send("A", 9)
    assert late.reason is HoldReason.STALE_FRAME and "after pair 10 was complete" in late.detail
    s.send("A", 11)
    events = s.send("A", 11)
    assert isinstance(events[-1], PairFault) and events[-1].reason is HoldReason.CORRUPT_FRAME
    assert "sent twice" in events[-1].detail
    [unknown] = s.send("C", 12)
    assert unknown.reason is HoldReason.CORRUPT_FRAME and "unknown imager 'C'" in unknown.detail


def test_a_newer_complete_pair_drops_older_partial_ones_at_once():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p)
    s.send("A", 1)
    events = s.pair(2)
    assert kinds(events) == ["FrameAccepted", "FrameAccepted", "PairFault", "CompletePair"]
    assert events[2].reason is HoldReason.UNPAIRED_FRAME and events[2].pair_id == 1


def test_pair_id_ten_to_the_fifteen_is_a_new_epoch_and_normal_ids_recover():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p)
    s.pair(5)
    events = s.pair(10**15)
    assert isinstance(events[0], NewEpoch) and events[0].reason is HoldReason.PAIR_ID_JUMP
    assert isinstance(events[-1], CompletePair) and events[-1].epoch == 1
    events = s.pair(6)  # the bogus id is not a permanent stale lock
    assert isinstance(events[0], NewEpoch) and events[0].reason is HoldReason.PAIR_ID_JUMP
    assert isinstance(events[-1], CompletePair) and events[-1].pair_id == 6 and events[-1].epoch == 2
    assert isinstance(s.pair(7)[-1], CompletePair)


def test_a_jump_within_the_bound_is_the_same_epoch_and_a_short_step_back_is_a_late_frame():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p)
    s.pair(0)
    events = s.pair(MAX_PAIR_ID_JUMP)  # frames lost in between: still the same numbering
    assert isinstance(events[-1], CompletePair) and events[-1].epoch == 0
    [late] = s.send("A", 1)
    assert late.reason is HoldReason.STALE_FRAME


def test_a_new_imager_session_restarts_the_numbering():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p, "before")
    for k in range(40, 45):
        s.pair(k)
    s.session = "after"  # the imaging system restarted: its counter starts at 0 again
    events = s.pair(0)
    assert isinstance(events[0], NewEpoch) and events[0].reason is HoldReason.IMAGER_RESTARTED
    assert "before" in events[0].detail and "after" in events[0].detail
    assert kinds(events[1:]) == ["FrameAccepted", "FrameAccepted", "CompletePair"]
    assert isinstance(s.pair(1)[-1], CompletePair)


def test_a_legacy_sender_restart_is_recognised_by_its_seq_going_back():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p, None)
    for k in range(40, 45):
        s.pair(k)
    s.seq = 0
    events = s.pair(0)
    assert isinstance(events[0], NewEpoch) and "seq went back" in events[0].detail
    assert isinstance(events[-1], CompletePair) and events[-1].pair_id == 0


def test_a_restart_drops_partial_pairs_of_the_old_numbering():
    p = FramePairer(("A", "B"), TIMEOUT_S)
    s = Stream(p, "before")
    s.send("A", 41)
    s.session = "after"
    events = s.send("A", 0)
    assert isinstance(events[0], NewEpoch) and "partial pair(s) [41] dropped" in events[0].detail
    assert p.next_expiry_mono_s() is not None and isinstance(s.send("B", 0)[-1], CompletePair)


def test_bad_arguments_are_refused():
    with pytest.raises(TrackingError, match="at least one imager"):
        FramePairer((), TIMEOUT_S)
    with pytest.raises(TrackingError, match="pair_timeout_s must be positive"):
        FramePairer(("A",), 0.0)
    with pytest.raises(TrackingError, match="max_pair_id_jump"):
        FramePairer(("A",), 0.1, 0)


OFFERS = st.lists(st.tuples(st.sampled_from(["A", "B", "C"]),
                            st.one_of(st.integers(0, 300), st.integers(0, 2**63 - 1)),
                            st.integers(0, 50), st.sampled_from([None, "s1", "s2"]),
                            st.floats(0.0, 0.1, allow_nan=False)), max_size=60)


@given(OFFERS)
def test_any_frame_sequence_pairs_in_increasing_order_within_each_epoch(offers):
    p = FramePairer(("A", "B"), TIMEOUT_S, 100)
    mono = 0.0
    done: dict[int, int] = {}
    for imager, pid, seq, session, dt in offers:
        mono += dt
        events = p.offer(frame(imager, pid), seq, session, mono) + p.expire(mono)
        for e in events:
            assert isinstance(e, (NewEpoch, FrameAccepted, PairFault, CompletePair))
            if isinstance(e, CompletePair):
                assert e.pair_id > done.get(e.epoch, -1)  # never an older pair after a newer one
                done[e.epoch] = e.pair_id
                assert set(e.frames) == {"A", "B"} and all(f.pair_id == e.pair_id for f in e.frames.values())
            if isinstance(e, NewEpoch):
                assert p.epoch > max(done, default=-1)
