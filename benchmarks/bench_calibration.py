"""Benchmark: BB-phantom geometry calibration and daily QA in the virtual room (issue 6).

Run:  python benchmarks/bench_calibration.py [--cases 30] [--qa-trials 100]

For each case a true geometry is drawn off the nominal default room (1024 px
panels of 0.4 mm) by a 20 mm source shift, a 10 mm panel shift and a 2 degree
panel rotation in random directions (the issue's largest perturbations), the
room's renderer (``spineguide.tracking.room.render_bb_frames``, i0 = 20000, Poisson
noise, 0.5 px detector blur, 8x8 sub-rays per pixel) makes frames of the
default phantom at 7 couch positions (centre and +-50 mm along each axis), and
``spineguide.calibration.solve.calibrate`` solves from the raw frames with the nominal
geometry as its only prior. Reported against the issue's targets:

- reprojection error of 11^3 held-out points filling a 200 mm cube (RMS px);
- triangulation error of exact projections of the isocentre and the cube's
  8 corners through the calibrated geometry (mm);
- source position error (mm), from 7 positions and from the centre position
  alone, and its honesty: each axis' error over its reported sigma;
- QA: today's frames of the true room (new noise) against the stored
  calibration, unperturbed and with one panel shifted 0.5 mm in a random
  in-plane direction.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry, default_stereo_geometry  # noqa: E402
from spineguide.calibration.phantom import default_phantom  # noqa: E402
from spineguide.calibration.protocol import AXIS_EXPOSURES, AXIS_SHIFT_MM, depth_protocol  # noqa: E402
from spineguide.calibration.qa import QAStatus, run_qa  # noqa: E402
from spineguide.calibration.qa_causes import CAUSES  # noqa: E402
from spineguide.calibration.solve import CalibrationFrame, calibrate  # noqa: E402
from spineguide.tracking.room import DetectorModel, perturbed_geometry, render_bb_frames  # noqa: E402

I0 = 20000.0
SHIFTS_MM = [(0.0, 0.0, 0.0)] + [tuple(s * e) for e in 50.0 * np.eye(3) for s in (1.0, -1.0)]
DETECTOR = DetectorModel(seed_supersampling=8)


def panel_shifted(geometry: StereoGeometry, name: str, shift_mm: float, rng) -> StereoGeometry:
    out = []
    for im in geometry.imagers:
        if im.name == name:
            ang = rng.uniform(0, 2 * np.pi)
            d = shift_mm * (np.cos(ang) * im.col_direction + np.sin(ang) * im.row_direction)
            im = ImagerGeometry(im.name, im.source_mm, im.origin_mm + d, im.col_direction, im.row_direction,
                                im.pixel_spacing_mm, im.rows, im.cols)
        out.append(im)
    return StereoGeometry(tuple(out))


def frames_at(true, phantom, shift, seed):
    bf = render_bb_frames(true, phantom.placed_mm(shift), phantom.diameters_mm, "tungsten", I0, detector=DETECTOR,
                          seed=seed)
    return [CalibrationFrame(n, bf.frames[n], shift, i0=I0) for n in true.names]


def stats(values):
    a = np.asarray(values, dtype=np.float64)
    return f"{np.median(a):9.4f} {np.percentile(a, 95):9.4f} {a.max():9.4f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30, help="uniform-phantom cases (the issue-6 benchmark)")
    parser.add_argument("--qa-trials", type=int, default=100)
    parser.add_argument("--bodies", type=int, default=None, metavar="N",
                        help="instead: N cases per bodied phantom through the clinic chain (issue 13)")
    parser.add_argument("--bodies-start", type=int, default=0, help="first case index (new seeds for more cases)")
    parser.add_argument("--body", action="append", choices=BODY_PHANTOMS, default=None,
                        help="with --bodies: only this phantom (repeatable; default all three)")
    parser.add_argument("--positions", type=int, default=7, help="couch positions per calibration (--bodies)")
    parser.add_argument("--protocol", choices=("depth", "axes"), default="depth", help="couch protocol (--bodies)")
    parser.add_argument("--axis-shift-mm", type=float, default=AXIS_SHIFT_MM,
                        help="depth protocol: couch shift along each imager's central axis, mm")
    parser.add_argument("--axis-exposures", type=int, default=AXIS_EXPOSURES,
                        help="depth protocol: exposures (independent frames) at each shifted-along-the-axis position")
    parser.add_argument("--seed-supersampling", type=int, default=16, metavar="N",
                        help="--bodies: render the BBs with N x N sub-rays per pixel (the clinic chain's default 4 "
                             "aliases the shadow's edge: ~0.01 px per BB of the simulator's own, deterministic per "
                             "geometry; 16 by default here)")
    parser.add_argument("--single-exposures", type=int, default=SINGLE_EXPOSURES, metavar="K",
                        help="--bodies: exposures per imager of the one-position calibration (all at the centre)"),
    parser.add_argument("--couch-error-mm", type=float, default=0.0, metavar="S",
                        help="--bodies: the couch puts the phantom off the reported shift by N(0, S) mm per axis at "
                             "each position but the centre (the calibration is told the reported shift)")
    parser.add_argument("--couch-sigma-mm", type=float, default=0.0, metavar="S",
                        help="--bodies: calibrate with this couch accuracy (fits each position's couch error)")
    parser.add_argument("--qa", type=int, default=None, metavar="N",
                        help="instead: N daily-QA pairs per condition on the bodied cube (issue 13)")
    parser.add_argument("--qa-start", type=int, default=0, help="first QA pair index (new seeds for more pairs)")
    parser.add_argument("--qa-conditions", default=",".join(QA_CONDITIONS),
                        help="comma-separated subset of: " + ", ".join(QA_CONDITIONS))
    args = parser.parse_args(argv)
    if args.qa is not None:
        conditions = tuple(c.strip() for c in args.qa_conditions.split(","))
        unknown = [c for c in conditions if c not in QA_CONDITIONS]
        if unknown:
            raise SystemExit(f"unknown QA condition(s) {unknown}: choose from {list(QA_CONDITIONS)}")
        bench_qa(args.qa, start=args.qa_start, conditions=conditions)
        return
    if args.bodies is not None:
        bench_bodies(args.bodies, args.positions, args.protocol, args.bodies_start, tuple(args.body or BODY_PHANTOMS),
                     args.axis_shift_mm, args.axis_exposures, args.seed_supersampling, args.single_exposures,
                     args.couch_error_mm, args.couch_sigma_mm)
        return

    nominal = default_stereo_geometry()
    phantom = default_phantom()
    g = np.linspace(-100.0, 100.0, 11)
    cube = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    corners = np.array([[x, y, z] for x in (-100, 100) for y in (-100, 100) for z in (-100, 100)], dtype=float)

    # Warm-up (numba compile of the renderer, first-call overheads), reported on its own.
    t0 = time.perf_counter()
    calibrate(phantom, frames_at(nominal, phantom, SHIFTS_MM[0], 0), nominal)
    warm_s = time.perf_counter() - t0

    held_rms, tri_iso, tri_corner, src_err, src_err_single, z_all, iso_dist, t_cal, t_solve_only = ([] for _ in range(9))
    stored = []
    for case in range(args.cases):
        rng = np.random.default_rng(1000 + case)
        true = perturbed_geometry(nominal, rng)
        frames = []
        for i, s in enumerate(SHIFTS_MM):
            frames += frames_at(true, phantom, s, 10_000 * case + i)
        t0 = time.perf_counter()
        result = calibrate(phantom, frames, nominal)
        t_cal.append(time.perf_counter() - t0)
        single = calibrate(phantom, frames[:2], nominal)
        geom = result.geometry
        stored.append((true, geom))
        for sol in result.imagers:
            t = true[sol.geometry.name]
            held_rms.append(float(np.sqrt(np.mean(np.sum((sol.geometry.project(cube) - t.project(cube)) ** 2, axis=1)))))
            err = sol.geometry.source_mm - t.source_mm
            src_err.append(float(np.linalg.norm(err)))
            z_all.extend((err / sol.source_sigma_mm()).tolist())
            s1 = single.imager(sol.geometry.name).geometry.source_mm - t.source_mm
            src_err_single.append(float(np.linalg.norm(s1)))
        pts = np.vstack([[0.0, 0.0, 0.0], corners])
        tri = geom.triangulate({n: true[n].project(pts) for n in geom.names})
        d = np.linalg.norm(tri.points_mm - pts, axis=1)
        tri_iso.append(float(d[0]))
        tri_corner.append(float(d[1:].max()))
        iso_dist.append(result.isocentre.distance_from_isocentre_mm)
        print(f"case {case:2d}: held-out RMS {max(held_rms[-2:]):.4f} px, tri iso {d[0]:.4f} mm, "
              f"corners {d[1:].max():.4f} mm, source err {max(src_err[-2:]):.3f} mm "
              f"(single position {max(src_err_single[-2:]):.2f} mm), {t_cal[-1]:.2f} s", flush=True)

    # QA: stored calibration of a case vs today's frames of its true room.
    qa_ok_pass, qa_shift_detect, t_qa = 0, 0, []
    for trial in range(args.qa_trials):
        true, geom = stored[trial % len(stored)]
        rng = np.random.default_rng(50_000 + trial)
        t0 = time.perf_counter()
        r = run_qa(geom, phantom, frames_at(true, phantom, SHIFTS_MM[0], 60_000 + trial))
        t_qa.append(time.perf_counter() - t0)
        qa_ok_pass += r.status is QAStatus.PASS
        shifted = panel_shifted(true, geom.names[trial % 2], 0.5, rng)
        r2 = run_qa(geom, phantom, frames_at(shifted, phantom, SHIFTS_MM[0], 70_000 + trial))
        qa_shift_detect += r2.status is not QAStatus.PASS

    z = np.abs(np.asarray(z_all))
    n_im = len(src_err)
    print()
    print("## Calibration benchmark (issue 6)")
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"command: python benchmarks/bench_calibration.py --cases {args.cases} --qa-trials {args.qa_trials}")
    print(f"{args.cases} cases x 2 imagers, default room 1024 px @ 0.4 mm, default phantom (16 W BBs of 2 mm), "
          f"7 couch positions, i0 = {I0:g}; warm-up {warm_s:.1f} s")
    print()
    print(f"| {'metric':<52} | {'median':>9} | {'p95':>9} | {'max':>9} | target |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 11}|{'-' * 11}|--------|")
    rows = [
        ("held-out reprojection RMS, 200 mm cube (px)", held_rms, "<= 0.1"),
        ("triangulation error at isocentre (mm)", tri_iso, "<= 0.1"),
        ("triangulation error, worst cube corner (mm)", tri_corner, "<= 0.2"),
        ("source position error, 7 positions (mm)", src_err, "<= 1"),
        ("source position error, centre position only (mm)", src_err_single, "-"),
        ("|error| / reported sigma per source axis", z, "~<= 3"),
        ("centre BB distance from isocentre (mm)", iso_dist, "<= 0.5"),
        ("calibrate() from 14 raw frames (s)", t_cal, "-"),
        ("run_qa() from 2 raw frames (s)", t_qa, "-"),
    ]
    for label, vals, target in rows:
        med, p95, mx = stats(vals).split()
        print(f"| {label:<52} | {med:>9} | {p95:>9} | {mx:>9} | {target:>6} |")
    print()
    print(f"uncertainty honesty: {np.mean(z <= 3.0) * 100:.1f} % of {len(z)} source-axis errors within 3 sigma "
          f"(99.7 % expected), RMS of error/sigma {np.sqrt(np.mean(z**2)):.2f} (1 expected)")
    print(f"QA: 0.5 mm panel shift detected in {qa_shift_detect}/{args.qa_trials} trials (target >= 95 %); "
          f"unperturbed repeats passing: {qa_ok_pass}/{args.qa_trials} (target: all)")
    print(f"cases meeting every target: held-out {sum(h <= 0.1 for h in held_rms)}/{n_im}, "
          f"tri iso {sum(t <= 0.1 for t in tri_iso)}/{args.cases}, corners {sum(t <= 0.2 for t in tri_corner)}/{args.cases}, "
          f"source {sum(s <= 1.0 for s in src_err)}/{n_im}")


BODY_PHANTOMS = ("pmma-cube-150", "pmma-cylinder-mixed", "pmma-cube-inserts")
#: Exposures per imager of the one-position calibration (all at the centre).
SINGLE_EXPOSURES = 4


def couch_protocol(name: str, nominal, axis_shift_mm: float = AXIS_SHIFT_MM
                   ) -> list[tuple[tuple[float, float, float], tuple[str, ...]]]:
    """Couch positions of a calibration and which imagers take a frame at each (room frame, mm), one per position.

    ``axes``: centre and +-50 mm along X, Y, Z, both imagers (the older benchmark's set).
    ``depth``: :func:`spineguide.calibration.protocol.depth_protocol` with one exposure per position (the
    benchmark repeats the along-the-axis ones ``--axis-exposures`` times): centre and +-50 mm along Y (both
    imagers), then +-``axis_shift_mm`` along each imager's central axis (that imager only).
    """
    if name == "axes":
        return [(tuple(map(float, sh)), nominal.names) for sh in SHIFTS_MM]
    if name != "depth":
        raise SystemExit(f"unknown protocol {name!r} (axes or depth)")
    return [(e.couch_shift_mm, e.imagers) for e in depth_protocol(nominal, axis_shift_mm=axis_shift_mm, axis_exposures=1)]


def _flat_fielded(bf, geometry, maps) -> dict:
    """Raw chain frames corrected with the panel's own offset/gain maps (what a clinic's flat-field does)."""
    out = {}
    for k, im in enumerate(geometry.imagers):
        m = maps[k]
        out[im.name] = np.where(m.dead, 0.0, (bf.frames[im.name] - m.offset_counts) / m.gain).clip(0.0)
    return out


def _overlapping_phantom(ph, j: int, imager):
    """``ph`` plus a stray BB 'X' 6 mm behind marker ``j`` along ``imager``'s ray and 0.4 diameters aside:
    its shadow overlaps marker j's in that imager only (for rendering; the calibration keeps using ``ph``)."""
    from spineguide.calibration.phantom import BBPhantom, Marker

    p = ph.positions_mm[j]
    ray = (p - imager.source_mm) / np.linalg.norm(p - imager.source_mm)
    aside = np.cross(ray, imager.col_direction)
    aside /= np.linalg.norm(aside)
    d = float(ph.diameters_mm[j])
    stray = Marker("X", p + 6.0 * ray + 0.4 * d * aside, d, ph.markers[j].material)
    return BBPhantom(tuple(ph.markers) + (stray,), ph.name + "+X", ph.centre_offset_mm, ph.body)


