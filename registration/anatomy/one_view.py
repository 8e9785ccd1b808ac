"""One-view anatomy registration: a single kV frame matched to DRRs under a Gaussian prior on the pose (issue 18).

When one imager is blocked, dark, saturated or missing, the pose is estimated from the other view alone, constrained
by a :class:`~spineguide.registration.motion_prior.MotionPrior` (the last stereo pose, widened by the time since).

Method (``docs/ANATOMY_REGISTRATION.md``, "One view"):

1. Tracking-mode refinement (``config.one_view_levels``, the exact background) of the one view, started at the
   prior's mean, with the prior as extra least-squares rows: the objective is
   ``w |r_image(x)|^2 + (s(x) - s_prior)^T C^-1 (s(x) - s_prior)``, where ``x`` is the registration's own
   parameter vector (translation mm, rotation deg about the ROI centre, on top of the prior's mean pose) and
   ``s(x)`` the pose's six-vector of :func:`pose_six` (rotations about the isocentre), so the prior term is
   exact in the prior's own parameters. Levenberg-Marquardt then solves the MAP problem.
2. The image weight ``w = 1 / sigma_eff^2``: ``sigma_eff^2`` is the mean squared image residual times a
   correlation factor (the Bartlett-weighted sum of the residual's normalised spatial autocorrelation over
   +-``config.one_view_correlation_lag_px`` binned pixels: neighbouring residuals of smoothed gradient images are
   not independent samples), at the start pose. Re-solving with the weight from the result changed no error on 12
   real-CT cases and cost 11 % more CPU (median; 40 % at p95): not done; the covariance does not rely on the weight.
3. Covariance: a sandwich that stays honest whatever weight was used,
   ``cov_x = H^-1 (w^2 S + P) H^-1``, ``H = w J^T J + P``, ``P = G^T C^-1 G`` (``G = ds/dx``), with ``S`` the
   heteroskedasticity- and correlation-consistent (Newey-West, 2D Bartlett kernel) covariance of the image
   score ``J^T r`` from the final residual, plus the model's own in-plane bias (``config.one_view_model_error_mm``
   per axis across the ray, at the ROI centre), which no residual statistic shows; then ``cov_s = G cov_x G^T``.
   Without image information (``J = 0``) the sandwich is the prior's covariance exactly.
4. Acceptance as the stereo checks apply to one view: ROI on the panel, saturation, convergence, bounds, similarity,
   the view's residual 2D shift (here: image and prior disagreeing in the panel's plane), the in-plane standard
   deviation of the ROI centre (``max_std_mm``), and the prior chi-square (``one_view_max_prior_chi2``).

What one view cannot do: the translation along the view's central ray changes the projection only through
magnification (~0.1 % per mm at these distances: a few hundredths of a binned pixel over a vertebra), so it, and
largely the two rotations about in-plane axes, come from the prior. A patient who moved along the blocked
direction more than the prior allows is not seen; the reported covariance is only as honest as the prior.

Part of :mod:`spineguide.registration.anatomy`.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.linalg

from .._blas import single_blas_thread
from ..motion_prior import MotionPrior, MotionPriorError, in_plane_motion_inflation, pose_six, target_covariance_mm2
from ..pose import Pose
from ..similarity import RegistrationFrameError, Similarity, transmission
from .images import _Frame, _View, _features
from .result import OneViewAnatomyResult, QualityReason

log = logging.getLogger(__name__)

#: Step of the central differences of the six-vector with respect to ``x`` (mm, deg): the map is smooth.
_SIX_STEP = 1e-4


class _PriorTerm:
    """The prior's whitened rows ``K^-1 (s(x) - s_prior)`` (``C = K K^T``) in the registration's parameters ``x``."""

    def __init__(self, to_pose, mean_six: np.ndarray, cov_six: np.ndarray, image_weight: float,
                 image_projection: np.ndarray) -> None:
        self._to_pose = to_pose
        self.image_projection = np.asarray(image_projection, dtype=np.float64)
        self._mean = np.asarray(mean_six, dtype=np.float64)
        try:
            self._chol = np.linalg.cholesky(cov_six)
        except np.linalg.LinAlgError as err:
            raise MotionPriorError(
                f"motion prior covariance is not positive definite (eigenvalues {np.linalg.eigvalsh(cov_six).round(6).tolist()}); "
                "give a floor or a reference covariance on every parameter") from err
        self.image_weight = float(image_weight)

    def six(self, x: np.ndarray) -> np.ndarray:
        return pose_six(self._to_pose(x))

    def residual(self, x: np.ndarray) -> np.ndarray:
        return scipy.linalg.solve_triangular(self._chol, self.six(x) - self._mean, lower=True)

    def six_jacobian(self, x: np.ndarray) -> np.ndarray:
        """``d s / d x`` (6x6) by central differences."""
        g = np.empty((6, 6))
        for k in range(6):
            d = np.zeros(6)
            d[k] = _SIX_STEP
            g[:, k] = (self.six(x + d) - self.six(x - d)) / (2 * _SIX_STEP)
        return g

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        return scipy.linalg.solve_triangular(self._chol, self.six_jacobian(x), lower=True)


def _channel_images(values: np.ndarray, mask: np.ndarray, metric: Similarity) -> np.ndarray:
    """Feature-vector entries (or rows of a Jacobian, ``(m, n)``) back on the binned grid: ``(channels, rows, cols[, n])``."""
    channels = 2 if metric is Similarity.GRADIENT_CORRELATION else 1
    n = int(np.count_nonzero(mask))
    tail = values.shape[1:]
    out = np.zeros((channels,) + mask.shape + tail)
    for c in range(channels):
        out[c][mask] = values[c * n : (c + 1) * n]
    return out


def _bartlett_lags(lag_px: int):
    for dr in range(-lag_px, lag_px + 1):
        for dc in range(-lag_px, lag_px + 1):
            yield dr, dc, (1.0 - abs(dr) / (lag_px + 1)) * (1.0 - abs(dc) / (lag_px + 1))


def _shifted_products(a: np.ndarray, b: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``sum_p a(p) b(p + d)^T`` over the grid (``a``, ``b``: ``(rows, cols, k)``), ``d = (dr, dc)``."""
    rows, cols = a.shape[:2]
    ra, rb = slice(max(0, -dr), rows - max(0, dr)), slice(max(0, dr), rows - max(0, -dr))
    ca, cb = slice(max(0, -dc), cols - max(0, dc)), slice(max(0, dc), cols - max(0, -dc))
    x, y = a[ra, ca].reshape(-1, a.shape[2]), b[rb, cb].reshape(-1, b.shape[2])
    return x.T @ y


