"""Diagnose one bodied-phantom calibration case of ``bench_calibration.py --bodies`` (issue 13).

Run:  python benchmarks/diagnose_calibration_case.py pmma-cylinder-mixed 18 [--draws 25] [--noise-free] [--seed-supersampling 16]

1. Re-renders the case exactly as ``bench_bodies`` does (same seeds, depth protocol +-200 mm, clinic chain,
   flat-fielded) and calibrates: each imager's source error, its component along the imager's central axis and
   its error / stated sigma per room axis.
2. Detection error per view (measured minus the true projection, px) against the stated sigma, and BBs whose
   error stays on one side over the views (bias).
3. Jackknife: the source error with each view left out.
4. Protocol precision: exact projections of the same case plus Gaussian noise at the stated detection sigmas (the
   rendered case's, per imager, centre and along-the-axis positions), ``--draws`` draws per protocol variant
   (axis shift +-200/250/300 mm, 1-3 exposures at each along-the-axis position): the stated sigma along the axis,
   the RMS error / sigma and how often the source error passes 1 mm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_calibration as bench  # noqa: E402

from spineguide.calibration.geometry import default_stereo_geometry  # noqa: E402
from spineguide.calibration.phantom import read_phantom  # noqa: E402
from spineguide.calibration.solve import SIGMA_FLOOR_PX, CalibrationFrame, PhantomView, calibrate, solve_geometry  # noqa: E402
from spineguide.tracking.room import perturbed_geometry  # noqa: E402


def _source_line(res, true) -> str:
    out = []
    for sol in res.imagers:
        t = true[sol.geometry.name]
        err = sol.geometry.source_mm - t.source_mm
        sg = sol.source_sigma_mm()
        out.append(f"{sol.geometry.name}: |err| {np.linalg.norm(err):.2f} mm (along its axis {err @ t.normal:+.2f}), "
                   f"err/sigma {np.round(err / sg, 2).tolist()}, sigma {np.round(sg, 2).tolist()} mm")
    return " | ".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("body", choices=bench.BODY_PHANTOMS)
    ap.add_argument("case", type=int)
    ap.add_argument("--draws", type=int, default=25)
    ap.add_argument("--noise-free", action="store_true",
                    help="render without quantum, read-out and offset noise (the deterministic part of the errors)")
    ap.add_argument("--seed-supersampling", type=int, default=None, metavar="N",
                    help="render the BBs with N x N sub-rays per pixel (the clinic chain's default is 4)")
    args = ap.parse_args(argv)
    from spineguide.tracking.room.bb_phantoms import render_bb_phantom
    from spineguide.tracking.room.chain import ChainConfig, DetectorMaps

    nominal = default_stereo_geometry()
    over = {} if args.seed_supersampling is None else {"seed_supersampling": args.seed_supersampling}
    if args.noise_free:
        over.update(quantum_noise=False, electronic_noise_counts=0.0, offset_rms_counts=0.0)
    chain = ChainConfig.clinic(i0=bench.I0, **over)
    maps = [DetectorMaps.make(im.rows, im.cols, chain, k) for k, im in enumerate(nominal.imagers)]
    ph = read_phantom(Path(__file__).resolve().parents[1] / "calibration" / "data" / f"{args.body}.json")
    rng = np.random.default_rng(1300 + args.case)
    true = perturbed_geometry(nominal, rng)
    frames = []
    for shift, imagers in bench.couch_protocol("depth", nominal):
        ff = bench._flat_fielded(render_bb_phantom(true, ph, chain, couch_shift_mm=shift, seed=rng), true, maps)
        frames += [CalibrationFrame(n, ff[n], shift) for n in imagers]
    res = calibrate(ph, frames, nominal)
    views = res.views
    print(f"{args.body} case {args.case}, depth protocol +-{bench.AXIS_SHIFT_MM:g} mm, rendered"
          f"{' noise-free' if args.noise_free else ''}, {chain.seed_supersampling}x{chain.seed_supersampling} sub-rays per BB pixel:")
    print("  " + _source_line(res, true))
    print("detection error per view (measured - true projection) against sqrt(sigma^2 + floor^2):")
    zs = {n: [] for n in nominal.names}
    for v in views:
        d = v.marker_px - true[v.imager].project(ph.placed_mm(v.couch_shift_mm))
        s = np.sqrt(np.asarray(v.marker_sigma_px) ** 2 + SIGMA_FLOOR_PX**2)
        z = d / s[:, None]
        zs[v.imager].append(z)
        k = int(np.nanargmax(np.linalg.norm(z, axis=1)))
        print(f"  {v.imager} at {np.round(v.couch_shift_mm, 1).tolist()}: RMS {np.sqrt(np.nanmean(np.sum(d**2, 1))):.3f} px,"
              f" RMS z {np.sqrt(np.nanmean(z**2)):.2f}, worst {ph.names[k]} |z| {np.linalg.norm(z[k]):.1f}")
    for n, zz in zs.items():
        zz = np.array(zz)
        bias = np.nanmean(zz, 0) * np.sqrt(np.sum(np.isfinite(zz[..., 0]), 0))[:, None]
        flagged = [f"{ph.names[i]} {np.round(bias[i], 1).tolist()}" for i in range(len(bias)) if np.max(np.abs(bias[i])) > 3]
        print(f"  imager {n}: BBs with a one-sided error over the views (mean z x sqrt(n) > 3): {flagged or 'none'}")
    print("jackknife (one view left out):")
    for i, v in enumerate(views):
        r = solve_geometry(ph, tuple(w for j, w in enumerate(views) if j != i), nominal)
        print(f"  without {v.imager} at {np.round(v.couch_shift_mm, 1).tolist()}: " + _source_line(r, true))
    if args.draws <= 0:
        return
    # Protocol precision from the stated sigmas (Gaussian noise, exact projections).
    sig = {}
    for v in views:
        kind = "axis" if np.count_nonzero(np.abs(v.couch_shift_mm) > 1) == 2 else "centre"
        sig.setdefault((v.imager, kind), []).append(np.asarray(v.marker_sigma_px))
    sig = {k: np.nanmean(np.array(a), 0) for k, a in sig.items()}
    noise = np.random.default_rng(11)
    print(f"protocol precision, {args.draws} Gaussian draws at the stated sigmas:")
    for ax, reps in ((200, 1), (200, 2), (250, 1), (300, 1), (300, 2), (300, 3)):
        plan = bench.couch_protocol("depth", nominal, ax)
        za, sa, errs = [], [], []
        for _ in range(args.draws):
            vs = []
            for shift, ims in plan:
                kind = "axis" if len(ims) == 1 else "centre"
                for n in ims:
                    for _ in range(reps if kind == "axis" else 1):
                        s = sig[(n, kind)]
                        px = true[n].project(ph.placed_mm(shift)) + noise.normal(size=(len(s), 2)) * s[:, None]
                        vs.append(PhantomView(n, shift, px, "synthetic", s))
            for sol in solve_geometry(ph, tuple(vs), nominal).imagers:
                t = true[sol.geometry.name]
                e = sol.geometry.source_mm - t.source_mm
                za.append(e @ t.normal)
                # The uncertainty lies almost entirely along the axis (the source distance): |sigma| is its size.
                sa.append(float(np.linalg.norm(sol.source_sigma_mm())))
                errs.append(float(np.linalg.norm(e)))
        za, sa, errs = map(np.asarray, (za, sa, errs))
        print(f"  +-{ax} mm, {reps} exposure(s) per along-the-axis position: error along the axis RMS "
              f"{np.sqrt(np.mean(za**2)):.2f} mm, stated sigma along it median {np.median(sa):.2f} mm, "
              f"|source error| max {errs.max():.2f} mm, > 1 mm in {int(np.sum(errs > 1))}/{len(errs)}")


if __name__ == "__main__":
    main()
