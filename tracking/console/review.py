"""Session review: a recorded session (``spineguide.tracking.service.record``) analysed, and its HTML report with figures.

:func:`review_session` reads a session record and extracts the deviation
and beam timeline (every ``gating/1`` sent), each HOLD run with its reason,
the pair-complete -> gating-published latencies the service recorded, the
residual setup errors (``correction/1`` with ``purpose: verified``: the
measured correction left after the couch moved) and every command with its
operator. :func:`write_review_html` renders a self-contained HTML page
(matplotlib figures embedded as PNG) that can be saved as it is.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spineguide.calibration.foundation import readonly_array as _ro

from ..errors import ReviewError
from ..service.record import read_record
from .live import LiveState

__all__ = ["ReviewError", "SessionReview", "list_sessions", "review_session", "write_review_html"]


@dataclass(frozen=True, slots=True)
class SessionReview:
    """One recorded session, analysed.

    Attributes
    ----------
    name : str
        File name of the record.
    started_unix_s, ended_unix_s : float
        First and last record times (wall clock).
    gating_t_unix_s : (N,) array
        Decision time of every ``gating/1`` sent, s.
    deviation_mm : (N,) array
        Its 3D target deviation, mm (NaN where the message had none).
    beam : tuple of str
        ``ENABLE``/``HOLD`` per message.
    holds : tuple of dict
        HOLD runs: ``reason``, ``first_unix_s``, ``last_unix_s``, ``count``, ``pair_id``, ``deviation_mm``.
    latency_ms : (M,) array
        Pair complete -> gating published, ms (as the service measured it).
    setup_residuals : tuple of dict
        ``pair_id``, ``t_unix_s``, ``translation_mm``, ``rotation_deg``, ``norm_mm`` of each verified setup.
    commands : tuple of dict
        ``t_unix_s``, ``command``, ``operator`` (the authenticated client key's name, or None),
        ``console_user`` (the name logged in at that console, as the console said; or None),
        ``ok``, ``reason``.
    states : tuple of dict
        ``t_unix_s``, ``old``, ``new`` of every state change.
    tolerance_3d_mm : float or None
        The configured 3D tolerance at the start of the session.
    pairs : int
        Stereo pairs judged.
    """

    name: str
    started_unix_s: float
    ended_unix_s: float
    gating_t_unix_s: np.ndarray
    deviation_mm: np.ndarray
    beam: tuple[str, ...]
    holds: tuple[dict, ...]
    latency_ms: np.ndarray
    setup_residuals: tuple[dict, ...]
    commands: tuple[dict, ...]
    states: tuple[dict, ...]
    tolerance_3d_mm: float | None
    pairs: int

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (NaN deviations become null)."""
        lat = self.latency_ms
        return {
            "name": self.name, "started_unix_s": self.started_unix_s, "ended_unix_s": self.ended_unix_s,
            "pairs": self.pairs, "tolerance_3d_mm": self.tolerance_3d_mm,
            "gating": [[float(t), None if math.isnan(d) else float(d), b]
                       for t, d, b in zip(self.gating_t_unix_s, self.deviation_mm, self.beam)],
            "holds": list(self.holds), "setup_residuals": list(self.setup_residuals),
            "commands": list(self.commands), "states": list(self.states),
            "latency_ms": {} if lat.size == 0 else {
                "n": int(lat.size), "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "max": float(lat.max())},
        }


def review_session(path: str | os.PathLike) -> SessionReview:
    """Analyse one session record (see the module docstring).

    Raises
    ------
    RecordError
        Unreadable or corrupt record; :class:`ReviewError` if its first event is not ``session``.
    """
    p = Path(path)
    records = read_record(p)
    if not records or records[0].get("event") != "session":
        raise ReviewError(f"{p}: not a session record (first event is not 'session')")
    config = records[0].get("config") or {}
    tol = (config.get("safety") or {}).get("tolerance_3d_mm")
    live = LiveState(timeline_s=math.inf, max_holds=100_000)
    t_g, dev, beam, lat, residuals, commands, states = [], [], [], [], [], [], []
    pairs = 0
    for rec in records:
        ev = rec.get("event")
        if ev == "sent" and rec.get("topic") in ("gating", "correction") and rec.get("body"):
            body = rec["body"]
            live.on_message(rec["topic"], body, rec["t_unix_s"], rec["t_mono_s"])
            if rec["topic"] == "gating":
                t_g.append(body["t_unix_s"])
                d = body.get("deviation_mm")
                dev.append(float(d) if isinstance(d, (int, float)) else math.nan)
                beam.append(body["beam"])
                if isinstance(rec.get("latency_ms"), (int, float)):
                    lat.append(rec["latency_ms"])
            elif body.get("purpose") == "verified":
                tr = [float(v) for v in body["translation_mm"]]
                residuals.append({"pair_id": body.get("pair_id"), "t_unix_s": body["t_unix_s"], "translation_mm": tr,
                                  "rotation_deg": [float(v) for v in body["rotation_deg"]],
                                  "norm_mm": float(np.linalg.norm(tr))})
        elif ev == "command":
            params = rec.get("params") or {}
            reply = rec.get("reply") or {}
            commands.append({"t_unix_s": rec["t_unix_s"], "command": rec.get("command"),
                             "operator": params.get("operator"), "console_user": params.get("console_user"),
                             "ok": bool(reply.get("ok")),
                             "reason": reply.get("reason")})
        elif ev == "state":
            states.append({"t_unix_s": rec["t_unix_s"], "old": rec.get("old"), "new": rec.get("new")})
        elif ev == "pair":
            pairs += 1
    return SessionReview(
        p.name, float(records[0]["t_unix_s"]), float(records[-1]["t_unix_s"]), _ro(t_g), _ro(dev), tuple(beam),
        tuple(h.to_json() for h in live.holds), _ro(lat), tuple(residuals), tuple(commands), tuple(states),
        float(tol) if isinstance(tol, (int, float)) else None, pairs)


def list_sessions(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Recorded sessions in ``folder`` (``*.jsonl`` whose first line is a ``session`` event), newest first.

    Each entry: ``name``, ``started_unix_s``, ``size_bytes``. Files that are not session records are skipped.
    """
    from spineguide.calibration.jsonfile import parse_json_bytes

    out = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        try:
            with open(f, "rb") as fh:
                first = parse_json_bytes(fh.readline() or b"null", str(f), ReviewError)
        except (OSError, ReviewError):
            continue
        if isinstance(first, dict) and first.get("event") == "session":
            out.append({"name": f.name, "started_unix_s": first.get("t_unix_s"), "size_bytes": f.stat().st_size})
    out.sort(key=lambda s: s["started_unix_s"] or 0.0, reverse=True)
    return out


def resolve_session(folder: Path, name: str) -> Path:
    """The record ``name`` inside ``folder``; :class:`ReviewError` for any other path (no traversal)."""
    candidate = (folder / name).resolve()
    if candidate.parent != folder.resolve() or candidate.suffix != ".jsonl" or not candidate.is_file():
        raise ReviewError(f"no recorded session named {name!r} in {folder}")
    return candidate


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt_mm(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 10)} UTC"


def write_review_html(review: SessionReview, path: str | os.PathLike | None = None) -> str:
    """The review as one self-contained HTML document (figures inline); also written to ``path`` if given."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state, safe in any thread
    )

    t0 = review.started_unix_s
    t = review.gating_t_unix_s - t0
    fig = Figure(figsize=(9, 5), dpi=90)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax1.plot(t, review.deviation_mm, ".-", ms=2, lw=0.8, label="3D target deviation")
    if review.tolerance_3d_mm is not None:
        ax1.axhspan(0, review.tolerance_3d_mm, color="tab:green", alpha=0.12,
                    label=f"tolerance {review.tolerance_3d_mm:g} mm")
    ax1.set_ylabel("deviation (mm)")
    ax1.legend(fontsize=8, loc="upper left")
    on = np.array([b == "ENABLE" for b in review.beam], dtype=float)
    ax2.step(t, on, where="post", color="tab:orange")
    ax2.set_yticks([0, 1], ["HOLD", "ENABLE"])
    ax2.set_xlabel("time since session start (s)")
    fig.tight_layout()
    timeline_png = _figure_png(fig)
    latency_png = None
    if review.latency_ms.size:
        fig = Figure(figsize=(6, 3), dpi=90)
        ax = fig.subplots()
        ax.hist(review.latency_ms, bins=40, color="tab:blue")
        ax.set_xlabel("pair complete -> gating published (ms)")
        ax.set_ylabel("pairs")
        fig.tight_layout()
        latency_png = _figure_png(fig)
        lat = review.to_json()["latency_ms"]
    esc = html.escape
    holds = "".join(
        f"<tr><td>{_fmt_time(h['first_unix_s'])}</td><td class='hold'>{esc(h['reason'])}</td><td>{h['count']}</td>"
        f"<td>{_fmt_mm(h['deviation_mm'])}</td></tr>" for h in review.holds)
    resid = "".join(
        f"<tr><td>{r['pair_id']}</td><td>{', '.join(f'{v:+.2f}' for v in r['translation_mm'])}</td>"
        f"<td>{', '.join(f'{v:+.2f}' for v in r['rotation_deg'])}</td><td>{r['norm_mm']:.2f}</td></tr>"
        for r in review.setup_residuals)
    cmds = "".join(
        f"<tr><td>{_fmt_time(c['t_unix_s'])}</td><td>{esc(str(c['command']))}</td>"
        f"<td>{esc(str(c['operator'] or ''))}"
        f"{' (' + esc(str(c['console_user'])) + ')' if c.get('console_user') else ''}</td>"
        f"<td>{'ok' if c['ok'] else 'refused: ' + esc(str(c['reason']))}</td></tr>"
        for c in review.commands)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Session review {esc(review.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #bbb;padding:2px 8px;font-size:90%}}.hold{{color:#b00}}</style></head>
<body><h1>Session review: {esc(review.name)}</h1>
<p id="review-summary">{_fmt_time(review.started_unix_s)} to {_fmt_time(review.ended_unix_s)};
{review.pairs} stereo pairs judged; {len(review.beam)} gating decisions; {len(review.holds)} HOLD runs.
Latency pair complete -> gating published: {'n/a' if not lat else
 f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms ({lat['n']} pairs)"}.</p>
<h2>Deviation and beam</h2><img id="review-timeline" alt="deviation and beam timeline" src="data:image/png;base64,{timeline_png}">
<h2>Holds and reasons</h2><table id="review-holds"><tr><th>from</th><th>reason</th><th>decisions</th><th>deviation mm</th></tr>{holds}</table>
<h2>Latency</h2>{'<p>no latencies recorded</p>' if latency_png is None else
 f'<img id="review-latency" alt="latency histogram" src="data:image/png;base64,{latency_png}">'}
<h2>Residual setup errors (verified setups, couch correction left)</h2>
<table id="review-residuals"><tr><th>pair</th><th>translation mm (X, Y, Z)</th><th>rotation deg (pitch, roll, yaw)</th><th>|t| mm</th></tr>{resid}</table>
<h2>Commands</h2><table id="review-commands"><tr><th>time</th><th>command</th><th>operator</th><th>result</th></tr>{cmds}</table>
</body></html>
"""
    if path is not None:
        Path(path).write_text(doc, encoding="utf-8")
    return doc
