"""Acceptance: whether a registration result can be trusted, and the reason code when it cannot.

Part of :mod:`spineguide.registration.anatomy` (see its docstring for the method).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .._anatomy_kernels import normal_equations
from ..similarity import Similarity, similarity
from .images import _View, _features
from .one_view import score_covariance  # the same estimator as the one-view covariance
from .result import AnatomyQuality, QualityReason, _frozen_map


class _Acceptance:
    """The quality checks of :class:`AnatomyRegistration` (a part of it)."""

    # ---------------------------------------------------------------------- quality
    def _quality(self, final, x, converged, reasons, roi_on, sat, level_margin) -> AnatomyQuality:
        cfg = self.config
        views, drrs, r, jac = final["views"], final["drrs"], final["r"], final["jac"]
        sims, measures, shifts = {}, {}, {}
        models = [_features(drr, v.mask, cfg.metric) for v, drr in zip(views, drrs)]  # the DRRs' unit features
        offset = 0
        for v, drr, model in zip(views, drrs, models):
            n = v.frame_features.size
            rv = r[offset : offset + n]
            offset += n
            name = v.imager.name
            sims[name] = float(model @ v.frame_features)  # the correlation rho
            measures[name] = _frozen_map({m.value: similarity(m, v.frame, drr, v.mask) for m in Similarity})
            shifts[name] = self._view_shift_mm(v, drr, rv)
        std_mm = std_deg = (math.inf,) * 3
        if jac is not None:
            try:
                cov = self._pose_covariance(views, models, r, jac, self._scale_fitted(final["level"]))
                std = np.sqrt(np.maximum(np.diag(cov), 0.0))
                std_mm, std_deg = tuple(float(s) for s in std[:3]), tuple(float(s) for s in std[3:])
            except np.linalg.LinAlgError:
                pass
        at_bounds = bool(
            np.any(np.abs(x[:3]) >= cfg.translation_bound_mm * 0.999)
            or np.any(np.abs(x[3:]) >= cfg.rotation_bound_deg * 0.999)
        )
        reasons = list(reasons)
        if at_bounds:
            reasons.append(QualityReason.AT_BOUNDS)
        if not converged:
            reasons.append(QualityReason.NOT_CONVERGED)
        if min(sims.values()) < cfg.min_similarity:
            reasons.append(QualityReason.LOW_SIMILARITY)
        if max(shifts.values()) > cfg.max_view_shift_mm:
            reasons.append(QualityReason.VIEWS_DISAGREE)
        if max(std_mm) > cfg.max_std_mm or max(std_deg) > cfg.max_std_deg:
            reasons.append(QualityReason.ILL_DEFINED)
        ok = not reasons
        return AnatomyQuality(
            ok, QualityReason.OK if ok else reasons[0], tuple(reasons), _frozen_map(sims), _frozen_map(measures),
            _frozen_map(shifts), std_mm, std_deg, _frozen_map(roi_on), _frozen_map(sat), level_margin,
            bool(converged), at_bounds,
        )

    def _pose_covariance(self, views, models, r, jac, scaled: bool) -> np.ndarray:
        """Covariance (6 x 6; mm, deg about the ROI centre) of the result from the image noise, honest at low SNR.

        Per view the residual is ``r = rho v - u`` (unit feature vectors of DRR and radiograph, ``rho = u . v``;
        ``refine._scaled_residual``): a noisy radiograph is ``u = rho v + noise``, so ``r`` is the noise, spatially
        correlated by the smoothing, and the Jacobian ``J`` (~``rho`` times the unit features' one) carries the cost's
        true curvature. The covariance is the sandwich ``H^-1 S H^-1``, ``H = J^T J`` over both views and ``S`` the
        Newey-West covariance of the score ``J^T r`` per view (``one_view_correlation_lag_px``). The plain
        Gauss-Newton covariance ``|r|^2 / dof H^-1`` of the former ``v - u`` residual was 4-5x too small at real CT
        i0 2000 (``rho`` ~0.3; BENCHMARKS). With the scale not fitted (``scaled`` False: ``r = v - u``) the noise
        and the curvature are made the same way from ``r`` and ``models`` (each view's DRR unit features ``v``).
        """
        cfg = self.config
        h = np.zeros((6, 6))
        score = np.zeros((6, 6))
        offset = 0
        for v, model in zip(views, models):
            n = v.frame_features.size
            noise = r[offset : offset + n]
            j = jac[offset : offset + n]
            offset += n
            if not scaled:  # r = v - u: the noise is r - (1 - rho) v, the curvature rho J^T J
                rho = float(model @ v.frame_features)
                noise, j = noise - (1.0 - rho) * model, rho * j
            h += j.T @ j
            score += score_covariance(noise, j, v.mask, cfg.metric, cfg.one_view_correlation_lag_px)
        h_inv = np.linalg.inv(h)
        cov = h_inv @ score @ h_inv
        return 0.5 * (cov + cov.T)

    def _view_shift_mm(self, view: _View, drr: np.ndarray, rv: np.ndarray) -> float:
        """2D shift of this view's DRR that would best reduce this view's residual alone, mm at the isocentre."""
        h = 0.5
        jac = np.empty((rv.size, 2))
        for k, (dx, dy) in enumerate(((h, 0.0), (0.0, h))):
            cols = []
            for s in (1.0, -1.0):
                m = np.float32([[1, 0, s * dx], [0, 1, s * dy]])
                moved = cv2.warpAffine(drr, m, (drr.shape[1], drr.shape[0]), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REPLICATE)
                cols.append(_features(moved, view.mask, self.config.metric))
            jac[:, k] = (cols[0] - cols[1]) / (2 * h)
        a, g = normal_equations(jac, rv)
        try:
            shift = np.linalg.solve(a, -g)
        except np.linalg.LinAlgError:
            return math.inf
        return float(np.linalg.norm(shift)) * view.pixel_at_iso_mm
