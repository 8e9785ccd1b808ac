"""Benchmark: gold seeds in clinic-like frames, both built-in rooms, anatomy projected by plastimatch (issue 19).

Run:  python benchmarks/bench_fiducials_realistic.py [--pairs 50] [--i0 2000,6000,40000] [--spr 1.5]
                                                     [--rooms default,floor] [--anatomy plastimatch] [--seed 0]

Per room and pair: a setup error (``random_setup_pose``: +-10 mm, +-3 deg per
axis), a fresh seed set (2-5 gold cylinders, 0.8-1.2 mm x 3-5 mm, random
axes, centres uniform in a 50 x 40 x 70 mm box around the target vertebra:
over the vertebral bodies, posterior elements and ribs), the thoracolumbar
phantom's truth anatomy (1 mm grid, seed-free) split into water and cortical
bone path lengths and **projected by plastimatch** (``plastimatch drr -i
exact -P none`` of the two fraction volumes, the pose folded into the
imager; ``--anatomy spineguide`` uses the project's own DRR instead), the
seeds as exact gold chords, then the clinic chain
(``ChainConfig.clinic``: 120 kVp Kramers spectrum, 2.5 mm Al, beam hardening,
heel 15 %, scatter-to-primary ``--spr`` behind 350 mm of tissue, 5 % gain
map, 200-count offset map, a dead row and column, 0.6 px blur, Poisson and
read-out noise) at each ``--i0``. Frames -> ``localise_fiducials`` with the
panels' flat fields (gain, offset, dead lines) and no i0 (estimated).

Per condition (room x i0, and a migrated-seed condition at the first i0 at
or above 6000):

- localised: every seed that projects onto both panels found within 3 px of
  its true projection in both views, and no false seed (two seeds give a
  translation-only result: localised, but no 6-DoF pose);
- mTRE: mean over the target vertebra's voxels of ``|P_est p - P_true p|``
  (mm), median and p95 over the 6-DoF results (``ok``: 3+ seeds, FRE <= 1 mm);
- false seeds: seeds of a result whose detection lies > 3 px from that
  seed's true projection in either view;
- migrated: one seed moved 2 mm (random direction): flagged = the result
  marks it ``migrated`` or the call refuses with ``SeedMigrationError``
  naming it; used silently = a result that uses it unflagged; detectable =
  four seeds or more (the other three fix a 6-DoF pose: the leave-one-out
  check), or the move changed some distance to another seed by more than
  the rigid-body limit (1.5 mm): with two or three seeds no check can see
  the others (such a move is indistinguishable from a rotation);
- anatomy: plastimatch projects the central ``--plastimatch-window``
  pixels of each panel (where the seeds lie), the project's DRR the rest
  (i0 estimation and the clean-frame detector see the whole frame); the
  median difference of the two projectors in the window is printed;
- time: whole frame (no prior) and tracking windows (prior = truth pose
  moved by up to 1 mm / 0.5 deg), median and p95 of each call's wall time,
  answered or refused (a refusal costs the real-time loop as much); the load
  average is printed beside;
- the tracking call is judged like the whole frame (localised, refused,
  false seeds, a moved seed used silently, mTRE), whatever the whole frame
  gave; ``--live-tracking`` makes it the live service's call (the seeds
  verified at the prior, never the joint search: a refusal where that
  fails), and its time percentiles are then the service's processing time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import SimpleITK as sitk

from spineguide.calibration.geometry import ImagerGeometry
from spineguide.registration.errors import SeedMigrationError
from spineguide.registration.pose import Pose
from spineguide.registration.volume import room_from_lps_matrix
from spineguide.tracking.errors import TrackingError
from spineguide.tracking.localisation.fiducials import FaintSearchConfig, FiducialConfig, localise_fiducials
from spineguide.tracking.localisation.detection import DetectionConfig, estimate_i0
from spineguide.tracking.localisation.flatfield import FlatField
from spineguide.tracking.localisation.seed_search import refine_seeds
from spineguide.tracking.room import random_setup_pose, thoracolumbar_phantom
from spineguide.tracking.room.chain import ChainConfig, MaterialPaths, RealisticSimulator
from spineguide.tracking.room.phantoms import Seed
from spineguide.tracking.room.rooms import room_geometry

MATCH_RADIUS_PX = 3.0  # a used detection farther than this from its seed's true projection is a false seed
MIGRATION_MM = 2.0
MM_PER_CM = 10.0
DETECTABLE_MM = 1.5  # the rigid-body check's limit (PointRegistrationConfig default)
TARGET_POINTS = 400  # target vertebra voxels sampled for the mTRE
DETECTION_LIMIT_SNR = 5.0  # a seed view is "hidden" below this fitted SNR at its true place (the oracle fit)
ORACLE_SLIDE_PX = 2.0
BONE_PATH_MM = 5.0  # a seed view "over bone": >= 5 mm cortical-bone-equivalent path (a vertebral body or rib)


def random_seeds(rng: np.random.Generator, iso_lps: np.ndarray) -> tuple[Seed, ...]:
    n = int(rng.integers(2, 6))
    out = []
    for k in range(n):
        for _ in range(100):
            c = iso_lps + rng.uniform([-25.0, -20.0, -35.0], [25.0, 20.0, 35.0])
            if all(np.linalg.norm(c - s.centre_lps_mm) >= 8.0 for s in out):
                break
        axis = rng.normal(size=3)
        out.append(Seed(f"F{k + 1}", c, axis, float(rng.uniform(3.0, 5.0)), float(rng.uniform(0.8, 1.2))))
    return tuple(out)


def moved_imager(imager: ImagerGeometry, pose: Pose) -> tuple[ImagerGeometry, np.ndarray]:
    """The imager in the patient's planned frame (room axes), rotated about the origin, and the shift.

    A patient at ``p_actual = R p + t`` seen by ``imager`` is the planned
    patient seen by the imager moved by ``P^-1``: rotated by ``R^T`` and
    shifted by ``-R^T t``. Returns the rotated imager and the shift (room mm).
    """
    rt = pose.rotation.T
    rotated = ImagerGeometry(imager.name, rt @ imager.source_mm, rt @ imager.origin_mm, rt @ imager.col_direction,
                             rt @ imager.row_direction, imager.pixel_spacing_mm, imager.rows, imager.cols)
    return rotated, -rt @ pose.translation_mm


class PlastimatchPaths:
    """Water and bone path lengths of a phantom through ``plastimatch drr`` (exact ray tracing, no HU conversion)."""

    def __init__(self, sim: RealisticSimulator, tmp: Path, threads: int) -> None:
        import bench_drr  # the project's plastimatch adapter (benchmarks/bench_drr.py)

        self.bench_drr = bench_drr
        self.sim, self.tmp, self.threads = sim, tmp, threads
        ct = sim.phantom.anatomy
        self.room_from_lps = room_from_lps_matrix(ct.patient_position)
        self.iso_lps = np.asarray(sim.phantom.isocentre_lps_mm)
        self.volumes = {}
        for name, vol in (("water", sim.water_volume), ("bone", sim.bone_volume)):
            img = sitk.GetImageFromArray(vol.mu_per_mm)
            img.CopyInformation(ct.to_sitk())
            path = tmp / f"{name}.mha"
            sitk.WriteImage(img, str(path))
            self.volumes[name] = path
        self.seconds: list[float] = []
        self.agreement_mm: list[float] = []

    def __call__(self, imager: ImagerGeometry, pose: Pose, window_px: int) -> MaterialPaths:
        """Paths of every pixel: plastimatch in the central ``window_px`` square (where the seeds are),
        the project's DRR outside it (0: plastimatch everywhere)."""
        rotated, shift_room = moved_imager(imager, pose)
        iso = self.iso_lps + self.room_from_lps.T @ shift_room
        window = None
        if 0 < window_px < min(imager.rows, imager.cols):
            r0, c0 = (imager.rows - window_px) // 2, (imager.cols - window_px) // 2
            window = (r0, c0, window_px, window_px)
        args = self.bench_drr.plastimatch_args(rotated, self.room_from_lps, iso, window=window)
        ours = self.sim.material_paths(imager, pose) if window is not None else None
        out = {}
        for name, path in self.volumes.items():
            t0 = time.perf_counter()
            self.bench_drr.run_plastimatch(args, path, self.tmp / f"pm_{name}", self.threads)
            self.seconds.append(time.perf_counter() - t0)
            # plastimatch integrates the voxel values along the ray in cm: x10 for mm of material.
            pm = MM_PER_CM * self.bench_drr.read_pfm(self.tmp / f"pm_{name}0000.pfm")
            if window is None:
                out[name] = pm
                continue
            r0, c0, nr, nc = window
            if pm.shape != (nr, nc):
                pm = pm[r0:r0 + nr, c0:c0 + nc]
            full = np.array(ours.water_mm if name == "water" else ours.bone_mm)
            # Agreement of the two projectors where both ran (checks the pose folding and orientation).
            self.agreement_mm.append(float(np.median(np.abs(full[r0:r0 + nr, c0:c0 + nc] - pm))))
            full[r0:r0 + nr, c0:c0 + nc] = pm
            out[name] = full
        return MaterialPaths(out["water"], out["bone"])


