"""Console configuration: a frozen, validated value built once at start-up.

Most of it comes from the service's own TOML configuration
(:func:`console_config_from_service`): the endpoints to connect to, the
record (whose raw frames the console displays), the correction limits, the
approval mode and the plan (planned seeds projected for the overlays).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ConsoleConfigError
from ..service.config import RANGES, Range, check_endpoint
from ..service.record import frames_folder
from ..service.security import ClientKeys

__all__ = ["CONSOLE_RANGES", "ConsoleConfig", "ConsoleConfigError", "PlannedSeeds", "connect_address",
           "console_config_from_service"]

#: Shortest login token accepted (characters): a token guessable by hand protects nothing.
MIN_TOKEN_CHARS = 16
#: The console's own numbers and their ranges (the service's limits and tolerance it shows are held
#: to the service's ranges, tracking.config.RANGES).
CONSOLE_RANGES: dict[str, Range] = {
    "port": Range(0, 65535, "1", "HTTP port (0: the OS picks one)", integer=True),
    "display_pixels": Range(32, 2048, "px", "longest side of a displayed frame", integer=True),
    "timeline_s": Range(0.0, 3600.0, "s", "length of the deviation timeline kept and shown", lo_open=True),
    "correction_limit_mm": RANGES["safety"]["correction_limit_mm"],
    "correction_limit_deg": RANGES["safety"]["correction_limit_deg"],
    "tolerance_3d_mm": RANGES["safety"]["tolerance_3d_mm"],
    "approval_max_age_s": RANGES["safety"]["approval_max_age_s"],
    "approval_pixels": Range(128, 2048, "px", "longest side of the proposal's frames on the approval screen",
                             integer=True),
    "second_signoff_mm": Range(0.0, 50.0, "mm", "a correction longer than this needs a second sign-off",
                               lo_open=True),
    "second_signoff_deg": Range(0.0, 10.0, "deg", "a correction rotating more than this needs a second sign-off",
                                lo_open=True),
}


@dataclass(frozen=True, slots=True)
class PlannedSeeds:
    """Planned seed centres in the room frame at perfect setup (mm), with names, and the stereo geometry."""

    names: tuple[str, ...]
    points_room_mm: np.ndarray
    geometry: object  # calibration.geometry.StereoGeometry

    def __post_init__(self) -> None:
        pts = np.array(self.points_room_mm, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] != len(self.names) or not np.all(np.isfinite(pts)):
            raise ConsoleConfigError(f"planned seeds: need {len(self.names)} finite (x, y, z) room points (mm), "
                                     f"got shape {pts.shape}")
        pts.setflags(write=False)
        object.__setattr__(self, "points_room_mm", pts)
        object.__setattr__(self, "names", tuple(self.names))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """Everything the console needs, validated (numbers held to :data:`CONSOLE_RANGES`).

    Attributes
    ----------
    publish_address, command_address : str
        The service's PUB and command (ROUTER) endpoints to connect to.
    host : str
        HTTP bind address; loopback unless ``allow_remote`` (the page commands the service).
    port : int
        HTTP port (0: the OS picks one; see :attr:`ConsoleServer.url`).
    login_token : str or None
        Token an operator types at login; None: the console is read-only (no command is possible).
    client_keys : ClientKeys or None
        CURVE keys when the service runs with ``[security]``.
    frames_folder : Path or None
        The service record's raw-frame folder (``<record>.frames``): the source of the displayed kV frames.
    records_folder : Path or None
        Folder of recorded sessions (``*.jsonl``) for the review.
    qa_history : Path or None
        ``qa-record/1`` history file for the QA trend.
    calibration_report : Path or None
        Folder of the latest calibration report (``index.html`` + PNGs).
    correction_limit_mm, correction_limit_deg : float or None
        The service's correction limits (shown beside the correction); None when unknown.
    approval : str or None
        ``manual`` or ``automatic`` (the service's ``[setup] approval``); None when unknown.
    tolerance_3d_mm : float or None
        Gating tolerance until the service's ``status`` reply says otherwise.
    planned : PlannedSeeds or None
        Planned seeds and geometry for the overlays (fiducial plans).
    anatomy : display.AnatomyOverlay or None
        The target's attenuation and the geometry, for the DRR-edge overlay (anatomy plans).
    display_pixels : int
        Longest side of a displayed frame, pixels.
    timeline_s : float
        Length of the deviation timeline kept and shown, s.
    allow_remote : bool
        Permit a non-loopback ``host`` (behind a TLS proxy on a closed network only).
    plans : tuple of fraction.PlanEntry
        The plans the page offers for ``load_plan`` (the service's ``[plan]``); empty: the page cannot load one.
    record_path : Path or None
        The service's session record (``[record] path``, a link to the newest session): the console reads
        its ``command`` events to show every client's commands with their operator.
    approval_max_age_s : float or None
        The service's ``[safety] approval_max_age_s``: the page shows the proposal's expiry, the console
        refuses an approval past it. None: unknown (the service still checks).
    second_signoff_mm, second_signoff_deg : float or None
        A proposal whose translation (norm, mm) or largest rotation (deg) exceeds these needs a second
        user's sign-off (a physicist) before the approval goes to the service. None: never.
    users : users.UserStore or None
        Per-user accounts (``--users``); with it, logins are name + password and carry a role.
    approval_pixels : int
        Longest side of the proposal's frames on the approval screen, pixels.
    plan_overlays : dict or None
        For a service with a plan catalogue (``[plans]``): per ``plan_id``, ``(planned, anatomy)``, the overlays
        of that plan, used once the service says it is the loaded one (``planned``/``anatomy`` stay None:
        no plan's overlay is drawn on another's frames).
    """

    publish_address: str
    command_address: str
    host: str = "127.0.0.1"
    port: int = 8080
    login_token: str | None = None
    client_keys: ClientKeys | None = None
    frames_folder: Path | None = None
    records_folder: Path | None = None
    qa_history: Path | None = None
    calibration_report: Path | None = None
    correction_limit_mm: float | None = None
    correction_limit_deg: float | None = None
    approval: str | None = None
    tolerance_3d_mm: float | None = None
    planned: PlannedSeeds | None = None
    anatomy: object | None = None  # display.AnatomyOverlay for anatomy plans
    display_pixels: int = 256
    timeline_s: float = 300.0
    allow_remote: bool = False
    plans: tuple = ()
    record_path: Path | None = None
    approval_max_age_s: float | None = None
    second_signoff_mm: float | None = None
    second_signoff_deg: float | None = None
    users: object | None = None  # users.UserStore
    approval_pixels: int = 768
    plan_overlays: dict | None = None  # plan_id -> (PlannedSeeds or None, AnatomyOverlay or None)

    @property
    def commands_enabled(self) -> bool:
        """Whether anyone can log in and command the service from this console."""
        return self.login_token is not None or self.users is not None

    def __post_init__(self) -> None:
        for name in ("publish_address", "command_address"):
            try:
                check_endpoint(f"console: {name}", getattr(self, name))
            except ConfigError as err:
                raise ConsoleConfigError(str(err)) from None
        if not _is_loopback(self.host) and not self.allow_remote:
            raise ConsoleConfigError(f"console: host {self.host!r} is not a loopback address; the page can command "
                                     "the service, so serve it on 127.0.0.1 (or pass --allow-remote behind a TLS proxy)")
        if self.login_token is not None:
            token = self.login_token.strip()
            if len(token) < MIN_TOKEN_CHARS:
                raise ConsoleConfigError(f"console: the login token has {len(token)} characters "
                                         f"(at least {MIN_TOKEN_CHARS} expected)")
            object.__setattr__(self, "login_token", token)
        object.__setattr__(self, "plans", tuple(self.plans))
        from .fraction import PlanEntry

        if not all(isinstance(p, PlanEntry) for p in self.plans):
            raise ConsoleConfigError("console: plans must be PlanEntry values")
        if len({(p.patient_id, p.plan_id) for p in self.plans}) != len(self.plans):
            raise ConsoleConfigError("console: two plans share patient ID and plan ID")
        for name in ("frames_folder", "records_folder", "qa_history", "calibration_report", "record_path"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        for name, r in CONSOLE_RANGES.items():
            value = getattr(self, name)
            if value is None and name not in ("port", "display_pixels", "timeline_s", "approval_pixels"):
                continue  # a limit the console was not told: shown as unknown
            try:
                object.__setattr__(self, name, r.check("console", name, value))
            except ConfigError as err:
                raise ConsoleConfigError(str(err)) from None
        if self.plan_overlays is not None:
            if not isinstance(self.plan_overlays, dict) or not all(
                    isinstance(k, str) and isinstance(v, tuple) and len(v) == 2 for k, v in self.plan_overlays.items()):
                raise ConsoleConfigError("console: plan_overlays must map plan ids to (planned, anatomy)")
            if self.planned is not None or self.anatomy is not None:
                raise ConsoleConfigError("console: give per-plan overlays or the one plan's, not both")
            object.__setattr__(self, "plan_overlays", dict(self.plan_overlays))
        if self.approval not in (None, "manual", "automatic"):
            raise ConsoleConfigError(f"console: approval must be 'manual' or 'automatic', got {self.approval!r}")


def connect_address(bound: str) -> str:
    """The address a local client connects to for a service endpoint bound at ``bound`` (``*`` -> 127.0.0.1)."""
    m = re.match(r"^tcp://(\*|0\.0\.0\.0)(:\d+)$", bound)
    if m:
        return f"tcp://127.0.0.1{m.group(2)}"
    if re.match(r"^tcp://.+:(0|\*)$", bound):
        raise ConsoleConfigError(f"console: the service endpoint {bound!r} uses a random port; give the real address")
    return bound


def _load_plan(plan):
    """The service's plan as the service loads it (files or a DICOM folder); None for the pattern method."""
    if plan.method not in ("fiducial", "anatomy"):
        return None
    from ..service.plan import load_treatment_plan

    return load_treatment_plan(plan)


def _planned_seeds(plan, loaded=None) -> PlannedSeeds | None:
    """Planned seeds in the room frame for a fiducial plan (None for other methods)."""
    if plan.method != "fiducial":
        return None
    from spineguide.calibration.io import read_geometry

    # The service's own rules (files or a DICOM folder), so the console shows the seeds the service fits.
    loaded = loaded if loaded is not None else _load_plan(plan)
    if loaded.fiducials is None:
        raise ConsoleConfigError(f"console: the plan {loaded.ct.source} has no planned fiducials")
    return PlannedSeeds(loaded.fiducials.names, loaded.fiducials_room_mm(), read_geometry(plan.geometry))


def _anatomy_overlay(plan, loaded=None):
    """The registration ROI's attenuation for the DRR-edge overlay of an anatomy plan (None otherwise)."""
    if plan.method != "anatomy":
        return None
    from spineguide.calibration.io import read_geometry
    from spineguide.registration.drr import AttenuationVolume

    from ..service.plan import anatomy_roi
    from .display import AnatomyOverlay

    treatment = loaded if loaded is not None else _load_plan(plan)
    roi = anatomy_roi(plan, treatment)
    volume = AttenuationVolume.from_ct(treatment.ct, treatment.isocentre_lps_mm).masked(roi.mask)
    return AnatomyOverlay(volume, read_geometry(plan.geometry))


def console_config_from_service(service_config, **overrides) -> ConsoleConfig:
    """A :class:`ConsoleConfig` for the service configured by ``service_config`` (a ``ServiceConfig``).

    The endpoints, record frames folder, correction limits, approval mode,
    tolerance and (fiducial plans) the planned seeds come from the service's
    configuration; ``overrides`` (any :class:`ConsoleConfig` field) win.

    Raises
    ------
    ConsoleConfigError
        Random-port endpoints, or an invalid override.
    RegistrationError, CalibrationError
        The plan's files cannot be read.
    """
    rec = service_config.record
    values = {
        "frames_folder": frames_folder(rec.path) if rec.path is not None and rec.raw_frames else None,
        "records_folder": rec.path.parent if rec.path is not None else None,
        "correction_limit_mm": service_config.safety.correction_limit_mm,
        "correction_limit_deg": service_config.safety.correction_limit_deg,
        "approval": service_config.setup.approval,
        "tolerance_3d_mm": service_config.safety.tolerance_3d_mm,
        "approval_max_age_s": service_config.safety.approval_max_age_s,
        "record_path": rec.path,
    }
    values.update(overrides)
    for name in ("publish", "command"):
        if f"{name}_address" not in overrides:
            values[f"{name}_address"] = connect_address(getattr(service_config.endpoints, name))
    if service_config.plans:
        # A catalogue: each plan's overlays, chosen by the plan the service says is loaded.
        if "plan_overlays" not in overrides and not {"planned", "anatomy"} & set(overrides):
            overlays = {}
            for entry in service_config.plans:
                loaded = _load_plan(entry.plan)
                overlays[entry.plan_id] = (_planned_seeds(entry.plan, loaded), _anatomy_overlay(entry.plan, loaded))
            values["plan_overlays"] = overlays
        return ConsoleConfig(**values)
    loaded = None
    if not {"planned", "anatomy", "plans"} <= set(overrides):
        loaded = _load_plan(service_config.plan)
    if "planned" not in overrides:
        values["planned"] = _planned_seeds(service_config.plan, loaded)
    if "anatomy" not in overrides:
        values["anatomy"] = _anatomy_overlay(service_config.plan, loaded)
    if "plans" not in overrides and loaded is not None:
        from .fraction import plan_entry_from_plan

        values["plans"] = (plan_entry_from_plan(service_config.plan, loaded),)
    return ConsoleConfig(**values)
