"""Daily imaging-geometry QA with the BB phantom: today's frames against the stored calibration.

The phantom is set up at the isocentre as for calibration (lasers or
Winston-Lutz, with its measured ``centre_offset_mm``). Today's frames are
analysed with the *stored* geometry:

- per imager: the markers' reprojection error (measured minus projected
  through the stored geometry), as RMS, largest and mean shift, in pixels
  and in mm at the isocentre (pixels x pitch / magnification, the size the
  error has where the target is);
- the centre BB triangulated with the stored geometry, and its offset from
  where the phantom file says it sits (the imaging/treatment isocentre
  coincidence of AAPM TG-142).

Each figure is compared with two levels (:class:`QATolerances`): the
TG-142 SRS *tolerance* (1 mm coincidence) and a tighter *action* level
(0.5 mm) at which the physicist investigates and recalibrates. Defaults and
their reasons are in ``docs/CALIBRATION.md``.

Results are appended to a history file (JSON lines, ``qa-record/1``, one
record per QA, flushed and fsync'ed) from which :func:`trend` builds a table.
"""

from __future__ import annotations

import enum
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bb_detection import MarkerCountError
from .errors import CalibrationError, QAHistoryError
from .geometry import StereoGeometry
from .jsonfile import parse_json_bytes
from .phantom import BBPhantom
from .foundation import readonly_array as _ro
from .qa_causes import CauseAnalysis, analyse_causes
from .solve import (
    CalibrationFrame,
    CalibrationSolveError,
    MeasuredFrame,
    _check_not_swapped,
    _marker_sigmas,
    measure_frame,
)

__all__ = [
    "QA_RECORD_SCHEMA",
    "QAStatus",
    "QATolerances",
    "ImagerQA",
    "QAResult",
    "QAHistoryError",
    "QATrend",
    "run_qa",
    "append_history",
    "append_failure",
    "MIN_TREND_SPAN_DAYS",
    "read_history",
    "trend",
]

QA_RECORD_SCHEMA = "qa-record/1"


class QAStatus(enum.Enum):
    """Outcome of a QA, worst level reached by any figure."""

    PASS = "pass"
    ACTION = "action"
    FAIL = "fail"


_ORDER = {QAStatus.PASS: 0, QAStatus.ACTION: 1, QAStatus.FAIL: 2}


