"""HTML reports with PNG figures for calibrations and the QA trend.

Figures are drawn with matplotlib's non-interactive Agg backend (no display
needed); matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ReportError
from .geometry import StereoGeometry
from .isocentre import TG142_SRS_COINCIDENCE_MM
from .solve import CalibrationFrame, CalibrationResult

__all__ = ["ReportError", "ReportContext", "write_calibration_report", "write_failure_report", "write_trend_plot",
           "geometry_in_words", "software_version"]


@dataclass(frozen=True, slots=True)
class ReportContext:
    """Who and what a calibration report is about (for the physicist who signs it).

    ``machine`` and ``operator`` as the user gave them; ``phantom_file`` the phantom's path; ``previous`` the
    calibration in use until now (for the comparison), ``gate`` the acceptance gate's verdict, ``laser`` a laser
    pose to compare with a Winston-Lutz reference.
    """

    machine: str = ""
    operator: str = ""
    phantom_file: str = ""
    previous: StereoGeometry | None = None
    gate: object | None = None
    laser: object | None = None


def software_version() -> str:
    """``spineguide <version>`` of the installed package (``unknown`` when not installed)."""
    try:
        from importlib.metadata import version

        return f"spineguide {version('spineguide')}"
    except Exception:  # noqa: BLE001 - a missing distribution must not stop a report
        return "spineguide (version unknown)"


def geometry_in_words(im) -> str:
    """One imager in plain terms: SAD, SID, magnification, pixel size at the isocentre, panel tilt (mm, deg)."""
    axis = -im.source_mm / np.linalg.norm(im.source_mm)  # source -> isocentre
    tilt = float(np.degrees(np.arccos(np.clip(abs(axis @ im.normal), -1.0, 1.0))))
    pitch = float(np.mean(im.pixel_spacing_mm))
    return (f"source {im.source_to_isocentre_mm:.1f} mm from the isocentre (SAD), {im.source_to_detector_mm:.1f} mm "
            f"from the panel (SID); magnification at the isocentre {im.magnification:.4f}, so one {pitch:.3f} mm "
            f"pixel is {pitch / im.magnification:.4f} mm there; the panel is tilted {tilt:.2f} deg from square to "
            "the central ray")


def _compare(previous: StereoGeometry, new: StereoGeometry) -> str:
    g = np.linspace(-100.0, 100.0, 5)
    cube = np.stack(np.meshgrid(g, g, g), axis=-1).reshape(-1, 3)
    rows = []
    for im in new.imagers:
        if im.name not in previous.names:
            rows.append(f"<tr><td>{html.escape(im.name)}</td><td colspan='3'>not in the previous calibration</td></tr>")
            continue
        old = previous[im.name]
        d_src = float(np.linalg.norm(im.source_mm - old.source_mm))
        d_pan = float(np.linalg.norm(im.pixel_to_room(np.array([(im.cols - 1) / 2.0, (im.rows - 1) / 2.0]))
                                     - old.pixel_to_room(np.array([(old.cols - 1) / 2.0, (old.rows - 1) / 2.0]))))
        d_px = float(np.sqrt(np.mean(np.sum((im.project(cube) - old.project(cube)) ** 2, axis=1))))
        rows.append(f"<tr><td>{html.escape(im.name)}</td><td>{d_src:.2f}</td><td>{d_pan:.2f}</td><td>{d_px:.3f} px "
                    f"({d_px * float(np.mean(im.pixel_spacing_mm)) / im.magnification:.3f} mm at the isocentre)</td></tr>")
    return ("<h2>Compared with the previous calibration</h2><table><tr><th>imager</th><th>source moved (mm)</th>"
            "<th>panel centre moved (mm)</th><th>projections differ, RMS over a 200 mm cube</th></tr>"
            + "".join(rows) + "</table>")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - dependency declared in pyproject
        raise ReportError("writing report figures needs matplotlib (pip install matplotlib)") from err
    return plt


def _residual_scale(residuals_px: np.ndarray, panel_px: int) -> float:
    """Magnification that draws the largest residual as 6 % of the panel."""
    largest = float(np.nanmax(np.linalg.norm(residuals_px, axis=1))) if len(residuals_px) else 0.0
    return 0.06 * panel_px / largest if largest > 0 else 1.0


def _windowed(frame: np.ndarray, marker_px: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Line integrals ``-ln(I / median)`` of a raw frame and a display window that shows the BBs.

    The window runs from the 1st percentile of the frame to the BBs' own level (the median line integral at the
    measured centres; 99.9th percentile without them), so BBs are bright on a body that would otherwise fill
    the grey range."""
    f = np.asarray(frame, dtype=np.float64)
    med = float(np.median(f[f > 0])) if np.any(f > 0) else 1.0
    p = -np.log(np.maximum(f, 0.5) / med)
    lo = float(np.percentile(p, 1.0))
    hi = float(np.percentile(p, 99.9))
    if marker_px is not None:
        ok = np.all(np.isfinite(marker_px), axis=1)
        if np.any(ok):
            c = np.clip(np.round(marker_px[ok]).astype(int), 0, [p.shape[1] - 1, p.shape[0] - 1])
            hi = max(float(np.median(p[c[:, 1], c[:, 0]])), lo + 1e-6)
    return p, lo, hi


