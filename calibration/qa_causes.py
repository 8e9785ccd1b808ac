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

**Naming the cause** (:class:`CauseVerdict`): the causes are not nested, so
the largest drop does not decide between them (a source shift has one unknown
more and nearly contains a panel shift). Each cause is tested against the fit
of *all three* causes of the imager at once (with the setup): a cause whose
excess chi-square is improbable under it (level :data:`NAMING_ERROR`) is
excluded; the rest are the candidates. The physics behind it: a source shift
``s`` parallel to the panel moves a BB's shadow by ``-s (SID - D) / D`` with
``D`` the BB's distance from the source -- like a panel shift of about
``-0.64 s``, but varying with the BB's depth (parallax, +-4 % over the cube);
a shift along the central ray changes the magnification. A panel shift moves
every shadow equally. Below the **separation limits**
(:class:`SeparationLimit`, the same Fisher construction with the rival cause
and the setup projected out) one pair cannot tell them apart and both are
named.

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
    "SeparationLimit",
    "CauseVerdict",
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
#: Probability, per imager, that the true cause is wrongly excluded from the named candidates (honest sigmas),
#: split over the causes (Bonferroni).
NAMING_ERROR = 0.01
#: Cause -> (number of unknowns, unit).
CAUSES = {"panel shift": (2, "mm"), "panel rotation": (1, "deg"), "source shift": (3, "mm")}
#: Every cause of one imager at once (the encompassing model the causes are tested against), 6 unknowns.
_COMBINED = "combined"
_N_COMBINED = sum(k for k, _ in CAUSES.values())


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
class SeparationLimit:
    """Smallest change of ``cause`` with which today's pair excludes ``rival`` as its explanation.

    With :data:`DETECTION_POWER` probability, in the best and the worst direction of ``cause`` (unit of ``cause``);
    ``worst`` is ``inf`` when some direction of ``cause`` is exactly what ``rival`` plus a setup error does. A change
    below the limit is reported with both as candidates.
    """

    imager: str
    cause: str
    rival: str
    best: float
    worst: float
    unit: str