@dataclass(frozen=True, slots=True)
class QATolerances:
    """QA levels, mm at the isocentre.

    Attributes
    ----------
    offset_tolerance_mm : float
        Centre-BB offset above which QA fails: AAPM TG-142 (Klein et al.,
        Med. Phys. 36(9) 2009), SRS/SBRT imaging and treatment coordinate
        coincidence, 1 mm.
    offset_action_mm : float
        Tighter action level for the same offset (investigate, recalibrate).
    reprojection_tolerance_mm : float
        Per-imager RMS reprojection error, mm at the isocentre, above which QA fails.
    reprojection_action_mm : float
        Action level of the same. A stable geometry reprojects to the
        centroid noise (~0.01 px, 0.003 mm for the default room); 0.2 mm is
        far above that, and below the 0.3 mm that a 0.5 mm panel shift makes.
    max_missing : int
        Markers per frame that may be missing before QA cannot be done.
    setup_translation_limit_mm, setup_rotation_limit_deg : float
        The phantom's estimated setup (6-DoF) beyond which QA asks for the
        phantom to be re-positioned (ACTION): a daily setup is within
        2 mm / 1 deg, and a panel shift along the epipolar lines -- which no
        stereo pair can tell from a setup translation -- shows only here.
    """

    offset_tolerance_mm: float = 1.0
    offset_action_mm: float = 0.5
    reprojection_tolerance_mm: float = 0.5
    reprojection_action_mm: float = 0.2
    max_missing: int = 2
    setup_translation_limit_mm: float = 3.0
    setup_rotation_limit_deg: float = 2.0

    def __post_init__(self) -> None:
        for lo, hi in (("offset_action_mm", "offset_tolerance_mm"), ("reprojection_action_mm", "reprojection_tolerance_mm")):
            a, b = getattr(self, lo), getattr(self, hi)
            for name, v in ((lo, a), (hi, b)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise CalibrationError(f"QA tolerances: {name} must be a positive number of mm, got {v!r}")
            if a > b:
                raise CalibrationError(f"QA tolerances: {lo} ({a} mm) must not exceed {hi} ({b} mm)")
        if isinstance(self.max_missing, bool) or not isinstance(self.max_missing, int) or self.max_missing < 0:
            raise CalibrationError(f"QA tolerances: max_missing must be a non-negative integer, got {self.max_missing!r}")

    def grade(self, value_mm: float, action_mm: float, tolerance_mm: float) -> QAStatus:
        if value_mm > tolerance_mm:
            return QAStatus.FAIL
        if value_mm > action_mm:
            return QAStatus.ACTION
        return QAStatus.PASS


@dataclass(frozen=True, slots=True)
class ImagerQA:
    """Reprojection of the phantom through one imager's stored geometry.

    Attributes
    ----------
    imager : str
    n_found : int
    residuals_px : (N, 2) array
        Measured minus projected ``(col, row)`` per marker after today's
        phantom setup has been fitted (so the setup does not count), NaN where not found.
    rms_px, max_px : float
    mean_shift_px : (2,) array
        Mean residual ``(col, row)``: a panel shift shows here.
    mm_per_px_at_isocentre : float
        Pixel pitch / magnification.
    rms_mm, max_mm : float
        The same at the isocentre, mm.
    status : QAStatus
    """

    imager: str
    n_found: int
    residuals_px: np.ndarray
    rms_px: float
    max_px: float
    mean_shift_px: np.ndarray
    mm_per_px_at_isocentre: float
    rms_mm: float
    max_mm: float
    status: QAStatus
    change: str = ""


@dataclass(frozen=True, slots=True)
class QAResult:
    """One daily QA.

    Attributes
    ----------
    performed_unix_s : float
    geometry_calibrated_unix_s : float
    imagers : tuple of ImagerQA
    centre_bb_room_mm : (3,) array
        Centre BB triangulated with the stored geometry, room frame, mm.
    centre_offset_mm : (3,) array
        ``centre_bb_room_mm`` minus where the phantom file puts it, mm.
    centre_offset_distance_mm : float
    ray_distance_mm : float
        Largest skew distance between the two rays of any marker, mm (an
        epipolar inconsistency of the geometry shows here).
    status : QAStatus
    reasons : tuple of str
        One line per figure above its action level.
    tolerances : QATolerances
    measured : tuple of MeasuredFrame
    sources : mapping imager -> str
    causes : CauseAnalysis or None
        Today's phantom setup (6-DoF) and the per-imager tests for a panel
        shift, panel rotation or source shift, with detection limits.
    """

    performed_unix_s: float
    geometry_calibrated_unix_s: float
    imagers: tuple[ImagerQA, ...]
    centre_bb_room_mm: np.ndarray
    centre_offset_mm: np.ndarray
    centre_offset_distance_mm: float
    ray_distance_mm: float
    status: QAStatus
    reasons: tuple[str, ...]
    tolerances: QATolerances
    measured: tuple[MeasuredFrame, ...]
    sources: Mapping[str, str]
    causes: CauseAnalysis | None = None

    @property
    def passed(self) -> bool:
        return self.status is QAStatus.PASS

    def to_record(self) -> dict:
        """The ``qa-record/1`` JSON object written to the history file."""
        return {
            "schema": QA_RECORD_SCHEMA,
            "performed_unix_s": self.performed_unix_s,
            "geometry_calibrated_unix_s": self.geometry_calibrated_unix_s,
            "status": self.status.value,
            "centre_offset_mm": self.centre_offset_mm.tolist(),
            "centre_offset_distance_mm": self.centre_offset_distance_mm,
            "ray_distance_mm": self.ray_distance_mm,
            "imagers": {
                q.imager: {
                    "n_found": q.n_found, "rms_px": q.rms_px, "max_px": q.max_px,
                    "mean_shift_px": q.mean_shift_px.tolist(), "rms_mm": q.rms_mm, "max_mm": q.max_mm,
                    "status": q.status.value,
                }
                for q in self.imagers
            },
            "reasons": list(self.reasons),
            **({"setup": {"translation_mm": self.causes.setup.translation_mm.tolist(),
                          "rotation_deg": self.causes.setup.rotation_deg.tolist()},
                "changes": [self.causes.verdicts[n].describe() for n in self.causes.changed_imagers]}
               if self.causes else {}),
            "tolerances": {
                "offset_action_mm": self.tolerances.offset_action_mm,
                "offset_tolerance_mm": self.tolerances.offset_tolerance_mm,
                "reprojection_action_mm": self.tolerances.reprojection_action_mm,
                "reprojection_tolerance_mm": self.tolerances.reprojection_tolerance_mm,
            },
            "sources": dict(self.sources),
        }


def run_qa(
    geometry: StereoGeometry,
    phantom: BBPhantom,
    frames: Sequence[CalibrationFrame],
    *,
    tolerances: QATolerances | None = None,
    performed_unix_s: float | None = None,
    setup_verified: bool = False,
) -> QAResult:
    """Compare today's phantom frames with the stored calibration.

    Parameters
    ----------
    geometry : StereoGeometry
        The stored calibration (room frame, mm).
    phantom : BBPhantom
        The phantom, set up at its nominal place (couch shift of each frame
        normally zero).
    frames : sequence of CalibrationFrame
        One frame per imager of ``geometry``.
    tolerances : QATolerances, optional
        Defaults: TG-142 SRS 1 mm tolerance, 0.5 mm action level.
    performed_unix_s : float, optional
        Time stamp (now when omitted).
    setup_verified : bool
        The phantom was placed at its file position independently (Winston-Lutz,
        or lasers known to be within the offset tolerance): then the centre
        BB's triangulated offset is the TG-142 imaging/treatment coincidence
        and is graded. Otherwise it is today's setup, reported, not graded.

    Returns
    -------
    QAResult

    Raises
    ------
    CalibrationSolveError
        Not exactly one frame per imager, or an unknown imager.
    ImagesSwappedError
        A frame shows the other imager's view.
    MarkerCountError
        Too many markers missing, or the centre marker missing in a frame.
    """
    tol = QATolerances() if tolerances is None else tolerances
    frames = tuple(frames)
    got = [f.imager for f in frames]
    if sorted(got) != sorted(geometry.names):
        raise CalibrationSolveError(
            f"QA needs exactly one frame per imager {list(geometry.names)}, got frames for {got}"
        )
    measured: list[MeasuredFrame | None] = []
    failure = None
    for fr in frames:
        try:
            measured.append(measure_frame(phantom, geometry[fr.imager], fr.frame, couch_shift_mm=fr.couch_shift_mm,
                                          i0=fr.i0, max_missing=tol.max_missing, source=fr.source))
        except MarkerCountError as err:
            measured.append(None)
            failure = failure or err
    _check_not_swapped(phantom, geometry, frames, measured, tol.max_missing)
    if failure is not None:
        raise failure
    reasons: list[str] = []
    pixels, sigmas = {}, {}
    c = phantom.centre_index
    for fr, m in zip(frames, measured):
        if not m.match.found[c]:
            raise MarkerCountError(f"imager '{fr.imager}': the centre marker '{phantom.names[c]}' was not found")
        pixels[fr.imager] = np.asarray(m.match.marker_px)
        sigmas[fr.imager] = _marker_sigmas(m)
    shift = np.asarray(frames[0].couch_shift_mm, dtype=np.float64)
    causes = analyse_causes(geometry, phantom, pixels, sigmas, shift)
    changed = set(causes.changed_imagers)
    imagers = []
    for fr, m in zip(frames, measured):
        im = geometry[fr.imager]
        res = np.asarray(causes.residuals_px[im.name])
        ok = np.asarray(m.match.found)
        dist = np.linalg.norm(res[ok], axis=1)
        scale = float(np.mean(im.pixel_spacing_mm)) / im.magnification
        rms = float(np.sqrt(np.mean(dist**2)))
        status = tol.grade(rms * scale, tol.reprojection_action_mm, tol.reprojection_tolerance_mm)
        change = ""
        if im.name in changed:
            verdict = causes.verdicts[im.name]
            change = verdict.describe() if verdict.candidates else (
                f"imager {im.name}: residuals after the setup fit exceed the noise (chi-square "
                f"{causes.chi2_setup[im.name]:.1f} > {causes.omnibus_threshold[im.name]:.1f}) with no single cause")
            status = max(status, QAStatus.ACTION, key=_ORDER.__getitem__)
            reasons.append(f"geometry change: {change}")
        if status is not QAStatus.PASS and rms * scale > tol.reprojection_action_mm:
            level = tol.reprojection_action_mm if status is QAStatus.ACTION else tol.reprojection_tolerance_mm
            reasons.append(f"imager '{im.name}': RMS reprojection error after the setup fit {rms * scale:.3f} mm at "
                           f"isocentre ({rms:.2f} px) exceeds the {status.value} level ({level} mm)")
        imagers.append(ImagerQA(im.name, m.match.n_found, _ro(res), rms, float(dist.max()), _ro(res[ok].mean(axis=0)),
                                scale, rms * scale, float(dist.max()) * scale, status, change))
    setup = causes.setup
    t_mm, w_deg = float(np.linalg.norm(setup.translation_mm)), float(np.linalg.norm(setup.rotation_deg))
    setup_status = QAStatus.PASS
    if t_mm > tol.setup_translation_limit_mm or w_deg > tol.setup_rotation_limit_deg:
        setup_status = QAStatus.ACTION
        reasons.append(f"phantom setup {t_mm:.2f} mm / {w_deg:.2f} deg from its place (limits "
                       f"{tol.setup_translation_limit_mm} mm / {tol.setup_rotation_limit_deg} deg): re-position it on "
                       "the lasers and repeat (a panel shift along the epipolar lines would also show here)")
    names = geometry.names
    tri = geometry.triangulate({n: pixels[n][c : c + 1] for n in names})
    centre = tri.points_mm[0] - shift
    offset = centre - phantom.centre_offset_mm
    off_dist = float(np.linalg.norm(offset))
    off_status = QAStatus.PASS
    if setup_verified:
        off_status = tol.grade(off_dist, tol.offset_action_mm, tol.offset_tolerance_mm)
        if off_status is not QAStatus.PASS:
            reasons.append(
                f"centre BB triangulated {off_dist:.3f} mm from its verified place "
                f"(offset {np.round(offset, 3).tolist()} mm) exceeds the {off_status.value} level "
                f"({tol.offset_action_mm if off_status is QAStatus.ACTION else tol.offset_tolerance_mm} mm)"
            )
    both = np.all([np.all(np.isfinite(pixels[n]), axis=1) for n in names], axis=0)
    ray = float(geometry.triangulate({n: pixels[n][both] for n in names}, refine=False).ray_distance_mm.max())
    status = max([off_status, setup_status] + [q.status for q in imagers], key=_ORDER.__getitem__)
    return QAResult(
        time.time() if performed_unix_s is None else float(performed_unix_s),
        geometry.calibrated_unix_s, tuple(imagers), _ro(centre), _ro(offset), off_dist, ray, status, tuple(reasons),
        tol, tuple(measured), {fr.imager: fr.source for fr in frames}, causes,
    )


def append_history(path: str | os.PathLike, result: QAResult) -> Path:
    """Append one QA record to a JSON-lines history file, flushed and fsync'ed.

    The file is created if missing. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result.to_record(), separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def append_failure(path: str | os.PathLike, message: str, sources: Mapping[str, str] | None = None,
                   performed_unix_s: float | None = None) -> Path:
    """Record a QA that could not be done (frames unreadable, BBs missing, swapped images) as a FAIL.

    The ``qa-record/1`` line has ``"status": "fail"``, ``"error"`` (the message), no figures
    (``centre_offset_distance_mm`` null, ``imagers`` empty); :func:`trend` lists it and leaves it out of the drift.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"schema": QA_RECORD_SCHEMA, "performed_unix_s": time.time() if performed_unix_s is None else float(performed_unix_s),
           "status": QAStatus.FAIL.value, "error": str(message), "centre_offset_distance_mm": None, "imagers": {},
           "reasons": [f"QA could not be done: {message}"], "sources": dict(sources or {})}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


