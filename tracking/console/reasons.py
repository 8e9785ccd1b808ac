"""Plain-language HOLD reasons for the page: what happened, what to do next, and whether it is routine.

Every reason code of ``gating/1`` (docs/PROTOCOL.md, "Reason codes") has an
entry; a test keeps this table and the document's table equal. A code the
table does not know (a newer service) is shown as it is, as a *safety* hold,
with "unknown reason: check the service log" as the next action -- never as
routine.

*Routine* holds are the ones every fraction has (setup, pause, settling
after a change); *safety* holds are the ones a therapist must look at. The
page keeps the two in separate lists so the routine ones never push a
safety hold out of sight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["REASONS", "HoldReason", "describe_reason", "reasons_json"]


@dataclass(frozen=True, slots=True)
class HoldReason:
    """One reason code: ``category`` (``routine``/``safety``), ``text`` (what happened), ``action`` (what next)."""

    code: str
    category: str
    text: str
    action: str


def _r(code: str, category: str, text: str, action: str) -> tuple[str, HoldReason]:
    assert category in ("routine", "safety", "ok")
    return code, HoldReason(code, category, text, action)


REASONS: dict[str, HoldReason] = dict([
    _r("ok", "ok", "Beam enabled: target within tolerance.", "None."),
    _r("not_monitoring", "routine", "Not monitoring (setup, plan loading or fraction ended).",
       "Finish setup, then press Start monitoring."),
    _r("paused", "routine", "Monitoring paused by an operator.", "Press Resume when ready."),
    _r("no_measurement", "routine", "No pair judged yet since monitoring started.",
       "Wait for the next image pair; if it persists, check the imager."),
    _r("settling", "routine", "In tolerance, waiting for consecutive good pairs (or tolerances just changed).",
       "Wait; the beam enables by itself after the next good pairs."),
    _r("pair_dropped", "routine", "An image pair was skipped because a newer one arrived first.",
       "None if occasional; if frequent, tell the physicist (processing too slow)."),
    _r("stale_frame", "safety", "Images too old to trust (late, old epoch, or no new pair before the permission expired).",
       "Check the imager is acquiring; the beam enables again with fresh images."),
    _r("future_frame", "safety", "Image time stamp is in the future: imager and service clocks disagree.",
       "Stop; call the physicist to check the clock synchronisation."),
    _r("missing_frame", "safety", "An expected frame is missing.", "Check the imager; call the physicist if it persists."),
    _r("unpaired_frame", "safety", "One imager's frame came without its partner.",
       "Check both kV imagers are acquiring; call service if one panel is silent."),
    _r("corrupt_frame", "safety", "A frame could not be read (bad header, size or imager).",
       "Check the imager connection; call the physicist if it repeats."),
    _r("nan_frame", "safety", "A frame contains invalid pixel values.", "Check the imager; call the physicist."),
    _r("saturated_frame", "safety", "A frame is saturated (over-exposed).",
       "Check kV technique and collimation; re-acquire."),
    _r("dark_frame", "safety", "A frame is dark: the imager's view is blocked (gantry, robot) or the exposure failed.",
       "Wait for the view to clear; check kV exposure if it persists."),
    _r("registration_failed", "safety", "The registration could not find the target in the images.",
       "Check the images (obstruction, field of view); re-image. Call the physicist if it persists."),
    _r("registration_refused", "safety", "The registration refused its own result (quality checks failed).",
       "Check the images; re-image. Call the physicist if it persists."),
    _r("fiducial_missing", "safety", "Fiducial seeds were not found in the images.",
       "Check the seeds are in the field and not obscured; re-image."),
    _r("fiducial_migrated", "safety", "The seed constellation does not match the plan (possible seed migration).",
       "Stop; call the physicist before treating."),
    _r("out_of_tolerance", "safety", "The target moved beyond the tolerance.",
       "Watch the patient; if it does not return, start a new setup (re-position)."),
    _r("moving_out_of_tolerance", "safety", "The target is moving towards the tolerance limit.",
       "Watch the patient (breathing, movement); wait or start a new setup."),
    _r("rotation_out_of_tolerance", "safety", "The patient is rotated beyond the rotation tolerance.",
       "Start a new setup to correct the rotation."),
    _r("correction_limit", "safety", "The measured correction is larger than the allowed limit: not sent to the couch.",
       "Check the patient's setup manually (lasers, marks) and start a new setup."),
    _r("frame_source_silent", "safety", "No images are arriving from the imager.",
       "Check the kV imager is acquiring (exposure enabled, interlocks); call service if it does not resume."),
    _r("internal_error", "safety", "The guidance service had an internal error.",
       "Stop treatment; call the physicist. Restart the service if it stopped."),
    _r("oversize_message", "safety", "The imager sent a message that is too large.",
       "Check the imager configuration; call the physicist."),
    _r("peer_disconnected", "safety", "The imager's connection to the service dropped.",
       "Check the imager; it reconnects by itself. Call service if it repeats."),
    _r("imager_restarted", "safety", "The imaging system restarted.",
       "Wait for new images; the beam enables again with good pairs."),
    _r("pair_id_jump", "safety", "The image pair numbering jumped (imager restarted without notice?).",
       "Wait for new images; call the physicist if it repeats."),
    _r("couch_timeout", "safety", "The couch did not report the move in time; the correction was withdrawn.",
       "Check the couch; a new proposal follows from the next images."),
    _r("one_view_uncertain", "safety", "One view: one imager is blocked or unusable, and the other view cannot "
       "confirm the target is within tolerance (95 % bound, out-of-plane mostly unknown).",
       "Wait for both views (gantry clear); the beam enables again with a stereo pair or a confident one-view pair."),
    _r("one_view_out_of_tolerance", "safety", "One view: one imager is blocked or unusable, and the other view "
       "shows the target beyond tolerance.", "Watch the patient; when both views are back, start a new setup if needed."),
    _r("one_view_refused", "safety", "One view: one imager is blocked or unusable, and the other view's "
       "measurement was refused (target not found or not trusted).",
       "Wait for both views; check the images. Call the physicist if it persists."),
    _r("one_view_no_reference", "safety", "One view: one imager is blocked or unusable and there is no recent "
       "stereo measurement to estimate from (or one-view monitoring is off).",
       "Wait for both imagers; check the blocked imager if it does not come back."),
    _r("frame_sender_not_imager", "safety", "Frames came from a client that is not the imager.",
       "Stop; call the physicist (configuration or security problem)."),
])


def describe_reason(code: Any) -> HoldReason:
    """The entry of ``code``; an unknown code is a safety hold with its code shown (never routine)."""
    code = str(code)
    known = REASONS.get(code)
    if known is not None:
        return known
    return HoldReason(code, "safety", f"Unknown hold reason '{code}'.", "Check the service log; call the physicist.")


def reasons_json() -> dict[str, dict[str, str]]:
    """The table for the page (``/api/config``)."""
    return {c: {"category": r.category, "text": r.text, "action": r.action} for c, r in REASONS.items()}
