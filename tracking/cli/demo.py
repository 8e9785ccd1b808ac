"""``spineguide demo``: a whole simulated fraction on the built-in phantom.

1. **Calibration.** The virtual room is built slightly off its drawings (source
   and panel positions, panel tilt): the demo images the built-in BB phantom at
   four couch positions, calibrates the geometry, and compares it with the
   room's truth.
2. **The fraction** (:func:`spineguide.tracking.sim.fraction.run_fraction`): the service, the
   imager simulator and the delivery simulator run as three processes over
   ZeroMQ on loopback, CURVE on end to end with a temporary key set (each
   process its own key and role; see docs/SECURITY.md). The service uses
   today's calibration; the imager renders the true room. Setup with a correction and verification, monitoring, a
   sudden 3 mm shift mid-fraction, HOLD, re-setup, resume.
   The gantry blocks imager B for 3 s and imager A for 2 s: monitoring goes on from the other view
   (docs/ONE_VIEW.md).
3. A summary table: residual setup error, beam-on time, holds and reasons,
   latency percentiles, the pairs judged on one view.
4. Per-level setup on a deformed spine (:mod:`.demo_levels`, docs/PER_LEVEL.md): the cervical phantom
   with C3, C4 and C5 each moved on its own, every level registered, the inter-level motion against the
   truth, and the discordance flag. Not in ``--quick``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spineguide.calibration.geometry import StereoGeometry, default_stereo_geometry
from spineguide.calibration.io import write_geometry

from ..room import DetectorModel, perturbed_geometry, render_bb_frames
from ..sim.fraction import QUICK_BLOCKS, run_fraction

__all__ = ["run_demo", "calibrate_virtual_room"]

#: The fraction's frames: the 41 cm panel read out 2x2 binned (512 pixels of 0.8 mm).
PANEL_PIXELS = 512
PIXEL_SPACING_MM = 0.8
#: Couch positions of the calibration exposures (room mm): centre and 50 mm along each axis.
CALIBRATION_SHIFTS_MM = ((0.0, 0.0, 0.0), (50.0, 0.0, 0.0), (0.0, 50.0, 0.0), (0.0, 0.0, 50.0))


def _cube_corners_mm() -> list[np.ndarray]:
    return [np.array([x, y, z]) for x in (-100.0, 100.0) for y in (-100.0, 100.0) for z in (-100.0, 100.0)]


def _max_error_px(a, b) -> float:
    return max(float(np.linalg.norm(a.project(p) - b.project(p))) for p in _cube_corners_mm())


def calibrate_virtual_room(nominal: StereoGeometry, true_room: StereoGeometry, seed: int):
    """Image the built-in BB phantom in the true room at four couch positions and calibrate from ``nominal``.

    Returns the :class:`spineguide.calibration.solve.CalibrationResult` and a table of rows
    comparing nominal and calibrated geometry with the truth (pixels, over the
    corners of a 200 mm cube at the isocentre).
    """
    from spineguide.calibration.phantom import default_phantom
    from spineguide.calibration.solve import CalibrationFrame, calibrate

    phantom = default_phantom()
    detector = DetectorModel(i0=20000.0, seed_supersampling=8)
    frames = []
    for k, shift in enumerate(CALIBRATION_SHIFTS_MM):
        bb = render_bb_frames(true_room, phantom.placed_mm(shift), phantom.diameters_mm, detector=detector,
                              seed=seed + k)
        frames += [CalibrationFrame(name, bb.frames[name], shift, 20000.0, source=f"couch shift {shift} mm")
                   for name in nominal.names]
    result = calibrate(phantom, frames, nominal, phantom_source="built-in 16-BB phantom")
    rows = []
    for sol in result.imagers:
        name = sol.geometry.name
        rows.append([
            name, f"{sol.rms_px:.3f}",
            f"{np.linalg.norm(sol.geometry.source_mm - true_room[name].source_mm):.2f}",
            f"{_max_error_px(nominal[name], true_room[name]):.2f}",
            f"{_max_error_px(sol.geometry, true_room[name]):.3f}",
        ])
    return result, rows


def run_demo(
    out_dir: Path | None = None,
    seed: int = 2026,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
) -> int:
    """Run the demo and print its tables; returns the exit code.

    Parameters
    ----------
    out_dir : Path, optional
        Keep the geometry files, service config, session record and logs here
        (default: a temporary folder).
    seed : int
        Seeds the room's construction errors, the patient's setup error and all noise.
    progress : callable, optional
        Receives one line per slow step.
    quick : bool
        A short fraction with test-pattern frames (for tests); the calibration is the same.
    """
    from .args import print_table

    say = progress or (lambda message: None)
    t_start = time.monotonic()
    nominal = default_stereo_geometry(PANEL_PIXELS, PIXEL_SPACING_MM)
    rng = np.random.default_rng(seed)
    # The room as built differs from its drawings; only calibration finds out how.
    true_room = perturbed_geometry(nominal, rng, source_mm=15.0, panel_mm=5.0, panel_deg=1.0)
    with tempfile.TemporaryDirectory(prefix="spineguide-demo-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)

        say("calibrating the imaging geometry: BB phantom at 4 couch positions")
        t0 = time.monotonic()
        result, rows = calibrate_virtual_room(nominal, true_room, seed)
        calibrated_path = write_geometry(result.geometry, work / "calibrated-geometry.json")
        true_path = write_geometry(true_room, work / "true-room-geometry.json")
        print("\nGeometry calibration (16 tungsten BBs, 4 couch positions)")
        print_table(["imager", "fit RMS px", "source error mm", "nominal geometry error px",
                     "calibrated error px"], rows)
        iso = result.isocentre
        print(f"isocentre check {iso.discrepancy_mm:.3f} mm (limit {iso.limit_mm} mm), "
              f"{'FLAGGED' if iso.flagged else 'ok'}; {time.monotonic() - t0:.1f} s. "
              "Errors: worst over the corners of a 200 mm cube at the isocentre.")

        method = "pattern" if quick else "fiducial"
        say(f"running the fraction: service, imager simulator and delivery simulator ({method} frames)")
        summary = run_fraction(
            out_dir=work / "fraction", seed=seed, method=method, progress=say,
            service_geometry=calibrated_path, true_geometry=true_path,
            **({"duration_s": 10.0, "shift_at_s": 5.0, "blocks": QUICK_BLOCKS} if quick else {}),
        )
        print("\nSimulated fraction (gold fiducials, thoracolumbar phantom; 3 mm shift mid-fraction; the gantry "
              "blocks imager B for 3 s and imager A for 2 s: monitored on the other view)"
              if not quick else "\nSimulated fraction (test-pattern frames; 3 mm shift mid-fraction; imager B blocked "
              "for 1.5 s)")
        print_table(["", "value"], [list(r) for r in summary.rows()])
        if quick:
            print("\nPer-level setup on a deformed spine: skipped with --quick")
        else:
            from .demo_levels import DEFORMED_LEVELS, deformed_spine_levels

            say("per-level setup on a deformed spine: rendering the cervical phantom with "
                f"{', '.join(DEFORMED_LEVELS)} each moved on its own, registering every level")
            level_rows, inter_rows, flag = deformed_spine_levels(nominal, seed)
            print("\nPer-level setup on a deformed spine (cervical phantom; each vertebra moved on its own, up to "
                  "2 deg per joint; poses: room frame, tx ty tz mm | pitch roll yaw deg)")
            print_table(["level", "true pose", "measured pose", "error at ROI centre mm", "rotation error deg",
                         "status"], level_rows)
            print_table(["levels", "flexion/extension deg true / measured", "lateral bending", "axial rotation"],
                        inter_rows)
            print(flag)
        if out_dir is not None:
            print(f"files: {work}")
    print(f"\ndemo finished in {time.monotonic() - t_start:.1f} s")
    return 0
