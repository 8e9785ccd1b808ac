"""The ``spineguide`` command line: parse, build configuration, call the library, print.

Exit codes (README, docs/ROBUSTNESS.md):

- 0: success (``register``: a trusted result);
- 1: ``qa`` ran and reached its ACTION level (investigate; a geometry change beyond the noise, or the phantom
  set up too far off);
- 5: ``qa`` FAILED: out of tolerance (a QA that could not be done is recorded as FAIL in the history and
  exits 2);
- 2: nothing could be done: a bad argument or file, an error of the library;
  one line on stderr, ``spineguide: error: <what went wrong>``;
- 3: ``register`` computed a result that is not to be trusted (``quality.ok``
  false, a reason code in ``quality.reason``, printed);
- 4: internal error (a defect): one line, ``spineguide: internal error: ...``;
- 130: interrupted (Ctrl-C).

No traceback is printed unless ``-v``/``--verbose`` is given (before or after
the subcommand). Numbers on the command line may be negative without ``=``
(``--isocenter -3.27,10,5``). Library code logs through :mod:`logging`; only
the CLI modules print.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from spineguide.calibration.errors import CalibrationError
from spineguide.registration.errors import RegistrationError

from ..errors import TrackingError
from .args import (
    CliError,
    _positive_int,
    finite_float,
    i0_level,
    non_negative_float,
    non_negative_int,
    parse_six,
    parse_triplet_mm,
    port_number,
    positive_float,
    print_table,
)

__all__ = ["main", "build_parser", "parse_triplet_mm", "parse_six", "CliError", "RegisterRefusal",
           "EXIT_OK", "EXIT_QA_FAILED", "EXIT_QA_OUT_OF_TOLERANCE", "EXIT_ERROR", "EXIT_NOT_TRUSTED", "EXIT_INTERNAL", "EXIT_INTERRUPTED",
           "MAX_SEED_DISTANCE_MM", "AIR_HU", "finite_float", "positive_float", "non_negative_int", "port_number",
           "i0_level", "rejoin_negative_values"]

EXIT_OK = 0
EXIT_QA_FAILED = 1
EXIT_ERROR = 2
EXIT_NOT_TRUSTED = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130
EXIT_QA_OUT_OF_TOLERANCE = 5

#: Farthest a planned seed may sit from the plan isocentre, mm. Spine seeds sit in the treated or the
#: neighbouring vertebra (a few cm); a seed 10 cm away is a wrong file, a wrong isocentre or another patient.
MAX_SEED_DISTANCE_MM = 100.0
#: A CT or ROI with no voxel above this (HU) holds nothing but air: there is no anatomy to register.
AIR_HU = -900.0

log = logging.getLogger("spineguide")


class _UsageError(Exception):
    """argparse refused the command line (raised by :meth:`_Parser.error` instead of printing usage)."""


class RegisterRefusal(Enum):
    """Why ``register`` refuses to trust a computed correction (``quality.reason`` code; exit 3)."""

    ISOCENTRE_OUTSIDE_CT = "isocentre_outside_ct"
    SEED_OUTSIDE_CT = "seed_outside_ct"
    SEED_FAR_FROM_ISOCENTRE = "seed_far_from_isocentre"
    CORRECTION_LIMIT = "correction_limit"


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: RegisterRefusal
    detail: str


# ------------------------------------------------------------------ subcommands
def _cmd_drr(args: argparse.Namespace) -> int:
    from spineguide.calibration.io import read_geometry
    from spineguide.registration.ctfile import read_ct
    from spineguide.registration.pose import Pose

    iso = parse_triplet_mm(args.isocenter, "--isocenter")
    geometry = read_geometry(args.geometry)
    # Whole HU stay int16 (half the memory), read before the projector (numba) loads: docs/BENCHMARKS.md.
    ct = read_ct(args.ct, patient_position=args.patient_position, keep_integer_hu=True)
    from spineguide.registration.drr import write_drr_images

    if not ct.contains_lps_mm(iso)[0]:
        raise CliError(f"isocentre LPS {_fmt_vec(iso, 2)} mm lies outside the CT ({_ct_extent(ct)}): "
                       "its DRRs would show no anatomy")
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
    from spineguide.calibration.geometry import DEFAULT_PANEL_PIXELS, DEFAULT_PIXEL_SPACING_MM, default_stereo_geometry

    from ..room import DetectorModel, write_simulation

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


def _cmd_simulate_ct(args: argparse.Namespace) -> int:
    """Stereo validation cases with exact truth from any CT + vertebra label map (tracking.room.realct)."""
    import json

    from spineguide.calibration.io import read_geometry

    from ..errors import SimulationError
    from ..room.realct import build_set, imaging_from_options, read_labelled_ct
    from ..room.rooms import Room, room_geometry

    from ..room.deform import deform_from_options

    try:
        detector, chain, couch = imaging_from_options(args.chain, args.i0, args.spr, args.couch)
        deform = deform_from_options(args.deform_levels, args.deform_seed, args.deform_max_deg, args.deform_max_mm,
                                     args.deform_grid_mm)
    except SimulationError as err:
        raise CliError(str(err)) from err

    t0 = time.monotonic()
    labelled = read_labelled_ct(args.ct, args.labels, args.scheme, args.patient_position)
    geometries = {}
    for name in (n.strip() for n in args.rooms.split(",")):
        if name in {r.value for r in Room}:
            geometries[name] = room_geometry(name)
        else:  # a kv-geometry/1 file
            geometries[Path(name).stem] = read_geometry(name)
    progress = None if args.quiet else (
        lambda case, seconds: _progress(f"case {case.index}: {case.level} {case.room} {case.projector.value} "
                                        f"({seconds:.1f} s)"))
    built = build_set(args.out, labelled, geometries, [v.strip() for v in args.levels.split(",")],
                      [v.strip() for v in args.projectors.split(",")], args.cases, args.seed,
                      detector, args.beyond_ends_mm, 1, progress, chain=chain, couch=couch, deform=deform)
    manifest = {"schema": "realct-set/1", "source": {"ct": str(args.ct), "labels": str(args.labels)},
                "label_scheme_on_disk": args.scheme, **built, "command": " ".join(sys.argv),
                "elapsed_s": round(time.monotonic() - t0, 1)}
    (Path(args.out) / "set.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {built['cases']} case(s) to {args.out} in {manifest['elapsed_s']} s")
    return 0


def _add_deform_args(p: argparse.ArgumentParser) -> None:
    """``--deform-levels`` and its amplitudes (tracking.room.deform), shared with datasets/realct/build.py."""
    p.add_argument("--deform-levels", default=None,
                   help="deform the spine per level in every case: 'all' or comma-separated vertebrae (each moves "
                        "rigidly, the target keeps the case's pose; levels_truth.json per case)")
    p.add_argument("--deform-seed", type=non_negative_int, default=18, help="seed of the per-level deformations")
    p.add_argument("--deform-max-deg", type=non_negative_float, default=2.0,
                   help="largest rotation per intervertebral joint and axis, deg (default 2)")
    p.add_argument("--deform-max-mm", type=non_negative_float, default=0.5,
                   help="largest translation per joint and axis, mm (default 0.5)")
    p.add_argument("--deform-grid-mm", type=non_negative_float, default=1.0,
                   help="largest voxel size of each case's deformed CT (the planning grid refined to reach it), mm "
                        "(default 1)")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.console:
        from .console import run_console_demo

        return run_console_demo(port=args.port, out_dir=args.out, duration_s=args.duration)
    from .demo import run_demo

    return run_demo(out_dir=args.out, seed=args.seed, progress=_progress, quick=args.quick)


def _cmd_register(args: argparse.Namespace) -> int:
    import json

    from spineguide.calibration.io import read_geometry

    from ..frames import parse_image_args, read_stereo_frames

    t0 = time.monotonic()
    geometry = read_geometry(args.geometry)
    plan = _load_plan(args)
    frames = read_stereo_frames(parse_image_args(args.image or []), geometry, args.i0)
    pixels = {name: f.pixels for name, f in frames.items()}
    if args.method == "fiducial":
        report, refusals = _register_fiducial(args, geometry, plan, pixels)
    else:
        report, refusals = _register_anatomy(args, geometry, plan, pixels), []
    service_mm, service_deg = _service_correction_limits()
    if args.max_correction_mm is None:
        args.max_correction_mm = service_mm
    if args.max_correction_deg is None:
        args.max_correction_deg = service_deg
    refusals += _correction_refusals(report["correction"], args.max_correction_mm, args.max_correction_deg)
    _apply_refusals(report["quality"], refusals)
    report["limits"] = {"max_correction_mm": args.max_correction_mm, "max_correction_deg": args.max_correction_deg,
                        "max_seed_distance_mm": args.max_seed_distance_mm}
    report["plan"] = {"ct": plan.ct.source, "isocentre_lps_mm": [float(v) for v in plan.isocentre_lps_mm],
                      "patient_position": plan.patient_position.value}
    report["elapsed_s"] = time.monotonic() - t0
    if args.json:
        from spineguide.calibration.foundation import to_json_value

        print(json.dumps(to_json_value(report), indent=1, allow_nan=False))
    else:
        _print_registration(report)
    if not report["quality"]["ok"]:
        why = "; ".join(f"{r.reason.value}: {r.detail}" for r in refusals) or f"quality {_quality_reason(report)}"
        print(f"spineguide: result not to be trusted: {why}", file=sys.stderr)
        return EXIT_NOT_TRUSTED
    return EXIT_OK


def _quality_reason(report: dict) -> str:
    q = report["quality"]
    if q.get("reason") not in (None, "ok"):
        return str(q["reason"])
    return ", ".join(q.get("flags", [])) or "not ok"


def _service_correction_limits() -> tuple[float, float]:
    """The service's correction limits (mm, deg): the defaults of ``[safety]`` in tracking/service/config.py."""
    from ..service.config import SafetyConfig

    safety = SafetyConfig()
    return safety.correction_limit_mm, safety.correction_limit_deg


