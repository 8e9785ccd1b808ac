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

import dataclasses
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
    refine_centres,
)
from .errors import CalibrationSolveError, GeometryError
from .geometry import ImagerGeometry, StereoGeometry, rq_positive_diagonal
from .isocentre import IsocentreReference, KvIsocentre, kv_isocentre
from .phantom import BBPhantom
from .foundation import readonly_array as _readonly

__all__ = [
    "ISOCENTRE_FLAG_MM",
    "SIGMA_FLOOR_PX",
    "ImagerObservations",
    "StartingPoint",
    "ParameterLayout",
    "LeastSquaresFit",
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
#: Model-error allowance added in quadrature to each centre's detection sigma in the fit's weights, px (what the
#: plane background and beam hardening leave, ~0.02-0.03 px on the bodied phantoms, issue 13).
SIGMA_FLOOR_PX = 0.02
#: Couch shifts closer than this are one couch position (and a shift this small is the setup position), mm.
_EXACT_SHIFT_MM = 1e-3
#: Largest couch positioning accuracy (1-sigma per axis) the solve accepts, mm.
MAX_COUCH_SIGMA_MM = 10.0


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
    marker_sigma_px : (N,) array, optional
        Expected 1-sigma per axis of each measured centre (px, from the
        detection's local noise); the fit weights each marker by
        ``1 / sqrt(sigma^2 + SIGMA_FLOOR_PX^2)``. None: equal weights.
    """

    imager: str
    couch_shift_mm: np.ndarray
    marker_px: np.ndarray
    source: str = ""
    marker_sigma_px: np.ndarray | None = None

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
        if self.marker_sigma_px is not None:
            sig = np.array(self.marker_sigma_px, dtype=np.float64).reshape(-1)
            if sig.shape != (px.shape[0],) or np.any(sig[np.isfinite(sig)] < 0) or np.any(np.isinf(sig)):
                raise CalibrationSolveError(
                    f"imager '{self.imager}': marker_sigma_px must be {px.shape[0]} non-negative numbers (NaN = unknown)")
            object.__setattr__(self, "marker_sigma_px", _readonly(sig))

    def weights(self) -> np.ndarray:
        """(N,) least-squares weight per marker, 1/px (1 everywhere without sigmas; unknown sigmas get the median)."""
        if self.marker_sigma_px is None or not np.any(np.isfinite(self.marker_sigma_px)):
            return np.ones(self.marker_px.shape[0])
        sig = np.where(np.isfinite(self.marker_sigma_px), self.marker_sigma_px, np.nanmedian(self.marker_sigma_px))
        return 1.0 / np.sqrt(sig**2 + SIGMA_FLOOR_PX**2)


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
        Weighted residual standard deviation per degree of freedom (the ``s`` in ``s^2 (J^T J)^-1``): px for
        views without detection sigmas; with them, residuals over their expected sizes (1 = as the noise predicts).
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
class CouchErrorEstimate:
    """Where the couch really put the phantom at one position, as fitted (``couch_sigma_mm`` > 0).

    ``shift_mm`` the reported couch shift, ``error_mm`` the fitted difference (real minus reported) and
    ``sigma_mm`` its 1-sigma; room frame, mm.
    """

    shift_mm: np.ndarray
    error_mm: np.ndarray
    sigma_mm: np.ndarray


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
    reference: IsocentreReference | None = None
    isocentre_covariance_mm2: np.ndarray = field(default_factory=lambda: np.full((3, 3), np.nan))
    couch_errors: tuple[CouchErrorEstimate, ...] = ()

    @property
    def phantom_name(self) -> str:
        return self.phantom.name

    @property
    def phantom_translation_mm(self) -> np.ndarray:
        """(3,) where the fit placed the centre BB (reference translation, else ``centre_offset_mm``), room frame, mm."""
        return self.reference.centre_bb_mm if self.reference is not None else self.phantom.centre_offset_mm

    def markers_room_mm(self, view_index: int) -> np.ndarray:
        """(N, 3) marker centres of view ``view_index`` as fitted (rotation, translation, couch shift and its fitted
        error), room frame, mm."""
        view = self.views[view_index]
        return (self.phantom.positions_mm @ np.asarray(self.phantom_rotation_matrix).T + self.phantom_translation_mm
                + view.couch_shift_mm + couch_error_at(self.couch_errors, view.couch_shift_mm))

    def kv_isocentre(self, laser: IsocentreReference | None = None) -> KvIsocentre:
        """The kV isocentre against the external reference (:func:`spineguide.calibration.isocentre.kv_isocentre`)."""
        return kv_isocentre(self, self.reference, laser)

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


@dataclass(frozen=True, slots=True)
class ImagerObservations:
    """Every measured marker of one imager, over all its views (the solve's data).

    Attributes
    ----------
    name : str
    points_mm : (M, 3) array
        Marker positions in the phantom's frame (before the fitted rotation), mm.
    shifts_mm : (M, 3) array
        Couch shift of each observation's view, room frame, mm.
    pixels : (M, 2) array
        Measured ``(col, row)``, px.
    markers : tuple of str
        Marker name per row.
    views : (M,) int array
        Index into the solve's views per row.
    weights : (M,) array
        Least-squares weight per row, 1/px (:meth:`PhantomView.weights`).
    positions : (M,) int array
        Index of the row's couch position among the fitted couch errors (:class:`CouchPositions`), -1 where the
        shift is taken as exact (the setup position, or every position when couch errors are not fitted).
    """

    name: str
    points_mm: np.ndarray
    shifts_mm: np.ndarray
    pixels: np.ndarray
    markers: tuple[str, ...]
    views: np.ndarray
    weights: np.ndarray
    positions: np.ndarray

    def room_mm(self, offset_mm: np.ndarray, rotation: np.ndarray | None = None,
                couch_errors_mm: np.ndarray | None = None) -> np.ndarray:
        """(M, 3) observed markers in the room: ``R p + offset + shift (+ the couch error of its position)``, mm."""
        p = self.points_mm if rotation is None else self.points_mm @ rotation.T
        room = p + offset_mm + self.shifts_mm
        if couch_errors_mm is not None and len(couch_errors_mm):
            fitted = self.positions >= 0
            room[fitted] += couch_errors_mm[self.positions[fitted]]
        return room


@dataclass(frozen=True, slots=True)
class CouchPositions:
    """The couch positions whose shift is uncertain: each gets a fitted 3D error with a Gaussian prior.

    Room frame, mm. ``shifts_mm`` (P, 3) are the reported shifts (every non-zero one among the views: the setup
    position, shift 0, defines the frame and is exact); ``sigma_mm`` the couch's positioning accuracy per axis
    (1-sigma). ``view_position`` maps each view to its index, -1 for an exact one.
    """

    shifts_mm: np.ndarray
    sigma_mm: float
    view_position: np.ndarray

    @classmethod
    def of(cls, views: Sequence["PhantomView"], sigma_mm: float) -> "CouchPositions":
        if sigma_mm <= 0.0:
            return cls(np.zeros((0, 3)), 0.0, np.full(len(views), -1, dtype=np.int64))
        keys, index = [], []
        for v in views:
            shift = np.asarray(v.couch_shift_mm, dtype=np.float64)
            if np.linalg.norm(shift) <= _EXACT_SHIFT_MM:
                index.append(-1)
                continue
            for k, other in enumerate(keys):
                if np.linalg.norm(other - shift) <= _EXACT_SHIFT_MM:
                    index.append(k)
                    break
            else:
                keys.append(shift)
                index.append(len(keys) - 1)
        return cls(np.array(keys, dtype=np.float64).reshape(-1, 3), float(sigma_mm), np.array(index, dtype=np.int64))

    @property
    def count(self) -> int:
        return int(self.shifts_mm.shape[0])


@dataclass(frozen=True, slots=True)
class StartingPoint:
    """Where one imager's least squares starts: the reference its parameters are deltas from."""

    reference: _Reference
    dlt_rms_px: float  # RMS reprojection of the DLT start, px (inf when the DLT failed or was not better)


@dataclass(frozen=True, slots=True)
class ParameterLayout:
    """Positions of the unknowns in the least-squares vector: per imager blocks, the couch errors (3 per uncertain
    couch position, mm), then the shared phantom rotation."""

    names: tuple[str, ...]
    fit_pixel_aspect: bool
    free_phantom_rotation: bool
    couch_positions: int = 0

    @property
    def per_imager(self) -> int:
        return 10 if self.fit_pixel_aspect else 9

    @property
    def size(self) -> int:
        return self.per_imager * len(self.names) + 3 * self.couch_positions + (3 if self.free_phantom_rotation else 0)

    def block(self, k: int) -> slice:
        return slice(k * self.per_imager, (k + 1) * self.per_imager)

    @property
    def couch_block(self) -> slice:
        start = self.per_imager * len(self.names)
        return slice(start, start + 3 * self.couch_positions)

    def couch_errors(self, x: np.ndarray) -> np.ndarray:
        """(P, 3) fitted couch errors, mm (empty when not fitted)."""
        return x[self.couch_block].reshape(-1, 3)

    def rotation(self, x: np.ndarray) -> np.ndarray:
        """The fitted phantom rotation matrix (identity when not fitted)."""
        return Rotation.from_rotvec(np.radians(x[-3:])).as_matrix() if self.free_phantom_rotation else np.eye(3)


@dataclass(frozen=True, slots=True)
class LeastSquaresFit:
    """The converged fit: parameters, weighted residuals ((model - measured) x weight, stacked per imager), covariance.

    ``sigma_px`` is the weighted residual's standard deviation per degree of freedom (px with unit weights; with
    detection-sigma weights the ratio of the residuals to their expected sizes, 1 for honest sigmas).
    """

    x: np.ndarray
    residuals: np.ndarray
    covariance: np.ndarray
    sigma_px: float


def _validated_views(phantom: BBPhantom, views: tuple[PhantomView, ...], nominal: StereoGeometry,
                     free_phantom_rotation: bool) -> dict[str, list[int]]:
    """Check the views against the phantom and geometry; view indices per imager."""
    names = nominal.names
    for view in views:
        if view.imager not in names:
            raise CalibrationSolveError(f"view of unknown imager '{view.imager}' (geometry has {', '.join(names)})")
        if view.marker_px.shape[0] != phantom.n_markers:
            raise CalibrationSolveError(
                f"imager '{view.imager}': view has {view.marker_px.shape[0]} marker positions, "
                f"phantom '{phantom.name}' has {phantom.n_markers}"
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
    return per_imager


def _observations(phantom: BBPhantom, views: tuple[PhantomView, ...], name: str, idx: list[int],
                  couch: CouchPositions) -> ImagerObservations:
    p_list, s_list, px_list, mk, vw, w_list = [], [], [], [], [], []
    for i in idx:
        ok = np.all(np.isfinite(views[i].marker_px), axis=1)
        w_list.append(views[i].weights()[ok])
        p_list.append(phantom.positions_mm[ok])
        s_list.append(np.broadcast_to(views[i].couch_shift_mm, (int(ok.sum()), 3)))
        px_list.append(views[i].marker_px[ok])
        mk.extend(np.array(phantom.names)[ok].tolist())
        vw.extend([i] * int(ok.sum()))
    rows_view = np.array(vw, dtype=np.int64)
    return ImagerObservations(name, np.vstack(p_list), np.vstack(s_list), np.vstack(px_list), tuple(mk), rows_view,
                              np.concatenate(w_list), couch.view_position[rows_view])


def _starting_point(obs: ImagerObservations, nominal_im: ImagerGeometry, offset_mm: np.ndarray) -> StartingPoint:
    """The DLT start or the nominal geometry, whichever reprojects the observations better."""
    room = obs.room_mm(offset_mm)
    candidates = [nominal_im]
    try:
        candidates.append(_start_from_dlt(_dlt(room, obs.pixels), nominal_im, room))
    except (GeometryError, np.linalg.LinAlgError, ValueError):
        pass  # the nominal description remains a valid start
    errs = []
    for cand in candidates:
        try:
            errs.append(float(np.sqrt(np.mean(np.sum((cand.project(room) - obs.pixels) ** 2, axis=1)))))
        except GeometryError:
            errs.append(math.inf)
    best = int(np.argmin(errs))
    return StartingPoint(_Reference.of(candidates[best]), errs[-1] if len(candidates) > 1 else math.inf)


def _least_squares(obs: dict[str, ImagerObservations], starts: dict[str, StartingPoint], layout: ParameterLayout,
                   offset_mm: np.ndarray, couch_sigma_mm: float = 0.0) -> LeastSquaresFit:
    """Levenberg-Marquardt over the physical parameters; covariance ``s^2 (J^T J)^-1``.

    With couch errors fitted, each one's prior ``error / couch_sigma_mm`` is appended to the residuals (in the
    detection-sigma units of the weighted marker residuals, so the views must carry detection sigmas).
    """

    def residuals(x: np.ndarray) -> np.ndarray:
        rot = layout.rotation(x)
        couch = layout.couch_errors(x)
        out = []
        for k, name in enumerate(layout.names):
            state = _imager_state(starts[name].reference, x[layout.block(k)], layout.fit_pixel_aspect)
            o = obs[name]
            out.append(((_project(state, o.room_mm(offset_mm, rot, couch)) - o.pixels) * o.weights[:, None]).ravel())
        if layout.couch_positions:
            out.append(couch.ravel() / couch_sigma_mm)
        return np.concatenate(out)

    n_params = layout.size
    try:
        sol = least_squares(residuals, np.zeros(n_params), jac="3-point", method="lm", x_scale=1.0, xtol=1e-12,
                            ftol=1e-12, gtol=1e-12, max_nfev=200 * (n_params + 1))
    except (ValueError, np.linalg.LinAlgError) as err:
        raise CalibrationSolveError(f"geometry fit failed: {err}") from err
    if not sol.success or not np.all(np.isfinite(sol.x)):
        raise CalibrationSolveError(f"geometry fit did not converge: {sol.message}")
    n_res = sol.jac.shape[0]
    dof = n_res - n_params
    if dof <= 0:
        raise CalibrationSolveError(f"{n_res} residuals for {n_params} unknowns: more markers or views are needed")
    s2 = float(sol.fun @ sol.fun) / dof
    jtj = sol.jac.T @ sol.jac
    cond = np.linalg.cond(jtj)
    if cond > 1e14:
        raise CalibrationSolveError(
            f"the geometry is not determined by these views (condition number {cond:.3g}); "
            "use a non-coplanar phantom and, for free rotations, couch shifts in several directions"
        )
    return LeastSquaresFit(sol.x, sol.fun, s2 * np.linalg.inv(jtj), math.sqrt(s2))


def _imager_solutions(obs: dict[str, ImagerObservations], starts: dict[str, StartingPoint], layout: ParameterLayout,
                      fit: LeastSquaresFit) -> tuple[ImagerSolution, ...]:
    solutions, pos = [], 0
    for k, name in enumerate(layout.names):
        sl = layout.block(k)
        xk, ck = fit.x[sl], fit.covariance[sl, sl]
        ref = starts[name].reference
        o = obs[name]
        n_k = len(o.pixels)
        res = -fit.residuals[pos : pos + 2 * n_k].reshape(-1, 2) / o.weights[:, None]  # measured - model, px
        pos += 2 * n_k
        dist = np.linalg.norm(res, axis=1)
        solutions.append(ImagerSolution(
            _geometry_of(ref, xk, layout.fit_pixel_aspect), _parameter_table(ref, xk, ck, layout.fit_pixel_aspect),
            _readonly(res), o.markers, _readonly(o.views, np.int64), float(np.sqrt(np.mean(dist**2))), float(dist.max()),
            starts[name].dlt_rms_px, fit.sigma_px, n_k,
        ))
    return tuple(solutions)


def _isocentre_covariance(starts: dict[str, StartingPoint], layout: ParameterLayout, fit: LeastSquaresFit) -> np.ndarray:
    """(3, 3) covariance (mm^2) of the point the calibrated pair triangulates for the true isocentre.

    First order: the pair's projections of the isocentre ``u(X, theta)`` (4 px) are held at their values for the
    fitted parameters; a parameter error ``d theta`` moves the triangulated point by
    ``dX = -pinv(J_X) J_theta d theta`` (numerical Jacobians), so ``cov_X = A cov_theta A^T``.
    """
    def proj(x: np.ndarray, point: np.ndarray) -> np.ndarray:
        return np.concatenate([
            _project(_imager_state(starts[n].reference, x[layout.block(k)], layout.fit_pixel_aspect), point[None])[0]
            for k, n in enumerate(layout.names)])

    x = fit.x
    origin = np.zeros(3)
    h_mm, h_p = 1e-3, 1e-4
    j_x = np.stack([(proj(x, origin + h_mm * e) - proj(x, origin - h_mm * e)) / (2 * h_mm) for e in np.eye(3)], axis=1)
    j_t = np.zeros((len(j_x), len(x)))
    for i in range(len(x)):
        d = np.zeros(len(x))
        d[i] = h_p
        j_t[:, i] = (proj(x + d, origin) - proj(x - d, origin)) / (2 * h_p)
    a = -np.linalg.pinv(j_x) @ j_t
    return a @ fit.covariance @ a.T


def _notes(phantom: BBPhantom, views: tuple[PhantomView, ...], solutions, timestamp: float, provenance: str) -> str:
    return (
        f"calibrated {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(timestamp))} by spineguide BB-phantom calibration; "
        f"phantom '{phantom.name}' ({phantom.n_markers} markers); {len(views)} views at "
        f"{len({tuple(v.couch_shift_mm) for v in views})} couch positions; "
        + "; ".join(f"imager '{s.geometry.name}' RMS {s.rms_px:.3f} px" for s in solutions)
        + (f"; {provenance}" if provenance else "")
    )


def solve_geometry(
    phantom: BBPhantom,
    views: Sequence[PhantomView],
    nominal: StereoGeometry,
    *,
    fit_pixel_aspect: bool = False,
    free_phantom_rotation: bool = False,
    calibrated_unix_s: float | None = None,
    provenance: str = "",
    reference: IsocentreReference | None = None,
    couch_sigma_mm: float = 0.0,
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
    reference : IsocentreReference, optional
        The phantom's pose relative to the MV isocentre from outside the fit
        (Winston-Lutz result or laser pose): it places the phantom
        (``room = R_fit R_ref p + t_ref + shift``) instead of ``centre_offset_mm``.
    couch_sigma_mm : float
        The couch's positioning accuracy, 1-sigma per axis, mm; 0 (default) takes every couch shift as exact.
        Above 0, where the couch really put the phantom at each position but the setup (shift 0) is fitted with
        that prior (:class:`CouchErrorEstimate` in the result): the depth lever then pins the source distance only
        as well as the couch travels (docs/CALIBRATION.md). Needs views with detection sigmas (``calibrate``'s).

    Returns
    -------
    CalibrationResult

    Raises
    ------
    CalibrationSolveError
        An imager without views or with fewer than 6 markers, views of
        unknown imagers or of the wrong marker count, a free phantom rotation
        that the couch shifts cannot fix, a bad ``couch_sigma_mm`` (or one
        without detection sigmas), or a fit that does not converge.
    """
    views = tuple(views)
    per_imager = _validated_views(phantom, views, nominal, free_phantom_rotation)
    couch = CouchPositions.of(views, _checked_couch_sigma(couch_sigma_mm, views))
    placed = reference.place(phantom) if reference is not None else phantom
    layout = ParameterLayout(nominal.names, fit_pixel_aspect, free_phantom_rotation, couch.count)
    obs = {name: _observations(placed, views, name, idx, couch) for name, idx in per_imager.items()}
    offset = placed.centre_offset_mm
    starts = {name: _starting_point(obs[name], nominal[name], offset) for name in layout.names}
    fit = _least_squares(obs, starts, layout, offset, couch.sigma_mm)
    solutions = _imager_solutions(obs, starts, layout, fit)

    rotation = None
    fitted_rot = layout.rotation(fit.x)
    if free_phantom_rotation:
        w, sw = fit.x[-3:], np.sqrt(np.diag(fit.covariance)[-3:])
        rotation = tuple(ParameterEstimate(f"phantom_rotation_{a}_deg", float(w[i]), float(sw[i]), "deg")
                         for i, a in enumerate("xyz"))
    timestamp = time.time() if calibrated_unix_s is None else float(calibrated_unix_s)
    ref_note = f"isocentre reference: {reference.describe()}" if reference is not None else ""
    couch_note = (f"couch errors fitted at {couch.count} position(s), prior {couch.sigma_mm:g} mm per axis"
                  if couch.count else "")
    notes = _notes(phantom, views, solutions, timestamp, "; ".join(t for t in (provenance, ref_note, couch_note) if t))
    geometry = StereoGeometry(tuple(s.geometry for s in solutions), timestamp, notes)
    total_rot = fitted_rot @ (reference.rotation if reference is not None else np.eye(3))
    cb = layout.couch_block
    couch_sig = np.sqrt(np.maximum(np.diag(fit.covariance)[cb], 0.0)).reshape(-1, 3)
    couch_errors = tuple(CouchErrorEstimate(_readonly(couch.shifts_mm[k]), _readonly(layout.couch_errors(fit.x)[k]),
                                            _readonly(couch_sig[k])) for k in range(couch.count))
    iso = isocentre_check(geometry, placed, views, rotation=fitted_rot, couch_errors=couch_errors)
    return CalibrationResult(geometry, solutions, iso, views, rotation, phantom, _readonly(total_rot), timestamp,
                             reference=reference, isocentre_covariance_mm2=_readonly(_isocentre_covariance(starts, layout, fit)),
                             couch_errors=couch_errors)


def _checked_couch_sigma(value, views: tuple[PhantomView, ...]) -> float:
    """``couch_sigma_mm`` as a float in [0, MAX_COUCH_SIGMA_MM]; above 0 every view must carry detection sigmas."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            math.isfinite(value) and 0.0 <= value <= MAX_COUCH_SIGMA_MM):
        raise CalibrationSolveError(f"couch_sigma_mm must be a number from 0 to {MAX_COUCH_SIGMA_MM:g} mm, got {value!r}")
    if value > 0.0 and any(v.marker_sigma_px is None or not np.any(np.isfinite(v.marker_sigma_px)) for v in views):
        raise CalibrationSolveError("couch_sigma_mm needs views with detection sigmas (marker_sigma_px): the couch "
                                    "prior is weighed against them")
    return float(value)


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


def couch_error_at(couch_errors: Sequence[CouchErrorEstimate], shift_mm) -> np.ndarray:
    """(3,) fitted couch error at the position with reported shift ``shift_mm`` (room frame, mm); zeros where none
    was fitted (exact shifts, or the setup position)."""
    shift = np.asarray(shift_mm, dtype=np.float64)
    for e in couch_errors:
        if np.linalg.norm(e.shift_mm - shift) <= _EXACT_SHIFT_MM:
            return np.asarray(e.error_mm)
    return np.zeros(3)


def isocentre_check(
    geometry: StereoGeometry,
    phantom: BBPhantom,
    views: Sequence[PhantomView],
    *,
    rotation: np.ndarray | None = None,
    limit_mm: float = ISOCENTRE_FLAG_MM,
    couch_errors: Sequence[CouchErrorEstimate] = (),
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
    couch_errors : sequence of CouchErrorEstimate
        Fitted couch errors (``couch_sigma_mm`` > 0): removed with each position's shift.

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
            estimates.append(tri.points_mm[0] - np.array(shift) - couch_error_at(couch_errors, shift))
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
    # Each BB's own shadow size at its depth for this couch shift: BBs of several sizes, and +-300 mm along the
    # imager's axis changes the magnification by +-14 % (a 1.5 mm BB's shadow then fell below the size window set
    # by the median BB at the isocentre's magnification, and was rejected).
    shadows = _shadow_diameters_px(phantom, imager, couch_shift_mm)
    det = detect_bbs(arr, diameter_px=float(np.median(shadows)), i0=i0, imager=imager.name,
                     size_range_px=(float(shadows.min()), float(shadows.max())))
    match = match_markers(
        det.centres_px, predicted, points_mm=phantom.placed_mm(couch_shift_mm), gate_px=_gate_px(predicted), search_px=SEARCH_PANEL_MM / pitch,
        imager=imager.name, marker_names=phantom.names,
        max_missing=max_missing,
    )
    det, match = _refined_per_marker(imager, arr, shadows, det, match, i0)
    return MeasuredFrame(imager.name, _readonly(np.asarray(couch_shift_mm, float)), det, match, _readonly(predicted), source)


def _shadow_diameters_px(phantom: BBPhantom, imager: ImagerGeometry, couch_shift_mm) -> np.ndarray:
    """Each marker's expected shadow diameter on the panel, px: diameter x its own magnification / pitch."""
    pts = phantom.placed_mm(couch_shift_mm)
    depth = (pts - imager.source_mm) @ imager.normal
    return phantom.diameters_mm * imager.source_to_detector_mm / depth / float(np.mean(imager.pixel_spacing_mm))


def _refined_per_marker(imager, frame, diam: np.ndarray, det: DetectedBBs, match: MarkerMatch, i0):
    """Matched markers re-measured with windows sized to each marker's own expected shadow ``diam`` (px; BBs of
    several sizes)."""
    if np.allclose(diam, np.median(diam), rtol=0.05):
        return det, match  # one size: detection's window was already right
    found = np.flatnonzero(match.found)
    new_c, new_s = refine_centres(frame, match.marker_px[found], diam[found], i0=i0, imager=imager.name)
    ok = np.all(np.isfinite(new_c), axis=1)
    marker_px = np.array(match.marker_px)
    marker_px[found[ok]] = new_c[ok]
    centres, sigma = np.array(det.centres_px), np.array(det.sigma_px)
    idx = match.detection_index[found[ok]]
    centres[idx] = new_c[ok]
    sigma[idx] = new_s[ok]
    det = dataclasses.replace(det, centres_px=_readonly(centres), sigma_px=_readonly(sigma))
    return det, dataclasses.replace(match, marker_px=_readonly(marker_px))


def _marker_sigmas(m: MeasuredFrame) -> np.ndarray:
    """(N,) detection sigma of each marker's centre, px, NaN where not found."""
    idx = np.asarray(m.match.detection_index)
    sig = np.asarray(m.detections.sigma_px, dtype=np.float64)
    if len(sig) == 0:
        return np.full(len(idx), np.nan)
    return np.where(idx >= 0, sig[np.clip(idx, 0, len(sig) - 1)], np.nan)


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
    reference: IsocentreReference | None = None,
    couch_sigma_mm: float = 0.0,
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
    fit_pixel_aspect, free_phantom_rotation, calibrated_unix_s, reference, couch_sigma_mm
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
    placed = reference.place(phantom) if reference is not None else phantom
    measured = []
    failures = []
    for fr in frames:
        try:
            measured.append(measure_frame(placed, nominal[fr.imager], fr.frame, couch_shift_mm=fr.couch_shift_mm,
                                          i0=fr.i0, max_missing=max_missing, source=fr.source))
        except MarkerCountError as err:
            measured.append(None)
            failures.append(err)
    _check_not_swapped(placed, nominal, frames, measured, max_missing)
    if failures:
        raise failures[0]
    views = tuple(PhantomView(m.imager, m.couch_shift_mm, m.match.marker_px, m.source, _marker_sigmas(m)) for m in measured)
    sources = [fr.source for fr in frames if fr.source]
    provenance = (f"phantom file {phantom_source}; " if phantom_source else "") + (
        "images " + ", ".join(f"{fr.imager}={fr.source}" for fr in frames if fr.source) if sources else ""
    )
    result = solve_geometry(phantom, views, nominal, fit_pixel_aspect=fit_pixel_aspect,
                            free_phantom_rotation=free_phantom_rotation, calibrated_unix_s=calibrated_unix_s,
                            provenance=provenance.strip("; "), reference=reference, couch_sigma_mm=couch_sigma_mm)
    return dataclasses.replace(result, measured=tuple(measured))