def target_points(phantom) -> np.ndarray:
    mask = phantom.target_mask()
    kji = np.argwhere(mask > 0)
    rng = np.random.default_rng(0)
    kji = kji[rng.choice(len(kji), size=min(TARGET_POINTS, len(kji)), replace=False)]
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (phantom.planning_ct.room_from_index(phantom.isocentre_lps_mm) @ ijk1.T).T[:, :3]


def mtre_mm(est: Pose, truth: Pose, points: np.ndarray) -> float:
    return float(np.linalg.norm(est.apply(points) - truth.apply(points), axis=1).mean())


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def visible(truth, geom, k: int) -> bool:
    return all(geom[v].contains(truth.seeds_px[v][k:k + 1])[0] for v in geom.names)


@dataclasses.dataclass(frozen=True)
class Truth:
    """The true pose and the seeds' true ``(col, row)`` pixels per imager (moved seed included)."""

    pose: Pose
    seeds_px: dict


def oracle_snr(frames, geom, flat, truth, ks) -> np.ndarray:
    """Per seed of ``ks``: the weaker view's fitted SNR with the fit started at its true projection (0 off a panel).

    What the best possible detector could know of that seed in these frames:
    below ``DETECTION_LIMIT_SNR`` the seed is hidden in a view (behind the
    densest anatomy, at the lowest dose; or merged with another seed's
    shadow, where the fit started at the truth slides more than
    ``ORACLE_SLIDE_PX`` away), and no method can be asked to find it.
    """
    ks = list(ks)
    weakest = np.full(len(ks), np.inf)
    for n in geom.names:
        im = geom[n]
        t = truth.seeds_px[n][ks].reshape(-1, 2)
        on = im.contains(t)
        weakest[~on] = 0.0
        if not on.any():
            continue
        signal = flat[n].apply(np.asarray(frames[n]))
        fits = refine_seeds(signal, im, estimate_i0(signal, n), t[on], np.zeros(int(on.sum())), DetectionConfig(),
                            0.0, flat[n].defects)
        for q, d, p in zip(np.flatnonzero(on), fits, t[on]):
            # A fit that slides away from the truth (onto a seed overlapping this one) does not see it either.
            seen = d is not None and np.hypot(*(np.asarray(d.centre_px) - p)) <= ORACLE_SLIDE_PX
            weakest[q] = min(weakest[q], d.snr if seen else 0.0)
    return weakest