#: Shortest history over which a drift is estimated, days: over minutes the noise of two QAs divided by their
#: time apart gives absurd rates ("1119 mm per 30 days", issue 13).
MIN_TREND_SPAN_DAYS = 7.0
#: Fewest QAs (with figures) for a drift.
MIN_TREND_RECORDS = 4


#: Latest QA time a history may record (year 2969): far beyond any real record, and within what
#: ``time.gmtime`` can format.
_LATEST_UNIX_S = 3.1e10


def read_history(path: str | os.PathLike) -> tuple[dict, ...]:
    """Read every ``qa-record/1`` of a history file, oldest first.

    Raises
    ------
    QAHistoryError
        Unreadable file, a line that is not JSON, or a record with the wrong
        schema or missing fields (the message names the file and line).
    """
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise QAHistoryError(f"{path}: cannot read QA history: {err.strerror or err}") from err
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rec = parse_json_bytes(line, f"{path}, line {i}", QAHistoryError)
        if not isinstance(rec, dict) or rec.get("schema") != QA_RECORD_SCHEMA:
            schema = rec.get("schema") if isinstance(rec, dict) else None
            raise QAHistoryError(f"{path}, line {i}: unknown record schema {schema!r}, expected '{QA_RECORD_SCHEMA}'")
        for key in ("performed_unix_s", "status", "centre_offset_distance_mm", "imagers"):
            if key not in rec:
                raise QAHistoryError(f"{path}, line {i}: record lacks '{key}'")
        if not isinstance(rec["status"], str) or rec["status"] not in {s.value for s in QAStatus}:
            raise QAHistoryError(f"{path}, line {i}: unknown status {rec['status']!r}")
        t = rec["performed_unix_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < _LATEST_UNIX_S:
            raise QAHistoryError(f"{path}, line {i}: performed_unix_s must be seconds since 1970 (0 to "
                                 f"{_LATEST_UNIX_S:.0f}), got {t!r}")
        d = rec["centre_offset_distance_mm"]
        if "error" in rec and d is None and rec["status"] == QAStatus.FAIL.value:
            if not isinstance(rec["error"], str) or not isinstance(rec["imagers"], dict):
                raise QAHistoryError(f"{path}, line {i}: a failed-QA record needs an 'error' text and an 'imagers' object")
            records.append(rec)  # a QA that could not be done (append_failure)
            continue
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise QAHistoryError(f"{path}, line {i}: centre_offset_distance_mm must be a finite number, got {d!r}")
        imagers = rec["imagers"]
        if not isinstance(imagers, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("rms_mm"), (int, float)) and not isinstance(v["rms_mm"], bool)
                and math.isfinite(v["rms_mm"]) for v in imagers.values()):
            raise QAHistoryError(f"{path}, line {i}: imagers must map each imager to an object with a finite rms_mm")
        records.append(rec)
    records.sort(key=lambda r: r["performed_unix_s"])
    return tuple(records)


