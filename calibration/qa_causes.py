"""Daily QA that separates the phantom's setup from changes of the imaging geometry (issue 13 item 5).

Today's stereo pair of the BB phantom is explained first by the phantom's
**6-DoF setup** (rotation about the centre BB, then translation; room frame
IEC 61217, mm and degrees) with the stored geometry held fixed: the setup
varies every day and is not a fault. What the setup cannot explain is tested
per imager for three **causes** of a geometry change:

- *panel shift*: the panel moved in its own plane (2 unknowns, mm along the
  panel's column and row directions);
- *panel rotation*: the panel turned in its plane about its centre (1, deg);
- *source shift*: the focal spot moved (3, mm, room axes).

Each cause is fitted jointly with the setup (weighted least squares, weights
``1 / sqrt(sigma_det^2 + QA_FLOOR_PX^2)`` from the detections' local noise)
and its drop in chi-square is tested at a Bonferroni-corrected level, as is
each imager's remaining chi-square (an omnibus test for anything else), so
the family-wise false-alarm rate on an unchanged room is at most
:data:`FALSE_ALARM` when the sigmas are honest.

**Detection limits** follow from the same model: with ``J_c`` the weighted
Jacobian of a cause and ``P`` the projection onto what the setup can absorb,
``F = ((I - P) J_c)^T ((I - P) J_c)``; a change ``delta d`` (unit direction
``d``) is found with 95 % probability when ``delta^2 d^T F d`` reaches the
non-centrality that gives the cause's test 95 % power. Some directions are
*not observable at all*: a panel shift along the imager's epipolar lines is
exactly what a translation of the phantom along the other imager's rays does
(that imager sees only a change of magnification of ~1e-4), so it reads as
setup; only the phantom's set-up accuracy (lasers, Winston-Lutz) bounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation
from scipy.stats import chi2, ncx2

from .errors import CalibrationSolveError
from .foundation import readonly_array as _ro
from .geometry import StereoGeometry
from .phantom import BBPhantom
from .solve import _imager_state, _project, _Reference

__all__ = [
    "QA_FLOOR_PX",
    "FALSE_ALARM",
    "DETECTION_POWER",
    "CAUSES",
    "PhantomSetup",
    "CauseTest",
    "DetectionLimit",
    "CauseAnalysis",
    "analyse_causes",
]

#: Model-error allowance added in quadrature to each centre's detection sigma, px (centroid bias on a bodied
#: phantom through the clinic chain, ~0.02-0.03 px; issue 13).
QA_FLOOR_PX = 0.03
#: Family-wise false-alarm probability of all the tests of one QA on an unchanged room.
FALSE_ALARM = 0.01
#: Probability with which a change at the stated detection limit is found.
DETECTION_POWER = 0.95
#: Cause -> (number of unknowns, unit).
CAUSES = {"panel shift": (2, "mm"), "panel rotation": (1, "deg"), "source shift": (3, "mm")}


@dataclass(frozen=True, slots=True)
class PhantomSetup:
    """The phantom's setup today: ``room = R(rotation_deg) p + centre_offset + translation_mm + couch shift``.

    Room frame, mm and degrees (rotation vector about the centre BB), each with its 1-sigma.
    """

    translation_mm: np.ndarray
    rotation_deg: np.ndarray
    translation_sigma_mm: np.ndarray
    rotation_sigma_deg: np.ndarray


@dataclass(frozen=True, slots=True)
class CauseTest:
    """One cause fitted in one imager together with the setup.

    ``value``/``sigma`` in the cause's unit (panel shift: mm along the panel's column and row directions; panel
    rotation: deg about the panel normal; source shift: mm along room x, y, z); ``chi2_drop`` the fall of the
    weighted chi-square against the setup-only fit; ``threshold`` its test level; ``significant`` when above.
    """

    imager: str
    cause: str
    value: np.ndarray
    sigma: np.ndarray
    unit: str
    chi2_drop: float
    threshold: float
    significant: bool

    def describe(self) -> str:
        v = ", ".join(f"{a:+.3f}" for a in self.value)
        s = ", ".join(f"{a:.3f}" for a in self.sigma)
        return (f"imager {self.imager}: {self.cause} ({v}) +- ({s}) {self.unit} explains a chi-square drop of "
                f"{self.chi2_drop:.1f} (test level {self.threshold:.1f})")


@dataclass(frozen=True, slots=True)
class DetectionLimit:
    """Smallest change of a cause found with :data:`DETECTION_POWER` by today's test, best and worst direction.

    ``worst`` is ``inf`` when some direction of the cause is indistinguishable from a setup error.
    """

    imager: str
    cause: str
    best: float
    worst: float
    unit: str


@dataclass(frozen=True, slots=True)
class CauseAnalysis:
    """Setup + per-imager geometry-change tests of one stereo pair.

    Attributes
    ----------
    setup : PhantomSetup
    chi2_setup : dict imager -> float
        Weighted chi-square of each imager after the setup-only fit.
    dof : dict imager -> int
    omnibus_threshold : dict imager -> float
    tests : tuple of CauseTest
    limits : tuple of DetectionLimit
    residuals_px : dict imager -> (N, 2) array
        Measured minus projected after the setup fit, px (NaN where not found).
    """

    setup: PhantomSetup
    chi2_setup: dict
    dof: dict
    omnibus_threshold: dict
    tests: tuple[CauseTest, ...]
    limits: tuple[DetectionLimit, ...]
    residuals_px: dict

    @property
    def changed_imagers(self) -> tuple[str, ...]:
        names = {t.imager for t in self.tests if t.significant}
        names |= {n for n, c in self.chi2_setup.items() if c > self.omnibus_threshold[n]}
        return tuple(sorted(names))

    def best_cause(self, imager: str) -> CauseTest | None:
        cand = [t for t in self.tests if t.imager == imager and t.significant]
        return max(cand, key=lambda t: t.chi2_drop / t.threshold) if cand else None


class _Model:
    """Projection of the phantom through the stored geometry with a setup and (optionally) one cause in one imager."""

    def __init__(self, geometry: StereoGeometry, phantom: BBPhantom, pixels: dict, sigmas: dict, shift_mm: np.ndarray):
        self.names = geometry.names
        self.refs = {n: _Reference.of(geometry[n]) for n in self.names}
        self.geometry = geometry
        self.p = phantom.positions_mm
        self.base = phantom.centre_offset_mm + shift_mm
        self.ok = {n: np.all(np.isfinite(pixels[n]), axis=1) for n in self.names}
        self.px = {n: pixels[n][self.ok[n]] for n in self.names}
        self.w = {}
        for n in self.names:
            s = np.asarray(sigmas[n], dtype=np.float64)[self.ok[n]]
            s = np.where(np.isfinite(s), s, np.nanmedian(s) if np.any(np.isfinite(s)) else 0.05)
            self.w[n] = 1.0 / np.sqrt(s**2 + QA_FLOOR_PX**2)

    def cause_delta(self, name: str, cause: str, c: np.ndarray) -> np.ndarray:
        """9-vector of solve's imager parameters (source 3 mm, panel centre 3 mm, rotation vector 3 deg)."""
        x = np.zeros(9)
        ref = self.refs[name]
        if cause == "panel shift":
            x[3:6] = c[0] * ref.col_direction + c[1] * ref.row_direction
        elif cause == "panel rotation":
            x[6:9] = c[0] * np.cross(ref.col_direction, ref.row_direction)
        elif cause == "source shift":
            x[0:3] = c
        return x

    def residuals(self, v: np.ndarray, cause: tuple[str, str] | None = None) -> np.ndarray:
        rot = Rotation.from_rotvec(np.radians(v[3:6])).as_matrix()
        room = self.p @ rot.T + self.base + v[0:3]
        out = []
        for n in self.names:
            x9 = self.cause_delta(n, cause[1], v[6:]) if cause is not None and cause[0] == n else np.zeros(9)
            proj = _project(_imager_state(self.refs[n], x9, False), room[self.ok[n]])
            out.append(((proj - self.px[n]) * self.w[n][:, None]).ravel())
        return np.concatenate(out)

    def fit(self, cause: tuple[str, str] | None = None, v0: np.ndarray | None = None):
        n_c = CAUSES[cause[1]][0] if cause is not None else 0
        x0 = np.zeros(6 + n_c) if v0 is None else np.concatenate([v0[:6], np.zeros(n_c)])
        sol = least_squares(lambda v: self.residuals(v, cause), x0, method="lm", x_scale=1.0, xtol=1e-12,
                            ftol=1e-12, gtol=1e-12)
        if not np.all(np.isfinite(sol.x)):
            raise CalibrationSolveError(f"QA setup fit did not converge: {sol.message}")
        return sol


