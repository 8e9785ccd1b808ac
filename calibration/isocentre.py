"""Where the treatment (MV) isocentre is, from outside the kV fit, and the kV isocentre against it (issue 13 item 4).

A BB-phantom calibration cannot find the room's origin from kV images: moving
the phantom and both imagers together changes no image. The origin -- the
treatment machine's isocentre -- must come from outside the fit:

- a **Winston-Lutz result** (:func:`read_winston_lutz`, ``winston-lutz/1``
  JSON): the MV images of the phantom's centre BB at several gantry/couch
  angles give the BB's offset from the radiation isocentre, room frame, with
  its uncertainty. It fixes the phantom's translation, not its rotation;
- a **laser-aligned pose** given by the user (:func:`laser_pose`): the phantom
  set up on the room lasers, translation and rotation as read off them (or
  zero), with the lasers' uncertainty.

:class:`IsocentreReference` places the phantom for the solve
(``room = R_ref p + t_ref``, room frame IEC 61217, origin at the MV
isocentre, mm and degrees); the fit adds the phantom's rotation where couch
shifts in two directions make it observable (the couch axes are the room
axes), so the phantom's 6-DoF pose is reference translation + fitted
rotation. :class:`KvIsocentre` then states where the calibrated kV system
puts the MV isocentre: the geometry's own error at the isocentre propagated
from the fit's covariance, combined with the reference's uncertainty, and --
when a Winston-Lutz result and a laser pose are both given -- the lasers'
disagreement with the MV isocentre, which is the one figure here that no kV
image can make small by construction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from .errors import IsocentreReferenceError
from .foundation import readonly_array
from .jsonfile import parse_json_bytes
from .phantom import BBPhantom, Marker

__all__ = [
    "WINSTON_LUTZ_SCHEMA",
    "TG142_SRS_COINCIDENCE_MM",
    "LASER_SIGMA_MM",
    "LASER_SIGMA_DEG",
    "IsocentreReferenceError",
    "IsocentreReference",
    "KvIsocentre",
    "read_winston_lutz",
    "laser_pose",
    "kv_isocentre",
]

WINSTON_LUTZ_SCHEMA = "winston-lutz/1"
#: TG-142 (Klein et al., Med. Phys. 36(9) 2009), SRS/SBRT: imaging and treatment coordinate coincidence, mm.
TG142_SRS_COINCIDENCE_MM = 1.0
#: 1-sigma of a phantom set up on room lasers, per axis (laser line width ~1 mm; TG-142 laser tolerance 1 mm), mm.
LASER_SIGMA_MM = 0.5
#: 1-sigma of a laser-aligned phantom's rotation per axis (a 1 mm laser line over a 120 mm face), degrees.
LASER_SIGMA_DEG = 0.5


def _vec3(value, what: str) -> np.ndarray:
    try:
        v = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise IsocentreReferenceError(f"{what} must be 3 numbers, got {value!r}") from err
    if v.shape == ():
        v = np.full(3, float(v))
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise IsocentreReferenceError(f"{what} must be 3 finite numbers, got {value!r}")
    v.setflags(write=False)
    return v


@dataclass(frozen=True, slots=True)
class IsocentreReference:
    """The phantom's pose relative to the MV isocentre, known from outside the kV images.

    Room frame IEC 61217 with the origin at the MV isocentre:
    ``room = R(rotation_deg) p + centre_bb_mm`` for a marker ``p`` of the
    phantom file (rotation vector in degrees, about the centre BB).

    Attributes
    ----------
    centre_bb_mm : (3,) array
        The centre BB's position, mm.
    sigma_mm : (3,) array
        Its 1-sigma per axis, mm.
    rotation_deg : (3,) array
        The phantom's rotation (rotation vector), degrees; zero when the reference does not measure it.
    rotation_sigma_deg : (3,) array
        1-sigma per axis, degrees.
    kind : str
        ``"winston-lutz"`` or ``"laser-pose"``.
    source : str
        Where it came from (file name, machine, date), for the report.
    """

    centre_bb_mm: np.ndarray
    sigma_mm: np.ndarray
    rotation_deg: np.ndarray
    rotation_sigma_deg: np.ndarray
    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("centre_bb_mm", "sigma_mm", "rotation_deg", "rotation_sigma_deg"):
            object.__setattr__(self, name, _vec3(getattr(self, name), f"isocentre reference: {name}"))
        if np.any(self.sigma_mm < 0) or np.any(self.rotation_sigma_deg < 0):
            raise IsocentreReferenceError("isocentre reference: uncertainties must not be negative")
        if self.kind not in ("winston-lutz", "laser-pose"):
            raise IsocentreReferenceError(f"isocentre reference: kind must be 'winston-lutz' or 'laser-pose', got {self.kind!r}")

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) rotation matrix ``R``."""
        return Rotation.from_rotvec(np.radians(self.rotation_deg)).as_matrix()

    def place(self, phantom: BBPhantom) -> BBPhantom:
        """The phantom as this reference places it: markers rotated about the centre BB, ``centre_offset_mm`` = ``centre_bb_mm``.

        The result's ``placed_mm(shift, R_fit)`` is ``R_fit R_ref p + t_ref + shift``, room frame, mm.
        """
        r = self.rotation
        markers = tuple(Marker(m.name, r @ m.position_mm, m.diameter_mm, m.material) for m in phantom.markers)
        return BBPhantom(markers, phantom.name, self.centre_bb_mm, _rotated_body(phantom.body, r))

    def describe(self) -> str:
        t = ", ".join(f"{v:+.2f}" for v in self.centre_bb_mm)
        s = ", ".join(f"{v:.2f}" for v in self.sigma_mm)
        what = "Winston-Lutz result" if self.kind == "winston-lutz" else "laser-aligned pose given by the user"
        return f"{what}{' (' + self.source + ')' if self.source else ''}: centre BB at ({t}) +- ({s}) mm from the MV isocentre"


