"""The service's configuration file: read, validated (:mod:`spineguide.tracking.service.config`), and the files it names
opened at start-up rather than at the first ``load_plan``.

Apart from :mod:`~spineguide.tracking.service.config` (the values and their ranges) because opening the named files
needs the plan loader (:mod:`~spineguide.tracking.service.plan`) and the key loaders
(:mod:`~spineguide.tracking.service.security`), which themselves use the configuration's values.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from ..errors import ConfigError, TrackingError
from .config import PlanConfig, ServiceConfig, config_from_dict

__all__ = ["MAX_CONFIG_BYTES", "load_config", "check_files_of"]


#: Largest configuration file read, bytes (a real one is a few kB).
MAX_CONFIG_BYTES = 1 * 2**20


def load_config(path: str | os.PathLike, check_files: bool = True) -> ServiceConfig:
    """Read and validate a TOML service configuration file, and (``check_files``) the files it names.

    Raises
    ------
    ConfigError
        Missing or unreadable file, invalid TOML, any invalid value (the
        message names the file, section and key), or a plan, key or roles file
        that is missing, unreadable or inconsistent (:func:`check_files_of`).
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder, not a configuration file")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {size} bytes, larger than a configuration can be ({MAX_CONFIG_BYTES} bytes)")
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the configuration: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from err
    except ValueError as err:  # an integer beyond Python's digit limit
        raise ConfigError(f"{p}: not a usable configuration: {err}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a usable configuration: values nested too deeply") from None
    config = config_from_dict(data, str(p), p.parent)
    if check_files:
        check_files_of(config, str(p))
    return config


def _readable(where: str, key: str, path: Path, folder: bool = False) -> None:
    section, _, name = key.rpartition(".")
    try:
        ok = path.is_dir() if folder else path.is_file()
        ok = ok and os.access(path, os.R_OK)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{where}: [{section}] {name} = '{path}': "
                          f"no readable {'folder' if folder else 'file'} there")


def check_files_of(config: ServiceConfig, where: str = "<config>") -> None:
    """Open what the configuration names, at start-up rather than at the first ``load_plan``.

    The plan's geometry (``kv-geometry/1``, naming both ``[plan] imagers``),
    fiducials (``fiducials/1``), CT and DICOM folder, then (fiducial and
    anatomy methods) the plan as ``load_plan`` will load it: the isocentre
    inside the CT, seeds all inside the CT (fiducial), a region of interest
    (anatomy); the CURVE server key, allow-list and ``roles.toml``.

    Raises
    ------
    ConfigError
        Naming the configuration, the key, the file and what is wrong.
    """
    for entry in config.catalogue:
        _check_plan_files(entry, where, "plan" if not config.plans else f"plans.{entry.plan_id}")
    sec = config.security
    if sec.enabled:
        from ..errors import SecurityError
        from .security import load_allow_list, load_key_pair

        _readable(where, "security.server_secret_key", sec.server_secret_key)
        _readable(where, "security.allowed_clients", sec.allowed_clients, folder=True)
        try:
            server = load_key_pair(sec.server_secret_key)
            if server.secret is None:
                raise SecurityError(f"{sec.server_secret_key}: holds no secret key (use the .key_secret file)")
            load_allow_list(sec.allowed_clients)
        except SecurityError as err:
            raise ConfigError(f"{where}: [security] {err}") from err


def _check_plan_files(entry, where: str, section: str) -> None:
    """One catalogue plan's files (``section``: ``plan`` or ``plans.<id>``, as the messages name it)."""
    plan = entry.plan
    if plan.geometry is not None:
        from spineguide.calibration.errors import CalibrationError
        from spineguide.calibration.io import read_geometry

        _readable(where, f"{section}.geometry", plan.geometry)
        try:
            geometry = read_geometry(plan.geometry)
        except (CalibrationError, OSError, ValueError) as err:
            raise ConfigError(f"{where}: [{section}] geometry = '{plan.geometry}': {err}") from err
        missing = [n for n in plan.imagers if n not in geometry.names]
        if missing:
            raise ConfigError(f"{where}: [{section}] geometry = '{plan.geometry}' has imagers {list(geometry.names)}, "
                              f"not {missing} named by [{section}] imagers")
    if plan.fiducials is not None:
        from spineguide.registration.errors import RegistrationError
        from spineguide.registration.io import read_fiducials

        _readable(where, f"{section}.fiducials", plan.fiducials)
        try:
            read_fiducials(plan.fiducials)
        except (RegistrationError, OSError, ValueError) as err:
            raise ConfigError(f"{where}: [{section}] fiducials = '{plan.fiducials}': {err}") from err
    if plan.ct is not None:
        try:
            folder = plan.ct.is_dir()
        except (OSError, ValueError):
            folder = False
        _readable(where, f"{section}.ct", plan.ct, folder=folder)
    if plan.dicom is not None:
        _readable(where, f"{section}.dicom", plan.dicom, folder=True)
    if plan.method in ("fiducial", "anatomy"):
        treatment = _check_treatment_plan(plan, where, section)
        patient = getattr(treatment, "patient", None)
        if entry.patient_id is not None and patient is not None and patient.patient_id.strip() and \
                patient.patient_id.strip() != entry.patient_id:
            raise ConfigError(f"{where}: [{section}] patient_id = {entry.patient_id!r}, but the plan "
                              f"{entry.source} is for patient {patient.patient_id.strip()!r}")


def _check_treatment_plan(plan: PlanConfig, where: str, section: str = "plan"):
    """Load the plan as ``load_plan`` will (the one plan loader) and check that its parts agree.

    The isocentre lies inside the CT; a fiducial plan has planned seeds,
    all inside the CT; an anatomy plan has a region of interest. Raises
    ConfigError naming the configuration and the file.
    """
    import numpy as np

    from spineguide.calibration.errors import CalibrationError
    from spineguide.registration.errors import RegistrationError

    from .plan import anatomy_roi, load_treatment_plan

    source = plan.dicom if plan.dicom is not None else plan.ct
    try:
        treatment = load_treatment_plan(plan)
    except (RegistrationError, CalibrationError, TrackingError, OSError, ValueError) as err:
        raise ConfigError(f"{where}: [{section}] {source}: {err}") from err
    ct = treatment.ct
    if not ct.contains_lps_mm(treatment.isocentre_lps_mm)[0]:
        raise ConfigError(f"{where}: [{section}] the isocentre {np.round(treatment.isocentre_lps_mm, 2).tolist()} "
                          f"(LPS mm) lies outside the CT {ct.source}")
    if plan.method == "fiducial":
        seeds = treatment.fiducials
        named = plan.fiducials if plan.fiducials is not None else source
        if seeds is None:
            raise ConfigError(f"{where}: [{section}] {named}: the fiducial method needs planned seeds; the plan has none")
        inside = ct.contains_lps_mm(seeds.positions_lps_mm)
        if not np.all(inside):
            outside = [n for n, ok in zip(seeds.names, inside) if not ok]
            raise ConfigError(f"{where}: [{section}] {named}: seeds {outside} lie outside the CT {ct.source}")
    else:
        try:
            anatomy_roi(plan, treatment)
        except (RegistrationError, TrackingError, ValueError) as err:
            raise ConfigError(f"{where}: [{section}] {source}: no usable anatomy region of interest: {err}") from err
    return treatment