def correlation_factor(residual: np.ndarray, mask: np.ndarray, metric: Similarity, lag_px: int) -> float:
    """How many residual entries act as one independent sample: the Bartlett-weighted sum of the residual's
    normalised spatial autocorrelation (channels at one pixel counted together), at least 1.

    ``residual``: one view's image residual (feature layout of :func:`.images._features`); ``mask`` its binned grid.
    """
    img = _channel_images(np.asarray(residual, dtype=np.float64), mask, metric)  # (c, rows, cols)
    field = np.moveaxis(img, 0, -1)  # (rows, cols, c): the channels at one pixel are one sample
    zero = float(np.einsum("ijk,ijk->", field, field))
    if zero <= 0:
        return 1.0
    total = 0.0
    for dr, dc, k in _bartlett_lags(lag_px):
        total += k * float(np.trace(_shifted_products(field, field, dr, dc)))
    return max(total / zero, 1.0)


def score_covariance(residual: np.ndarray, jac: np.ndarray, mask: np.ndarray, metric: Similarity,
                     lag_px: int) -> np.ndarray:
    """Newey-West (2D Bartlett kernel) estimate of the covariance of the image score ``J^T r`` (n x n).

    Sums ``k(d) u(p) u(p + d)^T`` over pixels ``p`` and lags ``|d| <= lag_px`` of the per-pixel scores
    ``u(p) = sum_channels J(p) r(p)``: consistent under spatially correlated, unequal residuals.
    """
    r_img = _channel_images(np.asarray(residual, dtype=np.float64), mask, metric)  # (c, rows, cols)
    j_img = _channel_images(np.asarray(jac, dtype=np.float64), mask, metric)  # (c, rows, cols, n)
    u = np.einsum("cijn,cij->ijn", j_img, r_img)  # per-pixel score, channels summed
    s = np.zeros((jac.shape[1], jac.shape[1]))
    for dr, dc, k in _bartlett_lags(lag_px):
        s += k * _shifted_products(u, u, dr, dc)
    return 0.5 * (s + s.T)


