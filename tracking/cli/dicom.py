"""``spineguide import``, ``dicom-listen``, ``dicom-export`` and ``dicom-send``: DICOM in and out.

Registered by :mod:`spineguide.tracking.cli.main` with ``_cli_dicom.add_commands(sub)``. Both
commands print; the library they call only logs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

__all__ = ["add_commands", "cmd_import", "cmd_dicom_listen", "cmd_dicom_export", "cmd_dicom_send"]


def cmd_dicom_export(args: argparse.Namespace, out=None) -> int:
    """Write acquired kV frames as RT Image objects with their imager geometry (one series per imager)."""
    from spineguide.calibration.io import read_geometry
    from pydicom.uid import generate_uid

    from spineguide.registration.dicom_export import SeriesInfo, rt_image, save, series_number_for
    from spineguide.registration.plan import load_dicom_plan
    from spineguide.tracking.frames import parse_image_args, read_stereo_frames

    from .args import CliError

    out = out or sys.stdout
    if args.i0 is None:
        raise CliError("--i0 is required: an RT Image records the frame's unattenuated level")
    geometry = read_geometry(args.geometry)
    plan = load_dicom_plan(args.plan)
    if plan.patient is None:
        raise CliError(f"{args.plan}: the plan carries no DICOM patient identity")
    frames = read_stereo_frames(parse_image_args(args.image), geometry, args.i0)
    args.out.mkdir(parents=True, exist_ok=True)
    acquired = args.acquired_unix_s if args.acquired_unix_s is not None else time.time()
    frame_uid = args.frame_of_reference_uid or generate_uid()
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", frame_uid) or len(frame_uid) > 64:
        raise CliError(f"--frame-of-reference-uid {frame_uid!r} is not a DICOM UID (digits and dots, <= 64)")
    beam = plan.setup_beam_numbers[0] if len(plan.setup_beam_numbers) == 1 else None
    written = []
    created = time.time()
    if len(frames) > 9:
        raise CliError(f"at most 9 imagers per export (series numbers), got {len(frames)}")
    for number, (name, frame) in enumerate(frames.items(), start=1):
        ds = rt_image(frame.pixels, geometry[name], plan.patient, acquired_unix_s=acquired, i0=args.i0,
                      series=SeriesInfo.new(series_number_for(created, number), f"kV imager {name}"),
                      pair_id=args.pair_id, room_frame_of_reference_uid=frame_uid,
                      referenced_rtplan_uid=plan.rtplan_sop_instance_uid, referenced_beam_number=beam)
        path = args.out / f"RI_{name}.dcm"
        save(ds, path)
        written.append(path)
        print(f"  RT Image {path} (imager {name}, {frame.pixels.shape[0]}x{frame.pixels.shape[1]})", file=out)
    if args.send is not None:
        return _send(written, args.send, out)
    return 0


def _send(paths, archive_text: str, out) -> int:
    from ..service.dicom_net import parse_archive, send_to_archive

    archive = parse_archive(archive_text)
    results = send_to_archive(paths, archive)
    print(f"sent {len(results)} object(s) to {archive.describe()}", file=out)
    return 0


def cmd_dicom_send(args: argparse.Namespace, out=None) -> int:
    """C-STORE files (or every .dcm below folders) to an archive."""
    out = out or sys.stdout
    paths = []
    for item in args.files:
        paths.extend(sorted(item.rglob("*.dcm")) if item.is_dir() else [item])
    return _send(paths, args.archive, out)


def _fmt(v) -> str:
    import numpy as np

    return "(" + ", ".join(f"{x:.2f}" for x in np.ravel(v)) + ")"


def cmd_import(args: argparse.Namespace, out=None) -> int:
    """Scan a folder of DICOM, list what it holds, then assemble and check the plan."""
    from spineguide.registration.dicom_rt import ContourType, read_rtplan, read_rtstruct, scan_dicom_folder
    from spineguide.registration.plan import load_dicom_plan

    out = out or sys.stdout
    start = time.monotonic()
    inv = scan_dicom_folder(args.dir)
    print(f"{inv.folder}:", file=out)
    for s in inv.ct_series:
        print(f"  CT series {s.series_uid}: {len(s.paths)} slices, patient {s.patient_id!r}, "
              f"frame of reference {s.frame_of_reference_uid}", file=out)
    for p in inv.structure_sets:
        ss = read_rtstruct(p)
        closed = [r.name for r in ss.rois if r.geometric_type is ContourType.CLOSED_PLANAR]
        seeds = [r.name for r in ss.seed_rois()]
        isos = [name for name, _ in ss.isocentre_points()]
        other = [r.name for r in ss.rois if r.geometric_type is ContourType.POINT and r.name not in seeds + isos]
        print(f"  RTSTRUCT {p.name}: {len(closed)} contoured ROIs {closed}, {len(seeds)} seed points {seeds}, "
              f"isocentre points {isos}, other points {other}, frame of reference {ss.frame_of_reference_uid}",
              file=out)
    for p in inv.plans:
        rp = read_rtplan(p)
        isos = "; ".join(_fmt(i) for i in rp.isocentres_lps_mm)
        print(f"  RTPLAN {p.name} '{rp.label}': isocentre(s) {isos} LPS mm, setup "
              f"{[q.value for q in rp.patient_positions]}, frame of reference {rp.frame_of_reference_uid}", file=out)
    for p, modality in inv.others:
        print(f"  other: {p.name} ({modality or 'no modality'})", file=out)
    if inv.not_dicom:
        print(f"  {len(inv.not_dicom)} file(s) that are not DICOM (ignored)", file=out)
    iso = None
    if args.isocenter is not None:
        from .args import parse_triplet_mm

        iso = parse_triplet_mm(args.isocenter, "--isocenter")
    plan = load_dicom_plan(inv.folder, isocentre_lps_mm=iso, target_roi=args.target, inventory=inv)
    nk, nj, ni = plan.ct.hu.shape
    print(f"plan OK ({time.monotonic() - start:.2f} s): CT {ni}x{nj}x{nk} voxels of "
          f"{_fmt(plan.ct.spacing_mm)} mm, {plan.patient_position.value}; isocentre {_fmt(plan.isocentre_lps_mm)} "
          f"LPS mm ({plan.provenance['isocentre']})", file=out)
    for name, mask in plan.rois.items():
        mark = f" (target: {plan.provenance.get('target_roi', '')})" if name == plan.target_roi else ""
        print(f"  ROI {name}{mark}: {int(mask.sum())} voxels", file=out)
    if plan.fiducials is not None:
        for name, pos in zip(plan.fiducials.names, plan.fiducials.positions_lps_mm):
            print(f"  fiducial {name}: {_fmt(pos)} LPS mm", file=out)
    if plan.target_roi is None and plan.fiducials is None:
        from .args import CliError

        raise CliError(f"{inv.folder}: the plan has neither a target ROI nor planned fiducials (no usable RT "
                       "Structure Set): nothing to register against")
    return 0


def cmd_dicom_listen(args: argparse.Namespace, out=None) -> int:
    """Run the Storage SCP until interrupted (or for ``--duration-s``), then list what arrived."""
    from ..service.dicom_net import ListenerConfig, StorageListener

    out = out or sys.stdout
    config = ListenerConfig(args.out, ae_title=args.ae_title, port=args.port, host=args.host,
                            allowed_calling_aes=tuple(args.allow_ae or ()), allowed_hosts=tuple(args.allow_host or ()))
    listener = StorageListener(config).start()
    who = ", ".join(filter(None, [
        f"calling AE titles {list(config.allowed_calling_aes)}" if config.allowed_calling_aes else "",
        f"hosts {list(config.allowed_hosts)}" if config.allowed_hosts else "",
    ])) or "any calling AE title and host"
    print(f"listening as {config.ae_title} on {config.host}:{listener.port}, writing to {config.out_dir}; "
          f"accepting {who} (Ctrl-C to stop)", file=out, flush=True)
    deadline = None if args.duration_s is None else time.monotonic() + args.duration_s
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    print(f"received {len(listener.received)} object(s), refused {len(listener.refused)}", file=out)
    for reason in listener.refused:
        print(f"  refused: {reason}", file=out)
    return 0


def add_commands(subparsers) -> None:
    """Add ``import``, ``dicom-listen``, ``dicom-export`` and ``dicom-send`` to the ``spineguide`` subparsers."""
    from .args import finite_float, i0_level, non_negative_int, port_number, positive_float

    p = subparsers.add_parser("import", help="read a folder of DICOM planning data (CT, RTSTRUCT, RTPLAN) and check it")
    p.add_argument("dir", type=Path, help="folder (searched recursively)")
    p.add_argument("--isocenter", default=None, help="override the plan isocentre X,Y,Z (planning-CT LPS mm)")
    p.add_argument("--target", default=None, help="target ROI name (default: the RTPLAN's TARGET dose reference, else the one PTV, CTV or GTV)")
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("dicom-listen", help="DICOM Storage SCP receiving planning CT, RTSTRUCT and RTPLAN")
    p.add_argument("--port", type=port_number, required=True, help="TCP port (0 = any free port)")
    p.add_argument("--ae-title", default="SPINEGUIDE", help="our AE title (default SPINEGUIDE)")
    p.add_argument("--out", type=Path, required=True, help="folder for received files (<study>/<series>/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--duration-s", type=positive_float, default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--allow-ae", action="append", default=None,
                   help="calling AE title allowed to send (repeat; default: any)")
    p.add_argument("--allow-host", action="append", default=None,
                   help="IP address allowed to connect (repeat; default: any)")
    p.set_defaults(func=cmd_dicom_listen)

    p = subparsers.add_parser("dicom-export", help="write kV frames as DICOM RT Image objects with their geometry")
    p.add_argument("--plan", type=Path, required=True, help="DICOM plan folder (patient and study identity)")
    p.add_argument("--geometry", type=Path, required=True, help="kv-geometry/1 file of the imagers")
    p.add_argument("--image", action="append", required=True, help="NAME=FILE, one per imager")
    p.add_argument("--i0", type=i0_level, default=None, help="unattenuated level of the frames (required)")
    p.add_argument("--pair-id", type=non_negative_int, default=None, help="stereo pair number, recorded in the objects")
    p.add_argument("--acquired-unix-s", type=finite_float, default=None, help="acquisition time (default: now)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--send", default=None, help="also C-STORE them to an archive AE@HOST:PORT")
    p.add_argument("--frame-of-reference-uid", default=None,
                   help="the session's treatment-day Frame of Reference UID (as in its Spatial Registrations; "
                        "default: a new one)")
    p.set_defaults(func=cmd_dicom_export)

    p = subparsers.add_parser("dicom-send", help="C-STORE DICOM files to an archive (record and verify, PACS)")
    p.add_argument("--archive", required=True, help="AE@HOST:PORT of the archive")
    p.add_argument("files", type=Path, nargs="+", help="files, or folders whose .dcm files are sent")
    p.set_defaults(func=cmd_dicom_send)
