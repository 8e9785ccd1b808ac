"""Configuration of the real-time service: a TOML file -> frozen, validated dataclasses.

Built once at start-up (:func:`~spineguide.tracking.service.config_file.load_config`), passed down explicitly and
logged (:func:`log_config`). All safety values (staleness limit, gating
tolerances, ENABLE life, heartbeat period, pairing timeout, correction limits,
saturation rule, approval age) live in the one ``[safety]`` section. Unknown
keys and sections are errors, never ignored: a misspelt safety value must not
fall back silently to its default. Every number has a documented range
(:data:`RANGES`, rendered into docs/SERVICE.md), endpoints are checked
(:func:`check_endpoint`), and :func:`~spineguide.tracking.service.config_file.load_config` opens the plan and key files
it names. CURVE is on unless the file says ``[security] enabled = false``.

Example (every key optional except where noted)::

    [safety]
    frame_period_s = 0.1
    tolerance_3d_mm = 1.0
    tolerance_rotation_deg = 1.0
    correction_limit_mm = 25.0
    correction_limit_deg = 5.0

    [endpoints]
    frames = "tcp://127.0.0.1:5555"     # PULL, kvframe/1 in
    publish = "tcp://127.0.0.1:5556"    # PUB, correction/1, gating/1, heartbeat/1 out
    command = "tcp://127.0.0.1:5557"    # ROUTER, command/1 in, reply/1 out

    [plan]
    method = "pattern"                  # "fiducial", "anatomy" or "pattern" (simulation)
    imagers = ["A", "B"]

    [couch]
    dof = 6

    [setup]
    approval = "manual"                 # or "automatic" (simulation only)

    [security]                          # required: keys, or enabled = false (insecure, tests only)
    server_secret_key = "keys/server.key_secret"
    allowed_clients = "keys/allowed"    # NAME.key files + roles.toml

    [record]
    path = "session.jsonl"
    raw_frames = false
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrackingError
from .gating import GatingConfig
from .pairing import MAX_PAIR_ID_JUMP

__all__ = [
    "ConfigError",
    "SafetyConfig",
    "EndpointsConfig",
    "PlanConfig",
    "CouchConfig",
    "OneViewConfig",
    "SetupConfig",
    "SecurityConfig",
    "RecordConfig",
    "CataloguePlan",
    "ServiceConfig",
    "Range",
    "RANGES",
    "RELATIONS",
    "INSECURE_WARNING",
    "check_endpoint",
    "ranges_markdown",
    "config_from_dict",
    "log_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Range:
    """The accepted values of one configuration number (or each element of a short vector).

    Attributes
    ----------
    lo, hi : float
        Bounds, in ``unit``.
    unit : str
        ``s``, ``mm``, ``deg``, ``1`` (a pure number)...
    meaning : str
        What the value is (one line, rendered into docs/SERVICE.md).
    lo_open, hi_open : bool
        The bound itself is refused: ``(lo, hi]`` has ``lo_open``.
    integer : bool
        Only whole numbers (TOML integers) are accepted.
    count : int
        Number of values: 1 for a scalar, 3 for an (X, Y, Z) vector.
    """

    lo: float
    hi: float
    unit: str
    meaning: str
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    count: int = 1

    def interval(self) -> str:
        """The range as text, e.g. ``(0, 5] mm``."""
        def num(v: float) -> str:
            return f"{v:g}" if abs(v) < 1e5 else f"{v:.0f}"
        text = f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        return f"{text} {self.unit}" if self.unit != "1" else text

    def _one(self, section: str, name: str, value: object) -> float | int:
        kind = "a whole number" if self.integer else "a finite number"
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise ConfigError(f"[{section}] {name} must be {kind} in {self.interval()} ({self.meaning}), "
                              f"got {value!r}")
        # Compare before converting: a huge TOML integer must not overflow float().
        inside = (value > self.lo if self.lo_open else value >= self.lo) and \
                 (value < self.hi if self.hi_open else value <= self.hi)
        if isinstance(value, float) and not math.isfinite(value):
            inside = False
        if not inside:
            raise ConfigError(f"[{section}] {name} must be {kind} in {self.interval()} ({self.meaning}), "
                              f"got {value!r}")
        return int(value) if self.integer else float(value)

    def check(self, section: str, name: str, value: object) -> float | int | tuple:
        """The validated value (float, int, or a tuple of ``count`` floats).

        Raises
        ------
        ConfigError
            Wrong type, wrong length or out of range; the message names the
            section, the key, the range with its unit, and the value.
        """
        if self.count == 1:
            return self._one(section, name, value)
        if not isinstance(value, (list, tuple)) or len(value) != self.count:
            raise ConfigError(f"[{section}] {name} must be {self.count} numbers in {self.interval()} "
                              f"({self.meaning}), got {value!r}")
        return tuple(self._one(section, f"{name}[{i}]", v) for i, v in enumerate(value))


#: Longest ENABLE life, in frame periods (CONVENTIONS: valid no longer than it takes the next pair
#: to arrive and be judged; default two frame periods).
MAX_ENABLE_PERIODS = 2.0

#: Every number of the configuration and the values it may take. One table, checked by
#: :meth:`Range.check` and rendered into docs/SERVICE.md ("Configuration ranges"); a few rules relate
#: two values (see :data:`RELATIONS`).
RANGES: dict[str, dict[str, Range]] = {
    "safety": {
        "frame_period_s": Range(0.02, 1.0, "s", "nominal time between stereo pairs (50 Hz .. 1 Hz)"),
        "max_frame_age_s": Range(0.0, 2.0, "s", "a pair older than this when judged is stale; "
                                 "default 2 frame periods", lo_open=True),
        "enable_validity_s": Range(0.0, 2.0, "s", "longest life of one ENABLE; default and at most "
                                   "2 frame periods", lo_open=True),
        "tolerance_3d_mm": Range(0.0, 5.0, "mm", "gating radius on the 3D target deviation", lo_open=True),
        "tolerance_axis_mm": Range(0.0, 5.0, "mm", "gating limit per room axis X, Y, Z", lo_open=True, count=3),
        "tolerance_rotation_deg": Range(0.0, 5.0, "deg", "gating limit on the patient pitch, roll and yaw (each)",
                                        lo_open=True),
        "consecutive_to_enable": Range(1, 10, "1", "good pairs in a row before the beam is (re-)enabled",
                                       integer=True),
        "rearm_margin_mm": Range(0.0, 5.0, "mm", "hysteresis after an out-of-tolerance HOLD", hi_open=True),
        "max_clock_skew_s": Range(0.0, 1.0, "s", "a pair stamped further in the future is refused"),
        "heartbeat_period_s": Range(0.005, 0.1, "s", "heartbeat/1 period: at least 10 Hz"),
        "pair_timeout_s": Range(0.0, 1.0, "s", "wait for the second frame of a pair; default half a frame "
                                "period", lo_open=True),
        "correction_limit_mm": Range(0.0, 50.0, "mm", "largest correction translation (norm) ever sent",
                                     lo_open=True),
        "correction_limit_deg": Range(0.0, 10.0, "deg", "largest correction rotation (any axis) ever sent",
                                      lo_open=True),
        "saturation_level": Range(0.0, 1e6, "1", "pixel value counted as saturated (uint16 frames: 65535)",
                                  lo_open=True),
        "max_saturated_fraction": Range(0.0, 0.5, "1", "largest fraction of saturated pixels in a usable frame"),
        "approval_max_age_s": Range(0.0, 120.0, "s", "a setup proposal older than this cannot be approved",
                                    lo_open=True),
        "couch_timeout_s": Range(1.0, 300.0, "s", "no couch_moved this long after a setup correction: HOLD "
                                 "couch_timeout, measure again"),
        "max_pair_id_jump": Range(1, 100_000, "1", "a pair_id further than this from the last complete pair "
                                  "starts a new epoch (HOLD pair_id_jump)", integer=True),
    },
    "one_view": {
        "max_reference_age_s": Range(0.0, 300.0, "s", "one-view monitoring leans on a stereo pose no older than "
                                     "this", lo_open=True),
        "floor_mm": Range(0.0, 5.0, "mm", "motion prior: constant 1-sigma translation per axis around the last "
                          "stereo pose"),
        "floor_deg": Range(0.0, 5.0, "deg", "motion prior: constant 1-sigma rotation per axis"),
        "reference_sigma_mm": Range(0.0, 5.0, "mm", "motion prior: 1-sigma of the stereo reference pose's own "
                                    "translation per axis"),
        "reference_sigma_deg": Range(0.0, 5.0, "deg", "motion prior: 1-sigma of the stereo reference pose's own "
                                     "rotation per axis"),
        "history_s": Range(0.0, 300.0, "s", "motion prior: the scatter of the stereo poses of the last history_s "
                           "seconds is added to the floor (0: none)"),
        "drift_mm_per_sqrt_s": Range(0.0, 5.0, "mm/sqrt(s)", "motion prior: random-walk growth of the translation "
                                     "sigma per axis"),
        "drift_deg_per_sqrt_s": Range(0.0, 5.0, "deg/sqrt(s)", "motion prior: random-walk growth of the rotation "
                                      "sigma per axis"),
        "dark_fraction": Range(0.0, 1.0, "1", "a view whose 99th-percentile signal is below this fraction of its "
                               "i0 is dark (blocked)"),
    },
    "plan": {
        "isocentre_lps_mm": Range(-5000.0, 5000.0, "mm", "plan isocentre, planning-CT LPS", count=3),
        "target_room_mm": Range(-200.0, 200.0, "mm", "gated target point, room frame (isocentre = 0)", count=3),
        "pattern_noise_mm": Range(0.0, 5.0, "mm", "pattern processor noise, 1 sigma per axis (simulation)"),
        "roi_half_size_mm": Range(5.0, 200.0, "mm", "anatomy ROI half sizes along L, P, S", count=3),
    },
}

#: Rules between two values, checked after the ranges (rendered into docs/SERVICE.md too).
RELATIONS: tuple[str, ...] = (
    f"enable_validity_s <= {MAX_ENABLE_PERIODS:g} x frame_period_s",
    "pair_timeout_s < max_frame_age_s",
    "rearm_margin_mm < tolerance_3d_mm",
)


def _ranged(instance: object, section: str, names: tuple[str, ...] | None = None) -> None:
    """Check and normalise the ranged fields of a frozen section dataclass in place (None stays None)."""
    table = RANGES[section]
    for name in names if names is not None else tuple(table):
        value = getattr(instance, name)
        if value is not None:
            object.__setattr__(instance, name, table[name].check(section, name, value))


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    """Every safety value of the service, in one place (logged at start-up).

    Each number must lie in its range in :data:`RANGES` (``safety``); see
    docs/SERVICE.md, "Configuration ranges".

    Attributes
    ----------
    frame_period_s : float
        Nominal time between stereo pairs, s (10 Hz -> 0.1).
    max_frame_age_s : float or None
        A pair older than this when judged is stale, s; None -> two frame periods.
    enable_validity_s : float or None
        Longest life of one ENABLE, s; None -> two frame periods (also the upper bound).
    tolerance_3d_mm, tolerance_axis_mm, tolerance_rotation_deg
        Gating tolerances on the target deviation (room frame) and the patient rotation.
    consecutive_to_enable : int
        Good pairs in a row before the beam is (re-)enabled.
    rearm_margin_mm : float
        Hysteresis after an out-of-tolerance HOLD, mm.
    max_clock_skew_s : float
        A pair stamped further than this in the future is refused, s.
    heartbeat_period_s : float
        ``heartbeat/1`` period, s (must give >= 10 Hz).
    pair_timeout_s : float or None
        Time the first frame of a pair waits for its partner before the HOLD
        ``unpaired_frame``, s; None -> half a frame period.
    correction_limit_mm, correction_limit_deg : float
        A correction with a larger translation (norm, mm) or rotation (largest
        of pitch/roll/yaw, deg) is never sent: HOLD ``correction_limit``.
    saturation_level : float
        Pixel value counted as saturated (uint16 frames: 65535).
    max_saturated_fraction : float
        A frame with more saturated pixels than this fraction is refused
        (HOLD ``saturated_frame``).
    approval_max_age_s : float
        A setup correction proposed longer ago than this (s, service clock)
        can no longer be approved: ``approve_correction`` is refused as
        expired and the proposal dropped (the next pair proposes afresh).
    couch_timeout_s : float
        Longest wait for ``couch_moved`` after a setup correction was sent, s;
        then HOLD ``couch_timeout`` and the setup measures again.
    max_pair_id_jump : int
        A ``pair_id`` further than this from the last completed pair (either
        way) starts a new epoch: HOLD ``pair_id_jump`` (docs/PROTOCOL.md).
    """

    frame_period_s: float = 0.1
    max_frame_age_s: float | None = None
    enable_validity_s: float | None = None
    tolerance_3d_mm: float = 1.0
    tolerance_axis_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tolerance_rotation_deg: float = 1.0
    consecutive_to_enable: int = 1
    rearm_margin_mm: float = 0.0
    max_clock_skew_s: float = 0.05
    heartbeat_period_s: float = 0.05
    pair_timeout_s: float | None = None
    correction_limit_mm: float = 25.0
    correction_limit_deg: float = 5.0
    saturation_level: float = 65535.0
    max_saturated_fraction: float = 0.01
    approval_max_age_s: float = 30.0
    couch_timeout_s: float = 30.0
    max_pair_id_jump: int = MAX_PAIR_ID_JUMP

    def __post_init__(self) -> None:
        _ranged(self, "safety", ("frame_period_s",))
        period = self.frame_period_s
        for name, default in (("max_frame_age_s", 2 * period), ("enable_validity_s", MAX_ENABLE_PERIODS * period),
                              ("pair_timeout_s", 0.5 * period)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _ranged(self, "safety")  # the defaults derived from the frame period are held to the ranges too
        if self.enable_validity_s > MAX_ENABLE_PERIODS * period * (1 + 1e-12):
            raise ConfigError(
                f"[safety] enable_validity_s ({self.enable_validity_s} s) must not exceed {MAX_ENABLE_PERIODS:g} "
                f"frame periods ({MAX_ENABLE_PERIODS * period:g} s): an ENABLE lives no longer than it takes "
                "the next pair to arrive and be judged"
            )
        if self.pair_timeout_s >= self.max_frame_age_s:
            raise ConfigError(
                f"[safety] pair_timeout_s ({self.pair_timeout_s}) must be shorter than max_frame_age_s ({self.max_frame_age_s})"
            )
        if self.rearm_margin_mm >= self.tolerance_3d_mm:
            raise ConfigError(f"[safety] rearm_margin_mm ({self.rearm_margin_mm} mm) must be smaller than "
                              f"tolerance_3d_mm ({self.tolerance_3d_mm} mm)")
        try:
            self.gating()
        except TrackingError as err:
            raise ConfigError(f"[safety] {err}") from err

    def gating(self) -> GatingConfig:
        """The gating rules' configuration."""
        return GatingConfig(
            tolerance_3d_mm=self.tolerance_3d_mm,
            tolerance_axis_mm=self.tolerance_axis_mm,
            tolerance_rotation_deg=self.tolerance_rotation_deg,
            frame_period_s=self.frame_period_s,
            max_frame_age_s=self.max_frame_age_s,
            enable_validity_s=self.enable_validity_s,
            consecutive_to_enable=self.consecutive_to_enable,
            rearm_margin_mm=self.rearm_margin_mm,
            max_clock_skew_s=self.max_clock_skew_s,
        )


