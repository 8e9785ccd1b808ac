"""Benchmark: stereo anatomy (DRR) 2D/3D registration on the virtual room's phantoms (issue 4).

For each phantom, N seeded cases: patient pose with start errors uniform in
+-10 mm and +-4 degrees per axis, frames simulated at i0 = 20000 (Poisson
noise, detector blur), registration started at perfect setup. mTRE is the mean
3D error over the target vertebra's voxels (planning-CT label), room frame.
Tracking mode: from each result, the patient moves again by up to 2 mm / 1
degree per axis; the new pair is registered from the previous result.

Usage::

    python benchmarks/bench_anatomy.py [--cases N] [--quick] [--phantom thoracolumbar|cervical|both]

``--quick``: 5 cases per phantom. The peer (ITK two-projection registration,
``itk-twoprojectionregistration``) is not wired in yet: see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numba
import numpy as np

from calibration.geometry import default_stereo_geometry
from registration.anatomy import AnatomyConfig, AnatomyRegistration, RegionOfInterest
from registration.pose import Pose
from tracking.room.kv import DetectorModel, KVSimulator
from tracking.room.phantoms import cervical_phantom, thoracolumbar_phantom

I0 = 20000.0
SUCCESS_MM = 1.0


def _target_points_room(phantom) -> np.ndarray:
    ct = phantom.planning_ct
    idx = np.argwhere(phantom.labels == phantom.target_label)[:, ::-1].astype(float)
    return ct.lps_to_room(ct.index_to_lps(idx), phantom.isocentre_lps_mm)


def _mtre(pose: Pose, truth: Pose, pts: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(pose.apply(pts) - truth.apply(pts), axis=1)))


def run_phantom(name: str, n_cases: int, seed: int) -> dict:
    build = {"thoracolumbar": lambda: thoracolumbar_phantom(with_seeds=False), "cervical": cervical_phantom}[name]
    t0 = time.monotonic()
    phantom = build()
    geometry = default_stereo_geometry()
    simulator = KVSimulator(phantom, geometry, detector=DetectorModel(i0=I0))
    roi = RegionOfInterest.from_labels(phantom.planning_ct, phantom.labels, phantom.target_label)
    t1 = time.monotonic()
    reg = AnatomyRegistration(phantom.planning_ct, phantom.isocentre_lps_mm, geometry, roi, AnatomyConfig())
    prep_s = time.monotonic() - t1
    pts = _target_points_room(phantom)
    rng = np.random.default_rng(seed)
    # Warm-up: numba compilation (cached on disk after the first run) reported on its own.
    tw = time.monotonic()
    reg.register(dict(simulator.render(Pose.identity(), seed=999).frames), i0=I0)
    warm_s = time.monotonic() - tw
    rows = []
    for case in range(n_cases):
        truth = Pose.from_six(rng.uniform(-10, 10, 3), rng.uniform(-4, 4, 3))
        res = reg.register(dict(simulator.render(truth, seed=case).frames), i0=I0)
        moved = Pose.from_six(rng.uniform(-2, 2, 3) / np.sqrt(3), rng.uniform(-1, 1, 3) / np.sqrt(3)).compose(truth)
        trk = reg.register(
            dict(simulator.render(moved, seed=10_000 + case).frames), i0=I0, initial_pose=res.pose, tracking=True
        )
        rows.append(
            (
                _mtre(res.pose, truth, pts), res.pose.compose(truth.inverse()).angle_deg(), res.elapsed_ms,
                res.quality.ok, res.quality.reason.value, _mtre(trk.pose, moved, pts),
                trk.pose.compose(moved.inverse()).angle_deg(), trk.elapsed_ms, trk.quality.ok,
            )
        )
        r = rows[-1]
        print(f"  {name} case {case:3d}: mTRE {r[0]:.3f} mm rot {r[1]:.3f} deg {r[2]:.0f} ms {r[4]:>15s} | "
              f"tracking mTRE {r[5]:.3f} mm rot {r[6]:.3f} deg {r[7]:.0f} ms", flush=True)
    a = np.array([[r[0], r[1], r[2], r[5], r[6], r[7]] for r in rows])
    return {
        "phantom": name, "cases": n_cases, "build_s": t1 - t0, "prep_s": prep_s, "warm_s": warm_s,
        "success": float(np.mean(a[:, 0] < SUCCESS_MM)), "median_mtre": float(np.median(a[:, 0])),
        "rot_p95": float(np.percentile(a[:, 1], 95)), "time_med_ms": float(np.median(a[:, 2])),
        "time_p95_ms": float(np.percentile(a[:, 2], 95)), "ok_rate": float(np.mean([r[3] for r in rows])),
        "trk_success": float(np.mean(a[:, 3] < SUCCESS_MM)), "trk_median_mtre": float(np.median(a[:, 3])),
        "trk_rot_p95": float(np.percentile(a[:, 4], 95)), "trk_time_med_ms": float(np.median(a[:, 5])),
        "reasons": sorted({r[4] for r in rows}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="5 cases per phantom")
    parser.add_argument("--phantom", choices=("thoracolumbar", "cervical", "both"), default="both")
    parser.add_argument("--seed", type=int, default=20240)
    args = parser.parse_args(argv)
    n = 5 if args.quick else args.cases
    print(f"# bench_anatomy: {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}, python {platform.python_version()}")
    names = ("thoracolumbar", "cervical") if args.phantom == "both" else (args.phantom,)
    results = [run_phantom(nm, n, args.seed) for nm in names]
    print()
    print("| phantom | cases | success (mTRE<1mm) | median mTRE mm | rot err p95 deg | time median ms | time p95 ms "
          "| quality.ok | tracking success | tracking median mTRE mm | tracking rot p95 deg | tracking time median ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['phantom']} | {r['cases']} | {100 * r['success']:.0f}% | {r['median_mtre']:.3f} | {r['rot_p95']:.2f} | "
              f"{r['time_med_ms']:.0f} | {r['time_p95_ms']:.0f} | {100 * r['ok_rate']:.0f}% | {100 * r['trk_success']:.0f}% | "
              f"{r['trk_median_mtre']:.3f} | {r['trk_rot_p95']:.2f} | {r['trk_time_med_ms']:.0f} |")
    for r in results:
        print(f"# {r['phantom']}: phantom build {r['build_s']:.1f} s, registration setup {r['prep_s']:.2f} s, "
              f"first registration (incl. numba load/compile) {r['warm_s']:.2f} s, reasons seen {r['reasons']}")
    print("# peer (ITK two-projection registration): not run -- not wired in yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