def _correction_refusals(correction: dict, limit_mm: float, limit_deg: float) -> list[_Refusal]:
    """The correction against the limits, measured as the service does: |translation| (mm) and the largest of
    |pitch|, |roll|, |yaw| (deg)."""
    import numpy as np

    t_mm = float(np.linalg.norm(correction["translation_mm"]))
    r_deg = float(np.max(np.abs(correction["rotation_deg"])))
    if not (t_mm <= limit_mm and r_deg <= limit_deg):  # also refuses NaN
        return [_Refusal(RegisterRefusal.CORRECTION_LIMIT,
                         f"correction {t_mm:.2f} mm / {r_deg:.2f} deg exceeds the limit {limit_mm:g} mm / "
                         f"{limit_deg:g} deg (--max-correction-mm, --max-correction-deg)")]
    return []


def _apply_refusals(quality: dict, refusals: list[_Refusal]) -> None:
    """Record the CLI's refusals in the ``quality`` object: ok false, the first reason code, every detail."""
    if not refusals:
        return
    codes = [r.reason.value for r in refusals]
    quality["ok"] = False
    if quality.get("reason") in (None, "ok"):
        quality["reason"] = codes[0]
    quality["reasons"] = [c for c in quality.get("reasons", []) if c != "ok"] + codes
    quality["refusals"] = [{"reason": r.reason.value, "detail": r.detail} for r in refusals]


