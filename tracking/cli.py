"""The ``spineguide`` command line: parse, build configuration, call the library, print.

Every subcommand exits 0 on success and non-zero with a one-line reason on
failure (``spineguide: error: <what went wrong>``). Library code logs through
:mod:`logging`; only this module prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from calibration.errors import CalibrationError
from registration.errors import RegistrationError

from .errors import TrackingError

__all__ = ["main", "build_parser"]

log = logging.getLogger("spineguide")


class CliError(Exception):
    """A user error on the command line (bad value, missing file)."""


# ----------------------------------------------------------------- value parsers
def parse_triplet_mm(text: str, what: str = "value") -> tuple[float, float, float]:
    """``"X,Y,Z"`` -> three finite floats (mm)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise CliError(f"{what} must be three comma-separated numbers X,Y,Z, got {text!r}")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise CliError(f"{what} must be three comma-separated numbers X,Y,Z, got {text!r}") from None
    if not all(abs(v) < float("inf") for v in values):
        raise CliError(f"{what} must be finite, got {text!r}")
    return values  # type: ignore[return-value]


def parse_six(text: str, what: str = "--pose") -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``"TX,TY,TZ,PITCH,ROLL,YAW"`` (mm, degrees) -> ``(translation_mm, rotation_deg)``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 6:
        raise CliError(f"{what} must be six comma-separated numbers TX,TY,TZ,PITCH,ROLL,YAW (mm, deg), got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CliError(f"{what} must be six numbers TX,TY,TZ,PITCH,ROLL,YAW (mm, deg), got {text!r}") from None
    return (values[0], values[1], values[2]), (values[3], values[4], values[5])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out=None) -> None:
    """Print a plain aligned text table."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), file=out)
    print(line, file=out)
    for row in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=out)


# ------------------------------------------------------------------ subcommands
def _cmd_drr(args: argparse.Namespace) -> int:
    from calibration.io import read_geometry
    from registration.drr import write_drr_images
    from registration.pose import Pose
    from registration.volume import read_ct

    geometry = read_geometry(args.geometry)
    ct = read_ct(args.ct, patient_position=args.patient_position)
    iso = parse_triplet_mm(args.isocenter, "--isocenter")
    pose = Pose.identity() if args.pose is None else Pose.from_six(*parse_six(args.pose))
    names = None if not args.imager else list(args.imager)
    for name in names or []:
        geometry[name]  # raises KeyError naming the imagers
    t0 = time.monotonic()
    written = write_drr_images(ct, geometry, iso, args.out, pose=pose, imagers=names)
    elapsed_s = time.monotonic() - t0
    rows = []
    for name, path in written.items():
        im = geometry[name]
        rows.append([name, f"{im.rows}x{im.cols}", str(path)])
    print(f"DRRs of {args.ct} at pose {pose.translation_mm.tolist()} mm, {pose.rotation_deg.round(6).tolist()} deg "
          f"(isocentre LPS {list(iso)} mm) in {elapsed_s:.2f} s")
    print_table(["imager", "pixels", "file"], rows)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from calibration.geometry import DEFAULT_PANEL_PIXELS, DEFAULT_PIXEL_SPACING_MM, default_stereo_geometry

    from .room import DetectorModel, write_simulation

    # A smaller panel keeps the default room's field of view (41 cm) with larger pixels.
    spacing_mm = DEFAULT_PIXEL_SPACING_MM * DEFAULT_PANEL_PIXELS / args.panel_pixels
    geometry = default_stereo_geometry(args.panel_pixels, spacing_mm)
    progress = None if args.quiet else (lambda done, total: _progress(f"pose {done}/{total} rendered"))
    summary = write_simulation(
        args.out,
        args.phantom,
        args.poses,
        seed=args.seed,
        geometry=geometry,
        detector=DetectorModel(i0=args.i0),
        progress=progress,
    )
    print(
        f"simulated {summary.n_poses} stereo pair(s) of the {summary.phantom} phantom in {summary.elapsed_s:.1f} s "
        f"-> {summary.out_dir} (isocentre LPS {[round(x, 2) for x in summary.isocentre_lps_mm]} mm)"
    )
    print_table(["file"], [[str(p)] for p in summary.files])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, seed=args.seed, progress=_progress, quick=args.quick)


def _cmd_register(args: argparse.Namespace) -> int:
    import json

    from calibration.io import read_geometry

    from .frames import parse_image_args, read_stereo_frames

    t0 = time.monotonic()
    geometry = read_geometry(args.geometry)
    plan = _load_plan(args)
    frames = read_stereo_frames(parse_image_args(args.image or []), geometry, args.i0)
    pixels = {name: f.pixels for name, f in frames.items()}
    if args.method == "fiducial":
        report = _register_fiducial(args, geometry, plan, pixels)
    else:
        report = _register_anatomy(args, geometry, plan, pixels)
    report["plan"] = {"ct": plan.ct.source, "isocentre_lps_mm": [float(v) for v in plan.isocentre_lps_mm],
                      "patient_position": plan.patient_position.value}
    report["elapsed_s"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_registration(report)
    # 0: a trusted result; 3: a result was computed but is not to be trusted (quality.ok false).
    return 0 if report["quality"]["ok"] else 3


def _load_plan(args: argparse.Namespace):
    """The plan from a DICOM folder (``--plan``) or from ``--ct`` + ``--isocenter`` (+ ``--fiducials``)."""
    from registration.plan import load_dicom_plan, load_plan_files

    iso = parse_triplet_mm(args.isocenter, "--isocenter") if args.isocenter is not None else None
    if args.plan is not None:
        if args.ct is not None:
            raise CliError("give either --plan DIR (DICOM) or --ct FILE, not both")
        return load_dicom_plan(args.plan, isocentre_lps_mm=iso, target_roi=args.roi_name)
    if args.ct is None or iso is None:
        raise CliError("give --plan DIR (DICOM CT, RTSTRUCT, RTPLAN) or --ct FILE with --isocenter X,Y,Z")
    return load_plan_files(args.ct, iso, fiducials_path=args.fiducials, patient_position=args.patient_position)


def _register_fiducial(args, geometry, plan, pixels) -> dict:
    from registration.ct_seeds import find_ct_seeds
    from registration.io import FiducialSet, read_fiducials

    from .fiducials import localise_fiducials

    ct = plan.ct
    if args.fiducials is not None:
        planned = read_fiducials(args.fiducials)
    elif plan.fiducials is not None:
        planned = plan.fiducials
    else:
        candidates = find_ct_seeds(ct)
        listing = "; ".join(
            f"C{i + 1} at LPS {_fmt_vec(c.centre_lps_mm, 1)} mm ({c.volume_mm3:.0f} mm3, peak {c.peak_hu:.0f} HU)"
            for i, c in enumerate(candidates)
        )
        if not args.use_ct_seeds:
            raise CliError(
                f"no --fiducials given; {len(candidates)} seed candidate(s) found in the CT: {listing or 'none'}. "
                "Confirm them with --use-ct-seeds or give a fiducials/1 file"
            )
        if not candidates:
            raise CliError("no seed candidates found in the CT; give a fiducials/1 file")
        planned = FiducialSet(tuple(f"C{i + 1}" for i in range(len(candidates))),
                              [c.centre_lps_mm for c in candidates], f"{ct.source} (automatic)")
    planned_room = planned.to_room(plan.isocentre_lps_mm, plan.patient_position)
    result = localise_fiducials(pixels, geometry, planned_room, planned.names, i0=args.i0)
    t, r = result.correction.six()
    pt, pr = result.pose.six()
    return {
        "method": "fiducial",
        "correction": {"translation_mm": t.tolist(), "rotation_deg": r.tolist()},
        "patient_pose": {"translation_mm": pt.tolist(), "rotation_deg": pr.tolist()},
        "quality": result.quality_json(),
        "timing_ms": {"detection": result.detection_ms, "matching": result.matching_ms, "total": result.total_ms},
    }


def _register_anatomy(args, geometry, plan, pixels) -> dict:
    from registration.anatomy import RegionOfInterest, register_anatomy

    ct, iso = plan.ct, plan.isocentre_lps_mm
    given = [x for x in (args.roi, args.roi_box, args.roi_name) if x is not None]
    if len(given) > 1:
        raise CliError("--method anatomy takes one of --roi MASK_FILE, --roi-box DX,DY,DZ or --roi-name NAME")
    if args.roi is not None:
        labels = _read_roi_mask(args.roi, ct)
        if args.roi_label is not None:
            roi = RegionOfInterest.from_labels(ct, labels, args.roi_label, neighbours=args.roi_neighbours)
        else:
            roi = RegionOfInterest.from_mask(labels, description=str(args.roi))
    elif args.roi_box is not None:
        roi = RegionOfInterest.from_box(ct, iso, parse_triplet_mm(args.roi_box, "--roi-box"))
    elif plan.target_roi is not None:
        roi = RegionOfInterest.from_mask(plan.target_mask(), description=f"RTSTRUCT ROI '{plan.target_roi}'")
    else:
        raise CliError("--method anatomy needs an ROI: --roi MASK_FILE, --roi-box DX,DY,DZ, or a DICOM plan "
                       "with a target ROI (--plan DIR [--roi-name NAME])")
    result = register_anatomy(ct, iso, geometry, pixels, roi, i0=args.i0)
    report = result.to_json()
    report["patient_pose"] = report.pop("pose")
    return report


def _read_roi_mask(path: Path, ct):
    """A label/mask image on the planning-CT grid, as a ``[k, j, i]`` integer array."""
    import numpy as np

    from registration.plan import read_mask_volume

    labels, _ = read_mask_volume(path, ct)
    if not np.issubdtype(labels.dtype, np.integer):
        raise CliError(f"{path}: ROI mask must hold integer labels, got {labels.dtype}")
    return labels


def _print_registration(report: dict) -> None:
    corr = report["correction"]
    quality = report["quality"]
    print(f"method: {report['method']}   quality: {'OK' if quality['ok'] else 'NOT OK'}   "
          f"elapsed {report['elapsed_s'] * 1000:.0f} ms")
    print_table(
        ["couch correction", "X lat", "Y long", "Z vert"],
        [["translation mm", *(f"{v:+.2f}" for v in corr["translation_mm"])],
         ["rotation deg (pitch, roll, yaw)", *(f"{v:+.2f}" for v in corr["rotation_deg"])]],
    )
    if "fre_mm" in quality:
        print(f"fiducial registration error {quality['fre_mm']:.3f} mm; flags: {', '.join(quality['flags']) or 'none'}")
        rows = []
        for seed in quality["seeds"]:
            rows.append([
                seed["name"], "yes" if seed["found"] else "NO",
                "-" if seed["ray_distance_mm"] is None else f"{seed['ray_distance_mm']:.3f}",
                "-" if seed["residual_mm"] is None else f"{seed['residual_mm']:.3f}",
                "MIGRATED" if seed["migrated"] else "",
            ])
        print_table(["seed", "found", "ray distance mm", "residual mm", "flag"], rows)
    else:
        for key, value in quality.items():
            print(f"  {key}: {value}")


def _parse_calibration_images(values: Sequence[str]) -> list[tuple[str, Path, tuple[float, float, float]]]:
    """``NAME=FILE[@DX,DY,DZ]`` -> (imager, file, couch shift mm)."""
    out = []
    for text in values:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise CliError(f"--image must be NAME=FILE or NAME=FILE@DX,DY,DZ (couch shift, mm), got {text!r}")
        file, at, shift = rest.partition("@")
        shift_mm = parse_triplet_mm(shift, f"couch shift in {text!r}") if at else (0.0, 0.0, 0.0)
        out.append((name, Path(file), shift_mm))
    return out


def _calibration_frames(values: Sequence[str], geometry, i0: float | None):
    from calibration.solve import CalibrationFrame

    from .frames import read_frame

    frames = []
    for name, path, shift_mm in _parse_calibration_images(values):
        frame = read_frame(path, geometry[name], i0)
        frames.append(CalibrationFrame(name, frame.pixels, shift_mm, i0, source=str(path)))
    return frames


def _load_phantom(text: str):
    from calibration.phantom import default_phantom, read_phantom

    return default_phantom() if text == "default" else read_phantom(text)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from calibration.geometry import default_stereo_geometry
    from calibration.io import read_geometry, write_geometry
    from calibration.report import write_calibration_report
    from calibration.solve import calibrate

    nominal = read_geometry(args.nominal) if args.nominal else default_stereo_geometry()
    phantom = _load_phantom(args.phantom)
    frames = _calibration_frames(args.image, nominal, args.i0)
    t0 = time.monotonic()
    result = calibrate(phantom, frames, nominal, free_phantom_rotation=args.free_phantom_rotation,
                       phantom_source=str(args.phantom))
    elapsed_s = time.monotonic() - t0
    write_geometry(result.geometry, args.out)
    rows = []
    for sol in result.imagers:
        rows.append([sol.geometry.name, sol.n_observations, f"{sol.rms_px:.3f}", f"{sol.max_px:.3f}",
                     _fmt_vec(sol.geometry.source_mm, 1), f"{sol.geometry.source_to_detector_mm:.1f}"])
    print(f"calibrated {len(frames)} frame(s) of phantom {args.phantom} in {elapsed_s:.1f} s -> {args.out}")
    print_table(["imager", "BB views", "RMS px", "max px", "source (room mm)", "source-panel mm"], rows)
    iso = result.isocentre
    flag = "FLAGGED" if iso.flagged else "ok"
    print(f"isocentre check: centre BB at {_fmt_vec(iso.centre_bb_room_mm, 3)} mm, "
          f"{iso.discrepancy_mm:.3f} mm from where it should be (limit {iso.limit_mm} mm): {flag}")
    if args.report:
        report = write_calibration_report(result, args.report, frames)
        print(f"report: {report}")
    return 0


def _cmd_qa(args: argparse.Namespace) -> int:
    from calibration.io import read_geometry
    from calibration.qa import QAStatus, QATolerances, append_history, read_history, run_qa, trend
    from calibration.report import write_trend_plot

    history = Path(args.history)
    if args.trend:
        records = read_history(history)
        summary = trend(records)
        print(summary.table)
        print(f"centre-BB offset drift: {summary.offset_drift_mm_per_30_days:.3f} mm per 30 days")
        plot = write_trend_plot(records, args.plot or history.with_suffix(".png"))
        print(f"plot: {plot}")
        return 0
    if not (args.geometry and args.phantom and args.image):
        raise CliError("qa needs --geometry, --phantom and --image A=FILE --image B=FILE (or --trend)")
    geometry = read_geometry(args.geometry)
    phantom = _load_phantom(args.phantom)
    frames = _calibration_frames(args.image, geometry, args.i0)
    tolerances = QATolerances(offset_action_mm=args.action_mm, offset_tolerance_mm=args.tolerance_mm)
    result = run_qa(geometry, phantom, frames, tolerances=tolerances)
    append_history(history, result)
    rows = [[q.imager, q.n_found, f"{q.rms_px:.3f}", f"{q.rms_mm:.3f}", f"{q.max_mm:.3f}", q.status.value]
            for q in result.imagers]
    print_table(["imager", "BBs", "RMS px", "RMS mm (iso)", "max mm (iso)", "status"], rows)
    print(f"centre BB offset {_fmt_vec(result.centre_offset_mm, 3)} mm = {result.centre_offset_distance_mm:.3f} mm "
          f"(action {tolerances.offset_action_mm} mm, tolerance {tolerances.offset_tolerance_mm} mm)")
    print(f"QA {result.status.value}; recorded in {history}")
    for reason in result.reasons:
        print(f"  - {reason}")
    return 0 if result.status is QAStatus.PASS else 1


def _fmt_vec(values, digits: int) -> str:
    return "[" + ", ".join(f"{float(v):.{digits}f}" for v in values) + "]"


def _progress(message: str) -> None:
    print(f"  .. {message}", flush=True)


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spineguide",
        description="Real-time stereo kV image guidance for spine radiosurgery. Lengths in mm, angles in degrees.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run a simulated fraction on the built-in phantom")
    p.add_argument("--out", type=Path, default=None, help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=2026, help="random seed of the simulated patient (default 2026)")
    p.add_argument("--quick", action="store_true", help="smaller panels and fewer pairs (for tests)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("drr", help="write DRRs (line-integral images) of a CT for each imager")
    p.add_argument("--ct", required=True, help="planning CT: DICOM folder or .mha/.nrrd/.nii")
    p.add_argument("--geometry", required=True, type=Path, help="kv-geometry/1 JSON file")
    p.add_argument("--isocenter", required=True, help="plan isocentre X,Y,Z in planning-CT LPS mm")
    p.add_argument("--pose", default=None, help="patient pose TX,TY,TZ,PITCH,ROLL,YAW (mm, deg; CONVENTIONS)")
    p.add_argument("--imager", action="append", default=None, help="imager name (repeatable; default all)")
    p.add_argument("--patient-position", default=None, help="HFS/FFS/HFP/FFP if the CT file does not record it")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=_cmd_drr)

    p = sub.add_parser("register", help="6-DoF couch correction from a stereo pair (fiducials or anatomy)")
    p.add_argument("--method", choices=["fiducial", "anatomy"], required=True)
    p.add_argument("--plan", type=Path, default=None, help="DICOM plan folder: CT series, RTSTRUCT, RTPLAN")
    p.add_argument("--ct", default=None, help="planning CT: DICOM CT folder or .mha/.nrrd/.nii (instead of --plan)")
    p.add_argument("--isocenter", default=None,
                   help="plan isocentre X,Y,Z in planning-CT LPS mm (required with --ct; overrides the RTPLAN's)")
    p.add_argument("--geometry", required=True, type=Path, help="kv-geometry/1 file")
    p.add_argument("--image", action="append", required=True, help="NAME=FILE, one per imager")
    p.add_argument("--i0", type=float, default=None, help="unattenuated signal (default: estimated per frame)")
    p.add_argument("--patient-position", default=None, help="HFS/FFS/HFP/FFP if the CT file does not record it")
    p.add_argument("--fiducials", type=Path, default=None, help="planned seeds, fiducials/1 (planning-CT LPS mm)")
    p.add_argument("--use-ct-seeds", action="store_true", help="use the seeds found automatically in the CT")
    p.add_argument("--roi", type=Path, default=None, help="anatomy: ROI label mask on the CT grid")
    p.add_argument("--roi-label", type=int, default=None, help="anatomy: label value of the target in --roi")
    p.add_argument("--roi-name", default=None, help="anatomy with --plan: RTSTRUCT ROI name (default: the target)")
    p.add_argument("--roi-neighbours", type=int, default=0, help="anatomy: include N levels either side of --roi-label")
    p.add_argument("--roi-box", default=None, help="anatomy: box half-sizes DX,DY,DZ (LPS mm) around the isocentre")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("calibrate", help="calibrate the imaging geometry from BB-phantom frames")
    p.add_argument("--phantom", required=True, help="bb-phantom/1 file, or 'default' for the built-in phantom")
    p.add_argument("--image", action="append", required=True,
                   help="NAME=FILE or NAME=FILE@DX,DY,DZ (couch shift of that exposure, room mm); repeatable")
    p.add_argument("--nominal", type=Path, default=None, help="nominal geometry to start from (default: built-in room)")
    p.add_argument("--i0", type=float, default=None, help="unattenuated signal (default: estimated per frame)")
    p.add_argument("--free-phantom-rotation", action="store_true", help="fit the phantom's rotation too")
    p.add_argument("--out", required=True, type=Path, help="kv-geometry/1 file to write")
    p.add_argument("--report", type=Path, default=None, help="folder for the HTML report with figures")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("qa", help="daily geometry QA against the stored calibration, or --trend")
    p.add_argument("--geometry", type=Path, help="stored kv-geometry/1 calibration")
    p.add_argument("--phantom", help="bb-phantom/1 file, or 'default'")
    p.add_argument("--image", action="append", default=None, help="NAME=FILE (repeatable)")
    p.add_argument("--i0", type=float, default=None, help="unattenuated signal (default: estimated)")
    p.add_argument("--history", default="qa-history.jsonl", help="QA history file (JSON lines), appended")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="centre-BB offset tolerance (TG-142 SRS: 1 mm)")
    p.add_argument("--action-mm", type=float, default=0.5, help="centre-BB offset action level (default 0.5 mm)")
    p.add_argument("--trend", action="store_true", help="show the history as a table and a plot")
    p.add_argument("--plot", type=Path, default=None, help="trend plot PNG (default: beside the history)")
    p.set_defaults(func=_cmd_qa)

    p = sub.add_parser("simulate", help="write a virtual-room data set: CT, geometry, frames, fiducials, truth")
    p.add_argument("--phantom", choices=["thoracolumbar", "cervical"], required=True)
    p.add_argument("--poses", type=_positive_int, default=1, help="number of stereo pairs (random setup errors)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--i0", type=float, default=20000.0, help="unattenuated detector signal (default 20000)")
    p.add_argument("--panel-pixels", type=_positive_int, default=1024, help="panel rows = cols (default 1024)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_simulate)
    from . import _cli_console, _cli_dicom, _cli_service

    _cli_dicom.add_commands(sub)
    _cli_service.add_commands(sub)
    _cli_console.add_commands(sub)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spineguide`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (CliError, CalibrationError, RegistrationError, TrackingError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"spineguide: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spineguide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