def _bb_thumbnails(plt, frame: np.ndarray, marker_px: np.ndarray, names, path: Path, title: str) -> Path:
    """One PNG of every measured BB, cropped +-12 px, each in its own window (min to max of its crop)."""
    ok = np.flatnonzero(np.all(np.isfinite(marker_px), axis=1))
    n = max(len(ok), 1)
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.5 * rows + 0.4), dpi=100, squeeze=False)
    p, _, _ = _windowed(frame)
    half = 12
    for ax in axes.ravel():
        ax.axis("off")
    for ax, j in zip(axes.ravel(), ok):
        c, r = int(round(marker_px[j, 0])), int(round(marker_px[j, 1]))
        crop = p[max(r - half, 0): r + half + 1, max(c - half, 0): c + half + 1]
        if crop.size:
            ax.imshow(crop, cmap="gray", vmin=float(crop.min()), vmax=float(crop.max()), interpolation="nearest")
        ax.set_title(str(names[j]), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return path


def _verdict(result: CalibrationResult, context: ReportContext) -> tuple[str, list[str]]:
    """Overall verdict and its reasons: the acceptance gate, then the kV isocentre against TG-142 SRS."""
    lines = []
    ok = True
    gate = context.gate
    if gate is not None:
        if gate.passed:
            lines.append("acceptance gate passed: every BB's residual within its noise, fit RMS as expected")
        else:
            ok = False
            lines.append("acceptance gate FAILED: " + "; ".join(gate.findings))
    else:
        lines.append("acceptance gate not run")
    kv = result.kv_isocentre(context.laser)
    lines.extend(kv.lines())
    if kv.verdict == "out of tolerance":
        ok = False
    verdict = "ACCEPTABLE" if ok and kv.verdict == "within tolerance" else (
        "NOT ACCEPTABLE" if not ok else "ACCEPTABLE FOR GEOMETRY; ISOCENTRE NOT VERIFIED")
    return verdict, lines


def write_calibration_report(
    result: CalibrationResult,
    out_dir: str | os.PathLike,
    frames: Sequence[CalibrationFrame] | None = None,
    context: ReportContext | None = None,
) -> Path:
    """Write ``index.html`` and one PNG per imager into ``out_dir``.

    Each figure shows the imager's frame at the first couch position (or an
    empty panel without frames) with, for every marker of that position, the
    residual vector measured minus reprojected, magnified (the factor is in
    the caption). The HTML holds the parameter table with 1-sigma
    uncertainties, the residuals per BB and the isocentre check.

    Parameters
    ----------
    result : CalibrationResult
    out_dir : path
        Created if missing.
    frames : sequence of CalibrationFrame, optional
        The raw frames the calibration used (for the figure backgrounds).

    Returns
    -------
    Path
        The ``index.html`` written.
    """
    plt = _pyplot()
    context = ReportContext() if context is None else context
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    figures: list[Path] = []
    for sol in result.imagers:
        im = sol.geometry
        name = im.name
        first_view = int(sol.residual_views.min())
        view = result.views[first_view]
        measured = view.marker_px
        predicted = im.project(result.markers_room_mm(first_view))
        res = measured - predicted
        scale = _residual_scale(sol.residuals_px, max(im.rows, im.cols))
        fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
        bg = None
        if frames is not None:
            for fr in frames:
                if fr.imager == name and np.allclose(np.asarray(fr.couch_shift_mm, float), view.couch_shift_mm):
                    bg = np.asarray(fr.frame, dtype=np.float64)
                    break
        if bg is not None:
            shown, lo, hi = _windowed(bg, measured)
            ax.imshow(shown, cmap="gray", origin="upper", vmin=lo, vmax=hi)
        else:
            ax.set_xlim(-0.5, im.cols - 0.5)
            ax.set_ylim(im.rows - 0.5, -0.5)
        ok = np.all(np.isfinite(measured), axis=1)
        ax.plot(measured[ok, 0], measured[ok, 1], "o", mfc="none", mec="tab:orange", ms=8)
        ax.quiver(predicted[ok, 0], predicted[ok, 1], scale * res[ok, 0], scale * res[ok, 1], color="tab:red",
                  angles="xy", scale_units="xy", scale=1.0, width=0.004)
        for j in np.flatnonzero(ok):
            ax.annotate(result.phantom.names[j], (measured[j, 0], measured[j, 1]), color="tab:cyan",
                        fontsize=7, xytext=(6, 6), textcoords="offset points")
        ax.set_title(f"imager '{name}': residuals x{scale:.0f} (couch shift {view.couch_shift_mm.tolist()} mm)")
        ax.set_xlabel("column (px)")
        ax.set_ylabel("row (px)")
        png = out / f"residuals_{_safe(name)}.png"
        fig.savefig(png)
        plt.close(fig)
        figures.append(png)
        thumbs = ""
        if bg is not None:
            tpng = _bb_thumbnails(plt, bg, measured, result.phantom.names, out / f"bbs_{_safe(name)}.png",
                                  f"imager '{name}': every BB, +-12 px, each in its own window")
            figures.append(tpng)
            thumbs = f"<img src='{tpng.name}' alt='BB thumbnails, imager {html.escape(name)}'>"
        rows = "".join(
            f"<tr><td>{html.escape(p.name)}</td><td>{p.value:.4f}</td><td>{p.sigma:.4f}</td><td>{p.unit}</td></tr>"
            for p in sol.parameters
        )
        res_rows = "".join(
            f"<tr><td>{html.escape(mk)}</td><td>{v}</td><td>{r[0]:+.4f}</td><td>{r[1]:+.4f}</td>"
            f"<td>{np.hypot(*r):.4f}</td></tr>"
            for mk, v, r in zip(sol.residual_markers, sol.residual_views, sol.residuals_px)
        )
        sections.append(
            f"<h2>Imager {html.escape(name)}</h2>"
            f"<p>{sol.n_observations} markers; reprojection RMS {sol.rms_px:.4f} px, max {sol.max_px:.4f} px "
            f"(linear start {sol.dlt_rms_px:.4f} px); weighted residual sigma {sol.sigma_px:.3f} (px without detection sigmas, else residual / expected noise).</p>"
            f"<p>In plain terms: {geometry_in_words(im)}.</p>"
            f"<img src='{png.name}' alt='residual vectors, imager {html.escape(name)}'>{thumbs}"
            f"<p>Residual vectors (measured minus reprojected) at the first couch position, magnified x{scale:.0f}.</p>"
            "<table><tr><th>parameter (room frame)</th><th>value</th><th>1 sigma</th><th>unit</th></tr>"
            f"{rows}</table>"
            "<details><summary>residuals per BB</summary><table><tr><th>marker</th><th>view</th>"
            f"<th>d col (px)</th><th>d row (px)</th><th>|d| (px)</th></tr>{res_rows}</table></details>"
        )
    iso = result.isocentre
    rot = ""
    if result.phantom_rotation is not None:
        rot = "<p>Phantom rotation (fitted): " + ", ".join(
            f"{p.name} {p.value:.4f} &plusmn; {p.sigma:.4f} {p.unit}" for p in result.phantom_rotation
        ) + "</p>"
    if result.couch_errors:
        rot += ("<p>Couch errors (fitted, where the couch put the phantom minus the reported shift):</p><table><tr>"
                "<th>reported shift (mm)</th><th>error (mm)</th><th>1 sigma (mm)</th></tr>" + "".join(
                    f"<tr><td>{np.round(e.shift_mm, 1).tolist()}</td><td>{np.round(e.error_mm, 3).tolist()}</td>"
                    f"<td>{np.round(e.sigma_mm, 3).tolist()}</td></tr>" for e in result.couch_errors) + "</table>")
    flag = "FLAGGED" if iso.flagged else "ok"
    verdict, why = _verdict(result, context)
    header = _header_lines(context, result.phantom_name, result.calibrated_unix_s, len(result.views))
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spineguide calibration</title>"
        "<style>body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}"
        "td,th{border:1px solid #aaa;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>Imaging-geometry calibration: {verdict}</h1>"
        + "".join(f"<p>{html.escape(h)}</p>" for h in header)
        + f"<h2>Verdict (tolerance: TG-142 SRS/SBRT imaging and treatment coordinate coincidence "
        f"{TG142_SRS_COINCIDENCE_MM:g} mm)</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in why) + "</ul>"
        + (_compare(context.previous, result.geometry) if context.previous is not None else
           "<p>No previous calibration given for comparison.</p>")
        + "<p>Signature of the physicist: ______________________ date: __________</p>"
        f"<h2>Fit consistency (circular: {flag})</h2><p>Centre BB triangulated at "
        f"{np.round(iso.centre_bb_room_mm, 4).tolist()} mm (room frame), {iso.distance_from_isocentre_mm:.4f} mm "
        f"from the isocentre (limit {iso.limit_mm} mm); expected {iso.expected_mm.tolist()} mm, "
        f"discrepancy {iso.discrepancy_mm:.4f} mm.</p>{rot}"
        + "".join(sections)
        + f"<h2>Notes</h2><p>{html.escape(result.geometry.notes)}</p></body></html>\n"
    )
    index = out / "index.html"
    index.write_text(doc, encoding="utf-8")
    summary = [f"Imaging-geometry calibration: {verdict}"] + header + [""] + why + [""] + [
        f"imager {s.geometry.name}: RMS {s.rms_px:.3f} px; {geometry_in_words(s.geometry)}" for s in result.imagers]
    _write_pdf(plt, out / "report.pdf", summary, figures)
    return index