def run_case(frames, sim, flat, planned, names, truth, prior, points, moved_index=None, track=True,
             track_config: FiducialConfig | None = None):
    """One pair: whole frame and tracking windows; returns a dict of outcomes.

    ``localised``: every seed on both panels found within ``MATCH_RADIUS_PX`` of its
    true projection in both views (a migrated seed may instead be flagged or
    refused), and no false seed. ``localised_limit``: the same, with seeds
    hidden in a view (``oracle_snr`` below ``DETECTION_LIMIT_SNR``) not required
    (still never a false seed). ``mtre`` only for 6-DoF results (``ok``).
    """
    geom = sim.geometry
    ks = [k for k in range(len(names)) if k != moved_index]
    hidden = {k for k, snr in zip(ks, oracle_snr(frames, geom, flat, truth, ks)) if snr < DETECTION_LIMIT_SNR}
    out = {"refused": False, "ok": False, "localised": False, "localised_limit": False, "hidden": len(hidden),
           "mtre": np.nan, "false": 0, "flagged": False,
           "silent": False, "whole_ms": np.nan, "track_ms": np.nan, "reason": "", "six_dof": False}
    t0 = time.perf_counter()
    try:
        res = localise_fiducials(frames, geom, planned, names, flat_fields=flat)
    except SeedMigrationError as err:
        res = None
        out["refused"] = True
        out["reason"] = "SeedMigrationError"
        out["flagged"] = moved_index is not None and names[moved_index] in str(err)
        out["localised"] = out["localised_limit"] = out["flagged"]
    except TrackingError as err:
        res = None
        out["refused"] = True
        out["reason"] = type(err).__name__
        # Right to refuse when fewer than two seeds can be seen in both views.
        seen = [k for k in range(len(names)) if visible(truth, geom, k) and k != moved_index and k not in hidden]
        out["localised_limit"] = len(seen) < 2
    out["whole_ms"] = 1e3 * (time.perf_counter() - t0)  # wall time of the call, answered or refused
    if res is not None:
        judge(res, out, geom, names, truth, points, hidden, moved_index)
    if not track:
        return out
    # The tracking call (prior: the truth moved by up to 1 mm / 0.5 deg), judged like the whole frame; run
    # whatever the whole frame gave (a monitor's prior comes from the last pair, not from this one).
    track = {"false": 0, "silent": False, "mtre": np.nan, "refused": False, "localised": False, "reason": "",
             "flagged": False, "ok": False, "six_dof": False, "localised_limit": False}
    out["track"] = track
    t0 = time.perf_counter()
    try:
        tracked = localise_fiducials(frames, geom, planned, names, prior_pose=prior, flat_fields=flat,
                                     config=track_config or FiducialConfig())
    except (TrackingError, SeedMigrationError) as err:
        out["track_ms"] = 1e3 * (time.perf_counter() - t0)
        track["refused"] = True
        track["localised"] = (moved_index is not None and isinstance(err, SeedMigrationError)
                              and names[moved_index] in str(err))
        return out
    out["track_ms"] = 1e3 * (time.perf_counter() - t0)
    judge(tracked, track, geom, names, truth, points, hidden, moved_index)
    return out


