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

from .room import DetectorModel, KVSimulator, random_setup_pose, thoracolumbar_phantom

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
        Smaller panels (256 px) for tests.
    """
    from .cli import print_table

    say = progress or (lambda message: None)
    t_start = time.monotonic()
    panel = 256 if quick else DEFAULT_PANEL_PIXELS
    geometry = default_stereo_geometry(panel, DEFAULT_PIXEL_SPACING_MM * DEFAULT_PANEL_PIXELS / panel)
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

        rng = np.random.default_rng(seed)
        true_pose = random_setup_pose(rng, 10.0, 3.0)
        say("rendering a stereo kV pair of the patient at its (hidden) setup error")
        t0 = time.monotonic()
        simulator = KVSimulator(phantom, geometry, detector=DetectorModel(i0=20000.0))
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

    print(f"\ndemo finished in {time.monotonic() - t_start:.1f} s")
    return 0