def _plan_refusals(plan, positions_lps_mm, names, max_seed_distance_mm: float) -> list[_Refusal]:
    """Isocentre and planned seeds (planning-CT LPS mm) inside the CT, seeds near the isocentre."""
    import numpy as np

    ct, iso = plan.ct, np.asarray(plan.isocentre_lps_mm, dtype=np.float64)
    out = []
    if not ct.contains_lps_mm(iso)[0]:
        out.append(_Refusal(RegisterRefusal.ISOCENTRE_OUTSIDE_CT,
                            f"isocentre LPS {_fmt_vec(iso, 2)} mm lies outside the CT ({_ct_extent(ct)})"))
    pos = np.asarray(positions_lps_mm, dtype=np.float64).reshape(-1, 3)
    inside = ct.contains_lps_mm(pos) if len(pos) else np.zeros(0, bool)
    outside = [str(n) for n, ok in zip(names, inside) if not ok]
    if outside:
        out.append(_Refusal(RegisterRefusal.SEED_OUTSIDE_CT,
                            f"planned seed(s) {', '.join(outside)} lie outside the CT ({_ct_extent(ct)})"))
    dist = np.linalg.norm(pos - iso, axis=1) if len(pos) else np.zeros(0)
    far = [f"{n} ({d:.1f} mm)" for n, d in zip(names, dist) if not d <= max_seed_distance_mm]
    if far:
        out.append(_Refusal(RegisterRefusal.SEED_FAR_FROM_ISOCENTRE,
                            f"planned seed(s) {', '.join(far)} lie more than {max_seed_distance_mm:g} mm from the "
                            "isocentre (--max-seed-distance-mm)"))
    return out


def _ct_extent(ct) -> str:
    import numpy as np

    corners = ct.index_to_lps(np.array([[-0.5, -0.5, -0.5], np.array(ct.shape_ijk, float) - 0.5]))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return "LPS " + " x ".join(f"[{a:.1f}, {b:.1f}]" for a, b in zip(lo, hi)) + " mm"


def _check_isocentre_in_ct(plan) -> None:
    """Refuse (exit 2) an anatomy registration about an isocentre outside the CT: no anatomy there."""
    ct, iso = plan.ct, plan.isocentre_lps_mm
    if not ct.contains_lps_mm(iso)[0]:
        raise CliError(f"isocentre LPS {_fmt_vec(iso, 2)} mm lies outside the CT ({_ct_extent(ct)}): "
                       "no anatomy to register there")


def _check_anatomy_inputs(plan, pixels, roi) -> None:
    """Refuse (exit 2) an anatomy registration that cannot compute anything meaningful: constant frames, a CT
    or an ROI holding nothing denser than air (:data:`AIR_HU`)."""
    import numpy as np

    ct = plan.ct
    for name, image in pixels.items():
        lo, hi = float(np.min(image)), float(np.max(image))
        if not lo < hi:
            raise CliError(f"the frame of imager '{name}' is constant (every pixel {lo:g}): no image to register")
    if float(np.max(ct.hu)) <= AIR_HU:
        raise CliError(f"{ct.source}: the CT holds nothing denser than air (max {float(np.max(ct.hu)):.0f} HU): "
                       "no anatomy to register")
    inside = ct.hu[roi.mask]
    if inside.size == 0 or float(np.max(inside)) <= AIR_HU:
        raise CliError(f"the ROI ({roi.description}) holds nothing denser than air: no anatomy to register")


def _load_plan(args: argparse.Namespace):
    """The plan from a DICOM folder (``--plan``) or from ``--ct`` + ``--isocenter`` (+ ``--fiducials``)."""
    from spineguide.registration.plan import load_dicom_plan, load_plan_files

    iso = parse_triplet_mm(args.isocenter, "--isocenter") if args.isocenter is not None else None
    if args.plan is not None:
        if args.ct is not None:
            raise CliError("give either --plan DIR (DICOM) or --ct FILE, not both")
        return load_dicom_plan(args.plan, isocentre_lps_mm=iso, target_roi=args.roi_name)
    if args.ct is None or iso is None:
        raise CliError("give --plan DIR (DICOM CT, RTSTRUCT, RTPLAN) or --ct FILE with --isocenter X,Y,Z")
    return load_plan_files(args.ct, iso, fiducials_path=args.fiducials, patient_position=args.patient_position)


def _register_fiducial(args, geometry, plan, pixels) -> tuple[dict, list[_Refusal]]:
    from spineguide.registration.ct_seeds import find_ct_seeds
    from spineguide.registration.io import FiducialSet, read_fiducials

    from ..localisation.fiducials import localise_fiducials

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
    refusals = _plan_refusals(plan, planned.positions_lps_mm, planned.names, args.max_seed_distance_mm)
    planned_room = planned.to_room(plan.isocentre_lps_mm, plan.patient_position)
    flat = _flat_fields(args)
    try:
        result = localise_fiducials(pixels, geometry, planned_room, planned.names, i0=args.i0,
                                    flat_fields=flat or None)
    except (RegistrationError, TrackingError) as err:
        if not refusals:
            raise
        # Nothing computed, and the plan itself is doubtful: that is the reason to give, not the symptom.
        raise CliError("; ".join(f"{r.reason.value}: {r.detail}" for r in refusals)
                       + f" (localisation then failed: {err})") from err
    t, r = result.correction.six()
    pt, pr = result.pose.six()
    return {
        "method": "fiducial",
        "correction": {"translation_mm": t.tolist(), "rotation_deg": r.tolist()},
        "patient_pose": {"translation_mm": pt.tolist(), "rotation_deg": pr.tolist()},
        "quality": result.quality_json(),
        "timing_ms": {"detection": result.detection_ms, "matching": result.matching_ms, "total": result.total_ms},
    }, refusals


def _flat_fields(args) -> dict:
    """Panel flat fields: the geometry file's optional "flat_field" extension, then --gain/--offset over it."""
    from spineguide.calibration.errors import GeometryFileError
    from spineguide.calibration.jsonfile import read_json_document

    from ..localisation.flatfield import flat_fields_from_args, flat_fields_from_geometry_json

    geometry_doc = read_json_document(args.geometry, GeometryFileError, "geometry file")
    known = flat_fields_from_geometry_json(geometry_doc, Path(args.geometry).parent)
    return flat_fields_from_args(args.gain, args.offset, known)