def judge(res, out, geom, names, truth, points, hidden, moved_index) -> None:
    """Fill ``out`` from a result: mTRE (6-DoF), false seeds, localised (every seed / those not hidden), a
    moved seed flagged or used silently."""
    out["ok"] = bool(res.ok)
    out["six_dof"] = bool(res.ok)
    if res.ok:
        out["mtre"] = mtre_mm(res.pose, truth.pose, points)
    for k, s in enumerate(res.seeds):
        if s.found and not all(np.hypot(*(px - truth.seeds_px[v][k])) <= MATCH_RADIUS_PX
                               for v, px in s.pixels_px.items()):
            out["false"] += 1
    need = [k for k in range(len(names)) if visible(truth, geom, k) and k != moved_index]
    out["localised"] = out["false"] == 0 and all(res.seeds[k].found for k in need)
    out["localised_limit"] = out["false"] == 0 and all(res.seeds[k].found for k in need if k not in hidden)
    if not out["localised"]:
        out["reason"] = "missing " + ",".join(names[k] for k in need if not res.seeds[k].found)
    if moved_index is not None:
        s = res.seeds[moved_index]
        out["flagged"] = bool(s.migrated)
        out["silent"] = bool(s.found and not s.migrated)
        out["localised"] = out["localised"] and not out["silent"]
        out["localised_limit"] = out["localised_limit"] and not out["silent"]


def summarise(room: str, results: dict, mig_level: float) -> list[tuple]:
    rows = []
    for key, outs in results.items():
        label = f"i0 {key:g}" if key != "migrated" else f"i0 {mig_level:g}, one seed moved {MIGRATION_MM:g} mm"
        n = len(outs)
        done = [o for o in outs if not o["refused"]]
        mt = [o["mtre"] for o in done if np.isfinite(o["mtre"])]
        reasons = {}
        for o in outs:
            if not o["localised"] and o["reason"]:
                key_r = o["reason"].split(" ")[0]
                reasons[key_r] = reasons.get(key_r, 0) + 1
        whole = [o["whole_ms"] for o in outs if np.isfinite(o["whole_ms"])]  # answered or refused
        track = [o["track_ms"] for o in outs if np.isfinite(o["track_ms"])]
        rows.append((room, label, n, sum(o["localised"] for o in outs), sum(o["refused"] for o in outs),
                     f"{len(mt)}: {pct(mt, 50):.3f} / {pct(mt, 95):.3f}", sum(o["false"] for o in outs),
                     sum(o["flagged"] for o in outs) if key == "migrated" else None,
                     sum(o["silent"] for o in outs) if key == "migrated" else None,
                     pct(whole, 50), pct(whole, 95), pct(track, 50), pct(track, 95), pct(track, 99),
                     ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "-",
                     sum(o["localised_limit"] for o in outs), sum(o["hidden"] for o in outs),
                     sum(o.get("detectable", True) for o in outs) if key == "migrated" else None,
                     _tracking_summary(outs)))
    return rows


