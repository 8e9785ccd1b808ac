"""Levenberg-Marquardt for small, bounded least-squares problems: ``min_x |r(x)|^2``, ``lower <= x <= upper``.

The anatomy registration's refinement loop (:meth:`AnatomyRegistration._refine`), apart from DRRs so that it can be
tested on analytic problems (``tests/registration/test_optimiser.py``). The problem comes in as callables:
``residual(x)`` (a vector, or a vector and a payload kept with the accepted ``x``) and ``jacobian(x)``
(``(m, n)``, ``d r / d x``). Units are the caller's; ``tolerance`` is per parameter, in the units of ``x``.

Why not :func:`scipy.optimize.least_squares`: the anatomy residual carries a model of its own that must be redrawn
when ``x`` moves too far (:class:`ModelHooks`; the background DRR, linear in the pose), a Jacobian is costly
(12 DRRs a view) and is kept as a chord while steps succeed, and the stopping rule is a step small in the units the
user asked for (mm, degrees) on a Jacobian taken at the point itself.

The algorithm
-------------
Damped normal equations ``(A + lam diag(diag(A) + 1e-12)) delta = -g`` with ``A = J^T J``, ``g = J^T r``; a step is
clipped to the bounds and taken when it lowers the cost (then ``lam /= 3``, floor ``1e-6``), else ``lam *= 4``
and tried again, up to ``max_damping_tries`` times on a fresh Jacobian, twice on a chord one (then the Jacobian is
renewed within the same iteration). Before damping, on a fresh Jacobian, the undamped Gauss-Newton step is
computed; when it is below half the tolerance in every parameter, ``x`` is the optimum ("settle"). Otherwise the
iteration ends converged when the step taken was below the tolerance (or no step lowered the cost) on a fresh
Jacobian; on a chord one the Jacobian is renewed first. Convergence also needs the model settled at ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ModelHooks", "LMResult", "levenberg_marquardt", "sum_of_squares", "INITIAL_DAMPING", "MIN_DAMPING",
           "MAX_DAMPING_TRIES"]

#: Damping at the start and after each Jacobian renewal.
INITIAL_DAMPING = 1e-3
#: Floor of the damping after successful steps.
MIN_DAMPING = 1e-6
#: Damping tries on a fresh Jacobian before the iteration gives up (two on a chord Jacobian).
MAX_DAMPING_TRIES = 8
_CHORD_TRIES = 2
_SUCCESS_DIVISOR = 3.0
_FAILURE_FACTOR = 4.0


def sum_of_squares(v: np.ndarray) -> float:
    """Sum of squares without a BLAS call (whose threads fight the DRR threads for the cores)."""
    return float(np.einsum("i,i->", v, v))


def _numpy_normal_equations(jac: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return jac.T @ jac, jac.T @ r


@dataclass(frozen=True, slots=True)
class ModelHooks:
    """A model inside the residual that is valid near where it was drawn (e.g. a linearisation).

    ``stale(x)``: the model must be redrawn before going on from ``x``. ``settled(x)``: drawn close enough to ``x``
    to call ``x`` final. ``redraw(x)``: draw it at ``x`` (the residual is then evaluated again).
    """

    stale: Callable[[np.ndarray], bool]
    settled: Callable[[np.ndarray], bool]
    redraw: Callable[[np.ndarray], None]


_NO_MODEL = ModelHooks(lambda x: False, lambda x: True, lambda x: None)


@dataclass(frozen=True, slots=True)
class LMResult:
    """Where :func:`levenberg_marquardt` stopped.

    ``x`` the parameters; ``iterations`` those used (at most ``max_iterations``); ``converged`` whether a stopping
    rule was met; ``residual``, ``payload`` and ``cost`` (``|residual|^2``) at ``x``; ``jacobian`` the last one
    taken (a chord: at ``x`` or a step before it; ``jacobian_x`` says where); ``jacobian_evaluations`` and
    ``residual_evaluations`` counts.
    """

    x: np.ndarray
    iterations: int
    converged: bool
    residual: np.ndarray
    payload: Any
    cost: float
    jacobian: np.ndarray
    jacobian_evaluations: int
    residual_evaluations: int
    #: The parameters the last Jacobian was taken at (equal to ``x`` when it is fresh there).
    jacobian_x: np.ndarray | None = None


def levenberg_marquardt(
    residual: Callable[[np.ndarray], Any],
    jacobian: Callable[[np.ndarray], np.ndarray],
    x0: np.ndarray,
    *,
    lower: np.ndarray,
    upper: np.ndarray,
    tolerance: np.ndarray,
    max_iterations: int,
    normal_equations: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] = _numpy_normal_equations,
    max_damping_tries: int = MAX_DAMPING_TRIES,
    model: ModelHooks | None = None,
    on_iteration: Callable[[int, float, float, np.ndarray, bool, bool], None] | None = None,
) -> LMResult:
    """Minimise ``|residual(x)|^2`` from ``x0`` within ``[lower, upper]`` (module docstring).

    ``residual(x)`` returns the residual vector, or ``(vector, payload)``; ``jacobian(x)`` its ``(m, n)``
    derivatives; ``tolerance`` ``(n,)`` the step below which ``x`` is final; ``normal_equations(J, r)`` returns
    ``(J^T J, J^T r)`` (NumPy unless given); ``on_iteration(iteration, cost, damping, x, improved, fresh)`` is
    called after each iteration that does not stop. ``x0`` must lie within the bounds.
    """
    hooks = _NO_MODEL if model is None else model
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    tolerance = np.asarray(tolerance, dtype=np.float64)
    x = np.asarray(x0, dtype=np.float64)
    n_res = 0
    n_jac = 0

    def evaluate(at: np.ndarray) -> tuple[np.ndarray, Any]:
        nonlocal n_res
        n_res += 1
        out = residual(at)
        return out if isinstance(out, tuple) else (out, None)

    jac_x = None

    def jacobian_at(at: np.ndarray) -> np.ndarray:
        nonlocal n_jac, jac_x
        n_jac += 1
        jac_x = np.array(at, dtype=np.float64)
        return jacobian(at)

    r, payload = evaluate(x)
    cost = sum_of_squares(r)
    lam = INITIAL_DAMPING
    converged = False
    jac = None
    fresh = False
    its = 0

    def redraw_model() -> None:
        """Draw the model at ``x``, and the residual with it."""
        nonlocal r, payload, cost
        hooks.redraw(x)
        r, payload = evaluate(x)
        cost = sum_of_squares(r)

    def model_settled() -> bool:
        """True when the model was drawn close enough to ``x`` to call ``x`` final; otherwise redraw it there."""
        if hooks.settled(x):
            return True
        redraw_model()
        return False

    for its in range(1, max_iterations + 1):
        improved = False
        step = np.zeros(x.shape)
        settle = False
        while True:  # a failed chord (stale) Jacobian is renewed within the same iteration
            if jac is None:
                jac = jacobian_at(x)
                fresh = True
            a, g = normal_equations(jac, r)
            if fresh:
                gn = np.linalg.solve(a + 1e-9 * np.diag(np.diag(a) + 1e-12), -g)
                if np.all(np.abs(gn) < 0.5 * tolerance):
                    settle = True  # the Gauss-Newton step from a Jacobian taken here is negligible
                    break
            # A chord Jacobian that fails twice is renewed rather than damped further; a fresh one whose Gauss-Newton
            # step is already within twice the tolerance gets as few tries (its cost is flat to the noise there).
            tries = _CHORD_TRIES if not fresh or np.all(np.abs(gn) < 2.0 * tolerance) else max_damping_tries
            for _ in range(tries):
                delta = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
                x_new = np.clip(x + delta, lower, upper)
                r_new, payload_new = evaluate(x_new)
                cost_new = sum_of_squares(r_new)
                if cost_new < cost:
                    step = x_new - x
                    x, r, cost, payload = x_new, r_new, cost_new, payload_new
                    lam = max(lam / _SUCCESS_DIVISOR, MIN_DAMPING)
                    improved = True
                    break
                lam *= _FAILURE_FACTOR
            if improved or fresh:
                break
            jac, lam = None, INITIAL_DAMPING
        if settle:
            if model_settled():
                converged = True
                break
            lam = INITIAL_DAMPING  # the Jacobian was taken at this very point: look again with the redrawn model
            continue
        if on_iteration is not None:
            on_iteration(its, cost, lam, x, improved, fresh)
        small = np.all(np.abs(step) < tolerance)
        if hooks.stale(x):
            redraw_model()
            # The Jacobian stays as a chord: convergence is still only declared on a fresh one.
            fresh = False
            continue
        if small or not improved:
            # Converged only on a fresh Jacobian (a stale, chord one takes ever smaller steps far
            # from the optimum as well) and a model drawn at this point.
            if fresh:
                if model_settled():
                    converged = True
                    break
                # Redrawn here; the Jacobian is from this point or one negligible step away.
                lam = INITIAL_DAMPING
                continue
            jac, lam = None, INITIAL_DAMPING
            continue
        fresh = False
    if jac is None:  # the loop ended right after a model update: curvature at the final point
        jac = jacobian_at(x)
    return LMResult(x, its, bool(converged), r, payload, cost, jac, n_jac, n_res, jac_x)
