"""Diagnosis of the realistic-chain fiducial failures (issue 19): per failing pair, per seed, which stage loses it.

Run:  python benchmarks/bench_fiducials_diagnose.py [--pairs 10] [--i0 2000,6000] [--rooms default,floor]
                                                    [--spr 1.5] [--seed 0] [--all]

Same pairs as ``bench_fiducials_realistic.py --anatomy spineguide`` with the
same ``--spr`` and ``--seed`` (``draw_pair``: setup pose, seed set, chain
noise per condition), anatomy by the project's own DRR (fast); the migrated
case is not diagnosed. For every pair that is not localised (``--all``: every
pair) prints the outcome, the joint search's pose hypotheses (evidence and
each seed's error against the truth), then per seed and view:

- ``fitSNR`` / ``con``: the full-resolution fit (``refine_seeds``) started at
  the seed's true projection: the best the detector could know (amplitude
  over its standard error; fitted contrast, ln units);
- ``evidence``: the capped evidence map at the truth (units of the region's
  99.5th percentile of the standardised response; cap ``snr_cap``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fiducials_realistic import draw_pair  # noqa: E402

from spineguide.registration.errors import SeedMigrationError  # noqa: E402
from spineguide.registration.pose import Pose  # noqa: E402
from spineguide.tracking.localisation import fiducial_solution as fsol  # noqa: E402
from spineguide.tracking.localisation import fiducials as fid  # noqa: E402
from spineguide.tracking.localisation.detection import estimate_i0  # noqa: E402
from spineguide.tracking.errors import TrackingError  # noqa: E402
from spineguide.tracking.localisation.flatfield import FlatField  # noqa: E402
from spineguide.tracking.room import thoracolumbar_phantom  # noqa: E402
from spineguide.tracking.room.chain import ChainConfig, RealisticSimulator  # noqa: E402
from spineguide.tracking.room.rooms import room_geometry  # noqa: E402
from spineguide.tracking.localisation.constellation import evidence_maps, sample_bilinear, search_constellation  # noqa: E402
from spineguide.tracking.localisation.seed_search import refine_seeds, response_map  # noqa: E402

MATCH_PX = 3.0


def stage_report(frames, geom, flat, planned, names, truth, seeds, config=fid.FiducialConfig()):
    """Lines describing each seed per view (see the module docstring).

    Frames raw counts per imager; ``planned`` room mm at perfect setup;
    ``truth.seeds_px`` the seeds' true ``(col, row)`` panel pixels.
    """
    fc = config.faint
    signals, masks, levels, maps = {}, {}, {}, {}
    for n in geom.names:
        signals[n] = flat[n].apply(np.asarray(frames[n]))
        masks[n] = flat[n].defects
        levels[n] = estimate_i0(signals[n], n)
    centre = planned.mean(axis=0)
    radius = float(np.linalg.norm(planned - centre, axis=1).max()) + fc.translation_range_mm + fc.search_margin_mm
    for n in geom.names:
        im = geom[n]
        rmap = response_map(signals[n], im, levels[n], config.detection, masks[n],
                            fsol._search_box(geom, n, centre[None], radius))
        scale = fsol._px_per_mm(im) / rmap.binning
        maps[n] = evidence_maps(rmap, im.projection_matrix, fc.snr_cap, fc.pool_mm * scale, fc.smooth_mm * scale)
    hyps = search_constellation(maps, planned, Pose.identity(), fc.translation_range_mm, fc.translation_step_mm,
                                fc.local_reach_mm, fc.hypotheses)
    truth_room = truth.pose.apply(planned)
    lines = []
    for q, h in enumerate(hyps):
        err = np.linalg.norm(h.pose.apply(planned) - truth_room, axis=1)
        lines.append(f"    hypothesis {q}: evidence {h.score:.2f}, seed error mm {np.round(err, 2).tolist()}")
    for k, name in enumerate(names):
        line = f"    {name}:"
        for n in geom.names:
            im = geom[n]
            t = truth.seeds_px[n][k]
            if not im.contains(t[None])[0]:
                line += f" {n}: off the panel |"
                continue
            # Started at six orientations: the best fit at the truth.
            best = None
            for ang in range(0, 180, 30):
                d = refine_seeds(signals[n], im, levels[n], t[None], np.array([float(ang)]), config.detection, 0.0,
                                 masks.get(n))[0]
                if d is not None and (best is None or d.snr > best.snr):
                    best = d
            fit = f"fitSNR {best.snr:5.1f} con {best.contrast:.3f}" if best else "fit failed"
            ev = float(sample_bilinear(maps[n].capped, maps[n].response.to_map(t[None]))[0])
            line += f" {n}: {fit} evidence {ev:.2f} |"
        lines.append(line)
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
        tally = {lv: [0, 0] for lv in levels}
        for p in range(opts.pairs):
            draw = draw_pair(opts.seed, p, np.asarray(phantom.isocentre_lps_mm))
            pose, seeds = draw.pose, draw.seeds
            planned = sim.planned_room_mm(seeds)
            names = tuple(s.name for s in seeds)
            paths = {im.name: sim.material_paths(im, pose) for im in geom.imagers}
            for lv in levels:
                chain = ChainConfig.clinic(i0=lv, scatter_to_primary=opts.spr)
                frames, _ = sim.render(pose, seed=draw.noise[f"{lv:g}"], chain=chain, paths=paths, seeds=seeds)
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
                if not ok or opts.all:
                    print(f"{room} pair {p} i0 {lv:g}: {len(names)} seeds: {outcome}")
                    for line in stage_report(frames.frames, geom, flat, planned, names, truth, seeds):
                        print(line)
                    sys.stdout.flush()
        print(f"{room}: " + ", ".join(f"i0 {lv:g} {a}/{b}" for lv, (a, b) in tally.items()))


if __name__ == "__main__":
    main()
