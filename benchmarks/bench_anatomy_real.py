"""Benchmark: stereo anatomy (DRR) registration on the real-CT validation set (issue 12), ITK peer side by side.

Runs :class:`spineguide.registration.anatomy.AnatomyRegistration` on a set built by
``datasets/realct/build.py`` (a public patient CT with vertebra labels,
rendered by our DRR and by plastimatch in two rooms): full registration from
perfect setup on each case's set-up pair, then tracking mode on its second
pair from the full result. mTRE is the mean 3D error over the target
vertebra's voxels (room frame). Each result is classed by the issue's rules:

- accepted and right: ``quality.ok`` and mTRE < 1 mm;
- accepted but wrong: ``quality.ok`` and mTRE >= 1 mm (unsafe);
- right but refused: not ok, mTRE < 1 mm (useless at the couch);
- wrong and refused: not ok, mTRE >= 1 mm (safe, useless).

Peer: ITK's two-projection registration (``ItkTwoProjectionPeer`` of
``benchmarks/bench_anatomy.py``, same set-up) on the first ``--peer-cases``
cases it can model (sources in the isocentre's axial plane: the default room).

Usage::

    python datasets/realct/build.py --out datasets/realct/out --cases 24
    python benchmarks/bench_anatomy_real.py --set datasets/realct/out [--cases N] [--peer-cases K]

Frames of a clinic-like chain (``build.py --chain clinic``) are dark- and
gain-corrected and their dead lines inpainted first (``FlatField.correct``,
maps from the case's ``geometry.json`` ``flat_field`` extension), inside the
timed part, as the service does. Times are wall (monotonic) and process CPU;
the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spineguide.calibration.io import read_geometry  # noqa: E402
from spineguide.registration.anatomy import AnatomyConfig, AnatomyRegistration, RegionOfInterest  # noqa: E402
from spineguide.registration.ctfile import read_ct  # noqa: E402
from bench_anatomy import override_config, parse_levels  # noqa: E402
from spineguide.registration.pose import Pose  # noqa: E402
from spineguide.registration.similarity import line_integrals  # noqa: E402
from spineguide.tracking.localisation.flatfield import correct_frames, flat_fields_from_geometry_file  # noqa: E402

SUCCESS_MM = 1.0


def _pose(obj) -> Pose:
    return Pose.from_six(obj["translation_mm"], obj["rotation_deg"])


def _frames(folder: Path, files: dict) -> dict:
    return {name: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f))) for name, f in files.items()}


def _mtre(pose: Pose, truth: Pose, pts: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(pose.apply(pts) - truth.apply(pts), axis=1)))


def _timed(fn):
    w, c = time.monotonic(), time.process_time()
    out = fn()
    return out, time.monotonic() - w, time.process_time() - c


def _klass(ok: bool, mtre: float) -> str:
    if ok:
        return "accepted_right" if mtre < SUCCESS_MM else "accepted_wrong"
    return "refused_right" if mtre < SUCCESS_MM else "refused_wrong"


def _level_order(name: str) -> tuple[int, int]:
    """C before T before L, then by number (T5 before T12)."""
    return ("CTL".find(name[:1]), int(name[1:]) if name[1:].isdigit() else 0)


def _summary(rows: list[dict], key: str) -> str:
    n = len(rows)
    k = Counter(r[f"{key}_class"] for r in rows)
    m = np.array([r[f"{key}_mtre"] for r in rows])
    rot = np.array([r[f"{key}_rot"] for r in rows])
    t = np.array([r[f"{key}_s"] for r in rows]) * 1000
    cpu = np.array([r[f"{key}_cpu"] for r in rows]) * 1000
    reasons = Counter(r[f"{key}_reason"] for r in rows if r[f"{key}_reason"] != "ok")
    rs = ", ".join(f"{a} {b}" for a, b in sorted(reasons.items())) or "-"
    return (f"{n} | {100 * k['accepted_right'] / n:.0f}% | {k['accepted_wrong']} | {100 * k['refused_right'] / n:.0f}% | "
            f"{k['refused_wrong']} | {np.median(m):.3f} | {np.percentile(m, 95):.3f} | {np.percentile(rot, 95):.2f} | "
            f"{np.median(t):.0f} / {np.percentile(t, 95):.0f} ({np.median(cpu):.0f}) | {rs}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", required=True, type=Path, action="append",
                        help="folder written by datasets/realct/build.py; repeat for several sets (e.g. the abdomen "
                             "and the chest CT) in one table")
    parser.add_argument("--cases", type=int, default=None, help="first N cases only")
    parser.add_argument("--peer-cases", type=int, default=4, help="cases (the first K the peer can model) also run through the ITK peer")
    parser.add_argument("--roi-neighbours", type=int, choices=(0, 1), default=1,
                        help="ROI = target vertebra (0) or target +-1 level (1); mTRE is always over the target")
    parser.add_argument("--background", choices=("flow", "difference", "exact"), default=None,
                        help="AnatomyConfig.background_derivatives for both modes (default: the config's)")
    parser.add_argument("--set-config", action="append", default=[], metavar="NAME=VALUE",
                        help="override an AnatomyConfig number (e.g. background_volume_factor=2); repeatable")
    parser.add_argument("--levels", default=None, metavar="F,B,S,N[,c];...",
                        help="full-registration pyramid: volume factor, binning, smoothing px, iterations, 'c' for context")
    parser.add_argument("--tracking-levels", default=None, metavar="F,B,S,N;...", help="tracking-mode pyramid")
    parser.add_argument("--only", default=None, help="comma-separated case names (folder names) to run")
    args = parser.parse_args(argv)
    manifests = {s: json.loads((s / "set.json").read_text()) for s in args.set}
    case_dirs = []
    for set_dir in args.set:
        dirs = sorted((set_dir / "cases").iterdir())[: args.cases]
        if args.only:
            wanted = set(args.only.split(","))
            dirs = [d for d in dirs if d.name in wanted]
        case_dirs += dirs
    config = AnatomyConfig()
    if args.background:
        config = replace(config, background_derivatives=args.background, tracking_background_derivatives=args.background)
    if args.levels:
        config = replace(config, levels=parse_levels(args.levels))
    if args.tracking_levels:
        config = replace(config, tracking_levels=parse_levels(args.tracking_levels))
    try:
        config = override_config(config, args.set_config)
    except ValueError as err:
        parser.error(str(err))
    print(f"# bench_anatomy_real: {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, numba {numba.__version__} "
          f"({numba.get_num_threads()} threads), numpy {np.__version__}, python {platform.python_version()}")
    for set_dir, manifest in manifests.items():
        print(f"# set: {set_dir} ({manifest['cases']} cases, source {manifest['source'].get('package', manifest['source'])}"
              f" {manifest['source'].get('ct', '')}, CT {manifest['ct_voxels_ijk']} voxels of {manifest['ct_spacing_mm']} mm, "
              f"i0 {manifest['i0']:g}, truncated levels {manifest['truncated_levels']}); built by: {manifest['command']}")
    print(f"# anatomy config: projector {config.projector}, jacobian {config.jacobian}, background "
          f"{config.background_derivatives}/{config.tracking_background_derivatives}, ROI target +-{args.roi_neighbours}"
          f"{', overrides ' + ' '.join(args.set_config) if args.set_config else ''}")
    print(f"# levels: {[(lv.volume_factor, lv.binning, lv.smoothing_sigma_px, lv.max_iterations, lv.context) for lv in config.levels]}"
          f"; tracking {[(lv.volume_factor, lv.binning, lv.smoothing_sigma_px, lv.max_iterations) for lv in config.tracking_levels]}")
    peer_cls = None
    try:
        from bench_anatomy import ItkTwoProjectionPeer

        import itk

        peer_cls = ItkTwoProjectionPeer
        print(f"# peer: itk {itk.Version.GetITKVersion()} + itk-twoprojectionregistration")
    except ImportError as err:
        print(f"# peer: not available ({err})")

    cts = {s: read_ct(s / "ct.mha") for s in args.set}
    label_maps = {s: sitk.GetArrayFromImage(sitk.ReadImage(str(s / "labels.mha"))) for s in args.set}
    regs, peers, points, flats = {}, {}, {}, {}
    no_peer_rooms: set[str] = set()
    setup_s = {}
    rows, peer_rows = [], []
    load_start = os.getloadavg()
    warm_s = None
    for folder in case_dirs:
        truth = json.loads((folder / "truth.json").read_text())
        set_dir = folder.parent.parent
        ct, labels = cts[set_dir], label_maps[set_dir]
        key = (set_dir, truth["level"], truth["room"])
        iso = truth["isocentre_lps_mm"]
        if key not in regs:
            geometry = read_geometry(folder / "geometry.json")
            # The panel's dark / gain maps and dead lines (clinic-like chain), as a clinic's calibration has them.
            flats[key] = flat_fields_from_geometry_file(folder / "geometry.json")
            roi = RegionOfInterest.from_labels(ct, labels, truth["label"], neighbours=args.roi_neighbours)
            t = time.monotonic()
            regs[key] = AnatomyRegistration(ct, iso, geometry, roi, config)
            setup_s[key] = time.monotonic() - t
            idx = np.argwhere(labels == truth["label"])[:, ::-1].astype(float)
            points[key] = ct.lps_to_room(ct.index_to_lps(idx), iso)
            if peer_cls is not None and len(peer_rows) < args.peer_cases and truth["room"] not in no_peer_rooms:
                try:
                    peers[key] = peer_cls(ct, iso, geometry, roi.mask)
                except ValueError as err:
                    no_peer_rooms.add(truth["room"])
                    print(f"# peer cannot model room {truth['room']!r}: {err}")
        reg, pts = regs[key], points[key]
        i0 = float(truth["i0"])
        pose, tpose = _pose(truth["pose"]), _pose(truth["tracking_pose"])
        raw = _frames(folder, truth["frames"])
        raw2 = _frames(folder, truth["tracking_frames"])
        flat = flats[key]

        def corrected(fr):
            """Dark / gain correction and dead-line inpainting (timed with the registration, as in the service)."""
            return correct_frames(flat, fr)
        if warm_s is None:  # numba load / compile, reported on its own
            _, warm_s, _ = _timed(lambda: reg.register(corrected(raw), i0=i0))
        res, wall, cpu = _timed(lambda: reg.register(corrected(raw), i0=i0))
        trk, twall, tcpu = _timed(lambda: reg.register(corrected(raw2), i0=i0, initial_pose=res.pose, tracking=True))
        r = {
            "case": folder.name if len(args.set) == 1 else f"{set_dir.name}/{folder.name}",
            "level": truth["level"], "room": truth["room"], "projector": truth["projector"],
            "ct": f"{manifests[set_dir]['ct_voxels_ijk']} x {manifests[set_dir]['ct_spacing_mm'][2]:g} mm",
            "target": "cut by the CT's end" if truth["level_truncated"] else "complete",
            "start_mm": float(np.linalg.norm(pose.translation_mm)), "start_deg": pose.angle_deg(),
            "full_mtre": _mtre(res.pose, pose, pts), "full_rot": res.pose.compose(pose.inverse()).angle_deg(),
            "full_s": wall, "full_cpu": cpu, "full_ok": res.quality.ok, "full_reason": res.quality.reason.value,
            "full_reasons": [q.value for q in res.quality.reasons],
            "trk_mtre": _mtre(trk.pose, tpose, pts), "trk_rot": trk.pose.compose(tpose.inverse()).angle_deg(),
            "trk_s": twall, "trk_cpu": tcpu, "trk_ok": trk.quality.ok, "trk_reason": trk.quality.reason.value,
        }
        r["full_class"] = _klass(r["full_ok"], r["full_mtre"])
        r["trk_class"] = _klass(r["trk_ok"], r["trk_mtre"])
        rows.append(r)
        line = (f"  case {r['case']} {r['level']:>3s} {r['room']:>7s} {r['projector']:>11s}: start {r['start_mm']:.1f} mm "
                f"{r['start_deg']:.1f} deg | full mTRE {r['full_mtre']:.3f} mm rot {r['full_rot']:.2f} deg "
                f"{1000 * wall:.0f} ms {'+'.join(r['full_reasons']):>14s} {r['full_class']} | tracking mTRE "
                f"{r['trk_mtre']:.3f} mm {1000 * twall:.0f} ms {r['trk_reason']}")
        peer = peers.get(key)
        if peer is not None and len(peer_rows) < args.peer_cases:
            logs = {k: line_integrals(np.asarray(v), i0, k) for k, v in corrected(raw).items()}
            (ppose, _, _), pwall, pcpu = _timed(lambda: peer.register(logs))
            pm = _mtre(ppose, pose, pts)
            peer_rows.append({"case": r["case"], "level": r["level"], "projector": r["projector"], "mtre": pm,
                              "rot": ppose.compose(pose.inverse()).angle_deg(), "s": pwall, "cpu": pcpu,
                              "ours_mtre": r["full_mtre"], "ours_s": wall, "ours_class": r["full_class"]})
            line += f" || ITK peer mTRE {pm:.3f} mm rot {peer_rows[-1]['rot']:.2f} deg {pwall:.1f} s"
        print(line, flush=True)

    header = ("| group | cases | accepted & within 1 mm | accepted but wrong | right but refused | wrong & refused "
              "| median mTRE mm | p95 mTRE mm | rot err p95 deg | time median / p95 ms (CPU median) | refusal reasons |")
    for mode, title in (("full", "Full registration (from perfect setup)"), ("trk", "Tracking mode (from the full result)")):
        print(f"\n{title}\n")
        print(header)
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| all | {_summary(rows, mode)} |")
        for field in ("target", "ct", "level", "room", "projector"):
            groups = defaultdict(list)
            for r in rows:
                groups[r[field]].append(r)
            if field in ("target", "ct") and len(groups) < 2:
                continue
            for name in sorted(groups, key=_level_order) if field == "level" else sorted(groups):
                print(f"| {field} {name} | {_summary(groups[name], mode)} |")
    print("\nITK two-projection peer, same set-up pairs\n")
    print("| cases | peer within 1 mm | peer median mTRE mm | peer max rot deg | peer median time s (CPU) "
          "| ours on the same cases: accepted & right / median mTRE mm / median time s | speed-up (median wall) |")
    print("|---|---|---|---|---|---|---|")
    if peer_rows:
        p = peer_rows
        pm = np.array([x["mtre"] for x in p])
        print(f"| {len(p)} ({', '.join(x['case'] + ' ' + x['level'] + ' ' + x['projector'] for x in p)}) | "
              f"{int(np.sum(pm < SUCCESS_MM))}/{len(p)} | {np.median(pm):.3f} | {max(x['rot'] for x in p):.2f} | "
              f"{np.median([x['s'] for x in p]):.1f} ({np.median([x['cpu'] for x in p]):.1f}) | "
              f"{sum(x['ours_class'] == 'accepted_right' for x in p)}/{len(p)} / {np.median([x['ours_mtre'] for x in p]):.3f} / "
              f"{np.median([x['ours_s'] for x in p]):.2f} | "
              f"{np.median([x['s'] for x in p]) / np.median([x['ours_s'] for x in p]):.0f}x |")
    else:
        print("| 0 | not run | - | - | - | - | - |")
    print(f"\n# registration setup per (level, room): median {np.median(list(setup_s.values())):.2f} s; first registration "
          f"(incl. numba load/compile) {warm_s:.2f} s; load average at start {load_start[0]:.2f} / end {os.getloadavg()[0]:.2f}")
    wrong = [r for r in rows if r["full_class"] != "accepted_right"]
    if wrong:
        print("# full-registration cases not accepted-and-right: " + "; ".join(
            f"{r['case']} {r['level']} {r['room']} {r['projector']} {r['full_mtre']:.2f} mm {'+'.join(r['full_reasons'])}"
            for r in wrong))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
