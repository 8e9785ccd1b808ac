"""Point-based rigid registration of measured seed positions to planned ones (room frame, mm).

The measured points are where the fiducials are now (room frame, mm, e.g. from
stereo triangulation); the planned points are where they should be at perfect
setup (planning-CT LPS mapped to the room per docs/CONVENTIONS.md). The
result is the patient pose ``p_actual = R p_planned + t`` (rotation about the
isocentre) found by least squares (Kabsch/Umeyama through an SVD with the
reflection fix), and the couch correction ``C = P^-1`` that undoes it.

Before the fit a rigid-body check compares every inter-seed distance with its
planned value: a seed whose distances to the others changed by more than
``migration_limit_mm`` (default 1.5 mm) has migrated (or was mis-localised) and
is excluded when the others stay consistent and enough remain; otherwise the
registration is refused. With one or two seeds only the translation is
estimated (flagged); with nearly collinear seeds the rotation about their
common line is not determined and is flagged unreliable.

With three seeds or more the expected target registration error at the
isocentre (the room origin) is predicted from the seed layout and the
localisation error (Fitzpatrick, West and Maurer, IEEE TMI 17:694, 1998:
``TRE^2 = FLE^2 / N (1 + sum_k d_k^2 / f_k^2 / 3)``, ``d_k`` the target's and
``f_k`` the seeds' RMS distance from the layout's principal axes, ``FLE^2``
estimated from the fit as ``FRE^2 N / (N - 2)``, never below
``fle_floor_mm``); above ``max_predicted_tre_mm`` the result is flagged
``TARGET_UNRELIABLE``: the seeds fix the target too loosely for their
localisation error (a compact constellation far from the target, seeds
localised poorly at low dose).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from spineguide.calibration.foundation import checked_number
from spineguide.calibration.foundation import readonly_array as _readonly

from .errors import PointRegistrationError, SeedMigrationError
from .pose import Correction, Pose

__all__ = [
    "PointRegistrationConfig",
    "PointRegistrationError",
    "SeedMigrationError",
    "PointFlag",
    "PointRegistrationResult",
    "kabsch",
    "register_points",
    "line_spread_mm",
    "predicted_tre_mm",
]


class PointFlag(Enum):
    """Conditions a caller must see next to a point-registration pose."""

    #: Only one or two seeds: rotation not estimated (identity), translation only.
    TRANSLATION_ONLY = "translation_only"
    #: Seeds nearly collinear: the rotation about their common line is not determined.
    ROTATION_UNRELIABLE = "rotation_unreliable"
    #: A seed failed the rigid-body check and was left out of the fit.
    SEED_EXCLUDED = "seed_excluded"
    #: The predicted target registration error at the isocentre exceeds ``max_predicted_tre_mm``.
    TARGET_UNRELIABLE = "target_unreliable"


@dataclass(frozen=True, slots=True)
class PointRegistrationConfig:
    """Limits of the point registration (all mm).

    Attributes
    ----------
    migration_limit_mm : float
        Largest change of an inter-seed distance (measured vs planned) that is
        still rigid-body consistent; beyond it a seed counts as migrated.
    min_seeds_after_exclusion : int
        Fewest seeds that must remain after excluding a migrated one; with
        fewer the result is refused (3 keeps a full 6-DoF fit; 2 would accept
        a translation-only result).
    min_line_spread_mm : float
        Smallest RMS distance of the planned seeds from their best-fit line for
        which the rotation counts as reliable. A localisation error ``e`` gives
        a rotation error of about ``e / spread`` rad about that line: 0.15 mm
        over 3 mm is ~3 degrees.
    fle_floor_mm : float
        Smallest fiducial localisation error (3D RMS, mm) the target-error
        prediction assumes, whatever the fit's residuals say (three seeds
        leave the residual only three degrees of freedom).
    max_predicted_tre_mm : float
        Largest predicted target registration error at the isocentre (3D
        RMS, mm) of a reliable result; its 95 % bound is about 1.6 times
        this (0.8 mm at the default 0.5 mm).
    """

    migration_limit_mm: float = 1.5
    min_seeds_after_exclusion: int = 3
    min_line_spread_mm: float = 3.0
    fle_floor_mm: float = 0.1
    max_predicted_tre_mm: float = 0.5

    def __post_init__(self) -> None:
        for name in ("migration_limit_mm", "min_line_spread_mm", "fle_floor_mm", "max_predicted_tre_mm"):
            value = getattr(self, name)
            checked_number(value, PointRegistrationError, f"{name} must be a positive finite number of mm, got {value!r}",
                           minimum=0.0, exclusive_minimum=True)
        n = self.min_seeds_after_exclusion
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PointRegistrationError(f"min_seeds_after_exclusion must be a positive integer, got {n!r}")


@dataclass(frozen=True, slots=True)
class PointRegistrationResult:
    """Pose and quality figures of a point registration.

    Attributes
    ----------
    pose : Pose
        Patient pose ``p_actual = R p_planned + t``, room frame, mm.
    correction : Correction
        Couch correction ``C = P^-1`` (what is sent to the couch).
    names : tuple of str
        Seed names, in input order.
    used : (N,) bool array
        Seeds that entered the fit.
    residuals_mm : (N,) array
        ``|R p_planned + t - p_measured|`` per seed (excluded seeds included), mm.
    fre_mm : float
        Fiducial registration error: RMS of ``residuals_mm`` over the used seeds, mm.
    distance_change_mm : (N,) array
        Per seed, the largest ``|measured - planned|`` change of its distance
        to any other used seed (to all others for an excluded seed), mm.
    migrated : tuple of str
        Names of the seeds excluded by the rigid-body check.
    line_spread_mm : float
        RMS distance of the used planned seeds from their best-fit line, mm
        (0 for one or two seeds).
    flags : frozenset of PointFlag
    predicted_tre_mm : float
        Predicted target registration error at the isocentre (3D RMS, mm;
        module docstring); NaN for one or two seeds.
    """

    pose: Pose
    correction: Correction
    names: tuple[str, ...]
    used: np.ndarray
    residuals_mm: np.ndarray
    fre_mm: float
    distance_change_mm: np.ndarray
    migrated: tuple[str, ...]
    line_spread_mm: float
    flags: frozenset
    predicted_tre_mm: float = float("nan")

    @property
    def n_used(self) -> int:
        return int(np.count_nonzero(self.used))

    @property
    def rotation_estimated(self) -> bool:
        """True for a 6-DoF fit (three or more seeds)."""
        return PointFlag.TRANSLATION_ONLY not in self.flags

    @property
    def rotation_reliable(self) -> bool:
        return self.rotation_estimated and PointFlag.ROTATION_UNRELIABLE not in self.flags


def _points(value, what: str, n: int | None = None) -> np.ndarray:
    p = np.asarray(value, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise PointRegistrationError(f"{what} must be an (N, 3) array of room mm, got shape {p.shape}")
    if n is not None and p.shape[0] != n:
        raise PointRegistrationError(f"{what} holds {p.shape[0]} points, expected {n} (one per seed)")
    if not np.all(np.isfinite(p)):
        bad = np.flatnonzero(~np.all(np.isfinite(p), axis=1)).tolist()
        raise PointRegistrationError(f"{what}: points {bad} are not finite")
    return p


def kabsch(planned_mm: np.ndarray, measured_mm: np.ndarray) -> Pose:
    """Least-squares rigid pose taking planned points onto measured points.

    Minimises ``sum |R p_planned + t - p_measured|^2`` over proper rotations
    (Kabsch 1976; Umeyama 1991 without scale), with the reflection fix that
    keeps ``det R = +1``.

    Parameters
    ----------
    planned_mm, measured_mm : (N, 3) arrays, N >= 3
        Corresponding points, room frame, mm; not all collinear for a unique
        answer (collinear input gives one of the minimisers).

    Returns
    -------
    Pose
        ``p_actual = R p_planned + t``, room frame, mm.
    """
    p = _points(planned_mm, "planned points")
    q = _points(measured_mm, "measured points", len(p))
    if len(p) < 3:
        raise PointRegistrationError(f"a rotation needs at least 3 seeds, got {len(p)}")
    pc, qc = p.mean(axis=0), q.mean(axis=0)
    h = (p - pc).T @ (q - qc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return Pose(r, qc - r @ pc)


def line_spread_mm(points_mm: np.ndarray) -> float:
    """RMS distance (mm) of points from their best-fit straight line (0 for fewer than 3)."""
    p = np.asarray(points_mm, dtype=np.float64)
    if len(p) < 3:
        return 0.0
    s = np.linalg.svd(p - p.mean(axis=0), compute_uv=False)
    return float(math.sqrt((s[1] ** 2 + s[2] ** 2) / len(p)))


def predicted_tre_mm(planned_mm: np.ndarray, fle_mm: float, target_mm=(0.0, 0.0, 0.0)) -> float:
    """Expected target registration error (3D RMS, mm) of a rigid point registration.

    Fitzpatrick, West and Maurer (IEEE TMI 17:694, 1998), eq. 44:
    ``TRE^2(r) = FLE^2 / N * (1 + 1/3 sum_k d_k^2 / f_k^2)``, where ``d_k`` is
    the target's distance from the k-th principal axis of the seed layout
    (through its centroid) and ``f_k^2`` the seeds' mean squared distance from
    that axis. Infinite for collinear seeds (some ``f_k = 0``).

    Parameters
    ----------
    planned_mm : (N, 3) array
        Seed positions (any frame, mm), N >= 3.
    fle_mm : float
        Fiducial localisation error, 3D RMS, mm.
    target_mm : (3,) array
        The target in the same frame (default the origin: the room's isocentre).
    """
    p = np.asarray(planned_mm, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) < 3:
        raise PointRegistrationError(f"predicted TRE needs (N >= 3, 3) seed positions, got shape {p.shape}")
    n = len(p)
    centre = p.mean(axis=0)
    x = p - centre
    t = np.asarray(target_mm, dtype=np.float64) - centre
    scatter = x.T @ x
    # The seeds' mean squared distances from the principal axes are the eigenvalues f_k^2 of
    # (tr(S) I - S) / N (same eigenvectors v_k as the scatter S), so sum_k d_k^2 / f_k^2 =
    # sum_k (|t|^2 - (t.v_k)^2) / f_k^2 = tr(A^-1) |t|^2 - t^T A^-1 t with A = (tr(S) I - S) / N.
    # (3 x 3, symmetric: its inverse by cofactors, in plain floats: this runs in every point registration.)
    (sxx, sxy, sxz), (_, syy, syz), (_, _, szz) = scatter.tolist()
    tr = sxx + syy + szz
    axx, ayy, azz = (tr - sxx) / n, (tr - syy) / n, (tr - szz) / n
    axy, axz, ayz = -sxy / n, -sxz / n, -syz / n
    cxx, cyy, czz = ayy * azz - ayz * ayz, axx * azz - axz * axz, axx * ayy - axy * axy
    cxy, cxz, cyz = axz * ayz - axy * azz, axy * ayz - axz * ayy, axy * axz - axx * ayz
    det = axx * cxx + axy * cxy + axz * cxz
    scale = (axx + ayy + azz) / 3.0
    if scale <= 0.0 or det <= 1e-9 * scale ** 3:
        return math.inf  # collinear (or coincident) seeds: some f_k = 0
    tx, ty, tz = t.tolist()
    t_adj_t = (cxx * tx * tx + cyy * ty * ty + czz * tz * tz
               + 2.0 * (cxy * tx * ty + cxz * tx * tz + cyz * ty * tz))
    total = ((cxx + cyy + czz) * (tx * tx + ty * ty + tz * tz) - t_adj_t) / det
    return float(fle_mm * math.sqrt((1.0 + total / 3.0) / n))


def _pairwise(p: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)


def _consistent(change: np.ndarray, keep: np.ndarray, limit: float) -> bool:
    sub = change[np.ix_(keep, keep)]
    return bool(np.all(sub <= limit))


def register_points(
    planned_room_mm: np.ndarray,
    measured_room_mm: np.ndarray,
    names: Sequence[str] | None = None,
    config: PointRegistrationConfig = PointRegistrationConfig(),
) -> PointRegistrationResult:
    """Rigid registration of measured seed positions to their planned positions.

    Parameters
    ----------
    planned_room_mm : (N, 3) array
        Where each seed should be at perfect setup, room frame, mm.
    measured_room_mm : (N, 3) array
        Where each seed was found, room frame, mm; row i is seed i.
    names : sequence of str, optional
        Seed names for results and messages (default ``S0, S1, ...``).
    config : PointRegistrationConfig

    Returns
    -------
    PointRegistrationResult
        6-DoF pose with three or more consistent seeds, translation only
        (flagged) with one or two.

    Raises
    ------
    PointRegistrationError
        Bad input (shape, non-finite, no seeds, names not matching).
    SeedMigrationError
        Inter-seed distances changed beyond ``config.migration_limit_mm`` and
        either no single seed explains it, the culprit is ambiguous, or fewer
        than ``config.min_seeds_after_exclusion`` seeds would remain.
    """
    p = _points(planned_room_mm, "planned points")
    n = len(p)
    if n < 1:
        raise PointRegistrationError("point registration needs at least 1 seed, got 0")
    q = _points(measured_room_mm, "measured points", n)
    labels = tuple(f"S{i}" for i in range(n)) if names is None else tuple(str(x) for x in names)
    if len(labels) != n:
        raise PointRegistrationError(f"got {len(labels)} seed names for {n} seeds")
    if len(set(labels)) != n:
        raise PointRegistrationError(f"seed names must be unique, got {list(labels)}")
    limit = float(config.migration_limit_mm)
    change = np.abs(_pairwise(q) - _pairwise(p))
    keep = np.ones(n, dtype=bool)
    flags: set[PointFlag] = set()
    migrated: tuple[str, ...] = ()
    if not _consistent(change, keep, limit):
        worst = float(change.max())
        i, j = np.unravel_index(int(np.argmax(change)), change.shape)
        # The one seed whose removal leaves every other distance within the limit.
        candidates = [k for k in range(n) if n > 2 and _consistent(change, np.arange(n) != k, limit)]
        where = f"distance {labels[i]}-{labels[j]} changed by {worst:.2f} mm (limit {limit:g} mm)"
        if len(candidates) != 1:
            reason = "no single seed explains it" if not candidates else (
                "ambiguous: removing any of " + ", ".join(labels[k] for k in candidates) + " would do"
            )
            raise SeedMigrationError(f"rigid-body check failed: {where}; {reason}; registration refused")
        k = candidates[0]
        if n - 1 < config.min_seeds_after_exclusion:
            raise SeedMigrationError(
                f"rigid-body check failed: {where}; seed {labels[k]} has migrated, and excluding it leaves "
                f"{n - 1} seeds (at least {config.min_seeds_after_exclusion} needed); registration refused"
            )
        keep[k] = False
        migrated = (labels[k],)
        flags.add(PointFlag.SEED_EXCLUDED)
    pk, qk = p[keep], q[keep]
    if len(pk) >= 3:
        pose = kabsch(pk, qk)
        spread = line_spread_mm(pk)
        if spread < config.min_line_spread_mm:
            flags.add(PointFlag.ROTATION_UNRELIABLE)
    else:
        # One or two seeds fix no rotation (two leave the roll about their line
        # free): the best pure translation is the mean displacement.
        pose = Pose(np.eye(3), (qk - pk).mean(axis=0))
        spread = 0.0
        flags.add(PointFlag.TRANSLATION_ONLY)
    residuals = np.linalg.norm(pose.apply(p) - q, axis=1)
    fre = float(np.sqrt(np.mean(residuals[keep] ** 2)))
    tre = math.nan
    if len(pk) >= 3:
        m = len(pk)
        tre = predicted_tre_mm(pk, max(fre * math.sqrt(m / (m - 2)), float(config.fle_floor_mm)))
        if tre > config.max_predicted_tre_mm:
            flags.add(PointFlag.TARGET_UNRELIABLE)
    masked = np.where(keep[None, :] | ~keep[:, None], change, 0.0)
    np.fill_diagonal(masked, 0.0)
    per_seed = np.where(keep, np.max(np.where(keep[None, :], masked, 0.0), axis=1), masked.max(axis=1))
    return PointRegistrationResult(
        pose=pose,
        correction=pose.to_correction(),
        names=labels,
        used=_readonly(keep, bool),
        residuals_mm=_readonly(residuals),
        fre_mm=fre,
        distance_change_mm=_readonly(per_seed),
        migrated=migrated,
        line_spread_mm=spread,
        flags=frozenset(flags),
        predicted_tre_mm=tre,
    )