def _rotated_body(body, r: np.ndarray):
    """The body is only rendered, never fitted: kept for a zero rotation, dropped (not modelled) otherwise."""
    return body if np.allclose(r, np.eye(3)) else None


def read_winston_lutz(path: str | os.PathLike) -> IsocentreReference:
    """Read a ``winston-lutz/1`` file: the phantom's centre BB measured against the MV isocentre.

    Format (JSON object)::

        {"schema": "winston-lutz/1",
         "machine": "Linac 2", "date": "2026-12-06", "operator": "...",    # optional, for the report
         "centre_bb_from_mv_isocentre_mm": [dx, dy, dz],                  # room frame IEC 61217, mm
         "sigma_mm": 0.1}                                                  # 1-sigma, one number or three

    The BB's rotation is not measured by a Winston-Lutz test: it is taken as
    zero with the lasers' uncertainty (:data:`LASER_SIGMA_DEG`); a fit with
    couch shifts in two directions measures it instead.

    Raises
    ------
    IsocentreReferenceError
        Missing file, bad JSON, wrong schema, missing or non-finite fields (the message names file and field).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: cannot read it: {err.strerror or err}") from err
    obj = parse_json_bytes(raw, f"Winston-Lutz file {p}", IsocentreReferenceError)
    if not isinstance(obj, dict):
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: expected a JSON object")
    if obj.get("schema") != WINSTON_LUTZ_SCHEMA:
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: schema must be {WINSTON_LUTZ_SCHEMA!r}, got {obj.get('schema')!r}")
    if "centre_bb_from_mv_isocentre_mm" not in obj:
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: missing 'centre_bb_from_mv_isocentre_mm'")
    if "sigma_mm" not in obj:
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: missing 'sigma_mm' (the result's 1-sigma)")
    try:
        t = _vec3(obj["centre_bb_from_mv_isocentre_mm"], "centre_bb_from_mv_isocentre_mm")
        s = _vec3(obj["sigma_mm"], "sigma_mm")
    except IsocentreReferenceError as err:
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: {err}") from err
    if np.any(s <= 0):
        raise IsocentreReferenceError(f"Winston-Lutz file {p}: sigma_mm must be positive, got {s.tolist()}")
    info = ", ".join(str(obj[k]) for k in ("machine", "date", "operator") if isinstance(obj.get(k), str))
    return IsocentreReference(t, s, np.zeros(3), np.full(3, LASER_SIGMA_DEG), "winston-lutz",
                              f"{p.name}{'; ' + info if info else ''}")


def laser_pose(translation_mm=(0.0, 0.0, 0.0), rotation_deg=(0.0, 0.0, 0.0), *, sigma_mm=LASER_SIGMA_MM,
               sigma_deg=LASER_SIGMA_DEG, source: str = "") -> IsocentreReference:
    """A phantom pose read off the room lasers by the user, room frame (origin: the isocentre the lasers show), mm / deg."""
    return IsocentreReference(translation_mm, sigma_mm, rotation_deg, sigma_deg, "laser-pose", source)


@dataclass(frozen=True, slots=True)
class KvIsocentre:
    """The calibrated kV system's isocentre against the external MV reference.

    Attributes
    ----------
    reference : IsocentreReference or None
        None: no external reference -- the kV isocentre is wherever the
        phantom was placed, an assumption the images cannot check.
    offset_mm : (3,) array
        The centre BB as the new kV geometry triangulates it (mean over couch
        positions) minus where the reference puts it, room frame, mm. Near
        zero by construction (the reference fixed the fit's gauge); its
        spread is the fit's noise.
    fit_sigma_mm : (3,) array
        1-sigma of the kV geometry at the isocentre, propagated from the
        fit's parameter covariance (mm).
    total_sigma_mm : (3,) array
        ``fit_sigma ⊕ reference sigma`` per axis: how well the kV isocentre is tied to the MV isocentre.
    phantom_rotation_deg : (3,) array
        The phantom's rotation in the room (fitted when the couch shifts allow, else the reference's), degrees.
    phantom_rotation_sigma_deg : (3,) array
    rotation_fitted : bool
    laser_vs_mv_mm : (3,) array or None
        When a laser pose was given besides a Winston-Lutz result: the laser
        pose's translation minus the Winston-Lutz one (mm) -- the lasers'
        disagreement with the MV isocentre, independent of the kV fit.
    laser_vs_mv_sigma_mm : (3,) array or None
    limit_mm : float
        TG-142 SRS coincidence tolerance.
    verdict : str
        ``"within tolerance"``, ``"out of tolerance"`` or ``"not verified"`` (no reference).
    """

    reference: IsocentreReference | None
    offset_mm: np.ndarray
    fit_sigma_mm: np.ndarray
    total_sigma_mm: np.ndarray
    phantom_rotation_deg: np.ndarray
    phantom_rotation_sigma_deg: np.ndarray
    rotation_fitted: bool
    laser_vs_mv_mm: np.ndarray | None
    laser_vs_mv_sigma_mm: np.ndarray | None
    limit_mm: float
    verdict: str

    @property
    def expanded_distance_mm(self) -> float:
        """``|offset| + 2 |total sigma|`` (about 95 % coverage), mm: what the verdict compares with the limit."""
        return float(np.linalg.norm(self.offset_mm) + 2.0 * np.linalg.norm(self.total_sigma_mm))

    def lines(self) -> tuple[str, ...]:
        """Plain-language lines for reports and the command line."""
        out = []
        if self.reference is None:
            out.append("kV isocentre NOT VERIFIED: no Winston-Lutz result or laser pose was given, so the room "
                       "origin is wherever the phantom's centre BB was assumed to be (the fit cannot check it)")
        else:
            out.append(f"reference: {self.reference.describe()}")
            out.append(f"kV isocentre vs MV isocentre: offset ({', '.join(f'{v:+.3f}' for v in self.offset_mm)}) mm, "
                       f"1-sigma ({', '.join(f'{v:.3f}' for v in self.total_sigma_mm)}) mm (fit "
                       f"{np.linalg.norm(self.fit_sigma_mm):.3f} mm, reference {np.linalg.norm(self.reference.sigma_mm):.3f} mm); "
                       f"|offset| + 2 sigma = {self.expanded_distance_mm:.2f} mm vs TG-142 SRS {self.limit_mm:g} mm: "
                       f"{self.verdict}")
        how = "fitted from the couch shifts" if self.rotation_fitted else "taken from the reference (not fitted)"
        out.append(f"phantom rotation in the room: ({', '.join(f'{v:+.3f}' for v in self.phantom_rotation_deg)}) deg "
                   f"+- ({', '.join(f'{v:.3f}' for v in self.phantom_rotation_sigma_deg)}), {how}")
        if self.laser_vs_mv_mm is not None:
            d = float(np.linalg.norm(self.laser_vs_mv_mm))
            out.append(f"lasers vs MV isocentre (laser pose minus Winston-Lutz): "
                       f"({', '.join(f'{v:+.2f}' for v in self.laser_vs_mv_mm)}) mm, |d| = {d:.2f} mm"
                       + (" -- check the lasers" if d > self.limit_mm else ""))
        return tuple(out)


def kv_isocentre(result, reference: IsocentreReference | None, laser: IsocentreReference | None = None,
                 *, limit_mm: float = TG142_SRS_COINCIDENCE_MM) -> KvIsocentre:
    """Build :class:`KvIsocentre` from a :class:`~spineguide.calibration.solve.CalibrationResult`.

    ``fit_sigma_mm``: the point the calibrated stereo pair triangulates for
    the true isocentre moves with the fitted parameters as
    ``dX = -pinv(J_X) J_theta dtheta``; its covariance is
    ``A cov_theta A^T`` (numerical Jacobians of the projection, px per mm and
    per parameter unit). ``laser`` is compared with ``reference`` when both are given.
    """
    iso = result.isocentre
    offset = np.array(iso.centre_bb_room_mm) - (reference.centre_bb_mm if reference is not None else
                                                 result.phantom.centre_offset_mm)
    fit_sigma = np.sqrt(np.maximum(np.diag(result.isocentre_covariance_mm2), 0.0))
    ref_sigma = reference.sigma_mm if reference is not None else np.zeros(3)
    total = np.sqrt(fit_sigma**2 + ref_sigma**2)
    if result.phantom_rotation is not None:
        w = Rotation.from_matrix(result.phantom_rotation_matrix).as_rotvec(degrees=True)
        w_sig = np.array([p.sigma for p in result.phantom_rotation])
        fitted = True
    else:
        w = reference.rotation_deg if reference is not None else np.zeros(3)
        w_sig = reference.rotation_sigma_deg if reference is not None else np.full(3, math.nan)
        fitted = False
    lvm = lvm_s = None
    if laser is not None and reference is not None and reference is not laser:
        lvm = laser.centre_bb_mm - reference.centre_bb_mm
        lvm_s = np.sqrt(laser.sigma_mm**2 + reference.sigma_mm**2)
    if reference is None:
        verdict = "not verified"
    else:
        expanded = float(np.linalg.norm(offset) + 2.0 * np.linalg.norm(total))
        verdict = "within tolerance" if expanded <= limit_mm else "out of tolerance"
    ro = readonly_array
    return KvIsocentre(reference, ro(offset), ro(fit_sigma), ro(total), ro(w), ro(w_sig), fitted,
                       None if lvm is None else ro(lvm), None if lvm_s is None else ro(lvm_s),
                       float(limit_mm), verdict)
