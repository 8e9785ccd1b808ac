"""Bounded service configuration: one range table, endpoints, the security choice, files opened at load."""

from __future__ import annotations

import re
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from spineguide.registration.ctfile import write_ct

from spineguide.registration.volume import CTVolume
from spineguide.tracking.service import config as cfg
from spineguide.tracking.service import config_file
from spineguide.tracking.service.config import (
    RANGES,
    ConfigError,
    EndpointsConfig,
    PlanConfig,
    RecordConfig,
    SafetyConfig,
    SecurityConfig,
    check_endpoint,
    config_from_dict,
    ranges_markdown,
)
from spineguide.tracking.service.config_file import load_config

ROOT = Path(__file__).resolve().parents[2]
INSECURE = {"security": {"enabled": False}}
#: The sections whose numbers the table bounds.
RANGED_SECTIONS = {"safety": SafetyConfig, "plan": PlanConfig}


def _build(section: str, **values):
    return config_from_dict({section: values, **INSECURE}, "test.toml")


# ------------------------------------------------------------------ the table
def test_every_number_of_the_ranged_sections_has_a_range_and_every_range_a_field():
    for section, cls in RANGED_SECTIONS.items():
        numeric = {f.name for f in fields(cls) if re.search(r"\b(float|int)\b", str(f.type))}
        assert numeric == set(RANGES[section]), section


def test_the_defaults_lie_inside_their_ranges():
    safety = SafetyConfig()
    for name, r in RANGES["safety"].items():
        r.check("safety", name, getattr(safety, name))  # raises if not


@pytest.mark.parametrize("section, name", [(s, n) for s, t in RANGES.items() for n in t])
def test_each_range_accepts_its_bounds_and_refuses_just_outside(section, name):
    r = RANGES[section][name]
    step = 1 if r.integer else max(1e-9, 1e-6 * (r.hi - r.lo))
    inside = [r.lo + (step if r.lo_open else 0), r.hi - (step if r.hi_open else 0)]
    outside = [r.lo - step if not r.lo_open else r.lo, r.hi + step if not r.hi_open else r.hi]
    for v in inside:
        value = int(v) if r.integer else float(v)
        got = r.check(section, name, value if r.count == 1 else [value] * r.count)
        assert got == (value if r.count == 1 else (value,) * r.count)
    for v in outside:
        value = int(v) if r.integer else float(v)
        with pytest.raises(ConfigError, match=rf"\[{section}\] {name}(\[0\])? must be .*{re.escape(r.interval())}"):
            r.check(section, name, value if r.count == 1 else [value] * r.count)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "1.0", None, [1.0], 10**400])
def test_a_range_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(ConfigError, match=r"\[safety\] tolerance_3d_mm must be a finite number"):
        RANGES["safety"]["tolerance_3d_mm"].check("safety", "tolerance_3d_mm", value)


def test_whole_numbers_only_where_the_table_says_so():
    with pytest.raises(ConfigError, match="consecutive_to_enable must be a whole number in \\[1, 10\\]"):
        _build("safety", consecutive_to_enable=2.0)
    assert _build("safety", consecutive_to_enable=3).safety.consecutive_to_enable == 3