_TCP = re.compile(r"^tcp://(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\*|[0-9]{1,5})$")
#: Longest ipc:// path: a Unix socket address holds 107 bytes and a NUL (sockaddr_un.sun_path).
MAX_IPC_PATH_BYTES = 107
MAX_INPROC_CHARS = 256


def check_endpoint(where: str, value: object) -> str:
    """Validate one ZeroMQ address; returns it.

    Accepted: ``tcp://HOST:PORT`` (HOST a name, an IPv4 address, ``[IPv6]``
    or ``*``; PORT 0..65535 or ``*``, 0 and ``*`` picking a free port),
    ``ipc://PATH`` (at most 107 bytes) and ``inproc://NAME``.

    Raises
    ------
    ConfigError
        Anything else, naming ``where`` and the value (libzmq would wrap port
        99999 to 34463 without a word).
    """
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a tcp://, ipc:// or inproc:// address, got {value!r}")
    if value.startswith("tcp://"):
        m = _TCP.match(value)
        if m is None:
            raise ConfigError(f"{where} must be tcp://HOST:PORT (HOST a name, an address or *), got {value!r}")
        port = m.group("port")
        if port != "*" and not 0 <= int(port) <= 65535:
            raise ConfigError(f"{where}: port {int(port)} is outside 0..65535 in {value!r}")
        return value
    if value.startswith("ipc://"):
        path = value[len("ipc://"):]
        if not path or "\x00" in path or len(path.encode("utf-8", "surrogatepass")) > MAX_IPC_PATH_BYTES:
            raise ConfigError(f"{where} must be ipc://PATH with a path of 1..{MAX_IPC_PATH_BYTES} bytes, got {value!r}")
        return value
    if value.startswith("inproc://"):
        name = value[len("inproc://"):]
        if not name or "\x00" in name or len(name) > MAX_INPROC_CHARS:
            raise ConfigError(f"{where} must be inproc://NAME with 1..{MAX_INPROC_CHARS} characters, got {value!r}")
        return value
    raise ConfigError(f"{where} must be a tcp://, ipc:// or inproc:// address, got {value!r}")