def posterior_covariance_x(image_information: np.ndarray, image_score_cov: np.ndarray, image_weight: float,
                           prior_information: np.ndarray) -> np.ndarray:
    """Sandwich covariance of the MAP estimate in the registration's parameters.

    ``H^-1 (w^2 S + P) H^-1`` with ``H = w J^T J + P``: ``image_information = J^T J``, ``image_score_cov = S``
    (covariance of ``J^T r``), ``w`` the image weight used in the objective, ``P`` the prior's information
    (``G^T C^-1 G``). With ``J = 0`` it is ``P^-1``, the prior; with ``w S = J^T J`` it is ``H^-1``.
    """
    w = float(image_weight)
    h = w * np.asarray(image_information) + np.asarray(prior_information)
    h_inv = np.linalg.inv(h)
    cov = h_inv @ (w * w * np.asarray(image_score_cov) + np.asarray(prior_information)) @ h_inv
    return 0.5 * (cov + cov.T)


class _OneView:
    """The one-view registration of :class:`AnatomyRegistration` (a part of it)."""

    @single_blas_thread
    def register_one_view(self, frame: np.ndarray, imager: str, prior: MotionPrior, elapsed_s: float,
                          i0: float | None = None) -> OneViewAnatomyResult:
        """Register one raw kV frame of one imager against the planning CT, constrained by a motion prior.

        Parameters
        ----------
        frame : (rows, cols) array
            Raw detector signal (bone dark) of ``imager``, ``image[row, col]``.
        imager : str
            Name of the imager in the geometry that took ``frame``.
        prior : MotionPrior
            The last stereo pose (room frame) and how it widens with time; the fit starts at its mean.
        elapsed_s : float
            Seconds from the prior's reference pair to this frame (>= 0).
        i0 : float, optional
            Unattenuated level; estimated from the frame if omitted.

        Returns
        -------
        OneViewAnatomyResult
            Pose (room frame), its 6x6 covariance (prior included), ``ok`` and the reason codes. A refused
            result carries the prior's mean and covariance.

        Raises
        ------
        RegistrationFrameError
            Unknown imager, wrong frame shape, bad pixel values or i0.
        MotionPriorError
            ``prior`` is not a MotionPrior, a bad ``elapsed_s``, or a prior covariance that is not positive definite.
        """
        t_start = time.monotonic()
        cfg = self.config
        if not isinstance(imager, str) or imager not in self.geometry.names:
            raise RegistrationFrameError(f"imager {imager!r} is not in the geometry (imagers {list(self.geometry.names)})")
        im = self.geometry[imager]
        raw = np.asarray(frame)
        if raw.shape != (im.rows, im.cols):
            raise RegistrationFrameError(f"frame '{imager}': shape {raw.shape}, imager '{imager}' has {im.rows}x{im.cols} pixels")
        if i0 is not None and (isinstance(i0, bool) or not isinstance(i0, (int, float, np.integer, np.floating))):
            raise RegistrationFrameError(f"frame '{imager}': i0 must be a positive finite number or None, got {i0!r}")
        logs = {imager: _Frame(*transmission(raw, i0, imager))}
        if not isinstance(prior, MotionPrior):
            raise MotionPriorError(f"prior must be a MotionPrior, got {type(prior).__name__}")
        cov_prior = np.array(prior.covariance(elapsed_s))
        start = prior.reference
        mean_six = prior.mean
        centre = start.apply(self.roi_centre_room_mm)
        counter = [0]

        def refused(reasons, **figures) -> OneViewAnatomyResult:
            codes = tuple(r.value for r in reasons)
            return OneViewAnatomyResult(imager, start, cov_prior, False, codes[0], (time.monotonic() - t_start) * 1000.0,
                                        codes, drr_evaluations=counter[0], **figures)

        # The translation along the view's ray through the ROI centre is left to the prior: the image sees it
        # only as magnification (~1/2000 per mm), where any scale mismatch between DRR and frame (blur, slice
        # thickness, spectrum) would pass for millimetres of it (measured: a 1 mm-wide prior let the estimate run
        # 3.1 mm along the ray on the CI phantom, the truth having moved 0.35 mm the other way).
        ray = centre - im.source_mm
        ray /= np.linalg.norm(ray)
        q = np.eye(6)
        q[:3, :3] -= np.outer(ray, ray)
        prior_term = _PriorTerm(lambda x_: self._pose(x_, start, centre), mean_six, cov_prior, 1.0, q)

        region, roi_on, _ = self._region(im, start, 1)
        sat = self._saturated_fraction(raw, region) if region is not None else 1.0
        reasons = []
        if roi_on < cfg.min_roi_on_panel:
            reasons.append(QualityReason.ROI_OFF_PANEL)
        if sat > cfg.max_saturated_fraction:
            reasons.append(QualityReason.SATURATED)
        if reasons:
            return refused(reasons, roi_on_panel=roi_on, saturated_fraction=sat)

        mode = cfg.tracking_background_derivatives
        lag = cfg.one_view_correlation_lag_px
        x = np.zeros(6)
        iterations, converged, final, sigma2 = 0, False, None, math.nan
        for level in cfg.one_view_levels:
            views = self._prepare_level(logs, self._pose(x, start, centre), level, names=(imager,))
            if views is None:
                return refused([QualityReason.ROI_OFF_PANEL], roi_on_panel=roi_on, saturated_fraction=sat)
            view = views[0]
            # The weight from the residual where this level starts (misaligned there: an under-weight of the image;
            # the sandwich covariance below stays honest whatever the weight).
            sigma2, _ = _sigma2_eff(self._one_view_residual(view, level, x, start, centre, counter), view, cfg.metric,
                                    lag)
            prior_term.image_weight = 1.0 / math.sqrt(sigma2)
            x, its, converged, final = self._refine(views, level, x, start, centre, counter, mode, prior=prior_term)
            iterations += its
        view = final["views"][0]
        n = view.frame_features.size
        w_sqrt = prior_term.image_weight
        r_img = final["r"][:n] / w_sqrt
        sigma2, factor = _sigma2_eff(r_img, view, cfg.metric, lag)  # at the result: reported
        # The image Jacobian at the result (the LM's last one may be a chord from a step before: then a new one).
        if final["jac_x"] is not None and np.array_equal(final["jac_x"], x):
            jac_img = final["jac"][:n] / w_sqrt  # the LM's last Jacobian was taken at the result itself
        elif cfg.jacobian == "analytic":
            jac_img = self._jacobian(final["views"], final["level"], self._level_volume(final["level"]), q @ x, None,
                                     start, centre, counter) @ q
        else:
            jac_img = final["jac"][:n] / w_sqrt
        # The image residual is rho v - u (refine._scaled_residual): the noise itself, and its Jacobian carries the
        # cost's curvature (quality._pose_covariance, the stereo counterpart). With the scale unfitted (r = v - u)
        # the noise is r - (1 - rho) v and the curvature rho J^T J.
        model = _features(final["drrs"][0], view.mask, cfg.metric)
        similarity = float(model @ view.frame_features)
        noise, info = r_img, jac_img.T @ jac_img
        if not self._scale_fitted(final["level"]):
            noise, info = r_img - (1.0 - similarity) * model, max(similarity, 0.0) * info
        s_score = score_covariance(noise, jac_img, view.mask, cfg.metric, lag)
        g = prior_term.six_jacobian(x)
        c_inv = np.linalg.inv(cov_prior)
        p_info = g.T @ c_inv @ g
        cov_x = posterior_covariance_x(info, s_score, w_sqrt**2, p_info)
        # The model's own in-plane bias, which the residual's statistics cannot show (config.one_view_model_error_mm).
        cov_x[:3, :3] += cfg.one_view_model_error_mm**2 * (np.eye(3) - np.outer(ray, ray))
        cov_six = g @ cov_x @ g.T
        pose = self._pose(x, start, centre)
        # A patient seen to have moved across the ray may have moved as much along it (and turned), which the
        # prior did not expect: widen those directions by the move seen (motion_prior.in_plane_motion_inflation).
        # The translation along the ray is the prior's (above), so its posterior variance is the prior's plus this.
        move = pose.apply(self.roi_centre_room_mm) - start.apply(self.roi_centre_room_mm)
        cov_six = cov_six + in_plane_motion_inflation(move, ray)
        cov_six = 0.5 * (cov_six + cov_six.T)
        shift = self._view_shift_mm(view, final["drrs"][0], r_img)
        prior_r = prior_term.residual(x)
        chi2 = float(prior_r @ prior_r)
        std_in, std_out = _target_stds_mm(pose, cov_six, self.roi_centre_room_mm, im)
        at_bounds = bool(np.any(np.abs(x[:3]) >= cfg.translation_bound_mm * 0.999)
                         or np.any(np.abs(x[3:]) >= cfg.rotation_bound_deg * 0.999))
        if at_bounds:
            reasons.append(QualityReason.AT_BOUNDS)
        if not converged:
            reasons.append(QualityReason.NOT_CONVERGED)
        if not similarity >= cfg.min_similarity:  # written so that NaN fails the check
            reasons.append(QualityReason.LOW_SIMILARITY)
        if not shift <= cfg.max_view_shift_mm:
            reasons.append(QualityReason.VIEWS_DISAGREE)
        if not std_in <= cfg.max_std_mm:
            reasons.append(QualityReason.ILL_DEFINED)
        if not chi2 <= cfg.one_view_max_prior_chi2:
            reasons.append(QualityReason.PRIOR_CONFLICT)
        figures = dict(
            similarity=similarity, view_shift_mm=shift, roi_on_panel=roi_on, saturated_fraction=sat,
            converged=bool(converged), at_bounds=at_bounds, prior_chi2=chi2, image_sigma=math.sqrt(sigma2),
            correlation_factor=factor, target_std_in_plane_mm=std_in, target_std_out_of_plane_mm=std_out,
            iterations=iterations,
        )
        if reasons:
            return refused(reasons, **figures)
        total_ms = (time.monotonic() - t_start) * 1000.0
        log.debug("one-view anatomy registration '%s': ok in %.1f ms, %d DRRs", imager, total_ms, counter[0])
        return OneViewAnatomyResult(imager, pose, cov_six, True, "", total_ms, (), drr_evaluations=counter[0], **figures)

    def _one_view_residual(self, view: _View, level, x, start, centre, counter) -> np.ndarray:
        """The image residual of one view at ``x`` (the background set up as the level's refinement does)."""
        volume = self._level_volume(level)
        if self._backgrounds and not level.context and self.config.tracking_background_derivatives == "exact":
            self._exact_background_rays([view], level)
            return self._residual([view], level, volume, x, start, centre, counter)[0]
        # A linear background model is drawn by the refinement itself; before it the residual is the ROI's alone,
        # a coarser start for the weight.
        return self._residual([view], level, volume, x, start, centre, counter)[0]