@dataclass(frozen=True, slots=True)
class QATrend:
    """The QA history summarised.

    Attributes
    ----------
    records : tuple of dict
        ``qa-record/1`` objects, oldest first.
    table : str
        Plain-text table, one line per QA.
    offset_drift_mm_per_30_days : float
        Least-squares slope of the centre-BB offset distance over time, mm per
        30 days; NaN when the QAs with figures span less than
        :data:`MIN_TREND_SPAN_DAYS` or are fewer than :data:`MIN_TREND_RECORDS`.
    drift_ci_mm_per_30_days : (float, float)
        Its 95 % confidence interval (Student t, n - 2 degrees of freedom); NaNs when not estimated.
    drift_line : str
        One plain line: the drift with its interval, or why it was not estimated.
    n_failed : int
        QAs that could not be done (recorded by :func:`append_failure`).
    """

    records: tuple[dict, ...]
    table: str
    offset_drift_mm_per_30_days: float
    drift_ci_mm_per_30_days: tuple[float, float] = (math.nan, math.nan)
    drift_line: str = ""
    n_failed: int = 0


def trend(records: Sequence[dict]) -> QATrend:
    """Table and drift of a QA history (as read by :func:`read_history`): slope with its 95 % interval, only over
    at least :data:`MIN_TREND_SPAN_DAYS` and :data:`MIN_TREND_RECORDS` QAs with figures."""
    from scipy.stats import t as student_t

    records = tuple(sorted(records, key=lambda r: r["performed_unix_s"]))
    names = sorted({n for r in records for n in r["imagers"]})
    header = f"{'date (UTC)':<20} {'status':<7} {'offset mm':>9} " + " ".join(f"{'RMS ' + n + ' mm':>10}" for n in names)
    lines = [header, "-" * len(header)]
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["performed_unix_s"]))
        if r.get("error") is not None and r["centre_offset_distance_mm"] is None:
            lines.append(f"{when:<20} {r['status']:<7} not done: {r['error']}")
            continue
        cells = " ".join(
            f"{r['imagers'][n]['rms_mm']:>10.3f}" if n in r["imagers"] else f"{'-':>10}" for n in names
        )
        lines.append(f"{when:<20} {r['status']:<7} {r['centre_offset_distance_mm']:>9.3f} {cells}")
    good = [r for r in records if r["centre_offset_distance_mm"] is not None]
    n_failed = len(records) - len(good)
    t = np.array([r["performed_unix_s"] for r in good], dtype=np.float64)
    d = np.array([r["centre_offset_distance_mm"] for r in good], dtype=np.float64)
    span_days = float(np.ptp(t)) / 86400.0 if len(t) else 0.0
    slope, ci = math.nan, (math.nan, math.nan)
    if len(t) < MIN_TREND_RECORDS or span_days < MIN_TREND_SPAN_DAYS:
        line = (f"centre-BB offset drift not estimated: {len(t)} QA(s) over {span_days:.1f} days; at least "
                f"{MIN_TREND_RECORDS} over {MIN_TREND_SPAN_DAYS:g} days are needed")
    else:
        x = (t - t[0]) / (30 * 86400.0)
        coef, res, *_ = np.polyfit(x, d, 1, full=True)
        slope = float(coef[0])
        dof = len(x) - 2
        s2 = float(res[0]) / dof if len(res) and dof > 0 else 0.0
        se = math.sqrt(s2 / float(np.sum((x - x.mean()) ** 2)))
        half = float(student_t.ppf(0.975, dof)) * se
        ci = (slope - half, slope + half)
        line = (f"centre-BB offset drift {slope:+.3f} mm per 30 days (95 % interval {ci[0]:+.3f} to {ci[1]:+.3f}), "
                f"{len(t)} QAs over {span_days:.0f} days")
    if n_failed:
        line += f"; {n_failed} QA(s) could not be done"
    return QATrend(records, "\n".join(lines), slope, ci, line, n_failed)