@dataclass(frozen=True, slots=True)
class EndpointsConfig:
    """ZeroMQ endpoints the service binds (``tcp://HOST:PORT``; port 0 or ``*`` picks a free port).

    See :func:`check_endpoint` for what is accepted.
    """

    frames: str = "tcp://127.0.0.1:5555"
    publish: str = "tcp://127.0.0.1:5556"
    command: str = "tcp://127.0.0.1:5557"

    def __post_init__(self) -> None:
        seen = set()
        for f in fields(self):
            value = check_endpoint(f"[endpoints] {f.name}", getattr(self, f.name))
            if value in seen and not value.endswith((":0", ":*")):
                raise ConfigError(f"[endpoints] {f.name} reuses the address {value!r}")
            seen.add(value)


_METHODS = ("fiducial", "anatomy", "pattern")


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """What the service registers against.

    Attributes
    ----------
    method : str
        ``fiducial`` (seeds), ``anatomy`` (DRR registration) or ``pattern``
        (the simulators' test-pattern frames, for simulation and tests only).
    imagers : tuple of str
        Imager names a stereo pair must contain.
    geometry : Path or None
        ``kv-geometry/1`` file (required for fiducial and anatomy).
    ct : Path or None
        Planning CT (anatomy; fiducial needs it only for the isocentre's frame).
    isocentre_lps_mm : (3,) tuple or None
        Plan isocentre, planning-CT LPS mm.
    fiducials : Path or None
        ``fiducials/1`` file (fiducial method).
    dicom : Path or None
        A DICOM plan folder (CT series, RTSTRUCT, RTPLAN; ``spineguide
        import``/``dicom-listen``) instead of ``ct``/``fiducials``: seeds from
        the structure set's POINT ROIs, the isocentre from the RT Plan (unless
        ``isocentre_lps_mm`` overrides it), the anatomy ROI from its target ROI.
    target_roi : str or None
        With ``dicom``: the structure set ROI (by name) that is the anatomy
        method's target, overriding the plan's own choice (docs/DICOM.md,
        "Target ROI"); 1-64 printable characters (a DICOM LO value).
    target_room_mm : (3,) tuple
        Planned target point whose deviation is gated, room frame mm (isocentre = 0).
    pattern_noise_mm : float
        Measurement noise (1 sigma per axis, mm) the pattern processor adds.
    roi_half_size_mm : (3,) tuple
        Anatomy method: half sizes of the LPS-axis box around the isocentre
        that is registered (the target vertebra), mm.
    level_rois : tuple of str or None
        Anatomy method with ``dicom``: per-level setup (docs/PER_LEVEL.md). The
        structure set ROIs of the target vertebra and its neighbours (2-5
        names, cranial to caudal, the target ROI among them); each is
        registered on its own during setup and the approval chooses which
        level drives the correction.
    """

    method: str = "pattern"
    imagers: tuple[str, ...] = ("A", "B")
    geometry: Path | None = None
    ct: Path | None = None
    isocentre_lps_mm: tuple[float, float, float] | None = None
    fiducials: Path | None = None
    dicom: Path | None = None
    target_roi: str | None = None
    target_room_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern_noise_mm: float = 0.05
    roi_half_size_mm: tuple[float, float, float] = (30.0, 30.0, 15.0)
    level_rois: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in _METHODS:
            raise ConfigError(f"[plan] method must be one of {list(_METHODS)}, got {self.method!r}")
        names = self.imagers
        if not isinstance(names, (list, tuple)) or len(names) != 2 or len(set(names)) != 2 or \
                not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"[plan] imagers must name two different imagers, got {names!r}")
        object.__setattr__(self, "imagers", tuple(names))
        for name in ("geometry", "ct", "fiducials", "dicom"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        _ranged(self, "plan")
        if self.target_roi is not None:
            roi = self.target_roi
            if not isinstance(roi, str) or not 1 <= len(roi) <= 64 or not roi.isprintable() or roi != roi.strip():
                raise ConfigError(f"[plan] target_roi must be an ROI name of 1-64 printable characters, got {roi!r}")
            if self.dicom is None:
                raise ConfigError("[plan] target_roi names a structure set ROI: it needs dicom (a DICOM plan folder)")
        needs = {"fiducial": ("geometry", "fiducials", "isocentre_lps_mm", "ct"),
                 "anatomy": ("geometry", "ct", "isocentre_lps_mm"), "pattern": ()}[self.method]
        if self.dicom is not None:
            if self.ct is not None or self.fiducials is not None:
                raise ConfigError("[plan] give either dicom (a DICOM plan folder) or ct/fiducials, not both")
            needs = ("geometry",) if self.method != "pattern" else ()
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"[plan] method '{self.method}' needs {missing}")
        if self.level_rois is not None:
            lv = self.level_rois
            if (not isinstance(lv, (list, tuple)) or not 2 <= len(lv) <= 5 or len(set(lv)) != len(lv)
                    or not all(isinstance(n, str) and 1 <= len(n) <= 64 and n.isprintable() and n == n.strip()
                               for n in lv)):
                raise ConfigError(f"[plan] level_rois must list 2-5 different ROI names (cranial to caudal), got {lv!r}")
            object.__setattr__(self, "level_rois", tuple(lv))
            if self.method != "anatomy" or self.dicom is None:
                raise ConfigError("[plan] level_rois (per-level registration) needs method 'anatomy' and dicom "
                                  "(a DICOM plan folder whose structure set has one ROI per vertebra)")


