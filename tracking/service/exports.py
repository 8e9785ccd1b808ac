"""DICOM exports of the service: a Spatial Registration object for every approved setup.

One object per approved setup: a setup correction is reported once per
proposal (``pair_id``), and a second report of the same ``pair_id`` (a
repeat) writes nothing and is recorded as ``export_skipped``. All objects of
one session share one series (numbered by
:func:`spineguide.registration.dicom_export.series_number_for`, kind 0) and
one treatment-day Frame of Reference UID, with increasing instance numbers.

Runs beside the loop, never in its way: an export is done on its own thread,
and a failure is logged and recorded (``export_failed``), never turned into a
beam decision (the correction has been sent already; the export is the
record of it for the patient's chart).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydicom.uid import generate_uid

import time

from spineguide.registration.dicom_export import SeriesInfo, save, series_number_for, spatial_registration
from spineguide.registration.pose import Pose

from ..errors import TrackingError
from .config import PlanConfig
from .record import SessionRecord

__all__ = ["SetupExporter"]

log = logging.getLogger(__name__)


class SetupExporter:
    """Writes ``SRO_<pair>.dcm`` into a folder for each approved setup.

    The treatment plan is loaded once, on the first export. The session's
    treatment-day patient frame gets one Frame of Reference UID for the life
    of the exporter (one treatment session), and its objects one series. ``export`` may be called from any thread; the work
    happens on a short-lived thread of its own.
    """

    def __init__(self, plan, out_dir: Path, record: SessionRecord, archive: str | None = None) -> None:
        self._archive = None
        if archive is not None:
            from .dicom_net import parse_archive

            self._archive = parse_archive(archive)
        # A PlanConfig, or a callable giving the loaded catalogue plan (the service's: the plan of this fraction).
        self._plan_config = plan
        self._out = Path(out_dir)
        self._record = record
        self._plans: dict = {}
        self._lock = threading.Lock()
        self.room_frame_of_reference_uid = generate_uid()
        self.series = SeriesInfo.new(series_number_for(time.time(), 0), "spineguide setup registrations")
        self._threads: list[threading.Thread] = []
        self._exported: set[int] = set()
        self._instances = 0
        self._claim = threading.Lock()

    def export(self, pair_id: int, pose: Pose, approved_unix_s: float, operator: str = "") -> None:
        """Start writing the Spatial Registration for the setup measured on ``pair_id`` at ``pose`` (once per pair)."""
        with self._claim:
            if pair_id in self._exported:
                log.info("pair %d: setup already exported; repeat ignored", pair_id)
                self._record.write("export_skipped", t_unix_s=approved_unix_s, pair_id=pair_id,
                                   kind="spatial_registration", reason="already exported for this pair")
                return
            self._exported.add(pair_id)
            self._instances += 1
            instance = self._instances
        plan = self._plan_config
        if callable(plan):
            entry = plan()  # the plan loaded now (called under the engine lock, so it is this setup's plan)
            plan = None if entry is None else entry.plan
        t = threading.Thread(target=self._write, args=(pair_id, pose, approved_unix_s, operator, instance, plan),
                             name=f"sro-export-{pair_id}", daemon=True)
        self._threads.append(t)
        t.start()

    def join(self, timeout_s: float = 10.0) -> None:
        """Wait for exports in progress (service shutdown, tests)."""
        for t in self._threads:
            t.join(timeout_s)

    def _write(self, pair_id: int, pose: Pose, approved_unix_s: float, operator: str, instance: int,
               plan_config: PlanConfig | None) -> None:
        from ..errors import TrackingError
        from .plan import load_treatment_plan

        try:
            with self._lock:
                if plan_config is None:
                    raise TrackingError("no plan is loaded")
                key = id(plan_config)
                if key not in self._plans:
                    self._plans = {key: (plan_config, load_treatment_plan(plan_config))}
                treatment = self._plans[key][1]
                ds = spatial_registration(treatment, pose, room_frame_of_reference_uid=self.room_frame_of_reference_uid,
                                          approved_unix_s=approved_unix_s, operator=operator, series=self.series,
                                          instance_number=instance)
                self._out.mkdir(parents=True, exist_ok=True)
                path = self._out / f"SRO_pair{pair_id:06d}.dcm"
                save(ds, path)
            self._record.write("export", t_unix_s=approved_unix_s, pair_id=pair_id, kind="spatial_registration",
                               path=str(path), sop_instance_uid=str(ds.SOPInstanceUID), operator=operator)
            log.info("pair %d: approved setup exported to %s", pair_id, path)
            if self._archive is not None:
                from .dicom_net import send_to_archive

                send_to_archive([path], self._archive)
                self._record.write("export_sent", t_unix_s=approved_unix_s, pair_id=pair_id,
                                   archive=self._archive.describe(), sop_instance_uid=str(ds.SOPInstanceUID))
        except (TrackingError, OSError, ValueError, AttributeError) as err:  # DicomNetworkError is a TrackingError
            log.error("pair %d: setup export failed: %s", pair_id, err)
            self._record.write("export_failed", t_unix_s=approved_unix_s, pair_id=pair_id,
                               kind="spatial_registration", error=f"{type(err).__name__}: {err}")
