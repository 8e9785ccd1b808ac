"""The fraction on the page: the plans a console offers, and direction words for a couch correction.

A :class:`PlanEntry` is one plan the service can load (its ``[plan]``: DICOM
folder or plan files) with the patient's identity as the plan gives it. The
page shows the entries; the operator chooses one and types the fraction
number; ``load_plan`` goes to the service only when patient ID and plan ID
are those of an entry (the console refuses anything else), and the service
records them with the command (operator, time) in the session record.

Direction words: the room frame is IEC 61217 (+X to the right of an observer
at the foot of the couch facing the gantry, +Y towards the gantry, +Z up);
what that means for the patient depends on the patient position
(docs/CONVENTIONS.md, "CT to room"). A correction of +X moves the patient
(with the couch) towards room +X. Without a patient position the words are
the room's only, and the page says the position is unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConsoleConfigError

__all__ = ["PATIENT_DIRECTIONS", "PlanEntry", "direction_words", "plan_entry_from_plan", "plans_from_service"]

#: For each patient position: the patient direction of room +X, +Y, +Z (and of -X, -Y, -Z).
#: From docs/CONVENTIONS.md: HFS X = d_x (LPS +x = patient left), Y = d_z (+z superior), Z = -d_y (-y anterior).
PATIENT_DIRECTIONS: dict[str, tuple[tuple[str, str], tuple[str, str], tuple[str, str]]] = {
    "HFS": (("left", "right"), ("superior", "inferior"), ("anterior", "posterior")),
    "FFS": (("right", "left"), ("inferior", "superior"), ("anterior", "posterior")),
    "HFP": (("right", "left"), ("superior", "inferior"), ("posterior", "anterior")),
    "FFP": (("left", "right"), ("inferior", "superior"), ("posterior", "anterior")),
}
ROOM_DIRECTIONS = (("room +X", "room -X"), ("towards gantry", "away from gantry"), ("up", "down"))
_ID_RE = re.compile(r"[\x20-\x7e]{1,64}")
MAX_FRACTION = 99


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """One plan the console offers: patient identity, plan, method and where it comes from."""

    patient_id: str
    patient_name: str
    plan_id: str
    method: str
    source: str
    patient_position: str | None

    def __post_init__(self) -> None:
        for name in ("patient_id", "plan_id"):
            if not isinstance(getattr(self, name), str) or not _ID_RE.fullmatch(getattr(self, name)):
                raise ConsoleConfigError(f"plan entry: {name} must be 1-64 printable ASCII characters, "
                                         f"got {getattr(self, name)!r}")
        for name in ("patient_name", "method", "source"):
            if not isinstance(getattr(self, name), str) or len(getattr(self, name)) > 256:
                raise ConsoleConfigError(f"plan entry: {name} must be a string of at most 256 characters")
        if self.patient_position is not None and self.patient_position not in PATIENT_DIRECTIONS:
            raise ConsoleConfigError(f"plan entry: patient position {self.patient_position!r} is not one of "
                                     f"{sorted(PATIENT_DIRECTIONS)}")

    def to_json(self) -> dict[str, Any]:
        return {"patient_id": self.patient_id, "patient_name": self.patient_name, "plan_id": self.plan_id,
                "method": self.method, "source": self.source, "patient_position": self.patient_position,
                "directions": direction_table(self.patient_position)}


def direction_table(position: str | None) -> list[list[str]]:
    """Per room axis X, Y, Z: [word for +, word for -] (patient words where the position is known)."""
    table = PATIENT_DIRECTIONS.get(position) if position else None
    return [list(pair) for pair in (table or ROOM_DIRECTIONS)]


def direction_words(translation_mm, position: str | None) -> list[str]:
    """What a couch correction does to the patient, per axis: e.g. ``"2.0 mm left"`` (``"0.0 mm"`` when zero)."""
    table = direction_table(position)
    out = []
    for value, (plus, minus) in zip(translation_mm, table):
        v = float(value)
        out.append(f"{abs(v):.1f} mm" + ("" if round(abs(v), 1) == 0 else f" {plus if v > 0 else minus}"))
    return out


#: Most plans a console takes from one ``list_plans`` reply (the service's own limit, config.MAX_PLANS).
MAX_LISTED_PLANS = 64
_LISTED_KEYS = ("plan_id", "patient_id", "patient_name", "patient_position", "method", "source")


def plans_from_service(listed: Any, own: tuple = ()) -> tuple[tuple[PlanEntry, ...], list[str]]:
    """The plans the page offers: the service's catalogue (a ``list_plans`` reply's ``plans``), checked entry by entry.

    An entry without a patient identity (a service's single ``[plan]``: what its files carry) takes it from the
    console's own entry of the same ``plan_id`` (``own``: read from the same plan files); without one it is not
    offered. Returns ``(entries, problems)``: every entry refused, with why (shown on the page and logged);
    nothing is filled in by default.
    """
    if not isinstance(listed, list):
        return (), [f"list_plans reply: 'plans' must be a list, got {type(listed).__name__}"]
    out: list[PlanEntry] = []
    problems: list[str] = []
    mine = {p.plan_id: p for p in own}
    for i, item in enumerate(listed[:MAX_LISTED_PLANS]):
        if not isinstance(item, dict) or set(item) - set(_LISTED_KEYS) or "plan_id" not in item:
            problems.append(f"plan #{i}: not a catalogue entry ({item!r:.120})")
            continue
        plan_id = item["plan_id"]
        pid, name, position = item.get("patient_id"), item.get("patient_name"), item.get("patient_position")
        method, source = item.get("method"), item.get("source")
        if not isinstance(method, str) or not isinstance(source, (str, type(None))) or \
                not isinstance(name, (str, type(None))):
            problems.append(f"plan {plan_id!r:.80}: method/source/patient_name of the wrong type")
            continue
        if pid is None:
            entry = mine.get(plan_id) if isinstance(plan_id, str) else None
            if entry is None:
                problems.append(f"plan {plan_id!r:.80}: the service gives no patient and this console "
                                "cannot read one from the plan files")
                continue
            pid, name = entry.patient_id, entry.patient_name
            position = position if position is not None else entry.patient_position
        try:
            out.append(PlanEntry(pid, name if name is not None else "", plan_id, method,
                                 source if source is not None else "(no plan files: simulation)", position))
        except (ConsoleConfigError, TypeError) as err:
            problems.append(f"plan {plan_id!r:.80}: {err}")
    if len(listed) > MAX_LISTED_PLANS:
        problems.append(f"the service lists {len(listed)} plans; only the first {MAX_LISTED_PLANS} are offered")
    if len({(p.patient_id, p.plan_id) for p in out}) != len(out):
        return (), problems + ["two listed plans share patient ID and plan ID: none offered"]
    return tuple(out), problems


def plan_entry_from_plan(plan_config, plan) -> PlanEntry:
    """The entry of a service ``[plan]`` (``plan_config``) and the plan it loads (``registration.plan.Plan``)."""
    source = plan_config.dicom if plan_config.dicom is not None else plan_config.ct
    patient = plan.patient
    position = plan.patient_position.value if plan.patient_position is not None else None
    if patient is not None and patient.patient_id.strip():
        pid, pname = patient.patient_id.strip()[:64], str(patient.patient_name)
    else:
        # Plan files carry no patient identity: the page says so and the therapist identifies the patient
        # by the clinic's own procedure; the entry is named after the CT file so it is never blank.
        pid, pname = f"(none in {source.name})"[:64], "not given by the plan files"
    from ..service.config import legacy_plan_id

    return PlanEntry(pid, pname, legacy_plan_id(plan_config), plan_config.method, str(source), position)