def bench_bodies(cases: int, n_positions: int, protocol: str = "depth", start: int = 0,
                 bodies: tuple[str, ...] = BODY_PHANTOMS, axis_shift_mm: float = AXIS_SHIFT_MM,
                 axis_exposures: int = AXIS_EXPOSURES, seed_supersampling: int = 16,
                 single_exposures: int = SINGLE_EXPOSURES, couch_error_mm: float = 0.0,
                 couch_sigma_mm: float = 0.0) -> None:
    """Issue 13: bodied phantoms through the clinic chain (ChainConfig.clinic, i0 20000), frames flat-field corrected
    with the panel's own maps, phantom on the lasers, ``n_positions`` couch positions (centre, +-50 mm along X, Y, Z,
    in that order); calibrate + acceptance gate. The one-position solves use the same case's centre frames: its first
    pair alone ("1 position") and with ``single_exposures - 1`` more pairs rendered there ("1 position x K"). Gate
    catch rates: the phantom file wrong by 1 mm for one BB (random BB and axis; re-solved from the same detections),
    and a stray BB overlapping one BB's shadow in one imager (one extra rendering of the centre position)."""
    import dataclasses

    from spineguide.calibration.gate import acceptance_gate
    from spineguide.calibration.phantom import BBPhantom, Marker, read_phantom
    from spineguide.calibration.solve import solve_geometry
    from spineguide.tracking.room.bb_phantoms import render_bb_phantom
    from spineguide.tracking.room.chain import ChainConfig, DetectorMaps

    nominal = default_stereo_geometry()
    chain = ChainConfig.clinic(i0=I0, seed_supersampling=seed_supersampling)
    maps = [DetectorMaps.make(im.rows, im.cols, chain, k) for k, im in enumerate(nominal.imagers)]
    g = np.linspace(-100.0, 100.0, 11)
    held = np.stack(np.meshgrid(g, g, g), axis=-1).reshape(-1, 3)
    corners = np.array([[x, y, z] for x in (-75.0, 75.0) for y in (-75.0, 75.0) for z in (-75.0, 75.0)])
    plan = couch_protocol(protocol, nominal, axis_shift_mm)[:n_positions]
    # Repeated exposures at the one-imager (along-the-axis) positions: independent frames, each its own noise.
    plan = [entry for entry in plan for _ in range(axis_exposures if len(entry[1]) == 1 else 1)]
    print(f"command: python benchmarks/bench_calibration.py --bodies {cases} --positions {n_positions} --protocol {protocol}"
          + (f" --bodies-start {start}" if start else "")
          + (f" --axis-shift-mm {axis_shift_mm:g}" if axis_shift_mm != AXIS_SHIFT_MM else "")
          + (f" --axis-exposures {axis_exposures}" if axis_exposures != AXIS_EXPOSURES else "")
          + (f" --seed-supersampling {seed_supersampling}" if seed_supersampling != 16 else "")
          + (f" --single-exposures {single_exposures}" if single_exposures != SINGLE_EXPOSURES else "")
          + (f" --couch-error-mm {couch_error_mm:g}" if couch_error_mm else "")
          + (f" --couch-sigma-mm {couch_sigma_mm:g}" if couch_sigma_mm else "")
          + ("".join(f" --body {b}" for b in bodies) if tuple(bodies) != BODY_PHANTOMS else ""))
    print(f"clinic chain i0 {I0:g}, protocol {protocol}: {n_positions} couch positions "
          f"({'; '.join(str(list(sh)) + ' ' + '+'.join(ims) for sh, ims in plan)}), flat-field corrected; machine "
          f"{platform.machine()}, python {platform.python_version()}, numpy {np.__version__}")
    rows = []
    for body in bodies:
        ph = read_phantom(Path(__file__).resolve().parents[1] / "calibration" / "data" / f"{body}.json")
        acc = {k: [] for k in ("held", "held1", "heldk", "iso", "corner", "iso1", "corner1", "isok", "cornerk",
                               "src", "src1", "srck", "z", "secs")}
        passes, catches, overlap_catches, refused = 0, 0, 0, []
        for case in range(start, start + cases):
            t0 = time.monotonic()
            rng = np.random.default_rng(1300 + case)
            true = perturbed_geometry(nominal, rng)
            frames = []
            # Couch positioning error (--couch-error-mm): the phantom is rendered where the couch really put it, the
            # calibration is given the shift the couch reports; one error per position (its exposures share it),
            # none at the centre (the setup position itself), drawn from a stream of its own.
            rng_couch = np.random.default_rng(9000 + case)
            real = {sh: np.asarray(sh) + (rng_couch.normal(0.0, couch_error_mm, 3) if k and couch_error_mm > 0 else 0.0)
                    for k, sh in enumerate(dict.fromkeys(sh for sh, _ in plan))}
            for shift, imagers in plan:
                bf = render_bb_phantom(true, ph, chain, couch_shift_mm=tuple(real[shift]), seed=rng)
                ff = _flat_fielded(bf, true, maps)
                frames += [CalibrationFrame(n, ff[n], shift) for n in imagers]
            centre = list(frames[:2])
            for _ in range(single_exposures - 1):
                bf = render_bb_phantom(true, ph, chain, couch_shift_mm=plan[0][0], seed=rng)
                ff = _flat_fielded(bf, true, maps)
                centre += [CalibrationFrame(n, ff[n], plan[0][0]) for n in plan[0][1]]
            try:
                res = calibrate(ph, frames, nominal, couch_sigma_mm=couch_sigma_mm)
                single = calibrate(ph, frames[:2], nominal)
                single_k = calibrate(ph, centre, nominal)
            except Exception as err:  # noqa: BLE001 - a refused case is a result
                refused.append(f"{body} case {case}: refused: {err}")
                print(refused[-1], flush=True)
                continue
            gate = acceptance_gate(res)
            passes += gate.passed
            if not gate.passed:
                print(f"{body} case {case}: right file failed the gate: {'; '.join(gate.findings)}", flush=True)
            for sol in res.imagers:
                t = true[sol.geometry.name]
                acc["held"].append(float(np.sqrt(np.mean(np.sum((sol.geometry.project(held) - t.project(held)) ** 2, axis=1)))))
                err = sol.geometry.source_mm - t.source_mm
                acc["src"].append(float(np.linalg.norm(err)))
                acc["z"].extend((err / sol.source_sigma_mm()).tolist())
                for one, suffix in ((single, "1"), (single_k, "k")):
                    s1 = one.imager(sol.geometry.name).geometry
                    acc["src" + suffix].append(float(np.linalg.norm(s1.source_mm - t.source_mm)))
                    acc["held" + suffix].append(float(np.sqrt(np.mean(np.sum((s1.project(held) - t.project(held)) ** 2,
                                                                             axis=1)))))
            for pts, key in ((np.zeros((1, 3)), "iso"), (corners, "corner")):
                for r, suffix in ((res, ""), (single, "1"), (single_k, "k")):
                    tri = r.geometry.triangulate({n: true[n].project(pts) for n in true.names})
                    acc[key + suffix].append(float(np.max(np.linalg.norm(tri.points_mm - pts, axis=1))))
            # Gate: one BB 1 mm wrong in the phantom file (same detections, re-solved).
            j, axis = int(rng.integers(ph.n_markers)), int(rng.integers(3))
            try:  # a moved centre BB makes the file invalid: refused = caught
                moved = BBPhantom(tuple(Marker(mk.name, mk.position_mm + (np.eye(3)[axis] if i == j else 0.0),
                                               mk.diameter_mm, mk.material) for i, mk in enumerate(ph.markers)),
                                  "wrong", ph.centre_offset_mm, ph.body)
                wrong = dataclasses.replace(solve_geometry(moved, res.views, nominal, couch_sigma_mm=couch_sigma_mm), measured=res.measured)
                g_wrong = acceptance_gate(wrong)
                catches += (not g_wrong.passed) and ph.names[j] in g_wrong.failed_bbs
            except Exception:  # noqa: BLE001 - refusing the wrong file is a catch
                catches += 1
            # Gate: a stray BB overlapping marker k's shadow in one imager (centre position re-rendered).
            k = int(rng.integers(ph.n_markers))
            im = true.imagers[int(rng.integers(len(true.imagers)))]
            bf = render_bb_phantom(true, _overlapping_phantom(ph, k, im), chain, seed=rng)
            ff = _flat_fielded(bf, true, maps)
            frames_x = [CalibrationFrame(n, ff[n], plan[0][0]) for n in true.names] + frames[2:]
            try:
                g_x = acceptance_gate(calibrate(ph, frames_x, nominal, couch_sigma_mm=couch_sigma_mm))
                overlap_catches += (not g_x.passed) and ph.names[k] in g_x.failed_bbs
            except Exception:  # noqa: BLE001 - a refused calibration is a catch
                overlap_catches += 1
            acc["secs"].append(time.monotonic() - t0)
            print(f"{body} case {case}: held-out {max(acc['held'][-2:]):.3f} px, source {max(acc['src'][-2:]):.2f} mm "
                  f"(1 position {max(acc['src1'][-2:]):.2f}), tri corners {acc['corner'][-1]:.3f} mm, gate "
                  f"{'pass' if gate.passed else 'FAIL'}, {acc['secs'][-1]:.0f} s", flush=True)
        rows.append((body, acc, passes, catches, overlap_catches, refused))
    print()
    print(f"Several couch positions ({n_positions}; {axis_exposures} exposure(s) at each along-the-axis position):")
    print()
    print("| body | cases solved | held-out RMS px median / max | tri iso mm median / max | tri corners mm median / max | "
          "source mm median / max | source > 1 mm | src err/sigma RMS | gate passes (right file) | "
          "gate catches 1 mm moved | gate catches overlap | s/case |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for body, a, passes, catches, ov, refused in rows:
        n = len(a["secs"])
        if n == 0:
            print(f"| {body} | 0 of {cases} | " + " | ".join(["-"] * 10) + " |")
            continue
        zz = np.asarray(a["z"])

        def mm(key, f="{:.3f}"):
            return _median_max(a[key], f)
        print(f"| {body} | {n} of {cases} | {mm('held')} | {mm('iso')} | {mm('corner')} | {mm('src', '{:.2f}')} | "
              f"{sum(v > 1.0 for v in a['src'])} of {len(a['src'])} imagers | {np.sqrt(np.mean(zz**2)):.2f} | "
              f"{passes}/{n} | {catches}/{n} | {ov}/{n} | {np.mean(a['secs']):.0f} |")
    print()
    print(f"One couch position (the centre), 1 exposure and {single_exposures} exposures per imager:")
    print()
    print("| body | exposures | held-out RMS px median / max | tri iso mm median / max | tri corners mm median / max | "
          "source mm median / max |")
    print("|---|---|---|---|---|---|")
    for body, a, *_ in rows:
        if not a["secs"]:
            continue
        for suffix, k in (("1", 1), ("k", single_exposures)):
            print(f"| {body} | {k} | {_median_max(a['held' + suffix])} | {_median_max(a['iso' + suffix])} | "
                  f"{_median_max(a['corner' + suffix])} | {_median_max(a['src' + suffix], '{:.2f}')} |")


def _median_max(values, fmt: str = "{:.3f}") -> str:
    """``median / max`` of ``values``, each formatted with ``fmt`` (a table cell)."""
    return f"{fmt.format(np.median(values))} / {fmt.format(np.max(values))}"


QA_CONDITIONS = ("none", "panel shift 0.3 mm", "panel rotation 0.3 deg", "source shift 1 mm")


def _changed(geometry, condition: str, rng):
    """``geometry`` with one imager changed as ``condition`` says (random imager and direction), and that imager."""
    from spineguide.calibration.solve import _geometry_of, _Reference

    if condition == "none":
        return geometry, None
    k = int(rng.integers(len(geometry.imagers)))
    im = geometry.imagers[k]
    ref = _Reference.of(im)
    x = np.zeros(9)
    if condition.startswith("panel shift"):
        ang = rng.uniform(0.0, 2.0 * np.pi)
        x[3:6] = 0.3 * (np.cos(ang) * im.col_direction + np.sin(ang) * im.row_direction)
    elif condition.startswith("panel rotation"):
        x[6:9] = 0.3 * rng.choice([-1.0, 1.0]) * im.normal
    else:
        d = rng.normal(size=3)
        x[0:3] = 1.0 * d / np.linalg.norm(d)
    out = list(geometry.imagers)
    out[k] = _geometry_of(ref, x, False)
    return StereoGeometry(tuple(out), geometry.calibrated_unix_s, geometry.notes), im.name


def _clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided ``level`` interval of a binomial proportion ``k / n``."""
    from scipy.stats import beta

    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def bench_qa(trials: int, body: str = "pmma-cube-150", start: int = 0, conditions=QA_CONDITIONS) -> None:
    """Issue 13 item 5: daily QA with setup errors up to 2 mm / 1 deg (uniform magnitude, random direction) through
    the clinic chain (one stereo pair, flat-field corrected), against a stored geometry equal to the true room
    (a perfect calibration, so that only QA is measured); per condition ``trials`` pairs. Caught = status not PASS;
    named = the changed imager among those QA names with the right cause as its best explanation."""
    from spineguide.calibration.phantom import read_phantom
    from spineguide.calibration.qa import QAStatus
    from spineguide.tracking.room.bb_phantoms import SetupError, render_bb_phantom
    from spineguide.tracking.room.chain import ChainConfig, DetectorMaps

    nominal = default_stereo_geometry()
    chain = ChainConfig.clinic(i0=I0)
    maps = [DetectorMaps.make(im.rows, im.cols, chain, k) for k, im in enumerate(nominal.imagers)]
    ph = read_phantom(Path(__file__).resolve().parents[1] / "calibration" / "data" / f"{body}.json")
    print(f"command: python benchmarks/bench_calibration.py --qa {trials}" + (f" --qa-start {start}" if start else "")
          + (f" --qa-conditions '{','.join(conditions)}'" if tuple(conditions) != QA_CONDITIONS else ""))
    rows, limits, separation = [], {}, {}
    for condition in conditions:
        caught, named, fails, secs, setup_err = 0, 0, 0, [], []
        among, wrong, other_flagged = 0, 0, 0
        for trial in range(start, start + trials):
            rng = np.random.default_rng(90_000 + 1000 * QA_CONDITIONS.index(condition) + trial)
            stored = perturbed_geometry(nominal, rng)
            today, which = _changed(stored, condition, rng)
            setup = SetupError.random(rng, 2.0, 1.0)
            bf = render_bb_phantom(today, ph, chain, setup=setup, seed=rng)
            ff = _flat_fielded(bf, today, maps)
            t0 = time.monotonic()
            r = run_qa(stored, ph, [CalibrationFrame(n, ff[n]) for n in stored.names])
            secs.append(time.monotonic() - t0)
            caught += r.status is not QAStatus.PASS
            fails += r.status is QAStatus.FAIL
            setup_err.append(float(np.linalg.norm(r.causes.setup.translation_mm - setup.translation_mm)))
            if which is not None:
                v = r.causes.verdicts[which]
                cands = {t.cause for t in v.candidates}
                right = next(c for c in CAUSES if condition.startswith(c))
                named += v.named is not None and v.named.cause == right
                among += right in cands and len(cands) > 1
                wrong += v.changed and right not in cands
                other_flagged += any(n != which for n in r.causes.changed_imagers)
            for d in r.causes.limits:
                limits.setdefault((d.imager, d.cause), []).append((d.best, d.worst))
            for d in r.causes.separation:
                separation.setdefault((d.imager, d.cause, d.rival), []).append((d.best, d.worst))
            print(f"QA {condition} trial {trial}: {r.status.value}"
                  + (f" ({'; '.join(r.reasons)})" if r.reasons else ""), flush=True)
        rows.append((condition, caught, named, among, wrong, other_flagged, fails, np.median(setup_err),
                     np.median(secs)))
    print()
    print(f"| condition ({trials} pairs each, setup errors <= 2 mm / 1 deg) | flagged (ACTION or FAIL), 95 % CI | FAIL | "
          "right cause named alone | right cause among several candidates | right cause not a candidate | "
          "other imager also flagged | setup translation error mm (median) | run_qa s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for condition, caught, named, among, wrong, other, fails, se, sec in rows:
        lo, hi = _clopper_pearson(caught, trials)
        f = (lambda k: "-") if condition == "none" else (lambda k: f"{k}/{trials}")
        print(f"| {condition} | {caught}/{trials} ({100 * lo:.1f}-{100 * hi:.1f} %) | {fails}/{trials} | {f(named)} | "
              f"{f(among)} | {f(wrong)} | {f(other)} | {se:.3f} | {sec:.1f} |")
    print()
    print("| imager | cause | detection limit (95 % power), best direction, median | worst direction, median |")
    print("|---|---|---|---|")
    for (imager, cause), v in sorted(limits.items()):
        a = np.array(v)
        unit = "deg" if cause == "panel rotation" else "mm"
        print(f"| {imager} | {cause} | {np.median(a[:, 0]):.3f} {unit} | {np.median(a[:, 1]):.3f} {unit} |")
    print()
    print("| imager | cause | told from (rival excluded, 95 % power) | best direction, median | worst direction, median |")
    print("|---|---|---|---|---|")
    for (imager, cause, rival), v in sorted(separation.items()):
        a = np.array(v)
        unit = "deg" if cause == "panel rotation" else "mm"
        print(f"| {imager} | {cause} | {rival} | {np.median(a[:, 0]):.3f} {unit} | {np.median(a[:, 1]):.3f} {unit} |")


if __name__ == "__main__":
    main()