@pytest.mark.parametrize("values, match", [
    ({"enable_validity_s": 3600}, r"enable_validity_s must be a finite number in \(0, 2\] s"),
    ({"tolerance_3d_mm": 1e6}, r"tolerance_3d_mm must be a finite number in \(0, 5\] mm"),
    ({"tolerance_axis_mm": [1.0, 9.0, 1.0]}, r"tolerance_axis_mm\[1\] must be a finite number in \(0, 5\] mm"),
    ({"tolerance_axis_mm": [1.0, 1.0]}, r"tolerance_axis_mm must be 3 numbers"),
    ({"correction_limit_mm": 51}, r"correction_limit_mm must be a finite number in \(0, 50\] mm"),
    ({"correction_limit_deg": 11}, r"correction_limit_deg must be a finite number in \(0, 10\] deg"),
    ({"frame_period_s": 0.01}, r"frame_period_s must be a finite number in \[0.02, 1\] s"),
    ({"heartbeat_period_s": 0.2}, "at least 10 Hz"),
    ({"approval_max_age_s": 0}, r"approval_max_age_s must be a finite number in \(0, 120\] s"),
    # Relations between values:
    ({"frame_period_s": 0.1, "enable_validity_s": 0.25}, r"must not exceed 2 frame periods \(0.2 s\)"),
    ({"rearm_margin_mm": 1.0, "tolerance_3d_mm": 1.0}, "rearm_margin_mm .* must be smaller than tolerance_3d_mm"),
    ({"pair_timeout_s": 0.2, "max_frame_age_s": 0.2}, "must be shorter than max_frame_age_s"),
])
def test_unbounded_safety_values_of_the_issue_are_refused(values, match):
    with pytest.raises(ConfigError, match=match) as info:
        _build("safety", **values)
    assert str(info.value).startswith("test.toml: [safety]")


def test_enable_life_of_exactly_two_frame_periods_is_accepted():
    s = _build("safety", frame_period_s=0.05, enable_validity_s=0.1).safety
    assert s.enable_validity_s == 0.1 and s.max_frame_age_s == pytest.approx(0.1)


@pytest.mark.parametrize("values, match", [
    ({"target_room_mm": [0.0, 0.0, 250.0]}, r"target_room_mm\[2\] must be a finite number in \[-200, 200\] mm"),
    ({"roi_half_size_mm": [1.0, 30.0, 15.0]}, r"roi_half_size_mm\[0\] must be .*\[5, 200\] mm"),
    ({"pattern_noise_mm": -0.1}, r"pattern_noise_mm must be .*\[0, 5\] mm"),
])
def test_plan_numbers_are_bounded(values, match):
    with pytest.raises(ConfigError, match=match):
        _build("plan", **values)


def test_the_ranges_in_the_service_docs_are_the_code_table():
    text = (ROOT / "docs" / "SERVICE.md").read_text()
    m = re.search(r"<!-- ranges: generated by spineguide.tracking.service.config.ranges_markdown\(\) -->\n(.*?)\n<!-- /ranges -->",
                  text, re.S)
    assert m is not None, "docs/SERVICE.md lacks the generated ranges table"
    assert m.group(1) == ranges_markdown()


# ------------------------------------------------------------------ endpoints
@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:0", "tcp://127.0.0.1:*", "tcp://*:5555", "tcp://localhost:65535", "tcp://[::1]:5555",
    "tcp://eth0:5555", "ipc:///tmp/spineguide.sock", "inproc://frames",
])
def test_good_endpoints_are_accepted(address):
    assert check_endpoint("[endpoints] frames", address) == address


@pytest.mark.parametrize("address, match", [
    ("tcp://127.0.0.1:99999", "port 99999 is outside 0..65535"),
    ("tcp://127.0.0.1:65536", "port 65536 is outside 0..65535"),
    ("tcp://127.0.0.1", "must be tcp://HOST:PORT"),
    ("tcp://:5555", "must be tcp://HOST:PORT"),
    ("tcp://127.0.0.1:-1", "must be tcp://HOST:PORT"),
    ("tcp://127.0.0.1:123456", "must be tcp://HOST:PORT"),
    ("tcp://host name:5", "must be tcp://HOST:PORT"),
    ("ipc://", "ipc://PATH with a path of 1..107 bytes"),
    ("ipc://" + "x" * 108, "ipc://PATH with a path of 1..107 bytes"),
    ("inproc://", "inproc://NAME"),
    ("udp://127.0.0.1:5", "must be a tcp://, ipc:// or inproc://"),
    (5555, "must be a tcp://, ipc:// or inproc://"),
])
def test_bad_endpoints_are_refused_naming_the_key(address, match):
    with pytest.raises(ConfigError, match=re.escape("[endpoints] frames") + ".*" + re.escape(match)):
        EndpointsConfig(frames=address)


