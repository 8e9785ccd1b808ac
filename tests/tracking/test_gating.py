"""Gating rules: exhaustive cases and property-based tests (safety logic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spineguide.tracking.errors import TrackingError
from spineguide.tracking.service.gating import (
    Beam,
    GatingConfig,
    GatingState,
    HoldReason,
    Measurement,
    judge_measurement,
    judge_silence,
    with_tolerance,
)

NOW = 1_764_070_000.0
CFG = GatingConfig()


def good(pair_id=1, age_s=0.05, dev=(0.1, 0.2, -0.1), rot=(0.1, 0.0, -0.2)):
    return Measurement(pair_id, NOW - age_s, HoldReason.OK, np.array(dev), np.array(rot))


def test_good_fresh_pair_within_tolerance_enables_with_expiry():
    decision, state = judge_measurement(GatingState(), good(), NOW, CFG)
    assert decision.beam is Beam.ENABLE and decision.reason is HoldReason.OK
    # Expiry: the earlier of now + validity (0.2 s) and acquisition + max age (0.2 s).
    assert decision.valid_until_unix_s == pytest.approx(NOW - 0.05 + 0.2)
    assert decision.deviation_mm == pytest.approx(math.sqrt(0.01 + 0.04 + 0.01))
    assert state.consecutive_good == 1 and state.last_pair_id == 1


@pytest.mark.parametrize(
    "measurement, reason",
    [
        (None, HoldReason.NO_MEASUREMENT),
        (good(age_s=0.21), HoldReason.STALE_FRAME),
        (good(age_s=-0.06), HoldReason.FUTURE_FRAME),
        (good(dev=(0.0, 0.0, 1.01)), HoldReason.OUT_OF_TOLERANCE),
        (good(dev=(0.7, 0.7, 0.0)), HoldReason.OUT_OF_TOLERANCE),  # 0.99 mm 3D, fine per axis... see below
        (good(rot=(0.0, -1.2, 0.0)), HoldReason.ROTATION_OUT_OF_TOLERANCE),
        (good(dev=(np.nan, 0, 0)), HoldReason.INTERNAL_ERROR),
        (good(rot=(0, np.inf, 0)), HoldReason.INTERNAL_ERROR),
        (Measurement(1, NOW, HoldReason.FIDUCIAL_MISSING), HoldReason.FIDUCIAL_MISSING),
        (Measurement(1, NOW, HoldReason.FIDUCIAL_MIGRATED), HoldReason.FIDUCIAL_MIGRATED),
        (Measurement(1, NOW, HoldReason.REGISTRATION_REFUSED), HoldReason.REGISTRATION_REFUSED),
        (Measurement(1, NOW, HoldReason.NAN_FRAME), HoldReason.NAN_FRAME),
        (Measurement(1, NOW, HoldReason.SATURATED_FRAME), HoldReason.SATURATED_FRAME),
        (Measurement(1, NOW, HoldReason.CORRUPT_FRAME), HoldReason.CORRUPT_FRAME),
        (Measurement(1, NOW, HoldReason.UNPAIRED_FRAME), HoldReason.UNPAIRED_FRAME),
        (Measurement(1, NOW, HoldReason.CORRECTION_LIMIT), HoldReason.CORRECTION_LIMIT),
        (Measurement(1, NOW, HoldReason.INTERNAL_ERROR), HoldReason.INTERNAL_ERROR),
    ],
)
def test_every_failure_holds_with_its_reason(measurement, reason):
    cfg = CFG
    if measurement is not None and measurement.deviation_mm is not None and measurement.deviation_mm[0] == 0.7:
        cfg = GatingConfig(tolerance_3d_mm=0.95, tolerance_axis_mm=(1, 1, 1))
    decision, state = judge_measurement(GatingState(consecutive_good=3, last_pair_id=0), measurement, NOW, cfg)
    assert decision.beam is Beam.HOLD
    assert decision.reason is reason
    assert state.consecutive_good == 0 and state.enabled_until_unix_s == 0.0


def test_target_moving_out_of_tolerance_before_the_enable_expires_holds():
    # 0.6 mm off and moving +3 mm/s: in the 0.2 s the ENABLE would live it reaches 1.2 mm.
    m = Measurement(1, NOW, HoldReason.OK, np.array([0.6, 0, 0]), np.zeros(3), np.array([3.0, 0, 0]))
    decision, state = judge_measurement(GatingState(), m, NOW, CFG)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.MOVING_OUT_OF_TOLERANCE
    assert state.rearm_needed
    # Moving back towards the plan is no reason to hold.
    m = Measurement(2, NOW, HoldReason.OK, np.array([0.6, 0, 0]), np.zeros(3), np.array([-3.0, 0, 0]))
    decision, _ = judge_measurement(GatingState(), m, NOW, CFG)
    assert decision.beam is Beam.ENABLE
    m = Measurement(3, NOW, HoldReason.OK, np.array([0.6, 0, 0]), np.zeros(3), np.array([np.nan, 0, 0]))
    decision, _ = judge_measurement(GatingState(), m, NOW, CFG)
    assert decision.reason is HoldReason.INTERNAL_ERROR


def test_per_axis_tolerance_holds_even_inside_3d_tolerance():
    cfg = GatingConfig(tolerance_3d_mm=2.0, tolerance_axis_mm=(0.5, 2.0, 2.0))
    decision, _ = judge_measurement(GatingState(), good(dev=(0.6, 0.0, 0.0)), NOW, cfg)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.OUT_OF_TOLERANCE


def test_old_or_repeated_pair_is_stale():
    state = GatingState(last_pair_id=5)
    for pid in (5, 4):
        decision, _ = judge_measurement(state, good(pair_id=pid), NOW, CFG)
        assert decision.beam is Beam.HOLD and decision.reason is HoldReason.STALE_FRAME


def test_consecutive_pairs_required_after_hold():
    cfg = GatingConfig(consecutive_to_enable=3)
    state = GatingState()
    beams = []
    for pid in range(1, 5):
        decision, state = judge_measurement(state, good(pair_id=pid), NOW, cfg)
        beams.append((decision.beam, decision.reason))
    assert beams[:2] == [(Beam.HOLD, HoldReason.SETTLING)] * 2
    assert beams[2][0] is Beam.ENABLE and beams[3][0] is Beam.ENABLE
    # One bad pair resets the count.
    decision, state = judge_measurement(state, good(pair_id=5, dev=(2, 0, 0)), NOW, cfg)
    assert decision.beam is Beam.HOLD
    decision, state = judge_measurement(state, good(pair_id=6), NOW, cfg)
    assert decision.reason is HoldReason.SETTLING


def test_rearm_margin_applies_after_tolerance_hold_only():
    cfg = GatingConfig(tolerance_3d_mm=1.0, rearm_margin_mm=0.3)
    state = GatingState()
    d, state = judge_measurement(state, good(pair_id=1, dev=(0.9, 0, 0)), NOW, cfg)
    assert d.beam is Beam.ENABLE  # no prior tolerance hold: full tolerance
    d, state = judge_measurement(state, good(pair_id=2, dev=(1.1, 0, 0)), NOW, cfg)
    assert d.reason is HoldReason.OUT_OF_TOLERANCE and state.rearm_needed
    d, state = judge_measurement(state, good(pair_id=3, dev=(0.9, 0, 0)), NOW, cfg)
    assert d.beam is Beam.HOLD and d.reason is HoldReason.OUT_OF_TOLERANCE  # 0.9 > 1.0 - 0.3
    d, state = judge_measurement(state, good(pair_id=4, dev=(0.6, 0, 0)), NOW, cfg)
    assert d.beam is Beam.ENABLE and not state.rearm_needed


def test_silence_revokes_permission():
    decision, _ = judge_silence(GatingState(), NOW, None, CFG)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.FRAME_SOURCE_SILENT
    decision, _ = judge_silence(GatingState(), NOW, NOW - 0.25, CFG)
    assert decision.reason is HoldReason.FRAME_SOURCE_SILENT
    decision, state = judge_silence(GatingState(enabled_until_unix_s=NOW + 0.1), NOW, NOW - 0.05, CFG)
    assert decision is None
    decision, _ = judge_silence(GatingState(enabled_until_unix_s=NOW - 0.01), NOW, NOW - 0.05, CFG)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.STALE_FRAME


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tolerance_3d_mm": 0}, "tolerance_3d_mm"),
        ({"tolerance_axis_mm": (1, -1, 1)}, r"tolerance_axis_mm\[1\]"),
        ({"max_frame_age_s": float("nan")}, "max_frame_age_s"),
        ({"consecutive_to_enable": 0}, "consecutive_to_enable"),
        ({"rearm_margin_mm": 1.0}, "rearm_margin_mm"),
        ({"enable_validity_s": -1}, "enable_validity_s"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(TrackingError, match=message):
        GatingConfig(**kwargs)


def test_measurement_marked_ok_needs_numbers():
    with pytest.raises(TrackingError, match="must carry"):
        Measurement(1, NOW, HoldReason.OK)


def test_set_tolerance_and_frame_period_defaults():
    cfg = GatingConfig.for_frame_period(0.05)
    assert cfg.max_frame_age_s == pytest.approx(0.1) and cfg.enable_validity_s == pytest.approx(0.1)
    tighter = with_tolerance(cfg, 0.5, 0.5)
    assert tighter.tolerance_axis_mm == (0.5, 0.5, 0.5) and tighter.tolerance_rotation_deg == 0.5


# ------------------------------------------------------------ property-based
reasons = st.sampled_from(list(HoldReason))
number = st.one_of(st.floats(-3, 3), st.just(math.nan), st.just(math.inf))
vec = st.tuples(number, number, number)
measurements = st.builds(
    lambda pid, age, reason, dev, rot, vel: Measurement(
        pid, NOW - age, reason, None if reason is not HoldReason.OK and dev is None else np.array(dev or (0, 0, 0)),
        None if reason is not HoldReason.OK and rot is None else np.array(rot or (0, 0, 0)),
        None if vel is None else np.array(vel)),
    st.integers(0, 50),
    st.floats(-0.2, 0.5),
    reasons,
    st.one_of(st.none(), vec),
    st.one_of(st.none(), vec),
    st.one_of(st.none(), st.tuples(*[st.floats(-20, 20)] * 3)),
)
configs = st.builds(
    GatingConfig,
    tolerance_3d_mm=st.floats(0.3, 3.0),
    tolerance_rotation_deg=st.floats(0.3, 3.0),
    max_frame_age_s=st.floats(0.02, 0.5),
    enable_validity_s=st.floats(0.02, 0.5),
    consecutive_to_enable=st.integers(1, 4),
    rearm_margin_mm=st.floats(0.0, 0.25),
)


@settings(max_examples=600, deadline=None)
@given(st.lists(measurements, min_size=1, max_size=25), configs, st.floats(0.0, 0.05))
def test_enable_is_only_ever_granted_on_fresh_good_in_tolerance_pairs(sequence, cfg, dt):
    state = GatingState()
    now = NOW
    run = 0
    for m in sequence:
        now += dt
        prev = state
        decision, state = judge_measurement(state, m, now, cfg)
        fresh_new = (prev.last_pair_id is None or m.pair_id > prev.last_pair_id)
        if decision.beam is Beam.ENABLE:
            age = now - m.acquired_unix_s
            assert m.reason is HoldReason.OK and fresh_new
            assert -cfg.max_clock_skew_s <= age <= cfg.max_frame_age_s
            dev, rot = m.deviation_mm, m.rotation_deg
            assert np.all(np.isfinite(dev)) and np.all(np.isfinite(rot))
            assert np.linalg.norm(dev) <= cfg.tolerance_3d_mm
            assert np.all(np.abs(dev) <= np.asarray(cfg.tolerance_axis_mm))
            assert np.max(np.abs(rot)) <= cfg.tolerance_rotation_deg
            if m.velocity_mm_per_s is not None:
                # Where the target will be when the permission expires is inside tolerance too.
                ahead = dev + m.velocity_mm_per_s * (decision.valid_until_unix_s - m.acquired_unix_s)
                assert np.linalg.norm(ahead) <= cfg.tolerance_3d_mm + 1e-9
            # The permission never outlives the measurement's freshness nor the validity window.
            assert decision.valid_until_unix_s <= m.acquired_unix_s + cfg.max_frame_age_s + 1e-9
            assert decision.valid_until_unix_s <= now + cfg.enable_validity_s + 1e-9
            run += 1
            assert state.consecutive_good >= cfg.consecutive_to_enable
        else:
            assert decision.reason is not HoldReason.OK
            assert state.enabled_until_unix_s == 0.0
            if decision.reason is not HoldReason.SETTLING:
                assert state.consecutive_good == 0
        # Pair ids judged never go backwards.
        if prev.last_pair_id is not None:
            assert state.last_pair_id >= prev.last_pair_id


@settings(max_examples=300, deadline=None)
@given(configs, st.one_of(st.none(), st.floats(0.0, 2.0)), st.one_of(st.just(0.0), st.floats(0.001, 1.0)))
def test_silence_longer_than_max_age_always_holds(cfg, since_last, enabled_for):
    state = GatingState(consecutive_good=2, enabled_until_unix_s=NOW + enabled_for)
    last = None if since_last is None else NOW - since_last
    decision, new_state = judge_silence(state, NOW, last, cfg)
    if last is None or (NOW - last) > cfg.max_frame_age_s:
        assert decision is not None and decision.beam is Beam.HOLD
        assert decision.reason is HoldReason.FRAME_SOURCE_SILENT
        assert new_state.enabled_until_unix_s == 0.0
    elif enabled_for == 0.0:
        assert decision is not None and decision.beam is Beam.HOLD
    else:
        assert decision is None


# ------------------------------------------------------------------ faults
from spineguide.tracking.service.gating import judge_fault  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(reason=st.sampled_from(list(HoldReason)), enabled=st.floats(0, 2e9), good=st.integers(0, 10),
       pair_id=st.one_of(st.none(), st.integers(0, 10_000)))
def test_a_fault_always_holds_and_revokes_any_permission(reason, enabled, good, pair_id):
    state = GatingState(consecutive_good=good, enabled_until_unix_s=enabled, last_pair_id=5)
    decision, new = judge_fault(state, reason, NOW, pair_id)
    assert decision.beam is Beam.HOLD
    assert decision.reason is (HoldReason.INTERNAL_ERROR if reason is HoldReason.OK else reason)
    assert new.enabled_until_unix_s == 0.0 and new.consecutive_good == 0
    assert new.last_pair_id == (5 if pair_id is None else max(5, pair_id))


def test_a_fault_with_a_broken_clock_is_an_internal_error():
    decision, _ = judge_fault(GatingState(), HoldReason.CORRUPT_FRAME, math.nan)
    assert decision.beam is Beam.HOLD and decision.reason is HoldReason.INTERNAL_ERROR
