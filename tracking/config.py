"""Configuration of the real-time service: a TOML file -> frozen, validated dataclasses.

Built once at start-up (:func:`load_config`), passed down explicitly and
logged (:func:`log_config`). All safety values (staleness limit, gating
tolerances, ENABLE life, heartbeat period, pairing timeout, correction limits,
saturation rule) live in the one ``[safety]`` section. Unknown keys and
sections are errors, never ignored: a misspelt safety value must not fall
back silently to its default.

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

    [record]
    path = "session.jsonl"
    raw_frames = false
"""

from __future__ import annotations

import logging
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, TrackingError
from .gating import GatingConfig

__all__ = [
    "ConfigError",
    "SafetyConfig",
    "EndpointsConfig",
    "PlanConfig",
    "CouchConfig",
    "SetupConfig",
    "SecurityConfig",
    "RecordConfig",
    "ServiceConfig",
    "load_config",
    "config_from_dict",
    "log_config",
]

log = logging.getLogger(__name__)


def _finite_positive(section: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"[{section}] {name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    """Every safety value of the service, in one place (logged at start-up).

    Attributes
    ----------
    frame_period_s : float
        Nominal time between stereo pairs, s (10 Hz -> 0.1).
    max_frame_age_s : float or None
        A pair older than this when judged is stale, s; None -> two frame periods.
    enable_validity_s : float or None
        Longest life of one ENABLE, s; None -> two frame periods.
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

    def __post_init__(self) -> None:
        period = _finite_positive("safety", "frame_period_s", self.frame_period_s)
        object.__setattr__(self, "frame_period_s", period)
        for name, default in (("max_frame_age_s", 2 * period), ("enable_validity_s", 2 * period),
                              ("pair_timeout_s", 0.5 * period)):
            value = getattr(self, name)
            object.__setattr__(self, name, default if value is None else _finite_positive("safety", name, value))
        for name in ("tolerance_3d_mm", "tolerance_rotation_deg", "heartbeat_period_s", "correction_limit_mm",
                     "correction_limit_deg", "saturation_level"):
            object.__setattr__(self, name, _finite_positive("safety", name, getattr(self, name)))
        axis = self.tolerance_axis_mm
        if not isinstance(axis, (list, tuple)) or len(axis) != 3:
            raise ConfigError(f"[safety] tolerance_axis_mm must be 3 numbers (X, Y, Z mm), got {axis!r}")
        object.__setattr__(self, "tolerance_axis_mm", tuple(_finite_positive("safety", "tolerance_axis_mm", v) for v in axis))
        if self.heartbeat_period_s > 0.1:
            raise ConfigError(f"[safety] heartbeat_period_s must give at least 10 Hz (<= 0.1 s), got {self.heartbeat_period_s}")
        if self.pair_timeout_s >= self.max_frame_age_s:
            raise ConfigError(
                f"[safety] pair_timeout_s ({self.pair_timeout_s}) must be shorter than max_frame_age_s ({self.max_frame_age_s})"
            )
        frac = self.max_saturated_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            raise ConfigError(f"[safety] max_saturated_fraction must be in [0, 1), got {frac!r}")
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


@dataclass(frozen=True, slots=True)
class EndpointsConfig:
    """ZeroMQ endpoints the service binds (``tcp://HOST:PORT``; port 0 or ``*`` picks a free port)."""

    frames: str = "tcp://127.0.0.1:5555"
    publish: str = "tcp://127.0.0.1:5556"
    command: str = "tcp://127.0.0.1:5557"

    def __post_init__(self) -> None:
        seen = set()
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"[endpoints] {f.name} must be a tcp://, ipc:// or inproc:// address, got {value!r}")
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
    target_room_mm : (3,) tuple
        Planned target point whose deviation is gated, room frame mm (isocentre = 0).
    pattern_noise_mm : float
        Measurement noise (1 sigma per axis, mm) the pattern processor adds.
    roi_half_size_mm : (3,) tuple
        Anatomy method: half sizes of the LPS-axis box around the isocentre
        that is registered (the target vertebra), mm.
    """

    method: str = "pattern"
    imagers: tuple[str, ...] = ("A", "B")
    geometry: Path | None = None
    ct: Path | None = None
    isocentre_lps_mm: tuple[float, float, float] | None = None
    fiducials: Path | None = None
    dicom: Path | None = None
    target_room_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern_noise_mm: float = 0.05
    roi_half_size_mm: tuple[float, float, float] = (30.0, 30.0, 15.0)

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
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
        for name in ("isocentre_lps_mm", "target_room_mm", "roi_half_size_mm"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise ConfigError(f"[plan] {name} must be 3 finite numbers (mm), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not (isinstance(self.pattern_noise_mm, (int, float)) and math.isfinite(self.pattern_noise_mm)
                and self.pattern_noise_mm >= 0):
            raise ConfigError(f"[plan] pattern_noise_mm must be >= 0, got {self.pattern_noise_mm!r}")
        needs = {"fiducial": ("geometry", "fiducials", "isocentre_lps_mm", "ct"),
                 "anatomy": ("geometry", "ct", "isocentre_lps_mm"), "pattern": ()}[self.method]
        if self.dicom is not None:
            if self.ct is not None or self.fiducials is not None:
                raise ConfigError("[plan] give either dicom (a DICOM plan folder) or ct/fiducials, not both")
            needs = ("geometry",) if self.method != "pattern" else ()
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"[plan] method '{self.method}' needs {missing}")


@dataclass(frozen=True, slots=True)
class CouchConfig:
    """The couch: 6 degrees of freedom, or 4 (translations + yaw; pitch/roll residual reported)."""

    dof: int = 6

    def __post_init__(self) -> None:
        if self.dof not in (4, 6) or isinstance(self.dof, bool):
            raise ConfigError(f"[couch] dof must be 4 or 6, got {self.dof!r}")


@dataclass(frozen=True, slots=True)
class SetupConfig:
    """Patient setup: ``approval = "manual"`` (a console sends ``approve_correction``) or ``"automatic"`` (simulation)."""

    approval: str = "manual"

    def __post_init__(self) -> None:
        if self.approval not in ("manual", "automatic"):
            raise ConfigError(f"[setup] approval must be 'manual' or 'automatic', got {self.approval!r}")


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """CurveZMQ keys (``spineguide keys``). Both set -> CURVE on every endpoint; both unset -> plain TCP.

    Attributes
    ----------
    server_secret_key : Path or None
        The server's ``.key_secret`` certificate file.
    allowed_clients : Path or None
        Folder of client public ``.key`` certificate files (the allow-list).
    """

    server_secret_key: Path | None = None
    allowed_clients: Path | None = None

    def __post_init__(self) -> None:
        if (self.server_secret_key is None) != (self.allowed_clients is None):
            raise ConfigError("[security] server_secret_key and allowed_clients must be given together")
        for name in ("server_secret_key", "allowed_clients"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    @property
    def enabled(self) -> bool:
        return self.server_secret_key is not None


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
            ae, at, rest = str(self.dicom_archive).partition("@")
            host, colon, port = rest.rpartition(":")
            if not (ae and at and host and colon and port.isdigit()):
                raise ConfigError(f"[record] dicom_archive must be AE@HOST:PORT, got {self.dicom_archive!r}")
        if not isinstance(self.raw_frames, bool):
            raise ConfigError(f"[record] raw_frames must be true or false, got {self.raw_frames!r}")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The whole service configuration."""

    safety: SafetyConfig = field(default_factory=SafetyConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    couch: CouchConfig = field(default_factory=CouchConfig)
    setup: SetupConfig = field(default_factory=SetupConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    record: RecordConfig = field(default_factory=RecordConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings), for the log and the session record."""
        def clean(obj):
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            if isinstance(obj, Path):
                return str(obj)
            return obj
        return clean(asdict(self))


_SECTIONS = {
    "safety": SafetyConfig,
    "endpoints": EndpointsConfig,
    "plan": PlanConfig,
    "couch": CouchConfig,
    "setup": SetupConfig,
    "security": SecurityConfig,
    "record": RecordConfig,
}


def config_from_dict(data: dict[str, Any], where: str = "<config>", base_dir: Path | None = None) -> ServiceConfig:
    """Build a :class:`ServiceConfig` from a parsed TOML/JSON mapping.

    Relative paths are taken relative to ``base_dir`` (the config file's folder).

    Raises
    ------
    ConfigError
        Unknown section or key, wrong type, invalid value; the message names
        ``where``, the section and the key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: configuration must be a table, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; expected some of {sorted(_SECTIONS)}")
    parts = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {type(table).__name__}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(table) - known)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} in [{name}]; expected some of {sorted(known)}")
        values = dict(table)
        if base_dir is not None:
            for key, value in values.items():
                if key in ("geometry", "ct", "fiducials", "dicom", "server_secret_key", "allowed_clients", "path",
                           "dicom_exports") and \
                        isinstance(value, str) and not os.path.isabs(value):
                    values[key] = base_dir / value
        try:
            parts[name] = cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: [{name}] {err}") from err
    return ServiceConfig(**parts)


def load_config(path: str | os.PathLike) -> ServiceConfig:
    """Read and validate a TOML service configuration file.

    Raises
    ------
    ConfigError
        Missing or unreadable file, invalid TOML, or any invalid value (the
        message names the file, section and key).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the configuration: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from err
    return config_from_dict(data, str(p), p.parent)


def log_config(config: ServiceConfig, logger: logging.Logger = log) -> None:
    """Log every value at start-up, the safety section first."""
    d = config.to_dict()
    logger.info("safety: %s", d.pop("safety"))
    for name, section in d.items():
        logger.info("%s: %s", name, section)