def _noncentrality_for_power(dof: int, level: float, power: float) -> float:
    """Non-centrality at which a chi-square(dof) test at ``level`` has ``power`` (bisection)."""
    lo, hi = 0.0, 1.0
    while ncx2.sf(level, dof, hi) < power:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if ncx2.sf(level, dof, mid) < power:
            lo = mid
        else:
            hi = mid
    return hi


def analyse_causes(geometry: StereoGeometry, phantom: BBPhantom, pixels: dict, sigmas: dict,
                   couch_shift_mm=(0.0, 0.0, 0.0)) -> CauseAnalysis:
    """Fit today's setup, then test every imager for each cause of a geometry change.

    Parameters
    ----------
    geometry : StereoGeometry
        The stored calibration (room frame, mm).
    phantom : BBPhantom
    pixels : dict imager -> (N, 2) array
        Measured ``(col, row)`` per marker, NaN where not found.
    sigmas : dict imager -> (N,) array
        Detection 1-sigma per marker, px (NaN unknown).
    couch_shift_mm : (3,) array
        Known couch shift of today's exposure, room frame, mm.
    """
    shift = np.asarray(couch_shift_mm, dtype=np.float64)
    model = _Model(geometry, phantom, pixels, sigmas, shift)
    n_total = sum(len(model.px[n]) for n in model.names)
    if n_total * 2 <= 6 + 3:
        raise CalibrationSolveError(f"QA: {n_total} measured markers are too few to separate setup from geometry")
    base = model.fit()
    r0 = base.fun
    # Setup covariance from the setup-only fit (weighted units: sigma^2 = 1 for honest weights).
    jtj = base.jac.T @ base.jac
    cov = np.linalg.pinv(jtj)
    setup = PhantomSetup(_ro(base.x[0:3]), _ro(base.x[3:6]), _ro(np.sqrt(np.diag(cov)[0:3])),
                         _ro(np.sqrt(np.diag(cov)[3:6])))
    n_tests = len(model.names) * (len(CAUSES) + 1)
    alpha = FALSE_ALARM / n_tests
    chi2_setup, dof, omni, res_px = {}, {}, {}, {}
    pos = 0
    for n in model.names:
        m = len(model.px[n])
        seg = r0[pos : pos + 2 * m]
        pos += 2 * m
        chi2_setup[n] = float(seg @ seg)
        # The 6 setup unknowns are shared by the imagers in proportion to their residuals.
        dof[n] = max(1, int(round(2 * m - 6 * (2 * m) / (2 * n_total))))
        omni[n] = float(chi2.isf(alpha, dof[n]))
        full = np.full((len(pixels[n]), 2), np.nan)
        full[model.ok[n]] = -seg.reshape(-1, 2) / model.w[n][:, None]
        res_px[n] = _ro(full)
    # Projection onto what the setup absorbs (weighted units).
    j_p = base.jac
    proj = j_p @ np.linalg.pinv(j_p)
    tests, limits = [], []
    chi2_0 = float(r0 @ r0)
    for n in model.names:
        for cause, (k, unit) in CAUSES.items():
            sol = model.fit((n, cause), base.x)
            drop = chi2_0 - float(sol.fun @ sol.fun)
            level = float(chi2.isf(alpha, k))
            c_jtj = sol.jac.T @ sol.jac
            c_cov = np.linalg.pinv(c_jtj)
            sig = np.sqrt(np.maximum(np.diag(c_cov)[6:], 0.0))
            tests.append(CauseTest(n, cause, _ro(sol.x[6:]), _ro(sig), unit, drop, level, drop > level))
            # Detection limits at the stored geometry (linearised): the cause's Jacobian with the setup projected out.
            j_c = _cause_jacobian(model, n, cause, base.x)
            j_perp = j_c - proj @ j_c
            f = j_perp.T @ j_perp
            lam = _noncentrality_for_power(k, level, DETECTION_POWER)
            ev = np.linalg.eigvalsh(f)
            best = math.sqrt(lam / ev[-1]) if ev[-1] > 0 else math.inf
            worst = math.sqrt(lam / ev[0]) if ev[0] > 1e-9 * max(ev[-1], 1e-300) else math.inf
            limits.append(DetectionLimit(n, cause, best, worst, unit))
    return CauseAnalysis(setup, chi2_setup, dof, omni, tuple(tests), tuple(limits), res_px)


def _cause_jacobian(model: _Model, name: str, cause: str, v: np.ndarray) -> np.ndarray:
    k = CAUSES[cause][0]
    h = 1e-4
    cols = []
    for i in range(k):
        e = np.zeros(6 + k)
        e[:6] = v[:6]
        ep, em = e.copy(), e.copy()
        ep[6 + i] += h
        em[6 + i] -= h
        cols.append((model.residuals(ep, (name, cause)) - model.residuals(em, (name, cause))) / (2 * h))
    return np.stack(cols, axis=1)
