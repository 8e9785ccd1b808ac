"""HTML reports with PNG figures for calibrations and the QA trend.

Figures are drawn with matplotlib's non-interactive Agg backend (no display
needed); matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ReportError
from .solve import CalibrationFrame, CalibrationResult

__all__ = ["ReportError", "write_calibration_report", "write_trend_plot"]


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


def write_calibration_report(
    result: CalibrationResult,
    out_dir: str | os.PathLike,
    frames: Sequence[CalibrationFrame] | None = None,
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
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
            ax.imshow(bg, cmap="gray", origin="upper")
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
            f"<img src='{png.name}' alt='residual vectors, imager {html.escape(name)}'>"
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
    flag = "FLAGGED" if iso.flagged else "ok"
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spineguide calibration</title>"
        "<style>body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}"
        "td,th{border:1px solid #aaa;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>Imaging-geometry calibration</h1><p>Phantom '{html.escape(result.phantom_name)}'; calibrated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(result.calibrated_unix_s))}; "
        f"{len(result.views)} views.</p>"
        f"<h2>Isocentre check: {flag}</h2><p>Centre BB triangulated at "
        f"{np.round(iso.centre_bb_room_mm, 4).tolist()} mm (room frame), {iso.distance_from_isocentre_mm:.4f} mm "
        f"from the isocentre (limit {iso.limit_mm} mm); expected {iso.expected_mm.tolist()} mm, "
        f"discrepancy {iso.discrepancy_mm:.4f} mm.</p>{rot}"
        + "".join(sections)
        + f"<h2>Notes</h2><p>{html.escape(result.geometry.notes)}</p></body></html>\n"
    )
    index = out / "index.html"
    index.write_text(doc, encoding="utf-8")
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
