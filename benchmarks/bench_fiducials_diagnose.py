"""Diagnosis of the realistic-chain fiducial failures (issue 19): per failing pair, per seed, which stage loses it.

Run:  python benchmarks/bench_fiducials_diagnose.py [--pairs 10] [--i0 2000,6000] [--rooms default,floor]
                                                    [--spr 1.5] [--seed 0] [--all]

Same pairs as ``bench_fiducials_realistic.py --anatomy spineguide`` with the
same ``--i0``, ``--spr`` and ``--seed`` (same random stream: setup pose, seed
set, chain noise, the migrated case's draws skipped), anatomy by the
project's own DRR (fast); the migrated case itself is not diagnosed. For every pair that is not localised (``--all``: every pair)
prints the outcome, then per seed and view:

- ``fitSNR`` / ``con``: the full-resolution fit (``refine_seeds``) started at
  the seed's true projection: the best the detector could know (amplitude
  over its standard error; fitted contrast, ln units);
- ``cand``: rank (0 = strongest) and SNR of the whole-frame matched-filter
  candidate within 3 px of the truth, ``-`` if none among the
  ``candidates_per_view`` kept;
- ``kept``: whether a refined detection within 3 px is among the
  ``kept_per_view`` detections the joint choice sees;
- ``result``: found and within 3 px, found elsewhere (false), or not found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fiducials_realistic import random_seeds  # noqa: E402

from spineguide.registration.errors import SeedMigrationError  # noqa: E402
from spineguide.registration.pose import Pose  # noqa: E402
from spineguide.tracking.localisation import fiducials as fid  # noqa: E402
from spineguide.tracking.localisation.detection import estimate_i0  # noqa: E402
from spineguide.tracking.errors import TrackingError  # noqa: E402
from spineguide.tracking.localisation.flatfield import FlatField  # noqa: E402
from spineguide.tracking.room import random_setup_pose, thoracolumbar_phantom  # noqa: E402
from spineguide.tracking.room.chain import ChainConfig, RealisticSimulator  # noqa: E402
from spineguide.tracking.room.rooms import room_geometry  # noqa: E402
from spineguide.tracking.localisation.seed_search import refine_seeds  # noqa: E402

MATCH_PX = 3.0


def stage_report(frames, geom, flat, planned, names, truth, seeds, config=fid.FiducialConfig()):
    """Lines describing each seed per view (see the module docstring).

    Frames raw counts per imager; ``planned`` room mm at perfect setup;
    ``truth.seeds_px`` the seeds' true ``(col, row)`` panel pixels.
    """
    fc = config.faint
    signals, masks, levels = {}, {}, {}
    for n in geom.names:
        signals[n] = flat[n].apply(np.asarray(frames[n]))
        masks[n] = flat[n].defects
        levels[n] = estimate_i0(signals[n], n)
    centre = planned.mean(axis=0)
    radius = float(np.linalg.norm(planned - centre, axis=1).max()) + fc.search_margin_mm
    lines = []
    for n in geom.names:
        im = geom[n]
        regions = fid._search_regions(geom, n, centre[None], radius)
        coarse = fid._candidates(signals, geom, n, levels[n], masks, regions, config, fc.min_snr,
                                 fc.candidates_per_view)
        fits = fid._refined(signals[n], im, levels[n], coarse, masks.get(n), config)
        kept = sorted(fits, key=lambda d: -d.snr)[: fc.kept_per_view]
        cpx = np.array([d.centre_px for d in coarse]).reshape(-1, 2)
        kpx = np.array([d.centre_px for d in kept]).reshape(-1, 2)
        for k, name in enumerate(names):
            t = truth.seeds_px[n][k]
            if not im.contains(t[None])[0]:
                lines.append(f"    {name} {n}: off the panel")
                continue
            # Started at six orientations: the best fit at the truth.
            best = None
            for ang in range(0, 180, 30):
                d = refine_seeds(signals[n], im, levels[n], t[None], np.array([float(ang)]), config.detection, 0.0,
                                 masks.get(n))[0]
                if d is not None and (best is None or d.snr > best.snr):
                    best = d
            fit = f"fitSNR {best.snr:5.1f} con {best.contrast:.3f} len {best.length_px:4.1f}" if best else "fit failed"
            dc = np.hypot(*(cpx - t).T) if len(cpx) else np.zeros(0)
            cand = "-"
            if len(dc) and dc.min() <= MATCH_PX:
                q = int(np.argmin(dc))
                cand = f"#{q} snr {coarse[q].snr:.1f}"
            dk = np.hypot(*(kpx - t).T) if len(kpx) else np.zeros(0)
            kp = "yes" if len(dk) and dk.min() <= MATCH_PX else "no"
            weakest = coarse[-1].snr if coarse else 0.0
            lines.append(f"    {name} {n}: {fit} | cand {cand} (of {len(coarse)}, min {weakest:.1f})"
                         f" | kept {kp} (of {len(kept)})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--i0", default="2000,6000")
    ap.add_argument("--spr", type=float, default=1.5)
    ap.add_argument("--rooms", default="default,floor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true")
    opts = ap.parse_args()
    levels = [float(v) for v in opts.i0.split(",")]
    phantom = thoracolumbar_phantom()
    for room in opts.rooms.split(","):
        geom = room_geometry(room)
        sim = RealisticSimulator(phantom, geom)
        rng = np.random.default_rng(opts.seed)
        tally = {lv: [0, 0] for lv in levels}
        for p in range(opts.pairs):
            pose = random_setup_pose(rng)
            seeds = random_seeds(rng, np.asarray(phantom.isocentre_lps_mm))
            planned = sim.planned_room_mm(seeds)
            names = tuple(s.name for s in seeds)
            rng.uniform(-1, 1, 3), rng.uniform(-0.5, 0.5, 3)  # the benchmark's tracking motion
            paths = {im.name: sim.material_paths(im, pose) for im in geom.imagers}
            for lv in levels:
                chain = ChainConfig.clinic(i0=lv, scatter_to_primary=opts.spr)
                frames, _ = sim.render(pose, seed=int(rng.integers(1 << 31)), chain=chain, paths=paths, seeds=seeds)
                flat = {n: FlatField(n, sim.maps(n, chain).gain, sim.maps(n, chain).offset_counts,
                                     sim.maps(n, chain).dead) for n in geom.names}
                truth = frames.truth
                try:
                    res = fid.localise_fiducials(dict(frames.frames), geom, planned, names, flat_fields=flat)
                    bad, missing = [], []
                    for k, s in enumerate(res.seeds):
                        vis = all(geom[v].contains(truth.seeds_px[v][k:k + 1])[0] for v in geom.names)
                        if not s.found:
                            if vis:
                                missing.append(names[k])
                        elif any(np.hypot(*(px - truth.seeds_px[v][k])) > MATCH_PX for v, px in s.pixels_px.items()):
                            bad.append(names[k])
                    ok = not bad and not missing
                    outcome = (f"found {sum(s.found for s in res.seeds)}/{len(names)}, missing {missing}, false {bad}, "
                               f"faint {fid.FiducialFlag.FAINT_SEARCH in res.flags}, {res.total_ms:.0f} ms")
                except (TrackingError, SeedMigrationError) as err:
                    ok, outcome = False, f"{type(err).__name__}: {err}"
                tally[lv][0] += ok
                tally[lv][1] += 1
                if lv == next((v for v in levels if v >= 6000), levels[-1]):
                    rng.integers(len(seeds)), rng.normal(size=3), rng.integers(1 << 31)  # the migrated case's draws
                if not ok or opts.all:
                    print(f"{room} pair {p} i0 {lv:g}: {len(names)} seeds: {outcome}")
                    for line in stage_report(frames.frames, geom, flat, planned, names, truth, seeds):
                        print(line)
                    sys.stdout.flush()
        print(f"{room}: " + ", ".join(f"i0 {lv:g} {a}/{b}" for lv, (a, b) in tally.items()))


if __name__ == "__main__":
    main()