#: A catalogue plan id: what ``load_plan``'s ``plan_id`` names (also a TOML bare key, so no quoting needed).
_PLAN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Patient positions a catalogue entry may state (docs/CONVENTIONS.md, "CT to room").
PATIENT_POSITIONS = ("HFS", "FFS", "HFP", "FFP")
#: Most plans one configuration may list.
MAX_PLANS = 64
#: The keys of a ``[plans.<id>]`` entry beyond those of ``[plan]``.
_CATALOGUE_KEYS = ("patient_id", "patient_name", "patient_position")


@dataclass(frozen=True, slots=True)
class CataloguePlan:
    """One plan of the service's catalogue: what ``load_plan`` with ``plan_id`` loads.

    Attributes
    ----------
    plan_id : str
        1-64 ASCII letters, digits, ``.``, ``_`` or ``-`` (the ``[plans.<id>]`` key).
    patient_id, patient_name : str or None
        The patient the plan is for (1-64 printable characters each; required in ``[plans]``; None only for
        the single legacy ``[plan]``, whose identity is what its files carry). A DICOM plan's own patient ID must
        equal ``patient_id`` (checked when the configuration is loaded with its files).
    patient_position : str or None
        ``HFS``, ``FFS``, ``HFP`` or ``FFP`` (the page's direction words); None: unknown (or the DICOM plan's).
    plan : PlanConfig
        What is loaded (method, imagers, geometry, CT/fiducials or DICOM folder...).
    """

    plan_id: str
    patient_id: str | None
    patient_name: str | None
    patient_position: str | None
    plan: PlanConfig

    def __post_init__(self) -> None:
        where = f"[plans.{self.plan_id}]" if isinstance(self.plan_id, str) else "[plans]"
        if not isinstance(self.plan_id, str) or not _PLAN_ID_RE.fullmatch(self.plan_id):
            raise ConfigError(f"[plans] a plan id must be 1-64 ASCII letters, digits, '.', '_' or '-', "
                              f"got {self.plan_id!r}")
        for name in ("patient_id", "patient_name"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable() \
                    or value != value.strip():
                raise ConfigError(f"{where} {name} must be 1-64 printable characters without surrounding "
                                  f"blanks, got {value!r}")
        if self.patient_position is not None and self.patient_position not in PATIENT_POSITIONS:
            raise ConfigError(f"{where} patient_position must be one of {list(PATIENT_POSITIONS)}, "
                              f"got {self.patient_position!r}")
        if not isinstance(self.plan, PlanConfig):
            raise ConfigError(f"{where} plan must be a PlanConfig")

    @property
    def source(self) -> str | None:
        """Where the plan comes from: its DICOM folder or CT file (None for the simulation's pattern method)."""
        src = self.plan.dicom if self.plan.dicom is not None else self.plan.ct
        return None if src is None else str(src)

    def to_json(self) -> dict[str, Any]:
        """The catalogue entry as ``list_plans`` answers it (docs/PROTOCOL.md)."""
        return {"plan_id": self.plan_id, "patient_id": self.patient_id, "patient_name": self.patient_name,
                "patient_position": self.patient_position, "method": self.plan.method, "source": self.source}


def legacy_plan_id(plan: PlanConfig) -> str:
    """The catalogue id of a single ``[plan]``: its DICOM folder's or CT file's name, ``pattern`` for simulation."""
    src = plan.dicom if plan.dicom is not None else plan.ct
    if src is None:
        return plan.method
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(src).name)[:64]
    return name or plan.method