@dataclass(frozen=True, slots=True)
class CauseVerdict:
    """Which causes explain one imager's change, decided against the fit of all causes at once.

    Each cause, fitted with the setup, is compared with the *combined* fit (all three causes of the imager and the
    setup): its excess chi-square ``chi2_cause - chi2_combined`` is, when that cause is the truth and the sigmas are
    honest, chi-square with ``6 - k`` degrees of freedom (fewer where the causes overlap: conservative). A cause is
    **excluded** when the excess passes ``chi2.isf(NAMING_ERROR / 6, 6 - k)``; the others that are significant on
    their own are the **candidates**, most likely (largest p-value of the excess) first. When several imagers are
    flagged, each candidate is also tested against the fit of every cause of every imager (``6 n - k`` degrees of
    freedom, same level); an imager none of whose causes survives while another's does is the other's echo
    (``own`` False). One candidate names the cause; several
    mean that today's pair cannot tell them apart at its noise (see :class:`SeparationLimit`); none means that no
    single cause explains the change.

    ``excess`` maps cause -> (excess chi-square, exclusion level); ``changed`` is False when neither a cause nor
    the omnibus test is significant for this imager; ``own`` is False when this imager is flagged only as the echo
    of another imager's change (the setup-only fit spreads one imager's change over both).
    """

    imager: str
    candidates: tuple[CauseTest, ...]
    excess: dict
    changed: bool = True
    own: bool = True

    @property
    def named(self) -> CauseTest | None:
        """The cause when exactly one candidate remains, else None."""
        return self.candidates[0] if len(self.candidates) == 1 else None

    def describe(self) -> str:
        if not self.changed:
            return f"imager {self.imager}: no change found"
        if not self.own:
            return (f"imager {self.imager}: no change of its own (its residuals after the setup-only fit are "
                    "another imager's change)")
        if not self.candidates:
            parts = ", ".join(f"{c} (excess {e:.1f} > {lv:.1f})" for c, (e, lv) in self.excess.items())
            return f"imager {self.imager}: no single cause explains the change (against the combined fit: {parts})"
        if len(self.candidates) == 1:
            return self.candidates[0].describe()
        names = " or ".join(t.cause for t in self.candidates)
        sizes = "; ".join(t.describe() for t in self.candidates)
        return (f"imager {self.imager}: {names} (this pair cannot tell them apart at its noise, see the separation "
                f"limits): {sizes}")


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
    verdicts : dict imager -> CauseVerdict
        Which causes explain each imager's change (candidates against the combined fit).
    separation : tuple of SeparationLimit
        Per imager and ordered pair of causes, the smallest change of one that excludes the other.
    """

    setup: PhantomSetup
    chi2_setup: dict
    dof: dict
    omnibus_threshold: dict
    tests: tuple[CauseTest, ...]
    limits: tuple[DetectionLimit, ...]
    residuals_px: dict
    verdicts: dict
    separation: tuple[SeparationLimit, ...] = ()

    @property
    def changed_imagers(self) -> tuple[str, ...]:
        """Imagers with a change: flagged by their own tests, less the echoes of another imager's change
        (``CauseVerdict.own`` False). Where a single cause of either imager explains the pair (a panel shift of A
        across its epipolar lines is one of B plus a setup translation), both are named."""
        return tuple(sorted(n for n, v in self.verdicts.items() if v.changed and v.own))

    def best_cause(self, imager: str) -> CauseTest | None:
        """The most likely candidate cause of ``imager``'s change (largest p-value against the combined fit), or None.

        Not necessarily the only one: ``verdicts[imager].candidates`` lists every cause the pair cannot exclude,
        ``verdicts[imager].named`` is set only when one remains.
        """
        v = self.verdicts.get(imager)
        return v.candidates[0] if v is not None and v.candidates else None


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
        elif cause == _COMBINED:  # panel shift (2), panel rotation (1), source shift (3)
            x[3:6] = c[0] * ref.col_direction + c[1] * ref.row_direction
            x[6:9] = c[2] * np.cross(ref.col_direction, ref.row_direction)
            x[0:3] = c[3:6]
        return x

    def residuals(self, v: np.ndarray, cause=None) -> np.ndarray:
        """Weighted residuals (projected minus measured) for setup ``v[:6]`` and the causes' unknowns after it.

        ``cause``: None (setup only), one ``(imager, cause)`` or a list of them (unknowns in that order).
        """
        items = [] if cause is None else [cause] if isinstance(cause[0], str) else list(cause)
        rot = Rotation.from_rotvec(np.radians(v[3:6])).as_matrix()
        room = self.p @ rot.T + self.base + v[0:3]
        x9 = {n: np.zeros(9) for n in self.names}
        pos = 6
        for n, c in items:
            k = _n_unknowns(c)
            x9[n] = x9[n] + self.cause_delta(n, c, v[pos : pos + k])
            pos += k
        out = []
        for n in self.names:
            proj = _project(_imager_state(self.refs[n], x9[n], False), room[self.ok[n]])
            out.append(((proj - self.px[n]) * self.w[n][:, None]).ravel())
        return np.concatenate(out)

    def fit(self, cause=None, v0: np.ndarray | None = None):
        items = [] if cause is None else [cause] if isinstance(cause[0], str) else list(cause)
        n_c = sum(_n_unknowns(c) for _, c in items)
        x0 = np.zeros(6 + n_c) if v0 is None else np.concatenate([v0[:6], np.zeros(n_c)])
        sol = least_squares(lambda v: self.residuals(v, cause), x0, method="lm", x_scale=1.0, xtol=1e-12,
                            ftol=1e-12, gtol=1e-12)
        if not np.all(np.isfinite(sol.x)):
            raise CalibrationSolveError(f"QA setup fit did not converge: {sol.message}")
        return sol


def _n_unknowns(cause: str) -> int:
    return _N_COMBINED if cause == _COMBINED else CAUSES[cause][0]


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
    tests, limits, separation, verdicts, combined = [], [], [], {}, {}
    chi2_0 = float(r0 @ r0)
    alpha_name = NAMING_ERROR / (2 * len(CAUSES))  # two exclusion tests per cause: within the imager, whole pair
    chi2_single = {}
    for n in model.names:
        chi2_c, jac_c = {}, {}
        for cause, (k, unit) in CAUSES.items():
            sol = model.fit((n, cause), base.x)
            chi2_c[cause] = chi2_single[(n, cause)] = float(sol.fun @ sol.fun)
            drop = chi2_0 - chi2_c[cause]
            level = float(chi2.isf(alpha, k))
            c_jtj = sol.jac.T @ sol.jac
            c_cov = np.linalg.pinv(c_jtj)
            sig = np.sqrt(np.maximum(np.diag(c_cov)[6:], 0.0))
            tests.append(CauseTest(n, cause, _ro(sol.x[6:]), _ro(sig), unit, drop, level, drop > level))
            # Detection limits at the stored geometry (linearised): the cause's Jacobian with the setup projected out.
            j_c = jac_c[cause] = _cause_jacobian(model, n, cause, base.x)
            best, worst = _limits(j_c - proj @ j_c, _noncentrality_for_power(k, level, DETECTION_POWER))
            limits.append(DetectionLimit(n, cause, best, worst, unit))
        # Which causes explain the change: each against the fit of all of them at once (the encompassing model).
        both = model.fit((n, _COMBINED), base.x)
        chi2_all = min(float(both.fun @ both.fun), *chi2_c.values())
        excess = {}
        for cause, (k, _) in CAUSES.items():
            excess[cause] = (chi2_c[cause] - chi2_all, float(chi2.isf(alpha_name, _N_COMBINED - k)))
        mine = [t for t in tests if t.imager == n]
        # Most likely first: the largest p-value of the excess (a raw chi-square would favour the cause with more
        # unknowns -- a source shift nearly contains a panel shift).
        cand = sorted((t for t in mine if t.significant and excess[t.cause][0] <= excess[t.cause][1]),
                      key=lambda t: -chi2.sf(max(excess[t.cause][0], 0.0), _N_COMBINED - CAUSES[t.cause][0]))
        changed = any(t.significant for t in mine) or chi2_setup[n] > omni[n]
        verdicts[n] = CauseVerdict(n, tuple(cand), excess, changed)
        combined[n] = float(both.fun @ both.fun)
        # Separation limits: a change of `cause` excludes `rival` once the part of it that neither `rival` nor the
        # setup can absorb carries the non-centrality that gives the exclusion test 95 % power.
        for rival, (k_r, _) in CAUSES.items():
            j_sr = np.hstack([base.jac, jac_c[rival]])
            p_sr = j_sr @ np.linalg.pinv(j_sr)
            lam = _noncentrality_for_power(_N_COMBINED - k_r, excess[rival][1], DETECTION_POWER)
            for cause, (_, unit) in CAUSES.items():
                if cause != rival:
                    j_c = jac_c[cause]
                    best, worst = _limits(j_c - p_sr @ j_c, lam)
                    separation.append(SeparationLimit(n, cause, rival, best, worst, unit))
    # Which imager changed: the setup-only fit spreads one imager's change over all of them, so the other imager is
    # flagged too. Each candidate single cause is also tested against the fit of every cause of every imager (6 x
    # imagers unknowns + setup): the changed imager's cause explains the whole pair, an echo's does not. (The
    # per-imager combined fit cannot decide this: the other imager's six unknowns, at any size, mimic too much --
    # a 0.3 deg panel rotation of B is, to the noise, a phantom rotation about B's axis plus A's source and panel
    # shifts of several mm that undo what A sees of it.)
    if len(model.names) > 1 and sum(v.changed for v in verdicts.values()) > 1:
        every = model.fit([(n, _COMBINED) for n in model.names], base.x)
        chi2_every = min(float(every.fun @ every.fun), *combined.values())
        n_every = _N_COMBINED * len(model.names)
        alive = {n: tuple(t for t in v.candidates
                          if chi2_single[(n, t.cause)] - chi2_every
                          <= chi2.isf(alpha_name, n_every - CAUSES[t.cause][0]))
                 for n, v in verdicts.items()}
        if any(alive.values()):
            for n, v in list(verdicts.items()):
                if v.changed:
                    verdicts[n] = CauseVerdict(n, alive[n], v.excess, True, own=bool(alive[n]))
    return CauseAnalysis(setup, chi2_setup, dof, omni, tuple(tests), tuple(limits), res_px, verdicts,
                         tuple(separation))


def _limits(j_perp: np.ndarray, lam: float) -> tuple[float, float]:
    """Smallest size found with non-centrality ``lam``, best and worst direction, from the residual Jacobian."""
    ev = np.linalg.eigvalsh(j_perp.T @ j_perp)
    best = math.sqrt(lam / ev[-1]) if ev[-1] > 0 else math.inf
    worst = math.sqrt(lam / ev[0]) if ev[0] > 1e-9 * max(ev[-1], 1e-300) else math.inf
    return best, worst


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
