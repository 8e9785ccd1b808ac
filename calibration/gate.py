"""Acceptance gate of a calibration (issue 13 item 3): per-BB residual outliers and fit RMS against the expected noise.

Every matched BB view's reprojection residual (px, ``(col, row)``) is
compared with what its centre's noise allows: ``sigma = sqrt(sigma_det^2 +
floor^2)``, with ``sigma_det`` the detection's own 1-sigma
(:attr:`spineguide.calibration.bb_detection.DetectedBBs.sigma_px`, local
noise) and ``floor`` a model-error allowance (:data:`MODEL_FLOOR_PX`: what a
plane background leaves at a hole's edge). A BB fails when ``|r| / sigma``
exceeds the Bonferroni bound of a 2-D Gaussian, ``sqrt(-2 ln(alpha / N))``
over the ``N`` residuals (``alpha`` = :data:`FALSE_ALARM`); the fit fails
when its normalised RMS ``sqrt(mean(|r|^2 / (2 sigma^2)))`` exceeds
:data:`RMS_RATIO_LIMIT`. Residuals of a least-squares fit are a little
smaller than the errors (leverage), so both tests are conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MODEL_FLOOR_PX", "FALSE_ALARM", "RMS_RATIO_LIMIT", "GateResult", "acceptance_gate"]

#: Model-error allowance added in quadrature to each centre's sigma, px.
MODEL_FLOOR_PX = 0.1
#: Family-wise false-alarm probability of the per-BB outlier test (Gaussian residuals).
FALSE_ALARM = 1e-3
#: Largest fit RMS over its expected value.
RMS_RATIO_LIMIT = 2.0


@dataclass(frozen=True, slots=True)
class GateResult:
    """Verdict of :func:`acceptance_gate`.

    Attributes
    ----------
    passed : bool
    failed_bbs : tuple of str
        Names of the BBs with an outlying residual in any view, sorted.
    findings : tuple of str
        One line per failed test, naming imager, BB, view and values (px).
    rms_ratio : dict imager -> float
        Normalised fit RMS per imager with the model floor (the gated value).
    noise_ratio : dict imager -> float
        The same against the detection sigmas alone (1 = residuals as the
        noise predicts; reported, not gated).
    limit_sigma : float
        The per-BB bound in sigmas.
    """

    passed: bool
    failed_bbs: tuple[str, ...]
    findings: tuple[str, ...]
    rms_ratio: dict
    limit_sigma: float
    noise_ratio: dict


def acceptance_gate(result, *, model_floor_px: float = MODEL_FLOOR_PX, false_alarm: float = FALSE_ALARM,
                    rms_ratio_limit: float = RMS_RATIO_LIMIT) -> GateResult:
    """Judge a :class:`~spineguide.calibration.solve.CalibrationResult` (from :func:`calibrate`).

    Residuals and sigmas are panel pixels of each imager. A residual whose
    detection sigma is unknown (a result built from views, not frames) uses
    the floor alone.
    """
    sig_of = {}
    for v, meas in enumerate(getattr(result, "measured", ()) or ()):
        if meas is None:
            continue
        s = np.asarray(meas.detections.sigma_px)
        for j, name in enumerate(result.phantom.names):
            k = int(meas.match.detection_index[j])
            if k >= 0 and k < len(s):
                sig_of[(v, name)] = float(s[k])
    findings, failed, ratios, noise = [], set(), {}, {}
    for v, meas in enumerate(getattr(result, "measured", ()) or ()):
        if meas is None:
            continue
        for j in np.flatnonzero(~np.asarray(meas.match.found)):
            name = result.phantom.names[j]
            failed.add(name)
            findings.append(f"BB {name} not found in imager {meas.imager} (view {v}): hidden, merged with "
                            "another BB's shadow, or not where the phantom file says")
    n_total = sum(len(sol.residual_markers) for sol in result.imagers)
    limit = math.sqrt(-2.0 * math.log(false_alarm / max(n_total, 1)))
    for sol in result.imagers:
        r = np.linalg.norm(np.asarray(sol.residuals_px), axis=1)
        sig = np.array([math.hypot(sig_of.get((int(v), m), 0.0), model_floor_px)
                        for m, v in zip(sol.residual_markers, sol.residual_views)])
        z = r / sig
        for i in np.flatnonzero(z > limit):
            name = sol.residual_markers[i]
            failed.add(name)
            findings.append(f"BB {name} in imager {sol.geometry.name} (view {int(sol.residual_views[i])}): residual "
                            f"{r[i]:.3f} px = {z[i]:.1f} sigma (limit {limit:.1f})")
        ratio = float(math.sqrt(np.mean(z**2) / 2.0)) if len(z) else 0.0
        s_det = np.array([sig_of.get((int(v), m), math.nan) for m, v in zip(sol.residual_markers, sol.residual_views)])
        noise[sol.geometry.name] = float(math.sqrt(np.nanmean((r / s_det) ** 2) / 2.0)) if np.any(s_det > 0) else math.nan
        ratios[sol.geometry.name] = ratio
        if ratio > rms_ratio_limit:
            findings.append(f"imager {sol.geometry.name}: fit RMS {sol.rms_px:.3f} px is {ratio:.1f} times the expected "
                            f"noise (limit {rms_ratio_limit:g})")
    return GateResult(not findings, tuple(sorted(failed)), tuple(findings), ratios, limit, noise)
