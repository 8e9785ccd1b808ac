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
import hashlib
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spineguide.calibration.foundation import readonly_array as _ro

from ..errors import ReviewError
from ..service.record import read_record
from .live import LiveState

__all__ = ["ReviewError", "SessionReview", "list_sessions", "read_signoff", "review_session", "sign_off",
           "write_report_pdf", "write_review_html"]


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
    valid_until_unix_s : (N,) array
        Each ``gating/1``'s ``valid_until_unix_s`` (NaN where missing): an ENABLE lasts until it or the next
        decision, whichever comes first.
    corrections : tuple of dict
        Every ``correction/1`` sent: ``t_unix_s``, ``purpose``, ``translation_mm``, ``rotation_deg``.
    one_view : tuple of str or None
        Per ``gating/1`` message: the imager a one-view pair was judged on (``gating/1.2``), else None.
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
    valid_until_unix_s: np.ndarray = field(default_factory=lambda: _ro([]))
    corrections: tuple[dict, ...] = ()
    one_view: tuple[str | None, ...] = ()

    def one_view_summary(self) -> dict[str, Any]:
        """Decisions on one-view pairs (a view blocked): per imager judged on, and the ENABLEs among them."""
        per: dict[str, dict[str, int]] = {}
        for imager, b in zip(self.one_view, self.beam):
            if imager:
                e = per.setdefault(imager, {"decisions": 0, "enable": 0})
                e["decisions"] += 1
                e["enable"] += int(b == "ENABLE")
        return {"decisions": sum(e["decisions"] for e in per.values()),
                "enable": sum(e["enable"] for e in per.values()), "per_imager": per}

    @property
    def beam_on_s(self) -> float:
        """Seconds with an unexpired ENABLE: each ENABLE until its expiry or the next decision, if sooner."""
        t, until = self.gating_t_unix_s, self.valid_until_unix_s
        total = 0.0
        for i, b in enumerate(self.beam):
            if b != "ENABLE" or i >= until.size or not math.isfinite(until[i]):
                continue
            end = min(until[i], t[i + 1]) if i + 1 < t.size else until[i]
            total += max(0.0, end - t[i])
        return total

    @property
    def max_deviation_beam_on_mm(self) -> float | None:
        """Largest 3D deviation of a decision that enabled the beam (None: no ENABLE with a deviation)."""
        on = np.array([b == "ENABLE" for b in self.beam], dtype=bool)
        d = self.deviation_mm[on] if on.size == self.deviation_mm.size else np.zeros(0)
        d = d[np.isfinite(d)]
        return float(d.max()) if d.size else None

    def holds_per_reason(self) -> list[dict[str, Any]]:
        """Per reason: ``reason``, ``category`` (routine/safety), ``runs``, ``decisions``; safety first, most first."""
        from .reasons import describe_reason

        per: dict[str, dict[str, Any]] = {}
        for h in self.holds:
            e = per.setdefault(h["reason"], {"reason": h["reason"], "category": describe_reason(h["reason"]).category,
                                             "runs": 0, "decisions": 0})
            e["runs"] += 1
            e["decisions"] += int(h["count"])
        return sorted(per.values(), key=lambda e: (e["category"] != "safety", -e["decisions"], e["reason"]))

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
            "beam_on_s": self.beam_on_s, "max_deviation_beam_on_mm": self.max_deviation_beam_on_mm,
            "holds_per_reason": self.holds_per_reason(),
            "one_view": self.one_view_summary(),
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
    until, corrections, one_view = [], [], []
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
                ov = body.get("one_view")
                one_view.append(ov if isinstance(ov, str) else None)
                v = body.get("valid_until_unix_s")
                until.append(float(v) if isinstance(v, (int, float)) else math.nan)
                if isinstance(rec.get("latency_ms"), (int, float)):
                    lat.append(rec["latency_ms"])
            else:
                try:
                    corrections.append({"t_unix_s": float(body["t_unix_s"]), "purpose": body.get("purpose"),
                                        "translation_mm": [float(v) for v in body["translation_mm"]],
                                        "rotation_deg": [float(v) for v in body["rotation_deg"]]})
                except (KeyError, TypeError, ValueError):
                    pass  # a malformed correction in a record: not plotted
            if rec["topic"] == "correction" and body.get("purpose") == "verified":
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
        float(tol) if isinstance(tol, (int, float)) else None, pairs, _ro(until), tuple(corrections),
        tuple(one_view))