def _catalogue_from_dict(table: object, where: str, base_dir: Path | None) -> tuple[CataloguePlan, ...]:
    """``[plans]``: ``[plans.<id>]`` tables, each a ``[plan]``'s keys plus the patient's (strictly checked)."""
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{where}: [plans] must be a table of [plans.<id>] tables (at least one), got {table!r}")
    if len(table) > MAX_PLANS:
        raise ConfigError(f"{where}: [plans] lists {len(table)} plans; at most {MAX_PLANS}")
    known = {f.name for f in fields(PlanConfig)} | set(_CATALOGUE_KEYS)
    out = []
    for plan_id, entry in table.items():
        if not isinstance(plan_id, str) or not _PLAN_ID_RE.fullmatch(plan_id):
            raise ConfigError(f"{where}: [plans] a plan id must be 1-64 ASCII letters, digits, '.', '_' or '-', "
                              f"got {plan_id!r}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: [plans.{plan_id}] must be a table, got {type(entry).__name__}")
        bad = sorted(set(entry) - known, key=repr)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} in [plans.{plan_id}]; expected some of {sorted(known)}")
        for name in ("patient_id", "patient_name"):
            if name not in entry:
                raise ConfigError(f"{where}: [plans.{plan_id}] needs {name} (whose plan it is)")
        values = {k: v for k, v in entry.items() if k not in _CATALOGUE_KEYS}
        if base_dir is not None:
            for key, value in values.items():
                if key in _PATH_KEYS and isinstance(value, str) and not os.path.isabs(value):
                    values[key] = base_dir / value
        try:
            plan = PlanConfig(**values)
            out.append(CataloguePlan(plan_id, entry["patient_id"], entry["patient_name"],
                                     entry.get("patient_position"), plan))
        except ConfigError as err:
            text = str(err)
            text = text.replace("[plan] ", f"[plans.{plan_id}] ", 1) if text.startswith("[plan] ") else text
            raise ConfigError(f"{where}: {text}") from err
        except (TypeError, ValueError, OverflowError) as err:
            raise ConfigError(f"{where}: [plans.{plan_id}] {err}") from err
    imagers = {p.plan.imagers for p in out}
    if len(imagers) != 1:
        raise ConfigError(f"{where}: [plans] every plan must name the same imagers (the room's), got "
                          f"{ {p.plan_id: list(p.plan.imagers) for p in out} }")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class OneViewConfig:
    """One-view monitoring (docs/ONE_VIEW.md): monitoring goes on from one imager when the other is blocked.

    A view is unusable when its frame is missing (the partner of a pair did not come), saturated
    (``[safety] max_saturated_fraction``) or dark (99th-percentile signal below ``dark_fraction`` x the
    frame's ``i0``; frames without ``i0`` are never called dark). With ``enabled`` and a stereo pose of
    this monitoring run no older than ``max_reference_age_s``, the other view is measured alone against
    the motion prior ``N(last stereo pose, diag(reference_sigma^2 + floor^2 + var(stereo poses of the
    last history_s) + drift^2 * dt))`` (widened along the ray by the move seen across it) and the gate
    judges the 95 % bound of the deviation. Otherwise such a pair is a HOLD (``one_view_no_reference``,
    or the view's own reason when disabled). docs/ONE_VIEW.md measures the coverage of these defaults.

    Attributes
    ----------
    enabled : bool
    max_reference_age_s : float
        Oldest stereo pose one view may lean on, s.
    floor_mm, floor_deg : float
        Constant 1-sigma per axis of the motion prior (mm, deg).
    reference_sigma_mm, reference_sigma_deg : float
        1-sigma per axis of the stereo reference pose itself (mm, deg).
    history_s : float
        Window of recent stereo poses whose scatter (variance per parameter) joins the floor, s.
    drift_mm_per_sqrt_s, drift_deg_per_sqrt_s : float
        Random-walk growth of the 1-sigma per axis: sigma^2 = floor^2 + drift^2 * dt.
    dark_fraction : float
        Dark-view threshold as a fraction of the frame's ``i0``.
    """

    enabled: bool = True
    max_reference_age_s: float = 30.0
    floor_mm: float = 0.05
    floor_deg: float = 0.05
    reference_sigma_mm: float = 0.1
    reference_sigma_deg: float = 0.1
    history_s: float = 10.0
    drift_mm_per_sqrt_s: float = 0.05
    drift_deg_per_sqrt_s: float = 0.02
    dark_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"[one_view] enabled must be true or false, got {self.enabled!r}")
        _ranged(self, "one_view")

    def prior_diffusion(self) -> tuple[float, ...]:
        """Variance growth per second of [tx, ty, tz, pitch, roll, yaw] (mm^2/s, deg^2/s)."""
        return (self.drift_mm_per_sqrt_s**2,) * 3 + (self.drift_deg_per_sqrt_s**2,) * 3

    def prior_floor(self) -> tuple[float, ...]:
        """Constant variance of [tx, ty, tz, pitch, roll, yaw] (mm^2, deg^2)."""
        return (self.floor_mm**2,) * 3 + (self.floor_deg**2,) * 3

    def reference_cov(self):
        """Covariance (6x6, mm^2 / deg^2) of the stereo reference pose."""
        import numpy as np

        return np.diag((self.reference_sigma_mm**2,) * 3 + (self.reference_sigma_deg**2,) * 3)


