"""Imaging-geometry calibration from a BB phantom: DLT start, physical least squares.

For each imager the measured ``(col, row)`` of the phantom's markers, at one or
more known couch positions, fix the imager's projection:

1. **Linear start** -- a normalised DLT (Hartley & Zisserman, *Multiple View
   Geometry*, 2nd ed., alg. 7.1) fits a 3x4 matrix to all marker
   correspondences; its RQ decomposition gives a source, panel axes and
   principal point, turned into a physical description with the panel's
   specified pixel pitch.
2. **Nonlinear least squares** (:func:`scipy.optimize.least_squares`) over
   the physical parameters -- source position (3), panel centre (3, the room
   point of the panel's central pixel: the same three degrees of freedom as
   the panel origin, better conditioned because the rotation pivots there),
   panel orientation (3, a rotation vector in degrees about room axes), and
   optionally the row/column pitch ratio -- minimising reprojection error in
   pixels. Optionally the phantom's rotation about its centre BB (3, shared
   by all imagers) is a further unknown. Its *translation* is not: the room
   origin is the MV isocentre, which only the phantom's setup (lasers,
   Winston-Lutz, ``centre_offset_mm``) ties the images to -- moving phantom
   and both imagers together changes no image, so a free translation would
   be a gauge freedom, not a measurement. A free rotation likewise needs
   couch shifts in at least two directions, which are known in the room frame.
3. **Uncertainties**: covariance ``s^2 (J^T J)^-1`` with ``J`` the Jacobian at
   the solution and ``s^2`` the residual variance per degree of freedom;
   derived quantities (source-panel distance, panel origin) are propagated
   through their numerical gradients.
4. **Isocentre check**: the centre BB triangulated with the new geometry at
   every couch position (shift removed) must lie within
   :data:`ISOCENTRE_FLAG_MM` of the isocentre.

Several phantom positions set with known couch shifts pin down the source
distance, which a single ~120 mm phantom barely constrains (magnification and
perspective trade off).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from .bb_detection import (
    DetectedBBs,
    DetectionError,
    ImagesSwappedError,
    MarkerCountError,
    MarkerMatch,
    _dlt,
    detect_bbs,
    match_markers,
)
from .errors import CalibrationSolveError, GeometryError
from .geometry import ImagerGeometry, StereoGeometry, rq_positive_diagonal
from .phantom import BBPhantom
from .foundation import readonly_array as _readonly

__all__ = [
    "ISOCENTRE_FLAG_MM",
    "SEARCH_PANEL_MM",
    "CalibrationSolveError",
    "PhantomView",
    "CalibrationFrame",
    "ParameterEstimate",
    "ImagerSolution",
    "IsocentreCheck",
    "CalibrationResult",
    "MeasuredFrame",
    "measure_frame",
    "solve_geometry",
    "calibrate",
    "isocentre_check",
]

#: The centre BB triangulated with a new geometry must lie within this
#: distance of the isocentre, mm (half the TG-142 SRS tolerance of 1 mm).
ISOCENTRE_FLAG_MM = 0.5
#: How far the true projections may sit from the nominal ones on the panel, mm:
#: 10 mm panel shift + 20 mm source shift (x0.64 at the panel) + 2 degrees of
#: panel rotation over a 200 mm field, with margin.
SEARCH_PANEL_MM = 50.0
#: Matching gate as a fraction of the smallest distance between two predicted
#: markers: below one half, no detection can be claimed by two markers.
GATE_FRACTION = 0.3
_MIN_MATCHED = 6  # markers per imager for a DLT (11 unknowns, 2 equations each)


@dataclass(frozen=True, slots=True)
class PhantomView:
    """The phantom's markers measured in one frame: one imager, one couch position.

    Attributes
    ----------
    imager : str
    couch_shift_mm : (3,) array
        Known couch translation from the phantom's setup position, room frame, mm.
    marker_px : (N, 2) array
        ``(col, row)`` of each phantom marker (phantom order), NaN where not found.
    source : str
        Provenance (image file name) for the geometry file's notes.
    """

    imager: str
    couch_shift_mm: np.ndarray
    marker_px: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        shift = np.array(self.couch_shift_mm, dtype=np.float64)
        if shift.shape != (3,) or not np.all(np.isfinite(shift)):
            raise CalibrationSolveError(
                f"imager '{self.imager}': couch_shift_mm must be 3 finite numbers, got {np.asarray(self.couch_shift_mm).tolist()}"
            )
        px = np.array(self.marker_px, dtype=np.float64)
        if px.ndim != 2 or px.shape[1] != 2:
            raise CalibrationSolveError(f"imager '{self.imager}': marker_px must be (N, 2), got shape {px.shape}")
        if np.any(np.isinf(px)):
            raise CalibrationSolveError(f"imager '{self.imager}': marker_px holds infinite values")
        object.__setattr__(self, "couch_shift_mm", _readonly(shift))
        object.__setattr__(self, "marker_px", _readonly(px))


@dataclass(frozen=True, slots=True)
class CalibrationFrame:
    """One raw frame of the phantom for :func:`calibrate`.

    Attributes
    ----------
    imager : str
    frame : (rows, cols) array
        Raw detector signal, ``image[row, col]``.
    couch_shift_mm : (3,) array
        Known couch translation from the setup position, room frame, mm.
    i0 : float or None
        Unattenuated signal; estimated from the frame when None.
    source : str
        Image file name, for provenance.
    """

    imager: str
    frame: np.ndarray
    couch_shift_mm: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 0.0)
    i0: float | None = None
    source: str = ""


@dataclass(frozen=True, slots=True)
class ParameterEstimate:
    """One fitted (or derived) parameter with its 1-sigma uncertainty."""

    name: str
    value: float
    sigma: float
    unit: str


@dataclass(frozen=True, slots=True)
class ImagerSolution:
    """The calibrated geometry of one imager with its fit statistics.

    Attributes
    ----------
    geometry : ImagerGeometry
    parameters : tuple of ParameterEstimate
        Source position, panel centre, panel origin and orientation, source-panel
        distance (and pixel spacing when fitted), room frame, mm / deg.
    residuals_px : (M, 2) array
        Measured minus reprojected ``(col, row)`` of every matched marker.
    residual_markers : tuple of str
        Marker name of each residual row.
    residual_views : (M,) int array
        Index into ``CalibrationResult.views`` of each residual row.
    rms_px, max_px : float
        RMS and largest reprojection error, px.
    dlt_rms_px : float
        RMS reprojection error of the linear start, px.
    sigma_px : float
        Residual standard deviation per degree of freedom (the ``s`` in ``s^2 (J^T J)^-1``), px.
    n_observations : int
        Matched markers used.
    """

    geometry: ImagerGeometry
    parameters: tuple[ParameterEstimate, ...]
    residuals_px: np.ndarray
    residual_markers: tuple[str, ...]
    residual_views: np.ndarray
    rms_px: float
    max_px: float
    dlt_rms_px: float
    sigma_px: float
    n_observations: int

    def parameter(self, name: str) -> ParameterEstimate:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(f"imager '{self.geometry.name}': no parameter '{name}'")

    def source_sigma_mm(self) -> np.ndarray:
        """(3,) 1-sigma uncertainty of the source position, room frame, mm."""
        return np.array([self.parameter(f"source_{a}_mm").sigma for a in "xyz"])


@dataclass(frozen=True, slots=True)
class IsocentreCheck:
    """The centre BB triangulated with the new geometry.

    Attributes
    ----------
    centre_bb_room_mm : (3,) array
        Mean over couch positions (each with its shift removed), room frame, mm.
    per_position_mm : (K, 3) array
        One estimate per couch position seen by every imager.
    expected_mm : (3,) array
        Where the phantom file says the centre BB sits (``centre_offset_mm``).
    distance_from_isocentre_mm : float
        ``|centre_bb_room_mm|``.
    discrepancy_mm : float
        ``|centre_bb_room_mm - expected_mm|``.
    limit_mm : float
    flagged : bool
        True when the distance from the isocentre exceeds the limit.
    """

    centre_bb_room_mm: np.ndarray
    per_position_mm: np.ndarray
    expected_mm: np.ndarray
    distance_from_isocentre_mm: float
    discrepancy_mm: float
    limit_mm: float
    flagged: bool


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    """Everything a calibration produced: geometry, per-imager fits, isocentre check.

    ``geometry`` is ready for :func:`spineguide.calibration.io.write_geometry` (timestamp and
    provenance in its ``notes``).
    """

    geometry: StereoGeometry
    imagers: tuple[ImagerSolution, ...]
    isocentre: IsocentreCheck
    views: tuple[PhantomView, ...]
    phantom_rotation: tuple[ParameterEstimate, ...] | None
    phantom: BBPhantom
    phantom_rotation_matrix: np.ndarray
    calibrated_unix_s: float
    measured: tuple = field(default=())

    @property
    def phantom_name(self) -> str:
        return self.phantom.name

    def markers_room_mm(self, view_index: int) -> np.ndarray:
        """(N, 3) marker centres of view ``view_index`` as fitted (rotation, offset, couch shift), room frame, mm."""
        view = self.views[view_index]
        return self.phantom.placed_mm(view.couch_shift_mm, self.phantom_rotation_matrix)

    def imager(self, name: str) -> ImagerSolution:
        for s in self.imagers:
            if s.geometry.name == name:
                return s
        raise KeyError(f"no imager named '{name}' in this calibration")


# --------------------------------------------------------------------------
# Projection model over physical parameters
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Reference:
    """Reference description the parameters are deltas from."""

    name: str
    source_mm: np.ndarray
    centre_mm: np.ndarray
    col_direction: np.ndarray
    row_direction: np.ndarray
    pixel_spacing_mm: np.ndarray  # (row, col)
    rows: int
    cols: int

    @classmethod
    def of(cls, g: ImagerGeometry) -> _Reference:
        centre = g.pixel_to_room(np.array([(g.cols - 1) / 2.0, (g.rows - 1) / 2.0]))
        return cls(g.name, g.source_mm.copy(), centre, g.col_direction.copy(), g.row_direction.copy(),
                   g.pixel_spacing_mm.copy(), g.rows, g.cols)


def _imager_state(ref: _Reference, x: np.ndarray, fit_aspect: bool):
    """(source, origin, u, v, row_sp, col_sp) for parameter vector x of one imager."""
    source = ref.source_mm + x[0:3]
    centre = ref.centre_mm + x[3:6]
    rot = Rotation.from_rotvec(np.radians(x[6:9])).as_matrix()
    u = rot @ ref.col_direction
    v = rot @ ref.row_direction
    row_sp, col_sp = ref.pixel_spacing_mm
    if fit_aspect:
        row_sp = row_sp * (1.0 + 1e-3 * x[9])  # x[9] in per mille
    origin = centre - (ref.cols - 1) / 2.0 * col_sp * u - (ref.rows - 1) / 2.0 * row_sp * v
    return source, origin, u, v, row_sp, col_sp


def _project(state, pts: np.ndarray) -> np.ndarray:
    source, origin, u, v, row_sp, col_sp = state
    n = np.cross(u, v)
    d_mm = float((origin - source) @ n)
    rel = pts - source
    w = rel @ n
    hit = source + (d_mm / w)[:, None] * rel - origin
    return np.stack([hit @ u / col_sp, hit @ v / row_sp], axis=1)


def _geometry_of(ref: _Reference, x: np.ndarray, fit_aspect: bool) -> ImagerGeometry:
    source, origin, u, v, row_sp, col_sp = _imager_state(ref, x, fit_aspect)
    return ImagerGeometry(ref.name, source, origin, u, v, (row_sp, col_sp), ref.rows, ref.cols)


# --------------------------------------------------------------------------
# Linear start
# --------------------------------------------------------------------------
def _start_from_dlt(p: np.ndarray, nominal: ImagerGeometry, points_mm: np.ndarray) -> ImagerGeometry:
    """Physical description nearest a DLT matrix, with the nominal pixel pitch."""
    m = p[:, :3]
    source = -np.linalg.solve(m, p[:, 3])
    k, r = rq_positive_diagonal(m)
    if np.linalg.det(r) < 0:
        r, k = -r, -k
    k = k / k[2, 2]
    u, v, n = r[0], r[1], r[2]
    # n must point from the source towards the phantom.
    if (points_mm.mean(axis=0) - source) @ n < 0:
        n = -n
        u, v = -u, -v  # keeps (col, row) increasing along u, v: K absorbs the flip of both focal lengths
        k = k @ np.diag([-1.0, -1.0, 1.0])
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    row_sp, col_sp = nominal.pixel_spacing_mm
    d_mm = 0.5 * (abs(fx) * col_sp + abs(fy) * row_sp)
    foot = source + d_mm * n
    origin = foot - cx * col_sp * u - cy * row_sp * v
    return ImagerGeometry(nominal.name, source, origin, u * np.sign(fx), v * np.sign(fy), nominal.pixel_spacing_mm,
                          nominal.rows, nominal.cols)


# --------------------------------------------------------------------------
# Solve
# --------------------------------------------------------------------------
def _shift_directions_rank(shifts: np.ndarray) -> int:
    nz = shifts[np.linalg.norm(shifts, axis=1) > 1e-6]
    if len(nz) == 0:
        return 0
    diffs = shifts[:, None] - shifts[None]
    return int(np.linalg.matrix_rank(diffs.reshape(-1, 3), tol=1e-3))


def solve_geometry(
    phantom: BBPhantom,
    views: Sequence[PhantomView],
    nominal: StereoGeometry,
    *,
    fit_pixel_aspect: bool = False,
    free_phantom_rotation: bool = False,
    calibrated_unix_s: float | None = None,
    provenance: str = "",
) -> CalibrationResult:
    """Solve every imager's geometry from measured marker positions.

    Parameters
    ----------
    phantom : BBPhantom
        Marker positions (room frame, mm) with the phantom at its setup place.
    views : sequence of PhantomView
        Measured marker pixels; every imager of ``nominal`` needs at least one
        view, and several couch positions pin down the source distance.
    nominal : StereoGeometry
        Names, panel sizes and pixel pitch (from the panel's specification);
        its positions are only a fallback start.
    fit_pixel_aspect : bool
        Also fit the row pitch (the column pitch stays at its specification:
        pitch and source-panel distance trade off exactly).
    free_phantom_rotation : bool
        Fit the phantom's rotation about its centre BB (3 shared unknowns);
        needs couch shifts in at least two independent directions.
    calibrated_unix_s : float, optional
        Time stamp for the geometry file (now when omitted).
    provenance : str
        Free text (phantom file, image files) written into the geometry's notes.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    CalibrationSolveError
        An imager without views or with fewer than 6 markers, views of
        unknown imagers or of the wrong marker count, a free phantom rotation
        that the couch shifts cannot fix, or a fit that does not converge.
    """
    views = tuple(views)
    names = nominal.names
    n_markers = phantom.n_markers
    for view in views:
        if view.imager not in names:
            raise CalibrationSolveError(f"view of unknown imager '{view.imager}' (geometry has {', '.join(names)})")
        if view.marker_px.shape[0] != n_markers:
            raise CalibrationSolveError(
                f"imager '{view.imager}': view has {view.marker_px.shape[0]} marker positions, "
                f"phantom '{phantom.name}' has {n_markers}"
            )
    per_imager = {name: [i for i, v in enumerate(views) if v.imager == name] for name in names}
    for name, idx in per_imager.items():
        n_obs = sum(int(np.count_nonzero(np.all(np.isfinite(views[i].marker_px), axis=1))) for i in idx)
        if n_obs < _MIN_MATCHED:
            raise CalibrationSolveError(
                f"imager '{name}': {n_obs} measured markers over {len(idx)} views, at least {_MIN_MATCHED} are needed"
            )
    if free_phantom_rotation:
        rank = _shift_directions_rank(np.array([v.couch_shift_mm for v in views]))
        if rank < 2:
            raise CalibrationSolveError(
                "free_phantom_rotation needs couch shifts in at least two independent directions "
                f"(found {rank}): otherwise a rotation of the phantom and of both imagers about the "
                "isocentre give the same images"
            )

    # Observations per imager: 3D nominal marker (before rotation), shift, pixels.
    obs = {}
    for name, idx in per_imager.items():
        p_list, s_list, px_list, mk, vw = [], [], [], [], []
        for i in idx:
            ok = np.all(np.isfinite(views[i].marker_px), axis=1)
            p_list.append(phantom.positions_mm[ok])
            s_list.append(np.broadcast_to(views[i].couch_shift_mm, (int(ok.sum()), 3)))
            px_list.append(views[i].marker_px[ok])
            mk.extend(np.array(phantom.names)[ok].tolist())
            vw.extend([i] * int(ok.sum()))
        obs[name] = (np.vstack(p_list), np.vstack(s_list), np.vstack(px_list), tuple(mk), np.array(vw))

    offset = phantom.centre_offset_mm
    refs, dlt_rms = {}, {}
    for name in names:
        p3, sh, px, _, _ = obs[name]
        room = p3 + offset + sh
        nominal_im = nominal[name]
        candidates = [nominal_im]
        try:
            candidates.append(_start_from_dlt(_dlt(room, px), nominal_im, room))
        except (GeometryError, np.linalg.LinAlgError, ValueError):
            pass  # the nominal description remains a valid start
        errs = []
        for cand in candidates:
            try:
                errs.append(float(np.sqrt(np.mean(np.sum((cand.project(room) - px) ** 2, axis=1)))))
            except GeometryError:
                errs.append(math.inf)
        best = int(np.argmin(errs))
        refs[name] = _Reference.of(candidates[best])
        dlt_rms[name] = errs[-1] if len(candidates) > 1 else math.inf
    n_per = 10 if fit_pixel_aspect else 9
    n_shared = 3 if free_phantom_rotation else 0
    n_params = n_per * len(names) + n_shared

    def residuals(x: np.ndarray) -> np.ndarray:
        rot = Rotation.from_rotvec(np.radians(x[-3:])).as_matrix() if free_phantom_rotation else np.eye(3)
        out = []
        for k, name in enumerate(names):
            p3, sh, px, _, _ = obs[name]
            state = _imager_state(refs[name], x[k * n_per : (k + 1) * n_per], fit_pixel_aspect)
            out.append((_project(state, p3 @ rot.T + offset + sh) - px).ravel())
        return np.concatenate(out)

    x0 = np.zeros(n_params)
    try:
        sol = least_squares(residuals, x0, jac="3-point", method="lm", x_scale=1.0, xtol=1e-12, ftol=1e-12,
                            gtol=1e-12, max_nfev=200 * (n_params + 1))
    except (ValueError, np.linalg.LinAlgError) as err:
        raise CalibrationSolveError(f"geometry fit failed: {err}") from err
    if not sol.success or not np.all(np.isfinite(sol.x)):
        raise CalibrationSolveError(f"geometry fit did not converge: {sol.message}")
    x = sol.x
    jac = sol.jac
    n_res = jac.shape[0]
    dof = n_res - n_params
    if dof <= 0:
        raise CalibrationSolveError(f"{n_res} residuals for {n_params} unknowns: more markers or views are needed")
    s2 = float(sol.fun @ sol.fun) / dof
    jtj = jac.T @ jac
    if np.linalg.cond(jtj) > 1e14:
        raise CalibrationSolveError(
            f"the geometry is not determined by these views (condition number {np.linalg.cond(jtj):.3g}); "
            "use a non-coplanar phantom and, for free rotations, couch shifts in several directions"
        )
    cov = s2 * np.linalg.inv(jtj)

    timestamp = time.time() if calibrated_unix_s is None else float(calibrated_unix_s)
    solutions = []
    pos = 0
    for k, name in enumerate(names):
        sl = slice(k * n_per, (k + 1) * n_per)
        xk, ck = x[sl], cov[sl, sl]
        ref = refs[name]
        geom = _geometry_of(ref, xk, fit_pixel_aspect)
        p3, sh, px, mk, vw = obs[name]
        n_k = len(px)
        res = -sol.fun[pos : pos + 2 * n_k].reshape(-1, 2)  # measured - model
        pos += 2 * n_k
        params = _parameter_table(ref, xk, ck, fit_pixel_aspect)
        dist = np.linalg.norm(res, axis=1)
        solutions.append(
            ImagerSolution(
                geom, params, _readonly(res), mk, _readonly(vw, np.int64), float(np.sqrt(np.mean(dist**2))),
                float(dist.max()), dlt_rms[name], math.sqrt(s2), n_k,
            )
        )
    rotation = None
    rot_mat = np.eye(3)
    if free_phantom_rotation:
        w = x[-3:]
        sw = np.sqrt(np.diag(cov)[-3:])
        rotation = tuple(ParameterEstimate(f"phantom_rotation_{a}_deg", float(w[i]), float(sw[i]), "deg")
                         for i, a in enumerate("xyz"))
        rot_mat = Rotation.from_rotvec(np.radians(w)).as_matrix()
    notes = (
        f"calibrated {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(timestamp))} by spineguide BB-phantom calibration; "
        f"phantom '{phantom.name}' ({n_markers} markers); {len(views)} views at "
        f"{len({tuple(v.couch_shift_mm) for v in views})} couch positions; "
        + "; ".join(f"imager '{s.geometry.name}' RMS {s.rms_px:.3f} px" for s in solutions)
        + (f"; {provenance}" if provenance else "")
    )
    geometry = StereoGeometry(tuple(s.geometry for s in solutions), timestamp, notes)
    iso = isocentre_check(geometry, phantom, views, rotation=rot_mat)
    return CalibrationResult(geometry, tuple(solutions), iso, views, rotation, phantom, _readonly(rot_mat), timestamp)


def _parameter_table(ref: _Reference, x: np.ndarray, cov: np.ndarray, fit_aspect: bool) -> tuple[ParameterEstimate, ...]:
    def derived(xx):
        source, origin, u, v, row_sp, col_sp = _imager_state(ref, xx, fit_aspect)
        n = np.cross(u, v)
        return np.concatenate([origin, [abs((origin - source) @ n)], [row_sp]])

    base = derived(x)
    grad = np.zeros((len(base), len(x)))
    for i in range(len(x)):
        h = 1e-4
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[:, i] = (derived(xp) - derived(xm)) / (2 * h)
    dcov = grad @ cov @ grad.T
    sig = np.sqrt(np.maximum(np.diag(cov), 0.0))
    dsig = np.sqrt(np.maximum(np.diag(dcov), 0.0))
    source = ref.source_mm + x[0:3]
    centre = ref.centre_mm + x[3:6]
    out = [ParameterEstimate(f"source_{a}_mm", float(source[i]), float(sig[i]), "mm") for i, a in enumerate("xyz")]
    out += [ParameterEstimate(f"panel_centre_{a}_mm", float(centre[i]), float(sig[3 + i]), "mm") for i, a in enumerate("xyz")]
    out += [ParameterEstimate(f"panel_rotation_{a}_deg", float(x[6 + i]), float(sig[6 + i]), "deg") for i, a in enumerate("xyz")]
    out += [ParameterEstimate(f"panel_origin_{a}_mm", float(base[i]), float(dsig[i]), "mm") for i, a in enumerate("xyz")]
    out.append(ParameterEstimate("source_to_detector_mm", float(base[3]), float(dsig[3]), "mm"))
    if fit_aspect:
        out.append(ParameterEstimate("row_spacing_mm", float(base[4]), float(dsig[4]), "mm"))
    return tuple(out)


def isocentre_check(
    geometry: StereoGeometry,
    phantom: BBPhantom,
    views: Sequence[PhantomView],
    *,
    rotation: np.ndarray | None = None,
    limit_mm: float = ISOCENTRE_FLAG_MM,
) -> IsocentreCheck:
    """Triangulate the centre BB at every couch position seen by all imagers.

    Parameters
    ----------
    geometry : StereoGeometry
        The geometry to check (room frame, mm).
    phantom : BBPhantom
    views : sequence of PhantomView
    rotation : (3, 3) array, optional
        Fitted phantom rotation (only moves markers other than the centre).
    limit_mm : float
        Flag when the centre BB lies further than this from the isocentre.

    Raises
    ------
    CalibrationSolveError
        If no couch position has the centre BB measured by every imager.
    """
    c = phantom.centre_index
    groups: dict[tuple, dict[str, np.ndarray]] = {}
    for v in views:
        if np.all(np.isfinite(v.marker_px[c])):
            groups.setdefault(tuple(np.round(v.couch_shift_mm, 6)), {})[v.imager] = v.marker_px[c]
    estimates = []
    for shift, px in groups.items():
        if set(px) >= set(geometry.names):
            tri = geometry.triangulate({n: px[n][None] for n in geometry.names})
            estimates.append(tri.points_mm[0] - np.array(shift))
    if not estimates:
        raise CalibrationSolveError(
            f"the centre marker '{phantom.names[c]}' was not measured by every imager at any one couch position"
        )
    per = np.array(estimates)
    mean = per.mean(axis=0)
    dist = float(np.linalg.norm(mean))
    return IsocentreCheck(
        _readonly(mean), _readonly(per), _readonly(phantom.centre_offset_mm), dist,
        float(np.linalg.norm(mean - phantom.centre_offset_mm)), float(limit_mm), dist > limit_mm,
    )


# --------------------------------------------------------------------------
# From raw frames
# --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MeasuredFrame:
    """Detections and marker assignment of one frame (for reports)."""

    imager: str
    couch_shift_mm: np.ndarray
    detections: DetectedBBs
    match: MarkerMatch
    predicted_px: np.ndarray
    source: str = ""


def _predicted(phantom: BBPhantom, imager: ImagerGeometry, couch_shift_mm) -> np.ndarray:
    return imager.project(phantom.placed_mm(couch_shift_mm))


def _gate_px(predicted: np.ndarray) -> float:
    d = np.linalg.norm(predicted[:, None] - predicted[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return GATE_FRACTION * float(d.min())


def measure_frame(
    phantom: BBPhantom,
    imager: ImagerGeometry,
    frame,
    *,
    couch_shift_mm=(0.0, 0.0, 0.0),
    i0: float | None = None,
    max_missing: int = 2,
    source: str = "",
) -> MeasuredFrame:
    """Detect the phantom's BBs in a raw frame and name them.

    Parameters
    ----------
    phantom : BBPhantom
    imager : ImagerGeometry
        Nominal (or stored) geometry of the imager that took the frame; used
        to predict where each marker falls and how large it appears.
    frame : (rows, cols) array
        Raw detector signal; its shape must match the imager's panel.
    couch_shift_mm : (3,) array
        Known couch translation from the setup position, room frame, mm.
    i0 : float, optional
    max_missing : int
        Markers that may be missing (occluded, off the panel) before it is an error.
    source : str
        Image file name, for messages and provenance.

    Raises
    ------
    DetectionError
        Frame shape does not match the panel, or bad frame / i0.
    MarkerCountError
        More than ``max_missing`` markers not found.
    """
    arr = np.asarray(frame)
    label = f"imager '{imager.name}'" + (f" ({source})" if source else "")
    if arr.shape != (imager.rows, imager.cols):
        raise DetectionError(
            f"{label}: frame is {arr.shape[0]}x{arr.shape[1]} pixels, the panel has {imager.rows}x{imager.cols}"
        )
    predicted = _predicted(phantom, imager, couch_shift_mm)
    pitch = float(np.mean(imager.pixel_spacing_mm))
    diameter_px = float(np.median(phantom.diameters_mm)) * imager.magnification / pitch
    det = detect_bbs(arr, diameter_px=diameter_px, i0=i0, imager=imager.name)
    match = match_markers(
        det.centres_px, predicted, points_mm=phantom.placed_mm(couch_shift_mm), gate_px=_gate_px(predicted), search_px=SEARCH_PANEL_MM / pitch,
        imager=imager.name, marker_names=phantom.names,
        max_missing=max_missing,
    )
    return MeasuredFrame(imager.name, _readonly(np.asarray(couch_shift_mm, float)), det, match, _readonly(predicted), source)


def _check_not_swapped(
    phantom: BBPhantom, nominal: StereoGeometry, frames: Sequence[CalibrationFrame], measured, max_missing: int
) -> None:
    """Raise if a frame matches another imager's predicted view better than its own."""
    for fr, meas in zip(frames, measured):
        for other in nominal.names:
            if other == fr.imager:
                continue
            oim = nominal[other]
            if np.asarray(fr.frame).shape != (oim.rows, oim.cols):
                continue
            try:
                alt = measure_frame(phantom, oim, fr.frame, couch_shift_mm=fr.couch_shift_mm, i0=fr.i0,
                                    max_missing=max_missing)
            except MarkerCountError:
                continue
            own_found = 0 if meas is None else meas.match.n_found
            own_res = math.inf if meas is None else meas.match.residual_px
            if alt.match.n_found > own_found or (
                alt.match.n_found == own_found and alt.match.residual_px < 0.5 * own_res
            ):
                raise ImagesSwappedError(
                    f"the frame given for imager '{fr.imager}'{' (' + fr.source + ')' if fr.source else ''} "
                    f"shows the phantom as imager '{other}' sees it ({alt.match.n_found} markers match "
                    f"'{other}', {own_found} match '{fr.imager}'): are the images swapped between imagers?"
                )


def calibrate(
    phantom: BBPhantom,
    frames: Sequence[CalibrationFrame],
    nominal: StereoGeometry,
    *,
    max_missing: int = 2,
    fit_pixel_aspect: bool = False,
    free_phantom_rotation: bool = False,
    calibrated_unix_s: float | None = None,
    phantom_source: str = "",
) -> CalibrationResult:
    """The whole calibration: detect and name BBs in every frame, solve, check the isocentre.

    Parameters
    ----------
    phantom : BBPhantom
    frames : sequence of CalibrationFrame
        Raw frames of the phantom, each with its imager and known couch shift.
    nominal : StereoGeometry
        Nominal room geometry (panel sizes, pitch, approximate positions).
    max_missing : int
        Markers per frame that may be missing.
    fit_pixel_aspect, free_phantom_rotation, calibrated_unix_s
        As :func:`solve_geometry`.
    phantom_source : str
        Phantom file name, for provenance.

    Returns
    -------
    CalibrationResult
        With ``measured`` holding each frame's detections and assignment.

    Raises
    ------
    ImagesSwappedError
        A frame shows another imager's view of the phantom.
    MarkerCountError, DetectionError, CalibrationSolveError
    """
    frames = tuple(frames)
    for fr in frames:
        if fr.imager not in nominal.names:
            raise CalibrationSolveError(f"frame for unknown imager '{fr.imager}' (geometry has {', '.join(nominal.names)})")
    measured = []
    failures = []
    for fr in frames:
        try:
            measured.append(measure_frame(phantom, nominal[fr.imager], fr.frame, couch_shift_mm=fr.couch_shift_mm,
                                          i0=fr.i0, max_missing=max_missing, source=fr.source))
        except MarkerCountError as err:
            measured.append(None)
            failures.append(err)
    _check_not_swapped(phantom, nominal, frames, measured, max_missing)
    if failures:
        raise failures[0]
    views = tuple(PhantomView(m.imager, m.couch_shift_mm, m.match.marker_px, m.source) for m in measured)
    sources = [fr.source for fr in frames if fr.source]
    provenance = (f"phantom file {phantom_source}; " if phantom_source else "") + (
        "images " + ", ".join(f"{fr.imager}={fr.source}" for fr in frames if fr.source) if sources else ""
    )
    result = solve_geometry(phantom, views, nominal, fit_pixel_aspect=fit_pixel_aspect,
                            free_phantom_rotation=free_phantom_rotation, calibrated_unix_s=calibrated_unix_s,
                            provenance=provenance.strip("; "))
    return CalibrationResult(result.geometry, result.imagers, result.isocentre, result.views, result.phantom_rotation,
                             result.phantom, result.phantom_rotation_matrix, result.calibrated_unix_s, tuple(measured))