def _register_anatomy(args, geometry, plan, pixels) -> dict:
    from spineguide.registration.anatomy import RegionOfInterest, register_anatomy

    ct, iso = plan.ct, plan.isocentre_lps_mm
    given = [x for x in (args.roi, args.roi_box, args.roi_name) if x is not None]
    if len(given) > 1:
        raise CliError("--method anatomy takes one of --roi MASK_FILE, --roi-box DX,DY,DZ or --roi-name NAME")
    _check_isocentre_in_ct(plan)
    if args.levels is not None:
        return _register_levels(args, geometry, plan, pixels)
    if args.target_level is not None or args.drive_level is not None:
        raise CliError("--target-level and --drive-level go with --levels")
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
    # Dark / gain correction; dead lines inpainted (the comparison reads whole regions, not windows).
    from ..localisation.flatfield import correct_frames

    pixels = correct_frames(_flat_fields(args), pixels)
    _check_anatomy_inputs(plan, pixels, roi)
    result = register_anatomy(ct, iso, geometry, pixels, roi, i0=args.i0)
    report = result.to_json()
    report["patient_pose"] = report.pop("pose")
    return report


def _register_levels(args, geometry, plan, pixels) -> dict:
    """Per-level anatomy registration (``--levels``): one vertebra per level of the ``--roi`` label map (VerSe
    numbers: C1 = 1 .. L5 = 24), the correction from ``--drive-level`` (default: the target), the per-level
    table and the inter-level motion in ``report["levels"]`` (``LevelsResult.to_json``)."""
    from spineguide.registration.anatomy import RegionOfInterest
    from spineguide.registration.anatomy.per_level import LevelError, LevelRegistration

    from ..localisation.flatfield import correct_frames
    from ..room.realct import VERTEBRA_NAMES

    if args.roi is None or args.roi_box is not None or args.roi_name is not None or args.roi_label is not None:
        raise CliError("--levels takes the vertebra label map as --roi LABELS (VerSe numbers), without "
                       "--roi-label/--roi-box/--roi-name")
    names = [v.strip() for v in args.levels.split(",") if v.strip()]
    unknown = [v for v in names if v not in VERTEBRA_NAMES]
    if unknown or not names:
        raise CliError(f"--levels: unknown vertebra {', '.join(unknown) or '(none given)'} (C1..C7, T1..T12, L1..L5)")
    target = args.target_level or names[len(names) // 2]
    drive = args.drive_level or target
    ct, iso = plan.ct, plan.isocentre_lps_mm
    labels = _read_roi_mask(args.roi, ct)
    rois = {n: RegionOfInterest.from_labels(ct, labels, VERTEBRA_NAMES.index(n) + 1) for n in names}
    pixels = correct_frames(_flat_fields(args), pixels)
    for roi in rois.values():
        _check_anatomy_inputs(plan, pixels, roi)
    try:
        result = LevelRegistration(ct, iso, geometry, rois, target).register(pixels, i0=args.i0)
        level = result.level(drive)
    except LevelError as err:
        raise CliError(str(err)) from err
    quality = level.to_json()["quality"]  # finite numbers only
    quality["discordant"] = result.discordant
    if result.discordant and quality.get("ok"):
        quality["ok"], quality["reason"] = False, "levels_discordant"
    return {"method": "anatomy", "correction": level.pose.to_correction().to_json(),
            "patient_pose": level.pose.to_json(), "quality": quality, "drive_level": drive,
            "levels": result.to_json()}


def _print_levels(doc: dict) -> None:
    print(f"levels (target {doc['target']}): {doc['discordance_detail']}")
    rows = []
    for lv in doc["levels"]:
        t, r = lv["pose"]["translation_mm"], lv["pose"]["rotation_deg"]
        rows.append([lv["name"], "ok" if lv["ok"] else lv["reason"], *(f"{v:+.2f}" for v in t), *(f"{v:+.2f}" for v in r)])
    print_table(["level (patient pose)", "quality", "X mm", "Y mm", "Z mm", "pitch deg", "roll deg", "yaw deg"], rows)
    rows = []
    for m in doc["inter_level"]:
        rows.append([f"{m['cranial']}/{m['caudal']}", "ok" if m["ok"] else "NOT OK",
                     *(f"{m[k]:+.2f}" for k in ("flexion_extension_deg", "lateral_bending_deg", "axial_rotation_deg")),
                     *(f"{v:+.2f}" for v in m["translation_mm"])])
    print_table(["inter-level (cranial rel. caudal)", "quality", "flexion deg", "lat. bend (left) deg",
                 "axial rot (left) deg", "L mm", "P mm", "S mm"], rows)


def _read_roi_mask(path: Path, ct):
    """A label/mask image on the planning-CT grid, as a ``[k, j, i]`` integer array."""
    import numpy as np

    from spineguide.registration.plan import read_mask_volume

    labels, _ = read_mask_volume(path, ct)
    if not np.issubdtype(labels.dtype, np.integer):
        raise CliError(f"{path}: ROI mask must hold integer labels, got {labels.dtype}")
    return labels


def _print_registration(report: dict) -> None:
    corr = report["correction"]
    quality = report["quality"]
    print(f"method: {report['method']}   quality: {'OK' if quality['ok'] else 'NOT OK'}   "
          f"elapsed {report['elapsed_s'] * 1000:.0f} ms")
    for refusal in quality.get("refusals", []):
        print(f"REFUSED {refusal['reason']}: {refusal['detail']}")
    print_table(
        ["couch correction", "X lat", "Y long", "Z vert"],
        [["translation mm", *(f"{v:+.2f}" for v in corr["translation_mm"])],
         ["rotation deg (pitch, roll, yaw)", *(f"{v:+.2f}" for v in corr["rotation_deg"])]],
    )
    if "levels" in report:
        _print_levels(report["levels"])
        print(f"correction driven by level {report['drive_level']}")
    elif "fre_mm" in quality:
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
            if key != "refusals":
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
    from spineguide.calibration.solve import CalibrationFrame

    from ..frames import read_frame

    frames = []
    for name, path, shift_mm in _parse_calibration_images(values):
        frame = read_frame(path, geometry[name], i0)
        frames.append(CalibrationFrame(name, frame.pixels, shift_mm, i0, source=str(path)))
    return frames


def _load_phantom(text: str):
    from spineguide.calibration.phantom import default_phantom, read_phantom

    return default_phantom() if text == "default" else read_phantom(text)


def _isocentre_reference(args: argparse.Namespace):
    """(reference, laser pose to compare) from --winston-lutz / --laser-pose."""
    from spineguide.calibration.isocentre import laser_pose, read_winston_lutz

    laser = None
    if args.laser_pose:
        try:
            v = [float(t) for t in args.laser_pose.split(",")]
        except ValueError as err:
            raise CliError(f"--laser-pose: expected DX,DY,DZ[,RX,RY,RZ] numbers, got {args.laser_pose!r}") from err
        if len(v) not in (3, 6) or not all(math.isfinite(t) for t in v):
            raise CliError(f"--laser-pose: expected 3 or 6 finite numbers, got {args.laser_pose!r}")
        laser = laser_pose(v[:3], v[3:] if len(v) == 6 else (0.0, 0.0, 0.0), source="--laser-pose")
    if args.winston_lutz:
        return read_winston_lutz(args.winston_lutz), laser
    return laser, None


def _cmd_calibrate_protocol(args: argparse.Namespace) -> int:
    """Print the couch positions and exposures of the depth protocol for a room, and the ``calibrate`` call."""
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.calibration.io import read_geometry
    from spineguide.calibration.protocol import depth_protocol

    nominal = read_geometry(args.nominal) if args.nominal else default_stereo_geometry()
    plan = depth_protocol(nominal, axis_shift_mm=args.axis_shift_mm, axis_exposures=args.axis_exposures,
                          y_shift_mm=args.y_shift_mm)
    print(f"depth protocol for {'room ' + str(args.nominal) if args.nominal else 'the built-in room'}: "
          f"{len(plan)} exposures; couch shift = the phantom's translation from its setup on the lasers "
          "(room frame, IEC 61217, mm)")
    print_table(["exposure", "couch X mm", "couch Y mm", "couch Z mm", "imagers"],
                [[k + 1, f"{e.couch_shift_mm[0]:.1f}", f"{e.couch_shift_mm[1]:.1f}", f"{e.couch_shift_mm[2]:.1f}",
                  "+".join(e.imagers)] for k, e in enumerate(plan)])
    images = [arg for k, e in enumerate(plan) for arg in e.image_arguments(f"exp{k + 1:02d}_")]
    print("then: spineguide calibrate --phantom PHANTOM.json --out geometry.json "
          + " ".join(f"--image {a}" for a in images))
    return EXIT_OK


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.calibration.io import read_geometry, write_geometry
    from spineguide.calibration.report import write_calibration_report
    from spineguide.calibration.solve import calibrate

    from spineguide.calibration.solve import MAX_COUCH_SIGMA_MM

    if not (math.isfinite(args.couch_sigma_mm) and 0.0 <= args.couch_sigma_mm <= MAX_COUCH_SIGMA_MM):
        raise CliError(f"--couch-sigma-mm must be from 0 to {MAX_COUCH_SIGMA_MM:g} mm, got {args.couch_sigma_mm!r}")
    nominal = read_geometry(args.nominal) if args.nominal else default_stereo_geometry()
    phantom = _load_phantom(args.phantom)
    frames = _calibration_frames(args.image, nominal, args.i0)
    reference, laser = _isocentre_reference(args)
    from spineguide.calibration.errors import CalibrationError
    from spineguide.calibration.report import ReportContext, write_failure_report

    previous = read_geometry(args.previous) if args.previous else None
    context = ReportContext(args.machine, args.operator, str(args.phantom), previous, None, laser)
    t0 = time.monotonic()
    try:
        result = calibrate(phantom, frames, nominal, free_phantom_rotation=args.free_phantom_rotation,
                           phantom_source=str(args.phantom), reference=reference, couch_sigma_mm=args.couch_sigma_mm)
    except CalibrationError as err:
        if args.report:
            report = write_failure_report(args.report, err, frames, context, phantom.name)
            print(f"calibration failed; report: {report}")
        raise
    elapsed_s = time.monotonic() - t0
    from spineguide.calibration.gate import acceptance_gate

    gate = acceptance_gate(result)
    if gate.passed or args.force:
        write_geometry(result.geometry, args.out)
    rows = []
    for sol in result.imagers:
        rows.append([sol.geometry.name, sol.n_observations, f"{sol.rms_px:.3f}", f"{sol.max_px:.3f}",
                     _fmt_vec(sol.geometry.source_mm, 1), f"{sol.geometry.source_to_detector_mm:.1f}"])
    print(f"calibrated {len(frames)} frame(s) of phantom {args.phantom} in {elapsed_s:.1f} s"
          + (f" -> {args.out}" if gate.passed or args.force else ""))
    print_table(["imager", "BB views", "RMS px", "max px", "source (room mm)", "source-panel mm"], rows)
    iso = result.isocentre
    flag = "FLAGGED" if iso.flagged else "ok"
    print(f"isocentre check (fit consistency, circular): centre BB at {_fmt_vec(iso.centre_bb_room_mm, 3)} mm, "
          f"{iso.discrepancy_mm:.3f} mm from where it was placed (limit {iso.limit_mm} mm): {flag}")
    for line in result.kv_isocentre(laser).lines():
        print(line)
    if args.report:
        import dataclasses

        report = write_calibration_report(result, args.report, frames, dataclasses.replace(context, gate=gate))
        print(f"report: {report}")
    if not gate.passed:
        print(f"acceptance gate FAILED (BBs: {', '.join(gate.failed_bbs) or 'none named'}):")
        for line in gate.findings:
            print(f"  {line}")
        if args.force:
            print(f"--force: geometry written to {args.out} despite the failed gate")
        else:
            print(f"no geometry written ({args.out}); check the phantom file and setup, or use --force")
        return 3
    print("acceptance gate: passed")
    return 0


def _cmd_qa(args: argparse.Namespace) -> int:
    from spineguide.calibration.io import read_geometry
    from spineguide.calibration.errors import CalibrationError
    from spineguide.calibration.qa import (QAStatus, QATolerances, append_failure, append_history, read_history, run_qa,
                                           trend)
    from spineguide.calibration.report import write_trend_plot

    history = Path(args.history)
    if args.trend:
        records = read_history(history)
        summary = trend(records)
        print(summary.table)
        print(summary.drift_line)
        plot = write_trend_plot(records, args.plot or history.with_suffix(".png"))
        print(f"plot: {plot}")
        return 0
    if not (args.geometry and args.phantom and args.image):
        raise CliError("qa needs --geometry, --phantom and --image A=FILE --image B=FILE (or --trend)")
    geometry = read_geometry(args.geometry)
    phantom = _load_phantom(args.phantom)
    frames = _calibration_frames(args.image, geometry, args.i0)
    tolerances = QATolerances(offset_action_mm=args.action_mm, offset_tolerance_mm=args.tolerance_mm)
    try:
        result = run_qa(geometry, phantom, frames, tolerances=tolerances, setup_verified=args.setup_verified)
    except CalibrationError as err:
        # Recorded as a FAIL in the history (a QA not done is a QA failed), then reported as an error (exit 2).
        append_failure(history, str(err), {name: str(path) for name, path, _ in _parse_calibration_images(args.image)})
        print(f"QA could not be done; recorded as FAIL in {history}")
        raise
    append_history(history, result)
    rows = [[q.imager, q.n_found, f"{q.rms_px:.3f}", f"{q.rms_mm:.3f}", f"{q.max_mm:.3f}", q.status.value]
            for q in result.imagers]
    print_table(["imager", "BBs", "RMS px", "RMS mm (iso)", "max mm (iso)", "status"], rows)
    print(f"centre BB offset {_fmt_vec(result.centre_offset_mm, 3)} mm = {result.centre_offset_distance_mm:.3f} mm "
          f"(action {tolerances.offset_action_mm} mm, tolerance {tolerances.offset_tolerance_mm} mm)")
    if result.causes is not None:
        st = result.causes.setup
        print(f"phantom setup today: translation {_fmt_vec(st.translation_mm, 2)} mm, rotation "
              f"{_fmt_vec(st.rotation_deg, 2)} deg (not a geometry fault)")
        print("detection limits (95 % power) per imager: " + "; ".join(
            f"{d.imager} {d.cause} {d.best:.2f}-{d.worst:.2f} {d.unit}" for d in result.causes.limits))
        print("cause told from its rival (95 % power) above: " + "; ".join(
            f"{d.imager} {d.cause} vs {d.rival} {d.best:.2f}-{d.worst:.2f} {d.unit}" for d in result.causes.separation
            if {d.cause, d.rival} == {"panel shift", "source shift"}))
    print(f"QA {result.status.value}; recorded in {history}")
    for reason in result.reasons:
        print(f"  - {reason}")
    return {QAStatus.PASS: EXIT_OK, QAStatus.ACTION: EXIT_QA_FAILED}.get(result.status, EXIT_QA_OUT_OF_TOLERANCE)


def _fmt_vec(values, digits: int) -> str:
    return "[" + ", ".join(f"{float(v):.{digits}f}" for v in values) + "]"


def _progress(message: str) -> None:
    print(f"  .. {message}", flush=True)


# ----------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`_UsageError` (one line, exit 2 in :func:`main`) instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spineguide",
        description="Real-time stereo kV image guidance for spine radiosurgery. Lengths in mm, angles in degrees.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress to stderr; print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run a simulated fraction on the built-in phantom")
    p.add_argument("--out", type=Path, default=None, help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--seed", type=non_negative_int, default=2026,
                   help="random seed of the simulated patient (default 2026)")
    p.add_argument("--quick", action="store_true", help="smaller panels and fewer pairs (for tests)")
    p.add_argument("--console", action="store_true",
                   help="instead: a simulated room idle and the console on --port; a therapist runs the whole "
                        "fraction from the page (accounts printed at start)")
    p.add_argument("--port", type=port_number, default=8080, help="with --console: HTTP port (default 8080)")
    p.add_argument("--duration", type=positive_float, default=None,
                   help="with --console: stop after this many seconds (default: until Ctrl-C)")
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
    p.add_argument("--i0", type=i0_level, default=None,
                   help="unattenuated signal (default: estimated per frame)")
    p.add_argument("--gain", action="append", default=None,
                   help="NAME=FILE flat-field (gain) map of an imager (.npy or any image SimpleITK reads)")
    p.add_argument("--offset", action="append", default=None,
                   help="NAME=FILE dark (offset) map of an imager, counts")
    p.add_argument("--patient-position", default=None, help="HFS/FFS/HFP/FFP if the CT file does not record it")
    p.add_argument("--fiducials", type=Path, default=None, help="planned seeds, fiducials/1 (planning-CT LPS mm)")
    p.add_argument("--use-ct-seeds", action="store_true", help="use the seeds found automatically in the CT")
    p.add_argument("--roi", type=Path, default=None, help="anatomy: ROI label mask on the CT grid")
    p.add_argument("--roi-label", type=non_negative_int, default=None,
                   help="anatomy: label value of the target in --roi")
    p.add_argument("--roi-name", default=None, help="anatomy with --plan: RTSTRUCT ROI name (default: the target)")
    p.add_argument("--roi-neighbours", type=non_negative_int, default=0,
                   help="anatomy: include N levels either side of --roi-label")
    p.add_argument("--roi-box", default=None, help="anatomy: box half-sizes DX,DY,DZ (LPS mm) around the isocentre")
    p.add_argument("--levels", default=None,
                   help="anatomy: register each of these vertebrae on its own, cranial first (e.g. T12,L1,L2), "
                        "ROIs from the --roi label map in VerSe numbers; prints the per-level table and the "
                        "inter-level motion")
    p.add_argument("--target-level", default=None, help="with --levels: the treated level (default: the middle one)")
    p.add_argument("--drive-level", default=None,
                   help="with --levels: the level whose pose drives the correction (default: the target)")
    # Defaults resolved when the command runs (the service's config module imports NumPy: not at --help).
    p.add_argument("--max-correction-mm", type=positive_float, default=None,
                   help="refuse (exit 3) a correction whose translation exceeds this, mm (default: the service's "
                        "[safety] correction_limit_mm, 25)")
    p.add_argument("--max-correction-deg", type=positive_float, default=None,
                   help="refuse (exit 3) a correction with a rotation beyond this, deg (default: the service's "
                        "[safety] correction_limit_deg, 5)")
    p.add_argument("--max-seed-distance-mm", type=positive_float, default=MAX_SEED_DISTANCE_MM,
                   help=f"refuse (exit 3) planned seeds farther than this from the isocentre, mm "
                        f"(default {MAX_SEED_DISTANCE_MM:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("calibrate", help="calibrate the imaging geometry from BB-phantom frames")
    p.add_argument("--phantom", required=True, help="bb-phantom/1 file, or 'default' for the built-in phantom")
    p.add_argument("--image", action="append", required=True,
                   help="NAME=FILE or NAME=FILE@DX,DY,DZ (couch shift of that exposure, room mm); repeatable")
    p.add_argument("--nominal", type=Path, default=None, help="nominal geometry to start from (default: built-in room)")
    p.add_argument("--i0", type=i0_level, default=None,
                   help="unattenuated signal (default: estimated per frame)")
    p.add_argument("--free-phantom-rotation", action="store_true", help="fit the phantom's rotation too")
    p.add_argument("--couch-sigma-mm", type=float, default=0.0,
                   help="the couch's positioning accuracy (1-sigma per axis, mm): where it really put the phantom at "
                        "each shifted position is fitted with that prior (default 0: the shifts are exact)")
    p.add_argument("--winston-lutz", type=Path, default=None,
                   help="winston-lutz/1 file: the centre BB measured against the MV isocentre (ties the room origin)")
    p.add_argument("--laser-pose", default=None,
                   help="phantom pose read off the lasers: DX,DY,DZ[,RX,RY,RZ] (room mm, deg); the reference when no "
                        "--winston-lutz is given, else compared with it")
    p.add_argument("--out", required=True, type=Path, help="kv-geometry/1 file to write")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for the report (index.html + report.pdf), written also when the calibration fails")
    p.add_argument("--machine", default="", help="treatment machine / room name, for the report")
    p.add_argument("--operator", default="", help="who took the images, for the report")
    p.add_argument("--previous", type=Path, default=None,
                   help="the kv-geometry/1 calibration in use until now, compared in the report")
    p.add_argument("--force", action="store_true",
                   help="write the geometry even when the acceptance gate fails (exit status stays 3)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("calibrate-protocol",
                       help="print the couch positions and exposures to acquire for a calibration (depth protocol)")
    p.add_argument("--nominal", type=Path, default=None, help="nominal geometry of the room (default: built-in room)")
    p.add_argument("--axis-shift-mm", type=float, default=300.0,
                   help="couch travel along each imager's central axis, mm (default 300; 0 = none)")
    p.add_argument("--axis-exposures", type=int, default=2, help="frames at each along-the-axis position (default 2)")
    p.add_argument("--y-shift-mm", type=float, default=50.0, help="couch travel along room Y, both imagers (default 50)")
    p.set_defaults(func=_cmd_calibrate_protocol)

    p = sub.add_parser("qa", help="daily geometry QA against the stored calibration, or --trend")
    p.add_argument("--geometry", type=Path, help="stored kv-geometry/1 calibration")
    p.add_argument("--phantom", help="bb-phantom/1 file, or 'default'")
    p.add_argument("--image", action="append", default=None, help="NAME=FILE (repeatable)")
    p.add_argument("--i0", type=i0_level, default=None, help="unattenuated signal (default: estimated)")
    p.add_argument("--history", default="qa-history.jsonl", help="QA history file (JSON lines), appended")
    p.add_argument("--tolerance-mm", type=positive_float, default=1.0, help="centre-BB offset tolerance (TG-142 SRS: 1 mm)")
    p.add_argument("--action-mm", type=positive_float, default=0.5, help="centre-BB offset action level (default 0.5 mm)")
    p.add_argument("--setup-verified", action="store_true",
                   help="the phantom sits at its file position to within the tolerance (Winston-Lutz): grade the "
                        "centre-BB offset as the TG-142 coincidence (otherwise it is today's setup, reported)")
    p.add_argument("--trend", action="store_true", help="show the history as a table and a plot")
    p.add_argument("--plot", type=Path, default=None, help="trend plot PNG (default: beside the history)")
    p.set_defaults(func=_cmd_qa)

    p = sub.add_parser("simulate", help="write a virtual-room data set: CT, geometry, frames, fiducials, truth")
    p.add_argument("--phantom", choices=["thoracolumbar", "cervical"], required=True)
    p.add_argument("--poses", type=_positive_int, default=1, help="number of stereo pairs (random setup errors)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--i0", type=i0_level, default=20000.0, help="unattenuated detector signal (default 20000)")
    p.add_argument("--panel-pixels", type=_positive_int, default=1024, help="panel rows = cols (default 1024)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("simulate-ct", help="stereo validation cases with exact truth from your CT + vertebra labels")
    p.add_argument("--ct", required=True, type=Path, help="CT in HU: NIfTI, MHA, NRRD or a DICOM folder")
    p.add_argument("--labels", required=True, type=Path, help="vertebra label map on the CT's grid")
    p.add_argument("--scheme", choices=["verse", "totalsegmentator"], default="verse", help="label numbering")
    p.add_argument("--patient-position", default="HFS", help="HFS/FFS/HFP/FFP (default HFS)")
    p.add_argument("--levels", required=True, help="target vertebrae, comma-separated (e.g. T12,L1,L2)")
    p.add_argument("--rooms", default="default,floor", help="built-in rooms (default, floor) or kv-geometry/1 files")
    p.add_argument("--projectors", default="own,plastimatch", help="own and/or plastimatch")
    p.add_argument("--cases", type=_positive_int, default=24, help="number of cases (level x room x projector)")
    p.add_argument("--seed", type=non_negative_int, default=12, help="random seed of the start errors")
    p.add_argument("--chain", choices=["simple", "clinic"], default="simple",
                   help="imaging chain: simple (default; one energy, Poisson, blur) or clinic (ChainConfig.clinic: "
                        "120 kVp spectrum, beam hardening, scatter, heel, gain/offset maps, dead lines, lag, couch top)")
    p.add_argument("--i0", type=i0_level, default=None,
                   help="unattenuated detector signal (default 20000 simple, 6000 clinic)")
    p.add_argument("--spr", type=non_negative_float, default=None,
                   help="scatter-to-primary ratio behind 350 mm of tissue, clinic chain only (default 1.0)")
    p.add_argument("--couch", choices=["on", "off"], default=None,
                   help="carbon-fibre couch top in the frames (default: on with --chain clinic, off with simple)")
    p.add_argument("--beyond-ends-mm", type=non_negative_float, default=150.0,
                   help="tissue past the CT's ends in the frames, mm (0: the CT alone)")
    _add_deform_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_simulate_ct)
    from . import console as _cli_console
    from . import dicom as _cli_dicom
    from . import service as _cli_service

    _cli_dicom.add_commands(sub)
    _cli_service.add_commands(sub)
    _cli_console.add_commands(sub)
    for subparser in sub.choices.values():
        # -v works after the subcommand too; SUPPRESS keeps a -v given before it.
        try:
            subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="log progress to stderr; print the traceback of an error")
        except argparse.ArgumentError:
            pass
    return parser


