"""One-view fiducial monitoring: the patient pose from one kV frame, the planned seeds and a motion prior.

When one imager is blocked (gantry), dark, saturated or missing, the other
still sees the seeds. One view measures their two in-plane coordinates; the
pose along that view's central ray (out-of-plane) is seen only through the
weak magnification cue (a 1 mm move along the ray changes a seed's
projection by ``r / SID`` of its distance ``r`` from the ray: about 0.1 px
for a seed 50 mm off-axis). So the pose is a maximum a posteriori (MAP)
estimate against a Gaussian prior (:class:`spineguide.registration.motion_prior.MotionPrior`:
the last stereo pose, widened with time), and its covariance says how much
is measured and how much is prior. Method (``docs/ONE_VIEW.md``):

1. **Seeds in one view.** The clean-frame detector
   (:func:`spineguide.tracking.localisation.detection.detect_seeds`, SNR
   threshold ``detect_min_snr``) in tracking windows around the seeds' projections under the prior pose; the
   detections are assigned to planned seeds under one common shift
   (translation dominates the motion between pairs) and refitted by the box
   fit of the faint search (one start at the detection's orientation,
   ``refit_detected``): the detector's weighted centroid of a faint seed over
   bone was off by up to 1.4 px in one view, systematically; a seed the
   detector missed is fitted (:func:`spineguide.tracking.localisation.seed_search.refine_seeds`,
   the faint search's box fit, four start orientations) where the shift puts
   it and kept if its fitted SNR reaches ``refit_min_snr`` within
   ``match_radius_px`` of that place.
2. **MAP pose.** ``scipy.optimize.least_squares`` minimises
   ``sum |proj(P(x) p_k) - d_k|^2 / sigma_px^2 + (x - x_prior)^T C^-1 (x - x_prior)``
   over ``x = [tx, ty, tz, pitch, roll, yaw]``; covariance ``(J^T J)^-1``
   of the whitened residuals at the optimum, i.e. ``(J_d^T W J_d + C^-1)^-1``.
3. **Out-of-plane honesty.** A patient who moved in-plane since the last
   stereo pair may have moved out-of-plane as much (a sudden shift has no
   preferred direction): the prior's variance along the ray is raised by
   ``out_of_plane_ratio * |d_in|^2`` (``d_in``: the in-plane target move
   measured since the reference), each rotation's by
   ``(rotation_per_mm_deg * |d_in|)^2`` (a patient who moved may have turned;
   rotations across the ray are not seen and would pull the translation), and
   the fit is repeated.
4. **Trust.** ``ok`` needs ``min_seeds`` seeds, the reprojection chi^2 within
   its ``chi2_quantile`` (effective degrees of freedom: the measurements less
   what the fit absorbs) and no seed alone beyond ``chi2_2``'s quantile.

Frames, units and signs: ``docs/CONVENTIONS.md``. Pixels ``(col, row)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import chi2

from spineguide.calibration.errors import GeometryError
from spineguide.calibration.foundation import checked_integer, checked_number
from spineguide.calibration.geometry import StereoGeometry
from spineguide.registration.motion_prior import (
    OUT_OF_PLANE_RATIO,
    ROTATION_PER_MM_DEG,
    MotionPrior,
    MotionPriorError,
    check_covariance,
    pose_from_six,
    prior_from_stereo_history,
)
from spineguide.registration.pose import Pose, rotation_matrix

from ..errors import FiducialConfigError, FiducialNotFoundError, FrameError
from .detection import Detection, _check_frame, _check_i0, detect_seeds, estimate_i0, seed_size_px
from .fiducials import FiducialConfig, _check_planned
from .flatfield import FlatField
from .seed_search import refine_seeds

__all__ = [
    "OneViewConfig",
    "OneViewFiducialResult",
    "OneViewSeed",
    "fit_one_view",
    "localise_one_view",
    "out_of_plane_axis",
    "prior_from_stereo_history",
]

#: Chi^2_3 quantile of a 3D 95 % ellipsoid.
CHI2_3_95 = float(chi2.ppf(0.95, 3))


@dataclass(frozen=True, slots=True)
class OneViewConfig:
    """Limits and the error model of one-view localisation (px on the panel, mm, degrees).

    Attributes
    ----------
    sigma_px : float
        Standard deviation of a fitted seed centre per panel axis, px, for a
        seed at ``sigma_reference_snr``; the model is
        ``sigma = hypot(sigma_floor_px, sigma_px * sigma_reference_snr / snr)``.
        Calibrated on clinic-chain frames (``benchmarks/bench_one_view_fiducials.py``).
    sigma_floor_px : float
        The part of a centre's error that does not shrink with SNR (the seed's
        round ends, bone under the seed, panel blur), px.
    sigma_reference_snr : float
    min_seeds : int
        Seeds needed for ``ok`` (fewer: an estimate, not trusted).
    chi2_quantile : float
        A reprojection chi^2 above this quantile of its distribution is not ok.
    seed_chi2_quantile : float
        One seed's normalised squared residual above this quantile of chi^2_2 is not ok
        (inconsistent with the rigid model).
    match_radius_px : float
        Largest distance of an assigned detection or fit from its predicted place
        after the common shift, px.
    refit_min_snr : float
        Fitted SNR a seed the detector missed needs to be used.
    out_of_plane_ratio : float
        Variance added along the ray per mm^2 of in-plane target motion since the
        reference (step 3 of the module docstring); 0 turns it off.
    rotation_per_mm_deg : float
        Standard deviation added to each rotation per mm of in-plane target motion since the reference
        (a turn about a pivot ~190 mm from the target moves it 1 mm per 0.3 deg), deg/mm; 0 turns it off.
    max_nfev : int
        Function evaluations of each least-squares fit.
    refit_detected : bool
        Refit the detector's seeds with the box fit (one start, its orientation; ~1.5 ms a seed);
        off: use the detector's weighted centroid (biased by up to 1.4 px for a faint seed over bone).
    detect_min_snr : float or None
        The clean detector's SNR threshold in the one view's tracking windows (None: the
        ``DetectionConfig``'s, 8). 5, the faint search's detection limit: inside windows placed by
        the prior and assigned under one shift, clutter is rarer than in a whole frame, and each seed
        the detector finds saves a ~5-7 ms box fit (measured: localise_one_view median 30 -> 13 ms
        under load, same accuracy).
    """

    sigma_px: float = 0.24
    sigma_floor_px: float = 0.12
    sigma_reference_snr: float = 15.0
    min_seeds: int = 2
    chi2_quantile: float = 0.999
    seed_chi2_quantile: float = 0.999
    match_radius_px: float = 4.0
    refit_min_snr: float = 6.0
    out_of_plane_ratio: float = OUT_OF_PLANE_RATIO
    rotation_per_mm_deg: float = ROTATION_PER_MM_DEG
    max_nfev: int = 50
    refit_detected: bool = True
    detect_min_snr: float | None = 5.0

    def __post_init__(self) -> None:
        for name in ("sigma_px", "sigma_floor_px", "sigma_reference_snr", "match_radius_px", "refit_min_snr"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError,
                           f"one-view config: {name} must be a positive finite number, got {value!r}",
                           minimum=0.0, exclusive_minimum=True)
        for name in ("chi2_quantile", "seed_chi2_quantile"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError, f"one-view config: {name} must be in (0, 1), got {value!r}",
                           minimum=0.0, exclusive_minimum=True, maximum=1.0)
            if value >= 1.0:
                raise FiducialConfigError(f"one-view config: {name} must be in (0, 1), got {value!r}")
        for name in ("out_of_plane_ratio", "rotation_per_mm_deg"):
            value = getattr(self, name)
            checked_number(value, FiducialConfigError, f"one-view config: {name} must be >= 0, got {value!r}",
                           minimum=0.0)
        if self.detect_min_snr is not None:
            checked_number(self.detect_min_snr, FiducialConfigError,
                           f"one-view config: detect_min_snr must be a positive number or None, got "
                           f"{self.detect_min_snr!r}", minimum=0.0, exclusive_minimum=True)
        if not isinstance(self.refit_detected, bool):
            raise FiducialConfigError(f"one-view config: refit_detected must be a bool, got {self.refit_detected!r}")
        for name in ("min_seeds", "max_nfev"):
            value = getattr(self, name)
            checked_integer(value, FiducialConfigError,
                            f"one-view config: {name} must be a positive integer, got {value!r}", minimum=1)

    def sigma_for(self, snr: float) -> float:
        """Centre error per axis (px) of a seed fitted at ``snr``."""
        return math.hypot(self.sigma_floor_px, self.sigma_px * self.sigma_reference_snr / max(float(snr), 1.0))


@dataclass(frozen=True, slots=True)
class OneViewSeed:
    """One planned seed in the one view.

    Attributes
    ----------
    name : str
    found : bool
    centre_px : (2,) array or None
        Fitted ``(col, row)``.
    predicted_px : (2,) array
        Projection under the prior mean pose.
    snr : float
        Fitted SNR (0 if not found).
    sigma_px : float
        Centre error per axis used in the fit, px (0 if not found).
    residual_px : float
        ``|proj(P p) - centre|`` at the MAP pose, px (0 if not found).
    how : str
        ``"detected"`` (clean detector, refitted), ``"fitted"`` (missed by the detector,
        fitted where the shift puts it), ``"missing"`` or ``"overlap"`` (its shadow may
        merge with another seed's: not used).
    """

    name: str
    found: bool
    centre_px: np.ndarray | None
    predicted_px: np.ndarray
    snr: float
    sigma_px: float
    residual_px: float
    how: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "found": self.found,
            "centre_px": None if self.centre_px is None else [float(v) for v in self.centre_px],
            "predicted_px": [float(v) for v in self.predicted_px],
            "snr": float(self.snr),
            "sigma_px": float(self.sigma_px),
            "residual_px": float(self.residual_px),
            "how": self.how,
        }


@dataclass(frozen=True, slots=True)
class OneViewFiducialResult:
    """Outcome of :func:`localise_one_view` for one frame.

    Attributes
    ----------
    imager : str
    pose : Pose
        MAP patient pose, room frame (``p_actual = R p_planned + t``, docs/CONVENTIONS.md).
    pose_cov : (6, 6) array
        Covariance of ``[tx, ty, tz, pitch, roll, yaw]`` (mm^2, mm deg, deg^2), prior included.
    ok : bool
    reason : str
        Why not ok ('' if ok).
    n_seeds : int
        Seeds used in the fit.
    out_of_plane_axis_room : (3,) array
        Unit vector from the source through the isocentre (the view's ray), room frame.
    deviation_mm : (3,) array
        Target (isocentre) deviation ``P(target) - target``, room mm.
    deviation_cov_mm2 : (3, 3) array
        Its covariance, room mm^2.
    in_plane_sigma_mm : float
        Largest standard deviation of the deviation perpendicular to the ray, mm.
    out_of_plane_sigma_mm : float
        Standard deviation of the deviation along the ray, mm.
    chi2 : float
        Reprojection chi^2 (sum of squared normalised seed residuals).
    chi2_dof : float
        Its effective degrees of freedom (measurements less what the fit absorbs).
    prior_inflation_mm2 : float
        Variance added along the ray for the in-plane motion seen (step 3), mm^2.
    seeds : tuple of OneViewSeed
    total_ms : float
        Frame in to result out, ms (monotonic clock).
    """

    imager: str
    pose: Pose
    pose_cov: np.ndarray
    ok: bool
    reason: str
    n_seeds: int
    out_of_plane_axis_room: np.ndarray
    deviation_mm: np.ndarray
    deviation_cov_mm2: np.ndarray
    in_plane_sigma_mm: float
    out_of_plane_sigma_mm: float
    chi2: float
    chi2_dof: float
    prior_inflation_mm2: float
    seeds: tuple[OneViewSeed, ...]
    total_ms: float
    detection_ms: float = 0.0
    fit_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("pose_cov", "out_of_plane_axis_room", "deviation_mm", "deviation_cov_mm2"):
            arr = np.array(getattr(self, name), dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def rotation_cov_deg2(self) -> np.ndarray:
        """Covariance of ``[pitch, roll, yaw]`` (deg^2): the rotation block of ``pose_cov``."""
        return self.pose_cov[3:, 3:]

    def bound_95_mm(self, direction_room) -> float:
        """Half-width of the 95 % interval of the deviation along a room direction (1.96 sigma), mm."""
        u = np.asarray(direction_room, dtype=np.float64)
        u = u / np.linalg.norm(u)
        return 1.959963984540054 * float(np.sqrt(max(u @ self.deviation_cov_mm2 @ u, 0.0)))

    def quality_json(self) -> dict:
        """The ``quality`` object of a ``correction/1`` message (finite numbers only)."""
        return {
            "ok": bool(self.ok),
            "reason": self.reason,
            "views": f"one:{self.imager}",
            "n_seeds": int(self.n_seeds),
            "in_plane_sigma_mm": float(self.in_plane_sigma_mm),
            "out_of_plane_sigma_mm": float(self.out_of_plane_sigma_mm),
            "out_of_plane_axis_room": [float(v) for v in self.out_of_plane_axis_room],
            "deviation_mm": [float(v) for v in self.deviation_mm],
            "deviation_cov_mm2": [[float(v) for v in row] for row in self.deviation_cov_mm2],
            "pose_sigma": [float(math.sqrt(max(v, 0.0))) for v in np.diag(self.pose_cov)],
            "chi2": float(self.chi2),
            "chi2_dof": float(self.chi2_dof),
            "prior_inflation_mm2": float(self.prior_inflation_mm2),
            "seeds": [s.to_json() for s in self.seeds],
            "total_ms": float(self.total_ms),
        }


def out_of_plane_axis(geometry: StereoGeometry, imager: str) -> np.ndarray:
    """Unit vector from the imager's source through the isocentre (room origin), room frame."""
    src = np.asarray(geometry[imager].source_mm, dtype=np.float64)
    u = -src / np.linalg.norm(src)
    u.setflags(write=False)
    return u


# ---------------------------------------------------------------------------- seeds in one view
def _assign(predicted: np.ndarray, centres: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Detection index per seed (-1: none) under the common shift that explains most seeds, and that shift."""
    n = len(predicted)
    best_idx = np.full(n, -1)
    best_key = (0, -np.inf)
    best_shift = np.zeros(2)
    if not len(centres):
        return best_idx, best_shift
    shifts = [np.zeros(2)] + [centres[j] - predicted[k] for k in range(n) for j in range(len(centres))]
    for s in shifts:
        d = np.linalg.norm(predicted[:, None, :] + s - centres[None, :, :], axis=2)
        idx = np.full(n, -1)
        used: set[int] = set()
        for k in np.argsort(d.min(axis=1)):
            for j in np.argsort(d[k]):
                if d[k, j] > radius_px:
                    break
                if j not in used:
                    idx[k] = j
                    used.add(int(j))
                    break
        found = idx >= 0
        # Most seeds first, then the smallest shift from the prior plus the smallest misfits: a clutter
        # blob in one window would otherwise explain "one seed" as well as the seed itself.
        cost = float(d[found, idx[found]].sum() + np.linalg.norm(s)) if found.any() else 0.0
        key = (int(found.sum()), -cost)
        if key > best_key:
            best_key, best_idx = key, idx
            best_shift = np.median(centres[idx[found]] - predicted[found], axis=0) if found.any() else np.zeros(2)
    return best_idx, best_shift


def _overlapping(predicted: np.ndarray, length_px: float) -> np.ndarray:
    """Seeds whose predicted shadows lie within one seed length of another's (one blob in this view)."""
    d = np.linalg.norm(predicted[:, None, :] - predicted[None, :, :], axis=2)
    np.fill_diagonal(d, np.inf)
    return (d < length_px).any(axis=1)


def _find_seeds(signal, imager, level, predicted, defects, config: FiducialConfig, ov: OneViewConfig):
    """``(centres (N, 2), snr (N,), how (N,) str)``: the seeds found in the view (NaN centre: not found)."""
    n = len(predicted)
    size = seed_size_px(imager, config.detection)
    det_config = config.detection
    if ov.detect_min_snr is not None:
        det_config = replace(det_config, min_snr=ov.detect_min_snr)
    dets: tuple[Detection, ...] = detect_seeds(signal, imager, level, predicted, det_config, defects)
    centres = np.array([d.centre_px for d in dets]).reshape(-1, 2)
    idx, shift = _assign(predicted, centres, ov.match_radius_px)
    overlap = _overlapping(predicted, size.length_px)
    out = np.full((n, 2), np.nan)
    snr = np.zeros(n)
    how = np.array(["missing"] * n, dtype=object)
    starts_at = predicted + shift
    for k in range(n):
        if overlap[k]:
            how[k] = "overlap"
            continue
        if idx[k] >= 0 and not ov.refit_detected:
            d = dets[idx[k]]
            out[k], snr[k], how[k] = d.centre_px, d.snr, "detected"
        elif idx[k] >= 0:
            d = dets[idx[k]]
            fit = refine_seeds(signal, imager, level, d.centre_px[None], np.array([d.orientation_deg]),
                               config.detection, ov.refit_min_snr, defects, starts=1)[0]
            # The clean detector's centroid stands when the box fit does not converge on it.
            chosen = d if fit is None or np.linalg.norm(fit.centre_px - d.centre_px) > 1.5 else fit
            out[k], snr[k], how[k] = chosen.centre_px, chosen.snr, "detected"
        else:
            fit = refine_seeds(signal, imager, level, starts_at[k][None], np.zeros(1), config.detection,
                               ov.refit_min_snr, defects)[0]
            if fit is not None and np.linalg.norm(fit.centre_px - starts_at[k]) <= ov.match_radius_px:
                out[k], snr[k], how[k] = fit.centre_px, fit.snr, "fitted"
    return out, snr, how


# ---------------------------------------------------------------------------- the MAP fit
def _project(m: np.ndarray, x: np.ndarray, planned: np.ndarray) -> np.ndarray:
    pts = planned @ rotation_matrix(x[3:]).T + x[:3]
    h = pts @ m[:, :3].T + m[:, 3]
    return h[:, :2] / h[:, 2:3]


def _rotation_derivatives_per_deg(angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dR/d pitch``, ``dR/d roll``, ``dR/d yaw`` (per degree) of ``R = Rz(yaw) Ry(roll) Rx(pitch)``."""
    a, b, c = np.radians(angles_deg)
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    drx = np.array([[0, 0, 0], [0, -sa, -ca], [0, ca, -sa]])
    dry = np.array([[-sb, 0, cb], [0, 0, 0], [-cb, 0, -sb]])
    drz = np.array([[-sc, -cc, 0], [cc, -sc, 0], [0, 0, 0]])
    k = math.pi / 180.0
    return k * (rz @ ry @ drx), k * (rz @ dry @ rx), k * (drz @ ry @ rx)


def _project_jacobian(m: np.ndarray, x: np.ndarray, planned: np.ndarray) -> np.ndarray:
    """``d(col, row)/dx`` of every seed, (2N, 6): per mm of translation and per degree of rotation."""
    pts = planned @ rotation_matrix(x[3:]).T + x[:3]
    h = pts @ m[:, :3].T + m[:, 3]
    uv = h[:, :2] / h[:, 2:3]
    # d(uv)/dP = (M[:2, :3] - uv M[2, :3]) / h2, per seed (N, 2, 3)
    dpix = (m[None, :2, :3] - uv[:, :, None] * m[None, 2:3, :3]) / h[:, 2, None, None]
    dpts = np.empty((len(planned), 3, 6))
    dpts[:, :, :3] = np.eye(3)
    for j, dr in enumerate(_rotation_derivatives_per_deg(x[3:])):
        dpts[:, :, 3 + j] = planned @ dr.T
    return np.einsum("nij,njk->nik", dpix, dpts).reshape(-1, 6)


def _map_fit(m, planned, obs, sigma, mu, cov, x0, max_nfev):
    """MAP six-vector, its covariance and the data chi^2 with its effective degrees of freedom."""
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as err:
        raise MotionPriorError("motion prior covariance is singular (a parameter with zero variance); "
                               "give a positive floor") from err
    whiten = np.linalg.inv(chol)  # r = L^-1 (x - mu): |r|^2 = (x - mu)^T C^-1 (x - mu)

    weight = np.repeat(1.0 / sigma, 2)[:, None]

    def residuals(x):
        data = ((_project(m, x, planned) - obs) / sigma[:, None]).ravel()
        return np.concatenate([data, whiten @ (x - mu)])

    def jacobian(x):
        return np.vstack([weight * _project_jacobian(m, x, planned), whiten])

    fit = least_squares(residuals, x0, jac=jacobian, method="lm", x_scale=np.sqrt(np.diag(cov)), max_nfev=max_nfev)
    jac = fit.jac
    info = jac.T @ jac
    post = np.linalg.inv(info)
    post = 0.5 * (post + post.T)
    n_data = 2 * len(obs)
    jd = jac[:n_data]
    chi2_data = float(np.sum(fit.fun[:n_data] ** 2))
    absorbed = float(np.trace(jd @ post @ jd.T))  # the hat matrix's trace: what the fit can absorb
    return fit.x, post, chi2_data, max(n_data - absorbed, 0.5), fit.fun[:n_data].reshape(-1, 2)


# ---------------------------------------------------------------------------- entry point
def localise_one_view(
    pixels: np.ndarray,
    imager: str,
    geometry: StereoGeometry,
    planned_room_mm: np.ndarray,
    names: Sequence[str],
    prior: MotionPrior,
    elapsed_s: float,
    config: FiducialConfig | None = None,
    i0: float | None = None,
    flat_field: FlatField | None = None,
    *,
    one_view: OneViewConfig | None = None,
    target_room_mm: Sequence[float] = (0.0, 0.0, 0.0),
    defect_mask: np.ndarray | None = None,
) -> OneViewFiducialResult:
    """Patient pose and its covariance from one raw kV frame, the planned seeds and a motion prior.

    Parameters
    ----------
    pixels : (rows, cols) uint16/float32 array
        Raw frame of ``imager`` (more photons = larger value), ``[row, col]``.
    imager : str
        Name of the imager in ``geometry`` that took the frame.
    geometry : StereoGeometry
    planned_room_mm : (N, 3) array
        Planned seed positions, room frame at perfect setup, mm.
    names : sequence of str
        Seed names, one per planned seed.
    prior : MotionPrior
        The last stereo pose and how far the patient may have moved since.
    elapsed_s : float
        Seconds from the prior's reference pair to this frame (>= 0).
    config : FiducialConfig, optional
        Detection parameters (seed size, tracking windows).
    i0 : float, optional
        Unattenuated level after the flat-field correction; estimated when omitted.
    flat_field : FlatField, optional
        This imager's gain and offset maps; its defects are inpainted.
    one_view : OneViewConfig, optional
    target_room_mm : (3,) array
        The point whose deviation is reported (default the isocentre), room mm.
    defect_mask : (rows, cols) bool array, optional

    Returns
    -------
    OneViewFiducialResult

    Raises
    ------
    FrameError
        Unknown imager, a frame that does not fit it (size, dtype, NaN), a bad i0 or flat field.
    FiducialNotFoundError
        Bad planned seeds, seeds not predictable in this view, or fewer than ``min(2, N)``
        seeds found (a lone seed cannot be told from any seed-like spot; as
        :func:`~spineguide.tracking.localisation.fiducials.localise_fiducials`).
    MotionPriorError
        ``prior`` not a MotionPrior, ``elapsed_s`` negative or not finite, a singular prior.

    A migrated seed cannot be named from one view (no inter-seed distance is
    measured): it shows as a seed inconsistent with the rigid model (``ok``
    False), never as :class:`SeedMigrationError`; likewise a frame under the
    wrong imager label shows as seeds not found or not consistent.
    """
    t0 = time.perf_counter()
    config = FiducialConfig() if config is None else config
    ov = OneViewConfig() if one_view is None else one_view
    if not isinstance(config, FiducialConfig):
        raise FiducialConfigError(f"one-view localisation: config must be a FiducialConfig, got {config!r}")
    if not isinstance(ov, OneViewConfig):
        raise FiducialConfigError(f"one-view localisation: one_view must be a OneViewConfig, got {ov!r}")
    if not isinstance(imager, str) or imager not in geometry.names:
        raise FrameError(f"no imager {imager!r} in the geometry (imagers: {', '.join(geometry.names)})")
    if not isinstance(prior, MotionPrior):
        raise MotionPriorError(f"one-view localisation needs a MotionPrior, got {type(prior).__name__}")
    prior.covariance(elapsed_s)  # checks elapsed_s before any image work
    planned, seed_names = _check_planned(planned_room_mm, names)
    target = np.asarray(target_room_mm, dtype=np.float64)
    if target.shape != (3,) or not np.all(np.isfinite(target)):
        raise FiducialNotFoundError(
            f"target must be 3 finite room coordinates (mm), got {np.asarray(target_room_mm).tolist()}")
    im = geometry[imager]
    frame = _check_frame(pixels, im)
    mask = None if defect_mask is None else np.asarray(defect_mask)
    if flat_field is not None:
        if not isinstance(flat_field, FlatField):
            raise FrameError(f"imager '{imager}': flat_field must be a FlatField, got {type(flat_field).__name__}")
        if flat_field.imager != imager:
            raise FrameError(f"imager '{imager}': flat field is imager '{flat_field.imager}''s")
        frame = flat_field.apply(frame)
        if flat_field.defects is not None:
            mask = flat_field.defects if mask is None else (mask.astype(bool) | flat_field.defects)
    signal = np.asarray(frame, dtype=np.float32)
    level = _check_i0(i0, imager) if i0 is not None else estimate_i0(signal, imager)
    try:
        predicted = im.project(prior.reference.apply(planned))
    except GeometryError as err:
        raise FiducialNotFoundError(f"imager '{imager}': cannot predict seed positions: {err}") from err

    centres, snr, how = _find_seeds(signal, im, level, predicted, mask, config, ov)
    t_det = time.perf_counter()
    result = fit_one_view(imager, geometry, planned, seed_names, centres, snr, prior, elapsed_s, one_view=ov,
                          target_room_mm=target, how=how)
    t_end = time.perf_counter()
    return replace(result, total_ms=1e3 * (t_end - t0), detection_ms=1e3 * (t_det - t0),
                   fit_ms=1e3 * (t_end - t_det))


def fit_one_view(
    imager: str,
    geometry: StereoGeometry,
    planned_room_mm: np.ndarray,
    names: Sequence[str],
    centres_px: np.ndarray,
    snr: np.ndarray,
    prior: MotionPrior,
    elapsed_s: float,
    *,
    one_view: OneViewConfig | None = None,
    target_room_mm: Sequence[float] = (0.0, 0.0, 0.0),
    how: Sequence[str] | None = None,
) -> OneViewFiducialResult:
    """The MAP pose and its trust from seed centres already found in one view (steps 2-4 of the module docstring).

    Parameters
    ----------
    imager, geometry, planned_room_mm, names, prior, elapsed_s, one_view, target_room_mm
        As :func:`localise_one_view`.
    centres_px : (N, 2) array
        Fitted ``(col, row)`` per planned seed; NaN rows: not found.
    snr : (N,) array
        Fitted SNR per seed (sets its centre error, :meth:`OneViewConfig.sigma_for`).
    how : sequence of str, optional
        How each seed was found (reported in ``OneViewSeed.how``).

    Raises
    ------
    FiducialNotFoundError, MotionPriorError, FrameError
        As :func:`localise_one_view`.
    """
    t0 = time.perf_counter()
    ov = OneViewConfig() if one_view is None else one_view
    if not isinstance(imager, str) or imager not in geometry.names:
        raise FrameError(f"no imager {imager!r} in the geometry (imagers: {', '.join(geometry.names)})")
    if not isinstance(prior, MotionPrior):
        raise MotionPriorError(f"one-view localisation needs a MotionPrior, got {type(prior).__name__}")
    cov0 = np.array(prior.covariance(elapsed_s))  # checks elapsed_s
    mu = prior.mean
    planned = np.asarray(planned_room_mm, dtype=np.float64)
    seed_names = tuple(str(n) for n in names)
    target = np.asarray(target_room_mm, dtype=np.float64)
    centres = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    snr = np.asarray(snr, dtype=np.float64).ravel()
    if centres.shape != (len(planned), 2) or snr.shape != (len(planned),) or len(seed_names) != len(planned):
        raise FiducialNotFoundError(f"{len(planned)} planned seeds need as many names, centres and SNRs, got "
                                    f"{len(seed_names)}, {centres.shape}, {snr.shape}")
    im = geometry[imager]
    predicted = im.project(prior.reference.apply(planned))
    how = np.array(["detected"] * len(planned) if how is None else list(how), dtype=object)
    found = np.all(np.isfinite(centres), axis=1)
    how[~found & (how == "detected")] = "missing"
    n_found = int(found.sum())
    if n_found < min(2, len(planned)):
        raise FiducialNotFoundError(
            f"fiducials not found: {n_found} of {len(planned)} planned seeds seen in imager '{imager}' near where "
            "the prior puts them" + ("; a lone seed cannot be told from any other seed-like spot" if n_found else ""))

    m = np.asarray(im.projection_matrix, dtype=np.float64)
    sigma = np.array([ov.sigma_for(s) for s in snr[found]])
    obs, used = centres[found], planned[found]
    x1, post, chi2_data, dof, res = _map_fit(m, used, obs, sigma, mu, cov0, mu.copy(), ov.max_nfev)

    # Step 3: out-of-plane motion as large as the in-plane motion seen since the reference.
    axis = out_of_plane_axis(geometry, imager)
    move = pose_from_six(x1).apply(target) - prior.reference.apply(target)
    in_plane = move - (move @ axis) * axis
    inflation = ov.out_of_plane_ratio * float(in_plane @ in_plane)
    cov = cov0
    if inflation > 0:
        cov = cov0.copy()
        cov[:3, :3] += inflation * np.outer(axis, axis)
        # A patient who moved may have turned too: rotations the one view cannot see (about axes across
        # the ray) would otherwise be held at the prior and pull the translation.
        cov[3:, 3:] += (ov.rotation_per_mm_deg**2 * float(in_plane @ in_plane)) * np.eye(3)
        x1, post, chi2_data, dof, res = _map_fit(m, used, obs, sigma, mu, cov, x1, ov.max_nfev)
    pose = pose_from_six(x1)
    post = np.array(check_covariance(post, 6, "one-view pose"))

    dev_cov = _target_cov(x1, post, target)
    deviation = pose.apply(target) - target
    oop_sigma = float(np.sqrt(max(axis @ dev_cov @ axis, 0.0)))
    basis = np.linalg.svd(axis[None, :])[2][1:]  # two unit vectors perpendicular to the ray
    in_sigma = float(np.sqrt(max(np.linalg.eigvalsh(basis @ dev_cov @ basis.T).max(), 0.0)))

    seed_res = np.linalg.norm(res, axis=1)  # normalised
    reasons = []
    if n_found < ov.min_seeds:
        reasons.append(f"too few seeds: {n_found} of {len(planned)} found in imager '{imager}' "
                       f"(one view needs {ov.min_seeds})")
    limit = float(chi2.ppf(ov.chi2_quantile, dof))
    if chi2_data > limit:
        reasons.append(f"reprojection chi^2 {chi2_data:.1f} above {limit:.1f} ({dof:.1f} dof, "
                       f"quantile {ov.chi2_quantile:g}): seeds inconsistent with the rigid model and the prior")
    seed_limit = float(chi2.ppf(ov.seed_chi2_quantile, 2))
    bad = [seed_names[k] for k, r in zip(np.flatnonzero(found), seed_res) if r * r > seed_limit]
    if bad and n_found >= 3:
        reasons.append("seed " + ", ".join(bad) + " inconsistent with the rigid model "
                       f"(normalised residual above {math.sqrt(seed_limit):.1f})")
    seeds = []
    fi = {k: q for q, k in enumerate(np.flatnonzero(found))}
    px_res = np.zeros(len(planned))
    for k in fi:
        px_res[k] = seed_res[fi[k]] * sigma[fi[k]]
    for k, name in enumerate(seed_names):
        c = None if not found[k] else centres[k].copy()
        seeds.append(OneViewSeed(name, bool(found[k]), c, predicted[k].copy(), float(snr[k]),
                                 float(sigma[fi[k]]) if k in fi else 0.0, float(px_res[k]), str(how[k])))
    t_end = time.perf_counter()
    return OneViewFiducialResult(
        imager=imager, pose=pose, pose_cov=post, ok=not reasons, reason="; ".join(reasons), n_seeds=n_found,
        out_of_plane_axis_room=axis, deviation_mm=deviation, deviation_cov_mm2=dev_cov,
        in_plane_sigma_mm=in_sigma, out_of_plane_sigma_mm=oop_sigma, chi2=chi2_data, chi2_dof=float(dof),
        prior_inflation_mm2=inflation, seeds=tuple(seeds), total_ms=1e3 * (t_end - t0),
        detection_ms=0.0, fit_ms=1e3 * (t_end - t0),
    )


def _target_cov(x: np.ndarray, cov: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``J C J^T`` of the target's position under the six-vector (central differences, 1e-4 mm / deg)."""
    h = 1e-4
    jac = np.empty((3, 6))
    for k in range(6):
        d = np.zeros(6)
        d[k] = h
        jac[:, k] = ((rotation_matrix((x + d)[3:]) @ target + (x + d)[:3])
                     - (rotation_matrix((x - d)[3:]) @ target + (x - d)[:3])) / (2 * h)
    out = jac @ cov @ jac.T
    return 0.5 * (out + out.T)