def test_dicom_archive_port_is_checked():
    with pytest.raises(ConfigError, match="port 70000 is outside 1..65535"):
        RecordConfig(dicom_exports="x", dicom_archive="RV@10.0.0.5:70000")
    assert RecordConfig(dicom_exports="x", dicom_archive="RV@10.0.0.5:104").dicom_archive == "RV@10.0.0.5:104"


# ------------------------------------------------------------------ security choice
def test_a_config_without_keys_must_say_it_runs_insecure():
    with pytest.raises(ConfigError, match=r"test.toml: \[security\]: no CURVE keys configured.*enabled = false"):
        config_from_dict({}, "test.toml")
    config = config_from_dict(INSECURE, "test.toml")
    assert config.security.insecure and config.security.enabled is False


@pytest.mark.parametrize("table, match", [
    ({"enabled": False, "server_secret_key": "s.key_secret", "allowed_clients": "allowed"}, "contradicts the keys"),
    ({"enabled": True}, "enabled = true needs server_secret_key and allowed_clients"),
    ({"enabled": "no"}, "enabled must be true or false"),
    ({"server_secret_key": "s.key_secret"}, "must be given together"),
])
def test_contradictory_security_sections_are_refused(table, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"security": table}, "test.toml")


def test_keys_alone_turn_curve_on():
    sec = SecurityConfig("s.key_secret", "allowed")
    assert sec.enabled is True and not sec.insecure


def test_python_default_security_is_no_choice_and_a_service_refuses_it():
    from spineguide.tracking.errors import SecurityError
    from spineguide.tracking.service.loop import Service
    from spineguide.tracking.service.record import SessionRecord

    assert SecurityConfig().enabled is None
    with pytest.raises(SecurityError, match="service not started: .*enabled = false"):
        Service(cfg.ServiceConfig(endpoints=EndpointsConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0",
                                                            "tcp://127.0.0.1:0")),
                record=SessionRecord(None)).start()


# ------------------------------------------------------------------ files opened at load
def _write_toml(tmp_path, plan: str, security: str = "enabled = false") -> Path:
    path = tmp_path / "service.toml"
    path.write_text(f"[plan]\n{plan}\n[security]\n{security}\n")
    return path


@pytest.fixture
def plan_files(tmp_path):
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.calibration.io import write_geometry

    write_geometry(default_stereo_geometry(64, 4.0), tmp_path / "geometry.json")
    (tmp_path / "fiducials.json").write_text(
        '{"schema": "fiducials/1", "fiducials": [{"name": "F1", "position_mm": [0, 0, 0]},'
        ' {"name": "F2", "position_mm": [10, 0, 0]}, {"name": "F3", "position_mm": [0, 10, 0]}]}')
    # A small CT: 16^3 voxels of 4 mm centred on the LPS origin (extent -32..32 mm on each axis).
    ct = CTVolume(np.zeros((16, 16, 16), np.float32), (4.0, 4.0, 4.0), (-30.0, -30.0, -30.0), np.eye(3), "HFS")
    write_ct(ct, tmp_path / "ct.mha")
    return tmp_path


FIDUCIAL_PLAN = ('method = "fiducial"\ngeometry = "geometry.json"\nct = "ct.mha"\nfiducials = "fiducials.json"\n'
                 'isocentre_lps_mm = [0, 0, 0]\n')


def test_a_readable_consistent_plan_loads(plan_files):
    config = load_config(_write_toml(plan_files, FIDUCIAL_PLAN))
    assert config.plan.geometry == plan_files / "geometry.json"
    anatomy = 'method = "anatomy"\ngeometry = "geometry.json"\nct = "ct.mha"\nisocentre_lps_mm = [0, 0, 0]\n' \
        'roi_half_size_mm = [20, 20, 10]\n'
    assert load_config(_write_toml(plan_files, anatomy)).plan.method == "anatomy"