def _header_lines(context: ReportContext, phantom_name: str, when_unix_s: float, n_views: int) -> list[str]:
    return [
        f"machine: {context.machine or 'not given'}; operator: {context.operator or 'not given'}",
        f"phantom: '{phantom_name}'" + (f" from {context.phantom_file}" if context.phantom_file else "")
        + f"; {n_views} views",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(when_unix_s))}; software: {software_version()}",
    ]


def _write_pdf(plt, path: Path, lines: Sequence[str], figures: Sequence[Path]) -> Path:
    """A PDF (matplotlib's PDF backend): a text page, then every figure PNG on its own page."""
    import textwrap

    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        wrapped = [w for line in lines for w in (textwrap.wrap(line, 95) or [""])]
        for start in range(0, max(len(wrapped), 1), 60):
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.06, 0.96, "\n".join(wrapped[start:start + 60]), va="top", ha="left", family="monospace",
                     fontsize=7.5)
            pdf.savefig(fig)
            plt.close(fig)
        for png in figures:
            img = plt.imread(str(png))
            fig = plt.figure(figsize=(8.27, 11.69))
            ax = fig.add_axes([0.05, 0.05, 0.9, 0.9])
            ax.imshow(img)
            ax.axis("off")
            pdf.savefig(fig)
            plt.close(fig)
    return path