def _tracking_summary(outs) -> str:
    """The tracking-window call's outcomes: localised, refused, false seeds, moved seed used silently, mTRE."""
    tr = [o["track"] for o in outs if "track" in o]
    if not tr:
        return "-"
    mt = [t["mtre"] for t in tr if np.isfinite(t["mtre"])]
    return (f"{sum(t['localised'] for t in tr)}/{len(tr)} localised, {sum(t['refused'] for t in tr)} refused, "
            f"{sum(t['false'] for t in tr)} false, {sum(t['silent'] for t in tr)} silent, "
            f"mTRE {pct(mt, 50):.3f} / {pct(mt, 95):.3f}")


def print_table(rows, spr: float, file=sys.stdout) -> None:
    print(f"scatter-to-primary {spr:g} (behind 350 mm of tissue), clinic chain, flat fields given, i0 estimated",
          file=file)
    print("| room | condition | pairs | localised | refused | 6-DoF results: mTRE median / p95 mm | false seeds "
          "| migrated flagged / used silently (detectable) | whole frame median / p95 ms "
          "| tracking windows median / p95 / p99 ms | not localised: why "
          f"| localised, seeds hidden in a view (fit SNR < {DETECTION_LIMIT_SNR:g} at the truth) not required "
          "| hidden seeds | tracking call: localised, refused, false seeds, moved used silently, mTRE median / p95 mm |",
          file=file)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", file=file)
    for (room, label, n, ok, refused, mt, false, flagged, silent, w50, w95, t50, t95, t99, why, ok_lim, hidden,
         det, tracking) in rows:
        mig = "-" if flagged is None else f"{flagged}/{n} ({100 * flagged / max(n, 1):.0f} %) / {silent} ({det})"
        print(f"| {room} | {label} | {n} | {ok}/{n} ({100 * ok / max(n, 1):.0f} %) | {refused} | {mt} "
              f"| {false} | {mig} | {w50:.0f} / {w95:.0f} | {t50:.0f} / {t95:.0f} / {t99:.0f} | {why} "
              f"| {ok_lim}/{n} ({100 * ok_lim / max(n, 1):.0f} %) | {hidden} | {tracking} |", file=file)


@dataclasses.dataclass(frozen=True)
class PairDraw:
    """Everything random about one pair, drawn from its own stream ``default_rng([seed, pair])``.

    The same pair is the same in every room, with every ``--i0`` list and
    with or without a cache: the cache stores only what this describes.
    """

    pose: Pose
    seeds: tuple
    prior: Pose
    noise: dict  # condition -> chain noise seed
    moved_index: int
    moved_direction: np.ndarray


def draw_pair(seed: int, pair: int, iso_lps: np.ndarray) -> PairDraw:
    rng = np.random.default_rng([seed, pair])
    pose = random_setup_pose(rng)
    seeds = random_seeds(rng, iso_lps)
    motion = Pose.from_six(rng.uniform(-1, 1, 3), rng.uniform(-0.5, 0.5, 3))
    noise = {c: int(v) for c, v in zip(CONDITIONS, rng.integers(1 << 31, size=len(CONDITIONS)))}
    k = int(rng.integers(len(seeds)))
    d = rng.normal(size=3)
    return PairDraw(pose, seeds, motion.compose(pose), noise, k, d / np.linalg.norm(d))


CONDITIONS = ("2000", "6000", "40000", "migrated")  # noise streams per condition (fixed list: stable draws)