def _sigma2_eff(residual: np.ndarray, view: _View, metric: Similarity, lag_px: int) -> tuple[float, float]:
    """Effective variance of one image-residual entry (mean square times the correlation factor, > 0) and the factor."""
    m = max(residual.size - 6, 1)
    ms = float(residual @ residual) / m
    factor = correlation_factor(residual, view.mask, metric, lag_px)
    return max(ms * factor, 1e-12), factor


def _target_stds_mm(pose: Pose, cov_six: np.ndarray, point_room_mm: np.ndarray, imager) -> tuple[float, float]:
    """Largest standard deviation of a point's deviation across the imager's ray through it, and along that ray."""
    try:
        cov3 = target_covariance_mm2(pose, cov_six, point_room_mm)
    except MotionPriorError:
        return math.inf, math.inf
    p = pose.apply(np.asarray(point_room_mm, dtype=np.float64))
    ray = p - imager.source_mm
    ray = ray / np.linalg.norm(ray)
    along = float(ray @ cov3 @ ray)
    basis = np.linalg.svd(ray[None, :])[2][1:]  # two unit vectors across the ray
    across = float(np.linalg.eigvalsh(basis @ cov3 @ basis.T).max())
    return math.sqrt(max(across, 0.0)), math.sqrt(max(along, 0.0))
