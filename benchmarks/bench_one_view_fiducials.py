"""Benchmark: one-view fiducial monitoring (issue #18, item 1): accuracy, honesty of the 95 % bounds, gating safety.

(a) Image level. Sessions of the thoracolumbar phantom in the default room
    (``room_geometry('default', --panel)``, the room's 0.4 mm pitch), frames
    through the realistic 'clinic' chain (``ChainConfig.clinic``: 120 kVp,
    i0 6,000, scatter-to-primary 1.0, heel, gain/offset maps, dead lines,
    Poisson and read-out noise; flat fields given, i0 estimated). Patient
    motion from ``tracking/room/motion.py``: setup residual + linear drift +
    breathing + sudden shifts at Poisson times in random 3D directions (not
    the prior's Gaussian random walk). Schedule at 10 Hz: ``--stereo-s`` of
    stereo pairs, then one imager blocked for ``--blocked-s``, alternating
    which. Stereo pairs are not rendered: the stereo pose is the truth plus
    Gaussian noise of the stereo path's size (0.1 mm, 0.1 deg per axis, the
    prior's ``reference_cov``). Each one-view frame (every ``--stride``-th)
    is rendered and localised with ``localise_one_view`` in tracking mode
    against ``prior_from_stereo_history`` (last stereo pose, the scatter of
    the last 10 s of stereo poses in its floor).
(b) Gating safety. ``--pairs`` pairs with random blocking through the real
    gate (``spineguide.tracking.service.gating.judge_measurement``), at the
    detection level: the seeds projected at the true pose plus centre errors
    drawn from the normalised residuals measured in (a) (bootstrap), then
    ``fit_one_view``. Unsafe ENABLE = ENABLE while the true target deviation
    or rotation is outside a tolerance.

Run: ``nice python benchmarks/bench_one_view_fiducials.py`` (defaults:
300 rendered frames, 10,000 pairs; about 4-6 min on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import numpy as np

from spineguide.registration.motion_prior import MotionPrior, pose_six
from spineguide.registration.pose import Pose
from spineguide.tracking.localisation.flatfield import FlatField
from spineguide.tracking.localisation.one_view import (
    CHI2_3_95,
    OneViewConfig,
    fit_one_view,
    localise_one_view,
    prior_from_stereo_history,
)
from spineguide.tracking.errors import FiducialNotFoundError
from spineguide.tracking.room.chain import ChainConfig, RealisticSimulator, _seed_windows, render_chain_frame
from spineguide.tracking.room.motion import Breathing, Drift, MotionSum, StaticPose, SuddenShift
from spineguide.tracking.room.phantoms import thoracolumbar_phantom
from spineguide.tracking.room.rooms import room_geometry

FRAME_PERIOD_S = 0.1
STEREO_SIGMA_MM = 0.1
STEREO_SIGMA_DEG = 0.1
STEREO_COV = np.diag([STEREO_SIGMA_MM**2] * 3 + [STEREO_SIGMA_DEG**2] * 3)
HISTORY_S = 10.0
Z95 = 1.959963984540054


# ---------------------------------------------------------------------------- motion and schedule
def make_trace(rng: np.random.Generator, duration_s: float, breathing_mm: float, shift_rate_per_s: float,
               shift_max_mm: float, drift_mm_per_s: float) -> MotionSum:
    """Setup residual, drift, breathing and sudden shifts (random directions, Poisson times)."""
    setup = Pose.from_six(rng.normal(0, 0.2, 3), rng.normal(0, 0.1, 3))
    direction = rng.normal(size=3)
    drift = Drift(drift_mm_per_s * rng.uniform(0, 1) * direction / np.linalg.norm(direction),
                  rng.normal(0, 0.003, 3), start_s=rng.uniform(0, duration_s / 2))
    breathing = Breathing((0.0, 0.6 * breathing_mm, breathing_mm), period_s=rng.uniform(3.5, 5.0),
                          phase_rad=rng.uniform(0, math.pi))
    comps = [StaticPose(setup), drift, breathing]
    t = rng.exponential(1.0 / shift_rate_per_s)
    while t < duration_s:
        d = rng.normal(size=3)
        d *= rng.uniform(0.2, shift_max_mm) / np.linalg.norm(d)
        comps.append(SuddenShift(t, Pose.from_six(d, rng.normal(0, 0.2, 3))))
        t += rng.exponential(1.0 / shift_rate_per_s)
    return MotionSum(tuple(comps))


def views_at(step: int, stereo_steps: int, blocked_steps: int, names: tuple[str, str]) -> str | None:
    """None for a stereo pair, else the imager that still sees (alternating which one is blocked)."""
    cycle = stereo_steps + blocked_steps
    k, r = divmod(step, cycle)
    if r < stereo_steps:
        return None
    return names[(k + 1) % 2]  # cycle 0: A blocked, B sees; cycle 1: B blocked, A sees


class StereoHistory:
    """Simulated stereo measurements (truth + stereo noise) and the prior built from them."""

    def __init__(self, rng: np.random.Generator, floor: tuple) -> None:
        self.rng = rng
        self.floor = floor
        self.times: list[float] = []
        self.six: list[np.ndarray] = []

    def measure(self, t_s: float, truth: Pose) -> None:
        self.times.append(t_s)
        self.six.append(pose_six(truth) + self.rng.multivariate_normal(np.zeros(6), STEREO_COV))

    def prior(self, t_s: float) -> tuple[MotionPrior, float]:
        ref = Pose.from_six(self.six[-1][:3], self.six[-1][3:])
        recent = [s for tt, s in zip(self.times, self.six) if t_s - tt <= HISTORY_S]
        base = MotionPrior(ref, STEREO_COV, floor=self.floor)
        if len(recent) >= 2:
            return prior_from_stereo_history(ref, STEREO_COV, np.array(recent), base), t_s - self.times[-1]
        return base, t_s - self.times[-1]


def floor_of(args) -> tuple:
    return (args.floor_mm**2,) * 3 + (args.floor_deg**2,) * 3


# ---------------------------------------------------------------------------- (a) image level
def errors_of(dev_est: np.ndarray, cov: np.ndarray, dev_true: np.ndarray, axis: np.ndarray) -> dict:
    e = dev_est - dev_true
    along = float(e @ axis)
    perp = e - along * axis
    return {
        "in_plane_mm": float(np.linalg.norm(perp)),
        "out_of_plane_mm": abs(along),
        "mahal2": float(e @ np.linalg.solve(cov, e)),
        "oop_sigma_mm": float(math.sqrt(axis @ cov @ axis)),
        "oop_inside": abs(along) <= Z95 * math.sqrt(axis @ cov @ axis),
    }


def image_level(args, sim: RealisticSimulator, flats, planned, names, ov: OneViewConfig):
    geometry = sim.geometry
    rows = []
    pool = []  # (normalised residual col, row, snr)
    failures = {"not_found": 0, "not_ok": 0}
    stereo_steps = int(round(args.stereo_s / FRAME_PERIOD_S))
    blocked_steps = int(round(args.blocked_s / FRAME_PERIOD_S))
    session = 0
    rendered = 0
    render_s = 0.0
    while rendered < args.frames:
        rng = np.random.default_rng([args.seed, session])
        trace = make_trace(rng, args.session_s, args.breathing_mm, args.shift_rate, args.shift_max_mm,
                           args.drift_mm_per_s)
        hist = StereoHistory(rng, floor_of(args))
        one_view_count = 0
        for step in range(int(args.session_s / FRAME_PERIOD_S)):
            t = step * FRAME_PERIOD_S
            truth = trace.pose_at(t)
            view = views_at(step, stereo_steps, blocked_steps, geometry.names)
            if view is None:
                hist.measure(t, truth)
                continue
            one_view_count += 1
            if one_view_count % args.stride:
                continue
            im = geometry[view]
            t_r = time.perf_counter()
            paths = sim.material_paths(im, truth)
            frame = render_chain_frame(paths, im, sim.chain, sim.maps(view), rng,
                                       _seed_windows(im, sim.markers(truth), sim.chain.seed_supersampling)).raw
            render_s += time.perf_counter() - t_r
            rendered += 1
            prior, elapsed = hist.prior(t)
            dev_true = truth.apply(np.zeros(3))
            try:
                res = localise_one_view(frame, view, geometry, planned, names, prior, elapsed,
                                        flat_field=flats[view], one_view=ov)
            except FiducialNotFoundError as err:
                failures["not_found"] += 1
                if args.verbose:
                    moved = np.linalg.norm(truth.translation_mm - prior.reference.translation_mm)
                    print(f"  t={t:.1f} s {view}: {err}; moved {moved:.2f} mm")
                continue
            if not res.ok:
                failures["not_ok"] += 1
            truth_px = im.project(truth.apply(planned))
            for k, s in enumerate(res.seeds):
                if s.found:
                    pool.append([*(s.centre_px - truth_px[k]) / s.sigma_px, s.snr])
            row = errors_of(res.deviation_mm, res.deviation_cov_mm2, dev_true, res.out_of_plane_axis_room)
            row.update(ok=res.ok, total_ms=res.total_ms, detection_ms=res.detection_ms, fit_ms=res.fit_ms,
                       n_seeds=res.n_seeds, elapsed_s=elapsed, inflation=res.prior_inflation_mm2,
                       move_mm=float(np.linalg.norm(dev_true - prior.reference.apply(np.zeros(3)))))
            rows.append(row)
            if args.verbose and row["mahal2"] > CHI2_3_95:
                rot_err = res.pose.rotation_deg - truth.rotation_deg
                print(f"  miss t={t:.1f} {view}: moved {row['move_mm']:.2f} mm, in-plane err {row['in_plane_mm']:.3f} "
                      f"(sigma {res.in_plane_sigma_mm:.3f}), oop err {row['out_of_plane_mm']:.3f} (sigma "
                      f"{res.out_of_plane_sigma_mm:.3f}), rot err {np.round(rot_err, 2)} (sigma "
                      f"{np.round(np.sqrt(np.diag(res.rotation_cov_deg2)), 2)}), "
                      f"inflation {res.prior_inflation_mm2:.2f}, "
                      f"seeds {[s.how for s in res.seeds]}, chi2 {res.chi2:.1f}/{res.chi2_dof:.1f}, centre - truth px "
                      f"{[np.round(s.centre_px - p, 2).tolist() for s, p in zip(res.seeds, truth_px) if s.found]}")
            if rendered >= args.frames:
                break
        session += 1
    return rows, np.array(pool).reshape(-1, 3), failures, session, render_s / max(rendered, 1)


# ---------------------------------------------------------------------------- (b) gating safety
def gating_level(args, geometry, planned, names, ov: OneViewConfig, pool: np.ndarray):
    from spineguide.tracking.service import gating as g

    config = g.GatingConfig()
    rng = np.random.default_rng([args.seed, 10_000])
    state = g.GatingState()
    counts = {"pairs": 0, "one_view": 0, "enable": 0, "enable_one_view": 0, "unsafe": 0, "unsafe_one_view": 0,
              "truth_out": 0, "truth_out_one_view": 0, "not_found": 0, "not_ok": 0}
    mahal, oop_in = [], []
    session_steps = int(args.session_s / FRAME_PERIOD_S)
    pid = 0
    fit_ms = []
    while counts["pairs"] < args.pairs:
        trace = make_trace(rng, args.session_s, args.breathing_mm, args.shift_rate, args.shift_max_mm,
                           args.drift_mm_per_s)
        hist = StereoHistory(rng, floor_of(args))
        view = None
        for step in range(session_steps):
            if counts["pairs"] >= args.pairs:
                break
            t = step * FRAME_PERIOD_S
            truth = trace.pose_at(t)
            # Random blocking: a two-state chain, blocked spells of 1-5 s on a random side.
            if step == 0:
                view = None
            elif view is None and rng.random() < 0.05:
                view = geometry.names[int(rng.integers(2))]
            elif view is not None and rng.random() < 0.04:
                view = None
            pid += 1
            counts["pairs"] += 1
            dev_true = truth.apply(np.zeros(3))
            rot_true = truth.rotation_deg
            outside = (np.linalg.norm(dev_true) > config.tolerance_3d_mm
                       or np.any(np.abs(dev_true) > np.asarray(config.tolerance_axis_mm))
                       or np.max(np.abs(rot_true)) > config.tolerance_rotation_deg)
            now = 1000.0 + t
            if view is None:
                hist.measure(t, truth)
                six = hist.six[-1]
                kw = dict(deviation_mm=Pose.from_six(six[:3], six[3:]).apply(np.zeros(3)), rotation_deg=six[3:])
                m = g.Measurement(pid, now, g.HoldReason.OK, **kw)
            else:
                counts["one_view"] += 1
                counts["truth_out_one_view"] += bool(outside)
                im = geometry[view]
                px = im.project(truth.apply(planned))
                draw = pool[rng.integers(len(pool), size=len(planned))]
                sig = np.array([ov.sigma_for(s) for s in draw[:, 2]])
                centres = px + draw[:, :2] * sig[:, None]
                prior, elapsed = hist.prior(t)
                t0 = time.perf_counter()
                try:
                    res = fit_one_view(view, geometry, planned, names, centres, draw[:, 2], prior, elapsed, one_view=ov)
                except FiducialNotFoundError:
                    counts["not_found"] += 1
                    res = None
                fit_ms.append(1e3 * (time.perf_counter() - t0))
                if res is None or not res.ok:
                    counts["not_ok"] += res is not None
                    reason = g.HoldReason.FIDUCIAL_MISSING if res is None else g.HoldReason.ONE_VIEW_REFUSED
                    m = g.Measurement(pid, now, reason, one_view=view)
                else:
                    e = res.deviation_mm - dev_true
                    mahal.append(float(e @ np.linalg.solve(res.deviation_cov_mm2, e)))
                    a = res.out_of_plane_axis_room
                    oop_in.append(abs(e @ a) <= Z95 * math.sqrt(a @ res.deviation_cov_mm2 @ a))
                    m = g.Measurement(pid, now, g.HoldReason.OK, deviation_mm=res.deviation_mm,
                                      rotation_deg=res.pose.rotation_deg, one_view=view,
                                      deviation_cov_mm2=res.deviation_cov_mm2, rotation_cov_deg2=res.rotation_cov_deg2)
            counts["truth_out"] += bool(outside)
            decision, state = g.judge_measurement(state, m, now + 0.02, config)
            if decision.beam is g.Beam.ENABLE:
                counts["enable"] += 1
                counts["enable_one_view"] += view is not None
                if outside:
                    counts["unsafe"] += 1
                    counts["unsafe_one_view"] += view is not None
    return counts, np.array(mahal), np.array(oop_in), np.array(fit_ms)


# ---------------------------------------------------------------------------- report
def pct(x, q):
    return float(np.percentile(x, q)) if len(x) else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=300, help="one-view frames rendered (a)")
    p.add_argument("--pairs", type=int, default=10_000, help="pairs through the gate (b)")
    p.add_argument("--panel", type=int, default=512, help="panel pixels (room pitch 0.4 mm)")
    p.add_argument("--truth-spacing-mm", type=float, default=1.5)
    p.add_argument("--session-s", type=float, default=30.0)
    p.add_argument("--stereo-s", type=float, default=2.0)
    p.add_argument("--blocked-s", type=float, default=3.0)
    p.add_argument("--stride", type=int, default=5, help="render every n-th one-view frame")
    p.add_argument("--breathing-mm", type=float, default=0.5, help="AP breathing amplitude (SI 0.6x)")
    p.add_argument("--shift-rate", type=float, default=0.1, help="sudden shifts per second")
    p.add_argument("--shift-max-mm", type=float, default=2.0)
    p.add_argument("--drift-mm-per-s", type=float, default=0.02)
    p.add_argument("--i0", type=float, default=6000.0)
    p.add_argument("--floor-mm", type=float, default=0.05, help="prior floor per translation axis (sigma)")
    p.add_argument("--floor-deg", type=float, default=0.05, help="prior floor per rotation axis (sigma)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--rotation-per-mm-deg", type=float, default=OneViewConfig().rotation_per_mm_deg)
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="use the detector's centroids as they are (no box refit)")
    p.add_argument("--detect-min-snr", type=float, default=5.0,
                   help="detector SNR threshold in one view (0: the DetectionConfig's)")
    args = p.parse_args(argv)

    ov = OneViewConfig(refit_detected=args.refit, detect_min_snr=args.detect_min_snr or None,
                       rotation_per_mm_deg=args.rotation_per_mm_deg)
    print(f"# bench_one_view_fiducials: {' '.join(sys.argv)}")
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()} numpy {np.__version__}")
    t = time.perf_counter()
    phantom = thoracolumbar_phantom(truth_spacing_mm=args.truth_spacing_mm)
    geometry = room_geometry("default", args.panel)
    sim = RealisticSimulator(phantom, geometry, ChainConfig.clinic(i0=args.i0))
    planned = sim.planned_room_mm()
    names = tuple(s.name for s in phantom.seeds)
    flats = {n: FlatField(n, sim.maps(n).gain, sim.maps(n).offset_counts, sim.maps(n).dead) for n in geometry.names}
    print(f"# phantom + simulator {time.perf_counter() - t:.1f} s; {len(planned)} seeds; config {ov}")
    # Warm-up (numba compile / cache load), reported apart.
    t = time.perf_counter()
    im = geometry["A"]
    frame = render_chain_frame(sim.material_paths(im, Pose.identity()), im, sim.chain, sim.maps("A"),
                               np.random.default_rng(0), _seed_windows(im, sim.markers(Pose.identity()), 4)).raw
    t = time.perf_counter()
    localise_one_view(frame, "A", geometry, planned, names, MotionPrior(Pose.identity()), 0.0, flat_field=flats["A"])
    print(f"# warm-up localise_one_view (numba compile or cache load) {time.perf_counter() - t:.2f} s")

    t = time.perf_counter()
    rows, pool, failures, sessions, render_s = image_level(args, sim, flats, planned, names, ov)
    if args.frames:
        report_image_level(args, rows, pool, failures, sessions, render_s, time.perf_counter() - t)
    if args.pairs:
        report_gating(args, geometry, planned, names, ov, pool)
    return 0


def report_image_level(args, rows, pool, failures, sessions, render_s, wall_a):
    ip = np.array([r["in_plane_mm"] for r in rows])
    oop = np.array([r["out_of_plane_mm"] for r in rows])
    ok = np.array([r["ok"] for r in rows])
    m2 = np.array([r["mahal2"] for r in rows])
    oin = np.array([r["oop_inside"] for r in rows])
    tot = np.array([r["total_ms"] for r in rows])
    det = np.array([r["detection_ms"] for r in rows])
    fit = np.array([r["fit_ms"] for r in rows])
    sig = np.array([r["oop_sigma_mm"] for r in rows])
    n = len(rows)
    print(f"\n## (a) image level: {args.frames} one-view frames rendered (clinic chain, i0 {args.i0:g}), "
          f"{sessions} sessions of {args.session_s:g} s, stride {args.stride}; wall {wall_a:.0f} s "
          f"(render {render_s:.2f} s/frame)")
    print(f"frames localised {n}, not found (raised) {failures['not_found']}, not ok {failures['not_ok']}")
    print("| quantity (all localised frames) | p50 | p95 | max |")
    print("|---|---|---|---|")
    print(f"| in-plane error of the isocentre deviation, mm | {pct(ip, 50):.3f} | {pct(ip, 95):.3f} | {ip.max():.3f} |")
    print(f"| out-of-plane error, mm | {pct(oop, 50):.3f} | {pct(oop, 95):.3f} | {oop.max():.3f} |")
    print(f"| reported out-of-plane sigma, mm | {pct(sig, 50):.3f} | {pct(sig, 95):.3f} | {sig.max():.3f} |")
    print(f"| localise_one_view total, ms | {pct(tot, 50):.1f} | {pct(tot, 95):.1f} (p99 {pct(tot, 99):.1f}) "
          f"| {tot.max():.1f} |")
    print(f"| of which detection + seed fits, ms | {pct(det, 50):.1f} | {pct(det, 95):.1f} | {det.max():.1f} |")
    print(f"| of which MAP fits, ms | {pct(fit, 50):.1f} | {pct(fit, 95):.1f} | {fit.max():.1f} |")
    moved = np.array([r["move_mm"] for r in rows]) > 0.5
    for label, sel in (("all localised", np.ones(n, bool)), ("ok only", ok),
                       ("moved > 0.5 mm since the stereo reference", moved)):
        if sel.any():
            print(f"coverage ({label}, n={int(sel.sum())}): chi^2_3 95% ellipsoid of the 3D deviation "
                  f"{100 * np.mean(m2[sel] <= CHI2_3_95):.1f} %; per-axis 95% out-of-plane interval "
                  f"{100 * np.mean(oin[sel]):.1f} %; ok frames in-plane p95 {pct(ip[sel], 95):.3f} mm, "
                  f"out-of-plane p95 {pct(oop[sel], 95):.3f} mm")
    if len(pool):
        r = pool[:, :2].ravel()
        print(f"detection residuals (fitted centre - true projection) / sigma_for(snr): n={len(r)}, "
              f"std {r.std():.2f}, |r|>3: {100 * np.mean(np.abs(r) > 3):.1f} %, snr p5/p50 "
              f"{pct(pool[:, 2], 5):.1f}/{pct(pool[:, 2], 50):.1f}")



def report_gating(args, geometry, planned, names, ov, pool):
    if True:
        if not len(pool):
            pool = np.column_stack([np.random.default_rng(1).normal(size=(1000, 2)), np.full(1000, 15.0)])
        from spineguide.tracking.service import gating as g

        t = time.perf_counter()
        counts, mahal, oop_in, fit_ms = gating_level(args, geometry, planned, names, ov, pool)
        print(f"\n## (b) gating: {counts['pairs']} pairs with random blocking through gating.judge_measurement "
              f"(detection level: projected seeds + centre errors resampled from (a)); wall "
              f"{time.perf_counter() - t:.0f} s; {g.GatingConfig()}")
        print("| count | all pairs | one view |")
        print("|---|---|---|")
        print(f"| pairs | {counts['pairs']} | {counts['one_view']} |")
        print(f"| truth outside tolerance | {counts['truth_out']} | {counts['truth_out_one_view']} |")
        print(f"| ENABLE | {counts['enable']} | {counts['enable_one_view']} |")
        print(f"| unsafe ENABLE | {counts['unsafe']} | {counts['unsafe_one_view']} |")
        print(f"one-view: not found {counts['not_found']}, not ok {counts['not_ok']}; coverage chi^2_3 ellipsoid "
              f"{100 * np.mean(mahal <= CHI2_3_95):.1f} %, out-of-plane interval {100 * np.mean(oop_in):.1f} % "
              f"(n={len(mahal)}); fit_one_view p50/p99 {pct(fit_ms, 50):.1f}/{pct(fit_ms, 99):.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
