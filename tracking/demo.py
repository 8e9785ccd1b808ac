"""``spineguide demo``: a simulated session on the built-in thoracolumbar phantom.

Runs what the product does, end to end, on the virtual room and prints what
it did as tables: the room, the patient's (hidden) setup error, DRRs of the
planning CT, and the registrations against the simulated kV frames, each
compared with the ground truth.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibration.geometry import DEFAULT_PANEL_PIXELS, DEFAULT_PIXEL_SPACING_MM, default_stereo_geometry
from registration.drr import AttenuationVolume, compute_drr
from registration.pose import Pose

from .fiducials import localise_fiducials
from .room import DetectorModel, KVSimulator, perturbed_geometry, random_setup_pose, render_bb_frames, thoracolumbar_phantom

__all__ = ["run_demo"]


def _fmt3(values, digits: int = 2) -> str:
    return "[" + ", ".join(f"{v:+.{digits}f}" for v in values) + "]"


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def run_demo(
    out_dir: Path | None = None,
    seed: int = 2026,
    progress: Callable[[str], None] | None = None,
    quick: bool = False,
) -> int:
    """Run the demo and print its tables; returns the exit code (0).

    Parameters
    ----------
    out_dir : Path, optional
        Where to keep files; a temporary folder otherwise.
    seed : int
        Seeds the simulated patient's setup error and the image noise.
    progress : callable, optional
        Receives one line per slow step.
    quick : bool
        Smaller panels (512 px of 0.8 mm) and a coarser phantom, for tests.
    """
    from .cli import print_table

    say = progress or (lambda message: None)
    t_start = time.monotonic()
    panel = 512 if quick else DEFAULT_PANEL_PIXELS
    nominal = default_stereo_geometry(panel, DEFAULT_PIXEL_SPACING_MM * DEFAULT_PANEL_PIXELS / panel)
    rng = np.random.default_rng(seed)
    # The room as built differs from the drawings; only calibration finds out how.
    true_room = perturbed_geometry(nominal, rng, source_mm=15.0, panel_mm=5.0, panel_deg=1.0)
    geometry = _calibrate(nominal, true_room, seed, say, print_table, quick)
    with tempfile.TemporaryDirectory(prefix="spineguide-demo-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)

        say("building the thoracolumbar phantom (truth CT, planning CT, 3 gold seeds)")
        t0 = time.monotonic()
        phantom = thoracolumbar_phantom(seed=seed) if not quick else thoracolumbar_phantom(
            truth_spacing_mm=2.0, planning_spacing_mm=(2.0, 2.0, 3.0), seed=seed
        )
        build_s = time.monotonic() - t0

        print("\nRoom and plan")
        rows = [
            [im.name, _fmt3(im.source_mm, 0), f"{im.rows}x{im.cols}", f"{im.pixel_spacing_mm[0]:.2f}",
             f"{im.magnification:.3f}"]
            for im in geometry.imagers
        ]
        print_table(["imager", "source (room mm)", "pixels", "pitch mm", "magnification"], rows)
        ct = phantom.planning_ct
        print(
            f"planning CT {ct.shape_ijk[0]}x{ct.shape_ijk[1]}x{ct.shape_ijk[2]} voxels of "
            f"{_fmt3(ct.spacing_mm)} mm, {ct.patient_position.value}, isocentre LPS {_fmt3(phantom.isocentre_lps_mm)} mm "
            f"in {phantom.target_name}; {len(phantom.seeds)} gold seeds (built in {build_s:.1f} s)"
        )

        true_pose = random_setup_pose(rng, 10.0, 3.0)
        say("rendering a stereo kV pair of the patient at its (hidden) setup error")
        t0 = time.monotonic()
        simulator = KVSimulator(phantom, true_room, detector=DetectorModel(i0=20000.0))
        frames = simulator.render(true_pose, seed=seed)
        render_s = time.monotonic() - t0

        say("computing DRRs of the planning CT at the planned and at the true pose")
        volume = AttenuationVolume.from_ct(ct, phantom.isocentre_lps_mm)
        drr_rows = []
        for imager in geometry.imagers:
            log_frame = -np.log(np.maximum(frames.frames[imager.name].astype(np.float64), 1.0) / frames.truth.i0)
            t0 = time.monotonic()
            drr_planned = compute_drr(volume, imager, Pose.identity())
            drr_ms = 1000 * (time.monotonic() - t0)
            drr_true = compute_drr(volume, imager, true_pose)
            drr_rows.append(
                [imager.name, f"{drr_ms:.0f}", f"{_ncc(log_frame, drr_planned):.3f}", f"{_ncc(log_frame, drr_true):.3f}"]
            )

        print("\nSimulated patient")
        t, r = true_pose.six()
        corr_t, corr_r = true_pose.to_correction().six()
        print_table(
            ["", "translation mm [X, Y, Z]", "rotation deg [pitch, roll, yaw]"],
            [["true patient pose", _fmt3(t), _fmt3(r)], ["couch correction needed", _fmt3(corr_t), _fmt3(corr_r)]],
        )
        print(f"stereo pair rendered in {render_s:.2f} s (i0 = {frames.truth.i0:g}, Poisson noise, detector blur)")

        print("\nDRR vs kV frame (normalised cross-correlation of line integrals)")
        print_table(["imager", "DRR ms", "NCC at planned pose", "NCC at true pose"], drr_rows)

        say("fiducial setup: detecting the seeds, triangulating, fitting to the plan")
        planned_room = phantom.seeds_room_mm()
        names = [seed_.name for seed_ in phantom.seeds]
        result = localise_fiducials(frames.frames, geometry, planned_room, names, i0=None)
        _print_setup("Fiducial setup (calibrated geometry, i0 estimated)", result.correction, true_pose, print_table)
        print(f"FRE {result.fre_mm:.3f} mm, quality {'OK' if result.ok else 'NOT OK'}, "
              f"frames in -> correction out {result.total_ms:.1f} ms")

    print(f"\ndemo finished in {time.monotonic() - t_start:.1f} s")
    return 0


def _print_setup(title: str, correction, true_pose: Pose, print_table) -> None:
    truth = true_pose.to_correction()
    t, r = correction.six()
    tt, tr = truth.six()
    print(f"\n{title}")
    print_table(
        ["couch correction", "translation mm [X, Y, Z]", "rotation deg [pitch, roll, yaw]"],
        [["measured", _fmt3(t), _fmt3(r)], ["truth", _fmt3(tt), _fmt3(tr)], ["error", _fmt3(t - tt), _fmt3(r - tr)]],
    )
    # Residual target error after applying the measured correction: where the isocentre ends up.
    residual = correction.matrix @ true_pose.matrix
    print(f"target error after applying it: {np.linalg.norm(residual[:3, 3]):.3f} mm")


def _calibrate(nominal, true_room, seed: int, say, print_table, quick: bool):
    """Calibrate the imaging geometry with the built-in BB phantom at four couch positions."""
    from calibration.phantom import default_phantom
    from calibration.solve import CalibrationFrame, calibrate

    say("calibrating the imaging geometry with the BB phantom (4 couch positions)")
    phantom = default_phantom()
    detector = DetectorModel(i0=20000.0, seed_supersampling=8)
    frames = []
    for k, shift in enumerate(((0.0, 0.0, 0.0), (50.0, 0.0, 0.0), (0.0, 50.0, 0.0), (0.0, 0.0, 50.0))):
        bb = render_bb_frames(true_room, phantom.placed_mm(shift), phantom.diameters_mm, detector=detector,
                              seed=seed + k)
        frames += [CalibrationFrame(name, bb.frames[name], shift, 20000.0, source=f"shift {shift}") for name in nominal.names]
    t0 = time.monotonic()
    result = calibrate(phantom, frames, nominal, phantom_source="built-in")
    elapsed_s = time.monotonic() - t0
    print("\nGeometry calibration (BB phantom, 16 tungsten BBs, 4 couch positions)")
    rows = []
    for sol in result.imagers:
        true_im = true_room[sol.geometry.name]
        nominal_err = max(float(np.max(np.linalg.norm(nominal[sol.geometry.name].project(p) - true_im.project(p))))
                          for p in _cube_corners())
        calib_err = max(float(np.max(np.linalg.norm(sol.geometry.project(p) - true_im.project(p)))) for p in _cube_corners())
        rows.append([sol.geometry.name, f"{sol.rms_px:.3f}", f"{np.linalg.norm(sol.geometry.source_mm - true_im.source_mm):.2f}",
                     f"{nominal_err:.2f}", f"{calib_err:.3f}"])
    print_table(["imager", "fit RMS px", "source error mm", "nominal geometry error px", "calibrated error px"], rows)
    print(f"isocentre check {result.isocentre.discrepancy_mm:.3f} mm (limit {result.isocentre.limit_mm} mm); "
          f"solved in {elapsed_s:.1f} s; errors are over the corners of a 200 mm cube at the isocentre")
    return result.geometry


def _cube_corners() -> list[np.ndarray]:
    return [np.array([x, y, z]) for x in (-100.0, 100.0) for y in (-100.0, 100.0) for z in (-100.0, 100.0)]