def test_an_isocentre_outside_the_ct_is_refused_at_load(plan_files):
    text = FIDUCIAL_PLAN.replace("isocentre_lps_mm = [0, 0, 0]", "isocentre_lps_mm = [0, 0, 40]")
    with pytest.raises(ConfigError, match=r"the isocentre \[0.0, 0.0, 40.0\] \(LPS mm\) lies outside the CT .*ct.mha"):
        load_config(_write_toml(plan_files, text))


def test_seeds_outside_the_ct_are_refused_at_load_naming_them(plan_files):
    (plan_files / "fiducials.json").write_text(
        '{"schema": "fiducials/1", "fiducials": [{"name": "F1", "position_mm": [0, 0, 0]},'
        ' {"name": "far", "position_mm": [0, 0, 33]}]}')
    with pytest.raises(ConfigError, match=r"fiducials.json: seeds \['far'\] lie outside the CT"):
        load_config(_write_toml(plan_files, FIDUCIAL_PLAN))


@pytest.mark.parametrize("change, match", [
    (lambda d: (d / "geometry.json").unlink(), r"\[plan\] geometry = '.*geometry.json': no readable file"),
    (lambda d: (d / "geometry.json").write_text("{"), r"\[plan\] geometry = '.*geometry.json'"),
    (lambda d: (d / "fiducials.json").write_text('{"schema": "fiducials/9"}'),
     r"\[plan\] fiducials = '.*fiducials.json'"),
    (lambda d: (d / "ct.mha").unlink(), r"\[plan\] ct = '.*ct.mha': no readable file"),
    (lambda d: (d / "ct.mha").write_bytes(b"not a CT"), r"\[plan\] .*ct.mha: .*ct.mha"),
])
def test_a_missing_or_broken_plan_file_fails_at_load_naming_it(plan_files, change, match):
    change(plan_files)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(_write_toml(plan_files, FIDUCIAL_PLAN))
    assert str(info.value).startswith(str(plan_files / "service.toml"))


def test_a_geometry_without_the_planned_imagers_is_refused(plan_files):
    text = FIDUCIAL_PLAN + 'imagers = ["A", "C"]\n'
    with pytest.raises(ConfigError, match=r"geometry.json' has imagers \['A', 'B'\], not \['C'\]"):
        load_config(_write_toml(plan_files, text))


def test_key_files_and_roles_are_checked_at_load(tmp_path):
    import zmq

    from spineguide.tracking.service.security import ROLES_FILE, create_keys

    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    made = create_keys(tmp_path / "keys")
    security = f'server_secret_key = "{made["server"]}"\nallowed_clients = "{made["allowed"]}"'
    assert load_config(_write_toml(tmp_path, 'method = "pattern"', security)).security.enabled
    (made["allowed"] / ROLES_FILE).unlink()
    with pytest.raises(ConfigError, match=r"\[security\] .*roles.toml: no roles file"):
        load_config(_write_toml(tmp_path, 'method = "pattern"', security))
    public = made["server"].with_name("server.key")
    security = f'server_secret_key = "{public}"\nallowed_clients = "{made["allowed"]}"'
    with pytest.raises(ConfigError, match="server.key: holds no secret key"):
        load_config(_write_toml(tmp_path, 'method = "pattern"', security))


def test_type_hints_of_the_sections_resolve():
    # The table test above reads field types as text; make sure they are the annotations we think.
    hints = typing.get_type_hints(SafetyConfig)
    assert hints["consecutive_to_enable"] is int and hints["frame_period_s"] is float


@pytest.mark.parametrize("text, match", [
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("[safety]\nframe_period_s = " + "9" * 5000 + "\n", "digits"),
    ("[plan]\nname = \"caf\xe9\"\n".encode("latin-1"), "not valid TOML"),
])
def test_hostile_toml_files_are_refused_not_crashed(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=match):
        config_file.load_config(p)


def test_an_oversized_or_folder_config_is_refused(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"#" * (config_file.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config_file.load_config(p)
    with pytest.raises(ConfigError, match="folder"):
        config_file.load_config(tmp_path)