def list_sessions(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Recorded sessions in ``folder`` (``*.jsonl`` whose first line is a ``session`` event), newest first.

    Each entry: ``name``, ``started_unix_s``, ``size_bytes``. Files that are not session records are skipped.
    """
    from spineguide.calibration.jsonfile import parse_json_bytes

    out = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        if f.is_symlink():
            continue  # the "newest session" link: the session itself is listed under its own name
        try:
            with open(f, "rb") as fh:
                first = parse_json_bytes(fh.readline() or b"null", str(f), ReviewError)
        except (OSError, ReviewError):
            continue
        if isinstance(first, dict) and first.get("event") == "session":
            out.append({"name": f.name, "started_unix_s": first.get("t_unix_s"), "size_bytes": f.stat().st_size,
                        "signoff": read_signoff(f)})
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


SIGNOFF_SCHEMA = "review-signoff/1"
#: Longest sign-off comment, characters.
MAX_COMMENT_CHARS = 500


def signoff_path(record: Path) -> Path:
    """Where the physicist's sign-off of a session record is kept (beside it)."""
    return record.with_name(record.name + ".signoff.json")


def record_digest(record: Path, size_bytes: int | None = None) -> tuple[str, int]:
    """SHA-256 of the record's first ``size_bytes`` (default: all, up to its last complete line) and that size.

    A record is append-only and a running service keeps appending to it (a STOPPED service still records its
    HOLDs), so a sign-off signs the record as it was: its first ``size_bytes``; later lines are not covered.
    """
    h = hashlib.sha256()
    with open(record, "rb") as f:
        data = f.read() if size_bytes is None else f.read(size_bytes)
    if size_bytes is None:
        data = data[:data.rfind(b"\n") + 1]  # only complete lines
    elif len(data) < size_bytes:
        return "", len(data)  # shorter than what was signed: it changed
    h.update(data)
    return h.hexdigest(), len(data)


def read_signoff(record: Path) -> dict[str, Any] | None:
    """The sign-off of ``record`` (with ``matches``: the record still has the signed content), or None."""
    from spineguide.calibration.jsonfile import parse_json_bytes

    p = signoff_path(Path(record))
    try:
        doc = parse_json_bytes(p.read_bytes(), str(p), ReviewError)
    except FileNotFoundError:
        return None
    except (OSError, ReviewError) as err:
        return {"error": f"unreadable sign-off: {err}"}
    if not isinstance(doc, dict) or doc.get("schema") != SIGNOFF_SCHEMA:
        return {"error": f"{p.name} is not a {SIGNOFF_SCHEMA} file"}
    try:
        size = doc.get("size_bytes")
        size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else -1
        digest, _ = record_digest(Path(record), size) if size >= 0 else ("", 0)
        doc["matches"] = digest != "" and doc.get("sha256") == digest
        doc["appended_bytes"] = max(0, Path(record).stat().st_size - size) if size >= 0 else None
    except OSError:
        doc["matches"] = False
    return doc


def sign_off(record: Path, operator: str, role: str, comment: str, now_unix_s: float) -> dict[str, Any]:
    """Sign the session report off (once): who, when, the record's SHA-256. :class:`ReviewError` if refused."""
    record = Path(record)
    if record.is_symlink():
        raise ReviewError(f"{record.name} is the link to the newest session: sign off the session's own record")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS or not (comment.isprintable() or not comment):
        raise ReviewError(f"a sign-off comment is at most {MAX_COMMENT_CHARS} printable characters")
    digest, size = record_digest(record)
    doc = {"schema": SIGNOFF_SCHEMA, "record": record.name, "sha256": digest, "size_bytes": size,
           "operator": operator, "role": role, "t_unix_s": now_unix_s, "comment": comment}
    try:
        fd = os.open(signoff_path(record), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        prev = read_signoff(record) or {}
        raise ReviewError(f"{record.name} is already signed off by {prev.get('operator', '?')}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return {**doc, "matches": True, "appended_bytes": 0}


def _figures(review: SessionReview) -> dict[str, Any]:
    """The report's figures (matplotlib ``Figure``s, no pyplot): timeline, axes, latency (if any)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in any thread

    from .reasons import describe_reason

    t0 = review.started_unix_s
    t = review.gating_t_unix_s - t0
    figs: dict[str, Any] = {}
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
    figs["timeline"] = fig

    fig = Figure(figsize=(9, 7), dpi=90)
    axes = fig.subplots(4, 1, sharex=True)
    tc = np.array([c["t_unix_s"] - t0 for c in review.corrections])
    tr = np.array([c["translation_mm"] for c in review.corrections]).reshape(-1, 3)
    rot = np.array([c["rotation_deg"] for c in review.corrections]).reshape(-1, 3)
    for k, (ax, label) in enumerate(zip(axes[:3], ("X lat", "Y long", "Z vert"))):
        ax.plot(tc, tr[:, k], ".", ms=3)
        ax.set_ylabel(f"{label} mm")
        if review.tolerance_3d_mm is not None:
            ax.axhspan(-review.tolerance_3d_mm, review.tolerance_3d_mm, color="tab:green", alpha=0.12)
    for k, label in enumerate(("pitch", "roll", "yaw")):
        axes[3].plot(tc, rot[:, k], ".", ms=3, label=label)
    axes[3].set_ylabel("rotation deg")
    axes[3].set_xlabel("time since session start (s); correction per pair; red: safety holds, grey: commands")
    if review.corrections:
        axes[3].legend(fontsize=7, loc="upper left", ncols=3)
    for ax in axes:
        for h in review.holds:
            if describe_reason(h["reason"]).category == "safety":
                ax.axvline(h["first_unix_s"] - t0, color="tab:red", lw=0.6, alpha=0.6)
        for c in review.commands:
            ax.axvline(c["t_unix_s"] - t0, color="0.5", lw=0.6, ls="--")
    for c in review.commands:
        axes[0].annotate(str(c["command"]), (c["t_unix_s"] - t0, 1.0), xycoords=("data", "axes fraction"),
                         fontsize=6, rotation=90, va="top", color="0.3")
    fig.tight_layout()
    figs["axes"] = fig

    if review.latency_ms.size:
        fig = Figure(figsize=(6, 3), dpi=90)
        ax = fig.subplots()
        ax.hist(review.latency_ms, bins=40, color="tab:blue")
        ax.set_xlabel("pair complete -> gating published (ms)")
        ax.set_ylabel("pairs")
        fig.tight_layout()
        figs["latency"] = fig
    return figs


def _summary_lines(review: SessionReview) -> list[str]:
    lat = review.to_json()["latency_ms"]
    maxdev = review.max_deviation_beam_on_mm
    ov = review.one_view_summary()
    one_view = ("no pair judged on one view" if not ov["decisions"] else
                f"{ov['decisions']} decisions on one view (a view blocked; "
                + ", ".join(f"on imager {k}: {e['decisions']}, {e['enable']} ENABLE" for k, e in
                            sorted(ov["per_imager"].items())) + ")")
    return [
        f"{_fmt_time(review.started_unix_s)} to {_fmt_time(review.ended_unix_s)}",
        f"{review.pairs} stereo pairs judged; {len(review.beam)} gating decisions; {len(review.holds)} HOLD runs",
        f"beam-on time {review.beam_on_s:.1f} s",
        one_view,
        "maximum deviation with the beam on: " + ("n/a (the beam was never on)" if maxdev is None
                                                  else f"{maxdev:.2f} mm"),
        "latency pair complete -> gating published: " + ("n/a" if not lat else
            f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms ({lat['n']} pairs)"),
    ]


def _signoff_line(signoff: dict[str, Any] | None) -> str:
    if not signoff:
        return "Physicist sign-off: not signed off"
    if "error" in signoff:
        return f"Physicist sign-off: {signoff['error']}"
    line = (f"Physicist sign-off: {signoff.get('operator')} ({signoff.get('role')}) at "
            f"{_fmt_time(float(signoff.get('t_unix_s') or 0.0))}; record SHA-256 {str(signoff.get('sha256'))[:16]}...")
    if not signoff.get("matches"):
        line += " -- THE SIGNED PART OF THE RECORD CHANGED AFTER THE SIGN-OFF"
    elif signoff.get("appended_bytes"):
        line += (f"; covers the record's first {signoff.get('size_bytes')} bytes ({signoff['appended_bytes']} "
                 "bytes appended later by the running service are not covered)")
    if signoff.get("comment"):
        line += f"; comment: {signoff['comment']}"
    return line


def write_report_pdf(review: SessionReview, signoff: dict[str, Any] | None = None) -> bytes:
    """The session report as PDF (summary, sign-off, holds per reason, figures, commands): matplotlib only."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buf = io.BytesIO()
    figs = _figures(review)
    with PdfPages(buf, metadata={"Title": f"Session report {review.name}", "Creator": "spineguide console"}) as pdf:
        page = Figure(figsize=(8.27, 11.69))
        lines = [f"Session report: {review.name}", "", *_summary_lines(review), "", _signoff_line(signoff), "",
                 "Holds per reason (safety first):"]
        lines += [f"  {h['category']:8s} {h['reason']:28s} {h['runs']:4d} runs {h['decisions']:6d} decisions"
                  for h in review.holds_per_reason()] or ["  none"]
        lines += ["", "Commands (time UTC, command, operator (console user), result):"]
        lines += [f"  {_fmt_time(c['t_unix_s'])[11:]} {c['command']} {c['operator'] or ''}"
                  f"{' (' + str(c['console_user']) + ')' if c.get('console_user') else ''} "
                  f"{'ok' if c['ok'] else 'refused: ' + str(c['reason'])[:60]}" for c in review.commands[:60]]
        page.text(0.06, 0.97, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.5)
        pdf.savefig(page)
        for fig in figs.values():
            pdf.savefig(fig)
    return buf.getvalue()


def write_review_html(review: SessionReview, path: str | os.PathLike | None = None,
                      signoff: dict[str, Any] | None = None) -> str:
    """The review as one self-contained HTML document (figures inline); also written to ``path`` if given."""
    figs = _figures(review)
    timeline_png = _figure_png(figs["timeline"])
    axes_png = _figure_png(figs["axes"])
    latency_png = _figure_png(figs["latency"]) if "latency" in figs else None
    esc = html.escape
    holds = "".join(
        f"<tr><td>{_fmt_time(h['first_unix_s'])}</td><td class='hold'>{esc(h['reason'])}</td><td>{h['count']}</td>"
        f"<td>{_fmt_mm(h['deviation_mm'])}</td></tr>" for h in review.holds)
    per_reason = "".join(
        f"<tr><td>{esc(h['category'])}</td><td class='hold'>{esc(h['reason'])}</td><td>{h['runs']}</td>"
        f"<td>{h['decisions']}</td></tr>" for h in review.holds_per_reason())
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
    summary = "; ".join(esc(x) for x in _summary_lines(review))
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Session review {esc(review.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #bbb;padding:2px 8px;font-size:90%}}.hold{{color:#b00}}img{{max-width:100%}}</style></head>
<body><h1>Session review: {esc(review.name)}</h1>
<p id="review-summary">{summary}.</p>
<p id="review-signoff">{esc(_signoff_line(signoff))}</p>
<h2>Holds per reason</h2><table id="review-per-reason"><tr><th>category</th><th>reason</th><th>runs</th><th>decisions</th></tr>{per_reason}</table>
<h2>Deviation and beam</h2><img id="review-timeline" alt="deviation and beam timeline" src="data:image/png;base64,{timeline_png}">
<h2>Per axis, with events</h2><img id="review-axes" alt="correction per axis and rotation over time, with holds and commands" src="data:image/png;base64,{axes_png}">
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