@dataclass(frozen=True, slots=True)
class CouchConfig:
    """The couch: 6 degrees of freedom, or 4 (translations + yaw; pitch/roll residual reported)."""

    dof: int = 6

    def __post_init__(self) -> None:
        if self.dof not in (4, 6) or isinstance(self.dof, bool):
            raise ConfigError(f"[couch] dof must be 4 or 6, got {self.dof!r}")


@dataclass(frozen=True, slots=True)
class SetupConfig:
    """Patient setup: ``approval = "manual"`` (a console sends ``approve_correction``) or ``"automatic"`` (simulation).

    How long a proposal can be approved is a safety value: ``[safety] approval_max_age_s``.
    """

    approval: str = "manual"

    def __post_init__(self) -> None:
        if not isinstance(self.approval, str) or self.approval not in ("manual", "automatic"):
            raise ConfigError(f"[setup] approval must be 'manual' or 'automatic', got {self.approval!r}")


#: What the start-up says when a configuration turns CURVE off (logged, printed by ``serve``, recorded).
INSECURE_WARNING = ("[security] enabled = false: CURVE is OFF. Any process that can reach the endpoints can send "
                    "frames, read every message and command the service (approve, pause, resume) under no "
                    "authenticated name. Use this for tests and simulation on a closed machine only.")


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """CurveZMQ keys (``spineguide keys``): on unless a configuration explicitly says ``enabled = false``.

    Attributes
    ----------
    enabled : bool or None
        True: CURVE on every endpoint (needs both files). False: plain TCP,
        stated explicitly (the service then warns loudly at start-up).
        None: nothing was said; set to True when the files are given,
        otherwise the configuration file is refused (:func:`config_from_dict`)
        and so is a service started with it.
    server_secret_key : Path or None
        The server's ``.key_secret`` certificate file.
    allowed_clients : Path or None
        Folder of client public ``NAME.key`` certificate files (the
        allow-list) and ``roles.toml``, which gives each NAME its role
        (docs/SECURITY.md).
    """

    server_secret_key: Path | None = None
    allowed_clients: Path | None = None
    enabled: bool | None = None

    def __post_init__(self) -> None:
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise ConfigError(f"[security] enabled must be true or false, got {self.enabled!r}")
        if (self.server_secret_key is None) != (self.allowed_clients is None):
            raise ConfigError("[security] server_secret_key and allowed_clients must be given together")
        for name in ("server_secret_key", "allowed_clients"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        keys = self.server_secret_key is not None
        if self.enabled is False and keys:
            raise ConfigError("[security] enabled = false contradicts the keys given (server_secret_key, "
                              "allowed_clients): remove one or the other")
        if self.enabled is True and not keys:
            raise ConfigError("[security] enabled = true needs server_secret_key and allowed_clients "
                              "(spineguide keys --out DIR makes them)")
        if self.enabled is None and keys:
            object.__setattr__(self, "enabled", True)

    @property
    def insecure(self) -> bool:
        """True only when the configuration explicitly turned CURVE off."""
        return self.enabled is False

    def require_choice(self, where: str = "[security]") -> None:
        """Refuse a configuration that neither gives keys nor says ``enabled = false``.

        Raises
        ------
        ConfigError
            ``enabled`` is None (nothing stated).
        """
        if self.enabled is None:
            raise ConfigError(
                f"{where}: no CURVE keys configured. Give [security] server_secret_key and allowed_clients "
                "(spineguide keys --out DIR makes them), or say [security] enabled = false explicitly "
                "(insecure: any local process could command the service)")


@dataclass(frozen=True, slots=True)
class RecordConfig:
    """Session record: JSON lines at ``path`` (fsync per record); raw frames as .npy beside it if asked.

    ``dicom_exports``: a folder where every approved setup is written as a
    DICOM Spatial Registration object (planning CT frame -> treatment room;
    needs a plan with a CT, see ``docs/DICOM.md``); ``dicom_archive``
    (``AE@HOST:PORT``): each one is then also sent there by C-STORE.
    """

    path: Path | None = None
    raw_frames: bool = False
    dicom_exports: Path | None = None
    dicom_archive: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
        if self.dicom_exports is not None:
            object.__setattr__(self, "dicom_exports", Path(self.dicom_exports))
        if self.dicom_archive is not None:
            if self.dicom_exports is None:
                raise ConfigError("[record] dicom_archive needs dicom_exports (the objects are written, then sent)")
            if not isinstance(self.dicom_archive, str):
                raise ConfigError(f"[record] dicom_archive must be AE@HOST:PORT, got {self.dicom_archive!r}")
            ae, at, rest = self.dicom_archive.partition("@")
            host, colon, port = rest.rpartition(":")
            if not (ae and at and host and colon and port.isascii() and port.isdigit()):
                raise ConfigError(f"[record] dicom_archive must be AE@HOST:PORT, got {self.dicom_archive!r}")
            if not 1 <= int(port) <= 65535:
                raise ConfigError(f"[record] dicom_archive: port {int(port)} is outside 1..65535 in "
                                  f"{self.dicom_archive!r}")
        if not isinstance(self.raw_frames, bool):
            raise ConfigError(f"[record] raw_frames must be true or false, got {self.raw_frames!r}")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The whole service configuration."""

    safety: SafetyConfig = field(default_factory=SafetyConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    couch: CouchConfig = field(default_factory=CouchConfig)
    one_view: OneViewConfig = field(default_factory=OneViewConfig)
    setup: SetupConfig = field(default_factory=SetupConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    #: The plan catalogue (``[plans]``); empty: the single ``[plan]`` is the only plan.
    plans: tuple[CataloguePlan, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "plans", tuple(self.plans))
        if len({p.plan_id for p in self.plans}) != len(self.plans):
            raise ConfigError("[plans] two plans share an id")
        if self.plans and len({p.plan.imagers for p in self.plans}) != 1:
            raise ConfigError("[plans] every plan must name the same imagers")

    @property
    def catalogue(self) -> tuple[CataloguePlan, ...]:
        """Every plan ``load_plan`` can load: ``[plans]``, or the single ``[plan]`` (id :func:`legacy_plan_id`,
        patient identity None: what its files carry)."""
        if self.plans:
            return self.plans
        return (CataloguePlan(legacy_plan_id(self.plan), None, None, None, self.plan),)

    @property
    def imagers(self) -> tuple[str, ...]:
        """The room's two imager names (shared by every plan of the catalogue)."""
        return self.catalogue[0].plan.imagers

    def find_plan(self, plan_id: str) -> CataloguePlan | None:
        """The catalogue plan with this id, or None."""
        return next((p for p in self.catalogue if p.plan_id == plan_id), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings), for the log and the session record.

        With a catalogue, ``plans`` is ``{id: {patient keys, plan keys}}`` and there is no ``plan`` (the form
        :func:`config_from_dict` reads back, so a recorded session replays)."""
        def clean(obj):
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            if isinstance(obj, Path):
                return str(obj)
            return obj
        d = clean({f.name: asdict(getattr(self, f.name)) for f in fields(self) if f.name != "plans"})
        if self.plans:
            del d["plan"]
            d["plans"] = {p.plan_id: {"patient_id": p.patient_id, "patient_name": p.patient_name,
                                      **({"patient_position": p.patient_position}
                                         if p.patient_position is not None else {}),
                                      **clean(asdict(p.plan))} for p in self.plans}
        return d


_PATH_KEYS = ("geometry", "ct", "fiducials", "dicom", "server_secret_key", "allowed_clients", "path", "dicom_exports")

_SECTIONS = {
    "safety": SafetyConfig,
    "endpoints": EndpointsConfig,
    "plan": PlanConfig,
    "couch": CouchConfig,
    "one_view": OneViewConfig,
    "setup": SetupConfig,
    "security": SecurityConfig,
    "record": RecordConfig,
}


def config_from_dict(data: dict[str, Any], where: str = "<config>", base_dir: Path | None = None) -> ServiceConfig:
    """Build a :class:`ServiceConfig` from a parsed TOML/JSON mapping.

    Relative paths are taken relative to ``base_dir`` (the config file's folder).
    Every number is held to its range (:data:`RANGES`); a mapping without
    CURVE keys must say ``[security] enabled = false``. Files are not opened
    here (:func:`~spineguide.tracking.service.config_file.load_config` does that).

    Raises
    ------
    ConfigError
        Unknown section or key, wrong type, invalid or out-of-range value,
        no security choice; the message names ``where``, the section and the key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: configuration must be a table, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS) - {"plans"}, key=repr)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; expected some of {sorted(_SECTIONS) + ['plans']}")
    if "plan" in data and "plans" in data:
        raise ConfigError(f"{where}: give either [plan] (one plan) or [plans] (a catalogue of plans), not both")
    parts = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {type(table).__name__}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(table) - known, key=repr)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} in [{name}]; expected some of {sorted(known)}")
        values = dict(table)
        if base_dir is not None:
            for key, value in values.items():
                if key in _PATH_KEYS and isinstance(value, str) and not os.path.isabs(value):
                    values[key] = base_dir / value
        try:
            parts[name] = cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        except (TypeError, ValueError, OverflowError) as err:
            raise ConfigError(f"{where}: [{name}] {err}") from err
    parts["security"].require_choice(f"{where}: [security]")
    if "plans" in data:
        parts["plans"] = _catalogue_from_dict(data["plans"], where, base_dir)
    return ServiceConfig(**parts)


def ranges_markdown() -> str:
    """The configuration ranges as a Markdown table (docs/SERVICE.md, "Configuration ranges")."""
    lines = ["| section | key | range | meaning |", "|---|---|---|---|"]
    for section, table in RANGES.items():
        for name, r in table.items():
            what = f"{r.count} values, each in " if r.count > 1 else ""
            kind = " (whole number)" if r.integer else ""
            lines.append(f"| `[{section}]` | `{name}` | {what}{r.interval()}{kind} | {r.meaning} |")
    lines.append("")
    lines.append("Rules between values: " + "; ".join(f"`{rule}`" for rule in RELATIONS) + ".")
    return "\n".join(lines)


def log_config(config: ServiceConfig, logger: logging.Logger = log) -> None:
    """Log every value at start-up, the safety section first."""
    d = config.to_dict()
    logger.info("safety: %s", d.pop("safety"))
    for name, section in d.items():
        logger.info("%s: %s", name, section)
