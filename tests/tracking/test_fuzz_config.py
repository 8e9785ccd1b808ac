"""Fuzz the configuration: any table -> a valid ServiceConfig or ConfigError, never another exception.

Cheap per example (no files, no sockets): ``config_from_dict`` opens nothing.
The example count comes from the hypothesis profile (``ci`` or ``deep``).
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spineguide.tracking.service.config import (
    _SECTIONS,
    MAX_ENABLE_PERIODS,
    RANGES,
    ConfigError,
    ServiceConfig,
    check_endpoint,
    config_from_dict,
)

pytestmark = pytest.mark.fuzz

#: Every key the configuration knows, so that random tables hit real checks, not only "unknown key".
KNOWN = {name: [f.name for f in fields(cls)] for name, cls in _SECTIONS.items()}

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 4, 6, 0.05, 0.1, 0.2, 1.0, 5.0, 30.0, 65535.0, -1.0, 1e-300]),
    st.text(max_size=12),
    st.sampled_from(["manual", "automatic", "fiducial", "anatomy", "pattern", "A", "B", "tcp://127.0.0.1:0",
                     "tcp://*:70000", "ipc://x", "inproc://", "RV@h:104", "AE@host:99999", "x.json"]),
)
#: Mostly scalars; short lists (vectors, imager names) and small tables now and then.
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def _plausible(section: str, key: str):
    """Values that often pass a key's check (a number in its range), mixed with anything at all."""
    r = RANGES.get(section, {}).get(key)
    if r is None:
        return values
    one = st.integers(int(r.lo), int(r.hi)) if r.integer else st.floats(r.lo, r.hi)
    good = one if r.count == 1 else st.lists(one, min_size=r.count, max_size=r.count)
    return st.one_of(good, good, good, values)


def _section_table(section: str, keys: list[str]):
    """A table of some of the section's keys (rarely an unknown one), each with a plausible or arbitrary value."""
    known = st.fixed_dictionaries({}, optional={k: _plausible(section, k) for k in keys})
    unknown = st.dictionaries(st.sampled_from(["bogus"]) | st.text(max_size=8), values, max_size=2)
    # Mostly well-formed, so that the checks behind the structural ones run too.
    return st.tuples(st.sampled_from(["known"] * 8 + ["unknown", "any"]), known, unknown, values).map(
        lambda t: {"known": t[1], "unknown": t[2], "any": t[3]}[t[0]])


tables = st.fixed_dictionaries({}, optional={name: _section_table(name, keys) for name, keys in KNOWN.items()})
#: Most examples state the security choice, so the other sections' checks are reached too; a few
#: carry a section the configuration does not know.
_EXTRA = {"as drawn": {}, "insecure": {"security": {"enabled": False}}, "unknown section": {"gating": {}}}
tables = st.tuples(tables, st.sampled_from(["as drawn"] * 4 + ["insecure"] * 12 + ["unknown section"])).map(
    lambda t: {**t[0], **_EXTRA[t[1]]})


def _check_invariants(config: ServiceConfig) -> None:
    """What every accepted configuration guarantees."""
    s = config.safety
    for section, table in RANGES.items():
        part = getattr(config, section)
        for name, r in table.items():
            value = getattr(part, name)
            if value is not None:
                r.check(section, name, value)  # inside its range (raises otherwise)
    assert s.enable_validity_s <= MAX_ENABLE_PERIODS * s.frame_period_s * (1 + 1e-12)
    assert s.pair_timeout_s < s.max_frame_age_s and s.rearm_margin_mm < s.tolerance_3d_mm
    assert config.security.enabled in (True, False)
    assert config.couch.dof in (4, 6) and config.setup.approval in ("manual", "automatic")


@given(tables)
def test_any_table_gives_a_valid_config_or_a_config_error(data):
    try:
        config = config_from_dict(data, "fuzz.toml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.toml")
        return
    _check_invariants(config)


@given(st.one_of(st.text(max_size=40), st.builds(lambda h, p: f"tcp://{h}:{p}", st.text(max_size=10),
                                                  st.one_of(st.integers(-10, 10**6).map(str), st.text(max_size=6))),
                 values))
def test_any_endpoint_is_accepted_checked_or_refused(address):
    try:
        got = check_endpoint("[endpoints] frames", address)
    except ConfigError as err:
        assert "[endpoints] frames" in str(err)
        return
    assert got == address
    if address.startswith("tcp://"):
        port = address.rsplit(":", 1)[1]
        assert port == "*" or 0 <= int(port) <= 65535


@given(st.sampled_from([(s, n) for s, t in RANGES.items() for n in t]), values)
def test_any_value_of_a_ranged_key_is_in_range_or_refused(key, value):
    section, name = key
    r = RANGES[section][name]
    try:
        got = r.check(section, name, value)
    except ConfigError as err:
        assert f"[{section}] {name}" in str(err)
        return
    for v in (got if r.count > 1 else (got,)):
        assert math.isfinite(v) and r.lo <= v <= r.hi