def condition_frames(sim, draw: PairDraw, planned, paths_fn, condition: str, i0: float, spr: float,
                     cache: Path | None, tag: str):
    """Raw frames of one condition (rendered, or read from the cache), the truth and the moved seeds (room mm)."""
    moved = None
    if condition == "migrated":
        moved = draw.pose.apply(planned).copy()
        moved[draw.moved_index] += MIGRATION_MM * draw.moved_direction
    chain = ChainConfig.clinic(i0=i0, scatter_to_primary=spr)
    path = None if cache is None else cache / f"{tag}_{condition}_i0{i0:g}_spr{spr:g}.npz"
    seeds_room = draw.pose.apply(planned) if moved is None else moved
    truth_px = {im.name: im.project(seeds_room) for im in sim.geometry.imagers}
    if path is not None and path.exists():
        with np.load(path) as z:
            frames = {n: z[f"frame_{n}"] for n in sim.geometry.names}
        return frames, truth_px, moved, chain
    stereo, _ = sim.render(draw.pose, seed=draw.noise[condition], chain=chain, paths=paths_fn(),
                           seeds=draw.seeds, seeds_room_mm=moved)
    frames = {n: np.asarray(f) for n, f in stereo.frames.items()}
    if path is not None:
        np.savez(path, **{f"frame_{n}": f for n, f in frames.items()})
    return frames, truth_px, moved, chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=50, help="stereo pairs per room (default 50)")
    ap.add_argument("--first", type=int, default=0, help="index of the first pair (default 0)")
    ap.add_argument("--i0", default="2000,6000,40000", help="comma-separated i0 levels (counts): 2000, 6000, 40000")
    ap.add_argument("--spr", type=float, default=1.5, help="scatter-to-primary ratio behind 350 mm (default 1.5)")
    ap.add_argument("--rooms", default="default,floor")
    ap.add_argument("--anatomy", choices=["plastimatch", "spineguide"], default="plastimatch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="plastimatch OpenMP threads")
    ap.add_argument("--plastimatch-window", type=int, default=512,
                    help="central square (px) projected by plastimatch, the rest by spineguide; 0: whole panel")
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder of rendered anatomy paths and frames: rendered once, read on later runs")
    ap.add_argument("--render-only", action="store_true", help="fill the cache, localise nothing")
    ap.add_argument("--no-migration", action="store_true", help="skip the migrated-seed condition")
    ap.add_argument("--no-tracking", action="store_true", help="skip the tracking-window call per pair")
    ap.add_argument("--live-tracking", action="store_true",
                    help="the tracking call uses the live service's setting (FaintSearchConfig(joint_search=False): "
                         "the seeds verified at the prior, never the joint search)")
    opts = ap.parse_args()
    levels = [float(v) for v in opts.i0.split(",")]
    for lv in levels:
        if f"{lv:g}" not in CONDITIONS:
            ap.error(f"--i0 {lv:g}: levels are {', '.join(CONDITIONS[:-1])} (each has its own noise stream)")
    mig_level = next((v for v in levels if v >= 6000), levels[-1])
    track_config = FiducialConfig(faint=FaintSearchConfig(joint_search=False)) if opts.live_tracking else None
    if opts.cache is not None:
        opts.cache.mkdir(parents=True, exist_ok=True)

    import cv2
    import numba

    print("# Gold seeds in clinic-like frames (issue 19)")
    print(f"command: python benchmarks/bench_fiducials_realistic.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, "
          f"numpy {np.__version__}, opencv {cv2.__version__}, numba {numba.__version__}")
    t0 = time.perf_counter()
    phantom = thoracolumbar_phantom()
    points = target_points(phantom)
    iso_lps = np.asarray(phantom.isocentre_lps_mm)
    print(f"phantom: thoracolumbar, 1 mm truth grid ({time.perf_counter() - t0:.1f} s); anatomy by {opts.anatomy}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fid_real_") as tmp_name:
        for room in opts.rooms.split(","):
            geom = room_geometry(room)
            sim = RealisticSimulator(phantom, geom)
            projector = None
            results = {lv: [] for lv in levels}
            if not opts.no_migration:
                results["migrated"] = []
            over_bone = [0, 0]
            loads = []
            warm = False
            window = opts.plastimatch_window if opts.anatomy == "plastimatch" else 0
            for p in range(opts.first, opts.first + opts.pairs):
                draw = draw_pair(opts.seed, p, iso_lps)
                planned = sim.planned_room_mm(draw.seeds)
                names = tuple(s.name for s in draw.seeds)
                tag = f"{room}_{opts.anatomy}_w{window}_s{opts.seed}_p{p:03d}"
                paths_cache: dict = {}

                def paths_fn():
                    # Anatomy path lengths: the slow part (plastimatch), computed at most once per pair.
                    nonlocal projector
                    if paths_cache:
                        return paths_cache
                    file = None if opts.cache is None else opts.cache / f"{tag}_paths.npz"
                    if file is not None and file.exists():
                        with np.load(file) as z:
                            for im in geom.imagers:
                                paths_cache[im.name] = MaterialPaths(z[f"water_{im.name}"].astype(np.float64),
                                                                     z[f"bone_{im.name}"].astype(np.float64))
                        return paths_cache
                    if opts.anatomy == "plastimatch" and projector is None:
                        projector = PlastimatchPaths(sim, Path(tmp_name), opts.threads)
                    for im in geom.imagers:
                        paths_cache[im.name] = (projector(im, draw.pose, opts.plastimatch_window) if projector
                                                else sim.material_paths(im, draw.pose))
                    if file is not None:
                        np.savez(file, **{f"{m}_{n}": getattr(v, f"{m}_mm").astype(np.float32)
                                          for n, v in paths_cache.items() for m in ("water", "bone")})
                    return paths_cache

                conditions = [(f"{lv:g}", lv) for lv in levels]
                if not opts.no_migration:
                    conditions.append(("migrated", mig_level))
                for cond, lv in conditions:
                    frames, truth_px, moved, chain = condition_frames(sim, draw, planned, paths_fn, cond, lv, opts.spr,
                                                                      opts.cache, tag)
                    if opts.render_only:
                        continue
                    flat = {n: FlatField(n, sim.maps(n, chain).gain, sim.maps(n, chain).offset_counts,
                                         sim.maps(n, chain).dead) for n in geom.names}
                    if cond != "migrated" and paths_cache:
                        for im in geom.imagers:
                            for c, r in truth_px[im.name]:
                                ci, ri = int(round(c)), int(round(r))
                                if 0 <= ri < im.rows and 0 <= ci < im.cols:
                                    over_bone[0] += 1
                                    over_bone[1] += paths_cache[im.name].bone_mm[ri, ci] >= BONE_PATH_MM
                    if not warm:
                        t_w = time.perf_counter()
                        try:
                            localise_fiducials(frames, geom, planned, names, flat_fields=flat)
                        except (TrackingError, SeedMigrationError):
                            pass
                        print(f"{room}: warm-up call {time.perf_counter() - t_w:.2f} s (numba cache load)")
                        warm = True
                    loads.append(os.getloadavg()[0])
                    truth = Truth(draw.pose, truth_px)
                    if cond != "migrated":
                        results[lv].append(run_case(frames, sim, flat, planned, names, truth, draw.prior, points,
                                                    track=not opts.no_tracking, track_config=track_config))
                        continue
                    k = draw.moved_index
                    case = run_case(frames, sim, flat, planned, names, truth, draw.prior, points, moved_index=k,
                                    track=not opts.no_tracking, track_config=track_config)
                    # Detectable by a rigid-body check: four seeds or more (the others fix a 6-DoF pose), or
                    # some distance to another seed changed by > 1.5 mm (the seed itself left out).
                    others = np.arange(len(planned)) != k
                    dp = np.linalg.norm(planned[k] - planned[others], axis=1)
                    dm = np.linalg.norm(moved[k] - draw.pose.apply(planned)[others], axis=1)
                    case["detectable"] = bool(len(planned) >= 4 or np.abs(dm - dp).max() > DETECTABLE_MM)
                    case["pair"] = p
                    results["migrated"].append(case)
                print(f"{room}: pair {p + 1}/{opts.first + opts.pairs} done ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr)
                done = p + 1 - opts.first
                if not opts.render_only and done % 10 == 0 and done < opts.pairs:
                    print_table(summarise(room, results, mig_level), opts.spr, file=sys.stderr)
            if opts.render_only:
                continue
            if projector is not None and projector.seconds:
                print(f"{room}: plastimatch drr median {np.median(projector.seconds):.2f} s per material image; "
                      f"median |plastimatch - spineguide| path in the window: "
                      f"{np.median(projector.agreement_mm) if projector.agreement_mm else float('nan'):.3f} mm")
            if over_bone[0]:
                print(f"{room}: seed views over bone (>= {BONE_PATH_MM:g} mm bone path): "
                      f"{over_bone[1]}/{over_bone[0]} (pairs whose paths were loaded this run)")
            print(f"{room}: load average median {np.median(loads):.2f}, max {max(loads):.2f}")
            rows.extend(summarise(room, results, mig_level))
    if opts.render_only:
        print(f"cache filled: {opts.cache} ({time.perf_counter() - t0:.0f} s)")
        return
    print()
    print_table(rows, opts.spr)


if __name__ == "__main__":
    main()