# A value that starts like a negative number (or a list of them): "-3.27,10,5", "-1e-3", "-inf,0,0".
_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _option_kinds(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """Option strings (``--x``) that take a value, and those that take none, over the parser and its subcommands."""
    valued: set[str] = set()
    flags: set[str] = set()
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:  # argparse keeps its actions here; stable since Python 2.7
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
                continue
            target = flags if action.nargs == 0 else valued
            target.update(o for o in action.option_strings if o.startswith("--"))
    return valued, flags


def rejoin_negative_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``["--isocenter", "-3.27,10,5"]`` -> ``["--isocenter=-3.27,10,5"]`` for every option that takes a value.

    argparse reads a token that starts with ``-`` as an option unless it is one plain negative number, so a
    negative coordinate list needs ``=``; joining the option to its value here makes both spellings work. A
    flag (an option without a value) is never joined, nor anything after ``--``.
    """
    valued, flags = _option_kinds(parser)
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (nxt is not None and token.startswith("--") and "=" not in token and _NEGATIVE_VALUE.match(nxt)
                and _takes_value(token, valued, flags)):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _takes_value(token: str, valued: set[str], flags: set[str]) -> bool:
    if token in valued:
        return True
    if token in flags:
        return False
    # an abbreviation argparse would expand: joined only if it can only mean options that take a value
    matches_valued = any(o.startswith(token) for o in valued)
    matches_flag = any(o.startswith(token) for o in flags)
    return matches_valued and not matches_flag


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " / ".join(lines) if lines else "(no message)"


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input or environment" (exit 2), as opposed to a defect (exit 4)."""
    types: list[type[BaseException]] = [CliError, CalibrationError, RegistrationError, TrackingError, KeyError,
                                        OSError]
    try:  # only if zmq is already loaded (a service command ran): binding a busy port is the user's to fix
        zmq = sys.modules.get("zmq")
        if zmq is not None:
            types.append(zmq.ZMQError)
    except AttributeError:
        pass
    return tuple(types)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spineguide`` console script; returns the exit code (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(rejoin_negative_values(argv, parser))
        except _UsageError as err:
            print(f"{_one_line(str(err))} (see --help)", file=sys.stderr)
            return EXIT_ERROR
        except SystemExit as stop:  # --help, --version: argparse exits 0
            return EXIT_OK if stop.code is None else stop.code if isinstance(stop.code, int) else EXIT_ERROR
        verbose = bool(getattr(args, "verbose", False))
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        with warnings.catch_warnings():
            if not verbose:
                # Library warnings (pydicom on a broken file, numpy) are diagnostics: shown with -v; without it
                # an error is one line. pydicom also logs what it warns; that too only with -v.
                warnings.simplefilter("ignore")
            with _quiet_logger("pydicom", quiet=not verbose):
                return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spineguide: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        print("spineguide: error: output closed early (broken pipe)", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print("spineguide: error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - the catch-all: one line, never a bare traceback
        if verbose:
            traceback.print_exc(file=sys.stderr)
        if isinstance(err, _user_error_types()):
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            if isinstance(err, OSError) and not isinstance(err, BrokenPipeError) and err.filename is not None:
                message = f"{err.filename}: {err.strerror or err}"
            print(f"spineguide: error: {_one_line(str(message))}", file=sys.stderr)
            return EXIT_ERROR
        print(f"spineguide: internal error: {type(err).__name__}: {_one_line(str(err))} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


class _quiet_logger:
    """Raise a third-party logger's level to ERROR for the duration of a command (restored afterwards)."""

    def __init__(self, name: str, quiet: bool) -> None:
        self._logger = logging.getLogger(name)
        self._quiet = quiet
        self._level = self._logger.level

    def __enter__(self) -> None:
        if self._quiet:
            self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        self._logger.setLevel(self._level)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