def write_failure_report(
    out_dir: str | os.PathLike,
    error: BaseException | str,
    frames: Sequence[CalibrationFrame] = (),
    context: ReportContext | None = None,
    phantom_name: str = "",
    when_unix_s: float | None = None,
) -> Path:
    """Report of a calibration that did not produce a geometry: the error in plain words and every frame
    (windowed), as ``index.html`` and ``report.pdf``, so that the failure can be judged and filed."""
    plt = _pyplot()
    context = ReportContext() if context is None else context
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    when = time.time() if when_unix_s is None else float(when_unix_s)
    header = _header_lines(context, phantom_name or "?", when, len(frames))
    figures = []
    for k, fr in enumerate(frames):
        shown, lo, hi = _windowed(np.asarray(fr.frame))
        fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
        ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"imager '{fr.imager}', couch shift {list(np.asarray(fr.couch_shift_mm, float))} mm {fr.source}",
                     fontsize=8)
        png = out / f"frame_{k:02d}_{_safe(fr.imager)}.png"
        fig.savefig(png)
        plt.close(fig)
        figures.append(png)
    msg = str(error)
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spineguide calibration FAILED</title></head><body>"
        "<h1>Imaging-geometry calibration: FAILED (no geometry)</h1>"
        + "".join(f"<p>{html.escape(h)}</p>" for h in header)
        + f"<h2>What went wrong</h2><p>{html.escape(msg)}</p>"
        + "".join(f"<img src='{p.name}' alt='frame'>" for p in figures) + "</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(doc, encoding="utf-8")
    _write_pdf(plt, out / "report.pdf", ["Imaging-geometry calibration: FAILED (no geometry)"] + header
               + ["", "What went wrong:", msg], figures)
    return index


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_trend_plot(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Plot a QA history (``qa-record/1`` objects): centre-BB offset and RMS per imager over time.

    Action and tolerance levels of the newest record are drawn as lines.

    Returns
    -------
    Path
        The PNG written.

    Raises
    ------
    ReportError
        With no records.
    """
    if not records:
        raise ReportError("QA history is empty: nothing to plot")
    plt = _pyplot()
    recs = sorted(records, key=lambda r: r["performed_unix_s"])
    t_days = np.array([(r["performed_unix_s"] - recs[0]["performed_unix_s"]) / 86400.0 for r in recs])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), dpi=100, sharex=True)
    ax1.plot(t_days, [np.nan if r["centre_offset_distance_mm"] is None else r["centre_offset_distance_mm"]
                      for r in recs], "o-", label="centre BB offset")
    failed = [td for td, r in zip(t_days, recs) if r["centre_offset_distance_mm"] is None]
    if failed:
        ax1.plot(failed, np.zeros(len(failed)), "rx", ms=9, label="QA not done (FAIL)")
    tol = next((r["tolerances"] for r in reversed(recs) if "tolerances" in r), {})
    for key, style in (("offset_action_mm", "--"), ("offset_tolerance_mm", "-")):
        if key in tol:
            ax1.axhline(tol[key], color="tab:red", ls=style, lw=1, label=key.replace("_", " "))
    ax1.set_ylabel("offset (mm)")
    ax1.legend(fontsize=8)
    for name in sorted({n for r in recs for n in r["imagers"]}):
        ys = [r["imagers"][name]["rms_mm"] if name in r["imagers"] else np.nan for r in recs]
        ax2.plot(t_days, ys, "o-", label=f"imager {name}")
    for key, style in (("reprojection_action_mm", "--"), ("reprojection_tolerance_mm", "-")):
        if key in tol:
            ax2.axhline(tol[key], color="tab:red", ls=style, lw=1)
    ax2.set_ylabel("RMS reprojection (mm at iso)")
    ax2.set_xlabel(
        "days since " + time.strftime("%Y-%m-%d", time.gmtime(recs[0]["performed_unix_s"]))
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
