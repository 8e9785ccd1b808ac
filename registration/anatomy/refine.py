"""Refinement at one level: the joint residual of both views, its pose derivatives, and Levenberg-Marquardt
(:mod:`.optimiser`).

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np

from .._anatomy_kernels import linear_model, normal_equations
from ..drr import compute_drr_batch, compute_drr_pose_derivatives
from .config import PyramidLevel, _FINAL_REDRAW_FRACTION, _MAX_DAMPING_TRIES
from .images import _binned_mean, _drr_batch_binned, _feature_jacobian, _features, _smooth
from .optimiser import ModelHooks, levenberg_marquardt

log = logging.getLogger(__name__)


def _scaled_residual(model: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """One view's residual ``rho v - u``: the DRR's unit features ``v`` scaled by their correlation ``rho = v . u``
    with the radiograph's ``u``, minus ``u``; ``|r|^2 = 1 - rho^2``.

    The radiograph's unit features are ``rho v + noise`` (noise takes a share of their unit norm). The plain
    ``v - u`` has the same minimum, but its Gauss-Newton curvature ``J^T J`` is ``1 / rho`` times the cost's own
    (``rho J^T J``): its steps fall short by the factor ``rho``, so at low dose (``rho`` ~0.3) the optimiser crawled
    and ran out of iterations (real CT, i0 2000). Fitting the scale (variable projection) makes the step whole.
    """
    return float(model @ frame) * model - frame


class _Refinement:
    """The refinement of :class:`AnatomyRegistration` (a part of it)."""

    def _scale_fitted(self, level: PyramidLevel) -> bool:
        """Whether this level's residual is the scale-fitted ``rho v - u`` (:func:`_scaled_residual`) or ``v - u``:
        ``config.fit_contrast_scale``, never at a context level. The covariances (quality, one view) follow it."""
        return self.config.fit_contrast_scale and not level.context

    def _residuals(self, views, level, volume, xs, start, centre, counter) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Residual vector and smoothed model DRRs (per view) at each of the parameter vectors ``xs``."""
        poses = [self._pose(x, start, centre) for x in xs]

        def roi(v):
            return _drr_batch_binned(volume, v.imager, poses, v.region, level.binning, level.supersampling,
                                     self.config.projector)

        lim_mm = self.config.background_taylor_mm
        lim = np.array([lim_mm] * 3 + [math.degrees(lim_mm / self._roi_radius_mm)] * 3)

        def background(v):
            if lim_mm > 0.0 and v.bg_taylor is not None and all(np.all(np.abs(x - v.bg_taylor[0]) <= lim) for x in xs):
                x0, b0, db = v.bg_taylor
                return np.stack([b0 + np.tensordot(x - x0, db, axes=(0, 0)) for x in xs])
            return compute_drr_batch(v.bg_volume, v.imager, poses, v.region, level.binning, parallel=False,
                                     projector="joseph", rays=v.bg_rays)

        if len(views) == 1 and views[0].bg_volume is not None and self._pool is not None:
            # One view (one-view registration): its ROI and background DRRs on two threads instead of the views.
            pending = self._pool.submit(background, views[0])
            drrs = [roi(views[0])]
            bgs = [pending.result()]
        else:
            drrs = self._per_view(roi, views)
            bgs = self._per_view(background, views) if views[0].bg_volume is not None else None
        counter[0] += len(poses) * len(views)
        if bgs is not None:
            drrs = [d + b for d, b in zip(drrs, bgs)]
            counter[0] += len(poses) * len(views)

        out = []
        for k, x in enumerate(xs):
            parts, images = [], []
            for v, batch in zip(views, drrs):
                drr = batch[k]
                if v.bg0 is not None:
                    drr = drr + linear_model(v.bg0, v.bg_jac, x - v.x_bg)
                drr = _smooth(drr, level.smoothing_sigma_px)
                images.append(drr)
                f = _features(drr, v.mask, self.config.metric)
                parts.append(_scaled_residual(f, v.frame_features) if self._scale_fitted(level) else f - v.frame_features)
            out.append((np.concatenate(parts), images))
        return out

    def _residual(self, views, level, volume, x, start, centre, counter) -> tuple[np.ndarray, list[np.ndarray]]:
        return self._residuals(views, level, volume, [x], start, centre, counter)[0]

    def _jacobian(self, views, level, volume, x, steps, start, centre, counter) -> np.ndarray:
        """Jacobian of the residual at ``x``: analytic (``config.jacobian``) or central differences
        (the 12 displaced poses in one batch per view)."""
        if self.config.jacobian == "analytic":
            return self._analytic_jacobian(views, level, volume, x, start, centre, counter)
        xs = []
        for p in range(6):
            for sign in (1.0, -1.0):
                xd = x.copy()
                xd[p] += sign * steps[p]
                xs.append(xd)
        res = self._residuals(views, level, volume, xs, start, centre, counter)
        jac = np.empty((res[0][0].size, 6))
        for p in range(6):
            jac[:, p] = (res[2 * p][0] - res[2 * p + 1][0]) / (2.0 * steps[p])
        return jac

    def _analytic_jacobian(self, views, level, volume, x, start, centre, counter) -> np.ndarray:
        """Jacobian of the residual at ``x`` from the Joseph projector's exact pose derivatives.

        One derivative pass per view gives ``d DRR / d x``; the background model adds its
        own slopes; smoothing and the gradient are linear, and the z-normalisation of the
        features is differentiated exactly (:func:`_feature_jacobian`).
        """
        pose = self._pose(x, start, centre)
        eps = 1e-6  # the pose matrix is smooth in x: central differences of it are exact to ~1e-9
        dpose = np.stack([
            (self._pose(x + eps * e, start, centre).matrix - self._pose(x - eps * e, start, centre).matrix) / (2 * eps)
            for e in np.eye(6)
        ])
        b, s = level.binning, level.supersampling

        def background(v):
            return compute_drr_pose_derivatives(v.bg_volume, v.imager, pose, dpose, v.region, b, rays=v.bg_rays)

        # One view (one-view registration): its background's derivative pass on a second thread.
        split = len(views) == 1 and views[0].bg_volume is not None and self._pool is not None
        pending = self._pool.submit(background, views[0]) if split else None

        def one(v):
            both = compute_drr_pose_derivatives(volume, v.imager, pose, dpose, v.region, b // s)
            both = _binned_mean(both, v.region, b, s)
            image, dimages = both[0], both[1:]
            if v.bg_volume is not None:
                bg = pending.result() if pending is not None else background(v)
                image, dimages = image + bg[0], dimages + bg[1:]
                if self.config.background_taylor_mm > 0.0:
                    v.bg_taylor = (np.array(x, dtype=np.float64), bg[0], bg[1:])
            if v.bg0 is not None:
                image = image + linear_model(v.bg0, v.bg_jac, x - v.x_bg)
                dimages = dimages + v.bg_jac
            image = _smooth(image, level.smoothing_sigma_px)
            dimages = np.stack([_smooth(d, level.smoothing_sigma_px) for d in dimages])
            jf = _feature_jacobian(image, dimages, v.mask, self.config.metric)
            if not self._scale_fitted(level):
                return jf
            f = _features(image, v.mask, self.config.metric)
            # d(rho f) with rho = f . u: rho J + f (u^T J)
            u = v.frame_features
            return float(f @ u) * jf + np.outer(f, u @ jf)

        parts = self._per_view(one, views)
        counter[0] += len(views)
        return np.concatenate(parts, axis=0)

    def _exact_background_rays(self, views, level: PyramidLevel) -> None:
        """Set each view up to render the background exactly at every pose, on the rays the comparison reads."""
        # A feature at a mask pixel reads the smoothed image within 1 px (gradient) and 1 px more
        # (the view-shift test's half-pixel warp); the smoothing reads 4 sigma around that.
        reach = int(math.ceil(4.0 * level.smoothing_sigma_px)) + 2
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * reach + 1, 2 * reach + 1))
        for v in views:
            v.bg_volume = self._backgrounds[self._background_key(level)]
            v.bg_rays = cv2.dilate(v.mask.astype(np.uint8), kernel).astype(bool)

    def _refine(self, views, level: PyramidLevel, x, start, centre, counter, mode: str = "flow", prior=None):
        """Levenberg-Marquardt over ``x`` (translation mm, rotation deg about ``centre``) at one level.

        ``mode``: how the background (the CT outside the ROI) enters the model, see
        ``AnatomyConfig.background_derivatives``. ``prior`` (one-view registration, :mod:`.one_view`): an object
        with ``image_weight`` (the image residual's square-root weight, 1/sigma), ``image_projection`` (6x6 ``Q``:
        the image is evaluated at ``Q x``, so the directions ``Q`` removes are the prior's alone) and
        ``residual(x)`` / ``jacobian(x)`` of the prior's whitened rows; the objective is then
        ``|image_weight * r_image(Q x)|^2 + |r_prior(x)|^2`` (the image rows first), a MAP estimate."""
        cfg = self.config
        flow = mode == "flow"
        volume = self._level_volume(level)
        pix_mm = min(v.pixel_at_iso_mm for v in views)
        h_mm = cfg.fd_step_px * pix_mm
        h_deg = math.degrees(h_mm / self._roi_radius_mm)
        steps = np.array([h_mm] * 3 + [h_deg] * 3)
        # The background model is linear in the pose: redraw it when the pose has moved more than
        # background_redraw_px binned pixels from where it was drawn (rotations at the lever arm).
        redraw_mm = cfg.background_redraw_px * pix_mm
        lever_mm = cfg.background_lever_mm if flow else self._roi_radius_mm
        relinearise = np.array([redraw_mm] * 3 + [math.degrees(redraw_mm / lever_mm)] * 3)
        use_bg = bool(self._backgrounds) and not level.context
        if use_bg and mode == "exact":
            self._exact_background_rays(views, level)
            use_bg = False  # no linear model to redraw: the background is exact at every pose
        if use_bg:
            self._linearise_background(views, level, x, steps, start, centre, counter, flow)
        lower = np.array([-cfg.translation_bound_mm] * 3 + [-cfg.rotation_bound_deg] * 3)
        upper = -lower
        # Levenberg-Marquardt (optimiser.py); the background model is the residual's own linear model, redrawn
        # when x moves beyond `relinearise` and settled within a fraction of it.
        def residual(x_):
            if prior is None:
                return self._residual(views, level, volume, x_, start, centre, counter)
            r, images = self._residual(views, level, volume, prior.image_projection @ x_, start, centre, counter)
            return np.concatenate([prior.image_weight * r, prior.residual(x_)]), images

        def jacobian(x_):
            # Central differences (config.jacobian "central"): forward ones are biased by the curvature near the optimum.
            if prior is None:
                return self._jacobian(views, level, volume, x_, steps, start, centre, counter)
            q = prior.image_projection
            jac = self._jacobian(views, level, volume, q @ x_, steps, start, centre, counter) @ q
            return np.ascontiguousarray(np.vstack([prior.image_weight * jac, prior.jacobian(x_)]))

        fit = levenberg_marquardt(
            residual,
            jacobian,
            x, lower=lower, upper=upper, tolerance=np.array([cfg.tolerance_mm] * 3 + [cfg.tolerance_deg] * 3),
            max_iterations=level.max_iterations, normal_equations=normal_equations,
            max_damping_tries=_MAX_DAMPING_TRIES,
            model=ModelHooks(
                stale=lambda x_: use_bg and bool(np.any(np.abs(x_ - views[0].x_bg) > relinearise)),
                settled=lambda x_: not use_bg or bool(
                    np.all(np.abs(x_ - views[0].x_bg) <= _FINAL_REDRAW_FRACTION * relinearise)),
                redraw=lambda x_: self._linearise_background(views, level, x_, steps, start, centre, counter, flow),
            ),
            on_iteration=lambda its, cost, lam, x_, improved, fresh: log.debug(
                "level f%d b%d it %d: cost %.6f lambda %.2g x %s improved %s fresh %s",
                level.volume_factor, level.binning, its, cost, lam, np.round(x_, 3), improved, fresh,
            ),
        )
        final = {"views": views, "level": level, "drrs": fit.payload, "r": fit.residual, "jac": fit.jacobian,
                 "cost": fit.cost, "jac_x": fit.jacobian_x}
        return fit.x, fit.iterations, fit.converged, final
